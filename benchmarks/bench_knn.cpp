// `membank bench knn`: weighted-kNN evaluation time (Q queries over an N-row bank) and its rate
// against the machine's matrix-product rate, measured in the same run on GEMMs of the same total
// size (2 Q N D flops, in 1024 x D x 4096 blocks, one per thread at a time).
#include "commands.hpp"
#include "options.hpp"
#include "machine_info.hpp"

#include <membank/isa.hpp>
#include <membank/knn.hpp>

#include "kernels/kernels.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <chrono>
#include <random>

namespace membank::tools {

namespace {

struct KnnBenchOptions {
  index_t n = 60000, q = 10000, dim = 128, k = 200;
  int threads = 0;
  bool json = false;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void run_bench_knn(const KnnBenchOptions& o) {
  apply_threads(o.threads);
  const Bank bank(o.n, o.dim, 1);
  const Bank queries_bank(o.q, o.dim, 2);
  const RowMatrixf queries = queries_bank.to_matrix();
  std::vector<int> bl(static_cast<std::size_t>(o.n)), ql(static_cast<std::size_t>(o.q));
  std::mt19937 rng(3);
  for (auto& l : bl) l = static_cast<int>(rng() % 10);
  for (auto& l : ql) l = static_cast<int>(rng() % 10);

  double t0 = now_s();
  const KnnResult r = knn_evaluate(bank.view(), bl, queries, ql, KnnOptions{.k = o.k, .sigma = 0.07});
  const double knn_s = now_s() - t0;

  // The ceiling: the same flops as plain GEMM blocks, no top-k, through the engine's dispatched GEMM
  // (the instruction set kNN itself uses).
  const kernels::Table& kt = kernels::table();
  const index_t qb = 1024, nb = 4096;
  const index_t qblocks = (o.q + qb - 1) / qb, nblocks = (o.n + nb - 1) / nb;
  const RowMatrixf v = bank.to_matrix();
  double sink = 0.0;
  t0 = now_s();
#pragma omp parallel reduction(+ : sink)
  {
    RowMatrixf s(qb, nb);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (index_t a = 0; a < qblocks; ++a)
      for (index_t b = 0; b < nblocks; ++b) {
        const index_t rows = std::min(qb, o.q - a * qb), cols = std::min(nb, o.n - b * nb);
        kt.gemm_abt(rows, cols, o.dim, 1.0f, queries.row(a * qb).data(), o.dim, v.row(b * nb).data(), o.dim, s.data(),
                    nb);
        sink += s(0, 0);
      }
  }
  const double gemm_s = now_s() - t0;
  const double flops = 2.0 * static_cast<double>(o.q) * static_cast<double>(o.n) * static_cast<double>(o.dim);
  nlohmann::json row = {{"bench", "knn"}, {"n", o.n}, {"queries", o.q}, {"dim", o.dim}, {"k", o.k},
                        {"threads", omp_get_max_threads()}, {"knn_s", knn_s}, {"gemm_s", gemm_s},
                        {"knn_gflops", flops / knn_s * 1e-9}, {"gemm_gflops", flops / gemm_s * 1e-9},
                        {"rate_vs_gemm", gemm_s / knn_s}, {"cpu", cpu_model()}, {"git", git_revision()},
                        {"finite", std::isfinite(sink) && r.top1 >= 0.0}, {"isa", to_string(active_isa())}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return;
  }
  fmt::print("membank bench knn: {} queries x {} rows x {} dims, k = {}, {} threads, {} kernels\n", o.q, o.n, o.dim,
             o.k, omp_get_max_threads(), to_string(active_isa()));
  fmt::print("  kNN  {:7.3f} s  ({:.1f} GFLOP/s of its score products)\n", knn_s, flops / knn_s * 1e-9);
  fmt::print("  GEMM {:7.3f} s  ({:.1f} GFLOP/s, same flops, no top-k)\n", gemm_s, flops / gemm_s * 1e-9);
  fmt::print("  kNN rate / GEMM rate = {:.2f}\n", gemm_s / knn_s);
}

}  // namespace

void add_bench_knn(CLI::App& bench) {
  auto o = std::make_shared<KnnBenchOptions>();
  auto* cmd = bench.add_subcommand("knn", "Weighted-kNN evaluation time against plain GEMM of the same size, same run");
  cmd->add_option("--n", o->n, "bank rows")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--queries", o->q, "queries")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--dim", o->dim, "dimension")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--k", o->k, "neighbours")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str()->check(thread_count());
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback(command([o] { run_bench_knn(*o); }));
}

}  // namespace membank::tools
