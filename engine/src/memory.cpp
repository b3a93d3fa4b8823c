#include <membank/error.hpp>
#include <membank/memory.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include "detail/check.hpp"

namespace membank {

namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

/// A region as integer runs: start, count, width, stride >= width (or count == 1); empty when width == 0.
struct Runs {
  std::int64_t start = 0, count = 0, width = 0, stride = 0;
  std::int64_t end() const { return start + (count - 1) * stride + width; }
};

Runs normalise(const MemoryRegion& r) {
  Runs x;
  if (r.data == nullptr || r.runs <= 0 || r.run_bytes <= 0) return x;
  x.start = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(r.data));
  x.count = r.runs;
  x.width = r.run_bytes;
  x.stride = r.runs == 1 ? r.run_bytes : r.stride_bytes;
  if (x.stride < 0) {  // walk the runs upwards
    x.start += (x.count - 1) * x.stride;
    x.stride = -x.stride;
  }
  if (x.stride < x.width) {  // runs touch or overlap: one run over all of them
    x.width = (x.count - 1) * x.stride + x.width;
    x.count = 1;
    x.stride = x.width;
  }
  return x;
}

/// Does any run of x meet a run of y? Runs of one region are disjoint and sorted.
bool runs_meet(const Runs& x, const Runs& y) {
  for (std::int64_t i = 0; i < x.count; ++i) {
    const std::int64_t lo = x.start + i * x.stride, hi = lo + x.width;
    if (hi <= y.start) continue;
    if (lo >= y.end()) break;
    // The first run of y that ends after lo is the only one that can start before hi.
    const std::int64_t j = lo < y.start + y.width ? 0 : (lo - y.start - y.width) / y.stride + 1;
    if (j < y.count && y.start + j * y.stride < hi) return true;
  }
  return false;
}

std::string one_decimal(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

/// Human readable only: "61.2 GiB".
std::string short_bytes(std::int64_t bytes) {
  if (bytes == kMax) return "more than 8.0 EiB";
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  return one_decimal(v) + " " + units[u];
}

/// A "Key:   value kB" field of a /proc file, in bytes; -1 when absent.
std::int64_t proc_field_kb(const char* path, const char* key) {
  std::ifstream in(path);
  std::string line;
  const std::size_t len = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, len, key) == 0 && line.size() > len && line[len] == ':') {
      std::istringstream fields(line.substr(len + 1));
      std::int64_t kb = -1;
      fields >> kb;
      return kb < 0 ? -1 : mul_sat(kb, 1024);
    }
  }
  return -1;
}

/// First number in a one-line file ("max" or a missing file: -1).
std::int64_t file_number(const char* path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return -1;
  try {
    return static_cast<std::int64_t>(std::stoll(word));
  } catch (...) {
    return -1;
  }
}

}  // namespace

bool overlaps(const MemoryRegion& a, const MemoryRegion& b) {
  const Runs x = normalise(a), y = normalise(b);
  if (x.count == 0 || y.count == 0) return false;
  if (x.end() <= y.start || y.end() <= x.start) return false;
  return x.count <= y.count ? runs_meet(x, y) : runs_meet(y, x);
}

bool overlaps_itself(const MemoryRegion& r) {
  if (r.data == nullptr || r.runs <= 1 || r.run_bytes <= 0) return false;
  const std::int64_t s = r.stride_bytes < 0 ? -r.stride_bytes : r.stride_bytes;
  return s < r.run_bytes;
}

void check_no_overlap(const MemoryRegion& out, const char* out_name, const MemoryRegion& in, const char* in_name) {
  MEMBANK_CHECK(!overlaps(out, in),
                "{} and {} share memory: writing {} would change {} during the call and give wrong results; "
                "pass a separate {} buffer", out_name, in_name, out_name, in_name, out_name);
}

void check_no_self_overlap(const MemoryRegion& out, const char* out_name) {
  MEMBANK_CHECK(!overlaps_itself(out),
                "{} has rows that share memory (outer stride {} bytes < row size {} bytes): expected an output "
                "buffer whose rows are disjoint", out_name, out.stride_bytes, out.run_bytes);
}

std::int64_t mul_sat(std::int64_t a, std::int64_t b) {
  if (a <= 0 || b <= 0) return 0;
  return a > kMax / b ? kMax : a * b;
}

std::int64_t add_sat(std::int64_t a, std::int64_t b) {
  a = std::max<std::int64_t>(a, 0);
  b = std::max<std::int64_t>(b, 0);
  return a > kMax - b ? kMax : a + b;
}

std::string format_bytes(std::int64_t bytes) {
  if (bytes == kMax) return "more than 8.0 EiB (the byte count overflows int64)";
  return short_bytes(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

std::int64_t available_memory(std::string* describe) {
  std::int64_t avail = kMax;
  std::string text;
  const auto note = [&](const std::string& part) { text += (text.empty() ? "" : "; ") + part; };

  const std::int64_t mem = proc_field_kb("/proc/meminfo", "MemAvailable");
  if (mem >= 0) {
    const std::int64_t swap = std::max<std::int64_t>(proc_field_kb("/proc/meminfo", "SwapFree"), 0);
    avail = std::min(avail, add_sat(mem, swap));
    note("MemAvailable " + short_bytes(mem) + " + SwapFree " + short_bytes(swap));
  }
  const auto limit = [&](int resource, const char* name, const char* used_key) {
    rlimit r{};
    if (getrlimit(resource, &r) != 0 || r.rlim_cur == RLIM_INFINITY) {
      note(std::string(name) + " unlimited");
      return;
    }
    const auto cap = static_cast<std::int64_t>(std::min<rlim_t>(r.rlim_cur, static_cast<rlim_t>(kMax)));
    const std::int64_t used = std::max<std::int64_t>(proc_field_kb("/proc/self/status", used_key), 0);
    const std::int64_t left = std::max<std::int64_t>(cap - used, 0);
    avail = std::min(avail, left);
    note(std::string(name) + " " + short_bytes(cap) + " with " + short_bytes(used) + " in use (" + used_key + ")");
  };
  limit(RLIMIT_AS, "RLIMIT_AS", "VmSize");
  limit(RLIMIT_DATA, "RLIMIT_DATA", "VmData");
  const std::int64_t cg_max = file_number("/sys/fs/cgroup/memory.max");
  if (cg_max >= 0) {
    const std::int64_t cg_used = std::max<std::int64_t>(file_number("/sys/fs/cgroup/memory.current"), 0);
    avail = std::min(avail, std::max<std::int64_t>(cg_max - cg_used, 0));
    note("cgroup memory.max " + short_bytes(cg_max) + " with " + short_bytes(cg_used) + " in use");
  }
  if (describe) *describe = text;
  return avail;
}

void require_memory(std::int64_t bytes, const std::string& what) {
  if (bytes < kMemoryCheckThreshold) return;
  std::string parts;
  const std::int64_t avail = available_memory(&parts);
  if (bytes <= avail) return;
  throw OutOfMemory("membank: " + what + " needs " + format_bytes(bytes) + ": more than the " + short_bytes(avail) +
                    " this process can allocate now (" + parts + ")");
}

}  // namespace membank
