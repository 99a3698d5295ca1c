#include "mount_options.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <optional>

namespace vpmfs {

unsigned default_max_threads() {
  long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  return unsigned(std::clamp<long>(2 * cpus, 4, 16));
}

const char* to_string(DaxPolicy policy) {
  switch (policy) {
    case DaxPolicy::inode:
      return "inode";
    case DaxPolicy::always:
      return "always";
    case DaxPolicy::never:
      return "never";
  }
  return "?";
}

namespace {

// VFS flags: handed to libfuse, which makes them flags of the mount it makes (libfuse's own
// defaults are nosuid,nodev; mount.fuse3 passes dev,suid when root mounts). libfuse 3.14 does
// not know nodiratime: it is accepted and left alone.
constexpr std::string_view kVfsFlags[] = {
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync", "noatime",
};

bool is_vfs_flag(std::string_view name) {
  for (auto f : kVfsFlags) {
    if (f == name) return true;
  }
  return false;
}

// Options mount(8) and mount.fuse3 hand every filesystem, accepted and otherwise left alone.
constexpr std::string_view kGeneric[] = {
    "rw",          "defaults", "auto",       "noauto",   "user",       "nouser",
    "users",       "_netdev",  "nofail",     "dev",      "nodev",      "suid",
    "nosuid",      "exec",     "noexec",     "atime",    "noatime",    "relatime",
    "strictatime", "diratime", "nodiratime", "lazytime", "nolazytime", "async",
    "silent",      "loud",     "owner",      "group",    "sync",       "dirsync",
};

bool is_generic(std::string_view name) {
  for (auto g : kGeneric) {
    if (g == name) return true;
  }
  // fstab comments and helper options: x-systemd.*, x-gvfs-*, comment=...
  return name.starts_with("x-") || name == "comment";
}

// The kernel's own FUSE mount parameters, as /proc/mounts shows them. mount(8) hands them back
// with `mount -o remount,ro DIR` (and an fstab line copied from /proc/mounts has them); vpmfs
// sets them itself, so they are accepted and ignored.
bool is_kernel_fuse_parameter(std::string_view name) {
  return name == "user_id" || name == "group_id" || name == "rootmode" || name == "blksize" ||
         name == "max_read";
}

Status bad(std::string_view option, std::string_view why) {
  return Status(EINVAL, "mount option '" + std::string(option) + "': " + std::string(why));
}

Result<unsigned> parse_uint(std::string_view option, std::string_view value, unsigned lo,
                            unsigned hi) {
  unsigned v = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
  if (value.empty() || ec != std::errc() || end != value.data() + value.size() || v < lo ||
      v > hi) {
    return bad(option,
               "expects a whole number from " + std::to_string(lo) + " to " + std::to_string(hi));
  }
  return v;
}

// A boot id as /proc/sys/kernel/random/boot_id shows it: 32 hex digits, dashes anywhere.
std::optional<std::array<uint8_t, 16>> parse_boot_id(std::string_view text) {
  std::array<uint8_t, 16> id{};
  int n = 0;
  for (char c : text) {
    if (c == '-') continue;
    int v = (c >= '0' && c <= '9')   ? c - '0'
            : (c >= 'a' && c <= 'f') ? c - 'a' + 10
            : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                     : -1;
    if (v < 0 || n == 32) return std::nullopt;
    id[n / 2] = uint8_t(id[n / 2] << 4 | v);
    ++n;
  }
  if (n != 32) return std::nullopt;
  return id;
}

}  // namespace

Status apply_mount_options(std::string_view list, DaemonOptions& o) {
  while (!list.empty()) {
    std::size_t comma = list.find(',');
    std::string_view item = list.substr(0, comma);
    list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
    if (item.empty()) continue;
    std::size_t eq = item.find('=');
    std::string_view name = item.substr(0, eq);
    bool has_value = eq != std::string_view::npos;
    std::string_view value = has_value ? item.substr(eq + 1) : std::string_view();
    auto flag = [&]() -> Status { return has_value ? bad(item, "takes no value") : Status::ok(); };

    if (name == "sync_dax") {
      if (value == "auto") {
        o.sync_dax_auto = true;
        o.volume.mode.reset();
      } else if (auto mode = parse_persist_mode(value)) {
        o.sync_dax_auto = false;
        o.volume.mode = mode;
      } else {
        return bad(item, "expects auto, direct, writeback or unsafe");
      }
    } else if (name == "dax") {
      if (!has_value || value == "always") {
        o.dax = DaxPolicy::always;  // plain "dax", as ext4 and xfs accept it
      } else if (value == "never") {
        o.dax = DaxPolicy::never;
      } else if (value == "inode") {
        o.dax = DaxPolicy::inode;
      } else {
        return bad(item, "expects always, never or inode");
      }
    } else if (name == "commit") {
      auto seconds = parse_uint(item, value, 1, 86400);
      if (!seconds) return seconds.status();
      o.volume.commit_interval_ms = *seconds * 1000;
    } else if (name == "ro") {
      if (Status s = flag(); !s) return s;
      o.volume.read_only = true;
    } else if (name == "rw") {
      if (Status s = flag(); !s) return s;
      o.volume.read_only = false;
    } else if (name == "allow_other") {
      if (Status s = flag(); !s) return s;
      o.allow_other = true;
    } else if (name == "default_permissions") {
      if (Status s = flag(); !s) return s;
      o.default_permissions = true;
    } else if (name == "no_default_permissions") {
      if (Status s = flag(); !s) return s;
      o.default_permissions = false;
    } else if (name == "force_persistent") {
      if (Status s = flag(); !s) return s;
      o.volume.force_persistent = true;
    } else if (name == "sync" || name == "async") {
      if (Status s = flag(); !s) return s;
      o.volume.sync = name == "sync";
      o.passed.emplace_back(item);  // the kernel's MS_SYNCHRONOUS too
    } else if (name == "dirsync") {
      if (Status s = flag(); !s) return s;
      o.volume.dirsync = true;
      o.passed.emplace_back(item);
    } else if (name == "mlock" || name == "nomlock") {
      if (Status s = flag(); !s) return s;
      o.volume.lock_memory = name == "mlock";
    } else if (name == "writeback_cache" || name == "no_writeback_cache") {
      if (Status s = flag(); !s) return s;
      o.writeback_cache = name == "writeback_cache";
    } else if (name == "test_faults") {
      if (Status s = flag(); !s) return s;
      o.test_faults = true;
    } else if (name == "record") {
      if (value.empty()) return bad(item, "expects the path of the trace file to write");
      o.record = value;
    } else if (name == "boot_id") {
      auto id = parse_boot_id(value);
      if (!id) return bad(item, "expects 32 hex digits, as /proc/sys/kernel/random/boot_id");
      o.volume.boot_id = id;
    } else if (name == "fsname") {
      if (value.empty()) return bad(item, "expects a name");
      o.fsname = value;
    } else if (name == "subtype") {
      if (value != "vpmfs") return bad(item, "vpmfs mounts are always of subtype vpmfs");
    } else if (name == "max_threads") {
      auto n = parse_uint(item, value, 1, 256);
      if (!n) return n.status();
      o.max_threads = *n;
    } else if (name == "noatime" || name == "relatime" || name == "strictatime" ||
               name == "atime") {
      if (Status s = flag(); !s) return s;
      o.volume.atime = name == "noatime"       ? MountOptions::Atime::noatime
                       : name == "strictatime" ? MountOptions::Atime::strictatime
                                               : MountOptions::Atime::relatime;
      if (name == "noatime") o.passed.emplace_back(item);
    } else if (name == "norecovery" || name == "noload") {
      if (Status s = flag(); !s) return s;
      o.norecovery = true;
    } else if (name == "remount") {
      if (Status s = flag(); !s) return s;
      o.remount = true;
    } else if (name == "max_write") {
      auto n = parse_uint(item, value, 4096, 1u << 20);
      if (!n) return n.status();
      o.max_write = *n;
    } else if (is_generic(name)) {
      o.passed.emplace_back(item);
    } else if (is_kernel_fuse_parameter(name)) {
      if (!has_value) return bad(item, "expects a value, as /proc/mounts shows it");
    } else {
      return bad(item, "unknown option (see vpmfs --help)");
    }
  }
  return Status::ok();
}

Status check_mount_options(const DaemonOptions& o) {
  if (o.norecovery && !o.volume.read_only) {
    return Status(EINVAL,
                  "mount option 'norecovery' needs 'ro': a writable mount replays the journal "
                  "(a read-only one never does)");
  }
  return Status::ok();
}

std::string fuse_mount_options(const DaemonOptions& o) {
  std::string fsname = o.fsname.empty() ? o.image : o.fsname;
  // libfuse's option parser treats ',' as a separator and '\' as an escape.
  std::string escaped;
  for (char c : fsname) {
    if (c == ',' || c == '\\') escaped += '\\';
    escaped += c;
  }
  std::string s = "fsname=" + escaped + ",subtype=vpmfs";
  if (o.allow_other) s += ",allow_other";
  if (o.default_permissions) s += ",default_permissions";
  if (o.volume.read_only) s += ",ro";
  for (const auto& p : o.passed) {
    if (is_vfs_flag(p)) s += "," + p;
  }
  return s;
}

}  // namespace vpmfs
