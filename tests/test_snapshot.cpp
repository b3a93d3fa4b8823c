// HDF5 snapshots (snapshot.hpp): round trip of every field, resume bit-identity (same process and a
// fresh one), a writer SIGKILLed mid-save, malformed and corrupted files, failed saves, imports.
// Files are built and damaged here with the HDF5 C API; the helper executable snapshot_writer
// (SNAPSHOT_WRITER, see snapshot_writer.cpp) is the process that gets killed or resumes.
#include "snapshot_inputs.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include "engine_state.hpp"
#include "hdf5_edit.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>
#include <fmt/ranges.h>
#include <hdf5.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>
#include <thread>

extern char** environ;

using namespace mbtest;
using membank::Engine;
using membank::EngineConfig;
using membank::Error;
using membank::NegativesMode;
using membank::Objective;
using membank::SamplerKind;
using membank::StepStats;
using membank::ZPolicy;
namespace fs = std::filesystem;

namespace {

// ---- files and processes ----------------------------------------------------------------------

/// A fresh directory for one test case, removed when the case ends.
/// Names in `dir` that look like save_snapshot's temporaries for `name` (".<name>.tmp-*").
std::vector<std::string> temp_files(const fs::path& dir, const std::string& name) {
  std::vector<std::string> out;
  const std::string prefix = "." + name + ".tmp-";
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.rfind(prefix, 0) == 0) out.push_back(f);
  }
  return out;
}

bool contains_ci(const std::string& hay, const std::string& needle) {
  const auto lower = [](std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  return lower(hay).find(lower(needle)) != std::string::npos;
}

struct Child {
  pid_t pid = -1;
  int out_fd = -1;  ///< read end of the child's stdout (when piped)
  int in_fd = -1;   ///< write end of the child's stdin (when piped)
};

/// Start `args` (args[0] the executable); stdout to a pipe (or /dev/null), stdin from a pipe (or
/// /dev/null), stderr to `err_path`.
Child spawn_child(const std::vector<std::string>& args, bool pipe_stdout, const std::string& err_path,
                  bool pipe_stdin = false) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  int out[2] = {-1, -1}, in[2] = {-1, -1};
  if (pipe_stdout) {
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  } else {
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  }
  if (pipe_stdin) {
    REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  } else {
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  Child c;
  const int rc = posix_spawn(&c.pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (pipe_stdout) {
    ::close(out[1]);
    c.out_fd = out[0];
  }
  if (pipe_stdin) {
    ::close(in[0]);
    c.in_fd = in[1];
  }
  REQUIRE(rc == 0);
  return c;
}

void close_fds(Child& c) {
  if (c.out_fd >= 0) ::close(c.out_fd);
  if (c.in_fd >= 0) ::close(c.in_fd);
  c.out_fd = c.in_fd = -1;
}

std::string read_line(int fd) {
  std::string s;
  char ch = 0;
  while (::read(fd, &ch, 1) == 1 && ch != '\n') s.push_back(ch);
  return s;
}

int wait_child(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

/// Run to completion; returns the exit status, or 128 + the signal that killed it (as a shell
/// reports it: 139 is SIGSEGV); stderr into *err.
int run_child(const std::vector<std::string>& args, const std::string& err_path, std::string* err = nullptr) {
  const Child c = spawn_child(args, false, err_path);
  const int status = wait_child(c.pid);
  if (err) *err = file_bytes(err_path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

// ---- HDF5 editing (the test's own, independent of the engine's reader) -------------------------

struct H5File {
  hid_t id;
  explicit H5File(const std::string& path) : id(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)) {
    REQUIRE(id >= 0);
  }
  ~H5File() { H5Fclose(id); }
};

void set_attr(hid_t f, const char* name, hid_t type, const void* v) {
  if (H5Aexists(f, name) > 0) REQUIRE(H5Adelete(f, name) >= 0);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(a >= 0);
  REQUIRE(H5Awrite(a, type, v) >= 0);
  H5Aclose(a);
  H5Sclose(sp);
}
void set_i64(hid_t f, const char* name, std::int64_t v) { set_attr(f, name, H5T_NATIVE_INT64, &v); }
void set_f64(hid_t f, const char* name, double v) { set_attr(f, name, H5T_NATIVE_DOUBLE, &v); }
void set_str(hid_t f, const char* name, const char* v) {
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  set_attr(f, name, t, &v);
  H5Tclose(t);
}

/// Replace `name` by a new dataset (optionally chunked with fletcher32), written from `data` if given.
void replace_dataset(hid_t f, const char* name, hid_t type, const std::vector<hsize_t>& dims, const void* data,
                     const std::vector<hsize_t>& chunk = {}) {
  if (H5Lexists(f, name, H5P_DEFAULT) > 0) REQUIRE(H5Ldelete(f, name, H5P_DEFAULT) >= 0);
  const hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (!chunk.empty()) {
    H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
    H5Pset_fletcher32(dcpl);
  }
  const hid_t d = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  REQUIRE(d >= 0);
  if (data) REQUIRE(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
  H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(sp);
}

/// Overwrite row `row` of the existing (chunked, checksummed) 2-D dataset `name` with `values`
/// (HDF5 recomputes the chunk's checksum: only the values are wrong).
void write_row(hid_t f, const char* name, hsize_t row, const std::vector<float>& values) {
  write_dataset_row(f, name, row, values.size(), H5T_NATIVE_FLOAT, values.data());
}

/// Overwrite element `i` of the existing 1-D dataset `name` (memory type `type`).
void write_element(hid_t f, const char* name, hsize_t i, hid_t type, const void* value) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t fs_ = H5Dget_space(d);
  const hsize_t start[1] = {i}, count[1] = {1};
  H5Sselect_hyperslab(fs_, H5S_SELECT_SET, start, nullptr, count, nullptr);
  const hid_t ms = H5Screate_simple(1, count, nullptr);
  REQUIRE(H5Dwrite(d, type, ms, fs_, H5P_DEFAULT, value) >= 0);
  H5Sclose(ms);
  H5Sclose(fs_);
  H5Dclose(d);
}

/// File offset and size of chunk `index` of dataset `name` (to flip stored bytes behind HDF5's back).
std::pair<haddr_t, hsize_t> chunk_location(const std::string& path, const char* name, hsize_t index) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  REQUIRE(f >= 0);
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t sp = H5Dget_space(d);
  hsize_t offset[2] = {0, 0};
  unsigned mask = 0;
  haddr_t addr = 0;
  hsize_t size = 0;
  REQUIRE(H5Dget_chunk_info(d, sp, index, offset, &mask, &addr, &size) >= 0);
  H5Sclose(sp);
  H5Dclose(d);
  H5Fclose(f);
  return {addr, size};
}

void flip_byte(const std::string& path, std::uint64_t at) {
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(io.good());
  io.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  io.get(c);
  io.seekp(static_cast<std::streamoff>(at));
  io.put(static_cast<char>(c ^ 0x5a));
  REQUIRE(io.good());
}

/// Loading `path` must throw membank::Error (nothing else) whose message names the file and
/// contains every keyword; verify_snapshot must report a problem that names the file too.
void expect_rejected(const std::string& path, const std::vector<std::string>& keywords) {
  std::string msg;
  bool other = false;
  try {
    (void)membank::load_snapshot(path);
  } catch (const Error& e) {
    msg = e.what();
  } catch (...) {
    other = true;
  }
  CAPTURE(msg);
  CHECK_FALSE(other);
  if (msg.empty()) {
    FAIL_CHECK("load_snapshot accepted the file");
  } else {
    CHECK(msg.find(path) != std::string::npos);
    for (const auto& k : keywords) {
      CAPTURE(k);
      CHECK(contains_ci(msg, k));
    }
  }
  std::vector<std::string> problems;
  bool verify_threw = false;
  try {
    problems = membank::verify_snapshot(path);
  } catch (...) {
    verify_threw = true;
  }
  CHECK_FALSE(verify_threw);
  CHECK_FALSE(problems.empty());
  if (!problems.empty()) CHECK(problems[0].find(path) != std::string::npos);
}

// ---- engines ----------------------------------------------------------------------------------

bool same_bits(double a, double b) { return bits_equal(a, b); }

void check_same_state(const Engine& a, const Engine& b) {
  CHECK(a.bank().size() == b.bank().size());
  CHECK(a.bank().dim() == b.bank().dim());
  CHECK(bits_equal(a.bank().to_matrix(), b.bank().to_matrix()));
  CHECK(a.bank().last_update() == b.bank().last_update());
  CHECK(a.steps_done() == b.steps_done());
  CHECK(a.partition().policy == b.partition().policy);
  CHECK(a.partition().initialised == b.partition().initialised);
  CHECK(same_bits(a.partition().log_z, b.partition().log_z));
  CHECK(a.sampler().kind() == b.sampler().kind());
  const std::vector<double> pa = a.sampler().probs(), pb = b.sampler().probs();
  CHECK((pa.size() == pb.size() && std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(double)) == 0));
  check_same_config(a.config(), b.config());
}

bool same_stats(const StepStats& a, const StepStats& b) {
  return same_bits(a.loss, b.loss) && same_bits(a.z, b.z) && same_bits(a.z_estimate, b.z_estimate) &&
         same_bits(a.mean_p_positive, b.mean_p_positive) && a.step == b.step;
}

std::string hex_bits(double x) {
  std::uint64_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  return fmt::format("{:016x}", u);
}

}  // namespace

// =================================================================================================

TEST_CASE("snapshot: round trip keeps every field (uniform/alias, deflate 0/4, labels)") {
  // Guards completeness of save/load/read_snapshot_info: bank bit for bit (several chunks, a partial
  // edge chunk, padded rows), last_update, step counter, Z state, every EngineConfig field, sampler
  // kind and probabilities (alias weights exactly), labels present or absent.
  ScratchDir tmp("snapshot", "roundtrip");
  struct Case {
    bool alias;
    int deflate;
    bool labels;
    EngineConfig cfg;
  };
  std::vector<Case> cases;
  {
    EngineConfig c;  // every field away from its default
    c.k = 23;
    c.tau = 0.13;
    c.momentum = 0.37;
    c.objective = Objective::nce;
    c.negatives = NegativesMode::per_sample;
    c.exclude_positive = false;
    c.z_policy = ZPolicy::first_batch;
    c.z_fixed = 2.5;
    c.z_ema = 0.95;
    c.seed = 0xFFFFFFFFFFFFFFFBULL;  // above 2^63: the attribute must keep all 64 bits
    c.normalize_features = true;
    c.unit_norm_tolerance = 2e-3;
    cases.push_back({false, 0, true, c});
    c.negatives = NegativesMode::shared;
    c.z_policy = ZPolicy::ema;
    c.z_ema = 0.8;
    c.exclude_positive = true;
    c.normalize_features = false;
    c.seed = 12345;
    cases.push_back({false, 4, true, c});
    c.negatives = NegativesMode::per_sample;
    c.z_policy = ZPolicy::fixed;
    c.z_fixed = 1234.5;
    c.tau = 0.5;
    cases.push_back({true, 0, false, c});
    c.objective = Objective::info_nce;
    c.negatives = NegativesMode::shared;
    c.z_policy = ZPolicy::first_batch;
    c.momentum = 0.0;
    cases.push_back({true, 4, true, c});
  }
  const index_t n = 2500, d = 250;  // 1048 rows a chunk: 3 chunks, the last one partial
  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& cs = cases[ci];
    CAPTURE(ci);
    CAPTURE(cs.alias);
    CAPTURE(cs.deflate);
    Engine a = make_engine(n, d, cs.alias, cs.cfg, 100 + ci);
    run_fed_steps(a, 3, 500 + ci, 16);
    REQUIRE(a.steps_done() == 3);
    if (cs.cfg.objective == Objective::nce) REQUIRE(a.partition().initialised);
    std::vector<std::int64_t> labels;
    if (cs.labels) {
      std::mt19937_64 rng(ci);
      for (index_t i = 0; i < n; ++i) labels.push_back(static_cast<std::int64_t>(rng() % 1000) - 500);
    }
    const std::string p = tmp / fmt::format("rt{}.h5", ci);
    membank::SnapshotOptions opt;
    opt.deflate_level = cs.deflate;
    membank::save_snapshot(p, a, opt, labels);
    CHECK(temp_files(tmp.dir, fs::path(p).filename().string()).empty());

    std::vector<std::int64_t> got_labels = {42};  // replaced when present, untouched when absent
    const Engine b = membank::load_snapshot(p, &got_labels);
    check_same_state(a, b);
    check_same_config(b.config(), cs.cfg);
    // last_update really carries values (rows written at steps 0..2) and the step counter is 3
    CHECK(std::count(b.bank().last_update().begin(), b.bank().last_update().end(), 2) > 0);
    CHECK(std::count(b.bank().last_update().begin(), b.bank().last_update().end(), -1) > 0);
    if (cs.alias) {
      const auto& wa = dynamic_cast<const membank::AliasSampler&>(a.sampler()).weights();
      const auto& wb = dynamic_cast<const membank::AliasSampler&>(b.sampler()).weights();
      CHECK((wa.size() == wb.size() && std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(double)) == 0));
    }
    if (cs.labels)
      CHECK(got_labels == labels);
    else
      CHECK(got_labels == std::vector<std::int64_t>{42});

    const membank::SnapshotInfo info = membank::read_snapshot_info(p);
    CHECK(info.format == "membank-snapshot");
    CHECK(info.format_version == 3);
    CHECK(info.dtype == membank::DType::float32);
    CHECK(info.engine_version == MEMBANK_TEST_PROJECT_VERSION);
    CHECK(info.n == n);
    CHECK(info.dim == d);
    CHECK(info.step == 3);
    check_same_config(info.config, cs.cfg);
    CHECK(info.partition.policy == cs.cfg.z_policy);
    CHECK(info.partition.initialised == a.partition().initialised);
    CHECK(same_bits(info.partition.log_z, a.partition().log_z));
    CHECK(info.sampler == (cs.alias ? SamplerKind::alias : SamplerKind::uniform));
    CHECK(info.has_labels == cs.labels);
    CHECK(info.rows_per_chunk == (index_t{1} << 20) / (4 * d));
    CHECK(info.compressed == (cs.deflate > 0));
    CHECK(membank::verify_snapshot(p).empty());

    // Saving again over an existing snapshot replaces it (and leaves no temporary behind).
    run_fed_steps(a, 1, 500 + ci, 16);
    membank::save_snapshot(p, a, opt, labels);
    CHECK(temp_files(tmp.dir, fs::path(p).filename().string()).empty());
    CHECK(membank::load_snapshot(p).steps_done() == 4);
  }
}

TEST_CASE("snapshot: a resumed engine continues bit for bit (first_batch, ema, shared + alias)") {
  // Guards resume: A runs S steps, is saved and loaded as B, B runs S more; C runs 2S uninterrupted
  // on the same inputs. B's last S losses (and Z, Zhat, P(pos)), bank, last_update and Z state must
  // equal C's bit for bit (same draws: seed and step counter restored; same Z; same alias table).
  struct Case {
    const char* name;
    bool alias;
    ZPolicy z;
    NegativesMode mode;
    bool exclude_positive;
    int deflate;
  };
  ScratchDir tmp("snapshot", "resume");
  const int S = 5;
  const index_t n = 3000, d = 32, batch = 16;
  for (const Case& cs : {Case{"per-sample first_batch", false, ZPolicy::first_batch, NegativesMode::per_sample, false,
                              0},
                         Case{"per-sample ema", false, ZPolicy::ema, NegativesMode::per_sample, false, 4},
                         Case{"shared alias ema", true, ZPolicy::ema, NegativesMode::shared, false, 0},
                         Case{"shared alias first_batch exclude", true, ZPolicy::first_batch, NegativesMode::shared,
                              true, 4}}) {
    CAPTURE(std::string(cs.name));
    EngineConfig cfg;
    cfg.k = 64;
    cfg.z_policy = cs.z;
    cfg.z_ema = 0.7;  // Z moves visibly every step
    cfg.negatives = cs.mode;
    cfg.exclude_positive = cs.exclude_positive;
    cfg.momentum = 0.5;
    cfg.seed = 31;
    Engine c = make_engine(n, d, cs.alias, cfg, 8);
    const auto whole = run_fed_steps(c, 2 * S, 77, batch);
    Engine a = make_engine(n, d, cs.alias, cfg, 8);
    const auto first = run_fed_steps(a, S, 77, batch);
    for (int s = 0; s < S; ++s)
      REQUIRE(same_stats(first[static_cast<std::size_t>(s)], whole[static_cast<std::size_t>(s)]));
    const std::string p = tmp / "resume.h5";
    membank::SnapshotOptions opt;
    opt.deflate_level = cs.deflate;
    membank::save_snapshot(p, a, opt);
    Engine b = membank::load_snapshot(p);
    REQUIRE(b.steps_done() == S);
    const auto tail = run_fed_steps(b, S, 77, batch);
    for (int s = 0; s < S; ++s) {
      CAPTURE(s);
      CHECK(same_stats(tail[static_cast<std::size_t>(s)], whole[static_cast<std::size_t>(S + s)]));
    }
    check_same_state(b, c);
    // The engine that was saved is unaffected by saving: it continues like C too.
    const auto a_tail = run_fed_steps(a, S, 77, batch);
    CHECK(same_stats(a_tail.back(), whole.back()));
  }
}

TEST_CASE("snapshot: a run resumed in a fresh process continues bit for bit") {
  // Guards resume across processes (nothing carried in memory): A runs S steps and is saved here;
  // snapshot_writer loads it, runs S more steps on the same inputs, reports the bits of its stats and
  // saves; they and its final state must equal those of C, 2S steps uninterrupted here.
  ScratchDir tmp("snapshot", "fresh");
  const int S = 4;
  const index_t n = 3000, d = 32, batch = 16;
  EngineConfig cfg;
  cfg.k = 64;
  cfg.z_policy = ZPolicy::ema;
  cfg.z_ema = 0.7;
  cfg.negatives = NegativesMode::shared;
  cfg.seed = 5;
  Engine c = make_engine(n, d, true, cfg, 9);
  const auto whole = run_fed_steps(c, 2 * S, 123, batch);
  Engine a = make_engine(n, d, true, cfg, 9);
  run_fed_steps(a, S, 123, batch);
  const std::string in = tmp / "a.h5", out = tmp / "b.h5", losses = tmp / "losses.txt";
  membank::save_snapshot(in, a);
  std::string err;
  const int rc = run_child({SNAPSHOT_WRITER, "resume", in, out, "--steps", std::to_string(S), "--input-seed", "123",
                            "--batch", std::to_string(batch), "--losses", losses},
                           tmp / "err.txt", &err);
  CAPTURE(err);
  REQUIRE(rc == 0);
  std::ifstream lf(losses);
  for (int s = 0; s < S; ++s) {
    CAPTURE(s);
    std::string loss, z, zhat, ppos;
    REQUIRE(static_cast<bool>(lf >> loss >> z >> zhat >> ppos));
    const StepStats& w = whole[static_cast<std::size_t>(S + s)];
    CHECK(loss == hex_bits(w.loss));
    CHECK(z == hex_bits(w.z));
    CHECK(zhat == hex_bits(w.z_estimate));
    CHECK(ppos == hex_bits(w.mean_p_positive));
  }
  const Engine b = membank::load_snapshot(out);
  check_same_state(b, c);
}

TEST_CASE("snapshot: a writer SIGKILLed at random moments always leaves a complete snapshot") {
  // Guards crash safety of save_snapshot (temp file, fsync, rename): snapshot_writer saves a
  // 40000 x 64 engine (10 MB) over the same path again and again (one step between saves, so every
  // save differs) and is SIGKILLed at a random moment (fixed seed) 30 times. After every kill the
  // destination verifies, loads, and is bit for bit one of the complete states the writer saves
  // (replayed here by step count). Temporaries may be left only by killed writers, one at most each.
  ScratchDir tmp("snapshot", "kill");
  const std::string name = "bank.h5", snap = tmp / name;
  const index_t n = 40000, d = 64;
  const std::string ns = std::to_string(n), ds = std::to_string(d);
  const auto old_sigpipe = std::signal(SIGPIPE, SIG_IGN);  // a writer that died must not kill the test

  // A complete first snapshot (step 1), and the time one step + save takes (only to spread kills).
  Child first = spawn_child({SNAPSHOT_WRITER, "loop", snap, "--n", ns, "--dim", ds, "--count", "1"}, true,
                            tmp / "err-first.txt");
  REQUIRE(read_line(first.out_fd) == "ready");
  const auto t0 = std::chrono::steady_clock::now();
  const int st0 = wait_child(first.pid);
  const double save_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  close_fds(first);
  REQUIRE(WIFEXITED(st0));
  REQUIRE(WEXITSTATUS(st0) == 0);
  REQUIRE(temp_files(tmp.dir, name).empty());
  REQUIRE(membank::verify_snapshot(snap).empty());

  // The states the writer saves, replayed here: after its i-th save the snapshot holds step i.
  Engine replay = make_engine(n, d, false, writer_config(), kWriterBankSeed);
  std::map<std::int64_t, std::uint64_t> expected;
  const auto expected_hash = [&](std::int64_t step) {
    while (replay.steps_done() < step) {
      run_fed_steps(replay, 1, kWriterInputSeed, kWriterBatch);
      expected[replay.steps_done()] = state_hash(replay);
    }
    return expected.at(step);
  };
  {
    const Engine e = membank::load_snapshot(snap);
    REQUIRE(e.steps_done() == 1);
    REQUIRE(state_hash(e) == expected_hash(1));
  }

  const auto start_writer = [&](int trial) {
    return spawn_child({SNAPSHOT_WRITER, "loop", snap, "--n", ns, "--dim", ds, "--wait-go"}, true,
                       tmp / fmt::format("err-{}.txt", trial), true);
  };
  // Trial: let the writer complete m = 0, 1 or 2 saves (it prints "saved STEP" after each), then
  // kill it after a random delay within about one more save. The next writer builds its engine
  // meanwhile and waits for its "go".
  std::mt19937_64 rng(20240611);
  std::uniform_real_distribution<double> delay_ms(0.0, 1.2 * save_ms);
  std::set<pid_t> killed;
  std::set<std::int64_t> steps_seen;
  const int trials = 30;
  Child next = start_writer(0);
  for (int trial = 0; trial < trials; ++trial) {
    CAPTURE(trial);
    Child w = next;
    REQUIRE(read_line(w.out_fd) == "ready");
    REQUIRE(::write(w.in_fd, "go\n", 3) == 3);
    if (trial + 1 < trials) next = start_writer(trial + 1);
    const int m = std::array<int, 6>{0, 0, 0, 1, 1, 2}[rng() % 6];
    CAPTURE(m);
    for (int k = 1; k <= m; ++k) REQUIRE(read_line(w.out_fd) == fmt::format("saved {}", k));
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms(rng)));
    ::kill(w.pid, SIGKILL);
    const int st = wait_child(w.pid);
    close_fds(w);
    CAPTURE(file_bytes(tmp / fmt::format("err-{}.txt", trial)));
    REQUIRE(WIFSIGNALED(st));  // the writer was still saving, not dead of an error of its own
    killed.insert(w.pid);

    const std::vector<std::string> problems = membank::verify_snapshot(snap);
    CHECK(problems.empty());
    if (!problems.empty()) MESSAGE(problems[0]);
    std::int64_t step = -1;
    std::uint64_t hash = 0;
    try {
      const Engine e = membank::load_snapshot(snap);
      step = e.steps_done();
      hash = state_hash(e);
    } catch (const Error& e) {
      FAIL_CHECK(fmt::format("load failed: {}", e.what()));
      continue;
    }
    CHECK(step >= std::max(1, m));  // a save that returned is what a later reader finds
    if (step >= 1) CHECK(hash == expected_hash(step));
    steps_seen.insert(step);
  }
  std::signal(SIGPIPE, old_sigpipe);

  // Leftover temporaries: only from killed writers (the pid is in the name), at most one each.
  std::map<pid_t, int> per_pid;
  const std::vector<std::string> left = temp_files(tmp.dir, name);
  for (const std::string& f : left) {
    CAPTURE(f);
    const std::string rest = f.substr(("." + name + ".tmp-").size());
    const pid_t pid = static_cast<pid_t>(std::stol(rest.substr(0, rest.find('-'))));
    CHECK(killed.count(pid) == 1);
    CHECK(++per_pid[pid] == 1);
  }
  CHECK(left.size() <= killed.size());
  for (const auto& e : fs::directory_iterator(tmp.dir)) {
    const std::string f = e.path().filename().string();
    CHECK((f == name || f.rfind("err-", 0) == 0 || f.rfind("." + name + ".tmp-", 0) == 0));
  }
  // Diagnostics (not pass/fail: they depend on timing): how the kills fell.
  MESSAGE(fmt::format("one step + save took {:.0f} ms; steps found after kills: {}; temporaries left by killed "
                      "writers: {} of {}",
                      save_ms, fmt::join(steps_seen, ","), left.size(), trials));
}

TEST_CASE("snapshot: malformed files each give one clear Error naming the file and the problem") {
  // Guards load validation: every damaged or foreign file makes load_snapshot throw membank::Error
  // (never another exception, never a crash) whose message names the file and the problem, and
  // verify_snapshot report it. Damage is done with the HDF5 C API on copies of a valid snapshot.
  ScratchDir tmp("snapshot", "malformed");
  const index_t n = 3000, d = 16;
  Engine e = make_engine(n, d, true, EngineConfig{}, 2);
  run_fed_steps(e, 2, 3, 32);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n), 7);
  const std::string good = tmp / "good.h5";
  membank::save_snapshot(good, e, {}, labels);
  REQUIRE(membank::verify_snapshot(good).empty());

  struct Bad {
    std::string why;
    std::string path;
    std::vector<std::string> keywords;
  };
  std::vector<Bad> bad;
  const auto edited = [&](const std::string& why, std::vector<std::string> keywords,
                          const std::function<void(hid_t)>& edit) {
    const std::string p = tmp / fmt::format("bad{:02}.h5", bad.size());
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    {
      H5File f(p);
      edit(f.id);
    }
    bad.push_back({why, p, std::move(keywords)});
  };
  std::mt19937_64 rng(4);
  const std::vector<float> unit_row = [&] {
    const RowMatrixf r = unit_rows(1, d, rng);
    return std::vector<float>(r.data(), r.data() + d);
  }();

  // -- the bank dataset
  edited("bank is float64", {"bank", "float32"}, [&](hid_t f) {
    const RowMatrixd v = unit_rows(n, d, rng).cast<double>();
    replace_dataset(f, "bank", H5T_IEEE_F64LE, {hsize_t(n), hsize_t(d)}, v.data(), {hsize_t(n), hsize_t(d)});
  });
  edited("bank has rank 1", {"bank", "rank"}, [&](hid_t f) {
    const RowMatrixf v = unit_rows(n, d, rng);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {hsize_t(n * d)}, v.data(), {hsize_t(n * d)});
  });
  edited("NaN in a bank row", {"row 1234", "nan"}, [&](hid_t f) {
    std::vector<float> r = unit_row;
    r[5] = std::numeric_limits<float>::quiet_NaN();
    write_row(f, "bank", 1234, r);
  });
  edited("bank row not unit norm", {"unit"}, [&](hid_t f) {
    std::vector<float> r = unit_row;
    for (float& x : r) x *= 2.0f;
    write_row(f, "bank", 17, r);
  });
  edited("bank row all zeros", {"row 99", "zero"},
         [&](hid_t f) { write_row(f, "bank", 99, std::vector<float>(d, 0.f)); });
  edited("bank declared with 10^9 rows, no chunk written", {"bank", "chunk"}, [&](hid_t f) {
    set_i64(f, "n", 1'000'000'000);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {1'000'000'000, hsize_t(d)}, nullptr, {16384, hsize_t(d)});
  });
  edited("missing bank", {"bank", "missing"}, [](hid_t f) { H5Ldelete(f, "bank", H5P_DEFAULT); });
  edited("bank stored contiguous (not chunked by rows)", {"bank", "chunked"}, [&](hid_t f) {
    const RowMatrixf v = unit_rows(n, d, rng);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {hsize_t(n), hsize_t(d)}, v.data());
  });
  edited("bank is a group", {"bank"}, [](hid_t f) {
    H5Ldelete(f, "bank", H5P_DEFAULT);
    H5Gclose(H5Gcreate2(f, "bank", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  });
  // -- attributes against the data
  edited("n attribute != rows", {"2999"}, [](hid_t f) { set_i64(f, "n", 2999); });
  edited("dim attribute != columns", {"17"}, [](hid_t f) { set_i64(f, "dim", 17); });
  edited("absurd n = 10^15 with a small dataset", {"1000000000000000"},
         [](hid_t f) { set_i64(f, "n", 1'000'000'000'000'000); });
  edited("n x dim overflows int64", {"2305843009213693952"}, [](hid_t f) { set_i64(f, "n", std::int64_t{1} << 61); });
  edited("negative n", {"-5"}, [](hid_t f) { set_i64(f, "n", -5); });
  edited("negative step", {"step"}, [](hid_t f) { set_i64(f, "step", -3); });
  edited("last_update beyond step", {"last_update"}, [](hid_t f) {
    const std::int64_t v = 1000;
    write_element(f, "last_update", 5, H5T_NATIVE_INT64, &v);
  });
  edited("last_update of the wrong length", {"last_update"}, [&](hid_t f) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n - 1), -1);
    replace_dataset(f, "last_update", H5T_STD_I64LE, {hsize_t(n - 1)}, v.data());
  });
  edited("missing last_update", {"last_update", "missing"}, [](hid_t f) { H5Ldelete(f, "last_update", H5P_DEFAULT); });
  edited("missing sampler_weights (alias sampler)", {"sampler_weights"},
         [](hid_t f) { H5Ldelete(f, "sampler_weights", H5P_DEFAULT); });
  edited("negative sampler weight", {"sampler_weights"}, [](hid_t f) {
    const double v = -1.0;
    write_element(f, "sampler_weights", 10, H5T_NATIVE_DOUBLE, &v);
  });
  edited("labels of the wrong length", {"labels"}, [&](hid_t f) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n + 3), 0);
    replace_dataset(f, "labels", H5T_STD_I64LE, {hsize_t(n + 3)}, v.data());
  });
  // -- format, version, attributes
  edited("wrong format name", {"format", "someone-elses-format"},
         [](hid_t f) { set_str(f, "format", "someone-elses-format"); });
  edited("no format attribute", {"format"}, [](hid_t f) { H5Adelete(f, "format"); });
  edited("future format_version 4", {"format_version", "4"}, [](hid_t f) { set_i64(f, "format_version", 4); });
  edited("format_version 2^32 + 1 (1 after narrowing to int)", {"format_version", "4294967297"},
         [](hid_t f) { set_i64(f, "format_version", (std::int64_t{1} << 32) + 1); });
  edited("missing attribute log_z", {"log_z", "missing"}, [](hid_t f) { H5Adelete(f, "log_z"); });
  edited("missing attribute k", {"'k'", "missing"}, [](hid_t f) { H5Adelete(f, "k"); });
  edited("attribute n is a string", {"'n'"}, [](hid_t f) { set_str(f, "n", "3000"); });
  edited("tau = -1", {"tau", "-1"}, [](hid_t f) { set_f64(f, "tau", -1.0); });
  edited("momentum = 1.5", {"momentum", "1.5"}, [](hid_t f) { set_f64(f, "momentum", 1.5); });
  edited("unknown objective", {"objective", "sideways"}, [](hid_t f) { set_str(f, "objective", "sideways"); });
  edited("unknown sampler", {"sampler", "gaussian"}, [](hid_t f) { set_str(f, "sampler", "gaussian"); });
  edited("log_z NaN while initialised", {"log_z"},
         [](hid_t f) { set_f64(f, "log_z", std::numeric_limits<double>::quiet_NaN()); });

  // -- truncated copies, foreign files
  for (const std::uintmax_t size :
       {std::uintmax_t{100}, fs::file_size(good) / 2, fs::file_size(good) - 100, fs::file_size(good) - 1}) {
    const std::string p = tmp / fmt::format("truncated-{}.h5", size);
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    fs::resize_file(p, size);
    bad.push_back({"truncated to " + std::to_string(size) + " bytes", p, {"truncated"}});
  }
  {
    const std::string p = tmp / "random.h5";
    std::ofstream out(p, std::ios::binary);
    std::mt19937_64 r(1);
    for (int i = 0; i < 100000; ++i) out.put(static_cast<char>(r()));
    bad.push_back({"random bytes", p, {"HDF5"}});
  }
  {
    const std::string p = tmp / "empty.h5";
    std::ofstream(p).close();
    bad.push_back({"empty file", p, {"HDF5"}});
  }
  {
    const std::string p = tmp / "plain.h5";  // a valid HDF5 file that is not a snapshot
    const hid_t f = H5Fcreate(p.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    REQUIRE(f >= 0);
    const RowMatrixf v = unit_rows(10, 4, rng);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {10, 4}, v.data());
    H5Fclose(f);
    bad.push_back({"plain HDF5 file with a bank dataset but no attributes", p, {"format"}});
  }
  bad.push_back({"nonexistent path", tmp / "does-not-exist.h5", {"no such file"}});
  bad.push_back({"a directory", tmp.dir.string(), {}});

  REQUIRE(bad.size() >= 10);
  for (const Bad& b : bad) {
    CAPTURE(b.why);
    CAPTURE(b.path);
    expect_rejected(b.path, b.keywords);
  }
}

TEST_CASE("snapshot: stored bytes flipped behind HDF5's back are caught by the checksums") {
  // Guards the fletcher32 checksums on every dataset: a byte flipped inside a stored chunk of bank,
  // last_update, sampler_weights or labels makes load_snapshot throw an Error naming the file and
  // the dataset, and verify_snapshot ("metadata, checksums, every row") report it.
  ScratchDir tmp("snapshot", "checksum");
  const index_t n = 20000, d = 32;  // 8192 rows a chunk: 3 bank chunks
  Engine e = make_engine(n, d, true, EngineConfig{}, 12);
  run_fed_steps(e, 2, 3, 32);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 10;
  const std::string good = tmp / "good.h5";
  membank::save_snapshot(good, e, {}, labels);
  REQUIRE(membank::verify_snapshot(good).empty());

  for (const std::string ds : {"bank", "last_update", "sampler_weights", "labels"}) {
    CAPTURE(ds);
    const std::string p = tmp / fmt::format("flipped-{}.h5", ds);
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    const auto [addr, size] = chunk_location(p, ds.c_str(), ds == "bank" ? 1 : 0);
    REQUIRE(size > 16);
    flip_byte(p, addr + size / 2);
    std::string msg;
    try {
      std::vector<std::int64_t> got;
      (void)membank::load_snapshot(p, &got);  // labels asked for: every dataset is read
    } catch (const Error& err) {
      msg = err.what();
    }
    CAPTURE(msg);
    CHECK(msg.find(p) != std::string::npos);
    CHECK(contains_ci(msg, ds));
    CHECK(contains_ci(msg, "checksum"));
    CHECK_FALSE(membank::verify_snapshot(p).empty());
  }
}

TEST_CASE("snapshot: a failed save throws and leaves the previous snapshot as it was") {
  // Guards the save path's failures: a missing directory, a parent that is a file, labels of the
  // wrong length, a bad deflate level, and a write that fails part way (RLIMIT_FSIZE in a child
  // process, as on a full disk) all throw membank::Error naming the path; the snapshot already at the
  // destination keeps its bytes and verifies, and no temporary file is left behind.
  ScratchDir tmp("snapshot", "failedsave");
  const index_t n = 20000, d = 32;
  Engine e = make_engine(n, d, false, writer_config(), kWriterBankSeed);
  run_fed_steps(e, 2, kWriterInputSeed, kWriterBatch);
  const std::string p = tmp / "keep.h5";
  membank::save_snapshot(p, e);
  const std::string before = file_bytes(p);
  run_fed_steps(e, 3, kWriterInputSeed, kWriterBatch);  // what a successful save would now write

  const auto throws_naming = [&](const std::string& path, const std::function<void()>& f) {
    std::string msg;
    try {
      f();
    } catch (const Error& err) {
      msg = err.what();
    }
    CAPTURE(msg);
    REQUIRE_FALSE(msg.empty());
    CHECK(msg.find(path) != std::string::npos);
  };
  const std::string missing_dir = tmp / "no-such-dir/x.h5";
  throws_naming(missing_dir, [&] { membank::save_snapshot(missing_dir, e); });
  CHECK_FALSE(fs::exists(tmp.dir / "no-such-dir"));
  const std::string under_file = p + "/x.h5";  // the parent is a regular file
  throws_naming(under_file, [&] { membank::save_snapshot(under_file, e); });
  std::vector<std::int64_t> short_labels(static_cast<std::size_t>(n - 1), 0);
  CHECK_THROWS_AS(membank::save_snapshot(p, e, {}, short_labels), Error);
  CHECK_THROWS_AS(membank::save_snapshot(p, e, {10}), Error);
  CHECK_THROWS_AS(membank::save_snapshot(p, e, {-1}), Error);
  CHECK(file_bytes(p) == before);
  CHECK(temp_files(tmp.dir, "keep.h5").empty());

  // A write that fails part way: snapshot_writer (the same engine, 5 steps) with a 256 KiB file size
  // limit; its 2.5 MB save must fail, with the destination untouched and the temporary removed.
  for (const std::string deflate : {"0", "4"}) {
    CAPTURE(deflate);
    std::string err;
    const int rc = run_child({SNAPSHOT_WRITER, "write", p, "--n", std::to_string(n), "--dim", std::to_string(d),
                              "--steps", "5", "--deflate", deflate, "--fsize-limit", "262144"},
                             tmp / "err.txt", &err);
    CAPTURE(err);
    CHECK(err.find("error: ") != std::string::npos);  // save_snapshot threw membank::Error ...
    CHECK(err.find(p) != std::string::npos);            // ... naming the destination
    // ... and the process then exits normally (status 2) instead of dying of a signal (139: SIGSEGV
    // in HDF5's library cleanup at exit, on the file whose close failed after the failed write).
    CHECK_MESSAGE(rc == 2, "snapshot_writer status ", rc);
    CHECK(file_bytes(p) == before);
    CHECK(membank::verify_snapshot(p).empty());
    CHECK(temp_files(tmp.dir, "keep.h5").empty());
  }
  CHECK(membank::load_snapshot(p).steps_done() == 2);
  // The same save without the limit succeeds (the failure above was the limit's).
  std::string err;
  CHECK(run_child({SNAPSHOT_WRITER, "write", p, "--n", std::to_string(n), "--dim", std::to_string(d), "--steps", "5"},
                  tmp / "err.txt", &err) == 0);
  CHECK(membank::load_snapshot(p).steps_done() == 5);
}

TEST_CASE("snapshot: import_bank reads float32/float64 (N, D) datasets of any layout and renormalises") {
  // Guards import_bank on files other tools write: contiguous float64 and float32, chunked by whole
  // rows, and chunked the way h5py's chunks=True / compression does (column blocks too); rows equal
  // the double-normalised input to 1e-6, rows already unit are kept bit for bit and not counted;
  // bad inputs (NaN, zero row, integer dtype, rank 3, missing dataset) throw an Error naming the
  // file and the dataset.
  ScratchDir tmp("snapshot", "import");
  const index_t n = 777, d = 20;
  std::mt19937_64 rng(17);
  RowMatrixd x = gaussian(n, d, rng, 3.0).cast<double>();
  const index_t unit_first = 100;  // rows 0..99 already unit norm (in float32)
  RowMatrixf x32 = x.cast<float>();
  for (index_t i = 0; i < unit_first; ++i) {
    const RowMatrixd r = x.row(i) / x.row(i).norm();
    x32.row(i) = r.cast<float>();
  }
  const std::string p = tmp / "plain.h5";
  {
    const hid_t f = H5Fcreate(p.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    REQUIRE(f >= 0);
    const hsize_t dims[2] = {hsize_t(n), hsize_t(d)};
    const auto make = [&](const char* name, hid_t type, const void* data, std::vector<hsize_t> chunk, int deflate) {
      const hid_t sp = H5Screate_simple(2, dims, nullptr);
      const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
      if (!chunk.empty()) H5Pset_chunk(dcpl, 2, chunk.data());
      if (deflate) H5Pset_deflate(dcpl, static_cast<unsigned>(deflate));
      const hid_t ds = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
      REQUIRE(ds >= 0);
      REQUIRE(H5Dwrite(ds, type == H5T_IEEE_F64LE ? H5T_NATIVE_DOUBLE : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL,
                       H5P_DEFAULT, data) >= 0);
      H5Dclose(ds);
      H5Pclose(dcpl);
      H5Sclose(sp);
    };
    make("f64", H5T_IEEE_F64LE, x.data(), {}, 0);
    make("f32", H5T_IEEE_F32LE, x32.data(), {}, 0);
    make("f32_rows", H5T_IEEE_F32LE, x32.data(), {64, hsize_t(d)}, 0);
    make("f64_h5py_chunks", H5T_IEEE_F64LE, x.data(), {195, 5}, 4);  // what h5py picks for (777, 20)
    H5Fclose(f);
  }
  const RowMatrixd want64 = normalized_d(x);
  const RowMatrixd want32 = normalized_d(x32.cast<double>());
  struct Case {
    const char* ds;
    const RowMatrixd* want;
    index_t renormalised;
  };
  for (const Case cs : {Case{"f64", &want64, n}, Case{"f32", &want32, n - unit_first},
                        Case{"f32_rows", &want32, n - unit_first}, Case{"f64_h5py_chunks", &want64, n}}) {
    CAPTURE(std::string(cs.ds));
    index_t renorm = -1;
    std::string msg;
    try {
      const membank::Bank bank = membank::import_bank(p, cs.ds, &renorm);
      REQUIRE(bank.size() == n);
      REQUIRE(bank.dim() == d);
      const RowMatrixf got = bank.to_matrix();
      CHECK((got.cast<double>() - *cs.want).cwiseAbs().maxCoeff() < 1e-6);
      CHECK(renorm == cs.renormalised);
      if (std::string(cs.ds) != "f64" && std::string(cs.ds) != "f64_h5py_chunks")
        CHECK(bits_equal(RowMatrixf(got.topRows(unit_first)), RowMatrixf(x32.topRows(unit_first))));
    } catch (const Error& err) {
      msg = err.what();
    }
    CAPTURE(msg);
    CHECK(msg.empty());
  }

  // Refusals.
  const std::string q = tmp / "badplain.h5";
  {
    const hid_t f = H5Fcreate(q.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    RowMatrixd y = x;
    y(3, 4) = std::numeric_limits<double>::quiet_NaN();
    replace_dataset(f, "nan", H5T_IEEE_F64LE, {hsize_t(n), hsize_t(d)}, y.data());
    y = x;
    y.row(9).setZero();
    replace_dataset(f, "zero_row", H5T_IEEE_F64LE, {hsize_t(n), hsize_t(d)}, y.data());
    std::vector<std::int32_t> ints(static_cast<std::size_t>(n * d), 1);
    replace_dataset(f, "ints", H5T_STD_I32LE, {hsize_t(n), hsize_t(d)}, ints.data());
    std::vector<float> cube(2 * 3 * 4, 1.0f);
    replace_dataset(f, "cube", H5T_IEEE_F32LE, {2, 3, 4}, cube.data());
    H5Fclose(f);
  }
  for (const auto& entry : std::vector<std::pair<std::string, std::string>>{
           {"nan", "row 3"}, {"zero_row", "row 9"}, {"ints", "float"}, {"cube", "rank"}, {"absent", "missing"}}) {
    // plain references: clang cannot capture a structured binding in CAPTURE's lambda
    const std::string& ds = entry.first;
    const std::string& keyword = entry.second;
    CAPTURE(ds);
    std::string msg;
    try {
      (void)membank::import_bank(q, ds);
    } catch (const Error& err) {
      msg = err.what();
    }
    CAPTURE(msg);
    REQUIRE_FALSE(msg.empty());
    CHECK(msg.find(q) != std::string::npos);
    CHECK(contains_ci(msg, ds == "absent" ? "absent" : ds));
    CHECK(contains_ci(msg, keyword));
  }
}
