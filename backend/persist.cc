#include "vpmfs/persist.h"

#include <cpuid.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if !defined(__x86_64__)
#error "vpmfs persistence primitives are written for x86-64"
#endif

namespace vpmfs::pmem {
namespace {

struct CpuFeatures {
  FlushInstruction flush = FlushInstruction::clflush;
  bool avx2 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    if (ebx & (1u << 24)) {
      f.flush = FlushInstruction::clwb;
    } else if (ebx & (1u << 23)) {
      f.flush = FlushInstruction::clflushopt;
    }
    f.avx2 = (ebx & (1u << 5)) != 0;
  }
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

__attribute__((target("clwb"))) void flush_clwb(uintptr_t p, uintptr_t end) {
  for (; p < end; p += kCacheLine) _mm_clwb(reinterpret_cast<void*>(p));
}

__attribute__((target("clflushopt"))) void flush_clflushopt(uintptr_t p, uintptr_t end) {
  for (; p < end; p += kCacheLine) _mm_clflushopt(reinterpret_cast<void*>(p));
}

void flush_clflush(uintptr_t p, uintptr_t end) {
  for (; p < end; p += kCacheLine) _mm_clflush(reinterpret_cast<void*>(p));
}

__attribute__((target("avx2"))) void stream_avx2(char* dst, const char* src, std::size_t len) {
  for (; len >= 128; len -= 128, dst += 128, src += 128) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
    __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 96), d);
  }
  for (; len >= 64; len -= 64, dst += 64, src += 64) {
    for (int i = 0; i < 64; i += 32) {
      __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    }
  }
}

void stream_sse2(char* dst, const char* src, std::size_t len) {
  for (; len >= 64; len -= 64, dst += 64, src += 64) {
    for (int i = 0; i < 64; i += 16) {
      __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    }
  }
}

}  // namespace

FlushInstruction flush_instruction() {
  return features().flush;
}

const char* to_string(FlushInstruction f) {
  switch (f) {
    case FlushInstruction::clwb:
      return "clwb";
    case FlushInstruction::clflushopt:
      return "clflushopt";
    case FlushInstruction::clflush:
      return "clflush";
  }
  return "?";
}

void flush(const void* addr, std::size_t len) {
  if (len == 0) return;
  uintptr_t p = reinterpret_cast<uintptr_t>(addr) & ~(kCacheLine - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(addr) + len;
  switch (features().flush) {
    case FlushInstruction::clwb:
      flush_clwb(p, end);
      break;
    case FlushInstruction::clflushopt:
      flush_clflushopt(p, end);
      break;
    case FlushInstruction::clflush:
      flush_clflush(p, end);
      break;
  }
}

void fence() {
  _mm_sfence();
}

void persist(const void* addr, std::size_t len) {
  flush(addr, len);
  fence();
}

void copy_nt(void* dst, const void* src, std::size_t len) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  // Head up to the first cache-line boundary: cached copy, written back.
  std::size_t head =
      (kCacheLine - (reinterpret_cast<uintptr_t>(d) & (kCacheLine - 1))) & (kCacheLine - 1);
  if (head > len) head = len;
  if (head != 0) {
    std::memcpy(d, s, head);
    flush(d, head);
    d += head;
    s += head;
    len -= head;
  }
  std::size_t body = len & ~(kCacheLine - 1);
  if (features().avx2) {
    stream_avx2(d, s, body);
  } else {
    stream_sse2(d, s, body);
  }
  d += body;
  s += body;
  len -= body;
  if (len != 0) {
    std::memcpy(d, s, len);
    flush(d, len);
  }
}

}  // namespace vpmfs::pmem
