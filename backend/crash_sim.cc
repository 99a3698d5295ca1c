#include "vpmfs/crash_sim.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <set>

#include "vpmfs/random.h"

namespace vpmfs {
namespace {

constexpr uint64_t kLine = 64;    // direct model: the unit a write-back covers
constexpr uint64_t kPage = 4096;  // writeback model: the unit the page cache writes
constexpr uint64_t kWord = 8;     // stores of up to 8 aligned bytes are atomic

}  // namespace

const char* to_string(CrashModel model) {
  return model == CrashModel::direct ? "direct" : "writeback";
}

// --- recording -------------------------------------------------------------------------------

CrashRecorder::CrashRecorder(Region& region) : region_(&region) {
  baseline_.assign(region.base(), region.base() + region.size());
  shadow_ = baseline_;
  region.set_observer(this);
}

CrashRecorder::~CrashRecorder() {
  detach();
}

void CrashRecorder::detach() {
  if (region_ != nullptr && region_->observer() == this) region_->set_observer(nullptr);
  region_ = nullptr;
}

std::size_t CrashRecorder::events() const {
  std::lock_guard lock(mu_);
  return events_.size();
}

void CrashRecorder::log_store(uint64_t off, const void* src, std::size_t len) {
  if (len == 0) return;
  events_.push_back({EventKind::store, false, off, len, data_.size()});
  auto bytes = static_cast<const std::byte*>(src);
  data_.insert(data_.end(), bytes, bytes + len);
  std::memcpy(shadow_.data() + off, src, len);
}

void CrashRecorder::store(std::byte* base, uint64_t off, const void* src, std::size_t len) {
  std::lock_guard lock(mu_);
  std::memcpy(base + off, src, len);
  log_store(off, src, len);
}

void CrashRecorder::capture_raw_stores(uint64_t off, std::size_t len) {
  if (region_ == nullptr) return;
  uint64_t end = std::min<uint64_t>(off + len, shadow_.size());
  uint64_t w = off & ~(kWord - 1);
  const std::byte* mem = region_->base();
  while (w < end) {
    uint64_t n = std::min(kWord, shadow_.size() - w);
    if (std::memcmp(mem + w, shadow_.data() + w, n) == 0) {
      w += n;
      continue;
    }
    uint64_t run = w;
    while (w < end) {
      n = std::min(kWord, shadow_.size() - w);
      if (std::memcmp(mem + w, shadow_.data() + w, n) == 0) break;
      w += n;
    }
    std::vector<std::byte> copy(mem + run, mem + w);
    log_store(run, copy.data(), copy.size());
  }
}

void CrashRecorder::flush(uint64_t off, std::size_t len) {
  std::lock_guard lock(mu_);
  capture_raw_stores(off, len);
  events_.push_back({EventKind::flush, false, off, len, 0});
}

void CrashRecorder::fence() {
  std::lock_guard lock(mu_);
  events_.push_back({EventKind::fence, false, 0, 0, 0});
}

void CrashRecorder::mark_dirty(uint64_t off, std::size_t len) {
  std::lock_guard lock(mu_);
  capture_raw_stores(off, len);
  events_.push_back({EventKind::mark_dirty, false, off, len, 0});
}

void CrashRecorder::device_flush_begin() {
  std::lock_guard lock(mu_);
  events_.push_back({EventKind::flush_begin, false, 0, 0, 0});
}

void CrashRecorder::device_flush_end(bool ok) {
  std::lock_guard lock(mu_);
  events_.push_back({EventKind::flush_end, ok, 0, 0, 0});
}

std::vector<std::byte> CrashRecorder::prefix_image(std::size_t cut) const {
  std::lock_guard lock(mu_);
  std::vector<std::byte> image = baseline_;
  for (std::size_t i = 0; i < std::min(cut, events_.size()); ++i) {
    const Event& e = events_[i];
    if (e.kind == EventKind::store) std::memcpy(image.data() + e.off, data_.data() + e.data, e.len);
  }
  return image;
}

std::vector<std::byte> CrashRecorder::crash_image(CrashModel model, std::size_t cut,
                                                  uint64_t seed) const {
  CrashReplay replay(*this, model);
  replay.advance_to(cut);
  return replay.image(seed);
}

// --- replay ----------------------------------------------------------------------------------

struct CrashReplay::State {
  // Part of one store that falls inside one unit (cache line or page).
  struct Piece {
    uint64_t off;
    uint64_t len;
    uint64_t data;
    uint64_t seq;           // store order
    bool captured = false;  // direct: written back, durable at the next fence
  };

  const CrashRecorder* rec;
  CrashModel model;
  uint64_t unit;
  std::size_t cut = 0;
  uint64_t store_seq = 0;
  std::vector<std::byte> durable;
  std::map<uint64_t, std::vector<Piece>> pending;  // unit index -> pieces in store order
  std::set<uint64_t> captured_units;
  std::deque<uint64_t> flush_marks;  // writeback: store_seq when each in-flight flush began

  void apply(const Piece& p, std::byte* image) const {
    std::memcpy(image + p.off, rec->data_.data() + p.data, p.len);
  }

  void on_store(const CrashRecorder::Event& e) {
    uint64_t seq = store_seq++;
    uint64_t off = e.off;
    uint64_t end = e.off + e.len;
    while (off < end) {
      uint64_t u = off / unit;
      uint64_t n = std::min(end, (u + 1) * unit) - off;
      pending[u].push_back(Piece{off, n, e.data + (off - e.off), seq});
      off += n;
    }
  }

  void on_flush(const CrashRecorder::Event& e) {
    if (e.len == 0) return;
    uint64_t first = e.off / unit;
    uint64_t last = (e.off + e.len - 1) / unit;
    for (auto it = pending.lower_bound(first); it != pending.end() && it->first <= last; ++it) {
      for (Piece& p : it->second) p.captured = true;
      captured_units.insert(it->first);
    }
  }

  void on_fence() {
    for (uint64_t u : captured_units) {
      auto it = pending.find(u);
      if (it == pending.end()) continue;
      auto& pieces = it->second;
      for (const Piece& p : pieces) {
        if (p.captured) apply(p, durable.data());
      }
      std::erase_if(pieces, [](const Piece& p) { return p.captured; });
      if (pieces.empty()) pending.erase(it);
    }
    captured_units.clear();
  }

  void on_flush_end(bool ok) {
    if (flush_marks.empty()) return;
    uint64_t mark = flush_marks.front();
    flush_marks.pop_front();
    if (!ok) return;
    // Everything stored before the flush began is on the device now.
    for (auto it = pending.begin(); it != pending.end();) {
      auto& pieces = it->second;
      for (const Piece& p : pieces) {
        if (p.seq < mark) apply(p, durable.data());
      }
      std::erase_if(pieces, [mark](const Piece& p) { return p.seq < mark; });
      it = pieces.empty() ? pending.erase(it) : std::next(it);
    }
  }

  void step(const CrashRecorder::Event& e) {
    using K = CrashRecorder::EventKind;
    switch (e.kind) {
      case K::store:
        on_store(e);
        break;
      case K::flush:
        if (model == CrashModel::direct) on_flush(e);
        break;
      case K::fence:
        if (model == CrashModel::direct) on_fence();
        break;
      case K::mark_dirty:
        break;
      case K::flush_begin:
        if (model == CrashModel::writeback) flush_marks.push_back(store_seq);
        break;
      case K::flush_end:
        if (model == CrashModel::writeback) on_flush_end(e.ok);
        break;
    }
  }
};

CrashReplay::CrashReplay(const CrashRecorder& recorder, CrashModel model)
    : state_(std::make_unique<State>()) {
  state_->rec = &recorder;
  state_->model = model;
  state_->unit = model == CrashModel::direct ? kLine : kPage;
  state_->durable = recorder.baseline_;
}

CrashReplay::~CrashReplay() = default;

void CrashReplay::advance_to(std::size_t cut) {
  std::lock_guard lock(state_->rec->mu_);
  cut = std::min(cut, state_->rec->events_.size());
  for (; state_->cut < cut; ++state_->cut) state_->step(state_->rec->events_[state_->cut]);
}

std::size_t CrashReplay::cut() const {
  return state_->cut;
}

std::size_t CrashReplay::pending_stores() const {
  std::size_t n = 0;
  for (const auto& [u, pieces] : state_->pending) n += pieces.size();
  return n;
}

std::vector<std::byte> CrashReplay::image(uint64_t seed) const {
  std::vector<std::byte> image(state_->durable.size());
  image_into(seed, image.data());
  return image;
}

void CrashReplay::image_into(uint64_t seed, std::byte* image) const {
  const State& s = *state_;
  std::lock_guard lock(s.rec->mu_);
  std::memcpy(image, s.durable.data(), s.durable.size());
  SplitMix64 rng(seed ^ (uint64_t(s.cut) * 0xD1B54A32D192ED03ull));
  // How this crash treats what is not yet durable: nothing, everything, a random selection,
  // or a prefix of each unit's stores (an eviction at some moment).
  enum Strategy { kNothing, kEverything, kSubset, kPrefix };
  auto strategy = static_cast<Strategy>(rng.below(4));
  uint64_t keep_in_8 = 1 + rng.below(7);  // subset: survival odds of keep_in_8 / 8
  for (const auto& [u, pieces] : s.pending) {
    switch (strategy) {
      case kNothing:
        break;
      case kEverything:
        for (const auto& p : pieces) s.apply(p, image);
        break;
      case kPrefix: {
        uint64_t k = rng.below(pieces.size() + 1);
        for (uint64_t i = 0; i < k; ++i) s.apply(pieces[i], image);
        break;
      }
      case kSubset:
        if (s.model == CrashModel::writeback) {
          // A page is written whole or not at all.
          if (rng.chance(keep_in_8, 8)) {
            for (const auto& p : pieces) s.apply(p, image);
          }
          break;
        }
        // Direct: every 8-byte word of every store on its own, regardless of store order.
        for (const auto& p : pieces) {
          uint64_t off = p.off;
          uint64_t end = p.off + p.len;
          while (off < end) {
            uint64_t n = std::min(end, (off / kWord + 1) * kWord) - off;
            if (rng.chance(keep_in_8, 8)) {
              std::memcpy(image + off, s.rec->data_.data() + p.data + (off - p.off), n);
            }
            off += n;
          }
        }
        break;
    }
  }
}

Status write_image_file(const std::string& path, const std::vector<std::byte>& image) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_status("cannot create " + path);
  const std::byte* p = image.data();
  std::size_t left = image.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = errno_status("cannot write " + path);
      ::close(fd);
      return s;
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::close(fd) != 0) return errno_status("cannot close " + path);
  return Status::ok();
}

}  // namespace vpmfs
