#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include "detail/check.hpp"
#include "detail/philox.hpp"

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>

namespace membank {

std::string to_string(SamplerKind kind) { return kind == SamplerKind::uniform ? "uniform" : "alias"; }

SamplerKind sampler_kind_from_string(const std::string& s) {
  if (s == "uniform") return SamplerKind::uniform;
  if (s == "alias") return SamplerKind::alias;
  MEMBANK_THROW("sampler = '{}': expected 'uniform' or 'alias'", s);
}

namespace {

constexpr int kMaxConsecutiveRejections = 1000000;

bool is_excluded(const Exclusion& excluded, index_t j) { return excluded.contains(j); }

/// Fills ids/log_pn from a stream; `one(stream_words, id&, log_p&)` makes one draw from fresh words.
/// Uniform draws need 64 bits, so one Philox block serves two; alias draws take a whole block.
template <int kDrawsPerBlock, class One>
void draw_loop(const StreamKey& key, const Exclusion& excluded, std::span<index_t> ids,
               std::span<float> log_pn, One&& one) {
  detail::Stream stream(key);
  r123::Philox4x32::ctr_type block{};
  int used = kDrawsPerBlock;
  const auto next = [&](index_t& id, float& p) {
    if (used == kDrawsPerBlock) {
      block = stream.next();
      used = 0;
    }
    one(block, used++, id, p);
  };
  for (std::size_t k = 0; k < ids.size(); ++k) {
    next(ids[k], log_pn[k]);
    int rejections = 0;
    while (is_excluded(excluded, ids[k])) {
      MEMBANK_CHECK(++rejections < kMaxConsecutiveRejections,
                    "{} consecutive noise draws hit excluded ids: the excluded ids carry almost all of "
                    "the sampler's mass", rejections);
      next(ids[k], log_pn[k]);
    }
  }
}

}  // namespace

bool Exclusion::contains(index_t j) const {
  if (classes != nullptr && classes[j] == cls) return true;
  if (ids.empty()) return false;
  if (ids.size() == 1) return ids[0] == j;
  return std::binary_search(ids.begin(), ids.end(), j);
}

UniformSampler::UniformSampler(index_t n) : NoiseSampler(n) {
  MEMBANK_CHECK(n >= 1, "n = {}: expected at least one instance", n);
}

double UniformSampler::prob(index_t j) const {
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  return 1.0 / static_cast<double>(n_);
}

std::vector<double> UniformSampler::probs() const {
  return std::vector<double>(static_cast<std::size_t>(n_), 1.0 / static_cast<double>(n_));
}

void UniformSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  std::fill_n(log_pn.begin(), ids.size(), static_cast<float>(-std::log(static_cast<double>(n_))));
}

void UniformSampler::draw(const StreamKey& key, const Exclusion& excluded, std::span<index_t> ids,
                          std::span<float> log_pn) const {
  const auto n = static_cast<std::uint64_t>(n_);
  const float p = static_cast<float>(-std::log(static_cast<double>(n_)));
  draw_loop<2>(key, excluded, ids, log_pn, [n, p](const auto& r, int half, index_t& id, float& pj) {
    const std::uint64_t u = half == 0 ? detail::join64(r.v[0], r.v[1]) : detail::join64(r.v[2], r.v[3]);
    id = static_cast<index_t>(detail::scale_to(u, n));
    pj = p;
  });
}

AliasSampler::AliasSampler(std::span<const double> weights)
    : NoiseSampler(static_cast<index_t>(weights.size())) {
  MEMBANK_CHECK(!weights.empty(), "weights is empty: expected one weight per instance");
  MEMBANK_CHECK(weights.size() < (std::size_t{1} << 32), "weights has {} entries: expected fewer than 2^32",
                weights.size());
  double total = 0.0;
  for (std::size_t j = 0; j < weights.size(); ++j) {
    MEMBANK_CHECK(std::isfinite(weights[j]) && weights[j] >= 0.0,
                  "weights[{}] = {}: expected a finite weight >= 0", j, weights[j]);
    total += weights[j];
  }
  MEMBANK_CHECK(total > 0.0 && std::isfinite(total), "weights sum to {}: expected a positive finite sum",
                total);

  // Vose's alias method: O(N). Scaled probabilities q_j = N p_j; cells with q < 1 ("small") are
  // topped up by a "large" cell, which becomes their alias.
  const std::size_t n = weights.size();
  w_.assign(weights.begin(), weights.end());
  p_.resize(n);
  cells_.resize(n);
  std::vector<double> q(n);
  std::vector<std::uint32_t> small, large;
  small.reserve(n);
  large.reserve(n);
  for (std::size_t j = 0; j < n; ++j) {
    p_[j] = weights[j] / total;
    q[j] = p_[j] * static_cast<double>(n);
    (q[j] < 1.0 ? small : large).push_back(static_cast<std::uint32_t>(j));
  }
  while (!small.empty() && !large.empty()) {
    const std::uint32_t s = small.back();
    small.pop_back();
    const std::uint32_t l = large.back();
    cells_[s].threshold = q[s];
    cells_[s].alias = l;
    q[l] = (q[l] + q[s]) - 1.0;
    if (q[l] < 1.0) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // What remains has q == 1 up to rounding: always keep the cell itself.
  for (const auto j : large) cells_[j] = {1.0, j, 0.0f, 0.0f};
  for (const auto j : small) cells_[j] = {1.0, j, 0.0f, 0.0f};
  for (std::size_t j = 0; j < n; ++j) {
    cells_[j].log_p_self = static_cast<float>(std::log(p_[j]));
    cells_[j].log_p_alias = static_cast<float>(std::log(p_[cells_[j].alias]));
  }
}

double AliasSampler::prob(index_t j) const {
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  return p_[static_cast<std::size_t>(j)];
}

std::vector<double> AliasSampler::probs() const { return p_; }

void AliasSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  for (std::size_t k = 0; k < ids.size(); ++k) log_pn[k] = cells_[static_cast<std::size_t>(ids[k])].log_p_self;
}

void AliasSampler::draw(const StreamKey& key, const Exclusion& excluded, std::span<index_t> ids,
                        std::span<float> log_pn) const {
  const auto n = static_cast<std::uint64_t>(n_);
  const Cell* cells = cells_.data();
  // A draw = one Philox block: 64 bits pick a cell, 53 bits toss its coin. Blocks 0..K-1 serve the
  // K draws in order; a draw rejected by the exclusion takes the next unused block (K, K+1, ...).
  // Cells are prefetched a few draws ahead: the table does not fit in cache for large N.
  constexpr std::size_t kAhead = 16;
  const std::size_t k = ids.size();
  detail::Stream stream(key);
  std::array<std::pair<std::uint64_t, double>, kAhead> ring;  // (cell, coin) of draws in flight
  const auto fresh = [&] {
    const auto r = stream.next();
    return std::pair{detail::scale_to(detail::join64(r.v[0], r.v[1]), n),
                     static_cast<double>(detail::join64(r.v[2], r.v[3]) >> 11) * 0x1.0p-53};
  };
  const auto resolve = [&](std::pair<std::uint64_t, double> d, index_t& id, float& p) {
    const Cell& c = cells[d.first];
    const bool keep = d.second < c.threshold;
    id = keep ? static_cast<index_t>(d.first) : static_cast<index_t>(c.alias);
    p = keep ? c.log_p_self : c.log_p_alias;
  };
  for (std::size_t j = 0; j < std::min(k, kAhead); ++j) {
    ring[j] = fresh();
    __builtin_prefetch(cells + ring[j].first);
  }
  for (std::size_t j = 0; j < k; ++j) {
    const auto d = ring[j % kAhead];
    if (j + kAhead < k) {
      ring[j % kAhead] = fresh();
      __builtin_prefetch(cells + ring[j % kAhead].first);
    }
    resolve(d, ids[j], log_pn[j]);
  }
  if (excluded.empty()) return;
  // Redraws, in draw order, from blocks K, K+1, ... of the same stream.
  for (std::size_t j = 0; j < k; ++j) {
    int rejections = 0;
    while (is_excluded(excluded, ids[j])) {
      MEMBANK_CHECK(++rejections < kMaxConsecutiveRejections,
                    "{} consecutive noise draws hit excluded ids: the excluded ids carry almost all of "
                    "the sampler's mass", rejections);
      resolve(fresh(), ids[j], log_pn[j]);
    }
  }
}

}  // namespace membank
