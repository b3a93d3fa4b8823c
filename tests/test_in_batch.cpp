// InBatch (in_batch.hpp), SimCLR's negatives, against plain double references:
//   - loss and the gradient of both views for every objective that applies: each of the 2B
//     samples is a query whose positive is its partner and whose negatives are the other 2B - 2
//     samples (fewer with masks), and every score s_ij = z_i . z_j reaches both z_i and z_j;
//   - NT-Xent written out in its own closed form;
//   - duplicates of an instance masked with exclude_positive; 1 vs 2 threads bit-identical;
//   - the refusals.
#include "objective_reference.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/error.hpp>
#include <membank/in_batch.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t kD = 16;

struct Views {
  RowMatrixf a, b;
  std::vector<index_t> ids;
  std::vector<std::int64_t> labels;
};

/// B instances: view a, view b near it, ids (with a duplicate when asked), 3 labels.
Views make_views(index_t batch, std::mt19937_64& rng, bool duplicate = false) {
  Views v;
  v.a = unit_rows(batch, kD, rng);
  v.b = v.a + gaussian(batch, kD, rng, 0.4);
  normalize_rows(v.b);
  std::uniform_int_distribution<std::int64_t> label(0, 2);
  for (index_t i = 0; i < batch; ++i) {
    v.ids.push_back(100 + i);
    v.labels.push_back(label(rng));
  }
  if (duplicate) v.ids[static_cast<std::size_t>(batch - 1)] = v.ids[0];
  return v;
}

EngineConfig config_of(const Variant& v, bool exclude_positive, bool exclude_label) {
  EngineConfig c = objective_config(v);
  c.exclude_positive = exclude_positive;
  c.exclude_same_label = exclude_label;
  return c;
}

struct Ref {
  double loss = 0.0;
  RowMatrixd grad;  ///< 2B x D: view a's rows, then view b's
};

/// The mean over the 2B samples of each query's loss, and dL/dz_k = sum over the scores s_ij that
/// hold z_k of dL/ds_ij times the other row.
Ref reference(const Variant& var, const Views& v, bool exclude_positive, bool exclude_label) {
  const auto batch = static_cast<index_t>(v.ids.size());
  const index_t n = 2 * batch;
  RowMatrixd z(n, kD);
  z.topRows(batch) = v.a.cast<double>();
  z.bottomRows(batch) = v.b.cast<double>();
  const auto inst = [&](index_t i) { return i % batch; };
  Ref out;
  out.grad = RowMatrixd::Zero(n, kD);
  for (index_t i = 0; i < n; ++i) {
    const index_t p = (i + batch) % n;
    const std::int64_t li = v.labels[static_cast<std::size_t>(inst(i))];
    Query q;
    q.pos = {p, 1.0, false, true};
    for (index_t j = 0; j < n; ++j) {
      if (j == i || j == p) continue;
      if (exclude_positive && v.ids[static_cast<std::size_t>(inst(j))] == v.ids[static_cast<std::size_t>(inst(i))]) continue;
      const bool same = v.labels[static_cast<std::size_t>(inst(j))] == li;
      if (exclude_label && same) continue;
      q.draws.push_back({j, 1.0, false, same});
    }
    const double sp = z.row(i).dot(z.row(p));
    std::vector<double> s;
    for (const Entry& e : q.draws) s.push_back(z.row(i).dot(z.row(e.row)));
    out.loss += query_loss(var, 1, q, sp, s, s) / static_cast<double>(n);
    const std::vector<double> g = query_dlds(var, 1, q, sp, s);
    const auto add = [&](index_t j, double dl) {
      out.grad.row(i) += dl * z.row(j) / static_cast<double>(n);
      out.grad.row(j) += dl * z.row(i) / static_cast<double>(n);
    };
    add(p, g[0]);
    for (std::size_t t = 0; t < s.size(); ++t) add(q.draws[t].row, g[t + 1]);
  }
  return out;
}

double check_step(const InBatch& ib, const Variant& var, const Views& v, bool exclude_positive, bool exclude_label) {
  const auto batch = static_cast<index_t>(v.ids.size());
  const Ref ref = reference(var, v, exclude_positive, exclude_label);
  RowMatrixf ga(batch, kD), gb(batch, kD);
  const StepStats st = ib.step(v.a, v.b, ga, gb, v.ids, v.labels);
  RowMatrixf g(2 * batch, kD);
  g.topRows(batch) = ga;
  g.bottomRows(batch) = gb;
  CAPTURE(st.loss);
  CAPTURE(ref.loss);
  CHECK(rel_err(st.loss, ref.loss) < 1e-5);
  CHECK(grad_rel_err(g, ref.grad) < 1e-5);
  return st.loss;
}

}  // namespace

TEST_CASE("in-batch: loss and the gradient of both views of every objective equal the double reference") {
  for (const Variant& var : all_variants()) {
    if (var.obj == Objective::nce) continue;
    for (int mask = 0; mask < 3; ++mask) {
      CAPTURE(var.name);
      CAPTURE(mask);
      std::mt19937_64 rng(4);
      const Views v = make_views(19, rng, true);  // 38 samples: blocks of 16 and a remainder
      const InBatch ib(config_of(var, mask == 1, mask == 2));
      check_step(ib, var, v, mask == 1, mask == 2);
    }
  }
}

TEST_CASE("in-batch: infonce is SimCLR's NT-Xent, written in its own closed form") {
  std::mt19937_64 rng(12);
  const Views v = make_views(6, rng);
  EngineConfig cfg;
  cfg.objective = Objective::info_nce;
  cfg.tau = 0.5;
  RowMatrixf ga(6, kD), gb(6, kD);
  const StepStats st = InBatch(cfg).step(v.a, v.b, ga, gb);
  // l(i, j) = -log( e^{sim(i, j) / tau} / sum_{k != i} e^{sim(i, k) / tau} ), L = mean over the 2N (i, j) pairs.
  RowMatrixd z(12, kD);
  z.topRows(6) = v.a.cast<double>();
  z.bottomRows(6) = v.b.cast<double>();
  double loss = 0.0;
  for (index_t i = 0; i < 12; ++i) {
    double denom = 0.0;
    for (index_t k = 0; k < 12; ++k)
      if (k != i) denom += std::exp(z.row(i).dot(z.row(k)) / 0.5);
    loss -= std::log(std::exp(z.row(i).dot(z.row((i + 6) % 12)) / 0.5) / denom);
  }
  CHECK(rel_err(st.loss, loss / 12.0) < 1e-6);
  CHECK(st.mi_bound_ceiling == doctest::Approx(std::log(11.0)));
}

TEST_CASE("in-batch: normalize_features passes the gradient through each view's normalisation") {
  std::mt19937_64 rng(15);
  Views v = make_views(5, rng);
  const RowMatrixf raw_a = v.a * 3.0f, raw_b = v.b * 0.5f;
  EngineConfig cfg;
  cfg.objective = Objective::info_nce;
  EngineConfig norm = cfg;
  norm.normalize_features = true;
  RowMatrixf ga(5, kD), gb(5, kD), ha(5, kD), hb(5, kD);
  const StepStats unit = InBatch(cfg).step(v.a, v.b, ga, gb);
  const StepStats scaled = InBatch(norm).step(raw_a, raw_b, ha, hb);
  CHECK(rel_err(scaled.loss, unit.loss) < 1e-6);
  // dL/dx = (g - f (f . g)) / |x| for x = |x| f
  const RowMatrixd want_a = grad_through_normalisation(raw_a.cast<double>(), ga.cast<double>());
  const RowMatrixd want_b = grad_through_normalisation(raw_b.cast<double>(), gb.cast<double>());
  CHECK(grad_rel_err(ha, want_a) < 1e-5);
  CHECK(grad_rel_err(hb, want_b) < 1e-5);
}

TEST_CASE("in-batch: 1 and 2 OpenMP threads give bit-identical losses and gradients") {
  for (const Variant& var : {variant("infonce", Objective::info_nce), variant("kcl", Objective::kcl),
                             variant("triplet", Objective::triplet)}) {
    CAPTURE(var.name);
    std::mt19937_64 rng(6);
    const Views v = make_views(40, rng, true);
    const InBatch ib(config_of(var, true, false));
    RowMatrixf a1(40, kD), b1(40, kD), a2(40, kD), b2(40, kD);
    double l1 = 0.0, l2 = 0.0;
    {
      ThreadCount tc(1);
      l1 = ib.step(v.a, v.b, a1, b1, v.ids, v.labels).loss;
    }
    {
      ThreadCount tc(2);
      l2 = ib.step(v.a, v.b, a2, b2, v.ids, v.labels).loss;
    }
    CHECK(bits_equal(l1, l2));
    CHECK(bits_equal(a1, a2));
    CHECK(bits_equal(b1, b2));
  }
}

TEST_CASE("in-batch: bad input is one clear error and writes nothing") {
  std::mt19937_64 rng(2);
  const Views v = make_views(4, rng);
  EngineConfig cfg;
  cfg.objective = Objective::info_nce;
  const InBatch ib(cfg);
  RowMatrixf ga = RowMatrixf::Constant(4, kD, 7.0f), gb = RowMatrixf::Constant(4, kD, 7.0f);
  RowMatrixf g3(3, kD);
  const RowMatrixf a1 = v.a.topRows(1), b1 = v.b.topRows(1);
  RowMatrixf g1(1, kD), h1(1, kD);
  CHECK(mentions(message_of<Error>([&] { ib.step(a1, b1, g1, h1); }), "B"));
  CHECK(mentions(message_of<Error>([&] { ib.step(v.a, v.b, g3, gb); }), "grad_a"));
  CHECK(mentions(message_of<Error>([&] { ib.step(v.a, v.b.topRows(3), ga, gb); }), "view_b"));
  CHECK(mentions(message_of<Error>([&] { ib.step(v.a, (v.b * 2.0f).eval(), ga, gb); }), "view_b"));
  CHECK(mentions(message_of<Error>([&] { ib.step(v.a, v.b, ga, ga); }), "grad_b"));
  const std::vector<index_t> short_ids{1, 2};
  CHECK(mentions(message_of<Error>([&] { ib.step(v.a, v.b, ga, gb, short_ids); }), "ids"));
  CHECK(ga.isConstant(7.0f));
  CHECK(gb.isConstant(7.0f));
  EngineConfig nce = cfg;
  nce.objective = Objective::nce;
  CHECK(mentions(message_of<Error>([&] { InBatch{nce}; }), "nce"));
  EngineConfig sup = cfg;
  sup.objective = Objective::supcon;
  CHECK(mentions(message_of<Error>([&] { InBatch(sup).step(v.a, v.b, ga, gb); }), "labels"));
  // Two instances that are the same id, with exclude_positive: neither sample has a negative left.
  EngineConfig ex = cfg;
  ex.exclude_positive = true;
  const RowMatrixf a2 = v.a.topRows(2), b2 = v.b.topRows(2);
  RowMatrixf g2(2, kD), h2(2, kD);
  const std::vector<index_t> same{5, 5};
  CHECK(mentions(message_of<Error>([&] { InBatch(ex).step(a2, b2, g2, h2, same); }), "masked"));
}
