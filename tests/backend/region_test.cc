#include "vpmfs/region.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstring>
#include <fstream>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_util.h"

namespace vpmfs {
namespace {

using test::TempPath;
using ::testing::HasSubstr;

constexpr uint64_t kSize = 8 << 20;

RegionOptions create(uint64_t size = kSize) {
  RegionOptions o;
  o.create_size = size;
  return o;
}

TEST(Region, CreatesSparseImageAtRequestedSize) {
  TempPath path("sparse.img");
  auto r = Region::open(path, create(64ull << 30));
  ASSERT_TRUE(r) << r.status().to_string();
  EXPECT_EQ((*r)->size(), 64ull << 30);
  struct stat st {};
  ASSERT_EQ(::stat(path.str().c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 64ull << 30);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 1u << 20) << "image is not sparse";
}

TEST(Region, DetectsWritebackOnTmpfs) {
  TempPath path("auto.img");
  auto r = Region::open(path, create());
  ASSERT_TRUE(r) << r.status().to_string();
  EXPECT_EQ((*r)->mode(), PersistMode::writeback);
  EXPECT_FALSE((*r)->map_sync());
  EXPECT_EQ((*r)->backend_name(), "tmpfs");
  EXPECT_THAT((*r)->mode_reason(), HasSubstr("MAP_SYNC not supported by tmpfs"));
}

TEST(Region, DetectsWritebackOnDiskFilesystem) {
  TempPath path("disk.img", "/tmp");
  auto r = Region::open(path, create());
  ASSERT_TRUE(r) << r.status().to_string();
  EXPECT_EQ((*r)->mode(), PersistMode::writeback);
  EXPECT_THAT((*r)->mode_reason(), HasSubstr("MAP_SYNC not supported by"));
}

// The VmFlags and Locked lines of /proc/self/smaps for the mapping that starts at base.
std::pair<std::string, uint64_t> mapping_lock(const void* base) {
  std::ifstream smaps("/proc/self/smaps");
  char start[32];
  std::snprintf(start, sizeof start, "%lx-", reinterpret_cast<unsigned long>(base));
  std::string line;
  bool in = false;
  std::string flags;
  uint64_t locked_kb = 0;
  while (std::getline(smaps, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find(' ') > line.find('-')) {
      if (in) break;
      in = line.rfind(start, 0) == 0;
    } else if (in && line.rfind("VmFlags:", 0) == 0) {
      flags = line.substr(8);
    } else if (in && line.rfind("Locked:", 0) == 0) {
      locked_kb = std::stoull(line.substr(7));
    }
  }
  return {flags, locked_kb};
}

bool has_flag(const std::string& flags, const char* flag) {
  return (" " + flags + " ").find(std::string(" ") + flag + " ") != std::string::npos;
}

// An image on tmpfs is locked as its pages are touched (so reclaim never unmaps them), and only
// those pages: nothing is populated ahead, and a sparse image stays sparse. Elsewhere, or when
// not asked for, nothing is locked.
TEST(Region, LocksATmpfsImageAsItsPagesAreTouched) {
  TempPath path("locked.img", "/dev/shm");
  RegionOptions o = create(64 << 20);
  o.lock_memory = true;
  auto r = Region::open(path, o);
  ASSERT_TRUE(r) << r.status().to_string();
  Region& region = **r;
  ASSERT_EQ(region.memory(), "locked as touched") << "is RLIMIT_MEMLOCK too small?";
  auto [flags, locked_kb] = mapping_lock(region.base());
  EXPECT_TRUE(has_flag(flags, "lo")) << flags;  // VM_LOCKED
  EXPECT_TRUE(has_flag(flags, "lf")) << flags;  // VM_LOCKONFAULT: populated as touched only
  EXPECT_EQ(locked_kb, 0u);
  for (uint64_t page = 0; page < 3; ++page) region.write(page * 4096 * 100, "x", 1);
  EXPECT_EQ(mapping_lock(region.base()).second, 12u);
  struct stat st {};
  ASSERT_EQ(::stat(path.str().c_str(), &st), 0);
  EXPECT_LE(uint64_t(st.st_blocks) * 512, 64u << 10) << "the image was filled in";

  TempPath unlocked_path("unlocked.img", "/dev/shm");
  auto unlocked = Region::open(unlocked_path, create());  // lock_memory not asked for
  ASSERT_TRUE(unlocked) << unlocked.status().to_string();
  EXPECT_EQ((*unlocked)->memory(), "");
  EXPECT_FALSE(has_flag(mapping_lock((*unlocked)->base()).first, "lo"));

  TempPath disk_path("disk-unlocked.img", "/var/tmp");
  auto disk = Region::open(disk_path, o);
  ASSERT_TRUE(disk) << disk.status().to_string();
  if ((*disk)->backend_name() != "tmpfs") {
    EXPECT_EQ((*disk)->memory(), "");
    EXPECT_FALSE(has_flag(mapping_lock((*disk)->base()).first, "lo"));
  }
}

// On a disk filesystem the stores of a writeback image go through pwrite() (a flush there
// write-protects the mapped pages it cleans); the mapping sees them at once, and so does the
// file. tmpfs has no write-back, so stores stay in the mapping.
TEST(Region, DiskImageStoresGoThroughTheFileAndTheMappingSeesThem) {
  TempPath shm_path("stores.img", "/dev/shm");
  auto shm = Region::open(shm_path, create());
  ASSERT_TRUE(shm) << shm.status().to_string();
  EXPECT_FALSE((*shm)->stores_by_write());

  TempPath path("stores.img", "/var/tmp");
  auto r = Region::open(path, create());
  ASSERT_TRUE(r) << r.status().to_string();
  Region& region = **r;
  EXPECT_EQ(region.stores_by_write(), region.backend_name() != "tmpfs") << region.backend_name();
  std::vector<char> block(8192);
  for (std::size_t i = 0; i < block.size(); ++i) block[i] = char(i * 7 + 1);
  region.write_nt(4096 - 100, block.data(), block.size());  // across three pages
  region.write(20000, "plain write", 11);
  region.store64(24576, 0x1122334455667788ull);
  region.zero(4096, 64);
  std::vector<char> want(block);
  std::memset(want.data() + 100, 0, 64);
  EXPECT_EQ(std::memcmp(region.at(4096 - 100), want.data(), want.size()), 0);
  EXPECT_EQ(std::memcmp(region.at(20000), "plain write", 11), 0);
  uint64_t word;
  std::memcpy(&word, region.at(24576), 8);
  EXPECT_EQ(word, 0x1122334455667788ull);
  // The file, read through another descriptor, holds the same bytes.
  int fd = ::open(path.str().c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<char> file(want.size());
  ASSERT_EQ(::pread(fd, file.data(), file.size(), 4096 - 100), ssize_t(file.size()));
  EXPECT_EQ(file, want);
  ASSERT_EQ(::pread(fd, &word, 8, 24576), 8);
  EXPECT_EQ(word, 0x1122334455667788ull);
  ::close(fd);

  r->reset();
  RegionOptions ro;
  ro.read_only = true;
  auto reader = Region::open(path, ro);
  ASSERT_TRUE(reader) << reader.status().to_string();
  EXPECT_FALSE((*reader)->stores_by_write());
}

// Whether the page holding p is in this process's page tables (/proc/self/pagemap, bit 63).
bool page_present(const void* p) {
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  int fd = ::open("/proc/self/pagemap", O_RDONLY);
  EXPECT_GE(fd, 0);
  uint64_t entry = 0;
  off_t at = off_t(reinterpret_cast<uintptr_t>(p) / page * sizeof entry);
  EXPECT_EQ(::pread(fd, &entry, sizeof entry, at), ssize_t(sizeof entry));
  ::close(fd);
  return (entry >> 63) != 0;
}

// An image the kernel writes back (the root disk): a range given to unmap_before_flush() leaves
// the page tables at each device flush, its contents stay. On tmpfs nothing is dropped.
TEST(Region, UnmapsItsStoreRangesBeforeADeviceFlush) {
  TempPath path("unmap.img", "/var/tmp");
  auto r = Region::open(path, create());
  ASSERT_TRUE(r) << r.status().to_string();
  Region& region = **r;
  const bool drops = region.stores_by_write();  // not when /var/tmp is a tmpfs
  region.unmap_before_flush(8192, 8192);
  region.store64(8192 + 16, 0x0123456789abcdefull);
  region.store64(20480, 0x1111222233334444ull);  // outside the range
  EXPECT_TRUE(page_present(region.at(8192)));
  region.persist(8192 + 16, 8);
  ASSERT_TRUE(region.flush_channel().wait());
  EXPECT_EQ(page_present(region.at(8192)), !drops) << "dropped before the flush";
  EXPECT_TRUE(page_present(region.at(20480))) << "not in a range: left alone";
  uint64_t word;
  std::memcpy(&word, region.at(8192 + 16), 8);  // faults the page back in
  EXPECT_EQ(word, 0x0123456789abcdefull);
  int fd = ::open(path.str().c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pread(fd, &word, 8, 8192 + 16), 8);
  EXPECT_EQ(word, 0x0123456789abcdefull);
  ::close(fd);

  TempPath shm_path("unmap.img", "/dev/shm");
  auto shm = Region::open(shm_path, create());
  ASSERT_TRUE(shm) << shm.status().to_string();
  (*shm)->unmap_before_flush(8192, 8192);
  (*shm)->store64(8192, 1);
  (*shm)->persist(8192, 8);
  ASSERT_TRUE((*shm)->flush_channel().wait());
  EXPECT_TRUE(page_present((*shm)->at(8192))) << "tmpfs has no write-back to spare";
}

TEST(Region, RefusesDirectWithoutDaxAndNamesTheReason) {
  TempPath path("direct.img");
  RegionOptions o = create();
  o.mode = PersistMode::direct;
  auto r = Region::open(path, o);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.status().error(), EOPNOTSUPP);
  EXPECT_EQ(r.status().message(),
            "direct needs a DAX-capable file or devdax: MAP_SYNC not supported by tmpfs");
}

TEST(Region, ForcedDirectTreatsMemoryAsPersistent) {
  TempPath path("forced.img");
  RegionOptions o = create();
  o.mode = PersistMode::direct;
  o.force_persistent = true;
  auto r = Region::open(path, o);
  ASSERT_TRUE(r) << r.status().to_string();
  EXPECT_EQ((*r)->mode(), PersistMode::direct);
  EXPECT_THAT((*r)->mode_reason(), HasSubstr("forced"));

  // Detection with the force flag also says direct, like PMEM_IS_PMEM_FORCE.
  r->reset();
  RegionOptions detect;
  detect.force_persistent = true;
  auto again = Region::open(path, detect);
  ASSERT_TRUE(again) << again.status().to_string();
  EXPECT_EQ((*again)->mode(), PersistMode::direct);
}

TEST(Region, UnsafeIsAlwaysPossibleAndSaysSo) {
  TempPath path("unsafe.img");
  RegionOptions o = create();
  o.mode = PersistMode::unsafe;
  auto r = Region::open(path, o);
  ASSERT_TRUE(r) << r.status().to_string();
  EXPECT_EQ((*r)->mode(), PersistMode::unsafe);
  EXPECT_THAT((*r)->mode_reason(), HasSubstr("nothing is ever guaranteed durable"));
}

TEST(Region, ParsesModeNames) {
  EXPECT_EQ(parse_persist_mode("direct"), PersistMode::direct);
  EXPECT_EQ(parse_persist_mode("writeback"), PersistMode::writeback);
  EXPECT_EQ(parse_persist_mode("unsafe"), PersistMode::unsafe);
  EXPECT_EQ(parse_persist_mode("auto"), std::nullopt);
  EXPECT_EQ(parse_persist_mode("Direct"), std::nullopt);
  EXPECT_STREQ(to_string(PersistMode::writeback), "writeback");
}

TEST(Region, SecondOpenOfTheSameImageIsRefused) {
  TempPath path("locked.img");
  auto first = Region::open(path, create());
  ASSERT_TRUE(first) << first.status().to_string();

  auto second = Region::open(path);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.status().error(), EBUSY);
  EXPECT_THAT(second.status().message(), HasSubstr("image in use"));

  RegionOptions ro;
  ro.read_only = true;
  EXPECT_EQ(Region::open(path, ro).status().error(), EBUSY) << "a reader must not see a writer's "
                                                               "half-done state";

  first->reset();
  EXPECT_TRUE(Region::open(path)) << "the lock must go with the region";
}

TEST(Region, SecondProcessGetsImageInUse) {
  TempPath path("locked2.img");
  auto first = Region::open(path, create());
  ASSERT_TRUE(first) << first.status().to_string();
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto r = Region::open(path);
    bool refused = !r && r.status().error() == EBUSY &&
                   r.status().message().find("image in use") != std::string::npos;
    ::_exit(refused ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child process was not refused with 'image in use'";
}

TEST(Region, ReadersShareAnImage) {
  TempPath path("shared.img");
  ASSERT_TRUE(Region::open(path, create()));
  RegionOptions ro;
  ro.read_only = true;
  auto a = Region::open(path, ro);
  auto b = Region::open(path, ro);
  ASSERT_TRUE(a) << a.status().to_string();
  ASSERT_TRUE(b) << b.status().to_string();
  EXPECT_TRUE((*a)->read_only());
  EXPECT_EQ(Region::open(path).status().error(), EBUSY);
}

TEST(Region, ClearErrorsForBadPaths) {
  auto missing = Region::open("/dev/shm/vpmfs-no-such-image.img");
  EXPECT_EQ(missing.status().error(), ENOENT);
  EXPECT_THAT(missing.status().message(), HasSubstr("does not exist"));

  TempPath empty("empty.img");
  { std::ofstream touch(empty.str()); }
  auto e = Region::open(empty);
  EXPECT_EQ(e.status().error(), EINVAL);
  EXPECT_THAT(e.status().message(), HasSubstr("is empty"));

  auto dir = Region::open("/dev/shm");
  EXPECT_FALSE(dir);
  EXPECT_EQ(dir.status().error(), EISDIR);

  RegionOptions ro;
  ro.read_only = true;
  auto chr = Region::open("/dev/null", ro);
  EXPECT_EQ(chr.status().error(), ENODEV);
  EXPECT_THAT(chr.status().message(), HasSubstr("not a device-dax node"));
}

TEST(Region, StoresReachTheImageAndSurviveReopen) {
  TempPath path("data.img");
  const char text[] = "sector atomicity";
  {
    auto r = Region::open(path, create());
    ASSERT_TRUE(r) << r.status().to_string();
    Region& region = **r;
    region.write(4096, text, sizeof text);
    region.store64(8192, 0x1122334455667788ull);
    region.store32(8200, 0xAABBCCDDu);
    region.zero(12288, 100);
    region.write_nt(16384 + 3, text, sizeof text);
    region.persist(0, region.size());
    ASSERT_TRUE(region.flush_channel().wait());
  }
  auto r = Region::open(path);
  ASSERT_TRUE(r);
  Region& region = **r;
  EXPECT_EQ(std::memcmp(region.at(4096), text, sizeof text), 0);
  uint64_t v64;
  uint32_t v32;
  std::memcpy(&v64, region.at(8192), 8);
  std::memcpy(&v32, region.at(8200), 4);
  EXPECT_EQ(v64, 0x1122334455667788ull);
  EXPECT_EQ(v32, 0xAABBCCDDu);
  EXPECT_EQ(std::memcmp(region.at(16384 + 3), text, sizeof text), 0);
  EXPECT_TRUE(region.contains(region.size() - 1, 1));
  EXPECT_FALSE(region.contains(region.size() - 1, 2));
  EXPECT_FALSE(region.contains(~0ull, 2));
}

TEST(Region, PersistOnWritebackDirtiesTheFlushChannel) {
  TempPath path("dirty.img");
  auto r = Region::open(path, create());
  ASSERT_TRUE(r);
  Region& region = **r;
  ASSERT_TRUE(region.flush_channel().wait());
  auto before = region.flush_channel().stats();
  EXPECT_EQ(before.device_flushes, 0u) << "a clean region needs no device flush";
  EXPECT_EQ(before.clean_batches, 1u);

  region.write(0, "x", 1);
  region.persist(0, 1);
  ASSERT_TRUE(region.flush_channel().wait());
  EXPECT_EQ(region.flush_channel().stats().device_flushes, 1u);
}

TEST(Region, DirectAndUnsafeNeverAskTheDevice) {
  for (PersistMode mode : {PersistMode::direct, PersistMode::unsafe}) {
    TempPath path("nodev.img");
    RegionOptions o = create();
    o.mode = mode;
    o.force_persistent = true;
    auto r = Region::open(path, o);
    ASSERT_TRUE(r);
    (*r)->write(0, "x", 1);
    (*r)->persist(0, 1);
    ASSERT_TRUE((*r)->flush_channel().wait());
    EXPECT_EQ((*r)->flush_channel().stats().device_flushes, 0u) << to_string(mode);
  }
}

}  // namespace
}  // namespace vpmfs
