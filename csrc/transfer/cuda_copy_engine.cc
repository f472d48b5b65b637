// CUDA copy path: streams, events, staging slots and the three methods (direct, staged, zero-copy).
//
// Per direction (offload = gather, load = scatter) the engine owns a DMA stream and a kernel
// stream. Enqueueing a transfer holds the direction's mutex, so the staging slots and the events
// that hand them between the two streams are used in one order. A transfer ends with a host
// function on its last stream that returns its metadata buffer, runs the callback and wakes
// Wait(); every wait also polls the device so a faulted context reports an error, not a hang.
#include "transfer/cuda_copy_engine.h"

#include <string>

#include "common/mutex.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "common/thread_annotations.h"
#include "transfer/batch_copy.h"
#include "transfer/cuda_resources.h"
#include "transfer/cuda_transfer.h"
#include "transfer/cuda_util.h"
#include "transfer/gather_kernels.h"
#endif

namespace kvtier {
namespace {

// The staging area is four slots: two (double buffering) per direction.
uint64_t StagingSlotBytes(uint64_t staging_bytes) { return (staging_bytes / 4) & ~uint64_t{255}; }

}  // namespace

TransferMethod ResolveAutoMethod(const LayoutPlan& plan, uint64_t staging_bytes) {
  if (plan.min_page_bytes >= kDirectMinPageBytes) return TransferMethod::kDirect;
  if (StagingSlotBytes(staging_bytes) >= plan.max_page_bytes) return TransferMethod::kStaged;
  return TransferMethod::kZeroCopy;
}

#if !KVTIER_HAVE_CUDA

StatusOr<std::unique_ptr<CopyEngine>> CreateCudaCopyEngine(LayoutPlan plan,
                                                           const CopyEngineOptions& options) {
  (void)options;
  return Status::Unavailable("kvtier was built without CUDA: a GPU layout (device " +
                             std::to_string(plan.layout.device) + ") needs a CUDA build");
}

#else  // KVTIER_HAVE_CUDA

namespace {

using namespace cudacopy;  // NOLINT(build/namespaces): the engine is the one user of its parts

// One DMA: `bytes` from src to dst.
struct CopyList {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;

  void clear() {
    dsts.clear();
    srcs.clear();
    sizes.clear();
  }
  // Appends a copy, merged into the previous one when both sides continue it.
  void Add(void* dst, const void* src, size_t n) {
    if (!sizes.empty() && static_cast<char*>(dsts.back()) + sizes.back() == dst &&
        static_cast<const char*>(srcs.back()) + sizes.back() == src) {
      sizes.back() += n;
      return;
    }
    dsts.push_back(dst);
    srcs.push_back(src);
    sizes.push_back(n);
  }
};

// A run of pages of one (chunk, segment) placed at `other` (a staging-slot offset, or a mapped
// blob address) — the kernel's SlabDev plus the host-side facts the plan needs.
struct Piece {
  uint32_t chunk;
  uint32_t seg;
  uint32_t first_page;
  uint32_t num_pages;
  uint64_t other;
};

// One fill of a staging slot: pieces [piece_begin, piece_end), the DMAs between the slot and the
// blobs (src/dst as offsets into the slot on one side), and the layers it completes.
struct Fill {
  size_t piece_begin = 0;
  size_t piece_end = 0;
  struct Run {
    uint64_t slot_offset;
    char* blob;
    uint64_t bytes;
  };
  std::vector<Run> runs;
  std::vector<uint32_t> layers_done;
};

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Which layers become complete as copy groups complete, in whatever order they complete.
class LayerTracker {
 public:
  explicit LayerTracker(const LayoutPlan& plan) : plan_(plan), groups_left_(plan.layers.size()) {
    for (size_t l = 0; l < plan.layers.size(); ++l) groups_left_[l] = plan.layer_groups[l].size();
  }
  // Group g has completed: appends the layers that needed it last.
  void GroupDone(uint32_t g, std::vector<uint32_t>* layers_done) {
    for (uint32_t l : plan_.group_layers[g]) {
      if (--groups_left_[l] == 0) layers_done->push_back(l);
    }
  }

 private:
  const LayoutPlan& plan_;
  std::vector<size_t> groups_left_;
};

class CudaCopyEngine final : public CopyEngine {
 public:
  explicit CudaCopyEngine(std::shared_ptr<CudaCore> core) : core_(std::move(core)) {}

  StatusOr<std::shared_ptr<Transfer>> Gather(const std::vector<uint32_t>& page_ids,
                                             const std::vector<void*>& blobs,
                                             uintptr_t after_stream,
                                             TransferCallback on_complete) override {
    return Begin(page_ids, blobs, after_stream, std::move(on_complete), /*scatter=*/false);
  }
  StatusOr<std::shared_ptr<Transfer>> Scatter(const std::vector<void*>& blobs,
                                              const std::vector<uint32_t>& page_ids,
                                              uintptr_t after_stream,
                                              TransferCallback on_complete) override {
    return Begin(page_ids, blobs, after_stream, std::move(on_complete), /*scatter=*/true);
  }
  TransferMethod method() const override { return core_->method; }
  const LayoutDesc& layout() const override { return core_->plan.layout; }
  uint64_t blob_bytes() const override { return core_->plan.blob_bytes; }

 private:
  const LayoutPlan& plan() const { return core_->plan; }

  StatusOr<std::shared_ptr<Transfer>> Begin(const std::vector<uint32_t>& page_ids,
                                            const std::vector<void*>& blobs, uintptr_t after_stream,
                                            TransferCallback on_complete, bool scatter) {
    KVTIER_RETURN_IF_ERROR(ValidateTransferRequest(plan(), page_ids, blobs, scatter));
    DeviceGuard guard;
    KVTIER_RETURN_IF_ERROR(guard.Enter(core_->device));
    const TransferMethod method = core_->method;

    std::vector<uint64_t> blob_dev;
    if (method == TransferMethod::kZeroCopy) KVTIER_RETURN_IF_ERROR(MapBlobs(blobs, &blob_dev));

    auto state = std::make_shared<CudaTransferState>();
    state->callback = std::move(on_complete);
    state->meta_pool = core_->meta.get();
    auto transfer = std::make_shared<CudaTransfer>(core_, state, method);
    KVTIER_RETURN_IF_ERROR(core_->events->Acquire(plan().layers.size() + 1, &transfer->events_));
    transfer->layer_recorded_.assign(plan().layers.size(), 0);
    if (blobs.empty()) {  // nothing to copy: complete now
      state->Complete();
      return std::shared_ptr<Transfer>(std::move(transfer));
    }

    // Host-side plan and metadata, before anything is enqueued.
    std::vector<Piece> pieces;
    std::vector<Fill> fills;
    if (method == TransferMethod::kStaged) {
      PlanStaged(page_ids.size() / plan().pages_per_chunk(), blobs, scatter, &pieces, &fills);
    } else if (method == TransferMethod::kZeroCopy) {
      PlanZeroCopy(blobs.size(), blob_dev, &pieces, &fills);
    }
    size_t ids_offset = 0;
    size_t meta_bytes = 0;
    if (!pieces.empty()) {
      ids_offset = AlignUp(pieces.size() * sizeof(SlabDev), 16);
      meta_bytes = ids_offset + page_ids.size() * sizeof(uint32_t);
      KVTIER_RETURN_IF_ERROR(core_->meta->Acquire(meta_bytes, &state->meta));
      state->owns_meta = true;
      auto* slabs = static_cast<SlabDev*>(state->meta.host);
      for (size_t i = 0; i < pieces.size(); ++i) {
        const Piece& p = pieces[i];
        slabs[i] = SlabDev{p.other, p.seg, p.chunk * plan().pages_per_chunk() + p.first_page,
                           p.num_pages, 0};
      }
      std::copy(page_ids.begin(), page_ids.end(),
                reinterpret_cast<uint32_t*>(static_cast<char*>(state->meta.host) + ids_offset));
    }

    Direction& dir = scatter ? core_->load : core_->offload;
    MutexLock lock(&dir.mu);
    // The stream that first touches KV waits for the caller's stream. A failure here is before
    // anything started: return it (the metadata buffer goes back unused).
    cudaStream_t first = method == TransferMethod::kDirect ? dir.dma : dir.kernel;
    if (after_stream != 0) {
      cudaError_t err = cudaEventRecord(dir.after, reinterpret_cast<cudaStream_t>(after_stream));
      if (err == cudaSuccess) err = cudaStreamWaitEvent(first, dir.after, 0);
      if (err != cudaSuccess) {
        Status s = CudaStatus(
            err, "cannot order the copy after after_stream " + PointerString(after_stream) +
                     " (it must be a stream of GPU " + std::to_string(core_->device) + ")");
        if (state->owns_meta) core_->meta->Release(state->meta);
        state->owns_meta = false;
        return Status::InvalidArgument(s.message());
      }
    }

    Status st;
    cudaStream_t last = dir.dma;
    cudaStream_t other = nullptr;
    switch (method) {
      case TransferMethod::kDirect:
        st = EnqueueDirect(dir, *transfer, page_ids, blobs, scatter);
        break;
      case TransferMethod::kStaged:
        last = scatter ? dir.kernel : dir.dma;
        other = scatter ? dir.dma : dir.kernel;
        st = EnqueueStaged(dir, *transfer, pieces, fills, ids_offset, meta_bytes, scatter);
        break;
      default:  // kZeroCopy
        last = dir.kernel;
        st = EnqueueZeroCopy(dir, *transfer, pieces, fills, ids_offset, meta_bytes, scatter);
        break;
    }
    Finish(dir, *transfer, last, other, st);
    return std::shared_ptr<Transfer>(std::move(transfer));
  }

  // Device addresses of the blobs for the zero-copy kernel: each must be mapped pinned memory
  // (cudaHostAlloc, or cudaHostRegister with the mapped flag) or device memory.
  Status MapBlobs(const std::vector<void*>& blobs, std::vector<uint64_t>* out) const {
    out->resize(blobs.size());
    for (size_t c = 0; c < blobs.size(); ++c) {
      uint64_t dev[2] = {0, 0};
      for (int end = 0; end < 2; ++end) {
        char* p = static_cast<char*>(blobs[c]) + (end ? plan().blob_bytes - 1 : 0);
        cudaPointerAttributes attr{};
        KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, p),
                                    "cudaPointerGetAttributes(blobs[" + std::to_string(c) + "])");
        if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr) {
          dev[end] = reinterpret_cast<uint64_t>(attr.devicePointer);
        } else if ((attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
                   attr.device == core_->device) {
          dev[end] = reinterpret_cast<uint64_t>(p);
        } else {
          return Status::InvalidArgument("blobs[" + std::to_string(c) + "] (" +
                                         PointerString(reinterpret_cast<uint64_t>(blobs[c])) +
                                         ") is not pinned host memory over its " +
                                         std::to_string(plan().blob_bytes) +
                                         " bytes: the zero_copy method needs mapped pinned blobs");
        }
      }
      if (dev[1] != dev[0] + plan().blob_bytes - 1) {
        return Status::InvalidArgument(
            "blobs[" + std::to_string(c) +
            "] does not map to one contiguous device range (spans two allocations?)");
      }
      (*out)[c] = dev[0];
    }
    return Status::OK();
  }

  // Staged: pieces in slot order, cut into fills of at most slot_bytes. Gather goes chunk by
  // chunk (blob order: few, large DMAs); scatter group by group (so layer events fire early).
  void PlanStaged(size_t num_chunks, const std::vector<void*>& blobs, bool scatter,
                  std::vector<Piece>* pieces, std::vector<Fill>* fills) const {
    const LayoutPlan& p = plan();
    const uint32_t ppc = p.pages_per_chunk();
    std::vector<std::pair<uint32_t, uint32_t>> order;  // (chunk, segment)
    order.reserve(num_chunks * p.num_segments());
    if (scatter) {
      for (const auto& segs : p.groups) {
        for (uint32_t c = 0; c < num_chunks; ++c) {
          for (uint32_t s : segs) order.emplace_back(c, s);
        }
      }
    } else {
      for (uint32_t c = 0; c < num_chunks; ++c) {
        for (uint32_t s = 0; s < p.num_segments(); ++s) order.emplace_back(c, s);
      }
    }
    std::vector<uint64_t> slabs_left(p.groups.size());
    for (size_t g = 0; g < p.groups.size(); ++g) slabs_left[g] = num_chunks * p.groups[g].size();
    LayerTracker tracker(p);

    const uint64_t cap = core_->slot_bytes;
    uint64_t used = 0;
    const char* prev_end = nullptr;  // blob address right after the last piece of this fill
    fills->emplace_back();
    for (const auto& [c, s] : order) {
      const SegmentDesc& seg = p.layout.segments[s];
      const uint64_t pb = seg.page_bytes;
      uint32_t j = 0;
      while (j < ppc) {
        char* blob = static_cast<char*>(blobs[c]) + p.seg_blob_offset[s] + j * pb;
        bool continues = blob == prev_end;
        uint64_t start = continues ? used : AlignUp(used, 16);
        if (start + pb > cap) {  // slot full: start the next fill
          fills->back().piece_end = pieces->size();
          fills->emplace_back();
          fills->back().piece_begin = pieces->size();
          used = start = 0;
          continues = false;
        }
        const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(ppc - j, (cap - start) / pb));
        pieces->push_back(Piece{c, s, j, n, start});
        Fill& f = fills->back();
        if (continues && !f.runs.empty()) {
          f.runs.back().bytes += n * pb;
        } else {
          f.runs.push_back(Fill::Run{start, blob, n * pb});
        }
        used = start + n * pb;
        prev_end = blob + n * pb;
        j += n;
      }
      const uint32_t g = p.seg_group[s];
      if (--slabs_left[g] == 0) tracker.GroupDone(g, &fills->back().layers_done);
    }
    fills->back().piece_end = pieces->size();
  }

  // Zero-copy: whole slabs, group by group, one fill (one kernel launch) per copy group.
  void PlanZeroCopy(size_t num_chunks, const std::vector<uint64_t>& blob_dev,
                    std::vector<Piece>* pieces, std::vector<Fill>* fills) const {
    const LayoutPlan& p = plan();
    LayerTracker tracker(p);
    for (size_t g = 0; g < p.groups.size(); ++g) {
      Fill f;
      f.piece_begin = pieces->size();
      for (uint32_t c = 0; c < num_chunks; ++c) {
        for (uint32_t s : p.groups[g]) {
          pieces->push_back(
              Piece{c, s, 0, p.pages_per_chunk(), blob_dev[c] + p.seg_blob_offset[s]});
        }
      }
      f.piece_end = pieces->size();
      tracker.GroupDone(static_cast<uint32_t>(g), &f.layers_done);
      fills->push_back(std::move(f));
    }
  }

  // Issues `copies` on `stream` (QueueCopies: batches where the runtime and driver have them).
  Status IssueCopies(const CopyList& copies, cudaStream_t stream) {
    return QueueCopies(copies.dsts.data(), copies.srcs.data(), copies.sizes.data(),
                       copies.sizes.size(), stream, &core_->batch_copies);
  }

  Status RecordLayer(CudaTransfer& t, uint32_t layer, cudaStream_t stream) {
    KVTIER_CUDA_RETURN_IF_ERROR(cudaEventRecord(t.layer_event(static_cast<int>(layer)), stream),
                                "cudaEventRecord(layer " + std::to_string(layer) + ")");
    t.layer_recorded_[layer] = 1;
    return Status::OK();
  }

  // Direct: group by group, one DMA per run of pages contiguous on both sides.
  Status EnqueueDirect(Direction& dir, CudaTransfer& t, const std::vector<uint32_t>& page_ids,
                       const std::vector<void*>& blobs, bool scatter) {
    const LayoutPlan& p = plan();
    const uint32_t ppc = p.pages_per_chunk();
    CopyList copies;
    LayerTracker tracker(p);
    std::vector<uint32_t> layers_done;
    for (size_t g = 0; g < p.groups.size(); ++g) {
      copies.clear();
      for (size_t c = 0; c < blobs.size(); ++c) {
        for (uint32_t s : p.groups[g]) {
          const SegmentDesc& seg = p.layout.segments[s];
          char* slab = static_cast<char*>(blobs[c]) + p.seg_blob_offset[s];
          for (uint32_t j = 0; j < ppc; ++j) {
            char* page = reinterpret_cast<char*>(seg.base +
                                                 uint64_t{page_ids[c * ppc + j]} * seg.page_stride);
            char* slot = slab + j * seg.page_bytes;
            if (scatter) {
              copies.Add(page, slot, seg.page_bytes);
            } else {
              copies.Add(slot, page, seg.page_bytes);
            }
          }
        }
      }
      KVTIER_RETURN_IF_ERROR(IssueCopies(copies, dir.dma));
      layers_done.clear();
      tracker.GroupDone(static_cast<uint32_t>(g), &layers_done);
      for (uint32_t l : layers_done) KVTIER_RETURN_IF_ERROR(RecordLayer(t, l, dir.dma));
    }
    return Status::OK();
  }

  PageCopyParams KernelParams(const CudaTransfer& t, const std::vector<Piece>& pieces,
                              const Fill& f, size_t ids_offset, uint64_t other_base,
                              bool scatter) const {
    const MetaBuffer& meta = t.state()->meta;
    PageCopyParams prm{};
    prm.segments = core_->segments_dev;
    prm.slabs = static_cast<const SlabDev*>(meta.device) + f.piece_begin;
    prm.page_ids =
        reinterpret_cast<const uint32_t*>(static_cast<const char*>(meta.device) + ids_offset);
    prm.other_base = other_base;
    prm.num_slabs = static_cast<uint32_t>(f.piece_end - f.piece_begin);
    uint32_t max_pages = 0;
    uint64_t max_bytes = 0;
    for (size_t i = f.piece_begin; i < f.piece_end; ++i) {
      max_pages = std::max(max_pages, pieces[i].num_pages);
      max_bytes = std::max(max_bytes, plan().layout.segments[pieces[i].seg].page_bytes);
    }
    prm.max_pages_per_slab = max_pages;
    prm.pieces_per_page =
        static_cast<uint32_t>((max_bytes + kPageCopyPieceBytes - 1) / kPageCopyPieceBytes);
    prm.to_pages = scatter ? 1 : 0;
    return prm;
  }

  Status UploadMeta(const CudaTransfer& t, size_t bytes, cudaStream_t stream) {
    const MetaBuffer& meta = t.state()->meta;
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(meta.device, meta.host, bytes, cudaMemcpyHostToDevice, stream),
        "upload of transfer metadata");
    return Status::OK();
  }

  int StagedBlocks() const { return std::max(4, core_->sm_count / 4); }
  int ZeroCopyBlocks() const { return std::max(4, core_->sm_count * 2); }

  // Staged, double-buffered: while the DMA of slot A runs, the kernel fills (or drains) slot B.
  //   gather:  kernel: wait free[h], pages -> slot h, ready[h];  dma: wait ready[h], slot h ->
  //   blobs, free[h] scatter: dma: wait free[h], blobs -> slot h, ready[h];  kernel: wait ready[h],
  //   slot h -> pages, free[h]
  Status EnqueueStaged(Direction& dir, CudaTransfer& t, const std::vector<Piece>& pieces,
                       const std::vector<Fill>& fills, size_t ids_offset, size_t meta_bytes,
                       bool scatter) REQUIRES_LOCK(dir.mu) {
    KVTIER_RETURN_IF_ERROR(UploadMeta(t, meta_bytes, dir.kernel));
    CopyList copies;
    for (const Fill& f : fills) {
      if (f.piece_end == f.piece_begin) continue;
      const int h = dir.next_slot;
      dir.next_slot ^= 1;
      char* slot = static_cast<char*>(dir.slot[h]);
      copies.clear();
      for (const Fill::Run& r : f.runs) {
        if (scatter) {
          copies.Add(slot + r.slot_offset, r.blob, r.bytes);
        } else {
          copies.Add(r.blob, slot + r.slot_offset, r.bytes);
        }
      }
      const PageCopyParams prm =
          KernelParams(t, pieces, f, ids_offset, reinterpret_cast<uint64_t>(slot), scatter);
      cudaStream_t producer = scatter ? dir.dma : dir.kernel;
      cudaStream_t consumer = scatter ? dir.kernel : dir.dma;
      KVTIER_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(producer, dir.slot_free[h], 0),
                                  "cudaStreamWaitEvent(slot free)");
      if (scatter) {
        KVTIER_RETURN_IF_ERROR(IssueCopies(copies, producer));
      } else {
        KVTIER_CUDA_RETURN_IF_ERROR(LaunchPageCopy(prm, StagedBlocks(), producer),
                                    "gather kernel launch");
      }
      KVTIER_CUDA_RETURN_IF_ERROR(cudaEventRecord(dir.slot_ready[h], producer),
                                  "cudaEventRecord(slot ready)");
      KVTIER_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(consumer, dir.slot_ready[h], 0),
                                  "cudaStreamWaitEvent(slot ready)");
      if (scatter) {
        KVTIER_CUDA_RETURN_IF_ERROR(LaunchPageCopy(prm, StagedBlocks(), consumer),
                                    "scatter kernel launch");
      } else {
        KVTIER_RETURN_IF_ERROR(IssueCopies(copies, consumer));
      }
      KVTIER_CUDA_RETURN_IF_ERROR(cudaEventRecord(dir.slot_free[h], consumer),
                                  "cudaEventRecord(slot free)");
      for (uint32_t l : f.layers_done) KVTIER_RETURN_IF_ERROR(RecordLayer(t, l, consumer));
    }
    return Status::OK();
  }

  Status EnqueueZeroCopy(Direction& dir, CudaTransfer& t, const std::vector<Piece>& pieces,
                         const std::vector<Fill>& fills, size_t ids_offset, size_t meta_bytes,
                         bool scatter) {
    KVTIER_RETURN_IF_ERROR(UploadMeta(t, meta_bytes, dir.kernel));
    for (const Fill& f : fills) {
      const PageCopyParams prm = KernelParams(t, pieces, f, ids_offset, 0, scatter);
      KVTIER_CUDA_RETURN_IF_ERROR(LaunchPageCopy(prm, ZeroCopyBlocks(), dir.kernel),
                                  "zero-copy kernel launch");
      for (uint32_t l : f.layers_done) KVTIER_RETURN_IF_ERROR(RecordLayer(t, l, dir.kernel));
    }
    return Status::OK();
  }

  // Ends the enqueue: the last stream waits for the other, records the final event and runs the
  // completion host function. If even that cannot be enqueued, the transfer completes here with
  // the error, and its metadata buffer is abandoned (queued work may still read it).
  void Finish(Direction& dir, CudaTransfer& t, cudaStream_t last, cudaStream_t other, Status st) {
    const std::shared_ptr<CudaTransferState>& state = t.state();
    t.enqueue_status_ = st;
    state->final_status = st;
    cudaError_t err = cudaSuccess;
    if (other != nullptr) {
      err = cudaEventRecord(dir.join, other);
      if (err == cudaSuccess) err = cudaStreamWaitEvent(last, dir.join, 0);
    }
    if (err == cudaSuccess) {
      err = cudaEventRecord(t.final_event(), last);
      if (err == cudaSuccess) t.final_recorded_ = true;
    }
    if (err == cudaSuccess) {
      auto* holder = new std::shared_ptr<CudaTransferState>(state);
      err = cudaLaunchHostFunc(last, CompleteHostFn, holder);
      if (err != cudaSuccess) delete holder;
    }
    if (err != cudaSuccess) {
      Status s = st.ok() ? CudaStatus(err, "cannot enqueue the end of the transfer") : st;
      cudaGetLastError();
      t.enqueue_status_ = s;
      state->final_status = s;
      state->owns_meta = false;
      state->Complete();
    }
  }

  std::shared_ptr<CudaCore> core_;
};

// Checks that segment s lies in device (or managed) memory of `device`, first byte and last.
Status CheckSegmentMemory(const LayoutPlan& plan, size_t s, int device) {
  const SegmentDesc& seg = plan.layout.segments[s];
  const uint64_t last = seg.base + (seg.num_pages - 1) * seg.page_stride + seg.page_bytes - 1;
  for (uint64_t addr : {seg.base, last}) {
    cudaPointerAttributes attr{};
    KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(addr)),
                                "cudaPointerGetAttributes(segment " + std::to_string(s) + ")");
    const bool on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
    if (!on_device || attr.device != device) {
      return Status::InvalidArgument("segment " + std::to_string(s) + ": address " +
                                     PointerString(addr) +
                                     (addr == seg.base ? " (page 0)" : " (end of the last page)") +
                                     " is not memory of GPU " + std::to_string(device));
    }
  }
  return Status::OK();
}

}  // namespace

StatusOr<std::unique_ptr<CopyEngine>> CreateCudaCopyEngine(LayoutPlan plan,
                                                           const CopyEngineOptions& options) {
  const int device = plan.layout.device;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Status::Unavailable(
        "no usable CUDA device for a GPU layout (device " + std::to_string(device) +
        "): " + (err != cudaSuccess ? cudaGetErrorString(err) : "no GPU found"));
  }
  if (device >= count) {
    return Status::InvalidArgument("device " + std::to_string(device) +
                                   " is out of range: this machine has " + std::to_string(count) +
                                   " GPU(s)");
  }
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  for (size_t s = 0; s < plan.num_segments(); ++s)
    KVTIER_RETURN_IF_ERROR(CheckSegmentMemory(plan, s, device));

  const uint64_t slot_bytes = StagingSlotBytes(options.staging_bytes);
  TransferMethod method = options.method;
  if (method == TransferMethod::kAuto) method = ResolveAutoMethod(plan, options.staging_bytes);
  if (method == TransferMethod::kStaged && slot_bytes < plan.max_page_bytes) {
    return Status::InvalidArgument(
        "staging_bytes " + std::to_string(options.staging_bytes) +
        " is too small for the staged method: it needs 4 slots of the largest page (" +
        std::to_string(plan.max_page_bytes) + " bytes), at least " +
        std::to_string(4 * AlignUp(plan.max_page_bytes, 256)) + " bytes");
  }
  if (method != TransferMethod::kDirect) {
    // The kernel's work index per slab must fit 32 bits.
    const uint64_t pieces = (plan.max_page_bytes + kPageCopyPieceBytes - 1) / kPageCopyPieceBytes;
    if (pieces * plan.pages_per_chunk() >= (uint64_t{1} << 31)) {
      return Status::InvalidArgument(
          "pages_per_chunk x page size is too large for the copy kernel");
    }
  }

  auto core = std::make_shared<CudaCore>();
  core->plan = std::move(plan);
  core->device = device;
  core->slot_bytes = slot_bytes;
  KVTIER_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&core->sm_count, cudaDevAttrMultiProcessorCount, device),
      "cudaDeviceGetAttribute(multiprocessor count)");
  int least_priority = 0, greatest_priority = 0;
  KVTIER_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority),
                              "cudaDeviceGetStreamPriorityRange");
#if CUDART_VERSION >= 12080
  int driver = 0;
  core->batch_copies = cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12080;
#endif

  if (method == TransferMethod::kStaged) {
    err = cudaMalloc(&core->staging, 4 * slot_bytes);
    if (err != cudaSuccess) {
      Status s =
          CudaStatus(err, "cudaMalloc of " + std::to_string(4 * slot_bytes) + " bytes of staging");
      core->staging = nullptr;
      if (options.method != TransferMethod::kAuto) return s;
      method = TransferMethod::kZeroCopy;  // no staging memory to spare: the documented fallback
    }
  }
  core->method = method;
  const bool staged = method == TransferMethod::kStaged;
  char* staging = static_cast<char*>(core->staging);
  KVTIER_RETURN_IF_ERROR(
      CreateDirection(&core->offload, greatest_priority, staged, staging, slot_bytes));
  KVTIER_RETURN_IF_ERROR(CreateDirection(&core->load, greatest_priority, staged,
                                         staged ? staging + 2 * slot_bytes : nullptr, slot_bytes));

  if (method != TransferMethod::kDirect) {
    std::vector<SegmentDev> table(core->plan.num_segments());
    for (size_t s = 0; s < table.size(); ++s) {
      const SegmentDesc& d = core->plan.layout.segments[s];
      table[s] = SegmentDev{d.base, d.page_stride, d.page_bytes};
    }
    const size_t bytes = table.size() * sizeof(SegmentDev);
    void* dev = nullptr;
    KVTIER_CUDA_RETURN_IF_ERROR(cudaMalloc(&dev, bytes), "cudaMalloc of the segment table");
    core->segments_dev = static_cast<SegmentDev*>(dev);
    KVTIER_CUDA_RETURN_IF_ERROR(cudaMemcpy(dev, table.data(), bytes, cudaMemcpyHostToDevice),
                                "upload of the segment table");
  }
  return std::unique_ptr<CopyEngine>(std::make_unique<CudaCopyEngine>(std::move(core)));
}

#endif  // KVTIER_HAVE_CUDA

}  // namespace kvtier
