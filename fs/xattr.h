// Extended attribute blocks (format.h, "xattr blocks") and POSIX ACLs in the kernel's xattr
// form (include/uapi/linux/posix_acl_xattr.h): parsing, checking and the ACL arithmetic of
// POSIX.1e that Linux applies (posix_acl_valid, posix_acl_equiv_mode, posix_acl_chmod and
// posix_acl_create_masq). Internal to fs/; used by the volume and by fsck.
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "format.h"
#include "vpmfs/checksum.h"
#include "vpmfs/status.h"

namespace vpmfs::xattr {

inline constexpr std::size_t kNameMax = 255;    // XATTR_NAME_MAX
inline constexpr std::size_t kSizeMax = 65536;  // XATTR_SIZE_MAX
inline constexpr std::string_view kAclAccess = "system.posix_acl_access";
inline constexpr std::string_view kAclDefault = "system.posix_acl_default";

enum class Space { user, trusted, security, acl_access, acl_default };

// The namespace of a full attribute name, with Linux's errors: ERANGE for an empty name or one
// longer than 255 bytes, EINVAL for a bare prefix ("user."), EOPNOTSUPP for a namespace vpmfs
// does not keep.
inline Result<Space> classify(std::string_view name) {
  if (name.empty() || name.size() > kNameMax) {
    return Status(ERANGE, "attribute name must be 1 to 255 bytes");
  }
  if (name.find('\0') != std::string_view::npos) {
    return Status(EINVAL, "attribute name contains NUL");
  }
  struct Prefix {
    std::string_view prefix;
    Space space;
  };
  static constexpr Prefix kPrefixes[] = {
      {"user.", Space::user}, {"trusted.", Space::trusted}, {"security.", Space::security}};
  for (const Prefix& p : kPrefixes) {
    if (name.substr(0, p.prefix.size()) == p.prefix) {
      if (name.size() == p.prefix.size()) return Status(EINVAL, "attribute name has no suffix");
      return p.space;
    }
  }
  if (name == kAclAccess) return Space::acl_access;
  if (name == kAclDefault) return Space::acl_default;
  return Status(EOPNOTSUPP, "attribute namespace not supported: " + std::string(name));
}

struct Entry {
  std::string name;
  std::string value;
};
using Entries = std::vector<Entry>;

inline uint64_t block_checksum(const std::byte* block, uint32_t bs, uint64_t ino) {
  // Over a copy with the checksum field zero: one hash of the block, as format.h says.
  std::vector<std::byte> copy(block, block + bs);
  std::memset(copy.data() + offsetof(fsfmt::XattrHeader, checksum), 0, sizeof(uint64_t));
  return xxhash64(copy.data(), bs, ino);
}

// An inode's attributes are one byte stream of entries, held by a chain of blocks (format.h):
// each block carries up to payload(bs) bytes of it after its header.
inline constexpr std::size_t kStreamMax = 128 * 1024;  // bytes of entries an inode may have
inline constexpr std::size_t kListMax = 65536;         // XATTR_LIST_MAX: bytes of names + NULs

inline uint32_t payload(uint32_t bs) {
  return bs - uint32_t(sizeof(fsfmt::XattrHeader));
}

inline std::size_t stream_size(const Entries& entries) {
  std::size_t n = 0;
  for (const Entry& e : entries) n += fsfmt::xattr_entry_len(e.name.size(), e.value.size());
  return n;
}

// Blocks of the chain that holds a stream of this many bytes.
inline uint64_t chain_length(std::size_t stream, uint32_t bs) {
  return std::max<uint64_t>(1, (stream + payload(bs) - 1) / payload(bs));
}

inline std::string serialize(const Entries& entries) {
  std::string out(stream_size(entries), '\0');
  std::size_t off = 0;
  for (const Entry& e : entries) {
    fsfmt::XattrEntry h{uint8_t(e.name.size()), 0, 0, uint32_t(e.value.size())};
    std::memcpy(out.data() + off, &h, sizeof h);
    std::memcpy(out.data() + off + sizeof h, e.name.data(), e.name.size());
    std::memcpy(out.data() + off + sizeof h + e.name.size(), e.value.data(), e.value.size());
    off += fsfmt::xattr_entry_len(e.name.size(), e.value.size());
  }
  return out;
}

// Writes block `index` of the chain holding `stream` (bs bytes): its part of the stream, and a
// header with `next`, and the entry count if it is the first block.
inline void encode_block(std::string_view stream, uint32_t count, uint64_t index, uint64_t next,
                         std::byte* block, uint32_t bs, uint64_t ino) {
  std::memset(block, 0, bs);
  const std::size_t from = std::min<std::size_t>(index * payload(bs), stream.size());
  const std::size_t len = std::min<std::size_t>(payload(bs), stream.size() - from);
  std::memcpy(block + sizeof(fsfmt::XattrHeader), stream.data() + from, len);
  fsfmt::XattrHeader h{fsfmt::kXattrMagic, ino, index == 0 ? count : 0, uint32_t(len), next, 0};
  std::memcpy(block, &h, sizeof h);
  h.checksum = block_checksum(block, bs, ino);
  std::memcpy(block, &h, sizeof h);
}

// Parses the chain of inode `ino` that starts at block `first`, checking everything fsck can:
// each block's magic, owner, checksum and header, the chain's length, entries inside the stream,
// names valid and unique. `read(lba)` returns a block, or nullptr where no block of the chain
// may be (outside the data area). `chain` receives the LBAs read, in order, also on error. The
// error is EUCLEAN with what is wrong.
inline Result<Entries> decode(const std::function<const std::byte*(uint64_t)>& read, uint64_t first,
                              uint32_t bs, uint64_t ino, std::vector<uint64_t>* chain = nullptr) {
  auto damaged = [&](const std::string& why) {
    return Status(EUCLEAN, "xattr block of inode " + std::to_string(ino) + " is damaged: " + why);
  };
  std::vector<uint64_t> own;
  if (chain == nullptr) chain = &own;
  chain->clear();
  const uint64_t max_blocks = chain_length(kStreamMax, bs);
  std::string stream;
  uint32_t count = 0;
  for (uint64_t lba = first; lba != 0;) {
    if (chain->size() == max_blocks) return damaged("its chain is too long (a loop?)");
    const std::byte* block = read(lba);
    if (block == nullptr)
      return damaged("block " + std::to_string(lba) + " is outside the data area");
    chain->push_back(lba);
    fsfmt::XattrHeader h;
    std::memcpy(&h, block, sizeof h);
    const std::string where = chain->size() == 1 ? "" : " (block " + std::to_string(lba) + ")";
    if (h.magic != fsfmt::kXattrMagic) return damaged("bad magic" + where);
    if (h.ino != ino) return damaged("it belongs to inode " + std::to_string(h.ino) + where);
    if (h.checksum != block_checksum(block, bs, ino)) return damaged("checksum mismatch" + where);
    if (h.used % 8 != 0 || h.used > payload(bs) || (chain->size() > 1 && h.count != 0) ||
        (h.next != 0 && h.used != payload(bs))) {
      return damaged("bad header" + where);
    }
    if (chain->size() == 1) count = h.count;
    stream.append(reinterpret_cast<const char*>(block) + sizeof h, h.used);
    lba = h.next;
  }
  Entries entries;
  std::unordered_set<std::string_view> names;
  entries.reserve(std::min<std::size_t>(count, stream.size() / sizeof(fsfmt::XattrEntry)));
  std::size_t off = 0;
  for (uint32_t i = 0; i < count; ++i) {
    fsfmt::XattrEntry e;
    if (off + sizeof e > stream.size())
      return damaged("entry " + std::to_string(i) + " beyond the end");
    std::memcpy(&e, stream.data() + off, sizeof e);
    uint64_t len = fsfmt::xattr_entry_len(e.name_len, e.value_len);
    if (e.value_len > kSizeMax || off + len > stream.size()) {
      return damaged("entry " + std::to_string(i) + " beyond the end");
    }
    Entry x;
    x.name.assign(stream.data() + off + sizeof e, e.name_len);
    x.value.assign(stream.data() + off + sizeof e + e.name_len, e.value_len);
    if (!classify(x.name)) return damaged("entry " + std::to_string(i) + " has a bad name");
    entries.push_back(std::move(x));
    off += len;
  }
  for (const Entry& x : entries) {
    if (!names.insert(x.name).second) return damaged("two entries named " + x.name);
  }
  if (off != stream.size()) return damaged("entries do not fill the used bytes");
  return entries;
}

inline Entry* find(Entries& entries, std::string_view name) {
  for (Entry& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

// --- POSIX ACLs -------------------------------------------------------------------------------

inline constexpr uint32_t kAclVersion = 2;
inline constexpr uint16_t kUserObj = 0x01, kUser = 0x02, kGroupObj = 0x04, kGroup = 0x08,
                          kMask = 0x10, kOther = 0x20;
inline constexpr uint32_t kUndefinedId = 0xFFFFFFFFu;

struct AclEntry {
  uint16_t tag;
  uint16_t perm;
  uint32_t id;
};
static_assert(sizeof(AclEntry) == 8);
using Acl = std::vector<AclEntry>;

// Parses the xattr form. An empty value or a header without entries is the empty ACL (which
// removes one). EINVAL for anything posix_acl_from_xattr and posix_acl_valid reject: another
// version, a size that is not a whole number of entries, unknown tags or permission bits,
// entries out of the canonical order (USER_OBJ, USER..., GROUP_OBJ, GROUP..., MASK, OTHER), a
// missing base entry, named entries without a mask.
inline Result<Acl> acl_parse(std::string_view value) {
  if (value.empty()) return Acl{};
  if (value.size() < 4 || (value.size() - 4) % sizeof(AclEntry) != 0) {
    return Status(EINVAL, "ACL size is not a header and whole entries");
  }
  uint32_t version;
  std::memcpy(&version, value.data(), 4);
  if (version != kAclVersion) return Status(EINVAL, "ACL version is not 2");
  Acl acl((value.size() - 4) / sizeof(AclEntry));
  std::memcpy(acl.data(), value.data() + 4, acl.size() * sizeof(AclEntry));
  if (acl.empty()) return acl;
  enum { kWantUserObj, kUsers, kGroups, kWantOther, kDone } state = kWantUserObj;
  bool needs_mask = false;
  for (AclEntry& e : acl) {
    if (e.perm & ~7u) return Status(EINVAL, "ACL entry has unknown permission bits");
    switch (e.tag) {
      case kUserObj:
        if (state != kWantUserObj) return Status(EINVAL, "ACL entries out of order");
        state = kUsers;
        e.id = kUndefinedId;
        break;
      case kUser:
      case kGroup:
        if (state != (e.tag == kUser ? kUsers : kGroups)) {
          return Status(EINVAL, "ACL entries out of order");
        }
        if (e.id == kUndefinedId) return Status(EINVAL, "ACL entry names no user or group");
        needs_mask = true;
        break;
      case kGroupObj:
        if (state != kUsers) return Status(EINVAL, "ACL entries out of order");
        state = kGroups;
        e.id = kUndefinedId;
        break;
      case kMask:
        if (state != kGroups) return Status(EINVAL, "ACL entries out of order");
        state = kWantOther;
        e.id = kUndefinedId;
        break;
      case kOther:
        if (state != kWantOther && !(state == kGroups && !needs_mask)) {
          return Status(EINVAL, "ACL entries out of order or a mask is missing");
        }
        state = kDone;
        e.id = kUndefinedId;
        break;
      default:
        return Status(EINVAL, "ACL entry has an unknown tag");
    }
  }
  if (state != kDone) return Status(EINVAL, "ACL lacks a base entry");
  return acl;
}

inline std::string acl_encode(const Acl& acl) {
  std::string out(4 + acl.size() * sizeof(AclEntry), '\0');
  std::memcpy(out.data(), &kAclVersion, 4);
  std::memcpy(out.data() + 4, acl.data(), acl.size() * sizeof(AclEntry));
  return out;
}

// The permission bits a (valid, non-empty) ACL gives the mode: owner from USER_OBJ, group from
// MASK (GROUP_OBJ without one), other from OTHER. Returns whether the ACL says more than the
// mode can (named entries or a mask), i.e. whether it must be stored.
inline bool acl_mode(const Acl& acl, uint32_t* mode) {
  uint32_t perms = 0;
  bool extended = false;
  std::optional<uint32_t> mask;
  for (const AclEntry& e : acl) {
    switch (e.tag) {
      case kUserObj:
        perms |= uint32_t(e.perm & 7) << 6;
        break;
      case kGroupObj:
        perms |= uint32_t(e.perm & 7) << 3;
        break;
      case kOther:
        perms |= e.perm & 7;
        break;
      case kMask:
        mask = e.perm & 7;
        extended = true;
        break;
      default:
        extended = true;
        break;
    }
  }
  if (mask) perms = (perms & ~uint32_t(S_IRWXG)) | (*mask << 3);
  *mode = (*mode & ~uint32_t(S_IRWXU | S_IRWXG | S_IRWXO)) | perms;
  return extended;
}

// chmod: the ACL follows the new permission bits (posix_acl_chmod).
inline void acl_chmod(Acl& acl, uint32_t mode) {
  AclEntry* group = nullptr;
  AclEntry* mask = nullptr;
  for (AclEntry& e : acl) {
    if (e.tag == kUserObj) e.perm = uint16_t((mode >> 6) & 7);
    if (e.tag == kOther) e.perm = uint16_t(mode & 7);
    if (e.tag == kGroupObj) group = &e;
    if (e.tag == kMask) mask = &e;
  }
  AclEntry* g = mask != nullptr ? mask : group;
  if (g != nullptr) g->perm = uint16_t((mode >> 3) & 7);
}

// A new node's access ACL from its directory's default ACL and the mode asked for
// (posix_acl_create_masq): ACL and mode are masked by each other. Returns whether the result
// must be stored (it says more than the mode).
inline bool acl_create(Acl& acl, uint32_t* mode_p) {
  uint32_t mode = *mode_p;
  AclEntry* group = nullptr;
  AclEntry* mask = nullptr;
  bool extended = false;
  for (AclEntry& e : acl) {
    switch (e.tag) {
      case kUserObj:
        e.perm &= uint16_t((mode >> 6) & 7);
        mode &= (uint32_t(e.perm) << 6) | ~uint32_t(S_IRWXU);
        break;
      case kUser:
      case kGroup:
        extended = true;
        break;
      case kGroupObj:
        group = &e;
        break;
      case kOther:
        e.perm &= uint16_t(mode & 7);
        mode &= uint32_t(e.perm) | ~uint32_t(S_IRWXO);
        break;
      case kMask:
        mask = &e;
        extended = true;
        break;
    }
  }
  AclEntry* g = mask != nullptr ? mask : group;
  if (g != nullptr) {
    g->perm &= uint16_t((mode >> 3) & 7);
    mode &= (uint32_t(g->perm) << 3) | ~uint32_t(S_IRWXG);
  }
  *mode_p = (*mode_p & ~uint32_t(S_IRWXU | S_IRWXG | S_IRWXO)) | (mode & 0777);
  return extended;
}

}  // namespace vpmfs::xattr
