// Run-time instruction-set dispatch (membank/isa.hpp): every kernel path this CPU runs agrees with the
// scalar path within bounds derived from float rounding, every path is bit-identical for 1 and 2
// threads, and kNN on every path agrees with a double-precision brute force.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/isa.hpp>
#include <membank/knn.hpp>
#include <membank/sampler.hpp>

#include "kernels/kernels.hpp"

#include <Random123/philox.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr double kU = 0x1p-24;  // unit roundoff of float

// Sizes: D = 40 is not a multiple of any vector width (the kernels' tails run) and its rows are
// padded to a stride of 48; N spans several 1024-row tiles.
constexpr index_t kN = 5003, kD = 40, kB = 24, kK = 64;

struct StepRun {
  double loss = 0.0;
  RowMatrixf grad, bank;
};

/// One step (with the bank refresh) of a fresh engine on fixed data, on path `isa` with `threads`.
/// The bank is made on the scalar path: a seeded row's last bits differ between paths (the
/// transcendental functions), and a 2-byte bank could round such an element to the other neighbour.
StepRun one_step(Isa isa, int threads, const EngineConfig& cfg, DType dtype = DType::float32) {
  std::optional<Engine> made;
  {
    IsaScope scalar(Isa::scalar);
    made.emplace(make_engine(kN, kD, false, cfg, 77, nullptr, dtype));
  }
  Engine& eng = *made;
  IsaScope is(isa);
  ThreadCount tc(threads);
  std::mt19937_64 rng(2024);
  std::vector<index_t> ids = random_ids(kB, kN, rng);
  ids[kB - 1] = ids[0];  // a duplicate: that row is refreshed twice
  const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
  StepRun r;
  r.grad.resize(kB, kD);
  r.loss = eng.step(f, ids, r.grad, true).loss;
  r.bank = eng.bank().to_matrix();
  return r;
}

EngineConfig config(Objective obj, NegativesMode neg) {
  EngineConfig cfg;
  cfg.k = kK;
  cfg.objective = obj;
  cfg.negatives = neg;
  cfg.seed = 5;
  return cfg;
}

double max_abs_diff(const RowMatrixf& a, const RowMatrixf& b) {
  return (a.cast<double>() - b.cast<double>()).cwiseAbs().maxCoeff();
}

}  // namespace

TEST_CASE("isa names parse, unknown names and unsupported sets are refused, and the best set is active by default") {
  for (const Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512}) CHECK(isa_from_string(to_string(isa)) == isa);
  CHECK_THROWS_WITH_AS(isa_from_string("sse9"), doctest::Contains("'sse9'"), Error);
  CHECK(cpu_supports(Isa::scalar));
  CHECK(cpu_supports(best_isa()));
  if (std::getenv("MEMBANK_ISA") == nullptr) CHECK(active_isa() == best_isa());
  for (const Isa isa : {Isa::avx2, Isa::avx512})
    if (!cpu_supports(isa)) {
      const Isa before = active_isa();
      CHECK_THROWS_WITH_AS(force_isa(isa), doctest::Contains(to_string(isa).c_str()), Error);
      CHECK(active_isa() == before);
    }
  MESSAGE("paths on this CPU: best = " << to_string(best_isa()));
}

TEST_CASE("every path's Philox gives Random123's words: uniform draws equal an independent Philox4x32-10") {
  // Guards the vectorised Philox kernel (kernels::Table::philox) behind the uniform sampler, on every
  // path: draw k of a stream with no exclusion is floor(u n / 2^64) with u the 64 bits of half k % 2
  // of block k / 2 of Random123's Philox4x32-10 at counter {k / 2, row, step_lo, step_hi | purpose
  // << 24} and key {seed_lo, seed_hi} (sampler.hpp, detail/philox.hpp). Pieces of odd sizes cross
  // the kernel's 32-block chunks at every offset; the seed, step and purpose use their high bits.
  const StreamKey key{0x123456789abcdefULL, (std::int64_t{1} << 40) + 7, 99, 2};
  constexpr std::uint64_t n = 1000003;
  constexpr std::size_t k = 301;
  std::vector<index_t> want(k);
  r123::Philox4x32 philox;
  const r123::Philox4x32::key_type pkey{{static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32)}};
  const auto step = static_cast<std::uint64_t>(key.step);
  for (std::size_t d = 0; d < k; ++d) {
    const r123::Philox4x32::ctr_type ctr{{static_cast<std::uint32_t>(d / 2), key.row, static_cast<std::uint32_t>(step),
                                          static_cast<std::uint32_t>(step >> 32) | (key.purpose << 24)}};
    const auto w = philox(ctr, pkey);
    const std::uint64_t u = d % 2 == 0 ? (std::uint64_t{w.v[0]} << 32 | w.v[1]) : (std::uint64_t{w.v[2]} << 32 | w.v[3]);
    want[d] = static_cast<index_t>((static_cast<unsigned __int128>(u) * n) >> 64);
  }
  const UniformSampler uni(static_cast<index_t>(n));
  for (const Isa isa : supported_paths()) {
    CAPTURE(to_string(isa));
    IsaScope is(isa);
    std::vector<index_t> got(k);
    std::vector<float> log_pn(k);
    DrawCursor cursor{key, Exclusion{}, static_cast<index_t>(k)};
    for (std::size_t at = 0, piece = 1; at < k; at += piece, piece += 2) {
      piece = std::min(piece, k - at);
      uni.draw_next(cursor, std::span(got).subspan(at, piece), std::span(log_pn).subspan(at, piece));
    }
    CHECK(got == want);
  }
}

TEST_CASE("every path's Philox kernel equals Random123 block for block, at every length and across the counter's wrap") {
  // kernels::Table::philox takes 64 blocks at a time on the vector paths (four vectors of lanes),
  // then single vectors, then one block at a time: every length up to 200 ends in each of them.
  // Word 0 of the counter starts 70 below 2^32 and wraps inside the vectors (no carry into word 1).
  const std::uint32_t key[2] = {0x9abcdef0u, 0x12345678u};
  const std::uint32_t ctr[4] = {0xFFFFFFFFu - 69u, 7u, 0x80000001u, 2u << 24};
  r123::Philox4x32 philox;
  const r123::Philox4x32::key_type pkey{{key[0], key[1]}};
  for (const Isa isa : supported_paths()) {
    CAPTURE(to_string(isa));
    IsaScope is(isa);
    const kernels::Table& kt = kernels::table();
    for (std::int64_t n = 1; n <= 200; ++n) {
      CAPTURE(n);
      std::vector<std::uint32_t> out(static_cast<std::size_t>(4 * n));
      kt.philox(key, ctr, n, out.data());
      std::int64_t wrong = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        const auto w = philox({{ctr[0] + static_cast<std::uint32_t>(j), ctr[1], ctr[2], ctr[3]}}, pkey);
        for (std::int64_t v = 0; v < 4; ++v) wrong += out[static_cast<std::size_t>(v * n + j)] != w.v[v];
      }
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("every path's step (loss, gradient, bank refresh) matches the scalar path and is thread-count independent") {
  // Bounds, with u the float unit roundoff. A score s = v . f of unit rows in D floats is within D u
  // of exact on any path (any association, with or without FMA), so two paths differ by <= 2 D u;
  // a logit s / tau by eps_a = 4 D u / tau (twice that, for the estimated Z that shifts every logit).
  // loss: each of the K + 1 terms per query is 1-Lipschitz in its logit (2 for InfoNCE's log-softmax,
  //   which also has K + 1 terms): <= 2 (K + 1) eps_a.
  // gradient: sum of K + 1 rows with coefficients <= 1 / (B tau), each off by <= eps_a / (B tau), summed
  //   in float (<= (K + 1) u each): <= (K + 1) / (B tau) (eps_a + 2 (K + 1) u). The exact softmax sums N
  //   rows with probabilities summing to 1: <= (2 eps_a + 2 N u) / (B tau).
  // bank: m v + (1 - m) f rounded once or twice (FMA), then scaled by a double 1 / norm and rounded:
  //   <= 4 u per element and refresh; a duplicate id refreshes twice: 8 u, plus slack: 16 u.
  const double tau = EngineConfig{}.tau;
  const double eps_a = 4.0 * kD * kU / tau;
  const double loss_tol = 2.0 * (kK + 1) * eps_a;
  const double grad_tol = (kK + 1) / (kB * tau) * (eps_a + 2.0 * (kK + 1) * kU);
  const double full_grad_tol = (2.0 * eps_a + 2.0 * kN * kU) / (kB * tau);
  const double bank_tol = 16.0 * kU;

  struct Case {
    Objective obj;
    NegativesMode neg;
  };
  // A 2-byte bank's rows are read exactly (widened), so the same bounds hold for loss and gradient;
  // its refreshed rows are rounded once to the type, and two paths' fp32 values a few u apart may
  // round to neighbouring words: one gap more, <= 2 u_t for elements of magnitude <= 1.
  for (const DType t : {DType::float32, DType::float16, DType::bfloat16})
  for (const Case c : {Case{Objective::nce, NegativesMode::per_sample}, Case{Objective::info_nce, NegativesMode::per_sample},
                       Case{Objective::nce, NegativesMode::shared}, Case{Objective::info_nce, NegativesMode::shared},
                       Case{Objective::full_softmax, NegativesMode::per_sample}}) {
    const EngineConfig cfg = config(c.obj, c.neg);
    const bool full = c.obj == Objective::full_softmax;
    const StepRun ref = one_step(Isa::scalar, 1, cfg, t);
    REQUIRE(std::isfinite(ref.loss));
    const double bank_tol_t = bank_tol + (t == DType::float32 ? 0.0 : 2.0 * unit_roundoff(t));
    for (const Isa isa : supported_paths()) {
      CAPTURE(to_string(isa));
      CAPTURE(to_string(c.obj));
      CAPTURE(to_string(c.neg));
      CAPTURE(to_string(t));
      const StepRun one = one_step(isa, 1, cfg, t), two = one_step(isa, 2, cfg, t);
      CHECK(bits_equal(one.loss, two.loss));
      CHECK(bits_equal(one.grad, two.grad));
      CHECK(bits_equal(one.bank, two.bank));
      CHECK(std::abs(one.loss - ref.loss) <= loss_tol);
      CHECK(max_abs_diff(one.grad, ref.grad) <= (full ? full_grad_tol : grad_tol));
      CHECK(max_abs_diff(one.bank, ref.bank) <= bank_tol_t);
      // The gradient is not trivially small next to the tolerance (the comparison can fail).
      CHECK(ref.grad.cwiseAbs().maxCoeff() > 10.0 * (full ? full_grad_tol : grad_tol));
    }
  }
}

TEST_CASE("every path's kNN matches a double brute force on queries whose answer rounding cannot change, and is thread-count independent") {
  constexpr index_t N = 3000, Q = 300, D = 24, k = 20;
  constexpr int classes = 10;
  const double sigma = 0.07;
  std::mt19937_64 rng(99);
  const Bank bank(N, D, 3);
  const RowMatrixf queries = unit_rows(Q, D, rng);
  std::vector<int> bl(N), ql(Q);
  for (auto& l : bl) l = static_cast<int>(rng() % classes);
  for (auto& l : ql) l = static_cast<int>(rng() % classes);

  // The reference in double: neighbours, class scores, prediction; a query is "robust" when every
  // score is at least 8 D u from the k-th (so no path can swap a neighbour in or out) and its best
  // class leads the next by more than the weights' rounding could move.
  const RowMatrixd V = bank.to_matrix().cast<double>();
  const RowMatrixd S = queries.cast<double>() * V.transpose();
  std::vector<int> want(Q);
  std::vector<char> robust(Q);
  index_t n_robust = 0;
  for (index_t i = 0; i < Q; ++i) {
    std::vector<index_t> order(N);
    for (index_t j = 0; j < N; ++j) order[static_cast<std::size_t>(j)] = j;
    std::partial_sort(order.begin(), order.begin() + k + 1, order.end(),
                      [&](index_t a, index_t b) { return S(i, a) > S(i, b); });
    const double gap = S(i, order[k - 1]) - S(i, order[k]);
    std::vector<double> score(classes, 0.0);
    for (index_t r = 0; r < k; ++r) {
      const index_t j = order[static_cast<std::size_t>(r)];
      score[static_cast<std::size_t>(bl[static_cast<std::size_t>(j)])] += std::exp(S(i, j) / sigma);
    }
    const int best = static_cast<int>(std::max_element(score.begin(), score.end()) - score.begin());
    double second = 0.0;
    for (int cl = 0; cl < classes; ++cl)
      if (cl != best) second = std::max(second, score[static_cast<std::size_t>(cl)]);
    want[static_cast<std::size_t>(i)] = best;
    // Each weight exp(s / sigma) moves by a relative <= 2 D u / sigma (+ rounding): 1e-3 covers it.
    const bool ok = gap > 8.0 * D * kU && score[static_cast<std::size_t>(best)] > second * (1.0 + 1e-3);
    robust[static_cast<std::size_t>(i)] = ok;
    n_robust += ok;
  }
  REQUIRE(n_robust >= Q / 2);

  for (const Isa isa : supported_paths()) {
    CAPTURE(to_string(isa));
    IsaScope is(isa);
    KnnResult r1, r2;
    {
      ThreadCount tc(1);
      r1 = knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{.k = k, .sigma = sigma});
    }
    {
      ThreadCount tc(2);
      r2 = knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{.k = k, .sigma = sigma});
    }
    CHECK(r1.predictions == r2.predictions);
    CHECK(bits_equal(r1.top1, r2.top1));
    CHECK(bits_equal(r1.top5, r2.top5));
    CHECK(bits_equal(r1.nn1, r2.nn1));
    index_t agree = 0;
    for (index_t i = 0; i < Q; ++i)
      if (robust[static_cast<std::size_t>(i)]) agree += r1.predictions[static_cast<std::size_t>(i)] == want[static_cast<std::size_t>(i)];
    CHECK(agree == n_robust);
  }
}

TEST_CASE("every path's seeded bank: Box-Muller on Random123's words, the same rows for 1 and 2 threads") {
  // Guards Bank(n, d, seed) (kernels::Table::unit_normal_row) on every path against a plain double
  // reference: row i takes Random123's Philox4x32-10 block b at counter {b, i_lo, i_hi, 1 << 24}
  // (the bank-init purpose) and key {seed_lo, seed_hi} for columns 4b .. 4b + 3: Box-Muller pairs of
  // u1 = ((w >> 9) + 1/2) 2^-23 and u2 = (w >> 8) 2^-24 from words (0, 1) and (2, 3), then the row
  // over its norm. D = 130 crosses the kernel's 128-column chunk and ends inside a block. The float
  // path's log, sin and cos are within a few float ulps (u = 2^-24) of the double ones, so every
  // entry of a unit row is within 20 u of the reference (2 u measured); 1 and 2 threads give the same bits.
  constexpr index_t n = 300, d = 130;
  constexpr std::uint64_t seed = 0x12345678abcULL;
  r123::Philox4x32 philox;
  const r123::Philox4x32::key_type pkey{{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  RowMatrixd want(n, d);
  for (index_t i = 0; i < n; ++i) {
    for (index_t b = 0; 4 * b < d; ++b) {
      const auto w = philox({{static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(i), 0u, 1u << 24}}, pkey);
      for (index_t h = 0; h < 2; ++h) {
        const double u1 = (static_cast<double>(w.v[2 * h] >> 9) + 0.5) * 0x1p-23;
        const double u2 = static_cast<double>(w.v[2 * h + 1] >> 8) * 0x1p-24;
        const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * M_PI * u2;
        if (4 * b + 2 * h < d) want(i, 4 * b + 2 * h) = r * std::cos(t);
        if (4 * b + 2 * h + 1 < d) want(i, 4 * b + 2 * h + 1) = r * std::sin(t);
      }
    }
    want.row(i) /= want.row(i).norm();
  }
  for (const Isa isa : supported_paths()) {
    CAPTURE(to_string(isa));
    IsaScope is(isa);
    RowMatrixf one, two;
    {
      const ThreadCount t(1);
      one = Bank(n, d, seed).to_matrix();
    }
    {
      const ThreadCount t(2);
      two = Bank(n, d, seed).to_matrix();
    }
    CHECK(bits_equal(one, two));
    const double err = (one.cast<double>() - want).cwiseAbs().maxCoeff();
    CAPTURE(err);
    CHECK(err < 20 * kU);
  }
}
