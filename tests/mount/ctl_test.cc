// vpmfs-ctl on real images and mounts: info (human and JSON) against what the library reports,
// info while mounted, damaged headers and info blocks (a clear message, exit 1, never a crash),
// dump of map entries before and after a sector write, status of a mount, and usage errors.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "mount_fixture.h"
#include "vpmfs/btt.h"
#include "vpmfs/checksum.h"
#include "vpmfs/fs.h"
#include "vpmfs/random.h"
#include "vpmfs/region.h"

namespace vpmfs {
namespace {

using Json = nlohmann::json;
using test::Mount;

const std::string kBin = VPMFS_BIN_DIR;
const std::string kCtl = kBin + "/vpmfs-ctl";

struct CtlRun {
  int rc = -1;
  std::string out;
  std::string err;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Runs vpmfs-ctl with both output streams captured (through files: no pipe can fill up).
CtlRun ctl(const std::vector<std::string>& args) {
  std::string base = "/dev/shm/vpmfs-ctl-run-" + std::to_string(getpid());
  std::string out = base + ".out", err = base + ".err";
  pid_t pid = fork();
  if (pid == 0) {
    int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1);
    ::dup2(e, 2);
    std::vector<std::string> argv = {kCtl};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> p;
    for (auto& a : argv) p.push_back(a.data());
    p.push_back(nullptr);
    execv(p[0], p.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CtlRun r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  ::unlink(out.c_str());
  ::unlink(err.c_str());
  return r;
}

Json parse(const CtlRun& r) {
  Json j = Json::parse(r.out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r.out << r.err;
  return j;
}

bool has(const std::string& text, const std::string& what) {
  return text.find(what) != std::string::npos;
}

class Image {
 public:
  explicit Image(const std::string& name, const std::vector<std::string>& mkfs_args = {}) {
    path_ = "/dev/shm/vpmfs-ctl-" + std::to_string(getpid()) + "-" + name + ".img";
    ::unlink(path_.c_str());
    std::vector<std::string> argv = {kBin + "/mkfs.vpmfs", "-q", "--size", "64M",
                                     "--force-persistent"};
    argv.insert(argv.end(), mkfs_args.begin(), mkfs_args.end());
    argv.push_back(path_);
    EXPECT_EQ(test::run(argv), 0);
  }
  ~Image() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

  Json info() {
    CtlRun r = ctl({"info", path_, "--json"});
    EXPECT_EQ(r.rc, 0) << r.err;
    return parse(r);
  }
  void scribble(uint64_t off, const void* data, std::size_t len) {
    int fd = ::open(path_.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data, len, off_t(off)), ssize_t(len));
    ::close(fd);
  }
  std::vector<char> read(uint64_t off, std::size_t len) {
    std::vector<char> buf(len);
    int fd = ::open(path_.c_str(), O_RDONLY);
    EXPECT_EQ(::pread(fd, buf.data(), len, off_t(off)), ssize_t(len));
    ::close(fd);
    return buf;
  }
  // What a read-only library mount says about free space.
  struct statvfs statfs() {
    MountOptions mo;
    mo.read_only = true;
    mo.force_persistent = true;
    auto v = Volume::mount(path_, mo);
    EXPECT_TRUE(v) << v.status().to_string();
    struct statvfs none {};
    return v ? (*v)->statfs() : none;
  }

 private:
  std::string path_;
};

TEST(Ctl, InfoOnAFreshImageAgreesWithTheLibrary) {
  Image img("fresh", {"--label", "ctl-label"});
  Json j = img.info();
  EXPECT_EQ(j["header"]["version"], 1);
  EXPECT_EQ(j["header"]["sector_size"], 4096);
  EXPECT_EQ(j["header"]["label"], "ctl-label");
  EXPECT_EQ(j["header"]["image_size"], 64u << 20);
  EXPECT_EQ(j["header"]["checksum_ok"], true);
  EXPECT_EQ(j["header"]["intent_log"]["offset"], 4096);
  EXPECT_EQ(j["header"]["btt"]["offset"], 2u << 20);  // docs/FORMAT.md's 64 MiB example
  EXPECT_EQ(j["image"]["in_use"], false);

  const Json& btt = j["btt"];
  EXPECT_EQ(btt["sector_size"], 4096);
  EXPECT_EQ(btt["sectors"], 15593);
  ASSERT_EQ(btt["arenas"].size(), 1u);
  const Json& a = btt["arenas"][0];
  EXPECT_EQ(a["usable"], true);
  EXPECT_EQ(a["version"], "2.0");
  EXPECT_EQ(a["external_lbasize"], 4096);
  EXPECT_EQ(a["nfree"], 256);
  EXPECT_EQ(a["internal_nlba"].get<uint64_t>(), a["external_nlba"].get<uint64_t>() + 256);
  EXPECT_EQ(a["dataoff"], 4096);
  EXPECT_EQ(a["error_flag"], false);
  EXPECT_EQ(a["info_in_use"], "primary");
  EXPECT_EQ(a["backup_matches_primary"], true);
  EXPECT_EQ(a["primary"]["checksum_ok"], true);
  EXPECT_EQ(a["backup"]["offset"].get<uint64_t>(),
            a["offset"].get<uint64_t>() + a["info2off"].get<uint64_t>());
  EXPECT_EQ(a["uuid"], j["header"]["uuid"]);

  const Json& fs = j["filesystem"];
  ASSERT_TRUE(fs.is_object());
  EXPECT_EQ(fs["block_size"], 4096);
  EXPECT_EQ(fs["block_count"], btt["sectors"]);
  EXPECT_EQ(fs["label"], "ctl-label");
  EXPECT_EQ(fs["uuid"], j["header"]["uuid"]);
  EXPECT_EQ(fs["dax_default"], "inode");
  EXPECT_EQ(fs["orphan_head"], 0);
  EXPECT_EQ(fs["checksum_ok"], true);
  EXPECT_EQ(fs["journal"]["start"], 1);
  struct statvfs sv = img.statfs();
  EXPECT_EQ(fs["data_blocks"].get<uint64_t>(), sv.f_blocks);
  EXPECT_EQ(fs["free_blocks"].get<uint64_t>(), sv.f_bfree);
  EXPECT_EQ(fs["free_inodes"].get<uint64_t>(), sv.f_ffree);
  EXPECT_EQ(fs["used_blocks"], 0);
  EXPECT_TRUE(j["problems"].empty());

  // The human form: the same values, sections of aligned "key: value" lines.
  CtlRun r = ctl({"info", img.path()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  for (const char* section : {"\nheader\n", "\nbtt\n", "\nbtt arena 0\n", "\nfilesystem\n"}) {
    EXPECT_TRUE(has(r.out, section)) << section << r.out;
  }
  EXPECT_TRUE(has(r.out, "label:")) << r.out;
  EXPECT_TRUE(has(r.out, "ctl-label")) << r.out;
  EXPECT_TRUE(has(r.out, "btt offset:        0x200000")) << r.out;
  EXPECT_TRUE(has(r.out, "free blocks:         " + std::to_string(sv.f_bfree))) << r.out;
}

// More lanes for larger images (fewer flushes for writes without fsync), what --lanes asks for
// otherwise, and a clear refusal beyond what the format holds.
TEST(Ctl, LanesGrowWithTheImageUnlessAskedFor) {
  std::string path = "/dev/shm/vpmfs-ctl-" + std::to_string(getpid()) + "-lanes.img";
  struct Case {
    const char* size;
    const char* lanes;  // nullptr: the default
    uint32_t want;
  };
  for (const Case& c :
       {Case{"64M", nullptr, 256}, Case{"1G", nullptr, 2048}, Case{"2G", nullptr, 4096},
        Case{"8G", nullptr, 4096}, Case{"64M", "1000", 1000}}) {
    ::unlink(path.c_str());
    std::vector<std::string> argv = {kBin + "/mkfs.vpmfs", "-q", "--size", c.size,
                                     "--force-persistent"};
    if (c.lanes) argv.insert(argv.end(), {"--lanes", c.lanes});
    argv.push_back(path);
    ASSERT_EQ(test::run(argv), 0) << c.size;
    CtlRun r = ctl({"info", path, "--json"});
    ASSERT_EQ(r.rc, 0) << r.err;
    Json j = parse(r);
    EXPECT_EQ(j["header"]["lanes"], c.want) << c.size;
    for (const Json& a : j["btt"]["arenas"]) EXPECT_EQ(a["nfree"], c.want) << c.size;
  }
  auto [rc, err] = test::capture({kBin + "/mkfs.vpmfs", "-q", "--size", "64M", "--lanes", "65537",
                                  "--force-persistent", path});
  EXPECT_EQ(rc, 1);
  EXPECT_TRUE(has(err, "--lanes")) << err;
  ::unlink(path.c_str());
}

TEST(Ctl, InfoCountsWhatTheLibraryWrote) {
  Image img("written", {"--sector-size", "512"});
  Json before = img.info();
  EXPECT_EQ(before["filesystem"]["block_size"], 512);
  {
    MountOptions mo;
    mo.force_persistent = true;
    auto v = Volume::mount(img.path(), mo);
    ASSERT_TRUE(v) << v.status().to_string();
    auto f = (*v)->mknod(kRootIno, "data", S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(f) << f.status().to_string();
    std::vector<char> buf(1 << 20, 'x');
    ASSERT_TRUE((*v)->write(f->ino, 0, buf.data(), buf.size()));
    ASSERT_TRUE((*v)->sync_wait());
  }
  Json after = img.info();
  uint64_t free_before = before["filesystem"]["free_blocks"];
  uint64_t free_after = after["filesystem"]["free_blocks"];
  EXPECT_LE(free_after + 2048, free_before) << "1 MiB is 2048 blocks of 512 bytes";
  EXPECT_EQ(after["filesystem"]["free_inodes"].get<uint64_t>() + 1,
            before["filesystem"]["free_inodes"].get<uint64_t>());
  EXPECT_EQ(after["filesystem"]["used_blocks"].get<uint64_t>(), free_before - free_after);
  EXPECT_EQ(after["filesystem"]["journal"]["transaction"], true);
  struct statvfs sv = img.statfs();
  EXPECT_EQ(free_after, sv.f_bfree);
  EXPECT_EQ(after["filesystem"]["free_inodes"].get<uint64_t>(), sv.f_ffree);
}

TEST(Ctl, InfoWorksWhileMounted) {
  Mount m("ctl-info");
  ASSERT_TRUE(m.mounted());
  Json before = [&] {
    CtlRun r = ctl({"info", m.image(), "--json"});
    EXPECT_EQ(r.rc, 0) << r.err;
    return parse(r);
  }();
  EXPECT_EQ(before["image"]["in_use"], true);
  EXPECT_EQ(before["image"]["held_for"], "writing");
  EXPECT_EQ(before["image"]["held_by_pid"], m.daemon());
  {
    int fd = ::open(m.path("file").c_str(), O_WRONLY | O_CREAT, 0644);
    ASSERT_GE(fd, 0);
    std::vector<char> buf(256 << 10, 'y');
    ASSERT_EQ(::write(fd, buf.data(), buf.size()), ssize_t(buf.size()));
    ASSERT_EQ(::fsync(fd), 0);  // a commit: the journal and the bitmaps are on media
    ::close(fd);
  }
  CtlRun r = ctl({"info", m.image(), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Json after = parse(r);
  EXPECT_LE(after["filesystem"]["free_blocks"].get<uint64_t>() + 64,
            before["filesystem"]["free_blocks"].get<uint64_t>());
  EXPECT_EQ(after["filesystem"]["free_inodes"].get<uint64_t>() + 1,
            before["filesystem"]["free_inodes"].get<uint64_t>());
  // It took no lock: the mount goes on working, and unmounts clean.
  EXPECT_EQ(::access(m.path("file").c_str(), R_OK), 0);
  EXPECT_EQ(m.unmount(), 0);
}

TEST(Ctl, DamagedImageHeader) {
  Image img("header");
  // A changed label byte: the checksum no longer matches; the rest is still shown.
  img.scribble(80, "X", 1);
  CtlRun r = ctl({"info", img.path(), "--json"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "image header checksum mismatch")) << r.err;
  Json j = parse(r);
  EXPECT_EQ(j["header"]["checksum_ok"], false);
  EXPECT_TRUE(j["filesystem"].is_object());
  EXPECT_FALSE(j["problems"].empty());

  // A checksummed header whose BTT lies past the end of the file: nothing past it is read.
  Image img2("layout");
  auto h = img2.read(0, 4096);
  uint64_t btt_size = 1ull << 40;
  std::memcpy(h.data() + 48, &btt_size, 8);
  std::memset(h.data() + 4088, 0, 8);
  uint64_t sum = xxhash64(h.data(), h.size());
  std::memcpy(h.data() + 4088, &sum, 8);
  img2.scribble(0, h.data(), h.size());
  r = ctl({"info", img2.path()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "is not inside the")) << r.err;
  EXPECT_TRUE(has(r.out, "not readable")) << r.out;
  r = ctl({"dump", img2.path(), "--lba", "0"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "cannot be trusted")) << r.err;

  // A label of bytes that are not UTF-8 (and a terminal escape) still gives valid JSON.
  Image img3("label");
  h = img3.read(0, 4096);
  std::memcpy(h.data() + 72, "\xff\xfe\x1b[2J", 7);
  std::memset(h.data() + 4088, 0, 8);
  sum = xxhash64(h.data(), h.size());
  std::memcpy(h.data() + 4088, &sum, 8);
  img3.scribble(0, h.data(), h.size());
  r = ctl({"info", img3.path(), "--json"});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(parse(r)["header"]["label"].is_string());
  r = ctl({"info", img3.path()});
  EXPECT_EQ(r.rc, 0) << r.err;
  EXPECT_FALSE(has(r.out, "\x1b")) << "no terminal escapes from media";

  // Not an image at all.
  ASSERT_EQ(::truncate(img2.path().c_str(), 100), 0);
  r = ctl({"info", img2.path()});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "is not a vpmfs image")) << r.err;
  r = ctl({"info", "/dev/shm/vpmfs-ctl-does-not-exist.img"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "does not exist")) << r.err;
}

TEST(Ctl, DamagedPrimaryInfoBlockFallsBackToTheBackup) {
  Image img("primary");
  Json j = img.info();
  uint64_t primary = j["btt"]["arenas"][0]["offset"];
  uint64_t backup = j["btt"]["arenas"][0]["backup"]["offset"];
  std::vector<char> zero(4096, 0);
  img.scribble(primary, zero.data(), zero.size());

  CtlRun r = ctl({"info", img.path(), "--json"});
  EXPECT_EQ(r.rc, 1) << "a damaged copy is damage, even with a good backup";
  EXPECT_TRUE(has(r.err, "primary info block invalid")) << r.err;
  EXPECT_TRUE(has(r.err, "using the backup")) << r.err;
  Json k = parse(r);
  const Json& a = k["btt"]["arenas"][0];
  EXPECT_EQ(a["info_in_use"], "backup");
  EXPECT_EQ(a["primary"]["valid"], false);
  EXPECT_EQ(a["primary"]["signature"], false);
  EXPECT_EQ(a["backup"]["valid"], true);
  EXPECT_EQ(a["external_nlba"], j["btt"]["arenas"][0]["external_nlba"]);
  EXPECT_EQ(k["filesystem"]["free_blocks"], j["filesystem"]["free_blocks"]);

  // Both copies gone: a clear message, the header still shown, no filesystem.
  img.scribble(backup, zero.data(), zero.size());
  r = ctl({"info", img.path(), "--json"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "no BTT_ARENA_INFO signature")) << r.err;
  k = parse(r);
  EXPECT_EQ(k["header"]["checksum_ok"], true);
  EXPECT_EQ(k["btt"]["arenas"][0]["usable"], false);
  EXPECT_TRUE(k["filesystem"].is_null());
  r = ctl({"dump", img.path(), "--lba", "0"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "no BTT")) << r.err;
}

TEST(Ctl, InfoBlockWithTheErrorFlag) {
  Image img("errflag");
  Json j = img.info();
  for (const char* copy : {"primary", "backup"}) {
    uint64_t off = j["btt"]["arenas"][0][copy]["offset"];
    auto info = img.read(off, 4096);
    uint32_t flags = 1;
    std::memcpy(info.data() + 48, &flags, 4);
    std::memset(info.data() + 4088, 0, 8);
    uint64_t sum = fletcher64(info.data(), info.size());
    std::memcpy(info.data() + 4088, &sum, 8);
    img.scribble(off, info.data(), info.size());
  }
  CtlRun r = ctl({"info", img.path(), "--json"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "error flag is set")) << r.err;
  EXPECT_EQ(parse(r)["btt"]["arenas"][0]["error_flag"], true);
}

// Random bytes over every structure info reads: any answer but a crash.
TEST(Ctl, ScribbledImagesNeverCrashIt) {
  Image img("scribble");
  Json j = img.info();
  const Json& a = j["btt"]["arenas"][0];
  uint64_t arena = a["offset"];
  struct Target {
    uint64_t off, len;
  };
  std::vector<Target> targets = {
      {0, 4096},                                    // image header
      {arena, 4096},                                // primary info block
      {arena + a["mapoff"].get<uint64_t>(), 4096},  // map
      {arena + a["logoff"].get<uint64_t>(), 4096},  // flog
  };
  // Where the superblock, the journal's first block and the bitmaps are (mkfs wrote them
  // through the BTT, so they are not identity-mapped).
  CtlRun where = ctl({"dump", img.path(), "--lba", "0-501", "--json"});
  ASSERT_EQ(where.rc, 0) << where.err;
  Json lbas = parse(where)["lbas"];
  for (uint64_t lba : {0, 1, 244, 245}) {
    uint64_t block = lbas[lba]["block"];
    targets.push_back({arena + a["dataoff"].get<uint64_t>() + block * 4096, 4096});
  }
  std::vector<char> pristine = img.read(0, 64 << 20);
  SplitMix64 rng(7);
  for (int round = 0; round < 60; ++round) {
    img.scribble(0, pristine.data(), pristine.size());
    const Target& t = targets[round % targets.size()];
    for (int n = 0; n < 8; ++n) {
      uint64_t value = rng.next();
      img.scribble(t.off + rng.below(t.len - 8) / 4 * 4, &value, 1 + rng.below(8));
    }
    for (const char* json : {"--json", ""}) {
      std::vector<std::string> args = {"info", img.path()};
      if (*json != '\0') args.push_back(json);
      CtlRun r = ctl(args);
      EXPECT_TRUE(r.rc == 0 || r.rc == 1) << "round " << round << ": exit " << r.rc << r.err;
      if (r.rc == 1) {
        EXPECT_FALSE(r.err.empty()) << "round " << round;
      }
    }
    CtlRun d = ctl({"dump", img.path(), "--lba", "0-3"});
    EXPECT_TRUE(d.rc == 0 || d.rc == 1) << "round " << round << ": exit " << d.rc << d.err;
  }
}

TEST(Ctl, DumpShowsTheMapEntryChangeAfterAWrite) {
  Image img("dump");
  Json j = img.info();
  const uint64_t lba = 9000;  // in the data area, never written by mkfs
  CtlRun r = ctl({"dump", img.path(), "--lba", std::to_string(lba), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Json d = parse(r);
  ASSERT_EQ(d["lbas"].size(), 1u);
  EXPECT_EQ(d["lbas"][0]["state"], "identity");
  EXPECT_EQ(d["lbas"][0]["raw"], 0);
  EXPECT_EQ(d["lbas"][0]["block"], lba);
  ASSERT_EQ(d["arenas"].size(), 1u);
  ASSERT_EQ(d["arenas"][0]["lanes"].size(), 256u);
  for (const Json& lane : d["arenas"][0]["lanes"]) EXPECT_FALSE(lane["current"].is_null());

  {
    RegionOptions ro;
    ro.force_persistent = true;  // direct: the write is on media when it returns
    auto region = Region::open(img.path(), ro);
    ASSERT_TRUE(region) << region.status().to_string();
    BttOpenOptions bo;
    bo.offset = j["header"]["btt"]["offset"];
    bo.size = j["header"]["btt"]["size"];
    bo.intent_log = j["header"]["intent_log"]["offset"].get<uint64_t>();
    auto btt = Btt::open(**region, bo);
    ASSERT_TRUE(btt) << btt.status().to_string();
    std::vector<char> sector(4096, 'z');
    ASSERT_TRUE((*btt)->write(lba, sector.data()));
  }
  r = ctl({"dump", img.path(), "--lba", std::to_string(lba - 1) + "-" + std::to_string(lba + 1),
           "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  d = parse(r);
  ASSERT_EQ(d["lbas"].size(), 3u);
  EXPECT_EQ(d["lbas"][0]["state"], "identity");
  EXPECT_EQ(d["lbas"][2]["state"], "identity");
  const Json& m = d["lbas"][1];
  EXPECT_EQ(m["lba"], lba);
  EXPECT_EQ(m["state"], "normal");
  EXPECT_EQ(m["zero"], true);
  EXPECT_EQ(m["error"], true);
  uint64_t block = m["block"];
  EXPECT_NE(block, lba) << "a write goes to the lane's free block, never in place";
  EXPECT_EQ(m["raw"].get<uint64_t>(), block | 0xC0000000u);
  // The lane that did it: its current entry records the update.
  int found = 0;
  for (const Json& lane : d["arenas"][0]["lanes"]) {
    if (lane["current"].is_null()) continue;
    const Json& cur = lane["slots"][lane["current"].get<int>()];
    if (cur["lba"] == lba && cur["new_map"] == block) {
      ++found;
      EXPECT_EQ(cur["old_map"], lba) << "the old block was the identity-mapped one";
      // The entry after the lane's other one in the sequence 1, 2, 3, 1: mkfs may have used
      // this lane before (a thread's lane follows its thread id), so not always 2.
      const Json& other = lane["slots"][1 - lane["current"].get<int>()];
      EXPECT_EQ(cur["seq"].get<int>(), other["seq"].get<int>() % 3 + 1) << lane.dump();
    }
  }
  EXPECT_EQ(found, 1);

  // The human form.
  r = ctl({"dump", img.path(), "--lba", std::to_string(lba)});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(has(r.out, "normal")) << r.out;
  char raw[16];
  std::snprintf(raw, sizeof raw, "0x%08x", unsigned(block | 0xC0000000u));
  EXPECT_TRUE(has(r.out, raw)) << r.out;
  EXPECT_TRUE(has(r.out, "arena 0 flog, slots 0 and 1")) << r.out;
  // --arena 0 names the same sector by its premap LBA.
  r = ctl({"dump", img.path(), "--lba", std::to_string(lba), "--arena", "0", "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse(r)["lbas"][0]["block"], block);
}

TEST(Ctl, DumpRefusesBadRanges) {
  Image img("ranges");
  CtlRun r = ctl({"dump", img.path(), "--lba", "0-1000000"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "at most 1000000")) << r.err;
  r = ctl({"dump", img.path(), "--lba", "10-5"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "FIRST <= LAST")) << r.err;
  r = ctl({"dump", img.path(), "--lba", "ten"});
  EXPECT_EQ(r.rc, 2);
  r = ctl({"dump", img.path(), "--lba", "15593"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "beyond the 15593 sectors")) << r.err;
  r = ctl({"dump", img.path(), "--lba", "0", "--arena", "1"});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "no readable arena 1")) << r.err;
  r = ctl({"dump", img.path()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "--lba")) << r.err;
}

TEST(Ctl, UsageErrors) {
  CtlRun r = ctl({});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "subcommand")) << r.err;
  r = ctl({"frob"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "unknown command 'frob'")) << r.err;
  r = ctl({"info"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "IMAGE")) << r.err;
  r = ctl({"status"});
  EXPECT_EQ(r.rc, 2);
  EXPECT_TRUE(has(r.err, "MOUNTPOINT")) << r.err;
  r = ctl({"--help"});
  EXPECT_EQ(r.rc, 0);
  for (const char* cmd : {"info", "dump", "status"}) EXPECT_TRUE(has(r.out, cmd)) << r.out;
  r = ctl({"dump", "--help"});
  EXPECT_EQ(r.rc, 0);
  EXPECT_TRUE(has(r.out, "--lba")) << r.out;
}

TEST(Ctl, StatusOfSomethingElse) {
  std::string dir = "/dev/shm/vpmfs-ctl-" + std::to_string(getpid()) + "-plain";
  ::mkdir(dir.c_str(), 0755);
  CtlRun r = ctl({"status", dir});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, dir + " is not a vpmfs mount")) << r.err;
  ::rmdir(dir.c_str());
  r = ctl({"status", dir});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(has(r.err, "cannot read the status of")) << r.err;
}

// needs daemon side: the FUSE daemon answers getxattr("user.vpmfs.status") on the mount's root
// with the JSON object README.md describes.
TEST(Ctl, StatusOfAMount) {
  Mount m("ctl-status");
  ASSERT_TRUE(m.mounted());
  CtlRun r = ctl({"status", m.dir(), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Json s = parse(r);
  EXPECT_EQ(s["mode"], "direct");  // the fixture mounts with force_persistent
  EXPECT_TRUE(s["mode_reason"].is_string());
  EXPECT_EQ(s["dax"], "inode");
  EXPECT_EQ(s["read_only"], false);
  EXPECT_EQ(s["failed"], false);
  EXPECT_EQ(s["last_error"], "");
  EXPECT_EQ(s["image"], m.image());
  EXPECT_TRUE(s["sync_dax"].is_string());
  ASSERT_TRUE(s["flush"].is_object());
  for (const char* k : {"requests", "device_flushes", "failed_flushes"}) {
    EXPECT_TRUE(s["flush"][k].is_number_unsigned()) << k;
  }
  EXPECT_TRUE(s["flush"]["requests_per_flush"].is_number());

  r = ctl({"status", m.dir()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(has(r.out, "persistence:")) << r.out;
  EXPECT_TRUE(has(r.out, "direct (")) << r.out;
  EXPECT_TRUE(has(r.out, "read-write")) << r.out;
  EXPECT_TRUE(has(r.out, m.image())) << r.out;
}

// needs daemon side, as above: a writeback mount reports its mode and counts its flushes.
TEST(Ctl, StatusOfAWritebackMount) {
  Mount m("ctl-status-wb", {"sync_dax=writeback"});
  ASSERT_TRUE(m.mounted());
  int fd = ::open(m.path("f").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  // 2 MiB in 4 KiB writes: 512 sector updates, more than half the 256 lanes of a 64 MiB image,
  // so at least one BTT epoch commits.
  std::vector<char> block(4096, 'v');
  for (int i = 0; i < 512; ++i) ASSERT_EQ(::write(fd, block.data(), block.size()), 4096);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  CtlRun r = ctl({"status", m.dir(), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Json s = parse(r);
  EXPECT_EQ(s["mode"], "writeback");
  EXPECT_GT(s["flush"]["flush_us"].get<double>(), 0.0) << "device flushes take time";
  EXPECT_TRUE(s["flush"]["clean_batches"].is_number_unsigned());
  EXPECT_GE(s["btt"]["epochs"].get<uint64_t>(), 1u);
  EXPECT_GT(s["btt"]["sectors_per_epoch"].get<double>(), 0.0);
  EXPECT_LE(s["btt"]["sectors_per_epoch"].get<double>(), 256.0) << "at most one per lane";
  EXPECT_EQ(s["sync_dax"], "writeback");
  EXPECT_GE(s["flush"]["requests"].get<uint64_t>(), 1u);
  EXPECT_GE(s["flush"]["device_flushes"].get<uint64_t>(), 1u);
  EXPECT_EQ(s["flush"]["failed_flushes"], 0);
  EXPECT_EQ(s["writeback_cache"], false);
  // An image on tmpfs is locked in memory as it is touched (-o mlock, the default).
  const bool tmpfs = s["mode_reason"].get<std::string>().find("tmpfs") != std::string::npos;
  EXPECT_EQ(s["memory"], tmpfs ? "locked as touched" : "") << s["mode_reason"];
  EXPECT_GE(s["commits"]["commits"].get<uint64_t>(), 1u);
  EXPECT_GE(s["commits"]["syncs"].get<uint64_t>(), 1u) << "the fsync was answered by a commit";
  // The file's creation and size were metadata to commit: the fsync's commit wrote the journal.
  EXPECT_GE(s["commits"]["journal_commits"].get<uint64_t>(), 1u);
  EXPECT_LE(s["commits"]["journal_commits"], s["commits"]["commits"]);
  EXPECT_GT(s["commits"]["commit_us"].get<double>(), 0.0) << "a commit with flushes takes time";
  EXPECT_GT(s["commits"]["answer_us"].get<double>(), 0.0) << "the fsync's reply takes time";
  // One fsyncing thread: no commit served a group, so none waited for one.
  EXPECT_EQ(s["commits"]["gather_us"].get<double>(), 0.0);
  r = ctl({"status", m.dir()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(has(r.out, "MAP_SYNC refused")) << r.out;
  EXPECT_TRUE(has(r.out, "fsyncs,")) << r.out;
  EXPECT_TRUE(has(r.out, "wrote the journal)")) << r.out;
  EXPECT_TRUE(has(r.out, "us answering its fsyncs and")) << r.out;
  EXPECT_TRUE(has(r.out, "us gathering the next group")) << r.out;
  EXPECT_TRUE(has(r.out, "us each)")) << r.out;
  EXPECT_TRUE(has(r.out, "sectors per epoch)")) << r.out;
  EXPECT_EQ(has(r.out, "image memory:   locked as touched"), tmpfs) << r.out;
}

// needs daemon side: -o nomlock leaves an image on tmpfs to reclaim, and status says nothing.
TEST(Ctl, StatusOfANomlockMount) {
  Mount m("ctl-status-nomlock", {"sync_dax=writeback", "nomlock"});
  ASSERT_TRUE(m.mounted());
  CtlRun r = ctl({"status", m.dir(), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse(r)["memory"], "");
  r = ctl({"status", m.dir()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_FALSE(has(r.out, "image memory")) << r.out;
}

// Concurrent fsyncs through the mount: a FUSE worker never sleeps on another thread's commit;
// a request that joins a commit in flight is answered from the commit that covers it. Every
// fsync is answered without waiting for the periodic commit (set far out here), several share
// a commit, and what they made durable is there after the daemon is killed. The threads stop
// one after another, so groups of fsyncs shrink and a commit gathering a group times out.
TEST(Ctl, ConcurrentFsyncsShareCommitsAndAreAllAnswered) {
  Mount m("ctl-fsync-group", {"sync_dax=writeback", "commit=600"});
  ASSERT_TRUE(m.mounted());
  constexpr int kThreads = 8;
  auto rounds = [](int t) { return 40 + 20 * t; };
  uint64_t total = 0;
  for (int t = 0; t < kThreads; ++t) total += uint64_t(rounds(t));
  auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  std::vector<int> failures(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int fd = ::open(m.path("f" + std::to_string(t)).c_str(), O_RDWR | O_CREAT, 0644);
      if (fd < 0) {
        ++failures[t];
        return;
      }
      std::string block(4096, '\0');
      for (int r = 0; r < rounds(t); ++r) {
        std::memset(block.data(), 'a' + r % 26, block.size());
        if (::pwrite(fd, block.data(), block.size(), off_t(r % 8) * 4096) != 4096) ++failures[t];
        if (::fsync(fd) != 0) ++failures[t];
      }
      ::close(fd);
    });
  }
  for (auto& th : threads) th.join();
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(std::count(failures.begin(), failures.end(), 0), kThreads);
  // A request left for a commit that nobody started would wait for the periodic one (600 s).
  EXPECT_LT(took, std::chrono::seconds(120)) << "an fsync waited for the periodic commit";
  CtlRun r = ctl({"status", m.dir(), "--json"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Json s = parse(r);
  uint64_t syncs = s["commits"]["syncs"].get<uint64_t>();
  EXPECT_GE(syncs, total);
  EXPECT_LT(s["commits"]["commits"].get<uint64_t>(), syncs) << "no two fsyncs shared a commit";
  m.kill_daemon();
  m.start();
  for (int t = 0; t < kThreads; ++t) {
    std::ifstream in(m.path("f" + std::to_string(t)), std::ios::binary);
    std::string got((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_EQ(got.size(), 8u * 4096) << "f" << t;
    for (int b = 0; b < 8; ++b) {
      // The last round that wrote block b.
      int last = rounds(t) - 1 - (rounds(t) - 1 - b) % 8;
      EXPECT_EQ(got[std::size_t(b) * 4096], char('a' + last % 26)) << "f" << t << " block " << b;
    }
  }
}

}  // namespace
}  // namespace vpmfs
