"""membank.MultiViewEngine (contrastive multiview coding, Tian et al.: V banks, every ordered pair of
the view graph scored) and membank.torch.MultiViewLoss, against references written plainly here:

  * CMC with NCE (and InfoNCE) in float64 numpy, every logit materialised, over the engine's own draws
    (engine.sample(ids, step)) and each pair's own Z (z_policy fixed; first_batch: each pair's Zhat of its
    first step, kept): loss, per-pair losses and dL/df^v within 1e-5, the banks' momentum refresh;
  * V = 2 against two single-view membank.Engine objects (bank 1 queried with view 0, bank 0 with view 1,
    the same seed): loss, gradients, Z and banks within 1e-6 (bit for bit in fact); with a cluster or
    ring sampler too (each pair draws from its own query view's q), bit for bit;
  * banks= (arrays, Bank objects), per-view dtypes, evaluate / update / restore_state;
  * MultiViewLoss's gradients against torch autograd of a plain float64 torch CMC (through two encoders);
  * every refused argument, with its message, changing nothing.

The torch tests are skipped when torch is not installed."""
import unittest

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the numpy-level tests still run
    torch = None

import membank as mb

N, D, K, B = 60, 16, 10, 6


def unit(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rel_err(a, b):
    """max |a - b| relative to max |b| (for gradients: an error relative to the largest entry)."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def batch(rng, mv, ids, noise=0.5):
    """Each view's features: near that view's rows of the batch (so the positives score high), unit rows."""
    feats = []
    for v in range(mv.views):
        x = mv.bank(v)[ids].astype(np.float64) + noise * rng.standard_normal((len(ids), mv.dim))
        feats.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return feats


# ---- the reference, in float64 --------------------------------------------------------------------------

def pair_reference(bank, f, ids, draws, tau, pn, objective, log_z=None):
    """One pair's loss and dL/df (f: the query view's features, bank: the bank view's rows), every logit
    materialised. draws: (B, K) or (1, K) (shared). NCE with Z = exp(log_z) (None: this step's Zhat, the
    first_batch estimate); InfoNCE: softmax over s/tau - log P_n. Returns (loss, grad, Zhat)."""
    bank, f = np.asarray(bank, np.float64), np.asarray(f, np.float64)
    b, k = f.shape[0], draws.shape[1]
    negs = np.broadcast_to(draws, (b, k))
    v_pos, v_neg = bank[ids], bank[negs]                       # (B, D), (B, K, D)
    s_pos = np.sum(f * v_pos, axis=1) / tau                    # s / tau
    s_neg = np.einsum("bd,bkd->bk", f, v_neg) / tau
    z_hat = float(np.mean(np.exp(s_neg) / pn[negs]))
    if objective == "nce":
        log_z = np.log(z_hat) if log_z is None else log_z
        kpn_pos, kpn_neg = k * pn[ids], k * pn[negs]
        p_pos, p_neg = np.exp(s_pos - log_z), np.exp(s_neg - log_z)
        h_pos, h_neg = p_pos / (p_pos + kpn_pos), p_neg / (p_neg + kpn_neg)
        loss = -float(np.mean(np.log(h_pos) + np.sum(np.log1p(-h_neg), axis=1)))
        d_pos = -(1.0 - h_pos) / (b * tau)                     # dL/ds (s = v . f)
        d_neg = h_neg / (b * tau)
    else:  # infonce
        logits = np.concatenate([(s_pos - np.log(pn[ids]))[:, None], s_neg - np.log(pn[negs])], axis=1)
        top = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - top)
        lse = np.log(e.sum(axis=1)) + top[:, 0]
        loss = float(np.mean(lse - logits[:, 0]))
        c = e / e.sum(axis=1, keepdims=True)
        c[:, 0] -= 1.0
        c /= b * tau
        d_pos, d_neg = c[:, 0], c[:, 1:]
    grad = d_pos[:, None] * v_pos + np.einsum("bk,bkd->bd", d_neg, v_neg)
    return loss, grad, z_hat


def cmc_reference(banks, feats, ids, draws, pairs, tau, pn, objective, log_zs):
    """CMC: L = sum over the pairs (a, b) of L_ab (view a's queries on bank b), dL/df^a = sum over its pairs.
    log_zs[p]: pair p's log Z (None: its Zhat). Returns (loss, per-pair losses, grads, per-pair Zhat)."""
    grads = [np.zeros(f.shape) for f in feats]
    losses, z_hats = [], []
    for p, (a, b) in enumerate(pairs):
        loss, g, z_hat = pair_reference(banks[b], feats[a], ids, draws, tau, pn, objective, log_zs[p])
        losses.append(loss)
        z_hats.append(z_hat)
        grads[a] += g
    return sum(losses), losses, grads, z_hats


def refreshed(bank, f, ids, momentum):
    """The momentum refresh in batch order: v[y] <- normalise(m v[y] + (1 - m) f)."""
    out = np.asarray(bank, np.float64).copy()
    for i, y in enumerate(ids):
        x = momentum * out[y] + (1.0 - momentum) * f[i].astype(np.float64)
        out[y] = x / np.linalg.norm(x)
    return out


class TestPairs(unittest.TestCase):
    def test_graphs(self):
        for graph in ("full", "core"):
            mv = mb.MultiViewEngine(N, D, 2, graph, k=K)
            self.assertEqual(mv.pairs, [(0, 1), (1, 0)])
            self.assertEqual((mv.views, mv.n, mv.dim, mv.graph, mv.steps_done), (2, N, D, graph, 0))
        full = mb.MultiViewEngine(N, D, 3, k=K)
        self.assertEqual(full.pairs, [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)])
        core = mb.MultiViewEngine(N, D, views=3, graph="core", k=K)
        self.assertEqual(core.pairs, [(0, 1), (0, 2), (1, 0), (2, 0)])
        self.assertEqual(core.pair_index(2, 0), 3)
        with self.assertRaisesRegex(mb.Error, r"pair \(1, 2\) is not scored"):
            core.pair_index(1, 2)
        self.assertEqual(core.partitions, [None] * 4)
        self.assertEqual(core.dtypes, ["float32"] * 3)

    def test_seeded_banks(self):
        """Without banks=, view v's bank is Bank(n, dim, seed + v, dtype)."""
        mv = mb.MultiViewEngine(N, D, 3, seed=7, k=K, dtype=["float32", "bfloat16", None])
        self.assertEqual(mv.dtypes, ["float32", "bfloat16", "float32"])
        for v, dt in enumerate(mv.dtypes):
            np.testing.assert_array_equal(mv.bank(v), mb.Bank(N, D, seed=7 + v, dtype=dt).to_float32())
            np.testing.assert_array_equal(mv.last_update(v), -np.ones(N, np.int64))


class TestReference(unittest.TestCase):
    def run_against_reference(self, views, graph, objective, negatives, weights=None, steps=3, z_policy="fixed",
                              tol=1e-5):
        rng = np.random.default_rng(views * 10 + len(graph) + len(negatives))
        tau, momentum, z_fixed = 0.1, 0.5, 90.0
        mv = mb.MultiViewEngine(N, D, views, graph, weights=weights, k=K, tau=tau, momentum=momentum,
                                objective=objective, negatives=negatives, z_policy=z_policy, z_fixed=z_fixed, seed=3)
        pn = mv.sampler.probs()
        if weights is None:
            np.testing.assert_allclose(pn, 1.0 / N)
        else:
            np.testing.assert_allclose(pn, weights / weights.sum(), rtol=1e-12)
        first_z = None
        for step in range(steps):
            at = f"V={views} {graph} {objective} {negatives} {z_policy} step {step}"
            ids = rng.choice(N, B, replace=False)
            feats = batch(rng, mv, ids)
            banks = [mv.bank(v) for v in range(views)]
            draws = mv.sample(ids, step)
            self.assertEqual(draws.shape, (B, K) if negatives == "per-sample" else (1, K), at)
            np.testing.assert_array_equal(mv.sample(ids), draws)  # default: the next step
            if objective != "nce":
                log_zs = [0.0] * len(mv.pairs)
            elif z_policy == "fixed":
                log_zs = [np.log(z_fixed)] * len(mv.pairs)
            else:  # first_batch: each pair's Zhat of step 0, then kept
                log_zs = first_z or [None] * len(mv.pairs)
            loss_ref, pair_losses, grads_ref, z_hats = cmc_reference(banks, feats, ids, draws, mv.pairs, tau, pn,
                                                                     objective, log_zs)
            loss, grads, stats = mv.step(feats, ids)
            self.assertLessEqual(abs(loss - loss_ref), tol * abs(loss_ref), at)
            self.assertEqual(stats.pair_views, mv.pairs, at)
            self.assertEqual(len(stats.pairs), len(mv.pairs), at)
            self.assertEqual(stats.step, step, at)
            self.assertEqual(stats.loss, loss, at)
            self.assertAlmostEqual(sum(s.loss for s in stats.pairs), loss, delta=1e-12 * abs(loss))
            for p, (a, b) in enumerate(mv.pairs):
                s = stats.pair(a, b)
                self.assertEqual(s.loss, stats.pairs[p].loss)
                self.assertLessEqual(abs(s.loss - pair_losses[p]), tol * abs(pair_losses[p]), f"{at} pair {p}")
                self.assertLessEqual(abs(s.z_estimate - z_hats[p]), tol * z_hats[p], f"{at} pair {p} Zhat")
                if objective == "nce":
                    z_used = z_hats[p] if log_zs[p] is None else np.exp(log_zs[p])
                    self.assertLessEqual(abs(s.z - z_used), tol * z_used, f"{at} pair {p} Z")
            self.assertEqual(len(grads), views)
            for v in range(views):
                self.assertEqual((grads[v].dtype, grads[v].shape), (np.float32, (B, D)))
                self.assertLessEqual(rel_err(grads[v], grads_ref[v]), tol, f"{at} view {v}: dL/df")
                np.testing.assert_allclose(mv.bank(v), refreshed(banks[v], feats[v], ids, momentum), rtol=0,
                                           atol=1e-6, err_msg=f"{at} bank {v}")
                self.assertTrue(np.all(mv.last_update(v)[ids] == step), at)
            self.assertEqual(mv.steps_done, step + 1)
            if objective == "nce" and z_policy == "first_batch":
                if step == 0:
                    first_z = [np.log(z) for z in z_hats]
                    self.assertGreater(abs(z_hats[0] - z_hats[1]), 1e-6 * z_hats[0], "the pairs' Zhat differ")
                for p, lz in enumerate(mv.partitions):
                    self.assertAlmostEqual(lz, first_z[p], delta=tol, msg=f"{at} pair {p}: log Z kept")

    def test_nce_fixed_z(self):
        for negatives in ("per-sample", "shared"):
            self.run_against_reference(2, "full", "nce", negatives)
            self.run_against_reference(3, "core", "nce", negatives)
        self.run_against_reference(3, "full", "nce", "per-sample")

    def test_nce_alias_sampler(self):
        w = 1.0 + (np.arange(N) * 7 % 11).astype(np.float64)
        self.run_against_reference(2, "full", "nce", "per-sample", weights=w)
        self.run_against_reference(3, "core", "nce", "shared", weights=w)

    def test_nce_first_batch(self):
        """Each pair's Z is its own Zhat of step 0, kept afterwards."""
        self.run_against_reference(2, "full", "nce", "per-sample", z_policy="first_batch")
        self.run_against_reference(3, "core", "nce", "shared", z_policy="first_batch")

    def test_infonce(self):
        self.run_against_reference(2, "full", "infonce", "per-sample")
        self.run_against_reference(3, "full", "infonce", "shared", weights=1.0 + np.arange(N, dtype=np.float64))


class TestTwoEngines(unittest.TestCase):
    def test_v2_equals_two_single_view_engines(self):
        """Pair (0, 1) is an Engine over bank 1 queried with view 0, pair (1, 0) one over bank 0 queried with
        view 1, the same seed: the same draws, losses, Z, gradients; each bank refreshed with its own view."""
        for objective, z_policy, dtype1 in (("nce", "first_batch", "float32"), ("nce", "ema", "bfloat16"),
                                           ("infonce", "first_batch", "float16")):
            at = f"{objective} {z_policy} {dtype1}"
            opts = dict(k=K, tau=0.1, momentum=0.5, objective=objective, z_policy=z_policy, seed=11)
            mv = mb.MultiViewEngine(N, D, 2, dtype=["float32", dtype1], **opts)
            e01 = mb.Engine(mb.Bank(N, D, seed=12, dtype=dtype1), **opts)  # pair (0, 1): bank 1 = seed + 1
            e10 = mb.Engine(mb.Bank(N, D, seed=11), **opts)                # pair (1, 0): bank 0 = seed
            rng = np.random.default_rng(5)
            for step in range(3):
                ids = rng.integers(0, N, B)
                ids[3] = ids[0]  # a duplicate: refreshed in batch order
                f0, f1 = batch(rng, mv, ids)
                np.testing.assert_array_equal(mv.sample(ids), e01.sample(ids))
                loss, (g0, g1), stats = mv.step([f0, f1], ids)
                l01, h0, s01 = e01.step(f0, ids, update=False)
                l10, h1, s10 = e10.step(f1, ids, update=False)
                e01.update(f1, ids)  # each bank refreshed with its own view's features
                e10.update(f0, ids)
                self.assertAlmostEqual(stats.pairs[0].loss, l01, delta=1e-6 * abs(l01), msg=at)
                self.assertAlmostEqual(stats.pairs[1].loss, l10, delta=1e-6 * abs(l10), msg=at)
                self.assertAlmostEqual(loss, l01 + l10, delta=1e-6 * abs(loss), msg=at)
                self.assertLessEqual(rel_err(g0, h0), 1e-6, at)
                self.assertLessEqual(rel_err(g1, h1), 1e-6, at)
                np.testing.assert_allclose(mv.bank(1), e01.bank.to_float32(), rtol=0, atol=1e-6, err_msg=at)
                np.testing.assert_allclose(mv.bank(0), e10.bank.to_float32(), rtol=0, atol=1e-6, err_msg=at)
                if objective == "nce":
                    self.assertAlmostEqual(mv.partitions[0], e01.log_z, delta=1e-6, msg=at)
                    self.assertAlmostEqual(mv.partitions[1], e10.log_z, delta=1e-6, msg=at)
                    self.assertAlmostEqual(stats.pairs[0].z, s01.z, delta=1e-6 * s01.z, msg=at)
                    self.assertAlmostEqual(stats.pairs[1].z, s10.z, delta=1e-6 * s10.z, msg=at)

    def test_query_dependent_samplers_per_pair(self):
        """A cluster sampler (fitted to view 0's bank) and a ring sampler: pair (0, 1) is an Engine over bank 1
        queried with view 0 and pair (1, 0) one over bank 0 queried with view 1, each with the same sampler
        state: the same draws (sample(ids, features=, pair=)), losses and gradients. refresh_sampler re-fits the
        clusters to view 0's bank; sample() without the features is refused."""
        for kind in ("cluster", "ring"):
            def sampler():
                if kind == "cluster":  # view 0's bank: Bank(N, D, seed=11)
                    return mb.ClusterSampler(mb.Bank(N, D, seed=11), clusters=5, epsilon=0.2, beta=5.0, seed=3)
                return mb.RingSampler(N, lower=1, upper=20)
            opts = dict(k=K, tau=0.1, momentum=0.5, objective="infonce", seed=11,
                        allow_biased_sampler=kind == "ring")
            mv = mb.MultiViewEngine(N, D, 2, sampler=sampler(), **opts)
            e01 = mb.Engine(mb.Bank(N, D, seed=12), sampler(), **opts)  # pair (0, 1): bank 1 = seed + 1
            e10 = mb.Engine(mb.Bank(N, D, seed=11), sampler(), **opts)  # pair (1, 0): bank 0 = seed
            rng = np.random.default_rng(6)
            for step in range(3):
                ids = rng.integers(0, N, B)
                f0, f1 = batch(rng, mv, ids)
                np.testing.assert_array_equal(mv.sample(ids, features=[f0, f1], pair=0), e01.sample(ids, features=f0))
                np.testing.assert_array_equal(mv.sample(ids, features=[f0, f1], pair=1), e10.sample(ids, features=f1))
                loss, (g0, g1), stats = mv.step([f0, f1], ids)
                l01, h0, _ = e01.step(f0, ids, update=False)
                l10, h1, _ = e10.step(f1, ids, update=False)
                e01.update(f1, ids)
                e10.update(f0, ids)
                self.assertEqual(stats.pairs[0].loss, l01, kind)
                self.assertEqual(stats.pairs[1].loss, l10, kind)
                np.testing.assert_array_equal(g0, h0)
                np.testing.assert_array_equal(g1, h1)
            with self.assertRaisesRegex(mb.Error, "features"):
                mv.sample(ids)
            with self.assertRaisesRegex(mb.Error, "pair= together"):
                mv.sample(ids, features=[f0, f1])
            if kind == "cluster":
                mv.refresh_sampler()
                st = mv.sampler.cluster_state
                self.assertEqual(st["refreshed_at"], 3)
                dots = mv.bank(0).astype(np.float64) @ st["centroids"].astype(np.float64).T
                self.assertTrue(np.all(dots[np.arange(N), st["assignment"]] >= dots.max(axis=1) - 1e-5))
            else:
                with self.assertRaisesRegex(mb.Error, "cluster sampler"):
                    mv.refresh_sampler()
        with self.assertRaisesRegex(mb.Error, "biased"):  # as Engine: the ring needs allow_biased_sampler
            mb.MultiViewEngine(N, D, 2, sampler=mb.RingSampler(N, lower=1, upper=20), k=K)


class TestStateAndArguments(unittest.TestCase):
    def test_banks_argument(self):
        """banks=[Bank] is copied bit for bit (dtype kept); banks=[arrays] row-normalised into dtype."""
        seeded = mb.MultiViewEngine(N, D, 2, seed=4, k=K, dtype=[None, "float16"])
        given = [mb.Bank(N, D, seed=4), mb.Bank(N, D, seed=5, dtype="float16")]
        from_banks = mb.MultiViewEngine(banks=given, seed=4, k=K)
        self.assertEqual((from_banks.n, from_banks.dim, from_banks.views), (N, D, 2))
        self.assertEqual(from_banks.dtypes, ["float32", "float16"])
        rows = [seeded.bank(0), seeded.bank(1)]
        from_arrays = mb.MultiViewEngine(N, D, banks=rows, dtype=["float32", "float16"], seed=4, k=K)
        rng = np.random.default_rng(1)
        for step in range(2):
            ids = rng.integers(0, N, B)
            feats = batch(rng, seeded, ids)
            results = [e.step(feats, ids) for e in (seeded, from_banks, from_arrays)]
            self.assertEqual(results[1][0], results[0][0])          # bit for bit
            for v in range(2):
                np.testing.assert_array_equal(results[1][1][v], results[0][1][v])
                self.assertLessEqual(rel_err(results[2][1][v], results[0][1][v]), 1e-6)
                np.testing.assert_array_equal(from_banks.bank(v), seeded.bank(v))
                np.testing.assert_allclose(from_arrays.bank(v), seeded.bank(v), rtol=0, atol=1e-6)
        # the Bank objects given are left as they were (copied, not taken)
        np.testing.assert_array_equal(given[0].to_float32(), mb.Bank(N, D, seed=4).to_float32())
        self.assertFalse(given[0].owned_by_engine)

    def test_evaluate_update_restore(self):
        rng = np.random.default_rng(2)
        opts = dict(k=K, tau=0.1, seed=9, z_policy="first_batch")
        mv = mb.MultiViewEngine(N, D, 3, "core", **opts)
        ids = rng.integers(0, N, B)
        feats = batch(rng, mv, ids)
        before = [mv.bank(v) for v in range(3)]
        le, ge, se = mv.evaluate(feats, ids)
        self.assertEqual((mv.steps_done, mv.partitions), (0, [None] * 4))
        for v in range(3):
            np.testing.assert_array_equal(mv.bank(v), before[v])
        ls, gs, ss = mv.step(feats, ids, update=False)             # the same numbers; counter and Z advance
        self.assertEqual(le, ls)
        for v in range(3):
            np.testing.assert_array_equal(ge[v], gs[v])
            np.testing.assert_array_equal(mv.bank(v), before[v])    # update=False: no refresh
        self.assertEqual(mv.steps_done, 1)
        self.assertTrue(all(z is not None for z in mv.partitions))
        mv.update(feats, ids)
        for v in range(3):
            np.testing.assert_allclose(mv.bank(v), refreshed(before[v], feats[v], ids, 0.5), rtol=0, atol=1e-6)
            self.assertTrue(np.all(mv.last_update(v)[ids] == 1))
        # out= buffers are written in place
        out = [np.empty((B, D), np.float32) for _ in range(3)]
        _, g, _ = mv.evaluate(feats, ids, out=out)
        self.assertTrue(all(g[v] is out[v] for v in range(3)))
        # resume: the same banks, Z states and counter continue the run
        resumed = mb.MultiViewEngine(banks=[mv.bank(v) for v in range(3)], graph="core", **opts)
        resumed.restore_state(mv.partitions, mv.steps_done)
        self.assertEqual((resumed.partitions, resumed.steps_done), (mv.partitions, 1))
        for _ in range(2):
            ids = rng.integers(0, N, B)
            feats = batch(rng, mv, ids)
            a, b = mv.step(feats, ids), resumed.step(feats, ids)
            self.assertAlmostEqual(a[0], b[0], delta=1e-6 * abs(a[0]))
            for v in range(3):
                self.assertLessEqual(rel_err(b[1][v], a[1][v]), 1e-5)

    def test_labels(self):
        labels = np.arange(N, dtype=np.int64) % 4
        mv = mb.MultiViewEngine(N, D, 2, k=K, objective="supcon", labels=labels)
        np.testing.assert_array_equal(mv.labels, labels)
        rng = np.random.default_rng(3)
        ids = rng.integers(0, N, B)
        loss, grads, _ = mv.step(batch(rng, mv, ids), ids)
        self.assertTrue(np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads))
        mv.set_labels(labels[::-1].copy())
        np.testing.assert_array_equal(mv.labels, labels[::-1])
        with self.assertRaisesRegex(mb.Error, "label"):
            mb.MultiViewEngine(N, D, 2, k=K, objective="supcon").step(batch(rng, mv, ids), ids)

    def test_refused_arguments(self):
        rng = np.random.default_rng(4)
        mv = mb.MultiViewEngine(N, D, 2, k=K, seed=1)
        ids = rng.integers(0, N, B)
        feats = batch(rng, mv, ids)
        banks = [mv.bank(0), mv.bank(1)]
        cases = [
            (TypeError, "features must be a list", lambda: mv.step(feats[0], ids)),
            (mb.Error, "features has 3 entries: expected V = 2", lambda: mv.step(feats + [feats[0]], ids)),
            (TypeError, r"features\[1\] must be a float32 .*astype\(np.float32\)",
             lambda: mv.step([feats[0], feats[1].astype(np.float64)], ids)),
            (mb.Error, r"features\[1\]", lambda: mv.step([feats[0], feats[1][:, :4].copy()], ids)),
            (mb.Error, r"features\[0\]", lambda: mv.step([2 * feats[0], feats[1]], ids)),  # not unit rows
            (TypeError, "ids must be a contiguous int64", lambda: mv.step(feats, ids.astype(np.int32))),
            (mb.Error, "ids is empty", lambda: mv.step([f[:0] for f in feats], ids[:0])),
            (mb.Error, "out of range|outside", lambda: mv.step(feats, np.full(B, N, np.int64))),
            (mb.Error, "out has 1 entries: expected V = 2",
             lambda: mv.step(feats, ids, out=[np.empty((B, D), np.float32)])),
            (ValueError, r"out\[1\] has shape",
             lambda: mv.step(feats, ids, out=[np.empty((B, D), np.float32), np.empty((B, 3), np.float32)])),
            (mb.Error, r"grads\[1\].*features\[0\]", lambda: mv.step(feats, ids, out=[np.empty((B, D), np.float32),
                                                                                       feats[0]])),
            (mb.Error, r"grads\[1\].*grads\[0\]", lambda: mv.step(feats, ids, out=[g := np.empty((B, D), np.float32),
                                                                                    g])),
            (mb.Error, "view 2 is out of range", lambda: mv.bank(2)),
            (mb.Error, "partitions has 1 entries", lambda: mv.restore_state([None], 3)),
            (mb.Error, "step = -1", lambda: mv.restore_state([None, None], -1)),
            (TypeError, r"partitions\[1\] must be a float", lambda: mv.restore_state([None, "x"], 1)),
            (mb.Error, "V >= 2", lambda: mb.MultiViewEngine(N, D, 1)),
            (mb.Error, "view graph = 'star'", lambda: mb.MultiViewEngine(N, D, 2, "star")),
            (TypeError, "n and dim are required", lambda: mb.MultiViewEngine(dim=D)),
            (mb.Error, "a list of 3 dtypes", lambda: mb.MultiViewEngine(N, D, 2, dtype=["float32"] * 3)),
            (mb.Error, "dtype = 'float8'", lambda: mb.MultiViewEngine(N, D, 2, dtype="float8")),
            (mb.Error, r"banks\[1\] has N = 5", lambda: mb.MultiViewEngine(banks=[banks[0], banks[1][:5].copy()])),
            (mb.Error, "views = 3.*banks holds 2", lambda: mb.MultiViewEngine(views=3, banks=banks)),
            (TypeError, "banks=", lambda: mb.MultiViewEngine(banks=banks[0])),
            (mb.Error, "float16 Bank", lambda: mb.MultiViewEngine(banks=[mb.Bank(N, D), mb.Bank(N, D, dtype="float16")],
                                                                  dtype="float32")),
            (mb.Error, "sampler= or weights=", lambda: mb.MultiViewEngine(N, D, sampler=mb.UniformSampler(N),
                                                                          weights=np.ones(N))),
            (mb.Error, "3 weights", lambda: mb.MultiViewEngine(N, D, weights=np.ones(3))),
            (mb.Error, "sampler covers N = 5", lambda: mb.MultiViewEngine(N, D, sampler=mb.UniformSampler(5))),
            (mb.Error, "tau", lambda: mb.MultiViewEngine(N, D, tau=-1.0)),
            (mb.Error, "z_fixed", lambda: mb.MultiViewEngine(N, D, z_policy="fixed")),
        ]
        for exc, pattern, call in cases:
            with self.subTest(pattern=pattern):
                with self.assertRaisesRegex(exc, pattern):
                    call()
        # nothing changed by any refused call
        self.assertEqual((mv.steps_done, mv.partitions), (0, [None, None]))
        for v in range(2):
            np.testing.assert_array_equal(mv.bank(v), banks[v])
        # pickling: like Engine, a MultiViewEngine is not picklable (restore from banks= + restore_state)
        import pickle
        with self.assertRaises(TypeError):
            pickle.dumps(mv)


@unittest.skipIf(torch is None, "torch is not installed (apt-get install python3-torch)")
class TestTorch(unittest.TestCase):
    @staticmethod
    def torch_cmc_nce(banks, feats, ids, draws, pairs, tau, k, n, z):
        """Plain float64 torch CMC with NCE over materialised logits: L = sum over the pairs of L_ab, uniform
        P_n = 1/N, fixed Z."""
        total = 0.0
        negs = draws.expand(len(ids), k)
        kpn = k / n
        for a, b in pairs:
            bank = banks[b]
            s_pos = (feats[a] * bank[ids]).sum(dim=1) / tau
            s_neg = torch.einsum("bd,bkd->bk", feats[a], bank[negs]) / tau
            p_pos, p_neg = torch.exp(s_pos) / z, torch.exp(s_neg) / z
            total = total - (torch.log(p_pos / (p_pos + kpn)) + torch.log(kpn / (p_neg + kpn)).sum(dim=1)).mean()
        return total

    def test_gradients_against_autograd(self):
        from membank.torch import MultiViewLoss
        tau, z = 0.1, 90.0
        for views, graph, negatives in ((2, "full", "per-sample"), (3, "core", "shared"), (3, "full", "per-sample")):
            at = f"V={views} {graph} {negatives}"
            crit = MultiViewLoss(mb.MultiViewEngine(N, D, views, graph, k=K, tau=tau, z_policy="fixed", z_fixed=z,
                                                    negatives=negatives, seed=2))
            torch.manual_seed(0)
            encoders = [torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, D)).double()
                        for _ in range(views)]
            refs = [copy_module(e) for e in encoders]
            gen = torch.Generator().manual_seed(1)
            for step in range(2):
                x = [torch.randn(B, 12, generator=gen, dtype=torch.float64) for _ in range(views)]
                ids = torch.randperm(N, generator=gen)[:B]
                banks = [torch.from_numpy(crit.engine.bank(v)).double() for v in range(views)]
                draws = torch.from_numpy(crit.engine.sample(ids.numpy()))
                feats = [F.normalize(e(xi), dim=1) for e, xi in zip(encoders, x)]
                loss = crit(feats, ids)
                self.assertEqual(loss.dtype, torch.float64)
                loss.backward()
                ref_feats = [F.normalize(e(xi), dim=1) for e, xi in zip(refs, x)]
                ref = self.torch_cmc_nce(banks, ref_feats, ids, draws, crit.engine.pairs, tau, K, N, z)
                ref.backward()
                self.assertLessEqual(abs(loss.item() - ref.item()), 1e-5 * abs(ref.item()), at)
                self.assertEqual(crit.last_stats.pair_views, crit.engine.pairs)
                for e, r in zip(encoders, refs):
                    for p, q in zip(e.parameters(), r.parameters()):
                        self.assertLessEqual(rel_err(p.grad.numpy(), q.grad.numpy()), 1e-5, f"{at} step {step}")
                for m in encoders + refs:
                    m.zero_grad()
            self.assertEqual(crit.engine.steps_done, 2)

    def test_feature_gradients_and_no_grad(self):
        from membank.torch import MultiViewLoss
        crit = MultiViewLoss(N, D, views=2, k=K, tau=0.1, z_policy="fixed", z_fixed=90.0, seed=6)
        self.assertEqual(crit.engine.views, 2)
        rng = np.random.default_rng(8)
        ids = rng.integers(0, N, B)
        f = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in batch(rng, crit.engine, ids)]
        before = [crit.engine.bank(v) for v in range(2)]
        with torch.no_grad():  # evaluation: nothing changes
            l0 = crit(f, torch.from_numpy(ids))
        self.assertEqual(crit.engine.steps_done, 0)
        for v in range(2):
            np.testing.assert_array_equal(crit.engine.bank(v), before[v])
        _, g_ref, _ = crit.engine.evaluate([x.detach().float().numpy() for x in f], ids)
        loss = crit(tuple(f), torch.from_numpy(ids))
        self.assertEqual(loss.item(), l0.item())
        (2.0 * loss).backward()  # the incoming gradient scales dL/df
        for v in range(2):
            self.assertEqual(f[v].grad.dtype, torch.float64)
            np.testing.assert_allclose(f[v].grad.numpy(), 2.0 * g_ref[v].astype(np.float64), rtol=0, atol=1e-7)
        self.assertEqual(crit.engine.steps_done, 1)
        self.assertFalse(np.array_equal(crit.engine.bank(0), before[0]))
        # only view 1 requires grad: still a training step, a gradient for view 1 only
        a = f[0].detach()
        b = f[1].detach().clone().requires_grad_(True)
        crit([a, b], torch.from_numpy(ids)).backward()
        self.assertIsNone(a.grad)
        self.assertIsNotNone(b.grad)
        self.assertEqual(crit.engine.steps_done, 2)

    def test_cmc_loop(self):
        """A tiny CMC loop with two views (two encoders of different inputs of the same instances)."""
        from membank.torch import MultiViewLoss
        torch.manual_seed(0)
        n, dim = 64, 8
        data_l, data_ab = torch.randn(n, 5), torch.randn(n, 7)
        enc_l, enc_ab = torch.nn.Linear(5, dim), torch.nn.Linear(7, dim)
        crit = MultiViewLoss(mb.MultiViewEngine(n, dim, views=2, k=16, tau=0.1, momentum=0.5, seed=0))
        opt = torch.optim.SGD(list(enc_l.parameters()) + list(enc_ab.parameters()), lr=0.1)
        losses = []
        for epoch in range(3):
            for ids in torch.randperm(n).split(16):
                f_l = F.normalize(enc_l(data_l[ids]), dim=1)
                f_ab = F.normalize(enc_ab(data_ab[ids]), dim=1)
                loss = crit([f_l, f_ab], ids)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        self.assertTrue(np.all(np.isfinite(losses)))
        self.assertEqual(crit.engine.steps_done, 12)
        self.assertEqual(tuple(crit.bank(1).shape), (n, dim))

    def test_module_refusals(self):
        from membank.torch import MultiViewLoss
        with self.assertRaisesRegex(TypeError, "membank.MultiViewEngine"):
            MultiViewLoss(mb.Engine(mb.Bank(N, D), k=K))
        with self.assertRaisesRegex(TypeError, "drop them"):
            MultiViewLoss(mb.MultiViewEngine(N, D, k=K), tau=0.1)
        crit = MultiViewLoss(mb.MultiViewEngine(N, D, k=K))
        x = F.normalize(torch.randn(B, D), dim=1).requires_grad_(True)
        ids = torch.arange(B)
        with self.assertRaisesRegex(TypeError, "list or tuple"):
            crit(x, ids)
        with self.assertRaisesRegex(ValueError, "expected V = 2"):
            crit([x], ids)
        with self.assertRaisesRegex(TypeError, r"features\[1\] must be a torch.Tensor"):
            crit([x, x.detach().numpy()], ids)
        with self.assertRaisesRegex(TypeError, "ids must be an integer tensor"):
            crit([x, x], ids.float())
        self.assertEqual(crit.engine.steps_done, 0)


def copy_module(m):
    import copy
    return copy.deepcopy(m)


if __name__ == "__main__":
    unittest.main(verbosity=2)
