#include "vpmfs/fsck.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
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

constexpr uint64_t kMaxFileSize = 16ull << 40;  // the volume's limit (fs/ops.cc)
constexpr uint32_t kMaxLinks = 65000;           // link() refuses more
constexpr uint64_t kMkfsInodeRatio = 16384;     // MkfsOptions' default
constexpr uint64_t kMaxSymlink = 4095;          // symlink() refuses 4096 and more

std::string str(const char* fmt, auto... args) {
  char buf[400];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

uint64_t ceil_div(uint64_t a, uint64_t b) {
  return (a + b - 1) / b;
}

// A directory entry's name for messages: quoted, with bytes that are not printable as '?'.
std::string quoted(const std::string& name) {
  std::string out = "\"";
  for (char c : name) out += (c >= 0x20 && c < 0x7F) ? c : '?';
  return out + "\"";
}

bool valid_type(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG:
    case S_IFDIR:
    case S_IFLNK:
    case S_IFCHR:
    case S_IFBLK:
    case S_IFIFO:
    case S_IFSOCK:
      return true;
    default:
      return false;
  }
}

// The mode type a directory record's DT_* value stands for; 0 for none.
uint32_t type_of_dt(uint8_t dt) {
  uint32_t mode = DTTOIF(dt);
  return dt != DT_UNKNOWN && valid_type(mode) ? mode : 0;
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
    for (auto& p : bc->notes) report_.notes.push_back("btt: " + p);
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
    n_ = btt_->sector_count();
    // Without a sound superblock (found or rebuilt) nothing else can be located: the damage is
    // reported, and left.
    if (!superblock(h)) return Status::ok();
    uint64_t journal_txn = 0;
    journal(&journal_txn);
    kill_log(h, journal_txn);
    if (replayed_super_) replayed_superblock();
    walk();
    orphans();
    reconnect();
    settle();
    place_lost();
    compare();
    if (repair_ && !report_.problems.empty()) {
      if (Status s = btt_->sync_wait(); !s) return s;
      if (journal_txn != 0 || drop_journal_) {
        // The journal's images are home (journal() wrote them) and the repairs are durable
        // over them: the journal must go, or the next mount would replay those older images
        // over the repairs. Transaction numbers start again from an empty journal, so first
        // the kill log goes too, lest its checkpoints of older transactions look newer (any
        // still pending were applied above).
        clear_kill_log(h);
        std::vector<std::byte> zero(bs_);
        write_block(sb_.journal_start, zero.data());
        if (Status s = btt_->sync_wait(); !s) return s;
        if (drop_journal_) repaired("emptied the journal");
      }
    }
    return Status::ok();
  }

 private:
  // Who owns a block, and through which pointer: slot `index` of the inode's own pointers
  // (holder 0) or of pointer block `holder`.
  struct Claim {
    enum Kind { data, pointer, dir, xattr };
    uint64_t ino;
    uint64_t holder;
    uint64_t index;
    Kind kind;
  };
  // A block a second owner's map names, where both may keep it: that owner gets a copy of its
  // own (of a pointer block, with copies of everything below it).
  struct Shared {
    uint64_t ino, holder, index, lba;
    Claim::Kind kind;
  };
  // A pointer that lost its block to a claim with a better right to it: it becomes a hole.
  struct Drop {
    uint64_t ino, holder, index, lba;
  };
  struct Mapped {
    uint64_t fb, lba;
  };
  // A directory listed by a directory its parent field does not name: settled once every
  // listing that agrees with a parent field is known.
  struct Listing {
    uint64_t dino, lba;
    uint32_t off;
    std::string name;
    uint64_t ino;
  };
  using Names = std::unordered_map<std::string, uint64_t>;

  void problem(const std::string& p) { report_.problems.push_back(p); }
  void repaired(const std::string& p) {
    if (repair_) report_.repairs.push_back(p);
  }
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
    if (!repair_) return;
    overlay_[lba].assign(data, data + bs_);
    (void)btt_->write(lba, data);
  }

  bool in_data(uint64_t lba) const { return lba >= sb_.data_start && lba < sb_.block_count; }

  // The kill log, all of it, not only its half headers: after the journal is emptied
  // transaction numbers start again from 1, and a stale record of an earlier transaction with
  // the same number would pass for one of the next. Pages already zero are left alone, so that
  // a sparse image stays sparse.
  void clear_kill_log(const ImageHeader& h) {
    if (!repair_ || h.kill_log_size == 0) return;
    static constexpr std::byte kZeros[4096] = {};
    for (uint64_t off = 0; off < h.kill_log_size; off += sizeof kZeros) {
      uint64_t len = std::min<uint64_t>(sizeof kZeros, h.kill_log_size - off);
      if (std::memcmp(region_.at(h.kill_log_offset + off), kZeros, len) != 0) {
        region_.zero(h.kill_log_offset + off, len);
      }
    }
    region_.persist(h.kill_log_offset, h.kill_log_size);
  }

  // --- superblock ------------------------------------------------------------------------------

  // Why the mount would refuse a superblock (fs/volume.cc); empty if it would not. Stricter
  // where the mount's sums can wrap around.
  std::string superblock_problem(const Superblock& s) const {
    if (s.magic != kSuperMagic) return "bad magic";
    if (s.checksum != super_checksum(s)) return "checksum mismatch";
    const uint64_t per = bs_ / kInodeSize, bits = uint64_t(bs_) * 8;
    bool sane = s.version == kFsVersion && s.block_size == bs_ && s.block_count == n_ &&
                s.journal_start == 1 && s.journal_blocks >= 8 && s.journal_blocks < n_ &&
                s.block_bitmap_start == s.journal_start + s.journal_blocks &&
                s.block_bitmap_blocks == ceil_div(n_, bits) &&
                s.inode_bitmap_start == s.block_bitmap_start + s.block_bitmap_blocks &&
                s.inode_count > kRootIno && s.inode_count % per == 0 && s.inode_count / per < n_ &&
                s.inode_bitmap_blocks == ceil_div(s.inode_count, bits) &&
                s.inode_table_start == s.inode_bitmap_start + s.inode_bitmap_blocks &&
                s.inode_table_blocks == s.inode_count / per &&
                s.data_start == s.inode_table_start + s.inode_table_blocks && s.data_start < n_ &&
                s.orphan_head < s.inode_count;
    return sane ? "" : "its geometry is inconsistent";
  }

  bool superblock(const ImageHeader& h) {
    Superblock s;
    std::memcpy(&s, block(0), sizeof s);
    std::string why = superblock_problem(s);
    if (why.empty()) {
      sb_ = s;
      return true;
    }
    auto rebuilt = rebuild_superblock(s, h);
    if (!rebuilt) {
      unrepaired("superblock is damaged (" + why +
                 ") and cannot be rebuilt: no geometry mkfs makes for this BTT finds its inode "
                 "table; cannot check the filesystem");
      return false;
    }
    problem("superblock is damaged (" + why + ")");
    sb_ = *rebuilt;
    if (repair_) {
      put_super();
      repaired(
          str("rebuilt the superblock from the BTT's geometry: %llu inodes, data from block "
              "%llu",
              (unsigned long long)sb_.inode_count, (unsigned long long)sb_.data_start));
    }
    return true;
  }

  // The superblock mkfs would have written for this BTT (fs/volume.cc, Volume::mkfs), with the
  // inode counts and journal sizes the damaged one's fields imply and mkfs's defaults. A
  // candidate counts only if sound inodes are where it puts the inode table, most of their
  // blocks in its data area, none past its end, and the inode bitmap marks every inode number
  // past its inode count used, as mkfs and every repair leave it.
  std::optional<Superblock> rebuild_superblock(const Superblock& stored, const ImageHeader& h) {
    const uint64_t per = bs_ / kInodeSize, bits = uint64_t(bs_) * 8;
    std::vector<uint64_t> journals;
    if (stored.journal_blocks >= 8 && stored.journal_blocks < n_) {
      journals.push_back(stored.journal_blocks);
    }
    journals.push_back(std::clamp<uint64_t>(n_ / 64, 64, bs_ == 512 ? 16384 : 4096));
    std::vector<uint64_t> counts;
    auto count = [&](uint64_t c) {
      if (c > kRootIno && c % per == 0 && c / per < n_ &&
          std::find(counts.begin(), counts.end(), c) == counts.end()) {
        counts.push_back(c);
      }
    };
    count(stored.inode_count);
    if (stored.inode_table_blocks < n_) count(stored.inode_table_blocks * per);
    if (stored.data_start > stored.inode_table_start && stored.data_start < n_) {
      count((stored.data_start - stored.inode_table_start) * per);
    }
    count(ceil_div(std::max<uint64_t>(per * 4, h.image_size / kMkfsInodeRatio), per) * per);
    // Too small a count fails the checks below (sound inodes past the end of its table, or
    // free ones in its bitmap's tail); too large a one can pass them: the smallest that fits.
    std::sort(counts.begin(), counts.end());
    for (uint64_t journal_blocks : journals) {
      for (uint64_t inode_count : counts) {
        Superblock s{};
        s.magic = kSuperMagic;
        s.version = kFsVersion;
        s.block_size = bs_;
        s.block_count = n_;
        s.inode_count = inode_count;
        s.journal_start = 1;
        s.journal_blocks = journal_blocks;
        s.block_bitmap_start = s.journal_start + s.journal_blocks;
        s.block_bitmap_blocks = ceil_div(n_, bits);
        s.inode_bitmap_start = s.block_bitmap_start + s.block_bitmap_blocks;
        s.inode_bitmap_blocks = ceil_div(inode_count, bits);
        s.inode_table_start = s.inode_bitmap_start + s.inode_bitmap_blocks;
        s.inode_table_blocks = inode_count / per;
        s.data_start = s.inode_table_start + s.inode_table_blocks;
        if (s.data_start + 16 > n_ || !table_fits(s)) continue;
        s.orphan_head = stored.orphan_head < inode_count ? stored.orphan_head : 0;
        std::memcpy(s.uuid, h.uuid, sizeof s.uuid);
        std::memcpy(s.label, h.label, sizeof s.label);
        s.label[sizeof s.label - 1] = '\0';
        s.created_sec = h.created_sec;
        s.dax_default = 2;
        s.checksum = super_checksum(s);
        return s;
      }
    }
    return std::nullopt;
  }

  bool table_fits(const Superblock& s) {
    // Inodes are checksummed with their number: sound ones at their slots say the table starts
    // there, and most of them (damage may have hit a few) have their blocks in the data area
    // that follows it.
    const uint64_t per = bs_ / kInodeSize;
    uint64_t found = 0, inside = 0, outside = 0;
    for (uint64_t ino = kRootIno; ino < s.inode_count && found < 64; ++ino) {
      Inode in;
      std::memcpy(&in, block(s.inode_table_start + ino / per) + ino % per * kInodeSize, sizeof in);
      if (in.mode == 0 || !valid_type(in.mode) || in.checksum != inode_checksum(in, ino)) {
        continue;
      }
      ++found;
      if (S_ISLNK(in.mode) && in.size <= kInlineSymlink) continue;
      bool any = false, all_inside = true;
      for (uint64_t p : in.ptr) {
        if (p == 0) continue;
        any = true;
        all_inside &= p >= s.data_start && p < n_;
      }
      if (any) ++(all_inside ? inside : outside);
    }
    if (found == 0 || outside > inside) return false;
    for (uint64_t ino = s.inode_count; ino < s.inode_count + 4 * per; ++ino) {
      Inode in;
      std::memcpy(&in, block(s.inode_table_start + ino / per) + ino % per * kInodeSize, sizeof in);
      if (in.mode != 0 && valid_type(in.mode) && in.checksum == inode_checksum(in, ino)) {
        return false;  // the table goes on
      }
    }
    const uint64_t bits = uint64_t(bs_) * 8;
    for (uint64_t i = s.inode_count; i < s.inode_bitmap_blocks * bits; ++i) {
      const std::byte* b = block(s.inode_bitmap_start + i / bits);
      if (((uint8_t(b[i % bits / 8]) >> (i % 8)) & 1) == 0) return false;
    }
    return true;
  }

  // A replay put an image of block 0 in place: it must be as sound as the superblock it
  // replaces, or that one stays.
  void replayed_superblock() {
    Superblock s;
    std::memcpy(&s, block(0), sizeof s);
    std::string why = superblock_problem(s);
    if (why.empty()) {
      sb_ = s;
      return;
    }
    problem("the journal or kill log holds a damaged superblock (" + why + ")");
    if (repair_) {
      put_super();
      repaired("wrote the superblock back over it");
    }
  }

  void put_super() {
    if (!repair_) return;
    sb_.checksum = super_checksum(sb_);
    std::vector<std::byte> b(bs_);
    std::memcpy(b.data(), &sb_, sizeof sb_);
    write_block(0, b.data());
  }

  // --- journal and kill log ----------------------------------------------------------------------

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
        if (lba >= sb_.journal_start && lba < sb_.journal_start + sb_.journal_blocks) {
          problem(str("the kill log holds an image of journal block %llu; a mount refuses it",
                      (unsigned long long)lba));
          drop_journal_ = true;
          continue;
        }
        if (repair_) {
          write_block(lba, image.data());
        } else {
          overlay_[lba] = image;
        }
        if (lba == 0) replayed_super_ = true;
        ++blocks;
      }
    }
    if (blocks == 0) return;
    report_.notes.push_back(
        str("kill log: %zu metadata blocks a daemon killed on this boot left %s", blocks,
            repair_ ? "applied" : "are replayed by the next mount"));
    if (repair_) {
      // Applied in place. Once that is durable the journal must go, or the next mount would
      // replay its older images over these; then the kill log may forget them.
      (void)btt_->sync_wait();
      std::vector<std::byte> zero(bs_);
      write_block(sb_.journal_start, zero.data());
      (void)btt_->sync_wait();
      clear_kill_log(h);
    }
  }

  void journal(uint64_t* txn) {
    JournalDescriptor d;
    std::memcpy(&d, block(sb_.journal_start), sizeof d);
    if (d.magic != kJournalMagic ||
        d.header_checksum != xxhash64(&d, offsetof(JournalDescriptor, header_checksum))) {
      return;  // no transaction
    }
    // count first: 40 + 8 * count wraps around for the largest counts.
    if (d.count == 0 || d.count > sb_.journal_blocks ||
        ceil_div(sizeof d + d.count * 8, bs_) + d.count > sb_.journal_blocks) {
      problem(
          str("journal descriptor of transaction %llu is damaged: %llu images do not fit the "
              "%llu-block journal, and a mount refuses it",
              (unsigned long long)d.sequence, (unsigned long long)d.count,
              (unsigned long long)sb_.journal_blocks));
      *txn = d.sequence > 0 ? d.sequence - 1 : 0;
      drop_journal_ = true;
      return;
    }
    uint64_t desc_blocks = ceil_div(sizeof d + d.count * 8, bs_);
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
      // Never committed, so never written home: nothing to replay (as the mount decides).
      *txn = d.sequence - 1;
      return;
    }
    *txn = d.sequence;
    uint64_t not_home = 0;
    // The last committed transaction: the state to check is the one after replaying it, as a
    // mount would. Replaying is idempotent, so this is not a problem in itself. A home outside
    // the blocks a transaction may change makes the mount refuse the journal: the others are
    // still the newest images of their blocks, and repair writes them before emptying it.
    for (uint64_t i = 0; i < d.count; ++i) {
      if (lbas[i] >= sb_.block_count ||
          (lbas[i] >= sb_.journal_start && lbas[i] < sb_.journal_start + sb_.journal_blocks)) {
        problem(
            str("journal transaction %llu names block %llu as a home, out of range; a mount "
                "refuses it",
                (unsigned long long)d.sequence, (unsigned long long)lbas[i]));
        drop_journal_ = true;
        continue;
      }
      const std::byte* img = block(sb_.journal_start + desc_blocks + i);
      if (std::memcmp(block(lbas[i]), img, bs_) != 0) ++not_home;
      if (repair_) {
        write_block(lbas[i], img);
      } else {
        overlay_[lbas[i]].assign(img, img + bs_);
      }
      if (lbas[i] == 0) replayed_super_ = true;
    }
    // After a clean unmount every image is home already: nothing to say.
    if (not_home != 0) {
      report_.notes.push_back(
          str("journal: %llu of the %llu blocks of committed transaction %llu are not home yet; "
              "%s",
              (unsigned long long)not_home, (unsigned long long)d.count,
              (unsigned long long)d.sequence, repair_ ? "written" : "the next mount writes them"));
    }
  }

  // --- inodes -----------------------------------------------------------------------------------

  Inode raw_inode(uint64_t ino) {
    uint64_t off = ino * kInodeSize;
    Inode i;
    std::memcpy(&i, block(sb_.inode_table_start + off / bs_) + off % bs_, sizeof i);
    return i;
  }

  std::optional<Inode> inode(uint64_t ino) {
    if (ino == 0 || ino >= sb_.inode_count) return std::nullopt;
    Inode i = raw_inode(ino);
    if (i.mode == 0 || inode_checksum(i, ino) != i.checksum) return std::nullopt;
    return i;
  }

  // Stores the checked copy of an inode (good_), with a fresh checksum.
  void put_inode(uint64_t ino) {
    if (!repair_) return;
    Inode& in = good_.at(ino);
    in.checksum = inode_checksum(in, ino);
    uint64_t off = ino * kInodeSize;
    uint64_t lba = sb_.inode_table_start + off / bs_;
    std::vector<std::byte> b(block(lba), block(lba) + bs_);
    std::memcpy(b.data() + off % bs_, &in, sizeof in);
    write_block(lba, b.data());
  }

  // An inode that fails its checksum, but every field of which is one the format allows and
  // agrees with the directory entry naming it: most likely the damage hit the checksum, or a
  // field nothing else constrains (a time, an owner), and the inode is worth keeping.
  bool plausible(const Inode& in, uint8_t dt) {
    if (!valid_type(in.mode)) return false;
    if (dt != DT_UNKNOWN && IFTODT(in.mode) != dt) return false;
    if (in.nlink == 0 || in.nlink > kMaxLinks) return false;
    if (in.next_orphan >= sb_.inode_count || in.blocks > sb_.block_count) return false;
    if (in.xattr_block != 0 && !in_data(in.xattr_block)) return false;
    if (!(S_ISLNK(in.mode) && in.size <= kInlineSymlink)) {
      for (uint64_t p : in.ptr) {
        if (p != 0 && !in_data(p)) return false;
      }
    }
    if (S_ISDIR(in.mode)) {
      return in.size % bs_ == 0 && in.size / bs_ <= sb_.block_count && in.parent != 0 &&
             in.parent < sb_.inode_count;
    }
    if (in.parent != 0) return false;
    if (S_ISLNK(in.mode)) return in.size != 0 && in.size <= std::min<uint64_t>(bs_, kMaxSymlink);
    return !S_ISREG(in.mode) || in.size <= kMaxFileSize;
  }

  // The length of a symlink's target, from where the target is: inline in the pointers or in the
  // block ptr[0] names. 0 if neither holds a target.
  uint64_t symlink_length(const Inode& in, bool in_block) {
    if (in_block) {
      for (int i = 1; i < kPointers; ++i) {
        if (in.ptr[i] != 0) return 0;
      }
      if (!in_data(in.ptr[0])) return 0;
      uint64_t len = strnlen(reinterpret_cast<const char*>(block(in.ptr[0])),
                             std::min<uint64_t>(bs_, kMaxSymlink));
      return len > kInlineSymlink ? len : 0;
    }
    return strnlen(reinterpret_cast<const char*>(in.ptr), kInlineSymlink);
  }

  // A symlink's size must be its target's length, the target stored where that size says.
  // Mends the size when the target can be found; false when it cannot.
  bool symlink(uint64_t ino, Inode& in) {
    bool in_block = in.size > kInlineSymlink;
    uint64_t limit = std::min<uint64_t>(bs_, kMaxSymlink);
    if (in.size != 0 && in.size <= limit && symlink_length(in, in_block) >= in.size) return true;
    // Where the target is: in a block if ptr[0] names one in the data area and nothing else
    // is set; else inline.
    uint64_t len = symlink_length(in, true);
    if (len == 0) len = symlink_length(in, false);
    if (len == 0) return false;
    problem(str("symlink %llu has size %llu, but its target is %llu bytes long",
                (unsigned long long)ino, (unsigned long long)in.size, (unsigned long long)len));
    in.size = len;
    repaired(str("symlink %llu: set its size to %llu", (unsigned long long)ino,
                 (unsigned long long)len));
    return true;
  }

  // A directory inode from a damaged one: its block pointers and xattr block where they lie in
  // the data area, its times and owner; what the walk checks anyway (size, parent, link and
  // block counts) is set right there.
  void rebuild_directory(uint64_t ino, Inode& in) {
    uint32_t perm = S_ISDIR(in.mode) ? in.mode & 07777 : 0755;
    in.mode = S_IFDIR | perm;
    in.nlink = 2;
    in.rdev = 0;
    in.next_orphan = 0;
    if (in.parent == 0 || in.parent >= sb_.inode_count) in.parent = kRootIno;
    if (ino == kRootIno) in.parent = kRootIno;
    if (in.xattr_block != 0 && !in_data(in.xattr_block)) in.xattr_block = 0;
    for (uint64_t& p : in.ptr) {
      if (p != 0 && !in_data(p)) p = 0;
    }
  }

  // The inode a directory entry names, checked (and mended) once however many entries name it;
  // nullopt, with why, if the entry must go.
  std::optional<Inode> target(uint64_t ino, uint8_t dt, std::string* why) {
    if (auto it = good_.find(ino); it != good_.end()) return it->second;
    if (auto it = bad_.find(ino); it != bad_.end()) {
      *why = it->second;
      return std::nullopt;
    }
    auto reject = [&](const std::string& w) -> std::optional<Inode> {
      bad_[ino] = w;
      *why = w;
      return std::nullopt;
    };
    if (ino == 0 || ino >= sb_.inode_count) return reject("beyond the inode table");
    Inode in = raw_inode(ino);
    if (in.mode == 0) return reject("which is free");
    bool dirty = false;
    if (in.checksum != inode_checksum(in, ino)) {
      if (plausible(in, dt)) {
        problem(str("inode %llu fails its checksum, but every field of it is sound",
                    (unsigned long long)ino));
        repaired(str("inode %llu: recomputed its checksum", (unsigned long long)ino));
      } else if (dt == DT_DIR || ino == kRootIno) {
        // A directory holds a subtree: what is sound in it is worth more than nothing.
        problem(
            str("directory inode %llu is damaged (checksum mismatch)", (unsigned long long)ino));
        rebuild_directory(ino, in);
        repaired(str("inode %llu: rebuilt it as a directory from the fields that were sound",
                     (unsigned long long)ino));
      } else {
        return reject("which is damaged (checksum mismatch)");
      }
      dirty = true;
    } else if (!valid_type(in.mode)) {
      uint32_t type = type_of_dt(dt);
      if (type == 0) return reject(str("whose mode %#o has no file type", in.mode));
      problem(str("inode %llu has mode %#o, which has no file type; its directory entry says %#o",
                  (unsigned long long)ino, in.mode, type));
      in.mode = type | (in.mode & 0777);
      repaired(str("inode %llu: set its mode to %#o", (unsigned long long)ino, in.mode));
      dirty = true;
    }
    if (S_ISLNK(in.mode)) {
      uint64_t size = in.size;
      if (!symlink(ino, in)) return reject("a symlink whose target is lost");
      dirty |= in.size != size;
    }
    good_[ino] = in;
    if (dirty) put_inode(ino);
    return in;
  }

  // --- block maps -------------------------------------------------------------------------------
  //
  // Every block of the data area has at most one owner. When two maps name one block, the
  // block's content decides who has the better right to it: a block that parses as a directory
  // block goes to a directory, one holding only block numbers of the data area to a pointer
  // block, a sound xattr block to its inode; a file data block goes to the first, and every
  // later owner gets a copy. So damage to one map never takes blocks from a sound one. Nothing
  // in the data area is written until every owner is known (edit()): a block a damaged map
  // claimed first still holds what its real owner put there when the real owner takes it.

  void claim(uint64_t lba, const Claim& c) {
    owner_[lba] = c;
    ++owned_[c.ino];
    if (c.holder != 0) children_[c.holder].push_back(lba);
  }

  // Gives up a claim, and everything claimed below a pointer block.
  void release(uint64_t lba) {
    auto it = owner_.find(lba);
    if (it == owner_.end()) return;
    Claim c = it->second;
    owner_.erase(it);
    --owned_[c.ino];
    if (c.kind != Claim::pointer) return;
    for (uint64_t child : children_[lba]) {
      auto o = owner_.find(child);
      if (o != owner_.end() && o->second.ino == c.ino && o->second.holder == lba) release(child);
    }
  }

  // The block's current claim goes to a claim with a better right to it: a data block's owner
  // gets a copy of it, a pointer block's owner a hole where it was.
  void take(uint64_t lba) {
    const Claim c = owner_.at(lba);
    if (c.kind == Claim::data) {
      shared_.push_back({c.ino, c.holder, c.index, lba, c.kind});
    } else {
      drops_.push_back({c.ino, c.holder, c.index, lba});
    }
    release(lba);
  }

  bool looks_like_pointers(uint64_t lba) {
    std::vector<uint64_t> ptrs(bs_ / 8);
    std::memcpy(ptrs.data(), block(lba), bs_);
    return std::all_of(ptrs.begin(), ptrs.end(), [&](uint64_t p) { return p == 0 || in_data(p); });
  }

  // The image of a data-area block as `ino` changes it, written once ownership is settled.
  std::vector<std::byte>& edit(uint64_t lba, uint64_t ino) {
    auto& e = edits_[{lba, ino}];
    if (e.empty()) e.assign(block(lba), block(lba) + bs_);
    return e;
  }

  // Every block of an inode's map, pointer blocks too, claimed for it; the data blocks are
  // returned in file order. With repair, a pointer outside the data area, or to a block another
  // owner has the better right to, becomes a hole. Changes to the inode's own fields set
  // *dirty; the caller stores it.
  std::vector<Mapped> map_blocks(uint64_t ino, Inode& in, bool is_dir, bool* dirty) {
    std::vector<Mapped> out;
    xattr_block_of(ino, in, dirty);
    if (S_ISLNK(in.mode) && in.size <= kInlineSymlink) return out;
    const uint64_t per = bs_ / 8;
    auto clear = [&](uint64_t holder, uint64_t index) {
      if (holder == 0) {
        in.ptr[index] = 0;
        *dirty = true;
      } else {
        std::memset(edit(holder, ino).data() + index * 8, 0, 8);
      }
    };
    std::function<void(uint64_t, uint64_t, uint64_t, int, uint64_t, uint64_t)> visit =
        [&](uint64_t holder, uint64_t index, uint64_t p, int level, uint64_t base, uint64_t span) {
          std::string where = holder == 0
                                  ? str("pointer %llu", (unsigned long long)index)
                                  : str("entry %llu of pointer block %llu",
                                        (unsigned long long)index, (unsigned long long)holder);
          if (!in_data(p)) {
            problem(str("inode %llu: %s names block %llu, outside the data area",
                        (unsigned long long)ino, where.c_str(), (unsigned long long)p));
            clear(holder, index);
            repaired(
                str("inode %llu: cleared %s (a hole now)", (unsigned long long)ino, where.c_str()));
            return;
          }
          Claim::Kind kind = level > 0 ? Claim::pointer : is_dir ? Claim::dir : Claim::data;
          bool copy = false;
          if (auto o = owner_.find(p); o != owner_.end()) {
            const Claim old = o->second;
            problem(str("block %llu is owned by inode %llu and inode %llu", (unsigned long long)p,
                        (unsigned long long)old.ino, (unsigned long long)ino));
            bool takes = false;
            if (kind == Claim::data) {
              copy = true;
            } else if (kind == Claim::pointer) {
              takes = old.kind == Claim::data && looks_like_pointers(p);
              copy = old.kind == Claim::pointer;
            } else {
              takes = (old.kind == Claim::data || old.kind == Claim::pointer) &&
                      chain_sound(block(p), 0);
            }
            if (takes) {
              take(p);
            } else if (!copy) {
              clear(holder, index);
              repaired(str("inode %llu: cleared %s, which named block %llu of inode %llu",
                           (unsigned long long)ino, where.c_str(), (unsigned long long)p,
                           (unsigned long long)old.ino));
              return;
            }
          }
          if (copy) {
            shared_.push_back({ino, holder, index, p, kind});
          } else {
            claim(p, {ino, holder, index, kind});
          }
          if (level == 0) {
            out.push_back({base, p});
            return;
          }
          uint64_t child = span / per;
          std::vector<uint64_t> ptrs(per);
          std::memcpy(ptrs.data(), block(p), bs_);
          for (uint64_t i = 0; i < per; ++i) {
            if (ptrs[i] != 0) visit(p, i, ptrs[i], level - 1, base + i * child, child);
          }
        };
    for (int i = 0; i < kDirect; ++i) {
      if (in.ptr[i] != 0) visit(0, uint64_t(i), in.ptr[i], 0, uint64_t(i), 1);
    }
    uint64_t base = kDirect, span = per;
    for (int level = 1; level <= 4; ++level) {
      uint64_t slot = uint64_t(kDirect + level - 1);
      if (in.ptr[slot] != 0) visit(0, slot, in.ptr[slot], level, base, span);
      base += span;
      span *= per;
    }
    return out;
  }

  // An inode's xattr blocks, the chain from Inode.xattr_block: owned by it and counted in its
  // blocks. A damaged chain (a block outside the data area or owned twice, failing its
  // checksum or format, a loop) is a problem; repair drops it, with every attribute in it,
  // rather than guess at what it held.
  void xattr_block_of(uint64_t ino, Inode& in, bool* dirty) {
    const uint64_t first = in.xattr_block;
    if (first == 0) return;
    std::vector<uint64_t> chain;
    auto read = [&](uint64_t lba) { return in_data(lba) ? block(lba) : nullptr; };
    std::string why;
    if (auto entries = xattr::decode(read, first, bs_, ino, &chain); !entries) {
      why = entries.status().message();
    } else {
      for (uint64_t lba : chain) {
        auto o = owner_.find(lba);
        if (o != owner_.end() && o->second.kind != Claim::data &&
            o->second.kind != Claim::pointer) {
          why = str("block %llu is also owned by inode %llu", (unsigned long long)lba,
                    (unsigned long long)o->second.ino);
          break;
        }
      }
    }
    if (why.empty()) {
      for (uint64_t i = 0; i < chain.size(); ++i) {
        if (auto o = owner_.find(chain[i]); o != owner_.end()) {
          problem(str("block %llu is owned by inode %llu and inode %llu",
                      (unsigned long long)chain[i], (unsigned long long)o->second.ino,
                      (unsigned long long)ino));
          take(chain[i]);  // it is this inode's xattr block by its owner field and checksum
        }
        claim(chain[i], {ino, 0, i, Claim::xattr});
      }
      return;
    }
    problem(str("inode %llu: xattr block %llu is damaged (%s)", (unsigned long long)ino,
                (unsigned long long)first, why.c_str()));
    if (!repair_) {
      // Counted as the inode's, so that this is the one problem reported for it; not the block
      // the chain went wrong at, unless it is the first, which the inode itself names.
      for (std::size_t i = 0; i < chain.size() && (i == 0 || i + 1 < chain.size()); ++i) {
        if (owner_.count(chain[i]) == 0) claim(chain[i], {ino, 0, i, Claim::xattr});
      }
      return;
    }
    in.xattr_block = 0;
    in.blocks -= std::min<uint64_t>(in.blocks, std::max<std::size_t>(chain.size(), 1));
    *dirty = true;
    repaired(str("inode %llu: dropped its damaged xattr block %llu", (unsigned long long)ino,
                 (unsigned long long)first));
  }

  // Ownership is settled: copies for the owners that share, holes for the pointers that lost
  // their block, then every edit of a block its editor still owns.
  void settle() {
    if (!repair_) return;
    std::map<uint64_t, std::vector<std::byte>> copies;
    // Points slot `index` of `holder` (0: the inode) at `value`, in whatever holds it now;
    // false if the inode no longer has that holder.
    auto point = [&](uint64_t ino, uint64_t holder, uint64_t index, uint64_t value) {
      if (holder == 0) {
        good_.at(ino).ptr[index] = value;
        put_inode(ino);
      } else if (owns(ino, holder)) {
        std::memcpy(edit(holder, ino).data() + index * 8, &value, 8);
      } else if (auto c = copy_of_.find({ino, holder}); c != copy_of_.end()) {
        std::memcpy(copies.at(c->second).data() + index * 8, &value, 8);
      } else {
        return false;
      }
      return true;
    };
    auto holds = [&](uint64_t ino, uint64_t holder) {
      return holder == 0 || owns(ino, holder) || copy_of_.count({ino, holder}) != 0;
    };
    for (const Shared& s : shared_) {
      if (!holds(s.ino, s.holder)) continue;  // below a pointer block it lost
      uint64_t copy = allocate({s.ino, s.holder, s.index, s.kind});
      if (copy == 0) {
        unrepaired(str("no free block left to give inode %llu its own copy of block %llu",
                       (unsigned long long)s.ino, (unsigned long long)s.lba));
        continue;
      }
      auto e = edits_.find({s.lba, s.ino});
      copies[copy] =
          e != edits_.end() ? e->second : std::vector<std::byte>(block(s.lba), block(s.lba) + bs_);
      copy_of_[{s.ino, s.lba}] = copy;
      point(s.ino, s.holder, s.index, copy);
      repaired(str("inode %llu: gave it its own copy of block %llu, at block %llu",
                   (unsigned long long)s.ino, (unsigned long long)s.lba, (unsigned long long)copy));
    }
    for (const Drop& d : drops_) {
      if (point(d.ino, d.holder, d.index, 0)) {
        repaired(str("inode %llu: cleared its pointer to block %llu, which is not its",
                     (unsigned long long)d.ino, (unsigned long long)d.lba));
      }
    }
    for (auto& [lba, image] : copies) write_block(lba, image.data());
    for (auto& [key, image] : edits_) {
      auto [lba, ino] = key;
      if (owns(ino, lba)) write_block(lba, image.data());  // else in a copy, or void
    }
  }

  // --- directories ------------------------------------------------------------------------------

  bool record_fits(const DirRecordHeader& h, uint32_t off) const {
    return h.rec_len >= sizeof h && h.rec_len % 8 == 0 && off + h.rec_len <= bs_;
  }

  // Records from `off` cover the rest of the block, each of them sound.
  bool chain_sound(const std::byte* img, uint32_t off) const {
    while (off < bs_) {
      DirRecordHeader h;
      if (off + sizeof h > bs_) return false;
      std::memcpy(&h, img + off, sizeof h);
      if (!record_fits(h, off)) return false;
      bool sound = h.ino == 0 ? h.name_len == 0
                              : h.ino < sb_.inode_count && h.name_len != 0 &&
                                    sizeof h + h.name_len <= h.rec_len;
      if (!sound) return false;
      off += h.rec_len;
    }
    return true;
  }

  // Where sound records take up again after damage at or past `from`: the block's end if
  // nowhere.
  uint32_t resync(const std::vector<std::byte>& img, uint32_t from) const {
    for (uint32_t q = (from + 7) & ~7u; q < bs_; q += 8) {
      if (chain_sound(img.data(), q)) return q;
    }
    return bs_;
  }

  // Makes a directory block's records cover it exactly again. A damaged record that names
  // something keeps its name and ends where sound records take up again; other damage becomes
  // free space up to there.
  bool salvage(uint64_t dino, uint64_t fb, std::vector<std::byte>& img) {
    bool changed = false;
    uint32_t off = 0, prev = 0;
    while (off < bs_) {
      DirRecordHeader h{};
      bool room = off + sizeof h <= bs_;
      if (room) std::memcpy(&h, img.data() + off, sizeof h);
      if (room && record_fits(h, off)) {
        prev = off;
        off += h.rec_len;
        continue;
      }
      std::string where = str("directory %llu block %llu: damaged record at offset %u",
                              (unsigned long long)dino, (unsigned long long)fb, off);
      changed = true;
      if (!room) {
        // Less than a header left: the record before takes it.
        problem(where + " (too short for a record)");
        DirRecordHeader p;
        std::memcpy(&p, img.data() + prev, sizeof p);
        p.rec_len = uint16_t(bs_ - prev);
        std::memcpy(img.data() + prev, &p, sizeof p);
        repaired(where + ": the record before now ends with the block");
        break;
      }
      problem(str("%s (record length %u)", where.c_str(), h.rec_len));
      bool named = h.ino != 0 && h.name_len != 0 && off + dir_record_len(h.name_len) <= bs_;
      uint32_t next = resync(img, named ? off + dir_record_len(h.name_len) : off + 16);
      if (named) {
        h.rec_len = uint16_t(next - off);
        repaired(str("%s: set its length to %u", where.c_str(), h.rec_len));
      } else {
        h = DirRecordHeader{0, uint16_t(next - off), 0, 0, 0};
        repaired(str("%s: made bytes %u..%u free space", where.c_str(), off, next));
      }
      std::memcpy(img.data() + off, &h, sizeof h);
      prev = off;
      off = next;
    }
    return changed;
  }

  static void free_record(std::vector<std::byte>& img, uint32_t off) {
    DirRecordHeader h;
    std::memcpy(&h, img.data() + off, sizeof h);
    h.ino = 0;
    h.name_len = 0;
    h.type = 0;
    std::memcpy(img.data() + off, &h, sizeof h);
  }

  // A name not yet in the directory that fits `room` bytes: `name` with "~1", "~2", ... in
  // place of as much of its end as needed.
  static std::string unique_name(const std::string& name, const Names& names, std::size_t room) {
    room = std::min<std::size_t>(room, 255);
    for (uint64_t k = 1;; ++k) {
      std::string suffix = "~" + std::to_string(k);
      std::string candidate = name.substr(0, std::min(name.size(), room - suffix.size())) + suffix;
      if (names.count(candidate) == 0) return candidate;
    }
  }

  void rename_record(std::vector<std::byte>& img, uint32_t off, const std::string& name) {
    DirRecordHeader h;
    std::memcpy(&h, img.data() + off, sizeof h);
    h.name_len = uint8_t(name.size());
    std::memcpy(img.data() + off, &h, sizeof h);
    std::memcpy(img.data() + off + sizeof h, name.data(), name.size());
  }

  void adopt(uint64_t ino, uint64_t dino, std::vector<uint64_t>& queue) {
    seen_[ino] = dino;
    parent_of_[ino] = dino;
    ++links_[ino];
    ++subdirs_[dino];
    queue.push_back(ino);
  }

  // One used record of directory dino, at img[off]: its name and the inode it names. Returns
  // true if it changed the record.
  bool entry(uint64_t dino, uint64_t lba, uint32_t off, std::vector<std::byte>& img, Names& names,
             std::vector<uint64_t>& queue, std::vector<Listing>& listings) {
    DirRecordHeader h;
    std::memcpy(&h, img.data() + off, sizeof h);
    const std::size_t room = h.rec_len - sizeof h;
    const char* name_at = reinterpret_cast<const char*>(img.data()) + off + sizeof h;
    bool changed = false;
    const auto dir = (unsigned long long)dino;
    if (h.name_len == 0 || h.name_len > room) {
      // The name ends where the record's zero padding starts, if anywhere.
      std::size_t len = strnlen(name_at, std::min<std::size_t>(room, 255));
      if (len == 0) {
        problem(
            str("directory %llu: the entry at offset %u of block %llu has no name that fits "
                "its record (name length %u)",
                dir, off, (unsigned long long)lba, h.name_len));
        free_record(img, off);
        repaired(str("directory %llu: removed that entry", dir));
        return true;
      }
      problem(
          str("directory %llu: the entry at offset %u of block %llu has name length %u, "
              "more than its record holds",
              dir, off, (unsigned long long)lba, h.name_len));
      h.name_len = uint8_t(len);
      std::memcpy(img.data() + off, &h, sizeof h);
      repaired(str("directory %llu: set that entry's name length to %zu", dir, len));
      changed = true;
    }
    std::string name(name_at, h.name_len);
    if (name == "." || name == "..") {
      problem(str("directory %llu holds an entry named %s, which the format never stores", dir,
                  quoted(name).c_str()));
      free_record(img, off);
      repaired(str("directory %llu: removed its %s entry", dir, quoted(name).c_str()));
      return true;
    }
    if (name.find('/') != std::string::npos || name.find('\0') != std::string::npos) {
      std::string fixed = name;
      std::replace(fixed.begin(), fixed.end(), '/', '_');
      std::replace(fixed.begin(), fixed.end(), '\0', '_');
      if (names.count(fixed) != 0) fixed = unique_name(fixed, names, room);
      problem(
          str("directory %llu: entry %s has a name no file can have", dir, quoted(name).c_str()));
      rename_record(img, off, fixed);
      repaired(str("directory %llu: renamed entry %s to %s", dir, quoted(name).c_str(),
                   quoted(fixed).c_str()));
      name = fixed;
      changed = true;
    }
    if (auto twin = names.find(name); twin != names.end()) {
      problem(str("directory %llu has two entries named %s", dir, quoted(name).c_str()));
      if (twin->second == h.ino) {
        free_record(img, off);
        repaired(str("directory %llu: removed the second %s, a second link to inode %llu", dir,
                     quoted(name).c_str(), (unsigned long long)h.ino));
        return true;
      }
      std::string fixed = unique_name(name, names, room);
      rename_record(img, off, fixed);
      repaired(str("directory %llu: renamed the second %s to %s", dir, quoted(name).c_str(),
                   quoted(fixed).c_str()));
      name = fixed;
      changed = true;
    }
    std::string why;
    auto child = target(h.ino, h.type, &why);
    if (!child) {
      problem(str("directory %llu: entry %s names inode %llu, %s", dir, quoted(name).c_str(),
                  (unsigned long long)h.ino, why.c_str()));
      free_record(img, off);
      repaired(str("directory %llu: removed entry %s", dir, quoted(name).c_str()));
      return true;
    }
    uint8_t type = uint8_t(IFTODT(child->mode));
    if (h.type != type) {
      problem(str("directory %llu: entry %s has type %u, but inode %llu is of type %u", dir,
                  quoted(name).c_str(), h.type, (unsigned long long)h.ino, type));
      h.type = type;
      std::memcpy(img.data() + off, &h, sizeof h);
      repaired(
          str("directory %llu: set the type of entry %s to %u", dir, quoted(name).c_str(), type));
      changed = true;
    }
    names[name] = h.ino;
    if (S_ISDIR(child->mode)) {
      if (seen_.count(h.ino) != 0) {
        problem(
            str("directory %llu is linked from more than one place (also as %s in directory "
                "%llu)",
                (unsigned long long)h.ino, quoted(name).c_str(), dir));
        free_record(img, off);
        names.erase(name);
        repaired(str("directory %llu: removed entry %s", dir, quoted(name).c_str()));
        return true;
      }
      if (child->parent != dino) {
        listings.push_back({dino, lba, off, name, h.ino});
      } else {
        adopt(h.ino, dino, queue);
      }
    } else {
      ++links_[h.ino];
      if (seen_.emplace(h.ino, dino).second) file(h.ino);
    }
    return changed;
  }

  void directory(uint64_t dino, std::vector<uint64_t>& queue, std::vector<Listing>& listings) {
    Inode& dir = good_.at(dino);
    bool dirty = false;
    if (dir.parent != parent_of_[dino]) {
      problem(str("directory %llu says its parent is %llu, but it is in %llu",
                  (unsigned long long)dino, (unsigned long long)dir.parent,
                  (unsigned long long)parent_of_[dino]));
      dir.parent = parent_of_[dino];
      repaired(str("directory %llu: set its parent to %llu", (unsigned long long)dino,
                   (unsigned long long)dir.parent));
      dirty = true;
    }
    std::vector<Mapped> blocks = map_blocks(dino, dir, true, &dirty);
    const uint64_t end = blocks.empty() ? 0 : (blocks.back().fb + 1) * bs_;
    if (dir.size % bs_ != 0 || dir.size > end) {
      problem(str("directory %llu has size %llu, but its blocks end at %llu",
                  (unsigned long long)dino, (unsigned long long)dir.size, (unsigned long long)end));
      dir.size = end;
      repaired(str("directory %llu: set its size to %llu", (unsigned long long)dino,
                   (unsigned long long)end));
      dirty = true;
    }
    if (dirty) put_inode(dino);
    Names names;
    for (const Mapped& m : blocks) {
      if (m.fb * bs_ >= dir.size || owner_.count(m.lba) == 0 || owner_.at(m.lba).ino != dino) {
        continue;  // past the end, or a hole now
      }
      std::vector<std::byte> img(block(m.lba), block(m.lba) + bs_);
      bool changed = salvage(dino, m.fb, img);
      for (uint32_t off = 0; off < bs_;) {
        DirRecordHeader h;
        std::memcpy(&h, img.data() + off, sizeof h);
        if (h.ino != 0) changed |= entry(dino, m.lba, off, img, names, queue, listings);
        off += h.rec_len;
      }
      if (changed) edit(m.lba, dino) = img;
    }
    if (dino == kRootIno) {
      root_names_ = std::move(names);
      root_blocks_ = std::move(blocks);
    } else if (auto lf = root_names_.find("lost+found");
               lf != root_names_.end() && lf->second == dino) {
      lost_found_names_ = std::move(names);  // so that "#<inode>" names are not taken twice
    }
  }

  // A non-directory met for the first time.
  void file(uint64_t ino) {
    Inode& in = good_.at(ino);
    bool dirty = false;
    std::vector<Mapped> blocks = map_blocks(ino, in, false, &dirty);
    if (S_ISREG(in.mode) && in.size > kMaxFileSize) {
      uint64_t end = blocks.empty() ? 0 : (blocks.back().fb + 1) * bs_;
      problem(str("inode %llu has size %llu, more than a file can have", (unsigned long long)ino,
                  (unsigned long long)in.size));
      in.size = end;
      repaired(str("inode %llu: set its size to %llu, the end of its last block",
                   (unsigned long long)ino, (unsigned long long)end));
      dirty = true;
    }
    if (dirty) put_inode(ino);
  }

  void walk() {
    // Breadth-first from the root; directories must form a tree.
    std::string why;
    auto root = target(kRootIno, DT_DIR, &why);
    if (root && !S_ISDIR(root->mode)) {
      problem(str("the root directory (inode 1) has mode %#o", root->mode));
      rebuild_directory(kRootIno, good_.at(kRootIno));
      repaired("inode 1: rebuilt it as a directory from the fields that were sound");
      put_inode(kRootIno);
      root = good_.at(kRootIno);
    }
    if (!root) {
      unrepaired(
          str("the root directory (inode 1) is damaged%s%s; nothing below it can be "
              "checked",
              why.empty() ? "" : ": ", why.c_str()));
      return;
    }
    seen_[kRootIno] = 0;
    parent_of_[kRootIno] = kRootIno;
    walk_from({kRootIno});
  }

  // Walks the directories in `queue`, and every directory below them, breadth-first.
  void walk_from(std::vector<uint64_t> queue) {
    std::vector<Listing> listings;
    for (std::size_t qi = 0;;) {
      for (; qi < queue.size(); ++qi) directory(queue[qi], queue, listings);
      if (listings.empty()) break;
      // Directories listed where their parent field does not point: each goes where it is
      // first listed, unless a listing that agrees with its parent field came first.
      std::vector<Listing> pending;
      pending.swap(listings);
      for (const Listing& l : pending) {
        if (seen_.count(l.ino) == 0) {
          adopt(l.ino, l.dino, queue);
          continue;
        }
        problem(
            str("directory %llu is linked from more than one place (also as %s in directory "
                "%llu)",
                (unsigned long long)l.ino, quoted(l.name).c_str(), (unsigned long long)l.dino));
        free_record(edit(l.lba, l.dino), l.off);
        repaired(str("directory %llu: removed entry %s", (unsigned long long)l.dino,
                     quoted(l.name).c_str()));
      }
    }
  }

  // The orphan chain: inodes unlinked while open (link count 0), which the next mount frees, and
  // files a truncate was cutting down (link count above 0), which it cuts to their size. So the
  // chain must end, name only valid inodes, and an inode no directory names must have a link
  // count of 0, or the mount would keep it with no name.
  void orphans() {
    uint64_t prev = 0;  // 0: the superblock's orphan_head
    std::unordered_set<uint64_t> visited;
    auto link_past = [&](uint64_t next) {
      if (prev == 0) {
        sb_.orphan_head = next;
        put_super();
      } else {
        good_.at(prev).next_orphan = next;
        put_inode(prev);
      }
    };
    for (uint64_t ino = sb_.orphan_head; ino != 0;) {
      std::string why;
      std::optional<Inode> in;
      if (ino >= sb_.inode_count) {
        why = "beyond the inode table";
      } else if (visited.count(ino) != 0) {
        why = "which is on it already: the chain loops";
      } else if (seen_.count(ino) != 0) {
        in = good_.at(ino);  // named in a directory: a truncate was cutting it down
      } else if (in = inode(ino); !in) {
        why = "which is not a valid inode";
      }
      if (!why.empty()) {
        problem(str("orphan chain names inode %llu, %s", (unsigned long long)ino, why.c_str()));
        link_past(0);
        repaired(str("ended the orphan chain before inode %llu", (unsigned long long)ino));
        break;
      }
      visited.insert(ino);
      if (seen_.count(ino) == 0) {
        seen_[ino] = 0;
        orphan_.insert(ino);
        good_[ino] = *in;
        Inode& orphan = good_.at(ino);
        bool dirty = false;
        if (orphan.nlink != 0) {
          problem(
              str("inode %llu is on the orphan chain with no name, but a link count of %u: "
                  "the next mount would keep it",
                  (unsigned long long)ino, orphan.nlink));
          orphan.nlink = 0;
          repaired(str("inode %llu: set its link count to 0", (unsigned long long)ino));
          dirty = true;
        }
        map_blocks(ino, orphan, S_ISDIR(orphan.mode), &dirty);
        if (dirty) put_inode(ino);
      }
      prev = ino;
      ino = in->next_orphan;
    }
  }

  // --- lost+found -------------------------------------------------------------------------------
  //
  // Inodes in use that the walk never met: their entry, or their whole directory, was lost.
  // Each goes into /lost+found (made when missing) as "#<inode>": of a disconnected subtree only
  // its top directory, which is then walked like any other; a file with several lost names
  // gets one. Used means marked in the inode bitmap, valid, with a link count above 0.

  void reconnect() {
    if (seen_.count(kRootIno) == 0) return;  // the root was lost: nothing was walked
    std::vector<uint64_t> lost;
    std::unordered_set<uint64_t> lost_dirs;
    const uint64_t bits = uint64_t(bs_) * 8;
    for (uint64_t b = 0; b < sb_.inode_bitmap_blocks; ++b) {
      const std::byte* map = block(sb_.inode_bitmap_start + b);
      for (uint64_t bit = 0; bit < bits; ++bit) {
        uint64_t ino = b * bits + bit;
        if (ino >= sb_.inode_count) break;
        if (map[bit / 8] == std::byte{0}) {
          bit |= 7;  // a whole byte of free inodes
          continue;
        }
        if (((uint8_t(map[bit / 8]) >> (bit % 8)) & 1) == 0 || ino <= kRootIno) continue;
        if (seen_.count(ino) != 0 || bad_.count(ino) != 0) continue;
        if (raw_inode(ino).mode == 0) continue;  // the bitmap is wrong: compare() says so
        std::string why;
        auto in = target(ino, DT_UNKNOWN, &why);
        if (!in || in->nlink == 0) continue;  // garbage, or unlinked: freed
        lost.push_back(ino);
        if (S_ISDIR(in->mode)) lost_dirs.insert(ino);
      }
    }
    if (lost.empty()) return;
    lost_found_ = lost_found();
    if (lost_found_ == 0) {
      unrepaired(
          str("%zu inodes are in no directory, and there is no free inode for a "
              "lost+found directory to hold them",
              lost.size()));
      return;
    }
    auto link = [&](uint64_t ino, const char* what) {
      const Inode& in = good_.at(ino);
      problem(str("inode %llu (%s, %llu bytes) is in no directory", (unsigned long long)ino, what,
                  (unsigned long long)in.size));
      std::string name = "#" + std::to_string(ino);
      if (lost_found_names_.count(name) != 0) name = unique_name(name, lost_found_names_, 255);
      lost_found_names_[name] = ino;
      lost_entries_.push_back({name, ino, uint8_t(IFTODT(in.mode))});
      repaired(str("inode %llu: linked it into /%s as %s", (unsigned long long)ino,
                   lost_found_name_.c_str(), name.c_str()));
    };
    // Directories first, each subtree by its top: climb the parent fields while they name a
    // lost directory.
    for (uint64_t ino : lost) {
      // A directory not under the top its climb found (its own entry lost too) climbs again.
      while (lost_dirs.count(ino) != 0 && seen_.count(ino) == 0) {
        uint64_t top = ino;
        std::unordered_set<uint64_t> climbed = {top};
        for (uint64_t p = good_.at(top).parent;
             lost_dirs.count(p) != 0 && seen_.count(p) == 0 && climbed.insert(p).second;
             p = good_.at(top).parent) {
          top = p;
        }
        link(top, "a directory");
        std::vector<uint64_t> queue;
        adopt(top, lost_found_, queue);
        walk_from(std::move(queue));
      }
    }
    for (uint64_t ino : lost) {
      if (seen_.count(ino) != 0) continue;  // under a reconnected directory
      link(ino, S_ISLNK(good_.at(ino).mode) ? "a symlink" : "a file");
      seen_[ino] = lost_found_;
      ++links_[ino];
      file(ino);
    }
  }

  // The inode of /lost+found, found or chosen for making; 0 if there is no free inode.
  uint64_t lost_found() {
    auto it = root_names_.find("lost+found");
    if (it != root_names_.end() && good_.count(it->second) != 0 &&
        S_ISDIR(good_.at(it->second).mode)) {
      lost_found_name_ = "lost+found";
      return it->second;
    }
    lost_found_name_ =
        it == root_names_.end() ? "lost+found" : unique_name("lost+found", root_names_, 255);
    for (uint64_t ino = kRootIno + 1; ino < sb_.inode_count; ++ino) {
      if (seen_.count(ino) != 0 || raw_inode(ino).mode != 0) continue;
      problem("there is no lost+found directory");
      struct timespec now;
      clock_gettime(CLOCK_REALTIME, &now);
      Inode in{};
      in.mode = S_IFDIR | 0700;
      in.nlink = 2;
      set_times(in, Timestamp{now.tv_sec, uint32_t(now.tv_nsec)},
                kAtime | kMtime | kCtime | kBtime);
      in.parent = kRootIno;
      in.generation = uint32_t(xxhash64(&in.btime_nsec, sizeof in.btime_nsec, ino));
      good_[ino] = in;
      std::vector<uint64_t> no_walk;
      adopt(ino, kRootIno, no_walk);
      make_lost_found_ = true;
      ++good_.at(kRootIno).nlink;
      return ino;
    }
    return 0;
  }

  // Writes the entries reconnect() decided on into lost+found, in blocks of its own appended to
  // it, and the new lost+found's entry into the root. After settle(): every block's owner is
  // known, so a free block is one nobody owns.
  void place_lost() {
    if (lost_entries_.empty()) return;
    Inode& lf = good_.at(lost_found_);
    lf.nlink = 2 + subdirs_[lost_found_];
    if (!repair_) return;
    if (make_lost_found_) {
      repaired(
          str("made /%s (inode %llu)", lost_found_name_.c_str(), (unsigned long long)lost_found_));
      put_inode(kRootIno);
      if (!add_entries(kRootIno, {{lost_found_name_, lost_found_, DT_DIR}}, root_blocks_)) return;
    }
    add_entries(lost_found_, lost_entries_, {});
    put_inode(lost_found_);
  }

  struct NewEntry {
    std::string name;
    uint64_t ino;
    uint8_t type;
  };

  // Puts the entries in the free space of `blocks` of directory dino, and what does not fit in
  // blocks appended to it. False (and reported) when the directory cannot grow.
  bool add_entries(uint64_t dino, const std::vector<NewEntry>& entries,
                   const std::vector<Mapped>& blocks) {
    std::size_t next = 0;
    for (const Mapped& m : blocks) {
      if (m.fb * bs_ >= good_.at(dino).size || !owns(dino, m.lba)) continue;
      std::vector<std::byte> img(block(m.lba), block(m.lba) + bs_);
      bool changed = false;
      while (next < entries.size() && insert_record(img, entries[next])) {
        ++next;
        changed = true;
      }
      if (changed) write_block(m.lba, img.data());
    }
    while (next < entries.size()) {
      std::vector<std::byte> img(bs_);
      DirRecordHeader empty{0, uint16_t(bs_), 0, 0, 0};
      std::memcpy(img.data(), &empty, sizeof empty);
      while (next < entries.size() && insert_record(img, entries[next])) ++next;
      if (!append_block(dino, img)) return false;
    }
    return true;
  }

  // Puts a record into free space of a directory block image; false if none is big enough.
  bool insert_record(std::vector<std::byte>& img, const NewEntry& e) const {
    const uint32_t need = dir_record_len(e.name.size());
    for (uint32_t off = 0; off < bs_;) {
      DirRecordHeader h;
      std::memcpy(&h, img.data() + off, sizeof h);
      const uint32_t used = h.ino == 0 ? 0 : dir_record_len(h.name_len);
      if (h.rec_len >= used + need) {
        uint32_t at = off + used;
        if (used != 0) {
          DirRecordHeader shorter = h;
          shorter.rec_len = uint16_t(used);
          std::memcpy(img.data() + off, &shorter, sizeof shorter);
        }
        DirRecordHeader r{e.ino, uint16_t(h.rec_len - used), uint8_t(e.name.size()), e.type, 0};
        std::memcpy(img.data() + at, &r, sizeof r);
        std::memcpy(img.data() + at + sizeof r, e.name.data(), e.name.size());
        return true;
      }
      off += h.rec_len;
    }
    return false;
  }

  bool owns(uint64_t ino, uint64_t lba) const {
    auto o = owner_.find(lba);
    return o != owner_.end() && o->second.ino == ino;
  }

  // A block nobody owns, claimed for `c`; 0 if the volume is full.
  uint64_t allocate(const Claim& c) {
    free_hint_ = std::max(free_hint_, sb_.data_start);
    while (free_hint_ < sb_.block_count && owner_.count(free_hint_) != 0) ++free_hint_;
    if (free_hint_ >= sb_.block_count) return 0;
    claim(free_hint_, c);
    return free_hint_++;
  }

  // Appends a block holding `img` to directory dino, through its direct pointers or its
  // single-indirect block. False (and reported) when neither has room or the volume is full.
  bool append_block(uint64_t dino, const std::vector<std::byte>& img) {
    Inode& dir = good_.at(dino);
    const uint64_t fb = dir.size / bs_;
    const uint64_t per = bs_ / 8;
    auto full = [&](const char* why) {
      unrepaired(str("directory %llu cannot take the entries fsck must add: %s",
                     (unsigned long long)dino, why));
      return false;
    };
    if (fb >= uint64_t(kDirect) + per) return full("it is too large");
    uint64_t lba;
    if (fb < uint64_t(kDirect)) {
      if (dir.ptr[fb] != 0) return full("a block is mapped past its end");
      lba = allocate({dino, 0, fb, Claim::dir});
      if (lba == 0) return full("no free block");
      dir.ptr[fb] = lba;
    } else {
      uint64_t holder = dir.ptr[kDirect];
      std::vector<std::byte> pointers(bs_);
      if (holder == 0) {
        holder = allocate({dino, 0, uint64_t(kDirect), Claim::pointer});
        if (holder == 0) return full("no free block");
        dir.ptr[kDirect] = holder;
      } else {
        if (!owns(dino, holder)) return full("its single-indirect block is not its own");
        std::memcpy(pointers.data(), block(holder), bs_);
      }
      uint64_t index = fb - kDirect, present;
      std::memcpy(&present, pointers.data() + index * 8, 8);
      if (present != 0) return full("a block is mapped past its end");
      lba = allocate({dino, holder, index, Claim::dir});
      if (lba == 0) return full("no free block");
      std::memcpy(pointers.data() + index * 8, &lba, 8);
      write_block(holder, pointers.data());
    }
    write_block(lba, img.data());
    dir.size += bs_;
    dir.blocks = owned_[dino];
    put_inode(dino);
    return true;
  }

  // --- counts -----------------------------------------------------------------------------------

  void compare() {
    // Link and block counts.
    for (const auto& [ino, dino] : seen_) {
      (void)dino;
      auto it = good_.find(ino);
      if (it == good_.end()) continue;
      Inode& in = it->second;
      bool dirty = false;
      if (orphan_.count(ino) == 0) {
        uint32_t want = S_ISDIR(in.mode) ? 2 + subdirs_[ino] : links_[ino];
        if (in.nlink != want) {
          problem(str("inode %llu has link count %u, the tree says %u", (unsigned long long)ino,
                      in.nlink, want));
          in.nlink = want;
          repaired(str("inode %llu: set its link count to %u", (unsigned long long)ino, want));
          dirty = true;
        }
      }
      if (in.blocks != owned_[ino]) {
        problem(str("inode %llu counts %llu blocks but owns %llu", (unsigned long long)ino,
                    (unsigned long long)in.blocks, (unsigned long long)owned_[ino]));
        in.blocks = owned_[ino];
        repaired(str("inode %llu: set its block count to %llu", (unsigned long long)ino,
                     (unsigned long long)owned_[ino]));
        dirty = true;
      }
      if (dirty) put_inode(ino);
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
        if (std::memcmp(have, want.data(), bs_) != 0) write_block(start + b, want.data());
      }
      if (wrong != 0) {
        problem(str("%s bitmap disagrees with the tree on %llu entries (first: %llu)", what,
                    (unsigned long long)wrong, (unsigned long long)first));
        repaired(str("rewrote the %s bitmap", what));
      }
    };
    bitmap(sb_.block_bitmap_start, sb_.block_bitmap_blocks, sb_.block_count, "block",
           [&](uint64_t lba) { return lba < sb_.data_start || owner_.count(lba) != 0; });
    bitmap(sb_.inode_bitmap_start, sb_.inode_bitmap_blocks, sb_.inode_count, "inode",
           [&](uint64_t ino) { return ino <= kRootIno || seen_.count(ino) != 0; });
    report_.inodes = seen_.size();
    report_.blocks = owner_.size();
  }

  Region& region_;
  bool repair_;
  FsckReport& report_;
  std::unique_ptr<Btt> btt_;
  uint32_t bs_ = 0;
  uint64_t n_ = 0;
  Superblock sb_{};
  bool replayed_super_ = false;  // the journal or kill log held an image of block 0
  bool drop_journal_ = false;    // the mount would refuse the journal: repair empties it
  std::unordered_map<uint64_t, std::vector<std::byte>> overlay_;  // replayed journal, repairs
  std::unordered_map<uint64_t, std::vector<std::byte>> cache_;
  std::unordered_map<uint64_t, Inode> good_;       // checked (and mended) inodes
  std::unordered_map<uint64_t, std::string> bad_;  // inodes an entry must not name, and why
  std::unordered_map<uint64_t, Claim> owner_;      // block -> who owns it
  std::unordered_map<uint64_t, uint64_t> owned_;   // inode -> blocks
  std::unordered_map<uint64_t, std::vector<uint64_t>> children_;  // pointer block -> claims
  std::vector<Shared> shared_;
  std::vector<Drop> drops_;
  std::map<std::pair<uint64_t, uint64_t>, std::vector<std::byte>> edits_;  // (block, inode)
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> copy_of_;  // (inode, block) -> its copy
  std::unordered_map<uint64_t, uint64_t> seen_;  // reachable inode -> a directory holding it
  std::unordered_map<uint64_t, uint64_t> parent_of_;
  std::unordered_map<uint64_t, uint32_t> links_;
  std::unordered_map<uint64_t, uint32_t> subdirs_;
  std::unordered_set<uint64_t> orphan_;
  Names root_names_;                 // the root directory's entries, as the walk left them
  Names lost_found_names_;           // those of /lost+found
  std::vector<Mapped> root_blocks_;  // and its blocks
  uint64_t lost_found_ = 0;          // the inode of lost+found, when something goes there
  std::string lost_found_name_;
  bool make_lost_found_ = false;  // ... and it must be made
  std::vector<NewEntry> lost_entries_;
  uint64_t free_hint_ = 0;  // allocate() looks for free blocks from here on
};

}  // namespace

Result<FsckReport> fsck(const std::string& image, const FsckOptions& options) {
  if (options.preen) {
    // Judge first, changing nothing; then, if all is well, let a mount do what it would.
    FsckOptions check = options;
    check.preen = false;
    check.repair = false;
    auto report = fsck(image, check);
    if (!report || !report->problems.empty() || report->notes.empty()) return report;
    MountOptions mo;
    mo.lock_wait_ms = options.lock_wait_ms;
    auto volume = Volume::mount(image, mo);
    if (!volume) return volume.status();
    volume->reset();  // a clean unmount: everything replayed is committed
    report->notes.push_back("preen: mounted and unmounted the volume, which did the above");
    return report;
  }
  RegionOptions ro;
  ro.read_only = !options.repair;
  ro.lock_wait_ms = options.lock_wait_ms;
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
