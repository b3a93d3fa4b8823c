// Memory limits: sizes that cannot fit are refused before anything is allocated, with the bytes
// needed and available (OutOfMemory, an Error); an allocation that fails inside an OpenMP region
// becomes OutOfMemory on the caller's thread (never std::terminate); the engine is unchanged.
//
// Allocation failures are injected by replacing the global operator new in this test binary: while
// armed, every operator new called inside an OpenMP region (omp_get_level() > 0) throws
// std::bad_alloc, which is what the engine's per-thread scratch vectors would see on a full machine.
#include "engine_state.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>
#include <membank/threads.hpp>

#include <omp.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <new>
#include <random>
#include <string>
#include <vector>

// GCC sees the malloc inside this operator new and the free inside this operator delete, and
// reports every new / delete pair of the file as mismatched: they are the same pair.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

namespace {
std::atomic<bool> g_fail_in_parallel{false};
std::atomic<long> g_injected{0};
}  // namespace

void* operator new(std::size_t size) {
  if (g_fail_in_parallel.load(std::memory_order_relaxed) && omp_get_level() > 0) {
    g_injected.fetch_add(1, std::memory_order_relaxed);
    throw std::bad_alloc();
  }
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MEMBANK_TEST_TSAN 1
#endif
#endif
#ifndef MEMBANK_TEST_TSAN  // ThreadSanitizer's runtime defines the nothrow forms itself
// The nothrow forms too (std::stable_sort's temporary buffer uses them): every form of this file's
// new pairs with its delete, which AddressSanitizer checks.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept { return ::operator new(size, tag); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#endif

using namespace membank;
using namespace mbtest;

namespace {

/// Sets the thread count for its lifetime (other tests run after these in the same process).
struct Threads {
  int saved = omp_get_max_threads();
  explicit Threads(int n) { set_num_threads(n); }
  ~Threads() { set_num_threads(saved); }
};

/// Arms the failing operator new for its lifetime.
struct FailInParallel {
  FailInParallel() { g_fail_in_parallel = true; }
  ~FailInParallel() { g_fail_in_parallel = false; }
};

/// Lowers the soft RLIMIT_AS to what the process uses now plus `headroom` bytes, for its lifetime.
struct AddressSpaceLimit {
  rlimit saved{};
  bool active = false;
  explicit AddressSpaceLimit(std::int64_t headroom) {
    std::ifstream status("/proc/self/status");
    std::string key;
    std::int64_t kb = -1;
    while (status >> key)
      if (key == "VmSize:") {
        status >> kb;
        break;
      }
    if (kb < 0 || getrlimit(RLIMIT_AS, &saved) != 0) return;
    rlimit lower = saved;
    lower.rlim_cur = static_cast<rlim_t>(kb * 1024 + headroom);
    if (saved.rlim_max != RLIM_INFINITY && lower.rlim_cur > saved.rlim_max) return;
    active = setrlimit(RLIMIT_AS, &lower) == 0;
  }
  ~AddressSpaceLimit() {
    if (active) setrlimit(RLIMIT_AS, &saved);
  }
};

}  // namespace

TEST_CASE("a bank of 10^12 x 128 is refused before allocating, naming the bytes needed and available") {
  // Guards the up-front check of Bank construction: N x stride floats + 2 MiB of rounding + N int64
  // last-update steps, as an exact byte count, against what the process can allocate.
  const std::int64_t n = 1000000000000, want = n * 128 * 4 + (std::int64_t{2} << 20) + n * 8;
  const std::string msg = message_of<OutOfMemory>([&] { Bank(n, 128, 0); });
  INFO(msg);
  CHECK(msg.find(std::to_string(want) + " bytes") != std::string::npos);
  CHECK(msg.find("TiB") != std::string::npos);
  CHECK(msg.find("MemAvailable") != std::string::npos);
  CHECK(msg.find("RLIMIT_AS") != std::string::npos);
  // A size whose byte count overflows int64 is the same error, not a wrapped product.
  const std::string big = message_of<OutOfMemory>([&] { Bank(std::int64_t{1} << 60, 128, 0); });
  CHECK(big.find("overflows int64") != std::string::npos);
  // OutOfMemory is a membank::Error.
  CHECK_THROWS_AS(Bank(n, 128, 0), Error);
}

TEST_CASE("K = 10^12 is refused by the configuration check before any allocation") {
  // Guards EngineConfig::validate(n, dim) and the Engine constructor: one step's per-thread scratch
  // (16 bytes per negative and thread: its id, log P_n and weight, plus a D-float accumulator row and
  // one more weight, the positive's) for K = 10^12 cannot fit; the message names the bytes.
  EngineConfig c;
  c.k = 1000000000000;
  const std::int64_t want = step_scratch_bytes(c, 1, 128, c.k, omp_get_max_threads());
  CHECK(want == 52 + (std::int64_t{16} * c.k + 4 * 128 + 4) * omp_get_max_threads());
  const std::string msg = message_of<OutOfMemory>([&] { c.validate(1000, 128); });
  INFO(msg);
  CHECK(msg.find("config.k = 1000000000000") != std::string::npos);
  CHECK(msg.find(std::to_string(want) + " bytes") != std::string::npos);
  CHECK_THROWS_AS(Engine(Bank(1000, 128, 1), std::make_unique<UniformSampler>(1000), c), OutOfMemory);
}

TEST_CASE("a step whose scratch exceeds RLIMIT_AS is refused before allocating, the engine unchanged") {
  // Guards the per-call check: an engine with K = 2^22 per-sample negatives (48 MiB of scratch per
  // thread) under an address-space limit of 24 MiB above current use: step, evaluate, sample and
  // the full softmax over a bank too large for its scratch are refused with OutOfMemory, and
  // nothing changes; once the limit is lifted the same step runs.
  const Threads threads(2);
  EngineConfig c;
  c.k = index_t{1} << 22;
  c.seed = 4;
  Engine eng = make_engine(200, 16, false, c, 3);
  std::mt19937_64 rng(2);
  const std::vector<index_t> ids = random_ids(4, 200, rng);
  const RowMatrixf f = unit_rows(4, 16, rng);
  RowMatrixf g(4, 16);
  const EngineState before = state_of(eng);
  {
    AddressSpaceLimit limit(24 << 20);
    if (!limit.active) return;  // cannot lower the limit here: nothing to test
    const std::string msg = message_of<OutOfMemory>([&] { eng.step(f, ids, g); });
    INFO(msg);
    CHECK(msg.find("a step of B = 4 queries with K = 4194304") != std::string::npos);
    CHECK(msg.find("RLIMIT_AS") != std::string::npos);
    CHECK(message_of<OutOfMemory>([&] { eng.sample(ids, 0); }).find("sample") != std::string::npos);
  }
  check_unchanged(before, state_of(eng));
  eng.step(f, ids, g);  // fits again
  CHECK(eng.steps_done() == 1);
}

TEST_CASE("an allocation failing inside an OpenMP region becomes OutOfMemory, the engine unchanged") {
  // Guards ExceptionCapture and the engine's per-thread scratch: with every operator new inside a
  // parallel region failing, step (per-sample NCE, whose first step also estimates Z), sample and
  // knn_evaluate throw OutOfMemory on the caller's thread (no std::terminate), the engine's state
  // is bit-identical, and after disarming the same step equals a twin engine's first step.
  const Threads threads(2);
  EngineConfig c;
  c.k = 32;
  c.seed = 6;
  Engine eng = make_engine(300, 16, false, c, 5);
  Engine twin = make_engine(300, 16, false, c, 5);
  std::mt19937_64 rng(3);
  const std::vector<index_t> ids = random_ids(8, 300, rng);
  const RowMatrixf f = unit_rows(8, 16, rng);
  RowMatrixf g(8, 16), g_twin(8, 16);
  const EngineState before = state_of(eng);
  std::vector<int> labels(300, 0);
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int>(i % 3);
  const std::vector<int> ql(8, 1);
  {
    g_injected = 0;
    FailInParallel arm;
    CHECK_THROWS_AS(eng.step(f, ids, g), OutOfMemory);
    CHECK_THROWS_AS(eng.sample(ids, 0), OutOfMemory);
    CHECK_THROWS_AS(knn_evaluate(eng.bank().view(), labels, f, ql, {10, 0.1}), OutOfMemory);
  }
  CHECK(g_injected > 0);
  const std::string msg = message_of<OutOfMemory>([&] {
    FailInParallel arm;
    eng.step(f, ids, g);
  });
  CHECK(msg.find("out of memory") != std::string::npos);
  check_unchanged(before, state_of(eng));
  const StepStats s = eng.step(f, ids, g);
  const StepStats t = twin.step(f, ids, g_twin);
  CHECK(bits_equal(s.loss, t.loss));
  CHECK(bits_equal(g, g_twin));
  check_unchanged(state_of(eng), state_of(twin));
}

TEST_CASE("set_num_threads refuses 100000 and leaves the thread count unchanged") {
  // Guards the one thread-count check (threads.hpp) that the CLI and Python share.
  const Threads threads(2);
  const std::string msg = message_of<Error>([] { set_num_threads(100000); });
  CHECK(msg.find("100000") != std::string::npos);
  CHECK(omp_get_max_threads() == 2);
  CHECK(max_num_threads() < 100000);
}
