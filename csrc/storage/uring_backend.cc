// io_uring backend: submitters fill SQEs under a mutex and submit in one call per batch; one
// completion thread reaps CQEs, resubmits short or -EAGAIN/-EINTR transfers, and fails requests
// that pass their deadline.
//
// Deadlines: the completion thread waits for CQEs with a timeout (io_uring_wait_cqe_timeout,
// which needs IORING_FEAT_EXT_ARG so it uses no SQE) that ends at the earliest pending deadline.
// A request past its deadline gets DeadlineExceeded at once, and an IORING_OP_ASYNC_CANCEL is
// sent for it (best effort: O_DIRECT I/O already at the device cannot be cancelled). Linked
// timeouts were not used for that reason: they cancel the same way, so they cannot bound the
// wait either, and they cost an extra SQE per request.
#include "storage/uring_backend.h"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"

#if KVTIER_HAVE_LIBURING
#include <liburing.h>
#endif

namespace kvtier {

#if KVTIER_HAVE_LIBURING
namespace {

// user_data of SQEs that are not requests. Requests are 8-byte aligned pointers.
constexpr uint64_t kWakeTag = 1;
constexpr uint64_t kCancelBit = 1;  // request pointer | 1: the cancel SQE for that request
// How long the completion thread sleeps with nothing due; a submit with an earlier deadline wakes
// it.
constexpr int64_t kIdleWaitNs = 1'000'000'000;

class UringBackend final : public IoBackend {
 public:
  explicit UringBackend(const IoBackendOptions& options)
      : queue_depth_(options.queue_depth), injector_(options.fault_injector) {}

  ~UringBackend() override {
    if (initialized_) (void)Shutdown(MonotonicNowNs());
  }

  Status Init(int fd) {
    io_uring_params params{};
    unsigned entries = std::max(8u, queue_depth_);
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 4;  // requests + cancels + wake-ups never overflow it
    int rc = io_uring_queue_init_params(entries, &ring_, &params);
    if (rc < 0)
      return Status::Unavailable(std::string("io_uring_queue_init: ") + std::strerror(-rc));
    if (!(params.features & IORING_FEAT_EXT_ARG)) {
      io_uring_queue_exit(&ring_);
      return Status::Unavailable(
          "the kernel's io_uring lacks IORING_FEAT_EXT_ARG (needs Linux 5.11+)");
    }
    rc = io_uring_register_files(&ring_, &fd, 1);
    if (rc == 0) {
      fixed_file_ = true;
      file_ = 0;
    } else {
      file_ = fd;  // registration is an optimisation only (e.g. RLIMIT_NOFILE tiny): go on without
    }
    // Round-trip a NOP: seccomp policies can allow setup yet refuse io_uring_enter.
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    rc = io_uring_submit(&ring_);
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{2, 0};
    if (rc >= 0) rc = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
    if (rc < 0) {
      io_uring_queue_exit(&ring_);
      return Status::Unavailable(std::string("io_uring NOP round trip failed: ") +
                                 std::strerror(-rc));
    }
    io_uring_cqe_seen(&ring_, cqe);
    initialized_ = true;
    completer_ = std::thread([this] { CompletionLoop(); });
    return Status::OK();
  }

  IoBackendKind kind() const override { return IoBackendKind::kIoUring; }

  void Submit(IoRequest* const* requests, size_t n) override {
    MutexLock lk(&mu_);
    bool wake = false;
    for (size_t i = 0; i < n; ++i) {
      IoRequest* r = requests[i];
      BeginProgress(r);
      pending_.push_back(r);
      deadlines_.emplace(r->deadline_ns, r);
      ++live_;
      ++stats_.submitted;
      wake |= r->deadline_ns < wait_until_;
    }
    FillAndSubmitLocked();
    if (wake) PostLocked(kWakeTag);
  }

  Status Shutdown(int64_t deadline_ns) override {
    MutexLock lk(&mu_);
    if (shut_down_) return shutdown_status_;
    shut_down_ = true;
    bool drained = idle_cv_.WaitUntil(lk, TimePoint(deadline_ns),
                                      [&]() REQUIRES_LOCK(mu_) { return live_ == 0; });
    size_t left = live_;
    stop_loop_ = true;
    PostLocked(kWakeTag);
    lk.Unlock();
    completer_.join();
    // The ring's teardown runs asynchronously in the kernel and holds the registered file until
    // it ends; unregister it now so the file is closed (and its flock dropped) when its owner
    // closes it.
    if (fixed_file_ && drained) (void)io_uring_unregister_files(&ring_);
    // Requests still in the kernel are cancelled or waited for by the kernel's ring teardown; the
    // pages they use stay pinned by the kernel. Their owners leak them (see Shutdown's contract).
    io_uring_queue_exit(&ring_);
    shutdown_status_ =
        drained ? Status::OK()
                : Status::DeadlineExceeded(std::to_string(left) +
                                           " io_uring requests were unfinished at shutdown");
    return shutdown_status_;
  }

  IoBackendStats stats() const override {
    MutexLock lk(&mu_);
    return stats_;
  }

 private:
  struct Action {
    IoRequest* r;
    bool deliver;  // call OnIoDone(status), then release if the OS is done
    Status status;
  };

  static std::chrono::steady_clock::time_point TimePoint(int64_t ns) {
    return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
  }

  // Queues a NOP or cancel SQE and submits it.
  void PostLocked(uint64_t user_data, IoRequest* cancel_target = nullptr) REQUIRES_LOCK(mu_) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {  // SQ full of unsubmitted entries: push them out first
      SubmitLocked();
      sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) return;  // the completion thread wakes by its own timeout instead
    }
    if (cancel_target != nullptr) {
      io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(cancel_target), 0);
      ++cancels_in_kernel_;
      ++stats_.cancels;
    } else {
      io_uring_prep_nop(sqe);
    }
    io_uring_sqe_set_data64(sqe, user_data);
    SubmitLocked();
  }

  void SubmitLocked() REQUIRES_LOCK(mu_) {
    for (int attempt = 0; attempt < 3; ++attempt) {
      int rc = io_uring_submit(&ring_);
      if (rc >= 0 || (rc != -EINTR && rc != -EAGAIN)) break;
      // -EBUSY and others: SQEs stay in the ring and go out with the next submit; requests that
      // never make it fail at their deadline.
    }
  }

  // Moves pending requests into SQEs while the queue depth allows, then submits them together.
  void FillAndSubmitLocked() REQUIRES_LOCK(mu_) {
    unsigned prepared = 0;
    while (in_kernel_ < queue_depth_ && !pending_.empty()) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) break;
      IoRequest* r = pending_.front();
      pending_.pop_front();
      IoRequest::Progress& p = r->progress;
      if (r->op == IoOp::kRead) {
        io_uring_prep_readv(sqe, file_, p.iov, static_cast<unsigned>(p.iovcnt), p.offset);
      } else {
        io_uring_prep_writev(sqe, file_, p.iov, static_cast<unsigned>(p.iovcnt), p.offset);
      }
      if (fixed_file_) sqe->flags |= IOSQE_FIXED_FILE;
      io_uring_sqe_set_data64(sqe, reinterpret_cast<uint64_t>(r));
      p.in_os = true;
      ++in_kernel_;
      ++prepared;
    }
    if (prepared > 0) SubmitLocked();
  }

  void DeliverLocked(IoRequest* r, Status status, std::vector<Action>* actions) REQUIRES_LOCK(mu_) {
    r->progress.delivered = true;
    deadlines_.erase({r->deadline_ns, r});
    actions->push_back({r, true, std::move(status)});
  }

  // An abandoned request whose OS side just ended: release it if OnIoDone already returned.
  void MaybeReleaseLocked(IoRequest* r, std::vector<Action>* actions) REQUIRES_LOCK(mu_) {
    IoRequest::Progress& p = r->progress;
    if (p.done_returned && p.os_done && !p.released) {
      p.released = true;
      actions->push_back({r, false, Status()});
    }
  }

  void HandleCqeLocked(uint64_t user_data, int res, std::vector<Action>* actions)
      REQUIRES_LOCK(mu_) {
    if (user_data == kWakeTag) return;
    if (user_data & kCancelBit) {
      --cancels_in_kernel_;
      return;
    }
    IoRequest* r = reinterpret_cast<IoRequest*>(user_data);
    IoRequest::Progress& p = r->progress;
    p.in_os = false;
    --in_kernel_;
    if (injector_) res = injector_(r->op, p.offset, p.remaining, res);
    if (res == kIoFaultLoseCompletion || p.delivered) {
      // Lost (the deadline will deliver), or abandoned at its deadline already.
      p.os_done = true;
      MaybeReleaseLocked(r, actions);
      return;
    }
    Status error;
    switch (ApplyIoResult(r, res, &error)) {
      case IoStep::kResubmit:
        ++stats_.resubmits;
        pending_.push_front(r);
        return;
      case IoStep::kFinished:
        p.os_done = true;
        DeliverLocked(r, Status::OK(), actions);
        return;
      case IoStep::kFailed:
        p.os_done = true;
        DeliverLocked(r, std::move(error), actions);
        return;
    }
  }

  void ExpireLocked(int64_t now, std::vector<Action>* actions) REQUIRES_LOCK(mu_) {
    while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
      IoRequest* r = deadlines_.begin()->second;
      IoRequest::Progress& p = r->progress;
      if (p.in_os) {
        PostLocked(reinterpret_cast<uint64_t>(r) | kCancelBit, r);
      } else if (!p.os_done) {  // waiting in pending_ (first submission or a resubmit)
        pending_.erase(std::find(pending_.begin(), pending_.end(), r));
        p.os_done = true;
      }
      ++stats_.deadline_exceeded;
      DeliverLocked(r,
                    Status::DeadlineExceeded(
                        (r->op == IoOp::kRead ? "read" : "write") + std::string(" at offset ") +
                        std::to_string(r->offset) + " passed its deadline (io_uring)"),
                    actions);
    }
  }

  void RunActions(std::vector<Action>* actions) EXCLUDES(mu_) {
    for (Action& a : *actions) {
      IoRequest* r = a.r;
      bool release = !a.deliver;
      if (a.deliver) {
        r->completion->OnIoDone(a.status);
        MutexLock lk(&mu_);
        IoRequest::Progress& p = r->progress;
        p.done_returned = true;
        if (p.os_done && !p.released) {
          p.released = true;
          release = true;
        }
      }
      if (release) {
        r->completion->OnIoReleased();  // r may be freed from here on
        MutexLock lk(&mu_);
        if (--live_ == 0) idle_cv_.NotifyAll();
      }
    }
    actions->clear();
  }

  void CompletionLoop() {
    std::vector<Action> actions;
    io_uring_cqe* cqes[64];
    while (true) {
      int64_t wake_at;
      {
        MutexLock lk(&mu_);
        if (stop_loop_) break;
        wake_at = deadlines_.empty() ? MonotonicNowNs() + kIdleWaitNs : deadlines_.begin()->first;
        wait_until_ = wake_at;
      }
      int64_t wait_ns = std::max<int64_t>(0, wake_at - MonotonicNowNs());
      __kernel_timespec ts{wait_ns / 1'000'000'000, wait_ns % 1'000'000'000};
      io_uring_cqe* cqe = nullptr;
      (void)io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);  // -ETIME and -EINTR just loop
      {
        MutexLock lk(&mu_);
        wait_until_ = INT64_MIN;  // awake: submitters need not wake us
        unsigned n;
        while ((n = io_uring_peek_batch_cqe(&ring_, cqes, 64)) > 0) {
          for (unsigned i = 0; i < n; ++i)
            HandleCqeLocked(cqes[i]->user_data, cqes[i]->res, &actions);
          io_uring_cq_advance(&ring_, n);
        }
        ExpireLocked(MonotonicNowNs(), &actions);
        FillAndSubmitLocked();
      }
      RunActions(&actions);
    }
  }

  const unsigned queue_depth_;
  const IoFaultInjector injector_;
  io_uring ring_{};
  int file_ = -1;
  bool fixed_file_ = false;
  bool initialized_ = false;
  std::thread completer_;

  mutable Mutex mu_;
  CondVar idle_cv_;
  std::deque<IoRequest*> pending_ GUARDED_BY(mu_);  // waiting for room in the queue depth
  // Requests not yet delivered, by deadline (pending, in the kernel, or lost by fault injection).
  std::set<std::pair<int64_t, IoRequest*>> deadlines_ GUARDED_BY(mu_);
  unsigned in_kernel_ GUARDED_BY(mu_) = 0;
  unsigned cancels_in_kernel_ GUARDED_BY(mu_) = 0;
  size_t live_ GUARDED_BY(mu_) = 0;  // submitted and not yet released
  // When the completion thread will wake by itself; INT64_MIN while it is awake.
  int64_t wait_until_ GUARDED_BY(mu_) = INT64_MIN;
  bool stop_loop_ GUARDED_BY(mu_) = false;
  bool shut_down_ GUARDED_BY(mu_) = false;
  Status shutdown_status_;
  IoBackendStats stats_ GUARDED_BY(mu_);
};

}  // namespace

StatusOr<std::unique_ptr<IoBackend>> CreateUringBackend(int fd, const IoBackendOptions& options) {
  auto backend = std::make_unique<UringBackend>(options);
  KVTIER_RETURN_IF_ERROR(backend->Init(fd));
  return std::unique_ptr<IoBackend>(std::move(backend));
}

#else  // !KVTIER_HAVE_LIBURING

StatusOr<std::unique_ptr<IoBackend>> CreateUringBackend(int, const IoBackendOptions&) {
  return Status::Unavailable("kvtier was built without liburing (POSIX backend only)");
}

#endif

}  // namespace kvtier
