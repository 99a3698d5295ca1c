// Finding a BTT's arenas and validating their info blocks, shared by open and check.
#include <cstring>

#include "btt/arena.h"

namespace vpmfs::btt {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

Result<Namespace> namespace_of(const Region& region, uint64_t offset, uint64_t size) {
  if (offset % kPage != 0) return Status(EINVAL, "BTT offset must be 4 KiB aligned");
  if (offset > region.size()) return Status(EINVAL, "BTT offset is beyond the end of the image");
  uint64_t end = size == 0 ? region.size() : offset + size;
  if (end < offset || end > region.size()) {
    return Status(EINVAL, "BTT namespace extends beyond the end of the image");
  }
  return Namespace{offset, end};
}

std::vector<ArenaGeometry> plan_namespace(uint64_t first, uint64_t end, uint32_t lbasize,
                                          uint32_t nfree) {
  std::vector<ArenaGeometry> arenas;
  uint64_t off = first;
  uint64_t remaining = end > first ? end - first : 0;
  while (remaining > 0) {
    uint64_t size = std::min(kArenaMax, remaining);
    remaining -= size;
    if (size < kArenaMin) break;
    ArenaGeometry g = plan_arena(off, size, lbasize, nfree);
    g.nextoff = remaining >= kArenaMin ? size : 0;
    arenas.push_back(g);
    off += size;
  }
  return arenas;
}

bool has_signature(const Region& region, uint64_t offset, uint64_t end) {
  for (uint64_t first : {offset, offset + kV11Offset}) {
    if (first + kPage > end) continue;
    uint64_t size = std::min(kArenaMax, end - first);
    for (uint64_t off : {first, first + (size - size % kPage) - kPage}) {
      if (off + kPage <= end && std::memcmp(region.at(off), kSignature, sizeof kSignature) == 0) {
        return true;
      }
    }
  }
  return false;
}

Result<FoundInfo> find_info(Region& region, uint64_t infooff, uint64_t end, int index,
                            std::vector<std::string>& notes, bool mend) {
  std::string where = "arena " + std::to_string(index) + " at " + hex(infooff);
  if (infooff > end || end - infooff < kPage)
    return Status(EUCLEAN, where + ": beyond the namespace");
  FoundInfo found;
  found.info = load<InfoBlock>(region, infooff);
  Status primary = validate_info(found.info, infooff, end, &found.geometry);
  if (primary) {
    uint64_t backup_off = found.geometry.info2off;
    if (std::memcmp(region.at(backup_off), &found.info, sizeof found.info) != 0) {
      InfoBlock backup = load<InfoBlock>(region, backup_off);
      ArenaGeometry unused;
      Status b = validate_info(backup, infooff, end, &unused);
      notes.push_back(
          where + ": backup info block " +
          (b ? std::string("differs from the primary") : "invalid (" + b.message() + ")") +
          (mend ? "; rewrote it from the primary" : ""));
      if (mend) {
        region.write(backup_off, &found.info, sizeof found.info);
        region.persist(backup_off, sizeof found.info);
      }
    }
    return found;
  }
  // The primary says nothing trustworthy. The backup sits in the last page of the arena, which
  // format() sized min(512 GiB, rest of the namespace).
  uint64_t planned = std::min(kArenaMax, end - infooff);
  uint64_t backup_off = infooff + (planned - planned % kPage) - kPage;
  InfoBlock backup = load<InfoBlock>(region, backup_off);
  ArenaGeometry g;
  Status second = validate_info(backup, infooff, end, &g);
  if (!second || g.info2off != backup_off) {
    return Status(EUCLEAN, where + ": info block invalid (" + primary.message() +
                               ") and no valid backup at " + hex(backup_off) + " (" +
                               (second ? "it names another place" : second.message()) + ")");
  }
  notes.push_back(where + ": primary info block invalid (" + primary.message() +
                  "); using the backup at " + hex(backup_off) +
                  (mend ? " and restored the primary from it" : ""));
  if (mend) {
    region.write(infooff, &backup, sizeof backup);
    region.persist(infooff, sizeof backup);
  }
  found.info = backup;
  found.geometry = g;
  return found;
}

Status walk_arenas(Region& region, const Namespace& ns, std::vector<std::string>& notes, bool mend,
                   const std::function<Status(int, const FoundInfo&)>& visit) {
  // v2.0 keeps its first info block at the start of the namespace, v1.1 4 KiB in.
  uint64_t off = ns.offset;
  {
    std::vector<std::string> v2_notes, v11_notes;
    auto v2 = find_info(region, off, ns.end, 0, v2_notes, false);
    if (!v2 || v2->info.version_major != 2) {
      auto v11 = find_info(region, off + kV11Offset, ns.end, 0, v11_notes, false);
      if (v11 && v11->info.version_major == 1) off += kV11Offset;
    }
  }
  for (int index = 0;; ++index) {
    auto found = find_info(region, off, ns.end, index, notes, mend);
    if (!found) {
      if (index == 0 && !has_signature(region, ns.offset, ns.end)) {
        return Status(EINVAL, "no BTT at offset " + hex(ns.offset) + " of " + region.path() +
                                  ": no BTT_ARENA_INFO signature");
      }
      return found.status();
    }
    Status s = visit(index, *found);
    if (!s) return s;
    if (found->geometry.nextoff == 0) return Status::ok();
    off = found->geometry.infooff + found->geometry.nextoff;
  }
}

}  // namespace vpmfs::btt
