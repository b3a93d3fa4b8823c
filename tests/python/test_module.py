"""membank's Python module (numpy level): results against naive float64 numpy references, zero-copy
views, every refused array and its message, threads (GIL released), Ctrl-C, snapshots.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import os
import signal
import tempfile
import threading
import time
import unittest

import numpy as np

import membank as mb


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def softplus(a):
    return np.logaddexp(0.0, a)


def ref_nce(bank, f, ids, neg, tau, log_z, log_pn_pos, log_pn_neg, k):
    """The NCE loss and dL/df of DESIGN.md in float64 (neg: (B, K) per-sample or (1, K) shared)."""
    bank = bank.astype(np.float64)
    f = f.astype(np.float64)
    b = f.shape[0]
    if neg.shape[0] == 1:
        neg = np.repeat(neg, b, axis=0)
        log_pn_neg = np.repeat(log_pn_neg, b, axis=0)
    loss, grad = 0.0, np.zeros_like(f)
    for i in range(b):
        s_pos = bank[ids[i]] @ f[i]
        a_pos = s_pos / tau - log_z - np.log(k) - log_pn_pos[i]  # log(P / (K Pn))
        s_neg = bank[neg[i]] @ f[i]
        a_neg = s_neg / tau - log_z - np.log(k) - log_pn_neg[i]
        loss += softplus(-a_pos) + softplus(a_neg).sum()
        h_pos = 1 / (1 + np.exp(-a_pos))
        h_neg = 1 / (1 + np.exp(-a_neg))
        grad[i] = (-(1 - h_pos) * bank[ids[i]] + h_neg @ bank[neg[i]]) / (b * tau)
    return loss / b, grad


class Fixture:
    def __init__(self, n=500, dim=16, b=8, k=32, seed=3, **options):
        rng = np.random.default_rng(seed)
        self.rows = unit_rows(rng, n, dim)
        self.f = unit_rows(rng, b, dim)
        self.ids = rng.choice(n, size=b, replace=False).astype(np.int64)
        self.engine = mb.Engine(mb.Bank.from_array(self.rows), k=k, seed=seed, **options)
        self.bank = self.engine.bank.view().copy()  # the engine's (renormalised) rows
        self.n, self.dim, self.b, self.k = n, dim, b, k


class TestResults(unittest.TestCase):
    """Loss and gradient equal naive float64 references of the same formulas."""

    def test_nce_per_sample_and_shared_fixed_z(self):
        for mode in ("per-sample", "shared"):
            fx = Fixture(negatives=mode, z_policy="fixed", z_fixed=123.0)
            neg = fx.engine.sample(fx.ids)
            self.assertEqual(neg.shape, (fx.b if mode == "per-sample" else 1, fx.k))
            loss, grad, st = fx.engine.step_with_negatives(fx.f, fx.ids, neg, update=False)
            lpn = np.full(fx.b, -np.log(fx.n))
            rl, rg = ref_nce(fx.bank, fx.f, fx.ids, neg, 0.07, np.log(123.0), lpn, np.full(neg.shape, -np.log(fx.n)),
                             fx.k)
            self.assertAlmostEqual(loss, rl, delta=1e-5 * abs(rl))
            np.testing.assert_allclose(grad, rg, rtol=0, atol=1e-5 * np.abs(rg).max())
            self.assertAlmostEqual(st.z, 123.0, delta=1e-9)

    def test_nce_alias_sampler_uses_its_probabilities(self):
        rng = np.random.default_rng(5)
        n, dim = 300, 8
        w = rng.uniform(0.2, 3.0, n)
        sampler = mb.AliasSampler(w)
        np.testing.assert_allclose(sampler.probs(), w / w.sum(), rtol=1e-12)
        eng = mb.Engine(mb.Bank.from_array(unit_rows(rng, n, dim)), sampler, k=16, z_policy="fixed", z_fixed=40.0)
        bank = eng.bank.view().copy()
        f, ids = unit_rows(rng, 6, dim), np.arange(6, dtype=np.int64) * 7
        neg = eng.sample(ids)
        loss, grad, _ = eng.evaluate(f, ids, neg)
        p = w / w.sum()
        rl, rg = ref_nce(bank, f, ids, neg, 0.07, np.log(40.0), np.log(p[ids]), np.log(p[neg]), 16)
        self.assertAlmostEqual(loss, rl, delta=1e-5 * abs(rl))
        np.testing.assert_allclose(grad, rg, rtol=0, atol=1e-5 * np.abs(rg).max())

    def test_first_batch_z_is_n_times_mean_over_negatives(self):
        fx = Fixture(n=400, k=64)
        neg = fx.engine.sample(fx.ids)
        self.assertIsNone(fx.engine.log_z)
        _, _, st = fx.engine.step_with_negatives(fx.f, fx.ids, neg)
        s = np.einsum("bkd,bd->bk", fx.bank[neg].astype(np.float64), fx.f.astype(np.float64))
        z = fx.n * np.exp(s / 0.07).mean()
        self.assertAlmostEqual(st.z / z, 1.0, delta=1e-5)
        self.assertAlmostEqual(fx.engine.z / z, 1.0, delta=1e-5)

    def test_step_draws_what_sample_says_and_updates_rows(self):
        a, b = Fixture(seed=9), Fixture(seed=9)
        neg = b.engine.sample(b.ids)
        la, ga, sa = a.engine.step(a.f, a.ids)
        lb, gb, sb = b.engine.step_with_negatives(b.f, b.ids, neg)
        self.assertEqual(la, lb)
        np.testing.assert_array_equal(ga, gb)
        self.assertEqual((sa.step, a.engine.steps_done), (0, 1))
        v = a.bank[a.ids].astype(np.float64) * 0.5 + 0.5 * a.f
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(a.engine.bank.view()[a.ids], v, atol=1e-6)
        lu = a.engine.bank.last_update()
        self.assertTrue((lu[a.ids] == 0).all() and (np.delete(lu, a.ids) == -1).all())

    def test_infonce(self):
        fx = Fixture(objective="infonce")
        neg = fx.engine.sample(fx.ids)
        loss, grad, _ = fx.engine.evaluate(fx.f, fx.ids, neg)
        bank, f = fx.bank.astype(np.float64), fx.f.astype(np.float64)
        rl, rg = 0.0, np.zeros_like(f)
        for i in range(fx.b):
            rows = np.concatenate([[fx.ids[i]], neg[i]])
            logits = bank[rows] @ f[i] / 0.07
            p = np.exp(logits - logits.max())
            p /= p.sum()
            rl -= np.log(p[0])
            p[0] -= 1
            rg[i] = p @ bank[rows] / (fx.b * 0.07)
        self.assertAlmostEqual(loss, rl / fx.b, delta=1e-5 * rl / fx.b)
        np.testing.assert_allclose(grad, rg, atol=1e-5 * np.abs(rg).max())

    def test_full_softmax_engine_and_function(self):
        fx = Fixture(objective="full")
        bank, f = fx.bank.astype(np.float64), fx.f.astype(np.float64)
        logits = f @ bank.T / 0.07
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        rl = -np.log(p[np.arange(fx.b), fx.ids]).mean()
        p[np.arange(fx.b), fx.ids] -= 1
        rg = p @ bank / (fx.b * 0.07)
        for loss, grad in (fx.engine.step(fx.f, fx.ids, update=False)[:2],
                           mb.full_softmax_loss(fx.engine.bank, fx.f, fx.ids, 0.07)[:2]):
            self.assertAlmostEqual(loss, rl, delta=1e-5 * rl)
            np.testing.assert_allclose(grad, rg, atol=1e-5 * np.abs(rg).max())

    def test_full_softmax_blocks_equal_one_call(self):
        # B N D >= 2^31: the module runs 64-query blocks (for Ctrl-C); same result to fp32 rounding.
        rng = np.random.default_rng(1)
        bank = mb.Bank(70000, 128, seed=2)
        f, ids = unit_rows(rng, 256, 128), rng.choice(70000, 256, replace=False).astype(np.int64)
        loss, grad, mz, mp = mb.full_softmax_loss(bank, f, ids, 0.07)
        for part in (slice(0, 64), slice(64, 256)):
            l2, g2, _, _ = mb.full_softmax_loss(bank, np.ascontiguousarray(f[part]), ids[part], 0.07)
            w = (part.stop - part.start) / 256
            np.testing.assert_allclose(grad[part], g2 * w, rtol=1e-6, atol=1e-9)
        self.assertTrue(np.isfinite([loss, mz, mp]).all())

    def test_knn_against_brute_force_across_blocks(self):
        rng = np.random.default_rng(7)
        n, dim, q, classes = 3000, 16, 1300, 10  # 1300 queries: several of the module's blocks
        centers = unit_rows(rng, classes, dim)
        labels = rng.integers(0, classes, n).astype(np.int64)
        rows = centers[labels] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
        bank = mb.Bank.from_array(rows.astype(np.float32))
        ql = rng.integers(0, classes, q).astype(np.int64)
        qs = unit_rows(rng, q, dim) * 0.3 + centers[ql]
        qs = (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32)
        r = mb.knn_evaluate(bank, labels, qs, ql, k=20, sigma=0.1)
        s = qs.astype(np.float64) @ bank.view().astype(np.float64).T
        top = np.argsort(-s, axis=1, kind="stable")[:, :20]
        score = np.zeros((q, classes))
        for i in range(q):
            np.add.at(score[i], labels[top[i]], np.exp(s[i, top[i]] / 0.1))
        pred = score.argmax(axis=1)
        self.assertGreaterEqual((pred == r.predictions).mean(), 0.995)  # float32 vs float64 near-ties
        self.assertAlmostEqual(r.top1, (r.predictions == ql).mean(), places=12)
        self.assertAlmostEqual(r.nn1, (labels[top[:, 0]] == ql).mean(), delta=0.005)


class TestArrays(unittest.TestCase):
    """Zero-copy in and out; every refused array says how to fix it."""

    def setUp(self):
        self.fx = Fixture()
        self.e = self.fx.engine

    def assertRefused(self, exc, needle, fn, *args, **kw):
        with self.assertRaises(exc) as cm:
            fn(*args, **kw)
        self.assertIn(needle, str(cm.exception))
        return str(cm.exception)

    def test_view_is_zero_copy_read_only_and_keeps_owner_alive(self):
        bank = mb.Bank(1000, 20, seed=1)
        v = bank.view()
        self.assertEqual(v.shape, (1000, 20))
        self.assertEqual(v.strides, (4 * bank.stride, 4))
        self.assertGreaterEqual(bank.stride, 20)
        self.assertFalse(v.flags.writeable)
        with self.assertRaises(ValueError):
            v[0, 0] = 1.0
        self.assertEqual(v.__array_interface__["data"][0], bank.view().__array_interface__["data"][0])
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
        eng = mb.Engine(bank, k=8)
        self.assertTrue(bank.owned_by_engine)
        self.assertRefused(mb.Error, "already belongs to an Engine", mb.Engine, bank)
        self.assertRefused(mb.Error, "use Engine.update", bank.update, np.zeros(1, np.int64), v[:1].copy())
        before = v[:4].copy()
        ids = np.arange(4, dtype=np.int64)
        f = unit_rows(np.random.default_rng(0), 4, 20)
        eng.step(f, ids)
        self.assertFalse(np.array_equal(before, v[:4]))  # the view is live
        del eng, bank
        import gc
        gc.collect()
        self.assertTrue(np.isfinite(v).all())  # still valid: the view owns a reference to the engine

    def test_standalone_update(self):
        rng = np.random.default_rng(2)
        bank = mb.Bank.from_array(unit_rows(rng, 50, 8))
        v0 = bank.view().copy()
        f, ids = unit_rows(rng, 3, 8), np.array([4, 4, 9], dtype=np.int64)
        bank.update(ids, f, momentum=0.25, step=7)
        r = v0[4] * 0.25 + 0.75 * f[0]
        r /= np.linalg.norm(r)
        r = r * 0.25 + 0.75 * f[1]  # duplicates in batch order
        r /= np.linalg.norm(r)
        np.testing.assert_allclose(bank.view()[4], r, atol=1e-6)
        self.assertEqual(bank.last_update()[9], 7)

    def test_out_is_written_in_place(self):
        out = np.full((self.fx.b, self.fx.dim), np.nan, dtype=np.float32)
        loss, grad, _ = self.e.step(self.fx.f, self.fx.ids, out=out, update=False)
        self.assertIs(grad, out)
        self.assertTrue(np.isfinite(out).all())

    def test_row_strided_features_are_read_without_copy(self):
        big = np.zeros((2 * self.fx.b, self.fx.dim), np.float32)
        big[::2] = self.fx.f
        neg = self.e.sample(self.fx.ids)
        a = self.e.evaluate(big[::2], self.fx.ids, neg)
        b = self.e.evaluate(self.fx.f, self.fx.ids, neg)
        self.assertEqual(a[0], b[0])

    def test_refused_features(self):
        f, ids, e = self.fx.f, self.fx.ids, self.e
        m = self.assertRefused(TypeError, "features.astype(np.float32)", e.step, f.astype(np.float64), ids)
        self.assertIn("got dtype float64", m)
        self.assertRefused(TypeError, "features.astype(np.float32)", e.step, f.astype(np.float16), ids)
        self.assertRefused(TypeError, "features.astype(np.float32)", e.step, f.astype(">f4"), ids)
        self.assertRefused(ValueError, "np.ascontiguousarray(features)", e.step, np.asfortranarray(f), ids)
        wide = np.zeros((f.shape[0], 2 * f.shape[1]), np.float32)
        self.assertRefused(ValueError, "contiguous rows", e.step, wide[:, ::2], ids)
        self.assertRefused(ValueError, "np.ascontiguousarray(features)", e.step, f[::-1], ids)
        self.assertRefused(ValueError, "features[None, :]", e.step, f[0], ids[:1])
        self.assertRefused(ValueError, "must be 2-D", e.step, f[None], ids)
        self.assertRefused(TypeError, "must be a numpy.ndarray", e.step, f.tolist(), ids)
        buf = np.zeros(f.size * 4 + 1, np.uint8)
        unaligned = np.frombuffer(buf.data, dtype=np.float32, count=f.size, offset=1).reshape(f.shape)
        self.assertRefused(ValueError, "not aligned", e.step, unaligned, ids)
        self.assertRefused(mb.Error, "features", e.step, f[:-1], ids)  # B mismatch: the engine's message
        self.assertRefused(mb.Error, "x 15", e.step, np.ascontiguousarray(f[:, :15]), ids)
        nan = f.copy()
        nan[1, 2] = np.nan
        self.assertRefused(mb.Error, "features", e.step, nan, ids)
        self.assertRefused(mb.Error, "unit", e.step, f * 2, ids)
        self.assertEqual(e.steps_done, 0)  # nothing changed

    def test_refused_ids_out_negatives(self):
        f, ids, e = self.fx.f, self.fx.ids, self.e
        m = self.assertRefused(TypeError, "ids.astype(np.int64)", e.step, f, ids.astype(np.int32))
        self.assertIn("got dtype int32", m)
        self.assertRefused(TypeError, "ids.astype(np.int64)", e.step, f, ids.astype(np.float64))
        self.assertRefused(ValueError, "np.ascontiguousarray(ids)", e.step, f, np.repeat(ids, 2)[::2])
        self.assertRefused(ValueError, "ids.reshape(-1)", e.step, f, ids[:, None])
        self.assertRefused(mb.Error, "out of range", e.step, f, ids + self.fx.n)
        self.assertRefused(mb.Error, "ids is empty", e.step, f[:0], ids[:0])
        out = np.zeros((self.fx.b, self.fx.dim), np.float64)
        self.assertRefused(TypeError, "out.astype(np.float32)", e.step, f, ids, out=out)
        self.assertRefused(ValueError, "np.ascontiguousarray(out)", e.step, f, ids,
                           out=np.zeros((self.fx.dim, self.fx.b), np.float32).T)
        self.assertRefused(ValueError, "out has shape (8, 15)", e.step, f, ids, out=np.zeros((8, 15), np.float32))
        ro = np.zeros((self.fx.b, self.fx.dim), np.float32)
        ro.setflags(write=False)
        self.assertRefused(ValueError, "out is read-only", e.step, f, ids, out=ro)
        neg = e.sample(ids)
        self.assertRefused(TypeError, "negatives.astype(np.int64)", e.evaluate, f, ids, neg.astype(np.int32))
        self.assertRefused(ValueError, "np.ascontiguousarray(negatives)", e.evaluate, f, ids, np.asfortranarray(neg))
        self.assertRefused(mb.Error, "negatives", e.evaluate, f, ids, neg[:3])
        self.assertRefused(mb.Error, "out of range", e.evaluate, f, ids, neg + self.fx.n)
        self.assertEqual(e.steps_done, 0)

    def test_refused_other_arrays(self):
        rng = np.random.default_rng(0)
        self.assertRefused(TypeError, "weights.astype(np.float64)", mb.AliasSampler, np.ones(10, np.float32))
        self.assertRefused(mb.Error, "weight", mb.AliasSampler, -np.ones(10))
        self.assertRefused(TypeError, "rows.astype(np.float32)", mb.Bank.from_array, rng.standard_normal((5, 3)))
        self.assertRefused(mb.Error, "zero", mb.Bank.from_array, np.zeros((5, 3), np.float32))
        bank = self.e.bank
        lab = np.zeros(self.fx.n, np.int64)
        q = self.fx.f
        self.assertRefused(TypeError, "bank_labels.astype(np.int64)", mb.knn_evaluate, bank, lab.astype(np.int32), q,
                           np.zeros(self.fx.b, np.int64))
        self.assertRefused(TypeError, "queries.astype(np.float32)", mb.knn_evaluate, bank, lab, q.astype(np.float64),
                           np.zeros(self.fx.b, np.int64))
        self.assertRefused(mb.Error, "query_labels has 3 entries", mb.knn_evaluate, bank, lab, q, np.zeros(3, np.int64))
        self.assertRefused(mb.Error, "expected a class label", mb.knn_evaluate, bank, lab - 1, q,
                           np.zeros(self.fx.b, np.int64))
        self.assertRefused(mb.Error, "config.k", mb.Engine, mb.Bank(10, 4), k=0)
        self.assertRefused(mb.Error, "objective", mb.Engine, mb.Bank(10, 4), objective="softmax")
        b = mb.Bank(10, 4)
        self.assertRefused(mb.Error, "tau", mb.Engine, b, tau=-1.0)
        self.assertFalse(b.owned_by_engine)  # a refused configuration leaves the bank usable
        self.assertTrue(issubclass(mb.Error, ValueError))


class TestThreads(unittest.TestCase):
    def test_other_thread_runs_during_long_call_and_calls_serialise(self):
        rng = np.random.default_rng(4)
        bank = mb.Bank(100000, 128, seed=1)
        f, ids = unit_rows(rng, 512, 128), rng.choice(100000, 512, replace=False).astype(np.int64)
        ticks = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                ticks[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        try:
            time.sleep(0.05)
            before = ticks[0]
            mb.full_softmax_loss(bank, f, ids, 0.07)
            during = ticks[0] - before
        finally:
            stop.set()
            t.join()
        self.assertGreater(during, 1000, "the other thread was blocked: the GIL was not released")

        # Two Python threads stepping one engine: the calls run one after the other, none is lost.
        eng = mb.Engine(mb.Bank(20000, 32, seed=1), k=256)
        errors = []

        def worker(seed):
            try:
                r = np.random.default_rng(seed)
                for _ in range(20):
                    eng.step(unit_rows(r, 16, 32), r.choice(20000, 16, replace=False).astype(np.int64))
            except Exception as ex:  # pragma: no cover
                errors.append(ex)

        ts = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        self.assertEqual(errors, [])
        self.assertEqual(eng.steps_done, 40)

    @unittest.skipIf(threading.current_thread() is not threading.main_thread(), "signals need the main thread")
    def test_ctrl_c_stops_a_long_call(self):
        rng = np.random.default_rng(6)
        bank = mb.Bank(200000, 128, seed=1)
        b = 2048  # 2048 x 200000 x 128: ~32 blocks of 64 queries
        f, ids = unit_rows(rng, b, 128), rng.choice(200000, b, replace=False).astype(np.int64)
        out = np.full((b, 128), np.nan, np.float32)
        started = threading.Event()

        def interrupt():
            started.wait()
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        try:
            with self.assertRaises(KeyboardInterrupt):
                started.set()
                mb.full_softmax_loss(bank, f, ids, 0.07, out=out)
        finally:
            t.join()
        done = np.isfinite(out).all(axis=1)
        self.assertTrue(done[:64].all() or not done.any())
        self.assertFalse(done[-64:].any(), "the call ran to its end: Ctrl-C was not honoured between blocks")


class TestSnapshots(unittest.TestCase):
    def test_round_trip_resumes_bit_for_bit(self):
        rng = np.random.default_rng(8)
        mk = lambda: mb.Engine(mb.Bank(3000, 16, seed=4), k=64, seed=11)  # noqa: E731
        a, b = mk(), mk()
        batches = [(unit_rows(rng, 8, 16), rng.choice(3000, 8, replace=False).astype(np.int64)) for _ in range(6)]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bank.h5")
            labels = np.arange(3000, dtype=np.int64) % 7
            for f, ids in batches[:3]:
                a.step(f, ids)
                b.step(f, ids)
            mb.save_snapshot(path, b, labels=labels)
            self.assertEqual(mb.verify_snapshot(path), [])
            info = mb.read_snapshot_info(path)
            self.assertEqual((info["n"], info["dim"], info["step"], info["config"]["k"]), (3000, 16, 3, 64))
            c, lab = mb.load_snapshot(path, return_labels=True)
            np.testing.assert_array_equal(lab, labels)
            for f, ids in batches[3:]:
                la, ga, _ = a.step(f, ids)
                lc, gc, _ = c.step(f, ids)
                self.assertEqual(la, lc)
                np.testing.assert_array_equal(ga, gc)
            np.testing.assert_array_equal(a.bank.view(), c.bank.view())
            self.assertRaises(mb.Error, mb.load_snapshot, os.path.join(d, "missing.h5"))
            with open(os.path.join(d, "junk.h5"), "wb") as fh:
                fh.write(b"not hdf5")
            self.assertNotEqual(mb.verify_snapshot(os.path.join(d, "junk.h5")), [])

    def test_import_bank_from_h5py(self):
        try:
            import h5py
        except ImportError:
            self.skipTest("h5py not installed (apt-get install python3-h5py)")
        rng = np.random.default_rng(9)
        rows = rng.standard_normal((100, 12))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.h5")
            with h5py.File(path, "w") as fh:
                fh["emb"] = rows
            bank, renorm = mb.import_bank(path, "emb")
            self.assertEqual(renorm, 100)
            np.testing.assert_allclose(bank.view(), rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6)


class TestSamplers(unittest.TestCase):
    def test_uniform_and_draws(self):
        s = mb.UniformSampler(1000)
        self.assertEqual((s.n, s.kind), (1000, "uniform"))
        self.assertAlmostEqual(s.prob(3), 1e-3)
        ids, lp = s.draw(50, seed=1, step=2, row=3)
        ids2, _ = s.draw(50, seed=1, step=2, row=3)
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_allclose(lp, np.log(1e-3), rtol=1e-6)
        ex, _ = s.draw(2000, excluded=np.arange(0, 1000, 2, dtype=np.int64))
        self.assertTrue((ex % 2 == 1).all())


class TestObjectives(unittest.TestCase):
    """The objectives' keywords, labels and snapshots through Python (the numerics are checked in C++
    against naive references: tests/test_objectives.cpp)."""

    def setUp(self):
        self.rng = np.random.default_rng(11)
        self.n, self.d, self.k = 300, 16, 23
        self.bank_rows = unit_rows(self.rng, self.n, self.d)
        self.f = unit_rows(self.rng, 6, self.d)
        self.ids = np.array([0, 5, 9, 77, 150, 299], dtype=np.int64)
        self.labels = (np.arange(self.n) % 5).astype(np.int64)

    def engine(self, **kw):
        return mb.Engine(mb.Bank.from_array(self.bank_rows), k=self.k, **kw)

    def test_infonce_by_hand_and_dcl_limit(self):
        neg = self.rng.integers(0, self.n, (6, self.k)).astype(np.int64)
        tau = 0.2
        loss, grad, _ = self.engine(objective="infonce", tau=tau).evaluate(self.f, self.ids, neg)
        b = self.bank_rows.astype(np.float64)
        f = self.f.astype(np.float64)
        ref_loss, ref_grad = 0.0, np.zeros_like(f)
        for i in range(6):
            rows = np.vstack([b[self.ids[i]], b[neg[i]]])
            l = rows @ f[i] / tau
            p = np.exp(l - l.max()); p /= p.sum()
            ref_loss += -np.log(p[0]) / 6
            c = p.copy(); c[0] -= 1.0
            ref_grad[i] = c @ rows / (tau * 6)
        self.assertAlmostEqual(loss, ref_loss, delta=1e-5 * abs(ref_loss))
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
        dloss, dgrad, st = self.engine(objective="dcl", tau=tau, tau_plus=0.0).evaluate(self.f, self.ids, neg)
        self.assertAlmostEqual(dloss, loss, delta=1e-6 * abs(loss))
        np.testing.assert_allclose(dgrad, grad, rtol=1e-5, atol=1e-7)
        self.assertAlmostEqual(st.mi_lower_bound, np.log(self.k + 1) - dloss, places=9)
        self.assertAlmostEqual(st.mi_bound_ceiling, np.log(self.k + 1), places=12)

    def test_keywords_reach_the_config(self):
        e = self.engine(objective="hcl", beta=0.5, tau_plus=0.05, detach_weights=True)
        c = e.config
        self.assertEqual((c["objective"], c["beta"], c["tau_plus"], c["detach_weights"]), ("hcl", 0.5, 0.05, True))
        self.assertEqual(self.engine(objective="triplet", labels=self.labels).config["margin"], 0.2)
        self.assertEqual(self.engine(objective="contrastive", labels=self.labels).config["margin"], 1.0)
        self.assertEqual(self.engine(objective="kcl", kernel_t=1.5, gamma=4.0).config["gamma"], 4.0)

    def test_labels_needed_and_checked(self):
        e = self.engine(objective="supcon")
        self.assertIsNone(e.labels)
        with self.assertRaisesRegex(mb.Error, "needs labels"):
            e.step(self.f, self.ids)
        self.assertEqual(e.steps_done, 0)
        bank = mb.Bank.from_array(self.bank_rows)
        with self.assertRaisesRegex(mb.Error, "labels has 7 entries"):
            mb.Engine(bank, k=self.k, objective="supcon", labels=np.zeros(7, dtype=np.int64))
        mb.Engine(bank, k=self.k, objective="supcon", labels=self.labels)  # the refused call kept the bank usable
        e.set_labels(self.labels)
        np.testing.assert_array_equal(e.labels, self.labels)
        loss, _, _ = e.step(self.f, self.ids)
        self.assertTrue(np.isfinite(loss))
        with self.assertRaisesRegex(mb.Error, "beta"):
            self.engine(objective="hcl", beta=-1.0)
        with self.assertRaisesRegex(mb.Error, "objective = 'nope'"):
            self.engine(objective="nope")

    def test_exclude_same_label_draws(self):
        e = self.engine(objective="infonce", exclude_same_label=True, labels=self.labels)
        neg = e.sample(self.ids, 0)
        for i, y in enumerate(self.ids):
            self.assertTrue((self.labels[neg[i]] != self.labels[y]).all())

    def test_snapshot_keeps_objective_and_labels(self):
        e = self.engine(objective="supcon", tau=0.1, labels=self.labels)
        e.step(self.f, self.ids)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.h5")
            mb.save_snapshot(path, e)
            r = mb.load_snapshot(path)
        self.assertEqual(r.config["objective"], "supcon")
        np.testing.assert_array_equal(r.labels, self.labels)
        neg = e.sample(self.ids, e.steps_done)
        a = e.evaluate(self.f, self.ids, neg)
        b = r.evaluate(self.f, self.ids, neg)
        self.assertEqual(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


if __name__ == "__main__":
    unittest.main(verbosity=2)
