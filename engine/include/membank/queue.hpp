#pragma once
// Queue: MoCo's memory (He et al., CVPR 2020) -- a ring of Q keys from the caller's momentum
// encoder, the negatives of every query of a batch, refreshed first in, first out.
//
// One step takes the batch's queries q (B x D, from the encoder being trained) and their positive
// keys k+ (B x D, from the momentum encoder: no gradient flows into them). Every query is scored
// against its positive and the whole queue (shared negatives: one GEMM, B x D times D x Q), the
// objective turns the scores into the loss and dL/dq, and the batch's keys are enqueued (the oldest
// go out). With s_pos = q . k+ and s_j = q . key_j, InfoNCE (MoCo's objective) is
//   L = -(1/B) sum_i log( e^{s_pos / tau} / (e^{s_pos / tau} + sum_j e^{s_j / tau}) ),
// the engine's infonce with every key weighted once (no noise distribution: log importance weights
// 0). dcl, hcl, dhel and kcl take the queue as their K negatives the same way, and with labels
// supcon, contrastive and triplet take the keys of the query's label as positives
// (docs/objectives.md has each formula). nce and full_softmax need a bank and are refused.
//
// Masks. Each slot may carry the instance id and the label of its key (-1 / none for the seeded
// keys a new queue starts with). With exclude_positive, a slot holding the query's own instance
// (an accidental hit: the same image seen again within Q keys) is no negative of that query; with
// exclude_same_label, neither is a slot of its label. A masked slot is no entry at all: the query's
// K is its count of unmasked slots (dcl's, hcl's and kcl's K). A query whose every slot is masked
// is an Error.
//
// The ring. A new queue holds Q seeded keys drawn uniformly on the sphere (as MoCo's starts from
// normalised Gaussians). Enqueuing B keys writes slots position(), position() + 1, ... (mod Q)
// and moves position() on by B: Q need not be a multiple of B (MoCo asks that it be), the batch
// simply wraps around the end of the ring; with B > Q only the batch's last Q keys remain. A key is
// stored as normalise(key), rounded to the queue's dtype (config.rounding, keyed by the step
// counter and the slot as a bank's refresh is).
//
// Which fields of EngineConfig apply: objective, tau and the objectives' parameters (tau_plus,
// beta, detach_weights, kernel_t, gamma, margin), exclude_positive and exclude_same_label (the
// masks), normalize_features (queries and keys: dL/dq then flows through the queries'
// normalisation), unit_norm_tolerance, rounding and seed (the initial keys, stochastic rounding).
// k, momentum, negatives, z_policy, z_fixed and z_ema have no part (Q is the negatives' count).
//
// Memory: Q D bytes of the dtype for the keys plus 25 Q for ids, labels and flags; a step's
// scratch is the B x Q scores (kept by the queue from one step to the next), about 40 Q bytes per
// thread, and 4 B D per tile of 4096 keys (queue_step_scratch_bytes). Time: two GEMMs of B x D x Q,
// each tile of keys packed once for the whole batch, and O(B Q) for the objective.
//
// Results are bit-identical for any OpenMP thread count (the keys are processed in fixed tiles of
// 4096, the partial products summed in tile order). Thread safety: as Engine (const methods may run concurrently with each other).
// Aliasing: as Engine: grad may overlap nothing (itself, queries, keys, ids, labels, the queue).
#include <membank/bank.hpp>
#include <membank/engine.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace membank {

namespace detail {
struct QueueComputed;
}

using LabelsRef = std::span<const std::int64_t>;

class Queue {
 public:
  /// A queue of `capacity` (Q >= 1) keys of dimension `dim`, stored as `dtype`, holding Q seeded
  /// unit keys (seed = config.seed) with no id and no label. Throws Error on Q < 1, dim < 1, or a
  /// configuration whose objective does not apply (nce, full_softmax) or whose fields are out of range.
  Queue(index_t capacity, index_t dim, EngineConfig config, DType dtype = DType::float32);

  /// One step: loss and dL/dq (written into grad, B x D) of the queries against their positive
  /// keys and the queue as it is, then (if `enqueue`) the keys enqueued with their ids and labels.
  /// ids: empty, or B instance ids >= 0 (what exclude_positive compares; stored with the keys).
  /// labels: empty, or B labels (needed by supcon, contrastive, triplet and exclude_same_label).
  /// The step counter increments either way. Throws Error, changing nothing, on: B = 0; queries,
  /// keys or grad not B x D; NaN/Inf or zero rows; rows that are not unit-norm when
  /// normalize_features is false; an id < 0; ids or labels of the wrong length; missing labels;
  /// a query whose every slot is masked; grad overlapping an input or the queue.
  StepStats step(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids = {}, LabelsRef labels = {},
                 bool enqueue = true);

  /// What step() would return now, changing nothing (no enqueue, no counter).
  StepStats evaluate(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids = {},
                     LabelsRef labels = {}) const;

  /// Enqueue B keys (unit rows, or any non-zero rows with normalize_features) with their ids and
  /// labels (each empty or B long). Validated as step() validates keys; nothing changes on an error.
  void enqueue(FeaturesRef keys, IdsRef ids = {}, LabelsRef labels = {});

  index_t capacity() const { return keys_.size(); }
  index_t dim() const { return keys_.dim(); }
  DType dtype() const { return keys_.dtype(); }
  /// The slot the next key is written to (the oldest key once the ring has been filled).
  index_t position() const { return position_; }
  /// Keys enqueued since the queue was made.
  std::int64_t enqueued() const { return enqueued_; }
  /// The keys in slot order (last_update(): the step counter at which each slot was written, -1 for
  /// a seeded key).
  const Bank& keys() const { return keys_; }
  /// Per slot: the instance id (-1: none), the label, and whether it has one.
  const std::vector<index_t>& ids() const { return ids_; }
  const std::vector<std::int64_t>& labels() const { return labels_; }
  const std::vector<std::uint8_t>& labelled() const { return labelled_; }
  const EngineConfig& config() const { return config_; }
  std::int64_t steps_done() const { return step_; }

  /// The whole state, as snapshots hold it: keys (Q x D), per-slot ids, labels and flags, ring
  /// position, keys enqueued and step counter.
  struct State {
    Bank keys;
    std::vector<index_t> ids;
    std::vector<std::int64_t> labels;
    std::vector<std::uint8_t> labelled;
    index_t position = 0;
    std::int64_t enqueued = 0;
    std::int64_t step = 0;
  };
  /// Replace the state with `state` (resume). Throws Error, changing nothing, when its shapes do not
  /// match this queue's (Q, D) or its values are out of range (position outside [0, Q), negative
  /// counts, ids < -1, flags other than 0 / 1).
  void restore(State state);

 private:
  friend class DistributedQueue;  // a rank's share of a global step: compute(), then push() of every rank's keys
  /// Validate, then loss and dL/dq with the 1/B of a batch mean over `mean_over` queries (0: this
  /// batch's B); changes nothing. `scores`: a buffer for the B x Q scores kept across steps (its
  /// pages are not faulted in again each step), or null.
  detail::QueueComputed compute(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids, LabelsRef labels,
                                index_t mean_over = 0, RowMatrixf* scores = nullptr) const;
  /// grad overlaps nothing it must not (Error otherwise).
  void check_grad_alone(GradRef grad, FeaturesRef queries, FeaturesRef keys, IdsRef ids, LabelsRef labels) const;
  void push(FeaturesRef unit_keys, IdsRef ids, LabelsRef labels);

  Bank keys_;
  EngineConfig config_;
  std::vector<index_t> ids_;
  std::vector<std::int64_t> labels_;
  std::vector<std::uint8_t> labelled_;
  index_t position_ = 0;
  std::int64_t enqueued_ = 0;
  std::int64_t step_ = 0;
  RowMatrixf scores_;  ///< step()'s B x Q scores, kept for the next step of the same B
};

/// Bytes of scratch one queue step allocates besides the caller's buffers (B queries, Q keys,
/// dimension D, `threads` threads): the B x Q scores, the objective's per-thread scratch, the
/// gradient's partial products per tile of keys, a widened copy of a 2-byte queue (4 Q D), the
/// normalised copies with normalize_features.
std::int64_t queue_step_scratch_bytes(const EngineConfig& config, index_t batch, index_t capacity, index_t dim,
                                      DType dtype, int threads);

}  // namespace membank
