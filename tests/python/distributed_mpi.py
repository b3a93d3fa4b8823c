"""membank.DistributedEngine and membank.torch with torch DistributedDataParallel, under mpirun (CTest
runs it at np = 2; any np >= 1 works). Every rank computes the single-process reference itself -- a
membank.Engine over the same bank, stepping on the whole global batch -- and checks its own slice of the
distributed result against it:

  * loss and this rank's rows of dL/df within 1e-6 relative, StepStats the same on every rank, and the
    bank identical to the reference's after every step (gathered on rank 0, and each rank's own rows),
    in both modes, over objectives, samplers, storage types, negatives modes, uneven slices and ids
    that repeat within and across ranks, with drawn and with caller negatives;
  * the query-dependent samplers (cluster, ring) in both modes;
  * DistributedEngine.seeded holds the rows of Bank(n, dim, seed, dtype), each rank only its own;
  * an argument refused on one rank raises on every rank (naming that rank), changes nothing, and the
    next step still agrees with the reference: no rank is left waiting;
  * DistributedEngine.knn_search in both modes, uneven Q_r (0 included), k beyond a shard: each rank's
    results equal bit for bit to membank.knn_search on the same bank for all ranks' queries concatenated; exact ties
    (smaller global id first) across shards; a k that differs between ranks, or one refused on a single
    rank, raises on every rank; a SIGINT on rank 0 mid-call is its KeyboardInterrupt and membank.Error
    (cancelled on another rank) elsewhere, and the engine then searches as before;
  * membank.torch in a DDP loop (gloo, initialised from the MPI ranks): after DDP averages the ranks'
    parameter gradients, they equal the single-process gradient of the global batch -- the factor R of
    grad_scale -- and grad_scale=1 gives 1/R of it.

Any failure aborts the whole job (MPI_Abort) with the rank's traceback: no rank hangs in a collective.
Exits 77 (skipped) without mpi4py, torch, or a membank built with MPI."""
import copy
import os
import signal
import socket
import threading
import time

import numpy as np

from mpi_harness import R, RANK, check, comm, mb, run, total_checks  # noqa: E402  (skips without MPI)


def rel(a, b):
    """max |a - b| / max |b| (0 / 0 = 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.abs(b).max() if b.size else 0.0
    num = np.abs(a - b).max() if a.size else 0.0
    return num if den == 0 else num / den


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def slices(b, ranks):
    """Uneven slices of a global batch of b rows: the first b mod R ranks one row more."""
    sizes = [b // ranks + (1 if r < b % ranks else 0) for r in range(ranks)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[r]), int(starts[r + 1])) for r in range(ranks)]


def shard_rows(n, ranks, r):
    base, extra = divmod(n, ranks)
    begin = r * base + min(r, extra)
    return begin, begin + base + (1 if r < extra else 0)


N, DIM, K = 61, 16, 12


def sampler_for(kind):
    if kind == "uniform":
        return None
    return mb.AliasSampler(1.0 + (np.arange(N) * 7 % 11).astype(np.float64))


def test_steps_equal_single_process():
    """Loss, dL/df rows, StepStats and bank against the single-process Engine on the global batch."""
    configs = [
        dict(objective="nce", negatives="per-sample", sampler="uniform", dtype="float32"),
        dict(objective="infonce", negatives="shared", sampler="alias", dtype="float16"),
        dict(objective="dcl", negatives="per-sample", sampler="alias", dtype="bfloat16", exclude_positive=True),
        dict(objective="full", negatives="per-sample", sampler="uniform", dtype="float32"),
        dict(objective="nce", negatives="per-sample", sampler="uniform", dtype="float32", z_policy="ema",
             caller_negatives=True),
    ]
    b = 2 * R + 3  # uneven slices whenever R > 1
    mine = slices(b, R)[RANK]
    for mode in ("replicated", "sharded"):
        for c in configs:
            c = dict(c)
            sampler, dtype = c.pop("sampler"), c.pop("dtype")
            caller_negatives = c.pop("caller_negatives", False)
            opts = dict(k=K, tau=0.1, momentum=0.5, seed=11, **c)
            ref = mb.Engine(mb.Bank(N, DIM, seed=3, dtype=dtype), sampler_for(sampler), **opts)
            eng = mb.Engine(mb.Bank(N, DIM, seed=3, dtype=dtype), sampler_for(sampler), comm=comm, distributed=mode,
                            **opts)
            what = f"{mode} {c} {sampler} {dtype}{' caller negatives' if caller_negatives else ''}"
            check(isinstance(eng, mb.DistributedEngine) and eng.mode == mode and eng.ranks == R and eng.rank == RANK,
                  f"{what}: {eng!r}")
            check(eng.config == ref.config, f"{what}: config {eng.config} != {ref.config}")
            begin, end = eng.rows
            check((begin, end) == ((0, N) if mode == "replicated" else shard_rows(N, R, RANK)), f"{what}: rows")
            rng = np.random.default_rng(5)  # the same global batches on every rank
            for step in range(3):
                f = unit_rows(rng, b, DIM)
                ids = rng.integers(0, N, b)
                ids[-1] = ids[0]  # a duplicate id, across ranks when R > 1
                ids[1] = ids[0] if b > 2 else ids[1]
                if caller_negatives:
                    neg = rng.integers(0, N, (b, K))
                    lr, gr, sr = ref.step_with_negatives(f, ids, neg)
                    ld, gd, sd = eng.step_with_negatives(np.ascontiguousarray(f[mine]), ids[mine].copy(),
                                                         np.ascontiguousarray(neg[mine]))
                else:
                    lr, gr, sr = ref.step(f, ids)
                    ld, gd, sd = eng.step(np.ascontiguousarray(f[mine]), ids[mine].copy())
                at = f"{what} step {step}"
                check(abs(ld - lr) <= 1e-6 * abs(lr), f"{at}: loss {ld} != {lr}")
                check(gd.shape == (mine.stop - mine.start, DIM), f"{at}: grad shape {gd.shape}")
                check(rel(gd, gr[mine]) <= 1e-6, f"{at}: dL/df rows differ by {rel(gd, gr[mine])}")
                check(sd.step == sr.step == step and eng.steps_done == ref.steps_done, f"{at}: step counter")
                for name in ("z", "z_estimate", "mean_p_positive"):
                    a, r = getattr(sd, name), getattr(sr, name)
                    check((np.isnan(a) and np.isnan(r)) or abs(a - r) <= 1e-6 * abs(r), f"{at}: {name} {a} != {r}")
                stats = comm.allgather(np.array([sd.loss, sd.z, sd.z_estimate, sd.mean_p_positive,
                                                 sd.negative_collision_fraction, sd.mi_lower_bound]).tobytes())
                check(all(s == stats[0] for s in stats), f"{at}: StepStats differ between ranks (bit for bit)")
                rows = ref.bank.to_float32()
                check(np.array_equal(eng.local_bank.to_float32(), rows[begin:end]), f"{at}: this rank's rows")
                check(np.array_equal(eng.local_bank.last_update(), ref.bank.last_update()[begin:end]),
                      f"{at}: this rank's last-update steps")
                whole = eng.gather_bank(0)
                check((whole is None) == (RANK != 0), f"{at}: gather_bank on rank {RANK}")
                if RANK == 0:
                    check(np.array_equal(whole, rows), f"{at}: gathered bank differs from the reference")
                    check(np.array_equal(eng.gather_last_update(0), ref.bank.last_update()), f"{at}: last updates")
                else:
                    check(eng.gather_last_update(0) is None, f"{at}: gather_last_update off root")
                wire = eng.last_wire
                check(wire["collectives"] > 0 and (wire["bytes_sent"] > 0) == (R > 1), f"{at}: last_wire {wire}")


def test_query_dependent_samplers():
    """A ClusterSampler (re-fitted at step 2, and by refresh_sampler) and a RingSampler, in both modes: loss and
    this rank's dL/df rows against the single-process Engine, the clusters identical."""
    b = 2 * R + 3
    mine = slices(b, R)[RANK]
    for kind, mode in (("cluster", "replicated"), ("cluster", "sharded"), ("ring", "replicated"), ("ring", "sharded")):
        def sampler():
            if kind == "cluster":
                return mb.ClusterSampler(mb.Bank(N, DIM, seed=3), clusters=5, epsilon=0.2, beta=5.0, refresh_every=2,
                                         seed=1)
            return mb.RingSampler(N, lower=1, upper=20)
        opts = dict(k=K, tau=0.1, momentum=0.5, seed=11, objective="infonce", allow_biased_sampler=kind == "ring")
        ref = mb.Engine(mb.Bank(N, DIM, seed=3), sampler(), **opts)
        eng = mb.Engine(mb.Bank(N, DIM, seed=3), sampler(), comm=comm, distributed=mode, **opts)
        begin, end = eng.rows
        rng = np.random.default_rng(7)
        for step in range(4):
            f = unit_rows(rng, b, DIM)
            ids = rng.integers(0, N, b)
            lr, gr, _ = ref.step(f, ids)
            ld, gd, _ = eng.step(np.ascontiguousarray(f[mine]), ids[mine].copy())
            at = f"{kind} {mode} step {step}"
            check(abs(ld - lr) <= 1e-6 * abs(lr), f"{at}: loss {ld} != {lr}")
            check(rel(gd, gr[mine]) <= 1e-6, f"{at}: dL/df rows differ by {rel(gd, gr[mine])}")
            check(np.array_equal(eng.local_bank.to_float32(), ref.bank.to_float32()[begin:end]), f"{at}: the bank")
        if kind == "cluster":
            ref.refresh_sampler()
            eng.refresh_sampler()
            a, d = ref.sampler.cluster_state, eng.sampler.cluster_state
            check(a["refreshed_at"] == d["refreshed_at"] == 4 and np.array_equal(a["assignment"], d["assignment"])
                  and np.array_equal(a["centroids"], d["centroids"]), f"{kind} {mode}: refresh_sampler")


def test_seeded_and_bank_handover():
    for mode in ("replicated", "sharded"):
        for dtype in ("float32", "bfloat16"):
            eng = mb.DistributedEngine.seeded(N, DIM, 7, dtype, comm=comm, distributed=mode, k=K)
            begin, end = eng.rows
            whole = mb.Bank(N, DIM, seed=7, dtype=dtype)
            check(np.array_equal(eng.local_bank.to_float32(), whole.to_float32()[begin:end]),
                  f"seeded {mode} {dtype}: this rank's rows are not those of Bank(n, dim, seed, dtype)")
            check(eng.local_bank.n == end - begin and eng.n == N and eng.dim == DIM and eng.dtype == dtype,
                  f"seeded {mode} {dtype}: sizes")
            if mode == "sharded" and R > 1:
                try:
                    mb.knn_evaluate(eng.local_bank, np.zeros(N, np.int64), unit_rows(np.random.default_rng(0), 2, DIM),
                                    np.zeros(2, np.int64), k=5)
                    check(False, "knn_evaluate accepted a rank's shard")
                except mb.Error as e:
                    check("gather_bank" in str(e), f"knn on a shard: {e}")
    # sharded: the engine copies this rank's rows and the caller's Bank stays usable, views included;
    # replicated: the engine takes the Bank, which then shows the engine's rows (as Engine does)
    bank = mb.Bank(N, DIM, seed=4)
    view = bank.view()
    before = view.copy()
    eng = mb.Engine(bank, comm=comm, distributed="sharded", k=K)
    check(not bank.owned_by_engine and np.array_equal(bank.view(), before), "sharded: the Bank was not left as it was")
    f = unit_rows(np.random.default_rng(1), 2, DIM)
    eng.step(f, np.array([RANK, N - 1 - RANK]))
    check(np.array_equal(view, before), "sharded: the caller's Bank changed with the engine's step")
    bank = mb.Bank(N, DIM, seed=4)
    eng = mb.Engine(bank, comm=comm, distributed="replicated", k=K)
    check(bank.owned_by_engine and "DistributedEngine" in repr(bank), f"replicated: {bank!r}")
    eng.step(f, np.array([RANK, N - 1 - RANK]))
    check(np.array_equal(bank.to_float32(), eng.local_bank.to_float32()), "replicated: the Bank is not the engine's")


def test_refused_argument_raises_everywhere():
    """A bad argument on one rank (a conversion refused in Python, or the engine's own check) raises on
    every rank, names that rank, changes nothing; the next step agrees with the reference."""
    for mode in ("replicated", "sharded"):
        ref = mb.Engine(mb.Bank(N, DIM, seed=2), k=K, seed=5)
        eng = mb.Engine(mb.Bank(N, DIM, seed=2), k=K, seed=5, comm=comm, distributed=mode)
        b = 2 * R
        mine = slices(b, R)[RANK]
        rng = np.random.default_rng(9)
        f, ids = unit_rows(rng, b, DIM), rng.integers(0, N, b)
        bad = R - 1  # the last rank passes float64 features
        try:
            x = f[mine].astype(np.float64) if RANK == bad else np.ascontiguousarray(f[mine])
            eng.step(x, ids[mine].copy())
            check(False, f"{mode}: a float64 slice on rank {bad} was accepted")
        except TypeError as e:
            check(RANK == bad and "float32" in str(e), f"{mode}: {e}")
        except mb.Error as e:
            check(RANK != bad and f"rank {bad}" in str(e), f"{mode}: {e}")
        # the engine's own check: an id out of range on rank 0
        try:
            y = ids[mine].copy()
            if RANK == 0:
                y[0] = N + 3
            eng.step(np.ascontiguousarray(f[mine]), y)
            check(False, f"{mode}: id {N + 3} was accepted")
        except mb.Error as e:
            check("rank 0" in str(e), f"{mode}: {e}")
        check(eng.steps_done == 0, f"{mode}: a refused step changed the counter")
        lr, gr, _ = ref.step(f, ids)
        ld, gd, _ = eng.step(np.ascontiguousarray(f[mine]), ids[mine].copy())
        check(abs(ld - lr) <= 1e-6 * abs(lr) and rel(gd, gr[mine]) <= 1e-6, f"{mode}: the step after the errors")
        for call, args in (("evaluate", (f, ids, ids[None, :])), ("sample", (ids,)), ("update", (f, ids)),
                           ("prefetch", (ids,))):
            try:
                getattr(eng, call)(*args)
                check(False, f"DistributedEngine.{call} was accepted")
            except mb.Error as e:
                check(f"DistributedEngine.{call} is not available" in str(e), str(e))
        try:
            eng.bank
            check(False, "DistributedEngine.bank was accepted")
        except mb.Error as e:
            check("local_bank" in str(e), str(e))


def knn_sizes(ranks, empty_rank):
    """Uneven query counts per rank (2 r + 1), with 0 on empty_rank (None: no rank without queries)."""
    return [0 if r == empty_rank else 2 * r + 1 for r in range(ranks)]


def check_knn(at, got, ref, rows, queries):
    """This rank's DistributedEngine.knn_search result `got` against the single-process `ref` (both (scores,
    ids)) for its queries over the bank `rows` (float32 (N, D), as searched): the shapes and dtypes, scores
    and ids equal bit for bit (a score is one chain of multiply-adds wherever its query and row fall), each
    id's score its row's (float64 product), ids distinct per query."""
    (s, i), (rs, ri) = got, ref
    check(s.shape == rs.shape == i.shape and s.dtype == np.float32 and i.dtype == np.int64,
          f"{at}: shapes {s.shape} {i.shape} dtypes {s.dtype} {i.dtype}: expected {rs.shape} float32 / int64")
    if s.size == 0:
        return
    check(i.min() >= 0 and i.max() < rows.shape[0], f"{at}: ids out of [0, N): {i.min()} .. {i.max()}")
    check(np.array_equal(s.view(np.uint32), rs.view(np.uint32)),
          f"{at}: {(s != rs).sum()} scores differ from the single process's, by up to {np.abs(s - rs).max()}")
    check(np.array_equal(i, ri), f"{at}: {(i != ri).sum()} ids differ from the single process's")
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T  # (Q_r, N)
    mine = np.take_along_axis(exact, i, 1)
    check(np.abs(mine - s).max() <= 1e-5, f"{at}: a returned score is not its row's: off by {np.abs(mine - s).max()}")
    check(all(len(set(row)) == len(row) for row in i.tolist()), f"{at}: an id repeats within a query's neighbours")


def test_knn_search_equals_single_process():
    """knn_search in both modes, for each rank's uneven (or no) queries, against membank.knn_search over the
    same bank for all ranks' queries concatenated; after a step, so the rows are not only the seeded ones."""
    rng = np.random.default_rng(21)  # the same on every rank
    for mode in ("replicated", "sharded"):
        for dtype in ("float32", "bfloat16"):
            opts = dict(k=K, tau=0.1, momentum=0.5, seed=2)
            ref = mb.Engine(mb.Bank(N, DIM, seed=6, dtype=dtype), **opts)
            eng = mb.Engine(mb.Bank(N, DIM, seed=6, dtype=dtype), comm=comm, distributed=mode, **opts)
            f, ids = unit_rows(rng, 2 * R, DIM), rng.integers(0, N, 2 * R)
            ref.step(f, ids)
            eng.step(np.ascontiguousarray(f[2 * RANK:2 * RANK + 2]), ids[2 * RANK:2 * RANK + 2].copy())
            rows = ref.bank.to_float32()
            for empty_rank in (None, 0, R - 1):
                sizes = knn_sizes(R, empty_rank)
                start = sum(sizes[:RANK])
                # a slice even when empty (R = 1)
                queries = unit_rows(rng, max(sum(sizes), 1), DIM)[:sum(sizes)]
                if queries.shape[0] > 1:
                    queries[-1] = rows[N - 1]  # a bank row itself: its own best (score ~1)
                    queries[0] = queries[-1]   # the same query on the first and last ranks
                mine = queries[start:start + sizes[RANK]]  # an empty slice on empty_rank
                if sizes[RANK] == 0:
                    mine = np.empty((0, DIM), np.float32)  # a fresh empty array: strides (0, 0)
                for k in sorted({1, 5, min(N // R + 2, N), N}):  # N // R + 2: more than any shard holds (R > 1)
                    at = f"knn_search {mode} {dtype} Q_r = {sizes} k = {k}"
                    got = eng.knn_search(mine, k)
                    if queries.shape[0] == 0:  # R = 1 and its only rank without queries
                        check(got[0].shape == got[1].shape == (0, k), f"{at}: shapes {got[0].shape}")
                        continue
                    whole = mb.knn_search(ref.bank, queries, k)
                    check_knn(at, got, (whole[0][start:start + sizes[RANK]], whole[1][start:start + sizes[RANK]]),
                              rows, mine)
    # DistributedEngine.seeded holds Bank(n, dim, seed)'s rows: the same search
    for mode in ("replicated", "sharded"):
        eng = mb.DistributedEngine.seeded(N, DIM, 8, comm=comm, distributed=mode, k=K)
        bank = mb.Bank(N, DIM, seed=8)
        sizes = knn_sizes(R, None)
        start = sum(sizes[:RANK])
        queries = unit_rows(rng, sum(sizes), DIM)
        whole = mb.knn_search(bank, queries, 7)
        check_knn(f"knn_search seeded {mode}", eng.knn_search(queries[start:start + sizes[RANK]], 7),
                  (whole[0][start:start + sizes[RANK]], whole[1][start:start + sizes[RANK]]), bank.to_float32(),
                  queries[start:start + sizes[RANK]])


def test_knn_search_ties():
    """Rows and queries of four entries +-0.5: every product is exact in fp32, so many scores tie exactly,
    within and across shards. The ids must then be those of the single process, bit for bit, and the
    smaller global id first among equal scores (checked against numpy's order too)."""
    rng = np.random.default_rng(23)

    def dyadic(rows):
        x = np.zeros((rows, DIM), np.float32)
        for r in range(rows):
            x[r, rng.choice(DIM, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return x

    rows = dyadic(N)
    rows[N - 1] = rows[0]  # the same row at both ends of the bank: on the first and the last shard
    sizes = knn_sizes(R, None)
    start = sum(sizes[:RANK])
    queries = dyadic(sum(sizes))
    mine = queries[start:start + sizes[RANK]]
    for mode in ("replicated", "sharded"):
        eng = mb.Engine(mb.Bank.from_array(rows), comm=comm, distributed=mode, k=K)
        for k in sorted({1, min(N // R + 2, N), N}):
            at = f"knn_search ties {mode} k = {k}"
            s, i = eng.knn_search(mine, k)
            rs, ri = mb.knn_search(mb.Bank.from_array(rows), queries, k)
            check(np.array_equal(s, rs[start:start + sizes[RANK]]) and np.array_equal(i, ri[start:start + sizes[RANK]]),
                  f"{at}: differs from the single process (exact scores: bit for bit)")
            exact = mine.astype(np.float64) @ rows.astype(np.float64).T
            order = np.lexsort((np.broadcast_to(np.arange(N), exact.shape), -exact), axis=1)[:, :k]
            check(np.array_equal(i, order), f"{at}: not the best first, the smaller global id first among ties")
            check(np.array_equal(s, np.take_along_axis(exact, order, 1).astype(np.float32)), f"{at}: scores")


def test_knn_search_refused_everywhere():
    """A k that differs between ranks raises membank.Error on every rank; a k or queries refused on one rank
    raise there (its own error) and membank.Error naming it elsewhere; the next search is right."""
    rng = np.random.default_rng(25)
    queries = unit_rows(rng, 2 * R, DIM)
    mine = queries[2 * RANK:2 * RANK + 2]
    bank = mb.Bank(N, DIM, seed=9)
    bad = R - 1
    for mode in ("replicated", "sharded"):
        eng = mb.DistributedEngine.seeded(N, DIM, 9, comm=comm, distributed=mode, k=K)
        if R > 1:
            try:
                eng.knn_search(mine, 3 if RANK == 0 else 4)
                check(False, f"{mode}: k = 3 on rank 0 and 4 elsewhere was accepted")
            except mb.Error as e:
                check("the same k on every rank" in str(e), f"{mode}: {e}")
        cases = (("k = 0", lambda: eng.knn_search(mine, 0 if RANK == bad else 3), mb.Error, "expected 1 <= k <= N"),
                 ("k = N + 1", lambda: eng.knn_search(mine, N + 1 if RANK == bad else 3), mb.Error,
                  f"expected 1 <= k <= N = {N}"),
                 ("k = 2.0", lambda: eng.knn_search(mine, 2.0 if RANK == bad else 3), TypeError, "k must be an int"),
                 ("float64 queries", lambda: eng.knn_search(mine.astype(np.float64) if RANK == bad else mine, 3),
                  TypeError, "float32"))
        for what, call, own, says in cases:
            try:
                call()
                check(False, f"{mode}: {what} on rank {bad} was accepted")
            except mb.Error as e:
                if RANK == bad:
                    check(own is mb.Error and says in str(e), f"{mode} {what}: {e}")
                else:
                    check(f"rank {bad} refused its arguments" in str(e), f"{mode} {what}: {e}")
            except TypeError as e:
                check(RANK == bad and own is TypeError and says in str(e), f"{mode} {what}: {e}")
        whole = mb.knn_search(bank, queries, 3)
        check_knn(f"knn_search {mode} after the errors", eng.knn_search(mine, 3),
                  (whole[0][2 * RANK:2 * RANK + 2], whole[1][2 * RANK:2 * RANK + 2]), bank.to_float32(), mine)


def test_knn_search_ctrl_c():
    """SIGINT on rank 0 while it waits in knn_search for the other ranks (they start only once it was sent):
    its hook sees it at the search's first tile, rank 0 raises KeyboardInterrupt, every other rank
    membank.Error (cancelled on another rank); the engine then answers as before on every rank."""
    if R == 1 or threading.current_thread() is not threading.main_thread():
        return
    from mpi4py import MPI
    side = comm.Dup()  # "the signal was sent", from rank 0's helper thread
    multiple = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
    queries = unit_rows(np.random.default_rng(27), 3 * R, DIM)
    mine = queries[3 * RANK:3 * RANK + 3]
    bank = mb.Bank(N, DIM, seed=10)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for mode in ("replicated", "sharded"):
            eng = mb.DistributedEngine.seeded(N, DIM, 10, comm=comm, distributed=mode, k=K)
            if RANK == 0:
                def interrupt():
                    time.sleep(0.3)  # rank 0 is inside knn_search by now, waiting for the other ranks
                    os.kill(os.getpid(), signal.SIGINT)
                    if multiple:
                        for r in range(1, R):
                            side.send(True, dest=r)
                helper = threading.Thread(target=interrupt)
                helper.start()
                try:
                    eng.knn_search(mine, 3)
                    check(False, f"{mode}: the interrupted search returned")
                except KeyboardInterrupt:
                    pass
                helper.join()
            else:
                if multiple:
                    side.recv(source=0)
                else:
                    time.sleep(1.5)
                try:
                    eng.knn_search(mine, 3)
                    check(False, f"{mode}: the search cancelled on rank 0 returned on rank {RANK}")
                except mb.Error as e:
                    check("cancelled on another rank" in str(e), f"{mode}: {e}")
            whole = mb.knn_search(bank, queries, 3)
            check_knn(f"knn_search {mode} after Ctrl-C", eng.knn_search(mine, 3),
                      (whole[0][3 * RANK:3 * RANK + 3], whole[1][3 * RANK:3 * RANK + 3]), bank.to_float32(), mine)
    finally:
        signal.signal(signal.SIGINT, previous)
        side.Free()


def init_torch_distributed():
    """torch.distributed (gloo) over the MPI ranks: a free port chosen on rank 0, broadcast."""
    import torch.distributed as dist
    port = None
    if RANK == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=RANK, world_size=R)
    return dist


def test_torch_ddp_gradient():
    """DDP averages the ranks' parameter gradients: with grad_scale = R (the default for a
    DistributedEngine) the result is the single-process gradient of the global batch."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        if RANK == 0:
            print("torch is not installed: the DDP part is skipped")
        return
    from membank.torch import MemoryBankLoss
    dist = init_torch_distributed()
    b, n, dim, k = 3 * R + 1, 97, 8, 16
    mine = slices(b, R)[RANK]
    for mode in ("replicated", "sharded"):
        for scale in (None, 1.0):
            torch.manual_seed(0)  # the same initial weights on every rank
            net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, dim)).double()
            ref_net = copy.deepcopy(net)
            ddp = DistributedDataParallel(net)
            crit = MemoryBankLoss(n, dim, k=k, tau=0.1, seed=3, objective="infonce", comm=comm, distributed=mode,
                                  grad_scale=scale)
            ref_crit = MemoryBankLoss(n, dim, k=k, tau=0.1, seed=3, objective="infonce")
            check(crit.grad_scale == (R if scale is None else 1.0), f"grad_scale {crit.grad_scale}")
            gen = torch.Generator().manual_seed(42)
            for step in range(2):
                x = torch.randn(b, 12, generator=gen, dtype=torch.float64)
                ids = torch.randperm(n, generator=gen)[:b]
                ddp.zero_grad()
                ref_net.zero_grad()
                loss = crit(F.normalize(ddp(x[mine]), dim=1), ids[mine])
                loss.backward()
                ref_loss = ref_crit(F.normalize(ref_net(x), dim=1), ids)
                ref_loss.backward()
                at = f"DDP {mode} grad_scale={scale} step {step}"
                check(abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()),
                      f"{at}: loss {loss.item()} != {ref_loss.item()}")
                factor = 1.0 if scale is None else 1.0 / R
                for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
                    err = rel(p.grad.numpy(), factor * q.grad.numpy())
                    check(err <= 1e-5, f"{at}: {name}'s gradient differs from the single-process one by {err}")
                with torch.no_grad():  # the same update on both: the next step starts from equal weights
                    for p, q in zip(net.parameters(), ref_net.parameters()):
                        p -= 0.5 * p.grad
                        q -= 0.5 * factor * q.grad
    # a distributed engine has no evaluate-only step: refused on every rank, as one clear error
    crit = MemoryBankLoss(n, dim, k=k, comm=comm, distributed="sharded")
    try:
        with torch.no_grad():
            crit(F.normalize(torch.randn(2, dim), dim=1), torch.tensor([RANK, RANK + 2]))
        check(False, "an evaluate-only call on a DistributedEngine was accepted")
    except mb.Error as e:
        check("no evaluate-only step" in str(e), str(e))
    dist.destroy_process_group()


def main():
    for t in (test_steps_equal_single_process, test_query_dependent_samplers, test_seeded_and_bank_handover,
              test_refused_argument_raises_everywhere, test_knn_search_equals_single_process, test_knn_search_ties,
              test_knn_search_refused_everywhere, test_knn_search_ctrl_c, test_torch_ddp_gradient):
        t()
        comm.Barrier()
        if RANK == 0:
            print(f"{t.__name__}: ok", flush=True)
    total = total_checks()
    if RANK == 0:
        print(f"ok: {total} checks on {R} ranks")


if __name__ == "__main__":
    run(main)
