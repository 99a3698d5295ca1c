#!/usr/bin/env bash
# The vpmfs daemon's memory at scale: its anonymous memory (RssAnon: the mapped image's pages do
# not count) after creating N empty files in 100 directories, and after the kernel forgot them
# (drop_caches sends FORGET for every inode it evicts).
#
#   tools/bench/memory.sh [--files N]      default 1,000,000; needs root; image in /dev/shm
set -euo pipefail
cd "$(dirname "$0")/../.."
files=1000000
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "memory.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "memory.sh: needs root (mount, drop_caches)" >&2; exit 2; }
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release --target vpmfs mkfs.vpmfs vpmfs-mdbench >/dev/null
bin=$PWD/build/release/tools
image=/dev/shm/vpmfs-memory.$$.img
mnt=/tmp/vpmfs-memory.$$
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && fusermount3 -u "$mnt"
  rm -rf "$image" "$mnt"
}
trap cleanup EXIT
# One inode per 4 KiB: room for the files, whatever N.
size=$(( (files * 4096 * 2 / (1 << 30) + 2) ))G
"$bin/mkfs.vpmfs" --size "$size" --inode-ratio 4096 "$image" >/dev/null
mkdir -p "$mnt"
"$bin/vpmfs" "$image" "$mnt"
pid=$(pgrep -xf "$bin/vpmfs $image $mnt")
rss() { awk '/^RssAnon/ {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status"; }
echo "memory: mounted: $(rss)"
"$bin/vpmfs-mdbench" "$mnt" --files "$files" --dirs 100 --create-only
echo "memory: after $files files: $(rss)"
sync
echo 3 >/proc/sys/vm/drop_caches
sleep 6  # FORGETs arrive in batches; the next commit trims the metadata cache
echo "memory: after drop_caches: $(rss)"
