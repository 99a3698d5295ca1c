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
//  prefix_image(): every store before the cut survives (a killed process; the page cache
//             keeps everything).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

enum class CrashModel { direct, writeback };

const char* to_string(CrashModel model);

class CrashRecorder final : public RegionObserver {
 public:
  enum class EventKind : uint8_t { store, flush, fence, mark_dirty, flush_begin, flush_end };
  struct Event {
    EventKind kind;
    bool ok;       // flush_end: the device flush succeeded
    uint64_t off;  // store / flush / mark_dirty
    uint64_t len;
    uint64_t data;  // store: position of the stored bytes in the data log
  };

  // Snapshots the region's current content as the crash baseline and attaches.
  explicit CrashRecorder(Region& region);
  ~CrashRecorder() override;
  CrashRecorder(const CrashRecorder&) = delete;
  CrashRecorder& operator=(const CrashRecorder&) = delete;

  // Stops recording (idempotent). Must happen before the region is used by code that should not
  // be recorded, and before the region is destroyed.
  void detach();

  // A crash point is an event count: cut = n means "crash after the first n events".
  std::size_t events() const;
  const Event& event(std::size_t i) const { return events_[i]; }
  uint64_t region_size() const { return baseline_.size(); }

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
  // Stores that bypassed Region::write (raw pointer stores, kernel reads into the mapping) are
  // found by comparing the region with the shadow when their range is flushed or persisted.
  void capture_raw_stores(uint64_t off, std::size_t len);
  void log_store(uint64_t off, const void* src, std::size_t len);

  Region* region_;
  mutable std::mutex mu_;
  std::vector<std::byte> baseline_;
  std::vector<std::byte> shadow_;  // the region as the log describes it
  std::vector<Event> events_;
  std::vector<std::byte> data_;
};

// Walks a recording forward, keeping what has certainly survived so far; images at increasing
// cuts cost only the events in between. crash_image() is a one-shot use of it.
class CrashReplay {
 public:
  CrashReplay(const CrashRecorder& recorder, CrashModel model);
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
