// Python view of the transfer layer (filled in as it lands).
#include <pybind11/pybind11.h>

#include "bindings/status_binding.h"

namespace py = pybind11;

namespace kvtier::bindings {

void BindTransfer(py::module_& m) { (void)m; }

}  // namespace kvtier::bindings
