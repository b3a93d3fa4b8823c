#pragma once
// The 2-byte storage types, element by element, in plain integer arithmetic: the reference every
// vectorised path is tested against, and the scalar path itself.
//
//  * fp16 is IEEE binary16: sign, 5 exponent bits (bias 15), 10 mantissa bits; subnormals below
//    2^-14 (the smallest is 2^-24).
//  * bf16 is the upper half of an fp32: sign, 8 exponent bits (bias 127), 7 mantissa bits.
// Widening is exact. Narrowing rounds to the nearest representable value, ties to even; a value
// beyond the largest finite one becomes infinity (never happens to a unit row). NaN stays NaN.
// Stochastic narrowing rounds |x| up with probability (|x| - lo) / (hi - lo), lo and hi the
// representable magnitudes around |x|, from 24 random bits: the expectation is x to within
// 2^-24 of a gap.
//
// Internal linkage (like simd.hpp): the per-instruction-set kernels include it.
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace membank::detail {
namespace {

/// An fp16 or bf16 element: the 16 bits, nothing else (the bank stores these).
struct f16 {
  std::uint16_t bits;
};
struct bf16 {
  std::uint16_t bits;
};

inline std::uint32_t float_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float widen(float x) { return x; }
inline float widen(bf16 h) { return bits_float(static_cast<std::uint32_t>(h.bits) << 16); }
inline float widen(f16 h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.bits);  // the hardware conversion where the path has it (exact, like the code below)
#else
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1Fu, mant = h.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant 2^-24, exact in float
    const float m = static_cast<float>(mant) * 0x1p-24f;
    return bits_float(float_bits(m) | sign);
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));  // inf, NaN
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

/// Round to nearest, ties to even.
inline bf16 to_bf16(float x) {
  std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>(u >> 16)};
}
inline f16 to_f16(float x) {
  std::uint32_t u = float_bits(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  std::uint32_t h;
  if (u >= 0x47800000u) {  // |x| >= 2^16, inf or NaN: beyond every finite half
    h = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    // |x| + 0.5 has its ulp at 2^-24 = the half's subnormal step: the float addition rounds
    // |x| to that grid, to nearest-even, and the low mantissa bits are the result.
    const float r = bits_float(u) + 0.5f;
    h = float_bits(r) - float_bits(0.5f);
  } else {  // normal: rebias the exponent, then round away the 13 low mantissa bits
    const std::uint32_t odd = (u >> 13) & 1u;
    u += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
    h = u >> 13;  // a carry into the exponent is the next binade (or infinity past 65504)
  }
  return {static_cast<std::uint16_t>(h | sign)};
}

/// The element below |x| toward zero (truncation), as bits without the sign.
inline std::uint32_t truncate_magnitude(float a, bf16*) { return float_bits(a) >> 16; }
inline std::uint32_t truncate_magnitude(float a, f16*) {
  const std::uint32_t u = float_bits(a);
  if (u >= 0x477FE000u) return 0x7BFFu;  // 65504 and above: the largest finite (never a unit row)
  if (u < 0x38800000u) return static_cast<std::uint32_t>(a * 0x1p24f);  // subnormal: exact product, truncated
  return (u - (static_cast<std::uint32_t>(127 - 15) << 23)) >> 13;
}
inline float widen_magnitude(std::uint32_t bits, bf16*) { return widen(bf16{static_cast<std::uint16_t>(bits)}); }
inline float widen_magnitude(std::uint32_t bits, f16*) { return widen(f16{static_cast<std::uint16_t>(bits)}); }

/// Stochastic rounding of a finite x with the random word `r` (its top 24 bits are used).
template <class T>
inline T round_stochastic(float x, std::uint32_t r) {
  const std::uint32_t sign = float_bits(x) & 0x80000000u;
  const float a = bits_float(float_bits(x) & 0x7FFFFFFFu);
  const std::uint32_t lo = truncate_magnitude(a, static_cast<T*>(nullptr));
  const double lo_v = widen_magnitude(lo, static_cast<T*>(nullptr));
  const double hi_v = widen_magnitude(lo + 1, static_cast<T*>(nullptr));
  // P(up) = (a - lo) / (hi - lo), exact in double; up when a 24-bit uniform falls below it.
  const double p = (static_cast<double>(a) - lo_v) / (hi_v - lo_v);
  const double u = static_cast<double>(r >> 8) * 0x1p-24;
  const std::uint32_t m = lo + (u < p ? 1u : 0u);
  return T{static_cast<std::uint16_t>(m | (sign >> 16))};
}

inline float narrow(float x, float*) { return x; }
inline bf16 narrow(float x, bf16*) { return to_bf16(x); }
inline f16 narrow(float x, f16*) { return to_f16(x); }

}  // namespace
}  // namespace membank::detail
