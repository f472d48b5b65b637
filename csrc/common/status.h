// Status / StatusOr<T>: how every fallible operation in the C++ core reports its outcome.
// The core never throws; only csrc/bindings turns a non-OK Status into a typed Python exception.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>

namespace kvtier {

// Keep in step with python/kvtier/errors.py (the exception class for each code).
enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,    // the caller passed something wrong; nothing changed
  kNotFound = 2,           // no such key / block / file
  kAlreadyExists = 3,      // the thing is there already
  kResourceExhausted = 4,  // out of blocks, bytes, slots or queue entries
  kFailedPrecondition =
      5,                  // the object is not in a state that allows the call (double free, pinned)
  kInProgress = 6,        // asynchronous work has started and is not finished yet
  kDeadlineExceeded = 7,  // a wait ran out of time
  kIoError = 8,           // the OS or a device failed an operation
  kCorruption = 9,        // bytes failed a checksum, magic or fingerprint check
  kUnavailable = 10,      // the feature or device is absent here (no GPU, no io_uring)
  kInternal = 11,         // a bug in kvtier
  kGeometryMismatch = 12,  // persistent data of another geometry (chunk size, layout) is in
                           // the way; nothing was changed (a kind of failed precondition)
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string m) {
    return {StatusCode::kInvalidArgument, std::move(m)};
  }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status ResourceExhausted(std::string m) {
    return {StatusCode::kResourceExhausted, std::move(m)};
  }
  static Status FailedPrecondition(std::string m) {
    return {StatusCode::kFailedPrecondition, std::move(m)};
  }
  static Status InProgress(std::string m) { return {StatusCode::kInProgress, std::move(m)}; }
  static Status DeadlineExceeded(std::string m) {
    return {StatusCode::kDeadlineExceeded, std::move(m)};
  }
  static Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
  static Status GeometryMismatch(std::string m) {
    return {StatusCode::kGeometryMismatch, std::move(m)};
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "InvalidArgument: block id 70 is out of range [0, 64)"
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// A value or the Status saying why there is none.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) { assert(!status_.ok()); }  // NOLINT
  StatusOr(T value) : value_(std::move(value)) {}                                  // NOLINT

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  // REQUIRES: ok()
  T& value() & {
    assert(ok());
    return *value_;
  }
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  T& operator*() & { return value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace kvtier

#define KVTIER_RETURN_IF_ERROR(expr)       \
  do {                                     \
    ::kvtier::Status _kvtier_s = (expr);   \
    if (!_kvtier_s.ok()) return _kvtier_s; \
  } while (0)
