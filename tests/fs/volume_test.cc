#include "vpmfs/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fs/format.h"  // to find and damage an xattr block
#include "test_util.h"
#include "vpmfs/btt.h"
#include "vpmfs/crash_sim.h"
#include "vpmfs/fsck.h"

namespace vpmfs {
namespace {

using test::random_bytes;
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
  void mount(bool sync = false, bool dirsync = false) {
    v_.reset();
    MountOptions m;
    m.mode = GetParam();
    m.force_persistent = true;
    m.sync = sync;
    m.dirsync = dirsync;
    auto v = Volume::mount(path_, m);
    ASSERT_TRUE(v) << v.status().to_string();
    v_ = std::move(v.value());
  }
  // How many syncs a call that must succeed made.
  template <class Call>
  uint64_t syncs_of(Call&& call) {
    uint64_t before = v_->health().syncs;
    EXPECT_TRUE(call());
    return v_->health().syncs - before;
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
  // getxattr the way applications do: ask for the size, then read.
  Result<std::string> getx(uint64_t ino, const std::string& name) {
    auto size = v_->getxattr(ino, name, nullptr, 0);
    if (!size) return size.status();
    std::string value(*size, '\0');
    auto got = v_->getxattr(ino, name, value.data(), value.size());
    if (!got) return got.status();
    value.resize(*got);
    return value;
  }
  std::set<std::string> listx(uint64_t ino) {
    auto size = v_->listxattr(ino, nullptr, 0);
    EXPECT_TRUE(size) << size.status().to_string();
    std::string buf(size ? *size : 0, '\0');
    auto got = v_->listxattr(ino, buf.data(), buf.size());
    EXPECT_TRUE(got) << got.status().to_string();
    std::set<std::string> names;
    for (std::size_t at = 0; at < buf.size();) {
      names.insert(buf.c_str() + at);
      at += std::strlen(buf.c_str() + at) + 1;
    }
    return names;
  }
  std::string read_all(uint64_t ino) {
    auto a = v_->getattr(ino);
    EXPECT_TRUE(a);
    std::string data(a ? a->size : 0, '\0');
    auto n = v_->read(ino, 0, data.data(), data.size());
    EXPECT_TRUE(n && *n == data.size());
    return data;
  }
  uint64_t blocks(uint64_t ino) { return v_->getattr(ino)->blocks / (v_->block_size() / 512); }
  // Unmounts, checks the image and mounts again.
  void expect_fsck_clean() {
    v_.reset();
    auto report = fsck(path_, FsckOptions{});
    ASSERT_TRUE(report) << report.status().to_string();
    EXPECT_TRUE(report->problems.empty()) << report->problems.front();
    mount();
  }
  TempPath path_{"volume.img"};
  std::unique_ptr<Volume> v_;
};

// POSIX ACLs in the kernel's xattr form.
constexpr uint16_t kUserObj = 1, kUser = 2, kGroupObj = 4, kGroup = 8, kMask = 0x10, kOther = 0x20;
struct AclEntry {
  uint16_t tag, perm;
  uint32_t id;
};
std::string acl(std::initializer_list<AclEntry> entries) {
  std::string out(4 + entries.size() * 8, '\0');
  uint32_t version = 2;
  std::memcpy(out.data(), &version, 4);
  std::size_t at = 4;
  for (AclEntry e : entries) {
    // As the kernel gives them back: only named entries carry an id.
    if (e.tag != kUser && e.tag != kGroup) e.id = ~0u;
    std::memcpy(out.data() + at, &e, 8);
    at += 8;
  }
  return out;
}
std::vector<AclEntry> parse_acl(const std::string& value) {
  std::vector<AclEntry> entries((value.size() - 4) / 8);
  std::memcpy(entries.data(), value.data() + 4, entries.size() * 8);
  return entries;
}
uint16_t perm_of(const std::vector<AclEntry>& acl, uint16_t tag, uint32_t id = ~0u) {
  for (const AclEntry& e : acl) {
    if (e.tag == tag && (id == ~0u || e.id == id)) return e.perm;
  }
  return 0xFFFF;
}

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
  EXPECT_EQ(v_->rename(kRootIno, "a", kRootIno, "b", 1u << 3).error(), EINVAL);
  ASSERT_TRUE(v_->rmdir(kRootIno, "dir"));
  EXPECT_EQ(v_->getattr(kRootIno)->nlink, 2u);
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(list(kRootIno), (std::set<std::string>{".", "..", "hard", "longsym", "moved", "sym"}));
  EXPECT_EQ(v_->getattr(f)->nlink, 2u);
}

// overlayfs renames out of its upper layer with RENAME_WHITEOUT: the old name must come back
// as a character device 0/0 owned by the caller, in the same step as the move.
TEST_P(VolumeTest, RenameWhiteoutLeavesACharacterDeviceUnderTheOldName) {
  auto upper = v_->mkdir(kRootIno, "upper", 0755, 0, 0);
  ASSERT_TRUE(upper);
  uint64_t f = create(upper->ino, "file");
  uint64_t g = create(kRootIno, "old");
  uint64_t free_inodes = v_->statfs().f_ffree;
  ASSERT_TRUE(v_->rename(upper->ino, "file", kRootIno, "moved", RENAME_WHITEOUT, 1000, 100));
  EXPECT_EQ(v_->lookup(kRootIno, "moved")->ino, f);
  auto w = v_->lookup(upper->ino, "file");
  ASSERT_TRUE(w);
  EXPECT_NE(w->ino, f);
  EXPECT_EQ(w->mode, uint32_t(S_IFCHR));
  EXPECT_EQ(w->rdev, 0u);
  EXPECT_EQ(w->nlink, 1u);
  EXPECT_EQ(w->uid, 1000u);
  EXPECT_EQ(w->gid, 100u);
  EXPECT_EQ(v_->statfs().f_ffree, free_inodes - 1);
  // Over an existing name the target goes, and its inode with it.
  ASSERT_TRUE(v_->rename(kRootIno, "moved", kRootIno, "old", RENAME_WHITEOUT, 0, 0));
  EXPECT_EQ(v_->lookup(kRootIno, "old")->ino, f);
  EXPECT_EQ(v_->getattr(g).status().error(), ENOENT);
  EXPECT_EQ(v_->lookup(kRootIno, "moved")->mode, uint32_t(S_IFCHR));
  EXPECT_EQ(v_->statfs().f_ffree, free_inodes - 1);
  // Refusals take no inode.
  EXPECT_EQ(
      v_->rename(kRootIno, "old", kRootIno, "moved", RENAME_WHITEOUT | RENAME_NOREPLACE).error(),
      EEXIST);
  EXPECT_EQ(
      v_->rename(kRootIno, "old", kRootIno, "moved", RENAME_WHITEOUT | RENAME_EXCHANGE).error(),
      EINVAL);
  EXPECT_EQ(v_->rename(kRootIno, "old", kRootIno, "upper", RENAME_WHITEOUT).error(), EISDIR);
  EXPECT_EQ(v_->statfs().f_ffree, free_inodes - 1);
  // With no inode left for the whiteout nothing moves.
  for (int i = 0;; ++i) {
    auto a = v_->mknod(upper->ino, nm('x', i), S_IFREG | 0644, 0, 0, 0);
    if (!a) {
      ASSERT_EQ(a.status().error(), ENOSPC);
      break;
    }
  }
  EXPECT_EQ(v_->rename(kRootIno, "old", kRootIno, "new", RENAME_WHITEOUT).error(), ENOSPC);
  EXPECT_EQ(v_->lookup(kRootIno, "old")->ino, f);
  EXPECT_EQ(v_->lookup(kRootIno, "new").status().error(), ENOENT);
  ASSERT_TRUE(v_->sync_wait());
  expect_fsck_clean();
  EXPECT_EQ(v_->lookup(upper->ino, "file")->mode, uint32_t(S_IFCHR));
  EXPECT_EQ(v_->lookup(kRootIno, "moved")->mode, uint32_t(S_IFCHR));
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

timespec coarse_clock() {
  timespec t;
  clock_gettime(CLOCK_REALTIME_COARSE, &t);
  return t;
}
bool operator==(const timespec& a, const timespec& b) {
  return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}
bool operator<(const timespec& a, const timespec& b) {
  return a.tv_sec != b.tv_sec ? a.tv_sec < b.tv_sec : a.tv_nsec < b.tv_nsec;
}

// Multigrain timestamps: a write after the times were reported changes them, always (the fine
// clock), and the times never go back. (VolumeFsync.OverwritesWithinATickLeaveNoJournalWork:
// writes nobody looked at in between change no metadata.)
TEST_P(VolumeTest, WritesStampTimesThatWhoeverLookedSeesChange) {
  uint64_t f = create(kRootIno, "f");
  ASSERT_TRUE(v_->write(f, 0, "a", 1));
  for (int i = 0; i < 100; ++i) {
    auto before = v_->getattr(f);
    ASSERT_TRUE(v_->write(f, 0, "b", 1));
    auto after = v_->getattr(f);
    EXPECT_TRUE(before->mtime < after->mtime) << "write " << i << " after a getattr";
    EXPECT_TRUE(after->mtime == after->ctime);
  }
  // A peek is no report: the front end's own checks do not make every write fine-grained.
  auto seen = v_->getattr(f);
  ASSERT_TRUE(v_->write(f, 0, "e", 1));
  auto fine = v_->peek_attr(f);
  EXPECT_TRUE(seen->mtime < fine->mtime);
  ASSERT_TRUE(v_->write(f, 0, "f", 1));
  auto later = v_->getattr(f);
  EXPECT_FALSE(later->mtime < fine->mtime) << "a coarse stamp went back in time";
  // Growing the file is a change whatever the clock says.
  ASSERT_TRUE(v_->write(f, 1, "g", 1));
  EXPECT_EQ(v_->getattr(f)->size, 2u);
}

// chattr +S: every change to the file, or to the directory's entries, is durable when the call
// returns (one sync each); +A: reads leave the access time alone; +d is only kept.
TEST_P(VolumeTest, SyncAndNoatimeFlags) {
  uint64_t f = create(kRootIno, "f");
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  ASSERT_TRUE(d);
  ASSERT_TRUE(v_->set_xflags(f, FS_XFLAG_SYNC | FS_XFLAG_NODUMP));
  ASSERT_TRUE(v_->set_xflags(d->ino, FS_XFLAG_SYNC));
  EXPECT_EQ(v_->getattr(f)->flags, uint32_t(FS_XFLAG_SYNC | FS_XFLAG_NODUMP));
  uint64_t plain = create(kRootIno, "plain");
  EXPECT_EQ(syncs_of([&] { return v_->write(plain, 0, "p", 1); }), 0u);
  EXPECT_EQ(syncs_of([&] { return v_->write(f, 0, "s", 1); }), 1u);
  SetAttr chmod;
  chmod.mode = 0600;
  EXPECT_EQ(syncs_of([&] { return v_->setattr(f, chmod); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->setxattr(f, "user.k", "v", 1, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->mknod(d->ino, "in", S_IFREG | 0644, 0, 0, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->unlink(d->ino, "in"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->mknod(kRootIno, "out", S_IFREG | 0644, 0, 0, 0); }), 0u);

  // Written after its last read: relatime would update the atime on the next read.
  uint64_t quiet = create(kRootIno, "quiet");
  ASSERT_TRUE(v_->write(quiet, 0, "q", 1));
  ASSERT_TRUE(v_->write(plain, 0, "p", 1));
  ASSERT_TRUE(v_->set_xflags(quiet, FS_XFLAG_NOATIME));
  auto quiet_before = v_->getattr(quiet)->atime;
  auto plain_before = v_->getattr(plain)->atime;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  char c;
  ASSERT_TRUE(v_->read(quiet, 0, &c, 1));
  ASSERT_TRUE(v_->read(plain, 0, &c, 1));
  auto same = [](timespec a, timespec b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; };
  EXPECT_TRUE(same(v_->getattr(quiet)->atime, quiet_before)) << "+A: the read set the atime";
  EXPECT_FALSE(same(v_->getattr(plain)->atime, plain_before)) << "relatime without +A";
  EXPECT_EQ(v_->set_xflags(f, FS_XFLAG_REALTIME).status().error(), EOPNOTSUPP);
}

// Mounted -o sync: every call that changes the volume is durable when it returns (one sync
// each), without chattr +S; calls that only look change nothing and sync nothing.
TEST_P(VolumeTest, SyncMountMakesEveryChangingCallDurable) {
  mount(/*sync=*/true);
  uint64_t f = 0;
  EXPECT_EQ(syncs_of([&] { return (f = create(kRootIno, "f")) != 0; }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->write(f, 0, "data", 4); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->write(f, 8192, "more", 4); }), 1u);
  SetAttr chmod;
  chmod.mode = 0600;
  EXPECT_EQ(syncs_of([&] { return v_->setattr(f, chmod); }), 1u);
  SetAttr cut;
  cut.size = 2;
  EXPECT_EQ(syncs_of([&] { return v_->setattr(f, cut); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->fallocate(f, 0, 0, 1 << 16); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->setxattr(f, "user.k", "v", 1, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->removexattr(f, "user.k"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->set_xflags(f, FS_XFLAG_NODUMP); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->link(f, kRootIno, "g"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->rename(kRootIno, "g", kRootIno, "h", 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->unlink(kRootIno, "h"); }), 1u);
  uint64_t d = 0;
  EXPECT_EQ(syncs_of([&] {
              auto a = v_->mkdir(kRootIno, "d", 0755, 0, 0);
              d = a ? a->ino : 0;
              return a;
            }),
            1u);
  EXPECT_EQ(syncs_of([&] { return v_->symlink(d, "l", "../f", 0, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->tmpfile(d, 0600, 0, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->unlink(d, "l"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->rmdir(kRootIno, "d"); }), 1u);

  char buf[8];
  EXPECT_EQ(syncs_of([&] { return v_->read(f, 0, buf, sizeof buf); }), 0u);
  EXPECT_EQ(syncs_of([&] { return v_->getattr(f); }), 0u);
  EXPECT_EQ(syncs_of([&] { return v_->lookup(kRootIno, "f"); }), 0u);
  EXPECT_EQ(syncs_of([&] {
              return v_->getxattr(f, "user.none", nullptr, 0).status().error() == ENODATA;
            }),
            0u);
}

// Mounted -o dirsync: calls that change a directory sync once each; a file's data and
// attributes wait for fsync or the periodic commit.
TEST_P(VolumeTest, DirsyncMountMakesDirectoryChangesDurable) {
  mount(/*sync=*/false, /*dirsync=*/true);
  uint64_t f = 0;
  EXPECT_EQ(syncs_of([&] { return (f = create(kRootIno, "f")) != 0; }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->link(f, kRootIno, "g"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->rename(kRootIno, "g", kRootIno, "h", 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->unlink(kRootIno, "h"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->mkdir(kRootIno, "d", 0755, 0, 0); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->rmdir(kRootIno, "d"); }), 1u);
  EXPECT_EQ(syncs_of([&] { return v_->write(f, 0, "data", 4); }), 0u);
  SetAttr chmod;
  chmod.mode = 0600;
  EXPECT_EQ(syncs_of([&] { return v_->setattr(f, chmod); }), 0u);
  EXPECT_EQ(syncs_of([&] { return v_->setxattr(f, "user.k", "v", 1, 0); }), 0u);
}

// health() tells commits that wrote the journal from those that only flushed data, and how long
// commits take. (A periodic commit may slip in between: commits are counted at least.)
TEST_P(VolumeTest, HealthCountsCommitsThatWroteTheJournal) {
  uint64_t f = create(kRootIno, "j");
  ASSERT_TRUE(v_->sync_wait());
  Volume::Health created = v_->health();
  EXPECT_GE(created.journal_commits, 1u) << "the creation was metadata to commit";
  EXPECT_GT(created.commit_ns, 0u);
  ASSERT_TRUE(v_->sync_wait());  // nothing changed since
  Volume::Health idle = v_->health();
  EXPECT_GE(idle.commits, created.commits + 1);
  EXPECT_EQ(idle.journal_commits, created.journal_commits);
  SetAttr chmod;
  chmod.mode = 0600;
  ASSERT_TRUE(v_->setattr(f, chmod));
  ASSERT_TRUE(v_->sync_wait());
  Volume::Health changed = v_->health();
  EXPECT_GE(changed.commits, idle.commits + 1);
  EXPECT_EQ(changed.journal_commits, idle.journal_commits + 1);
  EXPECT_GE(changed.answer_ns, idle.answer_ns);
}

// A device whose flushes take a millisecond (the flush channel calls the observer around each).
class SlowFlushes final : public test::FlushObserver {
 public:
  void device_flush_begin() override { std::this_thread::sleep_for(std::chrono::milliseconds(1)); }
  void device_flush_end(bool) override {}
};

// Threads that write and fsync their own files share commits (group commit), and health() says
// where a commit's cycle went: committing, answering the fsyncs, gathering the next group (at
// most as long as the commit before it, and never more than 2 ms).
TEST(VolumeHealth, GroupCommitsTellTheirCycle) {
  TempPath path("health-cycle.img");
  MkfsOptions o;
  o.size = 64 << 20;
  o.force_persistent = true;
  ASSERT_TRUE(Volume::mkfs(path.str(), o));
  SlowFlushes slow;
  MountOptions m;
  m.mode = PersistMode::writeback;
  m.force_persistent = true;
  m.on_region = [&](Region& r) { r.set_observer(&slow); };
  auto v = Volume::mount(path.str(), m);
  ASSERT_TRUE(v) << v.status().to_string();
  constexpr int kThreads = 4;
  constexpr int kRounds = 40;
  std::vector<uint64_t> files;
  for (int t = 0; t < kThreads; ++t) {
    auto a = (*v)->mknod(kRootIno, "f" + std::to_string(t), S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(a);
    files.push_back(a->ino);
  }
  ASSERT_TRUE((*v)->sync_wait());
  Volume::Health before = (*v)->health();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::string block(4096, char('a' + t));
      for (int i = 0; i < kRounds; ++i) {
        EXPECT_TRUE((*v)->write(files[t], uint64_t(i % 8) * 4096, block.data(), block.size()));
        EXPECT_TRUE((*v)->fsync(files[t], false));
      }
    });
  }
  for (auto& t : threads) t.join();
  Volume::Health after = (*v)->health();
  const uint64_t commits = after.commits - before.commits;
  const uint64_t syncs = after.syncs - before.syncs;
  EXPECT_EQ(syncs, uint64_t(kThreads * kRounds));
  EXPECT_LT(commits, syncs) << "no fsync shared a commit";
  EXPECT_GE(after.commit_ns - before.commit_ns, commits * 1'000'000) << "a flush takes 1 ms";
  EXPECT_GT(after.answer_ns, before.answer_ns);
  const uint64_t gathered = after.gather_ns - before.gather_ns;
  EXPECT_GT(gathered, 0u) << "commits of several fsyncs wait for the group to come back";
  EXPECT_LE(gathered, commits * 2'000'000) << "a gathering lasts at most 2 ms";
  (*v).reset();
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

TEST_P(VolumeTest, ShortSymlinksOwnNoBlocks) {
  // An inline target sits where block pointers would: "A\n" reads as block 0x0a41, "A\x01" as
  // 0x141 and so on. Removing such links must not free those blocks from their owner.
  uint64_t f = create(kRootIno, "owner");
  std::string data(4 << 20, 'o');
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  for (int hi = 1; hi < 256; ++hi) {
    std::string target{'A', char(hi)};
    ASSERT_TRUE(v_->symlink(kRootIno, nm('l', hi), target, 0, 0));
  }
  auto free_before = v_->statfs().f_bfree;
  for (int hi = 1; hi < 256; ++hi) ASSERT_TRUE(v_->unlink(kRootIno, nm('l', hi)));
  ASSERT_TRUE(v_->sync_wait());
  EXPECT_EQ(v_->statfs().f_bfree, free_before);
  // New files would land on the owner's blocks had they been freed.
  uint64_t g = create(kRootIno, "newcomer");
  std::string other(4 << 20, 'n');
  ASSERT_TRUE(v_->write(g, 0, other.data(), other.size()));
  EXPECT_EQ(read_all(f), data);
  expect_fsck_clean();
}

TEST_P(VolumeTest, LinkingAnUnlinkedOpenFileKeepsIt) {
  // O_TMPFILE then linkat: the file leaves the orphan chain, or the next mount frees it.
  uint64_t f = create(kRootIno, "tmp");
  ASSERT_TRUE(v_->write(f, 0, "kept", 4));
  v_->hold(f, 1);
  ASSERT_TRUE(v_->unlink(kRootIno, "tmp"));
  uint64_t g = create(kRootIno, "other");
  v_->hold(g, 1);
  ASSERT_TRUE(v_->unlink(kRootIno, "other"));  // f is second on the chain now
  ASSERT_TRUE(v_->link(f, kRootIno, "linked"));
  v_->forget(f, 1);
  ASSERT_TRUE(v_->sync_wait());
  mount();  // g is still on the chain: the mount frees it, and only it
  auto a = v_->lookup(kRootIno, "linked");
  ASSERT_TRUE(a) << a.status().to_string();
  EXPECT_EQ(read_all(a->ino), "kept");
  EXPECT_EQ(v_->getattr(g).status().error(), ENOENT);
  expect_fsck_clean();
  EXPECT_EQ(read_all(v_->lookup(kRootIno, "linked")->ino), "kept");
}

TEST_P(VolumeTest, TmpfilesAreUnnamedOrphansUntilLinked) {
  ASSERT_TRUE(v_->mkdir(kRootIno, "sg", 02775, 0, 7));  // setgid: new files take group 7
  uint64_t dir = v_->lookup(kRootIno, "sg")->ino;
  auto free_before = v_->statfs();
  auto kept = v_->tmpfile(dir, 0666, 5, 5, 022);
  ASSERT_TRUE(kept) << kept.status().to_string();
  v_->hold(kept->ino, 1);
  EXPECT_EQ(kept->nlink, 0u);
  EXPECT_EQ(kept->mode, S_IFREG | 0644u) << "the umask applies";
  EXPECT_EQ(kept->gid, 7u) << "the setgid directory's group";
  EXPECT_EQ(list(dir), (std::set<std::string>{".", ".."}));
  ASSERT_TRUE(v_->write(kept->ino, 0, "named later", 11));
  auto dropped = v_->tmpfile(dir, 0600, 0, 0);
  ASSERT_TRUE(dropped);
  v_->hold(dropped->ino, 1);
  std::vector<char> data(64 << 10, 'd');
  ASSERT_TRUE(v_->write(dropped->ino, 0, data.data(), data.size()));
  auto lost = v_->tmpfile(dir, 0600, 0, 0);  // held when the volume goes down
  ASSERT_TRUE(lost);
  v_->hold(lost->ino, 1);
  ASSERT_TRUE(v_->write(lost->ino, 0, data.data(), data.size()));

  ASSERT_TRUE(v_->link(kept->ino, dir, "named"));
  v_->forget(kept->ino, 1);
  v_->forget(dropped->ino, 1);
  EXPECT_EQ(v_->getattr(dropped->ino).status().error(), ENOENT) << "freed with its last reference";
  EXPECT_EQ(v_->tmpfile(kRootIno + 1000, 0600, 0, 0).status().error(), ENOENT);
  EXPECT_EQ(v_->tmpfile(kept->ino, 0600, 0, 0).status().error(), ENOTDIR);
  ASSERT_TRUE(v_->sync_wait());
  mount();  // as after a crash with lost still open: the mount frees it
  EXPECT_EQ(v_->getattr(lost->ino).status().error(), ENOENT);
  EXPECT_EQ(list(dir), (std::set<std::string>{".", "..", "named"}));
  EXPECT_EQ(read_all(v_->lookup(dir, "named")->ino), "named later");
  auto free_after = v_->statfs();
  EXPECT_EQ(free_after.f_ffree + 1, free_before.f_ffree);
  // The named file's block and the directory's new entry block at most; the 16 blocks each of
  // the other two came back.
  EXPECT_GE(free_after.f_bfree + 2, free_before.f_bfree);
  expect_fsck_clean();
}

// FITRIM: free blocks are trimmed and their storage goes back to the image file's filesystem;
// blocks of files are untouched.
TEST_P(VolumeTest, DiscardFreeGivesFreeSpaceBackAndKeepsFiles) {
  auto image_bytes = [&] {
    struct stat st {};
    EXPECT_EQ(::stat(path_.str().c_str(), &st), 0);
    return uint64_t(st.st_blocks) * 512;
  };
  uint64_t kept = create(kRootIno, "kept");
  std::string a(64 << 10, 'a');
  ASSERT_TRUE(v_->write(kept, 0, a.data(), a.size()));
  uint64_t gone = create(kRootIno, "gone");
  std::string b(4 << 20, 'b');
  ASSERT_TRUE(v_->write(gone, 0, b.data(), b.size()));
  ASSERT_TRUE(v_->sync_wait());
  const uint64_t full = image_bytes();
  ASSERT_TRUE(v_->unlink(kRootIno, "gone"));
  auto bytes = v_->discard_free(0, UINT64_MAX, 0);
  ASSERT_TRUE(bytes) << bytes.status().to_string();
  const uint64_t bs = v_->block_size();
  auto fs = v_->statfs();
  EXPECT_GE(*bytes, fs.f_bfree * bs - 64 * bs) << "about every free block";
  EXPECT_LE(*bytes, fs.f_bfree * bs);
  // What the BTT had committed of the deleted file is a hole now; the rest of it, at most a
  // lane's worth per write still in the open epoch (writeback), stays until reused.
  EXPECT_LT(image_bytes() + b.size() / 2, full) << "the image file gave space back";
  EXPECT_EQ(read_all(kept), a);
  EXPECT_EQ(*v_->discard_free(0, UINT64_MAX, UINT64_MAX / 2), 0u) << "no run that long";
  EXPECT_EQ(v_->discard_free(UINT64_MAX, 1 << 20, 0).status().error(), EINVAL);
  EXPECT_EQ(v_->discard_free(0, bs - 1, 0).status().error(), EINVAL);
  EXPECT_EQ(v_->discard_free(0, 0, 0).status().error(), EINVAL);
  // Files written after it read back what was written (the trimmed blocks are reused).
  uint64_t again = create(kRootIno, "again");
  std::string c(2 << 20, 'c');
  ASSERT_TRUE(v_->write(again, 0, c.data(), c.size()));
  expect_fsck_clean();
  EXPECT_EQ(read_all(v_->lookup(kRootIno, "again")->ino), c);
  EXPECT_EQ(read_all(v_->lookup(kRootIno, "kept")->ino), a);
}

TEST_P(VolumeTest, LargeFilesAreFreedInPieces) {
  // Freeing many blocks takes several transactions; the space all comes back, and the file on
  // the orphan chain meanwhile leaves it.
  auto empty = v_->statfs().f_bfree;
  uint64_t root_blocks = blocks(kRootIno);
  std::string data(24 << 20, 'L');
  uint64_t f = create(kRootIno, "big");
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  uint64_t g = create(kRootIno, "cut");
  ASSERT_TRUE(v_->write(g, 0, data.data(), 8 << 20));
  SetAttr c;
  c.size = 1000 * 1000 + 7;
  ASSERT_TRUE(v_->setattr(g, c));
  EXPECT_EQ(v_->getattr(g)->size, c.size);
  std::string cut = read_all(g);
  EXPECT_EQ(cut, data.substr(0, *c.size));
  ASSERT_TRUE(v_->unlink(kRootIno, "big"));
  ASSERT_TRUE(v_->sync_wait());
  const uint64_t bs = v_->block_size();
  uint64_t g_blocks = blocks(g);
  EXPECT_GE(g_blocks, (*c.size + bs - 1) / bs);
  EXPECT_LE(g_blocks, (*c.size + bs - 1) / bs + 4) << "data blocks and a few pointer blocks";
  EXPECT_EQ(v_->statfs().f_bfree, empty - g_blocks - (blocks(kRootIno) - root_blocks));
  expect_fsck_clean();
  c.size = 3 << 20;  // grows again: zeros after the cut
  ASSERT_TRUE(v_->setattr(g, c));
  std::string grown = read_all(g);
  EXPECT_EQ(grown.substr(0, cut.size()), cut);
  EXPECT_EQ(grown.find_first_not_of('\0', cut.size()), std::string::npos);
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
  uint64_t s = create(kRootIno, "s");
  std::vector<char> some(8 * v_->block_size(), 's');
  ASSERT_EQ(*v_->write(s, 0, some.data(), some.size()), some.size());
  ASSERT_TRUE(v_->sync_wait());
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
  std::string value(3000, 'v');
  EXPECT_EQ(v_->setxattr(small, "user.v", value.data(), value.size(), 0).error(), ENOSPC);
  // Blocks freed wait for the commit of the transaction that freed them; an allocation that
  // needs them commits it first (as ext4 does), so the space is usable at once.
  SetAttr cut;
  cut.size = 0;
  ASSERT_TRUE(v_->setattr(s, cut));
  auto wrote = v_->write(small, 0, "x", 1);
  ASSERT_TRUE(wrote) << "blocks freed by a truncate are usable at once: "
                     << wrote.status().to_string();
  ASSERT_TRUE(v_->setattr(small, cut));
  EXPECT_TRUE(v_->setxattr(small, "user.v", value.data(), value.size(), 0));
  ASSERT_TRUE(v_->unlink(kRootIno, "big"));
  uint64_t again = create(kRootIno, "again");
  std::vector<char> most(off / 2, 'a');
  wrote = v_->write(again, 0, most.data(), most.size());
  ASSERT_TRUE(wrote) << wrote.status().to_string();
  EXPECT_EQ(*wrote, most.size());
}

// --- extended attributes ----------------------------------------------------------------------

// As xfstests' generic/020 does on xfs: a thousand attributes on one file, then one 64 KiB
// value; they survive a remount and fsck finds the chains sound.
TEST_P(VolumeTest, AThousandAttributesAndA64KiBValue) {
  uint64_t f = create(kRootIno, "many");
  for (int i = 0; i < 1000; ++i) {
    std::string v = "value_" + std::to_string(i);
    ASSERT_TRUE(v_->setxattr(f, "user.attribute_" + std::to_string(i), v.data(), v.size(), 0)) << i;
  }
  uint64_t g = create(kRootIno, "long");
  std::string big = random_bytes("long value", 65536);
  ASSERT_TRUE(v_->setxattr(g, "user.long_attr", big.data(), big.size(), 0));
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(listx(f).size(), 1000u);
  for (int i = 0; i < 1000; i += 37) {
    EXPECT_EQ(*getx(f, "user.attribute_" + std::to_string(i)), "value_" + std::to_string(i));
  }
  EXPECT_EQ(*getx(g, "user.long_attr"), big);
  v_.reset();
  auto report = fsck(path_, FsckOptions{});
  ASSERT_TRUE(report) << report.status().to_string();
  EXPECT_EQ(report->exit_code(), 0) << report->problems.front();
  mount();
  // Removing them one by one shrinks the chain to nothing.
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(v_->removexattr(f, "user.attribute_" + std::to_string(i))) << i;
  }
  EXPECT_EQ(v_->getattr(f)->blocks, 0u);
  ASSERT_TRUE(v_->removexattr(g, "user.long_attr"));
  EXPECT_EQ(v_->getattr(g)->blocks, 0u);
}

// The names listxattr returns may take 64 KiB (XATTR_LIST_MAX): more names are ENOSPC.
TEST_P(VolumeTest, AttributeNamesStopAt64KiB) {
  uint64_t f = create(kRootIno, "names");
  std::size_t names = 0;
  for (int i = 0;; ++i) {
    std::string n = std::to_string(i);
    std::string name = "user." + std::string(245 - n.size(), 'n') + n;  // 250 bytes
    Status s = v_->setxattr(f, name, "", 0, 0);
    if (names + name.size() + 1 > 65536) {
      EXPECT_EQ(s.error(), ENOSPC) << "name " << i;
      break;
    }
    ASSERT_TRUE(s) << s.to_string();
    names += name.size() + 1;
  }
  EXPECT_EQ(*v_->listxattr(f, nullptr, 0), names);
}

TEST_P(VolumeTest, XattrRoundTripAndErrors) {
  uint64_t f = create(kRootIno, "f");
  auto before = *v_->getattr(f);
  uint64_t free_before = v_->statfs().f_bfree;
  ASSERT_TRUE(v_->setxattr(f, "user.colour", "blue", 4, 0));
  EXPECT_EQ(*getx(f, "user.colour"), "blue");
  EXPECT_EQ(*v_->getxattr(f, "user.colour", nullptr, 0), 4u);
  char small[2];
  EXPECT_EQ(v_->getxattr(f, "user.colour", small, sizeof small).status().error(), ERANGE);
  EXPECT_EQ(v_->getxattr(f, "user.missing", nullptr, 0).status().error(), ENODATA);
  // The block is the inode's: counted in its blocks and taken from the free ones.
  EXPECT_EQ(blocks(f), 1u);
  EXPECT_EQ(v_->statfs().f_bfree, free_before - 1);
  auto after = *v_->getattr(f);
  EXPECT_TRUE(
      after.ctime.tv_sec > before.ctime.tv_sec ||
      (after.ctime.tv_sec == before.ctime.tv_sec && after.ctime.tv_nsec >= before.ctime.tv_nsec));

  EXPECT_EQ(v_->setxattr(f, "user.colour", "red", 3, XATTR_CREATE).error(), EEXIST);
  EXPECT_EQ(v_->setxattr(f, "user.size", "1", 1, XATTR_REPLACE).error(), ENODATA);
  ASSERT_TRUE(v_->setxattr(f, "user.colour", "green", 5, XATTR_REPLACE));
  ASSERT_TRUE(v_->setxattr(f, "user.size", "10", 2, XATTR_CREATE));
  ASSERT_TRUE(v_->setxattr(f, "trusted.t", "", 0, 0));  // an empty value is a value
  ASSERT_TRUE(v_->setxattr(f, "security.selinux", "ctx", 3, 0));
  EXPECT_EQ(*getx(f, "user.colour"), "green");
  EXPECT_EQ(*getx(f, "trusted.t"), "");
  EXPECT_EQ(listx(f),
            (std::set<std::string>{"user.colour", "user.size", "trusted.t", "security.selinux"}));
  std::size_t list_size = *v_->listxattr(f, nullptr, 0);
  std::vector<char> list(list_size - 1);
  EXPECT_EQ(v_->listxattr(f, list.data(), list.size()).status().error(), ERANGE);

  // Names: namespaces, lengths.
  EXPECT_EQ(v_->setxattr(f, "os2.name", "x", 1, 0).error(), EOPNOTSUPP);
  EXPECT_EQ(v_->setxattr(f, "system.other", "x", 1, 0).error(), EOPNOTSUPP);
  EXPECT_EQ(v_->getxattr(f, "nonamespace", nullptr, 0).status().error(), EOPNOTSUPP);
  EXPECT_EQ(v_->setxattr(f, "user." + std::string(251, 'n'), "x", 1, 0).error(), ERANGE);
  ASSERT_TRUE(v_->setxattr(f, "user." + std::string(250, 'n'), "x", 1, 0));
  EXPECT_EQ(v_->setxattr(f, "", "x", 1, 0).error(), ERANGE);
  EXPECT_EQ(v_->setxattr(f, "user.", "x", 1, 0).error(), EINVAL);
  // Sizes: over XATTR_SIZE_MAX is E2BIG; a 64 KiB value takes a chain of blocks.
  std::string huge(65537, 'h');
  EXPECT_EQ(v_->setxattr(f, "user.huge", huge.data(), huge.size(), 0).error(), E2BIG);
  std::string big = random_bytes("big value", 65536);
  ASSERT_TRUE(v_->setxattr(f, "user.big", big.data(), big.size(), 0));
  EXPECT_EQ(*getx(f, "user.big"), big);
  auto stream = [&] {
    std::size_t used = 0;
    for (const auto& n : listx(f)) used += (8 + n.size() + getx(f, n)->size() + 7) / 8 * 8;
    return used;
  };
  const std::size_t payload = v_->block_size() - 40;
  EXPECT_EQ(blocks(f), (stream() + payload - 1) / payload);
  // The stream holds 128 KiB: filling it exactly works; one byte more does not.
  std::size_t room = 128 * 1024 - stream() - 8 - std::string("user.fill").size();
  ASSERT_LE(room, 65536u);
  std::string fill(room, 'f');
  EXPECT_EQ(v_->setxattr(f, "user.fill", fill.data(), fill.size() + 1, 0).error(), ENOSPC);
  ASSERT_TRUE(v_->setxattr(f, "user.fill", fill.data(), fill.size(), 0));
  EXPECT_EQ(*getx(f, "user.fill"), fill);
  EXPECT_EQ(*getx(f, "user.big"), big);
  EXPECT_EQ(v_->setxattr(f, "user.x", "", 0, 0).error(), ENOSPC);
  EXPECT_EQ(blocks(f), (128 * 1024 + payload - 1) / payload);
  // A shorter value gives blocks back.
  ASSERT_TRUE(v_->setxattr(f, "user.big", "small", 5, XATTR_REPLACE));
  EXPECT_EQ(blocks(f), (stream() + payload - 1) / payload);
  EXPECT_EQ(*getx(f, "user.fill"), fill);

  // Remove, and the block goes with the last attribute.
  EXPECT_EQ(v_->removexattr(f, "user.missing").error(), ENODATA);
  for (const auto& n : listx(f)) ASSERT_TRUE(v_->removexattr(f, n)) << n;
  EXPECT_TRUE(listx(f).empty());
  EXPECT_EQ(*v_->listxattr(f, nullptr, 0), 0u);
  EXPECT_EQ(blocks(f), 0u);
  ASSERT_TRUE(v_->sync_wait());
  EXPECT_EQ(v_->statfs().f_bfree, free_before);

  // user.* only on files and directories; other namespaces on anything.
  auto link = v_->symlink(kRootIno, "sym", "f", 0, 0);
  ASSERT_TRUE(link);
  EXPECT_EQ(v_->setxattr(link->ino, "user.a", "1", 1, 0).error(), EPERM);
  EXPECT_EQ(v_->getxattr(link->ino, "user.a", nullptr, 0).status().error(), ENODATA);
  ASSERT_TRUE(v_->setxattr(link->ino, "trusted.a", "1", 1, 0));
  auto fifo = v_->mknod(kRootIno, "fifo", S_IFIFO | 0644, 0, 0, 0);
  ASSERT_TRUE(fifo);
  EXPECT_EQ(v_->setxattr(fifo->ino, "user.a", "1", 1, 0).error(), EPERM);
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  ASSERT_TRUE(v_->setxattr(d->ino, "user.a", "1", 1, 0));
  EXPECT_EQ(v_->setxattr(f, "user.a", "1", 1, 0x40).error(), EINVAL);
  expect_fsck_clean();
}

TEST_P(VolumeTest, XattrsPersistAcrossRemount) {
  uint64_t f = create(kRootIno, "f");
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  ASSERT_TRUE(d);
  std::string value(1000, '\0');
  for (std::size_t i = 0; i < value.size(); ++i) value[i] = char(i * 13);  // binary, NULs too
  ASSERT_TRUE(v_->setxattr(f, "user.bin", value.data(), value.size(), 0));
  ASSERT_TRUE(v_->setxattr(f, "security.capability", "cap", 3, 0));
  ASSERT_TRUE(v_->setxattr(d->ino, "trusted.overlay.opaque", "y", 1, 0));
  ASSERT_TRUE(v_->setxattr(kRootIno, "user.root", "r", 1, 0));
  ASSERT_TRUE(v_->setxattr(f, "user.gone", "g", 1, 0));
  ASSERT_TRUE(v_->removexattr(f, "user.gone"));
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(*getx(f, "user.bin"), value);
  EXPECT_EQ(*getx(f, "security.capability"), "cap");
  EXPECT_EQ(getx(f, "user.gone").status().error(), ENODATA);
  EXPECT_EQ(*getx(d->ino, "trusted.overlay.opaque"), "y");
  EXPECT_EQ(*getx(kRootIno, "user.root"), "r");
  EXPECT_EQ(listx(f), (std::set<std::string>{"user.bin", "security.capability"}));
  expect_fsck_clean();
  // Without a sync: the unmount commits them.
  ASSERT_TRUE(v_->setxattr(f, "user.late", "l", 1, 0));
  mount();
  EXPECT_EQ(*getx(f, "user.late"), "l");
}

TEST_P(VolumeTest, XattrBlocksAreFreedWithTheirInodes) {
  create(kRootIno, "first");  // the root directory's first block
  uint64_t free_before = v_->statfs().f_bfree;
  uint64_t a = create(kRootIno, "a");
  uint64_t b = create(kRootIno, "b");
  uint64_t c = create(kRootIno, "c");
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  for (uint64_t ino : {a, b, c, d->ino}) ASSERT_TRUE(v_->setxattr(ino, "user.k", "v", 1, 0));
  ASSERT_TRUE(v_->write(a, 0, "data", 4));
  ASSERT_TRUE(v_->unlink(kRootIno, "a"));  // gone at once
  ASSERT_TRUE(v_->rmdir(kRootIno, "d"));
  v_->hold(b, 1);
  ASSERT_TRUE(v_->unlink(kRootIno, "b"));  // gone when forgotten
  EXPECT_EQ(*getx(b, "user.k"), "v");
  v_->forget(b, 1);
  v_->hold(c, 1);
  ASSERT_TRUE(v_->unlink(kRootIno, "c"));  // an orphan: gone at the next mount
  ASSERT_TRUE(v_->sync_wait());
  v_.reset();
  mount();
  EXPECT_EQ(v_->statfs().f_bfree, free_before);
  expect_fsck_clean();
}

TEST_P(VolumeTest, FsckDropsADamagedXattrBlock) {
  uint64_t f = create(kRootIno, "f");
  ASSERT_TRUE(v_->setxattr(f, "user.k", "value", 5, 0));
  ASSERT_TRUE(v_->sync_wait());
  create(kRootIno, "g");  // so that the journal's last transaction is another one
  v_.reset();
  {
    // Scribble over the xattr block, through the BTT as a stray write would.
    RegionOptions ro;
    ro.force_persistent = true;
    auto region = Region::open(path_, ro);
    ASSERT_TRUE(region);
    fsfmt::ImageHeader h;
    std::memcpy(&h, (*region)->at(0), sizeof h);
    BttOpenOptions bo;
    bo.offset = h.btt_offset;
    bo.size = h.btt_size;
    bo.intent_log = h.intent_log_offset;
    auto btt = Btt::open(**region, bo);
    ASSERT_TRUE(btt);
    std::vector<std::byte> block((*btt)->sector_size());
    ASSERT_TRUE((*btt)->read(0, block.data()));
    fsfmt::Superblock sb;
    std::memcpy(&sb, block.data(), sizeof sb);
    uint64_t off = f * fsfmt::kInodeSize;
    ASSERT_TRUE((*btt)->read(sb.inode_table_start + off / block.size(), block.data()));
    fsfmt::Inode inode;
    std::memcpy(&inode, block.data() + off % block.size(), sizeof inode);
    ASSERT_NE(inode.xattr_block, 0u);
    ASSERT_TRUE((*btt)->read(inode.xattr_block, block.data()));
    block[50] ^= std::byte{0x5A};
    ASSERT_TRUE((*btt)->write(inode.xattr_block, block.data()));
    ASSERT_TRUE((*btt)->sync_wait());
  }
  auto report = fsck(path_, FsckOptions{});
  ASSERT_TRUE(report);
  ASSERT_EQ(report->problems.size(), 1u);
  EXPECT_THAT(report->problems[0], ::testing::HasSubstr("xattr block"));
  mount();
  EXPECT_EQ(v_->getxattr(f, "user.k", nullptr, 0).status().error(), EUCLEAN);
  v_.reset();
  FsckOptions repair;
  repair.repair = true;
  report = fsck(path_, repair);
  ASSERT_TRUE(report);
  EXPECT_FALSE(report->repairs.empty());
  EXPECT_TRUE(report->remaining.empty()) << report->remaining.front();
  EXPECT_EQ(report->exit_code(), 1);
  mount();
  EXPECT_EQ(v_->getxattr(f, "user.k", nullptr, 0).status().error(), ENODATA);
  EXPECT_EQ(blocks(f), 0u);
  ASSERT_TRUE(v_->setxattr(f, "user.k", "again", 5, 0));
  expect_fsck_clean();
}

// --- ACLs ---------------------------------------------------------------------------------------

TEST_P(VolumeTest, AccessAclKeepsTheModeInStep) {
  uint64_t f = create(kRootIno, "f", 0644);
  std::string a =
      acl({{kUserObj, 7, 0}, {kUser, 4, 1000}, {kGroupObj, 5, 0}, {kMask, 4, 0}, {kOther, 0, 0}});
  ASSERT_TRUE(v_->setxattr(f, "system.posix_acl_access", a.data(), a.size(), 0));
  // Owner from USER_OBJ, group from the mask, other from OTHER.
  EXPECT_EQ(v_->getattr(f)->mode, uint32_t(S_IFREG | 0740));
  auto back = getx(f, "system.posix_acl_access");
  ASSERT_TRUE(back);
  auto entries = parse_acl(*back);
  ASSERT_EQ(entries.size(), 5u);
  EXPECT_EQ(perm_of(entries, kUser, 1000), 4);
  EXPECT_EQ(perm_of(entries, kGroupObj), 5);
  EXPECT_EQ(listx(f), (std::set<std::string>{"system.posix_acl_access"}));

  // chmod rewrites USER_OBJ, MASK and OTHER; GROUP_OBJ stays.
  SetAttr c;
  c.mode = 0651;
  ASSERT_TRUE(v_->setattr(f, c));
  entries = parse_acl(*getx(f, "system.posix_acl_access"));
  EXPECT_EQ(perm_of(entries, kUserObj), 6);
  EXPECT_EQ(perm_of(entries, kMask), 5);
  EXPECT_EQ(perm_of(entries, kOther), 1);
  EXPECT_EQ(perm_of(entries, kGroupObj), 5);
  EXPECT_EQ(perm_of(entries, kUser, 1000), 4);
  EXPECT_EQ(v_->getattr(f)->mode, uint32_t(S_IFREG | 0651));
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(perm_of(parse_acl(*getx(f, "system.posix_acl_access")), kMask), 5);

  // An ACL the mode says all of is not kept: only the mode changes.
  std::string base = acl({{kUserObj, 6, 0}, {kGroupObj, 4, 0}, {kOther, 4, 0}});
  ASSERT_TRUE(v_->setxattr(f, "system.posix_acl_access", base.data(), base.size(), 0));
  EXPECT_EQ(v_->getattr(f)->mode, uint32_t(S_IFREG | 0644));
  EXPECT_EQ(getx(f, "system.posix_acl_access").status().error(), ENODATA);
  EXPECT_EQ(blocks(f), 0u);
  // Removing an ACL that is not there is fine, as on Linux.
  EXPECT_TRUE(v_->removexattr(f, "system.posix_acl_access"));
  ASSERT_TRUE(v_->setxattr(f, "system.posix_acl_access", a.data(), a.size(), 0));
  ASSERT_TRUE(v_->removexattr(f, "system.posix_acl_access"));
  EXPECT_EQ(getx(f, "system.posix_acl_access").status().error(), ENODATA);

  // Malformed ACLs.
  auto set = [&](const std::string& v) {
    return v_->setxattr(f, "system.posix_acl_access", v.data(), v.size(), 0).error();
  };
  std::string v1 = a;
  v1[0] = 1;  // version
  EXPECT_EQ(set(v1), EINVAL);
  EXPECT_EQ(set(a.substr(0, a.size() - 3)), EINVAL);  // not whole entries
  EXPECT_EQ(set(acl({{kUserObj, 7, 0}, {kUser, 4, 1000}, {kGroupObj, 5, 0}, {kOther, 0, 0}})),
            EINVAL);  // named entry without a mask
  EXPECT_EQ(set(acl({{kGroupObj, 5, 0}, {kUserObj, 7, 0}, {kOther, 0, 0}})), EINVAL);  // order
  EXPECT_EQ(set(acl({{kUserObj, 7, 0}, {kGroupObj, 5, 0}})), EINVAL);                  // no OTHER
  EXPECT_EQ(set(acl({{kUserObj, 8, 0}, {kGroupObj, 5, 0}, {kOther, 0, 0}})), EINVAL);  // perm
  EXPECT_EQ(set(acl({{kUserObj, 7, 0}, {0x40, 5, 0}, {kOther, 0, 0}})), EINVAL);       // tag
  EXPECT_EQ(set(acl({{kUserObj, 7, 0}, {kGroupObj, 5, 0}, {kOther, 0, 0}, {kOther, 0, 0}})),
            EINVAL);
  EXPECT_EQ(v_->getattr(f)->mode, uint32_t(S_IFREG | 0740)) << "a rejected ACL changes nothing";
  // Default ACLs are for directories only; an empty one is fine anywhere.
  std::string def = acl({{kUserObj, 7, 0}, {kGroupObj, 5, 0}, {kOther, 5, 0}});
  EXPECT_EQ(v_->setxattr(f, "system.posix_acl_default", def.data(), def.size(), 0).error(), EACCES);
  EXPECT_TRUE(v_->setxattr(f, "system.posix_acl_default", nullptr, 0, 0));
  EXPECT_TRUE(v_->removexattr(f, "system.posix_acl_default"));
  expect_fsck_clean();
}

TEST_P(VolumeTest, DefaultAclIsInheritedInsteadOfTheUmask) {
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  ASSERT_TRUE(d);
  std::string def = acl({{kUserObj, 7, 0},
                         {kUser, 7, 1000},
                         {kGroupObj, 5, 0},
                         {kGroup, 6, 50},
                         {kMask, 7, 0},
                         {kOther, 5, 0}});
  ASSERT_TRUE(v_->setxattr(d->ino, "system.posix_acl_default", def.data(), def.size(), 0));
  EXPECT_EQ(v_->getattr(d->ino)->mode, uint32_t(S_IFDIR | 0755)) << "a default ACL leaves the mode";

  // A file: the umask is ignored; mode and ACL mask each other.
  auto f = v_->mknod(d->ino, "f", S_IFREG | 0666, 0, 0, 0, 077);
  ASSERT_TRUE(f);
  EXPECT_EQ(f->mode, uint32_t(S_IFREG | 0664));
  auto fa = parse_acl(*getx(f->ino, "system.posix_acl_access"));
  EXPECT_EQ(perm_of(fa, kUserObj), 6);
  EXPECT_EQ(perm_of(fa, kUser, 1000), 7);
  EXPECT_EQ(perm_of(fa, kGroup, 50), 6);
  EXPECT_EQ(perm_of(fa, kMask), 6);
  EXPECT_EQ(perm_of(fa, kOther), 4);
  EXPECT_EQ(getx(f->ino, "system.posix_acl_default").status().error(), ENODATA);

  // A directory: the access ACL and the default ACL too.
  auto sub = v_->mkdir(d->ino, "sub", 0777, 0, 0, 077);
  ASSERT_TRUE(sub);
  EXPECT_EQ(sub->mode, uint32_t(S_IFDIR | 0775));
  EXPECT_EQ(*getx(sub->ino, "system.posix_acl_default"), def);
  EXPECT_EQ(perm_of(parse_acl(*getx(sub->ino, "system.posix_acl_access")), kMask), 7);
  // ... and its children inherit in turn.
  auto deeper = v_->mknod(sub->ino, "x", S_IFREG | 0600, 0, 0, 0, 022);
  ASSERT_TRUE(deeper);
  EXPECT_EQ(deeper->mode, uint32_t(S_IFREG | 0600));
  EXPECT_EQ(perm_of(parse_acl(*getx(deeper->ino, "system.posix_acl_access")), kMask), 0);

  // Symlinks never get ACLs.
  auto sym = v_->symlink(d->ino, "s", "f", 0, 0);
  ASSERT_TRUE(sym);
  EXPECT_EQ(sym->mode, uint32_t(S_IFLNK | 0777));
  EXPECT_EQ(getx(sym->ino, "system.posix_acl_access").status().error(), ENODATA);
  EXPECT_EQ(blocks(sym->ino), 0u);

  // A default ACL of base entries only: the mode is masked, no access ACL is stored.
  auto e = v_->mkdir(kRootIno, "e", 0755, 0, 0);
  std::string plain = acl({{kUserObj, 7, 0}, {kGroupObj, 0, 0}, {kOther, 0, 0}});
  ASSERT_TRUE(v_->setxattr(e->ino, "system.posix_acl_default", plain.data(), plain.size(), 0));
  auto g = v_->mknod(e->ino, "g", S_IFREG | 0666, 0, 0, 0, 0);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->mode, uint32_t(S_IFREG | 0600));
  EXPECT_EQ(getx(g->ino, "system.posix_acl_access").status().error(), ENODATA);
  EXPECT_EQ(blocks(g->ino), 0u);

  // Without a default ACL the umask applies, as before.
  auto h = v_->mknod(kRootIno, "h", S_IFREG | 0666, 0, 0, 0, 022);
  EXPECT_EQ(h->mode, uint32_t(S_IFREG | 0644));
  auto hd = v_->mkdir(kRootIno, "hd", 0777, 0, 0, 027);
  EXPECT_EQ(hd->mode, uint32_t(S_IFDIR | 0750));
  // Removing the default ACL ends the inheritance.
  ASSERT_TRUE(v_->removexattr(d->ino, "system.posix_acl_default"));
  auto later = v_->mknod(d->ino, "later", S_IFREG | 0666, 0, 0, 0, 022);
  EXPECT_EQ(later->mode, uint32_t(S_IFREG | 0644));
  EXPECT_EQ(getx(later->ino, "system.posix_acl_access").status().error(), ENODATA);
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(perm_of(parse_acl(*getx(f->ino, "system.posix_acl_access")), kGroup, 50), 6);
  expect_fsck_clean();
}

// --- fallocate and SEEK_DATA / SEEK_HOLE
// ----------------------------------------------------------

TEST_P(VolumeTest, FallocateAllocatesZeroedBlocks) {
  const uint32_t bs = v_->block_size();
  // Leave old data in free blocks, so that fallocate must not show it.
  uint64_t junk = create(kRootIno, "junk");
  std::string garbage(64 * bs, 'J');
  ASSERT_TRUE(v_->write(junk, 0, garbage.data(), garbage.size()));
  ASSERT_TRUE(v_->sync_wait());
  ASSERT_TRUE(v_->unlink(kRootIno, "junk"));
  ASSERT_TRUE(v_->sync_wait());

  uint64_t f = create(kRootIno, "f");
  std::string head(5000, 'a');
  ASSERT_TRUE(v_->write(f, 0, head.data(), head.size()));
  uint64_t free_before = v_->statfs().f_bfree;
  // Mode 0: blocks and size.
  ASSERT_TRUE(v_->fallocate(f, 0, 0, 40 * bs));
  auto a = *v_->getattr(f);
  EXPECT_EQ(a.size, 40u * bs);
  EXPECT_EQ(blocks(f), 40u + 1u) << "40 data blocks and a pointer block";
  EXPECT_EQ(v_->statfs().f_bfree, free_before - 39);
  std::string data = read_all(f);
  EXPECT_EQ(data.substr(0, 5000), head);
  EXPECT_EQ(data.find_first_not_of('\0', 5000), std::string::npos)
      << "fallocated blocks read zeros";
  // Again over the same range: nothing more to do.
  ASSERT_TRUE(v_->fallocate(f, 0, 100, 10 * bs));
  EXPECT_EQ(blocks(f), 41u);

  // KEEP_SIZE: blocks past the end, counted, and the size stays.
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_KEEP_SIZE, 40 * bs, 10 * bs));
  EXPECT_EQ(v_->getattr(f)->size, 40u * bs);
  EXPECT_EQ(blocks(f), 51u);
  // Writes into them take no new blocks.
  ASSERT_TRUE(v_->write(f, 45 * bs, "x", 1));
  EXPECT_EQ(blocks(f), 51u);
  data = read_all(f);
  EXPECT_EQ(data.size(), 45u * bs + 1);
  EXPECT_EQ(data.find_first_not_of('\0', 5000), 45u * bs);

  // Unaligned mode 0 extends to the exact byte.
  uint64_t g = create(kRootIno, "g");
  ASSERT_TRUE(v_->fallocate(g, 0, 100, 10));
  EXPECT_EQ(v_->getattr(g)->size, 110u);
  EXPECT_EQ(read_all(g), std::string(110, '\0'));
  EXPECT_EQ(blocks(g), 1u);
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(v_->getattr(f)->size, 45u * bs + 1);
  EXPECT_EQ(blocks(f), 51u);

  // Nearly all the free space, so that the junk file's old blocks are among those taken: they
  // read as zeros all the same.
  uint64_t h = create(kRootIno, "h");
  uint64_t most = v_->statfs().f_bfree * 63 / 64;
  ASSERT_TRUE(v_->fallocate(h, 0, 0, most * bs));
  EXPECT_EQ(read_all(h).find_first_not_of('\0'), std::string::npos);
  expect_fsck_clean();
}

TEST_P(VolumeTest, FallocateZeroRange) {
  const uint32_t bs = v_->block_size();
  uint64_t f = create(kRootIno, "f");
  std::string data(8 * bs, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = char('a' + i % 26);
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  uint64_t before = blocks(f);
  // Partial blocks at both edges, whole ones between.
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_ZERO_RANGE, 1000, 3 * bs + 100));
  std::fill(data.begin() + 1000, data.begin() + 1000 + 3 * bs + 100, '\0');
  EXPECT_EQ(read_all(f), data);
  EXPECT_EQ(blocks(f), before) << "zeroing keeps the blocks";
  // Across the end: with KEEP_SIZE the size stays, and blocks are allocated.
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 7 * bs + 10, 3 * bs));
  std::fill(data.begin() + 7 * bs + 10, data.end(), '\0');
  EXPECT_EQ(read_all(f), data);
  EXPECT_EQ(blocks(f), before + 3);
  // Without, it grows.
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_ZERO_RANGE, 9 * bs, bs + 7));
  data.resize(10 * bs + 7, '\0');
  EXPECT_EQ(read_all(f), data);
  EXPECT_EQ(blocks(f), before + 3);
  // Holes in the range are allocated too.
  uint64_t s = create(kRootIno, "sparse");
  ASSERT_TRUE(v_->write(s, 4 * bs, "end", 3));
  ASSERT_TRUE(v_->fallocate(s, FALLOC_FL_ZERO_RANGE, 0, 2 * bs));
  EXPECT_EQ(blocks(s), 3u);
  EXPECT_EQ(v_->getattr(s)->size, 4u * bs + 3);
  ASSERT_TRUE(v_->sync_wait());
  mount();
  EXPECT_EQ(read_all(f), data);
  expect_fsck_clean();
}

TEST_P(VolumeTest, PunchHoleFreesBlocks) {
  const uint32_t bs = v_->block_size();
  uint64_t f = create(kRootIno, "f");
  std::string data(10 * bs, 'p');
  ASSERT_TRUE(v_->write(f, 0, data.data(), data.size()));
  ASSERT_TRUE(v_->sync_wait());
  uint64_t free_before = v_->statfs().f_bfree;
  EXPECT_EQ(v_->fallocate(f, FALLOC_FL_PUNCH_HOLE, 0, bs).error(), EOPNOTSUPP);
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, bs + 100, 5 * bs - 50));
  // Blocks 2..5 go; the edges of blocks 1 and 6 read zeros.
  std::fill(data.begin() + bs + 100, data.begin() + 6 * bs + 50, '\0');
  EXPECT_EQ(read_all(f), data);
  EXPECT_EQ(v_->getattr(f)->size, 10u * bs);
  EXPECT_EQ(blocks(f), 6u);
  ASSERT_TRUE(v_->sync_wait());
  EXPECT_EQ(v_->statfs().f_bfree, free_before + 4);
  EXPECT_EQ(*v_->seek_data(f, bs + 200, SEEK_HOLE), 2u * bs);
  EXPECT_EQ(*v_->seek_data(f, 2 * bs, SEEK_DATA), 6u * bs);
  // Within one block: zeros, nothing freed.
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * bs + 10, 20));
  std::fill(data.begin() + 8 * bs + 10, data.begin() + 8 * bs + 30, '\0');
  EXPECT_EQ(read_all(f), data);
  EXPECT_EQ(blocks(f), 6u);

  // A big file: punching everything frees the pointer blocks too, and preallocated blocks past
  // the end.
  uint64_t big = create(kRootIno, "big");
  std::string chunk(1 << 20, 'B');
  for (int i = 0; i < 6; ++i)
    ASSERT_TRUE(v_->write(big, uint64_t(i) << 20, chunk.data(), chunk.size()));
  ASSERT_TRUE(v_->fallocate(big, FALLOC_FL_KEEP_SIZE, 6 << 20, 1 << 20));
  EXPECT_GT(blocks(big), (7u << 20) / bs);
  ASSERT_TRUE(v_->fallocate(big, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8 << 20));
  EXPECT_EQ(blocks(big), 0u);
  EXPECT_EQ(v_->getattr(big)->size, 6u << 20);
  EXPECT_EQ(read_all(big), std::string(6 << 20, '\0'));
  EXPECT_EQ(v_->seek_data(big, 0, SEEK_DATA).status().error(), ENXIO);
  ASSERT_TRUE(v_->sync_wait());
  EXPECT_EQ(v_->statfs().f_bfree, free_before + 4);
  mount();
  EXPECT_EQ(read_all(f), data);
  expect_fsck_clean();
}

TEST_P(VolumeTest, FallocateErrorsAndEnospc) {
  const uint32_t bs = v_->block_size();
  uint64_t f = create(kRootIno, "f");
  auto d = v_->mkdir(kRootIno, "d", 0755, 0, 0);
  auto fifo = v_->mknod(kRootIno, "fifo", S_IFIFO | 0644, 0, 0, 0);
  auto chr = v_->mknod(kRootIno, "chr", S_IFCHR | 0644, makedev(1, 3), 0, 0);
  EXPECT_EQ(v_->fallocate(d->ino, 0, 0, bs).error(), EISDIR);
  EXPECT_EQ(v_->fallocate(fifo->ino, 0, 0, bs).error(), ESPIPE);
  EXPECT_EQ(v_->fallocate(chr->ino, 0, 0, bs).error(), ENODEV);
  EXPECT_EQ(v_->fallocate(f, 0, 0, 0).error(), EINVAL);
  EXPECT_EQ(v_->fallocate(f, FALLOC_FL_COLLAPSE_RANGE, 0, bs).error(), EOPNOTSUPP);
  EXPECT_EQ(
      v_->fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, bs)
          .error(),
      EINVAL);
  EXPECT_EQ(v_->fallocate(f, 0, 16ull << 40, 1).error(), EFBIG);
  EXPECT_EQ(v_->fallocate(f, FALLOC_FL_KEEP_SIZE, ~0ull - 10, 100).error(), EFBIG);
  EXPECT_EQ(v_->fallocate(kRootIno + 1000, 0, 0, bs).error(), ENOENT);

  // More than is free: ENOSPC, and the file and the volume as they were.
  ASSERT_TRUE(v_->write(f, 0, "abc", 3));
  ASSERT_TRUE(v_->sync_wait());
  auto st = v_->statfs();
  uint64_t free_blocks = st.f_bfree;
  for (int mode : {0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE}) {
    EXPECT_EQ(v_->fallocate(f, mode, 0, (free_blocks + 10) * bs).error(), ENOSPC);
    EXPECT_EQ(v_->getattr(f)->size, 3u);
    EXPECT_EQ(blocks(f), 1u);
    EXPECT_EQ(v_->statfs().f_bfree, free_blocks);
  }
  // Most of it works, and it reads zeros; the rest is too little for a file of as much again.
  uint64_t want = free_blocks - free_blocks / 64 - 16;  // room for the pointer blocks
  ASSERT_TRUE(v_->fallocate(f, FALLOC_FL_KEEP_SIZE, 0, want * bs));
  EXPECT_EQ(v_->getattr(f)->size, 3u);
  EXPECT_GE(blocks(f), want);
  EXPECT_EQ(v_->statfs().f_bfree, free_blocks - (blocks(f) - 1));
  uint64_t g = create(kRootIno, "g");
  EXPECT_EQ(v_->fallocate(g, 0, 0, want * bs).error(), ENOSPC);
  EXPECT_EQ(v_->getattr(g)->size, 0u);
  EXPECT_EQ(blocks(g), 0u);
  // Freed blocks count once their transaction commits: fallocate commits to get them.
  ASSERT_TRUE(v_->unlink(kRootIno, "f"));
  ASSERT_TRUE(v_->fallocate(g, 0, 0, want * bs));
  EXPECT_EQ(v_->getattr(g)->size, want * bs);
  std::string back(bs, 'x');
  ASSERT_TRUE(v_->read(g, (want - 1) * bs, back.data(), back.size()));
  EXPECT_EQ(back, std::string(bs, '\0'));
  expect_fsck_clean();
}

TEST_P(VolumeTest, SeekDataAndHoleOnASparseFile) {
  const uint64_t bs = v_->block_size();
  uint64_t f = create(kRootIno, "f");
  ASSERT_TRUE(v_->write(f, 0, "a", 1));
  ASSERT_TRUE(v_->write(f, 5 * bs + 10, "b", 1));
  // Far out, under the double-indirect block: the walk skips whole missing subtrees.
  const uint64_t far = 12 + bs / 8 + 3 * (bs / 8) + 7;
  ASSERT_TRUE(v_->write(f, far * bs, "cc", 2));
  ASSERT_TRUE(v_->write(f, (far + 1) * bs, "dd", 2));
  SetAttr c;
  c.size = (far + 100) * bs;
  ASSERT_TRUE(v_->setattr(f, c));
  EXPECT_EQ(*v_->seek_data(f, 0, SEEK_DATA), 0u);
  EXPECT_EQ(*v_->seek_data(f, 0, SEEK_HOLE), bs);
  EXPECT_EQ(*v_->seek_data(f, 100, SEEK_HOLE), bs);
  EXPECT_EQ(*v_->seek_data(f, 1, SEEK_DATA), 1u);
  EXPECT_EQ(*v_->seek_data(f, bs, SEEK_DATA), 5 * bs);
  EXPECT_EQ(*v_->seek_data(f, bs + 7, SEEK_HOLE), bs + 7);
  EXPECT_EQ(*v_->seek_data(f, 5 * bs + 3, SEEK_DATA), 5 * bs + 3);
  EXPECT_EQ(*v_->seek_data(f, 6 * bs, SEEK_DATA), far * bs);
  EXPECT_EQ(*v_->seek_data(f, far * bs + 1, SEEK_HOLE), (far + 2) * bs);
  EXPECT_EQ(v_->seek_data(f, (far + 2) * bs, SEEK_DATA).status().error(), ENXIO);
  EXPECT_EQ(*v_->seek_data(f, (far + 2) * bs, SEEK_HOLE), (far + 2) * bs);
  EXPECT_EQ(v_->seek_data(f, (far + 100) * bs, SEEK_HOLE).status().error(), ENXIO);
  EXPECT_EQ(v_->seek_data(f, (far + 100) * bs, SEEK_DATA).status().error(), ENXIO);
  EXPECT_EQ(v_->seek_data(f, 0, SEEK_END).status().error(), EINVAL);
  // A file all data: the only hole is its end, mid-block or not.
  uint64_t g = create(kRootIno, "g");
  std::string data(3 * bs + 5, 'g');
  ASSERT_TRUE(v_->write(g, 0, data.data(), data.size()));
  EXPECT_EQ(*v_->seek_data(g, 10, SEEK_HOLE), data.size());
  EXPECT_EQ(*v_->seek_data(g, 3 * bs + 1, SEEK_DATA), 3 * bs + 1);
  uint64_t empty = create(kRootIno, "empty");
  EXPECT_EQ(v_->seek_data(empty, 0, SEEK_DATA).status().error(), ENXIO);
  EXPECT_EQ(v_->seek_data(empty, 0, SEEK_HOLE).status().error(), ENXIO);
  // Preallocated blocks are data.
  ASSERT_TRUE(v_->fallocate(f, 0, 2 * bs, bs));
  EXPECT_EQ(*v_->seek_data(f, bs, SEEK_DATA), 2 * bs);
  expect_fsck_clean();
}

TEST_P(VolumeTest, ConcurrentFallocateWritesAndXattrs) {
  // Each thread works on a file of its own against a model of it, while the others allocate,
  // punch and commit around it; then every file must match its model and fsck find nothing.
  const uint64_t bs = v_->block_size();
  constexpr int kThreads = 4;
  std::vector<uint64_t> inos;
  for (int t = 0; t < kThreads; ++t) inos.push_back(create(kRootIno, nm('c', t)));
  std::vector<std::string> models(kThreads);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      uint64_t ino = inos[t];
      std::string& d = models[t];
      uint64_t x = 0x9E3779B97F4A7C15ull * (t + 1);
      auto next = [&](uint64_t n) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        return x % n;
      };
      auto fail = [&](const std::string& what, const Status& s) {
        if (errors[t].empty()) errors[t] = what + ": " + s.to_string();
      };
      for (int i = 0; i < 1000 && errors[t].empty(); ++i) {
        uint64_t off = next(300 * bs), len = 1 + next(20 * bs);
        switch (next(6)) {
          case 0: {
            std::string data(len, char('a' + next(26)));
            if (auto n = v_->write(ino, off, data.data(), data.size()); !n) {
              fail("write", n.status());
              break;
            }
            if (d.size() < off + len) d.resize(off + len, '\0');
            d.replace(off, len, data);
            break;
          }
          case 1:
            if (Status s = v_->fallocate(ino, 0, off, len); !s) fail("fallocate", s);
            if (d.size() < off + len) d.resize(off + len, '\0');
            break;
          case 2:
            if (Status s = v_->fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
                !s) {
              fail("punch", s);
            }
            if (off < d.size()) std::fill_n(d.begin() + off, std::min(len, d.size() - off), '\0');
            break;
          case 3:
            if (Status s = v_->fallocate(ino, FALLOC_FL_ZERO_RANGE, off, len); !s) fail("zero", s);
            if (d.size() < off + len) d.resize(off + len, '\0');
            std::fill_n(d.begin() + off, len, '\0');
            break;
          case 4: {
            std::string value(1 + next(1000), char('A' + t));
            if (Status s = v_->setxattr(ino, "user.v", value.data(), value.size(), 0); !s) {
              fail("setxattr", s);
            }
            break;
          }
          case 5:
            if (off < d.size()) {
              auto pos = v_->seek_data(ino, off, next(2) == 0 ? SEEK_DATA : SEEK_HOLE);
              if (!pos && pos.status().error() != ENXIO) fail("seek", pos.status());
            }
            if (next(4) == 0) (void)v_->sync_wait();
            break;
        }
        // Now and then the whole file, read back while the others go on.
        if (next(8) == 0 && errors[t].empty()) {
          std::string back(d.size(), '\0');
          auto n = v_->read(ino, 0, back.data(), back.size());
          if (!n || back != d) errors[t] = "content differs after call " + std::to_string(i);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  // Where two contents first differ (npos: nowhere), so that a failure says little.
  auto differ = [](const std::string& a, const std::string& b) {
    auto at = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
    return at.first == a.end() && at.second == b.end() ? std::string::npos
                                                       : std::size_t(at.first - a.begin());
  };
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(errors[t], "") << "thread " << t;
    EXPECT_EQ(differ(read_all(inos[t]), models[t]), std::string::npos) << "thread " << t;
  }
  expect_fsck_clean();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(differ(read_all(inos[t]), models[t]), std::string::npos) << "thread " << t;
  }
}

TEST_P(VolumeTest, ReadOnlyVolumeRefusesChangesButReads) {
  const uint32_t bs = v_->block_size();
  uint64_t f = create(kRootIno, "f");
  ASSERT_TRUE(v_->setxattr(f, "user.k", "v", 1, 0));
  ASSERT_TRUE(v_->fallocate(f, 0, 0, 4 * bs));
  v_.reset();
  MountOptions m;
  m.mode = GetParam();
  m.force_persistent = true;
  m.read_only = true;
  auto v = Volume::mount(path_, m);
  ASSERT_TRUE(v) << v.status().to_string();
  v_ = std::move(v.value());
  EXPECT_EQ(*getx(f, "user.k"), "v");
  EXPECT_EQ(listx(f), (std::set<std::string>{"user.k"}));
  EXPECT_EQ(*v_->seek_data(f, 0, SEEK_HOLE), 4u * bs);
  EXPECT_EQ(v_->setxattr(f, "user.k", "w", 1, 0).error(), EROFS);
  EXPECT_EQ(v_->removexattr(f, "user.k").error(), EROFS);
  EXPECT_EQ(v_->fallocate(f, 0, 0, 8 * bs).error(), EROFS);
  EXPECT_EQ(v_->fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, bs).error(), EROFS);
}

INSTANTIATE_TEST_SUITE_P(Fs, VolumeTest,
                         ::testing::Values(PersistMode::direct, PersistMode::writeback),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// 512-byte blocks: a smaller xattr block, and block maps four levels deep soon.
TEST(VolumeSmallBlocks, XattrsFallocateAndSeek) {
  TempPath path("volume512.img");
  MkfsOptions o;
  o.size = 64 << 20;
  o.force_persistent = true;
  o.sector_size = 512;
  ASSERT_TRUE(Volume::mkfs(path, o));
  MountOptions m;
  m.force_persistent = true;
  auto mounted = Volume::mount(path, m);
  ASSERT_TRUE(mounted) << mounted.status().to_string();
  auto v = std::move(mounted.value());
  ASSERT_EQ(v->block_size(), 512u);
  auto f = v->mknod(kRootIno, "f", S_IFREG | 0644, 0, 0, 0);
  ASSERT_TRUE(f);
  std::string value(400, 'v');
  ASSERT_TRUE(v->setxattr(f->ino, "user.a", value.data(), value.size(), 0));
  // 472 bytes of entries per block: the second attribute starts a second xattr block.
  ASSERT_TRUE(v->setxattr(f->ino, "user.b", value.data(), 100, 0));
  // Past the triple-indirect block: 12 + 64 + 64^2 + 64^3 blocks.
  const uint64_t far = (12 + 64 + 4096 + 262144 + 1000) * 512ull;
  ASSERT_TRUE(v->write(f->ino, 0, "head", 4));
  ASSERT_TRUE(v->fallocate(f->ino, FALLOC_FL_KEEP_SIZE, far, 100 * 512));
  ASSERT_TRUE(v->write(f->ino, far + 50 * 512, "tail", 4));
  EXPECT_EQ(*v->seek_data(f->ino, 512, SEEK_DATA), far);
  EXPECT_EQ(*v->seek_data(f->ino, far, SEEK_HOLE), far + 50 * 512 + 4) << "the end";
  EXPECT_EQ(*v->seek_data(f->ino, 600, SEEK_HOLE), 600u);
  uint64_t blocks = v->getattr(f->ino)->blocks;
  // The first block, two xattr blocks, the preallocated ones, and pointer blocks: one at each
  // of levels 4, 3 and 2, three at level 1 (64 blocks each; the 100 start at 1000 into it).
  EXPECT_EQ(blocks, 1u + 2 + 100 + 1 + 1 + 1 + 3);
  auto before = v->statfs().f_bfree;
  ASSERT_TRUE(
      v->fallocate(f->ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512, far + 512 * 512));
  EXPECT_EQ(v->getattr(f->ino)->blocks, 3u) << "the first block and the xattr blocks";
  ASSERT_TRUE(v->sync_wait());
  EXPECT_EQ(v->statfs().f_bfree, before + blocks - 3);
  EXPECT_EQ(v->fallocate(f->ino, 0, 1ull << 40, 512).error(), EFBIG) << "beyond the block map";
  v.reset();
  auto report = fsck(path, FsckOptions{});
  ASSERT_TRUE(report);
  EXPECT_TRUE(report->problems.empty()) << report->problems.front();
}

// A transaction must fit the journal. With 512-byte blocks the journal of a 1 GiB image is
// capped at 16384 blocks, and a 600 MiB write changes more pointer blocks than that: the write
// commits part way, in pieces, rather than overrunning the journal into the bitmaps.
TEST(VolumeSmallBlocks, WriteLargerThanTheJournalCommitsInPieces) {
  TempPath path("journal512.img");
  MkfsOptions o;
  o.size = 1ull << 30;
  o.force_persistent = true;
  o.sector_size = 512;
  ASSERT_TRUE(Volume::mkfs(path, o));
  MountOptions m;
  m.force_persistent = true;
  m.commit_interval_ms = 3600 * 1000;  // only what the call itself needs commits
  std::vector<uint64_t> data((600 << 20) / 8);
  for (std::size_t i = 0; i < data.size(); i += 64) data[i] = i;  // every block differs
  const std::size_t bytes = data.size() * 8;
  {
    auto v = std::move(Volume::mount(path, m).value());
    auto f = v->mknod(kRootIno, "big", S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(f);
    auto wrote = v->write(f->ino, 0, data.data(), bytes);
    ASSERT_TRUE(wrote) << wrote.status().to_string();
    EXPECT_EQ(*wrote, bytes);
    ASSERT_TRUE(v->sync_wait());
  }
  auto v = std::move(Volume::mount(path, m).value());
  auto a = v->lookup(kRootIno, "big");
  ASSERT_TRUE(a);
  ASSERT_EQ(a->size, bytes);
  std::vector<uint64_t> back(data.size());
  ASSERT_EQ(*v->read(a->ino, 0, back.data(), bytes), bytes);
  EXPECT_TRUE(back == data);
  ASSERT_TRUE(v->unlink(kRootIno, "big"));
  v.reset();
  auto report = fsck(path, FsckOptions{});
  ASSERT_TRUE(report) << report.status().to_string();
  EXPECT_TRUE(report->problems.empty()) << report->problems.front();
}

// A tiny metadata cache: blocks are dropped after every commit and read back from the BTT, with
// commits running all the time under four threads of creates, writes, xattrs and unlinks.
TEST(VolumeSmallCache, EvictedMetadataReadsBackTheSame) {
  TempPath path("smallcache.img");
  MkfsOptions o;
  o.size = 64 << 20;
  o.force_persistent = true;
  ASSERT_TRUE(Volume::mkfs(path, o));
  MountOptions m;
  m.force_persistent = true;
  m.cache_blocks = 16;
  m.commit_interval_ms = 2;
  {
    auto v = std::move(Volume::mount(path, m).value());
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&v, t] {
        auto d = v->mkdir(kRootIno, nm('d', t), 0755, 0, 0);
        ASSERT_TRUE(d);
        for (int i = 0; i < 400; ++i) {
          auto f = v->mknod(d->ino, nm('f', i), S_IFREG | 0644, 0, 0, 0);
          ASSERT_TRUE(f) << f.status().to_string();
          std::string data = nm('c', t * 1000 + i);
          ASSERT_TRUE(v->write(f->ino, uint64_t(i) * 512, data.data(), data.size()));
          ASSERT_TRUE(v->setxattr(f->ino, "user.n", data.data(), data.size(), 0));
          if (i % 5 == 4) {
            ASSERT_TRUE(v->unlink(d->ino, nm('f', i - 2)));
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    ASSERT_TRUE(v->sync_wait());
  }
  for (int pass = 0; pass < 2; ++pass) {
    auto v = std::move(Volume::mount(path, m).value());
    for (int t = 0; t < 4; ++t) {
      auto d = v->lookup(kRootIno, nm('d', t));
      ASSERT_TRUE(d);
      for (int i = 0; i < 400; ++i) {
        auto f = v->lookup(d->ino, nm('f', i));
        bool removed = i % 5 == 2 && i + 2 < 400;
        ASSERT_EQ(bool(f), !removed) << t << "/" << i;
        if (!f) continue;
        std::string want = nm('c', t * 1000 + i);
        std::string got(want.size(), '\0');
        ASSERT_TRUE(v->read(f->ino, uint64_t(i) * 512, got.data(), got.size()));
        EXPECT_EQ(got, want);
        char x[16];
        auto n = v->getxattr(f->ino, "user.n", x, sizeof x);
        ASSERT_TRUE(n);
        EXPECT_EQ(std::string(x, *n), want);
      }
    }
  }
  auto report = fsck(path, FsckOptions{});
  ASSERT_TRUE(report);
  EXPECT_TRUE(report->problems.empty()) << report->problems.front();
}

// --- DAX mappings ---------------------------------------------------------------------------

TEST_P(VolumeTest, MappingsFillHolesPinBlocksAndBlockCuts) {
  uint64_t f = create(kRootIno, "mapped");
  std::string head(5000, 'h');
  ASSERT_TRUE(v_->write(f, 0, head.data(), head.size()));
  SetAttr c;
  c.size = 64 << 10;
  ASSERT_TRUE(v_->setattr(f, c));
  const uint64_t bs = v_->block_size();
  EXPECT_EQ(v_->map(f, 1, bs, false).status().error(), EINVAL) << "unaligned";
  EXPECT_EQ(v_->map(f, 0, 128 << 10, false).status().error(), EINVAL) << "past the end";
  EXPECT_EQ(v_->map(kRootIno, 0, bs, false).status().error(), ENODEV) << "a directory";
  auto m = v_->map(f, 0, 64 << 10, false);
  ASSERT_TRUE(m) << m.status().to_string();
  EXPECT_EQ(blocks(f), (64u << 10) / bs + 1) << "the holes have blocks now (and a pointer block)";
  EXPECT_EQ(v_->getattr(f)->size, 64u << 10) << "and the size stays";
  uint64_t covered = 0;
  for (const DaxExtent& e : (*m)->extents()) {
    EXPECT_EQ(e.address, v_->region().at(e.image_offset));
    EXPECT_EQ(e.file_offset, covered);
    covered += e.length;
  }
  ASSERT_EQ(covered, 64u << 10);
  auto at = [&](uint64_t off) {
    for (const DaxExtent& e : (*m)->extents()) {
      if (off >= e.file_offset && off < e.file_offset + e.length) {
        return e.address + (off - e.file_offset);
      }
    }
    return static_cast<std::byte*>(nullptr);
  };
  EXPECT_EQ(std::memcmp(at(0), head.data(), 100), 0);
  EXPECT_EQ(*at(40000), std::byte{0}) << "a filled hole reads zeros";
  // Stores through the mapping are the file's; writes through the volume land in place.
  std::memcpy(at(20000), "direct", 6);
  char back[6];
  ASSERT_TRUE(v_->read(f, 20000, back, 6));
  EXPECT_EQ(std::string(back, 6), "direct");
  ASSERT_TRUE(v_->write(f, 30000, "volume", 6));
  EXPECT_EQ(std::memcmp(at(30000), "volume", 6), 0) << "the pinned block was written in place";
  // Blocks under a mapping stay put.
  c.size = 100;
  EXPECT_EQ(v_->setattr(f, c).status().error(), EBUSY);
  EXPECT_EQ(v_->fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, bs).error(), EBUSY);
  // An unlinked file lives while mapped.
  ASSERT_TRUE(v_->unlink(kRootIno, "mapped"));
  ASSERT_TRUE((*m)->sync_wait());
  EXPECT_EQ(std::memcmp(at(20000), "direct", 6), 0);
  auto free_before = v_->statfs().f_bfree;
  m->reset();
  EXPECT_GT(v_->statfs().f_bfree, free_before) << "freed with its last mapping";
  expect_fsck_clean();
}

// A writeback mount (the flush channel does real work), and a fresh 64 MiB volume under it.
MountOptions writeback_mount() {
  MountOptions m;
  m.force_persistent = true;
  m.mode = PersistMode::writeback;
  return m;
}

std::unique_ptr<Volume> fresh_writeback_volume(const std::string& path) {
  MkfsOptions o;
  o.size = 64 << 20;
  o.force_persistent = true;
  EXPECT_TRUE(Volume::mkfs(path, o));
  return std::move(Volume::mount(path, writeback_mount()).value());
}

TEST(VolumeDax, SynchronousMappingsNeedADirectRegion) {
  TempPath path("dax-wb.img");
  const MountOptions m = writeback_mount();
  auto v = fresh_writeback_volume(path);
  auto f = v->mknod(kRootIno, "f", S_IFREG | 0644, 0, 0, 0);
  ASSERT_TRUE(f);
  SetAttr c;
  c.size = 8192;
  ASSERT_TRUE(v->setattr(f->ino, c));
  auto sync_map = v->map(f->ino, 0, 8192, true);
  ASSERT_FALSE(sync_map);
  EXPECT_EQ(sync_map.status().error(), EOPNOTSUPP);
  EXPECT_THAT(sync_map.status().message(), ::testing::HasSubstr("writeback"));
  // Nor can an unsafe one.
  {
    v.reset();
    MountOptions u = m;
    u.mode = PersistMode::unsafe;
    auto unsafe = std::move(Volume::mount(path, u).value());
    EXPECT_EQ(unsafe->map(f->ino, 0, 8192, true).status().error(), EOPNOTSUPP);
    unsafe.reset();
    v = std::move(Volume::mount(path, m).value());
  }
  // Without the promise it works, and sync() is its msync.
  auto plain = v->map(f->ino, 0, 8192, false);
  ASSERT_TRUE(plain) << plain.status().to_string();
  std::memcpy((*plain)->extents()[0].address, "wb", 2);
  auto flushes = v->region().flush_channel().stats().requests;
  ASSERT_TRUE((*plain)->sync_wait());
  EXPECT_GT(v->region().flush_channel().stats().requests, flushes);
}

// MAP_SYNC on a direct region: the blocks and their metadata are durable when map() returns,
// so a crash right then keeps the file's blocks, and a store made durable by a cache flush
// (no msync, no fsync) survives a crash.
TEST(VolumeDax, SynchronousMappingSurvivesACrash) {
  TempPath path("dax-crash.img");
  TempPath crashed("dax-crash-dst.img");
  MkfsOptions o;
  o.size = 32 << 20;
  o.force_persistent = true;
  ASSERT_TRUE(Volume::mkfs(path, o));
  MountOptions mo;
  mo.force_persistent = true;
  mo.mode = PersistMode::direct;
  mo.commit_interval_ms = 3600 * 1000;  // nothing commits unless the calls make it
  auto v = std::move(Volume::mount(path, mo).value());
  auto f = v->mknod(kRootIno, "f", S_IFREG | 0644, 0, 0, 0);
  ASSERT_TRUE(f);
  ASSERT_TRUE(v->sync_wait());
  CrashRecorder recorder(v->region());
  SetAttr c;
  c.size = 16384;
  ASSERT_TRUE(v->setattr(f->ino, c));  // not synced: only map() makes it durable
  auto m = v->map(f->ino, 0, 16384, true);
  ASSERT_TRUE(m) << m.status().to_string();
  const std::size_t mapped = recorder.events();
  // The application's stores through the pointer and their cache flush; the simulator sees the
  // region's store and persist calls, so they go through those at the same addresses.
  const DaxExtent& e = (*m)->extents()[0];
  v->region().write(e.image_offset + 100, "synchronous", 11);
  v->region().persist(e.image_offset + 100, 11);
  const std::size_t stored = recorder.events();
  recorder.detach();
  CrashReplay replay(recorder, CrashModel::direct);
  std::vector<std::byte> image(recorder.region_size());
  for (std::size_t cut : {mapped, stored}) {
    replay.advance_to(cut);
    for (uint64_t seed = 1; seed <= 20; ++seed) {
      replay.image_into(seed, image.data());
      {
        int fd = ::open(crashed.str().c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::pwrite(fd, image.data(), image.size(), 0), ssize_t(image.size()));
        ::close(fd);
      }
      MountOptions after;
      after.force_persistent = true;
      after.boot_id = std::array<uint8_t, 16>{9, 9};  // a power failure: another boot
      auto w = Volume::mount(crashed, after);
      ASSERT_TRUE(w) << w.status().to_string();
      auto a = (*w)->lookup(kRootIno, "f");
      ASSERT_TRUE(a);
      EXPECT_EQ(a->size, 16384u) << "cut " << cut;
      EXPECT_EQ(a->blocks * 512, 16384u) << "the mapped blocks are the file's";
      char back[11] = {};
      ASSERT_TRUE((*w)->read(a->ino, 100, back, 11));
      if (cut == stored) {
        EXPECT_EQ(std::string(back, 11), "synchronous") << "seed " << seed;
      }
      w->reset();
      auto report = fsck(crashed, FsckOptions{});
      ASSERT_TRUE(report);
      EXPECT_TRUE(report->problems.empty()) << report->problems.front();
    }
  }
}

// On a writeback region an fsync is a journal commit: the data made durable, then the journal,
// one device flush each (the BTT's intent log holds the sectors until their epoch commits).
// fdatasync of a file whose size and blocks are already committed skips the journal: one
// flush; one that grew the file, or allocated blocks, does not.
TEST(VolumeFsync, FdatasyncOfAnOverwriteSkipsTheJournal) {
  TempPath path("fdatasync.img");
  auto v = fresh_writeback_volume(path);
  auto f = v->mknod(kRootIno, "f", S_IFREG | 0644, 0, 0, 0);
  ASSERT_TRUE(f);
  std::string data(3 * 4096, 'a');
  ASSERT_TRUE(v->write(f->ino, 0, data.data(), data.size()));
  FlushChannel& channel = v->region().flush_channel();
  auto flushes_of = [&](auto&& call) {
    uint64_t before = channel.stats().device_flushes;
    EXPECT_TRUE(call());
    return channel.stats().device_flushes - before;
  };
  // The first fdatasync commits the new blocks and size.
  EXPECT_EQ(flushes_of([&] { return v->fsync(f->ino, true); }), 2u);
  ASSERT_TRUE(v->write(f->ino, 4096, "b", 1));
  EXPECT_EQ(flushes_of([&] { return v->fsync(f->ino, true); }), 1u) << "overwrite: data only";
  ASSERT_TRUE(v->getattr(f->ino));  // times reported: the next write stamps a new mtime
  ASSERT_TRUE(v->write(f->ino, 4096, "c", 1));
  EXPECT_EQ(flushes_of([&] { return v->fsync(f->ino, false); }), 2u) << "fsync commits mtime";
  ASSERT_TRUE(v->write(f->ino, data.size(), "d", 1));
  EXPECT_EQ(flushes_of([&] { return v->fsync(f->ino, true); }), 2u) << "grown: commits size";
  // What fdatasync made durable is there after a remount.
  v.reset();
  v = std::move(Volume::mount(path, writeback_mount()).value());
  char got[2] = {};
  ASSERT_TRUE(v->read(f->ino, 4096, got, 1));
  EXPECT_EQ(got[0], 'c');
  EXPECT_EQ(v->getattr(f->ino)->size, data.size() + 1);
}

// Overwrites within one tick of the coarse clock, with nobody looking at the times in between,
// change no metadata: fsync has only the data to make durable (1 device flush, no journal).
TEST(VolumeFsync, OverwritesWithinATickLeaveNoJournalWork) {
  TempPath path("tick.img");
  auto v = fresh_writeback_volume(path);
  auto f = v->mknod(kRootIno, "f", S_IFREG | 0644, 0, 0, 0);
  ASSERT_TRUE(f);
  ASSERT_TRUE(v->write(f->ino, 0, "a", 1));
  FlushChannel& channel = v->region().flush_channel();
  // The clock may tick during a check; then it is tried again. One write stamps the inode in
  // this tick (if the last stamp was older) and fsync commits that; then the overwrites of the
  // same tick must change nothing. On a disk image under a sanitizer a check takes a good part of
  // a tick, hence few writes and many attempts.
  bool checked = false;
  for (int attempt = 0; attempt < 200 && !checked; ++attempt) {
    ASSERT_TRUE(v->fsync(f->ino, false));
    timespec tick = coarse_clock();
    ASSERT_TRUE(v->write(f->ino, 0, "b", 1));
    ASSERT_TRUE(v->fsync(f->ino, false));
    uint64_t before = channel.stats().device_flushes;
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(v->write(f->ino, 0, "b", 1));
    ASSERT_TRUE(v->fsync(f->ino, false));
    if (!(coarse_clock() == tick)) continue;
    EXPECT_EQ(channel.stats().device_flushes - before, 1u) << "the overwrites dirtied the inode";
    checked = true;
  }
  EXPECT_TRUE(checked) << "the coarse clock ticked during every attempt";
  // Reported times: the next write is a change, committed by fsync.
  ASSERT_TRUE(v->getattr(f->ino));
  ASSERT_TRUE(v->write(f->ino, 0, "c", 1));
  uint64_t before = channel.stats().device_flushes;
  ASSERT_TRUE(v->fsync(f->ino, false));
  EXPECT_EQ(channel.stats().device_flushes - before, 2u);
}

}  // namespace
}  // namespace vpmfs
