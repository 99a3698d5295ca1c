// fsx-style file exerciser: seeded random operations on one file, each checked against an
// in-memory model of what the file must hold. Reproducible from its seed; on a miscompare it
// prints the operations that led there.
//
//   vpmfs-fsx [--seed N] [--ops N] [--max-size BYTES] [--no-mmap] [--no-fallocate]
//             [--no-copy-range] FILE
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>

#include "vpmfs/random.h"

namespace {

struct Config {
  uint64_t seed = 1;
  uint64_t ops = 10000;
  uint64_t max_size = 256 * 1024;
  bool mmap = true;
  bool fallocate = true;
  bool copy_range = true;
  std::string file;
};

class Exerciser {
 public:
  explicit Exerciser(const Config& c) : c_(c), rng_(c.seed) {}

  int run() {
    fd_ = ::open(c_.file.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd_ < 0) return fail("open " + c_.file + ": " + std::strerror(errno));
    for (uint64_t i = 1; i <= c_.ops; ++i) {
      op_ = i;
      int rc = step();
      if (rc != 0) return rc;
    }
    if (int rc = check_all("final"); rc != 0) return rc;
    ::close(fd_);
    std::printf("vpmfs-fsx: %llu operations, seed %llu, 0 miscompares\n",
                (unsigned long long)c_.ops, (unsigned long long)c_.seed);
    return 0;
  }

 private:
  void log(const std::string& what) {
    history_.push_back(std::to_string(op_) + ": " + what);
    if (history_.size() > 40) history_.pop_front();
  }

  int fail(const std::string& what) {
    std::fprintf(stderr, "vpmfs-fsx: FAILED at operation %llu (seed %llu): %s\n",
                 (unsigned long long)op_, (unsigned long long)c_.seed, what.c_str());
    std::fprintf(stderr, "last operations:\n");
    for (const auto& h : history_) std::fprintf(stderr, "  %s\n", h.c_str());
    return 1;
  }

  uint64_t pick_offset() { return rng_.below(c_.max_size); }
  uint64_t pick_length(uint64_t off) {
    uint64_t room = c_.max_size - off;
    uint64_t len =
        rng_.chance(1, 4) ? rng_.below(64) + 1 : rng_.below(std::min<uint64_t>(room, 65536)) + 1;
    return std::min(len, room);
  }

  int step() {
    switch (rng_.below(c_.mmap ? 10 : 8)) {
      case 0:
      case 1:
      case 2:
        return do_write();
      case 3:
      case 4:
        return do_read();
      case 5:
        return do_truncate();
      case 6:
        return c_.fallocate ? do_fallocate() : do_write();
      case 7:
        return c_.copy_range ? do_copy_range() : do_read();
      case 8:
        return do_mmap_read();
      default:
        return do_mmap_write();
    }
  }

  int do_write() {
    uint64_t off = pick_offset(), len = pick_length(off);
    std::string data(len, '\0');
    for (auto& ch : data) ch = char(rng_.next());
    log("write " + std::to_string(off) + "+" + std::to_string(len));
    if (::pwrite(fd_, data.data(), len, off_t(off)) != ssize_t(len)) {
      return fail(std::string("pwrite: ") + std::strerror(errno));
    }
    if (model_.size() < off + len) model_.resize(off + len, '\0');
    model_.replace(off, len, data);
    return 0;
  }

  int do_read() {
    uint64_t off = rng_.below(model_.size() + 1), len = pick_length(std::min(off, c_.max_size - 1));
    log("read " + std::to_string(off) + "+" + std::to_string(len));
    std::string buf(len, '\0');
    ssize_t n = ::pread(fd_, buf.data(), len, off_t(off));
    if (n < 0) return fail(std::string("pread: ") + std::strerror(errno));
    uint64_t want = off >= model_.size() ? 0 : std::min<uint64_t>(len, model_.size() - off);
    if (uint64_t(n) != want) {
      return fail("read returned " + std::to_string(n) + " bytes, expected " +
                  std::to_string(want));
    }
    return compare(buf.data(), off, want, "read");
  }

  int do_truncate() {
    uint64_t size = rng_.below(c_.max_size);
    log("truncate " + std::to_string(size));
    if (::ftruncate(fd_, off_t(size)) != 0)
      return fail(std::string("ftruncate: ") + std::strerror(errno));
    model_.resize(size, '\0');
    return check_size();
  }

  int do_fallocate() {
    uint64_t off = pick_offset(), len = pick_length(off);
    int which = int(rng_.below(3));
    static const int modes[3] = {0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 FALLOC_FL_ZERO_RANGE};
    static const char* names[3] = {"fallocate", "punch_hole", "zero_range"};
    log(std::string(names[which]) + " " + std::to_string(off) + "+" + std::to_string(len));
    if (::fallocate(fd_, modes[which], off_t(off), off_t(len)) != 0) {
      if (errno == EOPNOTSUPP) {
        c_.fallocate = false;
        std::fprintf(stderr, "vpmfs-fsx: fallocate not supported here; leaving it out\n");
        return 0;
      }
      return fail(std::string(names[which]) + ": " + std::strerror(errno));
    }
    if (which == 0) {
      if (model_.size() < off + len) model_.resize(off + len, '\0');
    } else {
      uint64_t end = which == 1 ? std::min<uint64_t>(off + len, model_.size()) : off + len;
      if (which == 2 && model_.size() < end) model_.resize(end, '\0');
      if (end > off) std::fill(model_.begin() + off, model_.begin() + end, '\0');
    }
    return check_size();
  }

  int do_copy_range() {
    if (model_.empty()) return 0;
    uint64_t src = rng_.below(model_.size()),
             len = std::min<uint64_t>(pick_length(src), model_.size() - src);
    uint64_t dst = pick_offset();
    len = std::min(len, c_.max_size - dst);
    // Overlapping ranges in one file are invalid for copy_file_range.
    if (len == 0 || (src < dst + len && dst < src + len)) return 0;
    log("copy_range " + std::to_string(src) + "->" + std::to_string(dst) + "+" +
        std::to_string(len));
    loff_t in = loff_t(src), out = loff_t(dst);
    uint64_t done = 0;
    while (done < len) {
      ssize_t n = ::copy_file_range(fd_, &in, fd_, &out, len - done, 0);
      if (n < 0) {
        if (errno == EOPNOTSUPP || errno == EXDEV || errno == ENOSYS) {
          c_.copy_range = false;
          std::fprintf(stderr, "vpmfs-fsx: copy_file_range not supported here; leaving it out\n");
          return 0;
        }
        return fail(std::string("copy_file_range: ") + std::strerror(errno));
      }
      if (n == 0) break;
      done += uint64_t(n);
    }
    std::string piece = model_.substr(src, done);
    if (model_.size() < dst + done) model_.resize(dst + done, '\0');
    model_.replace(dst, done, piece);
    return check_size();
  }

  int do_mmap_read() {
    if (model_.empty()) return 0;
    uint64_t off = rng_.below(model_.size()),
             len = std::min<uint64_t>(pick_length(off), model_.size() - off);
    log("mmap_read " + std::to_string(off) + "+" + std::to_string(len));
    uint64_t page = off & ~uint64_t(4095);
    void* p = ::mmap(nullptr, len + (off - page), PROT_READ, MAP_SHARED, fd_, off_t(page));
    if (p == MAP_FAILED) return fail(std::string("mmap: ") + std::strerror(errno));
    int rc = compare(static_cast<char*>(p) + (off - page), off, len, "mmap read");
    ::munmap(p, len + (off - page));
    return rc;
  }

  int do_mmap_write() {
    if (model_.empty()) return 0;
    uint64_t off = rng_.below(model_.size()),
             len = std::min<uint64_t>(pick_length(off), model_.size() - off);
    log("mmap_write " + std::to_string(off) + "+" + std::to_string(len));
    uint64_t page = off & ~uint64_t(4095);
    void* p =
        ::mmap(nullptr, len + (off - page), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, off_t(page));
    if (p == MAP_FAILED) return fail(std::string("mmap: ") + std::strerror(errno));
    std::string data(len, '\0');
    for (auto& ch : data) ch = char(rng_.next());
    std::memcpy(static_cast<char*>(p) + (off - page), data.data(), len);
    if (::msync(p, len + (off - page), MS_SYNC) != 0) {
      return fail(std::string("msync: ") + std::strerror(errno));
    }
    ::munmap(p, len + (off - page));
    model_.replace(off, len, data);
    return 0;
  }

  int check_size() {
    off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end != off_t(model_.size())) {
      return fail("file size " + std::to_string(end) + ", expected " +
                  std::to_string(model_.size()));
    }
    return 0;
  }

  int compare(const char* got, uint64_t off, uint64_t len, const char* what) {
    for (uint64_t i = 0; i < len; ++i) {
      if (got[i] != model_[off + i]) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "%s miscompare at byte %llu: got 0x%02x, expected 0x%02x",
                      what, (unsigned long long)(off + i), uint8_t(got[i]),
                      uint8_t(model_[off + i]));
        return fail(buf);
      }
    }
    return 0;
  }

  int check_all(const char* when) {
    log(std::string("check ") + when);
    if (int rc = check_size(); rc != 0) return rc;
    std::string buf(model_.size(), '\0');
    if (::pread(fd_, buf.data(), buf.size(), 0) != ssize_t(buf.size()))
      return fail("short final read");
    return compare(buf.data(), 0, buf.size(), "final read");
  }

  Config c_;
  vpmfs::SplitMix64 rng_;
  int fd_ = -1;
  uint64_t op_ = 0;
  std::string model_;
  std::deque<std::string> history_;
};

}  // namespace

int main(int argc, char** argv) {
  Config c;
  CLI::App app{"Seeded random file exerciser, checked against a model", "vpmfs-fsx"};
  app.add_option("--seed", c.seed, "random seed (the run is reproducible from it)");
  app.add_option("--ops", c.ops, "operations to run");
  app.add_option("--max-size", c.max_size, "largest file size to reach")
      ->check(CLI::Range(4096, 1 << 30));
  bool no_mmap = false, no_fallocate = false, no_copy = false;
  app.add_flag("--no-mmap", no_mmap, "leave out mmap reads and writes");
  app.add_flag("--no-fallocate", no_fallocate, "leave out fallocate, punch hole and zero range");
  app.add_flag("--no-copy-range", no_copy, "leave out copy_file_range");
  app.add_option("FILE", c.file, "file to exercise (created or truncated)")->required();
  CLI11_PARSE(app, argc, argv);
  c.mmap = !no_mmap;
  c.fallocate = !no_fallocate;
  c.copy_range = !no_copy;
  return Exerciser(c).run();
}
