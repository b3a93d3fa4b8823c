#pragma once
// MultiViewEngine: contrastive multiview coding (CMC, Tian et al., ECCV 2020) over memory banks.
//
// V >= 2 views of the same N instances (e.g. the L and ab channels of an image), one bank per view.
// A step takes the batch's unit features f^v (B x D) of every view v and their instance ids y (B),
// and scores the ordered pairs (a, b) of the view graph: view a's queries against view b's bank.
// With s^{ab}_ij = v^b_j . f^a_i, each pair's loss L_ab is the configured objective of engine.hpp,
// exactly as Engine::step computes it for features f^a on bank b: the positive is bank b's row of
// the query's id, v^b_{y_i}, the negatives are bank b's rows of the step's draws j_ik, e.g.
//
//   NCE:      L_ab = -(1/B) sum_i [ log h_ab(y_i) + sum_k log(1 - h_ab(j_ik)) ],
//             h_ab(j) = P_ab(j) / (P_ab(j) + K P_n(j)),  P_ab(j) = exp(s^{ab}_ij / tau) / Z_ab
//   InfoNCE:  L_ab = -(1/B) sum_i log softmax_j(s^{ab}_ij / tau - log P_n(j))[y_i] over y_i and j_i1..j_iK
//   full softmax (exact): L_ab = -(1/B) sum_i log [ exp(s^{ab}_{i y_i} / tau) / sum_{j < N} exp(s^{ab}_ij / tau) ]
//
//   L = sum over the pairs (a, b) of L_ab  (CMC sums its two losses);
//   dL/df^a = sum over the pairs (a, b) of dL_ab/df^a  (the banks are constants of the step).
//
// The view graph (ViewGraph): full, every ordered pair a != b (V (V - 1) pairs); core, view 0 is
// the core: (0, b) and (b, 0) for b >= 1 (2 (V - 1) pairs). For V = 2 both are (0, 1), (1, 0).
// pairs() lists them in lexicographic order, which is the order of MultiViewStats::pairs, of
// partitions() and of the gradient sums.
//
// Shared draws: every pair uses the same negatives (CMC samples its indices once for both
// memories): they are exactly what Engine::sample(ids, step) draws at the
// step counter (per-sample B x K or shared 1 x K, with exclude_positive / exclude_same_label as
// configured), i.e. multiview.sample(ids, steps_done()).
// A query-dependent sampler is the exception: pair (a, b) draws from q(. | f^a_i) conditioned on its
// own query view and bank, and weighs every draw with that q, so each pair's estimate is exact for
// its own proposal (sample(ids, step, features, p) returns pair p's draws). A ClusterSampler's
// clusters are those of view 0's bank (refreshed from it, by refresh_every or refresh_sampler()),
// so pairs with the same query view draw the same negatives; a RingSampler ranks each pair's own
// bank b, the hard negatives of that pair. Each pair (a, b) is then what a single-view Engine over
// bank b, with the same sampler state, returns for view a's features.
// Each pair has its own Z state (Partition): z_policy applies per pair (first_batch: the pair's own
// Zhat of its first step; ema: the pair's own average; fixed: z_fixed for every pair).
//
// After every pair is computed, each bank b is refreshed by momentum with view b's features at the
// batch's ids: v^b_{y_i} <- normalise(m v^b_{y_i} + (1 - m) f^b_i) (Bank::momentum_update with the
// step counter, config.rounding and config.seed: a 2-byte bank's stochastic rounding draws the same
// bits in every view). normalize_features applies per view (each dL/df^a flows through view a's
// normalisation). The step counter is shared and increments once per step.
//
// Banks: the same N and D in every view (Error otherwise); the dtypes may differ per view (each
// pair reads its bank's type). The sampler and the labels are shared by all views.
//
// Cost per step: one Engine-like evaluation per pair, one after the other (each parallel inside),
// each drawing the step's negatives inside its kernel as the single-view step does (the draws are a
// pure function of seed, counter, row and id, so every pair draws the same ones; drawing them once
// into a B x K array that every pair reads was measured slower, as it does not overlap the draws
// with the gathers): V (V - 1) pair evaluations for the full graph, 2 (V - 1) for the core graph,
// plus V refreshes of B rows. Memory: the V banks, V + 1 B x D float gradient buffers (the caller's
// grads are written only once every pair has succeeded), and one pair's scratch
// (step_scratch_bytes) at a time.
//
// Randomness and threads: as Engine, the draws are a pure function of (seed, step counter, query
// row), every pair is bit-identical for any OpenMP thread count and the sums run in pair order, so
// results are bit-identical for any thread count, and restore_state() with the same banks, Z states
// and counter continues a run exactly. For V = 2 each pair gives bit for bit what a single-view
// Engine with the same seed, sampler and config returns for the same step.
//
// Thread safety: not safe to call concurrently; const methods may run concurrently with each other.
//
// Errors: everything is validated before anything changes (the number of views, shapes, ids,
// features, grads, labels); a refused step throws Error naming the argument and view (e.g.
// "features[1] has shape ...") and changes nothing: banks, Z states, counter, grads. Aliasing
// (memory.hpp): features and ids may overlap each other and any bank (features[1] = rows of bank 0
// gives the result of a copy: a refresh never changes another view's input); grads[v] may overlap
// nothing -- itself, another grads[u], any features[u], ids, any bank's rows or last-update steps.
// An allocation failure (OutOfMemory) while bank b > 0 is refreshed leaves banks 0..b-1 refreshed
// and the counter and Z states unchanged; an allocation failure anywhere before changes nothing.
#include <membank/bank.hpp>
#include <membank/engine.hpp>
#include <membank/sampler.hpp>
#include <membank/types.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace membank {

/// Which ordered pairs of views are scored (see above).
enum class ViewGraph { full, core };

/// "full" or "core".
std::string to_string(ViewGraph g);
/// Parse the names printed by to_string; throw Error naming the value and the choices otherwise.
ViewGraph view_graph_from_string(const std::string& s);

/// One ordered pair of views: view `query`'s features scored against view `bank`'s bank.
struct ViewPair {
  index_t query = 0;
  index_t bank = 0;
  friend bool operator==(const ViewPair&, const ViewPair&) = default;
};

/// The ordered pairs of `graph` over `views` views, in lexicographic order. Throws Error if views < 2.
std::vector<ViewPair> view_pairs(ViewGraph graph, index_t views);

/// What a multi-view step reports besides the gradients.
struct MultiViewStats {
  double loss = 0.0;              ///< L = sum over the pairs of their losses (in pair order)
  std::vector<StepStats> pairs;   ///< each pair's stats, in the order of pairs()
};

class MultiViewEngine {
 public:
  /// Takes ownership of the V banks and the sampler. Throws Error if fewer than 2 banks are given,
  /// a bank's N or D differs from bank 0's, config.validate(N, D) fails, the sampler is null or its
  /// size differs from N, or labels is neither empty nor N long (the banks are lost then: callers
  /// who must keep them check first, e.g. Engine::check_labels for the labels).
  MultiViewEngine(std::vector<Bank> banks, std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                  ViewGraph graph = ViewGraph::full, std::vector<std::int64_t> labels = {});

  /// One training step (see above): draw the negatives for step counter steps_done(), compute every
  /// pair's loss and gradient with the pre-update rows, write dL/df^v into grads[v] (B x D each),
  /// then (if `update`) refresh every bank with its view's features, commit the pairs' Z states and
  /// increment the step counter (incremented with update = false too; update() refreshes later).
  /// features and grads hold V entries, one per view. Throws Error (changing nothing) on: the wrong
  /// number of features or grads; empty ids; an id outside [0, N); features[v] not B x D, with
  /// NaN/Inf or zero rows, or not unit-norm when normalize_features is false; grads[v] not B x D;
  /// grads[v] sharing memory with itself, another grads, any features, ids or any bank; missing
  /// labels the objective needs. OutOfMemory as above.
  MultiViewStats step(std::span<const FeaturesRef> features, IdsRef ids, std::span<GradRef> grads,
                      bool update = true);

  /// Momentum refresh of every bank v with features[v] at `ids` (what step() does when `update`),
  /// recording the current step counter. Validates every view first (Error, nothing changed).
  void update(std::span<const FeaturesRef> features, IdsRef ids);

  /// The negatives step() draws at step counter `step` for these ids (Engine::sample): B x K
  /// (per-sample) or 1 x K (shared). Identical for any thread count.
  /// A query-dependent sampler (cluster, ring) draws per pair: Error here (use the overload below).
  RowMatrixi sample(IdsRef ids, std::int64_t step) const { return core_.sample(ids, step); }
  /// The negatives pair p (an index of pairs()) draws at step counter `step` for these ids and the
  /// step's V features: conditioned on features[pairs()[p].query] (and, for a RingSampler, on bank
  /// pairs()[p].bank). A static sampler ignores the features: every pair gets sample(ids, step).
  /// Throws Error for p out of range or features that step() would refuse.
  RowMatrixi sample(IdsRef ids, std::int64_t step, std::span<const FeaturesRef> features, std::size_t p) const;

  /// Re-fits a cluster sampler to view 0's bank as it is now (Engine::refresh_sampler); the engine
  /// also refreshes by itself at the start of each step that is due (ClusterConfig::refresh_every).
  /// Throws Error for any other sampler.
  void refresh_sampler() { core_.refresh_sampler(); }

  index_t views() const { return static_cast<index_t>(others_.size()) + 1; }
  /// View v's bank; Error if v is outside [0, V).
  const Bank& bank(index_t v) const;
  ViewGraph graph() const { return graph_; }
  /// The scored pairs, in their fixed (lexicographic) order.
  const std::vector<ViewPair>& pairs() const { return pairs_; }
  /// The position of pair (query, bank) in pairs(); Error if the graph does not hold it.
  std::size_t pair_index(index_t query, index_t bank) const;
  /// Pair p's Z state (p indexes pairs()); Error if p is out of range.
  const Partition& partition(std::size_t p) const;
  /// Every pair's Z state, in the order of pairs().
  const std::vector<Partition>& partitions() const { return partitions_; }
  std::int64_t steps_done() const { return core_.steps_done(); }
  const EngineConfig& config() const { return core_.config(); }
  const NoiseSampler& sampler() const { return core_.sampler(); }

  /// One int64 label per instance, shared by the views (Engine::set_labels: same checks, nothing
  /// changed on an Error).
  void set_labels(std::span<const std::int64_t> labels) { core_.set_labels(labels); }
  /// Engine::set_sampler_weights (a dynamic sampler, shared by the views). With the loss_ema drive
  /// the engine sets them itself after each step, from each query's loss averaged over the pairs.
  void set_sampler_weights(std::span<const index_t> ids, std::span<const double> weights) {
    core_.set_sampler_weights(ids, weights);
  }
  const std::vector<std::int64_t>& labels() const { return core_.labels(); }

  /// Restore every pair's Z state (in the order of pairs()) and the step counter (resume from a
  /// snapshot). Throws Error, changing nothing, if the count differs from pairs().size(), a policy
  /// differs from config().z_policy, an initialised log Z is not finite, a fixed policy's Z is not
  /// z_fixed's, or step < 0 (as Engine::restore_state, per pair).
  void restore_state(std::vector<Partition> partitions, std::int64_t step);

 private:
  /// Checks the banks and builds the core engine (view 0's bank, the sampler, config and labels).
  static Engine make_core(std::vector<Bank>& banks, std::unique_ptr<NoiseSampler> sampler, const EngineConfig& config,
                          std::vector<std::int64_t> labels);
  Bank& bank_mut(index_t v) { return v == 0 ? core_.bank_ : others_[static_cast<std::size_t>(v - 1)]; }
  /// Every check of step() / update() (names carry the view): Error on the first failure.
  void check_views(std::span<const FeaturesRef> features, IdsRef ids) const;
  void check_grads(std::span<const FeaturesRef> features, IdsRef ids, std::span<GradRef> grads) const;
  MultiViewStats run(std::span<const FeaturesRef> features, IdsRef ids, std::span<GradRef> grads, bool update);
  /// The refresh of every bank with its view's unit features (`unit[v]`), after copying any that
  /// overlaps a bank (a refresh must not change a later view's input).
  void refresh(std::span<const FeaturesRef> unit, IdsRef ids);

  Engine core_;               ///< view 0's bank, the sampler, config, labels and the step counter
  std::vector<Bank> others_;  ///< the banks of views 1..V-1
  ViewGraph graph_ = ViewGraph::full;
  std::vector<ViewPair> pairs_;
  std::vector<Partition> partitions_;  ///< one Z state per pair
};

}  // namespace membank
