// The addon's entry point: module initialisation only. What each export does
// lives with its concern (bindings.h); this file decides nothing else.
#include <napi.h>

#include "bindings.h"
#include "block_file.h"
#include "cuda_backend.h"
#include "engine_wrap.h"

namespace ucm {

void RegisterEngine(Napi::Env env, Napi::Object exports) { exports.Set("Engine", EngineWrap::Define(env)); }

void RegisterConstants(Napi::Env env, Napi::Object exports) {
  auto consts = Napi::Object::New(env);
  consts.Set("headerSize", static_cast<double>(kHeaderSize));
  consts.Set("blockAlign", static_cast<double>(kBlockAlign));
  consts.Set("formatVersion", kFormatVersion);
  consts.Set("cuda", CudaProbe().built);
  auto names = Napi::Array::New(env);
  for (const char* name : kBlockStatusNames) names.Set(names.Length(), name);
  consts.Set("blockStatus", names);
  exports.Set("constants", consts);
}

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  RegisterEngine(env, exports);
  RegisterCapacity(env, exports);
  RegisterStore(env, exports);
  RegisterSystem(env, exports);
  RegisterConstants(env, exports);
  return exports;
}

}  // namespace
}  // namespace ucm

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return ucm::Init(env, exports); }
NODE_API_MODULE(ucm_native, InitModule)
