// True DAX through a vpmfs mount. The kernel refuses MAP_SYNC on every FUSE file, so vpmfs
// offers the promise another way: an ioctl on an open file of the mount asks the daemon to
// pin a block-aligned range (allocating its holes and making that metadata durable), and the
// reply says where each piece lives in the image. dax_map() then maps those pieces of the
// image itself, with MAP_SHARED_VALIDATE | MAP_SYNC where the image's filesystem supports it
// (a DAX filesystem or devdax). Stores made durable with vpmfs::pmem::persist() are durable for
// good; writes through the mount to the pinned blocks land in place, so both views agree.
//
// Only a direct region can promise this: on writeback (virtio-pmem style) and unsafe regions
// the ioctl fails with EOPNOTSUPP, and fsync/msync of an ordinary mapping is the way to
// durability. The range stays pinned until dax_unmap (or the DaxClientMapping's destruction)
// or until the file descriptor is closed.
#pragma once

#include <linux/ioctl.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "vpmfs/status.h"

namespace vpmfs {

inline constexpr uint32_t kDaxMapSync = 1;      // DaxMapRequest::flags: MAP_SYNC semantics
inline constexpr uint32_t kDaxMaxExtents = 64;  // extents per reply

// VPMFS_IOC_DAX_MAP: maps [offset, offset + length) (multiples of 4096) and returns its
// extents from index `first` on; ask again with first += count while first + count < total.
// Asking again for the same range returns the same mapping.
struct DaxMapRequest {
  uint64_t offset;  // in
  uint64_t length;  // in
  uint32_t flags;   // in: kDaxMapSync
  uint32_t first;   // in: first extent wanted
  uint32_t count;   // out: extents in this reply
  uint32_t total;   // out: extents of the whole range
  struct Extent {
    uint64_t file_offset;
    uint64_t image_offset;  // byte offset in the image file
    uint64_t length;
  } extent[kDaxMaxExtents];
  char image[512];  // out: the image's path, as the daemon opened it
};

// VPMFS_IOC_DAX_UNMAP: releases the mapping of exactly this range.
struct DaxUnmapRequest {
  uint64_t offset;
  uint64_t length;
};

}  // namespace vpmfs

#define VPMFS_IOC_DAX_MAP _IOWR('v', 1, struct vpmfs::DaxMapRequest)
#define VPMFS_IOC_DAX_UNMAP _IOW('v', 2, struct vpmfs::DaxUnmapRequest)

namespace vpmfs {

// A range of a file on a vpmfs mount, mapped straight from the image.
class DaxClientMapping {
 public:
  struct Piece {
    uint64_t file_offset;
    std::byte* address;
    uint64_t length;
  };
  ~DaxClientMapping();
  DaxClientMapping(const DaxClientMapping&) = delete;
  DaxClientMapping& operator=(const DaxClientMapping&) = delete;

  const std::vector<Piece>& pieces() const { return pieces_; }
  // Where file byte `file_offset` is, or null outside the range.
  std::byte* at(uint64_t file_offset) const;
  // The kernel mapped the image with MAP_SYNC (its filesystem is DAX-capable, or devdax).
  // False where the daemon's region is direct only because it was forced (tests on tmpfs).
  bool map_sync() const { return map_sync_; }

 private:
  friend Result<std::unique_ptr<DaxClientMapping>> dax_map(int fd, uint64_t offset,
                                                           uint64_t length);
  DaxClientMapping() = default;
  int file_fd_ = -1;  // the mount's file (not owned): for the unmap ioctl
  uint64_t offset_ = 0, length_ = 0;
  std::vector<Piece> pieces_;
  bool map_sync_ = false;
};

// Maps [offset, offset + length) of the open vpmfs file fd for direct, synchronous DAX
// access. fd must stay open while the mapping lives.
Result<std::unique_ptr<DaxClientMapping>> dax_map(int fd, uint64_t offset, uint64_t length);

}  // namespace vpmfs
