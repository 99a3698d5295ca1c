// The command-line tools on real images and mounts: mkfs.vpmfs's refusals, the daemon's errors,
// mount(8) through mount.fuse3, and fsck.vpmfs's exit codes.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "mount_fixture.h"

namespace vpmfs {
namespace {

using test::capture;
using test::Mount;

const std::string kBin = VPMFS_BIN_DIR;

std::string scratch(const std::string& name) {
  return "/dev/shm/vpmfs-tools-" + std::to_string(getpid()) + "-" + name;
}

// Writes bytes at an offset of a (sparse) file of the given size.
void plant(const std::string& path, uint64_t size, uint64_t off, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, off_t(size)), 0);
  ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), off_t(off)), ssize_t(bytes.size()));
  ::close(fd);
}

TEST(Mkfs, RefusesExistingSignaturesWithoutForce) {
  struct Case {
    uint64_t off;
    std::string magic;
    const char* says;
  };
  const Case cases[] = {
      {1080, std::string("\x53\xef", 2), "ext2/ext3/ext4"},
      {0, "XFSB", "XFS"},
      {65600, "_BHRfS_M", "btrfs"},
      {4096, "BTT_ARENA_INFO", "BTT"},
      {4086, "SWAPSPACE2", "swap"},
      {100, "anything", "non-zero bytes"},
  };
  std::string img = scratch("sig.img");
  for (const auto& c : cases) {
    plant(img, 64 << 20, c.off, c.magic);
    auto [rc, err] = capture({kBin + "/mkfs.vpmfs", "--force-persistent", img});
    EXPECT_EQ(rc, 1) << c.says;
    EXPECT_NE(err.find(c.says), std::string::npos) << err;
    EXPECT_NE(err.find("use -f"), std::string::npos) << err;
    // Nothing was written.
    std::ifstream f(img, std::ios::binary);
    std::string head(8, '\0');
    f.read(head.data(), 8);
    EXPECT_NE(head, "VPMFSIMG");
  }
  // -f overwrites; a second mkfs then finds vpmfs itself.
  EXPECT_EQ(capture({kBin + "/mkfs.vpmfs", "-q", "-f", "--force-persistent", img}).first, 0);
  auto [rc, err] = capture({kBin + "/mkfs.vpmfs", "--force-persistent", img});
  EXPECT_EQ(rc, 1);
  EXPECT_NE(err.find("a vpmfs image"), std::string::npos) << err;
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", img}).first, 0);
  ::unlink(img.c_str());
}

TEST(Mkfs, ClearErrorsForBadArguments) {
  std::string img = scratch("args.img");
  ::unlink(img.c_str());
  struct Case {
    std::vector<std::string> args;
    const char* says;
  };
  const Case cases[] = {
      {{"--size", "12Q", img}, "expected a size"},
      {{"--size", "1M", img}, "too small"},
      {{img}, "give --size"},
      {{"--size", "64M", "--uuid", "not-a-uuid", img}, "8-4-4-4-12"},
      {{"--size", "64M", "--sector-size", "1024", img}, "1024"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {kBin + "/mkfs.vpmfs"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto [rc, err] = capture(argv);
    EXPECT_NE(rc, 0) << c.says;
    EXPECT_NE(err.find(c.says), std::string::npos) << err;
    ::unlink(img.c_str());
  }
  ::unlink(img.c_str());
}

TEST(Mkfs, SizesLabelsAndSectorSizes) {
  std::string img = scratch("sizes.img");
  ::unlink(img.c_str());
  auto [rc, out] = capture({kBin + "/mkfs.vpmfs", "--size", "96MiB", "--sector-size", "512",
                            "--label", "scratch", "--force-persistent", img},
                           /*want_stdout=*/true);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("512-byte blocks"), std::string::npos) << out;
  EXPECT_NE(out.find("label scratch"), std::string::npos) << out;
  struct stat st {};
  ASSERT_EQ(::stat(img.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 96 << 20);
  EXPECT_LT(st.st_blocks * 512, st.st_size) << "the image is created sparse";
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", img}).first, 0);
  ::unlink(img.c_str());
}

TEST(Daemon, ClearErrorsBeforeMounting) {
  std::string img = scratch("daemon.img");
  std::string dir = scratch("daemon.dir");
  ::unlink(img.c_str());
  ::mkdir(dir.c_str(), 0755);
  ASSERT_EQ(capture({kBin + "/mkfs.vpmfs", "-q", "--size", "64M", img}).first, 0);
  struct Case {
    std::vector<std::string> args;
    const char* says;
  };
  const Case cases[] = {
      {{img, dir, "-o", "sync_dax=fast"}, "mount option 'sync_dax=fast'"},
      {{img, dir, "-o", "bogus"}, "unknown option"},
      {{img + ".missing", dir}, "No such file"},
      {{img, dir + ".missing"}, "mount point"},
      {{"/etc/hostname", dir}, "not a vpmfs image"},
      // A tmpfs file cannot give direct persistence without being told to pretend.
      {{img, dir, "-o", "sync_dax=direct"}, "MAP_SYNC"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {kBin + "/vpmfs"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto [rc, err] = capture(argv);  // daemonizing: the parent reports the child's verdict
    EXPECT_EQ(rc, 1) << c.says;
    EXPECT_NE(err.find(c.says), std::string::npos) << err;
    struct statfs sf {};
    ASSERT_EQ(::statfs(dir.c_str(), &sf), 0);
    EXPECT_NE(sf.f_type, 0x65735546) << "nothing may be mounted after an error";
  }
  ::rmdir(dir.c_str());
  ::unlink(img.c_str());
}

TEST(Daemon, SecondMountOfTheSameImageIsRefused) {
  Mount m("inuse");
  ASSERT_TRUE(m.mounted());
  std::string dir2 = m.dir() + "2";
  ::mkdir(dir2.c_str(), 0755);
  auto [rc, err] = capture({kBin + "/vpmfs", m.image(), dir2, "-o", "force_persistent"});
  EXPECT_EQ(rc, 1);
  EXPECT_NE(err.find("in use"), std::string::npos) << err;
  ::rmdir(dir2.c_str());
  std::ofstream(m.path("still-fine")) << "ok";
  EXPECT_EQ(m.unmount(), 0);
}

// mount(8) runs its helpers with a PATH of its own (util-linux resets it), where an installed
// vpmfs would be found. For the length of a test, /usr/local/sbin/vpmfs is the built daemon,
// unless something is there already.
class DaemonOnMountsPath {
 public:
  DaemonOnMountsPath() {
    ::mkdir("/usr/local/sbin", 0755);
    made_ = ::symlink((kBin + "/vpmfs").c_str(), kPath) == 0;
  }
  ~DaemonOnMountsPath() {
    if (made_) ::unlink(kPath);
  }

 private:
  static constexpr const char* kPath = "/usr/local/sbin/vpmfs";
  bool made_ = false;
};

TEST(Daemon, MountThroughMountFuse3AndReadOnly) {
  std::string img = scratch("mount8.img");
  std::string dir = scratch("mount8.dir");
  ::unlink(img.c_str());
  ::mkdir(dir.c_str(), 0755);
  ASSERT_EQ(capture({kBin + "/mkfs.vpmfs", "-q", "--size", "64M", img}).first, 0);
  // mount(8) runs mount.fuse3, which runs the daemon with the options it got. Installed, the
  // type is fuse.vpmfs and mount.fuse3 finds "vpmfs" on the PATH; mount(8) resets the PATH, so
  // the test names the built binary with mount.fuse3's "PROGRAM#SOURCE" form instead.
  std::string source = kBin + "/vpmfs#" + img;
  auto [rc, err] = capture({"/bin/mount", "-t", "fuse", source, dir, "-o",
                            "rw,nosuid,nodev,noexec,sync_dax=writeback,commit=2"});
  ASSERT_EQ(rc, 0) << err;
  EXPECT_EQ(err, "") << "a daemonized mount prints nothing (its mode line goes to syslog)";
  std::ofstream(dir + "/hello") << "through mount(8)";
  auto mounts = [] {
    std::ifstream f("/proc/mounts");
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  EXPECT_NE(mounts().find(img + " " + dir + " fuse.vpmfs rw,nosuid,nodev,noexec"),
            std::string::npos)
      << mounts();
  // mount -o remount,ro and back, with just the mount point, as on any filesystem: mount(8)
  // finds the source, type and options in /proc/mounts (user_id=0 and the like among them) and
  // runs mount.fuse3, which runs the daemon; it changes the mount's flags and exits.
  {
    DaemonOnMountsPath on_path;
    auto [rc_ro, err_ro] = capture({"/bin/mount", "-o", "remount,ro", dir});
    ASSERT_EQ(rc_ro, 0) << err_ro;
    EXPECT_NE(mounts().find(img + " " + dir + " fuse.vpmfs ro,"), std::string::npos) << mounts();
    EXPECT_LT(::open((dir + "/nope").c_str(), O_CREAT | O_WRONLY, 0644), 0);
    EXPECT_EQ(errno, EROFS);
    auto [rc_rw, err_rw] = capture({"/bin/mount", "-o", "remount,rw", dir});
    ASSERT_EQ(rc_rw, 0) << err_rw;
    int fd = ::open((dir + "/again").c_str(), O_CREAT | O_WRONLY, 0644);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    if (fd >= 0) ::close(fd);
  }
  // The daemon itself does the same when run by hand.
  ASSERT_EQ(capture({kBin + "/vpmfs", img, dir, "-o", "remount,ro"}).first, 0);
  EXPECT_LT(::open((dir + "/nope").c_str(), O_CREAT | O_WRONLY, 0644), 0);
  EXPECT_EQ(errno, EROFS);
  ASSERT_EQ(capture({kBin + "/vpmfs", img, dir, "-o", "remount,rw"}).first, 0);
  EXPECT_EQ(capture({"/bin/umount", dir}).first, 0);
  // The daemon ends after the unmount returns; fsck waits for it to let the image go.
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", img}).first, 0);

  // norecovery (as xfstests and ext4 users give it) only with ro, with a clear refusal.
  auto [rc_nr, err_nr] =
      capture({"/bin/mount", "-t", "fuse", source, dir, "-o", "norecovery,sync_dax=writeback"});
  EXPECT_NE(rc_nr, 0);
  EXPECT_NE(err_nr.find("'norecovery' needs 'ro'"), std::string::npos) << err_nr;
  // Read-only: the data is there, writes fail with EROFS.
  auto [rc3, err3] =
      capture({"/bin/mount", "-t", "fuse", source, dir, "-o", "ro,norecovery,sync_dax=writeback"});
  ASSERT_EQ(rc3, 0) << err3;
  {
    std::ifstream in(dir + "/hello");
    std::string text((std::istreambuf_iterator<char>(in)), {});
    EXPECT_EQ(text, "through mount(8)");
  }
  EXPECT_LT(::open((dir + "/new").c_str(), O_CREAT | O_WRONLY, 0644), 0);
  EXPECT_EQ(errno, EROFS);
  EXPECT_EQ(capture({"/bin/umount", dir}).first, 0);
  for (int i = 0; i < 200; ++i) {
    if (capture({kBin + "/fsck.vpmfs", "-n", img}).first == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::rmdir(dir.c_str());
  ::unlink(img.c_str());
}

// After a killed daemon, fsck judges the volume as the next mount will see it: the kill log's
// checkpoints are notes (what that mount replays), not problems, so -n exits 0. -p lets a mount
// replay them; then nothing is left to note, and every file is there.
TEST(Fsck, AKilledDaemonsImageIsNoDamageAndPreenReplaysIt) {
  test::Mount m("fsck-killed", {"commit=600"});
  ASSERT_TRUE(m.mounted());
  for (int i = 0; i < 20; ++i) {
    ::mkdir(m.path("d" + std::to_string(i)).c_str(), 0755);
    std::ofstream(m.path("d" + std::to_string(i) + "/f")) << "file " << i;
  }
  m.kill_daemon();
  std::string img = m.image();
  auto [rc, out] = capture({kBin + "/fsck.vpmfs", "-n", img}, /*want_stdout=*/true);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("note: kill log: "), std::string::npos) << out;
  EXPECT_EQ(out.find("problem:"), std::string::npos) << out;
  auto [rc_p, out_p] = capture({kBin + "/fsck.vpmfs", "-p", img}, /*want_stdout=*/true);
  EXPECT_EQ(rc_p, 0) << out_p;
  EXPECT_NE(out_p.find("note: preen: mounted and unmounted"), std::string::npos) << out_p;
  auto [rc_n, out_n] = capture({kBin + "/fsck.vpmfs", "-n", img}, /*want_stdout=*/true);
  EXPECT_EQ(rc_n, 0) << out_n;
  EXPECT_EQ(out_n.find("note:"), std::string::npos) << "left after preen:\n" << out_n;
  m.start();
  for (int i = 0; i < 20; ++i) {
    std::ifstream in(m.path("d" + std::to_string(i) + "/f"));
    std::string text((std::istreambuf_iterator<char>(in)), {});
    EXPECT_EQ(text, "file " + std::to_string(i));
  }
  EXPECT_EQ(m.unmount(), 0);
}

TEST(Fsck, ExitCodesOnDamage) {
  std::string img = scratch("fsck.img");
  ::unlink(img.c_str());
  ASSERT_EQ(capture({kBin + "/mkfs.vpmfs", "-q", "--size", "64M", img}).first, 0);
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", img}).first, 0);
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", "-y", img}).first, 16) << "usage error";
  EXPECT_EQ(capture({kBin + "/fsck.vpmfs", "-n", img + ".missing"}).first, 8);
  // Scribble over the image header's checksummed fields.
  {
    int fd = ::open(img.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, "XX", 2, 120), 2);
    ::close(fd);
  }
  auto [rc, out] = capture({kBin + "/fsck.vpmfs", "-n", img}, /*want_stdout=*/true);
  EXPECT_NE(rc, 0) << out;
  auto [rc_mount, err] = capture({kBin + "/vpmfs", img, "/tmp", "-o", "sync_dax=writeback"});
  EXPECT_EQ(rc_mount, 1);
  EXPECT_NE(err.find("checksum"), std::string::npos) << err;
  ::unlink(img.c_str());
}

}  // namespace
}  // namespace vpmfs
