// How to embed membank in your own C++ training loop.
//
// Data: N points in R^P drawn around C cluster centres (the labels are never shown to training).
// Encoder: a linear map W (D x P); features f = normalise(W x). Each step hands the engine the raw
// W x of a batch with their instance ids; the engine normalises them (normalize_features), draws K
// noise instances, returns the NCE loss and dL/d(W x), and refreshes the bank rows of the batch.
// The loop then does the one thing it owns: dL/dW = sum_b g_b x_b^T and an SGD update.
//
// Prints, per epoch, the mean loss and the nearest-neighbour purity of the bank (how often a row's
// nearest other row belongs to the same cluster). Exits non-zero unless the loss fell and the
// purity rose: CTest runs it as an end-to-end check.
#include <membank/engine.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

using membank::index_t;
using membank::RowMatrixf;

namespace {

/// Fraction of (up to `probes`) bank rows whose nearest other row has the same label.
double nn_purity(const membank::Bank& bank, const std::vector<int>& label, index_t probes) {
  const auto v = bank.view().matrix();
  index_t same = 0;
  probes = std::min(probes, bank.size());
  for (index_t i = 0; i < probes; ++i) {
    Eigen::VectorXf s = v * v.row(i).transpose();
    s[i] = -2.0f;  // not itself
    index_t best;
    s.maxCoeff(&best);
    same += label[static_cast<std::size_t>(best)] == label[static_cast<std::size_t>(i)];
  }
  return static_cast<double>(same) / static_cast<double>(probes);
}

}  // namespace

int main() {
  const index_t n = 4000, p = 64, d = 32, clusters = 10, batch = 128, epochs = 8;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;

  // Synthetic clustered data.
  RowMatrixf centres(clusters, p), x(n, p);
  for (index_t c = 0; c < centres.size(); ++c) centres.data()[c] = normal(rng);
  std::vector<int> label(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    label[static_cast<std::size_t>(i)] = static_cast<int>(i % clusters);
    for (index_t c = 0; c < p; ++c) x(i, c) = centres(i % clusters, c) + 0.3f * normal(rng);
  }

  // The engine: a bank of N random unit rows, uniform noise, NCE with K negatives.
  membank::EngineConfig cfg;
  cfg.k = 256;
  cfg.tau = 0.1;
  cfg.momentum = 0.5;
  cfg.normalize_features = true;  // we pass W x; the gradient comes back through the normalisation
  cfg.seed = 7;
  membank::Engine engine(membank::Bank(n, d, 7), std::make_unique<membank::UniformSampler>(n), cfg);

  RowMatrixf w(d, p);
  for (index_t c = 0; c < w.size(); ++c) w.data()[c] = normal(rng) / std::sqrt(static_cast<float>(p));
  const float lr = 0.5f;

  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  RowMatrixf xb(batch, p), grad(batch, d);
  std::vector<index_t> ids(static_cast<std::size_t>(batch));
  const double purity0 = nn_purity(engine.bank(), label, 1000);
  fmt::print("epoch  0  loss      -   bank 1-NN purity {:.3f}\n", purity0);
  double first_loss = 0.0, last_loss = 0.0, purity = purity0;
  for (index_t epoch = 1; epoch <= epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    double loss_sum = 0.0;
    index_t steps = 0;
    for (index_t b0 = 0; b0 + batch <= n; b0 += batch) {
      for (index_t b = 0; b < batch; ++b) {
        ids[static_cast<std::size_t>(b)] = order[static_cast<std::size_t>(b0 + b)];
        for (index_t c = 0; c < p; ++c)  // augmentation: a little fresh noise on every view
          xb(b, c) = x(ids[static_cast<std::size_t>(b)], c) + 0.3f * normal(rng);
      }
      const RowMatrixf z = xb * w.transpose();                    // B x D, raw features
      const membank::StepStats st = engine.step(z, ids, grad);    // loss, dL/dz, bank refresh
      w.noalias() -= lr * grad.transpose() * xb;                  // dL/dW = G^T X
      loss_sum += st.loss;
      ++steps;
    }
    const double loss = loss_sum / static_cast<double>(steps);
    if (epoch == 1) first_loss = loss;
    last_loss = loss;
    purity = nn_purity(engine.bank(), label, 1000);
    fmt::print("epoch {:2d}  loss {:7.4f}   bank 1-NN purity {:.3f}   Z = {:.4g}\n", epoch, loss, purity,
               engine.partition().z());
  }
  const bool ok = last_loss < first_loss && purity > purity0 + 0.5;
  fmt::print("{}: loss {:.4f} -> {:.4f}, purity {:.3f} -> {:.3f}\n", ok ? "ok" : "FAILED", first_loss, last_loss,
             purity0, purity);
  return ok ? 0 : 1;
}
