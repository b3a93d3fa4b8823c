#pragma once
// A two-layer perceptron encoder on Eigen for the training tools: z = W2 relu(W1 x + b1) + b2.
// Forward keeps what backward needs; backward takes dL/dz (B x out) and accumulates parameter
// gradients; sgd() applies momentum SGD with weight decay. Row-major batches (B x in).
#include <membank/types.hpp>

#include <cmath>
#include <random>

namespace membank::tools {

class Mlp {
 public:
  Mlp(index_t in, index_t hidden, index_t out, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd;
    w1_ = RowMatrixf(hidden, in);
    w2_ = RowMatrixf(out, hidden);
    for (index_t i = 0; i < w1_.size(); ++i) w1_.data()[i] = nd(rng) * std::sqrt(2.0f / static_cast<float>(in));
    for (index_t i = 0; i < w2_.size(); ++i) w2_.data()[i] = nd(rng) * std::sqrt(1.0f / static_cast<float>(hidden));
    b1_ = Eigen::RowVectorXf::Zero(hidden);
    b2_ = Eigen::RowVectorXf::Zero(out);
    zero_velocity();
  }

  /// z = W2 relu(W1 x + b1) + b2 for a batch x (B x in).
  const RowMatrixf& forward(const RowMatrixf& x) {
    x_ = &x;
    h_.noalias() = x * w1_.transpose();
    h_.rowwise() += b1_;
    h_ = h_.cwiseMax(0.0f);
    z_.noalias() = h_ * w2_.transpose();
    z_.rowwise() += b2_;
    return z_;
  }

  /// Parameter gradients from dL/dz of the last forward batch (overwrites the previous ones).
  void backward(const RowMatrixf& dz) {
    gw2_.noalias() = dz.transpose() * h_;
    gb2_ = dz.colwise().sum();
    RowMatrixf dh = dz * w2_;
    dh = dh.cwiseProduct((h_.array() > 0.0f).cast<float>().matrix());
    gw1_.noalias() = dh.transpose() * *x_;
    gb1_ = dh.colwise().sum();
  }

  void sgd(float lr, float momentum, float weight_decay) {
    step(w1_, gw1_, vw1_, lr, momentum, weight_decay);
    step(w2_, gw2_, vw2_, lr, momentum, weight_decay);
    step(b1_, gb1_, vb1_, lr, momentum, 0.0f);
    step(b2_, gb2_, vb2_, lr, momentum, 0.0f);
  }

  // Parameters and gradients, for gradient checks.
  RowMatrixf& w1() { return w1_; }
  RowMatrixf& w2() { return w2_; }
  Eigen::RowVectorXf& b1() { return b1_; }
  const RowMatrixf& grad_w1() const { return gw1_; }
  const RowMatrixf& grad_w2() const { return gw2_; }
  const Eigen::RowVectorXf& grad_b1() const { return gb1_; }

 private:
  template <class P>
  static void step(P& p, const P& g, P& v, float lr, float momentum, float wd) {
    v = momentum * v + g + wd * p;
    p -= lr * v;
  }
  void zero_velocity() {
    vw1_ = RowMatrixf::Zero(w1_.rows(), w1_.cols());
    vw2_ = RowMatrixf::Zero(w2_.rows(), w2_.cols());
    vb1_ = Eigen::RowVectorXf::Zero(b1_.size());
    vb2_ = Eigen::RowVectorXf::Zero(b2_.size());
  }

  RowMatrixf w1_, w2_, gw1_, gw2_, vw1_, vw2_, h_, z_;
  Eigen::RowVectorXf b1_, b2_, gb1_, gb2_, vb1_, vb2_;
  const RowMatrixf* x_ = nullptr;
};

}  // namespace membank::tools
