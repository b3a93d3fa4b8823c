// Weighted kNN evaluation against a brute-force double-precision reference (bit-identity over thread
// counts: test_threads.cpp).
#include "reference.hpp"

#include <membank/error.hpp>
#include <membank/knn.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
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
  // scan's query group, on clustered data (so the classifier is informative).
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
    const auto got = membank::knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{.k = k, .sigma = 0.07});
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
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{.k = 0, .sigma = 0.07}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{.k = 101, .sigma = 0.07}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{.k = 10, .sigma = 0.0}), Error);
  CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, unit_rows(5, 9, rng), ql), Error);
  CHECK_NOTHROW(membank::knn_evaluate(bank.view(), bl, q, ql, KnnOptions{.k = 100, .sigma = 0.07}));
}

namespace {

using membank::DType;
using membank::knn_search;

/// Brute force in double: every row's score, ranked by (score descending, row ascending).
struct RefSearch {
  Eigen::MatrixXd s;  // Q x N scores
  std::vector<std::vector<index_t>> order;
};
RefSearch brute_force_search(const RowMatrixd& V, const RowMatrixd& Q) {
  RefSearch r;
  r.s = Q * V.transpose();
  for (index_t i = 0; i < Q.rows(); ++i) {
    std::vector<index_t> idx(static_cast<std::size_t>(V.rows()));
    std::iota(idx.begin(), idx.end(), index_t{0});
    std::sort(idx.begin(), idx.end(), [&](index_t a, index_t b) {
      return r.s(i, a) > r.s(i, b) || (r.s(i, a) == r.s(i, b) && a < b);
    });
    r.order.push_back(std::move(idx));
  }
  return r;
}

struct SearchOut {
  std::vector<float> scores;
  std::vector<index_t> ids;
};
SearchOut search(const Bank& bank, const RowMatrixf& queries, index_t k, const membank::CancelHook& cancel = {}) {
  SearchOut o{std::vector<float>(static_cast<std::size_t>(queries.rows() * k)),
              std::vector<index_t>(static_cast<std::size_t>(queries.rows() * k))};
  knn_search(bank.view(), queries, k, o.scores, o.ids, cancel);
  return o;
}

/// Unit rows with four entries of +-1/2 and the rest 0 (the bank keeps them as they are): every
/// product and partial sum is exact in fp32 (and the rows exact in fp16 and bf16), so scores are
/// multiples of 1/4 and tie exactly and often.
RowMatrixf coarse_rows(index_t rows, index_t cols, std::mt19937_64& rng) {
  RowMatrixf m = RowMatrixf::Zero(rows, cols);
  std::vector<index_t> at(static_cast<std::size_t>(cols));
  std::iota(at.begin(), at.end(), index_t{0});
  for (index_t i = 0; i < rows; ++i) {
    std::shuffle(at.begin(), at.end(), rng);
    for (std::size_t j = 0; j < 4; ++j) m(i, at[j]) = (rng() & 1) != 0 ? 0.5f : -0.5f;
  }
  return m;
}

}  // namespace

TEST_CASE("knn_search equals brute force in double on exact ties, every dtype") {
  // Guards the tie rule (equal scores: the smaller id first), the threshold's strictness across
  // tiles, the candidates' settling and the merge of bank parts: scores are exact, so ids and scores
  // must equal the double reference exactly. Q = 100 is one query block (with 2 threads the bank
  // splits into parts); Q = 300 two blocks. N = 3001 leaves a partial tile; k = N takes every row.
  // Every instruction-set path (the candidate scan is written per path).
  std::mt19937_64 rng(5);
  constexpr index_t N = 3001, D = 16;
  const RowMatrixf rows = coarse_rows(N, D, rng);
  for (const DType dt : {DType::float32, DType::float16, DType::bfloat16}) {
    CAPTURE(membank::to_string(dt));
    const Bank bank = Bank::from_rows(rows, dt);
    REQUIRE(bits_equal(bank.to_matrix(), rows));
    for (const index_t q : {index_t{100}, index_t{300}}) {
      const RowMatrixf queries = coarse_rows(q, D, rng);
      const RefSearch ref = brute_force_search(rows.cast<double>(), queries.cast<double>());
      for (const index_t k : {index_t{1}, index_t{7}, index_t{200}, index_t{2999}, N}) {
        CAPTURE(q);
        CAPTURE(k);
        for (const membank::Isa isa : supported_paths()) {
          CAPTURE(membank::to_string(isa));
          IsaScope scope(isa);
          const SearchOut got = search(bank, queries, k);
          std::size_t wrong_id = 0, wrong_score = 0;
          for (index_t i = 0; i < q; ++i)
            for (index_t r = 0; r < k; ++r) {
              const index_t want = ref.order[static_cast<std::size_t>(i)][static_cast<std::size_t>(r)];
              const auto at = static_cast<std::size_t>(i * k + r);
              wrong_id += got.ids[at] != want;
              wrong_score += static_cast<double>(got.scores[at]) != ref.s(i, want);
            }
          CHECK(wrong_id == 0);
          CHECK(wrong_score == 0);
        }
      }
    }
  }
}

TEST_CASE("knn_search equals brute force in double on random rows, k = 1, 200, 5000, every dtype") {
  // Guards the search on continuous scores: each rank's score equals the double reference's score of
  // that rank to fp32 accuracy, every id is distinct, belongs to the reference's top k up to a near
  // tie (its double score within 1e-5 of the k-th), and a rank holds the reference's id unless the two
  // scores are within 1e-5 (a swap of near-equal neighbours). N = 9001 leaves a partial tile; Q = 300
  // spans two query blocks.
  std::mt19937_64 rng(17);
  constexpr index_t N = 9001, D = 24, Q = 300;
  const RowMatrixf rows = unit_rows(N, D, rng);
  const RowMatrixf queries = unit_rows(Q, D, rng);
  for (const DType dt : {DType::float32, DType::float16, DType::bfloat16}) {
    CAPTURE(membank::to_string(dt));
    const Bank bank = Bank::from_rows(rows, dt);
    const RefSearch ref = brute_force_search(bank.to_matrix().cast<double>(), queries.cast<double>());
    for (const index_t k : {index_t{1}, index_t{200}, index_t{5000}}) {
      CAPTURE(k);
      const SearchOut got = search(bank, queries, k);
      std::size_t bad_score = 0, bad_id = 0, duplicates = 0, outside = 0;
      for (index_t i = 0; i < Q; ++i) {
        const auto& order = ref.order[static_cast<std::size_t>(i)];
        const double kth = ref.s(i, order[static_cast<std::size_t>(k - 1)]);
        std::vector<index_t> seen;
        for (index_t r = 0; r < k; ++r) {
          const auto at = static_cast<std::size_t>(i * k + r);
          const index_t id = got.ids[at];
          const double want = ref.s(i, order[static_cast<std::size_t>(r)]);
          bad_score += std::abs(static_cast<double>(got.scores[at]) - want) > 1e-5;
          if (id < 0 || id >= N) {
            ++outside;
            continue;
          }
          bad_id += id != order[static_cast<std::size_t>(r)] && std::abs(ref.s(i, id) - want) > 1e-5;
          outside += ref.s(i, id) < kth - 1e-5;
          seen.push_back(id);
        }
        std::sort(seen.begin(), seen.end());
        duplicates += static_cast<std::size_t>(std::unique(seen.begin(), seen.end()) - seen.begin()) != seen.size();
      }
      CHECK(bad_score == 0);
      CHECK(bad_id == 0);
      CHECK(duplicates == 0);
      CHECK(outside == 0);
    }
  }
}

TEST_CASE("knn_search is bit-identical for 1 and 2 threads") {
  // Guards the split of the work: with 2 threads few queries split the bank into parts merged
  // afterwards, many queries split into blocks; either way every id and score bit equals 1 thread's.
  std::mt19937_64 rng(23);
  constexpr index_t N = 5000, D = 32;
  const Bank bank = Bank::from_rows(unit_rows(N, D, rng));
  for (const index_t q : {index_t{3}, index_t{600}}) {
    CAPTURE(q);
    const RowMatrixf queries = unit_rows(q, D, rng);
    for (const index_t k : {index_t{1}, index_t{200}, index_t{5000}}) {
      CAPTURE(k);
      SearchOut one, two;
      {
        ThreadCount tc(1);
        one = search(bank, queries, k);
      }
      {
        ThreadCount tc(2);
        two = search(bank, queries, k);
      }
      CHECK(one.ids == two.ids);
      CHECK(std::memcmp(one.scores.data(), two.scores.data(), one.scores.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("knn_search scores are one chain of multiply-adds per query and row, however the work is split") {
  // Guards the fused scan's arithmetic on every instruction-set path: each returned score equals, bit
  // for bit, s = q_0 v_0, then s + q_d v_d for d = 1 .. D-1 in order (rounded once per term where the
  // path has FMA, twice on the baseline path), and a query searched alone (its block padded, the bank
  // split across threads) gets exactly what it gets among 299 others. D = 37 leaves a part of 16
  // columns; N = 2050 a partial panel in a partial tile.
  std::mt19937_64 rng(41);
  constexpr index_t N = 2050, D = 37, Q = 300, k = 50;
  const Bank bank = Bank::from_rows(unit_rows(N, D, rng));
  const RowMatrixf v = bank.to_matrix();
  const RowMatrixf queries = unit_rows(Q, D, rng);
  for (const membank::Isa isa : supported_paths()) {
    CAPTURE(membank::to_string(isa));
    IsaScope scope(isa);
    const bool fused = isa != membank::Isa::scalar;
    ThreadCount tc(2);
    const SearchOut all = search(bank, queries, k);
    std::size_t bad_chain = 0, bad_alone = 0;
    for (index_t i = 0; i < Q; ++i) {
      for (index_t r = 0; r < k; ++r) {
        const auto at = static_cast<std::size_t>(i * k + r);
        const index_t row = all.ids[at];
        float chain = 0.0f;
        for (index_t d = 0; d < D; ++d) {
          if (fused) {
            chain = std::fma(queries(i, d), v(row, d), chain);
          } else {
            const float product = queries(i, d) * v(row, d);  // rounded before the sum
            chain = chain + product;
          }
        }
        bad_chain += std::bit_cast<std::uint32_t>(chain) != std::bit_cast<std::uint32_t>(all.scores[at]);
      }
      if (i % 37 == 0) {
        const SearchOut alone = search(bank, queries.middleRows(i, 1), k);
        for (index_t r = 0; r < k; ++r) {
          const auto at = static_cast<std::size_t>(i * k + r);
          bad_alone += alone.ids[static_cast<std::size_t>(r)] != all.ids[at] ||
                       std::bit_cast<std::uint32_t>(alone.scores[static_cast<std::size_t>(r)]) !=
                           std::bit_cast<std::uint32_t>(all.scores[at]);
        }
      }
    }
    CHECK(bad_chain == 0);
    CHECK(bad_alone == 0);
  }
}

TEST_CASE("knn_search stops between tiles when cancelled and writes nothing") {
  // Guards cancellation: the hook is asked between tiles on the calling thread; once it says stop,
  // it is not asked again, membank::Cancelled is thrown, and the caller's buffers keep their contents.
  // A hook that never stops changes nothing in the results. knn_evaluate passes its hook on.
  std::mt19937_64 rng(29);
  constexpr index_t N = 20 * membank::kKnnTile + 5, D = 8, Q = 40, K = 10;
  const Bank bank = Bank::from_rows(unit_rows(N, D, rng));
  const RowMatrixf queries = unit_rows(Q, D, rng);
  for (const int threads : {1, 2}) {
    CAPTURE(threads);
    ThreadCount tc(threads);
    int calls = 0;
    std::vector<float> scores(Q * K, -7.0f);
    std::vector<index_t> ids(Q * K, -7);
    CHECK_THROWS_AS(knn_search(bank.view(), queries, K, scores, ids, [&] { return ++calls == 3; }),
                    membank::Cancelled);
    CHECK(calls == 3);
    CHECK(std::all_of(scores.begin(), scores.end(), [](float s) { return s == -7.0f; }));
    CHECK(std::all_of(ids.begin(), ids.end(), [](index_t i) { return i == -7; }));

    int asked = 0;
    const SearchOut plain = search(bank, queries, K);
    const SearchOut hooked = search(bank, queries, K, [&] { return ++asked < 0; });
    CHECK(asked >= 1);
    CHECK(plain.ids == hooked.ids);
    CHECK(plain.scores == hooked.scores);

    std::vector<int> bl(N, 0), ql(Q, 0);
    int evaluate_calls = 0;
    KnnOptions o{.k = K, .sigma = 0.1, .cancel = [&] { return ++evaluate_calls == 2; }};
    CHECK_THROWS_AS(membank::knn_evaluate(bank.view(), bl, queries, ql, o), membank::Cancelled);
    CHECK(evaluate_calls == 2);
  }
}

TEST_CASE("knn_search rejects bad arguments and changes nothing") {
  // Guards validation: k outside [1, N], buffers shorter than Q x k, a query of the wrong width or not
  // finite, outputs that overlap each other, the queries or the bank. Every refusal is one
  // membank::Error and leaves the buffers as they were.
  std::mt19937_64 rng(37);
  constexpr index_t N = 300, D = 8, Q = 4, K = 5;
  Bank bank = Bank::from_rows(unit_rows(N, D, rng));
  RowMatrixf q = unit_rows(Q, D, rng);
  std::vector<float> scores(Q * K, 3.0f);
  std::vector<index_t> ids(Q * K, 3);
  const auto unchanged = [&] {
    return std::all_of(scores.begin(), scores.end(), [](float s) { return s == 3.0f; }) &&
           std::all_of(ids.begin(), ids.end(), [](index_t i) { return i == 3; });
  };
  const auto refused = [&](auto&& call, const char* word) {
    const std::string msg = message_of(call);
    CHECK_MESSAGE(mentions(msg, word), msg);
    CHECK(unchanged());
  };
  refused([&] { knn_search(bank.view(), q, 0, scores, ids); }, "k = 0");
  refused([&] { knn_search(bank.view(), q, N + 1, scores, ids); }, "k = 301");
  refused([&] { knn_search(bank.view(), q, K, std::span<float>(scores).first(Q * K - 1), ids); }, "scores");
  refused([&] { knn_search(bank.view(), q, K, scores, std::span<index_t>(ids).first(Q * K - 1)); }, "ids");
  refused([&] { knn_search(bank.view(), unit_rows(Q, D + 1, rng), K, scores, ids); }, "queries");
  RowMatrixf nan_q = q;
  nan_q(2, 3) = std::numeric_limits<float>::quiet_NaN();
  refused([&] { knn_search(bank.view(), nan_q, K, scores, ids); }, "queries");
  // ids written over the scores' memory.
  std::vector<index_t> shared(Q * K);
  refused([&] {
    knn_search(bank.view(), q, K, std::span<float>(reinterpret_cast<float*>(shared.data()), Q * K), shared);
  }, "share");
  // scores written over the queries, or over the bank's rows.
  refused([&] { knn_search(bank.view(), q, K, std::span<float>(q.data(), Q * K), ids); }, "share");
  float* bank_rows = const_cast<float*>(bank.view().row(0));
  const RowMatrixf before = bank.to_matrix();
  refused([&] { knn_search(bank.view(), q, K, std::span<float>(bank_rows, Q * K), ids); }, "share");
  CHECK(bits_equal(bank.to_matrix(), before));
}
