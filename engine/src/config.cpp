// Names of the engine's enumerations, EngineConfig's checks and the step's scratch size.
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "step_kernels.hpp"

#include <omp.h>

#include <cmath>
#include <limits>

namespace membank {

namespace {

struct ObjectiveName {
  Objective objective;
  const char* name;
};
// The registration of an objective's name (its computation: objectives/objectives.hpp).
constexpr ObjectiveName kObjectiveNames[] = {
    {Objective::nce, "nce"},         {Objective::info_nce, "infonce"},       {Objective::dcl, "dcl"},
    {Objective::hcl, "hcl"},         {Objective::dhel, "dhel"},              {Objective::kcl, "kcl"},
    {Objective::supcon, "supcon"},   {Objective::contrastive, "contrastive"}, {Objective::triplet, "triplet"},
    {Objective::full_softmax, "full"},
};

}  // namespace

std::string to_string(Objective o) {
  for (const auto& n : kObjectiveNames)
    if (n.objective == o) return n.name;
  return "?";
}

Objective objective_from_string(const std::string& s) {
  std::string names;
  for (const auto& n : kObjectiveNames) {
    if (s == n.name) return n.objective;
    names += names.empty() ? "" : ", ";
    names += n.name;
  }
  MEMBANK_THROW("objective = '{}': expected one of {}", s, names);
}

const std::vector<Objective>& all_objectives() {
  static const std::vector<Objective> all = [] {
    std::vector<Objective> v;
    for (const auto& n : kObjectiveNames) v.push_back(n.objective);
    return v;
  }();
  return all;
}

bool needs_labels(Objective o) {
  return o == Objective::supcon || o == Objective::contrastive || o == Objective::triplet;
}

bool reports_mi_bound(Objective o) {
  return o == Objective::info_nce || o == Objective::dcl || o == Objective::hcl;
}

bool needs_valid_noise(Objective o) {
  return o != Objective::contrastive && o != Objective::triplet && o != Objective::full_softmax;
}

std::string to_string(NegativesMode m) { return m == NegativesMode::per_sample ? "per-sample" : "shared"; }
std::string to_string(ZPolicy p) {
  switch (p) {
    case ZPolicy::first_batch: return "first_batch";
    case ZPolicy::ema: return "ema";
    case ZPolicy::fixed: return "fixed";
  }
  return "?";
}
NegativesMode negatives_mode_from_string(const std::string& s) {
  if (s == "per-sample") return NegativesMode::per_sample;
  if (s == "shared") return NegativesMode::shared;
  MEMBANK_THROW("negatives = '{}': expected per-sample or shared", s);
}
ZPolicy z_policy_from_string(const std::string& s) {
  if (s == "first_batch") return ZPolicy::first_batch;
  if (s == "ema") return ZPolicy::ema;
  if (s == "fixed") return ZPolicy::fixed;
  MEMBANK_THROW("z_policy = '{}': expected one of first_batch, ema, fixed", s);
}

std::string to_string(DType t) {
  switch (t) {
    case DType::float32: return "float32";
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
  }
  return "?";
}
DType dtype_from_string(const std::string& s) {
  if (s == "float32" || s == "fp32") return DType::float32;
  if (s == "float16" || s == "fp16" || s == "half") return DType::float16;
  if (s == "bfloat16" || s == "bf16") return DType::bfloat16;
  MEMBANK_THROW("dtype = '{}': expected float32, float16 or bfloat16", s);
}
std::string to_string(Rounding r) { return r == Rounding::nearest ? "nearest" : "stochastic"; }
Rounding rounding_from_string(const std::string& s) {
  if (s == "nearest") return Rounding::nearest;
  if (s == "stochastic") return Rounding::stochastic;
  MEMBANK_THROW("rounding = '{}': expected nearest or stochastic", s);
}

double EngineConfig::effective_margin() const {
  if (!std::isnan(margin)) return margin;
  return objective == Objective::triplet ? 0.2 : 1.0;
}

void EngineConfig::validate(index_t n, index_t dim) const {
  MEMBANK_CHECK(k >= 1, "config.k = {}: expected K >= 1 noise draws per query", k);
  if (dim >= 1)
    require_memory(step_scratch_bytes(*this, 1, dim, k, omp_get_max_threads()),
                   fmt::format("config.k = {}: one step's scratch for K = {} (D = {}, {} threads)", k, k, dim,
                               omp_get_max_threads()));
  MEMBANK_CHECK(k <= (index_t{1} << 31), "config.k = {}: expected K <= 2^31", k);
  MEMBANK_CHECK(!exclude_positive || k < n,
                "config.k = {} with exclude_positive: expected K < N = {} (K >= N leaves too few "
                "instances besides the positive)", k, n);
  MEMBANK_CHECK(std::isfinite(tau) && tau > 0.0, "config.tau = {}: expected a finite temperature > 0", tau);
  MEMBANK_CHECK(momentum >= 0.0 && momentum <= 1.0, "config.momentum = {}: expected 0 <= m <= 1", momentum);
  MEMBANK_CHECK(z_policy != ZPolicy::fixed || (std::isfinite(z_fixed) && z_fixed > 0.0),
                "config.z_fixed = {}: expected a finite Z > 0 with z_policy fixed", z_fixed);
  MEMBANK_CHECK(z_ema >= 0.0 && z_ema < 1.0, "config.z_ema = {}: expected 0 <= alpha < 1", z_ema);
  MEMBANK_CHECK(std::isfinite(unit_norm_tolerance) && unit_norm_tolerance > 0.0 && unit_norm_tolerance < 1.0,
                "config.unit_norm_tolerance = {}: expected 0 < tolerance < 1", unit_norm_tolerance);
  MEMBANK_CHECK(tau_plus >= 0.0 && tau_plus < 1.0, "config.tau_plus = {}: expected a class prior 0 <= tau+ < 1",
                tau_plus);
  MEMBANK_CHECK(std::isfinite(beta) && beta >= 0.0, "config.beta = {}: expected a finite beta >= 0", beta);
  MEMBANK_CHECK(std::isfinite(kernel_t) && kernel_t > 0.0, "config.kernel_t = {}: expected a finite t > 0",
                kernel_t);
  MEMBANK_CHECK(std::isfinite(gamma) && gamma >= 0.0, "config.gamma = {}: expected a finite gamma >= 0", gamma);
  MEMBANK_CHECK(std::isnan(margin) || (std::isfinite(margin) && margin >= 0.0),
                "config.margin = {}: expected a finite margin >= 0 (or NaN for the objective's default)", margin);
}

std::int64_t step_scratch_bytes(const EngineConfig& c, index_t batch, index_t dim, index_t k, int threads) {
  // Per query: its result (48 bytes) and log P_n(y) (4); normalising: a B x D copy and B norms.
  std::int64_t bytes = mul_sat(batch, 52);
  if (c.normalize_features) bytes = add_sat(bytes, mul_sat(batch, add_sat(mul_sat(dim, 4), 8)));
  if (c.objective == Objective::full_softmax) return bytes;  // full_softmax_loss checks its own
  // Per thread, every objective: a second accumulator row (4 D) and K + 1 weights (4 K + 4); an
  // objective that takes its positives first (triplet) also 6 (K + 2) doubles and 3 (K + 1) indices.
  std::int64_t per_thread = add_sat(mul_sat(dim, 4), add_sat(mul_sat(k, 4), 4));
  if (detail::takes_positives_first(c.objective))
    per_thread = add_sat(per_thread, add_sat(mul_sat(k, 72), 120));
  if (c.negatives == NegativesMode::per_sample)  // and K ids (8) and log P_n (4)
    return add_sat(bytes, mul_sat(threads, add_sat(per_thread, mul_sat(k, 12))));
  // shared, per thread: 2 ceil(K / 16) rescales; once: K ids, log P_n, log weights, classes (24 per
  // negative), the K x D rows and the B x K scores
  per_thread = add_sat(per_thread, mul_sat(k, 1));
  bytes = add_sat(bytes, mul_sat(threads, per_thread));
  bytes = add_sat(bytes, mul_sat(k, 24));
  bytes = add_sat(bytes, mul_sat(k, mul_sat(dim, 4)));
  return add_sat(bytes, mul_sat(batch, mul_sat(k, 4)));
}

double Partition::z() const {
  return initialised ? std::exp(log_z) : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace membank
