#include "vpmfs/btt.h"

#include <sys/random.h>

#include <cstring>

#include "btt/arena.h"
#include "vpmfs/checksum.h"
#include "vpmfs/completion.h"

namespace vpmfs {

using namespace btt;

uint64_t Btt::intent_log_size(uint64_t namespace_size, uint32_t nfree) {
  return plan_namespace(0, namespace_size, 4096, nfree).size() * intent_stride(nfree);
}

// --- format ----------------------------------------------------------------------------------

Status Btt::format(Region& region, const BttFormatOptions& o) {
  if (region.read_only()) return Status(EROFS, "image is read-only");
  if (o.sector_size != 512 && o.sector_size != 4096) {
    return Status(EINVAL, "sector size must be 512 or 4096, not " + std::to_string(o.sector_size));
  }
  if (o.nfree == 0 || o.nfree > 65536) return Status(EINVAL, "nfree must be 1..65536");
  bool v11 = o.version_major == 1 && o.version_minor == 1;
  if (!v11 && !(o.version_major == 2 && o.version_minor == 0)) {
    return Status(EINVAL, "BTT version must be 2.0 or 1.1");
  }
  if (o.padded_flog && !v11) return Status(EINVAL, "the padded flog layout exists only in v1.1");
  auto ns = namespace_of(region, o.offset, o.size);
  if (!ns) return ns.status();
  uint64_t first = ns->offset + (v11 ? kV11Offset : 0);
  auto arenas = plan_namespace(first, ns->end, o.sector_size, o.nfree);
  if (arenas.empty()) {
    return Status(ENOSPC, "a BTT needs at least 16 MiB for its first arena; the namespace has " +
                              std::to_string(ns->end - ns->offset) + " bytes");
  }
  if (o.intent_log) {
    uint64_t need = arenas.size() * intent_stride(o.nfree);
    uint64_t at = *o.intent_log;
    if (at % kPage != 0 || at + need > region.size() || (at < ns->end && at + need > ns->offset)) {
      return Status(EINVAL,
                    "the intent log (" + std::to_string(need) +
                        " bytes) must be 4 KiB aligned, inside the image and outside the BTT");
    }
    for (std::size_t i = 0; i < arenas.size(); ++i) {
      Arena::init_intent_log(region, at + i * intent_stride(o.nfree), arenas[i]);
    }
  }
  Uuid uuid = o.uuid;
  if (uuid == Uuid{} && getrandom(uuid.data(), uuid.size(), 0) != ssize_t(uuid.size())) {
    return errno_status("cannot make a random uuid");
  }
  uint64_t total = 0;
  for (const auto& g : arenas) total += g.logoff - g.mapoff;
  uint64_t done = 0;
  const int slot1 = o.padded_flog ? 2 : 1;
  for (const auto& g : arenas) {
    // Zero map entries are the initial identity mapping. A fresh sparse image is zero already;
    // skipping zero pages keeps it sparse.
    static const std::byte zeros[kPage] = {};
    for (uint64_t off = g.mapoff; off < g.logoff; off += kPage) {
      uint64_t n = std::min<uint64_t>(kPage, g.logoff - off);
      if (std::memcmp(region.at(off), zeros, n) != 0) {
        region.zero(off, n);
        region.persist(off, n);
      }
      done += n;
      if (o.progress && (done % (64u << 20) == 0 || done == total)) o.progress(done, total);
    }
    // Each lane starts with one entry naming its free block, one of the nfree blocks past the
    // external ones; the other slots are zero padding.
    region.zero(g.logoff, g.info2off - g.logoff);
    for (uint32_t lane = 0; lane < g.nfree; ++lane) {
      uint64_t group = g.logoff + uint64_t(lane) * kFlogGroupSize;
      FlogEntry e{lane, g.external_nlba + lane, g.external_nlba + lane, 1};
      region.write(group, &e, sizeof e);
      if (o.padded_flog) {
        // The old padded layout shows only once a lane holds two entries: give it a second,
        // equivalent one in slot 2.
        e.seq = 2;
        region.write(group + slot1 * kFlogEntrySize, &e, sizeof e);
      }
    }
    region.persist(g.logoff, g.info2off - g.logoff);
    // Backup first, as Linux does: a torn format leaves no valid primary.
    InfoBlock info = make_info(g, o, uuid);
    region.write(g.info2off, &info, sizeof info);
    region.persist(g.info2off, sizeof info);
    region.write(g.infooff, &info, sizeof info);
    region.persist(g.infooff, sizeof info);
  }
  return region.flush_channel().wait();
}

// --- open ------------------------------------------------------------------------------------

Result<std::unique_ptr<Btt>> Btt::open(Region& region, const BttOpenOptions& o) {
  auto ns = namespace_of(region, o.offset, o.size);
  if (!ns) return ns.status();
  auto btt = std::unique_ptr<Btt>(new Btt());
  btt->region_ = &region;
  btt->intents_ = o.intent_log.has_value();

  std::vector<std::string> notes;
  uint64_t lba = 0;
  Status walked = walk_arenas(
      region, *ns, notes, !region.read_only(), [&](int index, const FoundInfo& found) -> Status {
        const ArenaGeometry& g = found.geometry;
        if (index == 0) {
          btt->sector_size_ = g.external_lbasize;
        } else if (g.external_lbasize != btt->sector_size_) {
          return Status(EUCLEAN, "arena " + std::to_string(index) + " has sector size " +
                                     std::to_string(g.external_lbasize) + ", arena 0 has " +
                                     std::to_string(btt->sector_size_));
        }
        int log_index[2];
        Status s = detect_log_indices(region, g, log_index);
        if (!s) return Status(s.error(), "arena " + std::to_string(index) + ": " + s.message());
        std::optional<uint64_t> intent_off;
        if (o.intent_log) intent_off = *o.intent_log + uint64_t(index) * intent_stride(g.nfree);
        if (intent_off &&
            (*intent_off + intent_stride(g.nfree) > region.size() ||
             (*intent_off<ns->end&& * intent_off + intent_stride(g.nfree)> ns->offset))) {
          return Status(EINVAL, "the intent log overlaps the BTT or the end of the image");
        }
        auto arena =
            std::make_unique<Arena>(*btt, region, g, log_index, lba, found.info, intent_off);
        s = arena->recover(notes, index);
        if (!s) return s;
        lba += g.external_nlba;
        btt->arenas_.push_back(std::move(arena));
        return Status::ok();
      });
  if (!walked) {
    if (walked.error() == EUCLEAN) return Status(EUCLEAN, walked.message() + "; run fsck");
    return walked;
  }
  btt->sector_count_ = lba;
  // Acknowledged writes whose epoch never committed (the process was killed) go back in.
  uint32_t replayed = 0;
  for (std::size_t i = 0; i < btt->arenas_.size(); ++i) {
    auto n = btt->arenas_[i]->recover_intents(notes, int(i));
    if (!n) return n.status();
    replayed += *n;
  }
  if (replayed > 0 && region.mode() == PersistMode::writeback && !region.read_only()) {
    Status s = btt->commit_wait();
    if (!s) return s;
  }
  btt->notes_ = std::move(notes);
  if (region.mode() == PersistMode::writeback && !region.read_only()) {
    // Roll-forwards and restored info blocks must be durable before new writes build on them.
    Status s = region.flush_channel().wait();
    if (!s) return s;
  }
  return btt;
}

Btt::~Btt() {
  if (region_ == nullptr) return;
  if (region_->mode() == PersistMode::writeback && !failed()) (void)commit_wait();
  std::unique_lock lock(commit_mu_);
  commit_cv_.wait(lock, [this] { return !committing_; });
}

std::vector<BttArenaInfo> Btt::arenas() const {
  std::vector<BttArenaInfo> out;
  for (const auto& a : arenas_) out.push_back(a->info());
  return out;
}

Result<Btt::Locate> Btt::locate(uint64_t lba) const {
  for (const auto& a : arenas_) {
    if (lba >= a->first_lba() && lba - a->first_lba() < a->external_nlba()) {
      return Locate{a.get(), uint32_t(lba - a->first_lba())};
    }
  }
  return Status(EINVAL, "LBA " + std::to_string(lba) + " is beyond the " +
                            std::to_string(sector_count_) + " sectors of the BTT");
}

// --- I/O -------------------------------------------------------------------------------------

Status Btt::write(uint64_t lba, const void* data) {
  iovec iov{const_cast<void*>(data), sector_size_};
  return writev(lba, &iov, 1);
}

Status Btt::writev(uint64_t lba, const iovec* iov, int iovcnt) {
  if (region_->read_only()) return Status(EROFS, "image is read-only");
  if (failed()) return Status(EIO, "BTT is read-only after a failed flush");
  auto at = locate(lba);
  if (!at) return at.status();
  return at->arena->write(at->premap, iov, iovcnt);
}

Status Btt::write_sectors(const uint64_t* lbas, std::size_t n, const std::byte* data) {
  if (n == 0) return Status::ok();
  if (region_->read_only()) return Status(EROFS, "image is read-only");
  if (failed()) return Status(EIO, "BTT is read-only after a failed flush");
  while (n > 0) {
    // A run of up to kMaxBatch sectors in one arena.
    auto at = locate(lbas[0]);
    if (!at) return at.status();
    uint32_t premaps[Arena::kMaxBatch];
    uint32_t m = 0;
    do {
      premaps[m] = uint32_t(lbas[m] - at->arena->first_lba());
      ++m;
    } while (m < n && m < Arena::kMaxBatch && lbas[m] >= at->arena->first_lba() &&
             lbas[m] - at->arena->first_lba() < at->arena->external_nlba());
    if (Status s = at->arena->write_batch(premaps, m, data); !s) return s;
    lbas += m;
    n -= m;
    data += std::size_t(m) * sector_size_;
  }
  return Status::ok();
}

Status Btt::read(uint64_t lba, void* data) {
  auto at = locate(lba);
  if (!at) return at.status();
  return at->arena->read(at->premap, data);
}

Result<Btt::ReadRef> Btt::read_ref(uint64_t lba) {
  auto at = locate(lba);
  if (!at) return at.status();
  return at->arena->read_ref(at->premap);
}

Status Btt::trim(uint64_t lba) {
  return mark(lba, kMapZero);
}

Status Btt::discard(uint64_t lba) {
  if (Status s = trim(lba); !s) return s;
  auto at = locate(lba);
  if (!at) return at.status();
  at->arena->discard(at->premap);
  return Status::ok();
}

Status Btt::set_error(uint64_t lba) {
  return mark(lba, kMapError);
}

Status Btt::mark(uint64_t lba, uint32_t flag) {
  if (region_->read_only()) return Status(EROFS, "image is read-only");
  auto at = locate(lba);
  if (!at) return at.status();
  for (;;) {
    Status s = at->arena->mark(at->premap, flag);
    if (s.error() != EAGAIN) return s;
    // An update of the sector that must not come back over the flag: commit it first.
    if (Status c = commit_wait(); !c) return c;
  }
}

Btt::ReadRef::ReadRef(ReadRef&& other) noexcept
    : slot_(std::exchange(other.slot_, nullptr)), data_(std::exchange(other.data_, nullptr)) {}

Btt::ReadRef& Btt::ReadRef::operator=(ReadRef&& other) noexcept {
  if (this != &other) {
    if (slot_ != nullptr) slot_->store(0, std::memory_order_release);
    slot_ = std::exchange(other.slot_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
  }
  return *this;
}

Btt::ReadRef::~ReadRef() {
  if (slot_ != nullptr) slot_->store(0, std::memory_order_release);
}

// --- pins ------------------------------------------------------------------------------------

Status Btt::pin(uint64_t lba, uint64_t count) {
  if (region_->read_only()) return Status(EROFS, "image is read-only");
  for (uint64_t i = 0; i < count; ++i) {
    auto at = locate(lba + i);
    Status s = at ? at->arena->pin(at->premap) : at.status();
    if (!s) {
      (void)unpin(lba, i);
      return s;
    }
  }
  return Status::ok();
}

Status Btt::unpin(uint64_t lba, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    auto at = locate(lba + i);
    if (!at) return at.status();
    at->arena->unpin(at->premap);
  }
  return Status::ok();
}

Result<uint64_t> Btt::pinned_offset(uint64_t lba) {
  auto at = locate(lba);
  if (!at) return at.status();
  return at->arena->pinned_offset(at->premap);
}

Btt::Stats Btt::stats() const {
  Stats s;
  for (const auto& a : arenas_) {
    s.writes += a->writes();
    s.reads += a->reads();
    s.in_place_writes += a->in_place_writes();
  }
  s.epochs = epochs_.load(std::memory_order_relaxed);
  s.epoch_sectors = epoch_sectors_.load(std::memory_order_relaxed);
  return s;
}

// --- durability ------------------------------------------------------------------------------

void Btt::sync(Callback done) {
  if (promise_by_intents()) return flush_intents(std::move(done), /*in_this_thread=*/false);
  commit(std::move(done));
}

void Btt::sync_or_join(Callback done) {
  if (promise_by_intents()) return flush_intents(std::move(done), /*in_this_thread=*/true);
  commit_or_join(std::move(done));
}

Status Btt::sync_wait() {
  return wait_for_answer([this](auto done) { sync_or_join(std::move(done)); });
}

bool Btt::promise_by_intents() const {
  return intents_ && region_->mode() == PersistMode::writeback && !region_->read_only();
}

void Btt::flush_intents(Callback done, bool in_this_thread) {
  if (failed()) return done(Status(EIO, "BTT is read-only after a failed flush"));
  // Every write that returned has its data in its lane's free block and its intent record
  // beside it, both stored; one flush makes both durable, and recovery takes the write back
  // from them. The lanes stay out of reuse until their epoch commits (hold_published).
  for (auto& a : arenas_) a->hold_published();
  auto answer = [this, done = std::move(done)](const Status& s) {
    if (!s) {
      // Nobody knows what reached the device: as after a failed commit.
      std::lock_guard lock(commit_mu_);
      failed_.store(true, std::memory_order_release);
      for (auto& a : arenas_) a->lanes_returned();
    }
    done(s);
  };
  FlushChannel& channel = region_->flush_channel();
  if (in_this_thread) return answer(channel.wait());
  channel.submit(std::move(answer));
}

void Btt::commit(Callback done) {
  if (region_->mode() != PersistMode::writeback || region_->read_only()) {
    // Every write is durable when it returns (or never will be): the channel answers at once.
    region_->flush_channel().submit([done = std::move(done)](const Status& s) {
      if (done) done(s);
    });
    return;
  }
  std::unique_lock lock(commit_mu_);
  if (failed()) {
    lock.unlock();
    if (done) done(Status(EIO, "BTT is read-only after a failed flush"));
    return;
  }
  // Even without a callback the request counts: it asks for a commit after the one in flight.
  waiting_.push_back(done ? std::move(done) : [](const Status&) {});
  // A commit in flight may have begun before this call's writes: they wait for the next one.
  if (!committing_) start_commit(lock);
}

void Btt::commit_or_join(Callback done) {
  if (region_->mode() != PersistMode::writeback || region_->read_only()) {
    done(region_->flush_channel().wait());
    return;
  }
  std::unique_lock lock(commit_mu_);
  if (failed()) {
    lock.unlock();
    done(Status(EIO, "BTT is read-only after a failed flush"));
    return;
  }
  if (committing_) {
    // A commit in flight may have begun before this call's writes: ride the next one.
    waiting_.push_back(std::move(done));
    return;
  }
  // No commit in flight: run the epoch's steps in this thread (the flush channel's wait() sends
  // each flush from here too), so a commit costs no hand-off between threads. Callbacks queued
  // meanwhile by commit() ride along and run here.
  committing_ = true;
  committed_.swap(waiting_);
  committed_.push_back(std::move(done));
  lock.unlock();
  for (auto& a : arenas_) a->begin_commit();
  FlushChannel& channel = region_->flush_channel();
  Status s = channel.wait();
  if (s && retire_superseded()) s = channel.wait();
  if (s) {
    for (auto& a : arenas_) a->free_superseded();
    for (auto& a : arenas_) a->write_flog();
    s = channel.wait();
  }
  if (s) {
    apply_map();
  }
  finish_commit(s);
}

Status Btt::commit_wait() {
  return wait_for_answer([this](auto done) { commit_or_join(std::move(done)); });
}

bool Btt::retire_superseded() {
  bool any = false;
  for (auto& a : arenas_) any |= a->retire_superseded();
  return any;
}

void Btt::commit_ahead() {
  std::unique_lock lock(commit_mu_);
  if (committing_ || !waiting_.empty() || failed()) return;
  waiting_.push_back([](const Status&) {});
  start_commit(lock);
}

void Btt::start_commit(std::unique_lock<std::mutex>& lock) {
  committing_ = true;
  committed_.swap(waiting_);
  lock.unlock();
  for (auto& a : arenas_) a->begin_commit();
  // Epoch step 1: the data of every sector in the commit (and of in-place writes) reaches the
  // device before anything that points at it is written.
  region_->flush_channel().submit([this](const Status& s) { commit_flog(s); });
}

void Btt::commit_flog(const Status& flushed) {
  if (!flushed) return finish_commit(flushed);
  // Superseded updates' records go before the flog (Arena::retire_superseded), with a flush
  // between: then their lanes are free again.
  if (retire_superseded()) {
    region_->flush_channel().submit([this](const Status& s) {
      if (!s) return finish_commit(s);
      commit_flog_now();
    });
    return;
  }
  commit_flog_now();
}

void Btt::commit_flog_now() {
  for (auto& a : arenas_) a->free_superseded();
  // Step 2: flog entries after the data is durable; the flush after them makes each update
  // one that recovery completes.
  for (auto& a : arenas_) a->write_flog();
  region_->flush_channel().submit([this](const Status& s) { commit_map(s); });
}

void Btt::commit_map(const Status& flushed) {
  if (!flushed) return finish_commit(flushed);
  apply_map();
  finish_commit(Status::ok());
}

void Btt::apply_map() {
  // Step 3: map entries, and the old blocks go back to their lanes as free blocks. The map
  // stores reach media with the next epoch's first flush, before any lane's next flog entry.
  uint64_t sectors = 0;
  for (auto& a : arenas_) sectors += a->write_map();
  epochs_.fetch_add(1, std::memory_order_relaxed);
  epoch_sectors_.fetch_add(sectors, std::memory_order_relaxed);
}

void Btt::finish_commit(const Status& status) {
  std::vector<Callback> done;
  std::unique_lock lock(commit_mu_);
  if (!status) {
    failed_.store(true, std::memory_order_release);
    for (auto& a : arenas_) a->lanes_returned();  // wake writers waiting for lanes: they fail
    for (auto& cb : waiting_) committed_.push_back(std::move(cb));
    waiting_.clear();
  }
  done.swap(committed_);
  committing_ = false;
  if (!waiting_.empty()) {
    start_commit(lock);  // unlocks
  } else {
    commit_cv_.notify_all();
    lock.unlock();
  }
  for (auto& cb : done) cb(status);
}

}  // namespace vpmfs
