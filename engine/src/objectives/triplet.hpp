#pragma once
// triplet: the triplet loss of Schroff et al. (FaceNet, 2015) computed against the bank as
// cross-batch memory does: anchors are the query f; positives P its own row and its same-label
// draws, negatives N its other draws; every (p, n) pair is a triplet, with the squared distance
// |f - v|^2 = 2 - 2s on the unit sphere and the margin alpha on it:
//   L = sum_{p, n} r_p r_n max(0, |f - v_p|^2 - |f - v_n|^2 + alpha) / (sum_P r_p  sum_N r_n)
//     (the mean over triplets; r = e^{lw}: 1 when uniform, 1 for the own row)
//   dL/ds_n = 2 r_n sum_{p active} r_p / Z,  dL/ds_p = -2 r_p sum_{n active} r_n / Z
// No negative (every draw shares the label): L = 0. Default alpha 0.2 (FaceNet).
//
// Which triplets are active depends on the scores of both sides, but the split into P and N is
// known from the labels before any score. So this objective takes the positives first
// (kPositivesFirst): the driver scores the positives and hands them in (positive()), then streams
// the negatives in blocks like every other objective (block(): each negative's weight is final as
// soon as it is scored, its row accumulated while in L1), and last asks for the positives'
// coefficients (positive_weights()). Rows read: K + |P|, one pass over the negatives.
// The positives are sorted by score (O(|P| log |P|)); the active positives of a negative are a
// prefix of them, found by a branch-free binary search, 16 negatives interleaved: O(K log |P|).
#include "objectives/common.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace membank::objectives {
namespace {

struct Triplet {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = true;
  static constexpr bool kPositivesFirst = true;

  double alpha;
  idx k;
  double *s_of, *r_of;                  // per draw (index K: the own row), positives only
  double *sorted_s, *prefix_r, *prefix_rs, *hist;
  idx* order;                           // the positives' draw indices, sorted by score in begin_negatives()
  idx n_positives = 0;
  double sum_n = 0.0, loss = 0.0, c_pos_z = 0.0;  // c_pos_z: the own row's coefficient times Z

  Triplet(const ObjectiveParams& p, Positive pos, Workspace ws)
      : alpha(p.margin), k(p.k_entries), s_of(ws.d), r_of(ws.d + (k + 2)), sorted_s(ws.d + 2 * (k + 2)),
        prefix_r(ws.d + 3 * (k + 2)), prefix_rs(ws.d + 4 * (k + 2)), hist(ws.d + 5 * (k + 2)), order(ws.i) {
    positive(k, pos.s, 1.0);
  }

  /// A positive: draw j (K for the own row) with score s and importance weight r.
  void positive(idx j, double s, double r) {
    s_of[j] = s;
    r_of[j] = r;
    order[n_positives++] = j;
  }

  /// After the last positive.
  void begin_negatives() {
    // By score, then draw index, as one 64-bit key each: the scores are fp32 dot products, so the
    // float's bits, made to order as unsigned integers, are exact; the index fills the low half.
    for (idx c = 0; c < n_positives; ++c) {
      std::uint32_t bits;
      const auto f = static_cast<float>(s_of[order[c]]);
      std::memcpy(&bits, &f, sizeof bits);
      bits = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
      order[c] = static_cast<idx>((static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint64_t>(order[c]));
    }
    std::sort(order, order + n_positives,
              [](idx a, idx b) { return static_cast<std::uint64_t>(a) < static_cast<std::uint64_t>(b); });
    for (idx c = 0; c < n_positives; ++c) order[c] = static_cast<idx>(static_cast<std::uint64_t>(order[c]) & 0xFFFFFFFFu);
    prefix_r[0] = prefix_rs[0] = 0.0;
    for (idx c = 0; c < n_positives; ++c) {
      const idx j = order[c];
      sorted_s[c] = s_of[j];
      prefix_r[c + 1] = prefix_r[c] + r_of[j];
      prefix_rs[c + 1] = prefix_rs[c] + r_of[j] * s_of[j];
      hist[c] = 0.0;
    }
    hist[n_positives] = 0.0;
  }

  /// A block of negatives: their coefficients dL/ds_n into w.w1, times Z (Z needs every negative's
  /// weight; finish() returns c1 = 1 / Z).
  void block(const Entries& x, Weights& w) {
    // c[r]: how many sorted positives are active with negative r, 2 (s_n - s_p) + alpha > 0 -- a
    // prefix, as s_p ascends. Binary lifting, one step for all 16 at a time (independent chains).
    idx c[kBlock] = {};
    idx top = 1;
    while (top * 2 <= n_positives) top *= 2;
    for (idx step = top; step > 0; step /= 2)
      for (idx r = 0; r < kBlock; ++r) {  // no branch, every load in range: the compiler vectorises it
        const idx at = c[r] + step;
        const idx probe = at < n_positives ? at : n_positives;
        const bool active = (at <= n_positives) & (2.0 * (x.s[r] - sorted_s[probe - 1]) + alpha > 0.0);
        c[r] = active ? at : c[r];
      }
    const Block rn = x.lw.exp();  // 0 on padding rows
    for (idx r = 0; r < x.rows; ++r) {
      const idx cr = c[r];
      loss += rn[r] * (prefix_r[cr] * (2.0 * x.s[r] + alpha) - 2.0 * prefix_rs[cr]);
      w.w1[r] = 2.0 * rn[r] * prefix_r[cr];
      hist[cr] += rn[r];
      sum_n += rn[r];
    }
    for (idx r = x.rows; r < kBlock; ++r) w.w1[r] = 0.0;
  }

  /// After the last negative: the positives' coefficients times Z, w[c] for the draw order[c]
  /// (c < n_positives; the own row's goes to finish()'s c_pos instead, its w[c] is 0).
  idx positive_count() const { return n_positives; }
  const idx* positive_order() const { return order; }
  void positive_weights(float* w) {
    // Sorted positive c is active with the negatives whose prefix reaches past it.
    double active_n = 0.0;
    for (idx c = n_positives - 1; c >= 0; --c) {
      active_n += hist[c + 1];
      const idx j = order[c];
      const double coef = -2.0 * r_of[j] * active_n;
      w[c] = j == k ? 0.0f : static_cast<float>(coef);
      if (j == k) c_pos_z = coef;
    }
  }

  Outcome finish() const {
    // Z = sum_P r_p sum_N r_n; no negative, no triplet: L = 0 and no gradient.
    const double inv_z = sum_n > 0.0 ? 1.0 / (prefix_r[n_positives] * sum_n) : 0.0;
    Outcome o;
    o.loss = loss * inv_z;
    o.c1 = inv_z;
    o.c_pos = c_pos_z * inv_z;
    return o;
  }
};

}  // namespace
}  // namespace membank::objectives
