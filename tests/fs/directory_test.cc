// Directories at scale: a hundred thousand entries created, removed and added again under names
// of other lengths, each found by name with its inode and listed exactly once, before and after
// a remount; space freed in old blocks taken again before the directory grows; readdir cookies
// that hold while entries come and go.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"
#include "vpmfs/fs.h"
#include "vpmfs/fsck.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::TempPath;

// A name of exactly `len` bytes (at least 8), different for every id below 10,000,000.
std::string name_of(uint64_t id, std::size_t len) {
  std::string s(1, 'n');
  s += std::to_string(id);
  s += '-';
  s.resize(len, 'x');
  return s;
}

// Fisher-Yates with the project's deterministic generator.
template <typename T>
void shuffle(std::vector<T>& v, uint64_t seed) {
  SplitMix64 rng(seed);
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

class DirectoryTest : public ::testing::TestWithParam<PersistMode> {
 protected:
  void SetUp() override {
    MkfsOptions o;
    o.size = 512 << 20;
    o.inode_ratio = 4096;  // 131,072 inodes
    o.force_persistent = true;
    ASSERT_TRUE(Volume::mkfs(path_, o));
    mount();
    auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
    ASSERT_TRUE(d) << d.status().to_string();
    dir_ = d->ino;
  }
  void mount() {
    v_.reset();
    MountOptions m;
    m.mode = GetParam();
    m.force_persistent = true;
    auto v = Volume::mount(path_, m);
    ASSERT_TRUE(v) << v.status().to_string();
    v_ = std::move(v.value());
  }
  void create(const std::string& name) {
    auto a = v_->mknod(dir_, name, S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(a) << name << ": " << a.status().to_string();
    want_[name] = a->ino;
  }
  void remove(const std::string& name) {
    Status s = v_->unlink(dir_, name);
    ASSERT_TRUE(s) << name << ": " << s.to_string();
    want_.erase(name);
  }
  uint64_t dir_size() { return v_->getattr(dir_)->size; }
  // Every expected name is found with its inode, and readdir, in calls of 100 entries as the
  // kernel makes them, lists each exactly once and nothing else.
  void expect_entries() {
    for (const auto& [name, ino] : want_) {
      auto a = v_->lookup(dir_, name);
      ASSERT_TRUE(a) << name << ": " << a.status().to_string();
      ASSERT_EQ(a->ino, ino) << name;
    }
    std::map<std::string, uint64_t> listed;
    uint64_t cookie = 0;
    for (bool more = true; more;) {
      int taken = 0;
      more = false;
      ASSERT_TRUE(v_->readdir(dir_, cookie, [&](const DirEntry& e) {
        if (taken == 100) {
          more = true;
          return false;
        }
        ++taken;
        cookie = e.next_offset;
        if (e.name == "." || e.name == "..") return true;
        EXPECT_TRUE(listed.emplace(e.name, e.ino).second) << e.name << " listed twice";
        return true;
      }));
    }
    EXPECT_EQ(listed.size(), want_.size());
    EXPECT_TRUE(listed == want_) << "readdir does not list exactly the names created";
  }
  void expect_fsck_clean() {
    v_.reset();
    auto report = fsck(path_, FsckOptions{});
    ASSERT_TRUE(report) << report.status().to_string();
    EXPECT_TRUE(report->problems.empty()) << report->problems.front();
    mount();
  }

  TempPath path_{"directory.img"};
  std::unique_ptr<Volume> v_;
  uint64_t dir_ = 0;
  std::map<std::string, uint64_t> want_;  // name -> inode
};

TEST_P(DirectoryTest, HundredThousandEntriesRemovedAndAddedAgain) {
  constexpr uint64_t kCount = 100000;
  for (uint64_t i = 0; i < kCount; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(i, 8 + i % 48)));
  // Every other one goes, and comes back under a name of another length: some shorter, some
  // longer than the hole it left.
  for (uint64_t i = 1; i < kCount; i += 2) ASSERT_NO_FATAL_FAILURE(remove(name_of(i, 8 + i % 48)));
  for (uint64_t i = 1; i < kCount; i += 2) {
    ASSERT_NO_FATAL_FAILURE(create(name_of(kCount + i, 8 + (i * 7) % 120)));
  }
  ASSERT_EQ(want_.size(), kCount);
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  mount();  // the name index is built again from the blocks
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  ASSERT_NO_FATAL_FAILURE(expect_fsck_clean());
  ASSERT_NO_FATAL_FAILURE(expect_entries());
}

TEST_P(DirectoryTest, FreedSpaceInOldBlocksIsTakenBeforeTheDirectoryGrows) {
  // 20,000 names of 16 bytes, 32-byte records: a new directory fills block after block.
  for (uint64_t i = 0; i < 20000; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(i, 16)));
  const uint64_t size = dir_size();
  // The oldest half goes in random order, which leaves the first blocks wholly free...
  std::vector<uint64_t> oldest(10000);
  std::iota(oldest.begin(), oldest.end(), 0);
  shuffle(oldest, 1);
  for (uint64_t i : oldest) ASSERT_NO_FATAL_FAILURE(remove(name_of(i, 16)));
  EXPECT_EQ(dir_size(), size);
  // ... and they take names of other lengths, 312,000 bytes of records in the 320,000 freed:
  // 3,000 of 48 bytes and 7,000 of 24.
  for (uint64_t i = 0; i < 3000; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(20000 + i, 32)));
  for (uint64_t i = 0; i < 7000; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(30000 + i, 8)));
  EXPECT_EQ(dir_size(), size);
  // Holes between live entries: every other one of the newer half goes, and names of the same
  // or a shorter length fill the holes.
  for (uint64_t i = 10000; i < 20000; i += 2) ASSERT_NO_FATAL_FAILURE(remove(name_of(i, 16)));
  for (uint64_t i = 0; i < 5000; ++i) {
    ASSERT_NO_FATAL_FAILURE(create(name_of(40000 + i, 8 + i % 9)));
  }
  EXPECT_EQ(dir_size(), size);
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  mount();
  EXPECT_EQ(dir_size(), size);
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  ASSERT_NO_FATAL_FAILURE(expect_fsck_clean());
}

TEST_P(DirectoryTest, BlocksEmptiedInAnyOrderTakeTheLongestNames) {
  // 1,020 records of 24 bytes: six blocks, each 170 records (the last of them 40 bytes long).
  std::vector<std::string> names;
  for (uint64_t i = 0; i < 1020; ++i) names.push_back(name_of(i, 8));
  for (const auto& n : names) ASSERT_NO_FATAL_FAILURE(create(n));
  const uint64_t size = dir_size();
  ASSERT_EQ(size, 6 * v_->block_size());
  shuffle(names, 2);
  for (const auto& n : names) ASSERT_NO_FATAL_FAILURE(remove(n));
  // Each block is one free record again: fifteen 255-byte names (272-byte records) fit in each.
  for (uint64_t i = 0; i < 6 * 15; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(2000 + i, 255)));
  EXPECT_EQ(dir_size(), size);
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  mount();
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  ASSERT_NO_FATAL_FAILURE(expect_fsck_clean());
}

TEST_P(DirectoryTest, ReaddirCookiesHoldWhileEntriesComeAndGo) {
  for (uint64_t i = 0; i < 5000; ++i) ASSERT_NO_FATAL_FAILURE(create(name_of(i, 8 + i % 40)));
  const std::map<std::string, uint64_t> before = want_;
  std::set<std::string> removed;  // of those there when the listing began
  std::set<std::string> added;
  std::multiset<std::string> listed;
  SplitMix64 rng(3);
  uint64_t cookie = 0;
  for (bool more = true; more;) {
    int taken = 0;
    more = false;
    ASSERT_TRUE(v_->readdir(dir_, cookie, [&](const DirEntry& e) {
      if (taken == 50) {
        more = true;
        return false;
      }
      ++taken;
      cookie = e.next_offset;
      if (e.name != "." && e.name != "..") listed.insert(e.name);
      return true;
    }));
    // Between two calls 20 entries go, listed or not, and 20 new ones of any length come:
    // free records merge around the place the cookie points at, and holes fill.
    for (int k = 0; k < 20; ++k) {
      auto victim = want_.begin();
      std::advance(victim, std::ptrdiff_t(rng.below(want_.size())));
      std::string name = victim->first;
      if (before.count(name) != 0) removed.insert(name);
      ASSERT_NO_FATAL_FAILURE(remove(name));
      name = name_of(100000 + added.size(), 8 + rng.below(200));
      ASSERT_NO_FATAL_FAILURE(create(name));
      added.insert(name);
    }
  }
  // Entries there all along are listed exactly once, the others at most once.
  for (const auto& [name, ino] : before) {
    if (removed.count(name) == 0) {
      EXPECT_EQ(listed.count(name), 1u) << name;
    }
  }
  for (const auto& name : listed) {
    EXPECT_EQ(listed.count(name), 1u) << name;
    EXPECT_TRUE(before.count(name) != 0 || added.count(name) != 0) << name;
  }
  ASSERT_NO_FATAL_FAILURE(expect_entries());
  ASSERT_NO_FATAL_FAILURE(expect_fsck_clean());
}

INSTANTIATE_TEST_SUITE_P(Fs, DirectoryTest,
                         ::testing::Values(PersistMode::direct, PersistMode::writeback),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace vpmfs
