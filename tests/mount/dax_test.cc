// The DAX surface on a real mount: the per-inode flag through xfs_io and the FS_IOC_* ioctls,
// direct-I/O service of DAX files, synchronous DAX mappings of the image through the ioctl,
// and their refusal on a writeback region.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "mount_fixture.h"
#include "vpmfs/dax.h"
#include "vpmfs/persist.h"

namespace vpmfs {
namespace {

using test::capture;
using test::Mount;

// xfs_io's lsattr line: the flag letters, then the name.
std::string lsattr(const std::string& path) {
  auto [rc, out] = capture({"/usr/sbin/xfs_io", "-c", "lsattr", path}, true);
  EXPECT_EQ(rc, 0) << out;
  return out.substr(0, out.find(' '));
}

bool has_dax_flag(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  struct fsxattr fa {};
  EXPECT_EQ(::ioctl(fd, FS_IOC_FSGETXATTR, &fa), 0) << std::strerror(errno);
  ::close(fd);
  return fa.fsx_xflags & FS_XFLAG_DAX;
}

void write_file(const std::string& path, const std::string& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(::write(fd, data.data(), data.size()), ssize_t(data.size()));
  ::close(fd);
}

nlohmann::json status_of(const Mount& m) {
  char buf[4096];
  ssize_t n = ::getxattr(m.dir().c_str(), "user.vpmfs.status", buf, sizeof buf);
  EXPECT_GT(n, 0) << std::strerror(errno);
  return nlohmann::json::parse(std::string(buf, n > 0 ? std::size_t(n) : 0));
}

TEST(Dax, XfsIoChattrAndLsattrRoundTripAndNewFilesInherit) {
  Mount m("dax-flag");
  ASSERT_TRUE(m.mounted());
  write_file(m.path("f"), "data");
  EXPECT_EQ(lsattr(m.path("f")).find('x'), std::string::npos);
  ASSERT_EQ(test::run({"/usr/sbin/xfs_io", "-c", "chattr +x", m.path("f")}), 0);
  EXPECT_NE(lsattr(m.path("f")).find('x'), std::string::npos);
  EXPECT_TRUE(has_dax_flag(m.path("f")));
  ASSERT_EQ(test::run({"/usr/sbin/xfs_io", "-c", "chattr -x", m.path("f")}), 0);
  EXPECT_FALSE(has_dax_flag(m.path("f")));
  // A directory passes the flag on to what is made in it, as on ext4 and xfs.
  ASSERT_EQ(::mkdir(m.path("d").c_str(), 0755), 0);
  ASSERT_EQ(test::run({"/usr/sbin/xfs_io", "-c", "chattr +x", m.path("d")}), 0);
  write_file(m.path("d/new"), "x");
  ASSERT_EQ(::mkdir(m.path("d/sub").c_str(), 0755), 0);
  write_file(m.path("d/sub/deeper"), "y");
  write_file(m.path("outside"), "z");
  EXPECT_TRUE(has_dax_flag(m.path("d/new")));
  EXPECT_TRUE(has_dax_flag(m.path("d/sub")));
  EXPECT_TRUE(has_dax_flag(m.path("d/sub/deeper")));
  EXPECT_FALSE(has_dax_flag(m.path("outside")));
  // chattr(1)'s FS_IOC_GETFLAGS / SETFLAGS form: FS_DAX_FL.
  int fd = ::open(m.path("outside").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  unsigned int fl = FS_DAX_FL;
  EXPECT_EQ(::ioctl(fd, FS_IOC_SETFLAGS, &fl), 0) << std::strerror(errno);
  fl = 0;
  EXPECT_EQ(::ioctl(fd, FS_IOC_GETFLAGS, &fl), 0);
  EXPECT_EQ(fl & FS_DAX_FL, unsigned(FS_DAX_FL));
  fl = FS_DAX_FL | FS_COMPR_FL;
  EXPECT_EQ(::ioctl(fd, FS_IOC_SETFLAGS, &fl), -1) << "compression is not supported";
  EXPECT_EQ(errno, EOPNOTSUPP);
  ::close(fd);
  EXPECT_EQ(m.remount(), 0) << "fsck after the flags";
  EXPECT_TRUE(has_dax_flag(m.path("d/new")));
  EXPECT_TRUE(has_dax_flag(m.path("outside")));
}

TEST(Dax, WritesToADaxFileAreVisibleAtOnceEverywhere) {
  Mount m("dax-visible", {"dax=always"});
  ASSERT_TRUE(m.mounted());
  int w = ::open(m.path("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  int r = ::open(m.path("f").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(w, 0);
  ASSERT_GE(r, 0);
  char buf[8] = {};
  for (const char* v : {"first", "second", "third"}) {
    ASSERT_EQ(::pwrite(w, v, std::strlen(v), 0), ssize_t(std::strlen(v)));
    ASSERT_EQ(::pread(r, buf, std::strlen(v), 0), ssize_t(std::strlen(v)));
    EXPECT_EQ(std::string(buf, std::strlen(v)), v) << "another descriptor";
    // Another process, which opens the file itself.
    pid_t child = fork();
    if (child == 0) {
      int fd = ::open(m.path("f").c_str(), O_RDONLY | O_CLOEXEC);
      char got[8] = {};
      bool same = fd >= 0 && ::pread(fd, got, std::strlen(v), 0) == ssize_t(std::strlen(v)) &&
                  std::memcmp(got, v, std::strlen(v)) == 0;
      _exit(same ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "another process, " << v;
  }
  // Shared mmap of a direct-I/O file, where the kernel agreed to it at FUSE_INIT.
  ASSERT_EQ(::ftruncate(w, 8192), 0);
  void* p = ::mmap(nullptr, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, w, 0);
  if (status_of(m)["dax_shared_mmap"] == true) {
    ASSERT_NE(p, MAP_FAILED) << std::strerror(errno);
    std::memcpy(static_cast<char*>(p) + 4096, "mapped", 6);
    ASSERT_EQ(::msync(p, 8192, MS_SYNC), 0);
    ASSERT_EQ(::pread(r, buf, 6, 4096), 6);
    EXPECT_EQ(std::string(buf, 6), "mapped");
    ::munmap(p, 8192);
  } else {
    EXPECT_EQ(p, MAP_FAILED);
    EXPECT_EQ(errno, ENODEV) << "the kernel refuses shared maps of direct-I/O files";
  }
  ::close(r);
  ::close(w);
}

TEST(Dax, SynchronousMappingIsRefusedOnAWritebackImage) {
  Mount m("dax-wb", {"sync_dax=writeback"});
  ASSERT_TRUE(m.mounted());
  int fd = ::open(m.path("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 65536), 0);
  auto map = dax_map(fd, 0, 65536);
  ASSERT_FALSE(map);
  EXPECT_EQ(map.status().error(), EOPNOTSUPP) << map.status().to_string();
  // fsync is the way to durability there, and the status counts it.
  uint64_t before = status_of(m)["flush"]["requests"];
  ASSERT_EQ(::pwrite(fd, "abc", 3, 0), 3);
  ASSERT_EQ(::fsync(fd), 0);
  auto s = status_of(m);
  EXPECT_EQ(s["mode"], "writeback");
  EXPECT_GT(s["flush"]["requests"].get<uint64_t>(), before);
  EXPECT_GE(s["flush"]["device_flushes"].get<uint64_t>(), 1u);
  ::close(fd);
}

TEST(Dax, SynchronousMappingOfTheImageOnADirectRegion) {
  Mount m("dax-direct");
  ASSERT_TRUE(m.mounted());
  ASSERT_EQ(status_of(m)["mode"], "direct");
  int fd = ::open(m.path("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  unsigned int fl = FS_DAX_FL;  // served without the page cache: reads see the image
  ASSERT_EQ(::ioctl(fd, FS_IOC_SETFLAGS, &fl), 0);
  ::close(fd);
  fd = ::open(m.path("f").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "head", 4, 0), 4);
  ASSERT_EQ(::ftruncate(fd, 65536), 0);  // the rest a hole
  EXPECT_EQ(dax_map(fd, 100, 4096).status().error(), EINVAL) << "not page aligned";
  {
    auto map = dax_map(fd, 0, 65536);
    ASSERT_TRUE(map) << map.status().to_string();
    uint64_t covered = 0;
    for (const auto& p : (*map)->pieces()) covered += p.length;
    EXPECT_EQ(covered, 65536u);
    EXPECT_EQ(std::memcmp((*map)->at(0), "head", 4), 0);
    EXPECT_EQ(*(*map)->at(40000), std::byte{0}) << "the hole got a zeroed block";
    // A store through the pointer, made durable by a cache flush: the file has it at once.
    std::byte* p = (*map)->at(8192);
    std::memcpy(p, "stored directly", 15);
    pmem::persist(p, 15);
    char buf[16] = {};
    ASSERT_EQ(::pread(fd, buf, 15, 8192), 15);
    EXPECT_EQ(std::string(buf, 15), "stored directly");
    // A write through the mount to a pinned block lands in place: the mapping sees it.
    ASSERT_EQ(::pwrite(fd, "through the mount", 17, 12000), 17);
    EXPECT_EQ(std::memcmp((*map)->at(12000), "through the mount", 17), 0);
    // Mapped blocks stay where they are.
    EXPECT_EQ(::ftruncate(fd, 4096), -1);
    EXPECT_EQ(errno, EBUSY);
  }
  EXPECT_EQ(::ftruncate(fd, 32768), 0) << "unpinned once the mapping is gone";
  ::close(fd);
  ASSERT_EQ(m.remount(), 0) << "fsck clean";
  fd = ::open(m.path("f").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  char buf[16] = {};
  ASSERT_EQ(::pread(fd, buf, 15, 8192), 15);
  EXPECT_EQ(std::string(buf, 15), "stored directly");
  ::close(fd);
}

TEST(Dax, StatusAttributesAreReadOnly) {
  Mount m("dax-status");
  ASSERT_TRUE(m.mounted());
  EXPECT_EQ(::setxattr(m.dir().c_str(), "user.vpmfs.status", "x", 1, 0), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(::removexattr(m.dir().c_str(), "user.vpmfs.status"), -1);
  EXPECT_EQ(errno, EPERM);
  char buf[8];
  EXPECT_EQ(::getxattr(m.dir().c_str(), "user.vpmfs.other", buf, sizeof buf), -1);
  EXPECT_EQ(errno, ENODATA);
  // Elsewhere the name is an ordinary user attribute.
  write_file(m.path("f"), "x");
  EXPECT_EQ(::setxattr(m.path("f").c_str(), "user.vpmfs.status", "mine", 4, 0), 0);
}

}  // namespace
}  // namespace vpmfs
