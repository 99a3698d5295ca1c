// One BTT arena: its lanes, map, flog, read tracking and, on writeback regions, the overlay of
// sector updates not yet committed. Internal to the BTT library.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "btt/layout.h"
#include "vpmfs/adaptive_mutex.h"
#include "vpmfs/btt.h"
#include "vpmfs/region.h"

namespace vpmfs::btt {

struct Namespace {
  uint64_t offset;  // where the BTT namespace starts in the region
  uint64_t end;
};
struct FoundInfo {
  InfoBlock info;
  ArenaGeometry geometry;
};

std::string hex(uint64_t v);
Result<Namespace> namespace_of(const Region& region, uint64_t offset, uint64_t size);
// Where format() puts each arena of a namespace whose first arena starts at `first`.
std::vector<ArenaGeometry> plan_namespace(uint64_t first, uint64_t end, uint32_t lbasize,
                                          uint32_t nfree);
// True if any place a first info block (or its backup) could be holds the signature.
bool has_signature(const Region& region, uint64_t offset, uint64_t end);
// Reads and validates the info block of the arena at infooff, falling back to its backup;
// notes what it found; with mend, rewrites a bad copy from the good one.
Result<FoundInfo> find_info(Region& region, uint64_t infooff, uint64_t end, int index,
                            std::vector<std::string>& notes, bool mend);
// Calls visit for every arena of the namespace, in order.
Status walk_arenas(Region& region, const Namespace& ns, std::vector<std::string>& notes, bool mend,
                   const std::function<Status(int, const FoundInfo&)>& visit);

// Validates an info block read from media; on failure says why.
Status validate_info(const InfoBlock& info, uint64_t infooff, uint64_t limit, ArenaGeometry* out);
// The info block a fresh arena of this geometry carries.
InfoBlock make_info(const ArenaGeometry& g, const BttFormatOptions& o, const Uuid& uuid);
// Geometry of a fresh arena of `size` bytes at `infooff`, as Linux lays it out.
ArenaGeometry plan_arena(uint64_t infooff, uint64_t size, uint32_t lbasize, uint32_t nfree);
// Finds which flog slots a lane's two entries use: (0,1) or the old padded (0,2).
Status detect_log_indices(const Region& region, const ArenaGeometry& g, int out[2]);
// Which of a lane's two entries is newer (0 or 1), or -1 if the pair is impossible.
int newer_entry(uint32_t seq0, uint32_t seq1);

class Arena {
 public:
  // intent_off: where this arena's stride of the intent log starts, if there is one.
  Arena(Btt& btt, Region& region, const ArenaGeometry& g, const int log_index[2],
        uint64_t first_lba, const InfoBlock& info, std::optional<uint64_t> intent_off);

  // Writes an empty intent-log stride for an arena (format).
  static void init_intent_log(Region& region, uint64_t intent_off, const ArenaGeometry& g);

  // Rebuilds the free lists from the flog and rolls interrupted updates forward.
  Status recover(std::vector<std::string>& notes, int arena_index);
  // Puts acknowledged writes of epochs that never committed back into the overlay, to be
  // committed by the next commit (read-only opens: into the in-memory roll-forward, so that
  // reads see them). Returns how many.
  Result<uint32_t> recover_intents(std::vector<std::string>& notes, int arena_index);

  uint64_t first_lba() const { return first_lba_; }
  uint32_t external_nlba() const { return g_.external_nlba; }
  const ArenaGeometry& geometry() const { return g_; }
  BttArenaInfo info() const;

  Status write(uint32_t premap, const iovec* iov, int iovcnt);
  // Sector i of data to premaps[i], for i < n <= kMaxBatch; each sector is atomic on its own.
  // On a writeback region the sectors share one lane take, one read-tracking scan and one
  // publish (stripe locks, then avail_mu_) instead of one of each per sector.
  static constexpr uint32_t kMaxBatch = 16;
  Status write_batch(const uint32_t* premaps, uint32_t n, const std::byte* data);
  Status read(uint32_t premap, void* data);
  Result<Btt::ReadRef> read_ref(uint32_t premap);
  // kMapZero or kMapError. EAGAIN: an update of the sector that a sync promised, or one in the
  // commit in flight, must be committed first (Btt commits and asks again).
  Status mark(uint32_t premap, uint32_t flag);
  // After a trim: the block the map points at no longer holds anything (Region::discard), unless
  // the sector was written or pinned since.
  void discard(uint32_t premap);
  Status pin(uint32_t premap);
  void unpin(uint32_t premap);
  Result<uint64_t> pinned_offset(uint32_t premap);

  // A sync without a commit (Btt::sync with an intent log): every update published so far is
  // promised from the flush that follows on, through its intent record. A promised update is
  // never dropped before its epoch commits: a newer write of its sector supersedes it (its
  // lane and record stay) instead of releasing it, and a trim waits for the commit.
  void hold_published();
  // Writeback epochs, driven by Btt. begin_commit() moves every pending lane into the commit;
  // once their data is durable, retire_superseded() zeroes the records of superseded lanes
  // (true if there were any: a flush must follow before free_superseded() lets the lanes go)
  // and write_flog() logs the commit; write_map() runs once the flog is durable.
  bool begin_commit();
  bool retire_superseded();
  void free_superseded();
  void write_flog();
  uint64_t write_map();
  // Wakes writers waiting for a free lane.
  void lanes_returned();

  uint64_t writes() const { return writes_.load(std::memory_order_relaxed); }
  uint64_t reads() const { return reads_.load(std::memory_order_relaxed); }
  uint64_t in_place_writes() const { return in_place_.load(std::memory_order_relaxed); }

 private:
  static constexpr uint32_t kNoLane = UINT32_MAX;
  static constexpr uint32_t kRttValid = 1u << 31;
  // Read tracking slots: one per reader copying a sector at the same moment (a FUSE worker, a
  // fsck pass), not one per lane; every write scans them all before it reuses a block.
  static constexpr uint32_t kRttSlots = 128;

  // superseded: a promised update overtaken in its epoch; its lane waits for the commit.
  enum class LaneState : uint8_t { available, pending, superseded, committing, committed };

  struct alignas(64) Lane {
    std::mutex mu;      // direct mode: held for a whole sector write
    uint32_t free = 0;  // the lane's free block (postmap number)
    uint32_t seq = 1;   // sequence number of the lane's next flog entry
    uint8_t sub = 0;    // which of the two slots the next entry goes to
    // Writeback epochs (guarded by the stripe lock of `lba`, and by avail_mu_ for state changes
    // to and from available).
    LaneState state = LaneState::available;
    uint32_t lba = 0;      // premap of the pending update
    uint32_t old_map = 0;  // committed: the flog's old_map (the block the update frees)
    bool held = false;     // pending: a sync promised the update (hold_published)
  };

  struct alignas(64) Stripe {
    using Overlay = std::unordered_map<uint32_t, uint32_t>;
    std::mutex mu;
    Overlay overlay;                              // premap -> lane with newer data
    std::unordered_map<uint32_t, uint32_t> pins;  // premap -> pin count
    // Nodes of erased overlay entries, for the next inserts. Otherwise each write allocates a
    // node that the commit, in another thread, frees: that defeats malloc's per-thread caches,
    // and under 8 fsyncing writers malloc's arena lock was a third of the daemon's futex calls.
    std::vector<Overlay::node_type> spare;

    // Points premap at lane; returns the lane it pointed at before, or kNoLane.
    uint32_t overlay_set(uint32_t premap, uint32_t lane) {
      if (auto it = overlay.find(premap); it != overlay.end()) {
        return std::exchange(it->second, lane);
      }
      if (spare.empty()) {
        overlay.emplace(premap, lane);
      } else {
        Overlay::node_type node = std::move(spare.back());
        spare.pop_back();
        node.key() = premap;
        node.mapped() = lane;
        overlay.insert(std::move(node));
      }
      return kNoLane;
    }
    void overlay_erase(Overlay::iterator it) { spare.push_back(overlay.extract(it)); }
  };

  // What a premap LBA resolves to right now.
  struct Lookup {
    uint32_t block;
    bool zero;
    bool error;
    bool operator==(const Lookup&) const = default;
  };

  bool writeback() const { return writeback_; }
  Stripe& stripe(uint32_t premap) { return stripes_[(premap / 16) % stripes_.size()]; }
  uint64_t map_off(uint32_t premap) const { return g_.mapoff + uint64_t(premap) * kMapEntrySize; }
  uint64_t data_off(uint32_t block) const {
    return g_.dataoff + uint64_t(block) * g_.internal_lbasize;
  }
  uint64_t flog_off(uint32_t lane, uint32_t sub) const {
    return g_.logoff + uint64_t(lane) * kFlogGroupSize + uint64_t(log_index_[sub]) * kFlogEntrySize;
  }
  uint32_t map_raw(uint32_t premap) const;
  Lookup lookup_media(uint32_t premap) const;
  Lookup lookup(uint32_t premap, Stripe& s) const;  // with s.mu held

  void copy_in(uint32_t block, const iovec* iov, int iovcnt);
  uint64_t intent_record_off(uint32_t lane) const {
    return *intent_off_ + kPage + uint64_t(lane) * sizeof(IntentRecord);
  }
  void write_intent(uint32_t lane, uint32_t premap, uint32_t block, uint64_t epoch);
  void clear_intent(uint32_t lane);
  void write_intent_header(uint64_t committed_epoch);
  // Releases an uncommitted lane whose update was overtaken, or supersedes it if a sync
  // promised it (avail_mu_ held).
  void release_pending(uint32_t lane);
  void flog_write(Lane& lane, uint32_t lane_index, const FlogEntry& e);
  void map_write(uint32_t premap, uint32_t entry);

  std::atomic<uint32_t>* rtt_claim();
  // Waits until no reader is copying any of the n blocks.
  void rtt_wait(const uint32_t* blocks, uint32_t n) const;
  // Publishes the block premap resolves to in slot, re-checking the map until stable.
  Result<Lookup> track(uint32_t premap, std::atomic<uint32_t>* slot);

  Status write_direct(uint32_t premap, const iovec* iov, int iovcnt);
  // Sector i from iovs[i] (one iovec array of iovcnts[i] entries each) to premaps[i], i < n.
  Status write_epoch(const uint32_t* premaps, const iovec* const* iovs, const int* iovcnts,
                     uint32_t n);
  // Publishes the updates whose data lanes[i] holds (hashes[i]: its hash for the intent record).
  void publish(const uint32_t* premaps, const uint32_t* lanes, const uint64_t* hashes, uint32_t n);
  Status write_in_place(uint32_t premap, const iovec* iov, int iovcnt);
  // Takes up to `want` available lanes (at least one, waiting for a commit if none is left)
  // into out; 0 after a failed flush.
  uint32_t take_lanes(uint32_t* out, uint32_t want);

  Btt& btt_;
  Region& region_;
  ArenaGeometry g_;
  int log_index_[2];
  uint64_t first_lba_;
  InfoBlock info_;
  bool writeback_;
  std::vector<Lane> lanes_;
  std::vector<Stripe> stripes_;
  std::vector<std::atomic<uint32_t>> rtt_;
  std::atomic<uint32_t> pinned_count_{0};

  // Writeback: lanes free for a new write. Lock order: stripe mu before avail_mu_.
  AdaptiveMutex avail_mu_;
  std::condition_variable_any avail_cv_;
  uint32_t lane_waiters_ = 0;  // writers waiting on avail_cv_ (avail_mu_)
  std::vector<uint32_t> avail_;
  std::vector<uint32_t> published_;     // lanes whose update joined the open epoch
  std::size_t held_through_ = 0;        // published_[0, this) were seen by hold_published
  std::vector<uint32_t> commit_lanes_;  // lanes in the commit in flight
  std::vector<uint32_t> superseded_;    // superseded lanes of the open epoch
  std::vector<uint32_t> retiring_;      // and of the commit in flight
  std::optional<uint64_t> intent_off_;
  uint64_t epoch_ = 1;             // epoch new writes join (avail_mu_)
  uint64_t committing_epoch_ = 0;  // epoch of the commit in flight
  std::atomic<uint64_t> intent_seq_{1};

  std::atomic<uint64_t> writes_{0};
  std::atomic<uint64_t> reads_{0};
  std::atomic<uint64_t> in_place_{0};
  // Read-only opens: the map entries of interrupted updates rolled forward in memory only
  // (premap -> entry), so reads see what the next writable open will (fsck -n). Set by
  // recover, read-only after.
  std::unordered_map<uint32_t, uint32_t> rolled_;
};

}  // namespace vpmfs::btt
