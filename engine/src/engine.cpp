#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "detail/softplus.hpp"
#include "detail/philox.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace membank {

// ---------------------------------------------------------------------------------------------
// names and configuration

std::string to_string(Objective o) {
  switch (o) {
    case Objective::nce: return "nce";
    case Objective::info_nce: return "infonce";
    case Objective::full_softmax: return "full";
  }
  return "?";
}
std::string to_string(NegativesMode m) { return m == NegativesMode::per_sample ? "per-sample" : "shared"; }
std::string to_string(ZPolicy p) {
  switch (p) {
    case ZPolicy::first_batch: return "first_batch";
    case ZPolicy::ema: return "ema";
    case ZPolicy::fixed: return "fixed";
  }
  return "?";
}
Objective objective_from_string(const std::string& s) {
  if (s == "nce") return Objective::nce;
  if (s == "infonce") return Objective::info_nce;
  if (s == "full") return Objective::full_softmax;
  MEMBANK_THROW("objective = '{}': expected one of nce, infonce, full", s);
}
NegativesMode negatives_mode_from_string(const std::string& s) {
  if (s == "per-sample") return NegativesMode::per_sample;
  if (s == "shared") return NegativesMode::shared;
  MEMBANK_THROW("negatives = '{}': expected per-sample or shared", s);
}
ZPolicy z_policy_from_string(const std::string& s) {
  if (s == "first_batch") return ZPolicy::first_batch;
  if (s == "ema") return ZPolicy::ema;
  if (s == "fixed") return ZPolicy::fixed;
  MEMBANK_THROW("z_policy = '{}': expected one of first_batch, ema, fixed", s);
}

void EngineConfig::validate(index_t n, index_t dim) const {
  MEMBANK_CHECK(k >= 1, "config.k = {}: expected K >= 1 noise draws per query", k);
  if (dim >= 1)
    require_memory(step_scratch_bytes(*this, 1, dim, k, omp_get_max_threads()),
                   fmt::format("config.k = {}: one step's scratch for K = {} (D = {}, {} threads)", k, k, dim,
                               omp_get_max_threads()));
  MEMBANK_CHECK(k <= (index_t{1} << 31), "config.k = {}: expected K <= 2^31", k);
  MEMBANK_CHECK(!exclude_positive || k < n,
                "config.k = {} with exclude_positive: expected K < N = {} (K >= N leaves too few "
                "instances besides the positive)", k, n);
  MEMBANK_CHECK(std::isfinite(tau) && tau > 0.0, "config.tau = {}: expected a finite temperature > 0", tau);
  MEMBANK_CHECK(momentum >= 0.0 && momentum <= 1.0, "config.momentum = {}: expected 0 <= m <= 1", momentum);
  MEMBANK_CHECK(z_policy != ZPolicy::fixed || (std::isfinite(z_fixed) && z_fixed > 0.0),
                "config.z_fixed = {}: expected a finite Z > 0 with z_policy fixed", z_fixed);
  MEMBANK_CHECK(z_ema >= 0.0 && z_ema < 1.0, "config.z_ema = {}: expected 0 <= alpha < 1", z_ema);
  MEMBANK_CHECK(std::isfinite(unit_norm_tolerance) && unit_norm_tolerance > 0.0 && unit_norm_tolerance < 1.0,
                "config.unit_norm_tolerance = {}: expected 0 < tolerance < 1", unit_norm_tolerance);
}

std::int64_t step_scratch_bytes(const EngineConfig& c, index_t batch, index_t dim, index_t k, int threads) {
  // Per query: its QueryOut (32 bytes) and log P_n(y) (4); normalising: a B x D copy and B norms.
  std::int64_t bytes = mul_sat(batch, 36);
  if (c.normalize_features) bytes = add_sat(bytes, mul_sat(batch, add_sat(mul_sat(dim, 4), 8)));
  if (c.objective == Objective::full_softmax) return bytes;  // full_softmax_loss checks its own
  if (c.negatives == NegativesMode::per_sample)  // per thread: K ids (8) and log P_n (4)
    return add_sat(bytes, mul_sat(threads, mul_sat(k, 12)));
  // shared: K ids, log P_n, log K P_n (20 per negative), the K x D rows and the B x K scores
  bytes = add_sat(bytes, mul_sat(k, 20));
  bytes = add_sat(bytes, mul_sat(k, mul_sat(dim, 4)));
  return add_sat(bytes, mul_sat(batch, mul_sat(k, 4)));
}

double Partition::z() const {
  return initialised ? std::exp(log_z) : std::numeric_limits<double>::quiet_NaN();
}

// ---------------------------------------------------------------------------------------------
// kernels

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr index_t kSharedRowBlock = 16;  // queries per GEMM block (fixed: results do not depend on threads)

using detail::softplus_sigmoid;

/// Streaming log-sum-exp of a sequence of values.
struct Lse {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  void add(double x) {
    if (x > max) {
      sum = sum * std::exp(max - x) + 1.0;
      max = x;
    } else {
      sum += std::exp(x - max);
    }
  }
  void merge(const Lse& o) {
    if (o.sum == 0.0) return;
    if (o.max > max) {
      sum = sum * std::exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * std::exp(o.max - max);
    }
  }
  double value() const { return max + std::log(sum); }
};

/// Everything one step's kernel needs, resolved and validated by the caller.
struct StepInput {
  const float* f;           // B x D features (unit rows)
  index_t f_stride;
  IdsRef ids;
  const RowMatrixi* negatives;  // caller-supplied, or nullptr: draw them
  std::int64_t step;
  float* grad;              // B x D output
  index_t g_stride;
};

/// Per-query results, combined serially in query order (thread-count independent).
struct QueryOut {
  double loss = 0.0;
  double p_pos = 0.0;
  double sum_exp_a = 0.0;  // NCE: sum_k exp(a_k) (gives Zhat = Z * sum / B); InfoNCE: sum_k exp(l_k)
  index_t collisions = 0;
};

}  // namespace

Engine::Engine(Bank bank, std::unique_ptr<NoiseSampler> sampler, EngineConfig config)
    : bank_(std::move(bank)), sampler_(std::move(sampler)), config_(config) {
  MEMBANK_CHECK(sampler_ != nullptr, "sampler is null: expected a NoiseSampler over the bank's N = {} rows",
                bank_.size());
  MEMBANK_CHECK(sampler_->size() == bank_.size(), "sampler has N = {}: expected the bank's N = {}",
                sampler_->size(), bank_.size());
  config_.validate(bank_.size(), bank_.dim());
  partition_.policy = config_.z_policy;
  if (config_.z_policy == ZPolicy::fixed) {
    partition_.initialised = true;
    partition_.log_z = std::log(config_.z_fixed);
  }
}

void Engine::restore_state(const Partition& partition, std::int64_t step) {
  MEMBANK_CHECK(partition.policy == config_.z_policy, "partition.policy = {}: expected the engine's {}",
                to_string(partition.policy), to_string(config_.z_policy));
  MEMBANK_CHECK(!partition.initialised || std::isfinite(partition.log_z),
                "partition.log_z = {}: expected a finite value", partition.log_z);
  MEMBANK_CHECK(step >= 0, "step = {}: expected a step counter >= 0", step);
  MEMBANK_CHECK(config_.z_policy != ZPolicy::fixed || (partition.initialised && partition.log_z == partition_.log_z),
                "partition.log_z = {}: the fixed policy's Z is log {} = {}", partition.log_z, config_.z_fixed,
                partition_.log_z);
  partition_ = partition;
  step_ = step;
}

namespace {

/// The state a kernel reads: engine pieces plus the Z to use (log_z; NaN = estimate it first).
struct KernelContext {
  BankView bank;
  const NoiseSampler* sampler;
  const EngineConfig* cfg;
  double log_z;
  index_t k;  // noise draws per query
};

/// Sorted unique ids of the batch (the exclusion set of shared negatives) and their P_n mass.
std::vector<index_t> unique_sorted(IdsRef ids) {
  std::vector<index_t> u(ids.begin(), ids.end());
  std::sort(u.begin(), u.end());
  u.erase(std::unique(u.begin(), u.end()), u.end());
  return u;
}

/// Negatives of query i into ids_buf/log_pn_buf: drawn, or copied from the caller's matrix.
void query_negatives(const KernelContext& cx, const StepInput& in, index_t i, std::span<index_t> ids_buf,
                     std::span<float> log_pn_buf) {
  if (in.negatives) {
    const index_t* row = in.negatives->data() + i * in.negatives->cols();
    std::copy_n(row, cx.k, ids_buf.begin());
    cx.sampler->lookup(ids_buf, log_pn_buf);
  } else {
    const index_t y = in.ids[static_cast<std::size_t>(i)];
    const std::span<const index_t> excl = cx.cfg->exclude_positive ? std::span<const index_t>(&y, 1)
                                                                   : std::span<const index_t>();
    cx.sampler->draw({cx.cfg->seed, in.step, static_cast<std::uint32_t>(i), detail::purpose_negatives},
                     excl, ids_buf, log_pn_buf);
  }
}

/// log Zhat = log mean_{i,k} exp(s_ik / tau) / P_n(j_ik), per-sample negatives (one gather pass).
double estimate_log_z_per_sample(const KernelContext& cx, const StepInput& in, index_t batch,
                                 const kernels::Table& kt) {
  const index_t dim = cx.bank.dim;
  const double inv_tau = 1.0 / cx.cfg->tau;
  std::vector<Lse> per_query(static_cast<std::size_t>(batch));
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<index_t> ids_buf;
    std::vector<float> log_pn_buf;
    std::vector<float> s_buf;
    errors.run([&] {  // allocations inside the capture; a failed one skips the loop's runs
      ids_buf.resize(static_cast<std::size_t>(cx.k));
      log_pn_buf.resize(static_cast<std::size_t>(cx.k));
      s_buf.resize(static_cast<std::size_t>(cx.k));
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < batch; ++i) {
      errors.run([&] {
        query_negatives(cx, in, i, ids_buf, log_pn_buf);
        const index_t y = in.ids[static_cast<std::size_t>(i)];
        const double log_excl =
            cx.cfg->exclude_positive ? std::log1p(-cx.sampler->prob(y)) : 0.0;
        kt.gather_dots(cx.bank.data, cx.bank.stride, dim, ids_buf.data(), cx.k, in.f + i * in.f_stride,
                       s_buf.data());
        Lse lse;
        for (std::size_t k = 0; k < static_cast<std::size_t>(cx.k); ++k)
          lse.add(s_buf[k] * inv_tau - log_pn_buf[k] + log_excl);
        per_query[static_cast<std::size_t>(i)] = lse;
      });
    }
  }
  errors.rethrow("the engine's Z estimate");
  Lse total;
  for (const auto& q : per_query) total.merge(q);
  return total.value() - std::log(static_cast<double>(batch) * static_cast<double>(cx.k));
}

/// NCE or InfoNCE, per-sample negatives: one fused pass over each query's K + 1 rows (the
/// dispatched kernel kt.per_sample_query, one call per query).
void per_sample_kernel(const KernelContext& cx, const StepInput& in, index_t batch, std::vector<QueryOut>& out,
                       const kernels::Table& kt) {
  const double tau = cx.cfg->tau;
  kernels::PerSampleQuery base{};
  base.bank = cx.bank.data;
  base.stride = cx.bank.stride;
  base.dim = cx.bank.dim;
  base.k = cx.k;
  base.inv_tau = 1.0 / tau;
  base.tau = tau;
  base.log_z = cx.log_z;
  base.log_k = std::log(static_cast<double>(cx.k));
  base.coef_scale = 1.0 / (static_cast<double>(batch) * tau);
  base.info = cx.cfg->objective == Objective::info_nce;
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<index_t> ids_buf;
    std::vector<float> log_pn_buf;
    errors.run([&] {  // allocations inside the capture; a failed one skips the loop's runs
      ids_buf.resize(static_cast<std::size_t>(cx.k));
      log_pn_buf.resize(static_cast<std::size_t>(cx.k));
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < batch; ++i) {
      errors.run([&] {
        query_negatives(cx, in, i, ids_buf, log_pn_buf);
        const index_t y = in.ids[static_cast<std::size_t>(i)];
        const double p_y = cx.sampler->prob(y);
        kernels::PerSampleQuery qi = base;
        qi.ids = ids_buf.data();
        qi.log_pn = log_pn_buf.data();
        qi.f = in.f + i * in.f_stride;
        qi.g = in.grad + i * in.g_stride;
        qi.vy = cx.bank.row(y);
        qi.y = y;
        qi.log_p_y = std::log(p_y);
        qi.log_excl = cx.cfg->exclude_positive ? std::log1p(-p_y) : 0.0;
        kernels::QueryResult r;
        kt.per_sample_query(qi, r);
        QueryOut q;
        q.loss = r.loss;
        q.p_pos = r.p_pos;
        q.sum_exp_a = r.sum_exp_a;
        q.collisions = r.collisions;
        out[static_cast<std::size_t>(i)] = q;
      });
    }
  }
  errors.rethrow("the engine's per-sample kernel");
}

/// NCE or InfoNCE with one set of K negatives for the whole batch: gather once, two GEMMs.
/// Returns the log Z it used (estimated from this batch when cx.log_z is NaN).
double shared_kernel(const KernelContext& cx, const StepInput& in, index_t batch, std::vector<QueryOut>& out,
                     const kernels::Table& kt) {
  const index_t dim = cx.bank.dim;
  const index_t k = cx.k;
  const double tau = cx.cfg->tau;
  const double inv_tau = 1.0 / tau;
  const double coef_scale = 1.0 / (static_cast<double>(batch) * tau);
  const bool info = cx.cfg->objective == Objective::info_nce;

  std::vector<index_t> neg(static_cast<std::size_t>(k));
  std::vector<float> log_pn(static_cast<std::size_t>(k));
  double log_excl = 0.0;
  std::vector<index_t> excluded;
  if (cx.cfg->exclude_positive) {
    excluded = unique_sorted(in.ids);
    double mass = 0.0;
    for (const auto j : excluded) mass += cx.sampler->prob(j);
    MEMBANK_CHECK(mass < 1.0, "the batch's ids carry all of the noise mass ({}): nothing is left to draw "
                  "shared negatives from with exclude_positive", mass);
    log_excl = std::log1p(-mass);
  }
  if (in.negatives) {
    std::copy_n(in.negatives->data(), k, neg.begin());
    cx.sampler->lookup(neg, log_pn);
  } else {
    cx.sampler->draw({cx.cfg->seed, in.step, 0u, detail::purpose_shared_negatives}, excluded, neg, log_pn);
  }
  // log(K P_n) per negative (conditional on the exclusion).
  Eigen::VectorXd log_kpn(k);
  for (index_t j = 0; j < k; ++j)
    log_kpn[j] = std::log(static_cast<double>(k)) + static_cast<double>(log_pn[static_cast<std::size_t>(j)]) - log_excl;

  RowMatrixf vneg(k, dim);
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < k; ++j) std::copy_n(cx.bank.row(neg[static_cast<std::size_t>(j)]), dim, vneg.row(j).data());

  RowMatrixf scores(batch, k);
  detail::ExceptionCapture errors;
  const index_t blocks = (batch + kSharedRowBlock - 1) / kSharedRowBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t blk = 0; blk < blocks; ++blk) {
    errors.run([&] {
      const index_t r0 = blk * kSharedRowBlock, rows = std::min(kSharedRowBlock, batch - r0);
      kt.gemm_abt(rows, k, dim, 1.0f, in.f + r0 * in.f_stride, in.f_stride, vneg.data(), dim,
                  scores.data() + r0 * k, k);
    });
  }
  errors.rethrow("the engine's shared-negatives kernel");

  double log_z = cx.log_z;
  Eigen::ArrayXf shift_neg;  // log Z + log(K P_n(j)), per negative (NCE)
  if (!info && std::isnan(log_z)) {
    Lse total;
    for (index_t i = 0; i < batch; ++i)
      for (index_t j = 0; j < k; ++j) total.add(scores(i, j) * inv_tau - (log_kpn[j] - std::log(double(k))));
    log_z = total.value() - std::log(static_cast<double>(batch) * static_cast<double>(k));
  }
  if (!info) shift_neg = (log_kpn.array() + log_z).cast<float>();

#pragma omp parallel for schedule(dynamic, 1)
  for (index_t blk = 0; blk < blocks; ++blk) {
    errors.run([&] {
      const index_t r0 = blk * kSharedRowBlock, rows = std::min(kSharedRowBlock, batch - r0);
      for (index_t i = r0; i < r0 + rows; ++i) {
        const float* f = in.f + i * in.f_stride;
        const index_t y = in.ids[static_cast<std::size_t>(i)];
        const float* vy = cx.bank.row(y);
        const double p_y = cx.sampler->prob(y);
        const double s_pos = kt.dot(vy, f, dim);
        QueryOut q;
        double coef_pos;
        float* srow = scores.row(i).data();  // overwritten by dL/ds (times B tau) in place
        for (const index_t neg_id : neg) q.collisions += neg_id == y;
        if (!info) {
          double sp, h, ea;
          const double a_pos = s_pos * inv_tau - log_z - std::log(static_cast<double>(k)) - std::log(p_y);
          softplus_sigmoid(a_pos, sp, h, ea);
          q.loss = sp - a_pos;
          q.p_pos = std::exp(s_pos * inv_tau - log_z);
          coef_pos = -(1.0 - h) * coef_scale;
          // Vectorised over the K negatives (the dispatched kernel).
          kt.nce_shared_row(srow, shift_neg.data(), k, static_cast<float>(inv_tau), static_cast<float>(coef_scale),
                            &q.loss, &q.sum_exp_a);
        } else {
          const double l_pos = s_pos * inv_tau - std::log(p_y);
          const double log_k = std::log(static_cast<double>(k));
          double m = l_pos;
          for (index_t j = 0; j < k; ++j) m = std::max(m, srow[j] * inv_tau - (log_kpn[j] - log_k));
          double total = std::exp(l_pos - m), neg_total = 0.0;
          for (index_t j = 0; j < k; ++j) {
            const double w = std::exp(srow[j] * inv_tau - (log_kpn[j] - log_k) - m);
            neg_total += w;
            srow[j] = static_cast<float>(w);
          }
          total += neg_total;
          const double p_pos = std::exp(l_pos - m) / total;
          q.loss = -std::log(p_pos);
          q.p_pos = p_pos;
          q.sum_exp_a = neg_total * std::exp(m);
          const float scale = static_cast<float>(coef_scale / total);
          for (index_t j = 0; j < k; ++j) srow[j] *= scale;
          coef_pos = (p_pos - 1.0) * coef_scale;
        }
        out[static_cast<std::size_t>(i)] = q;
        float* g = in.grad + i * in.g_stride;
        for (index_t c = 0; c < dim; ++c) g[c] = static_cast<float>(coef_pos * vy[c]);
      }
      kt.gemm_ab_acc(rows, dim, k, scores.data() + r0 * k, k, vneg.data(), dim, in.grad + r0 * in.g_stride,
                     in.g_stride);
    });
  }
  errors.rethrow("the engine's shared-negatives kernel");
  return log_z;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Engine

namespace {

/// Validated, unit-norm view of the caller's features (a normalised copy when asked to normalise).
struct PreparedFeatures {
  RowMatrixf copy;           // used when normalising
  std::vector<double> norms; // of the raw rows, when normalising
  const float* data = nullptr;  // B x D unit rows: copy, or the caller's features
  index_t rows = 0, cols = 0, stride = 0;
  Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>> view() const {
    return {data, rows, cols, Eigen::OuterStride<>(stride)};
  }
};

PreparedFeatures prepare_features(FeaturesRef features, index_t batch, index_t dim, const EngineConfig& cfg) {
  check_features(features, batch, dim, "features");
  PreparedFeatures p;
  p.rows = batch;
  p.cols = dim;
  if (cfg.normalize_features) {
    p.copy.resize(batch, dim);
    p.norms.resize(static_cast<std::size_t>(batch));
    for (index_t b = 0; b < batch; ++b) {
      double sq = 0.0;
      for (index_t c = 0; c < dim; ++c) sq += static_cast<double>(features(b, c)) * features(b, c);
      p.norms[static_cast<std::size_t>(b)] = std::sqrt(sq);
      for (index_t c = 0; c < dim; ++c)
        p.copy(b, c) = static_cast<float>(features(b, c) / p.norms[static_cast<std::size_t>(b)]);
    }
    p.data = p.copy.data();
    p.stride = dim;
  } else {
    check_unit_norm(features, cfg.unit_norm_tolerance, "features");
    p.data = features.data();
    p.stride = features.outerStride();
  }
  return p;
}

/// dL/dx from dL/df for f = x / |x|: (g - f (f . g)) / |x|, in place.
void backprop_normalisation(const PreparedFeatures& p, GradRef grad) {
  for (index_t b = 0; b < grad.rows(); ++b) {
    const float* f = p.data + b * p.stride;
    double fg = 0.0;
    for (index_t c = 0; c < grad.cols(); ++c) fg += static_cast<double>(f[c]) * grad(b, c);
    const double inv = 1.0 / p.norms[static_cast<std::size_t>(b)];
    for (index_t c = 0; c < grad.cols(); ++c)
      grad(b, c) = static_cast<float>((grad(b, c) - f[c] * fg) * inv);
  }
}

/// The gradient buffer may overlap nothing the call reads or owns (aliasing contract, memory.hpp):
/// itself, the features, the ids, the negatives, the bank's rows and last-update steps.
void check_grad_alone(GradRef grad, FeaturesRef features, IdsRef ids, const NegativesRef* negatives,
                      const Bank& bank) {
  const MemoryRegion g = MemoryRegion::of_matrix(grad);
  check_no_self_overlap(g, "grad");
  check_no_overlap(g, "grad", MemoryRegion::of_matrix(features), "features");
  check_no_overlap(g, "grad", MemoryRegion::of_span(ids), "ids");
  if (negatives) check_no_overlap(g, "grad", MemoryRegion::of_matrix(*negatives), "negatives");
  bank.check_no_overlap(g, "grad");
}

/// The engine's copy of caller negatives (the kernels read them as a dense B x K matrix).
RowMatrixi copy_negatives(NegativesRef negatives) {
  require_memory(mul_sat(negatives.rows(), mul_sat(negatives.cols(), 8)),
                 fmt::format("a copy of negatives ({} x {})", negatives.rows(), negatives.cols()));
  return negatives;
}

}  // namespace

StepStats Engine::step(FeaturesRef features, IdsRef ids, GradRef grad, bool update) {
  check_grad_alone(grad, features, ids, nullptr, bank_);
  return detail::translate_bad_alloc("Engine::step", [&] { return run(features, ids, nullptr, grad, update); });
}

StepStats Engine::step_with_negatives(FeaturesRef features, IdsRef ids, NegativesRef negatives, GradRef grad,
                                      bool update) {
  check_grad_alone(grad, features, ids, &negatives, bank_);
  return detail::translate_bad_alloc("Engine::step_with_negatives", [&] {
    const RowMatrixi neg = copy_negatives(negatives);
    return run(features, ids, &neg, grad, update);
  });
}

StepStats Engine::evaluate(FeaturesRef features, IdsRef ids, NegativesRef negatives, GradRef grad) const {
  check_grad_alone(grad, features, ids, &negatives, bank_);
  return detail::translate_bad_alloc("Engine::evaluate", [&] {
    const RowMatrixi neg = copy_negatives(negatives);
    return compute(features, ids, &neg, grad).stats;
  });
}

RowMatrixi Engine::sample(IdsRef ids, std::int64_t step) const {
  return detail::translate_bad_alloc("Engine::sample", [&] { return sample_impl(ids, step); });
}

RowMatrixi Engine::sample_impl(IdsRef ids, std::int64_t step) const {
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id");
  check_ids(ids, bank_.size(), "ids");
  const auto batch = static_cast<index_t>(ids.size());
  const index_t k = config_.k;
  if (config_.negatives == NegativesMode::shared) {
    RowMatrixi out(1, k);
    std::vector<float> log_pn(static_cast<std::size_t>(k));
    std::vector<index_t> excluded;
    if (config_.exclude_positive) excluded = unique_sorted(ids);
    sampler_->draw({config_.seed, step, 0u, detail::purpose_shared_negatives}, excluded,
                   std::span<index_t>(out.data(), static_cast<std::size_t>(k)), log_pn);
    return out;
  }
  require_memory(add_sat(mul_sat(batch, mul_sat(k, 8)), mul_sat(omp_get_max_threads(), mul_sat(k, 4))),
                 fmt::format("sample: B x K = {} x {} negatives", batch, k));
  RowMatrixi out(batch, k);
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> log_pn;
    errors.run([&] { log_pn.resize(static_cast<std::size_t>(k)); });  // inside the capture
#pragma omp for schedule(static)
    for (index_t i = 0; i < batch; ++i) {
      errors.run([&] {
        const index_t y = ids[static_cast<std::size_t>(i)];
        const std::span<const index_t> excl =
            config_.exclude_positive ? std::span<const index_t>(&y, 1) : std::span<const index_t>();
        sampler_->draw({config_.seed, step, static_cast<std::uint32_t>(i), detail::purpose_negatives}, excl,
                       std::span<index_t>(out.row(i).data(), static_cast<std::size_t>(k)), log_pn);
      });
    }
  }
  errors.rethrow("Engine::sample");
  return out;
}

void Engine::update(FeaturesRef features, IdsRef ids) {
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id");
  check_ids(ids, bank_.size(), "ids");
  detail::translate_bad_alloc("Engine::update", [&] {
    const PreparedFeatures p = prepare_features(features, static_cast<index_t>(ids.size()), bank_.dim(), config_);
    // Features that are rows of the bank are copied by momentum_update before it writes.
    bank_.momentum_update(ids, p.view(), config_.momentum, step_);
  });
}

Engine::Computed Engine::compute(FeaturesRef features, IdsRef ids, const RowMatrixi* negatives, GradRef grad) const {
  // ---- validation: nothing below it throws for a caller error after a mutation
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id (B >= 1)");
  const auto batch = static_cast<index_t>(ids.size());
  const index_t dim = bank_.dim();
  MEMBANK_CHECK(grad.rows() == batch && grad.cols() == dim, "grad has shape {} x {}: expected {} x {} (B x D)",
                grad.rows(), grad.cols(), batch, dim);
  check_ids(ids, bank_.size(), "ids");
  const index_t k_used =
      negatives && config_.objective != Objective::full_softmax ? negatives->cols() : config_.k;
  require_memory(step_scratch_bytes(config_, batch, dim, k_used, omp_get_max_threads()),
                 fmt::format("a step of B = {} queries with K = {} negatives (D = {}, {} threads)", batch, k_used, dim,
                             omp_get_max_threads()));
  const PreparedFeatures prepared = prepare_features(features, batch, dim, config_);
  if (config_.objective != Objective::full_softmax) {
    // A positive the sampler can never draw has no finite NCE / InfoNCE term.
    std::vector<float> log_py(ids.size());
    sampler_->lookup(ids, log_py);
    for (std::size_t b = 0; b < ids.size(); ++b)
      MEMBANK_CHECK(std::isfinite(log_py[b]), "ids[{}] = {} has P_n = 0 under the {} sampler: expected positives "
                    "with a non-zero noise weight", b, ids[b], to_string(sampler_->kind()));
  }

  const bool full = config_.objective == Objective::full_softmax;
  const bool shared = config_.negatives == NegativesMode::shared;
  if (negatives && !full) {
    const index_t want_rows = shared ? 1 : batch;
    MEMBANK_CHECK(negatives->rows() == want_rows && negatives->cols() >= 1,
                  "negatives has shape {} x {}: expected {} x K with K >= 1 ({} negatives)", negatives->rows(),
                  negatives->cols(), want_rows, to_string(config_.negatives));
    for (index_t i = 0; i < negatives->rows(); ++i)
      for (index_t j = 0; j < negatives->cols(); ++j) {
        const index_t v = (*negatives)(i, j);
        MEMBANK_CHECK(v >= 0 && v < bank_.size(), "negatives({}, {}) = {} is out of range: expected 0 <= id < N = {}",
                      i, j, v, bank_.size());
        MEMBANK_CHECK(!config_.exclude_positive || shared || v != ids[static_cast<std::size_t>(i)],
                      "negatives({}, {}) = {} equals its query's positive, with exclude_positive set", i, j, v);
        MEMBANK_CHECK(!config_.exclude_positive || !shared || std::find(ids.begin(), ids.end(), v) == ids.end(),
                      "negatives(0, {}) = {} is an id of the batch, with exclude_positive set (shared negatives "
                      "exclude every positive of the batch)", j, v);
      }
    // A noise sample the sampler can never draw (P_n = 0) has no NCE term: refuse it.
    std::vector<float> log_pn(static_cast<std::size_t>(negatives->cols()));
    for (index_t i = 0; i < negatives->rows(); ++i) {
      sampler_->lookup(std::span<const index_t>(negatives->row(i).data(), log_pn.size()), log_pn);
      for (index_t j = 0; j < negatives->cols(); ++j)
        MEMBANK_CHECK(std::isfinite(log_pn[static_cast<std::size_t>(j)]),
                      "negatives({}, {}) = {} has P_n = 0 under the {} sampler: expected ids the sampler can draw",
                      i, j, (*negatives)(i, j), to_string(sampler_->kind()));
    }
  }

  Computed result;
  StepStats& stats = result.stats;
  stats.step = step_;
  if (full) {
    // The exact reference needs no sampling and no Z state.
    stats.loss = full_softmax_loss(bank_.view(), prepared.view(), ids, config_.tau, grad, &stats.z,
                                   &stats.mean_p_positive, config_.unit_norm_tolerance);
    stats.z_estimate = kNaN;
  } else {
    KernelContext cx{bank_.view(), sampler_.get(), &config_, kNaN,
                     negatives ? negatives->cols() : config_.k};
    const bool nce = config_.objective == Objective::nce;
    const kernels::Table& kt = kernels::table();  // the instruction set, picked once per step
    if (nce && partition_.initialised) cx.log_z = partition_.log_z;
    StepInput in{prepared.data, prepared.stride, ids, negatives, step_, grad.data(), grad.outerStride()};
    std::vector<QueryOut> out(static_cast<std::size_t>(batch));
    double log_z_used = cx.log_z;
    if (shared) {
      log_z_used = shared_kernel(cx, in, batch, out, kt);
    } else {
      if (nce && std::isnan(cx.log_z)) cx.log_z = estimate_log_z_per_sample(cx, in, batch, kt);
      log_z_used = cx.log_z;
      per_sample_kernel(cx, in, batch, out, kt);
    }
    double loss = 0.0, p_pos = 0.0, sum_exp = 0.0;
    index_t collisions = 0;
    for (const auto& q : out) {
      loss += q.loss;
      p_pos += q.p_pos;
      sum_exp += q.sum_exp_a;
      collisions += q.collisions;
    }
    stats.loss = loss / static_cast<double>(batch);
    stats.mean_p_positive = p_pos / static_cast<double>(batch);
    stats.negative_collision_fraction =
        static_cast<double>(collisions) / (static_cast<double>(batch) * static_cast<double>(cx.k));
    if (nce) {
      // sum_k exp(a_k) = sum_k exp(s/tau) / (K P_n Z): Zhat = Z * sum / B.
      const double log_z_hat = log_z_used + std::log(sum_exp / static_cast<double>(batch));
      stats.z = std::exp(log_z_used);
      stats.z_estimate = std::exp(log_z_hat);
      // The Z state after this step.
      result.partition.initialised = true;
      result.partition.log_z = log_z_used;
      if (partition_.initialised && config_.z_policy == ZPolicy::ema) {
        const double a = config_.z_ema;
        const double x = std::log(a) + partition_.log_z, yv = std::log1p(-a) + log_z_hat;
        const double mx = std::max(x, yv);
        result.partition.log_z = mx + std::log(std::exp(x - mx) + std::exp(yv - mx));
      }
    } else {
      stats.z = kNaN;
      stats.z_estimate = sum_exp / (static_cast<double>(batch) * static_cast<double>(cx.k));
    }
  }
  if (config_.normalize_features) {
    backprop_normalisation(prepared, grad);
    result.normalized = prepared.copy;
  }
  return result;
}

StepStats Engine::run(FeaturesRef features, IdsRef ids, const RowMatrixi* negatives, GradRef grad, bool update) {
  Computed result = compute(features, ids, negatives, grad);
  // ---- commit: the bank first (it may still throw, before writing), then Z and the counter.
  // The rows are refreshed with the unit features the loss saw (the engine's copy if it normalised);
  // features that are rows of the bank itself are copied by momentum_update before it writes.
  if (update)
    bank_.momentum_update(ids, result.normalized.size() ? FeaturesRef(result.normalized) : features,
                          config_.momentum, step_);
  if (result.partition.initialised) {
    partition_.initialised = true;
    partition_.log_z = result.partition.log_z;
  }
  ++step_;
  return result.stats;
}

}  // namespace membank
