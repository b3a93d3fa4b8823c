#pragma once
// nce: noise-contrastive estimation against K noise draws (Wu et al., CVPR 2018).
//   a_j = s_j / tau - log Z - log(K q_j),  h_j = sigmoid(a_j)
//   L = -log h_pos - sum_j log(1 - h_j) = softplus(a_pos) - a_pos + sum_j softplus(a_j)
//   dL/ds_pos = -(1 - h_pos) / tau,  dL/ds_j = h_j / tau
// Single pass, one accumulator; Z comes from the engine (ObjectiveParams::nce_shift = log N - log K - log Z,
// so a_j = s_j / tau + lw_j + nce_shift).
#include "detail/softplus.hpp"
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct Nce {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = false;

  double inv_tau, shift;
  Outcome out;
  LaneSum positive_parts, sum_exp_a;  // sum_j max(a_j, 0) and sum_j e^{a_j}

  Nce(const ObjectiveParams& p, Positive pos) : inv_tau(p.inv_tau), shift(p.nce_shift) {
    const double a = pos.s * inv_tau + pos.lw + shift;
    double softplus, h, exp_a;
    detail::softplus_sigmoid(a, softplus, h, exp_a);
    out.loss = softplus - a;  // -log h
    out.c_pos = -(1.0 - h) * inv_tau;
    out.c1 = inv_tau;
    out.p_pos = std::exp(pos.s * inv_tau - p.log_z);  // e^{s/tau} / Z
  }

  void block(const Entries& x, Weights& w) {
    const Block a = x.s * inv_tau + x.lw + shift;
    const Block e = (-a.abs()).exp();  // in [0, 1]
    const Block one_e = 1.0 + e;
    const Block inv_one_e = one_e.inverse();
    w.w1 = (a > 0.0).select(inv_one_e, e * inv_one_e);  // sigmoid(a)
    const Block exp_a = (a > 0.0).select(e.inverse(), e);
    // sum_r softplus(a_r) = sum_r max(a_r, 0) + log prod_r (1 + e_r): one log per block. Each factor
    // lies in [1, 2], so the product of 16 neither overflows nor loses more than 16 ulp. Padding rows
    // (a = -inf) add 0 and multiply by 1.
    positive_parts += a.max(0.0);
    sum_exp_a += exp_a;
    out.loss += std::log(fold(one_e, [](double u, double v) { return u * v; }));
  }

  Outcome finish() {
    out.loss += positive_parts.sum();
    out.sum_exp = sum_exp_a.sum() * std::exp(-shift);
    return out;
  }
};

}  // namespace
}  // namespace membank::objectives
