#pragma once
// Bank: the memory bank, N unit-norm embeddings of dimension D (layout in types.hpp).
//
// Invariants: every row has unit L2 norm (to fp32 rounding); only Bank's own methods write rows
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
  const float* data = nullptr;
  index_t rows = 0;    ///< N
  index_t dim = 0;     ///< D
  index_t stride = 0;  ///< floats between consecutive rows (>= dim)

  const float* row(index_t i) const { return data + i * stride; }
  /// The bank as an Eigen matrix expression (N x D, no copy).
  Eigen::Map<const RowMatrixf, 0, Eigen::OuterStride<>> matrix() const {
    return {data, rows, dim, Eigen::OuterStride<>(stride)};
  }
};

class Bank {
 public:
  /// N rows drawn uniformly on the unit sphere S^{D-1} (normalised Gaussians) from `seed`.
  /// Deterministic for a seed whatever the thread count (the vectorised float transcendentals may
  /// differ in the last bits between instruction-set paths). O(N D).
  /// Throws Error if n < 1 or dim < 1; OutOfMemory, before allocating anything, when the storage
  /// (N x stride floats + N last-update steps) exceeds what the process can allocate (memory.hpp),
  /// and when the allocation fails.
  Bank(index_t n, index_t dim, std::uint64_t seed);

  /// A bank initialised from caller rows (N x D), each normalised to unit length.
  /// Throws Error (bank not created) on an empty matrix, a non-finite value or a zero row.
  static Bank from_rows(FeaturesRef rows);

  Bank(Bank&&) noexcept;
  Bank& operator=(Bank&&) noexcept;
  Bank(const Bank&) = delete;
  Bank& operator=(const Bank&) = delete;
  ~Bank();

  index_t size() const { return n_; }
  index_t dim() const { return dim_; }
  index_t stride() const { return stride_; }
  const float* row(index_t i) const { return data_ + i * stride_; }
  BankView view() const { return {data_, n_, dim_, stride_}; }
  /// Copy of the rows as a dense N x D matrix (O(N D) memory: for tests and small banks).
  RowMatrixf to_matrix() const;

  /// Step at which each row was last written (-1: never since initialisation). Length N.
  const std::vector<std::int64_t>& last_update() const { return last_update_; }

  /// A bank whose rows a reader supplies block by block (snapshot loading, imports):
  /// fill(row0, rows, dst, stride) writes rows [row0, row0 + rows) at dst + r * stride, r < rows,
  /// with rows <= block_rows. Every row is then checked: a non-finite value or a zero row throws
  /// Error naming the row; a row with |‖v‖ - 1| > renorm_tolerance is renormalised and counted in
  /// *renormalised (when given) -- rows within tolerance are kept bit for bit. Errors from `fill`
  /// propagate. Peak memory: the bank.
  static Bank from_blocks(index_t n, index_t dim, index_t block_rows,
                          const std::function<void(index_t, index_t, float*, index_t)>& fill,
                          double renorm_tolerance, index_t* renormalised = nullptr);

  /// Momentum refresh, for b = 0..B-1 in batch order:
  ///   v[ids[b]] <- normalise(m * v[ids[b]] + (1 - m) * f[b])
  /// Duplicate ids are applied in batch order, deterministically. Arithmetic is fp32 with the norm
  /// taken in double. m = 1 leaves rows bit-for-bit unchanged; m = 0 stores normalise(f[b]).
  /// If m * v + (1 - m) * f is exactly zero (f = -v at m = 0.5) the row becomes normalise(f[b]).
  /// Records `step` in last_update() for every written row.
  /// Validates everything before writing: f is B x D with B = ids.size() >= 1, ids in [0, N),
  /// f finite with non-zero rows, 0 <= m <= 1; otherwise throws Error and changes nothing.
  /// f and ids may overlap the bank's own storage (f = rows of view()): they are copied before the
  /// first write, so the result is that of disjoint inputs. Cost O(B D + B log B).
  void momentum_update(IdsRef ids, FeaturesRef f, double m, std::int64_t step);

  /// True when `r` shares a byte with the bank's storage (the row allocation, padding included, or
  /// the last-update steps).
  bool shares_memory_with(const MemoryRegion& r) const;
  /// Throws Error when the output `out` (named `out_name`) overlaps the bank's storage.
  void check_no_overlap(const MemoryRegion& out, const char* out_name) const;

  /// Overwrite every row's last-update step (used when restoring a snapshot). Length must be N.
  void set_last_update(std::vector<std::int64_t> steps);

 private:
  Bank() = default;
  void allocate(index_t n, index_t dim);
  /// momentum_update after validation, on inputs that do not overlap the bank.
  void update_rows(IdsRef ids, FeaturesRef f, double m, std::int64_t step);

  float* data_ = nullptr;
  std::size_t bytes_ = 0;
  index_t n_ = 0;
  index_t dim_ = 0;
  index_t stride_ = 0;
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
