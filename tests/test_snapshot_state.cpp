// Snapshots: round trip of every field, resume bit-identity, malformed files, and a writer killed
// mid-save (HDF5 files are built and damaged here with the HDF5 C API).
#include "reference.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <hdf5.h>

#include <csignal>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <spawn.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

extern char** environ;

using namespace mbtest;
using membank::Engine;
using membank::EngineConfig;
using membank::Error;
using membank::StepStats;
using membank::ZPolicy;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / fmt::format("membank-test-{}", ::getpid());
  fs::create_directories(d);
  return d / name;
}

/// Run `steps` steps with inputs drawn from `rng`; returns the losses.
std::vector<double> run_steps(Engine& e, int steps, std::mt19937_64& rng, index_t batch) {
  std::vector<double> losses;
  RowMatrixf g(batch, e.bank().dim());
  for (int s = 0; s < steps; ++s) {
    const std::vector<index_t> ids = random_ids(batch, e.bank().size(), rng);
    const RowMatrixf f = unit_rows(batch, e.bank().dim(), rng);
    losses.push_back(e.step(f, ids, g).loss);
  }
  return losses;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!bits_equal(a[i], b[i])) return false;
  return true;
}

/// Apply `edit(file_id)` to a copy of `src` opened read-write; returns the copy's path.
fs::path damaged_copy(const fs::path& src, const std::string& name, const std::function<void(hid_t)>& edit) {
  const fs::path dst = scratch(name);
  fs::copy_file(src, dst, fs::copy_options::overwrite_existing);
  const hid_t f = H5Fopen(dst.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  REQUIRE(f >= 0);
  edit(f);
  H5Fclose(f);
  return dst;
}

void set_attr_i64(hid_t f, const char* name, std::int64_t v) {
  H5Adelete(f, name);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a);
  H5Sclose(sp);
}
void set_attr_f64(hid_t f, const char* name, double v) {
  H5Adelete(f, name);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
  H5Aclose(a);
  H5Sclose(sp);
}
void set_attr_str(hid_t f, const char* name, const char* v) {
  H5Adelete(f, name);
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, t, &v);
  H5Aclose(a);
  H5Sclose(sp);
  H5Tclose(t);
}
/// Replace dataset `name` by a contiguous one of the given type and dims, filled from `data`.
void replace_dataset(hid_t f, const char* name, hid_t type, std::vector<hsize_t> dims, const void* data) {
  H5Ldelete(f, name, H5P_DEFAULT);
  const hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  const hid_t d = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (data) H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  H5Dclose(d);
  H5Sclose(sp);
}

}  // namespace

TEST_CASE("snapshot round trip keeps every field") {
  // Guards completeness: bank bits, last-update steps, step counter, Z state, every config field,
  // sampler kind and probabilities, labels, with and without compression.
  for (bool alias : {false, true})
    for (int deflate : {0, 4}) {
      CAPTURE(alias);
      CAPTURE(deflate);
      EngineConfig cfg;
      cfg.k = 17;
      cfg.tau = 0.11;
      cfg.momentum = 0.3;
      cfg.z_policy = ZPolicy::ema;
      cfg.z_ema = 0.9;
      cfg.exclude_positive = true;
      cfg.seed = 99;
      cfg.negatives = alias ? membank::NegativesMode::shared : membank::NegativesMode::per_sample;
      Engine a = make_engine(1003, 24, alias, cfg, 5);
      std::mt19937_64 rng(1);
      run_steps(a, 3, rng, 9);
      std::vector<std::int64_t> labels(1003);
      for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i % 10);
      const fs::path p = scratch("roundtrip.h5");
      membank::save_snapshot(p.string(), a, {deflate}, labels);
      std::vector<std::int64_t> got_labels;
      const Engine b = membank::load_snapshot(p.string(), &got_labels);
      CHECK(bits_equal(a.bank().to_matrix(), b.bank().to_matrix()));
      CHECK(a.bank().last_update() == b.bank().last_update());
      CHECK(b.steps_done() == 3);
      CHECK(b.partition().initialised);
      CHECK(bits_equal(a.partition().log_z, b.partition().log_z));
      const EngineConfig& c = b.config();
      CHECK(c.k == 17);
      CHECK(c.tau == 0.11);
      CHECK(c.momentum == 0.3);
      CHECK(c.z_policy == ZPolicy::ema);
      CHECK(c.z_ema == 0.9);
      CHECK(c.exclude_positive);
      CHECK(c.seed == 99);
      CHECK(c.negatives == cfg.negatives);
      CHECK(b.sampler().kind() == a.sampler().kind());
      CHECK(b.sampler().probs() == a.sampler().probs());
      CHECK(got_labels == labels);
      const membank::SnapshotInfo info = membank::read_snapshot_info(p.string());
      CHECK(info.n == 1003);
      CHECK(info.dim == 24);
      CHECK(info.compressed == (deflate > 0));
      CHECK(info.has_labels);
      CHECK(membank::verify_snapshot(p.string()).empty());
    }
}

TEST_CASE("a resumed engine continues bit for bit") {
  // Guards resume: S steps, save, load, S more steps give the same losses and bank as 2S steps
  // uninterrupted (same draws: seed and step counter restored; same Z; same alias table).
  struct Case {
    bool alias;
    ZPolicy z;
    membank::NegativesMode mode;
  };
  for (const Case cs : {Case{false, ZPolicy::first_batch, membank::NegativesMode::per_sample},
                        Case{false, ZPolicy::ema, membank::NegativesMode::per_sample},
                        Case{true, ZPolicy::ema, membank::NegativesMode::shared}}) {
    EngineConfig cfg;
    cfg.k = 64;
    cfg.z_policy = cs.z;
    cfg.negatives = cs.mode;
    cfg.seed = 3;
    Engine whole = make_engine(2000, 16, cs.alias, cfg, 8);
    Engine first = make_engine(2000, 16, cs.alias, cfg, 8);
    std::mt19937_64 r1(21), r2(21);
    const std::vector<double> all = run_steps(whole, 8, r1, 12);
    run_steps(first, 4, r2, 12);
    const fs::path p = scratch("resume.h5");
    membank::save_snapshot(p.string(), first);
    Engine resumed = membank::load_snapshot(p.string());
    const std::vector<double> tail = run_steps(resumed, 4, r2, 12);
    CHECK(same_bits(tail, std::vector<double>(all.begin() + 4, all.end())));
    CHECK(bits_equal(resumed.bank().to_matrix(), whole.bank().to_matrix()));
    CHECK(bits_equal(resumed.partition().log_z, whole.partition().log_z));
  }
}

TEST_CASE("malformed snapshots give one clear error each and no crash") {
  // Guards load validation: each damaged file throws membank::Error naming the file, and
  // verify_snapshot reports a problem.
  Engine e = make_engine(3000, 16, true, EngineConfig{}, 2);
  const fs::path good = scratch("good.h5");
  membank::save_snapshot(good.string(), e);
  REQUIRE(membank::verify_snapshot(good.string()).empty());

  std::vector<std::pair<std::string, fs::path>> bad;
  const auto add = [&](const std::string& why, const std::function<void(hid_t)>& edit) {
    bad.emplace_back(why, damaged_copy(good, "bad-" + std::to_string(bad.size()) + ".h5", edit));
  };
  add("wrong format name", [](hid_t f) { set_attr_str(f, "format", "someone-elses-format"); });
  add("future version", [](hid_t f) { set_attr_i64(f, "format_version", 2); });
  add("n contradicts the data", [](hid_t f) { set_attr_i64(f, "n", 2999); });
  add("absurd claimed size", [](hid_t f) { set_attr_i64(f, "n", std::int64_t{1} << 50); });
  add("missing attribute", [](hid_t f) { H5Adelete(f, "log_z"); });
  add("bad config value", [](hid_t f) { set_attr_f64(f, "tau", -1.0); });
  add("missing bank", [](hid_t f) { H5Ldelete(f, "bank", H5P_DEFAULT); });
  add("missing last_update", [](hid_t f) { H5Ldelete(f, "last_update", H5P_DEFAULT); });
  add("bank is float64", [](hid_t f) {
    std::vector<double> v(3000 * 16, 0.25);
    replace_dataset(f, "bank", H5T_IEEE_F64LE, {3000, 16}, v.data());
  });
  add("bank has rank 1", [](hid_t f) {
    std::vector<float> v(3000 * 16, 0.25f);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {3000 * 16}, v.data());
  });
  add("NaN row", [](hid_t f) {
    RowMatrixf v = unit_rows(3000, 16, *std::make_unique<std::mt19937_64>(4));
    v(1234, 5) = std::numeric_limits<float>::quiet_NaN();
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {3000, 16}, v.data());
  });
  add("non-unit row", [](hid_t f) {
    RowMatrixf v = unit_rows(3000, 16, *std::make_unique<std::mt19937_64>(4));
    v.row(17) *= 2.0f;
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {3000, 16}, v.data());
  });
  add("bank declared huge with no data", [](hid_t f) {
    set_attr_i64(f, "n", 1'000'000'000);
    H5Ldelete(f, "bank", H5P_DEFAULT);
    const hsize_t dims[2] = {1'000'000'000, 16}, chunk[2] = {16384, 16};
    const hid_t sp = H5Screate_simple(2, dims, nullptr);
    const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 2, chunk);
    const hid_t d = H5Dcreate2(f, "bank", H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(sp);
  });
  // Truncated copies and files that are not HDF5 at all.
  for (const std::uintmax_t size : {std::uintmax_t{100}, fs::file_size(good) / 2, fs::file_size(good) - 100}) {
    const fs::path t = scratch("truncated-" + std::to_string(size) + ".h5");
    fs::copy_file(good, t, fs::copy_options::overwrite_existing);
    fs::resize_file(t, size);
    bad.emplace_back("truncated to " + std::to_string(size), t);
  }
  const fs::path junk = scratch("junk.h5");
  {
    std::ofstream out(junk, std::ios::binary);
    std::mt19937_64 rng(1);
    for (int i = 0; i < 10000; ++i) out.put(static_cast<char>(rng()));
  }
  bad.emplace_back("random bytes", junk);
  const fs::path empty = scratch("empty.h5");
  std::ofstream(empty).close();
  bad.emplace_back("empty file", empty);
  bad.emplace_back("no such file", scratch("does-not-exist.h5"));

  CHECK(bad.size() >= 10);
  for (const auto& [why, path] : bad) {
    CAPTURE(why);
    std::string msg;
    try {
      membank::load_snapshot(path.string());
    } catch (const Error& err) {
      msg = err.what();
    }
    CHECK(!msg.empty());
    CHECK(msg.find(path.string()) != std::string::npos);
    CHECK(!membank::verify_snapshot(path.string()).empty());
  }
}

TEST_CASE("a failed save leaves the previous snapshot as it was") {
  // Guards the save path's errors: a missing directory and bad labels throw before anything is
  // replaced; the earlier snapshot still verifies and loads the same.
  Engine e = make_engine(500, 8, false, EngineConfig{}, 6);
  const fs::path p = scratch("keep.h5");
  membank::save_snapshot(p.string(), e);
  const auto before = fs::file_size(p);
  CHECK_THROWS_AS(membank::save_snapshot((scratch("no-such-dir") / "x.h5").string(), e), Error);
  std::vector<std::int64_t> short_labels(499, 0);
  CHECK_THROWS_AS(membank::save_snapshot(p.string(), e, {}, short_labels), Error);
  CHECK_THROWS_AS(membank::save_snapshot(p.string(), e, {12}), Error);
  CHECK(fs::file_size(p) == before);
  CHECK(membank::verify_snapshot(p.string()).empty());
}

#ifdef MEMBANK_CLI
TEST_CASE("a writer killed at any moment leaves the previous snapshot loadable") {
  // Guards crash safety: `membank bench snapshot --keep` saves over the same file; it is killed
  // with SIGKILL after random delays (fixed seed) 30 times; every time the destination verifies.
  const fs::path dir = scratch("kill");
  fs::create_directories(dir);
  const std::string dirs = dir.string();
  const auto spawn = [&] {
    const char* argv[] = {MEMBANK_CLI, "bench", "snapshot", "--n", "200000", "--dim", "64", "--keep", "--dir",
                          dirs.c_str(), nullptr};
    pid_t pid = 0;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    REQUIRE(posix_spawn(&pid, MEMBANK_CLI, &fa, nullptr, const_cast<char**>(argv), environ) == 0);
    posix_spawn_file_actions_destroy(&fa);
    return pid;
  };
  // One complete run first: its snapshot is the one every killed writer must leave intact.
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  waitpid(spawn(), &status, 0);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  const double full_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const std::string snap = (dir / "membank-bench-snapshot.h5").string();
  REQUIRE(membank::verify_snapshot(snap).empty());
  std::mt19937_64 rng(2024);
  std::uniform_real_distribution<double> when(0.0, full_ms);
  for (int trial = 0; trial < 30; ++trial) {
    CAPTURE(trial);
    const pid_t pid = spawn();
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(when(rng)));
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    const auto problems = membank::verify_snapshot(snap);
    CHECK(problems.empty());
    if (!problems.empty()) MESSAGE(problems[0]);
  }
  fs::remove_all(dir);
}
#endif
