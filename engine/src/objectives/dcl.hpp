#pragma once
// dcl: debiased contrastive loss (Chuang et al., NeurIPS 2020), class prior tau_plus. With
// e_pos = e^{l_pos} and e_j = e^{l_j} (infonce's logQ-corrected logits, so lw = 0 when uniform):
//   Ng = max((sum_j e_j - tau_plus K e_pos) / (1 - tau_plus), K e^{-1/tau})
//   L = -log(e_pos / (e_pos + Ng))
// Unclamped: dL/ds_j = e_j / ((1 - tau_plus) tau (e_pos + Ng)),
//            dL/ds_pos = (-1 + (e_pos - tau_plus K e_pos / (1 - tau_plus)) / (e_pos + Ng)) / tau;
// clamped (Ng at its floor): the draws get no gradient and the positive's is infonce's with Ng fixed.
// Limits: tau_plus = 0 under the uniform sampler is infonce exactly (every e_j >= e^{-1/tau}, so the
// clamp never binds). Not decoupled contrastive learning (Yeh et al.), which shares the name.
// Single pass, one accumulator: the clamp needs only the sum, known at the end.
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

/// The debiased negative term shared by dcl and hcl: given log e_pos and log R (R = the draws' sum,
/// or hcl's reweighted sum), the loss and the factors of the gradient.
struct Debiased {
  double loss, p_pos;
  double d_sum;  ///< dL/dR times R (0 when clamped)
  double c_pos;  ///< dL/ds_pos
  Debiased(double l_pos, double log_r, double tau_plus, double k, double inv_tau) {
    const double log_floor = std::log(k) - inv_tau;
    double m = l_pos > log_r ? l_pos : log_r;
    m = m > log_floor ? m : log_floor;
    const double e_pos = std::exp(l_pos - m), r = std::exp(log_r - m), floor = std::exp(log_floor - m);
    const double ng = (r - tau_plus * k * e_pos) / (1.0 - tau_plus);
    const bool clamped = !(ng > floor);
    const double d = e_pos + (clamped ? floor : ng);
    loss = std::log(d) - (l_pos - m);
    p_pos = e_pos / d;
    d_sum = clamped ? 0.0 : r / ((1.0 - tau_plus) * d);
    c_pos = (-1.0 + (e_pos - (clamped ? 0.0 : tau_plus * k * e_pos / (1.0 - tau_plus))) / d) * inv_tau;
  }
};

struct Dcl {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = false;

  double inv_tau, l_pos, tau_plus, k;
  OnlineExp neg;

  Dcl(const ObjectiveParams& p, Positive pos)
      : inv_tau(p.inv_tau), l_pos(pos.s * p.inv_tau + pos.lw), tau_plus(p.tau_plus), k(p.k) {}

  void block(const Entries& x, Weights& w) { w.rescale1 = neg.add(x.s * inv_tau + x.lw, w.w1); }

  Outcome finish() const {
    const Debiased d(l_pos, neg.log_sum(), tau_plus, k, inv_tau);
    Outcome o;
    o.loss = d.loss;
    o.p_pos = d.p_pos;
    o.c1 = d.d_sum * inv_tau / neg.total();  // dR/ds_j = R w_j / (tau total)
    o.c_pos = d.c_pos;
    o.sum_exp = std::exp(neg.log_sum());
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
