// The flush channel: an asynchronous flush-request queue on a region's image, modelled on
// virtio-pmem's request virtqueue and PAPR's H_SCM_FLUSH. A device flush is an fdatasync of the
// image, sent by the channel's own thread.
//
// Contract:
//  - submit() returns at once; the callback runs on the channel's thread, never on the caller's,
//    once a device flush that *began after the submit* has completed.
//  - Requests queued while a flush is in flight are served together by the next one (group
//    commit): one device flush per batch.
//  - A failed device flush fails every request of its batch with EIO and latches the channel
//    failed; every later request fails with EIO too. Nothing is reported durable after that.
//  - When nothing was persist()ed since the last flush began, a batch completes without a device
//    round trip (direct and unsafe regions never dirty the channel).
//  - shutdown() (and the destructor) completes every queued request before returning.
// Callbacks must not block on the channel (wait() from a callback deadlocks).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "vpmfs/status.h"

namespace vpmfs {

class Region;

class FlushChannel {
 public:
  using Callback = std::function<void(const Status&)>;

  struct Stats {
    uint64_t requests = 0;          // submitted
    uint64_t device_flushes = 0;    // fdatasync requests sent to the device
    uint64_t requests_flushed = 0;  // requests served by those device flushes
    uint64_t clean_batches = 0;     // batches served without a device flush (nothing dirty)
    uint64_t requests_clean = 0;    // requests those batches answered
    uint64_t failed_flushes = 0;
    uint64_t max_batch = 0;
    uint64_t flush_ns = 0;     // time spent in device flushes
    uint64_t callback_ns = 0;  // time spent running completion callbacks
    uint64_t gather_ns = 0;    // time spent waiting for a served batch's submitters to come back
    int last_error = 0;        // errno of the last failed flush
    std::string last_error_message;
    bool failed = false;
    double requests_per_flush() const {
      return device_flushes == 0 ? 0.0 : double(requests_flushed) / double(device_flushes);
    }
  };

  // Starts the channel thread.
  static Result<std::unique_ptr<FlushChannel>> create(Region* region);
  ~FlushChannel();
  FlushChannel(const FlushChannel&) = delete;
  FlushChannel& operator=(const FlushChannel&) = delete;

  // Queues a flush request. After shutdown() the callback runs at once with ESHUTDOWN.
  void submit(Callback callback);
  // Blocking request: returns once a device flush that began after the call has completed, with
  // its result. On an idle channel the caller sends that flush itself; otherwise the waiters of
  // one batch are woken together (one broadcast, not one wake each).
  Status wait();
  // Completes every queued request and stops the completion thread.
  void shutdown();

  bool failed() const { return failed_.load(std::memory_order_acquire); }
  Stats stats() const;

  // Test hook: the next `count` device flushes fail with `error`, as a failing host would.
  void inject_failures(int count, int error = EIO);

 private:
  explicit FlushChannel(Region* region) : region_(region) {}
  // Sends the pending batch to the device and waits for it, on the channel thread. Called and
  // returns with mu_ held; mu_ is free while the device works.
  void start_flush(std::unique_lock<std::mutex>& lock);
  // Completes the batch start_flush() sent: its result, its waiters and its callbacks; with
  // gather, then waits for its submitters to come back. Called and returns with mu_ held.
  void finish_flush(std::unique_lock<std::mutex>& lock, bool gather);
  // A request (callback or waiter) was just queued: wake the channel thread when it may start.
  void queued(std::unique_lock<std::mutex>& lock);
  // The result reported for the batch with this number (failures latch).
  Status batch_status(uint64_t batch) const;
  size_t pending_count() const { return pending_.size() + pending_waiters_; }
  // The channel thread: sends each batch's device flush and runs its callbacks.
  void run();

  Region* region_;
  std::atomic<bool> failed_{false};

  // Lock order: mu_ is never held while a callback or the region observer runs.
  mutable std::mutex mu_;              // guards everything below
  std::condition_variable work_cv_;    // wakes the channel thread: requests queued, or stopping
  std::condition_variable done_cv_;    // a batch with blocked waiters finished
  std::vector<Callback> pending_;      // queued since the in-flight flush began
  std::vector<Callback> in_flight_;    // served by the flush in flight
  size_t pending_waiters_ = 0;         // threads blocked in wait(), queued like pending_
  size_t in_flight_waiters_ = 0;       // ... and served by the flush in flight
  uint64_t started_ = 0;               // batches sent; the in-flight one has this number
  uint64_t finished_ = 0;              // batches completed
  uint64_t failed_from_ = UINT64_MAX;  // the first batch that failed; every later one fails too
  bool flushing_ = false;              // a batch is being flushed
  bool gathering_ = false;             // waiting for the last batch's submitters to come back
  size_t gather_target_ = 0;           // ... until this many requests are pending
  bool device_flush_ = false;          // the in-flight request is a real fdatasync
  int in_flight_error_ = 0;            // errno to report for the in-flight batch (injected)
  uint64_t flush_started_ns_ = 0;
  bool stopping_ = false;
  bool stopped_ = false;
  int inject_count_ = 0;
  int inject_error_ = EIO;
  Stats stats_;
  std::thread thread_;
};

}  // namespace vpmfs
