// CPU persistence primitives for byte-addressable persistent memory (x86-64).
//
// The cache write-back instruction is chosen once, at first use, from CPUID on the machine that
// runs the code (CLWB, else CLFLUSHOPT, else CLFLUSH), never from the build machine.
#pragma once

#include <cstddef>

namespace vpmfs::pmem {

inline constexpr std::size_t kCacheLine = 64;

enum class FlushInstruction { clwb, clflushopt, clflush };

FlushInstruction flush_instruction();
const char* to_string(FlushInstruction);

// Writes back every cache line overlapping [addr, addr+len). Not ordered until fence().
void flush(const void* addr, std::size_t len);
// Orders earlier flushes and non-temporal stores before later stores (SFENCE).
void fence();
// flush + fence: [addr, addr+len) is durable on return on real pmem.
void persist(const void* addr, std::size_t len);
// Copies with non-temporal stores where the destination is cache-line aligned and cached stores
// (flushed) elsewhere; [dst, dst+len) is durable after the next fence().
void copy_nt(void* dst, const void* src, std::size_t len);

}  // namespace vpmfs::pmem
