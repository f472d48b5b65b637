// CPU copy path: a transfer is cut into tasks (a range of pages of one copy group) that a
// persistent worker pool runs with memcpy, group by group, so per-layer waits complete in order.
#include "transfer/cpu_copy_engine.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"

namespace kvtier {
namespace {

// Tasks are sized so each thread gets several per transfer, but none is tiny.
constexpr uint64_t kMinTaskBytes = uint64_t{256} << 10;
constexpr uint64_t kMaxTaskBytes = uint64_t{16} << 20;

struct CpuTransferState {
  std::shared_ptr<const LayoutPlan> plan;
  std::vector<uint32_t> page_ids;
  std::vector<void*> blobs;
  bool scatter = false;
  TransferCallback callback;
  Status final_status;  // set before any task runs; what the callback and Wait() report

  Mutex mu;
  CondVar cv;
  std::vector<uint64_t> layer_tasks_left GUARDED_BY(mu);  // tasks of the groups layer l needs
  uint64_t tasks_left GUARDED_BY(mu) = 0;
  bool done GUARDED_BY(mu) = false;

  // Runs the callback (once), then marks the transfer done so Wait() returns after it.
  void Complete() {
    if (callback) callback(final_status);
    {
      MutexLock lock(&mu);
      done = true;
    }
    cv.NotifyAll();
  }
};

// Pages [unit_begin, unit_end) of one copy group; unit u is page u % ppc of chunk u / ppc.
struct CopyTask {
  std::shared_ptr<CpuTransferState> transfer;
  uint32_t group = 0;
  uint64_t unit_begin = 0;
  uint64_t unit_end = 0;
};

void RunTask(const CopyTask& task) {
  CpuTransferState& t = *task.transfer;
  const LayoutPlan& plan = *t.plan;
  const uint64_t ppc = plan.pages_per_chunk();
  const std::vector<uint32_t>& segs = plan.groups[task.group];
  for (uint64_t u = task.unit_begin; u < task.unit_end; ++u) {
    const uint64_t c = u / ppc;
    const uint64_t j = u % ppc;
    const uint64_t page_id = t.page_ids[u];  // == page_ids[c * ppc + j]
    char* blob = static_cast<char*>(t.blobs[c]);
    for (uint32_t s : segs) {
      const SegmentDesc& seg = plan.layout.segments[s];
      char* page = reinterpret_cast<char*>(seg.base + page_id * seg.page_stride);
      char* slot = blob + plan.seg_blob_offset[s] + j * seg.page_bytes;
      if (t.scatter) {
        std::memcpy(page, slot, seg.page_bytes);
      } else {
        std::memcpy(slot, page, seg.page_bytes);
      }
    }
  }
  bool last = false;
  {
    MutexLock lock(&t.mu);
    for (uint32_t l : plan.group_layers[task.group]) --t.layer_tasks_left[l];
    last = --t.tasks_left == 0;
  }
  if (last) {
    t.Complete();
  } else {
    t.cv.NotifyAll();
  }
}

// A fixed set of threads running CopyTasks in submission order. The destructor finishes every
// queued task before joining, so no transfer is left incomplete.
class WorkerPool {
 public:
  WorkerPool() = default;
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  Status Start(int num_threads) {
    try {
      for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Loop(); });
    } catch (const std::system_error& e) {
      return Status::ResourceExhausted(std::string("cannot start copy worker threads: ") +
                                       e.what());
    }
    return Status::OK();
  }

  ~WorkerPool() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.NotifyAll();
    for (std::thread& t : threads_) t.join();
  }

  void Submit(std::vector<CopyTask>&& tasks) {
    {
      MutexLock lock(&mu_);
      for (CopyTask& t : tasks) queue_.push_back(std::move(t));
    }
    cv_.NotifyAll();
  }

 private:
  void Loop() {
    for (;;) {
      CopyTask task;
      {
        MutexLock lock(&mu_);
        cv_.Wait(lock, [this]() REQUIRES_LOCK(mu_) { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and drained
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      RunTask(task);
    }
  }

  Mutex mu_;
  CondVar cv_;
  std::deque<CopyTask> queue_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

class CpuTransfer final : public Transfer {
 public:
  explicit CpuTransfer(std::shared_ptr<CpuTransferState> state) : state_(std::move(state)) {}

  Status Wait(int64_t timeout_ms) override {
    KVTIER_RETURN_IF_ERROR(ValidateTimeout(timeout_ms));
    MutexLock lock(&state_->mu);
    if (!state_->cv.WaitUntil(lock, DeadlineAfter(timeout_ms),
                              [this]() REQUIRES_LOCK(state_->mu) { return state_->done; })) {
      return Status::DeadlineExceeded("transfer not complete after " + std::to_string(timeout_ms) +
                                      " ms");
    }
    return state_->final_status;
  }

  Status WaitLayer(int layer, int64_t timeout_ms) override {
    KVTIER_RETURN_IF_ERROR(CheckLayer(layer));
    KVTIER_RETURN_IF_ERROR(ValidateTimeout(timeout_ms));
    MutexLock lock(&state_->mu);
    if (!state_->cv.WaitUntil(lock, DeadlineAfter(timeout_ms), [&]() REQUIRES_LOCK(state_->mu) {
          return state_->layer_tasks_left[layer] == 0;
        })) {
      return Status::DeadlineExceeded("layer " + std::to_string(layer) + " not complete after " +
                                      std::to_string(timeout_ms) + " ms");
    }
    return Status::OK();
  }

  Status StreamWaitLayer(int layer, uintptr_t stream) override {
    (void)stream;
    KVTIER_RETURN_IF_ERROR(CheckLayer(layer));
    return Status::Unavailable(
        "stream_wait_layer needs KV on a GPU; this transfer runs on the CPU path");
  }

  bool Done() const override {
    MutexLock lock(&state_->mu);
    return state_->done;
  }
  int num_layers() const override { return state_->plan->num_layers(); }
  TransferMethod method() const override { return TransferMethod::kCpu; }

 private:
  Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= num_layers()) {
      return Status::InvalidArgument("layer " + std::to_string(layer) + " is out of range [0, " +
                                     std::to_string(num_layers()) + ")");
    }
    return Status::OK();
  }

  std::shared_ptr<CpuTransferState> state_;
};

class CpuCopyEngine final : public CopyEngine {
 public:
  CpuCopyEngine(std::shared_ptr<const LayoutPlan> plan, int threads, uint32_t fail_every_nth)
      : plan_(std::move(plan)), threads_(threads), fail_every_nth_(fail_every_nth) {}

  Status Start() { return pool_.Start(threads_); }

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

  TransferMethod method() const override { return TransferMethod::kCpu; }
  const LayoutDesc& layout() const override { return plan_->layout; }
  uint64_t blob_bytes() const override { return plan_->blob_bytes; }

 private:
  StatusOr<std::shared_ptr<Transfer>> Begin(const std::vector<uint32_t>& page_ids,
                                            const std::vector<void*>& blobs, uintptr_t after_stream,
                                            TransferCallback on_complete, bool scatter) {
    if (after_stream != 0) {
      return Status::InvalidArgument(
          "after_stream must be 0 on the CPU path (KV is in host memory)");
    }
    KVTIER_RETURN_IF_ERROR(ValidateTransferRequest(*plan_, page_ids, blobs, scatter));

    auto state = std::make_shared<CpuTransferState>();
    state->plan = plan_;
    state->page_ids = page_ids;
    state->blobs = blobs;
    state->scatter = scatter;
    state->callback = std::move(on_complete);
    if (fail_every_nth_ != 0 && ++transfers_ % fail_every_nth_ == 0) {
      state->final_status = Status::IoError("injected copy failure (fail_every_nth)");
    }

    const LayoutPlan& plan = *plan_;
    const uint64_t units = static_cast<uint64_t>(page_ids.size());
    const uint64_t total_bytes = blobs.size() * plan.blob_bytes;
    const uint64_t target = std::clamp<uint64_t>(
        total_bytes / (static_cast<uint64_t>(threads_) * 4), kMinTaskBytes, kMaxTaskBytes);
    std::vector<CopyTask> tasks;
    std::vector<uint64_t> per_layer(plan.layers.size(), 0);
    for (size_t g = 0; g < plan.groups.size() && units > 0; ++g) {
      uint64_t unit_bytes = 0;
      for (uint32_t s : plan.groups[g]) unit_bytes += plan.layout.segments[s].page_bytes;
      const uint64_t per_task = std::max<uint64_t>(1, target / std::max<uint64_t>(1, unit_bytes));
      uint64_t count = 0;
      for (uint64_t b = 0; b < units; b += per_task) {
        tasks.push_back(
            CopyTask{state, static_cast<uint32_t>(g), b, std::min(units, b + per_task)});
        ++count;
      }
      for (uint32_t l : plan.group_layers[g]) per_layer[l] += count;
    }
    {
      MutexLock lock(&state->mu);
      state->layer_tasks_left = per_layer;
      state->tasks_left = tasks.size();
    }
    auto transfer = std::make_shared<CpuTransfer>(state);
    if (tasks.empty()) {
      state->Complete();  // zero chunks: nothing to copy
    } else {
      pool_.Submit(std::move(tasks));
    }
    return std::shared_ptr<Transfer>(std::move(transfer));
  }

  std::shared_ptr<const LayoutPlan> plan_;
  int threads_;
  const uint32_t fail_every_nth_;
  std::atomic<uint64_t> transfers_{0};
  WorkerPool pool_;  // declared last: destroyed first, finishing queued tasks while plan_ lives
};

}  // namespace

StatusOr<std::unique_ptr<CopyEngine>> CreateCpuCopyEngine(LayoutPlan plan,
                                                          const CopyEngineOptions& options) {
  auto engine = std::make_unique<CpuCopyEngine>(std::make_shared<const LayoutPlan>(std::move(plan)),
                                                options.cpu_threads, options.fail_every_nth);
  KVTIER_RETURN_IF_ERROR(engine->Start());
  return std::unique_ptr<CopyEngine>(std::move(engine));
}

}  // namespace kvtier
