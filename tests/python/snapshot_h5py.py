"""Snapshot interoperability with Debian's h5py and numpy (CTest runs it through /usr/bin/python3).

usage: snapshot_h5py.py read|import SNAPSHOT_WRITER WORKDIR

read:   the engine writes snapshots (snapshot_writer write: uniform and alias samplers, deflate 0 and 4,
        labels, the bank also dumped raw); h5py reads them and checks the layout the format promises
        (bank (N, D) float32 chunked by whole rows, fletcher32 on every dataset, attributes, the dtype
        float32 named at the root and on the bank) and the values (bank and last_update equal the
        engine's bit for bit, unit rows, labels). Reading a whole dataset through h5py also checks the
        engine's own fletcher32 checksums with HDF5's filter.
import: h5py writes plain (N, D) float64 and float32 datasets, not unit norm, contiguous and chunked
        the way h5py chunks (column blocks, gzip); snapshot_writer import runs import_bank on each and
        saves the result; h5py checks the rows equal numpy's normalised rows to 1e-6, the reported
        renormalised count, and that bad inputs (NaN, integers) are refused with the dataset named.
Exit status 0 when every check passes; each failed check prints a FAIL line.
"""
import os
import subprocess
import sys

import h5py
import numpy as np

mode, writer, work = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(work, exist_ok=True)
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)
        print("FAIL:", what)


def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def run_read():
    n, d, steps = 12001, 48, 3  # 5461 rows a chunk: 3 chunks, the last one partial
    want_chunk_rows = min(n, (1 << 20) // (4 * d))
    for alias, deflate in ((False, 0), (True, 4), (False, 4), (True, 0)):
        tag = f"{'alias' if alias else 'uniform'}-deflate{deflate}"
        snap = os.path.join(work, f"{tag}.h5")
        raw = os.path.join(work, f"{tag}.f32")
        cmd = [writer, "write", snap, "--n", str(n), "--dim", str(d), "--steps", str(steps), "--deflate",
               str(deflate), "--labels", "--raw", raw] + (["--alias"] if alias else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        check(r.returncode == 0, f"{tag}: snapshot_writer write failed: {r.stderr}")
        if r.returncode != 0:
            continue
        want_bank = np.fromfile(raw, dtype="<f4").reshape(n, d)
        want_last = np.fromfile(raw + ".last_update", dtype="<i8")
        with h5py.File(snap, "r") as f:
            a = f.attrs
            check(text(a["format"]) == "membank-snapshot", f"{tag}: format attribute {a['format']!r}")
            check(int(a["format_version"]) == 3, f"{tag}: format_version {a['format_version']}")
            check(len(text(a["engine_version"])) > 0, f"{tag}: engine_version")
            check(int(a["n"]) == n and int(a["dim"]) == d, f"{tag}: n, dim = {a['n']}, {a['dim']}")
            check(int(a["step"]) == steps, f"{tag}: step {a['step']}")
            check(int(a["k"]) == 16 and int(a["seed"]) == 77, f"{tag}: k, seed = {a['k']}, {a['seed']}")
            check(float(a["tau"]) == 0.07 and float(a["momentum"]) == 0.5, f"{tag}: tau, momentum")
            check(text(a["objective"]) == "nce" and text(a["negatives"]) == "per-sample"
                  and text(a["z_policy"]) == "first_batch", f"{tag}: objective, negatives, z_policy")
            check(text(a["sampler"]) == ("alias" if alias else "uniform"), f"{tag}: sampler {a['sampler']!r}")
            check(int(a["z_initialised"]) == 1 and np.isfinite(float(a["log_z"])), f"{tag}: Z state")
            check(text(a["dtype"]) == "float32" and text(a["rounding"]) == "nearest",
                  f"{tag}: dtype, rounding = {a['dtype']!r}, {a['rounding']!r}")
            for name in ("exclude_positive", "z_fixed", "z_ema", "normalize_features", "unit_norm_tolerance"):
                check(name in a, f"{tag}: attribute {name} present")

            bank = f["bank"]
            check(bank.shape == (n, d), f"{tag}: bank shape {bank.shape}")
            check(bank.dtype == np.dtype("<f4") and text(bank.attrs["dtype"]) == "float32",
                  f"{tag}: bank dtype {bank.dtype}, attribute {bank.attrs.get('dtype')!r}")
            check(bank.chunks is not None and bank.chunks == (want_chunk_rows, d),
                  f"{tag}: bank chunks {bank.chunks}: expected whole rows ({want_chunk_rows}, {d})")
            check(bank.fletcher32, f"{tag}: bank fletcher32")
            if deflate:
                check(bank.compression == "gzip" and bank.compression_opts == deflate and bank.shuffle,
                      f"{tag}: bank compression {bank.compression} {bank.compression_opts} shuffle {bank.shuffle}")
            else:
                check(bank.compression is None, f"{tag}: bank compression {bank.compression}")
            v = bank[...]  # every chunk through HDF5's own fletcher32 filter
            check(np.array_equal(v.view(np.uint32), want_bank.view(np.uint32)),
                  f"{tag}: bank rows equal the engine's bit for bit")
            dev = np.abs(np.linalg.norm(v.astype(np.float64), axis=1) - 1).max()
            check(dev < 1e-5, f"{tag}: rows unit norm (max deviation {dev})")

            last = f["last_update"]
            check(last.shape == (n,) and last.dtype == np.dtype("<i8"), f"{tag}: last_update {last.shape} {last.dtype}")
            check(last.fletcher32, f"{tag}: last_update fletcher32")
            lv = last[...]
            check(np.array_equal(lv, want_last), f"{tag}: last_update equals the engine's")
            check(lv.min() == -1 and lv.max() == steps - 1, f"{tag}: last_update range {lv.min()}..{lv.max()}")

            labels = f["labels"]
            check(labels.dtype == np.dtype("<i8") and labels.fletcher32, f"{tag}: labels dtype / fletcher32")
            check(np.array_equal(labels[...], np.arange(n) % 7), f"{tag}: labels values")

            if alias:
                w = f["sampler_weights"]
                check(w.shape == (n,) and w.dtype == np.dtype("<f8") and w.fletcher32, f"{tag}: sampler_weights")
                wv = w[...]
                check(bool(np.all(wv > 0)) and np.all(np.isfinite(wv)), f"{tag}: sampler_weights positive")
            else:
                check("sampler_weights" not in f, f"{tag}: no sampler_weights for the uniform sampler")


def run_import():
    rng = np.random.default_rng(5)
    n, d = 777, 20
    x64 = rng.standard_normal((n, d)) * 3.0
    unit_first = 100
    x32 = x64.astype(np.float32)
    x32[:unit_first] = (x64[:unit_first] / np.linalg.norm(x64[:unit_first], axis=1, keepdims=True)).astype(np.float32)
    src = os.path.join(work, "plain.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("features/train", data=x64)
        f.create_dataset("f32", data=x32)
        f.create_dataset("f32_gzip", data=x32, chunks=True, compression="gzip")  # h5py's own chunk shape
        f.create_dataset("f64_chunked_rows", data=x64, chunks=(64, d))
        bad = x64.copy()
        bad[3, 4] = np.nan
        f.create_dataset("with_nan", data=bad)
        f.create_dataset("ints", data=np.ones((n, d), dtype=np.int32))

    def normalised(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cases = [("features/train", x64, n, None), ("f32", x32, n - unit_first, unit_first),
             ("f32_gzip", x32, n - unit_first, unit_first), ("f64_chunked_rows", x64, n, None)]
    for i, (ds, x, want_renorm, kept) in enumerate(cases):
        out = os.path.join(work, f"imported{i}.h5")
        r = subprocess.run([writer, "import", src, ds, out], capture_output=True, text=True)
        check(r.returncode == 0, f"{ds}: import failed: rc {r.returncode} {r.stderr.strip()}")
        if r.returncode != 0:
            continue
        check(f"renormalised {want_renorm} n {n} dim {d}" in r.stdout,
              f"{ds}: renormalised count: got {r.stdout.strip()!r}, expected {want_renorm}")
        with h5py.File(out, "r") as f:
            got = f["bank"][...]
        err = np.abs(got.astype(np.float64) - normalised(x)).max()
        check(got.shape == (n, d) and err < 1e-6, f"{ds}: imported rows equal numpy's normalised rows ({err})")
        if kept:
            check(np.array_equal(got[:kept].view(np.uint32), x[:kept].view(np.uint32)),
                  f"{ds}: rows already unit norm are kept bit for bit")

    for ds in ("with_nan", "ints", "absent"):
        out = os.path.join(work, f"refused-{ds}.h5")
        r = subprocess.run([writer, "import", src, ds, out], capture_output=True, text=True)
        check(r.returncode == 2 and ds in r.stderr and src in r.stderr and not os.path.exists(out),
              f"{ds}: import refused with an error naming file and dataset: rc {r.returncode} {r.stderr.strip()!r}")


{"read": run_read, "import": run_import}[mode]()
print(f"snapshot h5py {mode}:", "FAILED" if fails else "ok")
sys.exit(1 if fails else 0)
