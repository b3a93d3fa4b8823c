"""Snapshots of a membank.DistributedEngine from Python, under mpirun (CTest runs it at np = 2; any
np >= 1 works). Guards the bindings of save_distributed_snapshot / load_distributed_snapshot:

  * resume: a sharded engine trains S1 steps, membank.save_snapshot(path, engine) writes a shard set,
    membank.load_snapshot(path, comm=, distributed=) loads it in both modes and the run continues S2
    steps: the bank (gather_bank), the last-update steps, the step counter and the losses and dL/df rows
    equal an uninterrupted run bit for bit (InfoNCE, and float16 storage; NCE too, its loss within
    1e-12 relative: Z's sum may round differently in another mode);
  * a replicated engine's snapshot (one ordinary file) loads sharded and continues the same way;
  * h5py reads the master's virtual datasets bank and last_update equal to gather_bank /
    gather_last_update, and labels equal to the engine's (load_snapshot(..., return_labels=True) too);
    membank.load_snapshot(master) in one process (rank 0) is an Engine holding the same bank and state;
  * errors raise on every rank, each a membank.Error (or the rank's own TypeError), and no rank hangs:
    a directory that does not exist (save and load), a path that differs between ranks, a non-str path on
    one rank, labels= (a DistributedEngine saves its own), distributed= without comm=.

Any failure aborts the whole job (MPI_Abort) with the rank's traceback: no rank hangs in a collective.
Exits 77 (skipped) without mpi4py, or a membank built without MPI. Without h5py its reads are skipped."""
import os
import shutil
import tempfile

import numpy as np

from mpi_harness import R, RANK, check, comm, mb, run, total_checks  # noqa: E402  (skips without MPI)

try:
    import h5py
except ImportError:
    h5py = None

N, DIM, K, B = 53, 8, 10, 2 * R + 3  # N, B not multiples of R: uneven shards and slices
S1, S2 = 3, 3


def slices(b, ranks):
    """Uneven slices of a global batch of b rows: the first b mod R ranks one row more."""
    sizes = [b // ranks + (1 if r < b % ranks else 0) for r in range(ranks)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[r]), int(starts[r + 1])) for r in range(ranks)]


MINE = slices(B, R)[RANK]


def batch(step):
    """The global batch of a step, the same on every rank: unit float32 rows, int64 ids."""
    rng = np.random.default_rng(1000 + step)
    f = rng.standard_normal((B, DIM)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f, rng.permutation(N)[:B].astype(np.int64)


def step(engine, s):
    f, ids = batch(s)
    loss, grad, _ = engine.step(np.ascontiguousarray(f[MINE]), ids[MINE].copy())
    return loss, grad.copy()


def same_loss(a, b, objective):
    if objective == "nce":
        return abs(a - b) <= 1e-12 * abs(b)
    return a == b


def raises_everywhere(what, call, expect=mb.Error, text=None):
    """call() must raise on this rank (an `expect`); every rank must get there (no hang)."""
    try:
        call()
    except expect as e:
        check(text is None or text in str(e), f"{what}: {type(e).__name__}: {e}")
    except BaseException as e:  # noqa: B902
        check(False, f"{what}: raised {type(e).__name__}: {e}, expected {expect.__name__}")
    else:
        check(False, f"{what}: was accepted")
    comm.Barrier()


def labels_for(n):
    return (np.arange(n, dtype=np.int64) * 5) % 7


def make(mode, objective, dtype):
    e = mb.Engine(mb.Bank(N, DIM, seed=3, dtype=dtype), k=K, tau=0.1, seed=11, objective=objective, comm=comm,
                  distributed=mode)
    e.set_labels(labels_for(N))
    return e


def check_h5(path, engine, at):
    """The file (a master's virtual datasets, or a single file) read by h5py equals the engine's state."""
    bank, last = engine.gather_bank(0), engine.gather_last_update(0)
    if RANK != 0 or h5py is None:
        return
    with h5py.File(path, "r") as h:
        rows = h["bank"][...]
        if engine.dtype == "float32":
            check(rows.dtype == np.float32 and np.array_equal(rows, bank), f"{at}: h5py's bank != gather_bank")
        elif engine.dtype == "float16":
            check(rows.dtype == np.float16 and np.array_equal(rows.astype(np.float32), bank),
                  f"{at}: h5py's float16 bank != gather_bank")
        check(np.array_equal(h["last_update"][...], last), f"{at}: h5py's last_update != gather_last_update")
        check(np.array_equal(h["labels"][...], labels_for(N)), f"{at}: h5py's labels")
        if engine.mode == "sharded" and R > 1:
            check(h["bank"].is_virtual and int(h.attrs["shards"]) == R, f"{at}: not a shard set of {R} files")


def test_resume(objective, dtype, saved_mode, directory):
    """Train S1 steps in saved_mode, save, load in both modes, continue S2: equal to the uninterrupted run."""
    tag = f"{objective} {dtype} saved {saved_mode}"
    path = os.path.join(directory, f"{objective}_{dtype}_{saved_mode}.h5")
    # the uninterrupted runs, one per mode (a mode's losses may differ from the other's in the last bits)
    reference = {}
    for mode in ("sharded", "replicated"):
        e = make(mode, objective, dtype)
        reference[mode] = [step(e, s) for s in range(S1 + S2)]
        reference[mode + " bank"] = e.gather_bank(0)
        reference[mode + " last"] = e.gather_last_update(0)
    # interrupted: S1 steps, save, load
    e = make(saved_mode, objective, dtype)
    for s in range(S1):
        loss, grad = step(e, s)
        check(loss == reference[saved_mode][s][0] and np.array_equal(grad, reference[saved_mode][s][1]),
              f"{tag}: step {s} before the save")
    mb.save_snapshot(path, e, deflate_level=1 if dtype == "float16" else 0)
    check_h5(path, e, tag)
    saved_bank, saved_last = e.gather_bank(0), e.gather_last_update(0)
    if RANK == 0:
        one, labels = mb.load_snapshot(path, return_labels=True)  # one process reads a master too
        check(type(one) is mb.Engine and one.steps_done == S1, f"{tag}: load_snapshot(path) in one process")
        check(np.array_equal(one.bank.to_float32(), saved_bank), f"{tag}: the single-process load's bank")
        check(np.array_equal(labels, labels_for(N)), f"{tag}: the single-process load's labels")
    for mode in ("sharded", "replicated"):
        at = f"{tag}, loaded {mode}"
        d, labels = mb.load_snapshot(path, return_labels=True, comm=comm, distributed=mode)
        check(isinstance(d, mb.DistributedEngine) and d.mode == mode and d.ranks == R, f"{at}: {d!r}")
        check(d.steps_done == S1 and d.n == N and d.dim == DIM and d.dtype == dtype, f"{at}: {d!r}")
        check(np.array_equal(labels, labels_for(N)) and np.array_equal(d.labels, labels_for(N)), f"{at}: labels")
        check(d.config == e.config, f"{at}: config {d.config} != {e.config}")
        loaded_bank, loaded_last = d.gather_bank(0), d.gather_last_update(0)
        if RANK == 0:
            check(np.array_equal(loaded_bank, saved_bank) and np.array_equal(loaded_last, saved_last),
                  f"{at}: the loaded bank / last-update steps")
        for s in range(S1, S1 + S2):
            loss, grad = step(d, s)
            ref_loss, ref_grad = reference[mode][s]
            check(same_loss(loss, ref_loss, objective), f"{at}: step {s}: loss {loss!r} != {ref_loss!r}")
            if objective != "nce":
                check(np.array_equal(grad, ref_grad), f"{at}: step {s}: dL/df rows differ")
        bank, last = d.gather_bank(0), d.gather_last_update(0)
        if RANK == 0:
            check(np.array_equal(bank, reference[mode + " bank"]), f"{at}: the bank after {S1 + S2} steps")
            check(np.array_equal(last, reference[mode + " last"]), f"{at}: last_update after {S1 + S2} steps")
        check(d.steps_done == S1 + S2, f"{at}: steps_done {d.steps_done}")
    # the continued engine saved over the same path: the new set (or file) replaces the old one
    mb.save_snapshot(path, d)
    check_h5(path, d, tag + ", saved again")
    again = mb.load_snapshot(path, comm=comm, distributed="sharded")
    check(again.steps_done == S1 + S2, f"{tag}: saved again: steps_done {again.steps_done}")
    if RANK == 0:
        shards = [f for f in os.listdir(directory) if f.startswith(os.path.basename(path) + ".g")]
        check(len(shards) == (R if d.mode == "sharded" else 0), f"{tag}: saved again: shard files {shards}")
    comm.Barrier()


def test_errors(directory):
    e = make("sharded", "infonce", "float32")
    step(e, 0)
    missing = os.path.join(directory, "no-such-dir", "x.h5")
    raises_everywhere("save into a directory that does not exist", lambda: mb.save_snapshot(missing, e))
    raises_everywhere("load a file that does not exist",
                      lambda: mb.load_snapshot(missing, comm=comm, distributed="sharded"))
    raises_everywhere("load a file that does not exist, replicated", lambda: mb.load_snapshot(missing, comm=comm))
    if R > 1:
        # a path that differs between ranks: rank R-1 names another file
        mine = os.path.join(directory, "r.h5" if RANK != R - 1 else "other.h5")
        raises_everywhere("save with a different path on one rank", lambda: mb.save_snapshot(mine, e), text="path")
        raises_everywhere("load with a different path on one rank",
                          lambda: mb.load_snapshot(mine, comm=comm, distributed="sharded"), text="path")
        # a non-str path on the last rank: its TypeError there, membank.Error naming it elsewhere
        bad = 3 if RANK == R - 1 else os.path.join(directory, "t.h5")
        raises_everywhere("a non-str path on one rank", lambda: mb.save_snapshot(bad, e),
                          TypeError if RANK == R - 1 else mb.Error, "path" if RANK == R - 1 else f"rank {R - 1}")
        raises_everywhere("a bad mode on one rank",
                          lambda: mb.load_snapshot(missing, comm=comm, distributed="spread" if RANK == 0 else "sharded"),
                          mb.Error)
    raises_everywhere("labels= with a DistributedEngine",
                      lambda: mb.save_snapshot(os.path.join(directory, "l.h5"), e, labels=labels_for(N)),
                      text="set_labels")
    raises_everywhere("deflate_level out of range",
                      lambda: mb.save_snapshot(os.path.join(directory, "d.h5"), e, deflate_level=12), text="deflate")
    raises_everywhere("distributed= without comm=", lambda: mb.load_snapshot(missing, distributed="sharded"),
                      text="needs comm=")
    for name in ("r.h5", "other.h5", "t.h5", "l.h5", "d.h5"):
        check(not os.path.exists(os.path.join(directory, name)), f"a refused save left {name}")
    # the engine is intact and still saves
    good = os.path.join(directory, "after_errors.h5")
    mb.save_snapshot(good, e)
    d = mb.load_snapshot(good, comm=comm, distributed="sharded")
    check(d.steps_done == 1, "the save after the errors")
    comm.Barrier()


def main():
    directory = comm.bcast(tempfile.mkdtemp(prefix="membank_dsnap_") if RANK == 0 else None, root=0)
    try:
        for args in (("infonce", "float32", "sharded"), ("nce", "float32", "sharded"),
                     ("infonce", "float16", "sharded"), ("infonce", "float32", "replicated")):
            test_resume(*args, directory)
            if RANK == 0:
                print(f"resume {' '.join(args)}: ok", flush=True)
        test_errors(directory)
        if RANK == 0:
            print("errors: ok", flush=True)
    finally:
        comm.Barrier()
        if RANK == 0:
            shutil.rmtree(directory, ignore_errors=True)
    total = total_checks()
    if RANK == 0:
        print(f"ok: {total} checks on {R} ranks" + ("" if h5py else " (h5py not installed: its reads skipped)"))


if __name__ == "__main__":
    run(main)
