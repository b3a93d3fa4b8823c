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

/// Row stride in elements: rows never straddle more cache lines than they must (`line` elements
/// fill a 64-byte line).
index_t row_stride(index_t dim, index_t line) {
  if (dim % line == 0) return dim;
  if (dim < line) {
    index_t s = 1;
    while (s < dim) s *= 2;
    return s;
  }
  return (dim + line - 1) / line * line;
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

void Bank::allocate(index_t n, index_t dim, DType dtype) {
  MEMBANK_CHECK(n >= 1, "n = {}: expected at least one row", n);
  MEMBANK_CHECK(dim >= 1, "dim = {}: expected at least one column", dim);
  const index_t esize = dtype_bytes(dtype);
  const index_t stride = row_stride(dim, 64 / esize);
  // What the bank needs, checked before anything is allocated (saturating: no overflow).
  const std::int64_t row_bytes = mul_sat(mul_sat(n, stride), esize);
  const std::int64_t need = add_sat(add_sat(row_bytes, static_cast<std::int64_t>(kHugePage)), mul_sat(n, 8));
  require_memory(need, fmt::format("a {} bank of N x D = {} x {} (rows padded to {} elements, plus N last-update "
                                   "steps)", to_string(dtype), n, dim, stride));
  const auto bytes = mul_no_overflow(mul_no_overflow(n, stride, "bank N x stride"), esize, "bank bytes");
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
  data_ = p;
  bytes_ = rounded;
  dtype_ = dtype;
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

Bank::Bank(index_t n, index_t dim, std::uint64_t seed, DType dtype, index_t first_row) {
  MEMBANK_CHECK(first_row >= 0, "first_row = {}: expected a row index >= 0", first_row);
  allocate(n, dim, dtype);
  // First touch in parallel (pages land near the threads that use them); one Philox stream per row,
  // turned into normals by the dispatched kernel (Box-Muller in float, vectorised). A 2-byte row is
  // made in fp32 scratch (per thread, allocated before the region) and rounded to nearest.
  const kernels::Table& kt = kernels::table();
  const bool narrow = dtype != DType::float32;
  std::vector<float> scratch(narrow ? static_cast<std::size_t>(omp_get_max_threads() * stride_) : 0);
#pragma omp parallel
  {
    float* const tmp = narrow ? scratch.data() + static_cast<std::size_t>(omp_get_thread_num() * stride_) : nullptr;
#pragma omp for schedule(static)
    for (index_t i = 0; i < n; ++i) {
      float* v = narrow ? tmp : static_cast<float*>(row_ptr(i));
      const index_t row = first_row + i;  // the row's global index
      const detail::StreamCounter stream({seed, row >> 32, static_cast<std::uint32_t>(row), detail::purpose_bank_init});
      kt.unit_normal_row(stream.key().v, stream.counter(0).v, dim, v);
      for (index_t c = dim; c < stride_; ++c) v[c] = 0.0f;
      if (narrow) kt.narrow(dtype, tmp, row_ptr(i), stride_, nullptr);
    }
  }
}

Bank Bank::from_rows(FeaturesRef rows, DType dtype) {
  MEMBANK_CHECK(rows.rows() >= 1 && rows.cols() >= 1, "rows has shape {} x {}: expected N x D with N, D >= 1",
                rows.rows(), rows.cols());
  check_features(rows, rows.rows(), rows.cols(), "rows");
  Bank bank;
  bank.allocate(rows.rows(), rows.cols(), dtype);
  const index_t dim = bank.dim_, stride = bank.stride_;
  const kernels::Table& kt = kernels::table();
  std::vector<float> scratch(static_cast<std::size_t>(omp_get_max_threads() * stride));
#pragma omp parallel
  {
    float* const v = scratch.data() + static_cast<std::size_t>(omp_get_thread_num() * stride);
#pragma omp for schedule(static)
    for (index_t i = 0; i < bank.n_; ++i) {
      double sq = 0.0;
      for (index_t c = 0; c < dim; ++c) sq += static_cast<double>(rows(i, c)) * rows(i, c);
      const double inv = 1.0 / std::sqrt(sq);
      for (index_t c = 0; c < dim; ++c) v[c] = static_cast<float>(rows(i, c) * inv);
      for (index_t c = dim; c < stride; ++c) v[c] = 0.0f;
      kt.narrow(dtype, v, bank.row_ptr(i), stride, nullptr);
    }
  }
  return bank;
}

void Bank::check_and_store(index_t r0, index_t rows, float* src, index_t ld, double renorm_tolerance,
                           index_t* fixed, bool held) {
  const kernels::Table& kt = kernels::table();
  for (index_t i = r0; i < r0 + rows; ++i) {
    float* v = src + (i - r0) * ld;
    for (index_t c = 0; c < dim_; ++c)
      MEMBANK_CHECK(std::isfinite(v[c]), "row {} holds {} at column {}: expected finite values", i, v[c], c);
    std::fill(v + dim_, v + stride_, 0.0f);
    const double norm = std::sqrt(detail::squared_norm_d(v, dim_));
    MEMBANK_CHECK(norm > 0.0, "row {} is all zeros: expected a non-zero vector", i);
    const bool renormalise = std::fabs(norm - 1.0) > renorm_tolerance;
    if (renormalise) {
      for (index_t c = 0; c < dim_; ++c) v[c] = static_cast<float>(v[c] / norm);
      ++*fixed;
    }
    if (v != row_ptr(i) && (!held || renormalise)) kt.narrow(dtype_, v, row_ptr(i), stride_, nullptr);
  }
}

Bank Bank::from_blocks(index_t n, index_t dim, index_t block_rows,
                       const std::function<void(index_t, index_t, float*, index_t)>& fill,
                       double renorm_tolerance, index_t* renormalised, DType dtype) {
  MEMBANK_CHECK(block_rows >= 1, "block_rows = {}: expected >= 1", block_rows);
  Bank bank;
  bank.allocate(n, dim, dtype);
  index_t fixed = 0;
  // fp32 rows are filled in place; the others through one block of fp32 rows.
  std::vector<float> block;
  if (dtype != DType::float32)
    block = detail::translate_bad_alloc("a block of rows", [&] {
      return std::vector<float>(static_cast<std::size_t>(std::min(block_rows, n) * bank.stride_));
    });
  for (index_t r0 = 0; r0 < n; r0 += block_rows) {
    const index_t rows = std::min(block_rows, n - r0);
    float* const dst = block.empty() ? static_cast<float*>(bank.row_ptr(r0)) : block.data();
    fill(r0, rows, dst, bank.stride_);
    bank.check_and_store(r0, rows, dst, bank.stride_, renorm_tolerance, &fixed);
  }
  if (renormalised) *renormalised = fixed;
  return bank;
}

Bank Bank::from_raw_blocks(index_t n, index_t dim, DType dtype, index_t block_rows,
                           const std::function<void(index_t, index_t, std::uint16_t*, index_t)>& fill,
                           double renorm_tolerance, index_t* renormalised) {
  MEMBANK_CHECK(block_rows >= 1, "block_rows = {}: expected >= 1", block_rows);
  MEMBANK_CHECK(dtype != DType::float32, "from_raw_blocks holds 16-bit elements: expected float16 or bfloat16, "
                "not float32");
  Bank bank;
  bank.allocate(n, dim, dtype);
  const kernels::Table& kt = kernels::table();
  std::vector<float> row(static_cast<std::size_t>(bank.stride_));
  index_t fixed = 0;
  for (index_t r0 = 0; r0 < n; r0 += block_rows) {
    const index_t rows = std::min(block_rows, n - r0);
    fill(r0, rows, static_cast<std::uint16_t*>(bank.row_ptr(r0)), bank.stride_);
    for (index_t i = r0; i < r0 + rows; ++i) {
      auto* const raw = static_cast<std::uint16_t*>(bank.row_ptr(i));
      std::fill(raw + dim, raw + bank.stride_, std::uint16_t{0});
      kt.widen(dtype, raw, row.data(), bank.stride_);
      bank.check_and_store(i, 1, row.data(), bank.stride_, renorm_tolerance, &fixed, true);
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
      dtype_(o.dtype_),
      last_update_(std::move(o.last_update_)) {}

Bank& Bank::operator=(Bank&& o) noexcept {
  if (this != &o) {
    std::free(data_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    n_ = std::exchange(o.n_, 0);
    dim_ = std::exchange(o.dim_, 0);
    stride_ = std::exchange(o.stride_, 0);
    dtype_ = o.dtype_;
    last_update_ = std::move(o.last_update_);
  }
  return *this;
}

Bank::~Bank() { std::free(data_); }

void BankView::widen_rows(index_t first, index_t count, float* out, index_t ld) const {
  const kernels::Table& kt = kernels::table();
  for (index_t r = 0; r < count; ++r) kt.widen(dtype, row_data(first + r), out + r * ld, dim);
}

RowMatrixf Bank::to_matrix() const {
  if (dtype_ == DType::float32) return view().matrix();
  RowMatrixf out(n_, dim_);
  const BankView v = view();
  constexpr index_t kRows = 4096;
  const index_t blocks = (n_ + kRows - 1) / kRows;
#pragma omp parallel for schedule(static)
  for (index_t b = 0; b < blocks; ++b)
    v.widen_rows(b * kRows, std::min(kRows, n_ - b * kRows), out.data() + b * kRows * dim_, dim_);
  return out;
}

void Bank::momentum_update(IdsRef ids, FeaturesRef f, double m, std::int64_t step, Rounding rounding,
                           std::uint64_t seed, index_t first_row) {
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id");
  MEMBANK_CHECK(m >= 0.0 && m <= 1.0, "momentum m = {}: expected 0 <= m <= 1", m);
  check_ids(ids, n_, "ids");
  check_features(f, static_cast<index_t>(ids.size()), dim_, "features");
  // Inputs that overlap what this call writes (e.g. features = rows of view()) are copied first;
  // the copies overlap nothing, so the recursion runs once.
  if (shares_memory_with(MemoryRegion::of_span(ids))) {
    const std::vector<index_t> copy = detail::translate_bad_alloc("Bank::momentum_update",
                                                                  [&] { return std::vector<index_t>(ids.begin(), ids.end()); });
    return momentum_update(copy, f, m, step, rounding, seed, first_row);
  }
  if (shares_memory_with(MemoryRegion::of_matrix(f))) {
    const RowMatrixf copy = detail::translate_bad_alloc("Bank::momentum_update", [&] { return RowMatrixf(f); });
    return momentum_update(ids, copy, m, step, rounding, seed, first_row);
  }
  detail::translate_bad_alloc("Bank::momentum_update", [&] { update_rows(ids, f, m, step, rounding, seed, first_row); });
}

void Bank::update_rows(IdsRef ids, FeaturesRef f, double m, std::int64_t step, Rounding rounding,
                       std::uint64_t seed, index_t first_row) {
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
  // Per-thread scratch made before the region: nothing inside it allocates or throws. A 2-byte row
  // is widened into `wide`, refreshed there in fp32 and rounded back once (random words for
  // stochastic rounding: one per element).
  const bool narrow = dtype_ != DType::float32;
  const bool stochastic = narrow && rounding == Rounding::stochastic;
  const index_t blocks = (dim + 3) / 4;  // Philox blocks per row
  const index_t per_thread = dim + (narrow ? stride_ : 0) + (stochastic ? 4 * blocks : 0);
  std::vector<float> scratch(static_cast<std::size_t>(omp_get_max_threads() * per_thread));
  std::vector<std::uint32_t> words(stochastic ? static_cast<std::size_t>(omp_get_max_threads() * 4 * blocks) : 0);
  const kernels::Table& kt = kernels::table();  // the instruction set, picked once per call
#pragma omp parallel
  {
    float* tmp = scratch.data() + static_cast<std::size_t>(omp_get_thread_num() * per_thread);
    float* wide = tmp + dim;
    std::uint32_t* random = stochastic ? words.data() + static_cast<std::size_t>(omp_get_thread_num() * 4 * blocks)
                                       : nullptr;
#pragma omp for schedule(static)
    for (index_t g = 0; g < groups; ++g) {
      const std::size_t first = group_start[static_cast<std::size_t>(g)];
      const std::size_t end = group_start[static_cast<std::size_t>(g) + 1];
      const index_t id = ids[order[first]];  // checked: 0 <= id < N
      last_update_[static_cast<std::size_t>(id)] = step;
      if (m == 1.0) continue;  // normalise(v) of a unit row is the row: leave it bit-exact
      if (!narrow) {
        auto* v = static_cast<float*>(row_ptr(id));
        for (std::size_t p = first; p < end; ++p)
          kt.momentum_row(v, f.row(static_cast<index_t>(order[p])).data(), mf, one_minus, tmp, dim);
        continue;
      }
      for (std::size_t p = first; p < end; ++p) {
        kt.widen(dtype_, row_ptr(id), wide, dim);
        kt.momentum_row(wide, f.row(static_cast<index_t>(order[p])).data(), mf, one_minus, tmp, dim);
        if (stochastic) {  // keyed by (seed, step, row, occurrence of the row in this batch)
          const auto row = static_cast<std::uint64_t>(first_row + id);  // the global row
          const auto row_word = static_cast<std::uint32_t>(row ^ (row >> 32));
          const detail::StreamCounter stream({seed, step, row_word, detail::purpose_stochastic_rounding});
          stream.blocks(kt, static_cast<std::uint64_t>(p - first) * static_cast<std::uint64_t>(blocks), blocks,
                        random);
        }
        kt.narrow(dtype_, wide, row_ptr(id), dim, random);
      }
    }
  }
}

void Bank::set_last_update(std::vector<std::int64_t> steps) {
  MEMBANK_CHECK(static_cast<index_t>(steps.size()) == n_, "last_update has {} entries: expected N = {}",
                steps.size(), n_);
  last_update_ = std::move(steps);
}

}  // namespace membank
