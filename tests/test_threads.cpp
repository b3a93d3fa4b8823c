// OpenMP: every result bit-identical for 1, 2 and 3 threads (engine, bank, full softmax, kNN), and an
// exception thrown inside a parallel region reaches the caller with the engine unchanged.
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/knn.hpp>

#include <omp.h>

#include <atomic>
#include <chrono>
#include <random>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

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

TEST_CASE("knn_evaluate is bit-identical for 1 and 2 threads over several query blocks and bank tiles") {
  // Guards thread-count independence of the blocked kNN (query blocks, 1024-row bank tiles):
  // Q = 700 spans two query blocks (the last partial), N = 5000 five tiles (the last partial);
  // predictions and the top-1 / top-5 / 1-NN accuracies are bit-identical for k inside one tile and
  // beyond it. Rows 4096.. repeat rows 0.. with other labels: exact score ties, broken by row id.
  constexpr index_t N = 5000, D = 24, Q = 700;
  constexpr int C = 10;
  std::mt19937_64 rng(777);
  const RowMatrixf centres = unit_rows(C, D, rng);
  std::normal_distribution<float> nd(0.0f, 0.5f);
  RowMatrixf rows(N, D), queries(Q, D);
  std::vector<int> bl(N), ql(Q);
  for (index_t i = 0; i < N; ++i) {
    const index_t c = i < 4096 ? i % C : (i * 7) % C;
    bl[static_cast<std::size_t>(i)] = static_cast<int>(c);
    for (index_t j = 0; j < D; ++j) rows(i, j) = i < 4096 ? centres(c, j) + nd(rng) : rows(i - 4096, j);
  }
  for (index_t i = 0; i < Q; ++i) {
    ql[static_cast<std::size_t>(i)] = static_cast<int>((i * 3) % C);
    for (index_t j = 0; j < D; ++j) queries(i, j) = centres((i * 3) % C, j) + nd(rng);
  }
  normalize_rows(queries);
  const Bank bank = Bank::from_rows(rows);
  for (const index_t k : {index_t{1}, index_t{200}, index_t{1500}}) {
    CAPTURE(k);
    const auto run_knn = [&](int threads) {
      ThreadCount tc(threads);
      return knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{.k = k, .sigma = 0.07});
    };
    const KnnResult one = run_knn(1), two = run_knn(2);
    CHECK(one.predictions == two.predictions);
    CHECK(bits_equal(one.top1, two.top1));
    CHECK(bits_equal(one.top5, two.top5));
    CHECK(bits_equal(one.nn1, two.nn1));
    CHECK(one.top1 > 0.3);  // clustered data: the result is informative, not all-equal noise
  }
}

namespace {

/// What the fault-injecting sampler throws (not a membank::Error: the type must survive the trip).
struct InjectedFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Draws exactly like UniformSampler(n); while armed, draw_next() -- which the engine calls inside its
/// parallel loops over the queries of a batch -- throws InjectedFault. With `worker_only`, only
/// threads other than the caller's (thread 0 of the team) throw, and thread 0 waits in its first
/// draw until a worker has thrown, so the exception surely comes from another thread.
class FaultySampler final : public NoiseSampler {
 public:
  explicit FaultySampler(index_t n) : NoiseSampler(n), inner_(n) {}
  SamplerKind kind() const override { return SamplerKind::uniform; }
  double prob(index_t j) const override { return inner_.prob(j); }
  std::vector<double> probs() const override { return inner_.probs(); }
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override { inner_.lookup(ids, log_pn); }
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override {
    if (armed_) {
      if (!worker_only_ || omp_get_thread_num() != 0) {
        if (omp_get_thread_num() != 0) worker_threw_ = true;
        throw InjectedFault("injected sampler fault at step " + std::to_string(cursor.key.step));
      }
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!worker_threw_ && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    inner_.draw_next(cursor, ids, log_pn);
  }
  void arm(bool on, bool worker_only = false) {
    armed_ = on;
    worker_only_ = worker_only;
    worker_threw_ = false;
  }
  bool worker_threw() const { return worker_threw_; }

 private:
  UniformSampler inner_;
  std::atomic<bool> armed_{false}, worker_only_{false};
  mutable std::atomic<bool> worker_threw_{false};
};

/// The state a failed call must leave as it was.
struct Frozen {
  RowMatrixf bank;
  std::vector<std::int64_t> last_update;
  std::int64_t steps;
  Partition partition;
  explicit Frozen(const Engine& e)
      : bank(e.bank().to_matrix()), last_update(e.bank().last_update()), steps(e.steps_done()),
        partition(e.partition()) {}
  bool same_as(const Engine& e) const {
    return bits_equal(bank, e.bank().to_matrix()) && last_update == e.bank().last_update() &&
           steps == e.steps_done() && partition.initialised == e.partition().initialised &&
           bits_equal(partition.log_z, e.partition().log_z);
  }
};

}  // namespace

TEST_CASE("an exception thrown inside an OpenMP region reaches the caller and changes nothing") {
  // Guards "no exception escapes a parallel region" (it would call std::terminate): a sampler whose
  // draw_next() throws inside the engine's parallel loops (sample(); the first step's Z estimate; the
  // fused loss/gradient pass) makes the call throw that exception -- same type, same message --
  // on the calling thread, for 1 and 2 threads and when only a worker thread throws; the bank,
  // last_update, step counter and Z are unchanged, and once the fault is gone the engine continues
  // bit for bit like one that never failed.
  constexpr index_t N = 3000, D = 32, B = 64;
  EngineConfig cfg;
  cfg.k = 32;
  cfg.z_policy = ZPolicy::first_batch;
  cfg.seed = 99;
  for (const int threads : {1, 2}) {
    for (const bool worker_only : {false, true}) {
      if (worker_only && threads == 1) continue;
      CAPTURE(threads);
      CAPTURE(worker_only);
      ThreadCount tc(threads);
      auto owned = std::make_unique<FaultySampler>(N);
      FaultySampler* sampler = owned.get();
      Engine eng(Bank(N, D, 5), std::move(owned), cfg);
      Engine ref(Bank(N, D, 5), std::make_unique<UniformSampler>(N), cfg);
      std::mt19937_64 rng(8);
      RowMatrixf g(B, D), gref(B, D);
      const auto batch = [&] {
        std::vector<index_t> ids = random_ids(B, N, rng);
        return std::make_pair(ids, near_rows(eng.bank().to_matrix(), ids, 0.3, rng));
      };
      const std::string want_msg_0 = "injected sampler fault at step 0";

      // sample(): the per-query draws.
      std::vector<index_t> ids0, ids1;
      RowMatrixf f0, f1;
      std::tie(ids0, f0) = batch();
      sampler->arm(true, worker_only);
      CHECK(message_of<InjectedFault>([&] { (void)eng.sample(ids0, 0); }) == want_msg_0);
      if (worker_only) CHECK(sampler->worker_threw());

      // The first step: Z is estimated from the step's draws before the loss pass.
      const Frozen before(eng);
      sampler->arm(true, worker_only);
      CHECK(message_of<InjectedFault>([&] { (void)eng.step(f0, ids0, g); }) == want_msg_0);
      if (worker_only) CHECK(sampler->worker_threw());
      CHECK(before.same_as(eng));
      CHECK_FALSE(eng.partition().initialised);

      // Fault gone: the same step succeeds and matches the engine that never failed.
      sampler->arm(false);
      const StepStats s0 = eng.step(f0, ids0, g);
      const StepStats r0 = ref.step(f0, ids0, gref);
      CHECK(bits_equal(s0.loss, r0.loss));
      CHECK(bits_equal(g, gref));

      // A later step (Z known): the fused loss/gradient pass draws inside its parallel loop.
      std::tie(ids1, f1) = batch();
      const Frozen after_first(eng);
      sampler->arm(true, worker_only);
      CHECK(message_of<InjectedFault>([&] { (void)eng.step(f1, ids1, g); }) == "injected sampler fault at step 1");
      if (worker_only) CHECK(sampler->worker_threw());
      CHECK(after_first.same_as(eng));
      sampler->arm(false);
      const StepStats s1 = eng.step(f1, ids1, g);
      const StepStats r1 = ref.step(f1, ids1, gref);
      CHECK(bits_equal(s1.loss, r1.loss));
      CHECK(bits_equal(s1.z, r1.z));
      CHECK(bits_equal(g, gref));
      CHECK(bits_equal(eng.bank().to_matrix(), ref.bank().to_matrix()));
      CHECK(eng.steps_done() == 2);
    }
  }
}

TEST_CASE("the library's own Error thrown inside a parallel draw loop reaches the caller") {
  // Guards the same path with a built-in failure: with exclude_positive and per-sample negatives,
  // an alias sampler whose positive holds all but ~1e-28 of the mass makes every query's draws hit
  // the excluded id 10^6 times in a row; the sampler throws membank::Error inside the engine's
  // parallel loop, and step() and sample() throw it to the caller, changing nothing.
  constexpr index_t N = 50, D = 8, B = 6;
  std::vector<double> w(N, 1e-30);
  w[0] = 1.0;
  EngineConfig cfg;
  cfg.k = 4;
  cfg.exclude_positive = true;
  cfg.seed = 1;
  for (const int threads : {1, 2}) {
    CAPTURE(threads);
    ThreadCount tc(threads);
    Engine eng(Bank(N, D, 3), std::make_unique<AliasSampler>(w), cfg);
    const std::vector<index_t> ids(B, 0);  // every positive is the heavy id
    std::mt19937_64 rng(2);
    const RowMatrixf f = unit_rows(B, D, rng);
    RowMatrixf g(B, D);
    const Frozen before(eng);
    const std::string msg = message_of<Error>([&] { (void)eng.step(f, ids, g); });
    CAPTURE(msg);
    CHECK(msg.find("consecutive noise draws hit excluded ids") != std::string::npos);
    CHECK(before.same_as(eng));
    CHECK(message_of<Error>([&] { (void)eng.sample(ids, 0); }) == msg);
  }
}
