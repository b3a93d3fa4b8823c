#pragma once
// supcon: supervised contrastive loss (Khosla et al., NeurIPS 2020, L_out: the mean over positives
// outside the log) against the bank. The query's entries are its own bank row and its K draws; the
// positives P are its own row and every draw with the query's label; all entries form the
// denominator A (infonce's logQ-corrected logits l):
//   L = log sum_{a in A} e^{l_a} - (1 / |P|) sum_{p in P} l_p
//   dL/ds_a = (p_a - [a in P] / |P|) / tau,  p = softmax over A
// Same-label draws are positives, never negatives: they take the -1 / |P| a positive takes.
// Limits: no same-label draw (exclude_same_label, or labels unique to each instance with
// exclude_positive) is infonce exactly. Single pass, two accumulators (softmax-weighted rows and
// the sum of the positive rows).
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct SupCon {
  static constexpr int kAccumulators = 2;
  static constexpr bool kLabels = true;

  double inv_tau, l_pos;
  OnlineExp lse;
  LaneSum same_draws, same_l;  // the draws in P (all but the own row) and the sum of their l

  SupCon(const ObjectiveParams& p, Positive pos)
      : inv_tau(p.inv_tau), l_pos(pos.s * p.inv_tau + pos.lw), lse(l_pos) {}

  void block(const Entries& x, Weights& w) {
    const Block l = x.s * inv_tau + x.lw;
    w.rescale1 = lse.add(l, w.w1);
    w.w2 = x.same;
    same_draws += x.same;  // padding rows: same = 0
    same_l += (x.same > 0.0).select(l, 0.0);
  }

  Outcome finish() const {
    const double positives = 1.0 + same_draws.sum(), sum_l_positives = l_pos + same_l.sum();
    Outcome o;
    o.p_pos = std::exp(l_pos - lse.max) / lse.total();
    o.loss = lse.log_sum() - sum_l_positives / positives;
    o.c1 = inv_tau / lse.total();
    o.c2 = -inv_tau / positives;
    o.c_pos = (o.p_pos - 1.0 / positives) * inv_tau;
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
