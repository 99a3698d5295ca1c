// The client side of DAX through a mount: the ioctl, then mmap of the image's pieces.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "vpmfs/dax.h"

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif

namespace vpmfs {

DaxClientMapping::~DaxClientMapping() {
  for (const Piece& p : pieces_) ::munmap(p.address, p.length);
  if (file_fd_ >= 0) {
    DaxUnmapRequest r{offset_, length_};
    (void)::ioctl(file_fd_, VPMFS_IOC_DAX_UNMAP, &r);
  }
}

std::byte* DaxClientMapping::at(uint64_t file_offset) const {
  for (const Piece& p : pieces_) {
    if (file_offset >= p.file_offset && file_offset - p.file_offset < p.length) {
      return p.address + (file_offset - p.file_offset);
    }
  }
  return nullptr;
}

Result<std::unique_ptr<DaxClientMapping>> dax_map(int fd, uint64_t offset, uint64_t length) {
  std::unique_ptr<DaxClientMapping> m(new DaxClientMapping());
  std::vector<DaxMapRequest::Extent> extents;
  std::string image;
  auto request = std::make_unique<DaxMapRequest>();
  for (uint32_t first = 0;;) {
    std::memset(request.get(), 0, sizeof *request);
    request->offset = offset;
    request->length = length;
    request->flags = kDaxMapSync;
    request->first = first;
    if (::ioctl(fd, VPMFS_IOC_DAX_MAP, request.get()) != 0) {
      if (errno == ENOTTY || errno == ENOSYS) {
        return Status(errno, "not a file on a vpmfs mount (no DAX mapping ioctl)");
      }
      return errno_status("DAX mapping ioctl");
    }
    if (first == 0) {
      // From here the daemon holds a pin for this range: release it on every way out.
      m->file_fd_ = fd;
      m->offset_ = offset;
      m->length_ = length;
    }
    extents.insert(extents.end(), request->extent, request->extent + request->count);
    first += request->count;
    if (request->count == 0 || first >= request->total) break;
  }
  image.assign(request->image, strnlen(request->image, sizeof request->image));
  int image_fd = ::open(image.c_str(), O_RDWR | O_CLOEXEC);
  if (image_fd < 0) return errno_status("open the image " + image + " for DAX");
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{image_fd};
  m->map_sync_ = true;
  for (const auto& e : extents) {
    void* p = ::mmap(nullptr, e.length, PROT_READ | PROT_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC,
                     image_fd, off_t(e.image_offset));
    if (p == MAP_FAILED && errno == EOPNOTSUPP) {
      // The image's filesystem has no DAX (a region forced to direct, for tests): the
      // mapping is still the image's own memory, without the kernel's MAP_SYNC guarantee.
      m->map_sync_ = false;
      p = ::mmap(nullptr, e.length, PROT_READ | PROT_WRITE, MAP_SHARED, image_fd,
                 off_t(e.image_offset));
    }
    if (p == MAP_FAILED) return errno_status("mmap of the image " + image);
    m->pieces_.push_back({e.file_offset, static_cast<std::byte*>(p), e.length});
  }
  return m;
}

}  // namespace vpmfs
