#!/usr/bin/env bash
# vpmfs beside its peers, in one run: the same fio and metadata workloads on tmpfs, libfuse's
# passthrough_ll example (built here from Debian's copy, with and without the kernel's
# write-back cache), fuse2fs on an ext4 image, vpmfs on /dev/shm and on the root disk (default
# and writeback_cache), and a plain directory of the root disk. Repetitions are interleaved
# across targets (A B C, A B C) and the best of them is reported with the spread.
#
#   tools/bench/peers.sh [--runs N] [--time SECONDS] [--size SIZE] [--files N] [--out DIR]
#                        [--cold]
#                        [--targets a,b,...] [--workloads a,b,...] [--baseline BINDIR] [--smoke]
#
# --baseline BINDIR: also measure the vpmfs binaries in BINDIR (another build's tools/, say of
# the commit before a change) as targets base (/dev/shm) and base_disk, in the same run.
# Writes DIR/raw.csv (every figure), DIR/summary.md (best figures, spread, vpmfs's ratios to
# each peer) and DIR/peers.png (the ratios at a glance). Default DIR: bench-results/peers-DATE.
# --smoke: one short repetition of everything on small files (a check that the script works).
# vpmfs images are warmed before timing (filled once and emptied), as a used image is: the first
# store to each page of a fresh sparse image costs a page fault (and, on the disk, a block
# allocation of the image file); --cold skips that (and --smoke implies it).
# Needs root (mounts, drop_caches). Installs fio, fuse2fs, gnuplot and python3 when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

runs=3
seconds=8
size=512M
files=10000
out=""
targets_arg=""
workloads_arg=""
baseline=""
warm=1
while (($#)); do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --time) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --targets) targets_arg=$2; shift 2 ;;
    --workloads) workloads_arg=$2; shift 2 ;;
    --baseline) baseline=$(cd "$2" && pwd); shift 2 ;;
    --cold) warm=0; shift ;;
    --smoke) runs=1; seconds=1; size=64M; files=500; warm=0; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "peers.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $(id -u) -eq 0 ]] || { echo "peers.sh: needs root (mounts, drop_caches)" >&2; exit 2; }
[[ $runs =~ ^[1-9][0-9]*$ && $seconds =~ ^[1-9][0-9]*$ ]] ||
  { echo "peers.sh: --runs and --time take positive whole numbers" >&2; exit 2; }

# passthrough_ll keeps a descriptor open for every inode it has looked up: the metadata
# workload's files need more than the usual 1024 (and fewer than the hard limit, often 20,000).
ulimit -n "$(ulimit -Hn)"
bash scripts/deps.sh --bench
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release --target vpmfs mkfs.vpmfs vpmfs-ctl vpmfs-mdbench >/dev/null
bin=$repo/build/release/tools

stamp=$(date +%Y%m%d-%H%M%S)
out=${out:-bench-results/peers-$stamp}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work_shm=/dev/shm/vpmfs-peers.$$
work_disk=/var/tmp/vpmfs-peers.$$
mnt=/tmp/vpmfs-peers.$$
mkdir -p "$work_shm" "$work_disk" "$mnt"

# passthrough_ll, from the example Debian ships (never copied into this tree).
ptll=$work_disk/passthrough_ll
cc -O2 -o "$ptll" /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c \
  $(pkg-config --cflags --libs fuse3)

all_targets=(tmpfs ptll ptll_wb fuse2fs vpmfs vpmfs_sync vpmfs_wbc vpmfs_disk vpmfs_disk_wbc disk)
[[ -z $baseline ]] || all_targets+=(base base_disk)
all_workloads=(seqwrite seqread randwrite randread fsync1 fsync8 fdatasync1 meta)
IFS=, read -r -a targets <<<"${targets_arg:-$(IFS=,; echo "${all_targets[*]}")}"
IFS=, read -r -a workloads <<<"${workloads_arg:-$(IFS=,; echo "${all_workloads[*]}")}"

declare -A dir_of
cleanup() {
  for t in "${targets[@]}"; do
    if mountpoint -q "$mnt/$t" 2>/dev/null; then
      fusermount3 -u "$mnt/$t" 2>/dev/null || umount -l "$mnt/$t" 2>/dev/null || true
    fi
  done
  rm -rf "$work_shm" "$work_disk" "$mnt"
}
trap cleanup EXIT

# Images (fuse2fs, vpmfs) of four times the file size: room for the two random-I/O files, the
# sequential one and the rest. Everything on /dev/shm is memory: with 1 GiB files a full run
# holds about 20 GiB there, so the default is 512 MiB.
file_bytes=$(numfmt --from=iec "$size")
image_size=$(( (file_bytes * 4 + (1 << 30) - 1) / (1 << 30) * (1 << 30) ))
# fsync of a directory: on vpmfs it commits, so that the blocks of files removed in it are
# usable again at once.
sync_dir() {  # dir
  python3 -c 'import os, sys; os.fsync(os.open(sys.argv[1], os.O_RDONLY))' "$1"
}
mount_target() {  # target: mounts it (when it is a mount) and records its directory
  local t=$1 m=$mnt/$1
  mkdir -p "$m"
  case $t in
    tmpfs) mkdir -p "$work_shm/tmpfs"; dir_of[$t]=$work_shm/tmpfs; return ;;
    disk) mkdir -p "$work_disk/disk"; dir_of[$t]=$work_disk/disk; return ;;
    ptll) mkdir -p "$work_shm/ptll"; "$ptll" -o source="$work_shm/ptll" "$m" ;;
    ptll_wb) mkdir -p "$work_shm/ptll_wb"; "$ptll" -o writeback -o source="$work_shm/ptll_wb" "$m" ;;
    fuse2fs)
      truncate -s $image_size "$work_shm/ext4.img"
      mkfs.ext4 -q -F "$work_shm/ext4.img"
      fuse2fs -o rw "$work_shm/ext4.img" "$m" ;;
    vpmfs|vpmfs_sync|vpmfs_wbc|vpmfs_disk|vpmfs_disk_sync|vpmfs_disk_wbc|base|base_disk)
      local where=$work_shm opts="" tools=$bin
      [[ $t == *_disk* ]] && where=$work_disk
      [[ $t == *_wbc ]] && opts="-o writeback_cache"
      [[ $t == *_sync ]] && opts="-o sync"
      [[ $t == base* ]] && tools=$baseline
      "$tools/mkfs.vpmfs" --size $image_size "$where/$t.img" >/dev/null
      # shellcheck disable=SC2086
      "$tools/vpmfs" "$where/$t.img" "$m" $opts
      if ((warm)); then
        # To the last block (dd stops on ENOSPC): a page the warm-up leaves untouched would
        # still cost its first-touch fault inside a timed run. At most the image's size: with
        # writeback_cache the kernel takes writes past the end of the space into its cache (they
        # fail when written back), so dd would never see ENOSPC.
        dd if=/dev/zero of="$m/warm" bs=1M count=$((image_size >> 20)) conv=fsync status=none \
          2>/dev/null || true
        rm "$m/warm"
        sync_dir "$m"
      fi ;;
    *) echo "peers.sh: unknown target '$t'" >&2; exit 2 ;;
  esac
  dir_of[$t]=$m
}

# fio's figure for a workload, as "value unit"; extra: a second figure (fsync p50).
fio_json() {  # dir, fio args...
  local d=$1
  shift
  fio --output-format=json --directory="$d" --ioengine=psync --group_reporting "$@"
}
csv=$out/raw.csv
# A run's best-of is over its own repetitions only: a folder that holds another run is refused.
[[ ! -s $csv ]] || { echo "peers.sh: $out already holds a run; give another --out" >&2; exit 2; }
echo "rep,target,workload,metric,value" >"$csv"
record() { echo "$1,$2,$3,$4,$5" >>"$csv"; }

flushes() {  # target: device flushes so far, from vpmfs-ctl status (empty for peers)
  [[ $1 == vpmfs* || $1 == base* ]] || return 0
  "$bin/vpmfs-ctl" status "${dir_of[$1]}" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["flush"]["device_flushes"])'
}

run_workload() {  # rep, target, workload
  local rep=$1 t=$2 w=$3 d=${dir_of[$2]} j before after
  local common=(--size="$size" --runtime="$seconds" --time_based)
  case $w in
    seqwrite)
      # New files, one after another, until the run's seconds are spent: one file of a few
      # hundred MiB takes a fraction of a second, too short a sample to stand alone. The figure
      # is all bytes over all fio time; the removals in between are not timed.
      local bytes=0 ns=0 start=$SECONDS
      while ((bytes == 0 || SECONDS - start < seconds)); do
        rm -f "$d"/seq.*
        sync_dir "$d"
        j=$(fio_json "$d" --name=seq --rw=write --bs=1M --size="$size" --end_fsync=0)
        bytes=$((bytes + $(fio_get "$j" write io_bytes)))
        ns=$((ns + $(fio_get "$j" write runtime_ns)))
      done
      record "$rep" "$t" "$w" MiB/s "$(python3 -c "print(round($bytes / 2**20 / ($ns / 1e9), 1))")" ;;
    seqread)
      [[ -e $d/seq.0.0 ]] || fio_json "$d" --name=seq --rw=write --bs=1M --size="$size" >/dev/null
      sync; echo 3 >/proc/sys/vm/drop_caches
      j=$(fio_json "$d" --name=seq --rw=read --bs=1M --size="$size")
      record "$rep" "$t" "$w" MiB/s "$(fio_get "$j" read bw_mib)" ;;
    randwrite)
      j=$(fio_json "$d" --name=rand --rw=randwrite --bs=4k --numjobs=2 "${common[@]}")
      record "$rep" "$t" "$w" IOPS "$(fio_get "$j" write iops)" ;;
    randread)
      j=$(fio_json "$d" --name=rand --rw=randread --bs=4k --numjobs=2 "${common[@]}")
      record "$rep" "$t" "$w" IOPS "$(fio_get "$j" read iops)" ;;
    fsync1|fsync8|fdatasync1)
      local jobs=1 sync=--fsync=1
      [[ $w == fsync8 ]] && jobs=8
      [[ $w == fdatasync1 ]] && sync=--fdatasync=1
      before=$(flushes "$t")
      j=$(fio_json "$d" --name=sync --rw=randwrite --bs=4k --numjobs=$jobs $sync \
        --size=$((64 / jobs))M --runtime="$seconds" --time_based)
      after=$(flushes "$t")
      record "$rep" "$t" "$w" IOPS "$(fio_get "$j" write iops)"
      record "$rep" "$t" "$w" sync_p50_us "$(fio_get "$j" sync p50_us)"
      if [[ -n $before ]]; then
        record "$rep" "$t" "$w" flushes_per_sync \
          "$(python3 -c "print(($after - $before) / max(1, $(fio_get "$j" write ios)))")"
      fi ;;
    meta)
      j=$("$bin/vpmfs-mdbench" "$d" --files "$files" --json)
      for m in create stat unlink; do
        record "$rep" "$t" "$w" "${m}_per_s" \
          "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['${m}_per_s'])" "$j")"
      done ;;
    *) echo "peers.sh: unknown workload '$w'" >&2; exit 2 ;;
  esac
}

fio_get() {  # json, read|write|sync, field
  python3 - "$@" <<'PY'
import json, sys
j = json.loads(sys.argv[1][sys.argv[1].index("{"):])
job = j["jobs"][0]
kind, field = sys.argv[2], sys.argv[3]
if kind == "sync":
    pct = job["sync"]["lat_ns"].get("percentile", {})
    print(round(pct.get("50.000000", 0) / 1000, 1))
elif field == "bw_mib":
    print(round(job[kind]["bw_bytes"] / 2**20, 1))
elif field == "ios":
    print(job[kind]["total_ios"])
elif field == "io_bytes":
    print(job[kind]["io_bytes"])
elif field == "runtime_ns":
    print(job[kind]["runtime"] * 1000000)  # fio gives ms
else:
    print(round(job[kind]["iops"], 1))
PY
}

echo "peers: ${targets[*]}"
echo "peers: ${workloads[*]}; $runs repetitions of $seconds s, files of $size; results in $out"
for t in "${targets[@]}"; do mount_target "$t"; done
for ((rep = 1; rep <= runs; rep++)); do
  for w in "${workloads[@]}"; do
    for t in "${targets[@]}"; do
      # The plain disk is only the fdatasync reference; fdatasync1 only runs on disks.
      if [[ $t == disk && $w != fsync1 && $w != fdatasync1 && $w != fsync8 ]]; then continue; fi
      if [[ $w == fdatasync1 && $t != disk && $t != vpmfs_disk && $t != base_disk ]]; then
        continue
      fi
      printf '\r\033[Kpeers: repetition %d/%d: %s on %s' "$rep" "$runs" "$w" "$t"
      # A target that fails one workload (a peer out of descriptors, say) loses that figure,
      # not the run.
      run_workload "$rep" "$t" "$w" || echo " peers: $w on $t failed; no figure" >&2
    done
  done
done
echo
python3 "$repo/tools/bench/peers_report.py" "$out" \
  "$(date -u +%Y-%m-%d) on $(nproc) CPUs, $(uname -r), $runs x ${seconds}s, files of $size$( ((warm)) || echo ", cold images")"
echo "peers: $out/summary.md, $out/peers.png"
