// The exact non-parametric softmax (the reference objective): the streaming/blocked engine code
// against every score materialised in double.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

TEST_CASE("full_softmax_loss equals the materialised double reference") {
  // Guards the free function full_softmax_loss: loss, gradient, mean Z_i and mean P(y|f) against
  // all N scores with log-sum-exp in double, for sizes that are not multiples of typical block
  // sizes (N = 5003, 20011, D = 37) as well as tiny banks, and a bank view with padding (stride).
  std::mt19937_64 rng(111);
  for (index_t n : {1, 7, 5003, 20011}) {
    CAPTURE(n);
    constexpr index_t D = 37, B = 9;
    constexpr double tau = 0.07;
    const Bank bank(n, D, 1000 + static_cast<std::uint64_t>(n));
    const RowMatrixd V = bank.to_matrix().cast<double>();
    const std::vector<index_t> ids = random_ids(B, n, rng);
    // Mix of features near their positive rows and random ones.
    RowMatrixf f = near_rows(bank.to_matrix(), ids, 0.3, rng);
    const RowMatrixf r = unit_rows(B, D, rng);
    for (index_t i = 1; i < B; i += 2) f.row(i) = r.row(i);
    const FullOut ref = reference_full(V, f.cast<double>(), ids, tau);
    RowMatrixf g(B, D);
    double mean_z = 0, mean_p = 0;
    const double loss = full_softmax_loss(bank.view(), f, ids, tau, g, &mean_z, &mean_p);
    if (n == 1) {
      // One instance: P(y|f) = 1, loss 0, gradient 0.
      CHECK(std::abs(loss) < 1e-6);
      CHECK(g.cast<double>().norm() < 1e-5);
      CHECK(mean_p == doctest::Approx(1.0).epsilon(1e-6));
    } else {
      CHECK(rel_err(loss, ref.loss) < 1e-5);
      CHECK(grad_rel_err(g, ref.grad) < 1e-5);
      CHECK(rel_err(mean_p, ref.mean_p_pos) < 1e-5);
    }
    CHECK(rel_err(mean_z, ref.mean_z) < 1e-5);
    // Null statistics pointers are allowed and change nothing.
    RowMatrixf g2(B, D);
    CHECK(full_softmax_loss(bank.view(), f, ids, tau, g2) == loss);
    CHECK(bits_equal(g, g2));
  }
}

TEST_CASE("Objective::full_softmax step equals the reference and refreshes the bank") {
  // Guards the engine path of the exact softmax: StepStats.loss / z (mean exact Z_i) /
  // mean_p_positive, the gradient, z_estimate NaN, scoring with the pre-update bank although the
  // batch holds a duplicate id, and the momentum refresh afterwards; normalize_features on raw rows
  // too (gradient through the normalisation).
  std::mt19937_64 rng(222);
  constexpr index_t N = 5003, D = 40, B = 8;
  constexpr double tau = 0.1;
  for (bool normalize : {false, true}) {
    INFO(std::string(normalize ? "normalize_features" : "unit features"));
    EngineConfig cfg;
    cfg.objective = Objective::full_softmax;
    cfg.tau = tau;
    cfg.momentum = 0.3;
    cfg.normalize_features = normalize;
    Engine eng = make_engine(N, D, false, cfg, 223);
    const RowMatrixf bank0 = eng.bank().to_matrix();
    std::vector<index_t> ids = random_ids(B, N, rng);
    ids[5] = ids[2];
    RowMatrixf x = near_rows(bank0, ids, 0.4, rng);
    if (normalize)
      for (index_t i = 0; i < B; ++i) x.row(i) *= static_cast<float>(0.5 + static_cast<double>(i));
    const RowMatrixd X = x.cast<double>();
    const RowMatrixd F = normalized_d(X);
    const FullOut ref = reference_full(bank0.cast<double>(), F, ids, tau);
    RowMatrixf g(B, D);
    const StepStats st = eng.step(x, ids, g);
    CHECK(rel_err(st.loss, ref.loss) < 1e-5);
    CHECK(grad_rel_err(g, normalize ? grad_through_normalisation(X, ref.grad) : ref.grad) < 1e-5);
    CHECK(rel_err(st.z, ref.mean_z) < 1e-5);
    CHECK(rel_err(st.mean_p_positive, ref.mean_p_pos) < 1e-5);
    CHECK(std::isnan(st.z_estimate));
    CHECK(eng.steps_done() == 1);
    const RowMatrixd want = reference_momentum(bank0.cast<double>(), ids, F, cfg.momentum);
    const RowMatrixf after = eng.bank().to_matrix();
    CHECK((after.cast<double>() - want).cwiseAbs().maxCoeff() < 1e-6);
  }
}

TEST_CASE("full softmax gradient equals central differences of the reference loss") {
  // Guards the full-softmax gradient (through the normalisation) against the derivative of the
  // double reference loss as a function of the raw rows, and against central differences of the
  // engine's own loss (fp32: h = 1e-3, tolerance 2e-3).
  std::mt19937_64 rng(333);
  constexpr index_t N = 1031, D = 12, B = 3;
  constexpr double tau = 0.1;
  EngineConfig cfg;
  cfg.objective = Objective::full_softmax;
  cfg.tau = tau;
  cfg.normalize_features = true;
  Engine eng = make_engine(N, D, false, cfg, 334);
  const RowMatrixd V = eng.bank().to_matrix().cast<double>();
  const std::vector<index_t> ids = random_ids(B, N, rng);
  RowMatrixf x = gaussian(B, D, rng, 0.5);
  const RowMatrixf bank0 = eng.bank().to_matrix();
  RowMatrixf g(B, D), scratch(B, D);
  // step(update = false): the full softmax depends on neither the counter nor Z, and the bank
  // stays as it is.
  eng.step(x, ids, g, false);
  RowMatrixd X = x.cast<double>(), fd_ref(B, D), fd_eng(B, D);
  for (index_t i = 0; i < B; ++i)
    for (index_t c = 0; c < D; ++c) {
      const double x0 = X(i, c);
      X(i, c) = x0 + 1e-6;
      const double lp = reference_full(V, normalized_d(X), ids, tau).loss;
      X(i, c) = x0 - 1e-6;
      const double lm = reference_full(V, normalized_d(X), ids, tau).loss;
      X(i, c) = x0;
      fd_ref(i, c) = (lp - lm) / 2e-6;

      const float xf = x(i, c);
      x(i, c) = xf + 1e-3f;
      const double xp = x(i, c);
      const double ep = eng.step(x, ids, scratch, false).loss;
      x(i, c) = xf - 1e-3f;
      const double xm = x(i, c);
      const double em = eng.step(x, ids, scratch, false).loss;
      x(i, c) = xf;
      fd_eng(i, c) = (ep - em) / (xp - xm);
    }
  CHECK(grad_rel_err(g, fd_ref) < 1e-4);
  CHECK(grad_rel_err(g, fd_eng) < 2e-3);
  CHECK(bits_equal(eng.bank().to_matrix(), bank0));
}
