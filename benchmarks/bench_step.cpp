// `membank bench step`: the median time of one whole training step (sample, score, loss, gradient,
// bank update) against `floor_ms`, the time of the work no implementation can avoid -- reading the
// same B x (K + 1) random bank rows and taking one dot product with each -- measured in the same run.
#include "bench_common.hpp"
#include "commands.hpp"
#include "options.hpp"
#include "machine_info.hpp"

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/isa.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <string>
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
  std::string dtype = "float32";  ///< one type, or a comma-separated list measured in one run
  int repeats = 15;
  double overlap_ms = -1.0;  ///< >= 0: also time steps after this much simulated caller compute, with and without prefetch
  std::uint64_t seed = 1;
  bool json = false;
};

/// Medians of one configuration: step and floor (ms), and the median of the ratios of each step to
/// the floor pass timed just before it (on a shared machine the pairs see the same background load,
/// so this is the steadier figure).
struct StepFigures {
  double step_ms, floor_ms, ratio;
};

/// Median over i of step_ms[i] / floor_ms[i].
double paired_ratio(const std::vector<double>& step_ms, const std::vector<double>& floor_ms) {
  std::vector<double> r(step_ms.size());
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = step_ms[i] / floor_ms[i];
  return median(r);
}

/// One configuration: prints its figures, returns the median step and floor times.
/// The options' configuration with a bank of type `dtype` (announced on stderr in text mode).
StepSetup setup_of(const StepOptions& o, const std::string& dtype) {
  StepSetup setup;
  setup.n = o.n;
  setup.dim = o.dim;
  setup.k = o.k;
  setup.batch = o.batch;
  setup.negatives = negatives_mode_from_string(o.negatives);
  setup.sampler = sampler_kind_from_string(o.sampler);
  setup.objective = objective_from_string(o.objective);
  setup.dtype = dtype_from_string(dtype);
  setup.seed = o.seed;
  if (!o.json)
    fmt::print(stderr, "building a {} x {} {} bank ({:.2f} GB) ...\n", o.n, o.dim, dtype,
               static_cast<double>(o.n) * static_cast<double>(o.dim) * dtype_bytes(setup.dtype) * 1e-9);
  return setup;
}

StepFigures run_one(const StepOptions& o) {
  const int threads = omp_get_max_threads();
  const StepSetup setup = setup_of(o, o.dtype);
  StepBench bench(setup, o.overlap_ms >= 0 ? 3 * o.repeats : o.repeats);
  const double alias_build_ms = bench.alias_build_ms;
  // The floor, same count of rows: K + 1 per query (per-sample) -- the whole B x (K + 1) reads --
  // timed pass by pass alternately with the steps, so that both see the same background load.
  double checksum = 0.0;
  const auto [step_ms, floor_ms] = bench.time_interleaved(o.repeats, &checksum);

  const double step_med = median(step_ms), floor_med = median(floor_ms);
  const double ratio = paired_ratio(step_ms, floor_ms);
  const double gbytes = static_cast<double>(o.batch) * static_cast<double>(o.k + 1) * static_cast<double>(o.dim) *
                        dtype_bytes(setup.dtype) * 1e-9;
  nlohmann::json row = {
      {"bench", "step"},          {"n", o.n},
      {"dim", o.dim},             {"k", o.k},
      {"batch", o.batch},         {"threads", threads},
      {"negatives", o.negatives}, {"sampler", o.sampler},
      {"objective", o.objective}, {"dtype", o.dtype},
      {"step_ms", step_med},
      {"step_min_ms", *std::min_element(step_ms.begin(), step_ms.end())},
      {"step_max_ms", *std::max_element(step_ms.begin(), step_ms.end())},
      {"floor_ms", floor_med},    {"step_over_floor", ratio},
      {"median_step_over_median_floor", step_med / floor_med},
      {"floor_gb_per_s", gbytes / (floor_med * 1e-3)},
      {"alias_build_ms", alias_build_ms},
      {"repeats", o.repeats},     {"cpu", cpu_model()},
      {"build", MEMBANK_BUILD_TYPE}, {"version", MEMBANK_VERSION_STRING},
      {"git", git_revision()},    {"checksum", std::isfinite(checksum)},
      {"isa", to_string(active_isa())}};
  if (o.overlap_ms >= 0) {
    // The caller's loop: step, announce the next ids, compute (a sleep), step. Steps without and with
    // the announcement alternate; only the steps are timed.
    std::vector<double> plain, ahead;
    for (int r = 0; r < o.repeats; ++r) {
      plain.push_back(bench.step_after(o.overlap_ms, false));
      ahead.push_back(bench.step_after(o.overlap_ms, true));
    }
    const double p = median(plain), a = median(ahead);
    row["overlap_ms"] = o.overlap_ms;
    row["step_after_overlap_ms"] = p;
    row["step_after_overlap_prefetched_ms"] = a;
    row["prefetch_saved_ms"] = p - a;
    row["prefetch_saved_over_floor"] = (p - a) / floor_med;
  }
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return {step_med, floor_med, ratio};
  }
  fmt::print("membank bench step: N = {}, D = {}, K = {}, B = {}, {} rows, {} negatives, {} sampler, {}, {} "
             "threads, {} kernels\n", o.n, o.dim, o.k, o.batch, o.dtype, o.negatives, o.sampler, o.objective, threads,
             to_string(active_isa()));
  fmt::print("  step   median {:8.2f} ms   (min {:.2f}, max {:.2f}, {} steps)\n", step_med,
             row["step_min_ms"].get<double>(), row["step_max_ms"].get<double>(), o.repeats);
  fmt::print("  floor  median {:8.2f} ms   ({:.2f} GB of random rows read at {:.1f} GB/s)\n", floor_med, gbytes,
             gbytes / (floor_med * 1e-3));
  fmt::print("  step / floor = {:.2f}   (median of the {} paired ratios; the medians' ratio: {:.2f})\n", ratio,
             step_ms.size(), step_med / floor_med);
  if (alias_build_ms > 0) fmt::print("  alias table built in {:.1f} ms\n", alias_build_ms);
  if (o.overlap_ms >= 0) {
    const double p = row["step_after_overlap_ms"].get<double>(), a = row["step_after_overlap_prefetched_ms"].get<double>();
    fmt::print("  after {:.1f} ms of caller compute: step {:.2f} ms; with the ids announced first (prefetch) {:.2f} ms: "
               "{:.2f} ms ({:.0f}% of the floor) off the critical path\n", o.overlap_ms, p, a, p - a,
               100.0 * (p - a) / floor_med);
  }
  return {step_med, floor_med, ratio};
}

/// Several storage types in one run: one engine per type, all alive at once, timed round by round
/// (each round: every type's floor pass, then its step), so that every type sees the same background
/// load. Prints each type's figures (one JSON object each with --json) and, against the first type,
/// the paired ratios of the steps and of the floors.
void run_dtypes(const StepOptions& o, const std::vector<std::string>& types) {
  const int threads = omp_get_max_threads();
  std::vector<std::unique_ptr<StepBench>> benches;
  for (const auto& t : types) benches.push_back(std::make_unique<StepBench>(setup_of(o, t), o.repeats));
  double checksum = 0.0;
  for (auto& b : benches) b->begin(&checksum);
  std::vector<std::vector<double>> step_ms(types.size()), floor_ms(types.size());
  for (int r = 1; r < o.repeats; ++r)
    for (std::size_t t = 0; t < types.size(); ++t) {
      floor_ms[t].push_back(benches[t]->floor_once(&checksum));
      step_ms[t].push_back(benches[t]->step_once());
    }
  if (!o.json)
    fmt::print("membank bench step: N = {}, D = {}, K = {}, B = {}, {} negatives, {} sampler, {}, {} threads, {} "
               "kernels, {} rounds\n", o.n, o.dim, o.k, o.batch, o.negatives, o.sampler, o.objective, threads,
               to_string(active_isa()), o.repeats - 1);
  for (std::size_t t = 0; t < types.size(); ++t) {
    const double step_med = median(step_ms[t]), floor_med = median(floor_ms[t]);
    const double ratio = paired_ratio(step_ms[t], floor_ms[t]);
    const double step_vs = paired_ratio(step_ms[t], step_ms[0]), floor_vs = paired_ratio(floor_ms[t], floor_ms[0]);
    nlohmann::json row = {{"bench", "step"}, {"n", o.n}, {"dim", o.dim}, {"k", o.k}, {"batch", o.batch},
                          {"threads", threads}, {"negatives", o.negatives}, {"sampler", o.sampler},
                          {"objective", o.objective}, {"dtype", types[t]}, {"step_ms", step_med},
                          {"floor_ms", floor_med}, {"step_over_floor", ratio},
                          {"step_vs_" + types[0], step_vs}, {"floor_vs_" + types[0], floor_vs},
                          {"rounds", o.repeats - 1}, {"cpu", cpu_model()}, {"build", MEMBANK_BUILD_TYPE},
                          {"version", MEMBANK_VERSION_STRING}, {"git", git_revision()},
                          {"checksum", std::isfinite(checksum)}, {"isa", to_string(active_isa())}};
    if (o.json) {
      fmt::print("{}\n", row.dump());
      continue;
    }
    fmt::print("  {:9} step {:7.2f} ms  floor {:7.2f} ms  step / floor {:5.2f}   against {}: step {:5.2f}, "
               "floor {:5.2f}\n", types[t], step_med, floor_med, ratio, types[0], step_vs, floor_vs);
  }
  if (!o.json)
    fmt::print("  (medians over the rounds; ratios are medians of the per-round ratios)\n");
}

void run_bench_step(StepOptions o) {
  apply_threads(o.threads);
  if (o.dtype.find(',') != std::string::npos) {
    std::vector<std::string> types;
    for (std::size_t at = 0; at <= o.dtype.size();) {
      const std::size_t end = std::min(o.dtype.find(',', at), o.dtype.size());
      types.push_back(to_string(dtype_from_string(o.dtype.substr(at, end - at))));
      at = end + 1;
    }
    MEMBANK_CHECK(o.objective != "all" && o.negatives != "both", "--dtype with a list: expected one --objective "
                  "(not all) and one --negatives (not both)");
    MEMBANK_CHECK(o.repeats >= 2, "--dtype with a list: expected --repeats >= 2 (the first step is the check)");
    run_dtypes(o, types);
    return;
  }
  o.dtype = to_string(dtype_from_string(o.dtype));
  if (o.objective == "all") {  // every objective but the full softmax, each against its own floor
    std::vector<std::pair<std::string, StepFigures>> figures;
    for (const Objective obj : all_objectives()) {
      if (obj == Objective::full_softmax) continue;
      StepOptions one = o;
      one.objective = to_string(obj);
      figures.emplace_back(one.objective, run_one(one));
    }
    if (!o.json) {
      fmt::print("objective      step ms   floor ms   step / floor\n");
      for (const auto& [name, f] : figures)
        fmt::print("{:12} {:9.2f}  {:9.2f}   {:6.2f}\n", name, f.step_ms, f.floor_ms, f.ratio);
    }
    return;
  }
  if (o.negatives != "both") {
    run_one(o);
    return;
  }
  o.negatives = "per-sample";
  const double per_sample = run_one(o).step_ms;
  o.negatives = "shared";
  const double shared = run_one(o).step_ms;
  if (!o.json) fmt::print("per-sample / shared step time = {:.2f}\n", per_sample / shared);
}

}  // namespace

void add_bench_step(CLI::App& bench) {
  auto o = std::make_shared<StepOptions>();
  auto* cmd = bench.add_subcommand(
      "step",
      "Median time of one whole training step (sample, score, loss, gradient, update) and floor_ms, the "
      "time of reading the same B x (K+1) random bank rows with one dot product each, timed alternately in the "
      "same run; step / floor is the median of the ratios of each step to the floor pass right after it.");
  cmd->add_option("--n", o->n, "bank size N (instances)")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--dim", o->dim, "embedding dimension D")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--k", o->k, "noise draws per query K")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--batch", o->batch, "queries per step B")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: the OpenMP default)")->capture_default_str()->check(thread_count());
  cmd->add_option("--negatives", o->negatives,
                  "per-sample (each query its own K), shared (one K per step), or both (one after the other "
                  "in this run, with their ratio)")
      ->capture_default_str()
      ->check(one_of({"per-sample", "shared", "both"}));
  cmd->add_option("--sampler", o->sampler, "noise distribution: uniform, or alias over random weights")
      ->capture_default_str()
      ->check(one_of({"uniform", "alias"}));
  cmd->add_option("--objective", o->objective,
                  "nce, infonce, dcl, hcl, dhel, kcl, supcon, contrastive, triplet (the supervised three over ten "
                  "classes, instance j in class j mod 10), full (exact softmax over the bank), or all (every one "
                  "but full in turn, each against its own floor, with a summary table)")
      ->capture_default_str()
      ->check(one_of({"nce", "infonce", "dcl", "hcl", "dhel", "kcl", "supcon", "contrastive", "triplet", "full", "all"}));
  cmd->add_option("--dtype", o->dtype,
                  "storage type of the bank's rows: float32, float16 or bfloat16; or a comma-separated list "
                  "(e.g. float32,float16,bfloat16): one bank of each, all in memory at once, timed round by round, "
                  "with each type's step and floor against the first type's")
      ->capture_default_str();
  cmd->add_option("--overlap-ms", o->overlap_ms,
                  "also time steps after this many ms of simulated caller compute (a sleep), alternately without and "
                  "with Engine::prefetch of the step's ids before it: how much leaves the critical path (off: -1)")
      ->capture_default_str();
  cmd->add_option("--repeats", o->repeats, "timed steps (and floor passes)")->capture_default_str()->check(
      integer_in(1, INT_MAX));
  cmd->add_option("--seed", o->seed, "seed of the bank, the inputs and the negatives")->capture_default_str()->check(seed_value());
  cmd->add_flag("--json", o->json, "print one JSON object instead of text");
  cmd->callback(command([o] { run_bench_step(*o); }));
}

}  // namespace membank::tools
