#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>

namespace membank {

namespace {

constexpr index_t kQueryBlock = 256;
constexpr index_t kTile = 1024;

/// (score, -row): the larger is the better neighbour; ties go to the smaller row id.
using Neighbour = std::pair<float, index_t>;

}  // namespace

namespace {
KnnResult knn_impl(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                   std::span<const int> query_labels, const KnnOptions& o);
}  // namespace

KnnResult knn_evaluate(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                       std::span<const int> query_labels, const KnnOptions& o) {
  return detail::translate_bad_alloc("knn_evaluate", [&] { return knn_impl(bank, bank_labels, queries, query_labels, o); });
}

namespace {
KnnResult knn_impl(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                   std::span<const int> query_labels, const KnnOptions& o) {
  const index_t n = bank.rows, dim = bank.dim, q = queries.rows();
  MEMBANK_CHECK(static_cast<index_t>(bank_labels.size()) == n, "bank_labels has {} entries: expected N = {}",
                bank_labels.size(), n);
  MEMBANK_CHECK(q >= 1 && queries.cols() == dim, "queries has shape {} x {}: expected Q x {} with Q >= 1", q,
                queries.cols(), dim);
  check_features(queries, q, dim, "queries");
  MEMBANK_CHECK(static_cast<index_t>(query_labels.size()) == q, "query_labels has {} entries: expected Q = {}",
                query_labels.size(), q);
  MEMBANK_CHECK(o.k >= 1 && o.k <= n, "k = {}: expected 1 <= k <= N = {}", o.k, n);
  MEMBANK_CHECK(std::isfinite(o.sigma) && o.sigma > 0.0, "sigma = {}: expected a finite value > 0", o.sigma);
  int classes = 0;
  for (std::size_t i = 0; i < bank_labels.size(); ++i) {
    MEMBANK_CHECK(bank_labels[i] >= 0 && bank_labels[i] < (1 << 20), "bank_labels[{}] = {}: expected a class id in "
                  "[0, 2^20)", i, bank_labels[i]);
    classes = std::max(classes, bank_labels[i] + 1);
  }
  for (std::size_t i = 0; i < query_labels.size(); ++i)
    MEMBANK_CHECK(query_labels[i] >= 0 && query_labels[i] < classes,
                  "query_labels[{}] = {}: expected a class id in [0, {})", i, query_labels[i], classes);

  {
    // Per thread: a block's scores, its queries, and 256 heaps of up to k (score, row) pairs; plus
    // the per-query results. Checked before anything is allocated.
    const int threads = omp_get_max_threads();
    std::int64_t per_thread = kQueryBlock * kTile * 4;
    per_thread = add_sat(per_thread, mul_sat(kQueryBlock, mul_sat(dim, 4)));
    per_thread = add_sat(per_thread, mul_sat(kQueryBlock, mul_sat(o.k, 16)));
    per_thread = add_sat(per_thread, mul_sat(classes, 12));
    if (bank.dtype != DType::float32) per_thread = add_sat(per_thread, mul_sat(kTile, mul_sat(dim, 4)));
    require_memory(add_sat(mul_sat(threads, per_thread), mul_sat(q, 7)),
                   fmt::format("knn_evaluate with k = {} for Q = {} queries ({} threads)", o.k, q, threads));
  }
  KnnResult r;
  r.predictions.assign(static_cast<std::size_t>(q), 0);
  std::vector<char> hit1(static_cast<std::size_t>(q)), hit5(static_cast<std::size_t>(q)),
      hitnn(static_cast<std::size_t>(q));
  const index_t blocks = (q + kQueryBlock - 1) / kQueryBlock;
  // Per-thread scratch made before the region; no exception escapes it (captured, rethrown after).
  struct Scratch {
    RowMatrixf s;
    RowMatrixf tile;  // a 2-byte bank's tile, widened
    std::vector<std::priority_queue<Neighbour, std::vector<Neighbour>, std::greater<>>> heaps;
    std::vector<double> score;
    std::vector<int> order;
  };
  std::vector<Scratch> scratch(static_cast<std::size_t>(omp_get_max_threads()));
  for (auto& t : scratch) {
    t.s.resize(kQueryBlock, kTile);
    if (bank.dtype != DType::float32) t.tile.resize(kTile, dim);
    t.heaps.resize(kQueryBlock);
    t.score.resize(static_cast<std::size_t>(classes));
    t.order.resize(static_cast<std::size_t>(classes));
  }
  const kernels::Table& kt = kernels::table();  // the instruction set, picked once per call
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    Scratch& t = scratch[static_cast<std::size_t>(omp_get_thread_num())];
    RowMatrixf& s = t.s;
    auto& heaps = t.heaps;
    auto& score = t.score;
    auto& order = t.order;
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < blocks; ++b) {
      errors.run([&] {
        const index_t q0 = b * kQueryBlock, rows = std::min(kQueryBlock, q - q0);
        const RowMatrixf qb = queries.middleRows(q0, rows);
        for (auto& h : heaps) h = {};
        for (index_t t0 = 0; t0 < n; t0 += kTile) {
          const index_t cols = std::min(kTile, n - t0);
          if (bank.dtype == DType::float32) {
            kt.gemm_abt(rows, cols, dim, 1.0f, qb.data(), dim, bank.row(t0), bank.stride, s.data(), kTile);
          } else {
            bank.widen_rows(t0, cols, t.tile.data(), dim);
            kt.gemm_abt(rows, cols, dim, 1.0f, qb.data(), dim, t.tile.data(), dim, s.data(), kTile);
          }
          for (index_t i = 0; i < rows; ++i) {
            auto& h = heaps[static_cast<std::size_t>(i)];
            const float* si = s.row(i).data();
            // Most candidates lose to the current k-th score: the kernel skips them (vectorised).
            float worst = static_cast<index_t>(h.size()) < o.k ? -std::numeric_limits<float>::infinity() : h.top().first;
            for (index_t j = 0; j < cols; ++j) {
              j = kt.first_at_least(si, j, cols, worst);
              if (j == cols) break;
              const Neighbour cand{si[j], -(t0 + j)};
              if (static_cast<index_t>(h.size()) < o.k) {
                h.push(cand);
              } else if (h.top() < cand) {
                h.pop();
                h.push(cand);
              }
              if (static_cast<index_t>(h.size()) == o.k) worst = h.top().first;
            }
          }
        }
        for (index_t i = 0; i < rows; ++i) {
          auto& h = heaps[static_cast<std::size_t>(i)];
          std::fill(score.begin(), score.end(), 0.0);
          Neighbour best = h.top();
          while (!h.empty()) {
            const Neighbour nb = h.top();
            h.pop();
            best = std::max(best, nb);
            score[static_cast<std::size_t>(bank_labels[static_cast<std::size_t>(-nb.second)])] +=
                std::exp(static_cast<double>(nb.first) / o.sigma);
          }
          for (int c = 0; c < classes; ++c) order[static_cast<std::size_t>(c)] = c;
          const int top = std::min(classes, 5);
          std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int a, int c) {
            return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(c)] ||
                   (score[static_cast<std::size_t>(a)] == score[static_cast<std::size_t>(c)] && a < c);
          });
          const auto qi = static_cast<std::size_t>(q0 + i);
          const int label = query_labels[qi];
          r.predictions[qi] = order[0];
          hit1[qi] = order[0] == label;
          hit5[qi] = std::find(order.begin(), order.begin() + top, label) != order.begin() + top;
          hitnn[qi] = bank_labels[static_cast<std::size_t>(-best.second)] == label;
        }
      });
    }
  }
  errors.rethrow("knn_evaluate");
  const auto mean = [&](const std::vector<char>& v) {
    return static_cast<double>(std::count(v.begin(), v.end(), 1)) / static_cast<double>(q);
  };
  r.top1 = mean(hit1);
  r.top5 = mean(hit5);
  r.nn1 = mean(hitnn);
  return r;
}
}  // namespace

}  // namespace membank
