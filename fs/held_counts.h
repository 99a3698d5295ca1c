// The lookup counts a front end holds on inodes (the kernel's, through LOOKUP and FORGET), kept
// apart from the other in-memory state of an inode so that a million held inodes cost 12 bytes
// a slot rather than a Node each. Internal to fs/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace vpmfs {

// Open addressing with linear probing and backward-shift deletion (no tombstones), at most 3/4
// full. Inode 0 never exists, so it marks an empty slot. Not thread-safe: the volume lock guards
// it.
class HeldCounts {
 public:
  uint64_t get(uint64_t ino) const {
    if (inos_.empty()) return 0;
    for (std::size_t i = home(ino);; i = next(i)) {
      if (inos_[i] == ino) return counts_[i];
      if (inos_[i] == 0) return 0;
    }
  }

  void add(uint64_t ino, uint64_t n) {
    if ((size_ + 1) * 4 > inos_.size() * 3) grow();
    std::size_t i = home(ino);
    for (; inos_[i] != 0 && inos_[i] != ino; i = next(i)) {
    }
    if (inos_[i] == 0) {
      inos_[i] = ino;
      counts_[i] = 0;
      ++size_;
    }
    // Saturates: a count that large is never forgotten to zero, which only keeps a slot.
    counts_[i] = n > kMax - counts_[i] ? kMax : uint32_t(counts_[i] + n);
  }

  // Takes n off what ino holds (at most all of it) and returns what is left; at zero the slot
  // goes.
  uint64_t sub(uint64_t ino, uint64_t n) {
    if (inos_.empty()) return 0;
    std::size_t i = home(ino);
    for (; inos_[i] != ino; i = next(i)) {
      if (inos_[i] == 0) return 0;
    }
    if (counts_[i] != kMax && n < counts_[i]) return counts_[i] -= uint32_t(n);
    if (counts_[i] == kMax) return kMax;
    erase_at(i);
    return 0;
  }

  std::size_t size() const { return size_; }

  // Halves the table while it is at most 1/8 full; true if it shrank (its memory went back).
  bool shrink() {
    if (inos_.size() <= 64 || size_ * 8 > inos_.size()) return false;
    rehash(inos_.size() / 2);
    while (inos_.size() > 64 && size_ * 8 <= inos_.size()) rehash(inos_.size() / 2);
    return true;
  }

 private:
  static constexpr uint32_t kMax = UINT32_MAX;

  std::size_t home(uint64_t ino) const {
    // Fibonacci hashing: consecutive inode numbers spread over the table.
    return std::size_t((ino * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  std::size_t next(std::size_t i) const { return (i + 1) & (inos_.size() - 1); }

  void erase_at(std::size_t hole) {
    --size_;
    // Backward shift: pull later entries of the run into the hole when their home allows it.
    for (std::size_t i = next(hole);; i = next(i)) {
      if (inos_[i] == 0) break;
      std::size_t h = home(inos_[i]);
      bool movable = hole <= i ? (h <= hole || h > i) : (h <= hole && h > i);
      if (movable) {
        inos_[hole] = inos_[i];
        counts_[hole] = counts_[i];
        hole = i;
      }
    }
    inos_[hole] = 0;
  }

  void grow() { rehash(inos_.empty() ? 64 : inos_.size() * 2); }

  void rehash(std::size_t capacity) {
    std::vector<uint64_t> inos;
    std::vector<uint32_t> counts;
    inos.swap(inos_);
    counts.swap(counts_);
    inos_.assign(capacity, 0);
    counts_.assign(capacity, 0);
    shift_ = 64;
    for (std::size_t c = capacity; c > 1; c /= 2) --shift_;
    size_ = 0;
    for (std::size_t i = 0; i < inos.size(); ++i) {
      if (inos[i] != 0) add(inos[i], counts[i]);
    }
  }

  std::vector<uint64_t> inos_;
  std::vector<uint32_t> counts_;
  std::size_t size_ = 0;
  int shift_ = 64;
};

}  // namespace vpmfs
