"""`membank snapshot import` on banks written by Debian's h5py (run by CTest through /usr/bin/python3).

usage: h5py_interop.py MEMBANK_BINARY WORKDIR
h5py writes plain (N, D) float64 and float32 banks, not unit norm; the command line turns them into
snapshots and reports the renormalised rows; h5py checks the imported rows equal numpy's normalised
rows; a NaN is refused and nothing is written. 2-byte banks: `import --dtype float16` writes a bank
that h5py reads as numpy float16 with no plugin (rows unit in float32 equal numpy's rounding of them,
the others numpy's rounding of the normalised rows to within one float16 step), `--dtype bfloat16` one
of uint16 words named by the dataset's dtype attribute (numpy's round-to-nearest-even of the upper half
of each float32); `export --dtype float32` gives h5py those values widened exactly; a float16 dataset
that h5py wrote imports with its values exactly. (h5py reading engine snapshots, and the library's
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

# 2-byte banks: engine -> h5py, through the command line
x = rng.standard_normal((777, 20)) * 3.0
unit_first = 100
x32 = x.astype(np.float32)
x32[:unit_first] = (x[:unit_first] / np.linalg.norm(x[:unit_first], axis=1, keepdims=True)).astype(np.float32)
src = os.path.join(work, "plain_for_2byte.h5")
with h5py.File(src, "w") as f:
    f.create_dataset("x", data=x32)
normalised = (x32.astype(np.float64) / np.linalg.norm(x32.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def bf16_words(v):
    """numpy's round to nearest, ties to even, of float32 values to their upper 16 bits."""
    u = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(w):
    return (w.astype(np.uint32) << 16).view(np.float32)


for dtype in ("float16", "bfloat16"):
    out = os.path.join(work, f"imported_{dtype}.h5")
    r = subprocess.run([membank, "snapshot", "import", src, out, "--dataset", "x", "--dtype", dtype],
                       capture_output=True, text=True)
    check(r.returncode == 0 and f"as {dtype}" in r.stdout,
          f"{dtype}: import: rc {r.returncode} {r.stdout!r} {r.stderr!r}")
    if r.returncode != 0:
        continue
    with h5py.File(out, "r") as f:
        bank = f["bank"]
        check(str(f.attrs["dtype"]) == dtype and bank.attrs["dtype"] == dtype,
              f"{dtype}: dtype attributes {f.attrs['dtype']!r} {bank.attrs['dtype']!r}")
        got = bank[...]
    if dtype == "float16":
        check(got.dtype == np.float16, f"float16: h5py reads the bank as {got.dtype}, expected float16")
        check(np.array_equal(got[:unit_first].view(np.uint16), x32[:unit_first].astype(np.float16).view(np.uint16)),
              "float16: unit rows equal numpy's float16 rounding bit for bit")
        want = normalised[unit_first:].astype(np.float16)
        step = np.spacing(np.abs(want)).astype(np.float64)
        check(np.all(np.abs(got[unit_first:].astype(np.float64) - want.astype(np.float64)) <= step),
              "float16: renormalised rows within one float16 step of numpy's rounding of the normalised rows")
        wide = got.astype(np.float32)
    else:
        check(got.dtype == np.uint16, f"bfloat16: h5py reads the bank as {got.dtype}, expected uint16 words")
        check(np.array_equal(got[:unit_first], bf16_words(x32[:unit_first])),
              "bfloat16: unit rows equal numpy's bfloat16 rounding bit for bit")
        want = bf16_values(bf16_words(normalised[unit_first:])).astype(np.float64)
        step = np.abs(want) * 2.0 ** -7
        check(np.all(np.abs(bf16_values(got[unit_first:]).astype(np.float64) - want) <= step),
              "bfloat16: renormalised rows within one bfloat16 step of numpy's rounding of the normalised rows")
        wide = bf16_values(got)
    dev = np.abs(np.linalg.norm(wide.astype(np.float64), axis=1) - 1).max()
    check(dev < 4 * (2.0 ** -11 if dtype == "float16" else 2.0 ** -8), f"{dtype}: rows unit to the type ({dev})")
    # export --dtype float32: the stored values widened exactly
    plain = os.path.join(work, f"exported_{dtype}.h5")
    r = subprocess.run([membank, "snapshot", "export", out, plain, "--dtype", "float32"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"{dtype}: export: rc {r.returncode} {r.stderr!r}")
    if r.returncode == 0:
        with h5py.File(plain, "r") as f:
            e = f["bank"][...]
        check(e.dtype == np.float32 and np.array_equal(e.view(np.uint32), wide.view(np.uint32)),
              f"{dtype}: export --dtype float32 holds the stored values widened exactly")

# h5py -> engine: a float16 dataset is read exactly
x16 = x.astype(np.float16)
with h5py.File(src, "a") as f:
    f.create_dataset("x16", data=x16)
out = os.path.join(work, "imported_from_float16.h5")
r = subprocess.run([membank, "snapshot", "import", src, out, "--dataset", "x16"], capture_output=True, text=True)
check(r.returncode == 0, f"float16 dataset import: rc {r.returncode} {r.stderr!r}")
if r.returncode == 0:
    with h5py.File(out, "r") as f:
        got = f["bank"][...].astype(np.float64)
    x16d = x16.astype(np.float64)
    check(np.abs(got - x16d / np.linalg.norm(x16d, axis=1, keepdims=True)).max() < 1e-6,
          "float16 dataset: imported rows equal numpy's normalised float16 rows")

print("h5py interop:", "FAILED" if fails else "ok")
sys.exit(1 if fails else 0)
