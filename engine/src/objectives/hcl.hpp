#pragma once
// hcl: hard-negative reweighting (Robinson et al., ICLR 2021), concentration beta, prior tau_plus.
// Each draw's importance is omega_j = e^{beta s_j / tau}; the reweighted negative sum replaces dcl's:
//   R = sum_j omega_j e_j / (sum_j r_j omega_j / sum_j r_j)      (r_j = e^{lw_j}, e_j = e^{s_j / tau + lw_j})
//     = W A / C,  A = sum_j e^{(1 + beta) s_j / tau + lw_j},  C = sum_j e^{beta s_j / tau + lw_j},  W = sum_j r_j
//   Ng = max((R - tau_plus K e_pos) / (1 - tau_plus), K e^{-1/tau}),  L = -log(e_pos / (e_pos + Ng))
// Under the uniform sampler r_j = 1 and C / W is the official code's mean of the importances. As there,
// the weights are not detached by default: dR/ds_j = R ((1 + beta) a_j / A - beta c_j / C) / tau
// (a_j, c_j the terms of A and C), two accumulators. detach_weights treats omega as a constant:
// dR/ds_j = R a_j / (A tau), one accumulator.
// Limits: beta = 0 is dcl exactly (C = W), for any sampler.
#include "objectives/common.hpp"
#include "objectives/dcl.hpp"

namespace membank::objectives {
namespace {

template <bool kDetach>
struct Hcl {
  static constexpr int kAccumulators = kDetach ? 1 : 2;
  static constexpr bool kLabels = false;

  double inv_tau, l_pos, tau_plus, k, beta;
  OnlineExp a, c;        // the sums A and C
  LaneSum weight;         // W = sum_j e^{lw_j}: no online maximum needed, lw_j = log(1 / (N q_j)) <= log 2^149

  Hcl(const ObjectiveParams& p, Positive pos)
      : inv_tau(p.inv_tau), l_pos(pos.s * p.inv_tau + pos.lw), tau_plus(p.tau_plus), k(p.k), beta(p.beta) {}

  void block(const Entries& x, Weights& w) {
    const Block bs = x.s * (beta * inv_tau) + x.lw;
    w.rescale1 = a.add(bs + x.s * inv_tau, w.w1);
    w.rescale2 = c.add(bs, w.w2);
    weight += x.lw.exp();
  }

  Outcome finish() const {
    const double log_r = a.log_sum() + std::log(weight.sum()) - c.log_sum();
    const Debiased d(l_pos, log_r, tau_plus, k, inv_tau);
    Outcome o;
    o.loss = d.loss;
    o.p_pos = d.p_pos;
    o.c_pos = d.c_pos;
    if (kDetach) {
      o.c1 = d.d_sum * inv_tau / a.total();
    } else {
      o.c1 = d.d_sum * (1.0 + beta) * inv_tau / a.total();
      o.c2 = -d.d_sum * beta * inv_tau / c.total();
    }
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
