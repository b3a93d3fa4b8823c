// InBatch (in_batch.hpp): the 2B samples as queries and keys of the keyed driver (keyed.cpp), and
// the gradient of each sample in both roles.
#include <membank/error.hpp>
#include <membank/in_batch.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/features.hpp"
#include "detail/parallel.hpp"
#include "keyed.hpp"
#include "step_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <numeric>

namespace membank {

namespace {
constexpr index_t kQueryBlock = 16;  // samples per GEMM block (fixed: results do not depend on threads)
}  // namespace

InBatch::InBatch(EngineConfig config) : config_(config) { detail::check_keyed_config(config_, "in-batch negatives"); }

std::int64_t in_batch_scratch_bytes(const EngineConfig& config, index_t batch, index_t dim, int threads) {
  const index_t n = mul_sat(batch, 2);
  std::int64_t bytes = detail::keyed_scratch_bytes(n, n, dim, detail::takes_positives_first(config.objective), threads);
  bytes = add_sat(bytes, mul_sat(n, mul_sat(n, 4)));          // scores, then coefficients
  bytes = add_sat(bytes, mul_sat(n, add_sat(mul_sat(dim, 4), 88)));  // the samples, ids, classes, results
  if (config.normalize_features) bytes = add_sat(bytes, mul_sat(n, add_sat(mul_sat(dim, 8), 8)));
  return bytes;
}

StepStats InBatch::step(FeaturesRef view_a, FeaturesRef view_b, GradRef grad_a, GradRef grad_b, IdsRef ids,
                        LabelsRef labels) const {
  detail::check_in_batch_grads(grad_a, grad_b, view_a, view_b, ids, labels);
  return detail::translate_bad_alloc("InBatch::step", [&] {
    // ---- validation
    const index_t batch = view_a.rows(), dim = view_a.cols();
    MEMBANK_CHECK(batch >= 2, "view_a has {} rows: expected B >= 2 instances (a sample's negatives are the other "
                  "2B - 2 samples)", batch);
    MEMBANK_CHECK(dim >= 1, "view_a has 0 columns: expected D >= 1");
    for (const auto& [g, name] : {std::pair{&grad_a, "grad_a"}, std::pair{&grad_b, "grad_b"}})
      MEMBANK_CHECK(g->rows() == batch && g->cols() == dim, "{} has shape {} x {}: expected {} x {} (B x D)", name,
                    g->rows(), g->cols(), batch, dim);
    const index_t n = 2 * batch;
    const int threads = omp_get_max_threads();
    require_memory(in_batch_scratch_bytes(config_, batch, dim, threads),
                   fmt::format("an in-batch step of B = {} instances (D = {}, {} threads)", batch, dim, threads));
    const detail::PreparedFeatures pa = detail::prepare_features(view_a, batch, dim, config_, "view_a");
    const detail::PreparedFeatures pb = detail::prepare_features(view_b, batch, dim, config_, "view_b");
    detail::check_ids_labels(&config_, batch, ids, labels, "instance");

    // ---- the 2B samples (view a, then view b), their instances and classes
    RowMatrixf z(n, dim);
    z.topRows(batch) = pa.view();
    z.bottomRows(batch) = pb.view();
    // The instance a sample belongs to masks itself and its partner; with exclude_positive and ids,
    // every sample of the same id.
    const bool by_id = config_.exclude_positive && !ids.empty();
    std::vector<index_t> instance(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) instance[static_cast<std::size_t>(i)] = by_id ? ids[static_cast<std::size_t>(i % batch)] : i % batch;
    std::vector<std::int32_t> classes;
    if (!labels.empty()) {
      const std::vector<std::int32_t> c = detail::classes_of(labels, {}, {}, nullptr);
      classes.resize(static_cast<std::size_t>(n));
      for (index_t i = 0; i < n; ++i) classes[static_cast<std::size_t>(i)] = c[static_cast<std::size_t>(i % batch)];
    }
    RowMatrixf partner(n, dim);  // each sample's positive
    partner.topRows(batch) = z.bottomRows(batch);
    partner.bottomRows(batch) = z.topRows(batch);

    detail::KeyedInput in;
    in.q = z.data();
    in.q_stride = dim;
    in.pos = partner.data();
    in.pos_stride = dim;
    in.keys = z.data();
    in.key_stride = dim;
    in.batch = n;
    in.dim = dim;
    in.m = n;
    in.query_ids = instance.data();
    in.key_ids = instance.data();
    in.mask_same_id = true;
    if (!classes.empty()) {
      in.query_classes = classes.data();
      in.key_classes = classes.data();
      in.mask_same_class = config_.exclude_same_label;
    }
    in.coef_scale = 1.0 / static_cast<double>(n);

    // ---- C: every sample's row of dL/ds (its partner's entry from c_pos), then dL/dZ = (C + C^T) Z
    const kernels::Table& kt = kernels::table();
    const kernels::ObjectiveParams params =
        detail::objective_params(config_, n - 2, n, std::numeric_limits<double>::quiet_NaN());
    std::vector<kernels::QueryResult> out(static_cast<std::size_t>(n));
    RowMatrixf c(n, n), g(n, dim);
    detail::keyed_scores(in, c.data(), n, kt);
    detail::keyed_objectives(in, params, c.data(), n, out, kt);
    for (index_t i = 0; i < n; ++i) c(i, (i + batch) % n) += static_cast<float>(out[static_cast<std::size_t>(i)].c_pos);
    const index_t blocks = (n + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t blk = 0; blk < blocks; ++blk) {
      const index_t r0 = blk * kQueryBlock, rows = std::min(kQueryBlock, n - r0);
      kt.gemm_atb(rows, dim, n, c.data() + r0, n, z.data(), dim, g.data() + r0 * dim, dim);  // (C^T Z) rows
      kt.gemm_ab_acc(rows, dim, n, c.data() + r0 * n, n, z.data(), dim, g.data() + r0 * dim, dim);
    }
    StepStats stats = detail::keyed_stats(config_, out, n - 2, 0);
    grad_a = g.topRows(batch);
    grad_b = g.bottomRows(batch);
    if (config_.normalize_features) {
      detail::backprop_normalisation(pa, grad_a);
      detail::backprop_normalisation(pb, grad_b);
    }
    return stats;
  });
}

}  // namespace membank
