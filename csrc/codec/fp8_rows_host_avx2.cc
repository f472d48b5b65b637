// The host pass of fp8_rows built with AVX2 (CMake adds -mavx2 to this file alone, on x86-64);
// fp8_rows_host.cc calls it only where the CPU has AVX2.
#include "codec/fp8_rows_host.h"

#if KVTIER_HOST_AVX2
#include "codec/fp8_rows_host_impl.h"

namespace kvtier {

void Fp8EncodeRowsHostAvx2(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok) {
  EncodeRows(rows, raw, blobs, ok);
}

void Fp8DecodeRowsHostAvx2(const Fp8Rows& rows, const void* blobs, void* raw) {
  DecodeRows(rows, blobs, raw);
}

}  // namespace kvtier
#endif
