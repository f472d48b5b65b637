// Turning core Status values into typed Python exceptions (classes in kvtier.errors).
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>

#include "common/status.h"

namespace kvtier::bindings {

// Thrown by ThrowIfError; translated to the kvtier.errors class of its code.
class StatusError : public std::runtime_error {
 public:
  explicit StatusError(Status status)
      : std::runtime_error(status.message()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

inline void ThrowIfError(const Status& status) {
  if (!status.ok()) throw StatusError(status);
}

template <typename T>
T ValueOrThrow(StatusOr<T>&& v) {
  if (!v.ok()) throw StatusError(v.status());
  return std::move(v).value();
}

void RegisterStatusTranslator(pybind11::module_& m);

// One function per subsystem, each in its own file, called by module.cc.
void BindInfo(pybind11::module_& m);
void BindMemory(pybind11::module_& m);
void BindTransfer(pybind11::module_& m);
void BindCache(pybind11::module_& m);
void BindStorage(pybind11::module_& m);
void BindCodec(pybind11::module_& m);

}  // namespace kvtier::bindings
