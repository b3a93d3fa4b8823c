#pragma once
// Small vector kernels on bank rows (fp32, fp16 or bf16 elements, widened to fp32) and fp32 vectors. Loops are written for the compiler's vectoriser with
// `omp simd` reductions (enabled by -fopenmp): no fast-math, fixed association for a given build,
// so results do not depend on the thread that runs them.
//
// Internal linkage (an anonymous namespace): each translation unit keeps its own copy, compiled with
// its own flags. The per-instruction-set kernels (kernels/) include this file too; with external
// linkage the linker could keep their AVX copy for every caller (see kernels/kernels.hpp).
#include "detail/half.hpp"
#include "detail/prefetch.hpp"

#include <cstdint>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace membank::detail {
namespace {

/// Sixteen floats of any alignment (GCC's and clang's vector extension; one 512-bit register, or
/// two or four narrower ones on the paths without AVX-512).
typedef float V16 __attribute__((vector_size(64), aligned(4), may_alias));

/// Sixteen elements of a row from p, widened to fp32 (exact). fp16 uses the F16C conversion where
/// the path has it (AVX2, AVX-512), else the scalar one; bf16 is a 16-bit shift on every path.
/// Returned by value and always inlined, so the vectors never become addressable stack objects.
__attribute__((always_inline)) inline V16 load16(const float* p) { return *reinterpret_cast<const V16*>(p); }
__attribute__((always_inline)) inline V16 load16(const bf16* p) {
  typedef std::uint16_t U16 __attribute__((vector_size(32), aligned(2), may_alias));
  typedef std::uint32_t U32 __attribute__((vector_size(64)));
  const U32 w = __builtin_convertvector(*reinterpret_cast<const U16*>(p), U32) << 16;
  return reinterpret_cast<const V16&>(w);
}
__attribute__((always_inline)) inline V16 load16(const f16* p) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<const V16&>(v);
#elif defined(__F16C__)
  typedef float V8 __attribute__((vector_size(32)));
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  const V8 a = reinterpret_cast<const V8&>(lo), b = reinterpret_cast<const V8&>(hi);
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  V16 x;
  for (int l = 0; l < 16; ++l) x[l] = widen(p[l]);
  return x;
#endif
}

/// a . b, a a row of any element type and b fp32, with a fixed association on every instruction
/// set: 32 partial sums (two banks of 16, one 512-bit register each, or the equivalent in narrower
/// registers) over blocks of 32 elements, the tail added lane by lane, then combined by halves
/// (16 -> 8 -> 4 -> 2 -> 1). The banks are vector values, not arrays: written as `float x[16]` the
/// partial sums were kept on the stack in some callers (a store and a reload per block of 32), and
/// the halving became a serial chain of 16 scalar additions. A 2-byte row gives exactly the dot
/// product of its widened fp32 copy.
template <class T>
inline float dot(const T* __restrict a, const float* __restrict b, std::int64_t n) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  V16 x{}, y{};
  std::int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    x += load16(a + c) * load16(b + c);
    y += load16(a + c + 16) * load16(b + c + 16);
  }
  for (int l = 0; c < n; ++c, l = (l + 1) & 15) x[l] += widen(a[c]) * b[c];
  x += y;
  const V8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

template <class T>
inline void axpy(float alpha, const T* __restrict x, float* __restrict y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t c = 0; c < n; ++c) y[c] += alpha * widen(x[c]);
}

inline double squared_norm_d(const float* a, std::int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (std::int64_t c = 0; c < n; ++c) acc += static_cast<double>(a[c]) * a[c];
  return acc;
}

}  // namespace
}  // namespace membank::detail
