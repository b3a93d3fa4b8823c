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
#include "objectives/objectives.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace membank::kernels::MEMBANK_KERNEL_NS {

namespace {

using detail::axpy;
using detail::dot;
using detail::prefetch_row;
using detail::squared_norm_d;
using objectives::Block;
using objectives::Entries;
using objectives::kBlock;  // rows scored, weighed and accumulated together per query
using objectives::Outcome;
using objectives::Weights;

constexpr idx kPrefetchRows = 8;  // rows ahead of the one being scored

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;

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

/// The objective O of a query, constructed with its scratch if it is buffered.
template <class O>
O make_objective(const ObjectiveParams& p, objectives::Positive pos, const QueryScratch& sc) {
  if constexpr (O::kBuffered)
    return O(p, pos, objectives::Workspace{sc.d, sc.i, sc.flags});
  else
    return O(p, pos);
}

/// A block's scores and log weights from score(r) and lw(r) for r < rows; the padding rows past
/// them get s = 0 and lw = -inf (every weight e^{... + lw} of theirs is 0).
template <class Score, class LogWeight>
inline void fill_block(Entries& x, idx rows, Score score, LogWeight lw) {
  for (idx r = 0; r < kBlock; ++r) {
    x.s[r] = r < rows ? score(r) : 0.0;
    x.lw[r] = r < rows ? lw(r) : -objectives::kInf;
  }
  x.rows = rows;
}

inline void scale_row(float* v, double factor, idx dim) {
  const auto f = static_cast<float>(factor);
  for (idx c = 0; c < dim; ++c) v[c] *= f;
}

/// Every objective's per-sample pass over one query: rows go in blocks of kBlock, their scores first
/// (independent dot products overlap), then the block's coefficients from the objective (vector
/// registers, Eigen's packet exp and log in double), then the weighted rows into the accumulators
/// while the rows are still in L1. A buffered objective sees all scores first; its rows are then
/// gathered a second time to accumulate.
template <class O>
void per_sample(const ObjectiveParams& p, const PerSampleQuery& q, QueryResult& out) {
  // Everything the loops read is copied into locals: `out` holds doubles that could alias the
  // query's own, and the compiler would reload them after every store.
  const float* const bank = q.bank;
  const idx stride = q.stride, dim = q.dim, kk = q.k;
  const idx* const ids = q.ids;
  const float* const log_pn = q.log_pn;
  const double lw_shift = q.lw_shift;
  const std::int32_t* const classes = q.classes;
  const std::int32_t cls = q.cls;
  const auto row = [=](idx r) { return bank + ids[r] * stride; };
  for (idx r = 0; r < min_idx(kPrefetchRows, kk); ++r) prefetch_row(row(r), dim);
  const float* const f = q.f;
  float* const acc1 = q.g;
  float* const acc2 = q.scratch.acc2;
  const float* const vy = q.vy;
  O obj = make_objective<O>(p, {static_cast<double>(dot(vy, f, dim)), q.lw_pos}, q.scratch);
  for (idx c = 0; c < dim; ++c) acc1[c] = 0.0f;
  if constexpr (O::kAccumulators == 2)
    for (idx c = 0; c < dim; ++c) acc2[c] = 0.0f;
  alignas(64) float s[kBlock];
  alignas(64) float w1[kBlock];
  alignas(64) float w2[kBlock];
  Entries x;
  x.same.setZero();
  Weights w;
  for (idx k0 = 0; k0 < kk; k0 += kBlock) {
    const idx rows = min_idx(kBlock, kk - k0);
    if constexpr (O::kLabels)
      for (idx r = 0; r < rows && k0 + kBlock + r < kk; ++r) __builtin_prefetch(classes + ids[k0 + kBlock + r]);
    score_block(row, k0, rows, kk, f, dim, s);
    fill_block(x, rows, [&](idx r) { return static_cast<double>(s[r]); },
               [&](idx r) { return lw_shift - log_pn[k0 + r]; });
    if constexpr (O::kLabels)
      for (idx r = 0; r < rows; ++r) x.same[r] = classes[ids[k0 + r]] == cls ? 1.0 : 0.0;
    if constexpr (O::kBuffered) {
      obj.collect(k0, x);
    } else {
      w.rescale1 = w.rescale2 = 1.0;
      obj.block(x, w);
      if (w.rescale1 != 1.0) scale_row(acc1, w.rescale1, dim);
      for (idx r = 0; r < rows; ++r) w1[r] = static_cast<float>(w.w1[r]);
      accumulate_block(row, k0, rows, w1, acc1, dim);
      if constexpr (O::kAccumulators == 2) {
        if (w.rescale2 != 1.0) scale_row(acc2, w.rescale2, dim);
        for (idx r = 0; r < rows; ++r) w2[r] = static_cast<float>(w.w2[r]);
        accumulate_block(row, k0, rows, w2, acc2, dim);
      }
    }
  }
  if constexpr (O::kBuffered) {
    float* const wk = q.scratch.w;
    obj.weights(wk);
    for (idx r = 0; r < min_idx(kPrefetchRows, kk); ++r) prefetch_row(row(r), dim);
    for (idx k0 = 0; k0 < kk; k0 += kBlock) {
      const idx rows = min_idx(kBlock, kk - k0);
      for (idx r = 0; r < rows && k0 + kPrefetchRows + r < kk; ++r) prefetch_row(row(k0 + kPrefetchRows + r), dim);
      accumulate_block(row, k0, rows, wk + k0, acc1, dim);
    }
  }
  const Outcome o = obj.finish();
  const double scale = q.coef_scale;
  const auto c1 = static_cast<float>(o.c1 * scale), c2 = static_cast<float>(o.c2 * scale),
             cp = static_cast<float>(o.c_pos * scale);
  if constexpr (O::kAccumulators == 2)
    for (idx c = 0; c < dim; ++c) acc1[c] = c1 * acc1[c] + c2 * acc2[c] + cp * vy[c];
  else
    for (idx c = 0; c < dim; ++c) acc1[c] = c1 * acc1[c] + cp * vy[c];
  idx collisions = 0;
  for (idx r = 0; r < kk; ++r) collisions += ids[r] == q.y;
  out.loss = o.loss;
  out.p_pos = o.p_pos;
  out.sum_exp = o.sum_exp;
  out.collisions = collisions;
}

void k_per_sample_query(const ObjectiveParams& p, const PerSampleQuery& q, QueryResult& out) {
  objectives::with_objective(p, [&](auto tag) { per_sample<typename decltype(tag)::type>(p, q, out); });
}

/// Every objective's pass over one query's row of a shared-negatives batch: the scores are there
/// already (one GEMM for the batch); the objective's weights replace them, each block's scaled by the
/// rescales that came after it, then combined into coef_scale dL/ds.
template <class O>
void shared(const ObjectiveParams& p, const SharedQuery& q, QueryResult& out) {
  float* const s = q.s;
  float* const w2 = q.scratch.w;  // the second accumulator's weights
  const idx kk = q.k;
  O obj = make_objective<O>(p, {q.s_pos, q.lw_pos}, q.scratch);
  Entries x;
  x.same.setZero();
  Weights w;
  const idx blocks = (kk + kBlock - 1) / kBlock;
  double* const rescale1 = q.rescale;
  double* const rescale2 = q.rescale + blocks;
  for (idx b = 0; b < blocks; ++b) {
    const idx k0 = b * kBlock, rows = min_idx(kBlock, kk - k0);
    fill_block(x, rows, [&](idx r) { return static_cast<double>(s[k0 + r]); },
               [&](idx r) { return static_cast<double>(q.lw[k0 + r]); });
    if constexpr (O::kLabels)  // a masked draw (exclude_same_label: lw = -inf) is no entry at all
      for (idx r = 0; r < rows; ++r)
        x.same[r] = q.neg_classes[k0 + r] == q.cls && x.lw[r] > -objectives::kInf ? 1.0 : 0.0;
    if constexpr (O::kBuffered) {
      obj.collect(k0, x);
    } else {
      w.rescale1 = w.rescale2 = 1.0;
      obj.block(x, w);
      rescale1[b] = w.rescale1;
      rescale2[b] = w.rescale2;
      for (idx r = 0; r < rows; ++r) s[k0 + r] = static_cast<float>(w.w1[r]);
      if constexpr (O::kAccumulators == 2)
        for (idx r = 0; r < rows; ++r) w2[k0 + r] = static_cast<float>(w.w2[r]);
    }
  }
  if constexpr (O::kBuffered) obj.weights(s);
  const Outcome o = obj.finish();
  const double scale = q.coef_scale;
  if constexpr (O::kBuffered) {
    for (idx j = 0; j < kk; ++j) s[j] = static_cast<float>(s[j] * o.c1 * scale);
  } else {
    // A block's weights are scaled by every rescale that came after it (the accumulator a
    // per-sample pass keeps would have been).
    double after1 = 1.0, after2 = 1.0;
    for (idx b = blocks - 1; b >= 0; --b) {
      const idx k0 = b * kBlock, rows = min_idx(kBlock, kk - k0);
      const double f1 = o.c1 * scale * after1, f2 = o.c2 * scale * after2;
      for (idx r = 0; r < rows; ++r) {
        double v = f1 * s[k0 + r];
        if constexpr (O::kAccumulators == 2) v += f2 * w2[k0 + r];
        s[k0 + r] = static_cast<float>(v);
      }
      after1 *= rescale1[b];
      after2 *= rescale2[b];
    }
  }
  idx collisions = 0;
  for (idx r = 0; r < kk; ++r) collisions += q.ids[r] == q.y;
  out.loss = o.loss;
  out.p_pos = o.p_pos;
  out.sum_exp = o.sum_exp;
  out.c_pos = o.c_pos * scale;
  out.collisions = collisions;
}

void k_shared_query(const ObjectiveParams& p, const SharedQuery& q, QueryResult& out) {
  objectives::with_objective(p, [&](auto tag) { shared<typename decltype(tag)::type>(p, q, out); });
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

const Table kTable{MEMBANK_STR(MEMBANK_KERNEL_NS), k_dot,      k_gather_dots,  k_per_sample_query, k_shared_query,
                   k_gemm_abt,                     k_gemm_ab_acc, k_gemm_atb,   k_softmax_tile,     k_first_at_least,
                   k_momentum_row};

}  // namespace

const Table& get() { return kTable; }

}  // namespace membank::kernels::MEMBANK_KERNEL_NS
