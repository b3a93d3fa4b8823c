#pragma once
// kcl: kernel contrastive loss (Koromilas et al., ICML 2024) with the Gaussian kernel
// k(f, v) = e^{-t |f - v|^2} = e^{2t (s - 1)} on the unit sphere (t = kernel_t), weight gamma:
//   L = -k(f, v_pos) + (gamma / K) sum_j r_j k(f, v_j)        (r_j = e^{lw_j}: 1 when uniform)
//   dL/ds_pos = -2t k_pos,  dL/ds_j = (gamma / K) 2t r_j k_j
// The energy term is an unbiased mean over the draws (importance-weighted under a non-uniform
// sampler), so no statistic of all K entries is needed first: single pass, one accumulator, no
// temperature (tau is not used).
// Limits: gamma = 0 leaves the alignment term alone; L >= -1 always, and L + 1 = |f - v_pos|^2 t + O(t^2)
// for a positive close to f.
#include "objectives/common.hpp"

namespace membank::objectives {
namespace {

struct Kcl {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = false;

  double two_t, scale;  // 2t and gamma / K
  LaneSum energy;  // sum_j r_j k_j
  Outcome out;

  Kcl(const ObjectiveParams& p, Positive pos) : two_t(2.0 * p.kernel_t), scale(p.gamma / p.k) {
    const double k_pos = std::exp(two_t * (pos.s - 1.0));
    out.loss = -k_pos;
    out.c_pos = -two_t * k_pos;
    out.c1 = scale * two_t;
  }

  void block(const Entries& x, Weights& w) {
    w.w1 = ((x.s - 1.0) * two_t + x.lw).exp();
    energy += w.w1;
  }

  Outcome finish() {
    out.loss += scale * energy.sum();
    return out;
  }
};

}  // namespace
}  // namespace membank::objectives
