// Waiting for a call that answers through a callback.
#pragma once

#include <condition_variable>
#include <mutex>
#include <utility>

#include "vpmfs/status.h"

namespace vpmfs {

// Starts an asynchronous call, start(callback), and waits until it calls back with its Status,
// in this thread or another. An answer given in this thread costs no system call: a
// std::promise would (glibc's pthread_once behind promise::set_value always wakes the futex),
// and on fsync paths that answer in the calling thread this was the daemon's most frequent
// system call after read and writev.
template <typename Start>
Status wait_for_answer(Start&& start) {
  std::mutex mu;
  std::condition_variable cv;
  bool answered = false;
  Status result;
  std::forward<Start>(start)([&](const Status& s) {
    std::lock_guard lock(mu);
    result = s;
    answered = true;
    cv.notify_one();  // under the lock: the waiter cannot return (and destroy cv) before it ends
  });
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return answered; });
  return result;
}

}  // namespace vpmfs
