// Helpers shared by the test binaries.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "vpmfs/checksum.h"
#include "vpmfs/region.h"

#ifndef VPMFS_TEST_TMP
#define VPMFS_TEST_TMP "/dev/shm"
#endif

namespace vpmfs::test {

// Where test images go: $VPMFS_TEST_TMP if set (ctest runs some binaries a second time with
// images on the root disk), else the directory the build chose.
inline std::string test_tmp() {
  const char* dir = std::getenv("VPMFS_TEST_TMP");
  return dir != nullptr && *dir != '\0' ? dir : VPMFS_TEST_TMP;
}

// A unique image path, removed when the object goes away.
class TempPath {
 public:
  explicit TempPath(const std::string& name, const std::string& dir = test_tmp()) {
    static std::atomic<int> counter{0};
    path_ = dir + "/vpmfs-test-" + std::to_string(::getpid()) + "-" +
            std::to_string(counter.fetch_add(1)) + "-" + name;
    std::remove(path_.c_str());
  }
  ~TempPath() { std::remove(path_.c_str()); }
  TempPath(const TempPath&) = delete;
  TempPath& operator=(const TempPath&) = delete;
  const std::string& str() const { return path_; }
  operator const std::string&() const { return path_; }  // NOLINT

 private:
  std::string path_;
};

// `len` bytes that depend only on `seed`.
inline std::string random_bytes(const std::string& seed, std::size_t len) {
  std::mt19937_64 rng(xxhash64(seed.data(), seed.size()));
  std::string s(len, '\0');
  for (char& c : s) c = char(rng());
  return s;
}

// A region observer that stores as the region would and watches only the device flushes:
// subclasses say what happens around each.
class FlushObserver : public RegionObserver {
 public:
  void store(std::byte* base, uint64_t off, const void* src, std::size_t len) override {
    std::memcpy(base + off, src, len);
  }
  void flush(uint64_t, std::size_t) override {}
  void fence() override {}
  void mark_dirty(uint64_t, std::size_t) override {}
};

}  // namespace vpmfs::test
