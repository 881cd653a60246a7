// The engine's jobs as the completion channel (completion.h) carries them:
// what each one owns while it runs and the JS value its promise resolves with.
// Workers write only the plain C++ fields; Result() reads them on the JS thread.
#pragma once
#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "completion.h"
#include "transfer.h"

namespace ucm {

using CancellableTasks = std::unordered_map<uint32_t, std::shared_ptr<TransferTask>>;

// dump()/load(): per block status, errno and what failed, plus totals.
struct PendingTransfer final : Pending {
  using Pending::Pending;
  std::shared_ptr<TransferTask> task;
  // Where the task is registered under its cancelId (when the spec gave one);
  // the engine outlives its jobs, so the map does too.
  CancellableTasks* cancellable = nullptr;
  uint32_t cancel_id = 0;
  Napi::Value Result(Napi::Env env) override;
  void Settle(Napi::Env env) override;
};

// cancel(): "stopped" once no block of the task can write memory any more,
// "finished" when it was not running, "timeout" when a copy outlived the wait.
struct PendingCancel final : Pending {
  using Pending::Pending;
  std::shared_ptr<TransferTask> task;
  const char* outcome = "finished";
  Napi::Value Result(Napi::Env env) override { return Napi::String::New(env, outcome); }
};

// drainWrites(): blocks still not written behind when the wait ended.
struct PendingDrain final : Pending {
  using Pending::Pending;
  uint64_t left = 0;
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(left)); }
};

// A metadata batch split over the metadata pool; each chunk fills its slice.
struct PendingMeta final : Pending {
  PendingMeta(Napi::Env env, std::vector<std::string> a, std::vector<std::string> b)
      : Pending(env), first(std::move(a)), second(std::move(b)), codes(first.size(), 0) {}
  std::vector<std::string> first;
  std::vector<std::string> second;
  std::vector<int32_t> codes;
  StoreRoots roots;          // the engine's storage directories (store_dirs.h)
  HostTier* tier = nullptr;  // the engine's Cache stage: lookups, commits and removals keep it in step
  std::atomic<uint32_t> chunks_left{0};
  bool bytes_result = false;  // lookup answers a Uint8Array, others an Int32Array
  Napi::Value Result(Napi::Env env) override;
};

}  // namespace ucm
