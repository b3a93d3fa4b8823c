"""2-byte banks from Python: dtype= and rounding=, the zero-copy views of float16 / bfloat16 rows (and
their widened float32 copy) against numpy's own conversions, a step's loss and gradient against an fp32
engine within a bound from the type's unit roundoff, stochastic rounding's unbiasedness, the torch
memory tensor, and every refused value. The torch tests are skipped when python3-torch is missing.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import gc
import os
import tempfile
import unittest

import numpy as np

import membank as mb

try:
    import torch
    from membank.torch import MemoryBankLoss, ReadOnlyBank
except ImportError:
    torch = None

TYPES = ("float16", "bfloat16")
U = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}  # unit roundoff of round-to-nearest


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def widen(words_or_half):
    """numpy's own widening of the stored elements: float16 -> float32, and bfloat16's uint16 words as
    the upper half of a float32 (the definition of bfloat16)."""
    a = np.asarray(words_or_half)
    if a.dtype == np.float16:
        return a.astype(np.float32)
    assert a.dtype == np.uint16, a.dtype
    return (a.astype(np.uint32) << 16).view(np.float32)


def round_bf16(x):
    """float32 -> bfloat16 words, round to nearest, ties to even (written here on the bits)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def round_to(x, dtype):
    return x.astype(np.float16) if dtype == "float16" else round_bf16(x)


def data_ptr(a):
    return a.__array_interface__["data"][0]


class TestViews(unittest.TestCase):
    def test_view_is_zero_copy_read_only_and_widens_like_numpy(self):
        for dt, np_type in (("float16", np.float16), ("bfloat16", np.uint16)):
            with self.subTest(dtype=dt):
                bank = mb.Bank(1000, 20, seed=1, dtype=dt)
                self.assertEqual(bank.dtype, dt)
                v = bank.view()
                self.assertEqual(v.dtype, np_type)
                self.assertEqual(v.shape, (1000, 20))
                self.assertEqual(v.strides, (2 * bank.stride, 2))
                self.assertFalse(v.flags.writeable)
                with self.assertRaises(ValueError):
                    v[0, 0] = 0
                self.assertEqual(data_ptr(v), data_ptr(bank.view()))
                w = bank.to_float32()
                self.assertEqual((w.dtype, w.shape), (np.float32, (1000, 20)))
                self.assertTrue(w.flags.writeable and w.flags.c_contiguous)
                self.assertFalse(np.shares_memory(w, v))
                np.testing.assert_array_equal(w, widen(v))
                # Each element is the fp32 row's rounded to nearest: |rounding| <= u |x| per element, so
                # the norm is within u of 1 (checked at the stored type's tolerance, 4 u).
                self.assertLessEqual(np.abs(np.linalg.norm(w.astype(np.float64), axis=1) - 1).max(), 4 * U[dt])

    def test_rows_are_the_fp32_rows_rounded_to_nearest(self):
        # Bank(n, dim, seed, dtype) holds the fp32 bank of that seed rounded to nearest (ties to even):
        # numpy's float16 conversion and the bit-level bfloat16 rounding above are the references.
        r32 = mb.Bank(500, 24, seed=7).view()
        for dt in TYPES:
            with self.subTest(dtype=dt):
                np.testing.assert_array_equal(mb.Bank(500, 24, seed=7, dtype=dt).view(), round_to(r32, dt))
        rows = unit_rows(np.random.default_rng(3), 200, 24)
        for dt in TYPES:
            with self.subTest(dtype=dt, source="from_array"):
                b = mb.Bank.from_array(rows, dtype=dt)
                self.assertEqual(b.dtype, dt)
                # rows normalised in double, then rounded once: within u |x| of the (unit) input rows,
                # plus the input's own float32 rounding
                w = b.to_float32()
                self.assertTrue((np.abs(w - rows) <= U[dt] * np.abs(rows) + 2e-7).all())

    def test_numpy_types_and_aliases_are_accepted(self):
        self.assertEqual(mb.Bank(4, 3, dtype=np.float16).dtype, "float16")
        self.assertEqual(mb.Bank(4, 3, dtype=np.dtype(np.float32)).dtype, "float32")
        self.assertEqual(mb.Bank(4, 3, dtype="bf16").dtype, "bfloat16")
        self.assertEqual(mb.Bank(4, 3).dtype, "float32")
        self.assertEqual(mb.Bank(4, 3).view().dtype, np.float32)

    def test_view_is_live_and_keeps_the_engine_alive(self):
        rng = np.random.default_rng(4)
        for dt in TYPES:
            with self.subTest(dtype=dt):
                bank = mb.Bank(300, 16, seed=2, dtype=dt)
                v = bank.view()
                eng = mb.Engine(bank, k=8, momentum=0.5)
                self.assertEqual(eng.dtype, dt)
                self.assertTrue(np.shares_memory(v, eng.bank.view()))
                ids = np.arange(5, dtype=np.int64)
                f = unit_rows(rng, 5, 16)
                before = widen(v[:5]).astype(np.float64)
                eng.step(f, ids)
                # The view shows the refresh: normalise(m v + (1 - m) f) rounded to nearest, within u |r|
                # (+ the fp32 arithmetic of the refresh).
                r = 0.5 * before + 0.5 * f
                r /= np.linalg.norm(r, axis=1, keepdims=True)
                got = widen(v[:5])
                self.assertFalse(np.array_equal(got, before.astype(np.float32)))
                self.assertTrue((np.abs(got - r) <= U[dt] * np.abs(r) + 1e-6).all())
                np.testing.assert_array_equal(eng.bank.to_float32(), widen(v))
                del eng, bank
                gc.collect()
                self.assertTrue(np.isfinite(widen(v)).all())  # the view holds the engine


class TestStep(unittest.TestCase):
    def test_loss_and_gradient_close_to_fp32_engine(self):
        # Bound. The 2-byte rows are the fp32 engine's rows rounded to nearest: each element within u |x|,
        # so ||dv_j|| <= u and each logit s_j = v_j . f / tau moves by at most u / tau (f unit). For the
        # softmax losses (infonce over 1 + K, full over N) dL/ds = p - e_y has l1 norm <= 2, so
        # |dL| <= 2 u / tau to first order; the gradient g = sum_j (p_j - e_yj) v_j / (B tau) moves by
        # ||sum w dv|| + ||sum dp v|| <= 2 u + 2 u / tau (||dp||_1 <= 2 max |ds|), over B tau.
        # Asserted with a factor 2 for the second-order terms and the fp32 arithmetic: |dL| <= 4 u / tau.
        rng = np.random.default_rng(5)
        n, dim, b, k, tau = 400, 32, 8, 64, 0.07
        rows = unit_rows(rng, n, dim)
        f = unit_rows(rng, b, dim)
        ids = rng.choice(n, b, replace=False).astype(np.int64)
        for objective in ("infonce", "full"):
            ref = mb.Engine(mb.Bank.from_array(rows), k=k, tau=tau, objective=objective, seed=9)
            neg = ref.sample(ids) if objective == "infonce" else None
            step = (lambda e: e.step(f, ids)) if neg is None else (lambda e: e.step_with_negatives(f, ids, neg))
            l32, g32, _ = step(ref)
            for dt in TYPES:
                with self.subTest(objective=objective, dtype=dt):
                    e = mb.Engine(mb.Bank.from_array(rows, dtype=dt), k=k, tau=tau, objective=objective, seed=9)
                    loss, g, _ = step(e)
                    u = U[dt]
                    self.assertLessEqual(abs(loss - l32), 4 * u / tau)
                    dg = np.linalg.norm(g.astype(np.float64) - g32, axis=1)
                    self.assertLessEqual(dg.max(), 2 * (2 * u + 2 * u / tau) / (b * tau))

    def test_stochastic_rounding_is_unbiased_and_keyed(self):
        # N copies of one row, each refreshed with the same feature at m = 0.999: the exact result r is
        # the same for every row. Stochastic rounding stores one of r's two neighbours in the type, with
        # the random bits keyed by row: the mean over rows approaches r (std <= ulp / (2 sqrt N)), where
        # nearest gives round(r) for every row. Same seed, same words; another seed, other words.
        rng = np.random.default_rng(6)
        n, dim, m = 4000, 16, 0.999
        rows = np.repeat(unit_rows(rng, 1, dim), n, axis=0)
        f = unit_rows(rng, 1, dim)
        ids = np.arange(n, dtype=np.int64)
        feats = np.repeat(f, n, axis=0)

        def refreshed(dt, **kw):
            bank = mb.Bank.from_array(rows, dtype=dt)
            start = bank.to_float32()
            bank.update(ids, feats, momentum=m, step=3, **kw)
            return start, bank

        for dt in TYPES:
            with self.subTest(dtype=dt):
                start, bank = refreshed(dt, rounding="stochastic", seed=11)
                self.assertEqual(len(np.unique(start, axis=0)), 1)
                r = m * start[0].astype(np.float64) + (1 - m) * f[0]
                r /= np.linalg.norm(r)
                # the gap between the type's neighbours at |r| (fp16: never below its subnormal spacing)
                ulp = np.maximum(2 * U[dt] * 2.0 ** np.floor(np.log2(np.abs(r))), 2.0 ** -24)
                w = bank.to_float32().astype(np.float64)
                self.assertTrue((np.abs(w - r) <= ulp * (1 + 1e-6)).all())  # one of r's two neighbours
                self.assertGreater(len(np.unique(w, axis=0)), 1)  # rows drew different bits
                self.assertTrue((np.abs(w.mean(axis=0) - r) <= 5 * ulp / (2 * np.sqrt(n)) + 1e-7).all())
                np.testing.assert_array_equal(refreshed(dt, rounding="stochastic", seed=11)[1].view(), bank.view())
                self.assertFalse(np.array_equal(refreshed(dt, rounding="stochastic", seed=12)[1].view(), bank.view()))
                near = refreshed(dt)[1].to_float32()
                self.assertEqual(len(np.unique(near, axis=0)), 1)  # nearest: the same value in every row
                self.assertTrue((np.abs(near[0] - r) <= ulp / 2 * (1 + 1e-6)).all())

    def test_engine_rounding_reaches_the_config(self):
        e = mb.Engine(mb.Bank(50, 8, dtype="bfloat16"), k=4, rounding="stochastic")
        self.assertEqual(e.config["rounding"], "stochastic")
        self.assertEqual(mb.Engine(mb.Bank(50, 8), k=4).config["rounding"], "nearest")
        self.assertIn("dtype=bfloat16", repr(e))


class TestRefused(unittest.TestCase):
    def assertRefused(self, needle, fn, *args, **kw):
        with self.assertRaises(mb.Error) as cm:
            fn(*args, **kw)
        self.assertIsInstance(cm.exception, ValueError)
        self.assertIn(needle, str(cm.exception))

    def test_bad_dtype_names_the_value(self):
        self.assertRefused("'float64'", mb.Bank, 10, 4, dtype="float64")
        self.assertRefused("'bf17'", mb.Bank, 10, 4, dtype="bf17")
        self.assertRefused("numpy.float64", mb.Bank, 10, 4, dtype=np.float64)
        self.assertRefused("dtype = 3", mb.Bank, 10, 4, dtype=3)
        self.assertRefused("dtype = None", mb.Bank, 10, 4, dtype=None)
        self.assertRefused("'int8'", mb.Bank.from_array, unit_rows(np.random.default_rng(0), 3, 4), dtype="int8")

    def test_bad_rounding_names_the_value_and_changes_nothing(self):
        bank = mb.Bank(10, 4, dtype="float16")
        self.assertRefused("'up'", mb.Engine, bank, k=2, rounding="up")
        self.assertFalse(bank.owned_by_engine)  # refused before the bank moved: still usable
        before = bank.view().copy()
        f = unit_rows(np.random.default_rng(0), 1, 4)
        self.assertRefused("'Nearest'", bank.update, np.zeros(1, np.int64), f, rounding="Nearest")
        np.testing.assert_array_equal(bank.view(), before)
        self.assertEqual(mb.Engine(bank, k=2).dtype, "float16")

    def test_features_stay_float32(self):
        # A float16 view is not a float32 feature array: refused with the fix, never converted.
        e = mb.Engine(mb.Bank(20, 8, dtype="float16"), k=2)
        with self.assertRaises(TypeError) as cm:
            e.step(e.bank.view()[:2], np.arange(2, dtype=np.int64))
        self.assertIn("astype(np.float32)", str(cm.exception))


class TestSnapshot(unittest.TestCase):
    def test_fp32_round_trip_and_dtype_kept(self):
        rng = np.random.default_rng(8)
        with tempfile.TemporaryDirectory() as d:
            for dt in ("float32",) + TYPES:
                with self.subTest(dtype=dt):
                    path = os.path.join(d, f"{dt}.h5")
                    rounding = "nearest" if dt == "float32" else "stochastic"
                    a = mb.Engine(mb.Bank(300, 16, seed=4, dtype=dt), k=16, seed=1, rounding=rounding)
                    f, ids = unit_rows(rng, 4, 16), np.arange(4, dtype=np.int64)
                    a.step(f, ids)
                    try:
                        mb.save_snapshot(path, a)
                    except mb.Error as e:
                        if dt == "float32":
                            raise
                        self.skipTest(f"2-byte snapshots not supported by this build: {e}")
                    info = mb.read_snapshot_info(path)
                    self.assertEqual((info["dtype"], info["config"]["rounding"]), (dt, rounding))
                    c = mb.load_snapshot(path)
                    self.assertEqual((c.dtype, c.config["rounding"]), (dt, rounding))
                    np.testing.assert_array_equal(c.bank.view(), a.bank.view())
                    la, ga, _ = a.step(f, ids)
                    lc, gc_, _ = c.step(f, ids)
                    self.assertEqual(la, lc)
                    np.testing.assert_array_equal(ga, gc_)

    def test_import_bank_as_each_dtype(self):
        try:
            import h5py
        except ImportError:
            self.skipTest("h5py not installed (apt-get install python3-h5py)")
        rows = unit_rows(np.random.default_rng(9), 50, 12)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.h5")
            with h5py.File(path, "w") as fh:
                fh["emb"] = rows
            for dt in TYPES:
                with self.subTest(dtype=dt):
                    bank, _ = mb.import_bank(path, "emb", dtype=dt)
                    self.assertEqual(bank.dtype, dt)
                    w = bank.to_float32()  # within u |x| of the unit input rows (rounded once)
                    self.assertTrue((np.abs(w - rows) <= U[dt] * np.abs(rows) + 2e-7).all())
            with self.assertRaises(mb.Error) as cm:
                mb.import_bank(path, "emb", dtype="float64")
            self.assertIn("'float64'", str(cm.exception))


@unittest.skipIf(torch is None, "torch is not installed (apt-get install python3-torch)")
class TestTorch(unittest.TestCase):
    def test_memory_tensor_type_and_storage(self):
        for dt, tt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            with self.subTest(dtype=dt):
                mod = MemoryBankLoss(200, 16, k=8, dtype=dt, seed=1)
                self.assertEqual(mod.engine.dtype, dt)
                mem = mod.memory
                view = mod.engine.bank.view()
                self.assertEqual(mem.dtype, tt)
                self.assertIsInstance(mem, ReadOnlyBank)
                self.assertEqual(tuple(mem.shape), (200, 16))
                self.assertEqual(mem.data_ptr(), data_ptr(view))  # the numpy view's memory, no copy
                self.assertEqual(mem.stride(), (mod.engine.bank.stride, 1))
                np.testing.assert_array_equal(mem.float().numpy(), widen(view) if dt != "float32" else view)
                with self.assertRaises(mb.Error):
                    mem[0, 0] = 0
                with self.assertRaises(mb.Error):
                    mem.add_(1)
                x = torch.from_numpy(unit_rows(np.random.default_rng(2), 4, 16)).requires_grad_()
                ids = torch.arange(4)
                before = mem[:4].float().clone()
                mod(x, ids).backward()
                self.assertFalse(torch.equal(before, mem[:4].float()))  # live: the tensor shows the refresh

    def test_torch_dtypes_and_mismatch(self):
        self.assertEqual(MemoryBankLoss(20, 4, k=2, dtype=torch.bfloat16).engine.dtype, "bfloat16")
        self.assertEqual(MemoryBankLoss(20, 4, k=2, dtype=np.float16).engine.dtype, "float16")
        m = MemoryBankLoss(20, 4, k=2, dtype="fp16", rounding="stochastic")
        self.assertEqual(m.engine.config["rounding"], "stochastic")
        self.assertIn("dtype=float16", repr(m))
        with self.assertRaises(mb.Error) as cm:
            MemoryBankLoss(20, 4, k=2, dtype=torch.float64)
        self.assertIn("torch.float64", str(cm.exception))
        with self.assertRaises(mb.Error) as cm:
            MemoryBankLoss(20, 4, k=2, rounding="up")
        self.assertIn("'up'", str(cm.exception))
        bank = mb.Bank(20, 4, dtype="float16")
        with self.assertRaises(mb.Error) as cm:
            MemoryBankLoss(20, 4, k=2, bank=bank, dtype="bfloat16")
        self.assertIn("float16", str(cm.exception))
        self.assertFalse(bank.owned_by_engine)
        self.assertEqual(MemoryBankLoss(20, 4, k=2, bank=bank, dtype="half").engine.dtype, "float16")
        with self.assertRaises(mb.Error):
            MemoryBankLoss(20, 4, engine=m.engine, rounding="nearest")

    def test_loss_and_gradient_from_the_widened_rows(self):
        # InfoNCE over explicit negatives in plain PyTorch on memory.float() (the exact widening): the
        # engine reads the same values, so only fp32 arithmetic separates the two.
        rng = np.random.default_rng(3)
        n, dim, b, k, tau = 300, 16, 6, 20, 0.1
        for dt in TYPES:
            with self.subTest(dtype=dt):
                mod = MemoryBankLoss(n, dim, k=k, tau=tau, objective="infonce", dtype=dt, seed=4)
                mem = mod.memory.float().clone().double()
                x = torch.from_numpy(unit_rows(rng, b, dim)).double().requires_grad_()
                ids = torch.from_numpy(rng.choice(n, b, replace=False))
                neg = torch.from_numpy(rng.integers(0, n, (b, k)))
                loss = mod(x, ids, negatives=neg)
                loss.backward()
                xr = x.detach().clone().requires_grad_()
                cand = torch.cat([ids[:, None], neg], dim=1)
                logits = torch.einsum("bkd,bd->bk", mem[cand], xr) / tau
                ref = torch.nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
                ref.backward()
                self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()))
                torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max().item())


if __name__ == "__main__":
    unittest.main(verbosity=2)
