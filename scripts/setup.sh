#!/usr/bin/env bash
# membank set-up on a fresh Debian (bookworm) machine: install what is missing, build, then
#   bash scripts/setup.sh run    -> run the main job
#   bash scripts/setup.sh test   -> run the whole test suite (what CI runs)
# Non-interactive (CI=true, no standard input is fine). Uses apt-get as root, or sudo.
set -euo pipefail
mode=${1:-run}
case "$mode" in run|test|build) ;; *) echo "usage: bash scripts/setup.sh [run|test|build]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config git libeigen3-dev libhdf5-dev hdf5-tools libfmt-dev doctest-dev
          libcli11-dev nlohmann-json3-dev librandom123-dev libomp-dev dataset-fashion-mnist
          python3 python3-numpy python3-h5py python3-matplotlib python3-dev python3-torch pybind11-dev
          libopenmpi-dev openmpi-bin python3-mpi4py)
# CI's sanitizer builds (.ci/sanitizers): clang and LLVM's OpenMP for ThreadSanitizer
[ "$mode" = test ] && packages+=(clang-14 libclang-rt-14-dev libomp-14-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "== installing: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq || echo "(apt-get update failed; trying the existing package lists)"
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

echo "== building (build/, Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"

case "$mode" in
  run)
    echo "== main job: membank train (instance discrimination on Fashion-MNIST, dhel against K = 4096 draws, 10 epochs)"
    ./build/tools/membank train --snapshot build/fashion-mnist-bank.h5
    ;;
  test)
    echo "== tests"
    ctest --test-dir build --output-on-failure --timeout 900
    ;;
esac
