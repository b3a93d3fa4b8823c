// Snapshots of a Queue and of a MultiViewEngine (snapshot.hpp, docs/snapshot-format.md "Queue
// snapshots" and "Multi-view snapshots"):
//   - save, load and continue == the uninterrupted run, bit for bit (losses, gradients, the ring or
//     the banks, ids, labels, flags, position, Z states, counters), fp32/fp16/bf16 rings and banks,
//     V = 2 and 3, full and core graphs, alias sampler, labels, compression;
//   - the kind attribute: each loader refuses the other kinds with one clear Error, verify_snapshot
//     and read_snapshot_kind read every kind;
//   - damaged, truncated and mismatched files: one membank::Error naming the file and the problem;
//   - saves refused before any file exists (a key or row not unit norm, a missing directory);
//   - `membank snapshot inspect` and `verify` on the new kinds (MEMBANK_CLI).
#include "reference.hpp"

#include <membank/cluster_sampler.hpp>
#include <membank/error.hpp>
#include <membank/multiview.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/queue.hpp>
#include <membank/snapshot.hpp>

#include "engine_state.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <hdf5.h>

#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace membank;
using namespace mbtest;
namespace fs = std::filesystem;

namespace {

// ---- editing files with the HDF5 C API -------------------------------------------------------

struct H5File {
  hid_t id;
  explicit H5File(const std::string& p) : id(H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)) { REQUIRE(id >= 0); }
  ~H5File() { H5Fclose(id); }
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;
};

/// Replaces attribute `name` of object `obj` (a file's root or a group) with a scalar of `type`.
void set_attr(hid_t obj, const char* name, hid_t type, const void* value) {
  if (H5Aexists(obj, name) > 0) REQUIRE(H5Adelete(obj, name) >= 0);
  const hid_t space = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(a >= 0);
  REQUIRE(H5Awrite(a, type, value) >= 0);
  H5Aclose(a);
  H5Sclose(space);
}
void set_i64(hid_t obj, const char* name, std::int64_t v) { set_attr(obj, name, H5T_NATIVE_INT64, &v); }
void set_f64(hid_t obj, const char* name, double v) { set_attr(obj, name, H5T_NATIVE_DOUBLE, &v); }
void set_str(hid_t obj, const char* name, const std::string& v) {
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  const char* p = v.c_str();
  set_attr(obj, name, t, &p);
  H5Tclose(t);
}
/// The same on group `group` of the file.
void set_group_str(hid_t f, const char* group, const char* name, const std::string& v) {
  const hid_t g = H5Gopen2(f, group, H5P_DEFAULT);
  REQUIRE(g >= 0);
  set_str(g, name, v);
  H5Gclose(g);
}

/// Overwrites element i of the 1-D dataset `name` (HDF5 recomputes the chunk's checksum).
void write_element(hid_t f, const char* name, hsize_t i, hid_t memtype, const void* value) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t fs = H5Dget_space(d);
  const hsize_t start[1] = {i}, count[1] = {1};
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, nullptr, count, nullptr);
  const hid_t ms = H5Screate_simple(1, count, nullptr);
  REQUIRE(H5Dwrite(d, memtype, ms, fs, H5P_DEFAULT, value) >= 0);
  H5Sclose(ms);
  H5Sclose(fs);
  H5Dclose(d);
}

/// Overwrites row `row` of the fp32 (N, D) dataset `name` with `values`.
void write_row(hid_t f, const char* name, hsize_t row, const std::vector<float>& values) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t fs = H5Dget_space(d);
  const hsize_t start[2] = {row, 0}, count[2] = {1, values.size()};
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, nullptr, count, nullptr);
  const hid_t ms = H5Screate_simple(2, count, nullptr);
  REQUIRE(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, values.data()) >= 0);
  H5Sclose(ms);
  H5Sclose(fs);
  H5Dclose(d);
}

/// Replaces dataset `name` by a contiguous 1-D one of `type` holding `count` elements of `data`
/// (memory type `memtype`).
void replace_vector(hid_t f, const char* name, hid_t type, hid_t memtype, hsize_t count, const void* data) {
  if (H5Lexists(f, name, H5P_DEFAULT) > 0) REQUIRE(H5Ldelete(f, name, H5P_DEFAULT) >= 0);
  const hid_t space = H5Screate_simple(1, &count, nullptr);
  const hid_t d = H5Dcreate2(f, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(d >= 0);
  REQUIRE(H5Dwrite(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
  H5Dclose(d);
  H5Sclose(space);
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

/// A damaged copy of a file and what its loader's message must say.
struct Bad {
  std::string why, path;
  std::vector<std::string> keywords;
};

/// Copies `good` to a new file in `tmp`, edits it with `edit`, and records it in `bad`.
void add_edited(std::vector<Bad>& bad, const ScratchDir& tmp, const std::string& good, const std::string& why,
                std::vector<std::string> keywords, const std::function<void(hid_t)>& edit) {
  const std::string p = tmp / fmt::format("bad{:02}.h5", bad.size());
  fs::copy_file(good, p, fs::copy_options::overwrite_existing);
  {
    H5File f(p);
    edit(f.id);
  }
  bad.push_back({why, p, std::move(keywords)});
}

/// Truncated copies of `good`: at 100 bytes, half, and 100 and 1 bytes short.
void add_truncated(std::vector<Bad>& bad, const ScratchDir& tmp, const std::string& good) {
  const std::uintmax_t size = fs::file_size(good);
  for (const std::uintmax_t keep : {std::uintmax_t{100}, size / 2, size - 100, size - 1}) {
    const std::string p = tmp / fmt::format("truncated-{}.h5", keep);
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    fs::resize_file(p, keep);
    bad.push_back({fmt::format("truncated to {} bytes", keep), p, {}});
  }
}

/// Every bad file makes `load` throw one membank::Error naming the file and each keyword (as a
/// substring, case-insensitively), and verify_snapshot report it.
void expect_all_rejected(const std::vector<Bad>& bad, const std::function<void(const std::string&)>& load) {
  const auto lower = [](std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  for (const Bad& b : bad) {
    CAPTURE(b.why);
    const std::string msg = message_of<Error>([&] { load(b.path); });
    CAPTURE(msg);
    CHECK(msg.rfind("membank: ", 0) == 0);  // an Error, not another exception, not none
    CHECK(msg.find(b.path) != std::string::npos);
    for (const auto& k : b.keywords) CHECK(lower(msg).find(lower(k)) != std::string::npos);
    CHECK(!verify_snapshot(b.path).empty());
  }
}

// ---- queues ------------------------------------------------------------------------------------

constexpr double kNaNd = std::numeric_limits<double>::quiet_NaN();

constexpr index_t kQ = 37;  // not a multiple of kQB: the ring wraps mid-batch
constexpr index_t kQD = 24;
constexpr index_t kQB = 5;

/// A queue's configuration: InfoNCE (MoCo's), optionally masking accidental hits.
EngineConfig queue_config(bool hits = false) {
  EngineConfig c;
  c.objective = Objective::info_nce;
  c.exclude_positive = hits;
  c.seed = 23;
  return c;
}

struct QueueBatch {
  RowMatrixf q, k;
  std::vector<index_t> ids;
  std::vector<std::int64_t> labels;
};

/// The batch of step `step`: a pure function of (seed, step). Raw rows (scaled by `scale`) for
/// normalize_features.
QueueBatch queue_batch(std::uint64_t seed, std::int64_t step, float scale) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(step) + 1);
  QueueBatch b;
  b.q = unit_rows(kQB, kQD, rng);
  b.k = b.q + gaussian(kQB, kQD, rng, 0.3);
  normalize_rows(b.k);
  b.q *= scale;
  b.k *= scale;
  std::uniform_int_distribution<index_t> id(0, 11);
  std::uniform_int_distribution<std::int64_t> label(0, 3);
  for (index_t i = 0; i < kQB; ++i) {
    b.ids.push_back(id(rng));
    b.labels.push_back(label(rng));
  }
  return b;
}

struct QueueStep {
  StepStats stats;
  RowMatrixf grad;
};

/// Steps until the queue's counter reaches `until`, each fed queue_batch(seed, counter); every third
/// step evaluates without enqueuing, and every fourth enqueues an extra batch outside a step.
std::vector<QueueStep> run_queue(Queue& queue, std::int64_t until, std::uint64_t seed, float scale) {
  std::vector<QueueStep> out;
  while (queue.steps_done() < until) {
    const std::int64_t s = queue.steps_done();
    const QueueBatch b = queue_batch(seed, s, scale);
    QueueStep r;
    r.grad = RowMatrixf::Zero(kQB, kQD);
    r.stats = queue.step(b.q, b.k, r.grad, b.ids, b.labels, s % 3 != 2);
    if (s % 4 == 3) {
      const QueueBatch extra = queue_batch(seed + 1, s, scale);
      queue.enqueue(extra.k, extra.ids);
    }
    out.push_back(std::move(r));
  }
  return out;
}

/// Everything a queue holds, bit for bit.
void check_same_queue(const Queue& a, const Queue& b) {
  CHECK(a.capacity() == b.capacity());
  CHECK(a.dim() == b.dim());
  CHECK(a.dtype() == b.dtype());
  CHECK(bits_equal(a.keys().to_matrix(), b.keys().to_matrix()));
  CHECK(a.keys().last_update() == b.keys().last_update());
  CHECK(a.ids() == b.ids());
  CHECK(a.labels() == b.labels());
  CHECK(a.labelled() == b.labelled());
  CHECK(a.position() == b.position());
  CHECK(a.enqueued() == b.enqueued());
  CHECK(a.steps_done() == b.steps_done());
  check_same_config(a.config(), b.config());
}

// ---- multi-view engines ------------------------------------------------------------------------

constexpr index_t kN = 300;
constexpr index_t kD = 16;
constexpr index_t kB = 6;

/// V correlated banks, rebuilt bit for bit from the same arguments; dtypes[v] per view.
std::vector<Bank> make_banks(index_t views, std::uint64_t seed, const std::vector<DType>& dtypes) {
  std::mt19937_64 rng(seed);
  const RowMatrixf common = unit_rows(kN, kD, rng);
  std::vector<Bank> banks;
  for (index_t v = 0; v < views; ++v) {
    const RowMatrixf x = common + gaussian(kN, kD, rng, 0.6);
    banks.push_back(Bank::from_rows(x, dtypes[static_cast<std::size_t>(v)]));
  }
  return banks;
}

struct MvCase {
  std::string name;
  index_t views;
  ViewGraph graph;
  std::vector<DType> dtypes;
  EngineConfig config;
  bool alias, labels;
  int deflate;
  /// A query-dependent sampler in place of uniform / alias: a cluster sampler fitted to view 0's
  /// bank and refreshed every 2 steps, or a ring of ranks [1, 40).
  SamplerKind query = SamplerKind::uniform;
};

std::vector<std::int64_t> mv_labels() {
  std::vector<std::int64_t> l(static_cast<std::size_t>(kN));
  for (index_t i = 0; i < kN; ++i) l[static_cast<std::size_t>(i)] = (i * 7) % 5;
  return l;
}

MultiViewEngine make_mv(const MvCase& c, std::uint64_t seed) {
  std::unique_ptr<NoiseSampler> sampler;
  if (c.query == SamplerKind::cluster) {
    ClusterConfig cc;
    cc.clusters = 6;
    cc.refresh_every = 2;
    cc.iterations = 2;
    cc.seed = seed;
    sampler = std::make_unique<ClusterSampler>(make_banks(c.views, seed, c.dtypes)[0].view(), cc);
  } else if (c.query == SamplerKind::ring) {
    sampler = std::make_unique<RingSampler>(kN, RingConfig{1, 40});
  } else if (c.alias) {
    std::mt19937_64 rng(seed ^ 0x5eedULL);
    sampler = std::make_unique<AliasSampler>(random_weights(kN, rng));
  } else {
    sampler = std::make_unique<UniformSampler>(kN);
  }
  return MultiViewEngine(make_banks(c.views, seed, c.dtypes), std::move(sampler), c.config, c.graph,
                         c.labels ? mv_labels() : std::vector<std::int64_t>{});
}

struct MvStep {
  MultiViewStats stats;
  std::vector<RowMatrixf> grads;
};

/// Steps until the counter reaches `until`; the batch of step s is a pure function of (seed, s).
std::vector<MvStep> run_mv(MultiViewEngine& mv, std::int64_t until, std::uint64_t seed) {
  std::vector<MvStep> out;
  while (mv.steps_done() < until) {
    const std::int64_t s = mv.steps_done();
    std::mt19937_64 rng(seed * 1000003ULL + static_cast<std::uint64_t>(s));
    const std::vector<index_t> ids = random_ids(kB, kN, rng);
    std::vector<RowMatrixf> f;
    for (index_t v = 0; v < mv.views(); ++v) f.push_back(near_rows(mv.bank(v).to_matrix(), ids, 0.3, rng));
    const std::vector<FeaturesRef> fr(f.begin(), f.end());
    MvStep r;
    r.grads.assign(static_cast<std::size_t>(mv.views()), RowMatrixf::Zero(kB, kD));
    std::vector<GradRef> g(r.grads.begin(), r.grads.end());
    r.stats = mv.step(fr, ids, g);
    out.push_back(std::move(r));
  }
  return out;
}

void check_same_mv(const MultiViewEngine& a, const MultiViewEngine& b) {
  REQUIRE(a.views() == b.views());
  for (index_t v = 0; v < a.views(); ++v) {
    CAPTURE(v);
    CHECK(a.bank(v).dtype() == b.bank(v).dtype());
    CHECK(bits_equal(a.bank(v).to_matrix(), b.bank(v).to_matrix()));
    CHECK(a.bank(v).last_update() == b.bank(v).last_update());
  }
  CHECK(a.graph() == b.graph());
  CHECK(a.pairs() == b.pairs());
  REQUIRE(a.partitions().size() == b.partitions().size());
  for (std::size_t p = 0; p < a.partitions().size(); ++p) {
    CAPTURE(p);
    CHECK(a.partitions()[p].policy == b.partitions()[p].policy);
    CHECK(a.partitions()[p].initialised == b.partitions()[p].initialised);
    CHECK(bits_equal(a.partitions()[p].log_z, b.partitions()[p].log_z));
  }
  CHECK(a.steps_done() == b.steps_done());
  CHECK(a.labels() == b.labels());
  check_same_config(a.config(), b.config());
  REQUIRE(a.sampler().kind() == b.sampler().kind());
  if (a.sampler().kind() == SamplerKind::alias) {
    const auto& wa = dynamic_cast<const AliasSampler&>(a.sampler()).weights();
    const auto& wb = dynamic_cast<const AliasSampler&>(b.sampler()).weights();
    REQUIRE(wa.size() == wb.size());
    bool same = true;
    for (std::size_t i = 0; i < wa.size(); ++i) same &= bits_equal(wa[i], wb[i]);
    CHECK(same);
  }
  if (a.sampler().kind() == SamplerKind::cluster) {
    const auto& ca = dynamic_cast<const ClusterSampler&>(a.sampler());
    const auto& cb = dynamic_cast<const ClusterSampler&>(b.sampler());
    CHECK(bits_equal(ca.centroids(), cb.centroids()));
    CHECK(ca.assignment() == cb.assignment());
    CHECK(ca.refreshed_at() == cb.refreshed_at());
    CHECK(ca.config().refresh_every == cb.config().refresh_every);
  }
  if (a.sampler().kind() == SamplerKind::ring) {
    CHECK(dynamic_cast<const RingSampler&>(a.sampler()).config().lower ==
          dynamic_cast<const RingSampler&>(b.sampler()).config().lower);
    CHECK(dynamic_cast<const RingSampler&>(a.sampler()).config().upper ==
          dynamic_cast<const RingSampler&>(b.sampler()).config().upper);
  }
}

std::vector<MvCase> mv_cases() {
  std::vector<MvCase> out;
  EngineConfig nce;
  nce.k = 20;
  nce.tau = 0.1;
  nce.objective = Objective::nce;
  nce.seed = 77;
  nce.z_policy = ZPolicy::first_batch;
  out.push_back({"V=2 full fp32 nce first_batch uniform", 2, ViewGraph::full, {DType::float32, DType::float32}, nce,
                 false, false, 0});
  EngineConfig ema = nce;
  ema.z_policy = ZPolicy::ema;
  ema.z_ema = 0.9;
  ema.negatives = NegativesMode::shared;
  ema.rounding = Rounding::stochastic;
  out.push_back({"V=3 core fp32/fp16/bf16 nce ema shared alias stochastic", 3, ViewGraph::core,
                 {DType::float32, DType::float16, DType::bfloat16}, ema, true, false, 0});
  EngineConfig full = ema;
  full.negatives = NegativesMode::per_sample;
  full.rounding = Rounding::nearest;
  out.push_back({"V=3 full bf16/fp32/fp16 nce ema alias deflate", 3, ViewGraph::full,
                 {DType::bfloat16, DType::float32, DType::float16}, full, true, false, 4});
  EngineConfig labelled = nce;
  labelled.objective = Objective::info_nce;
  labelled.exclude_same_label = true;
  labelled.momentum = 0.7;
  out.push_back({"V=3 full fp16 x3 infonce exclude_same_label labels alias", 3, ViewGraph::full,
                 {DType::float16, DType::float16, DType::float16}, labelled, true, true, 0});
  EngineConfig fixed = nce;
  fixed.z_policy = ZPolicy::fixed;
  fixed.z_fixed = 50.0;
  out.push_back({"V=2 core bf16 x2 nce fixed Z", 2, ViewGraph::core, {DType::bfloat16, DType::bfloat16}, fixed, true,
                 false, 0});
  // Query-dependent samplers: the resumed run re-fits the clusters at step 4 as the whole one does.
  out.push_back({"V=2 full fp16/fp32 nce cluster refreshed every 2 steps", 2, ViewGraph::full,
                 {DType::float16, DType::float32}, nce, false, false, 0, SamplerKind::cluster});
  EngineConfig biased = labelled;
  biased.exclude_same_label = false;
  biased.allow_biased_sampler = true;
  out.push_back({"V=3 core fp32/bf16/fp32 infonce ring", 3, ViewGraph::core,
                 {DType::float32, DType::bfloat16, DType::float32}, biased, false, false, 0, SamplerKind::ring});
  return out;
}

}  // namespace

TEST_CASE("snapshot memories: a queue saved, loaded and continued equals the uninterrupted run, fp32 fp16 bf16") {
  // Guards the queue snapshot: every part of Queue::State (keys of any type bit for bit with their
  // last-update steps, ids, labels, flags, position, enqueued, step) and the whole configuration
  // come back, and the next steps give the same losses, gradients and ring as a run that never stopped.
  struct Case {
    std::string name;
    DType dtype;
    Objective objective;
    bool hits, same_label, normalize;
    Rounding rounding;
    int deflate;
  };
  const std::vector<Case> cases = {
      {"fp32 infonce exclude_positive", DType::float32, Objective::info_nce, true, false, false, Rounding::nearest, 0},
      {"fp16 dcl exclude_same_label stochastic", DType::float16, Objective::dcl, false, true, false,
       Rounding::stochastic, 0},
      {"bf16 kcl normalize_features stochastic deflate", DType::bfloat16, Objective::kcl, true, false, true,
       Rounding::stochastic, 4},
      {"bf16 supcon nearest", DType::bfloat16, Objective::supcon, false, false, false, Rounding::nearest, 0},
      {"fp32 hcl both masks deflate", DType::float32, Objective::hcl, true, true, false, Rounding::nearest, 2},
  };
  ScratchDir tmp("snapmem", "queue");
  for (const Case& c : cases) {
    CAPTURE(c.name);
    EngineConfig cfg;
    cfg.objective = c.objective;
    cfg.tau = 0.2;
    cfg.exclude_positive = c.hits;
    cfg.exclude_same_label = c.same_label;
    cfg.normalize_features = c.normalize;
    cfg.rounding = c.rounding;
    cfg.beta = 0.5;
    cfg.seed = 19;
    const float scale = c.normalize ? 3.5f : 1.0f;
    const std::uint64_t seed = 5;

    Queue whole(kQ, kQD, cfg, c.dtype);
    const std::vector<QueueStep> want = run_queue(whole, 16, seed, scale);

    Queue first(kQ, kQD, cfg, c.dtype);
    run_queue(first, 9, seed, scale);
    REQUIRE(first.enqueued() > kQ);  // the ring has wrapped
    const std::string path = tmp / "queue.h5";
    save_snapshot(path, first, SnapshotOptions{c.deflate});
    CHECK(read_snapshot_kind(path) == SnapshotKind::queue);
    CHECK(verify_snapshot(path).empty());
    const QueueSnapshotInfo info = read_queue_snapshot_info(path);
    CHECK(info.format == "membank-snapshot");
    CHECK(info.format_version == 4);
    CHECK(info.capacity == kQ);
    CHECK(info.dim == kQD);
    CHECK(info.dtype == c.dtype);
    CHECK(info.step == 9);
    CHECK(info.position == first.position());
    CHECK(info.enqueued == first.enqueued());
    CHECK(info.compressed == (c.deflate > 0));
    check_same_config(info.config, cfg);

    Queue resumed = load_queue_snapshot(path);
    check_same_queue(resumed, first);
    const std::vector<QueueStep> got = run_queue(resumed, 16, seed, scale);
    REQUIRE(got.size() == 7);
    for (std::size_t i = 0; i < got.size(); ++i) {
      CAPTURE(i);
      const QueueStep& w = want[i + 9];
      CHECK(bits_equal(got[i].stats.loss, w.stats.loss));
      CHECK(bits_equal(got[i].stats.negative_collision_fraction, w.stats.negative_collision_fraction));
      CHECK(bits_equal(got[i].grad, w.grad));
    }
    check_same_queue(resumed, whole);
  }
}

TEST_CASE("snapshot memories: a multi-view engine saved, loaded and continued equals the uninterrupted run") {
  // Guards the multi-view snapshot: V = 2 and 3, full and core graphs, banks of mixed types, uniform,
  // alias, cluster (resumed across a re-fit) and ring samplers, labels, every pair's Z state
  // (first_batch, ema, fixed): the loaded engine equals the saved one field by field, and its next
  // steps give every pair's loss and Z, the gradients of every view and the banks of an
  // uninterrupted run, bit for bit.
  ScratchDir tmp("snapmem", "multiview");
  for (const MvCase& c : mv_cases()) {
    CAPTURE(c.name);
    MultiViewEngine whole = make_mv(c, 31);
    const std::vector<MvStep> want = run_mv(whole, 6, 9);
    MultiViewEngine first = make_mv(c, 31);
    run_mv(first, 3, 9);
    const std::string path = tmp / "mv.h5";
    save_snapshot(path, first, SnapshotOptions{c.deflate});
    CHECK(read_snapshot_kind(path) == SnapshotKind::multiview);
    CHECK(verify_snapshot(path).empty());
    const MultiViewSnapshotInfo info = read_multiview_snapshot_info(path);
    CHECK(info.format_version == 4);
    CHECK(info.views == c.views);
    CHECK(info.n == kN);
    CHECK(info.dim == kD);
    CHECK(info.dtypes == c.dtypes);
    CHECK(info.step == 3);
    CHECK(info.graph == c.graph);
    CHECK(info.pairs == first.pairs());
    CHECK(info.sampler == (c.query != SamplerKind::uniform ? c.query : c.alias ? SamplerKind::alias : SamplerKind::uniform));
    CHECK(info.has_labels == c.labels);
    CHECK(info.compressed == (c.deflate > 0));
    REQUIRE(info.partitions.size() == first.partitions().size());
    for (std::size_t p = 0; p < info.partitions.size(); ++p) {
      CHECK(info.partitions[p].initialised == first.partitions()[p].initialised);
      CHECK(bits_equal(info.partitions[p].log_z, first.partitions()[p].log_z));
    }

    MultiViewEngine resumed = load_multiview_snapshot(path);
    check_same_mv(resumed, first);
    const std::vector<MvStep> got = run_mv(resumed, 6, 9);
    REQUIRE(got.size() == 3);
    for (std::size_t i = 0; i < got.size(); ++i) {
      CAPTURE(i);
      const MvStep& w = want[i + 3];
      CHECK(bits_equal(got[i].stats.loss, w.stats.loss));
      REQUIRE(got[i].stats.pairs.size() == w.stats.pairs.size());
      for (std::size_t p = 0; p < w.stats.pairs.size(); ++p) {
        CHECK(bits_equal(got[i].stats.pairs[p].loss, w.stats.pairs[p].loss));
        CHECK(bits_equal(got[i].stats.pairs[p].z, w.stats.pairs[p].z));
      }
      for (std::size_t v = 0; v < w.grads.size(); ++v) CHECK(bits_equal(got[i].grads[v], w.grads[v]));
    }
    check_same_mv(resumed, whole);
  }
}

TEST_CASE("snapshot memories: each loader refuses the other kinds with one clear Error") {
  // Guards the kind attribute: an engine, a queue and a multi-view snapshot each load only with
  // their own loader; the others (read_snapshot_info included) throw one Error naming the file, the
  // kind expected, the kind found and the loader that reads it. read_snapshot_kind and
  // verify_snapshot read all three.
  ScratchDir tmp("snapmem", "kinds");
  EngineConfig ecfg;
  ecfg.k = 16;
  const Engine engine = make_engine(500, 8, false, ecfg, 3);
  const std::string e = tmp / "engine.h5", q = tmp / "queue.h5", m = tmp / "mv.h5";
  save_snapshot(e, engine);
  save_snapshot(q, Queue(kQ, kQD, queue_config(), DType::float16));
  save_snapshot(m, make_mv(mv_cases()[0], 4));
  CHECK(read_snapshot_kind(e) == SnapshotKind::engine);
  CHECK(read_snapshot_kind(q) == SnapshotKind::queue);
  CHECK(read_snapshot_kind(m) == SnapshotKind::multiview);
  for (const auto& p : {e, q, m}) CHECK(verify_snapshot(p).empty());
  CHECK(read_snapshot_info(e).format_version == 3);  // an engine snapshot is still version 3

  const auto refused = [](const std::string& path, const std::function<void()>& f, const std::string& expected,
                          const std::string& found, const std::string& loader) {
    const std::string msg = message_of<Error>(f);
    CAPTURE(msg);
    CHECK(msg.find(path) != std::string::npos);
    CHECK(msg.find(fmt::format("expected {}, found {}", expected, found)) != std::string::npos);
    CHECK(msg.find(loader) != std::string::npos);
  };
  refused(q, [&] { load_snapshot(q); }, "an engine snapshot", "a queue snapshot", "load_queue_snapshot");
  refused(m, [&] { load_snapshot(m); }, "an engine snapshot", "a multiview snapshot", "load_multiview_snapshot");
  refused(q, [&] { read_snapshot_info(q); }, "an engine snapshot", "a queue snapshot", "load_queue_snapshot");
  refused(m, [&] { read_snapshot_info(m); }, "an engine snapshot", "a multiview snapshot", "load_multiview_snapshot");
  refused(e, [&] { load_queue_snapshot(e); }, "a queue snapshot", "an engine snapshot", "load_snapshot");
  refused(m, [&] { load_queue_snapshot(m); }, "a queue snapshot", "a multiview snapshot", "load_multiview_snapshot");
  refused(m, [&] { read_queue_snapshot_info(m); }, "a queue snapshot", "a multiview snapshot", "load_multiview");
  refused(e, [&] { load_multiview_snapshot(e); }, "a multiview snapshot", "an engine snapshot", "load_snapshot");
  refused(q, [&] { load_multiview_snapshot(q); }, "a multiview snapshot", "a queue snapshot", "load_queue_snapshot");
  refused(e, [&] { read_multiview_snapshot_info(e); }, "a multiview snapshot", "an engine snapshot", "load_snapshot");
  // Names of the kinds.
  for (const SnapshotKind k : {SnapshotKind::engine, SnapshotKind::queue, SnapshotKind::multiview})
    CHECK(snapshot_kind_from_string(to_string(k)) == k);
  CHECK(mentions(message_of<Error>([] { snapshot_kind_from_string("bank"); }), "multiview"));
}

TEST_CASE("snapshot memories: damaged, truncated and mismatched queue files each give one clear Error") {
  // Guards load validation of a queue snapshot: every attribute and dataset is checked before the
  // queue is built; each damaged copy of a valid file makes load_queue_snapshot throw one
  // membank::Error naming the file and the problem, and verify_snapshot report it.
  ScratchDir tmp("snapmem", "badqueue");
  Queue queue(kQ, kQD, queue_config(true), DType::float32);
  run_queue(queue, 6, 2, 1.0f);
  const std::string good = tmp / "good.h5";
  save_snapshot(good, queue);
  REQUIRE(verify_snapshot(good).empty());
  std::mt19937_64 rng(3);
  const RowMatrixf unit = unit_rows(1, kQD, rng);
  const std::vector<float> row(unit.data(), unit.data() + kQD);

  std::vector<Bad> bad;
  const auto edited = [&](const std::string& why, std::vector<std::string> k, const std::function<void(hid_t)>& f) {
    add_edited(bad, tmp, good, why, std::move(k), f);
  };
  // identification
  edited("unknown kind", {"kind", "sideways"}, [](hid_t f) { set_str(f, "kind", "sideways"); });
  edited("no kind attribute (an engine file of version 4)", {"format_version = 4", "engine"},
         [](hid_t f) { H5Adelete(f, "kind"); });
  edited("a queue claiming version 3", {"format_version = 3", "queue"}, [](hid_t f) { set_i64(f, "format_version", 3); });
  edited("future version 5", {"format_version = 5"}, [](hid_t f) { set_i64(f, "format_version", 5); });
  edited("kind multiview", {"expected a queue snapshot, found a multiview snapshot"}, [](hid_t f) { set_str(f, "kind", "multiview"); });
  // the ring's attributes
  edited("position = Q", {"position = 37"}, [](hid_t f) { set_i64(f, "position", kQ); });
  edited("position = -1", {"position = -1"}, [](hid_t f) { set_i64(f, "position", -1); });
  edited("enqueued < 0", {"enqueued = -3"}, [](hid_t f) { set_i64(f, "enqueued", -3); });
  edited("step < 0", {"step = -1"}, [](hid_t f) { set_i64(f, "step", -1); });
  edited("capacity != the keys' rows", {"keys", "38 x 24"}, [](hid_t f) { set_i64(f, "capacity", kQ + 1); });
  edited("dim != the keys' columns", {"keys", "37 x 25"}, [](hid_t f) { set_i64(f, "dim", kQD + 1); });
  edited("capacity 0", {"capacity = 0"}, [](hid_t f) { set_i64(f, "capacity", 0); });
  edited("dtype says float16 over float32 keys", {"keys", "float16"}, [](hid_t f) { set_str(f, "dtype", "float16"); });
  edited("unknown dtype", {"float8"}, [](hid_t f) { set_str(f, "dtype", "float8"); });
  // the configuration
  edited("objective nce (not a queue's)", {"configuration", "nce"}, [](hid_t f) { set_str(f, "objective", "nce"); });
  edited("tau = -1", {"tau"}, [](hid_t f) { set_f64(f, "tau", -1.0); });
  edited("missing seed", {"seed", "missing"}, [](hid_t f) { H5Adelete(f, "seed"); });
  edited("unknown rounding", {"rounding", "sideways"}, [](hid_t f) { set_str(f, "rounding", "sideways"); });
  // the slots
  edited("an id < -1", {"ids[3] = -2"}, [](hid_t f) {
    const std::int64_t v = -2;
    write_element(f, "ids", 3, H5T_NATIVE_INT64, &v);
  });
  edited("a flag of 2", {"labelled[2] = 2"}, [](hid_t f) {
    const std::uint8_t v = 2;
    write_element(f, "labelled", 2, H5T_NATIVE_UINT8, &v);
  });
  edited("last_update beyond step", {"dataset 'last_update'", "entry 5 is 1000"}, [](hid_t f) {
    const std::int64_t v = 1000;
    write_element(f, "last_update", 5, H5T_NATIVE_INT64, &v);
  });
  edited("ids of the wrong length", {"ids", "36"}, [](hid_t f) {
    const std::vector<std::int64_t> v(kQ - 1, -1);
    replace_vector(f, "ids", H5T_STD_I64LE, H5T_NATIVE_INT64, kQ - 1, v.data());
  });
  edited("labelled stored as int64", {"labelled", "dtype"}, [](hid_t f) {
    const std::vector<std::int64_t> v(kQ, 0);
    replace_vector(f, "labelled", H5T_STD_I64LE, H5T_NATIVE_INT64, kQ, v.data());
  });
  edited("missing labels", {"labels", "missing"}, [](hid_t f) { H5Ldelete(f, "labels", H5P_DEFAULT); });
  edited("missing keys", {"keys", "missing"}, [](hid_t f) { H5Ldelete(f, "keys", H5P_DEFAULT); });
  // the keys
  edited("a key not unit norm", {"keys", "unit"}, [&](hid_t f) {
    std::vector<float> r = row;
    for (float& x : r) x *= 2.0f;
    write_row(f, "keys", 11, r);
  });
  edited("a NaN key", {"keys"}, [&](hid_t f) {
    std::vector<float> r = row;
    r[3] = std::numeric_limits<float>::quiet_NaN();
    write_row(f, "keys", 30, r);
  });
  add_truncated(bad, tmp, good);
  expect_all_rejected(bad, [](const std::string& p) { load_queue_snapshot(p); });
  // read_queue_snapshot_info refuses the damaged metadata too.
  CHECK(mentions(message_of<Error>([&] { read_queue_snapshot_info(bad[5].path); }), "position"));
}

TEST_CASE("snapshot memories: damaged, truncated and mismatched multi-view files each give one clear Error") {
  // Guards load validation of a multi-view snapshot: views, groups, banks of each view, pairs and
  // their Z states, sampler and labels are checked before the engine is built; each damaged copy
  // makes load_multiview_snapshot throw one membank::Error naming the file and the problem.
  ScratchDir tmp("snapmem", "badmv");
  const MvCase c = mv_cases()[3];  // V = 3, full graph, fp16 banks, alias sampler, labels
  MultiViewEngine mv = make_mv(c, 8);
  run_mv(mv, 3, 1);
  const std::string good = tmp / "good.h5";
  save_snapshot(good, mv);
  REQUIRE(verify_snapshot(good).empty());
  const MvCase f32 = mv_cases()[1];  // V = 3, core graph, fp32/fp16/bf16, nce ema, alias
  MultiViewEngine mv32 = make_mv(f32, 8);
  run_mv(mv32, 2, 1);
  const std::string good32 = tmp / "good32.h5";
  save_snapshot(good32, mv32);
  REQUIRE(verify_snapshot(good32).empty());
  std::mt19937_64 rng(3);
  const RowMatrixf unit = unit_rows(1, kD, rng);
  const std::vector<float> row(unit.data(), unit.data() + kD);

  std::vector<Bad> bad;
  const auto edited = [&](const std::string& why, std::vector<std::string> k, const std::function<void(hid_t)>& f) {
    add_edited(bad, tmp, good, why, std::move(k), f);
  };
  const auto edited32 = [&](const std::string& why, std::vector<std::string> k, const std::function<void(hid_t)>& f) {
    add_edited(bad, tmp, good32, why, std::move(k), f);
  };
  edited("kind queue", {"expected a multiview snapshot, found a queue snapshot"},
         [](hid_t f) { set_str(f, "kind", "queue"); });
  edited("kind engine at version 4", {"format_version = 4", "engine"}, [](hid_t f) { set_str(f, "kind", "engine"); });
  edited("views = 4 for 3 groups", {"view_3", "missing"}, [](hid_t f) { set_i64(f, "views", 4); });
  edited("views = 2 for 3 groups", {"views = 2", "view_2"}, [](hid_t f) { set_i64(f, "views", 2); });
  edited("views = 1", {"views = 1"}, [](hid_t f) { set_i64(f, "views", 1); });
  edited("graph core on a full graph's pairs", {"pairs", "core"}, [](hid_t f) { set_str(f, "graph", "core"); });
  edited("unknown graph", {"ring"}, [](hid_t f) { set_str(f, "graph", "ring"); });
  edited("n != the banks' rows", {"view_0/bank", "301 x 16"}, [](hid_t f) { set_i64(f, "n", kN + 1); });
  edited("a pair out of order", {"pairs[0]"}, [](hid_t f) {
    const std::int64_t v = 2;
    const hid_t d = H5Dopen2(f, "pairs", H5P_DEFAULT);
    REQUIRE(d >= 0);
    const hid_t fs = H5Dget_space(d);
    const hsize_t start[2] = {0, 1}, count[2] = {1, 1};
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, nullptr, count, nullptr);
    const hid_t ms = H5Screate_simple(2, count, nullptr);
    REQUIRE(H5Dwrite(d, H5T_NATIVE_INT64, ms, fs, H5P_DEFAULT, &v) >= 0);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
  });
  edited("z_initialised = 2", {"z_initialised[1] = 2"}, [](hid_t f) {
    const std::int64_t v = 2;
    write_element(f, "z_initialised", 1, H5T_NATIVE_INT64, &v);
  });
  edited("one Z state too few", {"z_initialised", "5"}, [](hid_t f) {
    const std::vector<std::int64_t> v(5, 0);
    replace_vector(f, "z_initialised", H5T_STD_I64LE, H5T_NATIVE_INT64, 5, v.data());
  });
  edited("missing view_1/bank", {"view_1/bank", "missing"}, [](hid_t f) { H5Ldelete(f, "view_1/bank", H5P_DEFAULT); });
  edited("missing group view_2", {"view_2", "missing"}, [](hid_t f) { H5Ldelete(f, "view_2", H5P_DEFAULT); });
  edited("view_1's dtype says bfloat16 over float16 rows", {"view_1/bank", "bfloat16"},
         [](hid_t f) { set_group_str(f, "view_1", "dtype", "bfloat16"); });
  edited("view_2's last_update beyond step", {"view_2/last_update", "entry 7 is 1000"}, [](hid_t f) {
    const std::int64_t v = 1000;
    write_element(f, "view_2/last_update", 7, H5T_NATIVE_INT64, &v);
  });
  edited("missing sampler_weights (alias)", {"sampler_weights"},
         [](hid_t f) { H5Ldelete(f, "sampler_weights", H5P_DEFAULT); });
  edited("a negative sampler weight", {"sampler_weights"}, [](hid_t f) {
    const double v = -1.0;
    write_element(f, "sampler_weights", 10, H5T_NATIVE_DOUBLE, &v);
  });
  edited("labels missing (exclude_same_label needs them)", {"labels"},
         [](hid_t f) { H5Ldelete(f, "labels", H5P_DEFAULT); });
  edited("momentum 1.5", {"invalid configuration", "momentum"}, [](hid_t f) { set_f64(f, "momentum", 1.5); });
  edited32("log_z NaN while initialised", {"log_z[0]"},
           [](hid_t f) { write_element(f, "log_z", 0, H5T_NATIVE_DOUBLE, &kNaNd); });
  edited32("a row of view_0 not unit norm", {"view_0/bank", "unit"}, [&](hid_t f) {
    std::vector<float> r = row;
    for (float& x : r) x *= 2.0f;
    write_row(f, "view_0/bank", 11, r);
  });
  edited32("z_policy fixed over estimated Z states", {"fixed"}, [](hid_t f) { set_str(f, "z_policy", "fixed"); });
  add_truncated(bad, tmp, good);
  expect_all_rejected(bad, [](const std::string& p) { load_multiview_snapshot(p); });
}

TEST_CASE("snapshot memories: a queue or bank row that is not unit norm is refused before any file is written") {
  // Guards the save path of the new kinds: what load refuses is never written -- a key or a bank row
  // corrupted in memory, or a destination whose directory is missing, throws before any file exists,
  // and the snapshot at the destination keeps its bytes. A good save over a file of another kind
  // replaces it whole and leaves no temporary.
  ScratchDir tmp("snapmem", "refused");
  Queue queue(kQ, kQD, queue_config(), DType::float32);
  run_queue(queue, 3, 1, 1.0f);
  MultiViewEngine mv = make_mv(mv_cases()[0], 2);
  run_mv(mv, 2, 1);
  const std::string keep = tmp / "keep.h5";
  save_snapshot(keep, mv);
  const std::string before = file_bytes(keep);
  const std::set<std::string> files = names_in(tmp.dir);

  const auto refused = [&](const std::function<void(const std::string&)>& save, const std::string& word) {
    for (const std::string& dest : {keep, tmp / "new.h5"}) {
      const std::string msg = message_of<Error>([&] { save(dest); });
      CAPTURE(msg);
      CHECK(msg.find(dest) != std::string::npos);
      CHECK(msg.find(word) != std::string::npos);
      CHECK(names_in(tmp.dir) == files);
      CHECK(file_bytes(keep) == before);
    }
  };
  float* key = const_cast<float*>(queue.keys().view().row(12));
  const float saved_key = key[0];
  key[0] += 0.5f;
  refused([&](const std::string& p) { save_snapshot(p, queue); }, "row 12");
  key[0] = saved_key;
  float* bank_row = const_cast<float*>(mv.bank(1).view().row(40));
  const float saved_row = bank_row[1];
  bank_row[1] = std::numeric_limits<float>::infinity();
  refused([&](const std::string& p) { save_snapshot(p, mv); }, "row 40");
  bank_row[1] = saved_row;
  CHECK(mentions(message_of<Error>([&] { save_snapshot((tmp.dir / "no-such-dir" / "q.h5").string(), queue); }),
                 "exist"));
  CHECK(names_in(tmp.dir) == files);

  save_snapshot(keep, queue);  // a queue over the multi-view snapshot: whole, atomically
  CHECK(names_in(tmp.dir) == files);
  CHECK(read_snapshot_kind(keep) == SnapshotKind::queue);
  check_same_queue(load_queue_snapshot(keep), queue);
}

#ifdef MEMBANK_CLI
TEST_CASE("snapshot memories: membank snapshot inspect and verify print a queue's and a multi-view engine's fields") {
  // Guards the command line on the new kinds: inspect (text and --json) prints the kind and the
  // queue's or the multi-view engine's fields instead of failing, verify says ok, and export (an
  // engine's bank) refuses them with the kinds' message and status 2.
  ScratchDir tmp("snapmem", "cli");
  Queue queue(kQ, kQD, queue_config(true), DType::bfloat16);
  run_queue(queue, 5, 4, 1.0f);
  MultiViewEngine mv = make_mv(mv_cases()[1], 6);
  run_mv(mv, 2, 3);
  const std::string q = tmp / "q.h5", m = tmp / "m.h5";
  save_snapshot(q, queue);
  save_snapshot(m, mv);
  const auto cli = [&](const std::string& args, std::string* out) {
    const std::string o = tmp / "out.txt";
    const int st = std::system(fmt::format("'{}' {} >'{}' 2>&1", MEMBANK_CLI, args, o).c_str());
    *out = file_bytes(o);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  };
  std::string out;
  CHECK(cli(fmt::format("snapshot inspect --json '{}'", q), &out) == 0);
  CAPTURE(out);
  CHECK(out.find("\"kind\":\"queue\"") != std::string::npos);
  CHECK(out.find("\"capacity\":37") != std::string::npos);
  CHECK(out.find(fmt::format("\"position\":{}", queue.position())) != std::string::npos);
  CHECK(out.find(fmt::format("\"enqueued\":{}", queue.enqueued())) != std::string::npos);
  CHECK(out.find("\"dtype\":\"bfloat16\"") != std::string::npos);
  CHECK(out.find("\"step\":5") != std::string::npos);
  CHECK(cli(fmt::format("snapshot inspect '{}'", q), &out) == 0);
  CHECK(out.find("queue") != std::string::npos);
  CHECK(out.find(fmt::format("position {}", queue.position())) != std::string::npos);
  CHECK(cli(fmt::format("snapshot verify '{}'", q), &out) == 0);
  CHECK(out.find("ok (queue") != std::string::npos);

  CHECK(cli(fmt::format("snapshot inspect --json '{}'", m), &out) == 0);
  CHECK(out.find("\"kind\":\"multiview\"") != std::string::npos);
  CHECK(out.find("\"views\":3") != std::string::npos);
  CHECK(out.find("\"graph\":\"core\"") != std::string::npos);
  CHECK(out.find("\"dtypes\":[\"float32\",\"float16\",\"bfloat16\"]") != std::string::npos);
  CHECK(cli(fmt::format("snapshot inspect '{}'", m), &out) == 0);
  CHECK(out.find("multiview") != std::string::npos);
  CHECK(out.find("pair 0 -> 1") != std::string::npos);
  CHECK(cli(fmt::format("snapshot verify '{}'", m), &out) == 0);
  CHECK(out.find("ok (multiview") != std::string::npos);

  CHECK(cli(fmt::format("snapshot export '{}' '{}'", q, tmp / "plain.h5"), &out) == 2);
  CHECK(out.find("expected an engine snapshot, found a queue snapshot") != std::string::npos);
  CHECK(!fs::exists(tmp / "plain.h5"));
}
#endif
