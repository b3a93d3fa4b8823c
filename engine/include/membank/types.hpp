#pragma once
// membank's data layout, stated once.
//
//  * The bank is N x D, row-major: row i (the embedding v_i of instance i) is contiguous, element
//    (i, c) lives at data[i * stride + c], stride >= D (padding keeps rows on cache-line boundaries;
//    it is never read). Its elements are fp32, IEEE fp16 or bfloat16 (DType, chosen when the bank is
//    made); every kernel widens them to fp32 and accumulates in fp32. Every row has unit L2 norm to
//    the type's precision (an invariant kept by Bank).
//  * Instance ids are int64 (`index_t`), 0 <= id < N.
//  * A batch of features is B x D, fp32, row-major (any outer stride), one query per row.
//  * Negatives are B x K (per-sample: query i draws its own K) or 1 x K (shared by the batch),
//    row-major int64.
//  * Gradients are written into caller buffers shaped like the features they belong to.
#include <membank/dtype.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <span>

namespace membank {

using index_t = std::int64_t;

using RowMatrixf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixi = Eigen::Matrix<index_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only B x D features (row-major, contiguous rows, any outer stride).
using FeaturesRef = Eigen::Ref<const RowMatrixf, 0, Eigen::OuterStride<>>;
/// Writable B x D output (gradients).
using GradRef = Eigen::Ref<RowMatrixf, 0, Eigen::OuterStride<>>;
/// Read-only B x K (or 1 x K) negative ids.
using NegativesRef = Eigen::Ref<const RowMatrixi, 0, Eigen::OuterStride<>>;
/// Instance ids of a batch, one per feature row.
using IdsRef = std::span<const index_t>;

}  // namespace membank
