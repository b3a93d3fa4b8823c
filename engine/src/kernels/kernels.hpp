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
#include <cstdint>

namespace membank::kernels {

using idx = std::int64_t;

/// One query of the fused per-sample NCE / InfoNCE kernel (engine.cpp resolves and checks it all).
struct PerSampleQuery {
  const float* bank;      ///< N x stride rows
  idx stride, dim;
  const idx* ids;         ///< its K negatives
  const float* log_pn;    ///< their log P_n
  idx k;
  const float* f;         ///< the query's unit feature (dim)
  float* g;               ///< its gradient row (dim), written
  const float* vy;        ///< the positive's bank row
  idx y;                  ///< the positive's id (its draws among the negatives are counted)
  double inv_tau, tau, log_z, log_k, log_p_y, log_excl, coef_scale;
  bool info;              ///< InfoNCE (else NCE)
};

/// What one query contributes to the step's statistics (the caller sums them in query order).
struct QueryResult {
  double loss = 0.0;
  double p_pos = 0.0;
  double sum_exp_a = 0.0;
  idx collisions = 0;  ///< negatives equal to the positive's id
};

struct Table {
  const char* name;

  /// a . b over n floats (vectorised reduction: association fixed per path).
  float (*dot)(const float* a, const float* b, idx n);

  /// out[r] = bank_row(ids[r]) . f for r < k, prefetching rows ahead (the gather of a query).
  void (*gather_dots)(const float* bank, idx stride, idx dim, const idx* ids, idx k, const float* f, float* out);

  /// NCE or InfoNCE loss and gradient row of one query over its positive and K negatives.
  void (*per_sample_query)(const PerSampleQuery& q, QueryResult& out);

  /// C = alpha * A B^T, row-major: A m x d (lda), B n x d (ldb), C m x n (ldc).
  void (*gemm_abt)(idx m, idx n, idx d, float alpha, const float* a, idx lda, const float* b, idx ldb, float* c,
                   idx ldc);
  /// C += A B, row-major: A m x kk (lda), B kk x n (ldb), C m x n (ldc).
  void (*gemm_ab_acc)(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc);
  /// C = A^T B, row-major: A kk x m (lda), B kk x n (ldb), C m x n (ldc).
  void (*gemm_atb)(idx m, idx n, idx kk, const float* a, idx lda, const float* b, idx ldb, float* c, idx ldc);

  /// Shared-negatives NCE, one query: a_j = s_j inv_tau - shift_j; adds sum_j softplus(a_j) to *loss and
  /// sum_j e^{a_j} (in double) to *sum_exp, and overwrites s_j with sigmoid(a_j) coef_scale.
  void (*nce_shared_row)(float* s, const float* shift, idx k, float inv_tau, float coef_scale, double* loss,
                         double* sum_exp);

  /// One bank tile of the exact softmax for a batch: S = F V^T inv_tau (F batch x dim, V rows x dim at
  /// vstride; S in s, ld lds), then per query i the online update of max[i], sum[i] (double) and
  /// acc (batch x dim, rescaled when the max grows) with exp(S_i - max_i) and += exp(S) V.
  /// s must be 64-byte aligned and lds a multiple of 16: Eigen's vectorised loops start with scalar
  /// elements up to the first aligned one, so the rounding would otherwise depend on the address.
  void (*softmax_tile)(const float* f, idx batch, idx dim, const float* v, idx vstride, idx rows, float inv_tau,
                       float* s, idx lds, double* max, double* sum, float* acc);

  /// The first j in [from, n) with !(s[j] < worst), or n (kNN's scan for candidates).
  idx (*first_at_least)(const float* s, idx from, idx n, float worst);

  /// v <- normalise(m v + (1 - m) f) over dim floats (f's direction if that cancels to zero);
  /// tmp: dim floats of scratch.
  void (*momentum_row)(float* v, const float* f, float m, float one_minus_m, float* tmp, idx dim);
};

/// The table of the active path (see membank/isa.hpp). Throws membank::Error on the first call if
/// MEMBANK_ISA names an unknown or unsupported set. Call it outside parallel regions.
const Table& table();

// One getter per compiled path (defined in kernels_<isa>.cpp).
namespace scalar { const Table& get(); }
namespace avx2 { const Table& get(); }
namespace avx512 { const Table& get(); }

}  // namespace membank::kernels
