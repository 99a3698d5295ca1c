#include "vpmfs/fs.h"

#include <dirent.h>
#include <linux/fs.h>

#include <map>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_util.h"

namespace vpmfs {
namespace {

using test::TempPath;

// (GCC 12 warns falsely on "f" + std::to_string(i) at -O3.)
std::string nm(char prefix, int i) {
  std::string s(1, prefix);
  s += std::to_string(i);
  return s;
}

class VolumeTest : public ::testing::TestWithParam<PersistMode> {
 protected:
  void SetUp() override {
    MkfsOptions o;
    o.size = 64 << 20;
    o.force_persistent = true;
    o.label = "test";
    ASSERT_TRUE(Volume::mkfs(path_, o));
    mount();
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
  uint64_t create(uint64_t dir, const std::string& name, uint32_t mode = 0644) {
    auto a = v_->mknod(dir, name, S_IFREG | mode, 0, 0, 0);
    EXPECT_TRUE(a) << a.status().to_string();
    return a ? a->ino : 0;
  }
  std::set<std::string> list(uint64_t dir) {
    std::set<std::string> names;
    EXPECT_TRUE(v_->readdir(dir, 0, [&](const DirEntry& e) {
      names.insert(e.name);
      return true;
    }));
    return names;
  }
  TempPath path_{"volume.img"};
  std::unique_ptr<Volume> v_;
};

TEST_P(VolumeTest, FreshVolumeHasAnEmptyRoot) {
  auto root = v_->getattr(kRootIno);
  ASSERT_TRUE(root);
  EXPECT_TRUE(S_ISDIR(root->mode));
  EXPECT_EQ(root->nlink, 2u);
  EXPECT_EQ(list(kRootIno), (std::set<std::string>{".", ".."}));
  auto st = v_->statfs();
  EXPECT_EQ(st.f_bsize, 4096u);
  EXPECT_GT(st.f_bfree, 10000u);
}

TEST_P(VolumeTest, FilesKeepTheirDataAcrossRemount) {
  uint64_t ino = create(kRootIno, "a.txt");
  std::string text = "hello, persistent world";
  ASSERT_EQ(*v_->write(ino, 0, text.data(), text.size()), text.size());
  std::vector<char> big(3 * 4096 + 100);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = char(i * 7);
  ASSERT_EQ(*v_->write(ino, 10000, big.data(), big.size()), big.size());
  ASSERT_TRUE(v_->sync_wait());
  mount();
  auto a = v_->lookup(kRootIno, "a.txt");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->size, 10000 + big.size());
  std::vector<char> back(a->size);
  ASSERT_EQ(*v_->read(a->ino, 0, back.data(), back.size()), back.size());
  EXPECT_EQ(std::string(back.data(), text.size()), text);
  for (std::size_t i = text.size(); i < 10000; ++i) ASSERT_EQ(back[i], 0) << "hole at " << i;
  EXPECT_EQ(std::vector<char>(back.begin() + 10000, back.end()), big);
}

TEST_P(VolumeTest, DirectoriesLinksSymlinksRename) {
  auto d = v_->mkdir(kRootIno, "dir", 0755, 0, 0);
  ASSERT_TRUE(d);
  EXPECT_EQ(v_->getattr(kRootIno)->nlink, 3u);
  uint64_t f = create(d->ino, "file");
  ASSERT_TRUE(v_->link(f, kRootIno, "hard"));
  EXPECT_EQ(v_->getattr(f)->nlink, 2u);
  ASSERT_TRUE(v_->symlink(kRootIno, "sym", "dir/file", 0, 0));
  std::string long_target(300, 'x');
  auto ls = v_->symlink(kRootIno, "longsym", long_target, 0, 0);
  ASSERT_TRUE(ls);
  EXPECT_EQ(*v_->readlink(ls->ino), long_target);
  EXPECT_EQ(*v_->readlink(v_->lookup(kRootIno, "sym")->ino), "dir/file");
  EXPECT_EQ(v_->mkdir(kRootIno, "dir", 0755, 0, 0).status().error(), EEXIST);
  EXPECT_EQ(v_->rmdir(kRootIno, "dir").error(), ENOTEMPTY);
  EXPECT_EQ(v_->unlink(kRootIno, "dir").error(), EISDIR);
  EXPECT_EQ(v_->rmdir(kRootIno, "hard").error(), ENOTDIR);
  ASSERT_TRUE(v_->rename(d->ino, "file", kRootIno, "moved", 0));
  EXPECT_EQ(v_->lookup(d->ino, "file").status().error(), ENOENT);
  EXPECT_EQ(v_->lookup(kRootIno, "moved")->ino, f);
  EXPECT_EQ(v_->rename(kRootIno, "moved", kRootIno, "hard", RENAME_NOREPLACE).error(), EEXIST);
  ASSERT_TRUE(v_->rename(kRootIno, "sym", kRootIno, "moved", RENAME_EXCHANGE));
  EXPECT_TRUE(S_ISLNK(v_->lookup(kRootIno, "moved")->mode));
  EXPECT_EQ(v_->rename(kRootIno, "dir", d->ino, "inside", 0).error(), EINVAL);
  EXPECT_EQ(v_->rename(kRootIno, "a", kRootIno, "b", 4).error(), EINVAL);
  ASSERT_TRUE(v_->rmdir(kRootIno, "dir"));
  EXPECT_EQ(v_->getattr(kRootIno)->nlink, 2u);
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(list(kRootIno), (std::set<std::string>{".", "..", "hard", "longsym", "moved", "sym"}));
  EXPECT_EQ(v_->getattr(f)->nlink, 2u);
}

TEST_P(VolumeTest, UnlinkedButHeldFilesLiveUntilForgotten) {
  uint64_t f = create(kRootIno, "tmp");
  std::vector<char> data(8192, 'q');
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  v_->hold(f, 1);
  auto before = v_->statfs().f_bfree;
  ASSERT_TRUE(v_->unlink(kRootIno, "tmp"));
  std::vector<char> back(8192);
  ASSERT_EQ(*v_->read(f, 0, back.data(), back.size()), 8192u) << "data kept while held";
  EXPECT_EQ(back, data);
  EXPECT_EQ(v_->statfs().f_bfree, before);
  v_->forget(f, 1);
  EXPECT_EQ(v_->getattr(f).status().error(), ENOENT);
  EXPECT_EQ(v_->statfs().f_bfree, before + 2);
}

TEST_P(VolumeTest, TruncateDownZeroesTheTail) {
  uint64_t f = create(kRootIno, "t");
  std::vector<char> data(10000, 'z');
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  SetAttr c;
  c.size = 5000;
  ASSERT_TRUE(v_->setattr(f, c));
  c.size = 9000;
  ASSERT_TRUE(v_->setattr(f, c));
  std::vector<char> back(9000);
  ASSERT_EQ(*v_->read(f, 0, back.data(), back.size()), 9000u);
  for (int i = 0; i < 5000; ++i) ASSERT_EQ(back[i], 'z');
  for (int i = 5000; i < 9000; ++i) ASSERT_EQ(back[i], 0) << i;
}

TEST_P(VolumeTest, ManyEntriesAndStableReaddirOffsets) {
  for (int i = 0; i < 2000; ++i) create(kRootIno, nm('f', i));
  // Read half, remove and add entries, then continue: no entry that stayed is lost or repeated.
  std::vector<DirEntry> first;
  uint64_t cookie = 0;
  ASSERT_TRUE(v_->readdir(kRootIno, 0, [&](const DirEntry& e) {
    first.push_back(e);
    cookie = e.next_offset;
    return first.size() < 1000;
  }));
  for (int i = 0; i < 2000; i += 3) ASSERT_TRUE(v_->unlink(kRootIno, nm('f', i)));
  for (int i = 0; i < 300; ++i) create(kRootIno, nm('g', i));
  std::multiset<std::string> seen;
  for (auto& e : first) seen.insert(e.name);
  ASSERT_TRUE(v_->readdir(kRootIno, cookie, [&](const DirEntry& e) {
    seen.insert(e.name);
    return true;
  }));
  for (int i = 0; i < 2000; ++i) {
    if (i % 3 == 0) continue;
    ASSERT_EQ(seen.count(nm('f', i)), 1u) << i;
  }
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(list(kRootIno).size(), 2u + 2000 - 667 + 300);
}

TEST_P(VolumeTest, ErrorsForBadNames) {
  EXPECT_EQ(v_->lookup(kRootIno, std::string(256, 'n')).status().error(), ENAMETOOLONG);
  EXPECT_EQ(v_->mknod(kRootIno, std::string(256, 'n'), S_IFREG | 0644, 0, 0, 0).status().error(),
            ENAMETOOLONG);
  EXPECT_EQ(v_->lookup(kRootIno, "missing").status().error(), ENOENT);
  uint64_t f = create(kRootIno, "plain");
  EXPECT_EQ(v_->lookup(f, "x").status().error(), ENOTDIR);
  EXPECT_EQ(v_->mknod(f, "x", S_IFREG | 0644, 0, 0, 0).status().error(), ENOTDIR);
}

TEST_P(VolumeTest, FullVolumeSaysEnospcAndRecovers) {
  uint64_t f = create(kRootIno, "big");
  std::vector<char> chunk(1 << 20, 'b');
  uint64_t off = 0;
  Status last;
  for (int i = 0; i < 200; ++i) {
    auto n = v_->write(f, off, chunk.data(), chunk.size());
    if (!n) {
      last = n.status();
      break;
    }
    off += *n;
    if (*n < chunk.size()) continue;
  }
  EXPECT_EQ(last.error(), ENOSPC);
  EXPECT_EQ(v_->statfs().f_bfree, 0u);
  uint64_t small = create(kRootIno, "small");
  EXPECT_EQ(v_->write(small, 0, "x", 1).status().error(), ENOSPC);
  ASSERT_TRUE(v_->unlink(kRootIno, "big"));
  ASSERT_TRUE(v_->sync_wait());
  EXPECT_EQ(*v_->write(small, 0, "x", 1), 1u) << "deleting files makes space usable again";
}

INSTANTIATE_TEST_SUITE_P(Fs, VolumeTest,
                         ::testing::Values(PersistMode::direct, PersistMode::writeback),
                         [](const auto& info) { return std::string(to_string(info.param)); });

}  // namespace
}  // namespace vpmfs
