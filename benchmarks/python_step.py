#!/usr/bin/python3
"""One NCE training step, four ways, in one process with one thread count:

  cpp        membank.time_steps: the engine's step in a C++ loop (no Python between steps)
  python     engine.step(features, ids) called from Python with numpy arrays
  torch      membank.torch: NCEAverage + NCECriterion forward + loss.backward() (dL/dx) with torch tensors
  reference  plain PyTorch NCEAverage + NCECriterion on the CPU (the formulas of lemniscate.pytorch,
             written here): gather the B x (K+1) rows, exp(bmm / T) / Z, NCE loss, backward
             (gradOut * out / T) bmm weight, momentum update of the memory with renormalisation

Before timing, the reference and membank are checked to agree on one batch (same negatives, same Z).
Prints one JSON object (ratios included). Defaults: N = 1,281,167, D = 128, K = 4096, B = 256.

    OMP_NUM_THREADS=2 PYTHONPATH=build/python /usr/bin/python3 benchmarks/python_step.py --threads 2
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import membank as mb
from membank.torch import NCEAverage, NCECriterion


class RefNCEFunction(torch.autograd.Function):
    """The reference's NCEFunction: probabilities in forward, dL/dx and the memory refresh in backward."""

    @staticmethod
    def forward(ctx, x, y, memory, idx, params):
        k, t, z, m = int(params[0]), float(params[1]), float(params[2]), float(params[3])
        b, d = x.shape
        idx[:, 0] = y
        weight = torch.index_select(memory, 0, idx.view(-1)).view(b, k + 1, d)
        out = torch.exp(torch.bmm(weight, x.view(b, d, 1)).view(b, k + 1) / t)
        if z < 0:
            z = out.mean().item() * memory.shape[0]
            params[2] = z
        out = out / z
        ctx.save_for_backward(x, memory, y, weight, out, params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, memory, y, weight, out, params = ctx.saved_tensors
        t, m = float(params[1]), float(params[3])
        b, d = x.shape
        g = grad_out * out / t
        grad_x = torch.bmm(g.view(b, 1, -1), weight).view(b, d)
        w = torch.index_select(memory, 0, y) * m + x * (1 - m)
        memory.index_copy_(0, y, w / w.norm(dim=1, keepdim=True))
        return grad_x, None, None, None, None


class RefNCEAverage(torch.nn.Module):
    def __init__(self, d, n, k, t=0.07, m=0.5, memory=None):
        super().__init__()
        self.n, self.k = n, k
        self.params = torch.tensor([k, t, -1.0, m], dtype=torch.float64)
        self.memory = memory

    def forward(self, x, y, idx=None):
        if idx is None:
            idx = torch.randint(0, self.n, (x.shape[0], self.k + 1))
        return RefNCEFunction.apply(x, y, self.memory, idx, self.params)


def ref_criterion(out, n, eps=1e-7):
    """NCECriterion (P_n = 1/N); the original adds eps = 1e-7 to its denominators (0 for the agreement check)."""
    b, k = out.shape[0], out.shape[1] - 1
    kpn = k / n
    ln_pos = torch.log(out[:, 0] / (out[:, 0] + kpn + eps))
    ln_neg = torch.log(kpn / (out[:, 1:] + kpn + eps))
    return -(ln_pos.sum() + ln_neg.sum()) / b


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1281167)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=15, help="timed steps of each membank variant")
    ap.add_argument("--ref-repeats", type=int, default=5, help="timed steps of the reference")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    mb.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    print(f"building a {a.n} x {a.dim} bank ...", file=sys.stderr)
    lem = NCEAverage(a.dim, a.n, a.k, 0.07, 0.5, seed=a.seed)
    crit = NCECriterion(a.n)
    engine = lem.engine
    # the reference's memory: its own copy of the same rows (contiguous, as its buffer is)
    ref = RefNCEAverage(a.dim, a.n, a.k, 0.07, 0.5, memory=lem.memory.clone())

    def batch():
        return unit_rows(rng, a.batch, a.dim), rng.choice(a.n, a.batch, replace=False).astype(np.int64)

    # ---- agreement on one batch: same negatives, same Z, same pre-update rows
    f, ids = batch()
    neg = engine.sample(ids)
    x = torch.from_numpy(f).requires_grad_(True)
    loss = crit(lem(x, torch.from_numpy(ids), torch.from_numpy(neg)), None)
    loss.backward()
    ref.params[2] = engine.z
    xr = torch.from_numpy(f).requires_grad_(True)
    idx = torch.cat([torch.from_numpy(ids)[:, None], torch.from_numpy(neg)], dim=1)
    rl = ref_criterion(ref(xr, torch.from_numpy(ids), idx), a.n, eps=0.0)
    rl.backward()
    rel_loss = abs(loss.item() - rl.item()) / abs(rl.item())
    rel_grad = ((x.grad - xr.grad).abs().max() / xr.grad.abs().max()).item()
    rel_bank = (lem.memory - ref.memory).abs().max().item()
    if rel_loss > 1e-4 or rel_grad > 1e-4 or rel_bank > 1e-5:
        sys.exit(f"membank and the reference disagree: loss {rel_loss:.3g}, grad {rel_grad:.3g}, bank {rel_bank:.3g}")
    ref.params[2] = -1.0  # the timed reference estimates its own Z on its first batch, as the original

    # ---- timing, interleaved step by step (the machine is shared and noisy: every variant sees the same
    # load); the reference, ~30x slower, runs once every `every` rounds.
    times = {"cpp": [], "python": [], "torch": [], "reference": []}
    every = max(1, a.repeats // max(1, a.ref_repeats))
    for r in range(a.repeats + 1):
        f, ids = batch()
        t = mb.time_steps(engine, f[None], ids[None])[0]
        f, ids = batch()
        t0 = time.perf_counter()
        engine.step(f, ids)
        t1 = time.perf_counter()
        f, ids = batch()
        x, y = torch.from_numpy(f).requires_grad_(True), torch.from_numpy(ids)
        t2 = time.perf_counter()
        loss = crit(lem(x, y), y)
        loss.backward()
        t3 = time.perf_counter()
        if r:  # the first round is a warm-up
            times["cpp"].append(t)
            times["python"].append((t1 - t0) * 1e3)
            times["torch"].append((t3 - t2) * 1e3)
        if r % every == 0 and len(times["reference"]) < a.ref_repeats:
            f, ids = batch()
            x, y = torch.from_numpy(f).requires_grad_(True), torch.from_numpy(ids)
            t0 = time.perf_counter()
            loss = ref_criterion(ref(x, y), a.n)
            loss.backward()
            t1 = time.perf_counter()
            if r:
                times["reference"].append((t1 - t0) * 1e3)

    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "bench": "python_step", "n": a.n, "dim": a.dim, "k": a.k, "batch": a.batch,
        "threads": {"requested": a.threads, "membank": mb.get_num_threads(), "torch": torch.get_num_threads()},
        "median_ms": med, "min_ms": {k: min(v) for k, v in times.items()},
        "repeats": {k: len(v) for k, v in times.items()},
        "python_over_cpp": med["python"] / med["cpp"],
        "torch_over_cpp": med["torch"] / med["cpp"],
        "reference_over_torch": med["reference"] / med["torch"],
        "reference_over_python": med["reference"] / med["python"],
        "agreement": {"loss_rel": rel_loss, "grad_rel": rel_grad, "bank_abs": rel_bank},
        "torch_version": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
        next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
