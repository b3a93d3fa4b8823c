"""`membank snapshot import` on banks written by Debian's h5py (run by CTest through /usr/bin/python3).

usage: h5py_interop.py MEMBANK_BINARY WORKDIR
h5py writes plain (N, D) float64 and float32 banks, not unit norm; the command line turns them into
snapshots and reports the renormalised rows; h5py checks the imported rows equal numpy's normalised
rows; a NaN is refused and nothing is written. (h5py reading engine snapshots, and the library's
import_bank, are checked by snapshot_h5py.py.)
"""
import os
import subprocess
import sys

import h5py
import numpy as np

membank, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)
        print("FAIL:", what)


# h5py -> engine, through the command line
rng = np.random.default_rng(5)
for dtype in (np.float64, np.float32):
    x = (rng.standard_normal((777, 20)) * 3.0).astype(dtype)
    src = os.path.join(work, f"plain_{np.dtype(dtype).name}.h5")
    out = os.path.join(work, f"imported_{np.dtype(dtype).name}.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("features/train", data=x)
    r = subprocess.run([membank, "snapshot", "import", src, out, "--dataset", "features/train"],
                       check=True, capture_output=True, text=True)
    check("renormalised 777 rows" in r.stdout, f"import reports the renormalised rows: {r.stdout!r}")
    want = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    with h5py.File(out, "r") as f:
        got = f["bank"][...].astype(np.float64)
    check(got.shape == want.shape and np.abs(got - want).max() < 1e-6,
          f"{np.dtype(dtype).name}: imported rows equal numpy's normalised rows")
    # a NaN makes the import fail with a message naming the dataset, and writes nothing
    x[3, 4] = np.nan
    with h5py.File(src, "w") as f:
        f.create_dataset("features/train", data=x)
    bad_out = out + ".bad"
    r = subprocess.run([membank, "snapshot", "import", src, bad_out, "--dataset", "features/train"],
                       capture_output=True, text=True)
    check(r.returncode != 0 and "features/train" in r.stderr and not os.path.exists(bad_out),
          f"NaN import refused: rc {r.returncode}, {r.stderr!r}")

print("h5py interop:", "FAILED" if fails else "ok")
sys.exit(1 if fails else 0)
