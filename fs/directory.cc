// Directories: records in the directory's blocks, found through an in-memory name index.
#include <dirent.h>

#include <cstring>

#include "volume.h"

namespace vpmfs {

using namespace fsfmt;

VolumeImpl::DirIndex& VolumeImpl::dir_index(uint64_t dino, Inode& dir) {
  Node& n = node(dino);
  if (n.dir) return *n.dir;
  // Built once per directory: from then on lookups and creates touch only the blocks they need.
  auto index = std::make_unique<DirIndex>();
  uint64_t blocks = dir.size / bs_;
  index->free_bytes.assign(blocks, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    auto lba = bmap(dir, b, false, nullptr);
    if (!lba || *lba == 0) continue;
    const std::byte* p = meta(*lba);
    uint32_t off = 0;
    while (off + sizeof(DirRecordHeader) <= bs_) {
      DirRecordHeader h;
      std::memcpy(&h, p + off, sizeof h);
      if (h.rec_len < sizeof h || h.rec_len % 8 != 0 || off + h.rec_len > bs_) break;  // damaged
      if (h.ino != 0 && sizeof h + h.name_len <= h.rec_len) {
        std::string name(reinterpret_cast<const char*>(p + off + sizeof h), h.name_len);
        index->pos[name] = b * bs_ + off;
      } else if (h.ino == 0) {
        index->free_bytes[b] = std::max<uint32_t>(index->free_bytes[b], h.rec_len);
      }
      off += h.rec_len;
    }
  }
  n.dir = std::move(index);
  return *n.dir;
}

Result<uint64_t> VolumeImpl::dir_find(uint64_t dino, Inode& dir, std::string_view name,
                                      uint32_t* type) {
  DirIndex& index = dir_index(dino, dir);
  auto it = index.pos.find(std::string(name));
  if (it == index.pos.end()) return Status(ENOENT, std::string(name) + ": no such entry");
  auto lba = bmap(dir, it->second / bs_, false, nullptr);
  if (!lba) return lba.status();
  DirRecordHeader h;
  std::memcpy(&h, meta(*lba) + it->second % bs_, sizeof h);
  if (type != nullptr) *type = h.type;
  return h.ino;
}

Status VolumeImpl::dir_add(uint64_t dino, Inode& dir, std::string_view name, uint64_t ino,
                           uint32_t type) {
  DirIndex& index = dir_index(dino, dir);
  uint32_t need = dir_record_len(name.size());
  uint64_t block = index.free_bytes.size();
  for (uint64_t b = index.free_bytes.size(); b-- > 0;) {  // newest blocks are likeliest to fit
    if (index.free_bytes[b] >= need) {
      block = b;
      break;
    }
  }
  uint64_t lba;
  if (block == index.free_bytes.size()) {
    bool fresh = false;
    auto l = bmap(dir, block, true, &fresh);
    if (!l) return l.status();
    lba = *l;
    std::byte* p = meta_new(lba);
    DirRecordHeader empty{0, uint16_t(bs_), 0, 0, 0};
    std::memcpy(p, &empty, sizeof empty);
    dir.size += bs_;
    index.free_bytes.push_back(bs_);
  } else {
    auto l = bmap(dir, block, false, nullptr);
    if (!l) return l.status();
    lba = *l;
  }
  std::byte* p = meta_mut(lba);
  uint32_t off = 0;
  uint32_t largest = 0;
  bool placed = false;
  while (off + sizeof(DirRecordHeader) <= bs_) {
    DirRecordHeader h;
    std::memcpy(&h, p + off, sizeof h);
    if (h.rec_len < sizeof h || off + h.rec_len > bs_) return Status(EUCLEAN, "damaged directory");
    if (!placed && h.ino == 0 && h.rec_len >= need) {
      uint32_t rest = h.rec_len - need;
      DirRecordHeader used{ino, uint16_t(rest >= sizeof(DirRecordHeader) + 8 ? need : h.rec_len),
                           uint8_t(name.size()), uint8_t(type), 0};
      std::memcpy(p + off, &used, sizeof used);
      std::memcpy(p + off + sizeof used, name.data(), name.size());
      index.pos[std::string(name)] = block * bs_ + off;
      if (used.rec_len != h.rec_len) {
        DirRecordHeader free_rec{0, uint16_t(rest), 0, 0, 0};
        std::memcpy(p + off + used.rec_len, &free_rec, sizeof free_rec);
      }
      placed = true;
      std::memcpy(&h, p + off, sizeof h);
    }
    if (h.ino == 0) largest = std::max<uint32_t>(largest, h.rec_len);
    off += h.rec_len;
  }
  index.free_bytes[block] = largest;
  if (!placed) return Status(EUCLEAN, "directory free-space index is out of date");
  return Status::ok();
}

Status VolumeImpl::dir_remove(uint64_t dino, Inode& dir, std::string_view name) {
  DirIndex& index = dir_index(dino, dir);
  auto it = index.pos.find(std::string(name));
  if (it == index.pos.end()) return Status(ENOENT, std::string(name) + ": no such entry");
  uint64_t block = it->second / bs_;
  auto lba = bmap(dir, block, false, nullptr);
  if (!lba) return lba.status();
  std::byte* p = meta_mut(*lba);
  uint32_t at = uint32_t(it->second % bs_);
  DirRecordHeader h;
  std::memcpy(&h, p + at, sizeof h);
  h.ino = 0;
  h.name_len = 0;
  h.type = 0;
  // Merge with the free record after it; records before it do not move, so cookies stay valid.
  uint32_t next = at + h.rec_len;
  if (next + sizeof(DirRecordHeader) <= bs_) {
    DirRecordHeader n;
    std::memcpy(&n, p + next, sizeof n);
    if (n.ino == 0 && n.rec_len >= sizeof n && next + n.rec_len <= bs_) h.rec_len += n.rec_len;
  }
  std::memcpy(p + at, &h, sizeof h);
  index.pos.erase(it);
  index.free_bytes[block] = std::max<uint32_t>(index.free_bytes[block], h.rec_len);
  return Status::ok();
}

Status VolumeImpl::dir_set(uint64_t dino, Inode& dir, std::string_view name, uint64_t ino,
                           uint32_t type) {
  DirIndex& index = dir_index(dino, dir);
  auto it = index.pos.find(std::string(name));
  if (it == index.pos.end()) return Status(ENOENT, std::string(name) + ": no such entry");
  auto lba = bmap(dir, it->second / bs_, false, nullptr);
  if (!lba) return lba.status();
  std::byte* p = meta_mut(*lba) + it->second % bs_;
  DirRecordHeader h;
  std::memcpy(&h, p, sizeof h);
  h.ino = ino;
  h.type = uint8_t(type);
  std::memcpy(p, &h, sizeof h);
  return Status::ok();
}

bool VolumeImpl::dir_empty(uint64_t dino, Inode& dir) {
  return dir_index(dino, dir).pos.empty();
}

Status VolumeImpl::readdir(uint64_t ino, uint64_t offset,
                           const std::function<bool(const DirEntry&)>& emit) {
  Lock lock(mu_);
  auto dir = iget(ino);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
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
  for (uint64_t b = pos / bs_; b < blocks; ++b) {
    auto lba = bmap(*dir, b, false, nullptr);
    if (!lba) return lba.status();
    if (*lba == 0) continue;
    const std::byte* p = meta(*lba);
    uint32_t off = 0;
    while (off + sizeof(DirRecordHeader) <= bs_) {
      DirRecordHeader h;
      std::memcpy(&h, p + off, sizeof h);
      if (h.rec_len < sizeof h || off + h.rec_len > bs_)
        return Status(EUCLEAN, "damaged directory");
      uint64_t here = b * bs_ + off;
      off += h.rec_len;
      if (here < pos || h.ino == 0) continue;
      DirEntry e{std::string(reinterpret_cast<const char*>(p + here % bs_ + sizeof h), h.name_len),
                 h.ino, h.type, b * bs_ + off + 3};
      if (!emit(e)) return Status::ok();
    }
  }
  return Status::ok();
}

}  // namespace vpmfs
