#pragma once
// contrastive: the margin loss of Chopra, Hadsell and LeCun (2005) computed against the bank as
// cross-batch memory (Wang et al., CVPR 2020) does: the query's own row and its same-label draws are
// positive pairs, the other draws negative pairs. With d = |f - v| = sqrt(2 - 2s) on the unit sphere
// and the margin m on that distance:
//   pair loss: positive d^2 / 2,  negative max(0, m - d)^2 / 2
//   L = (own pair) + (1 / K) sum_j r_j (pair loss of draw j)        (r_j = e^{lw_j}: 1 when uniform)
//   d/ds of d^2 / 2 = -1;  d/ds of max(0, m - d)^2 / 2 = (m - d) / d while d < m, else 0
// A negative that coincides with f (d = 0) has no defined direction: d is floored at 1e-6.
// Default margin 1 (the distance of cosine similarity 1/2, cross-batch memory's similarity margin).
// Single pass, one accumulator.
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct Contrastive {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = true;

  double margin, inv_k;
  LaneSum sum_pairs;  // sum_j r_j (pair loss of draw j); padding rows have r = 0
  Outcome out;

  Contrastive(const ObjectiveParams& p, Positive pos) : margin(p.margin), inv_k(1.0 / p.k) {
    out.loss = 0.5 * std::fmax(2.0 - 2.0 * pos.s, 0.0);
    out.c_pos = -1.0;
    out.c1 = inv_k;
  }

  void block(const Entries& x, Weights& w) {
    const Block d2 = (2.0 - 2.0 * x.s).max(0.0);
    const Block d = d2.sqrt().max(1e-6);
    const Block gap = (margin - d).max(0.0);
    const Block r = x.lw.exp();
    const Block pair_loss = (x.same > 0.0).select(0.5 * d2, 0.5 * gap.square());
    w.w1 = r * (x.same > 0.0).select(Block::Constant(-1.0), gap / d);
    sum_pairs += r * pair_loss;
  }

  Outcome finish() {
    out.loss += inv_k * sum_pairs.sum();
    return out;
  }
};

}  // namespace
}  // namespace membank::objectives
