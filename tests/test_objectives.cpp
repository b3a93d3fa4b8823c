// The objectives of objective.hpp (nce, infonce, dcl, hcl, dhel, kcl, supcon, contrastive, triplet)
// against plain double references written here from the formulas of docs/objectives.md and the
// heads of engine/src/objectives/*.hpp:
//   - loss and dL/df of evaluate() for every objective, both samplers, per-sample and shared
//     negatives, with exclude_positive and exclude_same_label;
//   - central differences of the engine's own loss along random directions;
//   - 1 vs 2 OpenMP threads bit-identical;
//   - the limits the objectives' documentation states (dcl at tau+ = 0, hcl at beta = 0, supcon
//     without same-label draws, dhel against infonce, kcl at gamma = 0);
//   - supcon's coefficients read off an orthonormal bank;
//   - exclude_same_label's draws, conditioning, and the refusals around labels.
//
// The reference's losses are written directly (log-sum-exps over every materialised score
// s = v . f, computed in double from the float rows and features). Its gradient is
// dL/df_i = (1/B) sum_e (dL_i/ds_e) v_e, where dL_i/ds_e is the central difference of that plain
// loss in the score s_e (double, step 1e-5: truncation ~1e-9 relative) for the smooth objectives,
// and written out analytically for the piecewise ones (contrastive, triplet: the O(|P| |N|) loop).
// So no derivative of the engine's is copied here.
#include "objective_reference.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kN = 200;
constexpr index_t kD = 24;
constexpr index_t kB = 5;
constexpr index_t kK = 37;  // not a multiple of the kernels' block of 16: the last block is padded
constexpr double kZFixed = kRefZFixed;

// ---------------------------------------------------------------------------------------------
// How a query's draws are weighed.

enum class Mode {
  per_sample,
  shared,
  per_sample_exclude_positive,
  shared_exclude_positive,
  per_sample_same_label,  ///< exclude_same_label: P_n conditioned on the other labels
  shared_same_label,      ///< exclude_same_label, shared: the query's same-label draws masked (weight 0)
};

const Mode kAllModes[] = {Mode::per_sample,        Mode::shared,
                          Mode::per_sample_exclude_positive, Mode::shared_exclude_positive,
                          Mode::per_sample_same_label, Mode::shared_same_label};

bool is_shared(Mode m) {
  return m == Mode::shared || m == Mode::shared_exclude_positive || m == Mode::shared_same_label;
}
bool excludes_positive(Mode m) { return m == Mode::per_sample_exclude_positive || m == Mode::shared_exclude_positive; }
bool excludes_label(Mode m) { return m == Mode::per_sample_same_label || m == Mode::shared_same_label; }

std::string mode_name(Mode m) {
  switch (m) {
    case Mode::per_sample: return "per-sample";
    case Mode::shared: return "shared";
    case Mode::per_sample_exclude_positive: return "per-sample exclude_positive";
    case Mode::shared_exclude_positive: return "shared exclude_positive";
    case Mode::per_sample_same_label: return "per-sample exclude_same_label";
    case Mode::shared_same_label: return "shared exclude_same_label";
  }
  return "?";
}

/// The queries of a batch: negatives B x K (per-sample) or 1 x K (shared), P_n as doubles, labels.
std::vector<Query> make_queries(std::span<const index_t> ids, const RowMatrixi& negs, const std::vector<double>& pn,
                                const std::vector<std::int64_t>& labels, Mode mode) {
  const bool shared = is_shared(mode);
  const auto B = static_cast<index_t>(ids.size());
  std::vector<Query> out(static_cast<std::size_t>(B));
  double batch_mass = 0.0;  // mass of the distinct ids of the batch
  {
    std::vector<index_t> u(ids.begin(), ids.end());
    std::sort(u.begin(), u.end());
    u.erase(std::unique(u.begin(), u.end()), u.end());
    for (index_t j : u) batch_mass += pn[static_cast<std::size_t>(j)];
  }
  for (index_t i = 0; i < B; ++i) {
    const index_t y = ids[static_cast<std::size_t>(i)];
    const std::int64_t label = labels.empty() ? 0 : labels[static_cast<std::size_t>(y)];
    double excluded = 0.0;
    if (mode == Mode::per_sample_exclude_positive) excluded = pn[static_cast<std::size_t>(y)];
    if (mode == Mode::shared_exclude_positive) excluded = batch_mass;
    if (mode == Mode::per_sample_same_label)
      for (std::size_t j = 0; j < pn.size(); ++j)
        if (labels[j] == label) excluded += pn[j];
    Query& q = out[static_cast<std::size_t>(i)];
    q.pos.row = y;
    q.pos.q = pn[static_cast<std::size_t>(y)];
    q.pos.same = true;
    for (index_t k = 0; k < negs.cols(); ++k) {
      Entry e;
      e.row = shared ? negs(0, k) : negs(i, k);
      e.q = pn[static_cast<std::size_t>(e.row)] / (1.0 - excluded);
      e.same = !labels.empty() && labels[static_cast<std::size_t>(e.row)] == label;
      e.masked = mode == Mode::shared_same_label && e.same;
      q.draws.push_back(e);
    }
  }
  return out;
}

struct Ref {
  double loss = 0.0;
  RowMatrixd grad;
  std::vector<double> per_query;
};

/// The batch mean of the queries' losses and dL/df = (1/B) sum_e dL/ds_e v_e.
Ref reference(const Variant& v, const RowMatrixf& bank, const RowMatrixf& features, const std::vector<Query>& queries) {
  const RowMatrixd V = bank.cast<double>();
  const RowMatrixd F = features.cast<double>();
  const index_t B = F.rows();
  Ref out;
  out.grad = RowMatrixd::Zero(B, F.cols());
  for (index_t i = 0; i < B; ++i) {
    const Query& q = queries[static_cast<std::size_t>(i)];
    const double sp = V.row(q.pos.row).dot(F.row(i));
    std::vector<double> s;
    for (const Entry& e : q.draws) s.push_back(V.row(e.row).dot(F.row(i)));
    const double L = query_loss(v, V.rows(), q, sp, s, s);
    out.per_query.push_back(L);
    out.loss += L / static_cast<double>(B);
    const std::vector<double> g = query_dlds(v, V.rows(), q, sp, s);
    out.grad.row(i) += g[0] * V.row(q.pos.row) / static_cast<double>(B);
    for (std::size_t k = 0; k < s.size(); ++k)
      out.grad.row(i) += g[k + 1] * V.row(q.draws[k].row) / static_cast<double>(B);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Engines and data.

EngineConfig config_of(const Variant& v, Mode mode, index_t k) {
  EngineConfig cfg;
  cfg.k = k;
  cfg.objective = v.obj;
  cfg.tau = v.tau;
  cfg.tau_plus = v.tau_plus;
  cfg.beta = v.beta;
  cfg.detach_weights = v.detach;
  cfg.kernel_t = v.kernel_t;
  cfg.gamma = v.gamma;
  cfg.margin = v.margin;
  cfg.z_policy = ZPolicy::fixed;
  cfg.z_fixed = kZFixed;
  cfg.negatives = is_shared(mode) ? NegativesMode::shared : NegativesMode::per_sample;
  cfg.exclude_positive = excludes_positive(mode);
  cfg.exclude_same_label = excludes_label(mode);
  cfg.seed = 5;
  return cfg;
}

/// Labels with 4 classes of unordered, non-contiguous values.
std::vector<std::int64_t> four_class_labels(index_t n, std::mt19937_64& rng) {
  const std::int64_t values[] = {42, -3, 7, 1000};
  std::uniform_int_distribution<int> ud(0, 3);
  std::vector<std::int64_t> l(static_cast<std::size_t>(n));
  for (auto& x : l) x = values[ud(rng)];
  return l;
}

/// Half the features near their positive rows (s_pos ~ 0.5), half random unit vectors.
RowMatrixf mixed_features(const RowMatrixf& bank, std::span<const index_t> ids, std::mt19937_64& rng) {
  RowMatrixf f = near_rows(bank, ids, 0.35, rng);
  const RowMatrixf r = unit_rows(f.rows(), f.cols(), rng);
  for (index_t i = 1; i < f.rows(); i += 2) f.row(i) = r.row(i);
  return f;
}

/// Caller negatives that the mode admits; collisions with the positive where it allows them.
RowMatrixi mode_negatives(Mode mode, std::span<const index_t> ids, const std::vector<std::int64_t>& labels, index_t n,
                          index_t k, std::mt19937_64& rng) {
  const bool shared = is_shared(mode);
  const index_t rows = shared ? 1 : static_cast<index_t>(ids.size());
  RowMatrixi negs(rows, k);
  std::uniform_int_distribution<index_t> ud(0, n - 1);
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < k; ++c) {
      auto bad = [&](index_t j) {
        switch (mode) {
          case Mode::per_sample_exclude_positive: return j == ids[static_cast<std::size_t>(i)];
          case Mode::shared_exclude_positive: return std::find(ids.begin(), ids.end(), j) != ids.end();
          case Mode::per_sample_same_label:
            return labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])];
          default: return false;
        }
      };
      index_t j = ud(rng);
      while (bad(j)) j = ud(rng);
      negs(i, c) = j;
    }
  if (mode == Mode::per_sample)
    for (index_t i = 0; i < rows; i += 2) negs(i, (3 * i) % k) = ids[static_cast<std::size_t>(i)];
  if (mode == Mode::shared || mode == Mode::shared_same_label) {
    negs(0, 3) = ids[0];
    negs(0, 20) = ids[2];
  }
  return negs;
}

std::vector<index_t> batch_ids(index_t b, index_t n, std::mt19937_64& rng) {
  std::vector<index_t> ids = random_ids(b, n, rng);
  if (b >= 5) ids[4] = ids[1];  // a duplicate positive
  return ids;
}

/// An engine over Bank(n, d, seed) with a uniform or alias sampler (make_engine) and labels.
Engine labelled_engine(index_t n, index_t d, bool alias, const EngineConfig& cfg, std::uint64_t seed,
                       const std::vector<std::int64_t>& labels, std::vector<double>* pn,
                       DType dtype = DType::float32) {
  Engine eng = make_engine(n, d, alias, cfg, seed, pn, dtype);
  if (!labels.empty()) eng.set_labels(labels);
  return eng;
}

std::string describe(const Variant& v, bool alias, Mode m) {
  return v.name + " / " + (alias ? "alias" : "uniform") + " / " + mode_name(m);
}

/// eng.evaluate(f, ids, negs) against the double reference: the loss finite and both loss and dL/df
/// within 1e-5 (relative). Returns the engine's statistics.
StepStats check_against_reference(Engine& eng, const Variant& v, const RowMatrixf& bank, const RowMatrixf& f,
                                  std::span<const index_t> ids, const RowMatrixi& negs, const std::vector<double>& pn,
                                  const std::vector<std::int64_t>& labels, Mode mode) {
  const Ref ref = reference(v, bank, f, make_queries(ids, negs, pn, labels, mode));
  RowMatrixf g(f.rows(), f.cols());
  const StepStats st = eng.evaluate(f, ids, negs, g);
  CAPTURE(st.loss);
  CAPTURE(ref.loss);
  CHECK(std::isfinite(st.loss));
  CHECK(rel_err(st.loss, ref.loss) < 1e-5);
  const double ge = grad_rel_err(g, ref.grad);
  CAPTURE(ge);
  CHECK(ge < 1e-5);
  return st;
}

}  // namespace

// =============================================================================================
// 1. Every objective against the double reference.

TEST_CASE("objectives: loss and dL/df of every objective equal the double reference") {
  // Guards each objective's formula (objectives/*.hpp), the importance weights lw (-log(N P_n(y))
  // for the positive, log(1 - excluded mass) - log N - log P_n(j) for draws), K = 37 with a padded
  // last block, labels read per draw, shared negatives' GEMM path, and the masking of same-label
  // shared draws under exclude_same_label.
  std::mt19937_64 rng(31337);
  std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  int cases = 0;
  for (const Variant& v : all_variants())
    for (bool alias : {false, true})
      for (Mode mode : kAllModes) {
        // supcon with shared negatives under exclude_same_label: its own test case below
        if (v.obj == Objective::supcon && mode == Mode::shared_same_label) continue;
        INFO(describe(v, alias, mode));
        std::vector<double> pn;
        Engine eng = labelled_engine(kN, kD, alias, config_of(v, mode, 16), 17, labels, &pn);
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(kB, kN, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        const RowMatrixi negs = mode_negatives(mode, ids, labels, kN, kK, rng);
        const StepStats st = check_against_reference(eng, v, bank, f, ids, negs, pn, labels, mode);
        if (reports_mi_bound(v.obj)) {
          CHECK(st.mi_bound_ceiling == doctest::Approx(std::log(kK + 1.0)).epsilon(1e-12));
          CHECK(st.mi_lower_bound == doctest::Approx(std::log(kK + 1.0) - st.loss).epsilon(1e-12));
        } else {
          CHECK(std::isnan(st.mi_lower_bound));
        }
        ++cases;
      }
  CHECK(cases == (static_cast<int>(all_variants().size()) * 6 - 2) * 2);
}

TEST_CASE("objectives: on fp16 and bf16 banks, loss and dL/df of every objective equal the double reference on the widened rows") {
  // Guards the per-sample kernel's 2-byte row loads (dot, accumulation, the positive's row, triplet's
  // positives-first pass) and the shared path's widened gather: the reference reads the bank's rows
  // widened to fp32 (exactly what the kernels must see), so the fp32 bound (1e-5) holds. How far a
  // 2-byte bank's step lies from the fp32 bank's is bounded in test_dtype.cpp.
  std::mt19937_64 rng(4711);
  std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  int cases = 0;
  for (const DType t : {DType::float16, DType::bfloat16})
    for (const Variant& v : all_variants())
      for (Mode mode : kAllModes) {
        if (v.obj == Objective::supcon && mode == Mode::shared_same_label) continue;
        INFO(to_string(t) << " / " << describe(v, false, mode));
        std::vector<double> pn;
        Engine eng = labelled_engine(kN, kD, false, config_of(v, mode, 16), 17, labels, &pn, t);
        REQUIRE(eng.bank().dtype() == t);
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(kB, kN, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        const RowMatrixi negs = mode_negatives(mode, ids, labels, kN, kK, rng);
        check_against_reference(eng, v, bank, f, ids, negs, pn, labels, mode);
        ++cases;
      }
  CHECK(cases == (static_cast<int>(all_variants().size()) * 6 - 2) * 2);
}

TEST_CASE("objectives: Engine::prefetch (a background thread) changes no result: losses, gradients and bank bit for bit as without it") {
  // Guards the prefetch of the next step's draws (a background thread): for every objective, both
  // samplers, every per-sample mode and fp32 / fp16 banks, three steps with a prefetch of the right
  // ids before each, then a prefetch of other ids (discarded) and a fourth step, equal bit for bit
  // the same steps without prefetching. Shared negatives: prefetch does nothing.
  std::mt19937_64 rng(777);
  std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  int cases = 0;
  for (const DType t : {DType::float32, DType::float16})
    for (const Variant& v : all_variants())
      for (bool alias : {false, true})
        for (Mode mode : {Mode::per_sample, Mode::per_sample_exclude_positive, Mode::per_sample_same_label}) {
          INFO(to_string(t) << " / " << describe(v, alias, mode));
          const EngineConfig cfg = config_of(v, mode, 40);
          Engine plain = labelled_engine(kN, kD, alias, cfg, 23, labels, nullptr, t);
          Engine ahead = labelled_engine(kN, kD, alias, cfg, 23, labels, nullptr, t);
          for (int s = 0; s < 4; ++s) {
            const std::vector<index_t> ids = batch_ids(kB, kN, rng);
            const RowMatrixf f = mixed_features(plain.bank().to_matrix(), ids, rng);
            if (s < 3) {
              CHECK(ahead.prefetch(ids));
            } else {
              CHECK(ahead.prefetch(batch_ids(kB, kN, rng)));  // other ids: the step draws its own
            }
            CHECK(ahead.prefetch_pending());
            RowMatrixf g1(kB, kD), g2(kB, kD);
            const StepStats a = plain.step(f, ids, g1);
            const StepStats b = ahead.step(f, ids, g2);
            CHECK(!ahead.prefetch_pending());
            CHECK(b.prefetched == (s < 3));
            CHECK(!a.prefetched);
            CHECK(bits_equal(a.loss, b.loss));
            CHECK(bits_equal(a.z, b.z));
            CHECK(bits_equal(g1, g2));
          }
          CHECK(bits_equal(plain.bank().to_matrix(), ahead.bank().to_matrix()));
          ++cases;
        }
  CHECK(cases == static_cast<int>(all_variants().size()) * 12);
  // Shared negatives and the full softmax: nothing to prefetch. Bad ids: Error, nothing held.
  Engine shared = labelled_engine(kN, kD, false, config_of(all_variants().front(), Mode::shared, 16), 23, labels, nullptr);
  const std::vector<index_t> ids = batch_ids(kB, kN, rng);
  CHECK(!shared.prefetch(ids));
  CHECK(!shared.prefetch_pending());
  Engine eng = labelled_engine(kN, kD, false, config_of(all_variants().front(), Mode::per_sample, 16), 23, labels, nullptr);
  const std::vector<index_t> bad = {0, kN};
  CHECK_THROWS_WITH_AS(eng.prefetch(bad), doctest::Contains("next_ids[1]"), Error);
  CHECK(!eng.prefetch_pending());
}

TEST_CASE("objectives: the kernel's draws in pieces and many positives: step() is evaluate(sample()) and the reference") {
  // Guards the per-sample kernel's draw cursor (64 draws a piece, 16-row blocks, K = 300 crosses
  // both with a partial last piece) and triplet's positives-first pass with more than one block of
  // positives (two classes: about 150 same-label draws per query): for every objective, both
  // samplers and the per-sample modes, step() gives bit for bit the loss and gradient of evaluate()
  // with the negatives sample() reports, and both equal the double reference.
  constexpr index_t k = 300, n = 1000;  // exclude_positive needs K < N
  std::mt19937_64 rng(4242);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
  for (auto& l : labels) l = rng() % 2 == 0 ? 5 : 9;
  int cases = 0;
  for (const Variant& v : all_variants())
    for (bool alias : {false, true})
      for (Mode mode : {Mode::per_sample, Mode::per_sample_exclude_positive, Mode::per_sample_same_label}) {
        INFO(describe(v, alias, mode));
        std::vector<double> pn;
        const EngineConfig cfg = config_of(v, mode, k);
        Engine stepped = labelled_engine(n, kD, alias, cfg, 19, labels, &pn);
        Engine given = labelled_engine(n, kD, alias, cfg, 19, labels, nullptr);
        const RowMatrixf bank = stepped.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(kB, n, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        const RowMatrixi negs = given.sample(ids, 0);
        RowMatrixf g_step(kB, kD), g_given(kB, kD);
        const StepStats a = stepped.step(f, ids, g_step, false);
        const StepStats b = given.evaluate(f, ids, negs, g_given);
        CHECK(bits_equal(a.loss, b.loss));
        CHECK(bits_equal(g_step, g_given));
        const Ref ref = reference(v, bank, f, make_queries(ids, negs, pn, labels, mode));
        CAPTURE(a.loss);
        CAPTURE(ref.loss);
        CHECK(rel_err(a.loss, ref.loss) < 1e-5);
        CHECK(grad_rel_err(g_step, ref.grad) < 1e-5);
        ++cases;
      }
  CHECK(cases == static_cast<int>(all_variants().size()) * 3 * 2);
}

TEST_CASE("objectives: shared negatives whose first blocks are all masked for a query") {
  // Guards the online sums against an empty start: under exclude_same_label a query's same-label
  // shared draws weigh 0 (lw = -inf), and when a whole block of 16 (here the first two) holds only
  // those, an online log-sum-exp that starts empty must stay empty rather than turn into
  // e^{-inf - (-inf)} = NaN. Every objective, both samplers, against the double reference.
  std::mt19937_64 rng(2718);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  int cases = 0;
  for (const Variant& v : all_variants())
    for (bool alias : {false, true}) {
      if (v.obj == Objective::supcon) continue;  // its reference under masking: the test below
      INFO(describe(v, alias, Mode::shared_same_label));
      std::vector<double> pn;
      Engine eng = labelled_engine(kN, kD, alias, config_of(v, Mode::shared_same_label, 16), 17, labels, &pn);
      const RowMatrixf bank = eng.bank().to_matrix();
      const std::vector<index_t> ids = batch_ids(kB, kN, rng);
      const RowMatrixf f = mixed_features(bank, ids, rng);
      RowMatrixi negs = mode_negatives(Mode::shared_same_label, ids, labels, kN, kK, rng);
      std::vector<index_t> same;  // instances of query 0's label
      for (index_t j = 0; j < kN; ++j)
        if (labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(ids[0])]) same.push_back(j);
      REQUIRE(same.size() >= 2);
      for (index_t c = 0; c < 32; ++c) negs(0, c) = same[static_cast<std::size_t>(c) % same.size()];
      check_against_reference(eng, v, bank, f, ids, negs, pn, labels, Mode::shared_same_label);
      ++cases;
    }
  const std::vector<Variant> variants = all_variants();
  const auto supcon = std::count_if(variants.begin(), variants.end(),
                                    [](const Variant& v) { return v.obj == Objective::supcon; });
  CHECK(cases == static_cast<int>(static_cast<std::ptrdiff_t>(variants.size()) - supcon) * 2);
}

TEST_CASE("objectives: the label objectives with 300 and with 70,000 classes (2- and 4-byte class tables)") {
  // Guards the per-sample kernel's class table in each width: up to 256 classes it holds bytes (the
  // four-class cases above), up to 65,536 two bytes, beyond that int32. Labels j mod C; every query's
  // draws are half of its own label (other instances of its class) and half random, so the
  // same-label entries are many. Against the double reference, both samplers.
  std::mt19937_64 rng(65537);
  for (const index_t classes : {index_t{300}, index_t{70000}}) {
    const index_t n = 2 * classes + 7;
    std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) labels[static_cast<std::size_t>(j)] = (j % classes) * 3 - 5;
    for (const Variant& v : all_variants()) {
      if (!needs_labels(v.obj)) continue;
      for (bool alias : {false, true}) {
        INFO(describe(v, alias, Mode::per_sample) << ", " << classes << " classes");
        std::vector<double> pn;
        Engine eng = labelled_engine(n, 8, alias, config_of(v, Mode::per_sample, 16), 23, labels, &pn);
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(kB, n, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        RowMatrixi negs = mode_negatives(Mode::per_sample, ids, labels, n, kK, rng);
        int same = 0;
        for (index_t i = 0; i < kB; ++i)
          for (index_t c = 0; c < kK; c += 2) {  // an instance of the query's class: y + m C, m = 0, 1, 2
            const index_t base = ids[static_cast<std::size_t>(i)] % classes;
            const index_t j = base + classes * static_cast<index_t>(rng() % (base + 2 * classes < n ? 3 : 2));
            negs(i, c) = j;
            same += labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])];
          }
        REQUIRE(same == kB * ((kK + 1) / 2));
        check_against_reference(eng, v, bank, f, ids, negs, pn, labels, Mode::per_sample);
      }
    }
  }
}

TEST_CASE("objectives: supcon with shared negatives and exclude_same_label leaves the masked draws out") {
  // Shared negatives under exclude_same_label mask each query's same-label draws (lw = -inf, weight
  // 0). Those draws are then neither in supcon's denominator nor among its positives: the query has
  // no same-label draw, and supcon is infonce exactly (supcon.hpp's limit), finite.
  std::mt19937_64 rng(777);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  for (double tau : {0.07, 0.3})
    for (bool alias : {false, true}) {
      Variant v = variant("supcon", Objective::supcon);
      v.tau = tau;
      Variant info = variant("infonce", Objective::info_nce);
      info.tau = tau;
      INFO(describe(v, alias, Mode::shared_same_label) << " tau=" << tau);
      std::vector<double> pn;
      Engine eng = labelled_engine(kN, kD, alias, config_of(v, Mode::shared_same_label, 16), 17, labels, &pn);
      const RowMatrixf bank = eng.bank().to_matrix();
      const std::vector<index_t> ids = batch_ids(kB, kN, rng);
      const RowMatrixf f = mixed_features(bank, ids, rng);
      const RowMatrixi negs = mode_negatives(Mode::shared_same_label, ids, labels, kN, kK, rng);
      const Ref ref = reference(v, bank, f, make_queries(ids, negs, pn, labels, Mode::shared_same_label));
      RowMatrixf g(kB, kD);
      const StepStats st = eng.evaluate(f, ids, negs, g);
      Engine eng_info =
          labelled_engine(kN, kD, alias, config_of(info, Mode::shared_same_label, 16), 17, labels, nullptr);
      RowMatrixf gi(kB, kD);
      const StepStats si = eng_info.evaluate(f, ids, negs, gi);
      CAPTURE(st.loss);
      CAPTURE(ref.loss);
      CAPTURE(si.loss);
      CHECK(std::isfinite(st.loss));
      CHECK(rel_err(st.loss, ref.loss) < 1e-5);
      CHECK(grad_rel_err(g, ref.grad) < 1e-5);
      CHECK(rel_err(si.loss, ref.loss) < 1e-5);  // the reference is infonce's here
      CHECK(rel_err(st.loss, si.loss) < 1e-6);
    }
}

TEST_CASE("objectives: the reference cases exercise both branches of the clamps and hinges") {
  // Guards the test above against vacuity: dcl/hcl see clamped and unclamped queries, supcon /
  // contrastive / triplet see same-label draws, triplet has active and inactive triplets.
  std::mt19937_64 rng(31337);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  Bank bank0(kN, kD, 17);
  const RowMatrixf bank = bank0.to_matrix();
  const RowMatrixd V = bank.cast<double>();
  int clamped = 0, unclamped = 0, same = 0, draws = 0;
  for (int rep = 0; rep < 20; ++rep) {
    const std::vector<index_t> ids = batch_ids(kB, kN, rng);
    const RowMatrixf f = mixed_features(bank, ids, rng);
    const RowMatrixi negs = mode_negatives(Mode::per_sample, ids, labels, kN, kK, rng);
    for (index_t i = 0; i < kB; ++i) {
      const index_t y = ids[static_cast<std::size_t>(i)];
      const double tau = 0.07, tp = 0.1;
      const double e_pos = std::exp(V.row(y).dot(f.row(i).cast<double>()) / tau);
      double sum = 0.0;
      for (index_t k = 0; k < kK; ++k) {
        sum += std::exp(V.row(negs(i, k)).dot(f.row(i).cast<double>()) / tau);
        same += labels[static_cast<std::size_t>(negs(i, k))] == labels[static_cast<std::size_t>(y)];
        ++draws;
      }
      ((sum - tp * kK * e_pos) / (1.0 - tp) > kK * std::exp(-1.0 / tau) ? unclamped : clamped)++;
    }
  }
  CAPTURE(clamped);
  CAPTURE(unclamped);
  CHECK(clamped >= 5);
  CHECK(unclamped >= 5);
  CHECK(same > draws / 8);
  CHECK(same < draws / 2);
}

// =============================================================================================
// 2. Central differences of the engine's own loss.

namespace {

/// Negatives for query i picked so that every hinge (triplet: 2 (s_n - s_p) + alpha over every
/// positive / negative pair; contrastive: m - d of a negative) is at least `gap` from 0 for every
/// query of `rows_for` (all of the batch when shared).
bool pick_hinge_safe_negatives(const Variant& v, const RowMatrixd& V, const RowMatrixd& F,
                               std::span<const index_t> ids, const std::vector<std::int64_t>& labels, bool shared,
                               index_t k, double gap, std::mt19937_64& rng, RowMatrixi& out) {
  const index_t B = F.rows(), n = V.rows();
  const index_t rows = shared ? 1 : B;
  out.resize(rows, k);
  const double m = margin_of(v);
  std::vector<index_t> order(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) order[static_cast<std::size_t>(j)] = j;
  for (index_t r = 0; r < rows; ++r) {
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<index_t> queries;
    if (shared)
      for (index_t i = 0; i < B; ++i) queries.push_back(i);
    else
      queries.push_back(r);
    // per query: scores of its positives and of its negatives so far
    std::vector<std::vector<double>> pos(queries.size()), neg(queries.size());
    for (std::size_t t = 0; t < queries.size(); ++t)
      pos[t].push_back(V.row(ids[static_cast<std::size_t>(queries[t])]).dot(F.row(queries[t])));
    index_t got = 0;
    for (index_t j : order) {
      if (got == k) break;
      bool ok = true;
      for (std::size_t t = 0; t < queries.size() && ok; ++t) {
        const index_t i = queries[t];
        const double s = V.row(j).dot(F.row(i));
        const bool same = labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])];
        if (v.obj == Objective::triplet) {
          if (same) {
            for (double sn : neg[t]) ok = ok && std::abs(2.0 * (sn - s) + m) > gap;
          } else {
            for (double spp : pos[t]) ok = ok && std::abs(2.0 * (s - spp) + m) > gap;
          }
        } else if (v.obj == Objective::contrastive && !same) {
          ok = std::abs(m - std::sqrt(2.0 - 2.0 * s)) > gap;
        }
      }
      if (!ok) continue;
      for (std::size_t t = 0; t < queries.size(); ++t) {
        const index_t i = queries[t];
        const double s = V.row(j).dot(F.row(i));
        const bool same = labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])];
        (same ? pos[t] : neg[t]).push_back(s);
      }
      out(r, got++) = j;
    }
    if (got < k) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("objectives: central differences of the loss match grad . d") {
  // Guards dL/df of the single-pass objectives (one and two accumulators, online rescaling) and of
  // the positives-first one (triplet) through the engine's own loss, with no reference in between.
  std::vector<Variant> vs;
  {
    Variant v = variant("infonce", Objective::info_nce);
    v.tau = 0.1;
    vs.push_back(v);
  }
  {
    Variant v = variant("nce", Objective::nce);
    v.tau = 0.1;
    vs.push_back(v);
  }
  {
    Variant v = variant("dcl tau+=0.1", Objective::dcl);
    v.tau = 0.1;
    vs.push_back(v);
  }
  {
    Variant v = variant("hcl beta=2", Objective::hcl);
    v.tau = 0.1;
    v.beta = 2.0;
    vs.push_back(v);
  }
  // (hcl with detach_weights is not the gradient of its loss: the reference test holds it.)
  {
    Variant v = variant("dhel", Objective::dhel);
    v.tau = 0.1;
    vs.push_back(v);
  }
  vs.push_back(variant("kcl t=2 gamma=16", Objective::kcl));
  {
    Variant v = variant("supcon", Objective::supcon);
    v.tau = 0.1;
    vs.push_back(v);
  }
  vs.push_back(variant("contrastive", Objective::contrastive));
  {
    Variant v = variant("contrastive margin=1.3", Objective::contrastive);
    v.margin = 1.3;
    vs.push_back(v);
  }
  vs.push_back(variant("triplet", Objective::triplet));
  {
    Variant v = variant("triplet margin=0.5", Objective::triplet);
    v.margin = 0.5;
    vs.push_back(v);
  }

  constexpr index_t N = 1000, D = 24, B = 4, K = 37;
  constexpr double h = 1e-3;
  std::mt19937_64 rng(4711);
  const std::vector<std::int64_t> labels = four_class_labels(N, rng);
  for (const Variant& v : vs)
    for (bool alias : {false, true})
      for (Mode mode : {Mode::per_sample, Mode::shared}) {
        INFO(describe(v, alias, mode));
        EngineConfig cfg = config_of(v, mode, 16);
        cfg.unit_norm_tolerance = 0.1;
        std::vector<double> pn;
        Engine eng = labelled_engine(N, D, alias, cfg, 23, labels, &pn);
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(B, N, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        RowMatrixi negs;
        if (v.obj == Objective::triplet || v.obj == Objective::contrastive) {
          REQUIRE(pick_hinge_safe_negatives(v, bank.cast<double>(), f.cast<double>(), ids, labels, is_shared(mode), K,
                                            1e-2, rng, negs));
        } else {
          negs = mode_negatives(mode, ids, labels, N, K, rng);
        }
        RowMatrixf g(B, D);
        eng.evaluate(f, ids, negs, g);
        for (int dir = 0; dir < 3; ++dir) {
          CAPTURE(dir);
          RowMatrixd d = gaussian(B, D, rng).cast<double>();
          d /= d.norm();
          const RowMatrixf fp = (f.cast<double>() + h * d).cast<float>();
          const RowMatrixf fm = (f.cast<double>() - h * d).cast<float>();
          RowMatrixf gp(B, D), gm(B, D);
          const double lp = eng.evaluate(fp, ids, negs, gp).loss;
          const double lm = eng.evaluate(fm, ids, negs, gm).loss;
          // the perturbation the engine saw (after rounding to float)
          const RowMatrixd delta = fp.cast<double>() - fm.cast<double>();
          const double fd = (lp - lm) / (2.0 * h);
          const double an = (g.cast<double>().array() * delta.array()).sum() / (2.0 * h);
          CAPTURE(fd);
          CAPTURE(an);
          // float scores put ~1e-4 |g| of noise into the difference quotient (measured: <= 9e-5 |g|)
          CHECK(std::abs(fd - an) <= 1e-3 * std::abs(an) + 4e-4 * g.cast<double>().norm());
        }
      }
}

// =============================================================================================
// 3. Thread counts.

TEST_CASE("objectives: 1 and 2 OpenMP threads give bit-identical loss and gradient") {
  // Guards that no objective's result depends on how queries, blocks or GEMM tiles fall to threads.
  constexpr index_t N = 3000, D = 32, B = 40, K = 101;
  std::mt19937_64 lrng(99);
  const std::vector<std::int64_t> labels = four_class_labels(N, lrng);
  struct Out {
    std::vector<double> loss;
    std::vector<RowMatrixf> grad;
  };
  auto run = [&](int threads, const Variant& v, Mode mode, bool alias) {
    ThreadCount tc(threads);
    Out o;
    Engine eng = labelled_engine(N, D, alias, config_of(v, mode, K), 61, labels, nullptr);
    std::mt19937_64 rng(1234);
    for (int s = 0; s < 2; ++s) {
      const std::vector<index_t> ids = batch_ids(B, N, rng);
      const RowMatrixf f = mixed_features(eng.bank().to_matrix(), ids, rng);
      RowMatrixf g(B, D);
      o.loss.push_back(eng.step(f, ids, g).loss);
      o.grad.push_back(g);
    }
    return o;
  };
  const int saved = omp_get_max_threads();
  for (const Variant& v : all_variants())
    for (Mode mode : {Mode::per_sample, Mode::shared, Mode::per_sample_same_label, Mode::shared_exclude_positive}) {
      const bool alias = mode != Mode::shared_exclude_positive;
      INFO(describe(v, alias, mode));
      const Out a = run(1, v, mode, alias);
      const Out b = run(2, v, mode, alias);
      for (std::size_t s = 0; s < a.loss.size(); ++s) {
        CAPTURE(s);
        CHECK(bits_equal(a.loss[s], b.loss[s]));
        CHECK(bits_equal(a.grad[s], b.grad[s]));
      }
    }
  CHECK(omp_get_max_threads() == saved);
}

// =============================================================================================
// 4. Limits.

namespace {

struct Eval {
  double loss;
  RowMatrixf grad;
  StepStats stats;
};

Eval evaluate_with(const Variant& v, Mode mode, bool alias, const std::vector<std::int64_t>& labels,
                   std::span<const index_t> ids, const RowMatrixf& f, const RowMatrixi& negs) {
  Engine eng = labelled_engine(kN, kD, alias, config_of(v, mode, 16), 17, labels, nullptr);
  Eval e;
  e.grad.resize(f.rows(), f.cols());
  e.stats = eng.evaluate(f, ids, negs, e.grad);
  e.loss = e.stats.loss;
  return e;
}

double grad_rel(const RowMatrixf& a, const RowMatrixf& b) {
  return (a.cast<double>() - b.cast<double>()).norm() / b.cast<double>().norm();
}

}  // namespace

TEST_CASE("objectives: dcl at tau_plus = 0 under the uniform sampler is infonce") {
  std::mt19937_64 rng(501);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  for (Mode mode : {Mode::per_sample, Mode::shared, Mode::per_sample_exclude_positive})
    for (double tau : {0.07, 0.3}) {
      INFO(mode_name(mode) << " tau=" << tau);
      Variant dcl = variant("dcl", Objective::dcl);
      dcl.tau_plus = 0.0;
      dcl.tau = tau;
      Variant info = variant("infonce", Objective::info_nce);
      info.tau = tau;
      const std::vector<index_t> ids = batch_ids(kB, kN, rng);
      const RowMatrixf f = mixed_features(bank, ids, rng);
      const RowMatrixi negs = mode_negatives(mode, ids, {}, kN, kK, rng);
      const Eval a = evaluate_with(dcl, mode, false, {}, ids, f, negs);
      const Eval b = evaluate_with(info, mode, false, {}, ids, f, negs);
      CHECK(rel_err(a.loss, b.loss) < 1e-6);
      CHECK(grad_rel(a.grad, b.grad) < 1e-6);
      CHECK(rel_err(a.stats.mean_p_positive, b.stats.mean_p_positive) < 1e-6);
    }
}

TEST_CASE("objectives: hcl at beta = 0 is dcl for either sampler") {
  std::mt19937_64 rng(502);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  for (bool alias : {false, true})
    for (bool detach : {false, true})
      for (Mode mode : {Mode::per_sample, Mode::shared})
        for (double tp : {0.0, 0.1}) {
          INFO((alias ? "alias " : "uniform ") << (detach ? "detached " : "") << mode_name(mode) << " tau+=" << tp);
          Variant dcl = variant("dcl", Objective::dcl);
          dcl.tau_plus = tp;
          Variant hcl = variant("hcl", Objective::hcl);
          hcl.tau_plus = tp;
          hcl.beta = 0.0;
          hcl.detach = detach;
          const std::vector<index_t> ids = batch_ids(kB, kN, rng);
          const RowMatrixf f = mixed_features(bank, ids, rng);
          const RowMatrixi negs = mode_negatives(mode, ids, {}, kN, kK, rng);
          const Eval a = evaluate_with(hcl, mode, alias, {}, ids, f, negs);
          const Eval b = evaluate_with(dcl, mode, alias, {}, ids, f, negs);
          CHECK(rel_err(a.loss, b.loss) < 1e-6);
          CHECK(grad_rel(a.grad, b.grad) < 1e-6);
        }
}

TEST_CASE("objectives: supcon with no same-label draw is infonce") {
  std::mt19937_64 rng(503);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  for (bool alias : {false, true})
    for (Mode mode : {Mode::per_sample, Mode::shared}) {
      INFO((alias ? "alias " : "uniform ") << mode_name(mode));
      std::vector<index_t> ids = batch_ids(kB, kN, rng);
      if (mode == Mode::shared)  // every query of one label: the shared draws avoid it
        for (auto& y : ids)
          while (labels[static_cast<std::size_t>(y)] != labels[static_cast<std::size_t>(ids[0])]) y = (y + 1) % kN;
      const RowMatrixf f = mixed_features(bank, ids, rng);
      // negatives of other labels (per-sample mode_negatives under the same-label rule), no exclusion flag
      RowMatrixi negs = mode_negatives(Mode::per_sample_same_label, ids, labels, kN, kK, rng);
      if (mode == Mode::shared) negs = negs.topRows(1).eval();
      Variant sup = variant("supcon", Objective::supcon);
      Variant info = variant("infonce", Objective::info_nce);
      const Eval a = evaluate_with(sup, mode, alias, labels, ids, f, negs);
      const Eval b = evaluate_with(info, mode, alias, labels, ids, f, negs);
      CHECK(rel_err(a.loss, b.loss) < 1e-6);
      CHECK(grad_rel(a.grad, b.grad) < 1e-6);
      CHECK(rel_err(a.stats.mean_p_positive, b.stats.mean_p_positive) < 1e-6);
    }
}

TEST_CASE("objectives: dhel's loss is infonce's minus log(1 + e^l_pos / sum_j e^l_j) under the uniform sampler") {
  std::mt19937_64 rng(504);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  const RowMatrixd V = bank.cast<double>();
  for (Mode mode : {Mode::per_sample, Mode::shared})
    for (double tau : {0.07, 0.5}) {
      INFO(mode_name(mode) << " tau=" << tau);
      Variant dhel = variant("dhel", Objective::dhel);
      dhel.tau = tau;
      Variant info = variant("infonce", Objective::info_nce);
      info.tau = tau;
      const std::vector<index_t> ids = batch_ids(kB, kN, rng);
      const RowMatrixf f = mixed_features(bank, ids, rng);
      const RowMatrixi negs = mode_negatives(mode, ids, {}, kN, kK, rng);
      const Eval a = evaluate_with(dhel, mode, false, {}, ids, f, negs);
      const Eval b = evaluate_with(info, mode, false, {}, ids, f, negs);
      double correction = 0.0;  // mean_i log(1 + e^{l_pos} / sum_j e^{l_j}), l = s / tau (lw = 0)
      for (index_t i = 0; i < kB; ++i) {
        const RowMatrixd fi = f.row(i).cast<double>();
        const double l_pos = V.row(ids[static_cast<std::size_t>(i)]).dot(fi.row(0)) / tau;
        double sum = 0.0;
        for (index_t k = 0; k < kK; ++k)
          sum += std::exp(V.row(is_shared(mode) ? negs(0, k) : negs(i, k)).dot(fi.row(0)) / tau - l_pos);
        correction += std::log1p(1.0 / sum) / kB;
      }
      CAPTURE(a.loss);
      CAPTURE(b.loss);
      CAPTURE(correction);
      CHECK(std::abs(a.loss - (b.loss - correction)) < 2e-6 * (std::abs(a.loss) + std::abs(b.loss) + correction));
    }
}

TEST_CASE("objectives: kcl at gamma = 0 is the alignment term alone") {
  std::mt19937_64 rng(505);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  const RowMatrixd V = bank.cast<double>();
  for (bool alias : {false, true})
    for (Mode mode : {Mode::per_sample, Mode::shared})
      for (double t : {0.5, 2.0, 5.0}) {
        INFO((alias ? "alias " : "uniform ") << mode_name(mode) << " t=" << t);
        Variant kcl = variant("kcl", Objective::kcl);
        kcl.gamma = 0.0;
        kcl.kernel_t = t;
        const std::vector<index_t> ids = batch_ids(kB, kN, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        const RowMatrixi negs = mode_negatives(mode, ids, {}, kN, kK, rng);
        const Eval a = evaluate_with(kcl, mode, alias, {}, ids, f, negs);
        double loss = 0.0;
        RowMatrixd grad = RowMatrixd::Zero(kB, kD);
        for (index_t i = 0; i < kB; ++i) {
          const index_t y = ids[static_cast<std::size_t>(i)];
          const double k_pos = std::exp(2.0 * t * (V.row(y).dot(f.row(i).cast<double>()) - 1.0));
          loss -= k_pos / kB;
          grad.row(i) = -2.0 * t * k_pos * V.row(y) / static_cast<double>(kB);
        }
        CHECK(rel_err(a.loss, loss) < 1e-5);
        CHECK(grad_rel_err(a.grad, grad) < 1e-5);
      }
}

// =============================================================================================
// 5. supcon's coefficients on an orthonormal bank.

TEST_CASE("objectives: supcon gives same-label draws a positive coefficient and never a negative one") {
  // The bank's rows are the unit vectors e_0..e_63, so the gradient's component along e_j is the
  // coefficient of the entry with row j: same-label draws must get (p_j - 1/|P|) / (B tau), which is
  // below the p_j / (B tau) a negative gets; other draws p_j / (B tau).
  constexpr index_t D = 64, K = 16, B = 2;
  const double tau = 0.1;
  const RowMatrixf eye = RowMatrixf::Identity(D, D);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(D));
  for (index_t j = 0; j < D; ++j) labels[static_cast<std::size_t>(j)] = j % 3;
  const std::vector<index_t> ids = {21, 34};  // labels 0 and 1; neither is among the draws 0..15
  std::mt19937_64 rng(506);
  for (Mode mode : {Mode::per_sample, Mode::shared}) {
    INFO(mode_name(mode));
    EngineConfig cfg = config_of(variant("supcon", Objective::supcon), mode, K);
    cfg.tau = tau;
    Engine eng(Bank::from_rows(eye), std::make_unique<UniformSampler>(D), cfg, labels);
    REQUIRE(bits_equal(eng.bank().to_matrix(), eye));
    RowMatrixf f = gaussian(B, D, rng);
    normalize_rows(f);
    RowMatrixi negs(is_shared(mode) ? 1 : B, K);
    for (index_t r = 0; r < negs.rows(); ++r) {
      std::vector<index_t> perm(K);
      for (index_t j = 0; j < K; ++j) perm[static_cast<std::size_t>(j)] = j;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (index_t j = 0; j < K; ++j) negs(r, j) = perm[static_cast<std::size_t>(j)];
    }
    RowMatrixf g(B, D);
    eng.evaluate(f, ids, negs, g);
    for (index_t i = 0; i < B; ++i) {
      CAPTURE(i);
      const index_t y = ids[static_cast<std::size_t>(i)];
      // softmax over the positive and the K draws (lw = 0 under the uniform sampler)
      double mx = f(i, y) / tau;
      for (index_t j = 0; j < K; ++j) mx = std::max(mx, static_cast<double>(f(i, j)) / tau);
      double z = std::exp(f(i, y) / tau - mx);
      for (index_t j = 0; j < K; ++j) z += std::exp(f(i, j) / tau - mx);
      auto p = [&](index_t j) { return std::exp(static_cast<double>(f(i, j)) / tau - mx) / z; };
      double n_pos = 1.0;
      for (index_t j = 0; j < K; ++j) n_pos += labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(y)];
      REQUIRE(n_pos >= 3.0);  // some same-label draws besides the own row
      const double scale = 1.0 / (static_cast<double>(B) * tau);
      int same_seen = 0, other_seen = 0;
      for (index_t j = 0; j < D; ++j) {
        CAPTURE(j);
        double want = 0.0;
        if (j < K) {
          const bool same = labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(y)];
          want = (p(j) - (same ? 1.0 / n_pos : 0.0)) * scale;
          if (same) {
            ++same_seen;
            CHECK(g(i, j) < p(j) * scale - 0.5 / n_pos * scale);  // well below a negative's coefficient
          } else {
            ++other_seen;
          }
        } else if (j == y) {
          want = (p(y) - 1.0 / n_pos) * scale;
        }
        CHECK(std::abs(g(i, j) - want) <= 1e-6 * scale);
      }
      CHECK(same_seen == static_cast<int>(n_pos) - 1);
      CHECK(other_seen == K - (static_cast<int>(n_pos) - 1));
    }
  }
}

// =============================================================================================
// 6. exclude_same_label.

TEST_CASE("objectives: exclude_same_label draws avoid the query's label and condition P_n") {
  std::mt19937_64 rng(601);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  for (bool alias : {false, true}) {
    INFO(std::string(alias ? "alias" : "uniform"));
    // sample(): never the query's label, in range, and a pure function of (ids, step)
    {
      Engine eng = labelled_engine(kN, kD, alias, config_of(variant("infonce", Objective::info_nce),
                                                           Mode::per_sample_same_label, kK), 17, labels, nullptr);
      for (std::int64_t step = 0; step < 5; ++step) {
        const std::vector<index_t> ids = batch_ids(8, kN, rng);
        const RowMatrixi negs = eng.sample(ids, step);
        REQUIRE(negs.rows() == 8);
        REQUIRE(negs.cols() == kK);
        for (index_t i = 0; i < negs.rows(); ++i)
          for (index_t c = 0; c < kK; ++c) {
            REQUIRE(negs(i, c) >= 0);
            REQUIRE(negs(i, c) < kN);
            CHECK(labels[static_cast<std::size_t>(negs(i, c))] != labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])]);
          }
        CHECK(bits_equal(eng.sample(ids, step), negs));
      }
    }
    // step(): the reference over what sample() predicts, with q' = P_n / (1 - mass of the label)
    for (const Variant& v : all_variants()) {
      INFO(v.name);
      std::vector<double> pn;
      Engine eng = labelled_engine(kN, kD, alias, config_of(v, Mode::per_sample_same_label, kK), 17, labels, &pn);
      for (int s = 0; s < 2; ++s) {
        CAPTURE(s);
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = batch_ids(kB, kN, rng);
        const RowMatrixf f = mixed_features(bank, ids, rng);
        const RowMatrixi negs = eng.sample(ids, eng.steps_done());
        const Ref ref = reference(v, bank, f, make_queries(ids, negs, pn, labels, Mode::per_sample_same_label));
        RowMatrixf g(kB, kD);
        const StepStats st = eng.step(f, ids, g);
        CHECK(st.step == s);
        CHECK(rel_err(st.loss, ref.loss) < 1e-5);
        CHECK(grad_rel_err(g, ref.grad) < 1e-5);
        // the conditioning matters for the importance-weighted objectives
        if (v.obj == Objective::info_nce || v.obj == Objective::kcl || v.obj == Objective::nce) {
          const Ref plain = reference(v, bank, f, make_queries(ids, negs, pn, labels, Mode::per_sample));
          CHECK(rel_err(plain.loss, ref.loss) > 1e-3);
        }
      }
    }
  }
}

TEST_CASE("objectives: the engine refuses missing or wrong labels and same-label caller negatives") {
  std::mt19937_64 rng(602);
  const std::vector<std::int64_t> labels = four_class_labels(kN, rng);
  const std::vector<index_t> ids = batch_ids(kB, kN, rng);
  const RowMatrixf bank = Bank(kN, kD, 17).to_matrix();
  const RowMatrixf f = mixed_features(bank, ids, rng);
  RowMatrixf g(kB, kD);
  for (Objective obj : {Objective::supcon, Objective::contrastive, Objective::triplet})
    for (Mode mode : {Mode::per_sample, Mode::shared}) {
      INFO(to_string(obj) << " " << mode_name(mode));
      Engine eng = make_engine(kN, kD, false, config_of(variant("x", obj), mode, 16), 17);
      const RowMatrixi negs = mode_negatives(mode, ids, {}, kN, kK, rng);
      const std::string m1 = message_of([&] { eng.step(f, ids, g); });
      CHECK(mentions(m1, "labels"));
      CHECK(mentions(message_of([&] { eng.evaluate(f, ids, negs, g); }), "labels"));
      CHECK(mentions(message_of([&] { eng.step_with_negatives(f, ids, negs, g); }), "labels"));
      CHECK(eng.steps_done() == 0);
      CHECK(bits_equal(eng.bank().to_matrix(), bank));
      // with labels the same calls succeed
      eng.set_labels(labels);
      CHECK(std::isfinite(eng.evaluate(f, ids, negs, g).loss));
    }
  {
    INFO("exclude_same_label without labels");
    Engine eng = make_engine(kN, kD, false, config_of(variant("infonce", Objective::info_nce),
                                                      Mode::per_sample_same_label, 16), 17);
    CHECK(mentions(message_of([&] { eng.step(f, ids, g); }), "labels"));
    CHECK(mentions(message_of([&] { (void)eng.sample(ids, 0); }), "labels"));
    CHECK(eng.steps_done() == 0);
  }
  {
    INFO("labels of the wrong length");
    std::vector<std::int64_t> short_labels(labels.begin(), labels.end() - 1);
    const std::string m = message_of([&] {
      Engine e(Bank(kN, kD, 17), std::make_unique<UniformSampler>(kN),
               config_of(variant("supcon", Objective::supcon), Mode::per_sample, 16), short_labels);
    });
    CHECK(mentions(m, "labels"));
    Engine eng = make_engine(kN, kD, false, config_of(variant("supcon", Objective::supcon), Mode::per_sample, 16), 17);
    eng.set_labels(labels);
    std::vector<std::int64_t> long_labels = labels;
    long_labels.push_back(1);
    CHECK(mentions(message_of([&] { eng.set_labels(long_labels); }), "labels"));
    CHECK(mentions(message_of([&] { eng.set_labels(short_labels); }), "labels"));
    CHECK(eng.labels() == labels);  // unchanged
  }
  {
    INFO("caller negatives with the query's label under exclude_same_label");
    for (const Variant& v : {variant("infonce", Objective::info_nce), variant("supcon", Objective::supcon),
                             variant("triplet", Objective::triplet)}) {
      INFO(v.name);
      Engine eng = labelled_engine(kN, kD, true, config_of(v, Mode::per_sample_same_label, 16), 17, labels, nullptr);
      RowMatrixi negs = mode_negatives(Mode::per_sample_same_label, ids, labels, kN, kK, rng);
      CHECK(std::isfinite(eng.evaluate(f, ids, negs, g).loss));  // admissible as they are
      // one negative of query 3 with query 3's label
      index_t j = 0;
      while (labels[static_cast<std::size_t>(j)] != labels[static_cast<std::size_t>(ids[3])]) ++j;
      negs(3, 30) = j;
      CHECK(mentions(message_of([&] { eng.evaluate(f, ids, negs, g); }), "label"));
      CHECK(mentions(message_of([&] { eng.step_with_negatives(f, ids, negs, g); }), "label"));
      CHECK(eng.steps_done() == 0);
      CHECK(bits_equal(eng.bank().to_matrix(), bank));
    }
  }
}
