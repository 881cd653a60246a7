// makeDirs(), createFile(), removeFiles(): the store's directories and small
// files from JS, through descriptors (store_dirs.h), never by path below a
// storage directory. Namespaces are made before an engine's first dump into
// them and temporary files are removed after the engine closed, so these
// belong to no Engine: they run on this module's own threads (a hung NFS
// server must not take libuv's pool, which Node's fs calls share) and come
// back through a CompletionChannel.
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "block_file.h"
#include "completion.h"
#include "convert.h"
#include "job_pool.h"
#include "store_dirs.h"

namespace ucm {

namespace {

// A namespace's 258 directories take four or five round trips each on NFS
// (mkdirat, openat, fstat, fchmod): eight threads make a new namespace's
// first dump wait about as long as libuv's four did with fewer calls each.
constexpr uint32_t kStoreThreads = 8;

struct StoreWork {
  explicit StoreWork(Napi::Env env) : pool(kStoreThreads), channel(env, "ucm-store-done", nullptr) {}
  JobPool pool;
  CompletionChannel channel;
};

// A job that fails as a whole rejects with `err` and `message`.
struct PendingStore : Pending {
  using Pending::Pending;
  int err = 0;
  std::string message;
  void Settle(Napi::Env env) override {
    if (err != 0)
      deferred.Reject(ErrnoError(env, err, message).Value());
    else
      Pending::Settle(env);
  }
};

struct PendingDirs final : PendingStore {
  using PendingStore::PendingStore;
  std::string root, parent;
  std::vector<std::string> names;
  std::vector<double> bytes;
  Napi::Value Result(Napi::Env env) override {
    auto out = Napi::Array::New(env, bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) out.Set(static_cast<uint32_t>(i), bytes[i]);
    return out;
  }
};

struct PendingFile final : PendingStore {
  using PendingStore::PendingStore;
  std::string root, parent, name, data;
  uint64_t bytes = 0;
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(bytes)); }
};

struct PendingRemove final : PendingStore {
  using PendingStore::PendingStore;
  StoreRoots roots;
  std::vector<std::string> paths;
  std::vector<int32_t> codes;
  Napi::Value Result(Napi::Env env) override {
    auto out = Napi::Int32Array::New(env, codes.size());
    for (size_t i = 0; i < codes.size(); ++i) out[i] = codes[i];
    return out;
  }
};

std::string Join(const std::string& root, const std::string& rel) { return rel.empty() ? root : root + "/" + rel; }

// A single path component: what a name inside one directory must be.
void CheckName(Napi::Env env, const std::string& name, const char* what) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    throw ArgRangeError(env, std::string(what) + ": " + name + " is not a single name");
}

std::string StringArg(const Napi::CallbackInfo& info, size_t i, const char* usage) {
  if (info.Length() <= i || !info[i].IsString()) throw ArgTypeError(info.Env(), usage);
  return info[i].As<Napi::String>().Utf8Value();
}

template <typename P>
Napi::Value Run(Napi::Env env, StoreWork* w, std::unique_ptr<P> p, void (*work)(P&)) {
  Napi::Promise promise = p->deferred.Promise();
  P* job = p.get();
  Pending* raw = w->channel.Track(env, std::move(p));
  CompletionChannel* channel = &w->channel;
  w->pool.Post([channel, job, raw, work] {
    try {
      work(*job);
    } catch (const std::exception& e) {
      job->thrown = std::string("store job failed: ") + e.what();
    }
    channel->Complete(raw);
  });
  return promise;
}

void MakeDirs(PendingDirs& d) {
  UniqueFd parent;
  const std::string where = Join(d.root, d.parent);
  d.err = OpenBelow(d.root, d.parent, &parent);
  if (d.err != 0) {
    d.message = NotRealDir(d.err) ? where + " is not a directory (a symbolic link?): refusing to use it" : where;
    return;
  }
  d.bytes.assign(d.names.size(), 0);
  for (size_t i = 0; i < d.names.size(); ++i) {
    const MadeDir m = MakeOwnDir(parent.get(), d.names[i].c_str(), true);
    const std::string dir = where + "/" + d.names[i];
    if (m.err == EPERM && m.uid != geteuid()) {
      d.err = m.err;
      d.message = dir + " belongs to uid " + std::to_string(m.uid) + ", not to the engine's user (" +
                  std::to_string(geteuid()) + "): refusing to use it";
      return;
    }
    if (m.err != 0) {
      d.err = m.err;
      d.message = NotRealDir(m.err) ? dir + " is not a directory (a symbolic link?): refusing to use it" : dir;
      return;
    }
    d.bytes[i] = static_cast<double>(m.bytes);
  }
}

// makeDirs(root, parent, names) -> Promise<number[]>: creates each
// root/parent/name (parent '/'-separated below root, "" for root itself)
// as MakeOwnDir does; per name the bytes it took when this call made it,
// 0 when it was there. Rejects naming the first directory refused.
Napi::Value MakeDirsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage = "makeDirs(root: string, parent: string, names: string[])";
  auto p = std::make_unique<PendingDirs>(env);
  p->root = StringArg(info, 0, usage);
  p->parent = StringArg(info, 1, usage);
  if (info.Length() < 3) throw ArgTypeError(env, usage);
  p->names = StringArray(info[2], "names");
  for (const std::string& n : p->names) CheckName(env, n, "names");
  return Run<PendingDirs>(env, static_cast<StoreWork*>(info.Data()), std::move(p), MakeDirs);
}

// createFile(root, parent, name, text) -> Promise<number>: a new file
// root/parent/name holding `text` (CreateOwnFile); the bytes it takes, 0
// when a file of that name was there (left as it was).
Napi::Value CreateFileJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* usage = "createFile(root: string, parent: string, name: string, text: string)";
  auto p = std::make_unique<PendingFile>(env);
  p->root = StringArg(info, 0, usage);
  p->parent = StringArg(info, 1, usage);
  p->name = StringArg(info, 2, usage);
  p->data = StringArg(info, 3, usage);
  CheckName(env, p->name, "name");
  return Run<PendingFile>(env, static_cast<StoreWork*>(info.Data()), std::move(p), [](PendingFile& f) {
    UniqueFd parent;
    const std::string where = Join(f.root, f.parent);
    f.err = OpenBelow(f.root, f.parent, &parent);
    if (f.err != 0) {
      f.message = NotRealDir(f.err) ? where + " is not a directory (a symbolic link?): refusing to use it" : where;
      return;
    }
    f.err = CreateOwnFile(parent.get(), f.name.c_str(), f.data, &f.bytes);
    if (f.err != 0) f.message = where + "/" + f.name;
  });
}

// removeFiles(roots, paths) -> Promise<Int32Array>: RemoveFile of each (0,
// also when already gone, or errno), for when no engine is open any more.
Napi::Value RemoveFilesJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2) throw ArgTypeError(env, "removeFiles(roots: string[], paths: string[])");
  auto p = std::make_unique<PendingRemove>(env);
  p->roots = StringArray(info[0], "roots");
  p->paths = StringArray(info[1], "paths");
  return Run<PendingRemove>(env, static_cast<StoreWork*>(info.Data()), std::move(p), [](PendingRemove& r) {
    r.codes.resize(r.paths.size());
    for (size_t i = 0; i < r.paths.size(); ++i) r.codes[i] = RemoveFile(r.roots, r.paths[i]);
  });
}

}  // namespace

void RegisterStore(Napi::Env env, Napi::Object exports) {
  auto* work = new StoreWork(env);
  // As capacity_binding.cc: running jobs finish, queued ones are dropped,
  // then the channel goes with the environment.
  env.AddCleanupHook([work] {
    work->pool.Stop();
    work->channel.Abort();
    delete work;
  });
  exports.Set("makeDirs", Napi::Function::New(env, MakeDirsJs, "makeDirs", work));
  exports.Set("createFile", Napi::Function::New(env, CreateFileJs, "createFile", work));
  exports.Set("removeFiles", Napi::Function::New(env, RemoveFilesJs, "removeFiles", work));
}

}  // namespace ucm
