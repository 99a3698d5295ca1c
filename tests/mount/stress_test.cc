// Workloads on a real mount: the fsx-style exerciser, an fsstress-style run of four processes,
// and a failing flush channel. Each ends with an unmount and a clean fsck.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mount_fixture.h"
#include "vpmfs/random.h"

namespace vpmfs {
namespace {

using test::capture;
using test::Mount;

const std::string kBin = VPMFS_BIN_DIR;

// VPMFS_STRESS_SCALE multiplies the operation counts (the soak label sets it).
uint64_t scaled(uint64_t n) {
  const char* s = std::getenv("VPMFS_STRESS_SCALE");
  return s != nullptr ? n * std::max(1ul, std::strtoul(s, nullptr, 10)) : n;
}

TEST(Stress, FsxOnTheMount) {
  Mount m("fsx", {}, "256M");
  ASSERT_TRUE(m.mounted());
  for (uint64_t seed : {1, 2}) {
    std::string ops = std::to_string(scaled(50000));
    auto [rc, out] = capture({kBin + "/vpmfs-fsx", "--seed", std::to_string(seed), "--ops", ops,
                              "--max-size", "4194304", m.path("fsx" + std::to_string(seed))},
                             /*want_stdout=*/true);
    EXPECT_EQ(rc, 0) << out;
    EXPECT_NE(out.find("0 miscompares"), std::string::npos) << out;
  }
  EXPECT_EQ(m.unmount(), 0) << "fsck.vpmfs -n after fsx";
}

// One fsstress-style worker: random namespace and data operations in a tree shared with the
// others. Errors that races between workers explain (ENOENT, EEXIST, ENOTEMPTY, ...) are
// expected; anything else is counted as a failure and reported.
int stress_worker(const std::string& root, uint64_t seed, uint64_t ops) {
  SplitMix64 rng(seed);
  auto name = [&](const char* prefix) {
    std::string path = root;
    if (rng.below(2) == 0) path += "/d" + std::to_string(rng.below(4));
    return path + "/" + prefix + std::to_string(rng.below(24));
  };
  std::vector<char> buf(256 * 1024);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = char(seed + i);
  int bad = 0;
  auto check = [&](int rc, const char* what) {
    if (rc >= 0) return;
    switch (errno) {
      case ENOENT:
      case EEXIST:
      case ENOTEMPTY:
      case ENOTDIR:
      case EISDIR:
      case EINVAL:  // renaming a directory into itself
      case EMLINK:
      case ELOOP:
        return;
      default:
        std::fprintf(stderr, "stress worker %llu: %s: %s\n", (unsigned long long)seed, what,
                     std::strerror(errno));
        ++bad;
    }
  };
  for (uint64_t i = 0; i < ops; ++i) {
    switch (rng.below(11)) {
      case 0:
        check(::mkdir(name("d").c_str(), 0755), "mkdir");
        break;
      case 1:
        check(::rmdir(name("d").c_str()), "rmdir");
        break;
      case 2: {
        int fd = ::open(name("f").c_str(), O_CREAT | O_WRONLY, 0644);
        check(fd, "create");
        if (fd >= 0) {
          std::size_t len = rng.below(buf.size());
          check(int(::pwrite(fd, buf.data(), len, off_t(rng.below(1 << 20)))), "write");
          ::close(fd);
        }
        break;
      }
      case 3:
        check(::unlink(name("f").c_str()), "unlink");
        break;
      case 4:
        check(::rename(name("f").c_str(), name("f").c_str()), "rename");
        break;
      case 5:
        check(::rename(name("d").c_str(), name("d").c_str()), "rename dir");
        break;
      case 6:
        check(::link(name("f").c_str(), name("f").c_str()), "link");
        break;
      case 7:
        check(::symlink("target", name("s").c_str()), "symlink");
        break;
      case 8:
        check(::truncate(name("f").c_str(), off_t(rng.below(2 << 20))), "truncate");
        break;
      case 9: {
        std::string value = "v" + std::to_string(i);
        int rc = ::setxattr(name("f").c_str(), "user.stress", value.data(), value.size(), 0);
        // Until xattrs land on a volume, EOPNOTSUPP is the honest answer.
        if (rc < 0 && errno == EOPNOTSUPP) break;
        check(rc, "setxattr");
        break;
      }
      case 10: {
        int fd = ::open(name("f").c_str(), O_RDONLY);
        if (fd >= 0) {
          check(int(::pread(fd, buf.data(), buf.size(), 0)), "read");
          if (rng.below(8) == 0) check(::fsync(fd), "fsync");
          ::close(fd);
        }
        break;
      }
    }
  }
  return bad == 0 ? 0 : 1;
}

TEST(Stress, FourProcessesThenCleanFsck) {
  for (const char* mode : {"sync_dax=direct", "sync_dax=writeback"}) {
    // Directories renamed into one another carry files out of the names the workers use, so the
    // tree only grows: the volume grows with the number of operations.
    Mount m(std::string("fsstress-") + (mode + 9), {mode}, std::to_string(scaled(256)) + "M");
    ASSERT_TRUE(m.mounted());
    std::string root = m.path("stress");
    ASSERT_EQ(::mkdir(root.c_str(), 0755), 0);
    std::vector<pid_t> workers;
    for (uint64_t w = 0; w < 4; ++w) {
      pid_t pid = fork();
      if (pid == 0) _exit(stress_worker(root, 1000 + w, scaled(2500)));
      workers.push_back(pid);
    }
    for (pid_t pid : workers) {
      int status = 0;
      waitpid(pid, &status, 0);
      struct statvfs st {};
      ::statvfs(root.c_str(), &st);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
          << mode << ": a worker saw an unexpected error (see stderr); free blocks " << st.f_bfree
          << " of " << st.f_blocks << ", free inodes " << st.f_ffree << " of " << st.f_files;
    }
    EXPECT_EQ(m.unmount(), 0) << mode << ": fsck.vpmfs -n after the stress run";
  }
}

TEST(Stress, FailedFlushGivesEioAndTurnsTheVolumeReadOnly) {
  Mount m("eio", {"sync_dax=writeback", "test_faults"});
  ASSERT_TRUE(m.mounted());
  int fd = ::open(m.path("kept").c_str(), O_CREAT | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, "durable", 7), 7);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);

  ASSERT_EQ(::kill(m.daemon(), SIGUSR1), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  fd = ::open(m.path("lost").c_str(), O_CREAT | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, "not durable", 11), 11);
  EXPECT_EQ(::fsync(fd), -1);
  EXPECT_EQ(errno, EIO);
  ::close(fd);
  // From now on the volume refuses changes and says why.
  EXPECT_LT(::mkdir(m.path("after").c_str(), 0755), 0);
  EXPECT_EQ(errno, EROFS);
  fd = ::open(m.path("kept").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  char buf[8] = {};
  EXPECT_EQ(::read(fd, buf, sizeof buf), 7) << "reads still work";
  ::close(fd);

  // The next mount (with a working flush channel) has everything fsync'd before the failure.
  ASSERT_EQ(m.remount(), 0) << "fsck.vpmfs -n after the failure";
  std::ifstream in(m.path("kept"));
  std::string text((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(text, "durable");
  in.close();
  EXPECT_EQ(m.unmount(), 0);
}

// SIGKILL mid-workload: every write the application saw succeed, and every file it saw created,
// is there after the next mount, which recovers on its own; fsck is clean.
TEST(Stress, SigkillLosesNothingAcknowledged) {
  // sync_dax=direct needs an image on persistent memory (the disk run of this test has none).
  std::vector<const char*> modes = {"sync_dax=writeback"};
  if (Mount::images_on_pmem()) modes.push_back("sync_dax=direct");
  for (const char* mode : modes) {
    Mount m(std::string("kill-") + (mode + 9), {mode}, "128M");
    ASSERT_TRUE(m.mounted());
    std::string acks = "/dev/shm/vpmfs-acks-" + std::to_string(getpid());
    std::vector<pid_t> writers;
    for (int w = 0; w < 3; ++w) {
      pid_t pid = fork();
      if (pid == 0) {
        // Chunks of 3000 bytes (straddling blocks) appended to files w-0, w-1, ...; each
        // acknowledged chunk is noted outside the mount.
        int log = ::open((acks + "-" + std::to_string(w)).c_str(),
                         O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
        for (int file = 0;; ++file) {
          std::string path = m.path(std::to_string(w) + "-" + std::to_string(file));
          int fd = ::open(path.c_str(), O_CREAT | O_WRONLY, 0644);
          if (fd < 0) _exit(0);
          for (int chunk = 0; chunk < 40; ++chunk) {
            std::string data(3000, char('A' + (w * 7 + file * 3 + chunk) % 26));
            if (::pwrite(fd, data.data(), data.size(), off_t(chunk) * 3000) != 3000) _exit(0);
            std::string note = std::to_string(file) + " " + std::to_string(chunk) + "\n";
            if (::write(log, note.data(), note.size()) != ssize_t(note.size())) _exit(1);
          }
          ::close(fd);
        }
      }
      writers.push_back(pid);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    m.kill_daemon();
    for (pid_t pid : writers) {
      int status = 0;
      waitpid(pid, &status, 0);
    }
    m.start();  // recovers on its own: no fsck before the mount
    ASSERT_TRUE(m.mounted());
    uint64_t checked = 0;
    for (int w = 0; w < 3; ++w) {
      std::ifstream log(acks + "-" + std::to_string(w));
      int file, chunk;
      while (log >> file >> chunk) {
        std::string path = m.path(std::to_string(w) + "-" + std::to_string(file));
        int fd = ::open(path.c_str(), O_RDONLY);
        ASSERT_GE(fd, 0) << mode << ": " << path << " was created and written, and is gone";
        char buf[3000];
        ASSERT_EQ(::pread(fd, buf, sizeof buf, off_t(chunk) * 3000), 3000)
            << mode << ": " << path << " chunk " << chunk;
        ::close(fd);
        EXPECT_EQ(std::string(buf, 3000),
                  std::string(3000, char('A' + (w * 7 + file * 3 + chunk) % 26)))
            << mode << ": " << path << " chunk " << chunk << " lost acknowledged data";
        ++checked;
      }
      ::unlink((acks + "-" + std::to_string(w)).c_str());
    }
    std::fprintf(stderr, "%s: %llu acknowledged writes checked after SIGKILL\n", mode,
                 (unsigned long long)checked);
    EXPECT_GT(checked, 100u) << "the workload should have run before the kill";
    EXPECT_EQ(m.unmount(), 0) << mode << ": fsck.vpmfs -n after the kill and remount";
  }
}

}  // namespace
}  // namespace vpmfs
