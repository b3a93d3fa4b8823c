#pragma once
// The storage types of bank rows (no Eigen here: the per-instruction-set kernels include this).
#include <cstdint>
#include <string>

namespace membank {

/// The storage type of a bank's elements. fp16 (IEEE binary16: 10 stored mantissa bits, unit
/// roundoff 2^-11) is the better 2-byte type for unit-norm rows: their elements lie in [-1, 1], far
/// inside its range, and it carries three more bits than bfloat16 (7 bits, 2^-8), whose wide
/// exponent range such rows never use. Both halve the bank's memory and the bytes a step reads.
enum class DType : std::uint8_t { float32, float16, bfloat16 };

/// "float32", "float16", "bfloat16".
std::string to_string(DType t);
/// Parses the names to_string prints (also "fp32", "fp16", "bf16", "half"); throws Error naming the
/// value and the choices otherwise.
DType dtype_from_string(const std::string& s);
/// Bytes per element: 4 or 2.
constexpr int dtype_bytes(DType t) { return t == DType::float32 ? 4 : 2; }
/// The unit roundoff u of the type's round-to-nearest: 2^-24, 2^-11, 2^-8. A stored unit row has
/// norm within about u of 1 (each element carries a relative error of at most u).
constexpr double unit_roundoff(DType t) {
  return t == DType::float32 ? 0x1p-24 : t == DType::float16 ? 0x1p-11 : 0x1p-8;
}
/// The tolerance on |‖v‖ - 1| of a stored row of type t: 1e-5 for fp32 (the engine's historical
/// bound), 4 u for the 2-byte types (the rounding of each element, with room for fp32 arithmetic).
constexpr double row_norm_tolerance(DType t) { return t == DType::float32 ? 1e-5 : 4.0 * unit_roundoff(t); }

/// How a row is rounded to a 2-byte type when it is written: to the nearest (ties to even), or
/// stochastically (up with probability equal to the distance from the value below, over the gap),
/// with the random bits keyed by (seed, step, row) so that runs stay reproducible. Nearest is the
/// default; stochastic matters at high momentum, where (1 - m)(f - v) is smaller than half a unit
/// in the last place and a nearest-rounded row would never move (bf16 rows stop at m >= about 0.998).
enum class Rounding : std::uint8_t { nearest, stochastic };
std::string to_string(Rounding r);
Rounding rounding_from_string(const std::string& s);

}  // namespace membank
