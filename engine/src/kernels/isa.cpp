// Which kernel table runs: cpuid (and the OS's saved vector state) through __builtin_cpu_supports,
// or MEMBANK_ISA; resolved once and kept in one atomic pointer.
#include <membank/error.hpp>
#include "detail/check.hpp"
#include <membank/isa.hpp>

#include "kernels/kernels.hpp"

#include <atomic>
#include <cstdlib>

namespace membank {

namespace {

std::atomic<const kernels::Table*> g_active{nullptr};

const kernels::Table& table_of(Isa isa) {
  switch (isa) {
#if MEMBANK_HAVE_X86_KERNELS
    case Isa::avx512: return kernels::avx512::get();
    case Isa::avx2: return kernels::avx2::get();
#else
    case Isa::avx512:
    case Isa::avx2:
#endif
    case Isa::scalar: break;
  }
  return kernels::scalar::get();
}

std::string supported_list() {
  std::string s;
  for (const Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (cpu_supports(isa)) s += (s.empty() ? "" : ", ") + to_string(isa);
  return s;
}

}  // namespace

std::string to_string(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

Isa isa_from_string(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  MEMBANK_THROW("instruction set '{}': expected one of scalar, avx2, avx512", name);
}

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
#if MEMBANK_HAVE_X86_KERNELS
    case Isa::avx2:  // x86-64-v3, what kernels_avx2.cpp is compiled for
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx");
    case Isa::avx512:  // x86-64-v4
      return cpu_supports(Isa::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
#else
    case Isa::avx2:
    case Isa::avx512: return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (cpu_supports(Isa::avx512)) return Isa::avx512;
  if (cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

void force_isa(Isa isa) {
  MEMBANK_CHECK(cpu_supports(isa), "instruction set {}: this CPU (or this build) does not support it; supported: {}",
                to_string(isa), supported_list());
  g_active.store(&table_of(isa), std::memory_order_release);
}

Isa active_isa() {
  const kernels::Table& t = kernels::table();
  for (const Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (cpu_supports(isa) && &table_of(isa) == &t) return isa;
  return Isa::scalar;
}

namespace kernels {

const Table& table() {
  if (const Table* t = g_active.load(std::memory_order_acquire)) return *t;
  Isa isa = best_isa();
  if (const char* env = std::getenv("MEMBANK_ISA"); env && *env) {
    const std::string name = env;
    MEMBANK_CHECK(name == "scalar" || name == "avx2" || name == "avx512",
                  "MEMBANK_ISA = '{}': expected one of scalar, avx2, avx512 (or unset: the widest this CPU runs)",
                  name);
    isa = isa_from_string(name);
    MEMBANK_CHECK(cpu_supports(isa), "MEMBANK_ISA = '{}': this CPU (or this build) does not support it; supported: {}",
                  name, supported_list());
  }
  const Table* expected = nullptr;
  g_active.compare_exchange_strong(expected, &table_of(isa), std::memory_order_acq_rel);
  return *g_active.load(std::memory_order_acquire);
}

}  // namespace kernels

}  // namespace membank
