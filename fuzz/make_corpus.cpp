// Writes the seed corpus of the fuzz targets:
//   OUT/snapshot/  small valid snapshots (uniform, alias + labels, deflate, InfoNCE shared EMA), the
//                  malformed files the snapshot tests make (the same kinds of damage, on a
//                  40 x 8 bank), truncated copies, a flipped stored byte, foreign files;
//   OUT/cli/       typical and wrong command lines, one argument a line.
// Usage: fuzz_make_corpus OUT   (the committed corpus is fuzz/corpus/; rerun after a format change)
#include <membank/engine.hpp>
#include <membank/sampler.hpp>
#include <membank/snapshot.hpp>

#include <hdf5.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using membank::index_t;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "fuzz_make_corpus: %s\n", what.c_str());
  std::exit(1);
}
void check(bool ok, const char* what) {
  if (!ok) die(what);
}

membank::RowMatrixf unit_rows(index_t rows, index_t dim, std::mt19937_64& rng) {
  std::normal_distribution<float> g;
  membank::RowMatrixf m(rows, dim);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t c = 0; c < dim; ++c) m(i, c) = g(rng);
    m.row(i).normalize();
  }
  return m;
}

membank::Engine make_engine(index_t n, index_t d, bool alias, membank::EngineConfig cfg, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::unique_ptr<membank::NoiseSampler> sampler;
  if (alias) {
    std::vector<double> w(static_cast<std::size_t>(n));
    std::uniform_real_distribution<double> u(0.1, 2.0);
    for (double& x : w) x = u(rng);
    sampler = std::make_unique<membank::AliasSampler>(w);
  } else {
    sampler = std::make_unique<membank::UniformSampler>(n);
  }
  membank::Engine e(membank::Bank(n, d, seed), std::move(sampler), cfg);
  const index_t batch = 4;
  membank::RowMatrixf grad(batch, d);
  for (int s = 0; s < 2; ++s) {
    const membank::RowMatrixf f = unit_rows(batch, d, rng);
    std::vector<index_t> ids(static_cast<std::size_t>(batch));
    for (auto& id : ids) id = static_cast<index_t>(rng() % static_cast<std::uint64_t>(n));
    e.step(f, ids, grad);
  }
  return e;
}

// ---- HDF5 edits (as the snapshot tests make them) ---------------------------------------------

void set_attr(hid_t f, const char* name, hid_t type, const void* v) {
  if (H5Aexists(f, name) > 0) check(H5Adelete(f, name) >= 0, "H5Adelete");
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
  check(a >= 0 && H5Awrite(a, type, v) >= 0, "attribute write");
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

void replace_dataset(hid_t f, const char* name, hid_t type, const std::vector<hsize_t>& dims, const void* data,
                     const std::vector<hsize_t>& chunk = {}) {
  if (H5Lexists(f, name, H5P_DEFAULT) > 0) check(H5Ldelete(f, name, H5P_DEFAULT) >= 0, "H5Ldelete");
  const hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (!chunk.empty()) {
    H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data());
    H5Pset_fletcher32(dcpl);
  }
  const hid_t d = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  check(d >= 0, "H5Dcreate2");
  if (data) check(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0, "H5Dwrite");
  H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(sp);
}

void write_at(hid_t f, const char* name, const std::vector<hsize_t>& start, const std::vector<hsize_t>& count,
              hid_t type, const void* v) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  check(d >= 0, "H5Dopen2");
  const hid_t fsp = H5Dget_space(d);
  H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr);
  const hid_t ms = H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr);
  check(H5Dwrite(d, type, ms, fsp, H5P_DEFAULT, v) >= 0, "H5Dwrite (selection)");
  H5Sclose(ms);
  H5Sclose(fsp);
  H5Dclose(d);
}

/// File offset and size of chunk `index` of dataset `name`.
std::pair<haddr_t, hsize_t> chunk_location(const std::string& path, const char* name, hsize_t index) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  const hid_t sp = H5Dget_space(d);
  hsize_t offset[2] = {0, 0};
  unsigned mask = 0;
  haddr_t addr = 0;
  hsize_t size = 0;
  check(H5Dget_chunk_info(d, sp, index, offset, &mask, &addr, &size) >= 0, "H5Dget_chunk_info");
  H5Sclose(sp);
  H5Dclose(d);
  H5Fclose(f);
  return {addr, size};
}

void write_cli(const fs::path& dir, const std::string& name, const std::vector<std::string>& args) {
  std::ofstream out(dir / name, std::ios::binary);
  for (std::size_t i = 0; i < args.size(); ++i) out << args[i] << (i + 1 < args.size() ? "\n" : "");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: fuzz_make_corpus OUT");
  const fs::path out(argv[1]);
  const fs::path snap = out / "snapshot", cli = out / "cli";
  fs::create_directories(snap);
  fs::create_directories(cli);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);

  const index_t n = 40, d = 8;
  std::mt19937_64 rng(2024);

  // -- valid snapshots
  std::vector<std::int64_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 5;
  membank::EngineConfig cfg;
  cfg.k = 8;
  cfg.seed = 5;
  const membank::Engine uniform = make_engine(n, d, false, cfg, 1);
  membank::save_snapshot((snap / "valid-uniform.h5").string(), uniform);
  const membank::Engine alias = make_engine(n, d, true, cfg, 2);
  const std::string good = (snap / "valid-alias-labels.h5").string();
  membank::save_snapshot(good, alias, {}, labels);
  membank::SnapshotOptions deflate;
  deflate.deflate_level = 4;
  membank::save_snapshot((snap / "valid-deflate.h5").string(), alias, deflate, labels);
  membank::EngineConfig other = cfg;
  other.objective = membank::Objective::info_nce;
  other.negatives = membank::NegativesMode::shared;
  other.z_policy = membank::ZPolicy::ema;
  other.exclude_positive = true;
  membank::save_snapshot((snap / "valid-infonce-shared.h5").string(), make_engine(n, d, false, other, 3));

  // -- malformed copies of the alias snapshot with labels
  const auto edited = [&](const std::string& name, const std::function<void(hid_t)>& edit) {
    const fs::path p = snap / ("bad-" + name + ".h5");
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    const hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    check(f >= 0, "H5Fopen");
    edit(f);
    H5Fclose(f);
  };
  const std::vector<float> row = [&] {
    const membank::RowMatrixf r = unit_rows(1, d, rng);
    return std::vector<float>(r.data(), r.data() + d);
  }();
  const hsize_t N = hsize_t(n), D = hsize_t(d);
  edited("bank-float64", [&](hid_t f) {
    const membank::RowMatrixd v = unit_rows(n, d, rng).cast<double>();
    replace_dataset(f, "bank", H5T_IEEE_F64LE, {N, D}, v.data(), {N, D});
  });
  edited("bank-rank1", [&](hid_t f) {
    const membank::RowMatrixf v = unit_rows(n, d, rng);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {N * D}, v.data(), {N * D});
  });
  edited("bank-nan", [&](hid_t f) {
    std::vector<float> r = row;
    r[3] = std::numeric_limits<float>::quiet_NaN();
    write_at(f, "bank", {7, 0}, {1, D}, H5T_NATIVE_FLOAT, r.data());
  });
  edited("bank-not-unit", [&](hid_t f) {
    std::vector<float> r = row;
    for (float& x : r) x *= 2.0f;
    write_at(f, "bank", {17, 0}, {1, D}, H5T_NATIVE_FLOAT, r.data());
  });
  edited("bank-zero-row", [&](hid_t f) {
    const std::vector<float> z(static_cast<std::size_t>(d), 0.f);
    write_at(f, "bank", {9, 0}, {1, D}, H5T_NATIVE_FLOAT, z.data());
  });
  edited("bank-1e9-rows-no-chunk", [&](hid_t f) {
    set_i64(f, "n", 1'000'000'000);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {1'000'000'000, D}, nullptr, {16384, D});
  });
  edited("bank-missing", [](hid_t f) { H5Ldelete(f, "bank", H5P_DEFAULT); });
  edited("bank-group", [](hid_t f) {
    H5Ldelete(f, "bank", H5P_DEFAULT);
    H5Gclose(H5Gcreate2(f, "bank", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  });
  edited("n-off-by-one", [&](hid_t f) { set_i64(f, "n", n - 1); });
  edited("dim-off-by-one", [&](hid_t f) { set_i64(f, "dim", d + 1); });
  edited("n-1e15", [](hid_t f) { set_i64(f, "n", 1'000'000'000'000'000); });
  edited("n-times-dim-overflows", [](hid_t f) { set_i64(f, "n", std::int64_t{1} << 61); });
  edited("n-negative", [](hid_t f) { set_i64(f, "n", -5); });
  edited("step-negative", [](hid_t f) { set_i64(f, "step", -3); });
  edited("last-update-beyond-step", [](hid_t f) {
    const std::int64_t v = 1000;
    write_at(f, "last_update", {5}, {1}, H5T_NATIVE_INT64, &v);
  });
  edited("last-update-short", [&](hid_t f) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n - 1), -1);
    replace_dataset(f, "last_update", H5T_STD_I64LE, {N - 1}, v.data());
  });
  edited("last-update-missing", [](hid_t f) { H5Ldelete(f, "last_update", H5P_DEFAULT); });
  edited("sampler-weights-missing", [](hid_t f) { H5Ldelete(f, "sampler_weights", H5P_DEFAULT); });
  edited("sampler-weight-negative", [](hid_t f) {
    const double v = -1.0;
    write_at(f, "sampler_weights", {10}, {1}, H5T_NATIVE_DOUBLE, &v);
  });
  edited("labels-long", [&](hid_t f) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n + 3), 0);
    replace_dataset(f, "labels", H5T_STD_I64LE, {N + 3}, v.data());
  });
  edited("format-foreign", [](hid_t f) { set_str(f, "format", "someone-elses-format"); });
  edited("format-missing", [](hid_t f) { H5Adelete(f, "format"); });
  edited("format-version-4", [](hid_t f) { set_i64(f, "format_version", 4); });  // a future version
  edited("format-version-2p32-plus-1", [](hid_t f) { set_i64(f, "format_version", (std::int64_t{1} << 32) + 1); });
  edited("log-z-missing", [](hid_t f) { H5Adelete(f, "log_z"); });
  edited("k-missing", [](hid_t f) { H5Adelete(f, "k"); });
  edited("n-string", [](hid_t f) { set_str(f, "n", "40"); });
  edited("tau-negative", [](hid_t f) { set_f64(f, "tau", -1.0); });
  edited("momentum-1.5", [](hid_t f) { set_f64(f, "momentum", 1.5); });
  edited("objective-unknown", [](hid_t f) { set_str(f, "objective", "sideways"); });
  edited("sampler-unknown", [](hid_t f) { set_str(f, "sampler", "gaussian"); });
  edited("log-z-nan", [](hid_t f) { set_f64(f, "log_z", std::numeric_limits<double>::quiet_NaN()); });

  // -- stored bytes flipped behind HDF5's back (caught by the fletcher32 checksums)
  for (const char* ds : {"bank", "labels"}) {
    const fs::path p = snap / (std::string("bad-flipped-") + ds + ".h5");
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    const auto [addr, size] = chunk_location(p.string(), ds, 0);
    std::fstream io(p, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(static_cast<std::streamoff>(addr + size / 2));
    char c = 0;
    io.get(c);
    io.seekp(static_cast<std::streamoff>(addr + size / 2));
    io.put(static_cast<char>(c ^ 0x10));
  }

  // -- truncated copies, foreign files
  const std::uintmax_t full = fs::file_size(good);
  for (const std::uintmax_t size : {std::uintmax_t{100}, full / 2, full - 1}) {
    const fs::path p = snap / ("truncated-" + std::to_string(size) + ".h5");
    fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    fs::resize_file(p, size);
  }
  {
    std::ofstream r(snap / "random.bin", std::ios::binary);
    std::mt19937_64 g(1);
    for (int i = 0; i < 4096; ++i) r.put(static_cast<char>(g()));
  }
  std::ofstream(snap / "empty.bin").close();
  {
    const fs::path p = snap / "plain-hdf5.h5";  // a valid HDF5 file that is not a snapshot
    const hid_t f = H5Fcreate(p.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    check(f >= 0, "H5Fcreate");
    const membank::RowMatrixf v = unit_rows(10, 4, rng);
    replace_dataset(f, "bank", H5T_IEEE_F32LE, {10, 4}, v.data());
    H5Fclose(f);
  }

  // -- command lines
  write_cli(cli, "help", {"--help"});
  write_cli(cli, "version", {"--version"});
  write_cli(cli, "none", {});
  write_cli(cli, "unknown-command", {"frobnicate"});
  write_cli(cli, "bench-step", {"bench", "step", "--n", "5000", "--k", "64", "--batch", "16", "--repeats", "2", "--json"});
  write_cli(cli, "bench-step-shared-alias", {"bench", "step", "--n", "5000", "--k", "64", "--batch", "16",
                                              "--negatives", "shared", "--sampler", "alias", "--threads", "2"});
  write_cli(cli, "bench-step-bad-negatives", {"bench", "step", "--negatives", "sideways"});
  write_cli(cli, "bench-step-k-abc", {"bench", "step", "--k", "abc"});
  write_cli(cli, "bench-step-k-zero", {"bench", "step", "--k", "0"});
  write_cli(cli, "bench-step-k-huge", {"bench", "step", "--k", "99999999999999999999999999"});
  write_cli(cli, "bench-step-threads-huge", {"bench", "step", "--threads", "100000"});
  write_cli(cli, "bench-step-objective", {"bench", "step", "--objective", "info_nce", "--z", "ema", "--tau", "0.1"});
  write_cli(cli, "bench-step-tau-nan", {"bench", "step", "--tau", "nan", "--momentum", "-1"});
  write_cli(cli, "bench-snapshot", {"bench", "snapshot", "--n", "5000", "--dim", "32", "--keep", "--dir", "/tmp",
                                    "--deflate", "4"});
  write_cli(cli, "bench-knn", {"bench", "knn", "--n", "3000", "--queries", "300", "--dim", "32", "--json"});
  write_cli(cli, "bench-scale", {"bench", "scale", "--quick", "--json", "--out", "/tmp/scale.jsonl"});
  write_cli(cli, "bench-scale-far", {"bench", "scale", "--quick", "--series", "far", "--far-n", "1000000000000"});
  write_cli(cli, "bench-scale-lists", {"bench", "scale", "--n", "0", "--base-n", "-3", "--base-k", "1,2,,3"});
  write_cli(cli, "snapshot-verify", {"snapshot", "verify", "/nonexistent/bank.h5"});
  write_cli(cli, "snapshot-inspect", {"snapshot", "inspect", "--json", "/nonexistent/bank.h5"});
  write_cli(cli, "snapshot-import-self", {"snapshot", "import", "a.h5", "a.h5"});
  write_cli(cli, "train", {"train", "--epochs", "1", "--k", "4096", "--encoder", "mlp", "--snapshot", "/tmp/x.h5",
                           "--data", "/nonexistent", "--lr", "0.03", "--seed", "1"});
  write_cli(cli, "train-bad", {"train", "--epochs", "-1", "--batch", "1e3", "--width", "", "--augment", "maybe"});
  write_cli(cli, "options-equals", {"bench", "step", "--n=100", "--k=4", "--batch=2"});
  write_cli(cli, "double-dash", {"snapshot", "verify", "--", "--json"});
  std::printf("corpus written to %s\n", out.c_str());
  return 0;
}
