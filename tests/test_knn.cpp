// Weighted kNN evaluation against a brute-force double-precision reference (bit-identity over thread
// counts: test_threads.cpp).
#include "reference.hpp"

#include <membank/error.hpp>
#include <membank/knn.hpp>

#include <doctest/doctest.h>

#include <numeric>

using namespace mbtest;
using membank::Bank;
using membank::Error;
using membank::KnnOptions;

namespace {

/// Brute force: all N scores in double, sort, take k, weight exp(s / sigma), sum per class.
struct RefKnn {
  std::vector<int> pred, nn;
  std::vector<std::vector<int>> top5;
};
RefKnn brute_force(const RowMatrixd& V, const std::vector<int>& vl, const RowMatrixd& Q, index_t k, double sigma,
                   int classes) {
  RefKnn r;
  for (index_t i = 0; i < Q.rows(); ++i) {
    const Eigen::VectorXd s = V * Q.row(i).transpose();
    std::vector<index_t> idx(static_cast<std::size_t>(V.rows()));
    std::iota(idx.begin(), idx.end(), index_t{0});
    std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return s[a] > s[b]; });
    std::vector<double> score(static_cast<std::size_t>(classes), 0.0);
    for (index_t j = 0; j < k; ++j) {
      const index_t row = idx[static_cast<std::size_t>(j)];
      score[static_cast<std::size_t>(vl[static_cast<std::size_t>(row)])] += std::exp(s[row] / sigma);
    }
    std::vector<int> order(static_cast<std::size_t>(classes));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
    r.pred.push_back(order[0]);
    r.top5.emplace_back(order.begin(), order.begin() + std::min(5, classes));
    r.nn.push_back(vl[static_cast<std::size_t>(idx[0])]);
  }
  return r;
}

}  // namespace

TEST_CASE("weighted kNN equals brute force") {
  // Guards the blocked top-k: predictions, top-1, top-5 and 1-NN accuracy equal a brute-force
  // double reference, for k below, inside and beyond one 1024-row tile, Q not a multiple of the
  // 256-query block, on clustered data (so the classifier is informative).
  std::mt19937_64 rng(31);
  constexpr index_t N = 9001, D = 24, Q = 150;
  constexpr int C = 7;
  RowMatrixf centres = unit_rows(C, D, rng);
  RowMatrixf bankrows(N, D), queries(Q, D);
  std::vector<int> bl(N), ql(Q);
  std::normal_distribution<float> nd(0.0f, 0.35f);
  for (index_t i = 0; i < N; ++i) {
    bl[static_cast<std::size_t>(i)] = static_cast<int>(i % C);
    for (index_t c = 0; c < D; ++c) bankrows(i, c) = centres(i % C, c) + nd(rng);
  }
  for (index_t i = 0; i < Q; ++i) {
    ql[static_cast<std::size_t>(i)] = static_cast<int>((i * 3) % C);
    for (index_t c = 0; c < D; ++c) queries(i, c) = centres((i * 3) % C, c) + nd(rng);
  }
  normalize_rows(queries);
  const Bank bank = Bank::from_rows(bankrows);
  const RowMatrixd V = bank.to_matrix().cast<double>();
  for (index_t k : {1, 200, 5000}) {
    CAPTURE(k);
    const auto got = membank::knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{k, 0.07});
    const RefKnn ref = brute_force(V, bl, queries.cast<double>(), k, 0.07, C);
    CHECK(got.predictions == ref.pred);
    double t1 = 0, t5 = 0, nn = 0;
    for (index_t i = 0; i < Q; ++i) {
      const auto iu = static_cast<std::size_t>(i);
      t1 += ref.pred[iu] == ql[iu];
      t5 += std::find(ref.top5[iu].begin(), ref.top5[iu].end(), ql[iu]) != ref.top5[iu].end();
      nn += ref.nn[iu] == ql[iu];
    }
    CHECK(got.top1 == doctest::Approx(t1 / Q).epsilon(1e-12));
    CHECK(got.top5 == doctest::Approx(t5 / Q).epsilon(1e-12));
    CHECK(got.nn1 == doctest::Approx(nn / Q).epsilon(1e-12));
    CHECK(got.top1 > 0.5);  // the data are clustered: an informative classifier
  }
}

TEST_CASE("knn_evaluate rejects bad arguments") {
  // Guards validation: label counts, label range, k outside [1, N], sigma <= 0, query width.
  std::mt19937_64 rng(3);
  const Bank bank(100, 8, 1);
  const RowMatrixf q = unit_rows(5, 8, rng);
  std::vector<int> bl(100, 1), ql(5, 0);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), std::vector<int>(99, 0), q, ql), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, std::vector<int>(4, 0)), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, std::vector<int>(5, 2)), Error);
  bl[3] = -1;
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql), Error);
  bl[3] = 1;
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{0, 0.07}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{101, 0.07}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{10, 0.0}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, unit_rows(5, 9, rng), ql), Error);
  CHECK_NOTHROW(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{100, 0.07}));
}
