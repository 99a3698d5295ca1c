// VolumeImpl: the filesystem behind include/vpmfs/fs.h. Internal to fs/.
#pragma once

#include <time.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "format.h"
#include "held_counts.h"
#include "kill_log.h"
#include "vpmfs/adaptive_mutex.h"
#include "vpmfs/btt.h"
#include "vpmfs/fs.h"
#include "xattr.h"

namespace vpmfs {

inline uint64_t ceil_div(uint64_t a, uint64_t b) {
  return (a + b - 1) / b;
}

// The time stamped on inodes.
inline fsfmt::Timestamp now() {
  timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return fsfmt::Timestamp{t.tv_sec, uint32_t(t.tv_nsec)};
}

class VolumeImpl final : public Volume {
 public:
  static Result<std::unique_ptr<Volume>> open(const std::string& image, const MountOptions& o);
  ~VolumeImpl() override;

  uint32_t block_size() const override { return bs_; }
  PersistMode mode() const override { return region_->mode(); }
  Region& region() override { return *region_; }

  Result<Attr> getattr(uint64_t ino) override;
  Result<Attr> peek_attr(uint64_t ino) override;
  Result<Attr> lookup(uint64_t parent, std::string_view name) override;
  Result<Attr> mknod(uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                     uint32_t uid, uint32_t gid, uint32_t umask = 0) override;
  Result<Attr> mkdir(uint64_t parent, std::string_view name, uint32_t mode, uint32_t uid,
                     uint32_t gid, uint32_t umask = 0) override;
  Result<Attr> tmpfile(uint64_t parent, uint32_t mode, uint32_t uid, uint32_t gid,
                       uint32_t umask = 0) override;
  Result<Attr> symlink(uint64_t parent, std::string_view name, std::string_view target,
                       uint32_t uid, uint32_t gid) override;
  Result<std::string> readlink(uint64_t ino) override;
  Result<Attr> link(uint64_t ino, uint64_t parent, std::string_view name) override;
  Status unlink(uint64_t parent, std::string_view name) override;
  Status rmdir(uint64_t parent, std::string_view name) override;
  Status rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                std::string_view new_name, uint32_t flags, uint32_t uid = 0,
                uint32_t gid = 0) override;
  Result<Attr> setattr(uint64_t ino, const SetAttr& change) override;
  Result<std::size_t> read(uint64_t ino, uint64_t offset, void* buf, std::size_t len) override;
  Result<std::size_t> write(uint64_t ino, uint64_t offset, const void* buf,
                            std::size_t len) override;
  Result<std::size_t> write_unsynced(uint64_t ino, uint64_t offset, const void* buf,
                                     std::size_t len, bool* owed) override;
  Status readdir(uint64_t ino, uint64_t offset,
                 const std::function<bool(const DirEntry&)>& emit) override;
  Result<std::size_t> getxattr(uint64_t ino, std::string_view name, void* buf,
                               std::size_t size) override;
  Status setxattr(uint64_t ino, std::string_view name, const void* value, std::size_t size,
                  int flags) override;
  Result<std::size_t> listxattr(uint64_t ino, char* buf, std::size_t size) override;
  Status removexattr(uint64_t ino, std::string_view name) override;
  Status fallocate(uint64_t ino, int mode, uint64_t offset, uint64_t length) override;
  Result<uint64_t> seek_data(uint64_t ino, uint64_t offset, int whence) override;
  void hold(uint64_t ino, uint64_t count) override;
  void forget(uint64_t ino, uint64_t count) override;
  void sync(std::function<void(const Status&)> done) override;
  Status sync_wait() override;
  Status fsync(uint64_t ino, bool datasync) override;
  void fsync(uint64_t ino, bool datasync, std::function<void(const Status&)> done) override;
  struct statvfs statfs() override;
  Result<std::unique_ptr<DaxMapping>> map(uint64_t ino, uint64_t offset, uint64_t length,
                                          bool synchronous) override;
  Result<Attr> set_xflags(uint64_t ino, uint32_t xflags) override;
  Health health() override;

 private:
  friend class Mapping;
  using Lock = std::unique_lock<AdaptiveMutex>;

  // A directory's name index, built on first use so lookups and creates never scan.
  struct DirIndex {
    // Names: open addressing with linear probing, from the hash of a name to its record. The
    // name itself is only in the record, which a lookup reads anyway for the inode number.
    struct Slot {
      uint32_t hash = 0;
      uint32_t record = 0;  // the record's position / 8 + 1; 0: an empty slot
      uint64_t position() const { return uint64_t(record - 1) * 8; }
    };
    std::vector<Slot> slots;  // a power of two in size, at most 3/4 full
    uint64_t names = 0;
    uint64_t seed = 0;  // random per index: no set of names collides in every directory
    // Free space: each block's largest free record, and the blocks that can take a name ordered
    // by it, so that an insert finds room without a scan.
    std::vector<uint32_t> free_bytes;
    std::set<std::pair<uint32_t, uint64_t>> roomy;  // (free_bytes[block], block)

    uint32_t hash(std::string_view name) const;
    // The slot of the record called `name` in directory `dir`, or null.
    Slot* find(VolumeImpl& v, fsfmt::Inode& dir, std::string_view name);
    void insert(uint32_t hash, uint64_t position);
    void erase(Slot* slot);
    void set_free(uint64_t block, uint32_t largest);
  };
  // In-memory state of an inode in use: made on first need (I/O, a directory's name index, a
  // mapping), dropped when the front end forgets the inode (forget).
  struct Node {
    std::shared_mutex io;   // data I/O shared; size changes exclusive
    uint64_t mappings = 0;  // live DaxMappings: its blocks must stay where they are
    std::unique_ptr<DirIndex> dir;
    // The inode's times were reported (to_attr) since a write last stamped them: the next write
    // stamps a fine-grained time, so that whoever looked sees the change (stamp_write).
    bool times_seen = true;
  };

  VolumeImpl() = default;
  Status load(const std::string& image, const MountOptions& o);
  Status replay_journal();
  Status load_bitmaps();
  Status free_orphans();

  // Metadata blocks: read through a cache; changed blocks join the running transaction.
  const std::byte* meta(uint64_t lba);
  std::byte* meta_mut(uint64_t lba);
  std::byte* meta_new(uint64_t lba);
  // Inodes.
  Result<fsfmt::Inode> iget(uint64_t ino);
  void iput(uint64_t ino, fsfmt::Inode inode);
  Result<uint64_t> ialloc();
  void ifree(uint64_t ino);
  Node& node(uint64_t ino);
  // node(ino), taking mu_ for the lookup: for calls that then lock the node's io first.
  Node* locked_node(uint64_t ino) {
    Lock lock(mu_);
    return &node(ino);
  }
  // Blocks.
  Result<uint64_t> balloc();
  Result<uint64_t> discard_free(uint64_t start, uint64_t length, uint64_t min_length) override;
  void bfree(uint64_t lba);
  // Block map: the LBA of a file block, 0 for a hole; with allocate, fills holes.
  Result<uint64_t> bmap(fsfmt::Inode& inode, uint64_t file_block, bool allocate, bool* fresh);
  Status truncate_blocks(fsfmt::Inode& inode, uint64_t keep_blocks);
  // The superblock copy sb_ into its block, with a fresh checksum.
  void store_super();
  // The on-media orphan chain: files unlinked but not yet freed, and files a large truncate is
  // cutting. Both change `inode`; the caller puts it.
  void orphan_add(uint64_t ino, fsfmt::Inode& inode);
  void orphan_remove(uint64_t ino, fsfmt::Inode& inode);
  // A stretch of the block map met by map_walk: one mapped data block (lba != 0, count 1), or
  // `count` unmapped blocks that all lie under one missing node of the map, at `level` (0: a
  // data block, 1..4: a pointer block) and covering file blocks from `base`.
  struct MapRun {
    uint64_t fb;
    uint64_t count;
    uint64_t lba;
    int level;
    uint64_t base;
  };
  // Visits file blocks [lo, hi) in order, a missing subtree in one call, until fn returns false.
  void map_walk(const fsfmt::Inode& inode, uint64_t lo, uint64_t hi,
                const std::function<bool(const MapRun&)>& fn);
  // Blocks (data and pointer blocks) that filling every hole in [lo, hi) would allocate.
  uint64_t map_need(const fsfmt::Inode& inode, uint64_t lo, uint64_t hi);
  // Frees the data blocks in [lo, hi), and pointer blocks left with nothing under them.
  void punch_blocks(fsfmt::Inode& inode, uint64_t lo, uint64_t hi);
  // File blocks the map can address.
  uint64_t map_capacity() const;
  Status fallocate_allocate(uint64_t ino, uint64_t offset, uint64_t end, bool zero, bool keep);
  Status fallocate_punch(uint64_t ino, uint64_t offset, uint64_t end);
  // Extended attributes: the entries of an inode's xattr block (none without one), and storing
  // them back, allocating the block for the first and freeing it with the last. ENOSPC (and
  // nothing changed) if they do not fit in one block.
  // The attributes of inode `ino`; `chain` receives the blocks holding them.
  Result<xattr::Entries> xattr_load(uint64_t ino, const fsfmt::Inode& inode,
                                    std::vector<uint64_t>* chain = nullptr);
  Status xattr_store(uint64_t ino, fsfmt::Inode& inode, const xattr::Entries& entries);
  void xattr_free(uint64_t ino, fsfmt::Inode& inode);
  // Sets (an empty value: removes) system.posix_acl_access or _default, keeping the mode's
  // permission bits in step with an access ACL. Changes inode; the caller puts it.
  Status acl_set(uint64_t ino, fsfmt::Inode& inode, xattr::Space space, std::string_view value);
  // Directories.
  DirIndex& dir_index(uint64_t ino, fsfmt::Inode& dir);
  Result<uint64_t> dir_find(uint64_t dino, fsfmt::Inode& dir, std::string_view name,
                            uint32_t* type);
  Status dir_add(uint64_t dino, fsfmt::Inode& dir, std::string_view name, uint64_t ino,
                 uint32_t type);
  Status dir_remove(uint64_t dino, fsfmt::Inode& dir, std::string_view name);
  Status dir_set(uint64_t dino, fsfmt::Inode& dir, std::string_view name, uint64_t ino,
                 uint32_t type);
  bool dir_empty(uint64_t dino, fsfmt::Inode& dir);
  // mode as asked for: the umask applies unless the parent has a default ACL to inherit.
  // unlink (directory false) and rmdir (true).
  Status remove_entry(uint64_t parent, std::string_view name, bool directory);
  // A fresh inode of `mode` for ino, made in dir: owner, times, generation, inherited flags.
  fsfmt::Inode new_inode(uint64_t ino, uint32_t mode, uint32_t uid, uint32_t gid,
                         const fsfmt::Inode& dir);
  // ENOSPC while freed blocks wait for a commit: commit and run op once more (ops.cc).
  bool space_after_commit();
  template <class Op>
  auto with_space(Op op) -> decltype(op());
  // chattr +S (FS_XFLAG_SYNC) on any of inos, a volume mounted -o sync, or one mounted -o dirsync
  // where one of inos is a directory: a call that succeeded is durable before it returns. The
  // sync's failure is the call's.
  template <class R>
  R synchronous(R result, std::initializer_list<uint64_t> inos);
  Result<Attr> try_setattr(uint64_t ino, const SetAttr& change);
  Result<Attr> try_set_xflags(uint64_t ino, uint32_t xflags);
  Status try_removexattr(uint64_t ino, std::string_view name);
  Status try_fallocate(uint64_t ino, int mode, uint64_t offset, uint64_t length);
  // unnamed: a tmpfile (name is ignored).
  Result<Attr> try_make_node(uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                             uint32_t uid, uint32_t gid, std::string_view target, uint32_t umask,
                             bool unnamed = false);
  Result<Attr> try_link(uint64_t ino, uint64_t parent, std::string_view name);
  Status try_rename(uint64_t parent, std::string_view name, uint64_t new_parent,
                    std::string_view new_name, uint32_t flags, uint32_t uid, uint32_t gid);
  Status try_setxattr(uint64_t ino, std::string_view name, const void* value, std::size_t size,
                      int flags);
  Result<Attr> make_node(uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                         uint32_t uid, uint32_t gid, std::string_view symlink_target,
                         uint32_t umask, bool unnamed = false);
  Status drop_link(uint64_t ino, fsfmt::Inode& inode);
  // The last reference to an unlinked inode is gone: frees it and its blocks.
  void release_inode(uint64_t ino, Lock& lock);
  // Releases the inodes drop_link left for the caller, once it has put everything it changed.
  Status reap(Lock& lock);
  // Zeros the last block past the end of the file. A cut leaves whatever was there (the cut
  // may never commit); whatever grows the file zeros it first, so the growth reads zeros.
  Status zero_tail(fsfmt::Inode& inode);
  // Drops clean metadata blocks from the cache when it holds more than cache_limit_; at the
  // end of a commit and of a checkpoint, with mu_ held.
  void trim_cache();
  // Updates the access time after a read, as the atime mode says; true if it changed inode.
  bool touch_atime(fsfmt::Inode& inode);
  // Blocks a file may own and still be freed in one step.
  uint64_t small_file_blocks() const;
  // Frees the file's blocks from file block `keep` on, a piece at a time, making room in the
  // journal between pieces (which may commit, and lets other calls run), so that no transaction
  // outgrows the journal however large the file. The inode stays consistent after each piece.
  Status free_blocks_from(uint64_t ino, uint64_t keep, Lock& lock);
  // One piece of write(): blocks for [offset, offset + len), then the data. Holds the file's io
  // lock (the caller's); takes the data gate itself.
  // *sync: the file has FS_XFLAG_SYNC.
  Result<std::size_t> write_piece(uint64_t ino, uint64_t offset, const std::byte* in,
                                  std::size_t len, bool* sync);
  // Attributes as the front end reports them; marks the times as seen (stamp_write) unless
  // `report` is false.
  Attr to_attr(uint64_t ino, const fsfmt::Inode& inode, bool report = true);
  // mtime and ctime for a data write, as Linux's multigrain timestamps: the clock's tick
  // (CLOCK_REALTIME_COARSE), unless the times were reported since the last write, then the fine
  // clock. Leaves the inode as it is when the tick has not moved past its times: a stream of
  // overwrites then changes no metadata between ticks, and has nothing to journal.
  void stamp_write(uint64_t ino, fsfmt::Inode& inode);

  // Copies the metadata blocks changed since the last checkpoint into the kill log, so that a
  // killed daemon loses none of the changes made so far. Called by every changing call before
  // it returns, holding no lock.
  void checkpoint();
  Status replay_kill_log(const fsfmt::ImageHeader& h, const MountOptions& o);
  // Runs checkpoint() when it goes out of scope: declared first in a changing call, it runs
  // after the call's locks are released.
  struct KillPoint {
    VolumeImpl* v;
    ~KillPoint() { v->checkpoint(); }
  };

  // Commits.
  void committer();
  // Commits, with commit_mu_ held on entry and exit (not during the commit): answers the
  // requests queued so far. One runs at a time (committing_), on the committer thread or on a
  // caller of sync_wait.
  void run_commit(std::unique_lock<std::mutex>& cl);
  // Queues done for a commit: run here, now, when none is running (and no group is gathering,
  // or this call completes it); otherwise the next commit answers it in its own thread.
  void commit_or_join(std::function<void(const Status&)> done);
  Status commit();
  void throttle(Lock& lock);

  std::unique_ptr<Region> region_;
  std::unique_ptr<Btt> btt_;
  uint32_t bs_ = 0;
  fsfmt::Superblock sb_{};
  bool read_only_ = false;
  uint32_t commit_interval_ms_ = 5000;
  bool sync_ = false;                    // MountOptions::sync
  bool dirsync_ = false;                 // MountOptions::dirsync
  uint64_t max_transaction_blocks_ = 0;  // throttle's limit (0: half the journal)
  uint64_t cache_limit_ = 4096;          // metadata blocks kept in memory (trim_cache)
  bool home_pending_ = false;            // a commit's images are not all written home yet
  MountOptions::Atime atime_ = MountOptions::Atime::relatime;
  std::function<void(const std::string&)> on_error_;

  // Lock order: Node::io, then gate_, then mu_. Writers hold gate_ shared from allocating blocks
  // until their data is written; a commit takes it exclusively to snapshot, so no transaction
  // points at a block whose data is not yet written.
  std::shared_mutex gate_;
  AdaptiveMutex mu_;  // guards everything below
  std::unordered_map<uint64_t, std::unique_ptr<std::byte[]>> cache_;
  std::set<uint64_t> dirty_;       // blocks changed since the last commit began
  std::set<uint64_t> kill_dirty_;  // blocks changed since the last checkpoint
  // kill_dirty_ may be non-empty: set (under mu_) with each insert, cleared with the set. Lets a
  // call that changed no metadata (an overwrite within the clock's tick) skip the checkpoint
  // without taking mu_ once more.
  std::atomic<bool> kill_pending_{false};
  std::unique_ptr<KillLog> kill_log_;
  uint64_t journal_txn_ = 0;      // the last transaction the journal holds whole
  std::vector<bool> block_used_;  // in-memory copies of the bitmaps
  std::vector<bool> inode_used_;
  uint64_t free_blocks_ = 0;
  uint64_t free_inodes_ = 0;
  uint64_t block_hint_ = 0;
  // Blocks promised to fallocate calls in progress: balloc leaves them to those calls, so an
  // fallocate that found room for its whole range never runs out part way.
  uint64_t reserved_ = 0;
  uint64_t inode_hint_ = 0;
  std::unordered_set<uint64_t> quarantine_;  // freed in a transaction not yet committed
  // Blocks being discarded (discard_free): balloc passes them by. One discard at a time.
  std::pair<uint64_t, uint64_t> discard_window_{0, 0};
  std::mutex discard_mu_;
  std::vector<uint64_t> freed_;  // freed since the last commit began
  std::unordered_map<uint64_t, std::unique_ptr<Node>> nodes_;
  HeldCounts held_;  // front-end references (kernel lookups)
  // Files whose size or blocks changed in the running transaction, and in the one committing:
  // fdatasync of any other file needs no commit (fsync).
  std::unordered_set<uint64_t> layout_dirty_;
  std::unordered_set<uint64_t> layout_committing_;
  bool layout_changed_ = false;           // a block was allocated or freed since the last iput
  std::unordered_set<uint64_t> orphans_;  // unlinked, not yet released
  std::vector<uint64_t> reap_;            // unlinked, unheld, large: for reap()

  // The committer thread: group commit of fsync/sync requests and the periodic commit.
  std::mutex commit_mu_;
  std::condition_variable commit_cv_;
  std::condition_variable committed_cv_;
  std::vector<std::function<void(const Status&)>> waiters_;
  bool commit_requested_ = false;
  bool committing_ = false;  // a commit runs (run_commit)
  // After a commit that answered several requests, the next waits until as many are queued
  // (gather_target_) or until gather_until_: one commit for a group of fsyncing threads.
  bool gathering_ = false;
  std::size_t gather_target_ = 0;
  std::chrono::steady_clock::time_point gather_until_;
  bool stopping_ = false;
  uint64_t commits_done_ = 0;
  uint64_t syncs_answered_ = 0;
  uint64_t journal_commits_ = 0;
  uint64_t commit_ns_ = 0;
  uint64_t answer_ns_ = 0;
  uint64_t gather_ns_ = 0;  // waiting for the group the last commit answered (gathering_)
  std::optional<std::chrono::steady_clock::time_point> gather_began_;
  bool journaled_ = false;  // the last commit() wrote the journal (read by run_commit)
  uint64_t sequence_ = 0;
  Status failed_;
  std::thread committer_;
};

}  // namespace vpmfs
