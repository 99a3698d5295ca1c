// The POSIX operations of the filesystem.
#include <dirent.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <malloc.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "volume.h"
#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

Status name_ok(std::string_view name) {
  if (name.empty() || name == "." || name == "..") return Status(EINVAL, "invalid name");
  if (name.size() > 255) return Status(ENAMETOOLONG, "name longer than 255 bytes");
  if (name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos) {
    return Status(EINVAL, "name contains '/' or NUL");
  }
  return Status::ok();
}

constexpr uint64_t kMaxFileSize = 16ull << 40;  // 16 TiB

// chattr +i and +a (FS_XFLAG_IMMUTABLE, FS_XFLAG_APPEND). A local filesystem leaves these to the
// VFS, which reads them from the inode's i_flags; FUSE never sets those, so every call that
// would change an inode or a directory's entries checks here, as the VFS would.
bool immutable(const Inode& inode) {
  return inode.flags & FS_XFLAG_IMMUTABLE;
}
bool append_only(const Inode& inode) {
  return inode.flags & FS_XFLAG_APPEND;
}
// Neither changed nor removed: immutable, or append-only (may_delete, vfs_link, setxattr).
Status fixed(const Inode& inode) {
  if (immutable(inode)) return Status(EPERM, "immutable (chattr +i)");
  if (append_only(inode)) return Status(EPERM, "append-only (chattr +a)");
  return Status::ok();
}

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

Result<Attr> VolumeImpl::peek_attr(uint64_t ino) {
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  return to_attr(ino, *inode, false);
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

// --- allocations that wait for a commit --------------------------------------------------------
// Blocks freed in the running transaction stay unusable until it commits (the quarantine). An
// operation that ran out of space while some wait there commits and tries once more, as ext4
// retries an allocation after a journal commit. Each of these leaves nothing changed on ENOSPC.

bool VolumeImpl::space_after_commit() {
  Lock lock(mu_);
  return !quarantine_.empty();
}

template <class R>
R VolumeImpl::synchronous(R result, std::initializer_list<uint64_t> inos) {
  if (!result) return result;
  bool sync = sync_;
  if (!sync) {
    Lock lock(mu_);
    for (uint64_t ino : inos) {
      auto inode = iget(ino);
      sync |= inode && ((inode->flags & FS_XFLAG_SYNC) || (dirsync_ && S_ISDIR(inode->mode)));
    }
  }
  if (!sync) return result;
  if (Status s = sync_wait(); !s) return s;
  return result;
}

template <class Op>
auto VolumeImpl::with_space(Op op) -> decltype(op()) {
  auto result = op();
  bool enospc;
  if constexpr (std::is_same_v<decltype(result), Status>) {
    enospc = result.error() == ENOSPC;
  } else {
    enospc = !result && result.status().error() == ENOSPC;
  }
  if (!enospc || !space_after_commit() || !sync_wait()) return result;
  return op();
}

Result<Attr> VolumeImpl::make_node(uint64_t parent, std::string_view name, uint32_t mode,
                                   uint64_t rdev, uint32_t uid, uint32_t gid,
                                   std::string_view target, uint32_t umask, bool unnamed) {
  return synchronous(with_space([&] {
                       return try_make_node(parent, name, mode, rdev, uid, gid, target, umask,
                                            unnamed);
                     }),
                     {parent});
}

Result<Attr> VolumeImpl::link(uint64_t ino, uint64_t parent, std::string_view name) {
  return synchronous(with_space([&] { return try_link(ino, parent, name); }), {ino, parent});
}

Status VolumeImpl::rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                          std::string_view new_name, uint32_t flags, uint32_t uid, uint32_t gid) {
  return synchronous(
      with_space([&] { return try_rename(parent, name, new_parent, new_name, flags, uid, gid); }),
      {parent, new_parent});
}

Status VolumeImpl::setxattr(uint64_t ino, std::string_view name, const void* value,
                            std::size_t size, int flags) {
  return synchronous(with_space([&] { return try_setxattr(ino, name, value, size, flags); }),
                     {ino});
}

Result<Attr> VolumeImpl::setattr(uint64_t ino, const SetAttr& change) {
  return synchronous(try_setattr(ino, change), {ino});
}

Status VolumeImpl::removexattr(uint64_t ino, std::string_view name) {
  return synchronous(try_removexattr(ino, name), {ino});
}

Status VolumeImpl::fallocate(uint64_t ino, int mode, uint64_t offset, uint64_t length) {
  return synchronous(try_fallocate(ino, mode, offset, length), {ino});
}

Inode VolumeImpl::new_inode(uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                            const Inode& dir) {
  Inode inode{};
  inode.mode = mode;
  inode.nlink = S_ISDIR(mode) ? 2 : 1;
  inode.uid = uid;
  // setgid directories hand their group (and, to directories, the bit) down.
  inode.gid = (dir.mode & S_ISGID) ? dir.gid : gid;
  if ((dir.mode & S_ISGID) && S_ISDIR(mode)) inode.mode |= S_ISGID;
  set_times(inode, now(), kAtime | kMtime | kCtime | kBtime);
  inode.generation = uint32_t(xxhash64(&inode.btime_nsec, sizeof inode.btime_nsec, ino));
  // New files inherit the DAX flag of their directory, as on ext4 and xfs.
  inode.flags = dir.flags & FS_XFLAG_DAX;
  return inode;
}

Result<Attr> VolumeImpl::try_make_node(uint64_t parent, std::string_view name, uint32_t mode,
                                       uint64_t rdev, uint32_t uid, uint32_t gid,
                                       std::string_view target, uint32_t umask, bool unnamed) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (!unnamed) {
    if (Status s = name_ok(name); !s) return s;
  }
  Lock lock(mu_);
  throttle(lock);
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (dir->nlink == 0) return Status(ENOENT, "directory was removed");
  if (!unnamed && dir_find(parent, *dir, name, nullptr)) {
    return Status(EEXIST, std::string(name) + " exists");
  }
  if (immutable(*dir)) return Status(EPERM, "directory is immutable (chattr +i)");
  // A directory's default ACL stands in for the umask (POSIX.1e): the new node's access ACL is
  // the default masked with the mode asked for, and a new directory inherits the default too.
  // Symlinks have no ACLs.
  xattr::Entries inherited;
  bool masked_by_acl = false;
  if (!S_ISLNK(mode) && dir->xattr_block != 0) {
    auto entries = xattr_load(parent, *dir);
    if (!entries) return entries.status();
    if (const xattr::Entry* def = xattr::find(*entries, xattr::kAclDefault)) {
      auto acl = xattr::acl_parse(def->value);
      if (acl && !acl->empty()) {
        masked_by_acl = true;
        if (xattr::acl_create(*acl, &mode)) {
          inherited.push_back({std::string(xattr::kAclAccess), xattr::acl_encode(*acl)});
        }
        if (S_ISDIR(mode)) inherited.push_back(*def);
      }
    }
  }
  if (!masked_by_acl && !S_ISLNK(mode)) mode &= ~(umask & 0777);
  auto ino = ialloc();
  if (!ino) return ino.status();
  Inode inode = new_inode(*ino, mode, uid, gid, *dir);
  inode.rdev = rdev;
  inode.parent = S_ISDIR(mode) ? parent : 0;
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
  if (Status s = xattr_store(*ino, inode, inherited); !s) {
    truncate_blocks(inode, 0);
    ifree(*ino);
    return s;
  }
  if (unnamed) {
    // No name, so no change to the directory; on the orphan chain like a file unlinked while
    // open, which is what it is until link names it.
    inode.nlink = 0;
    orphan_add(*ino, inode);
    orphans_.insert(*ino);
    iput(*ino, inode);
    return to_attr(*ino, inode);
  }
  if (Status s = dir_add(parent, *dir, name, *ino, IFTODT(mode)); !s) {
    truncate_blocks(inode, 0);
    xattr_free(*ino, inode);
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
  return make_node(parent, name, mode, rdev, uid, gid, {}, umask);
}

Result<Attr> VolumeImpl::tmpfile(uint64_t parent, uint32_t mode, uint32_t uid, uint32_t gid,
                                 uint32_t umask) {
  return make_node(parent, {}, S_IFREG | (mode & 07777), 0, uid, gid, {}, umask, /*unnamed=*/true);
}

Result<Attr> VolumeImpl::mkdir(uint64_t parent, std::string_view name, uint32_t mode, uint32_t uid,
                               uint32_t gid, uint32_t umask) {
  return make_node(parent, name, S_IFDIR | (mode & 07777), 0, uid, gid, {}, umask);
}

Result<Attr> VolumeImpl::symlink(uint64_t parent, std::string_view name, std::string_view target,
                                 uint32_t uid, uint32_t gid) {
  if (target.empty()) return Status(ENOENT, "empty symlink target");
  if (target.size() >= 4096 || target.size() > bs_) {
    return Status(ENAMETOOLONG, "symlink target too long");
  }
  return make_node(parent, name, S_IFLNK | 0777, 0, uid, gid, target, 0);
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

Result<Attr> VolumeImpl::try_link(uint64_t ino, uint64_t parent, std::string_view name) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (Status s = name_ok(name); !s) return s;
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (S_ISDIR(inode->mode)) return Status(EPERM, "hard links to directories are not allowed");
  if (inode->nlink >= 65000) return Status(EMLINK, "too many links");
  if (Status s = fixed(*inode); !s) return s;
  auto dir = iget(parent);
  if (!dir) return dir.status();
  if (!S_ISDIR(dir->mode)) return Status(ENOTDIR, "not a directory");
  if (dir_find(parent, *dir, name, nullptr)) return Status(EEXIST, std::string(name) + " exists");
  if (immutable(*dir)) return Status(EPERM, "directory is immutable (chattr +i)");
  if (Status s = dir_add(parent, *dir, name, ino, IFTODT(inode->mode)); !s) return s;
  Timestamp t = now();
  ++inode->nlink;
  set_times(*inode, t, kCtime);
  set_times(*dir, t, kMtime | kCtime);
  iput(parent, *dir);
  // Linked back while open and unlinked (O_TMPFILE-like): off the orphan chain, or the next
  // mount would free a file that has a name again.
  if (orphans_.erase(ino) != 0) orphan_remove(ino, *inode);
  iput(ino, *inode);
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
  bool held = held_.get(ino) > 0;
  if (held || inode.blocks > small_file_blocks()) {
    // Still open: keep the data until the last reference goes. Large: freed a piece at a time
    // by reap() once the caller is done. Either way on the orphan chain, so that a crash in
    // between does not leak it.
    orphan_add(ino, inode);
    orphans_.insert(ino);
    iput(ino, inode);
    if (!held) reap_.push_back(ino);
    return Status::ok();
  }
  if (Status s = truncate_blocks(inode, 0); !s) return s;
  xattr_free(ino, inode);
  ifree(ino);
  return Status::ok();
}

Status VolumeImpl::zero_tail(Inode& inode) {
  if (inode.size % bs_ == 0) return Status::ok();
  auto lba = bmap(inode, inode.size / bs_, false, nullptr);
  if (!lba || *lba == 0) return lba.status();
  std::vector<std::byte> block(bs_);
  if (Status s = btt_->read(*lba, block.data()); !s) return s;
  std::memset(block.data() + inode.size % bs_, 0, bs_ - inode.size % bs_);
  return btt_->write(*lba, block.data());
}

bool VolumeImpl::touch_atime(Inode& inode) {
  if (read_only_ || !failed_ || atime_ == MountOptions::Atime::noatime) return false;
  if (inode.flags & FS_XFLAG_NOATIME) return false;  // chattr +A
  Timestamp t = now();
  auto before = [](int64_t s1, uint32_t n1, int64_t s2, uint32_t n2) {
    return s1 < s2 || (s1 == s2 && n1 <= n2);
  };
  bool stale = atime_ == MountOptions::Atime::strictatime ||
               before(inode.atime_sec, inode.atime_nsec, inode.mtime_sec, inode.mtime_nsec) ||
               before(inode.atime_sec, inode.atime_nsec, inode.ctime_sec, inode.ctime_nsec) ||
               inode.atime_sec + 24 * 3600 <= t.sec;
  if (!stale) return false;
  set_times(inode, t, kAtime);
  return true;
}

uint64_t VolumeImpl::small_file_blocks() const {
  return 64;
}

Status VolumeImpl::free_blocks_from(uint64_t ino, uint64_t keep, Lock& lock) {
  const uint64_t piece = bs_ / 8;  // a pointer block's worth
  for (;;) {
    auto inode = iget(ino);
    if (!inode) return inode.status();
    bool inline_link = S_ISLNK(inode->mode) && inode->size <= kInlineSymlink;
    uint64_t next = UINT64_MAX;
    if (!inline_link && inode->blocks > piece) {
      map_walk(*inode, keep, map_capacity(), [&](const MapRun& r) {
        if (r.lba == 0) return true;
        next = r.fb;
        return false;
      });
    }
    if (next == UINT64_MAX) {
      // Few blocks left, or none beyond `keep` but pointer blocks: one step frees the rest.
      if (Status s = truncate_blocks(*inode, keep); !s) return s;
      iput(ino, *inode);
      return Status::ok();
    }
    punch_blocks(*inode, next, std::min(map_capacity(), (next / piece + 1) * piece));
    iput(ino, *inode);
    throttle(lock);
    if (!failed_) return failed_;
  }
}

void VolumeImpl::release_inode(uint64_t ino, Lock& lock) {
  // The last reference to an unlinked inode: its blocks, then off the orphan chain and gone.
  orphans_.erase(ino);  // released once, even while the pieces let other calls run
  if (Status s = free_blocks_from(ino, 0, lock); !s) return;
  auto inode = iget(ino);
  if (!inode) return;
  orphan_remove(ino, *inode);
  xattr_free(ino, *inode);
  ifree(ino);
}

Status VolumeImpl::reap(Lock& lock) {
  while (!reap_.empty()) {
    uint64_t ino = reap_.back();
    reap_.pop_back();
    release_inode(ino, lock);
  }
  return failed_;
}

Status VolumeImpl::unlink(uint64_t parent, std::string_view name) {
  return synchronous(remove_entry(parent, name, false), {parent});
}

Status VolumeImpl::rmdir(uint64_t parent, std::string_view name) {
  return synchronous(remove_entry(parent, name, true), {parent});
}

Status VolumeImpl::remove_entry(uint64_t parent, std::string_view name, bool directory) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (directory && name == ".") return Status(EINVAL, "cannot remove '.'");
  if (directory && name == "..") return Status(ENOTEMPTY, "cannot remove '..'");
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
  if (directory && !S_ISDIR(inode->mode)) return Status(ENOTDIR, "not a directory");
  if (!directory && S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
  if (Status s = fixed(*dir); !s) return Status(EPERM, "directory: " + s.message());
  if (Status s = fixed(*inode); !s) return s;
  if (directory && !dir_empty(*ino, *inode)) return Status(ENOTEMPTY, "directory not empty");
  if (Status s = dir_remove(parent, *dir, name); !s) return s;
  if (directory) --dir->nlink;  // its ".." pointed here
  set_times(*dir, now(), kMtime | kCtime);
  iput(parent, *dir);
  if (Status s = drop_link(*ino, *inode); !s) return s;
  return reap(lock);
}

Status VolumeImpl::try_rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                              std::string_view new_name, uint32_t flags, uint32_t uid,
                              uint32_t gid) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT)) {
    return Status(EINVAL, "unknown rename flags");
  }
  if ((flags & RENAME_EXCHANGE) && (flags & (RENAME_NOREPLACE | RENAME_WHITEOUT))) {
    return Status(EINVAL, "RENAME_EXCHANGE with RENAME_NOREPLACE or RENAME_WHITEOUT");
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
  // As may_delete for the entry that goes (and the one replaced), may_create for a new one.
  if (Status s = fixed(*from_dir); !s) return Status(EPERM, "directory: " + s.message());
  if (Status s = fixed(*inode); !s) return s;
  if (target) {
    if (Status s = fixed(*to_dir); !s) return Status(EPERM, "directory: " + s.message());
    auto replaced = iget(*target);
    if (!replaced) return replaced.status();
    if (Status s = fixed(*replaced); !s) return s;
  } else if (immutable(*to_dir)) {
    return Status(EPERM, "directory is immutable (chattr +i)");
  }
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
  Result<Inode> victim = Status(ENOENT, "no target");
  if (target) {
    victim = iget(*target);
    if (!victim) return victim.status();
    if (S_ISDIR(inode->mode) && !S_ISDIR(victim->mode)) return Status(ENOTDIR, "not a directory");
    if (!S_ISDIR(inode->mode) && S_ISDIR(victim->mode)) return Status(EISDIR, "is a directory");
    if (S_ISDIR(victim->mode) && !dir_empty(*target, *victim)) {
      return Status(ENOTEMPTY, "directory not empty");
    }
  }
  // RENAME_WHITEOUT (overlayfs) leaves a character device 0/0 under the old name. Its inode
  // is taken before any entry changes, so running out of inodes changes nothing.
  std::optional<uint64_t> whiteout;
  if (flags & RENAME_WHITEOUT) {
    auto w = ialloc();
    if (!w) return w.status();
    whiteout = *w;
  }
  Inode& dest = parent == new_parent ? *from_dir : *to_dir;
  Status placed = target ? dir_set(new_parent, dest, new_name, *ino, type)
                         : dir_add(new_parent, dest, new_name, *ino, type);
  if (!placed) {
    if (whiteout) ifree(*whiteout);
    return placed;
  }
  if (target) {
    if (S_ISDIR(victim->mode)) --to_dir->nlink;
    if (Status s = drop_link(*target, *victim); !s) return s;
  }
  // Takes the old name out of the source directory, or hands it to the whiteout.
  auto release_name = [&]() -> Status {
    if (!whiteout) return dir_remove(parent, *from_dir, name);
    iput(*whiteout, new_inode(*whiteout, S_IFCHR, uid, gid, *from_dir));
    return dir_set(parent, *from_dir, name, *whiteout, DT_CHR);
  };
  if (parent == new_parent) {
    // to_dir is a stale copy of the same inode: work on from_dir only.
    if (target && S_ISDIR(inode->mode)) --from_dir->nlink;
    if (Status s = release_name(); !s) return s;
  } else {
    if (Status s = release_name(); !s) return s;
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
  return reap(lock);
}

Result<Attr> VolumeImpl::try_setattr(uint64_t ino, const SetAttr& c) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  Node* n = locked_node(ino);
  std::unique_lock io(n->io, std::defer_lock);
  if (c.size) io.lock();  // no read or write of this file while its size changes
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (immutable(*inode)) return Status(EPERM, "immutable (chattr +i)");
  const bool times_given = (c.mtime || c.atime) && !c.times_now;
  if (append_only(*inode) && (c.mode || c.uid || c.gid || c.size || times_given)) {
    return Status(EPERM, "append-only (chattr +a)");
  }
  Timestamp t = now();
  if (c.mode) inode->mode = (inode->mode & S_IFMT) | (*c.mode & 07777);
  // chmod rewrites a stored access ACL to match (posix_acl_chmod). Worked out before anything
  // changes, stored after: the block exists and keeps its size, so storing cannot fail.
  std::optional<xattr::Entries> chmodded;
  if (c.mode && inode->xattr_block != 0) {
    auto entries = xattr_load(ino, *inode);
    if (!entries) return entries.status();
    if (xattr::Entry* e = xattr::find(*entries, xattr::kAclAccess)) {
      auto acl = xattr::acl_parse(e->value);
      if (acl && !acl->empty()) {
        xattr::acl_chmod(*acl, inode->mode);
        e->value = xattr::acl_encode(*acl);
        chmodded = std::move(*entries);
      }
    }
  }
  if (c.uid) inode->uid = *c.uid;
  if (c.gid) inode->gid = *c.gid;
  if (c.atime) set_times(*inode, Timestamp{c.atime->tv_sec, uint32_t(c.atime->tv_nsec)}, kAtime);
  if (c.mtime) set_times(*inode, Timestamp{c.mtime->tv_sec, uint32_t(c.mtime->tv_nsec)}, kMtime);
  bool large_cut = false;
  if (c.size) {
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (!S_ISREG(inode->mode)) return Status(EINVAL, "not a regular file");
    if (*c.size > kMaxFileSize) return Status(EFBIG, "file too large");
    if (*c.size < inode->size) {
      uint64_t keep = (*c.size + bs_ - 1) / bs_;
      if (node(ino).mappings != 0) {
        return Status(EBUSY, "part of the file is mapped for DAX; unmap it first");
      }
      // Many blocks to free: after the new size is stored, a piece per step, the file on the
      // orphan chain meanwhile so that the next mount finishes a cut a crash interrupted.
      large_cut = inode->blocks > small_file_blocks();
      if (large_cut) {
        orphan_add(ino, *inode);
      } else if (Status s = truncate_blocks(*inode, keep); !s) {
        return s;
      }
    } else if (*c.size > inode->size) {
      if (Status s = zero_tail(*inode); !s) return s;
    }
    inode->size = *c.size;
    if (!c.mtime) set_times(*inode, t, kMtime);
  }
  if (chmodded) {
    if (Status s = xattr_store(ino, *inode, *chmodded); !s) return s;
  }
  set_times(*inode, t, kCtime);
  iput(ino, *inode);
  if (large_cut) {
    if (Status s = free_blocks_from(ino, ceil_div(*c.size, bs_), lock); !s) return s;
    inode = iget(ino);
    if (!inode) return inode.status();
    orphan_remove(ino, *inode);
    iput(ino, *inode);
  }
  return to_attr(ino, *inode);
}

Result<std::size_t> VolumeImpl::read(uint64_t ino, uint64_t offset, void* buf, std::size_t len) {
  Node* n = locked_node(ino);
  std::shared_lock io(n->io);
  std::vector<uint64_t> lbas;
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (touch_atime(*inode)) iput(ino, *inode);
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
  bool owed = false;
  auto n = write_unsynced(ino, offset, buf, len, &owed);
  if (!n || !owed) return n;
  if (Status s = sync_wait(); !s) return s;
  return n;
}

Result<std::size_t> VolumeImpl::write_unsynced(uint64_t ino, uint64_t offset, const void* buf,
                                               std::size_t len, bool* owed) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (len == 0) return std::size_t(0);
  if (offset >= kMaxFileSize || len > kMaxFileSize - offset) return Status(EFBIG, "file too large");
  Node* n = locked_node(ino);
  std::unique_lock io(n->io);
  // In pieces that each change a handful of metadata blocks, with room made in the journal
  // before each: one large write never outgrows the journal. A crash part way keeps a prefix.
  const uint64_t piece = uint64_t(bs_) * (bs_ / 8);  // a pointer block's worth
  const auto* in = static_cast<const std::byte*>(buf);
  std::size_t done = 0;
  bool committed = false;
  bool sync = false;
  while (done < len) {
    uint64_t at = offset + done;
    std::size_t want = std::min<uint64_t>(len - done, (at / piece + 1) * piece - at);
    auto wrote = write_piece(ino, at, in + done, want, &sync);
    bool short_of_space = wrote ? *wrote < want : wrote.status().error() == ENOSPC;
    if (short_of_space && !committed && space_after_commit()) {
      // Blocks freed in the running transaction are usable once it commits (see with_space).
      committed = true;
      if (wrote) done += *wrote;
      if (sync_wait()) continue;
      if (done > 0) break;
    }
    if (!wrote) {
      if (done == 0) return wrote;
      break;  // a short write; the error comes back on the next call
    }
    done += *wrote;
    if (*wrote < want) break;  // out of space part way
  }
  *owed = sync;
  return done;
}

Result<std::size_t> VolumeImpl::write_piece(uint64_t ino, uint64_t offset, const std::byte* in,
                                            std::size_t len, bool* sync) {
  struct Target {
    uint64_t lba;
    bool fresh;
  };
  std::vector<Target> targets;
  // Writers that allocate hold the gate shared from allocating blocks until their data is
  // written, so that no checkpoint or commit snapshots a pointer to a block whose data is not
  // there yet. An overwrite of blocks the file has, inside its size, points at nothing new and
  // goes without it (the file's io lock keeps its blocks from being freed meanwhile); so the
  // checkpoint after each write does not wait for the other writers, nor they for it.
  std::shared_lock gate(gate_, std::defer_lock);
  for (;;) {
    Lock lock(mu_);
    // Not with the gate held: the commit it may wait for takes the gate exclusively.
    if (!gate.owns_lock()) throttle(lock);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (immutable(*inode)) return Status(EPERM, "immutable (chattr +i)");
    if (append_only(*inode) && offset < inode->size) {
      return Status(EPERM, "append-only (chattr +a): writes go at the end");
    }
    *sync = sync_ || (inode->flags & FS_XFLAG_SYNC);
    const bool allocate = gate.owns_lock();
    Status short_write;
    targets.clear();
    for (uint64_t fb = offset / bs_; fb <= (offset + len - 1) / bs_; ++fb) {
      bool fresh = false;
      auto lba = bmap(*inode, fb, allocate, &fresh);
      if (!lba) {
        short_write = lba.status();
        break;
      }
      if (*lba == 0) break;  // a hole, and no gate: allocate
      targets.push_back({*lba, fresh});
    }
    if (!allocate && (targets.size() * bs_ < offset % bs_ + len || offset + len > inode->size)) {
      if (!short_write) return short_write;
      lock.unlock();
      gate.lock();
      continue;
    }
    if (targets.empty()) {
      iput(ino, *inode);
      return short_write;
    }
    // ENOSPC part way: write what has blocks.
    uint64_t end = std::min<uint64_t>(offset + len, (offset / bs_ + targets.size()) * bs_);
    len = end - offset;
    if (offset > inode->size) {
      if (Status s = zero_tail(*inode); !s) return s;
    }
    inode->size = std::max(inode->size, end);
    stamp_write(ino, *inode);
    iput(ino, *inode);
    break;
  }
  // The data, without the volume lock. Whole blocks go straight from the caller's buffer into
  // the BTT's free block: the only copy.
  // Only the first and the last block can be partial: a read-modify-write each. The whole
  // blocks between go to the BTT in one call, which shares its locks among them.
  auto partial = [&](const Target& t, uint64_t at, uint64_t n_bytes, const std::byte* src) {
    std::vector<std::byte> tmp(bs_);
    if (t.fresh) {
      std::memset(tmp.data(), 0, bs_);  // never show what the block held before
    } else if (Status s = btt_->read(t.lba, tmp.data()); !s) {
      return s;
    }
    std::memcpy(tmp.data() + at, src, n_bytes);
    return btt_->write(t.lba, tmp.data());
  };
  std::size_t first = 0;
  std::size_t last = targets.size();
  if (uint64_t at = offset % bs_; at != 0 || len < bs_) {
    uint64_t n_bytes = std::min<uint64_t>(bs_ - at, len);
    if (Status s = partial(targets[0], at, n_bytes, in); !s) return s;
    in += n_bytes;
    first = 1;
  }
  const uint64_t tail = (offset + len) % bs_;
  if (tail != 0 && last > first) --last;
  std::vector<uint64_t> lbas;
  lbas.reserve(last - first);
  for (std::size_t i = first; i < last; ++i) lbas.push_back(targets[i].lba);
  if (Status s = btt_->write_sectors(lbas.data(), lbas.size(), in); !s) return s;
  if (last < targets.size()) {
    if (Status s = partial(targets[last], 0, tail, in + lbas.size() * bs_); !s) return s;
  }
  return len;
}

void VolumeImpl::hold(uint64_t ino, uint64_t count) {
  Lock lock(mu_);
  held_.add(ino, count);
}

void VolumeImpl::forget(uint64_t ino, uint64_t count) {
  KillPoint kill_point{this};
  Lock lock(mu_);
  if (held_.sub(ino, count) != 0) return;
  // After drop_caches the kernel forgets most inodes at once: give their memory back.
  if (held_.shrink()) malloc_trim(0);
  auto it = nodes_.find(ino);
  if (it != nodes_.end() && it->second->mappings != 0) return;
  if (orphans_.count(ino) != 0) {
    if (!read_only_ && failed_.is_ok()) release_inode(ino, lock);
    return;
  }
  // The front end forgot the inode (the kernel evicted it, or drop_caches): nothing of it stays
  // in memory, a directory's name index included; the next lookup starts afresh. No call on it
  // is in flight: the kernel sends FORGET only for inodes it no longer uses.
  if (it != nodes_.end()) nodes_.erase(it);
}

struct statvfs VolumeImpl::statfs() {
  Lock lock(mu_);
  struct statvfs s {};
  s.f_bsize = bs_;
  s.f_frsize = bs_;
  s.f_blocks = sb_.block_count - sb_.data_start;
  s.f_bfree = free_blocks_;
  // What a file can still grow by: its data blocks need pointer blocks too (one per bs / 8),
  // and blocks reserved for fallocate are spoken for. Blocks freed in the running transaction
  // count: a call that needs them commits first (with_space), so `rm` then `df` shows the space.
  uint64_t unusable = std::min(free_blocks_, reserved_);
  uint64_t usable = free_blocks_ - unusable;
  s.f_bavail = usable - ceil_div(usable, bs_ / 8);
  s.f_files = sb_.inode_count - 2;
  s.f_ffree = free_inodes_;
  s.f_favail = free_inodes_;
  s.f_fsid = sb_.uuid[0] | (uint64_t(sb_.uuid[1]) << 8);
  s.f_namemax = 255;
  return s;
}

// --- extended attributes and ACLs -------------------------------------------------------------

Result<xattr::Entries> VolumeImpl::xattr_load(uint64_t ino, const Inode& inode,
                                              std::vector<uint64_t>* chain) {
  if (chain != nullptr) chain->clear();
  if (inode.xattr_block == 0) return xattr::Entries{};
  auto read = [this](uint64_t lba) -> const std::byte* {
    return lba >= sb_.data_start && lba < sb_.block_count ? meta(lba) : nullptr;
  };
  auto entries = xattr::decode(read, inode.xattr_block, bs_, ino, chain);
  if (!entries) return Status(EUCLEAN, entries.status().message() + "; run fsck.vpmfs");
  return entries;
}

Status VolumeImpl::xattr_store(uint64_t ino, Inode& inode, const xattr::Entries& entries) {
  if (entries.empty()) {
    xattr_free(ino, inode);
    return Status::ok();
  }
  std::size_t names = 0;
  for (const xattr::Entry& e : entries) names += e.name.size() + 1;
  if (names > xattr::kListMax) {
    return Status(ENOSPC, "the names of an inode's extended attributes are limited to 64 KiB");
  }
  const std::string stream = xattr::serialize(entries);
  if (stream.size() > xattr::kStreamMax) {
    return Status(ENOSPC, "an inode's extended attributes are limited to 128 KiB");
  }
  // The whole chain changes in one transaction: it may take a quarter of the journal.
  const uint64_t want = xattr::chain_length(stream.size(), bs_);
  if (want > (sb_.journal_blocks - 1) / 4) {
    return Status(ENOSPC, "the journal of this volume holds at most " +
                              std::to_string((sb_.journal_blocks - 1) / 4) +
                              " blocks of one inode's extended attributes");
  }
  std::vector<uint64_t> chain;
  if (auto old = xattr_load(ino, inode, &chain); !old) return old.status();
  // New blocks first, so that ENOSPC leaves everything as it was.
  std::vector<uint64_t> fresh;
  while (chain.size() + fresh.size() < want) {
    auto b = balloc();
    if (!b) {
      for (uint64_t f : fresh) bfree(f);
      return b.status();
    }
    fresh.push_back(*b);
  }
  for (; chain.size() > want; chain.pop_back(), --inode.blocks) bfree(chain.back());
  const std::size_t reused = chain.size();
  chain.insert(chain.end(), fresh.begin(), fresh.end());
  inode.blocks += fresh.size();
  std::vector<std::byte> image(bs_);
  for (uint64_t i = 0; i < want; ++i) {
    xattr::encode_block(stream, uint32_t(entries.size()), i, i + 1 < want ? chain[i + 1] : 0,
                        image.data(), bs_, ino);
    if (i >= reused) {
      std::memcpy(meta_new(chain[i]), image.data(), bs_);
    } else if (std::memcmp(meta(chain[i]), image.data(), bs_) != 0) {
      std::memcpy(meta_mut(chain[i]), image.data(), bs_);  // only the blocks that change
    }
  }
  inode.xattr_block = chain[0];
  return Status::ok();
}

void VolumeImpl::xattr_free(uint64_t ino, Inode& inode) {
  // As much of the chain as can be read: a damaged block ends it.
  std::vector<uint64_t> chain;
  (void)xattr_load(ino, inode, &chain);
  for (uint64_t lba : chain) {
    bfree(lba);
    --inode.blocks;
  }
  inode.xattr_block = 0;
}

Status VolumeImpl::acl_set(uint64_t ino, Inode& inode, xattr::Space space, std::string_view value) {
  if (S_ISLNK(inode.mode)) return Status(EOPNOTSUPP, "symlinks have no ACLs");
  auto acl = xattr::acl_parse(value);
  if (!acl) return acl.status();
  const bool access = space == xattr::Space::acl_access;
  if (!access && !S_ISDIR(inode.mode)) {
    // As Linux: only directories have a default ACL; removing one elsewhere is a no-op.
    if (!acl->empty()) return Status(EACCES, "only directories have default ACLs");
    return Status::ok();
  }
  auto entries = xattr_load(ino, inode);
  if (!entries) return entries.status();
  const std::string_view name = access ? xattr::kAclAccess : xattr::kAclDefault;
  uint32_t mode = inode.mode;
  // An access ACL of the three base entries says no more than the permission bits: it is
  // kept as the mode alone (posix_acl_equiv_mode), and any stored one goes.
  bool store = !acl->empty() && (!access || xattr::acl_mode(*acl, &mode));
  std::erase_if(*entries, [&](const xattr::Entry& e) { return e.name == name; });
  if (store) entries->push_back({std::string(name), xattr::acl_encode(*acl)});
  if (Status s = xattr_store(ino, inode, *entries); !s) return s;
  inode.mode = mode;
  return Status::ok();
}

Result<std::size_t> VolumeImpl::getxattr(uint64_t ino, std::string_view name, void* buf,
                                         std::size_t size) {
  auto space = xattr::classify(name);
  if (!space) return space.status();
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (*space == xattr::Space::user && !S_ISREG(inode->mode) && !S_ISDIR(inode->mode)) {
    return Status(ENODATA, "only files and directories have user attributes");
  }
  auto entries = xattr_load(ino, *inode);
  if (!entries) return entries.status();
  const xattr::Entry* e = xattr::find(*entries, name);
  if (e == nullptr) return Status(ENODATA, "no attribute " + std::string(name));
  if (size == 0) return e->value.size();
  if (size < e->value.size()) return Status(ERANGE, "buffer too small for the attribute");
  std::memcpy(buf, e->value.data(), e->value.size());
  return e->value.size();
}

Status VolumeImpl::try_setxattr(uint64_t ino, std::string_view name, const void* value,
                                std::size_t size, int flags) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  if (flags & ~(XATTR_CREATE | XATTR_REPLACE)) return Status(EINVAL, "unknown setxattr flags");
  auto space = xattr::classify(name);
  if (!space) return space.status();
  if (size > xattr::kSizeMax) return Status(E2BIG, "attribute value larger than 64 KiB");
  if (size > 0 && value == nullptr) return Status(EFAULT, "no attribute value");
  std::string_view v(static_cast<const char*>(value), size);
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (Status s = fixed(*inode); !s) return s;
  // As Linux: user attributes are for the owner's data, so only files and directories.
  if (*space == xattr::Space::user && !S_ISREG(inode->mode) && !S_ISDIR(inode->mode)) {
    return Status(EPERM, "only files and directories take user attributes");
  }
  if (*space == xattr::Space::acl_access || *space == xattr::Space::acl_default) {
    // ACLs are set whole, as the kernel does, whatever XATTR_CREATE or XATTR_REPLACE say.
    if (Status s = acl_set(ino, *inode, *space, v); !s) return s;
  } else {
    auto entries = xattr_load(ino, *inode);
    if (!entries) return entries.status();
    xattr::Entry* e = xattr::find(*entries, name);
    if (e != nullptr && (flags & XATTR_CREATE)) {
      return Status(EEXIST, std::string(name) + " exists");
    }
    if (e == nullptr && (flags & XATTR_REPLACE)) {
      return Status(ENODATA, "no attribute " + std::string(name));
    }
    if (e != nullptr) {
      e->value.assign(v);
    } else {
      entries->push_back({std::string(name), std::string(v)});
    }
    if (Status s = xattr_store(ino, *inode, *entries); !s) return s;
  }
  set_times(*inode, now(), kCtime);
  iput(ino, *inode);
  return Status::ok();
}

Result<std::size_t> VolumeImpl::listxattr(uint64_t ino, char* buf, std::size_t size) {
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  auto entries = xattr_load(ino, *inode);
  if (!entries) return entries.status();
  std::size_t total = 0;
  for (const xattr::Entry& e : *entries) total += e.name.size() + 1;
  if (size == 0) return total;
  if (size < total) return Status(ERANGE, "buffer too small for the attribute names");
  for (const xattr::Entry& e : *entries) {
    std::memcpy(buf, e.name.c_str(), e.name.size() + 1);
    buf += e.name.size() + 1;
  }
  return total;
}

Status VolumeImpl::try_removexattr(uint64_t ino, std::string_view name) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  auto space = xattr::classify(name);
  if (!space) return space.status();
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (Status s = fixed(*inode); !s) return s;
  if (*space == xattr::Space::user && !S_ISREG(inode->mode) && !S_ISDIR(inode->mode)) {
    return Status(EPERM, "only files and directories take user attributes");
  }
  auto entries = xattr_load(ino, *inode);
  if (!entries) return entries.status();
  const bool acl = *space == xattr::Space::acl_access || *space == xattr::Space::acl_default;
  if (xattr::find(*entries, name) == nullptr) {
    // Removing an ACL there is none of succeeds, as on Linux (it sets a null ACL).
    if (acl) return Status::ok();
    return Status(ENODATA, "no attribute " + std::string(name));
  }
  if (acl) {
    if (Status s = acl_set(ino, *inode, *space, {}); !s) return s;
  } else {
    std::erase_if(*entries, [&](const xattr::Entry& e) { return e.name == name; });
    if (Status s = xattr_store(ino, *inode, *entries); !s) return s;
  }
  set_times(*inode, now(), kCtime);
  iput(ino, *inode);
  return Status::ok();
}

// --- block map walks --------------------------------------------------------------------------

uint64_t VolumeImpl::map_capacity() const {
  const uint64_t per = bs_ / 8;
  return kDirect + per + per * per + per * per * per + per * per * per * per;
}

void VolumeImpl::map_walk(const Inode& inode, uint64_t lo, uint64_t hi,
                          const std::function<bool(const MapRun&)>& fn) {
  const uint64_t per = bs_ / 8;
  // The node `p` at `level` covers file blocks [base, base + span); returns false to stop.
  std::function<bool(uint64_t, int, uint64_t, uint64_t)> visit =
      [&](uint64_t p, int level, uint64_t base, uint64_t span) -> bool {
    uint64_t a = std::max(base, lo), b = std::min(base + span, hi);
    if (a >= b) return true;
    // A pointer outside the data area is damage (fsck.vpmfs clears it): nothing under it is
    // this file's, so nothing under it is read, freed or counted.
    if (p != 0 && (p < sb_.data_start || p >= sb_.block_count)) p = 0;
    if (p == 0) return fn(MapRun{a, b - a, 0, level, base});  // a whole missing subtree at once
    if (level == 0) return fn(MapRun{a, 1, p, 0, base});
    uint64_t child = span / per;
    for (uint64_t i = (a - base) / child; i <= (b - 1 - base) / child; ++i) {
      uint64_t c;
      std::memcpy(&c, meta(p) + i * 8, 8);
      if (!visit(c, level - 1, base + i * child, child)) return false;
    }
    return true;
  };
  for (uint64_t i = lo; i < std::min<uint64_t>(hi, kDirect); ++i) {
    if (!visit(inode.ptr[i], 0, i, 1)) return;
  }
  uint64_t base = kDirect, span = per;
  for (int level = 1; level <= 4 && base < hi; ++level) {
    if (!visit(inode.ptr[kDirect + level - 1], level, base, span)) return;
    base += span;
    span *= per;
  }
}

uint64_t VolumeImpl::map_need(const Inode& inode, uint64_t lo, uint64_t hi) {
  const uint64_t per = bs_ / 8;
  uint64_t need = 0;
  map_walk(inode, lo, hi, [&](const MapRun& r) {
    if (r.lba != 0) return true;
    need += r.count;
    // Plus the pointer blocks of the missing subtree that the run passes through, level by
    // level: those whose span of file blocks meets [r.fb, r.fb + r.count).
    uint64_t span = 1;
    for (int k = 1; k <= r.level; ++k) {
      span *= per;
      need += (r.fb + r.count - 1 - r.base) / span - (r.fb - r.base) / span + 1;
    }
    return true;
  });
  return need;
}

void VolumeImpl::punch_blocks(Inode& inode, uint64_t lo, uint64_t hi) {
  const uint64_t per = bs_ / 8;
  // Frees what of [lo, hi) lies under pointer block `p`; true if `p` went too, having nothing
  // left under it.
  std::function<bool(uint64_t, int, uint64_t, uint64_t)> punch =
      [&](uint64_t p, int level, uint64_t base, uint64_t span) -> bool {
    uint64_t a = std::max(base, lo), b = std::min(base + span, hi);
    uint64_t child = span / per;
    for (uint64_t i = (a - base) / child; i <= (b - 1 - base) / child; ++i) {
      uint64_t c;
      std::memcpy(&c, meta(p) + i * 8, 8);
      if (c == 0) continue;
      bool gone = true;
      if (level == 1) {
        bfree(c);  // a data block, inside [lo, hi) as child spans are 1
        --inode.blocks;
      } else {
        gone = punch(c, level - 1, base + i * child, child);
      }
      if (gone) {
        uint64_t zero = 0;
        std::memcpy(meta_mut(p) + i * 8, &zero, 8);
      }
    }
    const std::byte* q = meta(p);
    for (uint64_t i = 0; i < per; ++i) {
      uint64_t c;
      std::memcpy(&c, q + i * 8, 8);
      if (c != 0) return false;
    }
    bfree(p);
    --inode.blocks;
    return true;
  };
  for (uint64_t i = lo; i < std::min<uint64_t>(hi, kDirect); ++i) {
    if (inode.ptr[i] != 0) {
      bfree(inode.ptr[i]);
      --inode.blocks;
      inode.ptr[i] = 0;
    }
  }
  uint64_t base = kDirect, span = per;
  for (int level = 1; level <= 4 && base < hi; ++level) {
    uint64_t& p = inode.ptr[kDirect + level - 1];
    if (p != 0 && base + span > lo && punch(p, level, base, span)) p = 0;
    base += span;
    span *= per;
  }
}

// --- fallocate and SEEK_DATA / SEEK_HOLE ------------------------------------------------------

Status VolumeImpl::try_fallocate(uint64_t ino, int mode, uint64_t offset, uint64_t length) {
  KillPoint kill_point{this};
  VPMFS_WRITABLE();
  constexpr int kKeep = FALLOC_FL_KEEP_SIZE, kPunch = FALLOC_FL_PUNCH_HOLE,
                kZero = FALLOC_FL_ZERO_RANGE;
  // The checks in the order vfs_fallocate makes them.
  if (length == 0) return Status(EINVAL, "fallocate of no bytes");
  if (mode & ~(kKeep | kPunch | kZero)) return Status(EOPNOTSUPP, "fallocate mode not supported");
  if ((mode & kPunch) && (mode & kZero)) {
    return Status(EINVAL, "FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE together");
  }
  if ((mode & kPunch) && !(mode & kKeep)) {
    return Status(EOPNOTSUPP, "FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE");
  }
  Node* n = locked_node(ino);
  // No read or write of this file meanwhile: blocks come and go under them.
  std::unique_lock io(n->io);
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (immutable(*inode)) return Status(EPERM, "immutable (chattr +i)");
    if (append_only(*inode) && (mode & ~kKeep)) return Status(EPERM, "append-only (chattr +a)");
    if (S_ISDIR(inode->mode)) return Status(EISDIR, "is a directory");
    if (S_ISFIFO(inode->mode)) return Status(ESPIPE, "is a fifo");
    if (!S_ISREG(inode->mode)) return Status(ENODEV, "not a regular file");
  }
  if (offset > kMaxFileSize || length > kMaxFileSize - offset ||
      ceil_div(offset + length, bs_) > map_capacity()) {
    return Status(EFBIG, "file too large");
  }
  if (mode & kPunch) {
    {
      Lock lock(mu_);
      if (n->mappings != 0) {  // mapped blocks must stay where they are
        return Status(EBUSY, "part of the file is mapped for DAX; unmap it first");
      }
    }
    return fallocate_punch(ino, offset, offset + length);
  }
  return fallocate_allocate(ino, offset, offset + length, mode & kZero, mode & kKeep);
}

Status VolumeImpl::fallocate_allocate(uint64_t ino, uint64_t offset, uint64_t end, bool zero,
                                      bool keep) {
  const uint64_t first = offset / bs_, last = ceil_div(end, bs_);
  // 1. Reserve every block the whole range needs before changing anything: ENOSPC leaves the
  //    file as it was, and nothing can take the blocks while the range is done in pieces.
  //    Blocks freed in the running transaction count once it commits (with_space).
  uint64_t mine = 0;
  Status reserved = with_space([&]() -> Status {
    Lock lock(mu_);
    throttle(lock);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    uint64_t need = map_need(*inode, first, last);
    uint64_t usable = free_blocks_ - std::min(free_blocks_, quarantine_.size() + reserved_);
    if (need > usable) {
      return Status(ENOSPC, "fallocate needs " + std::to_string(need) + " blocks, " +
                                std::to_string(usable) + " are free");
    }
    reserved_ += need;
    mine = need;
    return Status::ok();
  });
  if (!reserved) return reserved;
  struct Release {
    VolumeImpl* v;
    uint64_t& left;
    ~Release() {
      Lock lock(v->mu_);
      v->reserved_ -= left;
    }
  } release{this, mine};

  // 2. The range in pieces small enough for one transaction each (a few dozen metadata
  //    blocks), as writes are: each piece leaves a consistent file, zeros where it allocated.
  const uint64_t piece = uint64_t(bs_ / 8) * 8;
  for (uint64_t lo = first; lo < last;) {
    const uint64_t hi = std::min(last, (lo / piece + 1) * piece);
    std::vector<uint64_t> trims;  // fresh blocks, to read as zeros from now on
    struct Partial {
      uint64_t lba;
      uint32_t from, to;
    };
    std::vector<Partial> partials;  // what zero-range zeroes in blocks that stay
    Status failed;
    // Held from allocating blocks until they read as zeros, so that no commit or checkpoint
    // points the file at a block that still holds someone's old data.
    std::shared_lock gate(gate_);
    {
      Lock lock(mu_);
      auto inode = iget(ino);
      if (!inode) return inode.status();
      uint64_t take = std::min(map_need(*inode, lo, hi), mine);
      reserved_ -= take;
      mine -= take;
      for (uint64_t fb = lo; fb < hi; ++fb) {
        bool fresh = false;
        auto lba = bmap(*inode, fb, true, &fresh);
        if (!lba) {
          failed = lba.status();  // not for want of space: the reservation covers it
          break;
        }
        if (fresh) {
          trims.push_back(*lba);
        } else if (zero) {
          partials.push_back({*lba, uint32_t(std::max(offset, fb * bs_) - fb * bs_),
                              uint32_t(std::min(end, (fb + 1) * bs_) - fb * bs_)});
        }
      }
      Timestamp t = now();
      int times = kCtime;
      uint64_t new_end = std::min(end, hi * bs_);
      if (!keep && new_end > inode->size) {
        if (Status s = zero_tail(*inode); !s) failed = s;
        inode->size = new_end;
        times |= kMtime;
      }
      if (zero) times |= kMtime;
      set_times(*inode, t, times);
      iput(ino, *inode);
    }
    // Zeros, without the volume lock. A fresh block is trimmed: the BTT map's zero flag, no
    // data written. Its last write (by an earlier owner) is durable, as freeing it took a
    // commit. A block the file keeps gets zeros written instead: its last write may still be
    // in a writeback epoch being committed, and a trim racing that commit can be lost (the
    // old data comes back; seen with the BTT as it is).
    for (uint64_t lba : trims) {
      if (Status s = btt_->trim(lba); !s) return s;
    }
    std::vector<std::byte> block(partials.empty() ? 0 : bs_);
    for (const Partial& p : partials) {
      if (p.from != 0 || p.to != bs_) {
        if (Status s = btt_->read(p.lba, block.data()); !s) return s;
      }
      std::memset(block.data() + p.from, 0, p.to - p.from);
      if (Status s = btt_->write(p.lba, block.data()); !s) return s;
    }
    gate.unlock();
    if (!failed) return failed;
    lo = hi;
    if (lo < last) {
      Lock lock(mu_);
      throttle(lock);
    }
  }
  return Status::ok();
}

Status VolumeImpl::fallocate_punch(uint64_t ino, uint64_t offset, uint64_t end) {
  // The edges: the parts of partly covered blocks are zeroed in place.
  const uint64_t whole_first = ceil_div(offset, bs_), whole_end = end / bs_;
  struct Partial {
    uint64_t fb;
    uint32_t from, to;
  };
  std::vector<Partial> edges;
  if (offset % bs_ != 0 || offset / bs_ == end / bs_) {
    uint64_t fb = offset / bs_;
    edges.push_back(
        {fb, uint32_t(offset % bs_), uint32_t(std::min(end - fb * bs_, uint64_t(bs_)))});
  }
  if (end % bs_ != 0 && end / bs_ != offset / bs_) {
    edges.push_back({end / bs_, 0, uint32_t(end % bs_)});
  }
  std::vector<std::pair<uint64_t, Partial>> zero;  // lba, what of it
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    for (const Partial& e : edges) {
      if (e.from == e.to) continue;
      auto lba = bmap(*inode, e.fb, false, nullptr);
      if (!lba) return lba.status();
      if (*lba != 0) zero.push_back({*lba, e});
    }
  }
  std::vector<std::byte> block(bs_);
  for (const auto& [lba, e] : zero) {
    if (Status s = btt_->read(lba, block.data()); !s) return s;
    std::memset(block.data() + e.from, 0, e.to - e.from);
    if (Status s = btt_->write(lba, block.data()); !s) return s;
  }
  // Whole blocks go back to holes, a piece per transaction, skipping what is a hole already.
  // Freed blocks stay quarantined until the transaction that freed them commits.
  const uint64_t piece = uint64_t(bs_ / 8) * 8;
  for (uint64_t lo = whole_first; lo < whole_end;) {
    Lock lock(mu_);
    throttle(lock);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    uint64_t next = whole_end;
    map_walk(*inode, lo, whole_end, [&](const MapRun& r) {
      if (r.lba == 0) return true;
      next = r.fb;
      return false;
    });
    if (next >= whole_end) break;
    const uint64_t hi = std::min(whole_end, (next / piece + 1) * piece);
    punch_blocks(*inode, next, hi);
    iput(ino, *inode);
    lo = hi;
  }
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  set_times(*inode, now(), kMtime | kCtime);
  iput(ino, *inode);
  return Status::ok();
}

Result<uint64_t> VolumeImpl::seek_data(uint64_t ino, uint64_t offset, int whence) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return Status(EINVAL, "whence not supported");
  Node* n = locked_node(ino);
  std::shared_lock io(n->io);
  Lock lock(mu_);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  if (offset >= inode->size) return Status(ENXIO, "offset at or past the end of the file");
  // Only regular files have holes; anything else is data up to its size.
  if (!S_ISREG(inode->mode)) return whence == SEEK_DATA ? offset : inode->size;
  // Holes are unmapped blocks; the end of the file is a hole too.
  std::optional<uint64_t> found;
  map_walk(*inode, offset / bs_, ceil_div(inode->size, bs_), [&](const MapRun& r) {
    if ((r.lba != 0) != (whence == SEEK_DATA)) return true;
    found = r.fb;
    return false;
  });
  if (!found) {
    if (whence == SEEK_DATA) return Status(ENXIO, "no data after the offset");
    return inode->size;
  }
  return std::max(offset, *found * bs_);
}

}  // namespace vpmfs
