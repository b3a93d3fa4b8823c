#!/usr/bin/python3
"""Exact k-nearest-neighbour search by inner product, membank against faiss, in one process:

  membank        membank.knn_search(bank, queries, k)           (scores, ids), float32 / int64 (Q, k)
  faiss          faiss.IndexFlatIP(d).search(queries, k)        the same search, Debian's python3-faiss
  numpy GEMM     queries @ rows.T in float32, blocks of 1024 queries: the same 2 Q N D flops, no top-k
  membank CLI    `membank bench knn --json` (a subprocess, once per round): the engine's weighted-kNN time
                 against its own GEMM of the same flops (rate_vs_gemm), the C++ figure of the same run

Random unit rows (a fixed seed), the same stored rows for every method. The methods run in interleaved
rounds (the order rotating from round to round), after one untimed warm-up each; the table gives the
medians, GFLOP/s = 2 Q N D / time, and faiss time / membank time. A check then compares membank's and
faiss's ids on a sample of queries of the last round, rank by rank: they may differ only where the two
rows' scores (recomputed in float64) tie within 1e-6. A failed check exits with status 1.

Threads: --threads sets membank's and faiss's OpenMP threads and, before numpy and faiss are loaded,
OPENBLAS_NUM_THREADS and OMP_NUM_THREADS (OpenBLAS serves numpy and faiss here).

OPENBLAS_CORETYPE: this machine's environment sets it (Haswell), which keeps OpenBLAS -- numpy's GEMM
and faiss -- off its AVX-512 kernels and slows them. Unset it only in the command that runs the
benchmark, as below, not in your shell (the script does not touch it; it prints the core OpenBLAS chose):

    env -u OPENBLAS_CORETYPE /usr/bin/python3 benchmarks/knn_vs_faiss.py            # defaults below
    env -u OPENBLAS_CORETYPE /usr/bin/python3 benchmarks/knn_vs_faiss.py --json     # one JSON object

Defaults: 10,000 queries x 60,000 rows x 128 dims, k = 200, 2 threads, 3 rounds. The Python module and
the CLI come from --build (default: build-rel at the top of the repository); --cli names another CLI.
"""
import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIE = 1e-6  # float64 score difference under which the two libraries may order two rows either way


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10000, help="Q, query rows")
    ap.add_argument("--n", type=int, default=60000, help="N, bank rows")
    ap.add_argument("--dim", type=int, default=128, help="D")
    ap.add_argument("--k", type=int, default=200, help="neighbours per query")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every method once)")
    ap.add_argument("--check-queries", type=int, default=1000, help="queries whose ids the check compares")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build", type=Path, default=REPO / "build-rel",
                    help="build tree holding python/membank and tools/membank")
    ap.add_argument("--cli", type=Path, default=None, help="the membank CLI (default: BUILD/tools/membank)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args()
    for name in ("queries", "n", "dim", "k", "threads", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} = {getattr(a, name)}: expected an integer >= 1")
    if a.k > a.n:
        ap.error(f"--k = {a.k}: expected k <= --n = {a.n}")
    if a.check_queries < 1:
        ap.error(f"--check-queries = {a.check_queries}: expected an integer >= 1")
    a.cli = a.cli if a.cli is not None else a.build / "tools" / "membank"
    if not os.access(a.cli, os.X_OK):
        ap.error(f"--cli {a.cli}: not an executable file (build it: cmake --build {a.build} --target membank, "
                 "or pass --cli PATH)")
    return a


args = parse_args()
# Before numpy and faiss load OpenBLAS / the OpenMP runtime: every library gets --threads.
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
if (args.build / "python" / "membank").is_dir():
    sys.path.insert(0, str(args.build / "python"))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

import membank as mb  # noqa: E402


def openblas_info():
    """The OpenBLAS that numpy and faiss share: its configuration, the core it chose, its threads."""
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return {"config": lib.openblas_get_config().decode(), "core": lib.openblas_get_corename().decode(),
                "threads": lib.openblas_get_num_threads(),
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    except (OSError, AttributeError) as e:
        return {"error": str(e), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_gemm(queries, rows_t, out):
    """queries @ rows.T in blocks of 1024 queries into one reused (1024, N) buffer."""
    for q0 in range(0, queries.shape[0], 1024):
        block = queries[q0:q0 + 1024]
        np.matmul(block, rows_t, out=out[:block.shape[0]])


def run_cli(a):
    cmd = [str(a.cli), "bench", "knn", "--n", str(a.n), "--queries", str(a.queries), "--dim", str(a.dim),
           "--k", str(a.k), "--threads", str(a.threads), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"knn_vs_faiss: {' '.join(cmd)} exited with status {p.returncode}:\n{p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_ids(rows64, queries, m_scores, m_ids, f_scores, f_ids, sample):
    """Rank by rank on the sampled queries: membank's and faiss's ids equal, or their rows' float64
    scores within TIE of each other (a tie that float32 rounding may order either way)."""
    s_m = np.empty(m_ids[sample].shape)
    s_f = np.empty(s_m.shape)
    for i, q in enumerate(sample):  # the float64 scores of each library's rows, one query at a time
        s_m[i] = rows64[m_ids[q]] @ queries[q].astype(np.float64)
        s_f[i] = rows64[f_ids[q]] @ queries[q].astype(np.float64)
    differ = m_ids[sample] != f_ids[sample]
    bad = differ & (np.abs(s_m - s_f) > TIE)
    out = {"queries": int(len(sample)), "ranks": int(differ.size), "ranks_differing": int(differ.sum()),
           "ranks_differing_beyond_tie": int(bad.sum()), "tie": TIE,
           "max_abs_score_diff": float(np.abs(m_scores[sample].astype(np.float64) - f_scores[sample]).max()),
           "ok": bool(not bad.any())}
    if bad.any():
        qi, r = np.argwhere(bad)[0]
        out["first_failure"] = {"query": int(sample[qi]), "rank": int(r), "membank_id": int(m_ids[sample[qi], r]),
                                "faiss_id": int(f_ids[sample[qi], r]), "membank_score64": float(s_m[qi, r]),
                                "faiss_score64": float(s_f[qi, r])}
    return out


def main(a):
    mb.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    bank = mb.Bank.from_array(unit_rows(rng, a.n, a.dim))
    rows = bank.to_float32()  # the stored rows, for faiss and numpy too
    queries = unit_rows(rng, a.queries, a.dim)
    index = faiss.IndexFlatIP(a.dim)
    index.add(rows)
    rows_t = rows.T
    gemm_out = np.empty((min(1024, a.queries), a.n), np.float32)
    results = {}

    def time_membank():
        results["membank"] = mb.knn_search(bank, queries, a.k)

    def time_faiss():
        results["faiss"] = index.search(queries, a.k)

    def time_gemm():
        numpy_gemm(queries, rows_t, gemm_out)

    methods = {"membank": time_membank, "faiss": time_faiss, "numpy_gemm": time_gemm}
    warm = queries[:min(a.queries, 512)]  # untimed: first-touch of every library's buffers and threads
    mb.knn_search(bank, warm, a.k)
    index.search(warm, a.k)
    numpy_gemm(warm, rows_t, gemm_out)

    times = {name: [] for name in methods}
    cli_rounds = []
    order = list(methods) + ["cli"]
    for r in range(a.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if name == "cli":
                cli_rounds.append(run_cli(a))
                continue
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)

    flops = 2.0 * a.queries * a.n * a.dim
    med = {name: statistics.median(t) for name, t in times.items()}
    sample = np.sort(np.random.default_rng(a.seed + 1).choice(a.queries, min(a.check_queries, a.queries),
                                                               replace=False))
    m_scores, m_ids = results["membank"]
    f_scores, f_ids = results["faiss"]
    check = check_ids(rows.astype(np.float64), queries, m_scores, m_ids, f_scores, f_ids, sample)
    cli_med = {key: statistics.median(c[key] for c in cli_rounds)
               for key in ("knn_s", "gemm_s", "knn_gflops", "gemm_gflops", "rate_vs_gemm")}
    report = {
        "bench": "knn_vs_faiss", "queries": a.queries, "n": a.n, "dim": a.dim, "k": a.k, "threads": a.threads,
        "rounds": a.rounds, "seconds": times,
        "median_s": med, "gflops": {name: flops / t * 1e-9 for name, t in med.items()},
        "faiss_over_membank": med["faiss"] / med["membank"],
        "membank_rate_over_numpy_gemm": med["numpy_gemm"] / med["membank"],
        "cli": {"median": cli_med, "rounds": cli_rounds},
        "check": check,
        "membank_module": mb.__file__, "cli_path": str(a.cli), "faiss_version": faiss.__version__,
        "numpy_version": np.__version__, "openblas": openblas_info(), "python": platform.python_version(),
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor() or "?"),
        "git": cli_rounds[0].get("git", "?"), "isa": cli_rounds[0].get("isa", "?"),
    }
    if a.json:
        print(json.dumps(report))
    else:
        ob = report["openblas"]
        print(f"knn_vs_faiss: {a.queries} queries x {a.n} rows x {a.dim} dims, k = {a.k}, {a.threads} threads, "
              f"{a.rounds} rounds (median)")
        print(f"  {report['cpu']}; membank {report['isa']} kernels (CLI built at git {report['git']}); faiss "
              f"{faiss.__version__}; OpenBLAS core {ob.get('core', '?')}, {ob.get('threads', '?')} threads, "
              f"OPENBLAS_CORETYPE={ob['OPENBLAS_CORETYPE'] or '(unset)'}")
        print(f"  {'':34s} {'median s':>9s} {'GFLOP/s':>8s}   rounds (s)")
        labels = {"membank": "membank.knn_search", "faiss": "faiss IndexFlatIP.search",
                  "numpy_gemm": "numpy float32 GEMM (no top-k)"}
        for name, label in labels.items():
            print(f"  {label:34s} {med[name]:9.3f} {report['gflops'][name]:8.1f}   "
                  + " ".join(f"{t:.3f}" for t in times[name]))
        print(f"  faiss time / membank time = {report['faiss_over_membank']:.2f}; membank rate / numpy GEMM rate "
              f"= {report['membank_rate_over_numpy_gemm']:.2f}")
        print(f"  membank bench knn (C++, weighted kNN): kNN {cli_med['knn_s']:.3f} s ({cli_med['knn_gflops']:.1f} "
              f"GFLOP/s), engine GEMM {cli_med['gemm_s']:.3f} s ({cli_med['gemm_gflops']:.1f} GFLOP/s), kNN rate / "
              f"GEMM rate = {cli_med['rate_vs_gemm']:.2f} (rounds: "
              + " ".join(f"{c['rate_vs_gemm']:.2f}" for c in cli_rounds) + ")")
        verdict = "ok" if check["ok"] else "FAILED"
        print(f"  check, membank vs faiss ids on {check['queries']} queries x {a.k} ranks: {verdict}; "
              f"{check['ranks_differing']} ranks differ, {check['ranks_differing_beyond_tie']} of them beyond a "
              f"float64 score tie of {TIE:g}; max |score difference| {check['max_abs_score_diff']:.2e}")
        if not check["ok"]:
            print(f"  first failure: {check['first_failure']}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(args))
