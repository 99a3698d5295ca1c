// Damaged filesystem metadata (docs/FORMAT.md, section 4): every corruption is written through
// the BTT, so that the BTT stays sound and only the filesystem above it is wrong. A damaged image
// must be refused at mount with a clear error, or be repaired by fsck: fsck -n reports the damage
// (exit 4), fsck -y repairs it (exit 1), a second fsck -n is clean (exit 0), and every file the
// damage did not touch keeps its contents. Never a crash, a hang or an out-of-bounds access
// (the sanitizer build checks that).
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../fs/format.h"
#include "test_util.h"
#include "vpmfs/btt.h"
#include "vpmfs/checksum.h"
#include "vpmfs/fs.h"
#include "vpmfs/fsck.h"

namespace vpmfs {
namespace {

using test::random_bytes;
using test::TempPath;
using ::testing::HasSubstr;
using Block = std::vector<std::byte>;

constexpr uint64_t kImageSize = 32ull << 20;

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += s + "\n";
  return out;
}

uint64_t inode_sum(const fsfmt::Inode& in, uint64_t ino) {
  fsfmt::Inode copy = in;
  copy.checksum = 0;
  return xxhash64(&copy, sizeof copy, ino);
}

uint64_t super_sum(const fsfmt::Superblock& sb) {
  fsfmt::Superblock copy = sb;
  copy.checksum = 0;
  return xxhash64(&copy, sizeof copy);
}

uint64_t xattr_sum(const std::byte* block, uint32_t bs, uint64_t ino) {
  Block copy(block, block + bs);
  std::memset(copy.data() + offsetof(fsfmt::XattrHeader, checksum), 0, 8);
  return xxhash64(copy.data(), bs, ino);
}

// An unmounted image's filesystem blocks, read and written through its BTT as a stray write
// would: the BTT stays consistent, the filesystem metadata does not.
class RawImage {
 public:
  static std::unique_ptr<RawImage> open(const std::string& path) {
    auto r = std::unique_ptr<RawImage>(new RawImage());
    RegionOptions ro;
    ro.force_persistent = true;
    auto region = Region::open(path, ro);
    if (!region) {
      ADD_FAILURE() << region.status().to_string();
      return nullptr;
    }
    r->region_ = std::move(region.value());
    fsfmt::ImageHeader h;
    std::memcpy(&h, r->region_->at(0), sizeof h);
    BttOpenOptions bo;
    bo.offset = h.btt_offset;
    bo.size = h.btt_size;
    bo.intent_log = h.intent_log_offset;
    auto btt = Btt::open(*r->region_, bo);
    if (!btt) {
      ADD_FAILURE() << btt.status().to_string();
      return nullptr;
    }
    r->btt_ = std::move(btt.value());
    r->bs = r->btt_->sector_size();
    r->n = r->btt_->sector_count();
    Block b = r->read(0);
    std::memcpy(&r->sb, b.data(), sizeof r->sb);
    return r;
  }
  ~RawImage() {
    if (btt_) {
      EXPECT_TRUE(btt_->sync_wait());
    }
    btt_.reset();
    region_.reset();
  }

  Block read(uint64_t lba) {
    Block b(bs);
    Status s = btt_->read(lba, b.data());
    EXPECT_TRUE(s) << "LBA " << lba << ": " << s.to_string();
    return b;
  }
  void write(uint64_t lba, const Block& b) {
    Status s = btt_->write(lba, b.data());
    EXPECT_TRUE(s) << "LBA " << lba << ": " << s.to_string();
  }
  void edit(uint64_t lba, const std::function<void(std::byte*)>& f) {
    Block b = read(lba);
    f(b.data());
    write(lba, b);
  }

  uint64_t inode_lba(uint64_t ino) const { return sb.inode_table_start + ino * 256 / bs; }
  uint32_t inode_off(uint64_t ino) const { return uint32_t(ino * 256 % bs); }
  fsfmt::Inode inode(uint64_t ino) {
    fsfmt::Inode in;
    std::memcpy(&in, read(inode_lba(ino)).data() + inode_off(ino), sizeof in);
    return in;
  }
  // Stores an inode, with a checksum that matches unless told otherwise.
  void put_inode(uint64_t ino, fsfmt::Inode in, bool checksum = true) {
    if (checksum) in.checksum = inode_sum(in, ino);
    edit(inode_lba(ino), [&](std::byte* p) { std::memcpy(p + inode_off(ino), &in, sizeof in); });
  }
  void put_super(fsfmt::Superblock s, bool checksum = true) {
    if (checksum) s.checksum = super_sum(s);
    edit(0, [&](std::byte* p) { std::memcpy(p, &s, sizeof s); });
  }

  struct Record {
    uint64_t lba = 0;  // the directory block
    uint32_t off = 0;  // of the record in it
    fsfmt::DirRecordHeader h{};
    std::string name;
  };
  // The records of a directory's direct blocks, free ones too.
  std::vector<Record> records(uint64_t dino) {
    std::vector<Record> out;
    fsfmt::Inode d = inode(dino);
    for (uint64_t b = 0; b < d.size / bs && b < uint64_t(fsfmt::kDirect); ++b) {
      Block blk = read(d.ptr[b]);
      for (uint32_t off = 0; off + 16 <= bs;) {
        Record r;
        r.lba = d.ptr[b];
        r.off = off;
        std::memcpy(&r.h, blk.data() + off, 16);
        if (r.h.rec_len < 16 || off + r.h.rec_len > bs) break;
        r.name.assign(reinterpret_cast<const char*>(blk.data()) + off + 16,
                      std::min<std::size_t>(r.h.name_len, r.h.rec_len - 16));
        out.push_back(r);
        off += r.h.rec_len;
      }
    }
    return out;
  }
  Record record(uint64_t dino, const std::string& name) {
    for (const Record& r : records(dino)) {
      if (r.h.ino != 0 && r.name == name) return r;
    }
    ADD_FAILURE() << "no record " << name << " in directory " << dino;
    return {};
  }
  void put_record(const Record& r) {
    edit(r.lba, [&](std::byte* p) { std::memcpy(p + r.off, &r.h, sizeof r.h); });
  }
  // Adds a used record by splitting the last free record of the directory's first block.
  void add_record(uint64_t dino, uint64_t ino, const std::string& name, uint8_t type) {
    Record last;
    bool found = false;
    for (const Record& r : records(dino)) {
      if (r.lba == inode(dino).ptr[0] && r.h.ino == 0 &&
          r.h.rec_len >= fsfmt::dir_record_len(name.size()) + 16) {
        last = r;
        found = true;
      }
    }
    ASSERT_TRUE(found) << "no room in directory " << dino;
    uint16_t need = uint16_t(fsfmt::dir_record_len(name.size()));
    edit(last.lba, [&](std::byte* p) {
      fsfmt::DirRecordHeader used{ino, need, uint8_t(name.size()), type, 0};
      fsfmt::DirRecordHeader rest{0, uint16_t(last.h.rec_len - need), 0, 0, 0};
      std::memcpy(p + last.off, &used, sizeof used);
      std::memcpy(p + last.off + 16, name.data(), name.size());
      std::memcpy(p + last.off + need, &rest, sizeof rest);
    });
  }

  fsfmt::JournalDescriptor journal_descriptor() {
    fsfmt::JournalDescriptor d;
    std::memcpy(&d, read(sb.journal_start).data(), sizeof d);
    return d;
  }
  // Writes a one-transaction journal: the images, then the descriptor. body_ok false spoils the
  // chained checksum (the header checksum stays right); count overrides the header's count.
  void write_journal(const std::vector<uint64_t>& homes, const std::vector<Block>& images,
                     bool body_ok = true, std::optional<uint64_t> count = std::nullopt) {
    uint64_t seq = journal_descriptor().sequence + 1;
    uint64_t desc_blocks = (sizeof(fsfmt::JournalDescriptor) + homes.size() * 8 + bs - 1) / bs;
    uint64_t sum = xxhash64(homes.data(), homes.size() * 8, seq);
    for (std::size_t i = 0; i < images.size(); ++i) {
      write(sb.journal_start + desc_blocks + i, images[i]);
      sum = xxhash64(images[i].data(), bs, sum);
    }
    fsfmt::JournalDescriptor d{fsfmt::kJournalMagic, seq, count.value_or(homes.size()),
                               body_ok ? sum : sum ^ 1, 0};
    d.header_checksum = xxhash64(&d, offsetof(fsfmt::JournalDescriptor, header_checksum));
    Block desc(desc_blocks * bs);
    std::memcpy(desc.data(), &d, sizeof d);
    std::memcpy(desc.data() + sizeof d, homes.data(), homes.size() * 8);
    for (uint64_t i = 0; i < desc_blocks; ++i) {
      write(sb.journal_start + i, Block(desc.begin() + i * bs, desc.begin() + (i + 1) * bs));
    }
  }

  // The kill log's checkpoints count only above the journal's transaction: with the journal
  // emptied, those of the last session would be replayed over any damage done here. All of
  // it, not only the half headers: transaction numbers start again from an empty journal, and
  // records of an earlier transaction 1 would pass for the next one's.
  void clear_kill_log() {
    fsfmt::ImageHeader h;
    std::memcpy(&h, region_->at(0), sizeof h);
    if (h.kill_log_size == 0) return;
    region_->zero(h.kill_log_offset, h.kill_log_size);
    region_->persist(h.kill_log_offset, h.kill_log_size);
  }

  bool bit(uint64_t start, uint64_t index) {
    Block b = read(start + index / (uint64_t(bs) * 8));
    uint64_t i = index % (uint64_t(bs) * 8);
    return (uint8_t(b[i / 8]) >> (i % 8)) & 1;
  }
  void set_bit(uint64_t start, uint64_t index, bool on) {
    uint64_t i = index % (uint64_t(bs) * 8);
    edit(start + index / (uint64_t(bs) * 8), [&](std::byte* p) {
      if (on) {
        p[i / 8] |= std::byte(1u << (i % 8));
      } else {
        p[i / 8] &= ~std::byte(1u << (i % 8));
      }
    });
  }

  uint32_t bs = 0;
  uint64_t n = 0;
  fsfmt::Superblock sb{};

 private:
  RawImage() = default;
  std::unique_ptr<Region> region_;
  std::unique_ptr<Btt> btt_;
};

// What a path of the populated volume holds.
struct Expect {
  uint64_t ino = 0;
  char kind = 'f';      // 'f' regular file, 'd' directory, 'l' symlink
  std::string content;  // file data or symlink target
  std::map<std::string, std::string> xattrs;
};

Result<uint64_t> resolve(Volume& v, const std::string& path) {
  uint64_t cur = kRootIno;
  for (std::size_t at = 0; at < path.size();) {
    std::size_t slash = path.find('/', at);
    if (slash == std::string::npos) slash = path.size();
    auto a = v.lookup(cur, path.substr(at, slash - at));
    if (!a) return a.status();
    cur = a->ino;
    at = slash + 1;
  }
  return cur;
}

Result<std::string> read_all(Volume& v, uint64_t ino) {
  auto a = v.getattr(ino);
  if (!a) return a.status();
  std::string data(std::min<uint64_t>(a->size, 64 << 20), '\0');
  auto got = v.read(ino, 0, data.data(), data.size());
  if (!got) return got.status();
  data.resize(*got);
  return data;
}

// Every path of `model` that is not in `touched` (nor below a touched directory) is there, with
// its kind, contents, symlink target and extended attributes. Empty when so, else what differs.
std::string check_intact(Volume& v, const std::map<std::string, Expect>& model,
                         const std::set<std::string>& touched) {
  std::string bad;
  for (const auto& [path, want] : model) {
    bool skip = false;
    for (const std::string& t : touched) {
      if (path == t || path.rfind(t + "/", 0) == 0) skip = true;
    }
    if (skip) continue;
    auto ino = resolve(v, path);
    if (!ino) {
      bad += path + ": " + ino.status().to_string() + "\n";
      continue;
    }
    auto a = v.getattr(*ino);
    if (!a) {
      bad += path + ": getattr: " + a.status().to_string() + "\n";
      continue;
    }
    char kind = S_ISDIR(a->mode) ? 'd' : S_ISLNK(a->mode) ? 'l' : S_ISREG(a->mode) ? 'f' : '?';
    if (kind != want.kind) {
      bad += path + ": kind " + kind + ", want " + want.kind + "\n";
      continue;
    }
    if (kind == 'f') {
      auto data = read_all(v, *ino);
      if (!data) {
        bad += path + ": read: " + data.status().to_string() + "\n";
      } else if (*data != want.content) {
        bad += path + ": contents differ (" + std::to_string(data->size()) + " bytes, want " +
               std::to_string(want.content.size()) + ")\n";
      }
    } else if (kind == 'l') {
      auto target = v.readlink(*ino);
      if (!target || *target != want.content) bad += path + ": symlink target differs\n";
    }
    for (const auto& [name, value] : want.xattrs) {
      std::string got(value.size(), '\0');
      auto n = v.getxattr(*ino, name, got.data(), got.size());
      if (!n || got.substr(0, *n) != value) bad += path + ": xattr " + name + " differs\n";
    }
  }
  return bad;
}

// The volume still works: a new file can be written, read back and removed.
std::string check_usable(Volume& v) {
  auto f = v.mknod(kRootIno, "after-repair", S_IFREG | 0644, 0, 0, 0);
  if (!f) return "mknod: " + f.status().to_string();
  std::string data = random_bytes("after-repair", 3 * v.block_size() + 7);
  auto w = v.write(f->ino, 0, data.data(), data.size());
  if (!w || *w != data.size()) return "write failed";
  auto r = read_all(v, f->ino);
  if (!r || *r != data) return "read back differs";
  if (Status s = v.sync_wait(); !s) return "sync: " + s.to_string();
  if (Status s = v.unlink(kRootIno, "after-repair"); !s) return "unlink: " + s.to_string();
  return "";
}

class CorruptFs : public ::testing::Test {
 protected:
  void SetUp() override {
    MkfsOptions o;
    o.size = kImageSize;
    o.force_persistent = true;
    o.label = "corrupt";
    o.sector_size = sector_size_;
    ASSERT_TRUE(Volume::mkfs(path_, o));
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    populate(**v);
    ASSERT_TRUE((*v)->sync_wait());
    v->reset();
    forget_journal();
  }

  // Mounts replay the journal's last transaction every time, which would undo damage to the
  // blocks it holds: start from an empty journal, as after fsck -y.
  void forget_journal() {
    auto r = raw();
    ASSERT_TRUE(r);
    r->write(r->sb.journal_start, Block(r->bs));
    r->clear_kill_log();
  }

  Result<std::unique_ptr<Volume>> mount(bool read_only = false) {
    MountOptions m;
    m.force_persistent = true;
    m.read_only = read_only;
    return Volume::mount(path_, m);
  }

  void populate(Volume& v) {
    const uint32_t bs = v.block_size();
    auto dir = [&](const std::string& path) {
      auto parent = parent_of(path);
      auto a = v.mkdir(parent, base(path), 0755, 0, 0);
      ASSERT_TRUE(a) << path << ": " << a.status().to_string();
      model_[path] = Expect{a->ino, 'd', "", {}};
    };
    auto file = [&](const std::string& path, std::size_t len) {
      auto a = v.mknod(parent_of(path), base(path), S_IFREG | 0644, 0, 0, 0);
      ASSERT_TRUE(a) << path << ": " << a.status().to_string();
      std::string data = random_bytes(path, len);
      if (len != 0) {
        ASSERT_TRUE(v.write(a->ino, 0, data.data(), data.size()));
      }
      model_[path] = Expect{a->ino, 'f', data, {}};
    };
    auto xattr = [&](const std::string& path, const std::string& name, const std::string& value) {
      ASSERT_TRUE(v.setxattr(model_[path].ino, name, value.data(), value.size(), 0));
      model_[path].xattrs[name] = value;
    };
    dir("d1");
    dir("d1/sub");
    dir("d2");
    file("a", 3 * bs + 100);
    file("b", bs);
    file("d1/c", 20 * bs);  // past the direct pointers: a single-indirect block
    file("d1/sub/e", 50);
    file("d2/f", 700);
    file("d2/g", 0);
    for (int i = 0; i < 12; ++i) file("n" + std::to_string(i), 10 + i);
    xattr("d2/f", "user.color", "blue");
    xattr("d1", "user.dir", "yes");
    xattr("a", "trusted.k", std::string(300, 'k'));
    auto hard = v.link(model_["a"].ino, model_["d2"].ino, "hard");
    ASSERT_TRUE(hard);
    model_["d2/hard"] = model_["a"];
    auto link = v.symlink(kRootIno, "link", "d1/c", 0, 0);
    ASSERT_TRUE(link);
    model_["link"] = Expect{link->ino, 'l', "d1/c", {}};
    std::string long_target(300, 't');
    auto longlink = v.symlink(model_["d1"].ino, "longlink", long_target, 0, 0);
    ASSERT_TRUE(longlink);
    model_["d1/longlink"] = Expect{longlink->ino, 'l', long_target, {}};
  }

  uint64_t parent_of(const std::string& path) {
    std::size_t slash = path.rfind('/');
    return slash == std::string::npos ? kRootIno : model_.at(path.substr(0, slash)).ino;
  }
  static std::string base(const std::string& path) {
    std::size_t slash = path.rfind('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
  }
  uint64_t ino(const std::string& path) { return model_.at(path).ino; }

  std::unique_ptr<RawImage> raw() { return RawImage::open(path_); }
  std::string image_bytes() {
    std::ifstream in(path_, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  FsckReport run_fsck(bool repair) {
    FsckOptions o;
    o.repair = repair;
    auto r = fsck(path_, o);
    EXPECT_TRUE(r) << (repair ? "fsck -y: " : "fsck -n: ") << r.status().to_string();
    return r ? *r : FsckReport{};
  }

  // The mount refuses the image with EUCLEAN and a message that says what is wrong.
  void expect_mount_refused(const std::string& what) {
    auto v = mount();
    ASSERT_FALSE(v) << "mounted a damaged image";
    EXPECT_EQ(v.status().error(), EUCLEAN) << v.status().to_string();
    EXPECT_THAT(v.status().message(), HasSubstr(what));
  }

  // fsck -n finds the damage (exit 4; a problem mentions `what`), fsck -y repairs it (exit 1), a
  // second fsck -n is clean (exit 0), and the volume mounts with every path not in `touched` as
  // it was, and works.
  void expect_repaired(const std::string& what, const std::set<std::string>& touched = {}) {
    FsckReport found = run_fsck(false);
    EXPECT_EQ(found.exit_code(), 4) << "fsck -n missed the damage";
    EXPECT_THAT(joined(found.problems), HasSubstr(what));
    // Preen (fsck -p, as at boot) leaves damage to -y: exit 4, and not a byte changed.
    std::string image = image_bytes();
    FsckOptions preen;
    preen.preen = true;
    auto preened = fsck(path_, preen);
    ASSERT_TRUE(preened) << preened.status().to_string();
    EXPECT_EQ(preened->exit_code(), 4);
    EXPECT_TRUE(preened->repairs.empty());
    EXPECT_TRUE(image_bytes() == image) << "fsck -p changed a damaged image";
    FsckReport fixed = run_fsck(true);
    EXPECT_EQ(fixed.exit_code(), 1) << "fsck -y:\n"
                                    << joined(fixed.problems) << "not repaired:\n"
                                    << joined(fixed.remaining);
    FsckReport again = run_fsck(false);
    EXPECT_EQ(again.exit_code(), 0) << "after repair:\n" << joined(again.problems);
    expect_intact(touched);
  }

  void expect_intact(const std::set<std::string>& touched = {}) {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ(check_intact(**v, model_, touched), "");
    EXPECT_EQ(check_usable(**v), "");
    v->reset();
    FsckReport after = run_fsck(false);
    EXPECT_EQ(after.exit_code(), 0) << "after using the repaired volume:\n"
                                    << joined(after.problems);
  }

  // Frees the record naming `path` in its directory: what it named is in no directory now.
  void lose_entry(const std::string& path) {
    auto r = raw();
    ASSERT_TRUE(r);
    RawImage::Record rec = r->record(parent_of(path), base(path));
    rec.h.ino = 0;
    rec.h.name_len = 0;
    rec.h.type = 0;
    r->put_record(rec);
  }
  // The model's paths at or under `from` are at `to` now.
  void moved(const std::string& from, const std::string& to) {
    std::map<std::string, Expect> next;
    for (auto& [path, want] : model_) {
      if (path == from || path.rfind(from + "/", 0) == 0) {
        next[to + path.substr(from.size())] = want;
      } else {
        next[path] = want;
      }
    }
    model_ = std::move(next);
  }
  std::string lost_name(const std::string& path) { return "#" + std::to_string(ino(path)); }
  // lost+found's entries, by name.
  std::map<std::string, uint64_t> lost_found_entries() {
    std::map<std::string, uint64_t> out;
    auto v = mount();
    EXPECT_TRUE(v) << v.status().to_string();
    if (!v) return out;
    auto lf = (*v)->lookup(kRootIno, "lost+found");
    EXPECT_TRUE(lf) << lf.status().to_string();
    if (!lf) return out;
    EXPECT_TRUE(S_ISDIR(lf->mode));
    EXPECT_EQ(lf->mode & 07777, 0700u);
    (void)(*v)->readdir(lf->ino, 0, [&](const DirEntry& e) {
      if (e.name != "." && e.name != "..") out[e.name] = e.ino;
      return true;
    });
    return out;
  }

  TempPath path_{"corrupt-fs.img"};
  uint32_t sector_size_ = 4096;
  std::map<std::string, Expect> model_;
};

TEST_F(CorruptFs, PopulatedImageIsClean) {
  FsckReport r = run_fsck(false);
  EXPECT_EQ(r.exit_code(), 0) << joined(r.problems);
  expect_intact();
}

// --- superblock -------------------------------------------------------------------------------

TEST_F(CorruptFs, SuperblockBadMagic) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.magic ^= 0x100;
    r->put_super(sb, /*checksum=*/false);
  }
  expect_mount_refused("no filesystem superblock");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockBadChecksum) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.label[3] ^= 0x20;
    r->put_super(sb, /*checksum=*/false);
  }
  expect_mount_refused("superblock checksum mismatch");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockAllGarbage) {
  {
    auto r = raw();
    r->write(0, Block(r->bs, std::byte{0xA5}));
  }
  expect_mount_refused("superblock");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockBlockCountBeyondTheDevice) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.block_count = r->n + 1000;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockJournalBeyondTheDevice) {
  {
    // Every region after the journal moved along with it, so that they still follow each other.
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    uint64_t shift = r->n;
    sb.journal_blocks += shift;
    sb.block_bitmap_start += shift;
    sb.inode_bitmap_start += shift;
    sb.inode_table_start += shift;
    sb.data_start += shift;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockJournalLengthWrapsAround) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.journal_blocks = ~0ull;  // 1 + journal_blocks == 0
    sb.block_bitmap_start = 0;
    sb.inode_bitmap_start = sb.block_bitmap_start + sb.block_bitmap_blocks;
    sb.inode_table_start = sb.inode_bitmap_start + sb.inode_bitmap_blocks;
    sb.data_start = sb.inode_table_start + sb.inode_table_blocks;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockOverlappingRegions) {
  {
    // The inode bitmap on top of the block bitmap, the rest consistent with that.
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.inode_bitmap_start = sb.block_bitmap_start;
    sb.inode_table_start = sb.inode_bitmap_start + sb.inode_bitmap_blocks;
    sb.data_start = sb.inode_table_start + sb.inode_table_blocks;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockInodeTableInsideTheJournal) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.inode_table_start = sb.journal_start + 2;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockHugeInodeCount) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.inode_count = 1ull << 60;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

TEST_F(CorruptFs, SuperblockOrphanHeadBeyondTheInodeTable) {
  {
    auto r = raw();
    fsfmt::Superblock sb = r->sb;
    sb.orphan_head = sb.inode_count + 5;
    r->put_super(sb);
  }
  expect_mount_refused("geometry is inconsistent");
  expect_repaired("superblock");
}

// --- journal ----------------------------------------------------------------------------------

TEST_F(CorruptFs, JournalGarbageDescriptorIsNoTransaction) {
  {
    auto r = raw();
    r->write(r->sb.journal_start, Block(r->bs, std::byte{0x5A}));
  }
  FsckReport report = run_fsck(false);
  EXPECT_EQ(report.exit_code(), 0) << joined(report.problems);
  expect_intact();
}

// A transaction that zeroes the inode-table block holding "a": replayed, it would lose files.
class CorruptJournal : public CorruptFs {
 protected:
  void write_killer(bool body_ok, std::optional<uint64_t> count = std::nullopt,
                    std::optional<uint64_t> home = std::nullopt) {
    auto r = raw();
    uint64_t lba = home.value_or(r->inode_lba(ino("a")));
    r->write_journal({lba}, {Block(r->bs)}, body_ok, count);
  }
};

TEST_F(CorruptJournal, CompleteTransactionIsReplayed) {
  // The control for the tests below: a transaction whose checksums match is applied.
  write_killer(/*body_ok=*/true);
  auto v = mount();
  ASSERT_TRUE(v) << v.status().to_string();
  EXPECT_FALSE(resolve(**v, "a")) << "the replayed transaction zeroed a's inode";
}

TEST_F(CorruptJournal, BadBodyChecksumIsNotReplayed) {
  write_killer(/*body_ok=*/false);
  FsckReport report = run_fsck(false);
  EXPECT_EQ(report.exit_code(), 0) << joined(report.problems);
  expect_intact();
  expect_intact();  // and not replayed by a later mount either
}

TEST_F(CorruptJournal, CountLargerThanTheJournal) {
  uint64_t blocks = raw()->sb.journal_blocks;
  write_killer(/*body_ok=*/true, blocks + 1);
  expect_mount_refused("journal descriptor is damaged");
  expect_repaired("journal");
}

TEST_F(CorruptJournal, CountThatWrapsAround) {
  write_killer(/*body_ok=*/true, ~0ull);
  expect_mount_refused("journal descriptor is damaged");
  expect_repaired("journal");
}

TEST_F(CorruptJournal, FsckSurvivesACountThatWrapsAround) {
  write_killer(/*body_ok=*/true, ~0ull);
  expect_repaired("journal");
}

TEST_F(CorruptJournal, HomeBeyondTheDevice) {
  uint64_t n = raw()->n;
  write_killer(/*body_ok=*/true, std::nullopt, n + 3);
  expect_mount_refused("out of range");
  expect_repaired("journal");
}

TEST_F(CorruptJournal, HomeInsideTheJournal) {
  uint64_t home = raw()->sb.journal_start + 10;
  write_killer(/*body_ok=*/true, std::nullopt, home);
  expect_mount_refused("out of range");
  expect_repaired("journal");
}

// --- inodes -----------------------------------------------------------------------------------

TEST_F(CorruptFs, InodeChecksumMismatchOnAnOtherwiseSoundInode) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("b"));
    in.atime_sec ^= 0x10;
    r->put_inode(ino("b"), in, /*checksum=*/false);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->getattr(ino("b")).status().error(), EUCLEAN);
    EXPECT_EQ(check_intact(**v, model_, {"b"}), "");
  }
  // Every field is one the format allows: only the checksum needs mending, and b is kept.
  expect_repaired("inode");
}

TEST_F(CorruptFs, InodeFullOfGarbage) {
  {
    auto r = raw();
    r->edit(r->inode_lba(ino("b")), [&](std::byte* p) {
      std::string junk = random_bytes("garbage", 256);
      std::memcpy(p + r->inode_off(ino("b")), junk.data(), 256);
    });
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->lookup(kRootIno, "b").status().error(), EUCLEAN);
    EXPECT_EQ(check_intact(**v, model_, {"b"}), "");
  }
  expect_repaired("b", {"b"});
  auto v = mount();
  ASSERT_TRUE(v);
  EXPECT_EQ((*v)->lookup(kRootIno, "b").status().error(), ENOENT) << "the damaged entry went";
}

TEST_F(CorruptFs, RootInodeDamaged) {
  {
    // Damage no single field explains: the root is rebuilt from what is sound in it, rather
    // than every file lost with it.
    auto r = raw();
    fsfmt::Inode root = r->inode(kRootIno);
    root.nlink = 0;
    root.size = 12345;
    root.parent = ~0ull;
    r->put_inode(kRootIno, root, /*checksum=*/false);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->lookup(kRootIno, "a").status().error(), EUCLEAN);
  }
  expect_repaired("directory inode 1");
}

TEST_F(CorruptFs, RootIsNotADirectory) {
  {
    auto r = raw();
    fsfmt::Inode root = r->inode(kRootIno);
    root.mode = S_IFREG | 0644;
    r->put_inode(kRootIno, root);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->lookup(kRootIno, "a").status().error(), ENOTDIR);
  }
  expect_repaired("root");
}

TEST_F(CorruptFs, InodeModeGarbage) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("b"));
    in.mode = 0xFFFFFFFF;
    r->put_inode(ino("b"), in);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    std::string buf(100, '\0');
    (void)(*v)->read(ino("b"), 0, buf.data(), buf.size());
    (void)(*v)->readdir(ino("b"), 0, [](const DirEntry&) { return true; });
    EXPECT_EQ(check_intact(**v, model_, {"b"}), "");
  }
  // The directory entry says it is a regular file: that is what it becomes again.
  expect_repaired("mode");
}

TEST_F(CorruptFs, DirectoryModeGarbage) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("d1/sub"));
    in.mode = S_IFMT | 0755;  // no such type
    r->put_inode(ino("d1/sub"), in);
  }
  expect_repaired("mode");
}

TEST_F(CorruptFs, FileSizeHuge) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("a"));
    in.size = 1ull << 60;
    r->put_inode(ino("a"), in);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    std::string buf(4096, '\0');
    auto got = (*v)->read(ino("a"), 0, buf.data(), buf.size());
    ASSERT_TRUE(got) << got.status().to_string();
    (void)(*v)->read(ino("a"), 1ull << 59, buf.data(), buf.size());
    EXPECT_EQ(check_intact(**v, model_, {"a", "d2/hard"}), "");
  }
  expect_repaired("size", {"a", "d2/hard"});
  // The size now ends with the last block the file has: the data is all there.
  auto v = mount();
  ASSERT_TRUE(v);
  auto data = read_all(**v, ino("a"));
  ASSERT_TRUE(data);
  EXPECT_EQ(data->substr(0, model_["a"].content.size()), model_["a"].content);
}

TEST_F(CorruptFs, DirectorySizeHuge) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("d1"));
    in.size = uint64_t(r->bs) << 40;
    r->put_inode(ino("d1"), in);
  }
  expect_repaired("size");
}

TEST_F(CorruptFs, MountSurvivesADirectorySizeHuge) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("d1"));
    in.size = uint64_t(r->bs) << 40;
    r->put_inode(ino("d1"), in);
  }
  auto v = mount();
  ASSERT_TRUE(v) << v.status().to_string();
  auto found = (*v)->lookup(ino("d1"), "c");
  EXPECT_TRUE(found || found.status().error() == EUCLEAN) << found.status().to_string();
}

TEST_F(CorruptFs, BlockPointerBeyondTheDevice) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("d1/c"));
    in.ptr[1] = r->n + 7;
    r->put_inode(ino("d1/c"), in);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    std::string buf(3 * 4096, '\0');
    EXPECT_FALSE((*v)->read(ino("d1/c"), 0, buf.data(), buf.size())) << "read past the device";
    EXPECT_EQ(check_intact(**v, model_, {"d1/c"}), "");
  }
  expect_repaired("outside the data area", {"d1/c"});
  // The pointer became a hole; the other 19 blocks are as they were.
  auto v = mount();
  ASSERT_TRUE(v);
  auto data = read_all(**v, ino("d1/c"));
  ASSERT_TRUE(data);
  std::string want = model_["d1/c"].content;
  std::fill(want.begin() + 4096, want.begin() + 8192, '\0');
  EXPECT_TRUE(*data == want);
}

TEST_F(CorruptFs, BlockPointerIntoTheInodeTable) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("b"));
    in.ptr[0] = r->inode_lba(ino("a"));
    r->put_inode(ino("b"), in);
  }
  expect_repaired("outside the data area", {"b"});
}

TEST_F(CorruptFs, WriteThroughAPointerIntoTheInodeTableIsRefused) {
  {
    auto r = raw();
    fsfmt::Inode in = r->inode(ino("b"));
    in.ptr[0] = r->inode_lba(ino("a"));
    r->put_inode(ino("b"), in);
  }
  auto v = mount();
  ASSERT_TRUE(v) << v.status().to_string();
  std::string junk(4096, 'X');
  auto w = (*v)->write(ino("b"), 0, junk.data(), junk.size());
  EXPECT_FALSE(w);
  EXPECT_EQ(w.status().error(), EUCLEAN);
  EXPECT_EQ(check_intact(**v, model_, {"b"}), "") << "a write to b damaged other files";
}

TEST_F(CorruptFs, TwoFilesShareABlock) {
  {
    auto r = raw();
    fsfmt::Inode b = r->inode(ino("b"));
    b.ptr[0] = r->inode(ino("a")).ptr[1];
    r->put_inode(ino("b"), b);
  }
  expect_repaired("owned by inode", {"b"});
  // Each has a block of its own again: a write to b leaves a alone.
  auto v = mount();
  ASSERT_TRUE(v);
  std::string junk(4096, 'X');
  ASSERT_TRUE((*v)->write(ino("b"), 0, junk.data(), junk.size()));
  EXPECT_EQ(check_intact(**v, model_, {"b"}), "");
}

TEST_F(CorruptFs, TwoDirectoriesShareABlock) {
  {
    auto r = raw();
    fsfmt::Inode d2 = r->inode(ino("d2"));
    d2.ptr[0] = r->inode(ino("d1/sub")).ptr[0];
    r->put_inode(ino("d2"), d2);
  }
  expect_repaired("owned by inode", {"d2", "d1/sub"});
}

TEST_F(CorruptFs, BlockFreedButInUseIsNotHandedOutTwiceAfterRepair) {
  {
    auto r = raw();
    fsfmt::Inode c = r->inode(ino("d1/c"));
    for (int i = 0; i < 12; ++i) r->set_bit(r->sb.block_bitmap_start, c.ptr[i], false);
    r->set_bit(r->sb.block_bitmap_start, c.ptr[12], false);  // the pointer block
  }
  expect_repaired("block bitmap");
  // Fill the volume with new files: none of them may take c's blocks.
  auto v = mount();
  ASSERT_TRUE(v);
  std::string junk(64 * 4096, 'N');
  for (int i = 0;; ++i) {
    auto f = (*v)->mknod(kRootIno, "fill" + std::to_string(i), S_IFREG | 0644, 0, 0, 0);
    if (!f) break;
    auto w = (*v)->write(f->ino, 0, junk.data(), junk.size());
    if (!w || *w < junk.size()) break;
  }
  EXPECT_EQ(check_intact(**v, model_, {}), "");
  v->reset();
  FsckReport r = run_fsck(false);
  EXPECT_EQ(r.exit_code(), 0) << joined(r.problems);
}

TEST_F(CorruptFs, FreeBlockMarkedInUseIsALeak) {
  {
    auto r = raw();
    r->set_bit(r->sb.block_bitmap_start, r->n - 5, true);
    r->set_bit(r->sb.block_bitmap_start, r->n - 6, true);
  }
  expect_repaired("block bitmap");
}

TEST_F(CorruptFs, InodeInUseMarkedFree) {
  {
    auto r = raw();
    r->set_bit(r->sb.inode_bitmap_start, ino("d1/c"), false);
  }
  expect_repaired("inode bitmap");
}

TEST_F(CorruptFs, FreeInodeMarkedInUse) {
  {
    auto r = raw();
    r->set_bit(r->sb.inode_bitmap_start, 200, true);
  }
  expect_repaired("inode bitmap");
}

TEST_F(CorruptFs, LinkCountTooLow) {
  {
    auto r = raw();
    fsfmt::Inode a = r->inode(ino("a"));
    ASSERT_EQ(a.nlink, 2u);
    a.nlink = 1;
    r->put_inode(ino("a"), a);
  }
  expect_repaired("link count");
  // Removing one name leaves the other.
  auto v = mount();
  ASSERT_TRUE(v);
  ASSERT_TRUE((*v)->unlink(kRootIno, "a"));
  auto data = read_all(**v, ino("d2/hard"));
  ASSERT_TRUE(data) << data.status().to_string();
  EXPECT_TRUE(*data == model_["a"].content);
}

TEST_F(CorruptFs, LinkCountTooHigh) {
  {
    auto r = raw();
    fsfmt::Inode d1 = r->inode(ino("d1"));
    d1.nlink = 40;
    r->put_inode(ino("d1"), d1);
    fsfmt::Inode e = r->inode(ino("d1/sub/e"));
    e.nlink = 0;
    r->put_inode(ino("d1/sub/e"), e);
  }
  expect_repaired("link count");
}

TEST_F(CorruptFs, ParentPointsElsewhere) {
  {
    auto r = raw();
    fsfmt::Inode sub = r->inode(ino("d1/sub"));
    sub.parent = ino("d2");
    r->put_inode(ino("d1/sub"), sub);
    fsfmt::Inode d2 = r->inode(ino("d2"));
    d2.parent = 3999;  // an inode that is not in use
    r->put_inode(ino("d2"), d2);
  }
  expect_repaired("parent");
  auto v = mount();
  ASSERT_TRUE(v);
  auto up = (*v)->lookup(ino("d1/sub"), "..");
  ASSERT_TRUE(up);
  EXPECT_EQ(up->ino, ino("d1"));
}

// --- directory blocks -------------------------------------------------------------------------

TEST_F(CorruptFs, RecordLengthZero) {
  {
    auto r = raw();
    auto rec = r->record(kRootIno, "b");
    rec.h.rec_len = 0;
    r->put_record(rec);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    Status s = (*v)->readdir(kRootIno, 0, [](const DirEntry&) { return true; });
    EXPECT_TRUE(s || s.error() == EUCLEAN) << s.to_string();
  }
  expect_repaired("damaged record");
}

TEST_F(CorruptFs, FirstRecordLengthZero) {
  {
    auto r = raw();
    auto recs = r->records(ino("d2"));
    ASSERT_FALSE(recs.empty());
    recs[0].h.rec_len = 0;
    r->put_record(recs[0]);
  }
  expect_repaired("damaged record");
}

TEST_F(CorruptFs, RecordLengthPastTheBlockEnd) {
  {
    auto r = raw();
    auto rec = r->record(ino("d1"), "c");
    rec.h.rec_len = uint16_t(r->bs - rec.off + 8);
    r->put_record(rec);
  }
  expect_repaired("damaged record");
}

TEST_F(CorruptFs, RecordLengthNotAMultipleOfEight) {
  {
    auto r = raw();
    auto rec = r->record(kRootIno, "n3");
    rec.h.rec_len += 3;
    r->put_record(rec);
  }
  expect_repaired("damaged record");
}

TEST_F(CorruptFs, NameLengthBeyondTheRecord) {
  {
    auto r = raw();
    auto rec = r->record(kRootIno, "n5");
    rec.h.name_len = 200;
    r->put_record(rec);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ(check_intact(**v, model_, {"n5"}), "");
  }
  expect_repaired("name");
}

TEST_F(CorruptFs, ReaddirOfANameRunningPastTheBlock) {
  {
    auto r = raw();
    auto recs = r->records(kRootIno);
    auto last = recs.back();  // the free record that runs to the block's end
    ASSERT_EQ(last.h.ino, 0u);
    ASSERT_EQ(last.off + last.h.rec_len, r->bs);
    last.h.rec_len -= 24;
    r->put_record(last);
    RawImage::Record tail;
    tail.lba = last.lba;
    tail.off = r->bs - 24;
    tail.h = fsfmt::DirRecordHeader{ino("b"), 24, 255, DT_REG, 0};
    r->put_record(tail);
  }
  auto v = mount();
  ASSERT_TRUE(v) << v.status().to_string();
  std::set<std::string> names;
  Status s = (*v)->readdir(kRootIno, 0, [&](const DirEntry& e) {
    names.insert(e.name);
    return true;
  });
  EXPECT_TRUE(s || s.error() == EUCLEAN) << s.to_string();
}

TEST_F(CorruptFs, NameRunningPastTheBlockIsRepaired) {
  {
    auto r = raw();
    auto recs = r->records(kRootIno);
    auto last = recs.back();
    ASSERT_EQ(last.h.ino, 0u);
    last.h.rec_len -= 24;
    r->put_record(last);
    RawImage::Record tail;
    tail.lba = last.lba;
    tail.off = r->bs - 24;
    tail.h = fsfmt::DirRecordHeader{ino("b"), 24, 255, DT_REG, 0};
    r->put_record(tail);
  }
  expect_repaired("name");
}

TEST_F(CorruptFs, EntryNamesAFreeInode) {
  {
    auto r = raw();
    r->add_record(kRootIno, 300, "ghost", DT_REG);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_FALSE((*v)->lookup(kRootIno, "ghost"));
  }
  expect_repaired("ghost");
  auto v = mount();
  ASSERT_TRUE(v);
  EXPECT_EQ((*v)->lookup(kRootIno, "ghost").status().error(), ENOENT);
}

TEST_F(CorruptFs, EntryNamesAnInodeBeyondTheTable) {
  {
    auto r = raw();
    r->add_record(ino("d1"), r->sb.inode_count + 3, "far", DT_REG);
    r->add_record(ino("d1"), ~0ull, "farther", DT_DIR);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_FALSE((*v)->lookup(ino("d1"), "far"));
    EXPECT_FALSE((*v)->lookup(ino("d1"), "farther"));
    (void)(*v)->readdir(ino("d1"), 0, [](const DirEntry&) { return true; });
  }
  expect_repaired("far");
}

TEST_F(CorruptFs, DuplicateNames) {
  {
    // "n1" and "n2" have names of one length: n2 becomes a second "n1".
    auto r = raw();
    auto rec = r->record(kRootIno, "n2");
    r->edit(rec.lba, [&](std::byte* p) { p[rec.off + 16 + 1] = std::byte{'1'}; });
  }
  expect_repaired("n1", {"n2"});
  // Both files are still there, one under a new name.
  auto v = mount();
  ASSERT_TRUE(v);
  std::set<uint64_t> inos;
  ASSERT_TRUE((*v)->readdir(kRootIno, 0, [&](const DirEntry& e) {
    inos.insert(e.ino);
    return true;
  }));
  EXPECT_EQ(inos.count(ino("n2")), 1u) << "n2's file lost its last name";
  auto n2 = read_all(**v, ino("n2"));
  ASSERT_TRUE(n2);
  EXPECT_EQ(*n2, model_["n2"].content);
}

TEST_F(CorruptFs, DotAndDotDotAreNotStored) {
  {
    // "." and ".." are the directory itself and its parent field (FORMAT.md 4.7): records by
    // those names are damage.
    auto r = raw();
    r->add_record(ino("d1"), ino("d1"), ".", DT_DIR);
    r->add_record(ino("d1"), kRootIno, "..", DT_DIR);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    auto up = (*v)->lookup(ino("d1"), "..");
    ASSERT_TRUE(up);
    EXPECT_EQ(up->ino, kRootIno);
  }
  expect_repaired("\".\"");
  auto v = mount();
  ASSERT_TRUE(v);
  int dots = 0;
  ASSERT_TRUE((*v)->readdir(ino("d1"), 0, [&](const DirEntry& e) {
    dots += e.name == "." || e.name == "..";
    return true;
  }));
  EXPECT_EQ(dots, 2);
}

TEST_F(CorruptFs, NameWithASlash) {
  {
    auto r = raw();
    auto rec = r->record(kRootIno, "n10");
    r->edit(rec.lba, [&](std::byte* p) { p[rec.off + 16 + 1] = std::byte{'/'}; });
  }
  expect_repaired("name", {"n10"});
}

TEST_F(CorruptFs, RecordTypeDisagreesWithTheInode) {
  {
    auto r = raw();
    auto rec = r->record(kRootIno, "b");
    rec.h.type = DT_DIR;
    r->put_record(rec);
  }
  expect_repaired("type");
  auto v = mount();
  ASSERT_TRUE(v);
  ASSERT_TRUE((*v)->readdir(kRootIno, 0, [&](const DirEntry& e) {
    if (e.name == "b") {
      EXPECT_EQ(e.type, DT_REG);
    }
    return true;
  }));
}

TEST_F(CorruptFs, DirectoryLinkedTwice) {
  {
    auto r = raw();
    r->add_record(ino("d2"), ino("d1"), "again", DT_DIR);
  }
  expect_repaired("more than one place");
  auto v = mount();
  ASSERT_TRUE(v);
  EXPECT_EQ((*v)->lookup(ino("d2"), "again").status().error(), ENOENT);
}

TEST_F(CorruptFs, DirectoryLinkedFromItsChildFirst) {
  {
    // A loop: d1 listed inside d1/sub. The real listing (in the root, where d1's parent field
    // points) must win, whatever order the walk meets them in.
    auto r = raw();
    r->add_record(ino("d1/sub"), ino("d1"), "loop", DT_DIR);
    r->add_record(ino("d1/sub"), kRootIno, "root", DT_DIR);
  }
  expect_repaired("more than one place");
}

TEST_F(CorruptFs, DirectoryBlockFullOfGarbage) {
  {
    auto r = raw();
    uint64_t lba = r->inode(ino("d2")).ptr[0];
    std::string junk = random_bytes("dir garbage", r->bs);
    Block b(r->bs);
    std::memcpy(b.data(), junk.data(), r->bs);
    r->write(lba, b);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    (void)(*v)->readdir(ino("d2"), 0, [](const DirEntry&) { return true; });
    (void)(*v)->lookup(ino("d2"), "f");
    EXPECT_EQ(check_intact(**v, model_, {"d2"}), "");
  }
  // d2/hard is a second name of "a", which keeps its first; f and g had only this one and go
  // to lost+found.
  std::string f = lost_name("d2/f"), g = lost_name("d2/g");
  expect_repaired("damaged record", {"d2"});
  moved("d2/f", "lost+found/" + f);
  moved("d2/g", "lost+found/" + g);
  model_.erase("d2/hard");
  expect_intact();
  auto entries = lost_found_entries();
  EXPECT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries.count(f) + entries.count(g), 2u);
}

// --- lost+found -------------------------------------------------------------------------------

class LostFound : public CorruptFs {};

TEST_F(LostFound, DirectoryWhoseEntryIsLostIsReconnectedWithItsSubtree) {
  lose_entry("d1");
  std::string name = lost_name("d1");
  expect_repaired("is in no directory", {"d1"});
  moved("d1", "lost+found/" + name);
  expect_intact();  // c (with its indirect block), sub/e, longlink and d1's xattr
  auto entries = lost_found_entries();
  EXPECT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries.count(name), 1u);
  auto v = mount();
  ASSERT_TRUE(v);
  auto lf = (*v)->lookup(kRootIno, "lost+found");
  ASSERT_TRUE(lf);
  EXPECT_EQ(lf->nlink, 3u) << "2 + the reconnected directory";
  auto dot_dot = (*v)->lookup(ino("lost+found/" + name), "..");
  ASSERT_TRUE(dot_dot) << dot_dot.status().to_string();
  EXPECT_EQ(dot_dot->ino, lf->ino) << "the reconnected directory's parent is lost+found";
}

TEST_F(LostFound, FileWhoseEntryIsLostIsReconnected) {
  lose_entry("b");
  std::string name = lost_name("b");
  expect_repaired("is in no directory", {"b"});
  moved("b", "lost+found/" + name);
  expect_intact();
  EXPECT_EQ(lost_found_entries().size(), 1u);
}

TEST_F(LostFound, DirectoriesLostOneInsideTheOtherAreEachReconnected) {
  lose_entry("d1/sub");
  lose_entry("d1");
  std::string d1 = lost_name("d1"), sub = lost_name("d1/sub");
  expect_repaired("is in no directory", {"d1"});
  moved("d1/sub", "lost+found/" + sub);
  moved("d1", "lost+found/" + d1);
  expect_intact();
  EXPECT_EQ(lost_found_entries().size(), 2u);
}

TEST_F(LostFound, AnExistingLostFoundIsUsedAndItsNamesKept) {
  std::string name = lost_name("b");
  {
    // A lost+found already holding a file named as the lost file will be.
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    auto lf = (*v)->mkdir(kRootIno, "lost+found", 0700, 0, 0);
    ASSERT_TRUE(lf) << lf.status().to_string();
    model_["lost+found"] = Expect{lf->ino, 'd', "", {}};
    auto f = (*v)->mknod(lf->ino, name, S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(f);
    std::string data = random_bytes("squatter", 1000);
    ASSERT_TRUE((*v)->write(f->ino, 0, data.data(), data.size()));
    model_["lost+found/" + name] = Expect{f->ino, 'f', data, {}};
    ASSERT_TRUE((*v)->sync_wait());
  }
  forget_journal();
  lose_entry("b");
  expect_repaired("is in no directory", {"b"});
  moved("b", "lost+found/" + name + "~1");
  expect_intact();
  EXPECT_EQ(lost_found_entries().size(), 2u);
}

class LostFound512 : public LostFound {
 protected:
  void SetUp() override {
    sector_size_ = 512;
    LostFound::SetUp();
  }
};

TEST_F(LostFound512, ManyLostFilesGrowLostFoundPastItsDirectBlocks) {
  // With 512-byte blocks a directory block holds about 20 "#<inode>" entries, so 300 lost files
  // need lost+found's single-indirect block.
  std::vector<std::string> names;
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    auto dir = (*v)->mkdir(kRootIno, "many", 0755, 0, 0);
    ASSERT_TRUE(dir);
    model_["many"] = Expect{dir->ino, 'd', "", {}};
    for (int i = 0; i < 300; ++i) {
      std::string path = "many/f" + std::to_string(i);
      auto f = (*v)->mknod(dir->ino, base(path), S_IFREG | 0644, 0, 0, 0);
      ASSERT_TRUE(f) << f.status().to_string();
      std::string data = random_bytes(path, 1 + i % 700);
      ASSERT_TRUE((*v)->write(f->ino, 0, data.data(), data.size()));
      model_[path] = Expect{f->ino, 'f', data, {}};
      names.push_back(path);
    }
    ASSERT_TRUE((*v)->sync_wait());
  }
  forget_journal();
  {
    // The directory's inode is garbage: fsck drops it, and every file it held is lost.
    auto r = raw();
    r->edit(r->inode_lba(ino("many")), [&](std::byte* p) {
      std::string junk = random_bytes("garbage", 256);
      std::memcpy(p + r->inode_off(ino("many")), junk.data(), 256);
    });
  }
  expect_repaired("is in no directory", {"many"});
  for (const std::string& path : names) moved(path, "lost+found/" + lost_name(path));
  model_.erase("many");
  expect_intact();
  EXPECT_EQ(lost_found_entries().size(), 300u);
  auto r = raw();
  ASSERT_TRUE(r);
  fsfmt::Inode lf = r->inode(r->record(kRootIno, "lost+found").h.ino);
  EXPECT_NE(lf.ptr[fsfmt::kDirect], 0u) << "lost+found did not need its single-indirect block";
  EXPECT_GT(lf.size, uint64_t(fsfmt::kDirect) * r->bs);
}

// --- extended attribute blocks ----------------------------------------------------------------

TEST_F(CorruptFs, XattrBlockBadMagic) {
  {
    auto r = raw();
    uint64_t lba = r->inode(ino("d2/f")).xattr_block;
    ASSERT_NE(lba, 0u);
    r->edit(lba, [](std::byte* p) { p[0] ^= std::byte{1}; });
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->getxattr(ino("d2/f"), "user.color", nullptr, 0).status().error(), EUCLEAN);
  }
  model_["d2/f"].xattrs.clear();
  expect_repaired("xattr block");
}

TEST_F(CorruptFs, XattrBlockBadChecksum) {
  {
    auto r = raw();
    uint64_t lba = r->inode(ino("d1")).xattr_block;
    ASSERT_NE(lba, 0u);
    r->edit(lba, [](std::byte* p) { p[60] ^= std::byte{0x40}; });
  }
  model_["d1"].xattrs.clear();
  expect_repaired("xattr block");
}

TEST_F(CorruptFs, XattrEntryOverrunsTheBlock) {
  {
    auto r = raw();
    uint64_t owner = ino("a");
    uint64_t lba = r->inode(owner).xattr_block;
    r->edit(lba, [&](std::byte* p) {
      fsfmt::XattrEntry e;
      std::memcpy(&e, p + sizeof(fsfmt::XattrHeader), sizeof e);
      e.value_len = 0xFFFFFF00u;
      std::memcpy(p + sizeof(fsfmt::XattrHeader), &e, sizeof e);
      fsfmt::XattrHeader h;
      std::memcpy(&h, p, sizeof h);
      h.checksum = xattr_sum(p, r->bs, owner);
      std::memcpy(p, &h, sizeof h);
    });
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    std::string buf(1024, '\0');
    EXPECT_FALSE((*v)->getxattr(ino("a"), "trusted.k", buf.data(), buf.size()));
    EXPECT_FALSE((*v)->listxattr(ino("a"), buf.data(), buf.size()));
  }
  model_["a"].xattrs.clear();
  model_["d2/hard"].xattrs.clear();
  expect_repaired("xattr block");
}

TEST_F(CorruptFs, XattrCountBeyondTheEntries) {
  {
    auto r = raw();
    uint64_t owner = ino("d2/f");
    uint64_t lba = r->inode(owner).xattr_block;
    r->edit(lba, [&](std::byte* p) {
      fsfmt::XattrHeader h;
      std::memcpy(&h, p, sizeof h);
      h.count = 0xFFFFFFFFu;
      h.checksum = 0;
      std::memcpy(p, &h, sizeof h);
      h.checksum = xattr_sum(p, r->bs, owner);
      std::memcpy(p, &h, sizeof h);
    });
  }
  model_["d2/f"].xattrs.clear();
  expect_repaired("xattr block");
}

// Attributes larger than a block: a chain of xattr blocks (format.h).
class CorruptXattrChain : public CorruptFs {
 protected:
  void SetUp() override {
    CorruptFs::SetUp();
    {
      auto v = mount();
      ASSERT_TRUE(v) << v.status().to_string();
      std::string value = random_bytes("chain", 10000);
      ASSERT_TRUE((*v)->setxattr(ino("b"), "user.long", value.data(), value.size(), 0));
      model_["b"].xattrs["user.long"] = value;
      ASSERT_TRUE((*v)->sync_wait());
    }
    forget_journal();
    auto r = raw();
    ASSERT_TRUE(r);
    for (uint64_t lba = r->inode(ino("b")).xattr_block; lba != 0;) {
      chain_.push_back(lba);
      fsfmt::XattrHeader h;
      std::memcpy(&h, r->read(lba).data(), sizeof h);
      lba = h.next;
    }
    ASSERT_EQ(chain_.size(), 3u) << "10000 bytes take three 4 KiB blocks";
  }
  // Rewrites a header field of chain block `i`, with a checksum that matches.
  void edit_header(std::size_t i, const std::function<void(fsfmt::XattrHeader&)>& f) {
    auto r = raw();
    r->edit(chain_.at(i), [&](std::byte* p) {
      fsfmt::XattrHeader h;
      std::memcpy(&h, p, sizeof h);
      f(h);
      std::memcpy(p, &h, sizeof h);
      h.checksum = xattr_sum(p, r->bs, ino("b"));
      std::memcpy(p, &h, sizeof h);
    });
  }
  void expect_dropped() {
    {
      auto v = mount();
      ASSERT_TRUE(v) << v.status().to_string();
      EXPECT_EQ((*v)->getxattr(ino("b"), "user.long", nullptr, 0).status().error(), EUCLEAN);
      EXPECT_EQ(check_intact(**v, model_, {"b"}), "");
    }
    model_["b"].xattrs.clear();
    expect_repaired("xattr block");
  }
  std::vector<uint64_t> chain_;
};

TEST_F(CorruptXattrChain, SoundChainIsClean) {
  FsckReport r = run_fsck(false);
  EXPECT_EQ(r.exit_code(), 0) << joined(r.problems);
  expect_intact();
}

TEST_F(CorruptXattrChain, DamageInALaterBlock) {
  {
    auto r = raw();
    r->edit(chain_[2], [](std::byte* p) { p[100] ^= std::byte{0x08}; });
  }
  expect_dropped();
}

TEST_F(CorruptXattrChain, ChainThatLoops) {
  edit_header(2, [&](fsfmt::XattrHeader& h) {
    h.next = chain_[0];
    h.used = 4096 - 40;  // a full block, as a block with a successor must be
  });
  expect_dropped();
}

TEST_F(CorruptXattrChain, ChainIntoAFilesData) {
  uint64_t data = raw()->inode(ino("a")).ptr[0];
  edit_header(1, [&](fsfmt::XattrHeader& h) { h.next = data; });
  expect_dropped();
}

TEST_F(CorruptXattrChain, LaterBlockClaimsEntries) {
  edit_header(1, [](fsfmt::XattrHeader& h) { h.count = 1; });
  expect_dropped();
}

TEST_F(CorruptXattrChain, ChainIntoTheInodeTable) {
  uint64_t table = raw()->sb.inode_table_start;
  edit_header(0, [&](fsfmt::XattrHeader& h) { h.next = table; });
  expect_dropped();
}

TEST_F(CorruptFs, XattrBlockPointerIntoTheInodeTable) {
  {
    auto r = raw();
    fsfmt::Inode f = r->inode(ino("d2/f"));
    f.xattr_block = r->inode_lba(ino("a"));
    r->put_inode(ino("d2/f"), f);
  }
  {
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    EXPECT_EQ((*v)->setxattr(ino("d2/f"), "user.x", "y", 1, 0).error(), EUCLEAN);
    EXPECT_EQ(check_intact(**v, model_, {"d2/f"}), "");
  }
  model_["d2/f"].xattrs.clear();
  expect_repaired("xattr block");
}

// --- orphan chain -----------------------------------------------------------------------------

// Files unlinked while held, left on the orphan chain by an unmount that never forgot them.
class CorruptOrphans : public CorruptFs {
 protected:
  void SetUp() override {
    CorruptFs::SetUp();
    auto v = mount();
    ASSERT_TRUE(v) << v.status().to_string();
    for (const char* name : {"o1", "o2", "o3"}) {
      auto f = (*v)->mknod(kRootIno, name, S_IFREG | 0644, 0, 0, 0);
      ASSERT_TRUE(f);
      std::string data = random_bytes(name, 5000);
      ASSERT_TRUE((*v)->write(f->ino, 0, data.data(), data.size()));
      (*v)->hold(f->ino, 1);
      ASSERT_TRUE((*v)->unlink(kRootIno, name));
      orphans_.push_back(f->ino);
    }
    ASSERT_TRUE((*v)->sync_wait());
    v->reset();
    forget_journal();
    auto r = raw();
    ASSERT_EQ(r->sb.orphan_head, orphans_.back());  // o3 -> o2 -> o1
  }
  std::vector<uint64_t> orphans_;
};

TEST_F(CorruptOrphans, ChainIsFreedAtMount) {
  FsckReport r = run_fsck(false);
  EXPECT_EQ(r.exit_code(), 0) << joined(r.problems);
  expect_intact();
  EXPECT_EQ(raw()->sb.orphan_head, 0u);
}

TEST_F(CorruptOrphans, ChainWithACycle) {
  {
    auto r = raw();
    fsfmt::Inode o1 = r->inode(orphans_[0]);
    o1.next_orphan = orphans_[2];  // o3 -> o2 -> o1 -> o3
    r->put_inode(orphans_[0], o1);
  }
  expect_repaired("orphan");
}

TEST_F(CorruptOrphans, ChainThroughAFreeInode) {
  {
    auto r = raw();
    fsfmt::Inode o2 = r->inode(orphans_[1]);
    o2.next_orphan = 777;  // free
    r->put_inode(orphans_[1], o2);
  }
  expect_repaired("orphan");
}

TEST_F(CorruptOrphans, MountWithAChainLoopSaysOrphan) {
  {
    auto r = raw();
    fsfmt::Inode o1 = r->inode(orphans_[0]);
    o1.next_orphan = orphans_[2];
    r->put_inode(orphans_[0], o1);
  }
  auto v = mount();
  if (!v) {
    EXPECT_EQ(v.status().error(), EUCLEAN) << v.status().to_string();
    EXPECT_THAT(v.status().message(), HasSubstr("orphan"));
  }
}

TEST_F(CorruptOrphans, MountWithAChainThroughAFreeInodeSaysOrphan) {
  {
    auto r = raw();
    fsfmt::Inode o2 = r->inode(orphans_[1]);
    o2.next_orphan = 777;
    r->put_inode(orphans_[1], o2);
  }
  auto v = mount();
  if (!v) {
    EXPECT_EQ(v.status().error(), EUCLEAN) << v.status().to_string();
    EXPECT_THAT(v.status().message(), HasSubstr("orphan"));
  }
}

TEST_F(CorruptOrphans, NamedFileOnTheChainIsCutToItsSize) {
  {
    // A file on the chain that a directory names is one a truncate was cutting down: the mount
    // finishes the cut, to its size, and keeps it.
    auto r = raw();
    fsfmt::Inode o1 = r->inode(orphans_[0]);
    o1.next_orphan = ino("b");  // o3 -> o2 -> o1 -> b
    r->put_inode(orphans_[0], o1);
  }
  FsckReport report = run_fsck(false);
  EXPECT_EQ(report.exit_code(), 0) << joined(report.problems);
  expect_intact();
}

TEST_F(CorruptOrphans, UnnamedFileOnTheChainWithALinkCount) {
  {
    // Nothing names o2, but its link count says the mount should keep it: it would leak.
    auto r = raw();
    fsfmt::Inode o2 = r->inode(orphans_[1]);
    o2.nlink = 1;
    r->put_inode(orphans_[1], o2);
  }
  expect_repaired("orphan");
}

// --- kill log left over from earlier transactions ---------------------------------------------

// A volume whose first transaction left kill-log checkpoints (each call checkpoints the blocks it
// changed; few enough that they fit in one half), then a second transaction, and a clean
// unmount: transaction 1's records stay in the log behind the next header of their half.
void make_volume_with_checkpoints(const std::string& path, int files) {
  MkfsOptions o;
  o.size = kImageSize;
  o.force_persistent = true;
  ASSERT_TRUE(Volume::mkfs(path, o));
  MountOptions m;
  m.force_persistent = true;
  m.commit_interval_ms = 600000;  // nothing commits on its own
  auto v = Volume::mount(path, m);
  ASSERT_TRUE(v) << v.status().to_string();
  for (int i = 0; i < files; ++i) {
    auto f = (*v)->mknod(kRootIno, "early" + std::to_string(i), S_IFREG | 0644, 0, 0, 0);
    ASSERT_TRUE(f);
  }
  ASSERT_TRUE((*v)->sync_wait());
  ASSERT_TRUE((*v)->mknod(kRootIno, "late", S_IFREG | 0644, 0, 0, 0));
}

std::set<std::string> names_in_root(const std::string& path) {
  MountOptions m;
  m.force_persistent = true;
  auto v = Volume::mount(path, m);
  EXPECT_TRUE(v) << v.status().to_string();
  std::set<std::string> names;
  if (!v) return names;
  EXPECT_TRUE((*v)->readdir(kRootIno, 0, [&](const DirEntry& e) {
    names.insert(e.name);
    return true;
  }));
  return names;
}

TEST(StaleCheckpoints, RepairThatEmptiesTheJournalLeavesNoneBehind) {
  // fsck -y empties the journal after a repair, and transaction numbers start again from 1:
  // checkpoints the first session left for its transaction 1 must not pass for the next one's.
  TempPath path("stale-after-repair.img");
  make_volume_with_checkpoints(path, 10);
  {
    auto r = RawImage::open(path);
    ASSERT_TRUE(r);
    r->set_bit(r->sb.block_bitmap_start, r->n - 3, true);  // a leak, for fsck to repair
  }
  FsckOptions repair;
  repair.repair = true;
  auto fixed = fsck(path, repair);
  ASSERT_TRUE(fixed);
  ASSERT_EQ(fixed->exit_code(), 1) << joined(fixed->problems);
  EXPECT_EQ(names_in_root(path).count("late"), 1u);  // starts transaction 1's kill-log half
  EXPECT_EQ(names_in_root(path).count("late"), 1u) << "an old checkpoint was replayed";
  auto again = fsck(path, FsckOptions{});
  ASSERT_TRUE(again);
  EXPECT_EQ(again->exit_code(), 0) << joined(again->problems);
}

TEST(StaleCheckpoints, ReformattedImageNeverReplaysTheOldVolumes) {
  TempPath path("stale-after-mkfs.img");
  make_volume_with_checkpoints(path, 10);
  MkfsOptions o;
  o.size = kImageSize;
  o.force_persistent = true;
  ASSERT_TRUE(Volume::mkfs(path, o));
  EXPECT_EQ(names_in_root(path), (std::set<std::string>{".", ".."}));
  EXPECT_EQ(names_in_root(path), (std::set<std::string>{".", ".."}))
      << "the old volume's checkpoints were replayed into the new one";
}

// --- random damage ----------------------------------------------------------------------------

// Random byte flips in the metadata blocks of a populated image. Each iteration runs in a child
// process, so that a crash or sanitizer report fails that iteration (with its seed) rather than
// the whole run, and a hang is cut off.
class RandomFlips : public CorruptFs {
 protected:
  struct Dep {
    uint64_t lba;
    uint32_t lo, hi;  // bytes of that block
  };
  enum class Kind { super, journal, bitmap, itable, dir, pointer, xattr, symlink };
  struct Target {
    uint64_t lba;
    Kind kind;
    uint32_t lo, hi;  // the bytes worth flipping
  };

  void SetUp() override {
    CorruptFs::SetUp();
    if (HasFatalFailure()) return;
    {
      // A small last transaction in the journal, so that replay is part of every iteration.
      auto v = mount();
      ASSERT_TRUE(v) << v.status().to_string();
      SetAttr touch;
      touch.mtime = timespec{12345, 0};
      ASSERT_TRUE((*v)->setattr(ino("n11"), touch));
      ASSERT_TRUE((*v)->sync_wait());
    }
    auto r = raw();
    const uint32_t bs = r->bs;
    fsfmt::Superblock sb = r->sb;
    targets_.push_back({0, Kind::super, 0, 512});
    auto d = r->journal_descriptor();
    uint64_t desc_blocks = (40 + d.count * 8 + bs - 1) / bs;
    targets_.push_back(
        {sb.journal_start, Kind::journal, 0, uint32_t(std::min<uint64_t>(bs, 40 + d.count * 8))});
    for (uint64_t i = 0; i < desc_blocks + d.count && i < 4; ++i) {
      if (i >= desc_blocks) targets_.push_back({sb.journal_start + i, Kind::journal, 0, bs});
    }
    targets_.push_back(
        {sb.block_bitmap_start, Kind::bitmap, 0, uint32_t(std::min<uint64_t>(bs, (r->n + 7) / 8))});
    targets_.push_back({sb.inode_bitmap_start, Kind::bitmap, 0, 64});
    // Every path's dependencies: the inode slots and directory blocks on its way from the root,
    // and its own pointer, symlink and xattr blocks.
    std::map<uint64_t, std::vector<Dep>> own;  // ino -> its own blocks and slot
    std::map<uint64_t, uint64_t> slot_used;    // itable block -> highest used slot end
    auto inode_deps = [&](uint64_t ino) {
      if (own.count(ino) != 0) return;
      fsfmt::Inode in = r->inode(ino);
      auto& deps = own[ino];
      uint32_t off = r->inode_off(ino);
      deps.push_back({r->inode_lba(ino), off, off + 256});
      slot_used[r->inode_lba(ino)] = std::max<uint64_t>(slot_used[r->inode_lba(ino)], off + 256);
      if (in.xattr_block != 0) {
        deps.push_back({in.xattr_block, 0, bs});
        targets_.push_back({in.xattr_block, Kind::xattr, 0, 128});
      }
      if (S_ISLNK(in.mode) && in.size > fsfmt::kInlineSymlink) {
        deps.push_back({in.ptr[0], 0, bs});
        targets_.push_back({in.ptr[0], Kind::symlink, 0, uint32_t(in.size + 8)});
      }
      if (in.ptr[fsfmt::kDirect] != 0) {
        deps.push_back({in.ptr[fsfmt::kDirect], 0, bs});
        targets_.push_back({in.ptr[fsfmt::kDirect], Kind::pointer, 0, 128});
      }
      if (S_ISDIR(in.mode)) {
        for (uint64_t b = 0; b < in.size / bs; ++b) {
          targets_.push_back({in.ptr[b], Kind::dir, 0, bs});
        }
      }
    };
    inode_deps(kRootIno);
    for (const auto& [path, want] : model_) {
      std::vector<Dep> deps = own[kRootIno];
      uint64_t cur = kRootIno;
      for (std::size_t at = 0; at < path.size();) {
        std::size_t slash = path.find('/', at);
        if (slash == std::string::npos) slash = path.size();
        auto rec = r->record(cur, path.substr(at, slash - at));
        deps.push_back({rec.lba, 0, bs});
        cur = rec.h.ino;
        inode_deps(cur);
        deps.insert(deps.end(), own[cur].begin(), own[cur].end());
        at = slash + 1;
      }
      deps_[path] = deps;
    }
    for (const auto& [lba, end] : slot_used) {
      targets_.push_back({lba, Kind::itable, 0, uint32_t(end)});
    }
    for (Target& t : targets_) t.hi = std::min(t.hi, bs);
    bs_ = bs;
    raw_sb_ = sb;
    r.reset();
    // The image every iteration starts from.
    ASSERT_TRUE(copy_file(path_, pristine_));
  }

  static bool copy_file(const std::string& from, const std::string& to) {
    int in = ::open(from.c_str(), O_RDONLY);
    int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    bool ok = in >= 0 && out >= 0;
    std::vector<char> buf(1 << 20);
    for (ssize_t n; ok && (n = ::read(in, buf.data(), buf.size())) > 0;) {
      ok = ::write(out, buf.data(), std::size_t(n)) == n;
    }
    if (in >= 0) ::close(in);
    if (out >= 0) ::close(out);
    return ok;
  }

  // Damages the image as `seed` says; returns the paths the damage touched.
  std::set<std::string> damage(uint64_t seed, std::string* what) {
    std::mt19937_64 rng(seed);
    auto r = raw();
    std::set<std::pair<uint64_t, uint32_t>> flipped;
    bool rechecksum = rng() % 2 == 0;  // so that damage gets past the checksums too
    int blocks = 1 + int(rng() % 3);
    for (int k = 0; k < blocks; ++k) {
      const Target& t = targets_[rng() % targets_.size()];
      Block b = r->read(t.lba);
      int bytes = 1 + int(rng() % 8);
      for (int i = 0; i < bytes; ++i) {
        uint32_t off = t.lo + uint32_t(rng() % (t.hi - t.lo));
        b[off] ^= std::byte(1 + rng() % 255);
        flipped.insert({t.lba, off});
        *what += " " + std::to_string(t.lba) + "+" + std::to_string(off);
      }
      if (rechecksum) rechecksum_block(t, b);
      r->write(t.lba, b);
    }
    *what += rechecksum ? " (checksums recomputed)" : "";
    std::set<std::string> touched;
    for (const auto& [path, deps] : deps_) {
      for (const Dep& d : deps) {
        auto it = flipped.lower_bound({d.lba, d.lo});
        if (it != flipped.end() && it->first == d.lba && it->second < d.hi) touched.insert(path);
      }
    }
    return touched;
  }

  void rechecksum_block(const Target& t, Block& b) {
    if (t.kind == Kind::super) {
      fsfmt::Superblock sb;
      std::memcpy(&sb, b.data(), sizeof sb);
      sb.checksum = super_sum(sb);
      std::memcpy(b.data(), &sb, sizeof sb);
    } else if (t.kind == Kind::itable) {
      fsfmt::Superblock sb = raw_sb_;
      for (uint32_t off = 0; off < bs_; off += 256) {
        fsfmt::Inode in;
        std::memcpy(&in, b.data() + off, sizeof in);
        if (in.mode == 0) continue;
        uint64_t ino = (t.lba - sb.inode_table_start) * (bs_ / 256) + off / 256;
        in.checksum = inode_sum(in, ino);
        std::memcpy(b.data() + off, &in, sizeof in);
      }
    } else if (t.kind == Kind::xattr) {
      fsfmt::XattrHeader h;
      std::memcpy(&h, b.data(), sizeof h);
      h.checksum = xattr_sum(b.data(), bs_, h.ino);
      std::memcpy(b.data(), &h, sizeof h);
    }
  }

  // One iteration in a child process: empty if it went as it must, else what went wrong.
  // `mount_first`: mount the damaged image and use it before fsck sees it.
  std::string iteration(uint64_t seed, bool mount_first) {
    if (!copy_file(pristine_, path_)) return "cannot copy the image";
    std::string what;
    std::set<std::string> touched = damage(seed, &what);
    std::string fail;
    auto failed = [&](const std::string& why) { return why + "; damage:" + what; };
    if (mount_first) {
      auto v = mount();
      if (!v) {
        int e = v.status().error();
        if ((e != EUCLEAN && e != EINVAL && e != EIO) || v.status().message().empty()) {
          return failed("mount failed without a clear error: " + v.status().to_string());
        }
      } else {
        // Look at everything, then change a little: none of it may crash.
        (void)check_intact(**v, model_, {});
        (void)check_usable(**v);
        for (const char* name : {"a", "d1", "d2", "link"}) (void)(*v)->unlink(kRootIno, name);
        (void)(*v)->rmdir(ino("d1"), "sub");
        (void)(*v)->rename(ino("d2"), "f", kRootIno, "moved", 0);
        (void)(*v)->setxattr(ino("b"), "user.new", "v", 1, 0);
        (void)(*v)->sync_wait();
      }
      touched = {""};  // what the mount changed is not fsck's to bring back
    } else {
      FsckOptions check;
      auto found = fsck(path_, check);
      if (!found) return failed("fsck -n: " + found.status().to_string());
      if (found->exit_code() != 0 && found->exit_code() != 4) {
        return failed("fsck -n exit " + std::to_string(found->exit_code()));
      }
    }
    FsckOptions repair;
    repair.repair = true;
    auto fixed = fsck(path_, repair);
    if (!fixed) return failed("fsck -y: " + fixed.status().to_string());
    if (fixed->exit_code() > 1) {
      return failed("fsck -y left: " + joined(fixed->remaining));
    }
    auto again = fsck(path_, FsckOptions{});
    if (!again) return failed("second fsck -n: " + again.status().to_string());
    if (again->exit_code() != 0) {
      return failed("second fsck -n found: " + joined(again->problems) +
                    "\nafter repairing: " + joined(fixed->repairs));
    }
    auto v = mount();
    if (!v) return failed("mount after repair: " + v.status().to_string());
    if (touched.count("") == 0) {
      std::string lost = check_intact(**v, model_, touched);
      if (!lost.empty()) {
        return failed("repair lost untouched files:\n" + lost +
                      "repairs: " + joined(fixed->repairs));
      }
    }
    std::string unusable = check_usable(**v);
    if (!unusable.empty()) return failed("repaired volume: " + unusable);
    v->reset();
    auto last = fsck(path_, FsckOptions{});
    if (!last || last->exit_code() != 0) {
      return failed("fsck -n after using the repaired volume: " +
                    (last ? joined(last->problems) : last.status().to_string()));
    }
    return "";
  }

  // Runs iterations [first, first + count) each in a child, at most `seconds` each.
  std::vector<std::string> run(uint64_t first, uint64_t count, bool mount_first, int seconds) {
    std::vector<std::string> failures;
    for (uint64_t seed = first; seed < first + count; ++seed) {
      int fds[2];
      if (::pipe(fds) != 0) return {"pipe failed"};
      pid_t pid = ::fork();
      if (pid == 0) {
        ::close(fds[0]);
        std::string result = iteration(seed, mount_first);
        if (::write(fds[1], result.data(), result.size()) < 0) _exit(3);
        _exit(result.empty() ? 0 : 1);
      }
      ::close(fds[1]);
      std::string out;
      bool hung = false;
      for (;;) {
        pollfd p{fds[0], POLLIN, 0};
        int ready = ::poll(&p, 1, seconds * 1000);
        if (ready == 0) {
          hung = true;
          ::kill(pid, SIGKILL);
          break;
        }
        char buf[4096];
        ssize_t n = ::read(fds[0], buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, std::size_t(n));
      }
      ::close(fds[0]);
      int status = 0;
      ::waitpid(pid, &status, 0);
      std::string where = "seed " + std::to_string(seed) + ": ";
      if (hung) {
        failures.push_back(where + "no answer in " + std::to_string(seconds) + " s (hang)");
      } else if (WIFSIGNALED(status)) {
        failures.push_back(where + "killed by signal " + std::to_string(WTERMSIG(status)));
      } else if (WEXITSTATUS(status) != 0) {
        failures.push_back(where + (out.empty() ? "exit " + std::to_string(WEXITSTATUS(status)) +
                                                      " (a sanitizer report?)"
                                                : out));
      }
    }
    return failures;
  }

  // VPMFS_CORRUPT_SEED runs one seed of each test: the one a failure names.
  static uint64_t first_seed(uint64_t otherwise) {
    const char* env = std::getenv("VPMFS_CORRUPT_SEED");
    return env != nullptr ? std::strtoull(env, nullptr, 10) : otherwise;
  }
  static uint64_t iterations() {
    if (std::getenv("VPMFS_CORRUPT_SEED") != nullptr) return 1;
    const char* env = std::getenv("VPMFS_CORRUPT_ITERATIONS");
    return env != nullptr ? std::strtoull(env, nullptr, 10) : 300;
  }

  TempPath pristine_{"corrupt-pristine.img"};
  std::vector<Target> targets_;
  std::map<std::string, std::vector<Dep>> deps_;
  fsfmt::Superblock raw_sb_{};
  uint32_t bs_ = 0;
};

TEST_F(RandomFlips, FsckFindsAndRepairsWithoutLosingUntouchedFiles) {
  auto failures = run(first_seed(1), iterations(), /*mount_first=*/false, 60);
  EXPECT_TRUE(failures.empty()) << failures.size() << " failing seeds:\n" << joined(failures);
}

TEST_F(RandomFlips, MountFailsClearlyOrWorksAndFsckRepairsAfterwards) {
  auto failures = run(first_seed(100001), iterations(), /*mount_first=*/true, 60);
  EXPECT_TRUE(failures.empty()) << failures.size() << " failing seeds:\n" << joined(failures);
}

// 512-byte sectors: two inodes per block, a superblock filling its block, four-level maps soon.
class RandomFlips512 : public RandomFlips {
 protected:
  void SetUp() override {
    sector_size_ = 512;
    RandomFlips::SetUp();
  }
};

TEST_F(RandomFlips512, FsckFindsAndRepairsWithoutLosingUntouchedFiles) {
  auto failures = run(first_seed(200001), std::max<uint64_t>(1, iterations() / 2),
                      /*mount_first=*/false, 60);
  EXPECT_TRUE(failures.empty()) << failures.size() << " failing seeds:\n" << joined(failures);
}

}  // namespace
}  // namespace vpmfs
