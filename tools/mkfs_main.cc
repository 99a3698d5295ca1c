// mkfs.vpmfs [--size SIZE] [--sector-size 512|4096] [--lanes N] [--label L] [--uuid U] [-f]
//            IMAGE
// Creates (sparse) or formats an image file or device-dax node: image header, intent log, BTT
// and an empty filesystem (docs/FORMAT.md). Refuses to overwrite what looks like a filesystem
// or other data without -f, and says what it found.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <array>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "vpmfs/fs.h"

namespace {

// "4G", "512M", "1T", "65536", "2GiB": binary multiples.
std::optional<uint64_t> parse_size(const std::string& text) {
  std::size_t pos = 0;
  unsigned long long n = 0;
  try {
    n = std::stoull(text, &pos, 10);
  } catch (...) {
    return std::nullopt;
  }
  std::string unit = text.substr(pos);
  if (unit.ends_with("iB")) unit.resize(unit.size() - 2);
  if (unit.ends_with("B") && unit.size() > 1) unit.pop_back();
  static const std::string kUnits = "KMGTP";
  int shift = 0;
  if (unit.size() == 1) {
    std::size_t i = kUnits.find(char(std::toupper(unsigned(unit[0]))));
    if (i == std::string::npos) return std::nullopt;
    shift = 10 * int(i + 1);
  } else if (!unit.empty()) {
    return std::nullopt;
  }
  if (shift > 0 && n > (UINT64_MAX >> shift)) return std::nullopt;
  return uint64_t(n) << shift;
}

std::optional<std::array<uint8_t, 16>> parse_uuid(const std::string& text) {
  std::array<uint8_t, 16> out{};
  std::string hex;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '-' && (i == 8 || i == 13 || i == 18 || i == 23)) continue;
    if (!std::isxdigit(unsigned(c))) return std::nullopt;
    hex += c;
  }
  if (hex.size() != 32 || text.size() != 36) return std::nullopt;
  for (int i = 0; i < 16; ++i) out[i] = uint8_t(std::stoul(hex.substr(i * 2, 2), nullptr, 16));
  return out;
}

std::string human(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

// What the start of an existing image holds, if it is anything worth keeping.
std::optional<std::string> find_signature(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::vector<unsigned char> b(68 * 1024, 0);
  ssize_t got = ::pread(fd, b.data(), b.size(), 0);
  ::close(fd);
  if (got <= 0) return std::nullopt;
  auto at = [&](std::size_t off, const char* magic, std::size_t len) {
    return off + len <= std::size_t(got) && std::memcmp(b.data() + off, magic, len) == 0;
  };
  if (at(0, "VPMFSIMG", 8)) return "a vpmfs image";
  if (at(0, "BTT_ARENA_INFO", 14) || at(4096, "BTT_ARENA_INFO", 14)) return "a BTT namespace";
  if (at(1080, "\x53\xef", 2)) return "an ext2/ext3/ext4 filesystem";
  if (at(0, "XFSB", 4)) return "an XFS filesystem";
  if (at(65600, "_BHRfS_M", 8)) return "a btrfs filesystem";
  if (at(4086, "SWAPSPACE2", 10) || at(4086, "SWAP-SPACE", 10)) return "swap space";
  if (at(0, "LUKS\xba\xbe", 6)) return "a LUKS volume";
  if (at(0, "hsqs", 4)) return "a squashfs filesystem";
  if (at(512, "EFI PART", 8)) return "a GPT partition table";
  if (at(82, "FAT32   ", 8) || at(54, "FAT16   ", 8) || at(54, "FAT12   ", 8)) {
    return "a FAT filesystem";
  }
  if (at(510, "\x55\xaa", 2)) return "a DOS partition table or boot sector";
  std::size_t scan = std::min<std::size_t>(std::size_t(got), 64 * 1024);
  for (std::size_t i = 0; i < scan; ++i) {
    if (b[i] != 0) return "data (non-zero bytes in its first 64 KiB)";
  }
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Make a vpmfs image: image header, BTT and an empty filesystem", "mkfs.vpmfs"};
  std::string image, size_text, uuid_text;
  vpmfs::MkfsOptions o;
  bool force = false, quiet = false;
  app.add_option("IMAGE", image, "image file (created sparse) or device-dax node")->required();
  app.add_option("-s,--size", size_text,
                 "image size, e.g. 4G (K, M, G, T: binary multiples); creates or resizes the file");
  app.add_option("-b,--sector-size", o.sector_size, "BTT sector and filesystem block size")
      ->check(CLI::IsMember({512, 4096}));
  app.add_option("--lanes", o.lanes,
                 "BTT lanes (free blocks per arena, nfree; default: one per 512 KiB of image, "
                 "256 to 4096)")
      ->check(CLI::Range(1, 65536));
  app.add_option("-L,--label", o.label, "volume label (up to 63 bytes)");
  app.add_option("-U,--uuid", uuid_text, "volume uuid (default: random)");
  app.add_option("-i,--inode-ratio", o.inode_ratio, "bytes per inode")
      ->check(CLI::Range(1024, 1 << 26));
  app.add_flag("-f,--force", force, "overwrite an existing filesystem or data");
  app.add_flag("--force-persistent", o.force_persistent,
               "treat the image as persistent memory even without MAP_SYNC (testing)");
  app.add_flag("-q,--quiet", quiet, "print nothing but errors");
  app.set_version_flag("--version", "mkfs.vpmfs " VPMFS_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;
  }
  auto fail = [](const std::string& msg) {
    std::fprintf(stderr, "mkfs.vpmfs: %s\n", msg.c_str());
    return 1;
  };

  if (!size_text.empty()) {
    auto size = parse_size(size_text);
    if (!size || *size == 0) {
      return fail("--size " + size_text + ": expected a size such as 64M, 4G or 1T");
    }
    o.size = *size;
  }
  if (!uuid_text.empty()) {
    o.uuid = parse_uuid(uuid_text);
    if (!o.uuid) return fail("--uuid " + uuid_text + ": expected 8-4-4-4-12 hex digits");
  }
  struct stat st {};
  bool exists = ::stat(image.c_str(), &st) == 0;
  if (!exists && o.size == 0) {
    return fail(image + " does not exist; give --size to create it");
  }
  if (exists && !S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode)) {
    return fail(image + " is neither a regular file nor a device-dax node");
  }
  if (exists && S_ISCHR(st.st_mode) && o.size != 0) {
    return fail("--size does not apply to a device-dax node; it is as large as it is");
  }
  if (exists && !force) {
    if (auto found = find_signature(image)) {
      return fail(image + " contains " + *found + "; use -f to overwrite it");
    }
  }

  bool tty = ::isatty(2) != 0 && !quiet;
  uint64_t size_hint = o.size != 0 ? o.size : uint64_t(st.st_size);
  if (tty && size_hint >= (1ull << 30)) {
    o.progress = [](const std::string& stage, uint64_t done, uint64_t total) {
      if (total == 0) return;
      std::fprintf(stderr, "\rmkfs.vpmfs: writing %s: %3" PRIu64 "%%", stage.c_str(),
                   done * 100 / total);
      if (done == total) std::fputc('\n', stderr);
    };
  }
  if (vpmfs::Status s = vpmfs::Volume::mkfs(image, o); !s) {
    if (o.progress) std::fputc('\n', stderr);
    return fail(image + ": " + s.message());
  }

  if (!quiet) {
    vpmfs::MountOptions mo;
    mo.read_only = true;
    mo.force_persistent = o.force_persistent;
    auto v = vpmfs::Volume::mount(image, mo);
    if (!v) return fail(image + ": made, but it does not mount: " + v.status().message());
    struct statvfs sv = (*v)->statfs();
    std::printf("%s: vpmfs, %s, %u-byte blocks, %" PRIu64 " blocks (%" PRIu64 " free), %" PRIu64
                " inodes%s%s\n",
                image.c_str(), human((*v)->region().size()).c_str(), (*v)->block_size(),
                uint64_t(sv.f_blocks), uint64_t(sv.f_bfree), uint64_t(sv.f_files),
                o.label.empty() ? "" : ", label ", o.label.c_str());
    std::printf("persistence when mounted with sync_dax=auto: %s (%s)\n",
                vpmfs::to_string((*v)->mode()), (*v)->region().mode_reason().c_str());
  }
  return 0;
}
