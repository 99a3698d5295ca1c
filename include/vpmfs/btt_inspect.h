// Looking at a BTT as it is on media, for tools (vpmfs-ctl): every arena's info block and its
// backup, map entries and flog lanes. Nothing is written and nothing is recovered; damage is
// described rather than refused, and every value read from media is checked before it is used
// as an offset. The region may be changing underneath (a mounted image): each value is read
// once, so a view can be stale but never out of bounds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vpmfs/btt.h"
#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

// One copy of an arena's info block.
struct BttInfoCopy {
  uint64_t offset = 0;       // region offset where it was looked for
  bool signature = false;    // BTT_ARENA_INFO is there
  bool checksum_ok = false;  // Fletcher64 matches
  uint64_t checksum = 0;     // as stored
  std::string problem;       // why it is not a valid info block; empty: valid
  bool valid() const { return problem.empty(); }
};

struct BttArenaView {
  int index = 0;
  bool usable = false;       // a valid copy was found: info and the fields below are from it
  bool from_backup = false;  // the primary is invalid; the values come from the backup
  BttArenaInfo info;         // offsets absolute in the region (log_index from the flog)
  uint64_t nextoff = 0;      // as stored: relative to the arena; 0 for the last
  uint32_t infosize = 0;
  uint64_t first_lba = 0;   // first namespace LBA this arena exports
  bool error_flag = false;  // the info block's flags say the arena is in an error state
  BttInfoCopy primary;
  BttInfoCopy backup;
  bool backup_matches = false;  // the backup is byte for byte the primary
  std::string flog_problem;     // the flog's slot layout cannot be told (then slots (0,1))
};

// A map entry, as stored and as it resolves.
struct BttMapView {
  uint64_t lba = 0;  // namespace LBA
  int arena = 0;
  uint32_t premap = 0;
  uint32_t raw = 0;    // the 32-bit entry
  uint32_t block = 0;  // the postmap block it names (premap itself for the identity mapping)
  bool zero = false;   // Z
  bool error = false;  // E
  bool identity() const { return !zero && !error; }  // never written: block == premap
  bool in_range = true;                              // block < internal_nlba
};

struct BttFlogSlotView {
  uint32_t lba = 0;
  uint32_t old_map = 0;
  uint32_t new_map = 0;
  uint32_t seq = 0;
};

struct BttLaneView {
  uint32_t lane = 0;
  BttFlogSlotView slot[2];  // the lane's two live entries (the arena's log_index slots)
  int current = -1;         // the newer entry, 0 or 1; -1 if the sequence pair is impossible
};

class BttInspector {
 public:
  // Finds the arenas as Btt::open does (the v1.1 start, falling back to backups), writing
  // nothing. A namespace outside the region is an error; a damaged arena is not: the walk
  // stops there, arenas() ends with it (usable == false) and walk_error() says why.
  static Result<BttInspector> open(Region& region, const BttOpenOptions& options);

  uint64_t namespace_offset() const { return offset_; }
  uint64_t namespace_end() const { return end_; }
  const std::vector<BttArenaView>& arenas() const { return arenas_; }
  const Status& walk_error() const { return walk_error_; }
  // What the walk noticed: backup disagreements, a primary replaced by its backup.
  const std::vector<std::string>& notes() const { return notes_; }
  // Sectors exported by the usable arenas.
  uint64_t sector_count() const { return sector_count_; }

  Result<BttMapView> map_entry(uint64_t lba) const;
  // Every lane of a usable arena.
  Result<std::vector<BttLaneView>> lanes(int arena) const;

 private:
  BttInspector() = default;
  BttInfoCopy read_copy(uint64_t offset, uint64_t infooff) const;

  Region* region_ = nullptr;
  uint64_t offset_ = 0;
  uint64_t end_ = 0;
  std::vector<BttArenaView> arenas_;
  Status walk_error_;
  std::vector<std::string> notes_;
  uint64_t sector_count_ = 0;
};

// "0x1f00"
std::string hex_string(uint64_t value);
// "8-4-4-4-12" lower-case hex.
std::string uuid_string(const Uuid& uuid);

}  // namespace vpmfs
