// The cluster sampler: q(j | f) against a naive double-precision formula, the draws against q
// (chi-square), Zhat's unbiasedness, every objective's loss and dL/df with query-dependent q against
// the double reference, k-means against brute force, threads and snapshots bit for bit.
#include "batch_check.hpp"
#include "objective_reference.hpp"
#include "reference.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>

#include <membank/cluster_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <Random123/philox.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kN = 300;
constexpr index_t kD = 8;
constexpr index_t kC = 6;

ClusterConfig small_config(std::int64_t refresh_every = 0) {
  ClusterConfig c;
  c.clusters = kC;
  c.epsilon = 0.2;
  c.beta = 4.0;
  c.refresh_every = refresh_every;
  c.iterations = 2;
  c.seed = 11;
  return c;
}

/// A bank of unit rows around kC directions (so that clusters mean something).
Bank clustered_bank(std::uint64_t seed, DType dtype = DType::float32) {
  std::mt19937_64 rng(seed);
  const RowMatrixf centres = unit_rows(kC, kD, rng);
  RowMatrixf rows(kN, kD);
  std::normal_distribution<double> g(0.0, 0.3);
  for (index_t j = 0; j < kN; ++j)
    for (index_t e = 0; e < kD; ++e) rows(j, e) = centres(j % kC, e) + static_cast<float>(g(rng));
  normalize_rows(rows);
  return Bank::from_rows(rows, dtype);
}

/// q(j | f) for every row, in double from the sampler's centroids and assignment and the published
/// mixture: eps / N + (1 - eps) n_k e^{beta f.c_k} / sum_l n_l e^{beta f.c_l} / n_k.
std::vector<double> naive_q(const ClusterSampler& s, const Eigen::RowVectorXd& f) {
  const index_t n = s.size(), c = s.config().clusters;
  std::vector<double> size(static_cast<std::size_t>(c), 0.0);
  for (const auto k : s.assignment()) size[static_cast<std::size_t>(k)] += 1.0;
  std::vector<double> w(static_cast<std::size_t>(c), 0.0);
  double total = 0.0;
  for (index_t k = 0; k < c; ++k) {
    const double dot = s.centroids().row(k).cast<double>().dot(f);
    w[static_cast<std::size_t>(k)] = size[static_cast<std::size_t>(k)] * std::exp(s.config().beta * dot);
    total += w[static_cast<std::size_t>(k)];
  }
  const double eps = s.epsilon();
  std::vector<double> q(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) {
    const auto k = static_cast<std::size_t>(s.assignment()[static_cast<std::size_t>(j)]);
    q[static_cast<std::size_t>(j)] = eps / static_cast<double>(n) + (1.0 - eps) * w[k] / total / size[k];
  }
  return q;
}

double chi2_q999(int df) {
  const double z = 3.090232306167813;
  const double a = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

EngineConfig engine_config(Objective o, NegativesMode mode = NegativesMode::per_sample, index_t k = 40) {
  EngineConfig cfg;
  cfg.k = k;
  cfg.objective = o;
  cfg.tau = 0.1;
  cfg.z_policy = ZPolicy::fixed;
  cfg.z_fixed = kRefZFixed;
  cfg.negatives = mode;
  cfg.seed = 3;
  cfg.momentum = 0.5;
  return cfg;
}

Engine cluster_engine(const EngineConfig& cfg, std::int64_t refresh_every = 0, std::uint64_t seed = 21) {
  Bank bank = clustered_bank(seed);
  auto sampler = std::make_unique<ClusterSampler>(bank.view(), small_config(refresh_every));
  return Engine(std::move(bank), std::move(sampler), cfg);
}

}  // namespace

TEST_CASE("cluster sampler: q(j | f) and the lookups equal the naive double formula, and sum to one") {
  // Guards condition(): the per-query mixture over clusters, log q of each cluster's rows, and row B
  // (the batch mean).
  const Bank bank = clustered_bank(1);
  const ClusterSampler s(bank.view(), small_config());
  std::mt19937_64 rng(2);
  const RowMatrixf f = unit_rows(3, kD, rng);
  const auto cond = s.condition(f.data(), kD, 3, kD);
  std::vector<double> mean(static_cast<std::size_t>(kN), 0.0);
  for (index_t i = 0; i < 3; ++i) {
    const std::vector<double> q = naive_q(s, f.row(i).cast<double>());
    double sum = 0.0;
    std::vector<index_t> ids(static_cast<std::size_t>(kN));
    std::vector<float> log_q(ids.size());
    for (index_t j = 0; j < kN; ++j) ids[static_cast<std::size_t>(j)] = j;
    s.lookup_for({cond.get(), i}, ids, log_q);
    for (index_t j = 0; j < kN; ++j) {
      // The engine scores f . c_k in fp32 (as every score): 1e-6 covers beta times that rounding.
      const double got = s.prob_for(j, {cond.get(), i});
      CHECK(rel_err(got, q[static_cast<std::size_t>(j)]) < 1e-6);
      CHECK(std::abs(log_q[static_cast<std::size_t>(j)] - std::log(q[static_cast<std::size_t>(j)])) < 2e-6);
      sum += got;
      mean[static_cast<std::size_t>(j)] += q[static_cast<std::size_t>(j)] / 3.0;
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-12));
  }
  for (index_t j = 0; j < kN; ++j) CHECK(rel_err(s.prob_for(j, {cond.get(), 3}), mean[static_cast<std::size_t>(j)]) < 1e-6);
  // No query: the mixture at beta = 0, uniform.
  CHECK(s.prob(5) == doctest::Approx(1.0 / kN));
  CHECK_THROWS_AS(s.prob_for(0, {cond.get(), 4}), Error);
  CHECK_THROWS_AS(s.prob_for(kN, {cond.get(), 0}), Error);
}

TEST_CASE("cluster sampler: draws follow q(. | f) for fixed centroids (chi-square at a fixed seed)") {
  // Guards draw_next: the eps branch, the cluster search, the member pick, and log q reported for
  // every draw whatever the branch.
  const Bank bank = clustered_bank(3);
  const ClusterSampler s(bank.view(), small_config());
  std::mt19937_64 rng(4);
  RowMatrixf f = unit_rows(1, kD, rng);
  f.row(0) = bank.to_matrix().row(17);  // a query near one cluster: q far from uniform
  const auto cond = s.condition(f.data(), kD, 1, kD);
  const std::vector<double> q = naive_q(s, f.row(0).cast<double>());
  std::vector<std::int64_t> counts(static_cast<std::size_t>(kN), 0);
  std::vector<index_t> ids(2000);
  std::vector<float> log_q(ids.size());
  std::int64_t total = 0;
  bool log_ok = true;
  for (std::uint32_t r = 0; r < 150; ++r) {
    DrawCursor cur{{9, 1, r, 2}, Exclusion{}, static_cast<index_t>(ids.size())};
    cur.query = {cond.get(), 0};
    s.draw_next(cur, ids, log_q);
    for (std::size_t t = 0; t < ids.size(); ++t) {
      ++counts[static_cast<std::size_t>(ids[t])];
      log_ok = log_ok && std::abs(log_q[t] - std::log(q[static_cast<std::size_t>(ids[t])])) < 2e-6;
    }
    total += static_cast<std::int64_t>(ids.size());
  }
  CHECK(log_ok);
  double x = 0.0;
  for (index_t j = 0; j < kN; ++j) {
    const double e = q[static_cast<std::size_t>(j)] * static_cast<double>(total);
    x += (static_cast<double>(counts[static_cast<std::size_t>(j)]) - e) * (static_cast<double>(counts[static_cast<std::size_t>(j)]) - e) / e;
  }
  CAPTURE(x);
  CHECK(x < chi2_q999(kN - 1));
  // The query matters: its own cluster's rows are drawn far above 1/N.
  const auto own = s.assignment()[17];
  double own_mass = 0.0;
  for (index_t j = 0; j < kN; ++j)
    if (s.assignment()[static_cast<std::size_t>(j)] == own) own_mass += static_cast<double>(counts[static_cast<std::size_t>(j)]);
  CHECK(own_mass / static_cast<double>(total) > 2.0 / kC);
}

TEST_CASE("cluster sampler: every draw is the documented function of its Philox block (a naive re-draw)") {
  // Guards the search of draw_next exactly, guide table included: 97 clusters (10 of them empty) and
  // peaked mixtures, so that many clusters share a guide bucket and many buckets none. The reference
  // takes block t = Philox4x32-10(counter {t, row, step, purpose << 24}, key seed) of the stream,
  // picks the branch with the 53-bit coin, the cluster as the first whose cumulative pi passes the
  // rescaled coin (the last one with weight, and so with members, if rounding leaves none), and the
  // member by the 64-bit word scaled to the cluster's size over its rows in ascending order. On every
  // instruction-set path (the mixtures and the draws are per-path kernels).
  constexpr index_t n = 3000, c = 97, d = 8;
  std::mt19937_64 rng(12);
  RowMatrixf centroids = unit_rows(c, d, rng);
  std::vector<std::int32_t> assignment(static_cast<std::size_t>(n));
  std::uniform_int_distribution<std::int32_t> pick(10, c - 1);  // clusters 0..9 stay empty
  for (auto& a : assignment) a = pick(rng);
  ClusterConfig cfg;
  cfg.clusters = c;
  cfg.epsilon = 0.1;
  cfg.beta = 25.0;
  const ClusterSampler s(cfg, centroids, assignment, 0);
  std::vector<std::vector<index_t>> members(static_cast<std::size_t>(c));
  for (index_t j = 0; j < n; ++j)
    members[static_cast<std::size_t>(assignment[static_cast<std::size_t>(j)])].push_back(j);
  const RowMatrixf f = unit_rows(3, d, rng);
  const double eps = s.epsilon();
  constexpr index_t kDraws = 19997;  // pieces of 64 and one of 29
  std::vector<index_t> ids(static_cast<std::size_t>(kDraws));
  std::vector<float> log_q(ids.size());
  for (const Isa isa : supported_paths()) {
    CAPTURE(to_string(isa));
    IsaScope is(isa);
    const auto cond = s.condition(f.data(), d, 3, d);
    index_t mismatches = 0, clustered = 0;
    for (std::uint32_t r = 0; r < 3; ++r) {
      // pi_k from q(j | f) of one member: (q - eps / N) n_k / (1 - eps), to ~1e-16 absolute.
      std::vector<double> cum(static_cast<std::size_t>(c));
      double run = 0.0;
      for (index_t k = 0; k < c; ++k) {
        const auto& m = members[static_cast<std::size_t>(k)];
        if (!m.empty())
          run += (s.prob_for(m[0], {cond.get(), r}) - eps / n) * static_cast<double>(m.size()) / (1.0 - eps);
        cum[static_cast<std::size_t>(k)] = run;
      }
      const StreamKey key{0x9e3779b97f4a7c15ull, 7, r, 2};
      DrawCursor cur{key, Exclusion{}, kDraws};
      cur.query = {cond.get(), r};
      for (index_t t = 0; t < kDraws; t += 64) {
        const auto m = static_cast<std::size_t>(std::min<index_t>(64, kDraws - t));
        s.draw_next(cur, std::span(ids).subspan(static_cast<std::size_t>(t), m),
                    std::span(log_q).subspan(static_cast<std::size_t>(t), m));
      }
      const r123::Philox4x32::key_type pkey{
          {static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32)}};
      r123::Philox4x32 philox;
      for (index_t t = 0; t < kDraws; ++t) {
        const auto w = philox({{static_cast<std::uint32_t>(t), r, 7u, 2u << 24}}, pkey);
        const double coin =
            static_cast<double>(((static_cast<std::uint64_t>(w.v[0]) << 32) | w.v[1]) >> 11) * 0x1.0p-53;
        const std::uint64_t bits = (static_cast<std::uint64_t>(w.v[2]) << 32) | w.v[3];
        const auto scaled = [&](std::size_t size) {
          return static_cast<std::size_t>((static_cast<unsigned __int128>(bits) * size) >> 64);
        };
        index_t want;
        if (coin < eps) {
          want = static_cast<index_t>(scaled(static_cast<std::size_t>(n)));
        } else {
          const double u = std::min((coin - eps) * (1.0 / (1.0 - eps)), 1.0);
          index_t k = 0;
          while (k < c - 1 && cum[static_cast<std::size_t>(k)] <= u) ++k;
          while (members[static_cast<std::size_t>(k)].empty()) --k;
          const auto& m = members[static_cast<std::size_t>(k)];
          want = m[scaled(m.size())];
          ++clustered;
        }
        mismatches += ids[static_cast<std::size_t>(t)] != want;
      }
    }
    CHECK(mismatches == 0);
    CHECK(clustered > 50000);  // both branches ran, the clustered one the most
  }
}

TEST_CASE("cluster sampler: draws in pieces equal one draw, with exclusions") {
  const Bank bank = clustered_bank(5);
  const ClusterSampler s(bank.view(), small_config());
  std::mt19937_64 rng(6);
  const RowMatrixf f = unit_rows(2, kD, rng);
  const auto cond = s.condition(f.data(), kD, 2, kD);
  const index_t y = 4;
  const Exclusion ex{std::span<const index_t>(&y, 1)};
  std::vector<index_t> whole(300), pieces(300);
  std::vector<float> lw(300), lp(300);
  DrawCursor a{{1, 2, 3, 2}, ex, 300};
  a.query = {cond.get(), 1};
  s.draw_next(a, whole, lw);
  DrawCursor b{{1, 2, 3, 2}, ex, 300};
  b.query = {cond.get(), 1};
  for (std::size_t at = 0; at < 300;) {
    const std::size_t m = std::min<std::size_t>(at % 7 + 1 + at / 5, 300 - at);
    s.draw_next(b, std::span<index_t>(pieces.data() + at, m), std::span<float>(lp.data() + at, m));
    at += m;
  }
  CHECK(whole == pieces);
  CHECK(std::none_of(whole.begin(), whole.end(), [&](index_t j) { return j == y; }));
  CHECK(std::equal(lw.begin(), lw.end(), lp.begin()));
}

TEST_CASE("cluster sampler: Zhat = mean e_j / q(j | f) is unbiased for the exact sum over the bank") {
  // Guards the weights the engine's estimate uses (lw = -log(N q)): averaged over many independent
  // streams, Zhat converges on sum_j e^{s_j / tau}, computed exactly on this small bank.
  const Bank bank = clustered_bank(7);
  const RowMatrixd V = bank.to_matrix().cast<double>();
  const ClusterSampler s(bank.view(), small_config());
  std::mt19937_64 rng(8);
  RowMatrixf f = unit_rows(1, kD, rng);
  f.row(0) = bank.to_matrix().row(40);
  const auto cond = s.condition(f.data(), kD, 1, kD);
  const double tau = 0.2;
  double exact = 0.0;
  std::vector<double> e(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) exact += e[static_cast<std::size_t>(j)] = std::exp(V.row(j).dot(f.row(0).cast<double>()) / tau);
  constexpr int kRepeats = 400;
  constexpr index_t kK = 64;
  std::vector<double> est;
  std::vector<index_t> ids(kK);
  std::vector<float> log_q(kK);
  for (int r = 0; r < kRepeats; ++r) {
    DrawCursor cur{{77, r, 0u, 2}, Exclusion{}, kK};
    cur.query = {cond.get(), 0};
    s.draw_next(cur, ids, log_q);
    double z = 0.0;
    for (index_t k = 0; k < kK; ++k)
      z += e[static_cast<std::size_t>(ids[static_cast<std::size_t>(k)])] / s.prob_for(ids[static_cast<std::size_t>(k)], {cond.get(), 0});
    est.push_back(z / kK);
  }
  double mean = 0.0, var = 0.0;
  for (double z : est) mean += z / kRepeats;
  for (double z : est) var += (z - mean) * (z - mean) / (kRepeats - 1);
  const double se = std::sqrt(var / kRepeats);
  CAPTURE(mean);
  CAPTURE(exact);
  CAPTURE(se);
  CHECK(std::abs(mean - exact) < 4.0 * se);
  CHECK(se < 0.05 * exact);  // the check has power: a biased estimate 20% off would fail it
}

TEST_CASE("cluster sampler: every objective's loss and dL/df with query-dependent q equal the double reference") {
  // Guards the engine's use of q(. | f_i): draws' and positive's weights, exclude_positive's
  // conditioning (1 - q(y | f)), and shared negatives against the batch mean of q.
  std::mt19937_64 rng(10);
  for (const Variant& v : all_variants()) {
    if (membank::needs_labels(v.obj)) continue;  // the label objectives: the test after this one
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared})
      for (const bool exclude : {false, true}) {
        INFO(v.name << (mode == NegativesMode::shared ? " shared" : " per-sample") << (exclude ? " exclude_positive" : ""));
        EngineConfig cfg = objective_config(v);
        cfg.k = 37;
        cfg.z_policy = ZPolicy::fixed;
        cfg.z_fixed = kRefZFixed;
        cfg.negatives = mode;
        cfg.exclude_positive = exclude;
        cfg.seed = 3;
        Engine eng = cluster_engine(cfg);
        const auto& s = dynamic_cast<const ClusterSampler&>(eng.sampler());
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = {3, 50, 50, 121, 299};
        const RowMatrixf f = near_rows(bank, ids, 0.4, rng);
        const RowMatrixi negs = eng.sample(ids, 0, f);
        // The reference's queries: q from the naive formula, conditioned on exclude_positive.
        std::vector<std::vector<double>> q;
        std::vector<double> mean(static_cast<std::size_t>(kN), 0.0);
        for (index_t i = 0; i < 5; ++i) {
          q.push_back(naive_q(s, f.row(i).cast<double>()));
          for (index_t j = 0; j < kN; ++j) mean[static_cast<std::size_t>(j)] += q.back()[static_cast<std::size_t>(j)] / 5.0;
        }
        double batch_mass = 0.0;
        for (const index_t j : {3, 50, 121, 299}) batch_mass += mean[static_cast<std::size_t>(j)];
        std::vector<Query> queries(5);
        for (index_t i = 0; i < 5; ++i) {
          const bool shared = mode == NegativesMode::shared;
          const std::vector<double>& qi = shared ? mean : q[static_cast<std::size_t>(i)];
          const index_t y = ids[static_cast<std::size_t>(i)];
          const double excluded = !exclude ? 0.0 : shared ? batch_mass : qi[static_cast<std::size_t>(y)];
          Query& qq = queries[static_cast<std::size_t>(i)];
          qq.pos = {y, qi[static_cast<std::size_t>(y)], false, true};
          for (index_t k = 0; k < cfg.k; ++k) {
            const index_t j = shared ? negs(0, k) : negs(i, k);
            qq.draws.push_back({j, qi[static_cast<std::size_t>(j)] / (1.0 - excluded), false, false});
          }
        }
        check_against(eng, f, ids, negs, batch_reference(v, kN, queries, bank.cast<double>(), f.cast<double>()));
      }
  }
}

TEST_CASE("cluster sampler: the label objectives and the engine's refusals") {
  std::mt19937_64 rng(12);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) labels[static_cast<std::size_t>(j)] = j % 4;
  EngineConfig cfg = engine_config(Objective::supcon);
  Bank bank = clustered_bank(13);
  Engine eng(std::move(bank), std::make_unique<ClusterSampler>(clustered_bank(13).view(), small_config()), cfg, labels);
  const std::vector<index_t> ids = {1, 2, 3};
  const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
  RowMatrixf g(3, kD);
  const StepStats st = eng.step(f, ids, g, true);
  CHECK(std::isfinite(st.loss));
  CHECK(g.allFinite());
  // (exclude_same_label under q: the next test.)
  // The draws need the features; prefetch cannot draw ahead.
  CHECK(message_of<Error>([&] { (void)eng.sample(ids, 0); }).find("features") != std::string::npos);
  CHECK_FALSE(eng.prefetch(ids));
  // refresh_sampler belongs to the cluster sampler.
  Engine uniform(clustered_bank(13), std::make_unique<UniformSampler>(kN), engine_config(Objective::info_nce));
  CHECK(message_of<Error>([&] { uniform.refresh_sampler(); }).find("cluster") != std::string::npos);
}

TEST_CASE("cluster sampler: exclude_same_label conditions each query's draws on its label's mass under q(. | f)") {
  // Guards ClusterSampler::class_mass_given and its use: no draw of the query's label, the draws'
  // q(j | f) / (1 - the label's mass under q(. | f)), the positive's unconditioned q(y | f), for the
  // softmax family, nce and supcon, against the double reference; shared negatives mask the label.
  std::mt19937_64 rng(30);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) labels[static_cast<std::size_t>(j)] = (j * 7) % 5;
  for (const Variant& v : all_variants()) {
    if (v.obj != Objective::nce && v.obj != Objective::info_nce && v.obj != Objective::dhel && v.obj != Objective::supcon)
      continue;
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
      INFO(v.name << (mode == NegativesMode::shared ? " shared" : " per-sample"));
      EngineConfig cfg = objective_config(v);
      cfg.k = 31;
      cfg.z_policy = ZPolicy::fixed;
      cfg.z_fixed = kRefZFixed;
      cfg.negatives = mode;
      cfg.exclude_same_label = true;
      cfg.seed = 5;
      Bank bank = clustered_bank(31);
      auto sampler = std::make_unique<ClusterSampler>(bank.view(), small_config());
      Engine eng(std::move(bank), std::move(sampler), cfg, labels);
      const auto& s = dynamic_cast<const ClusterSampler&>(eng.sampler());
      const RowMatrixf bank_rows = eng.bank().to_matrix();
      const std::vector<index_t> ids = {4, 77, 150, 299};
      const RowMatrixf f = near_rows(bank_rows, ids, 0.4, rng);
      const RowMatrixi negs = eng.sample(ids, 0, f);
      std::vector<Query> queries(4);
      std::vector<double> mean(static_cast<std::size_t>(kN), 0.0);
      std::vector<std::vector<double>> q;
      for (index_t i = 0; i < 4; ++i) {
        q.push_back(naive_q(s, f.row(i).cast<double>()));
        for (index_t j = 0; j < kN; ++j) mean[static_cast<std::size_t>(j)] += q.back()[static_cast<std::size_t>(j)] / 4.0;
      }
      for (index_t i = 0; i < 4; ++i) {
        const bool shared = mode == NegativesMode::shared;
        const std::vector<double>& qi = shared ? mean : q[static_cast<std::size_t>(i)];
        const index_t y = ids[static_cast<std::size_t>(i)];
        const std::int64_t label = labels[static_cast<std::size_t>(y)];
        double mass = 0.0;  // the label's mass under the query's q, in double
        for (index_t j = 0; j < kN; ++j)
          if (labels[static_cast<std::size_t>(j)] == label) mass += qi[static_cast<std::size_t>(j)];
        Query& qq = queries[static_cast<std::size_t>(i)];
        qq.pos = {y, qi[static_cast<std::size_t>(y)], false, true};
        for (index_t k = 0; k < cfg.k; ++k) {
          const index_t j = shared ? negs(0, k) : negs(i, k);
          const bool same = labels[static_cast<std::size_t>(j)] == label;
          if (!shared) CHECK_FALSE(same);  // per-sample draws avoid the label
          // Per-sample: q conditioned on the other labels. Shared: unconditioned, the label masked.
          qq.draws.push_back({j, shared ? qi[static_cast<std::size_t>(j)] : qi[static_cast<std::size_t>(j)] / (1.0 - mass),
                              shared && same, same});
        }
      }
      check_against(eng, f, ids, negs, batch_reference(v, kN, queries, bank_rows.cast<double>(), f.cast<double>()));
    }
  }
}

TEST_CASE("cluster sampler: k-means assignments are the nearest centroids, centroids the normalised means") {
  // Guards refresh(): after it, every row's cluster is the argmax of c_k . v_j (brute force in
  // double, near-ties allowed), and a Lloyd step's centroids are the normalised means of the
  // clusters it started from (brute force). (Lloyd finds a local optimum: which one depends on the
  // seeded start, so the test asserts these invariants, not a particular partition.)
  const Bank bank = clustered_bank(14);
  const RowMatrixd V = bank.to_matrix().cast<double>();
  ClusterConfig cfg = small_config();
  cfg.iterations = 5;
  const ClusterSampler s(bank.view(), cfg);
  const RowMatrixd C = s.centroids().cast<double>();
  for (index_t k = 0; k < kC; ++k) CHECK(C.row(k).norm() == doctest::Approx(1.0).epsilon(1e-6));
  for (index_t j = 0; j < kN; ++j) {
    const Eigen::VectorXd d = C * V.row(j).transpose();
    const double best = d.maxCoeff();
    CHECK(d(s.assignment()[static_cast<std::size_t>(j)]) >= best - 1e-6);
  }
  // A refresh with 1 iteration from this state: centroids = normalised means of these clusters.
  ClusterConfig one = cfg;
  one.iterations = 1;
  ClusterSampler t(one, s.centroids(), s.assignment(), 0);
  // t's first assignment pass re-derives s's assignment from the same centroids.
  t.refresh(bank.view(), 1);
  for (index_t k = 0; k < kC; ++k) {
    Eigen::RowVectorXd sum = Eigen::RowVectorXd::Zero(kD);
    for (index_t j = 0; j < kN; ++j)
      if (s.assignment()[static_cast<std::size_t>(j)] == k) sum += V.row(j);
    if (sum.norm() == 0.0) continue;
    CHECK((t.centroids().row(k).cast<double>() - sum / sum.norm()).norm() < 1e-5);
  }
  CHECK(t.refreshed_at() == 1);
}

TEST_CASE("cluster sampler: the config and state are checked, one clear error each") {
  const Bank bank = clustered_bank(15);
  ClusterConfig c = small_config();
  c.clusters = kN + 1;
  CHECK(message_of<Error>([&] { ClusterSampler(bank.view(), c); }).find("clusters") != std::string::npos);
  c = small_config();
  c.epsilon = 0.0;
  CHECK(message_of<Error>([&] { ClusterSampler(bank.view(), c); }).find("epsilon") != std::string::npos);
  c = small_config();
  c.beta = -1.0;
  CHECK(message_of<Error>([&] { ClusterSampler(bank.view(), c); }).find("beta") != std::string::npos);
  const ClusterSampler s(bank.view(), small_config());
  std::vector<std::int32_t> bad = s.assignment();
  bad[9] = kC;
  CHECK(message_of<Error>([&] { ClusterSampler(small_config(), s.centroids(), bad, 0); }).find("assignment[9]") !=
        std::string::npos);
  RowMatrixf nan_c = s.centroids();
  nan_c(1, 1) = std::nanf("");
  CHECK(message_of<Error>([&] { ClusterSampler(small_config(), nan_c, s.assignment(), 0); }).find("finite") !=
        std::string::npos);
  // Features whose scores times beta overflow: one error naming the query, no NaN mixture.
  ClusterConfig huge = small_config();
  huge.beta = 1e307;
  const ClusterSampler h(huge, s.centroids(), s.assignment(), 0);
  RowMatrixf f = RowMatrixf::Zero(2, kD);
  f(1, 0) = 1e3f;
  f(1, 1) = -1e3f;
  const std::string overflow = message_of<Error>([&] { h.condition(f.data(), kD, 2, kD); });
  CHECK(overflow.find("query 1's cluster weights are not finite") != std::string::npos);
  // A refresh against a bank of another shape changes nothing.
  ClusterSampler t = s;
  const Bank other(kN, kD + 1, 3);
  CHECK_THROWS_AS(t.refresh(other.view(), 5), Error);
  CHECK(t.refreshed_at() == s.refreshed_at());
  CHECK(t.assignment() == s.assignment());
}

TEST_CASE("cluster sampler: 1 and 2 OpenMP threads give bit-identical clusters and steps") {
  std::vector<std::vector<std::int32_t>> assignments;
  std::vector<RowMatrixf> centroids, grads;
  std::vector<double> losses;
  for (const int threads : {1, 2}) {
    const ThreadCount tc(threads);
    Engine eng = cluster_engine(engine_config(Objective::info_nce), 2);
    std::mt19937_64 rng(16);
    RowMatrixf g(20, kD);
    double loss = 0.0;
    for (int step = 0; step < 5; ++step) {
      const std::vector<index_t> ids = random_ids(20, kN, rng);
      const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
      loss += eng.step(f, ids, g, true).loss;
    }
    const auto& s = dynamic_cast<const ClusterSampler&>(eng.sampler());
    CHECK(s.refreshed_at() == 4);
    assignments.push_back(s.assignment());
    centroids.push_back(s.centroids());
    grads.push_back(g);
    losses.push_back(loss);
  }
  CHECK(assignments[0] == assignments[1]);
  CHECK(bits_equal(centroids[0], centroids[1]));
  CHECK(bits_equal(grads[0], grads[1]));
  CHECK(bits_equal(losses[0], losses[1]));
}

TEST_CASE("cluster sampler: a step whose draws come a chunk of queries at a time equals the step given them") {
  // The engine makes a cluster sampler's draws for a chunk of queries (about 4 MiB of draws) before
  // their rows; with K = 2^17 a chunk holds two queries, so this batch of 7 spans four chunks.
  // evaluate() takes the same draws, from sample(), through the other path (each block of them taken
  // and its log q looked up just before its rows): the results must agree bit for bit, at 1 and 2
  // threads.
  for (const int threads : {1, 2}) {
    const ThreadCount tc(threads);
    INFO("threads " << threads);
    EngineConfig cfg = engine_config(Objective::nce);
    cfg.k = index_t{1} << 17;
    Engine eng = cluster_engine(cfg);
    std::mt19937_64 rng(17);
    const std::vector<index_t> ids = random_ids(7, kN, rng);
    const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
    const RowMatrixi negs = eng.sample(ids, 0, f);
    RowMatrixf g(7, kD), g2(7, kD);
    const StepStats given = eng.evaluate(f, ids, negs, g);
    const StepStats drawn = eng.step(f, ids, g2, false);
    CHECK(bits_equal(given.loss, drawn.loss));
    CHECK(bits_equal(g, g2));
  }
}

TEST_CASE("cluster sampler: a resumed snapshot continues bit for bit across a centroid refresh") {
  // Guards the snapshot's sampler_cluster group (centroids, assignment, config, refreshed_at) and the
  // engine's refresh schedule: save after step 2, refresh due at step 3.
  const ScratchDir dir("cluster", "snapshot");
  const std::string path = dir / "c.h5";
  Engine a = cluster_engine(engine_config(Objective::nce), 3);
  std::mt19937_64 rng(18);
  std::vector<std::vector<index_t>> batches;
  std::vector<RowMatrixf> feats;
  for (int t = 0; t < 6; ++t) {
    batches.push_back(random_ids(10, kN, rng));
    feats.push_back(unit_rows(10, kD, rng));
  }
  RowMatrixf g(10, kD), h(10, kD);
  for (int t = 0; t < 2; ++t) a.step(feats[static_cast<std::size_t>(t)], batches[static_cast<std::size_t>(t)], g, true);
  save_snapshot(path, a);
  Engine b = load_snapshot(path);
  REQUIRE(b.sampler().kind() == SamplerKind::cluster);
  for (int t = 2; t < 6; ++t) {
    const StepStats sa = a.step(feats[static_cast<std::size_t>(t)], batches[static_cast<std::size_t>(t)], g, true);
    const StepStats sb = b.step(feats[static_cast<std::size_t>(t)], batches[static_cast<std::size_t>(t)], h, true);
    CHECK(bits_equal(sa.loss, sb.loss));
    CHECK(bits_equal(g, h));
  }
  const auto& sa = dynamic_cast<const ClusterSampler&>(a.sampler());
  const auto& sb = dynamic_cast<const ClusterSampler&>(b.sampler());
  CHECK(sa.refreshed_at() == 3);
  CHECK(sb.refreshed_at() == 3);
  CHECK(sa.assignment() == sb.assignment());
  CHECK(bits_equal(sa.centroids(), sb.centroids()));
  CHECK(bits_equal(a.bank().to_matrix(), b.bank().to_matrix()));
}
