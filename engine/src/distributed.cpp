// DistributedEngine (membank/distributed.hpp): the step of the global batch over MPI ranks, in
// replicated or sharded mode. The arithmetic of docs/distributed.md, in the order a step runs:
//   1. every rank checks its own slice (the single-process checks); all ranks agree (one error for all)
//   2. all-gather of the queries: ids and unit features of the global batch, B = sum B_r rows
//   3. draws: replicated, the rank's own queries; sharded, every global query (keyed by global row)
//   4. scores: replicated, all of its queries' draws; sharded, the draws and positives it owns
//   5. sharded: scores to the query's rank (all-to-all)
//   6. the query's rank: Z (from the global estimate), the objective over the K + 1 scores, dL/ds
//   7. sharded: dL/ds back to the owners, the owners' sum_j dL/ds_j v_j to the query's rank
//   8. refresh: replicated, the whole global batch on every rank; sharded, each owner its rows
// The objectives run through the kernels' shared-negatives entry (kernels::Table::shared_query): a
// query's scores in, its coefficients out, whatever the objective.
#include <membank/distributed.hpp>
#include <membank/cluster_sampler.hpp>
#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>
#include <membank/ring_sampler.hpp>

#include "detail/check.hpp"
#include "detail/features.hpp"
#include "detail/knn_outputs.hpp"
#include "detail/kmeans.hpp"
#include "detail/mpi_group.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "kernels/kernels.hpp"
#include "step_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

namespace membank {

std::string to_string(Distributed d) { return d == Distributed::replicated ? "replicated" : "sharded"; }

Distributed distributed_from_string(const std::string& s) {
  if (s == "replicated") return Distributed::replicated;
  if (s == "sharded") return Distributed::sharded;
  MEMBANK_THROW("distributed = '{}': expected replicated or sharded", s);
}

RowRange shard_rows(index_t n, int ranks, int rank) {
  MEMBANK_CHECK(ranks >= 1 && n >= ranks, "{} ranks for N = {} rows: expected 1 <= ranks <= N (every shard holds "
                "at least one row)", ranks, n);
  MEMBANK_CHECK(rank >= 0 && rank < ranks, "rank = {}: expected 0 <= rank < {}", rank, ranks);
  const index_t q = n / ranks, rem = n % ranks;
  const index_t begin = rank * q + std::min<index_t>(rank, rem);
  return {begin, begin + q + (rank < rem ? 1 : 0)};
}

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// The rank that owns global row `id` in sharded mode (the inverse of shard_rows).
struct Owners {
  index_t q = 1, rem = 0;
  Owners(index_t n, int ranks) : q(n / ranks), rem(n % ranks) {}
  int operator()(index_t id) const {
    const index_t big = rem * (q + 1);
    return static_cast<int>(id < big ? id / (q + 1) : rem + (id - big) / q);
  }
};

using detail::check_mpi;
using detail::Group;
using detail::mpi_count;
using detail::mpi_type;
using detail::check_same;
using detail::Fingerprint;
using detail::fingerprint;  // the EngineConfig's; the sampler's, labels' and bank's below

std::uint64_t fingerprint(const NoiseSampler& s) {
  Fingerprint f;
  f << s.kind() << s.size();
  if (const auto* alias = dynamic_cast<const AliasSampler*>(&s)) {  // its weights in place: no O(N) copy
    const auto& w = alias->weights();
    f.bytes(w.data(), w.size() * sizeof(double));
  } else if (const auto* dynamic = dynamic_cast<const DynamicSampler*>(&s)) {
    const std::vector<double>& w = dynamic->weights();
    f.bytes(w.data(), w.size() * sizeof(double));
    const DynamicSampler::Params& p = dynamic->params();
    f << static_cast<int>(p.drive) << p.alpha << p.floor;
    f.bytes(dynamic->ema().data(), dynamic->ema().size() * sizeof(double));
  } else if (const auto* cluster = dynamic_cast<const ClusterSampler*>(&s)) {  // its whole state
    const ClusterConfig& c = cluster->config();
    f << c.clusters << c.epsilon << c.beta << c.refresh_every << c.iterations << c.seed << cluster->refreshed_at();
    f.bytes(cluster->centroids().data(), static_cast<std::size_t>(cluster->centroids().size()) * sizeof(float));
    f.bytes(cluster->assignment().data(), cluster->assignment().size() * sizeof(std::int32_t));
  } else if (const auto* ring = dynamic_cast<const RingSampler*>(&s)) {
    f << ring->config().lower << ring->config().upper;
  } else if (s.kind() != SamplerKind::uniform) {
    const std::vector<double> p = s.probs();
    f.bytes(p.data(), p.size() * sizeof(double));
  }
  return f.h;
}

std::uint64_t fingerprint(std::span<const std::int64_t> labels) {
  Fingerprint f;
  f << labels.size();
  f.bytes(labels.data(), labels.size() * sizeof(std::int64_t));
  return f.h;
}

std::uint64_t fingerprint(const Bank& bank) {
  Fingerprint f;
  f << bank.size() << bank.dim() << bank.dtype();
  const BankView v = bank.view();
  for (index_t i = 0; i < v.rows; ++i) f.bytes(v.row_data(i), static_cast<std::size_t>(v.dim * dtype_bytes(v.dtype)));
  return f.h;
}

/// The global batch, as every rank holds it after the all-gather.
struct GlobalBatch {
  std::vector<index_t> offset;  ///< R + 1: rank r's queries are rows [offset[r], offset[r + 1])
  std::vector<index_t> ids;     ///< B
  RowMatrixf f;                 ///< B x D unit rows
  index_t size() const { return static_cast<index_t>(ids.size()); }
};

/// The draws of this rank's queries (global rows first, first + 1, ...): their ids and log importance
/// weights lw = log(kept mass) - log N - log P_n (per-sample: one row per query; shared: one row).
struct Draws {
  index_t first = 0, k = 0;
  bool shared = false;
  RowMatrixi ids;
  RowMatrixf lw;
  const index_t* row(index_t i) const { return ids.data() + (shared ? 0 : (i - first) * k); }
  const float* lw_row(index_t i) const { return lw.data() + (shared ? 0 : (i - first) * k); }
};

/// Adds sum_t coef[t] v_{ids[t]} (local rows of `bank`) into out (D doubles): the dispatched kernel.
void add_rows(const BankView& bank, const kernels::Table& kt, const index_t* ids, const float* coef, index_t n,
              double* out) {
  kt.gather_axpy(bank.data, bank.dtype, bank.stride, bank.dim, ids, n, coef, out);
}

/// Bytes of a step's buffers on this rank (docs/distributed.md, "Memory per rank"), for a global batch
/// of `total` queries of which `batch` are this rank's: checked against what the process can allocate
/// before the step allocates them (saturating).
std::int64_t step_bytes(index_t total, index_t batch, index_t dim, index_t k, bool full, bool sharded) {
  std::int64_t need = mul_sat(total, add_sat(mul_sat(dim, 8), 16));  // the global queries (and their copy)
  need = add_sat(need, mul_sat(batch, mul_sat(dim, 8)));              // this rank's rows of dL/df
  if (full) {
    if (sharded) need = add_sat(need, mul_sat(mul_sat(total, 2), mul_sat(add_sat(mul_sat(dim, 2), 3), 8)));
    return need;
  }
  need = add_sat(need, mul_sat(batch, mul_sat(k, 16)));  // this rank's queries' draws, weights, scores
  if (sharded) {
    need = add_sat(need, mul_sat(64, mul_sat(k, 12)));                 // a block of draws
    need = add_sat(need, mul_sat(total, mul_sat(k, 12)));              // the owned draws (at most all of them)
    need = add_sat(need, mul_sat(total, mul_sat(dim, 8)));             // the partial rows, sent and received
  }
  return need;
}

/// One rank's sums over its queries, in query order (combined across ranks in rank order).
struct Sums {
  double loss = 0.0, p_pos = 0.0, sum_exp = 0.0, collisions = 0.0, z = 0.0;
};

Sums sum_in_rank_order(const Group& g, const Sums& mine) {
  const double v[5] = {mine.loss, mine.p_pos, mine.sum_exp, mine.collisions, mine.z};
  const std::vector<double> all = g.allgather(std::span<const double>(v, 5));
  Sums s;
  for (int r = 0; r < g.ranks; ++r) {
    const double* x = all.data() + 5 * r;
    s.loss += x[0];
    s.p_pos += x[1];
    s.sum_exp += x[2];
    s.collisions += x[3];
    s.z += x[4];
  }
  return s;
}

/// ClusterSampler::refresh of a sharded bank, bit for bit the single-process refresh of the whole
/// bank of N = `n` rows (detail/kmeans.hpp): each Lloyd step assigns this rank's rows (`local`, its
/// shard), then the per-cluster sums travel rank 0 -> 1 -> ... -> R - 1, each rank adding its rows (every
/// cluster's rows in ascending row order, as one process adds them), and every rank makes the same
/// centroids from the last rank's sums; the final assignment is all-gathered (4 bytes a row). The
/// re-fitted sampler, used from step counter `step` on; the engine's stays as it was on an Error.
std::unique_ptr<ClusterSampler> refit_sharded(const Group& g, const ClusterSampler& cs, const BankView& local,
                                              index_t n, std::int64_t step) {
  constexpr int kTag = 4242;
  RowMatrixf centroids = cs.centroids();
  const index_t c = centroids.rows(), d = centroids.cols();
  std::vector<std::int32_t> mine;
  RowMatrixd sums;
  int count = 0;
  g.check([&] {
    mine.resize(static_cast<std::size_t>(local.rows));
    sums.resize(c, d);
    count = mpi_count(static_cast<std::size_t>(c * d), "the cluster sums");
  });
  for (int it = 0; it < cs.config().iterations; ++it) {
    g.check([&] { detail::kmeans_assign(local, centroids, mine.data()); });
    std::exception_ptr error;
    sums.setZero();
    const double t0 = MPI_Wtime();
    if (g.rank > 0)
      check_mpi(MPI_Recv(sums.data(), count, MPI_DOUBLE, g.rank - 1, kTag, g.comm, MPI_STATUS_IGNORE), "MPI_Recv");
    try {
      detail::kmeans_add_rows(local, mine.data(), sums);
    } catch (...) {
      error = std::current_exception();
    }
    if (g.rank + 1 < g.ranks) {
      check_mpi(MPI_Send(sums.data(), count, MPI_DOUBLE, g.rank + 1, kTag, g.comm), "MPI_Send");
      g.sent(static_cast<std::size_t>(sums.size()) * sizeof(double), t0);
    }
    g.agree(error);
    check_mpi(MPI_Bcast(sums.data(), count, MPI_DOUBLE, g.ranks - 1, g.comm), "MPI_Bcast");
    detail::kmeans_centroids(sums, centroids);
  }
  g.check([&] { detail::kmeans_assign(local, centroids, mine.data()); });
  std::vector<index_t> counts(static_cast<std::size_t>(g.ranks));
  for (int r = 0; r < g.ranks; ++r) counts[static_cast<std::size_t>(r)] = shard_rows(n, g.ranks, r).size();
  std::vector<std::int32_t> all = g.allgatherv(std::span<const std::int32_t>(mine), counts);
  std::unique_ptr<ClusterSampler> out;
  g.check([&] { out = std::make_unique<ClusterSampler>(cs.config(), std::move(centroids), std::move(all), step); });
  return out;
}

}  // namespace

/// A step's large buffers, kept across steps: their pages are touched once, not in every step (a
/// fresh multi-megabyte allocation per step cost more in page faults than the arithmetic).
struct DistributedEngine::Scratch {
  Draws draws;                        ///< this rank's queries' draws
  RowMatrixi block_ids;               ///< sharded: a block of global queries' draws
  RowMatrixf block_lw;
  std::vector<index_t> own_start;     ///< sharded: CSR of the owned draws per global query
  std::vector<index_t> own_local;     ///< their local rows
  std::vector<float> own_val;         ///< their scores, then their coefficients
  std::vector<float> pos_val;         ///< sharded: scores of the owned positives, per global query
  RowMatrixf scores;                  ///< this rank's queries' K scores, then coefficients
  std::vector<double> part;           ///< sharded: every query's partial row over the rows held
  std::vector<float> send, recv;      ///< flat exchange buffers
  std::vector<int> scount, rcount, rdispl;
};

// ---------------------------------------------------------------------------------------------
// Construction

DistributedEngine::DistributedEngine(MPI_Comm comm, Distributed mode, Bank local, index_t n_total,
                                     std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                                     std::vector<std::int64_t> labels)
    : DistributedEngine(comm, mode, std::move(local), n_total, std::move(sampler), config, std::move(labels), true) {}

DistributedEngine::DistributedEngine(MPI_Comm comm, Distributed mode, Bank local, index_t n_total,
                                     std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                                     std::vector<std::int64_t> labels, bool checked_bank)
    : mode_(mode), n_(n_total), bank_(std::move(local)), sampler_(std::move(sampler)), config_(config) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MEMBANK_CHECK(initialised, "MPI is not initialised: call MPI_Init (or import mpi4py) before making a "
                "DistributedEngine");
  MEMBANK_CHECK(comm != MPI_COMM_NULL, "comm is MPI_COMM_NULL: expected a communicator");
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &ranks_);
  const Group g{comm_, rank_, ranks_, &wire_};
  try {
    g.check([&] {
      MEMBANK_CHECK(n_ >= ranks_, "n_total = {} with {} ranks: expected at least one row per rank", n_, ranks_);
      held_ = mode_ == Distributed::replicated ? RowRange{0, n_} : shard_rows(n_, ranks_, rank_);
      MEMBANK_CHECK(bank_.size() == held_.size(), "the local bank has {} rows: expected {} ({} mode, rows [{}, {}) "
                    "of N = {})", bank_.size(), held_.size(), to_string(mode_), held_.begin, held_.end, n_);
      MEMBANK_CHECK(sampler_ != nullptr, "sampler is null: expected a NoiseSampler over the N = {} rows", n_);
      MEMBANK_CHECK(sampler_->size() == n_, "sampler has N = {}: expected the bank's N = {}", sampler_->size(), n_);
      Engine::check_sampler(*sampler_, config_);  // a biased sampler needs allow_biased_sampler
      if (const auto* cs = dynamic_cast<const ClusterSampler*>(sampler_.get()))
        MEMBANK_CHECK(cs->centroids().cols() == bank_.dim(), "the cluster sampler's centroids have D = {}: expected "
                      "the bank's D = {}", cs->centroids().cols(), bank_.dim());
      // The loss_ema drive: every rank gathers the global batch's per-query losses after each step
      // and re-weights the same rows the same way. The full softmax has no per-query sampled losses.
      const auto* dynamic = dynamic_cast<const DynamicSampler*>(sampler_.get());
      MEMBANK_CHECK(dynamic == nullptr || dynamic->params().drive == DynamicSampler::Drive::none ||
                        config_.objective != Objective::full_softmax,
                    "a dynamic sampler with the loss_ema drive needs per-query sampled losses: objective "
                    "full_softmax has none (use the drive none and set_sampler_weights)");
      config_.validate(n_, bank_.dim());
    });
    std::uint64_t fp[5] = {};
    g.check([&] {
      Fingerprint shape;
      shape << bank_.dim() << bank_.dtype() << n_ << mode_;
      fp[0] = shape.h;
      fp[1] = fingerprint(config_);
      fp[2] = fingerprint(*sampler_);
      fp[3] = fingerprint(labels);  // labels given on some ranks only are refused too
      if (mode_ == Distributed::replicated && checked_bank) fp[4] = fingerprint(bank_);
    });
    const char* const what[5] = {"bank dimension, storage type, N or mode", "EngineConfig", "sampler", "labels",
                                 "bank (replicated)"};
    check_same(g, fp, what);
    partition_.policy = config_.z_policy;
    if (config_.z_policy == ZPolicy::fixed) {
      partition_.initialised = true;
      partition_.log_z = std::log(config_.z_fixed);
    }
    if (!labels.empty()) set_labels(labels);
  } catch (...) {
    MPI_Comm_free(&comm_);
    throw;
  }
}

DistributedEngine DistributedEngine::seeded(MPI_Comm comm, Distributed mode, index_t n, index_t dim,
                                            std::uint64_t bank_seed, DType dtype,
                                            std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                                            std::vector<std::int64_t> labels) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MEMBANK_CHECK(initialised, "MPI is not initialised: call MPI_Init (or import mpi4py) before making a "
                "DistributedEngine");
  MEMBANK_CHECK(comm != MPI_COMM_NULL, "comm is MPI_COMM_NULL: expected a communicator");
  // The checks below run on a duplicate: the caller's communicator carries none of the engine's messages.
  MPI_Comm own = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(comm, &own), "MPI_Comm_dup");
  int rank = 0, ranks = 1;
  MPI_Comm_rank(own, &rank);
  MPI_Comm_size(own, &ranks);
  WireStats unused;
  const Group g{own, rank, ranks, &unused};
  std::optional<Bank> bank;
  try {
    // Banks made from one seed are the same rows on every rank: the seed and shape are compared,
    // not the rows.
    Fingerprint f;
    f << bank_seed << n << dim << dtype << mode;
    const char* const what[1] = {"bank seed, N, dimension, storage type or mode"};
    check_same(g, std::span<const std::uint64_t>(&f.h, 1), what);
    g.check([&] {
      const RowRange held = mode == Distributed::replicated ? RowRange{0, n} : shard_rows(n, ranks, rank);
      bank.emplace(held.size(), dim, bank_seed, dtype, held.begin);
    });
  } catch (...) {
    MPI_Comm_free(&own);
    throw;
  }
  MPI_Comm_free(&own);
  return DistributedEngine(comm, mode, std::move(*bank), n, std::move(sampler), config, std::move(labels), false);
}

DistributedEngine::~DistributedEngine() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

DistributedEngine::DistributedEngine(DistributedEngine&& o) noexcept
    : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), mode_(o.mode_), rank_(o.rank_), ranks_(o.ranks_), n_(o.n_),
      held_(o.held_), bank_(std::move(o.bank_)), sampler_(std::move(o.sampler_)), config_(o.config_),
      partition_(o.partition_), step_(o.step_), labels_(std::move(o.labels_)), classes_(std::move(o.classes_)),
      class_mass_(std::move(o.class_mass_)), wire_(o.wire_), scratch_(std::move(o.scratch_)) {}

DistributedEngine& DistributedEngine::operator=(DistributedEngine&& o) noexcept {
  if (this == &o) return *this;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
  comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
  mode_ = o.mode_;
  rank_ = o.rank_;
  ranks_ = o.ranks_;
  n_ = o.n_;
  held_ = o.held_;
  bank_ = std::move(o.bank_);
  sampler_ = std::move(o.sampler_);
  config_ = o.config_;
  partition_ = o.partition_;
  step_ = o.step_;
  labels_ = std::move(o.labels_);
  classes_ = std::move(o.classes_);
  class_mass_ = std::move(o.class_mass_);
  wire_ = o.wire_;
  scratch_ = std::move(o.scratch_);
  return *this;
}

void DistributedEngine::set_labels(std::span<const std::int64_t> labels) {
  const Group g{comm_, rank_, ranks_, &wire_};
  detail::LabelClasses lc;
  std::uint64_t fp = 0;
  g.check([&] {
    fp = fingerprint(labels);
    lc = detail::label_classes(labels, *sampler_, config_);
  });
  const char* const what[1] = {"labels"};
  check_same(g, std::span<const std::uint64_t>(&fp, 1), what);
  labels_.assign(labels.begin(), labels.end());
  classes_ = std::move(lc.classes);
  class_mass_ = std::move(lc.mass);
}

void DistributedEngine::set_sampler_weights(std::span<const index_t> ids, std::span<const double> weights) {
  const Group g{comm_, rank_, ranks_, &wire_};
  // A hash of the update itself (O(ids) to compute, 8 bytes a rank to compare): ranks that agree on
  // the weights before and on every update agree after it, without hashing all N weights.
  std::uint64_t fp = 0;
  g.check([&] {
    MEMBANK_CHECK(sampler_->kind() == SamplerKind::dynamic,
                  "set_sampler_weights: the engine's sampler is {}: expected a dynamic sampler",
                  to_string(sampler_->kind()));
    Fingerprint f;
    f << ids.size() << weights.size();
    f.bytes(ids.data(), ids.size() * sizeof(index_t));
    f.bytes(weights.data(), weights.size() * sizeof(double));
    fp = f.h;
  });
  const char* const what[1] = {"sampler weight update (ids, weights)"};
  check_same(g, std::span<const std::uint64_t>(&fp, 1), what);
  auto& s = static_cast<DynamicSampler&>(*sampler_);
  // The same update on every rank: it fails on all of them or on none (nothing changed on failure).
  g.check([&] {
    std::vector<double> old(ids.size());
    for (std::size_t k = 0; k < ids.size(); ++k)
      if (ids[k] >= 0 && ids[k] < s.size()) old[k] = s.weights()[static_cast<std::size_t>(ids[k])];
    s.set_weights(ids, weights);
    if (labels_.empty() || !config_.exclude_same_label) return;
    try {
      class_mass_ = detail::label_classes(labels_, *sampler_, config_).mass;
    } catch (...) {
      const std::vector<index_t> back(ids.rbegin(), ids.rend());
      const std::vector<double> values(old.rbegin(), old.rend());
      s.set_weights(back, values);
      throw;
    }
  });
}

void DistributedEngine::refresh_sampler() {
  const Group g{comm_, rank_, ranks_, &wire_};
  g.check([&] {
    MEMBANK_CHECK(sampler_->kind() == SamplerKind::cluster, "refresh_sampler: the engine's {} sampler has no "
                  "clusters to refresh: expected a cluster sampler", to_string(sampler_->kind()));
  });
  refit_clusters(g);
}

void DistributedEngine::refit_clusters(const detail::Group& g) {
  auto* cs = dynamic_cast<ClusterSampler*>(sampler_.get());
  if (mode_ == Distributed::replicated) {
    // Every rank holds the whole bank and re-fits it the same way: the states stay identical
    // without a message.
    g.check([&] { cs->refresh(bank_.view(), step_); });
    return;
  }
  sampler_ = refit_sharded(g, *cs, bank_.view(), n_, step_);
}

void DistributedEngine::restore_state(const Partition& partition, std::int64_t step) {
  const Group g{comm_, rank_, ranks_, &wire_};
  g.check([&] { detail::check_restored_state(config_, partition_, partition, step); });
  Fingerprint f;
  f << partition.initialised << partition.log_z << step;
  const char* const what[1] = {"restored state (partition, step)"};
  check_same(g, std::span<const std::uint64_t>(&f.h, 1), what);
  partition_ = partition;
  step_ = step;
}

RowMatrixf DistributedEngine::gather_bank(int root) const {
  MEMBANK_CHECK(root >= 0 && root < ranks_, "root = {}: expected a rank 0 <= root < {}", root, ranks_);
  const index_t dim = bank_.dim();
  RowMatrixf mine(bank_.size(), dim);
  bank_.view().widen_rows(0, bank_.size(), mine.data(), dim);
  if (mode_ == Distributed::replicated) return rank_ == root ? mine : RowMatrixf();
  std::vector<int> cnt(static_cast<std::size_t>(ranks_)), displ(static_cast<std::size_t>(ranks_));
  for (int r = 0; r < ranks_; ++r) {
    const RowRange rr = shard_rows(n_, ranks_, r);
    cnt[static_cast<std::size_t>(r)] = mpi_count(static_cast<std::size_t>(rr.size() * dim), "gather_bank");
    displ[static_cast<std::size_t>(r)] = mpi_count(static_cast<std::size_t>(rr.begin * dim), "gather_bank");
  }
  RowMatrixf all = rank_ == root ? RowMatrixf(n_, dim) : RowMatrixf();
  check_mpi(MPI_Gatherv(mine.data(), cnt[static_cast<std::size_t>(rank_)], MPI_FLOAT, all.data(), cnt.data(),
                        displ.data(), MPI_FLOAT, root, comm_),
            "MPI_Gatherv");
  return all;
}

std::vector<std::int64_t> DistributedEngine::gather_last_update(int root) const {
  MEMBANK_CHECK(root >= 0 && root < ranks_, "root = {}: expected a rank 0 <= root < {}", root, ranks_);
  const std::vector<std::int64_t>& mine = bank_.last_update();
  if (mode_ == Distributed::replicated) return rank_ == root ? mine : std::vector<std::int64_t>();
  std::vector<int> cnt(static_cast<std::size_t>(ranks_)), displ(static_cast<std::size_t>(ranks_));
  for (int r = 0; r < ranks_; ++r) {
    const RowRange rr = shard_rows(n_, ranks_, r);
    cnt[static_cast<std::size_t>(r)] = mpi_count(static_cast<std::size_t>(rr.size()), "gather_last_update");
    displ[static_cast<std::size_t>(r)] = mpi_count(static_cast<std::size_t>(rr.begin), "gather_last_update");
  }
  std::vector<std::int64_t> all(rank_ == root ? static_cast<std::size_t>(n_) : 0);
  check_mpi(MPI_Gatherv(mine.data(), cnt[static_cast<std::size_t>(rank_)], MPI_INT64_T, all.data(), cnt.data(),
                        displ.data(), MPI_INT64_T, root, comm_),
            "MPI_Gatherv");
  return all;
}

void DistributedEngine::knn_search(FeaturesRef queries, index_t k, std::span<float> scores, std::span<index_t> ids,
                                   const CancelHook& cancel) {
  WireStats wire;  // not a step's traffic: last_wire() stays the last step's
  const detail::Group g{comm_, rank_, ranks_, &wire};
  const index_t dim = bank_.dim(), q = queries.rows();
  std::vector<std::uint64_t> mine;
  g.check([&] {
    MEMBANK_CHECK(queries.cols() == dim, "queries has shape {} x {}: expected Q_r x {} (Q_r >= 0)", q, queries.cols(),
                  dim);
    if (q > 0) check_features(queries, q, dim, "queries");
    MEMBANK_CHECK(k >= 1 && k <= n_, "k = {}: expected 1 <= k <= N = {}", k, n_);
    detail::check_search_outputs(bank_.view(), queries, q, k, scores, ids, "Q_r");
    mine = {static_cast<std::uint64_t>(k), static_cast<std::uint64_t>(q)};
  });
  const std::vector<std::uint64_t> all = g.allgather(std::span<const std::uint64_t>(mine));
  g.check([&] {
    for (int r = 1; r < ranks_; ++r)
      MEMBANK_CHECK(all[2 * static_cast<std::size_t>(r)] == all[0], "k = {} on rank {}: expected the same k on every "
                    "rank (rank 0 passed {})", all[2 * static_cast<std::size_t>(r)], r, all[0]);
  });
  // A cancelled rank stops every rank: each finishes (or stops) its own search, then they agree.
  const auto searched = [&](auto&& search) {
    int stopped = ranks_, first = ranks_;
    g.check([&] {
      try {
        search();
      } catch (const Cancelled&) {
        stopped = rank_;
      }
    });
    check_mpi(MPI_Allreduce(&stopped, &first, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    if (first < ranks_)
      throw Cancelled(fmt::format("membank: the kNN search was cancelled by the hook of rank {} of {}; nothing was "
                                  "written on any rank", first, ranks_));
  };
  if (mode_ == Distributed::replicated) {  // staged: written once every rank has finished
    std::vector<float> s_mine;
    std::vector<index_t> i_mine;
    searched([&] {
      s_mine.resize(static_cast<std::size_t>(q * k));
      i_mine.resize(s_mine.size());
      if (q > 0) membank::knn_search(bank_.view(), queries, k, s_mine, i_mine, cancel);
    });
    std::copy(s_mine.begin(), s_mine.end(), scores.begin());
    std::copy(i_mine.begin(), i_mine.end(), ids.begin());
    return;
  }
  // Sharded: every rank searches its shard for every rank's queries (all-gathered in rank order),
  // sends each query's best back to the rank that asked, and that rank merges the R lists.
  std::vector<index_t> counts(static_cast<std::size_t>(ranks_)), first(static_cast<std::size_t>(ranks_) + 1, 0);
  for (int r = 0; r < ranks_; ++r) {
    counts[static_cast<std::size_t>(r)] = static_cast<index_t>(all[2 * static_cast<std::size_t>(r) + 1]) * dim;
    first[static_cast<std::size_t>(r) + 1] =
        first[static_cast<std::size_t>(r)] + static_cast<index_t>(all[2 * static_cast<std::size_t>(r) + 1]);
  }
  const index_t total = first.back();
  RowMatrixf mine_q;
  g.check([&] { mine_q = queries; });
  const std::vector<float> flat =
      g.allgatherv(std::span<const float>(mine_q.data(), static_cast<std::size_t>(q * dim)), counts);
  const index_t kr = std::min(k, held_.size());  // this shard's candidates per query
  std::vector<float> s_local;
  std::vector<index_t> i_local;
  searched([&] {
    s_local.resize(static_cast<std::size_t>(total * kr));
    i_local.resize(s_local.size());
    if (total == 0) return;
    const Eigen::Map<const RowMatrixf> gq(flat.data(), total, dim);
    membank::knn_search(bank_.view(), gq, kr, s_local, i_local, cancel);
    for (index_t& id : i_local) id += held_.begin;
  });
  std::vector<int> scount(static_cast<std::size_t>(ranks_)), rcount, rdispl;
  g.check([&] {
    for (int r = 0; r < ranks_; ++r)
      scount[static_cast<std::size_t>(r)] = mpi_count(
          static_cast<std::size_t>((first[static_cast<std::size_t>(r) + 1] - first[static_cast<std::size_t>(r)]) * kr),
          "the kNN merge");
  });
  std::vector<float> s_in;
  std::vector<index_t> i_in;
  g.exchange(s_local, scount, s_in, rcount, rdispl);
  g.exchange(i_local, scount, i_in, rcount, rdispl);
  // Rank r's list for query i: kr_r entries at rdispl[r] + i kr_r, best first (ties: the smaller global
  // id, as the shard's own order). The merge keeps that order across shards.
  std::vector<float> s_out;
  std::vector<index_t> i_out;
  g.check([&] {  // staged: the caller's buffers are written only after every rank has merged
    s_out.resize(static_cast<std::size_t>(q * k));
    i_out.resize(s_out.size());
    std::vector<std::pair<float, index_t>> cand;
    for (index_t i = 0; i < q; ++i) {
      cand.clear();
      for (int r = 0; r < ranks_; ++r) {
        const index_t kr_r = std::min(k, shard_rows(n_, ranks_, r).size());
        const auto at = static_cast<std::size_t>(rdispl[static_cast<std::size_t>(r)] + i * kr_r);
        for (index_t j = 0; j < kr_r; ++j)
          cand.emplace_back(s_in[at + static_cast<std::size_t>(j)], i_in[at + static_cast<std::size_t>(j)]);
      }
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (index_t j = 0; j < k; ++j) {
        s_out[static_cast<std::size_t>(i * k + j)] = cand[static_cast<std::size_t>(j)].first;
        i_out[static_cast<std::size_t>(i * k + j)] = cand[static_cast<std::size_t>(j)].second;
      }
    }
  });
  std::copy(s_out.begin(), s_out.end(), scores.begin());
  std::copy(i_out.begin(), i_out.end(), ids.begin());
}

// ---------------------------------------------------------------------------------------------
// The step

StepStats DistributedEngine::step(FeaturesRef features, IdsRef ids, GradRef grad, bool update) {
  return run(features, ids, nullptr, grad, update);
}

StepStats DistributedEngine::step_with_negatives(FeaturesRef features, IdsRef ids, NegativesRef negatives,
                                                 GradRef grad, bool update) {
  return run(features, ids, &negatives, grad, update);
}

StepStats DistributedEngine::run(FeaturesRef features, IdsRef ids, const NegativesRef* negatives, GradRef grad,
                                 bool update) {
  wire_ = {};
  const Group g{comm_, rank_, ranks_, &wire_};
  const index_t dim = bank_.dim();
  const bool full = config_.objective == Objective::full_softmax;
  const bool shared = config_.negatives == NegativesMode::shared && !full;
  const bool sharded = mode_ == Distributed::sharded;
  const auto batch = static_cast<index_t>(ids.size());
  const double log_n = std::log(static_cast<double>(n_));

  // ---- 1. this rank's slice: the single-process checks, then every rank agrees
  detail::PreparedFeatures prepared;
  RowMatrixi neg_local;
  g.check([&] {
    MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a slice of at least one id (B_r >= 1)");
    MEMBANK_CHECK(grad.rows() == batch && grad.cols() == dim, "grad has shape {} x {}: expected {} x {} (B_r x D)",
                  grad.rows(), grad.cols(), batch, dim);
    detail::check_grad_alone(grad, features, ids, negatives, bank_);
    check_ids(ids, n_, "ids");
    prepared = detail::prepare_features(features, batch, dim, config_);
    MEMBANK_CHECK(!needs_labels(config_.objective) || !labels_.empty(),
                  "objective {} needs labels: give the engine one label per instance (labels=, set_labels)",
                  to_string(config_.objective));
    MEMBANK_CHECK(!config_.exclude_same_label || !labels_.empty(),
                  "exclude_same_label needs labels: give the engine one label per instance (labels=, set_labels)");
    if (full) return;
    std::vector<float> log_py(ids.size());
    sampler_->lookup(ids, log_py);
    for (std::size_t b = 0; b < ids.size(); ++b)
      MEMBANK_CHECK(std::isfinite(log_py[b]), "ids[{}] = {} has P_n = 0 under the {} sampler: expected positives "
                    "with a non-zero noise weight", b, ids[b], to_string(sampler_->kind()));
    if (!negatives) return;
    // The batch-level check of shared negatives (no id of the global batch) runs after the all-gather.
    detail::check_negatives(*negatives, ids, {}, n_, config_, classes_, labels_, *sampler_);
    neg_local = *negatives;
  });

  // ---- 2. the global batch
  GlobalBatch gb;
  const index_t k_mine = negatives && !full ? negatives->cols() : config_.k;
  RowMatrixd gsum;  // this rank's rows of dL/df, in double until the end
  {
    // Every rank's slice size, K, and whether it passed negatives and asked for the refresh: the
    // call must be the same collective on every rank.
    const std::int64_t meta[3] = {batch, k_mine, (update ? 1 : 0) | (negatives ? 2 : 0)};
    const std::vector<std::int64_t> all = g.allgather(std::span<const std::int64_t>(meta, 3));
    std::vector<index_t> counts(static_cast<std::size_t>(ranks_)), feature_counts(counts.size());
    RowMatrixf packed;
    g.check([&] {
      const auto at = [&](int r, int field) { return all[static_cast<std::size_t>(3 * r + field)]; };
      for (int r = 1; r < ranks_; ++r) {
        MEMBANK_CHECK(at(r, 2) == at(0, 2), "rank {} called {} with update = {}, rank 0 {} with update = {}: expected "
                      "the same call on every rank", r, at(r, 2) & 2 ? "step_with_negatives" : "step", (at(r, 2) & 1) == 1,
                      at(0, 2) & 2 ? "step_with_negatives" : "step", (at(0, 2) & 1) == 1);
        MEMBANK_CHECK(at(r, 1) == at(0, 1), "rank {} passed negatives with K = {}, rank 0 K = {}: expected the same K "
                      "on every rank", r, at(r, 1), at(0, 1));
      }
      gb.offset.assign(static_cast<std::size_t>(ranks_) + 1, 0);
      for (int r = 0; r < ranks_; ++r) {
        counts[static_cast<std::size_t>(r)] = at(r, 0);
        feature_counts[static_cast<std::size_t>(r)] = at(r, 0) * dim;
        gb.offset[static_cast<std::size_t>(r) + 1] = gb.offset[static_cast<std::size_t>(r)] + at(r, 0);
      }
      require_memory(step_bytes(gb.offset.back(), batch, dim, k_mine, full, sharded), fmt::format(
          "a distributed step of B = {} queries (this rank {}), K = {}, D = {}", gb.offset.back(), batch, k_mine, dim));
      packed = prepared.view();  // contiguous unit rows
      gb.f.resize(gb.offset.back(), dim);
      gsum = RowMatrixd::Zero(batch, dim);
    });
    gb.ids = g.allgatherv(ids, counts);
    const std::vector<float> fv = g.allgatherv(std::span<const float>(packed.data(), static_cast<std::size_t>(packed.size())),
                                               feature_counts);
    std::copy(fv.begin(), fv.end(), gb.f.data());
  }
  const index_t total = gb.size();
  const index_t first = gb.offset[static_cast<std::size_t>(rank_)];
  const index_t k = k_mine;

  // A cluster sampler due a refresh re-fits first, as Engine::run does (whatever the objective).
  // Then every rank conditions a query-dependent sampler on the whole global batch -- the
  // single-process engine's conditioning of the same unit features, so query i's q(. | f_i) is the
  // same bit for bit -- and uses the rows of its own queries (row `total`: the batch mean, for
  // shared negatives).
  if (auto* cs = dynamic_cast<ClusterSampler*>(sampler_.get()); cs && cs->due(step_)) refit_clusters(g);
  std::unique_ptr<Conditioned> conditioned;
  std::vector<double> query_class_mass;
  if (sampler_->query_dependent() && !full) {
    std::vector<std::int32_t> query_classes;  // (exclude_same_label: every global query's)
    g.check([&] { query_classes = detail::query_classes_of(config_, gb.ids, classes_.data()); });
    const auto* ring = dynamic_cast<const RingSampler*>(sampler_.get());
    if (ring && sharded) {
      // Every rank ranks its shard for every query and keeps its first `upper` as sort keys; the
      // union of all ranks' holds each query's global ranks up to upper (8 bytes a key).
      std::vector<std::uint64_t> mine;
      g.check([&] {
        mine = ring->candidates(bank_.view(), held_.begin, gb.f.data(), dim, total, dim,
                                query_classes.empty() ? nullptr : classes_.data(), query_classes);
      }, &wire_.seconds_draws);
      std::vector<index_t> per_shard(static_cast<std::size_t>(ranks_)), counts(per_shard.size());
      for (int r = 0; r < ranks_; ++r) {
        per_shard[static_cast<std::size_t>(r)] = ring->shard_candidates(shard_rows(n_, ranks_, r).size());
        counts[static_cast<std::size_t>(r)] = per_shard[static_cast<std::size_t>(r)] * total;
      }
      const std::vector<std::uint64_t> all = g.allgatherv(std::span<const std::uint64_t>(mine), counts);
      g.check([&] { conditioned = ring->from_candidates(all, per_shard, total); }, &wire_.seconds_draws);
    }
    g.check([&] {
      if (!conditioned)
        conditioned =
            detail::condition_batch(*sampler_, bank_.view(), gb.f.data(), dim, total, classes_.data(), query_classes);
      if (query_classes.empty() || shared) return;
      query_class_mass.resize(query_classes.size());
      sampler_->class_mass_given(*conditioned, classes_.data(), static_cast<index_t>(class_mass_.size()), query_classes,
                                 query_class_mass);
    }, &wire_.seconds_draws);
  }
  // Global query i's distribution (row `total`: the batch mean), or P_n.
  const auto query_ref = [&](index_t i) { return conditioned ? QueryRef{conditioned.get(), i} : QueryRef{}; };
  const bool biased = sampler_->biased();  // its draws and positives weigh as uniform ones (lw = 0)

  Sums mine;
  Partition next;  // the Z state after the step (initialised = false: no change)
  // A loss-driven dynamic sampler: this rank's queries' losses, gathered in global order after the step.
  auto* const driven = dynamic_cast<DynamicSampler*>(sampler_.get());
  const bool drive = driven != nullptr && driven->params().drive == DynamicSampler::Drive::loss_ema && !full;
  std::vector<double> my_losses;
  const kernels::Table& kt = kernels::table();
  const BankView view = bank_.view();
  double log_z_used = kNaN;
  // log Zhat of the global batch's draws from each rank's log-sum-exp over its queries (rank order).
  const auto global_log_z = [&](const detail::Lse& lse) {
    const double pair[2] = {lse.max, lse.sum};
    const std::vector<double> all = g.allgather(std::span<const double>(pair, 2));
    detail::Lse merged;
    for (int r = 0; r < ranks_; ++r)
      merged.merge({all[static_cast<std::size_t>(2 * r)], all[static_cast<std::size_t>(2 * r + 1)]});
    return detail::log_z_hat(merged.value(), static_cast<double>(total) * static_cast<double>(k), n_);
  };

  if (full) {
    // ---- full softmax: no draws. Replicated: the exact loss of this rank's queries over the whole
    // bank. Sharded: every rank's online (max, sum, acc) for every query over its shard, merged at
    // the query's rank in rank order.
    const double coef = 1.0 / (static_cast<double>(total) * config_.tau);
    std::vector<float> vy(static_cast<std::size_t>(dim));
    if (!sharded) {
      g.check([&] {
        const RowMatrixf f = prepared.view();
        const detail::SoftmaxPartial p = detail::softmax_partial(view, f, config_.tau);
        for (index_t b = 0; b < batch; ++b) {
          const index_t y = ids[static_cast<std::size_t>(b)];
          view.widen_rows(y, 1, vy.data(), dim);
          const double s_y = kt.dot(vy.data(), DType::float32, f.row(b).data(), dim) * (1.0 / config_.tau);
          const double log_z = p.max[b] + std::log(p.sum[b]);
          mine.loss += log_z - s_y;
          mine.z += std::exp(log_z);
          mine.p_pos += std::exp(s_y - log_z);
          for (index_t c = 0; c < dim; ++c) gsum(b, c) = coef * (p.acc(b, c) / p.sum[b] - vy[static_cast<std::size_t>(c)]);
        }
      }, &wire_.seconds_scores);
    } else {
      const index_t width = 2 * dim + 3;  // max, sum, s_y (NaN unless owned), acc (D), v_y (D, 0 unless owned)
      // Every query's triple, in query order: the part for rank h is its queries' rows.
      std::vector<double> send, recv;
      std::vector<int> scount(static_cast<std::size_t>(ranks_)), rcount, rdispl;
      g.check([&] {
        const detail::SoftmaxPartial p = detail::softmax_partial(view, gb.f, config_.tau);
        send.assign(static_cast<std::size_t>(total * width), 0.0);
        for (int h = 0; h < ranks_; ++h) {
          const index_t q0 = gb.offset[static_cast<std::size_t>(h)], q1 = gb.offset[static_cast<std::size_t>(h) + 1];
          scount[static_cast<std::size_t>(h)] = mpi_count(static_cast<std::size_t>((q1 - q0) * width), "softmax partials");
          for (index_t i = q0; i < q1; ++i) {
            double* row = send.data() + i * width;
            row[0] = p.max[i];
            row[1] = p.sum[i];
            row[2] = kNaN;
            for (index_t c = 0; c < dim; ++c) row[3 + c] = p.acc(i, c);
            const index_t y = gb.ids[static_cast<std::size_t>(i)];
            if (held_.contains(y)) {
              view.widen_rows(y - held_.begin, 1, vy.data(), dim);
              row[2] = kt.dot(vy.data(), DType::float32, gb.f.row(i).data(), dim);
              for (index_t c = 0; c < dim; ++c) row[3 + dim + c] = vy[static_cast<std::size_t>(c)];
            }
          }
        }
      }, &wire_.seconds_scores);
      g.exchange(send, scount, recv, rcount, rdispl);
      std::vector<double> acc(static_cast<std::size_t>(dim)), v(static_cast<std::size_t>(dim));
      for (index_t b = 0; b < batch; ++b) {
        const auto row_of = [&](int r) { return recv.data() + rdispl[static_cast<std::size_t>(r)] + b * width; };
        double m = -std::numeric_limits<double>::infinity(), l = 0.0, s_y = kNaN;
        for (int r = 0; r < ranks_; ++r) m = std::max(m, row_of(r)[0]);
        std::fill(acc.begin(), acc.end(), 0.0);
        std::fill(v.begin(), v.end(), 0.0);
        for (int r = 0; r < ranks_; ++r) {
          const double* row = row_of(r);
          const double w = std::exp(row[0] - m);
          l += row[1] * w;
          if (!std::isnan(row[2])) s_y = row[2] * (1.0 / config_.tau);
          for (index_t c = 0; c < dim; ++c) {
            acc[static_cast<std::size_t>(c)] += row[3 + c] * w;
            v[static_cast<std::size_t>(c)] += row[3 + dim + c];
          }
        }
        const double log_z = m + std::log(l);
        mine.loss += log_z - s_y;
        mine.z += std::exp(log_z);
        mine.p_pos += std::exp(s_y - log_z);
        for (index_t c = 0; c < dim; ++c)
          gsum(b, c) = coef * (acc[static_cast<std::size_t>(c)] / l - static_cast<float>(v[static_cast<std::size_t>(c)]));
      }
    }
  } else if (!sharded && !shared) {
    // ---- replicated, per-sample negatives: the single-process engine's fused kernel (one pass over the
    // rows) over this rank's queries, their draws keyed by their global rows, 1 / B of the global batch.
    const bool nce = config_.objective == Objective::nce;
    detail::KernelContext cx{view, sampler_.get(), &config_, classes_.empty() ? nullptr : classes_.data(),
                             classes_.empty() ? kernels::ClassTable{} : kernels::ClassTable{classes_.data(), 4},
                             class_mass_.empty() ? nullptr : class_mass_.data(), k};
    cx.conditioned = conditioned.get();  // (the global batch's: this rank's queries from row `first`)
    cx.query_class_mass = query_class_mass.empty() ? nullptr : query_class_mass.data();
    cx.query_row0 = first;
    RowMatrixf gk(batch, dim);
    const detail::StepInput in{gb.f.row(first).data(), dim,  std::span<const index_t>(gb.ids).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(batch)),
                               negatives ? &neg_local : nullptr, step_, gk.data(), dim, first, total};
    double log_z = nce && partition_.initialised ? partition_.log_z : kNaN;
    if (nce && std::isnan(log_z)) {
      detail::Lse lse;
      g.check([&] { lse = detail::lse_per_sample(cx, in, batch, kt); }, &wire_.seconds_scores);
      log_z = global_log_z(lse);
    }
    log_z_used = log_z;
    std::vector<kernels::QueryResult> results(static_cast<std::size_t>(batch));
    g.check([&] { detail::per_sample_kernel(cx, in, batch, detail::objective_params(config_, k, n_, log_z), results, kt); },
            &wire_.seconds_objective);
    for (const auto& r : results) {  // in query order
      mine.loss += r.loss;
      mine.p_pos += r.p_pos;
      mine.sum_exp += r.sum_exp;
      mine.collisions += static_cast<double>(r.collisions);
      if (drive) my_losses.push_back(r.loss);
    }
    gsum = gk.cast<double>();
  } else {
    // ---- 3. draws
    detail::KernelContext cx{view, sampler_.get(), &config_, classes_.empty() ? nullptr : classes_.data(), {},
                             class_mass_.empty() ? nullptr : class_mass_.data(), k};
    cx.query_class_mass = query_class_mass.empty() ? nullptr : query_class_mass.data();  // (global rows)
    if (!scratch_) scratch_ = std::make_unique<Scratch>();
    Scratch& sc = *scratch_;
    Draws& dr = sc.draws;  // this rank's queries' draws (shared: the batch's one row)
    dr.k = k;
    dr.shared = shared;
    dr.first = first;
    // Caller negatives: sharded ranks need every query's (per-sample: all-gathered); shared must agree.
    RowMatrixi neg_all;
    if (negatives) {
      if (shared) {
        const std::vector<index_t> all = g.allgather(std::span<const index_t>(neg_local.data(), static_cast<std::size_t>(k)));
        g.check([&] {
          for (int r = 1; r < ranks_; ++r)
            MEMBANK_CHECK(std::equal(all.begin() + r * k, all.begin() + (r + 1) * k, all.begin()), "rank {}'s shared "
                          "negatives differ from rank 0's: expected the same 1 x K row on every rank", r);
        });
      } else if (sharded) {
        std::vector<index_t> counts(static_cast<std::size_t>(ranks_));
        for (int r = 0; r < ranks_; ++r)
          counts[static_cast<std::size_t>(r)] = (gb.offset[static_cast<std::size_t>(r) + 1] - gb.offset[static_cast<std::size_t>(r)]) * k;
        const std::vector<index_t> all =
            g.allgatherv(std::span<const index_t>(neg_local.data(), static_cast<std::size_t>(neg_local.size())), counts);
        g.check([&] { neg_all = Eigen::Map<const RowMatrixi>(all.data(), total, k); });
      }
    }
    // Global query i's K draws into out and their lw into lw (log_pn: K floats of scratch): the
    // engine's own (keyed by the global row i), or the caller's.
    const auto draw_query = [&](index_t i, index_t* out, float* lw, std::vector<float>& log_pn) {
      const index_t y = gb.ids[static_cast<std::size_t>(i)];
      const detail::QueryExclusion e = detail::exclusion_of(cx, y, query_ref(i));
      const std::span<index_t> ids_out(out, static_cast<std::size_t>(k));
      if (negatives) {
        const index_t* src = sharded ? neg_all.row(i).data() : neg_local.row(i - first).data();
        std::copy_n(src, k, out);
        sampler_->lookup_for(query_ref(i), ids_out, log_pn);
      } else {
        DrawCursor cursor{{config_.seed, step_, static_cast<std::uint32_t>(i), detail::purpose_negatives}, e.exclusion, k};
        cursor.query = query_ref(i);
        sampler_->draw_next(cursor, ids_out, log_pn);
      }
      for (index_t j = 0; j < k; ++j)
        lw[j] = biased ? 0.0f : static_cast<float>(e.log_kept - log_n - log_pn[static_cast<std::size_t>(j)]);
    };
    // Sharded: the draws this rank owns, per global query, as CSR lists (local ids; values: their
    // scores, later their coefficients). Built from blocks of queries drawn at a time, so that only
    // the block's draws and the owned ones are held (O(B K / R) besides this rank's own queries').
    std::vector<index_t>& own_start = sc.own_start;
    std::vector<index_t>& own_local = sc.own_local;
    std::vector<float>& own_val = sc.own_val;
    g.check([&] {
      const index_t rows = shared ? 1 : batch;
      dr.ids.resize(rows, k);
      dr.lw.resize(rows, k);
      if (shared)
        detail::shared_draws(*sampler_, config_, gb.ids, step_, negatives ? neg_local.data() : nullptr,
                             std::span<index_t>(dr.ids.data(), static_cast<std::size_t>(k)),
                             std::span<float>(dr.lw.data(), static_cast<std::size_t>(k)), query_ref(total));
      if (!sharded) {
        if (shared) return;
        detail::ExceptionCapture errors;
#pragma omp parallel
        {
          std::vector<float> log_pn;
          errors.run([&] { log_pn.resize(static_cast<std::size_t>(k)); });
#pragma omp for schedule(static)
          for (index_t b = 0; b < batch; ++b)
            errors.run([&] { draw_query(first + b, dr.ids.row(b).data(), dr.lw.row(b).data(), log_pn); });
        }
        errors.rethrow("the distributed step's draws");
        return;
      }
      constexpr index_t kDrawBlock = 64;  // queries drawn at a time
      own_start.assign(static_cast<std::size_t>(total) + 1, 0);
      RowMatrixi& block_ids = sc.block_ids;
      RowMatrixf& block_lw = sc.block_lw;
      block_ids.resize(shared ? 0 : std::min(kDrawBlock, total), k);
      block_lw.resize(block_ids.rows(), k);
      for (index_t q0 = 0; q0 < total; q0 += kDrawBlock) {
        const index_t q1 = std::min(total, q0 + kDrawBlock);
        if (!shared) {
          detail::ExceptionCapture errors;
#pragma omp parallel
          {
            std::vector<float> log_pn;
            errors.run([&] { log_pn.resize(static_cast<std::size_t>(k)); });
#pragma omp for schedule(static)
            for (index_t i = q0; i < q1; ++i)
              errors.run([&] { draw_query(i, block_ids.row(i - q0).data(), block_lw.row(i - q0).data(), log_pn); });
          }
          errors.rethrow("the distributed step's draws");
        }
        const auto draws_of = [&](index_t i) { return shared ? dr.ids.data() : block_ids.row(i - q0).data(); };
        // Count the owned draws of each query, then list them (both in parallel over the queries).
#pragma omp parallel for schedule(static)
        for (index_t i = q0; i < q1; ++i) {
          const index_t* d = draws_of(i);
          index_t c = 0;
          for (index_t j = 0; j < k; ++j) c += held_.contains(d[j]) ? 1 : 0;
          own_start[static_cast<std::size_t>(i) + 1] = c;
        }
        for (index_t i = q0; i < q1; ++i)
          own_start[static_cast<std::size_t>(i) + 1] += own_start[static_cast<std::size_t>(i)];
        own_local.resize(static_cast<std::size_t>(own_start[static_cast<std::size_t>(q1)]));
#pragma omp parallel for schedule(static)
        for (index_t i = q0; i < q1; ++i) {
          const index_t* d = draws_of(i);
          if (!shared && i >= first && i < first + batch) {  // one of this rank's queries: keep its draws
            std::copy_n(d, k, dr.ids.row(i - first).data());
            std::copy_n(block_lw.row(i - q0).data(), k, dr.lw.row(i - first).data());
          }
          index_t t = own_start[static_cast<std::size_t>(i)];
          for (index_t j = 0; j < k; ++j)
            if (held_.contains(d[j])) own_local[static_cast<std::size_t>(t++)] = d[j] - held_.begin;
        }
      }
      own_val.resize(own_local.size());
    }, &wire_.seconds_draws);

    // ---- 4, 5. this rank's queries' scores (B_r x K) and positive scores
    RowMatrixf& scores = sc.scores;
    std::vector<double> s_pos;
    g.check([&] {
      scores.resize(batch, k);
      s_pos.resize(static_cast<std::size_t>(batch));
    });
    const Owners owner(n_, ranks_);
    if (!sharded) {
      g.check([&] {
        detail::ExceptionCapture errors;
#pragma omp parallel for schedule(dynamic, 8)
        for (index_t b = 0; b < batch; ++b) {
          errors.run([&] {
            const index_t i = first + b;
            const float* f = gb.f.row(i).data();
            kt.gather_dots(view.data, view.dtype, view.stride, dim, dr.row(i), k, f, scores.row(b).data());
            s_pos[static_cast<std::size_t>(b)] =
                kt.dot(view.row_data(gb.ids[static_cast<std::size_t>(i)]), view.dtype, f, dim);
          });
        }
        errors.rethrow("the distributed step's scores");
      }, &wire_.seconds_scores);
    } else {
      g.check([&] {
        detail::ExceptionCapture errors;
#pragma omp parallel for schedule(dynamic, 8)
        for (index_t i = 0; i < total; ++i) {
          errors.run([&] {
            const index_t t0 = own_start[static_cast<std::size_t>(i)], t1 = own_start[static_cast<std::size_t>(i) + 1];
            kt.gather_dots(view.data, view.dtype, view.stride, dim, own_local.data() + t0, t1 - t0, gb.f.row(i).data(),
                           own_val.data() + t0);
          });
        }
        errors.rethrow("the distributed step's scores");
        sc.pos_val.resize(static_cast<std::size_t>(total));
#pragma omp parallel for schedule(static)
        for (index_t i = 0; i < total; ++i) {
          const index_t y = gb.ids[static_cast<std::size_t>(i)];
          if (held_.contains(y))
            sc.pos_val[static_cast<std::size_t>(i)] = kt.dot(view.row_data(y - held_.begin), view.dtype, gb.f.row(i).data(), dim);
        }
        // To each query's rank: the scores of its queries' draws this rank owns, in (query, draw)
        // order, then the scores of the positives it owns, in query order.
        sc.send.clear();
        sc.scount.assign(static_cast<std::size_t>(ranks_), 0);
        for (int h = 0; h < ranks_; ++h) {
          const index_t q0 = gb.offset[static_cast<std::size_t>(h)], q1 = gb.offset[static_cast<std::size_t>(h) + 1];
          const std::size_t before = sc.send.size();
          sc.send.insert(sc.send.end(), own_val.begin() + own_start[static_cast<std::size_t>(q0)],
                         own_val.begin() + own_start[static_cast<std::size_t>(q1)]);
          for (index_t i = q0; i < q1; ++i)
            if (held_.contains(gb.ids[static_cast<std::size_t>(i)])) sc.send.push_back(sc.pos_val[static_cast<std::size_t>(i)]);
          sc.scount[static_cast<std::size_t>(h)] = mpi_count(sc.send.size() - before, "scores");
        }
      }, &wire_.seconds_scores);
      g.exchange(sc.send, sc.scount, sc.recv, sc.rcount, sc.rdispl);
      std::vector<std::size_t> cur(sc.rdispl.begin(), sc.rdispl.end());
      for (index_t b = 0; b < batch; ++b) {
        const index_t* d = dr.row(first + b);
        for (index_t j = 0; j < k; ++j) scores(b, j) = sc.recv[cur[static_cast<std::size_t>(owner(d[j]))]++];
      }
      for (index_t b = 0; b < batch; ++b)
        s_pos[static_cast<std::size_t>(b)] =
            sc.recv[cur[static_cast<std::size_t>(owner(gb.ids[static_cast<std::size_t>(first + b)]))]++];
    }

    // ---- 6. Z and the objective, at the query's rank
    const double inv_tau = 1.0 / config_.tau;
    const bool nce = config_.objective == Objective::nce;
    const bool same_label = shared && config_.exclude_same_label;
    // The weights query i sees: its draws' lw, with its own label's shared draws masked (-inf).
    const auto query_lw = [&](index_t i, std::vector<float>& buf) -> const float* {
      const float* lw = dr.lw_row(i);
      if (!same_label) return lw;
      const std::int32_t c = classes_[static_cast<std::size_t>(gb.ids[static_cast<std::size_t>(i)])];
      const index_t* d = dr.row(i);
      for (index_t j = 0; j < k; ++j)
        buf[static_cast<std::size_t>(j)] =
            classes_[static_cast<std::size_t>(d[j])] == c ? -std::numeric_limits<float>::infinity() : lw[j];
      return buf.data();
    };
    double log_z = nce && partition_.initialised ? partition_.log_z : kNaN;
    if (nce && std::isnan(log_z)) {
      detail::Lse lse;
      std::vector<float> buf(static_cast<std::size_t>(k));
      for (index_t b = 0; b < batch; ++b) {
        const float* lw = query_lw(first + b, buf);
        detail::Lse q;
        for (index_t j = 0; j < k; ++j) q.add(scores(b, j) * inv_tau + lw[j]);
        lse.merge(q);
      }
      log_z = global_log_z(lse);
    }
    log_z_used = log_z;
    const kernels::ObjectiveParams params = detail::objective_params(config_, k, n_, log_z);
    std::vector<kernels::QueryResult> results(static_cast<std::size_t>(batch));
    std::vector<float> c_pos(static_cast<std::size_t>(batch));
    g.check([&] {
      const bool positives_first = detail::takes_positives_first(config_.objective);
      detail::ExceptionCapture errors;
#pragma omp parallel
      {
        std::vector<float> lw_buf, acc2, w;
        std::vector<double> d, rescale;
        std::vector<index_t> iscratch;
        std::vector<std::int32_t> neg_classes;
        errors.run([&] {
          lw_buf.resize(static_cast<std::size_t>(k));
          acc2.resize(static_cast<std::size_t>(dim));
          w.resize(static_cast<std::size_t>(k) + 1);
          rescale.resize(2 * static_cast<std::size_t>((k + 15) / 16));
          if (positives_first) {
            d.resize(6 * static_cast<std::size_t>(k + 2));
            iscratch.resize(3 * static_cast<std::size_t>(k + 1));
          }
          if (!classes_.empty()) neg_classes.resize(static_cast<std::size_t>(k));
        });
#pragma omp for schedule(dynamic, 4)
        for (index_t b = 0; b < batch; ++b) {
          errors.run([&] {
            const index_t i = first + b;
            const index_t y = gb.ids[static_cast<std::size_t>(i)];
            const index_t* draws = dr.row(i);
            kernels::SharedQuery q{};
            q.s = scores.row(b).data();  // becomes (1 / B) dL/ds
            q.lw = query_lw(i, lw_buf);
            if (!classes_.empty()) {
              for (index_t j = 0; j < k; ++j) neg_classes[static_cast<std::size_t>(j)] = classes_[static_cast<std::size_t>(draws[j])];
              q.neg_classes = neg_classes.data();
              q.cls = classes_[static_cast<std::size_t>(y)];
            }
            q.ids = draws;
            q.k = k;
            q.y = y;
            q.s_pos = s_pos[static_cast<std::size_t>(b)];
            q.lw_pos = biased ? 0.0 : -log_n - std::log(sampler_->prob_for(y, query_ref(shared ? total : i)));
            q.coef_scale = 1.0 / static_cast<double>(total);
            q.rescale = rescale.data();
            q.scratch = {acc2.data(), w.data(), d.data(), iscratch.data()};
            kt.shared_query(params, q, results[static_cast<std::size_t>(b)]);
            c_pos[static_cast<std::size_t>(b)] = static_cast<float>(results[static_cast<std::size_t>(b)].c_pos);
          });
        }
      }
      errors.rethrow("the distributed step's objective");
    }, &wire_.seconds_objective);
    for (const auto& r : results) {  // in query order
      mine.loss += r.loss;
      mine.p_pos += r.p_pos;
      mine.sum_exp += r.sum_exp;
      mine.collisions += static_cast<double>(r.collisions);
      if (drive) my_losses.push_back(r.loss);
    }

    // ---- 7. dL/df = c_pos v_y + sum_j (dL/ds_j) v_j
    if (!sharded) {
      g.check([&] {
#pragma omp parallel for schedule(dynamic, 8)
        for (index_t b = 0; b < batch; ++b) {
          const index_t i = first + b;
          double* out = gsum.row(b).data();
          const index_t y = gb.ids[static_cast<std::size_t>(i)];
          add_rows(view, kt, &y, &c_pos[static_cast<std::size_t>(b)], 1, out);
          add_rows(view, kt, dr.row(i), scores.row(b).data(), k, out);
        }
      }, &wire_.seconds_gradient);
    } else {
      // The coefficients back to the owners, in the order their scores came.
      const auto R = static_cast<std::size_t>(ranks_);
      g.check([&] {
        sc.scount.assign(R, 0);
        for (index_t b = 0; b < batch; ++b) {
          const index_t* d = dr.row(first + b);
          for (index_t j = 0; j < k; ++j) ++sc.scount[static_cast<std::size_t>(owner(d[j]))];
          ++sc.scount[static_cast<std::size_t>(owner(gb.ids[static_cast<std::size_t>(first + b)]))];
        }
        std::vector<std::size_t> cur(R, 0);
        for (std::size_t o = 1; o < R; ++o) cur[o] = cur[o - 1] + static_cast<std::size_t>(sc.scount[o - 1]);
        sc.send.resize(cur[R - 1] + static_cast<std::size_t>(sc.scount[R - 1]));
        for (index_t b = 0; b < batch; ++b) {
          const index_t* d = dr.row(first + b);
          for (index_t j = 0; j < k; ++j) sc.send[cur[static_cast<std::size_t>(owner(d[j]))]++] = scores(b, j);
        }
        for (index_t b = 0; b < batch; ++b)
          sc.send[cur[static_cast<std::size_t>(owner(gb.ids[static_cast<std::size_t>(first + b)]))]++] =
              c_pos[static_cast<std::size_t>(b)];
      }, &wire_.seconds_objective);
      g.exchange(sc.send, sc.scount, sc.recv, sc.rcount, sc.rdispl);
      // Each owner's partial rows of every query, summed in double: its own queries' kept, the
      // others' rounded to fp32 into the flat buffer to their ranks.
      g.check([&] {
        std::vector<index_t> row_at(static_cast<std::size_t>(total));  // a query's row in its buffer
        sc.scount.assign(R, 0);
        index_t offset = 0;
        for (int h = 0; h < ranks_; ++h) {
          const index_t q0 = gb.offset[static_cast<std::size_t>(h)], q1 = gb.offset[static_cast<std::size_t>(h) + 1];
          // The coefficients of the draws this rank owns of h's queries, in the order of own_val.
          const auto base = static_cast<std::size_t>(own_start[static_cast<std::size_t>(q0)]);
          const auto n_scores = static_cast<std::size_t>(own_start[static_cast<std::size_t>(q1)]) - base;
          std::copy_n(sc.recv.begin() + sc.rdispl[static_cast<std::size_t>(h)], n_scores,
                      own_val.begin() + static_cast<std::ptrdiff_t>(base));
          for (index_t i = q0; i < q1; ++i) row_at[static_cast<std::size_t>(i)] = h == rank_ ? (i - q0) * dim : offset + (i - q0) * dim;
          if (h != rank_) {
            sc.scount[static_cast<std::size_t>(h)] = mpi_count(static_cast<std::size_t>((q1 - q0) * dim), "partial rows");
            offset += (q1 - q0) * dim;
          }
        }
        sc.part.assign(static_cast<std::size_t>(total * dim), 0.0);
        const auto row_of = [&](index_t i) { return sc.part.data() + i * dim; };
        // The positives this rank owns (their coefficients follow the draws' in each rank's part).
        for (int h = 0; h < ranks_; ++h) {
          const index_t q0 = gb.offset[static_cast<std::size_t>(h)], q1 = gb.offset[static_cast<std::size_t>(h) + 1];
          auto at = static_cast<std::size_t>(sc.rdispl[static_cast<std::size_t>(h)]) +
                    static_cast<std::size_t>(own_start[static_cast<std::size_t>(q1)] - own_start[static_cast<std::size_t>(q0)]);
          for (index_t i = q0; i < q1; ++i) {
            const index_t y = gb.ids[static_cast<std::size_t>(i)];
            if (!held_.contains(y)) continue;
            const index_t local = y - held_.begin;
            add_rows(view, kt, &local, &sc.recv[at++], 1, row_of(i));
          }
        }
#pragma omp parallel for schedule(dynamic, 8)
        for (index_t i = 0; i < total; ++i) {
          const auto s0 = own_start[static_cast<std::size_t>(i)], s1 = own_start[static_cast<std::size_t>(i) + 1];
          add_rows(view, kt, own_local.data() + s0, own_val.data() + s0, s1 - s0, row_of(i));
        }
        sc.send.resize(static_cast<std::size_t>(offset));
        for (index_t i = 0; i < total; ++i) {
          if (i >= first && i < first + batch) continue;
          const double* p = row_of(i);
          float* out = sc.send.data() + row_at[static_cast<std::size_t>(i)];
          for (index_t c = 0; c < dim; ++c) out[c] = static_cast<float>(p[c]);
        }
      }, &wire_.seconds_gradient);
      g.exchange(sc.send, sc.scount, sc.recv, sc.rcount, sc.rdispl);
      for (int r = 0; r < ranks_; ++r) {  // in rank order
        if (r == rank_) {
          const double* p = sc.part.data() + first * dim;
          for (index_t e = 0; e < gsum.size(); ++e) gsum.data()[e] += p[e];
        } else {
          const float* p = sc.recv.data() + sc.rdispl[static_cast<std::size_t>(r)];
          for (index_t e = 0; e < gsum.size(); ++e) gsum.data()[e] += p[e];
        }
      }
    }
  }

  // ---- the statistics of the global batch, the same on every rank
  const Sums sums = sum_in_rank_order(g, mine);
  StepStats stats;
  stats.step = step_;
  const double bt = static_cast<double>(total);
  stats.loss = sums.loss / bt;
  stats.mean_p_positive = sums.p_pos / bt;
  if (full) {
    stats.z = sums.z / bt;
    stats.z_estimate = kNaN;
  } else {
    const double draws = bt * static_cast<double>(k);
    const bool nce = config_.objective == Objective::nce;
    stats.negative_collision_fraction = sums.collisions / draws;
    const double log_z_hat = detail::log_z_hat(std::log(sums.sum_exp), draws, n_);
    stats.z_estimate = std::exp(log_z_hat);
    stats.z = nce ? std::exp(log_z_used) : kNaN;
    if (reports_mi_bound(config_.objective)) {
      stats.mi_bound_ceiling = std::log(static_cast<double>(k) + 1.0);
      stats.mi_lower_bound = stats.mi_bound_ceiling - stats.loss;
    }
    if (nce) next = detail::partition_after(config_, partition_, log_z_used, log_z_hat);
  }
  // Every rank holds the same global losses, so a non-finite one is refused on all of them alike,
  // before anything changes.
  std::vector<double> losses;
  if (drive) {
    std::vector<index_t> counts(static_cast<std::size_t>(ranks_));
    for (int r = 0; r < ranks_; ++r)
      counts[static_cast<std::size_t>(r)] = gb.offset[static_cast<std::size_t>(r) + 1] - gb.offset[static_cast<std::size_t>(r)];
    losses = g.allgatherv(std::span<const double>(my_losses), counts);
    for (std::size_t i = 0; i < losses.size(); ++i)
      MEMBANK_CHECK(std::isfinite(losses[i]), "query {} of the global batch (id {}) has loss {}: the loss_ema drive "
                    "needs finite per-query losses (nothing changed)", i, gb.ids[i], losses[i]);
  }
  for (index_t b = 0; b < batch; ++b)
    for (index_t c = 0; c < dim; ++c) grad(b, c) = static_cast<float>(gsum(b, c));
  if (config_.normalize_features) detail::backprop_normalisation(prepared, grad);

  // ---- 8. refresh: the global batch in global order (replicated), or each owner's rows (sharded)
  if (update) {
    g.check([&] {
      if (!sharded) {
        bank_.momentum_update(gb.ids, gb.f, config_.momentum, step_, config_.rounding, config_.seed);
        return;
      }
      std::vector<index_t> local;
      std::vector<index_t> rows;
      for (index_t i = 0; i < total; ++i)
        if (held_.contains(gb.ids[static_cast<std::size_t>(i)])) {
          local.push_back(gb.ids[static_cast<std::size_t>(i)] - held_.begin);
          rows.push_back(i);
        }
      if (local.empty()) return;
      RowMatrixf f(static_cast<index_t>(rows.size()), dim);
      for (std::size_t t = 0; t < rows.size(); ++t) f.row(static_cast<index_t>(t)) = gb.f.row(rows[t]);
      bank_.momentum_update(local, f, config_.momentum, step_, config_.rounding, config_.seed, held_.begin);
    }, &wire_.seconds_refresh);
  }
  if (next.initialised) {
    partition_.initialised = true;
    partition_.log_z = next.log_z;
  }
  ++step_;
  if (drive) {  // as Engine's step: the same rows re-weighted the same way on every rank
    driven->observe(gb.ids, losses);
    if (!labels_.empty() && config_.exclude_same_label) class_mass_ = detail::label_classes(labels_, *sampler_, config_).mass;
  }
  return stats;
}

}  // namespace membank
