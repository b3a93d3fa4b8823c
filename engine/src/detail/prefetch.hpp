#pragma once
// Software prefetch that the optimiser keeps.
//
// GCC 12 at -O2/-O3 deletes some loops whose body is only __builtin_prefetch (it treats them as
// free of side effects): in the per-sample kernel the prefetch of the next block's rows vanished
// from the loop and the step ran at 3.4 x the gather floor instead of about 1.3 x. On x86-64 the
// prefetch is therefore an `asm volatile` instruction, which no pass may remove or move across
// other volatile code; elsewhere the builtin.
//
// Internal linkage, like simd.hpp: the per-instruction-set kernels include it too.
#include <cstdint>

namespace membank::detail {
namespace {

/// Requests the cache line holding p into every cache level (a hint: p may be any address).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

/// Requests the cache lines of a row of n elements of type T.
template <class T>
inline void prefetch_row(const T* p, std::int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (std::int64_t off = 0; off < n * static_cast<std::int64_t>(sizeof(T)); off += 64) prefetch_line(c + off);
}

}  // namespace
}  // namespace membank::detail
