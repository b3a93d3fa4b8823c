#pragma once
// Test helpers: fixed-seed data generators and plain double-precision references of the
// objectives in DESIGN.md (NCE, InfoNCE, full softmax), written as directly as the formulas read.
// Nothing here calls into the engine's arithmetic: the references take the bank rows as a dense
// double matrix and P_n as a vector of doubles computed by the test itself.
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/isa.hpp>

#include <omp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace mbtest {

/// The message of the E that `f` throws: "<no exception>" if it throws nothing, "<other exception>"
/// (with what() when there is one) for another type, so that a check on the message fails and says why.
template <class E = membank::Error, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception> ") + e.what();
  } catch (...) {
    return "<other exception>";
  }
  return "<no exception>";
}

using membank::index_t;
using membank::NegativesMode;
using membank::Objective;
using membank::RowMatrixd;
using membank::RowMatrixf;
using membank::RowMatrixi;

// ---------------------------------------------------------------------------------------------
// Data generators (every one takes the test's own generator).

/// Gaussian matrix, entries N(0, scale^2).
inline RowMatrixf gaussian(index_t rows, index_t cols, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  RowMatrixf m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < cols; ++c) m(i, c) = static_cast<float>(nd(rng));
  return m;
}

/// Each row normalised to unit length (norm computed in double).
inline void normalize_rows(RowMatrixf& m) {
  for (index_t i = 0; i < m.rows(); ++i) {
    const double n = m.row(i).cast<double>().norm();
    m.row(i) = (m.row(i).cast<double>() / n).cast<float>();
  }
}

inline RowMatrixf unit_rows(index_t rows, index_t cols, std::mt19937_64& rng) {
  RowMatrixf m = gaussian(rows, cols, rng);
  normalize_rows(m);
  return m;
}

/// Unit features close to their positive rows: f_i = normalise(v_{y_i} + sigma g_i).
inline RowMatrixf near_rows(const RowMatrixf& bank, std::span<const index_t> ids, double sigma,
                            std::mt19937_64& rng) {
  const index_t d = bank.cols();
  RowMatrixf f(static_cast<index_t>(ids.size()), d);
  std::normal_distribution<double> nd(0.0, sigma);
  for (index_t i = 0; i < f.rows(); ++i)
    for (index_t c = 0; c < d; ++c)
      f(i, c) = static_cast<float>(bank(ids[static_cast<std::size_t>(i)], c) + nd(rng));
  normalize_rows(f);
  return f;
}

inline std::vector<index_t> random_ids(index_t b, index_t n, std::mt19937_64& rng) {
  std::uniform_int_distribution<index_t> ud(0, n - 1);
  std::vector<index_t> ids(static_cast<std::size_t>(b));
  for (auto& x : ids) x = ud(rng);
  return ids;
}

inline RowMatrixi random_negatives(index_t rows, index_t k, index_t n, std::mt19937_64& rng) {
  std::uniform_int_distribution<index_t> ud(0, n - 1);
  RowMatrixi m(rows, k);
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < k; ++c) m(i, c) = ud(rng);
  return m;
}

/// Varied positive weights in [0.2, 3.2) (non-uniform noise distribution).
inline std::vector<double> random_weights(index_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0.2, 3.2);
  std::vector<double> w(static_cast<std::size_t>(n));
  for (auto& x : w) x = u(rng);
  return w;
}

inline std::vector<double> normalised(const std::vector<double>& w) {
  double s = 0;
  for (double x : w) s += x;
  std::vector<double> p(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) p[i] = w[i] / s;
  return p;
}

inline std::vector<double> uniform_pn(index_t n) {
  return std::vector<double>(static_cast<std::size_t>(n), 1.0 / static_cast<double>(n));
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

inline double rel_err(double got, double want) { return std::abs(got - want) / std::abs(want); }

/// ||g - g_ref|| / ||g_ref||.
inline double grad_rel_err(const RowMatrixf& g, const RowMatrixd& ref) {
  return (g.cast<double>() - ref).norm() / ref.norm();
}

inline bool bits_equal(const RowMatrixf& a, const RowMatrixf& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}
inline bool bits_equal(const RowMatrixi& a, const RowMatrixi& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(index_t) * static_cast<std::size_t>(a.size())) == 0;
}
inline bool bits_equal(double a, double b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }

inline double cosine(const RowMatrixd& a, const RowMatrixd& b) {
  return (a.array() * b.array()).sum() / (a.norm() * b.norm());
}

// ---------------------------------------------------------------------------------------------
// References.

struct RefSpec {
  Objective objective = Objective::nce;
  NegativesMode mode = NegativesMode::per_sample;
  bool exclude_positive = false;
  double tau = 0.07;
  /// Z of NCE; NaN: use the importance estimate Zhat of these very draws (a first step).
  double z = std::numeric_limits<double>::quiet_NaN();
};

struct RefOut {
  double loss = 0;
  RowMatrixd grad;         ///< dL/df, B x D (with respect to the unit features)
  double zhat = 0;         ///< mean over the (query, draw) pairs of exp(s/tau) / P_n(j)
  double z_used = 0;       ///< Z that the NCE loss used
  double mean_p_pos = 0;   ///< exp(s_pos/tau)/Z (NCE) or softmax over K+1 (InfoNCE)
  double collision = 0;    ///< fraction of the B*K negatives equal to their query's positive
};

/// NCE or InfoNCE over the positive and K given negatives, in double.
/// V: bank rows (N x D), F: unit features (B x D), negs: B x K or 1 x K, pn: P_n(j) for every j.
inline RefOut reference_sampled(const RowMatrixd& V, const RowMatrixd& F,
                                std::span<const index_t> ids, const RowMatrixi& negs,
                                const std::vector<double>& pn, const RefSpec& spec) {
  const index_t B = F.rows();
  const index_t D = F.cols();
  const index_t K = negs.cols();
  const bool shared = spec.mode == NegativesMode::shared;
  const double tau = spec.tau;
  auto neg = [&](index_t i, index_t k) { return shared ? negs(0, k) : negs(i, k); };
  auto y = [&](index_t i) { return ids[static_cast<std::size_t>(i)]; };
  auto P = [&](index_t j) { return pn[static_cast<std::size_t>(j)]; };
  auto score = [&](index_t j, index_t i) { return V.row(j).dot(F.row(i)); };

  RefOut out;
  out.grad = RowMatrixd::Zero(B, D);

  // Importance estimate of Z over every (query, draw) pair (unconditional P_n).
  double zsum = 0;
  index_t collisions = 0;
  for (index_t i = 0; i < B; ++i)
    for (index_t k = 0; k < K; ++k) {
      zsum += std::exp(score(neg(i, k), i) / tau) / P(neg(i, k));
      if (neg(i, k) == y(i)) ++collisions;
    }
  out.zhat = zsum / static_cast<double>(B * K);
  out.collision = static_cast<double>(collisions) / static_cast<double>(B * K);

  // Mass removed from the noise distribution by exclusion, per query.
  std::vector<double> excluded_mass(static_cast<std::size_t>(B), 0.0);
  if (spec.exclude_positive) {
    if (shared) {
      std::vector<index_t> u(ids.begin(), ids.end());
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      double m = 0;
      for (index_t j : u) m += P(j);
      std::fill(excluded_mass.begin(), excluded_mass.end(), m);
    } else {
      for (index_t i = 0; i < B; ++i) excluded_mass[static_cast<std::size_t>(i)] = P(y(i));
    }
  }

  const double Kd = static_cast<double>(K);
  const double Bt = static_cast<double>(B) * tau;
  if (spec.objective == Objective::nce) {
    const double Z = std::isnan(spec.z) ? out.zhat : spec.z;
    out.z_used = Z;
    for (index_t i = 0; i < B; ++i) {
      const double sp = score(y(i), i);
      const double Pp = std::exp(sp / tau) / Z;
      const double hp = Pp / (Pp + Kd * P(y(i)));
      out.loss -= std::log(hp);
      out.grad.row(i) += (-(1.0 - hp) / Bt) * V.row(y(i));
      out.mean_p_pos += Pp;
      for (index_t k = 0; k < K; ++k) {
        const index_t j = neg(i, k);
        const double q = P(j) / (1.0 - excluded_mass[static_cast<std::size_t>(i)]);
        const double Pj = std::exp(score(j, i) / tau) / Z;
        const double h = Pj / (Pj + Kd * q);
        out.loss -= std::log(1.0 - h);
        out.grad.row(i) += (h / Bt) * V.row(j);
      }
    }
  } else {  // InfoNCE
    out.z_used = std::numeric_limits<double>::quiet_NaN();
    for (index_t i = 0; i < B; ++i) {
      std::vector<double> logit(static_cast<std::size_t>(K + 1));
      std::vector<index_t> row(static_cast<std::size_t>(K + 1));
      row[0] = y(i);
      logit[0] = score(y(i), i) / tau - std::log(P(y(i)));
      for (index_t k = 0; k < K; ++k) {
        const index_t j = neg(i, k);
        const double q = P(j) / (1.0 - excluded_mass[static_cast<std::size_t>(i)]);
        row[static_cast<std::size_t>(k + 1)] = j;
        logit[static_cast<std::size_t>(k + 1)] = score(j, i) / tau - std::log(q);
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double se = 0;
      for (double l : logit) se += std::exp(l - mx);
      const double lse = mx + std::log(se);
      out.loss += lse - logit[0];
      for (std::size_t t = 0; t < logit.size(); ++t) {
        const double p = std::exp(logit[t] - lse);
        if (t == 0) out.mean_p_pos += p;
        out.grad.row(i) += ((p - (t == 0 ? 1.0 : 0.0)) / Bt) * V.row(row[t]);
      }
    }
  }
  out.loss /= static_cast<double>(B);
  out.mean_p_pos /= static_cast<double>(B);
  return out;
}

struct FullOut {
  double loss = 0;
  RowMatrixd grad;
  double mean_z = 0;
  double mean_p_pos = 0;
};

/// Exact softmax over all N rows, every score materialised, log-sum-exp in double.
inline FullOut reference_full(const RowMatrixd& V, const RowMatrixd& F,
                              std::span<const index_t> ids, double tau) {
  const index_t B = F.rows();
  FullOut out;
  out.grad = RowMatrixd::Zero(B, F.cols());
  for (index_t i = 0; i < B; ++i) {
    const Eigen::VectorXd s = V * F.row(i).transpose() / tau;  // all N logits
    const double mx = s.maxCoeff();
    const double se = (s.array() - mx).exp().sum();
    const double lse = mx + std::log(se);
    const index_t y = ids[static_cast<std::size_t>(i)];
    out.loss += lse - s(y);
    out.mean_z += std::exp(lse);
    out.mean_p_pos += std::exp(s(y) - lse);
    const Eigen::VectorXd p = (s.array() - lse).exp();
    out.grad.row(i) = (p.transpose() * V - V.row(y)) / (static_cast<double>(B) * tau);
  }
  out.loss /= static_cast<double>(B);
  out.mean_z /= static_cast<double>(B);
  out.mean_p_pos /= static_cast<double>(B);
  return out;
}

/// Rows of X normalised (double).
inline RowMatrixd normalized_d(const RowMatrixd& X) {
  RowMatrixd F = X;
  for (index_t i = 0; i < F.rows(); ++i) F.row(i) /= F.row(i).norm();
  return F;
}

/// Chain rule through f = x / ||x||: dL/dx = (g - f (f . g)) / ||x||.
inline RowMatrixd grad_through_normalisation(const RowMatrixd& X, const RowMatrixd& g) {
  RowMatrixd out(X.rows(), X.cols());
  for (index_t i = 0; i < X.rows(); ++i) {
    const double n = X.row(i).norm();
    const Eigen::RowVectorXd f = X.row(i) / n;
    out.row(i) = (g.row(i) - f * f.dot(g.row(i))) / n;
  }
  return out;
}

/// Does `msg` contain `word` as a whole word (letters, digits, '_' delimit), case-insensitively?
inline bool mentions(const std::string& msg, const std::string& word) {
  auto lower = [](std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  const std::string m = lower(msg), w = lower(word);
  auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (std::size_t p = m.find(w); p != std::string::npos; p = m.find(w, p + 1)) {
    const bool left = p == 0 || !is_word(m[p - 1]);
    const bool right = p + w.size() >= m.size() || !is_word(m[p + w.size()]);
    if (left && right) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Engine construction for tests (the bank from a seed; alias weights from the same seed).

/// An engine over Bank(n, d, seed, dtype) with a uniform sampler, or an alias sampler whose weights are
/// random_weights() from a generator seeded by `seed`. `pn`, when given, receives P_n computed by
/// the test from those weights.
inline membank::Engine make_engine(index_t n, index_t d, bool alias, const membank::EngineConfig& cfg,
                                   std::uint64_t seed, std::vector<double>* pn = nullptr,
                                   membank::DType dtype = membank::DType::float32) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  membank::Bank bank(n, d, seed, dtype);
  std::unique_ptr<membank::NoiseSampler> sampler;
  if (alias) {
    const std::vector<double> w = random_weights(n, rng);
    if (pn) *pn = normalised(w);
    sampler = std::make_unique<membank::AliasSampler>(w);
  } else {
    if (pn) *pn = uniform_pn(n);
    sampler = std::make_unique<membank::UniformSampler>(n);
  }
  return membank::Engine(std::move(bank), std::move(sampler), cfg);
}

/// Sequential double reference of the momentum refresh: for b in batch order,
/// v[ids[b]] <- normalise(m v[ids[b]] + (1 - m) f[b]).
inline RowMatrixd reference_momentum(RowMatrixd V, std::span<const index_t> ids, const RowMatrixd& F,
                                     double m) {
  for (std::size_t b = 0; b < ids.size(); ++b) {
    Eigen::RowVectorXd v = m * V.row(ids[b]) + (1.0 - m) * F.row(static_cast<index_t>(b));
    V.row(ids[b]) = v / v.norm();
  }
  return V;
}

/// Forces an instruction set for a scope and restores the one active before.
class IsaScope {
 public:
  explicit IsaScope(membank::Isa isa) : saved_(membank::active_isa()) { membank::force_isa(isa); }
  ~IsaScope() { membank::force_isa(saved_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  membank::Isa saved_;
};

/// The instruction-set paths this CPU runs (scalar first).
inline std::vector<membank::Isa> supported_paths() {
  std::vector<membank::Isa> v;
  for (const membank::Isa isa : {membank::Isa::scalar, membank::Isa::avx2, membank::Isa::avx512})
    if (membank::cpu_supports(isa)) v.push_back(isa);
  return v;
}

/// Sets the OpenMP thread count for a scope and restores the previous value.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

}  // namespace mbtest
