// `membank train`: instance discrimination on Fashion-MNIST (Debian's dataset-fashion-mnist) with a
// small MLP encoder written on Eigen, data augmentation (random shifts, horizontal flips), the
// engine's memory bank (N = 60,000) and NCE with K negatives (or the exact full softmax). Per epoch:
// loss, and weighted-kNN / 1-NN accuracy of the 10,000 test images against the bank. Writes the
// final bank as an HDF5 snapshot with the training labels.
#include "commands.hpp"
#include "mlp.hpp"

#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/snapshot.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>

namespace membank::tools {

namespace {

struct TrainOptions {
  std::string data = "/usr/share/datasets/fashion-mnist";
  int epochs = 10;
  index_t batch = 256;
  index_t k = 4096;
  std::string objective = "nce";
  double tau = 0.07;
  double momentum = 0.5;
  float lr = 0.003f;
  index_t dim = 128;
  index_t hidden = 512;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string snapshot = "fashion-mnist-bank.h5";
  bool json = false;
};

/// An IDX file (gzip-compressed or plain) as bytes, after checking its magic and dimensions.
std::vector<unsigned char> read_idx(const std::string& path, int want_dims, std::vector<int>& dims) {
  gzFile f = gzopen(path.c_str(), "rb");
  MEMBANK_CHECK(f != nullptr, "{}: cannot open (install dataset-fashion-mnist, or pass --data)", path);
  std::vector<unsigned char> all;
  unsigned char buf[1 << 16];
  int got;
  while ((got = gzread(f, buf, sizeof buf)) > 0) all.insert(all.end(), buf, buf + got);
  gzclose(f);
  MEMBANK_CHECK(all.size() >= 4 && all[0] == 0 && all[1] == 0 && all[2] == 0x08 && all[3] == want_dims,
                "{}: not an IDX file of unsigned bytes with {} dimensions", path, want_dims);
  dims.clear();
  std::size_t count = 1;
  for (int d = 0; d < want_dims; ++d) {
    const std::size_t o = 4 + 4 * static_cast<std::size_t>(d);
    MEMBANK_CHECK(all.size() >= o + 4, "{}: truncated header", path);
    dims.push_back((all[o] << 24) | (all[o + 1] << 16) | (all[o + 2] << 8) | all[o + 3]);
    count *= static_cast<std::size_t>(dims.back());
  }
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(want_dims);
  MEMBANK_CHECK(all.size() == header + count, "{}: {} bytes of data: expected {}", path, all.size() - header, count);
  return {all.begin() + static_cast<std::ptrdiff_t>(header), all.end()};
}

struct Split {
  RowMatrixf images;  // n x 784, standardised
  std::vector<int> labels;
};

Split load_split(const std::string& dir, const std::string& prefix) {
  std::vector<int> idims, ldims;
  const auto img = read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz", 3, idims);
  const auto lab = read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz", 1, ldims);
  MEMBANK_CHECK(idims[0] == ldims[0] && idims[1] == 28 && idims[2] == 28, "{}: {} images of {} x {}, {} labels",
                prefix, idims[0], idims[1], idims[2], ldims[0]);
  Split s;
  s.images.resize(idims[0], 784);
  for (index_t i = 0; i < s.images.size(); ++i)
    s.images.data()[i] = (static_cast<float>(img[static_cast<std::size_t>(i)]) / 255.0f - 0.2860f) / 0.3530f;
  s.labels.assign(lab.begin(), lab.end());
  return s;
}

/// Random shift of up to 2 pixels each way (background fill) and a horizontal flip with p = 1/2.
void augment(const float* src, float* dst, std::mt19937_64& rng) {
  const float background = -0.2860f / 0.3530f;
  std::uniform_int_distribution<int> shift(-2, 2);
  const int dx = shift(rng), dy = shift(rng);
  const bool flip = rng() & 1;
  for (int y = 0; y < 28; ++y)
    for (int x = 0; x < 28; ++x) {
      const int sx = (flip ? 27 - x : x) - dx, sy = y - dy;
      dst[y * 28 + x] = (sx >= 0 && sx < 28 && sy >= 0 && sy < 28) ? src[sy * 28 + sx] : background;
    }
}

RowMatrixf encode(Mlp& net, const RowMatrixf& images) {
  RowMatrixf out(images.rows(), 0);
  const index_t block = 1000;
  for (index_t i = 0; i < images.rows(); i += block) {
    const index_t rows = std::min(block, images.rows() - i);
    const RowMatrixf x = images.middleRows(i, rows);
    const RowMatrixf& z = net.forward(x);
    if (out.cols() == 0) out.resize(images.rows(), z.cols());
    out.middleRows(i, rows) = z.rowwise().normalized();
  }
  return out;
}

void progress(int epoch, index_t done, index_t total, double loss) {
  if (!isatty(2)) return;
  const int width = 30, filled = static_cast<int>(width * done / total);
  fmt::print(stderr, "\r  epoch {:2d} [{}{}] {:3d}%  loss {:.4f}", epoch, std::string(filled, '#'),
             std::string(width - filled, '.'), static_cast<int>(100 * done / total), loss);
  if (done == total) fmt::print(stderr, "\r{:80}\r", "");
}

void run_train(const TrainOptions& o) {
  if (o.threads > 0) omp_set_num_threads(o.threads);
  const auto t_start = std::chrono::steady_clock::now();
  const Split train = load_split(o.data, "train"), test = load_split(o.data, "t10k");
  const index_t n = train.images.rows();
  std::vector<std::int64_t> labels64(train.labels.begin(), train.labels.end());

  EngineConfig cfg;
  cfg.k = o.k;
  cfg.tau = o.tau;
  cfg.momentum = o.momentum;
  cfg.objective = objective_from_string(o.objective);
  cfg.normalize_features = true;
  cfg.seed = o.seed;
  Engine engine(Bank(n, o.dim, o.seed), std::make_unique<UniformSampler>(n), cfg);
  Mlp net(784, o.hidden, o.dim, o.seed);
  std::mt19937_64 rng(o.seed);
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  RowMatrixf x(o.batch, 784), grad(o.batch, o.dim);
  std::vector<index_t> ids(static_cast<std::size_t>(o.batch));
  if (!o.json)
    fmt::print("membank train: Fashion-MNIST, N = {}, MLP 784-{}-{}, {} K = {}, tau = {}, m = {}, B = {}, {} epochs, "
               "{} threads\n", n, o.hidden, o.dim, o.objective, o.k, o.tau, o.momentum, o.batch, o.epochs,
               omp_get_max_threads());
  KnnResult last;
  nlohmann::json epochs = nlohmann::json::array();
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    const float lr = o.lr * 0.5f * (1.0f + std::cos(3.14159265f * (epoch - 1) / o.epochs));  // cosine schedule
    double loss_sum = 0.0;
    index_t steps = 0;
    const index_t total = n / o.batch;
    for (index_t b0 = 0; b0 + o.batch <= n; b0 += o.batch) {
      for (index_t b = 0; b < o.batch; ++b) {
        ids[static_cast<std::size_t>(b)] = order[static_cast<std::size_t>(b0 + b)];
        augment(train.images.row(ids[static_cast<std::size_t>(b)]).data(), x.row(b).data(), rng);
      }
      const RowMatrixf& z = net.forward(x);
      loss_sum += engine.step(z, ids, grad).loss;
      net.backward(grad);
      net.sgd(lr, 0.9f, 5e-4f);
      ++steps;
      if (steps % 10 == 0 || steps == total) progress(epoch, steps, total, loss_sum / static_cast<double>(steps));
    }
    const RowMatrixf q = encode(net, test.images);
    last = knn_evaluate(engine.bank().view(), train.labels, q, test.labels, KnnOptions{200, o.tau});
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double loss = loss_sum / static_cast<double>(steps);
    epochs.push_back({{"epoch", epoch}, {"loss", loss}, {"knn_top1", last.top1}, {"knn_top5", last.top5},
                      {"nn1", last.nn1}, {"seconds", secs}});
    if (!o.json)
      fmt::print("epoch {:2d}  loss {:8.4f}  kNN top-1 {:6.2f}%  top-5 {:6.2f}%  1-NN {:6.2f}%  ({:.0f} s)\n", epoch,
                 loss, 100 * last.top1, 100 * last.top5, 100 * last.nn1, secs);
  }
  if (!o.snapshot.empty()) {
    save_snapshot(o.snapshot, engine, {}, labels64);
    if (!o.json) fmt::print("bank written to {} (membank snapshot inspect {})\n", o.snapshot, o.snapshot);
  }
  if (o.json)
    fmt::print("{}\n", nlohmann::json{{"objective", o.objective}, {"k", o.k}, {"epochs", epochs},
                                      {"knn_top1", last.top1}, {"nn1", last.nn1}}
                           .dump());
}

}  // namespace

void add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand(
      "train",
      "Instance discrimination on Fashion-MNIST: an MLP encoder, augmentation, the memory bank and NCE; per epoch "
      "the loss and the weighted-kNN (k = 200) / 1-NN accuracy of the test images against the bank; the final "
      "bank is saved as an HDF5 snapshot.");
  cmd->add_option("--data", o->data, "directory of the IDX files")->capture_default_str();
  cmd->add_option("--epochs", o->epochs, "passes over the 60,000 training images")->capture_default_str()->check(
      CLI::PositiveNumber);
  cmd->add_option("--batch", o->batch, "images per step")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--k", o->k, "NCE noise draws per image")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--objective", o->objective, "nce, infonce, or full (exact softmax over the bank)")
      ->capture_default_str()
      ->check(CLI::IsMember({"nce", "infonce", "full"}));
  cmd->add_option("--tau", o->tau, "temperature (also the kNN weight temperature)")->capture_default_str();
  cmd->add_option("--momentum", o->momentum, "bank momentum m")->capture_default_str();
  cmd->add_option("--lr", o->lr, "initial SGD learning rate (cosine schedule, momentum 0.9)")->capture_default_str();
  cmd->add_option("--dim", o->dim, "embedding dimension D")->capture_default_str();
  cmd->add_option("--hidden", o->hidden, "hidden units of the MLP")->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of everything random")->capture_default_str();
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str();
  cmd->add_option("--snapshot", o->snapshot, "where to write the final bank ('' for nowhere)")->capture_default_str();
  cmd->add_flag("--json", o->json, "print one JSON object at the end instead of text");
  cmd->callback([o] { run_train(*o); });
}

}  // namespace membank::tools
