// Multi-view banks (CMC, multiview.hpp): every pair against a plain double reference written here,
// V = 2 against two single-view Engines bit for bit (with static and query-dependent samplers),
// per-pair Z states, the banks' refresh, thread counts, refused inputs, and resuming from restored
// state.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/cluster_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/multiview.hpp>
#include <membank/ring_sampler.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kN = 300;
constexpr index_t kD = 16;
constexpr index_t kB = 6;
constexpr index_t kK = 20;
constexpr double kTau = 0.1;
constexpr double kTol = 1e-5;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

EngineConfig mv_config(Objective obj, NegativesMode mode, ZPolicy zp = ZPolicy::first_batch) {
  EngineConfig cfg;
  cfg.k = kK;
  cfg.tau = kTau;
  cfg.objective = obj;
  cfg.negatives = mode;
  cfg.z_policy = zp;
  cfg.z_fixed = 50.0;
  cfg.z_ema = 0.9;
  cfg.seed = 77;
  return cfg;
}

/// V correlated banks (every view sees the same instances): bank v = normalise(c_j + 0.6 g_vj), built
/// the same way, bit for bit, on every call with the same arguments. dtypes[v] (float32 if absent).
std::vector<Bank> make_banks(index_t views, std::uint64_t seed, const std::vector<DType>& dtypes = {}) {
  std::mt19937_64 rng(seed);
  const RowMatrixf common = unit_rows(kN, kD, rng);
  std::vector<Bank> banks;
  for (index_t v = 0; v < views; ++v) {
    RowMatrixf x = common + gaussian(kN, kD, rng, 0.6);
    const auto i = static_cast<std::size_t>(v);
    banks.push_back(Bank::from_rows(x, i < dtypes.size() ? dtypes[i] : DType::float32));
  }
  return banks;
}

/// A non-uniform alias sampler (the same weights for the same seed); pn receives P_n.
std::unique_ptr<NoiseSampler> make_sampler(std::uint64_t seed, std::vector<double>* pn = nullptr) {
  std::mt19937_64 rng(seed ^ 0x5eedULL);
  const std::vector<double> w = random_weights(kN, rng);
  if (pn) *pn = normalised(w);
  return std::make_unique<AliasSampler>(w);
}

MultiViewEngine make_mv(index_t views, const EngineConfig& cfg, ViewGraph graph, std::uint64_t seed,
                        std::vector<double>* pn = nullptr, const std::vector<DType>& dtypes = {}) {
  return MultiViewEngine(make_banks(views, seed, dtypes), make_sampler(seed, pn), cfg, graph);
}

/// One step's input: ids (a duplicate at positions 1 and 4) and each view's features, close to that
/// view's rows of the batch on even positions and random on odd ones; `scale` multiplies the rows
/// (raw features for normalize_features). A pure function of (engine banks, step, seed).
struct Batch {
  std::vector<index_t> ids;
  std::vector<RowMatrixf> f;
};

Batch make_batch(const MultiViewEngine& mv, std::int64_t step, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed * 1000003ULL + static_cast<std::uint64_t>(step));
  Batch b;
  b.ids = random_ids(kB, kN, rng);
  b.ids[4] = b.ids[1];
  for (index_t v = 0; v < mv.views(); ++v) {
    RowMatrixf f = near_rows(mv.bank(v).to_matrix(), b.ids, 0.3, rng);
    const RowMatrixf r = unit_rows(kB, kD, rng);
    for (index_t i = 1; i < kB; i += 2) f.row(i) = r.row(i);
    b.f.push_back(f * scale);
  }
  return b;
}

/// mv.step on the batch; grads resized to V x (B x D) and written.
MultiViewStats run_step(MultiViewEngine& mv, const Batch& b, std::vector<RowMatrixf>& grads, bool update = true) {
  const std::vector<FeaturesRef> f(b.f.begin(), b.f.end());
  grads.assign(static_cast<std::size_t>(mv.views()), RowMatrixf::Zero(kB, kD));
  std::vector<GradRef> g(grads.begin(), grads.end());
  return mv.step(f, b.ids, g, update);
}

std::vector<RowMatrixd> bank_rows(const MultiViewEngine& mv) {
  std::vector<RowMatrixd> out;
  for (index_t v = 0; v < mv.views(); ++v) out.push_back(mv.bank(v).to_matrix().cast<double>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// The plain reference: every logit of a pair materialised, loss and dL/df in double.

struct PairRef {
  double loss = 0;
  RowMatrixd grad;  ///< dL_ab/df^a, B x D
  double zhat = 0;  ///< mean over the B K draws of exp(s / tau) / P_n(j)
  double z = kNaN;  ///< the Z NCE used
};

/// Queries F (B x D unit rows of view a) against bank rows Vb (view b) with negatives negs (B x K per
/// query, or 1 x K shared by the batch); NCE uses Z = z, or the pair's own Zhat of these draws if NaN.
PairRef pair_reference(const RowMatrixd& Vb, const RowMatrixd& F, std::span<const index_t> ids,
                       const RowMatrixi& negs, bool shared, const std::vector<double>& pn, Objective obj, double z) {
  const index_t B = F.rows(), K = negs.cols();
  RowMatrixi row(B, K + 1);  // column 0: the positive; 1..K: the negatives
  RowMatrixd s(B, K + 1);    // logits s / tau
  for (index_t i = 0; i < B; ++i) {
    row(i, 0) = ids[static_cast<std::size_t>(i)];
    for (index_t k = 0; k < K; ++k) row(i, k + 1) = shared ? negs(0, k) : negs(i, k);
    for (index_t t = 0; t <= K; ++t) s(i, t) = Vb.row(row(i, t)).dot(F.row(i)) / kTau;
  }
  auto P = [&](index_t j) { return pn[static_cast<std::size_t>(j)]; };
  PairRef out;
  out.grad = RowMatrixd::Zero(B, F.cols());
  for (index_t i = 0; i < B; ++i)
    for (index_t t = 1; t <= K; ++t) out.zhat += std::exp(s(i, t)) / P(row(i, t));
  out.zhat /= static_cast<double>(B * K);
  const double Bt = static_cast<double>(B) * kTau;
  if (obj == Objective::nce) {
    out.z = std::isnan(z) ? out.zhat : z;
    for (index_t i = 0; i < B; ++i)
      for (index_t t = 0; t <= K; ++t) {
        const double p = std::exp(s(i, t)) / out.z;
        const double h = p / (p + static_cast<double>(K) * P(row(i, t)));
        out.loss -= t == 0 ? std::log(h) : std::log(1.0 - h);
        const double dlds = t == 0 ? -(1.0 - h) : h;
        out.grad.row(i) += (dlds / Bt) * Vb.row(row(i, t));
      }
  } else {  // InfoNCE over the positive and its K negatives, logits s / tau - log P_n
    for (index_t i = 0; i < B; ++i) {
      Eigen::VectorXd l(K + 1);
      for (index_t t = 0; t <= K; ++t) l(t) = s(i, t) - std::log(P(row(i, t)));
      const double mx = l.maxCoeff();
      const double lse = mx + std::log((l.array() - mx).exp().sum());
      out.loss += lse - l(0);
      for (index_t t = 0; t <= K; ++t)
        out.grad.row(i) += ((std::exp(l(t) - lse) - (t == 0 ? 1.0 : 0.0)) / Bt) * Vb.row(row(i, t));
    }
  }
  out.loss /= static_cast<double>(B);
  return out;
}

/// Exact softmax over all N rows of Vb.
PairRef pair_reference_full(const RowMatrixd& Vb, const RowMatrixd& F, std::span<const index_t> ids) {
  PairRef out;
  out.grad = RowMatrixd::Zero(F.rows(), F.cols());
  for (index_t i = 0; i < F.rows(); ++i) {
    const Eigen::VectorXd s = Vb * F.row(i).transpose() / kTau;
    const double mx = s.maxCoeff();
    const double lse = mx + std::log((s.array() - mx).exp().sum());
    const index_t y = ids[static_cast<std::size_t>(i)];
    out.loss += lse - s(y);
    const Eigen::VectorXd p = (s.array() - lse).exp();
    out.grad.row(i) = (p.transpose() * Vb - Vb.row(y)) / (static_cast<double>(F.rows()) * kTau);
  }
  out.loss /= static_cast<double>(F.rows());
  return out;
}

/// The whole step: each pair's reference, L = sum of the pairs' losses, dL/df^a = sum over (a, b).
struct StepRef {
  double loss = 0;
  std::vector<PairRef> pairs;
  std::vector<RowMatrixd> grad;
};

StepRef step_reference(const std::vector<RowMatrixd>& banks, const Batch& b, const RowMatrixi& negs, bool shared,
                       const std::vector<double>& pn, Objective obj, const std::vector<ViewPair>& pairs,
                       const std::vector<double>& z) {
  StepRef out;
  for (std::size_t v = 0; v < banks.size(); ++v) out.grad.push_back(RowMatrixd::Zero(kB, kD));
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    const auto a = static_cast<std::size_t>(pairs[p].query), bv = static_cast<std::size_t>(pairs[p].bank);
    const RowMatrixd F = b.f[a].cast<double>();
    PairRef r = obj == Objective::full_softmax ? pair_reference_full(banks[bv], F, b.ids)
                                               : pair_reference(banks[bv], F, b.ids, negs, shared, pn, obj, z[p]);
    out.loss += r.loss;
    out.grad[a] += r.grad;
    out.pairs.push_back(std::move(r));
  }
  return out;
}

std::string describe(Objective obj, index_t views, ViewGraph g, NegativesMode mode) {
  return to_string(obj) + " V=" + std::to_string(views) + " " + to_string(g) + " " + to_string(mode);
}

/// Everything a step changes, for bit-for-bit comparisons.
struct Snapshot {
  std::vector<RowMatrixf> banks;
  std::vector<std::vector<std::int64_t>> last_update;
  std::vector<Partition> partitions;
  std::int64_t steps = 0;
};

Snapshot snapshot_of(const MultiViewEngine& mv) {
  Snapshot s;
  for (index_t v = 0; v < mv.views(); ++v) {
    s.banks.push_back(mv.bank(v).to_matrix());
    s.last_update.push_back(mv.bank(v).last_update());
  }
  s.partitions = mv.partitions();
  s.steps = mv.steps_done();
  return s;
}

void check_same(const Snapshot& a, const Snapshot& b) {
  REQUIRE(a.banks.size() == b.banks.size());
  for (std::size_t v = 0; v < a.banks.size(); ++v) {
    CAPTURE(v);
    CHECK(bits_equal(a.banks[v], b.banks[v]));
    CHECK(a.last_update[v] == b.last_update[v]);
  }
  REQUIRE(a.partitions.size() == b.partitions.size());
  for (std::size_t p = 0; p < a.partitions.size(); ++p) {
    CAPTURE(p);
    CHECK(a.partitions[p].initialised == b.partitions[p].initialised);
    CHECK(bits_equal(a.partitions[p].log_z, b.partitions[p].log_z));
  }
  CHECK(a.steps == b.steps);
}

}  // namespace

TEST_CASE("view graphs: names, pairs in lexicographic order, and V = 2 the same for both") {
  // Guards the pair lists every other result is ordered by: full = every ordered pair a != b,
  // core = the pairs with view 0; and the names' round trip with a clear refusal of others.
  for (const ViewGraph g : {ViewGraph::full, ViewGraph::core}) CHECK(view_graph_from_string(to_string(g)) == g);
  CHECK(message_of([] { view_graph_from_string("star"); }).find("view graph = 'star': expected full") !=
        std::string::npos);
  const std::vector<ViewPair> full3{{0, 1}, {0, 2}, {1, 0}, {1, 2}, {2, 0}, {2, 1}};
  const std::vector<ViewPair> core3{{0, 1}, {0, 2}, {1, 0}, {2, 0}};
  CHECK(view_pairs(ViewGraph::full, 3) == full3);
  CHECK(view_pairs(ViewGraph::core, 3) == core3);
  CHECK(view_pairs(ViewGraph::full, 2) == view_pairs(ViewGraph::core, 2));
  CHECK(view_pairs(ViewGraph::full, 4).size() == 12);
  CHECK(view_pairs(ViewGraph::core, 4).size() == 6);
  CHECK(message_of([] { view_pairs(ViewGraph::full, 1); }).find("views = 1: expected V >= 2") != std::string::npos);

  const MultiViewEngine mv = make_mv(3, mv_config(Objective::nce, NegativesMode::per_sample), ViewGraph::core, 3);
  CHECK(mv.pairs() == core3);
  CHECK(mv.pair_index(2, 0) == 3);
  CHECK(mv.partitions().size() == 4);
  CHECK(message_of([&] { mv.pair_index(1, 2); }).find("pair (1, 2) is not scored") != std::string::npos);
}

TEST_CASE("multi-view NCE and InfoNCE equal a plain double reference of every pair") {
  // Guards the multi-view step's mathematics: each pair (a, b) scores view a's features against
  // bank b with the step's one draw of negatives (what sample() predicts at the counter), L sums
  // the pairs, dL/df^a sums the pairs (a, b), NCE's first_batch Z is each pair's own estimate on
  // step 0 and then kept; and step 1 sees the refreshed banks. V = 2 and 3, both graphs, both modes.
  for (const Objective obj : {Objective::nce, Objective::info_nce})
    for (const index_t views : {index_t{2}, index_t{3}})
      for (const ViewGraph graph : {ViewGraph::full, ViewGraph::core})
        for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
          INFO(describe(obj, views, graph, mode));
          std::vector<double> pn;
          MultiViewEngine mv = make_mv(views, mv_config(obj, mode), graph, 5, &pn);
          const std::vector<ViewPair> pairs = mv.pairs();
          std::vector<double> z(pairs.size(), kNaN);  // step 0: each pair's own Zhat
          for (std::int64_t s = 0; s < 2; ++s) {
            CAPTURE(s);
            const Batch b = make_batch(mv, s, 11);
            const RowMatrixi negs = mv.sample(b.ids, mv.steps_done());
            REQUIRE(negs.rows() == (mode == NegativesMode::shared ? 1 : kB));
            const StepRef ref = step_reference(bank_rows(mv), b, negs, mode == NegativesMode::shared, pn, obj, pairs, z);
            std::vector<RowMatrixf> g;
            const MultiViewStats st = run_step(mv, b, g);
            REQUIRE(st.pairs.size() == pairs.size());
            CHECK(rel_err(st.loss, ref.loss) < kTol);
            for (std::size_t p = 0; p < pairs.size(); ++p) {
              CAPTURE(p);
              CHECK(st.pairs[p].step == s);
              CHECK(rel_err(st.pairs[p].loss, ref.pairs[p].loss) < kTol);
              CHECK(rel_err(st.pairs[p].z_estimate, ref.pairs[p].zhat) < kTol);
              if (obj == Objective::nce) CHECK(rel_err(st.pairs[p].z, ref.pairs[p].z) < kTol);
              if (obj == Objective::nce && s == 0) z[p] = ref.pairs[p].zhat;  // first_batch keeps it
            }
            for (index_t v = 0; v < views; ++v) {
              CAPTURE(v);
              CHECK(grad_rel_err(g[static_cast<std::size_t>(v)], ref.grad[static_cast<std::size_t>(v)]) < kTol);
            }
            CHECK(mv.steps_done() == s + 1);
          }
        }
}

TEST_CASE("multi-view full softmax equals the exact reference of every pair") {
  // Guards the exact objective per pair (no draws, no Z state): L_ab over all N rows of bank b.
  MultiViewEngine mv = make_mv(3, mv_config(Objective::full_softmax, NegativesMode::per_sample), ViewGraph::full, 6);
  for (std::int64_t s = 0; s < 2; ++s) {
    const Batch b = make_batch(mv, s, 12);
    const StepRef ref = step_reference(bank_rows(mv), b, RowMatrixi(), false, {}, Objective::full_softmax, mv.pairs(),
                                       std::vector<double>(mv.pairs().size(), kNaN));
    std::vector<RowMatrixf> g;
    const MultiViewStats st = run_step(mv, b, g);
    CHECK(rel_err(st.loss, ref.loss) < kTol);
    for (std::size_t p = 0; p < st.pairs.size(); ++p) CHECK(rel_err(st.pairs[p].loss, ref.pairs[p].loss) < kTol);
    for (std::size_t v = 0; v < 3; ++v) CHECK(grad_rel_err(g[v], ref.grad[v]) < kTol);
  }
}

TEST_CASE("V = 2 multi-view equals two single-view engines bit for bit") {
  // Guards that each pair runs exactly the single-view step: pair (0, 1) is an Engine over bank 1
  // queried with view 0, pair (1, 0) one over bank 0 queried with view 1 (same seed, sampler and
  // config, hence the same draws): the same loss, Z, gradients and refreshed rows, bit for bit, over
  // several steps (Z kept from step 0), with normalize_features too, and with a bfloat16 bank 1.
  for (const Objective obj : {Objective::nce, Objective::info_nce})
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared})
      for (const bool normalize : {false, true})
        for (const bool mixed : {false, true}) {
          INFO(to_string(obj) << " " << to_string(mode) << (normalize ? " normalize" : "") << (mixed ? " bf16" : ""));
          EngineConfig cfg = mv_config(obj, mode);
          cfg.normalize_features = normalize;
          const std::vector<DType> dtypes{DType::float32, mixed ? DType::bfloat16 : DType::float32};
          MultiViewEngine mv = make_mv(2, cfg, ViewGraph::core, 8, nullptr, dtypes);
          std::vector<Bank> banks = make_banks(2, 8, dtypes);
          Engine e1(std::move(banks[1]), make_sampler(8), cfg);  // pair (0, 1)
          Engine e0(std::move(banks[0]), make_sampler(8), cfg);  // pair (1, 0)
          for (std::int64_t s = 0; s < 3; ++s) {
            CAPTURE(s);
            const Batch b = make_batch(mv, s, 13, normalize ? 2.5f : 1.0f);
            CHECK(bits_equal(mv.sample(b.ids, s), e1.sample(b.ids, s)));
            std::vector<RowMatrixf> g;
            const MultiViewStats st = run_step(mv, b, g);
            RowMatrixf h0(kB, kD), h1(kB, kD);
            const StepStats s1 = e1.step(b.f[0], b.ids, h0, false);
            const StepStats s0 = e0.step(b.f[1], b.ids, h1, false);
            e1.update(b.f[1], b.ids);  // each bank refreshed with its own view
            e0.update(b.f[0], b.ids);
            CHECK(bits_equal(st.pairs[0].loss, s1.loss));
            CHECK(bits_equal(st.pairs[1].loss, s0.loss));
            CHECK(bits_equal(st.loss, s1.loss + s0.loss));
            CHECK(bits_equal(st.pairs[0].z_estimate, s1.z_estimate));
            CHECK(bits_equal(st.pairs[1].z_estimate, s0.z_estimate));
            CHECK(bits_equal(g[0], h0));
            CHECK(bits_equal(g[1], h1));
            CHECK(bits_equal(mv.bank(0).to_matrix(), e0.bank().to_matrix()));
            CHECK(bits_equal(mv.bank(1).to_matrix(), e1.bank().to_matrix()));
            CHECK(mv.partition(0).initialised == e1.partition().initialised);
            CHECK(bits_equal(mv.partition(0).log_z, e1.partition().log_z));
            CHECK(bits_equal(mv.partition(1).log_z, e0.partition().log_z));
          }
        }
}

TEST_CASE("each pair keeps its own Z state: first_batch, ema and fixed") {
  // Guards per-pair Z: under first_batch each pair's Z is its own step-0 estimate (the pairs'
  // estimates differ), kept afterwards; under ema each pair averages its own estimates; under fixed
  // every pair uses z_fixed. Shared Z across pairs would fail all three.
  for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared})
    for (const ZPolicy zp : {ZPolicy::first_batch, ZPolicy::ema, ZPolicy::fixed}) {
      INFO(to_string(mode) << " " << to_string(zp));
      std::vector<double> pn;
      const EngineConfig cfg = mv_config(Objective::nce, mode, zp);
      MultiViewEngine mv = make_mv(3, cfg, ViewGraph::full, 9, &pn);
      const std::size_t np = mv.pairs().size();
      for (std::size_t p = 0; p < np; ++p) CHECK(mv.partition(p).initialised == (zp == ZPolicy::fixed));
      std::vector<double> z(np, zp == ZPolicy::fixed ? cfg.z_fixed : kNaN);  // Z each pair uses
      for (std::int64_t s = 0; s < 3; ++s) {
        CAPTURE(s);
        const Batch b = make_batch(mv, s, 14);
        const RowMatrixi negs = mv.sample(b.ids, s);
        const StepRef ref =
            step_reference(bank_rows(mv), b, negs, mode == NegativesMode::shared, pn, Objective::nce, mv.pairs(), z);
        std::vector<RowMatrixf> g;
        const MultiViewStats st = run_step(mv, b, g);
        for (std::size_t p = 0; p < np; ++p) {
          CAPTURE(p);
          const double used = std::isnan(z[p]) ? ref.pairs[p].zhat : z[p];
          CHECK(rel_err(st.pairs[p].z, used) < kTol);
          double want = used;  // the pair's Z after the step
          if (zp == ZPolicy::ema && !std::isnan(z[p])) want = cfg.z_ema * z[p] + (1.0 - cfg.z_ema) * ref.pairs[p].zhat;
          CHECK(mv.partition(p).initialised);
          CHECK(rel_err(mv.partition(p).z(), want) < kTol);
          z[p] = want;
        }
        // The pairs' own estimates: a shared Z would make them equal to the last bit. (They differ by
        // about 1e-3 relative here: 1e-6 does not hang on the particular draws of the seed.)
        if (s == 0 && zp != ZPolicy::fixed)
          for (std::size_t p = 1; p < np; ++p) CHECK(rel_err(z[p], z[0]) > 1e-6);
      }
    }
}

TEST_CASE("each bank is refreshed by momentum with its own view") {
  // Guards the refresh: bank b's rows after a step equal Bank::momentum_update of bank b's pre-step
  // copy with view b's (unit) features at the step counter, bit for bit, last-update steps included:
  // with duplicate ids, per-view dtypes, stochastic rounding, normalize_features, and update = false
  // leaving every bank as it was (the counter still advances).
  const std::vector<DType> dtypes{DType::float32, DType::float16, DType::bfloat16};
  for (const bool normalize : {false, true}) {
    INFO((normalize ? "normalize" : "unit features"));
    EngineConfig cfg = mv_config(Objective::info_nce, NegativesMode::per_sample);
    cfg.normalize_features = normalize;
    cfg.rounding = Rounding::stochastic;
    cfg.momentum = 0.3;
    MultiViewEngine mv = make_mv(3, cfg, ViewGraph::core, 10, nullptr, dtypes);
    std::vector<Bank> want = make_banks(3, 10, dtypes);  // the same banks, refreshed below by hand
    for (std::int64_t s = 0; s < 2; ++s) {
      CAPTURE(s);
      const Batch b = make_batch(mv, s, 15, normalize ? 3.0f : 1.0f);
      std::vector<RowMatrixf> g;
      run_step(mv, b, g);
      for (std::size_t v = 0; v < 3; ++v) {
        CAPTURE(v);
        RowMatrixf unit = b.f[v];
        if (normalize)  // as the engine normalises: each value over the row's norm in double
          for (index_t i = 0; i < kB; ++i) {
            const double n = b.f[v].row(i).cast<double>().norm();
            for (index_t c = 0; c < kD; ++c) unit(i, c) = static_cast<float>(b.f[v](i, c) / n);
          }
        want[v].momentum_update(b.ids, unit, cfg.momentum, s, cfg.rounding, cfg.seed);
        CHECK(bits_equal(mv.bank(static_cast<index_t>(v)).to_matrix(), want[v].to_matrix()));
        CHECK(mv.bank(static_cast<index_t>(v)).last_update() == want[v].last_update());
      }
    }
    const Snapshot before = snapshot_of(mv);
    std::vector<RowMatrixf> g;
    run_step(mv, make_batch(mv, 2, 15, normalize ? 3.0f : 1.0f), g, /*update=*/false);
    for (index_t v = 0; v < 3; ++v) CHECK(bits_equal(mv.bank(v).to_matrix(), before.banks[static_cast<std::size_t>(v)]));
    CHECK(mv.steps_done() == 3);
  }
}

TEST_CASE("multi-view results are bit-identical for 1 and 2 threads") {
  // Guards the determinism contract: losses, every gradient, every bank and Z state, bit for bit.
  for (const Objective obj : {Objective::nce, Objective::info_nce})
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
      INFO(to_string(obj) << " " << to_string(mode));
      std::vector<std::vector<double>> losses(2);
      std::vector<std::vector<RowMatrixf>> grads(2);
      std::vector<Snapshot> ends;
      for (const int threads : {1, 2}) {
        const ThreadCount tc(threads);
        MultiViewEngine mv = make_mv(3, mv_config(obj, mode), ViewGraph::full, 16);
        auto& l = losses[static_cast<std::size_t>(threads - 1)];
        auto& gs = grads[static_cast<std::size_t>(threads - 1)];
        for (std::int64_t s = 0; s < 3; ++s) {
          std::vector<RowMatrixf> g;
          const MultiViewStats st = run_step(mv, make_batch(mv, s, 17), g);
          l.push_back(st.loss);
          for (const auto& p : st.pairs) l.push_back(p.loss);
          gs.insert(gs.end(), g.begin(), g.end());
        }
        ends.push_back(snapshot_of(mv));
      }
      REQUIRE(losses[0].size() == losses[1].size());
      for (std::size_t i = 0; i < losses[0].size(); ++i) CHECK(bits_equal(losses[0][i], losses[1][i]));
      for (std::size_t i = 0; i < grads[0].size(); ++i) CHECK(bits_equal(grads[0][i], grads[1][i]));
      check_same(ends[0], ends[1]);
    }
}

TEST_CASE("multi-view refuses bad input with one clear Error and changes nothing") {
  // Guards validation before any change: each refused call names the argument (and view) and the
  // expectation, and leaves the banks, last-update steps, Z states, counter and the grads as they were.
  MultiViewEngine mv = make_mv(3, mv_config(Objective::nce, NegativesMode::per_sample), ViewGraph::full, 18);
  std::vector<RowMatrixf> warm;
  run_step(mv, make_batch(mv, 0, 19), warm);  // Z states initialised, rows refreshed
  const Batch b = make_batch(mv, 1, 19);
  const Snapshot before = snapshot_of(mv);

  constexpr float kSentinel = 7.0f;
  std::vector<RowMatrixf> gbuf(3, RowMatrixf::Constant(kB, kD, kSentinel));
  RowMatrixf bad_rows = b.f[1].topRows(kB - 1);
  RowMatrixf nan_f = b.f[2];
  nan_f(1, 3) = std::numeric_limits<float>::quiet_NaN();
  RowMatrixf long_f = b.f[1] * 1.5f;
  RowMatrixf small_g(kB, kD - 1);
  RowMatrixf f0_writable = b.f[0];
  std::vector<float> self_buf(static_cast<std::size_t>(kB * kD));
  // ids stored inside a float buffer that a grad then covers
  std::vector<float> ids_buf(static_cast<std::size_t>(kB * kD));
  auto* ids_in_buf = reinterpret_cast<index_t*>(ids_buf.data());
  std::copy(b.ids.begin(), b.ids.end(), ids_in_buf);
  const std::span<const index_t> ids_alias(ids_in_buf, b.ids.size());
  float* bank1_rows = static_cast<float*>(const_cast<void*>(mv.bank(1).view().data));

  using Fs = std::vector<FeaturesRef>;
  using Gs = std::vector<GradRef>;
  const Fs good_f(b.f.begin(), b.f.end());
  auto good_g = [&] { return Gs(gbuf.begin(), gbuf.end()); };
  auto call = [&](const Fs& f, std::span<const index_t> ids, Gs g) { mv.step(f, ids, g); };
  using Map = Eigen::Map<RowMatrixf, 0, Eigen::OuterStride<>>;

  struct Case {
    const char* name;
    std::function<void()> run;
    std::string want;
  };
  const std::vector<index_t> bad_ids{1, 2, kN, 4, 5, 6};
  const std::vector<Case> cases{
      {"two features for three views", [&] { call(Fs{b.f[0], b.f[1]}, b.ids, good_g()); },
       "features has 2 entries: expected V = 3 (one B x D matrix per view)"},
      {"two grads for three views", [&] { call(good_f, b.ids, Gs{gbuf[0], gbuf[1]}); },
       "grads has 2 entries: expected V = 3 (one B x D buffer per view)"},
      {"empty ids", [&] { call(good_f, {}, good_g()); }, "ids is empty: expected a batch of at least one id"},
      {"id out of range", [&] { call(good_f, bad_ids, good_g()); },
       "ids[2] = 300 is out of range: expected 0 <= id < N = 300"},
      {"features[1] short", [&] { call(Fs{b.f[0], bad_rows, b.f[2]}, b.ids, good_g()); },
       "features[1] has shape 5 x 16: expected 6 x 16 (B x D)"},
      {"features[2] NaN", [&] { call(Fs{b.f[0], b.f[1], nan_f}, b.ids, good_g()); },
       "features[2](1, 3) = nan: expected finite values"},
      {"features[1] not unit", [&] { call(Fs{b.f[0], long_f, b.f[2]}, b.ids, good_g()); },
       "features[1] row 0 has norm"},
      {"grads[2] shape", [&] { call(good_f, b.ids, Gs{gbuf[0], gbuf[1], small_g}); },
       "grads[2] has shape 6 x 15: expected 6 x 16 (B x D)"},
      {"grads[1] self overlap",
       [&] { call(good_f, b.ids, Gs{gbuf[0], Map(self_buf.data(), kB, kD, Eigen::OuterStride<>(kD / 2)), gbuf[2]}); },
       "grads[1] has rows that share memory"},
      {"grads[1] is features[0]", [&] { call(Fs{f0_writable, b.f[1], b.f[2]}, b.ids, Gs{gbuf[0], f0_writable, gbuf[2]}); },
       "grads[1] and features[0] share memory"},
      {"grads[2] is grads[0]", [&] { call(good_f, b.ids, Gs{gbuf[0], gbuf[1], gbuf[0]}); },
       "grads[2] and grads[0] share memory"},
      {"grads[0] covers ids", [&] { call(good_f, ids_alias, Gs{Map(ids_buf.data(), kB, kD, Eigen::OuterStride<>(kD)), gbuf[1], gbuf[2]}); },
       "grads[0] and ids share memory"},
      {"grads[0] in bank 1", [&] { call(good_f, b.ids, Gs{Map(bank1_rows, kB, kD, Eigen::OuterStride<>(mv.bank(1).stride())), gbuf[1], gbuf[2]}); },
       "grads[0] and bank 1's rows share memory"},
      {"update with two features", [&] { mv.update(Fs{b.f[0], b.f[1]}, b.ids); },
       "features has 2 entries: expected V = 3"},
      {"update with NaN", [&] { mv.update(Fs{b.f[0], b.f[1], nan_f}, b.ids); }, "features[2](1, 3) = nan"},
      {"restore with five states", [&] { mv.restore_state(std::vector<Partition>(5, mv.partition(0)), 3); },
       "partitions has 5 entries: expected one Z state per pair (6 pairs, full graph over V = 3 views)"},
      {"restore with another policy",
       [&] {
         std::vector<Partition> p = mv.partitions();
         p[2].policy = ZPolicy::ema;
         mv.restore_state(p, 3);
       },
       "partitions[2].policy = ema (pair 1 -> 0): expected the engine's first_batch"},
      {"restore with an infinite Z",
       [&] {
         std::vector<Partition> p = mv.partitions();
         p[4].log_z = std::numeric_limits<double>::infinity();
         mv.restore_state(p, 3);
       },
       "partitions[4].log_z = inf (pair 2 -> 0): expected a finite value"},
      {"restore with a negative step", [&] { mv.restore_state(mv.partitions(), -1); },
       "step = -1: expected a step counter >= 0"},
      {"bank 3", [&] { (void)mv.bank(3); }, "view 3 is out of range: expected 0 <= v < V = 3"},
      {"partition 6", [&] { (void)mv.partition(6); }, "pair 6 is out of range: expected 0 <= p < 6"},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    const std::string msg = message_of(c.run);
    CHECK_MESSAGE(msg.find(c.want) != std::string::npos, msg);
    check_same(snapshot_of(mv), before);
    for (const auto& g : gbuf) CHECK((g.array() == kSentinel).all());
  }
  // After all that, the step runs.
  std::vector<RowMatrixf> g;
  CHECK(run_step(mv, b, g).pairs.size() == 6);
}

TEST_CASE("multi-view construction refuses mismatched banks, a null sampler and missing labels") {
  // Guards the constructor's checks (each names the argument and the expectation) and that an
  // objective needing labels is refused at the step, changing nothing.
  const EngineConfig cfg = mv_config(Objective::nce, NegativesMode::per_sample);
  auto banks_of = [](std::vector<std::pair<index_t, index_t>> shapes) {
    std::vector<Bank> v;
    for (auto [n, d] : shapes) v.emplace_back(n, d, 1);
    return v;
  };
  CHECK(message_of([&] { MultiViewEngine(banks_of({{kN, kD}}), make_sampler(1), cfg); })
            .find("banks has 1 entries: expected V >= 2 views") != std::string::npos);
  CHECK(message_of([&] { MultiViewEngine(banks_of({{kN, kD}, {kN, kD}, {200, kD}}), make_sampler(1), cfg); })
            .find("banks[2] is N x D = 200 x 16: expected banks[0]'s 300 x 16") != std::string::npos);
  CHECK(message_of([&] { MultiViewEngine(banks_of({{kN, kD}, {kN, 8}}), make_sampler(1), cfg); })
            .find("banks[1] is N x D = 300 x 8: expected banks[0]'s 300 x 16") != std::string::npos);
  CHECK(message_of([&] { MultiViewEngine(banks_of({{kN, kD}, {kN, kD}}), nullptr, cfg); })
            .find("sampler is null") != std::string::npos);
  EngineConfig bad = cfg;
  bad.k = 0;
  CHECK(message_of([&] { MultiViewEngine(banks_of({{kN, kD}, {kN, kD}}), make_sampler(1), bad); })
            .find("config.k = 0") != std::string::npos);

  EngineConfig sup = cfg;
  sup.objective = Objective::supcon;
  MultiViewEngine mv(make_banks(2, 2), make_sampler(2), sup);
  const Snapshot before = snapshot_of(mv);
  std::vector<RowMatrixf> g;
  CHECK(message_of([&] { run_step(mv, make_batch(mv, 0, 3), g); }).find("objective supcon needs labels") !=
        std::string::npos);
  check_same(snapshot_of(mv), before);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(kN));
  for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int64_t>(j % 7);
  mv.set_labels(labels);
  CHECK(mv.labels() == labels);
  CHECK(std::isfinite(run_step(mv, make_batch(mv, 0, 3), g).loss));
}

TEST_CASE("multi-view features may be rows of a bank") {
  // Guards the aliasing contract: features[1] = rows of bank 0 (which the refresh of bank 0 writes
  // before bank 1's) gives bit for bit the result of a copy of those rows.
  const EngineConfig cfg = mv_config(Objective::info_nce, NegativesMode::per_sample);
  MultiViewEngine a = make_mv(2, cfg, ViewGraph::full, 20);
  MultiViewEngine c = make_mv(2, cfg, ViewGraph::full, 20);
  const std::vector<index_t> ids{40, 41, 42, 43, 44, 45};
  const BankView v0 = a.bank(0).view();
  const Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>> rows(v0.row(40), kB, kD, Eigen::OuterStride<>(v0.stride));
  const RowMatrixf copy = rows;
  const RowMatrixf f0 = make_batch(a, 0, 21).f[0];
  std::vector<RowMatrixf> ga(2, RowMatrixf(kB, kD)), gc(2, RowMatrixf(kB, kD));
  std::vector<GradRef> gra(ga.begin(), ga.end()), grc(gc.begin(), gc.end());
  const std::vector<FeaturesRef> fa{f0, rows}, fc{f0, copy};
  const MultiViewStats sa = a.step(fa, ids, gra);
  const MultiViewStats sc = c.step(fc, ids, grc);
  CHECK(bits_equal(sa.loss, sc.loss));
  CHECK(bits_equal(ga[0], gc[0]));
  CHECK(bits_equal(ga[1], gc[1]));
  check_same(snapshot_of(a), snapshot_of(c));
}

TEST_CASE("multi-view restore_state continues bit-identically to an uninterrupted run") {
  // Guards resuming: banks rebuilt from their rows (bit for bit), every pair's Z state and the
  // counter restored, the next steps equal those of a run that never stopped (draws keyed by the
  // counter, each pair's Z its own), under ema (Z changes every step) in both negative modes.
  for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
    INFO(to_string(mode));
    const EngineConfig cfg = mv_config(Objective::nce, mode, ZPolicy::ema);
    MultiViewEngine whole = make_mv(3, cfg, ViewGraph::full, 22);
    MultiViewEngine first = make_mv(3, cfg, ViewGraph::full, 22);
    std::vector<MultiViewStats> want;
    std::vector<std::vector<RowMatrixf>> want_g;
    for (std::int64_t s = 0; s < 5; ++s) {
      std::vector<RowMatrixf> g;
      want.push_back(run_step(whole, make_batch(whole, s, 23), g));
      want_g.push_back(g);
      if (s < 2) run_step(first, make_batch(first, s, 23), g);
    }
    // A new engine from `first`'s state.
    std::vector<Bank> banks;
    for (index_t v = 0; v < 3; ++v) {
      const RowMatrixf rows = first.bank(v).to_matrix();
      banks.push_back(Bank::from_blocks(kN, kD, 64,
                                        [&](index_t r0, index_t n, float* dst, index_t stride) {
                                          for (index_t r = 0; r < n; ++r)
                                            std::copy_n(rows.row(r0 + r).data(), kD, dst + r * stride);
                                        },
                                        1e-3));
      banks.back().set_last_update(first.bank(v).last_update());
    }
    MultiViewEngine resumed(std::move(banks), make_sampler(22), cfg, ViewGraph::full);
    resumed.restore_state(first.partitions(), first.steps_done());
    for (std::int64_t s = 2; s < 5; ++s) {
      CAPTURE(s);
      std::vector<RowMatrixf> g;
      const MultiViewStats st = run_step(resumed, make_batch(resumed, s, 23), g);
      const auto i = static_cast<std::size_t>(s);
      CHECK(bits_equal(st.loss, want[i].loss));
      for (std::size_t p = 0; p < st.pairs.size(); ++p) {
        CHECK(bits_equal(st.pairs[p].loss, want[i].pairs[p].loss));
        CHECK(bits_equal(st.pairs[p].z, want[i].pairs[p].z));
      }
      for (std::size_t v = 0; v < 3; ++v) CHECK(bits_equal(g[v], want_g[i][v]));
    }
    check_same(snapshot_of(resumed), snapshot_of(whole));
  }
}

namespace {

/// A query-dependent sampler for the multi-view engine over make_banks(2, seed): a cluster sampler
/// fitted to view 0's bank (refreshed every 2 steps), or a ring of ranks [1, 60).
std::unique_ptr<NoiseSampler> query_sampler(SamplerKind kind, std::uint64_t seed) {
  if (kind == SamplerKind::ring) return std::make_unique<RingSampler>(kN, RingConfig{1, 60});
  ClusterConfig cc;
  cc.clusters = 8;
  cc.beta = 5.0;
  cc.epsilon = 0.2;
  cc.refresh_every = 2;
  cc.iterations = 2;
  cc.seed = seed;
  return std::make_unique<ClusterSampler>(make_banks(2, seed)[0].view(), cc);
}

/// A bit-exact copy of an fp32 bank (from_rows would renormalise rows within rounding of unit norm).
Bank copy_of(const Bank& bank) {
  const RowMatrixf rows = bank.to_matrix();
  return Bank::from_blocks(rows.rows(), rows.cols(), rows.rows(),
                           [&](index_t, index_t, float* dst, index_t ld) {
                             for (index_t i = 0; i < rows.rows(); ++i)
                               std::copy_n(rows.row(i).data(), rows.cols(), dst + i * ld);
                           },
                           std::numeric_limits<double>::infinity());
}

/// The state the multi-view engine's sampler will draw with at step s (a cluster sampler due a
/// refresh re-fitted to view 0's bank first), as a fresh sampler that never refreshes by itself.
std::unique_ptr<NoiseSampler> sampler_at(const MultiViewEngine& mv, std::int64_t s) {
  if (mv.sampler().kind() == SamplerKind::ring) {
    const auto& r = dynamic_cast<const RingSampler&>(mv.sampler());
    return std::make_unique<RingSampler>(r.size(), r.config());
  }
  ClusterSampler now = dynamic_cast<const ClusterSampler&>(mv.sampler());
  if (now.due(s)) now.refresh(mv.bank(0).view(), s);
  ClusterConfig cc = now.config();
  cc.refresh_every = 0;
  return std::make_unique<ClusterSampler>(cc, now.centroids(), now.assignment(), now.refreshed_at());
}

}  // namespace

TEST_CASE("V = 2 multi-view with a cluster or ring sampler equals single-view engines bit for bit") {
  // Guards the query-dependent samplers in the multi-view step: pair (a, b) draws from q(. | f^a)
  // and weighs its draws with it, so it is exactly a single-view Engine over bank b with the same
  // sampler state queried with view a (restored to the pair's Z and the counter): the same draws
  // (sample(ids, step, features, p)), loss, Zhat, Z and gradients, bit for bit. The cluster sampler
  // re-fits to view 0's bank on its schedule (steps 2 and 4); the ring ranks each pair's own bank.
  for (const SamplerKind kind : {SamplerKind::cluster, SamplerKind::ring})
    for (const Objective obj : {Objective::nce, Objective::info_nce, Objective::dhel})
      for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
        INFO(to_string(kind) << " " << to_string(obj) << " " << to_string(mode));
        EngineConfig cfg = mv_config(obj, mode);
        cfg.allow_biased_sampler = kind == SamplerKind::ring;
        MultiViewEngine mv(make_banks(2, 21), query_sampler(kind, 21), cfg, ViewGraph::full);
        for (std::int64_t s = 0; s < 5; ++s) {
          CAPTURE(s);
          const Batch b = make_batch(mv, s, 23);
          const std::vector<FeaturesRef> f(b.f.begin(), b.f.end());
          std::vector<StepStats> want;
          std::vector<RowMatrixf> want_g;
          std::vector<RowMatrixi> want_draws;
          for (std::size_t p = 0; p < mv.pairs().size(); ++p) {
            CAPTURE(p);
            const ViewPair pair = mv.pairs()[p];
            Engine e(copy_of(mv.bank(pair.bank)), sampler_at(mv, s), cfg);
            e.restore_state(mv.partition(p), s);
            const auto a = static_cast<std::size_t>(pair.query);
            want_draws.push_back(e.sample(b.ids, s, b.f[a]));
            // (a ring ranks the bank as it is before the step's refresh of the rows)
            if (kind == SamplerKind::ring) CHECK(bits_equal(mv.sample(b.ids, s, f, p), want_draws[p]));
            want_g.push_back(RowMatrixf::Zero(kB, kD));
            want.push_back(e.step(b.f[a], b.ids, want_g.back(), false));
          }
          std::unique_ptr<NoiseSampler> expected_state = sampler_at(mv, s);
          std::vector<RowMatrixf> g;
          const MultiViewStats st = run_step(mv, b, g);
          REQUIRE(st.pairs.size() == want.size());
          for (std::size_t p = 0; p < want.size(); ++p) {
            CAPTURE(p);
            // (after the step: a cluster sampler due a refresh re-fits at the step's start)
            if (kind == SamplerKind::cluster) CHECK(bits_equal(mv.sample(b.ids, s, f, p), want_draws[p]));
            CHECK(bits_equal(st.pairs[p].loss, want[p].loss));
            CHECK(bits_equal(st.pairs[p].z_estimate, want[p].z_estimate));
            CHECK(bits_equal(st.pairs[p].z, want[p].z));
            // V = 2: view a queries in pair a only.
            CHECK(bits_equal(g[static_cast<std::size_t>(mv.pairs()[p].query)], want_g[p]));
          }
          if (kind == SamplerKind::cluster) {  // the refresh happened (or not) as predicted
            const auto& got = dynamic_cast<const ClusterSampler&>(mv.sampler());
            const auto& exp = dynamic_cast<const ClusterSampler&>(*expected_state);
            CHECK(got.refreshed_at() == (s / 2) * 2);
            CHECK(bits_equal(got.centroids(), exp.centroids()));
            CHECK(got.assignment() == exp.assignment());
          }
        }
      }
}

TEST_CASE("multi-view with a query-dependent sampler: draws per pair, its errors, and 1 vs 2 threads bit-identical") {
  // Guards the draws' contract: without the features sample() refuses a query-dependent sampler;
  // pairs with the same query view draw the same cluster negatives (V = 3, full graph); a ring's
  // draws differ with the pair's bank; a pair out of range is refused; and whole steps (losses,
  // gradients, banks, Z states, the refreshed clusters) are bit-identical for 1 and 2 threads.
  const EngineConfig cfg = mv_config(Objective::nce, NegativesMode::per_sample);
  {
    MultiViewEngine mv(make_banks(3, 25), query_sampler(SamplerKind::cluster, 25), cfg, ViewGraph::full);
    const Batch b = make_batch(mv, 0, 26);
    const std::vector<FeaturesRef> f(b.f.begin(), b.f.end());
    CHECK(message_of<Error>([&] { (void)mv.sample(b.ids, 0); }).find("features") != std::string::npos);
    CHECK(message_of<Error>([&] { (void)mv.sample(b.ids, 0, f, mv.pairs().size()); }).find("pair 6") !=
          std::string::npos);
    const std::vector<FeaturesRef> two(f.begin(), f.begin() + 2);
    CHECK(message_of<Error>([&] { (void)mv.sample(b.ids, 0, two, 0); }).find("features has 2 entries") !=
          std::string::npos);
    const std::size_t p01 = mv.pair_index(0, 1), p02 = mv.pair_index(0, 2), p10 = mv.pair_index(1, 0);
    CHECK(bits_equal(mv.sample(b.ids, 0, f, p01), mv.sample(b.ids, 0, f, p02)));
    CHECK_FALSE(bits_equal(mv.sample(b.ids, 0, f, p01), mv.sample(b.ids, 0, f, p10)));
  }
  {
    EngineConfig biased = cfg;
    biased.allow_biased_sampler = true;
    MultiViewEngine mv(make_banks(3, 27), query_sampler(SamplerKind::ring, 27), biased, ViewGraph::full);
    const Batch b = make_batch(mv, 0, 28);
    const std::vector<FeaturesRef> f(b.f.begin(), b.f.end());
    CHECK_FALSE(bits_equal(mv.sample(b.ids, 0, f, mv.pair_index(0, 1)), mv.sample(b.ids, 0, f, mv.pair_index(0, 2))));
  }
  for (const SamplerKind kind : {SamplerKind::cluster, SamplerKind::ring}) {
    INFO(to_string(kind));
    EngineConfig c = cfg;
    c.allow_biased_sampler = true;
    std::vector<std::vector<double>> losses(2);
    std::vector<std::vector<RowMatrixf>> grads(2);
    std::vector<Snapshot> ends;
    std::vector<RowMatrixf> centroids;
    for (const int threads : {1, 2}) {
      const ThreadCount tc(threads);
      MultiViewEngine mv(make_banks(3, 29), query_sampler(kind, 29), c, ViewGraph::full);
      for (std::int64_t s = 0; s < 3; ++s) {
        std::vector<RowMatrixf> g;
        const MultiViewStats st = run_step(mv, make_batch(mv, s, 30), g);
        for (const auto& p : st.pairs) losses[static_cast<std::size_t>(threads - 1)].push_back(p.loss);
        for (auto& m : g) grads[static_cast<std::size_t>(threads - 1)].push_back(m);
      }
      ends.push_back(snapshot_of(mv));
      if (kind == SamplerKind::cluster) centroids.push_back(dynamic_cast<const ClusterSampler&>(mv.sampler()).centroids());
    }
    REQUIRE(losses[0].size() == losses[1].size());
    for (std::size_t i = 0; i < losses[0].size(); ++i) CHECK(bits_equal(losses[0][i], losses[1][i]));
    for (std::size_t i = 0; i < grads[0].size(); ++i) CHECK(bits_equal(grads[0][i], grads[1][i]));
    check_same(ends[0], ends[1]);
    if (kind == SamplerKind::cluster) CHECK(bits_equal(centroids[0], centroids[1]));
  }
}
