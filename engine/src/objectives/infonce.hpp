#pragma once
// infonce: softmax cross-entropy of the positive against its K draws, logQ-corrected (the logits are
// s / tau - log(K q), q the draw's P_n; the positive's own P_n(y) for it):
//   l_pos = s_pos / tau + lw_pos,  l_j = s_j / tau + lw_j   (lw = -log(N q): the same shift log(N / K) apart)
//   L = -l_pos + log(e^{l_pos} + sum_j e^{l_j})
//   dL/ds_pos = (p_pos - 1) / tau,  dL/ds_j = p_j / tau,  p = softmax over the K + 1 logits
// Single pass, one accumulator (an online log-sum-exp rescales it when the maximum grows).
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct InfoNce {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = false;

  double inv_tau, l_pos;
  OnlineExp lse;
  LaneSum neg_total;  // sum_j e^{l_j - lse.max}

  InfoNce(const ObjectiveParams& p, Positive pos) : inv_tau(p.inv_tau), l_pos(pos.s * p.inv_tau + pos.lw),
                                                   lse(l_pos) {}

  void block(const Entries& x, Weights& w) {
    w.rescale1 = lse.add(x.s * inv_tau + x.lw, w.w1);
    neg_total *= w.rescale1;
    neg_total += w.w1;
  }

  Outcome finish() const {
    Outcome o;
    o.p_pos = std::exp(l_pos - lse.max) / lse.total();
    o.loss = lse.log_sum() - l_pos;
    o.c1 = inv_tau / lse.total();
    o.c_pos = (o.p_pos - 1.0) * inv_tau;
    o.sum_exp = neg_total.sum() * std::exp(lse.max);
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
