// vpmfs-ctl info's library side: reads an image the way a mount would, but read-only, without
// a lock, and describing damage instead of refusing it (docs/FORMAT.md has every field).
#include "vpmfs/info.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "format.h"
#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

// XXH3 of a structure with its checksum field zeroed, as every vpmfs structure stores it.
template <typename T>
uint64_t checksum_of(T copy, uint64_t T::*field, uint64_t seed = 0) {
  copy.*field = 0;
  return xxhash64(&copy, sizeof copy, seed);
}

std::string bounded_string(const char* s, std::size_t max) {
  return std::string(s, strnlen(s, max));
}

// [start, start + count) lies inside [lo, hi).
bool inside(uint64_t start, uint64_t count, uint64_t lo, uint64_t hi) {
  return start >= lo && start <= hi && count <= hi - start;
}

// Bits set in [first, last) of a bitmap block.
uint64_t bits_set(const std::byte* bits, uint64_t first, uint64_t last) {
  uint64_t n = 0;
  uint64_t k = first;
  for (; k < last && k % 8 != 0; ++k) n += (uint8_t(bits[k / 8]) >> (k % 8)) & 1;
  for (; k + 8 <= last; k += 8) n += std::popcount(uint8_t(bits[k / 8]));
  for (; k < last; ++k) n += (uint8_t(bits[k / 8]) >> (k % 8)) & 1;
  return n;
}

// Who holds a flock on the image, from /proc/locks ("1: FLOCK ADVISORY WRITE 1234
// 00:1a:5678 0 EOF"): looking takes no lock, so it cannot get in a mount's way.
void find_holder(const std::string& path, ImageInfo& out) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return;
  char id[64];
  std::snprintf(id, sizeof id, "%02x:%02x:%llu", major(st.st_dev), minor(st.st_dev),
                (unsigned long long)st.st_ino);
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    std::istringstream f(line);
    std::string num, type, advisory, access, dev;
    long pid = 0;
    if (!(f >> num >> type) || type == "->" || type != "FLOCK") continue;
    if (!(f >> advisory >> access >> pid >> dev) || dev != id) continue;
    out.held_by = pid_t(pid);
    out.held_exclusive = out.held_exclusive || access == "WRITE";
  }
}

ImageHeaderView read_header(const Region& region, std::vector<std::string>* problems) {
  ImageHeader h;
  std::memcpy(&h, region.at(0), sizeof h);
  ImageHeaderView v;
  v.version = h.version;
  v.header_size = h.header_size;
  v.image_size = h.image_size;
  v.intent_log_offset = h.intent_log_offset;
  v.intent_log_size = h.intent_log_size;
  v.kill_log_offset = h.kill_log_offset;
  v.kill_log_size = h.kill_log_size;
  v.btt_offset = h.btt_offset;
  v.btt_size = h.btt_size;
  std::memcpy(v.uuid.data(), h.uuid, v.uuid.size());
  v.label = bounded_string(h.label, sizeof h.label);
  v.created_sec = h.created_sec;
  v.sector_size = h.sector_size;
  v.lanes = h.lanes;
  v.checksum = h.checksum;
  v.checksum_ok = checksum_of(h, &ImageHeader::checksum) == h.checksum;

  std::vector<std::string> bad;
  if (!v.checksum_ok) {
    bad.push_back("image header checksum mismatch (stored " + hex_string(h.checksum) +
                  ", computed " + hex_string(checksum_of(h, &ImageHeader::checksum)) + ")");
  }
  if (h.version != kImageVersion) {
    bad.push_back("image header: unsupported version " + std::to_string(h.version));
  }
  // The checks a mount makes before it trusts the layout (docs/FORMAT.md, section 2).
  const uint64_t size = region.size();
  std::vector<std::string> layout;
  if (h.btt_offset % 4096 != 0) {
    layout.push_back("BTT offset " + hex_string(h.btt_offset) + " is not 4 KiB aligned");
  }
  if (h.btt_size == 0 || !inside(h.btt_offset, h.btt_size, 0, size)) {
    layout.push_back("BTT namespace [" + hex_string(h.btt_offset) + ", +" + hex_string(h.btt_size) +
                     ") is not inside the " + std::to_string(size) + "-byte image (truncated?)");
  }
  if (!inside(h.intent_log_offset, h.intent_log_size, kImageHeaderSize, h.btt_offset)) {
    layout.push_back("intent log [" + hex_string(h.intent_log_offset) + ", +" +
                     hex_string(h.intent_log_size) + ") is not between the header and the BTT");
  }
  if (h.kill_log_size != 0 && (h.intent_log_offset > UINT64_MAX - h.intent_log_size ||
                               !inside(h.kill_log_offset, h.kill_log_size,
                                       h.intent_log_offset + h.intent_log_size, h.btt_offset))) {
    layout.push_back("kill log [" + hex_string(h.kill_log_offset) + ", +" +
                     hex_string(h.kill_log_size) + ") is not between the intent log and the BTT");
  }
  v.layout_ok = layout.empty();
  for (auto& l : layout) bad.push_back("image header: " + l);
  if (problems != nullptr) problems->insert(problems->end(), bad.begin(), bad.end());
  return v;
}

// The filesystem above the BTT, as a mount would find it after replaying the journal.
class FsReader {
 public:
  FsReader(Btt& btt, ImageInfo& out) : btt_(btt), out_(out), bs_(btt.sector_size()) {}

  void run() {
    Superblock sb;
    if (!read_super(&sb, "")) return;
    FilesystemView v;
    fill(sb, v);
    v.geometry_ok = check_geometry(sb);
    if (v.geometry_ok) {
      journal(sb, v.journal);
      if (v.journal.complete && overlay_.count(0) != 0) {
        // The transaction carries a newer superblock: after mkfs only the orphan chain head
        // changes.
        Superblock newer;
        if (read_super(&newer, "journal's ") &&
            checksum_of(newer, &Superblock::checksum) == newer.checksum &&
            newer.orphan_head < newer.inode_count) {
          v.orphan_head = newer.orphan_head;
        }
      }
      count(v);
    }
    out_.fs = v;
  }

 private:
  void problem(const std::string& p) { out_.problems.push_back("filesystem: " + p); }

  // A block as a mount would see it; null (and a problem) if the BTT cannot read it.
  const std::byte* block(uint64_t lba) {
    if (auto it = overlay_.find(lba); it != overlay_.end()) return it->second.data();
    buf_.resize(bs_);
    if (Status s = btt_.read(lba, buf_.data()); !s) {
      problem("block " + std::to_string(lba) + " cannot be read: " + s.to_string());
      return nullptr;
    }
    return buf_.data();
  }

  bool read_super(Superblock* sb, const std::string& whose) {
    const std::byte* b = block(0);
    if (b == nullptr) return false;
    std::memcpy(sb, b, sizeof *sb);
    if (sb->magic != kSuperMagic) {
      problem("no " + whose + "superblock at LBA 0 (magic " + hex_string(sb->magic) + ")");
      return false;
    }
    return true;
  }

  void fill(const Superblock& sb, FilesystemView& v) {
    v.version = sb.version;
    v.block_size = sb.block_size;
    v.block_count = sb.block_count;
    v.inode_count = sb.inode_count;
    v.block_bitmap_start = sb.block_bitmap_start;
    v.block_bitmap_blocks = sb.block_bitmap_blocks;
    v.inode_bitmap_start = sb.inode_bitmap_start;
    v.inode_bitmap_blocks = sb.inode_bitmap_blocks;
    v.inode_table_start = sb.inode_table_start;
    v.inode_table_blocks = sb.inode_table_blocks;
    v.data_start = sb.data_start;
    v.journal.start = sb.journal_start;
    v.journal.blocks = sb.journal_blocks;
    v.orphan_head = sb.orphan_head;
    std::memcpy(v.uuid.data(), sb.uuid, v.uuid.size());
    v.label = bounded_string(sb.label, sizeof sb.label);
    v.created_sec = sb.created_sec;
    v.dax_default = sb.dax_default;
    v.checksum = sb.checksum;
    v.checksum_ok = checksum_of(sb, &Superblock::checksum) == sb.checksum;
    if (!v.checksum_ok) problem("superblock checksum mismatch");
  }

  // What reading the journal and the bitmaps relies on.
  bool check_geometry(const Superblock& sb) {
    const uint64_t n = btt_.sector_count();
    const uint64_t bits = uint64_t(bs_) * 8;
    std::vector<std::string> bad;
    if (sb.block_size != bs_) {
      bad.push_back("block size " + std::to_string(sb.block_size) + " is not the BTT's " +
                    std::to_string(bs_));
    }
    if (sb.block_count != n) {
      bad.push_back("block count " + std::to_string(sb.block_count) + " is not the BTT's " +
                    std::to_string(n));
    }
    struct Area {
      const char* name;
      uint64_t start, blocks;
    };
    for (const Area& a : {Area{"journal", sb.journal_start, sb.journal_blocks},
                          Area{"block bitmap", sb.block_bitmap_start, sb.block_bitmap_blocks},
                          Area{"inode bitmap", sb.inode_bitmap_start, sb.inode_bitmap_blocks},
                          Area{"inode table", sb.inode_table_start, sb.inode_table_blocks}}) {
      if (!inside(a.start, a.blocks, 1, n)) {
        bad.push_back(std::string(a.name) + " (LBA " + std::to_string(a.start) + ", " +
                      std::to_string(a.blocks) + " blocks) is not inside the volume");
      }
    }
    if (sb.data_start >= n)
      bad.push_back("data start " + std::to_string(sb.data_start) + " is past the end");
    if (sb.block_bitmap_blocks < (n + bits - 1) / bits) {
      bad.push_back("the block bitmap is too short for " + std::to_string(n) + " blocks");
    }
    if (sb.inode_count < 2 ||
        sb.inode_bitmap_blocks < sb.inode_count / bits + (sb.inode_count % bits != 0)) {
      bad.push_back("the inode bitmap does not fit " + std::to_string(sb.inode_count) + " inodes");
    }
    if (sb.orphan_head >= sb.inode_count) {
      bad.push_back("orphan chain head " + std::to_string(sb.orphan_head) + " is past the inodes");
    }
    for (auto& b : bad) problem("superblock geometry: " + b);
    return bad.empty();
  }

  // The journal's transaction; a complete one goes into the overlay, as replay would write it.
  void journal(const Superblock& sb, JournalView& j) {
    const std::byte* first = block(sb.journal_start);
    if (first == nullptr) return;
    JournalDescriptor d;
    std::memcpy(&d, first, sizeof d);
    if (d.magic != kJournalMagic ||
        d.header_checksum != xxhash64(&d, offsetof(JournalDescriptor, header_checksum))) {
      return;  // empty
    }
    j.transaction = true;
    j.sequence = d.sequence;
    j.count = d.count;
    if (d.count == 0 || d.count > sb.journal_blocks) {
      problem("journal descriptor is damaged (count " + std::to_string(d.count) + ")");
      return;
    }
    uint64_t desc_blocks = (sizeof d + d.count * 8 + bs_ - 1) / bs_;
    if (desc_blocks + d.count > sb.journal_blocks) {
      problem("journal descriptor is damaged (count " + std::to_string(d.count) + ")");
      return;
    }
    std::vector<std::byte> desc(desc_blocks * bs_);
    for (uint64_t i = 0; i < desc_blocks; ++i) {
      const std::byte* b = block(sb.journal_start + i);
      if (b == nullptr) return;
      std::memcpy(desc.data() + i * bs_, b, bs_);
    }
    std::vector<uint64_t> homes(d.count);
    std::memcpy(homes.data(), desc.data() + sizeof d, homes.size() * 8);
    std::map<uint64_t, std::vector<std::byte>> images;
    uint64_t sum = xxhash64(homes.data(), homes.size() * 8, d.sequence);
    for (uint64_t i = 0; i < d.count; ++i) {
      const std::byte* b = block(sb.journal_start + desc_blocks + i);
      if (b == nullptr) return;
      sum = xxhash64(b, bs_, sum);
      images[homes[i]].assign(b, b + bs_);
    }
    j.complete = sum == d.checksum;
    if (!j.complete) return;  // never committed: a mount replays nothing
    for (auto& [lba, image] : images) {
      if (lba >= sb.block_count ||
          (lba >= sb.journal_start && lba - sb.journal_start < sb.journal_blocks)) {
        problem("journal transaction " + std::to_string(d.sequence) + " names LBA " +
                std::to_string(lba) + ", outside the blocks it may change");
        overlay_.clear();
        j.complete = false;
        return;
      }
      overlay_[lba] = std::move(image);
    }
  }

  void count(FilesystemView& v) {
    const uint64_t bits = uint64_t(bs_) * 8;
    // Blocks below data_start are in use whatever their bits say; inodes 0 and 1 likewise.
    auto free_in = [&](uint64_t start, uint64_t blocks, uint64_t lo,
                       uint64_t hi) -> std::optional<uint64_t> {
      uint64_t free = 0;
      for (uint64_t i = 0; i < blocks && i * bits < hi; ++i) {
        const std::byte* b = block(start + i);
        if (b == nullptr) return std::nullopt;
        uint64_t first = std::max(lo, i * bits), last = std::min(hi, (i + 1) * bits);
        if (first >= last) continue;
        free += (last - first) - bits_set(b, first - i * bits, last - i * bits);
      }
      return free;
    };
    v.free_blocks =
        free_in(v.block_bitmap_start, v.block_bitmap_blocks, v.data_start, v.block_count);
    v.free_inodes = free_in(v.inode_bitmap_start, v.inode_bitmap_blocks, 2, v.inode_count);
  }

  Btt& btt_;
  ImageInfo& out_;
  uint32_t bs_;
  std::vector<std::byte> buf_;
  std::map<uint64_t, std::vector<std::byte>> overlay_;
};

}  // namespace

Result<std::unique_ptr<ImageInspector>> ImageInspector::open(const std::string& path) {
  RegionOptions ro;
  ro.read_only = true;
  ro.unlocked = true;  // a mount holds the lock; looking must not get in its way
  auto region = Region::open(path, ro);
  if (!region) return region.status();
  if ((*region)->size() < kImageHeaderSize) {
    return Status(EINVAL, path + " is not a vpmfs image (" + std::to_string((*region)->size()) +
                              " bytes, smaller than an image header)");
  }
  if (std::memcmp((*region)->at(0), kImageMagic, sizeof kImageMagic) != 0) {
    return Status(EINVAL, path + " is not a vpmfs image (no VPMFSIMG header)");
  }
  auto in = std::unique_ptr<ImageInspector>(new ImageInspector());
  in->region_ = std::move(region.value());
  in->header_ = read_header(*in->region_, nullptr);
  return in;
}

Result<const BttInspector*> ImageInspector::btt() {
  if (!header_.layout_ok) {
    return Status(EUCLEAN, "the image header's layout cannot be trusted; the BTT is not read");
  }
  if (!btt_) {
    BttOpenOptions bo;
    bo.offset = header_.btt_offset;
    bo.size = header_.btt_size;
    bo.intent_log = header_.intent_log_offset;
    btt_.emplace(BttInspector::open(*region_, bo));
  }
  if (!*btt_) return btt_->status();
  const BttInspector& in = btt_->value();
  if (in.arenas().empty() || !in.arenas().front().usable) {
    return in.walk_error() ? Status(EUCLEAN, "no readable BTT arena") : in.walk_error();
  }
  return &in;
}

ImageInfo ImageInspector::info() {
  ImageInfo out;
  out.path = region_->path();
  out.file_size = region_->size();
  out.backend = region_->backend_name();
  find_holder(out.path, out);
  out.header = read_header(*region_, &out.problems);
  if (!out.header.layout_ok) return out;

  auto inspector = btt();
  if (btt_ && *btt_) {
    const BttInspector& in = btt_->value();
    out.btt_found = true;
    out.arenas = in.arenas();
    out.btt_sectors = in.sector_count();
    // What the walk noticed are damaged info-block copies: a writable open would mend them.
    for (const auto& n : in.notes()) out.problems.push_back("btt: " + n);
    for (const BttArenaView& a : out.arenas) {
      std::string where = "btt: arena " + std::to_string(a.index) + ": ";
      if (a.usable && a.error_flag) {
        out.problems.push_back(where + "the info block's error flag is set");
      }
      if (!a.flog_problem.empty()) out.problems.push_back(where + a.flog_problem);
    }
    if (!in.walk_error()) out.problems.push_back("btt: " + in.walk_error().message());
  } else {
    out.problems.push_back("btt: " + inspector.status().message());
  }
  if (!inspector) return out;

  BttOpenOptions bo;
  bo.offset = out.header.btt_offset;
  bo.size = out.header.btt_size;
  bo.intent_log = out.header.intent_log_offset;
  auto opened = Btt::open(*region_, bo);
  if (!opened) {
    out.problems.push_back("filesystem: cannot read through the BTT: " + opened.status().message());
    return out;
  }
  const auto& walk_notes = btt_->value().notes();
  for (const auto& n : (*opened)->open_notes()) {
    // Its arena walk repeats the inspector's notes; the rest is recovery (read-only: not done).
    if (std::find(walk_notes.begin(), walk_notes.end(), n) == walk_notes.end()) {
      out.btt_notes.push_back(n);
    }
  }
  FsReader(**opened, out).run();
  // mkfs gives the header, every arena and the superblock the same uuid.
  for (const BttArenaView& a : out.arenas) {
    if (a.usable && a.info.uuid != out.header.uuid) {
      out.problems.push_back("btt: arena " + std::to_string(a.index) + " has uuid " +
                             uuid_string(a.info.uuid) + ", the image header " +
                             uuid_string(out.header.uuid));
    }
  }
  if (out.fs && out.fs->uuid != out.header.uuid) {
    out.problems.push_back("filesystem: superblock uuid " + uuid_string(out.fs->uuid) +
                           " is not the image header's " + uuid_string(out.header.uuid));
  }
  return out;
}

}  // namespace vpmfs
