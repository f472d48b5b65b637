// CRC32C (Castagnoli): the checksum of every slot header and payload the disk store writes.
//
// Uses the SSE4.2 crc32 instruction (three interleaved streams, combined with precomputed
// shift tables) when the CPU has it, checked once at run time with cpuid; otherwise a
// table-driven software version (slicing by 8). Both give the same values (tests check them
// against each other and against the RFC 3720 vectors).
//
// Thread safety: all functions are pure and may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvtier {

// CRC32C of `len` bytes at `data`, continuing from `crc` (pass 0 to start). Chaining works:
// Crc32c(Crc32c(0, a, n), b, m) == Crc32c of a's n bytes followed by b's m bytes.
uint32_t Crc32c(uint32_t crc, const void* data, size_t len);

// The same computed without the CPU instruction (what Crc32c uses where SSE4.2 is missing).
uint32_t Crc32cSoftware(uint32_t crc, const void* data, size_t len);

// Whether Crc32c uses the SSE4.2 instruction on this CPU.
bool Crc32cHardwareAvailable();

}  // namespace kvtier
