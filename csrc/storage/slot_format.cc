// Encoding and checking of the disk store's file and slot headers.
#include "storage/slot_format.h"

#include <algorithm>
#include <cstring>

#include "storage/crc32c.h"

namespace kvtier {
namespace {

// Magics as they appear in the file (a hex dump shows "KVTFILE1" / "KVTSLOT1").
constexpr char kFileMagic[8] = {'K', 'V', 'T', 'F', 'I', 'L', 'E', '1'};
constexpr char kSlotMagic[8] = {'K', 'V', 'T', 'S', 'L', 'O', 'T', '1'};
constexpr char kNoMagic[8] = {};
constexpr char kGeometryMagic[8] = {'K', 'V', 'T', 'G', 'E', 'O', 'M', '1'};

// Field offsets. The header CRC covers every byte before it.
constexpr size_t kFileSlotBytes = 16, kFileBlobBytes = 24, kFileNumSlots = 32, kFileEpoch = 40,
                 kFileCrc = 48;
// The geometry record after the first CRC (a file without it has zeros there), with its own CRC
// over [kGeoMagic, kGeoCrc).
constexpr size_t kGeoMagic = 64, kGeoFingerprint = 72, kGeoLabelBytes = 88, kGeoLabel = 92,
                 kGeoCrc = kGeoLabel + kMaxGeometryLabelBytes;
static_assert(kGeoCrc + 4 <= kDiskBlockBytes, "the geometry record fits the file header");
constexpr size_t kSlotKey = 16, kSlotFingerprint = 32, kSlotEpoch = 48, kSlotSequence = 56,
                 kSlotPayloadBytes = 64, kSlotPayloadCrc = 72, kSlotCrc = 76;

void Put32(unsigned char* b, size_t off, uint32_t v) { std::memcpy(b + off, &v, 4); }
void Put64(unsigned char* b, size_t off, uint64_t v) { std::memcpy(b + off, &v, 8); }
uint32_t Get32(const unsigned char* b, size_t off) {
  uint32_t v;
  std::memcpy(&v, b + off, 4);
  return v;
}
uint64_t Get64(const unsigned char* b, size_t off) {
  uint64_t v;
  std::memcpy(&v, b + off, 8);
  return v;
}

void PutCommon(unsigned char* b, const char* magic) {
  std::memcpy(b, magic, 8);
  Put32(b, 8, kDiskFormatVersion);
  Put32(b, 12, static_cast<uint32_t>(kDiskBlockBytes));
}

}  // namespace

void EncodeFileHeader(const FileHeader& h, void* block) {
  auto* b = static_cast<unsigned char*>(block);
  std::memset(b, 0, kDiskBlockBytes);
  PutCommon(b, kFileMagic);
  Put64(b, kFileSlotBytes, h.slot_bytes);
  Put64(b, kFileBlobBytes, h.blob_bytes);
  Put64(b, kFileNumSlots, h.num_slots);
  Put64(b, kFileEpoch, h.epoch);
  Put32(b, kFileCrc, Crc32c(0, b, kFileCrc));
  if (!h.has_geometry) return;
  std::memcpy(b + kGeoMagic, kGeometryMagic, 8);
  std::memcpy(b + kGeoFingerprint, h.layout_fingerprint.data(), 16);
  const size_t label_bytes = std::min(h.geometry_label.size(), kMaxGeometryLabelBytes);
  Put32(b, kGeoLabelBytes, static_cast<uint32_t>(label_bytes));
  std::memcpy(b + kGeoLabel, h.geometry_label.data(), label_bytes);
  Put32(b, kGeoCrc, Crc32c(0, b + kGeoMagic, kGeoCrc - kGeoMagic));
}

Status DecodeFileHeader(const void* block, FileHeader* h) {
  const auto* b = static_cast<const unsigned char*>(block);
  if (std::memcmp(b, kFileMagic, 8) != 0)
    return Status::Corruption("not a kvtier cache file (bad magic)");
  if (Get32(b, kFileCrc) != Crc32c(0, b, kFileCrc))
    return Status::Corruption("file header checksum mismatch");
  if (Get32(b, 8) != kDiskFormatVersion) {
    return Status::GeometryMismatch("cache file format version " + std::to_string(Get32(b, 8)) +
                                    ", this build reads " + std::to_string(kDiskFormatVersion));
  }
  if (Get32(b, 12) != kDiskBlockBytes) return Status::Corruption("cache file header size mismatch");
  h->slot_bytes = Get64(b, kFileSlotBytes);
  h->blob_bytes = Get64(b, kFileBlobBytes);
  h->num_slots = Get64(b, kFileNumSlots);
  h->epoch = Get64(b, kFileEpoch);
  h->has_geometry = false;
  h->layout_fingerprint = {};
  h->geometry_label.clear();
  if (std::memcmp(b + kGeoMagic, kNoMagic, 8) == 0) return Status::OK();  // written without one
  if (std::memcmp(b + kGeoMagic, kGeometryMagic, 8) != 0 ||
      Get32(b, kGeoCrc) != Crc32c(0, b + kGeoMagic, kGeoCrc - kGeoMagic)) {
    return Status::Corruption("file header geometry record checksum mismatch");
  }
  const uint32_t label_bytes = Get32(b, kGeoLabelBytes);
  if (label_bytes > kMaxGeometryLabelBytes)
    return Status::Corruption("file header geometry label too long");
  h->has_geometry = true;
  std::memcpy(h->layout_fingerprint.data(), b + kGeoFingerprint, 16);
  h->geometry_label.assign(reinterpret_cast<const char*>(b + kGeoLabel), label_bytes);
  return Status::OK();
}

void EncodeSlotHeader(const SlotHeader& h, void* block) {
  auto* b = static_cast<unsigned char*>(block);
  std::memset(b, 0, kDiskBlockBytes);
  PutCommon(b, kSlotMagic);
  h.key.ToBytes(b + kSlotKey);
  std::memcpy(b + kSlotFingerprint, h.layout_fingerprint.data(), 16);
  Put64(b, kSlotEpoch, h.epoch);
  Put64(b, kSlotSequence, h.sequence);
  Put64(b, kSlotPayloadBytes, h.payload_bytes);
  Put32(b, kSlotPayloadCrc, h.payload_crc);
  Put32(b, kSlotCrc, Crc32c(0, b, kSlotCrc));
}

SlotHeaderCheck DecodeSlotHeader(const void* block, SlotHeader* h, std::string* why) {
  const auto* b = static_cast<const unsigned char*>(block);
  auto corrupt = [&](const char* reason) {
    if (why) *why = reason;
    return SlotHeaderCheck::kCorrupt;
  };
  if (std::memcmp(b, kNoMagic, 8) == 0) return SlotHeaderCheck::kEmpty;
  if (std::memcmp(b, kSlotMagic, 8) != 0) return corrupt("bad slot magic");
  if (Get32(b, kSlotCrc) != Crc32c(0, b, kSlotCrc)) return corrupt("slot header checksum mismatch");
  if (Get32(b, 8) != kDiskFormatVersion) return corrupt("slot format version mismatch");
  if (Get32(b, 12) != kDiskBlockBytes) return corrupt("slot header size mismatch");
  h->key = ChunkKey::FromBytes(b + kSlotKey);
  std::memcpy(h->layout_fingerprint.data(), b + kSlotFingerprint, 16);
  h->epoch = Get64(b, kSlotEpoch);
  h->sequence = Get64(b, kSlotSequence);
  h->payload_bytes = Get64(b, kSlotPayloadBytes);
  h->payload_crc = Get32(b, kSlotPayloadCrc);
  return SlotHeaderCheck::kValid;
}

}  // namespace kvtier
