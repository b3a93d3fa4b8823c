// RingSampler: each query's ring of neighbours in the bank, and uniform draws from it.
// The definitions are in membank/ring_sampler.hpp.
#include <membank/error.hpp>
#include <membank/linalg.hpp>
#include <membank/ring_sampler.hpp>

#include "detail/check.hpp"
#include "detail/draw_checks.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "kernels/kernels.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>

namespace membank {

void RingConfig::validate(index_t n) const {
  MEMBANK_CHECK(lower >= 0 && lower < n, "lower = {}: expected a rank 0 <= lower < N = {}", lower, n);
  MEMBANK_CHECK(upper > lower && upper <= n, "upper = {}: expected lower = {} < upper <= N = {}", upper, lower, n);
}

namespace {

constexpr index_t kQueryTile = 16;     // queries scored together (fixed: any thread count)
constexpr index_t kBankBlock = 1024;   // bank rows widened and scored at once

/// Sort keys of a query's scores: ascending key = descending score, equal scores by ascending id.
/// The score's bits are mapped to an unsigned integer in the order of the floats (-0 is taken as +0)
/// and complemented; the id fills the low half.
std::uint64_t rank_key(float score, std::uint32_t id) {
  const auto bits = std::bit_cast<std::uint32_t>(score + 0.0f);
  const std::uint32_t ordered = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<std::uint64_t>(~ordered) << 32) | id;
}

/// One batch's rings: row i's M ids ascending at members[i M, (i + 1) M), and how many of the B
/// rings hold each row (the batch mean's q(j) = count[j] / (B M)).
struct RingBatch final : Conditioned {
  index_t batch = 0, m = 0;
  std::vector<std::uint32_t> members;
  std::vector<std::uint32_t> count;
  std::span<const std::uint32_t> ring(index_t i) const {
    return {members.data() + i * m, static_cast<std::size_t>(m)};
  }
};

const RingBatch& batch_of(QueryRef q, index_t m) {
  const auto* b = dynamic_cast<const RingBatch*>(q.batch);
  MEMBANK_CHECK(b != nullptr && b->m == m, "the QueryRef was not conditioned by this ring sampler");
  MEMBANK_CHECK(q.row >= 0 && q.row <= b->batch, "QueryRef row {}: expected 0 <= row <= B = {} (B queries and "
                "their mean)", q.row, b->batch);
  return *b;
}

}  // namespace

RingSampler::RingSampler(index_t n, RingConfig config) : NoiseSampler(n), config_(config) {
  MEMBANK_CHECK(n >= 1 && n < (index_t{1} << 32), "n = {}: expected 1 <= N < 2^32", n);
  config_.validate(n);
}

double RingSampler::prob(index_t j) const { return UniformSampler(n_).prob(j); }

std::vector<double> RingSampler::probs() const { return UniformSampler(n_).probs(); }

void RingSampler::lookup(std::span<const index_t> ids, std::span<float> log_pn) const {
  UniformSampler(n_).lookup(ids, log_pn);
}

std::span<const std::uint32_t> RingSampler::ring(QueryRef query) const {
  const RingBatch& b = batch_of(query, config_.upper - config_.lower);
  MEMBANK_CHECK(query.row < b.batch, "QueryRef row {} is the batch's mean: expected a query row < B = {}", query.row,
                b.batch);
  return b.ring(query.row);
}

double RingSampler::prob_given(index_t j, QueryRef query) const {
  const RingBatch& b = batch_of(query, config_.upper - config_.lower);
  MEMBANK_CHECK(j >= 0 && j < n_, "j = {} is out of range: expected 0 <= j < N = {}", j, n_);
  const auto m = static_cast<double>(b.m);
  if (query.row == b.batch)
    return static_cast<double>(b.count[static_cast<std::size_t>(j)]) / (static_cast<double>(b.batch) * m);
  const auto r = b.ring(query.row);
  return std::binary_search(r.begin(), r.end(), static_cast<std::uint32_t>(j)) ? 1.0 / m : 0.0;
}

void RingSampler::lookup_given(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const {
  const RingBatch& b = batch_of(query, config_.upper - config_.lower);
  const double log_m = std::log(static_cast<double>(b.m));
  const double log_bm = std::log(static_cast<double>(b.batch)) + log_m;
  constexpr float kNever = -std::numeric_limits<float>::infinity();
  if (query.row == b.batch) {
    for (std::size_t t = 0; t < ids.size(); ++t) {
      const std::uint32_t c = b.count[static_cast<std::size_t>(ids[t])];
      log_pn[t] = c == 0 ? kNever : static_cast<float>(std::log(static_cast<double>(c)) - log_bm);
    }
    return;
  }
  const auto r = b.ring(query.row);
  for (std::size_t t = 0; t < ids.size(); ++t)
    log_pn[t] = std::binary_search(r.begin(), r.end(), static_cast<std::uint32_t>(ids[t])) ? static_cast<float>(-log_m)
                                                                                            : kNever;
}

std::unique_ptr<Conditioned> RingSampler::condition(const BankView& bank, const float* f, index_t stride,
                                                    index_t batch, index_t dim) const {
  MEMBANK_CHECK(bank.rows == n_, "the bank has N = {} rows: expected the sampler's N = {}", bank.rows, n_);
  MEMBANK_CHECK(batch >= 1, "batch = {}: expected at least one query", batch);
  MEMBANK_CHECK(dim == bank.dim, "the queries have D = {}: expected the bank's D = {}", dim, bank.dim);
  MEMBANK_CHECK(stride >= dim, "stride = {}: expected at least D = {}", stride, dim);
  for (index_t i = 0; i < batch; ++i)
    for (index_t e = 0; e < dim; ++e)
      MEMBANK_CHECK(std::isfinite(f[i * stride + e]), "f({}, {}) = {}: expected finite features", i, e,
                    f[i * stride + e]);
  const index_t n = n_, m = config_.upper - config_.lower;
  auto out = std::make_unique<RingBatch>();
  RingBatch& b = *out;
  b.batch = batch;
  b.m = m;
  b.members.resize(static_cast<std::size_t>(batch * m));
  b.count.assign(static_cast<std::size_t>(n), 0u);
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> block, scores;
    std::vector<std::uint64_t> keys;
    errors.run([&] {
      block.resize(static_cast<std::size_t>(kBankBlock * dim));
      scores.resize(static_cast<std::size_t>(kQueryTile * n));
      keys.resize(static_cast<std::size_t>(n));
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t i0 = 0; i0 < batch; i0 += kQueryTile) {
      errors.run([&] {
        const index_t rows = std::min(kQueryTile, batch - i0);
        for (index_t r0 = 0; r0 < n; r0 += kBankBlock) {
          const index_t count = std::min(kBankBlock, n - r0);
          bank.widen_rows(r0, count, block.data(), dim);
          matmul(rows, count, dim, f + i0 * stride, stride, block.data(), dim, true, scores.data() + r0, n);
        }
        for (index_t r = 0; r < rows; ++r) {
          const float* s = scores.data() + r * n;
          for (index_t j = 0; j < n; ++j)
            keys[static_cast<std::size_t>(j)] = rank_key(s[j], static_cast<std::uint32_t>(j));
          // Ranks [0, upper) first, then [lower, upper) of them: the ring.
          const auto first = keys.begin();
          if (config_.upper < n) std::nth_element(first, first + config_.upper, keys.end());
          if (config_.lower > 0) std::nth_element(first, first + config_.lower, first + config_.upper);
          std::uint32_t* ring = b.members.data() + (i0 + r) * m;
          for (index_t t = 0; t < m; ++t)
            ring[t] = static_cast<std::uint32_t>(keys[static_cast<std::size_t>(config_.lower + t)]);
          std::sort(ring, ring + m);
        }
      });
    }
  }
  errors.rethrow("the ring sampler's conditioning");
  for (const std::uint32_t j : b.members) ++b.count[j];
  return out;
}

void RingSampler::draw_next(DrawCursor& cur, std::span<index_t> ids, std::span<float> log_pn) const {
  detail::check_piece(cur, ids.size(), log_pn.size());
  const index_t m = config_.upper - config_.lower;
  const RingBatch* b = cur.query.batch ? &batch_of(cur.query, m) : nullptr;
  const bool mean = b && cur.query.row == b->batch;
  // The range a draw's 64 bits are scaled to: N (no query), M (one query's ring), or B M (the mean:
  // a query and a member of its ring at once).
  const auto range = static_cast<std::uint64_t>(!b ? n_ : mean ? b->batch * m : m);
  const std::uint32_t* ring = b && !mean ? b->members.data() + cur.query.row * m : nullptr;
  const float log_uniform = static_cast<float>(-std::log(static_cast<double>(range)));
  const double log_bm = b ? std::log(static_cast<double>(b->batch) * static_cast<double>(m)) : 0.0;
  const auto one = [&](std::uint32_t hi, std::uint32_t lo, index_t& id, float& lp) {
    const std::uint64_t at = detail::scale_to(detail::join64(hi, lo), range);
    if (!b) {
      id = static_cast<index_t>(at);
      lp = log_uniform;
    } else if (!mean) {
      id = ring[at];
      lp = log_uniform;
    } else {
      id = b->members[at];
      lp = static_cast<float>(std::log(static_cast<double>(b->count[static_cast<std::size_t>(id)])) - log_bm);
    }
  };
  const kernels::Table& kt = kernels::table();
  const detail::StreamCounter counter(cur.key);
  constexpr std::size_t kChunk = 64;  // draws per vectorised Philox call
  std::array<std::uint32_t, 4 * kChunk> words;
  const std::size_t k = ids.size();
  for (std::size_t t0 = 0; t0 < k; t0 += kChunk) {
    const std::size_t c = std::min(kChunk, k - t0);
    counter.blocks(kt, static_cast<std::uint64_t>(cur.drawn) + t0, static_cast<std::int64_t>(c), words.data());
    for (std::size_t t = 0; t < c; ++t) one(words[t], words[c + t], ids[t0 + t], log_pn[t0 + t]);
  }
  if (!cur.excluded.empty()) {
    detail::Stream redraw(cur.key, static_cast<std::uint64_t>(cur.total) + cur.redraws);
    for (std::size_t t = 0; t < k; ++t) {
      for (int rejections = 0; cur.excluded.contains(ids[t]);) {
        detail::count_rejection(rejections);
        ++cur.redraws;
        const auto r = redraw.next();
        one(r.v[0], r.v[1], ids[t], log_pn[t]);
      }
    }
  }
  cur.drawn += static_cast<index_t>(k);
}

}  // namespace membank
