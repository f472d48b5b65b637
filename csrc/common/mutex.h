// Mutex, MutexLock and CondVar: std::mutex, a scoped lock and std::condition_variable with clang's
// thread-safety annotations, so that GUARDED_BY / REQUIRES_LOCK / EXCLUDES are checked by a clang
// build with -Wthread-safety (scripts/check_thread_safety.sh; libstdc++'s own types carry none).
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "common/thread_annotations.h"

namespace kvtier {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  friend class MutexLock;
  std::mutex mu_;
};

// Holds `mu` for its scope (as std::lock_guard; also std::unique_lock's early Unlock / Lock).
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ACQUIRE(mu) : lock_(mu->mu_) {}
  ~MutexLock() RELEASE() = default;
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void Unlock() RELEASE() { lock_.unlock(); }
  void Lock() ACQUIRE() { lock_.lock(); }

  // Runs f() with the mutex released and holds it again when f returns or throws. For helpers
  // that are called and return with the lock held but drop it around a callback: to the analysis
  // the lock stays held, so f must not touch what the mutex guards.
  template <class F>
  void RunUnlocked(F&& f) {
    lock_.unlock();
    struct Relock {
      std::unique_lock<std::mutex>& l;
      ~Relock() { l.lock(); }
    } relock{lock_};
    f();
  }

 private:
  friend class CondVar;
  std::unique_lock<std::mutex> lock_;
};

// A condition variable waited on under a MutexLock. The analysis treats the lock as held across
// the wait (it is, whenever the caller's code runs).
class CondVar {
 public:
  void NotifyOne() { cv_.notify_one(); }
  void NotifyAll() { cv_.notify_all(); }

  void Wait(MutexLock& lock) { cv_.wait(lock.lock_); }
  template <class Pred>
  void Wait(MutexLock& lock, Pred pred) {
    cv_.wait(lock.lock_, pred);
  }
  // False when the deadline passed first (and pred, if given, is still false).
  template <class Clock, class Duration>
  bool WaitUntil(MutexLock& lock, const std::chrono::time_point<Clock, Duration>& deadline) {
    return cv_.wait_until(lock.lock_, deadline) == std::cv_status::no_timeout;
  }
  template <class Clock, class Duration, class Pred>
  bool WaitUntil(MutexLock& lock, const std::chrono::time_point<Clock, Duration>& deadline,
                 Pred pred) {
    return cv_.wait_until(lock.lock_, deadline, pred);
  }
  template <class Rep, class Period>
  bool WaitFor(MutexLock& lock, const std::chrono::duration<Rep, Period>& timeout) {
    return cv_.wait_for(lock.lock_, timeout) == std::cv_status::no_timeout;
  }
  template <class Rep, class Period, class Pred>
  bool WaitFor(MutexLock& lock, const std::chrono::duration<Rep, Period>& timeout, Pred pred) {
    return cv_.wait_for(lock.lock_, timeout, pred);
  }

 private:
  std::condition_variable cv_;
};

}  // namespace kvtier
