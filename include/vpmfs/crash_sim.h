// The crash simulator: the test twin of a region. Attached to a Region, a CrashRecorder records
// every store, cache-line write-back, fence and device flush, and then produces, from a crash
// point and a seed, an image that a crash at that point may leave (docs/DESIGN.md, "Crash
// models"). The same (model, cut, seed) always gives the same image, so a failing crash point
// can be replayed.
//
//  direct:    what was written back and fenced survives; of every other store each 8-byte word
//             may or may not survive, independently of every other word and of store order.
//  writeback: the image at the last completed device flush, plus, for each 4 KiB page dirtied
//             since, any prefix of that page's stores (its old content, its new content, or a
//             state in between that the page cache held at some moment).
//  kill:      every store before the cut survives (a killed process; the page cache keeps
//             everything). prefix_image() is its one-shot form.
//
// A recorder keeps its trace in memory, or streams it to a trace file (docs/FORMAT.md, "Crash
// trace") that load_crash_trace() reads back for CrashReplay: the daemon's `-o record=PATH`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

enum class CrashModel { direct, writeback, kill };

const char* to_string(CrashModel model);
std::optional<CrashModel> parse_crash_model(std::string_view name);

// The values are those of the trace file's event records.
enum class CrashEventKind : uint8_t { store, flush, fence, mark_dirty, flush_begin, flush_end };
struct CrashEvent {
  CrashEventKind kind;
  bool ok;       // flush_end: the device flush succeeded
  uint64_t off;  // store / flush / mark_dirty
  uint64_t len;
  uint64_t data;  // store: position of the stored bytes in the data log
};

// What a replay needs: the region before the first event, the events, and the stored bytes.
struct CrashTrace {
  PersistMode mode = PersistMode::writeback;  // of the recorded region
  std::vector<std::byte> baseline;
  std::vector<CrashEvent> events;
  std::vector<std::byte> data;
};

// Reads a trace file written by a streaming recorder. A trace whose recorder never closed it
// (a killed daemon) is read up to its last whole event record.
Result<CrashTrace> load_crash_trace(const std::string& path);

// The trace file's first page, which the recorder keeps mapped: `events` counts the events
// recorded so far, so that another process can tell where in the trace it is (vpmfs-crash tags
// a workload's output lines with it). Read it with an acquire load.
struct CrashTraceHeader {
  char magic[8];  // "VPMFSTRC"
  uint32_t version;
  uint32_t mode;  // PersistMode of the recorded region: 0 direct, 1 writeback, 2 unsafe
  uint64_t region_size;
  uint64_t baseline_offset;
  uint64_t events_offset;
  uint64_t events;
  uint64_t complete;  // 1 once the recorder closed the trace
};
static_assert(sizeof(CrashTraceHeader) == 56);
inline constexpr char kCrashTraceMagic[8] = {'V', 'P', 'M', 'F', 'S', 'T', 'R', 'C'};
inline constexpr uint32_t kCrashTraceVersion = 1;
inline constexpr uint64_t kCrashTraceHeaderSize = 4096;

class CrashRecorder final : public RegionObserver {
 public:
  using EventKind = CrashEventKind;
  using Event = CrashEvent;

  // Snapshots the region's current content as the crash baseline and attaches. The region must
  // be quiescent meanwhile (no other thread storing to it, e.g. a BTT commit in flight): a store
  // between the snapshot and the attach would be in neither, so the constructor aborts with a
  // message when it finds one.
  explicit CrashRecorder(Region& region);
  // The same, streaming the trace to a file (created or truncated) instead of keeping it in
  // memory; crash_image() and prefix_image() of such a recorder return empty images.
  static Result<std::unique_ptr<CrashRecorder>> record_to_file(Region& region,
                                                               const std::string& path);
  ~CrashRecorder() override;
  CrashRecorder(const CrashRecorder&) = delete;
  CrashRecorder& operator=(const CrashRecorder&) = delete;

  // Stops recording (idempotent). Must happen before the region is used by code that should not
  // be recorded, and before the region is destroyed.
  void detach();
  // Detaches and, when streaming, writes the rest of the trace and marks it complete.
  Status finish();

  // A crash point is an event count: cut = n means "crash after the first n events".
  std::size_t events() const;
  const Event& event(std::size_t i) const { return trace_.events[i]; }
  uint64_t region_size() const { return shadow_.size(); }
  const CrashTrace& trace() const { return trace_; }

  std::vector<std::byte> crash_image(CrashModel model, std::size_t cut, uint64_t seed) const;
  std::vector<std::byte> prefix_image(std::size_t cut) const;

  // RegionObserver.
  void store(std::byte* base, uint64_t off, const void* src, std::size_t len) override;
  void flush(uint64_t off, std::size_t len) override;
  void fence() override;
  void mark_dirty(uint64_t off, std::size_t len) override;
  void device_flush_begin() override;
  void device_flush_end(bool ok) override;

 private:
  friend class CrashReplay;
  struct Stream;
  CrashRecorder(Region& region, std::unique_ptr<Stream> stream);
  void log_event(const Event& e, const void* data = nullptr);
  // Stores that bypassed Region::write (raw pointer stores, kernel reads into the mapping) are
  // found by comparing the region with the shadow when their range is flushed or persisted.
  void capture_raw_stores(uint64_t off, std::size_t len);
  void log_store(uint64_t off, const void* src, std::size_t len);

  Region* region_;
  mutable std::mutex mu_;
  CrashTrace trace_;               // streaming: empty (all of it is in the file)
  std::vector<std::byte> shadow_;  // the region as the log describes it
  std::unique_ptr<Stream> stream_;
  std::size_t count_ = 0;
};

// Walks a recording forward, keeping what has certainly survived so far; images at increasing
// cuts cost only the events in between. crash_image() is a one-shot use of it.
class CrashReplay {
 public:
  CrashReplay(const CrashRecorder& recorder, CrashModel model);
  // A replay of a loaded trace, which must outlive it.
  CrashReplay(const CrashTrace& trace, CrashModel model);
  ~CrashReplay();
  // Applies events up to `cut`; cuts must not decrease.
  void advance_to(std::size_t cut);
  std::size_t cut() const;
  // The image for this seed at the current cut.
  std::vector<std::byte> image(uint64_t seed) const;
  // The same, written over dst (region_size() bytes), e.g. straight into another region.
  void image_into(uint64_t seed, std::byte* dst) const;
  // Count of stores that may or may not survive at the current cut.
  std::size_t pending_stores() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Writes an image to a file (created or truncated), for a Region to open.
Status write_image_file(const std::string& path, const std::vector<std::byte>& image);

}  // namespace vpmfs
