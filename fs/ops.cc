// The POSIX operations of the filesystem.
#include <dirent.h>
#include <linux/fs.h>

#include <cstring>

#include "volume.h"
#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

Timestamp now() {
  timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return Timestamp{t.tv_sec, uint32_t(t.tv_nsec)};
}

Status name_ok(std::string_view name) {
  if (name.empty() || name == "." || name == "..") return Status(EINVAL, "invalid name");
  if (name.size() > 255) return Status(ENAMETOOLONG, "name longer than 255 bytes");
  if (name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos) {
    return Status(EINVAL, "name contains '/' or NUL");
  }
  return Status::ok();
}

constexpr uint64_t kMaxFileSize = 16ull << 40;  // 16 TiB

}  // namespace

#define VPMFS_WRITABLE()                                      \
  do {                                                        \
    if (read_only_) return Status(EROFS, "read-only volume"); \
    if (!failed_) return Status(EROFS, failed_.message());    \
  } while (0)

Result<Attr> VolumeImpl::getattr(uint64_t ino) {
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  return to_attr(ino, *inode);
}

Result<Attr> VolumeImpl::lookup(uint64_t parent, std::string_view name) {
  if (name.size() > 255) return Status(ENAMETOOLONG, "name longer than 255 bytes");
  Lock lock(mu_);
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (name == ".") return to_attr(parent, *dir);
  if (name == "..") {
    auto up = iget(dir->parent);
    if (!up) return up.status();
    return to_attr(dir->parent, *up);
  }
  auto ino = dir_find(parent, *dir, name, nullptr);
  if (!ino) return ino.status();
  auto inode = iget(*ino);
  if (!inode) return inode.status();
  return to_attr(*ino, *inode);
}

Result<Attr> VolumeImpl::make_node(uint64_t parent, std::string_view name, uint32_t mode,
                                   uint64_t rdev, uint32_t uid, uint32_t gid,
                                   std::string_view target) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (Status s = name_ok(name); !s) return s;
  Lock lock(mu_);
  throttle(lock);
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (dir->nlink == 0) return Status(ENOENT, "directory was removed");
  if (dir_find(parent, *dir, name, nullptr)) return Status(EEXIST, std::string(name) + " exists");
  auto ino = ialloc();
  if (!ino) return ino.status();
  Inode inode{};
  inode.mode = mode;
  inode.nlink = S_ISDIR(mode) ? 2 : 1;
  inode.uid = uid;
  // setgid directories hand their group (and, to directories, the bit) down.
  inode.gid = (dir->mode & S_ISGID) ? dir->gid : gid;
  if ((dir->mode & S_ISGID) && S_ISDIR(mode)) inode.mode |= S_ISGID;
  inode.rdev = rdev;
  set_times(inode, now(), kAtime | kMtime | kCtime | kBtime);
  inode.parent = S_ISDIR(mode) ? parent : 0;
  inode.generation = uint32_t(xxhash64(&inode.btime_nsec, sizeof inode.btime_nsec, *ino));
  // New files inherit the DAX flag of their directory, as on ext4 and xfs.
  inode.flags = dir->flags & FS_XFLAG_DAX;
  if (S_ISLNK(mode)) {
    inode.size = target.size();
    if (target.size() <= kInlineSymlink) {
      std::memcpy(inode.ptr, target.data(), target.size());
    } else {
      bool fresh;
      auto lba = bmap(inode, 0, true, &fresh);
      if (!lba) {
        ifree(*ino);
        return lba.status();
      }
      std::byte* p = meta_new(*lba);
      std::memcpy(p, target.data(), std::min<std::size_t>(target.size(), bs_));
    }
  }
  if (Status s = dir_add(parent, *dir, name, *ino, IFTODT(mode)); !s) {
    truncate_blocks(inode, 0);
    ifree(*ino);
    return s;
  }
  if (S_ISDIR(mode)) ++dir->nlink;
  set_times(*dir, Timestamp{inode.ctime_sec, inode.ctime_nsec}, kMtime | kCtime);
  iput(parent, *dir);
  iput(*ino, inode);
  return to_attr(*ino, inode);
}

Result<Attr> VolumeImpl::mknod(uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                               uint32_t uid, uint32_t gid, uint32_t umask) {
  if (S_ISDIR(mode) || S_ISLNK(mode)) return Status(EINVAL, "mknod cannot make this type");
  if ((mode & S_IFMT) == 0) mode |= S_IFREG;
  mode &= ~(umask & 0777);
  return make_node(parent, name, mode, rdev, uid, gid, {});
}

Result<Attr> VolumeImpl::mkdir(uint64_t parent, std::string_view name, uint32_t mode, uint32_t uid,
                               uint32_t gid, uint32_t umask) {
  return make_node(parent, name, S_IFDIR | (mode & 07777 & ~(umask & 0777)), 0, uid, gid, {});
}

Result<Attr> VolumeImpl::symlink(uint64_t parent, std::string_view name, std::string_view target,
                                 uint32_t uid, uint32_t gid) {
  if (target.empty()) return Status(ENOENT, "empty symlink target");
  if (target.size() >= 4096 || target.size() > bs_) {
    return Status(ENAMETOOLONG, "symlink target too long");
  }
  return make_node(parent, name, S_IFLNK | 0777, 0, uid, gid, target);
}

Result<std::string> VolumeImpl::readlink(uint64_t ino) {
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (!S_ISLNK(inode->mode)) return Status(EINVAL, "not a symlink");
  if (inode->size <= kInlineSymlink) {
    return std::string(reinterpret_cast<const char*>(inode->ptr), inode->size);
  }
  auto lba = bmap(*inode, 0, false, nullptr);
  if (!lba || *lba == 0 || inode->size > bs_) return Status(EUCLEAN, "damaged symlink");
  return std::string(reinterpret_cast<const char*>(meta(*lba)), inode->size);
}

Result<Attr> VolumeImpl::link(uint64_t ino, uint64_t parent, std::string_view name) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (Status s = name_ok(name); !s) return s;
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (S_ISDIR(inode->mode)) return Status(EPERM, "hard links to directories are not allowed");
  if (inode->nlink >= 65000) return Status(EMLINK, "too many links");
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (dir_find(parent, *dir, name, nullptr)) return Status(EEXIST, std::string(name) + " exists");
  if (Status s = dir_add(parent, *dir, name, ino, IFTODT(inode->mode)); !s) return s;
  Timestamp t = now();
  ++inode->nlink;
  set_times(*inode, t, kCtime);
  set_times(*dir, t, kMtime | kCtime);
  iput(parent, *dir);
  iput(ino, *inode);
  if (orphans_.count(ino) != 0) orphans_.erase(ino);  // linked back (O_TMPFILE-like)
  return to_attr(ino, *inode);
}

Status VolumeImpl::drop_link(uint64_t ino, Inode& inode) {
  set_times(inode, now(), kCtime);
  if (S_ISDIR(inode.mode)) {
    inode.nlink = 0;
  } else if (inode.nlink > 0) {
    --inode.nlink;
  }
  if (inode.nlink > 0) {
    iput(ino, inode);
    return Status::ok();
  }
  auto it = nodes_.find(ino);
  if (it != nodes_.end() && it->second->held > 0) {
    // Still open: keep the data until the last reference goes, on the orphan chain so that a
    // crash in between does not leak it.
    inode.next_orphan = sb_.orphan_head;
    iput(ino, inode);
    sb_.orphan_head = ino;
    sb_.checksum = 0;
    Superblock copy = sb_;
    copy.checksum = 0;
    sb_.checksum = xxhash64(&copy, sizeof copy);
    std::memcpy(meta_mut(0), &sb_, sizeof sb_);
    orphans_.insert(ino);
    return Status::ok();
  }
  if (Status s = truncate_blocks(inode, 0); !s) return s;
  ifree(ino);
  return Status::ok();
}

void VolumeImpl::release_inode(uint64_t ino) {
  // The last reference to an unlinked inode: off the orphan chain, then gone.
  auto inode = iget(ino);
  if (!inode) return;
  uint64_t prev = 0;
  for (uint64_t cur = sb_.orphan_head, guard = 0; cur != 0 && guard < sb_.inode_count; ++guard) {
    if (cur == ino) {
      if (prev == 0) {
        sb_.orphan_head = inode->next_orphan;
        Superblock copy = sb_;
        copy.checksum = 0;
        sb_.checksum = xxhash64(&copy, sizeof copy);
        std::memcpy(meta_mut(0), &sb_, sizeof sb_);
      } else if (auto p = iget(prev)) {
        p->next_orphan = inode->next_orphan;
        iput(prev, *p);
      }
      break;
    }
    auto c = iget(cur);
    if (!c) break;
    prev = cur;
    cur = c->next_orphan;
  }
  orphans_.erase(ino);
  truncate_blocks(*inode, 0);
  ifree(ino);
}

Status VolumeImpl::unlink(uint64_t parent, std::string_view name) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (name.size() > 255) return Status(ENAMETOOLONG, "name longer than 255 bytes");
  Lock lock(mu_);
  throttle(lock);
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  auto ino = dir_find(parent, *dir, name, nullptr);
  if (!ino) return ino.status();
  auto inode = iget(*ino);
  if (!inode) return inode.status();
  if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
  if (Status s = dir_remove(parent, *dir, name); !s) return s;
  set_times(*dir, now(), kMtime | kCtime);
  iput(parent, *dir);
  return drop_link(*ino, *inode);
}

Status VolumeImpl::rmdir(uint64_t parent, std::string_view name) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (name == ".") return Status(EINVAL, "cannot remove '.'");
  if (name == "..") return Status(ENOTEMPTY, "cannot remove '..'");
  if (name.size() > 255) return Status(ENAMETOOLONG, "name longer than 255 bytes");
  Lock lock(mu_);
  throttle(lock);
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  auto ino = dir_find(parent, *dir, name, nullptr);
  if (!ino) return ino.status();
  auto inode = iget(*ino);
  if (!inode) return inode.status();
  if (!S_ISDIR(inode->mode)) return Status(ENOTDIR, "not a directory");
  if (!dir_empty(*ino, *inode)) return Status(ENOTEMPTY, "directory not empty");
  if (Status s = dir_remove(parent, *dir, name); !s) return s;
  --dir->nlink;
  set_times(*dir, now(), kMtime | kCtime);
  iput(parent, *dir);
  return drop_link(*ino, *inode);
}

Status VolumeImpl::rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                          std::string_view new_name, uint32_t flags) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) return Status(EINVAL, "unknown rename flags");
  if ((flags & RENAME_NOREPLACE) && (flags & RENAME_EXCHANGE)) {
    return Status(EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE together");
  }
  if (Status s = name_ok(new_name); !s) return s;
  if (Status s = name_ok(name); !s) return s;
  Lock lock(mu_);
  throttle(lock);
  auto from_dir = iget(parent);
  if (!from_dir) return from_dir.status();
  auto to_dir = iget(new_parent);
  if (!to_dir) return to_dir.status();
  if (!S_ISDIR(from_dir->mode) || !S_ISDIR(to_dir->mode)) return Status(ENOTDIR, "not a directory");
  uint32_t type = 0;
  auto ino = dir_find(parent, *from_dir, name, &type);
  if (!ino) return ino.status();
  auto inode = iget(*ino);
  if (!inode) return inode.status();
  auto target = dir_find(new_parent, *to_dir, new_name, nullptr);
  if ((flags & RENAME_NOREPLACE) && target)
    return Status(EEXIST, std::string(new_name) + " exists");
  if ((flags & RENAME_EXCHANGE) && !target)
    return Status(ENOENT, std::string(new_name) + ": no such entry");
  if (target && *target == *ino) return Status::ok();  // two links to one inode: nothing to do
  // A directory must not move below itself.
  if (S_ISDIR(inode->mode) || (target && (flags & RENAME_EXCHANGE))) {
    for (uint64_t up = new_parent, guard = 0; guard < sb_.inode_count; ++guard) {
      if (up == *ino ||
          (target && (flags & RENAME_EXCHANGE) && up == *target && up != new_parent)) {
        return Status(EINVAL, "cannot move a directory into itself");
      }
      if (up == kRootIno) break;
      auto u = iget(up);
      if (!u) return u.status();
      up = u->parent;
    }
  }
  if ((flags & RENAME_EXCHANGE) && target) {
    auto other = iget(*target);
    if (!other) return other.status();
    if (S_ISDIR(other->mode) && parent != new_parent) {
      for (uint64_t up = parent, guard = 0; guard < sb_.inode_count; ++guard) {
        if (up == *target) return Status(EINVAL, "cannot move a directory into itself");
        if (up == kRootIno) break;
        auto u = iget(up);
        if (!u) return u.status();
        up = u->parent;
      }
    }
    if (Status s = dir_set(parent, *from_dir, name, *target, IFTODT(other->mode)); !s) return s;
    if (parent == new_parent) {
      if (Status s = dir_set(parent, *from_dir, new_name, *ino, type); !s) return s;
    } else {
      if (Status s = dir_set(new_parent, *to_dir, new_name, *ino, type); !s) return s;
    }
    Timestamp t = now();
    if (parent != new_parent) {
      bool a_dir = S_ISDIR(inode->mode), b_dir = S_ISDIR(other->mode);
      if (a_dir) inode->parent = new_parent;
      if (b_dir) other->parent = parent;
      if (a_dir != b_dir) {
        if (a_dir) {
          --from_dir->nlink;
          ++to_dir->nlink;
        } else {
          ++from_dir->nlink;
          --to_dir->nlink;
        }
      }
    }
    set_times(*inode, t, kCtime);
    set_times(*other, t, kCtime);
    set_times(*from_dir, t, kMtime | kCtime);
    iput(*ino, *inode);
    iput(*target, *other);
    if (parent == new_parent) {
      iput(parent, *from_dir);
    } else {
      set_times(*to_dir, t, kMtime | kCtime);
      iput(parent, *from_dir);
      iput(new_parent, *to_dir);
    }
    return Status::ok();
  }
  if (target) {
    auto victim = iget(*target);
    if (!victim) return victim.status();
    if (S_ISDIR(inode->mode) && !S_ISDIR(victim->mode)) return Status(ENOTDIR, "not a directory");
    if (!S_ISDIR(inode->mode) && S_ISDIR(victim->mode)) return Status(EISDIR, "is a directory");
    if (S_ISDIR(victim->mode) && !dir_empty(*target, *victim)) {
      return Status(ENOTEMPTY, "directory not empty");
    }
    if (Status s = dir_set(new_parent, *to_dir, new_name, *ino, type); !s) return s;
    if (S_ISDIR(victim->mode)) --to_dir->nlink;
    if (Status s = drop_link(*target, *victim); !s) return s;
  } else {
    if (parent == new_parent) {
      if (Status s = dir_add(new_parent, *from_dir, new_name, *ino, type); !s) return s;
    } else {
      if (Status s = dir_add(new_parent, *to_dir, new_name, *ino, type); !s) return s;
    }
  }
  if (parent == new_parent) {
    // to_dir is a stale copy of the same inode: work on from_dir only.
    if (target && S_ISDIR(inode->mode)) --from_dir->nlink;
    if (Status s = dir_remove(parent, *from_dir, name); !s) return s;
  } else {
    if (Status s = dir_remove(parent, *from_dir, name); !s) return s;
    if (S_ISDIR(inode->mode)) {
      --from_dir->nlink;
      ++to_dir->nlink;
      inode->parent = new_parent;
    }
  }
  Timestamp t = now();
  set_times(*inode, t, kCtime);
  set_times(*from_dir, t, kMtime | kCtime);
  iput(*ino, *inode);
  iput(parent, *from_dir);
  if (parent != new_parent) {
    set_times(*to_dir, t, kMtime | kCtime);
    iput(new_parent, *to_dir);
  }
  return Status::ok();
}

Result<Attr> VolumeImpl::setattr(uint64_t ino, const SetAttr& c) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  Node* n;
  {
    Lock lock(mu_);
    n = &node(ino);
  }
  std::unique_lock io(n->io, std::defer_lock);
  if (c.size) io.lock();  // no read or write of this file while its size changes
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  Timestamp t = now();
  if (c.mode) inode->mode = (inode->mode & S_IFMT) | (*c.mode & 07777);
  if (c.uid) inode->uid = *c.uid;
  if (c.gid) inode->gid = *c.gid;
  if (c.atime) set_times(*inode, Timestamp{c.atime->tv_sec, uint32_t(c.atime->tv_nsec)}, kAtime);
  if (c.mtime) set_times(*inode, Timestamp{c.mtime->tv_sec, uint32_t(c.mtime->tv_nsec)}, kMtime);
  if (c.size) {
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (!S_ISREG(inode->mode)) return Status(EINVAL, "not a regular file");
    if (*c.size > kMaxFileSize) return Status(EFBIG, "file too large");
    if (*c.size < inode->size) {
      uint64_t keep = (*c.size + bs_ - 1) / bs_;
      if (Status s = truncate_blocks(*inode, keep); !s) return s;
      // The tail of the last block must read as zeros if the file grows again.
      if (*c.size % bs_ != 0) {
        auto lba = bmap(*inode, *c.size / bs_, false, nullptr);
        if (lba && *lba != 0) {
          std::vector<std::byte> block(bs_);
          if (Status s = btt_->read(*lba, block.data()); !s) return s;
          std::memset(block.data() + *c.size % bs_, 0, bs_ - *c.size % bs_);
          if (Status s = btt_->write(*lba, block.data()); !s) return s;
        }
      }
    }
    inode->size = *c.size;
    if (!c.mtime) set_times(*inode, t, kMtime);
  }
  set_times(*inode, t, kCtime);
  iput(ino, *inode);
  return to_attr(ino, *inode);
}

Result<std::size_t> VolumeImpl::read(uint64_t ino, uint64_t offset, void* buf, std::size_t len) {
  Node* n;
  {
    Lock lock(mu_);
    n = &node(ino);
  }
  std::shared_lock io(n->io);
  std::vector<uint64_t> lbas;
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (offset >= inode->size) return std::size_t(0);
    len = std::min<uint64_t>(len, inode->size - offset);
    for (uint64_t fb = offset / bs_; fb <= (offset + len - 1) / bs_; ++fb) {
      auto lba = bmap(*inode, fb, false, nullptr);
      if (!lba) return lba.status();
      lbas.push_back(*lba);
    }
  }
  // The copies run without the volume lock; the inode lock keeps the blocks where they are.
  auto* out = static_cast<std::byte*>(buf);
  std::vector<std::byte> tmp;
  uint64_t pos = offset;
  for (uint64_t lba : lbas) {
    uint64_t in = pos % bs_;
    uint64_t n_bytes = std::min<uint64_t>(bs_ - in, offset + len - pos);
    if (lba == 0) {
      std::memset(out, 0, n_bytes);
    } else {
      auto ref = btt_->read_ref(lba);
      if (!ref) return ref.status();
      std::memcpy(out, ref->data() + in, n_bytes);
    }
    out += n_bytes;
    pos += n_bytes;
  }
  return len;
}

Result<std::size_t> VolumeImpl::write(uint64_t ino, uint64_t offset, const void* buf,
                                      std::size_t len) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (len == 0) return std::size_t(0);
  if (offset >= kMaxFileSize || len > kMaxFileSize - offset) return Status(EFBIG, "file too large");
  Node* n;
  {
    Lock lock(mu_);
    n = &node(ino);
  }
  std::unique_lock io(n->io);
  std::shared_lock gate(gate_);
  struct Target {
    uint64_t lba;
    bool fresh;
  };
  std::vector<Target> targets;
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    Status short_write;
    for (uint64_t fb = offset / bs_; fb <= (offset + len - 1) / bs_; ++fb) {
      bool fresh = false;
      auto lba = bmap(*inode, fb, true, &fresh);
      if (!lba) {
        short_write = lba.status();
        break;
      }
      targets.push_back({*lba, fresh});
    }
    if (targets.empty()) {
      iput(ino, *inode);
      return short_write;
    }
    // ENOSPC part way: write what has blocks.
    uint64_t end = std::min<uint64_t>(offset + len, (offset / bs_ + targets.size()) * bs_);
    len = end - offset;
    inode->size = std::max(inode->size, end);
    set_times(*inode, now(), kMtime | kCtime);
    inode->mode &= ~uint32_t(S_ISUID);  // writes drop setuid, as the kernel expects
    iput(ino, *inode);
  }
  // The data, without the volume lock. Whole blocks go straight from the caller's buffer into
  // the BTT's free block: the only copy.
  const auto* in = static_cast<const std::byte*>(buf);
  std::vector<std::byte> tmp(bs_);
  uint64_t pos = offset;
  for (const Target& t : targets) {
    uint64_t at = pos % bs_;
    uint64_t n_bytes = std::min<uint64_t>(bs_ - at, offset + len - pos);
    Status s;
    if (n_bytes == bs_) {
      s = btt_->write(t.lba, in);
    } else {
      if (t.fresh) {
        std::memset(tmp.data(), 0, bs_);  // never show what the block held before
      } else if (s = btt_->read(t.lba, tmp.data()); !s) {
        return s;
      }
      std::memcpy(tmp.data() + at, in, n_bytes);
      s = btt_->write(t.lba, tmp.data());
    }
    if (!s) return s;
    in += n_bytes;
    pos += n_bytes;
  }
  return len;
}

void VolumeImpl::hold(uint64_t ino, uint64_t count) {
  Lock lock(mu_);
  node(ino).held += count;
}

void VolumeImpl::forget(uint64_t ino, uint64_t count) {
  KillPoint kill_point{this};
  Lock lock(mu_);
  auto it = nodes_.find(ino);
  if (it == nodes_.end()) return;
  Node& n = *it->second;
  n.held -= std::min(n.held, count);
  if (n.held == 0 && orphans_.count(ino) != 0 && !read_only_ && failed_.is_ok()) release_inode(ino);
}

struct statvfs VolumeImpl::statfs() {
  Lock lock(mu_);
  struct statvfs s {};
  s.f_bsize = bs_;
  s.f_frsize = bs_;
  s.f_blocks = sb_.block_count - sb_.data_start;
  s.f_bfree = free_blocks_;
  s.f_bavail = free_blocks_;
  s.f_files = sb_.inode_count - 2;
  s.f_ffree = free_inodes_;
  s.f_favail = free_inodes_;
  s.f_fsid = sb_.uuid[0] | (uint64_t(sb_.uuid[1]) << 8);
  s.f_namemax = 255;
  return s;
}

// --- not yet implemented ----------------------------------------------------------------------

Result<std::size_t> VolumeImpl::getxattr(uint64_t, std::string_view, void*, std::size_t) {
  return Status(EOPNOTSUPP, "xattrs are not implemented yet");
}
Status VolumeImpl::setxattr(uint64_t, std::string_view, const void*, std::size_t, int) {
  return Status(EOPNOTSUPP, "xattrs are not implemented yet");
}
Result<std::size_t> VolumeImpl::listxattr(uint64_t, char*, std::size_t) {
  return Status(EOPNOTSUPP, "xattrs are not implemented yet");
}
Status VolumeImpl::removexattr(uint64_t, std::string_view) {
  return Status(EOPNOTSUPP, "xattrs are not implemented yet");
}
Status VolumeImpl::fallocate(uint64_t, int, uint64_t, uint64_t) {
  return Status(EOPNOTSUPP, "fallocate is not implemented yet");
}
Result<uint64_t> VolumeImpl::seek_data(uint64_t, uint64_t, int) {
  return Status(EOPNOTSUPP, "SEEK_DATA and SEEK_HOLE are not implemented yet");
}

}  // namespace vpmfs

