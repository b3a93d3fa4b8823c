// Aliasing between a call's arguments and the bank (memory.hpp's contract): inputs that overlap
// the bank (features = rows of the live bank) give exactly the result of a copy; an output (grad)
// that overlaps an input, itself or the bank is refused with an Error naming both, changing nothing.
#include "engine_state.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>

#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

using ConstMap = Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>>;
using Map = Eigen::Map<RowMatrixf, 0, Eigen::OuterStride<>>;

/// The bytes a region covers, by brute force (the oracle of overlaps()).
std::set<std::uintptr_t> bytes_of(const MemoryRegion& r) {
  std::set<std::uintptr_t> s;
  const auto base = reinterpret_cast<std::uintptr_t>(r.data);
  for (std::int64_t i = 0; i < r.runs; ++i)
    for (std::int64_t b = 0; b < r.run_bytes; ++b)
      s.insert(static_cast<std::uintptr_t>(static_cast<std::int64_t>(base) + i * r.stride_bytes + b));
  return s;
}

bool brute_overlap(const MemoryRegion& a, const MemoryRegion& b) {
  const auto sa = bytes_of(a), sb = bytes_of(b);
  for (const auto x : sa)
    if (sb.count(x)) return true;
  return false;
}

/// `call` throws Error whose message names both `out` and `in`, and the engine is unchanged.
void expect_refused(Engine& eng, const std::function<void()>& call, const std::string& out, const std::string& in) {
  const EngineState before = state_of(eng);
  const std::string msg = message_of(call);
  INFO("message: " << msg);
  CHECK(msg.find(out) != std::string::npos);
  CHECK(msg.find(in) != std::string::npos);
  CHECK(msg.find("share memory") != std::string::npos);
  check_unchanged(before, state_of(eng));
}

EngineConfig config(NegativesMode mode, Objective objective = Objective::nce) {
  EngineConfig c;
  c.k = 16;
  c.tau = 0.1;
  c.momentum = 0.5;
  c.negatives = mode;
  c.objective = objective;
  c.seed = 3;
  return c;
}

}  // namespace

TEST_CASE("overlaps() agrees with a byte-by-byte comparison on strided regions") {
  // Guards the one overlap helper every entry point uses: random regions (runs, widths, strides
  // including stride < width and negative strides) inside one buffer, compared with the set of bytes.
  std::vector<std::byte> buf(4096);
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> off(0, 1500), runs(0, 9), width(0, 40), stride(-60, 90);
  int hits = 0, misses = 0;
  for (int t = 0; t < 3000; ++t) {
    MemoryRegion r[2];
    for (auto& x : r) {
      x.runs = runs(rng);
      x.run_bytes = width(rng);
      x.stride_bytes = stride(rng);
      std::int64_t start = 1500 + off(rng);
      x.data = buf.data() + start;
    }
    const bool want = brute_overlap(r[0], r[1]);
    REQUIRE(overlaps(r[0], r[1]) == want);
    REQUIRE(overlaps(r[1], r[0]) == want);
    (want ? hits : misses) += 1;
  }
  CHECK(hits > 300);  // both outcomes well represented
  CHECK(misses > 300);
  // Interleaved columns of one matrix do not overlap; interleaved rows with a common byte do.
  RowMatrixf x(6, 16);
  CHECK_FALSE(overlaps(MemoryRegion::of_matrix(x.leftCols(8)), MemoryRegion::of_matrix(x.rightCols(8))));
  CHECK(overlaps(MemoryRegion::of_matrix(x.leftCols(9)), MemoryRegion::of_matrix(x.rightCols(8))));
  CHECK(overlaps_itself(MemoryRegion{x.data(), 3, 64, 0}));
  CHECK_FALSE(overlaps_itself(MemoryRegion{x.data(), 3, 64, 64}));
}

TEST_CASE("features that are rows of the live bank give the result of a copy of those rows") {
  // Guards the legitimate overlap: step / step_with_negatives / update / Bank::momentum_update with
  // features mapped onto the engine's own bank rows (D = 20: padded rows, stride 32) and ids in an
  // order where the refresh of one row would otherwise feed another row's refresh. A twin engine
  // given a plain copy of the same rows must end bit-identical (loss, gradient, bank, Z, counter).
  constexpr index_t n = 64, d = 20, b = 6;
  const std::vector<index_t> ids = {1, 0, 3, 2, 5, 4};  // row i's feature is the row of ids[i] ^ 1
  for (const NegativesMode mode : {NegativesMode::per_sample, NegativesMode::shared}) {
    for (const bool with_negatives : {false, true}) {
      INFO("mode " << to_string(mode) << " negatives " << with_negatives);
      Engine live = make_engine(n, d, false, config(mode), 9);
      Engine twin = make_engine(n, d, false, config(mode), 9);
      REQUIRE(live.bank().stride() == 32);
      const ConstMap rows(live.bank().row(0), b, d, Eigen::OuterStride<>(live.bank().stride()));
      const RowMatrixf copy = rows;
      const RowMatrixi neg = live.sample(ids, live.steps_done());
      RowMatrixf g_live(b, d), g_twin(b, d);
      StepStats s_live, s_twin;
      if (with_negatives) {
        s_live = live.step_with_negatives(rows, ids, neg, g_live);
        s_twin = twin.step_with_negatives(copy, ids, neg, g_twin);
      } else {
        s_live = live.step(rows, ids, g_live);
        s_twin = twin.step(copy, ids, g_twin);
      }
      CHECK(bits_equal(s_live.loss, s_twin.loss));
      CHECK(bits_equal(g_live, g_twin));
      check_unchanged(state_of(live), state_of(twin));
      // Engine::update with the bank's rows, twice (the second reads rows the first wrote).
      for (int r = 0; r < 2; ++r) {
        const RowMatrixf again = rows;
        live.update(rows, ids);
        twin.update(again, ids);
        check_unchanged(state_of(live), state_of(twin));
      }
    }
  }
  // Bank::momentum_update on its own rows, against the sequential double reference on a copy.
  Bank bank(32, d, 4);
  const RowMatrixd before = bank.to_matrix().cast<double>();
  const ConstMap own(bank.row(0), b, d, Eigen::OuterStride<>(bank.stride()));
  const RowMatrixd f = RowMatrixf(own).cast<double>();
  bank.momentum_update(ids, own, 0.5, 7);
  const RowMatrixd want = reference_momentum(before, ids, f, 0.5);
  CHECK((bank.to_matrix().cast<double>() - want).cwiseAbs().maxCoeff() < 1e-6);
}

TEST_CASE("a gradient buffer overlapping features, ids, negatives, itself or the bank is refused") {
  // Guards the refused overlaps of every entry point with an output: step, step_with_negatives,
  // evaluate and full_softmax_loss. Each throws Error naming grad and the other argument, and
  // the engine (bank, last-update steps, counter, Z) is unchanged; the caller's inputs too.
  constexpr index_t n = 50, d = 8, b = 4;
  std::mt19937_64 rng(21);
  for (const Objective obj : {Objective::nce, Objective::full_softmax}) {
    Engine eng = make_engine(n, d, false, config(NegativesMode::per_sample, obj), 2);
    const std::vector<index_t> ids = random_ids(b, n, rng);
    const RowMatrixi neg = eng.sample(ids, 0);
    RowMatrixf f = unit_rows(b, d, rng);
    const RowMatrixf f_before = f;
    INFO("objective " << to_string(obj));
    // grad = features (engine.step(f, ids, out=f))
    expect_refused(eng, [&] { eng.step(f, ids, f); }, "grad", "features");
    expect_refused(eng, [&] { eng.step_with_negatives(f, ids, neg, f); }, "grad", "features");
    expect_refused(eng, [&] { eng.evaluate(f, ids, neg, f); }, "grad", "features");
    CHECK(bits_equal(f, f_before));
    // grad's last row over features' first row only
    RowMatrixf both(2 * b - 1, d);
    both.topRows(b) = f;
    Map g_tail(both.data() + (b - 1) * d, b, d, Eigen::OuterStride<>(d));
    expect_refused(eng, [&] { eng.step(both.topRows(b), ids, g_tail); }, "grad", "features");
    // grad over the ids (int64 stored in the gradient's memory)
    RowMatrixf gbuf(b, d);
    std::memcpy(gbuf.data(), ids.data(), ids.size() * sizeof(index_t));
    const IdsRef ids_in_grad(reinterpret_cast<const index_t*>(gbuf.data()), ids.size());
    expect_refused(eng, [&] { eng.step(f, ids_in_grad, gbuf); }, "grad", "ids");
    // grad over the negatives
    RowMatrixi nbuf = neg;
    Map g_neg(reinterpret_cast<float*>(nbuf.data()), b, d, Eigen::OuterStride<>(d));
    expect_refused(eng, [&] { eng.step_with_negatives(f, ids, nbuf, g_neg); }, "grad", "negatives");
    expect_refused(eng, [&] { eng.evaluate(f, ids, nbuf, g_neg); }, "grad", "negatives");
    // grad over the bank's rows and last-update steps (what a const_cast would give)
    Map g_bank(const_cast<float*>(eng.bank().row(3)), b, d, Eigen::OuterStride<>(eng.bank().stride()));
    expect_refused(eng, [&] { eng.step(f, ids, g_bank); }, "grad", "bank's rows");
    Map g_last(reinterpret_cast<float*>(const_cast<std::int64_t*>(eng.bank().last_update().data())), b, d,
               Eigen::OuterStride<>(d));
    expect_refused(eng, [&] { eng.step(f, ids, g_last); }, "grad", "last-update");
    // grad whose rows overlap each other (outer stride 1 < D; Eigen reads a stride of 0 as D)
    RowMatrixf one(1, 2 * d);
    Map g_self(one.data(), b, d, Eigen::OuterStride<>(1));
    const std::string msg = message_of([&] { eng.step(f, ids, g_self); });
    CHECK(msg.find("grad has rows that share memory") != std::string::npos);
    // full_softmax_loss, the free function
    const std::string fs = message_of([&] { full_softmax_loss(eng.bank().view(), f, ids, 0.1, f); });
    CHECK(fs.find("grad and features share memory") != std::string::npos);
    const std::string fb = message_of([&] { full_softmax_loss(eng.bank().view(), f, ids, 0.1, g_bank); });
    CHECK(fb.find("grad and the bank's rows share memory") != std::string::npos);
    CHECK(bits_equal(f, f_before));
  }
}

TEST_CASE("features and grad as disjoint interleaved columns of one buffer are accepted") {
  // Guards against refusing too much: the overlap test is exact for strided rows, so features in
  // the left half and grad in the right half of each row of one B x 2D buffer is a legal call whose
  // results equal those of separate buffers.
  constexpr index_t n = 40, d = 8, b = 5;
  std::mt19937_64 rng(8);
  Engine a = make_engine(n, d, false, config(NegativesMode::per_sample), 4);
  Engine c = make_engine(n, d, false, config(NegativesMode::per_sample), 4);
  const std::vector<index_t> ids = random_ids(b, n, rng);
  RowMatrixf buf(b, 2 * d);
  buf.leftCols(d) = unit_rows(b, d, rng);
  const RowMatrixf f = buf.leftCols(d);
  Map g_right(buf.data() + d, b, d, Eigen::OuterStride<>(2 * d));
  RowMatrixf g(b, d);
  const StepStats sa = a.step(ConstMap(buf.data(), b, d, Eigen::OuterStride<>(2 * d)), ids, g_right);
  const StepStats sc = c.step(f, ids, g);
  CHECK(bits_equal(sa.loss, sc.loss));
  CHECK(bits_equal(RowMatrixf(g_right), g));
  CHECK(bits_equal(RowMatrixf(buf.leftCols(d)), f));  // the features were not touched
  check_unchanged(state_of(a), state_of(c));
}

TEST_CASE("knn_evaluate and full_softmax_loss read queries that are rows of the bank") {
  // Guards the read-only entry points: queries / features mapped onto the bank's rows are legal and
  // give the results of a copy.
  constexpr index_t n = 300, d = 20, q = 7;
  Bank bank(n, d, 12);
  std::vector<int> labels(n);
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = static_cast<int>(i % 5);
  const ConstMap rows(bank.row(10), q, d, Eigen::OuterStride<>(bank.stride()));
  const RowMatrixf copy = rows;
  const std::vector<int> ql(labels.begin() + 10, labels.begin() + 10 + q);
  const KnnResult a = knn_evaluate(bank.view(), labels, rows, ql, {5, 0.1});
  const KnnResult b = knn_evaluate(bank.view(), labels, copy, ql, {5, 0.1});
  CHECK(a.predictions == b.predictions);
  CHECK(a.top1 == b.top1);
  std::vector<index_t> ids(q);
  std::iota(ids.begin(), ids.end(), index_t{10});
  RowMatrixf ga(q, d), gb(q, d);
  const double la = full_softmax_loss(bank.view(), rows, ids, 0.1, ga);
  const double lb = full_softmax_loss(bank.view(), copy, ids, 0.1, gb);
  CHECK(bits_equal(la, lb));
  CHECK(bits_equal(ga, gb));
}
