"""Debian's h5py (/usr/bin/python3) reads the snapshots test_distributed_snapshot.cpp saved at np = 4.

For every case, DIR/<case>.h5 (a shard set's master when sharded, a single file when replicated)
against DIR/<case>.single.h5, the single-process engine's snapshot at the same step: master['bank']
is one (N, D) array of the same type, bit for bit; last_update, labels, sampler_weights and every
root attribute but the engine version are equal. A shard set's datasets are virtual, name their
sources by relative file names, and read the same from another working directory after the whole
directory was copied elsewhere (a set moves as a directory).

usage: distributed_snapshot_h5py.py DIR
"""
import os
import shutil
import sys
import tempfile

import h5py
import numpy as np

CASES = ["sharded_f32", "sharded_f16", "sharded_bf16", "replicated_f32", "replicated_bf16", "replicated_cluster",
         "sharded_cluster", "replicated_ring"]
STORED = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAILED:", what, file=sys.stderr)


def attr_equal(a, b):
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, bytes):
        b = b.decode()
    return np.array_equal(np.asarray(a), np.asarray(b))


def compare(directory, case):
    master_path = os.path.join(directory, case + ".h5")
    single_path = os.path.join(directory, case + ".single.h5")
    sharded = case.startswith("sharded")
    with h5py.File(master_path, "r") as m, h5py.File(single_path, "r") as s:
        bank, ref = m["bank"], s["bank"]
        dtype = s.attrs["dtype"]
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        check(bank.shape == ref.shape and bank.dtype == STORED[dtype] == ref.dtype,
              f"{case}: bank {bank.shape} {bank.dtype} against {ref.shape} {ref.dtype} ({dtype})")
        got, want = bank[...], ref[...]
        check(got.shape == want.shape and got.tobytes() == want.tobytes(), f"{case}: bank differs bit for bit")
        check(attr_equal(bank.attrs["dtype"], dtype), f"{case}: bank's dtype attribute")
        for name in ["last_update", "labels", "sampler_weights"]:
            check((name in m) == (name in s), f"{case}: dataset {name} present in one file only")
            if name in s:
                check(np.array_equal(m[name][...], s[name][...]), f"{case}: {name} differs")
        for key, value in s.attrs.items():
            if key == "log_z":  # Z's estimate sums the batch in rank order: the last bits differ from one process's
                check(abs(m.attrs[key] - value) <= 1e-12 * abs(value), f"{case}: log_z {m.attrs[key]} against {value}")
            elif key != "engine_version":
                check(key in m.attrs and attr_equal(m.attrs[key], value), f"{case}: root attribute {key} differs")
        check(("shards" in m.attrs) == sharded, f"{case}: the attribute shards marks a shard set")
        if sharded:
            for name in ["bank", "last_update"] + (["labels"] if "labels" in m else []):
                ds = m[name]
                check(ds.is_virtual, f"{case}: {name} is not virtual")
                sources = ds.virtual_sources()
                check(len(sources) == int(m.attrs["shards"]), f"{case}: {name} maps {len(sources)} sources")
                for src in sources:
                    check("/" not in src.file_name and src.dset_name.strip("/") == name
                          and (".g" + str(m.attrs["generation"]) + ".shard-") in src.file_name,
                          f"{case}: {name} maps to {src.file_name}:{src.dset_name}")


def main():
    directory = os.path.abspath(sys.argv[1])
    elsewhere = tempfile.mkdtemp(prefix="membank-dsnap-h5py-")
    try:
        moved = os.path.join(elsewhere, "moved")
        shutil.copytree(directory, moved)
        cwd = os.path.join(elsewhere, "cwd")
        os.mkdir(cwd)
        os.chdir(cwd)  # neither the set's directory nor its parent
        for case in CASES:
            compare(directory, case)
            compare(moved, case)
    finally:
        os.chdir("/")
        shutil.rmtree(elsewhere, ignore_errors=True)
    print(f"{len(CASES)} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
