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
#include <memory>
#include <random>
#include <span>
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

namespace {

/// The probability with which the table draws each id, from its cells (brute force, in double): a
/// draw picks cell i with probability 1/N, then keeps i with probability keep_probability(i) or goes
/// to alias i.
std::vector<double> realised_pn(const AliasSampler& s) {
  const std::size_t n = static_cast<std::size_t>(s.size());
  const std::span<const AliasSampler::Cell> cells = s.cells();
  REQUIRE(cells.size() == n);
  std::vector<double> got(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const double keep = s.keep_probability(static_cast<index_t>(i));
    REQUIRE(keep >= 0.0);
    REQUIRE(keep <= 1.0);
    REQUIRE(cells[i].alias < n);
    got[i] += keep;
    got[cells[i].alias] += 1.0 - keep;
  }
  for (double& g : got) g /= static_cast<double>(n);
  return got;
}

/// Weight sets for the table's tests: random weights with about a tenth of them zero (N = 1000 and
/// N = 100003, neither a power of two; the larger one is built on several threads), one weight
/// 10^12 times the others, a single weight, equal weights, and weights spanning 30 orders of
/// magnitude.
std::vector<std::vector<double>> table_weight_sets() {
  std::mt19937_64 rng(21);
  std::vector<std::vector<double>> sets;
  for (const index_t n : {index_t{1000}, index_t{100003}}) {
    std::vector<double> w = random_weights(n, rng);
    for (std::size_t j = 0; j < w.size(); j += 1 + rng() % 19) w[j] = 0.0;
    sets.push_back(w);
  }
  std::vector<double> heavy(257, 1.0);
  heavy[100] = 1e12;
  sets.push_back(heavy);
  sets.push_back({3.5});
  sets.push_back(std::vector<double>(96, 0.25));
  std::vector<double> wide(5000);
  std::uniform_real_distribution<double> e(-15.0, 15.0);
  for (double& x : wide) x = std::pow(10.0, e(rng));
  sets.push_back(wide);
  return sets;
}

}  // namespace

TEST_CASE("AliasSampler's table realises P_n to rounding") {
  // Guards the table's construction (the pairing of small and large cells, the split 53-bit
  // thresholds): for each weight set, the probability of each id summed over the cells (keep
  // probability to the cell's own id, the rest to its alias, each cell 1/N) equals w_j / sum(w)
  // computed here within 1e-12 relative, plus what rounding cannot avoid:
  // - a keep probability is a multiple of 2^-53 (what a 53-bit coin can realise), so each of the
  //   1 + a_j cells that give id j mass (its own, and the a_j that alias it) may be off by
  //   2^-53 / N; this matters only where N p_j is below about 10^-4 (the 10^12 weight's neighbours);
  // - the cells hand out exactly 1, the reported P_n sum to 1 only up to the rounding of the total
  //   (2^-53 relative), and what is missing lands on the one cell left unpaired at the end, with
  //   the rounding of the updates that pass down to it: 2 2^-53 more for a cell that is its own
  //   alias (N = 100003 uses about a third of one).
  // A zero weight must get exactly 0.
  for (const std::vector<double>& w : table_weight_sets()) {
    INFO("N = " << w.size());
    const AliasSampler s(w);
    const std::vector<double> p = normalised(w);
    const std::vector<double> got = realised_pn(s);
    const std::span<const AliasSampler::Cell> cells = s.cells();
    std::vector<double> givers(w.size(), 1.0);  // 1 + a_j
    for (const AliasSampler::Cell& c : cells) givers[c.alias] += 1.0;
    const auto nd = static_cast<double>(w.size());
    const double quantum = 0x1.0p-53 / nd;
    double worst = 0.0;  // the largest error in units of its tolerance
    bool zeros_ok = true;
    for (std::size_t j = 0; j < w.size(); ++j) {
      if (p[j] == 0.0) {
        zeros_ok = zeros_ok && got[j] == 0.0;
        continue;
      }
      const double left_over = cells[j].alias == j ? 0x1.0p-53 * 2.0 : 0.0;
      worst = std::max(worst, std::abs(got[j] - p[j]) / (1e-12 * p[j] + givers[j] * quantum + left_over));
    }
    CHECK(zeros_ok);
    CHECK(worst <= 1.0);
  }
}

TEST_CASE("AliasSampler's table is the same bit for bit on 1 and 2 threads") {
  // Guards the parallel passes of the construction (snapshots store the weights and rebuild the
  // table): built under 1 and 2 OpenMP threads, from weights large enough for the parallel path, the
  // cells, keep probabilities, P_n and the stored weights are equal bit for bit.
  for (const std::vector<double>& w : table_weight_sets()) {
    INFO("N = " << w.size());
    std::unique_ptr<AliasSampler> one, two;
    {
      ThreadCount tc(1);
      one = std::make_unique<AliasSampler>(w);
    }
    {
      ThreadCount tc(2);
      two = std::make_unique<AliasSampler>(w);
    }
    REQUIRE(one->cells().size() == two->cells().size());
    CHECK(std::memcmp(one->cells().data(), two->cells().data(), one->cells().size_bytes()) == 0);
    bool keep_equal = true;
    for (index_t j = 0; j < one->size(); ++j) keep_equal = keep_equal && one->keep_probability(j) == two->keep_probability(j);
    CHECK(keep_equal);
    const std::vector<double> p1 = one->probs(), p2 = two->probs();
    CHECK(std::memcmp(p1.data(), p2.data(), p1.size() * sizeof(double)) == 0);
    CHECK(std::equal(one->weights().begin(), one->weights().end(), w.begin()));
  }
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

TEST_CASE("draw_next: streams interleaved on one thread, in the engine's pieces, equal whole draws") {
  // Guards the alias sampler's blocks made ahead (kept per thread for the next piece of the same
  // stream, whichever sampler draws it): stream A and stream B of one sampler, and stream A of a
  // second sampler of another size (C, one piece of 64 ahead of A, so that it continues where A's
  // blocks made ahead begin) are drawn a piece at a time in turn -- A, C, then B twice -- in pieces
  // of 64 as the engine's kernel draws them, then of 64 and 37 alternately. Each stream equals one
  // draw() of the whole of it, ids and log P_n bit for bit.
  std::mt19937_64 rng(9);
  const AliasSampler a(random_weights(5000, rng)), b(random_weights(777, rng));
  constexpr std::size_t k = 2000;
  for (const std::size_t odd : {std::size_t{64}, std::size_t{37}}) {
    INFO("pieces of 64 and " << odd);
    struct Drawn {
      const AliasSampler* s;
      StreamKey key;
      DrawCursor cursor{};
      std::size_t at = 0;
      std::vector<index_t> ids = std::vector<index_t>(k);
      std::vector<float> log_pn = std::vector<float>(k);
      void piece(std::size_t n) {
        n = std::min(n, k - at);
        s->draw_next(cursor, std::span(ids).subspan(at, n), std::span(log_pn).subspan(at, n));
        at += n;
      }
    };
    std::vector<Drawn> streams{{&a, {3, 4, 5, 2}}, {&a, {3, 4, 6, 2}}, {&b, {3, 4, 5, 2}}};
    for (Drawn& d : streams) d.cursor = DrawCursor{d.key, Exclusion{}, static_cast<index_t>(k)};
    streams[2].piece(64);
    for (std::size_t turn = 0; streams[0].at < k || streams[1].at < k || streams[2].at < k; ++turn) {
      const std::size_t n = turn % 2 == 0 ? 64 : odd;
      streams[0].piece(n);
      streams[2].piece(n);
      streams[1].piece(n);
      streams[1].piece(n);
    }
    for (const Drawn& d : streams) {
      std::vector<index_t> ids(k);
      std::vector<float> log_pn(k);
      d.s->draw(d.key, Exclusion{}, ids, log_pn);
      CHECK(ids == d.ids);
      CHECK(std::memcmp(log_pn.data(), d.log_pn.data(), k * sizeof(float)) == 0);
    }
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
