// The fp8 row coding of fp8_rows.h done on the host, by the calling thread: the bytes and values
// of the GPU kernels and of kvtier.codecs.Fp8Codec's torch path, for CPU memory. Called through
// Fp8EncodeRows / Fp8DecodeRows with device -1, which check the arguments first.
#pragma once

#include <cstdint>

#include "codec/fp8_rows.h"

namespace kvtier {

// REQUIRES: the arguments passed Fp8EncodeRows's checks; raw, blobs and ok in host memory.
// The build that runs is rows.host_isa's.
void Fp8EncodeRowsHost(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok);

// REQUIRES: the arguments passed Fp8DecodeRows's checks; blobs and raw in host memory.
void Fp8DecodeRowsHost(const Fp8Rows& rows, const void* blobs, void* raw);

}  // namespace kvtier
