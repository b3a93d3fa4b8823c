#include "step_kernels.hpp"

#include <membank/error.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"

#include <omp.h>

#include <algorithm>
#include <memory>

namespace membank::detail {

void Lse::add(double x) {
  if (!(x > -std::numeric_limits<double>::infinity())) return;
  if (x > max) {
    sum = sum * std::exp(max - x) + 1.0;
    max = x;
  } else {
    sum += std::exp(x - max);
  }
}

void Lse::merge(const Lse& o) {
  if (o.sum == 0.0) return;
  if (o.max > max) {
    sum = sum * std::exp(max - o.max) + o.sum;
    max = o.max;
  } else {
    sum += o.sum * std::exp(o.max - max);
  }
}

double log_z_hat(double log_sum, double draws, index_t n) {
  return log_sum + std::log(static_cast<double>(n)) - std::log(draws);
}

kernels::ObjectiveParams objective_params(const EngineConfig& cfg, index_t k, index_t n, double log_z) {
  kernels::ObjectiveParams p{};
  p.objective = cfg.objective;
  p.inv_tau = 1.0 / cfg.tau;
  p.k = static_cast<double>(k);
  p.k_entries = k;
  p.log_z = log_z;
  p.nce_shift = std::log(static_cast<double>(n)) - std::log(static_cast<double>(k)) - log_z;
  p.tau_plus = cfg.tau_plus;
  p.beta = cfg.beta;
  p.detach_weights = cfg.detach_weights;
  p.kernel_t = cfg.kernel_t;
  p.gamma = cfg.gamma;
  p.margin = cfg.effective_margin();
  return p;
}

std::vector<index_t> shared_exclusion(const EngineConfig& cfg, IdsRef ids) {
  if (!cfg.exclude_positive || cfg.exclude_same_label) return {};
  std::vector<index_t> u(ids.begin(), ids.end());
  std::sort(u.begin(), u.end());
  u.erase(std::unique(u.begin(), u.end()), u.end());
  return u;
}

void shared_draws(const NoiseSampler& sampler, const EngineConfig& cfg, IdsRef batch_ids, std::int64_t step,
                  const index_t* given, std::span<index_t> ids, std::span<float> lw, QueryRef query) {
  const std::vector<index_t> excluded = shared_exclusion(cfg, batch_ids);
  double log_kept = 0.0;
  if (!excluded.empty()) {
    double mass = 0.0;
    for (const auto j : excluded) mass += sampler.prob_for(j, query);
    MEMBANK_CHECK(mass < 1.0, "the batch's ids carry all of the noise mass ({}): nothing is left to draw "
                  "shared negatives from with exclude_positive", mass);
    log_kept = std::log1p(-mass);
  }
  if (given) {
    std::copy_n(given, ids.size(), ids.begin());
    for (std::size_t j = 0; j < ids.size(); ++j)
      MEMBANK_CHECK(!std::binary_search(excluded.begin(), excluded.end(), ids[j]),
                    "negatives(0, {}) = {} is an id of the batch, with exclude_positive set (shared negatives "
                    "exclude every positive of the batch)", j, ids[j]);
    sampler.lookup_for(query, ids, lw);
  } else {
    DrawCursor cursor{{cfg.seed, step, 0u, purpose_shared_negatives}, Exclusion{excluded},
                      static_cast<index_t>(ids.size())};
    cursor.query = query;
    sampler.draw_next(cursor, ids, lw);
  }
  const double log_n = std::log(static_cast<double>(sampler.size()));
  if (sampler.biased())  // a biased sampler's draws weigh as uniform ones
    std::fill(lw.begin(), lw.end(), 0.0f);
  else
    for (auto& x : lw) x = static_cast<float>(log_kept - log_n - x);  // log P_n in, lw out
}

std::vector<std::int32_t> query_classes_of(const EngineConfig& cfg, IdsRef ids, const std::int32_t* classes) {
  std::vector<std::int32_t> out;
  if (!cfg.exclude_same_label) return out;
  out.resize(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) out[i] = classes[ids[i]];
  return out;
}

std::unique_ptr<Conditioned> condition_batch(const NoiseSampler& sampler, const BankView& bank, const float* f,
                                             index_t stride, index_t batch, const std::int32_t* classes,
                                             std::span<const std::int32_t> query_classes) {
  if (query_classes.empty()) return sampler.condition(bank, f, stride, batch, bank.dim);
  return sampler.condition_excluding(bank, f, stride, batch, bank.dim, classes, query_classes);
}

QueryExclusion exclusion_of(const KernelContext& cx, const index_t& y, QueryRef query) {
  QueryExclusion e;
  if (cx.cfg->exclude_same_label) {
    const std::int32_t c = cx.classes[y];
    e.exclusion.classes = cx.classes;
    e.exclusion.cls = c;
    e.log_kept = std::log1p(-(cx.query_class_mass && query.batch ? cx.query_class_mass[query.row] : cx.class_mass[c]));
  } else if (cx.cfg->exclude_positive) {
    e.exclusion.ids = std::span<const index_t>(&y, 1);
    e.log_kept = std::log1p(-cx.sampler->prob_for(y, query));
  }
  return e;
}

namespace {

/// The per-sample kernel's refill (kernels::Refill): draws [from, to) of query i, drawn through its
/// cursor just before the kernel reads their rows, or copied from the caller's matrix.
struct QueryDraws {
  const KernelContext* cx;
  const StepInput* in;
  index_t i;
  DrawCursor cursor;
  index_t* ids;
  float* log_pn;
  QueryDraws(const KernelContext& c, const StepInput& input, index_t query, const Exclusion& excluded,
             index_t* ids_out, float* log_pn_out)
      : cx(&c), in(&input), i(query),
        cursor{{c.cfg->seed, input.step, static_cast<std::uint32_t>(query + input.row0), purpose_negatives}, excluded,
               c.k},
        ids(ids_out), log_pn(log_pn_out) {
    cursor.query = c.query(query);
  }
  static void refill(void* self, index_t from, index_t to) {
    auto& d = *static_cast<QueryDraws*>(self);
    const auto n = static_cast<std::size_t>(to - from);
    const std::span<index_t> ids(d.ids + from, n);
    const std::span<float> log_pn(d.log_pn + from, n);
    if (d.in->negatives) {
      std::copy_n(d.in->negatives->data() + d.i * d.in->negatives->cols() + from, n, ids.begin());
      d.cx->sampler->lookup_for(d.cursor.query, ids, log_pn);
    } else {
      d.cx->sampler->draw_next(d.cursor, ids, log_pn);
    }
    // A biased sampler's draws weigh as uniform ones: lw = lw_shift - log_pn = 0 - 0.
    if (d.cx->sampler->biased()) std::fill(log_pn.begin(), log_pn.end(), 0.0f);
  }
};

/// Per-thread scratch of the kernels (allocated inside an ExceptionCapture).
struct ThreadScratch {
  /// What the thread's kernel needs beyond the common part: a query's draws (per-sample negatives
  /// drawn block by block), nothing more (draws made beforehand), or the shared kernel's weights.
  enum class Kind { own_draws, given_draws, shared };
  std::vector<index_t> ids;
  std::vector<float> log_pn, lw, acc2, w;
  std::vector<double> d, rescale;
  std::vector<index_t> i;
  void allocate(const KernelContext& cx, bool positives_first, Kind kind) {
    const auto k = static_cast<std::size_t>(cx.k);
    if (kind == Kind::own_draws) {
      ids.resize(k);
      log_pn.resize(k);
    } else if (kind == Kind::shared) {
      lw.resize(k);
      rescale.resize(2 * ((k + 15) / 16));
    }
    acc2.resize(static_cast<std::size_t>(cx.bank.dim));
    w.resize(k + 1);
    if (positives_first) {
      d.resize(6 * (k + 2));
      i.resize(3 * (k + 1));
    }
  }
  kernels::QueryScratch view() { return {acc2.data(), w.data(), d.data(), i.data()}; }
};

/// The per-sample kernel's chunk of draws (NoiseSampler::draws_before_rows), kept by the calling
/// thread from step to step and never zeroed: a fresh one (about 4 MiB) was cleared every step.
struct ChunkDraws {
  std::unique_ptr<index_t[]> ids;
  std::unique_ptr<float[]> log_pn;
  std::size_t size = 0;
  void reserve(std::size_t n) {
    if (n <= size) return;
    ids.reset();
    log_pn.reset();
    size = 0;
    ids.reset(new index_t[n]);  // default-initialised
    log_pn.reset(new float[n]);
    size = n;
  }
};
thread_local ChunkDraws chunk_draws;

}  // namespace

double estimate_log_z_per_sample(const KernelContext& cx, const StepInput& in, index_t batch,
                                 const kernels::Table& kt) {
  return log_z_hat(lse_per_sample(cx, in, batch, kt).value(), static_cast<double>(batch) * static_cast<double>(cx.k),
                   cx.bank.rows);
}

Lse lse_per_sample(const KernelContext& cx, const StepInput& in, index_t batch, const kernels::Table& kt) {
  const index_t dim = cx.bank.dim;
  const double inv_tau = 1.0 / cx.cfg->tau;
  const double log_n = std::log(static_cast<double>(cx.bank.rows));
  std::vector<Lse> per_query(static_cast<std::size_t>(batch));
  ExceptionCapture errors;
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
        const index_t y = in.ids[static_cast<std::size_t>(i)];
        const QueryExclusion e = exclusion_of(cx, y, cx.query(i));
        QueryDraws draws(cx, in, i, e.exclusion, ids_buf.data(), log_pn_buf.data());
        QueryDraws::refill(&draws, 0, cx.k);
        kt.gather_dots(cx.bank.data, cx.bank.dtype, cx.bank.stride, dim, ids_buf.data(), cx.k, in.f + i * in.f_stride,
                       s_buf.data());
        Lse lse;
        const double shift = cx.sampler->biased() ? 0.0 : e.log_kept - log_n;  // (a biased draw's log_pn is 0)
        for (std::size_t k = 0; k < static_cast<std::size_t>(cx.k); ++k) lse.add(s_buf[k] * inv_tau + (shift - log_pn_buf[k]));
        per_query[static_cast<std::size_t>(i)] = lse;
      });
    }
  }
  errors.rethrow("the engine's Z estimate");
  Lse total;
  for (const auto& q : per_query) total.merge(q);
  return total;
}

void per_sample_kernel(const KernelContext& cx, const StepInput& in, index_t batch,
                       const kernels::ObjectiveParams& params, std::vector<kernels::QueryResult>& out,
                       const kernels::Table& kt) {
  const double log_n = std::log(static_cast<double>(cx.bank.rows));
  const bool positives_first = takes_positives_first(cx.cfg->objective);
  const bool unweighted = cx.sampler->biased();  // a biased sampler's draws and positive weigh as uniform ones
  kernels::PerSampleQuery base{};
  base.bank = cx.bank.data;
  base.dtype = cx.bank.dtype;
  base.stride = cx.bank.stride;
  base.dim = cx.bank.dim;
  base.k = cx.k;
  base.classes = cx.class_table;
  base.coef_scale = 1.0 / static_cast<double>(in.scale_batch > 0 ? in.scale_batch : batch);
  // Query i's pass, its draws made by `refill` into ids and log_pn (or made before, refill a no-op).
  const auto run_query = [&](index_t i, const QueryExclusion& e, index_t* ids, float* log_pn,
                             kernels::Refill refill, ThreadScratch& scratch) {
    const index_t y = in.ids[static_cast<std::size_t>(i)];
    kernels::PerSampleQuery q = base;
    q.ids = ids;
    q.log_pn = log_pn;
    q.refill = refill;
    q.lw_shift = unweighted ? 0.0 : e.log_kept - log_n;
    q.lw_pos = unweighted ? 0.0 : -log_n - std::log(cx.sampler->prob_for(y, cx.query(i)));
    q.f = in.f + i * in.f_stride;
    q.g = in.grad + i * in.g_stride;
    q.vy = cx.bank.row_data(y);
    q.y = y;
    q.cls = cx.classes ? cx.classes[y] : 0;
    q.scratch = scratch.view();
    kt.per_sample_query(params, q, out[static_cast<std::size_t>(i)]);
  };
  ExceptionCapture errors;
  if (!cx.sampler->draws_before_rows() || in.negatives) {
#pragma omp parallel
    {
      ThreadScratch scratch;
      // inside the capture
      errors.run([&] { scratch.allocate(cx, positives_first, ThreadScratch::Kind::own_draws); });
#pragma omp for schedule(dynamic, 1)
      for (index_t i = 0; i < batch; ++i) {
        errors.run([&] {
          const QueryExclusion e = exclusion_of(cx, in.ids[static_cast<std::size_t>(i)], cx.query(i));
          QueryDraws draws(cx, in, i, e.exclusion, scratch.ids.data(), scratch.log_pn.data());
          run_query(i, e, scratch.ids.data(), scratch.log_pn.data(), {&QueryDraws::refill, &draws}, scratch);
        });
      }
    }
  } else {
    // NoiseSampler::draws_before_rows: a chunk of queries at a time, first all their draws (about 4
    // MiB, at least a query per thread), then their rows.
    const auto k = static_cast<std::size_t>(cx.k);
    constexpr std::size_t kChunkBytes = std::size_t{4} << 20;
    const auto chunk = std::min<index_t>(
        batch, std::max<index_t>(omp_get_max_threads(),
                                 static_cast<index_t>(kChunkBytes / (k * (sizeof(index_t) + sizeof(float))))));
    ChunkDraws& buffer = chunk_draws;
    buffer.reserve(static_cast<std::size_t>(chunk) * k);
    index_t* const ids = buffer.ids.get();
    float* const log_pn = buffer.log_pn.get();
    std::vector<QueryExclusion> exclusions(static_cast<std::size_t>(chunk));
    const kernels::Refill drawn{[](void*, kernels::idx, kernels::idx) {}, nullptr};
#pragma omp parallel
    {
      ThreadScratch scratch;
      // inside the capture
      errors.run([&] { scratch.allocate(cx, positives_first, ThreadScratch::Kind::given_draws); });
      for (index_t c0 = 0; c0 < batch; c0 += chunk) {
        const index_t c1 = std::min(batch, c0 + chunk);
#pragma omp for schedule(dynamic, 1)
        for (index_t i = c0; i < c1; ++i) {
          errors.run([&] {
            const auto at = static_cast<std::size_t>(i - c0);
            // in.ids[i] by reference: the exclusion keeps a view of it
            exclusions[at] = exclusion_of(cx, in.ids[static_cast<std::size_t>(i)], cx.query(i));
            QueryDraws draws(cx, in, i, exclusions[at].exclusion, ids + at * k, log_pn + at * k);
            QueryDraws::refill(&draws, 0, cx.k);
          });
        }
#pragma omp for schedule(dynamic, 1)
        for (index_t i = c0; i < c1; ++i) {
          errors.run([&] {
            const auto at = static_cast<std::size_t>(i - c0);
            run_query(i, exclusions[at], ids + at * k, log_pn + at * k, drawn, scratch);
          });
        }
      }
    }
  }
  errors.rethrow("the engine's per-sample kernel");
}

double shared_kernel(const KernelContext& cx, const StepInput& in, index_t batch, kernels::ObjectiveParams params,
                     std::vector<kernels::QueryResult>& out, const kernels::Table& kt) {
  constexpr index_t kQueryBlock = 16;  // queries per GEMM block (fixed: results do not depend on threads)
  const index_t dim = cx.bank.dim;
  const index_t k = cx.k;
  const double inv_tau = 1.0 / cx.cfg->tau;
  const double log_n = std::log(static_cast<double>(cx.bank.rows));
  const bool same_label = cx.cfg->exclude_same_label;
  const bool positives_first = takes_positives_first(cx.cfg->objective);

  // The batch's draws. exclude_positive: none is an id of the batch (P_n conditioned on the rest);
  // exclude_same_label: each query masks the draws of its own label (weight 0, P_n unconditioned,
  // which keeps every estimate over the draws unbiased).
  std::vector<index_t> neg(static_cast<std::size_t>(k));
  std::vector<float> lw(static_cast<std::size_t>(k));
  const QueryRef mean = cx.query(batch);  // a query-dependent sampler's batch mean
  shared_draws(*cx.sampler, *cx.cfg, in.ids, in.step, in.negatives ? in.negatives->data() : nullptr, neg, lw, mean);
  std::vector<std::int32_t> neg_classes;
  if (cx.classes) {
    neg_classes.resize(static_cast<std::size_t>(k));
    for (std::size_t j = 0; j < neg.size(); ++j) neg_classes[j] = cx.classes[neg[j]];
  }
  // The weights query i sees: lw, with its own label's draws masked under exclude_same_label.
  const auto query_lw = [&](index_t i, std::vector<float>& buf) -> const float* {
    if (!same_label) return lw.data();
    const std::int32_t c = cx.classes[in.ids[static_cast<std::size_t>(i)]];
    for (std::size_t j = 0; j < lw.size(); ++j)
      buf[j] = neg_classes[j] == c ? -std::numeric_limits<float>::infinity() : lw[j];
    return buf.data();
  };

  RowMatrixf vneg(k, dim);
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < k; ++j) kt.widen(cx.bank.dtype, cx.bank.row_data(neg[static_cast<std::size_t>(j)]), vneg.row(j).data(), dim);

  RowMatrixf scores(batch, k);
  ExceptionCapture errors;
  const index_t blocks = (batch + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t blk = 0; blk < blocks; ++blk) {
    errors.run([&] {
      const index_t r0 = blk * kQueryBlock, rows = std::min(kQueryBlock, batch - r0);
      kt.gemm_abt(rows, k, dim, 1.0f, in.f + r0 * in.f_stride, in.f_stride, vneg.data(), dim,
                  scores.data() + r0 * k, k);
    });
  }
  errors.rethrow("the engine's shared-negatives kernel");

  if (params.objective == Objective::nce && std::isnan(params.log_z)) {
    std::vector<float> buf(static_cast<std::size_t>(k));
    Lse total;
    for (index_t i = 0; i < batch; ++i) {
      const float* lwi = query_lw(i, buf);
      for (index_t j = 0; j < k; ++j) total.add(scores(i, j) * inv_tau + lwi[j]);
    }
    params = objective_params(*cx.cfg, k, cx.bank.rows,
                              log_z_hat(total.value(), static_cast<double>(batch) * static_cast<double>(k),
                                        cx.bank.rows));
  }

#pragma omp parallel
  {
    ThreadScratch scratch;
    std::vector<float> vy_row;  // the positive's row, widened
    errors.run([&] {  // inside the capture
      scratch.allocate(cx, positives_first, ThreadScratch::Kind::shared);
      vy_row.resize(static_cast<std::size_t>(dim));
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t blk = 0; blk < blocks; ++blk) {
      errors.run([&] {
        const index_t r0 = blk * kQueryBlock, rows = std::min(kQueryBlock, batch - r0);
        for (index_t i = r0; i < r0 + rows; ++i) {
          const float* f = in.f + i * in.f_stride;
          const index_t y = in.ids[static_cast<std::size_t>(i)];
          const float* vy = vy_row.data();
          kt.widen(cx.bank.dtype, cx.bank.row_data(y), vy_row.data(), dim);
          kernels::SharedQuery q{};
          q.s = scores.row(i).data();  // overwritten by coef_scale dL/ds in place
          q.lw = query_lw(i, scratch.lw);
          q.neg_classes = cx.classes ? neg_classes.data() : nullptr;
          q.cls = cx.classes ? cx.classes[y] : 0;
          q.ids = neg.data();
          q.k = k;
          q.y = y;
          q.s_pos = kt.dot(vy, DType::float32, f, dim);
          q.lw_pos = cx.sampler->biased() ? 0.0 : -log_n - std::log(cx.sampler->prob_for(y, mean));
          q.coef_scale = 1.0 / static_cast<double>(batch);
          q.rescale = scratch.rescale.data();
          q.scratch = scratch.view();
          kernels::QueryResult& r = out[static_cast<std::size_t>(i)];
          kt.shared_query(params, q, r);
          float* g = in.grad + i * in.g_stride;
          const auto c_pos = static_cast<float>(r.c_pos);
          for (index_t c = 0; c < dim; ++c) g[c] = c_pos * vy[c];
        }
        kt.gemm_ab_acc(rows, dim, k, scores.data() + r0 * k, k, vneg.data(), dim, in.grad + r0 * in.g_stride,
                       in.g_stride);
      });
    }
  }
  errors.rethrow("the engine's shared-negatives kernel");
  return params.log_z;
}

void check_negatives(const Eigen::Ref<const RowMatrixi, 0, Eigen::OuterStride<>>& negatives, IdsRef ids,
                     IdsRef batch_ids, index_t n, const EngineConfig& config, const std::vector<std::int32_t>& classes,
                     const std::vector<std::int64_t>& labels, const NoiseSampler& sampler) {
  const bool shared = config.negatives == NegativesMode::shared;
  const auto want_rows = shared ? index_t{1} : static_cast<index_t>(ids.size());
  MEMBANK_CHECK(negatives.rows() == want_rows && negatives.cols() >= 1,
                "negatives has shape {} x {}: expected {} x K with K >= 1 ({} negatives)", negatives.rows(),
                negatives.cols(), want_rows, to_string(config.negatives));
  for (index_t i = 0; i < negatives.rows(); ++i)
    for (index_t j = 0; j < negatives.cols(); ++j) {
      const index_t v = negatives(i, j);
      MEMBANK_CHECK(v >= 0 && v < n, "negatives({}, {}) = {} is out of range: expected 0 <= id < N = {}", i, j, v, n);
      MEMBANK_CHECK(!config.exclude_positive || shared || v != ids[static_cast<std::size_t>(i)],
                    "negatives({}, {}) = {} equals its query's positive, with exclude_positive set", i, j, v);
      MEMBANK_CHECK(!config.exclude_same_label || shared ||
                        classes[static_cast<std::size_t>(v)] !=
                            classes[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])],
                    "negatives({}, {}) = {} has its query's label {}, with exclude_same_label set", i, j, v,
                    labels[static_cast<std::size_t>(v)]);
      MEMBANK_CHECK(!config.exclude_positive || config.exclude_same_label || !shared ||
                        std::find(batch_ids.begin(), batch_ids.end(), v) == batch_ids.end(),
                    "negatives(0, {}) = {} is an id of the batch, with exclude_positive set (shared negatives "
                    "exclude every positive of the batch)", j, v);
    }
  // A noise sample the sampler can never draw (P_n = 0) has no NCE term: refuse it.
  std::vector<float> log_pn(static_cast<std::size_t>(negatives.cols()));
  for (index_t i = 0; i < negatives.rows(); ++i) {
    sampler.lookup(std::span<const index_t>(negatives.row(i).data(), log_pn.size()), log_pn);
    for (index_t j = 0; j < negatives.cols(); ++j)
      MEMBANK_CHECK(std::isfinite(log_pn[static_cast<std::size_t>(j)]),
                    "negatives({}, {}) = {} has P_n = 0 under the {} sampler: expected ids the sampler can draw", i, j,
                    negatives(i, j), to_string(sampler.kind()));
  }
}

Partition partition_after(const EngineConfig& config, const Partition& current, double log_z_used, double log_z_hat) {
  Partition next = current;
  next.initialised = true;
  next.log_z = log_z_used;
  if (current.initialised && config.z_policy == ZPolicy::ema) {
    const double a = config.z_ema;
    const double x = std::log(a) + current.log_z, yv = std::log1p(-a) + log_z_hat;
    const double mx = std::max(x, yv);
    next.log_z = mx + std::log(std::exp(x - mx) + std::exp(yv - mx));
  }
  return next;
}

void check_restored_state(const EngineConfig& config, const Partition& current, const Partition& next,
                          std::int64_t step) {
  MEMBANK_CHECK(next.policy == config.z_policy, "partition.policy = {}: expected the engine's {}",
                to_string(next.policy), to_string(config.z_policy));
  MEMBANK_CHECK(!next.initialised || std::isfinite(next.log_z), "partition.log_z = {}: expected a finite value",
                next.log_z);
  MEMBANK_CHECK(step >= 0, "step = {}: expected a step counter >= 0", step);
  MEMBANK_CHECK(config.z_policy != ZPolicy::fixed || (next.initialised && next.log_z == current.log_z),
                "partition.log_z = {}: the fixed policy's Z is log {} = {}", next.log_z, config.z_fixed,
                current.log_z);
}

LabelClasses label_classes(std::span<const std::int64_t> labels, const NoiseSampler& sampler,
                           const EngineConfig& config) {
  MEMBANK_CHECK(static_cast<index_t>(labels.size()) == sampler.size(),
                "labels has {} entries: expected one per instance (N = {})", labels.size(), sampler.size());
  std::vector<std::int64_t> distinct(labels.begin(), labels.end());
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  MEMBANK_CHECK(distinct.size() < (std::size_t{1} << 31), "labels has {} distinct values: expected fewer than 2^31",
                distinct.size());
  LabelClasses lc;
  lc.classes.resize(labels.size());
  lc.mass.assign(distinct.size(), 0.0);
  const std::vector<double> p = sampler.probs();
  for (std::size_t j = 0; j < labels.size(); ++j) {
    const auto c = std::lower_bound(distinct.begin(), distinct.end(), labels[j]) - distinct.begin();
    lc.classes[j] = static_cast<std::int32_t>(c);
    lc.mass[static_cast<std::size_t>(c)] += p[j];
  }
  if (config.exclude_same_label)
    for (std::size_t c = 0; c < lc.mass.size(); ++c)
      MEMBANK_CHECK(lc.mass[c] < 1.0, "label {} carries all of the noise mass ({}): nothing is left to draw from "
                    "with exclude_same_label", distinct[c], lc.mass[c]);
  return lc;
}

}  // namespace membank::detail
