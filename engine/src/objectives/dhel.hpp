#pragma once
// dhel: decoupled hyperspherical energy loss (Koromilas et al., ICML 2024) against the bank: the
// positive's alignment term is decoupled from the energy (uniformity) term, whose log-sum-exp runs
// over the K draws only (the positive is not in the denominator):
//   L = -s_pos / tau + log sum_j e^{s_j / tau + lw_j}
//   dL/ds_pos = -1 / tau,  dL/ds_j = p_j / tau,  p = softmax over the K draws' logits
// Limit: L = infonce's loss minus log(1 + e^{l_pos} / sum_j e^{l_j}) under the uniform sampler (lw = 0).
// Single pass, one accumulator.
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct Dhel {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = false;

  double inv_tau, a_pos, l_pos;  // s_pos / tau, and with the positive's importance weight
  OnlineExp lse;

  Dhel(const ObjectiveParams& p, Positive pos)
      : inv_tau(p.inv_tau), a_pos(pos.s * p.inv_tau), l_pos(a_pos + pos.lw) {}

  void block(const Entries& x, Weights& w) { w.rescale1 = lse.add(x.s * inv_tau + x.lw, w.w1); }

  Outcome finish() const {
    Outcome o;
    const double log_neg = lse.log_sum();
    o.loss = log_neg - a_pos;
    o.c1 = inv_tau / lse.total();
    o.c_pos = -inv_tau;
    o.p_pos = 1.0 / (1.0 + std::exp(log_neg - l_pos));  // e^{l_pos} / (e^{l_pos} + sum_j e^{l_j})
    o.sum_exp = std::exp(log_neg);
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
