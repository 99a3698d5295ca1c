// The -o parser of the vpmfs daemon: what mount(8), mount.fuse3, fstab and xfstests pass.
#include "fuse/mount_options.h"

#include <unistd.h>

#include <gtest/gtest.h>

namespace vpmfs {
namespace {

TEST(MountOptions, Defaults) {
  DaemonOptions o;
  ASSERT_TRUE(apply_mount_options("", o));
  EXPECT_TRUE(o.sync_dax_auto);
  EXPECT_FALSE(o.volume.mode.has_value());
  EXPECT_EQ(o.dax, DaxPolicy::inode);
  EXPECT_TRUE(o.default_permissions);
  EXPECT_FALSE(o.volume.read_only);
  EXPECT_EQ(o.volume.commit_interval_ms, 5000u);
  EXPECT_FALSE(o.writeback_cache);
  EXPECT_TRUE(o.volume.lock_memory);
  // Twice the CPUs, 4 to 16.
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  EXPECT_EQ(o.max_threads, cpus <= 2 ? 4u : cpus >= 8 ? 16u : unsigned(2 * cpus));
  o.image = "/img";
  EXPECT_EQ(fuse_mount_options(o), "fsname=/img,subtype=vpmfs,default_permissions");
}

TEST(MountOptions, VpmfsOptions) {
  DaemonOptions o;
  ASSERT_TRUE(apply_mount_options("sync_dax=writeback,dax=always,commit=30,ro,allow_other", o));
  EXPECT_FALSE(o.sync_dax_auto);
  EXPECT_EQ(o.volume.mode, PersistMode::writeback);
  EXPECT_EQ(o.dax, DaxPolicy::always);
  EXPECT_EQ(o.volume.commit_interval_ms, 30000u);
  EXPECT_TRUE(o.volume.read_only);
  EXPECT_TRUE(o.allow_other);
  o.image = "/a,b";
  EXPECT_EQ(fuse_mount_options(o),
            "fsname=/a\\,b,subtype=vpmfs,allow_other,default_permissions,ro");
  // Later options win, as with mount(8).
  ASSERT_TRUE(apply_mount_options("rw,sync_dax=auto,dax=never,no_default_permissions", o));
  EXPECT_FALSE(o.volume.read_only);
  EXPECT_TRUE(o.sync_dax_auto);
  EXPECT_FALSE(o.volume.mode.has_value());
  EXPECT_EQ(o.dax, DaxPolicy::never);
  EXPECT_FALSE(o.default_permissions);
  // norecovery and noload need ro, as on ext4 (where a read-only vpmfs mount never replays).
  EXPECT_TRUE(check_mount_options(o));
  ASSERT_TRUE(apply_mount_options("norecovery", o));
  EXPECT_TRUE(o.norecovery);
  EXPECT_EQ(check_mount_options(o).error(), EINVAL);
  ASSERT_TRUE(apply_mount_options("ro", o));
  EXPECT_TRUE(check_mount_options(o));
  EXPECT_FALSE(apply_mount_options("noload=1", o));
  ASSERT_TRUE(apply_mount_options("rw", o));
  o.norecovery = false;
  ASSERT_TRUE(apply_mount_options("noload", o));
  EXPECT_FALSE(check_mount_options(o));
  o.norecovery = false;
  ASSERT_TRUE(apply_mount_options("writeback_cache", o));
  EXPECT_TRUE(o.writeback_cache);
  ASSERT_TRUE(apply_mount_options("no_writeback_cache", o));
  EXPECT_FALSE(o.writeback_cache);
  EXPECT_FALSE(apply_mount_options("writeback_cache=1", o));
  EXPECT_FALSE(o.volume.sync);
  ASSERT_TRUE(apply_mount_options("sync", o));
  EXPECT_TRUE(o.volume.sync);
  EXPECT_NE(fuse_mount_options(o).find(",sync"), std::string::npos) << "the kernel's flag too";
  ASSERT_TRUE(apply_mount_options("async", o));
  EXPECT_FALSE(o.volume.sync);
  EXPECT_FALSE(apply_mount_options("sync=1", o));
  ASSERT_TRUE(apply_mount_options("dirsync", o));
  EXPECT_TRUE(o.volume.dirsync);
  EXPECT_NE(fuse_mount_options(o).find(",dirsync"), std::string::npos);
  ASSERT_TRUE(apply_mount_options("nomlock", o));
  EXPECT_FALSE(o.volume.lock_memory);
  ASSERT_TRUE(apply_mount_options("mlock", o));
  EXPECT_TRUE(o.volume.lock_memory);
  EXPECT_FALSE(apply_mount_options("mlock=yes", o));
  ASSERT_TRUE(apply_mount_options("max_threads=8", o));
  EXPECT_EQ(o.max_threads, 8u);
  EXPECT_FALSE(apply_mount_options("max_threads=0", o));
  ASSERT_TRUE(apply_mount_options("dax", o));
  EXPECT_EQ(o.dax, DaxPolicy::always);
}

TEST(MountOptions, GenericOptionsFromMountAndFstab) {
  DaemonOptions o;
  ASSERT_TRUE(apply_mount_options(
      "rw,nosuid,nodev,noexec,relatime,_netdev,nofail,x-systemd.automount,defaults", o));
  EXPECT_EQ(o.passed.size(), 7u);  // all but rw and relatime, which vpmfs handles itself
  EXPECT_FALSE(o.volume.read_only);
  EXPECT_EQ(o.volume.atime, MountOptions::Atime::relatime);
  // The VFS flags go on to the mount libfuse makes; the others stay behind.
  EXPECT_EQ(fuse_mount_options(o), "fsname=,subtype=vpmfs,default_permissions,nosuid,nodev,noexec");
  ASSERT_TRUE(apply_mount_options("noatime,dev,suid,nodiratime", o));
  EXPECT_EQ(o.volume.atime, MountOptions::Atime::noatime);
  EXPECT_NE(fuse_mount_options(o).find(",noatime,dev,suid"), std::string::npos);
  EXPECT_EQ(fuse_mount_options(o).find("nodiratime"), std::string::npos)
      << "libfuse 3.14 refuses it";
  ASSERT_TRUE(apply_mount_options("strictatime", o));
  EXPECT_EQ(o.volume.atime, MountOptions::Atime::strictatime);
  ASSERT_TRUE(apply_mount_options("remount,ro", o));
  EXPECT_TRUE(o.remount);
  EXPECT_TRUE(o.volume.read_only);
}

// What mount(8) hands the daemon for `mount -o remount,ro DIR`: the options /proc/mounts shows,
// the kernel's own FUSE parameters among them. They are accepted and change nothing.
TEST(MountOptions, TheKernelsFuseParametersFromProcMounts) {
  DaemonOptions o;
  ASSERT_TRUE(apply_mount_options(
      "rw,remount,ro,relatime,user_id=0,group_id=0,default_permissions,allow_other", o));
  EXPECT_TRUE(o.remount);
  EXPECT_TRUE(o.volume.read_only);
  DaemonOptions plain;
  ASSERT_TRUE(apply_mount_options("rootmode=40000,blksize=4096,max_read=131072", plain));
  EXPECT_EQ(fuse_mount_options(plain), fuse_mount_options(DaemonOptions{}))
      << "vpmfs sets the kernel's parameters itself";
  auto s = apply_mount_options("user_id", plain);
  ASSERT_FALSE(s);
  EXPECT_NE(s.message().find("expects a value"), std::string::npos) << s.message();
}

TEST(MountOptions, ClearErrors) {
  struct Case {
    const char* list;
    const char* says;
  };
  const Case cases[] = {
      {"sync_dax=fast", "expects auto, direct, writeback or unsafe"},
      {"dax=sometimes", "expects always, never or inode"},
      {"commit=0", "from 1 to 86400"},
      {"commit=5s", "from 1 to 86400"},
      {"commit=", "from 1 to 86400"},
      {"ro=1", "takes no value"},
      {"frobnicate", "unknown option"},
      {"subtype=ext4", "subtype vpmfs"},
      {"max_write=100", "from 4096"},
  };
  for (const auto& c : cases) {
    DaemonOptions o;
    Status s = apply_mount_options(c.list, o);
    EXPECT_EQ(s.error(), EINVAL) << c.list;
    EXPECT_NE(s.message().find(c.says), std::string::npos) << c.list << ": " << s.message();
    EXPECT_NE(s.message().find(std::string(c.list).substr(0, 4)), std::string::npos)
        << "the message names the option: " << s.message();
  }
}

}  // namespace
}  // namespace vpmfs

namespace vpmfs {
namespace {

// vpmfs-crash's options: a trace to record into, and the boot a crash state is mounted in.
TEST(MountOptions, RecordAndBootId) {
  DaemonOptions o;
  ASSERT_TRUE(
      apply_mount_options("record=/tmp/t.trace,boot_id=0123456789abcdef-0123456789ABCDEF", o));
  EXPECT_EQ(o.record, "/tmp/t.trace");
  ASSERT_TRUE(o.volume.boot_id.has_value());
  EXPECT_EQ((*o.volume.boot_id)[0], 0x01);
  EXPECT_EQ((*o.volume.boot_id)[15], 0xef);
  EXPECT_FALSE(apply_mount_options("record=", o));
  EXPECT_FALSE(apply_mount_options("boot_id=123", o));
  EXPECT_FALSE(apply_mount_options("boot_id=0123456789abcdef0123456789abcdefff", o));
  EXPECT_FALSE(apply_mount_options("boot_id=0123456789abcdef0123456789abcdeg", o));
  EXPECT_EQ(fuse_mount_options(o).find("record"), std::string::npos);
}

}  // namespace
}  // namespace vpmfs
