#include "btt/arena.h"

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "vpmfs/checksum.h"

#include <cstddef>

namespace vpmfs::btt {
namespace {

constexpr std::byte kZeros[4096] = {};

std::string str(const char* fmt, auto... args) {
  char buf[256];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

bool aligned(uint64_t v, uint64_t a) {
  return v % a == 0;
}

}  // namespace

// --- layout ----------------------------------------------------------------------------------

ArenaGeometry plan_arena(uint64_t infooff, uint64_t size, uint32_t lbasize, uint32_t nfree) {
  ArenaGeometry g;
  g.infooff = infooff;
  g.size = size;
  g.external_lbasize = lbasize;
  g.internal_lbasize = (lbasize + kInternalLbaAlign - 1) / kInternalLbaAlign * kInternalLbaAlign;
  g.nfree = nfree;
  uint64_t available = size - size % kPage;
  available -= 2 * kPage;  // the info block and its backup
  uint64_t logsize = (uint64_t(nfree) * kFlogGroupSize + kPage - 1) / kPage * kPage;
  available -= logsize;
  g.internal_nlba = uint32_t((available - kPage) / (g.internal_lbasize + kMapEntrySize));
  g.external_nlba = g.internal_nlba - nfree;
  uint64_t mapsize = (uint64_t(g.external_nlba) * kMapEntrySize + kPage - 1) / kPage * kPage;
  uint64_t datasize = available - mapsize;
  g.dataoff = infooff + kPage;
  g.mapoff = g.dataoff + datasize;
  g.logoff = g.mapoff + mapsize;
  g.info2off = g.logoff + logsize;
  return g;
}

InfoBlock make_info(const ArenaGeometry& g, const BttFormatOptions& o, const Uuid& uuid) {
  InfoBlock info;
  std::memset(&info, 0, sizeof info);
  std::memcpy(info.signature, kSignature, sizeof info.signature);
  std::memcpy(info.uuid, uuid.data(), 16);
  std::memcpy(info.parent_uuid, o.parent_uuid.data(), 16);
  info.version_major = o.version_major;
  info.version_minor = o.version_minor;
  info.external_lbasize = g.external_lbasize;
  info.external_nlba = g.external_nlba;
  info.internal_lbasize = g.internal_lbasize;
  info.internal_nlba = g.internal_nlba;
  info.nfree = g.nfree;
  info.infosize = sizeof(InfoBlock);
  info.nextoff = g.nextoff;
  info.dataoff = g.dataoff - g.infooff;
  info.mapoff = g.mapoff - g.infooff;
  info.logoff = g.logoff - g.infooff;
  info.info2off = g.info2off - g.infooff;
  info.checksum = fletcher64(&info, sizeof info);
  return info;
}

Status validate_info(const InfoBlock& info, uint64_t infooff, uint64_t limit, ArenaGeometry* out) {
  auto bad = [](const std::string& why) { return Status(EUCLEAN, why); };
  if (std::memcmp(info.signature, kSignature, sizeof info.signature) != 0) {
    return bad("no BTT_ARENA_INFO signature");
  }
  InfoBlock copy = info;
  copy.checksum = 0;
  uint64_t sum = fletcher64(&copy, sizeof copy);
  if (sum != info.checksum) {
    return bad(str("checksum mismatch (stored %#llx, computed %#llx)",
                   (unsigned long long)info.checksum, (unsigned long long)sum));
  }
  if (!((info.version_major == 2 && info.version_minor == 0) ||
        (info.version_major == 1 && info.version_minor == 1))) {
    return bad(str("unsupported version %u.%u", info.version_major, info.version_minor));
  }
  if (info.external_lbasize != 512 && info.external_lbasize != 4096) {
    return bad(str("unsupported sector size %u", info.external_lbasize));
  }
  if (info.internal_lbasize < info.external_lbasize ||
      info.internal_lbasize % kInternalLbaAlign != 0 || info.internal_lbasize > 65536) {
    return bad(str("bad internal LBA size %u", info.internal_lbasize));
  }
  if (info.nfree == 0 || info.nfree > 65536) return bad(str("bad nfree %u", info.nfree));
  if (info.external_nlba == 0 || info.internal_nlba > kMapBlockMask + 1u ||
      uint64_t(info.external_nlba) + info.nfree != info.internal_nlba) {
    return bad(str("inconsistent block counts (external %u, internal %u, nfree %u)",
                   info.external_nlba, info.internal_nlba, info.nfree));
  }
  // Every region must lie inside the arena, in order, and the arena inside the namespace.
  if (infooff > limit) return bad("arena starts beyond the namespace");
  uint64_t room = limit - infooff;
  uint64_t data_end = info.dataoff + uint64_t(info.internal_nlba) * info.internal_lbasize;
  uint64_t map_end = info.mapoff + uint64_t(info.external_nlba) * kMapEntrySize;
  uint64_t log_end = info.logoff + uint64_t(info.nfree) * kFlogGroupSize;
  bool in_order = info.dataoff >= kPage && info.dataoff <= room && info.mapoff <= room &&
                  info.logoff <= room && info.info2off <= room && data_end <= info.mapoff &&
                  map_end <= info.logoff && log_end <= info.info2off &&
                  info.info2off + kPage <= room;
  bool is_aligned = aligned(info.dataoff, 512) && aligned(info.mapoff, 512) &&
                    aligned(info.logoff, 64) && aligned(info.info2off, 512);
  if (!in_order || !is_aligned) {
    return bad(
        str("offsets out of bounds or misaligned (data %#llx map %#llx log %#llx info2 "
            "%#llx, arena room %#llx)",
            (unsigned long long)info.dataoff, (unsigned long long)info.mapoff,
            (unsigned long long)info.logoff, (unsigned long long)info.info2off,
            (unsigned long long)room));
  }
  if (info.nextoff != 0 && (info.nextoff < info.info2off + kPage || info.nextoff >= room ||
                            !aligned(info.nextoff, kPage))) {
    return bad(str("next arena offset %#llx is out of bounds", (unsigned long long)info.nextoff));
  }
  ArenaGeometry g;
  g.infooff = infooff;
  g.size = info.nextoff != 0 ? info.nextoff : info.info2off + kPage;
  g.dataoff = infooff + info.dataoff;
  g.mapoff = infooff + info.mapoff;
  g.logoff = infooff + info.logoff;
  g.info2off = infooff + info.info2off;
  g.nextoff = info.nextoff;
  g.external_lbasize = info.external_lbasize;
  g.internal_lbasize = info.internal_lbasize;
  g.external_nlba = info.external_nlba;
  g.internal_nlba = info.internal_nlba;
  g.nfree = info.nfree;
  *out = g;
  return Status::ok();
}

int newer_entry(uint32_t seq0, uint32_t seq1) {
  if (seq0 > 3 || seq1 > 3 || seq0 == seq1) return -1;
  if (seq0 == 0) return 1;
  if (seq1 == 0) return 0;
  return next_seq(seq0) == seq1 ? 1 : 0;
}

Status detect_log_indices(const Region& region, const ArenaGeometry& g, int out[2]) {
  // As Linux's log_set_indices: padding slots are all zero; a lane still in its initial state
  // has one live entry. The first lane with two live entries fixes the slots; every other lane
  // must agree. If no lane was ever used, the new (0,1) layout is assumed.
  auto is_padding = [](const FlogEntry& e) {
    return e.lba == 0 && e.old_map == 0 && e.new_map == 0 && e.seq == 0;
  };
  int index[2] = {-1, -1};
  bool set = false;
  bool initial = true;
  for (uint32_t lane = 0; lane < g.nfree; ++lane) {
    auto group = load<FlogGroup>(region, g.logoff + uint64_t(lane) * kFlogGroupSize);
    int next = 0;
    int live = 0;
    for (int j = 0; j < 4; ++j) {
      bool pad = is_padding(group.ent[j]);
      live += pad ? 0 : 1;
      if (!set) {
        if (pad || (next == 1 && j == index[0])) continue;
        if (next >= 2) return Status(EUCLEAN, str("flog lane %u has more than two entries", lane));
        index[next++] = j;
      } else if (j == index[0] && pad) {
        return Status(EUCLEAN, str("flog lane %u has no entry in slot %d", lane, index[0]));
      } else if (j != index[0] && j != index[1] && !pad) {
        return Status(EUCLEAN, str("flog lane %u has an entry in padding slot %d", lane, j));
      }
    }
    if (!set && next == 2) set = true;
    if (!set && next == 1) index[1] = -1;  // a lane in its initial state decides nothing
    if (live > 1) initial = false;
  }
  if (initial) {
    index[0] = 0;
    index[1] = 1;
  } else if (!set) {
    return Status(EUCLEAN, "cannot tell which flog slots are in use");
  }
  if (index[0] != 0 || (index[1] != 1 && index[1] != 2)) {
    return Status(EUCLEAN, str("unknown flog slot layout (%d,%d)", index[0], index[1]));
  }
  out[0] = index[0];
  out[1] = index[1];
  return Status::ok();
}

// --- arena -----------------------------------------------------------------------------------

Arena::Arena(Btt& btt, Region& region, const ArenaGeometry& g, const int log_index[2],
             uint64_t first_lba, const InfoBlock& info, std::optional<uint64_t> intent_off)
    : btt_(btt),
      region_(region),
      g_(g),
      log_index_{log_index[0], log_index[1]},
      first_lba_(first_lba),
      info_(info),
      writeback_(region.mode() == PersistMode::writeback),
      lanes_(g.nfree),
      stripes_(std::min<uint32_t>(g.nfree, 1024)),  // lock striping, not one per lane
      rtt_(kRttSlots),
      intent_off_(intent_off) {
  // The map and the flog, one after the other up to the backup info block, are what the BTT
  // stores to through the mapping (atomic 4- and 8-byte updates).
  region_.unmap_before_flush(g_.mapoff, g_.info2off - g_.mapoff);
}

BttArenaInfo Arena::info() const {
  BttArenaInfo a;
  a.offset = g_.infooff;
  a.size = g_.size;
  a.version_major = info_.version_major;
  a.version_minor = info_.version_minor;
  a.external_lbasize = g_.external_lbasize;
  a.internal_lbasize = g_.internal_lbasize;
  a.external_nlba = g_.external_nlba;
  a.internal_nlba = g_.internal_nlba;
  a.nfree = g_.nfree;
  a.dataoff = g_.dataoff;
  a.mapoff = g_.mapoff;
  a.logoff = g_.logoff;
  a.info2off = g_.info2off;
  a.flags = info_.flags;
  a.log_index[0] = log_index_[0];
  a.log_index[1] = log_index_[1];
  std::memcpy(a.uuid.data(), info_.uuid, 16);
  std::memcpy(a.parent_uuid.data(), info_.parent_uuid, 16);
  return a;
}

Status Arena::recover(std::vector<std::string>& notes, int arena_index) {
  std::vector<uint32_t> free_blocks;
  free_blocks.reserve(g_.nfree);
  for (uint32_t i = 0; i < g_.nfree; ++i) {
    FlogEntry e[2] = {load<FlogEntry>(region_, flog_off(i, 0)),
                      load<FlogEntry>(region_, flog_off(i, 1))};
    int n = newer_entry(e[0].seq, e[1].seq);
    if (n < 0) {
      return Status(EUCLEAN, str("arena %d lane %u: impossible flog sequence pair (%u, %u)",
                                 arena_index, i, e[0].seq, e[1].seq));
    }
    const FlogEntry& cur = e[n];
    uint32_t old_block = cur.old_map & kMapBlockMask;
    uint32_t new_block = cur.new_map & kMapBlockMask;
    if (cur.lba >= g_.external_nlba || old_block >= g_.internal_nlba ||
        new_block >= g_.internal_nlba) {
      return Status(EUCLEAN, str("arena %d lane %u: flog entry out of range (lba %u, old %u, "
                                 "new %u)",
                                 arena_index, i, cur.lba, old_block, new_block));
    }
    Lane& lane = lanes_[i];
    lane.free = old_block;
    lane.sub = uint8_t(1 - n);
    lane.seq = next_seq(cur.seq);
    free_blocks.push_back(old_block);
    if (old_block == new_block) continue;  // an initial entry: no update was ever logged here
    // The flog entry is durable; if the map still shows the old block, the update stopped
    // before its commit point. Its data is durable too, so finish it.
    Lookup now = lookup_media(cur.lba);
    if (now.block == old_block && now.block != new_block) {
      if (region_.read_only()) {
        rolled_[cur.lba] = new_block | kMapNormal;
        notes.push_back(
            str("arena %d lane %u: interrupted update of LBA %u rolled forward in memory "
                "(read-only; the next writable open stores it)",
                arena_index, i, cur.lba));
        continue;
      }
      map_write(cur.lba, new_block | kMapNormal);
      notes.push_back(str("arena %d lane %u: rolled an interrupted update of LBA %u forward",
                          arena_index, i, cur.lba));
    }
  }
  std::sort(free_blocks.begin(), free_blocks.end());
  auto dup = std::adjacent_find(free_blocks.begin(), free_blocks.end());
  if (dup != free_blocks.end()) {
    return Status(EUCLEAN, str("arena %d: two lanes share free block %u", arena_index, *dup));
  }
  for (auto& slot : rtt_) slot.store(0, std::memory_order_relaxed);
  for (uint32_t i = 0; i < g_.nfree; ++i) avail_.push_back(g_.nfree - 1 - i);
  return Status::ok();
}

uint32_t Arena::map_raw(uint32_t premap) const {
  return __atomic_load_n(reinterpret_cast<const uint32_t*>(region_.at(map_off(premap))),
                         __ATOMIC_ACQUIRE);
}

Arena::Lookup Arena::lookup_media(uint32_t premap) const {
  uint32_t raw = map_raw(premap);
  if (!rolled_.empty()) [[unlikely]] {
    if (auto it = rolled_.find(premap); it != rolled_.end()) raw = it->second;
  }
  uint32_t flags = raw & kMapNormal;
  Lookup l{raw & kMapBlockMask, flags == kMapZero, flags == kMapError};
  if (flags == 0) l.block = premap;  // initial state: identity mapping
  // A block number beyond the arena (a damaged map) must never be dereferenced.
  if (l.block >= g_.internal_nlba) l = Lookup{0, false, true};
  return l;
}

Arena::Lookup Arena::lookup(uint32_t premap, Stripe& s) const {
  if (writeback_) {
    if (auto it = s.overlay.find(premap); it != s.overlay.end()) {
      return Lookup{lanes_[it->second].free, false, false};
    }
  }
  return lookup_media(premap);
}

void Arena::copy_in(uint32_t block, const iovec* iov, int iovcnt) {
  uint64_t off = data_off(block);
  uint64_t left = g_.external_lbasize;
  for (int i = 0; i < iovcnt && left > 0; ++i) {
    uint64_t n = std::min<uint64_t>(iov[i].iov_len, left);
    region_.write_nt(off, iov[i].iov_base, n);
    off += n;
    left -= n;
  }
  if (left > 0) region_.zero(off, left);
}

void Arena::flog_write(Lane& lane, uint32_t lane_index, const FlogEntry& e) {
  // Two 8-byte halves, each durable before the next: {new_map, seq} goes last, so a torn entry
  // still carries the older sequence number and recovery ignores it.
  uint64_t off = flog_off(lane_index, lane.sub);
  region_.store64(off, uint64_t(e.lba) | (uint64_t(e.old_map) << 32));
  region_.persist(off, 8);
  region_.store64(off + 8, uint64_t(e.new_map) | (uint64_t(e.seq) << 32));
  region_.persist(off + 8, 8);
}

void Arena::map_write(uint32_t premap, uint32_t entry) {
  region_.store32(map_off(premap), entry);
  region_.persist(map_off(premap), kMapEntrySize);
}

// --- read tracking ---------------------------------------------------------------------------

std::atomic<uint32_t>* Arena::rtt_claim() {
  static thread_local uint32_t hint =
      uint32_t(std::hash<std::thread::id>()(std::this_thread::get_id()));
  constexpr uint32_t kClaimed = 1;  // no kRttValid bit: blocks nobody
  for (;;) {
    for (std::size_t i = 0; i < rtt_.size(); ++i) {
      auto& slot = rtt_[(hint + i) % rtt_.size()];
      uint32_t expected = 0;
      if (slot.load(std::memory_order_relaxed) == 0 &&
          slot.compare_exchange_strong(expected, kClaimed, std::memory_order_acquire)) {
        hint = uint32_t((hint + i) % rtt_.size());
        return &slot;
      }
    }
    sched_yield();
  }
}

void Arena::rtt_wait(const uint32_t* blocks, uint32_t n) const {
  // Orders the map update that freed these blocks before the scan (a reader that publishes after
  // this point re-reads the map and sees the block is no longer mapped).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  auto busy = [&](uint32_t v) {
    return (v & kRttValid) != 0 && std::find(blocks, blocks + n, v & ~kRttValid) != blocks + n;
  };
  for (const auto& slot : rtt_) {
    for (int spins = 0; busy(slot.load(std::memory_order_acquire)); ++spins) {
      if (spins < 64) {
        _mm_pause();
      } else {
        sched_yield();
      }
    }
  }
}

Result<Arena::Lookup> Arena::track(uint32_t premap, std::atomic<uint32_t>* slot) {
  for (;;) {
    Lookup l;
    if (writeback_) {
      Stripe& s = stripe(premap);
      std::lock_guard lock(s.mu);
      l = lookup(premap, s);
    } else {
      l = lookup_media(premap);
    }
    if (l.error) return Status(EIO, str("LBA %u is marked bad (map E flag)", premap));
    if (l.zero) return l;
    slot->store(kRttValid | l.block, std::memory_order_seq_cst);
    Lookup again;
    if (writeback_) {
      Stripe& s = stripe(premap);
      std::lock_guard lock(s.mu);
      again = lookup(premap, s);
    } else {
      again = lookup_media(premap);
    }
    if (again == l) return l;
    slot->store(1, std::memory_order_release);  // moved under us: look again
  }
}

Status Arena::read(uint32_t premap, void* data) {
  reads_.fetch_add(1, std::memory_order_relaxed);
  std::atomic<uint32_t>* slot = rtt_claim();
  auto l = track(premap, slot);
  if (l && l->zero) {
    std::memset(data, 0, g_.external_lbasize);
  } else if (l) {
    std::memcpy(data, region_.at(data_off(l->block)), g_.external_lbasize);
  }
  slot->store(0, std::memory_order_release);
  return l.status();
}

Result<Btt::ReadRef> Arena::read_ref(uint32_t premap) {
  reads_.fetch_add(1, std::memory_order_relaxed);
  std::atomic<uint32_t>* slot = rtt_claim();
  auto l = track(premap, slot);
  if (!l || l->zero) {
    slot->store(0, std::memory_order_release);
    if (!l) return l.status();
    Btt::ReadRef ref;
    ref.data_ = kZeros;
    return ref;
  }
  Btt::ReadRef ref;
  ref.slot_ = slot;
  ref.data_ = region_.at(data_off(l->block));
  return ref;
}

// --- writes ----------------------------------------------------------------------------------

Status Arena::write(uint32_t premap, const iovec* iov, int iovcnt) {
  writes_.fetch_add(1, std::memory_order_relaxed);
  if (pinned_count_.load(std::memory_order_acquire) != 0) {
    Stripe& s = stripe(premap);
    std::lock_guard lock(s.mu);
    if (s.pins.count(premap) != 0) return write_in_place(premap, iov, iovcnt);
  }
  return writeback_ ? write_epoch(&premap, &iov, &iovcnt, 1) : write_direct(premap, iov, iovcnt);
}

Status Arena::write_batch(const uint32_t* premaps, uint32_t n, const std::byte* data) {
  const uint32_t ss = g_.external_lbasize;
  if (!writeback_ || pinned_count_.load(std::memory_order_acquire) != 0) {
    for (uint32_t i = 0; i < n; ++i) {
      iovec iov{const_cast<std::byte*>(data + uint64_t(i) * ss), ss};
      if (Status s = write(premaps[i], &iov, 1); !s) return s;
    }
    return Status::ok();
  }
  writes_.fetch_add(n, std::memory_order_relaxed);
  iovec iov[kMaxBatch];
  const iovec* iovs[kMaxBatch];
  int iovcnts[kMaxBatch];
  for (uint32_t i = 0; i < n; ++i) {
    iov[i] = iovec{const_cast<std::byte*>(data + uint64_t(i) * ss), ss};
    iovs[i] = &iov[i];
    iovcnts[i] = 1;
  }
  return write_epoch(premaps, iovs, iovcnts, n);
}

Status Arena::write_in_place(uint32_t premap, const iovec* iov, int iovcnt) {
  // Caller holds the stripe lock. A pinned sector is materialized: it has a real block.
  Lookup l = lookup(premap, stripe(premap));
  copy_in(l.block, iov, iovcnt);
  region_.persist(data_off(l.block), g_.external_lbasize);
  in_place_.fetch_add(1, std::memory_order_relaxed);
  return Status::ok();
}

Status Arena::write_direct(uint32_t premap, const iovec* iov, int iovcnt) {
  // A lane: the thread's usual one if free, else any free one, else wait for the usual one.
  static thread_local uint32_t home =
      uint32_t(std::hash<std::thread::id>()(std::this_thread::get_id()));
  uint32_t li = home % g_.nfree;
  bool got = false;
  for (uint32_t k = 0; k < std::min<uint32_t>(g_.nfree, 8) && !got; ++k) {
    uint32_t candidate = (home + k) % g_.nfree;
    if (lanes_[candidate].mu.try_lock()) {
      li = candidate;
      got = true;
    }
  }
  if (!got) lanes_[li].mu.lock();
  Lane& lane = lanes_[li];
  std::unique_lock lane_lock(lane.mu, std::adopt_lock);

  // 1. Data into the lane's free block with non-temporal stores. The fence that makes the first
  // flog half durable also orders these, before the second half (the sequence number) is stored.
  uint32_t block = lane.free;
  rtt_wait(&block, 1);
  copy_in(block, iov, iovcnt);

  Stripe& s = stripe(premap);
  std::lock_guard map_lock(s.mu);
  if (s.pins.count(premap) != 0) {
    // Pinned while the data was copied: it belongs in the pinned block. The free block stays free.
    Lookup pinned = lookup_media(premap);
    region_.write_nt(data_off(pinned.block), region_.at(data_off(block)), g_.external_lbasize);
    region_.fence();
    in_place_.fetch_add(1, std::memory_order_relaxed);
    return Status::ok();
  }
  Lookup old = lookup_media(premap);
  uint32_t old_map = old.block | (old.error ? kMapError : 0);
  // 2. The flog entry: from here on recovery finishes this update.
  flog_write(lane, li, FlogEntry{premap, old_map, block, lane.seq});
  // 3. The map entry: the commit point.
  map_write(premap, block | kMapNormal);
  lane.free = old.block;
  lane.sub ^= 1;
  lane.seq = next_seq(lane.seq);
  return Status::ok();
}

uint32_t Arena::take_lanes(uint32_t* out, uint32_t want) {
  std::unique_lock lock(avail_mu_);
  while (avail_.empty()) {
    if (btt_.failed()) return 0;
    // Every lane holds an uncommitted update: commit them to get their old blocks back.
    lock.unlock();
    btt_.commit({});
    lock.lock();
    ++lane_waiters_;
    avail_cv_.wait(lock, [this] { return !avail_.empty() || btt_.failed(); });
    --lane_waiters_;
  }
  const std::size_t before = avail_.size();
  const uint32_t got = uint32_t(std::min<std::size_t>(want, before));
  for (uint32_t i = 0; i < got; ++i) {
    uint32_t li = avail_.back();
    avail_.pop_back();
    lanes_[li].state = LaneState::pending;  // owned by this writer; not yet in the overlay
    lanes_[li].lba = kNoLane;
    out[i] = li;
  }
  // Half the lanes in use: commit them now, in the background, so that writers go on with the
  // other half while the device flushes instead of all waiting for it when none is left.
  bool low = before > g_.nfree / 2 && avail_.size() <= g_.nfree / 2;
  lock.unlock();
  if (low) btt_.commit_ahead();
  return got;
}

Status Arena::write_epoch(const uint32_t* premaps, const iovec* const* iovs, const int* iovcnts,
                          uint32_t n) {
  while (n > 0) {
    uint32_t lanes[kMaxBatch];
    const uint32_t got = take_lanes(lanes, std::min(n, kMaxBatch));
    if (got == 0) return Status(EIO, "BTT is read-only after a failed flush");
    // The data goes into the lanes' free blocks; nothing on media points at them until the
    // epoch commits, after a flush has made them durable.
    uint32_t blocks[kMaxBatch];
    uint64_t hashes[kMaxBatch] = {};
    for (uint32_t i = 0; i < got; ++i) blocks[i] = lanes_[lanes[i]].free;
    rtt_wait(blocks, got);
    for (uint32_t i = 0; i < got; ++i) {
      // The record's hash of the data, taken from the writer's buffer while it is in the cache
      // when one buffer holds the whole sector (reading the block back from the image cost a
      // quarter of a 1 MiB write). A writer that changes its buffer during the call may leave a
      // hash that fails at recovery: the sector then keeps its old data, still whole.
      const bool one_buffer = iovcnts[i] == 1 && iovs[i][0].iov_len >= g_.external_lbasize;
      if (intent_off_ && one_buffer) hashes[i] = xxhash64(iovs[i][0].iov_base, g_.external_lbasize);
      copy_in(blocks[i], iovs[i], iovcnts[i]);
      region_.persist(data_off(blocks[i]), g_.external_lbasize);
      if (intent_off_ && !one_buffer) {
        hashes[i] = xxhash64(region_.at(data_off(blocks[i])), g_.external_lbasize);
      }
    }
    publish(premaps, lanes, hashes, got);
    premaps += got;
    iovs += got;
    iovcnts += got;
    n -= got;
  }
  return Status::ok();
}

void Arena::publish(const uint32_t* premaps, const uint32_t* lanes, const uint64_t* hashes,
                    uint32_t n) {
  // Every stripe the updates fall in, locked in address order (no other path holds two), then
  // avail_mu_ once for all of them.
  Stripe* stripes[kMaxBatch];
  for (uint32_t i = 0; i < n; ++i) stripes[i] = &stripe(premaps[i]);
  std::sort(stripes, stripes + n);
  Stripe** stripes_end = std::unique(stripes, stripes + n);
  for (Stripe** s = stripes; s != stripes_end; ++s) (*s)->mu.lock();
  {
    std::lock_guard avail_lock(avail_mu_);
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t premap = premaps[i];
      const uint32_t li = lanes[i];
      Lane& lane = lanes_[li];
      Stripe& s = stripe(premap);
      if (s.pins.count(premap) != 0) {
        // Pinned while the data was copied: it belongs in the pinned block; the lane stays free.
        Lookup pinned = lookup(premap, s);
        region_.write(data_off(pinned.block), region_.at(data_off(lane.free)), g_.external_lbasize);
        region_.persist(data_off(pinned.block), g_.external_lbasize);
        lane.state = LaneState::available;
        avail_.push_back(li);
        if (lane_waiters_ != 0) avail_cv_.notify_one();
        in_place_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      uint32_t overtaken = s.overlay_set(premap, li);
      lane.lba = premap;
      published_.push_back(li);
      // In the mapping before the write is acknowledged: a killed process leaves it in the page
      // cache, and recovery finishes the write from it.
      if (intent_off_) {
        IntentRecord r{};
        r.magic = kIntentRecordMagic;
        r.lba = premap;
        r.block = lane.free;
        r.epoch = epoch_;
        r.seq = intent_seq_.fetch_add(1, std::memory_order_relaxed);
        r.data_hash = hashes[i];
        r.checksum = xxhash64(&r, offsetof(IntentRecord, checksum));
        region_.write(intent_record_off(li), &r, sizeof r);
        region_.persist(intent_record_off(li), sizeof r);
      }
      // Rewritten in the same epoch: the earlier lane's block was never committed, so it is
      // still that lane's free block and the lane can take another write. Its record goes after
      // ours is written, so that a kill in between still finds one of the two.
      if (overtaken != kNoLane && lanes_[overtaken].state == LaneState::pending) {
        release_pending(overtaken);
      }
    }
  }
  for (Stripe** s = stripes; s != stripes_end; ++s) (*s)->mu.unlock();
}

void Arena::release_pending(uint32_t li) {
  if (lanes_[li].held) {
    // Promised by a sync: its record must keep bringing the update back until the epoch's
    // commit has logged the newer one, so the lane keeps its block and its record till then.
    lanes_[li].state = LaneState::superseded;
    superseded_.push_back(li);
    return;
  }
  lanes_[li].state = LaneState::available;
  if (intent_off_) {
    // Its record must not bring the overtaken data back after a kill.
    region_.zero(intent_record_off(li), sizeof(IntentRecord));
    region_.persist(intent_record_off(li), sizeof(IntentRecord));
  }
  avail_.push_back(li);
  if (lane_waiters_ != 0) avail_cv_.notify_one();
}

Status Arena::mark(uint32_t premap, uint32_t flag) {
  Stripe& s = stripe(premap);
  std::unique_lock lock(s.mu);
  if (s.pins.count(premap) != 0) {
    if (flag == kMapError) return Status(EBUSY, str("LBA %u is pinned", premap));
    iovec zero{const_cast<std::byte*>(kZeros), g_.external_lbasize};
    return write_in_place(premap, &zero, 1);
  }
  std::unique_lock avail_lock(avail_mu_, std::defer_lock);
  auto pending = s.overlay.end();
  if (writeback_) {
    // The flag is one store to the map: an update that a sync promised through its intent record,
    // or one the commit in flight is logging, could still come back over it after a crash.
    avail_lock.lock();
    pending = s.overlay.find(premap);
    auto of_this_sector = [&](const std::vector<uint32_t>& lanes) {
      return std::any_of(lanes.begin(), lanes.end(),
                         [&](uint32_t li) { return lanes_[li].lba == premap; });
    };
    bool promised = (pending != s.overlay.end() && lanes_[pending->second].held) ||
                    of_this_sector(superseded_) || of_this_sector(retiring_);
    if (promised || of_this_sector(commit_lanes_)) {
      return Status(EAGAIN, str("LBA %u has an update to commit first", premap));
    }
  }
  // A flag keeps the entry's block, so this single store is safe in either crash model, in any
  // order with the others.
  Lookup l = lookup_media(premap);
  map_write(premap, l.block | flag);
  if (pending != s.overlay.end()) {
    // Newer than the uncommitted write of this sector: drop that write. Its intent record goes
    // only now, so that a kill before the flag is stored still finds the write.
    if (lanes_[pending->second].state == LaneState::pending) release_pending(pending->second);
    s.overlay_erase(pending);
  }
  return Status::ok();
}

void Arena::discard(uint32_t premap) {
  Stripe& s = stripe(premap);
  std::lock_guard lock(s.mu);
  if (s.pins.count(premap) != 0) return;
  if (writeback_) {
    std::lock_guard avail_lock(avail_mu_);
    if (s.overlay.count(premap) != 0) return;  // written again, not committed yet
  }
  // The map's own block (no lane's free block): with Z set, no read and no recovery looks at it.
  Lookup l = lookup_media(premap);
  if (l.zero) region_.discard(data_off(l.block), g_.external_lbasize);
}

// --- pins ------------------------------------------------------------------------------------

Status Arena::pin(uint32_t premap) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    {
      Stripe& s = stripe(premap);
      std::lock_guard lock(s.mu);
      Lookup l = lookup(premap, s);
      if (!l.zero && !l.error) {
        if (s.pins[premap]++ == 0) pinned_count_.fetch_add(1, std::memory_order_acq_rel);
        return Status::ok();
      }
    }
    // A zero or bad sector has no block of its own yet: give it one, full of zeros.
    iovec zero{const_cast<std::byte*>(kZeros), g_.external_lbasize};
    const iovec* zeros = &zero;
    const int one = 1;
    Status s = writeback_ ? write_epoch(&premap, &zeros, &one, 1) : write_direct(premap, &zero, 1);
    if (!s) return s;
  }
  return Status(EAGAIN, str("LBA %u keeps changing; cannot pin it", premap));
}

void Arena::unpin(uint32_t premap) {
  Stripe& s = stripe(premap);
  std::lock_guard lock(s.mu);
  auto it = s.pins.find(premap);
  if (it == s.pins.end()) return;
  if (--it->second == 0) {
    s.pins.erase(it);
    pinned_count_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

Result<uint64_t> Arena::pinned_offset(uint32_t premap) {
  Stripe& s = stripe(premap);
  std::lock_guard lock(s.mu);
  if (s.pins.count(premap) == 0) return Status(EINVAL, str("LBA %u is not pinned", premap));
  return data_off(lookup(premap, s).block);
}

// --- writeback epochs ------------------------------------------------------------------------

bool Arena::begin_commit() {
  std::lock_guard lock(avail_mu_);
  committing_epoch_ = epoch_++;
  // Only the lanes published since the last commit, not all nfree of them: a commit per fsync
  // costs what the epoch wrote. A lane whose writer has not yet published its update belongs to
  // the next epoch (its write has not returned, so this commit owes it nothing), even when the
  // lane is listed from an update that was overtaken since; one listed twice is taken once.
  for (uint32_t i : published_) {
    if (lanes_[i].state == LaneState::pending && lanes_[i].lba != kNoLane) {
      lanes_[i].state = LaneState::committing;
      commit_lanes_.push_back(i);
    }
  }
  published_.clear();
  held_through_ = 0;
  retiring_.swap(superseded_);
  return !commit_lanes_.empty() || !retiring_.empty();
}

void Arena::hold_published() {
  // Only the lanes published since the last call: one listed before was held then, and a lane
  // taken again since for a new write is listed again when that write publishes. (Walking all
  // of published_, up to half the lanes, cost every fsync several microseconds.)
  std::lock_guard lock(avail_mu_);
  for (std::size_t k = held_through_; k < published_.size(); ++k) {
    Lane& lane = lanes_[published_[k]];
    if (lane.state == LaneState::pending && lane.lba != kNoLane) lane.held = true;
  }
  held_through_ = published_.size();
}

bool Arena::retire_superseded() {
  // Each superseded update has a newer one of its sector in this commit, or stored since (a
  // trim waits for the commit, so not that), and the flush before this made that one durable:
  // its record can go. Not later than the flog: recovery would take the record, which no
  // longer matches the lane's block, for the newest update.
  if (retiring_.empty() || !intent_off_) return false;
  for (uint32_t li : retiring_) {
    region_.zero(intent_record_off(li), sizeof(IntentRecord));
    region_.persist(intent_record_off(li), sizeof(IntentRecord));
  }
  return true;
}

void Arena::free_superseded() {
  std::lock_guard lock(avail_mu_);
  for (uint32_t li : retiring_) {
    lanes_[li].state = LaneState::available;
    lanes_[li].held = false;
    avail_.push_back(li);
  }
  retiring_.clear();
  avail_cv_.notify_all();
}

void Arena::write_flog() {
  for (uint32_t li : commit_lanes_) {
    Lane& lane = lanes_[li];
    Stripe& s = stripe(lane.lba);
    std::lock_guard lock(s.mu);
    // Overtaken by a newer write (of the next epoch) it is still logged: this commit owes the
    // callers of sync the sector as it was when the commit began. (A trim waits for the commit.)
    Lookup old = lookup_media(lane.lba);
    lane.old_map = old.block | (old.error ? kMapError : 0);
    flog_write(lane, li, FlogEntry{lane.lba, lane.old_map, lane.free, lane.seq});
    std::lock_guard avail_lock(avail_mu_);
    lane.state = LaneState::committed;
  }
}

uint64_t Arena::write_map() {
  uint64_t done = 0;
  for (uint32_t li : commit_lanes_) {
    Lane& lane = lanes_[li];
    Stripe& s = stripe(lane.lba);
    std::lock_guard lock(s.mu);
    std::lock_guard avail_lock(avail_mu_);
    if (lane.state == LaneState::committed) {
      // The flog entry is durable, so recovery would make this store anyway; it reaches media
      // with the next flush, before this lane's next flog entry can.
      map_write(lane.lba, lane.free | kMapNormal);
      auto it = s.overlay.find(lane.lba);
      if (it != s.overlay.end() && it->second == li) s.overlay_erase(it);
      lane.free = lane.old_map & kMapBlockMask;
      lane.sub ^= 1;
      lane.seq = next_seq(lane.seq);
      ++done;
    }
    lane.state = LaneState::available;
    lane.held = false;
    avail_.push_back(li);
  }
  {
    std::lock_guard avail_lock(avail_mu_);  // mark() reads it
    commit_lanes_.clear();
  }
  // With the flog entries durable, this epoch's intent records are history. Not before: until
  // the flog is durable they are what recovery has of the epoch's promised updates.
  if (intent_off_) write_intent_header(committing_epoch_);
  lanes_returned();
  return done;
}

// --- intent log ------------------------------------------------------------------------------

void Arena::init_intent_log(Region& region, uint64_t intent_off, const ArenaGeometry& g) {
  uint64_t stride = intent_stride(g.nfree);
  region.zero(intent_off, stride);
  IntentHeader h{kIntentMagic, 0, g.infooff, 0};
  h.checksum = xxhash64(&h, offsetof(IntentHeader, checksum));
  region.write(intent_off, &h, sizeof h);
  region.persist(intent_off, stride);
}

void Arena::write_intent_header(uint64_t committed_epoch) {
  IntentHeader h{kIntentMagic, committed_epoch, g_.infooff, 0};
  h.checksum = xxhash64(&h, offsetof(IntentHeader, checksum));
  region_.write(*intent_off_, &h, sizeof h);
  region_.persist(*intent_off_, sizeof h);
}

Result<uint32_t> Arena::recover_intents(std::vector<std::string>& notes, int arena_index) {
  if (!intent_off_) return 0u;
  auto h = load<IntentHeader>(region_, *intent_off_);
  bool header_ok = h.magic == kIntentMagic && h.arena_offset == g_.infooff &&
                   h.checksum == xxhash64(&h, offsetof(IntentHeader, checksum));
  if (!header_ok) {
    // The records may hold synced writes: keep them. Without the header's epoch, a record is
    // still live only while its block is its lane's free block and its data hash holds, and
    // records of committed updates fail that test (superseded ones are zeroed before the flog).
    h.committed_epoch = 0;
    notes.push_back(str("arena %d: intent log header is invalid; %s", arena_index,
                        region_.read_only() ? "its records are judged without it" : "rewrote it"));
    if (!region_.read_only()) write_intent_header(0);
  }
  struct Candidate {
    uint32_t lane;
    IntentRecord rec;
  };
  std::unordered_map<uint32_t, Candidate> newest;  // premap -> newest valid record
  uint64_t max_epoch = h.committed_epoch;
  uint64_t max_seq = 0;
  for (uint32_t i = 0; i < g_.nfree; ++i) {
    auto r = load<IntentRecord>(region_, intent_record_off(i));
    if (r.magic != kIntentRecordMagic ||
        r.checksum != xxhash64(&r, offsetof(IntentRecord, checksum))) {
      continue;
    }
    max_epoch = std::max(max_epoch, r.epoch);
    max_seq = std::max(max_seq, r.seq);
    // Live only if its epoch never committed, the block is still the lane's free block, and the
    // data there is whole (after a host crash it may not have reached the device).
    if (r.epoch <= h.committed_epoch || r.lba >= g_.external_nlba || r.block != lanes_[i].free ||
        xxhash64(region_.at(data_off(r.block)), g_.external_lbasize) != r.data_hash) {
      continue;
    }
    auto it = newest.find(r.lba);
    if (it == newest.end() || it->second.rec.seq < r.seq) newest[r.lba] = Candidate{i, r};
  }
  epoch_ = max_epoch + 1;
  intent_seq_.store(max_seq + 1, std::memory_order_relaxed);
  if (newest.empty()) {
    // Records of epochs that never committed are dead now, but only for as long as each lane
    // keeps its free block. A writeback write logs a new record for its lane before that can
    // change; a direct write logs none, and its first write of a record's sector gives the
    // record's block back to the lane as its free block, with the record's data still in it:
    // the next open would take that long overwritten write back. So a direct open declares
    // every epoch so far committed.
    if (!writeback_ && !region_.read_only() && max_epoch > h.committed_epoch) {
      write_intent_header(max_epoch);
    }
    return 0u;
  }
  if (region_.read_only()) {
    // Read as the next writable open will see them (fsck -n), without changing anything.
    for (const auto& [premap, c] : newest) rolled_[premap] = c.rec.block | kMapNormal;
    notes.push_back(
        str("arena %d: %zu acknowledged writes in the intent log taken back in "
            "memory (read-only; the next writable open commits them)",
            arena_index, newest.size()));
    return uint32_t(newest.size());
  }
  if (writeback_) {
    // Each write is taken back where it is: its lane becomes pending again with its data in
    // its free block, and its record stays valid until the commit that the caller runs next
    // logs it. Nothing is copied, so a second kill during this commit still finds every record.
    std::lock_guard lock(avail_mu_);
    for (const auto& [premap, c] : newest) {
      lanes_[c.lane].state = LaneState::pending;
      lanes_[c.lane].lba = premap;
      lanes_[c.lane].held = true;  // acknowledged: nothing may drop it before it commits
      published_.push_back(c.lane);
      stripe(premap).overlay_set(premap, c.lane);
      avail_.erase(std::find(avail_.begin(), avail_.end(), c.lane));
    }
    notes.push_back(str("arena %d: took back %zu acknowledged writes from the intent log",
                        arena_index, newest.size()));
    return uint32_t(newest.size());
  }
  // Direct: each is written again, durable when written. Copy the data out first: replaying
  // one write may reuse another's block.
  std::vector<std::pair<uint32_t, std::vector<std::byte>>> replay;
  for (const auto& [premap, c] : newest) {
    const std::byte* p = region_.at(data_off(c.rec.block));
    replay.emplace_back(premap, std::vector<std::byte>(p, p + g_.external_lbasize));
  }
  for (auto& [premap, data] : replay) {
    iovec iov{data.data(), data.size()};
    Status s = write(premap, &iov, 1);
    if (!s) return s;
  }
  if (!writeback_) write_intent_header(max_epoch);  // direct: the writes are durable already
  notes.push_back(str("arena %d: finished %zu acknowledged writes from the intent log", arena_index,
                      replay.size()));
  return uint32_t(replay.size());
}

void Arena::lanes_returned() {
  std::lock_guard lock(avail_mu_);
  avail_cv_.notify_all();
}

}  // namespace vpmfs::btt
