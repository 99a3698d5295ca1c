// Damaged and hostile BTT images: each is reported, and repaired or refused cleanly, and no
// sector that is still reachable is lost.
#include <unistd.h>

#include <cstring>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "btt/layout.h"
#include "test_util.h"
#include "vpmfs/btt.h"
#include "vpmfs/checksum.h"

namespace vpmfs {
namespace {

using test::TempPath;
using ::testing::HasSubstr;

constexpr uint64_t kSize = 32 << 20;
constexpr uint64_t kWritten = 100;

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += s + "\n";
  return out;
}

class BttCorrupt : public ::testing::Test {
 protected:
  void SetUp() override {
    RegionOptions o;
    o.create_size = kSize;
    o.mode = PersistMode::direct;
    o.force_persistent = true;
    region_ = std::move(Region::open(path_, o).value());
    ASSERT_TRUE(Btt::format(*region_, {}));
    auto btt = Btt::open(*region_);
    ASSERT_TRUE(btt);
    for (uint64_t lba = 0; lba < kWritten; ++lba)
      ASSERT_TRUE((*btt)->write(lba, pattern(lba).data()));
    arena_ = (*btt)->arenas()[0];
  }

  static std::vector<char> pattern(uint64_t lba) {
    return std::vector<char>(4096, char('0' + lba % 64));
  }

  template <typename T>
  T get(uint64_t off) {
    T v;
    std::memcpy(&v, region_->at(off), sizeof v);
    return v;
  }
  template <typename T>
  void put(uint64_t off, const T& v) {
    region_->write(off, &v, sizeof v);
  }

  BttCheckReport check(bool repair) {
    auto r = btt_check(*region_, {}, repair);
    EXPECT_TRUE(r) << r.status().to_string();
    return r ? *r : BttCheckReport{};
  }

  // Every written sector except `lost` reads back its pattern.
  void expect_data(const std::set<uint64_t>& lost = {}) {
    auto btt = Btt::open(*region_);
    ASSERT_TRUE(btt) << btt.status().to_string();
    std::vector<char> buf(4096);
    for (uint64_t lba = 0; lba < kWritten; ++lba) {
      if (lost.count(lba) != 0) continue;
      ASSERT_TRUE((*btt)->read(lba, buf.data())) << "LBA " << lba;
      ASSERT_EQ(buf, pattern(lba)) << "LBA " << lba;
    }
  }

  TempPath path_{"corrupt.img"};
  std::unique_ptr<Region> region_;
  BttArenaInfo arena_;
};

TEST_F(BttCorrupt, FreshImageChecksClean) {
  auto r = check(false);
  EXPECT_TRUE(r.clean()) << joined(r.problems);
  EXPECT_EQ(r.arenas, 1u);
  EXPECT_EQ(r.sectors, arena_.external_nlba);
}

TEST_F(BttCorrupt, ZeroedPrimaryInfoIsReportedAndRestored) {
  region_->zero(0, 4096);
  auto r = check(false);
  ASSERT_FALSE(r.clean());
  EXPECT_THAT(r.problems[0], HasSubstr("primary info block invalid (no BTT_ARENA_INFO signature)"));
  auto fixed = check(true);
  EXPECT_FALSE(fixed.repairs.empty());
  EXPECT_TRUE(fixed.remaining.empty()) << joined(fixed.remaining);
  EXPECT_EQ(std::memcmp(region_->at(0), region_->at(arena_.info2off), 4096), 0);
  EXPECT_TRUE(check(false).clean());
  expect_data();
}

TEST_F(BttCorrupt, ZeroedBackupIsReportedAndRewritten) {
  region_->zero(arena_.info2off, 4096);
  auto r = check(false);
  ASSERT_EQ(r.problems.size(), 1u) << joined(r.problems);
  EXPECT_THAT(r.problems[0], HasSubstr("backup info block invalid"));
  check(true);
  EXPECT_TRUE(check(false).clean());
  expect_data();
}

TEST_F(BttCorrupt, BothInfoBlocksGoneIsARefusal) {
  region_->zero(0, 4096);
  region_->zero(arena_.info2off, 4096);
  auto open = Btt::open(*region_);
  ASSERT_FALSE(open);
  EXPECT_THAT(open.status().message(), HasSubstr("no BTT"));
  EXPECT_EQ(btt_check(*region_, {}, true).status().error(), EINVAL);
}

TEST_F(BttCorrupt, HostileOffsetsWithAValidChecksumAreRefused) {
  auto info = get<btt::InfoBlock>(0);
  info.mapoff = ~0ull - 100;  // would wrap around
  info.checksum = 0;
  info.checksum = fletcher64(&info, sizeof info);
  put(0, info);
  put(arena_.info2off, info);
  auto open = Btt::open(*region_);
  ASSERT_FALSE(open);
  EXPECT_EQ(open.status().error(), EUCLEAN);
  EXPECT_THAT(open.status().message(), HasSubstr("offsets out of bounds"));
  auto r = check(false);
  EXPECT_FALSE(r.clean());
}

TEST_F(BttCorrupt, ScribbledMapEntriesAreFoundAndRepairedWithoutLosingOtherSectors) {
  // LBA 3 points beyond the arena; LBA 4 points at LBA 5's block.
  uint32_t five = get<uint32_t>(arena_.mapoff + 5 * 4);
  put<uint32_t>(arena_.mapoff + 3 * 4, btt::kMapNormal | 0x3FFFFFF0);
  put<uint32_t>(arena_.mapoff + 4 * 4, five);
  auto r = check(false);
  std::string all = joined(r.problems);
  EXPECT_THAT(all, HasSubstr("map entry of LBA 3 points at block"));
  EXPECT_THAT(all, HasSubstr("is mapped by 2 sectors (LBAs 4, 5)"));
  EXPECT_THAT(all, HasSubstr("referenced by nothing"));
  {
    // Open still works; the bad sector reads as an I/O error, never out of bounds.
    auto btt = Btt::open(*region_);
    ASSERT_TRUE(btt);
    std::vector<char> buf(4096);
    EXPECT_EQ((*btt)->read(3, buf.data()).error(), EIO);
  }
  auto fixed = check(true);
  EXPECT_TRUE(fixed.remaining.empty()) << joined(fixed.remaining);
  EXPECT_THAT(joined(fixed.repairs), HasSubstr("LBA 3 pointed beyond the arena; marked it bad"));
  EXPECT_TRUE(check(false).clean());
  expect_data({3, 4});
  auto btt = Btt::open(*region_);
  std::vector<char> buf(4096);
  EXPECT_EQ((*btt)->read(3, buf.data()).error(), EIO) << "lost data must not read as data";
  ASSERT_TRUE((*btt)->read(4, buf.data()));
  EXPECT_EQ(buf, pattern(5)) << "LBA 4 keeps a copy of the block it shared";
  ASSERT_TRUE((*btt)->write(3, pattern(3).data()));
  ASSERT_TRUE((*btt)->read(3, buf.data()));
  EXPECT_EQ(buf, pattern(3)) << "rewriting a bad sector heals it";
}

TEST_F(BttCorrupt, ImpossibleSequencePairIsRefusedThenRepaired) {
  uint64_t group = arena_.logoff + 9 * 64;
  auto e0 = get<btt::FlogEntry>(group);
  auto e1 = get<btt::FlogEntry>(group + 16);
  e1.seq = e0.seq == 0 ? 1 : e0.seq;  // equal sequence numbers
  if (e0.seq == 0) e0.seq = 1;
  put(group, e0);
  put(group + 16, e1);
  auto open = Btt::open(*region_);
  ASSERT_FALSE(open);
  EXPECT_THAT(open.status().message(), HasSubstr("lane 9: impossible flog sequence pair"));
  EXPECT_THAT(open.status().message(), HasSubstr("run fsck"));
  auto r = check(false);
  EXPECT_THAT(joined(r.problems), HasSubstr("lane 9: impossible flog sequence pair"));
  auto fixed = check(true);
  EXPECT_TRUE(fixed.remaining.empty()) << joined(fixed.remaining);
  EXPECT_THAT(joined(fixed.repairs), HasSubstr("lane 9: reset its flog"));
  expect_data();
}

TEST_F(BttCorrupt, FreeBlockThatIsAlsoMappedGoesToTheMap) {
  // Lane 0's newest entry names as free a block that LBA 7 maps.
  uint32_t seven = get<uint32_t>(arena_.mapoff + 7 * 4) & btt::kMapBlockMask;
  btt::FlogEntry e{0, seven, seven, 1};
  put(arena_.logoff, e);
  region_->zero(arena_.logoff + 16, 48);
  auto r = check(false);
  EXPECT_THAT(joined(r.problems), HasSubstr("lane 0: free block"));
  auto fixed = check(true);
  EXPECT_TRUE(fixed.remaining.empty()) << joined(fixed.remaining);
  expect_data();
}

TEST_F(BttCorrupt, OutOfRangeFlogEntryIsRefusedNotFollowed) {
  btt::FlogEntry e{0xFFFFFFF0u, 1u << 29, 1u << 29, 2};
  put(arena_.logoff + 3 * 64 + 16, e);
  auto open = Btt::open(*region_);
  ASSERT_FALSE(open);
  EXPECT_THAT(open.status().message(), HasSubstr("lane 3: flog entry out of range"));
  auto fixed = check(true);
  EXPECT_TRUE(fixed.remaining.empty()) << joined(fixed.remaining);
  expect_data();
}

TEST_F(BttCorrupt, TruncatedImageIsAClearError) {
  region_.reset();
  ASSERT_EQ(::truncate(path_.str().c_str(), 20 << 20), 0);
  RegionOptions o;
  o.force_persistent = true;
  region_ = std::move(Region::open(path_, o).value());
  auto open = Btt::open(*region_);
  ASSERT_FALSE(open);
  EXPECT_EQ(open.status().error(), EUCLEAN);
  EXPECT_THAT(open.status().message(), HasSubstr("info block invalid"));
  auto r = btt_check(*region_, {}, false);
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->clean());
}

}  // namespace
}  // namespace vpmfs
