// DynamicSampler (dynamic_sampler.hpp): a blocked alias table whose blocks are rebuilt when their
// rows' weights change.
#include <membank/dynamic_sampler.hpp>
#include <membank/error.hpp>

#include "detail/check.hpp"
#include "detail/draw_checks.hpp"
#include "detail/philox.hpp"
#include "detail/prefetch.hpp"
#include "kernels/kernels.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

namespace membank {

namespace {


/// Vose's alias method over n entries of weights w (summing to `mass` > 0): threshold[i] and alias[i]
/// (an index in [0, n)) such that picking i uniformly and keeping it when a uniform coin falls below
/// threshold[i] (else taking alias[i]) draws i with probability w_i / mass. `small` and `large` are
/// scratch (kept by the caller so that rebuilding many blocks allocates nothing).
template <class SetCell>
void vose(std::span<const double> w, double mass, std::vector<std::uint32_t>& small, std::vector<std::uint32_t>& large,
          std::vector<double>& q, SetCell set) {
  const std::size_t n = w.size();
  small.clear();
  large.clear();
  q.resize(n);
  const double scale = static_cast<double>(n) / mass;
  for (std::size_t i = 0; i < n; ++i) {
    q[i] = w[i] * scale;
    if (q[i] >= 1.0) large.push_back(static_cast<std::uint32_t>(i));
  }
  // The zero-weight entries go on the stack last, so they are paired first, while a large entry is
  // certainly left: none can be left over below and be kept with probability one.
  for (std::size_t i = 0; i < n; ++i)
    if (q[i] < 1.0 && q[i] > 0.0) small.push_back(static_cast<std::uint32_t>(i));
  for (std::size_t i = 0; i < n; ++i)
    if (q[i] == 0.0) small.push_back(static_cast<std::uint32_t>(i));
  while (!small.empty() && !large.empty()) {
    const std::uint32_t s = small.back();
    small.pop_back();
    const std::uint32_t l = large.back();
    set(s, q[s], l);
    q[l] = (q[l] + q[s]) - 1.0;
    if (q[l] < 1.0) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // What remains has q == 1 up to rounding: keep the entry itself.
  for (const auto i : large) set(i, 1.0, i);
  for (const auto i : small) set(i, 1.0, i);
}

/// An index in [0, n) and a 53-bit coin from 64 random bits: the high word of u n picks the index
/// (Lemire's multiply-shift), the low word, uniform on a grid of step n / 2^64 within the index,
/// gives the coin. One Philox block thus serves both levels of a draw.
inline std::pair<std::uint64_t, double> index_and_coin(std::uint64_t u, std::uint64_t n) {
  const detail::uint128_t p = static_cast<detail::uint128_t>(u) * n;
  return {static_cast<std::uint64_t>(p >> 64), static_cast<double>(static_cast<std::uint64_t>(p) >> 11) * 0x1.0p-53};
}

void check_params(const DynamicSampler::Params& p) {
  MEMBANK_CHECK(p.drive == DynamicSampler::Drive::none || p.drive == DynamicSampler::Drive::loss_ema,
                "drive = {}: expected none or loss_ema", static_cast<int>(p.drive));
  MEMBANK_CHECK(p.alpha >= 0.0 && p.alpha < 1.0, "alpha = {}: expected 0 <= alpha < 1", p.alpha);
  MEMBANK_CHECK(std::isfinite(p.floor) && p.floor > 0.0, "floor = {}: expected a finite floor > 0", p.floor);
}

std::uint64_t mix(std::uint64_t h, std::uint64_t v) {
  // splitmix64's finaliser over h ^ v: every bit of v reaches every bit of the hash.
  std::uint64_t z = (h ^ v) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

DynamicSampler::DynamicSampler(std::span<const double> weights) : DynamicSampler(weights, Params{}, {}) {}

DynamicSampler::DynamicSampler(std::span<const double> weights, Params params)
    : DynamicSampler(weights, params, {}) {}

DynamicSampler::DynamicSampler(std::span<const double> weights, Params params, std::span<const double> ema)
    : NoiseSampler(static_cast<index_t>(weights.size())), params_(params) {
  MEMBANK_CHECK(!weights.empty(), "weights is empty: expected one weight per instance");
  MEMBANK_CHECK(weights.size() < (std::size_t{1} << 32), "weights has {} entries: expected fewer than 2^32",
                weights.size());
  for (std::size_t j = 0; j < weights.size(); ++j)
    MEMBANK_CHECK(std::isfinite(weights[j]) && weights[j] >= 0.0, "weights[{}] = {}: expected a finite weight >= 0",
                  j, weights[j]);
  check_params(params);
  if (params.drive == Drive::loss_ema) {
    MEMBANK_CHECK(ema.empty() || ema.size() == weights.size(), "ema has {} entries: expected none or N = {}",
                  ema.size(), weights.size());
    for (std::size_t j = 0; j < ema.size(); ++j)
      MEMBANK_CHECK(!std::isinf(ema[j]), "ema[{}] = {}: expected a finite average (or NaN: never seen)", j, ema[j]);
    if (ema.empty())
      ema_.assign(weights.size(), std::numeric_limits<double>::quiet_NaN());
    else
      ema_.assign(ema.begin(), ema.end());
  } else {
    MEMBANK_CHECK(ema.empty(), "ema has {} entries: expected none without the loss_ema drive", ema.size());
  }
  w_.assign(weights.begin(), weights.end());
  const index_t nb = (n_ + kBlock - 1) / kBlock;
  cells_.resize(static_cast<std::size_t>(n_));
  for (std::size_t j = 0; j < w_.size(); ++j) cells_[j] = {1.0, static_cast<std::uint32_t>(j), 0, std::log(w_[j]), 0.0};
  mass_.assign(static_cast<std::size_t>(nb), 0.0);
  for (index_t b = 0; b < nb; ++b) build_block(b);
  double total = 0.0;
  for (const double m : mass_) total += m;
  MEMBANK_CHECK(total > 0.0 && std::isfinite(total), "weights sum to {}: expected a positive finite sum", total);
  build_top();
}

void DynamicSampler::build_block(index_t b) {
  const index_t first = b * kBlock;
  const index_t rows = std::min(kBlock, n_ - first);
  const std::span<const double> w(w_.data() + first, static_cast<std::size_t>(rows));
  double mass = 0.0;
  for (const double x : w) mass += x;  // in row order: the block's mass is a function of its weights
  mass_[static_cast<std::size_t>(b)] = mass;
  // Each cell's log_w_self is already log w of its row (set by the constructor and by set_weights for
  // the rows it changes): a rebuild takes no logarithm of the unchanged rows.
  Cell* cells = cells_.data() + first;
  if (mass == 0.0) {
    // Never picked by the top level (its threshold there is 0 and no block aliases to it).
    for (index_t i = 0; i < rows; ++i) {
      cells[i].threshold = 1.0;
      cells[i].alias = static_cast<std::uint32_t>(first + i);
      cells[i].log_w_alias = cells[i].log_w_self;
    }
    return;
  }
  thread_local std::vector<std::uint32_t> small, large;
  thread_local std::vector<double> q;
  vose(w, mass, small, large, q, [&](std::uint32_t i, double threshold, std::uint32_t alias) {
    cells[i].threshold = threshold;
    cells[i].alias = static_cast<std::uint32_t>(first) + alias;
    cells[i].log_w_alias = cells[alias].log_w_self;
  });
}

void DynamicSampler::build_top() {
  double total = 0.0;
  for (const double m : mass_) total += m;  // in block order
  total_ = total;
  log_total_ = std::log(total);
  top_.resize(mass_.size());
  thread_local std::vector<std::uint32_t> small, large;  // kept: a call of set_weights allocates less
  thread_local std::vector<double> q;
  vose(mass_, total, small, large, q, [&](std::uint32_t i, double threshold, std::uint32_t alias) {
    top_[i] = {threshold, alias};
  });
}

double DynamicSampler::prob(index_t j) const {
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  return w_[static_cast<std::size_t>(j)] / total_;
}

std::vector<double> DynamicSampler::probs() const {
  std::vector<double> p(w_.size());
  for (std::size_t j = 0; j < p.size(); ++j) p[j] = w_[j] / total_;
  return p;
}

void DynamicSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  // log P_n = log w - log T in double, then fp32: the draws compute the same expression.
  for (std::size_t k = 0; k < ids.size(); ++k)
    log_pn[k] = static_cast<float>(cells_[static_cast<std::size_t>(ids[k])].log_w_self - log_total_);
}

void DynamicSampler::draw_next(DrawCursor& c, std::span<index_t> ids, std::span<float> log_pn) const {
  MEMBANK_CHECK(ids.size() == log_pn.size(), "a piece of {} draws with {} log P_n slots: expected as many of each",
                ids.size(), log_pn.size());
  MEMBANK_CHECK(c.drawn >= 0 && c.drawn <= c.total &&
                    static_cast<std::uint64_t>(ids.size()) <= static_cast<std::uint64_t>(c.total - c.drawn),
                "a piece of {} draws after {} of a stream of {}: expected at most {}", ids.size(), c.drawn, c.total,
                c.total - c.drawn);
  const auto nb = static_cast<std::uint64_t>(top_.size());
  const auto n = static_cast<std::uint64_t>(n_);
  const Cell* cells = cells_.data();
  const TopCell* top = top_.data();
  const double log_total = log_total_;
  // A draw = one Philox block, as AliasSampler's: draw d of the stream takes block d, and a draw
  // rejected by the exclusion takes the next unused block from `total` on. Words 0-1 pick a block
  // and toss its coin in the top table (small: in cache); words 2-3 pick a row of that block and toss
  // its coin.
  const auto fresh = [&](const r123::Philox4x32::ctr_type& r) {
    const auto [b0, coin0] = index_and_coin(detail::join64(r.v[0], r.v[1]), nb);
    const TopCell& t = top[b0];
    const std::uint64_t b = coin0 < t.threshold ? b0 : t.alias;
    const std::uint64_t first = b * static_cast<std::uint64_t>(kBlock);
    const auto [i, coin1] = index_and_coin(detail::join64(r.v[2], r.v[3]), std::min<std::uint64_t>(kBlock, n - first));
    return std::pair<std::uint64_t, double>{first + i, coin1};
  };
  const auto resolve = [&](std::pair<std::uint64_t, double> d, index_t& id, float& p) {
    const Cell& cell = cells[d.first];
    const bool keep = d.second < cell.threshold;
    id = keep ? static_cast<index_t>(d.first) : static_cast<index_t>(cell.alias);
    p = static_cast<float>((keep ? cell.log_w_self : cell.log_w_alias) - log_total);
  };
  // The blocks of a chunk come from the vectorised Philox at once; every draw of the chunk requests
  // its row's cell before any is read, so the cache misses overlap.
  constexpr std::size_t kChunk = 64;
  const std::size_t k = ids.size();
  const kernels::Table& kt = kernels::table();
  const detail::StreamCounter counter(c.key);
  std::array<std::uint32_t, 4 * kChunk> words;
  std::array<std::pair<std::uint64_t, double>, kChunk> picked;
  for (std::size_t t0 = 0; t0 < k; t0 += kChunk) {
    const std::size_t m = std::min(kChunk, k - t0);
    counter.blocks(kt, static_cast<std::uint64_t>(c.drawn) + t0, static_cast<std::int64_t>(m), words.data());
    for (std::size_t t = 0; t < m; ++t) {
      picked[t] = fresh({{words[t], words[m + t], words[2 * m + t], words[3 * m + t]}});
      detail::prefetch_line(cells + picked[t].first);
    }
    for (std::size_t t = 0; t < m; ++t) resolve(picked[t], ids[t0 + t], log_pn[t0 + t]);
  }
  detail::redraw_excluded(c, static_cast<std::uint64_t>(c.total), ids, log_pn,
                          [&](const r123::Philox4x32::ctr_type& r, index_t& id, float& lp) { resolve(fresh(r), id, lp); });
  c.drawn += static_cast<index_t>(k);
}

void DynamicSampler::set_weights(std::span<const index_t> ids, std::span<const double> values) {
  MEMBANK_CHECK(ids.size() == values.size(), "{} ids with {} weights: expected one weight per id", ids.size(),
                values.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    MEMBANK_CHECK(ids[k] >= 0 && ids[k] < n_, "ids[{}] = {} is out of range: expected 0 <= id < N = {}", k, ids[k],
                  n_);
    MEMBANK_CHECK(std::isfinite(values[k]) && values[k] >= 0.0,
                  "weights[{}] = {} (id {}): expected a finite weight >= 0", k, values[k], ids[k]);
  }
  if (ids.empty()) return;
  // The touched blocks, and the new sum computed exactly as build_block / build_top will (block
  // masses in row order, T in block order) before anything changes.
  std::vector<index_t> touched(ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) touched[k] = ids[k] / kBlock;
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  std::vector<double> old(ids.size());
  std::vector<double> fresh(touched.size());  // the touched blocks' new masses
  for (std::size_t k = 0; k < ids.size(); ++k) old[k] = w_[static_cast<std::size_t>(ids[k])];
  for (std::size_t k = 0; k < ids.size(); ++k) w_[static_cast<std::size_t>(ids[k])] = values[k];
  for (std::size_t t = 0; t < touched.size(); ++t) {
    const index_t b = touched[t];
    double m = 0.0;
    for (index_t j = b * kBlock; j < std::min(n_, (b + 1) * kBlock); ++j) m += w_[static_cast<std::size_t>(j)];
    fresh[t] = m;
  }
  double total = 0.0;
  for (std::size_t b = 0, t = 0; b < mass_.size(); ++b) {
    const bool hit = t < touched.size() && touched[t] == static_cast<index_t>(b);
    total += hit ? fresh[t++] : mass_[b];
  }
  if (!(total > 0.0 && std::isfinite(total))) {
    for (std::size_t k = ids.size(); k-- > 0;) w_[static_cast<std::size_t>(ids[k])] = old[k];
    MEMBANK_THROW("the new weights sum to {}: expected a positive finite sum (nothing changed)", total);
  }
  for (std::size_t k = 0; k < ids.size(); ++k) {
    const auto j = static_cast<std::size_t>(ids[k]);
    cells_[j].log_w_self = std::log(w_[j]);
  }
  for (const index_t b : touched) build_block(b);
  build_top();
}

void DynamicSampler::observe(std::span<const index_t> ids, std::span<const double> losses) {
  MEMBANK_CHECK(ids.size() == losses.size(), "{} ids with {} losses: expected one loss per id", ids.size(),
                losses.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    MEMBANK_CHECK(ids[k] >= 0 && ids[k] < n_, "ids[{}] = {} is out of range: expected 0 <= id < N = {}", k, ids[k],
                  n_);
    MEMBANK_CHECK(std::isfinite(losses[k]), "losses[{}] = {} (id {}): expected a finite loss", k, losses[k], ids[k]);
  }
  if (params_.drive == Drive::none || ids.empty()) return;
  std::vector<double> old(ids.size()), w(ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    double& e = ema_[static_cast<std::size_t>(ids[k])];
    old[k] = e;
    // In batch order: a row that appears twice averages both losses, the later one last.
    e = std::isnan(e) ? losses[k] : params_.alpha * e + (1.0 - params_.alpha) * losses[k];
  }
  for (std::size_t k = 0; k < ids.size(); ++k)
    w[k] = params_.floor + std::max(ema_[static_cast<std::size_t>(ids[k])], 0.0);
  try {
    set_weights(ids, w);
  } catch (...) {
    for (std::size_t k = ids.size(); k-- > 0;) ema_[static_cast<std::size_t>(ids[k])] = old[k];
    throw;
  }
}

std::uint64_t DynamicSampler::fingerprint() const {
  std::uint64_t h = mix(0, static_cast<std::uint64_t>(n_));
  for (const double x : w_) h = mix(h, std::bit_cast<std::uint64_t>(x));
  h = mix(h, static_cast<std::uint64_t>(params_.drive));
  h = mix(h, std::bit_cast<std::uint64_t>(params_.alpha));
  h = mix(h, std::bit_cast<std::uint64_t>(params_.floor));
  for (const double x : ema_) h = mix(h, std::bit_cast<std::uint64_t>(x));
  return h;
}

std::string to_string(DynamicSampler::Drive drive) {
  switch (drive) {
    case DynamicSampler::Drive::none: return "none";
    case DynamicSampler::Drive::loss_ema: return "loss_ema";
  }
  MEMBANK_THROW("DynamicSampler::Drive {}: not a drive", static_cast<int>(drive));
}

DynamicSampler::Drive dynamic_drive_from_string(const std::string& s) {
  for (const auto d : {DynamicSampler::Drive::none, DynamicSampler::Drive::loss_ema})
    if (s == to_string(d)) return d;
  MEMBANK_THROW("drive = '{}': expected 'none' or 'loss_ema'", s);
}

}  // namespace membank
