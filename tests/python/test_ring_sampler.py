"""membank.RingSampler from Python: each step's draws lie in the query's ring (brute-force ranking in
float64), InfoNCE's loss against a numpy reference that weighs the draws as uniform ones, the
refusal without allow_biased_sampler (the Bank stays usable), and a snapshot round trip.

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import os
import tempfile
import unittest

import numpy as np

import membank as mb

N, D = 500, 16


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_ring(rows, f, lower, upper):
    """Ranks [lower, upper) by score in float64, highest first, ties by id: a set of ids."""
    s = rows.astype(np.float64) @ f.astype(np.float64)
    order = np.lexsort((np.arange(rows.shape[0]), -s))
    return set(order[lower:upper].tolist())


class RingSamplerTest(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(6)
        self.rows = unit_rows(self.rng, N, D)

    def engine(self, **kw):
        bank = mb.Bank.from_array(self.rows)
        return mb.Engine(bank, mb.RingSampler(N, lower=2, upper=30), k=40, tau=0.1, seed=5,
                         objective=kw.pop("objective", "infonce"), allow_biased_sampler=True, **kw)

    def test_draws_in_the_ring_and_infonce_unweighted(self):
        e = self.engine()
        self.assertTrue(e.sampler.biased)
        self.assertEqual(e.sampler.ring_ranks, (2, 30))
        ids = np.array([4, 77, 300], dtype=np.int64)
        f = self.rows[ids] + 0.3 * self.rng.standard_normal((3, D)).astype(np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        neg = e.sample(ids, features=f)
        V = self.rows.astype(np.float64)
        ref = 0.0
        for i in range(3):
            ring = brute_ring(self.rows, f[i], 2, 30)
            self.assertTrue(set(neg[i].tolist()) <= ring)
            # Unweighted InfoNCE: the logits are s / tau, no log-Q term.
            ent = np.concatenate(([ids[i]], neg[i]))
            logits = V[ent] @ f[i].astype(np.float64) / 0.1
            ref += (np.logaddexp.reduce(logits) - logits[0]) / 3
        loss, grad, _ = e.evaluate(f, ids, neg)
        self.assertAlmostEqual(loss, ref, delta=1e-5 * abs(ref))
        l2, g2, _ = e.step(f, ids, update=False)
        self.assertEqual(l2, loss)
        np.testing.assert_array_equal(g2, grad)

    def test_exclude_same_label_ranks_the_other_classes(self):
        """exclude_same_label: each query's draws lie in ranks [2, 30) of the other classes' rows (brute
        force), never its own label."""
        labels = (np.arange(N) * 7) % 5
        e = self.engine(exclude_same_label=True, labels=labels)
        ids = np.array([4, 90, 333], dtype=np.int64)
        f = unit_rows(self.rng, 3, D)
        draws = e.sample(ids, features=f)
        for i, y in enumerate(ids):
            others = np.flatnonzero(labels != labels[y])
            ring = {int(others[j]) for j in brute_ring(self.rows[others], f[i], 2, 30)}
            self.assertTrue(set(draws[i].tolist()) <= ring)
            self.assertFalse(np.any(labels[draws[i]] == labels[y]))

    def test_refusal_keeps_the_bank_and_snapshot(self):
        bank = mb.Bank.from_array(self.rows)
        with self.assertRaisesRegex(mb.Error, "allow_biased_sampler"):
            mb.Engine(bank, mb.RingSampler(N, lower=0, upper=10), k=8, objective="nce")
        self.assertEqual(bank.to_float32().shape, (N, D))  # still the caller's
        labels = np.arange(N, dtype=np.int64) % 5
        mb.Engine(bank, mb.RingSampler(N, lower=0, upper=10), k=8, objective="triplet", labels=labels)
        with self.assertRaisesRegex(mb.Error, "upper = 501"):
            mb.RingSampler(N, lower=0, upper=N + 1)
        e = self.engine(objective="dcl")
        ids = np.arange(0, 20, dtype=np.int64)
        e.step(unit_rows(self.rng, 20, D), ids)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "r.h5")
            mb.save_snapshot(path, e)
            r = mb.load_snapshot(path)
            self.assertEqual(r.sampler.kind, "ring")
            self.assertEqual(r.sampler.ring_ranks, (2, 30))
            self.assertTrue(r.config["allow_biased_sampler"])
            for _ in range(2):
                f = unit_rows(self.rng, 20, D)
                la, ga, _ = e.step(f, ids)
                lb, gb, _ = r.step(f, ids)
                self.assertEqual(la, lb)
                np.testing.assert_array_equal(ga, gb)


if __name__ == "__main__":
    unittest.main()
