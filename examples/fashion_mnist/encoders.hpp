#pragma once
// Small encoders on Eigen for the training tools: a two-layer perceptron and a two-block
// convolutional net for 28 x 28 single-channel images. Both take a row-major batch x (B x in) and
// give z (B x out); forward keeps what backward needs; backward takes dL/dz and sets the parameter
// gradients (it overwrites them); the base's sgd() applies momentum SGD with weight decay on the weights.
//
// Templated on the scalar so that tests can check the gradients by central differences in double;
// training uses float. Work is split over OpenMP threads in blocks whose boundaries depend only on
// the sizes, so the results are identical for any thread count.
#include <membank/linalg.hpp>
#include <membank/types.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace membank::tools {

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using Vec = Eigen::Matrix<S, 1, Eigen::Dynamic>;

namespace detail {

// Products of float matrices run on the engine's run-time-dispatched kernels (membank/linalg.hpp):
// the `membank` binary is built for baseline x86-64, and its encoders still multiply with the widest
// vectors the CPU has. Double (the gradient tests) multiplies with Eigen.

/// c = a * w^T (transpose_w) or a * w, rows of c in fixed blocks of 256 spread over the threads.
template <class S>
void gemm_rows(const Mat<S>& a, const Mat<S>& w, bool transpose_w, Mat<S>& c) {
  const index_t n = transpose_w ? w.rows() : w.cols();
  c.resize(a.rows(), n);
  const index_t block = 256, blocks = (a.rows() + block - 1) / block;
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < blocks; ++i) {
    const index_t r = std::min(block, a.rows() - i * block);
    if constexpr (std::is_same_v<S, float>) {
      membank::matmul(r, n, a.cols(), a.data() + i * block * a.cols(), a.cols(), w.data(), w.cols(), transpose_w,
                      c.data() + i * block * n, n);
    } else if (transpose_w) {
      c.middleRows(i * block, r).noalias() = a.middleRows(i * block, r) * w.transpose();
    } else {
      c.middleRows(i * block, r).noalias() = a.middleRows(i * block, r) * w;
    }
  }
}

/// c = a^T * b (a reduction over the rows of a and b), columns of c in fixed blocks of 64.
template <class S>
void gemm_atb(const Mat<S>& a, const Mat<S>& b, Mat<S>& c) {
  c.resize(a.cols(), b.cols());
  const index_t block = 64, blocks = (b.cols() + block - 1) / block;
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < blocks; ++j) {
    const index_t w = std::min(block, b.cols() - j * block);
    if constexpr (std::is_same_v<S, float>) {
      membank::matmul_at_b(a.cols(), w, a.rows(), a.data(), a.cols(), b.data() + j * block, b.cols(),
                           c.data() + j * block, c.cols());
    } else {
      c.middleCols(j * block, w).noalias() = a.transpose() * b.middleCols(j * block, w);
    }
  }
}

template <class P>
void sgd_step(P& p, const P& g, P& v, float lr, float momentum, float wd) {
  using S = typename P::Scalar;
  v = S(momentum) * v + g + S(wd) * p;
  p -= S(lr) * v;
}

template <class S>
void he_init(Mat<S>& w, index_t fan_in, std::mt19937_64& rng) {
  std::normal_distribution<double> nd;
  const double scale = std::sqrt(2.0 / static_cast<double>(fan_in));
  for (index_t i = 0; i < w.size(); ++i) w.data()[i] = static_cast<S>(nd(rng) * scale);
}

}  // namespace detail

/// The interface the training loop uses.
template <class S>
class Encoder {
 public:
  virtual ~Encoder() = default;
  virtual const Mat<S>& forward(const Mat<S>& x) = 0;
  virtual void backward(const Mat<S>& dz) = 0;
  /// Every parameter array with its gradient, weights first (then biases). A caller may overwrite the
  /// gradients between backward() and sgd() (data-parallel training sums them over the ranks).
  virtual std::vector<std::pair<Mat<S>*, Mat<S>*>> parameters() = 0;
  virtual std::string describe() const = 0;

  /// Momentum SGD on the last backward's gradients; weight decay on the weights only.
  void sgd(float lr, float momentum, float weight_decay) {
    auto ps = parameters();
    if (velocity_.empty())
      for (auto& [p, g] : ps) velocity_.push_back(Mat<S>::Zero(p->rows(), p->cols()));
    for (std::size_t i = 0; i < ps.size(); ++i)
      detail::sgd_step(*ps[i].first, *ps[i].second, velocity_[i], lr, momentum,
                       i < weight_arrays() ? weight_decay : 0.0f);
  }

 protected:
  /// How many of parameters() are weights (decayed).
  virtual std::size_t weight_arrays() const = 0;

 private:
  std::vector<Mat<S>> velocity_;
};

/// z = W2 relu(W1 x + b1) + b2.
template <class S>
class Mlp final : public Encoder<S> {
 public:
  Mlp(index_t in, index_t hidden, index_t out, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    w1_.resize(hidden, in);
    w2_.resize(out, hidden);
    detail::he_init(w1_, in, rng);
    detail::he_init(w2_, hidden, rng);
    b1_ = Mat<S>::Zero(1, hidden);
    b2_ = Mat<S>::Zero(1, out);
  }

  const Mat<S>& forward(const Mat<S>& x) override {
    x_ = &x;
    detail::gemm_rows(x, w1_, true, h_);
    h_ = (h_.rowwise() + Vec<S>(b1_)).cwiseMax(S(0));
    detail::gemm_rows(h_, w2_, true, z_);
    z_.rowwise() += Vec<S>(b2_);
    return z_;
  }

  void backward(const Mat<S>& dz) override {
    detail::gemm_atb(dz, h_, gw2_);
    gb2_ = dz.colwise().sum();
    detail::gemm_rows(dz, w2_, false, dh_);
    dh_ = dh_.cwiseProduct((h_.array() > S(0)).template cast<S>().matrix());
    detail::gemm_atb(dh_, *x_, gw1_);
    gb1_ = dh_.colwise().sum();
  }

  std::vector<std::pair<Mat<S>*, Mat<S>*>> parameters() override {
    return {{&w1_, &gw1_}, {&w2_, &gw2_}, {&b1_, &gb1_}, {&b2_, &gb2_}};
  }

  std::string describe() const override {
    return "MLP " + std::to_string(w1_.cols()) + "-" + std::to_string(w1_.rows()) + "-" + std::to_string(w2_.rows());
  }

 private:
  std::size_t weight_arrays() const override { return 2; }

  Mat<S> w1_, w2_, b1_, b2_, gw1_, gw2_, gb1_, gb2_, h_, dh_, z_;
  const Mat<S>* x_ = nullptr;
};

/// For 28 x 28 x 1 images: conv 5x5 (c1) - relu - maxpool 2 - conv 5x5 (c2) - relu - maxpool 2 -
/// linear to `out`. Convolutions are im2col + GEMM over the whole batch, activations NHWC.
template <class S>
class ConvNet final : public Encoder<S> {
 public:
  ConvNet(index_t c1, index_t c2, index_t out, std::uint64_t seed) : c1_(c1), c2_(c2) {
    std::mt19937_64 rng(seed);
    w1_.resize(c1, 25);
    w2_.resize(c2, 25 * c1);
    w3_.resize(out, 49 * c2);
    detail::he_init(w1_, 25, rng);
    detail::he_init(w2_, 25 * c1, rng);
    detail::he_init(w3_, 49 * c2, rng);
    w3_ *= S(std::sqrt(0.5));  // no relu after the last layer
    b1_ = Mat<S>::Zero(1, c1);
    b2_ = Mat<S>::Zero(1, c2);
    b3_ = Mat<S>::Zero(1, out);
  }

  const Mat<S>& forward(const Mat<S>& x) override {
    const index_t b = x.rows();
    im2col(x.data(), b, 28, 1, cols1_);        // (B*784) x 25
    detail::gemm_rows(cols1_, w1_, true, y1_);  // (B*784) x c1
    relu_bias(y1_, b1_);
    maxpool(y1_, b, 28, c1_, p1_, arg1_);      // (B*196) x c1
    im2col(p1_.data(), b, 14, c1_, cols2_);    // (B*196) x 25 c1
    detail::gemm_rows(cols2_, w2_, true, y2_);  // (B*196) x c2
    relu_bias(y2_, b2_);
    maxpool(y2_, b, 14, c2_, p2_, arg2_);      // (B*49) x c2
    p2_.resize(b, 49 * c2_);                   // row-major: one image per row, NHWC
    detail::gemm_rows(p2_, w3_, true, z_);
    z_.rowwise() += Vec<S>(b3_);
    return z_;
  }

  void backward(const Mat<S>& dz) override {
    const index_t b = dz.rows();
    detail::gemm_atb(dz, p2_, gw3_);
    gb3_ = dz.colwise().sum();
    detail::gemm_rows(dz, w3_, false, dp2_);                 // B x 49 c2
    unpool(dp2_.data(), arg2_, y2_, dy2_);     // (B*196) x c2, relu mask applied
    detail::gemm_atb(dy2_, cols2_, gw2_);
    gb2_ = dy2_.colwise().sum();
    detail::gemm_rows(dy2_, w2_, false, dcols2_);            // (B*196) x 25 c1
    col2im(dcols2_, b, 14, c1_, dp1_);         // (B*196) x c1
    unpool(dp1_.data(), arg1_, y1_, dy1_);     // (B*784) x c1
    detail::gemm_atb(dy1_, cols1_, gw1_);
    gb1_ = dy1_.colwise().sum();
  }

  std::vector<std::pair<Mat<S>*, Mat<S>*>> parameters() override {
    return {{&w1_, &gw1_}, {&w2_, &gw2_}, {&w3_, &gw3_}, {&b1_, &gb1_}, {&b2_, &gb2_}, {&b3_, &gb3_}};
  }

  std::string describe() const override {
    return "CNN conv5x5-" + std::to_string(c1_) + " pool conv5x5-" + std::to_string(c2_) + " pool fc-" +
           std::to_string(w3_.rows());
  }

 private:
  /// Calls fn(patch_row, column_offset, pixel_row) for every output pixel of `b` images hw x hw and
  /// every tap (dy, dx) of its 5 x 5 patch (zero padding 2) that falls inside the image: patch_row is
  /// the pixel's row in the im2col matrix, column_offset the tap's first column there (columns are
  /// ordered dy, dx, channel), pixel_row the tapped pixel's row in the NHWC input. Parallel over
  /// images: an image's patch rows and pixel rows belong to no other image.
  template <class Fn>
  static void for_each_tap(index_t b, index_t hw, index_t c, Fn&& fn) {
#pragma omp parallel for schedule(static)
    for (index_t n = 0; n < b; ++n)
      for (index_t y = 0; y < hw; ++y)
        for (index_t x = 0; x < hw; ++x)
          for (index_t dy = -2; dy <= 2; ++dy)
            for (index_t dx = -2; dx <= 2; ++dx) {
              const index_t sy = y + dy, sx = x + dx;
              if (sy < 0 || sy >= hw || sx < 0 || sx >= hw) continue;
              fn((n * hw + y) * hw + x, ((dy + 2) * 5 + (dx + 2)) * c, (n * hw + sy) * hw + sx);
            }
  }

  /// Patches of 5 x 5 around each pixel of `b` images hw x hw x c (NHWC), zero outside: one row per
  /// output pixel.
  static void im2col(const S* in, index_t b, index_t hw, index_t c, Mat<S>& cols) {
    cols = Mat<S>::Zero(b * hw * hw, 25 * c);
    for_each_tap(b, hw, c, [&](index_t row, index_t col, index_t pixel) {
      std::copy(in + pixel * c, in + (pixel + 1) * c, cols.row(row).data() + col);
    });
  }

  /// The adjoint of im2col: sums each patch gradient back onto its pixels. Each image's taps run in
  /// one thread, in a fixed order.
  static void col2im(const Mat<S>& dcols, index_t b, index_t hw, index_t c, Mat<S>& out) {
    out = Mat<S>::Zero(b * hw * hw, c);
    for_each_tap(b, hw, c, [&](index_t row, index_t col, index_t pixel) {
      const S* src = dcols.row(row).data() + col;
      S* dst = out.row(pixel).data();
      for (index_t k = 0; k < c; ++k) dst[k] += src[k];
    });
  }

  static void relu_bias(Mat<S>& y, const Mat<S>& bias) { y = (y.rowwise() + Vec<S>(bias)).cwiseMax(S(0)); }

  /// 2 x 2 max pooling of `b` maps hw x hw x c; remembers the winning input row of each output.
  static void maxpool(const Mat<S>& in, index_t b, index_t hw, index_t c, Mat<S>& out, std::vector<index_t>& arg) {
    const index_t ho = hw / 2;
    out.resize(b * ho * ho, c);
    arg.resize(static_cast<std::size_t>(out.size()));
#pragma omp parallel for schedule(static)
    for (index_t n = 0; n < b; ++n)
      for (index_t y = 0; y < ho; ++y)
        for (index_t x = 0; x < ho; ++x) {
          const index_t o = (n * ho + y) * ho + x;
          for (index_t k = 0; k < c; ++k) {
            index_t best = (n * hw + 2 * y) * hw + 2 * x;
            for (index_t q = 1; q < 4; ++q) {
              const index_t r = (n * hw + 2 * y + q / 2) * hw + 2 * x + q % 2;
              if (in(r, k) > in(best, k)) best = r;
            }
            out(o, k) = in(best, k);
            arg[static_cast<std::size_t>(o * c + k)] = best;
          }
        }
  }

  /// Routes the pooled gradient back to the winners, through the relu (zero where y <= 0).
  static void unpool(const S* dout, const std::vector<index_t>& arg, const Mat<S>& y, Mat<S>& din) {
    const index_t c = y.cols();
    din = Mat<S>::Zero(y.rows(), c);
    const auto outputs = static_cast<index_t>(arg.size());
    for (index_t i = 0; i < outputs; ++i) {  // windows do not overlap: each input row has one output
      const index_t r = arg[static_cast<std::size_t>(i)], k = i % c;
      if (y(r, k) > S(0)) din(r, k) = dout[i];
    }
  }

  std::size_t weight_arrays() const override { return 3; }

  index_t c1_, c2_;
  Mat<S> w1_, w2_, w3_, b1_, b2_, b3_, gw1_, gw2_, gw3_, gb1_, gb2_, gb3_;
  Mat<S> cols1_, y1_, p1_, cols2_, y2_, p2_, z_, dp2_, dy2_, dcols2_, dp1_, dy1_;
  std::vector<index_t> arg1_, arg2_;
};

/// "mlp" or "cnn", sized for 28 x 28 images.
template <class S>
std::unique_ptr<Encoder<S>> make_encoder(const std::string& kind, index_t width, index_t out, std::uint64_t seed) {
  if (kind == "cnn") return std::make_unique<ConvNet<S>>(width / 2, width, out, seed);
  return std::make_unique<Mlp<S>>(784, width, out, seed);
}

}  // namespace membank::tools
