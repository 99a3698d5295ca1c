// The checksums vpmfs writes: Fletcher64 for BTT info blocks (as the UEFI spec and Linux's
// nd_fletcher64 define it), xxHash (XXH3-64) for everything of vpmfs's own.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vpmfs {

// Fletcher64 over little-endian 32-bit words; len must be a multiple of 4.
uint64_t fletcher64(const void* data, std::size_t len);

// XXH3 64-bit hash with a seed.
uint64_t xxhash64(const void* data, std::size_t len, uint64_t seed = 0);

}  // namespace vpmfs
