// The vpmfs on-media format above the BTT (docs/FORMAT.md, "Filesystem"). Plain little-endian
// PODs. The image header lives at region offset 0; everything else lives in BTT sectors, one
// filesystem block per sector.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vpmfs/checksum.h"

namespace vpmfs::fsfmt {

// --- image header (region offset 0, 4096 bytes) ------------------------------------------------
inline constexpr char kImageMagic[8] = {'V', 'P', 'M', 'F', 'S', 'I', 'M', 'G'};
inline constexpr uint32_t kImageVersion = 1;
inline constexpr uint64_t kImageHeaderSize = 4096;
inline constexpr uint64_t kIntentLogOffset = 4096;
inline constexpr uint64_t kBttAlign = 1 << 20;

struct ImageHeader {
  char magic[8];         // "VPMFSIMG"
  uint32_t version;      // 1
  uint32_t header_size;  // 4096
  uint64_t image_size;   // bytes, as formatted
  uint64_t intent_log_offset;
  uint64_t intent_log_size;
  uint64_t btt_offset;  // the BTT namespace: [btt_offset, btt_offset + btt_size)
  uint64_t btt_size;
  uint8_t uuid[16];
  char label[64];  // NUL padded
  int64_t created_sec;
  uint32_t sector_size;
  uint32_t lanes;
  uint64_t kill_log_offset;  // the kill log (kill_log.h); size 0: none
  uint64_t kill_log_size;
  uint8_t reserved[3920];
  uint64_t checksum;  // xxhash64 of the header with this field zero
};
static_assert(sizeof(ImageHeader) == 4096);
static_assert(offsetof(ImageHeader, uuid) == 56);
static_assert(offsetof(ImageHeader, checksum) == 4088);

// --- kill log (between the intent log and the BTT) -----------------------------------------
// Two halves; the running transaction's metadata checkpoints go to half (txn % 2). Only read
// back when the boot that wrote them is still running: it covers a killed daemon, whose stores
// the page cache keeps, never a power failure.
inline constexpr char kKillLogMagic[8] = {'V', 'P', 'M', 'F', 'S', 'K', 'I', 'L'};
inline constexpr uint64_t kKillRecordMagic = 0x444345524C4C494Bull;  // "KILLRECD"

struct KillLogHalf {
  char magic[8];        // "VPMFSKIL"
  uint8_t boot_id[16];  // /proc/sys/kernel/random/boot_id of the writer
  uint64_t txn;         // the transaction whose checkpoints follow
  uint64_t nonce;       // random, new at every start; seeds the records' checksums with txn
  uint64_t reserved[2];
  uint64_t checksum;  // xxhash64 of the 56 bytes above
};
static_assert(sizeof(KillLogHalf) == 64);

// A checkpoint: the images of every metadata block changed since the previous one. Followed by
// `count` home LBAs (padded to 64 bytes) and `count` block images.
struct KillRecord {
  uint64_t magic;  // "KILLRECD"
  uint64_t txn;    // the half's txn
  uint64_t seq;    // 1, 2, ... within the half
  uint32_t count;
  uint32_t reserved0;
  uint64_t reserved[3];
  uint64_t checksum;  // xxhash64 of this record (checksum 0), the LBAs and images, seeded with txn
};
static_assert(sizeof(KillRecord) == 64);

// --- superblock (BTT LBA 0) -------------------------------------------------------------------
inline constexpr uint64_t kSuperMagic = 0x4B4C425346504D56ull;  // "VMPFSBLK"
inline constexpr uint32_t kFsVersion = 1;

struct Superblock {
  uint64_t magic;
  uint32_t version;
  uint32_t block_size;
  uint64_t block_count;
  uint64_t inode_count;
  uint64_t journal_start;  // LBA of the journal's first block
  uint64_t journal_blocks;
  uint64_t block_bitmap_start;
  uint64_t block_bitmap_blocks;
  uint64_t inode_bitmap_start;
  uint64_t inode_bitmap_blocks;
  uint64_t inode_table_start;
  uint64_t inode_table_blocks;
  uint64_t data_start;   // first block any file may own
  uint64_t orphan_head;  // first inode of the orphan chain (unlinked, still open); 0: none
  uint8_t uuid[16];
  char label[64];
  int64_t created_sec;
  uint32_t dax_default;  // 0 never, 1 always, 2 inode (what mkfs chose; the mount may override)
  uint32_t reserved0;
  uint8_t reserved[296];
  uint64_t checksum;  // xxhash64 of the superblock with this field zero
};
static_assert(sizeof(Superblock) == 512);

// --- inode (256 bytes in the inode table) -----------------------------------------------------
inline constexpr uint32_t kInodeSize = 256;
inline constexpr int kDirect = 12;
inline constexpr int kPointers = 16;  // 12 direct, single, double, triple, quadruple indirect
inline constexpr uint32_t kInlineSymlink = kPointers * 8;  // targets up to 128 bytes inline

struct Timestamp {
  int64_t sec;
  uint32_t nsec;
};

inline bool operator<(const Timestamp& a, const Timestamp& b) {
  return a.sec != b.sec ? a.sec < b.sec : a.nsec < b.nsec;
}

struct Inode {
  uint32_t mode;  // 0: free
  uint32_t nlink;
  uint32_t uid;
  uint32_t gid;
  uint64_t size;
  uint64_t blocks;  // blocks owned (data and pointer blocks)
  int64_t atime_sec, mtime_sec, ctime_sec, btime_sec;
  uint32_t atime_nsec, mtime_nsec, ctime_nsec, btime_nsec;
  uint64_t rdev;
  uint32_t flags;  // FS_XFLAG_* bits (FS_XFLAG_DAX)
  uint32_t generation;
  uint64_t xattr_block;
  uint64_t next_orphan;     // orphan chain
  uint64_t ptr[kPointers];  // block map, or an inline symlink target
  uint64_t parent;          // directories: the parent directory (for "..")
  uint64_t checksum;        // xxhash64 of the inode with this field zero, seeded with its number
};
static_assert(sizeof(Inode) == kInodeSize);

inline constexpr int kAtime = 1, kMtime = 2, kCtime = 4, kBtime = 8;

inline void set_times(Inode& i, Timestamp t, int which) {
  if (which & kAtime) i.atime_sec = t.sec, i.atime_nsec = t.nsec;
  if (which & kMtime) i.mtime_sec = t.sec, i.mtime_nsec = t.nsec;
  if (which & kCtime) i.ctime_sec = t.sec, i.ctime_nsec = t.nsec;
  if (which & kBtime) i.btime_sec = t.sec, i.btime_nsec = t.nsec;
}

// --- directory blocks -------------------------------------------------------------------------
// A directory's blocks hold records back to back; a record with ino 0 is free space. Records
// never move, so a record's position (block index * block size + offset) is a stable readdir
// cookie.
struct DirRecordHeader {
  uint64_t ino;
  uint16_t rec_len;  // bytes of this record, a multiple of 8
  uint8_t name_len;
  uint8_t type;  // DT_*
  uint32_t reserved;
};
static_assert(sizeof(DirRecordHeader) == 16);

inline uint32_t dir_record_len(std::size_t name_len) {
  return uint32_t((sizeof(DirRecordHeader) + name_len + 7) & ~std::size_t(7));
}

// --- xattr blocks -----------------------------------------------------------------------------
// An inode's extended attributes (POSIX ACLs among them) are one stream of entries back to back,
// each an XattrEntry, the full name (namespace prefix included, no NUL), the value, and zeros up
// to a multiple of 8 bytes. The stream lives in a chain of blocks starting at Inode.xattr_block,
// each counted in Inode.blocks: every block has a header and carries the next `used` bytes of
// the stream; every block but the last is full (used = bs - 40) and names the next. Metadata,
// written through the journal like directory blocks. Every byte after `used` is zero. An inode
// without attributes has no block.
inline constexpr uint64_t kXattrMagic = 0x5254415853464D56ull;  // "VMFSXATR"

struct XattrHeader {
  uint64_t magic;     // "VMFSXATR"
  uint64_t ino;       // the owner
  uint32_t count;     // entries of the whole stream in the first block, 0 in the others
  uint32_t used;      // bytes of the stream after the header, a multiple of 8
  uint64_t next;      // the next block of the chain; 0: this is the last
  uint64_t checksum;  // xxhash64 of the whole block with this field zero, seeded with the owner
};
static_assert(sizeof(XattrHeader) == 40);
static_assert(offsetof(XattrHeader, count) == 16);
static_assert(offsetof(XattrHeader, checksum) == 32);

struct XattrEntry {
  uint8_t name_len;    // 1..255
  uint8_t reserved0;   // zero
  uint16_t reserved1;  // zero
  uint32_t value_len;
  // then the name, the value, zero padding to a multiple of 8
};
static_assert(sizeof(XattrEntry) == 8);

inline uint32_t xattr_entry_len(std::size_t name_len, std::size_t value_len) {
  return uint32_t((sizeof(XattrEntry) + name_len + value_len + 7) & ~std::size_t(7));
}

// --- journal ----------------------------------------------------------------------------------
// One transaction at a time, from the journal's first block: a descriptor naming the home block
// of each image, then the images. Replay applies them if the descriptor's checksum covers them.
inline constexpr uint64_t kJournalMagic = 0x4C4E524A53464D56ull;  // "VMFSJRNL"

struct JournalDescriptor {
  uint64_t magic;
  uint64_t sequence;
  uint64_t count;            // images that follow
  uint64_t checksum;         // xxhash64 over the home LBAs and every image, seeded with sequence
  uint64_t header_checksum;  // xxhash64 of the 32 bytes above
  // then `count` home LBAs (uint64_t), filling the rest of the descriptor block(s)
};
static_assert(sizeof(JournalDescriptor) == 40);

// Checksums of the structures above: xxhash64 of a copy with the checksum field zero.
inline uint64_t inode_checksum(const Inode& inode, uint64_t ino) {
  Inode copy = inode;
  copy.checksum = 0;
  return xxhash64(&copy, sizeof copy, ino);
}

inline uint64_t super_checksum(const Superblock& sb) {
  Superblock copy = sb;
  copy.checksum = 0;
  return xxhash64(&copy, sizeof copy);
}

}  // namespace vpmfs::fsfmt
