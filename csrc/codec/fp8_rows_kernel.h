// Launchers of the fp8 row kernels (see fp8_rows.h). Only included where KVTIER_HAVE_CUDA is 1:
// arguments checked by the caller, the launch's error out.
#pragma once

#include <cuda_runtime_api.h>

#include "codec/fp8_rows.h"

namespace kvtier {

cudaError_t LaunchFp8Encode(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok,
                            cudaStream_t stream);
cudaError_t LaunchFp8Decode(const Fp8Rows& rows, const void* blobs, void* raw, cudaStream_t stream);

}  // namespace kvtier
