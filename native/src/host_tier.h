// The Cache stage of UCM's "Cache|Posix" pipeline: host memory inside the
// engine, in front of the storage directories, shared by every client.
//
// An entry is a block's file image (header and payload, as block_file.h
// lays it out), so the buffer a load reads a file into or a dump gathers a
// block into is the entry itself: a block enters the tier without a copy.
// Entries are keyed by the block's final path, which names its namespace,
// key and storage directory.
//
// Only committed blocks are served. A dumped block waits under its
// temporary path until the commit that renames its file moves it under the
// final path (Commit); a discarded dump's entry goes with its file
// (Forget). A loaded block enters once its file verified. So the tier never
// holds bytes the directory would not have served.
//
// Capacity counts every buffer the tier has made, whoever holds it:
// committed and pending entries, buffers lent to a transfer (Reserve), and
// free buffers kept for reuse (a model's blocks are all one size, so an
// evicted block's buffer takes the next one without new page faults). When
// a new buffer does not fit, the least recently used committed entries are
// evicted; pending ones never are. When nothing can be evicted, Reserve
// says no and the transfer goes on without the tier, unless the room is the
// buffer the filling thread (below) is making at that moment: then Reserve
// waits for it (one allocation and fault-in). It once said no there, and a
// block the tier had room for went around it (CI, host_tier.test.ts).
//
// Once the tier knows a block size (a client's word, Prepare, or the first
// Reserve), a thread of its own prepares the rest of its capacity in buffers of that size, made and
// faulted in ahead of the transfers, as UCM, LMCache and vLLM allocate their
// host tiers at start: a fresh page is zeroed by the kernel at its first
// touch, and a transfer doing that for every block ran dumps at 12-18 % of a
// copy into memory already there (bench/write_behind_bench.py) and cold loads
// 10-15 % slower (bench/tier_cold_bench.py). It stops short of taking the
// host's available memory below an eighth of the total (or 1 GiB): past that,
// buffers are made as blocks arrive. Once the tier is full, evicted buffers
// are reused and the thread has nothing to do.
//
// Write-behind (when the engine runs with it): a dumped block is answered
// once its bytes are in a tier buffer; its file is written later, by the
// transfer workers when no load or dump waits (TakeWrite, WriteDone). Until
// then it is "unwritten": a commit that comes first marks it committed here
// at once (served, found by lookups) and the worker renames the file once
// written; a removal drops its write. An unwritten committed block that the
// LRU evicts before a worker took it is shed: never written, counted. The
// file is always written whole under its temporary name and renamed after,
// so a crash leaves no partial file under a block's name.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace ucm {

struct TierWrite;

// A page-aligned buffer holding one block's file image.
struct TierBlock {
  TierBlock() = default;
  ~TierBlock();
  TierBlock(const TierBlock&) = delete;
  TierBlock& operator=(const TierBlock&) = delete;
  uint8_t* data = nullptr;
  uint64_t capacity = 0;  // bytes allocated at data
  // What the image holds, checked against a load's request before it is served.
  uint64_t payload_bytes = 0;
  uint64_t layout_digest = 0;
  uint32_t shard_count = 0;
  // Its write while its file is not written yet (write-behind); the tier's lock guards it.
  TierWrite* unwritten = nullptr;
  // Page-locked for the GPU (HostTier::Pin, once: the first GPU transfer
  // that uses the buffer), so blocks move between it and GPU memory in one
  // DMA; it stays locked while the tier reuses it and is unlocked when freed.
  mutable std::once_flag pin_once;
  mutable bool pinned = false;
};

struct TierStats {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;  // every buffer made, held or free
  uint64_t blocks = 0;      // committed entries
  uint64_t block_bytes = 0;
  uint64_t pending = 0;  // dumped, waiting for their commit
  uint64_t hits = 0;
  uint64_t hit_bytes = 0;
  uint64_t misses = 0;
  uint64_t inserted = 0;  // entries added (committed dumps and verified loads)
  uint64_t evicted = 0;
  uint64_t refused = 0;  // Reserve found no room: the block went without the tier
  // Write-behind (all zero without it).
  uint64_t unwritten = 0;  // blocks answered, their files not written yet
  uint64_t unwritten_bytes = 0;
  uint64_t written = 0;       // files written behind
  uint64_t write_failed = 0;  // writes (or renames) that failed: the block stays in memory only
  uint64_t shed = 0;          // evicted before they were written: never written
  uint64_t lag_ms = 0;        // age of the oldest block waiting for its write
  // GPU transfers (all zero without a GPU client).
  uint64_t pinned = 0;        // buffers page-locked since the engine started
  uint64_t pinned_bytes = 0;  // their bytes
  uint64_t abandoned = 0;     // buffers given up after a GPU copy that did not finish
};

// A dumped block whose file is still to be written (write-behind).
struct TierWrite {
  std::string temp;   // the file the block is written to
  std::string final;  // set by a commit that came first: renamed there once written
  std::shared_ptr<TierBlock> block;
  uint64_t queued_ns = 0;
  bool writing = false;    // a worker took it
  bool dropped = false;    // removed or shed while queued: skipped
  bool discarded = false;  // removed while being written: the file goes once written
};

// What a worker does with a file it wrote behind (WriteDone).
enum class AfterWrite { kKeep, kRename, kRemove };

class HostTier {
 public:
  // `capacity_bytes` 0: no tier (and no filling thread).
  explicit HostTier(uint64_t capacity_bytes);
  ~HostTier();  // stops the filling thread
  HostTier(const HostTier&) = delete;
  HostTier& operator=(const HostTier&) = delete;

  bool enabled() const { return capacity_ > 0; }

  // A buffer of at least `file_bytes` that no one else holds, or null when
  // the tier is off or cannot make room. Give it back with Insert,
  // AddPending or Return.
  std::shared_ptr<TierBlock> Reserve(uint64_t file_bytes);
  // A reserved buffer not used after all.
  void Return(std::shared_ptr<TierBlock> b);

  // The committed block at `path` when it holds what the request asks for
  // (payload length, layout digest, shard count); a hit becomes the most
  // recently used. The entry stays valid while the caller holds it, evicted
  // or not.
  std::shared_ptr<const TierBlock> Find(const std::string& path, uint64_t payload_bytes, uint64_t layout_digest,
                                        uint32_t shard_count);
  // Whether a committed block is held at `path` (lookups; counts nothing).
  bool Contains(const std::string& path);

  // ---- GPU transfers ----
  // Page-locks `b` for the GPU unless it is already (PinHostMemory; the
  // calling thread's device must be current). False when that failed: the
  // block goes through pinned staging instead, as without the tier.
  bool Pin(const TierBlock& b);
  // A GPU copy to or from `b` did not finish and may still touch it: the
  // buffer leaves the tier for good, never served, reused or freed. `path`:
  // where the tier holds it (a load's block), or empty for a buffer still
  // reserved (a dump's).
  void Abandon(const std::string& path, std::shared_ptr<const TierBlock> b);

  // A block whose file verified at `path`.
  void Insert(const std::string& path, std::shared_ptr<TierBlock> b);
  // A dumped block written to the temporary file `temp`: served only after Commit.
  void AddPending(const std::string& temp, std::shared_ptr<TierBlock> b);
  // The file `temp` was renamed to `final`: its block, if held, is served from now on.
  void Commit(const std::string& temp, const std::string& final);
  // The file at `path` (temporary or final) was removed: so is its entry.
  // A block at `path` not written yet is not written any more.
  void Forget(const std::string& path);

  // ---- write-behind ----
  // A dumped block whose file is still to be written to `temp`: held as a
  // pending entry (served once committed) and queued for its write.
  void AddUnwritten(const std::string& temp, std::shared_ptr<TierBlock> b);
  // A commit of `temp` to `final` while its file is not written yet: the
  // block is served under `final` from now on and renamed there once
  // written (true). False: not an unwritten block (rename it as usual).
  bool CommitUnwritten(const std::string& temp, const std::string& final);
  // Whether a write waits for a worker.
  bool HasWrite();
  // The oldest write waiting, marked as taken, and its block (the worker's
  // own reference); null when none.
  std::shared_ptr<TierWrite> TakeWrite(std::shared_ptr<TierBlock>* block);
  // The worker's write of `w` ended (`ok`): what it does with the file now.
  // kRename: to w->final (committed meanwhile); kRemove: discarded meanwhile.
  AfterWrite WriteDone(const std::shared_ptr<TierWrite>& w, bool ok);
  // A rename after a write failed: the block is only in memory.
  void RenameFailed();
  // Waits until no block is unwritten, or `timeout_ms` passed; returns how
  // many still are.
  uint64_t WaitWritten(uint32_t timeout_ms);
  // Blocks of `file_bytes` are coming: when no block size is known yet, the
  // filling thread prepares the capacity for that size now (a size already
  // seen in a Reserve is kept: it is what the transfers ask for). False when
  // it does nothing (no tier, or a size known already).
  bool Prepare(uint64_t file_bytes);

  TierStats stats();

 private:
  struct Entry {
    std::shared_ptr<TierBlock> block;
    std::list<std::string>::iterator lru;  // committed entries only
  };
  // Takes `b`'s bytes off the capacity, keeping its buffer for reuse when no
  // one else holds it. Caller holds mu_.
  void Recycle(std::shared_ptr<TierBlock> b);
  void Drop(std::unordered_map<std::string, Entry>::iterator it);   // a committed entry; caller holds mu_
  void Put(const std::string& path, std::shared_ptr<TierBlock> b);  // caller holds mu_
  void FillLoop();
  // Takes `w` off the write-behind books; `shed` counts it as shed. Caller holds mu_.
  void Unqueue(const std::shared_ptr<TierWrite>& w, bool shed);

  const uint64_t capacity_;
  std::mutex mu_;
  uint64_t used_ = 0;
  std::unordered_map<std::string, Entry> committed_;
  std::list<std::string> lru_;  // front: most recently used
  std::unordered_map<std::string, std::shared_ptr<TierBlock>> pending_;
  std::vector<std::shared_ptr<TierBlock>> free_;
  std::vector<std::shared_ptr<const TierBlock>> abandoned_;  // kept until the process ends (Abandon)
  TierStats counts_;
  uint64_t last_need_ = 0;    // the size Reserve was last asked for (0: none yet)
  bool fill_paused_ = false;  // the host's memory ran low: filling waits for the next Reserve
  // The buffer the filling thread is making now (counted in used_, not yet in
  // free_): a Reserve that finds no room waits for it instead of refusing.
  uint64_t filling_ = 0;
  std::condition_variable filled_cv_;  // notified when that buffer is in free_ (or given up)
  bool stopping_ = false;
  // Write-behind: queued writes (oldest first; dropped ones skipped), and
  // every unwritten block by its temporary path and, once committed, its final one.
  std::deque<std::shared_ptr<TierWrite>> writes_;
  std::unordered_map<std::string, std::shared_ptr<TierWrite>> unwritten_;
  std::unordered_map<std::string, std::shared_ptr<TierWrite>> unwritten_final_;
  uint64_t unwritten_bytes_ = 0;
  std::condition_variable written_cv_;  // notified as unwritten blocks leave the books
  std::condition_variable fill_cv_;
  std::thread filler_;  // last: started once everything above exists
};

}  // namespace ucm
