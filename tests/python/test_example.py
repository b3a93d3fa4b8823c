"""The PyTorch example (examples/torch_fashion_mnist.py) runs end to end on a small slice of
Fashion-MNIST, for the default MLP and for the BatchNorm CNN: training steps through membank.torch
(the NCE loss falls from the first epoch to the last), kNN through membank (well above chance), the
snapshot saved and verified. Its helpers are checked against independent computations: the
oneDNN-routed linear layer against float64 F.linear, the BatchNorm recalibration against the batch
statistics computed directly. Exits 77 (ctest: skipped) without torch or without Debian's
dataset-fashion-mnist."""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

DATA = "/usr/share/datasets/fashion-mnist"
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("SKIPPED: torch is not installed (apt-get install python3-torch)")
    sys.exit(77)
if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
    print(f"SKIPPED: {DATA} missing (apt-get install dataset-fashion-mnist)")
    sys.exit(77)

import membank as mb  # noqa: E402

script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch_fashion_mnist.py")
spec = importlib.util.spec_from_file_location("torch_fashion_mnist", script)
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
torch.manual_seed(0)

# dense(): the same product as nn.Linear, within float32 rounding of a float64 reference.
layer = torch.nn.Linear(300, 70)
x = torch.randn(33, 300)
ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
assert ex.dense(layer, x).shape == (33, 70)
err = (ex.dense(layer, x).double() - ref).abs().max().item()
assert err < 1e-5 * ref.abs().max().item(), err

# recalibrate_batchnorm(): each BatchNorm's running statistics become the exact mean and (unbiased)
# variance of its input over all the images in eval mode (the layers before it using their new
# statistics), whatever they were before and however the images are batched.
net = ex.SmallCNN(16, 8)
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.fill_(5.0)
        m.running_var.fill_(7.0)
images = torch.randn(50, 1, 28, 28)
ex.recalibrate_batchnorm(net, images, batch=16)
assert net.training
net.eval()
for where in (1, 5, 9):  # the three BatchNorm layers of net.features
    with torch.no_grad():
        h = net.features[:where](images).double()  # the layer's input, computed in one batch
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)
    bn = net.features[where]
    assert isinstance(bn, torch.nn.BatchNorm2d), bn
    assert (bn.running_mean.double() - mean).abs().max().item() < 1e-5 * (1 + mean.abs().max().item()), where
    assert ((bn.running_var.double() - var).abs() / var).max().item() < 1e-4, where
net.train()

EPOCH = re.compile(r"^epoch (\d+): loss ([0-9.]+) .* kNN top-1 ([0-9.]+)", re.M)


def run(extra, limit, epochs, batch, snap, min_knn):
    out = subprocess.run([sys.executable, script, "--limit", str(limit), "--epochs", str(epochs), "--k", "64",
                          "--batch", str(batch), "--threads", "1", "--snapshot", snap] + extra,
                         capture_output=True, text=True, timeout=600)
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.returncode
    assert "epoch 0 (untrained): kNN top-1" in out.stdout and "final kNN top-1" in out.stdout
    epochs_seen = [(int(e), float(loss), float(top1)) for e, loss, top1 in EPOCH.findall(out.stdout)]
    assert [e for e, _, _ in epochs_seen] == list(range(1, epochs + 1)), epochs_seen
    first, last = epochs_seen[0], epochs_seen[-1]
    assert last[1] < first[1], f"the loss did not fall: {epochs_seen}"
    assert last[2] > min_knn, f"kNN top-1 {last[2]}: not above {min_knn} (chance: 0.1, 10 classes)"
    assert mb.verify_snapshot(snap) == []
    info = mb.read_snapshot_info(snap)
    assert info["n"] == limit and info["step"] == epochs * (limit // batch) and info["has_labels"], info


with tempfile.TemporaryDirectory() as d:
    run([], 1024, 3, 64, os.path.join(d, "mlp.h5"), 0.5)
    # a narrow CNN (4-8-16 channels, global average pool) on 512 images: weak features, but the loss
    # falls and the kNN over 100 test images stays well clear of chance (0.2 is 3 standard deviations)
    run(["--encoder", "cnn", "--width", "16", "--lr", "0.01"], 512, 3, 64, os.path.join(d, "cnn.h5"), 0.2)
    # bad options: one clear message, exit status 2 (argparse), nothing trained
    bad = subprocess.run([sys.executable, script, "--epochs", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--epochs: expected an integer >= 1, got 0" in bad.stderr, bad.stderr
print("ok")
