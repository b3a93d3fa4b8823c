#pragma once
// triplet: the triplet loss of Schroff et al. (FaceNet, 2015) computed against the bank as
// cross-batch memory does: anchors are the query f; positives P its own row and its same-label
// draws, negatives N its other draws; every (p, n) pair is a triplet, with the squared distance
// |f - v|^2 = 2 - 2s on the unit sphere and the margin alpha on it:
//   L = sum_{p, n} r_p r_n max(0, |f - v_p|^2 - |f - v_n|^2 + alpha) / (sum_P r_p  sum_N r_n)
//     (the mean over triplets; r = e^{lw}: 1 when uniform, 1 for the own row)
//   dL/ds_n = 2 r_n sum_{p active} r_p / Z,  dL/ds_p = -2 r_p sum_{n active} r_n / Z
// No negative (every draw shares the label): L = 0. Default alpha 0.2 (FaceNet).
// Which triplets are active depends on every score, so this objective is buffered: the driver
// scores all K draws first (collect), then asks for their coefficients (weights), then accumulates.
// The positives are sorted (O(|P| log |P|)); each negative finds its active positives by binary
// search; O(K log |P|) per query, no K x K work.
#include "objectives/common.hpp"

#include <algorithm>

namespace membank::objectives {
namespace {

struct Triplet {
  static constexpr int kAccumulators = 1;
  static constexpr bool kLabels = true;
  static constexpr bool kBuffered = true;

  double alpha;
  idx k;
  double *s, *r;                     // K + 1 scores and weights, the own row last (index K)
  double *prefix_r, *prefix_rs, *hist;  // K + 2 cells each
  idx* positives;                    // indices into s of P, sorted by score in weights()
  unsigned char* is_positive;        // per draw
  idx n_positives = 0;
  Outcome out;

  Triplet(const ObjectiveParams& p, Positive pos, Workspace ws)
      : alpha(p.margin), k(p.k_entries), s(ws.d), r(ws.d + (k + 2)), prefix_r(ws.d + 2 * (k + 2)),
        prefix_rs(ws.d + 3 * (k + 2)), hist(ws.d + 4 * (k + 2)), positives(ws.i), is_positive(ws.flags) {
    s[k] = pos.s;
    r[k] = 1.0;
    positives[n_positives++] = k;
    out.c1 = 1.0;
  }

  /// Stores the block of draws starting at k0.
  void collect(idx k0, const Entries& x) {
    const Block rw = x.lw.exp();
    for (idx q = 0; q < x.rows; ++q) {
      s[k0 + q] = x.s[q];
      r[k0 + q] = rw[q];
      is_positive[k0 + q] = x.same[q] > 0.0;
      if (x.same[q] > 0.0) positives[n_positives++] = k0 + q;
    }
  }

  /// Every draw's dL/ds into w (K floats) and the loss; the own row's dL/ds into out.c_pos.
  void weights(float* w) {
    const auto active = [this](double s_n, idx p) { return 2.0 * (s_n - s[p]) + alpha > 0.0; };
    std::sort(positives, positives + n_positives,
              [this](idx a, idx b) { return s[a] < s[b] || (s[a] == s[b] && a < b); });
    prefix_r[0] = prefix_rs[0] = 0.0;
    for (idx c = 0; c < n_positives; ++c) {
      prefix_r[c + 1] = prefix_r[c] + r[positives[c]];
      prefix_rs[c + 1] = prefix_rs[c] + r[positives[c]] * s[positives[c]];
      hist[c] = 0.0;
    }
    hist[n_positives] = 0.0;
    double sum_n = 0.0;
    for (idx j = 0; j < k; ++j) sum_n += is_positive[j] ? 0.0 : r[j];
    out.loss = 0.0;
    out.c_pos = 0.0;
    for (idx j = 0; j < k; ++j) w[j] = 0.0f;
    if (!(sum_n > 0.0)) return;  // no negative: no triplet
    const double inv_z = 1.0 / (prefix_r[n_positives] * sum_n);
    double loss = 0.0;
    for (idx j = 0; j < k; ++j) {
      if (is_positive[j]) continue;
      // The positives active with this negative are a prefix of the sorted ones: the first `c`.
      const double s_n = s[j];
      const idx c = std::partition_point(positives, positives + n_positives,
                                         [&](idx p) { return active(s_n, p); }) - positives;
      loss += r[j] * (prefix_r[c] * (2.0 * s_n + alpha) - 2.0 * prefix_rs[c]);
      w[j] = static_cast<float>(2.0 * r[j] * prefix_r[c] * inv_z);
      hist[c] += r[j];
    }
    // Positive c (in sorted order) is active with the negatives whose prefix reaches past it.
    double active_n = 0.0;
    for (idx c = n_positives - 1; c >= 0; --c) {
      active_n += hist[c + 1];
      const idx p = positives[c];
      const double coef = -2.0 * r[p] * active_n * inv_z;
      if (p == k)
        out.c_pos = coef;
      else
        w[p] = static_cast<float>(coef);
    }
    out.loss = loss * inv_z;
  }

  Outcome finish() const { return out; }
};

}  // namespace
}  // namespace membank::objectives
