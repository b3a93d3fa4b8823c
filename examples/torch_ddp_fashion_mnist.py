#!/usr/bin/python3
"""Instance discrimination on Fashion-MNIST with torch DistributedDataParallel and one membank bank
shared by the ranks (membank.DistributedEngine over MPI), launched by mpirun:

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \\
    PYTHONPATH=build/python mpirun -np 2 --oversubscribe --mca btl self,vader \\
        /usr/bin/python3 examples/torch_ddp_fashion_mnist.py --threads 1
    # the OMPI_ALLOW_RUN_AS_ROOT* variables only when running as root (containers, CI)

The recipe is examples/torch_fashion_mnist.py's (same encoder, data, augmentation and defaults); what
changes is who does what. Each step draws one global batch of B images (the same permutation on every
rank) and rank r encodes its slice of it. DDP keeps the R encoder copies in step, and the bank is one
logical bank over the ranks: `--distributed sharded` (default) splits its rows between them (N / R rows
each), `replicated` gives every rank all of them. The loss each rank's forward returns is the global
batch's (the single-process loss of the B images), and its backward gives R x that rank's rows of
dL/df (membank.torch's grad_scale), so that DDP's averaging of the parameter gradients over the R ranks
gives the single-process gradient of the global batch.

Rank 0 prints the loss and, after each epoch, the weighted kNN (k = 200, sigma = tau) of the test
images against the bank, gathered on rank 0; the last line is the final-epoch kNN top-1.
`--limit 1024 --epochs 2 --k 64 --batch 64` is a run of seconds (the test suite runs it).
"""
import argparse
import math
import os
import socket
import sys
import time

# the single-process example's data, encoders and evaluation helpers (and its OMP_WAIT_POLICY default)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_fashion_mnist as single  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import membank  # noqa: E402
from membank.torch import MemoryBankLoss  # noqa: E402


def init_process_group(comm):
    """torch.distributed (gloo) over the MPI ranks: MASTER_ADDR 127.0.0.1 (all ranks on this machine)
    and a free port chosen by rank 0, broadcast to the others."""
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)


def batch_slice(batch, ranks, rank):
    """Rank `rank`'s rows of a global batch: contiguous, the first batch mod R ranks one row more."""
    base, extra = divmod(batch, ranks)
    begin = rank * base + min(rank, extra)
    return slice(begin, begin + base + (1 if rank < extra else 0))


def main():
    comm = MPI.COMM_WORLD
    rank, ranks = comm.rank, comm.size
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--distributed", default="sharded", choices=["sharded", "replicated"],
                    help="sharded: each rank holds N / R bank rows (default); replicated: every rank all N")
    ap.add_argument("--encoder", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--width", type=int, default=0, help="hidden units of the MLP (default 512) or channels of "
                    "the CNN's last conv (default 128)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256, help="the global batch B (each rank encodes about B / R)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--tau", type=float, default=0.07)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--limit", type=int, default=0, help="use only the first LIMIT training images and LIMIT / 6 "
                    "test images (0: all)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // ranks),
                    help="threads per rank (default: the cores / R)")
    ap.add_argument("--z-policy", default="ema", choices=["first_batch", "ema"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fail-below", type=float, default=0.0,
                    help="exit with status 1 when the final kNN top-1 is below this (a gate for tests)")
    a = ap.parse_args()
    for name in ("epochs", "batch", "k", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name}: expected an integer >= 1, got {getattr(a, name)}")
    if a.batch < ranks:
        ap.error(f"--batch {a.batch}: expected at least one image per rank (R = {ranks})")
    if not os.path.exists(os.path.join(a.data, "train-images-idx3-ubyte.gz")):
        sys.exit(f"{a.data}: no Fashion-MNIST here (apt-get install dataset-fashion-mnist, or pass --data)")

    init_process_group(comm)
    torch.set_num_threads(a.threads)
    membank.set_num_threads(a.threads)
    x_train, y_train, x_test, y_test = single.load_splits(a, ap)
    ndata = len(x_train)
    train_labels, test_labels = y_train.numpy(), y_test.numpy()

    t_start = time.time()
    torch.manual_seed(a.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = single.Mlp(a.width or 512, 128) if a.encoder == "mlp" else single.SmallCNN(a.width or 128, 128)
    batchnorm = single.has_batchnorm(net)
    if batchnorm:
        single.recalibrate_batchnorm(net, x_train)
    # The bank starts from the untrained encoder's features, computed on rank 0 and broadcast: every rank
    # gives the engine the same rows (replicated: checked; sharded: each keeps its own).
    start = single.embed(net, x_train) if rank == 0 else np.empty((ndata, 128), np.float32)
    comm.Bcast(start, root=0)
    criterion = MemoryBankLoss(ndata, 128, a.k, a.tau, a.momentum, seed=a.seed, z_policy=a.z_policy,
                               bank=membank.Bank.from_array(start), comm=comm, distributed=a.distributed)
    engine = criterion.engine
    if rank == 0:
        r0 = single.knn(membank.Bank.from_array(start), train_labels, single.embed(net, x_test), test_labels, a.tau)
    del start
    model = DistributedDataParallel(net)
    torch.manual_seed(a.seed * 1000 + 1 + rank)  # augmentation: each rank its own draws
    weights = [p for p in net.parameters() if p.dim() > 1]
    others = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": a.weight_decay},
                           {"params": others, "weight_decay": 0.0}], lr=a.lr, momentum=0.9)
    mine = batch_slice(a.batch, ranks, rank)
    if rank == 0:
        print(f"{ndata} training images on {ranks} ranks ({a.distributed} bank: rank 0 holds rows "
              f"[{engine.rows[0]}, {engine.rows[1]}) of {engine.n}), {net.__class__.__name__}, K = {a.k}, "
              f"tau = {a.tau}, m = {a.momentum}, global B = {a.batch} ({mine.stop - mine.start} on rank 0), "
              f"lr = {a.lr}, {a.epochs} epochs, {a.threads} threads per rank, grad_scale {criterion.grad_scale:g}",
              flush=True)
        print(f"epoch 0 (untrained): kNN top-1 {r0.top1:.4f} top-5 {r0.top5:.4f} 1-NN {r0.nn1:.4f}", flush=True)

    steps_per_epoch = ndata // a.batch
    total_steps = a.epochs * steps_per_epoch
    top1 = float("nan")
    for epoch in range(1, a.epochs + 1):
        t0 = time.time()
        # the same permutation on every rank: the ranks' slices make up each global batch
        perm = torch.randperm(ndata, generator=torch.Generator().manual_seed(a.seed * 7919 + epoch))
        total, wire = 0.0, 0
        net.train()
        for s in range(steps_per_epoch):
            t = ((epoch - 1) * steps_per_epoch + s) / total_steps
            for group in opt.param_groups:
                group["lr"] = a.lr * 0.5 * (1.0 + math.cos(math.pi * t))
            index = perm[s * a.batch:(s + 1) * a.batch][mine]
            feature = model(single.augment(x_train[index], False))
            loss = criterion(feature, index)  # the global batch's loss; this rank's rows of dL/df
            opt.zero_grad()
            loss.backward()                   # DDP averages the ranks' gradients
            opt.step()
            total += loss.item()
            wire += engine.last_wire["bytes_sent"]
        if not math.isfinite(total):
            raise SystemExit(f"the loss became {total / steps_per_epoch} at epoch {epoch} (lower --lr)")
        if batchnorm:
            single.recalibrate_batchnorm(net, x_train)
        rows = engine.gather_bank(0)  # collective: the whole bank on rank 0
        if rank == 0:
            r = single.knn(membank.Bank.from_array(rows), train_labels, single.embed(net, x_test), test_labels, a.tau)
            top1 = r.top1
            print(f"epoch {epoch}: loss {total / steps_per_epoch:.4f}  Z {criterion.Z:.4g}  kNN top-1 {r.top1:.4f} "
                  f"top-5 {r.top5:.4f} 1-NN {r.nn1:.4f}  ({time.time() - t0:.1f} s; membank sent "
                  f"{wire / steps_per_epoch / 1024:.1f} KiB per step from rank 0)", flush=True)
        del rows
    top1 = comm.bcast(top1, root=0)
    if rank == 0:
        print(f"final kNN top-1 {top1:.4f}  ({time.time() - t_start:.0f} s, {ranks} ranks)", flush=True)
    dist.destroy_process_group()
    if top1 < a.fail_below:
        if rank == 0:
            print(f"FAILED: final kNN top-1 {top1:.4f} is below --fail-below {a.fail_below}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
