// The options of the vpmfs daemon: the -o list as mount(8), mount.fuse3, /etc/fstab and
// xfstests pass it, turned into volume and FUSE settings, with a clear error for anything
// unknown or impossible.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "vpmfs/fs.h"
#include "vpmfs/status.h"

namespace vpmfs {

enum class DaxPolicy { inode, always, never };
const char* to_string(DaxPolicy policy);

// FUSE worker threads unless max_threads= says otherwise: twice the CPUs, 4 to 16. More threads
// than that only take turns on the CPUs: on 2 vCPUs, 4 workers did 10% more 4 KiB random writes
// and write+fsync with 8 jobs than 16 (README, "Benchmarks").
unsigned default_max_threads();

struct DaemonOptions {
  std::string image;
  std::string mountpoint;
  bool foreground = false;
  bool debug = false;  // libfuse's request trace (-d)
  MountOptions volume;
  bool sync_dax_auto = true;  // sync_dax=auto (or not given): use what the backend offers
  DaxPolicy dax = DaxPolicy::inode;
  bool allow_other = false;
  bool default_permissions = true;
  std::string fsname;                            // default: the image path
  unsigned max_threads = default_max_threads();  // FUSE worker threads
  unsigned max_write = 1u << 20;                 // bytes per FUSE write request
  // The kernel's write-back cache (opt-in): writes are acknowledged from the page cache and
  // reach vpmfs later, so a killed daemon can lose acknowledged writes (README, "What a crash
  // can cost"); fsync still writes them back first and then commits.
  bool writeback_cache = false;
  // Testing only: SIGUSR1 makes every later device flush fail with EIO, as a failing host
  // would, so the error path can be exercised on a real mount.
  bool test_faults = false;
  // Record every store, write-back, fence and device flush of the mount into this crash trace
  // file (docs/FORMAT.md, "Crash trace"), for vpmfs-crash.
  std::string record;
  // mount -o remount,...: change the flags of the mount on mountpoint (ro/rw) and exit.
  bool remount = false;
  // norecovery (or noload), as ext4 and xfs take it: mount without replaying the journal, which
  // only a read-only mount may do (and every read-only vpmfs mount does).
  bool norecovery = false;
  std::vector<std::string> passed;  // generic options accepted and left to the kernel or ignored
};

// Applies one -o argument ("a,b=c,...") to options. Later options override earlier ones, as
// with mount(8).
Status apply_mount_options(std::string_view list, DaemonOptions& options);
// What only all the -o arguments together can say is wrong (norecovery without ro).
Status check_mount_options(const DaemonOptions& options);

// The -o string for libfuse's session (fsname, subtype, allow_other, default_permissions, ro).
std::string fuse_mount_options(const DaemonOptions& options);

}  // namespace vpmfs
