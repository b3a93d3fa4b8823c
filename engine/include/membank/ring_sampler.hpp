#pragma once
// A biased sampler: hard negatives from a ring of each query's neighbours in the bank (Ring, from
// Wu et al., "Conditional negative sampling for contrastive learning of visual representations",
// ICLR 2021; with lower = 0 it is top-k hard-negative sampling).
//
// For a query f the bank's N rows are ranked by their score f . v_j, highest first (equal scores by
// id, lowest first); the ring is the M = upper - lower rows of ranks [lower, upper), and the draws
// are uniform over it: q(j | f) = 1/M on the ring and 0 elsewhere. The query's own row is ranked like
// any other (it usually takes rank 0 once the bank has learnt: lower = 1 skips it, or exclude_positive
// redraws it).
//
// Biased: q is 0 outside the ring, so no weighting of the draws estimates a sum over the whole bank.
// The engine therefore gives the draws of a biased sampler no importance weight (lw = 0: each draw
// counts as a uniform one, which is what the published methods train with), and refuses it for the
// objectives whose value is an estimate that needs a valid P_n (every one but contrastive and
// triplet, whose hard-negative mining is the method itself) unless EngineConfig::allow_biased_sampler
// is set. Every draw still reports its exact log q(j | f).
//
// Under exclude_same_label (condition_excluding) each query's ring ranks only the rows of the other
// classes: ranks [lower, upper) among them, so the draws never hit the query's label (a query whose
// label leaves fewer than `upper` rows of other classes is an Error).
//
// Without a query (prob(), a null QueryRef) the sampler is uniform. Shared negatives are drawn from
// the batch's mean (1/B) sum_i q(. | f_i): a query picked uniformly, then a member of its ring.
//
// Cost: conditioning a batch scores every query against the whole bank (a B x N x D product, read in
// fixed blocks: never a B x N matrix in memory) and selects each query's ring in O(N): a radix select
// (one pass counts 4,096 score buckets, a second takes the buckets strictly inside the ring and ranks
// the rows of the two buckets its ends fall in exactly), then merges the ids in order. It is the exact
// ranking the method defines; at N = 1.28 M it reads the bank once per 16 queries. Memory: 4 B M
// bytes of rings and 4 N bytes of counts a batch, and per thread 16 N floats of scores and 2 N bytes
// of buckets.
#include <membank/bank.hpp>
#include <membank/sampler.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace membank {

struct RingConfig {
  index_t lower = 0;     ///< the ring's first rank (0: the row most similar to the query)
  index_t upper = 4096;  ///< one past its last rank: the ring holds M = upper - lower rows
  /// Throws Error (naming the field, its value and what was expected) unless 0 <= lower < upper <= n.
  void validate(index_t n) const;
};

class RingSampler final : public NoiseSampler {
 public:
  /// A ring sampler over n rows. Throws Error if n < 1, n >= 2^32 or config.validate(n) fails.
  RingSampler(index_t n, RingConfig config);

  SamplerKind kind() const override { return SamplerKind::ring; }
  bool query_dependent() const override { return true; }
  bool biased() const override { return true; }
  /// 1/N: without a query the sampler is uniform.
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  /// Uniform draws from the ring of cursor.query (the batch's mean for row B); uniform over N for a
  /// null query. Each takes one Philox block; the r-th redraw of an excluded draw takes block total + r.
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;
  /// Each query's ring against `bank` (N x D, any storage type). Throws Error if the bank's N differs
  /// from the sampler's, D from dim, or a feature is not finite.
  std::unique_ptr<Conditioned> condition(const BankView& bank, const float* f, index_t stride, index_t batch,
                                         index_t dim) const override;
  /// The same with each query's ring ranked among the rows of the other classes only (classes: N
  /// rows' classes, query_classes: B queries'). Throws Error, as condition() does, and if a query's
  /// label leaves fewer than `upper` rows of other classes.
  std::unique_ptr<Conditioned> condition_excluding(const BankView& bank, const float* f, index_t stride, index_t batch,
                                                   index_t dim, const std::int32_t* classes,
                                                   std::span<const std::int32_t> query_classes) const override;
  /// The mass of each query's class in its ring (0 for rings conditioned with condition_excluding):
  /// out[i] = (ring members of class query_classes[i]) / M.
  void class_mass_given(const Conditioned& batch, const std::int32_t* classes, index_t n_classes,
                        std::span<const std::int32_t> query_classes, std::span<double> out) const override;
  /// Sharded conditioning (DistributedEngine), in two local halves around one all-gather:
  /// candidates() ranks a shard -- global rows [row0, row0 + shard.rows) -- for every query and keeps
  /// its first shard_candidates(shard.rows) = min(upper, rows) as sort keys (the score's order, then
  /// the global id: the ranking's own tie rule), B of them a query, query-major; from_candidates()
  /// takes every shard's keys concatenated shard after shard (per_shard: each one's count a query)
  /// and keeps ranks [lower, upper) of their union, which holds the global ranks up to upper: the
  /// rings of condition() over the whole bank. `classes` (global, or null): condition_excluding's.
  std::vector<std::uint64_t> candidates(const BankView& shard, index_t row0, const float* f, index_t stride,
                                        index_t batch, index_t dim, const std::int32_t* classes,
                                        std::span<const std::int32_t> query_classes) const;
  index_t shard_candidates(index_t shard_rows) const;
  std::unique_ptr<Conditioned> from_candidates(std::span<const std::uint64_t> all, std::span<const index_t> per_shard,
                                               index_t batch) const;
  const RingConfig& config() const { return config_; }
  /// The ring of a conditioned query (its M ids, ascending), for tests and diagnostics.
  std::span<const std::uint32_t> ring(QueryRef query) const;

 protected:
  double prob_given(index_t j, QueryRef query) const override;
  void lookup_given(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const override;

 private:
  /// condition() and condition_excluding(): `classes` null, or each query's own class left out.
  std::unique_ptr<Conditioned> rank(const BankView& bank, const float* f, index_t stride, index_t batch, index_t dim,
                                    const std::int32_t* classes, std::span<const std::int32_t> query_classes) const;
  /// Error unless each query's class leaves at least `upper` rows of other classes.
  void check_other_rows(const std::int32_t* classes, std::span<const std::int32_t> query_classes) const;
  /// Error for a batch < 1, D != the bank's, a stride < D or a non-finite feature.
  void check_queries(const float* f, index_t stride, index_t batch, index_t dim, index_t bank_dim) const;
  RingConfig config_;
};

}  // namespace membank
