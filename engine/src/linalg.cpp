#include <membank/linalg.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "kernels/kernels.hpp"

namespace membank {

namespace {

/// The bytes of a row-major rows x cols matrix at leading dimension ld (nothing when empty).
MemoryRegion region(const float* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  if (rows == 0 || cols == 0) return {};
  return {p, rows, cols * 4, ld * 4};
}

void check_operand(const char* name, const float* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  MEMBANK_CHECK(ld >= cols && ld >= 1, "{}: leading dimension {} for rows of {} floats: expected >= {}", name, ld,
                cols, cols > 1 ? cols : 1);
  MEMBANK_CHECK(p != nullptr || rows == 0 || cols == 0, "{} is null for a {} x {} matrix", name, rows, cols);
}

void check_sizes(const char* what, std::int64_t m, std::int64_t n, std::int64_t k) {
  MEMBANK_CHECK(m >= 0 && n >= 0 && k >= 0, "{}: m = {}, n = {}, k = {}: expected sizes >= 0", what, m, n, k);
}

}  // namespace

void matmul(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
            std::int64_t ldb, bool transpose_b, float* c, std::int64_t ldc) {
  check_sizes("matmul", m, n, k);
  check_operand("a", a, m, k, lda);
  if (transpose_b)
    check_operand("b", b, n, k, ldb);
  else
    check_operand("b", b, k, n, ldb);
  check_operand("c", c, m, n, ldc);
  const MemoryRegion rc = region(c, m, n, ldc);
  check_no_overlap(rc, "c", region(a, m, k, lda), "a");
  check_no_overlap(rc, "c", transpose_b ? region(b, n, k, ldb) : region(b, k, n, ldb), "b");
  if (m == 0 || n == 0) return;
  const kernels::Table& kt = kernels::table();
  if (transpose_b) {
    kt.gemm_abt(m, n, k, 1.0f, a, lda, b, ldb, c, ldc);
  } else {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c[i * ldc + j] = 0.0f;
    if (k > 0) kt.gemm_ab_acc(m, n, k, a, lda, b, ldb, c, ldc);
  }
}

void matmul_at_b(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
                 std::int64_t ldb, float* c, std::int64_t ldc) {
  check_sizes("matmul_at_b", m, n, k);
  check_operand("a", a, k, m, lda);
  check_operand("b", b, k, n, ldb);
  check_operand("c", c, m, n, ldc);
  const MemoryRegion rc = region(c, m, n, ldc);
  check_no_overlap(rc, "c", region(a, k, m, lda), "a");
  check_no_overlap(rc, "c", region(b, k, n, ldb), "b");
  if (m == 0 || n == 0) return;
  kernels::table().gemm_atb(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace membank
