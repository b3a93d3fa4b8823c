#!/usr/bin/env python3
"""The noise samplers compared on Fashion-MNIST: membank train once per sampler and seed, then the table
of the README (final-epoch weighted kNN, mean +- sample std over the seeds with the raw values, the
first epoch at which the mean curve reaches the uniform sampler's final mean, and seconds per epoch).

  /usr/bin/python3 benchmarks/train_sampler_compare.py --membank build/tools/membank \
      --out benchmarks/train_sampler_compare.json [--train-images 20000] [--epochs 10] [--seeds 3]
      [-- extra options for membank train]

Runs the samplers one seed after another, interleaved (uniform, cluster, uniform, ...), so that the
machine's load falls on both alike. Writes every run's JSON (its per-epoch curve) to --out and
prints the table.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile

SAMPLERS = {
    "uniform": [],
    "cluster": ["--sampler", "cluster"],
    "dynamic": ["--sampler", "dynamic"],
    "ring": ["--sampler", "ring", "--allow-biased-sampler"],  # biased hard negatives, ranks [1, N / 10)
}


def run(membank, sampler, seed, args, extra):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [membank, "train", "--seed", str(seed), "--epochs", str(args.epochs), "--snapshot", "", "--json",
               "--out", out.name] + SAMPLERS[sampler] + extra
        if args.train_images:
            cmd += ["--train-images", str(args.train_images)]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out.name) as f:
            return json.load(f)


def curve(result):
    """The memory kNN top-1 of epochs 1..E, in percent."""
    return [100.0 * e["knn_top1"] for e in result["epochs"][1:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--membank", default="build/tools/membank")
    p.add_argument("--out", required=True)
    p.add_argument("--train-images", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--add-to", help="an earlier --out of this script: its runs are kept and these added (the table "
                   "lists them all, the first of them the baseline)")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    samplers = args.samplers.split(",")
    runs = {s: [] for s in samplers}
    if args.add_to:
        with open(args.add_to) as f:
            earlier = json.load(f)["runs"]
        runs = {**earlier, **runs}
    for seed in range(1, args.seeds + 1):
        for s in samplers:
            runs[s].append(run(args.membank, s, seed, args, extra))
    samplers = list(runs)
    with open(args.out, "w") as f:
        json.dump({"epochs": args.epochs, "train_images": args.train_images, "extra": extra, "runs": runs}, f, indent=1)

    base = statistics.mean(curve(r)[-1] for r in runs[samplers[0]])
    print(f"final-epoch weighted kNN top-1 (k = 200), mean +- sample std over {args.seeds} seeds, raw values in brackets;"
          f" epochs to reach {samplers[0]}'s final mean {base:.2f}% (first epoch whose mean over the seeds reaches it);"
          " training seconds per epoch (mean; kNN evaluation not counted)")
    for s in samplers:
        finals = [curve(r)[-1] for r in runs[s]]
        mean_curve = [statistics.mean(c) for c in zip(*(curve(r) for r in runs[s]))]
        reach = next((i + 1 for i, v in enumerate(mean_curve) if v >= base), None)
        secs = statistics.mean(r["seconds_per_epoch"] for r in runs[s])
        std = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        raw = ", ".join(f"{v:.2f}" for v in finals)
        reach_s = f"{reach} of {args.epochs}" if reach else f"not within {args.epochs}"
        print(f"  {s:10s} kNN {statistics.mean(finals):.2f} +- {std:.2f}% [{raw}]  reaches {base:.2f}% at epoch "
              f"{reach_s}  {secs:.1f} s/epoch  mean curve " + " ".join(f"{v:.2f}" for v in mean_curve))


if __name__ == "__main__":
    main()
