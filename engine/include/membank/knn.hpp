#pragma once
// Weighted k-nearest-neighbour evaluation over the bank (Wu et al., Sec. 3.4): for each query, the k
// most similar bank rows s_j = v_j . q, weights w_j = exp(s_j / sigma), class score = sum of the
// weights of that class; the prediction is the best class (ties: the smaller class id). Also 1-NN.
//
// Cost O(Q N D) as blocked matrix products (queries in blocks of 256, bank in tiles of 1024 rows) with
// a per-query top-k heap: memory O(Q k + 256 x 1024) per thread, never a Q x N matrix. Deterministic for any
// thread count (each query's neighbours are found by one thread, ties broken by the smaller row id).
//
// Thread safety: pure function of its arguments; may run concurrently with const bank calls.
#include <membank/bank.hpp>
#include <membank/types.hpp>

#include <span>
#include <vector>

namespace membank {

struct KnnOptions {
  index_t k = 200;       ///< neighbours; 1 <= k <= N
  double sigma = 0.07;   ///< weight temperature; > 0
};

struct KnnResult {
  double top1 = 0.0;              ///< weighted-kNN top-1 accuracy over the queries
  double top5 = 0.0;              ///< label among the five best class scores
  double nn1 = 0.0;               ///< accuracy of the single nearest row's label
  std::vector<int> predictions;   ///< weighted-kNN class per query
};

/// Queries are Q x D (any rows: scores are plain dot products; pass unit rows for cosine).
/// bank_labels has N entries, query_labels Q, all in [0, classes) with classes = 1 + max label.
/// Throws Error on shape mismatches, labels out of range, k outside [1, N], sigma <= 0.
KnnResult knn_evaluate(const BankView& bank, std::span<const int> bank_labels, FeaturesRef queries,
                       std::span<const int> query_labels, const KnnOptions& options = {});

}  // namespace membank
