// A trace recorded by a live daemon (-o record=PATH), replayed the way vpmfs-crash replays it,
// gives only states its model allows. The model is restated here on its own, from the trace:
//
//  writeback: a device flush that completes makes durable every store made before it began;
//             each 4 KiB page then holds its durable content plus some prefix of the stores
//             made to it since (in the order they were made).
//  direct:    a store survives once its cache line was written back after it and a fence
//             followed; every other 8-byte word holds its durable value with any subset of
//             its later stores applied, in order.
//  kill:      every store before the crash point survives, and nothing after it.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mount/mount_fixture.h"
#include "test_util.h"
#include "vpmfs/crash_sim.h"

namespace vpmfs {
namespace {

constexpr uint64_t kPage = 4096;

// Writes files with fsyncs between them, on a mount that records its persistence trace.
CrashTrace record_workload(const std::string& name, const std::string& mode_options) {
  std::string trace_path =
      std::string("/dev/shm/vpmfs-trace-") + std::to_string(getpid()) + "-" + name;
  CrashTrace trace;
  {
    test::Mount m(name, {mode_options, "record=" + trace_path}, "32M");
    if (!m.mounted()) {
      ::unlink(trace_path.c_str());
      return trace;
    }
    for (int i = 0; i < 12; ++i) {
      std::string bytes = test::random_bytes("trace" + std::to_string(i), 3000 + i * 5000);
      int fd = ::open(m.path("f" + std::to_string(i % 5)).c_str(), O_CREAT | O_WRONLY, 0644);
      EXPECT_GE(fd, 0);
      EXPECT_EQ(::pwrite(fd, bytes.data(), bytes.size(), i * 1000), ssize_t(bytes.size()));
      if (i % 3 == 0) {
        EXPECT_EQ(::fsync(fd), 0);
      }
      ::close(fd);
    }
    EXPECT_EQ(m.unmount(), 0);
  }
  auto loaded = load_crash_trace(trace_path);
  ::unlink(trace_path.c_str());
  EXPECT_TRUE(loaded) << loaded.status().to_string();
  if (loaded) trace = std::move(*loaded);
  return trace;
}

void apply(const CrashTrace& t, const CrashEvent& e, std::vector<std::byte>& image) {
  std::memcpy(image.data() + e.off, t.data.data() + e.data, e.len);
}

// The store events of the first `cut` events.
std::vector<std::size_t> stores_before(const CrashTrace& t, std::size_t cut) {
  std::vector<std::size_t> stores;
  for (std::size_t i = 0; i < cut; ++i) {
    if (t.events[i].kind == CrashEventKind::store) stores.push_back(i);
  }
  return stores;
}

// How many of the first `cut` events' stores a completed device flush has made durable.
std::size_t durable_store_count(const CrashTrace& t, std::size_t cut) {
  std::deque<std::size_t> begun;  // stores made before each flush in flight began
  std::size_t stores = 0;
  std::size_t durable = 0;
  for (std::size_t i = 0; i < cut; ++i) {
    const CrashEvent& e = t.events[i];
    if (e.kind == CrashEventKind::store) ++stores;
    if (e.kind == CrashEventKind::flush_begin) begun.push_back(stores);
    if (e.kind == CrashEventKind::flush_end && !begun.empty()) {
      if (e.ok) durable = std::max(durable, begun.front());
      begun.pop_front();
    }
  }
  return durable;
}

// What a writeback crash after `cut` events may leave.
class WritebackModel {
 public:
  WritebackModel(const CrashTrace& t, std::size_t cut) : t_(t), base_(t.baseline) {
    stores_ = stores_before(t, cut);
    std::size_t durable = durable_store_count(t, cut);
    for (std::size_t s = 0; s < durable; ++s) apply(t, t.events[stores_[s]], base_);
    for (std::size_t s = durable; s < stores_.size(); ++s) {
      const CrashEvent& e = t.events[stores_[s]];
      for (uint64_t p = e.off / kPage; p * kPage < e.off + e.len; ++p) since_[p].push_back(s);
    }
  }

  ::testing::AssertionResult allows(const std::vector<std::byte>& image) const {
    for (uint64_t page = 0; page < base_.size() / kPage; ++page) {
      if (!page_allowed(page, image.data() + page * kPage)) {
        return ::testing::AssertionFailure()
               << "page " << page << " is no prefix of its stores after the last completed flush";
      }
    }
    return ::testing::AssertionSuccess();
  }

 private:
  bool page_allowed(uint64_t page, const std::byte* got) const {
    uint64_t lo = page * kPage;
    std::byte buf[kPage];
    std::memcpy(buf, base_.data() + lo, kPage);
    if (std::memcmp(buf, got, kPage) == 0) return true;
    auto it = since_.find(page);
    if (it == since_.end()) return false;
    for (std::size_t s : it->second) {
      const CrashEvent& e = t_.events[stores_[s]];
      uint64_t from = std::max(lo, e.off);
      uint64_t to = std::min(lo + kPage, e.off + e.len);
      std::memcpy(buf + (from - lo), t_.data.data() + e.data + (from - e.off), to - from);
      if (std::memcmp(buf, got, kPage) == 0) return true;
    }
    return false;
  }

  const CrashTrace& t_;
  std::vector<std::byte> base_;                         // the image at the last completed flush
  std::vector<std::size_t> stores_;                     // the store events before the cut
  std::map<uint64_t, std::vector<std::size_t>> since_;  // page -> its stores after that flush
};

// What a direct (real pmem) crash after `cut` events may leave.
class DirectModel {
 public:
  DirectModel(const CrashTrace& t, std::size_t cut) : durable_(t.baseline) {
    struct Piece {
      uint64_t off, len;
      const std::byte* src;
      bool written_back = false;
    };
    std::vector<Piece> pending;
    for (std::size_t i = 0; i < cut; ++i) {
      const CrashEvent& e = t.events[i];
      if (e.kind == CrashEventKind::store) {
        for (uint64_t off = e.off; off < e.off + e.len;) {  // one piece per 8-byte word
          uint64_t n = std::min(e.off + e.len, (off / 8 + 1) * 8) - off;
          pending.push_back({off, n, t.data.data() + e.data + (off - e.off)});
          off += n;
        }
      } else if (e.kind == CrashEventKind::flush && e.len > 0) {
        uint64_t lo = e.off / 64 * 64;
        uint64_t hi = (e.off + e.len + 63) / 64 * 64;
        for (Piece& p : pending) p.written_back |= p.off >= lo && p.off < hi;
      } else if (e.kind == CrashEventKind::fence) {
        for (const Piece& p : pending) {
          if (p.written_back) std::memcpy(durable_.data() + p.off, p.src, p.len);
        }
        std::erase_if(pending, [](const Piece& p) { return p.written_back; });
      }
    }
    for (const Piece& p : pending) {
      words_[p.off / 8].push_back({p.off % 8, p.len, p.src});
      pages_.insert(p.off / kPage);
    }
  }

  ::testing::AssertionResult allows(const std::vector<std::byte>& image) const {
    for (uint64_t page = 0; page < durable_.size() / kPage; ++page) {
      uint64_t lo = page * kPage;
      if (std::memcmp(durable_.data() + lo, image.data() + lo, kPage) == 0) continue;
      if (!pages_.count(page)) {
        return ::testing::AssertionFailure() << "page " << page << " changed with no store to it";
      }
      for (uint64_t w = lo / 8; w < (lo + kPage) / 8; ++w) {
        if (!word_allowed(w, image.data() + w * 8)) {
          return ::testing::AssertionFailure() << "word at " << w * 8 << " holds no stored value";
        }
      }
    }
    return ::testing::AssertionSuccess();
  }

 private:
  struct WordPiece {
    uint64_t at, len;
    const std::byte* src;
  };

  bool word_allowed(uint64_t w, const std::byte* got) const {
    uint64_t durable, value;
    std::memcpy(&durable, durable_.data() + w * 8, 8);
    std::memcpy(&value, got, 8);
    auto it = words_.find(w);
    if (it == words_.end()) return value == durable;
    std::set<uint64_t> possible = {durable};  // any subset of the stores, applied in order
    for (const WordPiece& p : it->second) {
      std::set<uint64_t> with = possible;
      for (uint64_t v : possible) {
        std::memcpy(reinterpret_cast<std::byte*>(&v) + p.at, p.src, p.len);
        with.insert(v);
      }
      possible = std::move(with);
    }
    return possible.count(value) > 0;
  }

  std::vector<std::byte> durable_;
  std::map<uint64_t, std::vector<WordPiece>> words_;  // word -> its stores not yet durable
  std::set<uint64_t> pages_;                          // pages holding such words
};

// Crash points: every completed flush or fence, and a few between.
std::vector<std::size_t> crash_points(const CrashTrace& t) {
  std::vector<std::size_t> points;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    auto k = t.events[i].kind;
    if (k == CrashEventKind::flush_end || k == CrashEventKind::fence) points.push_back(i + 1);
  }
  if (points.size() > 12) {  // every flush is a point the tool tries; a dozen of them do here
    std::vector<std::size_t> some;
    for (std::size_t k = 0; k < 12; ++k) some.push_back(points[k * points.size() / 12]);
    points = some;
  }
  for (std::size_t k = 1; k < 8; ++k) points.push_back(t.events.size() * k / 8);
  points.push_back(t.events.size());
  std::sort(points.begin(), points.end());
  points.erase(std::unique(points.begin(), points.end()), points.end());
  return points;
}

// Replays `t` under `crash_model` at every crash point and checks each state against Model.
template <typename Model>
void expect_states_allowed(const CrashTrace& t, CrashModel crash_model) {
  CrashReplay replay(t, crash_model);
  std::size_t checked = 0;
  bool undecided = false;  // a point where some store may or may not survive
  for (std::size_t cut : crash_points(t)) {
    replay.advance_to(cut);
    undecided |= replay.pending_stores() > 0;
    Model model(t, cut);
    for (uint64_t seed = 0; seed < 3; ++seed) {
      std::vector<std::byte> image = replay.image(seed);
      ASSERT_TRUE(model.allows(image)) << "cut " << cut << " seed " << seed;
      ++checked;
      if (seed == 0) {  // and the check can fail: a byte no store wrote is refused
        image.back() = ~image.back();
        EXPECT_FALSE(model.allows(image)) << "cut " << cut;
      }
    }
  }
  EXPECT_TRUE(undecided);
  EXPECT_GE(checked, 30u);
}

TEST(CrashTraceFromDaemon, WritebackStatesAreOnesTheModelAllows) {
  CrashTrace t = record_workload("trace-wb", "sync_dax=writeback");
  ASSERT_FALSE(t.events.empty());
  ASSERT_EQ(t.mode, PersistMode::writeback);
  std::size_t flushes = 0;
  for (const auto& e : t.events) flushes += e.kind == CrashEventKind::flush_end;
  ASSERT_GE(flushes, 4u) << "every fsync reaches the device";
  expect_states_allowed<WritebackModel>(t, CrashModel::writeback);
}

TEST(CrashTraceFromDaemon, DirectStatesAreOnesTheModelAllows) {
  CrashTrace t = record_workload("trace-direct", "sync_dax=direct");
  ASSERT_FALSE(t.events.empty());
  ASSERT_EQ(t.mode, PersistMode::direct);
  expect_states_allowed<DirectModel>(t, CrashModel::direct);
}

TEST(CrashTraceFromDaemon, KillStatesKeepEveryStoreBeforeTheCut) {
  CrashTrace t = record_workload("trace-kill", "sync_dax=writeback");
  ASSERT_FALSE(t.events.empty());
  CrashReplay replay(t, CrashModel::kill);
  std::vector<std::byte> expect = t.baseline;
  std::size_t applied = 0;
  for (std::size_t cut : crash_points(t)) {
    for (; applied < cut; ++applied) {
      if (t.events[applied].kind == CrashEventKind::store) apply(t, t.events[applied], expect);
    }
    replay.advance_to(cut);
    ASSERT_TRUE(replay.image(7) == expect) << "cut " << cut;
  }
}

}  // namespace
}  // namespace vpmfs
