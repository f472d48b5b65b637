// Python view of csrc/storage (filled in as the disk store lands).
#include <pybind11/pybind11.h>

#include "bindings/status_binding.h"

namespace py = pybind11;

namespace kvtier::bindings {

void BindStorage(py::module_& m) { (void)m; }

}  // namespace kvtier::bindings
