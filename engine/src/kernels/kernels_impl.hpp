// The bodies of the hot kernels (see kernels.hpp), compiled once per instruction set: a
// kernels_<isa>.cpp defines MEMBANK_KERNEL_NS (the path's name) and renames Eigen to a namespace of
// its own (`#define Eigen membank_eigen_<isa>`), then includes this file; CMake gives it the path's
// compiler flags. Everything here has internal linkage except MEMBANK_KERNEL_NS::get().
// No include guard: one inclusion per translation unit.
#ifndef MEMBANK_KERNEL_NS
#error "define MEMBANK_KERNEL_NS (and rename Eigen) before including kernels_impl.hpp"
#endif
#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE  // the engine splits work into fixed blocks itself
#endif

#include "kernels/kernels.hpp"

#include "detail/simd.hpp"
#include "detail/softplus.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace membank::kernels::MEMBANK_KERNEL_NS {

namespace {

using detail::axpy;
using detail::dot;
using detail::prefetch_row;
using detail::softplus_sigmoid;
using detail::squared_norm_d;

constexpr idx kPrefetchRows = 8;  // rows ahead of the one being scored
constexpr idx kBlock = 16;        // rows scored, weighed and accumulated together per query

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
using Block = Eigen::Array<double, kBlock, 1>;  // one value per row of a block

inline idx min_idx(idx a, idx b) { return a < b ? a : b; }

float k_dot(const float* a, const float* b, idx n) { return dot(a, b, n); }

void k_gather_dots(const float* bank, idx stride, idx dim, const idx* ids, idx k, const float* f, float* out) {
  for (idx r = 0; r < min_idx(kPrefetchRows, k); ++r) prefetch_row(bank + ids[r] * stride, dim);
  for (idx r = 0; r < k; ++r) {
    if (r + kPrefetchRows < k) prefetch_row(bank + ids[r + kPrefetchRows] * stride, dim);
    out[r] = dot(bank + ids[r] * stride, f, dim);
  }
}

/// Scores s[r] = row(k0 + r) . f for r < rows, prefetching kPrefetchRows ahead of each row read.
template <class RowFn>
inline void score_block(RowFn row, idx k0, idx rows, idx k, const float* f, idx dim, float* s) {
  for (idx r = 0; r < rows; ++r) {
    if (k0 + r + kPrefetchRows < k) prefetch_row(row(k0 + r + kPrefetchRows), dim);
    s[r] = dot(row(k0 + r), f, dim);
  }
}

/// g += sum_r w[r] row(k0 + r) for r < rows. The gradient row stays in registers, 64 floats at a
/// time, while the block's rows are added into it (one load and one store of g per block instead of
/// per row); each element receives the rows in order, as a sequence of axpy calls would give it.
template <class RowFn>
inline void accumulate_block(RowFn row, idx k0, idx rows, const float* w, float* g, idx dim) {
  // Sixteen floats of any alignment (GCC's and clang's vector extension; one 512-bit register, or
  // two or four narrower ones on the other paths).
  typedef float F16 __attribute__((vector_size(64), aligned(4), may_alias));
  constexpr idx kChunk = 64;
  idx c0 = 0;
  for (; c0 + kChunk <= dim; c0 += kChunk) {
    F16* gv = reinterpret_cast<F16*>(g + c0);
    F16 a0 = gv[0], a1 = gv[1], a2 = gv[2], a3 = gv[3];
    for (idx r = 0; r < rows; ++r) {
      const F16* v = reinterpret_cast<const F16*>(row(k0 + r) + c0);
      const float wr = w[r];
      a0 += wr * v[0];
      a1 += wr * v[1];
      a2 += wr * v[2];
      a3 += wr * v[3];
    }
    gv[0] = a0;
    gv[1] = a1;
    gv[2] = a2;
    gv[3] = a3;
  }
  if (c0 < dim)
    for (idx r = 0; r < rows; ++r) axpy(w[r], row(k0 + r) + c0, g + c0, dim - c0);
}

void k_per_sample_query(const PerSampleQuery& q, QueryResult& out) {
  // Everything the loops read is copied into locals: `out` holds doubles that could alias the
  // query's own, and the compiler would reload them after every store.
  const float* const bank = q.bank;
  const idx stride = q.stride, dim = q.dim, kk = q.k;
  const idx* const ids = q.ids;
  const float* const log_pn = q.log_pn;
  const double inv_tau = q.inv_tau, coef_scale = q.coef_scale;
  const auto row = [=](idx r) { return bank + ids[r] * stride; };
  for (idx r = 0; r < min_idx(kPrefetchRows, kk); ++r) prefetch_row(row(r), dim);
  const float* const f = q.f;
  float* const g = q.g;
  const float* const vy = q.vy;
  const double s_pos = dot(vy, f, dim);
  double loss = 0.0, p_pos = 0.0, sum_exp_a = 0.0;
  // Rows go in blocks of kBlock: their scores first (independent dot products overlap), then the
  // block's coefficients in vector registers (Eigen's packet exp and log, in double), then the
  // gradient from the same rows while they are still in L1.
  alignas(64) float s[kBlock];
  Block a;
  if (!q.info) {
    // NCE: a = s/tau - log Z - log(K P_n); h = sigmoid(a); -log(1 - h) = softplus(a).
    for (idx c = 0; c < dim; ++c) g[c] = 0.0f;
    double sp, h, ea;
    const double a_pos = s_pos * inv_tau - q.log_z - q.log_k - q.log_p_y;
    softplus_sigmoid(a_pos, sp, h, ea);
    loss = sp - a_pos;  // -log h
    p_pos = std::exp(s_pos * inv_tau - q.log_z);
    axpy(static_cast<float>(-(1.0 - h) * coef_scale), vy, g, dim);
    const double shift = -q.log_z - q.log_k + q.log_excl;
    for (idx k0 = 0; k0 < kk; k0 += kBlock) {
      const idx rows = min_idx(kBlock, kk - k0);
      score_block(row, k0, rows, kk, f, dim, s);
      for (idx r = 0; r < kBlock; ++r) a[r] = r < rows ? s[r] * inv_tau + shift - log_pn[k0 + r] : 0.0;
      const Block e = (-a.abs()).exp();  // in (0, 1]
      const Block one_e = 1.0 + e;
      const Block inv_one_e = one_e.inverse();
      const Block sigmoid = (a > 0.0).select(inv_one_e, e * inv_one_e);
      const Block exp_a = (a > 0.0).select(e.inverse(), e);
      // sum_r softplus(a_r) = sum_r max(a_r, 0) + log prod_r (1 + e_r): one log per block. Each
      // factor lies in [1, 2], so the product of 16 neither overflows nor loses more than 16 ulp.
      double positive_part = 0.0, product = 1.0;
      for (idx r = 0; r < rows; ++r) {
        positive_part += a[r] > 0.0 ? a[r] : 0.0;
        product *= one_e[r];
        sum_exp_a += exp_a[r];
        s[r] = static_cast<float>(sigmoid[r] * coef_scale);
      }
      loss += positive_part + std::log(product);
      accumulate_block(row, k0, rows, s, g, dim);
    }
  } else {
    // InfoNCE: online softmax over logits l = s/tau - log P_n; g holds acc = sum_j w_j v_j with
    // w_j = e^(l_j - m) until the end, rescaled (with the sums) whenever a block raises the max m.
    const double l_pos = s_pos * inv_tau - q.log_p_y;
    const double log_excl = q.log_excl;
    double m = l_pos, total = 1.0, neg_total = 0.0;
    for (idx c = 0; c < dim; ++c) g[c] = vy[c];
    for (idx k0 = 0; k0 < kk; k0 += kBlock) {
      const idx rows = min_idx(kBlock, kk - k0);
      score_block(row, k0, rows, kk, f, dim, s);
      double block_max = m;
      for (idx r = 0; r < rows; ++r) {
        a[r] = s[r] * inv_tau - log_pn[k0 + r] + log_excl;
        block_max = a[r] > block_max ? a[r] : block_max;
      }
      for (idx r = rows; r < kBlock; ++r) a[r] = block_max;
      if (block_max > m) {
        const double scale = std::exp(m - block_max);
        for (idx c = 0; c < dim; ++c) g[c] = static_cast<float>(g[c] * scale);
        total *= scale;
        neg_total *= scale;
        m = block_max;
      }
      const Block w = (a - m).exp();
      for (idx r = 0; r < rows; ++r) {
        total += w[r];
        neg_total += w[r];
        s[r] = static_cast<float>(w[r]);
      }
      accumulate_block(row, k0, rows, s, g, dim);
    }
    p_pos = std::exp(l_pos - m) / total;
    loss = -std::log(p_pos);
    sum_exp_a = neg_total * std::exp(m);
    const float ca = static_cast<float>(coef_scale / total);
    const float cb = static_cast<float>(coef_scale);
    for (idx c = 0; c < dim; ++c) g[c] = ca * g[c] - cb * vy[c];
  }
  idx collisions = 0;
  for (idx r = 0; r < kk; ++r) collisions += ids[r] == q.y;
  out.loss = loss;
  out.p_pos = p_pos;
  out.sum_exp_a = sum_exp_a;
  out.collisions = collisions;
}

void k_gemm_abt(idx m, idx n, idx d, float alpha, const float* a, idx lda, const float* b, idx ldb, float* c,
                idx ldc) {
  const CMap A(a, m, d, Eigen::OuterStride<>(lda));
  const CMap B(b, n, d, Eigen::OuterStride<>(ldb));
  MMap C(c, m, n, Eigen::OuterStride<>(ldc));
  if (alpha == 1.0f)
    C.noalias() = A * B.transpose();
  else
    C.noalias() = (A * B.transpose()) * alpha;
}

void k_gemm_ab_acc(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc) {
  const CMap A(a, m, kk, Eigen::OuterStride<>(lda));
  const CMap B(b, kk, n, Eigen::OuterStride<>(ldb));
  MMap C(c, m, n, Eigen::OuterStride<>(ldc));
  C.noalias() += A * B;
}

void k_gemm_atb(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc) {
  const CMap A(a, kk, m, Eigen::OuterStride<>(lda));
  const CMap B(b, kk, n, Eigen::OuterStride<>(ldb));
  MMap C(c, m, n, Eigen::OuterStride<>(ldc));
  C.noalias() = A.transpose() * B;
}

void k_nce_shared_row(float* s, const float* shift, idx k, float inv_tau, float coef_scale, double* loss,
                      double* sum_exp) {
  // Vectorised over the K negatives (fp32 Eigen packets): a = s/tau - log Z - log(K P_n),
  // -log(1 - h) = softplus(a), h = sigmoid(a); both from one exp(-|a|).
  Eigen::Map<Eigen::ArrayXf> srow(s, k);
  const Eigen::Map<const Eigen::ArrayXf> sh(shift, k);
  // Each array is materialised before its cast: a cast inside an expression would make Eigen
  // evaluate the whole expression one scalar at a time (libm's log1pf and exp per entry).
  const Eigen::ArrayXf a = srow * inv_tau - sh;
  const Eigen::ArrayXf e = (-a.abs()).exp();
  const Eigen::ArrayXf softplus = a.max(0.0f) + e.log1p();
  *loss += softplus.cast<double>().sum();
  const Eigen::ArrayXd a_d = a.cast<double>();
  *sum_exp += a_d.exp().sum();  // in double: e^a overflows fp32 beyond a ~ 88
  srow = (a > 0.0f).select(1.0f / (1.0f + e), e / (1.0f + e)) * coef_scale;
}

void k_softmax_tile(const float* f, idx batch, idx dim, const float* v, idx vstride, idx rows, float inv_tau,
                    float* s, idx lds, double* max, double* sum, float* acc) {
  const CMap F(f, batch, dim, Eigen::OuterStride<>(dim));
  const CMap V(v, rows, dim, Eigen::OuterStride<>(vstride));
  MMap S(s, batch, rows, Eigen::OuterStride<>(lds));
  MMap Acc(acc, batch, dim, Eigen::OuterStride<>(dim));
  S.noalias() = (F * V.transpose()) * inv_tau;
  for (idx i = 0; i < batch; ++i) {
    const double tile_max = static_cast<double>(S.row(i).maxCoeff());
    const double m_new = max[i] < tile_max ? tile_max : max[i];
    if (m_new > max[i]) {
      const double scale = std::exp(max[i] - m_new);  // 0 on the first tile
      sum[i] *= scale;
      Acc.row(i) *= static_cast<float>(scale);
      max[i] = m_new;
    }
    S.row(i) = (S.row(i).array() - static_cast<float>(m_new)).exp();
    sum[i] += S.row(i).template cast<double>().sum();
  }
  Acc.noalias() += S * V;
}

idx k_first_at_least(const float* s, idx from, idx n, float worst) {
  idx j = from;
  for (; j < n && (j & 15) != 0; ++j)
    if (!(s[j] < worst)) return j;
  // Whole blocks of 16: one vectorised max rejects 16 losers at once.
  for (; j + 16 <= n; j += 16) {
    float m = s[j];
#pragma omp simd reduction(max : m)
    for (idx t = 1; t < 16; ++t) m = m > s[j + t] ? m : s[j + t];
    if (!(m < worst)) break;
  }
  for (; j < n; ++j)
    if (!(s[j] < worst)) return j;
  return n;
}

void k_momentum_row(float* v, const float* f, float m, float one_minus_m, float* tmp, idx dim) {
  for (idx c = 0; c < dim; ++c) tmp[c] = m * v[c] + one_minus_m * f[c];
  double sq = squared_norm_d(tmp, dim);
  if (!(sq > 0.0)) {  // m v + (1 - m) f cancelled exactly: keep the new feature's direction
    for (idx c = 0; c < dim; ++c) tmp[c] = f[c];
    sq = squared_norm_d(tmp, dim);
  }
  const double inv = 1.0 / std::sqrt(sq);
  for (idx c = 0; c < dim; ++c) v[c] = static_cast<float>(tmp[c] * inv);
}

#define MEMBANK_STR2(x) #x
#define MEMBANK_STR(x) MEMBANK_STR2(x)

const Table kTable{MEMBANK_STR(MEMBANK_KERNEL_NS), k_dot,          k_gather_dots,    k_per_sample_query,
                   k_gemm_abt,                     k_gemm_ab_acc,  k_gemm_atb,       k_nce_shared_row,
                   k_softmax_tile,                 k_first_at_least, k_momentum_row};

}  // namespace

const Table& get() { return kTable; }

}  // namespace membank::kernels::MEMBANK_KERNEL_NS
