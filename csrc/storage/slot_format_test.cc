// Slot and file headers: encode / decode round trips; every damaged byte is caught.
#include "storage/slot_format.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvtier {
namespace {

SlotHeader SampleSlot() {
  SlotHeader h;
  h.key = ChunkKey{0x0123456789abcdefull, 0xfedcba9876543210ull};
  for (int i = 0; i < 16; ++i) h.layout_fingerprint[i] = static_cast<uint8_t>(i * 7 + 1);
  h.epoch = 0x1111222233334444ull;
  h.sequence = 42;
  h.payload_bytes = 2 << 20;
  h.payload_crc = 0xdeadbeef;
  return h;
}

TEST(DiskSlotFormatTest, SlotHeaderRoundTrip) {
  std::vector<unsigned char> block(kDiskBlockBytes, 0xEE);
  SlotHeader in = SampleSlot();
  EncodeSlotHeader(in, block.data());
  SlotHeader out;
  ASSERT_EQ(DecodeSlotHeader(block.data(), &out), SlotHeaderCheck::kValid);
  EXPECT_EQ(out.key, in.key);
  EXPECT_EQ(out.layout_fingerprint, in.layout_fingerprint);
  EXPECT_EQ(out.epoch, in.epoch);
  EXPECT_EQ(out.sequence, in.sequence);
  EXPECT_EQ(out.payload_bytes, in.payload_bytes);
  EXPECT_EQ(out.payload_crc, in.payload_crc);
  // The rest of the block is zeroed, not left over.
  for (size_t i = 80; i < kDiskBlockBytes; ++i) ASSERT_EQ(block[i], 0) << i;
  EXPECT_EQ(std::string(reinterpret_cast<char*>(block.data()), 8), "KVTSLOT1");
}

TEST(DiskSlotFormatTest, ZeroBlockIsEmpty) {
  std::vector<unsigned char> block(kDiskBlockBytes, 0);
  SlotHeader out;
  EXPECT_EQ(DecodeSlotHeader(block.data(), &out), SlotHeaderCheck::kEmpty);
}

TEST(DiskSlotFormatTest, EveryDamagedHeaderByteIsCorrupt) {
  std::vector<unsigned char> block(kDiskBlockBytes);
  EncodeSlotHeader(SampleSlot(), block.data());
  for (size_t i = 0; i < 80; ++i) {
    for (unsigned char flip : {0x01, 0x80, 0xFF}) {
      std::vector<unsigned char> bad = block;
      bad[i] ^= flip;
      SlotHeader out;
      std::string why;
      SlotHeaderCheck c = DecodeSlotHeader(bad.data(), &out, &why);
      // Damage to the magic can only make it "empty" if all 8 bytes became zero, which one
      // flipped byte cannot do.
      EXPECT_EQ(c, SlotHeaderCheck::kCorrupt) << "byte " << i;
      EXPECT_FALSE(why.empty());
    }
  }
}

TEST(DiskSlotFormatTest, FileHeaderRoundTripAndDamage) {
  std::vector<unsigned char> block(kDiskBlockBytes);
  FileHeader in{SlotBytesFor(4096), 4096, 1000, 0xabcdef};
  EncodeFileHeader(in, block.data());
  FileHeader out;
  ASSERT_TRUE(DecodeFileHeader(block.data(), &out).ok());
  EXPECT_EQ(out.slot_bytes, in.slot_bytes);
  EXPECT_EQ(out.blob_bytes, in.blob_bytes);
  EXPECT_EQ(out.num_slots, in.num_slots);
  EXPECT_EQ(out.epoch, in.epoch);
  for (size_t i = 0; i < 52; ++i) {
    std::vector<unsigned char> bad = block;
    bad[i] ^= 0x10;
    Status s = DecodeFileHeader(bad.data(), &out);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << "byte " << i;
  }
}

TEST(DiskSlotFormatTest, FileHeaderGeometryRecordRoundTripAndDamage) {
  std::vector<unsigned char> block(kDiskBlockBytes);
  FileHeader in{SlotBytesFor(4096), 4096, 10, 7};
  in.has_geometry = true;
  for (int i = 0; i < 16; ++i) in.layout_fingerprint[i] = static_cast<uint8_t>(i * 3);
  in.geometry_label = "model_id='x' chunk_tokens=256";
  EncodeFileHeader(in, block.data());
  FileHeader out;
  ASSERT_TRUE(DecodeFileHeader(block.data(), &out).ok());
  EXPECT_TRUE(out.has_geometry);
  EXPECT_EQ(out.layout_fingerprint, in.layout_fingerprint);
  EXPECT_EQ(out.geometry_label, in.geometry_label);
  for (size_t i : {64u, 80u, 88u, 100u, 1116u}) {  // magic, fingerprint, length, label, CRC
    std::vector<unsigned char> bad = block;
    bad[i] ^= 0x10;
    EXPECT_EQ(DecodeFileHeader(bad.data(), &out).code(), StatusCode::kCorruption) << "byte " << i;
  }
  // Without a record (a header written before it existed): decodes, and says so.
  FileHeader bare{SlotBytesFor(4096), 4096, 10, 7};
  EncodeFileHeader(bare, block.data());
  ASSERT_TRUE(DecodeFileHeader(block.data(), &out).ok());
  EXPECT_FALSE(out.has_geometry);
  EXPECT_TRUE(out.geometry_label.empty());
}

TEST(DiskSlotFormatTest, Geometry) {
  EXPECT_EQ(SlotBytesFor(1), 2 * kDiskBlockBytes);
  EXPECT_EQ(SlotBytesFor(4096), 2 * kDiskBlockBytes);
  EXPECT_EQ(SlotBytesFor(4097), 3 * kDiskBlockBytes);
  EXPECT_EQ(SlotBytesFor(2 << 20), kDiskBlockBytes + (2 << 20));
  EXPECT_EQ(SlotOffset(0, 8192), kDiskBlockBytes);
  EXPECT_EQ(SlotOffset(3, 8192), kDiskBlockBytes + 3 * 8192);
}

}  // namespace
}  // namespace kvtier
