// On-disk format of one KV block and the I/O that writes and reads it.
//
//   [0, 4096)            header (BlockHeader, zero padded)
//   [4096, 4096 + N)     payload: the block's shards, concatenated in order
//   up to a 4096 multiple zero padding, so O_DIRECT can write the file whole
//
// A file is written under a temporary name and renamed into place on commit,
// so a reader never sees a partial block. Reading verifies everything the
// header claims (magic, version, header checksum, payload length, layout
// digest, file size, payload CRC32C) before the bytes count as a block.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "store_dirs.h"

namespace ucm {

class IoGate;

constexpr size_t kBlockAlign = 4096;
constexpr size_t kHeaderSize = 4096;
constexpr uint32_t kFormatVersion = 1;
constexpr char kBlockMagic[8] = {'U', 'C', 'M', 'K', 'V', 'B', 'L', 'K'};

#pragma pack(push, 1)
struct BlockHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_size;
  uint64_t payload_length;
  uint64_t layout_digest;
  uint32_t checksum_kind;  // 1 = CRC32C
  uint32_t payload_crc;
  uint32_t shard_count;
  uint32_t reserved;
  uint32_t header_crc;  // CRC32C of every byte above
};
#pragma pack(pop)

inline size_t AlignUp(size_t n) { return (n + kBlockAlign - 1) / kBlockAlign * kBlockAlign; }
inline size_t FileSizeFor(size_t payload) { return kHeaderSize + AlignUp(payload); }

enum class BlockStatus : int32_t {
  kOk = 0,
  kNotFound = 1,  // no such file, or (NFS) deleted or replaced by another client: ESTALE
  kCorrupt = 2,
  kIoError = 3,
  kCancelled = 4,
  kSkipped = 5,   // dump: already stored, nothing written
  kMismatch = 6,  // load: an intact file that does not match the request (size, layout, shards)
  kDropped = 7,   // dump: shed by write admission (queued too long), nothing written
};

// BlockStatus names in enum order. The addon exports them (constants.blockStatus)
// and core/native.ts refuses to load an addon whose names differ from its own.
constexpr const char* kBlockStatusNames[] = {"ok",        "not_found", "corrupt",  "io_error",
                                             "cancelled", "skipped",   "mismatch", "dropped"};
static_assert(sizeof(kBlockStatusNames) / sizeof(kBlockStatusNames[0]) ==
                  static_cast<size_t>(BlockStatus::kDropped) + 1,
              "a name for every BlockStatus");

struct IoOptions {
  bool odirect = true;  // try O_DIRECT, fall back when the filesystem refuses it
  bool fsync = false;   // fdatasync every block before it counts as written
  bool touch = true;    // a verified read refreshes the file's mtime (its LRU age)
  StoreRoots roots;     // where block files live; below them no link is followed (store_dirs.h)
};

struct IoResult {
  IoResult() = default;
  IoResult(BlockStatus s, int e, const char* w) : status(s), err(e), what(w) {}
  BlockStatus status = BlockStatus::kOk;
  int err = 0;            // errno for kIoError
  const char* what = "";  // which check failed (corrupt) or which call (io)
  std::string detail;     // a message built at run time (device errors); preferred over `what`
};

// Every path below is reached as store_dirs.h says: a directory on the way
// that is a symbolic link fails the call (kIoError, ELOOP or ENOTDIR).

// Writes a block whose payload already sits at staging + kHeaderSize. Fills the
// header in staging[0, kHeaderSize) and zeroes the tail padding, so `staging`
// must hold FileSizeFor(payload_length) bytes and be kBlockAlign aligned.
// Creates `path` exclusively (O_EXCL): the temporary name is ours alone.
// Holds a pass of `gate` (may be null) from the first byte written to the close.
IoResult WriteBlockFile(const std::string& path, uint8_t* staging, uint64_t payload_length, uint64_t layout_digest,
                        uint32_t shard_count, const IoOptions& opts, IoGate* gate);

// Reads `path` into staging and verifies it against what the caller expects.
// The file is opened without blocking and must be a regular file: anything
// else there (a FIFO, a device) is a miss (kNotFound), never waited on.
// kCorrupt means the file itself is damaged; kMismatch that it is intact but
// not what this request describes (so it must not be deleted on its account).
// On kOk the payload is at staging + kHeaderSize. `staging` must hold
// FileSizeFor(expected_payload) bytes and be kBlockAlign aligned. Holds a
// pass of `gate` (may be null) for the read only, not for the checks.
IoResult ReadBlockFile(const std::string& path, uint8_t* staging, uint64_t expected_payload, uint64_t layout_digest,
                       uint32_t shard_count, const IoOptions& opts, IoGate* gate);

// Metadata of block files, run on the engine's metadata and lookup threads.
// 1 when `path` is a regular file of at least the header size, else 0.
uint8_t BlockExists(const StoreRoots& roots, const std::string& path);
// Renames `from` to `to`; 0 or errno.
int CommitFile(const StoreRoots& roots, const std::string& from, const std::string& to);
// Unlinks `path` (never what a link there points to); 0, or errno (a file
// or directory already gone counts as done: 0).
int RemoveFile(const StoreRoots& roots, const std::string& path);

}  // namespace ucm
