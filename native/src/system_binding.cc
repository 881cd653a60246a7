// Small synchronous calls into the core that need no engine: checksums, the
// CUDA probe, the ipc socket's connection guard (peers.h) and credential
// socket (peer_tokens.h), process limits and file modes. Each only converts
// arguments and results; none blocks for long.
#include "bindings.h"
#include "convert.h"
#include "crc32c.h"
#include "cuda_backend.h"
#include "file_modes.h"
#include "peer_tokens.h"
#include "peers.h"
#include "tcp_peers.h"

namespace ucm {

namespace {

Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) throw ArgTypeError(env, "crc32c(data: Uint8Array)");
  auto arr = info[0].As<Napi::TypedArray>();
  const uint8_t* p = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  return Napi::Number::New(env, Crc32c(0, p, arr.ByteLength()));
}

// connectedPeers(socketPath) -> [{fd, inode, pid, uid}]: accepted connections to our ipc socket, from the kernel.
Napi::Value ConnectedPeersJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw ArgTypeError(env, "connectedPeers(socketPath: string)");
  const auto peers = ConnectedPeers(info[0].As<Napi::String>().Utf8Value());
  auto out = Napi::Array::New(env, peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    auto o = Napi::Object::New(env);
    o.Set("fd", peers[i].fd);
    o.Set("inode", static_cast<double>(peers[i].inode));
    o.Set("pid", static_cast<double>(peers[i].pid));
    o.Set("uid", static_cast<double>(peers[i].uid));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

// endConnection(socketPath, fd, inode) -> boolean
Napi::Value EndConnectionJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber())
    throw ArgTypeError(env, "endConnection(socketPath: string, fd: number, inode: number)");
  return Napi::Boolean::New(
      env, EndConnection(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
                         static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue())));
}

// listenerPause(socketPath, pauseAt, resumeAt): starts the guard of peers.h (StartListenerPause).
Napi::Value ListenerPauseJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber())
    throw ArgTypeError(env, "listenerPause(socketPath: string, pauseAt: number, resumeAt: number)");
  StartListenerPause(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
                     info[2].As<Napi::Number>().Int32Value());
  return env.Undefined();
}

// listenerPauseStop(): stops it, the socket's name put back.
Napi::Value ListenerPauseStopJs(const Napi::CallbackInfo& info) {
  StopListenerPause();
  return info.Env().Undefined();
}

// listenerPauseState() -> {running, paused, pauses, hiddenPath, error}
Napi::Value ListenerPauseStateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ListenerPauseState st = GetListenerPause();
  auto out = Napi::Object::New(env);
  out.Set("running", st.running);
  out.Set("paused", st.paused);
  out.Set("pauses", static_cast<double>(st.pauses));
  out.Set("hiddenPath", st.hidden_path);
  out.Set("error", st.error);
  return out;
}

// tcpPeers(port, owners) -> [{fd, inode, uid}]: accepted tcp connections, uid -1 when unknown (tcp_peers.h).
Napi::Value TcpPeersJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsBoolean())
    throw ArgTypeError(env, "tcpPeers(port: number, owners: boolean)");
  const auto peers = TcpPeers(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Boolean>().Value());
  auto out = Napi::Array::New(env, peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    auto o = Napi::Object::New(env);
    o.Set("fd", peers[i].fd);
    o.Set("inode", static_cast<double>(peers[i].inode));
    o.Set("uid", peers[i].uid_known ? static_cast<double>(peers[i].uid) : -1.0);
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

// endTcpConnection(port, fd, inode) -> boolean
Napi::Value EndTcpConnectionJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber())
    throw ArgTypeError(env, "endTcpConnection(port: number, fd: number, inode: number)");
  return Napi::Boolean::New(
      env, EndTcpConnection(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value(),
                            static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue())));
}

// credentialListen(path, mode) -> "" or what failed: starts the credential socket (peer_tokens.h).
Napi::Value CredentialListenJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber())
    throw ArgTypeError(env, "credentialListen(path: string, mode: number)");
  return Napi::String::New(
      env, StartCredentialListener(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value()));
}

// credentialStop(): stops it and removes the socket.
Napi::Value CredentialStopJs(const Napi::CallbackInfo& info) {
  StopCredentialListener();
  return info.Env().Undefined();
}

// redeemToken(hex) -> {pid, uid, gid} or null: who the token was given to (once).
Napi::Value RedeemTokenJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw ArgTypeError(env, "redeemToken(token: string)");
  ProvenPeer p;
  if (!RedeemToken(info[0].As<Napi::String>().Utf8Value(), &p)) return env.Null();
  auto out = Napi::Object::New(env);
  out.Set("pid", static_cast<double>(p.pid));
  out.Set("uid", static_cast<double>(p.uid));
  out.Set("gid", static_cast<double>(p.gid));
  return out;
}

// setShareWithGroup(share): modes of files and directories the engine makes (see file_modes.h).
Napi::Value SetShareWithGroupJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw ArgTypeError(env, "setShareWithGroup(share: boolean)");
  SetShareWithGroup(info[0].As<Napi::Boolean>().Value());
  return env.Undefined();
}

// A pair of counts as {first: a, second: b}.
Napi::Value PairJs(Napi::Env env, const char* first, double a, const char* second, double b) {
  auto out = Napi::Object::New(env);
  out.Set(first, a);
  out.Set(second, b);
  return out;
}

// widenCpuAffinity() -> {before, after}: CPUs this thread may run on (see peers.h).
Napi::Value WidenCpuAffinityJs(const Napi::CallbackInfo& info) {
  const auto r = WidenCpuAffinity();
  return PairJs(info.Env(), "before", r.first, "after", r.second);
}

// raiseFdLimit() -> {soft, hard}
Napi::Value RaiseFdLimitJs(const Napi::CallbackInfo& info) {
  const auto lim = RaiseFdLimit();
  return PairJs(info.Env(), "soft", static_cast<double>(lim.first), "hard", static_cast<double>(lim.second));
}

// cudaStatus() -> {built, emulated, usable, batchCopies, devices, runtimeVersion, driverVersion, why}
Napi::Value CudaStatusJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CudaStatus& st = CudaProbe();
  auto out = Napi::Object::New(env);
  out.Set("built", st.built);
  out.Set("emulated", st.emulated);
  out.Set("usable", st.usable);
  out.Set("batchCopies", st.batch_copies);
  out.Set("devices", st.devices);
  out.Set("runtimeVersion", st.runtime_version);
  out.Set("driverVersion", st.driver_version);
  out.Set("why", st.why);
  return out;
}

}  // namespace

void RegisterSystem(Napi::Env env, Napi::Object exports) {
  const struct {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  } fns[] = {{"crc32c", Crc32cJs},
             {"cudaStatus", CudaStatusJs},
             {"connectedPeers", ConnectedPeersJs},
             {"endConnection", EndConnectionJs},
             {"raiseFdLimit", RaiseFdLimitJs},
             {"widenCpuAffinity", WidenCpuAffinityJs},
             {"listenerPause", ListenerPauseJs},
             {"listenerPauseStop", ListenerPauseStopJs},
             {"listenerPauseState", ListenerPauseStateJs},
             {"tcpPeers", TcpPeersJs},
             {"endTcpConnection", EndTcpConnectionJs},
             {"credentialListen", CredentialListenJs},
             {"credentialStop", CredentialStopJs},
             {"redeemToken", RedeemTokenJs},
             {"setShareWithGroup", SetShareWithGroupJs}};
  for (const auto& f : fns) exports.Set(f.name, Napi::Function::New(env, f.fn, f.name));
}

}  // namespace ucm
