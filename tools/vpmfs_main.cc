// vpmfs IMAGE MOUNTPOINT [-o OPTIONS] [-f] [-d] [-s]: the vpmfs FUSE daemon.
//
// Runs the way mount.fuse3 starts it for "mount -t fuse.vpmfs IMAGE DIR -o ..." and for
// /etc/fstab lines of type fuse.vpmfs. Daemonizes unless -f; the parent waits until the volume
// is open and mounted, so every error before that reaches the terminal and the exit code.
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "fuse/fuse_fs.h"
#include "fuse/mount_options.h"
#include "vpmfs/crash_sim.h"

namespace {

constexpr const char* kOptionsHelp = R"(Mount options (-o, comma separated):
  sync_dax=auto|direct|writeback|unsafe
                      persistence mode; auto uses MAP_SYNC or devdax when the backend offers
                      it (direct) and the flush channel otherwise (writeback)
  dax=always|never|inode
                      which files are served as DAX files (default inode: per-file flag)
  commit=SECONDS      background commit interval (default 5)
  ro, rw              read-only or read-write mount
  allow_other         let other users use the mount
  default_permissions the kernel checks permissions and ACLs (the default)
  no_default_permissions
                      leave permission checks out (single-user mounts only)
  force_persistent    treat the image's memory as persistent even without MAP_SYNC
                      (a stand-in for real pmem, for testing)
  fsname=NAME         source name shown in /proc/mounts (default: the image path)
  max_threads=N       FUSE worker threads (default twice the CPUs, 4 to 16)
  max_write=BYTES     largest FUSE write request (default 1048576)
  writeback_cache     the kernel's write-back cache: faster small writes, but writes are
                      acknowledged before vpmfs has them, so a killed daemon can lose
                      acknowledged writes (fsync still makes them durable)
  sync                every change durable when its call returns; fsync then costs nothing
                      (faster when most writes are fsync'd, slower when few are)
  dirsync             every change to a directory (create, rename, unlink, ...) durable
                      when its call returns
  mlock, nomlock      an image on tmpfs: lock its pages in memory as they are first touched,
                      so that reclaim never unmaps them (mlock, the default), or leave them to
                      reclaim and swap (nomlock)
  test_faults         testing only: SIGUSR1 makes every later device flush fail with EIO
  record=PATH         write a crash trace of every store and flush of this mount to PATH
                      (vpmfs-crash(8) reads it)
  boot_id=HEX         the boot this mount runs in (default: the kernel's); another boot than
                      the one a killed daemon ran in ignores its kill log, as after a power cut
The generic options mount(8) passes (rw, dev, suid, exec, atime family, _netdev, nofail,
x-*, ...) are accepted; the kernel applies the VFS ones itself.)";

// The parent side of daemonizing: a pipe the child reports "mounted" or an error on.
class Launcher {
 public:
  // Forks. Returns in the child; the parent exits with the child's verdict.
  void daemonize() {
    if (pipe2(fds_, O_CLOEXEC) != 0) {
      std::perror("vpmfs: pipe");
      std::exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
      std::perror("vpmfs: fork");
      std::exit(1);
    }
    if (pid > 0) {
      ::close(fds_[1]);
      std::string msg;
      char buf[512];
      ssize_t n;
      while ((n = ::read(fds_[0], buf, sizeof buf)) > 0) msg.append(buf, std::size_t(n));
      if (msg == "ok") std::exit(0);
      std::fprintf(stderr, "%s",
                   msg.empty() ? "vpmfs: the daemon died before mounting\n" : msg.c_str());
      std::exit(1);
    }
    ::close(fds_[0]);
    setsid();
    active_ = true;
  }

  [[noreturn]] void fail(const std::string& message) {
    std::string line = "vpmfs: " + message + "\n";
    if (active_) {
      (void)!::write(fds_[1], line.data(), line.size());
    } else {
      std::fputs(line.c_str(), stderr);
    }
    syslog(LOG_ERR, "%s", message.c_str());
    std::exit(1);
  }

  // The mount is up: release the parent and detach from the terminal.
  void mounted() {
    if (!active_) return;
    (void)!::write(fds_[1], "ok", 2);
    ::close(fds_[1]);
    active_ = false;
    vpmfs::log_to_stderr(false);
    int null = ::open("/dev/null", O_RDWR);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::dup2(null, 2);
      if (null > 2) ::close(null);
    }
    (void)!::chdir("/");
  }

 private:
  int fds_[2] = {-1, -1};
  bool active_ = false;
};

// mount -o remount,ro|rw: the kernel changes the mount; no daemon is started.
[[noreturn]] void remount(const vpmfs::DaemonOptions& o, Launcher& launcher) {
  unsigned long flags = MS_REMOUNT | (o.volume.read_only ? MS_RDONLY : 0);
  if (::mount(o.image.c_str(), o.mountpoint.c_str(), nullptr, flags, nullptr) != 0) {
    launcher.fail("cannot remount " + o.mountpoint + ": " + std::strerror(errno));
  }
  std::exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  // One malloc arena: with one per FUSE worker, memory freed by one thread stays in its arena,
  // and a million files cost 83 MiB instead of 62 (what drop_caches gives back: 30 vs 42 MiB).
  mallopt(M_ARENA_MAX, 1);
  CLI::App app{"vpmfs: a DAX-style filesystem on a virtual pmem image, mounted through FUSE",
               "vpmfs"};
  app.footer(kOptionsHelp);
  vpmfs::DaemonOptions options;
  std::vector<std::string> option_lists;
  bool single_thread = false;
  app.add_option("IMAGE", options.image, "image file or device-dax node (made by mkfs.vpmfs)")
      ->required();
  app.add_option("MOUNTPOINT", options.mountpoint, "directory to mount on")->required();
  app.add_option("-o", option_lists, "mount options, comma separated (see below)")
      ->allow_extra_args(false);
  app.add_flag("-f", options.foreground, "stay in the foreground");
  app.add_flag("-d", options.debug, "trace FUSE requests (implies -f)");
  app.add_flag("-s", single_thread, "serve requests on one thread");
  app.set_version_flag("--version", "vpmfs " VPMFS_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;
  }
  Launcher launcher;
  for (const auto& list : option_lists) {
    if (vpmfs::Status s = vpmfs::apply_mount_options(list, options); !s) launcher.fail(s.message());
  }
  if (vpmfs::Status s = vpmfs::check_mount_options(options); !s) launcher.fail(s.message());
  if (options.debug) options.foreground = true;
  if (single_thread) options.max_threads = 1;
  if (options.remount) remount(options, launcher);

  struct stat st {};
  if (::stat(options.mountpoint.c_str(), &st) != 0) {
    launcher.fail("mount point " + options.mountpoint + ": " + std::strerror(errno));
  }
  if (!S_ISDIR(st.st_mode))
    launcher.fail("mount point " + options.mountpoint + " is not a directory");
  char resolved[PATH_MAX];
  if (::realpath(options.image.c_str(), resolved) == nullptr) {
    launcher.fail(options.image + ": " + std::strerror(errno));
  }
  options.image = resolved;
  if (::realpath(options.mountpoint.c_str(), resolved) != nullptr) options.mountpoint = resolved;

  // Fork before the volume starts its threads.
  if (!options.foreground) launcher.daemonize();
  // SIGUSR1 (test_faults) is taken by a thread of its own; block it before any thread starts
  // so that every thread inherits the mask.
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  if (options.test_faults) pthread_sigmask(SIG_BLOCK, &usr1, nullptr);

  options.volume.on_error = [](const std::string& why) { vpmfs::log_message(LOG_CRIT, why); };
  // Just unmounted, the previous daemon may still be making its final commit.
  options.volume.lock_wait_ms = 5000;
  std::unique_ptr<vpmfs::CrashRecorder> recorder;
  vpmfs::Status record_status = vpmfs::Status::ok();
  if (!options.record.empty()) {
    options.volume.on_region = [&](vpmfs::Region& r) {
      auto rec = vpmfs::CrashRecorder::record_to_file(r, options.record);
      if (rec) {
        recorder = std::move(rec.value());
      } else {
        record_status = rec.status();
      }
    };
  }
  auto volume = vpmfs::Volume::mount(options.image, options.volume);
  if (!record_status) launcher.fail("cannot record: " + record_status.message());
  if (!volume) launcher.fail("cannot mount " + options.image + ": " + volume.status().message());
  vpmfs::Volume& v = **volume;
  vpmfs::Region& region = v.region();
  const bool ro = options.volume.read_only;
  std::string what = "mounted " + options.image + " on " + options.mountpoint +
                     (ro ? " (ro)" : "") + ": persistence " + vpmfs::to_string(v.mode()) + " (" +
                     region.mode_reason() + "), dax=" + vpmfs::to_string(options.dax) +
                     ", commit=" + std::to_string(options.volume.commit_interval_ms / 1000) + "s" +
                     (region.memory().empty() ? "" : ", image memory " + region.memory());
  if (options.test_faults) {
    std::thread([&region, usr1] {
      int sig = 0;
      while (sigwait(&usr1, &sig) == 0) {
        vpmfs::log_message(LOG_WARNING,
                           "test_faults: every device flush fails with EIO from now on");
        region.flush_channel().inject_failures(1 << 30, EIO);
      }
    }).detach();
  }
  vpmfs::Status s = vpmfs::serve(v, options, [&] {
    if (v.mode() == vpmfs::PersistMode::unsafe) {
      vpmfs::log_message(LOG_WARNING,
                         "WARNING: sync_dax=unsafe: nothing written to this mount is ever made "
                         "durable; fsync returns without flushing. A crash of the host can lose "
                         "or tear any of it.");
    }
    if (options.writeback_cache) {
      vpmfs::log_message(LOG_WARNING,
                         "writeback_cache: writes are acknowledged from the kernel's page cache; "
                         "a killed daemon loses those not yet written back or fsync'd.");
    }
    // The terminal (mount(8)'s, xfstests') gets the mode line only in the foreground.
    if (!options.foreground) vpmfs::log_to_stderr(false);
    vpmfs::log_message(LOG_INFO, what);
    launcher.mounted();
  });
  if (!s) launcher.fail(s.message());
  vpmfs::Status last = ro ? vpmfs::Status::ok() : v.sync_wait();
  if (recorder) {
    if (vpmfs::Status rs = recorder->finish(); !rs) {
      vpmfs::log_message(LOG_ERR, "crash trace " + options.record + ": " + rs.to_string());
      last = rs;
    }
  }
  volume->reset();
  if (!last) {
    vpmfs::log_message(LOG_ERR,
                       "unmounted " + options.image + ", final commit failed: " + last.to_string());
    return 1;
  }
  vpmfs::log_message(LOG_INFO, "unmounted " + options.image + " cleanly");
  return 0;
}
