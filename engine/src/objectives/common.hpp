#pragma once
// What every objective is made of (see objectives.hpp for the list and the contract).
//
// Included only by the per-instruction-set kernels (kernels/kernels_impl.hpp), after Eigen has been
// renamed for that path: everything here has internal linkage, so each path keeps its own copy,
// compiled with its own flags (kernels/kernels.hpp explains why nothing may be shared).
#include "kernels/kernels.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace membank::objectives {
namespace {

using kernels::idx;
using kernels::ObjectiveParams;

constexpr idx kBlock = 16;                          // entries an objective sees at a time
using Block = Eigen::Array<double, kBlock, 1>;      // one value per entry of a block
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// One block of a query's drawn entries. Rows past `rows` are padding: s = 0, lw = -inf, same = 0,
/// so every weight e^{... + lw} of a padding row is 0 without a branch.
struct Entries {
  Block s;     ///< scores v_j . f
  Block lw;    ///< log importance weight log(1 / (N q_j)), q_j the (conditional) P_n of the draw; 0 when uniform
  Block same;  ///< 1 where the entry's label equals the query's (objectives with kLabels), else 0
  idx rows;    ///< valid rows, 1..kBlock
};

/// The query's own bank row, its positive: score and log importance weight log(1 / (N P_n(y))).
struct Positive {
  double s, lw;
};

/// What an objective returns for a block: w1 (w2) are added, times the entries' rows, into the
/// accumulator row acc1 (acc2), after every earlier addition to it has been multiplied by rescale1
/// (rescale2): how online log-sum-exps keep their weights <= 1.
struct Weights {
  Block w1, w2;
  double rescale1 = 1.0, rescale2 = 1.0;
};

/// The query's result: dL/df = c1 acc1 + c2 acc2 + c_pos v_pos (before the 1/B of the batch mean).
struct Outcome {
  double loss = 0.0;
  double c1 = 0.0, c2 = 0.0, c_pos = 0.0;
  double p_pos = kNaN;    ///< the positive's probability where the objective has one (else NaN)
  double sum_exp = kNaN;  ///< sum_j e^{s_j / tau + lw_j} (the partition estimate's input; NaN if not computed)
};

/// Scratch of one query for an objective that takes its positives first (the caller's, per thread).
struct Workspace {
  double* d;  ///< 6 (K + 2) doubles
  idx* i;     ///< K + 1 indices
};

/// A running log-sum-exp whose terms are also handed out as weights e^{x - max} for accumulation:
/// add() returns the factor by which everything weighted so far must be rescaled.
struct OnlineExp {
  double max = -kInf;
  double total = 0.0;  ///< sum of e^{x - max}
  OnlineExp() = default;
  explicit OnlineExp(double first) : max(first), total(1.0) {}
  double add(const Block& x, idx rows, Block& w) {
    double block_max = max;
    for (idx r = 0; r < rows; ++r) block_max = x[r] > block_max ? x[r] : block_max;
    double rescale = 1.0;
    if (block_max > max) {
      rescale = std::exp(max - block_max);  // 0 on the first block of an empty sum
      total *= rescale;
      max = block_max;
    }
    w = (x - max).exp();
    for (idx r = 0; r < rows; ++r) total += w[r];
    return rescale;
  }
  double log_sum() const { return max + std::log(total); }
};

/// sum_r e^{x_r} over the valid rows, in double (for Outcome::sum_exp).
inline double sum_exp_rows(const Block& x, idx rows) {
  const Block e = x.exp();
  double t = 0.0;
  for (idx r = 0; r < rows; ++r) t += e[r];
  return t;
}

}  // namespace
}  // namespace membank::objectives
