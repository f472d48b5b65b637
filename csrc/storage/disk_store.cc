// DiskStore: slot table, key index and LRU over one cache file, and the write / read / erase paths
// on top of an IoBackend (opening and recovery: disk_store_open.cc).
#include "storage/disk_store.h"

#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "storage/crc32c.h"
#include "storage/disk_store_impl.h"

namespace kvtier {
namespace {

using disk_internal::AllocAligned;
using disk_internal::IsBlockAligned;
using disk_internal::kNoSlot;

}  // namespace

DiskStore::Impl::~Impl() {
  std::vector<Op*> unanswered;
  if (backend) {
    {
      MutexLock lk(&mu_);
      closing_ = true;
    }
    Status flushed = Flush(opts.close_timeout_ms);
    // After Shutdown no callback runs any more; requests the OS still holds are forgotten.
    (void)backend->Shutdown(MonotonicNowNs() +
                            (flushed.ok() ? opts.close_timeout_ms * 1'000'000 : 0));
    MutexLock lk(&mu_);
    for (Op* op : live_ops_) {
      if (!op->user_answered) unanswered.push_back(op);
    }
  }
  for (Op* op : unanswered) {
    op->user_answered = true;
    if (op->done)
      op->done(
          Status::Unavailable("the DiskStore closed with this request unfinished by the device"));
  }
  backend.reset();
  MutexLock lk(&mu_);
  for (Op* op : free_ops_) delete op;
  // live_ops_ are leaked on purpose: the device may still DMA into their blocks.
  if (fd >= 0) {
    // Unlock explicitly: a kernel object (an io_uring being torn down) may hold the file a while
    // longer, and the next Open must not find it locked.
    (void)flock(fd, LOCK_UN);
    close(fd);
  }
}

// ---- slot table, LRU --------------------------------------------------------------------------

bool DiskStore::Impl::ReadyLocked(const ChunkKey& key) const {
  auto it = index_.find(key);
  if (it == index_.end()) return false;
  const Slot& s = slots_[it->second];
  return s.state == SlotState::kReady && !s.doomed;
}

void DiskStore::Impl::LruRemoveLocked(uint32_t slot) {
  Slot& s = slots_[slot];
  if (s.lru_prev != kNoSlot) {
    slots_[s.lru_prev].lru_next = s.lru_next;
  } else if (lru_head_ == slot) {
    lru_head_ = s.lru_next;
  } else {
    return;  // not in the list
  }
  if (s.lru_next != kNoSlot) {
    slots_[s.lru_next].lru_prev = s.lru_prev;
  } else {
    lru_tail_ = s.lru_prev;
  }
  s.lru_prev = s.lru_next = kNoSlot;
}

void DiskStore::Impl::LruPushMruLocked(uint32_t slot) {
  Slot& s = slots_[slot];
  s.lru_prev = lru_tail_;
  s.lru_next = kNoSlot;
  if (lru_tail_ != kNoSlot) {
    slots_[lru_tail_].lru_next = slot;
  } else {
    lru_head_ = slot;
  }
  lru_tail_ = slot;
}

void DiskStore::Impl::FreeSlotLocked(uint32_t slot) {
  Slot& s = slots_[slot];
  s.state = SlotState::kFree;
  s.readers = 0;
  s.doomed = false;
  free_slots_.push_back(slot);
}

// A free slot, else the least recently used READY slot without readers (evicted: its key leaves
// the index before the caller writes into it); kNoSlot when every slot is busy.
uint32_t DiskStore::Impl::TakeSlotLocked() {
  if (!free_slots_.empty()) {
    uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    return slot;
  }
  for (uint32_t s = lru_head_; s != kNoSlot; s = slots_[s].lru_next) {
    if (slots_[s].readers > 0) continue;
    NotifyLocked(slots_[s].key, false);
    index_.erase(slots_[s].key);
    LruRemoveLocked(s);
    ++counters_.evictions;
    return s;
  }
  return kNoSlot;
}

// A slot whose bytes failed a check: invisible now, freed when its last reader leaves.
void DiskStore::Impl::DoomLocked(uint32_t slot) {
  Slot& s = slots_[slot];
  if (s.doomed) return;
  auto it = index_.find(s.key);
  if (it != index_.end() && it->second == slot) {
    NotifyLocked(s.key, false);
    index_.erase(it);
  }
  LruRemoveLocked(slot);
  s.doomed = true;
}

void DiskStore::Impl::DropReaderLocked(uint32_t slot) {
  Slot& s = slots_[slot];
  --s.readers;
  if (s.readers == 0 && s.doomed) FreeSlotLocked(slot);
}

DiskStore::Impl::Op* DiskStore::Impl::NewOpLocked() {
  Op* op;
  if (!free_ops_.empty()) {
    op = free_ops_.back();
    free_ops_.pop_back();
  } else {
    op = new Op();
    op->store = this;
    op->block = AllocAligned(2 * kDiskBlockBytes);
    if (!op->block) {
      delete op;
      return nullptr;
    }
    op->req.completion = op;
  }
  op->abandoned = false;
  op->user_answered = false;
  live_ops_.insert(op);
  ++in_flight_;
  return op;
}

void DiskStore::Impl::SetRequest(Op* op, IoOp io, uint64_t offset, int64_t now) {
  IoRequest& r = op->req;
  r.op = io;
  r.offset = offset;
  r.deadline_ns = now + opts.io_timeout_ms * 1'000'000;
  r.iovcnt = 0;
  r.iov[r.iovcnt++] = {op->block.get(), kDiskBlockBytes};
  if (op->kind == Op::Kind::kErase) return;
  if (head_bytes > 0) r.iov[r.iovcnt++] = {op->user_buf, head_bytes};
  if (tail_bytes > 0) r.iov[r.iovcnt++] = {op->block.get() + kDiskBlockBytes, kDiskBlockBytes};
}

// ---- write / read / erase -------------------------------------------------------------------

Status DiskStore::Impl::Write(const ChunkKey& key, const void* src, const uint32_t* known_crc,
                              Callback done) {
  if (src == nullptr || !IsBlockAligned(src)) {
    return Status::InvalidArgument(
        "src must be 4096-byte aligned host memory of blob_bytes (O_DIRECT)");
  }
  {
    // Cheap early answer for a chunk already there, before paying for its checksum.
    MutexLock lk(&mu_);
    if (index_.count(key))
      return Status::AlreadyExists("chunk " + key.Hex() + " is already on disk or being written");
  }
  // The checksum is computed before anything is reserved: it is the slow part and needs no lock.
  const uint32_t crc = known_crc != nullptr ? *known_crc : Crc32c(0, src, opts.blob_bytes);
  const int64_t now = MonotonicNowNs();
  Op* op;
  uint32_t slot;
  uint64_t sequence;
  {
    MutexLock lk(&mu_);
    if (closing_) return Status::FailedPrecondition("the DiskStore is closing");
    auto it = index_.find(key);
    if (it != index_.end()) {
      return Status::AlreadyExists("chunk " + key.Hex() +
                                   (slots_[it->second].state == SlotState::kWriting
                                        ? " is being written"
                                        : " is already on disk"));
    }
    if (nospace_) {
      if (now < nospace_probe_at_ns_) {
        ++counters_.writes_refused_nospace;
        return Status::ResourceExhausted("the disk tier stopped admitting after ENOSPC on '" +
                                         path + "'; it retries when space returns");
      }
      nospace_probe_at_ns_ = now + opts.nospace_retry_ms * 1'000'000;  // this write is the probe
    }
    slot = TakeSlotLocked();
    if (slot == kNoSlot) {
      ++counters_.writes_rejected_busy;
      return Status::ResourceExhausted("all " + std::to_string(num_slots) +
                                       " disk slots are being written or read");
    }
    op = NewOpLocked();
    if (op == nullptr) {
      FreeSlotLocked(slot);
      return Status::ResourceExhausted("out of memory for a disk request");
    }
    Slot& s = slots_[slot];
    s.state = SlotState::kWriting;
    s.key = key;
    s.sequence = sequence = next_sequence_++;
    s.payload_crc = crc;
    s.readers = 0;
    s.doomed = false;
    index_.emplace(key, slot);
  }
  op->kind = Op::Kind::kWrite;
  op->slot = slot;
  op->key = key;
  op->sequence = sequence;
  op->payload_crc = crc;
  op->user_buf = static_cast<unsigned char*>(const_cast<void*>(src));
  op->done = std::move(done);
  SlotHeader h;
  h.key = key;
  h.layout_fingerprint = opts.layout_fingerprint;
  h.epoch = epoch;
  h.sequence = sequence;
  h.payload_bytes = opts.blob_bytes;
  h.payload_crc = crc;
  EncodeSlotHeader(h, op->block.get());
  if (tail_bytes > 0) {
    unsigned char* bounce = op->block.get() + kDiskBlockBytes;
    std::memcpy(bounce, op->user_buf + head_bytes, tail_bytes);
    std::memset(bounce + tail_bytes, 0, kDiskBlockBytes - tail_bytes);
  }
  SetRequest(op, IoOp::kWrite, SlotOffset(slot, slot_bytes), now);
  IoRequest* r = &op->req;
  backend->Submit(&r, 1);
  return Status::OK();
}

Status DiskStore::Impl::ReadBatch(const ChunkKey* keys, void* const* dsts, size_t n,
                                  BatchCallback done) {
  if (n == 0) return Status::OK();
  if (keys == nullptr || dsts == nullptr)
    return Status::InvalidArgument("keys and dsts must not be null");
  for (size_t i = 0; i < n; ++i) {
    if (dsts[i] == nullptr || !IsBlockAligned(dsts[i])) {
      return Status::InvalidArgument(
          "dst must be 4096-byte aligned host memory of blob_bytes (O_DIRECT)");
    }
  }
  const int64_t now = MonotonicNowNs();
  std::vector<Op*> ops(n);
  {
    MutexLock lk(&mu_);
    if (closing_) return Status::FailedPrecondition("the DiskStore is closing");
    for (size_t i = 0; i < n; ++i) {
      if (!ReadyLocked(keys[i]))
        return Status::NotFound("chunk " + keys[i].Hex() + " is not on disk");
    }
    for (size_t i = 0; i < n; ++i) {
      ops[i] = NewOpLocked();
      if (ops[i] == nullptr) {
        for (size_t j = 0; j < i; ++j) {
          live_ops_.erase(ops[j]);
          free_ops_.push_back(ops[j]);
          --in_flight_;
        }
        return Status::ResourceExhausted("out of memory for disk requests");
      }
    }
    // Pin, and refresh recency last key first so keys[0] ends most recently used.
    for (size_t i = n; i-- > 0;) {
      uint32_t slot = index_.find(keys[i])->second;
      Slot& s = slots_[slot];
      ++s.readers;
      LruRemoveLocked(slot);
      LruPushMruLocked(slot);
      Op* op = ops[i];
      op->kind = Op::Kind::kRead;
      op->slot = slot;
      op->key = keys[i];
      op->sequence = s.sequence;
      op->payload_crc = s.payload_crc;
    }
  }
  auto shared_done = std::make_shared<BatchCallback>(std::move(done));
  std::vector<IoRequest*> reqs(n);
  for (size_t i = 0; i < n; ++i) {
    Op* op = ops[i];
    op->user_buf = static_cast<unsigned char*>(dsts[i]);
    if (*shared_done) {
      op->done = [shared_done, i](const Status& s) { (*shared_done)(i, s); };
    } else {
      op->done = nullptr;
    }
    SetRequest(op, IoOp::kRead, SlotOffset(op->slot, slot_bytes), now);
    reqs[i] = &op->req;
  }
  backend->Submit(reqs.data(), n);
  return Status::OK();
}

Status DiskStore::Impl::VerifyRead(Op* op) const {
  SlotHeader h;
  std::string why;
  const std::string where =
      "chunk " + op->key.Hex() + " in slot " + std::to_string(op->slot) + " of '" + path + "'";
  if (DecodeSlotHeader(op->block.get(), &h, &why) != SlotHeaderCheck::kValid) {
    return Status::Corruption(where + ": " + (why.empty() ? "slot header is empty" : why));
  }
  if (h.key != op->key) return Status::Corruption(where + ": the slot holds another key");
  if (h.layout_fingerprint != opts.layout_fingerprint)
    return Status::Corruption(where + ": layout fingerprint mismatch");
  if (h.epoch != epoch || h.sequence != op->sequence)
    return Status::Corruption(where + ": stale slot header");
  if (h.payload_bytes != opts.blob_bytes || h.payload_crc != op->payload_crc) {
    return Status::Corruption(where + ": slot header does not match the index");
  }
  if (tail_bytes > 0)
    std::memcpy(op->user_buf + head_bytes, op->block.get() + kDiskBlockBytes, tail_bytes);
  if (Crc32c(0, op->user_buf, opts.blob_bytes) != h.payload_crc) {
    return Status::Corruption(where + ": payload checksum mismatch");
  }
  return Status::OK();
}

void DiskStore::Impl::OnDone(Op* op, const Status& io_status) {
  Status result = io_status;
  if (op->kind == Op::Kind::kRead && result.ok()) result = VerifyRead(op);
  const bool deadline = result.code() == StatusCode::kDeadlineExceeded;
  {
    MutexLock lk(&mu_);
    Slot& s = slots_[op->slot];
    if (deadline) {
      op->abandoned = true;
      ++abandoned_;
      ++counters_.deadline_exceeded;
    }
    switch (op->kind) {
      case Op::Kind::kWrite:
        if (result.ok()) {
          s.state = SlotState::kReady;
          LruPushMruLocked(op->slot);
          NotifyLocked(op->key, true);
          ++counters_.writes;
          counters_.write_bytes += opts.blob_bytes;
          nospace_ = false;
        } else {
          index_.erase(op->key);
          ++counters_.write_failures;
          if (deadline) {
            s.state = SlotState::kQuarantined;  // freed in OnReleased
          } else {
            FreeSlotLocked(op->slot);
          }
          if (result.code() == StatusCode::kResourceExhausted) {
            ++counters_.enospc;
            nospace_ = true;
            nospace_probe_at_ns_ = MonotonicNowNs() + opts.nospace_retry_ms * 1'000'000;
          }
        }
        break;
      case Op::Kind::kRead:
        if (result.ok()) {
          ++counters_.reads;
          counters_.read_bytes += opts.blob_bytes;
        } else if (result.code() == StatusCode::kCorruption) {
          ++counters_.corrupt_detected;
          DoomLocked(op->slot);
        } else {
          ++counters_.read_failures;
          if (!deadline) DoomLocked(op->slot);  // an I/O error: do not try this slot again
        }
        if (!deadline) DropReaderLocked(op->slot);  // else the pin holds until OnReleased
        break;
      case Op::Kind::kErase:
        break;  // the slot is freed in OnReleased, whatever the outcome
    }
    op->user_answered = true;
  }
  if (op->done) op->done(result);
}

void DiskStore::Impl::OnReleased(Op* op) {
  MutexLock lk(&mu_);
  if (op->kind == Op::Kind::kErase) {
    FreeSlotLocked(op->slot);
  } else if (op->abandoned) {
    if (op->kind == Op::Kind::kWrite) {
      FreeSlotLocked(op->slot);
    } else {
      DropReaderLocked(op->slot);
    }
  }
  if (op->abandoned) --abandoned_;
  op->done = nullptr;
  live_ops_.erase(op);
  free_ops_.push_back(op);
  if (--in_flight_ == 0) idle_cv_.NotifyAll();
}

Status DiskStore::Impl::Erase(const ChunkKey& key) {
  Op* op;
  uint32_t slot;
  {
    MutexLock lk(&mu_);
    if (closing_) return Status::FailedPrecondition("the DiskStore is closing");
    auto it = index_.find(key);
    if (it == index_.end()) return Status::NotFound("chunk " + key.Hex() + " is not on disk");
    slot = it->second;
    Slot& s = slots_[slot];
    if (s.state == SlotState::kWriting)
      return Status::FailedPrecondition("chunk " + key.Hex() + " is being written");
    if (s.readers > 0) return Status::FailedPrecondition("chunk " + key.Hex() + " is being read");
    op = NewOpLocked();
    if (op == nullptr) return Status::ResourceExhausted("out of memory for a disk request");
    NotifyLocked(key, false);
    index_.erase(it);
    LruRemoveLocked(slot);
    s.state = SlotState::kErasing;
    ++counters_.erases;
  }
  op->kind = Op::Kind::kErase;
  op->slot = slot;
  op->key = key;
  op->user_buf = nullptr;
  op->done = nullptr;
  std::memset(op->block.get(), 0, kDiskBlockBytes);  // the all-zero header: "empty"
  SetRequest(op, IoOp::kWrite, SlotOffset(slot, slot_bytes), MonotonicNowNs());
  IoRequest* r = &op->req;
  backend->Submit(&r, 1);
  return Status::OK();
}

void DiskStore::Impl::SetVisibilityObserver(VisibilityObserver observer, void* ctx) {
  MutexLock lk(&mu_);
  observer_ = observer;
  observer_ctx_ = ctx;
  // The LRU list holds exactly the visible slots (READY, not doomed).
  for (uint32_t s = lru_head_; s != kNoSlot; s = slots_[s].lru_next)
    NotifyLocked(slots_[s].key, true);
}

size_t DiskStore::Impl::Lookup(const ChunkKey* keys, size_t n) const {
  MutexLock lk(&mu_);
  size_t i = 0;
  while (i < n && ReadyLocked(keys[i])) ++i;
  return i;
}

Status DiskStore::Impl::Flush(int64_t timeout_ms) {
  MutexLock lk(&mu_);
  bool idle = idle_cv_.WaitFor(lk, std::chrono::milliseconds(std::max<int64_t>(0, timeout_ms)),
                               [&]() REQUIRES_LOCK(mu_) { return in_flight_ == 0; });
  if (idle) return Status::OK();
  return Status::DeadlineExceeded(
      std::to_string(in_flight_) + " disk requests still in flight after " +
      std::to_string(timeout_ms) + " ms (" + std::to_string(abandoned_) + " past their deadline)");
}

DiskStoreStats DiskStore::Impl::Stats() const {
  IoBackendStats io = backend->stats();
  MutexLock lk(&mu_);
  DiskStoreStats s = counters_;
  s.backend = backend->name();
  s.backend_fallback_reason = backend_fallback_reason;
  s.direct_io = direct_io;
  s.preallocated = preallocated;
  s.fs_type = fs_type;
  s.slot_bytes = slot_bytes;
  s.blob_bytes = opts.blob_bytes;
  s.slots_total = num_slots;
  s.slots_used = s.slots_writing = s.slots_pinned = 0;
  for (const auto& [key, slot] : index_) {
    const Slot& sl = slots_[slot];
    if (sl.state == SlotState::kWriting) {
      ++s.slots_writing;
    } else if (sl.state == SlotState::kReady) {
      ++s.slots_used;
      if (sl.readers > 0) ++s.slots_pinned;
    }
  }
  s.nospace = nospace_;
  s.abandoned_in_flight = abandoned_;
  s.in_flight = in_flight_;
  s.io_resubmits = io.resubmits;
  s.reformatted_at_open = reformatted;
  s.reformat_reason = reformat_reason;
  s.open_seconds = open_seconds;
  return s;
}

// ---- DiskStore ----------------------------------------------------------------------------------

DiskStore::DiskStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DiskStore::~DiskStore() = default;

Status DiskStore::Write(const ChunkKey& key, const void* src, Callback done) {
  return impl_->Write(key, src, nullptr, std::move(done));
}

Status DiskStore::Write(const ChunkKey& key, const void* src, uint32_t payload_crc, Callback done) {
  return impl_->Write(key, src, &payload_crc, std::move(done));
}

Status DiskStore::Read(const ChunkKey& key, void* dst, Callback done) {
  BatchCallback batch;
  if (done) batch = [done = std::move(done)](size_t, const Status& s) { done(s); };
  return impl_->ReadBatch(&key, &dst, 1, std::move(batch));
}

Status DiskStore::ReadBatch(const ChunkKey* keys, void* const* dsts, size_t n, BatchCallback done) {
  return impl_->ReadBatch(keys, dsts, n, std::move(done));
}

size_t DiskStore::Lookup(const ChunkKey* keys, size_t n) const { return impl_->Lookup(keys, n); }
bool DiskStore::Contains(const ChunkKey& key) const { return impl_->Lookup(&key, 1) == 1; }
Status DiskStore::Erase(const ChunkKey& key) { return impl_->Erase(key); }
Status DiskStore::Flush(int64_t timeout_ms) { return impl_->Flush(timeout_ms); }
void DiskStore::SetVisibilityObserver(VisibilityObserver observer, void* ctx) {
  impl_->SetVisibilityObserver(observer, ctx);
}
DiskStoreStats DiskStore::stats() const { return impl_->Stats(); }
IoBackendKind DiskStore::backend() const { return impl_->backend->kind(); }
const char* DiskStore::backend_name() const { return impl_->backend->name(); }
const std::string& DiskStore::path() const { return impl_->path; }
uint64_t DiskStore::blob_bytes() const { return impl_->opts.blob_bytes; }
uint64_t DiskStore::slot_bytes() const { return impl_->slot_bytes; }
size_t DiskStore::num_slots() const { return impl_->num_slots; }

}  // namespace kvtier
