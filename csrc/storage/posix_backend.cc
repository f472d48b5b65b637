// POSIX backend: worker threads take requests from one FIFO and run preadv/pwritev until every
// byte has moved; a watchdog thread fails requests at their deadline. A worker blocked in a
// syscall cannot be interrupted, so a request abandoned at its deadline is released only when
// its syscall returns.
//
// The state the threads share lives in a shared_ptr: if Shutdown gives up on a hung syscall, the
// worker is detached and keeps its own reference, so nothing it touches is freed under it.
#include "storage/posix_backend.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"

namespace kvtier {
namespace {

std::chrono::steady_clock::time_point TimePoint(int64_t ns) {
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

struct PosixShared {
  explicit PosixShared(int fd_in, IoFaultInjector injector_in)
      : fd(fd_in), injector(std::move(injector_in)) {}

  const int fd;
  const IoFaultInjector injector;

  Mutex mu;
  CondVar work_cv;   // pending_ gained a request, or stopping
  CondVar watch_cv;  // an earlier deadline arrived, or stopping
  CondVar idle_cv;   // live reached 0
  std::deque<IoRequest*> pending GUARDED_BY(mu);
  std::set<std::pair<int64_t, IoRequest*>> deadlines GUARDED_BY(mu);  // not yet delivered
  size_t live GUARDED_BY(mu) = 0;                                     // submitted, not released
  bool stopping GUARDED_BY(mu) = false;
  bool abandon GUARDED_BY(mu) = false;  // Shutdown gave up: forget every request from now on
  // Callbacks executing right now; a Shutdown that gives up waits for them to return, and no
  // callback starts once `abandon` is set, so none runs after Shutdown returns.
  int callbacks_running GUARDED_BY(mu) = 0;
  IoBackendStats stats GUARDED_BY(mu);

  // After OnIoDone returned: release if the OS side is over. Called and returns with `lk` held.
  // Claims and runs OnIoDone. Called and returns with `lk` held; false if abandoned.
  bool Deliver(IoRequest* r, const Status& status, MutexLock& lk) REQUIRES_LOCK(mu) {
    if (abandon) return false;
    ++callbacks_running;
    lk.RunUnlocked([&] { r->completion->OnIoDone(status); });
    --callbacks_running;
    if (callbacks_running == 0) idle_cv.NotifyAll();
    r->progress.done_returned = true;
    ReleaseIfDone(r, lk);
    return true;
  }

  void ReleaseIfDone(IoRequest* r, MutexLock& lk) REQUIRES_LOCK(mu) {
    IoRequest::Progress& p = r->progress;
    if (abandon || !(p.done_returned && p.os_done && !p.released)) return;
    p.released = true;
    ++callbacks_running;
    lk.RunUnlocked([&] { r->completion->OnIoReleased(); });  // r may be freed from here on
    --callbacks_running;
    --live;
    idle_cv.NotifyAll();
  }
};

// Runs one request's syscalls to the end. Returns false if the completion was "lost" (fault
// injection); otherwise `*status` is the outcome.
bool RunRequest(PosixShared* s, IoRequest* r, Status* status) {
  IoRequest::Progress& p = r->progress;
  for (;;) {
    ssize_t n = r->op == IoOp::kRead
                    ? preadv(s->fd, p.iov, p.iovcnt, static_cast<off_t>(p.offset))
                    : pwritev(s->fd, p.iov, p.iovcnt, static_cast<off_t>(p.offset));
    long res = n < 0 ? -static_cast<long>(errno) : static_cast<long>(n);
    if (s->injector) {
      int injected = s->injector(r->op, p.offset, p.remaining, static_cast<int>(res));
      if (injected == kIoFaultLoseCompletion) return false;
      res = injected;
    }
    switch (ApplyIoResult(r, res, status)) {
      case IoStep::kFinished:
        *status = Status::OK();
        return true;
      case IoStep::kFailed:
        return true;
      case IoStep::kResubmit: {
        MutexLock lk(&s->mu);
        ++s->stats.resubmits;
        if (p.delivered) {  // abandoned at its deadline meanwhile: stop moving bytes
          *status = Status::DeadlineExceeded("abandoned");
          return true;
        }
        break;
      }
    }
  }
}

void WorkerLoop(std::shared_ptr<PosixShared> s) {
  MutexLock lk(&s->mu);
  for (;;) {
    s->work_cv.Wait(lk, [&]() REQUIRES_LOCK(s->mu) {
      return s->stopping || s->abandon || !s->pending.empty();
    });
    if (s->abandon || s->pending.empty()) return;  // stopping with nothing left, or given up
    IoRequest* r = s->pending.front();
    s->pending.pop_front();
    IoRequest::Progress& p = r->progress;
    p.in_os = true;
    lk.Unlock();
    Status status;
    bool answered = RunRequest(s.get(), r, &status);
    lk.Lock();
    if (s->abandon) return;  // Shutdown forgot r; its owner leaks it
    p.in_os = false;
    p.os_done = true;
    if (answered && !p.delivered) {
      p.delivered = true;
      s->deadlines.erase({r->deadline_ns, r});
      if (!s->Deliver(r, status, lk)) return;
    } else {
      s->ReleaseIfDone(r, lk);  // delivered by the watchdog already (or it will be)
    }
  }
}

void WatchdogLoop(std::shared_ptr<PosixShared> s) {
  MutexLock lk(&s->mu);
  for (;;) {
    if (s->stopping) return;
    if (s->deadlines.empty()) {
      s->watch_cv.Wait(lk);
    } else {
      s->watch_cv.WaitUntil(lk, TimePoint(s->deadlines.begin()->first));
    }
    if (s->stopping) return;
    int64_t now = MonotonicNowNs();
    std::vector<IoRequest*> expired;
    while (!s->deadlines.empty() && s->deadlines.begin()->first <= now) {
      IoRequest* r = s->deadlines.begin()->second;
      s->deadlines.erase(s->deadlines.begin());
      IoRequest::Progress& p = r->progress;
      p.delivered = true;
      if (!p.in_os && !p.os_done) {  // never started: no syscall will touch it
        s->pending.erase(std::find(s->pending.begin(), s->pending.end(), r));
        p.os_done = true;
      }
      ++s->stats.deadline_exceeded;
      expired.push_back(r);
    }
    for (IoRequest* r : expired) {
      Status status = Status::DeadlineExceeded(
          std::string(r->op == IoOp::kRead ? "read" : "write") + " at offset " +
          std::to_string(r->offset) + " passed its deadline (posix)");
      if (!s->Deliver(r, status, lk)) return;
    }
  }
}

class PosixBackend final : public IoBackend {
 public:
  PosixBackend(int fd, const IoBackendOptions& options)
      : s_(std::make_shared<PosixShared>(fd, options.fault_injector)) {
    for (unsigned i = 0; i < options.posix_threads; ++i) workers_.emplace_back(WorkerLoop, s_);
    watchdog_ = std::thread(WatchdogLoop, s_);
  }

  ~PosixBackend() override { (void)Shutdown(MonotonicNowNs()); }

  IoBackendKind kind() const override { return IoBackendKind::kPosix; }

  void Submit(IoRequest* const* requests, size_t n) override {
    MutexLock lk(&s_->mu);
    bool earlier = false;
    for (size_t i = 0; i < n; ++i) {
      IoRequest* r = requests[i];
      BeginProgress(r);
      earlier |= s_->deadlines.empty() || r->deadline_ns < s_->deadlines.begin()->first;
      s_->pending.push_back(r);
      s_->deadlines.emplace(r->deadline_ns, r);
      ++s_->live;
      ++s_->stats.submitted;
    }
    if (n == 1) {
      s_->work_cv.NotifyOne();
    } else {
      s_->work_cv.NotifyAll();
    }
    if (earlier) s_->watch_cv.NotifyOne();
  }

  Status Shutdown(int64_t deadline_ns) override {
    MutexLock lk(&s_->mu);
    if (shut_down_) return shutdown_status_;
    shut_down_ = true;
    bool drained = s_->idle_cv.WaitUntil(lk, TimePoint(deadline_ns),
                                         [&]() REQUIRES_LOCK(s_->mu) { return s_->live == 0; });
    size_t left = s_->live;
    s_->stopping = true;
    if (!drained) s_->abandon = true;
    s_->work_cv.NotifyAll();
    s_->watch_cv.NotifyAll();
    // Callbacks already running finish (they are short); none starts after this.
    s_->idle_cv.Wait(lk, [&]() REQUIRES_LOCK(s_->mu) { return s_->callbacks_running == 0; });
    lk.Unlock();
    watchdog_.join();
    for (std::thread& t : workers_) {
      if (drained) {
        t.join();
      } else {
        t.detach();  // may be stuck in a syscall; it holds its own reference to s_
      }
    }
    shutdown_status_ =
        drained ? Status::OK()
                : Status::DeadlineExceeded(std::to_string(left) +
                                           " POSIX requests were unfinished at shutdown");
    return shutdown_status_;
  }

  IoBackendStats stats() const override {
    MutexLock lk(&s_->mu);
    return s_->stats;
  }

 private:
  std::shared_ptr<PosixShared> s_;
  std::vector<std::thread> workers_;
  std::thread watchdog_;
  bool shut_down_ = false;
  Status shutdown_status_;
};

}  // namespace

StatusOr<std::unique_ptr<IoBackend>> CreatePosixBackend(int fd, const IoBackendOptions& options) {
  if (options.posix_threads == 0)
    return Status::InvalidArgument("posix_threads must be at least 1");
  return std::unique_ptr<IoBackend>(std::make_unique<PosixBackend>(fd, options));
}

}  // namespace kvtier
