// Metadata rates through the kernel, on any mounted filesystem: creates (open O_CREAT|O_EXCL and
// close), stats and unlinks of N empty files spread over D directories, each phase timed on
// its own. tools/bench/peers.sh runs it on vpmfs and its peers side by side.
//
//   vpmfs-mdbench DIR [--files N] [--dirs D] [--json] [--create-only]
//
// DIR must exist; the files go into DIR/mdbench.PID/d<k>/f<i> and are gone at the end, unless
// --create-only: then they are only created (and stay), for tools/bench/memory.sh.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "vpmfs-mdbench: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

// Runs op on every path and returns operations per second.
template <class Op>
double rate(const std::vector<std::string>& paths, Op op) {
  auto start = Clock::now();
  for (const auto& p : paths) op(p);
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return double(paths.size()) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vpmfs-mdbench: create, stat and unlink rates of empty files"};
  std::string dir;
  uint64_t files = 20000;
  uint64_t dirs = 10;
  bool json = false;
  bool create_only = false;
  app.add_option("DIR", dir, "directory on the filesystem to measure")->required();
  app.add_option("--files", files, "files in all (default 20000)")->check(CLI::Range(1, 10000000));
  app.add_option("--dirs", dirs, "directories they are spread over (default 10)")
      ->check(CLI::Range(1, 100000));
  app.add_flag("--json", json, "one JSON object instead of text");
  app.add_flag("--create-only", create_only, "create the files, time that, and leave them");
  CLI11_PARSE(app, argc, argv);

  std::string top = dir + "/mdbench." + std::to_string(::getpid());
  if (::mkdir(top.c_str(), 0755) != 0) die("mkdir " + top);
  for (uint64_t d = 0; d < dirs; ++d) {
    std::string sub = top + "/d" + std::to_string(d);
    if (::mkdir(sub.c_str(), 0755) != 0) die("mkdir " + sub);
  }
  std::vector<std::string> paths;
  paths.reserve(files);
  for (uint64_t i = 0; i < files; ++i) {
    paths.push_back(top + "/d" + std::to_string(i % dirs) + "/f" + std::to_string(i));
  }

  double creates = rate(paths, [](const std::string& p) {
    int fd = ::open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644);
    if (fd < 0) die("create " + p);
    ::close(fd);
  });
  if (create_only) {
    std::printf(
        json ? "{\"files\": %llu, \"create_per_s\": %.0f}\n" : "%llu files: create %.0f/s\n",
        (unsigned long long)files, creates);
    return 0;
  }
  double stats = rate(paths, [](const std::string& p) {
    struct stat st;
    if (::stat(p.c_str(), &st) != 0) die("stat " + p);
  });
  double unlinks = rate(paths, [](const std::string& p) {
    if (::unlink(p.c_str()) != 0) die("unlink " + p);
  });
  for (uint64_t d = 0; d < dirs; ++d) ::rmdir((top + "/d" + std::to_string(d)).c_str());
  ::rmdir(top.c_str());

  if (json) {
    std::printf(
        "{\"files\": %llu, \"create_per_s\": %.0f, \"stat_per_s\": %.0f, "
        "\"unlink_per_s\": %.0f}\n",
        (unsigned long long)files, creates, stats, unlinks);
  } else {
    std::printf("%llu files: create %.0f/s, stat %.0f/s, unlink %.0f/s\n",
                (unsigned long long)files, creates, stats, unlinks);
  }
  return 0;
}
