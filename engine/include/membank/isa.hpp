#pragma once
// The instruction set of the engine's hot kernels, chosen at run time.
//
// The library is built for baseline x86-64; its hot kernels (the fused NCE / InfoNCE scoring and
// gradient, the shared-negatives and full-softmax GEMMs, kNN scoring, the momentum refresh) are
// compiled once per instruction set and one set is picked, once per process, from the CPU's
// features (cpuid): the widest the CPU supports, or the one named by the environment variable
// MEMBANK_ISA (scalar, avx2 or avx512), read at the first kernel call. Every call then uses that
// path for its whole batch.
//
// Paths differ only in rounding (vector width of the reductions, fused multiply-add): each path is
// bit-identical for any thread count, and all agree with the scalar path to float precision.
//
// Thread safety: cpu_supports / best_isa may run anywhere; force_isa must not run while another
// thread is inside an engine call (a call already running keeps the path it started with).
#include <string>

namespace membank {

enum class Isa {
  scalar,  ///< baseline x86-64 (SSE2), or the build's own flags on other CPUs
  avx2,    ///< AVX2 + FMA (x86-64-v3)
  avx512,  ///< AVX-512 F/BW/CD/DQ/VL (x86-64-v4)
};

/// "scalar", "avx2", "avx512".
std::string to_string(Isa isa);
/// Parses to_string's names; throws membank::Error naming the value and the choices otherwise.
Isa isa_from_string(const std::string& name);

/// Whether this build has kernels for `isa` and this CPU (and OS) can run them.
bool cpu_supports(Isa isa);
/// The widest instruction set cpu_supports.
Isa best_isa();
/// The path the kernels use: MEMBANK_ISA if set (Error if it names an unknown or unsupported set),
/// else best_isa(). Resolved once, at the first call; force_isa changes it.
Isa active_isa();
/// Use `isa` from now on (tests and benchmarks compare paths). Throws membank::Error, changing
/// nothing, when !cpu_supports(isa).
void force_isa(Isa isa);

}  // namespace membank
