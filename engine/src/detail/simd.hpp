#pragma once
// Small vector kernels on fp32 rows. Loops are written for the compiler's vectoriser with
// `omp simd` reductions (enabled by -fopenmp): no fast-math, fixed association for a given build,
// so results do not depend on the thread that runs them.
//
// Internal linkage (an anonymous namespace): each translation unit keeps its own copy, compiled with
// its own flags. The per-instruction-set kernels (kernels/) include this file too; with external
// linkage the linker could keep their AVX copy for every caller (see kernels/kernels.hpp).
#include "detail/prefetch.hpp"

#include <cstdint>

namespace membank::detail {
namespace {

/// a . b with a fixed association on every instruction set: 32 partial sums (two banks of 16, one
/// 512-bit register each, or the equivalent in narrower registers) over blocks of 32 elements, the
/// tail added lane by lane, then combined by halves (16 -> 8 -> 4 -> 2 -> 1). The banks are vector
/// values, not arrays: written as `float x[16]` the partial sums were kept on the stack in some
/// callers (a store and a reload per block of 32), and the halving became a serial chain of 16
/// scalar additions.
inline float dot(const float* __restrict a, const float* __restrict b, std::int64_t n) {
  typedef float V16 __attribute__((vector_size(64), aligned(4), may_alias));
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  V16 x{}, y{};
  std::int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    x += *reinterpret_cast<const V16*>(a + c) * *reinterpret_cast<const V16*>(b + c);
    y += *reinterpret_cast<const V16*>(a + c + 16) * *reinterpret_cast<const V16*>(b + c + 16);
  }
  for (int l = 0; c < n; ++c, l = (l + 1) & 15) x[l] += a[c] * b[c];
  x += y;
  const V8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

inline double squared_norm_d(const float* a, std::int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (std::int64_t c = 0; c < n; ++c) acc += static_cast<double>(a[c]) * a[c];
  return acc;
}

}  // namespace
}  // namespace membank::detail
