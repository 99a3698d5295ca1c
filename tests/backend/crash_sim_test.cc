#include "vpmfs/crash_sim.h"

#include <cstring>
#include <set>
#include <tuple>

#include <gtest/gtest.h>

#include "test_util.h"

namespace vpmfs {
namespace {

using test::TempPath;

constexpr int kSeeds = 400;

std::unique_ptr<Region> open_region(const std::string& path, PersistMode mode) {
  RegionOptions o;
  o.create_size = 1 << 20;
  o.mode = mode;
  o.force_persistent = true;
  auto r = Region::open(path, o);
  EXPECT_TRUE(r) << r.status().to_string();
  return std::move(r.value());
}

uint64_t word(const std::vector<std::byte>& image, uint64_t off) {
  uint64_t v;
  std::memcpy(&v, image.data() + off, 8);
  return v;
}

TEST(CrashSimDirect, LaterStoreCanSurviveWhileEarlierIsLost) {
  TempPath path("cs1.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  region->store64(0, 1);    // earlier, line 0
  region->store64(64, 2);   // later, line 1
  region->store64(128, 3);  // same line twice: line 2
  region->store64(128, 4);
  rec.detach();

  std::set<std::tuple<uint64_t, uint64_t>> pairs;
  std::set<uint64_t> same_word;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    auto img = rec.crash_image(CrashModel::direct, rec.events(), seed);
    pairs.insert({word(img, 0), word(img, 64)});
    same_word.insert(word(img, 128));
  }
  EXPECT_EQ(pairs.size(), 4u) << "every subset of unpersisted lines must be possible";
  EXPECT_TRUE(pairs.count({0, 2}))
      << "later store kept, earlier lost: the case naive replay misses";
  EXPECT_EQ(same_word, (std::set<uint64_t>{0, 3, 4})) << "a word holds one of its stored values";
}

TEST(CrashSimDirect, WordsAreAtomicButStoresAreNot) {
  TempPath path("cs2.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  uint64_t big[4] = {~0ull, ~0ull, ~0ull, ~0ull};
  region->write(8, big, sizeof big);  // 32 bytes over words 1..4
  uint32_t small = 0xFFFFFFFF;
  region->write(100, &small, 4);  // inside one word
  rec.detach();

  bool torn_across_words = false;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    auto img = rec.crash_image(CrashModel::direct, rec.events(), seed);
    std::set<uint64_t> values;
    for (int w = 1; w <= 4; ++w) {
      uint64_t v = word(img, w * 8);
      ASSERT_TRUE(v == 0 || v == ~0ull) << "a torn 8-byte word at seed " << seed;
      values.insert(v);
    }
    torn_across_words |= values.size() == 2;
    uint32_t s;
    std::memcpy(&s, img.data() + 100, 4);
    ASSERT_TRUE(s == 0 || s == 0xFFFFFFFF) << "a torn aligned 4-byte store at seed " << seed;
  }
  EXPECT_TRUE(torn_across_words) << "a multi-word store must be able to tear between words";
}

TEST(CrashSimDirect, OnlyWriteBackPlusFenceMakesDurable) {
  TempPath path("cs3.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  region->store64(0, 7);
  region->flush(0, 8);
  std::size_t flushed_not_fenced = rec.events();
  region->fence();
  std::size_t fenced = rec.events();
  region->store64(0, 8);  // after the fence: not durable
  region->store64(64, 9);
  region->flush(64, 8);  // written back, never fenced
  rec.detach();

  std::set<uint64_t> at_flush, after;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    at_flush.insert(word(rec.crash_image(CrashModel::direct, flushed_not_fenced, seed), 0));
    auto img = rec.crash_image(CrashModel::direct, rec.events(), seed);
    ASSERT_NE(word(img, 0), 0u) << "a fenced write-back was lost at seed " << seed;
    after.insert(word(img, 64));
    ASSERT_EQ(word(rec.crash_image(CrashModel::direct, fenced, seed), 0), 7u);
  }
  EXPECT_EQ(at_flush, (std::set<uint64_t>{0, 7})) << "write-back without fence is not durable";
  EXPECT_EQ(after, (std::set<uint64_t>{0, 9}));
}

TEST(CrashSimDirect, StoreAfterWriteBackOfItsLineIsNotCoveredByTheFence) {
  TempPath path("cs4.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  region->store64(0, 1);
  region->flush(0, 64);
  region->store64(8, 2);  // same line, after the write-back was issued
  region->fence();
  rec.detach();
  std::set<uint64_t> second;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    auto img = rec.crash_image(CrashModel::direct, rec.events(), seed);
    ASSERT_EQ(word(img, 0), 1u);
    second.insert(word(img, 8));
  }
  EXPECT_EQ(second, (std::set<uint64_t>{0, 2}));
}

TEST(CrashSimDirect, PersistIsDurableAndPrefixKeepsEverything) {
  TempPath path("cs5.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  region->store64(0, 5);
  region->persist(0, 8);
  region->store64(4096, 6);
  rec.detach();
  for (uint64_t seed = 0; seed < 50; ++seed) {
    EXPECT_EQ(word(rec.crash_image(CrashModel::direct, rec.events(), seed), 0), 5u);
  }
  auto prefix = rec.prefix_image(rec.events());
  EXPECT_EQ(word(prefix, 0), 5u);
  EXPECT_EQ(word(prefix, 4096), 6u);
  EXPECT_EQ(word(rec.prefix_image(1), 0), 5u);
  EXPECT_EQ(word(rec.prefix_image(0), 0), 0u);
}

TEST(CrashSimDirect, RawStoresAreSeenWhenPersisted) {
  TempPath path("cs6.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  std::memset(region->at(256), 0xAB, 24);  // a store that bypassed Region::write
  region->persist(256, 24);
  rec.detach();
  auto img = rec.crash_image(CrashModel::direct, rec.events(), 1);
  for (int i = 0; i < 24; ++i) ASSERT_EQ(img[256 + i], std::byte{0xAB});
}

TEST(CrashSimWriteback, PagesSurviveInAnySubsetUntilAFlushCompletes) {
  TempPath path("cs7.img");
  auto region = open_region(path, PersistMode::writeback);
  CrashRecorder rec(*region);
  region->store64(0, 1);     // page 0
  region->store64(4096, 2);  // page 1, later
  region->persist(0, 8192);
  std::size_t before_flush = rec.events();
  ASSERT_TRUE(region->flush_channel().wait());
  std::size_t after_flush = rec.events();
  region->store64(0, 3);
  region->store64(8, 4);  // same page, later
  rec.detach();

  std::set<std::tuple<uint64_t, uint64_t>> pairs;
  std::set<std::tuple<uint64_t, uint64_t>> in_page;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    auto img = rec.crash_image(CrashModel::writeback, before_flush, seed);
    pairs.insert({word(img, 0), word(img, 4096)});
    auto done = rec.crash_image(CrashModel::writeback, after_flush, seed);
    ASSERT_EQ(word(done, 0), 1u);
    ASSERT_EQ(word(done, 4096), 2u);
    auto end = rec.crash_image(CrashModel::writeback, rec.events(), seed);
    in_page.insert({word(end, 0), word(end, 8)});
    ASSERT_EQ(word(end, 4096), 2u);
  }
  EXPECT_EQ(pairs.size(), 4u);
  EXPECT_TRUE(pairs.count({0, 2})) << "a later page can persist while an earlier one is lost";
  // Within a page, what survives is a state the page held: never the later store alone.
  EXPECT_EQ(in_page, (std::set<std::tuple<uint64_t, uint64_t>>{{1, 0}, {3, 0}, {3, 4}}));
}

TEST(CrashSimWriteback, StoresDuringAFlushAreNotCoveredByIt) {
  TempPath path("cs8.img");
  auto region = open_region(path, PersistMode::writeback);
  CrashRecorder rec(*region);
  region->store64(0, 1);
  rec.device_flush_begin();
  region->store64(8, 2);  // after the flush began
  rec.device_flush_end(true);
  rec.detach();
  std::set<uint64_t> late;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    auto img = rec.crash_image(CrashModel::writeback, rec.events(), seed);
    ASSERT_EQ(word(img, 0), 1u);
    late.insert(word(img, 8));
  }
  EXPECT_EQ(late, (std::set<uint64_t>{0, 2}));
}

TEST(CrashSimWriteback, FailedFlushMakesNothingDurable) {
  TempPath path("cs9.img");
  auto region = open_region(path, PersistMode::writeback);
  CrashRecorder rec(*region);
  region->store64(0, 1);
  region->persist(0, 8);
  region->flush_channel().inject_failures(1);
  EXPECT_FALSE(region->flush_channel().wait());
  rec.detach();
  std::set<uint64_t> seen;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    seen.insert(word(rec.crash_image(CrashModel::writeback, rec.events(), seed), 0));
  }
  EXPECT_EQ(seen, (std::set<uint64_t>{0, 1}));
}

TEST(CrashSim, SameSeedSameImageAndReplayMatchesOneShot) {
  TempPath path("cs10.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  for (uint64_t i = 0; i < 200; ++i) {
    region->store64((i * 72) % 8192, i + 1);
    if (i % 7 == 0) region->persist((i * 72) % 8192, 8);
  }
  rec.detach();
  for (CrashModel model : {CrashModel::direct, CrashModel::writeback}) {
    CrashReplay replay(rec, model);
    for (std::size_t cut = 0; cut <= rec.events(); cut += 13) {
      replay.advance_to(cut);
      for (uint64_t seed : {1ull, 99ull}) {
        auto a = rec.crash_image(model, cut, seed);
        ASSERT_EQ(a, rec.crash_image(model, cut, seed));
        ASSERT_EQ(a, replay.image(seed)) << "cut " << cut << " model " << to_string(model);
      }
    }
  }
}

TEST(CrashSim, WritesImageFiles) {
  TempPath path("cs11.img");
  TempPath out("cs11-crash.img");
  auto region = open_region(path, PersistMode::direct);
  CrashRecorder rec(*region);
  region->store64(0, 42);
  region->persist(0, 8);
  rec.detach();
  ASSERT_TRUE(write_image_file(out, rec.crash_image(CrashModel::direct, rec.events(), 3)));
  RegionOptions o;
  o.force_persistent = true;
  auto crashed = Region::open(out, o);
  ASSERT_TRUE(crashed) << crashed.status().to_string();
  EXPECT_EQ((*crashed)->size(), 1u << 20);
  uint64_t v;
  std::memcpy(&v, (*crashed)->at(0), 8);
  EXPECT_EQ(v, 42u);
}

}  // namespace
}  // namespace vpmfs

namespace vpmfs {
namespace {

// A trace streamed to a file and loaded back gives every crash image the in-memory recording
// gives, bit for bit, in every model: the model checks above carry over to the daemon's traces.
TEST(CrashTraceFile, LoadedTraceReplaysLikeTheRecording) {
  for (PersistMode mode : {PersistMode::direct, PersistMode::writeback}) {
    TempPath a("tf-a.img"), b("tf-b.img"), trace("tf.trace");
    auto ra = open_region(a, mode);
    auto rb = open_region(b, mode);
    CrashRecorder mem(*ra);
    auto file = CrashRecorder::record_to_file(*rb, trace);
    ASSERT_TRUE(file) << file.status().to_string();
    for (Region* r : {ra.get(), rb.get()}) {
      for (uint64_t i = 0; i < 64; ++i) {
        std::string bytes = test::random_bytes(std::to_string(i), 100 + i * 37);
        r->write((i * 4099) % ((1 << 20) - 8192), bytes.data(), bytes.size());
        if (i % 5 == 0) r->store64(i * 64, i);
        if (i % 7 == 0) r->persist(0, 1 << 20);
        if (i % 11 == 0) {
          ASSERT_TRUE(r->flush_channel().wait());
        }
      }
    }
    mem.detach();
    ASSERT_TRUE((*file)->finish());
    auto loaded = load_crash_trace(trace);
    ASSERT_TRUE(loaded) << loaded.status().to_string();
    ASSERT_EQ(loaded->events.size(), mem.events());
    EXPECT_EQ(loaded->mode, mode);
    std::vector<CrashModel> models = {
        CrashModel::kill, mode == PersistMode::direct ? CrashModel::direct : CrashModel::writeback};
    for (CrashModel model : models) {
      CrashReplay from_file(*loaded, model);
      for (std::size_t cut = 0; cut <= mem.events(); cut += 13) {
        from_file.advance_to(cut);
        for (uint64_t seed = 0; seed < 4; ++seed) {
          ASSERT_EQ(from_file.image(seed), mem.crash_image(model, cut, seed))
              << to_string(model) << " cut " << cut << " seed " << seed;
        }
      }
    }
  }
}

TEST(CrashTraceFile, RefusesWhatIsNotATrace) {
  TempPath p("tf-bad.trace");
  std::string junk(8192, 'x');
  ASSERT_TRUE(write_image_file(
      p, std::vector<std::byte>(reinterpret_cast<const std::byte*>(junk.data()),
                                reinterpret_cast<const std::byte*>(junk.data()) + 8192)));
  EXPECT_FALSE(load_crash_trace(p));
  EXPECT_FALSE(load_crash_trace("/nonexistent/trace"));
}

}  // namespace
}  // namespace vpmfs
