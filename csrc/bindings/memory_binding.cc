// Python view of csrc/memory: Arena and BlockAllocator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "bindings/status_binding.h"
#include "memory/arena.h"
#include "memory/block_allocator.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

ArenaKind ParseArenaKind(const std::string& kind) {
  if (kind == "device") return ArenaKind::kDevice;
  if (kind == "pinned_host" || kind == "pinned") return ArenaKind::kPinnedHost;
  if (kind == "host") return ArenaKind::kHost;
  throw StatusError(Status::InvalidArgument(
      "arena kind must be 'device', 'pinned_host' or 'host', got '" + kind + "'"));
}

py::dict StatsDict(const BlockAllocatorStats& s) {
  py::dict d;
  d["num_blocks"] = s.num_blocks;
  d["block_bytes"] = s.block_bytes;
  d["free_blocks"] = s.free_blocks;
  d["used_blocks"] = s.used_blocks;
  d["peak_used_blocks"] = s.peak_used_blocks;
  d["pinned_blocks"] = s.pinned_blocks;
  d["allocations"] = s.allocations;
  d["frees"] = s.frees;
  d["failed_allocations"] = s.failed_allocations;
  return d;
}

// Python ints are wider than BlockId: reject, rather than truncate, ids no allocator can have
// (a plain cast would turn 2**32 into block 0 and free someone else's block).
BlockId ToBlockId(int64_t id) {
  if (id < 0 || id > static_cast<int64_t>(UINT32_MAX)) {
    throw StatusError(
        Status::InvalidArgument("block id " + std::to_string(id) + " is out of range"));
  }
  return static_cast<BlockId>(id);
}

}  // namespace

void BindMemory(py::module_& m) {
  py::class_<Arena, std::shared_ptr<Arena>>(m, "Arena",
                                            "One up-front allocation: device, pinned_host or host.")
      .def(py::init([](const std::string& kind, size_t bytes, int device) {
             ArenaKind k = ParseArenaKind(kind);
             std::unique_ptr<Arena> arena;
             {
               py::gil_scoped_release release;
               arena = ValueOrThrow(Arena::Create(k, bytes, device));
             }
             return std::shared_ptr<Arena>(std::move(arena));
           }),
           py::arg("kind"), py::arg("bytes"), py::arg("device") = 0)
      .def_property_readonly("kind", [](const Arena& a) { return ArenaKindName(a.kind()); })
      .def_property_readonly("requested_kind",
                             [](const Arena& a) { return ArenaKindName(a.requested_kind()); })
      .def_property_readonly("size", &Arena::size)
      .def_property_readonly("device", &Arena::device)
      .def_property_readonly("base_ptr",
                             [](const Arena& a) { return reinterpret_cast<uintptr_t>(a.base()); })
      .def_property_readonly("fallback_reason", &Arena::fallback_reason)
      .def_property_readonly("huge_pages", &Arena::huge_pages)
      .def(
          "memoryview",
          [](std::shared_ptr<Arena> a) {
            if (a->kind() == ArenaKind::kDevice) {
              throw StatusError(Status::InvalidArgument("a device arena has no host memoryview"));
            }
            // A uint8 array whose base owns the arena, so the bytes outlive the Python Arena
            // object.
            auto* keep = new std::shared_ptr<Arena>(a);
            py::capsule owner(keep,
                              [](void* p) { delete static_cast<std::shared_ptr<Arena>*>(p); });
            py::array_t<uint8_t> arr({static_cast<py::ssize_t>(a->size())}, {1},
                                     static_cast<uint8_t*>(a->base()), owner);
            return py::memoryview(arr);
          },
          "Writable memoryview over a host arena; it keeps the arena alive.");

  py::class_<BlockAllocator, std::shared_ptr<BlockAllocator>>(
      m, "BlockAllocator",
      "Fixed-size blocks with O(1) allocate/free and per-block pins (thread-safe).")
      .def(py::init([](size_t num_blocks, size_t block_bytes, std::shared_ptr<Arena> arena) {
             if (num_blocks == 0)
               throw StatusError(Status::InvalidArgument("num_blocks must be > 0"));
             if (num_blocks > UINT32_MAX)
               throw StatusError(Status::InvalidArgument("num_blocks must fit in 32 bits"));
             if (block_bytes == 0)
               throw StatusError(Status::InvalidArgument("block_bytes must be > 0"));
             void* base = nullptr;
             if (arena) {
               if (block_bytes >
                   arena->size() / num_blocks) {  // not num_blocks * block_bytes: it can wrap
                 throw StatusError(Status::InvalidArgument(
                     "num_blocks * block_bytes = " + std::to_string(num_blocks) + " * " +
                     std::to_string(block_bytes) + " exceeds the arena's " +
                     std::to_string(arena->size()) + " bytes"));
               }
               base = arena->base();
             }
             // The allocator keeps the arena alive through the deleter's capture.
             auto* alloc = new BlockAllocator(num_blocks, block_bytes, base);
             return std::shared_ptr<BlockAllocator>(alloc,
                                                    [arena](BlockAllocator* p) { delete p; });
           }),
           py::arg("num_blocks"), py::arg("block_bytes"), py::arg("arena") = nullptr)
      .def("allocate", [](BlockAllocator& a) { return ValueOrThrow(a.Allocate()); })
      .def(
          "allocate_batch",
          [](BlockAllocator& a, size_t n) {
            std::vector<BlockId> out;
            Status s;
            {
              py::gil_scoped_release release;
              s = a.AllocateBatch(n, &out);
            }
            ThrowIfError(s);
            return out;
          },
          py::arg("n"), "n blocks, all or nothing (ResourceExhaustedError leaves nothing taken).")
      .def(
          "free", [](BlockAllocator& a, int64_t id) { ThrowIfError(a.Free(ToBlockId(id))); },
          py::arg("block_id"))
      .def(
          "free_batch",
          [](BlockAllocator& a, const std::vector<int64_t>& ids) {
            std::vector<BlockId> v;
            v.reserve(ids.size());
            for (int64_t id : ids) {
              if (id < 0 || id > UINT32_MAX) {
                throw StatusError(
                    Status::InvalidArgument("block id " + std::to_string(id) + " is out of range"));
              }
              v.push_back(static_cast<BlockId>(id));
            }
            Status s;
            {
              py::gil_scoped_release release;
              s = a.FreeBatch(v);
            }
            ThrowIfError(s);
          },
          py::arg("block_ids"))
      .def(
          "pin", [](BlockAllocator& a, int64_t id) { ThrowIfError(a.Pin(ToBlockId(id))); },
          py::arg("block_id"))
      .def(
          "unpin", [](BlockAllocator& a, int64_t id) { ThrowIfError(a.Unpin(ToBlockId(id))); },
          py::arg("block_id"))
      .def(
          "pin_count",
          [](BlockAllocator& a, int64_t id) { return ValueOrThrow(a.PinCount(ToBlockId(id))); },
          py::arg("block_id"))
      .def(
          "is_allocated",
          [](BlockAllocator& a, int64_t id) {
            return id >= 0 && id <= static_cast<int64_t>(UINT32_MAX) &&
                   a.IsAllocated(static_cast<BlockId>(id));
          },
          py::arg("block_id"))
      .def(
          "block_address",
          [](BlockAllocator& a, int64_t id) {
            if (id < 0 || static_cast<size_t>(id) >= a.num_blocks()) {
              throw StatusError(
                  Status::InvalidArgument("block id " + std::to_string(id) + " is out of range"));
            }
            return reinterpret_cast<uintptr_t>(a.BlockAddress(static_cast<BlockId>(id)));
          },
          py::arg("block_id"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_bytes", &BlockAllocator::block_bytes)
      .def("stats", [](const BlockAllocator& a) { return StatsDict(a.stats()); });
}

}  // namespace kvtier::bindings
