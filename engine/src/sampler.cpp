#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include "detail/check.hpp"
#include "detail/draw_checks.hpp"
#include "detail/philox.hpp"
#include "detail/prefetch.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <new>
#include <utility>

namespace membank {

std::string to_string(SamplerKind kind) {
  switch (kind) {
    case SamplerKind::uniform: return "uniform";
    case SamplerKind::alias: return "alias";
    case SamplerKind::dynamic: return "dynamic";
    case SamplerKind::cluster: return "cluster";
    case SamplerKind::ring: return "ring";
  }
  MEMBANK_THROW("SamplerKind {}: not a sampler kind", static_cast<int>(kind));
}

SamplerKind sampler_kind_from_string(const std::string& s) {
  for (const SamplerKind k :
       {SamplerKind::uniform, SamplerKind::alias, SamplerKind::dynamic, SamplerKind::cluster, SamplerKind::ring})
    if (s == to_string(k)) return k;
  MEMBANK_THROW("sampler = '{}': expected 'uniform', 'alias', 'dynamic', 'cluster' or 'ring'", s);
}

namespace {

using detail::check_piece;
using detail::count_rejection;

}  // namespace

bool Exclusion::contains(index_t j) const {
  if (classes != nullptr && classes[j] == cls) return true;
  if (ids.empty()) return false;
  if (ids.size() == 1) return ids[0] == j;
  return std::binary_search(ids.begin(), ids.end(), j);
}

std::unique_ptr<Conditioned> NoiseSampler::condition(const BankView&, const float*, index_t, index_t,
                                                     index_t) const {
  MEMBANK_THROW("the {} sampler does not depend on the query: there is nothing to condition", to_string(kind()));
}

void NoiseSampler::class_mass_given(const Conditioned&, const std::int32_t*, index_t, std::span<const std::int32_t>,
                                    std::span<double>) const {
  MEMBANK_THROW("the {} sampler cannot condition on a query's label (exclude_same_label): not supported",
                to_string(kind()));
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

namespace detail {

void* allocate_large(std::size_t bytes) {
  constexpr std::size_t kHugePage = std::size_t{2} << 20;
  if (bytes < kHugePage) {
    void* p = std::malloc(std::max<std::size_t>(bytes, 1));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  const std::size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (p == nullptr) throw std::bad_alloc();
  madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
  return p;
}

void free_large(void* p) noexcept { std::free(p); }

}  // namespace detail

namespace {

/// T = 2^53 - 1 with the cell as its own alias: both outcomes of the coin return the cell.
constexpr std::uint32_t kKeepHi = 0xFFFFFFFFu;
constexpr std::uint32_t kKeepLo = (1u << 21) - 1;

/// Below this many instances the constructor's per-instance passes run on one thread.
constexpr std::size_t kParallelBuild = std::size_t{1} << 15;

}  // namespace

AliasSampler::AliasSampler(std::span<const double> weights)
    : NoiseSampler(static_cast<index_t>(weights.size())) {
  MEMBANK_CHECK(!weights.empty(), "weights is empty: expected one weight per instance");
  MEMBANK_CHECK(weights.size() < (std::size_t{1} << 32), "weights has {} entries: expected fewer than 2^32",
                weights.size());
  // Summed in index order on one thread: the total, and so every bit of the table, does not depend
  // on the thread count. Compensated (Neumaier): the table hands out exactly 1 in all, and whatever
  // sum(P_n) misses 1 by lands on the cell left over at the end of the pairing (below).
  double total = 0.0, lost = 0.0;  // `lost`: what rounding has dropped from `total`
  for (std::size_t j = 0; j < weights.size(); ++j) {
    const double x = weights[j];
    MEMBANK_CHECK(std::isfinite(x) && x >= 0.0, "weights[{}] = {}: expected a finite weight >= 0", j, x);
    const double t = total + x;
    lost += total >= x ? (total - t) + x : (x - t) + total;
    total = t;
  }
  if (std::isfinite(total)) total += lost;
  MEMBANK_CHECK(total > 0.0 && std::isfinite(total), "weights sum to {}: expected a positive finite sum",
                total);

  // Vose's alias method with scaled probabilities q_j = N p_j: a cell with q < 1 ("small") is topped
  // up by a "large" one (q >= 1), which becomes its alias and gives up 1 - q of its own.
  const std::size_t n = weights.size();
  w_.resize(n);
  p_.resize(n);
  cells_.resize(n);
  threshold_lo_.resize(n);
  // p_ holds q = N p while the cells are paired, and P_n after: one array fewer to fault in (fresh
  // pages, not arithmetic, were most of the build's time).
  double* const q = p_.data();
  // Per instance (so the same for any thread count): the weights, P_n and log P_n -- one logarithm
  // per instance; an alias's is copied from its own cell below -- every cell its own alias, and bit
  // j % 64 of small_bits[j / 64] set when cell j is small. A thread takes whole words of 64 cells.
  const std::size_t words = (n + 63) / 64;
  Array<std::uint64_t> small_bits(words);
  const auto nd = static_cast<double>(n);
  const auto nw = static_cast<std::int64_t>(words);
#pragma omp parallel for schedule(static) if (n >= kParallelBuild)
  for (std::int64_t w = 0; w < nw; ++w) {
    const std::size_t j0 = static_cast<std::size_t>(w) * 64, j1 = std::min(n, j0 + 64);
    std::uint64_t bits = 0;
    for (std::size_t j = j0; j < j1; ++j) {
      w_[j] = weights[j];
      const double p = weights[j] / total;
      q[j] = p * nd;
      bits |= std::uint64_t{q[j] < 1.0} << (j - j0);
      const auto log_p = static_cast<float>(std::log(p));
      cells_[j] = {kKeepHi, static_cast<std::uint32_t>(j), log_p, log_p};
      threshold_lo_[j] = kKeepLo;
    }
    small_bits[static_cast<std::size_t>(w)] = bits;
  }

  // The pairing, by two forward sweeps instead of Vose's stacks (whose pushes and pops land all over
  // the arrays: cache misses that made the build superlinear in N). `small` walks the cells that
  // start small, `large` those that start large, each in index order, so that memory is read
  // sequentially; `rest` is what the current large cell has left (in a register, not in q). Each
  // small cell takes 1 - q from the current large one; once that has less than 1 left, it is small
  // in turn and is paired at once with the next large cell. The walks find the next cell of their
  // kind a word of small_bits at a time (the kinds interleave at random: a test per cell would
  // mispredict about every other cell).
  const auto next = [&](std::size_t from, bool want_small) {
    std::size_t w = from / 64;
    if (w >= words) return n;
    const auto kind = [&](std::size_t i) { return want_small ? small_bits[i] : ~small_bits[i]; };
    std::uint64_t bits = kind(w) & (~std::uint64_t{0} << (from % 64));
    while (bits == 0) {
      if (++w == words) return n;
      bits = kind(w);
    }
    return std::min(n, w * 64 + static_cast<std::size_t>(std::countr_zero(bits)));  // past n: none
  };
  // Cell s keeps itself when the 53-bit coin c < T = ceil(q_s 2^53) (that is, c 2^-53 < q_s, as the
  // coin was compared before the table was split into 16-byte cells); T <= 2^53 - 1 as q_s < 1.
  const auto pair = [&](std::size_t s, double q_s, std::size_t l) {
    const auto t = static_cast<std::uint64_t>(std::ceil(q_s * 0x1.0p53));
    cells_[s].threshold_hi = static_cast<std::uint32_t>(t >> 21);
    threshold_lo_[s] = static_cast<std::uint32_t>(t) & kKeepLo;
    cells_[s].alias = static_cast<std::uint32_t>(l);
    cells_[s].log_p_alias = cells_[l].log_p_self;
  };
  std::size_t small = next(0, true), large = next(0, false);
  double rest = large < n ? q[large] : 0.0;  // what the current large cell has left
  while (large < n) {
    if (rest < 1.0) {  // the large cell has become small
      const std::size_t l = next(large + 1, false);
      if (l == n) break;
      pair(large, rest, l);
      rest = (q[l] + rest) - 1.0;
      large = l;
    } else {
      if (small == n) break;
      pair(small, q[small], large);
      rest = (rest + q[small]) - 1.0;
      small = next(small + 1, true);
    }
  }
  // What is left unpaired has q == 1 up to rounding: it keeps its own cell (set above). That cell
  // takes up what sum(P_n) misses 1 by (at most about 2^-53: one rounding of the total) and the
  // updates' rounding errors, which pass down the chain of large cells.
#pragma omp parallel for schedule(static) if (n >= kParallelBuild)
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(n); ++i)
    p_[static_cast<std::size_t>(i)] = weights[static_cast<std::size_t>(i)] / total;
}

double AliasSampler::prob(index_t j) const {
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  return p_[static_cast<std::size_t>(j)];
}

std::vector<double> AliasSampler::probs() const { return {p_.begin(), p_.end()}; }

double AliasSampler::keep_probability(index_t j) const {
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  const auto i = static_cast<std::size_t>(j);
  const std::uint64_t t = (std::uint64_t{cells_[i].threshold_hi} << 21) | threshold_lo_[i];
  return static_cast<double>(t) * 0x1.0p-53;
}

void AliasSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  for (std::size_t k = 0; k < ids.size(); ++k) log_pn[k] = cells_[static_cast<std::size_t>(ids[k])].log_p_self;
}

namespace {

/// Alias draws are made kChunk Philox blocks at a time.
constexpr std::int64_t kAliasChunk = 64;

/// The blocks that the last AliasSampler::draw_next on this thread made ahead of its piece (see
/// there), with the stream and the first block they belong to. Blocks are a pure function of that
/// tag, so any cursor of the same stream may take them, whatever sampler it draws from.
struct MadeAhead {
  std::array<std::uint32_t, 6> stream{};  ///< the StreamCounter's key and counter words (block word 0)
  std::uint64_t first = 0;                ///< the first block
  std::int64_t m = 0;                     ///< blocks held (0: none)
  std::array<std::uint32_t, 4 * kAliasChunk> words;  ///< word w of block first + i at w m + i
};
thread_local MadeAhead made_ahead;

std::array<std::uint32_t, 6> stream_tag(const detail::StreamCounter& counter) {
  const auto key = counter.key();
  const auto ctr = counter.counter(0);
  return {key.v[0], key.v[1], ctr.v[0], ctr.v[1], ctr.v[2], ctr.v[3]};
}

}  // namespace

void AliasSampler::draw_next(DrawCursor& c, std::span<index_t> ids, std::span<float> log_pn) const {
  check_piece(c, ids.size(), log_pn.size());
  const auto n = static_cast<std::uint64_t>(n_);
  const Cell* const cells = cells_.data();
  const std::uint32_t* const lo = threshold_lo_.data();
  // A draw = one Philox block (words w0..w3): join64(w0, w1) picks a cell, the 53-bit coin
  // join64(w2, w3) >> 11 -- upper 32 bits w2, lower 21 bits w3 >> 11 -- is compared with the cell's
  // threshold. Blocks 0..total-1 serve the draws in order; a draw rejected by the exclusion takes
  // the next unused block (total, total + 1, ...), in draw order.
  const auto cell_of = [n](std::uint32_t w0, std::uint32_t w1) {
    return detail::scale_to(detail::join64(w0, w1), n);
  };
  const auto resolve = [&](std::uint64_t j, std::uint32_t w2, std::uint32_t w3, index_t& id, float& p) {
    const Cell& cell = cells[j];
    bool keep = w2 < cell.threshold_hi;
    if (w2 == cell.threshold_hi) [[unlikely]]  // once in 2^32 draws: the lower bits decide
      keep = (w3 >> 11) < lo[j];
    id = keep ? static_cast<index_t>(j) : static_cast<index_t>(cell.alias);
    p = keep ? cell.log_p_self : cell.log_p_alias;
  };
  // The blocks are made kAliasChunk at a time by the vectorised kernel, one chunk ahead of the one
  // resolved, and the cells of that chunk are prefetched: the table does not fit in cache for large
  // N, and a cell read that misses would hold up the row read that waits on its id. A next cell is
  // requested at each draw resolved, not the chunk's 64 at once: a core holds only a few dozen
  // lines in flight, and a burst stalls it until there is room (a draw alone 8.2 to 8.5 ns before,
  // 6.9 to 7.0 after; the step 1.85 to 1.94 x its floor before, 1.76 to 1.80 after, builds
  // alternated). After the piece's last chunk, the draws that follow it (as many as this piece had,
  // up to a chunk) are made and their cells prefetched too: the engine draws a piece just before it
  // requests the piece's rows, so the next piece finds its cells in cache. Those blocks are kept for
  // this thread's next call (made_ahead), which takes them if it continues the same stream with a
  // chunk of that size (the engine's pieces are one chunk): a block is then made once, not twice --
  // making the blocks was most of a draw's work with the table in cache.
  constexpr std::int64_t kChunk = kAliasChunk;
  std::array<std::array<std::uint32_t, 4 * kChunk>, 2> words;
  const kernels::Table& kt = kernels::table();
  const detail::StreamCounter counter(c.key);
  const std::array<std::uint32_t, 6> tag = stream_tag(counter);
  const auto first = static_cast<std::uint64_t>(c.drawn);
  const auto k = static_cast<std::int64_t>(ids.size());
  const auto after = std::min({kChunk, k, static_cast<std::int64_t>(c.total - c.drawn) - k});
  // The blocks of draws [at, at + m) into w (word v of draw at + i at w[v m + i]).
  const auto make = [&](std::int64_t at, std::int64_t m, std::uint32_t* w) {
    counter.blocks(kt, first + static_cast<std::uint64_t>(at), m, w);
  };
  // Requests the cell of draw i of the m whose blocks are in w.
  const auto request_cell = [&](const std::uint32_t* w, std::int64_t m, std::int64_t i) {
    detail::prefetch_line(cells + cell_of(w[i], w[m + i]));
  };
  MadeAhead& ahead = made_ahead;
  std::int64_t m = std::min(kChunk, k);
  if (m > 0) {
    if (ahead.m == m && ahead.first == first && ahead.stream == tag)
      std::copy_n(ahead.words.begin(), 4 * m, words[0].begin());
    else {
      make(0, m, words[0].data());
      for (std::int64_t i = 0; i < m; ++i) request_cell(words[0].data(), m, i);
    }
  }
  for (std::int64_t at = 0, chunk = 0; at < k; ++chunk) {
    const std::size_t b = static_cast<std::size_t>(chunk) & 1;
    const std::int64_t next = at + m;
    const std::int64_t m_next = next < k ? std::min(kChunk, k - next) : after;
    if (next < k) {
      make(next, m_next, words[b ^ 1].data());
    } else if (m_next > 0) {
      make(next, m_next, ahead.words.data());
      ahead.stream = tag;
      ahead.first = first + static_cast<std::uint64_t>(next);
      ahead.m = m_next;
    }
    const std::uint32_t* const w = words[b].data();
    const std::uint32_t* const wn = next < k ? words[b ^ 1].data() : ahead.words.data();
    for (std::int64_t i = 0; i < m; ++i) {
      if (i < m_next) request_cell(wn, m_next, i);
      const auto d = static_cast<std::size_t>(at + i);
      resolve(cell_of(w[i], w[m + i]), w[2 * m + i], w[3 * m + i], ids[d], log_pn[d]);
    }
    for (std::int64_t i = m; i < m_next; ++i) request_cell(wn, m_next, i);
    at = next;
    m = m_next;
  }
  detail::redraw_excluded(c, static_cast<std::uint64_t>(c.total), ids, log_pn,
                          [&](const r123::Philox4x32::ctr_type& r, index_t& id, float& lp) {
                            resolve(cell_of(r.v[0], r.v[1]), r.v[2], r.v[3], id, lp);
                          });
  c.drawn += static_cast<index_t>(k);
}

}  // namespace membank
