#!/usr/bin/env bash
# Installs what is missing, builds vpmfs twice (Release with -Werror, then ASan+UBSan) and runs
# the whole test suite through CTest in each build. Fails if either build or either run fails.
#
#   scripts/test.sh            # both builds
#   VPMFS_SOAK=1 scripts/test.sh   # also the long soak tests (label "soak")
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh || exit 1
jobs=$(nproc)
ctest_args=(--output-on-failure -j "$jobs" --timeout 1200)
if [[ "${VPMFS_SOAK:-0}" == "0" ]]; then
  ctest_args+=(-LE soak)
fi

status=0
run_build() {  # name, cmake options...
  local dir="build/$1"
  shift
  echo "=== build $dir"
  cmake -S . -B "$dir" -G Ninja "$@" >/dev/null || return 1
  cmake --build "$dir" -j "$jobs" || return 1
  echo "=== test $dir"
  ctest --test-dir "$dir" "${ctest_args[@]}"
}

run_build release -DCMAKE_BUILD_TYPE=Release -DVPMFS_WERROR=ON || status=1
# clang, so that the libFuzzer targets build and run here too.
run_build asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVPMFS_WERROR=ON -DVPMFS_SANITIZE=ON \
  -DVPMFS_BENCHMARKS=OFF -DCMAKE_CXX_COMPILER=clang++ || status=1
exit $status
