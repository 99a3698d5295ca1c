#include "vpmfs/btt.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "btt/layout.h"
#include "test_util.h"
#include "vpmfs/checksum.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::TempPath;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;

std::unique_ptr<Region> make_region(const std::string& path, uint64_t size, PersistMode mode) {
  RegionOptions o;
  o.create_size = size;
  o.mode = mode;
  o.force_persistent = true;
  auto r = Region::open(path, o);
  EXPECT_TRUE(r) << r.status().to_string();
  return r ? std::move(r.value()) : nullptr;
}

std::unique_ptr<Btt> open_btt(Region& region, const BttOpenOptions& o = {}) {
  auto b = Btt::open(region, o);
  EXPECT_TRUE(b) << b.status().to_string();
  return b ? std::move(b.value()) : nullptr;
}

template <typename T>
T at(const Region& r, uint64_t off) {
  T v;
  std::memcpy(&v, r.at(off), sizeof v);
  return v;
}

std::vector<char> sector(uint32_t size, char fill) {
  return std::vector<char>(size, fill);
}

TEST(Fletcher64, SumsLittleEndianWords) {
  uint32_t words[3] = {1, 2, 3};
  // lo = 1+2+3, hi = 1 + 3 + 6
  EXPECT_EQ(fletcher64(words, sizeof words), (uint64_t(10) << 32) | 6);
  EXPECT_EQ(fletcher64(words, 0), 0u);
  uint32_t big[2] = {0xFFFFFFFF, 0xFFFFFFFF};
  EXPECT_EQ(fletcher64(big, 8), (uint64_t(0xFFFFFFFDu) << 32) | 0xFFFFFFFEu) << "wraps mod 2^32";
}

TEST(BttLayout, MatchesTheLinuxArenaPlan) {
  TempPath path("layout.img");
  auto region = make_region(path, 16 * kMiB, PersistMode::direct);
  ASSERT_TRUE(Btt::format(*region, {}));
  auto info = at<btt::InfoBlock>(*region, 0);
  EXPECT_EQ(std::string(info.signature), "BTT_ARENA_INFO");
  EXPECT_EQ(info.version_major, 2);
  EXPECT_EQ(info.version_minor, 0);
  EXPECT_EQ(info.external_lbasize, 4096u);
  EXPECT_EQ(info.internal_lbasize, 4096u);
  EXPECT_EQ(info.nfree, 256u);
  EXPECT_EQ(info.internal_nlba, 4085u);
  EXPECT_EQ(info.external_nlba, 3829u);
  EXPECT_EQ(info.infosize, 4096u);
  EXPECT_EQ(info.dataoff, 4096u);
  EXPECT_EQ(info.mapoff, 16740352u);
  EXPECT_EQ(info.logoff, 16756736u);
  EXPECT_EQ(info.info2off, 16 * kMiB - 4096);
  EXPECT_EQ(info.nextoff, 0u);
  auto copy = info;
  copy.checksum = 0;
  EXPECT_EQ(info.checksum, fletcher64(&copy, sizeof copy));
  EXPECT_EQ(std::memcmp(region->at(0), region->at(info.info2off), 4096), 0) << "backup differs";
  // Lane i starts with one entry naming free block external_nlba + i; the rest is padding.
  for (uint32_t lane : {0u, 17u, 255u}) {
    auto g = at<btt::FlogGroup>(*region, info.logoff + lane * 64);
    EXPECT_EQ(g.ent[0].lba, lane);
    EXPECT_EQ(g.ent[0].old_map, 3829 + lane);
    EXPECT_EQ(g.ent[0].new_map, 3829 + lane);
    EXPECT_EQ(g.ent[0].seq, 1u);
    for (int j = 1; j < 4; ++j) EXPECT_EQ(g.ent[j].seq, 0u);
  }
  auto btt = open_btt(*region);
  ASSERT_TRUE(btt);
  EXPECT_EQ(btt->sector_count(), 3829u);
  EXPECT_EQ(btt->sector_size(), 4096u);
  EXPECT_TRUE(btt->open_notes().empty());
}

TEST(BttLayout, SmallSectorsAndOddSizes) {
  TempPath path("layout512.img");
  auto region = make_region(path, 20 * kMiB + 1234, PersistMode::direct);
  BttFormatOptions o;
  o.sector_size = 512;
  o.nfree = 64;
  ASSERT_TRUE(Btt::format(*region, o));
  auto info = at<btt::InfoBlock>(*region, 0);
  EXPECT_EQ(info.internal_lbasize, 512u);
  EXPECT_EQ(info.info2off + 4096, (20 * kMiB + 1234) / 4096 * 4096);
  EXPECT_EQ(info.internal_nlba, info.external_nlba + 64);
  auto btt = open_btt(*region);
  ASSERT_TRUE(btt);
  auto data = sector(512, 'x');
  ASSERT_TRUE(btt->write(btt->sector_count() - 1, data.data()));
  auto back = sector(512, 0);
  ASSERT_TRUE(btt->read(btt->sector_count() - 1, back.data()));
  EXPECT_EQ(back, data);
}

TEST(BttLayout, RefusesWhatItCannotFormat) {
  TempPath path("small.img");
  auto region = make_region(path, 15 * kMiB, PersistMode::direct);
  Status s = Btt::format(*region, {});
  EXPECT_EQ(s.error(), ENOSPC);
  EXPECT_THAT(s.message(), HasSubstr("at least 16 MiB"));
  BttFormatOptions o;
  o.sector_size = 1024;
  EXPECT_EQ(Btt::format(*region, o).error(), EINVAL);
  auto none = Btt::open(*region);
  EXPECT_EQ(none.status().error(), EINVAL);
  EXPECT_THAT(none.status().message(), HasSubstr("no BTT"));
}

TEST(BttLayout, ManyArenasUpTo512GiB) {
  TempPath path("arenas.img", "/tmp");
  uint64_t size = (512ull << 30) + 40 * kMiB;
  auto region = make_region(path, size, PersistMode::writeback);
  ASSERT_TRUE(region);
  ASSERT_TRUE(Btt::format(*region, {}));
  auto btt = open_btt(*region);
  ASSERT_TRUE(btt);
  auto arenas = btt->arenas();
  ASSERT_EQ(arenas.size(), 2u);
  EXPECT_EQ(arenas[0].size, 512ull << 30);
  EXPECT_EQ(arenas[1].offset, 512ull << 30);
  EXPECT_EQ(arenas[1].size, 40 * kMiB);
  EXPECT_EQ(btt->sector_count(), uint64_t(arenas[0].external_nlba) + arenas[1].external_nlba);
  // The last sector of arena 0 and the first of arena 1 are different sectors.
  uint64_t edge = arenas[0].external_nlba;
  auto a = sector(4096, 'a'), b = sector(4096, 'b'), back = sector(4096, 0);
  ASSERT_TRUE(btt->write(edge - 1, a.data()));
  ASSERT_TRUE(btt->write(edge, b.data()));
  ASSERT_TRUE(btt->read(edge - 1, back.data()));
  EXPECT_EQ(back, a);
  ASSERT_TRUE(btt->read(edge, back.data()));
  EXPECT_EQ(back, b);
  EXPECT_EQ(btt->read(btt->sector_count(), back.data()).error(), EINVAL);
}

class BttModes : public ::testing::TestWithParam<PersistMode> {
 protected:
  void SetUp() override {
    region_ = make_region(path_, 32 * kMiB, GetParam());
    ASSERT_TRUE(Btt::format(*region_, {}));
    btt_ = open_btt(*region_);
    ASSERT_TRUE(btt_);
  }
  void reopen() {
    btt_.reset();
    btt_ = open_btt(*region_);
  }
  TempPath path_{"modes.img"};
  std::unique_ptr<Region> region_;
  std::unique_ptr<Btt> btt_;
};

TEST_P(BttModes, WritesReadBackAndSurviveReopen) {
  std::vector<char> back(4096);
  ASSERT_TRUE(btt_->read(5, back.data()));
  EXPECT_EQ(back, sector(4096, 0)) << "a fresh image reads zeros";
  for (uint64_t lba = 0; lba < 600; ++lba) {
    auto data = sector(4096, char('A' + lba % 26));
    ASSERT_TRUE(btt_->write(lba, data.data()));
  }
  ASSERT_TRUE(btt_->read(3, back.data()));
  EXPECT_EQ(back, sector(4096, 'D'));
  ASSERT_TRUE(btt_->sync_wait());
  reopen();
  for (uint64_t lba = 0; lba < 600; ++lba) {
    ASSERT_TRUE(btt_->read(lba, back.data()));
    ASSERT_EQ(back, sector(4096, char('A' + lba % 26))) << "lba " << lba;
  }
}

TEST_P(BttModes, MapAndFlogRecordTheUpdate) {
  auto data = sector(4096, 'm');
  ASSERT_TRUE(btt_->write(7, data.data()));
  ASSERT_TRUE(btt_->sync_wait());
  auto a = btt_->arenas()[0];
  uint32_t entry = at<uint32_t>(*region_, a.mapoff + 7 * 4);
  EXPECT_EQ(entry & btt::kMapNormal, btt::kMapNormal) << "a written entry has both flags set";
  uint32_t block = entry & btt::kMapBlockMask;
  EXPECT_GE(block, a.external_nlba) << "the first write uses one of the initial free blocks";
  // Find the lane whose newest entry logged this update.
  bool found = false;
  for (uint32_t lane = 0; lane < a.nfree && !found; ++lane) {
    auto g = at<btt::FlogGroup>(*region_, a.logoff + lane * 64);
    const auto& e = g.ent[1];
    if (e.seq == 2 && e.lba == 7) {
      EXPECT_EQ(e.old_map, 7u) << "identity mapping before";
      EXPECT_EQ(e.new_map, block);
      found = true;
    }
  }
  EXPECT_TRUE(found);
  std::vector<char> back(4096);
  ASSERT_TRUE(btt_->read(7, back.data()));
  EXPECT_EQ(back, data);
}

// A trim that lands while a commit carries an earlier write of the same sector is newer than
// that write: the commit must neither log the write over it nor drop its flag from the map,
// however the two interleave. The sector starts trimmed, so the map entry looks the same
// before and after the trim and only the commit can tell them apart.
TEST_P(BttModes, TrimDuringACommitOfTheSameSectorWins) {
  auto data = sector(4096, 'w');
  std::vector<char> back(4096);
  SplitMix64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const uint64_t lba = 40 + i % 8;
    ASSERT_TRUE(btt_->trim(lba));
    ASSERT_TRUE(btt_->write(lba, data.data()));
    std::promise<Status> synced;
    btt_->sync([&synced](const Status& s) { synced.set_value(s); });
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(rng.below(300));
    while (std::chrono::steady_clock::now() < until) {
    }
    ASSERT_TRUE(btt_->trim(lba));
    ASSERT_TRUE(synced.get_future().get());
    ASSERT_TRUE(btt_->read(lba, back.data()));
    ASSERT_EQ(back, sector(4096, 0)) << "iteration " << i;
  }
  ASSERT_TRUE(btt_->sync_wait());
  reopen();
  for (uint64_t lba = 40; lba < 48; ++lba) {
    ASSERT_TRUE(btt_->read(lba, back.data()));
    EXPECT_EQ(back, sector(4096, 0)) << lba;
  }
}

TEST_P(BttModes, TrimReadsZerosAndErrorReadsFail) {
  auto data = sector(4096, 'z');
  ASSERT_TRUE(btt_->write(9, data.data()));
  ASSERT_TRUE(btt_->trim(9));
  std::vector<char> back(4096, 1);
  ASSERT_TRUE(btt_->read(9, back.data()));
  EXPECT_EQ(back, sector(4096, 0));
  ASSERT_TRUE(btt_->set_error(10));
  EXPECT_EQ(btt_->read(10, back.data()).error(), EIO);
  EXPECT_EQ(btt_->read_ref(10).status().error(), EIO);
  ASSERT_TRUE(btt_->sync_wait());
  reopen();
  ASSERT_TRUE(btt_->read(9, back.data()));
  EXPECT_EQ(back, sector(4096, 0));
  EXPECT_EQ(btt_->read(10, back.data()).error(), EIO) << "E flag must survive reopen";
  auto a = btt_->arenas()[0];
  EXPECT_EQ(at<uint32_t>(*region_, a.mapoff + 9 * 4) & btt::kMapNormal, btt::kMapZero);
  EXPECT_EQ(at<uint32_t>(*region_, a.mapoff + 10 * 4) & btt::kMapNormal, btt::kMapError);
  ASSERT_TRUE(btt_->write(10, data.data()));
  ASSERT_TRUE(btt_->read(10, back.data()));
  EXPECT_EQ(back, data) << "rewriting clears the error";
}

TEST_P(BttModes, ZeroCopyReadKeepsItsBlock) {
  auto first = sector(4096, '1');
  ASSERT_TRUE(btt_->write(3, first.data()));
  auto ref = btt_->read_ref(3);
  ASSERT_TRUE(ref);
  const std::byte* p = ref->data();
  std::atomic<bool> done{false};
  // Rewrite LBA 3 and churn every lane until its old block is handed out again.
  std::thread writer([&] {
    auto other = sector(4096, '2');
    for (int i = 0; i < 2000; ++i) ASSERT_TRUE(btt_->write(100 + i % 512, other.data()));
    ASSERT_TRUE(btt_->write(3, other.data()));
    for (int i = 0; i < 2000; ++i) ASSERT_TRUE(btt_->write(100 + i % 512, other.data()));
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(char(p[i]), '1') << "a tracked block was reused";
  EXPECT_FALSE(done.load()) << "the writer should be waiting for the tracked block";
  ref = Btt::ReadRef();
  writer.join();
  std::vector<char> back(4096);
  ASSERT_TRUE(btt_->read(3, back.data()));
  EXPECT_EQ(back, sector(4096, '2'));
}

TEST_P(BttModes, PinnedSectorsAreWrittenInPlace) {
  auto a = sector(4096, 'p');
  ASSERT_TRUE(btt_->pin(20, 2));
  auto off = btt_->pinned_offset(20);
  ASSERT_TRUE(off);
  ASSERT_TRUE(btt_->write(20, a.data()));
  EXPECT_EQ(*btt_->pinned_offset(20), *off) << "a pinned sector must not move";
  EXPECT_EQ(std::memcmp(region_->at(*off), a.data(), 4096), 0) << "the write did not go in place";
  EXPECT_EQ(btt_->stats().in_place_writes, 1u);
  std::vector<char> back(4096);
  ASSERT_TRUE(btt_->read(20, back.data()));
  EXPECT_EQ(back, a);
  ASSERT_TRUE(btt_->unpin(20, 2));
  EXPECT_EQ(btt_->pinned_offset(20).status().error(), EINVAL);
  ASSERT_TRUE(btt_->write(20, a.data()));
  ASSERT_TRUE(btt_->sync_wait());
  // An unpinned write moves the sector to a free block again.
  auto arena = btt_->arenas()[0];
  uint32_t block = at<uint32_t>(*region_, arena.mapoff + 20 * 4) & btt::kMapBlockMask;
  EXPECT_NE(arena.dataoff + uint64_t(block) * 4096, *off);
}

TEST_P(BttModes, PinningAZeroSectorGivesItABlock) {
  ASSERT_TRUE(btt_->trim(30));
  ASSERT_TRUE(btt_->pin(30, 1));
  auto off = btt_->pinned_offset(30);
  ASSERT_TRUE(off);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(region_->at(*off)[i], std::byte{0});
  ASSERT_TRUE(btt_->unpin(30, 1));
}

INSTANTIATE_TEST_SUITE_P(Btt, BttModes,
                         ::testing::Values(PersistMode::direct, PersistMode::writeback),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(BttWriteback, ReadsSeeUncommittedWritesAndDestructorCommits) {
  TempPath path("wbcommit.img");
  auto region = make_region(path, 32 * kMiB, PersistMode::writeback);
  ASSERT_TRUE(Btt::format(*region, {}));
  {
    auto btt = open_btt(*region);
    // More writes than lanes: the BTT must commit on its own to get lanes back.
    for (uint64_t i = 0; i < 1000; ++i) {
      auto data = sector(4096, char(i));
      ASSERT_TRUE(btt->write(i % 700, data.data()));
    }
    std::vector<char> back(4096);
    ASSERT_TRUE(btt->read(999 % 700, back.data()));
    EXPECT_EQ(back, sector(4096, char(999)));
    EXPECT_GE(btt->stats().epochs, 1u);
  }
  auto btt = open_btt(*region);
  std::vector<char> back(4096);
  for (uint64_t i = 300; i < 1000; ++i) {
    ASSERT_TRUE(btt->read(i % 700, back.data()));
    ASSERT_EQ(back, sector(4096, char(i))) << i;
  }
}

// A commit starts in the background once half the lanes hold writes (writers go on with the
// other half meanwhile); it carries exactly the writes of the epoch, and a sector rewritten
// within the epoch is carried once.
TEST(BttWriteback, ACommitStartsWhenHalfTheLanesAreInUseAndCarriesItsEpoch) {
  TempPath path("wblanes.img");
  auto region = make_region(path, 64 * kMiB, PersistMode::writeback);
  BttFormatOptions o;
  o.nfree = 4096;
  ASSERT_TRUE(Btt::format(*region, o));
  auto btt = open_btt(*region);
  for (uint64_t lba = 0; lba < 2000; ++lba) {
    ASSERT_TRUE(btt->write(lba, sector(4096, char(lba)).data()));
  }
  for (uint64_t lba = 0; lba < 2000; lba += 2) {
    ASSERT_TRUE(btt->write(lba, sector(4096, char(lba + 1)).data()));  // overtakes the first
  }
  EXPECT_EQ(btt->stats().epochs, 0u) << "2,000 sectors hold fewer than half of 4,096 lanes";
  for (uint64_t lba = 2000; lba < 2048; ++lba) {
    ASSERT_TRUE(btt->write(lba, sector(4096, char(lba)).data()));
  }
  // Taking the 2,048th lane started a commit; nothing waits for it here. The write that took
  // it had not published its sector yet, so it belongs to the next epoch.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (btt->stats().epochs == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(btt->stats().epochs, 1u);
  EXPECT_EQ(btt->stats().epoch_sectors, 2047u);
  ASSERT_TRUE(btt->write(7, sector(4096, 'y').data()));
  ASSERT_TRUE(btt->commit_wait());
  EXPECT_EQ(btt->stats().epochs, 2u);
  EXPECT_EQ(btt->stats().epoch_sectors, 2049u) << "the second commit carries two sectors";
  btt.reset();
  btt = open_btt(*region);
  std::vector<char> back(4096);
  for (uint64_t lba = 0; lba < 2048; ++lba) {
    ASSERT_TRUE(btt->read(lba, back.data()));
    char want = lba == 7 ? 'y' : char(lba < 2000 && lba % 2 == 0 ? lba + 1 : lba);
    ASSERT_EQ(back, sector(4096, want)) << lba;
  }
  btt.reset();
  auto report = btt_check(*region, {}, false);
  ASSERT_TRUE(report) << report.status().to_string();
  EXPECT_TRUE(report->clean()) << ::testing::PrintToString(report->problems);
}

TEST(BttWriteback, FailedFlushMakesTheBttReadOnly) {
  TempPath path("wbfail.img");
  auto region = make_region(path, 32 * kMiB, PersistMode::writeback);
  ASSERT_TRUE(Btt::format(*region, {}));
  auto btt = open_btt(*region);
  auto data = sector(4096, 'f');
  ASSERT_TRUE(btt->write(1, data.data()));
  region->flush_channel().inject_failures(1);
  Status s = btt->sync_wait();
  EXPECT_EQ(s.error(), EIO);
  EXPECT_TRUE(btt->failed());
  EXPECT_EQ(btt->write(2, data.data()).error(), EIO);
  EXPECT_EQ(btt->sync_wait().error(), EIO);
  std::vector<char> back(4096);
  EXPECT_TRUE(btt->read(1, back.data())) << "reads still work";
}

TEST(BttVersions, OpensV11AndThePaddedFlog) {
  for (bool padded : {false, true}) {
    TempPath path("v11.img");
    auto region = make_region(path, 32 * kMiB, PersistMode::direct);
    BttFormatOptions o;
    o.version_major = 1;
    o.version_minor = 1;
    o.padded_flog = padded;
    ASSERT_TRUE(Btt::format(*region, o));
    EXPECT_EQ(std::memcmp(region->at(4096), "BTT_ARENA_INFO", 14), 0) << "v1.1 starts 4 KiB in";
    {
      auto btt = open_btt(*region);
      ASSERT_TRUE(btt);
      auto a = btt->arenas()[0];
      EXPECT_EQ(a.offset, 4096u);
      EXPECT_EQ(a.version_major, 1);
      EXPECT_EQ(a.log_index[1], padded ? 2 : 1);
      for (uint64_t lba = 0; lba < 300; ++lba) {
        auto data = sector(4096, char(lba));
        ASSERT_TRUE(btt->write(lba, data.data()));
      }
    }
    auto btt = open_btt(*region);
    ASSERT_TRUE(btt);
    EXPECT_EQ(btt->arenas()[0].log_index[1], padded ? 2 : 1);
    std::vector<char> back(4096);
    for (uint64_t lba = 0; lba < 300; ++lba) {
      ASSERT_TRUE(btt->read(lba, back.data()));
      ASSERT_EQ(back, sector(4096, char(lba)));
    }
  }
}

// By hand, on a fresh BTT: lane 5 wrote `data` into its free block and logged the update of
// LBA 42, then stopped before the map store. Returns that block.
uint32_t interrupt_an_update(Region& region, const BttArenaInfo& a, const std::vector<char>& data) {
  uint32_t free_block = a.external_nlba + 5;
  region.write(a.dataoff + uint64_t(free_block) * 4096, data.data(), 4096);
  btt::FlogEntry e{42, 42, free_block, 2};
  region.write(a.logoff + 5 * 64 + 16, &e, sizeof e);
  return free_block;
}

TEST(BttRecovery, RollsAnInterruptedUpdateForward) {
  TempPath path("rollfwd.img");
  auto region = make_region(path, 32 * kMiB, PersistMode::direct);
  ASSERT_TRUE(Btt::format(*region, {}));
  auto a = open_btt(*region)->arenas()[0];
  std::vector<char> data(4096, 'r');
  uint32_t free_block = interrupt_an_update(*region, a, data);
  auto btt = open_btt(*region);
  ASSERT_TRUE(btt);
  ASSERT_EQ(btt->open_notes().size(), 1u);
  EXPECT_THAT(btt->open_notes()[0], HasSubstr("rolled an interrupted update of LBA 42 forward"));
  std::vector<char> back(4096);
  ASSERT_TRUE(btt->read(42, back.data()));
  EXPECT_EQ(back, data);
  // Lane 5's free block is now the old one (42), which nothing maps any more.
  EXPECT_EQ(at<uint32_t>(*region, a.mapoff + 42 * 4), free_block | btt::kMapNormal);
}

// The same state seen read-only (fsck -n): the check calls it a note, not damage; a read-only
// open reads the new data, as the next writable open will, and stores nothing.
TEST(BttRecovery, AReadOnlyLookRollsForwardInMemoryOnly) {
  TempPath path("rollfwd-ro.img");
  BttArenaInfo a;
  std::vector<char> data(4096, 'r');
  {
    auto region = make_region(path, 32 * kMiB, PersistMode::direct);
    ASSERT_TRUE(Btt::format(*region, {}));
    a = open_btt(*region)->arenas()[0];
    interrupt_an_update(*region, a, data);
  }
  RegionOptions ro;
  ro.read_only = true;
  auto region = Region::open(path, ro);
  ASSERT_TRUE(region) << region.status().to_string();
  auto report = btt_check(**region, {}, false);
  ASSERT_TRUE(report) << report.status().to_string();
  EXPECT_TRUE(report->clean()) << ::testing::PrintToString(report->problems);
  ASSERT_EQ(report->notes.size(), 1u);
  EXPECT_THAT(report->notes[0], HasSubstr("interrupted update of LBA 42"));
  auto btt = open_btt(**region);
  ASSERT_TRUE(btt);
  ASSERT_EQ(btt->open_notes().size(), 1u);
  EXPECT_THAT(btt->open_notes()[0], HasSubstr("rolled forward in memory"));
  std::vector<char> back(4096);
  ASSERT_TRUE(btt->read(42, back.data()));
  EXPECT_EQ(back, data);
  EXPECT_EQ(at<uint32_t>(**region, a.mapoff + 42 * 4), 0u) << "a read-only open stored the map";
}

// Copies what a writeback BTT with an intent log holds after a sync and no commit (the
// process killed, or the host down, right then) into `crashed`: the writes live only in their
// lanes' blocks and intent records.
void synced_not_committed(const std::string& crashed, const std::vector<char>& data) {
  TempPath path("synced.img");
  auto region = make_region(path, 32 * kMiB, PersistMode::writeback);
  BttFormatOptions fo;
  fo.offset = 1 * kMiB;
  fo.intent_log = 0;
  ASSERT_TRUE(Btt::format(*region, fo));
  BttOpenOptions oo;
  oo.offset = fo.offset;
  oo.intent_log = 0;
  auto btt = open_btt(*region, oo);
  ASSERT_TRUE(btt->write(42, data.data()));
  ASSERT_TRUE(btt->sync_wait());
  EXPECT_EQ(btt->stats().epochs, 0u) << "a sync with an intent log is no commit";
  auto copy = make_region(crashed, 32 * kMiB, PersistMode::direct);
  std::memcpy(copy->base(), region->base(), 32 * kMiB);
}

// The synced write is taken back by a writable open; a read-only one (fsck -n) reads it too,
// from memory, and stores nothing.
TEST(BttRecovery, ASyncedWriteComesBackFromTheIntentLogReadOnlyToo) {
  TempPath path("synced-ro.img");
  std::vector<char> data(4096, 's');
  synced_not_committed(path, data);
  BttOpenOptions oo;
  oo.offset = 1 * kMiB;
  oo.intent_log = 0;
  std::vector<char> back(4096);
  {
    RegionOptions ro;
    ro.read_only = true;
    auto region = Region::open(path, ro);
    ASSERT_TRUE(region) << region.status().to_string();
    const std::byte* base = (*region)->base();
    std::vector<std::byte> before(base, base + 32 * kMiB);
    auto btt = open_btt(**region, oo);
    ASSERT_TRUE(btt);
    ASSERT_EQ(btt->open_notes().size(), 1u);
    EXPECT_THAT(btt->open_notes()[0], HasSubstr("1 acknowledged writes in the intent log taken "
                                                "back in memory"));
    ASSERT_TRUE(btt->read(42, back.data()));
    EXPECT_EQ(back, data);
    btt.reset();
    EXPECT_EQ(std::memcmp(before.data(), (*region)->base(), before.size()), 0)
        << "a read-only open changed the image";
  }
  auto region = make_region(path, 32 * kMiB, PersistMode::writeback);
  auto btt = open_btt(*region, oo);
  ASSERT_TRUE(btt);
  EXPECT_EQ(btt->stats().epochs, 1u) << "the open commits what it took back";
  ASSERT_TRUE(btt->read(42, back.data()));
  EXPECT_EQ(back, data);
}

// A damaged intent-log header does not cost the synced writes its records hold.
TEST(BttRecovery, ADamagedIntentHeaderKeepsTheRecords) {
  TempPath path("synced-header.img");
  std::vector<char> data(4096, 'h');
  synced_not_committed(path, data);
  auto region = make_region(path, 32 * kMiB, PersistMode::writeback);
  const uint64_t bad_checksum = 0x0123456789abcdef;
  region->write(24, &bad_checksum, 8);
  BttOpenOptions oo;
  oo.offset = 1 * kMiB;
  oo.intent_log = 0;
  auto btt = open_btt(*region, oo);
  ASSERT_TRUE(btt);
  EXPECT_THAT(::testing::PrintToString(btt->open_notes()),
              HasSubstr("intent log header is invalid; rewrote it"));
  std::vector<char> back(4096);
  ASSERT_TRUE(btt->read(42, back.data()));
  EXPECT_EQ(back, data);
  btt.reset();
  EXPECT_TRUE(open_btt(*region, oo)->open_notes().empty()) << "the header was rewritten";
}

TEST(BttRecovery, FallsBackToTheBackupInfoBlockAndSaysSo) {
  TempPath path("backup.img");
  auto region = make_region(path, 32 * kMiB, PersistMode::direct);
  ASSERT_TRUE(Btt::format(*region, {}));
  auto data = sector(4096, 'k');
  ASSERT_TRUE(open_btt(*region)->write(1, data.data()));
  region->zero(0, 4096);
  auto btt = open_btt(*region);
  ASSERT_TRUE(btt);
  ASSERT_FALSE(btt->open_notes().empty());
  EXPECT_THAT(btt->open_notes()[0], HasSubstr("primary info block invalid"));
  EXPECT_THAT(btt->open_notes()[0], HasSubstr("using the backup"));
  std::vector<char> back(4096);
  ASSERT_TRUE(btt->read(1, back.data()));
  EXPECT_EQ(back, data);
  btt.reset();
  EXPECT_TRUE(open_btt(*region)->open_notes().empty()) << "the primary was restored";
}

// Each sector carries its LBA and a version in every 8-byte word: a torn read shows as words
// that disagree.
void fill(std::vector<uint64_t>& buf, uint64_t lba, uint64_t version) {
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = (lba << 40) ^ (version << 8) ^ i;
}

bool untorn(const std::vector<uint64_t>& buf, uint64_t lba, uint64_t* version) {
  uint64_t v = ((buf[0] ^ (lba << 40)) >> 8);
  for (std::size_t i = 0; i < buf.size(); ++i) {
    if (buf[i] != ((lba << 40) ^ (v << 8) ^ i)) return false;
  }
  *version = v;
  return true;
}

void torture(PersistMode mode, uint32_t sector_size) {
  TempPath path("torture.img");
  auto region = make_region(path, 24 * kMiB, mode);
  BttFormatOptions o;
  o.sector_size = sector_size;
  ASSERT_TRUE(Btt::format(*region, o));
  auto btt = open_btt(*region);
  constexpr int kThreads = 8;
  const uint64_t lbas = 300;  // few sectors, many collisions
  // Seed every sector with version 0 of its pattern.
  std::vector<uint64_t> buf(sector_size / 8);
  for (uint64_t lba = 0; lba < lbas; ++lba) {
    fill(buf, lba, 0);
    ASSERT_TRUE(btt->write(lba, buf.data()));
  }
  std::atomic<uint64_t> torn{0}, errors{0}, version{1};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      SplitMix64 rng(t + 1);
      std::vector<uint64_t> mine(sector_size / 8);
      for (int i = 0; i < 20000; ++i) {
        uint64_t lba = rng.below(lbas);
        if (rng.chance(1, 2)) {
          fill(mine, lba, version.fetch_add(1));
          if (!btt->write(lba, mine.data())) errors++;
        } else if (rng.chance(1, 2)) {
          uint64_t v;
          if (!btt->read(lba, mine.data())) errors++;
          if (!untorn(mine, lba, &v)) torn++;
        } else {
          auto ref = btt->read_ref(lba);
          if (!ref) {
            errors++;
            continue;
          }
          std::memcpy(mine.data(), ref->data(), sector_size);
          uint64_t v;
          if (!untorn(mine, lba, &v)) torn++;
        }
        if (i % 500 == 0) btt->sync([](const Status&) {});
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(torn.load(), 0u);
  EXPECT_EQ(errors.load(), 0u);
  ASSERT_TRUE(btt->sync_wait());
  btt.reset();
  auto report = btt_check(*region, {}, false);
  ASSERT_TRUE(report) << report.status().to_string();
  EXPECT_TRUE(report->clean()) << ::testing::PrintToString(report->problems);
}

TEST(BttTorture, EightThreadsDirect4096) {
  torture(PersistMode::direct, 4096);
}
TEST(BttTorture, EightThreadsDirect512) {
  torture(PersistMode::direct, 512);
}
TEST(BttTorture, EightThreadsWriteback4096) {
  torture(PersistMode::writeback, 4096);
}

}  // namespace
}  // namespace vpmfs
