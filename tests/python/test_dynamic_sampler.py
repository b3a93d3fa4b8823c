"""membank.DynamicSampler from Python: construction and refusals, weights set through the engine with
the loss and gradient against a float64 numpy reference, the engine-driven loss average, and a
snapshot round trip that resumes bit for bit.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import os
import tempfile
import unittest

import numpy as np

import membank as mb


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ref_infonce(bank, f, ids, neg, tau, p):
    """InfoNCE with the logQ correction (logits s / tau - log P_n) in float64: loss and dL/df."""
    bank = bank.astype(np.float64)
    f = f.astype(np.float64)
    b = f.shape[0]
    rows = np.concatenate([ids[:, None], neg], axis=1)          # (B, K + 1), the positive first
    v = bank[rows]                                               # (B, K + 1, D)
    logits = np.einsum("bkd,bd->bk", v, f) / tau - np.log(p[rows])
    logits -= logits.max(axis=1, keepdims=True)
    sm = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = -np.log(sm[:, 0]).mean()
    coef = sm.copy()
    coef[:, 0] -= 1.0
    grad = np.einsum("bk,bkd->bd", coef, v) / (tau * b)
    return loss, grad


class DynamicSamplerTest(unittest.TestCase):
    def test_probs_follow_weight_changes(self):
        rng = np.random.default_rng(1)
        w = rng.uniform(0.5, 2.0, 500)
        s = mb.DynamicSampler(w)
        self.assertEqual(s.kind, "dynamic")
        np.testing.assert_allclose(s.probs(), w / w.sum(), rtol=1e-12)
        np.testing.assert_array_equal(s.weights, w)
        self.assertEqual(s.dynamic_state["drive"], "none")
        with self.assertRaisesRegex(mb.Error, r"weights\[3\] = -1"):
            mb.DynamicSampler(np.array([1.0, 1.0, 1.0, -1.0]))
        with self.assertRaisesRegex(mb.Error, "alpha"):
            mb.DynamicSampler(w, drive="loss_ema", alpha=1.5)

    def test_engine_weights_loss_and_gradient_against_numpy(self):
        rng = np.random.default_rng(2)
        n, dim, k, tau = 400, 8, 24, 0.1
        w = rng.uniform(0.5, 2.0, n)
        eng = mb.Engine(mb.Bank.from_array(unit_rows(rng, n, dim)), mb.DynamicSampler(w), k=k, tau=tau,
                        objective="infonce")
        ids_set = rng.choice(n, 50, replace=False).astype(np.int64)
        new = rng.uniform(0.0, 5.0, 50)
        eng.set_sampler_weights(ids_set, new)
        w[ids_set] = new
        np.testing.assert_allclose(eng.sampler.probs(), w / w.sum(), rtol=1e-12)
        # Refused: nothing changes.
        with self.assertRaisesRegex(mb.Error, "-2"):
            eng.set_sampler_weights(np.array([1, 2], dtype=np.int64), np.array([1.0, -2.0]))
        np.testing.assert_array_equal(eng.sampler.weights, w)
        alias = mb.Engine(mb.Bank(n, dim, seed=1), mb.AliasSampler(w), k=k)
        with self.assertRaisesRegex(mb.Error, "dynamic"):
            alias.set_sampler_weights(np.array([1], dtype=np.int64), np.array([1.0]))
        bank = eng.bank.view().copy()
        ids = rng.choice(n, 6, replace=False).astype(np.int64)
        f = unit_rows(rng, 6, dim)
        neg = eng.sample(ids)
        loss, grad, _ = eng.step(f, ids)
        rl, rg = ref_infonce(bank, f, ids, neg, tau, w / w.sum())
        self.assertAlmostEqual(loss, rl, delta=1e-5 * abs(rl))
        np.testing.assert_allclose(grad, rg, rtol=0, atol=1e-5 * np.abs(rg).max())

    def test_loss_ema_drive_and_snapshot_resume(self):
        rng = np.random.default_rng(3)
        n, dim = 300, 8
        w = rng.uniform(0.5, 2.0, n)
        rows = unit_rows(rng, n, dim)
        batches = [(rng.choice(n, 10, replace=False).astype(np.int64), unit_rows(rng, 10, dim)) for _ in range(6)]

        def make():
            s = mb.DynamicSampler(w, drive="loss_ema", alpha=0.5, floor=0.2)
            return mb.Engine(mb.Bank.from_array(rows), s, k=16, objective="nce", z_policy="ema")

        whole = make()
        losses = [whole.step(f, ids)[0] for ids, f in batches]
        st = whole.sampler.dynamic_state
        seen = ~np.isnan(st["ema"])
        np.testing.assert_allclose(whole.sampler.weights[seen], 0.2 + np.maximum(st["ema"][seen], 0.0), rtol=0)
        np.testing.assert_array_equal(whole.sampler.weights[~seen], w[~seen])

        first = make()
        got = [first.step(f, ids)[0] for ids, f in batches[:3]]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "dyn.h5")
            mb.save_snapshot(path, first)
            info = mb.read_snapshot_info(path)
            self.assertEqual(info["sampler"], "dynamic")
            self.assertEqual(info["sampler_drive"], "loss_ema")
            resumed = mb.load_snapshot(path)
        got += [resumed.step(f, ids)[0] for ids, f in batches[3:]]
        self.assertEqual(got, losses)  # bit for bit
        np.testing.assert_array_equal(resumed.bank.view(), whole.bank.view())
        np.testing.assert_array_equal(resumed.sampler.weights, whole.sampler.weights)


if __name__ == "__main__":
    unittest.main(verbosity=2)
