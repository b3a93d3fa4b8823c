"""membank: memory-bank instance discrimination (Wu et al., CVPR 2018) from Python.

The C++ engine keeps one unit-norm row per training instance (the bank: float32, or float16 /
bfloat16 with ``Bank(..., dtype=)``), draws K noise negatives per query, computes the NCE (or
InfoNCE, or exact full-softmax) loss and its gradient in one fused pass, and refreshes the bank rows
of the batch by momentum. Your training loop owns the encoder; the engine owns the bank, the sampling
and the loss.

    import numpy as np, membank
    engine = membank.Engine(membank.Bank(n, 128, seed=0), k=4096, tau=0.07, momentum=0.5)
    loss, grad, stats = engine.step(features, ids)   # float32 (B, D) unit rows, int64 (B,)

Arrays are taken and returned without copies. An array of the wrong dtype or layout is refused with
TypeError / ValueError naming the fix (e.g. ``x.astype(np.float32)``) -- never converted silently.
Engine errors raise ``membank.Error`` (a ValueError); a request that does not fit in memory (or an
allocation that fails) raises ``MemoryError`` with the bytes needed and available. Inputs may be rows
of the bank itself (``engine.bank.view()``); an ``out=`` buffer that shares memory with an input or
the bank is refused. The GIL is released during C++ work.

MoCo's queue and SimCLR's in-batch negatives over the same objectives::

    queue = membank.Queue(65536, 128, tau=0.2)             # Q keys from a momentum encoder
    loss, grad_q, stats = queue.step(q, k, ids)            # scores q vs k and the queue, then enqueues k
    loss, grad_a, grad_b, stats = membank.InBatch(tau=0.5).step(z_a, z_b)   # NT-Xent over 2B samples

Nearest neighbours over a bank (any dtype), and the weighted-kNN evaluation (Wu et al., Sec. 3.4)::

    scores, ids = membank.knn_search(engine.bank, queries, 200)   # float32 / int64 (Q, k), best first
    result = membank.knn_evaluate(engine.bank, bank_labels, queries, query_labels, k=200, sigma=0.07)

``membank.torch`` holds the PyTorch face (autograd Function, drop-in NCEAverage / NCECriterion).

Distributed (builds with MPI: ``membank.has_mpi``): one logical bank over the ranks of an mpi4py
communicator, each rank passing its slice of the global batch::

    from mpi4py import MPI
    engine = membank.Engine(membank.Bank(n, 128, seed=0), k=4096, comm=MPI.COMM_WORLD,
                            distributed="sharded")        # or "replicated"; a membank.DistributedEngine
    loss, grad, stats = engine.step(my_features, my_ids)  # grad: this rank's rows of dL/df of the global mean

``DistributedEngine.seeded(n, dim, seed, comm=..., distributed="sharded")`` builds only this rank's rows.
``save_snapshot(path, engine)`` with a DistributedEngine and ``load_snapshot(path, comm=...,
distributed=...)`` are collective (a sharded engine writes a shard set: any rank count loads it).
``Queue(..., comm=c)`` and ``InBatch(..., comm=c)`` make a ``DistributedQueue`` / ``DistributedInBatch``:
each rank passes its slice, the step is the single-process step on the global batch.

Contrastive multiview coding (CMC) over V banks, one per view::

    mv = membank.MultiViewEngine(n, 128, views=2, k=4096, tau=0.07, z_policy="first_batch")
    loss, (grad_l, grad_ab), stats = mv.step([f_l, f_ab], ids)   # stats.pairs: per (query view, bank view)
"""
from ._membank import (  # noqa: F401
    AliasSampler,
    ClusterSampler,
    Bank,
    DynamicSampler,
    Engine,
    Error,
    InBatch,
    KnnResult,
    MultiViewEngine,
    MultiViewStats,
    NoiseSampler,
    Queue,
    RingSampler,
    StepStats,
    UniformSampler,
    full_softmax_loss,
    get_num_threads,
    import_bank,
    knn_evaluate,
    knn_search,
    load_snapshot,
    max_num_threads,
    read_snapshot_info,
    save_snapshot,
    set_num_threads,
    time_steps,
    verify_snapshot,
    has_mpi,
)

if has_mpi:
    from ._membank import DistributedEngine, DistributedInBatch, DistributedQueue  # noqa: F401


def _engine_new(cls, *args, comm=None, distributed=None, **kwargs):
    """Engine(..., comm=c, distributed=mode) makes a DistributedEngine over the mpi4py communicator c
    (mode 'replicated', the default, or 'sharded'); without comm= (or comm=None) an Engine as always."""
    if comm is None:
        if distributed is not None:
            raise Error(f"Engine(distributed = {distributed!r}): needs comm=, the mpi4py communicator of the ranks "
                        "(e.g. mpi4py.MPI.COMM_WORLD)")
        return _object_new(cls)
    if not has_mpi:
        # one message, the module's own (Engine.__init__ raises it for any comm= without MPI)
        return _object_new(cls)
    return DistributedEngine(*args, comm=comm, distributed="replicated" if distributed is None else distributed,
                             **kwargs)


# Engine(...) is the pybind11 class; its __new__ dispatches comm= to DistributedEngine (the returned object
# is then not an Engine, so Engine.__init__ does not run on it).
_object_new = Engine.__new__
Engine.__new__ = staticmethod(_engine_new)


def _memory_new(distributed_name):
    """Queue(..., comm=c) / InBatch(..., comm=c): a DistributedQueue / DistributedInBatch over the mpi4py
    communicator c (collective); without comm= (or comm=None) the single-process class as always."""
    def new(cls, *args, comm=None, **kwargs):
        if comm is None or not has_mpi:
            # without MPI: the class's own __init__ raises its one message for any comm=
            return _object_new(cls)
        return globals()[distributed_name](*args, comm=comm, **kwargs)
    return staticmethod(new)


Queue.__new__ = _memory_new("DistributedQueue")
InBatch.__new__ = _memory_new("DistributedInBatch")

__all__ = [
    "AliasSampler", "Bank", "ClusterSampler", "DynamicSampler", "Engine", "Error", "InBatch", "KnnResult",
    "MultiViewEngine", "MultiViewStats",
    "NoiseSampler", "Queue", "RingSampler", "StepStats",
    "UniformSampler",
    "full_softmax_loss", "get_num_threads", "import_bank", "knn_evaluate", "knn_search", "load_snapshot",
    "max_num_threads", "read_snapshot_info", "save_snapshot", "set_num_threads", "time_steps", "verify_snapshot",
    "has_mpi",
]
if has_mpi:
    __all__ += ["DistributedEngine", "DistributedInBatch", "DistributedQueue"]
