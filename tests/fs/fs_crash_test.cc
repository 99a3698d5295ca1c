// Crash tests for the filesystem: a file workload (create, write, fsync, rename over an existing
// file, unlink) recorded by the crash simulator and crashed at many points in both crash
// models. After each crash the volume must mount on its own, every fsync'd file must hold its
// fsync'd content, and a rename must be all done or not done.
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>

#include <gtest/gtest.h>

#include "test_util.h"
#include "vpmfs/crash_sim.h"
#include "vpmfs/fs.h"
#include "vpmfs/fsck.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::TempPath;

uint64_t scale() {
  const char* s = std::getenv("VPMFS_CRASH_SCALE");
  return s != nullptr ? std::max<uint64_t>(1, std::strtoull(s, nullptr, 10)) : 1;
}

std::string content(uint64_t version, std::size_t size) {
  std::string s(size, '\0');
  SplitMix64 rng(version);
  for (auto& c : s) c = char('a' + rng.below(26));
  return s;
}

std::string name(char prefix, int i) {
  std::string s(1, prefix);
  s += std::to_string(i);
  return s;
}

struct FileFact {
  std::string content;
  std::size_t synced;              // events by which it is durable
  std::size_t removed = SIZE_MAX;  // events before its unlink started
  std::size_t removed_synced = SIZE_MAX;
};

struct TargetVersion {
  std::string content;
  std::size_t started;  // events before the rename started
  std::size_t synced;   // events by which the rename is durable
};

struct Recording {
  std::unique_ptr<CrashRecorder> recorder;
  std::map<std::string, FileFact> files;
  std::vector<TargetVersion> target;
};

Recording record(const std::string& path, PersistMode mode, int phases, uint64_t seed) {
  MountOptions mo;
  mo.mode = mode;
  mo.force_persistent = true;
  auto v = std::move(Volume::mount(path, mo).value());
  Recording rec;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  CrashRecorder& r = *rec.recorder;
  SplitMix64 rng(seed);
  auto write_file = [&](uint64_t dir, const std::string& n, const std::string& data) {
    auto a = v->mknod(dir, n, S_IFREG | 0644, 0, 0, 0);
    EXPECT_TRUE(a) << a.status().to_string();
    EXPECT_TRUE(v->write(a->ino, 0, data.data(), data.size()));
  };
  for (int p = 0; p < phases; ++p) {
    std::string f = name('f', p);
    std::string data = content(seed * 1000 + p, 1 + rng.below(9000));
    write_file(kRootIno, f, data);
    EXPECT_TRUE(v->sync_wait());
    rec.files[f] = FileFact{data, r.events()};
    if (p % 3 == 2) {
      // Replace "target" atomically: write a new file, sync it, rename it over.
      std::string t = name('t', p);
      std::string tdata = content(seed * 7000 + p, 1 + rng.below(6000));
      write_file(kRootIno, t, tdata);
      EXPECT_TRUE(v->sync_wait());
      std::size_t started = r.events();
      EXPECT_TRUE(v->rename(kRootIno, t, kRootIno, "target", 0));
      EXPECT_TRUE(v->sync_wait());
      rec.target.push_back(TargetVersion{tdata, started, r.events()});
    }
    if (p % 4 == 3) {
      std::string old = name('f', p - 2);
      rec.files[old].removed = r.events();
      EXPECT_TRUE(v->unlink(kRootIno, old));
      EXPECT_TRUE(v->sync_wait());
      rec.files[old].removed_synced = r.events();
    }
  }
  rec.recorder->detach();
  return rec;
}

std::optional<std::string> read_all(Volume& v, const std::string& n, std::string* error) {
  auto a = v.lookup(kRootIno, n);
  if (!a) {
    if (a.status().error() != ENOENT) *error = n + ": " + a.status().to_string();
    return std::nullopt;
  }
  std::string data(a->size, '\0');
  auto got = v.read(a->ino, 0, data.data(), data.size());
  if (!got || *got != a->size) *error = n + ": short read";
  return data;
}

std::string verify(const std::string& crashed, const Recording& rec, std::size_t cut) {
  MountOptions mo;
  mo.mode = PersistMode::direct;
  mo.force_persistent = true;
  std::string failure;
  {
    auto v = Volume::mount(crashed, mo);
    if (!v) return "mount failed: " + v.status().to_string();
    for (const auto& [n, fact] : rec.files) {
      auto data = read_all(**v, n, &failure);
      if (!failure.empty()) return failure;
      bool must_exist = fact.synced <= cut && fact.removed >= cut;
      bool must_be_gone = fact.removed_synced <= cut;
      if (must_exist && !data) return n + " was fsync'd and is missing";
      if (must_be_gone && data) return n + " was removed and synced but is back";
      if (data && fact.synced <= cut && *data != fact.content) return n + " lost fsync'd content";
    }
    auto target = read_all(**v, "target", &failure);
    if (!failure.empty()) return failure;
    const TargetVersion* durable = nullptr;
    for (const auto& t : rec.target) {
      if (t.synced <= cut) durable = &t;
    }
    if (durable != nullptr && !target) return "target vanished after a synced rename";
    if (target) {
      bool whole = false;
      for (const auto& t : rec.target) {
        if (t.started < cut && *target == t.content && (durable == nullptr || &t >= durable)) {
          whole = true;
        }
      }
      if (!whole) return "target holds content no completed or pending rename gave it";
    }
  }
  auto report = fsck(crashed, FsckOptions{});
  if (!report) return "fsck failed: " + report.status().to_string();
  if (!report->problems.empty()) return "fsck: " + report->problems.front();
  return "";
}

uint64_t crash_points(PersistMode mode, CrashModel model, int phases, uint64_t stride,
                      uint64_t seeds, uint64_t seed) {
  TempPath path("fscrash-src.img");
  TempPath crashed("fscrash-dst.img");
  MkfsOptions mk;
  mk.size = 20 << 20;
  mk.force_persistent = true;
  mk.lanes = 64;
  EXPECT_TRUE(Volume::mkfs(path, mk));
  Recording rec = record(path, mode, phases, seed);
  CrashReplay replay(*rec.recorder, model);
  uint64_t points = 0;
  std::vector<std::byte> image(rec.recorder->region_size());
  int fd = ::open(crashed.str().c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 0;
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  for (std::size_t cut = 0; cut <= rec.recorder->events(); cut += stride) {
    replay.advance_to(cut);
    for (uint64_t k = 0; k < seeds; ++k) {
      uint64_t s = seed * 7919 + cut * 13 + k;
      replay.image_into(s, image.data());
      // Rewritten in place: truncating and refilling a 20 MiB file per point costs more.
      if (::pwrite(fd, image.data(), image.size(), 0) != ssize_t(image.size())) {
        ADD_FAILURE() << "cannot write the crash image";
        return points;
      }
      std::string failure = verify(crashed, rec, cut);
      ++points;
      if (!failure.empty()) {
        ADD_FAILURE() << to_string(model) << " crash at cut " << cut << " of "
                      << rec.recorder->events() << " (seed " << s << "): " << failure;
        return points;
      }
    }
  }
  return points;
}

TEST(FsCrash, DirectModel) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_points(PersistMode::direct, CrashModel::direct, 16, 3, 1, 3 + run);
  }
  std::printf("direct model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 1000u * scale());
}

TEST(FsCrash, WritebackModel) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_points(PersistMode::writeback, CrashModel::writeback, 16, 3, 1, 5 + run);
  }
  std::printf("writeback model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 1000u * scale());
}

}  // namespace
}  // namespace vpmfs
