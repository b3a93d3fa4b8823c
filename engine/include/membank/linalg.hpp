#pragma once
// Row-major fp32 matrix products on the engine's run-time-dispatched kernels (membank/isa.hpp): the
// widest instruction set the CPU has, whatever the caller itself was compiled for. For callers'
// encoders that should be as fast as the engine in one portable binary (the Fashion-MNIST trainer's
// layers use them).
//
// Single-threaded: callers split the work into blocks themselves (results are then identical for
// any thread count). C may overlap neither A nor B (Error otherwise, C unchanged); sizes must be >= 0
// and every leading dimension at least its row's length. Thread-safe (no shared state).
#include <cstdint>

namespace membank {

/// C = A op(B), overwriting C (m x n, leading dimension ldc). A is m x k (lda). op(B) is k x n:
/// B itself (k x n, ldb), or with transpose_b the transpose of B (B is n x k, ldb).
void matmul(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
            std::int64_t ldb, bool transpose_b, float* c, std::int64_t ldc);

/// C = A^T B, overwriting C (m x n, ldc): A is k x m (lda), B is k x n (ldb); a reduction over the
/// k rows that A and B share.
void matmul_at_b(std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
                 std::int64_t ldb, float* c, std::int64_t ldc);

}  // namespace membank
