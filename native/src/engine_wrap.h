// The JS Engine class: one TransferEngine (transfer.h) with the regions and
// events its clients opened, and the completion channel (completion.h) its
// jobs come back through.
//
// Invariants: while a job is in flight the JS object is referenced, so it is
// not collected under a worker; at close() or environment teardown the
// core's threads are joined before anything they refer to goes away.
#pragma once
#include <napi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "completion.h"
#include "convert.h"
#include "engine_pending.h"
#include "region.h"
#include "transfer.h"

namespace ucm {

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit EngineWrap(const Napi::CallbackInfo& info);
  ~EngineWrap() override;

 private:
  Napi::Value OpenHostRegion(const Napi::CallbackInfo& info);
  Napi::Value OpenCudaRegion(const Napi::CallbackInfo& info);
  Napi::Value OpenCudaEvent(const Napi::CallbackInfo& info);
  Napi::Value CloseEvent(const Napi::CallbackInfo& info);
  Napi::Value CloseRegion(const Napi::CallbackInfo& info);
  Napi::Value Dump(const Napi::CallbackInfo& info) { return Transfer(info, Op::kDump); }
  Napi::Value Load(const Napi::CallbackInfo& info) { return Transfer(info, Op::kLoad); }
  Napi::Value Transfer(const Napi::CallbackInfo& info, Op op);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value Released(const Napi::CallbackInfo& info);
  Napi::Value Lookup(const Napi::CallbackInfo& info);
  Napi::Value Commit(const Napi::CallbackInfo& info);
  Napi::Value Remove(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value TierStatsOf(const Napi::CallbackInfo& info);
  Napi::Value DrainWrites(const Napi::CallbackInfo& info);
  Napi::Value PrepareTier(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  // Splits a metadata batch over the metadata (or lookup) threads; `fn`
  // fills entry i.
  Napi::Value RunMeta(Napi::Env env, std::unique_ptr<PendingMeta> p, void (*fn)(PendingMeta&, size_t), bool lookup);
  // Keeps what an Open() returned under a fresh id (regions and events share
  // the numbering), or throws its error with `code` when it returned nothing.
  template <typename T, typename Opened>
  Napi::Value Keep(Napi::Env env, std::unordered_map<uint32_t, std::shared_ptr<T>>& ids, Opened opened,
                   const char* code, const std::string& error) {
    if (!opened) throw CodedError(env, code, error);
    const uint32_t id = next_region_++;
    ids[id] = std::move(opened);
    return Napi::Number::New(env, id);
  }
  void CheckOpen(Napi::Env env);
  // Environment teardown: stop the threads; promises are abandoned with it.
  void Teardown();

  // Declaration order matters: core_ (threads) is destroyed first, then the
  // channel its callbacks complete through, then the maps they refer to.
  std::unordered_map<uint32_t, std::shared_ptr<Region>> regions_;
  std::unordered_map<uint32_t, std::shared_ptr<CudaEvent>> events_;
  CancellableTasks cancellable_;  // running tasks by cancelId
  uint32_t next_region_ = 1;
  std::unique_ptr<CompletionChannel> channel_;
  Napi::Env::CleanupHook<std::function<void()>> cleanup_;
  bool hook_ran_ = false;
  std::unique_ptr<TransferEngine> core_;
};

}  // namespace ucm
