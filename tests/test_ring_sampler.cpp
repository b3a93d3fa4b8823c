// The ring sampler (biased, query-dependent): each query's ring against a brute-force ranking in
// double, the draws against the uniform distribution over it (chi-square), the engine's refusal and
// its unweighted use of the draws against the double references, threads and snapshots bit for bit.
#include "batch_check.hpp"
#include "objective_reference.hpp"
#include "reference.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/snapshot.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kN = 300;
constexpr index_t kD = 8;

/// Rows and queries of +-1/2 in D = 4: 16 distinct unit rows, so a bank of kN holds many equal
/// scores, and every score is exact in fp32, fp16 and bf16 alike (the ties are then the sampler's
/// tie rule alone).
RowMatrixf half_rows(index_t rows, std::mt19937_64& rng) {
  RowMatrixf m(rows, 4);
  for (index_t i = 0; i < rows; ++i)
    for (index_t e = 0; e < 4; ++e) m(i, e) = (rng() & 1u) ? 0.5f : -0.5f;
  return m;
}

/// The ranks [lower, upper) of the rows by score f . v in double, highest first, equal scores by
/// ascending id: ascending ids.
std::vector<std::uint32_t> brute_ring(const RowMatrixf& bank, const Eigen::RowVectorXf& f, RingConfig c) {
  const index_t n = bank.rows();
  std::vector<std::pair<double, index_t>> order;
  for (index_t j = 0; j < n; ++j) order.push_back({-bank.row(j).cast<double>().dot(f.cast<double>()), j});
  std::sort(order.begin(), order.end());
  std::vector<std::uint32_t> ring;
  for (index_t r = c.lower; r < c.upper; ++r) ring.push_back(static_cast<std::uint32_t>(order[static_cast<std::size_t>(r)].second));
  std::sort(ring.begin(), ring.end());
  return ring;
}

double chi2_q999(int df) {
  const double z = 3.090232306167813;
  const double a = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

/// Variant v's configuration for a step checked against the double reference: K draws, a fixed Z,
/// the negatives mode, the ring's draws allowed.
EngineConfig reference_config(const Variant& v, index_t k, NegativesMode mode, std::uint64_t seed) {
  EngineConfig cfg = objective_config(v);
  cfg.k = k;
  cfg.z_policy = ZPolicy::fixed;
  cfg.z_fixed = kRefZFixed;
  cfg.negatives = mode;
  cfg.allow_biased_sampler = true;
  cfg.seed = seed;
  return cfg;
}

Engine ring_engine(const EngineConfig& cfg, RingConfig rc, std::uint64_t seed = 21,
                   std::vector<std::int64_t> labels = {}) {
  std::mt19937_64 rng(seed);
  return Engine(Bank::from_rows(unit_rows(kN, kD, rng)), std::make_unique<RingSampler>(kN, rc), cfg,
                std::move(labels));
}

}  // namespace

TEST_CASE("ring sampler: each ring is the ranks lower to upper of a brute-force ranking, ties by id, every dtype") {
  std::mt19937_64 rng(1);
  const RowMatrixf rows = half_rows(kN, rng);
  const RowMatrixf f = half_rows(5, rng);
  for (const DType dtype : {DType::float32, DType::float16, DType::bfloat16}) {
    const Bank bank = Bank::from_rows(rows, dtype);
    for (const RingConfig c : {RingConfig{0, 1}, RingConfig{0, 10}, RingConfig{3, 40}, RingConfig{37, 38},
                               RingConfig{0, kN}, RingConfig{kN - 1, kN}, RingConfig{100, 250}}) {
      INFO(to_string(dtype) << " lower " << c.lower << " upper " << c.upper);
      const RingSampler s(kN, c);
      const auto cond = s.condition(bank.view(), f.data(), 4, 5, 4);
      std::vector<double> mean(static_cast<std::size_t>(kN), 0.0);
      for (index_t i = 0; i < 5; ++i) {
        const auto ring = s.ring({cond.get(), i});
        const std::vector<std::uint32_t> want = brute_ring(rows, f.row(i), c);
        CHECK(std::vector<std::uint32_t>(ring.begin(), ring.end()) == want);
        for (const auto j : want) mean[j] += 1.0 / (5.0 * static_cast<double>(want.size()));
      }
      // q(j | f_i) = 1/M on the ring and 0 elsewhere; the mean row's is their average.
      const QueryRef q0{cond.get(), 0}, qm{cond.get(), 5};
      const auto ring0 = brute_ring(rows, f.row(0), c);
      std::vector<index_t> all(static_cast<std::size_t>(kN));
      std::iota(all.begin(), all.end(), 0);
      std::vector<float> log_q(all.size()), log_mean(all.size());
      s.lookup_for(q0, all, log_q);
      s.lookup_for(qm, all, log_mean);
      double total = 0.0;
      for (index_t j = 0; j < kN; ++j) {
        const bool in = std::binary_search(ring0.begin(), ring0.end(), static_cast<std::uint32_t>(j));
        const double want = in ? 1.0 / static_cast<double>(c.upper - c.lower) : 0.0;
        CHECK(s.prob_for(j, q0) == doctest::Approx(want).epsilon(1e-15));
        CHECK(std::exp(static_cast<double>(log_q[static_cast<std::size_t>(j)])) == doctest::Approx(want).epsilon(1e-6));
        const double m = mean[static_cast<std::size_t>(j)];
        CHECK(s.prob_for(j, qm) == doctest::Approx(m).epsilon(1e-12));
        CHECK(std::exp(static_cast<double>(log_mean[static_cast<std::size_t>(j)])) == doctest::Approx(m).epsilon(1e-6));
        total += s.prob_for(j, qm);
      }
      CHECK(total == doctest::Approx(1.0).epsilon(1e-12));
    }
  }
  // Scores of random unit rows (no ties): the same ranking as in double. D = 8 spreads the scores over
  // many of the selection's buckets; 3,000 rows in D = 64 crowd them into a few (scores near 0), so
  // the ring's ends share buckets with many rows.
  for (const index_t d : {index_t{8}, index_t{64}}) {
    const index_t n = d == 8 ? kN : 3000;
    std::mt19937_64 rng2(static_cast<std::uint64_t>(d));
    const RowMatrixf rd = unit_rows(n, d, rng2);
    const RowMatrixf fd = unit_rows(3, d, rng2);
    for (const RingConfig c : {RingConfig{0, 1}, RingConfig{20, 60}, RingConfig{1, n / 10}, RingConfig{n / 4, 3 * n / 4},
                               RingConfig{n - 2, n}}) {
      INFO("D " << d << " lower " << c.lower << " upper " << c.upper);
      const RingSampler s(n, c);
      const auto cond = s.condition(Bank::from_rows(rd).view(), fd.data(), d, 3, d);
      for (index_t i = 0; i < 3; ++i) {
        const auto ring = s.ring({cond.get(), i});
        CHECK(std::vector<std::uint32_t>(ring.begin(), ring.end()) == brute_ring(rd, fd.row(i), c));
      }
    }
  }
}

TEST_CASE("ring sampler: draws are uniform over the ring and over the mean (chi-square at a fixed seed)") {
  std::mt19937_64 rng(3);
  const RowMatrixf rows = unit_rows(kN, kD, rng);
  const RowMatrixf f = unit_rows(4, kD, rng);
  const RingSampler s(kN, {5, 45});
  const auto cond = s.condition(Bank::from_rows(rows).view(), f.data(), kD, 4, kD);
  for (const index_t row : {index_t{2}, index_t{4}}) {  // a query's ring, then the batch's mean
    INFO("row " << row);
    const QueryRef q{cond.get(), row};
    constexpr index_t kDraws = 40000;
    std::vector<index_t> ids(static_cast<std::size_t>(kDraws));
    std::vector<float> log_pn(ids.size());
    DrawCursor cur{{7, 1, 0u, 2u}, Exclusion{}, kDraws};
    cur.query = q;
    s.draw_next(cur, ids, log_pn);
    std::vector<double> count(static_cast<std::size_t>(kN), 0.0);
    for (std::size_t t = 0; t < ids.size(); ++t) {
      count[static_cast<std::size_t>(ids[t])] += 1.0;
      CHECK(std::exp(static_cast<double>(log_pn[t])) == doctest::Approx(s.prob_for(ids[t], q)).epsilon(1e-6));
    }
    double chi2 = 0.0;
    int df = -1;
    for (index_t j = 0; j < kN; ++j) {
      const double e = s.prob_for(j, q) * kDraws;
      if (e == 0.0) {
        CHECK(count[static_cast<std::size_t>(j)] == 0.0);  // never a row outside the rings
        continue;
      }
      chi2 += (count[static_cast<std::size_t>(j)] - e) * (count[static_cast<std::size_t>(j)] - e) / e;
      ++df;
    }
    CAPTURE(chi2);
    CHECK(df >= 39);
    CHECK(chi2 < chi2_q999(df));
  }
  // Without a query the sampler is uniform over N.
  std::vector<index_t> ids(3000);
  std::vector<float> log_pn(ids.size());
  s.draw({9, 0, 0u, 2u}, Exclusion{}, ids, log_pn);
  for (const float lp : log_pn) CHECK(lp == doctest::Approx(-std::log(static_cast<double>(kN))).epsilon(1e-6));
  CHECK(*std::max_element(ids.begin(), ids.end()) > kN / 2);
}

TEST_CASE("ring sampler: draws in pieces equal one draw, with exclusions") {
  std::mt19937_64 rng(4);
  const RowMatrixf rows = unit_rows(kN, kD, rng);
  const RowMatrixf f = unit_rows(2, kD, rng);
  const RingSampler s(kN, {0, 6});
  const auto cond = s.condition(Bank::from_rows(rows).view(), f.data(), kD, 2, kD);
  const auto ring = s.ring({cond.get(), 1});
  const std::vector<index_t> excluded = {static_cast<index_t>(ring[0]), static_cast<index_t>(ring[3])};
  constexpr index_t kK = 150;
  std::vector<index_t> whole(kK), pieces(kK);
  std::vector<float> lw(kK), lp(kK);
  DrawCursor one{{5, 3, 1u, 2u}, Exclusion{excluded}, kK};
  one.query = {cond.get(), 1};
  s.draw_next(one, whole, lw);
  DrawCursor cur{{5, 3, 1u, 2u}, Exclusion{excluded}, kK};
  cur.query = {cond.get(), 1};
  for (index_t at = 0; at < kK;) {
    const index_t m = std::min<index_t>(at % 7 + 1, kK - at);
    s.draw_next(cur, std::span<index_t>(pieces.data() + at, static_cast<std::size_t>(m)),
                std::span<float>(lp.data() + at, static_cast<std::size_t>(m)));
    at += m;
  }
  CHECK(whole == pieces);
  CHECK(lw == lp);
  CHECK(one.redraws > 0);
  for (const index_t j : whole) {
    CHECK(std::find(excluded.begin(), excluded.end(), j) == excluded.end());
    CHECK(std::binary_search(ring.begin(), ring.end(), static_cast<std::uint32_t>(j)));
  }
}

TEST_CASE("ring sampler: refused by the objectives that need a valid P_n unless allowed, one clear error") {
  for (const Objective o : all_objectives()) {
    INFO(to_string(o));
    EngineConfig cfg;
    cfg.k = 10;
    cfg.objective = o;
    std::vector<std::int64_t> labels;
    if (needs_labels(o))
      for (index_t j = 0; j < kN; ++j) labels.push_back(j % 3);
    if (needs_valid_noise(o)) {
      const std::string msg = message_of<Error>([&] { ring_engine(cfg, {0, 20}, 21, labels); });
      CHECK(msg.find("allow_biased_sampler") != std::string::npos);
      CHECK(msg.find(to_string(o)) != std::string::npos);
      cfg.allow_biased_sampler = true;
    }
    CHECK_NOTHROW(ring_engine(cfg, {0, 20}, 21, labels));
  }
  // exclude_same_label: a label that leaves fewer than `upper` rows of other classes (3 classes of
  // 100 rows: 200 others, a ring up to rank 250) is refused by the step, which changes nothing.
  {
    EngineConfig cfg;
    cfg.k = 10;
    cfg.objective = Objective::triplet;
    cfg.exclude_same_label = true;
    std::vector<std::int64_t> labels;
    for (index_t j = 0; j < kN; ++j) labels.push_back(j % 3);
    Engine eng = ring_engine(cfg, {0, 250}, 21, labels);
    std::mt19937_64 r(4);
    const std::vector<index_t> ids = {1, 2};
    const RowMatrixf f = unit_rows(2, kD, r);
    RowMatrixf g(2, kD);
    const RowMatrixf before = eng.bank().to_matrix();
    const std::string msg = message_of<Error>([&] { eng.step(f, ids, g); });
    CHECK(msg.find("leaves 200 rows of other classes: expected at least upper = 250") != std::string::npos);
    CHECK(eng.steps_done() == 0);
    CHECK(bits_equal(eng.bank().to_matrix(), before));
  }
  CHECK(message_of<Error>([] { RingSampler(kN, {5, 5}); }).find("upper = 5") != std::string::npos);
  CHECK(message_of<Error>([] { RingSampler(kN, {-1, 5}); }).find("lower = -1") != std::string::npos);
  CHECK(message_of<Error>([] { RingSampler(kN, {0, kN + 1}); }).find("upper = 301") != std::string::npos);
  CHECK(message_of<Error>([] { RingSampler(0, {0, 1}); }).find("n = 0") != std::string::npos);
  // A ring sampler conditioned on another bank, or queries of another D: refused.
  std::mt19937_64 rng(5);
  const RingSampler s(kN, {0, 3});
  const RowMatrixf f = unit_rows(1, kD, rng);
  CHECK(message_of<Error>([&] { (void)s.condition(Bank::from_rows(unit_rows(kN - 1, kD, rng)).view(), f.data(), kD, 1, kD); })
            .find("N = 300") != std::string::npos);
}

TEST_CASE("ring sampler: every objective's loss and dL/df weigh the ring's draws as uniform ones (double reference)") {
  // Guards the engine's unweighted use of a biased sampler's draws: lw = 0 for the draws and the
  // positive (per-sample and shared, with and without exclude_positive), and every draw in its ring.
  std::mt19937_64 rng(6);
  std::vector<std::int64_t> labels;
  for (index_t j = 0; j < kN; ++j) labels.push_back(j % 4);
  for (const Variant& v : all_variants()) {
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared})
      for (const bool exclude : {false, true}) {
        INFO(v.name << (mode == NegativesMode::shared ? " shared" : " per-sample") << (exclude ? " exclude_positive" : ""));
        EngineConfig cfg = reference_config(v, 23, mode, 3);
        cfg.exclude_positive = exclude;
        Engine eng = ring_engine(cfg, {0, 12}, 22, needs_labels(v.obj) ? labels : std::vector<std::int64_t>{});
        const auto& s = dynamic_cast<const RingSampler&>(eng.sampler());
        const RowMatrixf bank = eng.bank().to_matrix();
        const std::vector<index_t> ids = {3, 50, 50, 121, 299};
        const RowMatrixf f = near_rows(bank, ids, 0.4, rng);
        const RowMatrixi negs = eng.sample(ids, 0, f);
        const auto cond = s.condition(eng.bank().view(), f.data(), kD, 5, kD);
        std::vector<Query> queries(5);
        const double uniform = 1.0 / static_cast<double>(kN);  // N q = 1: the weights of uniform draws
        for (index_t i = 0; i < 5; ++i) {
          const index_t y = ids[static_cast<std::size_t>(i)];
          Query& qq = queries[static_cast<std::size_t>(i)];
          qq.pos = {y, uniform, false, true};
          for (index_t k = 0; k < cfg.k; ++k) {
            const index_t j = mode == NegativesMode::shared ? negs(0, k) : negs(i, k);
            const QueryRef q{cond.get(), mode == NegativesMode::shared ? 5 : i};
            CHECK(s.prob_for(j, q) > 0.0);
            const bool same = needs_labels(v.obj) && labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(y)];
            qq.draws.push_back({j, uniform, false, same});
          }
        }
        check_against(eng, f, ids, negs, batch_reference(v, kN, queries, bank.cast<double>(), f.cast<double>()));
      }
  }
}

TEST_CASE("ring sampler: under exclude_same_label each ring ranks the other classes only (brute force, double reference)") {
  // Guards the label-excluding rings: each query's ring is ranks [lower, upper) of a brute-force
  // ranking of the rows of the other classes (ties by id), its label's mass in the ring is 0, no draw
  // has the query's label, and every objective's step (per-sample; shared: the batch mean's draws of
  // a query's own label masked) equals the double reference with uniform weights.
  std::mt19937_64 rng(9);
  std::vector<std::int64_t> labels;
  std::vector<std::int32_t> classes;
  for (index_t j = 0; j < kN; ++j) {
    labels.push_back((j * 7) % 4);
    classes.push_back(static_cast<std::int32_t>((j * 7) % 4));
  }
  {
    const Bank bank = Bank::from_rows(unit_rows(kN, kD, rng));
    const RowMatrixf rows = bank.to_matrix();
    const std::vector<index_t> ids = {0, 5, 77, 150, 299};
    const RowMatrixf f = near_rows(rows, ids, 0.3, rng);
    std::vector<std::int32_t> query_classes;
    for (const index_t y : ids) query_classes.push_back(classes[static_cast<std::size_t>(y)]);
    for (const RingConfig rc : {RingConfig{0, 30}, RingConfig{1, 25}, RingConfig{40, 200}}) {
      CAPTURE(rc.lower);
      const RingSampler s(kN, rc);
      const auto cond = s.condition_excluding(bank.view(), f.data(), kD, 5, kD, classes.data(), query_classes);
      std::vector<double> mass(5);
      s.class_mass_given(*cond, classes.data(), 4, query_classes, mass);
      for (index_t i = 0; i < 5; ++i) {
        CAPTURE(i);
        // brute force over the other classes' rows only
        std::vector<index_t> keep;
        for (index_t j = 0; j < kN; ++j)
          if (classes[static_cast<std::size_t>(j)] != query_classes[static_cast<std::size_t>(i)]) keep.push_back(j);
        RowMatrixf sub(static_cast<index_t>(keep.size()), kD);
        for (std::size_t t = 0; t < keep.size(); ++t) sub.row(static_cast<index_t>(t)) = rows.row(keep[t]);
        std::vector<std::uint32_t> want = brute_ring(sub, f.row(i), rc);
        for (auto& j : want) j = static_cast<std::uint32_t>(keep[j]);
        std::sort(want.begin(), want.end());
        const auto got = s.ring({cond.get(), i});
        CHECK(std::vector<std::uint32_t>(got.begin(), got.end()) == want);
        CHECK(mass[static_cast<std::size_t>(i)] == 0.0);
      }
      // Without the exclusion the same queries' rings do hold their labels (the test can fail).
      const auto plain = s.condition(bank.view(), f.data(), kD, 5, kD);
      s.class_mass_given(*plain, classes.data(), 4, query_classes, mass);
      CHECK(*std::max_element(mass.begin(), mass.end()) > 0.0);
    }
  }
  for (const Variant& v : all_variants()) {
    for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
      INFO(v.name << (mode == NegativesMode::shared ? " shared" : " per-sample"));
      EngineConfig cfg = reference_config(v, 19, mode, 4);
      cfg.exclude_same_label = true;
      Engine eng = ring_engine(cfg, {1, 15}, 23, labels);
      const RowMatrixf bank = eng.bank().to_matrix();
      const std::vector<index_t> ids = {3, 50, 50, 121, 298};
      const RowMatrixf f = near_rows(bank, ids, 0.4, rng);
      const RowMatrixi negs = eng.sample(ids, 0, f);
      std::vector<Query> queries(5);
      const double uniform = 1.0 / static_cast<double>(kN);
      for (index_t i = 0; i < 5; ++i) {
        const index_t y = ids[static_cast<std::size_t>(i)];
        Query& qq = queries[static_cast<std::size_t>(i)];
        qq.pos = {y, uniform, false, true};
        for (index_t k = 0; k < cfg.k; ++k) {
          const index_t j = mode == NegativesMode::shared ? negs(0, k) : negs(i, k);
          const bool same = labels[static_cast<std::size_t>(j)] == labels[static_cast<std::size_t>(y)];
          if (mode == NegativesMode::per_sample) CHECK_FALSE(same);  // the ring holds no row of its label
          qq.draws.push_back({j, uniform, same, needs_labels(v.obj) && same});
        }
      }
      check_against(eng, f, ids, negs, batch_reference(v, kN, queries, bank.cast<double>(), f.cast<double>()));
    }
  }
}

TEST_CASE("ring sampler: rings merged from shards' candidates equal the whole bank's, every dtype") {
  // Guards the sharded conditioning's two halves (DistributedEngine, sharded mode) without MPI: the
  // bank cut into uneven shards, each shard's candidates, concatenated shard after shard, merged into
  // exactly condition()'s rings -- with crowded exact ties (rows of +-1/2), with the label exclusion,
  // and with shards smaller than upper.
  std::mt19937_64 rng(12);
  const RowMatrixf rows = half_rows(kN, rng);
  const RowMatrixf f = half_rows(6, rng);
  std::vector<std::int32_t> classes;
  for (index_t j = 0; j < kN; ++j) classes.push_back(static_cast<std::int32_t>(j % 3));
  const std::vector<std::int32_t> query_classes = {0, 1, 2, 0, 1, 2};
  for (const DType t : {DType::float32, DType::float16, DType::bfloat16})
    for (const RingConfig rc : {RingConfig{0, 40}, RingConfig{7, 90}, RingConfig{1, 150}})
      for (const bool exclude : {false, true}) {
        CAPTURE(to_string(t));
        CAPTURE(rc.upper);
        CAPTURE(exclude);
        const Bank bank = Bank::from_rows(rows, t);
        const RingSampler s(kN, rc);
        const auto whole = exclude ? s.condition_excluding(bank.view(), f.data(), 4, 6, 4, classes.data(), query_classes)
                                   : s.condition(bank.view(), f.data(), 4, 6, 4);
        std::vector<std::uint64_t> all;
        std::vector<index_t> per_shard;
        for (const auto& [begin, end] : {std::pair<index_t, index_t>{0, 37}, {37, 170}, {170, 171}, {171, kN}}) {
          const Bank shard = Bank::from_rows(rows.middleRows(begin, end - begin), t);
          const std::vector<std::uint64_t> mine = s.candidates(shard.view(), begin, f.data(), 4, 6, 4,
                                                               exclude ? classes.data() : nullptr, query_classes);
          CHECK(static_cast<index_t>(mine.size()) == 6 * s.shard_candidates(end - begin));
          all.insert(all.end(), mine.begin(), mine.end());
          per_shard.push_back(s.shard_candidates(end - begin));
        }
        const auto merged = s.from_candidates(all, per_shard, 6);
        for (index_t i = 0; i < 6; ++i) {
          const auto a = s.ring({whole.get(), i}), b = s.ring({merged.get(), i});
          CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
        }
      }
  // Too few candidates for the ring: refused.
  const RingSampler s(kN, {0, 40});
  const std::vector<std::uint64_t> few(6 * 10, 0);
  const std::vector<index_t> one = {10};
  CHECK(message_of<Error>([&] { (void)s.from_candidates(few, one, 6); }).find("at least upper = 40") != std::string::npos);
}

TEST_CASE("ring sampler: 1 and 2 OpenMP threads give bit-identical rings and steps") {
  std::vector<RowMatrixf> grads, banks;
  std::vector<double> losses;
  std::vector<std::vector<std::uint32_t>> rings;
  for (const int threads : {1, 2}) {
    const ThreadCount tc(threads);
    EngineConfig cfg;
    cfg.k = 30;
    cfg.objective = Objective::info_nce;
    cfg.allow_biased_sampler = true;
    cfg.seed = 4;
    Engine eng = ring_engine(cfg, {2, 40});
    std::mt19937_64 rng(16);
    RowMatrixf g(40, kD);
    double loss = 0.0;
    for (int step = 0; step < 4; ++step) {
      const std::vector<index_t> ids = random_ids(40, kN, rng);
      const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
      loss += eng.step(f, ids, g, true).loss;
    }
    const RowMatrixf f = unit_rows(40, kD, rng);
    const auto& s = dynamic_cast<const RingSampler&>(eng.sampler());
    const auto cond = s.condition(eng.bank().view(), f.data(), kD, 40, kD);
    std::vector<std::uint32_t> all;
    for (index_t i = 0; i < 40; ++i) {
      const auto r = s.ring({cond.get(), i});
      all.insert(all.end(), r.begin(), r.end());
    }
    rings.push_back(all);
    grads.push_back(g);
    banks.push_back(eng.bank().to_matrix());
    losses.push_back(loss);
  }
  CHECK(rings[0] == rings[1]);
  CHECK(bits_equal(grads[0], grads[1]));
  CHECK(bits_equal(banks[0], banks[1]));
  CHECK(bits_equal(losses[0], losses[1]));
}

TEST_CASE("ring sampler: a resumed snapshot continues bit for bit and keeps allow_biased_sampler") {
  const ScratchDir dir("ring", "snapshot");
  const std::string path = dir / "r.h5";
  EngineConfig cfg;
  cfg.k = 16;
  cfg.objective = Objective::nce;
  cfg.allow_biased_sampler = true;
  cfg.seed = 8;
  Engine a = ring_engine(cfg, {1, 30});
  std::mt19937_64 rng(18);
  RowMatrixf g(10, kD), h(10, kD);
  for (int t = 0; t < 2; ++t) {
    const std::vector<index_t> ids = random_ids(10, kN, rng);
    a.step(unit_rows(10, kD, rng), ids, g, true);
  }
  save_snapshot(path, a);
  Engine b = load_snapshot(path);
  REQUIRE(b.sampler().kind() == SamplerKind::ring);
  CHECK(b.config().allow_biased_sampler);
  CHECK(dynamic_cast<const RingSampler&>(b.sampler()).config().lower == 1);
  CHECK(dynamic_cast<const RingSampler&>(b.sampler()).config().upper == 30);
  for (int t = 2; t < 5; ++t) {
    const std::vector<index_t> ids = random_ids(10, kN, rng);
    const RowMatrixf f = unit_rows(10, kD, rng);
    const StepStats sa = a.step(f, ids, g, true);
    const StepStats sb = b.step(f, ids, h, true);
    CHECK(bits_equal(sa.loss, sb.loss));
    CHECK(bits_equal(g, h));
  }
  CHECK(bits_equal(a.bank().to_matrix(), b.bank().to_matrix()));
}
