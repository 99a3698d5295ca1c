// The Block Translation Table: a sector-atomic LBA space on a region (UEFI 2.7 BTT layout;
// docs/FORMAT.md). Every sector write is all-old or all-new after a crash, in both crash
// models:
//  - direct regions use the classic protocol: data into the lane's free block, made durable;
//    flog entry ({new_map, seq} as the final 8-byte store); map entry, the commit point.
//  - writeback regions batch writes into epochs: data of many sectors, one flush, their flog
//    entries, a second flush, then their map entries; until then reads see them through an
//    in-memory overlay. With an intent log, sync() is one flush: each write's data and intent
//    record are durable, and recovery takes the write back from them; an epoch commits in the
//    background once half its lanes hold writes (or when commit() is asked for). Without one,
//    sync() commits.
#pragma once

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

namespace btt {
class Arena;
}

using Uuid = std::array<uint8_t, 16>;

struct BttFormatOptions {
  uint32_t sector_size = 4096;  // external LBA size: 512 or 4096
  uint32_t nfree = 256;         // free blocks (and lanes) per arena
  Uuid uuid{};                  // zero: a random one
  Uuid parent_uuid{};
  uint64_t offset = 0;  // where the BTT namespace starts in the region (4 KiB aligned)
  uint64_t size = 0;    // its size; 0: to the end of the region
  // Older layouts, so that their images can be made for tests: 1.1 puts the first info block
  // 4 KiB into the namespace; padded_flog uses the old flog slots (0,2).
  uint16_t version_major = 2;
  uint16_t version_minor = 0;
  bool padded_flog = false;
  // Region offset of the intent log (see intent_log_size); empty: none. Without one, writes on a
  // writeback region that were acknowledged but not yet synced do not survive a killed process
  // (they still never tear).
  std::optional<uint64_t> intent_log;
  // Called now and then with bytes done / total while the map is written.
  std::function<void(uint64_t, uint64_t)> progress;
};

struct BttOpenOptions {
  uint64_t offset = 0;
  uint64_t size = 0;                   // 0: to the end of the region
  std::optional<uint64_t> intent_log;  // as formatted
};

// Geometry and state of one arena, for tools.
struct BttArenaInfo {
  uint64_t offset = 0;  // absolute, in the region
  uint64_t size = 0;
  uint16_t version_major = 0;
  uint16_t version_minor = 0;
  uint32_t external_lbasize = 0;
  uint32_t internal_lbasize = 0;
  uint32_t external_nlba = 0;
  uint32_t internal_nlba = 0;
  uint32_t nfree = 0;
  uint64_t dataoff = 0;  // absolute
  uint64_t mapoff = 0;
  uint64_t logoff = 0;
  uint64_t info2off = 0;
  uint32_t flags = 0;
  int log_index[2] = {0, 1};
  Uuid uuid{};
  Uuid parent_uuid{};
};

class Btt {
 public:
  using Callback = std::function<void(const Status&)>;

  struct Stats {
    uint64_t writes = 0;
    uint64_t reads = 0;
    uint64_t in_place_writes = 0;  // to pinned sectors
    uint64_t epochs = 0;           // writeback: commits
    uint64_t epoch_sectors = 0;    // writeback: sector updates committed
  };

  // Bytes the intent log of a namespace of `namespace_size` bytes needs.
  static uint64_t intent_log_size(uint64_t namespace_size, uint32_t nfree = 256);
  // Writes a fresh BTT (all sectors read as zeros... of an identity-mapped, zero-filled image).
  static Status format(Region& region, const BttFormatOptions& options);
  // Opens a BTT, validating its info blocks (falling back to the backups), rebuilding the free
  // lists from the flog and rolling interrupted updates forward.
  static Result<std::unique_ptr<Btt>> open(Region& region, const BttOpenOptions& options = {});
  // Makes every write durable (writeback) before it returns.
  ~Btt();
  Btt(const Btt&) = delete;
  Btt& operator=(const Btt&) = delete;

  uint32_t sector_size() const { return sector_size_; }
  uint64_t sector_count() const { return sector_count_; }
  Region& region() const { return *region_; }
  std::vector<BttArenaInfo> arenas() const;
  // What open() found and did: "arena 0: primary info block is invalid (...); restored it
  // from the backup", "lane 7: rolled an interrupted update of LBA 12 forward".
  const std::vector<std::string>& open_notes() const { return notes_; }

  Status write(uint64_t lba, const void* data);
  // Gathers the sector from iovecs straight into the free block: the only copy.
  Status writev(uint64_t lba, const iovec* iov, int iovcnt);
  // Sector i of data (n * sector_size() bytes) to lbas[i]: each sector atomic on its own, as n
  // calls of write() would leave them, but cheaper (the writes share the BTT's locks). On an
  // error some sectors may have been written.
  Status write_sectors(const uint64_t* lbas, std::size_t n, const std::byte* data);
  Status read(uint64_t lba, void* data);
  // Marks the sector as zero (the map's Z flag): no data is written.
  Status trim(uint64_t lba);
  // trim, and the storage behind the sector goes back to the image file's filesystem where it
  // can (a hole; Region::discard). For sectors whose contents nobody needs (free blocks).
  Status discard(uint64_t lba);
  // Marks the sector bad (the map's E flag): reads fail with EIO until it is written again.
  Status set_error(uint64_t lba);

  // Zero-copy read: data() points into the region (or at zeros) and stays valid, never reused
  // by a writer, until the ReadRef goes away.
  class ReadRef {
   public:
    ReadRef() = default;
    ReadRef(ReadRef&& other) noexcept;
    ReadRef& operator=(ReadRef&& other) noexcept;
    ~ReadRef();
    const std::byte* data() const { return data_; }

   private:
    friend class btt::Arena;
    std::atomic<uint32_t>* slot_ = nullptr;
    const std::byte* data_ = nullptr;
  };
  Result<ReadRef> read_ref(uint64_t lba);

  // Completes once every write that returned before the call is durable. Writeback: one
  // request on the flush channel with an intent log, else a commit. Direct and unsafe: at once.
  void sync(Callback done);
  // The same, never waiting for another thread: the flush (or a commit, when none is in
  // flight) runs in the caller's thread and done runs there before this returns; otherwise done
  // joins the next commit and runs in its thread.
  void sync_or_join(Callback done);
  // The same, blocking.
  Status sync_wait();
  // Commits the current epoch (writeback: two or three requests on the flush channel), after
  // which every write that returned before the call is durable in the map and flog, with
  // nothing left for recovery to take back. commit_or_join and commit_wait as above.
  void commit(Callback done);
  void commit_or_join(Callback done);
  Status commit_wait();

  // Pinned sectors keep their postmap block: writes to them go in place (no sector atomicity,
  // as with DAX) until unpinned. Pins nest.
  Status pin(uint64_t lba, uint64_t count);
  Status unpin(uint64_t lba, uint64_t count);
  // Region offset of a pinned sector's data block.
  Result<uint64_t> pinned_offset(uint64_t lba);

  Stats stats() const;
  // A commit failed (the flush channel failed): writes fail with EIO from then on.
  bool failed() const { return failed_.load(std::memory_order_acquire); }

 private:
  friend class btt::Arena;
  Btt() = default;
  struct Locate {
    btt::Arena* arena;
    uint32_t premap;
  };
  Result<Locate> locate(uint64_t lba) const;
  Status mark(uint64_t lba, uint32_t flag);
  bool promise_by_intents() const;
  void flush_intents(Callback done, bool in_this_thread);
  bool retire_superseded();
  void start_commit(std::unique_lock<std::mutex>& lock);
  // An arena is running low on lanes: starts a commit unless one is in flight or asked for.
  void commit_ahead();
  void commit_flog(const Status& flushed);
  void commit_flog_now();
  void commit_map(const Status& flushed);
  void apply_map();
  void finish_commit(const Status& status);

  Region* region_ = nullptr;
  uint32_t sector_size_ = 0;
  uint64_t sector_count_ = 0;
  std::vector<std::unique_ptr<btt::Arena>> arenas_;
  std::vector<std::string> notes_;
  std::atomic<bool> failed_{false};
  bool intents_ = false;  // opened with an intent log

  // Writeback epochs. Lock order: commit_mu_ before any arena lock.
  std::mutex commit_mu_;
  std::condition_variable commit_cv_;
  bool committing_ = false;
  std::vector<Callback> waiting_;    // for the next commit
  std::vector<Callback> committed_;  // answered when the commit in flight completes
  std::atomic<uint64_t> epochs_{0};
  std::atomic<uint64_t> epoch_sectors_{0};
};

struct BttCheckReport {
  // What the next open does as a matter of course (an interrupted update it rolls forward):
  // the normal state after a crash, not damage.
  std::vector<std::string> notes;
  std::vector<std::string> problems;   // each names what is wrong and where
  std::vector<std::string> repairs;    // what repair did
  std::vector<std::string> remaining;  // problems a check after the repair still finds
  uint64_t arenas = 0;
  uint64_t sectors = 0;
  bool clean() const { return problems.empty(); }
};

// Checks a BTT without opening it for I/O: info blocks and their backups agree; sequence
// numbers, LBAs and postmap numbers in range; every internal block referenced exactly once by
// map and flog. With repair, fixes what it can without losing a reachable sector.
Result<BttCheckReport> btt_check(Region& region, const BttOpenOptions& options, bool repair);

}  // namespace vpmfs
