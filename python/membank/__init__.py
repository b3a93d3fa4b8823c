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

``membank.torch`` holds the PyTorch face (autograd Function, drop-in NCEAverage / NCECriterion).
"""
from ._membank import (  # noqa: F401
    AliasSampler,
    Bank,
    Engine,
    Error,
    KnnResult,
    NoiseSampler,
    StepStats,
    UniformSampler,
    full_softmax_loss,
    get_num_threads,
    import_bank,
    knn_evaluate,
    load_snapshot,
    max_num_threads,
    read_snapshot_info,
    save_snapshot,
    set_num_threads,
    time_steps,
    verify_snapshot,
)

__all__ = [
    "AliasSampler", "Bank", "Engine", "Error", "KnnResult", "NoiseSampler", "StepStats", "UniformSampler",
    "full_softmax_loss", "get_num_threads", "import_bank", "knn_evaluate", "load_snapshot", "max_num_threads",
    "read_snapshot_info", "save_snapshot", "set_num_threads", "time_steps", "verify_snapshot",
]
