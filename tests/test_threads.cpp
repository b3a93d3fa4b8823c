// Reproducibility across OpenMP thread counts: every result bit-identical for 1, 2 and 3 threads.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>

#include <omp.h>

#include <random>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

/// Sets the OpenMP thread count for a scope and restores the previous value.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

/// Everything a short run produces.
struct Run {
  std::vector<RowMatrixi> negatives;
  std::vector<double> loss, z, z_estimate;
  std::vector<RowMatrixf> grads;
  RowMatrixf bank;
  std::vector<std::int64_t> last_update;
  double log_z = 0;
};

/// Four steps of a fresh engine (bank from a seed, built under the same thread count), the data of
/// each step from a generator with a fixed seed (created here, owned by this call).
Run run(int threads, const EngineConfig& cfg, bool alias) {
  ThreadCount tc(threads);
  constexpr index_t N = 20011, D = 64, B = 48;
  std::mt19937_64 rng(4242);
  Engine eng = make_engine(N, D, alias, cfg, 77);
  Run r;
  for (int s = 0; s < 4; ++s) {
    std::vector<index_t> ids = random_ids(B, N, rng);
    ids[B - 1] = ids[0];  // a duplicate: the refresh order must not depend on threads
    const RowMatrixf f = near_rows(eng.bank().to_matrix(), ids, 0.3, rng);
    if (cfg.objective != Objective::full_softmax) r.negatives.push_back(eng.sample(ids, eng.steps_done()));
    RowMatrixf g(B, D);
    const StepStats st = eng.step(f, ids, g);
    r.loss.push_back(st.loss);
    r.z.push_back(st.z);
    r.z_estimate.push_back(st.z_estimate);
    r.grads.push_back(g);
  }
  r.bank = eng.bank().to_matrix();
  r.last_update = eng.bank().last_update();
  r.log_z = eng.partition().log_z;
  return r;
}

void check_same(const Run& a, const Run& b) {
  REQUIRE(a.negatives.size() == b.negatives.size());
  for (std::size_t s = 0; s < a.negatives.size(); ++s) CHECK(bits_equal(a.negatives[s], b.negatives[s]));
  for (std::size_t s = 0; s < a.loss.size(); ++s) {
    CAPTURE(s);
    CHECK(bits_equal(a.loss[s], b.loss[s]));
    CHECK(bits_equal(a.z[s], b.z[s]));
    CHECK(bits_equal(a.z_estimate[s], b.z_estimate[s]));
    CHECK(bits_equal(a.grads[s], b.grads[s]));
  }
  CHECK(bits_equal(a.bank, b.bank));
  CHECK(a.last_update == b.last_update);
  CHECK(bits_equal(a.log_z, b.log_z));
}

}  // namespace

TEST_CASE("engine results are bit-identical for 1, 2 and 3 threads") {
  // Guards thread-count independence of sample(), loss, gradient, Z and the bank after several
  // steps, for NCE (per-sample and shared, uniform and alias, first_batch Z), InfoNCE, and the
  // full softmax (blocked log-sum-exp over N = 20011 rows).
  struct Case {
    Objective obj;
    NegativesMode mode;
    bool alias;
    bool exclude;
  };
  const Case cases[] = {
      {Objective::nce, NegativesMode::per_sample, false, false},
      {Objective::nce, NegativesMode::per_sample, true, true},
      {Objective::nce, NegativesMode::shared, true, false},
      {Objective::nce, NegativesMode::shared, false, true},
      {Objective::info_nce, NegativesMode::per_sample, true, false},
      {Objective::info_nce, NegativesMode::shared, false, false},
      {Objective::full_softmax, NegativesMode::per_sample, false, false},
  };
  for (const Case& c : cases) {
    INFO(to_string(c.obj) << " " << to_string(c.mode) << std::string(c.alias ? " alias" : " uniform")
                          << std::string(c.exclude ? " exclude_positive" : ""));
    EngineConfig cfg;
    cfg.k = 512;
    cfg.tau = 0.07;
    cfg.objective = c.obj;
    cfg.negatives = c.mode;
    cfg.exclude_positive = c.exclude;
    cfg.z_policy = ZPolicy::first_batch;
    cfg.seed = 2718;
    const Run one = run(1, cfg, c.alias);
    check_same(one, run(2, cfg, c.alias));
    check_same(one, run(3, cfg, c.alias));
  }
}

TEST_CASE("Bank construction and full_softmax_loss are bit-identical for 1 and 2 threads") {
  // Guards seeded bank initialisation and the free full_softmax_loss against the thread count.
  constexpr index_t N = 100003, D = 24, B = 16;
  RowMatrixf m1, m2;
  {
    ThreadCount tc(1);
    m1 = Bank(N, D, 31337).to_matrix();
  }
  {
    ThreadCount tc(2);
    m2 = Bank(N, D, 31337).to_matrix();
  }
  CHECK(bits_equal(m1, m2));

  const Bank bank(N, D, 5);
  std::mt19937_64 rng(6);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  const RowMatrixf f = unit_rows(B, D, rng);
  RowMatrixf g1(B, D), g2(B, D);
  double l1 = 0, l2 = 0, z1 = 0, z2 = 0, p1 = 0, p2 = 0;
  {
    ThreadCount tc(1);
    l1 = full_softmax_loss(bank.view(), f, ids, 0.07, g1, &z1, &p1);
  }
  {
    ThreadCount tc(2);
    l2 = full_softmax_loss(bank.view(), f, ids, 0.07, g2, &z2, &p2);
  }
  CHECK(bits_equal(l1, l2));
  CHECK(bits_equal(g1, g2));
  CHECK(bits_equal(z1, z2));
  CHECK(bits_equal(p1, p2));
}

TEST_CASE("the library does not change the caller's thread setting") {
  // Guards "the library never sets the global thread count": a step leaves omp_get_max_threads()
  // as the caller set it.
  ThreadCount tc(2);
  EngineConfig cfg;
  cfg.k = 64;
  Engine eng = make_engine(1000, 16, false, cfg, 3);
  std::mt19937_64 rng(4);
  const std::vector<index_t> ids = random_ids(8, 1000, rng);
  const RowMatrixf f = unit_rows(8, 16, rng);
  RowMatrixf g(8, 16);
  eng.step(f, ids, g);
  CHECK(omp_get_max_threads() == 2);
}
