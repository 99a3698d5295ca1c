// libFuzzer target: opens, checks, reads and repairs a BTT image damaged by the fuzzer's input.
//
// A minimum-size image cannot be a fuzzer input, so the input is a list of patches applied to
// a valid template (formatted, written, with an intent log), aimed at the bytes a hostile image
// controls: info blocks, flog, map, intent log, anywhere; the first byte may also truncate it.
//
//   record := area:u8 offset:u16le length:u8 bytes[length]
//   area    := 0 info | 1 backup info | 2 flog | 3 map | 4 intent log | 5 anywhere (offset*256)
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "vpmfs/btt.h"

namespace {

using namespace vpmfs;

constexpr uint64_t kBttOffset = 64 << 10;
constexpr uint64_t kSize = kBttOffset + (16 << 20);

BttOpenOptions open_options() {
  BttOpenOptions o;
  o.offset = kBttOffset;
  o.intent_log = 0;
  return o;
}

struct Template {
  std::string path;
  std::vector<std::byte> image;
  BttArenaInfo arena;
};

std::string scratch_path() {
  return "/dev/shm/vpmfs-fuzz-" + std::to_string(getpid()) + ".img";
}

// libFuzzer ends the run with exit(): the scratch image and case file go with it, rather than
// staying in /dev/shm (32 MiB of memory) after every test run.
void remove_scratch() {
  std::remove(scratch_path().c_str());
  std::remove((scratch_path() + ".case").c_str());
}

const Template& image_template() {
  static Template t = [] {
    Template t;
    t.path = scratch_path();
    std::remove(t.path.c_str());
    std::atexit(remove_scratch);
    RegionOptions ro;
    ro.create_size = kSize;
    ro.mode = PersistMode::writeback;
    auto region = Region::open(t.path, ro);
    BttFormatOptions fo;
    fo.offset = kBttOffset;
    fo.intent_log = 0;
    fo.nfree = 16;
    (void)Btt::format(**region, fo);
    {
      auto btt = Btt::open(**region, open_options());
      std::vector<char> buf(4096);
      for (uint64_t lba = 0; lba < 40; ++lba) {
        std::memset(buf.data(), int(lba), buf.size());
        (void)(*btt)->write(lba, buf.data());
        if (lba == 30) (void)(*btt)->sync_wait();
      }
      t.arena = (*btt)->arenas()[0];
      // Copied before the BTT commits on close: the last writes stay uncommitted, with live
      // intent records, as a killed process leaves them. Recovery has work to do.
      t.image.assign((*region)->base(), (*region)->base() + kSize);
    }
    return t;
  }();
  return t;
}

uint64_t area_base(const BttArenaInfo& a, uint8_t area, uint16_t offset, uint64_t* limit) {
  switch (area % 6) {
    case 0:
      *limit = 4096;
      return a.offset;
    case 1:
      *limit = 4096;
      return a.info2off;
    case 2:
      *limit = 16 * 64;
      return a.logoff;
    case 3:
      *limit = 4096;
      return a.mapoff;
    case 4:
      *limit = 8192;
      return 0;
    default:
      *limit = 256;
      return uint64_t(offset) * 256 % (kSize - 256);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Template& t = image_template();
  static std::vector<std::byte> image;  // reused: a fresh 16 MiB allocation per input is slow
  image = t.image;
  uint64_t image_size = kSize;
  if (size > 0 && (data[0] & 0xF0) == 0xF0) {
    image_size = kBttOffset + uint64_t(data[0] & 0x0F) * (1 << 20);  // truncated
  }
  for (size_t i = 1; i + 4 <= size;) {
    uint8_t area = data[i];
    uint16_t offset = uint16_t(data[i + 1] | (data[i + 2] << 8));
    uint8_t len = data[i + 3];
    i += 4;
    len = uint8_t(std::min<size_t>(len, size - i));
    uint64_t limit = 0;
    uint64_t base = area_base(t.arena, area, offset, &limit);
    uint64_t at = area % 6 == 5 ? base : base + offset % limit;
    if (at + len <= image.size()) std::memcpy(image.data() + at, data + i, len);
    i += len;
  }

  // One case file for the whole run: resizing it only when the size changes keeps its pages.
  static const std::string path = t.path + ".case";
  static const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::ftruncate(fd, off_t(image_size)) != 0) abort();
  // Through the file, not the mapping: the BTT then faults in only the pages it touches.
  if (::pwrite(fd, image.data(), image_size, 0) != ssize_t(image_size)) abort();
  RegionOptions ro;
  ro.mode = PersistMode::writeback;
  auto region = Region::open(path, ro);
  if (!region) abort();
  {
    auto btt = Btt::open(**region, open_options());
    if (btt) {
      std::vector<char> buf((*btt)->sector_size());
      for (uint64_t lba = 0; lba < std::min<uint64_t>(64, (*btt)->sector_count()); ++lba) {
        (void)(*btt)->read(lba, buf.data());
        auto ref = (*btt)->read_ref(lba);
        if (ref) buf[0] = char(ref->data()[0]);
      }
      for (uint64_t lba = 0; lba < std::min<uint64_t>(8, (*btt)->sector_count()); ++lba) {
        (void)(*btt)->write(lba, buf.data());
      }
      (void)(*btt)->trim(1);
      (void)(*btt)->sync_wait();
    }
  }
  (void)btt_check(**region, open_options(), false);
  auto repaired = btt_check(**region, open_options(), true);
  if (repaired && repaired->remaining.empty() && !repaired->problems.empty()) {
    // A repair that says it succeeded must leave an image that opens.
    auto again = Btt::open(**region, open_options());
    if (!again) abort();
  }
  return 0;
}
