// Queue (queue.hpp), MoCo's memory, against plain double references:
//   - loss and dL/dq of every objective that applies, against the keys' materialised scores, with
//     accidental hits masked (exclude_positive) and the query's label masked (exclude_same_label);
//   - the ring: first in, first out, wrap-around when Q is not a multiple of B, B > Q;
//   - fp16 and bf16 rings against the reference on their widened keys;
//   - 1 vs 2 OpenMP threads bit-identical; a restored state continues bit for bit;
//   - the refusals, each leaving the queue unchanged.
// The reference (objective_reference.hpp) weighs every key once (N q = 1): a masked key is no
// entry at all, so a query's K is its count of unmasked keys.
#include "objective_reference.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/error.hpp>
#include <membank/queue.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kD = 24;
constexpr index_t kQ = 37;  // not a multiple of the kernels' blocks of 16, nor of kB
constexpr index_t kB = 5;

enum class Mask { none, hits, label };

EngineConfig queue_config(const Variant& v, Mask mask) {
  EngineConfig c = objective_config(v);
  c.exclude_positive = mask == Mask::hits;
  c.exclude_same_label = mask == Mask::label;
  c.seed = 11;
  return c;
}

/// The batch of a step: queries, positive keys near them, ids that the ring holds too, 4 labels.
struct Batch {
  RowMatrixf q, k;
  std::vector<index_t> ids;
  std::vector<std::int64_t> labels;
};

Batch make_batch(index_t b, std::mt19937_64& rng) {
  Batch out;
  out.q = unit_rows(b, kD, rng);
  out.k = out.q + gaussian(b, kD, rng, 0.3);
  normalize_rows(out.k);
  std::uniform_int_distribution<index_t> id(0, 11);
  std::uniform_int_distribution<std::int64_t> label(0, 3);
  for (index_t i = 0; i < b; ++i) {
    out.ids.push_back(id(rng));
    out.labels.push_back(label(rng));
  }
  return out;
}

/// A queue filled past one turn of the ring with keys, ids from [0, 12) and labels from 4 classes.
Queue filled_queue(const EngineConfig& cfg, DType dtype, std::mt19937_64& rng) {
  Queue queue(kQ, kD, cfg, dtype);
  for (int t = 0; t < 9; ++t) {  // 45 keys: the ring wraps
    const Batch b = make_batch(kB, rng);
    queue.enqueue(b.k, b.ids, b.labels);
  }
  return queue;
}

struct QueueRef {
  double loss = 0.0;
  RowMatrixd grad;
};

/// Loss and dL/dq of queries q with positive keys k against the ring's keys, written plainly.
QueueRef queue_reference(const Variant& v, const Queue& queue, const Batch& b, Mask mask) {
  const RowMatrixd ring = queue.keys().to_matrix().cast<double>();
  const RowMatrixd F = b.q.cast<double>(), KP = b.k.cast<double>();
  const index_t batch = F.rows();
  QueueRef out;
  out.grad = RowMatrixd::Zero(batch, kD);
  for (index_t i = 0; i < batch; ++i) {
    Query q;
    q.pos = {-1, 1.0, false, true};
    for (index_t j = 0; j < kQ; ++j) {
      const auto js = static_cast<std::size_t>(j);
      const bool labelled = queue.labelled()[js] != 0;
      const bool same = labelled && queue.labels()[js] == b.labels[static_cast<std::size_t>(i)];
      if (mask == Mask::hits && queue.ids()[js] == b.ids[static_cast<std::size_t>(i)]) continue;
      if (mask == Mask::label && same) continue;
      q.draws.push_back({j, 1.0, false, same});
    }
    const double sp = KP.row(i).dot(F.row(i));
    std::vector<double> s;
    for (const Entry& e : q.draws) s.push_back(ring.row(e.row).dot(F.row(i)));
    out.loss += query_loss(v, 1, q, sp, s, s) / static_cast<double>(batch);
    const std::vector<double> g = query_dlds(v, 1, q, sp, s);
    out.grad.row(i) += g[0] * KP.row(i) / static_cast<double>(batch);
    for (std::size_t t = 0; t < s.size(); ++t)
      out.grad.row(i) += g[t + 1] * ring.row(q.draws[t].row) / static_cast<double>(batch);
  }
  return out;
}

std::vector<Variant> queue_variants() {
  std::vector<Variant> out;
  for (const Variant& v : all_variants())
    if (v.obj != Objective::nce) out.push_back(v);
  return out;
}

/// Everything a queue holds, for "nothing changed" and "bit for bit" checks.
struct Snapshot {
  RowMatrixf keys;
  std::vector<index_t> ids;
  std::vector<std::int64_t> labels;
  std::vector<std::uint8_t> labelled;
  index_t position;
  std::int64_t enqueued, step;
  explicit Snapshot(const Queue& q)
      : keys(q.keys().to_matrix()), ids(q.ids()), labels(q.labels()), labelled(q.labelled()),
        position(q.position()), enqueued(q.enqueued()), step(q.steps_done()) {}
  bool operator==(const Snapshot& o) const {
    return bits_equal(keys, o.keys) && ids == o.ids && labels == o.labels && labelled == o.labelled &&
           position == o.position && enqueued == o.enqueued && step == o.step;
  }
};

}  // namespace

TEST_CASE("queue: loss and dL/dq of every objective equal the double reference, with and without masks") {
  // Guards the keyed driver (keyed.cpp): the score GEMM, each query's compaction of its unmasked
  // keys (K = their count), the objective's coefficients with every key weighted once, and the
  // coefficient GEMM plus the positive key's term.
  for (const Variant& v : queue_variants())
    for (Mask mask : {Mask::none, Mask::hits, Mask::label}) {
      CAPTURE(v.name);
      CAPTURE(static_cast<int>(mask));
      std::mt19937_64 rng(42);
      const Queue queue = filled_queue(queue_config(v, mask), DType::float32, rng);
      const Batch b = make_batch(kB, rng);
      const QueueRef ref = queue_reference(v, queue, b, mask);
      RowMatrixf g(kB, kD);
      const StepStats st = queue.evaluate(b.q, b.k, g, b.ids, b.labels);
      CAPTURE(st.loss);
      CAPTURE(ref.loss);
      CHECK(rel_err(st.loss, ref.loss) < 1e-5);
      CHECK(grad_rel_err(g, ref.grad) < 1e-5);
      CHECK(std::isnan(st.z));
    }
}

TEST_CASE("queue: accidental hits are masked, and counted when they are not") {
  // One query whose id fills several slots: with exclude_positive its loss is that of the ring
  // without them; without, they are ordinary negatives and negative_collision_fraction counts them.
  EngineConfig cfg = queue_config(variant("infonce", Objective::info_nce), Mask::none);
  std::mt19937_64 rng(7);
  Queue plain(kQ, kD, cfg);
  cfg.exclude_positive = true;
  Queue masked(kQ, kD, cfg);
  const RowMatrixf keys = unit_rows(10, kD, rng);
  const std::vector<index_t> ids{3, 4, 3, 5, 6, 3, 7, 8, 9, 10};
  plain.enqueue(keys, ids);
  masked.enqueue(keys, ids);
  Batch b = make_batch(1, rng);
  b.ids = {3};
  RowMatrixf g1(1, kD), g2(1, kD);
  const StepStats s_plain = plain.evaluate(b.q, b.k, g1, b.ids);
  const StepStats s_masked = masked.evaluate(b.q, b.k, g2, b.ids);
  CHECK(s_plain.negative_collision_fraction == doctest::Approx(3.0 / kQ));
  CHECK(s_masked.negative_collision_fraction == 0.0);
  const Variant v = variant("infonce", Objective::info_nce);
  CHECK(rel_err(s_masked.loss, queue_reference(v, masked, b, Mask::hits).loss) < 1e-5);
  CHECK(rel_err(s_plain.loss, queue_reference(v, plain, b, Mask::none).loss) < 1e-5);
  CHECK(s_masked.loss < s_plain.loss);  // three fewer terms in the denominator
}

TEST_CASE("queue: first in, first out, wrapping around a ring that is not a multiple of the batch") {
  EngineConfig cfg;
  cfg.objective = Objective::info_nce;
  std::mt19937_64 rng(3);
  Queue queue(7, kD, cfg);
  std::vector<RowMatrixf> pushed;  // every key, in order
  std::vector<index_t> pushed_ids;
  index_t next_id = 0;
  for (index_t b : {3, 3, 3, 2, 9, 1}) {  // 9 > Q: only its last 7 keys remain
    RowMatrixf keys = unit_rows(b, kD, rng);
    std::vector<index_t> ids;
    for (index_t t = 0; t < b; ++t) {
      ids.push_back(next_id++);
      pushed.push_back(keys.row(t));
      pushed_ids.push_back(ids.back());
    }
    queue.enqueue(keys, ids);
    // The model: key number e (0-based, in order) sits in slot e mod Q while it is one of the last Q.
    const auto total = static_cast<index_t>(pushed.size());
    CHECK(queue.enqueued() == total);
    CHECK(queue.position() == total % 7);
    const RowMatrixf ring = queue.keys().to_matrix();
    for (index_t e = std::max<index_t>(0, total - 7); e < total; ++e) {
      CAPTURE(e);
      CHECK(queue.ids()[static_cast<std::size_t>(e % 7)] == pushed_ids[static_cast<std::size_t>(e)]);
      CHECK((ring.row(e % 7) - pushed[static_cast<std::size_t>(e)]).cwiseAbs().maxCoeff() < 1e-6);
    }
  }
  // Before anything was enqueued the slots held seeded unit keys with no id.
  Queue fresh(7, kD, cfg);
  CHECK(std::all_of(fresh.ids().begin(), fresh.ids().end(), [](index_t i) { return i == -1; }));
  const RowMatrixf seeded = fresh.keys().to_matrix();
  for (index_t j = 0; j < 7; ++j) CHECK(std::abs(seeded.row(j).norm() - 1.0f) < 1e-5f);
}

TEST_CASE("queue: step() is evaluate() on the ring before the step, then enqueues the batch's keys") {
  const Variant v = variant("infonce", Objective::info_nce);
  std::mt19937_64 rng(5);
  Queue queue = filled_queue(queue_config(v, Mask::hits), DType::float32, rng);
  for (int t = 0; t < 4; ++t) {
    const Batch b = make_batch(kB, rng);
    RowMatrixf g_eval(kB, kD), g_step(kB, kD);
    const StepStats e = queue.evaluate(b.q, b.k, g_eval, b.ids, b.labels);
    const index_t before = queue.position();
    const StepStats s = queue.step(b.q, b.k, g_step, b.ids, b.labels);
    CHECK(bits_equal(e.loss, s.loss));
    CHECK(bits_equal(g_eval, g_step));
    CHECK(s.step == t);
    CHECK(queue.position() == (before + kB) % kQ);
    CHECK(queue.ids()[static_cast<std::size_t>((before + kB - 1) % kQ)] == b.ids.back());
  }
  // enqueue = false: the ring stays, the counter moves.
  const Snapshot s0(queue);
  const Batch b = make_batch(kB, rng);
  RowMatrixf g(kB, kD);
  queue.step(b.q, b.k, g, b.ids, b.labels, false);
  CHECK(bits_equal(s0.keys, queue.keys().to_matrix()));
  CHECK(queue.steps_done() == s0.step + 1);
}

TEST_CASE("queue: fp16 and bf16 rings equal the double reference on their widened keys") {
  for (DType t : {DType::float16, DType::bfloat16})
    for (const Variant& v : {variant("infonce", Objective::info_nce), variant("supcon", Objective::supcon)}) {
      CAPTURE(to_string(t));
      CAPTURE(v.name);
      std::mt19937_64 rng(9);
      const Queue queue = filled_queue(queue_config(v, Mask::hits), t, rng);
      CHECK(queue.keys().dtype() == t);
      const Batch b = make_batch(kB, rng);
      const QueueRef ref = queue_reference(v, queue, b, Mask::hits);
      RowMatrixf g(kB, kD);
      const StepStats st = queue.evaluate(b.q, b.k, g, b.ids, b.labels);
      CHECK(rel_err(st.loss, ref.loss) < 1e-5);
      CHECK(grad_rel_err(g, ref.grad) < 1e-5);
    }
}

TEST_CASE("queue: 1 and 2 OpenMP threads give bit-identical losses, gradients and rings") {
  for (const Variant& v : {variant("infonce", Objective::info_nce), variant("hcl", Objective::hcl),
                           variant("triplet", Objective::triplet)}) {
    CAPTURE(v.name);
    std::vector<Snapshot> rings;
    std::vector<RowMatrixf> grads;
    std::vector<double> losses;
    for (int threads : {1, 2}) {
      ThreadCount tc(threads);
      std::mt19937_64 rng(21);
      Queue queue = filled_queue(queue_config(v, Mask::hits), DType::float16, rng);
      RowMatrixf g(40, kD);  // 40 queries: three blocks of 16
      double loss = 0.0;
      for (int t = 0; t < 3; ++t) {
        const Batch b = make_batch(40, rng);
        loss += queue.step(b.q, b.k, g, b.ids, b.labels).loss;
      }
      rings.emplace_back(queue);
      grads.push_back(g);
      losses.push_back(loss);
    }
    CHECK(rings[0] == rings[1]);
    CHECK(bits_equal(grads[0], grads[1]));
    CHECK(bits_equal(losses[0], losses[1]));
  }
}

TEST_CASE("queue: a restored state continues bit for bit") {
  const Variant v = variant("dcl", Objective::dcl);
  std::mt19937_64 rng(31), rng_copy;
  const EngineConfig cfg = queue_config(v, Mask::hits);
  Queue a = filled_queue(cfg, DType::bfloat16, rng);
  // Copy a's state into a fresh queue, then run both on the same batches.
  Queue b(kQ, kD, cfg, DType::bfloat16);
  const RowMatrixf keys = a.keys().to_matrix();
  Bank copy = Bank::from_rows(keys, DType::bfloat16);  // bf16 rows widen and round back unchanged
  b.restore({std::move(copy), a.ids(), a.labels(), a.labelled(), a.position(), a.enqueued(), a.steps_done()});
  CHECK(Snapshot(a) == Snapshot(b));
  rng_copy = rng;
  for (int t = 0; t < 3; ++t) {
    const Batch x = make_batch(kB, rng);
    const Batch y = make_batch(kB, rng_copy);
    RowMatrixf ga(kB, kD), gb(kB, kD);
    const StepStats sa = a.step(x.q, x.k, ga, x.ids, x.labels);
    const StepStats sb = b.step(y.q, y.k, gb, y.ids, y.labels);
    CHECK(bits_equal(sa.loss, sb.loss));
    CHECK(bits_equal(ga, gb));
  }
  CHECK(Snapshot(a) == Snapshot(b));
  // A state of the wrong shape or out of range is refused, and nothing changes.
  const Snapshot before(b);
  CHECK(mentions(message_of<Error>([&] {
          b.restore({Bank(kQ + 1, kD, 1, DType::bfloat16), a.ids(), a.labels(), a.labelled(), 0, 0, 0});
        }), "state.keys"));
  CHECK(mentions(message_of<Error>([&] {
          b.restore({Bank(kQ, kD, 1, DType::bfloat16), a.ids(), a.labels(), a.labelled(), kQ, 0, 0});
        }), "state.position"));
  CHECK(Snapshot(b) == before);
}

TEST_CASE("queue: bad input is one clear error and changes nothing") {
  const Variant v = variant("infonce", Objective::info_nce);
  std::mt19937_64 rng(8);
  const EngineConfig cfg = queue_config(v, Mask::hits);
  Queue queue = filled_queue(cfg, DType::float32, rng);
  const Batch b = make_batch(kB, rng);
  const Snapshot before(queue);
  RowMatrixf g(kB, kD), g_small(kB - 1, kD);
  RowMatrixf q_bad = b.q;
  q_bad(2, 3) = std::numeric_limits<float>::quiet_NaN();
  RowMatrixf k_long = b.k * 2.0f;  // not unit
  std::vector<index_t> ids_neg = b.ids;
  ids_neg[1] = -4;
  const std::vector<index_t> ids_short(b.ids.begin(), b.ids.end() - 1);
  CHECK(mentions(message_of<Error>([&] { queue.step(b.q, b.k, g_small, b.ids); }), "grad"));
  CHECK(mentions(message_of<Error>([&] { queue.step(q_bad, b.k, g, b.ids); }), "queries"));
  CHECK(mentions(message_of<Error>([&] { queue.step(b.q, k_long, g, b.ids); }), "keys"));
  CHECK(mentions(message_of<Error>([&] { queue.step(b.q, b.k, g, ids_neg); }), "ids"));
  CHECK(mentions(message_of<Error>([&] { queue.step(b.q, b.k, g, ids_short); }), "ids"));
  CHECK(mentions(message_of<Error>([&] { queue.enqueue(k_long, b.ids); }), "keys"));
  RowMatrixf overlap = b.q;
  CHECK(mentions(message_of<Error>([&] { queue.step(overlap, b.k, overlap, b.ids); }), "grad"));
  CHECK(Snapshot(queue) == before);

  // Objectives that need a bank, and labels that are missing.
  EngineConfig nce = cfg;
  nce.objective = Objective::nce;
  CHECK(mentions(message_of<Error>([&] { Queue(kQ, kD, nce); }), "nce"));
  nce.objective = Objective::full_softmax;
  CHECK(mentions(message_of<Error>([&] { Queue(kQ, kD, nce); }), "full_softmax"));
  CHECK(mentions(message_of<Error>([&] { Queue(0, kD, cfg); }), "capacity"));
  EngineConfig sup = cfg;
  sup.objective = Objective::supcon;
  Queue labelled(kQ, kD, sup);
  CHECK(mentions(message_of<Error>([&] { labelled.step(b.q, b.k, g, b.ids); }), "labels"));

  // Every slot holds the query's own instance: no negative remains.
  Queue own(3, kD, cfg);
  own.enqueue(unit_rows(3, kD, rng), std::vector<index_t>{6, 6, 6});
  const Snapshot own_before(own);
  Batch one = make_batch(1, rng);
  one.ids = {6};
  RowMatrixf g1(1, kD);
  CHECK(mentions(message_of<Error>([&] { own.step(one.q, one.k, g1, one.ids); }), "masked"));
  CHECK(Snapshot(own) == own_before);
}
