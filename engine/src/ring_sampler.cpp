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
#include <unordered_map>

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

/// Buckets of a radix select over scores: score s falls in bucket floor((1 - s) 2^11), clamped to
/// [0, 2^12): non-increasing in s, so a lower bucket holds only higher scores, equal scores share one.
constexpr int kBuckets = 1 << 12;
std::uint16_t bucket_of(float score) {
  const float b = std::floor((1.0f - score) * 2048.0f);
  return static_cast<std::uint16_t>(std::clamp(b, 0.0f, static_cast<float>(kBuckets - 1)));
}

/// Per-thread scratch of the selection.
struct SelectScratch {
  std::vector<std::uint16_t> bucket;    // N: each row's bucket
  std::vector<std::uint32_t> count;     // kBuckets
  std::vector<std::uint64_t> boundary;  // the rank keys of the one or two buckets the ring's ends fall in
  std::vector<std::uint32_t> inner, picked;
};

/// The ids of ranks [lower, upper) of n scores (ranked by rank_key), ascending, into ring[0, upper - lower).
/// A radix select: one pass counts the buckets; the ring's ends fall in buckets lo <= hi; a second pass
/// takes every row of the buckets strictly between, and ranks the rows of lo and hi exactly by key.
void select_ring(const float* s, index_t n, index_t lower, index_t upper, SelectScratch& x, std::uint32_t* ring) {
  std::fill(x.count.begin(), x.count.end(), 0u);
  for (index_t j = 0; j < n; ++j) ++x.count[x.bucket[static_cast<std::size_t>(j)] = bucket_of(s[j])];
  // before[b]: the rows of the buckets before b. lo holds rank lower, hi rank upper - 1.
  index_t before = 0, before_lo = 0, before_hi = 0;
  int lo = -1, hi = -1;
  for (int b = 0; b < kBuckets && hi < 0; ++b) {
    const index_t next = before + x.count[static_cast<std::size_t>(b)];
    if (lo < 0 && next > lower) lo = b, before_lo = before;
    if (next >= upper) hi = b, before_hi = before;
    before = next;
  }
  x.inner.clear();
  x.boundary.clear();
  for (index_t j = 0; j < n; ++j) {
    const int b = x.bucket[static_cast<std::size_t>(j)];
    if (b > lo && b < hi)
      x.inner.push_back(static_cast<std::uint32_t>(j));
    else if (b == lo || b == hi)
      x.boundary.push_back(rank_key(s[j], static_cast<std::uint32_t>(j)));
  }
  // In key order the boundary rows are lo's (ranks before_lo ...) then hi's (ranks before_hi ...): the
  // ring takes the contiguous run [lower - before_lo, end) of them.
  const index_t lo_rows = static_cast<index_t>(x.count[static_cast<std::size_t>(lo)]);
  const index_t first = lower - before_lo, end = lo == hi ? upper - before_lo : lo_rows + upper - before_hi;
  const auto k = x.boundary.begin();
  if (end < static_cast<index_t>(x.boundary.size())) std::nth_element(k, k + end, x.boundary.end());
  if (first > 0) std::nth_element(k, k + first, k + end);
  x.picked.clear();
  for (index_t t = first; t < end; ++t) x.picked.push_back(static_cast<std::uint32_t>(x.boundary[static_cast<std::size_t>(t)]));
  std::sort(x.picked.begin(), x.picked.end());
  std::merge(x.inner.begin(), x.inner.end(), x.picked.begin(), x.picked.end(), ring);
}

/// One batch's rings: row i's M ids ascending at members[i M, (i + 1) M), and how many of the B
/// rings hold each row (the batch mean's q(j) = count[j] / (B M)).
struct RingBatch final : Conditioned {
  index_t batch = 0, m = 0;
  std::vector<std::uint32_t> members;
  std::vector<std::uint32_t> count;
  RingBatch(index_t b, index_t ring) : batch(b), m(ring), members(static_cast<std::size_t>(b * ring)) {}
  /// count[j] = the rings holding row j, once every ring is in `members`.
  void count_members(index_t n) {
    count.assign(static_cast<std::size_t>(n), 0u);
    for (const std::uint32_t j : members) ++count[j];
  }
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
  return rank(bank, f, stride, batch, dim, nullptr, {});
}

std::unique_ptr<Conditioned> RingSampler::condition_excluding(const BankView& bank, const float* f, index_t stride,
                                                              index_t batch, index_t dim, const std::int32_t* classes,
                                                              std::span<const std::int32_t> query_classes) const {
  MEMBANK_CHECK(classes != nullptr && static_cast<index_t>(query_classes.size()) == batch,
                "{} query classes for a batch of {}: expected one per query, and the rows' classes", query_classes.size(),
                batch);
  return rank(bank, f, stride, batch, dim, classes, query_classes);
}

void RingSampler::class_mass_given(const Conditioned& batch, const std::int32_t* classes, index_t n_classes,
                                   std::span<const std::int32_t> query_classes, std::span<double> out) const {
  const RingBatch& b = batch_of({&batch, 0}, config_.upper - config_.lower);
  MEMBANK_CHECK(query_classes.size() == out.size() && static_cast<index_t>(out.size()) <= b.batch,
                "{} query classes for {} masses: expected one per query of the batch (at most {})", query_classes.size(),
                out.size(), b.batch);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::int32_t l = query_classes[i];
    MEMBANK_CHECK(l >= 0 && l < n_classes, "query_classes[{}] = {}: expected a class in [0, {})", i, l, n_classes);
    index_t same = 0;
    for (const std::uint32_t j : b.ring(static_cast<index_t>(i))) same += classes[j] == l ? 1 : 0;
    out[i] = static_cast<double>(same) / static_cast<double>(b.m);
  }
}

namespace {

/// Each query's ranks [lower, upper) of its scores against `bank` (local rows j, global rows row0 + j;
/// under `classes`, indexed globally, the query's own class scored -inf: past every other row), handed
/// to emit(i, scores, ring) with the ring's local ids ascending (upper - lower of them) and the
/// query's scores of every local row. Queries in fixed tiles: the same for any thread count.
template <class Emit>
void select_rings(const BankView& bank, index_t row0, const float* f, index_t stride, index_t batch, index_t dim,
                  const std::int32_t* classes, std::span<const std::int32_t> query_classes, index_t lower,
                  index_t upper, Emit&& emit) {
  const index_t n = bank.rows, m = upper - lower;
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<float> block, scores;
    std::vector<std::uint32_t> ring;
    SelectScratch select;
    errors.run([&] {
      block.resize(static_cast<std::size_t>(kBankBlock * dim));
      scores.resize(static_cast<std::size_t>(kQueryTile * n));
      ring.resize(static_cast<std::size_t>(m));
      select.bucket.resize(static_cast<std::size_t>(n));
      select.count.resize(kBuckets);
    });
#pragma omp for schedule(dynamic, 1)
    for (index_t i0 = 0; i0 < batch; i0 += kQueryTile) {
      errors.run([&] {
        const index_t rows = std::min(kQueryTile, batch - i0);
        for (index_t r0 = 0; r0 < n; r0 += kBankBlock) {
          const index_t count = std::min(kBankBlock, n - r0);
          // An fp32 bank is read in place; the other types widened a block at a time.
          const bool in_place = bank.dtype == DType::float32;
          if (!in_place) bank.widen_rows(r0, count, block.data(), dim);
          matmul(rows, count, dim, f + i0 * stride, stride, in_place ? bank.row(r0) : block.data(),
                 in_place ? bank.stride : dim, true, scores.data() + r0, n);
        }
        for (index_t r = 0; r < rows; ++r) {
          float* sc = scores.data() + r * n;
          if (classes) {  // the query's own label ranks after every other row, past the ring
            const std::int32_t own = query_classes[static_cast<std::size_t>(i0 + r)];
            for (index_t j = 0; j < n; ++j)
              if (classes[row0 + j] == own) sc[j] = -std::numeric_limits<float>::infinity();
          }
          select_ring(sc, n, lower, upper, select, ring.data());
          emit(i0 + r, static_cast<const float*>(sc), static_cast<const std::uint32_t*>(ring.data()));
        }
      });
    }
  }
  errors.rethrow("the ring sampler's conditioning");
}

}  // namespace

void RingSampler::check_other_rows(const std::int32_t* classes, std::span<const std::int32_t> query_classes) const {
  std::unordered_map<std::int32_t, index_t> size;
  for (index_t j = 0; j < n_; ++j) ++size[classes[j]];
  for (std::size_t i = 0; i < query_classes.size(); ++i) {
    const index_t others = n_ - size[query_classes[i]];
    MEMBANK_CHECK(others >= config_.upper, "query {} has class {}, which leaves {} rows of other classes: expected "
                  "at least upper = {} for its ring to leave its label out (exclude_same_label)", i, query_classes[i],
                  others, config_.upper);
  }
}

std::unique_ptr<Conditioned> RingSampler::rank(const BankView& bank, const float* f, index_t stride, index_t batch,
                                               index_t dim, const std::int32_t* classes,
                                               std::span<const std::int32_t> query_classes) const {
  MEMBANK_CHECK(bank.rows == n_, "the bank has N = {} rows: expected the sampler's N = {}", bank.rows, n_);
  check_queries(f, stride, batch, dim, bank.dim);
  if (classes) check_other_rows(classes, query_classes);  // every label must leave a whole ring of other rows
  const index_t m = config_.upper - config_.lower;
  auto out = std::make_unique<RingBatch>(batch, m);
  RingBatch& b = *out;
  select_rings(bank, 0, f, stride, batch, dim, classes, query_classes, config_.lower, config_.upper,
               [&](index_t i, const float*, const std::uint32_t* ring) {
                 std::copy_n(ring, m, b.members.data() + i * m);
               });
  b.count_members(n_);
  return out;
}

void RingSampler::check_queries(const float* f, index_t stride, index_t batch, index_t dim, index_t bank_dim) const {
  MEMBANK_CHECK(batch >= 1, "batch = {}: expected at least one query", batch);
  MEMBANK_CHECK(dim == bank_dim, "the queries have D = {}: expected the bank's D = {}", dim, bank_dim);
  MEMBANK_CHECK(stride >= dim, "stride = {}: expected at least D = {}", stride, dim);
  for (index_t i = 0; i < batch; ++i)
    for (index_t e = 0; e < dim; ++e)
      MEMBANK_CHECK(std::isfinite(f[i * stride + e]), "f({}, {}) = {}: expected finite features", i, e,
                    f[i * stride + e]);
}

index_t RingSampler::shard_candidates(index_t shard_rows) const { return std::min(config_.upper, shard_rows); }

std::vector<std::uint64_t> RingSampler::candidates(const BankView& shard, index_t row0, const float* f, index_t stride,
                                                   index_t batch, index_t dim, const std::int32_t* classes,
                                                   std::span<const std::int32_t> query_classes) const {
  MEMBANK_CHECK(row0 >= 0 && shard.rows >= 1 && row0 + shard.rows <= n_, "shard rows [{}, {}): expected a range of "
                "[0, N = {})", row0, row0 + shard.rows, n_);
  check_queries(f, stride, batch, dim, shard.dim);
  if (classes) check_other_rows(classes, query_classes);
  const index_t u = shard_candidates(shard.rows);
  std::vector<std::uint64_t> out(static_cast<std::size_t>(batch * u));
  select_rings(shard, row0, f, stride, batch, dim, classes, query_classes, 0, u,
               [&](index_t i, const float* sc, const std::uint32_t* ring) {
                 std::uint64_t* keys = out.data() + i * u;
                 for (index_t t = 0; t < u; ++t)
                   keys[t] = rank_key(sc[ring[t]], static_cast<std::uint32_t>(row0 + ring[t]));
               });
  return out;
}

std::unique_ptr<Conditioned> RingSampler::from_candidates(std::span<const std::uint64_t> all,
                                                          std::span<const index_t> per_shard, index_t batch) const {
  index_t total = 0;
  for (const index_t u : per_shard) total += u;
  MEMBANK_CHECK(batch >= 1 && static_cast<index_t>(all.size()) == batch * total && total >= config_.upper,
                "{} candidates for {} queries from {} shards ({} a query): expected B x the shards' candidates, at "
                "least upper = {} a query", all.size(), batch, per_shard.size(), total, config_.upper);
  const index_t m = config_.upper - config_.lower;
  auto out = std::make_unique<RingBatch>(batch, m);
  RingBatch& b = *out;
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    std::vector<std::uint64_t> keys;
    errors.run([&] { keys.resize(static_cast<std::size_t>(total)); });
#pragma omp for schedule(static)
    for (index_t i = 0; i < batch; ++i) {
      errors.run([&] {
        // query i's candidates from every shard (shard-major in `all`), ranked by key
        index_t at = 0, offset = 0;
        for (const index_t u : per_shard) {
          std::copy_n(all.data() + offset + i * u, u, keys.data() + at);
          at += u;
          offset += batch * u;
        }
        const auto k = keys.begin();
        std::nth_element(k, k + config_.upper - 1, keys.end());
        if (config_.lower > 0) std::nth_element(k, k + config_.lower, k + config_.upper - 1);
        std::uint32_t* ring = b.members.data() + i * m;
        for (index_t t = 0; t < m; ++t) ring[t] = static_cast<std::uint32_t>(keys[static_cast<std::size_t>(config_.lower + t)]);
        std::sort(ring, ring + m);
        for (index_t t = 0; t < m; ++t)
          MEMBANK_CHECK(ring[t] < static_cast<std::uint64_t>(n_), "candidate id {} is out of range: expected < N = {}",
                        ring[t], n_);
      });
    }
  }
  errors.rethrow("the ring sampler's merge of shard candidates");
  b.count_members(n_);
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
  detail::redraw_excluded(cur, static_cast<std::uint64_t>(cur.total), ids, log_pn,
                          [&](const r123::Philox4x32::ctr_type& r, index_t& id, float& lp) { one(r.v[0], r.v[1], id, lp); });
  cur.drawn += static_cast<index_t>(k);
}

}  // namespace membank
