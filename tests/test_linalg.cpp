// membank/linalg.hpp: the dispatched matrix products against a plain double-precision reference, on
// every instruction set this CPU runs, with strided operands; and the argument checks.
#include <membank/error.hpp>
#include <membank/isa.hpp>
#include <membank/linalg.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using membank::Isa;
using i64 = std::int64_t;

struct IsaGuard {
  explicit IsaGuard(Isa isa) : saved(membank::active_isa()) { membank::force_isa(isa); }
  ~IsaGuard() { membank::force_isa(saved); }
  Isa saved;
};

std::vector<float> random_floats(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

/// Largest |got - want| over the m x n result, relative to the largest sum of |terms| of an entry.
double rel_error(const std::vector<float>& c, i64 ldc, const std::vector<double>& want, const std::vector<double>& scale,
                 i64 m, i64 n) {
  double worst = 0.0;
  for (i64 i = 0; i < m; ++i)
    for (i64 j = 0; j < n; ++j) {
      const double e = std::fabs(c[static_cast<std::size_t>(i * ldc + j)] - want[static_cast<std::size_t>(i * n + j)]) /
                       (scale[static_cast<std::size_t>(i * n + j)] + 1e-30);
      worst = std::max(worst, e);
    }
  return worst;
}

}  // namespace

TEST_CASE("matmul and matmul_at_b equal a double reference on every instruction set, strided") {
  std::mt19937_64 rng(11);
  const struct { i64 m, n, k; } shapes[] = {{1, 1, 1}, {7, 5, 3}, {33, 17, 130}, {64, 48, 256}, {5, 70, 0}};
  std::vector<Isa> isas;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (membank::cpu_supports(isa)) isas.push_back(isa);
  for (const auto& s : shapes)
    for (const bool tb : {false, true}) {
      CAPTURE(s.m);
      CAPTURE(s.n);
      CAPTURE(s.k);
      CAPTURE(tb);
      // Leading dimensions wider than the rows: the padding must be neither read into C nor written.
      const i64 lda = s.k + 3, ldb = (tb ? s.k : s.n) + 2, ldc = s.n + 5;
      const i64 b_rows = tb ? s.n : s.k;
      const auto a = random_floats(static_cast<std::size_t>(s.m * lda), rng);
      const auto b = random_floats(static_cast<std::size_t>(b_rows * ldb), rng);
      std::vector<double> want(static_cast<std::size_t>(s.m * s.n)), scale(want.size());
      for (i64 i = 0; i < s.m; ++i)
        for (i64 j = 0; j < s.n; ++j) {
          double acc = 0.0, mag = 0.0;
          for (i64 t = 0; t < s.k; ++t) {
            const double x = a[static_cast<std::size_t>(i * lda + t)];
            const double y = tb ? b[static_cast<std::size_t>(j * ldb + t)] : b[static_cast<std::size_t>(t * ldb + j)];
            acc += x * y;
            mag += std::fabs(x * y);
          }
          want[static_cast<std::size_t>(i * s.n + j)] = acc;
          scale[static_cast<std::size_t>(i * s.n + j)] = mag;
        }
      // A^T B with A stored k x m: the transpose of a, written out.
      const i64 ldat = s.m + 1;
      std::vector<float> at(static_cast<std::size_t>(s.k * ldat), 0.0f);
      for (i64 i = 0; i < s.m; ++i)
        for (i64 t = 0; t < s.k; ++t) at[static_cast<std::size_t>(t * ldat + i)] = a[static_cast<std::size_t>(i * lda + t)];
      for (const Isa isa : isas) {
        CAPTURE(membank::to_string(isa));
        IsaGuard guard(isa);
        std::vector<float> c(static_cast<std::size_t>(s.m * ldc), 7.0f);
        membank::matmul(s.m, s.n, s.k, a.data(), lda, b.data(), ldb, tb, c.data(), ldc);
        CHECK(rel_error(c, ldc, want, scale, s.m, s.n) < 1e-5);
        for (i64 i = 0; i < s.m; ++i)
          for (i64 j = s.n; j < ldc; ++j) CHECK(c[static_cast<std::size_t>(i * ldc + j)] == 7.0f);  // padding kept
        if (!tb) {
          std::vector<float> c2(static_cast<std::size_t>(s.m * ldc), 7.0f);
          membank::matmul_at_b(s.m, s.n, s.k, at.data(), ldat, b.data(), ldb, c2.data(), ldc);
          CHECK(rel_error(c2, ldc, want, scale, s.m, s.n) < 1e-5);
        }
      }
    }
}

TEST_CASE("matmul refuses bad sizes, short leading dimensions, null operands and an output overlapping an input") {
  std::vector<float> a(64, 1.0f), b(64, 1.0f), c(64, 0.0f);
  const std::vector<float> c_before = c;
  CHECK_THROWS_AS(membank::matmul(-1, 2, 2, a.data(), 2, b.data(), 2, false, c.data(), 2), membank::Error);
  CHECK_THROWS_WITH_AS(membank::matmul(2, 4, 3, a.data(), 2, b.data(), 4, false, c.data(), 4),
                       doctest::Contains("a: leading dimension 2"), membank::Error);
  CHECK_THROWS_AS(membank::matmul(2, 4, 3, a.data(), 3, b.data(), 3, false, c.data(), 4), membank::Error);
  CHECK_THROWS_AS(membank::matmul(2, 2, 2, nullptr, 2, b.data(), 2, false, c.data(), 2), membank::Error);
  CHECK_THROWS_WITH_AS(membank::matmul(2, 2, 2, a.data(), 2, b.data(), 2, false, a.data() + 1, 2),
                       doctest::Contains("c"), membank::Error);
  CHECK_THROWS_AS(membank::matmul_at_b(2, 2, 2, a.data(), 2, b.data(), 2, b.data(), 2), membank::Error);
  CHECK(c == c_before);
  // Disjoint halves of one buffer are fine.
  membank::matmul(2, 2, 2, a.data(), 2, a.data() + 4, 2, true, a.data() + 8, 2);
  CHECK(a[8] == 2.0f);
}
