#pragma once
// Nearest-neighbour search over the bank, and the weighted-kNN evaluation built on it (Wu et al.,
// Sec. 3.4).
//
// knn_search: for each query row, the k bank rows of the highest score s_j = v_j . q, best first;
// equal scores rank the smaller row id first. Scores are the fp32 products the search computed (a
// 2-byte bank's rows widened exactly first). The bank is streamed in tiles of kKnnTile rows, each
// laid out once for a block of up to kKnnQueryBlock queries; a register tile of queries x rows is
// scored and compared with each query's threshold, the k-th best so far, before any score reaches
// memory, so almost every score is discarded by one vectorised compare. Each query keeps its best
// candidates in a buffer. Memory O(Q k) for the results plus per thread O(kKnnQueryBlock (k +
// kKnnTile)), never a Q x N matrix. Few queries on a large bank split the bank across threads as
// well. The results are identical for any thread count.
//
// knn_evaluate: weights w_j = exp(s_j / sigma) of the k neighbours, class score = sum of the weights
// of that class; the prediction is the best class (ties: the smaller class id). Also 1-NN.
//
// Cancellation: `cancel`, when set, is called on the calling thread after each tile it searched (the
// work is dealt out cyclically, so it always searches some); when it returns true the search stops at
// the next tile of every thread and throws membank::Cancelled, leaving the output buffers untouched
// (results are staged and written only once the search is complete).
//
// Thread safety: pure functions of their arguments; may run concurrently with const bank calls.
#include <membank/bank.hpp>
#include <membank/types.hpp>

#include <functional>
#include <span>
#include <vector>

namespace membank {

/// The most queries per block (fewer when that balances the threads) and the bank rows per tile.
inline constexpr index_t kKnnQueryBlock = 512;
inline constexpr index_t kKnnTile = 1024;

/// Returns true to stop a long call between its blocks (Python: a pending Ctrl-C).
using CancelHook = std::function<bool()>;

/// The k best bank rows of each query into caller-owned, row-major Q x k buffers: scores[i k + r] and
/// ids[i k + r] for rank r = 0 (best) .. k - 1. Queries are Q x D (any finite rows: scores are plain dot
/// products; pass unit rows for cosine). Throws Error on shape mismatches, 1 <= k <= N violated, too
/// small buffers, a bank of 2^32 rows or more; Cancelled when `cancel` asked to stop. The buffers may
/// not overlap the queries or the bank.
void knn_search(const BankView& bank, FeaturesRef queries, index_t k, std::span<float> scores,
                std::span<index_t> ids, const CancelHook& cancel = {});

struct KnnOptions {
  index_t k = 200;       ///< neighbours; 1 <= k <= N
  double sigma = 0.07;   ///< weight temperature; > 0
  CancelHook cancel = {};  ///< see knn_search
};

struct KnnResult {
  double top1 = 0.0;              ///< weighted-kNN top-1 accuracy over the queries
  double top5 = 0.0;              ///< label among the five best class scores
  double nn1 = 0.0;               ///< accuracy of the single nearest row's label
  std::vector<int> predictions;   ///< weighted-kNN class per query
};

/// bank_labels has N entries, query_labels Q, all in [0, classes) with classes = 1 + max label.
/// Throws Error on shape mismatches, labels out of range, k outside [1, N], sigma <= 0; Cancelled.
KnnResult knn_evaluate(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                       std::span<const int> query_labels, const KnnOptions& options = {});

}  // namespace membank
