// The kill log: what makes a SIGKILLed daemon lose nothing it acknowledged.
//
// Metadata changes live in the daemon's block cache until the next journal commit, so a killed
// daemon would lose every change since then. After each change, the changed blocks are copied
// into the kill log, a plain area of the mapped image: the page cache keeps those stores when
// the process dies. The next mount on the same boot replays them through a journal commit. A
// power failure or reboot changes the boot id, and the log is then ignored, because nothing
// ordered its stores against the device (docs/FORMAT.md, "Kill log").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <vector>

#include "format.h"
#include "vpmfs/region.h"

namespace vpmfs {

using BootId = std::array<uint8_t, 16>;

// /proc/sys/kernel/random/boot_id; empty if it cannot be read (then no kill log is kept).
std::optional<BootId> current_boot_id();

// The kill log's size for an image of this size: 1/64 of it, from 1 MiB to 64 MiB.
uint64_t kill_log_size_for(uint64_t image_size);

// For each transaction after `after_txn` that `boot` logged, oldest first: the last image of
// every block its checkpoints changed. Stops at the first damaged or stale record.
using KillImages = std::vector<std::map<uint64_t, std::vector<std::byte>>>;
KillImages read_kill_log(const Region& r, uint64_t offset, uint64_t size, uint32_t block_size,
                         uint64_t after_txn, const BootId& boot, uint64_t block_count);

class KillLog {
 public:
  KillLog(Region& r, uint64_t offset, uint64_t size, uint32_t block_size, const BootId& boot);

  // Starts the half of transaction txn afresh; its checkpoints follow.
  void start(uint64_t txn);
  // Appends a checkpoint of these blocks to the running transaction's half; false when the
  // half has no room left (the caller then commits instead).
  bool append(const std::vector<uint64_t>& lbas,
              const std::function<const std::byte*(uint64_t)>& image);
  // Invalidates both halves (after their contents reached the journal).
  void clear();

 private:
  uint64_t half(uint64_t txn) const { return offset_ + (txn % 2) * half_size_; }

  Region& r_;
  uint64_t offset_;
  uint64_t half_size_;
  uint32_t bs_;
  BootId boot_;
  uint64_t txn_ = 0;
  uint64_t nonce_ = 0;  // of the running half: records of an earlier start fail its checksums
  uint64_t seq_ = 0;
  uint64_t used_ = 0;  // bytes of the half in use, header included
};

}  // namespace vpmfs
