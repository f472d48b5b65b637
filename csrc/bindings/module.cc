// kvtier._core: the private pybind11 module. Only exports; each subsystem binds in its own file.
#include <pybind11/pybind11.h>

#include "bindings/status_binding.h"

namespace py = pybind11;

namespace kvtier::bindings {

void RegisterStatusTranslator(py::module_& m) {
  (void)m;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      // The exception classes live in Python so users can import and catch them without _core.
      py::object errors = py::module_::import("kvtier.errors");
      py::object cls = errors.attr("error_for_code")(static_cast<int>(e.status().code()));
      PyErr_SetObject(cls.ptr(), py::str(e.status().message()).ptr());
    }
  });
}

}  // namespace kvtier::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvtier C++/CUDA core (private; use the kvtier package)";
  kvtier::bindings::RegisterStatusTranslator(m);
  kvtier::bindings::BindInfo(m);
  kvtier::bindings::BindMemory(m);
  kvtier::bindings::BindTransfer(m);
  kvtier::bindings::BindCache(m);
  kvtier::bindings::BindStorage(m);
  kvtier::bindings::BindCodec(m);
}
