#include "vpmfs/fsck.h"

#include <sys/stat.h>

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "format.h"
#include "kill_log.h"
#include "vpmfs/btt.h"
#include "vpmfs/checksum.h"
#include "vpmfs/fs.h"
#include "xattr.h"

namespace vpmfs {

using namespace fsfmt;

int FsckReport::exit_code() const {
  if (problems.empty()) return 0;
  return remaining.empty() && !repairs.empty() ? 1 : 4;
}

namespace {

std::string str(const char* fmt, auto... args) {
  char buf[320];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

uint64_t ceil_div(uint64_t a, uint64_t b) {
  return (a + b - 1) / b;
}

class Checker {
 public:
  Checker(Region& region, bool repair, FsckReport& report)
      : region_(region), repair_(repair), report_(report) {}
  std::optional<BootId> boot_id_;

  Status run() {
    ImageHeader h;
    std::memcpy(&h, region_.at(0), sizeof h);
    if (std::memcmp(h.magic, kImageMagic, sizeof h.magic) != 0) {
      return Status(EINVAL, region_.path() + " is not a vpmfs image");
    }
    ImageHeader copy = h;
    copy.checksum = 0;
    if (xxhash64(&copy, sizeof copy) != h.checksum) {
      return Status(EUCLEAN, "image header checksum mismatch: cannot locate the BTT safely");
    }
    if (h.btt_offset > region_.size() || h.btt_size > region_.size() - h.btt_offset) {
      return Status(EUCLEAN, "the image is shorter than its header says (truncated?)");
    }
    BttOpenOptions bo;
    bo.offset = h.btt_offset;
    bo.size = h.btt_size;
    bo.intent_log = h.intent_log_offset;
    auto bc = btt_check(region_, bo, repair_);
    if (!bc) return bc.status();
    for (auto& p : bc->problems) report_.problems.push_back("btt: " + p);
    for (auto& p : bc->repairs) report_.repairs.push_back("btt: " + p);
    for (auto& p : bc->remaining) report_.remaining.push_back("btt: " + p);
    if (!bc->remaining.empty() || (!repair_ && !bc->problems.empty())) {
      // The filesystem above a damaged BTT cannot be read reliably.
      if (!repair_) return Status::ok();
    }
    auto btt = Btt::open(region_, bo);
    if (!btt) return btt.status();
    btt_ = std::move(btt.value());
    bs_ = btt_->sector_size();
    if (Status s = load_superblock(); !s) return s;
    uint64_t journal_txn = 0;
    if (Status s = journal(&journal_txn); !s) return s;
    kill_log(h, journal_txn);
    walk();
    compare();
    if (repair_ && !report_.problems.empty()) {
      if (Status s = btt_->sync_wait(); !s) return s;
      if (journal_txn != 0) {
        // The journal's images are home (journal() wrote them) and the repairs are durable
        // over them: the journal must go, or the next mount would replay those older images
        // over the repairs. Transaction numbers start again from an empty journal, so first
        // the kill log goes too, lest its checkpoints of older transactions look newer (any
        // still pending were applied above).
        if (h.kill_log_size != 0) {
          KillLog(region_, h.kill_log_offset, h.kill_log_size, bs_, BootId{}).clear();
          region_.persist(h.kill_log_offset, h.kill_log_size);
        }
        std::vector<std::byte> zero(bs_);
        write_block(sb_.journal_start, zero.data());
        if (Status s = btt_->sync_wait(); !s) return s;
      }
    }
    return Status::ok();
  }

 private:
  void problem(const std::string& p) { report_.problems.push_back(p); }
  void repaired(const std::string& p) { report_.repairs.push_back(p); }
  void unrepaired(const std::string& p) {
    report_.problems.push_back(p);
    report_.remaining.push_back(p);
  }

  const std::byte* block(uint64_t lba) {
    auto it = overlay_.find(lba);
    if (it != overlay_.end()) return it->second.data();
    auto& buf = cache_[lba];
    if (buf.empty()) {
      buf.resize(bs_);
      if (!btt_->read(lba, buf.data())) std::fill(buf.begin(), buf.end(), std::byte{0});
    }
    return buf.data();
  }

  void write_block(uint64_t lba, const std::byte* data) {
    overlay_[lba].assign(data, data + bs_);
    (void)btt_->write(lba, data);
  }

  Status load_superblock() {
    std::memcpy(&sb_, block(0), sizeof sb_);
    Superblock copy = sb_;
    copy.checksum = 0;
    if (sb_.magic != kSuperMagic || xxhash64(&copy, sizeof copy) != sb_.checksum) {
      return Status(EUCLEAN, "superblock is damaged; cannot check the filesystem");
    }
    uint64_t n = btt_->sector_count();
    if (sb_.block_size != bs_ || sb_.block_count != n || sb_.data_start >= n ||
        sb_.inode_count == 0 || sb_.inode_table_start + sb_.inode_table_blocks != sb_.data_start ||
        sb_.inode_table_blocks != sb_.inode_count / (bs_ / kInodeSize)) {
      return Status(EUCLEAN, "superblock geometry is inconsistent");
    }
    return Status::ok();
  }

  // The checkpoints a daemon killed on this boot left: the next mount replays them, so they
  // are part of the state to check. Repair applies them and empties the kill log.
  void kill_log(const ImageHeader& h, uint64_t journal_txn) {
    std::optional<BootId> boot = boot_id_ ? boot_id_ : current_boot_id();
    if (!boot || h.kill_log_size == 0) return;
    KillImages pending = read_kill_log(region_, h.kill_log_offset, h.kill_log_size, bs_,
                                       journal_txn, *boot, sb_.block_count);
    std::size_t blocks = 0;
    for (const auto& images : pending) {
      for (const auto& [lba, image] : images) {
        if (repair_) {
          write_block(lba, image.data());
        } else {
          overlay_[lba] = image;
        }
        ++blocks;
      }
    }
    if (overlay_.count(0) != 0) std::memcpy(&sb_, block(0), sizeof sb_);
    if (blocks == 0) return;
    if (repair_) {
      // Applied in place. Once that is durable the journal must go, or the next mount would
      // replay its older images over these; then the kill log may forget them.
      (void)btt_->sync_wait();
      std::vector<std::byte> zero(bs_);
      write_block(sb_.journal_start, zero.data());
      (void)btt_->sync_wait();
      KillLog(region_, h.kill_log_offset, h.kill_log_size, bs_, *boot).clear();
      region_.persist(h.kill_log_offset, h.kill_log_size);
      repaired("applied " + std::to_string(blocks) +
               " metadata blocks a killed daemon left in the kill log");
    }
  }

  Status journal(uint64_t* txn) {
    JournalDescriptor d;
    std::memcpy(&d, block(sb_.journal_start), sizeof d);
    if (d.magic != kJournalMagic ||
        d.header_checksum != xxhash64(&d, offsetof(JournalDescriptor, header_checksum))) {
      return Status::ok();
    }
    uint64_t desc_blocks = ceil_div(sizeof d + d.count * 8, bs_);
    if (d.count == 0 || desc_blocks + d.count > sb_.journal_blocks) return Status::ok();
    std::vector<std::byte> desc(desc_blocks * bs_);
    for (uint64_t i = 0; i < desc_blocks; ++i) {
      std::memcpy(desc.data() + i * bs_, block(sb_.journal_start + i), bs_);
    }
    std::vector<uint64_t> lbas(d.count);
    std::memcpy(lbas.data(), desc.data() + sizeof d, d.count * 8);
    uint64_t sum = xxhash64(lbas.data(), lbas.size() * 8, d.sequence);
    for (uint64_t i = 0; i < d.count; ++i) {
      sum = xxhash64(block(sb_.journal_start + desc_blocks + i), bs_, sum);
    }
    if (sum != d.checksum) {
      *txn = d.sequence - 1;
      return Status::ok();
    }
    *txn = d.sequence;
    // The last committed transaction: the state to check is the one after replaying it, as a
    // mount would. Replaying is idempotent, so this is not a problem in itself.
    for (uint64_t i = 0; i < d.count; ++i) {
      if (lbas[i] >= sb_.block_count) continue;
      const std::byte* img = block(sb_.journal_start + desc_blocks + i);
      if (repair_) {
        write_block(lbas[i], img);
      } else {
        overlay_[lbas[i]].assign(img, img + bs_);
      }
    }
    if (overlay_.count(0) != 0) std::memcpy(&sb_, block(0), sizeof sb_);
    return Status::ok();
  }

  std::optional<Inode> inode(uint64_t ino) {
    if (ino == 0 || ino >= sb_.inode_count) return std::nullopt;
    uint64_t off = ino * kInodeSize;
    Inode i;
    std::memcpy(&i, block(sb_.inode_table_start + off / bs_) + off % bs_, sizeof i);
    Inode copy = i;
    copy.checksum = 0;
    if (i.mode == 0 || xxhash64(&copy, sizeof copy, ino) != i.checksum) return std::nullopt;
    return i;
  }

  // Visits every block of an inode's map (pointer blocks too); false if a pointer is invalid.
  void blocks_of(uint64_t ino, const Inode& in,
                 const std::function<void(uint64_t, uint64_t)>& data) {
    const uint64_t per = bs_ / 8;
    auto claim = [&](uint64_t lba) {
      if (lba < sb_.data_start || lba >= sb_.block_count) {
        problem(str("inode %llu points at block %llu outside the data area",
                    (unsigned long long)ino, (unsigned long long)lba));
        return false;
      }
      if (owner_.count(lba) != 0) {
        problem(str("block %llu is owned by inode %llu and inode %llu", (unsigned long long)lba,
                    (unsigned long long)owner_[lba], (unsigned long long)ino));
        return false;
      }
      owner_[lba] = ino;
      ++owned_[ino];
      return true;
    };
    xattr_block_of(ino, in, claim);
    std::function<void(uint64_t, int, uint64_t, uint64_t)> walk =
        [&](uint64_t p, int level, uint64_t base, uint64_t span) {
          if (!claim(p)) return;
          if (level == 0) {
            data(base, p);
            return;
          }
          uint64_t child = span / per;
          for (uint64_t i = 0; i < per; ++i) {
            uint64_t c;
            std::memcpy(&c, block(p) + i * 8, 8);
            if (c != 0) walk(c, level - 1, base + i * child, child);
          }
        };
    if (S_ISLNK(in.mode) && in.size <= kInlineSymlink) return;
    for (int i = 0; i < kDirect; ++i) {
      if (in.ptr[i] != 0) walk(in.ptr[i], 0, uint64_t(i), 1);
    }
    uint64_t base = kDirect, span = per;
    for (int level = 1; level <= 4; ++level) {
      if (in.ptr[kDirect + level - 1] != 0) walk(in.ptr[kDirect + level - 1], level, base, span);
      base += span;
      span *= per;
    }
  }

  // An inode's xattr block: owned by it and counted in its blocks. A damaged one (outside the
  // data area, owned twice, failing its checksum or format) is a problem; repair drops it,
  // with every attribute in it, rather than guess at what it held.
  void xattr_block_of(uint64_t ino, const Inode& in, const std::function<bool(uint64_t)>& claim) {
    const uint64_t lba = in.xattr_block;
    if (lba == 0) return;
    std::string why;
    if (lba < sb_.data_start || lba >= sb_.block_count) {
      why = "outside the data area";
    } else if (owner_.count(lba) != 0) {
      why = str("also owned by inode %llu", (unsigned long long)owner_[lba]);
    } else if (auto entries = xattr::decode(block(lba), bs_, ino); !entries) {
      why = entries.status().message();
    }
    if (why.empty()) {
      claim(lba);
      return;
    }
    problem(str("inode %llu: xattr block %llu is damaged (%s)", (unsigned long long)ino,
                (unsigned long long)lba, why.c_str()));
    if (!repair_) {
      // Counted as the inode's, so that this is the one problem reported for it.
      if (lba >= sb_.data_start && lba < sb_.block_count && owner_.count(lba) == 0) claim(lba);
      return;
    }
    Inode fixed = in;
    fixed.xattr_block = 0;
    if (fixed.blocks > 0) --fixed.blocks;
    put_inode(ino, fixed);
    repaired(str("inode %llu: dropped its damaged xattr block %llu", (unsigned long long)ino,
                 (unsigned long long)lba));
  }

  void walk() {
    // Breadth-first from the root; directories must form a tree.
    std::vector<uint64_t> queue = {kRootIno};
    seen_[kRootIno] = 0;
    parent_of_[kRootIno] = kRootIno;
    for (std::size_t qi = 0; qi < queue.size(); ++qi) {
      uint64_t dino = queue[qi];
      auto dir = inode(dino);
      if (!dir) {
        unrepaired(str("directory inode %llu is damaged", (unsigned long long)dino));
        continue;
      }
      if (dir->parent != parent_of_[dino]) {
        problem(str("directory %llu says its parent is %llu, but it is in %llu",
                    (unsigned long long)dino, (unsigned long long)dir->parent,
                    (unsigned long long)parent_of_[dino]));
        if (repair_) fix_parent_.push_back(dino);
      }
      check_inode(dino, *dir);
      blocks_of(dino, *dir, [&](uint64_t fb, uint64_t lba) {
        if (fb * bs_ >= dir->size) return;
        const std::byte* p = block(lba);
        uint32_t off = 0;
        while (off + sizeof(DirRecordHeader) <= bs_) {
          DirRecordHeader h;
          std::memcpy(&h, p + off, sizeof h);
          if (h.rec_len < sizeof h || h.rec_len % 8 != 0 || off + h.rec_len > bs_) {
            unrepaired(str("directory %llu block %llu: damaged record at offset %u",
                           (unsigned long long)dino, (unsigned long long)fb, off));
            break;
          }
          if (h.ino != 0) {
            std::string name(reinterpret_cast<const char*>(p + off + sizeof h),
                             std::min<std::size_t>(h.name_len, h.rec_len - sizeof h));
            auto child = inode(h.ino);
            if (!child) {
              unrepaired(str("directory %llu: entry \"%s\" names inode %llu, which is not valid",
                             (unsigned long long)dino, name.c_str(), (unsigned long long)h.ino));
            } else {
              ++links_[h.ino];
              if (S_ISDIR(child->mode)) {
                ++subdirs_[dino];
                if (seen_.count(h.ino) != 0) {
                  unrepaired(str("directory %llu is linked from more than one place",
                                 (unsigned long long)h.ino));
                } else {
                  seen_[h.ino] = dino;
                  parent_of_[h.ino] = dino;
                  queue.push_back(h.ino);
                }
              } else if (seen_.emplace(h.ino, dino).second) {
                check_inode(h.ino, *child);
                blocks_of(h.ino, *child, [](uint64_t, uint64_t) {});
              }
            }
          }
          off += h.rec_len;
        }
      });
    }
    // Orphans: unlinked while open; the next mount frees them.
    for (uint64_t ino = sb_.orphan_head, guard = 0; ino != 0 && guard < sb_.inode_count; ++guard) {
      auto in = inode(ino);
      if (!in) {
        unrepaired(
            str("orphan chain names inode %llu, which is not valid", (unsigned long long)ino));
        break;
      }
      if (seen_.emplace(ino, 0).second) {
        orphan_.insert(ino);
        blocks_of(ino, *in, [](uint64_t, uint64_t) {});
      }
      ino = in->next_orphan;
    }
  }

  void check_inode(uint64_t ino, const Inode& in) {
    if (S_ISDIR(in.mode) && in.size % bs_ != 0) {
      unrepaired(str("directory %llu has size %llu, not a multiple of the block size",
                     (unsigned long long)ino, (unsigned long long)in.size));
    }
  }

  void compare() {
    // Link counts.
    for (const auto& [ino, dino] : seen_) {
      (void)dino;
      if (orphan_.count(ino) != 0) continue;
      auto in = inode(ino);
      if (!in) continue;
      uint32_t want = S_ISDIR(in->mode) ? 2 + subdirs_[ino] : links_[ino];
      if (ino == kRootIno) want = 2 + subdirs_[ino];
      if (in->nlink != want) {
        problem(str("inode %llu has link count %u, the tree says %u", (unsigned long long)ino,
                    in->nlink, want));
        if (repair_) {
          in->nlink = want;
          put_inode(ino, *in);
          repaired(str("inode %llu: set its link count to %u", (unsigned long long)ino, want));
        }
      }
      if (in->blocks != owned_[ino]) {
        problem(str("inode %llu counts %llu blocks but owns %llu", (unsigned long long)ino,
                    (unsigned long long)in->blocks, (unsigned long long)owned_[ino]));
        if (repair_) {
          in->blocks = owned_[ino];
          put_inode(ino, *in);
          repaired(str("inode %llu: set its block count to %llu", (unsigned long long)ino,
                       (unsigned long long)owned_[ino]));
        }
      }
    }
    if (repair_) {
      for (uint64_t dino : fix_parent_) {
        auto in = inode(dino);
        if (!in) continue;
        in->parent = parent_of_[dino];
        put_inode(dino, *in);
        repaired(str("directory %llu: set its parent to %llu", (unsigned long long)dino,
                     (unsigned long long)parent_of_[dino]));
      }
    }
    // Bitmaps against what is reachable.
    auto bitmap = [&](uint64_t start, uint64_t count, uint64_t bits, const char* what,
                      const std::function<bool(uint64_t)>& used) {
      uint64_t wrong = 0, first = 0;
      for (uint64_t b = 0; b < count; ++b) {
        std::vector<std::byte> want(bs_);
        for (uint64_t bit = 0; bit < uint64_t(bs_) * 8; ++bit) {
          uint64_t i = b * bs_ * 8 + bit;
          if (i >= bits || used(i)) want[bit / 8] |= std::byte(1u << (bit % 8));
        }
        const std::byte* have = block(start + b);
        for (uint64_t bit = 0; bit < uint64_t(bs_) * 8; ++bit) {
          uint64_t i = b * bs_ * 8 + bit;
          if (i >= bits) break;
          if (((uint8_t(have[bit / 8]) ^ uint8_t(want[bit / 8])) >> (bit % 8)) & 1) {
            if (wrong++ == 0) first = i;
          }
        }
        if (std::memcmp(have, want.data(), bs_) != 0 && repair_)
          write_block(start + b, want.data());
      }
      if (wrong != 0) {
        problem(str("%s bitmap disagrees with the tree on %llu entries (first: %llu)", what,
                    (unsigned long long)wrong, (unsigned long long)first));
        if (repair_) repaired(str("rewrote the %s bitmap", what));
      }
    };
    bitmap(sb_.block_bitmap_start, sb_.block_bitmap_blocks, sb_.block_count, "block",
           [&](uint64_t lba) { return lba < sb_.data_start || owner_.count(lba) != 0; });
    bitmap(sb_.inode_bitmap_start, sb_.inode_bitmap_blocks, sb_.inode_count, "inode",
           [&](uint64_t ino) { return ino <= kRootIno || seen_.count(ino) != 0; });
    report_.inodes = seen_.size();
    report_.blocks = owner_.size();
  }

  void put_inode(uint64_t ino, Inode in) {
    in.checksum = 0;
    in.checksum = xxhash64(&in, sizeof in, ino);
    uint64_t off = ino * kInodeSize;
    uint64_t lba = sb_.inode_table_start + off / bs_;
    std::vector<std::byte> b(block(lba), block(lba) + bs_);
    std::memcpy(b.data() + off % bs_, &in, sizeof in);
    write_block(lba, b.data());
  }

  Region& region_;
  bool repair_;
  FsckReport& report_;
  std::unique_ptr<Btt> btt_;
  uint32_t bs_ = 0;
  Superblock sb_{};
  std::unordered_map<uint64_t, std::vector<std::byte>> overlay_;  // replayed journal, repairs
  std::unordered_map<uint64_t, std::vector<std::byte>> cache_;
  std::unordered_map<uint64_t, uint64_t> owner_;  // block -> inode
  std::unordered_map<uint64_t, uint64_t> owned_;  // inode -> blocks
  std::unordered_map<uint64_t, uint64_t> seen_;   // reachable inode -> a directory holding it
  std::unordered_map<uint64_t, uint64_t> parent_of_;
  std::unordered_map<uint64_t, uint32_t> links_;
  std::unordered_map<uint64_t, uint32_t> subdirs_;
  std::unordered_set<uint64_t> orphan_;
  std::vector<uint64_t> fix_parent_;
};

}  // namespace

Result<FsckReport> fsck(const std::string& image, const FsckOptions& options) {
  RegionOptions ro;
  ro.read_only = !options.repair;
  ro.mode = PersistMode::writeback;
  if (ro.read_only) ro.mode.reset();
  auto region = Region::open(image, ro);
  if (!region && region.status().error() == EINVAL && options.repair) {
    ro.mode.reset();  // device-dax: direct
    region = Region::open(image, ro);
  }
  if (!region) return region.status();
  FsckReport report;
  {
    // Gone before the region is: its BTT uses the region until it is destroyed.
    Checker checker(**region, options.repair, report);
    checker.boot_id_ = options.boot_id;
    if (Status s = checker.run(); !s) return s;
  }
  if (options.repair && !report.problems.empty()) {
    // What a fresh check still finds is what repair could not fix.
    region->reset();
    FsckOptions check_only;
    check_only.boot_id = options.boot_id;
    auto again = fsck(image, check_only);
    if (!again) return again.status();
    report.remaining = again->problems;
  }
  return report;
}

}  // namespace vpmfs
