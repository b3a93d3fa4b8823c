#!/usr/bin/env bash
# Explore with libFuzzer for a bounded time and add what it finds to the committed corpus.
#
#   fuzz/explore.sh <target> <seconds>      target: snapshot | cli
#
# Builds build-fuzz/ (clang-14, ASan + UBSan + libFuzzer), fuzzes fuzz_<target> for <seconds>
# starting from fuzz/corpus/<target>/, then merges the new inputs that add coverage into that
# directory (libFuzzer -merge=1: only inputs that reach something new). A crash, sanitizer report,
# leak, timeout or out-of-memory input is written to fuzz/corpus/<target>/crash-* (or leak-*,
# timeout-*, oom-*) and the fuzzing goes on for the time left: the corpus replay test (ctest -R
# fuzz_replay) then fails until the code is fixed (a crash inside HDF5 itself goes to
# fuzz/hdf5-crashes/ instead: see docs/fuzzing.md). LeakSanitizer ignores HDF5's own leaks
# (fuzz/lsan.supp). Exit status: 0 nothing found; 1 a finding (its files are named at the end); 2 usage.
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
artifacts=$build/artifacts/$target  # findings, copied into the corpus at the end (not seeds meanwhile)
rm -rf "$artifacts"
mkdir -p "$found" "$artifacts"
export TMPDIR=$PWD/$build  # the snapshot target's scratch file
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/fuzz/lsan.supp:print_suppressions=0}  # HDF5's own leaks on corrupt headers
list_findings() { ls "$1" | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || true; }
before=$(ls "$corpus" | wc -l)
old_findings=$(list_findings "$corpus")
status=0
# New inputs go to $found (the first directory); the committed corpus is read only here. A finding
# stops libFuzzer: its file is kept and the run resumes for the time left, so that one known crash
# does not end the exploration; an exit that wrote no new finding (e.g. at start-up) ends it.
end=$((SECONDS + seconds))
while [ $((end - SECONDS)) -ge 1 ]; do
  had=$(list_findings "$artifacts" | wc -l)
  rc=0
  "$build/fuzz/fuzz_$target" -max_total_time=$((end - SECONDS)) -timeout=30 -rss_limit_mb=2048 -close_fd_mask=1 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "$found" "$corpus" || rc=$?
  [ "$rc" -eq 0 ] && break
  status=$rc
  [ "$(list_findings "$artifacts" | wc -l)" -gt "$had" ] || break
done
# Keep, of what was found, only the inputs that reach code (edges) the committed corpus does not:
# -use_counters=0, so that an input reaching a known edge a different number of times is not kept
# (with counters, 4 minutes of cli fuzzing kept ~300 inputs; on edges alone ~70).
"$build/fuzz/fuzz_$target" -merge=1 -use_counters=0 -close_fd_mask=1 -artifact_prefix="$build/found/" \
  "$corpus" "$found" >/dev/null 2>&1 || true
for f in $(list_findings "$artifacts"); do cp -n "$artifacts/$f" "$corpus/"; done
after=$(ls "$corpus" | wc -l)
echo "fuzz/explore.sh: $target for ${seconds}s: corpus $before -> $after files"
findings=$(comm -13 <(echo "$old_findings") <(list_findings "$corpus") | tr '\n' ' ')
if [ "$status" -ne 0 ] || [ -n "$findings" ]; then
  echo "fuzz/explore.sh: FINDING (libFuzzer exit $status): ${findings:-see the report above}" >&2
  exit 1
fi
