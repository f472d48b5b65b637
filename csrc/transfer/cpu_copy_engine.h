// The CPU path of the copy engine: layouts in host memory, copied by a small persistent pool of
// worker threads. Internal to csrc/transfer; callers use CopyEngine::Create.
#pragma once

#include <memory>

#include "common/status.h"
#include "transfer/copy_engine.h"
#include "transfer/layout_plan.h"

namespace kvtier {

// REQUIRES: plan.layout.device == -1; options.cpu_threads in [1, 256].
StatusOr<std::unique_ptr<CopyEngine>> CreateCpuCopyEngine(LayoutPlan plan,
                                                          const CopyEngineOptions& options);

}  // namespace kvtier
