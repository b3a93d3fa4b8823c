// A program outside the membank source tree, built against the installed package (find_package or
// pkg-config; .ci/package-check). One full-softmax step on a small bank against the loss and the
// gradient written out in double here:
//   P(j|f_i) = exp(v_j . f_i / tau) / sum_l exp(v_l . f_i / tau)
//   L = -(1/B) sum_i log P(y_i|f_i),  dL/df_i = (sum_j P(j|f_i) v_j - v_{y_i}) / (B tau)
// Also: the library's version is the headers' version, and a caller error crosses the library
// boundary as membank::Error. Exit status 0 when every check holds.
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/version.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

int main() {
  using membank::index_t;
  const index_t n = 16, d = 8, b = 3;
  const double tau = 0.5;
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::fprintf(stderr, "FAILED: %s\n", what);
      ++failures;
    }
  };

  check(std::strcmp(membank::version(), MEMBANK_VERSION_STRING) == 0, "membank::version() == MEMBANK_VERSION_STRING");

  membank::EngineConfig cfg;
  cfg.objective = membank::Objective::full_softmax;
  cfg.tau = tau;
  cfg.momentum = 0.5;
  membank::Engine engine(membank::Bank(n, d, 11), std::make_unique<membank::UniformSampler>(n), cfg);
  const membank::RowMatrixf bank = engine.bank().to_matrix();  // the rows before the step

  // Features: unit rows that lean towards bank rows 2, 5 and 9 (their own ids).
  const std::vector<index_t> ids = {2, 5, 9};
  membank::RowMatrixf f(b, d);
  for (index_t i = 0; i < b; ++i) {
    for (index_t c = 0; c < d; ++c)
      f(i, c) = bank(ids[static_cast<std::size_t>(i)], c) + 0.25f * static_cast<float>((i + c) % 3 - 1);
    f.row(i).normalize();
  }

  membank::RowMatrixf grad(b, d);
  const membank::StepStats stats = engine.step(f, ids, grad);

  double loss = 0.0, max_err = 0.0, max_g = 0.0;
  for (index_t i = 0; i < b; ++i) {
    std::vector<double> s(static_cast<std::size_t>(n));
    double m = -INFINITY;
    for (index_t j = 0; j < n; ++j) {
      double dot = 0.0;
      for (index_t c = 0; c < d; ++c) dot += static_cast<double>(bank(j, c)) * f(i, c);
      s[static_cast<std::size_t>(j)] = dot / tau;
      m = std::max(m, s[static_cast<std::size_t>(j)]);
    }
    double z = 0.0;
    for (double v : s) z += std::exp(v - m);
    const index_t y = ids[static_cast<std::size_t>(i)];
    loss -= (s[static_cast<std::size_t>(y)] - m - std::log(z)) / static_cast<double>(b);
    for (index_t c = 0; c < d; ++c) {
      double g = -static_cast<double>(bank(y, c));
      for (index_t j = 0; j < n; ++j) g += std::exp(s[static_cast<std::size_t>(j)] - m) / z * bank(j, c);
      g /= static_cast<double>(b) * tau;
      max_err = std::max(max_err, std::abs(g - static_cast<double>(grad(i, c))));
      max_g = std::max(max_g, std::abs(g));
    }
  }
  std::printf("membank %s: loss %.6f (reference %.6f), largest gradient error %.2e of %.2e\n", membank::version(),
              stats.loss, loss, max_err, max_g);
  check(std::isfinite(stats.loss), "the loss is finite");
  check(std::abs(stats.loss - loss) <= 1e-5 * std::max(1.0, std::abs(loss)), "the loss equals the double reference");
  check(max_err <= 1e-5 * max_g, "the gradient equals the double reference");
  check(engine.steps_done() == 1, "the step counter advanced");

  // A caller error: an id outside [0, N) is refused with membank::Error, and nothing changes.
  bool threw = false;
  try {
    const std::vector<index_t> bad = {2, 5, n};
    engine.step(f, bad, grad);
  } catch (const membank::Error& e) {
    threw = std::strstr(e.what(), "membank:") != nullptr;
  }
  check(threw, "an id out of range throws membank::Error");
  check(engine.steps_done() == 1, "a refused step changes nothing");
  return failures == 0 ? 0 : 1;
}
