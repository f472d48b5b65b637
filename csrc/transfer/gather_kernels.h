// Launchers for the page gather/scatter kernel of the staged and zero-copy methods. They know no
// framework: they take device pointers and a cudaStream_t and return the launch's cudaError_t.
// Only included where KVTIER_HAVE_CUDA is 1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvtier {

// One segment of the layout, as the kernel reads it (uploaded once when the engine is created).
struct SegmentDev {
  uint64_t base;         // device address of page 0
  uint64_t page_stride;  // bytes between pages
  uint64_t page_bytes;   // contiguous bytes of one page
};

// A run of pages of one segment of one chunk that sits contiguously on the "other" side (the
// staging slot or the mapped blob): page first_page + j of the chunk is at
// other_base + other + j * page_bytes, and its page id is page_ids[page_index + j].
struct SlabDev {
  uint64_t other;
  uint32_t seg;
  uint32_t
      page_index;  // index into the transfer's page-id array (chunk * pages_per_chunk + first page)
  uint32_t num_pages;
  uint32_t reserved;
};

struct PageCopyParams {
  const SegmentDev* segments;
  const SlabDev* slabs;      // this launch's slabs
  const uint32_t* page_ids;  // the transfer's page ids, chunk-major
  uint64_t other_base;       // added to every SlabDev::other (staging slot address, or 0)
  uint32_t num_slabs;
  uint32_t max_pages_per_slab;  // the largest num_pages among this launch's slabs
  uint32_t pieces_per_page;     // ceil(largest page_bytes / kPageCopyPieceBytes)
  int to_pages;                 // 1: other -> pages (scatter); 0: pages -> other (gather)
};

// A warp copies one piece of a page at a time; a block is kPageCopyThreads threads.
constexpr uint32_t kPageCopyPieceBytes = 8192;
constexpr int kPageCopyThreads = 256;

// Copies every page of p's slabs, with at most `max_blocks` blocks (a modest grid keeps SMs free
// for the model). 16-byte vector loads/stores where pointers are aligned, else 4-byte or bytes.
cudaError_t LaunchPageCopy(const PageCopyParams& p, int max_blocks, cudaStream_t stream);

}  // namespace kvtier
