// The host pass of fp8_rows for the baseline instruction set, and the choice between it and the
// AVX2 build (fp8_rows_host_avx2.cc) where the CPU has AVX2: both give the same bytes.
#include "codec/fp8_rows_host.h"

#include "codec/fp8_rows_host_impl.h"

namespace kvtier {

#if KVTIER_HOST_AVX2
void Fp8EncodeRowsHostAvx2(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok);
void Fp8DecodeRowsHostAvx2(const Fp8Rows& rows, const void* blobs, void* raw);
#endif

namespace {

bool UseAvx2(Fp8HostIsa isa) {
#if KVTIER_HOST_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return isa == Fp8HostIsa::kAuto && has_avx2;
#else
  (void)isa;
  return false;
#endif
}

}  // namespace

const char* Fp8HostIsaName() { return UseAvx2(Fp8HostIsa::kAuto) ? "avx2" : "portable"; }

void Fp8EncodeRowsHost(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok) {
#if KVTIER_HOST_AVX2
  if (UseAvx2(rows.host_isa)) return Fp8EncodeRowsHostAvx2(rows, raw, blobs, ok);
#endif
  EncodeRows(rows, raw, blobs, ok);
}

void Fp8DecodeRowsHost(const Fp8Rows& rows, const void* blobs, void* raw) {
#if KVTIER_HOST_AVX2
  if (UseAvx2(rows.host_isa)) return Fp8DecodeRowsHostAvx2(rows, blobs, raw);
#endif
  DecodeRows(rows, blobs, raw);
}

}  // namespace kvtier
