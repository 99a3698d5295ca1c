#!/usr/bin/env bash
# Installs what is missing, builds vpmfs (Release), installs it under /usr/local (tools, library,
# man pages: docs/INSTALL.md), formats a default image (unless one is already there) and mounts it.
#
#   scripts/quickstart.sh [IMAGE [MOUNTPOINT]]    defaults: ./vpmfs.img (4 GiB, sparse), /tmp/vpmfs
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:-$PWD/vpmfs.img}
mountpoint=${2:-/tmp/vpmfs}
size=${VPMFS_SIZE:-4G}

bash scripts/deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j "$(nproc)"
# /usr/local/bin/vpmfs is what mount.fuse3 runs for "mount -t fuse.vpmfs" and /etc/fstab;
# mkfs.vpmfs and fsck.vpmfs go to /usr/local/sbin, where mkfs(8) and fsck(8) find them (a
# non-root PATH may lack that directory, so the build's own mkfs.vpmfs formats below).
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
"${sudo_cmd[@]}" cmake --install build/release >/dev/null

if mountpoint -q "$mountpoint" 2>/dev/null; then
  echo "quickstart: $mountpoint is already mounted"
  exit 0
fi
if [[ -s "$image" ]] && head -c 8 "$image" | grep -q VPMFSIMG; then
  echo "quickstart: using the existing vpmfs image $image"
else
  build/release/tools/mkfs.vpmfs --size "$size" "$image"
fi
mkdir -p "$mountpoint"
"${sudo_cmd[@]}" vpmfs "$image" "$mountpoint"
echo "quickstart: $image is mounted on $mountpoint (unmount: fusermount3 -u $mountpoint)"
