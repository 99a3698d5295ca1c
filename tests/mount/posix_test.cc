// POSIX behaviour through a real FUSE mount of vpmfs, checked against what Linux specifies.
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "mount_fixture.h"

namespace vpmfs {
namespace {

using test::Mount;

std::string slurp(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  std::string out;
  if (fd < 0) {
    out = "<";
    out += strerror(errno);
    out += ">";
    return out;
  }
  char buf[65536];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  ::close(fd);
  return out;
}

void spit(const std::string& path, const std::string& data,
          int flags = O_WRONLY | O_CREAT | O_TRUNC) {
  int fd = ::open(path.c_str(), flags, 0644);
  ASSERT_GE(fd, 0) << path << ": " << strerror(errno);
  ASSERT_EQ(::write(fd, data.data(), data.size()), ssize_t(data.size()));
  ASSERT_EQ(::close(fd), 0);
}

int err(int rc) {
  return rc < 0 ? errno : 0;
}

// How many requests with this opcode a daemon's -d trace shows ("LOOKUP", "FLUSH", ...).
std::size_t requests(const std::string& trace, const std::string& opcode) {
  const std::string line = "opcode: " + opcode + " ";
  std::size_t n = 0;
  for (auto at = trace.find(line); at != std::string::npos; at = trace.find(line, at + 1)) ++n;
  return n;
}

class Posix : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { mount_ = new Mount("posix", {"allow_other"}); }
  static void TearDownTestSuite() {
    EXPECT_EQ(mount_->unmount(), 0) << "fsck.vpmfs -n after the POSIX suite";
    delete mount_;
  }
  std::string p(const std::string& rel) {
    return mount_->path(
        std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "-" + rel);
  }
  static Mount* mount_;
};
Mount* Posix::mount_ = nullptr;

TEST_F(Posix, CreateWriteReadStat) {
  ASSERT_TRUE(mount_->mounted());
  spit(p("f"), "hello");
  EXPECT_EQ(slurp(p("f")), "hello");
  struct stat st {};
  ASSERT_EQ(::stat(p("f").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_size, 5);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  EXPECT_EQ(st.st_nlink, 1u);
  EXPECT_EQ(err(::open(p("f").c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644)), EEXIST);
  EXPECT_EQ(err(::open(p("missing").c_str(), O_RDONLY)), ENOENT);
}

TEST_F(Posix, LargeAndUnalignedIo) {
  std::string big(3 * 1024 * 1024 + 777, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = char(i * 131 + i / 4096);
  spit(p("big"), big);
  EXPECT_EQ(slurp(p("big")), big);
  int fd = ::open(p("big").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "XYZ", 3, 4095), 3);
  char back[5];
  ASSERT_EQ(::pread(fd, back, 5, 4094), 5);
  EXPECT_EQ(std::string(back, 5), std::string(1, big[4094]) + "XYZ" + big[4098]);
  ::close(fd);
}

TEST_F(Posix, AppendAndSparseFiles) {
  spit(p("a"), "one");
  spit(p("a"), "two", O_WRONLY | O_APPEND);
  EXPECT_EQ(slurp(p("a")), "onetwo");
  int fd = ::open(p("sparse").c_str(), O_CREAT | O_WRONLY, 0644);
  ASSERT_EQ(::pwrite(fd, "end", 3, 10 << 20), 3);
  ::close(fd);
  std::string s = slurp(p("sparse"));
  ASSERT_EQ(s.size(), (10u << 20) + 3);
  EXPECT_EQ(s.substr(0, 10 << 20), std::string(10 << 20, '\0'));
  struct stat st {};
  ASSERT_EQ(::stat(p("sparse").c_str(), &st), 0);
  EXPECT_LT(st.st_blocks * 512, 64 * 1024) << "a hole must not take space";
}

TEST_F(Posix, TruncateUpAndDown) {
  spit(p("t"), std::string(10000, 'x'));
  ASSERT_EQ(::truncate(p("t").c_str(), 100), 0);
  ASSERT_EQ(::truncate(p("t").c_str(), 5000), 0);
  std::string s = slurp(p("t"));
  EXPECT_EQ(s, std::string(100, 'x') + std::string(4900, '\0'));
  EXPECT_EQ(err(::truncate(p("nope").c_str(), 1)), ENOENT);
  ::mkdir(p("d").c_str(), 0755);
  EXPECT_EQ(err(::truncate(p("d").c_str(), 1)), EISDIR);
}

TEST_F(Posix, UnlinkedOpenFileKeepsItsData) {
  spit(p("u"), "still here");
  int fd = ::open(p("u").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::unlink(p("u").c_str()), 0);
  EXPECT_EQ(err(::access(p("u").c_str(), F_OK)), ENOENT);
  char buf[16] = {};
  EXPECT_EQ(::pread(fd, buf, sizeof buf, 0), 10);
  EXPECT_STREQ(buf, "still here");
  ::close(fd);
}

// open(O_TMPFILE): an unnamed file, with the directory's rules (mode, umask, owner), that
// linkat names; one never named gives its inode and blocks back when closed.
TEST_F(Posix, TmpfileIsUnnamedUntilLinked) {
  ASSERT_EQ(::mkdir(p("d").c_str(), 0755), 0);
  struct statvfs before {};
  ASSERT_EQ(::statvfs(p("d").c_str(), &before), 0);
  int fd = ::open(p("d").c_str(), O_TMPFILE | O_RDWR, 0640);
  ASSERT_GE(fd, 0) << strerror(errno);
  std::string data(3 * 4096 + 5, 't');
  ASSERT_EQ(::write(fd, data.data(), data.size()), ssize_t(data.size()));
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(st.st_nlink, 0u);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  EXPECT_EQ(st.st_size, off_t(data.size()));
  DIR* dir = ::opendir(p("d").c_str());
  ASSERT_NE(dir, nullptr);
  int names = 0;
  while (dirent* e = ::readdir(dir))
    names += std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..");
  ::closedir(dir);
  EXPECT_EQ(names, 0) << "an O_TMPFILE file has no name";
  ASSERT_EQ(::linkat(fd, "", AT_FDCWD, (p("d") + "/named").c_str(), AT_EMPTY_PATH), 0)
      << strerror(errno);
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(st.st_nlink, 1u);
  ASSERT_EQ(::close(fd), 0);
  EXPECT_EQ(slurp(p("d") + "/named"), data);

  // O_EXCL: never to be linked (the kernel refuses); closed, its space and inode come back.
  fd = ::open(p("d").c_str(), O_TMPFILE | O_WRONLY | O_EXCL, 0600);
  ASSERT_GE(fd, 0) << strerror(errno);
  std::string big(1 << 20, 'b');
  ASSERT_EQ(::write(fd, big.data(), big.size()), ssize_t(big.size()));
  EXPECT_EQ(err(::linkat(fd, "", AT_FDCWD, (p("d") + "/never").c_str(), AT_EMPTY_PATH)), ENOENT);
  ASSERT_EQ(::close(fd), 0);
  struct statvfs after {};
  for (int i = 0; i < 200; ++i) {  // the kernel's FORGET comes on its own, a moment later
    ASSERT_EQ(::statvfs(p("d").c_str(), &after), 0);
    if (after.f_ffree + 1 == before.f_ffree) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(after.f_ffree + 1, before.f_ffree) << "only the named file keeps an inode";
  EXPECT_GE(after.f_bavail + 8, before.f_bavail) << "the unnamed file's blocks came back";
  EXPECT_EQ(err(::open(p("missing/x").c_str(), O_TMPFILE | O_RDWR, 0600)), ENOENT);
}

// statx(STATX_BTIME): the birth time, which stays through writes, chmod and a remount's cache
// loss (the kernel asks with FUSE_STATX only when the caller wants more than the basic fields).
TEST_F(Posix, StatxReportsTheBirthTime) {
  timespec before{};
  clock_gettime(CLOCK_REALTIME, &before);
  spit(p("born"), "x");
  struct statx first {};
  ASSERT_EQ(::statx(AT_FDCWD, p("born").c_str(), 0, STATX_BASIC_STATS | STATX_BTIME, &first), 0);
  ASSERT_TRUE(first.stx_mask & STATX_BTIME) << "birth time reported";
  EXPECT_EQ(first.stx_mask & STATX_BASIC_STATS, unsigned(STATX_BASIC_STATS));
  EXPECT_GE(first.stx_btime.tv_sec, before.tv_sec - 1);
  EXPECT_LE(first.stx_btime.tv_sec, before.tv_sec + 5);
  EXPECT_EQ(first.stx_size, 1u);
  EXPECT_TRUE(S_ISREG(first.stx_mode));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  spit(p("born"), "longer now", O_WRONLY | O_APPEND);
  ASSERT_EQ(::chmod(p("born").c_str(), 0600), 0);
  struct statx later {};
  ASSERT_EQ(::statx(AT_FDCWD, p("born").c_str(), AT_STATX_FORCE_SYNC,
                    STATX_BASIC_STATS | STATX_BTIME, &later),
            0);
  EXPECT_EQ(later.stx_btime.tv_sec, first.stx_btime.tv_sec);
  EXPECT_EQ(later.stx_btime.tv_nsec, first.stx_btime.tv_nsec);
  EXPECT_EQ(later.stx_size, 11u);
  EXPECT_EQ(later.stx_mode & 07777, 0600u);
  EXPECT_GT(later.stx_mtime.tv_sec * 1000000000ll + later.stx_mtime.tv_nsec,
            later.stx_btime.tv_sec * 1000000000ll + later.stx_btime.tv_nsec);
  struct statx gone {};
  EXPECT_EQ(err(::statx(AT_FDCWD, p("unborn").c_str(), 0, STATX_BTIME, &gone)), ENOENT);
}

TEST_F(Posix, DirectoriesAndErrors) {
  ASSERT_EQ(::mkdir(p("dir").c_str(), 0750), 0);
  EXPECT_EQ(err(::mkdir(p("dir").c_str(), 0750)), EEXIST);
  spit(p("dir") + "/inner", "x");
  EXPECT_EQ(err(::rmdir(p("dir").c_str())), ENOTEMPTY);
  EXPECT_EQ(err(::unlink(p("dir").c_str())), EISDIR);
  EXPECT_EQ(err(::rmdir((p("dir") + "/inner").c_str())), ENOTDIR);
  EXPECT_EQ(err(::mkdir((p("dir") + "/inner/x").c_str(), 0755)), ENOTDIR);
  EXPECT_EQ(err(::open((p("dir") + "/" + std::string(256, 'n')).c_str(), O_CREAT | O_WRONLY, 0644)),
            ENAMETOOLONG);
  struct stat st {};
  ASSERT_EQ(::stat(p("dir").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2u);
  ASSERT_EQ(::mkdir((p("dir") + "/sub").c_str(), 0755), 0);
  ASSERT_EQ(::stat(p("dir").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 3u);
  ASSERT_EQ(::unlink((p("dir") + "/inner").c_str()), 0);
  ASSERT_EQ(::rmdir((p("dir") + "/sub").c_str()), 0);
  ASSERT_EQ(::rmdir(p("dir").c_str()), 0);
}

TEST_F(Posix, LinksAndSymlinks) {
  spit(p("target"), "data");
  ASSERT_EQ(::link(p("target").c_str(), p("hard").c_str()), 0);
  struct stat st {};
  ASSERT_EQ(::stat(p("target").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2u);
  ASSERT_EQ(::symlink("somewhere/else", p("sym").c_str()), 0);
  char buf[64] = {};
  EXPECT_EQ(::readlink(p("sym").c_str(), buf, sizeof buf), 14);
  EXPECT_STREQ(buf, "somewhere/else");
  ASSERT_EQ(::lstat(p("sym").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  EXPECT_EQ(err(::open(p("sym").c_str(), O_RDONLY)), ENOENT);
  ASSERT_EQ(::symlink(p("loop2").c_str(), p("loop1").c_str()), 0);
  ASSERT_EQ(::symlink(p("loop1").c_str(), p("loop2").c_str()), 0);
  EXPECT_EQ(err(::open(p("loop1").c_str(), O_RDONLY)), ELOOP);
  ::mkdir(p("d").c_str(), 0755);
  EXPECT_EQ(err(::link(p("d").c_str(), p("dlink").c_str())), EPERM);
}

TEST_F(Posix, RenameFlags) {
  spit(p("a"), "A");
  spit(p("b"), "B");
  auto rename2 = [](const std::string& from, const std::string& to, unsigned flags) {
    return err(int(syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags)));
  };
  EXPECT_EQ(rename2(p("a"), p("b"), RENAME_NOREPLACE), EEXIST);
  EXPECT_EQ(rename2(p("a"), p("b"), RENAME_EXCHANGE), 0);
  EXPECT_EQ(slurp(p("a")), "B");
  EXPECT_EQ(slurp(p("b")), "A");
  EXPECT_EQ(rename2(p("a"), p("none"), RENAME_EXCHANGE), ENOENT);
  EXPECT_EQ(rename2(p("a"), p("b"), RENAME_NOREPLACE | RENAME_EXCHANGE), EINVAL);
  EXPECT_EQ(rename2(p("a"), p("b"), RENAME_WHITEOUT | RENAME_EXCHANGE), EINVAL);
  // What overlayfs does when a file leaves its upper layer.
  spit(p("w"), "W");
  EXPECT_EQ(rename2(p("w"), p("w2"), RENAME_WHITEOUT), 0);
  EXPECT_EQ(slurp(p("w2")), "W");
  struct stat st;
  ASSERT_EQ(::lstat(p("w").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, 0u);
  EXPECT_EQ(st.st_uid, ::getuid());
  EXPECT_EQ(::unlink(p("w").c_str()), 0);
  EXPECT_EQ(rename2(p("a"), p("b"), 0), 0);
  EXPECT_EQ(slurp(p("b")), "B");
  EXPECT_EQ(err(::access(p("a").c_str(), F_OK)), ENOENT);
  ::mkdir(p("d1").c_str(), 0755);
  ::mkdir((p("d1") + "/d2").c_str(), 0755);
  EXPECT_EQ(rename2(p("d1"), p("d1") + "/d2/d3", 0), EINVAL);
  spit(p("d1") + "/d2/f", "x");
  ::mkdir(p("empty").c_str(), 0755);
  EXPECT_EQ(rename2(p("b"), p("empty"), 0), EISDIR);
  EXPECT_EQ(rename2(p("empty"), p("b"), 0), ENOTDIR);
  EXPECT_EQ(rename2(p("empty"), p("d1"), 0), ENOTEMPTY);
  EXPECT_EQ(rename2(p("d1") + "/d2", p("moved"), 0), 0);
  EXPECT_EQ(slurp(p("moved") + "/f"), "x");
}

// vpmfs as the upper layer of an overlay: copy-up, whiteouts for deleted lower files and
// opaque directories all land on vpmfs (trusted.overlay.* xattrs, RENAME_WHITEOUT).
TEST_F(Posix, OverlayUpperLayer) {
  std::string lower = "/dev/shm/vpmfs-ovl-lower-" + std::to_string(getpid());
  std::string merged = "/dev/shm/vpmfs-ovl-merged-" + std::to_string(getpid());
  ASSERT_EQ(::mkdir(lower.c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((lower + "/dir").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(merged.c_str(), 0755), 0);
  spit(lower + "/keep", "lower keep");
  spit(lower + "/gone", "lower gone");
  spit(lower + "/dir/inner", "inner");
  ASSERT_EQ(::mkdir(p("upper").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(p("work").c_str(), 0755), 0);
  std::string opts = "lowerdir=" + lower + ",upperdir=" + p("upper") + ",workdir=" + p("work");
  ASSERT_EQ(::mount("overlay", merged.c_str(), "overlay", 0, opts.c_str()), 0) << strerror(errno);
  EXPECT_EQ(slurp(merged + "/keep"), "lower keep");
  spit(merged + "/keep", "changed", O_WRONLY | O_APPEND);  // copy-up
  spit(merged + "/new", "new");
  EXPECT_EQ(::unlink((merged + "/gone").c_str()), 0);
  EXPECT_EQ(::unlink((merged + "/dir/inner").c_str()), 0);
  EXPECT_EQ(::rmdir((merged + "/dir").c_str()), 0);
  ASSERT_EQ(::mkdir((merged + "/dir").c_str(), 0755), 0);  // opaque: the lower one stays hidden
  EXPECT_EQ(::rename((merged + "/new").c_str(), (merged + "/dir/new").c_str()), 0);
  EXPECT_EQ(slurp(merged + "/keep"), "lower keepchanged");
  EXPECT_EQ(err(::access((merged + "/gone").c_str(), F_OK)), ENOENT);
  EXPECT_EQ(err(::access((merged + "/dir/inner").c_str(), F_OK)), ENOENT);
  EXPECT_EQ(slurp(merged + "/dir/new"), "new");
  EXPECT_EQ(::umount(merged.c_str()), 0) << strerror(errno);
  // On vpmfs: the copied-up file, a whiteout for "gone", an opaque "dir"; lower untouched.
  EXPECT_EQ(slurp(p("upper") + "/keep"), "lower keepchanged");
  struct stat st {};
  ASSERT_EQ(::lstat((p("upper") + "/gone").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, 0u);
  char opaque[4] = {};
  EXPECT_EQ(::getxattr((p("upper") + "/dir").c_str(), "trusted.overlay.opaque", opaque, 4), 1);
  EXPECT_EQ(opaque[0], 'y');
  EXPECT_EQ(slurp(lower + "/gone"), "lower gone");
  // Mounted again, the overlay shows the same tree.
  ASSERT_EQ(::mount("overlay", merged.c_str(), "overlay", 0, opts.c_str()), 0) << strerror(errno);
  EXPECT_EQ(err(::access((merged + "/gone").c_str(), F_OK)), ENOENT);
  EXPECT_EQ(err(::access((merged + "/dir/inner").c_str(), F_OK)), ENOENT);
  EXPECT_EQ(slurp(merged + "/dir/new"), "new");
  EXPECT_EQ(::umount(merged.c_str()), 0);
  ::rmdir(merged.c_str());
  for (const char* f : {"/keep", "/gone", "/dir/inner"}) ::unlink((lower + f).c_str());
  ::rmdir((lower + "/dir").c_str());
  ::rmdir(lower.c_str());
}

TEST_F(Posix, AttributesWithNanoseconds) {
  spit(p("m"), "x");
  ASSERT_EQ(::chmod(p("m").c_str(), 0600), 0);
  ASSERT_EQ(::chown(p("m").c_str(), 1234, 5678), 0);
  timespec times[2] = {{1000, 123456789}, {2000, 987654321}};
  ASSERT_EQ(::utimensat(AT_FDCWD, p("m").c_str(), times, 0), 0);
  struct stat st {};
  ASSERT_EQ(::stat(p("m").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  EXPECT_EQ(st.st_atim.tv_sec, 1000);
  EXPECT_EQ(st.st_atim.tv_nsec, 123456789);
  EXPECT_EQ(st.st_mtim.tv_sec, 2000);
  EXPECT_EQ(st.st_mtim.tv_nsec, 987654321);
}

// Through the kernel's attribute cache: every write after a stat shows a new mtime, however
// fast they come (vpmfs stamps the coarse clock only while nobody looks).
TEST_F(Posix, EveryWriteAfterAStatShowsANewMtime) {
  int fd = ::open(p("t").c_str(), O_CREAT | O_RDWR, 0644);
  ASSERT_GE(fd, 0);
  struct stat before {};
  ASSERT_EQ(::fstat(fd, &before), 0);
  for (int i = 0; i < 200; ++i) {
    ASSERT_EQ(::pwrite(fd, "x", 1, 0), 1);
    struct stat after {};
    ASSERT_EQ(::fstat(fd, &after), 0);
    bool newer = before.st_mtim.tv_sec < after.st_mtim.tv_sec ||
                 (before.st_mtim.tv_sec == after.st_mtim.tv_sec &&
                  before.st_mtim.tv_nsec < after.st_mtim.tv_nsec);
    EXPECT_TRUE(newer) << "write " << i;
    before = after;
  }
  ::close(fd);
}

TEST_F(Posix, SpecialFiles) {
  ASSERT_EQ(::mkfifo(p("fifo").c_str(), 0644), 0);
  ASSERT_EQ(::mknod(p("null").c_str(), S_IFCHR | 0644, makedev(1, 3)), 0);
  struct stat st {};
  ASSERT_EQ(::stat(p("fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  ASSERT_EQ(::stat(p("null").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(1, 3));
}

TEST_F(Posix, ReaddirSeesEveryEntryOnce) {
  ::mkdir(p("many").c_str(), 0755);
  for (int i = 0; i < 500; ++i) spit(p("many") + "/e" + std::to_string(i), "");
  DIR* d = ::opendir(p("many").c_str());
  ASSERT_NE(d, nullptr);
  std::multiset<std::string> names;
  while (dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  EXPECT_EQ(names.size(), 502u);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(names.count("e" + std::to_string(i)), 1u);
}

TEST_F(Posix, StatfsCountsChange) {
  struct statvfs before {
  }, after{};
  ASSERT_EQ(::statvfs(mount_->dir().c_str(), &before), 0);
  spit(p("space"), std::string(1 << 20, 's'));
  ASSERT_EQ(::statvfs(mount_->dir().c_str(), &after), 0);
  EXPECT_EQ(before.f_bsize, 4096u);
  EXPECT_LE(after.f_bfree + 256, before.f_bfree);
  EXPECT_LT(after.f_ffree, before.f_ffree);
}

TEST_F(Posix, PermissionsForAnOrdinaryUser) {
  spit(p("secret"), "x");
  ASSERT_EQ(::chmod(p("secret").c_str(), 0600), 0);
  ::mkdir(p("locked").c_str(), 0700);
  pid_t pid = fork();
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    if (::open(p("secret").c_str(), O_RDONLY) >= 0 || errno != EACCES) _exit(1);
    if (::open((p("locked") + "/x").c_str(), O_CREAT | O_WRONLY, 0644) >= 0 || errno != EACCES) {
      _exit(2);
    }
    if (::chmod(p("secret").c_str(), 0777) == 0 || errno != EPERM) _exit(3);
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "step that did not fail as POSIX says";
}

// chattr +i / +a through FS_IOC_SETFLAGS, as chattr sets them.
int set_flags(const std::string& path, unsigned flags) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return errno;
  int rc = err(::ioctl(fd, FS_IOC_SETFLAGS, &flags));
  ::close(fd);
  return rc;
}

unsigned get_flags(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  unsigned flags = ~0u;
  EXPECT_EQ(::ioctl(fd, FS_IOC_GETFLAGS, &flags), 0) << strerror(errno);
  ::close(fd);
  return flags;
}

TEST_F(Posix, AnImmutableFileAndDirectoryRefuseEveryChange) {
  const std::string f = p("file"), d = p("dir");
  spit(f, "frozen");
  ASSERT_EQ(::mkdir(d.c_str(), 0755), 0);
  spit(d + "/inside", "x");
  ASSERT_EQ(::chown(d.c_str(), 65534, 65534), 0);
  ASSERT_EQ(set_flags(f, FS_IMMUTABLE_FL), 0);
  ASSERT_EQ(set_flags(d, FS_IMMUTABLE_FL), 0);
  EXPECT_EQ(get_flags(f), unsigned(FS_IMMUTABLE_FL));
  struct fsxattr fa {};
  int fd = ::open(f.c_str(), O_RDONLY);
  ASSERT_EQ(::ioctl(fd, FS_IOC_FSGETXATTR, &fa), 0);
  EXPECT_EQ(fa.fsx_xflags, unsigned(FS_XFLAG_IMMUTABLE));
  ::close(fd);

  EXPECT_EQ(err(::open(f.c_str(), O_WRONLY)), EPERM);
  EXPECT_EQ(err(::open(f.c_str(), O_RDONLY | O_TRUNC)), EPERM);
  EXPECT_EQ(err(::truncate(f.c_str(), 0)), EPERM);
  EXPECT_EQ(err(::chmod(f.c_str(), 0600)), EPERM);
  EXPECT_EQ(err(::chown(f.c_str(), 1, 1)), EPERM);
  EXPECT_EQ(err(::utimensat(AT_FDCWD, f.c_str(), nullptr, 0)), EPERM);
  EXPECT_EQ(err(::setxattr(f.c_str(), "user.k", "v", 1, 0)), EPERM);
  EXPECT_EQ(err(::link(f.c_str(), p("link").c_str())), EPERM);
  EXPECT_EQ(err(::rename(f.c_str(), p("moved").c_str())), EPERM);
  EXPECT_EQ(err(::unlink(f.c_str())), EPERM);
  EXPECT_EQ(slurp(f), "frozen") << "reading is allowed";
  // Nothing enters or leaves an immutable directory; what is in it can still change.
  EXPECT_EQ(err(::open((d + "/new").c_str(), O_CREAT | O_WRONLY, 0644)), EPERM);
  EXPECT_EQ(err(::mkdir((d + "/sub").c_str(), 0755)), EPERM);
  EXPECT_EQ(err(::unlink((d + "/inside").c_str())), EPERM);
  EXPECT_EQ(err(::rename((d + "/inside").c_str(), p("out").c_str())), EPERM);
  spit(d + "/inside", "changed");
  EXPECT_EQ(slurp(d + "/inside"), "changed");
  // Only root (CAP_LINUX_IMMUTABLE) clears it; the owner cannot.
  pid_t pid = fork();
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    _exit(set_flags(d, 0) == EPERM ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "an ordinary user cleared the immutable flag";
  ASSERT_EQ(set_flags(f, 0), 0);
  ASSERT_EQ(set_flags(d, 0), 0);
  EXPECT_EQ(::unlink((d + "/inside").c_str()), 0);
  EXPECT_EQ(::rmdir(d.c_str()), 0);
  spit(f, "thawed");
  EXPECT_EQ(::unlink(f.c_str()), 0);
}

TEST_F(Posix, AnAppendOnlyFileOnlyGrows) {
  const std::string f = p("log"), d = p("dir");
  spit(f, "one\n");
  ASSERT_EQ(::mkdir(d.c_str(), 0755), 0);
  spit(d + "/old", "x");
  ASSERT_EQ(set_flags(f, FS_APPEND_FL), 0);
  ASSERT_EQ(set_flags(d, FS_APPEND_FL), 0);
  EXPECT_EQ(get_flags(f), unsigned(FS_APPEND_FL));
  EXPECT_EQ(err(::open(f.c_str(), O_WRONLY)), EPERM) << "writing needs O_APPEND";
  EXPECT_EQ(err(::open(f.c_str(), O_WRONLY | O_APPEND | O_TRUNC)), EPERM);
  spit(f, "two\n", O_WRONLY | O_APPEND);
  EXPECT_EQ(slurp(f), "one\ntwo\n");
  EXPECT_EQ(err(::truncate(f.c_str(), 0)), EPERM);
  int fd = ::open(f.c_str(), O_WRONLY | O_APPEND);
  ASSERT_GE(fd, 0) << strerror(errno);
  EXPECT_EQ(err(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4)), EPERM);
  EXPECT_EQ(::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 8192), 0) << "reserving space is allowed";
  ::close(fd);
  EXPECT_EQ(err(::chmod(f.c_str(), 0600)), EPERM);
  EXPECT_EQ(err(::setxattr(f.c_str(), "user.k", "v", 1, 0)), EPERM);
  EXPECT_EQ(err(::unlink(f.c_str())), EPERM);
  EXPECT_EQ(err(::rename(f.c_str(), p("moved").c_str())), EPERM);
  EXPECT_EQ(err(::utimensat(AT_FDCWD, f.c_str(), nullptr, 0)), 0) << "touch: times set to now";
  const timespec given[2] = {{1, 0}, {1, 0}};
  EXPECT_EQ(err(::utimensat(AT_FDCWD, f.c_str(), given, 0)), EPERM) << "times given";
  // An append-only directory takes new entries and keeps them.
  spit(d + "/new", "y");
  EXPECT_EQ(err(::unlink((d + "/new").c_str())), EPERM);
  EXPECT_EQ(err(::rename((d + "/old").c_str(), (d + "/renamed").c_str())), EPERM);
  ASSERT_EQ(set_flags(f, 0), 0);
  ASSERT_EQ(set_flags(d, 0), 0);
  EXPECT_EQ(::unlink(f.c_str()), 0);
  EXPECT_EQ(::unlink((d + "/new").c_str()), 0);
  EXPECT_EQ(::unlink((d + "/old").c_str()), 0);
  EXPECT_EQ(::rmdir(d.c_str()), 0);
}

TEST_F(Posix, ChattrFlagsRoundTripAndUnknownOnesAreRefused) {
  const std::string f = p("f");
  spit(f, "x");
  struct stat before {
  }, after{};
  ASSERT_EQ(::stat(f.c_str(), &before), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const unsigned all = FS_SYNC_FL | FS_NOATIME_FL | FS_NODUMP_FL | FS_DAX_FL;
  ASSERT_EQ(set_flags(f, all), 0);
  ASSERT_EQ(::stat(f.c_str(), &after), 0);
  EXPECT_TRUE(before.st_ctim.tv_sec != after.st_ctim.tv_sec ||
              before.st_ctim.tv_nsec != after.st_ctim.tv_nsec)
      << "the kernel still shows the ctime from before chattr";
  EXPECT_EQ(get_flags(f), all);
  EXPECT_EQ(set_flags(f, FS_COMPR_FL), EOPNOTSUPP);
  EXPECT_EQ(get_flags(f), all) << "a refused change changed nothing";
  spit(f, "synchronous");
  EXPECT_EQ(slurp(f), "synchronous");
  ASSERT_EQ(set_flags(f, 0), 0);
  EXPECT_EQ(get_flags(f), 0u);
}

TEST_F(Posix, OpenWithOTruncEmptiesTheFile) {
  spit(p("trunc"), "hello world");
  spit(p("trunc"), "hi");  // O_WRONLY | O_CREAT | O_TRUNC, as a shell's ">" does
  EXPECT_EQ(slurp(p("trunc")), "hi");
  int fd = ::open(p("trunc").c_str(), O_RDWR | O_TRUNC);
  ASSERT_GE(fd, 0);
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(st.st_size, 0);
  ::close(fd);
}

TEST_F(Posix, AccessTimesFollowRelatime) {
  spit(p("atime"), "read me");
  struct timespec old[2] = {{1000000000, 0}, {1000000000, 0}};  // atime = mtime, long ago
  ASSERT_EQ(::utimensat(AT_FDCWD, p("atime").c_str(), old, 0), 0);
  EXPECT_EQ(slurp(p("atime")), "read me");
  struct stat st {};
  ASSERT_EQ(::stat(p("atime").c_str(), &st), 0);
  EXPECT_GT(st.st_atim.tv_sec, 1000000000) << "a read of a file with atime <= mtime updates it";
  EXPECT_EQ(st.st_mtim.tv_sec, 1000000000);
  time_t first = st.st_atim.tv_sec;
  EXPECT_EQ(slurp(p("atime")), "read me");
  ASSERT_EQ(::stat(p("atime").c_str(), &st), 0);
  EXPECT_EQ(st.st_atim.tv_sec, first) << "relatime: not again within a day";
}

TEST_F(Posix, FileHandlesOutliveTheInodeCache) {
  spit(p("handled"), "found by handle");
  auto handle = std::unique_ptr<file_handle, void (*)(void*)>(
      static_cast<file_handle*>(std::malloc(sizeof(file_handle) + MAX_HANDLE_SZ)), std::free);
  handle->handle_bytes = MAX_HANDLE_SZ;
  int mount_id = 0;
  ASSERT_EQ(::name_to_handle_at(AT_FDCWD, p("handled").c_str(), handle.get(), &mount_id, 0), 0)
      << strerror(errno);
  int mount_fd = ::open(mount_->dir().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(mount_fd, 0);
  // Forget the inode in the kernel, so that decoding the handle has to ask vpmfs.
  ::syncfs(mount_fd);
  { std::ofstream("/proc/sys/vm/drop_caches") << "2"; }
  int fd = ::open_by_handle_at(mount_fd, handle.get(), O_RDONLY);
  ASSERT_GE(fd, 0) << strerror(errno);
  char buf[15];
  EXPECT_EQ(::read(fd, buf, sizeof buf), 15);
  EXPECT_EQ(std::string(buf, 15), "found by handle");
  ::close(fd);
  // Gone: the handle is stale.
  ASSERT_EQ(::unlink(p("handled").c_str()), 0);
  { std::ofstream("/proc/sys/vm/drop_caches") << "2"; }
  EXPECT_LT(::open_by_handle_at(mount_fd, handle.get(), O_RDONLY), 0);
  EXPECT_EQ(errno, ESTALE);
  ::close(mount_fd);
}

// A change of a file's data by an ordinary user takes setuid away, and setgid too unless the
// user is in the file's group, as on local filesystems today (tmpfs, ext4).
TEST_F(Posix, WritesBySomeoneElseClearSetuidAndSetgid) {
  enum Op { kWrite, kTruncate, kAllocate, kPunch };
  for (Op op : {kWrite, kTruncate, kAllocate, kPunch}) {
    for (bool member : {false, true}) {
      std::string f = p("sgid" + std::to_string(op) + (member ? "m" : ""));
      spit(f, "0123456789");
      if (member) {
        ASSERT_EQ(::chown(f.c_str(), 0, 65534), 0);
      }
      ASSERT_EQ(::chmod(f.c_str(), 06666), 0);
      pid_t pid = fork();
      if (pid == 0) {
        if (setgroups(0, nullptr) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
        int fd = ::open(f.c_str(), O_RDWR);
        if (fd < 0) _exit(1);
        int rc = op == kWrite      ? int(::pwrite(fd, "x", 1, 0)) - 1
                 : op == kTruncate ? ::ftruncate(fd, 4)
                 : op == kAllocate
                     ? ::fallocate(fd, 0, 0, 8192)
                     : ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4);
        _exit(rc == 0 ? 0 : 2);
      }
      int status = 0;
      waitpid(pid, &status, 0);
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "op " << op;
      struct stat st {};
      ASSERT_EQ(::stat(f.c_str(), &st), 0);
      EXPECT_EQ(st.st_mode & 07777, member ? 02666u : 0666u)
          << "op " << op << (member ? ", member" : "");
    }
  }
}

// Root (CAP_FSETID) keeps both bits, group-exec or not (generic/683-687); a group member who
// is not root loses setgid when group-exec is set.
TEST_F(Posix, RootKeepsSetuidAndSetgidOnWrites) {
  std::string f = p("root");
  spit(f, "0123456789");
  ASSERT_EQ(::chmod(f.c_str(), 06777), 0);
  int fd = ::open(f.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(::pwrite(fd, "x", 1, 0), 1);
  EXPECT_EQ(::ftruncate(fd, 4), 0);
  EXPECT_EQ(::fallocate(fd, 0, 0, 8192), 0);
  EXPECT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4), 0);
  EXPECT_EQ(::close(fd), 0);
  struct stat st {};
  ASSERT_EQ(::stat(f.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 06777u);
  // chown takes setuid from everyone, and setgid when group-exec is set.
  ASSERT_EQ(::chown(f.c_str(), 0, 65534), 0);
  ASSERT_EQ(::stat(f.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0777u);
  ASSERT_EQ(::chmod(f.c_str(), 06777), 0);
  pid_t pid = fork();
  if (pid == 0) {
    gid_t group = 65534;
    if (setgroups(1, &group) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    int fd2 = ::open(f.c_str(), O_RDWR);
    _exit(fd2 >= 0 && ::pwrite(fd2, "y", 1, 0) == 1 ? 0 : 2);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_EQ(::stat(f.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0777u) << "a member's write keeps setgid on a group-exec file";
}

TEST_F(Posix, FileSizeLimits) {
  int fd = ::open(p("limits").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  // 16 TiB is the most a file may hold.
  EXPECT_EQ(err(int(::pwrite(fd, "x", 1, off_t(16ull << 40)))), EFBIG);
  EXPECT_EQ(err(::ftruncate(fd, off_t((16ull << 40) + 1))), EFBIG);
  EXPECT_EQ(err(::fallocate(fd, FALLOC_FL_KEEP_SIZE, off_t(16ull << 40), 4096)), EFBIG);
  // A sparse file of more than a terabyte is fine.
  EXPECT_EQ(::pwrite(fd, "far", 3, off_t((1ull << 40) + 12345)), 3);
  char buf[3];
  EXPECT_EQ(::pread(fd, buf, 3, off_t((1ull << 40) + 12345)), 3);
  EXPECT_EQ(std::string(buf, 3), "far");
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(uint64_t(st.st_size), (1ull << 40) + 12348);
  EXPECT_LE(st.st_blocks, 64) << "a data block and a few pointer blocks";
  ASSERT_EQ(::ftruncate(fd, 0), 0);
  ::close(fd);
}

TEST_F(Posix, ReaddirUnderConcurrentCreateAndUnlink) {
  // Entries that stay are listed exactly once however others come and go meanwhile, even when
  // the listing takes many getdents calls.
  const std::string dir = p("churn");
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  for (int i = 0; i < 1500; ++i) spit(dir + "/keep" + std::to_string(i), "");
  std::atomic<bool> stop{false};
  std::thread churn([&] {
    for (int j = 0; !stop; ++j) {
      std::string name = dir + "/churn" + std::to_string(j % 300);
      if (j % 600 < 300) {
        int fd = ::open(name.c_str(), O_CREAT | O_WRONLY, 0644);
        if (fd >= 0) ::close(fd);
      } else {
        ::unlink(name.c_str());
      }
    }
  });
  for (int round = 0; round < 10; ++round) {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    ASSERT_GE(fd, 0);
    std::multiset<std::string> names;
    char buf[1024];  // a few dozen entries per call
    for (;;) {
      long n = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
      ASSERT_GE(n, 0) << strerror(errno);
      if (n == 0) break;
      for (long at = 0; at < n;) {
        auto* d = reinterpret_cast<struct dirent64*>(buf + at);
        names.insert(d->d_name);
        at += d->d_reclen;
      }
    }
    ::close(fd);
    for (int i = 0; i < 1500; ++i) {
      ASSERT_EQ(names.count("keep" + std::to_string(i)), 1u) << "round " << round << ", keep" << i;
    }
    for (const auto& n : names) ASSERT_EQ(names.count(n), 1u) << n << " listed twice";
  }
  stop = true;
  churn.join();
}

// Values up to XATTR_SIZE_MAX and a thousand attributes on one file, through the kernel.
TEST_F(Posix, LargeAndManyExtendedAttributes) {
  spit(p("x"), "x");
  std::string big(65536, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = char('a' + i * 7 % 26);
  ASSERT_EQ(::setxattr(p("x").c_str(), "user.big", big.data(), big.size(), 0), 0)
      << strerror(errno);
  std::string got(big.size(), '\0');
  ASSERT_EQ(::getxattr(p("x").c_str(), "user.big", got.data(), got.size()), ssize_t(big.size()));
  EXPECT_EQ(got, big);
  EXPECT_EQ(::setxattr(p("x").c_str(), "user.huge", big.data(), big.size() + 1, 0), -1);
  EXPECT_EQ(errno, E2BIG);
  ASSERT_EQ(::removexattr(p("x").c_str(), "user.big"), 0);
  for (int i = 0; i < 1000; ++i) {
    std::string name = "user.attribute_" + std::to_string(i);
    std::string value = "value_" + std::to_string(i);
    ASSERT_EQ(::setxattr(p("x").c_str(), name.c_str(), value.data(), value.size(), 0), 0)
        << i << ": " << strerror(errno);
  }
  ssize_t size = ::listxattr(p("x").c_str(), nullptr, 0);
  ASSERT_GT(size, 0);
  std::string names(size_t(size), '\0');
  ASSERT_EQ(::listxattr(p("x").c_str(), names.data(), names.size()), size);
  EXPECT_EQ(std::count(names.begin(), names.end(), '\0'), 1000);
  char value[32];
  ASSERT_EQ(::getxattr(p("x").c_str(), "user.attribute_999", value, sizeof value), 9);
  EXPECT_EQ(std::string(value, 9), "value_999");
}

TEST_F(Posix, AclsAreEnforcedAndInherited) {
  spit(p("acl"), "guarded");
  ASSERT_EQ(::chmod(p("acl").c_str(), 0600), 0);
  ASSERT_EQ(test::run({"/usr/bin/setfacl", "-m", "u:65534:rw", p("acl")}), 0);
  auto [rc, out] = test::capture({"/usr/bin/getfacl", "-c", p("acl")}, true);
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("user:nobody:rw-"), std::string::npos) << out;
  EXPECT_NE(out.find("mask::rw-"), std::string::npos) << out;
  struct stat st {};
  ASSERT_EQ(::stat(p("acl").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u) << "the group bits show the ACL mask";
  // A default ACL on a directory is what new files in it get.
  ::mkdir(p("acldir").c_str(), 0755);
  ASSERT_EQ(test::run({"/usr/bin/setfacl", "-d", "-m", "u:65534:rwx", p("acldir")}), 0);
  // Mode 0660: no access for others; the mask (the group bits) lets the inherited entry work.
  spit(p("acldir") + "/child", "inherits", O_WRONLY | O_CREAT | O_TRUNC);
  ASSERT_EQ(::chmod((p("acldir") + "/child").c_str(), 0660), 0);
  auto [rc2, child] = test::capture({"/usr/bin/getfacl", "-c", p("acldir") + "/child"}, true);
  EXPECT_EQ(rc2, 0);
  EXPECT_NE(child.find("user:nobody:rw"), std::string::npos) << child;
  pid_t pid = fork();
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    int fd = ::open(p("acl").c_str(), O_RDWR);  // mode 0600 owner root: only the ACL allows it
    if (fd < 0) _exit(1);
    ::close(fd);
    if (::open((p("acldir") + "/child").c_str(), O_WRONLY) < 0) _exit(2);
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "ACL not honoured, step " << WEXITSTATUS(status);
  // An owner outside the file's group who sets an access ACL loses setgid (generic/375).
  spit(p("aclsgid"), "x");
  ASSERT_EQ(::chown(p("aclsgid").c_str(), 65534, 0), 0);
  ASSERT_EQ(::chmod(p("aclsgid").c_str(), 02775), 0);
  pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    execl("/usr/bin/setfacl", "setfacl", "-m", "u:65534:rwx", p("aclsgid").c_str(), nullptr);
    _exit(11);
  }
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_EQ(::stat(p("aclsgid").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & S_ISGID, 0u) << "setgid kept after an ACL change by a non-member";
  // Taking the entry away takes the access away.
  ASSERT_EQ(test::run({"/usr/bin/setfacl", "-x", "u:65534", p("acl")}), 0);
  pid = fork();
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    _exit(::open(p("acl").c_str(), O_RDWR) < 0 && errno == EACCES ? 0 : 1);
  }
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

// A full volume: writes fail with ENOSPC, what is stored stays, and deleting makes room again.
TEST(PosixFull, EnospcThenRoomAgain) {
  Mount m("full", {}, "24M");
  ASSERT_TRUE(m.mounted());
  spit(m.path("keep"), "kept through it all");
  std::string chunk(1 << 20, 'f');
  int n = 0;
  int error = 0;
  for (; n < 64 && error == 0; ++n) {
    int fd = ::open(m.path("fill" + std::to_string(n)).c_str(), O_WRONLY | O_CREAT, 0644);
    ASSERT_GE(fd, 0);
    ssize_t w = ::write(fd, chunk.data(), chunk.size());
    if (w < 0) {
      error = errno;
    } else if (size_t(w) < chunk.size() && ::write(fd, chunk.data(), chunk.size()) < 0) {
      error = errno;  // a short write first, then the error
    }
    ::close(fd);
  }
  EXPECT_EQ(error, ENOSPC) << "after " << n << " MiB";
  EXPECT_EQ(slurp(m.path("keep")), "kept through it all");
  for (int i = 0; i < n; ++i) ::unlink(m.path("fill" + std::to_string(i)).c_str());
  spit(m.path("after"), chunk);
  EXPECT_EQ(slurp(m.path("after")).size(), chunk.size()) << "the space came back";
  EXPECT_EQ(m.unmount(), 0) << "fsck.vpmfs -n after filling the volume";
}

// A terabyte image, sparse, and a file reaching past its first terabyte.
TEST(PosixLarge, TerabyteImageAndFile) {
  Mount m("terabyte", {}, "1T");
  ASSERT_TRUE(m.mounted());
  struct statvfs sv {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &sv), 0);
  EXPECT_GT(uint64_t(sv.f_blocks) * sv.f_frsize, 1000ull << 30);
  int fd = ::open(m.path("huge").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  const off_t end = off_t(1ull << 40);
  ASSERT_EQ(::pwrite(fd, "last block", 10, end - 4096), 10);
  ASSERT_EQ(::pwrite(fd, "first", 5, 0), 5);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  ASSERT_EQ(m.remount(), 0) << "fsck.vpmfs -n of the terabyte image";
  fd = ::open(m.path("huge").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  char buf[10];
  ASSERT_EQ(::pread(fd, buf, 10, end - 4096), 10);
  EXPECT_EQ(std::string(buf, 10), "last block");
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(st.st_size, end - 4096 + 10);
  ::close(fd);
  ASSERT_EQ(::unlink(m.path("huge").c_str()), 0);
}

// xfstests generic/015: fill the volume, delete the file, and df shows the space again at
// once, without a commit (commit=600 keeps the background one away); the space is usable too.
// An O_TMPFILE file open when the daemon is killed is on the orphan chain: fsck calls that
// what the next mount finishes, and the next mount frees it.
TEST(PosixTmpfile, AKilledDaemonsUnnamedFileIsFreedByTheNextMount) {
  Mount m("tmpfile");
  struct statvfs empty {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &empty), 0);
  int fd = ::open(m.dir().c_str(), O_TMPFILE | O_RDWR, 0600);
  ASSERT_GE(fd, 0) << strerror(errno);
  std::string data(4 << 20, 'k');
  ASSERT_EQ(::write(fd, data.data(), data.size()), ssize_t(data.size()));
  ASSERT_EQ(::fsync(fd), 0);
  struct statvfs used {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &used), 0);
  EXPECT_LT(used.f_bavail + 1000, empty.f_bavail);
  m.kill_daemon();
  ::close(fd);
  auto [rc, out] = test::capture({std::string(VPMFS_BIN_DIR) + "/fsck.vpmfs", "-n", m.image()});
  EXPECT_EQ(rc, 0) << out;
  m.start();
  ASSERT_TRUE(m.mounted());
  struct statvfs again {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &again), 0);
  EXPECT_EQ(again.f_ffree, empty.f_ffree);
  EXPECT_EQ(again.f_bavail, empty.f_bavail);
  EXPECT_EQ(m.unmount(), 0);
}

// fstrim(8) on the mount: the free space goes back to the image file's filesystem, files keep
// their data, and bad ranges get EINVAL as on ext4.
TEST(PosixTrim, FstrimGivesFreeSpaceBackToTheImageFile) {
  Mount m("trim", {}, "128M");
  auto image_bytes = [&] {
    struct stat st {};
    EXPECT_EQ(::stat(m.image().c_str(), &st), 0);
    return uint64_t(st.st_blocks) * 512;
  };
  std::string keep(256 << 10, 'k');
  spit(m.path("keep"), keep);
  spit(m.path("gone"), std::string(32 << 20, 'g'));
  ::sync();
  const uint64_t full = image_bytes();
  ASSERT_EQ(::unlink(m.path("gone").c_str()), 0);
  int dir = ::open(m.dir().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(dir, 0);
  fstrim_range range{0, UINT64_MAX, 0};
  // The blocks go when the kernel's FORGET of the inode arrives, a moment after the unlink.
  for (int i = 0; i < 100 && image_bytes() + (16 << 20) > full; ++i) {
    range = {0, UINT64_MAX, 0};
    ASSERT_EQ(::ioctl(dir, FITRIM, &range), 0) << strerror(errno);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_LT(image_bytes() + (16 << 20), full) << "the deleted file's space went back";
  EXPECT_GE(range.len, uint64_t(32 << 20)) << "bytes trimmed, as fstrim -v reports";
  EXPECT_EQ(slurp(m.path("keep")), keep);
  range = {0, 0, 0};
  EXPECT_EQ(err(::ioctl(dir, FITRIM, &range)), EINVAL) << "an empty range";
  range = {UINT64_MAX - 4096, 1 << 20, 0};
  EXPECT_EQ(err(::ioctl(dir, FITRIM, &range)), EINVAL) << "past the end";
  ::close(dir);
  EXPECT_EQ(m.unmount(), 0) << "fsck.vpmfs -n after fstrim";
}

TEST(PosixSpace, DeletedSpaceComesBackAtOnce) {
  Mount m("space", {"commit=600"});
  struct statvfs empty {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &empty), 0);
  auto fill = [&](const std::string& name) {
    int fd = ::open(m.path(name).c_str(), O_CREAT | O_WRONLY, 0644);
    EXPECT_GE(fd, 0);
    std::string chunk(1 << 20, 'f');
    uint64_t total = 0;
    for (ssize_t n; (n = ::write(fd, chunk.data(), chunk.size())) > 0;) total += uint64_t(n);
    EXPECT_EQ(errno, ENOSPC);
    ::close(fd);
    return total;
  };
  uint64_t first = fill("full");
  struct statvfs full {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &full), 0);
  EXPECT_LT(full.f_bavail, empty.f_bavail / 100) << "the volume is full";
  ASSERT_EQ(::unlink(m.path("full").c_str()), 0);
  // The blocks go when the kernel's FORGET of the inode arrives, which it sends on its own
  // after the unlink (another worker may still be on it): a moment, far from the commit.
  struct statvfs after {};
  for (int i = 0; i < 200; ++i) {
    ASSERT_EQ(::statvfs(m.dir().c_str(), &after), 0);
    if (after.f_bavail + after.f_bavail / 50 >= empty.f_bavail) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GE(after.f_bavail + after.f_bavail / 50, empty.f_bavail)
      << "df after rm: " << after.f_bavail << " of " << empty.f_bavail << " blocks available";
  // What df promised can be written (the write commits to reuse the freed blocks).
  uint64_t second = fill("again");
  EXPECT_GE(second + second / 50, first);
  EXPECT_EQ(m.unmount(), 0);
}

TEST(PosixRemount, DataSurvivesUnmountAndMount) {
  Mount m("remount");
  spit(m.path("keep"), "kept across mounts");
  ::mkdir(m.path("d").c_str(), 0755);
  spit(m.path("d/inner"), "inner");
  ASSERT_EQ(m.remount(), 0) << "fsck.vpmfs -n between the mounts";
  EXPECT_EQ(slurp(m.path("keep")), "kept across mounts");
  EXPECT_EQ(slurp(m.path("d/inner")), "inner");
  EXPECT_EQ(m.unmount(), 0);
}

// The kernel keeps "no such name" as long as a found entry: looking a missing name up again
// costs no request, and creating the name, renaming or linking to it, or making a directory of
// it turns the kernel's answer into the new entry at once.
TEST(PosixLookup, AMissingNameIsAskedForOnce) {
  Mount m("negative", {}, "64M", /*trace=*/true);
  struct stat st {};
  const std::size_t before = requests(m.trace(), "LOOKUP");
  for (int i = 0; i < 5; ++i) EXPECT_EQ(err(::stat(m.path("missing").c_str(), &st)), ENOENT);
  EXPECT_EQ(requests(m.trace(), "LOOKUP"), before + 1) << m.trace();
  spit(m.path("missing"), "here now");
  EXPECT_EQ(slurp(m.path("missing")), "here now");

  EXPECT_EQ(err(::stat(m.path("moved").c_str(), &st)), ENOENT);
  ASSERT_EQ(::rename(m.path("missing").c_str(), m.path("moved").c_str()), 0);
  EXPECT_EQ(slurp(m.path("moved")), "here now");
  EXPECT_EQ(err(::stat(m.path("missing").c_str(), &st)), ENOENT);

  EXPECT_EQ(err(::stat(m.path("linked").c_str(), &st)), ENOENT);
  ASSERT_EQ(::link(m.path("moved").c_str(), m.path("linked").c_str()), 0);
  EXPECT_EQ(slurp(m.path("linked")), "here now");

  EXPECT_EQ(err(::stat(m.path("dir").c_str(), &st)), ENOENT);
  ASSERT_EQ(::mkdir(m.path("dir").c_str(), 0755), 0);
  ASSERT_EQ(::stat(m.path("dir").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  ASSERT_EQ(::rmdir(m.path("dir").c_str()), 0);
  EXPECT_EQ(err(::stat(m.path("dir").c_str(), &st)), ENOENT);
  EXPECT_EQ(m.unmount(), 0);
}

// writeback_cache: writes are acknowledged from the kernel's page cache, and fsync still makes
// them durable before it returns: a killed daemon keeps what was fsync'd. Without fsync, a
// clean unmount writes everything back.
TEST(PosixWritebackCache, FsyncedWritesSurviveAKilledDaemon) {
  Mount m("wbc", {"writeback_cache"});
  char status[4096] = {};
  ASSERT_GT(::getxattr(m.dir().c_str(), "user.vpmfs.status", status, sizeof status - 1), 0);
  EXPECT_NE(std::string(status).find("\"writeback_cache\":true"), std::string::npos) << status;

  std::string data(1 << 20, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = char('a' + (i * 7919) % 26);
  int fd = ::open(m.path("synced").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  // Small writes out of order, as a database does, then fsync.
  for (std::size_t off = 0; off < data.size(); off += 4096) {
    std::size_t at = (off * 37) % data.size() / 4096 * 4096;
    ASSERT_EQ(::pwrite(fd, data.data() + at, 4096, off_t(at)), 4096);
  }
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  spit(m.path("unsynced"), "written back at unmount");
  ASSERT_EQ(m.remount(), 0) << "fsck.vpmfs -n after a clean unmount";
  EXPECT_EQ(slurp(m.path("unsynced")), "written back at unmount");

  fd = ::open(m.path("synced").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "XYZ", 3, 100), 3);
  ASSERT_EQ(::fdatasync(fd), 0);
  data.replace(100, 3, "XYZ");
  m.kill_daemon();
  ::close(fd);
  m.start();
  EXPECT_EQ(slurp(m.path("synced")), data);
  EXPECT_EQ(m.unmount(), 0);
}

// With the kernel's write-back cache, close(2) still writes the file's pages back before it
// returns, although no FLUSH request follows: a killed daemon keeps what was closed.
TEST(PosixWritebackCache, CloseWritesBackWithoutAFlushRequest) {
  Mount m("wbcclose", {"writeback_cache"}, "64M", /*trace=*/true);
  std::string data(1 << 20, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = char('a' + (i * 131) % 26);
  spit(m.path("first"), "x");  // the one FLUSH the kernel sends
  spit(m.path("closed"), data);
  m.kill_daemon();
  const std::string trace = m.trace();
  m.start();
  EXPECT_EQ(slurp(m.path("closed")), data);
  EXPECT_EQ(m.unmount(), 0);
  EXPECT_EQ(requests(trace, "FLUSH"), 1u) << trace;
  EXPECT_EQ(requests(trace, "CREATE"), 2u) << trace;
  EXPECT_GE(requests(trace, "WRITE"), 1u) << trace;
}

// With the kernel's write-back cache, write() takes data into the kernel even when the volume
// has no room for it; the daemon's ENOSPC comes back when the kernel writes it back, through
// fsync (and close), and the volume stays consistent.
TEST(PosixWritebackCache, AFullVolumeIsReportedByFsync) {
  Mount m("wbcfull", {"writeback_cache"}, "64M");
  ASSERT_TRUE(m.mounted());
  int fd = ::open(m.path("big").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  std::string chunk(1 << 20, 'z');
  for (int i = 0; i < 96; ++i) {
    ASSERT_EQ(::write(fd, chunk.data(), chunk.size()), ssize_t(chunk.size()))
        << "write " << i << ": " << std::strerror(errno);
  }
  EXPECT_EQ(::fsync(fd), -1);
  EXPECT_EQ(errno, ENOSPC);
  ::close(fd);
  struct statvfs st {};
  ASSERT_EQ(::statvfs(m.dir().c_str(), &st), 0);
  EXPECT_LT(st.f_bavail * st.f_frsize, 1u << 20) << "the volume is full";
  ASSERT_EQ(::unlink(m.path("big").c_str()), 0);
  spit(m.path("after"), "room again");
  EXPECT_EQ(m.unmount(), 0) << "fsck.vpmfs -n after the full volume";
}

// -o sync: every write is answered once it is durable, concurrent writers share commits, and
// the kernel, told by the first FSYNC and FSYNCDIR that they owe nothing, sends no more of them
// (fsync then costs no round trip). What was written is there after the daemon is killed.
TEST(PosixSyncMount, WritesAreSyncedAndFsyncCostsNoRequest) {
  Mount m("syncmount", {"sync", "sync_dax=writeback"}, "64M", /*trace=*/true);
  ASSERT_TRUE(m.mounted());
  auto status = [&] {
    char buf[4096] = {};
    ssize_t n = ::getxattr(m.dir().c_str(), "user.vpmfs.status", buf, sizeof buf - 1);
    return nlohmann::json::parse(std::string(buf, n > 0 ? std::size_t(n) : 0));
  };
  EXPECT_EQ(status()["sync"], true);
  const uint64_t syncs_before = status()["commits"]["syncs"].get<uint64_t>();
  constexpr int kThreads = 4;
  constexpr int kRounds = 40;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int fd = ::open(m.path("f" + std::to_string(t)).c_str(), O_RDWR | O_CREAT, 0644);
      if (fd < 0) {
        ++failures;
        return;
      }
      std::string block(4096, '\0');
      for (int r = 0; r < kRounds; ++r) {
        std::memset(block.data(), 'a' + (t + r) % 26, block.size());
        if (::pwrite(fd, block.data(), block.size(), off_t(r) * 4096) != 4096) ++failures;
        if ((r % 2 == 0 ? ::fsync(fd) : ::fdatasync(fd)) != 0) ++failures;
      }
      ::close(fd);
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);
  int dir = ::open(m.dir().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(dir, 0);
  EXPECT_EQ(::fsync(dir), 0);
  EXPECT_EQ(::fsync(dir), 0);
  ::close(dir);

  nlohmann::json s = status();
  const uint64_t syncs = s["commits"]["syncs"].get<uint64_t>() - syncs_before;
  EXPECT_GE(syncs, uint64_t(kThreads * kRounds)) << "every write waited for a commit";
  EXPECT_LT(s["commits"]["commits"].get<uint64_t>(), s["commits"]["syncs"].get<uint64_t>())
      << "no two writes shared a commit";
  const std::string trace = m.trace();
  EXPECT_EQ(requests(trace, "FSYNC"), 1u) << "the kernel kept sending FSYNC";
  EXPECT_EQ(requests(trace, "FSYNCDIR"), 1u) << "the kernel kept sending FSYNCDIR";
  EXPECT_GE(requests(trace, "WRITE"), uint64_t(kThreads * kRounds));

  m.kill_daemon();
  m.start();
  for (int t = 0; t < kThreads; ++t) {
    std::string got = slurp(m.path("f" + std::to_string(t)));
    ASSERT_EQ(got.size(), std::size_t(kRounds) * 4096) << "f" << t;
    for (int r = 0; r < kRounds; ++r) {
      EXPECT_EQ(got[std::size_t(r) * 4096], char('a' + (t + r) % 26)) << "f" << t << " block " << r;
    }
  }
  EXPECT_EQ(m.unmount(), 0) << "fsck.vpmfs -n after the sync mount";
}

// -o sync with the kernel's write-back cache: the mount is MS_SYNCHRONOUS too, so the kernel
// writes each write(2) back before it returns (and vpmfs makes it durable before answering):
// a daemon killed right after the writes, with no fsync and no close, loses none of them.
TEST(PosixSyncMount, WritesThroughTheKernelsCacheAreNotLostToAKill) {
  Mount m("syncwbc", {"sync", "writeback_cache"});
  ASSERT_TRUE(m.mounted());
  int fd = ::open(m.path("f").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  std::string data(64 * 1024, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = char('a' + (i * 31) % 26);
  for (std::size_t off = 0; off < data.size(); off += 4096) {
    ASSERT_EQ(::pwrite(fd, data.data() + off, 4096, off_t(off)), 4096);
  }
  m.kill_daemon();
  ::close(fd);
  m.start();
  const std::string got = slurp(m.path("f"));
  EXPECT_EQ(got.size(), data.size());
  EXPECT_TRUE(got == data) << "a write acknowledged before the kill was lost";
  EXPECT_EQ(m.unmount(), 0);
}

}  // namespace
}  // namespace vpmfs
