// DynamicSampler: the distribution of the draws after many weight changes (chi-square against a
// naive double reference kept here), the reported probabilities, rebuild-from-weights identity,
// refused input, thread-count independence, and the engine with a dynamic sampler (loss and gradient
// against the double reference, caller-set and engine-driven weights, snapshot resume).
#include "reference.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>

#include <membank/dynamic_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <hdf5.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

/// 0.999 quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty).
double chi2_q999(int df) {
  const double z = 3.090232306167813;
  const double a = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

/// A naive reference of the sampler's distribution: the weights in double, P_n = w / sum(w).
struct NaiveWeights {
  std::vector<double> w;
  void set(std::span<const index_t> ids, std::span<const double> v) {
    for (std::size_t k = 0; k < ids.size(); ++k) w[static_cast<std::size_t>(ids[k])] = v[k];
  }
  std::vector<double> p() const {
    double s = 0;
    for (const double x : w) s += x;
    std::vector<double> out(w.size());
    for (std::size_t j = 0; j < w.size(); ++j) out[j] = w[j] / s;
    return out;
  }
};

/// `changes` random calls of set_weights on both the sampler and the reference: each call sets 1-20
/// random rows to a weight in [0, 5) (a tenth of them exactly zero, rows stay drawable in aggregate).
void random_changes(DynamicSampler& s, NaiveWeights& ref, int changes, std::mt19937_64& rng) {
  std::uniform_int_distribution<index_t> row(0, s.size() - 1);
  std::uniform_int_distribution<int> count(1, 20);
  std::uniform_real_distribution<double> value(0.0, 5.0);
  for (int c = 0; c < changes; ++c) {
    std::vector<index_t> ids(static_cast<std::size_t>(count(rng)));
    std::vector<double> v(ids.size());
    for (std::size_t k = 0; k < ids.size(); ++k) {
      ids[k] = row(rng);
      v[k] = (rng() % 10 == 0) ? 0.0 : value(rng);
    }
    s.set_weights(ids, v);
    ref.set(ids, v);
  }
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

}  // namespace

TEST_CASE("DynamicSampler draws follow P_n after thousands of random weight changes (chi-square)") {
  // Guards the blocked alias (top level over block masses, a table per block) and its partial
  // rebuilds: N = 700 (six blocks, the last one partial), 3000 random set_weights calls, then
  // 400,000 draws binned against a naive double w / sum(w). Every drawn id has w > 0, and the
  // Pearson statistic stays below the 0.999 quantile.
  std::mt19937_64 rng(41);
  const index_t n = 700;
  NaiveWeights ref{random_weights(n, rng)};
  DynamicSampler s(ref.w);
  random_changes(s, ref, 3000, rng);
  // A whole block of zero weights: never drawn.
  std::vector<index_t> zero_block;
  for (index_t j = 256; j < 384; ++j) zero_block.push_back(j);
  const std::vector<double> zeros(zero_block.size(), 0.0);
  s.set_weights(zero_block, zeros);
  ref.set(zero_block, zeros);
  const std::vector<double> p = ref.p();
  std::vector<std::int64_t> counts(static_cast<std::size_t>(n), 0);
  std::vector<index_t> ids(2000);
  std::vector<float> log_pn(2000);
  std::int64_t total = 0;
  bool pn_ok = true;
  for (std::uint32_t c = 0; c < 200; ++c) {
    s.draw(StreamKey{99, c, c % 7, 0}, std::span<const index_t>{}, ids, log_pn);
    for (std::size_t k = 0; k < ids.size(); ++k) {
      REQUIRE(ids[k] >= 0);
      REQUIRE(ids[k] < n);
      ++counts[static_cast<std::size_t>(ids[k])];
      const double pj = p[static_cast<std::size_t>(ids[k])];
      if (!(pj > 0) || std::abs(std::exp(double(log_pn[k])) - pj) > 2e-6 * pj) pn_ok = false;
    }
    total += static_cast<std::int64_t>(ids.size());
  }
  CHECK(pn_ok);
  double x = 0;
  int cells = 0;
  for (std::size_t j = 0; j < p.size(); ++j) {
    if (p[j] <= 0) {
      CHECK(counts[j] == 0);
      continue;
    }
    const double e = p[j] * static_cast<double>(total);
    x += (static_cast<double>(counts[j]) - e) * (static_cast<double>(counts[j]) - e) / e;
    ++cells;
  }
  CHECK(x < chi2_q999(cells - 1));
}

TEST_CASE("DynamicSampler prob, probs and lookup equal the naive reference after weight changes") {
  // Guards P_n(j) = w_j / T through updates: prob() and probs() within 1e-12 relative of the naive
  // double w / sum(w) (the sums are associated differently), exactly 0 for zero weights, and lookup()
  // within fp32 rounding of log P_n (-inf for zero weights).
  std::mt19937_64 rng(42);
  const index_t n = 1000;
  NaiveWeights ref{random_weights(n, rng)};
  DynamicSampler s(ref.w);
  random_changes(s, ref, 2000, rng);
  const std::vector<double> p = ref.p();
  const std::vector<double> got = s.probs();
  std::vector<index_t> all(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) all[static_cast<std::size_t>(j)] = j;
  std::vector<float> log_pn(all.size());
  s.lookup(all, log_pn);
  int bad = 0;
  for (index_t j = 0; j < n; ++j) {
    const auto u = static_cast<std::size_t>(j);
    if (p[u] == 0) {
      if (got[u] != 0 || s.prob(j) != 0 || !std::isinf(log_pn[u])) ++bad;
      continue;
    }
    if (rel_err(got[u], p[u]) > 1e-12 || rel_err(s.prob(j), p[u]) > 1e-12) ++bad;
    if (std::abs(double(log_pn[u]) - std::log(p[u])) > 1e-6 * std::max(1.0, std::abs(std::log(p[u])))) ++bad;
  }
  CHECK(bad == 0);
  CHECK(s.kind() == SamplerKind::dynamic);
  CHECK(same_bits(s.weights(), ref.w));
}

TEST_CASE("DynamicSampler rebuilt from its weights is bit-identical to the incrementally updated one") {
  // Guards what snapshots rely on: every table is a pure function of the current weights, so a
  // sampler constructed from weights() after 1500 updates gives the same P_n bits, the same total and
  // the same draws (ids and log P_n bit for bit), with and without an exclusion.
  std::mt19937_64 rng(43);
  NaiveWeights ref{random_weights(900, rng)};
  DynamicSampler s(ref.w);
  random_changes(s, ref, 1500, rng);
  const DynamicSampler rebuilt(s.weights());
  CHECK(same_bits(s.probs(), rebuilt.probs()));
  CHECK(bits_equal(s.total(), rebuilt.total()));
  CHECK(s.fingerprint() == rebuilt.fingerprint());
  std::vector<index_t> excluded{3, 100, 500};
  for (const bool exclude : {false, true}) {
    std::vector<index_t> a(5000), b(5000);
    std::vector<float> pa(5000), pb(5000);
    const std::span<const index_t> ex = exclude ? std::span<const index_t>(excluded) : std::span<const index_t>{};
    s.draw(StreamKey{1, 2, 3, 0}, ex, a, pa);
    rebuilt.draw(StreamKey{1, 2, 3, 0}, ex, b, pb);
    CHECK(a == b);
    CHECK(std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)) == 0);
    if (exclude) CHECK_FALSE(std::any_of(a.begin(), a.end(), [&](index_t j) { return j == 3 || j == 100 || j == 500; }));
  }
}

TEST_CASE("DynamicSampler draw_next pieces equal one draw, and draws are a pure function of the key") {
  // Guards the cursor contract the engine's kernels rely on, with and without exclusions.
  std::mt19937_64 rng(44);
  DynamicSampler s(random_weights(300, rng));
  NaiveWeights ref{s.weights()};
  random_changes(s, ref, 100, rng);
  std::vector<index_t> excluded;
  for (index_t j = 0; j < 300; j += 3) excluded.push_back(j);
  for (const Exclusion& e : {Exclusion{}, Exclusion{excluded}}) {
    constexpr std::size_t k = 1000;
    const StreamKey key{3, 4, 5, 2};
    std::vector<index_t> whole(k), pieces(k);
    std::vector<float> whole_p(k), pieces_p(k);
    s.draw(key, e, whole, whole_p);
    DrawCursor cursor{key, e, static_cast<index_t>(k)};
    std::uniform_int_distribution<std::size_t> size(0, 40);
    for (std::size_t at = 0; at < k;) {
      const std::size_t m = std::min(size(rng), k - at);
      s.draw_next(cursor, std::span(pieces).subspan(at, m), std::span(pieces_p).subspan(at, m));
      at += m;
    }
    CHECK(pieces == whole);
    CHECK(std::memcmp(pieces_p.data(), whole_p.data(), k * sizeof(float)) == 0);
    std::vector<index_t> again(k);
    s.draw(key, e, again, pieces_p);
    CHECK(again == whole);
    s.draw(StreamKey{3, 5, 5, 2}, e, again, pieces_p);
    CHECK(again != whole);
  }
}

TEST_CASE("DynamicSampler refuses bad weights naming the first bad index and value, changing nothing") {
  // Guards the validation of the constructor and set_weights: out-of-range ids, negative, NaN and
  // infinite weights, mismatched lengths, and an update that would leave no mass are one Error each,
  // and the sampler's weights, total and draws are unchanged afterwards.
  std::mt19937_64 rng(45);
  DynamicSampler s(random_weights(200, rng));
  const std::vector<double> w0 = s.weights();
  const std::uint64_t f0 = s.fingerprint();
  const std::vector<index_t> ids{5, 7, 9};
  CHECK(mentions(message_of([&] { s.set_weights(std::vector<index_t>{5, 200, 9}, std::vector<double>{1, 1, 1}); }),
                 "200"));
  CHECK(message_of([&] { s.set_weights(ids, std::vector<double>{1, -2.5, 1}); }).find("-2.5") != std::string::npos);
  CHECK(mentions(message_of([&] { s.set_weights(ids, std::vector<double>{1, 1, std::nan("")}); }), "nan"));
  CHECK(mentions(message_of([&] { s.set_weights(ids, std::vector<double>{HUGE_VAL, 1, 1}); }), "inf"));
  CHECK_THROWS_AS(s.set_weights(ids, std::vector<double>{1, 1}), Error);
  std::vector<index_t> all(200);
  for (index_t j = 0; j < 200; ++j) all[static_cast<std::size_t>(j)] = j;
  CHECK(mentions(message_of([&] { s.set_weights(all, std::vector<double>(200, 0.0)); }), "sum"));
  CHECK(same_bits(s.weights(), w0));
  CHECK(s.fingerprint() == f0);
  CHECK(same_bits(s.probs(), DynamicSampler(w0).probs()));
  CHECK_THROWS_AS(DynamicSampler(std::vector<double>{}), Error);
  CHECK_THROWS_AS(DynamicSampler(std::vector<double>(10, 0.0)), Error);
  CHECK(message_of([] { DynamicSampler(std::vector<double>{1, 2, -1}); }).find("weights[2] = -1") != std::string::npos);
  CHECK(mentions(message_of([] {
    DynamicSampler::Params p;
    p.alpha = 1.0;
    DynamicSampler(std::vector<double>{1, 2}, p);
  }), "alpha"));
  CHECK(mentions(message_of([] {
    DynamicSampler::Params p;
    p.floor = 0.0;
    DynamicSampler(std::vector<double>{1, 2}, p);
  }), "floor"));
}

TEST_CASE("DynamicSampler loss_ema: the per-row average and the weights it sets") {
  // Guards observe(): the first loss of a row sets its average, later ones blend with alpha, a row
  // repeated in a batch takes both in batch order, w = floor + max(ema, 0), unseen rows keep their
  // weight, non-finite losses are refused with nothing changed, and the drive none ignores losses.
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  p.alpha = 0.75;
  p.floor = 0.5;
  DynamicSampler s(std::vector<double>(300, 1.0), p);
  s.observe(std::vector<index_t>{4, 9, 4}, std::vector<double>{2.0, -3.0, 6.0});
  CHECK(s.ema()[4] == 0.75 * 2.0 + 0.25 * 6.0);
  CHECK(s.ema()[9] == -3.0);
  CHECK(std::isnan(s.ema()[5]));
  CHECK(s.weights()[4] == 0.5 + 3.0);
  CHECK(s.weights()[9] == 0.5);
  CHECK(s.weights()[5] == 1.0);
  const std::vector<double> w = s.weights();
  CHECK_THROWS_AS(s.observe(std::vector<index_t>{4, 5}, std::vector<double>{1.0, std::nan("")}), Error);
  CHECK(same_bits(s.weights(), w));
  CHECK(s.ema()[4] == 3.0);
  DynamicSampler plain(std::vector<double>(10, 1.0));
  plain.observe(std::vector<index_t>{1}, std::vector<double>{5.0});
  CHECK(plain.weights()[1] == 1.0);
  CHECK(plain.ema().empty());
  // The saved state restores it exactly.
  const DynamicSampler restored(s.weights(), s.params(), s.ema());
  CHECK(restored.fingerprint() == s.fingerprint());
}

TEST_CASE("DynamicSampler draws are identical for 1 and 2 threads") {
  // Guards thread-count independence of the draws: streams drawn by an OpenMP team of one and of two
  // threads (each stream by whichever thread takes it) are the same bits.
  std::mt19937_64 rng(46);
  DynamicSampler s(random_weights(5000, rng));
  NaiveWeights ref{s.weights()};
  random_changes(s, ref, 200, rng);
  auto run = [&](int threads) {
    std::vector<index_t> ids(64 * 500);
    std::vector<float> lp(ids.size());
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int r = 0; r < 64; ++r)
      s.draw(StreamKey{7, 1, static_cast<std::uint32_t>(r), 0}, std::span<const index_t>{},
             std::span(ids).subspan(static_cast<std::size_t>(r) * 500, 500),
             std::span(lp).subspan(static_cast<std::size_t>(r) * 500, 500));
    return std::make_pair(ids, lp);
  };
  const auto a = run(1), b = run(2);
  CHECK(a.first == b.first);
  CHECK(std::memcmp(a.second.data(), b.second.data(), a.second.size() * sizeof(float)) == 0);
}

// ---------------------------------------------------------------------------------------------
// The engine with a dynamic sampler

namespace {

constexpr index_t kN = 600, kD = 16, kB = 12, kK = 40;

/// An engine over Bank(kN, kD, seed) with a dynamic sampler of random weights (`params` its drive).
Engine dynamic_engine(const EngineConfig& cfg, std::uint64_t seed, DynamicSampler::Params params = {}) {
  std::mt19937_64 rng(seed);
  return Engine(Bank(kN, kD, seed), std::make_unique<DynamicSampler>(random_weights(kN, rng), params), cfg);
}

const DynamicSampler& dyn(const Engine& e) { return dynamic_cast<const DynamicSampler&>(e.sampler()); }

/// A step's inputs drawn from `rng`: distinct ids, unit features near their rows.
struct Batch {
  std::vector<index_t> ids;
  RowMatrixf f;
};
Batch batch_of(const Engine& e, std::mt19937_64& rng) {
  Batch b;
  std::vector<index_t> all(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) all[static_cast<std::size_t>(j)] = j;
  std::shuffle(all.begin(), all.end(), rng);
  b.ids.assign(all.begin(), all.begin() + kB);
  b.f = near_rows(e.bank().to_matrix(), b.ids, 0.3, rng);
  return b;
}

/// A random update of 30 rows' weights.
std::pair<std::vector<index_t>, std::vector<double>> weight_update(std::mt19937_64& rng) {
  std::uniform_int_distribution<index_t> row(0, kN - 1);
  std::uniform_real_distribution<double> value(0.05, 4.0);
  std::vector<index_t> ids(30);
  std::vector<double> w(30);
  for (std::size_t k = 0; k < ids.size(); ++k) {
    ids[k] = row(rng);
    w[k] = value(rng);
  }
  return {ids, w};
}

}  // namespace

TEST_CASE("Engine with a dynamic sampler: loss and gradient equal the double reference after weight changes") {
  // Guards the objectives' use of the exact, current P_n: for NCE (fixed Z) and InfoNCE, per-sample
  // and shared negatives, with and without exclude_positive, after set_sampler_weights the step's
  // loss and gradient match reference_sampled on the engine's own draws (sample()) with P_n = the
  // naive w / sum(w) of the weights set here, to 1e-4 relative.
  for (const Objective obj : {Objective::nce, Objective::info_nce})
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared})
      for (const bool exclude : {false, true}) {
        INFO(to_string(obj) << " " << to_string(mode) << (exclude ? " exclude_positive" : ""));
        EngineConfig cfg;
        cfg.k = kK;
        cfg.objective = obj;
        cfg.negatives = mode;
        cfg.exclude_positive = exclude;
        cfg.z_policy = ZPolicy::fixed;
        cfg.z_fixed = 50.0;
        cfg.tau = 0.1;
        Engine eng = dynamic_engine(cfg, 7);
        NaiveWeights ref{dyn(eng).weights()};
        std::mt19937_64 rng(8);
        for (int s = 0; s < 3; ++s) {
          const auto [uid, uw] = weight_update(rng);
          eng.set_sampler_weights(uid, uw);
          ref.set(uid, uw);
          const Batch b = batch_of(eng, rng);
          const RowMatrixf bank0 = eng.bank().to_matrix();
          const RowMatrixi negs = eng.sample(b.ids, eng.steps_done());
          RefSpec spec;
          spec.objective = obj;
          spec.mode = mode;
          spec.exclude_positive = exclude;
          spec.tau = cfg.tau;
          spec.z = cfg.z_fixed;
          const RefOut want = reference_sampled(bank0.cast<double>(), b.f.cast<double>(), b.ids, negs, ref.p(), spec);
          RowMatrixf g(kB, kD);
          const StepStats st = eng.step(b.f, b.ids, g);
          CHECK(rel_err(st.loss, want.loss) < 1e-4);
          CHECK(grad_rel_err(g, want.grad) < 1e-4);
          CHECK(rel_err(st.mean_p_positive, want.mean_p_pos) < 1e-4);
        }
      }
}

TEST_CASE("Engine set_sampler_weights (dynamic sampler): refusals change nothing, a prefetch in flight is discarded") {
  // Guards the engine's entry point: a non-dynamic sampler and bad weights are one Error each with the
  // engine unchanged; a prefetch made before a weight change is dropped (its draws used the old
  // weights), and the next step equals that of an engine that never prefetched; a step with its own
  // draws equals step_with_negatives with the same draws.
  EngineConfig cfg;
  cfg.k = kK;
  std::mt19937_64 rng(9);
  Engine alias = make_engine(kN, kD, true, cfg, 3);
  CHECK(mentions(message_of([&] { alias.set_sampler_weights(std::vector<index_t>{1}, std::vector<double>{1.0}); }),
                 "dynamic"));
  Engine a = dynamic_engine(cfg, 4), b = dynamic_engine(cfg, 4);
  const std::vector<double> w0 = dyn(a).weights();
  CHECK(message_of([&] { a.set_sampler_weights(std::vector<index_t>{1, 2}, std::vector<double>{1.0, -1.0}); })
            .find("-1") != std::string::npos);
  CHECK(same_bits(dyn(a).weights(), w0));
  const Batch x = batch_of(a, rng);
  CHECK(a.prefetch(x.ids));
  const auto [uid, uw] = weight_update(rng);
  a.set_sampler_weights(uid, uw);
  b.set_sampler_weights(uid, uw);
  CHECK_FALSE(a.prefetch_pending());
  RowMatrixf ga(kB, kD), gb(kB, kD);
  const StepStats sa = a.step(x.f, x.ids, ga), sb = b.step(x.f, x.ids, gb);
  CHECK(bits_equal(sa.loss, sb.loss));
  CHECK(bits_equal(ga, gb));
  // The engine's own draws and the same ids given back (sample, then step_with_negatives) give the
  // same step bit for bit: draws and lookup() form log P_n alike.
  const Batch y = batch_of(a, rng);
  const RowMatrixi negs = a.sample(y.ids, a.steps_done());
  const StepStats own = a.step(y.f, y.ids, ga), given = b.step_with_negatives(y.f, y.ids, negs, gb);
  CHECK(bits_equal(own.loss, given.loss));
  CHECK(bits_equal(ga, gb));
  // With labels and exclude_same_label, a weight change that leaves one label all of the mass is refused.
  EngineConfig lc = cfg;
  lc.exclude_same_label = true;
  Engine l = dynamic_engine(lc, 5);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) labels[static_cast<std::size_t>(j)] = j < 300 ? 0 : 1;
  l.set_labels(labels);
  std::vector<index_t> half(300);
  for (index_t j = 0; j < 300; ++j) half[static_cast<std::size_t>(j)] = 300 + j;
  const std::vector<double> before = dyn(l).weights();
  CHECK(mentions(message_of([&] { l.set_sampler_weights(half, std::vector<double>(300, 0.0)); }), "label"));
  CHECK(same_bits(dyn(l).weights(), before));
}

TEST_CASE("Engine-driven loss_ema weights of a dynamic sampler: each batch row gets floor plus its loss average") {
  // Guards the engine-driven mode: after a step of distinct rows, each row's EMA is its own query's
  // loss (first sighting), so sum_b (w_b - floor) / B equals the step's mean loss (NCE losses are
  // positive); after a second step with the same rows the EMA blends; rows outside the batches keep
  // their initial weights; the full softmax is refused at construction.
  EngineConfig cfg;
  cfg.k = kK;
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  p.alpha = 0.5;
  p.floor = 0.25;
  Engine eng = dynamic_engine(cfg, 11, p);
  const std::vector<double> w0 = dyn(eng).weights();
  std::mt19937_64 rng(12);
  const Batch x = batch_of(eng, rng);
  RowMatrixf g(kB, kD);
  const StepStats s1 = eng.step(x.f, x.ids, g);
  double sum = 0;
  for (const index_t j : x.ids) sum += dyn(eng).weights()[static_cast<std::size_t>(j)] - p.floor;
  CHECK(sum / kB == doctest::Approx(s1.loss).epsilon(1e-12));
  std::vector<double> ema1(x.ids.size());
  for (std::size_t b = 0; b < x.ids.size(); ++b) ema1[b] = dyn(eng).ema()[static_cast<std::size_t>(x.ids[b])];
  const StepStats s2 = eng.step(x.f, x.ids, g);
  double sum2 = 0;
  for (std::size_t b = 0; b < x.ids.size(); ++b) {
    const double e = dyn(eng).ema()[static_cast<std::size_t>(x.ids[b])];
    sum2 += (e - 0.5 * ema1[b]) / 0.5;  // the second step's own loss of row b
  }
  CHECK(sum2 / kB == doctest::Approx(s2.loss).epsilon(1e-9));
  int untouched = 0, changed = 0;
  for (index_t j = 0; j < kN; ++j) {
    const bool in = std::find(x.ids.begin(), x.ids.end(), j) != x.ids.end();
    if (!in) untouched += dyn(eng).weights()[static_cast<std::size_t>(j)] == w0[static_cast<std::size_t>(j)];
    if (in) changed += std::isnan(dyn(eng).ema()[static_cast<std::size_t>(j)]) ? 0 : 1;
  }
  CHECK(untouched == kN - kB);
  CHECK(changed == kB);
  EngineConfig full = cfg;
  full.objective = Objective::full_softmax;
  CHECK(mentions(message_of([&] { dynamic_engine(full, 1, p); }), "full_softmax"));
}

namespace {

/// Runs `steps` engine-driven steps with caller weight changes between them; returns the losses.
std::vector<double> driven_run(Engine& eng, int first, int steps, RowMatrixf* grad = nullptr) {
  std::vector<double> losses;
  for (int s = first; s < first + steps; ++s) {
    std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(s));
    const auto [uid, uw] = weight_update(rng);
    eng.set_sampler_weights(uid, uw);
    const Batch x = batch_of(eng, rng);
    RowMatrixf g(kB, kD);
    losses.push_back(eng.step(x.f, x.ids, g).loss);
    if (grad) *grad = g;
  }
  return losses;
}

}  // namespace

TEST_CASE("Engine steps with a driven dynamic sampler are bit-identical for 1 and 2 threads") {
  // Guards thread-count independence of the whole loop (draws, kernels, the EMA and the partial
  // rebuilds): six steps with caller and engine-driven weight changes, per-sample and shared
  // negatives, run with 1 and with 2 OpenMP threads, give the same losses, gradients, bank and
  // sampler state bit for bit.
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
    EngineConfig cfg;
    cfg.k = kK;
    cfg.negatives = mode;
    cfg.objective = Objective::info_nce;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    Engine one = dynamic_engine(cfg, 21, p);
    RowMatrixf g1;
    const std::vector<double> l1 = driven_run(one, 0, 6, &g1);
    omp_set_num_threads(2);
    Engine two = dynamic_engine(cfg, 21, p);
    RowMatrixf g2;
    const std::vector<double> l2 = driven_run(two, 0, 6, &g2);
    omp_set_num_threads(saved);
    CHECK(same_bits(l1, l2));
    CHECK(bits_equal(g1, g2));
    CHECK(bits_equal(one.bank().to_matrix(), two.bank().to_matrix()));
    CHECK(dyn(one).fingerprint() == dyn(two).fingerprint());
  }
}

TEST_CASE("Snapshot of an engine with a dynamic sampler resumes bit-identically") {
  // Guards the snapshot's sampler state (current weights, loss averages, drive, alpha, floor): an
  // engine-driven run of 4 steps with weight changes, saved, loaded and continued for 4 more steps,
  // gives the losses, last gradient, bank and sampler of an uninterrupted 8-step run bit for bit;
  // read_snapshot_info reports the sampler and its parameters.
  mbtest::ScratchDir dir("dynamic", "resume");
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  p.alpha = 0.8;
  p.floor = 0.3;
  for (const Objective obj : {Objective::nce, Objective::info_nce}) {
    EngineConfig cfg;
    cfg.k = kK;
    cfg.objective = obj;
    cfg.z_policy = ZPolicy::ema;
    Engine whole = dynamic_engine(cfg, 31, p);
    RowMatrixf g_whole;
    std::vector<double> l_whole = driven_run(whole, 0, 8, &g_whole);
    Engine first = dynamic_engine(cfg, 31, p);
    std::vector<double> l = driven_run(first, 0, 4);
    const std::string path = dir / (to_string(obj) + ".h5");
    save_snapshot(path, first);
    const SnapshotInfo info = read_snapshot_info(path);
    CHECK(info.sampler == SamplerKind::dynamic);
    CHECK(info.sampler_params.drive == DynamicSampler::Drive::loss_ema);
    CHECK(info.sampler_params.alpha == 0.8);
    CHECK(info.sampler_params.floor == 0.3);
    Engine resumed = load_snapshot(path);
    CHECK(dyn(resumed).fingerprint() == dyn(first).fingerprint());
    RowMatrixf g;
    const std::vector<double> rest = driven_run(resumed, 4, 4, &g);
    l.insert(l.end(), rest.begin(), rest.end());
    CHECK(same_bits(l, l_whole));
    CHECK(bits_equal(g, g_whole));
    CHECK(bits_equal(resumed.bank().to_matrix(), whole.bank().to_matrix()));
    CHECK(dyn(resumed).fingerprint() == dyn(whole).fingerprint());
  }
}

namespace {

void set_root_str(const std::string& path, const char* name, const char* value) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  REQUIRE(f >= 0);
  if (H5Aexists(f, name) > 0) REQUIRE(H5Adelete(f, name) >= 0);
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(a >= 0);
  REQUIRE(H5Awrite(a, t, &value) >= 0);
  H5Aclose(a);
  H5Sclose(sp);
  H5Tclose(t);
  H5Fclose(f);
}

}  // namespace

TEST_CASE("Snapshot loaders refuse a sampler whose state is missing: cluster without its clusters, dynamic without its averages") {
  // Guards the loaders' sampler dispatch: a file whose sampler attribute says cluster but holds no
  // cluster state is one Error naming it from read_snapshot_info, load_snapshot and verify_snapshot
  // (never a uniform sampler);
  // a dynamic file without its loss averages or with an unknown drive is refused; a multi-view
  // engine's dynamic sampler (caller-set weights) round-trips bit for bit.
  mbtest::ScratchDir dir("dynamic", "refuse");
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  EngineConfig cfg;
  cfg.k = kK;
  Engine eng = dynamic_engine(cfg, 41, p);
  driven_run(eng, 0, 2);
  const std::string good = dir / "good.h5";
  save_snapshot(good, eng);
  const auto copy = [&](const std::string& name) {
    const std::string to = dir / name;
    std::filesystem::copy_file(good, to);
    return to;
  };
  const std::string cluster = copy("cluster.h5");
  set_root_str(cluster, "sampler", "cluster");
  CHECK(mentions(message_of([&] { read_snapshot_info(cluster); }), "cluster"));
  CHECK(mentions(message_of([&] { load_snapshot(cluster); }), "cluster"));
  CHECK_FALSE(verify_snapshot(cluster).empty());
  const std::string drive = copy("drive.h5");
  set_root_str(drive, "sampler_drive", "sideways");
  CHECK(mentions(message_of([&] { load_snapshot(drive); }), "sideways"));
  const std::string no_ema = copy("no_ema.h5");
  {
    const hid_t f = H5Fopen(no_ema.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    REQUIRE(f >= 0);
    REQUIRE(H5Ldelete(f, "sampler_ema", H5P_DEFAULT) >= 0);
    H5Fclose(f);
  }
  CHECK(mentions(message_of([&] { load_snapshot(no_ema); }), "sampler_ema"));
  CHECK(verify_snapshot(good).empty());

  std::mt19937_64 rng(42);
  std::vector<Bank> banks;
  banks.emplace_back(kN, kD, 1);
  banks.emplace_back(kN, kD, 2);
  MultiViewEngine mv(std::move(banks), std::make_unique<DynamicSampler>(random_weights(kN, rng)), cfg, ViewGraph::full);
  const auto [uid, uw] = weight_update(rng);
  mv.set_sampler_weights(uid, uw);
  const std::string mvp = dir / "mv.h5";
  save_snapshot(mvp, mv);
  const MultiViewEngine back = load_multiview_snapshot(mvp);
  CHECK(dynamic_cast<const DynamicSampler&>(back.sampler()).fingerprint() ==
        dynamic_cast<const DynamicSampler&>(mv.sampler()).fingerprint());
}

TEST_CASE("MultiViewEngine drives a loss_ema dynamic sampler with each query's loss averaged over the pairs") {
  // Guards the multi-view drive: a step of one query sets its row's average to the mean of the
  // pairs' losses; a batch of distinct rows sets sum_b (w_b - floor) / B to the step's loss over the
  // pairs; rows outside keep their weights; a snapshot carries the averages bit for bit.
  EngineConfig cfg;
  cfg.k = kK;
  DynamicSampler::Params p;
  p.drive = DynamicSampler::Drive::loss_ema;
  p.floor = 0.25;
  std::mt19937_64 rng(43);
  std::vector<Bank> banks;
  for (int v = 0; v < 3; ++v) banks.emplace_back(kN, kD, static_cast<std::uint64_t>(v + 1));
  MultiViewEngine mv(std::move(banks), std::make_unique<DynamicSampler>(random_weights(kN, rng), p), cfg,
                     ViewGraph::full);
  const auto& s = dynamic_cast<const DynamicSampler&>(mv.sampler());
  const std::vector<double> w0 = s.weights();
  const auto step = [&](const std::vector<index_t>& ids) {
    std::vector<RowMatrixf> f, g;
    for (int v = 0; v < 3; ++v) {
      f.push_back(mbtest::unit_rows(static_cast<index_t>(ids.size()), kD, rng));
      g.emplace_back(static_cast<index_t>(ids.size()), kD);
    }
    std::vector<FeaturesRef> fr(f.begin(), f.end());
    std::vector<GradRef> gr(g.begin(), g.end());
    return mv.step(fr, ids, gr, true);
  };
  const MultiViewStats one = step({7});
  REQUIRE(one.pairs.size() == 6);
  double mean = 0.0;
  for (const StepStats& st : one.pairs) mean += st.loss / 6.0;
  CHECK(s.ema()[7] == doctest::Approx(mean).epsilon(1e-12));
  CHECK(s.weights()[7] == doctest::Approx(p.floor + mean).epsilon(1e-12));
  const std::vector<index_t> ids = {20, 3, 55, 41, 90, 12};
  const MultiViewStats many = step(ids);
  double sum = 0.0;
  for (const index_t j : ids) sum += s.weights()[static_cast<std::size_t>(j)] - p.floor;
  CHECK(sum / 6.0 == doctest::Approx(many.loss / 6.0).epsilon(1e-9));
  int untouched = 0;
  for (index_t j = 0; j < kN; ++j)
    if (j != 7 && std::find(ids.begin(), ids.end(), j) == ids.end())
      untouched += s.weights()[static_cast<std::size_t>(j)] == w0[static_cast<std::size_t>(j)];
  CHECK(untouched == kN - 7);
  mbtest::ScratchDir dir("dynamic", "multiview");
  const std::string path = dir / "mv.h5";
  save_snapshot(path, mv);
  const MultiViewEngine back = load_multiview_snapshot(path);
  const auto& b = dynamic_cast<const DynamicSampler&>(back.sampler());
  CHECK(b.fingerprint() == s.fingerprint());
  CHECK(std::memcmp(b.ema().data(), s.ema().data(), s.ema().size() * sizeof(double)) == 0);
}
