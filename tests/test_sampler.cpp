// Noise samplers: the distribution of the draws (chi-square), the reported probabilities,
// exclusion, and the counter-based streams.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include <Random123/philox.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

/// 0.999 quantile of chi-square with `df` degrees of freedom, Wilson-Hilferty approximation
/// (accurate to ~0.1% here: df = 48 gives 84.12 vs the table's 84.04; df = 49: 85.43 vs 85.35).
double chi2_q999(int df) {
  const double z = 3.090232306167813;  // standard normal 0.999 quantile
  const double a = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - a + z * std::sqrt(a), 3.0);
}

/// Pearson statistic over the cells with p > 0; `cells` receives how many there were.
double chi2(const std::vector<std::int64_t>& counts, const std::vector<double>& p, std::int64_t total,
            int* cells) {
  double x = 0;
  int c = 0;
  for (std::size_t j = 0; j < p.size(); ++j) {
    if (p[j] <= 0) continue;
    const double e = p[j] * static_cast<double>(total);
    x += (static_cast<double>(counts[j]) - e) * (static_cast<double>(counts[j]) - e) / e;
    ++c;
  }
  *cells = c;
  return x;
}

/// 50 varied weights in [0.1, 5.0], one of them (id 7) zero.
std::vector<double> chi2_weights() {
  std::vector<double> w(50);
  for (std::size_t j = 0; j < w.size(); ++j) w[j] = 0.1 + static_cast<double>((j * 37) % 50) / 10.0;
  w[7] = 0.0;
  return w;
}

/// 200 streams of 1000 draws (keys differ in step and row), counting ids; checks exp(log_pn) == prob(id).
std::vector<std::int64_t> draw_counts(const NoiseSampler& s, std::span<const index_t> excluded,
                                      std::int64_t* total, bool* pn_ok) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(s.size()), 0);
  std::vector<index_t> ids(1000);
  std::vector<float> log_pn(1000);
  *pn_ok = true;
  *total = 0;
  for (std::uint32_t c = 0; c < 200; ++c) {
    s.draw(StreamKey{777, static_cast<std::int64_t>(c / 10), c % 10, 0}, excluded, ids, log_pn);
    for (std::size_t k = 0; k < ids.size(); ++k) {
      REQUIRE(ids[k] >= 0);
      REQUIRE(ids[k] < s.size());
      ++counts[static_cast<std::size_t>(ids[k])];
      if (std::abs(std::exp(double(log_pn[k])) - s.prob(ids[k])) > 2e-6 * s.prob(ids[k])) *pn_ok = false;
    }
    *total += static_cast<std::int64_t>(ids.size());
  }
  return counts;
}

}  // namespace

TEST_CASE("AliasSampler reports the normalised weights") {
  // Guards prob(j), probs() and normalized_weights() against w / sum(w) computed here (1e-6
  // relative; exactly 0 for the zero weight), and kind().
  const std::vector<double> w = chi2_weights();
  const std::vector<double> p = normalised(w);
  const AliasSampler s(w);
  CHECK(s.kind() == SamplerKind::alias);
  REQUIRE(s.size() == 50);
  const std::vector<double> all = s.probs();
  REQUIRE(all.size() == 50);
  for (std::size_t j = 0; j < 50; ++j) {
    CAPTURE(j);
    if (p[j] == 0) {
      CHECK(s.prob(static_cast<index_t>(j)) == 0.0);
      CHECK(all[j] == 0.0);
    } else {
      CHECK(rel_err(s.prob(static_cast<index_t>(j)), p[j]) < 1e-6);
      CHECK(rel_err(all[j], p[j]) < 1e-6);
    }
    CHECK(s.normalized_weights()[j] == doctest::Approx(p[j]).epsilon(1e-12));
  }
}

TEST_CASE("AliasSampler draws follow P_n (chi-square at a fixed seed)") {
  // Guards the Vose table and its draws: 200k draws over 50 cells with varied weights pass a
  // chi-square goodness-of-fit test at the 0.999 level (df = 49 non-zero cells - 1 = 48), the
  // zero-weight cell is never drawn, and every reported pn equals prob(id). The same counts
  // against a uniform expectation fail the test by far (the test has power).
  const std::vector<double> w = chi2_weights();
  const std::vector<double> p = normalised(w);
  const AliasSampler s(w);
  std::int64_t total = 0;
  bool pn_ok = false;
  const std::vector<std::int64_t> counts = draw_counts(s, {}, &total, &pn_ok);
  CHECK(pn_ok);
  CHECK(counts[7] == 0);
  int cells = 0;
  const double x = chi2(counts, p, total, &cells);
  REQUIRE(cells == 49);
  INFO("chi2 = " << x << " threshold " << chi2_q999(cells - 1));
  CHECK(x < chi2_q999(cells - 1));
  int cu = 0;
  std::vector<double> pu = uniform_pn(50);
  pu[7] = 0;
  for (auto& v : pu) v = v > 0 ? 1.0 / 49 : 0.0;
  const double xu = chi2(counts, pu, total, &cu);
  CHECK(xu > 10 * chi2_q999(cu - 1));
}

TEST_CASE("UniformSampler draws are uniform and P_n = 1/N") {
  // Guards the uniform sampler: prob(j) = probs()[j] = 1/N, chi-square over 50 cells
  // (df = 49) at the 0.999 level, pn == 1/N for every draw.
  const UniformSampler s(50);
  CHECK(s.kind() == SamplerKind::uniform);
  REQUIRE(s.size() == 50);
  for (index_t j = 0; j < 50; ++j) CHECK(s.prob(j) == doctest::Approx(1.0 / 50).epsilon(1e-15));
  for (double q : s.probs()) CHECK(q == doctest::Approx(1.0 / 50).epsilon(1e-15));
  std::int64_t total = 0;
  bool pn_ok = false;
  const std::vector<std::int64_t> counts = draw_counts(s, {}, &total, &pn_ok);
  CHECK(pn_ok);
  int cells = 0;
  const double x = chi2(counts, uniform_pn(50), total, &cells);
  INFO("chi2 = " << x << " threshold " << chi2_q999(cells - 1));
  CHECK(x < chi2_q999(cells - 1));
}

TEST_CASE("exclusion: excluded ids never appear, the rest follow the conditional P_n") {
  // Guards draw() with a sorted exclusion list for both samplers: excluded ids never drawn, the
  // remaining ids follow P_n(j) / (1 - P_n(excluded)) (chi-square, 0.999), pn stays the
  // unconditional P_n(id); excluding all but one id draws only that id.
  const std::vector<index_t> excluded{2, 10, 11, 30, 49};
  const std::vector<double> w = chi2_weights();
  const AliasSampler alias(w);
  const UniformSampler uni(50);
  for (const NoiseSampler* s : {static_cast<const NoiseSampler*>(&alias), static_cast<const NoiseSampler*>(&uni)}) {
    INFO(to_string(s->kind()));
    std::int64_t total = 0;
    bool pn_ok = false;
    const std::vector<std::int64_t> counts = draw_counts(*s, excluded, &total, &pn_ok);
    CHECK(pn_ok);
    std::vector<double> cond = s->probs();
    double kept = 0;
    for (index_t e : excluded) {
      CHECK(counts[static_cast<std::size_t>(e)] == 0);
      cond[static_cast<std::size_t>(e)] = 0;
    }
    for (double q : cond) kept += q;
    for (auto& q : cond) q /= kept;
    int cells = 0;
    const double x = chi2(counts, cond, total, &cells);
    INFO("chi2 = " << x << " threshold " << chi2_q999(cells - 1));
    CHECK(x < chi2_q999(cells - 1));
  }
  // All but one id excluded.
  std::vector<index_t> all_but_3;
  for (index_t j = 0; j < 50; ++j)
    if (j != 3) all_but_3.push_back(j);
  std::vector<index_t> ids(500);
  std::vector<float> log_pn(500);
  alias.draw(StreamKey{1, 2, 3, 0}, all_but_3, ids, log_pn);
  CHECK(std::all_of(ids.begin(), ids.end(), [](index_t j) { return j == 3; }));
  uni.draw(StreamKey{1, 2, 3, 0}, all_but_3, ids, log_pn);
  CHECK(std::all_of(ids.begin(), ids.end(), [](index_t j) { return j == 3; }));
  CHECK(std::exp(double(log_pn[0])) == doctest::Approx(1.0 / 50));
}

TEST_CASE("draw() is a pure function of the stream key and position") {
  // Guards counter-based randomness: identical keys give identical draws, a prefix request gives
  // the prefix of a longer one, and changing seed, step, row or purpose changes the draws.
  std::mt19937_64 rng(5);
  const AliasSampler s(random_weights(1000, rng));
  auto draw = [&](StreamKey key, std::size_t k) {
    std::vector<index_t> ids(k);
    std::vector<float> log_pn(k);
    s.draw(key, std::span<const index_t>{}, ids, log_pn);
    return ids;
  };
  const StreamKey key{11, 22, 33, 4};
  const std::vector<index_t> a = draw(key, 1000);
  CHECK(a == draw(key, 1000));
  const std::vector<index_t> prefix = draw(key, 100);
  CHECK(std::equal(prefix.begin(), prefix.end(), a.begin()));
  CHECK(a != draw(StreamKey{12, 22, 33, 4}, 1000));
  CHECK(a != draw(StreamKey{11, 23, 33, 4}, 1000));
  CHECK(a != draw(StreamKey{11, 22, 34, 4}, 1000));
  CHECK(a != draw(StreamKey{11, 22, 33, 5}, 1000));
  // Seed bits above 32 and step bits above 32 matter too.
  CHECK(a != draw(StreamKey{11 + (std::uint64_t{1} << 40), 22, 33, 4}, 1000));
  CHECK(a != draw(StreamKey{11, 22 + (std::int64_t{1} << 33), 33, 4}, 1000));
}

TEST_CASE("draw_next: the pieces of a cursor are exactly one draw of all of them") {
  // Guards DrawCursor (the engine's kernel draws a block of negatives at a time): for both samplers,
  // with no exclusion, an excluded-id list that rejects about a third of the draws, and a label
  // exclusion, K draws taken in pieces of uneven sizes (0 included) through one cursor equal one
  // draw() of K, ids and log P_n bit for bit; a piece past the stream's end throws and leaves the
  // cursor as it was.
  std::mt19937_64 rng(8);
  const AliasSampler alias(random_weights(60, rng));
  const UniformSampler uni(60);
  std::vector<index_t> excluded;
  for (index_t j = 0; j < 60; j += 3) excluded.push_back(j);
  std::vector<std::int32_t> classes(60);
  for (std::size_t j = 0; j < classes.size(); ++j) classes[j] = static_cast<std::int32_t>(j % 4);
  const std::vector<Exclusion> exclusions{Exclusion{}, Exclusion{excluded}, Exclusion{{}, classes.data(), 2}};
  constexpr std::size_t k = 1000;
  for (const NoiseSampler* s : {static_cast<const NoiseSampler*>(&alias), static_cast<const NoiseSampler*>(&uni)})
    for (std::size_t e = 0; e < exclusions.size(); ++e) {
      INFO(to_string(s->kind()) << ", exclusion " << e);
      const StreamKey key{3, 4, 5, 2};
      std::vector<index_t> whole(k), pieces(k);
      std::vector<float> whole_p(k), pieces_p(k);
      s->draw(key, exclusions[e], whole, whole_p);
      DrawCursor cursor{key, exclusions[e], static_cast<index_t>(k)};
      std::uniform_int_distribution<std::size_t> size(0, 40);
      for (std::size_t at = 0; at < k;) {
        const std::size_t n = std::min(size(rng), k - at);
        s->draw_next(cursor, std::span(pieces).subspan(at, n), std::span(pieces_p).subspan(at, n));
        at += n;
      }
      CHECK(cursor.drawn == static_cast<index_t>(k));
      CHECK(pieces == whole);
      CHECK(std::memcmp(pieces_p.data(), whole_p.data(), k * sizeof(float)) == 0);
      CHECK_FALSE(std::any_of(whole.begin(), whole.end(), [&](index_t j) { return exclusions[e].contains(j); }));
      if (e > 0)  // the exclusion made the stream redraw
        CHECK((s->kind() == SamplerKind::alias ? cursor.redraws > 0 : cursor.next_block > k / 2));
      // One more draw does not fit: refused, the cursor untouched.
      const DrawCursor before = cursor;
      std::vector<index_t> extra(1);
      std::vector<float> extra_p(1);
      CHECK_THROWS_AS(s->draw_next(cursor, extra, extra_p), Error);
      CHECK(cursor.drawn == before.drawn);
      CHECK(cursor.next_block == before.next_block);
      CHECK(cursor.redraws == before.redraws);
    }
}

TEST_CASE("UniformSampler's stream is Philox4x32-10 halves with excluded ids skipped") {
  // Guards the stream's definition against a plain reference on Random123: block b of a stream is
  // philox(counter = {b, row, step_lo, step_hi | purpose << 24}, key = {seed_lo, seed_hi}); its two
  // 64-bit halves (words 0:1, then 2:3) are two draws floor(u n / 2^64) in turn, and a draw that hits
  // an excluded id is skipped. N = 7 makes rejections frequent; the cases are no exclusion, one id,
  // several ids and a class, each drawn whole and in pieces of 1 to 5.
  constexpr index_t n = 7;
  const UniformSampler s(n);
  const StreamKey key{0x123456789abULL, (std::int64_t{3} << 32) + 9, 41, 2};
  const auto reference = [&](const Exclusion& e, std::size_t k) {
    r123::Philox4x32 philox;
    const r123::Philox4x32::key_type pk = {{0x456789abu, 0x123u}};
    std::vector<index_t> out;
    for (std::uint32_t b = 0; out.size() < k; ++b) {
      const r123::Philox4x32::ctr_type w = philox({{b, 41u, 9u, 3u | (2u << 24)}}, pk);
      for (int half = 0; half < 2 && out.size() < k; ++half) {
        const std::uint64_t u = (std::uint64_t{w.v[2 * half]} << 32) | w.v[2 * half + 1];
        const auto j = static_cast<index_t>((static_cast<unsigned __int128>(u) * n) >> 64);
        const bool skip = (e.classes != nullptr && e.classes[j] == e.cls) ||
                          std::find(e.ids.begin(), e.ids.end(), j) != e.ids.end();
        if (!skip) out.push_back(j);
      }
    }
    return out;
  };
  const std::vector<index_t> one{4}, several{0, 2, 5};
  const std::vector<std::int32_t> classes{0, 1, 1, 0, 2, 1, 0};
  const std::vector<Exclusion> exclusions{Exclusion{}, Exclusion{one}, Exclusion{several},
                                          Exclusion{{}, classes.data(), 1}};
  std::mt19937_64 rng(3);
  for (std::size_t e = 0; e < exclusions.size(); ++e) {
    INFO("exclusion " << e);
    constexpr std::size_t k = 301;
    const std::vector<index_t> want = reference(exclusions[e], k);
    std::vector<index_t> whole(k), pieces(k);
    std::vector<float> p(k);
    s.draw(key, exclusions[e], whole, p);
    CHECK(whole == want);
    DrawCursor cursor{key, exclusions[e], static_cast<index_t>(k)};
    std::uniform_int_distribution<std::size_t> size(1, 5);
    for (std::size_t at = 0; at < k;) {
      const std::size_t m = std::min(size(rng), k - at);
      s.draw_next(cursor, std::span(pieces).subspan(at, m), std::span(p).subspan(at, m));
      at += m;
    }
    CHECK(pieces == want);
  }
}

TEST_CASE("sampler kind names round-trip") {
  // Guards to_string / sampler_kind_from_string.
  CHECK(to_string(SamplerKind::uniform) == "uniform");
  CHECK(to_string(SamplerKind::alias) == "alias");
  CHECK(sampler_kind_from_string("uniform") == SamplerKind::uniform);
  CHECK(sampler_kind_from_string("alias") == SamplerKind::alias);
  for (const SamplerKind k : {SamplerKind::uniform, SamplerKind::alias, SamplerKind::dynamic, SamplerKind::cluster})
    CHECK(sampler_kind_from_string(to_string(k)) == k);
  CHECK_THROWS_WITH_AS(sampler_kind_from_string("Uniform"), doctest::Contains("expected 'uniform'"), Error);
}
