// MultiViewEngine (multiview.hpp): V banks over the same instances, scored pair by pair through the
// single-view engine's compute path (Engine::compute_on, with the pair's bank and Z state), with one
// draw of the negatives per step shared by every pair (per query view for a query-dependent
// sampler). The validation names the view of each argument; the commit (grads, banks, Z states,
// counter) runs only once every pair has succeeded.
#include <membank/multiview.hpp>
#include <membank/cluster_sampler.hpp>
#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/features.hpp"
#include "detail/parallel.hpp"

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace membank {

std::string to_string(ViewGraph g) { return g == ViewGraph::full ? "full" : "core"; }

ViewGraph view_graph_from_string(const std::string& s) {
  if (s == "full") return ViewGraph::full;
  if (s == "core") return ViewGraph::core;
  MEMBANK_THROW("view graph = '{}': expected full (every ordered pair of views) or core (view 0 with each other)", s);
}

std::vector<ViewPair> view_pairs(ViewGraph graph, index_t views) {
  MEMBANK_CHECK(views >= 2, "views = {}: expected V >= 2 views", views);
  MEMBANK_CHECK(graph == ViewGraph::full || graph == ViewGraph::core,
                "view graph = {}: expected ViewGraph::full or ViewGraph::core", static_cast<int>(graph));
  std::vector<ViewPair> pairs;
  for (index_t a = 0; a < views; ++a)
    for (index_t b = 0; b < views; ++b)
      if (a != b && (graph == ViewGraph::full || a == 0 || b == 0)) pairs.push_back({a, b});
  return pairs;
}

Engine MultiViewEngine::make_core(std::vector<Bank>& banks, std::unique_ptr<NoiseSampler> sampler,
                                  const EngineConfig& config, std::vector<std::int64_t> labels) {
  MEMBANK_CHECK(banks.size() >= 2, "banks has {} entries: expected V >= 2 views (one bank per view)", banks.size());
  for (std::size_t v = 1; v < banks.size(); ++v)
    MEMBANK_CHECK(banks[v].size() == banks[0].size() && banks[v].dim() == banks[0].dim(),
                  "banks[{}] is N x D = {} x {}: expected banks[0]'s {} x {} (every view holds the same N instances "
                  "in the same dimension)", v, banks[v].size(), banks[v].dim(), banks[0].size(), banks[0].dim());
  // The engine checks the sampler, the config (against N and D) and the labels.
  return Engine(std::move(banks[0]), std::move(sampler), config, std::move(labels));
}

MultiViewEngine::MultiViewEngine(std::vector<Bank> banks, std::unique_ptr<NoiseSampler> sampler, EngineConfig config,
                                 ViewGraph graph, std::vector<std::int64_t> labels)
    : core_(make_core(banks, std::move(sampler), config, std::move(labels))), graph_(graph) {
  pairs_ = view_pairs(graph_, static_cast<index_t>(banks.size()));
  others_.reserve(banks.size() - 1);
  for (std::size_t v = 1; v < banks.size(); ++v) others_.push_back(std::move(banks[v]));
  // Every pair starts where a fresh Engine does (uninitialised, or the fixed policy's Z).
  partitions_.assign(pairs_.size(), core_.partition());
}

const Bank& MultiViewEngine::bank(index_t v) const {
  MEMBANK_CHECK(v >= 0 && v < views(), "view {} is out of range: expected 0 <= v < V = {}", v, views());
  return v == 0 ? core_.bank() : others_[static_cast<std::size_t>(v - 1)];
}

std::size_t MultiViewEngine::pair_index(index_t query, index_t bank) const {
  for (std::size_t p = 0; p < pairs_.size(); ++p)
    if (pairs_[p] == ViewPair{query, bank}) return p;
  MEMBANK_THROW("pair ({}, {}) is not scored: expected one of the {} graph's pairs over V = {} views "
                "(query view != bank view{})", query, bank, to_string(graph_), views(),
                graph_ == ViewGraph::core ? ", one of them view 0" : "");
}

const Partition& MultiViewEngine::partition(std::size_t p) const {
  MEMBANK_CHECK(p < partitions_.size(), "pair {} is out of range: expected 0 <= p < {} (pairs().size())", p,
                partitions_.size());
  return partitions_[p];
}

void MultiViewEngine::restore_state(std::vector<Partition> partitions, std::int64_t step) {
  MEMBANK_CHECK(partitions.size() == partitions_.size(),
                "partitions has {} entries: expected one Z state per pair ({} pairs, {} graph over V = {} views)",
                partitions.size(), partitions_.size(), to_string(graph_), views());
  MEMBANK_CHECK(step >= 0, "step = {}: expected a step counter >= 0", step);
  const EngineConfig& cfg = core_.config();
  for (std::size_t p = 0; p < partitions.size(); ++p) {
    const Partition& next = partitions[p];
    MEMBANK_CHECK(next.policy == cfg.z_policy, "partitions[{}].policy = {} (pair {} -> {}): expected the engine's {}",
                  p, to_string(next.policy), pairs_[p].query, pairs_[p].bank, to_string(cfg.z_policy));
    MEMBANK_CHECK(!next.initialised || std::isfinite(next.log_z),
                  "partitions[{}].log_z = {} (pair {} -> {}): expected a finite value", p, next.log_z,
                  pairs_[p].query, pairs_[p].bank);
    MEMBANK_CHECK(cfg.z_policy != ZPolicy::fixed || (next.initialised && next.log_z == partitions_[p].log_z),
                  "partitions[{}].log_z = {} (pair {} -> {}): the fixed policy's Z is log {} = {}", p, next.log_z,
                  pairs_[p].query, pairs_[p].bank, cfg.z_fixed, partitions_[p].log_z);
  }
  partitions_ = std::move(partitions);
  core_.step_ = step;
}

// ---------------------------------------------------------------------------------------------
// checks

void MultiViewEngine::check_views(std::span<const FeaturesRef> features, IdsRef ids) const {
  const index_t views_n = views();
  MEMBANK_CHECK(static_cast<index_t>(features.size()) == views_n,
                "features has {} entries: expected V = {} (one B x D matrix per view)", features.size(), views_n);
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id (B >= 1)");
  const index_t n = core_.bank().size(), dim = core_.bank().dim();
  check_ids(ids, n, "ids");
  const EngineConfig& cfg = core_.config();
  for (index_t v = 0; v < views_n; ++v) {
    const std::string name = fmt::format("features[{}]", v);
    const FeaturesRef& f = features[static_cast<std::size_t>(v)];
    check_features(f, static_cast<index_t>(ids.size()), dim, name.c_str());
    if (!cfg.normalize_features) check_unit_norm(f, cfg.unit_norm_tolerance, name.c_str());
  }
}

void MultiViewEngine::check_grads(std::span<const FeaturesRef> features, IdsRef ids, std::span<GradRef> grads) const {
  const index_t views_n = views();
  MEMBANK_CHECK(static_cast<index_t>(grads.size()) == views_n,
                "grads has {} entries: expected V = {} (one B x D buffer per view)", grads.size(), views_n);
  const auto batch = static_cast<index_t>(ids.size());
  const index_t dim = core_.bank().dim();
  for (index_t v = 0; v < views_n; ++v) {
    const GradRef& g = grads[static_cast<std::size_t>(v)];
    MEMBANK_CHECK(g.rows() == batch && g.cols() == dim, "grads[{}] has shape {} x {}: expected {} x {} (B x D)", v,
                  g.rows(), g.cols(), batch, dim);
  }
  // The aliasing contract (memory.hpp): an output overlaps nothing the step reads, owns or writes.
  for (index_t v = 0; v < views_n; ++v) {
    const MemoryRegion g = MemoryRegion::of_matrix(grads[static_cast<std::size_t>(v)]);
    const std::string name = fmt::format("grads[{}]", v);
    check_no_self_overlap(g, name.c_str());
    for (index_t u = 0; u < views_n; ++u) {
      const std::string in = fmt::format("features[{}]", u);
      check_no_overlap(g, name.c_str(), MemoryRegion::of_matrix(features[static_cast<std::size_t>(u)]), in.c_str());
    }
    check_no_overlap(g, name.c_str(), MemoryRegion::of_span(ids), "ids");
    for (index_t u = 0; u < v; ++u) {
      const std::string other = fmt::format("grads[{}]", u);
      check_no_overlap(g, name.c_str(), MemoryRegion::of_matrix(grads[static_cast<std::size_t>(u)]), other.c_str());
    }
    for (index_t u = 0; u < views_n; ++u) {
      const Bank& b = bank(u);
      const std::string rows = fmt::format("bank {}'s rows", u), steps = fmt::format("bank {}'s last-update steps", u);
      // The whole allocation (padding too), as Bank::check_no_overlap.
      check_no_overlap(g, name.c_str(),
                       MemoryRegion::contiguous(b.view().data, static_cast<std::int64_t>(b.storage_bytes())),
                       rows.c_str());
      check_no_overlap(g, name.c_str(), MemoryRegion::of_span(std::span<const std::int64_t>(b.last_update())),
                       steps.c_str());
    }
  }
}

RowMatrixi MultiViewEngine::sample(IdsRef ids, std::int64_t step, std::span<const FeaturesRef> features,
                                   std::size_t p) const {
  MEMBANK_CHECK(p < pairs_.size(), "pair {} is out of range: expected 0 <= p < {} (pairs().size())", p, pairs_.size());
  check_views(features, ids);
  return detail::translate_bad_alloc("MultiViewEngine::sample", [&] {
    const ViewPair& pair = pairs_[p];
    return core_.sample_impl(bank(pair.bank), ids, step, &features[static_cast<std::size_t>(pair.query)]);
  });
}

// ---------------------------------------------------------------------------------------------
// step

MultiViewStats MultiViewEngine::step(std::span<const FeaturesRef> features, IdsRef ids, std::span<GradRef> grads,
                                     bool update) {
  check_views(features, ids);
  check_grads(features, ids, grads);
  core_.check_labels_present();
  return detail::translate_bad_alloc("MultiViewEngine::step", [&] { return run(features, ids, grads, update); });
}

MultiViewStats MultiViewEngine::run(std::span<const FeaturesRef> features, IdsRef ids_in, std::span<GradRef> grads,
                                    bool update) {
  // The engine's own copy of the ids: a refresh of one bank must not change what the next one reads
  // (ids may overlap a bank's last-update steps).
  const std::vector<index_t> id_copy(ids_in.begin(), ids_in.end());
  const IdsRef ids(id_copy);
  const index_t views_n = views();
  const auto batch = static_cast<index_t>(ids.size());
  const index_t dim = core_.bank().dim();
  const EngineConfig& cfg = core_.config();
  // A cluster sampler due a refresh at this counter re-fits to view 0's bank first (as Engine::run).
  if (auto* cs = dynamic_cast<ClusterSampler*>(core_.sampler_.get()); cs && cs->due(core_.step_))
    cs->refresh(core_.bank_.view(), core_.step_);
  require_memory(mul_sat(mul_sat(views_n + 1, batch), mul_sat(dim, 4)),
                 fmt::format("the gradients of V = {} views (B x D = {} x {} floats each, plus one pair's)", views_n,
                             batch, dim));

  // The same negatives for every pair: Engine::sample at this counter (a query-dependent sampler:
  // each pair conditions it on its own query view inside compute_on, and on its bank for a ring).
  // Each pair's kernel draws them itself (a pure function of seed, counter, query row and id), as the
  // single-view step does (a block ahead of its gathers, or a chunk of queries ahead for a sampler
  // that draws_before_rows); a B x K array drawn first and read by every pair was measured slower
  // (2.49 x the single-view step for V = 2, against 2.0 x).

  // ---- every pair, in pair order: nothing of the engine or the caller's grads changes here
  std::vector<RowMatrixf> acc(static_cast<std::size_t>(views_n));   // dL/df^a, summed in pair order
  std::vector<RowMatrixf> unit(static_cast<std::size_t>(views_n));  // the engine's unit copies, when it normalises
  RowMatrixf g(batch, dim);
  std::vector<Partition> next = partitions_;
  MultiViewStats out;
  out.pairs.reserve(pairs_.size());
  // A loss-driven dynamic sampler sees each query's loss averaged over the pairs: one loss per row,
  // on the single-view step's scale.
  DynamicSampler* const driven = core_.loss_driven_sampler();
  std::vector<double> query_losses(driven ? static_cast<std::size_t>(batch) : 0, 0.0);
  for (std::size_t p = 0; p < pairs_.size(); ++p) {
    const auto a = static_cast<std::size_t>(pairs_[p].query);
    Engine::Computed c = core_.compute_on(bank(pairs_[p].bank), partitions_[p], features[a], ids, nullptr, g, false);
    for (std::size_t b = 0; b < query_losses.size(); ++b)
      query_losses[b] += c.query_losses[b] / static_cast<double>(pairs_.size());
    if (acc[a].size() == 0)
      acc[a] = g;
    else
      acc[a] += g;
    if (c.partition.initialised) {
      next[p].initialised = true;
      next[p].log_z = c.partition.log_z;
    }
    if (cfg.normalize_features && unit[a].size() == 0) unit[a] = std::move(c.normalized);
    out.loss += c.stats.loss;
    out.pairs.push_back(c.stats);
  }

  for (std::size_t b = 0; b < query_losses.size(); ++b)
    MEMBANK_CHECK(std::isfinite(query_losses[b]), "query {} (id {}) has loss {}: the loss_ema drive needs finite "
                  "per-query losses (nothing changed)", b, ids[b], query_losses[b]);
  // ---- commit: the grads, the banks (validated: only an allocation can still fail), then the Z
  // states and the counter. Every view queries in at least one pair, so every acc (and unit) is set.
  for (index_t v = 0; v < views_n; ++v) grads[static_cast<std::size_t>(v)] = acc[static_cast<std::size_t>(v)];
  if (update) {
    std::vector<FeaturesRef> rows;
    rows.reserve(static_cast<std::size_t>(views_n));
    for (index_t v = 0; v < views_n; ++v) {
      const auto i = static_cast<std::size_t>(v);
      if (cfg.normalize_features)
        rows.emplace_back(unit[i]);
      else
        rows.emplace_back(features[i]);
    }
    refresh(rows, ids);
  }
  partitions_ = std::move(next);
  ++core_.step_;
  if (driven != nullptr) {  // as Engine's step: the averages, the partial rebuild, the class masses
    driven->observe(ids, query_losses);
    core_.refresh_class_mass();
  }
  return out;
}

void MultiViewEngine::update(std::span<const FeaturesRef> features, IdsRef ids) {
  check_views(features, ids);
  detail::translate_bad_alloc("MultiViewEngine::update", [&] {
    const std::vector<index_t> id_copy(ids.begin(), ids.end());
    const index_t views_n = views();
    std::vector<detail::PreparedFeatures> prepared;
    prepared.reserve(static_cast<std::size_t>(views_n));
    for (index_t v = 0; v < views_n; ++v)
      prepared.push_back(detail::prepare_features(features[static_cast<std::size_t>(v)],
                                                  static_cast<index_t>(ids.size()), core_.bank().dim(), core_.config()));
    std::vector<FeaturesRef> rows;
    rows.reserve(prepared.size());
    for (const auto& p : prepared) rows.emplace_back(p.view());
    refresh(rows, id_copy);
  });
}

void MultiViewEngine::refresh(std::span<const FeaturesRef> unit, IdsRef ids) {
  const index_t views_n = views();
  const EngineConfig& cfg = core_.config();
  // Features that lie in any bank are copied before the first write: refreshing bank 0 must not
  // change features[1] = rows of bank 0 (momentum_update copies only what overlaps its own bank).
  std::vector<RowMatrixf> copies(static_cast<std::size_t>(views_n));
  for (index_t v = 0; v < views_n; ++v) {
    const FeaturesRef& f = unit[static_cast<std::size_t>(v)];
    for (index_t u = 0; u < views_n; ++u)
      if (bank(u).shares_memory_with(MemoryRegion::of_matrix(f))) {
        copies[static_cast<std::size_t>(v)] = f;
        break;
      }
  }
  for (index_t v = 0; v < views_n; ++v) {
    const auto i = static_cast<std::size_t>(v);
    bank_mut(v).momentum_update(ids, copies[i].size() ? FeaturesRef(copies[i]) : unit[i], cfg.momentum,
                                core_.steps_done(), cfg.rounding, cfg.seed);
  }
}

}  // namespace membank
