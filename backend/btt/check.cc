// BTT check and repair. The invariant: every internal block is referenced exactly once, by a
// map entry or by one lane's newest flog entry (its free block). Repairs prefer the map, where
// the data is: a block both mapped and named free stays mapped, and the lane gets a block that
// nothing references.
#include <cstring>
#include <map>
#include <set>

#include "btt/arena.h"

namespace vpmfs {

using namespace btt;

namespace {

std::string str(const char* fmt, auto... args) {
  char buf[320];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

class ArenaChecker {
 public:
  ArenaChecker(Region& region, const ArenaGeometry& g, int index, bool repair,
               BttCheckReport& report)
      : region_(region), g_(g), index_(index), repair_(repair), report_(report) {}

  void run() {
    Status s = detect_log_indices(region_, g_, log_index_);
    indices_ok_ = s.is_ok();
    if (!indices_ok_) {
      problem(s.message());
      log_index_[0] = 0;
      log_index_[1] = 1;
    }
    read_lanes();
    roll_forward();
    count_references();
    if (repair_) mend();
  }

 private:
  struct LaneView {
    bool ok = false;
    uint32_t free = 0;
    FlogEntry cur{};
  };

  void problem(const std::string& what) {
    report_.problems.push_back(str("arena %d: ", index_) + what);
  }
  void repaired(const std::string& what) {
    report_.repairs.push_back(str("arena %d: ", index_) + what);
  }

  uint64_t flog_off(uint32_t lane, int slot) const {
    return g_.logoff + uint64_t(lane) * kFlogGroupSize + uint64_t(slot) * kFlogEntrySize;
  }
  uint64_t map_off(uint32_t premap) const { return g_.mapoff + uint64_t(premap) * kMapEntrySize; }
  uint64_t data_off(uint32_t block) const {
    return g_.dataoff + uint64_t(block) * g_.internal_lbasize;
  }
  uint32_t map_raw(uint32_t premap) const { return load<uint32_t>(region_, map_off(premap)); }
  uint32_t effective(uint32_t premap, uint32_t raw) const {
    return (raw & kMapNormal) == 0 ? premap : raw & kMapBlockMask;
  }
  void map_write(uint32_t premap, uint32_t entry) {
    region_.store32(map_off(premap), entry);
    region_.persist(map_off(premap), kMapEntrySize);
  }

  void read_lanes() {
    lanes_.resize(g_.nfree);
    if (!indices_ok_) return;  // every lane is rebuilt by repair
    for (uint32_t i = 0; i < g_.nfree; ++i) {
      FlogEntry e[2] = {load<FlogEntry>(region_, flog_off(i, log_index_[0])),
                        load<FlogEntry>(region_, flog_off(i, log_index_[1]))};
      int n = newer_entry(e[0].seq, e[1].seq);
      if (n < 0) {
        problem(str("lane %u: impossible flog sequence pair (%u, %u)", i, e[0].seq, e[1].seq));
        continue;
      }
      const FlogEntry& cur = e[n];
      uint32_t old_block = cur.old_map & kMapBlockMask;
      uint32_t new_block = cur.new_map & kMapBlockMask;
      if (cur.lba >= g_.external_nlba || old_block >= g_.internal_nlba ||
          new_block >= g_.internal_nlba) {
        problem(
            str("lane %u: flog entry out of range (lba %u, old block %u, new block %u; "
                "%u sectors, %u blocks)",
                i, cur.lba, old_block, new_block, g_.external_nlba, g_.internal_nlba));
        continue;
      }
      lanes_[i] = LaneView{true, old_block, cur};
    }
  }

  void roll_forward() {
    for (uint32_t i = 0; i < g_.nfree; ++i) {
      const LaneView& lane = lanes_[i];
      if (!lane.ok) continue;
      uint32_t old_block = lane.cur.old_map & kMapBlockMask;
      uint32_t new_block = lane.cur.new_map & kMapBlockMask;
      if (old_block == new_block) continue;
      uint32_t eff = effective(lane.cur.lba, map_raw(lane.cur.lba));
      if (eff == old_block) {
        // The normal state after a crash between an update's flog entry and its map entry:
        // the next open finishes it. Judged as that open will see it.
        override_[lane.cur.lba] = new_block | kMapNormal;
        if (repair_) map_write(lane.cur.lba, new_block | kMapNormal);
        report_.notes.push_back(
            str("arena %d: lane %u: interrupted update of LBA %u %s", index_, i, lane.cur.lba,
                repair_ ? "rolled forward" : "is rolled forward by the next open"));
      }
    }
  }

  uint32_t entry(uint32_t premap) const {
    auto it = override_.find(premap);
    return it != override_.end() ? it->second : map_raw(premap);
  }

  void count_references() {
    std::vector<bool> referenced(g_.internal_nlba, false);
    std::set<uint32_t> shared;
    for (uint32_t premap = 0; premap < g_.external_nlba; ++premap) {
      uint32_t block = effective(premap, entry(premap));
      if (block >= g_.internal_nlba) {
        problem(str("map entry of LBA %u points at block %u, beyond the %u data blocks", premap,
                    block, g_.internal_nlba));
        bad_map_.push_back(premap);
        continue;
      }
      if (referenced[block]) shared.insert(block);
      referenced[block] = true;
    }
    if (!shared.empty()) {
      // Second pass only over the shared blocks: who maps them.
      for (uint32_t premap = 0; premap < g_.external_nlba; ++premap) {
        uint32_t block = effective(premap, entry(premap));
        if (shared.count(block) != 0) owners_[block].push_back(premap);
      }
      for (const auto& [block, lbas] : owners_) {
        std::string who;
        for (uint32_t l : lbas) who += (who.empty() ? "" : ", ") + std::to_string(l);
        problem(
            str("block %u is mapped by %zu sectors (LBAs %s)", block, lbas.size(), who.c_str()));
      }
    }
    std::map<uint32_t, uint32_t> free_owner;
    for (uint32_t i = 0; i < g_.nfree; ++i) {
      LaneView& lane = lanes_[i];
      if (!lane.ok) continue;
      if (referenced[lane.free]) {
        auto other = free_owner.find(lane.free);
        if (other != free_owner.end()) {
          problem(str("lane %u: free block %u is also lane %u's free block", i, lane.free,
                      other->second));
        } else {
          problem(str("lane %u: free block %u is also mapped to a sector", i, lane.free));
        }
        lane.ok = false;
        continue;
      }
      referenced[lane.free] = true;
      free_owner[lane.free] = i;
    }
    for (uint32_t block = 0; block < g_.internal_nlba; ++block) {
      if (!referenced[block]) unreferenced_.push_back(block);
    }
    if (!unreferenced_.empty()) {
      problem(str("%zu data blocks are referenced by nothing (first: block %u)",
                  unreferenced_.size(), unreferenced_.front()));
    }
  }

  bool take_spare(uint32_t* block) {
    if (next_spare_ >= unreferenced_.size()) return false;
    *block = unreferenced_[next_spare_++];
    return true;
  }

  void mend() {
    // Shared blocks: the first sector keeps it, every other one gets a copy of its data.
    for (const auto& [block, lbas] : owners_) {
      for (std::size_t k = 1; k < lbas.size(); ++k) {
        uint32_t spare;
        if (!take_spare(&spare)) return out_of_spares();
        region_.write(data_off(spare), region_.at(data_off(block)), g_.external_lbasize);
        region_.persist(data_off(spare), g_.external_lbasize);
        map_write(lbas[k], spare | kMapNormal);
        repaired(str("LBA %u shared block %u with LBA %u; gave it a copy in block %u", lbas[k],
                     block, lbas[0], spare));
      }
    }
    // A map entry that points nowhere has lost its data: mark the sector bad.
    for (uint32_t premap : bad_map_) {
      uint32_t spare;
      if (!take_spare(&spare)) return out_of_spares();
      map_write(premap, spare | kMapError);
      repaired(
          str("LBA %u pointed beyond the arena; marked it bad (reads fail with EIO until it "
              "is rewritten)",
              premap));
    }
    // Lanes that cannot name a free block of their own start afresh with a spare one.
    for (uint32_t i = 0; i < g_.nfree; ++i) {
      if (lanes_[i].ok) continue;
      uint32_t spare;
      if (!take_spare(&spare)) return out_of_spares();
      uint64_t group = g_.logoff + uint64_t(i) * kFlogGroupSize;
      region_.zero(group, kFlogGroupSize);
      FlogEntry fresh{i, spare, spare, 1};
      region_.write(flog_off(i, log_index_[0]), &fresh, sizeof fresh);
      region_.persist(group, kFlogGroupSize);
      repaired(str("lane %u: reset its flog with free block %u", i, spare));
    }
  }

  void out_of_spares() { problem("no unreferenced block left to repair with"); }

  Region& region_;
  const ArenaGeometry& g_;
  int index_;
  bool repair_;
  BttCheckReport& report_;
  int log_index_[2] = {0, 1};
  bool indices_ok_ = false;
  std::vector<LaneView> lanes_;
  std::map<uint32_t, uint32_t> override_;  // map entries after roll-forward
  std::vector<uint32_t> bad_map_;
  std::map<uint32_t, std::vector<uint32_t>> owners_;  // shared block -> LBAs
  std::vector<uint32_t> unreferenced_;
  std::size_t next_spare_ = 0;
};

Status check_once(Region& region, const BttOpenOptions& o, bool repair, BttCheckReport& report) {
  auto ns = namespace_of(region, o.offset, o.size);
  if (!ns) return ns.status();
  std::vector<std::string> notes;
  Status walked = walk_arenas(region, *ns, notes, repair, [&](int index, const FoundInfo& found) {
    for (auto& n : notes) {
      report.problems.push_back(n);
      if (repair) report.repairs.push_back(n);
    }
    notes.clear();
    ++report.arenas;
    report.sectors += found.geometry.external_nlba;
    ArenaChecker(region, found.geometry, index, repair, report).run();
    return Status::ok();
  });
  if (!walked) {
    if (walked.error() == EINVAL) return walked;  // not a BTT at all
    report.problems.push_back(walked.message());
  }
  if (repair && region.mode() == PersistMode::writeback) {
    Status s = region.flush_channel().wait();
    if (!s) return s;
  }
  return Status::ok();
}

}  // namespace

Result<BttCheckReport> btt_check(Region& region, const BttOpenOptions& options, bool repair) {
  if (repair && region.read_only()) return Status(EROFS, "cannot repair a read-only image");
  BttCheckReport report;
  Status s = check_once(region, options, repair, report);
  if (!s) return s;
  if (repair && !report.problems.empty()) {
    BttCheckReport after;
    s = check_once(region, options, false, after);
    if (!s) return s;
    report.remaining = after.problems;
  }
  return report;
}

}  // namespace vpmfs
