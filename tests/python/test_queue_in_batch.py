"""membank.Queue (MoCo's ring of keys) and membank.InBatch (SimCLR's in-batch negatives) from Python,
and their torch modules (membank.torch.QueueLoss / InBatchLoss), against references written plainly
here: MoCo's InfoNCE with materialised logits and SimCLR's NT-Xent in float64 numpy, the same in
float64 torch under autograd; the ring's FIFO against a Python model (wrap-around with Q not a
multiple of B, B > Q); refused input changes nothing; state() / restore() and pickling continue bit
for bit. The torch tests are skipped when torch is not installed."""
import copy
import pickle
import unittest

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the numpy-level tests still run
    torch = None

import membank as mb

DTYPES = ("float32", "float16", "bfloat16")


def unit(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rel_err(a, b):
    """max |a - b| relative to max |b| (for gradients: an error relative to the largest entry)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


# ---- the references, in float64 ------------------------------------------------------------------

def moco_infonce(q, k, ring, tau, mask=None):
    """MoCo's InfoNCE with materialised logits: l_pos = q . k+ / tau (column 0), l_neg = q . ring^T / tau,
    cross-entropy with label 0, mean over the batch. mask[i, j] True: slot j is no negative of query i.
    Returns (loss, dL/dq) with dL/dq_i = sum_c (softmax_c - onehot_c) / tau / B * row_c."""
    q, k, ring = (np.asarray(a, np.float64) for a in (q, k, ring))
    b = q.shape[0]
    l_pos = np.sum(q * k, axis=1, keepdims=True) / tau
    l_neg = q @ ring.T / tau
    if mask is not None:
        l_neg = np.where(mask, -np.inf, l_neg)
    logits = np.concatenate([l_pos, l_neg], axis=1)
    top = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - top)
    lse = np.log(e.sum(axis=1, keepdims=True)) + top
    loss = float(np.mean(lse[:, 0] - logits[:, 0]))
    p = e / e.sum(axis=1, keepdims=True)
    c = p.copy()
    c[:, 0] -= 1.0                # softmax - onehot(0)
    c /= tau * b
    grad = c[:, :1] * k + c[:, 1:] @ ring
    return loss, grad


def nt_xent(a, b, tau, ids=None):
    """SimCLR's NT-Xent over the 2B samples Z = [a; b]: sample i's positive is its partner (i + B mod 2B),
    its denominator every j != i; with ids, samples of the same id other than i and its partner are
    masked. Returns (loss, dL/da, dL/db) by dL/dZ = (C + C^T) Z, C = dL/ds."""
    z = np.concatenate([a, b]).astype(np.float64)
    n, bsz = z.shape[0], a.shape[0]
    s = z @ z.T / tau
    partner = (np.arange(n) + bsz) % n
    masked = np.eye(n, dtype=bool)
    if ids is not None:
        inst = np.concatenate([ids, ids])
        masked |= (inst[:, None] == inst[None, :])
        masked[np.arange(n), partner] = False
    s = np.where(masked, -np.inf, s)
    top = s.max(axis=1, keepdims=True)
    e = np.exp(s - top)
    p = e / e.sum(axis=1, keepdims=True)
    lse = np.log(e.sum(axis=1)) + top[:, 0]
    loss = float(np.mean(lse - s[np.arange(n), partner]))
    c = p.copy()
    c[np.arange(n), partner] -= 1.0
    c /= tau * n
    g = (c + c.T) @ z
    return loss, g[:bsz], g[bsz:]


# ---- numpy level ---------------------------------------------------------------------------------

class TestQueueStep(unittest.TestCase):
    def check_against_reference(self, dtype, exclude_positive):
        rng = np.random.default_rng(1)
        cap, dim, b, tau = 37, 16, 8, 0.1
        queue = mb.Queue(cap, dim, tau=tau, dtype=dtype, seed=3, exclude_positive=exclude_positive)
        # fill part of the ring with keys of known ids, some of them the ids of the next batch (accidental hits)
        ids = rng.choice(100, b, replace=False).astype(np.int64)
        ring_ids = np.concatenate([ids[:3], ids[:3], rng.integers(200, 300, 6)]).astype(np.int64)
        queue.enqueue(unit(rng, 12, dim), ring_ids)
        for _ in range(2):
            q, k = unit(rng, b, dim), unit(rng, b, dim)
            ring, ring_ids = queue.keys(), queue.ids()
            mask = (ring_ids[None, :] == ids[:, None]) if exclude_positive else None
            if exclude_positive:
                self.assertGreater(mask.sum(), 0, "the test needs accidental hits to mask")
            ref_loss, ref_grad = moco_infonce(q, k, ring, tau, mask)
            before = queue.position
            loss, grad, stats = queue.step(q, k, ids)
            self.assertEqual(grad.shape, (b, dim))
            self.assertEqual(grad.dtype, np.float32)
            self.assertAlmostEqual(loss, ref_loss, delta=1e-5 * abs(ref_loss))
            self.assertEqual(stats.loss, loss)
            self.assertLess(rel_err(grad, ref_grad), 1e-5)
            self.assertEqual(queue.position, (before + b) % cap)

    def test_infonce_masked_hits_all_dtypes(self):
        for dtype in DTYPES:
            with self.subTest(dtype=dtype):
                self.check_against_reference(dtype, exclude_positive=True)

    def test_infonce_unmasked(self):
        self.check_against_reference("float32", exclude_positive=False)

    def test_mask_changes_the_loss(self):
        rng = np.random.default_rng(2)
        dim, b = 8, 4
        ids = np.arange(b, dtype=np.int64)
        q = unit(rng, b, dim)
        results = []
        for excl in (False, True):
            queue = mb.Queue(16, dim, exclude_positive=excl, seed=1)
            queue.enqueue(q, ids)  # the queries' own instances in the ring: strong accidental hits
            results.append(queue.evaluate(q, q, ids)[0])  # each query its own positive
        # unmasked, each query's copy in the ring ties with its positive: the loss is at least log 2
        self.assertGreater(results[0], np.log(2.0))
        self.assertLess(results[1], 0.1)

    def test_evaluate_changes_nothing_and_equals_step(self):
        rng = np.random.default_rng(3)
        queue = mb.Queue(20, 8, seed=5)
        q, k = unit(rng, 6, 8), unit(rng, 6, 8)
        keys0, pos0, steps0 = queue.keys(), queue.position, queue.steps_done
        l1, g1, _ = queue.evaluate(q, k)
        np.testing.assert_array_equal(queue.keys(), keys0)
        self.assertEqual((queue.position, queue.steps_done, queue.enqueued), (pos0, steps0, 0))
        l2, g2, s2 = queue.step(q, k, enqueue=False)
        self.assertEqual(l1, l2)
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_array_equal(queue.keys(), keys0)     # enqueue=False: the ring unchanged
        self.assertEqual((queue.position, queue.steps_done), (pos0, steps0 + 1))  # the counter moves


class TestQueueFifo(unittest.TestCase):
    def test_ring_matches_python_model(self):
        rng = np.random.default_rng(4)
        cap, dim = 10, 4                      # Q = 10 is no multiple of B = 3: batches wrap around the end
        queue = mb.Queue(cap, dim, seed=0)
        seeded = queue.keys()
        model_keys = [row for row in seeded]
        model_ids = [-1] * cap
        model_labels = [0] * cap
        model_labelled = [False] * cap
        model_last = [-1] * cap
        pos, enq, steps = 0, 0, 0

        def push(keys, ids, labels, step):
            nonlocal pos, enq
            bsz = len(keys)
            for t in range(max(0, bsz - cap), bsz):            # with B > Q only the last Q keys remain
                slot = (pos + t) % cap
                model_keys[slot] = keys[t]
                model_ids[slot] = -1 if ids is None else int(ids[t])
                model_labels[slot] = 0 if labels is None else int(labels[t])
                model_labelled[slot] = labels is not None
                model_last[slot] = step
            pos = (pos + bsz) % cap
            enq += bsz

        next_id = 0
        plan = [("step", 3), ("enqueue", 3), ("step", 3), ("step-noenqueue", 3), ("enqueue", 13), ("step", 3),
                ("enqueue", 1), ("step", 7), ("step", 3)]
        for kind, bsz in plan:
            keys = unit(rng, bsz, dim)
            ids = np.arange(next_id, next_id + bsz, dtype=np.int64)
            next_id += bsz
            labels = None if kind == "enqueue" and bsz == 1 else (ids % 5).astype(np.int64)
            if kind == "enqueue":
                queue.enqueue(keys, ids, labels)
                push(keys, ids, labels, steps)
            else:
                enqueue = kind == "step"
                queue.step(unit(rng, bsz, dim), keys, ids, labels, enqueue=enqueue)
                if enqueue:
                    push(keys, ids, labels, steps)
                steps += 1
            with self.subTest(after=(kind, bsz)):
                self.assertEqual(queue.position, pos)
                self.assertEqual(queue.enqueued, enq)
                self.assertEqual(queue.steps_done, steps)
                np.testing.assert_allclose(queue.keys(), np.array(model_keys), rtol=0, atol=1e-6)
                np.testing.assert_array_equal(queue.ids(), model_ids)
                np.testing.assert_array_equal(queue.labels(), model_labels)
                np.testing.assert_array_equal(queue.labelled(), model_labelled)
                np.testing.assert_array_equal(queue.last_update(), model_last)
        self.assertEqual(queue.capacity, cap)
        self.assertEqual(queue.dim, dim)
        self.assertEqual(queue.dtype, "float32")
        self.assertEqual(queue.config["objective"], "infonce")

    def test_keys_are_copies(self):
        queue = mb.Queue(5, 3, seed=1)
        k = queue.keys()
        k[:] = 0
        self.assertTrue(np.all(np.linalg.norm(queue.keys(), axis=1) > 0.99))
        i = queue.ids()
        i[:] = 7
        self.assertTrue(np.all(queue.ids() == -1))


class TestInBatch(unittest.TestCase):
    def test_nt_xent(self):
        rng = np.random.default_rng(5)
        for b, dim, tau in ((2, 3, 0.5), (9, 16, 0.1), (33, 24, 0.07)):
            with self.subTest(b=b, dim=dim, tau=tau):
                a, v = unit(rng, b, dim), unit(rng, b, dim)
                ib = mb.InBatch(tau=tau)
                loss, ga, gb, stats = ib.step(a, v)
                ref_loss, ref_a, ref_b = nt_xent(a, v, tau)
                self.assertAlmostEqual(loss, ref_loss, delta=1e-5 * abs(ref_loss))
                scale = max(np.abs(ref_a).max(), np.abs(ref_b).max())
                self.assertLess(np.abs(ga - ref_a).max() / scale, 1e-5)
                self.assertLess(np.abs(gb - ref_b).max() / scale, 1e-5)
                self.assertEqual(stats.step, 0)
                self.assertAlmostEqual(stats.mi_bound_ceiling, np.log(2 * b - 1), places=12)

    def test_nt_xent_duplicate_instances_masked(self):
        rng = np.random.default_rng(6)
        b, dim, tau = 8, 12, 0.2
        a, v = unit(rng, b, dim), unit(rng, b, dim)
        ids = np.array([0, 1, 2, 0, 3, 1, 4, 5], dtype=np.int64)  # instances 0 and 1 drawn twice
        loss, ga, gb, _ = mb.InBatch(tau=tau, exclude_positive=True).step(a, v, ids)
        ref_loss, ref_a, ref_b = nt_xent(a, v, tau, ids)
        self.assertAlmostEqual(loss, ref_loss, delta=1e-5 * abs(ref_loss))
        scale = max(np.abs(ref_a).max(), np.abs(ref_b).max())
        self.assertLess(np.abs(ga - ref_a).max() / scale, 1e-5)
        self.assertLess(np.abs(gb - ref_b).max() / scale, 1e-5)
        # without exclude_positive the ids change nothing
        l2, _, _, _ = mb.InBatch(tau=tau).step(a, v, ids)
        self.assertAlmostEqual(l2, nt_xent(a, v, tau)[0], delta=1e-5 * l2)

    def test_pickle(self):
        ib = mb.InBatch("dcl", 0.2, tau_plus=0.05)
        ib2 = pickle.loads(pickle.dumps(ib))
        self.assertEqual(ib2.config, ib.config)
        rng = np.random.default_rng(7)
        a, v = unit(rng, 5, 6), unit(rng, 5, 6)
        r1, r2 = ib.step(a, v), ib2.step(a, v)
        self.assertEqual(r1[0], r2[0])
        np.testing.assert_array_equal(r1[1], r2[1])


# ---- refused input -------------------------------------------------------------------------------

class TestRefusals(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(8)
        self.rng = rng
        self.queue = mb.Queue(11, 6, seed=2, exclude_positive=True)
        self.queue.step(unit(rng, 4, 6), unit(rng, 4, 6), np.arange(4, dtype=np.int64))
        self.q, self.k = unit(rng, 4, 6), unit(rng, 4, 6)
        self.ids = np.arange(10, 14, dtype=np.int64)

    def snapshot(self):
        s = self.queue
        return (s.keys(), s.ids(), s.labels(), s.labelled(), s.last_update(), s.position, s.enqueued, s.steps_done)

    def assert_unchanged(self, before):
        after = self.snapshot()
        for x, y in zip(before, after):
            np.testing.assert_array_equal(x, y)

    def expect(self, exc, fragment, call):
        before = self.snapshot()
        with self.assertRaises(exc) as cm:
            call()
        self.assertIn(fragment, str(cm.exception))
        self.assert_unchanged(before)

    def test_queue_step_refusals(self):
        q, k, ids, queue = self.q, self.k, self.ids, self.queue
        self.expect(TypeError, "pass queries.astype(np.float32)", lambda: queue.step(q.astype(np.float64), k, ids))
        self.expect(TypeError, "pass keys.astype(np.float32)", lambda: queue.step(q, k.astype(np.float16), ids))
        self.expect(TypeError, "pass ids.astype(np.int64)", lambda: queue.step(q, k, ids.astype(np.int32)))
        self.expect(TypeError, "pass labels.astype(np.int64)",
                    lambda: queue.step(q, k, ids, ids.astype(np.float32)))
        self.expect(TypeError, "must be a numpy.ndarray", lambda: queue.step(q.tolist(), k, ids))
        self.expect(ValueError, "queries must be 2-D", lambda: queue.step(q[0], k, ids))
        self.expect(ValueError, "contiguous rows", lambda: queue.step(np.asfortranarray(q), k, ids))
        self.expect(mb.Error, "keys", lambda: queue.step(q, k[:3], ids))
        self.expect(mb.Error, "queries", lambda: queue.step(unit(self.rng, 4, 5), k, ids))
        self.expect(mb.Error, "ids has 3 entries", lambda: queue.step(q, k, ids[:3]))
        self.expect(mb.Error, "ids[1] = -1", lambda: queue.step(q, k, np.array([0, -1, 2, 3], np.int64)))
        self.expect(mb.Error, "queries", lambda: queue.step(q * 2, k, ids))           # not unit-norm
        bad = k.copy()
        bad[2, 1] = np.nan
        self.expect(mb.Error, "keys", lambda: queue.step(q, bad, ids))
        self.expect(mb.Error, "at least one", lambda: queue.step(q[:0], k[:0], ids[:0]))
        self.expect(ValueError, "out has shape", lambda: queue.step(q, k, ids, out=np.zeros((3, 6), np.float32)))
        self.expect(mb.Error, "out", lambda: queue.step(q, k, ids, out=q))             # out aliases queries
        self.expect(mb.Error, "exclude_same_label needs labels",
                    lambda: mb.Queue(5, 6, exclude_same_label=True).step(q, k, ids))
        self.expect(mb.Error, "keys", lambda: queue.enqueue(k[:, :5], ids))
        self.expect(mb.Error, "ids has 3 entries", lambda: queue.enqueue(k, ids[:3]))
        # and a good call afterwards works (the queue was left usable)
        loss, grad, _ = queue.step(q, k, ids)
        self.assertTrue(np.isfinite(loss))
        out = np.empty((4, 6), np.float32)
        loss2, grad2, _ = queue.evaluate(q, k, ids, out=out)
        self.assertIs(grad2, out)

    def test_constructor_refusals(self):
        with self.assertRaisesRegex(mb.Error, "objective nce does not apply"):
            mb.Queue(8, 4, objective="nce")
        with self.assertRaisesRegex(mb.Error, "full"):
            mb.InBatch(objective="full")
        with self.assertRaisesRegex(mb.Error, "capacity"):
            mb.Queue(0, 4)
        with self.assertRaisesRegex(mb.Error, "float64"):
            mb.Queue(8, 4, dtype="float64")
        with self.assertRaisesRegex(mb.Error, "tau"):
            mb.Queue(8, 4, tau=-1.0)
        with self.assertRaisesRegex(mb.Error, "rounding"):
            mb.Queue(8, 4, rounding="sideways")
        with self.assertRaisesRegex(mb.Error, "objective"):
            mb.InBatch(objective="bogus")

    def test_in_batch_refusals(self):
        rng = self.rng
        a, v = unit(rng, 4, 6), unit(rng, 4, 6)
        ib = mb.InBatch()
        with self.assertRaisesRegex(TypeError, r"pass view_a.astype\(np.float32\)"):
            ib.step(a.astype(np.float64), v)
        with self.assertRaisesRegex(mb.Error, "B >= 2"):
            ib.step(a[:1], v[:1])
        with self.assertRaisesRegex(mb.Error, "B >= 2"):
            ib.step(a[:0], v[:0])
        with self.assertRaisesRegex(mb.Error, "view_b"):
            ib.step(a, v[:3])
        with self.assertRaisesRegex(mb.Error, "needs labels"):
            mb.InBatch("supcon").step(a, v)
        with self.assertRaisesRegex(mb.Error, "out_a"):
            ib.step(a, v, out_a=a)
        out_a, out_b = np.empty((4, 6), np.float32), np.empty((4, 6), np.float32)
        with self.assertRaisesRegex(mb.Error, "out_a"):
            ib.step(a, v, out_a=out_a, out_b=out_a)
        r = ib.step(a, v, out_a=out_a, out_b=out_b)
        self.assertIs(r[1], out_a)
        self.assertIs(r[2], out_b)

    def test_restore_refusals(self):
        queue = self.queue
        good = queue.state()

        def with_(**changes):
            s = dict(good)
            s.update(changes)
            return s

        self.expect(TypeError, "state must be a dict", lambda: queue.restore([1, 2]))
        s = dict(good)
        del s["ids"]
        self.expect(mb.Error, "state has no 'ids'", lambda: queue.restore(s))
        self.expect(TypeError, "state['keys'] must be",
                    lambda: queue.restore(with_(keys=good["keys"].astype(np.float64))))
        self.expect(ValueError, "got shape (10, 6)", lambda: queue.restore(with_(keys=good["keys"][:10])))
        self.expect(mb.Error, "position", lambda: queue.restore(with_(position=11)))
        self.expect(mb.Error, "state.ids[0] = -2",
                    lambda: queue.restore(with_(ids=np.full(11, -2, np.int64))))
        self.expect(mb.Error, "state has 5 ids", lambda: queue.restore(with_(ids=good["ids"][:5].copy())))
        self.expect(mb.Error, "not unit-norm", lambda: queue.restore(with_(keys=good["keys"] * 2)))
        self.expect(mb.Error, "last_update", lambda: queue.restore(with_(last_update=good["last_update"][:3].copy())))
        self.expect(TypeError, "state['step'] must be an int", lambda: queue.restore(with_(step="3")))
        other = mb.Queue(11, 6, dtype="float16").state()
        self.expect(TypeError, "state['keys'] must be", lambda: queue.restore(other))


# ---- state, restore, pickling --------------------------------------------------------------------

class TestStateRoundTrip(unittest.TestCase):
    def run_steps(self, queue, batches):
        out = []
        for q, k, ids, labels in batches:
            loss, grad, stats = queue.step(q, k, ids, labels)
            out.append((loss, grad, stats.mean_p_positive, queue.keys(), queue.ids(), queue.position))
        return out

    def assert_same(self, r1, r2):
        self.assertEqual(len(r1), len(r2))
        for a, b in zip(r1, r2):
            self.assertEqual(a[0], b[0])       # bit for bit
            np.testing.assert_array_equal(a[1], b[1])
            self.assertEqual(a[2], b[2])
            np.testing.assert_array_equal(a[3], b[3])
            np.testing.assert_array_equal(a[4], b[4])
            self.assertEqual(a[5], b[5])

    def test_round_trip_continues_bit_for_bit(self):
        for dtype, rounding in (("float32", "nearest"), ("float16", "stochastic"), ("bfloat16", "stochastic")):
            with self.subTest(dtype=dtype, rounding=rounding):
                rng = np.random.default_rng(9)
                cap, dim, b = 13, 8, 5
                opts = dict(tau=0.1, dtype=dtype, rounding=rounding, exclude_positive=True, seed=11)
                batches = [(unit(rng, b, dim), unit(rng, b, dim), rng.integers(0, 20, b).astype(np.int64),
                            rng.integers(0, 3, b).astype(np.int64)) for _ in range(6)]
                a = mb.Queue(cap, dim, **opts)
                self.run_steps(a, batches[:3])
                state = a.state()
                self.assertEqual(state["step"], 3)
                self.assertEqual(state["dtype"], dtype)
                self.assertEqual(state["keys"].dtype, {"float32": np.float32, "float16": np.float16,
                                                       "bfloat16": np.uint16}[dtype])
                blob = pickle.dumps(a)
                rest_a = self.run_steps(a, batches[3:])

                b_queue = mb.Queue(cap, dim, **dict(opts, seed=11))
                b_queue.restore(state)
                self.assertEqual((b_queue.position, b_queue.steps_done, b_queue.enqueued), (15 % cap, 3, 15))
                self.assert_same(rest_a, self.run_steps(b_queue, batches[3:]))

                c = pickle.loads(blob)
                self.assertEqual(c.config, a.config)
                self.assert_same(rest_a, self.run_steps(c, batches[3:]))
                d = copy.deepcopy(c)
                np.testing.assert_array_equal(d.keys(), c.keys())

    def test_state_is_a_copy(self):
        queue = mb.Queue(6, 4, seed=3)
        s = queue.state()
        s["keys"][:] = 0
        s["ids"][:] = 5
        self.assertTrue(np.all(queue.ids() == -1))
        self.assertTrue(np.all(np.abs(np.linalg.norm(queue.keys(), axis=1) - 1) < 1e-5))


# ---- torch ---------------------------------------------------------------------------------------

def torch_moco_infonce(q, k, ring, tau, mask=None):
    """MoCo's loss as its paper's pseudocode writes it, in plain torch."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = q @ ring.T
    if mask is not None:
        l_neg = l_neg.masked_fill(mask, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def torch_nt_xent(a, b, tau):
    """SimCLR's NT-Xent in plain torch."""
    z = torch.cat([a, b])
    n = z.shape[0]
    sim = (z @ z.T / tau).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    target = (torch.arange(n) + a.shape[0]) % n
    return F.cross_entropy(sim, target)


@unittest.skipIf(torch is None, "torch is not installed (apt-get install python3-torch)")
class TestTorchModules(unittest.TestCase):
    def test_queue_loss_equals_autograd(self):
        from membank.torch import QueueLoss
        rng = np.random.default_rng(10)
        cap, dim, b, tau = 29, 12, 6, 0.2
        criterion = QueueLoss(mb.Queue(cap, dim, tau=tau, seed=4, exclude_positive=True))
        criterion.queue.enqueue(unit(rng, 4, dim), np.array([0, 1, 50, 51], np.int64))  # hits for ids 0, 1
        for step in range(3):
            ids = torch.arange(b)  # the same ids each step: later steps hit their own keys
            q = torch.from_numpy(unit(rng, b, dim)).requires_grad_(True)
            k = torch.from_numpy(unit(rng, b, dim)).requires_grad_(True)  # must get no gradient
            ring = torch.from_numpy(criterion.queue.keys()).double()
            mask = torch.from_numpy(criterion.queue.ids())[None, :] == ids[:, None]
            pos = criterion.queue.position
            loss = criterion(q, k, ids)
            loss.backward()
            self.assertIsNone(k.grad)
            self.assertEqual(criterion.queue.position, (pos + b) % cap)  # k enqueued
            self.assertEqual(criterion.last_stats.step, step)
            qr = q.detach().double().requires_grad_(True)
            ref = torch_moco_infonce(qr, k.detach().double(), ring, tau, mask)
            ref.backward()
            self.assertAlmostEqual(loss.item(), ref.item(), delta=1e-5 * ref.item())
            self.assertLess(rel_err(q.grad.numpy(), qr.grad.numpy()), 1e-5)
            self.assertEqual(loss.dtype, torch.float32)
        # float64 in: loss and gradient in float64
        q = torch.from_numpy(unit(rng, b, dim)).double().requires_grad_(True)
        k = torch.from_numpy(unit(rng, b, dim)).double()
        loss = criterion(q, k)
        loss.backward()
        self.assertEqual(loss.dtype, torch.float64)
        self.assertEqual(q.grad.dtype, torch.float64)
        # under no_grad: evaluate only, the queue does not change
        keys0, pos0, steps0 = criterion.queue.keys(), criterion.queue.position, criterion.queue.steps_done
        with torch.no_grad():
            l_eval = criterion(q, k)
        self.assertTrue(torch.isfinite(l_eval))
        np.testing.assert_array_equal(criterion.queue.keys(), keys0)
        self.assertEqual((criterion.queue.position, criterion.queue.steps_done), (pos0, steps0))

    def test_in_batch_loss_equals_autograd(self):
        from membank.torch import InBatchLoss
        rng = np.random.default_rng(11)
        for b, dim, tau in ((4, 8, 0.5), (17, 32, 0.1)):
            with self.subTest(b=b):
                criterion = InBatchLoss(mb.InBatch(tau=tau))
                a = torch.from_numpy(unit(rng, b, dim)).requires_grad_(True)
                v = torch.from_numpy(unit(rng, b, dim)).requires_grad_(True)
                loss = criterion(a, v)
                loss.backward()
                ar = a.detach().double().requires_grad_(True)
                vr = v.detach().double().requires_grad_(True)
                ref = torch_nt_xent(ar, vr, tau)
                ref.backward()
                self.assertAlmostEqual(loss.item(), ref.item(), delta=1e-5 * ref.item())
                scale = max(ar.grad.abs().max().item(), vr.grad.abs().max().item())
                self.assertLess((a.grad.double() - ar.grad).abs().max().item() / scale, 1e-5)
                self.assertLess((v.grad.double() - vr.grad).abs().max().item() / scale, 1e-5)
        # one view without grad: only the other gets one
        a = torch.from_numpy(unit(rng, 5, 8)).requires_grad_(True)
        v = torch.from_numpy(unit(rng, 5, 8))
        InBatchLoss(tau=0.3)(a, v).backward()
        self.assertIsNotNone(a.grad)
        # views of different float dtypes: each gradient in its view's dtype
        a = torch.from_numpy(unit(rng, 5, 8)).requires_grad_(True)
        v = torch.from_numpy(unit(rng, 5, 8)).double().requires_grad_(True)
        InBatchLoss(tau=0.3)(a, v).backward()
        self.assertEqual((a.grad.dtype, v.grad.dtype), (torch.float32, torch.float64))

    def test_gradient_through_an_encoder(self):
        """Through F.normalize and a linear encoder: the engine's dL/dz enters autograd's chain exactly as a
        plain float64 torch loss does."""
        from membank.torch import InBatchLoss, QueueLoss
        torch.manual_seed(0)
        rng = np.random.default_rng(12)
        x_a = torch.from_numpy(rng.standard_normal((6, 10)))
        x_b = torch.from_numpy(rng.standard_normal((6, 10)))
        for make, ref in (
                (lambda: QueueLoss(mb.Queue(21, 8, tau=0.2, seed=1)), None),
                (lambda: InBatchLoss(mb.InBatch(tau=0.2)), torch_nt_xent)):
            criterion = make()
            enc = torch.nn.Linear(10, 8).double()
            ring = torch.from_numpy(criterion.queue.keys()).double() if ref is None else None
            za = F.normalize(enc(x_a), dim=1)
            zb = F.normalize(enc(x_b), dim=1)
            if ref is None:
                zb = zb.detach()  # MoCo: keys from a momentum encoder, no gradient
            criterion(za, zb).backward()
            g = enc.weight.grad.clone()
            enc.zero_grad()
            za = F.normalize(enc(x_a), dim=1)
            zb = F.normalize(enc(x_b), dim=1)
            r = torch_moco_infonce(za, zb.detach(), ring, 0.2) if ref is None else ref(za, zb, 0.2)
            r.backward()
            self.assertLess(rel_err(g.numpy(), enc.weight.grad.numpy()), 1e-5)

    def test_moco_loop_and_state_dict(self):
        """The README's MoCo loop at a tiny size; the queue travels in state_dict()."""
        from membank.torch import QueueLoss
        torch.manual_seed(0)
        encoder_q = torch.nn.Linear(10, 8)
        encoder_k = copy.deepcopy(encoder_q)
        for p in encoder_k.parameters():
            p.requires_grad_(False)
        criterion = QueueLoss(mb.Queue(24, 8, tau=0.2, exclude_positive=True))
        opt = torch.optim.SGD(encoder_q.parameters(), lr=0.1)
        data = torch.randn(40, 10)
        losses = []
        for step in range(8):
            ids = torch.randint(0, 40, (5,))
            x = data[ids]
            q = F.normalize(encoder_q(x + 0.05 * torch.randn_like(x)), dim=1)
            with torch.no_grad():
                for pk, pq in zip(encoder_k.parameters(), encoder_q.parameters()):
                    pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
                k = F.normalize(encoder_k(x + 0.05 * torch.randn_like(x)), dim=1)
            loss = criterion(q, k, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.assertTrue(np.all(np.isfinite(losses)))
        self.assertEqual(criterion.queue.enqueued, 40)
        self.assertEqual(criterion.queue.steps_done, 8)
        sd = criterion.state_dict()
        other = QueueLoss(24, 8, tau=0.2, exclude_positive=True)
        other.load_state_dict(sd)
        np.testing.assert_array_equal(other.queue.keys(), criterion.queue.keys())
        np.testing.assert_array_equal(other.queue.ids(), criterion.queue.ids())
        self.assertEqual((other.queue.position, other.queue.steps_done), (criterion.queue.position, 8))

    def test_module_refusals(self):
        from membank.torch import InBatchLoss, QueueLoss
        with self.assertRaisesRegex(TypeError, "membank.Queue"):
            QueueLoss("queue")
        with self.assertRaisesRegex(TypeError, "drop them"):
            QueueLoss(mb.Queue(4, 3), tau=0.1)
        with self.assertRaisesRegex(TypeError, "membank.InBatch"):
            InBatchLoss(mb.Queue(4, 3))
        criterion = QueueLoss(mb.Queue(4, 3))
        q = torch.randn(2, 3, requires_grad=True)
        with self.assertRaisesRegex(TypeError, "ids must be an integer tensor"):
            criterion(F.normalize(q, dim=1), F.normalize(q, dim=1).detach(), torch.zeros(2))
        with self.assertRaisesRegex(ValueError, "q must be 2-D"):
            criterion(q[0], q[0])
        self.assertEqual(criterion.queue.steps_done, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
