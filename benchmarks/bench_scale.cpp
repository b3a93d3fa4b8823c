// `membank bench scale`: step time over dataset size N, and over K, B, D, the thread count, the
// negatives mode, the sampler and the objective. The promise under test: an NCE step costs
// O(B K D) whatever N is, while the exact softmax costs O(B N D).
//
// Every configuration builds its own bank (only one alive at a time), times whole engine steps and,
// in the same run, the floor of that work: B x (K + 1) random row reads with one dot product each for
// NCE (as `bench step`), the B x N x D score GEMM alone for the full softmax. A streaming read of a
// large buffer with the same thread count, measured once per thread count at the start of the run,
// gives the machine's memory-bandwidth ceiling that effective rates are compared with. Peak resident
// memory (VmHWM, reset before each bank is built) is set against N x D x 4 bytes.
//
// Output: one JSON line per configuration ("record": "config"), per skipped configuration ("skipped")
// and per summary ("crossover", "threads"); or a text table. Plots: benchmarks/plot_scale.py.
//
// The ranks series (--series ranks, builds with MPI) is `membank bench step --distributed MODE` at the
// base point, launched by this command under --mpiexec once per R of --ranks (this program's own
// binary): one "record": "ranks" line per R, with the step time (slowest rank's), bytes sent, peak
// RSS and bank bytes per rank.
#include "bench_common.hpp"
#include "commands.hpp"
#include "distributed_cli.hpp"
#include "options.hpp"
#include "machine_info.hpp"

#include <membank/engine.hpp>
#include <membank/error.hpp>

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace membank::tools {

namespace {

struct ScaleOptions {
  std::vector<index_t> ns = {10'000, 30'000, 100'000, 300'000, 1'000'000, 3'000'000, 10'000'000, 30'000'000};
  std::vector<index_t> far_ns = {60'000'000, 100'000'000};
  index_t far_dim = 64;
  std::string dtype = "float32";  // the banks' storage type (the whole sweep)
  std::vector<index_t> ks = {16, 64, 256, 1024, 4096, 16384, 65536};
  std::vector<index_t> batches = {64, 256, 1024};
  std::vector<index_t> dims = {64, 128, 256};
  std::vector<int> threads;  // default: 1, 2, 4, ... below the processor count, and the processor count
  std::vector<std::string> negatives = {"per-sample", "shared"};
  std::vector<std::string> samplers = {"uniform", "alias"};
  std::vector<std::string> objectives = {"nce", "full"};
  std::vector<std::string> series = {"n", "far", "k", "batch", "dim", "threads"};
  index_t base_n = 1'281'167, base_k = 4096, base_batch = 256, base_dim = 128;
  index_t full_max_n = 3'000'000;
  int repeats = 7;
  int full_repeats = 3;
  double stream_mb = 1024;
  std::uint64_t seed = 1;
  bool grid = false;
  bool quick = false;
  bool json = false;
  bool plot = false;
  bool interleave = false;
  bool inject_check_failure = false;
  std::string out;
  std::string summarize;
  std::vector<int> ranks = {1, 2};       // the ranks series' R values
  std::string distributed = "sharded";   // the ranks series' mode
  int ranks_threads = 0;                 // threads per rank in the ranks series (0: processors / R, at least 1)
#ifdef MEMBANK_MPIEXEC
  std::string mpiexec = MEMBANK_MPIEXEC " " MEMBANK_MPIEXEC_NP;
#else
  std::string mpiexec = "mpiexec -n";
#endif
};

/// One configuration of the sweep.
struct Config {
  std::string series;
  index_t n = 0, dim = 0, k = 0, batch = 0;
  int threads = 1;
  NegativesMode negatives = NegativesMode::per_sample;
  SamplerKind sampler = SamplerKind::uniform;
  Objective objective = Objective::nce;
  DType dtype = DType::float32;
};

std::string neg_name(NegativesMode m) { return m == NegativesMode::per_sample ? "per-sample" : "shared"; }

std::string label(const Config& c) {
  if (c.objective == Objective::full_softmax)
    return fmt::format("{} N={} D={} B={} t={} full softmax", c.series, c.n, c.dim, c.batch, c.threads);
  return fmt::format("{} N={} D={} K={} B={} t={} {} {} {}", c.series, c.n, c.dim, c.k, c.batch, c.threads,
                     to_string(c.objective), neg_name(c.negatives), to_string(c.sampler));
}

/// The configurations, in run order. Series mode varies one axis at a time around the base point
/// (N series: every objective x negatives x sampler; the full softmax once per N, up to full_max_n);
/// grid mode takes the cartesian product of every list.
std::vector<Config> plan(const ScaleOptions& o, int max_threads) {
  std::vector<Config> out;
  // first: the first negatives x sampler pair of a loop (the full softmax, which uses neither, runs once)
  auto add = [&](Config c, const std::string& obj, const std::string& neg, const std::string& smp, bool first) {
    c.objective = objective_from_string(obj);
    if (c.objective == Objective::full_softmax) {
      if (c.n > o.full_max_n || !first) return;
      c.negatives = NegativesMode::per_sample;
      c.sampler = SamplerKind::uniform;
    } else {
      c.negatives = negatives_mode_from_string(neg);
      c.sampler = sampler_kind_from_string(smp);
    }
    c.dtype = dtype_from_string(o.dtype);
    out.push_back(c);
  };
  auto every_mode = [&](const Config& c, const std::vector<std::string>& objectives,
                        const std::vector<std::string>& samplers) {
    for (const auto& obj : objectives)
      for (const auto& neg : o.negatives)
        for (const auto& smp : samplers) add(c, obj, neg, smp, &neg == &o.negatives.front() && &smp == &samplers.front());
  };
  const Config base{"", o.base_n, o.base_dim, o.base_k, o.base_batch, max_threads};
  const std::vector<std::string> nce_only = {"nce"}, uniform_only = {"uniform"};
  if (o.grid) {
    for (index_t n : o.ns)
      for (index_t d : o.dims)
        for (index_t k : o.ks)
          for (index_t b : o.batches)
            for (int t : o.threads) every_mode(Config{"grid", n, d, k, b, t}, o.objectives, o.samplers);
    return out;
  }
  for (const auto& s : o.series) {
    Config c = base;
    c.series = s;
    if (s == "n") {
      for (index_t n : o.ns) {
        c.n = n;
        every_mode(c, o.objectives, o.samplers);
      }
    } else if (s == "far") {
      c.dim = o.far_dim;
      for (index_t n : o.far_ns) {
        c.n = n;
        add(c, "nce", "per-sample", "uniform", true);
      }
    } else if (s == "k") {
      for (index_t k : o.ks) {
        c.k = k;
        every_mode(c, nce_only, uniform_only);
      }
    } else if (s == "batch") {
      for (index_t b : o.batches) {
        c.batch = b;
        every_mode(c, nce_only, uniform_only);
      }
    } else if (s == "dim") {
      for (index_t d : o.dims) {
        c.dim = d;
        every_mode(c, o.objectives, uniform_only);
      }
    } else if (s == "threads") {
      for (int t : o.threads) {
        c.threads = t;
        every_mode(c, nce_only, uniform_only);
      }
    }
  }
  return out;
}

/// Streaming read of `buf` with the current thread count: GB/s, median of 5 passes after a warm-up.
double stream_read_gb_per_s(const std::vector<float>& buf) {
  constexpr std::size_t kChunk = 1 << 16;  // floats per scheduling chunk (256 KiB)
  const std::size_t chunks = buf.size() / kChunk;
  std::vector<double> gbs;
  double sink = 0.0;
  for (int pass = -1; pass < 5; ++pass) {
    const double t0 = now_s();
#pragma omp parallel for schedule(static) reduction(+ : sink)
    for (std::size_t c = 0; c < chunks; ++c) {
      const float* p = buf.data() + c * kChunk;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (std::size_t i = 0; i < kChunk; ++i) acc += p[i];
      sink += acc;
    }
    const double s = now_s() - t0;
    if (pass >= 0) gbs.push_back(static_cast<double>(chunks * kChunk) * 4e-9 / s);
  }
  MEMBANK_CHECK(std::isfinite(sink), "stream ceiling: non-finite checksum {}", sink);
  return median(gbs);
}

/// The full softmax's floor: the B x N x D score products alone (Eigen GEMM over fixed blocks of
/// 4096 bank rows, in parallel over blocks), no exponentials, no gradient. ms per pass.
std::vector<double> time_gemm_floor(const BankView& bank, const RowMatrixf& f, int passes, double* checksum) {
  constexpr index_t kBlock = 4096;
  const index_t blocks = (bank.rows + kBlock - 1) / kBlock;
  std::vector<double> ms;
  for (int p = -1; p < passes; ++p) {
    double sink = 0.0;
    const double t0 = now_ms();
#pragma omp parallel reduction(+ : sink)
    {
      RowMatrixf s(f.rows(), kBlock);
#pragma omp for schedule(dynamic, 1)
      for (index_t b = 0; b < blocks; ++b) {
        const index_t rows = std::min(kBlock, bank.rows - b * kBlock);
        s.leftCols(rows).noalias() = f * bank.matrix().middleRows(b * kBlock, rows).transpose();
        sink += s(0, 0);
      }
    }
    if (p >= 0) ms.push_back(now_ms() - t0);
    *checksum += sink;
  }
  return ms;
}

/// Bytes a configuration needs resident: bank, last-update steps, sampler, inputs, floor ids.
double bytes_needed(const Config& c, int steps) {
  const double n = static_cast<double>(c.n);
  const double stride = static_cast<double>((c.dim + 15) / 16 * 16);
  double b = n * stride * dtype_bytes(c.dtype) + n * 8.0;
  if (c.sampler == SamplerKind::alias) b += n * (16.0 + 4.0 + 8.0 + 8.0);  // cell, threshold bits, P_n, weights
  b += static_cast<double>(c.batch) * static_cast<double>(c.k + 1) * 8.0 * 2.0;
  b += (steps + 2.0) * static_cast<double>(c.batch) * static_cast<double>(c.dim) * 4.0 * 2.0;
  return b + 64e6;  // the process itself, allocator slack
}

double rows_gb(const Config& c) {
  const double row = static_cast<double>(c.dim) * dtype_bytes(c.dtype) * 1e-9;
  if (c.objective == Objective::full_softmax) return static_cast<double>(c.n + c.batch) * row;
  if (c.negatives == NegativesMode::shared) return static_cast<double>(c.k + c.batch) * row;
  return static_cast<double>(c.batch) * static_cast<double>(c.k + 1) * row;
}

/// Terminal progress bar on stderr (only when stderr is a terminal and text is not being piped).
class Progress {
 public:
  Progress(std::size_t total, bool enabled) : total_(total), enabled_(enabled), t0_(now_s()) {}
  void show(std::size_t done, const std::string& what) const {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * done / std::max<std::size_t>(total_, 1));
    const double el = now_s() - t0_;
    fmt::print(stderr, "\r\033[K[{}{}] {}/{} {:.0f}s  {}", std::string(static_cast<std::size_t>(filled), '#'),
               std::string(static_cast<std::size_t>(kWidth - filled), '.'), done, total_, el, what);
    std::fflush(stderr);
  }
  void note(const std::string& line) const {
    fmt::print(stderr, "{}{}\n", enabled_ ? "\r\033[K" : "", line);
  }
  void finish() const {
    if (enabled_) fmt::print(stderr, "\r\033[K");
  }

 private:
  std::size_t total_;
  bool enabled_;
  double t0_;
};

/// Where rows go: stdout (JSON or text) and, with --out, a JSON-lines file flushed line by line.
class Sink {
 public:
  explicit Sink(const ScaleOptions& o) : json_(o.json) {
    if (!o.out.empty()) {
      file_.open(o.out, std::ios::trunc);
      MEMBANK_CHECK(file_.good(), "--out {}: cannot open for writing", o.out);
    }
  }
  void row(const nlohmann::json& r, const std::string& text) {
    if (file_.is_open()) {
      file_ << r.dump() << '\n';
      file_.flush();
    }
    if (json_)
      fmt::print("{}\n", r.dump());
    else if (!text.empty())
      fmt::print("{}\n", text);
    std::fflush(stdout);
  }

 private:
  bool json_;
  std::ofstream file_;
};

nlohmann::json machine_fields() {
  return {{"cpu", cpu_model()},          {"hw_threads", omp_get_num_procs()},
          {"mem_total_gb", proc_kb_field("/proc/meminfo", "MemTotal:") * 1e-9},
          {"build", MEMBANK_BUILD_TYPE}, {"version", MEMBANK_VERSION_STRING},
          {"git", git_revision()}};
}

/// Runs one configuration; returns its JSON row (record "config").
nlohmann::json run_config(const Config& c, const ScaleOptions& o, const std::map<int, double>& ceiling,
                          double ceiling_all, const Progress& progress, std::size_t done) {
  membank::set_num_threads(c.threads);
  const bool full = c.objective == Objective::full_softmax;
  const int reps = full && c.n > 300'000 ? o.full_repeats : o.repeats;
  StepSetup s;
  s.n = c.n;
  s.dim = c.dim;
  s.k = c.k;
  s.batch = c.batch;
  s.negatives = c.negatives;
  s.sampler = c.sampler;
  s.objective = c.objective;
  s.dtype = c.dtype;
  s.seed = o.seed;
  s.inject_check_failure = o.inject_check_failure;

  const double bank_bytes = static_cast<double>(c.n) * static_cast<double>(c.dim) * dtype_bytes(c.dtype);
  const double fp32_bank_bytes = static_cast<double>(c.n) * static_cast<double>(c.dim) * 4.0;
  progress.show(done, label(c) + (bank_bytes > 1e9 ? fmt::format(" (building {:.1f} GB bank)", bank_bytes * 1e-9) : ""));
  reset_peak_rss();
  const double rss_before = rss_bytes();
  std::vector<double> step_ms, floor_ms;
  double checksum = 0.0, alias_ms = 0.0, bank_ms = 0.0;
  {
    StepBench bench(s, reps);
    alias_ms = bench.alias_build_ms;
    bank_ms = bench.bank_build_ms;
    progress.show(done, label(c) + " (timing)");
    if (o.interleave && !full) {
      std::tie(step_ms, floor_ms) = bench.time_interleaved(reps, &checksum);
    } else if (full) {
      step_ms = bench.time_steps(reps);
      std::mt19937_64 rng(o.seed + 7);
      floor_ms = time_gemm_floor(bench.engine().bank().view(), random_unit_rows(c.batch, c.dim, rng), reps, &checksum);
    } else {
      step_ms = bench.time_steps(reps);
      floor_ms = bench.time_gather_floor(reps, &checksum);
    }
  }
  const double peak = peak_rss_bytes();
  const double step_med = median(step_ms), floor_med = median(floor_ms);
  const double gb = rows_gb(c);
  const double eff_gbs = gb / (step_med * 1e-3);
  const double row_gb = static_cast<double>(c.dim) * dtype_bytes(c.dtype) * 1e-9;
  const double floor_gb = full ? static_cast<double>(c.n) * row_gb
                               : static_cast<double>(c.batch) * static_cast<double>(c.k + 1) * row_gb;
  const double ceil_t = ceiling.count(c.threads) ? ceiling.at(c.threads) : std::nan("");
  nlohmann::json r = {{"bench", "scale"},
                      {"record", "config"},
                      {"series", c.series},
                      {"n", c.n},
                      {"dim", c.dim},
                      {"k", full ? nlohmann::json() : nlohmann::json(c.k)},
                      {"batch", c.batch},
                      {"threads", c.threads},
                      {"oversubscribed", c.threads > omp_get_num_procs()},
                      {"negatives", full ? "-" : neg_name(c.negatives)},
                      {"sampler", full ? "-" : to_string(c.sampler)},
                      {"objective", full ? "full" : to_string(c.objective)},
                      {"dtype", to_string(c.dtype)},
                      {"repeats", reps},
                      {"interleaved", o.interleave && !full},
                      {"step_ms", step_med},
                      {"step_min_ms", *std::min_element(step_ms.begin(), step_ms.end())},
                      {"step_max_ms", *std::max_element(step_ms.begin(), step_ms.end())},
                      {"floor_kind", full ? "gemm B x N x D scores" : "gather B x (K+1) random rows + dot"},
                      {"floor_ms", floor_med},
                      {"step_over_floor", step_med / floor_med},
                      {"rows_gb_per_step", gb},
                      {"effective_gb_per_s", eff_gbs},
                      {"floor_gb_per_s", floor_gb / (floor_med * 1e-3)},
                      {"stream_gb_per_s", ceil_t},
                      {"stream_gb_per_s_all_threads", ceiling_all},
                      {"bandwidth_efficiency", eff_gbs / ceil_t},
                      {"bank_gb", bank_bytes * 1e-9},
                      {"peak_rss_gb", peak * 1e-9},
                      {"rss_before_gb", rss_before * 1e-9},
                      {"rss_over_bank", peak / bank_bytes},
                      {"rss_over_fp32_bank", peak / fp32_bank_bytes},
                      {"rss_excess_mb", (peak - bank_bytes) * 1e-6},
                      {"bk_ids_mb", static_cast<double>(c.batch) * static_cast<double>(c.k + 1) * 8e-6},
                      {"alias_build_ms", alias_ms},
                      {"bank_build_ms", bank_ms},
                      {"checksum_finite", std::isfinite(checksum)}};
  r.update(machine_fields());
  return r;
}

std::string text_row(const nlohmann::json& r) {
  const bool full = r["objective"] == "full";
  return fmt::format("{:<8}{:>11}{:>5}{:>7}{:>6}{:>4} {:<18}{:>10.2f}{:>10.2f}{:>10.2f}{:>10.2f}{:>7.2f}{:>8.1f}{:>7.0f}%"
                     "{:>8.3f}{:>9.1f}",
                     r["series"].get<std::string>(), r["n"].get<index_t>(), r["dim"].get<index_t>(),
                     full ? std::string("-") : std::to_string(r["k"].get<index_t>()), r["batch"].get<index_t>(),
                     r["threads"].get<int>(),
                     full ? std::string("full softmax")
                          : fmt::format("{} {}", r["negatives"].get<std::string>(), r["sampler"].get<std::string>()),
                     r["step_ms"].get<double>(), r["step_min_ms"].get<double>(), r["step_max_ms"].get<double>(),
                     r["floor_ms"].get<double>(), r["step_over_floor"].get<double>(),
                     r["effective_gb_per_s"].get<double>(), 100.0 * r["bandwidth_efficiency"].get<double>(),
                     r["rss_over_bank"].get<double>(), r["alias_build_ms"].get<double>());
}

/// Least squares t = a + b N over the full-softmax points; r2 its coefficient of determination,
/// slope the log-log slope (1 for linear growth).
struct LinearFit {
  double a = 0, b = 0, r2 = 0, loglog_slope = 0;
};
LinearFit fit_linear(const std::vector<std::pair<double, double>>& pts) {
  LinearFit f;
  const double m = static_cast<double>(pts.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0, lx = 0, ly = 0, lxx = 0, lxy = 0;
  for (auto [x, y] : pts) {
    sx += x, sy += y, sxx += x * x, sxy += x * y;
    lx += std::log(x), ly += std::log(y), lxx += std::log(x) * std::log(x), lxy += std::log(x) * std::log(y);
  }
  f.b = (m * sxy - sx * sy) / (m * sxx - sx * sx);
  f.a = (sy - f.b * sx) / m;
  f.loglog_slope = (m * lxy - lx * ly) / (m * lxx - lx * lx);
  double ss_res = 0, ss_tot = 0;
  for (auto [x, y] : pts) {
    ss_res += (y - f.a - f.b * x) * (y - f.a - f.b * x);
    ss_tot += (y - sy / m) * (y - sy / m);
  }
  f.r2 = ss_tot > 0 ? 1.0 - ss_res / ss_tot : 1.0;
  return f;
}

/// The N at which an NCE variant becomes cheaper than the full softmax, from the N series:
/// compares NCE's measured step times with the full softmax's (measured where it ran, its linear fit
/// beyond full_max_n), and interpolates the first sign change in log N. Where NCE is already cheaper
/// at the smallest N, the crossover is reported as lying below it (crossover_below_n).
std::vector<nlohmann::json> crossover_summaries(const std::vector<nlohmann::json>& rows) {
  std::vector<nlohmann::json> out;
  std::vector<std::pair<double, double>> full_pts;
  std::map<double, double> full_at;
  for (const auto& r : rows)
    if (r["series"] == "n" && r["objective"] == "full") {
      full_pts.emplace_back(r["n"].get<double>(), r["step_ms"].get<double>());
      full_at[r["n"].get<double>()] = r["step_ms"].get<double>();
    }
  if (full_pts.size() < 2) return out;
  const LinearFit fit = fit_linear(full_pts);
  const double full_max = full_pts.back().first;
  std::set<std::pair<std::string, std::string>> variants;
  for (const auto& r : rows)
    if (r["series"] == "n" && r["objective"] == "nce")
      variants.emplace(r["negatives"].get<std::string>(), r["sampler"].get<std::string>());
  for (const auto& [neg, smp] : variants) {
    std::vector<std::pair<double, double>> nce;  // (N, step ms), ascending N
    for (const auto& r : rows)
      if (r["series"] == "n" && r["objective"] == "nce" && r["negatives"] == neg && r["sampler"] == smp)
        nce.emplace_back(r["n"].get<double>(), r["step_ms"].get<double>());
    std::sort(nce.begin(), nce.end());
    auto full_time = [&](double n) { return full_at.count(n) ? full_at[n] : fit.a + fit.b * n; };
    double cross = std::nan("");
    bool extrapolated = false;
    std::string how;
    if (!nce.empty() && nce.front().second < full_time(nce.front().first)) {
      how = fmt::format("NCE cheaper at every measured N: the crossover lies below N = {}", nce.front().first);
    } else {
      for (std::size_t i = 1; i < nce.size(); ++i) {
        const double d0 = full_time(nce[i - 1].first) - nce[i - 1].second;
        const double d1 = full_time(nce[i].first) - nce[i].second;
        if (d0 <= 0 && d1 > 0) {
          const double l0 = std::log(nce[i - 1].first), l1 = std::log(nce[i].first);
          cross = std::exp(l0 + (l1 - l0) * (-d0) / (d1 - d0));
          extrapolated = nce[i].first > full_max;
          how = extrapolated ? "interpolated between measured NCE points; the full softmax from its linear fit"
                             : "interpolated between points where both were measured";
          break;
        }
      }
      if (std::isnan(cross)) how = "no crossover within the measured N";
    }
    nlohmann::json s = {{"bench", "scale"},
                        {"record", "crossover"},
                        {"negatives", neg},
                        {"sampler", smp},
                        {"full_fit_intercept_ms", fit.a},
                        {"full_fit_ms_per_million_rows", fit.b * 1e6},
                        {"full_fit_r2", fit.r2},
                        {"full_loglog_slope", fit.loglog_slope},
                        {"full_points", full_pts.size()},
                        {"full_max_n", full_max},
                        {"crossover_n", std::isnan(cross) ? nlohmann::json() : nlohmann::json(cross)},
                        {"extrapolated", extrapolated},
                        {"crossover_below_n", !nce.empty() && nce.front().second < full_time(nce.front().first)
                                                  ? nlohmann::json(nce.front().first) : nlohmann::json()},
                        {"method", how}};
    if (!nce.empty()) {
      s["nce_largest_n"] = nce.back().first;
      s["nce_ms_at_largest_n"] = nce.back().second;
      s["full_ms_at_largest_n"] = full_time(nce.back().first);
      s["full_at_largest_n_extrapolated"] = !full_at.count(nce.back().first);
    }
    out.push_back(s);
  }
  return out;
}

/// Speed-up and efficiency of each threads-series variant against its 1-thread time.
std::vector<nlohmann::json> thread_summaries(const std::vector<nlohmann::json>& rows) {
  std::map<std::string, std::vector<const nlohmann::json*>> by;
  for (const auto& r : rows)
    if (r["series"] == "threads") by[r["negatives"].get<std::string>()].push_back(&r);
  std::vector<nlohmann::json> out;
  for (const auto& [neg, rs] : by) {
    const nlohmann::json* one = nullptr;
    for (const auto* r : rs)
      if ((*r)["threads"] == 1) one = r;
    nlohmann::json pts = nlohmann::json::array();
    for (const auto* r : rs) {
      const int t = (*r)["threads"].get<int>();
      const double sp = one ? (*one)["step_ms"].get<double>() / (*r)["step_ms"].get<double>() : std::nan("");
      pts.push_back({{"threads", t}, {"step_ms", (*r)["step_ms"]}, {"speedup", sp}, {"parallel_efficiency", sp / t},
                     {"effective_gb_per_s", (*r)["effective_gb_per_s"]},
                     {"stream_gb_per_s", (*r)["stream_gb_per_s"]},
                     {"bandwidth_efficiency", (*r)["bandwidth_efficiency"]},
                     {"oversubscribed", (*r)["oversubscribed"]}});
    }
    out.push_back({{"bench", "scale"}, {"record", "threads"}, {"negatives", neg}, {"points", pts}});
  }
  return out;
}

/// The crossover and thread-scaling summaries of a sweep's configuration rows.
void summarize(const std::vector<nlohmann::json>& rows, Sink& sink) {
  for (const auto& s : crossover_summaries(rows)) {
    std::string text;
    if (s["crossover_n"].is_null()) {
      text = fmt::format("crossover ({} {}): {}", s["negatives"].get<std::string>(), s["sampler"].get<std::string>(),
                         s["method"].get<std::string>());
    } else {
      text = fmt::format(
          "crossover ({} {}): NCE becomes cheaper than the full softmax at N = {:.3g}{}; full softmax = {:.2f} ms + "
          "{:.1f} ms per 10^6 rows (r^2 = {:.4f}, log-log slope {:.3f}, {} points up to N = {:.3g}); at N = {:.3g}: "
          "NCE {:.1f} ms, full {:.0f} ms{}",
          s["negatives"].get<std::string>(), s["sampler"].get<std::string>(), s["crossover_n"].get<double>(),
          s["extrapolated"].get<bool>() ? " (extrapolated)" : "", s["full_fit_intercept_ms"].get<double>(),
          s["full_fit_ms_per_million_rows"].get<double>(), s["full_fit_r2"].get<double>(),
          s["full_loglog_slope"].get<double>(), s["full_points"].get<std::size_t>(), s["full_max_n"].get<double>(),
          s["nce_largest_n"].get<double>(), s["nce_ms_at_largest_n"].get<double>(),
          s["full_ms_at_largest_n"].get<double>(), s["full_at_largest_n_extrapolated"].get<bool>() ? " (fit)" : "");
    }
    sink.row(s, text);
  }
  for (const auto& s : thread_summaries(rows)) {
    std::string text = fmt::format("thread scaling ({}):", s["negatives"].get<std::string>());
    for (const auto& p : s["points"])
      text += fmt::format(" {}t: {:.1f} ms, x{:.2f}, {:.0f}% of that thread count's streaming bandwidth{};",
                          p["threads"].get<int>(), p["step_ms"].get<double>(), p["speedup"].get<double>(),
                          100.0 * p["bandwidth_efficiency"].get<double>(), p["oversubscribed"].get<bool>() ? " (oversubscribed)" : "");
    sink.row(s, text);
  }
}

/// The ranks series: `bench step --distributed` at the base point for each R, under --mpiexec.
void run_ranks_series(const ScaleOptions& o, Sink& sink) {
  MEMBANK_CHECK(kBuiltWithMpi, "--series ranks: {}", no_mpi_message());
  std::vector<char> self(4096);
  const ssize_t len = ::readlink("/proc/self/exe", self.data(), self.size() - 1);
  MEMBANK_CHECK(len > 0, "--series ranks: cannot find this program (/proc/self/exe)");
  const std::string exe(self.data(), static_cast<std::size_t>(len));
  double first_ms = std::nan("");
  int first_r = 0;
  for (const int r : o.ranks) {
    const int threads = o.ranks_threads > 0 ? o.ranks_threads : std::max(1, omp_get_num_procs() / r);
    const std::string cmdline = fmt::format(
        "{} {} '{}' bench step --distributed {} --n {} --dim {} --k {} --batch {} --repeats {} --seed {} --dtype {} "
        "--threads {} --json 2>&1", o.mpiexec, r, exe, o.distributed, o.base_n, o.base_dim, o.base_k, o.base_batch,
        o.repeats, o.seed, o.dtype, threads);
    std::FILE* pipe = ::popen(cmdline.c_str(), "r");
    MEMBANK_CHECK(pipe != nullptr, "--series ranks: cannot run {}", cmdline);
    std::string output, json_line;
    std::vector<char> buf(1 << 16);
    while (std::fgets(buf.data(), static_cast<int>(buf.size()), pipe)) {
      const std::string line(buf.data());
      output += line;
      if (!line.empty() && line.front() == '{') json_line = line;
    }
    const int status = ::pclose(pipe);
    if (status != 0 || json_line.empty())
      throw ProblemFound(fmt::format("--series ranks: R = {}: `{}` failed (status {}): {}", r, cmdline, status,
                                     output.size() > 2000 ? output.substr(output.size() - 2000) : output));
    nlohmann::json row = nlohmann::json::parse(json_line);
    row["bench"] = "scale";
    row["record"] = "ranks";
    row["series"] = "ranks";
    row["command"] = cmdline;
    const double ms = row["step_ms"].get<double>();
    if (std::isnan(first_ms)) {
      first_ms = ms;
      first_r = r;
    }
    row["step_vs_first_ranks"] = first_ms / ms;
    double sent = 0, rss = 0, bank = 0;
    for (const auto& v : row["bytes_sent_per_rank"]) sent = std::max(sent, v.get<double>());
    for (const auto& v : row["peak_rss_bytes_per_rank"]) rss = std::max(rss, v.get<double>());
    for (const auto& v : row["bank_bytes_per_rank"]) bank = std::max(bank, v.get<double>());
    sink.row(row, fmt::format("ranks   R={:<3} {} N={} D={} K={} B={} t={}/rank: step {:.2f} ms (x{:.2f} against R = "
                              "{}), sent {:.1f} kB per step per rank, bank {:.1f} MB and peak RSS {:.1f} MB per rank "
                              "(largest)", r, o.distributed, o.base_n, o.base_dim, o.base_k, o.base_batch, threads, ms,
                              first_ms / ms, first_r, sent * 1e-3, bank * 1e-6, rss * 1e-6));
  }
}

void apply_quick(ScaleOptions& o, const CLI::App& cmd) {
  auto unset = [&](const char* name) { return cmd.count(name) == 0; };
  if (unset("--n")) o.ns = {10'000, 30'000, 100'000};
  if (unset("--far-n")) o.far_ns = {200'000};
  if (unset("--far-dim")) o.far_dim = 32;
  if (unset("--k")) o.ks = {16, 256};
  if (unset("--batch")) o.batches = {16, 32};
  if (unset("--dim")) o.dims = {32, 64};
  if (unset("--base-n")) o.base_n = 20'000;
  if (unset("--base-k")) o.base_k = 256;
  if (unset("--base-batch")) o.base_batch = 32;
  if (unset("--base-dim")) o.base_dim = 64;
  if (unset("--full-max-n")) o.full_max_n = 100'000;
  if (unset("--repeats")) o.repeats = 3;
  if (unset("--full-repeats")) o.full_repeats = 2;
  if (unset("--stream-mb")) o.stream_mb = 64;
}

void run_bench_scale(ScaleOptions o, const CLI::App& cmd) {
  if (!o.summarize.empty()) {  // summaries of an earlier sweep's JSON lines, nothing run
    std::ifstream in(o.summarize);
    MEMBANK_CHECK(in.good(), "--summarize {}: cannot open", o.summarize);
    o.out.clear();
    Sink sink(o);
    std::vector<nlohmann::json> rows;
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) {
        auto r = nlohmann::json::parse(line);
        if (r.value("record", "") == "config") rows.push_back(std::move(r));
      }
    summarize(rows, sink);
    return;
  }
  if (o.quick) apply_quick(o, cmd);
  if (!o.out.empty()) require_output_space("--out", o.out, 1e6);  // JSON lines: well under 1 MB
  const int procs = omp_get_num_procs();
  const int max_threads = omp_get_max_threads();
  if (o.threads.empty()) {
    for (int t = 1; t < procs; t *= 2) o.threads.push_back(t);
    o.threads.push_back(procs);
  }
  MEMBANK_CHECK(!o.negatives.empty() && !o.samplers.empty() && !o.objectives.empty(),
                "--negatives, --sampler and --objective need at least one value each");
  std::sort(o.ns.begin(), o.ns.end());
  std::sort(o.far_ns.begin(), o.far_ns.end());
  const std::vector<Config> configs = plan(o, max_threads);
  const bool ranks_series = std::find(o.series.begin(), o.series.end(), "ranks") != o.series.end();
  MEMBANK_CHECK(!configs.empty() || ranks_series, "the sweep is empty: check --series and the lists");
  MEMBANK_CHECK(!ranks_series || kBuiltWithMpi, "--series ranks: {}", no_mpi_message());
  if (configs.empty()) {  // the ranks series alone
    Sink sink(o);
    run_ranks_series(o, sink);
    return;
  }
  const Progress progress(configs.size(), isatty(2) == 1);
  Sink sink(o);
  for (int t : o.threads)
    if (t > procs) progress.note(fmt::format("note: {} threads on {} processors: oversubscribed, rows are marked", t, procs));

  // Memory-bandwidth ceiling, one per thread count used, before any bank exists.
  std::set<int> thread_counts;
  for (const auto& c : configs) thread_counts.insert(c.threads);
  thread_counts.insert(procs);
  std::map<int, double> ceiling;
  {
    const auto floats = static_cast<std::size_t>(std::min(o.stream_mb * 1e6, 0.25 * mem_available_bytes()) / 4.0);
    std::vector<float> buf(floats);
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < floats; ++i) buf[i] = 1e-6f;  // first touch by the threads that read it
    for (int t : thread_counts) {
      progress.show(0, fmt::format("memory-bandwidth ceiling, {} threads", t));
      membank::set_num_threads(t);
      ceiling[t] = stream_read_gb_per_s(buf);
      sink.row({{"bench", "scale"}, {"record", "stream"}, {"threads", t}, {"buffer_mb", static_cast<double>(floats) * 4e-6},
                {"stream_gb_per_s", ceiling[t]}},
               fmt::format("memory-bandwidth ceiling (streaming read of {:.0f} MB): {:.1f} GB/s with {} threads",
                           static_cast<double>(floats) * 4e-6, ceiling[t], t));
    }
  }
  if (!o.json)
    fmt::print("{:<8}{:>11}{:>5}{:>7}{:>6}{:>4} {:<18}{:>10}{:>10}{:>10}{:>10}{:>7}{:>8}{:>8}{:>8}{:>9}\n", "series",
               "N", "D", "K", "B", "thr", "variant", "step ms", "min", "max", "floor ms", "ratio", "GB/s",
               "of BW", "RSS/NB", "alias ms");

  std::vector<nlohmann::json> rows;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const Config& c = configs[i];
    const int steps = c.objective == Objective::full_softmax && c.n > 300'000 ? o.full_repeats : o.repeats;
    const double need = bytes_needed(c, steps), avail = mem_available_bytes();
    std::string why;
    if (need > avail) {
      why = fmt::format("does not fit in memory: needs about {:.1f} GB resident (bank {:.1f} GB), MemAvailable is {:.1f} GB", need * 1e-9,
                        static_cast<double>(c.n) * static_cast<double>(c.dim) * 4e-9, avail * 1e-9);
    } else {
      try {
        rows.push_back(run_config(c, o, ceiling, ceiling[procs], progress, i));
        progress.show(i + 1, "");
        if (!o.json) progress.finish();
        sink.row(rows.back(), text_row(rows.back()));
        continue;
      } catch (const std::bad_alloc&) {  // only what the machine lacks is skipped; any other error ends the run
        why = "allocation failed (std::bad_alloc)";
      } catch (const ResourceError& e) {
        why = user_message(e.what());
      }
    }
    progress.note(fmt::format("skipped {}: {}", label(c), why));
    sink.row({{"bench", "scale"}, {"record", "skipped"}, {"series", c.series}, {"n", c.n}, {"dim", c.dim},
              {"k", c.k}, {"batch", c.batch}, {"threads", c.threads}, {"objective", to_string(c.objective)},
              {"reason", why}},
             "");
  }
  progress.finish();

  summarize(rows, sink);
  if (ranks_series) run_ranks_series(o, sink);
  if (o.plot) {
    MEMBANK_CHECK(!o.out.empty(), "--plot needs --out FILE (the plots are written beside it)");
    const std::string cmdline = fmt::format("/usr/bin/python3 '{}/benchmarks/plot_scale.py' '{}'", MEMBANK_SOURCE_DIR, o.out);
    MEMBANK_CHECK(std::system(cmdline.c_str()) == 0, "plotting failed: {}", cmdline);
  }
}

}  // namespace

void add_bench_scale(CLI::App& bench) {
  auto o = std::make_shared<ScaleOptions>();
  auto* cmd = bench.add_subcommand(
      "scale",
      "Scalability sweep: step time over N (and K, B, D, threads, negatives mode, sampler, objective), each against "
      "its floor measured in the same run, effective GB/s against a streaming-read bandwidth ceiling, peak RSS "
      "against N x D x 4 bytes, alias-table build time; the N at which NCE becomes cheaper than the exact softmax. "
      "Series mode (default) varies one axis at a time around the base point; --grid runs the cartesian product. "
      "A configuration that does not fit in MemAvailable is skipped with a message.");
  const std::string sizes = "integers >= 1";
  add_list_option(*cmd, "--n", o->ns, integer_in(1), sizes, "N values of the N series (comma-separated)");
  add_list_option(*cmd, "--far-n", o->far_ns, integer_in(1), sizes,
                  "N values beyond the N series, run at --far-dim (NCE per-sample, uniform)");
  cmd->add_option("--far-dim", o->far_dim, "D of the far series")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--dtype", o->dtype,
                  "storage type of every bank of the sweep: float32, float16 or bfloat16 (2-byte banks reach twice "
                  "the N in the same memory: e.g. --dtype float16 --n 30000000,60000000 --far-n 100000000)")
      ->capture_default_str()
      ->check(one_of({"float32", "float16", "bfloat16"}));
  add_list_option(*cmd, "--k", o->ks, integer_in(1), sizes, "K values of the K series");
  add_list_option(*cmd, "--batch", o->batches, integer_in(1), sizes, "B values of the batch series");
  add_list_option(*cmd, "--dim", o->dims, integer_in(1), sizes, "D values of the dim series");
  add_list_option(*cmd, "--threads", o->threads, thread_count(false), "thread counts",
                  "thread counts of the threads series, e.g. 1,2,4,8,16 (default: powers of two below the processor "
                  "count, and the processor count; other series use the OpenMP default)");
  add_list_option(*cmd, "--negatives", o->negatives, one_of({"per-sample", "shared"}), "names",
                  "negatives modes: per-sample, shared");
  add_list_option(*cmd, "--sampler", o->samplers, one_of({"uniform", "alias"}), "names",
                  "samplers: uniform, alias (over random weights in [0.5, 2))");
  add_list_option(*cmd, "--objective", o->objectives, one_of({"nce", "infonce", "full"}), "names",
                  "objectives: nce, infonce, full (exact softmax over the bank)");
  add_list_option(*cmd, "--series", o->series, one_of({"n", "far", "k", "batch", "dim", "threads", "ranks"}), "names",
                  "series to run, in order: n, far, k, batch, dim, threads; and ranks (not by default; last; builds "
                  "with MPI): `membank bench step --distributed` at the base point for each R of --ranks, launched "
                  "by this command as `MPIEXEC R membank bench step ...` (--mpiexec)");
  add_list_option(*cmd, "--ranks", o->ranks, integer_in(1, 4096), "integers in [1, 4096]",
                  "R values of the ranks series (the same global batch --base-batch at every R)");
  cmd->add_option("--distributed", o->distributed, "the ranks series' DistributedEngine mode: sharded or replicated")
      ->capture_default_str()
      ->check(distributed_mode());
  cmd->add_option("--ranks-threads", o->ranks_threads,
                  "OpenMP threads per rank in the ranks series (0: the processor count / R, at least 1)")
      ->capture_default_str()
      ->check(thread_count());
  cmd->add_option("--mpiexec", o->mpiexec,
                  "the launcher of the ranks series, followed by R (e.g. \"mpirun --oversubscribe --mca btl self,vader "
                  "-np\"; as root, OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment)")
      ->capture_default_str();
  cmd->add_option("--base-n", o->base_n, "N of the K, batch, dim and threads series")->capture_default_str()->check(
      integer_in(1));
  cmd->add_option("--base-k", o->base_k, "K elsewhere")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--base-batch", o->base_batch, "B elsewhere")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--base-dim", o->base_dim, "D elsewhere")->capture_default_str()->check(integer_in(1));
  cmd->add_option("--full-max-n", o->full_max_n,
                  "largest N at which the full softmax runs (it costs O(B N D) a step; beyond, its linear fit)")
      ->capture_default_str()
      ->check(integer_in(0));
  cmd->add_option("--repeats", o->repeats, "timed steps (and floor passes) per configuration")
      ->capture_default_str()
      ->check(integer_in(1, INT_MAX));
  cmd->add_option("--full-repeats", o->full_repeats, "timed steps of the full softmax above N = 300,000")
      ->capture_default_str()
      ->check(integer_in(1, INT_MAX));
  cmd->add_option("--stream-mb", o->stream_mb, "size of the streaming-read buffer of the bandwidth ceiling (MB)")
      ->capture_default_str()
      ->check(positive_number());
  cmd->add_option("--seed", o->seed, "seed of banks, inputs and negatives")->capture_default_str()->check(seed_value());
  cmd->add_flag("--grid", o->grid, "cartesian product of --n, --dim, --k, --batch, --threads and the modes");
  cmd->add_flag("--interleave", o->interleave,
                "NCE: alternate timed steps and floor passes (step, floor, step ...) instead of all steps then all "
                "floor passes, so that both see the same background load on a shared machine");
  cmd->add_flag("--quick", o->quick,
                "small sizes, few repeats: finishes in seconds (the CI smoke test); explicit options still apply");
  cmd->add_flag("--json", o->json, "print JSON lines instead of a table");
  // Test hook (not in --help): makes the first configuration's self-check fail, as a wrong step would.
  cmd->add_flag("--inject-self-check-failure", o->inject_check_failure, "")->group("");
  cmd->add_option("--out", o->out, "also write the JSON lines to this file (flushed after each configuration)")
      ->check(output_file());
  cmd->add_option("--summarize", o->summarize,
                  "run nothing: print the crossover and thread summaries of an earlier sweep's JSON lines")
      ->check(input_file());
  cmd->add_flag("--plot", o->plot, "after the run, draw the PNG charts beside --out (/usr/bin/python3, matplotlib)");
  cmd->callback(command([o, cmd] { run_bench_scale(*o, *cmd); }));
}

}  // namespace membank::tools
