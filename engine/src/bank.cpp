#include <membank/bank.hpp>
#include <membank/error.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "detail/philox.hpp"
#include "detail/simd.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>

namespace membank {

namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

/// Row stride in floats: rows never straddle more cache lines than they must.
index_t row_stride(index_t dim) {
  if (dim % 16 == 0) return dim;
  if (dim < 16) {
    index_t s = 1;
    while (s < dim) s *= 2;
    return s;
  }
  return (dim + 15) / 16 * 16;
}

}  // namespace

void check_ids(IdsRef ids, index_t n, const char* arg) {
  for (std::size_t b = 0; b < ids.size(); ++b)
    MEMBANK_CHECK(ids[b] >= 0 && ids[b] < n, "{}[{}] = {} is out of range: expected 0 <= id < N = {}",
                  arg, b, ids[b], n);
}

void check_features(FeaturesRef f, index_t expected_rows, index_t dim, const char* arg) {
  MEMBANK_CHECK(f.rows() >= 1, "{} is empty (0 rows): expected a batch of at least one row", arg);
  MEMBANK_CHECK(f.rows() == expected_rows && f.cols() == dim,
                "{} has shape {} x {}: expected {} x {} (B x D)", arg, f.rows(), f.cols(),
                expected_rows, dim);
  for (index_t b = 0; b < f.rows(); ++b) {
    double sq = 0.0;
    for (index_t c = 0; c < dim; ++c) {
      const float x = f(b, c);
      MEMBANK_CHECK(std::isfinite(x), "{}({}, {}) = {}: expected finite values", arg, b, c, x);
      sq += static_cast<double>(x) * x;
    }
    MEMBANK_CHECK(sq > 0.0, "{} row {} has zero norm: expected a non-zero vector", arg, b);
  }
}

void check_unit_norm(FeaturesRef f, double tolerance, const char* arg) {
  for (index_t b = 0; b < f.rows(); ++b) {
    const double norm = std::sqrt(f.row(b).cast<double>().squaredNorm());
    MEMBANK_CHECK(std::fabs(norm - 1.0) <= tolerance,
                  "{} row {} has norm {}: expected unit norm (|norm - 1| <= {}); normalise the rows, or let "
                  "the engine do it (EngineConfig::normalize_features)", arg, b, norm, tolerance);
  }
}

void Bank::allocate(index_t n, index_t dim) {
  MEMBANK_CHECK(n >= 1, "n = {}: expected at least one row", n);
  MEMBANK_CHECK(dim >= 1, "dim = {}: expected at least one column", dim);
  const index_t stride = row_stride(dim);
  // What the bank needs, checked before anything is allocated (saturating: no overflow).
  const std::int64_t row_bytes = mul_sat(mul_sat(n, stride), 4);
  const std::int64_t need = add_sat(add_sat(row_bytes, static_cast<std::int64_t>(kHugePage)), mul_sat(n, 8));
  require_memory(need, fmt::format("a bank of N x D = {} x {} (rows padded to {} floats, plus N last-update steps)",
                                   n, dim, stride));
  const auto bytes = mul_no_overflow(mul_no_overflow(n, stride, "bank N x stride"), 4, "bank bytes");
  const std::size_t rounded = (static_cast<std::size_t>(bytes) + kHugePage - 1) / kHugePage * kHugePage;
  detail::translate_bad_alloc("the bank's last-update steps",
                              [&] { last_update_.assign(static_cast<std::size_t>(n), -1); });
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (p == nullptr) {
    last_update_ = {};
    throw OutOfMemory(fmt::format("membank: out of memory: allocating {} for a bank of N x D = {} x {} failed",
                                  format_bytes(static_cast<std::int64_t>(rounded)), n, dim));
  }
  madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
  data_ = static_cast<float*>(p);
  bytes_ = rounded;
  n_ = n;
  dim_ = dim;
  stride_ = stride;
}

bool Bank::shares_memory_with(const MemoryRegion& r) const {
  return overlaps(r, MemoryRegion::contiguous(data_, static_cast<std::int64_t>(bytes_))) ||
         overlaps(r, MemoryRegion::of_span(std::span<const std::int64_t>(last_update_)));
}

void Bank::check_no_overlap(const MemoryRegion& out, const char* out_name) const {
  membank::check_no_overlap(out, out_name, MemoryRegion::contiguous(data_, static_cast<std::int64_t>(bytes_)),
                            "the bank's rows");
  membank::check_no_overlap(out, out_name, MemoryRegion::of_span(std::span<const std::int64_t>(last_update_)),
                            "the bank's last-update steps");
}

Bank::Bank(index_t n, index_t dim, std::uint64_t seed) {
  allocate(n, dim);
  // First touch in parallel (pages land near the threads that use them); one Philox stream per row,
  // turned into normals by the dispatched kernel (Box-Muller in float, vectorised).
  const kernels::Table& kt = kernels::table();
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < n; ++i) {
    float* v = data_ + i * stride_;
    const detail::StreamCounter stream({seed, i >> 32, static_cast<std::uint32_t>(i), detail::purpose_bank_init});
    kt.unit_normal_row(stream.key().v, stream.counter(0).v, dim, v);
    for (index_t c = dim; c < stride_; ++c) v[c] = 0.0f;
  }
}

Bank Bank::from_rows(FeaturesRef rows) {
  MEMBANK_CHECK(rows.rows() >= 1 && rows.cols() >= 1, "rows has shape {} x {}: expected N x D with N, D >= 1",
                rows.rows(), rows.cols());
  check_features(rows, rows.rows(), rows.cols(), "rows");
  Bank bank;
  bank.allocate(rows.rows(), rows.cols());
  const index_t dim = bank.dim_;
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < bank.n_; ++i) {
    float* v = bank.data_ + i * bank.stride_;
    double sq = 0.0;
    for (index_t c = 0; c < dim; ++c) sq += static_cast<double>(rows(i, c)) * rows(i, c);
    const double inv = 1.0 / std::sqrt(sq);
    for (index_t c = 0; c < dim; ++c) v[c] = static_cast<float>(rows(i, c) * inv);
    for (index_t c = dim; c < bank.stride_; ++c) v[c] = 0.0f;
  }
  return bank;
}

Bank Bank::from_blocks(index_t n, index_t dim, index_t block_rows,
                       const std::function<void(index_t, index_t, float*, index_t)>& fill,
                       double renorm_tolerance, index_t* renormalised) {
  MEMBANK_CHECK(block_rows >= 1, "block_rows = {}: expected >= 1", block_rows);
  Bank bank;
  bank.allocate(n, dim);
  index_t fixed = 0;
  for (index_t r0 = 0; r0 < n; r0 += block_rows) {
    const index_t rows = std::min(block_rows, n - r0);
    fill(r0, rows, bank.data_ + r0 * bank.stride_, bank.stride_);
    for (index_t i = r0; i < r0 + rows; ++i) {
      float* v = bank.data_ + i * bank.stride_;
      for (index_t c = 0; c < dim; ++c)
        MEMBANK_CHECK(std::isfinite(v[c]), "row {} holds {} at column {}: expected finite values", i, v[c], c);
      std::fill(v + dim, v + bank.stride_, 0.0f);
      const double norm = std::sqrt(detail::squared_norm_d(v, dim));
      MEMBANK_CHECK(norm > 0.0, "row {} is all zeros: expected a non-zero vector", i);
      if (std::fabs(norm - 1.0) > renorm_tolerance) {
        for (index_t c = 0; c < dim; ++c) v[c] = static_cast<float>(v[c] / norm);
        ++fixed;
      }
    }
  }
  if (renormalised) *renormalised = fixed;
  return bank;
}

Bank::Bank(Bank&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      n_(std::exchange(o.n_, 0)),
      dim_(std::exchange(o.dim_, 0)),
      stride_(std::exchange(o.stride_, 0)),
      last_update_(std::move(o.last_update_)) {}

Bank& Bank::operator=(Bank&& o) noexcept {
  if (this != &o) {
    std::free(data_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    n_ = std::exchange(o.n_, 0);
    dim_ = std::exchange(o.dim_, 0);
    stride_ = std::exchange(o.stride_, 0);
    last_update_ = std::move(o.last_update_);
  }
  return *this;
}

Bank::~Bank() { std::free(data_); }

RowMatrixf Bank::to_matrix() const { return view().matrix(); }

void Bank::momentum_update(IdsRef ids, FeaturesRef f, double m, std::int64_t step) {
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id");
  MEMBANK_CHECK(m >= 0.0 && m <= 1.0, "momentum m = {}: expected 0 <= m <= 1", m);
  check_ids(ids, n_, "ids");
  check_features(f, static_cast<index_t>(ids.size()), dim_, "features");
  // Inputs that overlap what this call writes (e.g. features = rows of view()) are copied first;
  // the copies overlap nothing, so the recursion runs once.
  if (shares_memory_with(MemoryRegion::of_span(ids))) {
    const std::vector<index_t> copy = detail::translate_bad_alloc("Bank::momentum_update",
                                                                  [&] { return std::vector<index_t>(ids.begin(), ids.end()); });
    return momentum_update(copy, f, m, step);
  }
  if (shares_memory_with(MemoryRegion::of_matrix(f))) {
    const RowMatrixf copy = detail::translate_bad_alloc("Bank::momentum_update", [&] { return RowMatrixf(f); });
    return momentum_update(ids, copy, m, step);
  }
  detail::translate_bad_alloc("Bank::momentum_update", [&] { update_rows(ids, f, m, step); });
}

void Bank::update_rows(IdsRef ids, FeaturesRef f, double m, std::int64_t step) {
  const std::size_t batch = ids.size();
  // Group equal ids; within a group keep batch order (stable sort), groups are independent.
  std::vector<std::size_t> order(batch);  // positions in the batch
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ids[a] < ids[b]; });
  std::vector<std::size_t> group_start;
  for (std::size_t p = 0; p < batch; ++p)
    if (p == 0 || ids[order[p]] != ids[order[p - 1]]) group_start.push_back(p);
  group_start.push_back(batch);
  const auto groups = static_cast<index_t>(group_start.size()) - 1;

  const float mf = static_cast<float>(m);
  const float one_minus = static_cast<float>(1.0 - m);
  const index_t dim = dim_;
  // Per-thread scratch made before the region: nothing inside it allocates or throws.
  std::vector<float> scratch(static_cast<std::size_t>(omp_get_max_threads() * dim));
  const kernels::Table& kt = kernels::table();  // the instruction set, picked once per call
#pragma omp parallel
  {
    float* tmp = scratch.data() + static_cast<std::size_t>(omp_get_thread_num() * dim);
#pragma omp for schedule(static)
    for (index_t g = 0; g < groups; ++g) {
      const std::size_t first = group_start[static_cast<std::size_t>(g)];
      const std::size_t end = group_start[static_cast<std::size_t>(g) + 1];
      const index_t id = ids[order[first]];  // checked: 0 <= id < N
      float* v = data_ + id * stride_;
      last_update_[static_cast<std::size_t>(id)] = step;
      if (m == 1.0) continue;  // normalise(v) of a unit row is the row: leave it bit-exact
      for (std::size_t p = first; p < end; ++p)
        kt.momentum_row(v, f.row(static_cast<index_t>(order[p])).data(), mf, one_minus, tmp, dim);
    }
  }
}

void Bank::set_last_update(std::vector<std::int64_t> steps) {
  MEMBANK_CHECK(static_cast<index_t>(steps.size()) == n_, "last_update has {} entries: expected N = {}",
                steps.size(), n_);
  last_update_ = std::move(steps);
}

}  // namespace membank
