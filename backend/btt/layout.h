// The BTT on-media format (UEFI 2.7 section 6.3, as Linux drivers/nvdimm/btt.h and PMDK
// implement it). Plain little-endian PODs, field by field; docs/FORMAT.md has the byte tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "vpmfs/region.h"

namespace vpmfs::btt {

inline constexpr char kSignature[16] = "BTT_ARENA_INFO";
inline constexpr uint64_t kPage = 4096;              // info block size and layout alignment
inline constexpr uint64_t kArenaMin = 16ull << 20;   // 16 MiB
inline constexpr uint64_t kArenaMax = 512ull << 30;  // 512 GiB
inline constexpr uint32_t kDefaultNfree = 256;
inline constexpr uint32_t kInternalLbaAlign = 64;  // internal LBA size is a multiple of this
inline constexpr uint32_t kMapEntrySize = 4;
inline constexpr uint32_t kFlogGroupSize = 64;
inline constexpr uint32_t kFlogEntrySize = 16;
inline constexpr uint64_t kV11Offset = 4096;  // v1.1: first info block 4 KiB into the namespace

// Map entry bits. Both flags set is a normal entry; both clear is the initial identity mapping
// (postmap = premap); Z alone reads as zeros; E alone reads fail with EIO.
inline constexpr uint32_t kMapZero = 1u << 31;
inline constexpr uint32_t kMapError = 1u << 30;
inline constexpr uint32_t kMapNormal = kMapZero | kMapError;
inline constexpr uint32_t kMapBlockMask = ~kMapNormal;

inline constexpr uint32_t kInfoFlagError = 0x1;

struct InfoBlock {
  char signature[16];         // "BTT_ARENA_INFO\0\0"
  uint8_t uuid[16];           // this BTT
  uint8_t parent_uuid[16];    // the namespace it lives in (zero: none)
  uint32_t flags;             // kInfoFlagError: the arena is in an error state
  uint16_t version_major;     // 2 (UEFI 2.7) or 1 (v1.1)
  uint16_t version_minor;     // 0 or 1
  uint32_t external_lbasize;  // sector size seen by users: 512 or 4096
  uint32_t external_nlba;     // sectors exported by this arena
  uint32_t internal_lbasize;  // external_lbasize rounded up to 64
  uint32_t internal_nlba;     // data blocks: external_nlba + nfree
  uint32_t nfree;             // free blocks = flog lanes
  uint32_t infosize;          // 4096
  uint64_t nextoff;           // next arena, relative to this one; 0 for the last
  uint64_t dataoff;           // data area, relative to this arena
  uint64_t mapoff;            // map
  uint64_t logoff;            // flog
  uint64_t info2off;          // backup info block
  uint8_t padding[3968];
  uint64_t checksum;  // Fletcher64 of the block with this field zero
};
static_assert(sizeof(InfoBlock) == 4096);
static_assert(offsetof(InfoBlock, flags) == 48);
static_assert(offsetof(InfoBlock, external_lbasize) == 56);
static_assert(offsetof(InfoBlock, nextoff) == 80);
static_assert(offsetof(InfoBlock, info2off) == 112);
static_assert(offsetof(InfoBlock, checksum) == 4088);

struct FlogEntry {
  uint32_t lba;      // premap LBA the update was for
  uint32_t old_map;  // its postmap block before: the lane's free block once the update is done
  uint32_t new_map;  // its postmap block after
  uint32_t seq;      // 1, 2, 3, 1, ... (0: never written); the newer of a lane's two wins
};
static_assert(sizeof(FlogEntry) == 16);

// One lane: two live entries at slots (0,1), or (0,2) in the old padded v1.1 layout; the other
// slots are zero padding.
struct FlogGroup {
  FlogEntry ent[4];
};
static_assert(sizeof(FlogGroup) == 64);

inline uint32_t next_seq(uint32_t seq) {
  static constexpr uint32_t kNext[4] = {0, 2, 3, 1};
  return kNext[seq & 3];
}

// The intent log (vpmfs's own, outside the BTT namespace; writeback regions only). Per arena one
// stride: a 4 KiB header page, then one 64-byte record per lane. A record says "this lane's free
// block holds new data for this LBA, not yet committed"; it lets recovery finish writes that
// were acknowledged but whose epoch never committed (a killed process), and its data hash tells
// whole data from a torn block after a host crash.
inline constexpr uint64_t kIntentMagic = 0x544E45544E494D50ull;  // "PMINTENT"
inline constexpr uint32_t kIntentRecordMagic = 0x52544E49;       // "INTR"

struct IntentHeader {
  uint64_t magic;            // kIntentMagic
  uint64_t committed_epoch;  // records of this epoch or older are history
  uint64_t arena_offset;     // infooff of the arena this stride belongs to
  uint64_t checksum;         // xxhash64 of the 24 bytes above
};
static_assert(sizeof(IntentHeader) == 32);

struct IntentRecord {
  uint32_t magic;      // kIntentRecordMagic
  uint32_t lba;        // premap LBA written
  uint32_t block;      // the lane's free block holding the data
  uint32_t flags;      // 0
  uint64_t epoch;      // epoch the write belongs to
  uint64_t seq;        // order of writes within the arena: the highest wins
  uint64_t data_hash;  // xxhash64 of the sector's data
  uint8_t reserved[16];
  uint64_t checksum;  // xxhash64 of the 56 bytes above
};
static_assert(sizeof(IntentRecord) == 64);

inline uint64_t intent_stride(uint32_t nfree) {
  return kPage + (uint64_t(nfree) * sizeof(IntentRecord) + kPage - 1) / kPage * kPage;
}

// Offsets of one arena, absolute in the region.
struct ArenaGeometry {
  uint64_t infooff = 0;
  uint64_t size = 0;
  uint64_t dataoff = 0;
  uint64_t mapoff = 0;
  uint64_t logoff = 0;
  uint64_t info2off = 0;
  uint64_t nextoff = 0;  // relative, as stored
  uint32_t external_lbasize = 0;
  uint32_t internal_lbasize = 0;
  uint32_t external_nlba = 0;
  uint32_t internal_nlba = 0;
  uint32_t nfree = 0;
};

// A structure read from media at a region offset (the caller has checked the range).
template <typename T>
T load(const Region& region, uint64_t off) {
  T value;
  std::memcpy(&value, region.at(off), sizeof value);
  return value;
}

}  // namespace vpmfs::btt
