#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include "detail/check.hpp"
#include "detail/philox.hpp"
#include "detail/prefetch.hpp"
#include "kernels/kernels.hpp"

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>

namespace membank {

std::string to_string(SamplerKind kind) {
  switch (kind) {
    case SamplerKind::uniform: return "uniform";
    case SamplerKind::alias: return "alias";
    case SamplerKind::dynamic: return "dynamic";
    case SamplerKind::cluster: return "cluster";
  }
  MEMBANK_THROW("SamplerKind {}: not a sampler kind", static_cast<int>(kind));
}

SamplerKind sampler_kind_from_string(const std::string& s) {
  for (const SamplerKind k : {SamplerKind::uniform, SamplerKind::alias, SamplerKind::dynamic, SamplerKind::cluster})
    if (s == to_string(k)) return k;
  MEMBANK_THROW("sampler = '{}': expected 'uniform', 'alias', 'dynamic' or 'cluster'", s);
}

namespace {

constexpr int kMaxConsecutiveRejections = 1000000;

/// The draws of a piece must fit in what is left of its cursor's stream.
void check_piece(const DrawCursor& c, std::size_t draws, std::size_t log_pn_size) {
  MEMBANK_CHECK(draws == log_pn_size, "a piece of {} draws with {} log P_n slots: expected as many of each",
                draws, log_pn_size);
  MEMBANK_CHECK(c.drawn >= 0 && c.drawn <= c.total && static_cast<std::uint64_t>(draws) <= static_cast<std::uint64_t>(c.total - c.drawn),
                "a piece of {} draws after {} of a stream of {}: expected at most {}", draws, c.drawn, c.total,
                c.total - c.drawn);
}

/// One more rejection of the same draw; throws once there have been too many in a row.
void count_rejection(int& rejections) {
  MEMBANK_CHECK(++rejections < kMaxConsecutiveRejections,
                "{} consecutive noise draws hit excluded ids: the excluded ids carry almost all of the "
                "sampler's mass", rejections);
}

/// An alias draw from one Philox block: 64 bits pick a cell among n, 53 bits toss its coin.
std::pair<std::uint64_t, double> cell_and_coin(const r123::Philox4x32::ctr_type& r, std::uint64_t n) {
  return {detail::scale_to(detail::join64(r.v[0], r.v[1]), n),
          static_cast<double>(detail::join64(r.v[2], r.v[3]) >> 11) * 0x1.0p-53};
}

}  // namespace

bool Exclusion::contains(index_t j) const {
  if (classes != nullptr && classes[j] == cls) return true;
  if (ids.empty()) return false;
  if (ids.size() == 1) return ids[0] == j;
  return std::binary_search(ids.begin(), ids.end(), j);
}

std::unique_ptr<Conditioned> NoiseSampler::condition(const float*, index_t, index_t, index_t) const {
  MEMBANK_THROW("the {} sampler does not depend on the query: there is nothing to condition", to_string(kind()));
}

double NoiseSampler::prob_given(index_t, QueryRef) const {
  MEMBANK_THROW("the {} sampler does not depend on the query: expected a null QueryRef", to_string(kind()));
}

void NoiseSampler::lookup_given(QueryRef, std::span<const index_t>, std::span<float>) const {
  MEMBANK_THROW("the {} sampler does not depend on the query: expected a null QueryRef", to_string(kind()));
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

namespace {

/// The uniform stream's next ids.size() accepted draws into ids. A draw takes 64 bits: the two
/// halves of a Philox block serve two draws in turn, and a draw that hits an excluded id is skipped
/// for the next half. The blocks a piece needs are computed together, kChunk at a time, by the
/// vectorised kernel (words in four arrays: see kernels::Table). `excluded` is the cursor's
/// exclusion as a test the compiler can inline (none, one id, or Exclusion::contains).
template <class Excluded>
void draw_uniform(DrawCursor& c, std::uint64_t n, std::span<index_t> ids, Excluded excluded) {
  constexpr std::int64_t kChunk = 32;
  std::array<std::uint32_t, 4 * kChunk> words;
  const kernels::Table& kt = kernels::table();
  const detail::StreamCounter counter(c.key);
  const std::size_t k = ids.size();
  std::size_t done = 0;  // draws accepted so far
  int rejections = 0;    // consecutive ones
  const auto take = [&](std::uint64_t u) {
    const auto j = static_cast<index_t>(detail::scale_to(u, n));
    if (excluded(j)) {
      count_rejection(rejections);
      return;
    }
    rejections = 0;
    ids[done++] = j;
  };
  if (c.has_spare && done < k) {
    c.has_spare = false;
    take(c.spare);
  }
  while (done < k) {
    // The blocks still needed if no draw is rejected, up to kChunk.
    const auto still = static_cast<std::int64_t>((k - done + 1) / 2);
    const std::int64_t m = std::min(kChunk, std::max<std::int64_t>(still, 1));
    counter.blocks(kt, c.next_block, m, words.data());
    const auto word = [&](std::int64_t a) { return words[static_cast<std::size_t>(a)]; };
    for (std::int64_t b = 0; b < m && done < k; ++b) {
      ++c.next_block;
      take(detail::join64(word(b), word(m + b)));
      const std::uint64_t second = detail::join64(word(2 * m + b), word(3 * m + b));
      if (done < k) {
        take(second);
      } else {
        c.spare = second;
        c.has_spare = true;
      }
    }
  }
}

}  // namespace

void UniformSampler::draw_next(DrawCursor& c, std::span<index_t> ids, std::span<float> log_pn) const {
  check_piece(c, ids.size(), log_pn.size());
  const auto n = static_cast<std::uint64_t>(n_);
  const Exclusion& e = c.excluded;
  if (e.empty())
    draw_uniform(c, n, ids, [](index_t) { return false; });
  else if (e.classes == nullptr && e.ids.size() == 1)
    draw_uniform(c, n, ids, [y = e.ids[0]](index_t j) { return j == y; });
  else
    draw_uniform(c, n, ids, [&e](index_t j) { return e.contains(j); });
  std::fill(log_pn.begin(), log_pn.end(), static_cast<float>(-std::log(static_cast<double>(n_))));
  c.drawn += static_cast<index_t>(ids.size());
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

void AliasSampler::draw_next(DrawCursor& c, std::span<index_t> ids, std::span<float> log_pn) const {
  check_piece(c, ids.size(), log_pn.size());
  const auto n = static_cast<std::uint64_t>(n_);
  const Cell* cells = cells_.data();
  // A draw = one Philox block: 64 bits pick a cell, 53 bits toss its coin. Blocks 0..total-1 serve
  // the draws in order; a draw rejected by the exclusion takes the next unused block (total,
  // total + 1, ...), in draw order. Cells are prefetched a few draws ahead: the table does not fit in
  // cache for large N.
  constexpr std::size_t kAhead = 16;
  const std::size_t k = ids.size();
  detail::Stream stream(c.key, static_cast<std::uint64_t>(c.drawn));
  std::array<std::pair<std::uint64_t, double>, kAhead> ring;  // (cell, coin) of draws in flight
  const auto fresh = [&] { return cell_and_coin(stream.next(), n); };
  const auto resolve = [&](std::pair<std::uint64_t, double> d, index_t& id, float& p) {
    const Cell& cell = cells[d.first];
    const bool keep = d.second < cell.threshold;
    id = keep ? static_cast<index_t>(d.first) : static_cast<index_t>(cell.alias);
    p = keep ? cell.log_p_self : cell.log_p_alias;
  };
  for (std::size_t j = 0; j < std::min(k, kAhead); ++j) {
    ring[j] = fresh();
    detail::prefetch_line(cells + ring[j].first);
  }
  for (std::size_t j = 0; j < k; ++j) {
    const auto d = ring[j % kAhead];
    if (j + kAhead < k) {
      ring[j % kAhead] = fresh();
      detail::prefetch_line(cells + ring[j % kAhead].first);
    }
    resolve(d, ids[j], log_pn[j]);
  }
  if (!c.excluded.empty()) {
    detail::Stream redraw(c.key, static_cast<std::uint64_t>(c.total) + c.redraws);
    for (std::size_t j = 0; j < k; ++j) {
      for (int rejections = 0; c.excluded.contains(ids[j]);) {
        count_rejection(rejections);
        ++c.redraws;
        resolve(cell_and_coin(redraw.next(), n), ids[j], log_pn[j]);
      }
    }
  }
  c.drawn += static_cast<index_t>(k);
}

}  // namespace membank
