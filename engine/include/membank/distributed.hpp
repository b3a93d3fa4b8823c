#pragma once
// DistributedEngine: one logical bank serving R data-parallel processes over MPI (docs/distributed.md).
//
// Each of the R ranks of a communicator holds a slice of the global batch: B_r queries, the global
// batch being the ranks' slices concatenated in rank order (B = sum of the B_r). A step is the
// single-process Engine's step on that global batch -- the same negatives (a pure function of seed,
// step and *global* query row), the same loss (the global mean), the same dL/df rows (the 1/B of
// the global mean), the same refresh -- computed in one of two modes:
//
//   replicated  every rank holds the whole bank. A step all-gathers the queries (ids and features),
//               scores and weighs its own queries against its own copy, and applies the refresh of
//               the whole global batch in global order, so the copies stay bit-identical (a
//               duplicate id, also across ranks, is refreshed in global batch order: rank 0's rows
//               first).
//   sharded     rank r holds the rows shard_rows(N, R, r) (contiguous, uneven N / R allowed). A step
//               all-gathers the queries; every rank draws the negatives of every global query (so
//               they do not depend on R) and scores those it owns; the scores travel to the query's
//               rank, which runs the objective over its K + 1 scores exactly as the single-process
//               engine does and sends the coefficients dL/ds back; each owner adds sum_j dL/ds_j v_j
//               over its rows and the partial rows are summed at the query's rank. The full softmax
//               merges per-shard (max, sum of exp, weighted row sum) triples instead. Each owner
//               refreshes its own rows.
//
// Every objective, sampler (uniform: draws independent of R; alias: the table is replicated on every
// rank, 40 bytes per row; dynamic: replicated too, its weights changed only by set_sampler_weights),
// storage type and negatives mode works in both modes. The query-dependent samplers condition on
// the whole global batch on every rank (O(B) a rank, not O(B / R)), so the draws and weights are the
// single-process engine's. The cluster sampler works in both modes: replicated, every rank re-fits
// the clusters of its whole copy; sharded, the re-fit is the single-process k-means over the shards
// (the per-cluster sums carried from rank to rank in rank order, the assignment all-gathered: every
// rank holds the whole sampler state, 8 bytes a row). The ring sampler works in both modes:
// sharded, every rank ranks its own rows for every query and the ranks' first `upper` keys are
// all-gathered (8 B upper bytes a rank) and merged into the whole bank's rings. Z (first_batch, ema)
// comes from the global batch's estimate. Scalar results are combined in rank order on every rank:
// every rank returns the same StepStats, bit for bit.
//
// Errors: a rank whose input is refused (the single-process checks, plus a slice of the batch that
// differs between ranks where it must agree) makes every rank throw the same membank::Error, naming
// the rank, before anything changes. Every collective of a step is entered by every rank: none hangs
// on another's error. A rank that dies ends the job through MPI's own abort.
//
// Thread safety: as Engine. All ranks must call the collective methods (marked) in the same order.
#include <membank/engine.hpp>
#include <membank/knn.hpp>

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace membank {

namespace detail {
struct Group;
}

enum class Distributed { replicated, sharded };
std::string to_string(Distributed d);
/// "replicated" or "sharded"; throws Error naming the value and the choices otherwise.
Distributed distributed_from_string(const std::string& s);

/// Rows [begin, end) of a global bank.
struct RowRange {
  index_t begin = 0, end = 0;
  index_t size() const { return end - begin; }
  bool contains(index_t i) const { return i >= begin && i < end; }
};

/// The rows rank r of R owns in sharded mode: contiguous blocks in rank order, the first N mod R
/// ranks one row more. Throws Error unless 1 <= R <= N and 0 <= r < R.
RowRange shard_rows(index_t n, int ranks, int rank);

/// What a step sent to other ranks (this rank's send buffers, summed over destinations), and where
/// this rank's time went (wall seconds; the phases exclude the collectives, which include waiting for
/// the slowest rank).
struct WireStats {
  std::int64_t bytes_sent = 0;   ///< payload bytes this rank handed to MPI for other ranks
  std::int64_t collectives = 0;  ///< collective calls of the step
  double seconds_communication = 0.0;  ///< inside collectives
  double seconds_draws = 0.0;          ///< drawing negatives (sharded: every global query's) and listing the owned ones
  double seconds_scores = 0.0;         ///< scoring draws and positives against the rows held
  double seconds_objective = 0.0;      ///< the objective over this rank's queries' scores
  double seconds_gradient = 0.0;       ///< sum_j dL/ds_j v_j over the rows held, and the partial rows' sum
  double seconds_refresh = 0.0;        ///< the momentum refresh of the rows held
};

class DistributedEngine {
 public:
  /// Collective. `local` is the whole bank (replicated; every rank must hold the same rows, checked
  /// by a hash) or this rank's shard_rows(n_total, R, r) of it (sharded). `sampler` covers all
  /// n_total rows and must be the same on every rank, as must `config` and `labels` (checked by a
  /// hash of each: an Error on every rank names the first rank that differs from rank 0).
  /// The communicator is duplicated: the engine's messages never meet the caller's.
  DistributedEngine(MPI_Comm comm, Distributed mode, Bank local, index_t n_total,
                    std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                    std::vector<std::int64_t> labels = {});
  /// Collective. The bank Bank(n, dim, seed, dtype) would be, each rank building only the rows it holds.
  static DistributedEngine seeded(MPI_Comm comm, Distributed mode, index_t n, index_t dim, std::uint64_t bank_seed,
                                  DType dtype, std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                                  std::vector<std::int64_t> labels = {});
  ~DistributedEngine();
  DistributedEngine(DistributedEngine&&) noexcept;
  DistributedEngine& operator=(DistributedEngine&&) noexcept;

  /// Collective. Engine::step on the global batch; this rank passes its slice (features B_r x D, ids
  /// B_r, grad B_r x D; B_r >= 1) and receives its rows of dL/df. The StepStats are the global
  /// batch's, identical on every rank.
  StepStats step(FeaturesRef features, IdsRef ids, GradRef grad, bool update = true);
  /// Collective. With caller negatives: this rank's B_r x K rows (per-sample), or the batch's 1 x K
  /// (shared: the same on every rank, checked).
  StepStats step_with_negatives(FeaturesRef features, IdsRef ids, NegativesRef negatives, GradRef grad,
                                bool update = true);

  /// Collective. Replace the labels (N of them, the same on every rank).
  void set_labels(std::span<const std::int64_t> labels);
  /// Collective. Engine::set_sampler_weights with the same ids and weights on every rank (checked by a
  /// hash of the update: an Error on every rank names the first rank that differs, nothing changed).
  /// With the loss_ema drive the engine also re-weights the global batch's rows itself after each
  /// step, the same way on every rank (from the gathered per-query losses).
  void set_sampler_weights(std::span<const index_t> ids, std::span<const double> weights);
  /// Collective. Engine::refresh_sampler: the cluster sampler re-fitted to the whole bank as it is
  /// now, the same state on every rank (sharded: k-means over the shards, bit for bit the
  /// single-process re-fit). Error on every rank for any other sampler.
  void refresh_sampler();
  /// Collective. Engine::restore_state (the same values on every rank).
  void restore_state(const Partition& partition, std::int64_t step);

  Distributed mode() const { return mode_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  /// The engine's own communicator (a duplicate of the caller's).
  MPI_Comm comm() const { return comm_; }
  /// N, the global bank's rows.
  index_t size() const { return n_; }
  index_t dim() const { return bank_.dim(); }
  /// The global rows this rank holds (all of them when replicated).
  RowRange rows() const { return held_; }
  /// This rank's rows: local row i is global row rows().begin + i.
  const Bank& local_bank() const { return bank_; }
  const NoiseSampler& sampler() const { return *sampler_; }
  const EngineConfig& config() const { return config_; }
  const Partition& partition() const { return partition_; }
  std::int64_t steps_done() const { return step_; }
  const std::vector<std::int64_t>& labels() const { return labels_; }
  /// The last step's traffic from this rank.
  const WireStats& last_wire() const { return wire_; }

  /// Collective. knn_search (knn.hpp) over the whole global bank: this rank passes its Q_r >= 0 queries
  /// and receives their k best rows as global ids, best first (equal scores: the smaller global id):
  /// the single-process search of the whole bank, bit for bit where every rank runs the same
  /// instruction-set path (a score is the same chain of multiply-adds wherever its query and row
  /// fall; membank/isa.hpp). Every rank passes the same k (checked).
  /// Replicated: each rank searches its own copy. Sharded: the queries are all-gathered, every rank
  /// searches its shard for all of them, and each query's per-shard bests travel to its rank, which
  /// merges them (R min(k, shard) pairs a query). A rank whose hook cancels stops every rank (a
  /// replicated rank without queries searches nothing and asks its hook nothing)
  /// (Cancelled everywhere, nothing written); a refused argument is one Error on every rank.
  void knn_search(FeaturesRef queries, index_t k, std::span<float> scores, std::span<index_t> ids,
                  const CancelHook& cancel = {});

  /// Collective. The whole bank as N x D fp32 rows (widened) on `root` (empty elsewhere): tests and
  /// small banks (N x D < 2^31; larger is one Error on every rank). Every rank passes the same root,
  /// 0 <= root < R (Error otherwise).
  RowMatrixf gather_bank(int root = 0) const;
  /// Collective. Every row's last-update step, N of them, on `root` (empty elsewhere).
  std::vector<std::int64_t> gather_last_update(int root = 0) const;

 private:
  struct Scratch;  ///< a step's large buffers, kept across steps (distributed.cpp)
  DistributedEngine(MPI_Comm comm, Distributed mode, Bank local, index_t n_total, std::unique_ptr<NoiseSampler> sampler,
                    EngineConfig config, std::vector<std::int64_t> labels, bool checked_bank);
  StepStats run(FeaturesRef features, IdsRef ids, const NegativesRef* negatives, GradRef grad, bool update);
  /// Collective. Re-fits the cluster sampler at the step counter (refresh_sampler, or a step due one).
  void refit_clusters(const detail::Group& g);

  MPI_Comm comm_ = MPI_COMM_NULL;
  Distributed mode_ = Distributed::replicated;
  int rank_ = 0, ranks_ = 1;
  index_t n_ = 0;
  RowRange held_;
  Bank bank_;
  std::unique_ptr<NoiseSampler> sampler_;
  EngineConfig config_;
  Partition partition_;
  std::int64_t step_ = 0;
  std::vector<std::int64_t> labels_;
  std::vector<std::int32_t> classes_;
  std::vector<double> class_mass_;
  WireStats wire_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace membank
