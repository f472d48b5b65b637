// The CUDA path of the copy engine: KV in GPU memory, blobs in (pinned) host memory, bytes moved on
// the engine's own streams by direct DMA, staged DMA or a zero-copy kernel. Internal to
// csrc/transfer; callers use CopyEngine::Create.
#pragma once

#include <memory>

#include "common/status.h"
#include "transfer/copy_engine.h"
#include "transfer/layout_plan.h"

namespace kvtier {

// Unavailable in a build without CUDA or on a machine without a usable GPU.
// REQUIRES: plan.layout.device >= 0; options.method != kCpu.
StatusOr<std::unique_ptr<CopyEngine>> CreateCudaCopyEngine(LayoutPlan plan,
                                                           const CopyEngineOptions& options);

// The method kAuto picks for a GPU layout: direct when every page is at least kDirectMinPageBytes
// (large contiguous pages: a handful of big DMAs), else staged when the staging area holds a page,
// else zero-copy.
constexpr uint64_t kDirectMinPageBytes = uint64_t{256} << 10;
TransferMethod ResolveAutoMethod(const LayoutPlan& plan, uint64_t staging_bytes);

}  // namespace kvtier
