#!/usr/bin/env bash
# Builds the Debian package, installs it, uses it as a filesystem through mkfs(8), fsck(8),
# mount(8) and an fstab-style line, and removes it again. As root (or with sudo); it installs
# the package system-wide for the duration and purges it at the end, also on failure.
# /etc/fstab is not edited: the fstab line goes to a scratch file read with mount -T.
#
#   scripts/deb-smoke.sh [BUILD_DIR]     default BUILD_DIR: build/deb (Release, prefix /usr)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/deb}
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
# The packaged tools, not any copies under /usr/local: mount.fuse3 runs the vpmfs on its PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

if dpkg-query -W -f='${Status}' vpmfs 2>/dev/null | grep -q "install ok installed"; then
  echo "deb-smoke: the vpmfs package is already installed; remove it first" >&2
  exit 1
fi

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
  -DVPMFS_TESTS=OFF -DVPMFS_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null
(cd "$build" && rm -f vpmfs_*.deb && cpack -G DEB >/dev/null)
deb=$(ls "$build"/vpmfs_*.deb)
echo "deb-smoke: built $deb"
dpkg-deb -f "$deb" Depends

work=$(mktemp -d /tmp/vpmfs-deb.XXXXXX)
mnt=$work/mnt
installed=0
cleanup() {
  local rc=$?
  if mountpoint -q "$mnt" 2>/dev/null; then "${sudo_cmd[@]}" umount "$mnt" || true; fi
  if ((installed)); then "${sudo_cmd[@]}" dpkg -P vpmfs >/dev/null || rc=1; fi
  rm -rf "$work"
  if ((rc)); then echo "deb-smoke: FAILED" >&2; fi
  exit $rc
}
trap cleanup EXIT
step() { echo "deb-smoke: $*"; }

wait_unlocked() {  # the daemon lets the image go just after umount returns
  for _ in $(seq 100); do fsck.vpmfs -n "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  fsck.vpmfs -n "$1"
}

step "dpkg -i"
"${sudo_cmd[@]}" dpkg -i "$deb" >/dev/null
installed=1
for f in /usr/sbin/mkfs.vpmfs /usr/sbin/fsck.vpmfs /usr/bin/vpmfs /usr/bin/vpmfs-ctl \
  /usr/bin/vpmfs-crash; do
  [[ -x $f ]] || { echo "missing $f" >&2; exit 1; }
done
for page in vpmfs mkfs.vpmfs fsck.vpmfs vpmfs-ctl vpmfs-crash; do
  man -w "$page" | grep -q "^/usr/share/man/man8/$page.8" || { echo "man -w $page" >&2; exit 1; }
  man "$page" 2>/dev/null | grep -q . || { echo "man $page shows nothing" >&2; exit 1; }
done
pkg-config --modversion vpmfs | grep -qx 0.1.0
ldconfig -p | grep -q 'libvpmfs.so.0 '
step "an example built against the package with pkg-config"
# shellcheck disable=SC2046
c++ -std=c++20 /usr/share/doc/vpmfs/examples/embed_volume.cc $(pkg-config --cflags --libs vpmfs) \
  -o "$work/embed_volume"
"$work/embed_volume" "$work/embed.img" | grep -q "wrote and read back"

# The systemd mount unit of docs/systemd (systemd is not PID 1 everywhere this runs, so the
# unit is checked, not started; its man:vpmfs(8) reference needs the installed page).
if command -v systemd-analyze >/dev/null; then
  step "systemd-analyze verify docs/systemd/mnt-pm.mount"
  systemd-analyze verify /usr/share/doc/vpmfs/examples/mnt-pm.mount
fi

step "mkfs -t vpmfs, fsck -t vpmfs -n"
img=$work/vpmfs.img
mkfs -t vpmfs -q --size 256M "$img"
fsck -t vpmfs -n "$img"

step "mount -t fuse.vpmfs"
mkdir -p "$mnt"
"${sudo_cmd[@]}" mount -t fuse.vpmfs "$img" "$mnt" -o sync_dax=writeback
grep -q " $mnt fuse.vpmfs " /proc/mounts
echo "through mount(8)" >"$mnt/a"
vpmfs-ctl status "$mnt" | grep -q writeback
"${sudo_cmd[@]}" umount "$mnt"
wait_unlocked "$img"

step "an fstab line: $img $mnt fuse.vpmfs sync_dax=writeback,nofail 0 0 (mount -T)"
echo "$img $mnt fuse.vpmfs sync_dax=writeback,nofail 0 0" >"$work/fstab"
"${sudo_cmd[@]}" mount -T "$work/fstab" "$mnt"
grep -q " $mnt fuse.vpmfs " /proc/mounts
[[ $(cat "$mnt/a") == "through mount(8)" ]]
echo "through fstab" >"$mnt/b"
"${sudo_cmd[@]}" mount -T "$work/fstab" -o remount,ro "$mnt"
if (echo x >"$mnt/c") 2>/dev/null; then echo "remount,ro did not take" >&2; exit 1; fi
"${sudo_cmd[@]}" umount "$mnt"
wait_unlocked "$img"
"${sudo_cmd[@]}" mount -T "$work/fstab" "$mnt"
[[ $(cat "$mnt/b") == "through fstab" ]]
"${sudo_cmd[@]}" umount "$mnt"
wait_unlocked "$img"

# What systemd runs for the unit's [Mount] section: mount What Where -t Type -o Options (with
# this run's image and mount point in place of /srv/vpmfs.img and /mnt/pm).
unit=/usr/share/doc/vpmfs/examples/mnt-pm.mount
unit_value() { sed -n "s/^$1=//p" "$unit"; }
step "the unit's mount: -t $(unit_value Type) -o $(unit_value Options)"
"${sudo_cmd[@]}" mount "$img" "$mnt" -t "$(unit_value Type)" -o "$(unit_value Options)"
vpmfs-ctl status "$mnt" | grep -q writeback
[[ $(cat "$mnt/b") == "through fstab" ]]
"${sudo_cmd[@]}" umount "$mnt"
wait_unlocked "$img"
fsck -t vpmfs -n "$img"

step "dpkg -r, dpkg -P"
"${sudo_cmd[@]}" dpkg -r vpmfs >/dev/null
[[ ! -e /usr/sbin/mkfs.vpmfs && ! -e /usr/bin/vpmfs && ! -e /usr/share/man/man8/vpmfs.8 ]]
"${sudo_cmd[@]}" dpkg -P vpmfs >/dev/null
installed=0
if dpkg-query -W vpmfs >/dev/null 2>&1; then echo "vpmfs still known to dpkg" >&2; exit 1; fi
if ls /usr/lib/*/libvpmfs* /usr/include/vpmfs >/dev/null 2>&1; then echo "files left" >&2; exit 1; fi
step "ok"
