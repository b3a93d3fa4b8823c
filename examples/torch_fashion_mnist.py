#!/usr/bin/python3
"""Instance discrimination (Wu et al., CVPR 2018) on Fashion-MNIST on the CPU through membank.torch:
the lemniscate training loop, with membank's NCEAverage / NCECriterion in place of the reference
ones (the only change is the import).

Every training image is its own class: the encoder maps it to a unit 128-d feature, the memory bank
keeps one row per image (60,000 x 128), and the NCE loss with K noise rows from the bank teaches
the encoder to tell each image from the others. Labels are never used for training; before training
and after each epoch a weighted kNN of the test images against the bank (k = 200, sigma = tau, the
protocol of `membank train`) measures how well the features sort classes.

The defaults are the recipe of the C++ trainer (`membank train`): an MLP 784-512-128 (He-initialised),
horizontal flips, the bank started from the untrained encoder's features, Z followed by an EMA,
K = 4096, tau = 0.07, m = 0.5, SGD with momentum 0.9 and weight decay 5e-4 on the weights, a cosine
learning rate from 0.03 over 10 epochs of B = 256. `--encoder cnn` is a small CNN with BatchNorm
(running statistics are re-estimated on the training images before each evaluation).

    PYTHONPATH=build/python /usr/bin/python3 examples/torch_fashion_mnist.py
    # Debian's dataset-fashion-mnist provides the data (/usr/share/datasets/fashion-mnist)
"""
import argparse
import gzip
import math
import os
import sys
import time

# OpenMP threads that wait by sleeping, not spinning: torch and membank alternate many short parallel
# regions, and on a machine shared with other jobs spinning waiters made an epoch 6 to 10 times slower
# here. Must be set before torch (libgomp) starts; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import membank  # noqa: E402
from membank.torch import NCEAverage, NCECriterion  # noqa: E402  (was: lib.NCEAverage / lib.NCECriterion)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(root, split):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - 0.2860) / 0.3530, torch.from_numpy(y.astype(np.int64))


def augment(x, crops):
    """Horizontal flips, and (crops=True) random crops (pad 2, 28 x 28), per image."""
    b = x.shape[0]
    if not crops:
        return torch.where((torch.rand(b) < 0.5)[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    i = torch.randint(0, 5, (b,))
    j = torch.randint(0, 5, (b,))
    rows = (i[:, None] + torch.arange(28)[None, :])[:, None, :, None].expand(b, 1, 28, 32)
    out = torch.gather(padded, 2, rows)
    cols = (j[:, None] + torch.arange(28)[None, :])[:, None, None, :].expand(b, 1, 28, 28)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(b) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def dense(layer, x):
    """layer(x) for an nn.Linear, computed as a 1 x 1 convolution: the same product, but through
    oneDNN. Debian's torch sends nn.Linear to the reference (netlib) BLAS, single-threaded and about
    6 times slower here than oneDNN's convolution on one thread."""
    return F.conv2d(x[:, :, None, None], layer.weight[:, :, None, None], layer.bias).flatten(1)


class Mlp(nn.Module):
    """z = W2 relu(W1 x + b1) + b2, normalised; He-normal weights and zero biases, as `membank train`."""

    def __init__(self, width=512, dim=128):
        super().__init__()
        self.fc1 = nn.Linear(784, width)
        self.fc2 = nn.Linear(width, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=math.sqrt(2.0 / fc.in_features))
            nn.init.zeros_(fc.bias)

    def forward(self, x):
        h = F.relu(dense(self.fc1, x.flatten(1)))
        return F.normalize(dense(self.fc2, h), dim=1)  # the reference's Normalize layer


class SmallCNN(nn.Module):
    def __init__(self, width=128, dim=128):
        super().__init__()
        c = max(width // 4, 1)
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),                  # 14 x 14
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),          # 7 x 7
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4 * c, dim)

    def forward(self, x):
        return F.normalize(dense(self.fc, self.features(x).flatten(1)), dim=1)


def has_batchnorm(net):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def recalibrate_batchnorm(net, x, batch=1024):
    """Set every BatchNorm's running statistics to the exact mean and (unbiased) variance of its input
    over x (the unaugmented training images) in eval mode, one layer after the other, so that
    eval-mode features use the statistics of the data, not a momentum average of batch statistics
    taken while the weights moved."""
    net.eval()
    with torch.no_grad():
        for bn in [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            acc = {"n": 0, "s": 0.0, "s2": 0.0}

            def hook(module, inputs):
                t = inputs[0].double().transpose(0, 1).flatten(1)  # channels x (images * pixels)
                acc["n"] += t.shape[1]
                acc["s"] = acc["s"] + t.sum(1)
                acc["s2"] = acc["s2"] + (t * t).sum(1)

            handle = bn.register_forward_pre_hook(hook)
            for i in range(0, len(x), batch):
                net(x[i:i + batch])
            handle.remove()
            mean = acc["s"] / acc["n"]
            var = (acc["s2"] - acc["n"] * mean * mean).clamp_min(0.0) / max(acc["n"] - 1, 1)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    net.train()


def embed(net, x, batch=1024):
    """Unit features of x in eval mode (no augmentation)."""
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])
    net.train()
    return np.ascontiguousarray(out.numpy())


def knn(bank, bank_labels, queries, query_labels, tau):
    return membank.knn_evaluate(bank, bank_labels, queries, query_labels, k=200, sigma=tau)



def load_splits(a, ap):
    """The training and test images and labels under --data, cut to --limit (a sixth as many test
    images, at least 100); an error through the argument parser when the kNN (k = 200) or one batch
    would have too few training images."""
    x_train, y_train = load(a.data, "train")
    x_test, y_test = load(a.data, "test")
    if a.limit:
        x_train, y_train = x_train[:a.limit], y_train[:a.limit]
        x_test, y_test = x_test[:max(a.limit // 6, 100)], y_test[:max(a.limit // 6, 100)]
    if len(x_train) < max(a.batch, 200):
        ap.error(f"--limit {a.limit}: the kNN (k = 200) and one batch of {a.batch} need at least "
                 f"max(200, batch) training images")
    return x_train, y_train, x_test, y_test


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--encoder", default="mlp", choices=["mlp", "cnn"],
                    help="mlp: 784-W-128 (default, as `membank train`); cnn: three 3x3 conv + BatchNorm blocks")
    ap.add_argument("--width", type=int, default=0, help="hidden units of the MLP (default 512) or channels of "
                    "the CNN's last conv (default 128)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=4096, help="noise rows per image (nce_k)")
    ap.add_argument("--tau", type=float, default=0.07, help="temperature (nce_t), also the kNN's sigma")
    ap.add_argument("--momentum", type=float, default=0.5, help="bank momentum (nce_m)")
    ap.add_argument("--lr", type=float, default=0.03, help="initial SGD learning rate (cosine schedule to 0 over "
                    "the steps, momentum 0.9)")
    ap.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay of the weights (not biases, "
                    "not BatchNorm)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first LIMIT training images and LIMIT / 6 "
                    "test images (0: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--snapshot", default="", help="save the bank (and labels) to this HDF5 file at the end")
    ap.add_argument("--z-policy", default="ema", choices=["first_batch", "ema"],
                    help="Z: tracked by an EMA (default), or estimated once on the first batch (Wu et al.)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bank-init", default="encoder", choices=["encoder", "random"],
                    help="start the bank from the untrained encoder's features (default, as `membank train`) "
                         "or from random unit rows (Wu et al.)")
    ap.add_argument("--augment", default="flip", choices=["flip", "crop"],
                    help="flips only (default), or random crops (pad 2) and flips")
    ap.add_argument("--fresh-knn", action="store_true",
                    help="also measure the kNN against the training images encoded afresh after each epoch")
    a = ap.parse_args()
    for name in ("epochs", "batch", "k", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name}: expected an integer >= 1, got {getattr(a, name)}")
    if a.width < 0 or a.limit < 0:
        ap.error("--width and --limit: expected an integer >= 0")
    if not (a.lr > 0 and a.tau > 0 and 0 <= a.momentum < 1 and a.weight_decay >= 0):
        ap.error("expected --lr > 0, --tau > 0, 0 <= --momentum < 1, --weight-decay >= 0")

    if not os.path.exists(os.path.join(a.data, "train-images-idx3-ubyte.gz")):
        sys.exit(f"{a.data}: no Fashion-MNIST here (apt-get install dataset-fashion-mnist, or pass --data)")
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    membank.set_num_threads(a.threads)
    x_train, y_train, x_test, y_test = load_splits(a, ap)
    ndata = len(x_train)
    train_labels, test_labels = y_train.numpy(), y_test.numpy()

    t_start = time.time()
    if a.encoder == "mlp":
        net = Mlp(a.width or 512, 128)
    else:
        net = SmallCNN(a.width or 128, 128)
    batchnorm = has_batchnorm(net)
    if batchnorm:
        recalibrate_batchnorm(net, x_train)
    start = embed(net, x_train)
    r = knn(membank.Bank.from_array(start), train_labels, embed(net, x_test), test_labels, a.tau)
    extra = {}
    if a.bank_init == "encoder":
        extra["bank"] = membank.Bank.from_array(start)
    del start
    lemniscate = NCEAverage(128, ndata, a.k, a.tau, a.momentum, seed=a.seed, z_policy=a.z_policy,
                            **extra)  # the reference's arguments, then membank's own
    criterion = NCECriterion(ndata)
    weights = [p for p in net.parameters() if p.dim() > 1]
    others = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": a.weight_decay},
                           {"params": others, "weight_decay": 0.0}], lr=a.lr, momentum=0.9)
    print(f"{ndata} training images, {net.__class__.__name__} {a.width or (512 if a.encoder == 'mlp' else 128)}, "
          f"K = {a.k}, tau = {a.tau}, m = {a.momentum}, B = {a.batch}, lr = {a.lr}, {a.epochs} epochs, "
          f"bank {lemniscate.engine.bank}, {a.threads} threads", flush=True)
    print(f"epoch 0 (untrained): kNN top-1 {r.top1:.4f} top-5 {r.top5:.4f} 1-NN {r.nn1:.4f}", flush=True)

    steps_per_epoch = ndata // a.batch
    total_steps = a.epochs * steps_per_epoch
    for epoch in range(1, a.epochs + 1):
        t0 = time.time()
        perm = torch.randperm(ndata)
        total, steps, t_bank = 0.0, 0, 0.0
        net.train()
        for s in range(steps_per_epoch):
            t = ((epoch - 1) * steps_per_epoch + s) / total_steps
            for group in opt.param_groups:
                group["lr"] = a.lr * 0.5 * (1.0 + math.cos(math.pi * t))
            index = perm[s * a.batch:(s + 1) * a.batch]
            feature = net(augment(x_train[index], a.augment == "crop"))
            tb = time.perf_counter()
            output = lemniscate(feature, index)     # fused NCE: loss; bank refreshed after it
            loss = criterion(output, index)
            t_bank += time.perf_counter() - tb
            opt.zero_grad()
            loss.backward()                         # dL/dfeature into the encoder
            opt.step()
            total += loss.item()
            steps += 1
        if not math.isfinite(total):
            sys.exit(f"the loss became {total / steps} at epoch {epoch} (lower --lr)")
        if batchnorm:
            recalibrate_batchnorm(net, x_train)
        # weighted kNN of the test images against the bank (labels only for evaluation)
        test_features = embed(net, x_test)
        r = knn(lemniscate.engine.bank, train_labels, test_features, test_labels, a.tau)
        print(f"epoch {epoch}: loss {total / steps:.4f}  Z {lemniscate.Z:.4g}  kNN top-1 {r.top1:.4f} "
              f"top-5 {r.top5:.4f} 1-NN {r.nn1:.4f}  ({time.time() - t0:.1f} s, of which membank "
              f"{t_bank:.1f} s)", flush=True)
        if a.fresh_knn:
            f = knn(membank.Bank.from_array(embed(net, x_train)), train_labels, test_features, test_labels, a.tau)
            print(f"         re-encoded training images: kNN top-1 {f.top1:.4f} 1-NN {f.nn1:.4f}", flush=True)

    if a.snapshot:
        lemniscate.save_snapshot(a.snapshot, labels=train_labels)
        print(f"bank saved to {a.snapshot}")
    print(f"final kNN top-1 {r.top1:.4f}  ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
