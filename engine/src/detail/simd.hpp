#pragma once
// Small vector kernels on fp32 rows. Loops are written for the compiler's vectoriser with
// `omp simd` reductions (enabled by -fopenmp): no fast-math, fixed association for a given build,
// so results do not depend on the thread that runs them.
//
// Internal linkage (an anonymous namespace): each translation unit keeps its own copy, compiled with
// its own flags. The per-instruction-set kernels (kernels/) include this file too; with external
// linkage the linker could keep their AVX copy for every caller (see kernels/kernels.hpp).
#include <cstdint>

namespace membank::detail {
namespace {

inline float dot(const float* __restrict a, const float* __restrict b, std::int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (std::int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
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

/// Prefetch the cache lines of a row of `bytes` bytes into all cache levels.
inline void prefetch_row(const float* p, std::int64_t floats) {
  const char* c = reinterpret_cast<const char*>(p);
  for (std::int64_t off = 0; off < floats * 4; off += 64) __builtin_prefetch(c + off, 0, 3);
}

}  // namespace
}  // namespace membank::detail
