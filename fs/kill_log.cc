#include "kill_log.h"

#include <sys/random.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "vpmfs/checksum.h"

namespace vpmfs {

using namespace fsfmt;

namespace {

constexpr uint64_t align64(uint64_t n) {
  return (n + 63) & ~uint64_t(63);
}

uint64_t record_size(uint64_t count, uint32_t bs) {
  return sizeof(KillRecord) + align64(count * 8) + count * bs;
}

uint64_t half_checksum(const KillLogHalf& h) {
  return xxhash64(&h, offsetof(KillLogHalf, checksum));
}

}  // namespace

std::optional<BootId> current_boot_id() {
  std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f == nullptr) return std::nullopt;
  char text[64] = {};
  bool got = std::fgets(text, sizeof text, f) != nullptr;
  std::fclose(f);
  if (!got) return std::nullopt;
  BootId id{};
  int n = 0;
  for (const char* p = text; *p != '\0' && *p != '\n' && n < 32; ++p) {
    if (*p == '-') continue;
    int v = (*p >= '0' && *p <= '9') ? *p - '0' : (*p >= 'a' && *p <= 'f') ? *p - 'a' + 10 : -1;
    if (v < 0) return std::nullopt;
    id[n / 2] = uint8_t(id[n / 2] << 4 | v);
    ++n;
  }
  if (n != 32) return std::nullopt;
  return id;
}

uint64_t kill_log_size_for(uint64_t image_size) {
  uint64_t size = std::clamp<uint64_t>(image_size / 64, 1 << 20, 64 << 20);
  return size & ~uint64_t(8191);  // two halves of whole 4 KiB pages
}

KillImages read_kill_log(const Region& r, uint64_t offset, uint64_t size, uint32_t bs,
                         uint64_t after_txn, const BootId& boot, uint64_t block_count) {
  KillImages out;
  if (size == 0 || !r.contains(offset, size)) return out;
  const uint64_t half_size = size / 2;
  struct Half {
    uint64_t txn, off, nonce;
  };
  std::vector<Half> halves;
  for (int i = 0; i < 2; ++i) {
    KillLogHalf h;
    std::memcpy(&h, r.at(offset + i * half_size), sizeof h);
    if (std::memcmp(h.magic, kKillLogMagic, 8) != 0 || h.checksum != half_checksum(h) ||
        std::memcmp(h.boot_id, boot.data(), boot.size()) != 0 || h.txn <= after_txn ||
        h.txn % 2 != uint64_t(i)) {
      continue;
    }
    halves.push_back({h.txn, offset + i * half_size, h.nonce});
  }
  std::sort(halves.begin(), halves.end(),
            [](const Half& a, const Half& b) { return a.txn < b.txn; });
  // The two halves hold consecutive transactions; a gap means the older half is stale.
  if (halves.size() == 2 && halves[1].txn != halves[0].txn + 1) halves.erase(halves.begin());
  for (const Half& h : halves) {
    std::map<uint64_t, std::vector<std::byte>> images;
    uint64_t pos = sizeof(KillLogHalf);
    for (uint64_t seq = 1;; ++seq) {
      if (pos + sizeof(KillRecord) > half_size) break;
      KillRecord rec;
      std::memcpy(&rec, r.at(h.off + pos), sizeof rec);
      if (rec.magic != kKillRecordMagic || rec.txn != h.txn || rec.seq != seq || rec.count == 0 ||
          rec.count > half_size / bs || pos + record_size(rec.count, bs) > half_size) {
        break;
      }
      const std::byte* lba_bytes = r.at(h.off + pos + sizeof rec);
      const std::byte* img = lba_bytes + align64(rec.count * 8);
      KillRecord zeroed = rec;
      zeroed.checksum = 0;
      uint64_t sum = xxhash64(&zeroed, sizeof zeroed, h.txn ^ h.nonce);
      sum = xxhash64(lba_bytes, rec.count * 8, sum);
      for (uint32_t i = 0; i < rec.count; ++i) sum = xxhash64(img + uint64_t(i) * bs, bs, sum);
      if (sum != rec.checksum) break;
      std::vector<uint64_t> lbas(rec.count);
      std::memcpy(lbas.data(), lba_bytes, rec.count * 8);
      if (std::any_of(lbas.begin(), lbas.end(), [&](uint64_t l) { return l >= block_count; })) {
        break;
      }
      for (uint32_t i = 0; i < rec.count; ++i) {
        images[lbas[i]].assign(img + uint64_t(i) * bs, img + uint64_t(i + 1) * bs);
      }
      pos += record_size(rec.count, bs);
    }
    out.push_back(std::move(images));
  }
  return out;
}

KillLog::KillLog(Region& r, uint64_t offset, uint64_t size, uint32_t bs, const BootId& boot)
    : r_(r), offset_(offset), half_size_(size / 2), bs_(bs), boot_(boot) {}

void KillLog::start(uint64_t txn) {
  KillLogHalf h{};
  std::memcpy(h.magic, kKillLogMagic, 8);
  std::memcpy(h.boot_id, boot_.data(), boot_.size());
  h.txn = txn;
  // Transaction numbers start again from an empty journal (after mkfs, or fsck): records an
  // earlier start left in this half, behind the new ones, must not pass for them.
  if (getrandom(&nonce_, sizeof nonce_, 0) != ssize_t(sizeof nonce_)) ++nonce_;
  h.nonce = nonce_;
  h.checksum = half_checksum(h);
  r_.write(half(txn), &h, sizeof h);
  txn_ = txn;
  seq_ = 0;
  used_ = sizeof h;
}

bool KillLog::append(const std::vector<uint64_t>& lbas,
                     const std::function<const std::byte*(uint64_t)>& image) {
  if (lbas.empty()) return true;
  uint64_t need = record_size(lbas.size(), bs_);
  if (used_ + need > half_size_) return false;
  const uint64_t at = half(txn_) + used_;
  KillRecord rec{};
  rec.magic = kKillRecordMagic;
  rec.txn = txn_;
  rec.seq = seq_ + 1;
  rec.count = uint32_t(lbas.size());
  uint64_t sum = xxhash64(&rec, sizeof rec, txn_ ^ nonce_);
  sum = xxhash64(lbas.data(), lbas.size() * 8, sum);
  r_.write(at + sizeof rec, lbas.data(), lbas.size() * 8);
  uint64_t img_at = at + sizeof rec + align64(lbas.size() * 8);
  for (std::size_t i = 0; i < lbas.size(); ++i) {
    const std::byte* img = image(lbas[i]);
    sum = xxhash64(img, bs_, sum);
    r_.write(img_at + i * bs_, img, bs_);
  }
  rec.checksum = sum;
  r_.write(at, &rec, sizeof rec);  // the header last: a record is whole once it is valid
  ++seq_;
  used_ += need;
  return true;
}

void KillLog::clear() {
  r_.zero(offset_, sizeof(KillLogHalf));
  r_.zero(offset_ + half_size_, sizeof(KillLogHalf));
}

}  // namespace vpmfs
