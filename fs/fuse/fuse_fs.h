// The FUSE front end: serves a Volume through the kernel with libfuse's low-level API on a
// multi-threaded session loop. Each request maps onto one Volume call; fsync replies from the
// flush channel's completion, so no worker thread waits for a device flush.
#pragma once

#include <functional>
#include <string>

#include "mount_options.h"
#include "vpmfs/fs.h"
#include "vpmfs/status.h"

namespace vpmfs {

// Log lines go to syslog (facility daemon, ident "vpmfs") and, while a terminal is attached,
// to stderr as well.
void log_to_stderr(bool on);
void log_message(int priority, const std::string& message);

// Mounts volume on options.mountpoint, calls mounted() once the kernel has the mount, and
// serves requests until the filesystem is unmounted or the daemon gets SIGTERM, SIGINT or
// SIGHUP. An error before mounting (bad mount point, no /dev/fuse) is returned.
Status serve(Volume& volume, const DaemonOptions& options, const std::function<void()>& mounted);

}  // namespace vpmfs
