// Build and platform facts for `kvtier info`: CUDA, GPUs, I/O backend, pinned memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/status_binding.h"
#include "common/cuda_runtime.h"
#include "memory/arena.h"
#include "storage/io_probe.h"

namespace py = pybind11;

namespace kvtier::bindings {

void BindInfo(py::module_& m) {
  m.attr("__version__") = KVTIER_VERSION;
  m.attr("CUDA_COMPILED") = CudaCompiled();
  m.attr("CUDA_RUNTIME_VERSION") = CudaRuntimeVersion();
  m.attr("IO_BACKEND_COMPILED") = CompiledIoBackend();

  m.def(
      "list_gpus",
      []() -> py::tuple {
        py::list out;
        auto gpus = ListGpus();
        if (!gpus.ok()) return py::make_tuple(out, gpus.status().message());
        for (const GpuInfo& g : *gpus) {
          py::dict d;
          d["index"] = g.index;
          d["name"] = g.name;
          d["total_memory"] = g.total_memory;
          d["compute_capability"] =
              py::make_tuple(g.compute_capability_major, g.compute_capability_minor);
          d["pci_bus_id"] = g.pci_bus_id;
          out.append(d);
        }
        return py::make_tuple(out, std::string());
      },
      "([gpu dicts], reason-if-none): GPUs usable at run time.");

  m.def(
      "probe_io_uring",
      [] {
        Status s;
        {
          py::gil_scoped_release release;
          s = ProbeIoUring();
        }
        return py::make_tuple(s.ok(), s.message());
      },
      "(works, reason): whether an io_uring ring round-trips a NOP on this kernel.");

  m.def(
      "probe_pinned_memory",
      [] {
        Status s;
        {
          py::gil_scoped_release release;
          s = ProbePinnedMemory();
        }
        return py::make_tuple(s.ok(), s.message());
      },
      "(works, reason): whether pinned host memory can be allocated here.");
}

}  // namespace kvtier::bindings
