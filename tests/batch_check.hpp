#pragma once
// A batch's loss and dL/df in double from each query's entries (objective_reference.hpp), and the
// check the samplers' tests share: the engine's evaluation of the draws against it, and the drawn
// step bit for bit equal to that evaluation.
#include "objective_reference.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

namespace mbtest {

/// The mean over the queries of their losses, and dL/df (B x D), scored against the bank V with the
/// features F, in double.
struct BatchReference {
  double loss = 0.0;
  RowMatrixd grad;
};

inline BatchReference batch_reference(const Variant& v, index_t n, const std::vector<Query>& queries, const RowMatrixd& V,
                                      const RowMatrixd& F) {
  const auto b = static_cast<double>(queries.size());
  BatchReference out;
  out.grad = RowMatrixd::Zero(static_cast<index_t>(queries.size()), V.cols());
  for (std::size_t i = 0; i < queries.size(); ++i) {
    const Query& q = queries[i];
    const auto row = static_cast<index_t>(i);
    const double sp = V.row(q.pos.row).dot(F.row(row));
    std::vector<double> s;
    for (const Entry& e : q.draws) s.push_back(V.row(e.row).dot(F.row(row)));
    out.loss += query_loss(v, n, q, sp, s, s) / b;
    const std::vector<double> g = query_dlds(v, n, q, sp, s);
    out.grad.row(row) += g[0] * V.row(q.pos.row) / b;
    for (std::size_t k = 0; k < s.size(); ++k) out.grad.row(row) += g[k + 1] * V.row(q.draws[k].row) / b;
  }
  return out;
}

/// evaluate(f, ids, negatives) against the reference (loss within 1e-5 relative, or absolute below
/// 1; gradient within 1e-5 relative), and step(f, ids, update = false) equal to it bit for bit.
inline void check_against(membank::Engine& eng, const RowMatrixf& f, const std::vector<index_t>& ids,
                          const RowMatrixi& negatives, const BatchReference& ref) {
  RowMatrixf g(f.rows(), f.cols()), g2(f.rows(), f.cols());
  const membank::StepStats st = eng.evaluate(f, ids, negatives, g);
  CAPTURE(st.loss);
  CAPTURE(ref.loss);
  CHECK(std::abs(st.loss - ref.loss) <= 1e-5 * std::max(1.0, std::abs(ref.loss)));
  CHECK(grad_rel_err(g, ref.grad) < 1e-5);
  const membank::StepStats st2 = eng.step(f, ids, g2, false);
  CHECK(bits_equal(st.loss, st2.loss));
  CHECK(bits_equal(g, g2));
}

}  // namespace mbtest
