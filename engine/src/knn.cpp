#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/knn_outputs.hpp"
#include "detail/parallel.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>

namespace membank {

namespace {

using kernels::key_row;
using kernels::key_score;

/// The search's result before it is handed out: Q x k rank keys (kernels::rank_key), best first.
struct Neighbours {
  index_t k = 0;
  std::vector<std::uint64_t> keys;
  std::span<const std::uint64_t> of(index_t query) const {
    return std::span<const std::uint64_t>(keys).subspan(static_cast<std::size_t>(query * k), static_cast<std::size_t>(k));
  }
};

/// One query's running best, in the search's per-query arrays: a buffer of candidate keys, how many
/// it holds, and the score a new candidate must beat. Rows arrive in ascending order, so a candidate
/// that only ties the k-th best loses to it: once k are held, the threshold is the k-th best score and
/// the comparison strict.
struct Candidates {
  std::uint64_t* keys;  // room for 2k + kKnnTile + 16
  index_t& size;
  float& threshold;

  /// After a tile's candidates were appended, once there are twice k (or as soon as there are k, to
  /// set the first threshold): keep those up to a pivot key P with at least k at or below it, and P's
  /// score becomes the threshold. P comes from a sample of 32 keys, at the rank that leaves
  /// about 1.25 k; a count confirms it before anything is dropped (else a sampled key of higher rank,
  /// up to an exact selection). The pivot's rank, the count and the compaction are branch-free kernels:
  /// no comparison a random key would mispredict.
  void settle(const kernels::Table& kt, index_t k) {
    if (size < k || (size <= 2 * k && threshold != -std::numeric_limits<float>::infinity())) return;
    constexpr index_t m = 32;
    std::array<std::uint64_t, m> sample;
    for (index_t j = 0; j < m; ++j) sample[static_cast<std::size_t>(j)] = keys[j * size / m];
    for (index_t r = std::min<index_t>(m - 1, (5 * k * m) / (4 * size) + 1); r < m; r = r + 1 + r / 4) {
      const std::uint64_t pivot = kt.order_statistic(sample.data(), m, r);
      const index_t below = kt.count_at_most(keys, size, pivot);
      if (below < k) continue;
      if (below > 2 * k) break;
      size = kt.keep_at_most(keys, size, pivot);
      threshold = key_score(pivot);
      return;
    }
    std::nth_element(keys, keys + (k - 1), keys + size);
    size = k;
    threshold = key_score(keys[k - 1]);
  }
  /// The k best (fewer when the part held fewer rows), sorted, into out; the rest of out unchanged.
  void finish(index_t k, std::uint64_t* out) {
    const index_t m = std::min(k, size);
    if (m < size) std::nth_element(keys, keys + (m - 1), keys + size);
    std::sort(keys, keys + m);
    std::copy(keys, keys + m, out);
  }
};

/// How a search divides its work: blocks of `block` queries (a multiple of the scan's group), each
/// against `parts` ranges of whole tiles; one (block, part) pair is one unit of work.
struct Plan {
  index_t block, blocks, parts, tiles_per_part;
};
Plan plan_search(index_t q, index_t n, index_t threads, index_t group) {
  // A block packs each tile once for all its queries, so blocks are large: up to kKnnQueryBlock
  // queries, as many per thread, and no fewer than kMinBlock unless the threads then share the bank.
  constexpr index_t kMinBlock = 256;
  const index_t tiles = (n + kKnnTile - 1) / kKnnTile;
  index_t want = (q + kMinBlock - 1) / kMinBlock;
  if (q >= threads * kMinBlock) want = threads * ((q + threads * kKnnQueryBlock - 1) / (threads * kKnnQueryBlock));
  Plan p{};
  p.block = ((q + want - 1) / want + group - 1) / group * group;
  p.blocks = (q + p.block - 1) / p.block;
  p.parts = std::clamp<index_t>((threads + p.blocks - 1) / p.blocks, 1, tiles);
  p.tiles_per_part = (tiles + p.parts - 1) / p.parts;
  return p;
}

void check_search_args(const BankView& bank, FeaturesRef queries, index_t k) {
  const index_t n = bank.rows, dim = bank.dim, q = queries.rows();
  MEMBANK_CHECK(q >= 1 && queries.cols() == dim, "queries has shape {} x {}: expected Q x {} with Q >= 1", q,
                queries.cols(), dim);
  check_features(queries, q, dim, "queries");
  MEMBANK_CHECK(k >= 1 && k <= n, "k = {}: expected 1 <= k <= N = {}", k, n);
  MEMBANK_CHECK(n <= static_cast<index_t>(std::numeric_limits<std::uint32_t>::max()),
                "the bank has N = {} rows: the search takes up to 2^32 - 1 rows per bank (shard a larger one)", n);
}

/// The k best rows of every query as rank keys, staged apart from any caller buffer. The bank splits
/// into `parts` ranges of whole tiles when there are fewer query blocks than threads; each (block,
/// part) pair is one unit of work and the parts' bests merge exactly (the keys order totally).
Neighbours search_keys(const BankView& bank, FeaturesRef queries, index_t k, const CancelHook& cancel) {
  const index_t n = bank.rows, dim = bank.dim, q = queries.rows();
  const int threads = omp_get_max_threads();
  const kernels::Table& kt = kernels::table();  // the instruction set, picked once per call
  const Plan plan = plan_search(q, n, threads, kt.knn_group);
  const index_t parts = plan.parts;
  const index_t cap = 2 * k + kKnnTile + 16;  // the scan may write 8 past what it keeps
  const index_t packed_rows = (kKnnTile + kt.knn_panel - 1) / kt.knn_panel * kt.knn_panel;
  {
    std::int64_t per_thread = mul_sat(packed_rows, mul_sat(dim, 4));                // the packed tile
    per_thread = add_sat(per_thread, mul_sat(plan.block, mul_sat(cap, 8)));          // candidates
    per_thread = add_sat(per_thread, mul_sat(plan.block, mul_sat(dim, 4)));          // the block's queries
    if (bank.dtype != DType::float32) per_thread = add_sat(per_thread, mul_sat(kKnnTile, mul_sat(dim, 4)));
    const std::int64_t staged = mul_sat(mul_sat(q, k), mul_sat(parts, 8));
    require_memory(add_sat(mul_sat(threads, per_thread), mul_sat(staged, parts > 1 ? 2 : 1)),
                   fmt::format("the kNN search with k = {} for Q = {} queries ({} threads)", k, q, threads));
  }
  // Part p's best of query i at staged[(p q + i) k ..]; a part holding fewer than k rows fills the rest
  // with the worst key, which the merge never keeps.
  std::vector<std::uint64_t> staged(static_cast<std::size_t>(parts * q * k), std::numeric_limits<std::uint64_t>::max());
  struct Scratch {
    RowMatrixf block, tile;
    std::vector<float> packed, thresholds;
    std::vector<std::uint64_t> keys;
    std::vector<index_t> sizes;
  };
  std::vector<Scratch> scratch(static_cast<std::size_t>(threads));
  detail::ExceptionCapture errors;
  std::atomic<bool> stop{false};
#pragma omp parallel
  {
    Scratch& t = scratch[static_cast<std::size_t>(omp_get_thread_num())];
    const bool caller = omp_get_thread_num() == 0;  // the calling thread: the only one that asks `cancel`
    errors.run([&] {
      t.block.resize(plan.block, dim);
      t.packed.resize(static_cast<std::size_t>(packed_rows * dim));
      if (bank.dtype != DType::float32) t.tile.resize(kKnnTile, dim);
      t.keys.resize(static_cast<std::size_t>(plan.block * cap));
      t.thresholds.resize(static_cast<std::size_t>(plan.block));
      t.sizes.resize(static_cast<std::size_t>(plan.block));
    });
    // Cyclic, so that the calling thread, the one that asks `cancel`, always holds the first unit.
#pragma omp for schedule(static, 1)
    for (index_t w = 0; w < plan.blocks * parts; ++w) {
      errors.run([&] {
        if (stop.load(std::memory_order_relaxed)) return;
        const index_t b = w / parts, p = w % parts;
        const index_t q0 = b * plan.block, rows = std::min(plan.block, q - q0);
        const index_t padded = (rows + kt.knn_group - 1) / kt.knn_group * kt.knn_group;
        t.block.topRows(rows) = queries.middleRows(q0, rows);
        t.block.middleRows(rows, padded - rows).setZero();
        std::fill_n(t.thresholds.begin(), rows, -std::numeric_limits<float>::infinity());
        std::fill(t.thresholds.begin() + rows, t.thresholds.begin() + padded, std::numeric_limits<float>::infinity());
        std::fill_n(t.sizes.begin(), padded, index_t{0});
        const auto candidates = [&](index_t i) {
          const auto at = static_cast<std::size_t>(i);
          return Candidates{t.keys.data() + i * cap, t.sizes[at], t.thresholds[at]};
        };
        const index_t first = std::min(n, p * plan.tiles_per_part * kKnnTile);
        const index_t last = std::min(n, (p + 1) * plan.tiles_per_part * kKnnTile);
        for (index_t t0 = first; t0 < last; t0 += kKnnTile) {
          const index_t cols = std::min(kKnnTile, last - t0);
          if (bank.dtype == DType::float32) {
            kt.knn_pack(bank.row(t0), cols, dim, bank.stride, t.packed.data());
          } else {
            bank.widen_rows(t0, cols, t.tile.data(), dim);
            kt.knn_pack(t.tile.data(), cols, dim, dim, t.packed.data());
          }
          kt.knn_scan(t.block.data(), padded, dim, t.packed.data(), cols, static_cast<std::uint32_t>(t0),
                      t.thresholds.data(), t.keys.data(), cap, t.sizes.data());
          for (index_t i = 0; i < rows; ++i) candidates(i).settle(kt, k);
          if (caller && cancel && cancel()) stop.store(true, std::memory_order_relaxed);
          if (stop.load(std::memory_order_relaxed)) return;
        }
        for (index_t i = 0; i < rows; ++i) candidates(i).finish(k, staged.data() + ((p * q + q0 + i) * k));
      });
    }
  }
  errors.rethrow("the kNN search");
  if (stop.load()) throw Cancelled("membank: the kNN search was cancelled by its caller; nothing was written");
  Neighbours r;
  r.k = k;
  if (parts == 1) {
    r.keys = std::move(staged);
  } else {
    r.keys.resize(static_cast<std::size_t>(q * k));
    std::vector<std::uint64_t> merged(static_cast<std::size_t>(parts * k));
    for (index_t i = 0; i < q; ++i) {
      for (index_t p = 0; p < parts; ++p)
        std::copy_n(staged.begin() + (p * q + i) * k, k, merged.begin() + p * k);
      std::partial_sort(merged.begin(), merged.begin() + k, merged.end());
      std::copy_n(merged.begin(), k, r.keys.begin() + i * k);
    }
  }
  // A score that is not finite is never collected (inf - inf in a product of huge rows): such a query
  // comes out with fewer than k neighbours, an error rather than a silent gap.
  for (index_t i = 0; i < q; ++i)
    MEMBANK_CHECK(r.keys[static_cast<std::size_t>((i + 1) * k - 1)] != std::numeric_limits<std::uint64_t>::max(),
                  "queries row {}: fewer than k = {} bank rows have a finite score above -inf (a product overflowed "
                  "fp32, or a row is not finite)", i, k);
  return r;
}

}  // namespace

void knn_search(const BankView& bank, FeaturesRef queries, index_t k, std::span<float> scores, std::span<index_t> ids,
                const CancelHook& cancel) {
  check_search_args(bank, queries, k);
  detail::check_search_outputs(bank, queries, queries.rows(), k, scores, ids, "Q");
  const auto need = static_cast<std::size_t>(queries.rows() * k);
  const Neighbours r = detail::translate_bad_alloc("knn_search", [&] { return search_keys(bank, queries, k, cancel); });
  for (std::size_t j = 0; j < need; ++j) {
    scores[j] = key_score(r.keys[j]);
    ids[j] = static_cast<index_t>(key_row(r.keys[j]));
  }
}

namespace {
KnnResult knn_impl(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                   std::span<const int> query_labels, const KnnOptions& o) {
  const index_t n = bank.rows, q = queries.rows();
  MEMBANK_CHECK(static_cast<index_t>(bank_labels.size()) == n, "bank_labels has {} entries: expected N = {}",
                bank_labels.size(), n);
  check_search_args(bank, queries, o.k);
  MEMBANK_CHECK(static_cast<index_t>(query_labels.size()) == q, "query_labels has {} entries: expected Q = {}",
                query_labels.size(), q);
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
  require_memory(add_sat(mul_sat(q, 7), mul_sat(omp_get_max_threads(), mul_sat(classes, 12))),
                 fmt::format("knn_evaluate's votes for Q = {} queries over {} classes", q, classes));
  const Neighbours nb = search_keys(bank, queries, o.k, o.cancel);

  KnnResult r;
  r.predictions.assign(static_cast<std::size_t>(q), 0);
  std::vector<char> hit1(static_cast<std::size_t>(q)), hit5(static_cast<std::size_t>(q)),
      hitnn(static_cast<std::size_t>(q));
  const int top = std::min(classes, 5);
  std::vector<std::vector<double>> scores(static_cast<std::size_t>(omp_get_max_threads()),
                                         std::vector<double>(static_cast<std::size_t>(classes)));
  std::vector<std::vector<int>> orders(scores.size(), std::vector<int>(static_cast<std::size_t>(classes)));
#pragma omp parallel
  {
    std::vector<double>& score = scores[static_cast<std::size_t>(omp_get_thread_num())];
    std::vector<int>& order = orders[static_cast<std::size_t>(omp_get_thread_num())];
#pragma omp for schedule(static)
    for (index_t i = 0; i < q; ++i) {
      std::fill(score.begin(), score.end(), 0.0);
      for (const std::uint64_t key : nb.of(i))
        score[static_cast<std::size_t>(bank_labels[key_row(key)])] += std::exp(static_cast<double>(key_score(key)) / o.sigma);
      for (int c = 0; c < classes; ++c) order[static_cast<std::size_t>(c)] = c;
      std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int a, int c) {
        return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(c)] ||
               (score[static_cast<std::size_t>(a)] == score[static_cast<std::size_t>(c)] && a < c);
      });
      const auto qi = static_cast<std::size_t>(i);
      const int label = query_labels[qi];
      r.predictions[qi] = order[0];
      hit1[qi] = order[0] == label;
      hit5[qi] = std::find(order.begin(), order.begin() + top, label) != order.begin() + top;
      hitnn[qi] = bank_labels[key_row(nb.of(i)[0])] == label;
    }
  }
  const auto mean = [&](const std::vector<char>& v) {
    return static_cast<double>(std::count(v.begin(), v.end(), 1)) / static_cast<double>(q);
  };
  r.top1 = mean(hit1);
  r.top5 = mean(hit5);
  r.nn1 = mean(hitnn);
  return r;
}
}  // namespace

KnnResult knn_evaluate(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                       std::span<const int> query_labels, const KnnOptions& o) {
  return detail::translate_bad_alloc("knn_evaluate", [&] { return knn_impl(bank, bank_labels, queries, query_labels, o); });
}

}  // namespace membank
