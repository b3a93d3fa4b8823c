// ClusterSampler: spherical k-means over the bank, the per-query mixture q(. | f) and its draws.
// The mathematics is in membank/cluster_sampler.hpp.
#include <membank/cluster_sampler.hpp>
#include <membank/error.hpp>
#include <membank/linalg.hpp>

#include "detail/check.hpp"
#include "detail/draw_checks.hpp"
#include "detail/kmeans.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "detail/prefetch.hpp"
#include "kernels/kernels.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>

namespace membank {

void ClusterConfig::validate(index_t n) const {
  MEMBANK_CHECK(clusters >= 1 && clusters <= n, "clusters = {}: expected 1 <= C <= N = {}", clusters, n);
  MEMBANK_CHECK(std::isfinite(epsilon) && epsilon > 0.0 && epsilon <= 1.0,
                "epsilon = {}: expected 0 < epsilon <= 1 (the uniform share keeps q > 0 on every row)", epsilon);
  MEMBANK_CHECK(std::isfinite(beta) && beta >= 0.0, "beta = {}: expected a finite beta >= 0", beta);
  MEMBANK_CHECK(refresh_every >= 0, "refresh_every = {}: expected >= 0 (0: refresh only when asked)", refresh_every);
  MEMBANK_CHECK(iterations >= 0, "iterations = {}: expected >= 0", iterations);
}

namespace {

constexpr index_t kAssignTile = 256;  // rows per product in an assignment pass (fixed: any thread count)
constexpr index_t kQueryBlock = 64;   // queries per product when conditioning (fixed: any thread count)
constexpr std::uint32_t kPurposeClusterInit = 5;  // detail::Purpose's next free value

/// Rows sorted by cluster (ascending within), with each cluster's first position and size.
void sort_members(const std::int32_t* assignment, index_t n, index_t c, std::vector<index_t>& sizes,
                  std::vector<index_t>& offsets, std::vector<std::uint32_t>& members) {
  sizes.assign(static_cast<std::size_t>(c), 0);
  for (index_t j = 0; j < n; ++j) ++sizes[static_cast<std::size_t>(assignment[j])];
  offsets.assign(static_cast<std::size_t>(c) + 1, 0);
  for (index_t k = 0; k < c; ++k)
    offsets[static_cast<std::size_t>(k) + 1] = offsets[static_cast<std::size_t>(k)] + sizes[static_cast<std::size_t>(k)];
  members.resize(static_cast<std::size_t>(n));
  std::vector<index_t> next(offsets.begin(), offsets.end() - 1);
  for (index_t j = 0; j < n; ++j)
    members[static_cast<std::size_t>(next[static_cast<std::size_t>(assignment[j])]++)] = static_cast<std::uint32_t>(j);
}

/// The first fit's centroids: the rows kmeans_initial_rows picks, normalised.
RowMatrixf initial_centroids(const BankView& bank, index_t c, std::uint64_t seed) {
  const std::vector<std::uint32_t> rows = detail::kmeans_initial_rows(bank.rows, c, seed);
  RowMatrixf out(c, bank.dim);
  for (index_t k = 0; k < c; ++k) {
    bank.widen_rows(rows[static_cast<std::size_t>(k)], 1, out.row(k).data(), bank.dim);
    const float norm = out.row(k).norm();
    if (norm > 0.0f) out.row(k) /= norm;
  }
  return out;
}

}  // namespace

std::vector<std::uint32_t> detail::kmeans_initial_rows(index_t n, index_t c, std::uint64_t seed) {
  std::vector<std::uint32_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), 0u);
  detail::Stream stream({seed, 0, 0u, kPurposeClusterInit});
  for (index_t i = 0; i < c; ++i) {
    const auto r = stream.next();
    const auto j = i + static_cast<index_t>(detail::scale_to(detail::join64(r.v[0], r.v[1]),
                                                             static_cast<std::uint64_t>(n - i)));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
  }
  perm.resize(static_cast<std::size_t>(c));
  return perm;
}

void detail::kmeans_assign(const BankView& bank, const RowMatrixf& centroids, std::int32_t* out) {
  const index_t n = bank.rows, d = bank.dim, c = centroids.rows();
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> tile, scores;
    errors.run([&] {
      tile.resize(static_cast<std::size_t>(kAssignTile * d));
      scores.resize(static_cast<std::size_t>(kAssignTile * c));
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < (n + kAssignTile - 1) / kAssignTile; ++t) {
      errors.run([&] {
        const index_t first = t * kAssignTile, rows = std::min(kAssignTile, n - first);
        bank.widen_rows(first, rows, tile.data(), d);
        matmul(rows, c, d, tile.data(), d, centroids.data(), d, true, scores.data(), c);
        for (index_t r = 0; r < rows; ++r) {
          const float* s = scores.data() + r * c;
          out[first + r] = static_cast<std::int32_t>(std::max_element(s, s + c) - s);
        }
      });
    }
  }
  errors.rethrow("the cluster sampler's assignment pass");
}

void detail::kmeans_add_rows(const BankView& bank, const std::int32_t* assignment, RowMatrixd& sums) {
  const index_t d = bank.dim, c = sums.rows();
  std::vector<index_t> sizes, offsets;
  std::vector<std::uint32_t> members;
  sort_members(assignment, bank.rows, c, sizes, offsets, members);
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> row;
    errors.run([&] { row.resize(static_cast<std::size_t>(d)); });
#pragma omp for schedule(dynamic, 8)
    for (index_t k = 0; k < c; ++k) {
      errors.run([&] {
        double* sum = sums.row(k).data();
        for (index_t m = offsets[static_cast<std::size_t>(k)]; m < offsets[static_cast<std::size_t>(k) + 1]; ++m) {
          bank.widen_rows(members[static_cast<std::size_t>(m)], 1, row.data(), d);
          for (index_t e = 0; e < d; ++e) sum[e] += row[static_cast<std::size_t>(e)];
        }
      });
    }
  }
  errors.rethrow("the cluster sampler's centroid sums");
}

void detail::kmeans_centroids(const RowMatrixd& sums, RowMatrixf& centroids) {
  for (index_t k = 0; k < sums.rows(); ++k) {
    double norm = 0.0;
    for (index_t e = 0; e < sums.cols(); ++e) norm += sums(k, e) * sums(k, e);
    norm = std::sqrt(norm);
    if (norm > 0.0 && std::isfinite(norm))
      for (index_t e = 0; e < sums.cols(); ++e) centroids(k, e) = static_cast<float>(sums(k, e) / norm);
  }
}

/// A conditioned batch's arrays (ClusterBatch), and the pool that keeps them between batches.
struct ClusterBuffers {
  std::vector<double> cdf, pi;
  std::vector<float> log_q;
  std::vector<float> scores;  ///< f_i . c_k (B x C): conditioning's scratch, kept with the rest
  std::vector<double> totals;  ///< per row, its cdf's total
  /// A guide table per row (Chen and Asau's): guide[g] is at most the first cluster whose cumulative
  /// weight passes g / C of the total, so a draw's search starts there and moves on a step or two.
  /// (4 C buckets, the start then mostly the answer, measured no faster.) Built by cluster_mixture.
  std::vector<std::int32_t> guide;
};

struct detail::ClusterBufferPool {
  static constexpr std::size_t kKept = 4;  // batches conditioned at once: a step's, and a caller's sample()
  std::mutex mu;
  std::vector<ClusterBuffers> free;
  ClusterBuffers take() {
    const std::lock_guard lock(mu);
    if (free.empty()) return {};
    ClusterBuffers b = std::move(free.back());
    free.pop_back();
    return b;
  }
  void give(ClusterBuffers&& b) noexcept {
    try {
      const std::lock_guard lock(mu);
      if (free.size() < kKept) free.push_back(std::move(b));
    } catch (...) {  // (a failed push_back only loses the reuse)
    }
  }
};

namespace {

/// The per-query mixtures of one batch: row r (B queries, then their mean) holds, per cluster k, the
/// cumulative weight the draw searches, pi_k, and log q(j | f_r) of the cluster's rows. Its arrays go
/// back to the sampler's pool when it is destroyed.
struct ClusterBatch final : Conditioned, ClusterBuffers {
  index_t rows = 0, c = 0;
  std::shared_ptr<detail::ClusterBufferPool> pool;
  ClusterBatch(std::shared_ptr<detail::ClusterBufferPool> p, ClusterBuffers b)
      : ClusterBuffers(std::move(b)), pool(std::move(p)) {}
  ClusterBatch(const ClusterBatch&) = delete;
  ClusterBatch& operator=(const ClusterBatch&) = delete;
  ~ClusterBatch() override {
    if (pool) pool->give(std::move(static_cast<ClusterBuffers&>(*this)));
  }
  const double* cdf_row(index_t r) const { return cdf.data() + r * c; }
  const std::int32_t* guide_row(index_t r) const { return guide.data() + r * c; }
  std::int32_t* guide_row(index_t r) { return guide.data() + r * c; }
};

const ClusterBatch& batch_of(QueryRef q, index_t n_clusters) {
  const auto* b = dynamic_cast<const ClusterBatch*>(q.batch);
  MEMBANK_CHECK(b != nullptr && b->c == n_clusters, "the QueryRef was not conditioned by this cluster sampler");
  MEMBANK_CHECK(q.row >= 0 && q.row < b->rows, "QueryRef row {}: expected 0 <= row < {} (B queries and their mean)",
                q.row, b->rows);
  return *b;
}


}  // namespace

ClusterSampler::ClusterSampler(const BankView& bank, ClusterConfig config)
    : NoiseSampler(bank.rows), config_(config) {
  config_.validate(bank.rows);
  MEMBANK_CHECK(bank.rows < (index_t{1} << 32), "the bank has N = {} rows: expected fewer than 2^32", bank.rows);
  eps_ = std::ceil(config_.epsilon * 0x1.0p53) * 0x1.0p-53;
  pool_ = std::make_shared<detail::ClusterBufferPool>();
  centroids_ = initial_centroids(bank, config_.clusters, config_.seed);
  assignment_.resize(static_cast<std::size_t>(bank.rows));
  refresh(bank, 0);
}

ClusterSampler::ClusterSampler(ClusterConfig config, RowMatrixf centroids, std::vector<std::int32_t> assignment,
                               std::int64_t refreshed_at)
    : NoiseSampler(static_cast<index_t>(assignment.size())), config_(config) {
  const auto n = static_cast<index_t>(assignment.size());
  MEMBANK_CHECK(n >= 1 && n < (index_t{1} << 32), "assignment has {} entries: expected one per row, 1 <= N < 2^32", n);
  config_.validate(n);
  MEMBANK_CHECK(centroids.rows() == config_.clusters && centroids.cols() >= 1,
                "centroids has shape {} x {}: expected C = {} rows of D >= 1", centroids.rows(), centroids.cols(),
                config_.clusters);
  MEMBANK_CHECK(centroids.allFinite(), "centroids hold a non-finite value: expected finite centroids");
  for (index_t j = 0; j < n; ++j) {
    const std::int32_t k = assignment[static_cast<std::size_t>(j)];
    MEMBANK_CHECK(k >= 0 && k < config_.clusters, "assignment[{}] = {}: expected a cluster in [0, {})", j, k,
                  config_.clusters);
  }
  MEMBANK_CHECK(refreshed_at >= 0, "refreshed_at = {}: expected a step counter >= 0", refreshed_at);
  eps_ = std::ceil(config_.epsilon * 0x1.0p53) * 0x1.0p-53;
  pool_ = std::make_shared<detail::ClusterBufferPool>();
  centroids_ = std::move(centroids);
  assignment_ = std::move(assignment);
  refreshed_at_ = refreshed_at;
  index_members();
}

void ClusterSampler::index_members() {
  std::vector<index_t> offsets;
  sort_members(assignment_.data(), static_cast<index_t>(assignment_.size()), config_.clusters, sizes_, offsets,
               members_);
  spans_.resize(sizes_.size());
  for (std::size_t k = 0; k < sizes_.size(); ++k)
    spans_[k] = (static_cast<std::uint64_t>(offsets[k]) << 32) | static_cast<std::uint64_t>(sizes_[k]);
}

void ClusterSampler::refresh(const BankView& bank, std::int64_t step) {
  MEMBANK_CHECK(bank.rows == n_ && bank.dim == centroids_.cols(),
                "the bank is {} x {}: expected the sampler's N x D = {} x {}", bank.rows, bank.dim, n_,
                centroids_.cols());
  MEMBANK_CHECK(step >= 0, "step = {}: expected a step counter >= 0", step);
  // Work on copies: the sampler changes only once the whole refresh has succeeded.
  RowMatrixf centroids = centroids_;
  std::vector<std::int32_t> assignment(assignment_.size());
  RowMatrixd sums(centroids.rows(), centroids.cols());
  for (int it = 0; it < config_.iterations; ++it) {
    detail::kmeans_assign(bank, centroids, assignment.data());
    sums.setZero();
    detail::kmeans_add_rows(bank, assignment.data(), sums);
    detail::kmeans_centroids(sums, centroids);
  }
  detail::kmeans_assign(bank, centroids, assignment.data());
  centroids_ = std::move(centroids);
  assignment_ = std::move(assignment);
  refreshed_at_ = step;
  index_members();
}

// Without a query the mixture is the uniform distribution (beta = 0): the uniform sampler's answers.
double ClusterSampler::prob(index_t j) const { return UniformSampler(n_).prob(j); }

std::vector<double> ClusterSampler::probs() const { return UniformSampler(n_).probs(); }

void ClusterSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  UniformSampler(n_).lookup(ids, log_pn);
}

double ClusterSampler::prob_given(index_t j, QueryRef query) const {
  const ClusterBatch& b = batch_of(query, config_.clusters);
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  const auto k = static_cast<std::size_t>(assignment_[static_cast<std::size_t>(j)]);
  return eps_ / static_cast<double>(n_) +
         (1.0 - eps_) * b.pi[static_cast<std::size_t>(query.row * b.c) + k] / static_cast<double>(sizes_[k]);
}

void ClusterSampler::lookup_given(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const {
  const ClusterBatch& b = batch_of(query, config_.clusters);
  const float* log_q = b.log_q.data() + query.row * b.c;
  for (std::size_t t = 0; t < ids.size(); ++t)
    log_pn[t] = log_q[assignment_[static_cast<std::size_t>(ids[t])]];
}

void ClusterSampler::class_mass_given(const Conditioned& batch, const std::int32_t* classes, index_t n_classes,
                                      std::span<const std::int32_t> query_classes, std::span<double> out) const {
  const ClusterBatch& b = batch_of({&batch, 0}, config_.clusters);
  MEMBANK_CHECK(query_classes.size() == out.size() && static_cast<index_t>(out.size()) < b.rows,
                "{} query classes for {} masses: expected one per query of the batch (at most {})", query_classes.size(),
                out.size(), b.rows - 1);
  const index_t c = config_.clusters;
  // count[k L + l]: the rows of class l in cluster k (in double: sums below stay exact up to 2^53).
  std::vector<double> count(static_cast<std::size_t>(c * n_classes), 0.0), total(static_cast<std::size_t>(n_classes), 0.0);
  for (index_t j = 0; j < n_; ++j) {
    const auto l = classes[j];
    MEMBANK_CHECK(l >= 0 && l < n_classes, "classes[{}] = {}: expected a class in [0, {})", j, l, n_classes);
    count[static_cast<std::size_t>(assignment_[static_cast<std::size_t>(j)] * n_classes + l)] += 1.0;
    total[static_cast<std::size_t>(l)] += 1.0;
  }
  const double n = static_cast<double>(n_);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::int32_t l = query_classes[i];
    MEMBANK_CHECK(l >= 0 && l < n_classes, "query_classes[{}] = {}: expected a class in [0, {})", i, l, n_classes);
    const double* pi = b.pi.data() + static_cast<index_t>(i) * c;
    double clustered = 0.0;
    for (index_t k = 0; k < c; ++k) {
      const index_t size = sizes_[static_cast<std::size_t>(k)];
      if (size > 0) clustered += pi[k] * count[static_cast<std::size_t>(k * n_classes + l)] / static_cast<double>(size);
    }
    out[i] = eps_ * total[static_cast<std::size_t>(l)] / n + (1.0 - eps_) * clustered;
  }
}

std::unique_ptr<Conditioned> ClusterSampler::condition(const BankView&, const float* f, index_t stride,
                                                       index_t batch, index_t dim) const {
  const index_t c = config_.clusters;
  MEMBANK_CHECK(batch >= 1, "batch = {}: expected at least one query", batch);
  MEMBANK_CHECK(dim == centroids_.cols(), "the queries have D = {}: expected the centroids' D = {}", dim,
                centroids_.cols());
  MEMBANK_CHECK(stride >= dim, "stride = {}: expected at least D = {}", stride, dim);
  for (index_t i = 0; i < batch; ++i)
    for (index_t e = 0; e < dim; ++e)
      MEMBANK_CHECK(std::isfinite(f[i * stride + e]), "f({}, {}) = {}: expected finite features", i, e,
                    f[i * stride + e]);
  auto out = std::make_unique<ClusterBatch>(pool_, pool_->take());
  ClusterBatch& b = *out;
  b.rows = batch + 1;
  b.c = c;
  const auto cells = static_cast<std::size_t>(b.rows * c);
  b.cdf.resize(cells);
  b.pi.resize(cells);
  b.log_q.resize(cells);
  b.guide.resize(cells);
  b.totals.resize(static_cast<std::size_t>(b.rows));
  b.scores.resize(static_cast<std::size_t>(batch * c));
  // Per cluster: log n_k (-inf for an empty one, which then weighs 0) and 1 / n_k (0 for an empty
  // one, whose log q is set to -inf after).
  const double n = static_cast<double>(n_);
  std::vector<double> log_size(static_cast<std::size_t>(c));
  std::vector<double> inv_size(static_cast<std::size_t>(c));
  std::vector<index_t> empty;
  for (index_t k = 0; k < c; ++k) {
    const index_t size = sizes_[static_cast<std::size_t>(k)];
    log_size[static_cast<std::size_t>(k)] =
        size > 0 ? std::log(static_cast<double>(size)) : -std::numeric_limits<double>::infinity();
    inv_size[static_cast<std::size_t>(k)] = size > 0 ? 1.0 / static_cast<double>(size) : 0.0;
    if (size == 0) empty.push_back(k);
  }
  // One row's weights (in w) -> its cdf, guide, pi and log q.
  const kernels::Table& kt = kernels::table();
  const auto finish_row = [&](index_t r, const double* w) {
    float* log_q = b.log_q.data() + r * c;
    kt.cluster_mixture(w, inv_size.data(), eps_ / n, 1.0 - eps_, c, b.cdf.data() + r * c,
                       &b.totals[static_cast<std::size_t>(r)], b.guide_row(r), b.pi.data() + r * c, log_q);
    for (const index_t k : empty) log_q[k] = -std::numeric_limits<float>::infinity();
  };
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<double> w;
    errors.run([&] { w.resize(static_cast<std::size_t>(c)); });
#pragma omp for schedule(dynamic, 1)
    for (index_t i0 = 0; i0 < batch; i0 += kQueryBlock) {
      errors.run([&] {
        const index_t rows = std::min(kQueryBlock, batch - i0);
        float* s = b.scores.data() + i0 * c;
        matmul(rows, c, dim, f + i0 * stride, stride, centroids_.data(), dim, true, s, c);
        for (index_t r = 0; r < rows; ++r) {
          kt.cluster_weights(s + r * c, config_.beta, log_size.data(), c, w.data());
          finish_row(i0 + r, w.data());
        }
      });
    }
  }
  errors.rethrow("the cluster sampler's conditioning");
  for (index_t i = 0; i < batch; ++i)
    MEMBANK_CHECK(std::isfinite(b.totals[static_cast<std::size_t>(i)]),
                  "query {}'s cluster weights are not finite (beta = {} times its scores f . c_k overflows): expected "
                  "features whose scores times beta stay finite", i, config_.beta);
  // Row B: the batch's mean mixture, each cluster's pi summed over the queries in order.
  std::vector<double> mean(static_cast<std::size_t>(c), 0.0);
  constexpr index_t kColumns = 128;
#pragma omp parallel for schedule(static)
  for (index_t k0 = 0; k0 < c; k0 += kColumns)
    for (index_t i = 0; i < batch; ++i)
      for (index_t k = k0; k < std::min(k0 + kColumns, c); ++k)
        mean[static_cast<std::size_t>(k)] += b.pi[static_cast<std::size_t>(i * c + k)];
  finish_row(batch, mean.data());
  return out;
}

void ClusterSampler::draw_next(DrawCursor& cur, std::span<index_t> ids, std::span<float> log_pn) const {
  detail::check_piece(cur, ids.size(), log_pn.size());
  const ClusterBatch* b = cur.query.batch ? &batch_of(cur.query, config_.clusters) : nullptr;
  const auto n = static_cast<std::uint64_t>(n_);
  const index_t c = config_.clusters;
  const float log_uniform = static_cast<float>(-std::log(static_cast<double>(n_)));
  const double* cdf = b ? b->cdf_row(cur.query.row) : nullptr;
  const float* log_q = b ? b->log_q.data() + cur.query.row * c : nullptr;
  const double total = b ? b->totals[static_cast<std::size_t>(cur.query.row)] : 1.0;
  const std::int32_t* guide = b ? b->guide_row(cur.query.row) : nullptr;
  // Draw t of the stream takes Philox block t: words 0-1 a 53-bit u that picks the branch (u < eps:
  // uniform) and otherwise the cluster, from (u - eps) / (1 - eps); words 2-3 the row (uniform over
  // N, or over the cluster's members). The r-th redraw of an excluded draw takes block total + r.
  // A draw resolves in two halves: the kernel finds its place (a uniform row, or a slot of the member
  // table, whose cluster is then known) and requests that memory; finish() reads it. Between the
  // two, a chunk's requests are all in flight.
  const double inv_rest = eps_ < 1.0 ? 1.0 / (1.0 - eps_) : 0.0;
  const double eps = b ? eps_ : 2.0;  // no query: every draw uniform
  const std::uint64_t* spans = spans_.data();
  const std::int32_t* row_cluster = b ? assignment_.data() : nullptr;  // read on the uniform branch
  const kernels::Table& kt = kernels::table();
  const auto finish = [&](std::uint64_t at, std::int32_t cluster, index_t& id, float& lp) {
    if (cluster < 0) {
      id = static_cast<index_t>(at);
      lp = b ? log_q[assignment_[at]] : log_uniform;
    } else {
      id = members_[at];
      lp = log_q[cluster];
    }
  };
  if (b && cur.drawn == 0) {
    detail::prefetch_row(guide, c);
    detail::prefetch_row(cdf, c);
    detail::prefetch_row(log_q, c);
  }
  const detail::StreamCounter counter(cur.key);
  // Draws per vectorised Philox call and per pass of the kernel. At 256 a draw alone took 7.1, 7.2 and
  // 7.6 ns against 7.8, 8.3 and 10.2 at 64 (`bench sampler`, runs alternated): each member line is
  // requested further ahead of its read. 28 bytes a draw, 7 KiB on the stack.
  constexpr std::size_t kChunk = 256;
  std::array<std::uint32_t, 4 * kChunk> words;
  std::array<std::uint64_t, kChunk> at;
  std::array<std::int32_t, kChunk> cluster;
  const std::size_t k = ids.size();
  for (std::size_t t0 = 0; t0 < k; t0 += kChunk) {
    const std::size_t m = std::min(kChunk, k - t0);
    counter.blocks(kt, static_cast<std::uint64_t>(cur.drawn) + t0, static_cast<std::int64_t>(m), words.data());
    kt.cluster_picks(words.data(), static_cast<std::int64_t>(m), eps, inv_rest, n, cdf, total, guide, c, spans,
                     members_.data(), row_cluster, at.data(), cluster.data());
    for (std::size_t t = 0; t < m; ++t) finish(at[t], cluster[t], ids[t0 + t], log_pn[t0 + t]);
  }
  detail::redraw_excluded(cur, static_cast<std::uint64_t>(cur.total), ids, log_pn,
                          [&](const r123::Philox4x32::ctr_type& r, index_t& id, float& lp) {
                            kt.cluster_picks(r.v, 1, eps, inv_rest, n, cdf, total, guide, c, spans, members_.data(),
                                             row_cluster, at.data(), cluster.data());
                            finish(at[0], cluster[0], id, lp);
                          });
  cur.drawn += static_cast<index_t>(k);
}

}  // namespace membank
