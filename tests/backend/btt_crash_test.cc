// Crash torture: a sector workload recorded by the crash simulator, then crashed at thousands
// of points under both crash models. After every crash the BTT must open (recovering on its
// own), check clean, and show every sector untorn, holding either the content it had when the
// crash point was last guaranteed durable or a newer one written before the crash.
//
// VPMFS_CRASH_SCALE multiplies the number of crash points (the soak run uses 20).
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "test_util.h"
#include "vpmfs/btt.h"
#include "vpmfs/crash_sim.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::TempPath;

// The intent log in the first 64 KiB, then one minimum-size arena.
constexpr uint64_t kBttOffset = 64 << 10;
constexpr uint64_t kSize = kBttOffset + (16 << 20);

BttFormatOptions format_options(uint32_t lanes) {
  BttFormatOptions o;
  o.nfree = lanes;
  o.offset = kBttOffset;
  o.intent_log = 0;
  return o;
}

BttOpenOptions open_options() {
  BttOpenOptions o;
  o.offset = kBttOffset;
  o.intent_log = 0;
  return o;
}
constexpr uint64_t kLbas = 48;
constexpr uint64_t kZeroVersion = ~0ull;

uint64_t scale() {
  const char* s = std::getenv("VPMFS_CRASH_SCALE");
  return s != nullptr ? std::max<uint64_t>(1, std::strtoull(s, nullptr, 10)) : 1;
}

void fill(std::vector<uint64_t>& buf, uint64_t lba, uint64_t version) {
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = (lba << 40) ^ (version << 8) ^ i;
}

// The version a sector holds, kZeroVersion for zeros, or nullopt if it is torn.
std::optional<uint64_t> version_of(const std::vector<uint64_t>& buf, uint64_t lba) {
  bool zero = true;
  for (uint64_t w : buf) zero &= w == 0;
  if (zero) return kZeroVersion;
  uint64_t v = (buf[0] ^ (lba << 40)) >> 8;
  for (std::size_t i = 0; i < buf.size(); ++i) {
    if (buf[i] != ((lba << 40) ^ (v << 8) ^ i)) return std::nullopt;
  }
  return v;
}

struct Update {
  uint64_t lba;
  uint64_t version;     // kZeroVersion for a trim
  std::size_t started;  // events before the call
  std::size_t durable;  // events by which it is guaranteed durable (SIZE_MAX: never)
};

struct Recording {
  std::unique_ptr<CrashRecorder> recorder;
  std::vector<Update> updates;
};

std::unique_ptr<Region> open_region(const std::string& path, PersistMode mode) {
  RegionOptions o;
  o.create_size = kSize;
  o.mode = mode;
  o.force_persistent = true;
  auto r = Region::open(path, o);
  EXPECT_TRUE(r) << r.status().to_string();
  return std::move(r.value());
}

// Writes, rewrites and trims sectors; in writeback mode a sync every few updates.
Recording record(Region& region, PersistMode mode, uint64_t updates, uint64_t seed,
                 uint32_t lanes = 256) {
  EXPECT_TRUE(Btt::format(region, format_options(lanes)));
  auto btt = Btt::open(region, open_options());
  EXPECT_TRUE(btt) << btt.status().to_string();
  std::vector<uint64_t> buf(4096 / 8);
  for (uint64_t lba = 0; lba < kLbas; ++lba) {
    fill(buf, lba, 0);
    EXPECT_TRUE((*btt)->write(lba, buf.data()));
  }
  // A commit, not a sync: the recorder copies the region and then sees every store, so nothing
  // may store in between. A sync can return while a commit that the writes started is still
  // storing map entries on the flush channel's thread (a map entry stored between the copy and
  // the attach is in neither, and recovery then trusts a lane's newer flog entry over a map
  // entry that was never stored). commit_wait returns once no commit is in flight.
  EXPECT_TRUE((*btt)->commit_wait());

  Recording rec;
  rec.recorder = std::make_unique<CrashRecorder>(region);
  CrashRecorder& r = *rec.recorder;
  SplitMix64 rng(seed);
  std::size_t unsynced = 0;
  for (uint64_t i = 1; i <= updates; ++i) {
    uint64_t lba = rng.below(kLbas);
    Update u{lba, i, r.events(), SIZE_MAX};
    if (rng.chance(1, 10) && i + 1 < updates) {
      // Several sectors in one write_sectors call (more than one batch of the BTT's, sometimes,
      // and a sector twice): each is atomic on its own, the later of a pair wins.
      uint64_t n = std::min<uint64_t>(2 + rng.below(20), updates - i + 1);
      std::vector<uint64_t> lbas;
      std::vector<uint64_t> data;
      for (uint64_t k = 0; k < n; ++k) {
        lbas.push_back(k == 0 ? lba : rng.below(kLbas));
        fill(buf, lbas.back(), i + k);
        data.insert(data.end(), buf.begin(), buf.end());
      }
      EXPECT_TRUE((*btt)->write_sectors(lbas.data(), n, reinterpret_cast<std::byte*>(data.data())));
      for (uint64_t k = 0; k < n; ++k) {
        Update b{lbas[k], i + k, u.started, SIZE_MAX};
        if (mode == PersistMode::direct) b.durable = r.events();
        rec.updates.push_back(b);
      }
      unsynced += n;
      i += n - 1;
    } else {
      if (rng.chance(1, 16)) {
        u.version = kZeroVersion;
        EXPECT_TRUE((*btt)->trim(lba));
      } else {
        fill(buf, lba, i);
        EXPECT_TRUE((*btt)->write(lba, buf.data()));
      }
      if (mode == PersistMode::direct) u.durable = r.events();
      rec.updates.push_back(u);
      ++unsynced;
    }
    if (mode == PersistMode::writeback && (rng.chance(1, 6) || i == updates)) {
      EXPECT_TRUE((*btt)->sync_wait());
      for (std::size_t k = rec.updates.size() - unsynced; k < rec.updates.size(); ++k) {
        rec.updates[k].durable = r.events();
      }
      unsynced = 0;
    }
  }
  rec.recorder->detach();
  return rec;
}

// Checks one crashed image, already in `crashed`. Returns a description of the first failure.
std::string verify(Region& crashed, const std::vector<Update>& updates, std::size_t cut) {
  auto btt = Btt::open(crashed, open_options());
  if (!btt) return "open failed: " + btt.status().to_string();
  std::vector<uint64_t> buf(4096 / 8);
  for (uint64_t lba = 0; lba < kLbas; ++lba) {
    // What the sector may hold: the newest update known durable at the cut (or the initial
    // version 0), or any newer update that had started before the cut.
    std::set<uint64_t> allowed = {0};
    for (const Update& u : updates) {
      if (u.lba != lba) continue;
      if (u.durable <= cut)
        allowed = {u.version};
      else if (u.started < cut)
        allowed.insert(u.version);
    }
    Status s = (*btt)->read(lba, buf.data());
    if (!s) return "read of LBA " + std::to_string(lba) + " failed: " + s.to_string();
    auto v = version_of(buf, lba);
    if (!v) return "LBA " + std::to_string(lba) + " is torn";
    if (allowed.count(*v) == 0) {
      std::string a;
      for (uint64_t x : allowed) a += (x == kZeroVersion ? "zero" : std::to_string(x)) + " ";
      return "LBA " + std::to_string(lba) + " holds version " +
             (*v == kZeroVersion ? "zero" : std::to_string(*v)) + ", allowed: " + a;
    }
  }
  btt->reset();
  auto report = btt_check(crashed, open_options(), false);
  if (!report) return "check failed: " + report.status().to_string();
  if (!report->clean()) return "check after recovery: " + report->problems.front();
  return "";
}

uint64_t crash_everywhere(PersistMode mode, CrashModel model, uint64_t updates, uint64_t seeds,
                          uint64_t seed, uint32_t lanes = 256) {
  TempPath path("crash-src.img");
  TempPath target("crash-dst.img");
  auto region = open_region(path, mode);
  Recording rec = record(*region, mode, updates, seed, lanes);
  // Crashed images are opened as direct regions: recovery does not depend on the model.
  auto crashed = open_region(target, PersistMode::direct);
  CrashReplay replay(*rec.recorder, model);
  uint64_t points = 0;
  for (std::size_t cut = 0; cut <= rec.recorder->events(); ++cut) {
    replay.advance_to(cut);
    for (uint64_t k = 0; k < seeds; ++k) {
      uint64_t crash_seed = seed * 1000003 + cut * 31 + k;
      replay.image_into(crash_seed, crashed->base());
      std::string failure = verify(*crashed, rec.updates, cut);
      ++points;
      if (!failure.empty()) {
        ADD_FAILURE() << to_string(model) << " crash at cut " << cut << " of "
                      << rec.recorder->events() << " (seed " << crash_seed << "): " << failure;
        return points;
      }
    }
  }
  return points;
}

TEST(BttCrash, DirectModelEveryEvent) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_everywhere(PersistMode::direct, CrashModel::direct, 160, 3, 11 + run);
  }
  std::printf("direct model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 5000u * scale());
}

TEST(BttCrash, WritebackModelEveryEvent) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_everywhere(PersistMode::writeback, CrashModel::writeback, 400, 2, 23 + run);
  }
  std::printf("writeback model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 5000u * scale());
}

// With 6 lanes for 48 sectors an epoch commits every few writes, so commits land between syncs
// and between the writes that supersede synced ones (their records retired before the flog).
TEST(BttCrash, WritebackModelWithFewLanes) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_everywhere(PersistMode::writeback, CrashModel::writeback, 250, 2, 41 + run, 6);
  }
  std::printf("writeback model, 6 lanes: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 5000u * scale());
}

TEST(BttCrash, KilledProcessKeepsEveryReturnedWrite) {
  // A process kill loses no store: every update that returned must be there, sync or not.
  TempPath path("crash-kill.img");
  TempPath target("crash-kill-dst.img");
  TempPath target2("crash-kill-dst2.img");
  for (PersistMode mode : {PersistMode::direct, PersistMode::writeback}) {
    auto region = open_region(path, mode);
    Recording rec = record(*region, mode, 300, 99);
    auto crashed = open_region(target, PersistMode::direct);
    for (std::size_t cut = 0; cut <= rec.recorder->events(); cut += 7) {
      auto image = rec.recorder->prefix_image(cut);
      std::memcpy(crashed->base(), image.data(), image.size());
      std::vector<Update> returned = rec.updates;
      // Under a kill a returned update is as good as durable once its call ended; approximate
      // the end by the start of the next call (the sectors of one write_sectors call share
      // their start).
      std::size_t next_start = SIZE_MAX;
      for (std::size_t k = returned.size(); k-- > 0;) {
        std::size_t start = returned[k].started;
        if (mode == PersistMode::writeback && next_start != SIZE_MAX) {
          returned[k].durable = next_start;
        }
        if (k == 0 || returned[k - 1].started != start) next_start = start;
      }
      std::string failure = verify(*crashed, returned, cut);
      ASSERT_TRUE(failure.empty()) << to_string(mode) << " kill at cut " << cut << ": " << failure;
      if (mode != PersistMode::writeback) continue;
      // Killed again while recovery commits the writes it took back (its flushes never
      // complete): the next recovery must still find every one of them.
      {
        auto again = open_region(target2, PersistMode::writeback);
        std::memcpy(again->base(), image.data(), image.size());
        again->flush_channel().inject_failures(1 << 20);
        auto btt = Btt::open(*again, open_options());
        if (btt) (void)(*btt)->sync_wait();
      }
      auto reopened = open_region(target2, PersistMode::direct);
      failure = verify(*reopened, returned, cut);
      ASSERT_TRUE(failure.empty()) << "killed twice at cut " << cut << ": " << failure;
    }
    region.reset();
  }
}

// A writeback crash between a commit's flog and its intent header leaves a record of an epoch
// that never committed; recovery rolls its update forward, so its block is mapped and the record
// is dead. A direct open writes no records: its first write of that sector hands the block back
// to the lane as its free block, the record's test (block is the lane's free block, data hash
// holds) passes again, and the open after that took the long overwritten write back. With one
// lane every write goes through the record's lane, so every cut of the commit is tried.
TEST(BttCrash, ADirectOpenAfterAWritebackCrashLeavesNoRecordToComeBack) {
  TempPath path("crash-stale.img");
  TempPath target("crash-stale-dst.img");
  auto region = open_region(path, PersistMode::writeback);
  ASSERT_TRUE(Btt::format(*region, format_options(1)));
  std::vector<uint64_t> buf(4096 / 8);
  CrashRecorder* recorder = nullptr;
  std::unique_ptr<CrashRecorder> owned;
  {
    auto btt = Btt::open(*region, open_options());
    ASSERT_TRUE(btt) << btt.status().to_string();
    fill(buf, 0, 1);
    ASSERT_TRUE((*btt)->write(0, buf.data()));
    ASSERT_TRUE((*btt)->commit_wait());
    owned = std::make_unique<CrashRecorder>(*region);
    recorder = owned.get();
    fill(buf, 0, 2);
    ASSERT_TRUE((*btt)->write(0, buf.data()));
    ASSERT_TRUE((*btt)->commit_wait());
  }
  recorder->detach();
  auto crashed = open_region(target, PersistMode::direct);
  for (std::size_t cut = 0; cut <= recorder->events(); ++cut) {
    auto image = recorder->prefix_image(cut);
    std::memcpy(crashed->base(), image.data(), image.size());
    {
      auto btt = Btt::open(*crashed, open_options());
      ASSERT_TRUE(btt) << "cut " << cut << ": " << btt.status().to_string();
      fill(buf, 0, 3);
      ASSERT_TRUE((*btt)->write(0, buf.data()));
    }
    auto btt = Btt::open(*crashed, open_options());
    ASSERT_TRUE(btt) << "cut " << cut << ": " << btt.status().to_string();
    ASSERT_TRUE((*btt)->read(0, buf.data()));
    auto v = version_of(buf, 0);
    ASSERT_TRUE(v.has_value()) << "cut " << cut << ": torn";
    ASSERT_EQ(*v, 3u) << "cut " << cut << " of " << recorder->events()
                      << ": the write of the direct open was lost to an older one";
  }
}

}  // namespace
}  // namespace vpmfs
