#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"
#include "detail/parallel.hpp"
#include "step_kernels.hpp"
#include "kernels/kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>

namespace membank {

namespace {

constexpr index_t kTile = 1024;            // bank rows per GEMM tile
constexpr index_t kMinChunk = 16384;       // bank rows per independent partial result
constexpr index_t kMaxChunks = 128;        // bounds the partials' memory: kMaxChunks x B x D floats

/// Online softmax state of one chunk for every query: running max, sum of exp, and
/// acc = sum_j exp(s_j/tau - max) v_j.
struct Partial {
  Eigen::VectorXd max, sum;
  RowMatrixf acc;
};

}  // namespace

namespace {
double full_softmax_impl(const BankView& bank, FeaturesRef features, IdsRef ids, double tau, GradRef grad,
                         double* mean_z, double* mean_p_positive, double unit_norm_tolerance);
}  // namespace

double full_softmax_loss(const BankView& bank, FeaturesRef features, IdsRef ids, double tau, GradRef grad,
                         double* mean_z, double* mean_p_positive, double unit_norm_tolerance) {
  return detail::translate_bad_alloc("full_softmax_loss", [&] {
    return full_softmax_impl(bank, features, ids, tau, grad, mean_z, mean_p_positive, unit_norm_tolerance);
  });
}

namespace detail {

SoftmaxPartial softmax_partial(const BankView& bank, const RowMatrixf& f, double tau) {
  const index_t batch = f.rows(), dim = bank.dim, n = bank.rows;
  // Chunks depend only on N, never on the thread count: partials merge in chunk order.
  const index_t chunk = std::max(kMinChunk, (n + kMaxChunks - 1) / kMaxChunks);
  const index_t chunks = (n + chunk - 1) / chunk;
  {
    const int threads = omp_get_max_threads();
    std::int64_t need = mul_sat(threads, mul_sat(batch, kTile * 4));                   // per-thread scores
    need = add_sat(need, mul_sat(chunks, mul_sat(batch, add_sat(mul_sat(dim, 4), 16))));  // partials
    need = add_sat(need, mul_sat(batch, mul_sat(dim, 4 + 8)));                          // features copy, merged rows
    if (bank.dtype != DType::float32) need = add_sat(need, mul_sat(threads, mul_sat(kTile, dim * 4)));  // widened tiles
    require_memory(need, fmt::format("full_softmax_loss for B = {} queries (N = {}, D = {}, {} threads)", batch, n,
                                     dim, threads));
  }
  std::vector<Partial> partials(static_cast<std::size_t>(chunks));
  const float inv_tau = static_cast<float>(1.0 / tau);

  // Scratch made before the region (no allocation that could throw inside it but Eigen's own), one
  // batch x kTile block per thread, 64-byte aligned as softmax_tile requires (its vectorised loops
  // would otherwise round differently in each thread's buffer).
  constexpr index_t kAlign = 16;  // floats: 64 bytes
  const auto block = static_cast<std::size_t>(mul_no_overflow(batch, kTile, "full softmax scratch"));
  // A 2-byte bank's tiles are widened to fp32 first (kTile x dim more per thread).
  const bool widen = bank.dtype != DType::float32;
  const std::size_t tile_floats = widen ? static_cast<std::size_t>(kTile * dim) : 0;
  std::vector<std::vector<float>> scratch(static_cast<std::size_t>(omp_get_max_threads()),
                                          std::vector<float>(block + kAlign + tile_floats));
  const kernels::Table& kt = kernels::table();  // the instruction set, picked once per call
  detail::ExceptionCapture errors;
#pragma omp parallel
  {
    float* s = scratch[static_cast<std::size_t>(omp_get_thread_num())].data();
    s += (kAlign - reinterpret_cast<std::uintptr_t>(s) / sizeof(float) % kAlign) % kAlign;
    float* const tile = s + block;
#pragma omp for schedule(dynamic, 1)
    for (index_t c = 0; c < chunks; ++c) {
      errors.run([&] {
        Partial& p = partials[static_cast<std::size_t>(c)];
        p.max = Eigen::VectorXd::Constant(batch, -std::numeric_limits<double>::infinity());
        p.sum = Eigen::VectorXd::Zero(batch);
        p.acc = RowMatrixf::Zero(batch, dim);
        const index_t end = std::min(n, (c + 1) * chunk);
        for (index_t t0 = c * chunk; t0 < end; t0 += kTile) {
          const index_t rows = std::min(kTile, end - t0);
          const float* v = widen ? tile : bank.row(t0);
          if (widen) bank.widen_rows(t0, rows, tile, dim);
          kt.softmax_tile(f.data(), batch, dim, v, widen ? dim : bank.stride, rows, inv_tau, s, kTile,
                          p.max.data(), p.sum.data(), p.acc.data());
        }
      });
    }
  }

  errors.rethrow("full_softmax_loss");

  // Merge in chunk order.
  SoftmaxPartial out;
  out.max.resize(batch);
  out.sum.resize(batch);
  out.acc.resize(batch, dim);
  for (index_t i = 0; i < batch; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (const auto& p : partials) m = std::max(m, p.max[i]);
    double l = 0.0;
    Eigen::VectorXd acc = Eigen::VectorXd::Zero(dim);
    for (const auto& p : partials) {
      const double w = std::exp(p.max[i] - m);
      l += p.sum[i] * w;
      acc += p.acc.row(i).transpose().cast<double>() * w;
    }
    out.max[i] = m;
    out.sum[i] = l;
    out.acc.row(i) = acc.transpose();
  }
  return out;
}

}  // namespace detail

namespace {
double full_softmax_impl(const BankView& bank, FeaturesRef features, IdsRef ids, double tau, GradRef grad,
                         double* mean_z, double* mean_p_positive, double unit_norm_tolerance) {
  MEMBANK_CHECK(std::isfinite(tau) && tau > 0.0, "tau = {}: expected a finite temperature > 0", tau);
  MEMBANK_CHECK(!ids.empty(), "ids is empty: expected a batch of at least one id (B >= 1)");
  const auto batch = static_cast<index_t>(ids.size());
  const index_t dim = bank.dim, n = bank.rows;
  check_features(features, batch, dim, "features");
  check_unit_norm(features, unit_norm_tolerance, "features");
  check_ids(ids, n, "ids");
  MEMBANK_CHECK(grad.rows() == batch && grad.cols() == dim, "grad has shape {} x {}: expected {} x {} (B x D)",
                grad.rows(), grad.cols(), batch, dim);
  // grad is written while features, ids and the bank are read (aliasing contract, memory.hpp).
  const MemoryRegion g = MemoryRegion::of_matrix(grad);
  check_no_self_overlap(g, "grad");
  check_no_overlap(g, "grad", MemoryRegion::of_matrix(features), "features");
  check_no_overlap(g, "grad", MemoryRegion::of_span(ids), "ids");
  check_no_overlap(g, "grad", bank.region(), "the bank's rows");

  const RowMatrixf f = features;  // contiguous copy: the GEMM's left operand
  const detail::SoftmaxPartial part = detail::softmax_partial(bank, f, tau);
  // loss_i = log Z_i - s_iy / tau, dL/df_i = (sum_j P_j v_j - v_y) / (B tau).
  const kernels::Table& kt = kernels::table();
  const double coef = 1.0 / (static_cast<double>(batch) * tau);
  double loss = 0.0, z_total = 0.0, p_total = 0.0;
  std::vector<float> vy_row(static_cast<std::size_t>(dim));  // the positive's row, widened
  for (index_t i = 0; i < batch; ++i) {
    const double l = part.sum[i];
    const index_t y = ids[static_cast<std::size_t>(i)];
    bank.widen_rows(y, 1, vy_row.data(), dim);
    const float* vy = vy_row.data();
    const double s_y = kt.dot(vy, DType::float32, f.row(i).data(), dim) * (1.0 / tau);
    const double log_z = part.max[i] + std::log(l);
    loss += log_z - s_y;
    z_total += std::exp(log_z);
    p_total += std::exp(s_y - log_z);
    for (index_t c = 0; c < dim; ++c) grad(i, c) = static_cast<float>(coef * (part.acc(i, c) / l - vy[c]));
  }
  if (mean_z) *mean_z = z_total / static_cast<double>(batch);
  if (mean_p_positive) *mean_p_positive = p_total / static_cast<double>(batch);
  return loss / static_cast<double>(batch);
}
}  // namespace

}  // namespace membank
