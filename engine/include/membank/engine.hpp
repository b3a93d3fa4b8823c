#pragma once
// Engine: one training step of memory-bank instance discrimination (Wu et al., CVPR 2018).
//
// A user's training loop hands the engine L2-normalised features f (B x D) of a batch and their
// instance ids y (B). The engine draws K noise ids per query (or K shared by the batch), scores
// them against the pre-update bank, returns the loss and dL/df, and refreshes the bank rows of the
// batch by momentum. Mathematics (s = v . f, tau the temperature, P_n the sampler's probability):
//
//   NCE:  P(j|f) = exp(s_j / tau) / Z,   h(j) = P(j|f) / (P(j|f) + K P_n(j))
//         L = -(1/B) sum_i [ log h(y_i) + sum_k log(1 - h(j_ik)) ]
//         dL/ds_pos = -(1 - h_pos) / (B tau),  dL/ds_neg = h_neg / (B tau),  dL/df_i = sum dL/ds v
//   Z:    estimated as Zhat = mean_k exp(s_k/tau) / P_n(j_k) over the step's noise draws;
//         first_batch: Zhat of the first step, then constant (Wu et al.); ema: Z <- a Z + (1-a) Zhat
//         after each step (the first step uses its own Zhat); fixed: the user's value.
//   InfoNCE: L = -(1/B) sum_i log softmax_j(s_ij / tau - log P_n(j))[pos] over the positive and its K
//         negatives.
//   Full softmax (exact reference): P(j|f) = exp(s_j/tau) / sum_{all N} exp(s/tau),
//         L = -(1/B) sum_i log P(y_i|f_i), dL/df_i = (sum_j P(j|f_i) v_j - v_{y_i}) / (B tau).
//   The other objectives (dcl, hcl, dhel, kcl, and with labels supcon, contrastive, triplet):
//         docs/objectives.md, one file each under engine/src/objectives/.
//
// With exclude_positive, a query's negatives are drawn from P_n conditioned on j != y_i, and the
// objective uses that conditional probability P_n(j) / (1 - P_n(y_i)) for them (shared negatives
// exclude every id of the batch and condition on the rest). The positive's own term uses the
// unconditional P_n(y_i).
//
// Every objective with per-sample negatives runs forward and backward in one fused pass over the
// sampled rows (triplet: two; never a B x (K+1) x D buffer); the very first step of a first_batch / ema run makes one
// extra pass to estimate Z. Shared negatives gather the K rows once and score them as two GEMMs.
// Memory per step: O(B K) ids plus O(K D) for shared negatives.
//
// Randomness: the negatives of a step are a pure function of (seed, step counter, query row), so
// results are bit-identical for any OpenMP thread count, and a run restored with the same step
// counter and Z continues exactly.
//
// Thread safety: an Engine is not safe to call concurrently; const methods may run concurrently
// with each other. Calls parallelise internally with OpenMP (the caller's thread setting applies).
//
// Aliasing (memory.hpp): features, ids and negatives may overlap each other and the bank's storage
// (features = rows of bank().view() is fine: the refresh copies them before it writes). `grad` may
// overlap nothing -- not itself, an input, nor the bank's rows or last-update steps: Error naming
// both arguments, nothing changed.
// Memory (memory.hpp): a step's scratch (step_scratch_bytes) is compared with what the process can
// allocate before anything is allocated: OutOfMemory (an Error) with the bytes needed and available.
// An allocation that fails anyway, inside OpenMP regions too, is OutOfMemory; the engine is unchanged.
#include <membank/bank.hpp>
#include <membank/dynamic_sampler.hpp>
#include <membank/memory.hpp>
#include <membank/objective.hpp>
#include <membank/sampler.hpp>
#include <membank/types.hpp>

#include <limits>
#include <memory>
#include <optional>
#include <string>

namespace membank {

class MultiViewEngine;

enum class NegativesMode { per_sample, shared };
enum class ZPolicy { first_batch, ema, fixed };

std::string to_string(NegativesMode m);
std::string to_string(ZPolicy p);
/// Parse the names printed by to_string; throw Error naming the value and the choices otherwise.
NegativesMode negatives_mode_from_string(const std::string& s);
ZPolicy z_policy_from_string(const std::string& s);

struct EngineConfig {
  index_t k = 4096;                    ///< K, noise draws per query (NCE / InfoNCE); >= 1
  double tau = 0.07;                   ///< temperature; > 0
  double momentum = 0.5;               ///< m of the bank refresh; in [0, 1]
  Objective objective = Objective::nce;
  NegativesMode negatives = NegativesMode::per_sample;
  bool exclude_positive = false;       ///< redraw a negative equal to its query's positive
  ZPolicy z_policy = ZPolicy::first_batch;
  double z_fixed = 0.0;                ///< Z for ZPolicy::fixed; finite and > 0
  double z_ema = 0.99;                 ///< alpha of ZPolicy::ema; in [0, 1)
  std::uint64_t seed = 0;              ///< keys every random draw of the run
  /// false: features must already have unit norm (|‖f‖ - 1| <= unit_norm_tolerance).
  /// true: the engine normalises each feature row and dL/df flows through the normalisation,
  /// i.e. the gradient returned is with respect to the raw rows the caller passed.
  bool normalize_features = false;
  double unit_norm_tolerance = 1e-3;

  // The objectives' parameters (docs/objectives.md); each is checked whatever the objective.
  double tau_plus = 0.1;        ///< dcl, hcl: class prior tau+; in [0, 1)
  double beta = 1.0;            ///< hcl: concentration beta; finite, >= 0
  bool detach_weights = false;  ///< hcl: treat the importance weights as constants (the paper's code does not)
  double kernel_t = 2.0;        ///< kcl: Gaussian kernel e^{-t |x - y|^2}; finite, > 0
  double gamma = 16.0;          ///< kcl: weight of the energy term; finite, >= 0
  /// contrastive: margin on the distance |f - v| (default 1); triplet: on the squared distance
  /// (default 0.2). NaN: the objective's default (effective_margin()).
  double margin = std::numeric_limits<double>::quiet_NaN();
  /// Draw no negative with the query's label (P_n conditioned on the other labels); needs labels.
  bool exclude_same_label = false;
  /// How a refreshed row of a 2-byte bank is rounded (types.hpp's Rounding; the random bits are
  /// keyed by seed, step and row). No effect on an fp32 bank.
  Rounding rounding = Rounding::nearest;
  /// Train on a biased sampler's draws (RingSampler) with an objective that needs a valid P_n
  /// (needs_valid_noise): the draws then weigh as uniform ones, as the hard-negative methods train.
  /// false: such an engine is refused.
  bool allow_biased_sampler = false;

  /// The margin the objective uses: `margin`, or its default when NaN.
  double effective_margin() const;

  /// Throws Error naming the first field out of range, its value and the allowed range. `n` is the
  /// bank size (K >= N is refused with exclude_positive, as no K distinct... negatives remain).
  /// With `dim` >= 1 it also checks that one step's scratch for K (step_scratch_bytes with B = 1 and
  /// the current thread count) fits in memory, before the K <= 2^31 bound: OutOfMemory otherwise.
  void validate(index_t n, index_t dim = 0) const;
};

/// Bytes of scratch one step allocates besides the caller's buffers, for B queries, K negatives,
/// dimension D and `threads` OpenMP threads (saturating at INT64_MAX): per-sample negatives
/// 12 K per thread; shared negatives 20 K + 4 K D + 4 B K; plus 36 B (and 4 B D + 8 B when
/// normalising). The full softmax's own scratch is checked by full_softmax_loss.
std::int64_t step_scratch_bytes(const EngineConfig& config, index_t batch, index_t dim, index_t k, int threads);

/// Z state (kept in log space: exp(s/tau) overflows double long before log Z does).
struct Partition {
  ZPolicy policy = ZPolicy::first_batch;
  bool initialised = false;  ///< false until the first NCE step (or always true for fixed)
  double log_z = 0.0;        ///< log Z once initialised
  double z() const;          ///< exp(log_z); NaN while not initialised
};

/// What a step reports besides the gradient.
struct StepStats {
  double loss = 0.0;            ///< L as defined above (mean over the batch)
  double z = 0.0;               ///< Z used by this step (NCE); mean exact Z_i (full softmax); NaN otherwise
  double z_estimate = 0.0;      ///< Zhat of this step's draws (NCE, InfoNCE); NaN for full softmax
  double mean_p_positive = 0.0; ///< mean_i P(y_i|f_i): exp(s/tau)/Z (NCE), exact (full), softmax over K+1 (InfoNCE)
  double negative_collision_fraction = 0.0;  ///< fraction of the B*K negatives equal to their query's positive
  std::int64_t step = 0;        ///< the step counter value this step used (before it was incremented)
  bool prefetched = false;      ///< the step used the draws of a prefetch() (the results are the same)
  /// infonce, dcl, hcl: the InfoNCE bound on the mutual information, log(K + 1) - L (nats). It
  /// cannot exceed log(K + 1) (mi_bound_ceiling): near the ceiling it says K is too small to
  /// measure more, not that the representation holds no more. NaN for the other objectives.
  double mi_lower_bound = std::numeric_limits<double>::quiet_NaN();
  double mi_bound_ceiling = std::numeric_limits<double>::quiet_NaN();  ///< log(K + 1)
};

class Engine {
 public:
  /// Takes ownership of the bank and sampler. Throws Error if config.validate(bank.size()) fails,
  /// the sampler is null or its size differs from the bank's, or labels is neither empty nor N long.
  /// supcon, contrastive, triplet and exclude_same_label need labels: given here, or by set_labels()
  /// before the first step (a step without them throws). A DynamicSampler with the loss_ema drive is
  /// re-weighted after every step from the batch's per-query losses (refused with the full softmax,
  /// which has no sampled terms).
  Engine(Bank bank, std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
         std::vector<std::int64_t> labels = {});
  ~Engine();  ///< waits for a prefetch in flight
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  /// One int64 label per instance (N of them; any values). Throws Error, changing nothing, on a
  /// wrong length, or if exclude_same_label is set and some label carries all of the noise mass.
  void set_labels(std::span<const std::int64_t> labels);
  /// The checks set_labels() makes, for labels meant for an engine with this sampler and config
  /// (callers that must not lose their bank to a refused constructor run it first).
  static void check_labels(std::span<const std::int64_t> labels, const NoiseSampler& sampler,
                           const EngineConfig& config);
  /// The constructor's checks of the sampler against the config (a query-dependent sampler's
  /// refusals, a biased sampler's): Error naming the objective or option and the sampler.
  static void check_sampler(const NoiseSampler& sampler, const EngineConfig& config);
  /// The labels (empty when none were given).
  const std::vector<std::int64_t>& labels() const { return labels_; }

  /// One training step: draw negatives for step counter step(), compute loss and dL/df with the
  /// pre-update rows, write dL/df into `grad` (B x D), then (if `update`) refresh the rows of `ids`
  /// with `features` and increment the step counter. With update = false the counter is still
  /// incremented and the caller may call update() itself.
  /// Throws Error (and changes nothing: bank, Z, counter) on: B = 0; features not B x D with
  /// B = ids.size(); grad not B x D; an id outside [0, N); NaN/Inf or zero-norm features; features
  /// that are not unit-norm when normalize_features is false; grad sharing memory with itself,
  /// features, ids or the bank. OutOfMemory when the step's scratch does not fit (see above).
  /// Features that are rows of the bank (bank().view()) give the result of a copy of those rows.
  StepStats step(FeaturesRef features, IdsRef ids, GradRef grad, bool update = true);

  /// The same step with caller-supplied negatives: B x K for per-sample mode, 1 x K for shared mode
  /// (K may differ from config().k). Reproduces a step exactly, e.g. to compare implementations.
  /// With exclude_positive the caller's negatives are taken as draws from the same conditional P_n
  /// as the engine's own (so step_with_negatives(sample(ids, s)) reproduces step()). Also throws
  /// Error on negative ids out of range, or (with exclude_positive) a negative equal to its
  /// positive (per-sample) or to any id of the batch (shared), or grad sharing memory with negatives.
  StepStats step_with_negatives(FeaturesRef features, IdsRef ids, NegativesRef negatives,
                                GradRef grad, bool update = true);

  /// Loss and gradient only, never touching the bank, Z or the counter: what step_with_negatives()
  /// would return now. While Z is not yet initialised it is estimated from these negatives (and
  /// then depends on the features: use ZPolicy::fixed for gradient checks).
  StepStats evaluate(FeaturesRef features, IdsRef ids, NegativesRef negatives, GradRef grad) const;

  /// Announces the ids of the next step(): a background thread draws that step's negatives (a pure
  /// function of seed, step counter, query row and its id) while the caller computes its forward
  /// pass, and the next step() with exactly these ids at this step counter uses them instead of
  /// drawing its own. Results are bit for bit those without the call (the draws are the same; the
  /// step reads them as step_with_negatives would, without re-validating its own draws). A step with
  /// other ids, or any other call that changes the step counter, the labels or the sampler's weights
  /// (set_sampler_weights), discards the prefetch. Per-sample negatives only: with shared negatives,
  /// the full softmax or a query-dependent sampler (whose draws need the step's features) it does
  /// nothing and returns false. The draws take B K 8 bytes (8 MB at B = 256, K = 4096) and one thread.
  /// The rows themselves are not copied ahead: a staged copy of the B (K + 1) rows is as many bytes
  /// as the gather reads, written and read again (docs/architecture.md).
  /// Throws Error (nothing started) on empty or out-of-range ids, or missing labels.
  bool prefetch(IdsRef next_ids);
  /// Whether a prefetch is held (in flight or done) for a next step.
  bool prefetch_pending() const { return prefetch_ != nullptr; }

  /// Momentum refresh of the rows of `ids` (the bank's momentum_update with config().momentum and
  /// the step counter), normalising the features first if normalize_features is set. Features may
  /// be rows of the bank (copied before the write).
  void update(FeaturesRef features, IdsRef ids);

  /// The negatives step() would draw at step counter `step` for these ids: B x K (per-sample) or
  /// 1 x K (shared). Identical for any thread count. A query-dependent sampler (ClusterSampler) draws
  /// from q(. | f): use the overload with the step's features (Error here).
  RowMatrixi sample(IdsRef ids, std::int64_t step) const;
  /// The same for a query-dependent sampler, whose draws depend on the features (B x D, as step()
  /// takes them). A static sampler ignores them.
  RowMatrixi sample(IdsRef ids, std::int64_t step, FeaturesRef features) const;

  /// Re-fits a cluster sampler to the bank as it is now (ClusterSampler::refresh; the state is used
  /// from the current step counter on): for a schedule of the caller's own, e.g. once per epoch.
  /// The engine also refreshes by itself every config().refresh_every steps of the sampler, at the
  /// start of the step that is due (the refresh depends on the bank and the counter only). Throws
  /// Error for any other sampler.
  void refresh_sampler();

  /// Changes the weights of a DynamicSampler (dynamic_sampler.hpp): w[ids[k]] = weights[k], P_n exact
  /// from the next draw on. Waits for and discards a prefetch in flight (its draws used the old
  /// weights). With labels, the classes' P_n masses (exclude_same_label's conditioning) are summed
  /// afresh: O(N) per call then. Throws Error, changing nothing, if the sampler is not dynamic, on
  /// the sampler's own checks (ids in range, finite weights >= 0, a positive sum), or if a label
  /// would carry all of the noise mass under exclude_same_label.
  void set_sampler_weights(std::span<const index_t> ids, std::span<const double> weights);

  const Bank& bank() const { return bank_; }
  const NoiseSampler& sampler() const { return *sampler_; }
  const EngineConfig& config() const { return config_; }
  const Partition& partition() const { return partition_; }
  std::int64_t steps_done() const { return step_; }

  /// Restore the Z state and the step counter (resume from a snapshot). Throws Error if the
  /// policies differ or the values are not finite / negative.
  void restore_state(const Partition& partition, std::int64_t step);

 private:
  // MultiViewEngine (multiview.hpp) holds an Engine for view 0's bank, the sampler, the labels and
  // the step counter, and scores each pair of views through compute_on() with the pair's bank and Z.
  friend class MultiViewEngine;

  struct Computed {
    StepStats stats;
    Partition partition;  ///< Z state after the step (initialised = false: no change)
    RowMatrixf normalized;  ///< the unit features used, when the engine normalised them (else empty)
    std::vector<double> query_losses;  ///< each query's own loss, for a loss-driven DynamicSampler (else empty)
  };
  /// Validate, then compute loss and gradient; changes nothing in the engine. `own_draws`: the
  /// negatives are the engine's own draws for this step (a prefetch), not re-validated.
  Computed compute(FeaturesRef features, IdsRef ids, const RowMatrixi* negatives, GradRef grad,
                   bool own_draws = false) const {
    return compute_on(bank_, partition_, features, ids, negatives, grad, own_draws);
  }
  /// compute() scored against `bank` (N x D like the engine's own, any dtype) with the Z state
  /// `partition` in place of the engine's: one pair of views of a MultiViewEngine.
  Computed compute_on(const Bank& bank, const Partition& partition, FeaturesRef features, IdsRef ids,
                      const RowMatrixi* negatives, GradRef grad, bool own_draws) const;
  /// sample() with the draws conditioned against `bank` (a query-dependent sampler that reads the
  /// bank, RingSampler): the engine's own, or one pair's bank of a MultiViewEngine.
  RowMatrixi sample_impl(const Bank& bank, IdsRef ids, std::int64_t step, const FeaturesRef* features) const;
  /// Error unless the engine holds labels where the objective or exclude_same_label needs them.
  void check_labels_present() const;
  /// compute(), then commit Z, the bank rows (if update) and the counter.
  StepStats run(FeaturesRef features, IdsRef ids, const RowMatrixi* negatives, GradRef grad,
                bool update);

  struct Prefetch;
  /// The prefetched draws (first member: a move-assignment waits for the old thread before it
  /// replaces anything the thread reads; the destructor resets it first).
  std::unique_ptr<Prefetch> prefetch_;
  /// Waits for a prefetch in flight and drops it.
  void discard_prefetch();
  /// The sampler as a DynamicSampler whose drive is loss_ema (the engine re-weights the batch's rows
  /// after each step), else null.
  DynamicSampler* loss_driven_sampler() const;
  /// The class masses summed afresh from the sampler (after its weights changed).
  void refresh_class_mass();

  Bank bank_;
  std::unique_ptr<NoiseSampler> sampler_;
  EngineConfig config_;
  Partition partition_;
  std::int64_t step_ = 0;
  std::vector<std::int64_t> labels_;
  std::vector<std::int32_t> classes_;   ///< labels_ as indices 0..C-1 (the kernels compare these)
  std::vector<double> class_mass_;      ///< P_n mass of each class (exclude_same_label's conditioning)
  // classes_ again, in 1 byte each up to 256 classes, else 2 up to 65,536 (the per-sample kernel's
  // random reads); at most one of the two is filled.
  std::vector<std::uint8_t> classes8_;
  std::vector<std::uint16_t> classes16_;
};

/// Exact non-parametric softmax over the whole bank (the reference objective). Streams the bank in
/// fixed blocks with an online log-sum-exp: O(B N D) time, O(B D) extra memory, never a B x N
/// matrix. Writes dL/df into grad (B x D) and returns L; `mean_z` and `mean_p_positive` receive
/// mean_i Z_i and mean_i P(y_i|f_i) when non-null. Features must be B x D unit rows (validated,
/// |‖f‖ - 1| <= unit_norm_tolerance).
/// Bit-identical for any thread count (the bank is cut into blocks that do not depend on it).
/// Features and ids may overlap the bank; grad may overlap nothing (itself, features, ids, the bank's
/// rows): Error naming both. Its scratch (threads x B x 1024 + chunks x B x (D + 4) floats) is
/// checked against available memory first (OutOfMemory).
double full_softmax_loss(const BankView& bank, FeaturesRef features, IdsRef ids, double tau,
                         GradRef grad, double* mean_z = nullptr, double* mean_p_positive = nullptr,
                         double unit_norm_tolerance = 1e-3);

}  // namespace membank
