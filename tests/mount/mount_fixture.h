// A real vpmfs mount for tests: mkfs.vpmfs a fresh image, run the daemon in the foreground on a
// temporary mount point, unmount and check the image with fsck.vpmfs at the end.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#ifndef VPMFS_BIN_DIR
#error "VPMFS_BIN_DIR names the directory holding vpmfs, mkfs.vpmfs and fsck.vpmfs"
#endif

namespace vpmfs::test {

inline int run(const std::vector<std::string>& argv, bool quiet = true) {
  pid_t pid = fork();
  if (pid == 0) {
    if (quiet) {
      freopen("/dev/null", "w", stdout);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Runs a command; returns its exit code and what it printed on stderr (or stdout).
inline std::pair<int, std::string> capture(const std::vector<std::string>& argv,
                                           bool want_stdout = false) {
  int fds[2];
  if (pipe(fds) != 0) return {-1, "pipe failed"};
  pid_t pid = fork();
  if (pid == 0) {
    ::close(fds[0]);
    int null = ::open("/dev/null", O_WRONLY);
    ::dup2(want_stdout ? fds[1] : null, 1);
    ::dup2(want_stdout ? null : fds[1], 2);
    ::close(fds[1]);  // only 1 and 2 may hold the pipe, or a daemon child would keep it open
    ::close(null);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out.append(buf, std::size_t(n));
  ::close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

class Mount {
 public:
  // trace: the daemon runs with -d and its trace of FUSE requests goes to trace().
  explicit Mount(const std::string& name, const std::vector<std::string>& mount_opts = {},
                 const std::string& size = "64M", bool trace = false)
      : trace_(trace) {
    bool shm = images_on_pmem();
    base_ = std::string(shm ? "/dev/shm" : std::getenv("VPMFS_TEST_TMP")) + "/vpmfs-mnt-" +
            std::to_string(getpid()) + "-" + name;
    image_ = base_ + ".img";
    dir_ = base_ + ".dir";
    ::unlink(image_.c_str());
    ::mkdir(dir_.c_str(), 0755);
    std::string bin = VPMFS_BIN_DIR;
    std::vector<std::string> mkfs = {bin + "/mkfs.vpmfs", "--size", size, image_};
    if (shm) mkfs.push_back("--force-persistent");
    EXPECT_EQ(run(mkfs), 0);
    opts_ = shm ? "force_persistent" : "rw";
    for (const auto& o : mount_opts) opts_ += "," + o;
    start();
  }

  // Images in /dev/shm, mounted as persistent memory (direct), unless $VPMFS_TEST_TMP names
  // another directory: then the image mounts as that filesystem makes it (writeback on a
  // disk), as a user's image there would.
  static bool images_on_pmem() {
    const char* tmp = std::getenv("VPMFS_TEST_TMP");
    return tmp == nullptr || *tmp == '\0';
  }

  // Runs the daemon in the foreground on the image and waits until the mount is up.
  void start() {
    std::string bin = VPMFS_BIN_DIR;
    std::vector<std::string> argv = {bin + "/vpmfs", image_, dir_, "-f", "-o", opts_};
    if (trace_) argv.push_back("-d");
    daemon_ = fork();
    if (daemon_ == 0) {
      if (trace_) {
        int fd = ::open(trace_path().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0 || ::dup2(fd, STDERR_FILENO) < 0) _exit(127);
      }
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    // Mounted when the mount point's filesystem type turns into FUSE's.
    // Up to a minute: a terabyte image under the sanitizers takes its time.
    for (int i = 0; i < 6000; ++i) {
      struct statfs sf {};
      if (::statfs(dir_.c_str(), &sf) == 0 && sf.f_type == 0x65735546) {
        mounted_ = true;
        break;
      }
      int status;
      if (waitpid(daemon_, &status, WNOHANG) == daemon_) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_TRUE(mounted_) << "vpmfs did not mount " << image_ << " on " << dir_;
  }

  // Unmounts, checks the image, and mounts it again; returns fsck's exit code.
  int remount() {
    int rc = unmount();
    start();
    return rc;
  }

  ~Mount() {
    unmount();
    ::rmdir(dir_.c_str());
    ::unlink(image_.c_str());
    ::unlink(trace_path().c_str());
  }

  // Unmounts, waits for the daemon, and returns fsck.vpmfs -n's exit code.
  int unmount() {
    if (!mounted_) return -1;
    mounted_ = false;
    // Something else on the machine may hold the mount for a moment (a scan of /dev/shm, say):
    // try again for a while, then detach it lazily rather than wait for a daemon that was never
    // told to stop.
    bool gone = false;
    for (int i = 0; i < 50 && !gone; ++i) {
      gone = run({"/bin/fusermount3", "-u", dir_}) == 0;
      if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (!gone) run({"/bin/fusermount3", "-u", "-z", dir_});
    int status = 0;
    waitpid(daemon_, &status, 0);
    return run({std::string(VPMFS_BIN_DIR) + "/fsck.vpmfs", "-n", image_});
  }

  void kill_daemon() {
    ::kill(daemon_, SIGKILL);
    int status;
    waitpid(daemon_, &status, 0);
    run({"/bin/fusermount3", "-u", "-z", dir_});
    mounted_ = false;
  }

  std::string path(const std::string& rel) const { return dir_ + "/" + rel; }
  const std::string& dir() const { return dir_; }
  const std::string& image() const { return image_; }
  bool mounted() const { return mounted_; }
  pid_t daemon() const { return daemon_; }
  // The daemon's -d output so far (a trace mount only).
  std::string trace() const {
    std::ifstream in(trace_path());
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  std::string trace_path() const { return base_ + ".trace"; }

  bool trace_ = false;
  std::string base_, image_, dir_, opts_;
  pid_t daemon_ = -1;
  bool mounted_ = false;
};

}  // namespace vpmfs::test
