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
// says no and the transfer goes on without the tier.
//
// While the tier is filling, a thread of its own keeps a few buffers of the
// size last asked for made and faulted in ahead of the transfers: a fresh
// page is zeroed by the kernel at its first touch, and a transfer thread
// doing that for every block it reads ran cold loads 10-15 % slower than
// with a reused staging buffer (bench/tier_cold_bench.py). Once the tier is
// full, evicted buffers are reused and the thread has nothing to do.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace ucm {

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
};

class HostTier {
 public:
  // `ahead`: buffers the filling thread keeps ready (0: none, no thread).
  HostTier(uint64_t capacity_bytes, uint32_t ahead);
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

  // A block whose file verified at `path`.
  void Insert(const std::string& path, std::shared_ptr<TierBlock> b);
  // A dumped block written to the temporary file `temp`: served only after Commit.
  void AddPending(const std::string& temp, std::shared_ptr<TierBlock> b);
  // The file `temp` was renamed to `final`: its block, if held, is served from now on.
  void Commit(const std::string& temp, const std::string& final);
  // The file at `path` (temporary or final) was removed: so is its entry.
  void Forget(const std::string& path);

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
  // Kept buffers that fit `need` (about that size). Caller holds mu_.
  uint32_t FreeFitting(uint64_t need) const;
  void FillLoop();

  const uint64_t capacity_;
  std::mutex mu_;
  uint64_t used_ = 0;
  std::unordered_map<std::string, Entry> committed_;
  std::list<std::string> lru_;  // front: most recently used
  std::unordered_map<std::string, std::shared_ptr<TierBlock>> pending_;
  std::vector<std::shared_ptr<TierBlock>> free_;
  TierStats counts_;
  const uint32_t ahead_;
  uint64_t last_need_ = 0;  // the size Reserve was last asked for (0: none yet)
  bool stopping_ = false;
  std::condition_variable fill_cv_;
  std::thread filler_;  // last: started once everything above exists
};

}  // namespace ucm
