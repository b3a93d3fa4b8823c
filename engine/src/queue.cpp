// Queue (queue.hpp): the ring's state and its step -- validate, score every query against the
// ring through the keyed driver (keyed.cpp), then enqueue.
#include <membank/error.hpp>
#include <membank/memory.hpp>
#include <membank/queue.hpp>

#include "detail/check.hpp"
#include "detail/features.hpp"
#include "detail/parallel.hpp"
#include "keyed.hpp"
#include "step_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <limits>

namespace membank {

std::int64_t queue_step_scratch_bytes(const EngineConfig& config, index_t batch, index_t capacity, index_t dim,
                                      DType dtype, int threads) {
  // the B x Q scores (then coefficients), the objective's per-thread scratch and the gradient's partials
  std::int64_t bytes = add_sat(mul_sat(batch, mul_sat(capacity, 4)),
                               detail::keyed_scratch_bytes(batch, capacity, dim,
                                                           detail::takes_positives_first(config.objective), threads));
  if (dtype != DType::float32) bytes = add_sat(bytes, mul_sat(capacity, mul_sat(dim, 4)));  // the widened ring
  bytes = add_sat(bytes, mul_sat(capacity, 4));  // the slots' classes
  if (config.normalize_features) bytes = add_sat(bytes, mul_sat(2, mul_sat(batch, add_sat(mul_sat(dim, 4), 8))));
  return bytes;
}

Queue::Queue(index_t capacity, index_t dim, EngineConfig config, DType dtype)
    : keys_([&] {
        MEMBANK_CHECK(capacity >= 1, "capacity Q = {}: expected a queue of at least one key", capacity);
        MEMBANK_CHECK(dim >= 1, "dim D = {}: expected D >= 1", dim);
        detail::check_keyed_config(config, "a queue");
        return Bank(capacity, dim, config.seed, dtype);
      }()),
      config_(config),
      ids_(static_cast<std::size_t>(capacity), -1),
      labels_(static_cast<std::size_t>(capacity), 0),
      labelled_(static_cast<std::size_t>(capacity), 0) {}

detail::QueueComputed Queue::compute(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids,
                                    LabelsRef labels, index_t mean_over, RowMatrixf* scores) const {
  // ---- validation
  const index_t batch = queries.rows();
  const index_t dim = keys_.dim(), q = keys_.size();
  MEMBANK_CHECK(batch >= 1, "queries has 0 rows: expected a batch of at least one query (B >= 1)");
  MEMBANK_CHECK(grad.rows() == batch && grad.cols() == dim, "grad has shape {} x {}: expected {} x {} (B x D)",
                grad.rows(), grad.cols(), batch, dim);
  const int threads = omp_get_max_threads();
  require_memory(queue_step_scratch_bytes(config_, batch, q, dim, keys_.dtype(), threads),
                 fmt::format("a queue step of B = {} queries against Q = {} keys (D = {}, {} threads)", batch, q, dim,
                             threads));
  detail::QueueComputed result;
  const detail::PreparedFeatures pq = detail::prepare_features(queries, batch, dim, config_, "queries");
  result.keys = detail::prepare_features(keys, batch, dim, config_, "keys");
  detail::check_ids_labels(&config_, batch, ids, labels, "key");

  // ---- the ring as fp32 rows, and the classes of the slots and queries
  RowMatrixf wide;
  const float* ring = nullptr;
  index_t ring_stride = 0;
  if (keys_.dtype() == DType::float32) {
    ring = keys_.row(0);
    ring_stride = keys_.stride();
  } else {
    wide.resize(q, dim);
    keys_.view().widen_rows(0, q, wide.data(), dim);
    ring = wide.data();
    ring_stride = dim;
  }
  std::vector<std::int32_t> slot_classes, query_classes;
  if (!labels.empty()) slot_classes = detail::classes_of(labels_, labelled_, labels, &query_classes);

  detail::KeyedInput in;
  in.q = pq.data;
  in.q_stride = pq.stride;
  in.pos = result.keys.data;
  in.pos_stride = result.keys.stride;
  in.keys = ring;
  in.key_stride = ring_stride;
  in.batch = batch;
  in.dim = dim;
  in.m = q;
  in.query_ids = ids.empty() ? nullptr : ids.data();
  in.key_ids = ids_.data();
  in.mask_same_id = config_.exclude_positive;
  if (!labels.empty()) {
    in.query_classes = query_classes.data();
    in.key_classes = slot_classes.data();
    in.mask_same_class = config_.exclude_same_label;
  }
  in.coef_scale = 1.0 / static_cast<double>(mean_over > 0 ? mean_over : batch);

  // ---- scores, each query's objective over its row, then dL/dq = c_pos k+ + coefficients x ring
  const kernels::Table& kt = kernels::table();
  const kernels::ObjectiveParams params = detail::objective_params(config_, q, q, std::numeric_limits<double>::quiet_NaN());
  std::vector<kernels::QueryResult>& out = result.out;
  out.resize(static_cast<std::size_t>(batch));
  RowMatrixf local;
  RowMatrixf& s = scores ? *scores : local;
  if (s.rows() != batch || s.cols() != q) s.resize(batch, q);
  detail::keyed_scores(in, s.data(), q, kt);
  detail::keyed_objectives(in, params, s.data(), q, out, kt);
  detail::keyed_gradient(in, s.data(), q, out, grad.data(), grad.outerStride(), kt);
  result.stats = detail::keyed_stats(config_, out, q, step_);
  if (config_.normalize_features) detail::backprop_normalisation(pq, grad);
  return result;
}

void Queue::check_grad_alone(GradRef grad, FeaturesRef queries, FeaturesRef keys, IdsRef ids, LabelsRef labels) const {
  const MemoryRegion g = MemoryRegion::of_matrix(grad);
  check_no_self_overlap(g, "grad");
  check_no_overlap(g, "grad", MemoryRegion::of_matrix(queries), "queries");
  check_no_overlap(g, "grad", MemoryRegion::of_matrix(keys), "keys");
  check_no_overlap(g, "grad", MemoryRegion::of_span(ids), "ids");
  check_no_overlap(g, "grad", MemoryRegion::of_span(labels), "labels");
  keys_.check_no_overlap(g, "grad");
}

StepStats Queue::step(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids, LabelsRef labels,
                      bool enqueue) {
  check_grad_alone(grad, queries, keys, ids, labels);
  return detail::translate_bad_alloc("Queue::step", [&] {
    const detail::QueueComputed c = compute(queries, keys, grad, ids, labels, 0, &scores_);
    // ---- commit: the ring (it may still throw, before writing), then the counter
    if (enqueue) push(c.keys.view(), ids, labels);
    ++step_;
    return c.stats;
  });
}

StepStats Queue::evaluate(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids, LabelsRef labels) const {
  check_grad_alone(grad, queries, keys, ids, labels);
  return detail::translate_bad_alloc("Queue::evaluate", [&] { return compute(queries, keys, grad, ids, labels).stats; });
}

void Queue::enqueue(FeaturesRef keys, IdsRef ids, LabelsRef labels) {
  const index_t batch = keys.rows();
  MEMBANK_CHECK(batch >= 1, "keys has 0 rows: expected at least one key");
  detail::translate_bad_alloc("Queue::enqueue", [&] {
    const detail::PreparedFeatures p = detail::prepare_features(keys, batch, keys_.dim(), config_, "keys");
    detail::check_ids_labels(nullptr, batch, ids, labels, "key");
    push(p.view(), ids, labels);
  });
}

void Queue::push(FeaturesRef unit_keys, IdsRef ids, LabelsRef labels) {
  const index_t batch = unit_keys.rows(), q = keys_.size();
  const index_t kept = std::min(batch, q);  // with B > Q only the last Q keys remain
  const index_t first = batch - kept;
  std::vector<index_t> slots(static_cast<std::size_t>(kept));
  for (index_t t = 0; t < kept; ++t) slots[static_cast<std::size_t>(t)] = (position_ + first + t) % q;
  // m = 0: each slot becomes normalise(key), rounded to the queue's type (the keys may be rows of the
  // ring itself: momentum_update copies them first). It validates before it writes.
  keys_.momentum_update(slots, unit_keys.bottomRows(kept), 0.0, step_, config_.rounding, config_.seed);
  for (index_t t = 0; t < kept; ++t) {
    const auto slot = static_cast<std::size_t>(slots[static_cast<std::size_t>(t)]);
    const auto b = static_cast<std::size_t>(first + t);
    ids_[slot] = ids.empty() ? -1 : ids[b];
    labels_[slot] = labels.empty() ? 0 : labels[b];
    labelled_[slot] = labels.empty() ? 0 : 1;
  }
  position_ = (position_ + batch) % q;
  enqueued_ += batch;
}

void Queue::restore(State state) {
  const index_t q = keys_.size();
  MEMBANK_CHECK(state.keys.size() == q && state.keys.dim() == keys_.dim(),
                "state.keys is {} x {}: expected the queue's Q x D = {} x {}", state.keys.size(), state.keys.dim(), q,
                keys_.dim());
  MEMBANK_CHECK(state.keys.dtype() == keys_.dtype(), "state.keys is {}: expected the queue's {}",
                to_string(state.keys.dtype()), to_string(keys_.dtype()));
  const auto n = static_cast<std::size_t>(q);
  MEMBANK_CHECK(state.ids.size() == n && state.labels.size() == n && state.labelled.size() == n,
                "state has {} ids, {} labels and {} flags: expected Q = {} of each", state.ids.size(),
                state.labels.size(), state.labelled.size(), q);
  for (std::size_t j = 0; j < n; ++j) {
    MEMBANK_CHECK(state.ids[j] >= -1, "state.ids[{}] = {}: expected an instance id >= 0, or -1 for none", j,
                  state.ids[j]);
    MEMBANK_CHECK(state.labelled[j] <= 1, "state.labelled[{}] = {}: expected 0 or 1", j, state.labelled[j]);
  }
  MEMBANK_CHECK(state.position >= 0 && state.position < q, "state.position = {}: expected 0 <= position < Q = {}",
                state.position, q);
  MEMBANK_CHECK(state.enqueued >= 0 && state.step >= 0,
                "state.enqueued = {}, state.step = {}: expected counts >= 0", state.enqueued, state.step);
  keys_ = std::move(state.keys);
  ids_ = std::move(state.ids);
  labels_ = std::move(state.labels);
  labelled_ = std::move(state.labelled);
  position_ = state.position;
  enqueued_ = state.enqueued;
  step_ = state.step;
}

}  // namespace membank
