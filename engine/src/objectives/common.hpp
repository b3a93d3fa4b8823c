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

/// The blocks' values folded with op by halves (16 -> 8 -> 4 -> 2 -> 1): the same association on
/// every instruction-set path, and no serial chain of 16 operations.
template <class Op>
inline double fold(const Block& x, Op op) {
  double h[kBlock / 2];
  for (idx r = 0; r < kBlock / 2; ++r) h[r] = op(x[r], x[r + kBlock / 2]);
  for (idx r = 0; r < 4; ++r) h[r] = op(h[r], h[r + 4]);
  return op(op(h[0], h[2]), op(h[1], h[3]));
}

/// A sum over a query's blocks kept lane by lane (kBlock partial sums, folded once at the end): each
/// block costs one vector addition instead of a chain of kBlock. Padding rows must add 0.
struct LaneSum {
  Block lanes = Block::Zero();
  void operator+=(const Block& x) { lanes += x; }
  void operator*=(double f) { lanes *= f; }
  double sum() const { return fold(lanes, [](double a, double b) { return a + b; }); }
};

/// A running log-sum-exp whose terms are also handed out as weights e^{x - max} for accumulation:
/// add() returns the factor by which everything weighted so far must be rescaled. Padding rows and
/// masked entries (x = -inf) weigh 0; a sum of nothing but them so far stays empty (max = -inf).
struct OnlineExp {
  double max = -kInf;
  LaneSum terms;  ///< e^{x - max}
  OnlineExp() = default;
  explicit OnlineExp(double first) : max(first) { terms.lanes[0] = 1.0; }
  double add(const Block& x, Block& w) {
    const double block_max = x.maxCoeff();  // no NaN here: the order of comparisons does not matter
    double rescale = 1.0;
    if (block_max > max) {
      rescale = std::exp(max - block_max);  // 0 on the first block of an empty sum
      terms *= rescale;
      max = block_max;
    }
    if (max == -kInf) {  // e^{-inf - (-inf)} would be NaN
      w.setZero();
      return 1.0;
    }
    w = (x - max).exp();
    terms += w;
    return rescale;
  }
  double total() const { return terms.sum(); }
  double log_sum() const { return max + std::log(total()); }
};

}  // namespace
}  // namespace membank::objectives
