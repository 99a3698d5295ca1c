// Crash tests for the filesystem: a file workload (create, write, fsync, rename over an existing
// file, unlink) recorded by the crash simulator and crashed at many points in both crash
// models. After each crash the volume must mount on its own, every fsync'd file must hold its
// fsync'd content, and a rename must be all done or not done.
#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <dirent.h>
#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <set>

#include <gtest/gtest.h>

#include "test_util.h"
#include "vpmfs/crash_sim.h"
#include "vpmfs/fs.h"
#include "vpmfs/fsck.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::TempPath;

// The boot the workloads run in, and another one: a power failure reboots, so the kill log of
// the workload's boot must never be replayed after one.
constexpr std::array<uint8_t, 16> kWorkloadBoot{0x11, 0x22};
constexpr std::array<uint8_t, 16> kRebootedBoot{0x33, 0x44};

uint64_t scale() {
  const char* s = std::getenv("VPMFS_CRASH_SCALE");
  return s != nullptr ? std::max<uint64_t>(1, std::strtoull(s, nullptr, 10)) : 1;
}

// How a workload mounts its volume: in the boot its kill log belongs to.
MountOptions workload_options(PersistMode mode) {
  MountOptions mo;
  mo.mode = mode;
  mo.force_persistent = true;
  mo.boot_id = kWorkloadBoot;
  return mo;
}

// How a crash image is mounted for its check: after a reboot, which ignores the kill log.
MountOptions rebooted_options() {
  MountOptions mo;
  mo.mode = PersistMode::direct;
  mo.force_persistent = true;
  mo.boot_id = kRebootedBoot;
  return mo;
}

// A fresh 20 MiB volume for a workload.
void make_volume(const std::string& path, uint32_t sector_size = 4096) {
  MkfsOptions mk;
  mk.size = 20 << 20;
  mk.force_persistent = true;
  mk.lanes = 64;
  mk.sector_size = sector_size;
  ASSERT_TRUE(Volume::mkfs(path, mk));
}

// What fsck finds wrong with a crashed image after its mount, or "" if nothing.
std::string fsck_problem(const std::string& image, const std::array<uint8_t, 16>& boot) {
  FsckOptions fo;
  fo.boot_id = boot;
  auto report = fsck(image, fo);
  if (!report) return "fsck failed: " + report.status().to_string();
  if (!report->problems.empty()) return "fsck: " + report->problems.front();
  return "";
}

// fsck -n straight on a crash image, before any mount: it judges the volume as the next mount
// will see it (BTT updates rolled forward, journal and kill log replayed, in memory), so the
// normal state after a crash is no problem. Changes nothing, so the mount after it sees the
// same image.
std::string raw_fsck_problem(const std::string& image, const std::array<uint8_t, 16>& boot) {
  std::string p = fsck_problem(image, boot);
  return p.empty() ? p : "on the raw crash image, " + p;
}

// The file crash images are checked in, rewritten in place for each: truncating and refilling
// a 20 MiB file per point costs more.
class CrashImageFile {
 public:
  explicit CrashImageFile(const std::string& path)
      : fd_(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) {}
  ~CrashImageFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool write(const void* data, std::size_t size) {
    return fd_ >= 0 && ::pwrite(fd_, data, size, 0) == ssize_t(size);
  }

 private:
  int fd_;
};

// Crashes a recording under `model` every `stride` events and at its end, `seeds` images each,
// into `crashed`; verify(cut) says what is wrong ("" if nothing). Stops at the first failure.
// Returns the points checked.
uint64_t crash_at_points(const CrashRecorder& recorder, CrashModel model, std::size_t stride,
                         uint64_t seeds, uint64_t seed, const std::string& crashed,
                         const std::function<std::string(std::size_t)>& verify) {
  CrashReplay replay(recorder, model);
  std::vector<std::byte> image(recorder.region_size());
  CrashImageFile file(crashed);
  const std::size_t total = recorder.events();
  uint64_t points = 0;
  for (std::size_t cut = 0; cut <= total + stride - 1; cut += stride) {
    std::size_t at = std::min(cut, total);  // the end, too: everything synced
    replay.advance_to(at);
    for (uint64_t k = 0; k < seeds; ++k) {
      uint64_t s = seed * 7919 + at * 13 + k;
      replay.image_into(s, image.data());
      if (!file.write(image.data(), image.size())) {
        ADD_FAILURE() << "cannot write the crash image";
        return points;
      }
      std::string failure = verify(at);
      ++points;
      if (!failure.empty()) {
        ADD_FAILURE() << to_string(model) << " crash at cut " << at << " of " << total << " (seed "
                      << s << "): " << failure;
        return points;
      }
    }
  }
  return points;
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
  std::size_t named = SIZE_MAX;    // events by which its name is (-o dirsync, -o sync)
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

// What makes the workload's calls durable: its sync_wait calls, or the volume itself, mounted
// -o sync (nothing calls sync_wait; each call is durable the moment it returns) or -o dirsync
// (creates, renames and unlinks are durable when they return; file data needs the syncs).
enum class Durability { syncs, sync_mount, dirsync_mount };

Recording record(const std::string& path, PersistMode mode, int phases, uint64_t seed,
                 Durability durability = Durability::syncs) {
  MountOptions mo = workload_options(mode);
  mo.sync = durability == Durability::sync_mount;
  mo.dirsync = durability == Durability::dirsync_mount;
  auto v = std::move(Volume::mount(path, mo).value());
  Recording rec;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  CrashRecorder& r = *rec.recorder;
  SplitMix64 rng(seed);
  // The event count by which what the calls so far did is durable.
  auto synced = [&] {
    if (durability != Durability::sync_mount) {
      EXPECT_TRUE(v->sync_wait());
    }
    return r.events();
  };
  // The same for a call that changed a directory's entries, right after it returned.
  auto entry_synced = [&] { return durability == Durability::syncs ? synced() : r.events(); };
  // Returns the event count by which the name is durable (SIZE_MAX: only with the next sync).
  auto write_file = [&](uint64_t dir, const std::string& n, const std::string& data) {
    auto a = v->mknod(dir, n, S_IFREG | 0644, 0, 0, 0);
    EXPECT_TRUE(a) << a.status().to_string();
    std::size_t named = durability == Durability::syncs ? SIZE_MAX : r.events();
    EXPECT_TRUE(v->write(a->ino, 0, data.data(), data.size()));
    return named;
  };
  for (int p = 0; p < phases; ++p) {
    std::string f = name('f', p);
    std::string data = content(seed * 1000 + p, 1 + rng.below(9000));
    std::size_t named = write_file(kRootIno, f, data);
    rec.files[f] = FileFact{data, synced()};
    rec.files[f].named = named;
    if (p % 3 == 2) {
      // Replace "target" atomically: write a new file, sync it, rename it over.
      std::string t = name('t', p);
      std::string tdata = content(seed * 7000 + p, 1 + rng.below(6000));
      write_file(kRootIno, t, tdata);
      std::size_t started = synced();
      EXPECT_TRUE(v->rename(kRootIno, t, kRootIno, "target", 0));
      rec.target.push_back(TargetVersion{tdata, started, entry_synced()});
    }
    if (p % 4 == 3) {
      std::string old = name('f', p - 2);
      rec.files[old].removed = r.events();
      EXPECT_TRUE(v->unlink(kRootIno, old));
      rec.files[old].removed_synced = entry_synced();
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
  if (std::string raw = raw_fsck_problem(crashed, kRebootedBoot); !raw.empty()) return raw;
  MountOptions mo = rebooted_options();
  std::string failure;
  {
    auto v = Volume::mount(crashed, mo);
    if (!v) return "mount failed: " + v.status().to_string();
    for (const auto& [n, fact] : rec.files) {
      auto data = read_all(**v, n, &failure);
      if (!failure.empty()) return failure;
      bool must_exist = std::min(fact.synced, fact.named) <= cut && fact.removed >= cut;
      bool must_be_gone = fact.removed_synced <= cut;
      if (must_exist && !data) {
        return n + (fact.synced <= cut ? " was fsync'd" : "'s create returned (dirsync)") +
               " and is missing";
      }
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
  return fsck_problem(crashed, kRebootedBoot);
}

// --- large truncates and deletes ----------------------------------------------------------
// Freeing many blocks takes many transactions. A crash between them must leave the file cut
// (or deleted) as the call asked, or untouched, and the next mount finishes what was begun:
// fsck clean, no block leaked, and a file grown again after the crash reads zeros past the cut.

struct CutRecording {
  std::unique_ptr<CrashRecorder> recorder;
  std::string big;             // "big" before its truncate
  uint64_t cut_to = 0;         // its size after
  std::string gone;            // "gone", unlinked
  std::size_t cut_synced = 0;  // events by which both calls are durable
};

CutRecording record_cuts(const std::string& path, PersistMode mode, uint64_t seed) {
  MountOptions mo = workload_options(mode);
  mo.max_transaction_blocks = 6;  // a commit every few pieces
  mo.cache_blocks = 16;           // and the metadata cache dropped after each
  auto v = std::move(Volume::mount(path, mo).value());
  CutRecording rec;
  rec.big = content(seed, 3 << 20);
  rec.gone = content(seed + 1, 2 << 20);
  rec.cut_to = 100 * 1000 + seed % 4096;
  auto big = v->mknod(kRootIno, "big", S_IFREG | 0644, 0, 0, 0);
  auto gone = v->mknod(kRootIno, "gone", S_IFREG | 0644, 0, 0, 0);
  EXPECT_TRUE(big && gone);
  EXPECT_TRUE(v->write(big->ino, 0, rec.big.data(), rec.big.size()));
  EXPECT_TRUE(v->write(gone->ino, 0, rec.gone.data(), rec.gone.size()));
  // Mounted again before recording: the recorder copies the image and then sees every store,
  // so nothing may store in between, and in writeback mode sync_wait can return while a BTT
  // commit that the writes started is still storing map entries on the flush channel's thread
  // (a map entry stored between the copy and the attach would be in neither). An unmount
  // finishes every commit and stops every thread.
  EXPECT_TRUE(v->sync_wait());
  v.reset();
  v = std::move(Volume::mount(path, mo).value());
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  SetAttr c;
  c.size = rec.cut_to;
  EXPECT_TRUE(v->setattr(big->ino, c));
  EXPECT_TRUE(v->unlink(kRootIno, "gone"));
  EXPECT_TRUE(v->sync_wait());
  rec.cut_synced = rec.recorder->events();
  rec.recorder->detach();
  return rec;
}

std::string verify_cuts(const std::string& crashed, const CutRecording& rec, std::size_t cut) {
  if (std::string raw = raw_fsck_problem(crashed, kRebootedBoot); !raw.empty()) return raw;
  MountOptions mo = rebooted_options();
  std::string failure;
  {
    auto v = Volume::mount(crashed, mo);
    if (!v) return "mount failed: " + v.status().to_string();
    auto big = read_all(**v, "big", &failure);
    if (!failure.empty()) return failure;
    if (!big) return "big is missing";
    bool whole = *big == rec.big;
    bool was_cut = *big == rec.big.substr(0, rec.cut_to);
    if (!whole && !was_cut) {
      std::size_t diff = 0;
      while (diff < big->size() && diff < rec.big.size() && (*big)[diff] == rec.big[diff]) ++diff;
      return "big is neither whole nor cut (size " + std::to_string(big->size()) +
             ", differs from byte " + std::to_string(diff) + ")";
    }
    if (cut >= rec.cut_synced && !was_cut) return "big was cut and synced, but is whole";
    auto gone = read_all(**v, "gone", &failure);
    if (!failure.empty()) return failure;
    if (gone && *gone != rec.gone) return "gone is back with other content";
    if (gone && cut >= rec.cut_synced) return "gone was unlinked and synced, but is back";
    // Grown again, the cut file reads zeros past its cut: no block from before survived there.
    if (was_cut) {
      auto a = (*v)->lookup(kRootIno, "big");
      SetAttr grow;
      grow.size = rec.big.size();
      if (!(*v)->setattr(a->ino, grow)) return "cannot grow big again";
      auto grown = read_all(**v, "big", &failure);
      if (!grown || grown->find_first_not_of('\0', rec.cut_to) != std::string::npos) {
        return "big grown again shows old data past its cut";
      }
    }
  }
  return fsck_problem(crashed, kRebootedBoot);
}

// Crashes a recording at `wanted` x scale points: spread over its events, and where there are
// fewer events than that, several crash images (seeds) at each. Says how many, `what` they hit.
void crash_spread(const CrashRecorder& recorder, CrashModel model, uint64_t wanted, uint64_t seed,
                  const std::string& crashed, const char* what,
                  const std::function<std::string(std::size_t)>& verify) {
  const std::size_t events = recorder.events();
  const std::size_t stride = std::max<std::size_t>(1, events / (wanted * scale()));
  const uint64_t seeds = std::max<uint64_t>(1, (wanted * scale() + events) / (events + 1));
  uint64_t points = crash_at_points(recorder, model, stride, seeds, seed, crashed, verify);
  std::printf("%s model: %llu crash points %s\n", to_string(model), (unsigned long long)points,
              what);
  EXPECT_GE(points, wanted * scale());
}

// Records a workload on a fresh volume and crashes it as crash_spread does. Its image files are
// named after `name`.
template <typename Recording>
void record_and_crash(const std::string& name, uint32_t sector_size, PersistMode mode,
                      CrashModel model, uint64_t seed, uint64_t wanted, const char* what,
                      Recording (*record)(const std::string&, PersistMode, uint64_t),
                      std::string (*verify)(const std::string&, const Recording&, std::size_t)) {
  TempPath path(name + "-src.img");
  TempPath crashed(name + "-dst.img");
  make_volume(path, sector_size);
  Recording rec = record(path, mode, seed);
  crash_spread(*rec.recorder, model, wanted, seed, crashed, what,
               [&](std::size_t cut) { return verify(crashed, rec, cut); });
}

void crash_cuts(PersistMode mode, CrashModel model, uint64_t seed) {
  // 512-byte sectors: more pieces, more transactions.
  record_and_crash("fscut", 512, mode, model, seed, 100, "in large cuts and deletes", record_cuts,
                   verify_cuts);
}

TEST(FsCrash, LargeCutsAndDeletesDirectModel) {
  crash_cuts(PersistMode::direct, CrashModel::direct, 61);
}

TEST(FsCrash, LargeCutsAndDeletesWritebackModel) {
  crash_cuts(PersistMode::writeback, CrashModel::writeback, 67);
}

// --- a killed daemon ---------------------------------------------------------------------------
// SIGKILL keeps every store the process made (the page cache has them): the crash image is a
// prefix of the stores. Nothing is fsync'd and nothing commits on its own, so only the kill log
// can bring the acknowledged changes back. After the kill, the volume must hold the state after
// the last call that returned, or after the one in flight.

// name -> content ("/" for a directory, "%" for a whiteout: a character device 0/0)
using Tree = std::map<std::string, std::string>;

Tree tree_of(Volume& v, std::string* error) {
  std::vector<DirEntry> entries;
  Status s = v.readdir(kRootIno, 0, [&](const DirEntry& e) {
    if (e.name != "." && e.name != "..") entries.push_back(e);
    return true;
  });
  if (!s) *error = "readdir: " + s.to_string();
  Tree t;
  for (const auto& e : entries) {
    if (e.type == DT_CHR) {
      auto a = v.getattr(e.ino);
      t[e.name] = a && a->mode == S_IFCHR && a->rdev == 0 ? "%" : "<bad device>";
    } else {
      t[e.name] = e.type == DT_DIR ? "/" : read_all(v, e.name, error).value_or("<unreadable>");
    }
  }
  return t;
}

// A write in flight may be torn between blocks (each block is atomic): every 4 KiB block of
// the one file it changes holds its old or its new content, and the size is old or new.
bool torn_write(const Tree& got, const Tree& before, const Tree& after) {
  if (got.size() != after.size()) return false;
  for (const auto& [n, data] : got) {
    auto b = before.find(n);
    auto a = after.find(n);
    if (a == after.end()) return false;
    if (data == a->second || (b != before.end() && data == b->second)) continue;
    if (b == before.end() || (data.size() != a->second.size() && data.size() != b->second.size())) {
      return false;
    }
    for (std::size_t off = 0; off < data.size(); off += 4096) {
      std::string piece = data.substr(off, 4096);
      std::string old_piece = off < b->second.size() ? b->second.substr(off, 4096) : "";
      old_piece.resize(piece.size(), '\0');
      if (piece != a->second.substr(off, piece.size()) && piece != old_piece) return false;
    }
  }
  return true;
}

struct KillRecording {
  std::unique_ptr<CrashRecorder> recorder;
  std::vector<std::pair<std::size_t, Tree>> states;  // events when a call returned, state after
  int whiteouts = 0;                                 // renames that left one
};

KillRecording record_kill_workload(const std::string& path, PersistMode mode, int calls,
                                   uint64_t seed) {
  MountOptions mo = workload_options(mode);
  mo.commit_interval_ms = 3600 * 1000;  // only the calls below commit
  mo.cache_blocks = 16;                 // metadata read back from the BTT after each commit
  auto v = std::move(Volume::mount(path, mo).value());
  KillRecording rec;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  SplitMix64 rng(seed);
  Tree model;
  rec.states.emplace_back(0, model);
  for (int c = 0; c < calls; ++c) {
    std::string n = name('k', int(rng.below(6)));
    switch (rng.below(6)) {
      case 0:
      case 1: {  // create or overwrite, growing across blocks
        // Sometimes large enough that unlinking it frees the blocks in pieces.
        std::string data =
            content(seed * 100 + c, 1 + rng.below(rng.below(4) == 0 ? 400000 : 12000));
        auto a = v->lookup(kRootIno, n);
        if (!a && model.count(n) == 0) {
          a = v->mknod(kRootIno, n, S_IFREG | 0644, 0, 0, 0);
          if (!a) break;
          model[n] = "";  // the create is a call of its own
          rec.states.emplace_back(rec.recorder->events(), model);
        }
        if (!a || !S_ISREG(a->mode)) break;
        EXPECT_TRUE(v->write(a->ino, 0, data.data(), data.size()));
        std::string& m = model[n];
        if (m.size() < data.size()) m.resize(data.size());
        m.replace(0, data.size(), data);
        break;
      }
      case 2:
        if (model.count(n) != 0 && model[n] != "/" && v->unlink(kRootIno, n)) model.erase(n);
        break;
      case 3: {  // a rename over another file, half of them leaving a whiteout behind
        std::string to = name('k', int(rng.below(6)));
        uint32_t flags = rng.below(2) == 0 ? RENAME_WHITEOUT : 0;
        if (model.count(n) != 0 && model[n] != "/" && model.count(to) != 0 && model[to] != "/" &&
            n != to && v->rename(kRootIno, n, kRootIno, to, flags)) {
          model[to] = model[n];
          if (flags == 0) {
            model.erase(n);
          } else {
            model[n] = "%";
            ++rec.whiteouts;
          }
        }
        break;
      }
      case 4:
        if (model.count(n) == 0 && v->mkdir(kRootIno, n, 0755, 0, 0)) model[n] = "/";
        break;
      case 5:
        if (rng.below(3) == 0) {
          EXPECT_TRUE(v->sync_wait());  // a commit in between
        }
        break;
    }
    rec.states.emplace_back(rec.recorder->events(), model);
  }
  rec.recorder->detach();
  return rec;
}

TEST(FsCrash, KilledDaemonLosesNothingAcknowledged) {
  uint64_t points = 0;
  int whiteouts = 0;
  for (PersistMode mode : {PersistMode::direct, PersistMode::writeback}) {
    for (uint64_t run = 0; run < scale(); ++run) {
      TempPath path("fskill-src.img");
      TempPath crashed("fskill-dst.img");
      make_volume(path);
      KillRecording rec = record_kill_workload(path, mode, 60, 11 + run);
      whiteouts += rec.whiteouts;
      std::size_t total = rec.recorder->events();
      std::size_t stride = std::max<std::size_t>(1, total / 150);
      for (std::size_t cut = 0; cut <= total; cut += stride) {
        auto image = rec.recorder->prefix_image(cut);
        ASSERT_TRUE(CrashImageFile(crashed).write(image.data(), image.size()));
        // The last call that returned before the kill, and the one in flight.
        std::size_t done = 0;
        while (done + 1 < rec.states.size() && rec.states[done + 1].first <= cut) ++done;
        ASSERT_EQ(raw_fsck_problem(crashed, kWorkloadBoot), "") << "cut " << cut;
        std::string failure;
        {
          MountOptions mo;
          mo.mode = PersistMode::direct;
          mo.force_persistent = true;
          mo.boot_id = kWorkloadBoot;
          auto v = Volume::mount(crashed, mo);
          ASSERT_TRUE(v) << "cut " << cut << ": " << v.status().to_string();
          Tree got = tree_of(**v, &failure);
          ASSERT_EQ(failure, "") << "cut " << cut;
          const Tree& before = rec.states[done].second;
          const Tree& after = done + 1 < rec.states.size() ? rec.states[done + 1].second : before;
          bool ok = got == before || got == after || torn_write(got, before, after);
          for (const auto& [n, data] : got) {
            if (!ok && before.count(n) != 0 && before.at(n) != data) {
              std::printf("%s: %zu bytes, before %zu, after %zu\n", n.c_str(), data.size(),
                          before.at(n).size(), after.count(n) ? after.at(n).size() : 0);
            }
          }
          ASSERT_TRUE(ok) << to_string(mode) << " kill at event " << cut << " of " << total
                          << ": the volume lost a change acknowledged before the kill ("
                          << got.size() << " names, expected " << rec.states[done].second.size()
                          << ")";
        }
        ASSERT_EQ(fsck_problem(crashed, kWorkloadBoot), "") << "cut " << cut;
        ++points;
      }
    }
  }
  std::printf("kill model: %llu kill points, %d renames leaving a whiteout\n",
              (unsigned long long)points, whiteouts);
  EXPECT_GT(whiteouts, 0) << "the workloads should leave whiteouts";
  EXPECT_GE(points, 200u * scale());
}

uint64_t crash_points(PersistMode mode, CrashModel model, int phases, uint64_t stride,
                      uint64_t seeds, uint64_t seed, Durability durability = Durability::syncs) {
  TempPath path("fscrash-src.img");
  TempPath crashed("fscrash-dst.img");
  make_volume(path);
  Recording rec = record(path, mode, phases, seed, durability);
  return crash_at_points(*rec.recorder, model, stride, seeds, seed, crashed,
                         [&](std::size_t cut) { return verify(crashed, rec, cut); });
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
    // More phases than the direct model's: a sync is one flush here, so a phase records fewer
    // events (and crash points).
    points += crash_points(PersistMode::writeback, CrashModel::writeback, 22, 3, 1, 5 + run);
  }
  std::printf("writeback model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 1000u * scale());
}

// Mounted -o sync, with no sync_wait anywhere: every file is as durable when its write returns,
// and every rename and unlink when it returns, as the workload above makes them with its syncs.
TEST(FsCrash, SyncMountKeepsWhatEveryCallReturned) {
  uint64_t writeback = 0;
  uint64_t direct = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    writeback += crash_points(PersistMode::writeback, CrashModel::writeback, 12, 2, 1, 7 + run,
                              Durability::sync_mount);
    direct += crash_points(PersistMode::direct, CrashModel::direct, 14, 3, 1, 9 + run,
                           Durability::sync_mount);
  }
  std::printf("mounted -o sync: %llu writeback and %llu direct crash points\n",
              (unsigned long long)writeback, (unsigned long long)direct);
  EXPECT_GE(writeback, 1000u * scale());
  EXPECT_GE(direct, 1000u * scale());
}

// Mounted -o dirsync: a file's name is there from the moment its create returned (its content
// only after the sync that follows), and a rename or unlink is durable when it returns.
TEST(FsCrash, DirsyncMountKeepsEveryReturnedEntryChange) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += crash_points(PersistMode::writeback, CrashModel::writeback, 16, 2, 1, 11 + run,
                           Durability::dirsync_mount);
  }
  std::printf("writeback model, mounted -o dirsync: %llu crash points\n",
              (unsigned long long)points);
  EXPECT_GE(points, 1000u * scale());
}

// --- extended attributes, fallocate and punched holes --------------------------------------------
// A workload of setxattr and removexattr, writes, fallocate in every mode and punched holes,
// with a sync now and then. Every call changes its metadata in one transaction, and data a
// block at a time, so after a crash each file must be in a state the calls could have left
// from its last durable version on: its size and its attributes those after one of those
// calls, each block's content that of one of them. And fsck must find nothing wrong.

struct FileVersion {
  std::size_t started;            // events before the call that made it began
  std::size_t synced = SIZE_MAX;  // events by which it is durable
  std::string data;               // content (its length is the size)
  std::map<std::string, std::string> xattrs;
  std::size_t returned = SIZE_MAX;  // events when the call returned (a kill keeps it from then)
};

struct XattrRecording {
  std::unique_ptr<CrashRecorder> recorder;
  std::map<std::string, std::vector<FileVersion>> files;
};

XattrRecording record_xattr_workload(const std::string& path, PersistMode mode, int calls,
                                     uint64_t seed, bool only_syncs_commit = false) {
  MountOptions mo = workload_options(mode);
  if (only_syncs_commit) mo.commit_interval_ms = 3600 * 1000;
  auto v = std::move(Volume::mount(path, mo).value());
  XattrRecording rec;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  CrashRecorder& r = *rec.recorder;
  SplitMix64 rng(seed);
  const uint64_t bs = v->block_size();
  std::map<std::string, uint64_t> inos;
  auto sync = [&] {
    EXPECT_TRUE(v->sync_wait());
    for (auto& [n, versions] : rec.files) {
      for (auto& ver : versions) ver.synced = std::min(ver.synced, r.events());
    }
  };
  for (int c = 0; c < calls; ++c) {
    std::string n = name('x', int(rng.below(3)));
    std::size_t started = r.events();
    if (inos.count(n) == 0) {
      auto a = v->mknod(kRootIno, n, S_IFREG | 0644, 0, 0, 0);
      EXPECT_TRUE(a) << a.status().to_string();
      if (!a) break;
      inos[n] = a->ino;
      rec.files[n].push_back(FileVersion{started, SIZE_MAX, "", {}, r.events()});
      continue;
    }
    FileVersion next = rec.files[n].back();
    next.started = started;
    next.synced = SIZE_MAX;
    std::string& d = next.data;
    uint64_t ino = inos[n];
    // Now and then far out, so that cutting the file back frees more blocks than one step may.
    uint64_t off =
        rng.below((rng.below(6) == 0 ? 160 : 24) * bs) + (rng.below(2) == 0 ? 0 : rng.below(bs));
    uint64_t len = 1 + rng.below((rng.below(8) == 0 ? 100 : 6) * bs);
    switch (rng.below(10)) {
      case 0:
      case 1: {  // a write
        std::string data = content(seed * 1000 + c, len);
        EXPECT_TRUE(v->write(ino, off, data.data(), data.size()));
        if (d.size() < off + len) d.resize(off + len, '\0');
        d.replace(off, len, data);
        break;
      }
      case 2: {  // set an attribute, new or replaced: small, most of a block, or a chain of them
        std::string key = rng.below(2) == 0 ? "user.a" : "security.b";
        const uint64_t sizes[] = {1 + rng.below(40), 1000 + rng.below(1500),
                                  5000 + rng.below(7000)};
        std::string value = content(seed * 3000 + c, sizes[rng.below(3)]);
        Status s = v->setxattr(ino, key, value.data(), value.size(), 0);
        if (s) {
          next.xattrs[key] = value;
        } else {
          EXPECT_EQ(s.error(), ENOSPC) << s.to_string();
          continue;
        }
        break;
      }
      case 3: {
        std::string key = rng.below(2) == 0 ? "user.a" : "security.b";
        Status s = v->removexattr(ino, key);
        EXPECT_EQ(s.error(), next.xattrs.count(key) != 0 ? 0 : ENODATA);
        next.xattrs.erase(key);
        if (!s) continue;
        break;
      }
      case 4:  // allocate, growing the file
        EXPECT_TRUE(v->fallocate(ino, 0, off, len));
        if (d.size() < off + len) d.resize(off + len, '\0');
        break;
      case 5:  // preallocate past the end
        EXPECT_TRUE(v->fallocate(ino, FALLOC_FL_KEEP_SIZE, d.size(), len));
        break;
      case 6:
      case 7:  // punch a hole
        EXPECT_TRUE(v->fallocate(ino, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len));
        if (off < d.size()) std::fill_n(d.begin() + off, std::min(len, d.size() - off), '\0');
        break;
      case 8: {  // zero a range, growing the file or not
        bool keep = rng.below(2) == 0;
        EXPECT_TRUE(
            v->fallocate(ino, FALLOC_FL_ZERO_RANGE | (keep ? FALLOC_FL_KEEP_SIZE : 0), off, len));
        if (!keep && d.size() < off + len) d.resize(off + len, '\0');
        if (off < d.size()) std::fill_n(d.begin() + off, std::min(len, d.size() - off), '\0');
        break;
      }
      case 9: {  // truncate, mostly down
        SetAttr c;
        c.size = rng.below(2) == 0 ? rng.below(d.size() + 1) : rng.below(3 * bs);
        EXPECT_TRUE(v->setattr(ino, c));
        d.resize(*c.size, '\0');
        break;
      }
    }
    next.returned = r.events();
    rec.files[n].push_back(std::move(next));
    // fstrim now and then: the blocks freed by punched holes and cuts are trimmed, and no
    // crash state may then show a file block of any version it could be in as zeros.
    if (rng.below(12) == 0) {
      auto trimmed = v->discard_free(0, UINT64_MAX, 0);
      EXPECT_TRUE(trimmed) << trimmed.status().to_string();
    }
    if (rng.below(4) == 0) sync();
  }
  sync();
  rec.recorder->detach();
  return rec;
}

// killed: the daemon was killed (every call that returned is kept, on the same boot) rather
// than the power failing (every synced call is kept, after a reboot).
std::string verify_xattr_workload(const std::string& crashed, const XattrRecording& rec,
                                  std::size_t cut, bool killed = false) {
  if (std::string raw = raw_fsck_problem(crashed, killed ? kWorkloadBoot : kRebootedBoot);
      !raw.empty())
    return raw;
  MountOptions mo;
  mo.mode = PersistMode::direct;
  mo.force_persistent = true;
  mo.boot_id = killed ? kWorkloadBoot : kRebootedBoot;
  {
    auto mounted = Volume::mount(crashed, mo);
    if (!mounted) return "mount failed: " + mounted.status().to_string();
    Volume& v = **mounted;
    const uint32_t bs = v.block_size();
    for (const auto& [n, versions] : rec.files) {
      // The versions the file may be in: from the last durable one to the last one begun.
      std::size_t from = 0, to = 0;
      bool durable = false;
      for (std::size_t k = 0; k < versions.size(); ++k) {
        if ((killed ? versions[k].returned : versions[k].synced) <= cut) from = k, durable = true;
        if (versions[k].started < cut) to = k;
      }
      auto a = v.lookup(kRootIno, n);
      if (!a) {
        if (a.status().error() == ENOENT && !durable) continue;
        return n + ": " + a.status().to_string();
      }
      if (to < from) to = from;
      std::string data(a->size, '\0');
      auto got = v.read(a->ino, 0, data.data(), data.size());
      if (!got || *got != data.size()) return n + ": short read";
      bool size_ok = false, xattrs_ok = false;
      std::map<std::string, std::string> xattrs;
      auto list_size = v.listxattr(a->ino, nullptr, 0);
      if (!list_size) return n + ": listxattr: " + list_size.status().to_string();
      std::string names(*list_size, '\0');
      if (!v.listxattr(a->ino, names.data(), names.size())) return n + ": listxattr failed";
      for (std::size_t at = 0; at < names.size(); at += std::strlen(names.c_str() + at) + 1) {
        std::string key = names.c_str() + at;
        std::string value(65536, '\0');
        auto vs = v.getxattr(a->ino, key, value.data(), value.size());
        if (!vs) return n + ": getxattr " + key + ": " + vs.status().to_string();
        value.resize(*vs);
        xattrs[key] = value;
      }
      for (std::size_t k = from; k <= to; ++k) {
        size_ok |= versions[k].data.size() == data.size();
        xattrs_ok |= versions[k].xattrs == xattrs;
      }
      if (!size_ok) {
        return n + ": size " + std::to_string(data.size()) + " is no version's from " +
               std::to_string(from) + " to " + std::to_string(to);
      }
      if (!xattrs_ok)
        return n + ": attributes are no version's (" + std::to_string(xattrs.size()) + ")";
      for (std::size_t off = 0; off < data.size(); off += bs) {
        std::string piece = data.substr(off, bs);
        bool ok = false;
        for (std::size_t k = from; k <= to && !ok; ++k) {
          std::string want = off < versions[k].data.size() ? versions[k].data.substr(off, bs) : "";
          want.resize(piece.size(), '\0');
          ok = piece == want;
        }
        if (!ok) return n + ": block at " + std::to_string(off) + " holds no version's content";
      }
    }
  }
  return fsck_problem(crashed, killed ? kWorkloadBoot : kRebootedBoot);
}

uint64_t xattr_crash_points(PersistMode mode, CrashModel model, uint64_t seed) {
  TempPath path("fsxattr-src.img");
  TempPath crashed("fsxattr-dst.img");
  make_volume(path);
  XattrRecording rec = record_xattr_workload(path, mode, 60, seed);
  const std::size_t stride = std::max<std::size_t>(1, rec.recorder->events() / 400);
  return crash_at_points(*rec.recorder, model, stride, 1, seed, crashed,
                         [&](std::size_t cut) { return verify_xattr_workload(crashed, rec, cut); });
}

TEST(FsCrash, XattrsFallocateAndHolesKilledDaemon) {
  uint64_t points = 0;
  for (PersistMode mode : {PersistMode::direct, PersistMode::writeback}) {
    for (uint64_t run = 0; run < scale(); ++run) {
      TempPath path("fsxkill-src.img");
      TempPath crashed("fsxkill-dst.img");
      make_volume(path);
      XattrRecording rec = record_xattr_workload(path, mode, 60, 41 + run, true);
      const std::size_t total = rec.recorder->events();
      const std::size_t stride = std::max<std::size_t>(1, total / 150);
      for (std::size_t cut = 0; cut <= total; cut += stride) {
        auto image = rec.recorder->prefix_image(cut);
        ASSERT_TRUE(CrashImageFile(crashed).write(image.data(), image.size()));
        std::string failure = verify_xattr_workload(crashed, rec, cut, true);
        ASSERT_EQ(failure, "") << to_string(mode) << " kill at event " << cut << " of " << total;
        ++points;
      }
    }
  }
  std::printf("kill model: %llu kill points\n", (unsigned long long)points);
  EXPECT_GE(points, 300u * scale());
}

TEST(FsCrash, XattrsFallocateAndHolesDirectModel) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += xattr_crash_points(PersistMode::direct, CrashModel::direct, 21 + run);
  }
  std::printf("direct model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 300u * scale());
}

TEST(FsCrash, XattrsFallocateAndHolesWritebackModel) {
  uint64_t points = 0;
  for (uint64_t run = 0; run < scale(); ++run) {
    points += xattr_crash_points(PersistMode::writeback, CrashModel::writeback, 31 + run);
  }
  std::printf("writeback model: %llu crash points\n", (unsigned long long)points);
  EXPECT_GE(points, 300u * scale());
}

// --- fdatasync without a journal commit -------------------------------------------------------
// fdatasync of a file whose size and blocks are committed makes only its data durable. A file is
// rewritten whole, again and again, each version followed by fdatasync; now and then a version
// is longer (new blocks: that fdatasync must commit). After a crash, every block of the file up
// to the size of the last fdatasync'd version holds that version or a later one, never an
// earlier one, and fsck finds nothing wrong.

struct DatasyncRecording {
  std::unique_ptr<CrashRecorder> recorder;
  std::vector<std::string> versions;
  std::vector<std::size_t> started;  // events before each version's first write
  std::vector<std::size_t> synced;   // events by which its fdatasync returned
};

DatasyncRecording record_datasyncs(const std::string& path, PersistMode mode, uint64_t seed) {
  MountOptions mo = workload_options(mode);
  auto v = std::move(Volume::mount(path, mo).value());
  auto a = v->mknod(kRootIno, "d", S_IFREG | 0644, 0, 0, 0);
  EXPECT_TRUE(a);
  DatasyncRecording rec;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  SplitMix64 rng(seed);
  std::size_t size = 3 * 4096;
  for (int k = 0; k < 12; ++k) {
    if (k % 4 == 3) size += 4096 + rng.below(4096);
    std::string data = content(seed * 100 + k, size);
    rec.started.push_back(rec.recorder->events());
    EXPECT_TRUE(v->write(a->ino, 0, data.data(), data.size()));
    EXPECT_TRUE(v->fsync(a->ino, /*datasync=*/true));
    rec.synced.push_back(rec.recorder->events());
    rec.versions.push_back(std::move(data));
  }
  rec.recorder->detach();
  return rec;
}

std::string verify_datasyncs(const std::string& crashed, const DatasyncRecording& rec,
                             std::size_t cut) {
  if (std::string raw = raw_fsck_problem(crashed, kRebootedBoot); !raw.empty()) return raw;
  MountOptions mo = rebooted_options();
  int last = -1;  // the last version whose fdatasync returned by the cut
  for (std::size_t k = 0; k < rec.versions.size(); ++k) {
    if (rec.synced[k] <= cut) last = int(k);
  }
  auto check = [&](Volume& v) -> std::string {
    std::string failure;
    auto data = read_all(v, "d", &failure);
    if (!failure.empty() || last < 0) return failure;
    if (!data) return "d is missing after an fdatasync";
    const std::string& need = rec.versions[std::size_t(last)];
    if (data->size() < need.size()) {
      return "d is " + std::to_string(data->size()) + " bytes, its fdatasync'd version " +
             std::to_string(need.size());
    }
    for (std::size_t off = 0; off < need.size(); off += 4096) {
      // The bytes of this block the fdatasync'd version has (its last block may be partial).
      const std::size_t len = std::min<std::size_t>(4096, need.size() - off);
      std::string got = data->substr(off, len);
      bool ok = false;
      for (std::size_t k = std::size_t(last); k < rec.versions.size() && !ok; ++k) {
        bool possible = k == std::size_t(last) || rec.started[k] < cut;
        ok = possible && rec.versions[k].substr(off, len) == got;
      }
      if (!ok) {
        std::string holds = "no version's";
        for (std::size_t k = 0; k < rec.versions.size(); ++k) {
          if (off < rec.versions[k].size() && rec.versions[k].substr(off, len) == got) {
            holds = "version " + std::to_string(k) + "'s";
          }
        }
        return "block " + std::to_string(off / 4096) + " of d holds " + holds +
               " data, older than its fdatasync'd version " + std::to_string(last) + " (size " +
               std::to_string(data->size()) + ")";
      }
    }
    return "";
  };
  {
    auto v = Volume::mount(crashed, mo);
    if (!v) return "mount failed: " + v.status().to_string();
    if (std::string failure = check(**v); !failure.empty()) return failure;
  }
  return fsck_problem(crashed, kRebootedBoot);
}

void crash_datasyncs(PersistMode mode, CrashModel model, uint64_t seed) {
  record_and_crash("fsdatasync", 4096, mode, model, seed, 150, "around fdatasync", record_datasyncs,
                   verify_datasyncs);
}

TEST(FsCrash, FdatasyncWithoutCommitWritebackModel) {
  crash_datasyncs(PersistMode::writeback, CrashModel::writeback, 41);
}

TEST(FsCrash, FdatasyncWithoutCommitDirectModel) {
  crash_datasyncs(PersistMode::direct, CrashModel::direct, 43);
}

// --- unnamed files (O_TMPFILE) -------------------------------------------------------------
// Files made without a name, written, then either named (linkat) and synced, dropped (the last
// reference goes) or left open when the power goes. After a crash every unnamed file is gone
// and its inode and blocks are free again (fsck clean, the inode count back to the named files),
// a name made durable holds its whole content, and any name present holds that content too:
// the name is given only after the content was written.

struct TmpfileFact {
  std::string name;
  std::string content;
  std::size_t synced = SIZE_MAX;  // events by which its name is durable (SIZE_MAX: never named)
};

struct TmpfileRecording {
  std::unique_ptr<CrashRecorder> recorder;
  std::vector<TmpfileFact> files;
  uint64_t inodes_before = 0;  // inodes in use before the workload
};

TmpfileRecording record_tmpfiles(const std::string& path, PersistMode mode, uint64_t seed) {
  MountOptions mo = workload_options(mode);
  auto v = std::move(Volume::mount(path, mo).value());
  TmpfileRecording rec;
  struct statvfs st = v->statfs();
  rec.inodes_before = st.f_files - st.f_ffree;
  rec.recorder = std::make_unique<CrashRecorder>(v->region());
  SplitMix64 rng(seed);
  for (int k = 0; k < 24; ++k) {
    TmpfileFact f{name('n', k), content(seed * 100 + k, 1 + rng.below(k % 5 == 0 ? 90000 : 9000))};
    auto a = v->tmpfile(kRootIno, 0644, 0, 0);
    EXPECT_TRUE(a) << a.status().to_string();
    if (!a) break;
    v->hold(a->ino, 1);
    EXPECT_TRUE(v->write(a->ino, 0, f.content.data(), f.content.size()));
    switch (rng.below(3)) {
      case 0:  // named and synced
        EXPECT_TRUE(v->link(a->ino, kRootIno, f.name));
        EXPECT_TRUE(v->sync_wait());
        f.synced = rec.recorder->events();
        v->forget(a->ino, 1);
        break;
      case 1:  // dropped: freed with its last reference
        v->forget(a->ino, 1);
        break;
      default:  // still open when the power goes; a sync now and then
        if (rng.chance(1, 2)) {
          EXPECT_TRUE(v->sync_wait());
        }
        break;
    }
    rec.files.push_back(std::move(f));
  }
  rec.recorder->detach();
  return rec;
}

std::string verify_tmpfiles(const std::string& crashed, const TmpfileRecording& rec,
                            std::size_t cut) {
  if (std::string raw = raw_fsck_problem(crashed, kRebootedBoot); !raw.empty()) return raw;
  MountOptions mo = rebooted_options();
  {
    auto v = Volume::mount(crashed, mo);
    if (!v) return "mount failed: " + v.status().to_string();
    uint64_t named = 0;
    for (const TmpfileFact& f : rec.files) {
      std::string failure;
      auto data = read_all(**v, f.name, &failure);
      if (!failure.empty()) return failure;
      if (!data && f.synced <= cut) return f.name + " was named and synced but is missing";
      if (!data) continue;
      ++named;
      if (*data != f.content) {
        return f.name + " holds " + std::to_string(data->size()) + " bytes, not the " +
               std::to_string(f.content.size()) + " written before it was named";
      }
    }
    struct statvfs st = (*v)->statfs();
    uint64_t in_use = st.f_files - st.f_ffree;
    if (in_use != rec.inodes_before + named) {
      return std::to_string(in_use) + " inodes in use after the mount, expected " +
             std::to_string(rec.inodes_before) + " and " + std::to_string(named) +
             " named files: an unnamed file survived";
    }
  }
  return fsck_problem(crashed, kRebootedBoot);
}

void crash_tmpfiles(PersistMode mode, CrashModel model, uint64_t seed) {
  record_and_crash("fstmpfile", 4096, mode, model, seed, 300, "among unnamed files",
                   record_tmpfiles, verify_tmpfiles);
}

TEST(FsCrash, UnnamedFilesWritebackModel) {
  crash_tmpfiles(PersistMode::writeback, CrashModel::writeback, 51);
}

TEST(FsCrash, UnnamedFilesDirectModel) {
  crash_tmpfiles(PersistMode::direct, CrashModel::direct, 53);
}

}  // namespace
}  // namespace vpmfs
