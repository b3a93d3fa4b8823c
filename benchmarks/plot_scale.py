#!/usr/bin/python3
"""Charts of a `membank bench scale` sweep, written beside its JSON lines.

    /usr/bin/python3 benchmarks/plot_scale.py benchmarks/scale.jsonl [--markdown]

reads the JSON lines (records "config", "crossover", "stream", "skipped") and writes, next to the
file, <stem>_vs_n.png (log-log step time against N: NCE flat, full softmax linear with its fit and
the crossover N marked), <stem>_vs_k.png, <stem>_vs_threads.png, <stem>_vs_batch_dim.png and
<stem>_memory.png (peak RSS over N x D x 4 bytes). A series absent from the file is left out.
With --markdown it also prints the configuration rows and summaries as Markdown tables (for the README).
Needs Debian's python3-matplotlib (no pip).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NCE_STYLES = {
    ("per-sample", "uniform"): ("C0", "o", "NCE per-sample, uniform"),
    ("per-sample", "alias"): ("C1", "s", "NCE per-sample, alias"),
    ("shared", "uniform"): ("C2", "^", "NCE shared, uniform"),
    ("shared", "alias"): ("C4", "v", "NCE shared, alias"),
}


def load(path):
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    return recs


def configs(recs, series, **match):
    out = [r for r in recs if r.get("record") == "config" and r.get("series") == series]
    for k, v in match.items():
        out = [r for r in out if r.get(k) == v]
    return out


def title_suffix(rows):
    if not rows:
        return ""
    r = rows[0]
    return f"\n{r.get('cpu', '?')}, {r.get('hw_threads', '?')} hw threads, {r.get('build', '?')}, git {r.get('git', '?')}"


def errbars(rows, key="step_ms"):
    y = [r[key] for r in rows]
    lo = [r[key] - r["step_min_ms"] for r in rows] if key == "step_ms" else None
    hi = [r["step_max_ms"] - r[key] for r in rows] if key == "step_ms" else None
    return y, (None if lo is None else [lo, hi])


NEG_COLORS = (("per-sample", "C0"), ("shared", "C2"))


def nce_errorbar(ax, rows, key, neg, color):
    """Draws the rows with negatives `neg`: step time (median; bars: min..max) against r[key].
    Returns those rows sorted by key (empty: nothing drawn)."""
    rs = sorted((r for r in rows if r["negatives"] == neg), key=lambda r: r[key])
    if rs:
        y, e = errbars(rs)
        ax.errorbar([r[key] for r in rs], y, yerr=e, color=color, marker="o", label=f"NCE {neg}", capsize=2)
    return rs


def plot_vs_n(recs, stem):
    rows = configs(recs, "n")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 6))
    d = rows[0]["dim"]
    k = next((r["k"] for r in rows if r["objective"] != "full"), None)
    b = rows[0]["batch"]
    for (neg, smp), (color, marker, lab) in NCE_STYLES.items():
        rs = sorted((r for r in rows if r["objective"] == "nce" and r["negatives"] == neg and r["sampler"] == smp),
                    key=lambda r: r["n"])
        if not rs:
            continue
        y, e = errbars(rs)
        ax.errorbar([r["n"] for r in rs], y, yerr=e, color=color, marker=marker, label=lab, capsize=2)
        if (neg, smp) == ("per-sample", "uniform"):
            ax.plot([r["n"] for r in rs], [r["floor_ms"] for r in rs], color=color, ls=":", marker=".",
                    label="gather floor B x (K+1) rows (same run)")
    far = sorted(configs(recs, "far"), key=lambda r: r["n"])
    if far:
        ax.plot([r["n"] for r in far], [r["step_ms"] for r in far], color="C0", marker="D", ls="none", mfc="none",
                label=f"NCE per-sample, uniform, D = {far[0]['dim']}")
    full = sorted((r for r in rows if r["objective"] == "full"), key=lambda r: r["n"])
    if full:
        y, e = errbars(full)
        ax.errorbar([r["n"] for r in full], y, yerr=e, color="C3", marker="x", label="full softmax (measured)",
                    capsize=2)
    cross = [c for c in recs if c.get("record") == "crossover"]
    if cross:
        c0 = cross[0]
        a, bslope = c0["full_fit_intercept_ms"], c0["full_fit_ms_per_million_rows"] * 1e-6
        nmax = max(r["n"] for r in rows + far)
        nmin = min(r["n"] for r in rows)
        xs_in = [nmin * (c0["full_max_n"] / nmin) ** (i / 40) for i in range(41)]
        xs_out = [c0["full_max_n"] * (nmax / c0["full_max_n"]) ** (i / 40) for i in range(41)]
        ax.plot(xs_in, [a + bslope * x for x in xs_in], color="C3", ls="--", lw=1,
                label=f"full softmax fit: {a:.1f} ms + {c0['full_fit_ms_per_million_rows']:.0f} ms per 10^6 rows "
                      f"(log-log slope {c0['full_loglog_slope']:.2f})")
        if nmax > c0["full_max_n"]:
            ax.plot(xs_out, [a + bslope * x for x in xs_out], color="C3", ls=":", lw=1,
                    label="full softmax fit, extrapolated (not run)")
        for c in cross:
            if (c["negatives"], c["sampler"]) != ("per-sample", "uniform") or c.get("crossover_n") is None:
                continue
            ax.axvline(c["crossover_n"], color="k", lw=0.8, ls="-.")
            ax.text(c["crossover_n"] * 1.08, 0.03,
                    f"NCE cheaper than full softmax\nfrom N = {c['crossover_n']:.3g}"
                    + (" (extrapolated)" if c["extrapolated"] else ""),
                    transform=ax.get_xaxis_transform(), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (bank rows)")
    ax.set_ylabel("step time, ms (median; bars: min..max)")
    ax.set_title(f"membank step time against dataset size N (D = {d}, K = {k}, B = {b})" + title_suffix(rows),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", framealpha=0.85)
    return save(fig, stem, "vs_n")


def plot_vs_k(recs, stem):
    rows = configs(recs, "k")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for neg, color in NEG_COLORS:
        nce_errorbar(ax, rows, "k", neg, color)
    rs = sorted((r for r in rows if r["negatives"] == "per-sample"), key=lambda r: r["k"]) or sorted(rows, key=lambda r: r["k"])
    ax.plot([r["k"] for r in rs], [r["floor_ms"] for r in rs], color="k", ls=":", marker=".",
            label="gather floor B x (K+1) rows (same run)")
    r0 = rows[0]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (negatives per query)")
    ax.set_ylabel("step time, ms")
    ax.set_title(f"step time against K (N = {r0['n']}, D = {r0['dim']}, B = {r0['batch']}, {r0['threads']} threads)"
                 + title_suffix(rows), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, stem, "vs_k")


def plot_vs_threads(recs, stem):
    rows = configs(recs, "threads")
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for neg, color in NEG_COLORS:
        rs = nce_errorbar(ax1, rows, "threads", neg, color)
        if rs and neg == "per-sample":
            t1 = rs[0]
            ideal = [t1["step_ms"] * t1["threads"] / r["threads"] for r in rs]
            ax1.plot([r["threads"] for r in rs], ideal, color=color, ls=":", label="per-sample, linear scaling")
            ax2.plot([r["threads"] for r in rs], [r["effective_gb_per_s"] for r in rs], color=color, marker="o",
                     label="NCE per-sample: rows read / step time")
            ax2.plot([r["threads"] for r in rs], [r["floor_gb_per_s"] for r in rs], color="k", marker=".", ls=":",
                     label="gather floor (same run)")
            ax2.plot([r["threads"] for r in rs], [r["stream_gb_per_s"] for r in rs], color="C3", marker="s",
                     label="streaming-read ceiling (same run)")
            for r in rs:
                ax2.annotate(f"{100 * r['bandwidth_efficiency']:.0f}%", (r["threads"], r["effective_gb_per_s"]),
                             textcoords="offset points", xytext=(4, 4), fontsize=8)
    r0 = rows[0]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("OpenMP threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("step time, ms")
    ax2.set_ylabel("GB/s")
    ax1.set_title(f"step time against threads (N = {r0['n']}, D = {r0['dim']}, K = {r0['k']}, B = {r0['batch']})",
                  fontsize=10)
    ax2.set_title("effective bandwidth (% = of the streaming ceiling)" + title_suffix(rows), fontsize=10)
    return save(fig, stem, "vs_threads")


def plot_vs_batch_dim(recs, stem):
    rb, rd = configs(recs, "batch"), configs(recs, "dim")
    if not rb and not rd:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for ax, rows, key, name in ((ax1, rb, "batch", "B (queries per step)"), (ax2, rd, "dim", "D (dimension)")):
        for neg, color in NEG_COLORS:
            rs = nce_errorbar(ax, [r for r in rows if r["objective"] == "nce"], key, neg, color)
            if rs and neg == "per-sample":
                ax.plot([r[key] for r in rs], [r["floor_ms"] for r in rs], color="k", ls=":", marker=".",
                        label="gather floor (same run)")
        rs = sorted((r for r in rows if r["objective"] == "full"), key=lambda r: r[key])
        if rs:
            ax.plot([r[key] for r in rs], [r["step_ms"] for r in rs], color="C3", marker="x", label="full softmax")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("step time, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if rows:
            r0 = rows[0]
            ax.set_title(f"against {key} (N = {r0['n']})" + title_suffix(rows), fontsize=10)
    return save(fig, stem, "vs_batch_dim")


def plot_memory(recs, stem):
    rows = sorted(configs(recs, "n") + configs(recs, "far"), key=lambda r: r["n"])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = {}
    for r in rows:
        lab = "full softmax" if r["objective"] == "full" else f"NCE {r['negatives']}, {r['sampler']}"
        groups.setdefault(f"{lab}, D = {r['dim']}", []).append(r)
    for lab, rs in groups.items():
        ax.plot([r["n"] for r in rs], [r["rss_over_bank"] for r in rs], marker="o", label=lab)
    ax.axhline(1.05, color="k", ls="--", lw=0.8, label="1.05 x N D 4 bytes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (bank rows)")
    ax.set_ylabel("peak RSS / (N x D x 4 bytes)")
    ax.set_title("peak resident memory over the bank's size (small N: the process's own baseline)"
                 + title_suffix(rows), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, stem, "memory")


def save(fig, stem, what):
    path = f"{stem}_{what}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(recs):
    print("| series | N | D | K | B | threads | variant | step ms (median) | min | max | floor ms | step / floor "
          "| GB/s | of stream BW | peak RSS / NxDx4 | alias build ms |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in recs:
        if r.get("record") == "skipped":
            print(f"| {r['series']} | {r['n']:,} | {r['dim']} | | | | skipped: {r['reason']} |" + " |" * 9)
        if r.get("record") != "config":
            continue
        full = r["objective"] == "full"
        variant = "full softmax" if full else f"{r['objective'].upper()} {r['negatives']}, {r['sampler']}"
        print(f"| {r['series']} | {r['n']:,} | {r['dim']} | {'-' if full else r['k']} | {r['batch']} | {r['threads']} "
              f"| {variant} | {r['step_ms']:.1f} | {r['step_min_ms']:.1f} | {r['step_max_ms']:.1f} "
              f"| {r['floor_ms']:.1f} | {r['step_over_floor']:.2f} | {r['effective_gb_per_s']:.2f} "
              f"| {100 * r['bandwidth_efficiency']:.0f}% | {r['rss_over_bank']:.3f} | "
              f"{r['alias_build_ms']:.0f} |" if r['sampler'] == 'alias' else
              f"| {r['series']} | {r['n']:,} | {r['dim']} | {'-' if full else r['k']} | {r['batch']} | {r['threads']} "
              f"| {variant} | {r['step_ms']:.1f} | {r['step_min_ms']:.1f} | {r['step_max_ms']:.1f} "
              f"| {r['floor_ms']:.1f} | {r['step_over_floor']:.2f} | {r['effective_gb_per_s']:.2f} "
              f"| {100 * r['bandwidth_efficiency']:.0f}% | {r['rss_over_bank']:.3f} | - |")
    for r in recs:
        if r.get("record") == "stream":
            print(f"\nstreaming-read ceiling, {r['threads']} threads: {r['stream_gb_per_s']:.1f} GB/s"
                  f" ({r['buffer_mb']:.0f} MB buffer)")
        elif r.get("record") == "crossover":
            cn = "none in range" if r.get("crossover_n") is None else f"{r['crossover_n']:.3g}"
            print(f"\ncrossover, NCE {r['negatives']} {r['sampler']}: N = {cn}"
                  f"{' (extrapolated)' if r['extrapolated'] else ''} -- {r['method']}")


def main(argv):
    md = "--markdown" in argv
    argv = [a for a in argv if a != "--markdown"]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    recs = load(argv[1])
    if not any(r.get("record") == "config" for r in recs):
        print(f"{argv[1]}: no configuration rows", file=sys.stderr)
        return 1
    stem = os.path.splitext(argv[1])[0]
    for fn in (plot_vs_n, plot_vs_k, plot_vs_threads, plot_vs_batch_dim, plot_memory):
        path = fn(recs, stem)
        if path:
            print(path)
    if md:
        markdown(recs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
