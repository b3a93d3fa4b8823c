// `membank bench step`: the median time of one whole training step (sample, score, loss, gradient,
// bank update) against `floor_ms`, the time of the work no implementation can avoid -- reading the
// same B x (K + 1) random bank rows and taking one dot product with each -- measured in the same run.
// With --distributed (under mpirun): the DistributedEngine's step at R ranks, each passing its slice of
// the same global batch: the step time (max over ranks), bytes sent and peak memory per rank.
#include "bench_common.hpp"
#include "commands.hpp"
#include "distributed_cli.hpp"
#include "options.hpp"
#include "machine_info.hpp"

#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/isa.hpp>

#include "kernels/kernels.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <optional>
#include <random>
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
  index_t clusters = 1024;  ///< --sampler cluster: C
  index_t ring_upper = 4096;  ///< --sampler ring: ranks [1, ring_upper)
  std::string drive = "none";  ///< --sampler dynamic: none, or loss_ema (the engine re-weights after each step)
  std::string objective = "nce";
  std::string dtype = "float32";  ///< one type, or a comma-separated list measured in one run
  int repeats = 15;
  double overlap_ms = -1.0;  ///< >= 0: also time steps after this much simulated caller compute, with and without prefetch
  std::uint64_t seed = 1;
  bool json = false;
  std::string distributed;  ///< "", replicated or sharded
  double check_max_gb = 1.0;  ///< --distributed: the single-process self-check runs up to this bank size
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
StepSetup setup_of(const StepOptions& o, const std::string& dtype, const std::string& sampler) {
  StepSetup setup;
  setup.n = o.n;
  setup.dim = o.dim;
  setup.k = o.k;
  setup.batch = o.batch;
  setup.negatives = negatives_mode_from_string(o.negatives);
  setup.sampler = sampler_kind_from_string(sampler);
  setup.clusters = o.clusters;
  setup.ring_upper = o.ring_upper;
  setup.loss_ema = dynamic_drive_from_string(o.drive) == DynamicSampler::Drive::loss_ema;
  MEMBANK_CHECK(!setup.loss_ema || setup.sampler == SamplerKind::dynamic, "--drive {}: expected --sampler dynamic",
                o.drive);
  setup.objective = objective_from_string(o.objective);
  setup.dtype = dtype_from_string(dtype);
  setup.seed = o.seed;
  if (!o.json)
    fmt::print(stderr, "building a {} x {} {} bank ({:.2f} GB) ...\n", o.n, o.dim, dtype,
               static_cast<double>(o.n) * static_cast<double>(o.dim) * dtype_bytes(setup.dtype) * 1e-9);
  return setup;
}

/// The exact softmax's two matrix products alone, without the exponentials: S = F V^T and
/// Acc += S V over the bank in tiles of 4,096 rows, a tile per thread at a time (each thread its own
/// Acc), 4 B N D flops through the engine's dispatched GEMMs. Milliseconds of one pass.
double time_softmax_products(const BankView& bank, index_t batch, double* checksum) {
  constexpr index_t kRows = 4096;
  const index_t n = bank.rows, dim = bank.dim;
  RowMatrixf f = RowMatrixf::Random(batch, dim);
  const kernels::Table& kt = kernels::table();
  double sink = 0.0;
  const double t0 = now_ms();
#pragma omp parallel reduction(+ : sink)
  {
    RowMatrixf s(batch, kRows);
    RowMatrixf acc = RowMatrixf::Zero(batch, dim);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n; t += kRows) {
      const index_t rows = std::min(kRows, n - t);
      kt.gemm_abt(batch, rows, dim, 1.0f, f.data(), dim, bank.row(t), bank.stride, s.data(), kRows);
      kt.gemm_ab_acc(batch, dim, rows, s.data(), kRows, bank.row(t), bank.stride, acc.data(), dim);
    }
    sink += static_cast<double>(acc(0, 0));
  }
  const double ms = now_ms() - t0;
  *checksum += sink;
  return ms;
}

StepFigures run_one(const StepOptions& o) {
  const int threads = omp_get_max_threads();
  const StepSetup setup = setup_of(o, o.dtype, o.sampler);
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
      {"clusters", setup.sampler == SamplerKind::cluster ? nlohmann::json(o.clusters) : nlohmann::json(nullptr)},
      {"cluster_fit_ms", bench.cluster_fit_ms},
      {"drive", o.drive},
      {"repeats", o.repeats},     {"cpu", cpu_model()},
      {"build", MEMBANK_BUILD_TYPE}, {"version", MEMBANK_VERSION_STRING},
      {"git", git_revision()},    {"checksum", std::isfinite(checksum)},
      {"isa", to_string(active_isa())}};
  if (bench.has_draw_table()) {  // what the table lines of its draws add to a gather (time_table_lines)
    std::vector<double> plain, lines;
    for (int r = 0; r < o.repeats; ++r) {
      const auto [p, l] = bench.time_table_lines(&checksum);
      plain.push_back(p);
      lines.push_back(l);
    }
    row["table_lines_factor"] = paired_ratio(lines, plain);
  }
  if (setup.sampler == SamplerKind::dynamic) {
    // The cost of changing weights: a batch's worth of rows per call (what the loss_ema drive sets
    // after each step), and a single row.
    row["weight_update_batch_ms"] = bench.time_weight_updates(o.repeats, o.batch);
    row["weight_update_one_row_ms"] = bench.time_weight_updates(o.repeats, 1);
  }
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
  if (o.objective == "full" && setup.dtype == DType::float32) {
    // The rate of the exact softmax against its two products alone, timed right after its steps.
    std::vector<double> products;
    for (int r = 0; r < o.repeats; ++r) products.push_back(time_softmax_products(bench.engine().bank().view(), o.batch, &checksum));
    const double flops = 4.0 * static_cast<double>(o.batch) * static_cast<double>(o.n) * static_cast<double>(o.dim);
    row["products_ms"] = median(products);
    row["full_softmax_gflops"] = flops / (step_med * 1e6);
    row["products_gflops"] = flops / (median(products) * 1e6);
    row["rate_vs_products"] = median(products) / step_med;
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
  if (row.contains("table_lines_factor"))
    fmt::print("  a draw's table line ({:.1f} MB, a random line each, what an exact draw of the {} sampler reads): a "
               "gather of the rows x {:.2f} with them (one loop, without and with the lines, alternated)\n",
               1e-6 * static_cast<double>(bench.draw_table_size()), o.sampler,
               row["table_lines_factor"].get<double>());
  if (row.contains("products_ms"))
    fmt::print("  exact softmax {:.1f} GFLOP/s (4 B N D flops a step); its two matrix products alone {:.2f} ms, "
               "{:.1f} GFLOP/s: step rate / product rate = {:.2f}\n", row["full_softmax_gflops"].get<double>(),
               row["products_ms"].get<double>(), row["products_gflops"].get<double>(),
               row["rate_vs_products"].get<double>());
  if (alias_build_ms > 0) fmt::print("  {} table built in {:.1f} ms\n", o.sampler, alias_build_ms);
  if (bench.cluster_fit_ms > 0)
    fmt::print("  {} clusters fitted in {:.1f} s (one Lloyd step and the assignment: 2 N C D multiply-adds each)\n",
               std::min(o.clusters, o.n), bench.cluster_fit_ms * 1e-3);
  if (setup.sampler == SamplerKind::dynamic)
    fmt::print("  set_sampler_weights: {:.3f} ms for {} rows, {:.3f} ms for one row (drive {})\n",
               row["weight_update_batch_ms"].get<double>(), o.batch, row["weight_update_one_row_ms"].get<double>(),
               o.drive);
  if (o.overlap_ms >= 0) {
    const double p = row["step_after_overlap_ms"].get<double>(), a = row["step_after_overlap_prefetched_ms"].get<double>();
    fmt::print("  after {:.1f} ms of caller compute: step {:.2f} ms; with the ids announced first (prefetch) {:.2f} ms: "
               "{:.2f} ms ({:.0f}% of the floor) off the critical path\n", o.overlap_ms, p, a, p - a,
               100.0 * (p - a) / floor_med);
  }
  return {step_med, floor_med, ratio};
}

/// One configuration of a round-robin run: a storage type and a sampler.
struct Variant {
  std::string dtype, sampler;
};

/// Several storage types, or several samplers, in one run: one engine each, all alive at once, timed
/// round by round (each round: every variant's floor pass, then its step), so that every variant
/// sees the same background load. Prints each variant's figures (one JSON object each with --json)
/// and, against the first variant, the paired ratios of the steps and of the floors.
void run_round_robin(const StepOptions& o, const std::vector<Variant>& variants, bool by_sampler) {
  const int threads = omp_get_max_threads();
  const auto label = [&](const Variant& v) { return by_sampler ? v.sampler : v.dtype; };
  std::vector<std::unique_ptr<StepBench>> benches;
  for (const auto& v : variants)
    benches.push_back(std::make_unique<StepBench>(setup_of(o, v.dtype, v.sampler), o.repeats));
  double checksum = 0.0;
  for (auto& b : benches) b->begin(&checksum);
  std::vector<std::vector<double>> step_ms(variants.size()), floor_ms(variants.size());
  std::vector<std::vector<double>> plain_ms(variants.size()), lines_ms(variants.size());  // time_table_lines
  for (int r = 1; r < o.repeats; ++r)
    for (std::size_t t = 0; t < variants.size(); ++t) {
      floor_ms[t].push_back(benches[t]->floor_once(&checksum));
      if (benches[t]->has_draw_table()) {
        const auto [plain, lines] = benches[t]->time_table_lines(&checksum);
        plain_ms[t].push_back(plain);
        lines_ms[t].push_back(lines);
      }
      step_ms[t].push_back(benches[t]->step_once());
    }
  if (!o.json)
    fmt::print("membank bench step: N = {}, D = {}, K = {}, B = {}, {} negatives, {} sampler, {}, {}, {} threads, "
               "{} kernels, {} rounds\n", o.n, o.dim, o.k, o.batch, o.negatives, o.sampler, o.dtype, o.objective,
               threads, to_string(active_isa()), o.repeats - 1);
  const std::string first = label(variants.front());
  for (std::size_t t = 0; t < variants.size(); ++t) {
    const double step_med = median(step_ms[t]), floor_med = median(floor_ms[t]);
    const double ratio = paired_ratio(step_ms[t], floor_ms[t]);
    const double step_vs = paired_ratio(step_ms[t], step_ms[0]), floor_vs = paired_ratio(floor_ms[t], floor_ms[0]);
    nlohmann::json row = {{"bench", "step"}, {"n", o.n}, {"dim", o.dim}, {"k", o.k}, {"batch", o.batch},
                          {"threads", threads}, {"negatives", o.negatives}, {"sampler", variants[t].sampler},
                          {"objective", o.objective}, {"dtype", variants[t].dtype}, {"step_ms", step_med},
                          {"floor_ms", floor_med}, {"step_over_floor", ratio},
                          {"step_vs_" + first, step_vs}, {"floor_vs_" + first, floor_vs},
                          {"rounds", o.repeats - 1}, {"cpu", cpu_model()}, {"build", MEMBANK_BUILD_TYPE},
                          {"version", MEMBANK_VERSION_STRING}, {"git", git_revision()},
                          {"checksum", std::isfinite(checksum)}, {"isa", to_string(active_isa())}};
    if (!lines_ms[t].empty()) row["table_lines_factor"] = paired_ratio(lines_ms[t], plain_ms[t]);
    if (o.json) {
      fmt::print("{}\n", row.dump());
      continue;
    }
    fmt::print("  {:9} step {:7.2f} ms  floor {:7.2f} ms  step / floor {:5.2f}   against {}: step {:5.2f}, "
               "floor {:5.2f}\n", label(variants[t]), step_med, floor_med, ratio, first, step_vs, floor_vs);
    if (row.contains("table_lines_factor"))
      fmt::print("  {:9} its draws' table lines ({:.1f} MB): a gather x {:.2f} with them\n", "",
                 1e-6 * static_cast<double>(benches[t]->draw_table_size()),
                 row["table_lines_factor"].get<double>());
  }
  if (!o.json)
    fmt::print("  (medians over the rounds; ratios are medians of the per-round ratios. Table lines: an exact "
               "draw of\n  the sampler reads a random line of a table of its size; one gather loop over the rows, "
               "timed without\n  and with a line a draw)\n");
}

#ifdef MEMBANK_WITH_MPI
/// Per-rank figures gathered on rank 0.
struct RankFigures {
  double bytes_sent = 0, collectives = 0, peak_rss = 0, bank_bytes = 0, row_begin = 0, row_end = 0, batch = 0;
};

/// --distributed: the DistributedEngine's step under mpirun. Every rank makes the same global batches
/// (ids uniform over N, unit Gaussian features, from --seed) and passes its slice (batch_slice). The
/// first step is checked against the single-process Engine's step on the whole batch (on rank 0, when
/// the bank is at most --check-max-gb): loss and dL/df within 1e-6 relative. Then a warm-up step and
/// --repeats timed steps, each started together (MPI_Barrier) and timed per rank; a step's time is the
/// slowest rank's.
void run_distributed(const StepOptions& o) {
  run_with_mpi([&](int rank, int ranks) {
    const MPI_Comm world = MPI_COMM_WORLD;
    const bool root = rank == 0;
    const Distributed mode = distributed_from_string(o.distributed);
    const DType dtype = dtype_from_string(o.dtype);
    EngineConfig cfg;
    cfg.k = o.k;
    cfg.negatives = negatives_mode_from_string(o.negatives);
    cfg.objective = objective_from_string(o.objective);
    cfg.seed = o.seed;
    collective([&] {  // (the same on every rank)
      MEMBANK_CHECK(o.sampler != "cluster" && o.sampler != "ring", "--sampler {} with --distributed: not supported "
                    "yet (a DistributedEngine takes uniform, alias or dynamic)", o.sampler);
      MEMBANK_CHECK(o.batch >= ranks, "--batch {} with {} ranks: expected a global batch of at least one query per "
                    "rank", o.batch, ranks);
      MEMBANK_CHECK(o.n >= ranks, "--n {} with {} ranks: expected at least one bank row per rank", o.n, ranks);
      cfg.validate(o.n, o.dim);
    });
    const double full_bank_bytes = static_cast<double>(o.n) * static_cast<double>(o.dim) * dtype_bytes(dtype);
    if (root && !o.json)
      fmt::print(stderr, "building a {} x {} {} bank ({:.2f} GB) {} over {} ranks ...\n", o.n, o.dim, o.dtype,
                 full_bank_bytes * 1e-9, o.distributed, ranks);
    // The sampler and the inputs as StepBench makes them (one generator from --seed: alias weights first).
    std::mt19937_64 rng(o.seed);
    std::uniform_int_distribution<index_t> any_id(0, o.n - 1);
    std::vector<double> weights;
    auto make_sampler = [&]() -> std::unique_ptr<NoiseSampler> {
      const SamplerKind kind = sampler_kind_from_string(o.sampler);
      if (kind == SamplerKind::alias) return std::make_unique<AliasSampler>(weights);
      if (kind == SamplerKind::dynamic) {
        DynamicSampler::Params p;
        p.drive = dynamic_drive_from_string(o.drive);  // loss_ema: refused by DistributedEngine
        return std::make_unique<DynamicSampler>(weights, p);
      }
      return std::make_unique<UniformSampler>(o.n);
    };
    if (sampler_kind_from_string(o.sampler) != SamplerKind::uniform) {
      weights.resize(static_cast<std::size_t>(o.n));
      std::uniform_real_distribution<double> u(0.5, 2.0);
      for (auto& w : weights) w = u(rng);
    }
    std::vector<std::int64_t> labels;
    if (needs_labels(cfg.objective)) {
      labels.resize(static_cast<std::size_t>(o.n));
      for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int64_t>(j % 10);
    }
    const double t_build = now_ms();
    DistributedEngine engine = collective([&] {
      return DistributedEngine::seeded(world, mode, o.n, o.dim, o.seed, dtype, make_sampler(), cfg, labels);
    });
    const double build_ms = now_ms() - t_build;
    const BatchSlice mine = batch_slice(o.batch, ranks, rank);
    const int batches = o.repeats + 2;
    std::vector<std::vector<index_t>> ids;
    std::vector<RowMatrixf> feats;
    RowMatrixf first_features;  // the whole first batch (the self-check's)
    std::vector<index_t> first_ids;
    for (int i = 0; i < batches; ++i) {
      std::vector<index_t> v(static_cast<std::size_t>(o.batch));
      for (auto& y : v) y = any_id(rng);
      RowMatrixf f = random_unit_rows(o.batch, o.dim, rng);
      ids.emplace_back(v.begin() + mine.begin, v.begin() + mine.begin + mine.size);
      feats.emplace_back(f.middleRows(mine.begin, mine.size));
      if (i == 0) {
        first_features = std::move(f);
        first_ids = std::move(v);
      }
    }
    RowMatrixf grad(mine.size, o.dim);

    // The self-check: the first step against the single-process engine on the whole batch (rank 0).
    const bool check = full_bank_bytes <= o.check_max_gb * 1e9 && cfg.objective != Objective::full_softmax;
    std::optional<Engine> reference;
    if (check && root) reference.emplace(Bank(o.n, o.dim, o.seed, dtype), make_sampler(), cfg, labels);
    const StepStats got = collective([&] { return engine.step(feats[0], ids[0], grad); });
    std::vector<int> counts(static_cast<std::size_t>(ranks)), displs(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) {
      const BatchSlice sl = batch_slice(o.batch, ranks, r);
      counts[static_cast<std::size_t>(r)] = static_cast<int>(sl.size * o.dim);
      displs[static_cast<std::size_t>(r)] = static_cast<int>(sl.begin * o.dim);
    }
    RowMatrixf all_grad(root ? o.batch : 0, o.dim);
    if (check)
      MPI_Gatherv(grad.data(), counts[static_cast<std::size_t>(rank)], MPI_FLOAT, all_grad.data(), counts.data(),
                  displs.data(), MPI_FLOAT, 0, world);
    agreed(world, [&] {
      if (!check || !root) return;
      RowMatrixf ref_grad(o.batch, o.dim);
      const StepStats ref = reference->step(first_features, first_ids, ref_grad);
      reference.reset();
      const double dl = std::fabs(got.loss - ref.loss) / std::max(1e-30, std::fabs(ref.loss));
      const double dg = (all_grad - ref_grad).cwiseAbs().maxCoeff() / std::max(1e-30f, ref_grad.cwiseAbs().maxCoeff());
      if (!(dl <= 1e-6 && dg <= 1e-6))
        throw ProblemFound(fmt::format("self-check failed: the distributed step's loss {} against the single-process "
                                       "engine's {} (relative {:.2e}), dL/df relative difference {:.2e}: expected "
                                       "both within 1e-6", got.loss, ref.loss, dl, dg));
    });
    collective([&] { engine.step(feats[1], ids[1], grad); });  // warm-up
    reset_peak_rss();  // (rank 0's reference engine is gone)

    std::vector<double> ms, bytes, collectives;
    for (int i = 2; i < batches; ++i) {
      MPI_Barrier(world);
      const double t0 = now_ms();
      collective([&] { engine.step(feats[static_cast<std::size_t>(i)], ids[static_cast<std::size_t>(i)], grad); });
      ms.push_back(now_ms() - t0);
      bytes.push_back(static_cast<double>(engine.last_wire().bytes_sent));
      collectives.push_back(static_cast<double>(engine.last_wire().collectives));
    }
    std::vector<double> slowest(ms.size()), build_slowest(1);
    MPI_Allreduce(ms.data(), slowest.data(), static_cast<int>(ms.size()), MPI_DOUBLE, MPI_MAX, world);
    MPI_Allreduce(&build_ms, build_slowest.data(), 1, MPI_DOUBLE, MPI_MAX, world);
    const RankFigures f{median(bytes), median(collectives), peak_rss_bytes(),
                        static_cast<double>(engine.rows().size()) * static_cast<double>(o.dim) * dtype_bytes(dtype),
                        static_cast<double>(engine.rows().begin), static_cast<double>(engine.rows().end),
                        static_cast<double>(mine.size)};
    std::vector<RankFigures> per(static_cast<std::size_t>(ranks));
    MPI_Gather(&f, sizeof f / sizeof(double), MPI_DOUBLE, per.data(), sizeof f / sizeof(double), MPI_DOUBLE, 0, world);
    if (!root) return;

    const double step_med = median(slowest);
    auto column = [&](double RankFigures::*m) {
      std::vector<double> v;
      for (const auto& p : per) v.push_back(p.*m);
      return v;
    };
    const int threads = omp_get_max_threads();
    nlohmann::json row = {
        {"bench", "step"}, {"distributed", o.distributed}, {"ranks", ranks}, {"n", o.n}, {"dim", o.dim}, {"k", o.k},
        {"batch", o.batch}, {"batch_per_rank", column(&RankFigures::batch)}, {"threads_per_rank", threads},
        {"negatives", o.negatives}, {"sampler", o.sampler}, {"objective", o.objective}, {"dtype", o.dtype},
        {"step_ms", step_med}, {"step_min_ms", *std::min_element(slowest.begin(), slowest.end())},
        {"step_max_ms", *std::max_element(slowest.begin(), slowest.end())}, {"step_time", "max over ranks"},
        {"repeats", o.repeats}, {"bytes_sent_per_rank", column(&RankFigures::bytes_sent)},
        {"collectives_per_step", column(&RankFigures::collectives)},
        {"peak_rss_bytes_per_rank", column(&RankFigures::peak_rss)},
        {"bank_bytes_per_rank", column(&RankFigures::bank_bytes)}, {"bank_bytes", full_bank_bytes},
        {"bank_build_ms", build_slowest[0]},
        {"self_check", check ? "passed: loss and dL/df within 1e-6 of the single-process engine"
                             : "skipped (full softmax, or the bank is over --check-max-gb)"},
        {"cpu", cpu_model()}, {"build", MEMBANK_BUILD_TYPE}, {"version", MEMBANK_VERSION_STRING},
        {"git", git_revision()}, {"isa", to_string(active_isa())}};
    if (o.json) {
      fmt::print("{}\n", row.dump());
      return;
    }
    fmt::print("membank bench step --distributed {}: {} ranks, N = {}, D = {}, K = {}, B = {} (global), {} rows, {} "
               "negatives, {} sampler, {}, {} threads per rank, {} kernels\n", o.distributed, ranks, o.n, o.dim, o.k,
               o.batch, o.dtype, o.negatives, o.sampler, o.objective, threads, to_string(active_isa()));
    fmt::print("  self-check: {}\n", row["self_check"].get<std::string>());
    fmt::print("  step   median {:8.2f} ms   (min {:.2f}, max {:.2f}, {} steps; each step's time is the slowest "
               "rank's)\n", step_med, row["step_min_ms"].get<double>(), row["step_max_ms"].get<double>(), o.repeats);
    for (int r = 0; r < ranks; ++r) {
      const RankFigures& p = per[static_cast<std::size_t>(r)];
      fmt::print("  rank {}: rows [{:.0f}, {:.0f}), {:.0f} queries; bank {:.1f} MB, peak RSS {:.1f} MB; sent {:.1f} kB "
                 "per step in {:.0f} collectives\n", r, p.row_begin, p.row_end, p.batch, p.bank_bytes * 1e-6,
                 p.peak_rss * 1e-6, p.bytes_sent * 1e-3, p.collectives);
    }
  });
}
#endif

void run_bench_step(StepOptions o) {
  apply_threads(o.threads);
  if (!o.distributed.empty()) {
    MEMBANK_CHECK(kBuiltWithMpi, "--distributed: {}", no_mpi_message());
    MEMBANK_CHECK(o.objective != "all" && o.negatives != "both" && o.dtype.find(',') == std::string::npos &&
                      o.sampler.find(',') == std::string::npos && o.overlap_ms < 0,
                  "--distributed: expected one --objective (not all), one --negatives (not both), one --dtype, one "
                  "--sampler and no --overlap-ms");
    o.dtype = to_string(dtype_from_string(o.dtype));
#ifdef MEMBANK_WITH_MPI
    run_distributed(o);
#endif
    return;
  }
  const auto split = [](const std::string& list) {
    std::vector<std::string> items;
    for (std::size_t at = 0; at <= list.size();) {
      const std::size_t end = std::min(list.find(',', at), list.size());
      items.push_back(list.substr(at, end - at));
      at = end + 1;
    }
    return items;
  };
  const bool dtypes = o.dtype.find(',') != std::string::npos, samplers = o.sampler.find(',') != std::string::npos;
  if (dtypes || samplers) {
    MEMBANK_CHECK(!(dtypes && samplers), "--dtype {} with --sampler {}: expected a list in one of them, not both",
                  o.dtype, o.sampler);
    const char* option = dtypes ? "--dtype" : "--sampler";
    MEMBANK_CHECK(o.objective != "all" && o.negatives != "both" && o.overlap_ms < 0, "{} with a list: expected one "
                  "--objective (not all), one --negatives (not both) and no --overlap-ms", option);
    MEMBANK_CHECK(o.repeats >= 2, "{} with a list: expected --repeats >= 2 (the first step is the check)", option);
    MEMBANK_CHECK(!samplers || o.drive == "none", "--sampler with a list: expected --drive none (got {})", o.drive);
    std::vector<Variant> variants;
    if (dtypes)
      for (const auto& t : split(o.dtype)) variants.push_back({to_string(dtype_from_string(t)), o.sampler});
    else
      for (const auto& name : split(o.sampler)) variants.push_back({to_string(dtype_from_string(o.dtype)), name});
    run_round_robin(o, variants, samplers);
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
      "same run; step / floor is the median of the ratios of each step to the floor pass right after it. For the "
      "alias, dynamic and cluster samplers, whose exact draws each read a random line of a table (16, 32 and 4 "
      "bytes a row), also what those lines add to a gather of the rows: one loop timed without and with them.");
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
  cmd->add_option("--sampler", o->sampler,
                  "noise distribution: uniform, alias or dynamic over random weights, cluster (the query-dependent "
                  "proposal over --clusters k-means clusters of the bank), or ring (biased: each query's draws uniform "
                  "over its score ranks [1, --ring-upper), weighed as uniform draws); or a comma-separated list (e.g. "
                  "uniform,cluster): one engine of each, all in memory at once, timed round by round, with each "
                  "sampler's step and floor against the first's")
      ->capture_default_str()
      ->check(list_of(one_of({"uniform", "alias", "dynamic", "cluster", "ring"}), "sampler names"));
  cmd->add_option("--clusters", o->clusters, "--sampler cluster: C")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--ring-upper", o->ring_upper, "--sampler ring: one past the ring's last rank (capped at N)")
      ->capture_default_str()
      ->check(integer_in(2));
  cmd->add_option("--drive", o->drive,
                  "--sampler dynamic: none, or loss_ema (the engine re-weights each batch's rows after its step "
                  "from a per-row loss average)")
      ->capture_default_str()
      ->check(one_of({"none", "loss_ema"}));
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
  cmd->add_option("--distributed", o->distributed,
                  "the DistributedEngine's step under mpirun (mpirun -np R membank bench step --distributed sharded): "
                  "the bank replicated on every rank or sharded; --batch is the global batch, split over the ranks, "
                  "the same batches at any R. Prints the step time (median over --repeats of the slowest rank's), "
                  "bytes sent per rank per step, peak RSS and bank bytes per rank; the first step is checked against "
                  "the single-process engine (up to --check-max-gb). No floor. Needs a build with MPI")
      ->check(distributed_mode());
  cmd->add_option("--check-max-gb", o->check_max_gb,
                  "--distributed: largest bank (GB) for which rank 0 checks the first step against a single-process "
                  "engine of its own (it holds the whole bank for the check)")
      ->capture_default_str()
      ->check(number_in(0.0, false));
  cmd->callback(command([o] { run_bench_step(*o); }));
}

}  // namespace membank::tools
