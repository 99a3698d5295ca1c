#include "vpmfs/flush_channel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"
#include "vpmfs/region.h"

namespace vpmfs {
namespace {

using test::TempPath;

std::unique_ptr<Region> open_writeback(const std::string& path) {
  RegionOptions o;
  o.create_size = 4 << 20;
  o.mode = PersistMode::writeback;
  auto r = Region::open(path, o);
  EXPECT_TRUE(r) << r.status().to_string();
  return r ? std::move(r.value()) : nullptr;
}

// Numbers device flushes as they begin and remembers the newest one that completed, under a
// lock that submitters also hold while they persist, so "began after" is exact.
class FlushClock : public test::FlushObserver {
 public:
  void device_flush_begin() override {
    std::unique_lock lock(mu);
    in_flight.push_back(++began);
    if (hold) {
      holding = true;
      cv.notify_all();
      cv.wait(lock, [this] { return !hold; });
      holding = false;
    }
  }
  void device_flush_end(bool) override {
    std::unique_lock lock(mu);
    if (hold_end) {
      ending = true;
      cv.notify_all();
      cv.wait(lock, [this] { return !hold_end; });
    }
    completed = in_flight.front();
    in_flight.pop_front();
  }
  // Stores and persists `value` at `off`; returns how many flushes had begun before.
  uint64_t dirty(Region& region, uint64_t off, int value) {
    std::lock_guard lock(mu);
    region.write(off, &value, sizeof value);
    region.persist(off, sizeof value);
    return began;
  }
  // Whether a flush that began after `began_before` has completed.
  bool served_since(uint64_t began_before) {
    std::lock_guard lock(mu);
    return completed > began_before;
  }

  std::mutex mu;
  std::condition_variable cv;
  uint64_t began = 0;
  std::deque<uint64_t> in_flight;
  uint64_t completed = 0;
  bool hold = false;
  bool holding = false;
  bool hold_end = false;  // device_flush_end waits, with `ending` set, until this is cleared
  bool ending = false;
};

TEST(FlushChannel, SixteenSubmittersEachServedOnceByALaterFlush) {
  TempPath path("fc16.img", "/tmp");  // a disk file, so device flushes take real time
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  FlushClock clock;
  region->set_observer(&clock);

  constexpr int kThreads = 16;
  constexpr int kRequests = 40;
  std::atomic<int> fired{0};
  std::atomic<int> early{0};
  std::atomic<int> on_submitter_thread{0};
  std::vector<std::atomic<int>> calls(kThreads * kRequests);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRequests; ++i) {
        int id = t * kRequests + i;
        uint64_t off = uint64_t(t) * 4096;
        std::promise<void> done;
        uint64_t began_before = clock.dirty(*region, off, id);
        auto me = std::this_thread::get_id();
        region->flush_channel().submit([&, id, began_before, me](const Status& s) {
          EXPECT_TRUE(s) << s.to_string();
          calls[id].fetch_add(1);
          if (!clock.served_since(began_before)) early.fetch_add(1);
          if (std::this_thread::get_id() == me) on_submitter_thread.fetch_add(1);
          fired.fetch_add(1);
          done.set_value();
        });
        done.get_future().wait();
      }
    });
  }
  for (auto& t : threads) t.join();
  region->flush_channel().shutdown();
  region->set_observer(nullptr);

  EXPECT_EQ(fired.load(), kThreads * kRequests);
  for (auto& c : calls) ASSERT_EQ(c.load(), 1);
  EXPECT_EQ(early.load(), 0) << "a callback ran before a flush that began after its submit";
  EXPECT_EQ(on_submitter_thread.load(), 0);
  auto stats = region->flush_channel().stats();
  EXPECT_EQ(stats.requests, uint64_t(kThreads * kRequests));
  EXPECT_GE(stats.device_flushes, 1u);
  EXPECT_LT(stats.device_flushes, stats.requests) << "no group commit at all";
  EXPECT_FALSE(stats.failed);
}

// Blocking waiters, mixed with callback submitters: each wait() returns only after a flush that
// began after the call, with its result, and waiters share batches with callbacks.
TEST(FlushChannel, SixteenBlockingWaitersEachServedByALaterFlush) {
  TempPath path("fcwait16.img", "/tmp");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  FlushClock clock;
  region->set_observer(&clock);

  constexpr int kThreads = 16;
  constexpr int kRequests = 40;
  std::atomic<int> early{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRequests; ++i) {
        uint64_t began_before = clock.dirty(*region, uint64_t(t) * 4096, i);
        Status s;
        if (t % 4 == 0) {  // a quarter submit with callbacks
          std::promise<Status> done;
          region->flush_channel().submit([&done](const Status& r) { done.set_value(r); });
          s = done.get_future().get();
        } else {
          s = region->flush_channel().wait();
        }
        if (!s) failed.fetch_add(1);
        if (!clock.served_since(began_before)) early.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  region->flush_channel().shutdown();
  region->set_observer(nullptr);

  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(early.load(), 0) << "a request returned before a flush that began after it";
  auto stats = region->flush_channel().stats();
  EXPECT_EQ(stats.requests, uint64_t(kThreads * kRequests));
  // A request can ride a batch that needs no device flush: its data was dirtied before a flush
  // in flight began, so that flush covers it (early == 0 above shows it waited for it).
  EXPECT_EQ(stats.requests_flushed + stats.requests_clean, stats.requests)
      << "every request rode a device flush or a batch with nothing left to flush";
  EXPECT_LT(stats.device_flushes, stats.requests) << "no group commit at all";
  EXPECT_GT(stats.max_batch, 1u);
}

TEST(FlushChannel, RequestsQueuedDuringAFlushShareTheNextOne) {
  TempPath path("fcgroup.img");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  FlushClock clock;
  region->set_observer(&clock);
  clock.hold = true;

  auto& channel = region->flush_channel();
  region->write(0, "a", 1);
  region->persist(0, 1);
  std::atomic<int> done{0};
  // An idle channel starts the flush on the submitter's thread, which the clock then holds.
  std::thread first([&] { channel.submit([&](const Status&) { done.fetch_add(1); }); });
  {
    std::unique_lock lock(clock.mu);
    clock.cv.wait(lock, [&] { return clock.holding; });
  }
  // The first flush is in flight: these ten must wait for, and share, the next one.
  region->write(1, "b", 1);
  region->persist(1, 1);
  for (int i = 0; i < 10; ++i) channel.submit([&](const Status&) { done.fetch_add(1); });
  EXPECT_EQ(done.load(), 0);
  {
    std::lock_guard lock(clock.mu);
    clock.hold = false;
    clock.cv.notify_all();
  }
  first.join();
  channel.shutdown();
  region->set_observer(nullptr);
  EXPECT_EQ(done.load(), 11);
  auto stats = channel.stats();
  EXPECT_EQ(stats.device_flushes, 2u);
  EXPECT_EQ(stats.max_batch, 10u);
  EXPECT_DOUBLE_EQ(stats.requests_per_flush(), 5.5);
}

// The crash simulator dates a flush's completion by the observer's device_flush_end. Once the
// device flush has returned but before the observer has seen it end, a new request with nothing
// left to flush must not be answered: its caller would be told durable at a point where the
// trace still shows the flush that covers it in flight.
TEST(FlushChannel, NoRequestIsAnsweredBeforeTheObserverSawItsFlushEnd) {
  TempPath path("fcend.img");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  auto& channel = region->flush_channel();
  FlushClock clock;
  region->set_observer(&clock);
  clock.hold_end = true;
  uint64_t began_before = clock.dirty(*region, 0, 1);
  std::promise<Status> first;
  channel.submit([&first](const Status& s) { first.set_value(s); });
  {
    std::unique_lock lock(clock.mu);
    clock.cv.wait(lock, [&] { return clock.ending; });
  }
  // The fdatasync of that flush has returned; nothing is dirty any more.
  std::atomic<int> answered{0};
  auto waiter = std::async(std::launch::async, [&] {
    Status s = channel.wait();
    answered.fetch_add(1);
    return std::pair{s, clock.served_since(began_before)};
  });
  while (channel.stats().requests < 2) std::this_thread::yield();
  std::promise<bool> submitted;
  channel.submit([&](const Status& s) {
    answered.fetch_add(1);
    submitted.set_value(s && clock.served_since(began_before));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(answered.load(), 0) << "answered while the flush that covers it had not ended";
  {
    std::lock_guard lock(clock.mu);
    clock.hold_end = false;
    clock.cv.notify_all();
  }
  EXPECT_TRUE(first.get_future().get());
  auto [status, served] = waiter.get();
  EXPECT_TRUE(status) << status.to_string();
  EXPECT_TRUE(served);
  EXPECT_TRUE(submitted.get_future().get());
  channel.shutdown();
  region->set_observer(nullptr);
}

TEST(FlushChannel, FailedFlushFailsEveryWaiterAndLatches) {
  TempPath path("fceio.img");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  auto& channel = region->flush_channel();
  FlushClock clock;
  region->set_observer(&clock);
  clock.hold = true;
  region->write(0, "a", 1);
  region->persist(0, 1);
  std::thread first([&] { channel.submit([](const Status&) {}); });
  {
    std::unique_lock lock(clock.mu);
    clock.cv.wait(lock, [&] { return clock.holding; });
  }
  channel.inject_failures(1, EIO);
  std::vector<std::promise<Status>> results(8);
  for (auto& p : results) channel.submit([&p](const Status& s) { p.set_value(s); });
  // Blocking waiters of the same batch fail with it.
  std::vector<std::future<Status>> waiters;
  for (int i = 0; i < 4; ++i) {
    waiters.push_back(std::async(std::launch::async, [&] { return channel.wait(); }));
  }
  while (channel.stats().requests < 13) std::this_thread::yield();
  {
    std::lock_guard lock(clock.mu);
    clock.hold = false;
    clock.cv.notify_all();
  }
  first.join();
  for (auto& p : results) {
    Status s = p.get_future().get();
    EXPECT_EQ(s.error(), EIO);
    EXPECT_NE(s.message().find("injected"), std::string::npos) << s.message();
  }
  for (auto& w : waiters) {
    Status s = w.get();
    EXPECT_EQ(s.error(), EIO);
    EXPECT_NE(s.message().find("injected"), std::string::npos) << s.message();
  }
  EXPECT_TRUE(channel.failed());
  EXPECT_TRUE(region->failed());

  // Latched: nothing is reported durable again, even with nothing dirty.
  Status later = channel.wait();
  EXPECT_EQ(later.error(), EIO);
  EXPECT_NE(later.message().find("failed earlier"), std::string::npos) << later.message();
  auto stats = channel.stats();
  EXPECT_EQ(stats.failed_flushes, 1u);
  EXPECT_EQ(stats.last_error, EIO);
  EXPECT_TRUE(stats.failed);
  region->set_observer(nullptr);
}

TEST(FlushChannel, ShutdownAnswersEveryQueuedRequest) {
  TempPath path("fcdrain.img", "/tmp");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  auto& channel = region->flush_channel();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        region->write(uint64_t(t) * 4096, &i, sizeof i);
        region->persist(uint64_t(t) * 4096, sizeof i);
        channel.submit([&](const Status& s) {
          if (s) ok.fetch_add(1);
        });
      }
    });
  }
  for (auto& t : threads) t.join();
  channel.shutdown();
  EXPECT_EQ(ok.load(), 200);

  bool late_called = false;
  channel.submit([&](const Status& s) {
    late_called = true;
    EXPECT_EQ(s.error(), ESHUTDOWN);
  });
  EXPECT_TRUE(late_called) << "a request after shutdown must be answered at once";
}

TEST(FlushChannel, WaitReturnsAfterADeviceFlush) {
  TempPath path("fcwait.img", "/tmp");
  auto region = open_writeback(path);
  ASSERT_TRUE(region);
  region->write(0, "abc", 3);
  region->persist(0, 3);
  EXPECT_TRUE(region->flush_channel().wait());
  auto stats = region->flush_channel().stats();
  EXPECT_EQ(stats.device_flushes, 1u);
  EXPECT_EQ(stats.requests_flushed, 1u);
  EXPECT_GT(stats.flush_ns, 0u);
}

}  // namespace
}  // namespace vpmfs
