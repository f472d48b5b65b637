// CRC32C: the RFC 3720 vectors, hardware against software, chaining.
#include "storage/crc32c.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

namespace kvtier {
namespace {

struct Vector {
  std::vector<uint8_t> data;
  uint32_t crc;
};

std::vector<Vector> KnownVectors() {
  std::vector<Vector> v;
  const char* check = "123456789";
  v.push_back({std::vector<uint8_t>(check, check + 9), 0xE3069283u});
  v.push_back({std::vector<uint8_t>(32, 0x00), 0x8A9136AAu});  // RFC 3720 B.4
  v.push_back({std::vector<uint8_t>(32, 0xFF), 0x62A8AB43u});
  std::vector<uint8_t> inc(32), dec(32);
  for (int i = 0; i < 32; ++i) {
    inc[i] = static_cast<uint8_t>(i);
    dec[i] = static_cast<uint8_t>(31 - i);
  }
  v.push_back({inc, 0x46DD794Eu});
  v.push_back({dec, 0x113FDB5Cu});
  v.push_back({{}, 0x00000000u});
  return v;
}

TEST(Crc32cTest, KnownVectorsSoftware) {
  for (const Vector& v : KnownVectors()) {
    EXPECT_EQ(Crc32cSoftware(0, v.data.data(), v.data.size()), v.crc) << "length " << v.data.size();
  }
}

TEST(Crc32cTest, KnownVectorsDispatch) {
  // Crc32c uses the SSE4.2 instruction where the CPU has it (printed so a log shows which ran).
  std::printf("CRC32C hardware path: %s\n",
              Crc32cHardwareAvailable() ? "SSE4.2" : "absent (software)");
  for (const Vector& v : KnownVectors()) {
    EXPECT_EQ(Crc32c(0, v.data.data(), v.data.size()), v.crc) << "length " << v.data.size();
  }
}

TEST(Crc32cTest, HardwareMatchesSoftwareAtEveryLengthAndAlignment) {
  std::mt19937_64 rng(7);
  std::vector<uint8_t> buf(3 * 8192 * 2 + 4096 + 64);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  // Lengths around the 3-way block sizes (3 x 256, 3 x 8192) and odd tails, at odd offsets.
  std::vector<size_t> lengths = {0,   1,   7,    8,    9,     63,    255,   256,       767,
                                 768, 769, 1000, 4096, 24575, 24576, 24577, 49152 + 13};
  for (size_t off = 0; off < 9; ++off) {
    for (size_t len : lengths) {
      ASSERT_LE(off + len, buf.size());
      EXPECT_EQ(Crc32c(0, buf.data() + off, len), Crc32cSoftware(0, buf.data() + off, len))
          << "offset " << off << " length " << len;
    }
  }
  for (int i = 0; i < 200; ++i) {
    size_t off = rng() % 64, len = rng() % (buf.size() - 64);
    ASSERT_EQ(Crc32c(0, buf.data() + off, len), Crc32cSoftware(0, buf.data() + off, len));
  }
}

TEST(Crc32cTest, ChainingEqualsOneShot) {
  std::vector<uint8_t> buf(100000);
  std::mt19937 rng(3);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  uint32_t whole = Crc32c(0, buf.data(), buf.size());
  for (size_t cut : {size_t{0}, size_t{1}, size_t{4095}, size_t{50000}, buf.size()}) {
    uint32_t c = Crc32c(0, buf.data(), cut);
    EXPECT_EQ(Crc32c(c, buf.data() + cut, buf.size() - cut), whole) << "cut at " << cut;
    uint32_t s = Crc32cSoftware(0, buf.data(), cut);
    EXPECT_EQ(Crc32cSoftware(s, buf.data() + cut, buf.size() - cut), whole) << "cut at " << cut;
  }
}

TEST(Crc32cTest, DetectsEverySingleBitFlip) {
  std::vector<uint8_t> buf(4096, 0x5A);
  uint32_t good = Crc32c(0, buf.data(), buf.size());
  for (size_t byte = 0; byte < buf.size(); byte += 97) {
    for (int bit = 0; bit < 8; ++bit) {
      buf[byte] ^= static_cast<uint8_t>(1 << bit);
      EXPECT_NE(Crc32c(0, buf.data(), buf.size()), good);
      buf[byte] ^= static_cast<uint8_t>(1 << bit);
    }
  }
}

}  // namespace
}  // namespace kvtier
