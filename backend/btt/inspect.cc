// A read-only view of a BTT for tools: the same arena walk and validation as open and check,
// with the damage described instead of refused.
#include "vpmfs/btt_inspect.h"

#include <cstring>

#include "btt/arena.h"
#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace btt;

namespace {

BttArenaInfo arena_info(const FoundInfo& found) {
  const InfoBlock& in = found.info;
  const ArenaGeometry& g = found.geometry;
  BttArenaInfo a;
  a.offset = g.infooff;
  a.size = g.size;
  a.version_major = in.version_major;
  a.version_minor = in.version_minor;
  a.external_lbasize = g.external_lbasize;
  a.internal_lbasize = g.internal_lbasize;
  a.external_nlba = g.external_nlba;
  a.internal_nlba = g.internal_nlba;
  a.nfree = g.nfree;
  a.dataoff = g.dataoff;
  a.mapoff = g.mapoff;
  a.logoff = g.logoff;
  a.info2off = g.info2off;
  a.flags = in.flags;
  std::memcpy(a.uuid.data(), in.uuid, a.uuid.size());
  std::memcpy(a.parent_uuid.data(), in.parent_uuid, a.parent_uuid.size());
  return a;
}

}  // namespace

std::string hex_string(uint64_t value) {
  return value == 0 ? "0x0" : hex(value);
}

std::string uuid_string(const Uuid& u) {
  char buf[40];
  std::snprintf(buf, sizeof buf,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
                u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
                u[15]);
  return buf;
}

BttInfoCopy BttInspector::read_copy(uint64_t offset, uint64_t infooff) const {
  BttInfoCopy copy;
  copy.offset = offset;
  if (offset < infooff || offset > end_ || end_ - offset < kPage) {
    copy.problem = "beyond the namespace";
    return copy;
  }
  auto info = load<InfoBlock>(*region_, offset);
  copy.signature = std::memcmp(info.signature, kSignature, sizeof info.signature) == 0;
  copy.checksum = info.checksum;
  InfoBlock zeroed = info;
  zeroed.checksum = 0;
  copy.checksum_ok = fletcher64(&zeroed, sizeof zeroed) == info.checksum;
  ArenaGeometry unused;
  Status s = validate_info(info, infooff, end_, &unused);
  if (!s) copy.problem = s.message();
  return copy;
}

Result<BttInspector> BttInspector::open(Region& region, const BttOpenOptions& options) {
  auto ns = namespace_of(region, options.offset, options.size);
  if (!ns) return ns.status();
  BttInspector in;
  in.region_ = &region;
  in.offset_ = ns->offset;
  in.end_ = ns->end;
  uint64_t next = ns->offset;  // where the arena after the last one found starts
  // mend = false: walk_arenas then only reads.
  in.walk_error_ =
      walk_arenas(region, *ns, in.notes_, false, [&](int index, const FoundInfo& found) {
        const ArenaGeometry& g = found.geometry;
        BttArenaView a;
        a.index = index;
        a.usable = true;
        a.info = arena_info(found);
        a.nextoff = g.nextoff;
        a.infosize = found.info.infosize;
        a.error_flag = (found.info.flags & kInfoFlagError) != 0;
        a.first_lba = in.sector_count_;
        a.primary = in.read_copy(g.infooff, g.infooff);
        a.from_backup = !a.primary.valid();
        // find_info took the backup from where the copy in use says it is.
        a.backup = in.read_copy(g.info2off, g.infooff);
        a.backup_matches = a.primary.valid() && a.backup.valid() &&
                           std::memcmp(region.at(g.infooff), region.at(g.info2off), kPage) == 0;
        if (Status s = detect_log_indices(region, g, a.info.log_index); !s) {
          a.flog_problem = s.message();
          a.info.log_index[0] = 0;
          a.info.log_index[1] = 1;
        }
        in.sector_count_ += g.external_nlba;
        next = g.nextoff == 0 ? ns->end : g.infooff + g.nextoff;
        in.arenas_.push_back(a);
        return Status::ok();
      });
  if (!in.walk_error_ && next < ns->end) {
    // Describe the arena the walk could not read: both places its info block could be.
    BttArenaView a;
    a.index = int(in.arenas_.size());
    a.info.offset = next;
    a.first_lba = in.sector_count_;
    a.primary = in.read_copy(next, next);
    uint64_t planned = std::min(kArenaMax, ns->end - next);
    a.backup = in.read_copy(next + (planned - planned % kPage) - kPage, next);
    in.arenas_.push_back(a);
  }
  return in;
}

Result<BttMapView> BttInspector::map_entry(uint64_t lba) const {
  for (const BttArenaView& a : arenas_) {
    if (!a.usable || lba < a.first_lba || lba - a.first_lba >= a.info.external_nlba) continue;
    BttMapView m;
    m.lba = lba;
    m.arena = a.index;
    m.premap = uint32_t(lba - a.first_lba);
    // validate_info put the whole map inside the namespace.
    m.raw = load<uint32_t>(*region_, a.info.mapoff + uint64_t(m.premap) * kMapEntrySize);
    m.zero = (m.raw & kMapZero) != 0;
    m.error = (m.raw & kMapError) != 0;
    m.block = m.identity() ? m.premap : m.raw & kMapBlockMask;
    m.in_range = m.block < a.info.internal_nlba;
    return m;
  }
  return Status(ERANGE, "LBA " + std::to_string(lba) + " is beyond the " +
                            std::to_string(sector_count_) + " sectors of the BTT");
}

Result<std::vector<BttLaneView>> BttInspector::lanes(int arena) const {
  if (arena < 0 || std::size_t(arena) >= arenas_.size() || !arenas_[arena].usable) {
    return Status(EINVAL, "no readable arena " + std::to_string(arena));
  }
  const BttArenaInfo& a = arenas_[arena].info;
  std::vector<BttLaneView> out(a.nfree);
  for (uint32_t lane = 0; lane < a.nfree; ++lane) {
    // validate_info put nfree groups between logoff and the backup info block.
    auto group = load<FlogGroup>(*region_, a.logoff + uint64_t(lane) * kFlogGroupSize);
    BttLaneView& v = out[lane];
    v.lane = lane;
    for (int i = 0; i < 2; ++i) {
      const FlogEntry& e = group.ent[a.log_index[i]];
      v.slot[i] = BttFlogSlotView{e.lba, e.old_map, e.new_map, e.seq};
    }
    v.current = newer_entry(v.slot[0].seq, v.slot[1].seq);
  }
  return out;
}

}  // namespace vpmfs
