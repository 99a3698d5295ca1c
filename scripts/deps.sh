#!/usr/bin/env bash
# Installs the Debian packages vpmfs needs to build, test and mount, when any is missing.
# Safe to run again: it asks apt only for what dpkg does not already have.
#
#   scripts/deps.sh            build, test and mount
#   scripts/deps.sh --bench    also what tools/bench/peers.sh runs (fio, fuse2fs, gnuplot)
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libfuse3-dev fuse3 libxxhash-dev
  libgtest-dev libgmock-dev libbenchmark-dev libpmemblk-dev
  libcli11-dev nlohmann-json3-dev
  clang libclang-rt-14-dev clang-format
  xfsprogs attr acl
  groff-base man-db bsdextrautils dpkg-dev file
)
if [[ ${1:-} == --bench ]]; then
  packages+=(fio fuse2fs e2fsprogs gnuplot-nox python3)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "deps: installing ${missing[*]}"
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
