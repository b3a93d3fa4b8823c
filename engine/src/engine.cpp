// The Engine: its state (bank, sampler, Z, counter, labels), the checks of a step's inputs, and
// the step's orchestration: validate everything, compute loss and gradient (step_kernels.cpp, the
// dispatched kernels and the objectives under objectives/), then commit. The names and checks of the
// configuration live in config.cpp.
#include <membank/cluster_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/features.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "kernels/kernels.hpp"
#include "step_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <exception>
#include <thread>
#include <vector>

namespace membank {

using detail::PreparedFeatures;
using detail::prepare_features;
using detail::backprop_normalisation;
using detail::check_grad_alone;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

detail::KernelContext make_context(const Bank& bank, const NoiseSampler& sampler, const EngineConfig& cfg,
                                   const std::vector<std::int32_t>& classes, const std::vector<double>& mass,
                                   const std::vector<std::uint8_t>& classes8,
                                   const std::vector<std::uint16_t>& classes16, index_t k) {
  kernels::ClassTable table;
  if (!classes8.empty())
    table = {classes8.data(), 1};
  else if (!classes16.empty())
    table = {classes16.data(), 2};
  else if (!classes.empty())
    table = {classes.data(), 4};
  return {bank.view(), &sampler, &cfg, classes.empty() ? nullptr : classes.data(), table,
          mass.empty() ? nullptr : mass.data(), k};
}

/// Query i's K per-sample draws at step counter `step` (what step() draws for it), into out[0, K);
/// log_pn: K floats of scratch. The one draw shared by sample() and prefetch().
void draw_query(const detail::KernelContext& cx, std::int64_t step, index_t i, index_t y, index_t* out,
                std::vector<float>& log_pn) {
  const detail::QueryExclusion e = detail::exclusion_of(cx, y, cx.query(i));
  DrawCursor cursor{{cx.cfg->seed, step, static_cast<std::uint32_t>(i), detail::purpose_negatives}, e.exclusion,
                    cx.k};
  cursor.query = cx.query(i);
  cx.sampler->draw_next(cursor, std::span<index_t>(out, static_cast<std::size_t>(cx.k)), log_pn);
}

/// classes narrowed to T, each index < 2^(8 sizeof T).
template <class T>
std::vector<T> narrowed(const std::vector<std::int32_t>& classes) {
  std::vector<T> out(classes.size());
  for (std::size_t j = 0; j < classes.size(); ++j) out[j] = static_cast<T>(classes[j]);
  return out;
}

}  // namespace

void Engine::check_sampler(const NoiseSampler& sampler, const EngineConfig& config) {
  MEMBANK_CHECK(!sampler.biased() || config.allow_biased_sampler || !needs_valid_noise(config.objective),
                "objective {} with the {} sampler: its estimate needs draws with a valid P_n, and the {} sampler is "
                "biased (q = 0 outside each query's ring). Set allow_biased_sampler to train on its draws weighed as "
                "uniform ones (the hard-negative methods' loss), or use contrastive or triplet, or an unbiased sampler",
                to_string(config.objective), to_string(sampler.kind()), to_string(sampler.kind()));
}

void Engine::check_labels_present() const {
  MEMBANK_CHECK(!needs_labels(config_.objective) || !labels_.empty(),
                "objective {} needs labels: give the engine one label per instance (labels=, set_labels)",
                to_string(config_.objective));
  MEMBANK_CHECK(!config_.exclude_same_label || !labels_.empty(),
                "exclude_same_label needs labels: give the engine one label per instance (labels=, set_labels)");
}

Engine::Engine(Bank bank, std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
               std::vector<std::int64_t> labels)
    : bank_(std::move(bank)), sampler_(std::move(sampler)), config_(config) {
  MEMBANK_CHECK(sampler_ != nullptr, "sampler is null: expected a NoiseSampler over the bank's N = {} rows",
                bank_.size());
  MEMBANK_CHECK(sampler_->size() == bank_.size(), "sampler has N = {}: expected the bank's N = {}",
                sampler_->size(), bank_.size());
  config_.validate(bank_.size(), bank_.dim());
  check_sampler(*sampler_, config_);
  if (const auto* cs = dynamic_cast<const ClusterSampler*>(sampler_.get()))
    MEMBANK_CHECK(cs->centroids().cols() == bank_.dim(), "the cluster sampler's centroids have D = {}: expected "
                  "the bank's D = {}", cs->centroids().cols(), bank_.dim());
  MEMBANK_CHECK(loss_driven_sampler() == nullptr || config_.objective != Objective::full_softmax,
                "a dynamic sampler with the loss_ema drive needs per-query sampled losses: objective full_softmax "
                "has none (use the drive none and set_sampler_weights)");
  partition_.policy = config_.z_policy;
  if (config_.z_policy == ZPolicy::fixed) {
    partition_.initialised = true;
    partition_.log_z = std::log(config_.z_fixed);
  }
  if (!labels.empty()) set_labels(labels);
}

/// A next step's draws, made by a background thread.
struct Engine::Prefetch {
  std::vector<index_t> ids;
  std::int64_t step = 0;
  EngineConfig config;         ///< the worker's own copy (an Engine may move while it runs)
  RowMatrixi negatives;        ///< B x K, written by the worker only
  std::exception_ptr error;    ///< the worker's failure (an allocation): the step then draws itself
  std::thread worker;
  ~Prefetch() {
    if (worker.joinable()) worker.join();
  }
};

Engine::~Engine() { prefetch_.reset(); }
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

void Engine::discard_prefetch() { prefetch_.reset(); }

bool Engine::prefetch(IdsRef next_ids) {
  MEMBANK_CHECK(!next_ids.empty(), "next_ids is empty: expected the next batch's ids (at least one)");
  check_ids(next_ids, bank_.size(), "next_ids");
  check_labels_present();
  discard_prefetch();
  if (config_.negatives == NegativesMode::shared || config_.objective == Objective::full_softmax ||
      sampler_->query_dependent())
    return false;
  auto p = detail::translate_bad_alloc("Engine::prefetch", [&] {
    auto q = std::make_unique<Prefetch>();
    q->ids.assign(next_ids.begin(), next_ids.end());
    q->step = step_;
    q->config = config_;
    q->negatives.resize(static_cast<index_t>(next_ids.size()), config_.k);
    return q;
  });
  // The worker reads the sampler and the class tables (heap objects that stay put when the Engine
  // moves, and that nothing changes while a prefetch is held: set_labels discards it first) and its
  // own copies; it writes only p->negatives. One thread, no OpenMP team: the caller's compute has the
  // others.
  detail::KernelContext cx =
      make_context(bank_, *sampler_, p->config, classes_, class_mass_, classes8_, classes16_, config_.k);
  Prefetch* const out = p.get();
  p->worker = std::thread([out, cx] {
    try {
      std::vector<float> log_pn(static_cast<std::size_t>(cx.k));
      for (index_t i = 0; i < out->negatives.rows(); ++i)
        draw_query(cx, out->step, i, out->ids[static_cast<std::size_t>(i)], out->negatives.row(i).data(), log_pn);
    } catch (...) {
      out->error = std::current_exception();
    }
  });
  prefetch_ = std::move(p);
  return true;
}

void Engine::check_labels(std::span<const std::int64_t> labels, const NoiseSampler& sampler,
                          const EngineConfig& config) {
  detail::label_classes(labels, sampler, config);
}

void Engine::set_labels(std::span<const std::int64_t> labels) {
  discard_prefetch();  // its worker reads the class tables
  detail::LabelClasses lc = detail::label_classes(labels, *sampler_, config_);
  labels_.assign(labels.begin(), labels.end());
  const std::size_t count = lc.mass.size();
  std::vector<std::uint8_t> c8 = count <= 256 ? narrowed<std::uint8_t>(lc.classes) : std::vector<std::uint8_t>{};
  std::vector<std::uint16_t> c16 =
      count > 256 && count <= 65536 ? narrowed<std::uint16_t>(lc.classes) : std::vector<std::uint16_t>{};
  classes_ = std::move(lc.classes);
  class_mass_ = std::move(lc.mass);
  classes8_ = std::move(c8);
  classes16_ = std::move(c16);
}

DynamicSampler* Engine::loss_driven_sampler() const {
  if (sampler_ == nullptr || sampler_->kind() != SamplerKind::dynamic) return nullptr;
  auto* s = static_cast<DynamicSampler*>(sampler_.get());
  return s->params().drive == DynamicSampler::Drive::loss_ema ? s : nullptr;
}

void Engine::refresh_class_mass() {
  // Only exclude_same_label reads the masses; they are summed afresh (not adjusted) so that they stay
  // a pure function of the weights, as a resumed run computes them.
  if (labels_.empty() || !config_.exclude_same_label) return;
  class_mass_ = detail::label_classes(labels_, *sampler_, config_).mass;
}

void Engine::set_sampler_weights(std::span<const index_t> ids, std::span<const double> weights) {
  MEMBANK_CHECK(sampler_->kind() == SamplerKind::dynamic,
                "set_sampler_weights: the engine's sampler is {}: expected a dynamic sampler", to_string(sampler_->kind()));
  auto& s = static_cast<DynamicSampler&>(*sampler_);
  discard_prefetch();  // its draws used the old weights
  detail::translate_bad_alloc("Engine::set_sampler_weights", [&] {
    std::vector<double> old(ids.size());
    for (std::size_t k = 0; k < ids.size(); ++k)
      if (ids[k] >= 0 && ids[k] < s.size()) old[k] = s.weights()[static_cast<std::size_t>(ids[k])];
    s.set_weights(ids, weights);  // checks everything before it changes anything
    if (labels_.empty() || !config_.exclude_same_label) return;
    try {
      refresh_class_mass();
    } catch (...) {
      // A label now carries all of the mass: the old weights give back the old sampler, bit for bit.
      std::vector<index_t> back(ids.rbegin(), ids.rend());
      std::vector<double> values(old.rbegin(), old.rend());
      s.set_weights(back, values);
      throw;
    }
  });
}

void Engine::restore_state(const Partition& partition, std::int64_t step) {
  discard_prefetch();
  detail::check_restored_state(config_, partition_, partition, step);
  partition_ = partition;
  step_ = step;
}

// ---------------------------------------------------------------------------------------------
// Engine

namespace {

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
  return detail::translate_bad_alloc("Engine::sample", [&] { return sample_impl(bank_, ids, step, nullptr); });
}

RowMatrixi Engine::sample(IdsRef ids, std::int64_t step, FeaturesRef features) const {
  return detail::translate_bad_alloc("Engine::sample", [&] { return sample_impl(bank_, ids, step, &features); });
}

void Engine::refresh_sampler() {
  auto* cs = dynamic_cast<ClusterSampler*>(sampler_.get());
  MEMBANK_CHECK(cs != nullptr, "refresh_sampler: the engine's {} sampler has no clusters to refresh: expected a "
                "cluster sampler", to_string(sampler_->kind()));
  discard_prefetch();
  cs->refresh(bank_.view(), step_);
}

RowMatrixi Engine::sample_impl(const Bank& bank, IdsRef ids, std::int64_t step, const FeaturesRef* features) const {
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id");
  check_ids(ids, bank.size(), "ids");
  const auto batch = static_cast<index_t>(ids.size());
  const index_t k = config_.k;
  // A query-dependent sampler draws from q(. | f): condition it on the (prepared) features.
  std::unique_ptr<Conditioned> conditioned;
  if (sampler_->query_dependent()) {
    MEMBANK_CHECK(features != nullptr, "the {} sampler's draws depend on the queries: pass the step's features "
                  "to sample(ids, step, features)", to_string(sampler_->kind()));
    MEMBANK_CHECK(features->rows() == batch, "features has {} rows: expected one per id (B = {})", features->rows(),
                  batch);
    check_labels_present();  // (exclude_same_label conditions on the queries' classes)
    const PreparedFeatures p = prepare_features(*features, batch, bank.dim(), config_);
    conditioned = detail::condition_batch(*sampler_, bank.view(), p.data, p.stride, batch, classes_.data(),
                                          detail::query_classes_of(config_, ids, classes_.data()));
  }
  if (config_.negatives == NegativesMode::shared) {
    RowMatrixi out(1, k);
    std::vector<float> log_pn(static_cast<std::size_t>(k));
    const std::vector<index_t> excluded = detail::shared_exclusion(config_, ids);
    DrawCursor cursor{{config_.seed, step, 0u, detail::purpose_shared_negatives}, Exclusion{excluded}, k};
    cursor.query = {conditioned.get(), conditioned ? batch : 0};
    sampler_->draw_next(cursor, std::span<index_t>(out.data(), static_cast<std::size_t>(k)), log_pn);
    return out;
  }
  require_memory(add_sat(mul_sat(batch, mul_sat(k, 8)), mul_sat(omp_get_max_threads(), mul_sat(k, 4))),
                 fmt::format("sample: B x K = {} x {} negatives", batch, k));
  check_labels_present();
  detail::KernelContext cx = make_context(bank, *sampler_, config_, classes_, class_mass_, classes8_, classes16_, k);
  cx.conditioned = conditioned.get();
  RowMatrixi out(batch, k);
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> log_pn;
    errors.run([&] { log_pn.resize(static_cast<std::size_t>(k)); });  // inside the capture
#pragma omp for schedule(static)
    for (index_t i = 0; i < batch; ++i) {
      errors.run([&] { draw_query(cx, step, i, ids[static_cast<std::size_t>(i)], out.row(i).data(), log_pn); });
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
    bank_.momentum_update(ids, p.view(), config_.momentum, step_, config_.rounding, config_.seed);
  });
}

Engine::Computed Engine::compute_on(const Bank& bank, const Partition& partition, FeaturesRef features, IdsRef ids,
                                    const RowMatrixi* negatives, GradRef grad, bool own_draws) const {
  // ---- validation: nothing below it throws for a caller error after a mutation
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id (B >= 1)");
  const auto batch = static_cast<index_t>(ids.size());
  const index_t dim = bank.dim();
  MEMBANK_CHECK(grad.rows() == batch && grad.cols() == dim, "grad has shape {} x {}: expected {} x {} (B x D)",
                grad.rows(), grad.cols(), batch, dim);
  check_ids(ids, bank.size(), "ids");
  const index_t k_used =
      negatives && config_.objective != Objective::full_softmax ? negatives->cols() : config_.k;
  require_memory(step_scratch_bytes(config_, batch, dim, k_used, omp_get_max_threads()),
                 fmt::format("a step of B = {} queries with K = {} negatives (D = {}, {} threads)", batch, k_used, dim,
                             omp_get_max_threads()));
  const PreparedFeatures prepared = prepare_features(features, batch, dim, config_);
  check_labels_present();
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
  if (negatives && !full && !own_draws)
    detail::check_negatives(*negatives, ids, ids, bank.size(), config_, classes_, labels_, *sampler_);

  Computed result;
  StepStats& stats = result.stats;
  stats.step = step_;
  if (full) {
    // The exact reference needs no sampling and no Z state.
    stats.loss = full_softmax_loss(bank.view(), prepared.view(), ids, config_.tau, grad, &stats.z,
                                   &stats.mean_p_positive, config_.unit_norm_tolerance);
    stats.z_estimate = kNaN;
  } else {
    const index_t k = negatives ? negatives->cols() : config_.k;
    detail::KernelContext cx = make_context(bank, *sampler_, config_, classes_, class_mass_, classes8_, classes16_, k);
    // A query-dependent sampler's q(. | f_i) for this batch's features (and their mean, row B).
    const std::vector<std::int32_t> query_classes =
        sampler_->query_dependent() ? detail::query_classes_of(config_, ids, classes_.data()) : std::vector<std::int32_t>();
    const std::unique_ptr<Conditioned> conditioned =
        sampler_->query_dependent()
            ? detail::condition_batch(*sampler_, bank.view(), prepared.data, prepared.stride, batch, classes_.data(),
                                      query_classes)
            : nullptr;
    cx.conditioned = conditioned.get();
    // exclude_same_label under q(. | f): each query's label mass, the conditioning of its draws.
    std::vector<double> query_class_mass;
    if (conditioned && config_.exclude_same_label && !shared) {
      query_class_mass.resize(query_classes.size());
      sampler_->class_mass_given(*conditioned, classes_.data(), static_cast<index_t>(class_mass_.size()), query_classes,
                                 query_class_mass);
      cx.query_class_mass = query_class_mass.data();
    }
    const bool nce = config_.objective == Objective::nce;
    const kernels::Table& kt = kernels::table();  // the instruction set, picked once per step
    const detail::StepInput in{prepared.data, prepared.stride, ids, negatives, step_, grad.data(), grad.outerStride()};
    std::vector<kernels::QueryResult> out(static_cast<std::size_t>(batch));
    double log_z = nce && partition.initialised ? partition.log_z : kNaN;
    if (shared) {
      log_z = detail::shared_kernel(cx, in, batch, detail::objective_params(config_, k, bank.size(), log_z), out, kt);
    } else {
      if (nce && std::isnan(log_z)) log_z = detail::estimate_log_z_per_sample(cx, in, batch, kt);
      detail::per_sample_kernel(cx, in, batch, detail::objective_params(config_, k, bank.size(), log_z), out, kt);
    }
    double loss = 0.0, p_pos = 0.0, sum_exp = 0.0;
    index_t collisions = 0;
    if (loss_driven_sampler() != nullptr) {
      result.query_losses.resize(out.size());
      for (std::size_t b = 0; b < out.size(); ++b) result.query_losses[b] = out[b].loss;
    }
    for (const auto& q : out) {  // in query order: the same sums for any thread count
      loss += q.loss;
      p_pos += q.p_pos;
      sum_exp += q.sum_exp;
      collisions += q.collisions;
    }
    const double draws = static_cast<double>(batch) * static_cast<double>(k);
    stats.loss = loss / static_cast<double>(batch);
    stats.mean_p_positive = p_pos / static_cast<double>(batch);
    stats.negative_collision_fraction = static_cast<double>(collisions) / draws;
    // sum_exp sums e^{s / tau + lw} over the draws: Zhat = N sum / (B K).
    const double log_z_hat = detail::log_z_hat(std::log(sum_exp), draws, bank.size());
    stats.z_estimate = std::exp(log_z_hat);
    stats.z = nce ? std::exp(log_z) : kNaN;
    if (reports_mi_bound(config_.objective)) {
      stats.mi_bound_ceiling = std::log(static_cast<double>(k) + 1.0);
      stats.mi_lower_bound = stats.mi_bound_ceiling - stats.loss;
    }
    if (nce) result.partition = detail::partition_after(config_, partition, log_z, log_z_hat);  // Z after the step
  }
  if (config_.normalize_features) {
    backprop_normalisation(prepared, grad);
    result.normalized = prepared.copy;
  }
  return result;
}

StepStats Engine::run(FeaturesRef features, IdsRef ids, const RowMatrixi* negatives, GradRef grad, bool update) {
  // A prefetch for exactly this step and these ids gives the draws; any other is dropped.
  // (A step that then throws has consumed it: only speed is lost.)
  const std::unique_ptr<Prefetch> p = std::move(prefetch_);
  if (p && p->worker.joinable()) p->worker.join();
  // A cluster sampler due a refresh at this counter refreshes first: it depends on the bank and the
  // counter only, so a step that then fails leaves what any next step would have refreshed to.
  if (auto* cs = dynamic_cast<ClusterSampler*>(sampler_.get()); cs && cs->due(step_)) cs->refresh(bank_.view(), step_);
  const bool use = p && !negatives && !p->error && p->step == step_ &&
                   std::equal(ids.begin(), ids.end(), p->ids.begin(), p->ids.end());
  Computed result = use ? compute(features, ids, &p->negatives, grad, true) : compute(features, ids, negatives, grad);
  result.stats.prefetched = use;
  DynamicSampler* const driven = loss_driven_sampler();
  if (driven != nullptr)
    for (std::size_t b = 0; b < result.query_losses.size(); ++b)
      MEMBANK_CHECK(std::isfinite(result.query_losses[b]), "query {} (id {}) has loss {}: the loss_ema drive "
                    "needs finite per-query losses (nothing changed)", b, ids[b], result.query_losses[b]);
  // ---- commit: the bank first (it may still throw, before writing), then Z and the counter.
  // The rows are refreshed with the unit features the loss saw (the engine's copy if it normalised);
  // features that are rows of the bank itself are copied by momentum_update before it writes.
  if (update)
    bank_.momentum_update(ids, result.normalized.size() ? FeaturesRef(result.normalized) : features,
                          config_.momentum, step_, config_.rounding, config_.seed);
  if (result.partition.initialised) {
    partition_.initialised = true;
    partition_.log_z = result.partition.log_z;
  }
  ++step_;
  if (driven != nullptr) {
    // O(B) for the averages plus the sampler's partial rebuild (dynamic_sampler.hpp). The weights it
    // sets are >= floor > 0, so no label can come to carry all of the mass: the refresh cannot throw.
    driven->observe(ids, result.query_losses);
    refresh_class_mass();
  }
  return result.stats;
}

}  // namespace membank
