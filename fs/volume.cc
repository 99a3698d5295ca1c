#include "volume.h"

#include <dirent.h>
#include <linux/fs.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "vpmfs/checksum.h"
#include "vpmfs/completion.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

uint64_t header_checksum(const ImageHeader& h) {
  ImageHeader copy = h;
  copy.checksum = 0;
  return xxhash64(&copy, sizeof copy);
}

}  // namespace

struct stat Attr::to_stat(uint32_t block_size) const {
  struct stat st {};
  st.st_ino = ino;
  st.st_mode = mode;
  st.st_nlink = nlink;
  st.st_uid = uid;
  st.st_gid = gid;
  st.st_rdev = rdev;
  st.st_size = off_t(size);
  st.st_blocks = blkcnt_t(blocks);
  st.st_blksize = blksize_t(block_size);
  st.st_atim = atime;
  st.st_mtim = mtime;
  st.st_ctim = ctime;
  return st;
}

// --- mkfs ------------------------------------------------------------------------------------

uint32_t default_lanes(uint64_t image_size) {
  uint32_t lanes = 256;
  while (lanes < 4096 && uint64_t(lanes) * 2 * (512 << 10) <= image_size) lanes *= 2;
  return lanes;
}

Status Volume::mkfs(const std::string& image, const MkfsOptions& o) {
  if (o.sector_size != 512 && o.sector_size != 4096) {
    return Status(EINVAL, "sector size must be 512 or 4096");
  }
  if (o.label.size() >= 64) return Status(EINVAL, "label longer than 63 bytes");
  if (o.size != 0) {
    // Create it sparse, or resize an existing image file to the size asked for.
    struct stat st {};
    if (::stat(image.c_str(), &st) == 0 && S_ISREG(st.st_mode) && uint64_t(st.st_size) != o.size &&
        ::truncate(image.c_str(), off_t(o.size)) != 0) {
      return errno_status("cannot resize " + image);
    }
  }
  RegionOptions ro;
  ro.create_size = o.size;
  ro.force_persistent = o.force_persistent;
  auto region = Region::open(image, ro);
  if (!region) return region.status();
  Region& r = **region;
  uint64_t image_size = r.size();
  const uint32_t lanes = o.lanes != 0 ? o.lanes : default_lanes(image_size);
  uint64_t intent = Btt::intent_log_size(image_size, lanes);
  uint64_t kill_offset = ceil_div(kIntentLogOffset + intent, 4096) * 4096;
  uint64_t kill_size = kill_log_size_for(image_size);
  uint64_t btt_offset = ceil_div(kill_offset + kill_size, kBttAlign) * kBttAlign;
  if (image_size < btt_offset + (17 << 20)) {
    return Status(ENOSPC, "image of " + std::to_string(image_size) +
                              " bytes is too small: vpmfs needs at least " +
                              std::to_string((btt_offset + (17 << 20)) >> 20) + " MiB");
  }
  // No valid header while the rest is being written: an interrupted mkfs leaves no volume.
  r.zero(0, kImageHeaderSize);
  r.persist(0, kImageHeaderSize);
  // No checkpoints of an earlier volume may ever be replayed into this one.
  KillLog(r, kill_offset, kill_size, o.sector_size, BootId{}).clear();
  r.persist(kill_offset, kill_size);

  Uuid uuid{};
  if (o.uuid) {
    uuid = *o.uuid;
  } else if (getrandom(uuid.data(), uuid.size(), 0) != ssize_t(uuid.size())) {
    return errno_status("cannot make a random uuid");
  }
  if (o.progress) o.progress("btt", 0, 1);
  BttFormatOptions bo;
  bo.sector_size = o.sector_size;
  bo.nfree = lanes;
  bo.uuid = uuid;
  bo.offset = btt_offset;
  bo.intent_log = kIntentLogOffset;
  if (o.progress) bo.progress = [&](uint64_t d, uint64_t t) { o.progress("btt map", d, t); };
  if (Status s = Btt::format(r, bo); !s) return s;
  BttOpenOptions oo;
  oo.offset = btt_offset;
  oo.intent_log = kIntentLogOffset;
  auto btt = Btt::open(r, oo);
  if (!btt) return btt.status();
  Btt& b = **btt;

  const uint32_t bs = b.sector_size();
  const uint64_t n = b.sector_count();
  Superblock sb{};
  sb.magic = kSuperMagic;
  sb.version = kFsVersion;
  sb.block_size = bs;
  sb.block_count = n;
  uint64_t per_block = bs / kInodeSize;
  sb.inode_count =
      std::max<uint64_t>(per_block * 4, image_size / std::max<uint64_t>(o.inode_ratio, 4096));
  sb.inode_count = ceil_div(sb.inode_count, per_block) * per_block;
  sb.journal_start = 1;
  sb.journal_blocks = std::clamp<uint64_t>(n / 64, 64, bs == 512 ? 16384 : 4096);
  sb.block_bitmap_start = sb.journal_start + sb.journal_blocks;
  sb.block_bitmap_blocks = ceil_div(n, uint64_t(bs) * 8);
  sb.inode_bitmap_start = sb.block_bitmap_start + sb.block_bitmap_blocks;
  sb.inode_bitmap_blocks = ceil_div(sb.inode_count, uint64_t(bs) * 8);
  sb.inode_table_start = sb.inode_bitmap_start + sb.inode_bitmap_blocks;
  sb.inode_table_blocks = sb.inode_count / per_block;
  sb.data_start = sb.inode_table_start + sb.inode_table_blocks;
  if (sb.data_start + 16 > n) return Status(ENOSPC, "image too small for its metadata");
  std::memcpy(sb.uuid, uuid.data(), 16);
  std::memcpy(sb.label, o.label.data(), o.label.size());
  sb.created_sec = now().sec;
  sb.dax_default = 2;

  std::vector<std::byte> block(bs);
  // An empty journal: no valid descriptor.
  if (Status s = b.write(sb.journal_start, block.data()); !s) return s;
  // Bitmaps: the metadata blocks are in use; inode 0 is never used, inode 1 is the root.
  for (uint64_t i = 0; i < sb.block_bitmap_blocks; ++i) {
    std::fill(block.begin(), block.end(), std::byte{0});
    for (uint64_t bit = 0; bit < uint64_t(bs) * 8; ++bit) {
      uint64_t lba = i * bs * 8 + bit;
      if (lba < sb.data_start || lba >= n) block[bit / 8] |= std::byte(1u << (bit % 8));
    }
    if (Status s = b.write(sb.block_bitmap_start + i, block.data()); !s) return s;
    if (o.progress) o.progress("bitmaps", i + 1, sb.block_bitmap_blocks);
  }
  for (uint64_t i = 0; i < sb.inode_bitmap_blocks; ++i) {
    std::fill(block.begin(), block.end(), std::byte{0});
    for (uint64_t bit = 0; bit < uint64_t(bs) * 8; ++bit) {
      uint64_t ino = i * bs * 8 + bit;
      if (ino <= kRootIno || ino >= sb.inode_count) block[bit / 8] |= std::byte(1u << (bit % 8));
    }
    if (Status s = b.write(sb.inode_bitmap_start + i, block.data()); !s) return s;
  }
  // The root directory. Its inode table block is written whole; free inodes in it are zero.
  std::fill(block.begin(), block.end(), std::byte{0});
  Inode root{};
  root.mode = S_IFDIR | 0755;
  root.nlink = 2;
  root.uid = getuid();
  root.gid = getgid();
  set_times(root, now(), kAtime | kMtime | kCtime | kBtime);
  root.parent = kRootIno;
  root.generation = 1;
  root.checksum = inode_checksum(root, kRootIno);
  uint64_t root_lba = sb.inode_table_start + kRootIno * kInodeSize / bs;
  std::memcpy(block.data() + kRootIno * kInodeSize % bs, &root, sizeof root);
  if (Status s = b.write(root_lba, block.data()); !s) return s;
  std::fill(block.begin(), block.end(), std::byte{0});
  sb.checksum = super_checksum(sb);
  std::memcpy(block.data(), &sb, sizeof sb);
  if (Status s = b.write(0, block.data()); !s) return s;
  if (Status s = b.sync_wait(); !s) return s;
  btt->reset();

  // Last, the image header: from now on this is a vpmfs image.
  ImageHeader h{};
  std::memcpy(h.magic, kImageMagic, sizeof h.magic);
  h.version = kImageVersion;
  h.header_size = kImageHeaderSize;
  h.image_size = image_size;
  h.intent_log_offset = kIntentLogOffset;
  h.intent_log_size = intent;
  h.btt_offset = btt_offset;
  h.btt_size = image_size - btt_offset;
  std::memcpy(h.uuid, uuid.data(), 16);
  std::memcpy(h.label, o.label.data(), o.label.size());
  h.created_sec = sb.created_sec;
  h.sector_size = bs;
  h.lanes = lanes;
  h.kill_log_offset = kill_offset;
  h.kill_log_size = kill_size;
  h.checksum = header_checksum(h);
  r.write(0, &h, sizeof h);
  r.persist(0, sizeof h);
  return r.flush_channel().wait();
}

// --- mount -----------------------------------------------------------------------------------

Result<std::unique_ptr<Volume>> Volume::mount(const std::string& image, const MountOptions& o) {
  return VolumeImpl::open(image, o);
}

Result<std::unique_ptr<Volume>> VolumeImpl::open(const std::string& image, const MountOptions& o) {
  auto v = std::unique_ptr<VolumeImpl>(new VolumeImpl());
  if (Status s = v->load(image, o); !s) return s;
  v->committer_ = std::thread([p = v.get()] { p->committer(); });
  // With the committer running: finishing a large orphan takes several transactions.
  if (!v->read_only_) {
    if (Status s = v->free_orphans(); !s) return s;
  }
  return std::unique_ptr<Volume>(std::move(v));
}

Status VolumeImpl::load(const std::string& image, const MountOptions& o) {
  RegionOptions ro;
  ro.mode = o.mode;
  ro.force_persistent = o.force_persistent;
  ro.read_only = o.read_only;
  ro.lock_wait_ms = o.lock_wait_ms;
  ro.lock_memory = o.lock_memory;
  read_only_ = o.read_only;
  atime_ = o.atime;
  sync_ = o.sync;
  dirsync_ = o.dirsync;
  commit_interval_ms_ = std::max<uint32_t>(o.commit_interval_ms, 1);
  max_transaction_blocks_ = o.max_transaction_blocks;
  cache_limit_ = std::max<uint64_t>(o.cache_blocks, 16);
  on_error_ = o.on_error;
  auto region = Region::open(image, ro);
  if (!region) return region.status();
  region_ = std::move(region.value());
  Region& r = *region_;
  if (o.on_region) o.on_region(r);
  if (r.size() < kImageHeaderSize)
    return Status(EINVAL, image + " is not a vpmfs image (too small)");
  ImageHeader h;
  std::memcpy(&h, r.at(0), sizeof h);
  if (std::memcmp(h.magic, kImageMagic, sizeof h.magic) != 0) {
    return Status(EINVAL, image + " is not a vpmfs image (no VPMFSIMG header; run mkfs.vpmfs)");
  }
  if (h.checksum != header_checksum(h)) {
    return Status(EUCLEAN, image + ": image header checksum mismatch; run fsck.vpmfs");
  }
  if (h.version != kImageVersion) {
    return Status(EINVAL, image + ": unsupported image version " + std::to_string(h.version));
  }
  if (h.btt_offset % 4096 != 0 || h.btt_offset > r.size() || h.btt_size > r.size() - h.btt_offset ||
      h.intent_log_offset + h.intent_log_size > h.btt_offset ||
      (h.kill_log_size != 0 &&
       (h.kill_log_offset < h.intent_log_offset + h.intent_log_size ||
        h.kill_log_size > h.btt_offset || h.kill_log_offset > h.btt_offset - h.kill_log_size))) {
    return Status(EUCLEAN, image + ": image header describes a layout beyond the image (" +
                               std::to_string(r.size()) + " bytes; truncated?)");
  }
  BttOpenOptions bo;
  bo.offset = h.btt_offset;
  bo.size = h.btt_size;
  bo.intent_log = h.intent_log_offset;
  auto btt = Btt::open(r, bo);
  if (!btt) return btt.status();
  btt_ = std::move(btt.value());
  bs_ = btt_->sector_size();

  std::vector<std::byte> block(bs_);
  if (Status s = btt_->read(0, block.data()); !s) return s;
  std::memcpy(&sb_, block.data(), sizeof sb_);
  if (sb_.magic != kSuperMagic) return Status(EUCLEAN, image + ": no filesystem superblock");
  if (sb_.checksum != super_checksum(sb_)) {
    return Status(EUCLEAN, image + ": superblock checksum mismatch; run fsck.vpmfs");
  }
  const uint64_t n = btt_->sector_count();
  bool sane = sb_.version == kFsVersion && sb_.block_size == bs_ && sb_.block_count == n &&
              sb_.journal_start == 1 && sb_.journal_blocks >= 8 && sb_.journal_blocks < n &&
              sb_.block_bitmap_start == sb_.journal_start + sb_.journal_blocks &&
              sb_.block_bitmap_blocks == ceil_div(n, uint64_t(bs_) * 8) &&
              sb_.inode_bitmap_start == sb_.block_bitmap_start + sb_.block_bitmap_blocks &&
              sb_.inode_count > kRootIno && sb_.inode_count % (bs_ / kInodeSize) == 0 &&
              sb_.inode_bitmap_blocks == ceil_div(sb_.inode_count, uint64_t(bs_) * 8) &&
              sb_.inode_table_start == sb_.inode_bitmap_start + sb_.inode_bitmap_blocks &&
              sb_.inode_table_blocks == sb_.inode_count / (bs_ / kInodeSize) &&
              sb_.data_start == sb_.inode_table_start + sb_.inode_table_blocks &&
              sb_.data_start < n && sb_.orphan_head < sb_.inode_count;
  if (!sane)
    return Status(EUCLEAN, image + ": superblock geometry is inconsistent; run fsck.vpmfs");
  if (!read_only_) {
    if (Status s = replay_journal(); !s) return s;
    if (Status s = replay_kill_log(h, o); !s) return s;
  }
  return load_bitmaps();
}

Status VolumeImpl::replay_kill_log(const ImageHeader& h, const MountOptions& o) {
  std::optional<BootId> boot = o.boot_id ? o.boot_id : current_boot_id();
  if (h.kill_log_size == 0 || !boot) return Status::ok();  // no kill log: commits only
  KillImages pending = read_kill_log(*region_, h.kill_log_offset, h.kill_log_size, bs_,
                                     journal_txn_, *boot, sb_.block_count);
  // Each transaction's checkpoints go through a journal commit of their own, oldest first, so
  // a crash during this replay leaves the state after one of them.
  for (auto& images : pending) {
    for (auto& [lba, image] : images) {
      if (lba >= sb_.journal_start && lba < sb_.journal_start + sb_.journal_blocks) {
        return Status(EUCLEAN, "kill log names journal block " + std::to_string(lba));
      }
      std::memcpy(meta_new(lba), image.data(), bs_);
      if (lba == 0) std::memcpy(&sb_, image.data(), sizeof sb_);
    }
    if (Status s = commit(); !s) return s;
  }
  kill_dirty_.clear();
  kill_pending_.store(false, std::memory_order_release);
  kill_log_ = std::make_unique<KillLog>(*region_, h.kill_log_offset, h.kill_log_size, bs_, *boot);
  kill_log_->clear();
  kill_log_->start(sequence_ + 1);
  return Status::ok();
}

void VolumeImpl::checkpoint() {
  // False also when a concurrent checkpoint took this call's changes (and logged them).
  if (!kill_log_ || !kill_pending_.load(std::memory_order_acquire)) return;
  for (int attempt = 0;; ++attempt) {
    {
      // Exclusive: no writer is between allocating blocks and writing their data, so no
      // checkpoint points at data that is not there.
      std::unique_lock gate(gate_);
      Lock lock(mu_);
      if (kill_dirty_.empty() || !failed_) return;
      std::vector<uint64_t> lbas(kill_dirty_.begin(), kill_dirty_.end());
      if (kill_log_->append(lbas, [this](uint64_t lba) { return cache_.at(lba).get(); })) {
        kill_dirty_.clear();
        kill_pending_.store(false, std::memory_order_release);
        trim_cache();  // a safe point: this call's pointers into the cache are gone
        return;
      }
      if (attempt > 0) {
        // More than a whole half: the commit just done holds these changes instead.
        kill_dirty_.clear();
        kill_pending_.store(false, std::memory_order_release);
        return;
      }
    }
    // This transaction's half is full: commit, which starts the next transaction's half.
    if (!sync_wait()) return;
  }
}

Status VolumeImpl::replay_journal() {
  std::vector<std::byte> block(bs_);
  if (Status s = btt_->read(sb_.journal_start, block.data()); !s) return s;
  JournalDescriptor d;
  std::memcpy(&d, block.data(), sizeof d);
  if (d.magic != kJournalMagic ||
      d.header_checksum != xxhash64(&d, offsetof(JournalDescriptor, header_checksum))) {
    return Status::ok();  // empty journal
  }
  // count first: 40 + 8 * count, and desc_blocks + count, wrap around for the largest counts.
  if (d.count == 0 || d.count > sb_.journal_blocks ||
      ceil_div(sizeof d + d.count * 8, bs_) + d.count > sb_.journal_blocks) {
    return Status(EUCLEAN, "journal descriptor is damaged (count " + std::to_string(d.count) + ")");
  }
  uint64_t desc_blocks = ceil_div(sizeof d + d.count * 8, bs_);
  sequence_ = d.sequence;
  std::vector<std::byte> desc(desc_blocks * bs_);
  for (uint64_t i = 0; i < desc_blocks; ++i) {
    if (Status s = btt_->read(sb_.journal_start + i, desc.data() + i * bs_); !s) return s;
  }
  std::vector<uint64_t> lbas(d.count);
  std::memcpy(lbas.data(), desc.data() + sizeof d, d.count * 8);
  std::vector<std::byte> images(d.count * bs_);
  uint64_t sum = xxhash64(lbas.data(), lbas.size() * 8, d.sequence);
  for (uint64_t i = 0; i < d.count; ++i) {
    std::byte* img = images.data() + i * bs_;
    if (Status s = btt_->read(sb_.journal_start + desc_blocks + i, img); !s) return s;
    sum = xxhash64(img, bs_, sum);
  }
  // A transaction whose images did not all reach the journal never committed: nothing of it
  // was written home either.
  if (sum != d.checksum) {
    journal_txn_ = d.sequence - 1;
    return Status::ok();
  }
  journal_txn_ = d.sequence;
  for (uint64_t i = 0; i < d.count; ++i) {
    if (lbas[i] >= sb_.block_count ||
        (lbas[i] >= sb_.journal_start && lbas[i] < sb_.journal_start + sb_.journal_blocks)) {
      return Status(EUCLEAN, "journal names block " + std::to_string(lbas[i]) + " out of range");
    }
  }
  for (uint64_t i = 0; i < d.count; ++i) {
    if (Status s = btt_->write(lbas[i], images.data() + i * bs_); !s) return s;
  }
  if (lbas.end() != std::find(lbas.begin(), lbas.end(), 0)) {
    std::memcpy(&sb_, images.data() + (std::find(lbas.begin(), lbas.end(), 0) - lbas.begin()) * bs_,
                sizeof sb_);
  }
  return btt_->sync_wait();
}

Status VolumeImpl::load_bitmaps() {
  std::vector<std::byte> block(bs_);
  block_used_.assign(sb_.block_count, true);
  free_blocks_ = 0;
  for (uint64_t i = 0; i < sb_.block_bitmap_blocks; ++i) {
    if (Status s = btt_->read(sb_.block_bitmap_start + i, block.data()); !s) return s;
    for (uint64_t bit = 0; bit < uint64_t(bs_) * 8;) {
      uint64_t lba = i * bs_ * 8 + bit;
      if (lba >= sb_.block_count) break;
      // A whole free byte inside the data area: eight at once (a terabyte has 2^28 blocks).
      if (bit % 8 == 0 && block[bit / 8] == std::byte{0} && lba >= sb_.data_start &&
          lba + 8 <= sb_.block_count) {
        std::fill(block_used_.begin() + int64_t(lba), block_used_.begin() + int64_t(lba + 8),
                  false);
        free_blocks_ += 8;
        bit += 8;
        continue;
      }
      bool used = (uint8_t(block[bit / 8]) >> (bit % 8)) & 1;
      if (lba < sb_.data_start) used = true;
      block_used_[lba] = used;
      free_blocks_ += used ? 0 : 1;
      ++bit;
    }
  }
  inode_used_.assign(sb_.inode_count, true);
  free_inodes_ = 0;
  for (uint64_t i = 0; i < sb_.inode_bitmap_blocks; ++i) {
    if (Status s = btt_->read(sb_.inode_bitmap_start + i, block.data()); !s) return s;
    for (uint64_t bit = 0; bit < uint64_t(bs_) * 8; ++bit) {
      uint64_t ino = i * bs_ * 8 + bit;
      if (ino >= sb_.inode_count) break;
      bool used = ((uint8_t(block[bit / 8]) >> (bit % 8)) & 1) || ino <= kRootIno;
      inode_used_[ino] = used;
      free_inodes_ += used ? 0 : 1;
    }
  }
  block_hint_ = sb_.data_start;
  inode_hint_ = kRootIno + 1;
  return Status::ok();
}

void VolumeImpl::store_super() {
  sb_.checksum = super_checksum(sb_);
  std::memcpy(meta_mut(0), &sb_, sizeof sb_);
}

void VolumeImpl::orphan_add(uint64_t ino, Inode& inode) {
  inode.next_orphan = sb_.orphan_head;
  sb_.orphan_head = ino;
  store_super();
}

void VolumeImpl::orphan_remove(uint64_t ino, Inode& inode) {
  if (sb_.orphan_head == ino) {
    sb_.orphan_head = inode.next_orphan;
    store_super();
  } else {
    // Singly linked: find the predecessor. The chain only holds files unlinked while open.
    uint64_t cur = sb_.orphan_head;
    for (uint64_t guard = 0; cur != 0 && guard < sb_.inode_count; ++guard) {
      auto c = iget(cur);
      if (!c) break;
      if (c->next_orphan == ino) {
        c->next_orphan = inode.next_orphan;
        iput(cur, *c);
        break;
      }
      cur = c->next_orphan;
    }
  }
  inode.next_orphan = 0;
}

Status VolumeImpl::free_orphans() {
  // The orphan chain as the volume went down: files unlinked while open, or whose blocks were
  // being freed (nlink 0), and files being truncated (nlink > 0). Each is finished, head first,
  // and leaves the chain in the step that finishes it, so a crash here only shortens the chain.
  Lock lock(mu_);
  if (sb_.orphan_head == 0) return Status::ok();
  for (uint64_t guard = 0; sb_.orphan_head != 0; ++guard) {
    uint64_t ino = sb_.orphan_head;
    auto inode = iget(ino);
    // Not in use: the chain names a free inode, or loops back to one freed above.
    if (!inode || guard >= sb_.inode_count || inode->mode == 0) {
      return Status(EUCLEAN, "the orphan chain is damaged (at inode " + std::to_string(ino) +
                                 "); run fsck.vpmfs");
    }
    uint64_t keep = inode->nlink > 0 ? ceil_div(inode->size, bs_) : 0;
    if (Status s = free_blocks_from(ino, keep, lock); !s) return s;
    inode = iget(ino);
    if (!inode) return inode.status();
    orphan_remove(ino, *inode);
    if (inode->nlink > 0) {
      iput(ino, *inode);
    } else {
      xattr_free(ino, *inode);
      ifree(ino);
    }
  }
  lock.unlock();
  return sync_wait();  // through the committer, which may be committing already
}

VolumeImpl::~VolumeImpl() {
  if (committer_.joinable()) {
    {
      std::lock_guard lock(commit_mu_);
      stopping_ = true;
      commit_cv_.notify_all();
    }
    committer_.join();
  }
}

// --- metadata cache and transactions ---------------------------------------------------------

const std::byte* VolumeImpl::meta(uint64_t lba) {
  auto it = cache_.find(lba);
  if (it != cache_.end()) return it->second.get();
  auto buf = std::make_unique<std::byte[]>(bs_);
  if (!btt_->read(lba, buf.get())) std::memset(buf.get(), 0, bs_);
  return cache_.emplace(lba, std::move(buf)).first->second.get();
}

std::byte* VolumeImpl::meta_mut(uint64_t lba) {
  const std::byte* p = meta(lba);
  dirty_.insert(lba);
  kill_dirty_.insert(lba);
  kill_pending_.store(true, std::memory_order_relaxed);
  return const_cast<std::byte*>(p);
}

std::byte* VolumeImpl::meta_new(uint64_t lba) {
  auto& slot = cache_[lba];
  if (!slot) slot = std::make_unique<std::byte[]>(bs_);
  std::memset(slot.get(), 0, bs_);
  dirty_.insert(lba);
  kill_dirty_.insert(lba);
  kill_pending_.store(true, std::memory_order_relaxed);
  return slot.get();
}

void VolumeImpl::throttle(Lock& lock) {
  // Keep every transaction well inside the journal.
  uint64_t limit = (sb_.journal_blocks - 1) / 2;
  if (max_transaction_blocks_ != 0) limit = std::min(limit, max_transaction_blocks_);
  while (dirty_.size() > limit && failed_.is_ok()) {
    lock.unlock();
    (void)sync_wait();
    lock.lock();
  }
}

Status VolumeImpl::commit() {
  // Snapshot the running transaction when no writer is between allocating blocks and writing
  // their data.
  std::unique_lock gate(gate_);
  Lock lock(mu_);
  journaled_ = false;
  if (!failed_) return failed_;
  if (dirty_.empty()) {
    lock.unlock();
    gate.unlock();
    return btt_->sync_wait();  // data written in place since the last commit
  }
  journaled_ = true;
  std::vector<uint64_t> lbas(dirty_.begin(), dirty_.end());
  std::vector<std::byte> images(lbas.size() * bs_);
  for (std::size_t i = 0; i < lbas.size(); ++i) {
    std::memcpy(images.data() + i * bs_, cache_.at(lbas[i]).get(), bs_);
  }
  dirty_.clear();
  std::vector<uint64_t> freed;
  freed.swap(freed_);
  layout_committing_.swap(layout_dirty_);
  layout_dirty_.clear();
  home_pending_ = true;
  uint64_t seq = ++sequence_;
  // Changes from here on belong to the next transaction, checkpointed in the other half.
  if (kill_log_) kill_log_->start(seq + 1);
  lock.unlock();
  gate.unlock();

  auto fail = [&](const Status& s) {
    Lock l(mu_);
    if (!failed_) return failed_;
    failed_ = Status(s.error() == 0 ? EIO : s.error(),
                     "commit failed, the volume is read-only now: " + s.message());
    if (on_error_) on_error_(failed_.message());
    return failed_;
  };
  // 1. The data those blocks point at, and the last commit's home writes, are durable.
  if (Status s = btt_->sync_wait(); !s) return fail(s);
  // 2. The transaction into the journal, and durable: from here on replay completes it.
  uint64_t desc_blocks = ceil_div(sizeof(JournalDescriptor) + lbas.size() * 8, bs_);
  if (desc_blocks + lbas.size() > sb_.journal_blocks) {
    // Every call keeps its transaction small (throttle); writing on would overrun the bitmaps.
    return fail(Status(EIO, "transaction of " + std::to_string(lbas.size()) +
                                " blocks does not fit the journal of " +
                                std::to_string(sb_.journal_blocks)));
  }
  std::vector<std::byte> desc(desc_blocks * bs_);
  JournalDescriptor d{kJournalMagic, seq, lbas.size(), 0, 0};
  uint64_t sum = xxhash64(lbas.data(), lbas.size() * 8, seq);
  for (std::size_t i = 0; i < lbas.size(); ++i) sum = xxhash64(images.data() + i * bs_, bs_, sum);
  d.checksum = sum;
  d.header_checksum = xxhash64(&d, offsetof(JournalDescriptor, header_checksum));
  std::memcpy(desc.data(), &d, sizeof d);
  std::memcpy(desc.data() + sizeof d, lbas.data(), lbas.size() * 8);
  for (uint64_t i = 0; i < lbas.size(); ++i) {
    if (Status s = btt_->write(sb_.journal_start + desc_blocks + i, images.data() + i * bs_); !s) {
      return fail(s);
    }
  }
  for (uint64_t i = desc_blocks; i-- > 0;) {  // the first block, with the header, last
    if (Status s = btt_->write(sb_.journal_start + i, desc.data() + i * bs_); !s) return fail(s);
  }
  if (Status s = btt_->sync_wait(); !s) return fail(s);
  // 3. Home. These become durable with the next commit's first step (or replay redoes them).
  for (std::size_t i = 0; i < lbas.size(); ++i) {
    if (Status s = btt_->write(lbas[i], images.data() + i * bs_); !s) return fail(s);
  }
  lock.lock();
  home_pending_ = false;
  layout_committing_.clear();
  for (uint64_t b : freed) quarantine_.erase(b);
  trim_cache();
  return Status::ok();
}

void VolumeImpl::trim_cache() {
  // Every clean block's image is home in the BTT, unless a commit is between its snapshot and
  // its home writes (home_pending_); and nobody holds a pointer into the cache without mu_.
  if (cache_.size() <= cache_limit_ || home_pending_) return;
  const std::size_t target = cache_limit_ - cache_limit_ / 4;
  for (auto it = cache_.begin(); it != cache_.end() && cache_.size() > target;) {
    if (it->first == 0 || dirty_.count(it->first) != 0 || kill_dirty_.count(it->first) != 0) {
      ++it;
    } else {
      it = cache_.erase(it);
    }
  }
}

void VolumeImpl::committer() {
  std::unique_lock cl(commit_mu_);
  for (;;) {
    commit_cv_.wait_for(cl, std::chrono::milliseconds(commit_interval_ms_), [this] {
      return (commit_requested_ && !committing_) || (stopping_ && !committing_);
    });
    if (committing_) continue;  // the interval passed while a caller commits (sync_wait)
    if (gathering_) {
      // The callers the last commit answered come back with their next fsync soon: one commit
      // for all of them, rather than one for the first and another for the rest. The caller
      // that completes the group commits it (commit_or_join); this thread, if time runs out.
      commit_cv_.wait_until(cl, gather_until_, [this] { return stopping_ || !gathering_; });
      if (!gathering_) continue;
      gathering_ = false;
    }
    bool stop = stopping_;
    run_commit(cl);
    if (stop && waiters_.empty()) return;
  }
}

void VolumeImpl::run_commit(std::unique_lock<std::mutex>& cl) {
  for (;;) {
    committing_ = true;
    std::vector<std::function<void(const Status&)>> waiters;
    waiters.swap(waiters_);
    commit_requested_ = false;
    auto start = std::chrono::steady_clock::now();
    if (gather_began_) {
      // The group gathered from the end of the last commit's answers until now, or until time
      // ran out (a group that never came back leaves no gathering to count past that).
      gather_ns_ += uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 std::min(start, gather_until_) - *gather_began_)
                                 .count());
      gather_began_.reset();
    }
    cl.unlock();
    Status s = read_only_ ? Status::ok() : commit();
    auto committed = std::chrono::steady_clock::now();
    auto took = committed - start;
    cl.lock();
    // Counted before the answers: a caller whose fsync returned finds it in health().
    ++commits_done_;
    syncs_answered_ += waiters.size();
    journal_commits_ += journaled_ ? 1 : 0;
    commit_ns_ += uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(took).count());
    cl.unlock();
    for (auto& w : waiters) w(s);
    auto answered = std::chrono::steady_clock::now() - committed;
    cl.lock();
    committing_ = false;
    answer_ns_ += uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(answered).count());
    committed_cv_.notify_all();
    if (waiters.size() > 1 && took >= std::chrono::microseconds(100)) {
      // As the flush channel does after a batch: wait for as many requests as this commit
      // served, up to its own duration (on the root disk, a quarter of it split 8 fsyncing
      // threads into commits of 4.6 on average; the whole of it gives 7.9).
      gathering_ = true;
      gather_target_ = waiters.size();
      gather_began_ = std::chrono::steady_clock::now();
      gather_until_ =
          *gather_began_ + std::clamp<std::chrono::steady_clock::duration>(
                               took, std::chrono::microseconds(20), std::chrono::milliseconds(2));
    }
    // Requests that came during this commit. A whole group, or no group to wait for: this
    // thread commits them at once (handing them to the committer thread costs two wake-ups,
    // more than a commit of an image in memory takes). Part of a group, or an unmount: the
    // committer thread takes over (it waits for the rest of the group, or commits last).
    bool part_of_group = gathering_ && waiters_.size() < gather_target_;
    if (!commit_requested_ || stopping_ || part_of_group) {
      if (commit_requested_ || stopping_) commit_cv_.notify_all();
      return;
    }
    gathering_ = false;
  }
}

void VolumeImpl::sync(std::function<void(const Status&)> done) {
  std::lock_guard lock(commit_mu_);
  waiters_.push_back(std::move(done));
  commit_requested_ = true;
  commit_cv_.notify_all();
}

void VolumeImpl::fsync(uint64_t ino, bool datasync, std::function<void(const Status&)> done) {
  if (datasync) {
    Lock lock(mu_);
    if (!failed_) {
      Status failed = failed_;
      lock.unlock();
      return done(failed);
    }
    if (layout_dirty_.count(ino) == 0 && layout_committing_.count(ino) == 0) {
      lock.unlock();
      // Every block the file has, and its size, are committed: its data is all fdatasync owes.
      return btt_->sync_or_join(std::move(done));
    }
  }
  commit_or_join(std::move(done));
}

Status VolumeImpl::fsync(uint64_t ino, bool datasync) {
  return wait_for_answer([&](auto done) { fsync(ino, datasync, std::move(done)); });
}

Status VolumeImpl::sync_wait() {
  return wait_for_answer([this](auto done) { commit_or_join(std::move(done)); });
}

void VolumeImpl::commit_or_join(std::function<void(const Status&)> done) {
  std::unique_lock cl(commit_mu_);
  waiters_.push_back(std::move(done));
  commit_requested_ = true;
  if (committing_ || stopping_) return;  // the next commit answers it
  if (gathering_) {
    // The committer thread waits for the group (from its first request on; this wakes it) or
    // until time runs out; the caller that completes the group commits it.
    if (waiters_.size() < gather_target_) {
      if (waiters_.size() == 1) commit_cv_.notify_all();
      return;
    }
    gathering_ = false;
  }
  // No commit running: this thread commits (every flush of it sent from here too), and
  // requests queued by sync() ride along. No hand-off to the committer thread and back.
  run_commit(cl);
}

// --- inodes and blocks -----------------------------------------------------------------------

void VolumeImpl::stamp_write(uint64_t ino, Inode& inode) {
  Node& n = node(ino);
  Timestamp t;
  if (n.times_seen) {
    t = now();
    n.times_seen = false;
  } else {
    timespec c;
    clock_gettime(CLOCK_REALTIME_COARSE, &c);
    t = Timestamp{c.tv_sec, uint32_t(c.tv_nsec)};
    // Never back in time: a fine-grained stamp may be ahead of the tick.
    Timestamp newest = std::max(Timestamp{inode.mtime_sec, inode.mtime_nsec},
                                Timestamp{inode.ctime_sec, inode.ctime_nsec});
    if (!(newest < t)) return;
  }
  set_times(inode, t, kMtime | kCtime);
}

Result<Inode> VolumeImpl::iget(uint64_t ino) {
  if (ino == 0 || ino >= sb_.inode_count || !inode_used_[ino]) {
    return Status(ENOENT, "no inode " + std::to_string(ino));
  }
  uint64_t off = ino * kInodeSize;
  Inode inode;
  std::memcpy(&inode, meta(sb_.inode_table_start + off / bs_) + off % bs_, sizeof inode);
  if (inode.checksum != inode_checksum(inode, ino) || inode.mode == 0) {
    return Status(EUCLEAN, "inode " + std::to_string(ino) + " is damaged; run fsck.vpmfs");
  }
  return inode;
}

void VolumeImpl::iput(uint64_t ino, Inode inode) {
  inode.checksum = inode_checksum(inode, ino);
  uint64_t off = ino * kInodeSize;
  uint64_t lba = sb_.inode_table_start + off / bs_;
  Inode old;
  std::memcpy(&old, meta(lba) + off % bs_, sizeof old);
  // Unchanged (an overwrite within the clock's tick, say): nothing to journal.
  if (!layout_changed_ && std::memcmp(&old, &inode, sizeof inode) == 0) return;
  std::byte* slot = meta_mut(lba) + off % bs_;
  // A new size or block map (bmap and punch_blocks flag the changes below the inode) must be
  // committed before fdatasync can leave the journal out.
  if (layout_changed_ || old.size != inode.size || old.blocks != inode.blocks ||
      std::memcmp(old.ptr, inode.ptr, sizeof old.ptr) != 0) {
    layout_dirty_.insert(ino);
    layout_changed_ = false;
  }
  std::memcpy(slot, &inode, sizeof inode);
}

Result<uint64_t> VolumeImpl::ialloc() {
  for (uint64_t k = 0; k < sb_.inode_count; ++k) {
    uint64_t ino = inode_hint_ + k;
    if (ino >= sb_.inode_count) ino = ino % sb_.inode_count;
    if (ino <= kRootIno || inode_used_[ino]) continue;
    inode_used_[ino] = true;
    std::byte* bm = meta_mut(sb_.inode_bitmap_start + ino / (uint64_t(bs_) * 8));
    uint64_t bit = ino % (uint64_t(bs_) * 8);
    bm[bit / 8] |= std::byte(1u << (bit % 8));
    --free_inodes_;
    inode_hint_ = ino + 1;
    return ino;
  }
  return Status(ENOSPC, "no free inodes");
}

void VolumeImpl::ifree(uint64_t ino) {
  Inode zero{};
  uint64_t off = ino * kInodeSize;
  std::memcpy(meta_mut(sb_.inode_table_start + off / bs_) + off % bs_, &zero, sizeof zero);
  inode_used_[ino] = false;
  std::byte* bm = meta_mut(sb_.inode_bitmap_start + ino / (uint64_t(bs_) * 8));
  uint64_t bit = ino % (uint64_t(bs_) * 8);
  bm[bit / 8] &= ~std::byte(1u << (bit % 8));
  ++free_inodes_;
  nodes_.erase(ino);
}

Result<uint64_t> VolumeImpl::balloc() {
  // Quarantined blocks are free but not usable yet; reserved ones belong to an fallocate.
  if (free_blocks_ <= quarantine_.size() + reserved_) {
    return Status(ENOSPC, "no space left on the volume");
  }
  uint64_t n = sb_.block_count;
  for (uint64_t k = 0; k < n; ++k) {
    uint64_t lba = block_hint_ + k;
    if (lba >= n) lba = sb_.data_start + (lba - n) % (n - sb_.data_start);
    if (block_used_[lba] || quarantine_.count(lba) != 0) continue;
    if (lba >= discard_window_.first && lba < discard_window_.second) continue;
    block_used_[lba] = true;
    std::byte* bm = meta_mut(sb_.block_bitmap_start + lba / (uint64_t(bs_) * 8));
    uint64_t bit = lba % (uint64_t(bs_) * 8);
    bm[bit / 8] |= std::byte(1u << (bit % 8));
    --free_blocks_;
    block_hint_ = lba + 1;
    layout_changed_ = true;
    return lba;
  }
  return Status(ENOSPC, "no space left on the volume");
}

Result<uint64_t> VolumeImpl::discard_free(uint64_t start, uint64_t length, uint64_t min_length) {
  if (read_only_) return Status(EROFS, "read-only volume");
  const uint64_t volume_bytes = sb_.block_count * bs_;
  if (start >= volume_bytes) return Status(EINVAL, "the range starts past the end of the volume");
  if (length < bs_) return Status(EINVAL, "the range is shorter than a block");
  const uint64_t end = length > volume_bytes - start ? sb_.block_count : (start + length) / bs_;
  const uint64_t min_run = std::max<uint64_t>(1, ceil_div(min_length, bs_));
  std::lock_guard one_at_a_time(discard_mu_);
  // Blocks freed in the running transaction become free for good when it commits.
  if (Status s = sync_wait(); !s) return s;
  uint64_t discarded = 0;
  uint64_t carried = 0;  // free blocks just before the window, in a run that reaches it
  // A window at a time: under the volume lock its free blocks in long enough runs are listed and
  // the window set aside (balloc passes it by); they are discarded without the lock (a discard
  // may wait for a BTT commit), then the window is given back.
  constexpr uint64_t kWindow = 4096;
  for (uint64_t w = std::max(start / bs_, sb_.data_start); w < end; w += kWindow) {
    const uint64_t w_end = std::min(end, w + kWindow);
    std::vector<uint64_t> blocks;
    {
      Lock lock(mu_);
      if (!failed_) return failed_;
      auto is_free = [&](uint64_t lba) {
        return lba < sb_.block_count && !block_used_[lba] && quarantine_.count(lba) == 0;
      };
      const uint64_t carried_in = carried;
      carried = 0;
      for (uint64_t lba = w; lba < w_end;) {
        if (!is_free(lba)) {
          ++lba;
          continue;
        }
        uint64_t run_end = lba;
        while (run_end < w_end && is_free(run_end)) ++run_end;
        uint64_t total = (lba == w ? carried_in : 0) + (run_end - lba);
        for (uint64_t next = run_end; run_end == w_end && total < min_run && is_free(next);
             ++next) {
          ++total;  // the run goes on into the next window
        }
        if (total >= min_run) {
          for (uint64_t b = lba; b < run_end; ++b) blocks.push_back(b);
        }
        if (run_end == w_end) carried = (lba == w ? carried_in : 0) + (run_end - lba);
        lba = run_end;
      }
      discard_window_ = {w, w_end};
    }
    Status s;
    for (uint64_t lba : blocks) {
      if (s) s = btt_->discard(lba);
    }
    Lock lock(mu_);
    discard_window_ = {0, 0};
    if (!s) return s;
    discarded += blocks.size() * bs_;
  }
  return discarded;
}

void VolumeImpl::bfree(uint64_t lba) {
  if (lba < sb_.data_start || lba >= sb_.block_count || !block_used_[lba]) return;
  block_used_[lba] = false;
  std::byte* bm = meta_mut(sb_.block_bitmap_start + lba / (uint64_t(bs_) * 8));
  uint64_t bit = lba % (uint64_t(bs_) * 8);
  bm[bit / 8] &= ~std::byte(1u << (bit % 8));
  ++free_blocks_;
  layout_changed_ = true;
  // Not reused until the transaction that freed it is durable: a crash before then brings the
  // old owner back, with its data.
  quarantine_.insert(lba);
  freed_.push_back(lba);
  cache_.erase(lba);
  dirty_.erase(lba);  // whatever it held no longer matters
  kill_dirty_.erase(lba);
}

VolumeImpl::Node& VolumeImpl::node(uint64_t ino) {
  auto& n = nodes_[ino];
  if (!n) n = std::make_unique<Node>();
  return *n;
}

Result<uint64_t> VolumeImpl::bmap(Inode& inode, uint64_t fb, bool allocate, bool* fresh) {
  const uint64_t per = bs_ / 8;
  if (fresh != nullptr) *fresh = false;
  int slot_index;
  int depth;
  if (fb < kDirect) {
    slot_index = int(fb);
    depth = 0;
  } else {
    fb -= kDirect;
    uint64_t span = per;
    depth = 1;
    while (fb >= span) {
      fb -= span;
      if (++depth > 4) return Status(EFBIG, "file block beyond the block map");
      span *= per;
    }
    slot_index = kDirect + depth - 1;
  }
  // Walk down: `holder` is the pointer block holding the current slot (0: the inode).
  uint64_t holder = 0;
  uint64_t index = uint64_t(slot_index);
  for (int level = depth;; --level) {
    uint64_t cur;
    if (holder == 0) {
      cur = inode.ptr[index];
    } else {
      std::memcpy(&cur, meta(holder) + index * 8, 8);
    }
    if (cur != 0 && (cur < sb_.data_start || cur >= sb_.block_count)) {
      // Following it would read metadata as file data, and write file data over metadata.
      return Status(EUCLEAN, "a block map points outside the data area; run fsck.vpmfs");
    }
    if (cur == 0) {
      if (!allocate) return uint64_t(0);
      auto b = balloc();
      if (!b) return b.status();
      cur = *b;
      ++inode.blocks;
      if (level > 0) {
        meta_new(cur);  // a pointer block starts empty
      } else if (fresh != nullptr) {
        *fresh = true;
      }
      if (holder == 0) {
        inode.ptr[index] = cur;
      } else {
        std::memcpy(meta_mut(holder) + index * 8, &cur, 8);
      }
    }
    if (level == 0) return cur;
    uint64_t span = 1;
    for (int i = 1; i < level; ++i) span *= per;
    holder = cur;
    index = (fb / span) % per;
  }
}

Status VolumeImpl::truncate_blocks(Inode& inode, uint64_t keep) {
  if (S_ISLNK(inode.mode) && inode.size <= kInlineSymlink) {
    // The pointers hold the target itself, not blocks.
    if (keep == 0) std::memset(inode.ptr, 0, sizeof inode.ptr);
    return Status::ok();
  }
  const uint64_t per = bs_ / 8;
  // Frees the subtree under pointer `p` (at `level`, covering file blocks from `base`) beyond
  // `keep`; returns true if the whole subtree went.
  std::function<bool(uint64_t, int, uint64_t, uint64_t)> prune =
      [&](uint64_t p, int level, uint64_t base, uint64_t span) -> bool {
    if (level == 0) {
      if (base < keep) return false;
      bfree(p);
      --inode.blocks;
      return true;
    }
    uint64_t child_span = span / per;
    bool all = base >= keep;
    for (uint64_t i = 0; i < per; ++i) {
      uint64_t c;
      std::memcpy(&c, meta(p) + i * 8, 8);
      if (c == 0) continue;
      if (base + (i + 1) * child_span <= keep) continue;  // entirely kept
      if (prune(c, level - 1, base + i * child_span, child_span)) {
        uint64_t zero = 0;
        if (!all) std::memcpy(meta_mut(p) + i * 8, &zero, 8);
      } else {
        all = false;
      }
    }
    if (all) {
      bfree(p);
      --inode.blocks;
    }
    return all;
  };
  for (int i = 0; i < kDirect; ++i) {
    if (inode.ptr[i] != 0 && uint64_t(i) >= keep) {
      bfree(inode.ptr[i]);
      --inode.blocks;
      inode.ptr[i] = 0;
    }
  }
  uint64_t base = kDirect;
  uint64_t span = per;
  for (int level = 1; level <= 4; ++level) {
    uint64_t& p = inode.ptr[kDirect + level - 1];
    if (p != 0 && base + span > keep && prune(p, level, base, span)) p = 0;
    base += span;
    span *= per;
  }
  return Status::ok();
}

Attr VolumeImpl::to_attr(uint64_t ino, const Inode& inode, bool report) {
  if (auto it = nodes_.find(ino); report && it != nodes_.end()) it->second->times_seen = true;
  Attr a;
  a.ino = ino;
  a.mode = inode.mode;
  a.nlink = inode.nlink;
  a.uid = inode.uid;
  a.gid = inode.gid;
  a.rdev = inode.rdev;
  a.size = inode.size;
  a.blocks = inode.blocks * (bs_ / 512);
  a.atime = timespec{inode.atime_sec, long(inode.atime_nsec)};
  a.mtime = timespec{inode.mtime_sec, long(inode.mtime_nsec)};
  a.ctime = timespec{inode.ctime_sec, long(inode.ctime_nsec)};
  a.btime = timespec{inode.btime_sec, long(inode.btime_nsec)};
  a.flags = inode.flags;
  a.generation = inode.generation;
  return a;
}

}  // namespace vpmfs
