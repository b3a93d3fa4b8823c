"""The PyTorch example (examples/torch_fashion_mnist.py) runs end to end on a small slice of
Fashion-MNIST: training steps through membank.torch, kNN through membank, a snapshot saved and
verified. Exits 77 (ctest: skipped) without torch or without Debian's dataset-fashion-mnist."""
import os
import subprocess
import sys
import tempfile

DATA = "/usr/share/datasets/fashion-mnist"
try:
    import torch  # noqa: F401
except ImportError:
    print("SKIPPED: torch is not installed (apt-get install python3-torch)")
    sys.exit(77)
if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
    print(f"SKIPPED: {DATA} missing (apt-get install dataset-fashion-mnist)")
    sys.exit(77)

import membank as mb  # noqa: E402

script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch_fashion_mnist.py")
with tempfile.TemporaryDirectory() as d:
    snap = os.path.join(d, "bank.h5")
    out = subprocess.run([sys.executable, script, "--limit", "512", "--epochs", "1", "--k", "64", "--batch", "64",
                          "--threads", "1", "--snapshot", snap], capture_output=True, text=True, timeout=240)
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.returncode
    assert "epoch 0: loss" in out.stdout and "final kNN top-1" in out.stdout
    assert mb.verify_snapshot(snap) == []
    info = mb.read_snapshot_info(snap)
    assert info["n"] == 512 and info["step"] == 512 // 64 and info["has_labels"], info
print("ok")
