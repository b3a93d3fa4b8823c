#pragma once
// The spherical k-means steps of the cluster sampler (cluster_sampler.hpp), in pieces a caller can
// run over a whole bank or over shards of one (DistributedEngine, sharded mode): the assignment of
// rows, the per-cluster sums of their rows and the centroids made from those sums. The sums add each
// cluster's rows in ascending row order in double, so a bank cut into contiguous shards whose sums
// are carried from shard to shard in order gives the whole bank's sums bit for bit.
#include <membank/bank.hpp>
#include <membank/types.hpp>

#include <cstdint>
#include <vector>

namespace membank::detail {

/// C row ids of [0, n), distinct, picked by the seed (a partial Fisher-Yates shuffle): the first
/// fit's initial centroids, in order.
std::vector<std::uint32_t> kmeans_initial_rows(index_t n, index_t c, std::uint64_t seed);

/// Each row of `bank` in the cluster of its nearest centroid by dot product (ties: the lowest
/// index), into out[0, bank.rows). Rows are scored in fixed tiles: the same for any thread count.
void kmeans_assign(const BankView& bank, const RowMatrixf& centroids, std::int32_t* out);

/// sums.row(k) += the rows of `bank` assigned to cluster k (assignment[i] for local row i), each
/// cluster's rows added in ascending row order, in double. `sums` is C x D.
void kmeans_add_rows(const BankView& bank, const std::int32_t* assignment, RowMatrixd& sums);

/// Each centroid becomes its sum normalised; an empty cluster, or one whose sum is zero or not
/// finite, keeps its centroid.
void kmeans_centroids(const RowMatrixd& sums, RowMatrixf& centroids);

}  // namespace membank::detail
