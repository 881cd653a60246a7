// JS <-> C++ conversions of the Node-API binding, on the JS thread only.
//
// Every argument is checked here before any native work starts, and every
// error the binding throws or rejects with is made here, so each one names
// the field and the value and carries a stable `code` property that core/
// matches on instead of message text (the messages are for people and may
// change). The codes:
//   invalid_argument  an argument of the wrong type or out of its range
//   unknown_region    a shard names a region id this engine does not hold
//   unknown_event     waitEvent names an event id this engine does not hold
//   out_of_bounds     a shard lies outside its region
//   too_large         a block's payload is above maxBlockBytes
//   cancel_id_in_use  a transfer names a cancelId another one still holds
//   closed            the engine was closed
//   region_refused    a host region could not be opened (see region.h)
//   cuda_refused      a device region or event could not be opened
//   E...              an errno name (ENOSPC, EIO, ETIMEDOUT, ...); `errno` holds the number
#pragma once
#include <napi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ucm {

constexpr double kMaxSafeInt = 9007199254740991.0;  // 2^53 - 1

// Errors with a `code` (the list above).
Napi::Error CodedError(Napi::Env env, const char* code, const std::string& message);
Napi::Error CodedRangeError(Napi::Env env, const char* code, const std::string& message);
// A TypeError or RangeError with code invalid_argument.
Napi::Error ArgTypeError(Napi::Env env, const std::string& message);
Napi::Error ArgRangeError(Napi::Env env, const std::string& message);
// `message: strerror(err)` with code = the errno's name and errno = err.
Napi::Error ErrnoError(Napi::Env env, int err, const std::string& message);

// A non-empty path per element, no NUL bytes.
std::vector<std::string> StringArray(const Napi::Value& v, const char* field);
// An integer in [0, 2^53).
uint64_t SafeUint(Napi::Env env, double d, const std::string& what);
// A number that is an integer in (-2^53, 2^53).
int64_t SafeInt(Napi::Env env, const Napi::Value& v, const std::string& what);
// A Uint8Array's bytes, copied.
std::string Bytes(const Napi::Value& v, const char* what);
// Optional PCI bus id argument i: "" when absent, undefined or null.
std::string OptionalBusId(const Napi::CallbackInfo& info, size_t i);

// spec[field] as the typed array T of element type `type`.
template <typename T>
T TypedArrayOf(const Napi::Object& spec, const char* field, napi_typedarray_type type, const char* type_name) {
  Napi::Value v = spec.Get(field);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw ArgTypeError(spec.Env(), std::string(field) + " must be a " + type_name);
  return v.As<T>();
}

}  // namespace ucm
