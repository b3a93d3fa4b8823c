#pragma once
// A query-dependent proposal over k-means clusters of the bank: negatives that are hard for the
// current query, drawn with their exact probability.
//
// The bank's rows are grouped into C clusters by spherical k-means (centroids c_k of unit norm, each
// row in the cluster of its nearest centroid by dot product; n_k rows in cluster k). For a query f
// the proposal is the mixture
//
//   q(j | f) = eps / N + (1 - eps) pi_k(f) / n_k,   k = cluster(j),
//   pi_k(f)  = n_k exp(beta f . c_k) / sum_l n_l exp(beta f . c_l),
//
// drawn as: with probability eps a uniform row; otherwise a cluster k from pi(f), then a uniform
// member of it. Every draw reports log q(j | f) (whatever branch produced j), and the engine uses it
// where a static sampler's P_n(j) goes: NCE's K P_n, Zhat = mean e_j / q_j, InfoNCE's log Q. eps > 0
// keeps q > 0 on every row, so the estimates over the draws stay unbiased. With beta = 0 the mixture
// is uniform; prob(j) (no query) is that, 1/N.
//
// Refresh: the centroids and assignments change only in refresh(), on a schedule the caller sets
// (Engine refreshes every `refresh_every` steps, or when asked: Engine::refresh_sampler). Rows the
// bank updates in between keep their cluster until the next refresh, so every draw's q is exact under
// the one snapshot of centroids and assignments it used. A refresh runs `iterations` Lloyd steps
// warm-started from the current centroids (the first fit starts from C distinct rows picked by the
// seed) and then assigns every row; it is deterministic and the same for any thread count.
//
// Cost: conditioning a batch is one B x C x D product, B C exponentials and logarithms (1.1 MFLOP a
// query at C = 1024, D = 128); a draw is one Philox block, a guided search over C cumulative weights
// (L1/L2-resident) and one read of the member table. A refresh is (iterations + 1) N x C x D products.
// Memory: C D 4 bytes of centroids, 8 bytes a row (assignment and member table), 8 bytes a cluster,
// and 28 C bytes a query while a batch is conditioned.
#include <membank/bank.hpp>
#include <membank/sampler.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace membank {

namespace detail {
struct ClusterBufferPool;
}

struct ClusterConfig {
  index_t clusters = 1024;         ///< C, the number of clusters; 1 <= C <= N
  double epsilon = 0.1;            ///< the uniform share of the mixture, in (0, 1]
  double beta = 10.0;              ///< sharpness of pi(f); >= 0 (0: uniform). 1 / tau matches the scores
  std::int64_t refresh_every = 0;  ///< the engine refreshes every this many steps; 0: only when asked
  int iterations = 3;              ///< Lloyd steps per refresh; >= 0
  std::uint64_t seed = 0;          ///< picks the first fit's initial centroids
  /// Throws Error (naming the field, its value and what was expected) for a config over n rows.
  void validate(index_t n) const;
};

class ClusterSampler final : public NoiseSampler {
 public:
  /// Fits C clusters to the bank's rows (any storage type). Throws Error if config.validate(N) fails.
  ClusterSampler(const BankView& bank, ClusterConfig config);
  /// A saved state: C x D centroids, each of the N rows' cluster in [0, C), and the step counter
  /// from which this state is used (the last refresh). Throws Error for a config that fails
  /// validate(N), centroids of the wrong shape or with a non-finite value, or an assignment out of range.
  ClusterSampler(ClusterConfig config, RowMatrixf centroids, std::vector<std::int32_t> assignment,
                 std::int64_t refreshed_at);

  SamplerKind kind() const override { return SamplerKind::cluster; }
  bool query_dependent() const override { return true; }
  bool draws_before_rows() const override { return true; }
  /// 1/N: the mixture of a query that says nothing (beta = 0).
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  /// Draws from q(. | cursor.query); a null query draws from prob() (uniform).
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;
  /// (The bank is not read: the clusters are the last refresh's.)
  std::unique_ptr<Conditioned> condition(const BankView& bank, const float* f, index_t stride, index_t batch,
                                         index_t dim) const override;
  std::unique_ptr<Conditioned> condition(const float* f, index_t stride, index_t batch, index_t dim) const {
    return condition(BankView{}, f, stride, batch, dim);
  }
  /// eps N_c / N + (1 - eps) sum_k pi_k(f_i) n_kc / n_k for each query: O(N + C L) for the table of
  /// each cluster's class counts n_kc, then O(C) a query.
  void class_mass_given(const Conditioned& batch, const std::int32_t* classes, index_t n_classes,
                        std::span<const std::int32_t> query_classes, std::span<double> out) const override;

  /// Re-fits the clusters to the bank's current rows (`iterations` Lloyd steps from the current
  /// centroids, then every row assigned); the state is used from step counter `step` on. Throws Error,
  /// changing nothing, if the bank's N or D differ from the sampler's.
  void refresh(const BankView& bank, std::int64_t step);
  /// Whether the engine refreshes before the step with counter `step` (refresh_every > 0 and that
  /// many steps since the last refresh).
  bool due(std::int64_t step) const {
    return config_.refresh_every > 0 && step - refreshed_at_ >= config_.refresh_every;
  }

  const ClusterConfig& config() const { return config_; }
  const RowMatrixf& centroids() const { return centroids_; }      ///< C x D, unit rows
  const std::vector<std::int32_t>& assignment() const { return assignment_; }  ///< each row's cluster
  const std::vector<index_t>& cluster_sizes() const { return sizes_; }        ///< n_k
  std::int64_t refreshed_at() const { return refreshed_at_; }
  /// The epsilon draws realise exactly: the configured one rounded up to a multiple of 2^-53.
  double epsilon() const { return eps_; }

 protected:
  double prob_given(index_t j, QueryRef query) const override;
  void lookup_given(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const override;

 private:
  /// The member table (rows sorted by cluster, ascending within), sizes and spans from assignment_.
  void index_members();

  ClusterConfig config_;
  double eps_ = 0.0;
  RowMatrixf centroids_;
  std::vector<std::int32_t> assignment_;
  std::vector<index_t> sizes_;    ///< n_k
  std::vector<std::uint32_t> members_;
  /// Per cluster, its first slot in members_ (high 32 bits) and n_k (low): what a draw reads, in one word.
  std::vector<std::uint64_t> spans_;
  std::int64_t refreshed_at_ = 0;
  /// The buffers of batches conditioned before, kept for the next one: a fresh batch's 28 C bytes a
  /// query would be fresh pages each step, whose faults cost more than the conditioning itself.
  /// Shared by copies of the sampler; guarded by its own mutex.
  std::shared_ptr<detail::ClusterBufferPool> pool_;
};

}  // namespace membank
