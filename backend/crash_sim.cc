#include "vpmfs/crash_sim.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
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
  switch (model) {
    case CrashModel::direct:
      return "direct";
    case CrashModel::writeback:
      return "writeback";
    case CrashModel::kill:
      return "kill";
  }
  return "?";
}

std::optional<CrashModel> parse_crash_model(std::string_view name) {
  for (CrashModel m : {CrashModel::direct, CrashModel::writeback, CrashModel::kill}) {
    if (name == to_string(m)) return m;
  }
  return std::nullopt;
}

// --- the trace file (docs/FORMAT.md, "Crash trace") ------------------------------------------

namespace {

// One event record; a store's bytes follow it, padded to a multiple of 8.
struct TraceRecord {
  uint8_t kind;
  uint8_t ok;
  uint16_t reserved0;
  uint32_t reserved1;
  uint64_t off;
  uint64_t len;
};
static_assert(sizeof(TraceRecord) == 24);

constexpr uint64_t pad8(uint64_t n) {
  return (n + 7) & ~uint64_t(7);
}

Status write_all(int fd, const void* src, std::size_t len, const std::string& path) {
  auto p = static_cast<const char*>(src);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status("cannot write " + path);
    }
    p += n;
    len -= std::size_t(n);
  }
  return Status::ok();
}

Status pwrite_all(int fd, const std::byte* src, std::size_t len, uint64_t off,
                  const std::string& path) {
  while (len > 0) {
    ssize_t n = ::pwrite(fd, src, len, off_t(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status("cannot write " + path);
    }
    src += n;
    off += uint64_t(n);
    len -= std::size_t(n);
  }
  return Status::ok();
}

bool all_zero(const std::byte* p, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

}  // namespace

// The streaming side of a recorder: event records are gathered in a buffer and written in
// large pieces; the event count in the mapped header moves with every event.
struct CrashRecorder::Stream {
  std::string path;
  int fd = -1;
  CrashTraceHeader* header = nullptr;  // the file's first page, mapped shared
  std::vector<std::byte> buf;
  Status status = Status::ok();  // the first write that failed

  ~Stream() {
    if (header != nullptr) ::munmap(header, kCrashTraceHeaderSize);
    if (fd >= 0) ::close(fd);
  }

  void put(const void* src, std::size_t len) {
    auto p = static_cast<const std::byte*>(src);
    buf.insert(buf.end(), p, p + len);
    if (buf.size() >= (4u << 20)) drain();
  }

  void drain() {
    if (status && !buf.empty()) status = write_all(fd, buf.data(), buf.size(), path);
    buf.clear();
  }

  void publish(std::size_t count) {
    __atomic_store_n(&header->events, uint64_t(count), __ATOMIC_RELEASE);
  }
};

Result<std::unique_ptr<CrashRecorder>> CrashRecorder::record_to_file(Region& region,
                                                                     const std::string& path) {
  auto s = std::make_unique<Stream>();
  s->path = path;
  s->fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (s->fd < 0) return errno_status("cannot create " + path);
  const uint64_t size = region.size();
  const uint64_t events_offset = kCrashTraceHeaderSize + ((size + 4095) & ~uint64_t(4095));
  if (::ftruncate(s->fd, off_t(events_offset)) != 0) return errno_status("cannot size " + path);
  // The baseline: zero pages stay holes of the file.
  const std::byte* base = region.base();
  for (uint64_t page = 0; page < size;) {
    uint64_t n = std::min<uint64_t>(4096, size - page);
    if (all_zero(base + page, n)) {
      page += n;
      continue;
    }
    uint64_t end = page + n;
    while (end < size && !all_zero(base + end, std::min<uint64_t>(4096, size - end))) {
      end += std::min<uint64_t>(4096, size - end);
    }
    if (Status st = pwrite_all(s->fd, base + page, end - page, kCrashTraceHeaderSize + page, path);
        !st) {
      return st;
    }
    page = end;
  }
  void* map = ::mmap(nullptr, kCrashTraceHeaderSize, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
  if (map == MAP_FAILED) return errno_status("cannot map " + path);
  s->header = static_cast<CrashTraceHeader*>(map);
  CrashTraceHeader& h = *s->header;
  std::memcpy(h.magic, kCrashTraceMagic, sizeof h.magic);
  h.version = kCrashTraceVersion;
  h.mode = uint32_t(region.mode());
  h.region_size = size;
  h.baseline_offset = kCrashTraceHeaderSize;
  h.events_offset = events_offset;
  h.events = 0;
  h.complete = 0;
  if (::lseek(s->fd, off_t(events_offset), SEEK_SET) < 0)
    return errno_status("cannot seek " + path);
  return std::unique_ptr<CrashRecorder>(new CrashRecorder(region, std::move(s)));
}

Result<CrashTrace> load_crash_trace(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_status("cannot open " + path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    Status s = errno_status("cannot stat " + path);
    ::close(fd);
    return s;
  }
  const uint64_t file_size = uint64_t(st.st_size);
  void* map =
      file_size == 0 ? MAP_FAILED : ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return Status(EINVAL, path + ": not a vpmfs crash trace (empty)");
  auto file = static_cast<const std::byte*>(map);
  auto fail = [&](const std::string& why) -> Status {
    ::munmap(map, file_size);
    return Status(EINVAL, path + ": " + why);
  };
  CrashTraceHeader h{};
  if (file_size < kCrashTraceHeaderSize) return fail("not a vpmfs crash trace (too small)");
  std::memcpy(&h, file, sizeof h);
  if (std::memcmp(h.magic, kCrashTraceMagic, sizeof h.magic) != 0) {
    return fail("not a vpmfs crash trace (no VPMFSTRC magic)");
  }
  if (h.version != kCrashTraceVersion) {
    return fail("unsupported crash trace version " + std::to_string(h.version));
  }
  if (h.mode > uint32_t(PersistMode::unsafe) || h.baseline_offset != kCrashTraceHeaderSize ||
      h.events_offset < h.baseline_offset || h.events_offset - h.baseline_offset < h.region_size ||
      h.events_offset > file_size) {
    return fail("crash trace header describes a layout beyond the file");
  }
  CrashTrace t;
  t.mode = PersistMode(h.mode);
  t.baseline.assign(file + h.baseline_offset, file + h.baseline_offset + h.region_size);
  uint64_t pos = h.events_offset;
  while (file_size - pos >= sizeof(TraceRecord)) {
    TraceRecord r;
    std::memcpy(&r, file + pos, sizeof r);
    if (r.kind > uint8_t(CrashEventKind::flush_end)) return fail("damaged event record");
    auto kind = CrashEventKind(r.kind);
    uint64_t body = kind == CrashEventKind::store ? pad8(r.len) : 0;
    if (file_size - pos - sizeof r < body) break;  // the tail a killed recorder left
    if (kind == CrashEventKind::store || kind == CrashEventKind::flush ||
        kind == CrashEventKind::mark_dirty) {
      if (r.off > h.region_size || r.len > h.region_size - r.off) {
        return fail("event record beyond the region");
      }
    }
    CrashEvent e{kind, r.ok != 0, r.off, r.len, t.data.size()};
    if (kind == CrashEventKind::store) {
      const std::byte* src = file + pos + sizeof r;
      t.data.insert(t.data.end(), src, src + r.len);
    }
    t.events.push_back(e);
    pos += sizeof r + body;
  }
  if (h.complete == 1 && t.events.size() != h.events) {
    return fail("crash trace holds " + std::to_string(t.events.size()) + " events, its header " +
                std::to_string(h.events));
  }
  ::munmap(map, file_size);
  return t;
}

// --- recording -------------------------------------------------------------------------------

CrashRecorder::CrashRecorder(Region& region) : CrashRecorder(region, nullptr) {}

CrashRecorder::CrashRecorder(Region& region, std::unique_ptr<Stream> stream)
    : region_(&region), stream_(std::move(stream)) {
  trace_.mode = region.mode();
  shadow_.assign(region.base(), region.base() + region.size());
  // A streaming recorder's baseline is in its file already.
  if (!stream_) trace_.baseline = shadow_;
  region.set_observer(this);
  // A store that another thread made between the copy and the attach is in neither the baseline
  // nor the trace, and the crash images would be ones that no crash can leave: a failure of the
  // code under test that is not one. Attaching to a region that is not quiescent is the caller's
  // bug; say so at once instead.
  std::lock_guard lock(mu_);
  if (std::memcmp(region.base(), shadow_.data(), shadow_.size()) != 0) {
    std::fprintf(stderr,
                 "vpmfs: a crash recorder was attached while another thread stored to the region; "
                 "the trace would miss that store\n");
    std::abort();
  }
}

CrashRecorder::~CrashRecorder() {
  (void)finish();
}

void CrashRecorder::detach() {
  if (region_ != nullptr && region_->observer() == this) region_->set_observer(nullptr);
  region_ = nullptr;
}

Status CrashRecorder::finish() {
  detach();
  std::lock_guard lock(mu_);
  if (!stream_) return Status::ok();
  Stream& s = *stream_;
  s.drain();
  Status result = s.status;
  if (result && ::fdatasync(s.fd) != 0) result = errno_status("cannot sync " + s.path);
  if (result) __atomic_store_n(&s.header->complete, uint64_t(1), __ATOMIC_RELEASE);
  stream_.reset();
  return result;
}

std::size_t CrashRecorder::events() const {
  std::lock_guard lock(mu_);
  return count_;
}

void CrashRecorder::log_event(const Event& e, const void* data) {
  ++count_;
  if (!stream_) {
    trace_.events.push_back(e);
    if (e.kind == EventKind::store) {
      auto bytes = static_cast<const std::byte*>(data);
      trace_.data.insert(trace_.data.end(), bytes, bytes + e.len);
    }
    return;
  }
  TraceRecord r{uint8_t(e.kind), uint8_t(e.ok), 0, 0, e.off, e.len};
  stream_->put(&r, sizeof r);
  if (e.kind == EventKind::store) {
    stream_->put(data, e.len);
    static constexpr uint8_t kZeros[8] = {};
    stream_->put(kZeros, pad8(e.len) - e.len);
  }
  stream_->publish(count_);
}

void CrashRecorder::log_store(uint64_t off, const void* src, std::size_t len) {
  if (len == 0) return;
  log_event({EventKind::store, false, off, len, trace_.data.size()}, src);
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
  log_event({EventKind::flush, false, off, len, 0});
}

void CrashRecorder::fence() {
  std::lock_guard lock(mu_);
  log_event({EventKind::fence, false, 0, 0, 0});
}

void CrashRecorder::mark_dirty(uint64_t off, std::size_t len) {
  std::lock_guard lock(mu_);
  capture_raw_stores(off, len);
  log_event({EventKind::mark_dirty, false, off, len, 0});
}

void CrashRecorder::device_flush_begin() {
  std::lock_guard lock(mu_);
  log_event({EventKind::flush_begin, false, 0, 0, 0});
}

void CrashRecorder::device_flush_end(bool ok) {
  std::lock_guard lock(mu_);
  log_event({EventKind::flush_end, ok, 0, 0, 0});
}

std::vector<std::byte> CrashRecorder::prefix_image(std::size_t cut) const {
  return crash_image(CrashModel::kill, cut, 0);
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

  const CrashTrace* trace;
  std::mutex* mu = nullptr;  // the recorder's, while it may still record
  CrashModel model;
  uint64_t unit;
  std::size_t cut = 0;
  uint64_t store_seq = 0;
  std::vector<std::byte> durable;
  std::map<uint64_t, std::vector<Piece>> pending;  // unit index -> pieces in store order
  std::set<uint64_t> captured_units;
  std::deque<uint64_t> flush_marks;  // writeback: store_seq when each in-flight flush began

  void apply(const Piece& p, std::byte* image) const {
    std::memcpy(image + p.off, trace->data.data() + p.data, p.len);
  }

  void on_store(const CrashEvent& e) {
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

  void on_flush(const CrashEvent& e) {
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

  void step(const CrashEvent& e) {
    using K = CrashEventKind;
    switch (e.kind) {
      case K::store:
        // A killed process: the page cache keeps every store it made.
        if (model == CrashModel::kill) {
          std::memcpy(durable.data() + e.off, trace->data.data() + e.data, e.len);
        } else {
          on_store(e);
        }
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
  state_->trace = &recorder.trace_;
  state_->mu = &recorder.mu_;
  state_->model = model;
  state_->unit = model == CrashModel::direct ? kLine : kPage;
  std::lock_guard lock(recorder.mu_);
  state_->durable = recorder.trace_.baseline;
}

CrashReplay::CrashReplay(const CrashTrace& trace, CrashModel model)
    : state_(std::make_unique<State>()) {
  state_->trace = &trace;
  state_->model = model;
  state_->unit = model == CrashModel::direct ? kLine : kPage;
  state_->durable = trace.baseline;
}

CrashReplay::~CrashReplay() = default;

void CrashReplay::advance_to(std::size_t cut) {
  std::unique_lock<std::mutex> lock;
  if (state_->mu != nullptr) lock = std::unique_lock(*state_->mu);
  const auto& events = state_->trace->events;
  cut = std::min(cut, events.size());
  for (; state_->cut < cut; ++state_->cut) state_->step(events[state_->cut]);
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
  std::unique_lock<std::mutex> lock;
  if (s.mu != nullptr) lock = std::unique_lock(*s.mu);
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
              std::memcpy(image + off, s.trace->data.data() + p.data + (off - p.off), n);
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
