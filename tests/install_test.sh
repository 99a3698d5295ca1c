#!/usr/bin/env bash
# Proves the install: cmake --install of the build tree into a temporary prefix, then the
# examples built against it with find_package(vpmfs) and with pkg-config, run: embed_volume on
# an image, dax_map on a real vpmfs mount (refused on a writeback region, mapped on a direct
# one). Also checks the SONAME and that only the public headers went out.
#
#   tests/install_test.sh BUILD_DIR SOURCE_DIR CXX_COMPILER [EXTRA_FLAGS]
#   (EXTRA_FLAGS: the sanitizer flags the library was built with, for the examples too)
set -euo pipefail
build=$1
src=$2
cxx=$3
flags=${4:-}
scratch_base=${VPMFS_TEST_TMP:-/dev/shm}
work=$(mktemp -d "$scratch_base/vpmfs-install.XXXXXX")
prefix=$work/prefix
mnt=$work/mnt
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && fusermount3 -u "$mnt"
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

cmake --install "$build" --prefix "$prefix" >/dev/null
libdir=$(dirname "$(find "$prefix" -name libvpmfs.so.0 -print -quit)")
[[ -f $libdir/libvpmfs.a ]] || fail "no libvpmfs.a in $libdir"
for t in sbin/mkfs.vpmfs sbin/fsck.vpmfs bin/vpmfs bin/vpmfs-ctl; do
  [[ -x $prefix/$t ]] || fail "$t not installed"
done
for page in "$src"/docs/man/*.8; do
  [[ -f $prefix/share/man/man8/$(basename "$page") ]] || fail "$(basename "$page") not installed"
done
soname=$(readelf -d "$libdir/libvpmfs.so.0" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[[ $soname == libvpmfs.so.0 ]] || fail "SONAME is '$soname'"

# Only the public headers, and they include nothing that was not installed.
diff <(cd "$src/include/vpmfs" && ls) <(cd "$prefix/include/vpmfs" && ls) ||
  fail "installed headers differ from include/vpmfs"
[[ $(find "$prefix/include" -type f | wc -l) == $(ls "$src/include/vpmfs" | wc -l) ]] ||
  fail "headers outside include/vpmfs installed"
while read -r inc; do
  [[ -f $prefix/include/$inc ]] || fail "a public header includes \"$inc\", which is not installed"
done < <(sed -n 's/^#include "\(.*\)"/\1/p' "$prefix"/include/vpmfs/*.h | sort -u)

# find_package(vpmfs): vpmfs::vpmfs (shared) and vpmfs::vpmfs_static.
cmake -S "$src/examples" -B "$work/examples" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
  >/dev/null
cmake --build "$work/examples" >/dev/null
# pkg-config, shared and static.
export PKG_CONFIG_PATH=$libdir/pkgconfig
[[ $(pkg-config --modversion vpmfs) == 0.1.0 ]] || fail "pkg-config --modversion vpmfs"
# shellcheck disable=SC2046,SC2086
"$cxx" -std=c++20 $flags "$src/examples/embed_volume.cc" $(pkg-config --cflags --libs vpmfs) \
  -o "$work/embed_volume_pc"
# shellcheck disable=SC2046,SC2086
"$cxx" -std=c++20 $flags "$src/examples/dax_map.cc" \
  $(pkg-config --cflags vpmfs) "$libdir/libvpmfs.a" $(pkg-config --libs --static vpmfs | sed 's/-lvpmfs//') \
  -o "$work/dax_map_pc"

# The shared examples find libvpmfs.so.0 through their RUNPATH or LD_LIBRARY_PATH.
export LD_LIBRARY_PATH=$libdir
readelf -d "$work/embed_volume_pc" | grep -q 'NEEDED.*libvpmfs.so.0' ||
  fail "embed_volume (pkg-config) does not link libvpmfs.so.0"
for prog in "$work/examples/embed_volume" "$work/embed_volume_pc"; do
  rm -f "$work/embed.img"
  "$prog" "$work/embed.img" | grep -q "wrote and read back" || fail "$prog"
done

# dax_map on a vpmfs mount: the image on tmpfs is a writeback region, so a clear EOPNOTSUPP.
"$prefix/sbin/mkfs.vpmfs" -q --size 64M "$work/pm.img"
mkdir -p "$mnt"
"$prefix/bin/vpmfs" "$work/pm.img" "$mnt" -o sync_dax=writeback
for prog in "$work/examples/dax_map" "$work/dax_map_pc"; do
  rc=0
  "$prog" "$mnt/file" 2>"$work/err" || rc=$?
  [[ $rc == 3 ]] || fail "$prog on a writeback region exited $rc: $(cat "$work/err")"
  grep -q "dax_map: .*Operation not supported" "$work/err" || fail "no clear error: $(cat "$work/err")"
done
fusermount3 -u "$mnt"
for _ in $(seq 50); do "$prefix/sbin/fsck.vpmfs" -n "$work/pm.img" >/dev/null 2>&1 && break; sleep 0.1; done
# A direct region (forced: tmpfs has no MAP_SYNC): the map works.
"$prefix/bin/vpmfs" "$work/pm.img" "$mnt" -o sync_dax=direct,force_persistent
for prog in "$work/examples/dax_map" "$work/dax_map_pc"; do
  "$prog" "$mnt/file" | grep -q "persisted a store" || fail "$prog on a direct region"
done
head -c 28 "$mnt/file" | grep -q "stored through a DAX mapping" || fail "the store is not in the file"
fusermount3 -u "$mnt"
for _ in $(seq 50); do "$prefix/sbin/fsck.vpmfs" -n "$work/pm.img" >/dev/null 2>&1 && break; sleep 0.1; done
"$prefix/sbin/fsck.vpmfs" -n "$work/pm.img" >/dev/null || fail "fsck after the examples"
echo "install test: ok"
