// Checking (and repairing) a vpmfs image: image header, BTT, journal, and the filesystem's own
// structures — every reachable inode valid, every block owned once, bitmaps and link counts
// matching what the directory tree says.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vpmfs/status.h"

namespace vpmfs {

struct FsckOptions {
  bool repair = false;  // -y: fix what can be fixed
  // -p (preen, as fsck(8) runs it at boot): only what the next mount would do anyway (roll
  // interrupted BTT updates forward, replay the journal and the kill log), and that only when
  // the check finds nothing wrong; any problem is left for -y (exit code 4).
  bool preen = false;
  // The boot to check for (default: the kernel's boot_id): checkpoints a daemon killed on this
  // boot left in the kill log are part of the state to check, as the next mount replays them.
  std::optional<std::array<uint8_t, 16>> boot_id;
  // Wait this long for the image lock (RegionOptions::lock_wait_ms): a daemon just unmounted
  // may still be making its final commit.
  uint32_t lock_wait_ms = 0;
};

struct FsckReport {
  // What the next mount does as a matter of course after a crash or a kill (BTT updates it
  // rolls forward, a journal transaction or kill-log checkpoints it replays): the check judges
  // the volume as that mount will see it, and these are not problems.
  std::vector<std::string> notes;
  std::vector<std::string> problems;   // found, each naming what and where
  std::vector<std::string> repairs;    // done
  std::vector<std::string> remaining;  // still wrong after repair
  uint64_t inodes = 0;                 // in use
  uint64_t blocks = 0;                 // in use
  bool clean() const { return problems.empty(); }
  // fsck(8) exit codes: 0 clean, 1 errors corrected, 4 errors left uncorrected.
  int exit_code() const;
};

// Operational failures (cannot open, not a vpmfs image, I/O error) come back as a Status.
Result<FsckReport> fsck(const std::string& image, const FsckOptions& options);

}  // namespace vpmfs
