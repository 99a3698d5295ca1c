// The DAX surface of the library: file ranges mapped for direct loads and stores (the
// MAP_SYNC promise where the region can keep it), the per-inode DAX flag, and the volume's
// health for status reports.
#include <linux/falloc.h>
#include <linux/fs.h>

#include "volume.h"
#include "vpmfs/completion.h"

namespace vpmfs {

using namespace fsfmt;

Status DaxMapping::sync_wait() {
  return wait_for_answer([this](auto done) { sync(std::move(done)); });
}

// Pins the blocks behind a file range and holds the inode; gives both back when destroyed.
class Mapping final : public DaxMapping {
 public:
  Mapping(VolumeImpl& volume, uint64_t ino, bool synchronous)
      : v_(volume), ino_(ino), synchronous_(synchronous) {}
  ~Mapping() override {
    for (uint64_t lba : pinned_) (void)v_.btt_->unpin(lba, 1);
    {
      VolumeImpl::Lock lock(v_.mu_);
      --v_.node(ino_).mappings;
    }
    v_.forget(ino_, 1);
  }

  const std::vector<DaxExtent>& extents() const override { return extents_; }
  bool synchronous() const override { return synchronous_; }

  void sync(std::function<void(const Status&)> done) override {
    // The stores went straight to the region: their cache lines (direct) or pages (writeback)
    // are recorded, then the commit's flush covers them with the metadata.
    for (const DaxExtent& e : extents_) v_.region_->persist(e.image_offset, e.length);
    v_.sync(std::move(done));
  }

  // Adds the pinned block that holds file block fb.
  Status add(uint64_t fb, uint64_t lba) {
    if (Status s = v_.btt_->pin(lba, 1); !s) return s;
    pinned_.push_back(lba);
    auto off = v_.btt_->pinned_offset(lba);
    if (!off) return off.status();
    const uint64_t bs = v_.bs_;
    if (!extents_.empty()) {
      DaxExtent& last = extents_.back();
      if (last.file_offset + last.length == fb * bs && last.image_offset + last.length == *off) {
        last.length += bs;
        return Status::ok();
      }
    }
    extents_.push_back(DaxExtent{fb * bs, *off, bs, v_.region_->at(*off)});
    return Status::ok();
  }

 private:
  VolumeImpl& v_;
  uint64_t ino_;
  bool synchronous_;
  std::vector<uint64_t> pinned_;
  std::vector<DaxExtent> extents_;
};

Result<std::unique_ptr<DaxMapping>> VolumeImpl::map(uint64_t ino, uint64_t offset, uint64_t length,
                                                    bool synchronous) {
  if (read_only_) return Status(EROFS, "read-only volume");
  if (!failed_) return Status(EROFS, failed_.message());
  if (synchronous && region_->mode() != PersistMode::direct) {
    return Status(EOPNOTSUPP, std::string("a synchronous (MAP_SYNC) mapping needs a direct "
                                          "region; this one is ") +
                                  to_string(region_->mode()) + " (" + region_->mode_reason() +
                                  "): map without it and use the flush channel (msync/fsync)");
  }
  if (length == 0 || offset % bs_ != 0 || length % bs_ != 0) {
    return Status(EINVAL, "offset and length must be non-zero multiples of the block size (" +
                              std::to_string(bs_) + ")");
  }
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    if (!S_ISREG(inode->mode)) return Status(ENODEV, "only regular files can be mapped");
    if (offset + length > ceil_div(inode->size, bs_) * bs_ || offset + length < offset) {
      return Status(EINVAL, "the range reaches past the end of the file");
    }
    // From here the file's blocks stay put: cuts and punches wait for the mapping to go.
    ++node(ino).mappings;
    held_.add(ino, 1);
  }
  auto mapping = std::make_unique<Mapping>(*this, ino, synchronous);
  // Holes get zeroed blocks; the size stays.
  if (Status s = fallocate(ino, FALLOC_FL_KEEP_SIZE, offset, length); !s) return s;
  std::vector<uint64_t> lbas;
  {
    Lock lock(mu_);
    auto inode = iget(ino);
    if (!inode) return inode.status();
    for (uint64_t fb = offset / bs_; fb < (offset + length) / bs_; ++fb) {
      auto lba = bmap(*inode, fb, false, nullptr);
      if (!lba) return lba.status();
      if (*lba == 0) return Status(EAGAIN, "the range changed while it was mapped; try again");
      lbas.push_back(*lba);
    }
  }
  for (uint64_t i = 0; i < lbas.size(); ++i) {
    if (Status s = mapping->add(offset / bs_ + i, lbas[i]); !s) return s;
  }
  // MAP_SYNC: the blocks and the metadata naming them are durable before the caller stores.
  if (synchronous) {
    if (Status s = sync_wait(); !s) return s;
  }
  return std::unique_ptr<DaxMapping>(std::move(mapping));
}

static_assert(kSettableXflags == (FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND | FS_XFLAG_SYNC |
                                  FS_XFLAG_NOATIME | FS_XFLAG_NODUMP | FS_XFLAG_DAX));

Result<Attr> VolumeImpl::set_xflags(uint64_t ino, uint32_t xflags) {
  return synchronous(try_set_xflags(ino, xflags), {ino});
}

Result<Attr> VolumeImpl::try_set_xflags(uint64_t ino, uint32_t xflags) {
  KillPoint kill_point{this};
  if (read_only_) return Status(EROFS, "read-only volume");
  if (!failed_) return Status(EROFS, failed_.message());
  if (xflags & ~kSettableXflags) {
    return Status(EOPNOTSUPP,
                  "vpmfs sets only the DAX, IMMUTABLE, APPEND, SYNC, NOATIME and "
                  "NODUMP FS_XFLAG_* flags");
  }
  Lock lock(mu_);
  throttle(lock);
  auto inode = iget(ino);
  if (!inode) return inode.status();
  inode->flags = (inode->flags & ~kSettableXflags) | xflags;
  set_times(*inode, now(), kCtime);
  iput(ino, *inode);
  return to_attr(ino, *inode);
}

Volume::Health VolumeImpl::health() {
  Lock lock(mu_);
  Health h;
  h.read_only = read_only_ || !failed_;
  if (!failed_) h.error = failed_.message();
  lock.unlock();
  std::lock_guard cl(commit_mu_);
  h.commits = commits_done_;
  h.syncs = syncs_answered_;
  h.journal_commits = journal_commits_;
  h.commit_ns = commit_ns_;
  h.answer_ns = answer_ns_;
  h.gather_ns = gather_ns_;
  Btt::Stats b = btt_->stats();
  h.btt_epochs = b.epochs;
  h.btt_epoch_sectors = b.epoch_sectors;
  return h;
}

}  // namespace vpmfs
