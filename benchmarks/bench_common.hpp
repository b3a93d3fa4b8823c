#pragma once
// Pieces shared by the `membank bench ...` commands: clocks, the median, random query rows, the
// random-gather floor of an NCE step, a timed engine step (StepBench), and the process's peak
// resident memory (Linux /proc).
#include <membank/bank.hpp>
#include <membank/cluster_sampler.hpp>
#include <membank/dynamic_sampler.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/sampler.hpp>
#include <membank/types.hpp>

#include "check.hpp"
#include "detail/prefetch.hpp"
#include "kernels/kernels.hpp"
#include "options.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace membank::tools {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline double now_ms() { return 1e3 * now_s(); }

/// Median of a non-empty sample.
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

/// rows x dim unit rows (normalised Gaussians) from `rng`.
inline RowMatrixf random_unit_rows(index_t rows, index_t dim, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  RowMatrixf f(rows, dim);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t c = 0; c < dim; ++c) f(i, c) = normal(rng);
    f.row(i).normalize();
  }
  return f;
}

/// The floor of a per-sample step: gather the B x C bank rows named by `rows` (B = rows.rows(), one
/// query of `f` per row) with the engine's own dispatched gather kernel (same instruction set, same
/// prefetch and dot), in parallel over queries exactly as the per-sample step is. Returns a checksum
/// so nothing is optimised away.
inline double floor_pass(const BankView& bank, const RowMatrixi& rows, const RowMatrixf& f) {
  const index_t batch = rows.rows(), cols = rows.cols(), dim = bank.dim;
  const kernels::Table& kt = kernels::table();
  double checksum = 0.0;
#pragma omp parallel reduction(+ : checksum)
  {
    std::vector<float> s(static_cast<std::size_t>(cols));
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < batch; ++i) {
      kt.gather_dots(bank.data, bank.dtype, bank.stride, dim, rows.row(i).data(), cols, f.row(i).data(), s.data());
      float acc = 0.0f;
      for (const float x : s) acc += x;
      checksum += acc;
    }
  }
  return checksum;
}

/// Bytes per instance of the table an exact draw of `kind` reads at a random place, one line a draw
/// (0: none): the alias cell; the dynamic sampler's cell; the cluster sampler's member slot (or, on
/// its uniform branch, the row's cluster), 4 bytes.
inline std::size_t draw_table_bytes(SamplerKind kind) {
  switch (kind) {
    case SamplerKind::alias:
      return 16;
    case SamplerKind::dynamic:
      return 32;
    case SamplerKind::cluster:
      return 4;
    default:
      return 0;
  }
}

/// The cost of a line a draw, measured on its own: a gather of the B x (K + 1) rows named by `rows`
/// (a dot with each, a block of 32 rows requested a block ahead), and with `table`, also the line of
/// `table` named by `lines` for each draw (`lines`: B x K, the lines of the block after next
/// requested with the rows, each read before its row's dot). The same loop with and without the
/// lines, so their ratio is what the lines add to the reads, overlapped as well as a loop can.
inline double table_gather_pass(const BankView& bank, const RowMatrixi& rows, const RowMatrixf& f,
                                const std::uint64_t* table, const RowMatrixi& lines) {
  const index_t batch = rows.rows(), cols = rows.cols(), dim = bank.dim, k = lines.cols();
  constexpr index_t kBlock = 32;
  constexpr index_t kWords = 8;  // a line of 64 bytes
  const auto row_bytes = static_cast<std::size_t>(dim * dtype_bytes(bank.dtype));
  const kernels::Table& kt = kernels::table();
  double checksum = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : checksum)
  for (index_t i = 0; i < batch; ++i) {
    const index_t* id = rows.row(i).data();
    const index_t* line = lines.row(i).data();
    const auto request = [&](index_t b0) {
      for (index_t j = b0; j < std::min(b0 + kBlock, cols); ++j) {
        const char* r = static_cast<const char*>(bank.row_data(id[j]));
        for (std::size_t off = 0; off < row_bytes; off += 64) detail::prefetch_line(r + off);
      }
      if (table)
        for (index_t j = b0 + kBlock; j < std::min(b0 + 2 * kBlock, k); ++j)
          detail::prefetch_line(table + line[j] * kWords);
    };
    if (table)
      for (index_t j = 0; j < std::min(kBlock, k); ++j) detail::prefetch_line(table + line[j] * kWords);
    request(0);
    std::uint64_t read = 0;
    float acc = 0.0f;
    for (index_t b0 = 0; b0 < cols; b0 += kBlock) {
      request(b0 + kBlock);
      for (index_t j = b0; j < std::min(b0 + kBlock, cols); ++j) {
        if (table && j < k) read += table[line[j] * kWords];
        acc += kt.dot(bank.row_data(id[j]), bank.dtype, f.row(i).data(), dim);
      }
    }
    checksum += static_cast<double>(acc) + static_cast<double>(read & 1);
  }
  return checksum;
}

/// One benchmark configuration of an engine step.
struct StepSetup {
  index_t n = 1281167;
  index_t dim = 128;
  index_t k = 4096;
  index_t batch = 256;
  NegativesMode negatives = NegativesMode::per_sample;
  SamplerKind sampler = SamplerKind::uniform;  ///< alias, dynamic: over weights drawn uniformly in [0.5, 2)
  bool loss_ema = false;  ///< dynamic: the engine re-weights each batch's rows after a step (the loss_ema drive)
  index_t clusters = 1024;  ///< cluster sampler: C (fitted with one Lloyd step, timed as cluster_fit_ms)
  index_t ring_upper = 4096;  ///< ring sampler: ranks [1, ring_upper) (past each query's most similar row)
  Objective objective = Objective::nce;
  DType dtype = DType::float32;  ///< the bank's storage type
  std::uint64_t seed = 1;
  bool inject_check_failure = false;  ///< test hook: the self-check's reference is perturbed, so it fails
};

/// An engine built for one StepSetup, with its inputs, timed step by step. Owns the bank: keep one
/// alive at a time when banks are large. Not thread-safe (times parallel calls of the engine).
class StepBench {
 public:
  /// Builds the sampler (alias_build_ms times the Vose table) and the bank (bank_build_ms), then
  /// fresh ids and unit features for `steps` steps (generated here, never inside a timed region).
  StepBench(const StepSetup& s, int steps) : s_(s), rng_(s.seed), any_id_(0, s.n - 1) {
    EngineConfig cfg;
    cfg.k = s.k;
    cfg.negatives = s.negatives;
    cfg.objective = s.objective;
    cfg.seed = s.seed;
    cfg.allow_biased_sampler = s.sampler == SamplerKind::ring;
    std::unique_ptr<NoiseSampler> sampler;
    if (s.sampler == SamplerKind::alias || s.sampler == SamplerKind::dynamic) {
      std::vector<double> w(static_cast<std::size_t>(s.n));
      std::uniform_real_distribution<double> u(0.5, 2.0);
      for (auto& x : w) x = u(rng_);
      const double t0 = now_ms();
      if (s.sampler == SamplerKind::alias) {
        sampler = std::make_unique<AliasSampler>(w);
      } else {
        DynamicSampler::Params p;
        if (s.loss_ema) p.drive = DynamicSampler::Drive::loss_ema;
        sampler = std::make_unique<DynamicSampler>(w, p);
      }
      alias_build_ms = now_ms() - t0;
    } else if (s.sampler == SamplerKind::ring) {
      sampler = std::make_unique<RingSampler>(s.n, RingConfig{1, std::min(s.ring_upper, s.n)});
    } else {
      sampler = std::make_unique<UniformSampler>(s.n);
    }
    const double t0 = now_ms();
    Bank bank(s.n, s.dim, s.seed, s.dtype);
    bank_build_ms = now_ms() - t0;
    if (s.sampler == SamplerKind::cluster) {  // fitted to the bank, so made after it
      ClusterConfig cc;
      cc.clusters = std::min(s.clusters, s.n);
      cc.iterations = 1;
      cc.seed = s.seed;
      const double t1 = now_ms();
      sampler = std::make_unique<ClusterSampler>(bank.view(), cc);
      cluster_fit_ms = now_ms() - t1;
    }
    // Objectives that train on labels get ten classes, instance j in class j mod 10.
    std::vector<std::int64_t> labels;
    if (needs_labels(s.objective)) {
      labels.resize(static_cast<std::size_t>(s.n));
      for (std::size_t j = 0; j < labels.size(); ++j) labels[j] = static_cast<std::int64_t>(j % 10);
    }
    engine_ = std::make_unique<Engine>(std::move(bank), std::move(sampler), cfg, std::move(labels));
    for (int i = 0; i < steps + 2; ++i) {
      std::vector<index_t> v(static_cast<std::size_t>(s.batch));
      for (auto& y : v) y = any_id_(rng_);
      ids_.push_back(std::move(v));
      feats_.push_back(random_unit_rows(s.batch, s.dim, rng_));
    }
    grad_.resize(s.batch, s.dim);
  }

  /// Check, then time: the first step must agree bit for bit with the same step given its own draws
  /// (throws ProblemFound otherwise: a correctness error, exit status 1); one warm-up step; then `steps` timed steps (ms each, each on fresh
  /// inputs, bank refreshed as in training).
  std::vector<double> time_steps(int steps) {
    MEMBANK_CHECK(steps >= 1 && static_cast<std::size_t>(steps) + 2 <= ids_.size(),
                  "steps = {}: expected 1 ..{}", steps, ids_.size() - 2);
    if (s_.objective != Objective::full_softmax) {
      const RowMatrixi drawn = engine_->sample(ids_[0], engine_->steps_done(), feats_[0]);
      RowMatrixf g2(s_.batch, s_.dim);
      const StepStats ref = engine_->evaluate(feats_[0], ids_[0], drawn, g2);
      if (s_.inject_check_failure) g2(0, 0) += 1.0f;
      const StepStats got = engine_->step(feats_[0], ids_[0], grad_, true);
      if (!(got.loss == ref.loss && grad_ == g2))
        throw ProblemFound(fmt::format("self-check failed: step loss {} vs {} for the same step given its drawn "
                                       "negatives{}", got.loss, ref.loss, grad_ == g2 ? "" : " (gradients differ)"));
    } else {
      engine_->step(feats_[0], ids_[0], grad_, true);
    }
    engine_->step(feats_[1], ids_[1], grad_, true);  // warm-up
    std::vector<double> ms;
    for (int i = 2; i < steps + 2; ++i) {
      const double t0 = now_ms();
      engine_->step(feats_[static_cast<std::size_t>(i)], ids_[static_cast<std::size_t>(i)], grad_, true);
      ms.push_back(now_ms() - t0);
    }
    return ms;
  }

  /// The gather floor, same count of rows as a per-sample step: B x (K + 1) fresh random rows a pass
  /// (ids drawn outside the timed region), one untimed warm-up pass, then `passes` timed passes.
  /// Adds each pass's checksum into *checksum.
  std::vector<double> time_gather_floor(int passes, double* checksum) {
    RowMatrixi rows(s_.batch, s_.k + 1);
    const RowMatrixf fq = random_unit_rows(s_.batch, s_.dim, rng_);
    std::vector<double> ms;
    for (int p = -1; p < passes; ++p) {
      for (index_t i = 0; i < rows.size(); ++i) rows.data()[i] = any_id_(rng_);
      const double t0 = now_ms();
      *checksum += floor_pass(engine_->bank().view(), rows, fq);
      if (p >= 0) ms.push_back(now_ms() - t0);
    }
    return ms;
  }

  /// The self-check and warm-up of time_steps() and a warm-up floor pass; then step_once() and
  /// floor_once() may be called in any order (several benches interleaved). Steps use inputs 2, 3, ...
  void begin(double* checksum) {
    time_steps(1);
    time_gather_floor(0, checksum);
    next_ = 3;
  }
  /// One timed step on fresh inputs (ms); at most `steps` - 1 of them after begin().
  double step_once() {
    MEMBANK_CHECK(next_ >= 3 && next_ < ids_.size(), "StepBench::step_once: call begin() first; {} inputs made",
                  ids_.size());
    const double t0 = now_ms();
    engine_->step(feats_[next_], ids_[next_], grad_, true);
    ++next_;
    return now_ms() - t0;
  }
  /// One timed step after `overlap_ms` of simulated caller compute (a sleep: the caller's forward pass
  /// on an accelerator leaves the CPU idle), with or without announcing the step's ids first
  /// (Engine::prefetch, before the sleep). Only the step is timed: the critical path.
  double step_after(double overlap_ms, bool prefetch) {
    MEMBANK_CHECK(next_ >= 3 && next_ < ids_.size(), "StepBench::step_after: call begin() or time_interleaved() first, "
                  "and make enough inputs ({} made)",
                  ids_.size());
    if (prefetch) engine_->prefetch(ids_[next_]);
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(overlap_ms));
    const double t0 = now_ms();
    const StepStats st = engine_->step(feats_[next_], ids_[next_], grad_, true);
    const double ms = now_ms() - t0;
    MEMBANK_CHECK(st.prefetched == prefetch, "StepBench::step_after: the step {} the prefetch", st.prefetched ? "used" : "ignored");
    ++next_;
    return ms;
  }

  /// One timed floor pass (ms).
  double floor_once(double* checksum) { return time_gather_floor(1, checksum).front(); }

  /// Whether the sampler's draws each read a line of a table (draw_table_bytes): then
  /// time_table_lines() times what those reads add.
  bool has_draw_table() const { return draw_table_bytes(s_.sampler) > 0; }
  /// The size in bytes of that table, for this bank.
  std::size_t draw_table_size() const { return static_cast<std::size_t>(s_.n) * draw_table_bytes(s_.sampler); }
  /// table_gather_pass without and with the lines of a table of the sampler's size (made at the first
  /// call, on huge pages like the samplers' own tables), on fresh rows and lines. Returns {ms without,
  /// ms with}.
  std::pair<double, double> time_table_lines(double* checksum) {
    MEMBANK_CHECK(has_draw_table(), "StepBench::time_table_lines: the {} sampler reads no table a draw",
                  to_string(s_.sampler));
    const auto n_lines = static_cast<index_t>((draw_table_size() + 63) / 64);
    if (table_.empty()) {
      table_.resize(static_cast<std::size_t>(n_lines) * 8);
      for (std::size_t w = 0; w < table_.size(); ++w) table_[w] = w;
    }
    RowMatrixi rows(s_.batch, s_.k + 1), lines(s_.batch, s_.k);
    std::uniform_int_distribution<index_t> any_line(0, n_lines - 1);
    const RowMatrixf fq = random_unit_rows(s_.batch, s_.dim, rng_);
    double ms[2];
    for (int pass = 0; pass < 2; ++pass) {
      const int with = (pass + table_calls_) % 2;  // which goes first alternates from call to call
      for (index_t i = 0; i < rows.size(); ++i) rows.data()[i] = any_id_(rng_);
      if (with)
        for (index_t i = 0; i < lines.size(); ++i) lines.data()[i] = any_line(rng_);
      const double t0 = now_ms();
      *checksum += table_gather_pass(engine_->bank().view(), rows, fq, with ? table_.data() : nullptr, lines);
      ms[with] = now_ms() - t0;
    }
    ++table_calls_;
    return {ms[0], ms[1]};
  }

  /// time_steps() and time_gather_floor() alternated pass by pass (step, floor, step, floor ...), so
  /// that on a shared machine both see the same background load. Returns {step ms, floor ms}.
  std::pair<std::vector<double>, std::vector<double>> time_interleaved(int steps, double* checksum) {
    std::vector<double> step_ms = time_steps(1), floor_ms;
    time_gather_floor(0, checksum);  // warm-up
    for (int i = 1; i < steps; ++i) {
      const auto f = time_gather_floor(1, checksum);
      floor_ms.push_back(f.front());
      const double t0 = now_ms();
      engine_->step(feats_[static_cast<std::size_t>(i + 2)], ids_[static_cast<std::size_t>(i + 2)], grad_, true);
      step_ms.push_back(now_ms() - t0);
    }
    floor_ms.push_back(time_gather_floor(1, checksum).front());
    next_ = static_cast<std::size_t>(steps) + 2;  // the inputs not used yet (step_once, step_after)
    return {step_ms, floor_ms};
  }

  const Engine& engine() const { return *engine_; }
  /// Dynamic sampler: the median time (ms) of `calls` calls of set_sampler_weights, each changing
  /// `rows` random rows to random weights (generated before the clock starts).
  double time_weight_updates(int calls, index_t rows) {
    std::uniform_real_distribution<double> u(0.5, 2.0);
    std::vector<double> ms;
    for (int c = 0; c < calls; ++c) {
      std::vector<index_t> ids(static_cast<std::size_t>(rows));
      std::vector<double> w(ids.size());
      for (std::size_t i = 0; i < ids.size(); ++i) {
        ids[i] = any_id_(rng_);
        w[i] = u(rng_);
      }
      const double t0 = now_ms();
      engine_->set_sampler_weights(ids, w);
      ms.push_back(now_ms() - t0);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
  double alias_build_ms = 0.0;  ///< the alias or dynamic sampler's table build
  double cluster_fit_ms = 0.0;  ///< k-means fit: one Lloyd step and the assignment (cluster sampler only)
  double bank_build_ms = 0.0;   ///< bank allocation and random initialisation

 private:
  StepSetup s_;
  std::mt19937_64 rng_;
  std::uniform_int_distribution<index_t> any_id_;
  std::unique_ptr<Engine> engine_;
  std::vector<std::vector<index_t>> ids_;
  std::vector<RowMatrixf> feats_;
  RowMatrixf grad_;
  std::size_t next_ = 0;
  std::vector<std::uint64_t, detail::LargeArrayAllocator<std::uint64_t>> table_;  ///< time_table_lines's table
  int table_calls_ = 0;
};

/// Reset the kernel's peak-RSS mark of this process to its current RSS (Linux >= 4.0; ignored elsewhere).
inline void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

/// A "Name:   value kB" field of a /proc file, in bytes (0 when absent).
inline double proc_kb_field(const char* file, const std::string& name) {
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name, 0) == 0) return std::strtod(line.c_str() + name.size(), nullptr) * 1024.0;
  return 0.0;
}
/// Peak resident set size since the last reset_peak_rss(), bytes (VmHWM).
inline double peak_rss_bytes() { return proc_kb_field("/proc/self/status", "VmHWM:"); }
/// Current resident set size, bytes (VmRSS).
inline double rss_bytes() { return proc_kb_field("/proc/self/status", "VmRSS:"); }
/// Memory the kernel could give this process without swapping, bytes (MemAvailable).
inline double mem_available_bytes() { return proc_kb_field("/proc/meminfo", "MemAvailable:"); }

}  // namespace membank::tools
