// DiskStore::Impl, shared by the files of the disk store: disk_store_open.cc (checks, sizing,
// recovery scan) and disk_store.cc (slot table, LRU, the write / read / erase paths).
// Private to csrc/storage; the API is storage/disk_store.h.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "storage/disk_store.h"

namespace kvtier {
namespace disk_internal {

constexpr uint32_t kNoSlot = UINT32_MAX;

// 4 KiB-aligned heap memory for O_DIRECT buffers.
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<unsigned char, AlignedFree>;
inline AlignedBuffer AllocAligned(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kDiskBlockBytes, bytes) != 0) return nullptr;
  std::memset(p, 0, bytes);
  return AlignedBuffer(static_cast<unsigned char*>(p));
}

inline bool IsBlockAligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kDiskBlockBytes == 0;
}

}  // namespace disk_internal

class DiskStore::Impl {
 public:
  enum class SlotState : uint8_t {
    kFree,
    kWriting,
    kReady,
    kErasing,      // tombstone write in flight
    kQuarantined,  // a write abandoned at its deadline: the OS may still write into it
  };

  struct Slot {
    ChunkKey key;
    uint64_t sequence = 0;
    uint32_t payload_crc = 0;
    uint32_t readers = 0;
    uint32_t lru_prev = disk_internal::kNoSlot;  // towards least recent
    uint32_t lru_next = disk_internal::kNoSlot;  // towards most recent
    SlotState state = SlotState::kFree;
    bool doomed = false;  // failed a read check: freed when its last reader leaves
  };

  // One request of the store (a write, a read or an erase) with its header / bounce block.
  struct Op final : IoCompletion {
    enum class Kind : uint8_t { kWrite, kRead, kErase };
    Impl* store = nullptr;
    Kind kind = Kind::kRead;
    uint32_t slot = disk_internal::kNoSlot;
    ChunkKey key;
    uint64_t sequence = 0;
    uint32_t payload_crc = 0;
    unsigned char* user_buf = nullptr;
    Callback done;
    bool abandoned = false;      // DeadlineExceeded delivered; the OS may still hold it
    bool user_answered = false;  // `done` was called (or is being called)
    disk_internal::AlignedBuffer
        block;  // [0, 4 KiB) slot header, [4 KiB, 8 KiB) bounce for a partial last block
    IoRequest req;

    void OnIoDone(const Status& status) override { store->OnDone(this, status); }
    void OnIoReleased() override { store->OnReleased(this); }
  };

  Impl() = default;
  ~Impl();

  Status OpenFile();
  Status Recover(uint64_t scan_slots);
  void InitFreeSlots();

  // known_crc: the blob's CRC32C when the caller has it (else computed here).
  Status Write(const ChunkKey& key, const void* src, const uint32_t* known_crc, Callback done);
  Status ReadBatch(const ChunkKey* keys, void* const* dsts, size_t n, BatchCallback done);
  size_t Lookup(const ChunkKey* keys, size_t n) const;
  Status Erase(const ChunkKey& key);
  Status Flush(int64_t timeout_ms);
  DiskStoreStats Stats() const;
  void SetVisibilityObserver(VisibilityObserver observer, void* ctx);

  void OnDone(Op* op, const Status& status);
  void OnReleased(Op* op);

  // Fixed after Open.
  DiskStoreOptions opts;
  std::string path;
  int fd = -1;
  bool direct_io = true;
  bool preallocated = true;
  std::string fs_type;
  uint64_t slot_bytes = 0;
  uint64_t head_bytes = 0;  // blob bytes in whole blocks, moved straight from / to the caller
  uint64_t tail_bytes = 0;  // the rest, moved through the op's bounce block
  uint64_t epoch = 0;
  size_t num_slots = 0;
  std::unique_ptr<IoBackend> backend;
  std::string backend_fallback_reason;
  bool reformatted = false;
  std::string reformat_reason;
  bool file_is_new = false;
  uint64_t scan_slots = 0;  // slots the file header vouches for (scanned at Open)
  double open_seconds = 0;

 private:
  bool ReadyLocked(const ChunkKey& key) const REQUIRES_LOCK(mu_);
  uint32_t TakeSlotLocked() REQUIRES_LOCK(mu_);
  void FreeSlotLocked(uint32_t slot) REQUIRES_LOCK(mu_);
  void LruRemoveLocked(uint32_t slot) REQUIRES_LOCK(mu_);
  void LruPushMruLocked(uint32_t slot) REQUIRES_LOCK(mu_);
  void DoomLocked(uint32_t slot) REQUIRES_LOCK(mu_);
  void DropReaderLocked(uint32_t slot) REQUIRES_LOCK(mu_);
  void NotifyLocked(const ChunkKey& key, bool visible) REQUIRES_LOCK(mu_) {
    if (observer_ != nullptr) observer_(observer_ctx_, key, visible);
  }
  Op* NewOpLocked() REQUIRES_LOCK(mu_);
  Status VerifyRead(Op* op) const;
  void SetRequest(Op* op, IoOp io, uint64_t offset, int64_t now);

  mutable Mutex mu_;
  CondVar idle_cv_;
  std::vector<Slot> slots_ GUARDED_BY(mu_);
  std::unordered_map<ChunkKey, uint32_t, ChunkKeyHash> index_ GUARDED_BY(mu_);  // WRITING and READY
  std::vector<uint32_t> free_slots_ GUARDED_BY(mu_);  // popped from the back: lowest slot first
  uint32_t lru_head_ GUARDED_BY(mu_) = disk_internal::kNoSlot;  // least recently used READY slot
  uint32_t lru_tail_ GUARDED_BY(mu_) = disk_internal::kNoSlot;  // most recently used
  uint64_t next_sequence_ GUARDED_BY(mu_) = 1;
  std::vector<Op*> free_ops_ GUARDED_BY(mu_);
  std::unordered_set<Op*> live_ops_ GUARDED_BY(mu_);
  size_t in_flight_ GUARDED_BY(mu_) = 0;
  size_t abandoned_ GUARDED_BY(mu_) = 0;
  bool closing_ GUARDED_BY(mu_) = false;
  bool nospace_ GUARDED_BY(mu_) = false;
  int64_t nospace_probe_at_ns_ GUARDED_BY(mu_) = 0;
  DiskStoreStats counters_ GUARDED_BY(mu_);  // the counting fields only
  VisibilityObserver observer_ GUARDED_BY(mu_) = nullptr;
  void* observer_ctx_ GUARDED_BY(mu_) = nullptr;

  friend class DiskStore;
};

}  // namespace kvtier
