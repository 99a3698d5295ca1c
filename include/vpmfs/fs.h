// The vpmfs filesystem library: a POSIX filesystem on the BTT's sector-atomic LBA space of an
// image (docs/FORMAT.md). The FUSE front end (fs/fuse) is a thin layer over this API; tests and
// embedders use it directly.
//
// Inode numbers are stable: the root is kRootIno. Every call returns a Status carrying an errno
// value the FUSE layer can send back as is. Calls are thread-safe.
#pragma once

#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

inline constexpr uint64_t kRootIno = 1;

// BTT lanes (free blocks per arena) for an image of this size: one per 512 KiB, a power of two
// from 256 to 4096. In writeback mode a flush is due each time every lane holds a write, so more
// lanes mean fewer flushes for writes without fsync; they cost 1/128 of the space.
uint32_t default_lanes(uint64_t image_size);

struct MkfsOptions {
  uint64_t size = 0;            // create (sparse) or grow an image file to this size; 0: as is
  uint32_t sector_size = 4096;  // BTT sector = filesystem block: 512 or 4096
  uint32_t lanes = 0;           // BTT nfree per arena; 0: default_lanes(image size)
  std::string label;
  std::optional<std::array<uint8_t, 16>> uuid;
  uint64_t inode_ratio = 16384;   // one inode per this many bytes
  bool force_persistent = false;  // region option, for tests on tmpfs
  std::function<void(const std::string& stage, uint64_t done, uint64_t total)> progress;
};

struct MountOptions {
  std::optional<PersistMode> mode;  // sync_dax; empty: detect
  bool force_persistent = false;
  bool read_only = false;
  // Background commit interval: metadata and data written without fsync become durable at
  // most this long after they were written (the commit= mount option).
  uint32_t commit_interval_ms = 5000;
  // Every call that changes the volume is durable when it returns, as if every inode had
  // chattr +S (the sync mount option). Costs a commit per call; fsync then owes nothing.
  bool sync = false;
  // Calls that change a directory (create, mkdir, mknod, symlink, link, rename, unlink, rmdir;
  // also its attributes) are durable when they return (the dirsync mount option).
  bool dirsync = false;
  // Wait this long for the image lock (RegionOptions::lock_wait_ms).
  uint32_t lock_wait_ms = 0;
  // Lock an image on tmpfs in memory as its pages are touched (RegionOptions::lock_memory; the
  // mlock and nomlock mount options).
  bool lock_memory = true;
  // Access times: updated on read and readdir when older than the modification or change time
  // or a day old (relatime, the default), never (noatime), or always (strictatime).
  enum class Atime { relatime, noatime, strictatime } atime = Atime::relatime;
  // Called once, from whichever thread saw it, when a failed commit or device flush turns the
  // volume read-only; the message says why.
  std::function<void(const std::string&)> on_error;
  // The boot this mount runs in (default: the kernel's boot_id). Checkpoints a killed daemon
  // left in the kill log are replayed only on the boot that wrote them; crash tests set another
  // boot to model a power failure.
  std::optional<std::array<uint8_t, 16>> boot_id;
  // Test hook: commit once a transaction holds this many blocks (0: half the journal), so that
  // tests can crash large operations between their transactions.
  uint64_t max_transaction_blocks = 0;
  // Metadata blocks (inodes, directories, bitmaps, pointer blocks) kept in memory; clean ones
  // beyond this are dropped after a commit and read again when needed.
  // 4096 blocks of 4 KiB: 16 MiB, the larger part of the daemon's memory with a million
  // files; a block dropped is read again from the mapped image, a copy of 4 KiB.
  uint64_t cache_blocks = 4096;
  // Called with the region as soon as it is mapped, before the volume reads or writes it: where
  // a crash recorder attaches to see every store of the mount (the daemon's -o record=PATH).
  std::function<void(Region&)> on_region;
};

struct Attr {
  uint64_t ino = 0;
  uint32_t mode = 0;
  uint32_t nlink = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t rdev = 0;
  uint64_t size = 0;
  uint64_t blocks = 0;  // 512-byte units, as st_blocks
  timespec atime{}, mtime{}, ctime{}, btime{};
  uint32_t flags = 0;  // FS_XFLAG_* (FS_XFLAG_DAX)
  uint32_t generation = 0;
  struct stat to_stat(uint32_t block_size) const;
};

// What setattr changes; unset fields stay.
// The FS_XFLAG_* bits set_xflags takes: IMMUTABLE, APPEND, SYNC, NOATIME, NODUMP, DAX.
inline constexpr uint32_t kSettableXflags = 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x8000;

struct SetAttr {
  std::optional<uint32_t> mode;
  std::optional<uint32_t> uid;
  std::optional<uint32_t> gid;
  std::optional<uint64_t> size;
  std::optional<timespec> atime;  // UTIME_NOW resolved by the caller
  std::optional<timespec> mtime;
  // The times are the current time (utimes(NULL), UTIME_NOW), not times given: allowed on an
  // append-only file, as on Linux.
  bool times_now = false;
};

// Part of a file mapped for direct loads and stores (Volume::map): file bytes
// [file_offset, file_offset + length) live at image_offset in the image, which this process
// sees at address.
struct DaxExtent {
  uint64_t file_offset = 0;
  uint64_t image_offset = 0;
  uint64_t length = 0;
  std::byte* address = nullptr;
};

// A mapped file range. Its blocks stay where they are (pinned in the BTT: writes through the
// volume land in place) until the mapping is destroyed.
class DaxMapping {
 public:
  virtual ~DaxMapping() = default;
  virtual const std::vector<DaxExtent>& extents() const = 0;
  // Made with the synchronous flag (MAP_SYNC): no msync is needed, a cache flush of a store
  // (persist_range) makes it durable.
  virtual bool synchronous() const = 0;
  // msync: stores made through the extents so far become durable, with the file's metadata;
  // done runs on the flush channel's thread.
  virtual void sync(std::function<void(const Status&)> done) = 0;
  Status sync_wait();
};

struct DirEntry {
  std::string name;
  uint64_t ino;
  uint32_t type;         // DT_* value
  uint64_t next_offset;  // readdir cookie to continue after this entry
};

class Volume {
 public:
  static Status mkfs(const std::string& image, const MkfsOptions& options);
  static Result<std::unique_ptr<Volume>> mount(const std::string& image,
                                               const MountOptions& options);
  virtual ~Volume() = default;

  virtual uint32_t block_size() const = 0;
  virtual PersistMode mode() const = 0;
  virtual Region& region() = 0;

  virtual Result<Attr> getattr(uint64_t ino) = 0;
  // getattr for a front end's own checks, not reported to anyone: unlike getattr (and every call
  // that returns an Attr) it does not make the next write stamp a fine-grained time (see write).
  virtual Result<Attr> peek_attr(uint64_t ino) = 0;
  virtual Result<Attr> lookup(uint64_t parent, std::string_view name) = 0;
  // Creates a regular file, fifo, socket or device node (by the type bits of mode).
  //
  // mknod and mkdir take the mode as the application asked for it and the creator's umask:
  // when the parent directory has a default ACL (system.posix_acl_default) the new node
  // inherits it as POSIX.1e says and the umask is not used; otherwise mode &= ~umask.
  virtual Result<Attr> mknod(uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                             uint32_t uid, uint32_t gid, uint32_t umask = 0) = 0;
  virtual Result<Attr> mkdir(uint64_t parent, std::string_view name, uint32_t mode, uint32_t uid,
                             uint32_t gid, uint32_t umask = 0) = 0;
  // An unnamed regular file (open(O_TMPFILE)) that takes parent's group, ACL and DAX flag as
  // mknod's would: nlink 0 and on the orphan chain, so that the next mount frees it, until link
  // gives it a name. Hold it (hold) before it is handed out: forget frees it like any unlinked
  // file once its last reference goes.
  virtual Result<Attr> tmpfile(uint64_t parent, uint32_t mode, uint32_t uid, uint32_t gid,
                               uint32_t umask = 0) = 0;
  virtual Result<Attr> symlink(uint64_t parent, std::string_view name, std::string_view target,
                               uint32_t uid, uint32_t gid) = 0;
  virtual Result<std::string> readlink(uint64_t ino) = 0;
  virtual Result<Attr> link(uint64_t ino, uint64_t parent, std::string_view name) = 0;
  virtual Status unlink(uint64_t parent, std::string_view name) = 0;
  virtual Status rmdir(uint64_t parent, std::string_view name) = 0;
  // flags: 0, RENAME_NOREPLACE, RENAME_EXCHANGE or RENAME_WHITEOUT (which may come with
  // RENAME_NOREPLACE); uid and gid own the whiteout left under the old name.
  virtual Status rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                        std::string_view new_name, uint32_t flags, uint32_t uid = 0,
                        uint32_t gid = 0) = 0;
  virtual Result<Attr> setattr(uint64_t ino, const SetAttr& change) = 0;

  virtual Result<std::size_t> read(uint64_t ino, uint64_t offset, void* buf, std::size_t len) = 0;
  // Sets mtime and ctime as Linux's multigrain timestamps do: to the clock's tick
  // (CLOCK_REALTIME_COARSE, a few ms), or to the fine clock when the times were reported since
  // the last write, so that whoever looked sees them change. Writes within one tick that neither
  // grow the file nor allocate change no metadata.
  virtual Result<std::size_t> write(uint64_t ino, uint64_t offset, const void* buf,
                                    std::size_t len) = 0;
  // write without the sync that a volume mounted -o sync, or a file with chattr +S, owes: *owed
  // says whether it owes one, and then the write is done only once fsync(ino, false) answered
  // (its failure is the write's). For callers that answer from the commit's completion instead
  // of waiting for it (the FUSE daemon).
  virtual Result<std::size_t> write_unsynced(uint64_t ino, uint64_t offset, const void* buf,
                                             std::size_t len, bool* owed) = 0;
  // Calls emit for entries after `offset` (0: from the start, including "." and "..") until it
  // returns false. Offsets stay valid while entries are created and removed.
  virtual Status readdir(uint64_t ino, uint64_t offset,
                         const std::function<bool(const DirEntry&)>& emit) = 0;

  // Extended attributes, named with their namespace: "user.", "trusted.", "security." and
  // "system.posix_acl_access" / "system.posix_acl_default" (the kernel's xattr form of an ACL;
  // setting an access ACL keeps the mode's permission bits in step, and chmod updates the ACL).
  // getxattr and listxattr with size 0 return the size needed; a smaller buffer gives ERANGE.
  // A missing attribute gives ENODATA. flags: 0, XATTR_CREATE or XATTR_REPLACE.
  virtual Result<std::size_t> getxattr(uint64_t ino, std::string_view name, void* buf,
                                       std::size_t size) = 0;
  virtual Status setxattr(uint64_t ino, std::string_view name, const void* value, std::size_t size,
                          int flags) = 0;
  // NUL-terminated names back to back, as listxattr(2).
  virtual Result<std::size_t> listxattr(uint64_t ino, char* buf, std::size_t size) = 0;
  virtual Status removexattr(uint64_t ino, std::string_view name) = 0;
  // fallocate(2) modes 0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE and
  // FALLOC_FL_ZERO_RANGE (with or without KEEP_SIZE); others give EOPNOTSUPP.
  virtual Status fallocate(uint64_t ino, int mode, uint64_t offset, uint64_t length) = 0;
  // FITRIM: every free block in [start, start + length) bytes of the volume, in runs of at
  // least min_length bytes, is trimmed and its storage handed back to the image file's
  // filesystem (Btt::discard). Returns the bytes so discarded. EINVAL when start is past the
  // end or length is shorter than a block. Blocks freed in the running transaction are left
  // alone: a crash before its commit brings their old owner back.
  virtual Result<uint64_t> discard_free(uint64_t start, uint64_t length, uint64_t min_length) = 0;
  // lseek(2) with SEEK_DATA or SEEK_HOLE: ENXIO at or past the end of the file.
  virtual Result<uint64_t> seek_data(uint64_t ino, uint64_t offset, int whence) = 0;

  // References held by a front end (the kernel's lookup count): an inode unlinked while held
  // keeps its data until the last reference is forgotten. Library calls take none themselves.
  virtual void hold(uint64_t ino, uint64_t count) = 0;
  virtual void forget(uint64_t ino, uint64_t count) = 0;
  // Makes everything written to the volume so far durable; done runs when it is (on the flush
  // channel's thread, never the caller's).
  virtual void sync(std::function<void(const Status&)> done) = 0;
  // Blocking; with no commit running, the commit runs in the caller's thread.
  virtual Status sync_wait() = 0;
  // fsync(2) and fdatasync(2) of one file: with datasync, when no change to the file's size or
  // blocks waits for a commit, only its data is made durable (the BTT's epoch: two device
  // flushes, no journal commit); otherwise as sync_wait().
  virtual Status fsync(uint64_t ino, bool datasync) = 0;
  // The same without waiting for another thread: when no commit is running the caller commits
  // and done runs before this returns; otherwise done runs in the thread of the commit that
  // covers the call. A front end answers its fsync request from done and goes on meanwhile.
  virtual void fsync(uint64_t ino, bool datasync, std::function<void(const Status&)> done) = 0;
  virtual struct statvfs statfs() = 0;

  // Maps [offset, offset + length) of a regular file for direct loads and stores, as mmap of a
  // DAX file does: holes get zeroed blocks (the size stays), and the blocks are pinned until
  // the mapping goes. Offset and length are multiples of the block size and lie within the
  // file's size rounded up to a block (else EINVAL). While any part of a file is mapped,
  // cutting or punching it gives EBUSY; an unlinked file lives until its mappings go.
  //
  // synchronous is MAP_SYNC: the blocks and the metadata naming them are durable before this
  // returns, so a store made durable by a cache flush is durable for good. Only a direct region
  // can promise that: on writeback and unsafe regions it fails with EOPNOTSUPP. Without it,
  // any region: DaxMapping::sync is the msync.
  virtual Result<std::unique_ptr<DaxMapping>> map(uint64_t ino, uint64_t offset, uint64_t length,
                                                  bool synchronous) = 0;
  // FS_IOC_FSSETXATTR: the inode's FS_XFLAG_* flags, those of kSettableXflags (other bits:
  // EOPNOTSUPP); new files and directories inherit DAX from their directory. The volume
  // enforces immutable and append-only in every call (EPERM), makes every change to a SYNC
  // inode (or in a SYNC directory) durable before the call returns, and leaves the atime of a
  // NOATIME inode alone; NODUMP is only kept. Who may set them (the owner; CAP_LINUX_IMMUTABLE
  // for immutable and append-only) is the caller's to check.
  virtual Result<Attr> set_xflags(uint64_t ino, uint32_t xflags) = 0;
  // Whether the volume still takes changes, and if not, why.
  struct Health {
    bool read_only = false;          // mounted read-only, or turned read-only by an error
    std::string error;               // the error that turned it read-only; empty if none
    uint64_t commits = 0;            // journal commits run (periodic ones and those sync asked for)
    uint64_t syncs = 0;              // sync requests (fsync, fsyncdir, sync_wait) they answered
    uint64_t journal_commits = 0;    // commits that wrote the journal (the rest only flushed data)
    uint64_t commit_ns = 0;          // time commits took: snapshot to their last flush's answer
    uint64_t answer_ns = 0;          // time spent answering the requests each commit served
    uint64_t gather_ns = 0;          // time spent waiting for those requesters to come back
    uint64_t btt_epochs = 0;         // BTT epochs committed (writeback: flog + map updates)
    uint64_t btt_epoch_sectors = 0;  // sector updates those epochs committed
  };
  virtual Health health() = 0;
};

}  // namespace vpmfs
