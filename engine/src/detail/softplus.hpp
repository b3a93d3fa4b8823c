#pragma once
// softplus and sigmoid of one logit from a single exp, for the NCE positive's term (objectives/nce.hpp).
//
// Internal linkage (an anonymous namespace), as detail/simd.hpp: the per-instruction-set kernels
// include it too, and each translation unit keeps a copy compiled with its own flags.
#include <cmath>

namespace membank::detail {
namespace {

/// log(1 + e^a), 1 / (1 + e^-a) and e^a from one exp(-|a|), stable for any a.
inline void softplus_sigmoid(double a, double& softplus, double& sigmoid, double& exp_a) {
  const double e = std::exp(-std::fabs(a));
  if (a > 0) {
    softplus = a + std::log1p(e);
    sigmoid = 1.0 / (1.0 + e);
    exp_a = 1.0 / e;
  } else {
    softplus = std::log1p(e);
    sigmoid = e / (1.0 + e);
    exp_a = e;
  }
}

}  // namespace
}  // namespace membank::detail
