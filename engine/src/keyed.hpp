#pragma once
// Negatives that are keys the caller computed -- a queue's slots (Queue), the other samples of the
// batch (InBatch) -- instead of rows drawn from a bank. There is no noise distribution: every key
// counts once (the objectives' log importance weight lw = 0, the positive's too), and a key that
// must not be a negative of a query (its own instance, its label, itself) is masked: it is no entry
// of that query at all, so the query's K is its count of unmasked keys (what dcl's, hcl's and kcl's
// formulas count). Scores are one GEMM per tile of keys; each query's objective turns its row into
// coef_scale dL/ds in place (the shared-negatives kernel of the dispatched table); dL/dq adds those
// rows times the keys with one more GEMM per tile. Internal to the library.
#include <membank/engine.hpp>

#include "detail/features.hpp"
#include "kernels/kernels.hpp"

#include <cstdint>
#include <vector>

namespace membank::detail {

/// The objectives a keyed step runs: every one but nce (whose posterior P / (P + K P_n) models
/// draws from a noise distribution over N instances, which keys do not have) and the full softmax
/// (a bank's). Throws Error naming `mechanism` otherwise; checks the configuration's ranges too.
void check_keyed_config(const EngineConfig& config, const char* mechanism);

/// The optional arguments of a keyed step: ids empty or B instance ids >= 0, labels empty or B long
/// (`per`: what one id or label goes with, for the messages), and, unless `config` is null, labels
/// present where the objective or exclude_same_label needs them.
void check_ids_labels(const EngineConfig* config, index_t batch, IdsRef ids, std::span<const std::int64_t> labels,
                      const char* per);

/// An in-batch step's two gradient buffers overlap nothing they must not: themselves, each other,
/// the views, the ids, the labels (Error naming both).
void check_in_batch_grads(GradRef grad_a, GradRef grad_b, FeaturesRef view_a, FeaturesRef view_b, IdsRef ids,
                          std::span<const std::int64_t> labels);

/// A batch of queries against M keys.
struct KeyedInput {
  const float* q = nullptr;    ///< B x D unit queries, q_stride apart
  index_t q_stride = 0;
  const float* pos = nullptr;  ///< B x D unit positive keys, pos_stride apart
  index_t pos_stride = 0;
  const float* keys = nullptr; ///< M x D unit keys, key_stride apart
  index_t key_stride = 0;
  index_t batch = 0, dim = 0, m = 0;
  /// Key j holds query i's own instance when key_ids[j] == query_ids[i] (ids < 0 match nothing;
  /// null: unknown): masked with mask_same_id, else counted in QueryResult::collisions. With
  /// mask_same_class, key j is masked when key_classes[j] == query_classes[i] (classes < 0 match
  /// nothing). The classes also tell the objectives with labels which keys share the query's label.
  const index_t* query_ids = nullptr;
  const index_t* key_ids = nullptr;
  const std::int32_t* query_classes = nullptr;
  const std::int32_t* key_classes = nullptr;
  bool mask_same_id = false;
  bool mask_same_class = false;
  double coef_scale = 1.0;  ///< 1 / (the B of the batch mean)
};

/// The keys are processed in tiles of this many (fixed: results do not depend on the thread count).
/// A tile's GEMM packs its keys once for the whole batch.
inline constexpr index_t kKeyTile = 4096;

/// Bytes the three phases below allocate besides the B x M scores, on `threads` threads:
/// per-thread objective scratch (about 37 M bytes, 72 M more for triplet) and the gradient's
/// per-tile partial products (4 B D per tile).
std::int64_t keyed_scratch_bytes(index_t batch, index_t m, index_t dim, bool positives_first, int threads);

/// S = Q K^T into s (B x M, row stride lds), tile by tile of keys, in parallel over tiles.
void keyed_scores(const KeyedInput& in, float* s, index_t lds, const kernels::Table& kt);

/// Each query's objective over its unmasked keys turns its row of s into coef_scale dL/ds (0 for a
/// masked key); out (B long) receives each query's result, c_pos already scaled by coef_scale. In
/// parallel over queries. Throws Error when a query has no unmasked key.
void keyed_objectives(const KeyedInput& in, const kernels::ObjectiveParams& params, float* s, index_t lds,
                      std::vector<kernels::QueryResult>& out, const kernels::Table& kt);

/// dL/dq = c_pos k+ + C K into grad (B x D, row stride g_stride), from the coefficients C in s: each
/// tile of keys adds its partial product, and the partials are summed in tile order.
void keyed_gradient(const KeyedInput& in, const float* s, index_t lds, const std::vector<kernels::QueryResult>& out,
                    float* grad, index_t g_stride, const kernels::Table& kt);

/// Labels as class indices for the masks: equal labels, equal classes (0, 1, ... in order of first
/// appearance over `labels` then `more`); `present[j] == 0` marks an entry with no label (class -1).
std::vector<std::int32_t> classes_of(std::span<const std::int64_t> labels, std::span<const std::uint8_t> present,
                                     std::span<const std::int64_t> more, std::vector<std::int32_t>* more_classes);

/// What a queue step computed before it commits (Queue, DistributedQueue).
struct QueueComputed {
  StepStats stats;
  std::vector<kernels::QueryResult> out;  ///< per query, in order
  PreparedFeatures keys;                  ///< the unit keys the loss saw (enqueued as they are)
};

/// The step's statistics from its queries' results, in query order: the mean loss and P(positive),
/// the fraction of the B x M entries that are unmasked keys of the query's own instance, and the
/// InfoNCE bound log(M + 1) - L where the objective reports one. z and z_estimate are NaN (no Z).
StepStats keyed_stats(const EngineConfig& config, const std::vector<kernels::QueryResult>& out, index_t m,
                      std::int64_t step);

}  // namespace membank::detail
