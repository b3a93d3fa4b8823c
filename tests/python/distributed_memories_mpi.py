"""membank.DistributedQueue and membank.DistributedInBatch (Queue(..., comm=) / InBatch(..., comm=)) and
their torch modules under DDP, under mpirun (CTest runs it at np = 2; any np >= 1 works). Every rank
computes the single-process reference itself -- a membank.Queue / membank.InBatch stepping on the whole
global batch -- and checks its own slice of the distributed result against it:

  * DistributedQueue: loss and this rank's rows of dL/dq within 1e-6 relative, StepStats the same on every
    rank, and the ring (keys, ids, labels, labelled, last_update, position, enqueued, counter) identical to
    the single-process ring fed the global batches, on every rank, over uneven slices, Q not a multiple
    of B, fp32 / fp16 / bf16 (stochastic rounding too), enqueue=False; state() / restore() (collective)
    and from_queue(); a refused argument on one rank raises on every rank and changes nothing;
  * DistributedInBatch: each rank gets the single-process rows of both views' gradients (bit for bit) and
    the global loss, with ids (duplicates masked) and without;
  * QueueLoss / InBatchLoss in a DDP loop (gloo, initialised from the MPI ranks): with grad_scale = R (the
    default for a distributed memory) DDP's averaged parameter gradients equal the single-process
    gradient of the global batch; grad_scale=1 gives 1/R of it.

Any failure aborts the whole job (MPI_Abort) with the rank's traceback: no rank hangs in a collective.
Exits 77 (skipped) without mpi4py or a membank built with MPI; the DDP part is skipped without torch."""
import os
import socket

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


def mine(x, s):
    return None if x is None else np.ascontiguousarray(x[s])


def same_everywhere(value, what):
    """value (a float or an array) is bit for bit rank 0's."""
    root = comm.bcast(value, root=0)
    check(np.array_equal(np.asarray(value), np.asarray(root), equal_nan=True), f"{what} differs from rank 0's")


def check_ring(dq, ref, at):
    check(np.array_equal(dq.keys(), ref.keys()), f"{at}: keys differ from the single-process ring")
    for name in ("ids", "labels", "labelled", "last_update"):
        check(np.array_equal(getattr(dq, name)(), getattr(ref, name)()), f"{at}: {name} differ")
    check((dq.position, dq.enqueued, dq.steps_done) == (ref.position, ref.enqueued, ref.steps_done),
          f"{at}: position / enqueued / steps_done {(dq.position, dq.enqueued, dq.steps_done)} != "
          f"{(ref.position, ref.enqueued, ref.steps_done)}")
    same_everywhere(dq.keys(), f"{at}: the ring")


Q, D = 13, 8


def test_queue_ring():
    for dtype, objective, opts in (("float32", "infonce", dict(exclude_positive=True)),
                                   ("float16", "dcl", {}),
                                   ("bfloat16", "infonce", dict(rounding="stochastic")),
                                   ("float32", "supcon", dict(exclude_same_label=True))):
        at0 = f"{dtype} {objective} {opts}"
        dq = mb.Queue(Q, D, objective, 0.2, dtype=dtype, seed=3, comm=comm, **opts)
        ref = mb.Queue(Q, D, objective, 0.2, dtype=dtype, seed=3, **opts)
        check(isinstance(dq, mb.DistributedQueue), f"Queue(comm=) made a {type(dq).__name__}")
        check((dq.rank, dq.ranks, dq.capacity, dq.dim, dq.dtype) == (RANK, R, Q, D, dtype), repr(dq))
        check(dq.config == ref.config, f"{at0}: config")
        check_ring(dq, ref, f"{at0} initial")
        rng = np.random.default_rng(7)  # the same global batches on every rank
        labelled = objective == "supcon" or opts.get("exclude_same_label")
        for step in range(6):
            at = f"{at0} step {step}"
            b = 2 * R + 1 + step % 3  # uneven slices; Q not a multiple of b
            q, k = unit_rows(rng, b, D), unit_rows(rng, b, D)
            ids = rng.integers(0, 20, b)
            labels = rng.integers(0, 3, b) if labelled else None
            s = slices(b, R)[RANK]
            enqueue = step != 3
            lr, gr, sr = ref.step(q, k, ids, labels, enqueue=enqueue)
            ld, gd, sd = dq.step(mine(q, s), mine(k, s), mine(ids, s), mine(labels, s), enqueue=enqueue)
            check(abs(ld - lr) <= 1e-6 * abs(lr), f"{at}: loss {ld} != {lr}")
            check(gd.shape == (s.stop - s.start, D) and rel(gd, gr[s]) <= 1e-6,
                  f"{at}: dL/dq rows differ by {rel(gd, gr[s])}")
            check(sd.loss == ld and sd.step == sr.step, f"{at}: StepStats {sd} vs {sr}")
            same_everywhere(ld, f"{at}: the loss")
            same_everywhere(sd.mi_lower_bound, f"{at}: mi_lower_bound")
            check_ring(dq, ref, at)
        wire = dq.last_wire
        check(R == 1 or wire["bytes_sent"] > 0, f"{at0}: last_wire {wire}")

    # state() / restore() (collective) and from_queue()
    dq = mb.Queue(Q, D, tau=0.2, seed=5, comm=comm)
    ref = mb.Queue(Q, D, tau=0.2, seed=5)
    rng = np.random.default_rng(3)
    q, k, ids = unit_rows(rng, 2 * R, D), unit_rows(rng, 2 * R, D), np.arange(2 * R)
    s = slices(2 * R, R)[RANK]
    ref.step(q, k, ids)
    dq.step(mine(q, s), mine(k, s), mine(ids, s))
    state = dq.state()
    ref_state = ref.state()
    check(all(np.array_equal(state[key], ref_state[key]) for key in ref_state), "state() differs from the reference's")
    dq.step(mine(q, s), mine(k, s), mine(ids, s))
    dq.restore(state)
    restored = mb.Queue(Q, D, tau=0.2, seed=5)
    restored.restore(state)
    check_ring(dq, restored, "after restore")
    copied = mb.DistributedQueue.from_queue(ref, comm=comm)
    check_ring(copied, ref, "from_queue")
    lr, gr, _ = ref.step(q, k, ids)
    lc, gc, _ = copied.step(mine(q, s), mine(k, s), mine(ids, s))
    check(abs(lc - lr) <= 1e-6 * abs(lr) and rel(gc, gr[s]) <= 1e-6, "from_queue: the next step")
    check_ring(copied, ref, "from_queue after a step")

    # a refused argument on one rank raises on every rank and changes nothing
    before = dq.state()
    bad = R - 1
    try:
        x = mine(q, s).astype(np.float64) if RANK == bad else mine(q, s)
        dq.step(x, mine(k, s), mine(ids, s))
        check(False, f"a float64 slice on rank {bad} was accepted")
    except TypeError as e:
        check(RANK == bad and "float32" in str(e), str(e))
    except mb.Error as e:
        check(RANK != bad and f"rank {bad} refused" in str(e), str(e))
    if R > 1:  # the engine's own check (every rank agrees on the call's shape): ids on rank 0 only
        try:
            dq.step(mine(q, s), mine(k, s), mine(ids, s) if RANK == 0 else None)
            check(False, "a step with ids on one rank only was accepted")
        except mb.Error as e:
            check("ids on every rank or on none" in str(e), str(e))
    if R > 1:  # a state that differs between ranks (the DistributedQueue's fingerprints)
        other = dict(before)
        if RANK == bad:
            other["position"] = (before["position"] + 1) % Q
        try:
            dq.restore(other)
            check(False, "a state that differs between ranks was accepted")
        except mb.Error as e:
            check(f"rank {bad}" in str(e), str(e))
    try:  # a state refused by the conversion on one rank
        dq.restore({} if RANK == bad else before)
        check(False, "a state without its entries was accepted")
    except mb.Error as e:
        check(("state has no" in str(e)) if RANK == bad else f"rank {bad} refused" in str(e), str(e))
    after = dq.state()
    check(all(np.array_equal(after[key], before[key]) for key in before), "a refused call changed the ring")
    for call in ("evaluate", "enqueue"):
        try:
            getattr(dq, call)(q, k)
            check(False, f"DistributedQueue.{call} was accepted")
        except mb.Error as e:
            check(f"DistributedQueue.{call} is not available" in str(e), str(e))


def test_in_batch_rows():
    for objective, opts, with_ids in (("infonce", {}, False), ("infonce", dict(exclude_positive=True), True),
                                      ("dcl", {}, True), ("supcon", {}, "labels")):
        at0 = f"{objective} {opts} ids={with_ids}"
        di = mb.InBatch(objective, 0.5, comm=comm, **opts)
        ref = mb.InBatch(objective, 0.5, **opts)
        check(isinstance(di, mb.DistributedInBatch), f"InBatch(comm=) made a {type(di).__name__}")
        check((di.rank, di.ranks) == (RANK, R) and di.config == ref.config, repr(di))
        rng = np.random.default_rng(11)
        for step in range(3):
            at = f"{at0} step {step}"
            b = 3 * R + 1 + step
            s = slices(b, R)[RANK]
            za, zb = unit_rows(rng, b, D), unit_rows(rng, b, D)
            ids = rng.integers(0, b // 2 + 1, b) if with_ids is True else None  # duplicate ids across ranks
            labels = rng.integers(0, 3, b) if with_ids == "labels" else None
            lr, gar, gbr, sr = ref.step(za, zb, ids, labels)
            out_a = np.empty((s.stop - s.start, D), np.float32)
            ld, gad, gbd, sd = di.step(mine(za, s), mine(zb, s), mine(ids, s), mine(labels, s), out_a=out_a)
            check(gad is out_a, f"{at}: out_a not written in place")
            check(ld == lr, f"{at}: loss {ld} != {lr}")
            check(np.array_equal(gad, gar[s]) and np.array_equal(gbd, gbr[s]),
                  f"{at}: gradient rows differ by {rel(gad, gar[s])}, {rel(gbd, gbr[s])}")
            same_everywhere(ld, f"{at}: the loss")
    di = mb.InBatch(tau=0.5, comm=comm)
    bad = R - 1
    za = unit_rows(np.random.default_rng(0), 2, D)
    try:
        di.step(za if RANK != bad else za.astype(np.float64), za)
        check(False, "a float64 view on one rank was accepted")
    except TypeError as e:
        check(RANK == bad and "view_a" in str(e), str(e))
    except mb.Error as e:
        check(RANK != bad and f"rank {bad} refused" in str(e), str(e))


def init_torch_distributed():
    """torch.distributed (gloo) over the MPI ranks: a free port chosen on rank 0, broadcast."""
    import torch.distributed as dist
    port = None
    if RANK == 0:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=RANK, world_size=R)
    return dist


def test_torch_ddp_gradient():
    """DDP averages the ranks' parameter gradients: with grad_scale = R (the default for a distributed
    memory) the result is the single-process gradient of the global batch; grad_scale=1 gives 1/R."""
    try:
        import copy

        import torch
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        if RANK == 0:
            print("torch is not installed: the DDP part is skipped")
        return
    from membank.torch import InBatchLoss, QueueLoss
    dist = init_torch_distributed()
    b = 3 * R + 1
    s = slices(b, R)[RANK]
    for kind in ("queue", "in_batch"):
        for scale in (None, 1.0):
            at = f"DDP {kind} grad_scale={scale}"
            torch.manual_seed(0)  # the same initial weights on every rank
            net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, D)).double()
            ref_net = copy.deepcopy(net)
            ddp = DistributedDataParallel(net)
            if kind == "queue":
                crit = QueueLoss(mb.Queue(Q, D, tau=0.2, seed=2, comm=comm), grad_scale=scale)
                ref_crit = QueueLoss(Q, D, tau=0.2, seed=2)
            else:
                crit = InBatchLoss(tau=0.5, comm=comm, grad_scale=scale)
                ref_crit = InBatchLoss(tau=0.5)
            check(crit.grad_scale == (R if scale is None else 1.0), f"{at}: grad_scale {crit.grad_scale}")
            gen = torch.Generator().manual_seed(42)
            for step in range(2):
                x = torch.randn(2 * b, 12, generator=gen, dtype=torch.float64)
                keys = F.normalize(torch.randn(b, D, generator=gen, dtype=torch.float64), dim=1)
                ids = torch.randperm(50, generator=gen)[:b]
                ddp.zero_grad()
                ref_net.zero_grad()
                if kind == "queue":
                    loss = crit(F.normalize(ddp(x[:b][s]), dim=1), keys[s], ids[s])
                    ref_loss = ref_crit(F.normalize(ref_net(x[:b]), dim=1), keys, ids)
                else:  # both views through one forward (DDP: one forward per backward)
                    z = F.normalize(ddp(torch.cat([x[:b][s], x[b:][s]])), dim=1)
                    loss = crit(z[: s.stop - s.start], z[s.stop - s.start:])
                    z_ref = F.normalize(ref_net(x), dim=1)
                    ref_loss = ref_crit(z_ref[:b], z_ref[b:])
                loss.backward()
                ref_loss.backward()
                check(abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item()),
                      f"{at} step {step}: loss {loss.item()} != {ref_loss.item()}")
                factor = 1.0 if scale is None else 1.0 / R
                for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
                    err = rel(p.grad.numpy(), factor * q.grad.numpy())
                    check(err <= 1e-5, f"{at} step {step}: {name}'s gradient differs from the single-process one "
                                       f"by {err}")
                with torch.no_grad():  # the same update on both: the next step starts from equal weights
                    for p, q in zip(net.parameters(), ref_net.parameters()):
                        p -= 0.5 * p.grad
                        q -= 0.5 * factor * q.grad
            if kind == "queue":
                check_ring(crit.queue, ref_crit.queue, at)
                # the queue travels in state_dict; loading it is collective (DistributedQueue.restore)
                sd = ref_crit.state_dict()
                other = QueueLoss(mb.Queue(Q, D, tau=0.2, seed=9, comm=comm))
                other.load_state_dict(sd)
                check_ring(other.queue, ref_crit.queue, f"{at}: load_state_dict")
                try:
                    with torch.no_grad():
                        crit(keys[s], keys[s])
                    check(False, "an evaluate-only call on a DistributedQueue was accepted")
                except mb.Error as e:
                    check("no evaluate-only step" in str(e), str(e))
    dist.destroy_process_group()


def main():
    for t in (test_queue_ring, test_in_batch_rows, test_torch_ddp_gradient):
        t()
        comm.Barrier()
        if RANK == 0:
            print(f"{t.__name__}: ok", flush=True)
    total = total_checks()
    if RANK == 0:
        print(f"ok: {total} checks on {R} ranks")


if __name__ == "__main__":
    run(main)
