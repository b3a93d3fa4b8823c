"""The Python face of the distributed engine in one process (no mpirun: mpi4py's singleton MPI, R = 1):
Engine(..., comm=...) makes a DistributedEngine, and with R = 1 its step is the single-process step
(loss, dL/df, bank); every refused argument raises one clear error (a build without MPI: comm= says so);
the calls a DistributedEngine does not have raise membank.Error naming what to use instead; membank.torch
takes it with grad_scale = R. The multi-rank properties are in distributed_mpi.py (under mpirun)."""
import sys
import unittest

import numpy as np

import membank as mb

try:
    from mpi4py import MPI
except ImportError:
    MPI = None


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class TestWithoutComm(unittest.TestCase):
    def test_plain_engine_unchanged(self):
        e = mb.Engine(mb.Bank(50, 8, seed=1), k=5, comm=None)
        self.assertIs(type(e), mb.Engine)
        self.assertEqual(e.steps_done, 0)

    def test_distributed_without_comm(self):
        with self.assertRaisesRegex(mb.Error, "needs comm="):
            mb.Engine(mb.Bank(50, 8), k=5, distributed="sharded")

    @unittest.skipIf(mb.has_mpi, "this build has MPI")
    def test_comm_without_mpi(self):
        with self.assertRaisesRegex(mb.Error, "built without MPI"):
            mb.Engine(mb.Bank(50, 8), k=5, comm=object(), distributed="sharded")
        self.assertFalse(hasattr(mb, "DistributedEngine"))


@unittest.skipUnless(mb.has_mpi and MPI is not None, "needs a build with MPI and mpi4py")
class TestDistributedEngine(unittest.TestCase):
    N, D, K = 80, 12, 9

    def engines(self, mode, **opts):
        ref = mb.Engine(mb.Bank(self.N, self.D, seed=2), k=self.K, seed=4, **opts)
        dist = mb.Engine(mb.Bank(self.N, self.D, seed=2), k=self.K, seed=4, comm=MPI.COMM_WORLD, distributed=mode,
                         **opts)
        return ref, dist

    def test_one_rank_is_the_single_process_engine(self):
        rng = np.random.default_rng(0)
        for mode in ("replicated", "sharded"):
            ref, dist = self.engines(mode, objective="nce", z_policy="ema")
            self.assertIsInstance(dist, mb.DistributedEngine)
            self.assertEqual((dist.mode, dist.rank, dist.ranks, dist.rows, dist.n, dist.dim, dist.dtype),
                             (mode, 0, 1, (0, self.N), self.N, self.D, "float32"))
            self.assertEqual(dist.config, ref.config)
            for _ in range(3):
                f, ids = unit_rows(rng, 6, self.D), rng.integers(0, self.N, 6)
                out = np.empty((6, self.D), np.float32)
                lr, gr, sr = ref.step(f, ids)
                ld, gd, sd = dist.step(f, ids, out=out)
                self.assertIs(gd, out)
                self.assertAlmostEqual(ld, lr, delta=1e-6 * abs(lr))
                np.testing.assert_allclose(gd, gr, rtol=0, atol=1e-6 * np.abs(gr).max())
                np.testing.assert_array_equal(dist.gather_bank(), ref.bank.to_float32())
                np.testing.assert_array_equal(dist.local_bank.to_float32(), ref.bank.to_float32())
                np.testing.assert_array_equal(dist.gather_last_update(), ref.bank.last_update())
            self.assertEqual((dist.steps_done, dist.log_z is None), (ref.steps_done, ref.log_z is None))
            self.assertAlmostEqual(dist.z, ref.z, delta=1e-9 * ref.z)
            dist.restore_state(10, log_z=2.5)
            self.assertEqual((dist.steps_done, dist.log_z), (10, 2.5))

    def test_defaults_and_keywords_match_engine(self):
        for opts in ({}, dict(objective="infonce", negatives="shared", tau=0.2, momentum=0.3, margin=None),
                     dict(objective="triplet", margin=0.4, exclude_same_label=True, rounding="stochastic",
                          labels=np.arange(self.N) % 3)):
            ref, dist = self.engines("sharded", **opts)
            self.assertEqual(dist.config, ref.config)
            if "labels" in opts:
                np.testing.assert_array_equal(dist.labels, ref.labels)
        dist.set_labels(np.arange(self.N) % 4)
        np.testing.assert_array_equal(dist.labels, np.arange(self.N) % 4)
        self.assertEqual(dist.sampler.kind, "uniform")

    def test_refused_arguments(self):
        bank = mb.Bank(self.N, self.D)
        with self.assertRaisesRegex(TypeError, "mpi4py communicator"):
            mb.Engine(bank, comm=3, distributed="sharded")
        with self.assertRaisesRegex(mb.Error, "bogus"):
            mb.Engine(bank, comm=MPI.COMM_WORLD, distributed="bogus")
        with self.assertRaisesRegex(TypeError, "unexpected keyword argument 'kk'"):
            mb.Engine(bank, comm=MPI.COMM_WORLD, kk=3)
        with self.assertRaisesRegex(TypeError, r"tau = 'x'"):
            mb.Engine(bank, comm=MPI.COMM_WORLD, tau="x")
        with self.assertRaisesRegex(mb.Error, "k"):
            mb.Engine(bank, comm=MPI.COMM_WORLD, distributed="replicated", k=0)
        self.assertFalse(bank.owned_by_engine)  # every refusal above left the Bank usable
        with self.assertRaisesRegex(mb.Error, "COMM_NULL"):
            mb.Engine(bank, comm=MPI.COMM_NULL)
        dist = mb.Engine(bank, comm=MPI.COMM_WORLD, k=self.K)  # replicated by default
        self.assertEqual(dist.mode, "replicated")
        self.assertTrue(bank.owned_by_engine)
        with self.assertRaisesRegex(mb.Error, "already belongs"):
            mb.Engine(bank, comm=MPI.COMM_WORLD)
        f = unit_rows(np.random.default_rng(1), 4, self.D)
        ids = np.arange(4)
        with self.assertRaisesRegex(TypeError, "float32"):
            dist.step(f.astype(np.float64), ids)
        with self.assertRaisesRegex(ValueError, "out"):
            dist.step(f, ids, out=f)
        with self.assertRaisesRegex(mb.Error, "empty"):
            dist.step(f[:0], ids[:0])
        with self.assertRaisesRegex(mb.Error, "out of range|N ="):
            dist.step(f, np.array([0, 1, 2, self.N]))
        self.assertEqual(dist.steps_done, 0)
        for call, args in (("evaluate", (f, ids, ids[None, :])), ("sample", (ids,)), ("update", (f, ids)),
                           ("prefetch", (ids,))):
            with self.assertRaisesRegex(mb.Error, f"DistributedEngine.{call} is not available"):
                getattr(dist, call)(*args)
        with self.assertRaisesRegex(mb.Error, "local_bank"):
            dist.bank
        with self.assertRaisesRegex(mb.Error, "/nonexistent"):
            mb.save_snapshot("/nonexistent/x.h5", dist)
        with self.assertRaisesRegex(mb.Error, "set_labels"):
            mb.save_snapshot("/nonexistent/x.h5", dist, labels=np.arange(self.N))
        with self.assertRaisesRegex(TypeError, "path must be a str"):
            mb.save_snapshot(3, dist)
        with self.assertRaisesRegex(mb.Error, "/nonexistent"):
            mb.load_snapshot("/nonexistent/x.h5", comm=MPI.COMM_WORLD, distributed="sharded")
        with self.assertRaisesRegex(mb.Error, "bogus"):
            mb.load_snapshot("/nonexistent/x.h5", comm=MPI.COMM_WORLD, distributed="bogus")
        with self.assertRaisesRegex(TypeError, "mpi4py communicator"):
            mb.load_snapshot("/nonexistent/x.h5", comm=3)
        with self.assertRaisesRegex(mb.Error, "only its step refreshes rows"):
            dist.local_bank.update(ids, f)

    def test_snapshot_round_trip(self):
        """save_snapshot / load_snapshot(comm=) at R = 1: the loaded engine continues as the saved one, in
        either mode; load_snapshot(path) without comm= is an Engine holding the same state."""
        import os
        import tempfile
        rng = np.random.default_rng(3)
        batches = [(unit_rows(rng, 5, self.D), rng.integers(0, self.N, 5)) for _ in range(4)]
        with tempfile.TemporaryDirectory() as d:
            for saved in ("sharded", "replicated"):
                _, dist = self.engines(saved, objective="infonce", labels=np.arange(self.N) % 3)
                for f, ids in batches[:2]:
                    dist.step(f, ids)
                path = os.path.join(d, saved + ".h5")
                mb.save_snapshot(path, dist, deflate_level=1)
                expected = [dist.step(f, ids)[0] for f, ids in batches[2:]]
                one = mb.load_snapshot(path)
                self.assertIs(type(one), mb.Engine)
                self.assertEqual(one.steps_done, 2)
                for mode in ("sharded", "replicated", None):
                    loaded, labels = mb.load_snapshot(path, True, comm=MPI.COMM_WORLD, distributed=mode)
                    self.assertIsInstance(loaded, mb.DistributedEngine)
                    self.assertEqual((loaded.mode, loaded.steps_done), (mode or "replicated", 2))
                    np.testing.assert_array_equal(labels, np.arange(self.N) % 3)
                    self.assertEqual([loaded.step(f, ids)[0] for f, ids in batches[2:]], expected)
                    np.testing.assert_array_equal(loaded.gather_bank(), dist.gather_bank())
        with self.assertRaisesRegex(mb.Error, "needs comm="):
            mb.load_snapshot("x.h5", distributed="sharded")

    def test_seeded_is_the_seeded_bank(self):
        for dtype in ("float32", "float16"):
            dist = mb.DistributedEngine.seeded(self.N, self.D, 9, dtype, comm=MPI.COMM_WORLD, distributed="sharded",
                                               k=self.K)
            np.testing.assert_array_equal(dist.gather_bank(), mb.Bank(self.N, self.D, seed=9, dtype=dtype).to_float32())

    def test_torch_module(self):
        try:
            import torch
        except ImportError:
            self.skipTest("torch is not installed")
        from membank.torch import MemoryBankLoss
        crit = MemoryBankLoss(self.N, self.D, k=self.K, seed=4, comm=MPI.COMM_WORLD, distributed="sharded")
        ref = MemoryBankLoss(self.N, self.D, k=self.K, seed=4)
        self.assertIsInstance(crit.engine, mb.DistributedEngine)
        self.assertEqual(crit.grad_scale, 1.0)  # R = 1
        self.assertEqual(ref.grad_scale, 1.0)
        self.assertIn("sharded rank 0 of 1", repr(crit))
        torch.testing.assert_close(crit.memory, ref.memory, rtol=0, atol=0)  # one rank holds every row
        x = torch.nn.functional.normalize(torch.randn(5, self.D), dim=1)
        for scale in (None, 3.0):
            c = MemoryBankLoss(self.N, self.D, k=self.K, seed=4, comm=MPI.COMM_WORLD, distributed="replicated",
                               grad_scale=scale)
            r = MemoryBankLoss(self.N, self.D, k=self.K, seed=4)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            la, lb = c(xa, torch.arange(5)), r(xb, torch.arange(5))
            la.backward()
            lb.backward()
            self.assertAlmostEqual(la.item(), lb.item(), delta=1e-6 * abs(lb.item()))
            torch.testing.assert_close(xa.grad, (scale or 1.0) * xb.grad, rtol=1e-5, atol=1e-7)
        with self.assertRaisesRegex(mb.Error, "drop them"):
            MemoryBankLoss(self.N, self.D, engine=crit.engine, comm=MPI.COMM_WORLD)
        with self.assertRaisesRegex(mb.Error, "no evaluate-only step"):
            crit(x, torch.arange(5))  # x does not require grad: an evaluation


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
