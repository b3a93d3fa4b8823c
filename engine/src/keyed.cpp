// Keyed negatives (keyed.hpp): the score GEMM, the masks and the objective's pass over each query's
// unmasked keys.
#include "keyed.hpp"

#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "step_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <unordered_map>
#include <utility>

namespace membank::detail {

void check_keyed_config(const EngineConfig& config, const char* mechanism) {
  MEMBANK_CHECK(config.objective != Objective::nce && config.objective != Objective::full_softmax,
                "objective {} does not apply to {}: nce models draws from a noise distribution over N instances "
                "and full_softmax runs over a bank; expected infonce (MoCo's and SimCLR's), dcl, hcl, dhel, kcl, "
                "or with labels supcon, contrastive, triplet",
                to_string(config.objective), mechanism);
  // K and the bank's N play no part: every other range is the engine's.
  config.validate(std::numeric_limits<index_t>::max());
}

void check_ids_labels(const EngineConfig* config, index_t batch, IdsRef ids, std::span<const std::int64_t> labels,
                      const char* per) {
  MEMBANK_CHECK(ids.empty() || static_cast<index_t>(ids.size()) == batch,
                "ids has {} entries: expected none or B = {} (one instance id per {})", ids.size(), batch, per);
  for (std::size_t b = 0; b < ids.size(); ++b)
    MEMBANK_CHECK(ids[b] >= 0, "ids[{}] = {}: expected an instance id >= 0", b, ids[b]);
  MEMBANK_CHECK(labels.empty() || static_cast<index_t>(labels.size()) == batch,
                "labels has {} entries: expected none or B = {} (one label per {})", labels.size(), batch, per);
  if (!config) return;
  MEMBANK_CHECK(!labels.empty() || !needs_labels(config->objective),
                "objective {} needs labels: expected B = {} labels with the batch", to_string(config->objective), batch);
  MEMBANK_CHECK(!labels.empty() || !config->exclude_same_label,
                "exclude_same_label needs labels: expected B = {} labels with the batch", batch);
}

void check_in_batch_grads(GradRef grad_a, GradRef grad_b, FeaturesRef view_a, FeaturesRef view_b, IdsRef ids,
                          std::span<const std::int64_t> labels) {
  const MemoryRegion ga = MemoryRegion::of_matrix(grad_a), gb = MemoryRegion::of_matrix(grad_b);
  for (const auto& [g, name] : {std::pair{ga, "grad_a"}, std::pair{gb, "grad_b"}}) {
    check_no_self_overlap(g, name);
    check_no_overlap(g, name, MemoryRegion::of_matrix(view_a), "view_a");
    check_no_overlap(g, name, MemoryRegion::of_matrix(view_b), "view_b");
    check_no_overlap(g, name, MemoryRegion::of_span(ids), "ids");
    check_no_overlap(g, name, MemoryRegion::of_span(labels), "labels");
  }
  check_no_overlap(ga, "grad_a", gb, "grad_b");
}

namespace {

/// One thread's scratch for the objectives of queries against M keys.
struct Scratch {
  std::vector<float> s, lw, acc2, w;
  std::vector<double> d, rescale;
  std::vector<index_t> ids, i, slot;
  std::vector<std::int32_t> classes;
  Scratch(index_t m, index_t dim, bool positives_first) {
    const auto k = static_cast<std::size_t>(m);
    s.resize(k);
    lw.assign(k, 0.0f);  // every key weighs once
    ids.assign(k, -1);   // no id and no label: what keys without them read
    classes.assign(k, -1);
    slot.resize(k);
    rescale.resize(2 * ((k + 15) / 16));
    acc2.resize(static_cast<std::size_t>(dim));
    w.resize(k + 1);
    if (positives_first) {
      d.resize(6 * (k + 2));
      i.resize(3 * (k + 1));
    }
  }
};

index_t tiles_of(index_t m) { return (m + kKeyTile - 1) / kKeyTile; }

void shared_objective(const KeyedInput& in, const kernels::ObjectiveParams& params, index_t i, float* s, index_t k,
                      const index_t* ids, const std::int32_t* classes, std::int32_t cls, index_t y, Scratch& scratch,
                      kernels::QueryResult& out, const kernels::Table& kt);

/// Query i's objective over its row (M scores at `row`, coefficients out).
void query_objective(const KeyedInput& in, const kernels::ObjectiveParams& params, index_t i, float* row,
                     Scratch& scratch, kernels::QueryResult& out, const kernels::Table& kt) {
  const index_t y = in.query_ids && in.key_ids && in.query_ids[i] >= 0 ? in.query_ids[i] : -2;  // -2: no key's id
  const std::int32_t cls = in.query_classes ? in.query_classes[i] : -1;
  const bool by_id = in.mask_same_id && y >= 0;
  const bool by_class = in.mask_same_class && cls >= 0;
  // The query's entries: its unmasked keys, compacted into the scratch when any is masked (without
  // a mask, the row itself, and the keys' own ids and classes or the scratch's "none").
  index_t k = in.m;
  float* s = row;
  const index_t* ids = in.key_ids ? in.key_ids : scratch.ids.data();
  const std::int32_t* classes = in.key_classes ? in.key_classes : scratch.classes.data();
  if (by_id || by_class) {
    k = 0;
    for (index_t j = 0; j < in.m; ++j) {
      if ((by_id && in.key_ids[j] == y) || (by_class && in.key_classes[j] == cls)) continue;
      scratch.slot[static_cast<std::size_t>(k)] = j;
      scratch.s[static_cast<std::size_t>(k)] = row[j];
      scratch.ids[static_cast<std::size_t>(k)] = in.key_ids ? in.key_ids[j] : -1;  // counted when equal to y
      scratch.classes[static_cast<std::size_t>(k)] = in.key_classes ? in.key_classes[j] : -1;
      ++k;
    }
    MEMBANK_CHECK(k >= 1, "query {} has no negative: all {} keys are masked (its own instance{}): expected at least "
                  "one key of another instance", i, in.m, in.mask_same_class ? " or its label" : "");
    s = scratch.s.data();
    ids = scratch.ids.data();
    classes = scratch.classes.data();
  }
  const bool compact = s != row;
  if (params.objective == Objective::info_nce) {  // MoCo's and SimCLR's: the streamlined pass
    kt.keyed_info_nce(params.inv_tau, kt.dot(in.pos + i * in.pos_stride, DType::float32, in.q + i * in.q_stride, in.dim),
                      in.coef_scale, s, k, out);
    out.collisions = 0;
    if (y >= 0)
      for (index_t t = 0; t < k; ++t) out.collisions += ids[t] == y;
  } else {
    shared_objective(in, params, i, s, k, ids, classes, cls, y, scratch, out, kt);
  }
  if (compact) {
    std::fill(row, row + in.m, 0.0f);
    for (index_t t = 0; t < k; ++t) row[scratch.slot[static_cast<std::size_t>(t)]] = s[t];
  }
}

/// The objectives' own pass (kernels.hpp's shared_query) over query i's k entries.
void shared_objective(const KeyedInput& in, const kernels::ObjectiveParams& params, index_t i, float* s, index_t k,
                      const index_t* ids, const std::int32_t* classes, std::int32_t cls, index_t y, Scratch& scratch,
                      kernels::QueryResult& out, const kernels::Table& kt) {
  kernels::ObjectiveParams p = params;
  p.k = static_cast<double>(k);
  p.k_entries = k;
  kernels::SharedQuery q{};
  q.s = s;  // overwritten by coef_scale dL/ds
  q.lw = scratch.lw.data();
  q.neg_classes = classes;
  q.cls = cls >= 0 ? cls : -2;  // no label: the same as no key's (unlabelled keys are -1)
  q.ids = ids;
  q.k = k;
  q.y = y;
  q.s_pos = kt.dot(in.pos + i * in.pos_stride, DType::float32, in.q + i * in.q_stride, in.dim);
  q.lw_pos = 0.0;
  q.coef_scale = in.coef_scale;
  q.rescale = scratch.rescale.data();
  q.scratch = {scratch.acc2.data(), scratch.w.data(), scratch.d.data(), scratch.i.data()};
  kt.shared_query(p, q, out);
}

}  // namespace

std::int64_t keyed_scratch_bytes(index_t batch, index_t m, index_t dim, bool positives_first, int threads) {
  // per thread: s, lw, w (4 M each), ids, slot (8 M each), classes (4 M), rescales (M / 2), acc2 (4 D)
  std::int64_t per_thread = add_sat(mul_sat(m, 37), add_sat(mul_sat(dim, 4), 64));
  if (positives_first) per_thread = add_sat(per_thread, add_sat(mul_sat(m, 72), 120));
  const std::int64_t partials = mul_sat(tiles_of(m), mul_sat(batch, mul_sat(dim, 4)));
  return add_sat(mul_sat(threads, per_thread), add_sat(partials, mul_sat(batch, 64)));  // and the results
}

void keyed_scores(const KeyedInput& in, float* s, index_t lds, const kernels::Table& kt) {
  const index_t tiles = tiles_of(in.m);
  ExceptionCapture errors;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t t = 0; t < tiles; ++t) {
    errors.run([&] {
      const index_t j0 = t * kKeyTile, cols = std::min(kKeyTile, in.m - j0);
      kt.gemm_abt(in.batch, cols, in.dim, 1.0f, in.q, in.q_stride, in.keys + j0 * in.key_stride, in.key_stride,
                  s + j0, lds);
    });
  }
  errors.rethrow("the keyed scores");
}

void keyed_objectives(const KeyedInput& in, const kernels::ObjectiveParams& params, float* s, index_t lds,
                      std::vector<kernels::QueryResult>& out, const kernels::Table& kt) {
  const bool positives_first = takes_positives_first(params.objective);
  ExceptionCapture errors;
#pragma omp parallel
  {
    std::unique_ptr<Scratch> scratch;
    errors.run([&] { scratch = std::make_unique<Scratch>(in.m, in.dim, positives_first); });  // inside the capture
#pragma omp for schedule(dynamic, 4)
    for (index_t i = 0; i < in.batch; ++i)
      errors.run([&] { query_objective(in, params, i, s + i * lds, *scratch, out[static_cast<std::size_t>(i)], kt); });
  }
  errors.rethrow("the keyed objectives");
}

void keyed_gradient(const KeyedInput& in, const float* s, index_t lds, const std::vector<kernels::QueryResult>& out,
                    float* grad, index_t g_stride, const kernels::Table& kt) {
  const index_t tiles = tiles_of(in.m), batch = in.batch, dim = in.dim;
  // Each tile's partial product C_t K_t (B x D), then every row summed over the tiles in order.
  std::vector<float> partial(static_cast<std::size_t>(tiles * batch * dim), 0.0f);
  ExceptionCapture errors;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t t = 0; t < tiles; ++t) {
    errors.run([&] {
      const index_t j0 = t * kKeyTile, cols = std::min(kKeyTile, in.m - j0);
      kt.gemm_ab_acc(batch, dim, cols, s + j0, lds, in.keys + j0 * in.key_stride, in.key_stride,
                     partial.data() + t * batch * dim, dim);
    });
  }
  errors.rethrow("the keyed gradient");
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < batch; ++i) {
    float* g = grad + i * g_stride;
    const auto c_pos = static_cast<float>(out[static_cast<std::size_t>(i)].c_pos);
    const float* kp = in.pos + i * in.pos_stride;
    for (index_t c = 0; c < dim; ++c) g[c] = c_pos * kp[c];
    for (index_t t = 0; t < tiles; ++t) {
      const float* p = partial.data() + (t * batch + i) * dim;
      for (index_t c = 0; c < dim; ++c) g[c] += p[c];
    }
  }
}

std::vector<std::int32_t> classes_of(std::span<const std::int64_t> labels, std::span<const std::uint8_t> present,
                                     std::span<const std::int64_t> more, std::vector<std::int32_t>* more_classes) {
  std::unordered_map<std::int64_t, std::int32_t> index;
  const auto class_of = [&](std::int64_t label) {
    const auto [it, inserted] = index.try_emplace(label, static_cast<std::int32_t>(index.size()));
    return it->second;
  };
  std::vector<std::int32_t> out(labels.size());
  for (std::size_t j = 0; j < labels.size(); ++j) out[j] = present.empty() || present[j] ? class_of(labels[j]) : -1;
  if (more_classes) {
    more_classes->resize(more.size());
    for (std::size_t j = 0; j < more.size(); ++j) (*more_classes)[j] = class_of(more[j]);
  }
  return out;
}

StepStats keyed_stats(const EngineConfig& config, const std::vector<kernels::QueryResult>& out, index_t m,
                      std::int64_t step) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  double loss = 0.0, p_pos = 0.0;
  index_t collisions = 0;
  for (const auto& q : out) {  // in query order: the same sums for any thread count
    loss += q.loss;
    p_pos += q.p_pos;
    collisions += q.collisions;
  }
  const auto batch = static_cast<double>(out.size());
  StepStats stats;
  stats.step = step;
  stats.loss = loss / batch;
  stats.mean_p_positive = p_pos / batch;
  stats.negative_collision_fraction = static_cast<double>(collisions) / (batch * static_cast<double>(m));
  stats.z = kNaN;
  stats.z_estimate = kNaN;
  if (reports_mi_bound(config.objective)) {
    stats.mi_bound_ceiling = std::log(static_cast<double>(m) + 1.0);
    stats.mi_lower_bound = stats.mi_bound_ceiling - stats.loss;
  }
  return stats;
}

}  // namespace membank::detail
