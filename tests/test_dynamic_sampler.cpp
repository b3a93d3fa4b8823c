// DynamicSampler: the distribution of the draws after many weight changes (chi-square against a
// naive double reference kept here), the reported probabilities, rebuild-from-weights identity,
// refused input, thread-count independence, and the engine with a dynamic sampler (loss and gradient
// against the double reference, caller-set and engine-driven weights, snapshot resume).
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/dynamic_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

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
