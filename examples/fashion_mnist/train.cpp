// `membank train`: instance discrimination on Fashion-MNIST (Debian's dataset-fashion-mnist) with a
// small MLP encoder written on Eigen, data augmentation (random shifts, horizontal flips), the
// engine's memory bank (N = 60,000) and NCE with K negatives (or the exact full softmax). Per epoch:
// loss, and weighted-kNN / 1-NN accuracy of the 10,000 test images against the bank. Writes the
// final bank as an HDF5 snapshot with the training labels.
//
// --distributed (under mpirun, R ranks): data-parallel training. Every rank draws the same global
// batch (the single-process run's: same shuffle, same augmentation) and takes its slice of it
// (batch_slice: contiguous, rank order = batch order); forward, DistributedEngine::step and backward
// run on the slice; the encoder's gradients are summed over the ranks in rank order
// (allreduce_sum_rank_order: the same bits on every rank, so the encoders stay identical) and every
// rank takes the same SGD step. Rank 0 gathers the bank for each epoch's kNN and prints.
#include "check.hpp"
#include "commands.hpp"
#include "distributed_cli.hpp"
#ifdef MEMBANK_WITH_MPI
#include <membank/distributed_snapshot.hpp>
#endif
#include "options.hpp"
#include "encoders.hpp"

#include <membank/error.hpp>
#include <membank/knn.hpp>
#include <membank/snapshot.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <limits>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>

namespace membank::tools {

namespace {

struct TrainOptions {
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::string encoder = "mlp";
  index_t width = 512;
  int epochs = 10;
  index_t batch = 256;
  index_t k = 4096;
  // dhel: the best objective of the comparison table without labels (87.76 +- 0.29% over 3 seeds,
  // against 87.17 +- 0.38% for nce; README).
  std::string objective = "dhel";
  double tau_plus = 0.1;       // dcl, hcl
  double beta = 1.0;           // hcl
  bool detach_weights = false; // hcl
  double kernel_t = 2.0;       // kcl
  double gamma = 16.0;         // kcl
  double margin = std::numeric_limits<double>::quiet_NaN();  // contrastive, triplet (NaN: their default)
  bool exclude_same_label = false;
  int seeds = 3;               // --compare: seeds per configuration
  double tau = 0.07;
  double momentum = 0.5;
  float lr = 0.03f;
  float weight_decay = 5e-4f;
  std::string augment = "flip";
  int max_shift = 1;
  index_t dim = 128;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string bank_init = "encoder";
  std::string bank_dtype = "float32";
  std::string rounding = "nearest";
  std::string z_policy = "ema";
  bool fresh_knn = false;
  std::string snapshot = "fashion-mnist-bank.h5";
  bool compare = false;
  std::vector<std::string> compare_only;  // --compare: only the rows of these objectives (all when empty)
  index_t train_images = 0;
  std::string out;
  bool json = false;
  std::string distributed;  // "", replicated or sharded
};

/// Where a run executes: one process (ranks = 1, no mode), or rank `rank` of a distributed run.
struct RankInfo {
  int rank = 0, ranks = 1;
  std::string mode;  ///< "" (one process), replicated or sharded
  bool distributed() const { return !mode.empty(); }
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

constexpr float kMean = 0.2860f, kStd = 0.3530f;  // of the training pixels in [0, 1]

/// One augmented view of a standardised 28 x 28 image. "flip": a horizontal flip with p = 1/2.
/// "shift": the flip and a shift of up to `shift` pixels each way. "affine": the flip and a random
/// affine map (rotation within +-12 degrees, scale 0.85..1.15, shift within +-3 pixels), bilinear.
/// "none": a copy. The background fills what comes from outside the image.
void augment(const std::string& kind, int max_shift, const float* src, float* dst, std::mt19937_64& rng) {
  const float background = -kMean / kStd;
  if (kind == "none") {
    std::copy(src, src + 784, dst);
    return;
  }
  const bool flip = rng() & 1;
  if (kind == "flip" || kind == "shift") {
    std::uniform_int_distribution<int> shift(-max_shift, max_shift);
    const int dx = kind == "shift" ? shift(rng) : 0, dy = kind == "shift" ? shift(rng) : 0;
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        const int sx = (flip ? 27 - x : x) - dx, sy = y - dy;
        dst[y * 28 + x] = (sx >= 0 && sx < 28 && sy >= 0 && sy < 28) ? src[sy * 28 + sx] : background;
      }
    return;
  }
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const float angle = 0.21f * u(rng), scale = 1.0f + 0.15f * u(rng), tx = 3.0f * u(rng), ty = 3.0f * u(rng);
  // Output pixel (x, y) samples the source at R^-1 (p - c - t) / scale + c, c the centre.
  const float cs = std::cos(angle) / scale, sn = std::sin(angle) / scale, c = 13.5f;
  auto at = [&](int y, int x) { return (x >= 0 && x < 28 && y >= 0 && y < 28) ? src[y * 28 + x] : background; };
  for (int y = 0; y < 28; ++y)
    for (int x = 0; x < 28; ++x) {
      const float px = static_cast<float>(flip ? 27 - x : x) - c - tx, py = static_cast<float>(y) - c - ty;
      const float sx = cs * px + sn * py + c, sy = -sn * px + cs * py + c;
      const float fx = std::floor(sx), fy = std::floor(sy), ax = sx - fx, ay = sy - fy;
      const int ix = static_cast<int>(fx), iy = static_cast<int>(fy);
      dst[y * 28 + x] = (1 - ay) * ((1 - ax) * at(iy, ix) + ax * at(iy, ix + 1)) +
                        ay * ((1 - ax) * at(iy + 1, ix) + ax * at(iy + 1, ix + 1));
    }
}

/// Unit-norm encoder features of every image (no augmentation).
RowMatrixf encode(Encoder<float>& net, const RowMatrixf& images) {
  RowMatrixf out;
  const index_t block = 1000;
  for (index_t i = 0; i < images.rows(); i += block) {
    const index_t rows = std::min(block, images.rows() - i);
    const RowMatrixf x = images.middleRows(i, rows);
    const RowMatrixf& z = net.forward(x);
    if (out.size() == 0) out.resize(images.rows(), z.cols());
    out.middleRows(i, rows) = z.rowwise().normalized();
  }
  return out;
}

void progress(const std::string& what, int epoch, index_t done, index_t total, double loss) {
  if (!isatty(2)) return;
  const std::size_t width = 30, filled = static_cast<std::size_t>(30 * done / total);  // 0 <= done <= total
  fmt::print(stderr, "\r  {} epoch {:2d} [{}{}] {:3d}%  loss {:.4f}", what, epoch, std::string(filled, '#'),
             std::string(width - filled, '.'), static_cast<int>(100 * done / total), loss);
  if (done == total) fmt::print(stderr, "\r{:100}\r", "");
}

struct Data {
  Split train, test;
};

/// `j` with the kNN figures added.
nlohmann::json with_knn(nlohmann::json j, const KnnResult& r) {
  j["knn_top1"] = r.top1;
  j["knn_top5"] = r.top5;
  j["nn1"] = r.nn1;
  return j;
}

/// Weighted kNN / 1-NN of test features against train features (both any rows; normalised here).
KnnResult knn_of(const RowMatrixf& train_features, const RowMatrixf& test_features, const Data& d, double sigma) {
  const Bank bank = Bank::from_rows(train_features);
  return knn_evaluate(bank.view(), d.train.labels, test_features.rowwise().normalized(), d.test.labels,
                      KnnOptions{200, sigma});
}

/// One training run with the options' objective and K. Prints a line per epoch (unless quiet) and
/// returns the per-epoch figures; the engine is left for the caller to snapshot.
/// Distributed runs: rank 0's work (the kNN, the output) is ranks' own, other ranks skip it.
nlohmann::json train_run(const TrainOptions& o, const Data& d, std::unique_ptr<Engine>& engine_out, bool quiet,
                         const RankInfo& where = {}) {
  const auto t_start = std::chrono::steady_clock::now();
  const bool root = where.rank == 0, distributed = where.distributed();
  quiet = quiet || !root;
  const index_t n = d.train.images.rows();
  const std::string what = o.objective == "full" ? std::string("full softmax") : fmt::format("{} K={}", o.objective, o.k);
  EngineConfig cfg;
  cfg.k = o.objective == "full" ? 1 : o.k;
  cfg.tau = o.tau;
  cfg.momentum = o.momentum;
  cfg.objective = objective_from_string(o.objective);
  cfg.tau_plus = o.tau_plus;
  cfg.beta = o.beta;
  cfg.detach_weights = o.detach_weights;
  cfg.kernel_t = o.kernel_t;
  cfg.gamma = o.gamma;
  cfg.margin = o.margin;
  cfg.exclude_same_label = o.exclude_same_label;
  cfg.normalize_features = true;
  cfg.z_policy = z_policy_from_string(o.z_policy);
  cfg.seed = o.seed;
  cfg.rounding = rounding_from_string(o.rounding);
  const DType dtype = dtype_from_string(o.bank_dtype);
  auto net = make_encoder<float>(o.encoder, o.width, o.dim, o.seed);
  // The bank starts from the untrained encoder's features of the unaugmented images (or uniform on the
  // sphere): random rows would spend the first epochs pulling each image towards an arbitrary point.
  RowMatrixf start = encode(*net, d.train.images);
  KnnResult untrained{};
  if (root) untrained = knn_of(start, encode(*net, d.test.images), d, o.tau);
  // The training labels go to the engine only where the objective uses them (supervised objectives,
  // exclude_same_label): the self-supervised runs never see a label.
  std::vector<std::int64_t> labels;
  if (needs_labels(cfg.objective) || cfg.exclude_same_label) labels.assign(d.train.labels.begin(), d.train.labels.end());
  std::unique_ptr<Engine> engine;
#ifdef MEMBANK_WITH_MPI
  std::optional<DistributedEngine> dist;  // distributed runs
  if (distributed) {
    const Distributed mode = distributed_from_string(where.mode);
    collective([&] {  // (every rank raises the same errors here)
      if (o.bank_init == "encoder") {
        const RowRange held = mode == Distributed::replicated ? RowRange{0, n} : shard_rows(n, where.ranks, where.rank);
        dist.emplace(MPI_COMM_WORLD, mode, Bank::from_rows(start.middleRows(held.begin, held.size()), dtype), n,
                     std::make_unique<UniformSampler>(n), cfg, std::move(labels));
      } else {
        dist.emplace(DistributedEngine::seeded(MPI_COMM_WORLD, mode, n, o.dim, o.seed, dtype,
                                               std::make_unique<UniformSampler>(n), cfg, std::move(labels)));
      }
    });
  }
#endif
  if (!distributed)
    engine = std::make_unique<Engine>(o.bank_init == "encoder" ? Bank::from_rows(start, dtype)
                                                               : Bank(n, o.dim, o.seed, dtype),
                                      std::make_unique<UniformSampler>(n), cfg, std::move(labels));
  start.resize(0, 0);
  if (!quiet)
    fmt::print("epoch  0  (untrained {})          kNN top-1 {:6.2f}%  top-5 {:6.2f}%  1-NN {:6.2f}%\n",
               net->describe(), 100 * untrained.top1, 100 * untrained.top5, 100 * untrained.nn1);
  std::mt19937_64 rng(o.seed);
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  // Every rank makes the whole global batch x (the same draws as one process); its slice goes forward.
  const BatchSlice mine = batch_slice(o.batch, where.ranks, where.rank);
  RowMatrixf x(o.batch, 784), x_mine, grad(mine.size, o.dim);
  std::vector<index_t> ids(static_cast<std::size_t>(o.batch));
  [[maybe_unused]] const IdsRef ids_mine = IdsRef(ids).subspan(static_cast<std::size_t>(mine.begin), static_cast<std::size_t>(mine.size));
  std::vector<float> grads, scratch;     // distributed: the encoder's gradients, packed, and the all-reduce's room
  std::int64_t wire_bytes = 0, wire_steps = 0;  // distributed: bytes this rank sent (engine and all-reduce)
  nlohmann::json epochs = nlohmann::json::array();
  epochs.push_back(with_knn({{"epoch", 0}, {"loss", nullptr}, {"seconds", 0.0}}, untrained));
  const index_t total = n / o.batch;
  KnnResult last = untrained;
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    // cosine schedule over the steps
    double loss_sum = 0.0;
    index_t steps = 0;
    for (index_t b0 = 0; b0 + o.batch <= n; b0 += o.batch) {
      const double t = static_cast<double>((epoch - 1) * total + steps) / static_cast<double>(o.epochs * total);
      const auto lr = static_cast<float>(o.lr * 0.5 * (1.0 + std::cos(3.141592653589793 * t)));
      for (index_t b = 0; b < o.batch; ++b) {
        ids[static_cast<std::size_t>(b)] = order[static_cast<std::size_t>(b0 + b)];
        augment(o.augment, o.max_shift, d.train.images.row(ids[static_cast<std::size_t>(b)]).data(), x.row(b).data(), rng);
      }
      StepStats st;
      if (!distributed) {
        st = engine->step(net->forward(x), ids, grad);
      } else {
#ifdef MEMBANK_WITH_MPI
        x_mine = x.middleRows(mine.begin, mine.size);
        const RowMatrixf& z = net->forward(x_mine);
        st = collective([&] { return dist->step(z, ids_mine, grad); });
        wire_bytes += dist->last_wire().bytes_sent;
#endif
      }
      // (the loss is the global batch's, the same on every rank: every rank stops here together)
      if (!std::isfinite(st.loss))
        collective([&] {
          MEMBANK_THROW("{}: the loss became {} at epoch {} step {} (lower --lr)", what, st.loss, epoch, steps);
        });
      loss_sum += st.loss;
      net->backward(grad);
#ifdef MEMBANK_WITH_MPI
      if (distributed) {  // the global batch's gradient: the ranks' sums over their rows, summed in rank order
        auto params = net->parameters();
        grads.clear();
        for (auto& [p, g] : params) grads.insert(grads.end(), g->data(), g->data() + g->size());
        wire_bytes += allreduce_sum_rank_order(MPI_COMM_WORLD, grads.data(), grads.size(), scratch);
        std::size_t at = 0;
        for (auto& [p, g] : params) {
          std::copy_n(grads.data() + at, g->size(), g->data());
          at += static_cast<std::size_t>(g->size());
        }
        ++wire_steps;
      }
#endif
      net->sgd(lr, 0.9f, o.weight_decay);
      ++steps;
      if (root && (steps % 10 == 0 || steps == total))
        progress(what, epoch, steps, total, loss_sum / static_cast<double>(steps));
    }
    // The kNN against the whole bank: distributed runs gather it on rank 0 (fp32 rows).
    RowMatrixf gathered;
#ifdef MEMBANK_WITH_MPI
    if (distributed) collective([&] { gathered = dist->gather_bank(0); });
#endif
    if (!root) continue;
    const BankView bank = distributed ? BankView{gathered.data(), gathered.rows(), gathered.cols(), gathered.cols(),
                                                 DType::float32}
                                      : engine->bank().view();
    const RowMatrixf test_features = encode(*net, d.test.images);
    const KnnResult r = knn_evaluate(bank, d.train.labels, test_features, d.test.labels, KnnOptions{200, o.tau});
    std::optional<KnnResult> fresh;  // the same kNN against freshly encoded training images
    if (o.fresh_knn) fresh = knn_of(encode(*net, d.train.images), test_features, d, o.tau);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double loss = loss_sum / static_cast<double>(steps);
    epochs.push_back(with_knn({{"epoch", epoch}, {"loss", loss}, {"seconds", secs}}, r));
    if (fresh) epochs.back()["fresh"] = with_knn({}, *fresh);
    last = r;
    if (!quiet) {
      fmt::print("epoch {:2d}  loss {:8.4f}  kNN top-1 {:6.2f}%  top-5 {:6.2f}%  1-NN {:6.2f}%  ({:.0f} s)\n", epoch,
                 loss, 100 * r.top1, 100 * r.top5, 100 * r.nn1, secs);
      if (fresh)
        fmt::print("          re-encoded training images: kNN top-1 {:6.2f}%  1-NN {:6.2f}%\n", 100 * fresh->top1,
                   100 * fresh->nn1);
    }
  }
#ifdef MEMBANK_WITH_MPI
  // The final bank with the training labels, as one process writes it: a shard set (sharded) or one
  // file from rank 0 (replicated), membank/distributed_snapshot.hpp.
  if (distributed && !o.snapshot.empty()) {
    const std::vector<std::int64_t> labels64(d.train.labels.begin(), d.train.labels.end());
    collective([&] {
      dist->set_labels(labels64);
      save_distributed_snapshot(o.snapshot, *dist);
    });
    if (!quiet) fmt::print("bank written to {} (membank snapshot inspect {})\n", o.snapshot, o.snapshot);
  }
#endif
  engine_out = std::move(engine);
  nlohmann::json result = with_knn({{"objective", o.objective},
                                    {"k", o.objective == "full" ? nlohmann::json(nullptr) : nlohmann::json(o.k)},
                                    {"encoder", net->describe()},
                                    {"bank_dtype", o.bank_dtype},
                                    {"rounding", o.rounding},
                                    {"batch", o.batch},
                                    {"seed", o.seed},
                                    {"epochs", epochs}},
                                   last);
  result["distributed"] = distributed ? nlohmann::json(where.mode) : nlohmann::json(nullptr);
  result["ranks"] = where.ranks;
  if (distributed) {
    // rank 0's bytes sent per step (engine and gradient all-reduce); every rank's, in rank order
    const double mine_per_step = wire_steps ? static_cast<double>(wire_bytes) / static_cast<double>(wire_steps) : 0.0;
    std::vector<double> per_rank(static_cast<std::size_t>(where.ranks));
#ifdef MEMBANK_WITH_MPI
    collective([&] {
      MPI_Gather(&mine_per_step, 1, MPI_DOUBLE, per_rank.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    });
#endif
    result["wire_bytes_per_step_per_rank"] = per_rank;
    result["gradient_allreduce"] = "rank order (MPI_Alltoallv of blocks, sums in rank order, MPI_Allgatherv)";
    result["batch_per_rank"] = mine.size;
  }
  return result;
}

/// Features that need no training, measured by the same kNN: raw pixels in [0, 1], pixels with the
/// training mean image subtracted, and a Gaussian random projection of those to D dimensions.
nlohmann::json baselines(const TrainOptions& o, const Data& d) {
  const RowMatrixf raw_train = d.train.images.array() * kStd + kMean, raw_test = d.test.images.array() * kStd + kMean;
  const Eigen::RowVectorXf mean = raw_train.colwise().mean();
  const RowMatrixf centred_train = raw_train.rowwise() - mean, centred_test = raw_test.rowwise() - mean;
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> nd;
  RowMatrixf proj(784, o.dim);
  for (index_t i = 0; i < proj.size(); ++i) proj.data()[i] = nd(rng);
  nlohmann::json out = nlohmann::json::array();
  auto add = [&](const std::string& name, const RowMatrixf& tr, const RowMatrixf& te) {
    const KnnResult r = knn_of(tr, te, d, o.tau);
    out.push_back(with_knn({{"features", name}, {"dim", tr.cols()}}, r));
  };
  add("raw pixels", raw_train, raw_test);
  add("centred pixels", centred_train, centred_test);
  add(fmt::format("random projection to {}", o.dim), centred_train * proj, centred_test * proj);
  return out;
}

/// The JSON result also goes to --out, when given.
void write_json(const TrainOptions& o, const nlohmann::json& j) {
  if (o.out.empty()) return;
  std::ofstream f(o.out);
  f << j.dump(1) << "\n";
  MEMBANK_CHECK(f.good(), "--out {}: cannot write the JSON result", o.out);
}

void print_header(const TrainOptions& o, index_t n) {
  fmt::print("membank train: Fashion-MNIST, N = {}, {} encoder (width {}), D = {}, {}, tau = {}, m = {}, B = {}, "
             "lr = {}, augment {}, {} epochs, {} threads\n",
             n, o.encoder, o.width, o.dim,
             o.compare ? (o.compare_only.empty() ? std::string("every objective")
                                                 : fmt::format("objectives {}", fmt::join(o.compare_only, ", ")))
                       : fmt::format("objective {} (K = {})", o.objective, o.k),
             o.tau,
             o.momentum, o.batch, o.lr, o.augment, o.epochs, omp_get_max_threads());
}

/// One configuration of the comparison table.
struct CompareRun {
  std::string label;      ///< as printed
  std::string objective;
  index_t k = 0;          ///< 0: the options' K
  bool supervised = false;
};

/// mean, sample standard deviation (NaN for one value).
std::pair<double, double> mean_std(const std::vector<double>& v) {
  double m = 0.0;
  for (const double x : v) m += x;
  m /= static_cast<double>(v.size());
  double ss = 0.0;
  for (const double x : v) ss += (x - m) * (x - m);
  return {m, v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : std::numeric_limits<double>::quiet_NaN()};
}

/// The comparison table: the paper's Table 1 on this data (NCE with K = 1, 10, 512, 4096 and the exact
/// softmax) and every other objective, same encoder, budget and protocol, each over --seeds seeds
/// (seed, seed + 1, ...): the final epoch's kNN top-1 as mean +- sample std with the raw values. The
/// objectives that train on labels come in a block of their own; features that need no training first.
void run_compare(const TrainOptions& o, const Data& d) {
  const auto base = baselines(o, d);
  const std::vector<CompareRun> configs = {
      {"NCE K = 1", "nce", 1},           {"NCE K = 10", "nce", 10},       {"NCE K = 512", "nce", 512},
      {"NCE K = 4096", "nce", 4096},     {"exact full softmax", "full", 0}, {"infonce", "infonce", 0},
      {"dcl", "dcl", 0},                 {"hcl", "hcl", 0},                {"dhel", "dhel", 0},
      {"kcl", "kcl", 0},                 {"supcon", "supcon", 0, true},    {"contrastive", "contrastive", 0, true},
      {"triplet", "triplet", 0, true}};
  const auto selected = [&](const CompareRun& c) {
    return o.compare_only.empty() ||
           std::find(o.compare_only.begin(), o.compare_only.end(), c.objective) != o.compare_only.end();
  };
  if (!o.json) {
    print_header(o, d.train.images.rows());
    fmt::print("final-epoch weighted kNN top-1 (k = 200), mean +- sample std over {} seed(s) from {}, raw values "
               "in brackets\n", o.seeds, o.seed);
    for (const auto& b : base)
      fmt::print("  {:28} kNN top-1 {:6.2f}%  1-NN {:6.2f}%\n", b["features"].get<std::string>(),
                 100 * b["knn_top1"].get<double>(), 100 * b["nn1"].get<double>());
  }
  nlohmann::json runs = nlohmann::json::array();
  bool supervised_header = false;
  for (const auto& c : configs) {
    if (!selected(c)) continue;
    if (c.supervised && !supervised_header && !o.json) {
      fmt::print("supervised (these train on the labels; not comparable with the rows above):\n");
      supervised_header = true;
    }
    std::vector<double> top1;
    nlohmann::json per_seed = nlohmann::json::array();
    double seconds = 0.0;
    for (int i = 0; i < o.seeds; ++i) {
      TrainOptions run = o;
      run.objective = c.objective;
      run.seed = o.seed + static_cast<std::uint64_t>(i);
      if (c.k > 0) run.k = c.k;
      std::unique_ptr<Engine> engine;
      const auto t0 = std::chrono::steady_clock::now();
      per_seed.push_back(train_run(run, d, engine, true));
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      top1.push_back(per_seed.back()["knn_top1"].get<double>());
    }
    const auto [mean, sd] = mean_std(top1);
    runs.push_back({{"label", c.label}, {"objective", c.objective}, {"k", c.k > 0 ? c.k : o.k},
                    {"supervised", c.supervised}, {"knn_top1_mean", mean}, {"knn_top1_std", sd},
                    {"knn_top1", top1}, {"seconds", seconds}, {"seeds", per_seed}});
    if (!o.json) {
      std::string raw;
      for (const double x : top1) raw += fmt::format("{}{:.2f}", raw.empty() ? "" : ", ", 100 * x);
      fmt::print("  {:28} kNN top-1 {:6.2f} +- {:4.2f}%  [{}]  ({:.0f} s)\n", c.label, 100 * mean, 100 * sd, raw,
                 seconds);
    }
  }
  const nlohmann::json all = {{"baselines", base}, {"runs", runs}, {"seeds", o.seeds}};
  write_json(o, all);
  if (o.json) fmt::print("{}\n", all.dump());
}

/// --distributed: the run under MPI, rank 0 printing and writing.
void run_train_distributed(const TrainOptions& o, const Data& d) {
#ifdef MEMBANK_WITH_MPI
  run_with_mpi([&](int rank, int ranks) {
    collective([&] {  // (the same on every rank)
      MEMBANK_CHECK(o.batch >= ranks, "--batch {} with {} ranks: expected a global batch of at least one image per rank",
                    o.batch, ranks);
      MEMBANK_CHECK(d.train.images.rows() >= ranks, "--train-images {}: fewer images than the {} ranks",
                    d.train.images.rows(), ranks);
    });
    const bool root = rank == 0;
    if (!o.json && root) {
      print_header(o, d.train.images.rows());
      fmt::print("distributed: {} bank over {} ranks, global batch {} ({} to {} images per rank), encoder gradients "
                 "summed in rank order\n", o.distributed, ranks, o.batch, o.batch / ranks,
                 (o.batch + ranks - 1) / ranks);
    }
    std::unique_ptr<Engine> unused;
    const nlohmann::json result = train_run(o, d, unused, o.json, RankInfo{rank, ranks, o.distributed});
    if (!root) return;
    write_json(o, result);
    if (o.json) fmt::print("{}\n", result.dump());
  });
#else
  (void)o;
  (void)d;
  MEMBANK_THROW("--distributed: {}", no_mpi_message());
#endif
}

void run_train(TrainOptions o, bool snapshot_given) {
  if (!o.distributed.empty()) {
    MEMBANK_CHECK(kBuiltWithMpi, "--distributed: {}", no_mpi_message());
    MEMBANK_CHECK(!o.compare, "--compare with --distributed: expected one of them (the comparison table runs in one "
                  "process)");
  }
  (void)snapshot_given;
  apply_threads(o.threads);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // one line per epoch, also into a file or a pipe
  Data d{load_split(o.data, "train"), load_split(o.data, "t10k")};
  if (o.train_images > 0 && o.train_images < d.train.images.rows()) {  // a subset, for quick trials and smoke tests
    d.train.images.conservativeResize(o.train_images, Eigen::NoChange);
    d.train.labels.resize(static_cast<std::size_t>(o.train_images));
  }
  MEMBANK_CHECK(d.train.images.rows() >= 200 && d.train.images.rows() >= o.batch,
                "--train-images {}: the kNN (k = 200) and one batch of {} need at least max(200, batch) images",
                d.train.images.rows(), o.batch);
  // The outputs, before any training: directory, permissions, room for the snapshot of this bank.
  if (!o.snapshot.empty() && !o.compare) {
    try {
      check_snapshot_destination(o.snapshot, d.train.images.rows(), o.dim, dtype_from_string(o.bank_dtype));
    } catch (const ResourceError& e) {
      throw ResourceError("--snapshot: " + user_message(e.what()));
    } catch (const Error& e) {
      throw Error("--snapshot: " + user_message(e.what()));
    }
  }
  if (!o.out.empty()) require_output_space("--out", o.out, 1e6);
  if (o.compare) {
    run_compare(o, d);
    return;
  }
  if (!o.distributed.empty()) {
    run_train_distributed(o, d);
    return;
  }
  if (!o.json) print_header(o, d.train.images.rows());
  std::unique_ptr<Engine> engine;
  nlohmann::json result = train_run(o, d, engine, o.json);
  if (!o.snapshot.empty()) {
    std::vector<std::int64_t> labels64(d.train.labels.begin(), d.train.labels.end());
    save_snapshot(o.snapshot, *engine, {}, labels64);
    if (!o.json) fmt::print("bank written to {} (membank snapshot inspect {})\n", o.snapshot, o.snapshot);
  }
  write_json(o, result);
  if (o.json) fmt::print("{}\n", result.dump());
}

}  // namespace

void add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  auto* cmd = app.add_subcommand(
      "train",
      "Instance discrimination on Fashion-MNIST: a small encoder (CNN or MLP), augmentation, the memory bank and "
      "an objective against K draws from it (dhel by default); per epoch the loss and the weighted-kNN (k = 200, sigma = tau) / 1-NN accuracy of the 10,000 test "
      "images against the bank; the final bank is saved as an HDF5 snapshot. --compare runs the comparison table "
      "(NCE K = 1, 10, 512, 4096, the exact softmax, every other objective; --seeds each) against untrained "
      "features.");
  cmd->add_option("--data", o->data, "directory of the IDX files")->capture_default_str()->check(existing_directory(false));
  cmd->add_option("--encoder", o->encoder, "mlp (784-W-D) or cnn (conv5x5-W/2, pool, conv5x5-W, pool, linear; try --width 32)")
      ->capture_default_str()
      ->check(one_of({"cnn", "mlp"}));
  cmd->add_option("--width", o->width, "encoder width W (channels of the second conv, or hidden units)")
      ->capture_default_str()
      ->check(integer_in(2, 4096));
  cmd->add_option("--train-images", o->train_images,
                  "train on the first this many training images only (0: all 60,000); for quick trials")
      ->capture_default_str()
      ->check(integer_in(0));
  cmd->add_option("--epochs", o->epochs, "passes over the training images")->capture_default_str()->check(
      integer_in(1, INT_MAX));
  cmd->add_option("--batch", o->batch, "images per step")->capture_default_str()->check(integer_in(1, 60000));
  cmd->add_option("--k", o->k, "noise draws per image (negatives)")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--objective", o->objective,
                  "nce, infonce, dcl, hcl, dhel, kcl, full (exact softmax over the bank), or, training on the "
                  "labels, supcon, contrastive, triplet (docs/objectives.md)")
      ->capture_default_str()
      ->check(one_of({"nce", "infonce", "dcl", "hcl", "dhel", "kcl", "supcon", "contrastive", "triplet", "full"}));
  cmd->add_option("--tau-plus", o->tau_plus, "dcl, hcl: class prior tau+ in [0, 1)")
      ->capture_default_str()
      ->check(number_in(0.0, false, 1.0, true));
  cmd->add_option("--beta", o->beta, "hcl: concentration on hard negatives (0: dcl)")->capture_default_str()->check(
      number_in(0.0, false));
  cmd->add_flag("--detach-weights", o->detach_weights, "hcl: treat the importance weights as constants");
  cmd->add_option("--kernel-t", o->kernel_t, "kcl: t of the Gaussian kernel e^{-t |x - y|^2}")
      ->capture_default_str()
      ->check(positive_number());
  cmd->add_option("--gamma", o->gamma, "kcl: weight of the energy term")->capture_default_str()->check(
      number_in(0.0, false));
  cmd->add_option("--margin", o->margin,
                  "contrastive: margin on the distance |f - v| (default 1); triplet: on the squared distance "
                  "(default 0.2)")
      ->check(number_in(0.0, false));
  cmd->add_flag("--exclude-same-label", o->exclude_same_label,
                "draw no negative with the image's own label (trains on the labels)");
  cmd->add_option("--seeds", o->seeds, "--compare: seeds per configuration (mean +- sample std)")
      ->capture_default_str()
      ->check(integer_in(1, 100));
  cmd->add_option("--tau", o->tau, "temperature (also the kNN weight temperature)")->capture_default_str()->check(
      positive_number());
  cmd->add_option("--momentum", o->momentum, "bank momentum m")->capture_default_str()->check(number_in(0.0, false, 1.0));
  cmd->add_option("--lr", o->lr, "initial SGD learning rate (cosine schedule to 0, momentum 0.9)")
      ->capture_default_str()
      ->check(positive_number());
  cmd->add_option("--weight-decay", o->weight_decay, "weight decay of the encoder's weights")->capture_default_str()->check(
      number_in(0.0, false));
  cmd->add_option("--augment", o->augment,
                  "flip (horizontal, p = 1/2), shift (flip and a shift of up to --max-shift pixels), affine (flip, "
                  "rotation, scale, shift) or none")
      ->capture_default_str()
      ->check(one_of({"flip", "shift", "affine", "none"}));
  cmd->add_option("--max-shift", o->max_shift, "largest shift of --augment shift, in pixels")
      ->capture_default_str()
      ->check(integer_in(0, 14));
  cmd->add_option("--dim", o->dim, "embedding dimension D")->capture_default_str()->check(integer_in(1, 4096));
  cmd->add_option("--seed", o->seed, "seed of everything random")->capture_default_str()->check(seed_value());
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: default)")->capture_default_str()->check(thread_count());
  cmd->add_option("--bank-init", o->bank_init, "encoder (features of the untrained encoder) or random")
      ->capture_default_str()
      ->check(one_of({"encoder", "random"}));
  cmd->add_option("--bank-dtype", o->bank_dtype,
                  "storage type of the bank's rows: float32, float16 (half the memory; 11 significant bits) or "
                  "bfloat16 (half the memory; 8 bits)")
      ->capture_default_str()
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}));
  cmd->add_option("--rounding", o->rounding,
                  "how refreshed rows of a 2-byte bank are rounded: nearest, or stochastic (unbiased; for high "
                  "--momentum)")
      ->capture_default_str()
      ->check(CLI::IsMember({"nearest", "stochastic"}));
  cmd->add_option("--z", o->z_policy,
                  "NCE normalising constant: ema (re-estimated every step, smoothed) or first_batch (estimated once, "
                  "as in the paper; with the bank started from the encoder it is estimated while all features are "
                  "alike and stays far too large)")
      ->capture_default_str()
      ->check(one_of({"first_batch", "ema"}));
  cmd->add_option("--snapshot", o->snapshot,
                  "where to write the final bank with the training labels, relative to the current directory ('' for "
                  "nowhere; checked, with the room it needs, before training starts)")
      ->capture_default_str()
      ->check(output_file(true));
  cmd->add_flag("--compare", o->compare,
                "run the comparison table instead: raw pixels, centred pixels, a random projection, then NCE with "
                "K = 1, 10, 512, 4096, the exact full softmax and every other objective, each trained with the same "
                "options over --seeds seeds (13 configurations x 3 seeds: about an hour on 2 cores)");
  cmd->add_option("--compare-only", o->compare_only,
                  "--compare: only the rows of these objectives (comma-separated; nce selects its four K rows, "
                  "full the exact softmax); the baselines always run")
      ->delimiter(',')
      ->check(one_of({"nce", "full", "infonce", "dcl", "hcl", "dhel", "kcl", "supcon", "contrastive", "triplet"}));
  cmd->add_flag("--fresh-knn", o->fresh_knn,
                "also measure the kNN against the training images encoded afresh each epoch (the bank holds "
                "momentum-averaged features of augmented views from across the epoch)");
  cmd->add_option("--out", o->out, "also write the JSON result to this file")->check(output_file());
  cmd->add_flag("--json", o->json, "print one JSON object at the end instead of text");
  cmd->add_option("--distributed", o->distributed,
                  "data-parallel training under mpirun (mpirun -np R membank train --distributed sharded): the bank "
                  "replicated on every rank or sharded over the ranks (DistributedEngine); --batch is the global "
                  "batch, split over the ranks in rank order, so every R sees the single-process run's batches; the "
                  "encoder's gradients are summed over the ranks in rank order (identical on every rank; not bit-"
                  "identical to one process, whose sums run in another order); rank 0 prints and writes --out. "
                  "--snapshot writes a shard set (sharded) or one file (replicated). Not with --compare. Needs a build with "
                  "MPI")
      ->check(distributed_mode());
  cmd->callback(command([o, cmd] { run_train(*o, cmd->count("--snapshot") > 0); }));
}

}  // namespace membank::tools
