#!/usr/bin/python3
"""Instance discrimination (Wu et al., CVPR 2018) on Fashion-MNIST with a small CNN, on the CPU,
through membank.torch: the lemniscate training loop, with membank's NCEAverage / NCECriterion in
place of the reference ones (the only change is the import).

Every training image is its own class: the CNN maps it to a unit 128-d feature, the memory bank
keeps one row per image (60,000 x 128), and the NCE loss with K noise rows from the bank teaches
the CNN to tell each image from the others. Labels are never used for training; after each epoch
a weighted kNN over the bank (k = 200, sigma = tau) measures how well the features sort classes.

    PYTHONPATH=build/python /usr/bin/python3 examples/torch_fashion_mnist.py --epochs 3
    # Debian's dataset-fashion-mnist provides the data (/usr/share/datasets/fashion-mnist)
"""
import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import membank
from membank.torch import NCEAverage, NCECriterion  # was: from lib.NCEAverage / lib.NCECriterion


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
        flip = torch.rand(b) < 0.5
        out = x.clone()
        out[flip] = out[flip].flip(3)
        return out
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


class SmallCNN(nn.Module):
    def __init__(self, dim=128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 14 x 14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7 x 7
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(128, dim)

    def forward(self, x):
        return F.normalize(self.fc(self.features(x).flatten(1)), dim=1)  # the reference's Normalize layer


def embed(net, x, batch=1024):
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)])
    net.train()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=4096, help="noise rows per image (nce_k)")
    ap.add_argument("--tau", type=float, default=0.07, help="temperature (nce_t)")
    ap.add_argument("--momentum", type=float, default=0.5, help="bank momentum (nce_m)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--limit", type=int, default=0, help="use only the first LIMIT training images (0: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--snapshot", default="", help="save the bank (and labels) to this HDF5 file at the end")
    ap.add_argument("--z-policy", default="ema", choices=["first_batch", "ema"],
                    help="Z: tracked by an EMA (default: steadier on small data), or estimated once on the first batch (Wu et al.)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank-init", default="encoder", choices=["encoder", "random"],
                    help="start the bank from the untrained CNN's features (default: what worked for the C++ "
                         "`membank train` in 10 epochs) or from random unit rows (Wu et al.)")
    ap.add_argument("--augment", default="flip", choices=["flip", "crop"],
                    help="flips only (default), or random crops (pad 2) and flips")
    a = ap.parse_args()

    if not os.path.exists(os.path.join(a.data, "train-images-idx3-ubyte.gz")):
        sys.exit(f"{a.data}: no Fashion-MNIST here (apt-get install dataset-fashion-mnist, or pass --data)")
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    membank.set_num_threads(a.threads)
    x_train, y_train = load(a.data, "train")
    x_test, y_test = load(a.data, "test")
    if a.limit:
        x_train, y_train = x_train[:a.limit], y_train[:a.limit]
        x_test, y_test = x_test[:max(a.limit // 6, 100)], y_test[:max(a.limit // 6, 100)]
    ndata = len(x_train)

    net = SmallCNN(128)
    extra = {}
    if a.bank_init == "encoder":
        extra["bank"] = membank.Bank.from_array(np.ascontiguousarray(embed(net, x_train).numpy()))
    lemniscate = NCEAverage(128, ndata, a.k, a.tau, a.momentum, seed=a.seed, z_policy=a.z_policy,
                            **extra)  # the reference's arguments, then membank's own
    criterion = NCECriterion(ndata)
    opt = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    print(f"{ndata} training images, K = {a.k}, tau = {a.tau}, bank {lemniscate.engine.bank}, "
          f"{a.threads} threads", flush=True)

    for epoch in range(a.epochs):
        t0 = time.time()
        perm = torch.randperm(ndata)
        total, steps, t_bank = 0.0, 0, 0.0
        for i in range(0, ndata - a.batch + 1, a.batch):
            index = perm[i:i + a.batch]
            feature = net(augment(x_train[index], a.augment == "crop"))
            tb = time.perf_counter()
            output = lemniscate(feature, index)     # fused NCE: loss; bank refreshed after it
            loss = criterion(output, index)
            t_bank += time.perf_counter() - tb
            opt.zero_grad()
            loss.backward()                         # dL/dfeature into the CNN
            opt.step()
            total += loss.item()
            steps += 1
        # weighted kNN of the test images against the bank (labels only for evaluation)
        r = membank.knn_evaluate(lemniscate.engine.bank, y_train.numpy(), embed(net, x_test).numpy(),
                                 y_test.numpy(), k=200, sigma=a.tau)
        print(f"epoch {epoch}: loss {total / max(steps, 1):.4f}  Z {lemniscate.Z:.4g}  kNN top-1 {r.top1:.4f} "
              f"top-5 {r.top5:.4f} 1-NN {r.nn1:.4f}  ({time.time() - t0:.1f} s, of which membank "
              f"{t_bank:.2f} s)", flush=True)

    if a.snapshot:
        lemniscate.save_snapshot(a.snapshot, labels=y_train.numpy())
        print(f"bank saved to {a.snapshot}")
    print(f"final kNN top-1 {r.top1:.4f}")


if __name__ == "__main__":
    main()
