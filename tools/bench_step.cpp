// `membank bench step`: the median time of one whole training step (sample, score, loss, gradient,
// bank update) against `floor_ms`, the time of the work no implementation can avoid -- reading the
// same B x (K + 1) random bank rows and taking one dot product with each -- measured in the same run.
#include "commands.hpp"
#include "machine_info.hpp"

#include <membank/engine.hpp>
#include <membank/error.hpp>

#include "detail/simd.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <vector>

namespace membank::tools {

namespace {

struct StepOptions {
  index_t n = 1281167;
  index_t dim = 128;
  index_t k = 4096;
  index_t batch = 256;
  int threads = 0;
  std::string negatives = "per-sample";
  std::string sampler = "uniform";
  std::string objective = "nce";
  int repeats = 15;
  std::uint64_t seed = 1;
  bool json = false;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

RowMatrixf random_unit_rows(index_t rows, index_t dim, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  RowMatrixf f(rows, dim);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t c = 0; c < dim; ++c) f(i, c) = normal(rng);
    f.row(i).normalize();
  }
  return f;
}

/// The floor: gather B x (K + 1) random rows with the engine's prefetch and dot kernels, in parallel
/// over queries exactly as the per-sample step is. Returns a checksum so nothing is optimised away.
double floor_pass(const BankView& bank, const RowMatrixi& rows, const RowMatrixf& f) {
  constexpr index_t kAhead = 8;
  const index_t batch = rows.rows(), cols = rows.cols(), dim = bank.dim;
  double checksum = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : checksum)
  for (index_t i = 0; i < batch; ++i) {
    const index_t* r = rows.row(i).data();
    const float* q = f.row(i).data();
    for (index_t k = 0; k < std::min(kAhead, cols); ++k) detail::prefetch_row(bank.row(r[k]), dim);
    float acc = 0.0f;
    for (index_t k = 0; k < cols; ++k) {
      if (k + kAhead < cols) detail::prefetch_row(bank.row(r[k + kAhead]), dim);
      acc += detail::dot(bank.row(r[k]), q, dim);
    }
    checksum += acc;
  }
  return checksum;
}

/// One configuration: prints its figures, returns the median step time.
double run_one(const StepOptions& o) {
  const int threads = omp_get_max_threads();
  std::mt19937_64 rng(o.seed);

  EngineConfig cfg;
  cfg.k = o.k;
  cfg.negatives = negatives_mode_from_string(o.negatives);
  cfg.objective = objective_from_string(o.objective);
  cfg.seed = o.seed;
  std::unique_ptr<NoiseSampler> sampler;
  double alias_build_ms = 0.0;
  if (sampler_kind_from_string(o.sampler) == SamplerKind::alias) {
    std::vector<double> w(static_cast<std::size_t>(o.n));
    std::uniform_real_distribution<double> u(0.5, 2.0);
    for (auto& x : w) x = u(rng);
    const double t0 = now_ms();
    sampler = std::make_unique<AliasSampler>(w);
    alias_build_ms = now_ms() - t0;
  } else {
    sampler = std::make_unique<UniformSampler>(o.n);
  }
  if (!o.json) fmt::print(stderr, "building a {} x {} bank ({:.2f} GB) ...\n", o.n, o.dim, o.n * o.dim * 4e-9);
  Engine engine(Bank(o.n, o.dim, o.seed), std::move(sampler), cfg);

  // Inputs: fresh ids and features for every step (generated before timing).
  const int steps = o.repeats + 2;
  std::uniform_int_distribution<index_t> any_id(0, o.n - 1);
  std::vector<std::vector<index_t>> ids(static_cast<std::size_t>(steps));
  std::vector<RowMatrixf> feats;
  for (auto& v : ids) {
    v.resize(static_cast<std::size_t>(o.batch));
    for (auto& y : v) y = any_id(rng);
    feats.push_back(random_unit_rows(o.batch, o.dim, rng));
  }
  RowMatrixf grad(o.batch, o.dim);

  // Before timing: the fused step must agree bit-for-bit with the same step given its own draws.
  {
    const RowMatrixi drawn = engine.sample(ids[0], engine.steps_done());
    RowMatrixf g2(o.batch, o.dim);
    const StepStats ref = engine.evaluate(feats[0], ids[0], drawn, g2);
    const StepStats got = engine.step(feats[0], ids[0], grad, true);
    MEMBANK_CHECK(got.loss == ref.loss && grad == g2,
                  "self-check failed: step loss {} vs the same step with its drawn negatives {}", got.loss,
                  ref.loss);
  }
  engine.step(feats[1], ids[1], grad, true);  // warm-up
  std::vector<double> step_ms;
  for (int s = 2; s < steps; ++s) {
    const double t0 = now_ms();
    engine.step(feats[static_cast<std::size_t>(s)], ids[static_cast<std::size_t>(s)], grad, true);
    step_ms.push_back(now_ms() - t0);
  }

  // The floor, same count of rows: K + 1 per query (per-sample) -- the whole B x (K + 1) reads.
  RowMatrixi rows(o.batch, o.k + 1);
  for (index_t i = 0; i < rows.size(); ++i) rows.data()[i] = any_id(rng);
  const RowMatrixf fq = random_unit_rows(o.batch, o.dim, rng);
  double checksum = floor_pass(engine.bank().view(), rows, fq);  // warm-up
  std::vector<double> floor_ms;
  for (int s = 0; s < o.repeats; ++s) {
    for (index_t i = 0; i < rows.size(); ++i) rows.data()[i] = any_id(rng);
    const double t0 = now_ms();
    checksum += floor_pass(engine.bank().view(), rows, fq);
    floor_ms.push_back(now_ms() - t0);
  }

  const double step_med = median(step_ms), floor_med = median(floor_ms);
  const double gbytes = static_cast<double>(o.batch) * static_cast<double>(o.k + 1) * o.dim * 4e-9;
  nlohmann::json row = {
      {"bench", "step"},          {"n", o.n},
      {"dim", o.dim},             {"k", o.k},
      {"batch", o.batch},         {"threads", threads},
      {"negatives", o.negatives}, {"sampler", o.sampler},
      {"objective", o.objective}, {"step_ms", step_med},
      {"step_min_ms", *std::min_element(step_ms.begin(), step_ms.end())},
      {"step_max_ms", *std::max_element(step_ms.begin(), step_ms.end())},
      {"floor_ms", floor_med},    {"step_over_floor", step_med / floor_med},
      {"floor_gb_per_s", gbytes / (floor_med * 1e-3)},
      {"alias_build_ms", alias_build_ms},
      {"repeats", o.repeats},     {"cpu", cpu_model()},
      {"build", MEMBANK_BUILD_TYPE}, {"version", MEMBANK_VERSION_STRING},
      {"git", git_revision()},    {"checksum", std::isfinite(checksum)}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return step_med;
  }
  fmt::print("membank bench step: N = {}, D = {}, K = {}, B = {}, {} negatives, {} sampler, {}, {} threads\n",
             o.n, o.dim, o.k, o.batch, o.negatives, o.sampler, o.objective, threads);
  fmt::print("  step   median {:8.2f} ms   (min {:.2f}, max {:.2f}, {} steps)\n", step_med,
             row["step_min_ms"].get<double>(), row["step_max_ms"].get<double>(), o.repeats);
  fmt::print("  floor  median {:8.2f} ms   ({:.2f} GB of random rows read at {:.1f} GB/s)\n", floor_med, gbytes,
             gbytes / (floor_med * 1e-3));
  fmt::print("  step / floor = {:.2f}\n", step_med / floor_med);
  if (alias_build_ms > 0) fmt::print("  alias table built in {:.1f} ms\n", alias_build_ms);
  return step_med;
}

void run_bench_step(StepOptions o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (o.negatives != "both") {
    run_one(o);
    return;
  }
  o.negatives = "per-sample";
  const double per_sample = run_one(o);
  o.negatives = "shared";
  const double shared = run_one(o);
  if (!o.json) fmt::print("per-sample / shared step time = {:.2f}\n", per_sample / shared);
}

}  // namespace

void add_bench_step(CLI::App& bench) {
  auto o = std::make_shared<StepOptions>();
  auto* cmd = bench.add_subcommand(
      "step",
      "Median time of one whole NCE training step (sample, score, loss, gradient, update) and floor_ms, the "
      "time of reading the same B x (K+1) random bank rows with one dot product each, measured in the same run.");
  cmd->add_option("--n", o->n, "bank size N (instances)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--dim", o->dim, "embedding dimension D")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--k", o->k, "noise draws per query K")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--batch", o->batch, "queries per step B")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: the OpenMP default)")->capture_default_str();
  cmd->add_option("--negatives", o->negatives,
                  "per-sample (each query its own K), shared (one K per step), or both (one after the other "
                  "in this run, with their ratio)")
      ->capture_default_str()
      ->check(CLI::IsMember({"per-sample", "shared", "both"}));
  cmd->add_option("--sampler", o->sampler, "noise distribution: uniform, or alias over random weights")
      ->capture_default_str()
      ->check(CLI::IsMember({"uniform", "alias"}));
  cmd->add_option("--objective", o->objective, "nce, infonce, or full (exact softmax over the bank)")
      ->capture_default_str()
      ->check(CLI::IsMember({"nce", "infonce", "full"}));
  cmd->add_option("--repeats", o->repeats, "timed steps (and floor passes)")->capture_default_str()->check(
      CLI::PositiveNumber);
  cmd->add_option("--seed", o->seed, "seed of the bank, the inputs and the negatives")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object instead of text");
  cmd->callback([o] { run_bench_step(*o); });
}

}  // namespace membank::tools
