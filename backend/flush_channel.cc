#include "vpmfs/flush_channel.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include <unistd.h>

#include "vpmfs/region.h"

namespace vpmfs {
namespace {

constexpr int kFailedEarlier = -1;  // in_flight_error_: the channel had already failed

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

Result<std::unique_ptr<FlushChannel>> FlushChannel::create(Region* region) {
  auto channel = std::unique_ptr<FlushChannel>(new FlushChannel(region));
  channel->thread_ = std::thread([c = channel.get()] { c->run(); });
  return channel;
}

FlushChannel::~FlushChannel() {
  shutdown();
}

void FlushChannel::submit(Callback callback) {
  std::unique_lock lock(mu_);
  if (stopping_) {
    lock.unlock();
    callback(Status(ESHUTDOWN, "flush channel is shut down"));
    return;
  }
  pending_.push_back(std::move(callback));
  queued(lock);
}

Status FlushChannel::wait() {
  std::unique_lock lock(mu_);
  if (stopping_) return Status(ESHUTDOWN, "flush channel is shut down");
  if (!flushing_ && !gathering_ && pending_.empty()) {
    // An idle channel: the caller sends the flush itself and is done when it returns, with no
    // hand-off to the channel thread and no wake-up back (each a thread hop, ~10 us on a
    // 2-vCPU VM). Waiters queued meanwhile ride along; requests queued during the flush go to
    // the channel thread afterwards, as one batch.
    ++stats_.requests;
    ++pending_waiters_;
    start_flush(lock);
    uint64_t number = started_;
    finish_flush(lock, /*gather=*/false);
    if (pending_count() > 0 || stopping_) work_cv_.notify_one();
    return batch_status(number);
  }
  // Served by the next batch to start; its completion wakes every waiter of it at once.
  uint64_t batch = started_ + 1;
  ++pending_waiters_;
  queued(lock);
  done_cv_.wait(lock, [&] { return finished_ >= batch; });
  return batch_status(batch);
}

void FlushChannel::queued(std::unique_lock<std::mutex>&) {
  ++stats_.requests;
  // An idle channel thread starts the flush at once; a gathering one once the whole group of
  // the last batch is back.
  if (!flushing_ && (!gathering_ || pending_count() >= gather_target_)) work_cv_.notify_one();
}

Status FlushChannel::batch_status(uint64_t batch) const {
  if (batch < failed_from_) return Status::ok();
  if (batch == failed_from_) return Status(EIO, stats_.last_error_message);
  return Status(EIO, "flush channel failed earlier (" + stats_.last_error_message +
                         "); nothing is reported durable any more");
}

void FlushChannel::shutdown() {
  std::unique_lock lock(mu_);
  if (stopped_) return;
  stopping_ = true;
  stopped_ = true;
  // The channel thread serves what is queued, then sees stopping_ with nothing left and ends.
  work_cv_.notify_one();
  lock.unlock();
  thread_.join();
}

FlushChannel::Stats FlushChannel::stats() const {
  std::lock_guard lock(mu_);
  Stats s = stats_;
  s.failed = failed();
  return s;
}

void FlushChannel::inject_failures(int count, int error) {
  std::lock_guard lock(mu_);
  inject_count_ = count;
  inject_error_ = error;
}

void FlushChannel::start_flush(std::unique_lock<std::mutex>& lock) {
  flushing_ = true;
  in_flight_.swap(pending_);
  in_flight_waiters_ = pending_waiters_;
  pending_waiters_ = 0;
  ++started_;
  stats_.max_batch = std::max<uint64_t>(stats_.max_batch, in_flight_.size() + in_flight_waiters_);
  int error = 0;
  if (inject_count_ > 0) {
    --inject_count_;
    error = inject_error_;
  } else if (failed()) {
    error = kFailedEarlier;
  }
  // Every request of the batch was queued before this point, so the flush that starts now began
  // after each of their submits. When nothing was persisted since the last flush began, there
  // is nothing for the device to do.
  bool dirty = error == 0 && region_->dirty_.exchange(false, std::memory_order_acq_rel);
  device_flush_ = dirty && !region_->is_devdax();
  in_flight_error_ = error;
  bool observed = device_flush_ || error > 0;
  lock.unlock();

  RegionObserver* observer = region_->observer();
  if (observer != nullptr && observed) observer->device_flush_begin();
  flush_started_ns_ = now_ns();
  // The device flush runs here, on the channel's thread: the submitters' threads go on at once,
  // and no third thread is involved. (io_uring's IORING_OP_FSYNC, used before, always runs in
  // an io-wq worker: one more thread hop per flush, 21 us against 2.4 us for the fdatasync
  // itself of an image on tmpfs.)
  int rc = 0;
  if (device_flush_) {
    region_->unmap_for_flush();
    while ((rc = ::fdatasync(region_->fd_)) != 0 && errno == EINTR) {
    }
    if (rc != 0) rc = errno;
  }
  lock.lock();
  if (rc != 0 && in_flight_error_ == 0) in_flight_error_ = rc;
}

void FlushChannel::run() {
  std::unique_lock lock(mu_);
  for (;;) {
    // Not while a waiter flushes in its own thread (wait()): one flush at a time.
    work_cv_.wait(lock, [this] { return !flushing_ && (pending_count() > 0 || stopping_); });
    if (pending_count() == 0) return;  // stopping, and everything queued was served
    start_flush(lock);
    finish_flush(lock, /*gather=*/true);
  }
}

void FlushChannel::finish_flush(std::unique_lock<std::mutex>& lock, bool gather) {
  bool device = device_flush_;
  int error = in_flight_error_;
  uint64_t elapsed = now_ns() - flush_started_ns_;
  bool observed = device || error > 0;
  RegionObserver* observer = region_->observer();
  if (observer != nullptr && observed) {
    // Still flushing_ meanwhile: no new batch may start, and none may be answered, before the
    // observer (the crash simulator's clock) has seen this flush end. A batch with nothing left
    // to flush would otherwise tell its callers durable while the trace shows the flush that
    // covers them still in flight.
    lock.unlock();
    observer->device_flush_end(error == 0);
    lock.lock();
  }
  size_t served = in_flight_.size() + in_flight_waiters_;
  size_t waiters = in_flight_waiters_;
  uint64_t number = started_;
  in_flight_waiters_ = 0;
  if (error > 0) {
    ++stats_.failed_flushes;
    stats_.last_error = error;
    stats_.last_error_message =
        (device ? "device flush (fdatasync of " + region_->path() + ") failed: "
                : "injected device flush failure: ") +
        std::strerror(error);
    failed_.store(true, std::memory_order_release);
    failed_from_ = std::min(failed_from_, number);
  }
  Status status = batch_status(number);
  if (device) {
    ++stats_.device_flushes;
    stats_.requests_flushed += served;
    stats_.flush_ns += elapsed;
  } else if (error == 0) {
    ++stats_.clean_batches;
    stats_.requests_clean += served;
  }
  std::vector<Callback> batch;
  batch.swap(in_flight_);
  flushing_ = false;
  // Until the batch's callbacks have run and its submitters had a moment to come back, new
  // requests wait: starting a flush for the first of them would split the group in two.
  gathering_ = gather && served > 1;
  gather_target_ = served;
  finished_ = number;
  lock.unlock();
  if (waiters > 0) done_cv_.notify_all();
  uint64_t t_cb = now_ns();
  for (auto& callback : batch) callback(status);
  uint64_t t_cb_end = now_ns();

  lock.lock();
  stats_.callback_ns += t_cb_end - t_cb;
  if (gathering_) {
    uint64_t window = std::clamp<uint64_t>(elapsed / 4, 5'000, 250'000);
    work_cv_.wait_for(lock, std::chrono::nanoseconds(window),
                      [&] { return stopping_ || pending_count() >= gather_target_; });
    gathering_ = false;
    stats_.gather_ns += now_ns() - t_cb_end;
  }
}

}  // namespace vpmfs
