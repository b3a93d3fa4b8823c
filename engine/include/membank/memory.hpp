#pragma once
// Memory questions every entry point asks before it works: do two arguments share bytes (aliasing),
// and does what a call is about to allocate fit in what the machine can give (memory limits).
//
// Aliasing contract (every entry point, C++ and Python):
//  * Inputs (features, ids, negatives, queries, labels) may overlap each other and the bank's own
//    storage (e.g. features = rows of bank.view()): results are those of disjoint copies. Where the
//    bank is written (the momentum refresh), the inputs that overlap it are copied first.
//  * An output buffer (the gradient) may overlap nothing: not an input, not the bank's rows or
//    last-update steps, not itself (an outer stride < D). Such a call throws Error naming both
//    arguments and changes nothing.
//  Overlap is decided on the exact bytes: a strided matrix occupies `rows` runs of `cols` elements,
//  `stride` apart, so x[:, :64] and x[:, 64:] do not overlap while x[0::2] and x[1::3] do.
//
// Memory contract: sizes (N, D, B, K, Q, k) are turned into byte counts with saturating products,
// and a request of at least kMemoryCheckThreshold bytes is compared with available_memory() before
// anything is allocated; a request that does not fit throws OutOfMemory saying how much is needed
// and how much is available. An allocation that fails anyway (smaller requests, other processes)
// also becomes OutOfMemory, inside OpenMP regions too. Either way the engine is left unchanged.
#include <membank/types.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace membank {

/// The bytes a (possibly strided) array occupies: `runs` runs of `run_bytes` bytes, the start of
/// run r at data + r * stride_bytes. A row-major matrix is (rows, cols * size, outer stride * size).
struct MemoryRegion {
  const void* data = nullptr;
  std::int64_t runs = 0;
  std::int64_t run_bytes = 0;
  std::int64_t stride_bytes = 0;

  /// One contiguous run of `bytes` bytes.
  static MemoryRegion contiguous(const void* data, std::int64_t bytes) { return {data, 1, bytes, bytes}; }
  /// A row-major Eigen matrix / Ref / Map (rows of cols() elements, outerStride() apart).
  template <class M>
  static MemoryRegion of_matrix(const M& m) {
    const auto size = static_cast<std::int64_t>(sizeof(typename M::Scalar));
    return {m.data(), m.rows(), m.cols() * size, m.outerStride() * size};
  }
  template <class T>
  static MemoryRegion of_span(std::span<T> s) {
    return contiguous(s.data(), static_cast<std::int64_t>(s.size_bytes()));
  }
};

/// True when a byte belongs to both regions (exact for strided regions; O(min(runs)) time).
bool overlaps(const MemoryRegion& a, const MemoryRegion& b);

/// True when two runs of the region share a byte (a stride smaller than a run, rows > 1).
bool overlaps_itself(const MemoryRegion& r);

/// Throws Error when the output `out` overlaps the input `in`:
/// "<out_name> and <in_name> share memory: ...; pass a separate <out_name> buffer".
void check_no_overlap(const MemoryRegion& out, const char* out_name, const MemoryRegion& in, const char* in_name);

/// Throws Error when the runs of the output `out` overlap each other.
void check_no_self_overlap(const MemoryRegion& out, const char* out_name);

// ---------------------------------------------------------------------------------------------
// memory limits

/// Requests below this many bytes are not compared with available_memory() (reading /proc costs
/// more than such an allocation); a failure of one still becomes OutOfMemory.
inline constexpr std::int64_t kMemoryCheckThreshold = std::int64_t{16} << 20;

/// What this process may still allocate, in bytes: the least of MemAvailable + SwapFree
/// (/proc/meminfo), RLIMIT_AS minus the current address space (VmSize), RLIMIT_DATA minus the
/// current data segment (VmData) and the cgroup's memory.max minus memory.current. `describe`
/// receives the parts, e.g. "MemAvailable 61.2 GiB + SwapFree 0 B; RLIMIT_AS unlimited; ...".
std::int64_t available_memory(std::string* describe = nullptr);

/// Throws OutOfMemory when `bytes` (>= kMemoryCheckThreshold) exceeds available_memory():
/// "<what> needs 512.0 TiB (562949953421312 bytes): more than the 61.2 GiB available (...)".
/// `bytes` = INT64_MAX stands for "more than int64 can count" (a saturated product).
void require_memory(std::int64_t bytes, const std::string& what);

/// a * b for sizes >= 0, saturating at INT64_MAX (byte counts for require_memory).
std::int64_t mul_sat(std::int64_t a, std::int64_t b);
/// a + b for sizes >= 0, saturating at INT64_MAX.
std::int64_t add_sat(std::int64_t a, std::int64_t b);

/// "512.0 TiB (562949953421312 bytes)"; "more than 8.0 EiB" for INT64_MAX.
std::string format_bytes(std::int64_t bytes);

}  // namespace membank
