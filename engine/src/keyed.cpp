// Keyed negatives (keyed.hpp): the score GEMM, the masks and the objective's pass over each query's
// unmasked keys.
#include "keyed.hpp"

#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "step_kernels.hpp"

#include <cmath>
#include <limits>
#include <unordered_map>

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

void KeyedScratch::allocate(index_t m, index_t dim, bool positives_first) {
  const auto k = static_cast<std::size_t>(m);
  s.resize(k);
  lw.assign(k, 0.0f);
  ids.resize(k);
  classes.resize(k);
  slot.resize(k);
  rescale.resize(2 * ((k + 15) / 16));
  acc2.resize(static_cast<std::size_t>(dim));
  w.resize(k + 1);
  if (positives_first) {
    d.resize(6 * (k + 2));
    i.resize(3 * (k + 1));
  }
}

std::int64_t keyed_scratch_bytes(index_t m, index_t dim, bool positives_first) {
  // s, lw, w (4 M each), ids, slot (8 M each), classes (4 M), rescales (M / 2), acc2 (4 D)
  std::int64_t bytes = add_sat(mul_sat(m, 37), add_sat(mul_sat(dim, 4), 64));
  if (positives_first) bytes = add_sat(bytes, add_sat(mul_sat(m, 72), 120));
  return bytes;
}

void keyed_rows(const KeyedInput& in, const kernels::ObjectiveParams& params, index_t r0, index_t rows, float* s,
                index_t lds, KeyedScratch& scratch, kernels::QueryResult* out, const kernels::Table& kt) {
  kt.gemm_abt(rows, in.m, in.dim, 1.0f, in.q + r0 * in.q_stride, in.q_stride, in.keys, in.key_stride, s, lds);
  for (index_t i = r0; i < r0 + rows; ++i) {
    float* const row = s + (i - r0) * lds;
    const index_t y = in.query_ids && in.key_ids && in.query_ids[i] >= 0 ? in.query_ids[i] : -2;  // -2: no key's id
    const std::int32_t cls = in.query_classes ? in.query_classes[i] : -1;
    // The query's entries: its unmasked keys, compacted when any is masked.
    index_t k = 0;
    for (index_t j = 0; j < in.m; ++j) {
      const bool same_id = in.mask_same_id && y >= 0 && in.key_ids[j] == y;
      const bool same_class = in.mask_same_class && cls >= 0 && in.key_classes[j] == cls;
      if (same_id || same_class) continue;
      scratch.slot[static_cast<std::size_t>(k)] = j;
      scratch.s[static_cast<std::size_t>(k)] = row[j];
      scratch.ids[static_cast<std::size_t>(k)] = in.key_ids ? in.key_ids[j] : -1;  // counted when equal to y
      scratch.classes[static_cast<std::size_t>(k)] = in.key_classes ? in.key_classes[j] : -1;
      ++k;
    }
    MEMBANK_CHECK(k >= 1, "query {} has no negative: all {} keys are masked (its own instance{}): expected at least "
                  "one key of another instance", i, in.m, in.mask_same_class ? " or its label" : "");
    kernels::ObjectiveParams p = params;
    p.k = static_cast<double>(k);
    p.k_entries = k;
    kernels::SharedQuery q{};
    q.s = scratch.s.data();  // overwritten by coef_scale dL/ds
    q.lw = scratch.lw.data();
    q.neg_classes = scratch.classes.data();
    q.cls = cls >= 0 ? cls : -2;  // no label: the same as no key's (unlabelled keys are -1)
    q.ids = scratch.ids.data();
    q.k = k;
    q.y = y;
    q.s_pos = kt.dot(in.pos + i * in.pos_stride, DType::float32, in.q + i * in.q_stride, in.dim);
    q.lw_pos = 0.0;
    q.coef_scale = in.coef_scale;
    q.rescale = scratch.rescale.data();
    q.scratch = {scratch.acc2.data(), scratch.w.data(), scratch.d.data(), scratch.i.data()};
    kt.shared_query(p, q, out[i]);
    if (k == in.m) {
      std::copy(scratch.s.begin(), scratch.s.begin() + k, row);
    } else {
      std::fill(row, row + in.m, 0.0f);
      for (index_t t = 0; t < k; ++t) row[scratch.slot[static_cast<std::size_t>(t)]] = scratch.s[static_cast<std::size_t>(t)];
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
