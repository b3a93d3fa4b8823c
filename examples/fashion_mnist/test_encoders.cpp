// The training tool's encoders (examples/fashion_mnist/encoders.hpp): backward against central differences in double,
// and bit-identical forward/backward for any thread count.
#include "encoders.hpp"

#include <doctest/doctest.h>
#include <omp.h>

#include <random>

using namespace membank;
using membank::tools::Mat;

namespace {

template <class S>
Mat<S> random_matrix(index_t rows, index_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  Mat<S> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(nd(rng));
  return m;
}

/// L = sum(dz .* z(x)): its gradient with respect to every parameter entry, by backward(dz), against
/// central differences; checks every entry of every parameter array.
void check_gradients(tools::Encoder<double>& net, const Mat<double>& x, std::uint64_t seed) {
  const Mat<double> z0 = net.forward(x);
  const Mat<double> dz = random_matrix<double>(z0.rows(), z0.cols(), seed);
  net.backward(dz);
  auto params = net.parameters();
  std::vector<Mat<double>> analytic;
  for (auto& [p, g] : params) analytic.push_back(*g);
  const double eps = 1e-6;
  double worst = 0.0;
  for (std::size_t a = 0; a < params.size(); ++a) {
    Mat<double>& p = *params[a].first;
    for (index_t i = 0; i < p.size(); ++i) {
      const double saved = p.data()[i];
      p.data()[i] = saved + eps;
      const double up = net.forward(x).cwiseProduct(dz).sum();
      p.data()[i] = saved - eps;
      const double down = net.forward(x).cwiseProduct(dz).sum();
      p.data()[i] = saved;
      const double numeric = (up - down) / (2 * eps), got = analytic[a].data()[i];
      const double err = std::abs(numeric - got) / std::max(1.0, std::abs(numeric));
      worst = std::max(worst, err);
      if (err > 1e-6) {
        INFO("parameter array " << a << " entry " << i << ": backward " << got << ", central difference " << numeric);
        CHECK(err <= 1e-6);
      }
    }
  }
  MESSAGE(net.describe() << ": worst relative gradient error " << worst);
}

}  // namespace

TEST_CASE("MLP encoder: backward equals central differences (double)") {
  tools::Mlp<double> net(11, 7, 5, 3);
  check_gradients(net, random_matrix<double>(4, 11, 1), 2);
}

TEST_CASE("CNN encoder: backward equals central differences (double)") {
  // 28 x 28 inputs, 2 then 3 channels, 4 outputs, a batch of 2: every weight and bias is checked.
  tools::ConvNet<double> net(2, 3, 4, 5);
  check_gradients(net, random_matrix<double>(2, 784, 6), 7);
}

TEST_CASE("encoders: forward and backward are bit-identical for 1, 2 and 3 threads") {
  const int saved = omp_get_max_threads();
  for (const char* kind : {"cnn", "mlp"}) {
    CAPTURE(kind);
    const Mat<float> x = random_matrix<float>(300, 784, 8);  // more than one 256-row GEMM block
    std::vector<Mat<float>> first;
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      auto net = tools::make_encoder<float>(kind, 8, 16, 9);
      const Mat<float> z = net->forward(x);
      net->backward(random_matrix<float>(z.rows(), z.cols(), 10));
      net->sgd(0.1f, 0.9f, 1e-3f);
      std::vector<Mat<float>> got{net->forward(x)};
      for (auto& [p, g] : net->parameters()) {
        got.push_back(*p);
        got.push_back(*g);
      }
      if (first.empty()) {
        first = got;
        continue;
      }
      for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == first[i]);
    }
  }
  omp_set_num_threads(saved);
}
