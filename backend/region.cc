#include "vpmfs/region.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <utility>

#include "vpmfs/persist.h"

namespace vpmfs {
namespace {

// Owns a file descriptor until released.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

constexpr std::byte kZeros[4096] = {};

std::string filesystem_name(int fd) {
  struct statfs sf {};
  if (::fstatfs(fd, &sf) != 0) return "unknown filesystem";
  switch (static_cast<unsigned long>(sf.f_type)) {
    case 0xEF53:
      return "ext4";
    case 0x58465342:
      return "xfs";
    case 0x01021994:
      return "tmpfs";
    case 0x9123683E:
      return "btrfs";
    case 0x794C7630:
      return "overlayfs";
    case 0x6969:
      return "nfs";
    case 0x65735546:
      return "fuse";
    case 0xF2F52010:
      return "f2fs";
    case 0x2FC12FC1:
      return "zfs";
    default: {
      char buf[40];
      std::snprintf(buf, sizeof buf, "filesystem 0x%lx", static_cast<unsigned long>(sf.f_type));
      return buf;
    }
  }
}

// A character device is device-dax when sysfs files it under the dax subsystem.
bool devdax_size(const struct stat& st, uint64_t* size) {
  std::string sys = "/sys/dev/char/" + std::to_string(major(st.st_rdev)) + ":" +
                    std::to_string(minor(st.st_rdev));
  char link[256];
  ssize_t n = ::readlink((sys + "/subsystem").c_str(), link, sizeof link - 1);
  if (n <= 0) return false;
  link[n] = '\0';
  std::string_view subsystem(link);
  if (subsystem.substr(subsystem.rfind('/') + 1) != "dax") return false;
  std::ifstream in(sys + "/size");
  uint64_t bytes = 0;
  if (!(in >> bytes)) return false;
  *size = bytes;
  return true;
}

}  // namespace

const char* to_string(PersistMode mode) {
  switch (mode) {
    case PersistMode::direct:
      return "direct";
    case PersistMode::writeback:
      return "writeback";
    case PersistMode::unsafe:
      return "unsafe";
  }
  return "?";
}

std::optional<PersistMode> parse_persist_mode(std::string_view name) {
  if (name == "direct") return PersistMode::direct;
  if (name == "writeback") return PersistMode::writeback;
  if (name == "unsafe") return PersistMode::unsafe;
  return std::nullopt;
}

Result<std::unique_ptr<Region>> Region::open(const std::string& path,
                                             const RegionOptions& options) {
  if (options.unlocked && !options.read_only) {
    return Status(EINVAL, "only a read-only region can be opened without a lock");
  }
  int flags = O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR);
  if (options.create_size != 0 && !options.read_only) flags |= O_CREAT;
  Fd fd(::open(path.c_str(), flags, 0644));
  if (fd.get() < 0) {
    if (errno == ENOENT) return Status(ENOENT, "image " + path + " does not exist");
    return errno_status("cannot open image " + path);
  }
  // One writer or any number of readers: a second vpmfs on the same image would corrupt it.
  const int lock = (options.read_only ? LOCK_SH : LOCK_EX) | LOCK_NB;
  for (uint32_t waited = 0; !options.unlocked && ::flock(fd.get(), lock) != 0; waited += 20) {
    if (errno == EWOULDBLOCK && waited < options.lock_wait_ms) {
      ::usleep(20 * 1000);
      continue;
    }
    if (errno == EWOULDBLOCK) {
      return Status(EBUSY, "image in use: " + path +
                               " is held by another process (a mounted vpmfs or a vpmfs tool)");
    }
    return errno_status("cannot lock image " + path);
  }

  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_status("cannot stat image " + path);
  auto region = std::unique_ptr<Region>(new Region());
  region->path_ = path;
  region->read_only_ = options.read_only;
  region->eadr_ = options.eadr;
  uint64_t size = 0;
  if (S_ISCHR(st.st_mode)) {
    if (!devdax_size(st, &size)) {
      return Status(ENODEV, path + " is a character device but not a device-dax node");
    }
    region->devdax_ = true;
    region->backend_name_ = "devdax";
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
    if (size == 0 && options.create_size != 0) {
      if (::ftruncate(fd.get(), static_cast<off_t>(options.create_size)) != 0) {
        return errno_status("cannot size image " + path);
      }
      size = options.create_size;
    }
    region->backend_name_ = filesystem_name(fd.get());
  } else {
    return Status(EINVAL, path + " is neither a regular file nor a device-dax node");
  }
  if (size == 0) return Status(EINVAL, "image " + path + " is empty");
  if (size > static_cast<uint64_t>(SIZE_MAX / 2)) {
    return Status(EFBIG, "image " + path + " is too large to map");
  }

  int prot = PROT_READ | (options.read_only ? 0 : PROT_WRITE);
  void* base = MAP_FAILED;
  if (!options.read_only) {
    // MAP_SYNC is only granted where CPU cache write-back makes stores durable: a file on a
    // DAX filesystem or devdax. Everything else refuses it (EOPNOTSUPP).
    base = ::mmap(nullptr, size, prot, MAP_SHARED_VALIDATE | MAP_SYNC, fd.get(), 0);
    region->map_sync_ = base != MAP_FAILED;
  }
  if (base == MAP_FAILED) base = ::mmap(nullptr, size, prot, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) return errno_status("cannot map image " + path);
  region->base_ = static_cast<std::byte*>(base);
  region->size_ = size;
  region->fd_ = fd.release();

  bool persistent = region->map_sync_ || region->devdax_;
  const std::string& backend = region->backend_name_;
  std::string why = persistent
                        ? (region->devdax_ ? "device-dax" : "MAP_SYNC accepted by " + backend)
                        : "MAP_SYNC not supported by " + backend;
  PersistMode mode;
  if (!options.mode) {
    mode = persistent || options.force_persistent ? PersistMode::direct : PersistMode::writeback;
  } else {
    mode = *options.mode;
  }
  switch (mode) {
    case PersistMode::direct:
      if (!persistent && !options.force_persistent && !options.read_only) {
        return Status(EOPNOTSUPP, "direct needs a DAX-capable file or devdax: " + why);
      }
      region->mode_reason_ = persistent ? why : why + "; treated as persistent (forced)";
      break;
    case PersistMode::writeback:
      if (region->devdax_) {
        return Status(EINVAL, "writeback needs an image file: device-dax has no flush request");
      }
      region->mode_reason_ = persistent ? why + "; writeback requested" : why;
      break;
    case PersistMode::unsafe:
      region->mode_reason_ = "unsafe requested: nothing is ever guaranteed durable";
      break;
  }
  region->mode_ = mode;
  region->store_by_write_ = mode == PersistMode::writeback && !region->devdax_ &&
                            !options.read_only && region->backend_name_ != "tmpfs";
  if (options.lock_memory && !options.read_only && backend == "tmpfs") {
    // Whole image: only the pages touched from here on are locked, as they are touched.
    region->memory_ = ::mlock2(base, size, MLOCK_ONFAULT) == 0
                          ? "locked as touched"
                          : std::string("not locked: mlock2: ") + std::strerror(errno) +
                                " (raise RLIMIT_MEMLOCK, or mount with nomlock)";
  }
  auto channel = FlushChannel::create(region.get());
  if (!channel) return channel.status();
  region->channel_ = std::move(channel.value());
  return region;
}

Region::~Region() {
  if (channel_) channel_->shutdown();
  if (base_ != nullptr) ::munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void Region::set_observer(RegionObserver* observer) {
  observer_ = observer;
}

void Region::unmap_before_flush(uint64_t off, uint64_t len) {
  if (!store_by_write_ || !contains(off, len) || len == 0) return;
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  uint64_t start = off / page * page;
  std::pair<uint64_t, uint64_t> range{start, off + len - start};
  std::lock_guard lock(unmap_mu_);
  // A BTT opened again on the same region gives its ranges again.
  if (std::find(unmap_.begin(), unmap_.end(), range) == unmap_.end()) unmap_.push_back(range);
}

void Region::unmap_for_flush() {
  std::lock_guard lock(unmap_mu_);
  // Best effort: a range that cannot be dropped (locked pages, say) is written back as before.
  for (auto [off, len] : unmap_) (void)::madvise(base_ + off, len, MADV_DONTNEED);
}

bool Region::write_file(uint64_t off, const void* src, std::size_t len) {
  const auto* p = static_cast<const std::byte*>(src);
  while (len > 0) {
    ssize_t n = ::pwrite(fd_, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    // Out of space for a hole of a sparse image, say: the store through the mapping is what
    // happened before, and reports the same way.
    if (n <= 0) return false;
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<std::size_t>(n);
  }
  return true;
}

void Region::write_nt(uint64_t off, const void* src, std::size_t len) {
  if (observer_ != nullptr) [[unlikely]] {
    observer_->store(base_, off, src, len);
    if (mode_ == PersistMode::direct) observer_->flush(off, len);
    return;
  }
  if (store_by_write_ && write_file(off, src, len)) return;
  if (mode_ == PersistMode::direct && !eadr_) {
    pmem::copy_nt(base_ + off, src, len);
  } else {
    std::memcpy(base_ + off, src, len);
  }
}

void Region::zero(uint64_t off, std::size_t len) {
  if (observer_ != nullptr) [[unlikely]] {
    while (len > 0) {
      std::size_t n = std::min(len, sizeof kZeros);
      observer_->store(base_, off, kZeros, n);
      off += n;
      len -= n;
    }
    return;
  }
  if (store_by_write_) {
    while (len > 0) {
      std::size_t n = std::min(len, sizeof kZeros);
      if (!write_file(off, kZeros, n)) break;
      off += n;
      len -= n;
    }
  }
  std::memset(base_ + off, 0, len);
}

void Region::discard(uint64_t off, std::size_t len) {
  // The crash simulator has no model of a hole; nor does it need one: a discarded range is one
  // nothing reads again (Btt::discard: a sector whose map entry says zeros).
  if (observer_ != nullptr) [[unlikely]]
    return;
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  uint64_t first = (off + page - 1) / page * page;
  uint64_t end = (off + len) / page * page;
  if (devdax_ || read_only_ || first >= end) return;
  // Not supported by the image's filesystem (EOPNOTSUPP): the space simply stays allocated.
  (void)::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(first),
                    off_t(end - first));
}

void Region::flush(uint64_t off, std::size_t len) {
  if (mode_ != PersistMode::direct) return;
  if (observer_ != nullptr) [[unlikely]] {
    observer_->flush(off, len);
    return;
  }
  if (!eadr_) pmem::flush(base_ + off, len);
}

void Region::fence() {
  if (mode_ != PersistMode::direct) return;
  if (observer_ != nullptr) [[unlikely]] {
    observer_->fence();
    return;
  }
  pmem::fence();
}

void Region::persist(uint64_t off, std::size_t len) {
  switch (mode_) {
    case PersistMode::direct:
      flush(off, len);
      fence();
      break;
    case PersistMode::writeback:
      if (observer_ != nullptr) [[unlikely]]
        observer_->mark_dirty(off, len);
      // Cheap when already set: no store, so no cache-line ping-pong between writers.
      if (!dirty_.load(std::memory_order_acquire)) dirty_.store(true, std::memory_order_release);
      break;
    case PersistMode::unsafe:
      break;
  }
}

}  // namespace vpmfs
