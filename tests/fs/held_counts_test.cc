// HeldCounts: the lookup counts of held inodes, checked against std::map under random use.
#include "held_counts.h"

#include <map>

#include <gtest/gtest.h>

#include "vpmfs/random.h"

namespace vpmfs {
namespace {

TEST(HeldCounts, MatchesAMapUnderRandomHoldsAndForgets) {
  HeldCounts held;
  std::map<uint64_t, uint64_t> model;
  SplitMix64 rng(7);
  for (int round = 0; round < 200000; ++round) {
    // Clustered numbers, as an inode allocator gives them, so that runs form in the table.
    uint64_t ino = 1 + rng.below(round < 100000 ? 5000 : 500);
    uint64_t n = 1 + rng.below(3);
    if (rng.below(2) == 0) {
      held.add(ino, n);
      model[ino] += n;
    } else {
      uint64_t left = held.sub(ino, n);
      auto it = model.find(ino);
      uint64_t want = it == model.end() ? 0 : it->second - std::min(it->second, n);
      ASSERT_EQ(left, want) << "round " << round << ", inode " << ino;
      if (it != model.end()) {
        if (want == 0) {
          model.erase(it);
        } else {
          it->second = want;
        }
      }
    }
    ASSERT_EQ(held.size(), model.size());
    if (round % 1000 == 0) {
      for (const auto& [i, c] : model) ASSERT_EQ(held.get(i), c) << "inode " << i;
    }
    if (round == 100000) {
      // Most are forgotten, as after drop_caches: the table shrinks and keeps the rest.
      for (auto it = model.begin(); it != model.end();) {
        if (it->first > 400) {
          EXPECT_EQ(held.sub(it->first, it->second), 0u);
          it = model.erase(it);
        } else {
          ++it;
        }
      }
      EXPECT_TRUE(held.shrink());
      for (const auto& [i, c] : model) ASSERT_EQ(held.get(i), c) << "inode " << i;
    }
  }
  EXPECT_EQ(held.get(999999), 0u);
  EXPECT_EQ(held.sub(999999, 1), 0u);
}

}  // namespace
}  // namespace vpmfs
