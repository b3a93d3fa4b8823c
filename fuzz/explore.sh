#!/usr/bin/env bash
# Explore with libFuzzer for a bounded time and add what it finds to the committed corpus.
#
#   fuzz/explore.sh <target> <seconds>      target: snapshot | cli
#
# Builds build-fuzz/ (clang-14, ASan + UBSan + libFuzzer), fuzzes fuzz_<target> for <seconds>
# starting from fuzz/corpus/<target>/, then merges the new inputs that add coverage into that
# directory (libFuzzer -merge=1: only inputs that reach something new). A crash, sanitizer report,
# leak, timeout or out-of-memory input is written to fuzz/corpus/<target>/crash-* (or leak-*,
# timeout-*, oom-*): the corpus replay test (ctest -R fuzz_replay) then fails until the code is
# fixed. Exit status: 0 nothing found; 1 a finding (its file is named at the end); 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ] || [[ ! "$1" =~ ^(snapshot|cli)$ ]] || [[ ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: fuzz/explore.sh snapshot|cli SECONDS" >&2
  exit 2
fi
target=$1 seconds=$2
corpus=fuzz/corpus/$target
build=build-fuzz
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g" "-DCMAKE_C_FLAGS_DEBUG=-O1 -g" \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DMEMBANK_SANITIZE=address,undefined \
  -DMEMBANK_BUILD_FUZZ=ON -DMEMBANK_BUILD_PYTHON=OFF "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)" --target "fuzz_$target"

found=$build/found/$target
mkdir -p "$found"
export TMPDIR=$PWD/$build  # the snapshot target's scratch file
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
list_findings() { ls "$corpus" | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || true; }
before=$(ls "$corpus" | wc -l)
old_findings=$(list_findings)
status=0
# New inputs go to $found (the first directory); the committed corpus is read only here.
"$build/fuzz/fuzz_$target" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -close_fd_mask=1 \
  -print_final_stats=1 -artifact_prefix="$corpus/" "$found" "$corpus" || status=$?
# Keep, of what was found, only the inputs that add coverage to the committed corpus.
"$build/fuzz/fuzz_$target" -merge=1 -close_fd_mask=1 "$corpus" "$found" >/dev/null 2>&1 || true
after=$(ls "$corpus" | wc -l)
echo "fuzz/explore.sh: $target for ${seconds}s: corpus $before -> $after files"
findings=$(comm -13 <(echo "$old_findings") <(list_findings) | tr '\n' ' ')
if [ "$status" -ne 0 ] || [ -n "$findings" ]; then
  echo "fuzz/explore.sh: FINDING (libFuzzer exit $status): ${findings:-see the report above}" >&2
  exit 1
fi
