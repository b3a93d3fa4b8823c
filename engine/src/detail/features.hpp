#pragma once
// A step's features, validated and made unit-norm (a normalised copy when the engine normalises),
// and the gradient's way back through that normalisation: shared by Engine and DistributedEngine.
#include <membank/bank.hpp>
#include <membank/engine.hpp>
#include <membank/memory.hpp>

#include <cmath>
#include <vector>

namespace membank::detail {

/// Validated, unit-norm view of the caller's features (a normalised copy when asked to normalise).
struct PreparedFeatures {
  RowMatrixf copy;           // used when normalising
  std::vector<double> norms; // of the raw rows, when normalising
  const float* data = nullptr;  // B x D unit rows: copy, or the caller's features
  index_t rows = 0, cols = 0, stride = 0;
  Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>> view() const {
    return {data, rows, cols, Eigen::OuterStride<>(stride)};
  }
};

/// `arg` names the argument in the messages.
inline PreparedFeatures prepare_features(FeaturesRef features, index_t batch, index_t dim, const EngineConfig& cfg,
                                         const char* arg = "features") {
  check_features(features, batch, dim, arg);
  PreparedFeatures p;
  p.rows = batch;
  p.cols = dim;
  if (cfg.normalize_features) {
    p.copy.resize(batch, dim);
    p.norms.resize(static_cast<std::size_t>(batch));
    for (index_t b = 0; b < batch; ++b) {
      double sq = 0.0;
      for (index_t c = 0; c < dim; ++c) sq += static_cast<double>(features(b, c)) * features(b, c);
      p.norms[static_cast<std::size_t>(b)] = std::sqrt(sq);
      for (index_t c = 0; c < dim; ++c)
        p.copy(b, c) = static_cast<float>(features(b, c) / p.norms[static_cast<std::size_t>(b)]);
    }
    p.data = p.copy.data();
    p.stride = dim;
  } else {
    check_unit_norm(features, cfg.unit_norm_tolerance, arg);
    p.data = features.data();
    p.stride = features.outerStride();
  }
  return p;
}

/// dL/dx from dL/df for f = x / |x|: (g - f (f . g)) / |x|, in place.
inline void backprop_normalisation(const PreparedFeatures& p, GradRef grad) {
  for (index_t b = 0; b < grad.rows(); ++b) {
    const float* f = p.data + b * p.stride;
    double fg = 0.0;
    for (index_t c = 0; c < grad.cols(); ++c) fg += static_cast<double>(f[c]) * grad(b, c);
    const double inv = 1.0 / p.norms[static_cast<std::size_t>(b)];
    for (index_t c = 0; c < grad.cols(); ++c)
      grad(b, c) = static_cast<float>((grad(b, c) - f[c] * fg) * inv);
  }
}

/// The gradient buffer may overlap nothing the call reads or owns (aliasing contract, memory.hpp):
/// itself, the features, the ids, the negatives, the bank's rows and last-update steps.
inline void check_grad_alone(GradRef grad, FeaturesRef features, IdsRef ids, const NegativesRef* negatives,
                      const Bank& bank) {
  const MemoryRegion g = MemoryRegion::of_matrix(grad);
  check_no_self_overlap(g, "grad");
  check_no_overlap(g, "grad", MemoryRegion::of_matrix(features), "features");
  check_no_overlap(g, "grad", MemoryRegion::of_span(ids), "ids");
  if (negatives) check_no_overlap(g, "grad", MemoryRegion::of_matrix(*negatives), "negatives");
  bank.check_no_overlap(g, "grad");
}

}  // namespace membank::detail
