// DistributedEngine against the single-process Engine (run under mpirun at np = 1, 2, 3, 4; CTest
// registers each). Every rank runs the single-process reference on the whole global batch itself and
// checks its own slice of the distributed result against it:
//   * loss and dL/df within 1e-6 relative (max |difference| / max |reference| over the rank's rows);
//   * the bank bit-identical to the reference after every step (replicated: each rank's whole copy;
//     sharded: each rank's shard), so the replicated copies are also identical to each other;
//   * the StepStats bit-identical across ranks.
// Over every objective x {replicated, sharded} x {per-sample, shared} x {uniform, alias} x
// {fp32, fp16, bf16} (the last two cycled with the objective), slices of uneven size, duplicate ids
// within and across ranks, and a step with caller negatives.
// `dynamic`: a dynamic sampler with caller-set weights before every step, and its refusals.
// `query`: the query-dependent samplers (cluster, re-fitted on its schedule; ring) in both modes, the
// same checks.
// `failure`: a rank's bad input gives every rank the same error, naming that rank, and changes nothing.
// `knn`: knn_search over the whole bank in both modes against the single-process search.
// A check never throws and never stops a rank early: every rank enters every collective.
#include <membank/cluster_sampler.hpp>
#include <membank/distributed.hpp>
#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/ring_sampler.hpp>

#include "mpi_check.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace membank;
using namespace mpi_check;

/// max |a - b| / max |b| (0 / 0 = 0).
double rel_diff(const RowMatrixf& a, const RowMatrixf& b) {
  double num = 0.0, den = 0.0;
  for (index_t e = 0; e < a.size(); ++e) {
    num = std::max(num, std::fabs(static_cast<double>(a.data()[e]) - b.data()[e]));
    den = std::max(den, std::fabs(static_cast<double>(b.data()[e])));
  }
  return den == 0.0 ? num : num / den;
}

/// kN x kDim rows seeded 5 (the banks of run_case): what a cluster sampler is fitted to.
Bank case_bank(DType dtype);

std::unique_ptr<NoiseSampler> make_sampler(SamplerKind kind, index_t n, DType dtype = DType::float32) {
  if (kind == SamplerKind::uniform) return std::make_unique<UniformSampler>(n);
  if (kind == SamplerKind::ring) return std::make_unique<RingSampler>(n, RingConfig{1, 30});
  if (kind == SamplerKind::cluster) {  // re-fitted at the start of step 2 (run_case runs 4)
    ClusterConfig cc;
    cc.clusters = 7;
    cc.beta = 5.0;
    cc.epsilon = 0.2;
    cc.refresh_every = 2;
    cc.iterations = 2;
    cc.seed = 9;
    return std::make_unique<ClusterSampler>(case_bank(dtype).view(), cc);
  }
  std::vector<double> w(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) w[static_cast<std::size_t>(j)] = 1.0 + static_cast<double>((j * 7) % 11);
  if (kind == SamplerKind::dynamic) return std::make_unique<DynamicSampler>(w);
  return std::make_unique<AliasSampler>(w);
}

/// The caller's weight change before step s of a dynamic-sampler case (the same on every rank):
/// 9 rows, one of them set to zero, the others in [0.1, 6).
void weight_change(int step, std::vector<index_t>& ids, std::vector<double>& w) {
  std::mt19937_64 gen(500 + static_cast<std::uint64_t>(step));
  std::uniform_int_distribution<index_t> pick(0, 96);
  std::uniform_real_distribution<double> value(0.1, 6.0);
  ids.resize(9);
  w.resize(9);
  for (std::size_t k = 0; k < ids.size(); ++k) {
    ids[k] = pick(gen);
    w[k] = k == 4 ? 0.0 : value(gen);
  }
}

/// This rank's slice size: uneven across ranks.
index_t slice_size(int rank) { return 2 + rank % 3; }

struct Case {
  Objective objective;
  Distributed mode;
  NegativesMode negatives;
  SamplerKind sampler;
  DType dtype;
  bool exclude_positive;
  /// The variants of the configuration beyond these: every field a step reads differently.
  bool exclude_same_label = false;
  bool normalize = false;  ///< normalize_features, with features of norm 3
  ZPolicy z_policy = ZPolicy::ema;
  Rounding rounding = Rounding::nearest;
  std::string name() const {
    return fmt::format("{} {} {} {} {}{}{}{} z={} rounding={}", to_string(objective), to_string(mode),
                       to_string(negatives), to_string(sampler), to_string(dtype),
                       exclude_positive ? " exclude_positive" : "", exclude_same_label ? " exclude_same_label" : "",
                       normalize ? " normalize_features" : "", to_string(z_policy), to_string(rounding));
  }
};

constexpr index_t kN = 97, kDim = 24, kK = 16;

Bank case_bank(DType dtype) { return Bank(kN, kDim, 5, dtype); }

EngineConfig config_of(const Case& c) {
  EngineConfig cfg;
  cfg.k = kK;
  cfg.tau = 0.2;
  cfg.momentum = 0.5;
  cfg.objective = c.objective;
  cfg.negatives = c.negatives;
  cfg.exclude_positive = c.exclude_positive;
  cfg.seed = 11;
  cfg.z_policy = c.z_policy;
  cfg.z_fixed = 50.0;
  cfg.exclude_same_label = c.exclude_same_label;
  cfg.normalize_features = c.normalize;
  cfg.rounding = c.rounding;
  cfg.allow_biased_sampler = c.sampler == SamplerKind::ring;
  return cfg;
}

std::vector<std::int64_t> labels_of(index_t n) {
  std::vector<std::int64_t> l(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) l[static_cast<std::size_t>(j)] = j % 5;
  return l;
}

/// The global batch of step s: ids with duplicates (within and across slices), unit features.
void global_batch(int step, std::vector<index_t>& ids, RowMatrixf& f, std::vector<index_t>& offset) {
  offset.assign(static_cast<std::size_t>(g_ranks) + 1, 0);
  for (int r = 0; r < g_ranks; ++r) offset[static_cast<std::size_t>(r) + 1] = offset[static_cast<std::size_t>(r)] + slice_size(r);
  const index_t total = offset.back();
  std::mt19937_64 gen(1000 + static_cast<std::uint64_t>(step));
  std::uniform_int_distribution<index_t> pick(0, kN - 1);
  std::normal_distribution<float> normal;
  ids.resize(static_cast<std::size_t>(total));
  for (auto& y : ids) y = pick(gen);
  if (total > 3) ids[static_cast<std::size_t>(total - 1)] = ids[0];  // a duplicate across ranks (or within one)
  f.resize(total, kDim);
  for (index_t i = 0; i < total; ++i) {
    for (index_t c = 0; c < kDim; ++c) f(i, c) = normal(gen);
    f.row(i).normalize();
  }
}

std::vector<double> allgather_bits(double v) {
  std::vector<double> all(static_cast<std::size_t>(g_ranks));
  MPI_Allgather(&v, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  return all;
}

void run_case(const Case& c) {
  const std::string name = c.name();
  const EngineConfig cfg = config_of(c);
  const bool labels = needs_labels(c.objective) || c.exclude_same_label;
  Engine ref(case_bank(c.dtype), make_sampler(c.sampler, kN, c.dtype), cfg, labels ? labels_of(kN) : std::vector<std::int64_t>{});
  DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, c.mode, kN, kDim, 5, c.dtype, make_sampler(c.sampler, kN, c.dtype),
                                                     cfg, labels ? labels_of(kN) : std::vector<std::int64_t>{});
  const RowRange held = dist.rows();
  for (int step = 0; step < 4; ++step) {
    std::vector<index_t> ids, offset;
    RowMatrixf f;
    global_batch(step, ids, f, offset);
    if (c.sampler == SamplerKind::dynamic) {
      std::vector<index_t> changed;
      std::vector<double> w;
      weight_change(step, changed, w);
      // A zero weight on a positive of this step would be refused by the step: keep those drawable.
      for (std::size_t k = 0; k < changed.size(); ++k)
        if (std::find(ids.begin(), ids.end(), changed[k]) != ids.end()) w[k] = 1.0;
      ref.set_sampler_weights(changed, w);
      dist.set_sampler_weights(changed, w);
    }
    if (c.normalize) f *= 3.0f;
    const index_t total = f.rows();
    const index_t first = offset[static_cast<std::size_t>(g_rank)], mine = slice_size(g_rank);
    RowMatrixf g_ref(total, kDim), g(mine, kDim);
    const RowMatrixf f_mine = f.middleRows(first, mine);
    const std::vector<index_t> ids_mine(ids.begin() + first, ids.begin() + first + mine);
    StepStats s_ref, s;
    const bool given = step == 2 && c.objective != Objective::full_softmax;  // caller negatives
    if (given) {
      const RowMatrixi neg = ref.sample(ids, ref.steps_done(), f);  // (a static sampler ignores f)
      s_ref = ref.step_with_negatives(f, ids, neg, g_ref);
      const RowMatrixi neg_mine = c.negatives == NegativesMode::shared ? neg : RowMatrixi(neg.middleRows(first, mine));
      s = dist.step_with_negatives(f_mine, ids_mine, neg_mine, g);
    } else {
      s_ref = ref.step(f, ids, g_ref);
      s = dist.step(f_mine, ids_mine, g);
    }
    const std::string at = fmt::format("{} step {}", name, step);
    const double dl = std::fabs(s.loss - s_ref.loss) / std::max(1e-30, std::fabs(s_ref.loss));
    check(dl <= 1e-6, fmt::format("{}: loss {} against {} (relative {:.2e})", at, s.loss, s_ref.loss, dl));
    const double dg = rel_diff(g, g_ref.middleRows(first, mine));
    check(dg <= 1e-6, fmt::format("{}: dL/df relative difference {:.2e}", at, dg));
    check(std::isnan(s_ref.z) == std::isnan(s.z) && (std::isnan(s.z) || std::fabs(s.z / s_ref.z - 1.0) <= 1e-6),
          fmt::format("{}: Z {} against {}", at, s.z, s_ref.z));
    check(std::isnan(s.mean_p_positive) == std::isnan(s_ref.mean_p_positive) &&
              !(std::fabs(s.mean_p_positive - s_ref.mean_p_positive) > 1e-6 * std::max(1.0, std::fabs(s_ref.mean_p_positive))),
          fmt::format("{}: mean P(positive) {} against {}", at, s.mean_p_positive, s_ref.mean_p_positive));
    check(s.negative_collision_fraction == s_ref.negative_collision_fraction,
          fmt::format("{}: collision fraction {} against {}", at, s.negative_collision_fraction,
                      s_ref.negative_collision_fraction));
    check(s.step == s_ref.step, fmt::format("{}: step counter {} against {}", at, s.step, s_ref.step));
    for (const double v : {s.loss, s.z, s.mean_p_positive}) {
      const std::vector<double> all = allgather_bits(v);
      check(std::all_of(all.begin(), all.end(), [&](double x) { return std::memcmp(&x, &all[0], sizeof x) == 0; }),
            fmt::format("{}: a statistic differs between ranks", at));
    }
    // The bank: this rank's rows bit for bit those of the single-process engine.
    const RowMatrixf whole = ref.bank().to_matrix();
    const RowMatrixf local = dist.local_bank().to_matrix();
    check(same_bits(local, whole.middleRows(held.begin, held.size())),
          fmt::format("{}: the bank's rows [{}, {}) differ from the single-process bank", at, held.begin, held.end));
    const std::vector<std::int64_t>& lu = dist.local_bank().last_update();
    check(std::equal(lu.begin(), lu.end(), ref.bank().last_update().begin() + held.begin),
          fmt::format("{}: last-update steps differ", at));
  }
  // The whole bank gathered on rank 0.
  const RowMatrixf all = dist.gather_bank(0);
  if (g_rank == 0) check(same_bits(all, ref.bank().to_matrix()), fmt::format("{}: gather_bank differs", name));
}

void steps() {
  const Objective objectives[] = {Objective::nce,    Objective::info_nce, Objective::dcl,         Objective::hcl,
                                  Objective::dhel,   Objective::kcl,      Objective::supcon,      Objective::contrastive,
                                  Objective::triplet, Objective::full_softmax};
  const DType dtypes[] = {DType::float32, DType::float16, DType::bfloat16};
  int cases = 0;
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded})
    for (std::size_t o = 0; o < std::size(objectives); ++o)
      for (const NegativesMode neg : {NegativesMode::per_sample, NegativesMode::shared}) {
        if (objectives[o] == Objective::full_softmax && neg == NegativesMode::shared) continue;
        for (const SamplerKind sampler : {SamplerKind::uniform, SamplerKind::alias}) {
          const DType dtype = dtypes[(o + (sampler == SamplerKind::alias ? 1 : 0)) % 3];
          const bool exclude = (o % 2 == 1) && objectives[o] != Objective::full_softmax;
          try {
            run_case({objectives[o], mode, neg, sampler, dtype, exclude});
          } catch (const std::exception& e) {  // the same on every rank (the engine agrees on errors)
            check(false, fmt::format("{}: threw {}", Case{objectives[o], mode, neg, sampler, dtype, exclude}.name(), e.what()));
          }
          ++cases;
        }
      }
  // The variants: exclusion of the query's label, the engine's normalisation, the Z policies,
  // stochastic rounding, each in both modes and both negatives modes.
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded})
    for (const NegativesMode neg : {NegativesMode::per_sample, NegativesMode::shared}) {
      std::vector<Case> variants;
      Case c{Objective::supcon, mode, neg, SamplerKind::alias, DType::float32, false};
      c.exclude_same_label = true;
      variants.push_back(c);
      c = {Objective::nce, mode, neg, SamplerKind::uniform, DType::float32, false};
      c.normalize = true;
      c.z_policy = ZPolicy::first_batch;
      variants.push_back(c);
      c = {Objective::nce, mode, neg, SamplerKind::alias, DType::float16, true};
      c.z_policy = ZPolicy::fixed;
      variants.push_back(c);
      c = {Objective::info_nce, mode, neg, SamplerKind::uniform, DType::bfloat16, false};
      c.rounding = Rounding::stochastic;
      variants.push_back(c);
      for (const Case& v : variants) {
        try {
          run_case(v);
        } catch (const std::exception& e) {
          check(false, fmt::format("{}: threw {}", v.name(), e.what()));
        }
        ++cases;
      }
    }
  if (g_rank == 0) std::cout << fmt::format("steps: {} configurations at np = {}\n", cases, g_ranks);
}

/// run_case, with an exception turned into a failed check (the same on every rank: the engine agrees
/// on errors); counts the case.
void run_guarded(const Case& c, int& cases) {
  try {
    run_case(c);
  } catch (const std::exception& e) {
    check(false, fmt::format("{}: threw {}", c.name(), e.what()));
  }
  ++cases;
}

/// The query-dependent samplers: every rank conditions on the whole global batch (a sharded ring:
/// each rank's candidates merged), the clusters re-fitted on the schedule (sharded: k-means over the
/// shards), so each step is the single-process one.
void query() {
  int cases = 0;
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded})
  for (const SamplerKind sampler : {SamplerKind::cluster, SamplerKind::ring})
    for (const Objective objective : {Objective::nce, Objective::info_nce, Objective::dhel, Objective::supcon,
                                      Objective::triplet})
      for (const NegativesMode neg : {NegativesMode::per_sample, NegativesMode::shared}) {
        Case c{objective, mode, neg, sampler, cases % 3 == 1 ? DType::bfloat16 : DType::float32, cases % 2 == 0};
        // exclude_same_label: the cluster's draws conditioned on each query's label mass under its
        // own q; each ring ranks the other classes' rows only
        c.exclude_same_label = objective == Objective::supcon;
        if (c.exclude_same_label) c.exclude_positive = false;
        run_guarded(c, cases);
      }
  // The clusters re-fitted on demand: the single-process re-fit on every rank, in both modes (sharded:
  // k-means over the shards); a ring has none to re-fit.
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded}) {
    const Case c{Objective::nce, mode, NegativesMode::per_sample, SamplerKind::cluster, DType::float32, false};
    Engine ref(case_bank(DType::float32), make_sampler(SamplerKind::cluster, kN), config_of(c));
    DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 5, DType::float32,
                                                       make_sampler(SamplerKind::cluster, kN), config_of(c));
    std::vector<index_t> ids, offset;
    RowMatrixf f;
    global_batch(0, ids, f, offset);
    const index_t first = offset[static_cast<std::size_t>(g_rank)], mine = slice_size(g_rank);
    RowMatrixf g_ref(f.rows(), kDim), g(mine, kDim);
    ref.step(f, ids, g_ref);
    dist.step(f.middleRows(first, mine), std::vector<index_t>(ids.begin() + first, ids.begin() + first + mine), g);
    ref.refresh_sampler();
    dist.refresh_sampler();
    const auto& a = dynamic_cast<const ClusterSampler&>(ref.sampler());
    const auto& b = dynamic_cast<const ClusterSampler&>(dist.sampler());
    check(same_bits(a.centroids(), b.centroids()) && a.assignment() == b.assignment() &&
              a.refreshed_at() == b.refreshed_at() && b.refreshed_at() == 1,
          fmt::format("refresh_sampler ({}): the re-fitted clusters differ from the single-process engine's",
                      to_string(mode)));
  }
  {
    const Case c{Objective::nce, Distributed::replicated, NegativesMode::per_sample, SamplerKind::ring,
                 DType::float32, false};
    DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, Distributed::replicated, kN, kDim, 5,
                                                       DType::float32, make_sampler(SamplerKind::ring, kN),
                                                       config_of(c));
    std::string msg;
    try {
      dist.refresh_sampler();
    } catch (const Error& e) {
      msg = e.what();
    }
    check(msg.find("expected a cluster sampler") != std::string::npos,
          fmt::format("refresh_sampler with a ring sampler: got '{}'", msg));
  }
  {  // a biased sampler still needs allow_biased_sampler (as Engine)
    Case c{Objective::nce, Distributed::replicated, NegativesMode::per_sample, SamplerKind::ring, DType::float32, false};
    EngineConfig cfg = config_of(c);
    cfg.allow_biased_sampler = false;
    std::string msg;
    try {
      DistributedEngine::seeded(MPI_COMM_WORLD, Distributed::replicated, kN, kDim, 5, DType::float32,
                                make_sampler(SamplerKind::ring, kN), cfg);
    } catch (const Error& e) {
      msg = e.what();
    }
    check(msg.find("biased") != std::string::npos, fmt::format("ring without allow_biased_sampler: got '{}'", msg));
  }
  if (g_rank == 0) std::cout << fmt::format("query: {} configurations at np = {}\n", cases, g_ranks);
}

/// Every rank gets the same error, naming the rank whose input was bad; nothing changes.
void failure() {
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded}) {
    EngineConfig cfg;
    cfg.k = 8;
    cfg.objective = Objective::info_nce;
    DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 3, DType::float32,
                                                       std::make_unique<UniformSampler>(kN), cfg);
    const RowMatrixf before = dist.local_bank().to_matrix();
    std::vector<index_t> ids, offset;
    RowMatrixf f;
    global_batch(0, ids, f, offset);
    const index_t first = offset[static_cast<std::size_t>(g_rank)], mine = slice_size(g_rank);
    RowMatrixf f_mine = f.middleRows(first, mine), g(mine, kDim);
    std::vector<index_t> ids_mine(ids.begin() + first, ids.begin() + first + mine);
    const int bad = g_ranks - 1;
    if (g_rank == bad) ids_mine[1] = kN + 5;  // out of range on the last rank only
    std::string message;
    try {
      dist.step(f_mine, ids_mine, g);
    } catch (const Error& e) {
      message = e.what();
    }
    const std::string expect = fmt::format("rank {} of {}", bad, g_ranks);
    check(message.find(expect) != std::string::npos && message.find("out of range") != std::string::npos,
          fmt::format("{}: the error names the bad rank and value: '{}'", to_string(mode), message));
    // The same text on every rank.
    std::uint64_t h = 1469598103934665603ull;
    for (const char ch : message) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    std::vector<std::uint64_t> all(static_cast<std::size_t>(g_ranks));
    MPI_Allgather(&h, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
    check(std::all_of(all.begin(), all.end(), [&](std::uint64_t x) { return x == all[0]; }),
          fmt::format("{}: every rank has the same error text", to_string(mode)));
    check(dist.steps_done() == 0 && same_bits(dist.local_bank().to_matrix(), before),
          fmt::format("{}: nothing changed after the refused step", to_string(mode)));
    // A NaN feature on rank 0: the same.
    if (g_rank == bad) ids_mine[1] = 0;
    if (g_rank == 0) f_mine(0, 0) = std::nanf("");
    message.clear();
    try {
      dist.step(f_mine, ids_mine, g);
    } catch (const Error& e) {
      message = e.what();
    }
    check(message.find("rank 0 of") != std::string::npos && message.find("finite") != std::string::npos,
          fmt::format("{}: NaN on rank 0 named: '{}'", to_string(mode), message));
    // Ranks that disagree on the configuration are refused at construction, on every rank.
    EngineConfig other = cfg;
    if (g_rank == bad && g_ranks > 1) other.tau = 0.5;
    message.clear();
    try {
      DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 3, DType::float32, std::make_unique<UniformSampler>(kN), other);
    } catch (const Error& e) {
      message = e.what();
    }
    if (g_ranks > 1)
      check(message.find("EngineConfig differs from rank 0's") != std::string::npos,
            fmt::format("{}: a different config is refused: '{}'", to_string(mode), message));
  }
  if (g_rank == 0) std::cout << fmt::format("failure: checked at np = {}\n", g_ranks);
}

/// The dynamic sampler: caller-set weights before every step keep the distributed engine equal to the
/// single-process one (run_case, both modes and negatives modes, NCE and InfoNCE, with
/// exclude_same_label once); a weight update that differs on one rank is refused on every rank naming
/// it, with every rank's sampler unchanged; the loss_ema drive re-weights alike on every rank.
void dynamic() {
  int cases = 0;
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded})
    for (const NegativesMode neg : {NegativesMode::per_sample, NegativesMode::shared})
      for (const Objective obj : {Objective::nce, Objective::info_nce, Objective::supcon}) {
        Case c{obj, mode, neg, SamplerKind::dynamic, DType::float32, obj == Objective::info_nce};
        c.exclude_same_label = obj == Objective::supcon;
        run_guarded(c, cases);
      }
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded}) {
    EngineConfig cfg;
    cfg.k = 8;
    DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 3, DType::float32,
                                                       make_sampler(SamplerKind::dynamic, kN), cfg);
    const auto& s = dynamic_cast<const DynamicSampler&>(dist.sampler());
    const std::uint64_t before = s.fingerprint();
    std::vector<index_t> ids{3, 40, 90};
    std::vector<double> w{2.0, 0.5, 1.5};
    const int bad = g_ranks - 1;
    if (g_rank == bad && g_ranks > 1) w[1] = 0.75;
    std::string message;
    try {
      dist.set_sampler_weights(ids, w);
    } catch (const Error& e) {
      message = e.what();
    }
    if (g_ranks > 1)
      check(message.find(fmt::format("rank {}", bad)) != std::string::npos &&
                message.find("sampler weight update") != std::string::npos,
            fmt::format("{}: a differing update is refused naming rank {}: '{}'", to_string(mode), bad, message));
    check(g_ranks == 1 || s.fingerprint() == before, fmt::format("{}: the refused update changed nothing", to_string(mode)));
    // A bad weight (the same on every rank): one error everywhere, nothing changed.
    w = {2.0, -1.0, 1.5};
    message.clear();
    const std::uint64_t now = s.fingerprint();
    try {
      dist.set_sampler_weights(ids, w);
    } catch (const Error& e) {
      message = e.what();
    }
    check(message.find("-1") != std::string::npos && s.fingerprint() == now,
          fmt::format("{}: a negative weight is refused: '{}'", to_string(mode), message));
    // The loss_ema drive: after every step each rank re-weights the global batch's rows from the
    // gathered per-query losses, the same on every rank (bit for bit) and as one process does (to
    // the losses' rounding: 1e-6 relative), per-sample and shared.
    DynamicSampler::Params p;
    p.drive = DynamicSampler::Drive::loss_ema;
    for (const NegativesMode neg : {NegativesMode::per_sample, NegativesMode::shared}) {
      EngineConfig dc = cfg;
      dc.negatives = neg;
      dc.seed = 13;
      const std::string at = fmt::format("{} {} loss_ema", to_string(mode), to_string(neg));
      Engine ref(Bank(kN, kDim, 4, DType::float32), std::make_unique<DynamicSampler>(std::vector<double>(kN, 1.0), p), dc);
      DistributedEngine de = DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 4, DType::float32,
                                                       std::make_unique<DynamicSampler>(std::vector<double>(kN, 1.0), p), dc);
      const auto& rs = dynamic_cast<const DynamicSampler&>(ref.sampler());
      const auto& ds = dynamic_cast<const DynamicSampler&>(de.sampler());
      for (int step = 0; step < 3; ++step) {
        std::vector<index_t> gids, offset;
        RowMatrixf f;
        global_batch(step, gids, f, offset);
        const index_t first = offset[static_cast<std::size_t>(g_rank)], mine = slice_size(g_rank);
        RowMatrixf g_ref(f.rows(), kDim), g(mine, kDim);
        const StepStats s_ref = ref.step(f, gids, g_ref);
        const StepStats st = de.step(RowMatrixf(f.middleRows(first, mine)),
                                     std::vector<index_t>(gids.begin() + first, gids.begin() + first + mine), g);
        check(std::fabs(st.loss - s_ref.loss) <= 1e-6 * std::fabs(s_ref.loss),
              fmt::format("{} step {}: loss {} against {}", at, step, st.loss, s_ref.loss));
        double worst = 0.0;
        for (index_t j = 0; j < kN; ++j)
          worst = std::max(worst, std::fabs(ds.weights()[static_cast<std::size_t>(j)] / rs.weights()[static_cast<std::size_t>(j)] - 1.0));
        check(worst <= 1e-6, fmt::format("{} step {}: weights {:.2e} from one process's", at, step, worst));
        const double w0 = ds.weights()[static_cast<std::size_t>(gids[0])];
        check(w0 != 1.0 && w0 == p.floor + std::max(ds.ema()[static_cast<std::size_t>(gids[0])], 0.0),
              fmt::format("{} step {}: the batch's rows are re-weighted (row {}: {})", at, step, gids[0], w0));
        const std::vector<double> fp = allgather_bits(static_cast<double>(ds.fingerprint() >> 11));
        check(std::all_of(fp.begin(), fp.end(), [&](double x) { return x == fp[0]; }),
              fmt::format("{} step {}: the weights differ between ranks", at, step));
      }
    }
  }
  if (g_rank == 0) std::cout << fmt::format("dynamic: {} configurations at np = {}\n", cases, g_ranks);
}

/// The bytes a step sends, against docs/distributed.md's formulas (per rank, B_r = B / R queries each):
///   replicated: (R - 1) [B_r (8 + 4 D) + 96]
///   sharded:    B (R - 1) / R [8 + 8 D + 8 (K + 1) / R] + 148 (R - 1)    (sampled objectives, uniform)
/// The sharded figure is an expectation (which draws a rank owns is random): within 20 %.
void wire() {
  constexpr index_t n = 4000, dim = 32, k = 512, b_r = 8;
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded}) {
    EngineConfig cfg;
    cfg.k = k;
    cfg.objective = Objective::info_nce;
    DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, mode, n, dim, 3, DType::float32,
                                                       std::make_unique<UniformSampler>(n), cfg);
    std::mt19937_64 gen(77 + static_cast<std::uint64_t>(g_rank));
    std::normal_distribution<float> normal;
    RowMatrixf f(b_r, dim), g(b_r, dim);
    std::vector<index_t> ids(static_cast<std::size_t>(b_r));
    for (index_t b = 0; b < b_r; ++b) {
      ids[static_cast<std::size_t>(b)] = (g_rank * b_r + b) * 37 % n;
      for (index_t c = 0; c < dim; ++c) f(b, c) = normal(gen);
      f.row(b).normalize();
    }
    for (int step = 0; step < 3; ++step) {
      dist.step(f, ids, g);
      const double R = g_ranks, B = static_cast<double>(b_r) * R;
      const double formula = mode == Distributed::replicated
                                 ? (R - 1) * (static_cast<double>(b_r) * (8 + 4 * dim) + 96)
                                 : B * (R - 1) / R * (8 + 8.0 * dim + 8.0 * (k + 1) / R) + 148 * (R - 1);
      const auto sent = static_cast<double>(dist.last_wire().bytes_sent);
      const bool ok = mode == Distributed::replicated ? sent == formula : std::fabs(sent - formula) <= 0.2 * formula;
      check(ok, fmt::format("{} step {}: {} bytes sent, the formula says {}", to_string(mode), step, sent, formula));
      if (g_rank == 0 && step == 2)
        std::cout << fmt::format("wire: {} at np = {}: {} bytes sent per rank, formula {} (ratio {:.3f})\n",
                                 to_string(mode), g_ranks, sent, formula, formula > 0 ? sent / formula : 1.0);
    }
  }
}

/// knn_search over the whole bank in both modes against the single-process search of that bank: every
/// rank's slice of the queries (uneven, one rank with none at R >= 3), k = 1, 40 and N, fp32 and bf16;
/// scores and ids equal bit for bit. Then a cancelling rank stops every rank and nothing is written,
/// and a k that differs on one rank is one Error on every rank.
void knn() {
  constexpr index_t n = 1001, dim = 12;
  EngineConfig cfg;
  cfg.k = 8;
  std::vector<index_t> q_of(static_cast<std::size_t>(g_ranks));
  for (int r = 0; r < g_ranks; ++r) q_of[static_cast<std::size_t>(r)] = r == 2 ? 0 : 5 + 7 * r;
  index_t total = 0, mine_at = 0;
  for (int r = 0; r < g_ranks; ++r) {
    if (r == g_rank) mine_at = total;
    total += q_of[static_cast<std::size_t>(r)];
  }
  const index_t q = q_of[static_cast<std::size_t>(g_rank)];
  std::mt19937_64 rng(77);
  std::normal_distribution<float> nd;
  RowMatrixf all_q(total, dim);
  for (index_t e = 0; e < all_q.size(); ++e) all_q.data()[e] = nd(rng);
  const RowMatrixf my_q = all_q.middleRows(mine_at, q);
  for (const Distributed mode : {Distributed::replicated, Distributed::sharded})
    for (const DType dt : {DType::float32, DType::bfloat16}) {
      DistributedEngine dist = DistributedEngine::seeded(MPI_COMM_WORLD, mode, n, dim, 13, dt,
                                                         std::make_unique<UniformSampler>(n), cfg);
      const Bank whole(n, dim, 13, dt);
      for (const index_t k : {index_t{1}, index_t{40}, n}) {
        const std::string what = fmt::format("knn {} {} k = {}", to_string(mode), to_string(dt), k);
        guarded(what, [&] {
          std::vector<float> ref_s(static_cast<std::size_t>(total * k)), got_s(static_cast<std::size_t>(q * k));
          std::vector<index_t> ref_i(ref_s.size()), got_i(got_s.size());
          knn_search(whole.view(), all_q, k, ref_s, ref_i);
          dist.knn_search(my_q, k, got_s, got_i);
          // Bit for bit: a score is the same chain of multiply-adds wherever its query and row fall.
          std::size_t bad_score = 0, bad_id = 0;
          for (std::size_t e = 0; e < got_s.size(); ++e) {
            const std::size_t r = static_cast<std::size_t>(mine_at * k) + e;
            bad_score += std::bit_cast<std::uint32_t>(got_s[e]) != std::bit_cast<std::uint32_t>(ref_s[r]);
            bad_id += got_i[e] != ref_i[r];
          }
          check(bad_score == 0, fmt::format("{}: {} scores differ from one process's", what, bad_score));
          check(bad_id == 0, fmt::format("{}: {} ids differ from one process's", what, bad_id));
        });
      }
      // Cancellation: rank 0 stops at its first tile; every rank throws, nothing written.
      const std::string what = fmt::format("knn {} {} cancelled", to_string(mode), to_string(dt));
      std::vector<float> s(static_cast<std::size_t>(q * 3), -5.0f);
      std::vector<index_t> ids(s.size(), -5);
      bool cancelled = false;
      try {
        dist.knn_search(my_q, 3, s, ids, [&] { return g_rank == 0; });
      } catch (const Cancelled&) {
        cancelled = true;
      } catch (const std::exception& e) {
        check(false, what + ": threw " + e.what());
      }
      check(cancelled, what + ": not cancelled on every rank");
      check(std::all_of(s.begin(), s.end(), [](float x) { return x == -5.0f; }) &&
                std::all_of(ids.begin(), ids.end(), [](index_t x) { return x == -5; }),
            what + ": wrote results");
      // A k that differs on rank 0 (at R >= 2) or a k > N (at R = 1) is refused on every rank.
      std::string msg;
      try {
        const index_t bad = g_ranks > 1 ? (g_rank == 0 ? 4 : 3) : n + 1;
        std::vector<float> s4(static_cast<std::size_t>(q * 4));
        std::vector<index_t> i4(s4.size());
        dist.knn_search(my_q, bad, s4, i4);
      } catch (const Error& e) {
        msg = e.what();
      }
      check(msg.find(g_ranks > 1 ? "same k" : "k = 1002") != std::string::npos, what + ": bad k gave '" + msg + "'");
    }
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  const std::string what = argc > 1 ? argv[1] : "all";
  if (what == "steps" || what == "all") steps();
  if (what == "failure" || what == "all") failure();
  if (what == "wire" || what == "all") wire();
  if (what == "dynamic" || what == "all") dynamic();
  if (what == "query" || what == "all") query();
  if (what == "knn" || what == "all") knn();
  return finish(what);
}
