// Caller errors: each throws membank::Error naming the argument, and changes nothing (bank rows,
// last-update steps, step counter, Z).
#include "engine_state.hpp"
#include "reference.hpp"

#include <doctest/doctest.h>

#include <membank/engine.hpp>
#include <membank/error.hpp>

#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;

namespace {

constexpr index_t N = 100, D = 8, B = 5, K = 10;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

bool mentions_any(const std::string& msg, const std::vector<std::string>& words) {
  for (const std::string& w : words)
    if (mentions(msg, w)) return true;
  return false;
}


/// `call` must throw Error mentioning one of `words`, and leave the engine as it was.
void expect_rejected(Engine& eng, const std::function<void(Engine&)>& call,
                     const std::vector<std::string>& words) {
  const EngineState before = state_of(eng);
  CHECK_THROWS_AS(call(eng), Error);
  const std::string msg = message_of([&] { call(eng); });
  INFO("message: " << msg);
  CHECK(mentions_any(msg, words));
  check_unchanged(before, state_of(eng));
}

/// `call` must throw Error mentioning one of `words` (no state to compare).
void expect_error(const std::function<void()>& call, const std::vector<std::string>& words) {
  CHECK_THROWS_AS(call(), Error);
  const std::string msg = message_of(call);
  INFO("message: " << msg);
  CHECK(mentions_any(msg, words));
}

EngineConfig base_config() {
  EngineConfig cfg;
  cfg.k = K;
  cfg.tau = 0.07;
  cfg.seed = 1;
  return cfg;
}

/// A fresh first_batch engine (Z not yet initialised: a failing step must not initialise it) and an
/// ema engine after one good step (a failing step must neither move Z nor the counter).
std::vector<Engine> engines(bool exclude_positive, NegativesMode mode = NegativesMode::per_sample) {
  std::vector<Engine> v;
  v.reserve(2);
  EngineConfig cfg = base_config();
  cfg.exclude_positive = exclude_positive;
  cfg.negatives = mode;
  v.push_back(make_engine(N, D, true, cfg, 5));
  cfg.z_policy = ZPolicy::ema;
  v.push_back(make_engine(N, D, false, cfg, 6));
  std::mt19937_64 rng(7);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  RowMatrixf g(B, D);
  v.back().step(unit_rows(B, D, rng), ids, g);
  return v;
}

}  // namespace

TEST_CASE("step/evaluate/update/sample reject bad features, ids and gradients, changing nothing") {
  // Guards validation at the Engine boundary: wrong shapes (D, B vs ids, grad), ids out of range
  // (-1 and N), NaN / Inf / zero-norm / non-unit features (bad value in the last row, so a partial
  // refresh would show), the empty batch; each throws Error naming the argument, and the bank,
  // last-update steps, counter and Z are bit-identical afterwards.
  std::mt19937_64 rng(11);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  const RowMatrixf f = unit_rows(B, D, rng);
  for (Engine& eng : engines(false)) {
    INFO("policy " << to_string(eng.config().z_policy));
    RowMatrixf g(B, D);
    const RowMatrixi negs = random_negatives(B, K, N, rng);
    auto all_entry_points = [&](const RowMatrixf& bad_f, const std::vector<index_t>& bad_ids,
                                const std::vector<std::string>& words) {
      RowMatrixf gg(std::max<index_t>(bad_f.rows(), 0), D);
      expect_rejected(eng, [&](Engine& e) { e.step(bad_f, bad_ids, gg); }, words);
      expect_rejected(eng, [&](Engine& e) { e.step(bad_f, bad_ids, gg, false); }, words);
      expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(bad_f, bad_ids, negs, gg); }, words);
      expect_rejected(eng, [&](Engine& e) { e.evaluate(bad_f, bad_ids, negs, gg); }, words);
      expect_rejected(eng, [&](Engine& e) { e.update(bad_f, bad_ids); }, words);
    };
    {
      INFO("wrong feature dimension");
      all_entry_points(unit_rows(B, D + 1, rng), ids, {"features", "f"});
    }
    {
      INFO("feature rows differ from ids");
      std::vector<index_t> more = ids;
      more.push_back(3);
      RowMatrixf gg(B + 1, D);
      expect_rejected(eng, [&](Engine& e) { e.step(f, more, gg); }, {"features", "f", "ids"});
      expect_rejected(eng, [&](Engine& e) { e.update(f, more); }, {"features", "f", "ids"});
    }
    {
      INFO("id -1 and id N");
      for (index_t bad : {index_t{-1}, N}) {
        std::vector<index_t> b = ids;
        b.back() = bad;
        all_entry_points(f, b, {"ids"});
        CHECK_THROWS_AS(eng.sample(b, 0), Error);
      }
    }
    {
      INFO("NaN, Inf and zero-norm features");
      for (int kind = 0; kind < 3; ++kind) {
        CAPTURE(kind);
        RowMatrixf bad = f;
        if (kind == 0) bad(B - 1, 2) = kNaN;
        if (kind == 1) bad(B - 1, 2) = kInf;
        if (kind == 2) bad.row(B - 1).setZero();
        all_entry_points(bad, ids, {"features", "f"});
      }
    }
    {
      INFO("feature that is not unit-norm (normalize_features = false)");
      RowMatrixf bad = f;
      bad.row(B - 1) *= 1.01f;  // tolerance is 1e-3
      expect_rejected(eng, [&](Engine& e) { e.step(bad, ids, g); }, {"features", "f"});
      expect_rejected(eng, [&](Engine& e) { e.evaluate(bad, ids, negs, g); }, {"features", "f"});
    }
    {
      INFO("empty batch");
      const RowMatrixf none(0, D);
      RowMatrixf g0(0, D);
      const std::vector<index_t> no_ids;
      const RowMatrixi no_negs(0, K);
      expect_rejected(eng, [&](Engine& e) { e.step(none, no_ids, g0); }, {"ids", "features", "batch", "b"});
      expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(none, no_ids, no_negs, g0); },
                      {"ids", "features", "batch", "b"});
    }
    {
      INFO("gradient of the wrong shape");
      RowMatrixf g1(B, D - 1), g2(B - 1, D);
      expect_rejected(eng, [&](Engine& e) { e.step(f, ids, g1); }, {"grad"});
      expect_rejected(eng, [&](Engine& e) { e.step(f, ids, g2); }, {"grad"});
      expect_rejected(eng, [&](Engine& e) { e.evaluate(f, ids, negs, g1); }, {"grad"});
    }
    {
      INFO("negatives out of range or of the wrong shape");
      for (index_t bad : {index_t{-1}, N}) {
        RowMatrixi n2 = negs;
        n2(B - 1, K - 1) = bad;
        expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, n2, g); }, {"negatives"});
        expect_rejected(eng, [&](Engine& e) { e.evaluate(f, ids, n2, g); }, {"negatives"});
      }
      const RowMatrixi wrong_rows = random_negatives(B + 1, K, N, rng);
      expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, wrong_rows, g); }, {"negatives"});
      const RowMatrixi no_cols(B, 0);
      expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, no_cols, g); }, {"negatives", "k"});
    }
  }
}

TEST_CASE("shared negatives: a B x K matrix is refused") {
  // Guards the shape check of shared-mode caller negatives (1 x K expected).
  std::mt19937_64 rng(12);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  const RowMatrixf f = unit_rows(B, D, rng);
  RowMatrixf g(B, D);
  for (Engine& eng : engines(false, NegativesMode::shared)) {
    const RowMatrixi per_sample = random_negatives(B, K, N, rng);
    expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, per_sample, g); }, {"negatives"});
    RowMatrixi n1 = random_negatives(1, K, N, rng);
    n1(0, 0) = N;
    expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, n1, g); }, {"negatives"});
  }
}

TEST_CASE("exclude_positive: a caller negative equal to its positive is refused") {
  // Guards step_with_negatives / evaluate with exclude_positive: per-sample, the caller may not
  // pass the query's own positive as a negative; shared, no negative may equal any id of the batch.
  std::mt19937_64 rng(13);
  const std::vector<index_t> ids{1, 2, 3, 4, 5};
  const RowMatrixf f = unit_rows(B, D, rng);
  RowMatrixf g(B, D);
  for (Engine& eng : engines(true)) {
    RowMatrixi negs = RowMatrixi::Constant(B, K, 50);
    negs(B - 1, 3) = ids[B - 1];
    expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, negs, g); }, {"negatives"});
    expect_rejected(eng, [&](Engine& e) { e.evaluate(f, ids, negs, g); }, {"negatives"});
    negs(B - 1, 3) = 50;
    CHECK_NOTHROW(eng.evaluate(f, ids, negs, g));
  }
  for (Engine& eng : engines(true, NegativesMode::shared)) {
    RowMatrixi negs = RowMatrixi::Constant(1, K, 50);
    CHECK_NOTHROW(eng.evaluate(f, ids, negs, g));
    negs(0, 6) = ids[2];  // the positive of another query of the batch
    expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, negs, g); }, {"negatives"});
    expect_rejected(eng, [&](Engine& e) { e.evaluate(f, ids, negs, g); }, {"negatives"});
  }
}

TEST_CASE("EngineConfig::validate and the Engine constructor reject bad options") {
  // Guards option validation: K < 1, K >= N with exclude_positive, tau 0 / -1 / NaN, momentum
  // < 0 or > 1, z_fixed <= 0 with the fixed policy, z_ema outside [0, 1); each throws Error naming
  // the field from validate() and from the Engine constructor.
  struct Bad {
    std::function<void(EngineConfig&)> set;
    std::vector<std::string> words;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<Bad> bad{
      {[](EngineConfig& c) { c.k = 0; }, {"k"}},
      {[](EngineConfig& c) { c.k = -3; }, {"k"}},
      {[](EngineConfig& c) { c.k = N; c.exclude_positive = true; }, {"k"}},
      {[](EngineConfig& c) { c.k = N + 5; c.exclude_positive = true; }, {"k"}},
      {[](EngineConfig& c) { c.tau = 0; }, {"tau"}},
      {[](EngineConfig& c) { c.tau = -1; }, {"tau"}},
      {[nan](EngineConfig& c) { c.tau = nan; }, {"tau"}},
      {[](EngineConfig& c) { c.momentum = -0.1; }, {"momentum"}},
      {[](EngineConfig& c) { c.momentum = 1.1; }, {"momentum"}},
      {[nan](EngineConfig& c) { c.momentum = nan; }, {"momentum"}},
      {[](EngineConfig& c) { c.z_policy = ZPolicy::fixed; c.z_fixed = 0; }, {"z_fixed"}},
      {[](EngineConfig& c) { c.z_policy = ZPolicy::fixed; c.z_fixed = -2; }, {"z_fixed"}},
      {[](EngineConfig& c) { c.z_policy = ZPolicy::ema; c.z_ema = 1.0; }, {"z_ema"}},
  };
  for (std::size_t t = 0; t < bad.size(); ++t) {
    CAPTURE(t);
    EngineConfig cfg = base_config();
    bad[t].set(cfg);
    expect_error([&] { cfg.validate(N); }, bad[t].words);
    expect_error([&] { make_engine(N, D, false, cfg, 1); }, bad[t].words);
  }
  // K = N - 1 with exclude_positive and K >= N without it are fine.
  EngineConfig ok = base_config();
  ok.k = N - 1;
  ok.exclude_positive = true;
  CHECK_NOTHROW(ok.validate(N));
  ok.k = 2 * N;
  ok.exclude_positive = false;
  CHECK_NOTHROW(ok.validate(N));
}

TEST_CASE("Engine constructor rejects a missing sampler or one of the wrong size") {
  // Guards the Engine's check that the sampler exists and covers exactly the bank's N ids.
  expect_error([] { Engine e(Bank(N, D, 1), nullptr, base_config()); }, {"sampler"});
  expect_error([] { Engine e(Bank(N, D, 1), std::make_unique<UniformSampler>(N + 1), base_config()); },
               {"sampler"});
  const std::vector<double> w(N - 1, 1.0);
  expect_error([&] { Engine e(Bank(N, D, 1), std::make_unique<AliasSampler>(w), base_config()); },
               {"sampler"});
}

TEST_CASE("AliasSampler and UniformSampler reject bad weights and sizes") {
  // Guards sampler construction: negative, NaN, infinite weights, all zero, empty; UniformSampler
  // with n < 1; prob(j) out of range.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<std::vector<double>> bad{
      {1.0, -0.5, 2.0}, {1.0, nan, 2.0}, {1.0, inf}, {0.0, 0.0, 0.0}, {}};
  for (std::size_t t = 0; t < bad.size(); ++t) {
    CAPTURE(t);
    expect_error([&] { AliasSampler s(bad[t]); }, {"weights", "weight"});
  }
  expect_error([] { UniformSampler s(0); }, {"n"});
  expect_error([] { UniformSampler s(-4); }, {"n"});
  const AliasSampler s(std::vector<double>{1.0, 2.0});
  CHECK_THROWS_AS(s.prob(2), Error);
  CHECK_THROWS_AS(s.prob(-1), Error);
  const UniformSampler u(3);
  CHECK_THROWS_AS(u.prob(3), Error);
  CHECK_THROWS_AS(sampler_kind_from_string("gaussian"), Error);
}

TEST_CASE("Bank rejects bad construction and bad momentum updates, changing nothing") {
  // Guards Bank(n, d, seed) with n < 1 / d < 1 / N*D overflow, from_rows on empty / NaN / zero
  // rows, and momentum_update on wrong shapes, ids out of range, NaN / Inf / zero rows, m outside
  // [0, 1] and the empty batch: Error naming the argument, rows and last-update steps unchanged.
  expect_error([] { Bank b(0, D, 1); }, {"n"});
  expect_error([] { Bank b(-1, D, 1); }, {"n"});
  expect_error([] { Bank b(N, 0, 1); }, {"dim", "d"});
  CHECK_THROWS_AS(Bank(std::int64_t{1} << 40, std::int64_t{1} << 30, 1), Error);
  expect_error([] { Bank::from_rows(RowMatrixf(0, D)); }, {"rows"});
  {
    RowMatrixf r = RowMatrixf::Ones(4, D);
    r(2, 1) = kNaN;
    expect_error([&] { Bank::from_rows(r); }, {"rows"});
    r(2, 1) = 1;
    r.row(3).setZero();
    expect_error([&] { Bank::from_rows(r); }, {"rows"});
  }

  Bank bank(N, D, 3);
  std::mt19937_64 rng(14);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  bank.momentum_update(ids, unit_rows(B, D, rng), 0.5, 0);  // some last-update steps set
  const RowMatrixf rows0 = bank.to_matrix();
  const std::vector<std::int64_t> last0 = bank.last_update();
  const RowMatrixf f = unit_rows(B, D, rng);
  auto rejected = [&](const std::function<void()>& call, const std::vector<std::string>& words) {
    expect_error(call, words);
    CHECK(bits_equal(bank.to_matrix(), rows0));
    CHECK(bank.last_update() == last0);
  };
  rejected([&] { bank.momentum_update(ids, unit_rows(B, D + 1, rng), 0.5, 1); }, {"f", "features"});
  rejected([&] { bank.momentum_update(ids, unit_rows(B + 1, D, rng), 0.5, 1); }, {"f", "features", "ids"});
  for (index_t badid : {index_t{-1}, N}) {
    std::vector<index_t> b = ids;
    b.back() = badid;
    rejected([&] { bank.momentum_update(b, f, 0.5, 1); }, {"ids"});
  }
  for (int kind = 0; kind < 3; ++kind) {
    CAPTURE(kind);
    RowMatrixf bad = f;
    if (kind == 0) bad(B - 1, 0) = kNaN;
    if (kind == 1) bad(B - 1, 0) = -kInf;
    if (kind == 2) bad.row(B - 1).setZero();
    rejected([&] { bank.momentum_update(ids, bad, 0.5, 1); }, {"f", "features"});
  }
  rejected([&] { bank.momentum_update(ids, f, -0.01, 1); }, {"m", "momentum"});
  rejected([&] { bank.momentum_update(ids, f, 1.01, 1); }, {"m", "momentum"});
  rejected([&] { bank.momentum_update(ids, f, std::nan(""), 1); }, {"m", "momentum"});
  rejected([&] { bank.momentum_update({}, RowMatrixf(0, D), 0.5, 1); }, {"ids", "f", "features", "b"});
  rejected([&] { bank.set_last_update(std::vector<std::int64_t>(N - 1, 0)); }, {"steps", "last_update"});
}

TEST_CASE("full_softmax_loss rejects bad arguments") {
  // Guards validation of the free full-softmax function: tau <= 0 or NaN, ids out of range,
  // features not unit-norm / NaN / wrong D, grad of the wrong shape.
  const Bank bank(N, D, 4);
  std::mt19937_64 rng(15);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  const RowMatrixf f = unit_rows(B, D, rng);
  RowMatrixf g(B, D);
  expect_error([&] { full_softmax_loss(bank.view(), f, ids, 0.0, g); }, {"tau"});
  expect_error([&] { full_softmax_loss(bank.view(), f, ids, -1.0, g); }, {"tau"});
  expect_error([&] { full_softmax_loss(bank.view(), f, ids, std::nan(""), g); }, {"tau"});
  std::vector<index_t> bad_ids = ids;
  bad_ids[0] = N;
  expect_error([&] { full_softmax_loss(bank.view(), f, bad_ids, 0.07, g); }, {"ids"});
  RowMatrixf bad = f;
  bad(1, 1) = kNaN;
  expect_error([&] { full_softmax_loss(bank.view(), bad, ids, 0.07, g); }, {"features", "f"});
  bad = f * 1.5f;
  expect_error([&] { full_softmax_loss(bank.view(), bad, ids, 0.07, g); }, {"features", "f"});
  expect_error([&] { full_softmax_loss(bank.view(), unit_rows(B, D + 1, rng), ids, 0.07, g); },
               {"features", "f"});
  RowMatrixf g_bad(B, D + 1);
  expect_error([&] { full_softmax_loss(bank.view(), f, ids, 0.07, g_bad); }, {"grad"});
}

TEST_CASE("restore_state and the name parsers reject bad values") {
  // Guards restore_state (policy mismatch, non-finite log Z, negative step: Error, state
  // unchanged) and the *_from_string parsers (Error naming the bad value).
  for (Engine& eng : engines(false)) {
    Partition p = eng.partition();
    p.policy = eng.config().z_policy == ZPolicy::ema ? ZPolicy::fixed : ZPolicy::ema;
    p.initialised = true;
    expect_rejected(eng, [&](Engine& e) { e.restore_state(p, 3); }, {"partition", "policy"});
    Partition q = eng.partition();
    q.initialised = true;
    q.log_z = std::numeric_limits<double>::infinity();
    expect_rejected(eng, [&](Engine& e) { e.restore_state(q, 3); }, {"partition", "log_z", "z"});
    q.log_z = 5.0;
    expect_rejected(eng, [&](Engine& e) { e.restore_state(q, -1); }, {"step"});
  }
  expect_error([] { objective_from_string("bogus_objective"); }, {"bogus_objective"});
  expect_error([] { negatives_mode_from_string("bogus_mode"); }, {"bogus_mode"});
  expect_error([] { z_policy_from_string("bogus_policy"); }, {"bogus_policy"});
  CHECK(objective_from_string(to_string(Objective::info_nce)) == Objective::info_nce);
  CHECK(negatives_mode_from_string(to_string(NegativesMode::shared)) == NegativesMode::shared);
  CHECK(z_policy_from_string(to_string(ZPolicy::ema)) == ZPolicy::ema);
}

TEST_CASE("caller negatives the sampler can never draw are refused") {
  // Guards step_with_negatives against a negative whose P_n is 0 (an alias weight of zero): its
  // NCE term would be log(0); the step throws Error naming the entry and leaves the engine as it was.
  std::vector<double> w(N, 1.0);
  w[7] = 0.0;
  EngineConfig cfg;
  cfg.k = K;
  Engine eng(Bank(N, D, 3), std::make_unique<AliasSampler>(w), cfg);
  std::mt19937_64 rng(77);
  const std::vector<index_t> ids = random_ids(B, N, rng);
  const RowMatrixf f = unit_rows(B, D, rng);
  RowMatrixi neg = RowMatrixi::Constant(B, K, 8);
  neg(2, 4) = 7;
  RowMatrixf g(B, D);
  expect_rejected(eng, [&](Engine& e) { e.step_with_negatives(f, ids, neg, g); }, {"negatives(2, 4)", "P_n = 0"});
  neg(2, 4) = 8;
  CHECK_NOTHROW(eng.step_with_negatives(f, ids, neg, g));
}
