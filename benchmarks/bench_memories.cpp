// `membank bench queue` and `membank bench multiview`: the other memories against their own
// ceilings, measured in the same run, interleaved repeat by repeat (the machine is shared and noisy:
// only ratios of times taken side by side mean anything).
//
//   queue      a Queue step (B queries against Q keys, the objective, the enqueue) against the two
//              GEMMs of the same size it cannot avoid: scores B x D x Q and dL/dq = coefficients x
//              keys, B x Q x D. Timed two ways: in the queue's own blocks of 16 queries, and as one
//              product per thread's share of the rows (the best blocking for the GEMM alone).
//   multiview  a V-view MultiViewEngine step (CMC, the full graph: V (V - 1) pairs) against the
//              single-view Engine step of the same sizes. Each pair costs one single-view step's
//              gather and objective, so V = 2 costs about 2x (the draws are shared once).
#include "bench_common.hpp"
#include "commands.hpp"
#include "machine_info.hpp"
#include "options.hpp"

#include <membank/isa.hpp>
#include <membank/multiview.hpp>
#include <membank/queue.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

namespace membank::tools {

namespace {

struct QueueBenchOptions {
  index_t batch = 256, capacity = 65536, dim = 128;
  std::string objective = "infonce";
  std::string dtype = "float32";
  int repeats = 15, threads = 0;
  bool json = false;
};

/// The queue step's two products, in the queue's blocks of `block` queries (parallel over blocks),
/// or with block = 0 one product per thread over its contiguous share of the rows. Returns a checksum.
double gemm_pair(const RowMatrixf& q, const RowMatrixf& keys, RowMatrixf& s, RowMatrixf& g, index_t block) {
  const kernels::Table& kt = kernels::table();
  const index_t b = q.rows(), m = keys.rows(), d = keys.cols();
  double sink = 0.0;
#pragma omp parallel reduction(+ : sink)
  {
    const auto run = [&](index_t r0, index_t rows) {
      if (rows <= 0) return;
      kt.gemm_abt(rows, m, d, 1.0f, q.row(r0).data(), d, keys.data(), d, s.row(r0).data(), m);
      g.middleRows(r0, rows).setZero();
      kt.gemm_ab_acc(rows, d, m, s.row(r0).data(), m, keys.data(), d, g.row(r0).data(), d);
      sink += g(r0, 0);
    };
    if (block > 0) {
      const index_t blocks = (b + block - 1) / block;
#pragma omp for schedule(dynamic, 1)
      for (index_t k = 0; k < blocks; ++k) run(k * block, std::min(block, b - k * block));
    } else {
      const index_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const index_t r0 = b * t / nt, r1 = b * (t + 1) / nt;
      run(r0, r1 - r0);
    }
  }
  return sink;
}

void run_bench_queue(const QueueBenchOptions& o) {
  apply_threads(o.threads);
  EngineConfig cfg;
  cfg.objective = objective_from_string(o.objective);
  cfg.seed = 1;
  Queue queue(o.capacity, o.dim, cfg, dtype_from_string(o.dtype));
  std::mt19937_64 rng(2);
  const RowMatrixf keys = queue.keys().to_matrix();
  RowMatrixf s(o.batch, o.capacity), g(o.batch, o.dim), grad(o.batch, o.dim);
  std::vector<double> step_ms, blocked_ms, whole_ms;
  double sink = 0.0;
  for (int r = 0; r < o.repeats + 1; ++r) {  // the first round warms up and is dropped
    const RowMatrixf q = random_unit_rows(o.batch, o.dim, rng);
    RowMatrixf k = q + 0.3f * random_unit_rows(o.batch, o.dim, rng);
    k.rowwise().normalize();
    double t0 = now_ms();
    const StepStats st = queue.step(q, k, grad);
    const double t_step = now_ms() - t0;
    sink += st.loss;
    t0 = now_ms();
    sink += gemm_pair(q, keys, s, g, 16);
    const double t_blocked = now_ms() - t0;
    t0 = now_ms();
    sink += gemm_pair(q, keys, s, g, 0);
    const double t_whole = now_ms() - t0;
    if (r == 0) continue;
    step_ms.push_back(t_step);
    blocked_ms.push_back(t_blocked);
    whole_ms.push_back(t_whole);
  }
  const double step = median(step_ms), blocked = median(blocked_ms), whole = median(whole_ms);
  const double gemm = std::min(blocked, whole);
  const double flops = 4.0 * static_cast<double>(o.batch) * static_cast<double>(o.capacity) * static_cast<double>(o.dim);
  const nlohmann::json row = {{"bench", "queue"}, {"batch", o.batch}, {"capacity", o.capacity}, {"dim", o.dim},
                              {"objective", o.objective}, {"dtype", o.dtype}, {"threads", omp_get_max_threads()},
                              {"repeats", o.repeats}, {"step_ms", step}, {"gemm_blocked_ms", blocked},
                              {"gemm_whole_ms", whole}, {"step_vs_gemm", step / gemm},
                              {"gemm_gflops", flops / gemm * 1e-6}, {"finite", std::isfinite(sink)},
                              {"cpu", cpu_model()}, {"git", git_revision()}, {"isa", to_string(active_isa())}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return;
  }
  fmt::print("membank bench queue: B = {} queries, Q = {} keys ({}), D = {}, {}, {} threads, {} kernels, median of {} "
             "interleaved repeats\n", o.batch, o.capacity, o.dtype, o.dim, o.objective, omp_get_max_threads(),
             to_string(active_isa()), o.repeats);
  fmt::print("  queue step                    {:8.2f} ms\n", step);
  fmt::print("  its two GEMMs, blocks of 16   {:8.2f} ms\n", blocked);
  fmt::print("  its two GEMMs, one per thread {:8.2f} ms  ({:.1f} GFLOP/s)\n", whole, flops / whole * 1e-6);
  fmt::print("  step / the faster GEMMs = {:.3f}\n", step / gemm);
}

struct MultiviewBenchOptions {
  index_t n = 1281167, dim = 128, k = 4096, batch = 256, views = 2;
  std::string objective = "nce", negatives = "per-sample", graph = "full";
  int repeats = 11, threads = 0;
  bool json = false;
};

void run_bench_multiview(const MultiviewBenchOptions& o) {
  apply_threads(o.threads);
  EngineConfig cfg;
  cfg.k = o.k;
  cfg.objective = objective_from_string(o.objective);
  cfg.negatives = negatives_mode_from_string(o.negatives);
  cfg.seed = 1;
  MEMBANK_CHECK(!needs_labels(cfg.objective), "--objective {}: expected an objective without labels",
                o.objective);
  Engine single(Bank(o.n, o.dim, 1), std::make_unique<UniformSampler>(o.n), cfg);
  std::vector<Bank> banks;
  for (index_t v = 0; v < o.views; ++v) banks.emplace_back(o.n, o.dim, 1 + static_cast<std::uint64_t>(v));
  MultiViewEngine multi(std::move(banks), std::make_unique<UniformSampler>(o.n), cfg, view_graph_from_string(o.graph));
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<index_t> any(0, o.n - 1);
  std::vector<double> single_ms, multi_ms;
  double sink = 0.0;
  RowMatrixf grad(o.batch, o.dim);
  std::vector<RowMatrixf> grads(static_cast<std::size_t>(o.views), RowMatrixf(o.batch, o.dim));
  for (int r = 0; r < o.repeats + 1; ++r) {
    std::vector<index_t> ids(static_cast<std::size_t>(o.batch));
    for (auto& id : ids) id = any(rng);
    std::vector<RowMatrixf> f;
    for (index_t v = 0; v < o.views; ++v) f.push_back(random_unit_rows(o.batch, o.dim, rng));
    std::vector<FeaturesRef> fr(f.begin(), f.end());
    std::vector<GradRef> gr(grads.begin(), grads.end());
    double t0 = now_ms();
    sink += single.step(f[0], ids, grad).loss;
    const double t_single = now_ms() - t0;
    t0 = now_ms();
    sink += multi.step(fr, ids, gr).loss;
    const double t_multi = now_ms() - t0;
    if (r == 0) continue;
    single_ms.push_back(t_single);
    multi_ms.push_back(t_multi);
  }
  const double one = median(single_ms), many = median(multi_ms);
  const auto pairs = static_cast<index_t>(multi.pairs().size());
  const nlohmann::json row = {{"bench", "multiview"}, {"n", o.n}, {"dim", o.dim}, {"k", o.k}, {"batch", o.batch},
                              {"views", o.views}, {"graph", o.graph}, {"pairs", pairs}, {"objective", o.objective},
                              {"negatives", o.negatives}, {"threads", omp_get_max_threads()}, {"repeats", o.repeats},
                              {"single_ms", one}, {"multiview_ms", many}, {"ratio", many / one},
                              {"finite", std::isfinite(sink)}, {"cpu", cpu_model()}, {"git", git_revision()},
                              {"isa", to_string(active_isa())}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return;
  }
  fmt::print("membank bench multiview: N = {}, D = {}, K = {}, B = {}, {} {}, V = {} ({} graph, {} pairs), {} threads, "
             "median of {} interleaved repeats\n", o.n, o.dim, o.k, o.batch, o.objective, o.negatives, o.views, o.graph,
             pairs, omp_get_max_threads(), o.repeats);
  fmt::print("  single-view step  {:8.2f} ms\n", one);
  fmt::print("  multi-view step   {:8.2f} ms\n", many);
  fmt::print("  multi-view / single-view = {:.3f} ({:.3f} per pair)\n", many / one, many / one / static_cast<double>(pairs));
}

}  // namespace

void add_bench_memories(CLI::App& bench) {
  {
    auto o = std::make_shared<QueueBenchOptions>();
    auto* cmd = bench.add_subcommand("queue", "A queue step (MoCo) against the same-size GEMMs, interleaved in one run");
    cmd->add_option("--batch", o->batch, "queries B")->capture_default_str()->check(integer_in(1));
    cmd->add_option("--capacity", o->capacity, "keys in the queue Q")->capture_default_str()->check(integer_in(1));
    cmd->add_option("--dim", o->dim, "dimension D")->capture_default_str()->check(integer_in(1, 65536));
    cmd->add_option("--objective", o->objective, "any objective but nce and full (infonce is MoCo's)")
        ->capture_default_str();
    cmd->add_option("--dtype", o->dtype, "the keys' storage: float32, float16 or bfloat16")->capture_default_str();
    cmd->add_option("--repeats", o->repeats, "timed repeats (after one warm-up)")->capture_default_str()->check(
        integer_in(1));
    cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str()->check(thread_count());
    cmd->add_flag("--json", o->json, "print one JSON object");
    cmd->callback(command([o] { run_bench_queue(*o); }));
  }
  {
    auto o = std::make_shared<MultiviewBenchOptions>();
    auto* cmd = bench.add_subcommand(
        "multiview", "A multi-view (CMC) step against the single-view step of the same sizes, interleaved in one run");
    cmd->add_option("--n", o->n, "instances N (each view's bank)")->capture_default_str()->check(integer_in(2));
    cmd->add_option("--dim", o->dim, "dimension D")->capture_default_str()->check(integer_in(1, 65536));
    cmd->add_option("--k", o->k, "negatives K per query")->capture_default_str()->check(integer_in(1));
    cmd->add_option("--batch", o->batch, "queries B")->capture_default_str()->check(integer_in(1));
    cmd->add_option("--views", o->views, "views V (one bank each)")->capture_default_str()->check(integer_in(2, 16));
    cmd->add_option("--graph", o->graph, "full (every ordered pair) or core (view 0 against the others)")
        ->capture_default_str();
    cmd->add_option("--objective", o->objective, "an objective without labels")->capture_default_str();
    cmd->add_option("--negatives", o->negatives, "per-sample or shared")->capture_default_str();
    cmd->add_option("--repeats", o->repeats, "timed repeats (after one warm-up)")->capture_default_str()->check(
        integer_in(1));
    cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str()->check(thread_count());
    cmd->add_flag("--json", o->json, "print one JSON object");
    cmd->callback(command([o] { run_bench_multiview(*o); }));
  }
}

}  // namespace membank::tools
