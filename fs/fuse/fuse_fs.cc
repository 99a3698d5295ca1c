#define FUSE_USE_VERSION 312
#include "fuse_fs.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fs.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <syslog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <nlohmann/json.hpp>

#include "vpmfs/dax.h"

namespace vpmfs {

namespace {

std::atomic<bool> g_stderr{true};
// The kernel agreed to map direct-I/O (DAX) files shared (fuse_dev_writev).
std::atomic<bool> g_allow_mmap{false};
// The kernel's write-back cache is on (the writeback_cache option, agreed at FUSE_INIT).
std::atomic<bool> g_writeback_cache{false};

// What every request handler reaches through fuse_req_userdata().
struct Daemon {
  Volume& volume;
  const DaemonOptions& options;
  // The kernel leaves the umask to vpmfs (FUSE_CAP_DONT_MASK), which applies it unless the
  // parent directory has a default ACL.
  bool dont_mask = false;
  fuse_session* session = nullptr;  // for notifications to the kernel
};

// What an open file carries: the DAX mappings made through it (VPMFS_IOC_DAX_MAP), released
// when it is closed.
struct OpenFile {
  std::mutex mu;
  std::map<std::pair<uint64_t, uint64_t>, std::unique_ptr<DaxMapping>> mappings;
};

OpenFile* open_file(fuse_file_info* fi) {
  return reinterpret_cast<OpenFile*>(fi->fh);
}

Daemon& daemon_of(fuse_req_t req) {
  return *static_cast<Daemon*>(fuse_req_userdata(req));
}
Volume& vol(fuse_req_t req) {
  return daemon_of(req).volume;
}

// The kernel may cache attributes and names this long. vpmfs is the only writer of its image,
// and the kernel drops its cache itself after every change it makes through the mount.
constexpr double kTimeout = 1.0;

void reply_status(fuse_req_t req, const Status& s) {
  fuse_reply_err(req, s ? 0 : s.error());
}

// Replies with a new entry and gives the kernel its lookup reference. Should the reply fail
// (the request was interrupted), the reference goes again at once.
void reply_entry(fuse_req_t req, const Attr& attr, fuse_file_info* created = nullptr) {
  Volume& v = vol(req);
  fuse_entry_param e{};
  e.ino = attr.ino;
  e.generation = attr.generation;
  e.attr = attr.to_stat(v.block_size());
  e.attr_timeout = kTimeout;
  e.entry_timeout = kTimeout;
  v.hold(attr.ino, 1);
  int rc = created != nullptr ? fuse_reply_create(req, &e, created) : fuse_reply_entry(req, &e);
  if (rc != 0) v.forget(attr.ino, 1);
}

void reply_entry_or_error(fuse_req_t req, const Result<Attr>& r) {
  if (r) {
    reply_entry(req, *r);
  } else {
    fuse_reply_err(req, r.status().error());
  }
}

void reply_attr(fuse_req_t req, const Result<Attr>& r) {
  if (!r) {
    fuse_reply_err(req, r.status().error());
    return;
  }
  struct stat st = r->to_stat(vol(req).block_size());
  fuse_reply_attr(req, &st, kTimeout);
}

void op_init(void* userdata, fuse_conn_info* conn) {
  auto& d = *static_cast<Daemon*>(userdata);
  conn->max_write = d.options.max_write;
  conn->max_read = 0;
  // Writes go straight to the image, whose mapping outlives a killed daemon; a kernel
  // write-back cache holds acknowledged data where a daemon crash loses it, so it is opt-in.
  if (d.options.writeback_cache && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) {
    conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    g_writeback_cache = true;
  } else {
    conn->want &= ~unsigned(FUSE_CAP_WRITEBACK_CACHE);
  }
  // open(O_TRUNC) truncates through a setattr the kernel sends first, rather than leaving it
  // to an open that would have to do it itself (libfuse turns this on by default).
  conn->want &= ~unsigned(FUSE_CAP_ATOMIC_O_TRUNC);
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
  if (conn->capable & FUSE_CAP_CACHE_SYMLINKS) conn->want |= FUSE_CAP_CACHE_SYMLINKS;
  // Inodes can be found again by number and generation (LOOKUP of "." and "..").
  if (conn->capable & FUSE_CAP_EXPORT_SUPPORT) conn->want |= FUSE_CAP_EXPORT_SUPPORT;
  // FS_IOC_FSGETXATTR and FS_IOC_FSSETXATTR on directories too (the DAX flag they pass on).
  if (conn->capable & FUSE_CAP_IOCTL_DIR) conn->want |= FUSE_CAP_IOCTL_DIR;
  // Directory listings come from readdir; attributes are looked up by name as needed.
  conn->want &= ~unsigned(FUSE_CAP_READDIRPLUS);
  // setuid/setgid are cleared here too (kill_privileges), by today's rules: the kernel's own
  // fallback for FUSE (used while libfuse cannot take the flag) keeps setgid unless
  // group-exec is set.
  if (conn->capable & FUSE_CAP_HANDLE_KILLPRIV) conn->want |= FUSE_CAP_HANDLE_KILLPRIV;
  // ACLs: the kernel enforces them (this implies default_permissions) from the
  // system.posix_acl_* attributes vpmfs stores; vpmfs keeps mode and ACL in step and applies
  // default ACLs to new nodes, so it needs the umask unapplied.
  auto probe = d.volume.getxattr(kRootIno, "system.posix_acl_access", nullptr, 0);
  bool acls = probe || probe.status().error() != EOPNOTSUPP;
  if (acls && d.options.default_permissions && (conn->capable & FUSE_CAP_POSIX_ACL) &&
      (conn->capable & FUSE_CAP_DONT_MASK)) {
    conn->want |= FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK;
    d.dont_mask = true;
  }
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (std::strcmp(name, ".") == 0) {
    // File handles (open_by_handle_at, NFS export): the kernel asks for an inode by its
    // number, of any type; it checks the generation itself. A file gone (or going) is stale.
    auto attr = vol(req).getattr(parent);
    if (attr && attr->nlink == 0) attr = Status(ESTALE, "unlinked");
    reply_entry_or_error(req, attr);
    return;
  }
  auto found = vol(req).lookup(parent, name);
  if (!found && found.status().error() == ENOENT) {
    // No such name: the kernel may keep that answer as long as a found entry (a negative
    // dentry; it replaces it when it creates the name), so that lookups of a missing name
    // again and again (a shell's PATH, a compiler's include path) stay in the kernel.
    fuse_entry_param none{};
    none.entry_timeout = kTimeout;
    fuse_reply_entry(req, &none);
    return;
  }
  reply_entry_or_error(req, found);
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  vol(req).forget(ino, nlookup);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) vol(req).forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

// Whether the caller is in group gid (its fsgid or a supplementary group).
bool caller_in_group(fuse_req_t req, uint32_t gid) {
  if (fuse_req_ctx(req)->gid == gid) return true;
  gid_t groups[256];
  int n = fuse_req_getgroups(req, 256, groups);
  for (int i = 0; i < std::min(n, 256); ++i) {
    if (groups[i] == gid) return true;
  }
  return false;
}

// After a write, truncate, fallocate or chown of a regular file, by the kernel's rules for local
// filesystems (setattr_should_drop_suidgid, chown_common): root (CAP_FSETID; FUSE does not pass
// capabilities, so root stands for them) keeps both bits on a write, truncate or fallocate.
// Otherwise setuid goes, and setgid goes if group-exec is set or if the caller is neither in
// the file's group nor root.
void kill_privileges(fuse_req_t req, fuse_ino_t ino, bool chown) {
  Volume& v = vol(req);
  bool root = fuse_req_ctx(req)->uid == 0;
  if (root && !chown) return;
  auto attr = v.peek_attr(ino);
  if (!attr || !S_ISREG(attr->mode) || !(attr->mode & (S_ISUID | S_ISGID))) return;
  uint32_t kill = 0;
  if (attr->mode & S_ISUID) kill |= S_ISUID;
  if ((attr->mode & S_ISGID) &&
      ((attr->mode & S_IXGRP) || (!root && !caller_in_group(req, attr->gid)))) {
    kill |= S_ISGID;
  }
  if (kill == 0) return;
  SetAttr c;
  c.mode = attr->mode & 07777 & ~kill;
  if (!v.setattr(ino, c)) return;
  // The kernel caches the mode it last saw; it must ask again. Attributes only (offset < 0),
  // which needs no lock the writer may hold.
  fuse_lowlevel_notify_inval_inode(daemon_of(req).session, ino, -1, 0);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  reply_attr(req, vol(req).getattr(ino));
}

timespec now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  SetAttr c;
  if (to_set & FUSE_SET_ATTR_MODE) c.mode = attr->st_mode;
  if (to_set & FUSE_SET_ATTR_UID) c.uid = attr->st_uid;
  if (to_set & FUSE_SET_ATTR_GID) c.gid = attr->st_gid;
  if (to_set & FUSE_SET_ATTR_SIZE) c.size = uint64_t(attr->st_size);
  if (to_set & FUSE_SET_ATTR_ATIME_NOW) {
    c.atime = now();
  } else if (to_set & FUSE_SET_ATTR_ATIME) {
    c.atime = attr->st_atim;
  }
  if (to_set & FUSE_SET_ATTR_MTIME_NOW) {
    c.mtime = now();
  } else if (to_set & FUSE_SET_ATTR_MTIME) {
    c.mtime = attr->st_mtim;
  }
  const bool atime_given = (to_set & FUSE_SET_ATTR_ATIME) && !(to_set & FUSE_SET_ATTR_ATIME_NOW);
  const bool mtime_given = (to_set & FUSE_SET_ATTR_MTIME) && !(to_set & FUSE_SET_ATTR_MTIME_NOW);
  c.times_now = !atime_given && !mtime_given;
  auto changed = vol(req).setattr(ino, c);
  if (changed && (c.size || c.uid || c.gid)) {
    kill_privileges(req, ino, c.uid || c.gid);
    changed = vol(req).getattr(ino);
  }
  reply_attr(req, changed);
}

void op_readlink(fuse_req_t req, fuse_ino_t ino) {
  auto target = vol(req).readlink(ino);
  if (target) {
    fuse_reply_readlink(req, target->c_str());
  } else {
    fuse_reply_err(req, target.status().error());
  }
}

// The umask to apply to a new node: the caller's, when the kernel left it to vpmfs.
uint32_t umask_of(fuse_req_t req) {
  return daemon_of(req).dont_mask ? fuse_req_ctx(req)->umask : 0;
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  reply_entry_or_error(req,
                       vol(req).mknod(parent, name, mode, rdev, ctx->uid, ctx->gid, umask_of(req)));
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  reply_entry_or_error(req, vol(req).mkdir(parent, name, mode, ctx->uid, ctx->gid, umask_of(req)));
}

void op_symlink(fuse_req_t req, const char* target, fuse_ino_t parent, const char* name) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  reply_entry_or_error(req, vol(req).symlink(parent, name, target, ctx->uid, ctx->gid));
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name) {
  reply_entry_or_error(req, vol(req).link(ino, parent, name));
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  reply_status(req, vol(req).unlink(parent, name));
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  reply_status(req, vol(req).rmdir(parent, name));
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
               const char* new_name, unsigned int flags) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  reply_status(req, vol(req).rename(parent, name, new_parent, new_name, flags, ctx->uid, ctx->gid));
}

// DAX files (dax=always, or dax=inode and FS_XFLAG_DAX) are served without the kernel's page
// cache: direct-I/O opens, so every read and write reaches the image at once.
bool is_dax(const Daemon& d, const Attr& attr) {
  switch (d.options.dax) {
    case DaxPolicy::always:
      return true;
    case DaxPolicy::never:
      return false;
    case DaxPolicy::inode:
      return attr.flags & FS_XFLAG_DAX;
  }
  return false;
}

void setup_open(fuse_req_t req, const Attr& attr, fuse_file_info* fi) {
  fi->direct_io = is_dax(daemon_of(req), attr) ? 1 : 0;
  fi->keep_cache = 0;
  fi->fh = reinterpret_cast<uint64_t>(new OpenFile());
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  auto attr = vol(req).peek_attr(ino);
  if (!attr) {
    fuse_reply_err(req, attr.status().error());
    return;
  }
  if (S_ISDIR(attr->mode)) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  // As may_open: no writing an immutable file, and an append-only one only with O_APPEND.
  const bool writes = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
  if (writes &&
      ((attr->flags & FS_XFLAG_IMMUTABLE) ||
       ((attr->flags & FS_XFLAG_APPEND) && (!(fi->flags & O_APPEND) || (fi->flags & O_TRUNC))))) {
    fuse_reply_err(req, EPERM);
    return;
  }
  setup_open(req, *attr, fi);
  if (fuse_reply_open(req, fi) != 0) delete open_file(fi);
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
               fuse_file_info* fi) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  auto attr =
      vol(req).mknod(parent, name, S_IFREG | (mode & 07777), 0, ctx->uid, ctx->gid, umask_of(req));
  if (!attr) {
    fuse_reply_err(req, attr.status().error());
    return;
  }
  setup_open(req, *attr, fi);
  reply_entry(req, *attr, fi);
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  // One copy out of the region into this buffer; the reply hands it to the kernel.
  thread_local std::vector<char> buf;
  if (buf.size() < size) buf.resize(size);
  auto n = vol(req).read(ino, uint64_t(off), buf.data(), size);
  if (n) {
    fuse_reply_buf(req, buf.data(), *n);
  } else {
    fuse_reply_err(req, n.status().error());
  }
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char* data, size_t size, off_t off,
              fuse_file_info*) {
  bool owed = false;
  auto n = vol(req).write_unsynced(ino, uint64_t(off), data, size, &owed);
  if (!n) {
    fuse_reply_err(req, n.status().error());
    return;
  }
  kill_privileges(req, ino, false);
  if (!owed) {
    fuse_reply_write(req, *n);
    return;
  }
  // Mounted -o sync, or chattr +S: answered when the commit that makes the write durable has
  // completed, by the thread that ran it. This worker goes back for the next request instead of
  // waiting, so that concurrent writers share commits (fsync's group commit).
  vol(req).fsync(ino, false, [req, written = *n](const Status& s) {
    if (s) {
      fuse_reply_write(req, written);
    } else {
      log_message(LOG_ERR, "sync of a write failed: " + s.to_string());
      fuse_reply_err(req, s.error());
    }
  });
}

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  delete open_file(fi);  // unpins what was mapped through it
  fuse_reply_err(req, 0);
}

// fsync: a journal commit with its device flushes, answered once they completed. With no commit
// running, this worker thread commits itself (no hand-off to the committer and back); otherwise
// the request joins the next commit, which answers every fsync queued meanwhile from its own
// thread, and this worker goes back to the queue instead of sleeping until then. fdatasync of a
// file whose size and blocks are committed makes only its data durable (Volume::fsync).
void reply_fsync(fuse_req_t req, const Status& s) {
  if (!s) log_message(LOG_ERR, "fsync failed: " + s.to_string());
  reply_status(req, s);
}

// Mounted -o sync, every call that changed something was durable when answered, so fsync owes
// nothing: ENOSYS tells the kernel so, and it stops sending FSYNC (FSYNCDIR) on this
// connection, answering fsync itself once it has written back its dirty pages (each such WRITE
// durable when answered). A write + fsync is then one round trip instead of two.
bool fsync_owes_nothing(fuse_req_t req) {
  if (!daemon_of(req).options.volume.sync) return false;
  fuse_reply_err(req, ENOSYS);
  return true;
}

void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  if (fsync_owes_nothing(req)) return;
  vol(req).fsync(ino, datasync != 0, [req](const Status& s) { reply_fsync(req, s); });
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  if (fsync_owes_nothing(req)) return;
  vol(req).fsync(ino, false, [req](const Status& s) { reply_fsync(req, s); });
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  std::vector<char> buf(size);
  size_t used = 0;
  Status s = vol(req).readdir(ino, uint64_t(off), [&](const DirEntry& e) {
    struct stat st {};
    st.st_ino = e.ino;
    st.st_mode = e.type << 12;  // DT_* is the S_IFMT nibble
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, e.name.c_str(), &st,
                                    off_t(e.next_offset));
    if (need > size - used) return false;
    used += need;
    return true;
  });
  if (!s && used == 0) {
    fuse_reply_err(req, s.error());
    return;
  }
  fuse_reply_buf(req, buf.data(), used);
}

// The root directory's user.vpmfs.* attributes are the daemon's status, read-only.
constexpr std::string_view kStatusPrefix = "user.vpmfs.";
constexpr std::string_view kStatusName = "user.vpmfs.status";

bool is_status_name(fuse_ino_t ino, std::string_view name) {
  return ino == FUSE_ROOT_ID && name.substr(0, kStatusPrefix.size()) == kStatusPrefix;
}

// A mean for the status: 0 when nothing was counted.
double per(double total, uint64_t count) {
  return count == 0 ? 0.0 : total / double(count);
}

// The persistence status as `vpmfs-ctl status` shows it (README, "vpmfs-ctl").
std::string status_json(Daemon& d) {
  Region& r = d.volume.region();
  FlushChannel::Stats f = r.flush_channel().stats();
  Volume::Health h = d.volume.health();
  nlohmann::json j;
  j["mode"] = to_string(r.mode());
  j["mode_reason"] = r.mode_reason();
  j["sync_dax"] = d.options.sync_dax_auto || !d.options.volume.mode
                      ? std::string("auto")
                      : std::string(to_string(*d.options.volume.mode));
  j["dax"] = to_string(d.options.dax);
  j["read_only"] = h.read_only;
  j["failed"] = f.failed || !h.error.empty();
  j["last_error"] = !h.error.empty() ? h.error : f.last_error_message;
  j["image"] = d.options.image;
  j["block_size"] = d.volume.block_size();
  j["map_sync"] = r.map_sync();
  j["memory"] = r.memory();
  j["dax_shared_mmap"] = g_allow_mmap.load();  // FUSE_DIRECT_IO_ALLOW_MMAP was agreed
  j["writeback_cache"] = g_writeback_cache.load();
  j["sync"] = d.options.volume.sync;
  j["commits"] = {{"commits", h.commits},
                  {"syncs", h.syncs},
                  {"syncs_per_commit", per(double(h.syncs), h.commits)},
                  {"journal_commits", h.journal_commits},
                  {"commit_us", per(h.commit_ns / 1000.0, h.commits)},
                  {"answer_us", per(h.answer_ns / 1000.0, h.commits)},
                  {"gather_us", per(h.gather_ns / 1000.0, h.commits)}};
  j["flush"] = {{"requests", f.requests},
                {"device_flushes", f.device_flushes},
                {"requests_per_flush", f.requests_per_flush()},
                {"flush_us", per(f.flush_ns / 1000.0, f.device_flushes)},
                {"clean_batches", f.clean_batches},
                {"failed_flushes", f.failed_flushes}};
  j["btt"] = {{"epochs", h.btt_epochs},
              {"sectors_per_epoch", per(double(h.btt_epoch_sectors), h.btt_epochs)}};
  return j.dump();
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                 int flags) {
  if (is_status_name(ino, name)) {
    fuse_reply_err(req, EPERM);
    return;
  }
  Status s = vol(req).setxattr(ino, name, value, size, flags);
  if (s && std::strcmp(name, "system.posix_acl_access") == 0) {
    // Setting an access ACL drops setgid when its setter is neither root nor in the group
    // (posix_acl_update_mode); the kernel leaves that to the server here.
    auto attr = vol(req).peek_attr(ino);
    if (attr && (attr->mode & S_ISGID) && fuse_req_ctx(req)->uid != 0 &&
        !caller_in_group(req, attr->gid)) {
      SetAttr c;
      c.mode = attr->mode & 07777 & ~uint32_t(S_ISGID);
      if (vol(req).setattr(ino, c)) {
        fuse_lowlevel_notify_inval_inode(daemon_of(req).session, ino, -1, 0);
      }
    }
  }
  reply_status(req, s);
}

// getxattr and listxattr: size 0 asks for the size needed.
template <typename Fill>
void reply_sized(fuse_req_t req, size_t size, Fill fill) {
  std::vector<char> buf(size);
  Result<std::size_t> n = fill(size == 0 ? nullptr : buf.data(), size);
  if (!n) {
    fuse_reply_err(req, n.status().error());
  } else if (size == 0) {
    fuse_reply_xattr(req, *n);
  } else {
    fuse_reply_buf(req, buf.data(), *n);
  }
}

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  if (is_status_name(ino, name)) {
    if (name != kStatusName) {
      fuse_reply_err(req, ENODATA);
      return;
    }
    std::string status = status_json(daemon_of(req));
    reply_sized(req, size, [&](char* buf, size_t n) -> Result<std::size_t> {
      if (buf == nullptr) return status.size();
      if (n < status.size()) return Status(ERANGE, "buffer too small");
      std::memcpy(buf, status.data(), status.size());
      return status.size();
    });
    return;
  }
  reply_sized(req, size, [&](char* buf, size_t n) { return vol(req).getxattr(ino, name, buf, n); });
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  reply_sized(req, size, [&](char* buf, size_t n) { return vol(req).listxattr(ino, buf, n); });
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  if (is_status_name(ino, name)) {
    fuse_reply_err(req, EPERM);
    return;
  }
  reply_status(req, vol(req).removexattr(ino, name));
}

// --- ioctls: the DAX flag (FS_IOC_FSGETXATTR and friends) and DAX mappings -------------------

// A successful ioctl still owes the kernel its fuse_ioctl_out, or it sees EIO.
void reply_ioctl_status(fuse_req_t req, const Status& s) {
  if (s) {
    fuse_reply_ioctl(req, 0, nullptr, 0);
  } else {
    fuse_reply_err(req, s.error());
  }
}

void reply_ioctl_value(fuse_req_t req, const void* value, size_t size, size_t out_size) {
  if (out_size < size) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  fuse_reply_ioctl(req, 0, value, size);
}

void ioctl_dax_map(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi, const void* in_buf,
                   size_t in_size, size_t out_size) {
  OpenFile* of = open_file(fi);
  if (of == nullptr) {
    fuse_reply_err(req, EBADF);
    return;
  }
  if (in_size < sizeof(DaxMapRequest) || out_size < sizeof(DaxMapRequest)) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  Daemon& d = daemon_of(req);
  auto r = std::make_unique<DaxMapRequest>();
  std::memcpy(r.get(), in_buf, sizeof *r);
  // Pieces of the image are mapped by the client a page at a time at least.
  if (d.volume.block_size() % 4096 != 0 || r->offset % 4096 != 0 || r->length % 4096 != 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  std::lock_guard lock(of->mu);
  auto& slot = of->mappings[{r->offset, r->length}];
  if (!slot) {
    auto m = d.volume.map(ino, r->offset, r->length, r->flags & kDaxMapSync);
    if (!m) {
      of->mappings.erase({r->offset, r->length});
      log_message(LOG_INFO, "DAX mapping refused: " + m.status().to_string());
      fuse_reply_err(req, m.status().error());
      return;
    }
    slot = std::move(m.value());
  }
  const auto& extents = slot->extents();
  r->total = uint32_t(extents.size());
  r->count = 0;
  for (uint32_t i = r->first; i < extents.size() && r->count < kDaxMaxExtents; ++i) {
    r->extent[r->count++] = {extents[i].file_offset, extents[i].image_offset, extents[i].length};
  }
  std::snprintf(r->image, sizeof r->image, "%s", d.volume.region().path().c_str());
  fuse_reply_ioctl(req, 0, r.get(), sizeof *r);
}

void ioctl_dax_unmap(fuse_req_t req, fuse_file_info* fi, const void* in_buf, size_t in_size) {
  OpenFile* of = open_file(fi);
  if (of == nullptr || in_size < sizeof(DaxUnmapRequest)) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  DaxUnmapRequest r;
  std::memcpy(&r, in_buf, sizeof r);
  std::lock_guard lock(of->mu);
  bool found = of->mappings.erase({r.offset, r.length}) != 0;
  reply_ioctl_status(req, found ? Status() : Status(EINVAL, "no such mapping"));
}

// chattr's flags (FS_IOC_GETFLAGS) and the FS_XFLAG_* bits they stand for.
constexpr std::pair<unsigned, uint32_t> kFlagPairs[] = {
    {FS_DAX_FL, FS_XFLAG_DAX},         {FS_IMMUTABLE_FL, FS_XFLAG_IMMUTABLE},
    {FS_APPEND_FL, FS_XFLAG_APPEND},   {FS_SYNC_FL, FS_XFLAG_SYNC},
    {FS_NOATIME_FL, FS_XFLAG_NOATIME}, {FS_NODUMP_FL, FS_XFLAG_NODUMP},
};

// As fileattr_set checks: the owner (or root) sets flags; immutable and append-only, set or
// cleared, need CAP_LINUX_IMMUTABLE, which FUSE does not pass on: root stands for it.
Status set_xflags(fuse_req_t req, fuse_ino_t ino, uint32_t xflags) {
  Volume& v = vol(req);
  auto attr = v.peek_attr(ino);
  if (!attr) return attr.status();
  const fuse_ctx* ctx = fuse_req_ctx(req);
  if (ctx->uid != 0 && ctx->uid != attr->uid) return Status(EPERM, "not the file's owner");
  constexpr uint32_t kGuarded = FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND;
  if (ctx->uid != 0 && ((attr->flags ^ xflags) & kGuarded)) {
    return Status(EPERM, "immutable and append-only need CAP_LINUX_IMMUTABLE");
  }
  auto changed = v.set_xflags(ino, xflags);
  if (!changed) return changed.status();
  // The kernel keeps the attributes it last saw, ctime included: it must ask again.
  fuse_lowlevel_notify_inval_inode(daemon_of(req).session, ino, -1, 0);
  return Status::ok();
}

void op_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void*, fuse_file_info* fi,
              unsigned flags, const void* in_buf, size_t in_size, size_t out_size) {
  if (flags & FUSE_IOCTL_COMPAT) {
    fuse_reply_err(req, ENOSYS);
    return;
  }
  Volume& v = vol(req);
  switch (cmd) {
    case FS_IOC_FSGETXATTR: {
      auto attr = v.peek_attr(ino);
      if (!attr) return reply_status(req, attr.status());
      struct fsxattr fa {};
      fa.fsx_xflags = attr->flags;
      return reply_ioctl_value(req, &fa, sizeof fa, out_size);
    }
    case FS_IOC_FSSETXATTR: {
      struct fsxattr fa {};
      if (in_size < sizeof fa) return reply_status(req, Status(EINVAL, "short fsxattr"));
      std::memcpy(&fa, in_buf, sizeof fa);
      if (fa.fsx_extsize != 0 || fa.fsx_projid != 0 || fa.fsx_cowextsize != 0) {
        return reply_status(req, Status(EOPNOTSUPP, "extent sizes and projects"));
      }
      return reply_ioctl_status(req, set_xflags(req, ino, fa.fsx_xflags));
    }
    case FS_IOC_GETFLAGS: {
      auto attr = v.peek_attr(ino);
      if (!attr) return reply_status(req, attr.status());
      unsigned int fl = 0;
      for (const auto& [flag, xflag] : kFlagPairs) {
        if (attr->flags & xflag) fl |= flag;
      }
      return reply_ioctl_value(req, &fl, sizeof fl, out_size);
    }
    case FS_IOC_SETFLAGS: {
      unsigned int fl = 0;
      if (in_size < sizeof fl) return reply_status(req, Status(EINVAL, "short flags"));
      std::memcpy(&fl, in_buf, sizeof fl);
      uint32_t xflags = 0;
      for (const auto& [flag, xflag] : kFlagPairs) {
        if (fl & flag) xflags |= xflag;
        fl &= ~flag;
      }
      if (fl != 0) {
        return reply_status(req, Status(EOPNOTSUPP, "flags vpmfs does not have"));
      }
      return reply_ioctl_status(req, set_xflags(req, ino, xflags));
    }
    case FITRIM: {
      // fstrim(8): the free space goes back to the image file's filesystem. As on ext4 and xfs,
      // for the administrator only (FUSE passes no capabilities: root stands for them).
      if (fuse_req_ctx(req)->uid != 0) return reply_status(req, Status(EPERM, "root only"));
      struct fstrim_range range {};
      if (in_size < sizeof range) return reply_status(req, Status(EINVAL, "short fstrim_range"));
      std::memcpy(&range, in_buf, sizeof range);
      auto bytes = v.discard_free(range.start, range.len, range.minlen);
      if (!bytes) return reply_status(req, bytes.status());
      range.len = *bytes;
      return reply_ioctl_value(req, &range, sizeof range, out_size);
    }
    case VPMFS_IOC_DAX_MAP:
      return ioctl_dax_map(req, ino, fi, in_buf, in_size, out_size);
    case VPMFS_IOC_DAX_UNMAP:
      return ioctl_dax_unmap(req, fi, in_buf, in_size);
    default:
      fuse_reply_err(req, ENOTTY);
  }
}

void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                  fuse_file_info*) {
  if (offset < 0 || length <= 0) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  Status s = vol(req).fallocate(ino, mode, uint64_t(offset), uint64_t(length));
  if (s) kill_privileges(req, ino, false);
  reply_status(req, s);
}

// The kernel handles SEEK_SET, SEEK_CUR and SEEK_END; only SEEK_DATA and SEEK_HOLE come here.
void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info*) {
  if (off < 0) {
    fuse_reply_err(req, ENXIO);
    return;
  }
  auto pos = vol(req).seek_data(ino, uint64_t(off), whence);
  if (pos) {
    fuse_reply_lseek(req, off_t(*pos));
  } else {
    fuse_reply_err(req, pos.status().error());
  }
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs st = vol(req).statfs();
  fuse_reply_statfs(req, &st);
}

const fuse_lowlevel_ops kOps = [] {
  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.lookup = op_lookup;
  ops.forget = op_forget;
  ops.forget_multi = op_forget_multi;
  ops.getattr = op_getattr;
  ops.setattr = op_setattr;
  ops.readlink = op_readlink;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.symlink = op_symlink;
  ops.link = op_link;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.rename = op_rename;
  ops.open = op_open;
  ops.create = op_create;
  ops.read = op_read;
  ops.write = op_write;
  // No flush: vpmfs has nothing to do at close(2) (writes are in the image when they return,
  // and locks are the kernel's). libfuse answers the first FLUSH with ENOSYS and the kernel sends
  // no more, a round trip less per close; with writeback_cache it still writes the file's dirty
  // pages back at each close and returns their errors from close(2).
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.fsyncdir = op_fsyncdir;
  ops.readdir = op_readdir;
  ops.statfs = op_statfs;
  ops.setxattr = op_setxattr;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  ops.removexattr = op_removexattr;
  ops.fallocate = op_fallocate;
  ops.lseek = op_lseek;
  ops.ioctl = op_ioctl;
  return ops;
}();

// --- INIT flags libfuse 3.14 cannot ask for ------------------------------------------------
// libfuse 3.14 (Debian 12) negotiates only the flags it knows. vpmfs reads and writes /dev/fuse
// through libfuse's custom-I/O hooks and adds two to its INIT reply when the kernel offers them:
//  - FUSE_DIRECT_IO_ALLOW_MMAP (kernel 6.6 on): a direct-I/O (DAX) file may be mapped shared;
//    without it, mmap(MAP_SHARED) of a DAX file gives ENODEV.
//  - FUSE_HANDLE_KILLPRIV_V2: the kernel marks the superblock SB_NOSEC, so a write to a file
//    with no setuid/setgid bit and no security.capability skips file_remove_privs' GETXATTR
//    round trip, which otherwise doubles the requests of every write. vpmfs clears setuid and
//    setgid itself (kill_privileges), as it does under FUSE_HANDLE_KILLPRIV; the kernel still
//    removes security.capability, and forgets the SB_NOSEC shortcut whenever it refreshes an
//    inode's attributes or a security.* attribute is set.
constexpr uint32_t kOpInit = 26;                   // FUSE_INIT
constexpr uint32_t kKillPrivV2 = 1u << 28;         // FUSE_HANDLE_KILLPRIV_V2
constexpr uint32_t kInitExt = 1u << 30;            // FUSE_INIT_EXT: flags2 is valid
constexpr uint32_t kAllowMmap2 = 1u << (36 - 32);  // FUSE_DIRECT_IO_ALLOW_MMAP, in flags2
std::atomic<uint64_t> g_init_unique{0};    // the INIT request, once its reply may be patched
std::atomic<uint32_t> g_init_offered{0};   // its flags
std::atomic<uint32_t> g_init_offered2{0};  // and flags2 (valid with FUSE_INIT_EXT)

// Requests that libfuse 3.14 has no operation for and would refuse with ENOSYS, answered here
// from the /dev/fuse read hook: FUSE_TMPFILE (open(O_TMPFILE), Linux 6.1 on) and FUSE_STATX
// (statx(2) asking for more than the basic fields, Linux 6.6 on: the birth time).
constexpr uint32_t kOpStatx = 52;  // FUSE_STATX; Debian 12's <linux/fuse.h> predates it
struct StatxTime {
  int64_t sec;
  uint32_t nsec;
  int32_t reserved;
};
struct StatxIn {  // fuse_statx_in
  uint32_t getattr_flags, reserved;
  uint64_t fh;
  uint32_t sx_flags, sx_mask;
};
struct StatxOut {  // fuse_statx_out, its struct fuse_statx laid out as struct statx
  uint64_t attr_valid;
  uint32_t attr_valid_nsec, flags;
  uint64_t spare[2];
  uint32_t mask, blksize;
  uint64_t attributes;
  uint32_t nlink, uid, gid;
  uint16_t mode, spare0;
  uint64_t ino, size, blocks, attributes_mask;
  StatxTime atime, btime, ctime, mtime;
  uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
  uint64_t spare2[14];
};
static_assert(sizeof(StatxOut) == 32 + 256);

// False if the reply did not reach the kernel: the caller was interrupted and is gone.
bool reply_raw(int fd, uint64_t unique, int error, const iovec* body, int count) {
  fuse_out_header out{};
  out.unique = unique;
  out.error = -error;
  out.len = sizeof out;
  iovec iov[4] = {{&out, sizeof out}};
  for (int i = 0; i < count; ++i) {
    iov[i + 1] = body[i];
    out.len += uint32_t(body[i].iov_len);
  }
  return ::writev(fd, iov, count + 1) == ssize_t(out.len);
}

void serve_tmpfile(int fd, Daemon& d, const fuse_in_header& in, const std::byte* arg) {
  fuse_create_in create;
  std::memcpy(&create, arg, sizeof create);
  uint32_t umask = d.dont_mask ? create.umask : 0;
  auto attr = d.volume.tmpfile(in.nodeid, create.mode, in.uid, in.gid, umask);
  if (!attr) {
    reply_raw(fd, in.unique, attr.status().error(), nullptr, 0);
    return;
  }
  struct stat st = attr->to_stat(d.volume.block_size());
  fuse_entry_out entry{};
  entry.nodeid = attr->ino;
  entry.generation = attr->generation;
  entry.entry_valid = entry.attr_valid = uint64_t(kTimeout);
  entry.attr.ino = st.st_ino;
  entry.attr.size = uint64_t(st.st_size);
  entry.attr.blocks = uint64_t(st.st_blocks);
  entry.attr.atime = uint64_t(st.st_atim.tv_sec);
  entry.attr.mtime = uint64_t(st.st_mtim.tv_sec);
  entry.attr.ctime = uint64_t(st.st_ctim.tv_sec);
  entry.attr.atimensec = uint32_t(st.st_atim.tv_nsec);
  entry.attr.mtimensec = uint32_t(st.st_mtim.tv_nsec);
  entry.attr.ctimensec = uint32_t(st.st_ctim.tv_nsec);
  entry.attr.mode = st.st_mode;
  entry.attr.nlink = uint32_t(st.st_nlink);
  entry.attr.uid = st.st_uid;
  entry.attr.gid = st.st_gid;
  entry.attr.blksize = uint32_t(st.st_blksize);
  auto* file = new OpenFile();
  fuse_open_out open{};
  open.fh = reinterpret_cast<uint64_t>(file);
  if (is_dax(d, *attr)) open.open_flags |= FOPEN_DIRECT_IO;
  // The kernel's lookup reference, as reply_entry gives it; taken back if the reply fails (the
  // caller was interrupted), which frees the file.
  d.volume.hold(attr->ino, 1);
  iovec body[2] = {{&entry, sizeof entry}, {&open, sizeof open}};
  if (!reply_raw(fd, in.unique, 0, body, 2)) {
    delete file;
    d.volume.forget(attr->ino, 1);
  }
}

void serve_statx(int fd, Daemon& d, const fuse_in_header& in) {
  auto attr = d.volume.getattr(in.nodeid);
  if (!attr) {
    reply_raw(fd, in.unique, attr.status().error(), nullptr, 0);
    return;
  }
  struct stat st = attr->to_stat(d.volume.block_size());
  StatxOut out{};
  out.attr_valid = uint64_t(kTimeout);
  out.mask = STATX_BASIC_STATS | STATX_BTIME;
  out.blksize = uint32_t(st.st_blksize);
  out.nlink = uint32_t(st.st_nlink);
  out.uid = st.st_uid;
  out.gid = st.st_gid;
  out.mode = uint16_t(st.st_mode);
  out.ino = st.st_ino;
  out.size = uint64_t(st.st_size);
  out.blocks = uint64_t(st.st_blocks);
  auto time = [](const timespec& t) { return StatxTime{t.tv_sec, uint32_t(t.tv_nsec), 0}; };
  out.atime = time(st.st_atim);
  out.mtime = time(st.st_mtim);
  out.ctime = time(st.st_ctim);
  out.btime = time(attr->btime);
  out.rdev_major = major(st.st_rdev);
  out.rdev_minor = minor(st.st_rdev);
  // (The kernel keeps stx_attributes to itself: what it would take from here, Linux 6.18 drops.)
  iovec body{&out, sizeof out};
  reply_raw(fd, in.unique, 0, &body, 1);
}

// Returns false when the request is one for libfuse.
bool serve_here(int fd, Daemon& d, const std::byte* p, ssize_t n) {
  uint32_t opcode;
  if (n < ssize_t(sizeof(fuse_in_header))) return false;
  std::memcpy(&opcode, p + offsetof(fuse_in_header, opcode), sizeof opcode);
  if (opcode != FUSE_TMPFILE && opcode != kOpStatx) return false;
  fuse_in_header in;
  std::memcpy(&in, p, sizeof in);
  const std::byte* arg = p + sizeof in;
  if (opcode == FUSE_TMPFILE && n >= ssize_t(sizeof in + sizeof(fuse_create_in))) {
    serve_tmpfile(fd, d, in, arg);
  } else if (opcode == kOpStatx && n >= ssize_t(sizeof in + sizeof(StatxIn))) {
    serve_statx(fd, d, in);
  } else {
    reply_raw(fd, in.unique, EINVAL, nullptr, 0);
  }
  return true;
}

ssize_t fuse_dev_read(int fd, void* buf, size_t len, void* userdata) {
  ssize_t n = ::read(fd, buf, len);
  while (n > 0 &&
         serve_here(fd, *static_cast<Daemon*>(userdata), static_cast<const std::byte*>(buf), n)) {
    n = ::read(fd, buf, len);
  }
  // fuse_in_header (len, opcode, unique, ...) then fuse_init_in (major, minor, max_readahead,
  // flags, flags2, ...).
  if (n >= 40 + 20) {
    const auto* p = static_cast<const std::byte*>(buf);
    uint32_t opcode, flags, flags2;
    std::memcpy(&opcode, p + 4, 4);
    std::memcpy(&flags, p + 40 + 12, 4);
    std::memcpy(&flags2, p + 40 + 16, 4);
    if (opcode == kOpInit) {
      uint64_t unique;
      std::memcpy(&unique, p + 8, 8);
      g_init_offered = flags;
      g_init_offered2 = (flags & kInitExt) ? flags2 : 0;
      g_init_unique = unique;
    }
  }
  return n;
}

ssize_t fuse_dev_writev(int fd, iovec* iov, int count, void*) {
  // fuse_out_header (len, error, unique), then fuse_init_out: flags at 12, flags2 at 32.
  uint64_t init = g_init_unique.load();
  if (init != 0 && count >= 2 && iov[0].iov_len >= 16 && iov[1].iov_len >= 36) {
    uint64_t unique;
    int32_t error;
    std::memcpy(&error, static_cast<std::byte*>(iov[0].iov_base) + 4, 4);
    std::memcpy(&unique, static_cast<std::byte*>(iov[0].iov_base) + 8, 8);
    if (unique == init && error == 0) {
      auto* out = static_cast<std::byte*>(iov[1].iov_base);
      uint32_t flags, flags2;
      std::memcpy(&flags, out + 12, 4);
      std::memcpy(&flags2, out + 32, 4);
      flags |= g_init_offered & kKillPrivV2;
      if (g_init_offered2 & kAllowMmap2) {
        flags |= kInitExt;
        flags2 |= kAllowMmap2;
        g_allow_mmap = true;
      }
      std::memcpy(out + 12, &flags, 4);
      std::memcpy(out + 32, &flags2, 4);
      g_init_unique = 0;
    }
  }
  return ::writev(fd, iov, count);
}

// libfuse's own messages go where vpmfs's go.
void fuse_log_sink(enum fuse_log_level level, const char* fmt, va_list ap) {
  char line[1024];
  std::vsnprintf(line, sizeof line, fmt, ap);
  std::size_t n = std::strlen(line);
  while (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
  log_message(int(level), line);
}

}  // namespace

void log_to_stderr(bool on) {
  g_stderr = on;
}

void log_message(int priority, const std::string& message) {
  static std::once_flag opened;
  std::call_once(opened, [] { openlog("vpmfs", LOG_PID, LOG_DAEMON); });
  syslog(priority, "%s", message.c_str());
  if (g_stderr) std::fprintf(stderr, "vpmfs: %s\n", message.c_str());
}

Status serve(Volume& volume, const DaemonOptions& options, const std::function<void()>& mounted) {
  fuse_set_log_func(fuse_log_sink);
  std::string mount_opts = fuse_mount_options(options);
  std::vector<std::string> argv_s = {"vpmfs", "-o", mount_opts};
  if (options.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(int(argv.size()), argv.data());
  // libfuse may copy the arguments while parsing them; the copy is ours to free.
  auto free_args = std::unique_ptr<fuse_args, void (*)(fuse_args*)>(&args, fuse_opt_free_args);

  Daemon daemon{volume, options};
  fuse_session* se = fuse_session_new(&args, &kOps, sizeof kOps, &daemon);
  if (se == nullptr) return Status(EINVAL, "libfuse refused the session options: " + mount_opts);
  auto destroy = std::unique_ptr<fuse_session, void (*)(fuse_session*)>(se, fuse_session_destroy);
  daemon.session = se;
  if (fuse_set_signal_handlers(se) != 0) return Status(EIO, "cannot install signal handlers");
  if (fuse_session_mount(se, options.mountpoint.c_str()) != 0) {
    fuse_remove_signal_handlers(se);
    return Status(EIO, "cannot mount on " + options.mountpoint +
                           " (is it an existing directory, and is /dev/fuse available?)");
  }
  fuse_custom_io io{};
  io.read = fuse_dev_read;
  io.writev = fuse_dev_writev;
  if (fuse_session_custom_io(se, &io, fuse_session_fd(se)) != 0) {
    log_message(LOG_WARNING, "cannot hook /dev/fuse: shared mmap of DAX files is unavailable");
  }
  mounted();

  fuse_loop_config* config = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(config, options.max_threads);
  // Idle workers stay: with fewer allowed idle than max_threads, libfuse 3.14 ended and started
  // about 1,400 threads a second under two fio writers (perf, task:task_newtask).
  fuse_loop_cfg_set_idle_threads(config, options.max_threads);
  int rc = fuse_session_loop_mt(se, config);
  fuse_loop_cfg_destroy(config);
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  if (rc < 0) return Status(-rc, "the FUSE session loop failed");
  return Status::ok();
}

}  // namespace vpmfs
