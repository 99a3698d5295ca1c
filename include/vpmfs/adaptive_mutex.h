// A mutex that spins briefly before it sleeps (glibc's PTHREAD_MUTEX_ADAPTIVE_NP), for locks
// held a few hundred nanoseconds by threads on every CPU: the volume lock and a BTT arena's lane
// list. With std::mutex a writer that finds such a lock taken sleeps in futex at once and is
// woken by the owner's unlock, two context switches for a wait shorter than either; under 4 KiB
// random writes from two jobs these were a third of a FUSE request's futex calls. Meets the
// Lockable requirements (std::lock_guard, std::unique_lock; std::condition_variable_any).
#pragma once

#include <pthread.h>

namespace vpmfs {

class AdaptiveMutex {
 public:
  AdaptiveMutex() {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&mu_, &attr);
    pthread_mutexattr_destroy(&attr);
  }
  ~AdaptiveMutex() { pthread_mutex_destroy(&mu_); }
  AdaptiveMutex(const AdaptiveMutex&) = delete;
  AdaptiveMutex& operator=(const AdaptiveMutex&) = delete;

  void lock() { pthread_mutex_lock(&mu_); }
  bool try_lock() { return pthread_mutex_trylock(&mu_) == 0; }
  void unlock() { pthread_mutex_unlock(&mu_); }

 private:
  pthread_mutex_t mu_;
};

}  // namespace vpmfs
