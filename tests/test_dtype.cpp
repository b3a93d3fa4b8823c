// Banks of 2-byte rows (fp16, bf16; membank/dtype.hpp): the conversions against the published formats
// on every instruction-set path, rounding to nearest (ties to even) and stochastic rounding
// (unbiased, reproducible), the unit-norm invariant over many refreshes, and the exact softmax and
// kNN of a 2-byte bank equal to those of its widened fp32 copy.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/bank.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/isa.hpp>
#include <membank/knn.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// The value of a 16-bit word of type t, from the published layouts (in double): fp16 is
/// (-1)^s 2^(e - 15) (1 + m / 2^10), subnormal (-1)^s m 2^-24; bf16 is (-1)^s 2^(e - 127) (1 + m / 2^7),
/// subnormal (-1)^s m 2^-133. Infinity for the all-ones exponent with m = 0, NaN otherwise.
double word_value(DType t, std::uint16_t w) {
  const bool half = t == DType::float16;
  const int mbits = half ? 10 : 7, emax = half ? 31 : 255, bias = half ? 15 : 127;
  const int s = w >> 15, e = (w >> mbits) & emax, m = w & ((1 << mbits) - 1);
  double v;
  if (e == emax)
    v = m == 0 ? kInf : std::numeric_limits<double>::quiet_NaN();
  else if (e == 0)
    v = std::ldexp(m, 1 - bias - mbits);
  else
    v = std::ldexp(1.0 + std::ldexp(m, -mbits), e - bias);
  return s ? -v : v;
}

/// The largest finite positive word (its successor is infinity).
std::uint16_t max_finite(DType t) { return t == DType::float16 ? 0x7BFF : 0x7F7F; }

/// Round to nearest, ties to the even word, from the table of every finite non-negative word (the
/// words' order is their values' order): an independent reference for the engine's narrowing.
std::uint16_t reference_round(DType t, float x) {
  const double a = std::fabs(static_cast<double>(x));
  const std::uint16_t top = max_finite(t);
  std::uint16_t w;
  // Beyond the largest finite value by half a gap or more: infinity.
  const double limit = word_value(t, top) + 0.5 * (word_value(t, top) - word_value(t, top - 1));
  if (a >= limit) {
    w = static_cast<std::uint16_t>(top + 1);
  } else {
    std::uint16_t lo = 0, hi = top;  // largest word with value <= a
    while (lo < hi) {
      const auto mid = static_cast<std::uint16_t>((lo + hi + 1) / 2);
      if (word_value(t, mid) <= a) lo = mid; else hi = static_cast<std::uint16_t>(mid - 1);
    }
    w = lo;
    if (lo < top || a > word_value(t, top)) {
      const double below = a - word_value(t, lo), above = word_value(t, static_cast<std::uint16_t>(lo + 1)) - a;
      if (above < below || (above == below && (lo & 1))) w = static_cast<std::uint16_t>(lo + 1);
    }
  }
  return std::signbit(x) ? static_cast<std::uint16_t>(w | 0x8000) : w;
}

/// The 16-bit words of a 2-byte bank's rows (N x D, padding skipped).
std::vector<std::uint16_t> words_of(const Bank& bank) {
  std::vector<std::uint16_t> out(static_cast<std::size_t>(bank.size() * bank.dim()));
  const BankView v = bank.view();
  for (index_t i = 0; i < v.rows; ++i)
    std::memcpy(out.data() + i * v.dim, v.row_data(i), static_cast<std::size_t>(v.dim) * 2);
  return out;
}

/// A bank of type t holding exactly `values` (n x dim fp32, rows finite and non-zero) rounded to
/// nearest: from_blocks with no renormalisation.
Bank bank_of_values(const RowMatrixf& values, DType t) {
  return Bank::from_blocks(values.rows(), values.cols(), 97,
                           [&](index_t r0, index_t rows, float* dst, index_t stride) {
                             for (index_t r = 0; r < rows; ++r)
                               std::copy_n(values.row(r0 + r).data(), values.cols(), dst + r * stride);
                           },
                           kInf, nullptr, t);
}

constexpr DType kTwoByte[] = {DType::float16, DType::bfloat16};

}  // namespace

TEST_CASE("dtype names parse, and unknown names are refused naming the value") {
  for (const DType t : {DType::float32, DType::float16, DType::bfloat16}) CHECK(dtype_from_string(to_string(t)) == t);
  CHECK(dtype_from_string("fp16") == DType::float16);
  CHECK(dtype_from_string("bf16") == DType::bfloat16);
  CHECK_THROWS_WITH_AS(dtype_from_string("float8"), doctest::Contains("'float8'"), Error);
  CHECK(rounding_from_string("stochastic") == Rounding::stochastic);
  CHECK_THROWS_WITH_AS(rounding_from_string("up"), doctest::Contains("'up'"), Error);
  CHECK(dtype_bytes(DType::float16) == 2);
  CHECK(unit_roundoff(DType::bfloat16) == std::ldexp(1.0, -8));
}

TEST_CASE("every path widens every finite fp16 and bf16 word to its published value") {
  // Guards kernels::Table::widen (F16C on AVX2 / AVX-512, integer code on the scalar path) and the
  // bf16 shift: all 63,488 finite fp16 words and all 65,280 finite bf16 words, subnormals included,
  // through a bank (from_raw_blocks keeps the words: the tolerance is infinite) and to_matrix.
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    std::vector<std::uint16_t> words;
    for (std::uint32_t w = 0; w < 0x10000; ++w)
      if (std::isfinite(word_value(t, static_cast<std::uint16_t>(w)))) words.push_back(static_cast<std::uint16_t>(w));
    constexpr index_t dim = 24;  // not a multiple of 16: the scalar tails run too
    while (words.size() % dim) words.push_back(0x3C00);
    // No row may be all zeros: put a one (fp16 0x3C00, bf16 0x3F80) at column 0 of each row.
    const std::uint16_t one = t == DType::float16 ? 0x3C00 : 0x3F80;
    const auto n = static_cast<index_t>(words.size()) / dim;
    for (const Isa isa : supported_paths()) {
      CAPTURE(to_string(isa));
      IsaScope is(isa);
      const Bank bank = Bank::from_raw_blocks(n, dim, t, 1000, [&](index_t r0, index_t rows, std::uint16_t* dst,
                                                                  index_t stride) {
        for (index_t r = 0; r < rows; ++r) {
          std::copy_n(words.data() + (r0 + r) * dim, dim, dst + r * stride);
          dst[r * stride] = one;
        }
      }, kInf);
      const RowMatrixf wide = bank.to_matrix();
      index_t bad = 0;
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 1; c < dim; ++c)
          bad += static_cast<double>(wide(i, c)) != word_value(t, words[static_cast<std::size_t>(i * dim + c)]);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("every path rounds fp32 values to fp16 and bf16 to nearest, ties to even, as the reference does") {
  // Guards kernels::Table::narrow (F16C's vcvtps2ph and the integer code) against an independent
  // search over the type's value table: random values across every binade the types hold, every
  // exact midpoint between neighbouring words (ties), values just beside them, subnormals, and
  // values past the largest finite one (infinity).
  std::mt19937_64 rng(8);
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    std::vector<float> xs;
    std::uniform_real_distribution<double> expo(-30.0, t == DType::float16 ? 16.5 : 40.0), mant(1.0, 2.0);
    for (int r = 0; r < 20000; ++r)
      xs.push_back(static_cast<float>((rng() & 1 ? -1.0 : 1.0) * mant(rng) * std::exp2(expo(rng))));
    for (std::uint32_t w = 0; w < max_finite(t); w += 7) {  // midpoints (exact in fp32) and their neighbours
      const auto mid = static_cast<float>(0.5 * (word_value(t, static_cast<std::uint16_t>(w)) +
                                                 word_value(t, static_cast<std::uint16_t>(w + 1))));
      xs.push_back(mid);
      xs.push_back(std::nextafter(mid, 0.0f));
      xs.push_back(std::nextafter(mid, 1e30f));
      xs.push_back(-mid);
    }
    constexpr index_t dim = 40;
    xs.push_back(1.0f);  // every row non-zero: padded with ones
    while (xs.size() % dim) xs.push_back(1.0f);
    const auto n = static_cast<index_t>(xs.size()) / dim;
    RowMatrixf values = Eigen::Map<const RowMatrixf>(xs.data(), n, dim);
    for (index_t i = 0; i < n; ++i)
      if (values.row(i).cwiseAbs().maxCoeff() == 0.0f) values(i, 0) = 1.0f;
    std::vector<std::uint16_t> want(xs.size());
    for (std::size_t j = 0; j < xs.size(); ++j) want[j] = reference_round(t, values.data()[j]);
    for (const Isa isa : supported_paths()) {
      CAPTURE(to_string(isa));
      IsaScope is(isa);
      const std::vector<std::uint16_t> got = words_of(bank_of_values(values, t));
      std::size_t bad = 0, first = 0;
      for (std::size_t j = 0; j < got.size(); ++j)
        if (got[j] != want[j] && bad++ == 0) first = j;
      CAPTURE(values.data()[first]);
      CAPTURE(got[first]);
      CAPTURE(want[first]);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("seeded 2-byte banks are the fp32 bank rounded to nearest, unit norm within the type's tolerance") {
  const index_t n = 3001, dim = 40;
  const Bank f32(n, dim, 11);
  const RowMatrixf v = f32.to_matrix();
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    const Bank b(n, dim, 11, t);
    CHECK(b.dtype() == t);
    const std::vector<std::uint16_t> got = words_of(b);
    std::size_t bad = 0;
    for (std::size_t j = 0; j < got.size(); ++j) bad += got[j] != reference_round(t, v.data()[j]);
    CHECK(bad == 0);
    const RowMatrixd w = b.to_matrix().cast<double>();
    CHECK((w.rowwise().norm().array() - 1.0).abs().maxCoeff() <= row_norm_tolerance(t));
    CHECK(b.view().stride * 2 <= f32.view().stride * 4);  // no more bytes a row than the fp32 bank's
  }
}

TEST_CASE("stochastic rounding is unbiased: the mean of many refreshed rows equals the fp32 value within its standard error") {
  // N copies of one row receive the same feature: every copy's fp32 value x = normalise(m v + (1 - m) f)
  // is the same, and each is rounded with its own random bits (keyed by row). Per element, the mean
  // of the N rounded values must be x within 5 standard errors (+ the fp32-vs-double difference of
  // the reference, <= 8 u |x|); rounding to nearest gives N identical rows instead.
  const index_t n = 20000, dim = 32;
  std::mt19937_64 rng(5);
  const RowMatrixf v0 = unit_rows(1, dim, rng), f = unit_rows(1, dim, rng);
  const RowMatrixf rows = v0.replicate(n, 1), feats = f.replicate(n, 1);
  std::vector<index_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[static_cast<std::size_t>(i)] = i;
  const double m = 0.9;
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    Bank sr = Bank::from_rows(rows, t), rn = Bank::from_rows(rows, t);
    const RowMatrixd start = sr.to_matrix().row(0).cast<double>();
    Eigen::RowVectorXd x = m * start + (1.0 - m) * f.cast<double>();
    x /= x.norm();
    sr.momentum_update(ids, feats, m, 3, Rounding::stochastic, 77);
    rn.momentum_update(ids, feats, m, 3, Rounding::nearest, 77);
    const RowMatrixd got = sr.to_matrix().cast<double>();
    const Eigen::RowVectorXd mean = got.colwise().mean();
    int moved_both_ways = 0;
    for (index_t c = 0; c < dim; ++c) {
      const double var = (got.col(c).array() - mean[c]).square().sum() / static_cast<double>(n - 1);
      const double se = std::sqrt(var / static_cast<double>(n));
      CAPTURE(c);
      CHECK(std::abs(mean[c] - x[c]) <= 5.0 * se + 8.0 * 0x1p-24 * std::abs(x[c]));
      moved_both_ways += got.col(c).minCoeff() < got.col(c).maxCoeff();
    }
    CHECK(moved_both_ways >= dim - 2);  // the test can fail: the roundings do differ
    const RowMatrixf near = rn.to_matrix();
    CHECK((near.rowwise() - near.row(0)).cwiseAbs().maxCoeff() == 0.0f);
    // Reproducible: the same seed and step give the same bits; another step other bits.
    Bank again = Bank::from_rows(rows, t), other = Bank::from_rows(rows, t);
    again.momentum_update(ids, feats, m, 3, Rounding::stochastic, 77);
    other.momentum_update(ids, feats, m, 4, Rounding::stochastic, 77);
    CHECK(words_of(again) == words_of(sr));
    CHECK(words_of(other) != words_of(sr));
  }
}

TEST_CASE("at high momentum, a bf16 row rounded to nearest lags while stochastic rounding follows the fp32 row") {
  // m = 0.999: (1 - m)(f - v) is below half a bf16 gap for the larger elements (the small ones, with
  // finer gaps, still move). Over 300 refreshes toward a fixed f the fp32 rows gain G in v . f;
  // nearest rounding gains less than half of G (0.35 G when this was written), stochastic rounding
  // gains G within a quarter (mean over 64 rows).
  const index_t n = 64, dim = 128;
  std::mt19937_64 rng(12);
  const RowMatrixf start = unit_rows(n, dim, rng), f = unit_rows(n, dim, rng);
  std::vector<index_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[static_cast<std::size_t>(i)] = i;
  const auto gain = [&](DType t, Rounding r) {
    Bank b = Bank::from_rows(start, t);
    const RowMatrixd v0 = b.to_matrix().cast<double>();
    for (int s = 0; s < 300; ++s) b.momentum_update(ids, f, 0.999, s, r, 1);
    const RowMatrixd v1 = b.to_matrix().cast<double>();
    return ((v1 - v0).cwiseProduct(f.cast<double>())).sum() / static_cast<double>(n);
  };
  const double g32 = gain(DType::float32, Rounding::nearest);
  const double near = gain(DType::bfloat16, Rounding::nearest), stoch = gain(DType::bfloat16, Rounding::stochastic);
  CAPTURE(g32);
  CAPTURE(near);
  CAPTURE(stoch);
  CHECK(g32 > 0.1);
  CHECK(near < 0.5 * g32);
  CHECK(std::abs(stoch - g32) < 0.25 * g32);
}

TEST_CASE("2-byte rows stay unit norm within the type's tolerance after 10^4 refreshes, and m = 1 leaves them unchanged") {
  const index_t n = 50, dim = 40;
  std::mt19937_64 rng(21);
  for (const DType t : kTwoByte)
    for (const Rounding r : {Rounding::nearest, Rounding::stochastic}) {
      CAPTURE(to_string(t));
      CAPTURE(to_string(r));
      Bank b(n, dim, 3, t);
      for (int s = 0; s < 10000; ++s) {
        const std::vector<index_t> ids = random_ids(4, n, rng);
        b.momentum_update(ids, unit_rows(4, dim, rng), 0.5, s, r, 9);
      }
      const RowMatrixd w = b.to_matrix().cast<double>();
      CHECK((w.rowwise().norm().array() - 1.0).abs().maxCoeff() <= row_norm_tolerance(t));
      const std::vector<std::uint16_t> before = words_of(b);
      const std::vector<index_t> ids = random_ids(8, n, rng);
      b.momentum_update(ids, unit_rows(8, dim, rng), 1.0, 10000, r, 9);
      CHECK(words_of(b) == before);
    }
}

TEST_CASE("the exact softmax and kNN of a 2-byte bank equal those of its widened fp32 copy, bit for bit") {
  // A 2-byte bank's tiles are widened before the GEMMs: the results must be those of an fp32 bank
  // holding the widened values (from_blocks with no renormalisation keeps them exactly).
  const index_t n = 2500, dim = 40, batch = 7, q = 60;
  std::mt19937_64 rng(4);
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    const Bank b(n, dim, 8, t);
    const Bank wide = bank_of_values(b.to_matrix(), DType::float32);
    REQUIRE(wide.to_matrix() == b.to_matrix());
    const RowMatrixf f = unit_rows(batch, dim, rng);
    const std::vector<index_t> ids = random_ids(batch, n, rng);
    RowMatrixf g1(batch, dim), g2(batch, dim);
    double z1 = 0, z2 = 0;
    const double l1 = full_softmax_loss(b.view(), f, ids, 0.1, g1, &z1);
    const double l2 = full_softmax_loss(wide.view(), f, ids, 0.1, g2, &z2);
    CHECK(bits_equal(l1, l2));
    CHECK(bits_equal(z1, z2));
    CHECK(bits_equal(g1, g2));
    std::vector<int> bl(static_cast<std::size_t>(n)), ql(static_cast<std::size_t>(q));
    for (auto& l : bl) l = static_cast<int>(rng() % 5);
    for (auto& l : ql) l = static_cast<int>(rng() % 5);
    const RowMatrixf queries = unit_rows(q, dim, rng);
    const KnnResult k1 = knn_evaluate(b.view(), bl, queries, ql, KnnOptions{.k = 20, .sigma = 0.1});
    const KnnResult k2 = knn_evaluate(wide.view(), bl, queries, ql, KnnOptions{.k = 20, .sigma = 0.1});
    CHECK(k1.predictions == k2.predictions);
    CHECK(bits_equal(k1.top1, k2.top1));
    CHECK(bits_equal(k1.top5, k2.top5));
  }
}

TEST_CASE("InfoNCE on a 2-byte bank stays within the bound the type's unit roundoff gives of the fp32 bank's step, on every path") {
  // The rows v' of a 2-byte bank are the fp32 rows v rounded: |v'_c - v_c| <= u |v_c|, so every score
  // moves by <= u |v| |f| = u and every logit by <= u / tau. InfoNCE's loss (a log-sum-exp minus the
  // positive's logit) moves by <= 2 u / tau; its gradient row (sum_j p_j v_j - v_y) / (B tau) by
  // <= (u + |dp|_1 + u) / (B tau) with |dp|_1 <= 2 max|dlogit| = 2 u / tau. Plus fp32 rounding (1e-5).
  const index_t n = 4000, dim = 64, batch = 16, k = 200;
  const double tau = 0.1;
  std::mt19937_64 rng(6);
  EngineConfig cfg;
  cfg.k = k;
  cfg.tau = tau;
  cfg.objective = Objective::info_nce;
  const RowMatrixf rows = unit_rows(n, dim, rng);
  const std::vector<index_t> ids = random_ids(batch, n, rng);
  const RowMatrixi negs = random_negatives(batch, k, n, rng);
  const RowMatrixf f = near_rows(rows, ids, 0.5, rng);
  const auto run = [&](DType t, RowMatrixf& g) {
    Engine e(bank_of_values(rows, t), std::make_unique<UniformSampler>(n), cfg);
    return e.evaluate(f, ids, negs, g).loss;
  };
  for (const Isa isa : supported_paths()) {
  CAPTURE(to_string(isa));
  IsaScope is(isa);
  RowMatrixf g32(batch, dim);
  const double l32 = run(DType::float32, g32);
  for (const DType t : kTwoByte) {
    CAPTURE(to_string(t));
    const double u = unit_roundoff(t);
    RowMatrixf g(batch, dim);
    const double l = run(t, g);
    CAPTURE(l);
    CAPTURE(l32);
    CHECK(std::abs(l - l32) <= 2.0 * u / tau + 1e-5);
    const double grad_bound = (2.0 * u + 2.0 * u / tau) / (batch * tau);
    CHECK(((g - g32).cast<double>().rowwise().norm().maxCoeff()) <= grad_bound + 1e-6);
    CHECK(std::abs(l - l32) > 0.0);  // the types do differ
  }
  }
}
