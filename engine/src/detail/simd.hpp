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
/// tail added lane by lane, then combined pairwise. Two independent accumulators halve the
/// multiply-add dependency chain; the pairwise tail compiles to a few shuffles, not a serial chain.
inline float dot(const float* __restrict a, const float* __restrict b, std::int64_t n) {
  float x[16] = {}, y[16] = {};
  std::int64_t c = 0;
  for (; c + 32 <= n; c += 32)
    for (int l = 0; l < 16; ++l) {
      x[l] += a[c + l] * b[c + l];
      y[l] += a[c + 16 + l] * b[c + 16 + l];
    }
  for (int l = 0; c < n; ++c, l = (l + 1) & 15) x[l] += a[c] * b[c];
  for (int l = 0; l < 16; ++l) x[l] += y[l];
  for (int l = 0; l < 8; ++l) x[l] += x[l + 8];
  for (int l = 0; l < 4; ++l) x[l] += x[l + 4];
  for (int l = 0; l < 2; ++l) x[l] += x[l + 2];
  return x[0] + x[1];
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
