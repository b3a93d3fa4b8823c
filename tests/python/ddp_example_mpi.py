"""examples/torch_ddp_fashion_mnist.py under mpirun at a tiny size (1024 images, 2 epochs): it runs to
the end on every rank, reports the ranks and grad_scale = R, the global loss falls from the first
epoch to the last, and the final kNN of the test images against the gathered bank is well above
chance (0.1). Usage: ddp_example_mpi.py MPIEXEC [ARGS...] -- the command line that starts the ranks'
python (e.g. mpiexec -n 2 --oversubscribe /usr/bin/python3). Exits 77 (skipped) without torch, mpi4py
or Debian's dataset-fashion-mnist."""
import importlib.util
import os
import re
import subprocess
import sys

DATA = "/usr/share/datasets/fashion-mnist"
for module in ("torch", "mpi4py"):
    if importlib.util.find_spec(module) is None:
        print(f"SKIPPED: {module} is not installed")
        sys.exit(77)
if not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz")):
    print(f"SKIPPED: {DATA} missing (apt-get install dataset-fashion-mnist)")
    sys.exit(77)
launcher = sys.argv[1:]
ranks = int(launcher[launcher.index("-n") + 1]) if "-n" in launcher else int(launcher[launcher.index("-np") + 1])
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch_ddp_fashion_mnist.py")
epochs = 2
out = subprocess.run(launcher + [script, "--limit", "1024", "--epochs", str(epochs), "--k", "64", "--batch", "64",
                                 "--threads", "1", "--fail-below", "0.5"],
                     capture_output=True, text=True, timeout=240)
print(out.stdout, out.stderr)
assert out.returncode == 0, out.returncode
assert f"1024 training images on {ranks} ranks (sharded bank" in out.stdout and f"grad_scale {ranks}" in out.stdout
assert "epoch 0 (untrained): kNN top-1" in out.stdout
seen = [(int(e), float(loss), float(top1))
        for e, loss, top1 in re.findall(r"^epoch (\d+): loss ([0-9.]+) .* kNN top-1 ([0-9.]+)", out.stdout, re.M)]
assert [e for e, _, _ in seen] == list(range(1, epochs + 1)), seen
assert seen[-1][1] < seen[0][1], f"the loss did not fall: {seen}"
final = float(re.search(r"^final kNN top-1 ([0-9.]+)", out.stdout, re.M).group(1))
assert final == seen[-1][2] and final > 0.5, f"final kNN top-1 {final} (chance: 0.1)"
print("ok")
