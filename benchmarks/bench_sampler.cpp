// `membank bench sampler`: the noise samplers' costs at one N, measured in one run so that the
// figures are comparable as ratios on a shared machine: table build time (alias, dynamic), draw
// time per id (uniform, alias, dynamic, and a plain sum tree as the design alternative the dynamic
// sampler was measured against), and the dynamic sampler's set_weights cost per call and per changed
// row at several batch sizes (against the sum tree's O(log N) point update), and the cluster
// sampler's conditioning of a batch and its draws.
#include "bench_common.hpp"
#include "commands.hpp"
#include "machine_info.hpp"
#include "options.hpp"

#include <membank/cluster_sampler.hpp>
#include <membank/dynamic_sampler.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <random>

namespace membank::tools {

namespace {

struct SamplerBenchOptions {
  index_t n = 1281167;
  index_t draws = 1 << 20;  ///< per timed pass, in streams of `k`
  index_t k = 4096;
  int repeats = 5;
  std::uint64_t seed = 1;
  bool json = false;
};

/// The alternative design: an implicit binary sum tree over the weights (a draw descends from the root
/// comparing a uniform against left-subtree sums: ~log2 N dependent reads; an update rewrites the
/// leaf's log2 N ancestors). Here only to be timed against the blocked alias.
class SumTree {
 public:
  explicit SumTree(const std::vector<double>& w) {
    while (leaves_ < w.size()) leaves_ *= 2;
    t_.assign(2 * leaves_, 0.0);
    std::copy(w.begin(), w.end(), t_.begin() + static_cast<std::ptrdiff_t>(leaves_));
    for (std::size_t i = leaves_ - 1; i >= 1; --i) t_[i] = t_[2 * i] + t_[2 * i + 1];
  }
  void set(std::size_t j, double w) {
    std::size_t i = leaves_ + j;
    t_[i] = w;
    for (i /= 2; i >= 1; i /= 2) t_[i] = t_[2 * i] + t_[2 * i + 1];
  }
  std::size_t draw(double u) const {  // u uniform in [0, 1)
    double x = u * t_[1];
    std::size_t i = 1;
    while (i < leaves_) {
      const double left = t_[2 * i];
      i = x < left ? 2 * i : (x -= left, 2 * i + 1);
    }
    return i - leaves_;
  }

 private:
  std::size_t leaves_ = 1;
  std::vector<double> t_;
};

/// Nanoseconds per draw of `draws` draws in streams of k (one thread); a query-dependent sampler
/// draws stream r from q(. | f_(r mod B)) of `batch`, B = batch_rows.
double ns_per_draw(const NoiseSampler& s, index_t draws, index_t k, std::int64_t step,
                   const Conditioned* batch = nullptr, index_t batch_rows = 1) {
  std::vector<index_t> ids(static_cast<std::size_t>(k));
  std::vector<float> lp(ids.size());
  const double t0 = now_ms();
  for (index_t r = 0; r < draws / k; ++r) {
    DrawCursor cur{StreamKey{1, step, static_cast<std::uint32_t>(r), 0}, Exclusion{}, k};
    cur.query = QueryRef{batch, r % batch_rows};
    s.draw_next(cur, ids, lp);
  }
  return (now_ms() - t0) * 1e6 / static_cast<double>(draws / k * k);
}

/// A cluster sampler over n rows without a bank: C random unit centroids of dimension `dim` and each
/// row in a random cluster (the draw's memory traffic is that of a fitted one: one random read of
/// the member table a draw).
ClusterSampler random_cluster_sampler(index_t n, index_t c, index_t dim, std::mt19937_64& rng) {
  std::normal_distribution<float> g;
  RowMatrixf centroids(c, dim);
  for (index_t k = 0; k < c; ++k) {
    for (index_t e = 0; e < dim; ++e) centroids(k, e) = g(rng);
    centroids.row(k).normalize();
  }
  std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(c - 1));
  std::vector<std::int32_t> assignment(static_cast<std::size_t>(n));
  for (auto& a : assignment) a = pick(rng);
  ClusterConfig config;
  config.clusters = c;
  return ClusterSampler(config, std::move(centroids), std::move(assignment), 0);
}

void run_bench_sampler(const SamplerBenchOptions& o) {
  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> u(0.5, 2.0);
  std::vector<double> w(static_cast<std::size_t>(o.n));
  for (auto& x : w) x = u(rng);
  std::vector<double> alias_build, dynamic_build, tree_build;
  for (int r = 0; r < o.repeats; ++r) {  // builds alternate: both see the same background load
    double t0 = now_ms();
    AliasSampler a(w);
    alias_build.push_back(now_ms() - t0);
    t0 = now_ms();
    DynamicSampler d(w);
    dynamic_build.push_back(now_ms() - t0);
    t0 = now_ms();
    SumTree t(w);
    tree_build.push_back(now_ms() - t0);
  }
  const UniformSampler uni(o.n);
  const AliasSampler alias(w);
  DynamicSampler dyn(w);
  const SumTree tree(w);
  // The cluster sampler: C = 1024 clusters of D = 128 (the step's reference sizes), conditioned on B
  // = 256 random unit queries; its draws are those of the batch's queries in turn.
  constexpr index_t kClusters = 1024, kDim = 128, kBatch = 256;
  const ClusterSampler cluster = random_cluster_sampler(o.n, std::min(kClusters, o.n), kDim, rng);
  std::vector<float> queries(static_cast<std::size_t>(kBatch * kDim));
  {
    std::normal_distribution<float> g;
    for (auto& x : queries) x = g(rng);
    for (index_t i = 0; i < kBatch; ++i) Eigen::Map<Eigen::VectorXf>(queries.data() + i * kDim, kDim).normalize();
  }
  std::vector<double> d_uni, d_alias, d_dyn, d_tree, d_cluster, cluster_condition;
  std::vector<double> coins(static_cast<std::size_t>(o.draws));
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (auto& c : coins) c = unit(rng);
  std::size_t sink = 0;
  for (int r = 0; r < o.repeats; ++r) {
    d_uni.push_back(ns_per_draw(uni, o.draws, o.k, r));
    d_alias.push_back(ns_per_draw(alias, o.draws, o.k, r));
    d_dyn.push_back(ns_per_draw(dyn, o.draws, o.k, r));
    double t0 = now_ms();
    const auto conditioned = cluster.condition(queries.data(), kDim, kBatch, kDim);
    cluster_condition.push_back(now_ms() - t0);
    d_cluster.push_back(ns_per_draw(cluster, o.draws, o.k, r, conditioned.get(), kBatch));
    t0 = now_ms();
    for (const double c : coins) sink += tree.draw(c);  // uniforms made beforehand: the tree's walk only
    d_tree.push_back((now_ms() - t0) * 1e6 / static_cast<double>(coins.size()));
  }
  // set_weights: calls changing m random rows; per call and per changed row.
  nlohmann::json updates = nlohmann::json::array();
  SumTree tree_u(w);
  for (const index_t m : {index_t{1}, index_t{16}, index_t{256}, index_t{4096}}) {
    std::vector<double> per_call, per_call_tree;
    std::uniform_int_distribution<index_t> row(0, o.n - 1);
    for (int r = 0; r < 3 * o.repeats; ++r) {
      std::vector<index_t> ids(static_cast<std::size_t>(m));
      std::vector<double> v(ids.size());
      for (std::size_t i = 0; i < ids.size(); ++i) {
        ids[i] = row(rng);
        v[i] = u(rng);
      }
      double t0 = now_ms();
      dyn.set_weights(ids, v);
      per_call.push_back(now_ms() - t0);
      t0 = now_ms();
      for (std::size_t i = 0; i < ids.size(); ++i) tree_u.set(static_cast<std::size_t>(ids[i]), v[i]);
      per_call_tree.push_back(now_ms() - t0);
    }
    const double call = median(per_call), call_tree = median(per_call_tree);
    updates.push_back({{"rows", m}, {"dynamic_ms_per_call", call}, {"dynamic_us_per_row", 1e3 * call / static_cast<double>(m)},
                       {"sum_tree_ms_per_call", call_tree}, {"sum_tree_us_per_row", 1e3 * call_tree / static_cast<double>(m)}});
  }
  nlohmann::json row = {{"bench", "sampler"}, {"n", o.n}, {"draws", o.draws}, {"k", o.k}, {"repeats", o.repeats},
                        {"block", DynamicSampler::kBlock},
                        {"alias_build_ms", median(alias_build)}, {"dynamic_build_ms", median(dynamic_build)},
                        {"sum_tree_build_ms", median(tree_build)},
                        {"uniform_ns_per_draw", median(d_uni)}, {"alias_ns_per_draw", median(d_alias)},
                        {"dynamic_ns_per_draw", median(d_dyn)}, {"sum_tree_ns_per_draw", median(d_tree)},
                        {"cluster_ns_per_draw", median(d_cluster)}, {"cluster_condition_ms", median(cluster_condition)},
                        {"cluster_clusters", cluster.config().clusters}, {"cluster_batch", kBatch},
                        {"updates", updates}, {"cpu", cpu_model()}, {"sink", sink % 2}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return;
  }
  fmt::print("membank bench sampler: N = {}, {} draws a pass in streams of {}, {} repeats (medians), one thread\n",
             o.n, o.draws, o.k, o.repeats);
  fmt::print("  build     alias {:8.1f} ms   dynamic {:8.1f} ms   sum tree {:8.1f} ms\n", median(alias_build),
             median(dynamic_build), median(tree_build));
  fmt::print("  draw      uniform {:6.1f} ns   alias {:6.1f} ns   dynamic {:6.1f} ns   sum tree {:6.1f} ns (walk only)\n",
             median(d_uni), median(d_alias), median(d_dyn), median(d_tree));
  fmt::print("  cluster   C = {}, D = {}: conditioning a batch of {} queries {:.2f} ms, a draw {:.1f} ns\n",
             cluster.config().clusters, kDim, kBatch, median(cluster_condition), median(d_cluster));
  for (const auto& x : updates)
    fmt::print("  update {:5} rows: dynamic {:8.3f} ms a call ({:6.2f} us a row)   sum tree {:8.3f} ms ({:6.3f} us a row)\n",
               x["rows"].get<index_t>(), x["dynamic_ms_per_call"].get<double>(), x["dynamic_us_per_row"].get<double>(),
               x["sum_tree_ms_per_call"].get<double>(), x["sum_tree_us_per_row"].get<double>());
}

}  // namespace

void add_bench_sampler(CLI::App& bench) {
  auto o = std::make_shared<SamplerBenchOptions>();
  auto* cmd = bench.add_subcommand("sampler", "Noise samplers: build, draw and weight-update costs in one run");
  cmd->add_option("--n", o->n, "instances N")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--draws", o->draws, "draws per timed pass")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--k", o->k, "draws per stream")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--repeats", o->repeats, "timed passes (medians)")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--seed", o->seed, "seed of the weights")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback(command([o] { run_bench_sampler(*o); }));
}

}  // namespace membank::tools
