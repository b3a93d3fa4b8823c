"""membank.torch: the memory-bank NCE of Wu et al. as a PyTorch autograd Function and nn.Module.

Drop-in for the reference pair of lemniscate.pytorch (``NCEAverage`` + ``NCECriterion``)::

    # from lib.NCEAverage import NCEAverage
    # from lib.NCECriterion import NCECriterion
    from membank.torch import NCEAverage, NCECriterion

    lemniscate = NCEAverage(low_dim, ndata, nce_k, nce_t, nce_m)   # same arguments
    criterion = NCECriterion(ndata)
    ...
    feature = model(input)                  # L2-normalised (B, D), as the reference expects
    output = lemniscate(feature, index)
    loss = criterion(output, index)         # the same loss value
    loss.backward()                         # dL/dfeature, as the reference's backward

Same inputs, same loss, same gradient (to fp32 rounding; see the differences listed in
python/README.md). What differs is what flows between the two modules: the reference's
``output`` is the (B, K+1) matrix of probabilities exp(v.f/T)/Z, whose computation (a
B x (K+1) x D gather, 0.5 GB at ImageNet scale) is most of its cost. membank fuses scoring, loss
and gradient into one pass and never builds it: its ``NCEAverage`` returns the NCE loss itself (a
0-d tensor, mean over the batch exactly as NCECriterion computes it) and its ``NCECriterion``
passes that through. ``NCECriterion`` also accepts a reference (B, K+1) probability matrix and then
computes the reference formula in plain PyTorch.

The bank is refreshed (momentum, renormalised) with the features of the batch after the loss is
computed from the pre-update rows -- the order the reference follows (it refreshes in backward).
membank does it as the forward returns, when gradients are being recorded (training); under
``torch.no_grad()`` (or for inputs that do not require grad) nothing changes: not the bank, Z nor
the step counter.

Data parallel (torch DistributedDataParallel, one process per rank, launched by ``mpirun``): give
``MemoryBankLoss`` a ``membank.DistributedEngine`` (``engine=``, or ``comm=`` and ``distributed=``);
each rank passes its slice of the global batch and the loss is the global batch's. The gradient
each rank's backward returns is ``grad_scale`` (default: R, the number of ranks) times its rows of
dL/df of the global mean loss, so that DDP's averaging of the parameter gradients over the R ranks
gives exactly the single-process gradient of the global batch::

    model = DistributedDataParallel(net)
    criterion = MemoryBankLoss(n, 128, k=4096, comm=MPI.COMM_WORLD, distributed="sharded")
    loss = criterion(model(x_mine), ids_mine)   # the global batch's loss, the same on every rank
    loss.backward()                             # after DDP's all-reduce: the single-process gradient

Pass ``grad_scale=1`` when your loop sums the ranks' gradients instead of averaging them. ``QueueLoss`` with
a ``membank.DistributedQueue`` and ``InBatchLoss`` with a ``membank.DistributedInBatch`` follow the same
rule (the loss is the global batch's mean; backward returns grad_scale = R times this rank's rows).

Contrastive multiview coding: ``MultiViewLoss(membank.MultiViewEngine(...))``, forward(list of V views'
features, ids) -> the summed loss of every pair, gradients to every view.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import _membank

__all__ = ["NCEFunction", "nce_loss", "MemoryBankLoss", "NCEAverage", "NCECriterion", "ReadOnlyBank",
           "reference_nce_criterion", "QueueFunction", "QueueLoss", "InBatchFunction", "InBatchLoss",
           "MultiViewFunction", "MultiViewLoss"]


def _features(x: torch.Tensor, name: str = "features") -> np.ndarray:
    """x as the float32 (B, D) C-contiguous numpy array the engine reads (a view when x already is)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, D); got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, D); got shape {tuple(x.shape)}")
    # Inputs are only read, so a conversion here cannot lose a write: float64 (gradcheck), half
    # precision, CUDA or non-contiguous inputs become a float32 CPU copy.
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def _ids(y: torch.Tensor, name: str = "ids", what: str = "instance indices") -> np.ndarray:
    if isinstance(y, np.ndarray):
        return np.ascontiguousarray(y, dtype=np.int64)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what} (B,); got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long); got {y.dtype}: pass "
                        f"{'y' if name == 'ids' else name}.long()")
    return y.detach().to(device="cpu", dtype=torch.int64).contiguous().view(-1).numpy()


def _negatives(neg) -> Optional[np.ndarray]:
    if neg is None:
        return None
    if isinstance(neg, torch.Tensor):
        neg = neg.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    return neg


def _is_distributed(engine) -> bool:
    return _membank.has_mpi and isinstance(engine, _membank.DistributedEngine)


def _is_distributed_queue(queue) -> bool:
    return _membank.has_mpi and isinstance(queue, _membank.DistributedQueue)


def _is_distributed_in_batch(in_batch) -> bool:
    return _membank.has_mpi and isinstance(in_batch, _membank.DistributedInBatch)


def _default_grad_scale(grad_scale, distributed: bool, obj) -> float:
    """grad_scale=None: R (the ranks) for a distributed memory, whose loss is the global batch's mean and whose
    gradient is this rank's rows of it (DDP then averages the ranks' parameter gradients: R x rows / R); 1
    otherwise."""
    if grad_scale is None:
        return float(obj.ranks) if distributed else 1.0
    return float(grad_scale)


def _whole_bank(engine):
    """The engine's bank when this process holds all N rows (an Engine, or a replicated
    DistributedEngine); membank.Error naming what to use instead for a rank's shard."""
    if not _is_distributed(engine):
        return engine.bank
    begin, end = engine.rows
    if (begin, end) != (0, engine.n):
        raise _membank.Error(f"memory: rank {engine.rank} holds rows [{begin}, {end}) of N = {engine.n} (a sharded "
                             "DistributedEngine): use engine.local_bank (this rank's rows) or engine.gather_bank(root)")
    return engine.local_bank


class NCEFunction(torch.autograd.Function):
    """loss = NCEFunction.apply(features, ids, engine, negatives=None, update=True, stats=None, grad_scale=1.0)

    features: (B, D) tensor (unit rows unless the engine normalises them); ids: (B,) instance ids;
    engine: a membank.Engine (its objective decides the loss);
    negatives: optional (B, K) or (1, K) ids, else the engine draws its own;
    update: True -- one training step (the bank refreshed after the loss, Z and the step counter
    advance); False -- evaluate only, nothing in the engine changes (the negatives default to the
    ones the next step would draw); stats: an optional list that receives the step's
    membank.StepStats (Z, Zhat, mean P(positive), collisions, step); grad_scale: backward returns
    grad_scale x dL/dfeatures.

    With a membank.DistributedEngine, features and ids are this rank's slice of the global batch, the
    loss is the global batch's mean (the same on every rank) and dL/dfeatures this rank's rows of its
    gradient; update=False is refused (a distributed engine has no evaluate-only step).

    Returns the 0-d loss (mean over the batch) in features' dtype and device; backward returns
    grad_scale x dL/dfeatures (times the incoming gradient). The loss is computed in float32 by the engine.
    """

    @staticmethod
    def forward(ctx, features, ids, engine, negatives=None, update=True, stats=None, grad_scale=1.0):
        f = _features(features)
        y = _ids(ids)
        neg = _negatives(negatives)
        if not update and _is_distributed(engine):
            raise _membank.Error(
                "a DistributedEngine has no evaluate-only step (update=False: gradients off, or features that do "
                "not require grad): compute the loss in training mode, or evaluate with a single-process Engine")
        if update:
            if neg is None:
                loss, grad, step_stats = engine.step(f, y)
            else:
                loss, grad, step_stats = engine.step_with_negatives(f, y, neg)
        else:
            if neg is None:
                neg = engine.sample(y)
            loss, grad, step_stats = engine.evaluate(f, y, neg)
        ctx.grad = torch.from_numpy(grad)
        if grad_scale != 1.0:
            ctx.grad.mul_(grad_scale)
        if stats is not None:
            stats.append(step_stats)
        return torch.tensor(loss, dtype=features.dtype, device=features.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        g = ctx.grad.to(device=grad_output.device, dtype=grad_output.dtype) * grad_output
        return g, None, None, None, None, None, None


def nce_loss(features, ids, engine, negatives=None, update=True, stats=None, grad_scale=1.0):
    """Functional form of NCEFunction."""
    return NCEFunction.apply(features, ids, engine, negatives, update, stats, grad_scale)


# Methods that hand out the tensor's storage (writable whatever the tensor's guards).
_STORAGE_ACCESS = frozenset({"storage", "_storage", "untyped_storage", "_typed_storage"})

_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__",
})


def _storage_ptr(t: torch.Tensor) -> int:
    with torch._C.DisableTorchFunction():
        return t.storage().data_ptr()


class ReadOnlyBank(torch.Tensor):
    """The engine's bank as a tensor that reads like any other and refuses every write.

    The tensor shares the bank's memory (zero-copy, live: it shows later updates). Writing into it --
    an in-place op (``add_``, ``copy_``, ``index_copy_``, ``x[i] = ...``, ``x += ...``), ``out=`` it,
    or assigning ``.data`` -- raises membank.Error (a ValueError), as numpy does for the read-only
    ``bank.view()``: only the engine's momentum update writes rows (it keeps them unit-norm). Views
    (``t()``, indexing, ``detach()``, ``.data``) stay read-only and ``.numpy()`` is a read-only
    array; results in new memory (``mm``, ``clone()``, ``index_select``) are plain tensors.
    ``.storage()`` is refused too: a storage is writable memory with no read-only mode
    (``torch.save`` and ``copy.deepcopy`` give a plain tensor holding a copy of the rows).
    ``data_ptr()`` is an address, as unguarded as any raw pointer.
    """

    def __reduce_ex__(self, protocol):
        # Pickled (torch.save) as a plain tensor holding a copy of the rows.
        return self.clone().__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return self.clone()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inplace = (name.endswith("_") and not name.endswith("__") and name != "requires_grad_") or \
            name in _INPLACE_DUNDERS
        outs = kwargs.get("out")
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if name in _STORAGE_ACCESS and args and isinstance(args[0], cls):
            raise _membank.Error(
                f"the bank tensor is read-only: {name}() would give writable access to the engine's bank (only "
                "its momentum update writes rows, keeping them unit-norm); use .clone() for a writable copy")
        if (inplace and args and isinstance(args[0], cls)) or any(isinstance(o, cls) for o in outs):
            raise _membank.Error(
                f"the bank tensor is read-only: {name} would write into the engine's bank (only its momentum "
                "update writes rows, keeping them unit-norm); use .clone() for a writable copy")
        protected = {_storage_ptr(a) for a in list(args) + list(kwargs.values()) if isinstance(a, cls)}
        with torch._C.DisableTorchFunction():
            ret = func(*args, **kwargs)
        return _keep_read_only(ret, protected, cls)


def _keep_read_only(ret, protected, cls):
    """Results that share the bank's memory stay read-only; anything else is returned as it is."""
    if isinstance(ret, torch.Tensor):
        if not isinstance(ret, cls) and _storage_ptr(ret) in protected:
            return ret.as_subclass(cls)
        return ret
    if isinstance(ret, np.ndarray) and protected:
        ret.setflags(write=False)
        return ret
    if isinstance(ret, (tuple, list)):
        return type(ret)(_keep_read_only(r, protected, cls) for r in ret)
    return ret


def _bank_tensor(engine) -> torch.Tensor:
    """The engine's bank as a (N, D) tensor of its stored type (torch.float32, float16 or bfloat16), no
    copy, read-only (ReadOnlyBank): writing to it would break the unit-norm invariant, only the engine's
    momentum update writes rows."""
    view = _whole_bank(engine).view()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if engine.dtype == "bfloat16":
            # numpy has no bfloat16 (the view holds the raw uint16 words) and torch 1.13 no uint16: the
            # same bits go in as int16 and are reinterpreted in place (same element size, same strides).
            t = torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(view)  # float32, or float16 (numpy's float16 is the bank's binary16)
        return t.as_subclass(ReadOnlyBank)


_TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_name(dtype) -> str:
    """A bank dtype= value (a name, np.float32 / np.float16, or torch.float32 / float16 / bfloat16) as the
    engine's name; membank.Error naming the value otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _TORCH_DTYPES:
        return _TORCH_DTYPES[dtype]
    return _membank._dtype_name(dtype)


class MemoryBankLoss(nn.Module):
    """Memory bank + loss in one module: ``loss = module(features, ids)``.

    n: instances (bank rows); dim: feature dimension; k: noise draws per query; tau: temperature;
    momentum: bank refresh m; z: None (estimated on the first batch, as Wu et al.) or a fixed Z;
    objective: "nce", "infonce", "dcl", "hcl", "dhel", "kcl", "supcon", "contrastive", "triplet"
    or "full" (docs/objectives.md); the other keywords go to membank.Engine (negatives=
    "per-sample"|"shared", exclude_positive, z_policy, z_ema, seed, normalize_features,
    unit_norm_tolerance, tau_plus, beta, detach_weights, kernel_t, gamma, margin,
    exclude_same_label, labels -- an int64 (N,) array, needed by supcon, contrastive, triplet). bank / sampler: a membank.Bank (e.g. from
    Bank.from_array) and a noise sampler, instead of the default random bank and uniform noise.
    dtype: how the bank stores its rows -- "float32" (None: float32, or the given bank's type),
    "float16" or "bfloat16" (also torch.float16 / torch.bfloat16); ``memory`` is then a tensor of
    that type. rounding: "nearest" (None: nearest, or the given engine's) or "stochastic", how
    refreshed rows of a 2-byte bank are rounded. A dtype / rounding that contradicts the bank or
    engine passed raises membank.Error.

    Data parallel: engine= a membank.DistributedEngine, or comm= (an mpi4py communicator) and
    distributed= ("replicated" or "sharded") to make one (without bank=, each rank builds only the
    rows it holds: DistributedEngine.seeded). forward takes this rank's slice of the global batch and
    returns the global loss. grad_scale: the factor of the gradient backward returns -- None: R, the
    number of ranks, for a DistributedEngine (DDP averages the ranks' parameter gradients: R x this
    rank's rows of dL/df, averaged over R ranks, is the single-process gradient), 1 for an Engine.
    ``memory`` is the bank only where the rank holds all rows (replicated); prefetch and evaluation
    without gradients are not available with a DistributedEngine (membank.Error). Snapshots are
    collective with one: every rank calls save_snapshot, and from_snapshot(path, comm=, distributed=).
    """

    def __init__(self, n: int, dim: int, k: int = 4096, tau: float = 0.07, momentum: float = 0.5,
                 z: Optional[float] = None, *, objective: str = "nce", seed: int = 0, bank=None, sampler=None,
                 engine=None, dtype=None, rounding: Optional[str] = None, comm=None, distributed=None,
                 grad_scale: Optional[float] = None, **engine_options):
        super().__init__()
        if engine is not None and (comm is not None or distributed is not None):
            raise _membank.Error("comm= / distributed= make a new engine: drop them when passing engine=")
        name = None if dtype is None else _dtype_name(dtype)
        given = engine.dtype if engine is not None else bank.dtype if bank is not None else None
        if name is not None and given is not None and name != given:
            raise _membank.Error(f"dtype = {name}: the {'engine' if engine is not None else 'bank'} passed holds "
                                 f"{given} rows: drop dtype= or pass a bank of that dtype")
        if engine is not None and rounding is not None and rounding != engine.config["rounding"]:
            raise _membank.Error(f"rounding = {rounding!r}: the engine passed rounds {engine.config['rounding']}: "
                                 "drop rounding=")
        if engine is None:
            if bank is None:
                bank = _membank.Bank(int(n), int(dim), seed=int(seed), dtype=name or "float32")
            if z is not None and z > 0:
                engine_options.setdefault("z_policy", "fixed")
                engine_options.setdefault("z_fixed", float(z))
            options = dict(k=int(k), tau=float(tau), momentum=float(momentum), objective=objective, seed=int(seed),
                           rounding="nearest" if rounding is None else rounding, **engine_options)
            if comm is not None and bank is None and _membank.has_mpi:
                # each rank builds only its rows: the bank Bank(n, dim, seed, dtype) would be
                engine = _membank.DistributedEngine.seeded(int(n), int(dim), int(seed), name or "float32", sampler,
                                                           comm=comm, distributed=distributed or "replicated",
                                                           **options)
            else:
                if bank is None:
                    bank = _membank.Bank(int(n), int(dim), seed=int(seed), dtype=name or "float32")
                engine = _membank.Engine(bank, sampler, comm=comm, distributed=distributed, **options)
        self.engine = engine
        if grad_scale is None:
            grad_scale = float(engine.ranks) if _is_distributed(engine) else 1.0
        self.grad_scale = float(grad_scale)
        self.last_stats = None

    @classmethod
    def from_snapshot(cls, path: str, *, comm=None, distributed=None, grad_scale: Optional[float] = None):
        """A module continuing the run saved by save_snapshot (bank, Z, step counter, configuration). With
        comm= (collective): over a membank.DistributedEngine in mode distributed ('replicated' | 'sharded'),
        from a snapshot saved by any number of ranks."""
        engine = _membank.load_snapshot(path, comm=comm, distributed=distributed)
        c = engine.config
        n, dim = (engine.n, engine.dim) if _is_distributed(engine) else (engine.bank.n, engine.bank.dim)
        return cls(n, dim, c["k"], c["tau"], c["momentum"], engine=engine, grad_scale=grad_scale)

    def save_snapshot(self, path: str, labels=None, deflate_level: int = 0):
        _membank.save_snapshot(path, self.engine, deflate_level=deflate_level, labels=labels)

    @property
    def memory(self) -> torch.Tensor:
        """The bank as a (N, D) tensor of its stored type -- torch.float32, float16 or bfloat16 -- (zero-copy,
        live: it shows every later update). Read-only like bank.view(): a write into it raises membank.Error
        (ReadOnlyBank); .clone() for a writable copy, .float() for a float32 one."""
        return _bank_tensor(self.engine)

    @property
    def Z(self) -> float:
        """Z of the NCE partition estimate (NaN until the first training step sets it)."""
        return self.engine.z

    def prefetch(self, next_ids) -> bool:
        """Announce the ids of the next forward() (call it as soon as the data loader yields the batch,
        before the encoder runs): the engine draws that step's negatives on a background thread
        meanwhile. Results are unchanged; last_stats.prefetched says whether the step used them."""
        return self.engine.prefetch(_ids(next_ids) if isinstance(next_ids, torch.Tensor) else next_ids)

    def forward(self, features: torch.Tensor, ids: torch.Tensor, negatives=None) -> torch.Tensor:
        update = torch.is_grad_enabled() and features.requires_grad
        sink = []
        loss = NCEFunction.apply(features, ids, self.engine, negatives, update, sink, self.grad_scale)
        self.last_stats = sink[0] if sink else None  # membank.StepStats of this call
        return loss

    def extra_repr(self) -> str:
        c = self.engine.config
        e = self.engine
        where = (f", {e.mode} rank {e.rank} of {e.ranks}, grad_scale={self.grad_scale:g}" if _is_distributed(e)
                 else "")
        n, dim = (e.n, e.dim) if _is_distributed(e) else (e.bank.n, e.bank.dim)
        return (f"n={n}, dim={dim}, dtype={e.dtype}, k={c['k']}, tau={c['tau']}, momentum={c['momentum']}, "
                f"objective={c['objective']}, negatives={c['negatives']}{where}")


class NCEAverage(MemoryBankLoss):
    """Drop-in for lemniscate's ``NCEAverage(inputSize, outputSize, K, T=0.07, momentum=0.5, Z=None)``.

    forward(x, y) takes the same (B, inputSize) L2-normalised features and (B,) instance indices,
    and returns the NCE loss directly (the fused computation; see the module docstring), which
    ``NCECriterion`` passes through. ``memory`` is the bank (zero-copy, read-only), ``params`` holds
    [K, T, Z, momentum] as the reference's buffer does (Z = -1 until the first batch sets it).

    Extra keywords (seed, bank, sampler, negatives, exclude_positive, z_policy, normalize_features,
    ...) go to membank.Engine.
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 Z: Optional[float] = None, **options):
        super().__init__(outputSize, inputSize, K, T, momentum, Z, **options)
        self.nLem = outputSize
        self.K = K

    @property
    def params(self) -> torch.Tensor:
        c = self.engine.config
        z = self.engine.z
        return torch.tensor([c["k"], c["tau"], -1.0 if z != z else z, c["momentum"]])


def reference_nce_criterion(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """The reference NCECriterion formula on a (B, K+1) probability matrix (column 0: the positive),
    with P_n = 1/n_data: -(1/B) sum_i [log(P_i0 / (P_i0 + K Pn + eps)) + sum_k log(K Pn / (P_ik + K Pn + eps))]."""
    batch, k = x.shape[0], x.shape[1] - 1
    kpn = k / float(n_data)
    pos = x[:, 0]
    neg = x[:, 1:]
    ln_pos = torch.log(pos / (pos + kpn + eps))
    ln_neg = torch.log(kpn / (neg + kpn + eps))
    return -(ln_pos.sum() + ln_neg.sum()) / batch


class NCECriterion(nn.Module):
    """Drop-in for lemniscate's ``NCECriterion(nLem)``.

    Given membank's NCEAverage output (the 0-d fused loss) it returns it unchanged; given a
    reference (B, K+1) probability matrix it computes the reference formula (reference_nce_criterion).
    """

    def __init__(self, nLem: int):
        super().__init__()
        self.nLem = nLem

    def forward(self, x: torch.Tensor, targets=None) -> torch.Tensor:
        if x.dim() == 0:
            return x
        return reference_nce_criterion(x, self.nLem)


# ---------------------------------------------------------------------------------------------------------------
# MoCo's queue and SimCLR's in-batch negatives: the same autograd pattern over membank.Queue / membank.InBatch.
# QueueLoss and InBatchLoss take the same forward arguments, (a, b, ids=None, labels=None): switching between
# them is one object.

def _optional_ids(y, name: str, what: str):
    return None if y is None else _ids(y, name, what)


def _grad_like(grad: torch.Tensor, grad_output: torch.Tensor, like) -> torch.Tensor:
    """The engine's float32 CPU gradient times the incoming one, in the dtype and device of the input
    (like: its (dtype, device))."""
    dtype, device = like
    return grad.to(device=device, dtype=dtype) * grad_output.to(device=device, dtype=dtype)


class QueueFunction(torch.autograd.Function):
    """loss = QueueFunction.apply(q, k, queue, ids=None, labels=None, update=True, stats=None, grad_scale=1.0)

    q: (B, D) queries from the encoder being trained; k: (B, D) their positive keys from the momentum
    encoder; queue: a membank.Queue (its objective decides the loss); ids, labels: (B,) integer tensors or
    None (stored with the keys; what exclude_positive and the labelled objectives compare).
    update: True -- one training step: the loss against the queue as it is, then k enqueued (the oldest
    keys go out) and the step counter advanced; False -- evaluate only, the queue unchanged.
    stats: an optional list that receives the step's membank.StepStats; grad_scale: backward returns
    grad_scale x dL/dq.

    With a membank.DistributedQueue (collective), q, k, ids and labels are this rank's slice of the global
    batch, the loss is the global batch's mean (the same on every rank) and dL/dq this rank's rows of its
    gradient; update=False is refused (a distributed queue has no evaluate-only step).

    Returns the 0-d loss (mean over the batch) in q's dtype and device; backward returns dL/dq (times the
    incoming gradient) and no gradient for k: MoCo's keys come from the momentum encoder, which follows
    the trained encoder by a moving average of its parameters (m = 0.999), not by backpropagation.
    Computed in float32 by the engine.
    """

    @staticmethod
    def forward(ctx, q, k, queue, ids=None, labels=None, update=True, stats=None, grad_scale=1.0):
        qa = _features(q, "q")
        ka = _features(k, "k")
        y = _optional_ids(ids, "ids", "instance indices")
        lab = _optional_ids(labels, "labels", "labels")
        if update:
            loss, grad, step_stats = queue.step(qa, ka, y, lab, enqueue=True)
        elif _is_distributed_queue(queue):
            raise _membank.Error(
                "a DistributedQueue has no evaluate-only step (update=False: gradients off, or q that does not "
                "require grad): compute the loss in training mode, or evaluate with a single-process membank.Queue "
                "restored from queue.state()")
        else:
            loss, grad, step_stats = queue.evaluate(qa, ka, y, lab)
        ctx.grad = torch.from_numpy(grad)
        if grad_scale != 1.0:
            ctx.grad.mul_(grad_scale)
        ctx.like = (q.dtype, q.device)
        if stats is not None:
            stats.append(step_stats)
        return torch.tensor(loss, dtype=q.dtype, device=q.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return _grad_like(ctx.grad, grad_output, ctx.like), None, None, None, None, None, None, None


class QueueLoss(nn.Module):
    """MoCo's loss (He et al., CVPR 2020) over a membank.Queue of keys, as an nn.Module.

    ``QueueLoss(queue)`` with a ``membank.Queue``, or ``QueueLoss(capacity, dim, **options)`` to make one
    (options: Queue's keywords -- objective="infonce", tau=0.07, dtype, seed, exclude_positive, ...)::

        criterion = QueueLoss(membank.Queue(65536, 128, tau=0.2, exclude_positive=True))
        q = F.normalize(encoder_q(x_q), dim=1)
        with torch.no_grad():
            momentum_update(encoder_k, encoder_q, m=0.999)
            k = F.normalize(encoder_k(x_k), dim=1)
        loss = criterion(q, k, ids)     # scores q against k and the queue, then enqueues k
        loss.backward()                 # dL/dq; k gets no gradient

    forward(q, k, ids=None, labels=None) returns the 0-d loss (mean over the batch). **Call it once per
    training step**: each training call enqueues that batch's keys (and advances the step counter), as
    MoCo's ``_dequeue_and_enqueue`` does after each forward. Under ``torch.no_grad()`` (or when q does not
    require grad) it only evaluates: the queue does not change. k is detached: it gets no gradient
    (pass the momentum encoder's output). ``last_stats`` holds the last call's membank.StepStats.
    The queue travels in ``state_dict()`` (extra state: Queue.state()), so a checkpoint restores it.

    Data parallel: a ``membank.DistributedQueue`` (``QueueLoss(membank.Queue(..., comm=MPI.COMM_WORLD))``, or
    ``QueueLoss(capacity, dim, comm=...)``): each rank passes its slice of the global batch, the loss is the
    global batch's and every rank's ring stays the single-process ring. grad_scale: the factor of the gradient
    backward returns -- None: R for a DistributedQueue (DDP averages the ranks' parameter gradients, so
    R x this rank's rows gives the single-process gradient of the global batch), 1 for a Queue. Loading a
    state_dict is then collective (DistributedQueue.restore); evaluation under ``torch.no_grad()`` raises.
    """

    def __init__(self, queue, dim: Optional[int] = None, *, grad_scale: Optional[float] = None, **queue_options):
        super().__init__()
        if not isinstance(queue, _membank.Queue) and not _is_distributed_queue(queue):
            if dim is None:
                raise TypeError(f"QueueLoss(queue): expected a membank.Queue (or DistributedQueue), or "
                                f"QueueLoss(capacity, dim, **options); got {type(queue).__name__}")
            queue = _membank.Queue(int(queue), int(dim), **queue_options)
        elif dim is not None or queue_options:
            raise TypeError("QueueLoss(queue): dim and Queue options belong to membank.Queue(...); drop them when "
                            "passing a queue")
        self.queue = queue
        self.grad_scale = _default_grad_scale(grad_scale, _is_distributed_queue(queue), queue)
        self.last_stats = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, ids=None, labels=None) -> torch.Tensor:
        update = torch.is_grad_enabled() and q.requires_grad
        sink = []
        loss = QueueFunction.apply(q, k.detach(), self.queue, ids, labels, update, sink, self.grad_scale)
        self.last_stats = sink[0] if sink else None
        return loss

    def get_extra_state(self):
        return self.queue.state()

    def set_extra_state(self, state):
        self.queue.restore(state)

    def extra_repr(self) -> str:
        c = self.queue.config
        where = (f", rank {self.queue.rank} of {self.queue.ranks}, grad_scale={self.grad_scale:g}"
                 if _is_distributed_queue(self.queue) else "")
        return (f"capacity={self.queue.capacity}, dim={self.queue.dim}, dtype={self.queue.dtype}, "
                f"objective={c['objective']}, tau={c['tau']}, exclude_positive={c['exclude_positive']}{where}")


class InBatchFunction(torch.autograd.Function):
    """loss = InBatchFunction.apply(z_a, z_b, in_batch, ids=None, labels=None, stats=None, grad_scale=1.0)

    z_a, z_b: (B, D) two views of B instances (B >= 2); in_batch: a membank.InBatch (its objective decides
    the loss; infonce is SimCLR's NT-Xent over the 2B samples); ids, labels: (B,) integer tensors or None,
    one per instance. Returns the 0-d loss (mean over the 2B samples) in z_a's dtype and device; backward
    returns grad_scale x dL/dz_a and dL/dz_b (times the incoming gradient). Nothing is stored: no state
    changes. With a membank.DistributedInBatch (collective), the inputs are this rank's slice (B_r >= 1),
    the negatives the whole global batch, the loss the global mean and the gradients this rank's rows.
    """

    @staticmethod
    def forward(ctx, z_a, z_b, in_batch, ids=None, labels=None, stats=None, grad_scale=1.0):
        a = _features(z_a, "z_a")
        b = _features(z_b, "z_b")
        y = _optional_ids(ids, "ids", "instance indices")
        lab = _optional_ids(labels, "labels", "labels")
        loss, grad_a, grad_b, step_stats = in_batch.step(a, b, y, lab)
        ctx.grad_a = torch.from_numpy(grad_a)
        ctx.grad_b = torch.from_numpy(grad_b)
        if grad_scale != 1.0:
            ctx.grad_a.mul_(grad_scale)
            ctx.grad_b.mul_(grad_scale)
        ctx.like = ((z_a.dtype, z_a.device), (z_b.dtype, z_b.device))
        if stats is not None:
            stats.append(step_stats)
        return torch.tensor(loss, dtype=z_a.dtype, device=z_a.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ga = _grad_like(ctx.grad_a, grad_output, ctx.like[0]) if ctx.needs_input_grad[0] else None
        gb = _grad_like(ctx.grad_b, grad_output, ctx.like[1]) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None, None, None, None


class InBatchLoss(nn.Module):
    """SimCLR's loss (Chen et al., ICML 2020): the other samples of the batch as negatives, as an nn.Module.

    ``InBatchLoss(in_batch)`` with a ``membank.InBatch``, or ``InBatchLoss(**options)`` to make one
    (InBatch's keywords: objective="infonce", tau=0.07, exclude_positive, ...)::

        criterion = InBatchLoss(membank.InBatch(tau=0.5))
        z_a = F.normalize(head(encoder(x_a)), dim=1)
        z_b = F.normalize(head(encoder(x_b)), dim=1)
        loss = criterion(z_a, z_b)      # NT-Xent over the 2B samples
        loss.backward()                 # dL/dz_a and dL/dz_b

    forward(z_a, z_b, ids=None, labels=None) -- the arguments QueueLoss takes, so the two swap by changing the
    criterion object -- returns the 0-d loss (mean over the 2B samples). Stateless: any number of calls per
    step. ``last_stats`` holds the last call's membank.StepStats.

    Data parallel: a ``membank.DistributedInBatch`` (``InBatchLoss(membank.InBatch(..., comm=MPI.COMM_WORLD))``
    or ``InBatchLoss(comm=...)``): each rank passes its slice, the negatives are the whole global batch and the
    loss its mean; every call is collective. grad_scale: None -- R for a DistributedInBatch (DDP's averaging
    then gives the single-process gradient of the global batch), 1 for an InBatch.
    """

    def __init__(self, in_batch=None, *, grad_scale: Optional[float] = None, **options):
        super().__init__()
        if in_batch is None:
            in_batch = _membank.InBatch(**options)
        elif not isinstance(in_batch, _membank.InBatch) and not _is_distributed_in_batch(in_batch):
            raise TypeError(f"InBatchLoss(in_batch): expected a membank.InBatch (or DistributedInBatch) or None; got "
                            f"{type(in_batch).__name__}")
        elif options:
            raise TypeError("InBatchLoss(in_batch): the options belong to membank.InBatch(...); drop them when passing "
                            "one")
        self.in_batch = in_batch
        self.grad_scale = _default_grad_scale(grad_scale, _is_distributed_in_batch(in_batch), in_batch)
        self.last_stats = None

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, ids=None, labels=None) -> torch.Tensor:
        sink = []
        loss = InBatchFunction.apply(z_a, z_b, self.in_batch, ids, labels, sink, self.grad_scale)
        self.last_stats = sink[0] if sink else None
        return loss

    def extra_repr(self) -> str:
        c = self.in_batch.config
        where = (f", rank {self.in_batch.rank} of {self.in_batch.ranks}, grad_scale={self.grad_scale:g}"
                 if _is_distributed_in_batch(self.in_batch) else "")
        return f"objective={c['objective']}, tau={c['tau']}, exclude_positive={c['exclude_positive']}{where}"


# ---------------------------------------------------------------------------------------------------------------
# Contrastive multiview coding (Tian et al., CMC): V views, one bank each, every pair of the view graph scored.

class MultiViewFunction(torch.autograd.Function):
    """loss = MultiViewFunction.apply(engine, ids, update, stats, *features)

    engine: a membank.MultiViewEngine; ids: (B,) instance ids; update: True -- one training step (every
    bank refreshed with its view's features after the loss, the counter and the pairs' Z states advance);
    False -- evaluate only, nothing in the engine changes (MultiViewEngine.evaluate: the next step's
    negatives); stats: an optional list that receives the step's membank.MultiViewStats; features: the V
    views' (B, D) tensors (unit rows unless the engine normalises them), in view order.

    Returns the 0-d loss L = sum over the pairs of L_ab (each the mean over the batch) in features[0]'s
    dtype and device; backward returns dL/df^v for every view (times the incoming gradient), each in its
    view's dtype and device. Computed in float32 by the engine.
    """

    @staticmethod
    def forward(ctx, engine, ids, update, stats, *features):
        arrays = [_features(f, f"features[{v}]") for v, f in enumerate(features)]
        y = _ids(ids)
        if update:
            loss, grads, step_stats = engine.step(arrays, y)
        else:
            loss, grads, step_stats = engine.evaluate(arrays, y)
        ctx.grads = [torch.from_numpy(g) for g in grads]
        ctx.like = [(f.dtype, f.device) for f in features]
        if stats is not None:
            stats.append(step_stats)
        return torch.tensor(loss, dtype=features[0].dtype, device=features[0].device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = tuple(_grad_like(g, grad_output, like) if ctx.needs_input_grad[4 + v] else None
                      for v, (g, like) in enumerate(zip(ctx.grads, ctx.like)))
        return (None, None, None, None) + grads


class MultiViewLoss(nn.Module):
    """CMC's loss (Tian et al., ECCV 2020) over a membank.MultiViewEngine, as an nn.Module.

    ``MultiViewLoss(engine)`` with a ``membank.MultiViewEngine``, or ``MultiViewLoss(n, dim, views=2,
    **options)`` to make one (MultiViewEngine's keywords: graph, k, tau, momentum, objective, z_policy,
    seed, dtype, banks, sampler / weights, ...)::

        criterion = MultiViewLoss(membank.MultiViewEngine(n, 128, views=2, k=4096, tau=0.07, momentum=0.5))
        f_l = F.normalize(encoder_l(x_l), dim=1)       # view 0 (e.g. the L channel)
        f_ab = F.normalize(encoder_ab(x_ab), dim=1)    # view 1 (the ab channels)
        loss = criterion([f_l, f_ab], ids)             # L_(0,1) + L_(1,0): each view against the other's bank
        loss.backward()                                # dL/df_l and dL/df_ab

    forward(features, ids): features a list or tuple of the V views' (B, D) tensors; returns the 0-d loss,
    the sum over the scored pairs. A training call (gradients on, some view requiring grad) is one engine
    step: call it once per training step. Under ``torch.no_grad()`` (or when no view requires grad) it only
    evaluates: banks, Z states and the step counter stay as they are. ``last_stats`` holds the last call's
    membank.MultiViewStats (stats.pairs: each pair's StepStats, stats.pair_views: the pairs).
    """

    def __init__(self, engine, dim: Optional[int] = None, views: int = 2, **engine_options):
        super().__init__()
        if not isinstance(engine, _membank.MultiViewEngine):
            if dim is None or isinstance(engine, (_membank.Engine, _membank.Queue, _membank.InBatch)):
                raise TypeError(f"MultiViewLoss(engine): expected a membank.MultiViewEngine, or MultiViewLoss(n, dim, "
                                f"views=2, **options); got {type(engine).__name__}")
            engine = _membank.MultiViewEngine(int(engine), int(dim), int(views), **engine_options)
        elif dim is not None or views != 2 or engine_options:
            raise TypeError("MultiViewLoss(engine): dim, views and the options belong to membank.MultiViewEngine(...); "
                            "drop them when passing an engine")
        self.engine = engine
        self.last_stats = None

    def forward(self, features, ids) -> torch.Tensor:
        if not isinstance(features, (list, tuple)):
            raise TypeError(f"features must be a list or tuple of the V = {self.engine.views} views' (B, D) tensors; "
                            f"got {type(features).__name__}")
        if len(features) != self.engine.views:
            raise ValueError(f"features holds {len(features)} tensors: expected V = {self.engine.views} (one per view)")
        for v, f in enumerate(features):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"features[{v}] must be a torch.Tensor (B, D); got {type(f).__name__}")
        update = torch.is_grad_enabled() and any(f.requires_grad for f in features)
        sink = []
        loss = MultiViewFunction.apply(self.engine, ids, update, sink, *features)
        self.last_stats = sink[0] if sink else None
        return loss

    def bank(self, v: int) -> torch.Tensor:
        """A float32 copy of view v's bank, (N, D)."""
        return torch.from_numpy(self.engine.bank(v))

    def extra_repr(self) -> str:
        c = self.engine.config
        e = self.engine
        return (f"n={e.n}, dim={e.dim}, views={e.views}, graph={e.graph}, k={c['k']}, tau={c['tau']}, "
                f"momentum={c['momentum']}, objective={c['objective']}, negatives={c['negatives']}")
