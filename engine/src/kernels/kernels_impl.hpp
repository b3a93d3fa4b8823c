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

#include "detail/half.hpp"
#include "detail/simd.hpp"
#include "objectives/objectives.hpp"

#include <Eigen/Core>

#include <bit>
#include <cmath>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>

namespace membank::kernels::MEMBANK_KERNEL_NS {

namespace {

using detail::axpy;
using detail::bf16;
using detail::dot;
using detail::f16;
using detail::load16;
using detail::widen;
using detail::prefetch_row;
using detail::squared_norm_d;
using objectives::Block;
using objectives::Entries;
using objectives::kBlock;  // rows scored, weighed and accumulated together per query
using objectives::Outcome;
using objectives::Weights;

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;

inline idx min_idx(idx a, idx b) { return a < b ? a : b; }

/// f(T{}) with T the element type of t (one instantiation of f per type).
template <class F>
decltype(auto) with_dtype(DType t, F f) {
  switch (t) {
    case DType::float16:
      return f(f16{});
    case DType::bfloat16:
      return f(bf16{});
    default:
      return f(float{});
  }
}

float k_dot(const void* a, DType t, const float* b, idx n) {
  return with_dtype(t, [&](auto tag) { return dot(static_cast<const decltype(tag)*>(a), b, n); });
}

/// Requests rows [from, min(to, k)).
template <class RowFn>
inline void prefetch_rows(RowFn row, idx from, idx to, idx k, idx dim) {
  for (idx r = from; r < min_idx(to, k); ++r) prefetch_row(row(r), dim);
}

/// Random rows are read a block of kBlock at a time, and every block's rows are requested one block
/// ahead: at the start of block [k0, k0 + kBlock) the next block's rows are prefetched, so that all
/// the work on a block (its scores, its weights, its accumulation) overlaps the next block's loads.
/// (Spreading the requests instead, the row 16 ahead requested at each row read, measured 1.8 to
/// 2.0 x the floor against 1.35 to 1.54 with whole blocks ahead, in the same runs.) The per-sample
/// stream requests its next block of 4-byte rows in quarters (stream_draws).
template <class RowFn>
inline void prefetch_block(RowFn row, idx k0, idx k, idx dim) {
  prefetch_rows(row, k0, k0 + kBlock, k, dim);
}

template <class T>
void gather_dots(const T* bank, idx stride, idx dim, const idx* ids, idx k, const float* f, float* out) {
  const auto row = [=](idx r) { return bank + ids[r] * stride; };
  prefetch_block(row, 0, k, dim);
  for (idx k0 = 0; k0 < k; k0 += kBlock) {
    prefetch_block(row, k0 + kBlock, k, dim);
    for (idx r = k0; r < min_idx(k0 + kBlock, k); ++r) out[r] = dot(row(r), f, dim);
  }
}

void k_gather_dots(const void* bank, DType t, idx stride, idx dim, const idx* ids, idx k, const float* f,
                   float* out) {
  with_dtype(t, [&](auto tag) {
    gather_dots(static_cast<const decltype(tag)*>(bank), stride, dim, ids, k, f, out);
  });
}

void k_gather_axpy(const void* bank, DType t, idx stride, idx dim, const idx* ids, idx k, const float* coef,
                   double* acc) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const auto row = [=](idx r) { return static_cast<const T*>(bank) + ids[r] * stride; };
    prefetch_block(row, 0, k, dim);
    for (idx k0 = 0; k0 < k; k0 += kBlock) {
      prefetch_block(row, k0 + kBlock, k, dim);
      for (idx r = k0; r < min_idx(k0 + kBlock, k); ++r) {
        const T* __restrict v = row(r);
        const double c = coef[r];
#pragma omp simd
        for (idx d = 0; d < dim; ++d) acc[d] += c * static_cast<double>(widen(v[d]));
      }
    }
  });
}

void k_widen(DType t, const void* src, float* dst, idx n) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const T* const p = static_cast<const T*>(src);
    idx c = 0;
    if constexpr (!std::is_same_v<T, float>)
      for (; c + 16 <= n; c += 16) {
        *reinterpret_cast<detail::V16*>(dst + c) = load16(p + c);  // V16: any alignment, may alias
      }
    for (; c < n; ++c) dst[c] = widen(p[c]);
  });
}

void k_narrow(DType t, const float* src, void* dst, idx n, const std::uint32_t* random) {
  if (t == DType::float32) {
    __builtin_memcpy(dst, src, static_cast<std::size_t>(n) * 4);
    return;
  }
  if (random) {
    with_dtype(t, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, float>) {
        T* const p = static_cast<T*>(dst);
        for (idx c = 0; c < n; ++c) p[c] = detail::round_stochastic<T>(src[c], random[c]);
      }
    });
    return;
  }
  if (t == DType::bfloat16) {
    bf16* const p = static_cast<bf16*>(dst);
    for (idx c = 0; c < n; ++c) p[c] = detail::to_bf16(src[c]);
    return;
  }
  f16* const p = static_cast<f16*>(dst);
  idx c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; c + 8 <= n; c += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + c),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; c < n; ++c) p[c] = detail::to_f16(src[c]);
}

/// g += sum_r w[r] row(k0 + r) for r < rows (and, with kTwo, g2 += sum_r w2[r] row(k0 + r) in the same
/// pass: each row is loaded once for both). The gradient rows stay in registers, kChunk floats at a
/// time, while the block's rows are added into them (one load and one store of g per block instead
/// of per row); each element receives the rows in order, as a sequence of axpy calls would give it.
/// With 32 vector registers (AVX-512) a chunk is 128 floats, one pass over the rows for D = 128 and
/// eight independent multiply-add chains (two 64-float passes measured about 0.03 x the floor
/// slower); with 16 registers 64 floats, so that the accumulators and a row's chunk fit.
template <bool kTwo = false, class RowFn>
inline void accumulate_block(RowFn row, idx k0, idx rows, const float* w, float* g, idx dim,
                             const float* w2 = nullptr, float* g2 = nullptr) {
  using F16 = detail::V16;
#if defined(__AVX512F__)
  constexpr int kVectors = 8;
#else
  constexpr int kVectors = 4;
#endif
  constexpr idx kChunk = 16 * kVectors;
  idx c0 = 0;
  for (; c0 + kChunk <= dim; c0 += kChunk) {
    F16* const gv = reinterpret_cast<F16*>(g + c0);
    F16* const hv = kTwo ? reinterpret_cast<F16*>(g2 + c0) : nullptr;
    F16 a[kVectors], b[kVectors];
    for (int u = 0; u < kVectors; ++u) {
      a[u] = gv[u];
      if constexpr (kTwo) b[u] = hv[u];
    }
    for (idx r = 0; r < rows; ++r) {
      const auto* const p = row(k0 + r) + c0;  // any element type: widened 16 at a time
      const float wr = w[r];
      if constexpr (kTwo) {
        const float ur = w2[r];
        for (int u = 0; u < kVectors; ++u) {
          const F16 v = load16(p + 16 * u);
          a[u] += wr * v;
          b[u] += ur * v;
        }
      } else {
        for (int u = 0; u < kVectors; ++u) a[u] += wr * load16(p + 16 * u);
      }
    }
    for (int u = 0; u < kVectors; ++u) {
      gv[u] = a[u];
      if constexpr (kTwo) hv[u] = b[u];
    }
  }
  // What is left of the row, 16 at a time (D = 64 on AVX-512, say), then element by element; each
  // element still receives the rows in order.
  for (; c0 + 16 <= dim; c0 += 16) {
    F16* const gv = reinterpret_cast<F16*>(g + c0);
    F16* const hv = kTwo ? reinterpret_cast<F16*>(g2 + c0) : nullptr;
    F16 a = *gv, b{};
    if constexpr (kTwo) b = *hv;
    for (idx r = 0; r < rows; ++r) {
      const F16 v = load16(row(k0 + r) + c0);
      a += w[r] * v;
      if constexpr (kTwo) b += w2[r] * v;
    }
    *gv = a;
    if constexpr (kTwo) *hv = b;
  }
  if (c0 < dim)
    for (idx r = 0; r < rows; ++r) {
      axpy(w[r], row(k0 + r) + c0, g + c0, dim - c0);
      if constexpr (kTwo) axpy(w2[r], row(k0 + r) + c0, g2 + c0, dim - c0);
    }
}

/// The objective O of a query, constructed with its workspace if it takes its positives first.
template <class O>
O make_objective(const ObjectiveParams& p, objectives::Positive pos, const QueryScratch& sc) {
  if constexpr (objectives::kPositivesFirst<O>)
    return O(p, pos, objectives::Workspace{sc.d, sc.i});
  else
    return O(p, pos);
}

/// A block's scores and log weights from score(r) and lw(r) for r < rows; the padding rows past
/// them get s = 0 and lw = -inf (every weight e^{... + lw} of theirs is 0).
template <class Score, class LogWeight>
inline void fill_block(Entries& x, idx rows, Score score, LogWeight lw) {
  if (rows == kBlock) {  // a whole block: no per-row condition, so the loads and widenings vectorise
    for (idx r = 0; r < kBlock; ++r) {
      x.s[r] = score(r);
      x.lw[r] = lw(r);
    }
  } else {
    for (idx r = 0; r < kBlock; ++r) {
      x.s[r] = r < rows ? score(r) : 0.0;
      x.lw[r] = r < rows ? lw(r) : -objectives::kInf;
    }
  }
  x.rows = rows;
}

inline void scale_row(float* v, double factor, idx dim) {
  const auto f = static_cast<float>(factor);
  for (idx c = 0; c < dim; ++c) v[c] *= f;
}

/// What the per-sample passes over one query share, copied into locals: `out` holds doubles that
/// could alias the query's own, and the compiler would reload them after every store.
template <class T>
struct QueryView {
  const T* bank;
  idx stride, dim, k;
  const idx* ids;
  const float* log_pn;
  double lw_shift;
  const float* f;
  float *acc1, *acc2;
  explicit QueryView(const PerSampleQuery& q)
      : bank(static_cast<const T*>(q.bank)), stride(q.stride), dim(q.dim), k(q.k), ids(q.ids), log_pn(q.log_pn), lw_shift(q.lw_shift),
        f(q.f), acc1(q.g), acc2(q.scratch.acc2) {}
  const T* row(idx j) const { return bank + ids[j] * stride; }
  double lw(idx j) const { return lw_shift - log_pn[j]; }
};

/// The labels of a query's draws, for the objectives with kLabels; C is the class table's entry type.
template <class C>
struct DrawLabels {
  const C* classes;  ///< every instance's class
  const idx* ids;
  C cls;             ///< the query's
  double same(idx j) const { return classes[ids[j]] == cls ? 1.0 : 0.0; }
  idx is_same(idx j) const { return classes[ids[j]] == cls ? 1 : 0; }
  void prefetch(idx j) const { detail::prefetch_line(classes + ids[j]); }
};
using NoLabels = DrawLabels<std::uint8_t>;  ///< the type of a null labels argument

/// f(labels) for the query's draws, with its class table's own entry type (one instantiation of f
/// per width, so that no read of a label branches on the width).
template <class F>
void with_labels(const PerSampleQuery& q, const idx* ids, F f) {
  switch (q.classes.width) {
    case 1:
      f(DrawLabels<std::uint8_t>{static_cast<const std::uint8_t*>(q.classes.data), ids, static_cast<std::uint8_t>(q.cls)});
      break;
    case 2:
      f(DrawLabels<std::uint16_t>{static_cast<const std::uint16_t*>(q.classes.data), ids,
                                  static_cast<std::uint16_t>(q.cls)});
      break;
    default:
      f(DrawLabels<std::int32_t>{static_cast<const std::int32_t*>(q.classes.data), ids, q.cls});
  }
}

/// Streams the draws at(0), ..., at(n - 1) through the objective in blocks of kBlock: each block's
/// rows are scored, weighed by the objective and added into the accumulators while in L1, and the
/// next block's rows (and labels) are requested before the block's work begins -- with kDrawAhead,
/// right after drawing that block (refill), so that drawing too overlaps the loads in flight.
template <bool kDrawAhead, class O, class T, class At, class L = NoLabels>
void stream_draws(O& obj, const QueryView<T>& v, const Refill& refill, idx n, At at, const L* labels = nullptr) {
  const T* const bank = v.bank;
  const idx* const ids = v.ids;
  const idx stride = v.stride;
  const auto row = [=](idx t) { return bank + ids[at(t)] * stride; };
  // Draws are made kDrawPiece at a time (fewer, longer calls into the sampler's vectorised
  // generator), each piece just before the first of its rows is requested.
  constexpr idx kDrawPiece = 4 * kBlock;
  idx drawn = 0;
  if constexpr (kDrawAhead) {
    drawn = min_idx(kDrawPiece, n);
    refill(0, drawn);
  }
  prefetch_block(row, 0, n, v.dim);
  alignas(64) float s[kBlock];
  alignas(64) float wf[kBlock];
  alignas(64) float wf2[kBlock];
  Entries x;
  x.same.setZero();
  for (idx t0 = 0; t0 < n; t0 += kBlock) {
    const idx rows = min_idx(kBlock, n - t0), next = t0 + kBlock;
    if constexpr (kDrawAhead)
      if (next < n && next >= drawn) {
        refill(drawn, min_idx(drawn + kDrawPiece, n));
        drawn = min_idx(drawn + kDrawPiece, n);
      }
    // The next block's rows are requested a quarter at a time (4 rows: 32 lines of a 128-float row),
    // at four points of the block's work: before the scores, halfway through them, before the
    // weights and before the accumulation. A core holds only a few dozen lines in flight: a whole
    // block's 128 requests at once wait for room, the core with them, and little is in flight while
    // the block is weighed and accumulated. In quarters the requests overlap that work: 1.28 to 1.31
    // x the gather floor, from 1.53 to 1.55 with the whole block at once (uniform draws, NCE, builds
    // alternated). Smaller pieces (2 rows, eight times a block) measured 1.49. Rows of 2-byte types
    // (half the lines) keep the whole block at the first point: halves measured 2.04 to 2.06 against
    // 1.99. (A partial block is the last: its next rows are none.)
    const auto request_next = [&](idx point) {
      if constexpr (sizeof(T) == 4)
        prefetch_rows(row, next + point * (kBlock / 4), next + (point + 1) * (kBlock / 4), n, v.dim);
      else if (point == 0)
        prefetch_block(row, next, n, v.dim);
    };
    request_next(0);
    if (labels)
      for (idx t = next; t < min_idx(next + kBlock, n); ++t) labels->prefetch(at(t));
    for (idx r = 0; r < rows; ++r) {
      if (r == kBlock / 2) request_next(1);
      s[r] = dot(row(t0 + r), v.f, v.dim);
    }
    request_next(2);
    fill_block(x, rows, [&](idx r) { return static_cast<double>(s[r]); }, [&](idx r) { return v.lw(at(t0 + r)); });
    if (labels)
      for (idx r = 0; r < kBlock; ++r) x.same[r] = r < rows ? labels->same(at(t0 + r)) : 0.0;  // padding: 0
    Weights w;
    obj.block(x, w);
    request_next(3);
    if (w.rescale1 != 1.0) scale_row(v.acc1, w.rescale1, v.dim);
    for (idx r = 0; r < rows; ++r) wf[r] = static_cast<float>(w.w1[r]);
    if constexpr (O::kAccumulators == 2) {
      if (w.rescale2 != 1.0) scale_row(v.acc2, w.rescale2, v.dim);
      for (idx r = 0; r < rows; ++r) wf2[r] = static_cast<float>(w.w2[r]);
      accumulate_block<true>(row, t0, rows, wf, v.acc1, v.dim, wf2, v.acc2);
    } else {
      accumulate_block(row, t0, rows, wf, v.acc1, v.dim);
    }
  }
}

/// An objective that takes its positives first: every draw of the query's label is scored and
/// handed in, then the other draws stream through it as negatives, then the positives' rows are
/// added with their coefficients (known only after the last negative). Rows read: K + |P|.
template <class O, class T>
void positives_first(O& obj, const QueryView<T>& v, const PerSampleQuery& q) {
  const idx kk = v.k;
  q.refill(0, kk);
  idx* const pos = q.scratch.i + (kk + 1);  // the draws of the query's label, then the others
  idx* const neg = pos + (kk + 1);
  idx n_pos = 0, n_neg = 0;
  // Without a branch (about one draw in ten, at random, is a positive with ten classes): each draw
  // is written to both lists and only its own list's count advances. Labels are requested 64 draws
  // ahead (a random read each).
  constexpr idx kAhead = 64;
  with_labels(q, v.ids, [&](const auto& labels) {
    for (idx j = 0; j < min_idx(kAhead, kk); ++j) labels.prefetch(j);
    for (idx j = 0; j < kk; ++j) {
      if (j + kAhead < kk) labels.prefetch(j + kAhead);
      const idx same = labels.is_same(j);
      pos[n_pos] = j;
      neg[n_neg] = j;
      n_pos += same;
      n_neg += 1 - same;
    }
  });
  const T* const bank = v.bank;
  const idx* const ids = v.ids;
  const idx stride = v.stride;
  const auto pos_row = [=](idx t) { return bank + ids[pos[t]] * stride; };
  prefetch_block(pos_row, 0, n_pos, v.dim);
  for (idx t0 = 0; t0 < n_pos; t0 += kBlock) {
    prefetch_block(pos_row, t0 + kBlock, n_pos, v.dim);
    for (idx t = t0; t < min_idx(t0 + kBlock, n_pos); ++t)
      obj.positive(pos[t], static_cast<double>(dot(pos_row(t), v.f, v.dim)), std::exp(v.lw(pos[t])));
  }
  obj.begin_negatives();
  stream_draws<false>(obj, v, q.refill, n_neg, [=](idx t) { return neg[t]; });  // all other labels
  // The positives, in the objective's order; the own row (draw K) has its own coefficient.
  float* const w = q.scratch.w;
  obj.positive_weights(w);
  const idx n = obj.positive_count();
  const idx* const order = obj.positive_order();
  const T* const vy = static_cast<const T*>(q.vy);
  const auto sorted_row = [=](idx c) { return order[c] == kk ? vy : bank + ids[order[c]] * stride; };
  prefetch_block(sorted_row, 0, n, v.dim);
  for (idx c0 = 0; c0 < n; c0 += kBlock) {
    prefetch_block(sorted_row, c0 + kBlock, n, v.dim);
    accumulate_block(sorted_row, c0, min_idx(kBlock, n - c0), w + c0, v.acc1, v.dim);
  }
}

/// Every objective's per-sample pass over one query: its draws are drawn, scored, weighed and
/// accumulated a block at a time (stream_draws), or positives first for the objectives that need
/// them; dL/df = c1 acc1 + c2 acc2 + c_pos v_pos at the end.
template <class O, class T>
void per_sample(const ObjectiveParams& p, const PerSampleQuery& q, QueryResult& out) {
  const QueryView<T> v(q);
  const idx dim = v.dim, kk = v.k;
  const T* const vy = static_cast<const T*>(q.vy);
  O obj = make_objective<O>(p, {static_cast<double>(dot(vy, v.f, dim)), q.lw_pos}, q.scratch);
  for (idx c = 0; c < dim; ++c) v.acc1[c] = 0.0f;
  if constexpr (O::kAccumulators == 2)
    for (idx c = 0; c < dim; ++c) v.acc2[c] = 0.0f;
  if constexpr (objectives::kPositivesFirst<O>) {
    positives_first(obj, v, q);
  } else if constexpr (O::kLabels) {
    with_labels(q, v.ids, [&](const auto& labels) {
      stream_draws<true>(obj, v, q.refill, kk, [](idx t) { return t; }, &labels);
    });
  } else {
    stream_draws<true>(obj, v, q.refill, kk, [](idx t) { return t; });
  }
  const Outcome o = obj.finish();
  const double scale = q.coef_scale;
  const auto c1 = static_cast<float>(o.c1 * scale), c2 = static_cast<float>(o.c2 * scale),
             cp = static_cast<float>(o.c_pos * scale);
  float* const acc1 = v.acc1;
  const float* const acc2 = v.acc2;
  if constexpr (O::kAccumulators == 2)
    for (idx c = 0; c < dim; ++c) acc1[c] = c1 * acc1[c] + c2 * acc2[c] + cp * widen(vy[c]);
  else
    for (idx c = 0; c < dim; ++c) acc1[c] = c1 * acc1[c] + cp * widen(vy[c]);
  idx collisions = 0;
  for (idx r = 0; r < kk; ++r) collisions += v.ids[r] == q.y;
  out.loss = o.loss;
  out.p_pos = o.p_pos;
  out.sum_exp = o.sum_exp;
  out.collisions = collisions;
}

void k_per_sample_query(const ObjectiveParams& p, const PerSampleQuery& q, QueryResult& out) {
  with_dtype(q.dtype, [&](auto element) {
    objectives::with_objective(p, [&](auto tag) { per_sample<typename decltype(tag)::type, decltype(element)>(p, q, out); });
  });
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
  const auto same = [&](idx j) {  // a masked draw (exclude_same_label: lw = -inf) is no entry at all
    return q.neg_classes[j] == q.cls && q.lw[j] > -objectives::kInf ? 1.0 : 0.0;
  };
  Outcome o;
  if constexpr (objectives::kPositivesFirst<O>) {
    idx* const neg = q.scratch.i + (kk + 1);
    idx n_neg = 0;
    for (idx j = 0; j < kk; ++j) {
      if (same(j) > 0.0)
        obj.positive(j, static_cast<double>(s[j]), std::exp(static_cast<double>(q.lw[j])));
      else
        neg[n_neg++] = j;
    }
    obj.begin_negatives();
    Entries x;
    x.same.setZero();
    Weights w;
    for (idx t0 = 0; t0 < n_neg; t0 += kBlock) {
      const idx rows = min_idx(kBlock, n_neg - t0);
      fill_block(x, rows, [&](idx r) { return static_cast<double>(s[neg[t0 + r]]); },
                 [&](idx r) { return static_cast<double>(q.lw[neg[t0 + r]]); });
      obj.block(x, w);
      for (idx r = 0; r < rows; ++r) s[neg[t0 + r]] = static_cast<float>(w.w1[r]);
    }
    obj.positive_weights(w2);
    const idx* const order = obj.positive_order();
    for (idx c = 0; c < obj.positive_count(); ++c)
      if (order[c] < kk) s[order[c]] = w2[c];
    o = obj.finish();
    const double f1 = o.c1 * q.coef_scale;
    for (idx j = 0; j < kk; ++j) s[j] = static_cast<float>(s[j] * f1);
  } else {
    Entries x;
    x.same.setZero();
    const idx blocks = (kk + kBlock - 1) / kBlock;
    double* const rescale1 = q.rescale;
    double* const rescale2 = q.rescale + blocks;
    for (idx b = 0; b < blocks; ++b) {
      const idx k0 = b * kBlock, rows = min_idx(kBlock, kk - k0);
      fill_block(x, rows, [&](idx r) { return static_cast<double>(s[k0 + r]); },
                 [&](idx r) { return static_cast<double>(q.lw[k0 + r]); });
      if constexpr (O::kLabels)
        for (idx r = 0; r < kBlock; ++r) x.same[r] = r < rows ? same(k0 + r) : 0.0;  // padding: 0
      Weights w;
      obj.block(x, w);
      rescale1[b] = w.rescale1;
      rescale2[b] = w.rescale2;
      for (idx r = 0; r < rows; ++r) s[k0 + r] = static_cast<float>(w.w1[r]);
      if constexpr (O::kAccumulators == 2)
        for (idx r = 0; r < rows; ++r) w2[k0 + r] = static_cast<float>(w.w2[r]);
    }
    o = obj.finish();
    // A block's weights are scaled by every rescale that came after it (the accumulator a
    // per-sample pass keeps would have been).
    const double scale = q.coef_scale;
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
  out.c_pos = o.c_pos * q.coef_scale;
  out.collisions = collisions;
}

void k_shared_query(const ObjectiveParams& p, const SharedQuery& q, QueryResult& out) {
  objectives::with_objective(p, [&](auto tag) { shared<typename decltype(tag)::type>(p, q, out); });
}

void k_keyed_info_nce(double inv_tau, double s_pos, double coef_scale, float* s, idx k, QueryResult& out) {
  // Float exponentials, 16 lanes (the double ones of this Eigen run a lane at a time behind a
  // float-to-double cast): each e^{l_j - m} to about 1e-7 (|s_j| / tau) relative, summed in fp32 per
  // chunk of 1024 and the chunks in double, in order.
  constexpr idx kChunk = 1024;
  Eigen::Map<Eigen::ArrayXf> x(s, k);
  const double l_pos = s_pos * inv_tau;
  const double s_max = k > 0 ? static_cast<double>(x.maxCoeff()) : -objectives::kInf;
  const double m = l_pos > s_max * inv_tau ? l_pos : s_max * inv_tau;  // inv_tau > 0: the largest logit
  const auto inv_tau_f = static_cast<float>(inv_tau), m_f = static_cast<float>(m);
  double sum = 0.0;  // sum_j e^{l_j - m}
  // Each chunk through an aligned buffer: Eigen's vectorised loops start with scalar elements up to
  // the first aligned one, so on the row itself the exponentials (scalar and vector ones differ in the
  // last bit) and the sum would depend on the row's address.
  alignas(64) float buf[kChunk];
  for (idx c0 = 0; c0 < k; c0 += kChunk) {
    const idx n = min_idx(kChunk, k - c0);
    Eigen::Map<Eigen::ArrayXf, Eigen::Aligned64> chunk(buf, n);
    chunk = x.segment(c0, n);
    chunk = (chunk * inv_tau_f - m_f).exp();
    sum += static_cast<double>(chunk.sum());
    x.segment(c0, n) = chunk;
  }
  const double e_pos = std::exp(l_pos - m);
  const double total = e_pos + sum;
  x *= static_cast<float>(inv_tau * coef_scale / total);  // p_j / tau, times coef_scale
  out.loss = std::log(total) + m - l_pos;
  out.p_pos = e_pos / total;
  out.c_pos = (out.p_pos - 1.0) * inv_tau * coef_scale;
  out.sum_exp = sum * std::exp(m);
}

void k_gemm_abt(idx m, idx n, idx d, float alpha, const float* a, idx lda, const float* b, idx ldb, float* c,
                idx ldc) {
  const CMap A(a, m, d, Eigen::OuterStride<>(lda));
  const CMap B(b, n, d, Eigen::OuterStride<>(ldb));
  MMap C(c, m, n, Eigen::OuterStride<>(ldc));
  C.noalias() = A * B.transpose();  // a matrix product (`(A B^T) * alpha` would be coefficient-wise)
  if (alpha != 1.0f) C *= alpha;
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
  // The plain product (a matrix product; Eigen evaluates `(F V^T) * inv_tau` coefficient by
  // coefficient instead), the scale applied in the pass that exponentiates. max(x) inv_tau equals
  // max(x inv_tau): scaling by a positive number keeps the order through rounding.
  S.noalias() = F * V.transpose();
  for (idx i = 0; i < batch; ++i) {
    const double tile_max = static_cast<double>(S.row(i).maxCoeff() * inv_tau);
    const double m_new = max[i] < tile_max ? tile_max : max[i];
    if (m_new > max[i]) {
      const double scale = std::exp(max[i] - m_new);  // 0 on the first tile
      sum[i] *= scale;
      Acc.row(i) *= static_cast<float>(scale);
      max[i] = m_new;
    }
    S.row(i) = (S.row(i).array() * inv_tau - static_cast<float>(m_new)).exp();
    sum[i] += S.row(i).template cast<double>().sum();
  }
  Acc.noalias() += S * V;
}

// kNN's fused scan (k_knn_pack, k_knn_scan). A register tile of kKnnGroup queries x kKnnPanel bank
// rows is accumulated over d with one multiply-add per element, then each query's scores are
// compared with its threshold while still in registers: the scores reach memory only when one beats
// its threshold. Per path: the vector, how many queries share a loaded panel, how many vectors make
// a panel (the accumulators fill most of the registers, with room for the panel and one broadcast).
#if defined(__AVX512F__)
using KVec = __m512;
constexpr int kLanes = 16, kKnnGroup = 12, kPanelVecs = 2;  // 24 accumulators of 32 registers
inline KVec kv_zero() { return _mm512_setzero_ps(); }
inline KVec kv_load(const float* p) { return _mm512_loadu_ps(p); }
inline KVec kv_splat(float x) { return _mm512_set1_ps(x); }
inline KVec kv_fma(KVec a, KVec b, KVec c) { return _mm512_fmadd_ps(a, b, c); }
inline std::uint32_t kv_above(KVec s, float t) { return _mm512_cmp_ps_mask(s, _mm512_set1_ps(t), _CMP_GT_OQ); }
#elif defined(__AVX2__)
using KVec = __m256;
constexpr int kLanes = 8, kKnnGroup = 4, kPanelVecs = 3;  // 12 accumulators of 16 registers
inline KVec kv_zero() { return _mm256_setzero_ps(); }
inline KVec kv_load(const float* p) { return _mm256_loadu_ps(p); }
inline KVec kv_splat(float x) { return _mm256_set1_ps(x); }
inline KVec kv_fma(KVec a, KVec b, KVec c) { return _mm256_fmadd_ps(a, b, c); }
inline std::uint32_t kv_above(KVec s, float t) {
  return static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_set1_ps(t), _CMP_GT_OQ)));
}
#else
typedef float KVec __attribute__((vector_size(16)));  // the compiler's generic vectors (SSE2 on x86-64)
constexpr int kLanes = 4, kKnnGroup = 4, kPanelVecs = 2;  // 8 accumulators of 16 registers
inline KVec kv_zero() { return KVec{}; }
inline KVec kv_load(const float* p) { return KVec{p[0], p[1], p[2], p[3]}; }
inline KVec kv_splat(float x) { return KVec{x, x, x, x}; }
inline KVec kv_fma(KVec a, KVec b, KVec c) { return a * b + c; }  // ISO C++: never contracted
inline std::uint32_t kv_above(KVec s, float t) {
  std::uint32_t m = 0;
  for (int l = 0; l < kLanes; ++l) m |= (s[l] > t ? 1u : 0u) << l;  // NaN never counts as above
  return m;
}
#endif
constexpr idx kKnnPanel = kLanes * kPanelVecs;

/// The keys of the lanes set in `mask` of one vector of scores (lane l: row row0 + l), in lane
/// order, appended at out + count. AVX-512 builds all the lane's keys in registers and stores them
/// compressed (in registers: a compressing store is slow on some cores), writing up to 8 keys past
/// the last kept; elsewhere one step of a loop over the mask's bits per key.
__attribute__((always_inline)) inline void kv_take(KVec s, std::uint32_t mask, std::uint32_t row0, std::uint64_t* out,
                                                   idx& count) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_castps_si512(_mm512_add_ps(s, _mm512_setzero_ps()));  // -0 as +0
  // rank_key's upper half, ~(bits ^ (sign ? all ones : the sign bit)), for 16 lanes at once.
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(INT32_MIN));
  const __m512i upper = _mm512_xor_si512(_mm512_xor_si512(bits, flip), _mm512_set1_epi32(-1));
  const __m512i rows = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(row0)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const auto keys = [](__m256i u, __m256i r) {
    return _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(u), 32), _mm512_cvtepu32_epi64(r));
  };
  const __m512i lo = keys(_mm512_castsi512_si256(upper), _mm512_castsi512_si256(rows));
  const __m512i hi = keys(_mm512_extracti64x4_epi64(upper, 1), _mm512_extracti64x4_epi64(rows, 1));
  const auto m0 = static_cast<__mmask8>(mask & 0xffu), m1 = static_cast<__mmask8>(mask >> 8);
  _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi64(m0, lo));
  count += std::popcount(static_cast<unsigned>(m0));
  _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi64(m1, hi));
  count += std::popcount(static_cast<unsigned>(m1));
#else
  alignas(32) float lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = s[l];
  for (; mask != 0; mask &= mask - 1) {
    const int l = std::countr_zero(mask);
    out[count++] = rank_key(lane[l], row0 + static_cast<std::uint32_t>(l));
  }
#endif
}

#if defined(__AVX512F__)
/// Columns 0 .. 15 of 16 rows (src, ld) to out + c kKnnPanel for column c, 16 floats each (one per
/// row): a 16 x 16 transpose in registers. Unpacking pairs of rows, then pairs of pairs, leaves in
/// 128-bit lane j of u[4 b + m] column 4 j + m of rows 4 b .. 4 b + 3; two rounds of lane shuffles
/// gather each column's four lanes.
__attribute__((always_inline)) inline void transpose16(const float* src, idx ld, float* out) {
  __m512 r[16], u[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * b], r[4 * b + 1]));
    const __m512d t1 = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * b], r[4 * b + 1]));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(r[4 * b + 2], r[4 * b + 3]));
    const __m512d t3 = _mm512_castps_pd(_mm512_unpackhi_ps(r[4 * b + 2], r[4 * b + 3]));
    u[4 * b] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    // 0x88 takes lanes 0 and 2 of each operand, 0xdd lanes 1 and 3.
    const __m512 lo0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), hi0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xdd);
    const __m512 lo1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 hi1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xdd);
    _mm512_storeu_ps(out + m * kKnnPanel, _mm512_shuffle_f32x4(lo0, lo1, 0x88));
    _mm512_storeu_ps(out + (8 + m) * kKnnPanel, _mm512_shuffle_f32x4(lo0, lo1, 0xdd));
    _mm512_storeu_ps(out + (4 + m) * kKnnPanel, _mm512_shuffle_f32x4(hi0, hi1, 0x88));
    _mm512_storeu_ps(out + (12 + m) * kKnnPanel, _mm512_shuffle_f32x4(hi0, hi1, 0xdd));
  }
}
#endif

void k_knn_pack(const float* v, idx rows, idx dim, idx ld, float* out) {
  for (idx p0 = 0; p0 < rows; p0 += kKnnPanel) {
    float* o = out + p0 * dim;
    const idx n = min_idx(kKnnPanel, rows - p0);
    idx r = 0;
#if defined(__AVX512F__)
    // Whole groups of 16 rows by 16 x 16 transposes, the columns past a multiple of 16 one by one.
    const idx whole = dim / 16 * 16;
    for (; r + 16 <= n; r += 16) {
      for (idx d0 = 0; d0 < whole; d0 += 16) transpose16(v + (p0 + r) * ld + d0, ld, o + d0 * kKnnPanel + r);
      for (idx i = r; i < r + 16; ++i)
        for (idx d = whole; d < dim; ++d) o[d * kKnnPanel + i] = v[(p0 + i) * ld + d];
    }
#endif
    for (; r < kKnnPanel; ++r) {
      const float* src = v + (p0 + r) * ld;
      if (r < n)
        for (idx d = 0; d < dim; ++d) o[d * kKnnPanel + r] = src[d];
      else
        for (idx d = 0; d < dim; ++d) o[d * kKnnPanel + r] = 0.0f;
    }
  }
}

void k_knn_scan(const float* q, idx queries, idx dim, const float* packed, idx cols, std::uint32_t base,
                const float* thresholds, std::uint64_t* keys, idx cap, idx* counts) {
  for (idx g = 0; g < queries; g += kKnnGroup) {
    const float* qg = q + g * dim;
    for (idx p0 = 0; p0 < cols; p0 += kKnnPanel) {
      const float* panel = packed + p0 * dim;
      KVec acc[kKnnGroup][kPanelVecs];
#pragma GCC unroll 16
      for (int i = 0; i < kKnnGroup; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = kv_zero();
      for (idx d = 0; d < dim; ++d) {
        KVec b[kPanelVecs];
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVecs; ++v) b[v] = kv_load(panel + d * kKnnPanel + v * kLanes);
#pragma GCC unroll 16
        for (int i = 0; i < kKnnGroup; ++i) {
          const KVec a = kv_splat(qg[i * dim + d]);
#pragma GCC unroll 4
          for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = kv_fma(a, b[v], acc[i][v]);
        }
      }
      // The last panel's zero rows never count. One branch for the whole register tile: mid-search
      // a tile holds some candidate almost surely, late in the search almost surely none, while a
      // branch per vector would mispredict in between; each vector's keys are then stored whole, its
      // count advanced by how many it kept (perhaps none).
      const idx valid = min_idx(kKnnPanel, cols - p0);
      std::uint32_t mask[kKnnGroup][kPanelVecs];
      std::uint32_t any = 0;
#pragma GCC unroll 16
      for (int i = 0; i < kKnnGroup; ++i) {
        const float t = thresholds[g + i];
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVecs; ++v) {
          const idx lanes = valid - v * kLanes;
          mask[i][v] = lanes <= 0 ? 0u : kv_above(acc[i][v], t) & (lanes >= kLanes ? ~0u : (1u << lanes) - 1u);
          any |= mask[i][v];
        }
      }
      if (any == 0) continue;
#pragma GCC unroll 16
      for (int i = 0; i < kKnnGroup; ++i) {
        idx count = counts[g + i];
#pragma GCC unroll 4
        for (int v = 0; v < kPanelVecs; ++v)
          kv_take(acc[i][v], mask[i][v], base + static_cast<std::uint32_t>(p0 + v * kLanes), keys + (g + i) * cap, count);
        counts[g + i] = count;
      }
    }
  }
}

std::uint64_t k_order_statistic(const std::uint64_t* v, idx m, idx r) {
  // The r-th smallest is the largest value with at most r values below it: m^2 compares in vector
  // lanes instead of a selection's branches, which mispredict on random keys.
  std::uint64_t best = 0;
  for (idx a = 0; a < m; ++a) {
    idx below = 0;
    for (idx b = 0; b < m; ++b) below += v[b] < v[a] ? 1 : 0;
    best = below <= r && v[a] > best ? v[a] : best;
  }
  return best;
}

idx k_count_at_most(const std::uint64_t* keys, idx n, std::uint64_t pivot) {
  idx count = 0, j = 0;
#if defined(__AVX512F__)
  const __m512i p = _mm512_set1_epi64(static_cast<long long>(pivot));
  for (; j + 8 <= n; j += 8)
    count += std::popcount(static_cast<unsigned>(_mm512_cmple_epu64_mask(_mm512_loadu_si512(keys + j), p)));
#elif defined(__AVX2__)
  // No unsigned 64-bit compare: flip the sign bits and compare signed, key > pivot counted against n.
  const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
  const __m256i p = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(pivot)), sign);
  for (; j + 4 <= n; j += 4) {
    const __m256i x = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), sign);
    count += 4 - std::popcount(static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(x, p)))));
  }
#endif
  for (; j < n; ++j) count += keys[j] <= pivot ? 1 : 0;
  return count;
}

idx k_keep_at_most(std::uint64_t* keys, idx n, std::uint64_t pivot) {
  idx w = 0, j = 0;
#if defined(__AVX512F__)
  // Compressed in registers and stored whole: a store at w <= j overwrites only keys already read.
  const __m512i p = _mm512_set1_epi64(static_cast<long long>(pivot));
  for (; j + 8 <= n; j += 8) {
    const __m512i x = _mm512_loadu_si512(keys + j);
    const __mmask8 m = _mm512_cmple_epu64_mask(x, p);
    _mm512_storeu_si512(keys + w, _mm512_maskz_compress_epi64(m, x));
    w += std::popcount(static_cast<unsigned>(m));
  }
#endif
  for (; j < n; ++j) {
    const std::uint64_t key = keys[j];
    keys[w] = key;
    w += key <= pivot ? 1 : 0;
  }
  return w;
}

/// Philox4x32-10 on blocks [ctr[0], ctr[0] + n) (word 0 of the counter wraps, without carry) into
/// out, word w of block j at out[w n + j]. The published constants: multipliers, and the Weyl
/// sequence that bumps the key between rounds.
constexpr std::uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr std::uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

void philox_blocks(const std::uint32_t* key, const std::uint32_t* ctr, idx from, idx to, idx n, std::uint32_t* out) {
  const std::uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], key0 = key[0], key1 = key[1];
  for (idx j = from; j < to; ++j) {
    std::uint32_t x0 = c0 + static_cast<std::uint32_t>(j), x1 = c1, x2 = c2, x3 = c3, k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const std::uint64_t p0 = std::uint64_t{kPhiloxM0} * x0, p1 = std::uint64_t{kPhiloxM1} * x2;
      const std::uint32_t y0 = static_cast<std::uint32_t>(p1 >> 32) ^ x1 ^ k0;
      const std::uint32_t y2 = static_cast<std::uint32_t>(p0 >> 32) ^ x3 ^ k1;
      x1 = static_cast<std::uint32_t>(p1);
      x3 = static_cast<std::uint32_t>(p0);
      x0 = y0;
      x2 = y2;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    out[j] = x0;
    out[n + j] = x1;
    out[2 * n + j] = x2;
    out[3 * n + j] = x3;
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
/// Philox in vector lanes, one block per 32-bit lane. A lane's 32 x 32 -> 64-bit products come from
/// two even-lane multiplies (the odd lanes shifted down for the second), their halves blended back.
namespace philox_lanes {
#if defined(__AVX512F__)
using V = __m512i;
constexpr idx kLanes = 16;
inline V set1(std::uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline V lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline V add(V a, V b) { return _mm512_add_epi32(a, b); }
inline V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline void mul(V x, V m, V& hi, V& lo) {
  const V even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
inline void store(std::uint32_t* p, V v) { _mm512_storeu_si512(p, v); }
#else
using V = __m256i;
constexpr idx kLanes = 8;
inline V set1(std::uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline V lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline V add(V a, V b) { return _mm256_add_epi32(a, b); }
inline V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void mul(V x, V m, V& hi, V& lo) {
  const V even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
inline void store(std::uint32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
#endif

/// Blocks [j, j + kVectors kLanes): kVectors independent vectors per round, so that one's
/// multiplies run while another's wait (a single vector's rounds are one chain of latencies).
template <int kVectors>
inline void blocks(const std::uint32_t* key, const std::uint32_t* ctr, idx j, idx n, std::uint32_t* out) {
  const V m0 = set1(kPhiloxM0), m1 = set1(kPhiloxM1);
  V x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    x0[v] = add(set1(ctr[0] + static_cast<std::uint32_t>(j + v * kLanes)), lane_index());
    x1[v] = set1(ctr[1]);
    x2[v] = set1(ctr[2]);
    x3[v] = set1(ctr[3]);
  }
  std::uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const V key0 = set1(k0), key1 = set1(k1);
    for (int v = 0; v < kVectors; ++v) {
      V hi0, lo0, hi1, lo1;
      mul(x0[v], m0, hi0, lo0);
      mul(x2[v], m1, hi1, lo1);
      x0[v] = xor3(hi1, x1[v], key0);
      x2[v] = xor3(hi0, x3[v], key1);
      x1[v] = lo1;
      x3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < kVectors; ++v) {
    const idx at = j + v * kLanes;
    store(out + at, x0[v]);
    store(out + n + at, x1[v]);
    store(out + 2 * n + at, x2[v]);
    store(out + 3 * n + at, x3[v]);
  }
}
}  // namespace philox_lanes
#endif

void k_philox(const std::uint32_t* key, const std::uint32_t* ctr, idx n, std::uint32_t* out) {
  idx j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Four vectors at a time: about a third of the time per block of the compiler's vectorisation of
  // philox_blocks (its 64-bit products), measured on AVX-512.
  constexpr idx kWide = 4 * philox_lanes::kLanes;
  for (; j + kWide <= n; j += kWide) philox_lanes::blocks<4>(key, ctr, j, n, out);
  for (; j + philox_lanes::kLanes <= n; j += philox_lanes::kLanes) philox_lanes::blocks<1>(key, ctr, j, n, out);
#endif
  philox_blocks(key, ctr, j, n, n, out);
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

void k_unit_normal_row(const std::uint32_t* key, const std::uint32_t* ctr, idx dim, float* out) {
  constexpr idx kBlocks = 32;  // Philox blocks per chunk: 128 columns
  alignas(64) std::uint32_t words[4 * kBlocks];
  alignas(64) float radius[2 * kBlocks], angle[2 * kBlocks], x[2 * kBlocks], y[2 * kBlocks];
  using Vec = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  for (idx c0 = 0; c0 < dim; c0 += 4 * kBlocks) {
    const idx cols = min_idx(4 * kBlocks, dim - c0), nb = (cols + 3) / 4, m = 2 * nb;
    const std::uint32_t at[4] = {ctr[0] + static_cast<std::uint32_t>(c0 / 4), ctr[1], ctr[2], ctr[3]};
    k_philox(key, at, nb, words);  // word w of block b at words[w nb + b]
    for (idx b = 0; b < nb; ++b)
      for (idx h = 0; h < 2; ++h) {  // pair h of block b: uniforms from words 2h and 2h + 1
        // u1 in (0, 1), never 1 (a zero radius), from 23 bits; u2 in [0, 1) from 24.
        radius[h * nb + b] = (static_cast<float>(words[(2 * h) * nb + b] >> 9) + 0.5f) * 0x1p-23f;
        angle[h * nb + b] = static_cast<float>(words[(2 * h + 1) * nb + b] >> 8) * 0x1p-24f;
      }
    Vec r(radius, m), t(angle, m), vx(x, m), vy(y, m);
    r = (r.log() * -2.0f).sqrt();
    t *= 6.2831853071795864769f;
    vx = r * t.cos();
    vy = r * t.sin();
    for (idx b = 0; b < nb; ++b) {
      const float v[4] = {x[b], y[b], x[nb + b], y[nb + b]};
      for (idx c = 0; c < 4 && 4 * b + c < cols; ++c) out[c0 + 4 * b + c] = v[c];
    }
  }
  const double sq = squared_norm_d(out, dim);
  if (!(sq > 0.0)) {  // not reachable with a positive radius; a unit row all the same
    for (idx c = 0; c < dim; ++c) out[c] = c == 0 ? 1.0f : 0.0f;
    return;
  }
  const double inv = 1.0 / std::sqrt(sq);
  for (idx c = 0; c < dim; ++c) out[c] = static_cast<float>(out[c] * inv);
}

void k_cluster_weights(const float* s, double beta, const double* log_size, idx c, double* w) {
  for (idx k = 0; k < c; ++k) w[k] = beta * static_cast<double>(s[k]) + log_size[k];
  const double top = Eigen::Map<const Eigen::ArrayXd>(w, c).maxCoeff();  // exact in any order
  // Through an aligned buffer: Eigen's loops over an unaligned row start with scalar elements up to
  // the first aligned one, and its scalar and vector exponentials differ in the last bit. (Its
  // exponential of -inf is 2^-1022 or so, not 0: the empty clusters are set apart.)
  constexpr idx kChunk = 1024;
  alignas(64) double buf[kChunk];
  for (idx c0 = 0; c0 < c; c0 += kChunk) {
    const idx n = min_idx(kChunk, c - c0);
    Eigen::Map<Eigen::ArrayXd, Eigen::Aligned64> chunk(buf, n);
    chunk = Eigen::Map<const Eigen::ArrayXd>(w + c0, n) - top;
    chunk = chunk.exp();
    for (idx k = 0; k < n; ++k) w[c0 + k] = log_size[c0 + k] == -objectives::kInf ? 0.0 : buf[k];
  }
}

void k_cluster_mixture(const double* w, const double* inv_size, double a, double b, idx c, double* cdf,
                       double* total_out, std::int32_t* guide, double* pi, float* log_q) {
  double total = 0.0;
  idx last = 0;  // the last cluster with w > 0 (there is one: the total is positive)
  for (idx k = 0; k < c; ++k) {
    cdf[k] = total += w[k];
    last = w[k] > 0.0 ? k : last;
  }
  *total_out = total;
  // guide[g] = #{k < last : g_k <= g}, g_k = floor(cdf[k] / step) + 1 with step = total (1 - 2^-40) /
  // c: every such k has cdf[k] < g step (1 - 2^-52) <= any u = u01 total with floor(u01 c) = g, so
  // the counted clusters (a prefix, as cdf ascends) all lie before the one u selects.
  const double inv_step = static_cast<double>(c) / (total * (1.0 - 0x1.0p-40));
  for (idx g = 0; g < c; ++g) guide[g] = 0;
  for (idx k = 0; k < last; ++k) {
    const double at = cdf[k] * inv_step;  // in [0, c (1 + 2^-39)]
    if (at < static_cast<double>(c - 1)) ++guide[static_cast<idx>(at) + 1];
  }
  for (idx g = 1; g < c; ++g) guide[g] += guide[g - 1];
  for (idx k = last; k < c; ++k) cdf[k] = objectives::kInf;
  constexpr idx kChunk = 1024;
  alignas(64) double buf[kChunk];
  for (idx c0 = 0; c0 < c; c0 += kChunk) {
    const idx n = min_idx(kChunk, c - c0);
    Eigen::Map<Eigen::ArrayXd, Eigen::Aligned64> chunk(buf, n);
    for (idx k = 0; k < n; ++k) buf[k] = w[c0 + k] / total;
    Eigen::Map<Eigen::ArrayXd>(pi + c0, n) = chunk;
    chunk = (a + b * chunk * Eigen::Map<const Eigen::ArrayXd>(inv_size + c0, n)).log();
    for (idx k = 0; k < n; ++k) log_q[c0 + k] = static_cast<float>(buf[k]);
  }
}

__extension__ typedef unsigned __int128 u128;

void k_cluster_picks(const std::uint32_t* words, idx m, double eps, double inv_rest, std::uint64_t n,
                     const double* cdf, double total, const std::int32_t* guide, idx c, const std::uint64_t* spans,
                     const std::uint32_t* members, const std::int32_t* row_cluster, std::uint64_t* at,
                     std::int32_t* cluster) {
  const auto mul_hi = [](std::uint64_t x, std::uint64_t y) {
    return static_cast<std::uint64_t>((static_cast<u128>(x) * y) >> 64);
  };
  // Two passes over pieces of kPiece draws. The first is arithmetic alone, in vector lanes: each
  // draw's branch, u01 and guide bucket. The second, one draw at a time, searches and requests the
  // draw's line. (Eight whole draws in AVX-512 lanes, each step of the search a gather, measured 17
  // ns a draw against 13 for the scalar loop, a draw alone, one thread.)
  constexpr idx kPiece = 64;
  alignas(64) double u01s[kPiece];
  alignas(64) std::int64_t buckets[kPiece];
  alignas(64) std::int64_t uniform[kPiece];
  const double cd = static_cast<double>(c);
  for (idx p0 = 0; p0 < m; p0 += kPiece) {
    const idx pm = min_idx(kPiece, m - p0);
#pragma omp simd
    for (idx i = 0; i < pm; ++i) {
      const std::uint64_t hi = (static_cast<std::uint64_t>(words[p0 + i]) << 32) | words[m + p0 + i];
      const double coin = static_cast<double>(static_cast<std::int64_t>(hi >> 11)) * 0x1.0p-53;
      const double u01 = std::min((coin - eps) * inv_rest, 1.0);
      u01s[i] = u01;
      const std::int64_t g = static_cast<std::int64_t>(u01 * cd);
      buckets[i] = g < c - 1 ? g : c - 1;
      uniform[i] = coin < eps ? 1 : 0;
    }
    for (idx i = 0; i < pm; ++i) {
      const idx j = p0 + i;
      const std::uint64_t x = (static_cast<std::uint64_t>(words[2 * m + j]) << 32) | words[3 * m + j];
      if (uniform[i]) {
        at[j] = mul_hi(x, n);
        cluster[j] = -1;
        if (row_cluster) detail::prefetch_line(row_cluster + at[j]);
        continue;
      }
      const double u = u01s[i] * total;
      idx k = guide[buckets[i]];
      // Two steps without a branch cover almost every draw (a branch on each would mispredict), the
      // loop the rest; cdf holds +inf from the last cluster with weight on, where every search stops.
      k += cdf[k] <= u ? 1 : 0;
      k += cdf[k] <= u ? 1 : 0;
      while (cdf[k] <= u) ++k;
      at[j] = (spans[k] >> 32) + mul_hi(x, spans[k] & 0xFFFFFFFFu);
      cluster[j] = static_cast<std::int32_t>(k);
      detail::prefetch_line(members + at[j]);
    }
  }
}

#define MEMBANK_STR2(x) #x
#define MEMBANK_STR(x) MEMBANK_STR2(x)

const Table kTable{MEMBANK_STR(MEMBANK_KERNEL_NS), k_dot,      k_gather_dots,  k_gather_axpy, k_widen, k_narrow, k_per_sample_query, k_shared_query,
                   k_keyed_info_nce,               k_gemm_abt,                     k_gemm_ab_acc, k_gemm_atb,   k_softmax_tile,     kKnnPanel, kKnnGroup, k_knn_pack, k_knn_scan, k_order_statistic, k_count_at_most, k_keep_at_most,
                   k_philox,                       k_momentum_row,   k_unit_normal_row,
                   k_cluster_weights,              k_cluster_mixture, k_cluster_picks};

}  // namespace

const Table& get() { return kTable; }

}  // namespace membank::kernels::MEMBANK_KERNEL_NS
