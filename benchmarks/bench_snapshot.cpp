// `membank bench snapshot`: save and load of a large bank against plain sequential write and read of
// the same bytes on the same disk, in the same run, with peak resident memory of each phase.
#include "bench_common.hpp"
#include "commands.hpp"
#include "options.hpp"
#include "machine_info.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>

namespace membank::tools {

namespace {

struct SnapOptions {
  index_t n = 10'000'000;
  index_t dim = 128;
  std::string dir = ".";
  int deflate = 0;
  bool json = false;
  bool keep = false;
};

/// Drop a file's cached pages (they are clean after fsync), so that the next read comes from disk.
void drop_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void write_all(const std::string& path, const char* data, std::size_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MEMBANK_CHECK(fd >= 0, "{}: cannot create: {}", path, std::strerror(errno));
  constexpr std::size_t kPiece = std::size_t{8} << 20;
  for (std::size_t off = 0; off < bytes;) {
    const ssize_t w = ::write(fd, data + off, std::min(kPiece, bytes - off));
    MEMBANK_CHECK(w > 0, "{}: write failed: {}", path, std::strerror(errno));
    off += static_cast<std::size_t>(w);
  }
  MEMBANK_CHECK(::fsync(fd) == 0, "{}: fsync failed", path);
  ::close(fd);
}

void read_all(const std::string& path, char* data, std::size_t bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  MEMBANK_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  constexpr std::size_t kPiece = std::size_t{8} << 20;
  for (std::size_t off = 0; off < bytes;) {
    const ssize_t r = ::read(fd, data + off, std::min(kPiece, bytes - off));
    MEMBANK_CHECK(r > 0, "{}: read failed at byte {}", path, off);
    off += static_cast<std::size_t>(r);
  }
  ::close(fd);
}

void run_bench_snapshot(const SnapOptions& o) {
  namespace fs = std::filesystem;
  const std::string snap = (fs::path(o.dir) / "membank-bench-snapshot.h5").string();
  const std::string raw = (fs::path(o.dir) / "membank-bench-plain.bin").string();
  const double bank_bytes = static_cast<double>(o.n) * static_cast<double>(o.dim) * 4.0;
  // Before the bank is built: room for both files (the snapshot and the plain copy) on --dir's disk.
  require_output_space("--dir", snap, static_cast<double>(snapshot_size_estimate(o.n, o.dim)) + bank_bytes);
  const auto say = [&](const std::string& s) {
    if (!o.json) fmt::print(stderr, "{}\n", s);
  };

  say(fmt::format("building a {} x {} bank ({:.2f} GB) ...", o.n, o.dim, bank_bytes * 1e-9));
  EngineConfig cfg;
  cfg.k = 16;
  auto engine = std::make_unique<Engine>(Bank(o.n, o.dim, 1), std::make_unique<UniformSampler>(o.n), cfg);
  const BankView v = engine->bank().view();
  MEMBANK_CHECK(v.stride == v.dim, "the plain-write comparison needs unpadded rows (dim a multiple of 16)");

  say("save_snapshot ...");
  reset_peak_rss();
  double t0 = now_s();
  save_snapshot(snap, *engine, SnapshotOptions{o.deflate});
  const double save_s = now_s() - t0;
  const double save_peak = peak_rss_bytes();

  say("plain write + fsync of the same bytes ...");
  t0 = now_s();
  write_all(raw, reinterpret_cast<const char*>(v.data), static_cast<std::size_t>(bank_bytes));
  const double write_s = now_s() - t0;
  const std::vector<float> probe(v.row(o.n / 2), v.row(o.n / 2) + o.dim);
  engine.reset();  // the bank's memory goes back before the read phases

  drop_cache(raw);
  drop_cache(snap);
  say("plain read of the same bytes ...");
  {
    std::unique_ptr<char[]> buf(new char[static_cast<std::size_t>(bank_bytes)]);
    t0 = now_s();
    read_all(raw, buf.get(), static_cast<std::size_t>(bank_bytes));
  }
  const double read_s = now_s() - t0;

  say("load_snapshot ...");
  reset_peak_rss();
  t0 = now_s();
  Engine loaded = load_snapshot(snap);
  const double load_s = now_s() - t0;
  const double load_peak = peak_rss_bytes();
  MEMBANK_CHECK(std::equal(probe.begin(), probe.end(), loaded.bank().row(o.n / 2)),
                "the loaded bank differs from the saved one");
  const double file_bytes = static_cast<double>(fs::file_size(snap));
  if (!o.keep) {
    fs::remove(snap);
    fs::remove(raw);
  }

  nlohmann::json row = {{"bench", "snapshot"},
                        {"n", o.n},
                        {"dim", o.dim},
                        {"bank_gb", bank_bytes * 1e-9},
                        {"file_gb", file_bytes * 1e-9},
                        {"deflate", o.deflate},
                        {"save_s", save_s},
                        {"plain_write_s", write_s},
                        {"save_rate_vs_plain", write_s / save_s},
                        {"load_s", load_s},
                        {"plain_read_s", read_s},
                        {"load_rate_vs_plain", read_s / load_s},
                        {"save_peak_rss_over_bank", save_peak / bank_bytes},
                        {"load_peak_rss_over_bank", load_peak / bank_bytes},
                        {"cpu", cpu_model()},
                        {"git", git_revision()},
                        {"build", MEMBANK_BUILD_TYPE}};
  if (o.json) {
    fmt::print("{}\n", row.dump());
    return;
  }
  fmt::print("membank bench snapshot: {} x {} fp32 bank ({:.2f} GB), file {:.2f} GB, in {}\n", o.n, o.dim,
             bank_bytes * 1e-9, file_bytes * 1e-9, o.dir);
  fmt::print("  save {:7.2f} s   plain write+fsync {:7.2f} s   rate vs plain {:.2f}   peak RSS {:.3f} x bank\n", save_s,
             write_s, write_s / save_s, save_peak / bank_bytes);
  fmt::print("  load {:7.2f} s   plain read        {:7.2f} s   rate vs plain {:.2f}   peak RSS {:.3f} x bank\n", load_s,
             read_s, read_s / load_s, load_peak / bank_bytes);
}

}  // namespace

void add_bench_snapshot(CLI::App& bench) {
  auto o = std::make_shared<SnapOptions>();
  auto* cmd = bench.add_subcommand(
      "snapshot",
      "Save and load a large bank as an HDF5 snapshot, against plain sequential write (with fsync) and read of the "
      "same bytes on the same disk in the same run; reports the rate ratios and peak resident memory over the bank "
      "size. Needs about 2.2 x N x D x 4 bytes free in --dir.");
  cmd->add_option("--n", o->n, "bank rows N")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--dim", o->dim, "dimension D (a multiple of 16)")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--dir", o->dir, "directory for the two files (same disk for both)")->capture_default_str()->check(
      existing_directory(true));
  cmd->add_option("--deflate", o->deflate, "0: no compression; 1..9: shuffle + deflate")->capture_default_str()->check(
      integer_in(0, 9));
  cmd->add_flag("--keep", o->keep, "keep the files afterwards");
  cmd->add_flag("--json", o->json, "print one JSON object");
  cmd->callback(command([o] { run_bench_snapshot(*o); }));
}

}  // namespace membank::tools
