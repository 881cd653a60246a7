// See convert.h.
#include "convert.h"

#include <cerrno>
#include <cmath>
#include <cstring>

namespace ucm {

namespace {

template <typename E>
E WithCode(E e, const char* code) {
  e.Set("code", Napi::String::New(e.Env(), code));
  return e;
}

// The errno's symbolic name (glibc 2.32 has strerrorname_np); "E<number>" where unknown.
std::string ErrnoName(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  if (const char* name = strerrorname_np(err)) return name;
#endif
  return "E" + std::to_string(err);
}

}  // namespace

Napi::Error CodedError(Napi::Env env, const char* code, const std::string& message) {
  return WithCode(Napi::Error::New(env, message), code);
}

Napi::Error CodedRangeError(Napi::Env env, const char* code, const std::string& message) {
  return WithCode<Napi::Error>(Napi::RangeError::New(env, message), code);
}

Napi::Error ArgTypeError(Napi::Env env, const std::string& message) {
  return WithCode<Napi::Error>(Napi::TypeError::New(env, message), "invalid_argument");
}

Napi::Error ArgRangeError(Napi::Env env, const std::string& message) {
  return CodedRangeError(env, "invalid_argument", message);
}

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& message) {
  const std::string name = ErrnoName(err);
  auto e = CodedError(env, name.c_str(), message + ": " + std::strerror(err));
  e.Set("errno", Napi::Number::New(env, err));
  return e;
}

std::vector<std::string> StringArray(const Napi::Value& v, const char* field) {
  if (!v.IsArray()) throw ArgTypeError(v.Env(), std::string(field) + " must be an array of strings");
  auto arr = v.As<Napi::Array>();
  std::vector<std::string> out;
  out.reserve(arr.Length());
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value e = arr.Get(i);
    const std::string at = std::string(field) + "[" + std::to_string(i) + "]";
    if (!e.IsString()) throw ArgTypeError(v.Env(), at + " must be a string");
    std::string s = e.As<Napi::String>().Utf8Value();
    if (s.empty() || s.find('\0') != std::string::npos) throw ArgTypeError(v.Env(), at + " must be a non-empty path");
    out.push_back(std::move(s));
  }
  return out;
}

uint64_t SafeUint(Napi::Env env, double d, const std::string& what) {
  if (!(d >= 0) || d > kMaxSafeInt || std::floor(d) != d)
    throw ArgRangeError(env, what + " must be a non-negative integer, got " + std::to_string(d));
  return static_cast<uint64_t>(d);
}

int64_t SafeInt(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsNumber()) throw ArgTypeError(env, what + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(std::fabs(d) <= kMaxSafeInt) || std::floor(d) != d)
    throw ArgRangeError(env, what + " must be an integer, got " + std::to_string(d));
  return static_cast<int64_t>(d);
}

std::string Bytes(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw ArgTypeError(v.Env(), std::string(what) + " must be a Uint8Array");
  auto a = v.As<Napi::Uint8Array>();
  return std::string(reinterpret_cast<const char*>(a.Data()), a.ByteLength());
}

std::string OptionalBusId(const Napi::CallbackInfo& info, size_t i) {
  if (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull()) return "";
  if (!info[i].IsString()) throw ArgTypeError(info.Env(), "pciBusId must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

}  // namespace ucm
