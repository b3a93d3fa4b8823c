#!/usr/bin/env bash
# The portable build (run-time kernel dispatch) against a -march=native build, in one run: the
# binaries take turns, round after round, on the same benchmarks, so both see the same background
# load. Prints one JSON line per benchmark run and then, per figure, the median over rounds of each
# variant and its ratio to the first variant (below 1: faster than it).
#
#   benchmarks/isa_compare.sh [--rounds R] [--quick] LABEL=BINARY[@ISA] LABEL=BINARY[@ISA] ...
#
# e.g. benchmarks/isa_compare.sh native=build-native/tools/membank portable=build/tools/membank
# @ISA runs that binary with MEMBANK_ISA=ISA (scalar, avx2, avx512) to time one path.
set -euo pipefail

rounds=3
quick=0
variants=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *=*) variants+=("$1"); shift ;;
    *) echo "isa_compare.sh: expected LABEL=BINARY[@ISA], got '$1'" >&2; exit 2 ;;
  esac
done
if [[ ${#variants[@]} -lt 2 ]]; then
  echo "isa_compare.sh: expected at least two LABEL=BINARY variants" >&2
  exit 2
fi

# The benchmarks: the per-sample and shared NCE steps (with their gather floor), the exact full
# softmax step (two GEMMs over the bank), and kNN (GEMM + top-k, with its plain-GEMM ceiling).
if [[ $quick == 1 ]]; then
  benches=(
    "step-per-sample|bench step --n 200000 --k 1024 --batch 64 --repeats 5 --threads 2 --json"
    "step-shared|bench step --n 200000 --k 1024 --batch 64 --repeats 5 --threads 2 --negatives shared --json"
    "step-full|bench step --n 50000 --batch 64 --repeats 3 --threads 2 --objective full --json"
    "knn|bench knn --n 20000 --queries 2000 --threads 2 --json"
  )
else
  benches=(
    "step-per-sample|bench step --n 1000000 --k 4096 --batch 256 --repeats 10 --threads 2 --json"
    "step-shared|bench step --n 1000000 --k 4096 --batch 256 --repeats 10 --threads 2 --negatives shared --json"
    "step-full|bench step --n 200000 --batch 256 --repeats 4 --threads 2 --objective full --json"
    "knn|bench knn --n 60000 --queries 10000 --threads 2 --json"
  )
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 1; r <= rounds; ++r)); do
  for b in "${benches[@]}"; do
    name=${b%%|*}
    args=${b#*|}
    for v in "${variants[@]}"; do
      label=${v%%=*}
      spec=${v#*=}
      bin=${spec%@*}
      isa=""
      [[ $spec == *@* ]] && isa=${spec##*@}
      # shellcheck disable=SC2086
      line=$(env ${isa:+MEMBANK_ISA=$isa} "$bin" $args | tail -n 1)
      echo "{\"round\":$r,\"variant\":\"$label\",\"name\":\"$name\",\"result\":$line}" | tee -a "$out"
    done
  done
done

/usr/bin/python3 - "$out" "${variants[@]%%=*}" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
labels = sys.argv[2:]
figures = {"step-per-sample": ["step_ms", "floor_ms"], "step-shared": ["step_ms"], "step-full": ["step_ms"],
           "knn": ["knn_s", "gemm_s"]}
print()
print(f"{'figure':28s}" + "".join(f"{l:>14s}" for l in labels) + "".join(f"{l + '/' + labels[0]:>22s}" for l in labels[1:]))
for name, keys in figures.items():
    for key in keys:
        med = {}
        for l in labels:
            vals = [r["result"][key] for r in rows if r["name"] == name and r["variant"] == l]
            med[l] = statistics.median(vals) if vals else float("nan")
        isas = {l: next((r["result"].get("isa", "-") for r in rows if r["name"] == name and r["variant"] == l), "-") for l in labels}
        print(f"{name + ' ' + key:28s}" + "".join(f"{med[l]:14.3f}" for l in labels)
              + "".join(f"{med[l] / med[labels[0]]:22.3f}" for l in labels[1:])
              + "   isa: " + ", ".join(f"{l}={isas[l]}" for l in labels))
EOF
