#pragma once
// InBatch: SimCLR's negatives (Chen et al., ICML 2020) -- no stored memory, the other samples of
// the same batch.
//
// A batch holds two views of each of B instances, a (B x D) and b (B x D): 2B samples z. Sample i's
// positive is its partner (the other view of its instance); its negatives are the other 2B - 2
// samples. With s_ij = z_i . z_j and p(i) the partner, InfoNCE is SimCLR's NT-Xent:
//   L = -(1 / 2B) sum_i log( e^{s_i,p(i) / tau} / sum_{j != i} e^{s_ij / tau} ),
// and dcl, hcl, dhel, kcl (whose papers state them this way, K = 2B - 2) and with labels supcon,
// contrastive and triplet take the same entries (docs/objectives.md); nce and full_softmax need a
// bank and are refused. Every sample is a query and a key, so the gradient of z_k collects both
// roles: with C the 2B x 2B matrix of dL/ds (0 where j is masked),
//   dL/dZ = (C + C^T) Z.
//
// Masks: a sample is never its own negative, nor is its partner (the positive). With
// exclude_positive and ids, neither is any sample of the same instance id (an instance drawn twice
// into the batch); with exclude_same_label, no sample of the query's label. The query's K is its
// count of unmasked samples. A query with none (B = 1, or everything masked) is an Error.
//
// Which fields of EngineConfig apply: those a Queue reads (queue.hpp), but rounding and seed
// (nothing is stored or drawn). Memory: the 2B x 2B scores and coefficients, a 2B x D copy of the
// samples and per-thread scratch of about 40 (2B) bytes. Time: three GEMMs of 2B x 2B x D.
//
// The object holds its configuration only: step() is const and may run concurrently. Results are
// bit-identical for any OpenMP thread count. Aliasing: grad_a and grad_b may overlap nothing (each
// other, themselves, the views, ids, labels).
#include <membank/engine.hpp>
#include <membank/queue.hpp>

namespace membank {

class InBatch {
 public:
  /// Throws Error when the objective does not apply (nce, full_softmax) or a field is out of range.
  explicit InBatch(EngineConfig config);

  /// Loss over the 2B samples and the gradient of each view (grad_a, grad_b: B x D each).
  /// ids: empty, or B instance ids >= 0 (used by exclude_positive). labels: empty, or B labels, one
  /// per instance (both views share it; needed by supcon, contrastive, triplet, exclude_same_label).
  /// Throws Error, writing nothing, on: B < 2; views or grads not B x D; NaN/Inf or zero rows; rows
  /// that are not unit-norm when normalize_features is false; ids or labels of the wrong length or
  /// an id < 0; missing labels; a sample left with no negative; a grad overlapping anything.
  /// StepStats::step is 0 (no counter); mi_bound_ceiling is log(2B - 1).
  StepStats step(FeaturesRef view_a, FeaturesRef view_b, GradRef grad_a, GradRef grad_b, IdsRef ids = {},
                 LabelsRef labels = {}) const;

  const EngineConfig& config() const { return config_; }

 private:
  EngineConfig config_;
};

/// Bytes of scratch one in-batch step allocates for B instances of dimension D on `threads`
/// threads.
std::int64_t in_batch_scratch_bytes(const EngineConfig& config, index_t batch, index_t dim, int threads);

}  // namespace membank
