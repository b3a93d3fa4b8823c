#pragma once
// Plain double references of every objective for one query, from its materialised scores: the
// loss written from the formulas of docs/objectives.md, and dL/ds by central differences of that
// loss (the smooth objectives) or written out (contrastive, triplet). An entry's importance weight
// is 1 / (N q): a bank's draws give q = P_n (conditioned); keys that count once give N q = 1.
// Shared by the objectives' tests and the keyed memories' (queue, in-batch).
#include <membank/engine.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace mbtest {

using membank::Objective;
using membank::index_t;

inline constexpr double kRefZFixed = 1e4;  ///< nce's Z in these references

// ---------------------------------------------------------------------------------------------
// The objectives and their parameters.

struct Variant {
  std::string name;
  Objective obj = Objective::info_nce;
  double tau = 0.07;
  double tau_plus = 0.1;
  double beta = 1.0;
  double kernel_t = 2.0;
  double gamma = 16.0;
  double margin = std::numeric_limits<double>::quiet_NaN();  // NaN: the objective's default
  bool detach = false;
};

inline Variant variant(std::string name, Objective obj) {
  Variant v;
  v.name = std::move(name);
  v.obj = obj;
  return v;
}

/// Every objective, with default and non-default parameters.
inline std::vector<Variant> all_variants() {
  std::vector<Variant> out;
  out.push_back(variant("nce", Objective::nce));
  out.push_back(variant("infonce", Objective::info_nce));
  {
    Variant v = variant("infonce tau=0.5", Objective::info_nce);
    v.tau = 0.5;
    out.push_back(v);
  }
  {
    Variant v = variant("dcl tau+=0.1", Objective::dcl);
    v.tau_plus = 0.1;
    out.push_back(v);
  }
  {
    Variant v = variant("dcl tau+=0.3 tau=0.2", Objective::dcl);
    v.tau_plus = 0.3;
    v.tau = 0.2;
    out.push_back(v);
  }
  for (bool detach : {false, true})
    for (double beta : {0.5, 2.0}) {
      Variant v = variant(std::string("hcl beta=") + (beta == 0.5 ? "0.5" : "2") + (detach ? " detached" : ""),
                          Objective::hcl);
      v.beta = beta;
      v.detach = detach;
      v.tau_plus = 0.1;
      out.push_back(v);
    }
  {
    Variant v = variant("hcl beta=1 tau+=0 tau=0.2", Objective::hcl);
    v.tau_plus = 0.0;
    v.tau = 0.2;
    out.push_back(v);
  }
  out.push_back(variant("dhel", Objective::dhel));
  {
    Variant v = variant("kcl t=2 gamma=16", Objective::kcl);
    v.kernel_t = 2.0;
    v.gamma = 16.0;
    out.push_back(v);
  }
  {
    Variant v = variant("kcl t=0.5 gamma=4", Objective::kcl);
    v.kernel_t = 0.5;
    v.gamma = 4.0;
    out.push_back(v);
  }
  out.push_back(variant("supcon", Objective::supcon));
  {
    Variant v = variant("supcon tau=0.3", Objective::supcon);
    v.tau = 0.3;
    out.push_back(v);
  }
  out.push_back(variant("contrastive default margin", Objective::contrastive));
  {
    Variant v = variant("contrastive margin=0.7", Objective::contrastive);
    v.margin = 0.7;
    out.push_back(v);
  }
  {
    Variant v = variant("contrastive margin=1.6", Objective::contrastive);
    v.margin = 1.6;
    out.push_back(v);
  }
  out.push_back(variant("triplet default margin", Objective::triplet));
  {
    Variant v = variant("triplet margin=0.5", Objective::triplet);
    v.margin = 0.5;
    out.push_back(v);
  }
  return out;
}

/// An EngineConfig carrying the variant's objective and parameters (the rest at their defaults).
inline membank::EngineConfig objective_config(const Variant& v) {
  membank::EngineConfig c;
  c.objective = v.obj;
  c.tau = v.tau;
  c.tau_plus = v.tau_plus;
  c.beta = v.beta;
  c.detach_weights = v.detach;
  c.kernel_t = v.kernel_t;
  c.gamma = v.gamma;
  c.margin = v.margin;
  return c;
}

inline double margin_of(const Variant& v) {
  if (!std::isnan(v.margin)) return v.margin;
  return v.obj == Objective::triplet ? 0.2 : 1.0;
}


/// One entry of a query: a bank row, the probability q it was drawn with (the conditional P_n for a
/// draw under exclusion, P_n(y) for the positive), masked (weight 0), and whether it has the query's label.
struct Entry {
  index_t row = 0;
  double q = 0.0;
  bool masked = false;
  bool same = false;
};

struct Query {
  Entry pos;
  std::vector<Entry> draws;
};

// ---------------------------------------------------------------------------------------------
// The reference.

inline double log_sum_exp(const std::vector<double>& x) {
  double m = -std::numeric_limits<double>::infinity();
  for (double v : x) m = std::max(m, v);
  if (!std::isfinite(m)) return m;
  double s = 0.0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

/// The loss of one query from its scores: sp the positive's, s the draws'. `so` are the scores hcl's
/// importances omega = e^{beta s / tau} read (= s, except when the test holds them still).
inline double query_loss(const Variant& v, index_t n, const Query& q, double sp, const std::vector<double>& s,
                  const std::vector<double>& so) {
  const double tau = v.tau;
  const double K = static_cast<double>(q.draws.size());
  const auto nd = static_cast<double>(n);
  // importance weight 1 / (N q) of an entry (0 when masked)
  auto r = [&](const Entry& e) { return e.masked ? 0.0 : 1.0 / (nd * e.q); };
  const double l_pos = sp / tau + std::log(r(q.pos));
  switch (v.obj) {
    case Objective::nce: {
      // P(j|f) = e^{s/tau} / Z, h = P / (P + K q); L = -log h_pos - sum_j log(1 - h_j)
      double L = std::log1p(K * q.pos.q / (std::exp(sp / tau) / kRefZFixed));
      for (std::size_t k = 0; k < s.size(); ++k) {
        if (q.draws[k].masked) continue;
        const double P = std::exp(s[k] / tau) / kRefZFixed;
        L += std::log1p(P / (K * q.draws[k].q));
      }
      return L;
    }
    case Objective::info_nce: {
      std::vector<double> l{l_pos};
      for (std::size_t k = 0; k < s.size(); ++k)
        if (!q.draws[k].masked) l.push_back(s[k] / tau + std::log(r(q.draws[k])));
      return log_sum_exp(l) - l_pos;
    }
    case Objective::dcl:
    case Objective::hcl: {
      const double e_pos = std::exp(l_pos);
      double R = 0.0;
      if (v.obj == Objective::dcl) {
        for (std::size_t k = 0; k < s.size(); ++k) R += r(q.draws[k]) * std::exp(s[k] / tau);
      } else {
        // R = sum_j omega_j e_j / (sum_j r_j omega_j / sum_j r_j), omega = e^{beta s / tau}, e_j = r_j e^{s_j / tau}
        double num = 0.0, wsum = 0.0, rsum = 0.0;
        for (std::size_t k = 0; k < s.size(); ++k) {
          const double rk = r(q.draws[k]);
          const double omega = std::exp(v.beta * so[k] / tau);
          num += omega * rk * std::exp(s[k] / tau);
          wsum += rk * omega;
          rsum += rk;
        }
        R = num / (wsum / rsum);
      }
      const double ng = std::max((R - v.tau_plus * K * e_pos) / (1.0 - v.tau_plus), K * std::exp(-1.0 / tau));
      return std::log1p(ng / e_pos);  // -log(e_pos / (e_pos + Ng))
    }
    case Objective::dhel: {
      std::vector<double> l;
      for (std::size_t k = 0; k < s.size(); ++k)
        if (!q.draws[k].masked) l.push_back(s[k] / tau + std::log(r(q.draws[k])));
      return -sp / tau + log_sum_exp(l);
    }
    case Objective::kcl: {
      const double t = v.kernel_t;
      double energy = 0.0;
      for (std::size_t k = 0; k < s.size(); ++k) energy += r(q.draws[k]) * std::exp(2.0 * t * (s[k] - 1.0));
      return -std::exp(2.0 * t * (sp - 1.0)) + v.gamma / K * energy;
    }
    case Objective::supcon: {
      std::vector<double> all{l_pos};
      double sum_pos = l_pos, n_pos = 1.0;
      for (std::size_t k = 0; k < s.size(); ++k) {
        if (q.draws[k].masked) continue;
        const double l = s[k] / tau + std::log(r(q.draws[k]));
        all.push_back(l);
        if (q.draws[k].same) {
          sum_pos += l;
          n_pos += 1.0;
        }
      }
      return log_sum_exp(all) - sum_pos / n_pos;
    }
    case Objective::contrastive: {
      const double m = margin_of(v);
      double L = (2.0 - 2.0 * sp) / 2.0;
      for (std::size_t k = 0; k < s.size(); ++k) {
        const double d = std::sqrt(2.0 - 2.0 * s[k]);
        const double pair = q.draws[k].same ? d * d / 2.0 : std::pow(std::max(0.0, m - d), 2) / 2.0;
        L += r(q.draws[k]) * pair / K;
      }
      return L;
    }
    case Objective::triplet: {
      const double alpha = margin_of(v);
      std::vector<std::pair<double, double>> P{{sp, 1.0}}, N;  // (score, weight)
      for (std::size_t k = 0; k < s.size(); ++k) (q.draws[k].same ? P : N).push_back({s[k], r(q.draws[k])});
      double rp = 0.0, rn = 0.0, L = 0.0;
      for (auto& p : P) rp += p.second;
      for (auto& x : N) rn += x.second;
      if (!(rn > 0.0)) return 0.0;
      for (auto& p : P)
        for (auto& x : N) L += p.second * x.second * std::max(0.0, (2.0 - 2.0 * p.first) - (2.0 - 2.0 * x.first) + alpha);
      return L / (rp * rn);
    }
    case Objective::full_softmax: break;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

/// dL/ds of one query: index 0 the positive, 1..K the draws.
inline std::vector<double> query_dlds(const Variant& v, index_t n, const Query& q, double sp, const std::vector<double>& s) {
  const std::size_t K = s.size();
  std::vector<double> g(K + 1, 0.0);
  const auto nd = static_cast<double>(n);
  auto r = [&](const Entry& e) { return e.masked ? 0.0 : 1.0 / (nd * e.q); };
  if (v.obj == Objective::contrastive) {
    // d/ds (1 - s) = -1; negative pair max(0, m - d)^2 / 2 with d = sqrt(2 - 2s): (m - d) / d while d < m
    const double m = margin_of(v);
    g[0] = -1.0;
    for (std::size_t k = 0; k < K; ++k) {
      const double d = std::sqrt(2.0 - 2.0 * s[k]);
      const double dpair = q.draws[k].same ? -1.0 : (d < m ? (m - d) / d : 0.0);
      g[k + 1] = r(q.draws[k]) * dpair / static_cast<double>(K);
    }
    return g;
  }
  if (v.obj == Objective::triplet) {
    // the plain loop over every (positive, negative) pair: d/ds_n = 2 r_p r_n / Z, d/ds_p = -2 r_p r_n / Z
    const double alpha = margin_of(v);
    std::vector<std::size_t> P{0}, N;  // indices into g
    std::vector<double> sc(K + 1), w(K + 1);
    sc[0] = sp;
    w[0] = 1.0;
    for (std::size_t k = 0; k < K; ++k) {
      sc[k + 1] = s[k];
      w[k + 1] = r(q.draws[k]);
      (q.draws[k].same ? P : N).push_back(k + 1);
    }
    double rp = 0.0, rn = 0.0;
    for (auto p : P) rp += w[p];
    for (auto x : N) rn += w[x];
    if (!(rn > 0.0)) return g;
    for (auto p : P)
      for (auto x : N)
        if ((2.0 - 2.0 * sc[p]) - (2.0 - 2.0 * sc[x]) + alpha > 0.0) {
          g[x] += 2.0 * w[p] * w[x] / (rp * rn);
          g[p] -= 2.0 * w[p] * w[x] / (rp * rn);
        }
    return g;
  }
  // Smooth objectives: central differences of query_loss in each score, in double.
  const double h = 1e-5;
  const bool hold_omega = v.obj == Objective::hcl && v.detach;
  {
    g[0] = (query_loss(v, n, q, sp + h, s, s) - query_loss(v, n, q, sp - h, s, s)) / (2.0 * h);
  }
  for (std::size_t k = 0; k < K; ++k) {
    std::vector<double> sp_ = s, sm_ = s;
    sp_[k] += h;
    sm_[k] -= h;
    const double lp = query_loss(v, n, q, sp, sp_, hold_omega ? s : sp_);
    const double lm = query_loss(v, n, q, sp, sm_, hold_omega ? s : sm_);
    g[k + 1] = (lp - lm) / (2.0 * h);
  }
  return g;
}

}  // namespace mbtest
