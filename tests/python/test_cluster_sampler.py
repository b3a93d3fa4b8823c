"""membank.ClusterSampler from Python: q(j | f) against a float64 numpy formula, the draws a step uses,
InfoNCE's loss against a numpy reference with query-dependent q, refresh_sampler against brute-force
nearest centroids, a snapshot round trip, and the refusals.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import os
import tempfile
import unittest

import numpy as np

import membank as mb

N, D, C = 400, 16, 8


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def naive_q(state, f):
    """q(j | f) for every row, float64, from the published mixture."""
    c = state["centroids"].astype(np.float64)
    a = state["assignment"]
    n = a.shape[0]
    sizes = np.bincount(a, minlength=c.shape[0]).astype(np.float64)
    w = sizes * np.exp(state["beta"] * (c @ f.astype(np.float64)))
    pi = w / w.sum()
    eps = state["epsilon"]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = np.where(sizes > 0, pi / sizes, 0.0)
    return eps / n + (1.0 - eps) * per_row[a]


class ClusterSamplerTest(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(5)
        centres = unit_rows(self.rng, C, D)
        rows = centres[np.arange(N) % C] + 0.3 * self.rng.standard_normal((N, D)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        self.rows = rows.astype(np.float32)

    def engine(self, **kw):
        bank = mb.Bank.from_array(self.rows)
        s = mb.ClusterSampler(bank, clusters=C, epsilon=0.2, beta=5.0, refresh_every=kw.pop("refresh_every", 0),
                              iterations=2, seed=3)
        return mb.Engine(bank, s, k=50, tau=0.1, objective=kw.pop("objective", "infonce"), z_policy="fixed",
                         z_fixed=1e4, seed=7, **kw)

    def test_infonce_against_numpy_with_query_dependent_q(self):
        e = self.engine()
        st = e.sampler.cluster_state
        self.assertEqual(st["assignment"].shape, (N,))
        ids = np.array([1, 17, 200, 399], dtype=np.int64)
        f = self.rows[ids] + 0.2 * self.rng.standard_normal((4, D)).astype(np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        neg = e.sample(ids, features=f)
        self.assertEqual(neg.shape, (4, 50))
        loss, grad, _ = e.evaluate(f, ids, neg)
        # InfoNCE with the log-Q correction: logits s / tau - log(N q) over the positive and the draws.
        V = self.rows.astype(np.float64)
        ref = 0.0
        for i in range(4):
            q = naive_q(st, f[i])
            ent = np.concatenate(([ids[i]], neg[i]))
            logits = V[ent] @ f[i].astype(np.float64) / 0.1 - np.log(N * q[ent])
            ref += (np.logaddexp.reduce(logits) - logits[0]) / 4
        self.assertAlmostEqual(loss, ref, delta=1e-5 * abs(ref))
        # The step draws exactly what sample(ids, features=f) gives.
        l2, g2, _ = e.step(f, ids, update=False)
        self.assertEqual(l2, loss)
        np.testing.assert_array_equal(g2, grad)

    def test_refresh_and_snapshot(self):
        e = self.engine(refresh_every=2)
        ids = np.arange(0, 40, dtype=np.int64)
        for t in range(3):
            f = unit_rows(self.rng, 40, D)
            e.step(f, ids)
        self.assertEqual(e.sampler.cluster_state["refreshed_at"], 2)  # at the start of step 2
        e.refresh_sampler()
        st = e.sampler.cluster_state
        self.assertEqual(st["refreshed_at"], 3)
        # Every row of the bank as it is now sits in the cluster of its nearest centroid (brute force,
        # near-ties allowed).
        bank = e.bank.to_float32()
        dots = bank.astype(np.float64) @ st["centroids"].astype(np.float64).T
        best = dots.max(axis=1)
        self.assertTrue(np.all(dots[np.arange(N), st["assignment"]] >= best - 1e-5))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.h5")
            mb.save_snapshot(path, e)
            r = mb.load_snapshot(path)
            self.assertEqual(r.sampler.kind, "cluster")
            np.testing.assert_array_equal(r.sampler.cluster_state["assignment"], e.sampler.cluster_state["assignment"])
            for t in range(3):  # across the refresh due at step 5
                f = unit_rows(self.rng, 40, D)
                la, ga, _ = e.step(f, ids)
                lb, gb, _ = r.step(f, ids)
                self.assertEqual(la, lb)
                np.testing.assert_array_equal(ga, gb)
            self.assertEqual(r.sampler.cluster_state["refreshed_at"], 5)

    def test_refusals(self):
        bank = mb.Bank(50, D, seed=1)
        with self.assertRaisesRegex(mb.Error, "clusters"):
            mb.ClusterSampler(bank, clusters=51)
        with self.assertRaisesRegex(mb.Error, "epsilon"):
            mb.ClusterSampler(bank, clusters=4, epsilon=0.0)
        e = self.engine()
        with self.assertRaisesRegex(mb.Error, "features"):
            e.sample(np.array([1, 2], dtype=np.int64))
        self.assertFalse(e.prefetch(np.array([1, 2], dtype=np.int64)))
        u = mb.Engine(mb.Bank(50, D, seed=1), k=5)
        with self.assertRaisesRegex(mb.Error, "cluster"):
            u.refresh_sampler()
        self.assertIsNone(u.sampler.cluster_state)


if __name__ == "__main__":
    unittest.main()
