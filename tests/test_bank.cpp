// Bank: construction, the unit-norm invariant, and the momentum refresh.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/bank.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {
double max_norm_error(const RowMatrixf& m) {
  double e = 0;
  for (index_t i = 0; i < m.rows(); ++i) e = std::max(e, std::abs(m.row(i).cast<double>().norm() - 1.0));
  return e;
}
}  // namespace

TEST_CASE("Bank(n, d, seed) is deterministic, unit-norm and uniform on the sphere") {
  // Guards seeded construction: same seed -> bit-identical rows, another seed -> other rows, every
  // row unit-norm, layout accessors consistent (row(i), view(), to_matrix(), stride >= D), no row
  // written yet, and the rows look uniform on S^{D-1} (mean ~ 0, E[x_c^2] = 1/D).
  constexpr index_t N = 20000, D = 8;
  const Bank a(N, D, 42), b(N, D, 42), c(N, D, 43);
  REQUIRE(a.size() == N);
  REQUIRE(a.dim() == D);
  CHECK(a.stride() >= D);
  const RowMatrixf ma = a.to_matrix();
  REQUIRE(ma.rows() == N);
  REQUIRE(ma.cols() == D);
  CHECK(bits_equal(ma, b.to_matrix()));
  CHECK_FALSE(bits_equal(ma, c.to_matrix()));
  CHECK(max_norm_error(ma) < 1e-5);
  const BankView v = a.view();
  CHECK(v.rows == N);
  CHECK(v.dim == D);
  CHECK(v.stride == a.stride());
  CHECK(v.row(17) == a.row(17));
  CHECK(bits_equal(RowMatrixf(v.matrix()), ma));
  for (index_t i : {index_t{0}, index_t{1}, N / 2, N - 1})
    CHECK(std::memcmp(a.row(i), ma.row(i).data(), sizeof(float) * D) == 0);
  CHECK(a.last_update().size() == static_cast<std::size_t>(N));
  CHECK(std::all_of(a.last_update().begin(), a.last_update().end(), [](auto s) { return s == -1; }));
  const Eigen::RowVectorXd mean = ma.cast<double>().colwise().mean();
  CHECK(mean.norm() < 4.0 / std::sqrt(static_cast<double>(N)));  // ~ 1/sqrt(N) expected
  const Eigen::RowVectorXd second = ma.cast<double>().array().square().colwise().mean();
  for (index_t c2 = 0; c2 < D; ++c2) CHECK(second(c2) == doctest::Approx(1.0 / D).epsilon(0.05));
  // Rows differ from each other (not one repeated vector).
  CHECK_FALSE(std::memcmp(a.row(0), a.row(1), sizeof(float) * D) == 0);
}

TEST_CASE("Bank::from_rows normalises the caller's rows") {
  // Guards from_rows: rows of any norm are stored as r / ||r||, in order.
  std::mt19937_64 rng(7);
  RowMatrixf r = gaussian(50, 13, rng, 3.0);
  const Bank b = Bank::from_rows(r);
  REQUIRE(b.size() == 50);
  REQUIRE(b.dim() == 13);
  const RowMatrixf m = b.to_matrix();
  for (index_t i = 0; i < 50; ++i) {
    const Eigen::RowVectorXd want = r.row(i).cast<double>() / r.row(i).cast<double>().norm();
    CHECK((m.row(i).cast<double>() - want).norm() < 1e-6);
  }
}

TEST_CASE("momentum_update keeps rows unit-norm over many updates") {
  // Guards the unit-norm invariant under 300 refreshes of random (unnormalised) features with
  // random ids including duplicates, m in {0.5, 0.9, 0.1}, and that untouched rows never change.
  std::mt19937_64 rng(8);
  constexpr index_t N = 64, D = 24, B = 32;
  Bank bank(N, D, 9);
  const RowMatrixf start = bank.to_matrix();
  std::vector<bool> touched(N, false);
  const double ms[] = {0.5, 0.9, 0.1};
  for (int s = 0; s < 300; ++s) {
    std::vector<index_t> ids = random_ids(B, N / 2, rng);  // ids < N/2 only: upper half untouched
    ids[B - 1] = ids[0];                                    // at least one duplicate per batch
    for (index_t y : ids) touched[static_cast<std::size_t>(y)] = true;
    const RowMatrixf f = gaussian(B, D, rng, 2.0);
    bank.momentum_update(ids, f, ms[s % 3], s);
  }
  const RowMatrixf m = bank.to_matrix();
  CHECK(max_norm_error(m) < 1e-5);
  for (index_t j = N / 2; j < N; ++j) {
    CHECK_FALSE(touched[static_cast<std::size_t>(j)]);
    CHECK(std::memcmp(m.row(j).data(), start.row(j).data(), sizeof(float) * D) == 0);
    CHECK(bank.last_update()[static_cast<std::size_t>(j)] == -1);
  }
}

TEST_CASE("momentum_update: duplicate ids are applied in batch order") {
  // Guards the sequential semantics for duplicates: v <- normalise(m v + (1-m) f_b) for b in batch
  // order, compared with a double reference; the reversed order gives a clearly different row, so
  // an implementation that applies duplicates in another order (or only the last) fails.
  std::mt19937_64 rng(10);
  constexpr index_t N = 10, D = 16;
  for (double m : {0.5, 0.8}) {
    CAPTURE(m);
    Bank bank(N, D, 11);
    const RowMatrixd V0 = bank.to_matrix().cast<double>();
    const std::vector<index_t> ids{3, 5, 3, 3, 7, 5};
    const RowMatrixf f = unit_rows(6, D, rng);
    bank.momentum_update(ids, f, m, 4);
    const RowMatrixd want = reference_momentum(V0, ids, f.cast<double>(), m);
    const RowMatrixf got = bank.to_matrix();
    CHECK((got.cast<double>() - want).cwiseAbs().maxCoeff() < 1e-6);

    std::vector<index_t> rev(ids.rbegin(), ids.rend());
    const RowMatrixd frev = f.cast<double>().colwise().reverse();
    const RowMatrixd other = reference_momentum(V0, rev, frev, m);
    CHECK((other.row(3) - want.row(3)).norm() > 1e-2);  // the order matters for this data

    for (index_t j = 0; j < N; ++j) {
      const bool in = j == 3 || j == 5 || j == 7;
      CHECK(bank.last_update()[static_cast<std::size_t>(j)] == (in ? 4 : -1));
    }
  }
}

TEST_CASE("momentum_update: m = 1 leaves rows bit-identical, m = 0 stores the normalised feature") {
  // Guards the two ends of the momentum range as the header specifies them (m = 1: no rounding
  // drift at all; m = 0: the row becomes f / ||f||), and the f = -v corner at m = 0.5.
  std::mt19937_64 rng(12);
  constexpr index_t N = 256, D = 64;
  Bank bank(N, D, 13);
  {
    // m = 1 over every row (twice for row 4), on rows fresh from construction and on rows written
    // by an earlier refresh: an update that still mixes in (1 - m) f or renormalises with an fp32
    // norm would move last bits of some rows.
    std::vector<index_t> all(static_cast<std::size_t>(N));
    for (index_t j = 0; j < N; ++j) all[static_cast<std::size_t>(j)] = j;
    bank.momentum_update(std::span<const index_t>(all).first(N / 2), gaussian(N / 2, D, rng), 0.5, 0);
    all.push_back(4);
    const RowMatrixf before = bank.to_matrix();
    bank.momentum_update(all, gaussian(N + 1, D, rng, 2.5), 1.0, 0);
    CHECK(bits_equal(bank.to_matrix(), before));
  }
  const std::vector<index_t> ids{1, 4, 9, 4};
  const RowMatrixf f = gaussian(4, D, rng, 2.5);

  bank.momentum_update(ids, f, 0.0, 1);
  const RowMatrixf after = bank.to_matrix();
  auto unit = [&](index_t b) { return Eigen::RowVectorXd(f.row(b).cast<double>() / f.row(b).cast<double>().norm()); };
  CHECK((after.row(1).cast<double>() - unit(0)).norm() < 1e-6);
  CHECK((after.row(9).cast<double>() - unit(2)).norm() < 1e-6);
  CHECK((after.row(4).cast<double>() - unit(3)).norm() < 1e-6);  // the last duplicate wins at m = 0
  CHECK(bank.last_update()[1] == 1);
  CHECK(bank.last_update()[0] == 0);

  // f = -v at m = 0.5: m v + (1 - m) f is exactly zero; the row becomes normalise(f).
  RowMatrixf neg(1, D);
  neg.row(0) = -after.row(2);
  const std::vector<index_t> two{2};
  bank.momentum_update(two, neg, 0.5, 2);
  const RowMatrixf m2 = bank.to_matrix();
  CHECK(m2.row(2).allFinite());
  CHECK((m2.row(2).cast<double>() - neg.row(0).cast<double>()).norm() < 1e-6);
}

TEST_CASE("set_last_update overwrites the per-row steps") {
  // Guards set_last_update (snapshot restore): the vector is stored as given.
  Bank bank(5, 4, 1);
  bank.set_last_update({3, -1, 7, 0, 2});
  CHECK(bank.last_update() == std::vector<std::int64_t>{3, -1, 7, 0, 2});
}
