// The on-disk format of a disk-store cache file: a file header block, then fixed-size slots of
// one header block + the payload (a chunk's blob) rounded up to whole blocks.
//
//   offset 0                 file header (4 KiB): geometry, what the file is for, and its epoch
//   offset 4096 + i * slot   slot i: slot header (4 KiB) | payload (blob_bytes, padded to 4 KiB)
//
// Every field is little-endian. Both headers end with a CRC32C of the bytes before it, and the
// slot header carries the payload's CRC32C, so recovery and reads can tell a complete slot from
// a torn, stale or foreign one. An all-zero slot header means "empty" (never written, or erased).
//
// Thread safety: pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "index/chunk_key.h"

namespace kvtier {

// Header size, and the alignment O_DIRECT needs for offsets, lengths and buffers.
constexpr uint64_t kDiskBlockBytes = 4096;
constexpr uint32_t kDiskFormatVersion = 1;

using LayoutFingerprint = std::array<uint8_t, 16>;

inline uint64_t RoundUpToBlock(uint64_t n) {
  return (n + kDiskBlockBytes - 1) / kDiskBlockBytes * kDiskBlockBytes;
}
// Bytes one slot takes on disk for blobs of `blob_bytes`.
inline uint64_t SlotBytesFor(uint64_t blob_bytes) {
  return kDiskBlockBytes + RoundUpToBlock(blob_bytes);
}
// Offset of slot `slot` in the file.
inline uint64_t SlotOffset(uint64_t slot, uint64_t slot_bytes) {
  return kDiskBlockBytes + slot * slot_bytes;
}

// Longest DiskStoreOptions::geometry_label the file header records.
constexpr size_t kMaxGeometryLabelBytes = 1024;

struct FileHeader {
  uint64_t slot_bytes = 0;
  uint64_t blob_bytes = 0;
  uint64_t num_slots = 0;
  // Random at format time; slot headers carry it, so a slot written under an older format of
  // the file (other geometry) can never be mistaken for a current one.
  uint64_t epoch = 0;
  // What the file's chunks are for, checked at every Open. A file written before these fields
  // existed has none (has_geometry false): its layout is then known only from its slots.
  bool has_geometry = false;
  LayoutFingerprint layout_fingerprint{};
  std::string geometry_label;  // at most kMaxGeometryLabelBytes (longer is cut)
};

// Writes the header into a zero-filled 4 KiB block.
void EncodeFileHeader(const FileHeader& header, void* block);
// Corruption (with the reason) if magic, size or a CRC do not match; GeometryMismatch if the
// file is of another format version (written by another kvtier: it is not this build's to wipe).
Status DecodeFileHeader(const void* block, FileHeader* header);

struct SlotHeader {
  ChunkKey key;
  LayoutFingerprint layout_fingerprint{};
  uint64_t epoch = 0;
  // Store-wide write counter: the newer of two slots with one key wins at recovery, and
  // recovery restores LRU order from it.
  uint64_t sequence = 0;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;
};

// Writes the header into a zero-filled 4 KiB block (the whole block is overwritten).
void EncodeSlotHeader(const SlotHeader& header, void* block);

enum class SlotHeaderCheck {
  kValid,    // magic, version, size and header CRC are right (the caller checks the rest)
  kEmpty,    // all-zero magic: never written or erased
  kCorrupt,  // anything else: torn, overwritten or foreign bytes
};
// Decodes a 4 KiB slot header block. For kCorrupt, `why` (if given) says what failed.
SlotHeaderCheck DecodeSlotHeader(const void* block, SlotHeader* header, std::string* why = nullptr);

}  // namespace kvtier
