// What binding.cc puts on the module's exports, one function per concern.
// Each file that implements one validates and converts on the JS thread and
// leaves blocking work to the addon's own threads (see completion.h).
#pragma once
#include <napi.h>

namespace ucm {

// Engine (engine_wrap.h).
void RegisterEngine(Napi::Env env, Napi::Object exports);
// usageAdd, evict (capacity_binding.cc).
void RegisterCapacity(Napi::Env env, Napi::Object exports);
// makeDirs, createFile, removeFiles: the store's directories (store_binding.cc).
void RegisterStore(Napi::Env env, Napi::Object exports);
// crc32c, cudaStatus, connection guard, fd limit, CPU affinity, file modes (system_binding.cc).
void RegisterSystem(Napi::Env env, Napi::Object exports);
// constants: the block file format, the block status names, whether CUDA is built in.
void RegisterConstants(Napi::Env env, Napi::Object exports);

}  // namespace ucm
