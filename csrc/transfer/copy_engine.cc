// CopyEngine::Create: validates the layout and options, then builds the CPU or the CUDA engine.
#include "transfer/copy_engine.h"

#include <string>
#include <utility>

#include "transfer/cpu_copy_engine.h"
#include "transfer/cuda_copy_engine.h"
#include "transfer/layout_plan.h"

namespace kvtier {

StatusOr<std::unique_ptr<CopyEngine>> CopyEngine::Create(const LayoutDesc& layout,
                                                         const CopyEngineOptions& options) {
  auto plan = MakeLayoutPlan(layout);
  if (!plan.ok()) return plan.status();
  const int method = static_cast<int>(options.method);
  if (method < static_cast<int>(TransferMethod::kAuto) ||
      method > static_cast<int>(TransferMethod::kCpu)) {
    return Status::InvalidArgument("unknown transfer method " + std::to_string(method));
  }
  if (layout.device == -1) {
    if (options.method != TransferMethod::kAuto && options.method != TransferMethod::kCpu) {
      return Status::InvalidArgument(
          std::string("method '") + TransferMethodName(options.method) +
          "' needs KV on a GPU (device >= 0); host-memory layouts use 'cpu'");
    }
    if (options.cpu_threads < 1 || options.cpu_threads > 256) {
      return Status::InvalidArgument("cpu_threads must be in [1, 256], got " +
                                     std::to_string(options.cpu_threads));
    }
    return CreateCpuCopyEngine(std::move(plan).value(), options);
  }
  if (options.method == TransferMethod::kCpu) {
    return Status::InvalidArgument(
        "method 'cpu' needs KV in host memory (device == -1), got device " +
        std::to_string(layout.device));
  }
  return CreateCudaCopyEngine(std::move(plan).value(), options);
}

}  // namespace kvtier
