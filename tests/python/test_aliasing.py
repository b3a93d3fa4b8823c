"""Aliasing and memory limits through Python: inputs that are rows of the live bank give the result of
a copy; an `out=` buffer sharing memory with an input, itself or the bank is refused (membank.Error
naming both); NCEAverage.memory is read-only; set_num_threads(100000) is refused; sizes that cannot
fit raise MemoryError with the bytes needed, before anything is allocated.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import copy
import ctypes
import io
import os
import subprocess
import sys
import textwrap
import unittest

import numpy as np

import membank as mb

N, D, B = 64, 20, 6  # D = 20: the bank's rows are padded to 32 floats
IDS = np.array([1, 0, 3, 2, 5, 4], dtype=np.int64)  # row i's feature is bank row IDS[i] ^ 1


def engine(objective="nce", negatives="per-sample"):
    return mb.Engine(mb.Bank(N, D, seed=9), k=16, tau=0.1, seed=3, objective=objective, negatives=negatives)


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def writable_alias(a, floats):
    """A writable float32 array over `floats` floats from the start of `a` (what ctypes or a C
    extension could hand over)."""
    buf = (ctypes.c_float * floats).from_address(a.ctypes.data)
    return np.frombuffer(buf, dtype=np.float32)


def state(e):
    return e.bank.view().copy(), e.bank.last_update(), e.steps_done, e.log_z


def assert_same_state(t, a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    t.assertEqual(a[2], b[2])
    t.assertEqual(a[3], b[3])


class TestLiveBankAsInput(unittest.TestCase):
    def test_step_update_with_rows_of_the_live_bank(self):
        # Before: the refresh of one row fed the next row's refresh (bank wrong, silently).
        for negatives in ("per-sample", "shared"):
            for call in ("step", "step_with_negatives", "evaluate"):
                with self.subTest(negatives=negatives, call=call):
                    live, twin = engine(negatives=negatives), engine(negatives=negatives)
                    rows = live.bank.view()[:B]
                    self.assertFalse(rows.flags.c_contiguous)  # padded: a strided view, no copy
                    copy = np.array(rows)
                    neg = live.sample(IDS)
                    if call == "step":
                        la, ga, _ = live.step(rows, IDS)
                        lb, gb, _ = twin.step(copy, IDS)
                    else:
                        la, ga, _ = getattr(live, call)(rows, IDS, neg)
                        lb, gb, _ = getattr(twin, call)(copy, IDS, neg)
                    self.assertEqual(la, lb)
                    np.testing.assert_array_equal(ga, gb)
                    assert_same_state(self, state(live), state(twin))
                    copy = np.array(rows)  # taken before the live update rewrites those rows
                    live.update(rows, IDS)
                    twin.update(copy, IDS)
                    assert_same_state(self, state(live), state(twin))

    def test_bank_update_with_its_own_rows(self):
        a, b = mb.Bank(N, D, seed=4), mb.Bank(N, D, seed=4)
        a.update(IDS, a.view()[:B], momentum=0.5, step=1)
        b.update(IDS, np.array(b.view()[:B]), momentum=0.5, step=1)
        np.testing.assert_array_equal(a.view(), b.view())

    def test_read_only_calls_with_rows_of_the_bank(self):
        e = engine()
        rows = e.bank.view()[10:17]
        labels = np.arange(N, dtype=np.int64) % 5
        ka = mb.knn_evaluate(e.bank, labels, rows, labels[10:17], k=5, sigma=0.1)
        kb = mb.knn_evaluate(e.bank, labels, np.array(rows), labels[10:17], k=5, sigma=0.1)
        np.testing.assert_array_equal(ka.predictions, kb.predictions)
        ids = np.arange(10, 17, dtype=np.int64)
        fa = mb.full_softmax_loss(e.bank, rows, ids, tau=0.1)
        fb = mb.full_softmax_loss(e.bank, np.array(rows), ids, tau=0.1)
        self.assertEqual(fa[0], fb[0])
        np.testing.assert_array_equal(fa[1], fb[1])


class TestOutOverlap(unittest.TestCase):
    def refused(self, e, call, other):
        before = state(e)
        with self.assertRaises(mb.Error) as cm:
            call()
        msg = str(cm.exception)
        self.assertIn("out", msg)
        self.assertIn(other, msg)
        self.assertIn("share memory", msg)
        assert_same_state(self, before, state(e))

    def test_out_equal_to_features(self):
        # Before: engine.step(f, ids, out=f) returned a wrong loss and refreshed the bank with the gradient.
        rng = np.random.default_rng(0)
        for objective in ("nce", "infonce", "full"):
            with self.subTest(objective=objective):
                e = engine(objective)
                f = unit_rows(rng, B, D)
                f0 = f.copy()
                neg = e.sample(IDS)
                self.refused(e, lambda: e.step(f, IDS, out=f), "features")
                self.refused(e, lambda: e.step_with_negatives(f, IDS, neg, out=f), "features")
                self.refused(e, lambda: e.evaluate(f, IDS, neg, out=f), "features")
                np.testing.assert_array_equal(f, f0)

    def test_partial_and_other_overlaps(self):
        rng = np.random.default_rng(1)
        e = engine()
        buf = np.zeros((2 * B - 1, D), np.float32)
        buf[:B] = unit_rows(rng, B, D)
        self.refused(e, lambda: e.step(buf[:B], IDS, out=buf[B - 1:]), "features")  # one shared row
        # out over the ids' bytes (an int64 (B,) array is 2 B floats)
        raw = np.zeros(B * D, np.float32)
        ids = raw[: 2 * B].view(np.int64)
        ids[:] = IDS
        self.refused(e, lambda: e.step(buf[:B], ids, out=raw.reshape(B, D)), "ids")
        # out over the negatives
        neg = np.ascontiguousarray(np.repeat(e.sample(IDS)[:, :10], 1, axis=0))  # (B, 10) int64 = B x 20 floats
        self.refused(e, lambda: e.evaluate(buf[:B], IDS, neg, out=neg.view(np.float32)), "negatives")
        # out over the bank itself (a writable alias of its memory)
        view = e.bank.view()
        self.assertEqual(view.strides, (4 * 32, 4))
        alias = writable_alias(view, B * 32).reshape(B, 32)[:, :D]
        self.refused(e, lambda: e.step(buf[:B], IDS, out=alias), "bank's rows")
        # rows of out over each other
        one = np.zeros(D, np.float32)
        self_alias = np.lib.stride_tricks.as_strided(one, shape=(B, D), strides=(4, 4), writeable=True)
        with self.assertRaises((mb.Error, ValueError)):
            e.step(buf[:B], IDS, out=self_alias)
        # full softmax: whole-array check (its blocked calls would each see only a part)
        with self.assertRaises(mb.Error) as cm:
            mb.full_softmax_loss(e.bank, buf[:B], IDS, tau=0.1, out=buf[B - 1:])
        self.assertIn("out and features share memory", str(cm.exception))

    def test_disjoint_interleaved_columns_are_accepted(self):
        rng = np.random.default_rng(2)
        a, b = engine(), engine()
        buf = np.zeros((B, 2 * D), np.float32)
        buf[:, :D] = unit_rows(rng, B, D)
        f = buf[:, :D].copy()
        la, ga, _ = a.step(buf[:, :D], IDS, out=buf[:, D:])
        lb, gb, _ = b.step(f, IDS)
        self.assertEqual(la, lb)
        np.testing.assert_array_equal(ga, gb)
        np.testing.assert_array_equal(buf[:, D:], gb)
        np.testing.assert_array_equal(buf[:, :D], f)


class TestThreadsAndMemory(unittest.TestCase):
    def test_set_num_threads_refuses_100000(self):
        before = mb.get_num_threads()
        with self.assertRaises(mb.Error) as cm:
            mb.set_num_threads(100000)
        self.assertIn("100000", str(cm.exception))
        self.assertIn(str(mb.max_num_threads()), str(cm.exception))
        self.assertEqual(mb.get_num_threads(), before)
        with self.assertRaises(mb.Error):
            mb.set_num_threads(0)

    def test_huge_bank_is_memory_error_naming_the_bytes(self):
        n = 10 ** 12
        with self.assertRaises(MemoryError) as cm:
            mb.Bank(n, 128)
        msg = str(cm.exception)
        self.assertIn(f"{n * 128 * 4 + (2 << 20) + n * 8} bytes", msg)
        self.assertIn("MemAvailable", msg)

    def test_huge_k_is_memory_error_and_the_bank_stays_usable(self):
        bank = mb.Bank(100, 16, seed=1)
        with self.assertRaises(MemoryError) as cm:
            mb.Engine(bank, k=10 ** 12)
        self.assertIn("config.k = 1000000000000", str(cm.exception))
        self.assertIn("bytes", str(cm.exception))
        self.assertFalse(bank.owned_by_engine)
        e = mb.Engine(bank, k=8)  # the refused call left the bank to its owner
        self.assertEqual(e.bank.n, 100)

    def test_step_beyond_rlimit_as_is_memory_error_engine_unchanged(self):
        # In a child: lower RLIMIT_AS to current use + 24 MiB; a step whose scratch (K = 2^22
        # per-sample negatives, 48 MiB a thread) cannot fit raises MemoryError before allocating.
        code = textwrap.dedent("""
            import resource, numpy as np, membank as mb
            mb.set_num_threads(2)
            e = mb.Engine(mb.Bank(200, 16, seed=3), k=1 << 22, seed=4)
            rng = np.random.default_rng(0)
            f = rng.standard_normal((4, 16)); f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
            ids = np.arange(4, dtype=np.int64)
            out = np.empty((4, 16), np.float32)
            before = e.bank.view().copy()
            vm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')][0] * 1024
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (vm + (24 << 20), hard))
            try:
                e.step(f, ids, out=out)
                print("no error")
            except MemoryError as err:
                print("MemoryError", "RLIMIT_AS" in str(err), "K = 4194304" in str(err))
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            print("unchanged", e.steps_done == 0 and np.array_equal(before, e.bank.view()))
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("MemoryError True True", r.stdout)
        self.assertIn("unchanged True", r.stdout)


class TestTorchMemoryReadOnly(unittest.TestCase):
    def setUp(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            self.skipTest("torch not installed (apt-get install python3-torch)")

    def test_memory_refuses_writes_and_reads_like_a_tensor(self):
        import torch
        from membank.torch import NCEAverage, ReadOnlyBank, nce_loss
        lem = NCEAverage(D, N, 16, 0.1, 0.5, seed=2)
        mem = lem.memory
        before = lem.engine.bank.view().copy()
        writes = {
            "setitem": lambda: mem.__setitem__(0, 1.0),
            "add_": lambda: mem.add_(1.0),
            "iadd": lambda: mem.__iadd__(1.0),
            "zero_ of a view": lambda: mem.t().zero_(),
            "index_copy_": lambda: mem.index_copy_(0, torch.tensor([0]), torch.zeros(1, D)),
            "out=": lambda: torch.add(torch.zeros(N, D), 1.0, out=mem),
            "detach().fill_": lambda: mem.detach().fill_(0.0),
            ".data.mul_": lambda: mem.data.mul_(2.0),
            "row view copy_": lambda: mem[3].copy_(torch.zeros(D)),
            "storage()[0] =": lambda: mem.storage().__setitem__(0, 5.0),
            "row view storage()": lambda: mem[2].storage(),
        }
        for name, w in writes.items():
            with self.subTest(write=name):
                with self.assertRaises(mb.Error) as cm:
                    w()
                self.assertIn("read-only", str(cm.exception))
        np.testing.assert_array_equal(lem.engine.bank.view(), before)
        arr = mem.numpy()
        self.assertFalse(arr.flags.writeable)
        with self.assertRaises(ValueError):
            arr[0, 0] = 1.0
        # reads: products and copies are plain tensors, writable
        q = torch.randn(3, D)
        s = q @ mem.t()
        self.assertIs(type(s), torch.Tensor)
        torch.testing.assert_close(s, q @ torch.from_numpy(before).t())
        c = mem.clone()
        self.assertIs(type(c), torch.Tensor)
        c[0] = 0.0
        self.assertIsInstance(mem.t(), ReadOnlyBank)
        self.assertIn("ReadOnlyBank([[", repr(mem[:2]))  # printing reads, it does not need the storage
        buf = io.BytesIO()  # saving reads the rows; what comes back is a plain tensor, a copy
        torch.save(mem, buf)
        buf.seek(0)
        loaded = torch.load(buf)
        self.assertIs(type(loaded), torch.Tensor)
        np.testing.assert_array_equal(loaded.numpy(), before)
        copied = copy.deepcopy(mem)
        self.assertIs(type(copied), torch.Tensor)
        copied[0] = 0.0
        # the live rows as features of a step: the same as a copy (twin module)
        twin = NCEAverage(D, N, 16, 0.1, 0.5, seed=2)
        x = mem[:B].clone().requires_grad_(True)
        la = nce_loss(mem[:B].clone().requires_grad_(True), torch.from_numpy(IDS), lem.engine)
        lb = nce_loss(x, torch.from_numpy(IDS), twin.engine)
        self.assertEqual(la.item(), lb.item())
        f_live = lem.memory[:B]
        la2 = nce_loss(f_live, torch.from_numpy(IDS), lem.engine)
        lb2 = nce_loss(twin.memory[:B].clone(), torch.from_numpy(IDS), twin.engine)
        self.assertEqual(la2.item(), lb2.item())
        np.testing.assert_array_equal(lem.engine.bank.view(), twin.engine.bank.view())


if __name__ == "__main__":
    unittest.main(verbosity=2)
