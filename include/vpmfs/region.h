// A region: an image file or device-dax node mapped shared read-write into this process, with
// the persistence mode that says what makes a store durable (docs/DESIGN.md, "Persistence
// modes"). Every layer above stores into the region through this interface so that the crash
// simulator (crash_sim.h) can record what a crash may keep.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vpmfs/flush_channel.h"
#include "vpmfs/status.h"

namespace vpmfs {

enum class PersistMode {
  direct,     // durable after cache-line write-back + fence (pmem, devdax, MAP_SYNC files)
  writeback,  // durable after a completed request on the flush channel (virtio-pmem model)
  unsafe,     // never guaranteed durable
};

const char* to_string(PersistMode mode);
std::optional<PersistMode> parse_persist_mode(std::string_view name);

struct RegionOptions {
  // The mode to use; empty means detect (MAP_SYNC or devdax gives direct, else writeback).
  std::optional<PersistMode> mode;
  // Treat the mapped memory as persistent even when MAP_SYNC is refused: the test stand-in for
  // real pmem, like PMDK's PMEM_IS_PMEM_FORCE. Makes direct possible on any file.
  bool force_persistent = false;
  // The CPU caches are inside the persistence domain (eADR): persist is a fence only.
  bool eadr = false;
  bool read_only = false;
  // With read_only: take no lock at all, so that a tool can look at an image a mounted vpmfs
  // holds (vpmfs-ctl info). What it reads may change under it, and every value must be checked.
  bool unlocked = false;
  // How long to wait for the image lock when another process holds it (0: fail at once). A
  // daemon that was just unmounted still holds it while it makes its final commit.
  uint32_t lock_wait_ms = 0;
  // Non-zero: create the image (sparse) with this size if it does not exist or is empty.
  uint64_t create_size = 0;
  // A writable image on tmpfs: lock its pages in memory as they are first touched (mlock2,
  // MLOCK_ONFAULT; nothing is populated ahead). Reclaim (proactive reclaim such as DAMON's
  // pageout, or swap) otherwise unmaps the pages it finds cold: without swap that frees nothing,
  // and the next store to each such page takes a fault, as pmem never does. Best effort: when
  // the lock is refused (RLIMIT_MEMLOCK) the region works as without it, and memory() says so.
  bool lock_memory = false;
};

// What the crash simulator sees. store() must perform the store on the region itself, so that
// recording and storing happen as one step.
class RegionObserver {
 public:
  virtual ~RegionObserver() = default;
  virtual void store(std::byte* base, uint64_t off, const void* src, std::size_t len) = 0;
  // A cache-line write-back of [off, off+len) (direct mode).
  virtual void flush(uint64_t off, std::size_t len) = 0;
  virtual void fence() = 0;
  // persist() on a writeback region: the range is handed to the next device flush.
  virtual void mark_dirty(uint64_t off, std::size_t len) = 0;
  // A device flush on the flush channel starts / completes (ok = it reported success).
  virtual void device_flush_begin() = 0;
  virtual void device_flush_end(bool ok) = 0;
};

class Region {
 public:
  static Result<std::unique_ptr<Region>> open(const std::string& path,
                                              const RegionOptions& options = {});
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  const std::string& path() const { return path_; }
  std::byte* base() const { return base_; }
  uint64_t size() const { return size_; }
  PersistMode mode() const { return mode_; }
  bool read_only() const { return read_only_; }
  bool is_devdax() const { return devdax_; }
  // The backend could map with MAP_SYNC (a DAX file or devdax).
  bool map_sync() const { return map_sync_; }
  // Why the mode is what it is, for logs: "MAP_SYNC refused by tmpfs; writeback".
  const std::string& mode_reason() const { return mode_reason_; }
  // Name of the filesystem holding the image ("ext4", "tmpfs", "devdax", ...).
  const std::string& backend_name() const { return backend_name_; }
  // write(), write_nt() and zero() store with pwrite() into the image file rather than
  // through the mapping (a writeback image on a filesystem that writes back its page cache).
  bool stores_by_write() const { return store_by_write_; }
  // What RegionOptions::lock_memory did, for logs and status: "locked as touched", or why not
  // ("not locked: ..."); empty when it was not asked for or does not apply (not tmpfs).
  const std::string& memory() const { return memory_; }

  std::byte* at(uint64_t off) const { return base_ + off; }
  bool contains(uint64_t off, uint64_t len) const { return off <= size_ && len <= size_ - off; }

  // Plain stores. Durable after persist() of their range (and, in writeback mode, a completed
  // flush request that began after it).
  void write(uint64_t off, const void* src, std::size_t len) {
    if (observer_ != nullptr) [[unlikely]] {
      observer_->store(base_, off, src, len);
      return;
    }
    if (store_by_write_ && write_file(off, src, len)) return;
    __builtin_memcpy(base_ + off, src, len);
  }
  // An aligned 8-byte store: atomic in every crash model.
  void store64(uint64_t off, uint64_t value) { store_atomic(off, value); }
  void store32(uint64_t off, uint32_t value) { store_atomic(off, value); }
  // Copy for large blocks: non-temporal stores in direct mode, so the data is durable after the
  // next fence() without a write-back pass. Elsewhere the same as write().
  void write_nt(uint64_t off, const void* src, std::size_t len);
  void zero(uint64_t off, std::size_t len);
  // Bytes whose contents no longer matter: the image file gets a hole there (its filesystem
  // frees the space) where the range covers whole pages and the file can have holes; nothing
  // happens elsewhere, nor under an observer (the crash simulator).
  void discard(uint64_t off, std::size_t len);

  // A range this process stores to through the mapping, on an image that stores_by_write()
  // (the BTT's map and flog): before each device flush its page-table entries are dropped
  // (madvise MADV_DONTNEED; the page cache keeps the pages, dirty ones stay dirty). The flush's
  // write-back then finds those pages unmapped: no write-protect and no TLB shootdown to the
  // other CPUs per page, one flush of the range instead. The next access faults the page back
  // in, as the next store did after the write-protect. Nothing happens on other regions.
  void unmap_before_flush(uint64_t off, uint64_t len);

  // Write back the cache lines of a range (direct mode; nothing elsewhere).
  void flush(uint64_t off, std::size_t len);
  // Order earlier write-backs and non-temporal stores before later stores.
  void fence();
  // Direct: flush + fence. Writeback: hand the range to the next device flush. Unsafe: nothing.
  void persist(uint64_t off, std::size_t len);

  // The asynchronous flush request queue (virtio-pmem's model) on this image.
  FlushChannel& flush_channel() { return *channel_; }
  // A device flush failed: nothing on this region can be reported durable any more.
  bool failed() const { return channel_->failed(); }

  // Test hook for the crash simulator; attach before, and detach after, all I/O.
  void set_observer(RegionObserver* observer);
  RegionObserver* observer() const { return observer_; }

 private:
  friend class FlushChannel;
  Region() = default;

  // Drops the page-table entries of the unmap_before_flush() ranges (the flush channel, before
  // each device flush).
  void unmap_for_flush();

  // pwrite() of a store into the image's page cache instead of a store through the mapping;
  // false if it failed (the caller then stores through the mapping).
  bool write_file(uint64_t off, const void* src, std::size_t len);

  template <typename T>
  void store_atomic(uint64_t off, T value) {
    if (observer_ != nullptr) [[unlikely]] {
      observer_->store(base_, off, &value, sizeof value);
      return;
    }
    __atomic_store_n(reinterpret_cast<T*>(base_ + off), value, __ATOMIC_RELEASE);
  }

  std::string path_;
  int fd_ = -1;
  std::byte* base_ = nullptr;
  uint64_t size_ = 0;
  PersistMode mode_ = PersistMode::writeback;
  bool read_only_ = false;
  bool devdax_ = false;
  bool map_sync_ = false;
  bool eadr_ = false;
  // Writeback image on a filesystem with page cache writeback (not tmpfs): each flush
  // write-protects the mapped pages it cleans, so the next store through the mapping takes a
  // fault (and the clean a TLB shootdown). Stores other than the aligned 4- and 8-byte ones go
  // through pwrite() instead, which leaves the mapping's entries clean and read-only.
  bool store_by_write_ = false;
  std::string mode_reason_;
  std::string backend_name_;
  std::string memory_;
  // Set by persist() in writeback mode, taken by the flush channel when a device flush begins.
  std::atomic<bool> dirty_{false};
  RegionObserver* observer_ = nullptr;
  std::mutex unmap_mu_;                               // guards unmap_
  std::vector<std::pair<uint64_t, uint64_t>> unmap_;  // unmap_before_flush(): offset, length
  std::unique_ptr<FlushChannel> channel_;
};

}  // namespace vpmfs
