"""membank.torch against a plain-PyTorch implementation of the reference NCEAverage + NCECriterion
formulas (Wu et al.; lemniscate.pytorch), written here: same inputs -> same loss, same dL/dx, same
bank refresh; gradcheck in float64 of the reference formulas and of membank's Function; the
drop-in modules in a training loop. Exits 77 (ctest: skipped) when torch is not installed."""
import sys
import unittest

import numpy as np

try:
    import torch
except ImportError:
    print("SKIPPED: torch is not installed (apt-get install python3-torch); membank.torch not tested")
    sys.exit(77)

import membank as mb
from membank.torch import MemoryBankLoss, NCEAverage, NCECriterion, NCEFunction, nce_loss


# ---- the plain-PyTorch reference (formulas of NCEAverage + NCECriterion, written for this test) ----

def ref_nce_average(x, memory, idx, T, Z):
    """out[i, j] = exp(memory[idx[i, j]] . x[i] / T) / Z (idx[:, 0] = positives)."""
    w = memory[idx]  # (B, K+1, D)
    return torch.exp(torch.bmm(w, x.unsqueeze(2)).squeeze(2) / T) / Z


def ref_first_z(x, memory, idx, T, n):
    """The reference sets Z on its first batch to mean(out) * N over all K+1 columns."""
    return (ref_nce_average(x, memory, idx, T, 1.0).mean() * n).item()


def ref_nce_criterion(out, n, eps=0.0):
    """NCECriterion with P_n = 1/N (the reference adds eps = 1e-7 to both denominators)."""
    b, k = out.shape[0], out.shape[1] - 1
    kpn = k / n
    ln_pos = torch.log(out[:, 0] / (out[:, 0] + kpn + eps))
    ln_neg = torch.log(kpn / (out[:, 1:] + kpn + eps))
    return -(ln_pos.sum() + ln_neg.sum()) / b


def ref_update(memory, x, y, m):
    """Momentum refresh with renormalisation, as the reference does in its backward."""
    w = memory[y] * m + x.detach() * (1 - m)
    memory = memory.clone()
    memory[y] = w / w.norm(dim=1, keepdim=True)
    return memory


def unit(rng, rows, dim, dtype=torch.float32):
    x = torch.from_numpy(rng.standard_normal((rows, dim)))
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


class Setup:
    def __init__(self, n=400, dim=16, b=8, k=64, seed=0, T=0.07, m=0.5, **opts):
        rng = np.random.default_rng(seed)
        self.rng = rng
        mem = unit(rng, n, dim)
        self.module = NCEAverage(dim, n, k, T, m, bank=mb.Bank.from_array(mem.numpy()), **opts)
        self.memory = self.module.memory.clone().double()  # the bank's rows, as the reference's buffer
        self.x = unit(rng, b, dim)
        self.y = torch.from_numpy(rng.choice(n, b, replace=False))
        self.neg = torch.from_numpy(rng.integers(0, n, (b, k)))
        self.idx = torch.cat([self.y[:, None], self.neg], dim=1)
        self.n, self.dim, self.b, self.k, self.T, self.m = n, dim, b, k, T, m


class TestAgainstReference(unittest.TestCase):
    def test_loss_gradient_update_equal_reference(self):
        s = Setup(Z=250.0)
        x = s.x.clone().requires_grad_(True)
        loss = nce_loss(x, s.y, s.module.engine, s.neg)  # one training step with these negatives
        loss.backward()

        xr = s.x.double().requires_grad_(True)
        ref = ref_nce_criterion(ref_nce_average(xr, s.memory, s.idx, s.T, 250.0), s.n)
        ref.backward()
        self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()))
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max().item())
        # the bank after the step = the reference's refresh of the pre-update rows
        torch.testing.assert_close(s.module.memory.double(), ref_update(s.memory, s.x.double(), s.y, s.m),
                                   rtol=0, atol=1e-6)
        # lemniscate's eps = 1e-7 changes the loss by a relative ~1e-5 here
        with_eps = ref_nce_criterion(ref_nce_average(s.x.double(), s.memory, s.idx, s.T, 250.0), s.n, 1e-7)
        self.assertAlmostEqual(with_eps.item() / ref.item(), 1.0, delta=1e-4)

    def test_criterion_passthrough_matches_pair(self):
        s = Setup(Z=80.0)
        crit = NCECriterion(s.n)
        x = s.x.clone().requires_grad_(True)
        out = s.module(x, s.y, s.neg)
        self.assertEqual(out.dim(), 0)
        loss = crit(out, s.y)
        loss.backward()
        ref = ref_nce_criterion(ref_nce_average(s.x.double(), s.memory, s.idx, s.T, 80.0), s.n)
        self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()))
        # given a reference probability matrix, NCECriterion is the reference formula (eps 1e-7)
        probs = ref_nce_average(s.x.double(), s.memory, s.idx, s.T, 80.0)
        self.assertAlmostEqual(crit(probs, s.y).item(), ref_nce_criterion(probs, s.n, 1e-7).item(), places=12)

    def test_first_batch_z(self):
        s = Setup(k=512)
        x = s.x.clone().requires_grad_(True)
        s.module(x, s.y, s.neg).backward()
        # membank: N * mean over the K noise draws (importance-weighted MC); the reference also
        # averages the positive column: Z_ref = (K * Z_mb / N + exp(s_pos/T)) * N / (K + 1).
        zn = ref_first_z(s.x.double(), s.memory, s.idx[:, 1:], s.T, s.n)
        self.assertAlmostEqual(s.module.Z / zn, 1.0, delta=1e-5)
        zr = ref_first_z(s.x.double(), s.memory, s.idx, s.T, s.n)
        self.assertAlmostEqual(s.module.params[2].item() / zr, 1.0, delta=0.05)

    def test_sampled_step_equals_reference_with_drawn_negatives(self):
        s = Setup(Z=100.0)
        drawn = torch.from_numpy(s.module.engine.sample(s.y.numpy()))  # what the next step draws
        x = s.x.clone().requires_grad_(True)
        loss = s.module(x, s.y)  # sampled by the engine
        loss.backward()
        idx = torch.cat([s.y[:, None], drawn], dim=1)
        xr = s.x.double().requires_grad_(True)
        ref = ref_nce_criterion(ref_nce_average(xr, s.memory, idx, s.T, 100.0), s.n)
        ref.backward()
        self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()))
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max().item())

    def test_infonce_and_full_softmax_equal_cross_entropy(self):
        for objective in ("infonce", "full"):
            s = Setup(objective=objective, Z=None)
            x = s.x.clone().requires_grad_(True)
            loss = s.module(x, s.y, s.neg if objective == "infonce" else None)
            loss.backward()
            xr = s.x.double().requires_grad_(True)
            if objective == "infonce":
                logits = torch.bmm(s.memory[s.idx], xr.unsqueeze(2)).squeeze(2) / s.T
                ref = torch.nn.functional.cross_entropy(logits, torch.zeros(s.b, dtype=torch.long))
            else:
                ref = torch.nn.functional.cross_entropy(xr @ s.memory.T / s.T, s.y)
            ref.backward()
            self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()), msg=objective)
            torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max().item())

    def test_objectives_equal_their_formulas_in_torch(self):
        # MemoryBankLoss(objective=...) against each paper's formula written here in plain PyTorch
        # (uniform sampler, so no importance weights), autograd for the reference gradient.
        rng = np.random.default_rng(5)
        n, dim, b, k, tau = 300, 16, 6, 40, 0.2
        mem = unit(rng, n, dim)
        labels = torch.from_numpy(rng.integers(0, 4, n))
        y = torch.from_numpy(rng.choice(n, b, replace=False))
        neg = torch.from_numpy(rng.integers(0, n, (b, k)))
        x0 = unit(rng, b, dim)
        memory = mem.double()

        def reference(objective, xr):
            s_pos = (memory[y] * xr).sum(1)
            s_neg = torch.bmm(memory[neg], xr.unsqueeze(2)).squeeze(2)
            if objective == "dcl":
                pos, negs, tp = torch.exp(s_pos / tau), torch.exp(s_neg / tau), 0.1
                ng = torch.clamp((-tp * k * pos + negs.sum(1)) / (1 - tp), min=k * np.e ** (-1 / tau))
                return (-torch.log(pos / (pos + ng))).mean()
            if objective == "dhel":
                return (-s_pos / tau + torch.logsumexp(s_neg / tau, 1)).mean()
            if objective == "kcl":
                return (-torch.exp(2 * 2.0 * (s_pos - 1)) + 16.0 / k * torch.exp(2 * 2.0 * (s_neg - 1)).sum(1)).mean()
            if objective == "supcon":
                logits = torch.cat([s_pos[:, None], s_neg], 1) / tau
                is_pos = torch.cat([torch.ones(b, 1, dtype=torch.bool), labels[neg] == labels[y][:, None]], 1)
                log_p = logits - torch.logsumexp(logits, 1, keepdim=True)
                return (-(log_p * is_pos).sum(1) / is_pos.sum(1)).mean()
            raise ValueError(objective)

        for objective in ("dcl", "dhel", "kcl", "supcon"):
            opts = {"labels": labels.numpy()} if objective == "supcon" else {}
            module = MemoryBankLoss(n, dim, k, tau, objective=objective, bank=mb.Bank.from_array(mem.numpy()),
                                    z=None, **opts)
            x = x0.clone().requires_grad_(True)
            loss = module(x, y, neg)
            loss.backward()
            xr = x0.double().requires_grad_(True)
            ref = reference(objective, xr)
            ref.backward()
            self.assertAlmostEqual(loss.item(), ref.item(), delta=2e-6 * abs(ref.item()), msg=objective)
            torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=2e-6 * xr.grad.abs().max().item(),
                                       msg=objective)

    def test_gradcheck_float64(self):
        # The reference formulas' analytic gradient (what membank implements) against central differences.
        s = Setup(n=50, dim=6, b=3, k=5)
        xr = s.x.double().requires_grad_(True)
        f = lambda x: ref_nce_criterion(ref_nce_average(x, s.memory, s.idx, s.T, 30.0), s.n)  # noqa: E731
        self.assertTrue(torch.autograd.gradcheck(f, (xr,)))
        # membank's Function, float64 in and out (the engine computes in float32, hence the tolerances);
        # normalize_features: the gradient also flows through the engine's normalisation.
        eng = mb.Engine(mb.Bank.from_array(s.memory.float().numpy()), k=5, tau=0.5, z_policy="fixed", z_fixed=30.0,
                        normalize_features=True)
        neg = s.neg[:, :5]
        x = (s.x.double() * 1.7).requires_grad_(True)
        g = lambda x: NCEFunction.apply(x, s.y, eng, neg, False)  # noqa: E731
        self.assertTrue(torch.autograd.gradcheck(g, (x,), eps=1e-3, atol=2e-3, rtol=2e-2))
        self.assertEqual(eng.steps_done, 0)

    def test_no_grad_changes_nothing(self):
        s = Setup()
        before = s.module.memory.clone()
        with torch.no_grad():
            loss = s.module(s.x, s.y)
        self.assertTrue(torch.isfinite(loss))
        self.assertEqual(s.module.engine.steps_done, 0)
        self.assertTrue(torch.equal(before, s.module.memory))


class TestTrainingLoop(unittest.TestCase):
    def test_drop_in_loop_trains(self):
        torch.manual_seed(0)
        n, dim = 256, 16
        data = torch.randn(n, 20)
        net = torch.nn.Linear(20, dim, bias=False)  # a linear encoder: the loop is what is tested
        lemniscate = NCEAverage(dim, n, 64, 0.1, 0.5, seed=1)
        criterion = NCECriterion(n)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        first = last = None
        for epoch in range(15):
            perm = torch.randperm(n)
            for i in range(0, n, 32):
                index = perm[i:i + 32]
                feature = torch.nn.functional.normalize(net(data[index]), dim=1)
                output = lemniscate(feature, index)
                loss = criterion(output, index)
                opt.zero_grad()
                loss.backward()
                opt.step()
                first = loss.item() if first is None else first
                last = loss.item()
        self.assertLess(last, 0.5 * first)
        self.assertEqual(lemniscate.engine.steps_done, 15 * n // 32)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(net(data), dim=1)
        # instance discrimination: each sample's nearest bank row is (mostly) its own
        nn_ = (feats @ lemniscate.memory.T).argmax(dim=1)
        self.assertGreater((nn_ == torch.arange(n)).float().mean().item(), 0.8)



class TestPrefetch(unittest.TestCase):
    def test_prefetch_changes_no_result(self):
        # A loop that announces each batch's ids before its forward pass gives, bit for bit, the losses,
        # gradients and bank of the same loop without the announcements; the steps did use them.
        n, dim = 300, 16
        torch.manual_seed(3)
        data = torch.randn(n, dim)
        batches = [torch.randint(0, n, (24,)) for _ in range(5)]
        results = []
        for announce in (False, True):
            crit = MemoryBankLoss(n, dim, k=50, tau=0.1, momentum=0.5, seed=4)
            losses, grads, used = [], [], []
            for ids in batches:
                if announce:
                    self.assertTrue(crit.prefetch(ids))
                x = torch.nn.functional.normalize(data[ids], dim=1).requires_grad_(True)
                loss = crit(x, ids)
                loss.backward()
                losses.append(loss.item())
                grads.append(x.grad.clone())
                used.append(crit.last_stats.prefetched)
            results.append((losses, grads, crit.memory.clone(), used))
        (l0, g0, m0, u0), (l1, g1, m1, u1) = results
        self.assertEqual(l0, l1)
        for a, b in zip(g0, g1):
            self.assertTrue(torch.equal(a, b))
        self.assertTrue(torch.equal(m0, m1))
        self.assertEqual(u0, [False] * 5)
        self.assertEqual(u1, [True] * 5)
        with self.assertRaises(mb.Error):
            MemoryBankLoss(n, dim, k=50).prefetch(np.array([0, n], dtype=np.int64))


if __name__ == "__main__":
    unittest.main(verbosity=2)
