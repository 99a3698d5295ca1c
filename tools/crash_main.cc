// vpmfs-crash: power-cut an application on vpmfs and check what it would find afterwards.
//
//   record: mount a fresh (or copied) image with -o record=, run the workload, unmount; the
//           trace and the workload's stdout lines, each tagged with the event count at the
//           moment it was read, are kept.
//   states: for N crash points of a trace, build the image a crash there may leave under the
//           model, fsck it, mount it, and run the check with $VPMFS_MNT and $VPMFS_ACKED.
//   run:    record + states.
//   replay: rebuild one state, leave it as an image and optionally mounted.
#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "vpmfs/crash_sim.h"
#include "vpmfs/random.h"

namespace {

using vpmfs::CrashModel;

// A boot id no kernel hands out: crash states of the power models are mounted as after a
// reboot, so the kill log of the recorded daemon is ignored.
constexpr const char* kOtherBoot = "00000000000000000000000000000001";

std::string g_bin_dir;  // where the sibling tools are

std::string tool(const std::string& name) {
  std::string p = g_bin_dir + "/" + name;
  if (::access(p.c_str(), X_OK) == 0) return p;
  return name;  // from the PATH
}

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "vpmfs-crash: %s\n", msg.c_str());
  std::exit(3);
}

// Starts argv with stdin from /dev/null and stdout and stderr on out_fd (or /dev/null), in
// cwd, with env added to the environment. posix_spawn, not fork: this process holds the whole
// trace, and copying its page tables for every fsck, mount and check cost more than the rest.
pid_t spawn(const std::vector<std::string>& argv, int out_fd = -1, const std::string& cwd = "",
            const std::vector<std::string>& env = {}) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  if (out_fd >= 0) {
    posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
    posix_spawn_file_actions_adddup2(&fa, out_fd, 2);
  } else {
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
  }
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) envp.push_back(*e);
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) die("cannot run " + argv[0] + ": " + std::strerror(rc));
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Runs argv; its stdout and stderr go to `out` (or /dev/null). Returns the exit code.
int run(const std::vector<std::string>& argv, std::string* out = nullptr,
        const std::string& cwd = "", const std::vector<std::string>& env = {}) {
  int fds[2] = {-1, -1};
  if (out != nullptr && pipe2(fds, O_CLOEXEC) != 0) die("pipe failed");
  pid_t pid = spawn(argv, fds[1], cwd, env);
  if (out != nullptr) {
    ::close(fds[1]);
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out->append(buf, std::size_t(n));
    ::close(fds[0]);
  }
  return wait_exit(pid);
}

bool is_fuse_mounted(const std::string& dir) {
  struct statfs sf {};
  return ::statfs(dir.c_str(), &sf) == 0 && sf.f_type == 0x65735546;
}

// The daemon in the foreground on image/dir; returns its pid once the mount is up.
pid_t mount_image(const std::string& image, const std::string& dir, const std::string& opts) {
  pid_t pid = spawn({tool("vpmfs"), image, dir, "-f", "-o", opts});
  for (int i = 0; i < 6000; ++i) {
    if (is_fuse_mounted(dir)) return pid;
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) die("vpmfs could not mount " + image);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  die("vpmfs did not mount " + image + " within a minute");
}

void unmount(const std::string& dir, pid_t daemon) {
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = run({"fusermount3", "-u", dir}) == 0;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!gone) run({"fusermount3", "-u", "-z", dir});
  int status = 0;
  waitpid(daemon, &status, 0);
}

std::string g_workdir;

std::string make_workdir() {
  const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  std::string t = std::string(base) + "/vpmfs-crash.XXXXXX";
  if (::mkdtemp(t.data()) == nullptr)
    die("cannot make a work directory in " + std::string(base) + ": " + std::strerror(errno));
  // An early exit (a usage error found late, a failed mount) leaves no empty directory behind.
  g_workdir = t;
  std::atexit([] { ::rmdir(g_workdir.c_str()); });
  return t;
}

std::string mount_mode_options(CrashModel model) {
  return model == CrashModel::direct ? "sync_dax=direct,force_persistent" : "sync_dax=writeback";
}

// --- record ----------------------------------------------------------------------------------

struct RecordArgs {
  CrashModel model = CrashModel::writeback;
  std::string size = "64M";
  std::string image;
  std::string trace;
  std::vector<std::string> workload;
};

// The trace's companion: the workload's stdout lines, "EVENTS<TAB>LINE" each.
std::string lines_path(const std::string& trace) {
  return trace + ".out";
}

int record(const RecordArgs& a, const std::string& workdir) {
  std::string img = workdir + "/recorded.img";
  if (!a.image.empty()) {
    if (run({"cp", "--sparse=always", a.image, img}) != 0) die("cannot copy " + a.image);
  } else if (run({tool("mkfs.vpmfs"), "-q", "-f", "--size", a.size, "--force-persistent", img}) !=
             0) {
    die("mkfs.vpmfs --size " + a.size + " failed");
  }
  std::string mnt = workdir + "/mnt";
  ::mkdir(mnt.c_str(), 0755);
  pid_t daemon = mount_image(img, mnt, mount_mode_options(a.model) + ",record=" + a.trace);
  int tfd = ::open(a.trace.c_str(), O_RDONLY | O_CLOEXEC);
  if (tfd < 0) die("cannot open the trace " + a.trace + ": " + std::strerror(errno));
  auto* header = static_cast<vpmfs::CrashTraceHeader*>(
      ::mmap(nullptr, vpmfs::kCrashTraceHeaderSize, PROT_READ, MAP_SHARED, tfd, 0));
  ::close(tfd);
  if (header == MAP_FAILED) die("cannot map the trace " + a.trace + ": " + std::strerror(errno));

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) die("pipe failed");
  pid_t child = fork();
  if (child == 0) {
    ::dup2(fds[1], 1);
    if (::chdir(mnt.c_str()) != 0) _exit(126);
    ::setenv("VPMFS_MNT", mnt.c_str(), 1);
    std::vector<char*> args;
    for (const auto& w : a.workload) args.push_back(const_cast<char*>(w.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    std::fprintf(stderr, "vpmfs-crash: cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  ::close(fds[1]);
  std::ofstream lines(lines_path(a.trace), std::ios::trunc);
  std::string pending;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) {
    // The event count now is at least the count when the line was printed: a line printed
    // after fsync returned is tagged after that fsync's flush.
    uint64_t events = __atomic_load_n(&header->events, __ATOMIC_ACQUIRE);
    pending.append(buf, std::size_t(n));
    std::size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      lines << events << '\t' << pending.substr(0, nl) << '\n';
      pending.erase(0, nl + 1);
    }
  }
  if (!pending.empty()) {
    lines << __atomic_load_n(&header->events, __ATOMIC_ACQUIRE) << '\t' << pending << '\n';
  }
  ::close(fds[0]);
  int status = 0;
  waitpid(child, &status, 0);
  int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  unmount(mnt, daemon);
  bool complete = __atomic_load_n(&header->complete, __ATOMIC_ACQUIRE) == 1;
  ::munmap(header, vpmfs::kCrashTraceHeaderSize);
  ::unlink(img.c_str());
  ::rmdir(mnt.c_str());
  if (!complete) die("the daemon did not complete the trace " + a.trace);
  if (rc != 0) std::fprintf(stderr, "vpmfs-crash: note: the workload exited with %d\n", rc);
  return rc;
}

// --- states ----------------------------------------------------------------------------------

struct StatesArgs {
  std::string trace;
  CrashModel model = CrashModel::writeback;
  std::size_t states = 100;
  uint64_t seed = 1;
  std::string check;
  std::string json;
  bool bisect = false;
  bool verbose = false;
};

struct Line {
  uint64_t tag;
  std::string text;
};

std::vector<Line> read_lines(const std::string& trace) {
  std::vector<Line> out;
  std::ifstream f(lines_path(trace));
  std::string l;
  while (std::getline(f, l)) {
    std::size_t tab = l.find('\t');
    if (tab == std::string::npos) continue;
    out.push_back({std::strtoull(l.c_str(), nullptr, 10), l.substr(tab + 1)});
  }
  return out;
}

vpmfs::CrashTrace load(const std::string& path) {
  auto t = vpmfs::load_crash_trace(path);
  if (!t) die(t.status().message());
  return std::move(t.value());
}

void check_model(const vpmfs::CrashTrace& t, CrashModel model) {
  bool direct = t.mode == vpmfs::PersistMode::direct;
  if ((model == CrashModel::direct && !direct) || (model == CrashModel::writeback && direct)) {
    std::fprintf(stderr,
                 "vpmfs-crash: the trace was recorded in %s mode; --model %s needs a trace "
                 "recorded with --model %s\n",
                 vpmfs::to_string(t.mode), vpmfs::to_string(model), vpmfs::to_string(model));
    std::exit(2);
  }
}

// Every flush boundary (flush_end; fence in direct mode), plus seed-chosen points between them,
// n in all; with more boundaries than n, n of them chosen by the seed. Ascending.
std::vector<std::size_t> crash_points(const vpmfs::CrashTrace& t, CrashModel model, std::size_t n,
                                      uint64_t seed) {
  std::vector<std::size_t> bounds;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    auto k = t.events[i].kind;
    if (k == vpmfs::CrashEventKind::flush_end ||
        (model == CrashModel::direct && k == vpmfs::CrashEventKind::fence)) {
      bounds.push_back(i + 1);
    }
  }
  vpmfs::SplitMix64 rng(seed);
  std::set<std::size_t> chosen;
  chosen.insert(t.events.size());  // the end: the trace's last state
  if (bounds.size() + 1 > n) {
    for (std::size_t i = bounds.size(); i > 1; --i) std::swap(bounds[i - 1], bounds[rng.below(i)]);
    for (std::size_t i = 0; chosen.size() < n && i < bounds.size(); ++i) chosen.insert(bounds[i]);
  } else {
    chosen.insert(bounds.begin(), bounds.end());
    for (int tries = 0; chosen.size() < n && tries < int(n) * 20; ++tries) {
      chosen.insert(std::size_t(rng.below(t.events.size() + 1)));
    }
  }
  return {chosen.begin(), chosen.end()};
}

struct StateResult {
  std::size_t point = 0;
  bool passed = false;
  bool fsck_clean = false;
  std::string last_line;
};

// Writes the state's image, fscks it, mounts it, runs the check.
class StateRunner {
 public:
  StateRunner(const vpmfs::CrashTrace& t, const StatesArgs& a, std::vector<Line> lines,
              std::string workdir)
      : trace_(t), a_(a), lines_(std::move(lines)), workdir_(std::move(workdir)) {
    image_ = workdir_ + "/state.img";
    mnt_ = workdir_ + "/state.mnt";
    acked_ = workdir_ + "/acked";
    ::mkdir(mnt_.c_str(), 0755);
    replay_ = std::make_unique<vpmfs::CrashReplay>(trace_, a_.model);
    // One mapping of the state image for every state: each is written over the last one
    // without a page fault (the daemon's changes reach the same pages).
    int fd = ::open(image_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    uint64_t size = trace_.baseline.size();
    if (fd < 0 || ::ftruncate(fd, off_t(size)) != 0)
      die("cannot create " + image_ + ": " + std::strerror(errno));
    void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (map == MAP_FAILED) die("cannot map " + image_ + ": " + std::strerror(errno));
    map_ = static_cast<std::byte*>(map);
  }
  ~StateRunner() {
    ::munmap(map_, trace_.baseline.size());
    ::unlink(image_.c_str());
    ::unlink(acked_.c_str());
    ::rmdir(mnt_.c_str());
  }

  StateResult run_state(std::size_t point) {
    if (point < replay_->cut()) replay_ = std::make_unique<vpmfs::CrashReplay>(trace_, a_.model);
    replay_->advance_to(point);
    replay_->image_into(a_.seed, map_);
    write_acked(lines_, point, acked_);
    StateResult r;
    r.point = point;
    r.fsck_clean = run({tool("fsck.vpmfs"), "-n", image_}) == 0;
    std::string opts = mount_mode_options(a_.model);
    if (a_.model != CrashModel::kill) opts += std::string(",boot_id=") + kOtherBoot;
    pid_t daemon = mount_image(image_, mnt_, opts);
    std::string out;
    int rc =
        run({"sh", "-c", a_.check}, &out, mnt_, {"VPMFS_MNT=" + mnt_, "VPMFS_ACKED=" + acked_});
    unmount(mnt_, daemon);
    r.passed = rc == 0;
    r.last_line = last_line(out);
    if (a_.verbose) std::fprintf(stderr, "point %zu: exit %d\n%s", point, rc, out.c_str());
    return r;
  }

  // Straight into the mapped file: no image-sized buffer on the way.
  static void write_state(const vpmfs::CrashReplay& replay, uint64_t seed, const std::string& path,
                          uint64_t size) {
    // No O_TRUNC: the previous state's pages are overwritten in place, not freed and faulted in
    // again.
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || ::ftruncate(fd, off_t(size)) != 0)
      die("cannot create " + path + ": " + std::strerror(errno));
    void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (map == MAP_FAILED) die("cannot map " + path + ": " + std::strerror(errno));
    replay.image_into(seed, static_cast<std::byte*>(map));
    ::munmap(map, size);
  }

  static void write_acked(const std::vector<Line>& lines, std::size_t point,
                          const std::string& path) {
    std::ofstream f(path, std::ios::trunc);
    for (const auto& l : lines) {
      if (l.tag <= point) f << l.text << '\n';
    }
  }

 private:
  static std::string last_line(const std::string& out) {
    std::size_t end = out.find_last_not_of("\n");
    if (end == std::string::npos) return "";
    std::size_t start = out.rfind('\n', end);
    return out.substr(start == std::string::npos ? 0 : start + 1,
                      end - (start == std::string::npos ? 0 : start + 1) + 1);
  }

  const vpmfs::CrashTrace& trace_;
  const StatesArgs& a_;
  std::vector<Line> lines_;
  std::string workdir_, image_, mnt_, acked_;
  std::unique_ptr<vpmfs::CrashReplay> replay_;
  std::byte* map_ = nullptr;
};

// Runnable as printed: rebuilds the state into ./vpmfs-crash-P.img and leaves it mounted on
// ./vpmfs-crash-P.mnt.
std::string replay_command(const StatesArgs& a, std::size_t point) {
  std::string name = "vpmfs-crash-" + std::to_string(point);
  return g_bin_dir + "/vpmfs-crash replay " + a.trace + " --model " + vpmfs::to_string(a.model) +
         " --seed " + std::to_string(a.seed) + " --point " + std::to_string(point) + " --image " +
         name + ".img --mount " + name + ".mnt";
}

void progress(std::size_t done, std::size_t total, std::size_t failed) {
  static const bool tty = ::isatty(2);
  if (tty) {
    int width = 40;
    int filled = total == 0 ? width : int(done * width / total);
    std::fprintf(stderr, "\r[%s%s] %zu/%zu states, %zu failed", std::string(filled, '#').c_str(),
                 std::string(width - filled, ' ').c_str(), done, total, failed);
    if (done == total) std::fputc('\n', stderr);
  } else if (done == total || (total >= 10 && done % (total / 10) == 0)) {
    std::fprintf(stderr, "%zu/%zu states, %zu failed\n", done, total, failed);
  }
}

int states(const StatesArgs& a, const std::string& workdir) {
  vpmfs::CrashTrace t = load(a.trace);
  check_model(t, a.model);
  std::vector<std::size_t> points = crash_points(t, a.model, a.states, a.seed);
  StateRunner runner(t, a, read_lines(a.trace), workdir);
  std::vector<StateResult> results;
  std::size_t failed = 0, unclean = 0;
  progress(0, points.size(), 0);
  for (std::size_t p : points) {
    results.push_back(runner.run_state(p));
    const StateResult& r = results.back();
    if (!r.passed) ++failed;
    if (!r.fsck_clean) ++unclean;
    progress(results.size(), points.size(), failed);
  }
  for (const auto& r : results) {
    if (r.passed) continue;
    std::printf("FAIL point %zu/%zu model %s seed %llu%s: %s\n", r.point, t.events.size(),
                vpmfs::to_string(a.model), (unsigned long long)a.seed,
                r.fsck_clean ? "" : " (fsck not clean)", r.last_line.c_str());
    std::printf("  replay: %s\n", replay_command(a, r.point).c_str());
  }
  nlohmann::json bisect;
  if (a.bisect && failed > 0) {
    // The first failing sampled point and the passing one before it bracket a change from
    // pass to fail; halve the events between them.
    std::size_t first = 0;
    while (results[first].passed) ++first;
    std::size_t lo = first == 0 ? 0 : results[first - 1].point;  // passes (or the start)
    std::size_t hi = results[first].point;                       // fails
    bool lo_known = first > 0;
    if (!lo_known) {
      lo_known = runner.run_state(0).passed;
      if (!lo_known) hi = 0;
    }
    while (lo_known && hi - lo > 1) {
      std::size_t mid = lo + (hi - lo) / 2;
      if (runner.run_state(mid).passed) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    std::printf("bisect: first failing crash point %zu%s\n", hi,
                lo_known ? " (the point before it passes)" : " (fails from the start)");
    std::printf("  replay: %s\n", replay_command(a, hi).c_str());
    bisect = {{"first_failing_point", hi}, {"previous_passes", lo_known}};
  }
  std::printf(
      "%zu states (%s, seed %llu, %zu events): %zu passed, %zu failed; fsck clean on "
      "%zu/%zu\n",
      results.size(), vpmfs::to_string(a.model), (unsigned long long)a.seed, t.events.size(),
      results.size() - failed, failed, results.size() - unclean, results.size());
  if (!a.json.empty()) {
    nlohmann::json j;
    j["trace"] = a.trace;
    j["model"] = vpmfs::to_string(a.model);
    j["seed"] = a.seed;
    j["events"] = t.events.size();
    j["passed"] = results.size() - failed;
    j["failed"] = failed;
    j["fsck_unclean"] = unclean;
    for (const auto& r : results) {
      j["states"].push_back({{"point", r.point},
                             {"passed", r.passed},
                             {"fsck_clean", r.fsck_clean},
                             {"last_line", r.last_line},
                             {"replay", replay_command(a, r.point)}});
    }
    if (!bisect.is_null()) j["bisect"] = bisect;
    std::ofstream(a.json) << j.dump(2) << '\n';
  }
  return failed == 0 && unclean == 0 ? 0 : 1;
}

// --- replay ----------------------------------------------------------------------------------

struct ReplayArgs {
  std::string trace;
  CrashModel model = CrashModel::writeback;
  uint64_t seed = 1;
  std::size_t point = 0;
  std::string image;
  std::string mount;
  std::string check;
};

int replay(const ReplayArgs& a) {
  vpmfs::CrashTrace t = load(a.trace);
  check_model(t, a.model);
  vpmfs::CrashReplay r(t, a.model);
  r.advance_to(a.point);
  std::string img = a.image.empty() ? "vpmfs-crash-" + std::to_string(a.point) + ".img" : a.image;
  StateRunner::write_state(r, a.seed, img, t.baseline.size());
  StateRunner::write_acked(read_lines(a.trace), a.point, img + ".acked");
  std::printf("image %s (point %zu of %zu, model %s, seed %llu); acknowledged lines in %s\n",
              img.c_str(), r.cut(), t.events.size(), vpmfs::to_string(a.model),
              (unsigned long long)a.seed, (img + ".acked").c_str());
  if (a.mount.empty()) return 0;
  std::string opts = mount_mode_options(a.model);
  if (a.model != CrashModel::kill) opts += std::string(",boot_id=") + kOtherBoot;
  ::mkdir(a.mount.c_str(), 0755);
  pid_t daemon = mount_image(img, a.mount, opts);
  if (a.check.empty()) {
    std::printf("mounted on %s (daemon %d); unmount with: fusermount3 -u %s\n", a.mount.c_str(),
                int(daemon), a.mount.c_str());
    return 0;
  }
  std::string out;
  char acked[PATH_MAX];
  if (::realpath((img + ".acked").c_str(), acked) == nullptr)
    die("cannot resolve " + img + ": " + std::strerror(errno));
  char mnt[PATH_MAX];
  if (::realpath(a.mount.c_str(), mnt) == nullptr)
    die("cannot resolve " + a.mount + ": " + std::strerror(errno));
  int rc = run({"sh", "-c", a.check}, &out, mnt,
               {std::string("VPMFS_MNT=") + mnt, std::string("VPMFS_ACKED=") + acked});
  unmount(a.mount, daemon);
  std::fputs(out.c_str(), stdout);
  std::printf("check %s\n", rc == 0 ? "passed" : "FAILED");
  return rc == 0 ? 0 : 1;
}

CLI::Validator model_validator() {
  return CLI::IsMember({"writeback", "direct", "kill"});
}

std::string absolute(const std::string& p) {
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf) != nullptr) return buf;
  if (!p.empty() && p[0] == '/') return p;
  char cwd[PATH_MAX];
  return std::string(::getcwd(cwd, sizeof cwd) ? cwd : ".") + "/" + p;
}

}  // namespace

int main(int argc, char** argv) {
  {
    char self[PATH_MAX];
    ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
      self[n] = '\0';
      std::string s = self;
      g_bin_dir = s.substr(0, s.rfind('/'));
    }
  }
  CLI::App app{"vpmfs-crash: power-cut a program on vpmfs and check what it would find",
               "vpmfs-crash"};
  app.require_subcommand(1);
  app.footer(
      "Exit codes: 0 every state passed, 1 a state failed (or fsck found a problem), 2 usage "
      "error, 3 could not run (mkfs, mount or trace failure).");
  std::string model = "writeback";
  RecordArgs ra;
  StatesArgs sa;
  ReplayArgs pa;
  std::string trace_out;

  auto* run_cmd = app.add_subcommand("run", "record a workload, then check N crash states");
  auto* rec_cmd = app.add_subcommand("record", "record a workload's crash trace");
  auto* st_cmd = app.add_subcommand("states", "check N crash states of a recorded trace");
  auto* rp_cmd = app.add_subcommand("replay", "rebuild one crash state (and mount it)");
  for (auto* c : {run_cmd, rec_cmd, st_cmd, rp_cmd}) {
    c->add_option("--model", model, "crash model: writeback (default), direct or kill")
        ->check(model_validator());
  }
  for (auto* c : {run_cmd, rec_cmd}) {
    c->add_option("--size", ra.size, "size of the fresh image (default 64M)");
    c->add_option("--image", ra.image, "copy this vpmfs image instead of making a fresh one");
    c->add_option("WORKLOAD", ra.workload, "the program to run, after --")->required();
  }
  rec_cmd->add_option("--trace", ra.trace, "trace file to write (and TRACE.out)")->required();
  run_cmd->add_option("--trace", trace_out,
                      "keep the trace here (default: kept in the work directory when a state "
                      "fails, removed otherwise)");
  for (auto* c : {run_cmd, st_cmd}) {
    c->add_option("--states", sa.states, "number of crash points (default 100)");
    c->add_option("--seed", sa.seed, "seed of the crash points and images (default 1)");
    c->add_option("--check", sa.check, "shell command that exits 0 when a state is acceptable")
        ->required();
    c->add_option("--json", sa.json, "write the results as JSON to this file");
    c->add_flag("--bisect", sa.bisect, "narrow the first failure to a single crash point");
    c->add_flag("-v,--verbose", sa.verbose, "show every check's output");
  }
  st_cmd->add_option("TRACE", sa.trace, "trace file from vpmfs-crash record")->required();
  rp_cmd->add_option("TRACE", pa.trace, "trace file")->required();
  rp_cmd->add_option("--seed", pa.seed, "seed (default 1)");
  rp_cmd->add_option("--point", pa.point, "crash point (an event count)")->required();
  rp_cmd->add_option("--image", pa.image, "write the image here (default vpmfs-crash-POINT.img)");
  rp_cmd->add_option("--mount", pa.mount, "mount the image on this directory and leave it");
  rp_cmd->add_option("--check", pa.check, "with --mount: run this check, then unmount");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  CrashModel m = *vpmfs::parse_crash_model(model);
  ra.model = sa.model = pa.model = m;
  if (rp_cmd->parsed()) return replay(pa);
  std::string workdir = make_workdir();
  int rc = 0;
  if (rec_cmd->parsed()) {
    ra.trace = absolute(ra.trace);
    rc = record(ra, workdir) == 0 ? 0 : 1;
  } else if (st_cmd->parsed()) {
    sa.trace = absolute(sa.trace);
    rc = states(sa, workdir);
  } else {
    ra.trace = trace_out.empty() ? workdir + "/trace" : absolute(trace_out);
    int wl = record(ra, workdir);
    (void)wl;
    sa.trace = ra.trace;
    rc = states(sa, workdir);
    if (trace_out.empty() && rc == 0) {
      ::unlink(ra.trace.c_str());
      ::unlink(lines_path(ra.trace).c_str());
    }
  }
  if (::rmdir(workdir.c_str()) != 0 && rc != 0) {
    std::fflush(stdout);  // after the summary, also when both go to one pipe
    std::fprintf(stderr, "vpmfs-crash: trace kept in %s\n", workdir.c_str());
  }
  return rc;
}
