#pragma once
// The host side of a step's kernels (engine.cpp validates, then calls these): draw or copy each
// query's negatives, resolve the objective's inputs, call the dispatched kernels (kernels/) in
// parallel over queries, and estimate Z. Internal to the library.
#include <membank/engine.hpp>

#include "kernels/kernels.hpp"

#include <cmath>
#include <limits>
#include <vector>

namespace membank::detail {

/// Streaming log-sum-exp of a sequence of values (terms of -inf add nothing).
struct Lse {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  void add(double x);
  void merge(const Lse& o);
  double value() const { return max + std::log(sum); }
};

/// Whether objective o takes its positives first (objectives.hpp's kPositivesFirst): it needs the
/// larger per-query workspace (step_scratch_bytes, and each kernel's per-thread scratch).
inline bool takes_positives_first(Objective o) { return o == Objective::triplet; }

/// The partition estimate, written once: log Zhat = log mean over the draws of e^{s / tau} / q' from
/// the log-sum-exp of s / tau + lw over `draws` draws (lw = -log(N q'), q' their conditional P_n).
double log_z_hat(double log_sum, double draws, index_t n);

/// One step's inputs, resolved and validated by the caller.
struct StepInput {
  const float* f;  ///< B x D unit features
  index_t f_stride;
  IdsRef ids;
  const RowMatrixi* negatives;  ///< caller-supplied, or nullptr: draw them
  std::int64_t step;
  float* grad;  ///< B x D output
  index_t g_stride;
  index_t row0 = 0;         ///< the global row of query 0, which keys the draws (a rank's slice: DistributedEngine)
  index_t scale_batch = 0;  ///< the B of the batch mean, 1 / B in every coefficient (0: this batch's B)
};

/// The engine pieces a kernel reads.
struct KernelContext {
  BankView bank;
  const NoiseSampler* sampler;
  const EngineConfig* cfg;
  const std::int32_t* classes;  ///< label class per instance, or null
  kernels::ClassTable class_table;  ///< the same, narrowest width (the per-sample kernel's)
  const double* class_mass;     ///< P_n mass per class, or null
  index_t k;                    ///< draws per query
  /// A query-dependent sampler's q(. | f_i) for this batch (rows 0..B-1, row B their mean), or null.
  const Conditioned* conditioned = nullptr;
  /// exclude_same_label under q: query i's label mass under q(. | f_i) (per-sample negatives), or null.
  const double* query_class_mass = nullptr;
  /// The conditioned row (and query_class_mass entry) of query 0: a rank's slice of a global batch
  /// conditioned whole (DistributedEngine); 0 otherwise.
  index_t query_row0 = 0;
  /// Query i's distribution: q(. | f_i), or P_n.
  QueryRef query(index_t i) const { return {conditioned, conditioned ? i + query_row0 : 0}; }
};

/// Each query's class (classes: every row's) where exclude_same_label needs it; empty otherwise.
std::vector<std::int32_t> query_classes_of(const EngineConfig& cfg, IdsRef ids, const std::int32_t* classes);

/// A query-dependent sampler conditioned on B prepared rows `f` against `bank`: with each query's
/// class left out where query_classes (query_classes_of) holds them, so that a sampler that can
/// leave the label out of q does (NoiseSampler::condition_excluding).
std::unique_ptr<Conditioned> condition_batch(const NoiseSampler& sampler, const BankView& bank, const float* f,
                                             index_t stride, index_t batch, const std::int32_t* classes,
                                             std::span<const std::int32_t> query_classes);

/// The objective's parameters for this step (nce's log Z filled in by the caller).
kernels::ObjectiveParams objective_params(const EngineConfig& cfg, index_t k, index_t n, double log_z);

/// log Zhat of a per-sample step's draws (one scoring pass): the first nce step's Z.
double estimate_log_z_per_sample(const KernelContext& cx, const StepInput& in, index_t batch,
                                 const kernels::Table& kt);
/// The log-sum-exp of s / tau + lw over the same draws (merged in query order): its input.
Lse lse_per_sample(const KernelContext& cx, const StepInput& in, index_t batch, const kernels::Table& kt);

/// Per-sample negatives: one fused pass per query.
void per_sample_kernel(const KernelContext& cx, const StepInput& in, index_t batch,
                       const kernels::ObjectiveParams& params, std::vector<kernels::QueryResult>& out,
                       const kernels::Table& kt);

/// Shared negatives: gather the K rows once, score the batch with one GEMM, each query's
/// coefficients from its objective, then one GEMM adds the rows. For nce with a NaN log Z the
/// batch's own estimate is used; returns the log Z used (NaN for the other objectives).
double shared_kernel(const KernelContext& cx, const StepInput& in, index_t batch, kernels::ObjectiveParams params,
                     std::vector<kernels::QueryResult>& out, const kernels::Table& kt);

/// What query y's draws avoid, and log(1 - their P_n mass): the conditioning of P_n. `y` must
/// outlive the result (the exclusion may point at it).
struct QueryExclusion {
  Exclusion exclusion;
  double log_kept = 0.0;
};
QueryExclusion exclusion_of(const KernelContext& cx, const index_t& y, QueryRef query = {});

/// The ids shared negatives avoid: every id of the batch with exclude_positive (sorted), none
/// otherwise (exclude_same_label masks each query's own label's draws instead).
std::vector<index_t> shared_exclusion(const EngineConfig& cfg, IdsRef ids);

/// A batch's K shared draws into `ids` and their log importance weights lw = log(kept mass) - log N -
/// log P_n into `lw`: the caller's `given` (K ids, checked not to be ids of the batch under the
/// exclusion), or drawn at `step`. With exclude_positive, P_n is conditioned on the batch's ids
/// (shared_exclusion); Error when they carry all of the noise mass. `query`: the distribution the
/// draws come from (a query-dependent sampler's batch mean), P_n when null.
void shared_draws(const NoiseSampler& sampler, const EngineConfig& cfg, IdsRef batch_ids, std::int64_t step,
                  const index_t* given, std::span<index_t> ids, std::span<float> lw, QueryRef query = {});

/// The nce Z state after a step that used log Z = log_z_used and estimated log_z_hat from its draws:
/// log_z_used, or under the ema policy (once initialised) log(a Z + (1 - a) Zhat), in log space.
Partition partition_after(const EngineConfig& config, const Partition& current, double log_z_used, double log_z_hat);

/// The checks of caller negatives (Engine::step_with_negatives) of a batch with these `ids`: shape
/// (B x K per-sample, 1 x K shared; K >= 1), ids in [0, n), the exclusions (per-sample: not the
/// query's positive, not its label; shared with exclude_positive: no id of `batch_ids`, which may be
/// empty to skip that check), and P_n > 0. `classes` and `labels`: the engine's (empty without labels).
void check_negatives(const Eigen::Ref<const RowMatrixi, 0, Eigen::OuterStride<>>& negatives, IdsRef ids,
                     IdsRef batch_ids, index_t n, const EngineConfig& config, const std::vector<std::int32_t>& classes,
                     const std::vector<std::int64_t>& labels, const NoiseSampler& sampler);

/// The checks of Engine::restore_state: `next` and `step` may replace the state `current` of an engine
/// with this config (the same policy, a finite log Z, step >= 0, the fixed policy's own Z).
void check_restored_state(const EngineConfig& config, const Partition& current, const Partition& next,
                          std::int64_t step);

/// Labels as class indices 0..C-1 and the P_n mass of each class, checked (Engine::check_labels).
struct LabelClasses {
  std::vector<std::int32_t> classes;
  std::vector<double> mass;
};
LabelClasses label_classes(std::span<const std::int64_t> labels, const NoiseSampler& sampler,
                           const EngineConfig& config);

/// The exact softmax's online state of every query over a whole bank (full_softmax.cpp): running
/// max_i and sum_i = sum_j e^{s_ij / tau - max_i} and acc_i = sum_j e^{s_ij / tau - max_i} v_j, merged in
/// the bank's fixed chunk order (the same for any thread count). f: B x D unit rows. Checks its scratch
/// against available memory (OutOfMemory).
struct SoftmaxPartial {
  Eigen::VectorXd max, sum;
  RowMatrixd acc;
};
SoftmaxPartial softmax_partial(const BankView& bank, const RowMatrixf& f, double tau);

}  // namespace membank::detail
