// Directories: records in the directory's blocks, found through an in-memory name index.
#include <dirent.h>
#include <sys/random.h>

#include <cstring>

#include "volume.h"
#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

// The index keeps a record's position / 8 in 32 bits (DirIndex::Slot): a directory stops
// growing at 32 GiB, a hundred million names or more.
constexpr uint64_t kMaxDirSize = uint64_t(UINT32_MAX) * 8;

// Calls fn(offset, header) for the records of a directory block in order until fn returns
// false. EUCLEAN if the records do not cover the block exactly (docs/FORMAT.md 4.7).
template <typename Fn>
Status walk_records(const std::byte* block, uint32_t bs, Fn&& fn) {
  for (uint32_t off = 0; off < bs;) {
    DirRecordHeader h;
    if (off + sizeof h > bs) return Status(EUCLEAN, "damaged directory block");
    std::memcpy(&h, block + off, sizeof h);
    if (h.rec_len < sizeof h || h.rec_len % 8 != 0 || off + h.rec_len > bs) {
      return Status(EUCLEAN, "damaged directory block");
    }
    if (!fn(off, h)) break;
    off += h.rec_len;
  }
  return Status::ok();
}

}  // namespace

// --- the name index ---------------------------------------------------------------------------

uint32_t VolumeImpl::DirIndex::hash(std::string_view name) const {
  return uint32_t(xxhash64(name.data(), name.size(), seed));
}

VolumeImpl::DirIndex::Slot* VolumeImpl::DirIndex::find(VolumeImpl& v, Inode& dir,
                                                       std::string_view name) {
  if (slots.empty()) return nullptr;
  uint32_t h = hash(name);
  uint64_t mask = slots.size() - 1;
  for (uint64_t i = h & mask; slots[i].record != 0; i = (i + 1) & mask) {
    if (slots[i].hash != h) continue;
    // The same hash: the record says whether it is the same name.
    uint64_t position = slots[i].position();
    auto lba = v.bmap(dir, position / v.bs_, false, nullptr);
    if (!lba || *lba == 0) continue;
    const std::byte* p = v.meta(*lba) + position % v.bs_;
    DirRecordHeader r;
    std::memcpy(&r, p, sizeof r);
    if (r.name_len == name.size() && std::memcmp(p + sizeof r, name.data(), name.size()) == 0) {
      return &slots[i];
    }
  }
  return nullptr;
}

void VolumeImpl::DirIndex::insert(uint32_t h, uint64_t position) {
  auto place = [this](Slot s) {
    uint64_t mask = slots.size() - 1;
    uint64_t i = s.hash & mask;
    while (slots[i].record != 0) i = (i + 1) & mask;
    slots[i] = s;
  };
  // At most 3/4 full: a probe for a name that is not there (every create makes one) then looks
  // at no more than eight or nine slots on average: a cache line or two.
  if ((names + 1) * 4 > slots.size() * 3) {
    std::vector<Slot> old(std::max<std::size_t>(16, slots.size() * 2));
    old.swap(slots);
    for (const Slot& s : old) {
      if (s.record != 0) place(s);
    }
  }
  place(Slot{h, uint32_t(position / 8 + 1)});
  ++names;
}

void VolumeImpl::DirIndex::erase(Slot* slot) {
  // Backward shift, instead of a tombstone: each later slot of the run moves up into the hole
  // unless that would put it before its home slot. A probe then still ends at the first empty
  // slot, and the table never fills with the dead.
  uint64_t mask = slots.size() - 1;
  uint64_t hole = uint64_t(slot - slots.data());
  for (uint64_t i = (hole + 1) & mask; slots[i].record != 0; i = (i + 1) & mask) {
    uint64_t home = slots[i].hash & mask;
    if (((i - home) & mask) >= ((i - hole) & mask)) {
      slots[hole] = slots[i];
      hole = i;
    }
  }
  slots[hole] = Slot{};
  --names;
}

void VolumeImpl::DirIndex::set_free(uint64_t block, uint32_t largest) {
  if (block == free_bytes.size()) free_bytes.push_back(0);
  roomy.erase({free_bytes[block], block});
  free_bytes[block] = largest;
  if (largest >= dir_record_len(1)) roomy.insert({largest, block});
}

VolumeImpl::DirIndex& VolumeImpl::dir_index(uint64_t dino, Inode& dir) {
  Node& n = node(dino);
  if (n.dir) return *n.dir;
  // Built once per directory: from then on lookups and creates touch only the blocks they need.
  auto index = std::make_unique<DirIndex>();
  if (getrandom(&index->seed, sizeof index->seed, 0) != sizeof index->seed) index->seed = dino;
  uint64_t blocks = std::min(dir.size, kMaxDirSize) / bs_;
  index->free_bytes.assign(blocks, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    auto lba = bmap(dir, b, false, nullptr);
    if (!lba || *lba == 0) continue;
    const std::byte* p = meta(*lba);
    uint32_t largest = 0;
    Status s = walk_records(p, bs_, [&](uint32_t off, const DirRecordHeader& h) {
      if (h.ino == 0) {
        largest = std::max<uint32_t>(largest, h.rec_len);
      } else if (sizeof h + h.name_len <= h.rec_len) {
        std::string_view name(reinterpret_cast<const char*>(p + off + sizeof h), h.name_len);
        index->insert(index->hash(name), b * bs_ + off);
      }
      return true;
    });
    // A damaged block keeps the names found before the damage and takes no new ones.
    if (s) index->set_free(b, largest);
  }
  n.dir = std::move(index);
  return *n.dir;
}

// --- directory operations ---------------------------------------------------------------------

Result<uint64_t> VolumeImpl::dir_find(uint64_t dino, Inode& dir, std::string_view name,
                                      uint32_t* type) {
  DirIndex::Slot* slot = dir_index(dino, dir).find(*this, dir, name);
  if (slot == nullptr) return Status(ENOENT, std::string(name) + ": no such entry");
  uint64_t position = slot->position();
  auto lba = bmap(dir, position / bs_, false, nullptr);
  if (!lba) return lba.status();
  DirRecordHeader h;
  std::memcpy(&h, meta(*lba) + position % bs_, sizeof h);
  if (type != nullptr) *type = h.type;
  return h.ino;
}

Status VolumeImpl::dir_add(uint64_t dino, Inode& dir, std::string_view name, uint64_t ino,
                           uint32_t type) {
  DirIndex& index = dir_index(dino, dir);
  uint32_t need = dir_record_len(name.size());
  // The block whose largest free record fits the name most tightly; a new block if none can
  // take it.
  auto room = index.roomy.lower_bound({need, 0});
  uint64_t block;
  std::byte* p;
  if (room == index.roomy.end()) {
    if (dir.size + bs_ > kMaxDirSize) return Status(ENOSPC, "the directory is full");
    block = dir.size / bs_;
    bool fresh = false;
    auto lba = bmap(dir, block, true, &fresh);
    if (!lba) return lba.status();
    p = meta_new(*lba);
    DirRecordHeader empty{0, uint16_t(bs_), 0, 0, 0};
    std::memcpy(p, &empty, sizeof empty);
    dir.size += bs_;
    index.set_free(block, bs_);
  } else {
    block = room->second;
    auto lba = bmap(dir, block, false, nullptr);
    if (!lba) return lba.status();
    p = meta_mut(*lba);
  }
  // The first free record big enough takes the name; what is left of it stays free.
  uint32_t at = bs_;
  DirRecordHeader h{};
  uint32_t largest = 0;  // of the other free records
  Status s = walk_records(p, bs_, [&](uint32_t off, const DirRecordHeader& r) {
    if (r.ino == 0 && r.rec_len >= need && at == bs_) {
      at = off;
      h = r;
    } else if (r.ino == 0) {
      largest = std::max<uint32_t>(largest, r.rec_len);
    }
    return true;
  });
  if (!s) return s;
  if (at == bs_) return Status(EUCLEAN, "directory free-space index is out of date");
  uint32_t rest = h.rec_len - need;
  bool split = rest >= sizeof(DirRecordHeader) + 8;
  uint16_t used_len = uint16_t(split ? need : h.rec_len);
  DirRecordHeader used{ino, used_len, uint8_t(name.size()), uint8_t(type), 0};
  std::memcpy(p + at, &used, sizeof used);
  std::memcpy(p + at + sizeof used, name.data(), name.size());
  if (split) {
    DirRecordHeader free_rec{0, uint16_t(rest), 0, 0, 0};
    std::memcpy(p + at + need, &free_rec, sizeof free_rec);
    largest = std::max(largest, rest);
  }
  index.set_free(block, largest);
  index.insert(index.hash(name), block * bs_ + at);
  return Status::ok();
}

Status VolumeImpl::dir_remove(uint64_t dino, Inode& dir, std::string_view name) {
  DirIndex& index = dir_index(dino, dir);
  DirIndex::Slot* slot = index.find(*this, dir, name);
  if (slot == nullptr) return Status(ENOENT, std::string(name) + ": no such entry");
  uint64_t block = slot->position() / bs_;
  uint32_t at = uint32_t(slot->position() % bs_);
  auto lba = bmap(dir, block, false, nullptr);
  if (!lba) return lba.status();
  std::byte* p = meta_mut(*lba);
  // The record before it, to merge with if it is free.
  uint32_t prev = bs_;
  DirRecordHeader prev_h{};
  bool found = false;
  Status s = walk_records(p, bs_, [&](uint32_t off, const DirRecordHeader& r) {
    if (off >= at) {
      found = off == at;
      return false;
    }
    prev = off;
    prev_h = r;
    return true;
  });
  if (!s) return s;
  if (!found) return Status(EUCLEAN, "directory name index is out of date");
  DirRecordHeader h;
  std::memcpy(&h, p + at, sizeof h);
  DirRecordHeader free_rec{0, h.rec_len, 0, 0, 0};
  // Free space merges with free neighbours on both sides, so that a block emptied in any order
  // is one free record again. No used record moves, so cookies stay valid: readdir resumes
  // inside a free record by walking the block from its start.
  uint32_t next = at + h.rec_len;
  if (next < bs_) {
    DirRecordHeader n;
    std::memcpy(&n, p + next, sizeof n);
    if (n.ino == 0 && n.rec_len >= sizeof n && n.rec_len % 8 == 0 && next + n.rec_len <= bs_) {
      free_rec.rec_len = uint16_t(free_rec.rec_len + n.rec_len);
    }
  }
  if (prev != bs_ && prev_h.ino == 0) {
    at = prev;
    free_rec.rec_len = uint16_t(free_rec.rec_len + prev_h.rec_len);
  }
  std::memcpy(p + at, &free_rec, sizeof free_rec);
  index.erase(slot);
  index.set_free(block, std::max<uint32_t>(index.free_bytes[block], free_rec.rec_len));
  return Status::ok();
}

Status VolumeImpl::dir_set(uint64_t dino, Inode& dir, std::string_view name, uint64_t ino,
                           uint32_t type) {
  DirIndex::Slot* slot = dir_index(dino, dir).find(*this, dir, name);
  if (slot == nullptr) return Status(ENOENT, std::string(name) + ": no such entry");
  uint64_t position = slot->position();
  auto lba = bmap(dir, position / bs_, false, nullptr);
  if (!lba) return lba.status();
  std::byte* p = meta_mut(*lba) + position % bs_;
  DirRecordHeader h;
  std::memcpy(&h, p, sizeof h);
  h.ino = ino;
  h.type = uint8_t(type);
  std::memcpy(p, &h, sizeof h);
  return Status::ok();
}

bool VolumeImpl::dir_empty(uint64_t dino, Inode& dir) {
  return dir_index(dino, dir).names == 0;
}

Status VolumeImpl::readdir(uint64_t ino, uint64_t offset,
                           const std::function<bool(const DirEntry&)>& emit) {
  Lock lock(mu_);
  auto dir = iget(ino);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (touch_atime(*dir)) iput(ino, *dir);
  // Cookies: 1 after ".", 2 after "..", then 3 + position of the next record to look at.
  if (offset == 0) {
    if (!emit(DirEntry{".", ino, DT_DIR, 1})) return Status::ok();
    offset = 1;
  }
  if (offset == 1) {
    if (!emit(DirEntry{"..", dir->parent, DT_DIR, 2})) return Status::ok();
    offset = 2;
  }
  uint64_t pos = offset < 3 ? 0 : offset - 3;
  uint64_t blocks = dir->size / bs_;
  bool more = true;
  for (uint64_t b = pos / bs_; b < blocks && more; ++b) {
    auto lba = bmap(*dir, b, false, nullptr);
    if (!lba) return lba.status();
    if (*lba == 0) continue;
    const std::byte* p = meta(*lba);
    // The cookie can point inside a free record that a removal merged backwards: the walk
    // from the block's start passes over everything before it.
    Status s = walk_records(p, bs_, [&](uint32_t off, const DirRecordHeader& h) {
      uint64_t here = b * bs_ + off;
      if (here < pos || h.ino == 0) return true;
      // A name longer than its record is damage (fsck.vpmfs repairs it): passed over, as the
      // name index passes over it, so that no name is read past its record or the block.
      if (h.name_len == 0 || sizeof h + h.name_len > h.rec_len) return true;
      DirEntry e{std::string(reinterpret_cast<const char*>(p + off + sizeof h), h.name_len), h.ino,
                 h.type, here + h.rec_len + 3};
      more = emit(e);
      return more;
    });
    if (!s) return s;
  }
  return Status::ok();
}

}  // namespace vpmfs
