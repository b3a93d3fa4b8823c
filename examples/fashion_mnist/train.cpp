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
//
// --memory / --views: where the negatives are kept (one process only, for now).
//   bank      the memory bank above (Wu et al. 2018): one augmentation per image, K draws from N rows.
//   queue     MoCo (He et al. 2020): a key encoder, a momentum copy of the encoder (same architecture
//             and initial weights; after every SGD step theta_k <- m theta_k + (1 - m) theta_q), and
//             membank::Queue, a FIFO ring of its last Q keys. Two independent augmentations of each
//             image: q = encoder(query view), k = key encoder(key view), no gradient into k; the
//             queue's step gives dL/dq and enqueues k; backward through the encoder only.
//   in-batch  SimCLR (Chen et al. 2020): two augmentations of each image, one forward of the 2B stacked
//             rows, membank::InBatch on the two halves (K = 2B - 2), one backward of the stacked grads.
//   --views 2 CMC (Tian et al. 2020): membank::MultiViewEngine with one bank per view, each view's
//             features against the other view's bank (pairs (0, 1) and (1, 0), losses summed). CMC
//             proper encodes different channels of an image (L and ab) with an encoder per view; a
//             grayscale image has one channel, so here the two views are two augmentations of each
//             image, through one shared encoder (one forward of the 2B stacked rows).
// kNN: "memory kNN" is against the bank's rows (--views 2: view 0's bank); queue and in-batch keep no
// per-instance memory, so theirs is against the encoder's features of the unaugmented training
// images. Every run also reports that one ("encoder kNN"), so the mechanisms compare on one footing.
#include "check.hpp"
#include "commands.hpp"
#include "distributed_cli.hpp"
#ifdef MEMBANK_WITH_MPI
#include <membank/distributed_snapshot.hpp>
#endif
#include "options.hpp"
#include "encoders.hpp"

#include <membank/cluster_sampler.hpp>
#include <membank/dynamic_sampler.hpp>
#include <membank/error.hpp>
#include <membank/in_batch.hpp>
#include <membank/knn.hpp>
#include <membank/multiview.hpp>
#include <membank/queue.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/snapshot.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <limits>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <set>

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
  std::string memory = "bank";  // where the negatives are kept: bank, queue (MoCo) or in-batch (SimCLR)
  index_t queue_size = 4096;    // --memory queue: Q keys
  double key_momentum = 0.999;  // --memory queue: momentum of the key encoder (MoCo's)
  int views = 1;                // 2: CMC, one bank per view (two augmentations, one shared encoder)
  std::string sampler = "uniform";  // the bank's noise distribution: uniform, cluster (q(j | f)), dynamic or ring
  index_t clusters = 1024;          // --sampler cluster: C
  double cluster_epsilon = 0.1;     // --sampler cluster: the uniform share
  double cluster_beta = -1.0;       // --sampler cluster: sharpness (< 0: 1 / tau, the scores' own scale)
  int cluster_iterations = 3;       // --sampler cluster: Lloyd steps per refresh (once per epoch)
  index_t ring_lower = 1;           // --sampler ring: the ring's first rank (1: past the image's own row, usually)
  index_t ring_upper = -1;          // --sampler ring: one past its last rank (< 0: N / 10)
  bool allow_biased_sampler = false;  // train a biased sampler's draws with an objective that needs a valid P_n

  bool has_bank() const { return memory == "bank"; }
  /// Negatives per query: K draws from a bank, the queue's Q keys, or the batch's other 2B - 2 samples.
  index_t negatives() const { return memory == "queue" ? queue_size : memory == "in-batch" ? 2 * batch - 2 : k; }
};

/// --sampler ring's ranks over n rows (--ring-upper left out: N / 10, past --ring-lower).
RingConfig ring_ranks(const TrainOptions& o, index_t n) {
  return {o.ring_lower, o.ring_upper < 0 ? std::max<index_t>(o.ring_lower + 1, n / 10) : o.ring_upper};
}

/// The --sampler over n rows: uniform, cluster (fitted to `bank`, the whole n x D bank, which only it
/// reads; the engine re-fits it at the start of every epoch), dynamic (loss_ema drive) or ring.
std::unique_ptr<NoiseSampler> make_sampler(const TrainOptions& o, index_t n, const BankView& bank) {
  if (o.sampler == "cluster") {
    ClusterConfig cc;
    cc.clusters = std::min(o.clusters, n);
    cc.epsilon = o.cluster_epsilon;
    cc.beta = o.cluster_beta < 0.0 ? 1.0 / o.tau : o.cluster_beta;
    cc.refresh_every = n / o.batch;
    cc.iterations = o.cluster_iterations;
    cc.seed = o.seed;
    return std::make_unique<ClusterSampler>(bank, cc);
  }
  if (o.sampler == "dynamic") {
    // Every row starts at weight 1; after each step the engine re-weights the batch's rows to floor +
    // the average of their own loss (DynamicSampler's loss_ema drive; with two views, each image's
    // loss averaged over the pairs).
    DynamicSampler::Params dp;
    dp.drive = DynamicSampler::Drive::loss_ema;
    return std::make_unique<DynamicSampler>(std::vector<double>(static_cast<std::size_t>(n), 1.0), dp);
  }
  // Each image's negatives: uniform over the bank rows of score ranks [lower, upper) for it.
  if (o.sampler == "ring") return std::make_unique<RingSampler>(n, ring_ranks(o, n));
  return std::make_unique<UniformSampler>(n);
}

/// The objective and the memory, as the header and the progress bar name them.
std::string describe_run(const TrainOptions& o) {
  const std::string objective = o.objective == "full" ? std::string("full softmax") : o.objective;
  if (o.memory == "queue") return fmt::format("{}, queue Q={} (key momentum {})", objective, o.queue_size, o.key_momentum);
  if (o.memory == "in-batch") return fmt::format("{}, in-batch K=2B-2={}", objective, o.negatives());
  const std::string k = o.objective == "full" ? std::string() : fmt::format(" K={}", o.k);
  if (o.views == 2)
    return fmt::format("{}{}, CMC 2 views (2 banks, shared encoder){}", objective, k,
                       o.sampler == "uniform" ? std::string() : ", " + o.sampler + " sampler");
  if (o.sampler == "cluster") return fmt::format("{}{}, cluster sampler C={}", objective, k, o.clusters);
  if (o.sampler == "dynamic") return fmt::format("{}{}, dynamic sampler (loss average)", objective, k);
  if (o.sampler == "ring") return fmt::format("{}{}, ring sampler (biased)", objective, k);
  return objective + k;
}

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
                      KnnOptions{.k = 200, .sigma = sigma});
}

/// theta_k <- m theta_k + (1 - m) theta_q for every parameter array (MoCo's key encoder update).
void momentum_update(Encoder<float>& key, Encoder<float>& query, double m) {
  auto pk = key.parameters(), pq = query.parameters();
  const auto mf = static_cast<float>(m), rest = static_cast<float>(1.0 - m);
  for (std::size_t i = 0; i < pk.size(); ++i) *pk[i].first = mf * *pk[i].first + rest * *pq[i].first;
}

/// One training run with the options' objective and memory (--memory, --views). Prints a line per
/// epoch (unless quiet) and returns the per-epoch figures; the engine (single bank, one process) is
/// left for the caller to snapshot. Distributed runs: rank 0's work (the kNN, the output) is ranks'
/// own, other ranks skip it.
nlohmann::json train_run(const TrainOptions& o, const Data& d, std::unique_ptr<Engine>& engine_out, bool quiet,
                         const RankInfo& where = {}) {
  const auto t_start = std::chrono::steady_clock::now();
  const bool root = where.rank == 0, distributed = where.distributed();
  quiet = quiet || !root;
  const bool use_queue = o.memory == "queue", in_batch = o.memory == "in-batch", cmc = o.views == 2;
  MEMBANK_CHECK(!distributed || (o.has_bank() && !cmc), "--distributed with --memory {} --views {}: not supported yet",
                o.memory, o.views);
  const bool two_views = use_queue || in_batch || cmc;  // two augmentations of every image per step
  const index_t n = d.train.images.rows();
  const std::string what = describe_run(o);
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
  cfg.allow_biased_sampler = o.allow_biased_sampler;
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
  const bool label_step = needs_labels(cfg.objective) || cfg.exclude_same_label;
  std::vector<std::int64_t> labels;
  if (label_step && o.has_bank()) labels.assign(d.train.labels.begin(), d.train.labels.end());
  std::unique_ptr<Engine> engine;
  std::optional<MultiViewEngine> multiview;  // --views 2
  std::optional<Queue> queue;                // --memory queue
  std::unique_ptr<Encoder<float>> key_net;   // --memory queue: the momentum copy of net
  std::optional<InBatch> pairs;              // --memory in-batch
#ifdef MEMBANK_WITH_MPI
  std::optional<DistributedEngine> dist;  // distributed runs
  if (distributed) {
    const Distributed mode = distributed_from_string(where.mode);
    collective([&] {  // (every rank raises the same errors here)
      // dynamic: every rank re-weights the global batch's rows from the gathered losses; cluster:
      // every rank fits the same clusters to the whole starting bank (the engine re-fits them every
      // epoch, over the shards when sharded).
      if (o.bank_init == "encoder") {
        const RowRange held = mode == Distributed::replicated ? RowRange{0, n} : shard_rows(n, where.ranks, where.rank);
        Bank local = Bank::from_rows(start.middleRows(held.begin, held.size()), dtype);
        std::optional<Bank> whole;  // sharded: the whole starting bank, for a cluster sampler to be fitted to
        if (o.sampler == "cluster" && mode == Distributed::sharded) whole.emplace(Bank::from_rows(start, dtype));
        std::unique_ptr<NoiseSampler> sampler = make_sampler(o, n, whole ? whole->view() : local.view());
        whole.reset();
        dist.emplace(MPI_COMM_WORLD, mode, std::move(local), n, std::move(sampler), cfg, std::move(labels));
      } else {
        // (the whole seeded bank, made here too only for a cluster sampler to be fitted to)
        std::optional<Bank> fit;
        if (o.sampler == "cluster") fit.emplace(n, o.dim, o.seed, dtype);
        std::unique_ptr<NoiseSampler> sampler = make_sampler(o, n, fit ? fit->view() : BankView{});
        fit.reset();
        dist.emplace(DistributedEngine::seeded(MPI_COMM_WORLD, mode, n, o.dim, o.seed, dtype, std::move(sampler), cfg,
                                               std::move(labels)));
      }
    });
  }
#endif
  if (!distributed) {
    if (use_queue) {
      // Same architecture and seed: the key encoder starts with the encoder's weights. The queue
      // starts with Q seeded unit keys (as MoCo's starts from random normalised keys); --bank-dtype
      // is its storage type.
      key_net = make_encoder<float>(o.encoder, o.width, o.dim, o.seed);
      queue.emplace(o.queue_size, o.dim, cfg, dtype);
    } else if (in_batch) {
      pairs.emplace(cfg);
    } else if (cmc) {
      // Both banks start as the single bank does: the untrained encoder's features (the same rows in
      // both), or random unit rows (seed + v for view v).
      std::vector<Bank> banks;
      for (index_t v = 0; v < 2; ++v)
        banks.push_back(o.bank_init == "encoder" ? Bank::from_rows(start, dtype)
                                                 : Bank(n, o.dim, o.seed + static_cast<std::uint64_t>(v), dtype));
      // One sampler for both views; a cluster sampler holds the clusters of view 0's bank, and each
      // pair draws from its own query view's q (a ring: ranked in the pair's own bank).
      std::unique_ptr<NoiseSampler> shared_sampler = make_sampler(o, n, banks[0].view());
      multiview.emplace(std::move(banks), std::move(shared_sampler), cfg, ViewGraph::full, std::move(labels));
    } else {
      Bank bank = o.bank_init == "encoder" ? Bank::from_rows(start, dtype) : Bank(n, o.dim, o.seed, dtype);
      // A cluster sampler is fitted to the starting bank; the engine refreshes it every epoch.
      std::unique_ptr<NoiseSampler> sampler = make_sampler(o, n, bank.view());
      engine = std::make_unique<Engine>(std::move(bank), std::move(sampler), cfg, std::move(labels));
    }
  }
  start.resize(0, 0);
  const char* knn_against = use_queue || in_batch ? "encoder"  // no per-instance memory
                            : cmc                 ? "bank of view 0"
                                                  : "bank";
  if (!quiet) {
    if (use_queue || in_batch)
      fmt::print("kNN: against the encoder's features of the unaugmented training images (no per-instance memory: the "
                 "memory kNN is the encoder kNN)\n");
    else
      fmt::print("kNN: against {}; encoder kNN: against the encoder's features of the unaugmented training images\n",
                 cmc ? "view 0's bank" : "the bank's rows");
    fmt::print("epoch  0  (untrained {})          kNN top-1 {:6.2f}%  top-5 {:6.2f}%  1-NN {:6.2f}%\n",
               net->describe(), 100 * untrained.top1, 100 * untrained.top5, 100 * untrained.nn1);
  }
  std::mt19937_64 rng(o.seed);
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  // Every rank makes the whole global batch x (the same draws as one process); its slice goes forward.
  const BatchSlice mine = batch_slice(o.batch, where.ranks, where.rank);
  const index_t B = o.batch;
  // x: the batch (one view), or the query views (queue); xb: the key views (queue); x2: the 2B
  // stacked rows, view a then view b (in-batch, CMC). grad2: their gradients, stacked the same way.
  RowMatrixf x(two_views && !use_queue ? 0 : B, 784), xb(use_queue ? B : 0, 784), x2(two_views && !use_queue ? 2 * B : 0, 784);
  RowMatrixf x_mine, grad(mine.size, o.dim), grad2(two_views ? 2 * B : 0, o.dim);
  std::vector<index_t> ids(static_cast<std::size_t>(B));
  std::vector<std::int64_t> batch_labels;  // queue, in-batch: the batch's labels, where the objective uses them
  [[maybe_unused]] const IdsRef ids_mine = IdsRef(ids).subspan(static_cast<std::size_t>(mine.begin), static_cast<std::size_t>(mine.size));
  std::vector<float> grads, scratch;     // distributed: the encoder's gradients, packed, and the all-reduce's room
  std::int64_t wire_bytes = 0, wire_steps = 0;  // distributed: bytes this rank sent (engine and all-reduce)
  nlohmann::json epochs = nlohmann::json::array();
  epochs.push_back(with_knn({{"epoch", 0}, {"loss", nullptr}, {"seconds", 0.0}, {"train_seconds", 0.0},
                             {"encoder", with_knn({}, untrained)}},
                            untrained));
  const index_t total = n / B;
  KnnResult last = untrained, last_encoder = untrained;
  double train_seconds = 0.0;  // the training steps of every epoch (no evaluation)
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    const auto t_epoch = std::chrono::steady_clock::now();
    std::shuffle(order.begin(), order.end(), rng);
    // cosine schedule over the steps
    double loss_sum = 0.0;
    index_t steps = 0;
    for (index_t b0 = 0; b0 + B <= n; b0 += B) {
      const double t = static_cast<double>((epoch - 1) * total + steps) / static_cast<double>(o.epochs * total);
      const auto lr = static_cast<float>(o.lr * 0.5 * (1.0 + std::cos(3.141592653589793 * t)));
      for (index_t b = 0; b < B; ++b) {
        const index_t id = order[static_cast<std::size_t>(b0 + b)];
        ids[static_cast<std::size_t>(b)] = id;
        const float* image = d.train.images.row(id).data();
        if (!two_views) {
          augment(o.augment, o.max_shift, image, x.row(b).data(), rng);
        } else {  // two independent augmentations: view a, then view b
          augment(o.augment, o.max_shift, image, use_queue ? x.row(b).data() : x2.row(b).data(), rng);
          augment(o.augment, o.max_shift, image, use_queue ? xb.row(b).data() : x2.row(B + b).data(), rng);
        }
      }
      if (label_step && !o.has_bank()) {
        batch_labels.resize(static_cast<std::size_t>(B));
        for (index_t b = 0; b < B; ++b)
          batch_labels[static_cast<std::size_t>(b)] = d.train.labels[static_cast<std::size_t>(ids[static_cast<std::size_t>(b)])];
      }
      double loss = 0.0;
      if (distributed) {
#ifdef MEMBANK_WITH_MPI
        x_mine = x.middleRows(mine.begin, mine.size);
        const RowMatrixf& z = net->forward(x_mine);
        const StepStats st = collective([&] { return dist->step(z, ids_mine, grad); });
        loss = st.loss;
        wire_bytes += dist->last_wire().bytes_sent;
#endif
      } else if (use_queue) {
        const RowMatrixf& q = net->forward(x);
        const RowMatrixf& k = key_net->forward(xb);  // no backward through the key encoder
        loss = queue->step(q, k, grad, ids, batch_labels, true).loss;
      } else if (in_batch || cmc) {
        const RowMatrixf& z = net->forward(x2);
        auto grad_a = grad2.topRows(B), grad_b = grad2.bottomRows(B);
        if (in_batch) {
          loss = pairs->step(z.topRows(B), z.bottomRows(B), grad_a, grad_b, ids, batch_labels).loss;
        } else {
          const std::array<FeaturesRef, 2> views{z.topRows(B), z.bottomRows(B)};
          std::array<GradRef, 2> view_grads{grad_a, grad_b};
          loss = multiview->step(views, ids, view_grads).loss;  // the two pairs' losses, summed (CMC's)
        }
      } else {
        loss = engine->step(net->forward(x), ids, grad).loss;
      }
      // (the loss is the global batch's, the same on every rank: every rank stops here together)
      if (!std::isfinite(loss))
        collective([&] {
          MEMBANK_THROW("{}: the loss became {} at epoch {} step {} (lower --lr)", what, loss, epoch, steps);
        });
      loss_sum += loss;
      net->backward(two_views && !use_queue ? grad2 : grad);
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
      if (use_queue) momentum_update(*key_net, *net, o.key_momentum);
      ++steps;
      if (root && (steps % 10 == 0 || steps == total))
        progress(what, epoch, steps, total, loss_sum / static_cast<double>(steps));
    }
    const double epoch_train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_epoch).count();
    train_seconds += epoch_train_seconds;
    // The kNN against the whole bank: distributed runs gather it on rank 0 (fp32 rows).
    RowMatrixf gathered;
#ifdef MEMBANK_WITH_MPI
    if (distributed) collective([&] { gathered = dist->gather_bank(0); });
#endif
    if (!root) continue;
    const RowMatrixf test_features = encode(*net, d.test.images);
    // The encoder's features of the unaugmented training images, for every memory.
    const KnnResult encoder_knn = knn_of(encode(*net, d.train.images), test_features, d, o.tau);
    KnnResult r = encoder_knn;  // queue, in-batch: no per-instance memory
    if (o.has_bank()) {
      const BankView bank = distributed ? BankView{gathered.data(), gathered.rows(), gathered.cols(), gathered.cols(),
                                                   DType::float32}
                            : cmc       ? multiview->bank(0).view()
                                        : engine->bank().view();
      r = knn_evaluate(bank, d.train.labels, test_features, d.test.labels, KnnOptions{.k = 200, .sigma = o.tau});
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double loss = loss_sum / static_cast<double>(steps);
    epochs.push_back(with_knn({{"epoch", epoch}, {"loss", loss}, {"seconds", secs}, {"train_seconds", epoch_train_seconds},
                               {"encoder", with_knn({}, encoder_knn)}},
                              r));
    if (o.fresh_knn) epochs.back()["fresh"] = with_knn({}, encoder_knn);  // (the former name of "encoder")
    last = r;
    last_encoder = encoder_knn;
    if (!quiet)
      fmt::print("epoch {:2d}  loss {:8.4f}  kNN top-1 {:6.2f}%  top-5 {:6.2f}%  1-NN {:6.2f}%  encoder kNN top-1 "
                 "{:6.2f}%  1-NN {:6.2f}%  ({:.1f} s training, {:.0f} s in all)\n",
                 epoch, loss, 100 * r.top1, 100 * r.top5, 100 * r.nn1, 100 * encoder_knn.top1, 100 * encoder_knn.nn1,
                 epoch_train_seconds, secs);
  }
  const double seconds_per_epoch = train_seconds / static_cast<double>(o.epochs);
  if (!quiet)
    fmt::print("time per epoch: {:.1f} s of training steps (mean over {} epochs; the kNN evaluation not counted)\n",
               seconds_per_epoch, o.epochs);
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
                                    {"k", o.objective == "full" && o.has_bank() ? nlohmann::json(nullptr)
                                                                                : nlohmann::json(o.negatives())},
                                    {"memory", o.memory},
                                    {"sampler", o.sampler},
                                    {"clusters", o.sampler == "cluster" ? nlohmann::json(o.clusters) : nlohmann::json(nullptr)},
                                    {"ring", o.sampler == "ring" ? nlohmann::json::array({ring_ranks(o, n).lower, ring_ranks(o, n).upper})
                                                                 : nlohmann::json(nullptr)},
                                    {"views", o.views},
                                    {"queue_size", use_queue ? nlohmann::json(o.queue_size) : nlohmann::json(nullptr)},
                                    {"key_momentum", use_queue ? nlohmann::json(o.key_momentum) : nlohmann::json(nullptr)},
                                    {"knn_against", knn_against},
                                    {"encoder_knn", with_knn({}, last_encoder)},
                                    {"seconds_per_epoch", seconds_per_epoch},
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
    [[maybe_unused]] const double mine_per_step = wire_steps ? static_cast<double>(wire_bytes) / static_cast<double>(wire_steps) : 0.0;
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
             o.compare ? (o.compare_only.empty() ? fmt::format("every objective, then the memories with {}", o.objective)
                          : o.compare_only == std::vector<std::string>{"memory"}
                              ? fmt::format("the memories with {}", o.objective)
                              : fmt::format("rows {}", fmt::join(o.compare_only, ", ")))
                       : fmt::format("objective {}", describe_run(o)),
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

/// `values` as "a, b, c" in percent.
std::string raw_percent(const std::vector<double>& values) {
  std::string raw;
  for (const double x : values) raw += fmt::format("{}{:.2f}", raw.empty() ? "" : ", ", 100 * x);
  return raw;
}

/// The comparison's block of memories: the same objective (--objective), encoder, budget and protocol
/// with the negatives kept in a bank, a queue of Q = 4096 or 16384 keys (MoCo), the batch's other
/// samples (SimCLR) or two banks, one per view (CMC), each over --seeds seeds. Per row: the final
/// epoch's memory kNN and encoder kNN (mean +- sample std, raw values) and the training seconds per
/// epoch (mean over the seeds). Rows whose memory the objective does not apply to are listed as not run.
nlohmann::json compare_memories(const TrainOptions& o, const Data& d) {
  struct MemoryRun {
    std::string label, memory;
    index_t queue_size;
    int views;
  };
  const std::vector<MemoryRun> configs = {{"bank", "bank", 0, 1},
                                          {"queue Q = 4096", "queue", 4096, 1},
                                          {"queue Q = 16384", "queue", 16384, 1},
                                          {"in-batch (2 views)", "in-batch", 0, 1},
                                          {"CMC 2 views (2 banks)", "bank", 0, 2}};
  const bool keyed_applies = o.objective != "nce" && o.objective != "full";
  if (!o.json)
    fmt::print("memories, objective {} (banks: K = {}; queue: key momentum {}; in-batch: K = 2B - 2 = {}); memory kNN "
               "against the bank (CMC: view 0's), for queue and in-batch the encoder's features; encoder kNN against "
               "the encoder's features of the unaugmented training images; training seconds per epoch (mean over "
               "seeds, evaluation not counted):\n",
               o.objective, o.k, o.key_momentum, 2 * o.batch - 2);
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& c : configs) {
    if (c.memory != "bank" && !keyed_applies) {
      const std::string why = fmt::format("objective {} does not apply to --memory {}", o.objective, c.memory);
      rows.push_back({{"label", c.label}, {"memory", c.memory}, {"skipped", why}});
      if (!o.json) fmt::print("  {:24} not run: {}\n", c.label, why);
      continue;
    }
    std::vector<double> top1, encoder_top1, per_epoch;
    nlohmann::json per_seed = nlohmann::json::array();
    double seconds = 0.0;
    for (int i = 0; i < o.seeds; ++i) {
      TrainOptions run = o;
      run.memory = c.memory;
      run.views = c.views;
      if (c.queue_size > 0) run.queue_size = c.queue_size;
      run.seed = o.seed + static_cast<std::uint64_t>(i);
      std::unique_ptr<Engine> engine;
      const auto t0 = std::chrono::steady_clock::now();
      per_seed.push_back(train_run(run, d, engine, true));
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      top1.push_back(per_seed.back()["knn_top1"].get<double>());
      encoder_top1.push_back(per_seed.back()["encoder_knn"]["knn_top1"].get<double>());
      per_epoch.push_back(per_seed.back()["seconds_per_epoch"].get<double>());
    }
    const auto [mean, sd] = mean_std(top1);
    const auto [enc_mean, enc_sd] = mean_std(encoder_top1);
    const double secs_per_epoch = mean_std(per_epoch).first;
    rows.push_back({{"label", c.label}, {"memory", c.memory}, {"views", c.views},
                    {"queue_size", c.queue_size > 0 ? nlohmann::json(c.queue_size) : nlohmann::json(nullptr)},
                    {"objective", o.objective}, {"knn_top1_mean", mean}, {"knn_top1_std", sd}, {"knn_top1", top1},
                    {"encoder_knn_top1_mean", enc_mean}, {"encoder_knn_top1_std", enc_sd},
                    {"encoder_knn_top1", encoder_top1}, {"seconds_per_epoch", secs_per_epoch}, {"seconds", seconds},
                    {"seeds", per_seed}});
    if (!o.json)
      fmt::print("  {:24} memory kNN {:6.2f} +- {:4.2f}% [{}]  encoder kNN {:6.2f} +- {:4.2f}% [{}]  {:5.1f} s/epoch\n",
                 c.label, 100 * mean, 100 * sd, raw_percent(top1), 100 * enc_mean, 100 * enc_sd,
                 raw_percent(encoder_top1), secs_per_epoch);
  }
  return rows;
}

/// The comparison table: the paper's Table 1 on this data (NCE with K = 1, 10, 512, 4096 and the exact
/// softmax) and every other objective, same encoder, budget and protocol, each over --seeds seeds
/// (seed, seed + 1, ...): the final epoch's kNN top-1 as mean +- sample std with the raw values. The
/// objectives that train on labels come in a block of their own; features that need no training first;
/// the block of memories (compare_memories) last.
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
  nlohmann::json all = {{"baselines", base}, {"runs", runs}, {"seeds", o.seeds}};
  if (o.compare_only.empty() ||
      std::find(o.compare_only.begin(), o.compare_only.end(), "memory") != o.compare_only.end())
    all["memory_runs"] = compare_memories(o, d);
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

/// The options given on the command line (not their defaults), for the checks of combinations.
using Given = std::set<std::string>;

/// One error for a combination of --memory, --views and the other options that does not apply (or is
/// not supported yet), before any data is read. A run without a bank writes no snapshot unless
/// --snapshot asks for one, which is refused.
void check_memory_options(TrainOptions& o, const Given& given) {
  const auto has = [&](const char* name) { return given.count(name) > 0; };
  if (o.compare) {
    for (const char* name : {"--memory", "--views", "--queue-size", "--sampler"})
      MEMBANK_CHECK(!has(name), "{} with --compare: the comparison's block of memories (--compare-only memory) sets "
                    "each row's memory, views and queue size", name);
    return;
  }
  const bool keyed = o.memory == "queue" || o.memory == "in-batch";
  MEMBANK_CHECK(o.views == 1 || o.has_bank(), "--views {} with --memory {}: not supported (CMC keeps one bank per "
                "view); expected --memory bank", o.views, o.memory);
  if (!o.distributed.empty()) {
    MEMBANK_CHECK(o.has_bank(), "--distributed with --memory {}: not supported yet (the distributed run keeps a "
                  "bank, sharded or replicated); expected --memory bank", o.memory);
    MEMBANK_CHECK(o.views == 1, "--distributed with --views {}: not supported yet (the distributed run keeps one "
                  "bank); expected --views 1", o.views);
  }
  MEMBANK_CHECK(!keyed || (o.objective != "nce" && o.objective != "full"),
                "--memory {} with --objective {}: does not apply ({}); expected infonce, dcl, hcl, dhel, kcl, or with "
                "labels supcon, contrastive, triplet", o.memory, o.objective,
                o.objective == "nce" ? "nce models draws from a noise distribution over the N instances of a bank"
                                     : "the exact softmax runs over the N rows of a bank");
  MEMBANK_CHECK(o.memory == "queue" || !has("--queue-size"), "--queue-size with --memory {}: applies to --memory "
                "queue only", o.memory);
  MEMBANK_CHECK(o.memory == "queue" || !has("--key-momentum"), "--key-momentum with --memory {}: applies to --memory "
                "queue only (the bank's momentum is --momentum)", o.memory);
  if (keyed) {
    const std::string negatives = o.memory == "queue" ? "the queue's --queue-size keys"
                                                      : "the batch's other 2B - 2 samples";
    MEMBANK_CHECK(!has("--k"), "--k with --memory {}: does not apply (the negatives are {})", o.memory, negatives);
    MEMBANK_CHECK(!has("--momentum"), "--momentum with --memory {}: does not apply (no bank to refresh{})", o.memory,
                  o.memory == "queue" ? "; the key encoder's momentum is --key-momentum" : "");
    MEMBANK_CHECK(!has("--bank-init"), "--bank-init with --memory {}: does not apply (no bank{})", o.memory,
                  o.memory == "queue" ? "; the queue starts with seeded random keys" : "");
  }
  if (o.memory == "in-batch") {
    for (const char* name : {"--bank-dtype", "--rounding"})
      MEMBANK_CHECK(!has(name), "{} with --memory in-batch: does not apply (nothing is stored)", name);
    MEMBANK_CHECK(o.batch >= 2, "--batch {} with --memory in-batch: expected at least 2 images per batch (each "
                  "sample's negatives are the batch's others)", o.batch);
  }
  if (o.sampler != "uniform") {
    MEMBANK_CHECK(o.has_bank(), "--sampler {} with --memory {}: does not apply (the sampler draws a bank's rows); "
                  "expected --memory bank", o.sampler, o.memory);
    MEMBANK_CHECK(o.objective != "full", "--sampler {} with --objective full: does not apply (the exact softmax draws "
                  "nothing)", o.sampler);
  }
  for (const char* name : {"--clusters", "--cluster-epsilon", "--cluster-beta", "--cluster-iterations"})
    MEMBANK_CHECK(o.sampler == "cluster" || !has(name), "{} with --sampler {}: applies to --sampler cluster only",
                  name, o.sampler);
  MEMBANK_CHECK(o.sampler != "ring" || o.allow_biased_sampler || !needs_valid_noise(objective_from_string(o.objective)),
                "--sampler ring with --objective {}: the ring sampler is biased (no draw outside each image's ring), "
                "and {}'s estimate needs a valid P_n; pass --allow-biased-sampler to train on the draws weighed as "
                "uniform ones (the hard-negative methods' loss), or use --objective contrastive or triplet", o.objective,
                o.objective);
  MEMBANK_CHECK(o.ring_upper < 0 || o.ring_upper > o.ring_lower, "--ring-upper {}: expected more than --ring-lower {}",
                o.ring_upper, o.ring_lower);
  for (const char* name : {"--ring-lower", "--ring-upper", "--allow-biased-sampler"})
    MEMBANK_CHECK(o.sampler == "ring" || !has(name), "{} with --sampler {}: applies to --sampler ring only", name,
                  o.sampler);
  if (!o.has_bank() || o.views != 1) {
    const std::string which = o.has_bank() ? fmt::format("--views {}", o.views) : "--memory " + o.memory;
    MEMBANK_CHECK(!has("--snapshot") || o.snapshot.empty(), "--snapshot with {}: not supported yet (a snapshot holds "
                  "one bank, and this run keeps {}); leave --snapshot out or pass --snapshot ''", which,
                  o.has_bank() ? "one bank per view" : "none");
    o.snapshot.clear();  // (the default's file is not written)
  }
}

void run_train(TrainOptions o, const Given& given) {
  check_memory_options(o, given);
  if (!o.distributed.empty()) {
    MEMBANK_CHECK(kBuiltWithMpi, "--distributed: {}", no_mpi_message());
    MEMBANK_CHECK(!o.compare, "--compare with --distributed: expected one of them (the comparison table runs in one "
                  "process)");
  }
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
      "images against the bank; the final bank is saved as an HDF5 snapshot. --memory queue (MoCo) or in-batch "
      "(SimCLR) and --views 2 (CMC) keep the negatives elsewhere. --compare runs the comparison table "
      "(NCE K = 1, 10, 512, 4096, the exact softmax, every other objective, then the memories; --seeds each) "
      "against untrained features.");
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
                "options over --seeds seeds (13 configurations x 3 seeds: about an hour on 2 cores), then the block of "
                "memories with --objective: bank, queue Q = 4096, queue Q = 16384, in-batch, CMC 2 views (memory kNN, "
                "encoder kNN, seconds per epoch)");
  cmd->add_option("--compare-only", o->compare_only,
                  "--compare: only these rows (comma-separated): objectives (nce selects its four K rows, full the "
                  "exact softmax) and/or memory (the block of memories, with --objective); the baselines always run")
      ->delimiter(',')
      ->check(one_of({"nce", "full", "infonce", "dcl", "hcl", "dhel", "kcl", "supcon", "contrastive", "triplet",
                      "memory"}));
  cmd->add_flag("--fresh-knn", o->fresh_knn,
                "kept for compatibility: every run now measures the kNN against the training images encoded afresh "
                "each epoch (the 'encoder kNN'; the bank holds momentum-averaged features of augmented views from "
                "across the epoch); this flag also writes it under its former JSON name, 'fresh'");
  cmd->add_option("--memory", o->memory,
                  "where the negatives are kept. bank: the memory bank of N rows (Wu et al.), one augmentation per "
                  "image, K draws. queue: MoCo's (He et al.): a key encoder, a momentum copy of the encoder "
                  "(--key-momentum), and a FIFO ring of its last --queue-size keys (starting as seeded random keys, "
                  "stored as --bank-dtype); two augmentations per image, the query view through the encoder, the key "
                  "view through the key encoder (no gradient), every key of the queue a negative of every query. "
                  "in-batch: SimCLR's (Chen et al.): two augmentations per image, each sample's negatives the batch's "
                  "other 2B - 2 samples. queue and in-batch keep no per-instance memory: their kNN is against the "
                  "encoder's features of the unaugmented training images; not with --objective nce or full, "
                  "--distributed or --snapshot")
      ->capture_default_str()
      ->check(one_of({"bank", "queue", "in-batch"}));
  cmd->add_option("--sampler", o->sampler,
                  "the bank's noise distribution. uniform: P_n = 1/N. cluster: negatives that are hard for each image, "
                  "drawn with their exact probability: spherical k-means of the bank into --clusters clusters "
                  "(refreshed at the start of every epoch), and per image f the mixture q(j | f) = eps / N + "
                  "(1 - eps) pi_k(f) / n_k, pi_k(f) proportional to n_k exp(beta f . c_k); the objective uses q(j | f) "
                  "where it uses P_n(j). dynamic: weights that follow training, every row starting at 1 and, after "
                  "each step, the batch's rows re-weighted to 0.1 + the average (alpha 0.9) of their own loss, with the "
                  "exact P_n. ring: biased hard negatives (Ring; top-k with --ring-lower 0): each image's negatives "
                  "uniform over the bank rows of score ranks [--ring-lower, --ring-upper) for it, weighed as uniform "
                  "draws; needs --allow-biased-sampler except with --objective contrastive or triplet. --memory bank; "
                  "with --views 2 each pair of views draws from its query view's q (cluster: view 0's clusters; "
                  "ring: the pair's own bank; dynamic: each image's loss averaged over the pairs); --distributed "
                  "with every sampler")
      ->capture_default_str()
      ->check(one_of({"uniform", "cluster", "dynamic", "ring"}));
  cmd->add_option("--ring-lower", o->ring_lower,
                  "--sampler ring: the ring's first rank by score (0: the row most similar to the image, usually its "
                  "own)")
      ->capture_default_str()
      ->check(integer_in(0));
  cmd->add_option("--ring-upper", o->ring_upper,
                  "--sampler ring: one past the ring's last rank, at most N (default N / 10)")
      ->check(integer_in(1));
  cmd->add_flag("--allow-biased-sampler", o->allow_biased_sampler,
                "--sampler ring: train on its biased draws with an objective whose estimate needs a valid P_n (every "
                "one but contrastive and triplet), the draws weighed as uniform ones");
  cmd->add_option("--clusters", o->clusters, "--sampler cluster: C, the k-means clusters (at most N)")
      ->capture_default_str()
      ->check(integer_in(1));
  cmd->add_option("--cluster-epsilon", o->cluster_epsilon,
                  "--sampler cluster: eps, the uniform share of each image's mixture (> 0 keeps every row drawable)")
      ->capture_default_str()
      ->check(CLI::Range(1e-9, 1.0));
  cmd->add_option("--cluster-beta", o->cluster_beta,
                  "--sampler cluster: beta, how sharply the mixture favours the clusters near the image (default "
                  "1 / --tau, the scores' own scale; 0: uniform)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--cluster-iterations", o->cluster_iterations,
                  "--sampler cluster: Lloyd steps of each refresh (warm-started from the last centroids)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000));
  cmd->add_option("--queue-size", o->queue_size,
                  "--memory queue: Q, the keys the queue holds (every query's negatives); need not be a multiple of "
                  "--batch")
      ->capture_default_str()
      ->check(integer_in(1, 1 << 24));
  cmd->add_option("--key-momentum", o->key_momentum,
                  "--memory queue: momentum m of the key encoder, which starts as a copy of the encoder and after each "
                  "SGD step becomes theta_k <- m theta_k + (1 - m) theta_q (MoCo's 0.999; 0: a copy of the encoder)")
      ->capture_default_str()
      ->check(number_in(0.0, false, 1.0));
  cmd->add_option("--views", o->views,
                  "1, or 2: CMC (Tian et al.) over two banks, one per view: each view's features are scored against "
                  "the other view's bank (both pairs, losses summed) and each bank is refreshed with its own view's "
                  "features; both banks start as --bank-init says. CMC proper encodes different channels (L and ab) "
                  "with an encoder per view; a grayscale image has one channel, so here the two views are two "
                  "augmentations of each image through one shared encoder. The memory kNN is against view 0's bank. "
                  "Only with --memory bank; not with --distributed or --snapshot")
      ->capture_default_str()
      ->check(integer_in(1, 2));
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
  cmd->callback(command([o, cmd] {
    Given given;
    for (const char* name : {"--snapshot", "--k", "--momentum", "--bank-init", "--bank-dtype", "--rounding",
                             "--queue-size", "--key-momentum", "--memory", "--views", "--sampler", "--clusters",
                             "--cluster-epsilon", "--cluster-beta", "--cluster-iterations", "--ring-lower",
                             "--ring-upper", "--allow-biased-sampler"})
      if (cmd->count(name) > 0) given.insert(name);
    run_train(*o, given);
  }));
}

}  // namespace membank::tools
