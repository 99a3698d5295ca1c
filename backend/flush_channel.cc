#include "vpmfs/flush_channel.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "vpmfs/region.h"

namespace vpmfs {
namespace {

constexpr uint64_t kFlushTag = 1;
constexpr uint64_t kStopTag = 2;
constexpr int kFailedEarlier = -1;  // in_flight_error_: the channel had already failed

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

}  // namespace

Result<std::unique_ptr<FlushChannel>> FlushChannel::create(Region* region) {
  auto channel = std::unique_ptr<FlushChannel>(new FlushChannel(region));
  // One flush is in flight at a time, so a tiny ring is enough.
  int rc = io_uring_queue_init(4, &channel->ring_, 0);
  if (rc != 0) {
    return Status(-rc,
                  std::string("cannot set up the flush channel: io_uring: ") + std::strerror(-rc));
  }
  channel->thread_ = std::thread([c = channel.get()] { c->run(); });
  return channel;
}

FlushChannel::~FlushChannel() {
  shutdown();
  io_uring_queue_exit(&ring_);
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
  // Served by the next batch to start; its completion wakes every waiter of it at once.
  uint64_t batch = started_ + 1;
  ++pending_waiters_;
  queued(lock);
  done_cv_.wait(lock, [&] { return finished_ >= batch; });
  return batch_status(batch);
}

void FlushChannel::queued(std::unique_lock<std::mutex>& lock) {
  ++stats_.requests;
  // An idle channel sends the flush from the submitter's thread: no hand-off, no wake-up.
  if (!flushing_ && !gathering_) {
    start_flush(lock);
  } else if (gathering_ && pending_count() >= gather_target_) {
    idle_cv_.notify_all();  // the whole group is back
  }
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
  idle_cv_.wait(lock, [this] { return !flushing_ && pending_count() == 0; });
  // Nothing is in flight and nothing can start: the submission queue is ours.
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  io_uring_prep_nop(sqe);
  io_uring_sqe_set_data64(sqe, kStopTag);
  io_uring_submit(&ring_);
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
  starting_ = true;
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
  // is nothing for the device to do: a NOP carries the batch to the completion thread.
  bool dirty = error == 0 && region_->dirty_.exchange(false, std::memory_order_acq_rel);
  device_flush_ = dirty && !region_->is_devdax();
  in_flight_error_ = error;
  bool observed = device_flush_ || error > 0;
  lock.unlock();

  RegionObserver* observer = region_->observer();
  if (observer != nullptr && observed) observer->device_flush_begin();
  flush_started_ns_ = now_ns();
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (device_flush_) {
    io_uring_prep_fsync(sqe, region_->fd_, IORING_FSYNC_DATASYNC);
  } else {
    io_uring_prep_nop(sqe);
  }
  io_uring_sqe_set_data64(sqe, kFlushTag);
  int rc = io_uring_submit(&ring_);

  lock.lock();
  if (rc < 0 && in_flight_error_ == 0) {
    // The ring refused the request: nothing is in flight, so fail it here and now.
    in_flight_error_ = -rc;
  }
  starting_ = false;
  idle_cv_.notify_all();
  if (rc < 0) {
    // No CQE will come; hand the batch to the completion thread through a NOP instead.
    io_uring_sqe* nop = io_uring_get_sqe(&ring_);
    io_uring_prep_nop(nop);
    io_uring_sqe_set_data64(nop, kFlushTag);
    io_uring_submit(&ring_);
  }
}

void FlushChannel::run() {
  std::vector<Callback> batch;
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    int rc;
    do {
      rc = io_uring_wait_cqe(&ring_, &cqe);
    } while (rc == -EINTR);
    if (rc != 0) continue;
    uint64_t tag = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (tag == kStopTag) return;

    std::unique_lock lock(mu_);
    idle_cv_.wait(lock, [this] { return !starting_; });
    bool device = device_flush_;
    int error = in_flight_error_;
    uint64_t elapsed = now_ns() - flush_started_ns_;
    if (device && res < 0 && error == 0) error = -res;
    bool observed = device || error > 0;
    size_t served = in_flight_.size() + in_flight_waiters_;
    size_t waiters = in_flight_waiters_;
    uint64_t number = started_;  // once flushing_ is off, a submitter may start the next
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
    }
    batch.swap(in_flight_);
    flushing_ = false;
    // Until the batch's callbacks have run and its submitters had a moment to come back, new
    // requests wait: starting a flush for the first of them would split the group in two.
    gathering_ = served > 1;
    gather_target_ = served;
    lock.unlock();

    RegionObserver* observer = region_->observer();
    if (observer != nullptr && observed) observer->device_flush_end(error == 0);
    // Only now is the batch finished: no waiter may go on before the observer saw the flush end.
    lock.lock();
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
      idle_cv_.wait_for(lock, std::chrono::nanoseconds(window),
                        [&] { return stopping_ || pending_count() >= gather_target_; });
      gathering_ = false;
      stats_.gather_ns += now_ns() - t_cb_end;
    }
    if (!flushing_ && pending_count() > 0) start_flush(lock);
    idle_cv_.notify_all();
    lock.unlock();
    batch.clear();
  }
}

}  // namespace vpmfs
