"""membank.knn_search (faiss-style (scores, ids), best first, ties: the smaller id first) and
membank.knn_evaluate from Python: against float64 numpy brute force (k = 1, 200, N), 2-byte banks,
exact ties, the same results for 1 and 2 threads, refused arguments, and Ctrl-C (a signal handler runs
during the search and its KeyboardInterrupt stops it; a handler that returns lets it finish).

Run by ctest through /usr/bin/python3 with PYTHONPATH at the built package (build/python)."""
import os
import signal
import sys
import threading
import unittest

import numpy as np

import membank as mb


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def widened(bank):
    """The bank's rows as float64, whatever its dtype (to_float32 widens 2-byte rows exactly)."""
    return bank.to_float32().astype(np.float64)


def brute_force(rows64, queries, k):
    """float64 scores (Q, N) and the reference order: score descending, then id ascending."""
    s = queries.astype(np.float64) @ rows64.T
    ids = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    return s, order


class TestAgainstBruteForce(unittest.TestCase):
    def check_search(self, bank, queries, k, tol=1e-5):
        scores, ids = mb.knn_search(bank, queries, k)
        q = queries.shape[0]
        self.assertEqual((scores.shape, scores.dtype, ids.shape, ids.dtype), ((q, k), np.float32, (q, k), np.int64))
        s64, ref = brute_force(widened(bank), queries, k)
        ref_scores = np.take_along_axis(s64, ref, axis=1)
        # Each returned score is its row's product, and the ranked scores are the reference's.
        np.testing.assert_allclose(scores, np.take_along_axis(s64, ids, axis=1), rtol=0, atol=tol)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=tol)
        # Ids equal the reference's wherever the rank is not within tol of a neighbouring rank (the k+1-th
        # row included: it decides which row takes the last place).
        full = np.sort(s64, axis=1)[:, ::-1]
        gap_before = np.full((q, k), np.inf)
        gap_before[:, 1:] = full[:, :k - 1] - full[:, 1:k]
        gap_after = np.full((q, k), np.inf)
        n_ranks = min(k + 1, s64.shape[1])
        gap_after[:, :n_ranks - 1] = full[:, :n_ranks - 1] - full[:, 1:n_ranks]
        clear = (gap_before > tol) & (gap_after > tol)
        self.assertGreater(clear.mean(), 0.5)  # the comparison below covers most ranks
        np.testing.assert_array_equal(ids[clear], ref[clear])
        # Every row at most once; best first; equal fp32 scores in increasing id order.
        self.assertTrue((np.diff(np.sort(ids, axis=1), axis=1) > 0).all())
        self.assertTrue(((scores[:, 1:] < scores[:, :-1]) |
                         ((scores[:, 1:] == scores[:, :-1]) & (ids[:, 1:] > ids[:, :-1]))).all())
        return scores, ids

    def test_float32_bank_k_1_200_and_n(self):
        rng = np.random.default_rng(11)
        n, dim = 3000, 32  # several bank tiles (of kKnnTile rows, the last one partial)
        bank = mb.Bank.from_array(unit_rows(rng, n, dim))
        queries = unit_rows(rng, 300, dim)  # several query blocks
        for k in (1, 200, n):
            with self.subTest(k=k):
                scores, ids = self.check_search(bank, queries, k)
                if k == n:
                    np.testing.assert_array_equal(np.sort(ids, axis=1), np.broadcast_to(np.arange(n), ids.shape))

    def test_2_byte_banks(self):
        rng = np.random.default_rng(12)
        rows, queries = unit_rows(rng, 2500, 48), unit_rows(rng, 100, 48)
        for dt in ("float16", "bfloat16"):
            with self.subTest(dtype=dt):
                bank = mb.Bank.from_array(rows, dtype=dt)
                self.assertEqual(bank.dtype, dt)
                for k in (1, 200):
                    self.check_search(bank, queries, k)

    def test_queries_that_are_bank_rows_find_themselves(self):
        bank = mb.Bank(2000, 24, seed=5)
        view = bank.view()[100:164]  # rows of the bank itself, strided like the bank
        scores, ids = mb.knn_search(bank, view, 5)
        np.testing.assert_array_equal(ids[:, 0], np.arange(100, 164))
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    def test_same_results_for_1_and_2_threads(self):
        rng = np.random.default_rng(13)
        bank = mb.Bank(5000, 16, seed=3)
        queries = unit_rows(rng, 40, 16)  # few queries: 2 threads split the bank
        before = mb.get_num_threads()
        try:
            mb.set_num_threads(1)
            one = mb.knn_search(bank, queries, 100)
            mb.set_num_threads(2)
            two = mb.knn_search(bank, queries, 100)
        finally:
            mb.set_num_threads(before)
        np.testing.assert_array_equal(one[0], two[0])
        np.testing.assert_array_equal(one[1], two[1])


class TestExactTies(unittest.TestCase):
    """Rows of four entries +-0.5 (norm exactly 1) or one entry +-1, queries with entries in {0, 0.5, 1}:
    every product is a multiple of 0.25 below 4, exact in fp32 in any order of summation, so the scores
    equal float64's and tie in large groups; the ids must be the reference's exactly (ties: smaller id)."""

    @staticmethod
    def tie_data(rng, n, q, dim):
        rows = np.zeros((n, dim), np.float32)
        for i in range(n):
            if i % 5 == 0:
                rows[i, rng.integers(dim)] = rng.choice([-1.0, 1.0])
            else:
                rows[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        queries = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), (q, dim))
        return rows, queries

    def test_ties_rank_the_smaller_id_first(self):
        rng = np.random.default_rng(14)
        n, dim = 5000, 16  # several tiles: ties between tiles as well as within
        rows, queries = self.tie_data(rng, n, 300, dim)
        s64, ref = brute_force(rows.astype(np.float64), queries, n)
        for dt in ("float32", "float16", "bfloat16"):
            bank = mb.Bank.from_array(rows, dtype=dt)
            np.testing.assert_array_equal(bank.to_float32(), rows)  # stored exactly: the premise of the test
            for k in (1, 37, 200) + ((n,) if dt == "float32" else ()):  # k = N: ~1 s a dtype here
                with self.subTest(dtype=dt, k=k):
                    scores, ids = mb.knn_search(bank, queries, k)
                    np.testing.assert_array_equal(ids, ref[:, :k])
                    np.testing.assert_array_equal(scores, np.take_along_axis(s64, ref[:, :k], axis=1))
                    if k == 200:  # the premise: many ties inside the k best
                        self.assertGreater((scores[:, 1:] == scores[:, :-1]).mean(), 0.5)


def weighted_knn(scores, ids, bank_labels, query_labels, sigma):
    """The weighted-kNN vote (Wu et al.) from given neighbours, in float64: predictions (ties: the smaller
    class), top-1, top-5 and 1-NN accuracy."""
    classes = int(bank_labels.max()) + 1
    votes = np.zeros((scores.shape[0], classes))
    for i in range(scores.shape[0]):
        np.add.at(votes[i], bank_labels[ids[i]], np.exp(scores[i].astype(np.float64) / sigma))
    order = np.argsort(-votes, axis=1, kind="stable")
    pred = order[:, 0]
    top5 = (order[:, :min(5, classes)] == query_labels[:, None]).any(axis=1)
    return pred, (pred == query_labels).mean(), top5.mean(), (bank_labels[ids[:, 0]] == query_labels).mean()


class TestKnnEvaluate(unittest.TestCase):
    def test_evaluate_equals_the_vote_over_knn_search_and_float64_brute_force(self):
        rng = np.random.default_rng(15)
        n, dim, q, classes, k, sigma = 4000, 24, 700, 12, 50, 0.1
        centers = unit_rows(rng, classes, dim)
        labels = rng.integers(0, classes, n).astype(np.int64)
        bank = mb.Bank.from_array((centers[labels] + 0.5 * unit_rows(rng, n, dim)).astype(np.float32))
        ql = rng.integers(0, classes, q).astype(np.int64)
        qs = centers[ql] + 0.7 * unit_rows(rng, q, dim)
        qs = (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32)
        r = mb.knn_evaluate(bank, labels, qs, ql, k=k, sigma=sigma)
        # The same neighbours as knn_search: the vote over them, in float64, is knn_evaluate's.
        pred, top1, top5, nn1 = weighted_knn(*mb.knn_search(bank, qs, k), labels, ql, sigma)
        np.testing.assert_array_equal(r.predictions, pred)
        self.assertEqual((r.top1, r.top5, r.nn1), (top1, top5, nn1))
        # Against float64 brute force: equal but for queries whose vote a float32 near-tie could move.
        s64, ref = brute_force(widened(bank), qs, k)
        pred64, top1_64, _, _ = weighted_knn(np.take_along_axis(s64, ref, axis=1), ref, labels, ql, sigma)
        self.assertGreaterEqual((pred64 == r.predictions).mean(), 0.995)
        self.assertAlmostEqual(r.top1, top1_64, delta=0.005)
        self.assertGreater(r.top1, 1.0 / classes + 0.2)  # the data has structure: not a vote by chance


class TestRefused(unittest.TestCase):
    def assertRefused(self, exc, needle, fn, *args):
        with self.assertRaises(exc) as cm:
            fn(*args)
        self.assertIn(needle, str(cm.exception))

    def test_refused_arguments(self):
        bank = mb.Bank(300, 8, seed=1)
        q = unit_rows(np.random.default_rng(0), 4, 8)
        self.assertRefused(mb.Error, "k = 0: expected 1 <= k <= N = 300", mb.knn_search, bank, q, 0)
        self.assertRefused(mb.Error, "k = 301: expected 1 <= k <= N = 300", mb.knn_search, bank, q, 301)
        self.assertRefused(mb.Error, "k = -2: expected 1 <= k <= N = 300", mb.knn_search, bank, q, -2)
        self.assertRefused(mb.Error, "queries has shape 4 x 7: expected Q x 8", mb.knn_search, bank, q[:, :7].copy(), 3)
        self.assertRefused(TypeError, "queries.astype(np.float32)", mb.knn_search, bank, q.astype(np.float64), 3)
        self.assertRefused(ValueError, "queries[None, :]", mb.knn_search, bank, q[0], 3)
        self.assertRefused(ValueError, "np.ascontiguousarray(queries)", mb.knn_search, bank, np.asfortranarray(q), 3)
        self.assertRefused(TypeError, "numpy.ndarray", mb.knn_search, bank, q.tolist(), 3)
        bad = q.copy()
        bad[2, 5] = np.nan
        self.assertRefused(mb.Error, "queries", mb.knn_search, bank, bad, 3)
        self.assertTrue(issubclass(mb.Error, ValueError))
        self.assertIn("knn_search", mb.__all__)


@unittest.skipIf(threading.current_thread() is not threading.main_thread(), "signals need the main thread")
class TestCtrlC(unittest.TestCase):
    """A signal that arrives during a search: its Python handler runs inside the call (the engine asks between
    bank tiles). A profile function tells that apart from a handler run once the call returned: it marks the
    call from its c_call to its c_return / c_exception event, and a signal still pending when the call returns
    runs its handler at the start of the c_return callback (the handler's frame is then the profile
    function's). A KeyboardInterrupt then ends the call; a handler that returns lets the search finish with
    the usual results."""

    @classmethod
    def setUpClass(cls):
        rng = np.random.default_rng(16)
        cls.n, cls.dim = 400000, 64
        cls.bank = mb.Bank(cls.n, cls.dim, seed=2)
        cls.queries = unit_rows(rng, 2000, cls.dim)  # 1e11 flops: ~1 s of search on 2 threads here
        cls.labels = rng.integers(0, 10, cls.n).astype(np.int64)
        cls.query_labels = rng.integers(0, 10, 2000).astype(np.int64)

    def setUp(self):
        self.threads = mb.get_num_threads()
        mb.set_num_threads(2)

    def tearDown(self):
        mb.set_num_threads(self.threads)

    def run_signalled(self, signum, handler, fn, *args):
        """fn(*args) with a profile function that sends signum 50 ms after fn starts; returns (fn's result or
        the exception it raised, whether the handler ran inside the call)."""
        state = {"inside": False, "handled_inside": None}

        def profile(frame, event, arg):
            if arg is fn and event == "c_call":
                state["inside"] = True
                threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            elif arg is fn and event in ("c_return", "c_exception"):
                state["inside"] = False

        def on_signal(s, frame):
            state["handled_inside"] = state["inside"] and frame.f_code is not profile.__code__
            handler(s, frame)

        previous = signal.signal(signum, on_signal)
        sys.setprofile(profile)
        try:
            try:
                result = fn(*args)
            except KeyboardInterrupt as e:
                result = e
            finally:
                sys.setprofile(None)
        finally:
            signal.signal(signum, previous)
        self.assertIsNotNone(state["handled_inside"], "the signal handler never ran")
        return result, state["handled_inside"]

    def test_ctrl_c_stops_knn_search_and_knn_evaluate(self):
        small = self.queries[:8]
        before = mb.knn_search(self.bank, small, 3)
        calls = ((mb.knn_search, (self.bank, self.queries, 200)),
                 (mb.knn_evaluate, (self.bank, self.labels, self.queries, self.query_labels, 200, 0.07)))
        for fn, args in calls:
            with self.subTest(fn=fn.__name__):
                result, inside = self.run_signalled(signal.SIGINT, signal.default_int_handler, fn, *args)
                self.assertIsInstance(result, KeyboardInterrupt)
                self.assertTrue(inside, "the KeyboardInterrupt came after the call returned: it ran to its end")
        # The bank's lock was released: the bank answers again, as before.
        after = mb.knn_search(self.bank, small, 3)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])

    def test_a_handler_that_returns_lets_the_search_finish(self):
        ran = []
        result, inside = self.run_signalled(signal.SIGUSR1, lambda s, f: ran.append(s), mb.knn_search, self.bank,
                                            self.queries, 20)
        self.assertEqual(ran, [signal.SIGUSR1])
        self.assertTrue(inside, "the handler did not run during the search")
        scores, ids = result
        # Per query, the results do not depend on the other queries: a slice is the reference.
        part = slice(900, 1000)
        ref_scores, ref_ids = mb.knn_search(self.bank, np.ascontiguousarray(self.queries[part]), 20)
        np.testing.assert_array_equal(ids[part], ref_ids)
        np.testing.assert_array_equal(scores[part], ref_scores)


if __name__ == "__main__":
    unittest.main(verbosity=2)
