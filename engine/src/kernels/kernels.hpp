#pragma once
// The engine's hot kernels behind one table of function pointers, one table per instruction set.
//
// kernels_impl.hpp holds the kernel bodies; kernels_scalar.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp compile them with baseline, x86-64-v3 and x86-64-v4 flags. table() picks one
// table per process (isa.cpp: cpuid, or MEMBANK_ISA); callers fetch it once per batch, before their
// parallel regions, and call through it per query or per tile, never per element.
//
// Why no AVX code can run on the baseline path (the one-definition-rule hazard): the linker keeps one
// copy of every inline function or template instance that several objects define (COMDAT), whatever
// flags each object was compiled with. So the per-ISA objects define no symbol another object
// could define too:
//   * every kernel has internal linkage (an anonymous namespace in kernels_impl.hpp); the only
//     external symbol of a per-ISA object is its table getter, membank::kernels::<isa>::get();
//   * Eigen is compiled into a namespace of its own per ISA (`#define Eigen membank_eigen_<isa>`
//     before the first Eigen header), so its GEMM and packet math instances cannot merge with the
//     baseline Eigen that the rest of the library and its users instantiate;
//   * only raw pointers, sizes and the plain structs below cross the boundary, and those objects use
//     no std:: container or algorithm (scratch is allocated by the caller);
//   * detail/simd.hpp's row kernels have internal linkage (a per-TU copy).
// The test `dispatch_symbols` lists every symbol the per-ISA objects define and fails on any
// outside their own namespaces.
#include <membank/dtype.hpp>
#include <membank/objective.hpp>

#include <bit>
#include <cstdint>

namespace membank::kernels {

/// kNN's order as one integer: the smaller key is the better neighbour, the higher score first and,
/// among equal scores, the smaller row. -0 counts as +0; scores are finite (a NaN is never collected).
inline std::uint64_t rank_key(float score, std::uint32_t row) {
  // The float's bits in an order that sorts as the value: all flipped for a negative, the sign bit
  // for the others (no branch on the sign).
  const auto bits = std::bit_cast<std::uint32_t>(score + 0.0f);
  const std::uint32_t ascending = bits ^ (static_cast<std::uint32_t>(std::bit_cast<std::int32_t>(bits) >> 31) | 0x80000000u);
  return (static_cast<std::uint64_t>(~ascending) << 32) | row;
}
inline float key_score(std::uint64_t key) {
  const auto ascending = static_cast<std::uint32_t>(~(key >> 32));
  const auto top = static_cast<std::uint32_t>(std::bit_cast<std::int32_t>(ascending) >> 31);  // all ones: was >= 0
  return std::bit_cast<float>(ascending ^ (~top | 0x80000000u));
}
inline std::uint32_t key_row(std::uint64_t key) { return static_cast<std::uint32_t>(key); }

using idx = std::int64_t;

/// The objective of a step and its parameters, resolved by the engine (objectives/ holds the pieces).
struct ObjectiveParams {
  Objective objective;
  double inv_tau;          ///< 1 / tau
  double k;                ///< K, the draws per query (as a double)
  idx k_entries;           ///< K
  double log_z;            ///< nce: log Z
  double nce_shift;        ///< nce: log N - log K - log Z (a_j = s_j / tau + lw_j + nce_shift)
  double tau_plus, beta;   ///< dcl, hcl
  bool detach_weights;     ///< hcl
  double kernel_t, gamma;  ///< kcl
  double margin;           ///< contrastive, triplet
};

/// Scratch a query's objective may use (per thread, the caller's): see per_sample_scratch().
struct QueryScratch {
  float* acc2;             ///< dim floats: the second accumulator row
  float* w;                ///< K + 1 floats: coefficients
  double* d;               ///< 6 (K + 2) doubles: an objective that takes its positives first
  idx* i;                  ///< 3 (K + 1) indices: the same objective's K + 1, then the driver's lists
};

/// Fills draws [from, to) of a query's ids and log_pn, in order: the kernel draws each block of
/// negatives just before it requests their rows (the engine's function, over a sampler's DrawCursor;
/// a no-op where the engine made every draw before the call). May throw (the engine's errors pass
/// through the kernel).
struct Refill {
  void (*fn)(void* context, idx from, idx to);
  void* context;
  void operator()(idx from, idx to) const { fn(context, from, to); }
};

/// Every instance's class index (0..C-1) in the narrowest width that holds C: 1 byte up to 256
/// classes, 2 up to 65,536, else 4. The per-sample kernel reads one at random per draw of an
/// objective with labels; 1.28 M labels take 1.3 MB as bytes instead of 5 MB as int32, and stay in
/// cache (supcon's and contrastive's steps with ten classes measured 0.0 to 0.08 x the floor lower
/// than with the int32 table, in paired runs).
struct ClassTable {
  const void* data = nullptr;  ///< N entries of `width` bytes (uint8, uint16 or int32), or null (no labels)
  int width = 4;
};

/// One query of the per-sample kernel (the engine resolves and checks it all).
struct PerSampleQuery {
  const void* bank;       ///< N x stride rows of `dtype`
  DType dtype;
  idx stride, dim;
  const idx* ids;         ///< its K draws (filled by refill, in order)
  const float* log_pn;    ///< their unconditional log P_n (filled by refill)
  Refill refill;
  idx k;
  double lw_shift;        ///< a draw's log importance weight is lw_shift - log_pn: log(1 - excluded mass) - log N
  double lw_pos;          ///< the positive's: -log(N P_n(y))
  const float* f;         ///< the query's unit feature (dim)
  float* g;               ///< its gradient row (dim), written
  const void* vy;         ///< the positive's bank row (of `dtype`)
  idx y;                  ///< the positive's id (its draws among the negatives are counted)
  ClassTable classes;     ///< label class of every instance (objectives with labels)
  std::int32_t cls;       ///< the query's class
  double coef_scale;      ///< 1 / B
  QueryScratch scratch;
};

/// One query of the shared-negatives kernel: its row of the batch's score matrix is turned into
/// coef_scale dL/ds in place (the caller adds those rows times the draws' rows with one GEMM).
struct SharedQuery {
  float* s;               ///< K scores in, K coefficients out
  const float* lw;        ///< K log importance weights (the batch's draws)
  const std::int32_t* neg_classes;  ///< K classes of the draws (objectives with labels), else null
  std::int32_t cls;
  const idx* ids;         ///< K draws (collisions with y are counted)
  idx k, y;
  double s_pos, lw_pos;
  double coef_scale;
  double* rescale;        ///< 2 ceil(K / 16) doubles of scratch
  QueryScratch scratch;
};

/// What one query contributes to the step's statistics (the caller sums them in query order).
struct QueryResult {
  double loss = 0.0;
  double p_pos = 0.0;
  double sum_exp = 0.0;   ///< sum_j e^{s_j / tau + lw_j} (NaN where the objective does not compute it)
  double c_pos = 0.0;     ///< shared kernel: coef_scale dL/ds_pos (the caller adds c_pos v_pos to the row)
  idx collisions = 0;     ///< draws equal to the positive's id
};

struct Table {
  const char* name;

  /// a . b over n elements, a of type t (widened: the result is that of a's fp32 copy), b fp32
  /// (vectorised reduction: association fixed per path, the same for every type).
  float (*dot)(const void* a, DType t, const float* b, idx n);

  /// out[r] = bank_row(ids[r]) . f for r < k, prefetching rows ahead (the gather of a query); rows of
  /// type t, `stride` elements apart.
  void (*gather_dots)(const void* bank, DType t, idx stride, idx dim, const idx* ids, idx k, const float* f,
                      float* out);

  /// acc[c] += sum_r coef[r] bank_row(ids[r])[c] for c < dim, r < k, in double, rows in order,
  /// prefetching rows ahead as gather_dots does (the distributed step's sum of weighted rows: in
  /// double, it stays within the single-process engine's own fp32 rounding of the same sum).
  void (*gather_axpy)(const void* bank, DType t, idx stride, idx dim, const idx* ids, idx k, const float* coef,
                      double* acc);

  /// dst[c] = src[c] widened to fp32 (exact), c < n; src of type t.
  void (*widen)(DType t, const void* src, float* dst, idx n);
  /// dst[c] = src[c] rounded to type t, c < n: to nearest (ties to even) when `random` is null,
  /// else stochastically with the random word random[c] (detail/half.hpp). fp32 is copied.
  void (*narrow)(DType t, const float* src, void* dst, idx n, const std::uint32_t* random);

  /// Loss and gradient row of one query over its positive and K draws: one pass scores, weighs and
  /// accumulates the draws' rows, drawing them a block ahead through q.refill (an objective that
  /// takes its positives first scores those, then streams the others).
  void (*per_sample_query)(const ObjectiveParams& p, const PerSampleQuery& q, QueryResult& out);
  /// Loss and coefficients of one query of a shared-negatives batch (see SharedQuery).
  void (*shared_query)(const ObjectiveParams& p, const SharedQuery& q, QueryResult& out);
  /// shared_query's infonce with every weight 0 (keys that count once: a queue's, a batch's), in
  /// three vectorised passes over the row instead of the objectives' blocks of 16 in double: the
  /// maximum, then e^{s_j / tau - max} in fp32 (each to about 1e-7 |s_j| / tau relative; summed per
  /// chunk of 1024, the chunks in double), then the scale. s: k scores in, coef_scale dL/ds out;
  /// out.collisions is left to the caller.
  void (*keyed_info_nce)(double inv_tau, double s_pos, double coef_scale, float* s, idx k, QueryResult& out);

  /// C = alpha * A B^T, row-major: A m x d (lda), B n x d (ldb), C m x n (ldc).
  void (*gemm_abt)(idx m, idx n, idx d, float alpha, const float* a, idx lda, const float* b, idx ldb, float* c,
                   idx ldc);
  /// C += A B, row-major: A m x kk (lda), B kk x n (ldb), C m x n (ldc).
  void (*gemm_ab_acc)(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc);
  /// C = A^T B, row-major: A kk x m (lda), B kk x n (ldb), C m x n (ldc).
  void (*gemm_atb)(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc);

  /// One bank tile of the exact softmax for a batch: S = F V^T inv_tau (F batch x dim, V rows x dim at
  /// vstride; S in s, ld lds), then per query i the online update of max[i], sum[i] (double) and
  /// acc (batch x dim, rescaled when the max grows) with exp(S_i - max_i) and += exp(S) V.
  /// s must be 64-byte aligned and lds a multiple of 16: Eigen's vectorised loops start with scalar
  /// elements up to the first aligned one, so the rounding would otherwise depend on the address.
  void (*softmax_tile)(const float* f, idx batch, idx dim, const float* v, idx vstride, idx rows, float inv_tau,
                       float* s, idx lds, double* max, double* sum, float* acc);

  /// kNN's fused scan. knn_pack lays `rows` bank rows (v, ld) out as panels of knn_panel rows, each
  /// dim x knn_panel floats column by column, the rows past `rows` zero: ceil(rows / knn_panel)
  /// knn_panel dim floats in out.
  idx knn_panel;
  /// Queries knn_scan scores together: its query count is a multiple of this.
  idx knn_group;
  void (*knn_pack)(const float* v, idx rows, idx dim, idx ld, float* out);
  /// For each of `queries` queries (row-major q, ld dim) and each of `cols` packed rows: the score
  /// s_ij = sum_d q_id v_jd, accumulated over d in order with one multiply-add each, fused where the
  /// path has FMA (the same score whichever group and panel hold i and j), and when s_ij > thresholds[i] (a NaN never is) the key
  /// rank_key(s_ij, base + j) appended to query i's buffer keys + i cap at counts[i], in order of j,
  /// counts[i] advanced. Pad the queries to a multiple of knn_group with threshold +inf. A buffer must
  /// hold cols + 8 keys past its count (up to 8 past the last kept may be written).
  void (*knn_scan)(const float* q, idx queries, idx dim, const float* packed, idx cols, std::uint32_t base,
                   const float* thresholds, std::uint64_t* keys, idx cap, idx* counts);
  /// The r-th smallest (from 0) of v[0 .. m), r < m.
  std::uint64_t (*order_statistic)(const std::uint64_t* v, idx m, idx r);
  /// How many of keys[0 .. n) are <= pivot.
  idx (*count_at_most)(const std::uint64_t* keys, idx n, std::uint64_t pivot);
  /// Keeps, in order, the keys <= pivot at the front of keys[0 .. n); returns how many.
  idx (*keep_at_most)(std::uint64_t* keys, idx n, std::uint64_t pivot);

  /// Philox4x32-10 (Salmon et al., SC'11) of the n counters {ctr[0] + j (mod 2^32), ctr[1], ctr[2],
  /// ctr[3]} under key {key[0], key[1]}, j < n: word w of block j into out[w n + j] (four arrays of
  /// n, so that the independent blocks fill vector lanes). Equal to Random123's Philox4x32.
  void (*philox)(const std::uint32_t* key, const std::uint32_t* ctr, idx n, std::uint32_t* out);

  /// v <- normalise(m v + (1 - m) f) over dim floats (f's direction if that cancels to zero);
  /// tmp: dim floats of scratch.
  void (*momentum_row)(float* v, const float* f, float m, float one_minus_m, float* tmp, idx dim);

  /// One row of a seeded random bank: dim standard normals, scaled to unit norm, into out. Philox
  /// block b at counter {ctr[0] + b, ctr[1], ctr[2], ctr[3]} under `key` gives columns 4b .. 4b + 3:
  /// Box-Muller in float on its word pairs (0, 1) and (2, 3), 23 and 24 random bits per uniform.
  /// The same on every thread; paths differ in the last bits of the transcendental functions.
  void (*unit_normal_row)(const std::uint32_t* key, const std::uint32_t* ctr, idx dim, float* out);

  /// The cluster sampler's mixture for one query (cluster_sampler.cpp), in double, every element a
  /// function of its own inputs and its position alone (vectorised in aligned chunks of 1024):
  /// w[k] = exp(beta s[k] + log_size[k] - m), m the largest of those exponents (-inf log sizes, of
  /// empty clusters, weigh 0).
  void (*cluster_weights)(const float* s, double beta, const double* log_size, idx c, double* w);
  /// Then, from the weights w (kept; w may be pi): *total = w[0] + ... + w[c - 1] in order and cdf[k]
  /// the running sum up to k, except from the last cluster with w > 0 on, which hold +inf (a search
  /// for the first cdf[k] > u, u <= *total, stops there); guide[g] (g < c) the number of
  /// clusters k with cdf[k] below g / c of the total by a margin (2^-40 relative), so that a
  /// draw with u in bucket g starts its search at or before the cluster it selects; pi[k] = w[k] /
  /// total; log_q[k] = log(a + b pi[k] inv_size[k]) rounded to fp32.
  void (*cluster_mixture)(const double* w, const double* inv_size, double a, double b, idx c, double* cdf,
                          double* total, std::int32_t* guide, double* pi, float* log_q);
  /// The cluster sampler's draws of m Philox blocks (word v of block i at words[v m + i]), resolved up
  /// to the memory they read: with coin = (w0:w1 >> 11) 2^-53 and x = w2:w3, a draw with coin < eps
  /// is the uniform row x n / 2^64 (at[i], cluster[i] = -1); another takes u01 = min((coin - eps)
  /// inv_rest, 1), the first cluster k whose cdf passes u01 total, searched from guide[min(u01 c,
  /// c - 1)] (a mixture of cluster_mixture), and the member slot at[i] = (spans[k] >> 32) + x (spans[k]
  /// & (2^32 - 1)) / 2^64 (cluster[i] = k). Exact integer and double arithmetic, the same on every
  /// path (compiled per path: the branch, u01 and bucket of a piece in the path's vector lanes, then
  /// the search draw by draw).
  /// Each draw's line is requested as soon as it is known: members + at[i], or row_cluster + at[i]
  /// on the uniform branch (none where row_cluster is null).
  void (*cluster_picks)(const std::uint32_t* words, idx m, double eps, double inv_rest, std::uint64_t n,
                        const double* cdf, double total, const std::int32_t* guide, idx c,
                        const std::uint64_t* spans, const std::uint32_t* members, const std::int32_t* row_cluster,
                        std::uint64_t* at, std::int32_t* cluster);
};

/// The table of the active path (see membank/isa.hpp). Throws membank::Error on the first call if
/// MEMBANK_ISA names an unknown or unsupported set. Call it outside parallel regions.
const Table& table();

// One getter per compiled path (defined in kernels_<isa>.cpp).
namespace scalar { const Table& get(); }
namespace avx2 { const Table& get(); }
namespace avx512 { const Table& get(); }

}  // namespace membank::kernels
