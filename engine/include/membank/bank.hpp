#pragma once
// Bank: the memory bank, N unit-norm embeddings of dimension D (layout in types.hpp).
//
// Rows are stored as fp32, fp16 or bf16 (DType, chosen at construction): a 2-byte bank takes half
// the memory and half the bytes per random row read; every kernel widens its elements to fp32.
//
// Invariants: every row has unit L2 norm (to the type's precision: |‖v‖ - 1| <= row_norm_tolerance);
// only Bank's own methods write rows
// (momentum_update renormalises every row it writes). Storage is one 2 MiB-aligned allocation,
// advised for transparent huge pages, so that random row reads do not pay a TLB miss each.
//
// Thread safety: const methods may run concurrently with each other; momentum_update must not
// run concurrently with any other call on the same Bank. Methods parallelise internally with
// OpenMP and give bit-identical results for any thread count.
#include <membank/memory.hpp>
#include <membank/types.hpp>

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

namespace membank {

/// Non-owning read-only view of a bank (valid while the Bank lives and is not moved-from).
struct BankView {
  const void* data = nullptr;  ///< N x stride elements of `dtype`
  index_t rows = 0;    ///< N
  index_t dim = 0;     ///< D
  index_t stride = 0;  ///< elements between consecutive rows (>= dim)
  DType dtype = DType::float32;

  /// Row i's first element, of any type.
  const void* row_data(index_t i) const {
    return static_cast<const unsigned char*>(data) + i * stride * dtype_bytes(dtype);
  }
  /// Row i of an fp32 bank (for the other types: row_data, or Bank::rows_float32 to widen).
  const float* row(index_t i) const { return static_cast<const float*>(data) + i * stride; }
  /// An fp32 bank as an Eigen matrix expression (N x D, no copy).
  Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>> matrix() const {
    return {static_cast<const float*>(data), rows, dim, Eigen::OuterStride<>(stride)};
  }
  /// Rows [first, first + count) widened to fp32 (exact) into out (count x dim, row-major, `ld` floats
  /// apart): the dispatched conversion.
  void widen_rows(index_t first, index_t count, float* out, index_t ld) const;
  /// The bytes of the rows (without their padding), for the aliasing checks.
  MemoryRegion region() const {
    const std::int64_t e = dtype_bytes(dtype);
    return {data, rows, dim * e, stride * e};
  }
};

class Bank {
 public:
  /// N rows drawn uniformly on the unit sphere S^{D-1} (normalised Gaussians) from `seed`, stored as
  /// `dtype` (2-byte types: the fp32 row rounded to nearest, so a bank of each type holds the same
  /// directions). Deterministic for a seed whatever the thread count (the vectorised float
  /// transcendentals may differ in the last bits between instruction-set paths). O(N D).
  /// Throws Error if n < 1 or dim < 1; OutOfMemory, before allocating anything, when the storage
  /// (N x stride floats + N last-update steps) exceeds what the process can allocate (memory.hpp),
  /// and when the allocation fails.
  /// `first_row`: the bank holds rows [first_row, first_row + n) of the seeded bank of `seed` (a
  /// shard of a larger one: DistributedEngine); each row is a function of (seed, its global index).
  Bank(index_t n, index_t dim, std::uint64_t seed, DType dtype = DType::float32, index_t first_row = 0);

  /// A bank initialised from caller rows (N x D), each normalised to unit length (in double), then
  /// rounded to `dtype` (to nearest). Throws Error (bank not created) on an empty matrix, a
  /// non-finite value or a zero row.
  static Bank from_rows(FeaturesRef rows, DType dtype = DType::float32);

  Bank(Bank&&) noexcept;
  Bank& operator=(Bank&&) noexcept;
  Bank(const Bank&) = delete;
  Bank& operator=(const Bank&) = delete;
  ~Bank();

  index_t size() const { return n_; }
  index_t dim() const { return dim_; }
  index_t stride() const { return stride_; }
  DType dtype() const { return dtype_; }
  /// Bytes of row storage (N x stride elements, rounded up to whole 2 MiB pages).
  std::size_t storage_bytes() const { return bytes_; }
  /// Row i of an fp32 bank (the other types: view().row_data(i), or to_matrix()).
  const float* row(index_t i) const { return static_cast<const float*>(data_) + i * stride_; }
  BankView view() const { return {data_, n_, dim_, stride_, dtype_}; }
  /// Copy of the rows as a dense N x D fp32 matrix, widened (O(N D) memory: for tests and small banks).
  RowMatrixf to_matrix() const;

  /// Step at which each row was last written (-1: never since initialisation). Length N.
  const std::vector<std::int64_t>& last_update() const { return last_update_; }

  /// A bank of `dtype` whose rows a reader supplies block by block (snapshot loading, imports):
  /// fill(row0, rows, dst, stride) writes rows [row0, row0 + rows) as fp32 at dst + r * stride, r < rows,
  /// with rows <= block_rows. Every row is then checked: a non-finite value or a zero row throws
  /// Error naming the row; a row with |‖v‖ - 1| > renorm_tolerance is renormalised and counted in
  /// *renormalised (when given) -- rows within tolerance are kept bit for bit (a 2-byte bank
  /// rounds each row to nearest: the widened values of its own type come back unchanged). Errors from
  /// `fill` propagate. Peak memory: the bank, plus one block of fp32 rows for a 2-byte type.
  static Bank from_blocks(index_t n, index_t dim, index_t block_rows,
                          const std::function<void(index_t, index_t, float*, index_t)>& fill,
                          double renorm_tolerance, index_t* renormalised = nullptr,
                          DType dtype = DType::float32);
  /// A 2-byte bank whose rows a reader supplies as raw 16-bit elements, block by block:
  /// fill(row0, rows, dst, stride) writes rows [row0, row0 + rows) at dst + r * stride (elements).
  /// Rows are checked as from_blocks does (the tolerance applies to the widened row; a renormalised
  /// row is rounded to nearest). Throws Error for an fp32 dtype. Peak memory: the bank.
  static Bank from_raw_blocks(index_t n, index_t dim, DType dtype, index_t block_rows,
                              const std::function<void(index_t, index_t, std::uint16_t*, index_t)>& fill,
                              double renorm_tolerance, index_t* renormalised = nullptr);

  /// Momentum refresh, for b = 0..B-1 in batch order:
  ///   v[ids[b]] <- normalise(m * v[ids[b]] + (1 - m) * f[b])
  /// Duplicate ids are applied in batch order, deterministically. Arithmetic is fp32 with the norm
  /// taken in double; a 2-byte row is widened to fp32 first and rounded once at the end, to nearest
  /// or stochastically (`rounding`; the random bits are keyed by (seed, step, row, occurrence in
  /// the batch), `row` the global index first_row + id when the bank is a shard of a larger one).
  /// m = 1 leaves rows bit-for-bit unchanged; m = 0 stores normalise(f[b]).
  /// If m * v + (1 - m) * f is exactly zero (f = -v at m = 0.5) the row becomes normalise(f[b]).
  /// Records `step` in last_update() for every written row.
  /// Validates everything before writing: f is B x D with B = ids.size() >= 1, ids in [0, N),
  /// f finite with non-zero rows, 0 <= m <= 1; otherwise throws Error and changes nothing.
  /// f and ids may overlap the bank's own storage (f = rows of view()): they are copied before the
  /// first write, so the result is that of disjoint inputs. Cost O(B D + B log B).
  void momentum_update(IdsRef ids, FeaturesRef f, double m, std::int64_t step,
                       Rounding rounding = Rounding::nearest, std::uint64_t seed = 0, index_t first_row = 0);

  /// True when `r` shares a byte with the bank's storage (the row allocation, padding included, or
  /// the last-update steps).
  bool shares_memory_with(const MemoryRegion& r) const;
  /// Throws Error when the output `out` (named `out_name`) overlaps the bank's storage.
  void check_no_overlap(const MemoryRegion& out, const char* out_name) const;

  /// Overwrite every row's last-update step (used when restoring a snapshot). Length must be N.
  void set_last_update(std::vector<std::int64_t> steps);

 private:
  Bank() = default;
  void allocate(index_t n, index_t dim, DType dtype);
  /// momentum_update after validation, on inputs that do not overlap the bank.
  void update_rows(IdsRef ids, FeaturesRef f, double m, std::int64_t step, Rounding rounding, std::uint64_t seed,
                   index_t first_row);
  void* row_ptr(index_t i) { return static_cast<unsigned char*>(data_) + i * stride_ * dtype_bytes(dtype_); }
  /// Checks rows [r0, r0 + rows) of fp32 values (at src, `ld` apart): finite, non-zero, renormalised
  /// beyond the tolerance (counted in *fixed); then stores them as the bank's type. `held`: the bank
  /// already holds these rows (src is their widened copy), so only a renormalised row is written back.
  void check_and_store(index_t r0, index_t rows, float* src, index_t ld, double renorm_tolerance, index_t* fixed,
                       bool held = false);

  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  index_t n_ = 0;
  index_t dim_ = 0;
  index_t stride_ = 0;
  DType dtype_ = DType::float32;
  std::vector<std::int64_t> last_update_;
};

/// Validation shared by every entry point that takes features: B x D with B = expected_rows,
/// all values finite, every row non-zero. `arg` names the argument in the message.
void check_features(FeaturesRef f, index_t expected_rows, index_t dim, const char* arg);
/// |‖row‖ - 1| <= tolerance for every row (after check_features).
void check_unit_norm(FeaturesRef f, double tolerance, const char* arg);
/// ids[b] in [0, n) for every b; `arg` names the argument.
void check_ids(IdsRef ids, index_t n, const char* arg);

}  // namespace membank
