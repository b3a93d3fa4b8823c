"""membank.DynamicSampler in a DistributedEngine from Python, under mpirun (CTest runs it at np = 2):
caller-set weights through the collective set_sampler_weights before every step, a snapshot saved
mid-run (a shard set when sharded) and loaded in the same mode continuing bit for bit (losses and the
sampler's weights), in both modes; an update that differs on one rank raises on every rank.

Exits 77 (skipped) without mpi4py or a membank built with MPI."""
import os
import shutil
import tempfile

import numpy as np

from mpi_harness import R, RANK, check, comm, mb, run, total_checks  # noqa: E402  (skips without MPI)

N, DIM, B_R = 500, 16, 4


def batch(s):
    """This rank's slice of the global batch of step s: (features, ids)."""
    g = np.random.default_rng(100 + s)
    ids = g.choice(N, B_R * R, replace=False).astype(np.int64)
    f = g.standard_normal((B_R * R, DIM))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    mine = slice(B_R * RANK, B_R * (RANK + 1))
    return f[mine].astype(np.float32), ids[mine]


def change(s):
    """The weight change before step s (the same on every rank)."""
    g = np.random.default_rng(200 + s)
    return g.choice(N, 20).astype(np.int64), g.uniform(0.1, 3.0, 20)


def main():
    w = np.linspace(0.5, 2.0, N)
    d = tempfile.mkdtemp() if RANK == 0 else None
    d = comm.bcast(d)
    for mode in ("replicated", "sharded"):
        e = mb.Engine(mb.Bank(N, DIM, seed=3), mb.DynamicSampler(w), k=16, comm=comm, distributed=mode)
        path = os.path.join(d, f"{mode}.h5")
        losses, resumed = [], None
        for s in range(6):
            e.set_sampler_weights(*change(s))
            if s == 3:
                mb.save_snapshot(path, e)
                resumed = mb.load_snapshot(path, comm=comm, distributed=mode)
            losses.append(e.step(*batch(s))[0])
        got = []
        for s in range(3, 6):
            if s > 3:
                resumed.set_sampler_weights(*change(s))
            got.append(resumed.step(*batch(s))[0])
        check(got == losses[3:], f"{mode}: the resumed run's losses {got} against {losses[3:]}")
        check(np.array_equal(resumed.sampler.weights, e.sampler.weights), f"{mode}: the sampler's weights")
        ids, vals = change(9)
        if RANK == R - 1 and R > 1:
            vals = vals.copy()
            vals[0] += 1.0
        before = e.sampler.weights
        try:
            e.set_sampler_weights(ids, vals)
            raised = R == 1
        except mb.Error as err:
            raised = f"rank {R - 1}" in str(err)
        check(raised, f"{mode}: an update differing on rank {R - 1} raises naming it")
        check(R == 1 or np.array_equal(e.sampler.weights, before), f"{mode}: the refused update changed nothing")
    n = total_checks()
    comm.barrier()
    if RANK == 0:
        shutil.rmtree(d, ignore_errors=True)
        print(f"dynamic sampler under MPI: {n} checks on {R} ranks passed")


run(main)
