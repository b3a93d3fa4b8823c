// `membank bench soak`: a long run of the real step API at a small N, with periodic snapshots, that
// checks what a long training run relies on: resident memory stays flat after warm-up, every bank
// row stays unit norm, every loss, gradient and Z stays finite, and the last snapshot resumes bit for
// bit. A failed check exits with code 1 (the command ran and found a problem); bad options with 2.
#include "bench_common.hpp"
#include "commands.hpp"
#include "machine_info.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>
#include <membank/threads.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace membank::tools {

namespace {

struct SoakOptions {
  index_t n = 10'000;
  index_t dim = 128;
  index_t k = 64;
  index_t batch = 32;
  std::int64_t steps = 1'000'000;
  std::int64_t snapshot_every = 50'000;
  std::int64_t check_every = 10'000;
  std::int64_t resume_steps = 50;
  std::string dir = ".";
  std::string negatives = "per-sample";
  std::string sampler = "uniform";
  std::string z_policy = "ema";
  double norm_tolerance = 1e-5;
  double rss_growth_mib = 8.0;
  int threads = 0;
  std::uint64_t seed = 1;
  std::string out;
  bool json = false;
};

/// The training inputs of step t, a pure function of t: ids walk through a fresh permutation of the
/// N instances each epoch (as a data loader does), and each feature is the instance's fixed random
/// direction plus one of a pool of random perturbations, normalised. Deterministic, cheap next to a
/// step, and never the same batch twice in a row.
class SoakInputs {
 public:
  SoakInputs(index_t n, index_t dim, index_t batch, std::uint64_t seed)
      : n_(n), batch_(batch), seed_(seed), ids_(static_cast<std::size_t>(batch)), features_(batch, dim) {
    std::mt19937_64 rng(seed ^ 0x5eed5eedULL);
    protos_ = random_unit_rows(n, dim, rng);
    noise_ = random_unit_rows(kNoiseRows, dim, rng);
  }

  void make(std::int64_t step) {
    const std::int64_t per_epoch = std::max<std::int64_t>(1, n_ / batch_);
    const std::int64_t epoch = step / per_epoch, slot = step % per_epoch;
    if (epoch != epoch_) {
      perm_.resize(static_cast<std::size_t>(n_));
      std::iota(perm_.begin(), perm_.end(), index_t{0});
      std::mt19937_64 rng(seed_ + 0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(epoch + 1));
      std::shuffle(perm_.begin(), perm_.end(), rng);
      epoch_ = epoch;
    }
    for (index_t b = 0; b < batch_; ++b) {
      const index_t y = perm_[static_cast<std::size_t>((slot * batch_ + b) % n_)];
      ids_[static_cast<std::size_t>(b)] = y;
      const index_t r = (step * batch_ + b) % kNoiseRows;
      features_.row(b) = protos_.row(y) + 0.5f * noise_.row(r);
      features_.row(b).normalize();
    }
  }
  const std::vector<index_t>& ids() const { return ids_; }
  const RowMatrixf& features() const { return features_; }

 private:
  static constexpr index_t kNoiseRows = 4093;  // prime: the perturbation of an instance changes every epoch
  index_t n_, batch_;
  std::uint64_t seed_;
  RowMatrixf protos_, noise_;
  std::vector<index_t> perm_;
  std::int64_t epoch_ = -1;
  std::vector<index_t> ids_;
  RowMatrixf features_;
};

/// A check of the soak that failed: the command ran and found a problem (exit code 1, not the 2 of
/// invalid input that membank::Error gives).
class SoakFailure : public std::runtime_error {
 public:
  explicit SoakFailure(const std::string& what) : std::runtime_error("soak check failed: " + what) {}
};

template <class... Args>
void soak_check(bool ok, fmt::format_string<Args...> format, Args&&... args) {
  if (!ok) throw SoakFailure(fmt::format(format, std::forward<Args>(args)...));
}

/// Largest |‖v‖ - 1| over the bank's rows (norm in double).
double max_norm_deviation(const Bank& bank) {
  const BankView v = bank.view();
  double worst = 0.0;
#pragma omp parallel for schedule(static) reduction(max : worst)
  for (index_t i = 0; i < v.rows; ++i) {
    const float* r = v.row(i);
    double sq = 0.0;
    for (index_t c = 0; c < v.dim; ++c) sq += static_cast<double>(r[c]) * r[c];
    worst = std::max(worst, std::fabs(std::sqrt(sq) - 1.0));
  }
  return worst;
}

/// Bit-identical doubles (NaN equals NaN).
bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool same_bank(const Bank& a, const Bank& b) {
  if (a.size() != b.size() || a.dim() != b.dim() || a.last_update() != b.last_update()) return false;
  for (index_t i = 0; i < a.size(); ++i)
    if (std::memcmp(a.row(i), b.row(i), static_cast<std::size_t>(a.dim()) * sizeof(float)) != 0) return false;
  return true;
}

std::size_t entries_in(const std::filesystem::path& dir) {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir)) ++n;
  return n;
}

void run_bench_soak(const SoakOptions& o) {
  namespace fs = std::filesystem;
  MEMBANK_CHECK(fs::is_directory(o.dir), "--dir {}: not a directory", o.dir);
  MEMBANK_CHECK(o.snapshot_every >= 1 && o.snapshot_every <= o.steps,
                "--snapshot-every {}: expected 1 ..{} (--steps)", o.snapshot_every, o.steps);
  MEMBANK_CHECK(o.check_every >= 1 && o.check_every <= o.steps, "--check-every {}: expected 1 ..{} (--steps)",
                o.check_every, o.steps);
  if (!o.out.empty()) {  // before the long run, not after it
    MEMBANK_CHECK(std::ofstream(o.out, std::ios::app).good(), "--out {}: cannot be written", o.out);
  }
  if (o.threads > 0) set_num_threads(o.threads);
  const fs::path snap = fs::path(o.dir) / "membank-soak.h5";
  const std::size_t entries_before = entries_in(o.dir) + (fs::exists(snap) ? 0 : 1);

  EngineConfig cfg;
  cfg.k = o.k;
  cfg.negatives = negatives_mode_from_string(o.negatives);
  cfg.z_policy = z_policy_from_string(o.z_policy);
  if (cfg.z_policy == ZPolicy::fixed) cfg.z_fixed = static_cast<double>(o.n);
  cfg.seed = o.seed;
  cfg.validate(o.n);
  std::unique_ptr<NoiseSampler> sampler;
  if (o.sampler == "alias") {
    std::vector<double> w(static_cast<std::size_t>(o.n));
    std::mt19937_64 rng(o.seed);
    std::uniform_real_distribution<double> u(0.5, 2.0);
    for (auto& x : w) x = u(rng);
    sampler = std::make_unique<AliasSampler>(w);
  } else {
    MEMBANK_CHECK(o.sampler == "uniform", "--sampler {}: expected uniform or alias", o.sampler);
    sampler = std::make_unique<UniformSampler>(o.n);
  }
  Engine engine(Bank(o.n, o.dim, o.seed), std::move(sampler), cfg);
  SoakInputs inputs(o.n, o.dim, o.batch, o.seed);
  RowMatrixf grad(o.batch, o.dim);

  // Warm-up ends at the first check after the first snapshot: from then on every buffer the run
  // needs (HDF5's included) has been allocated once.
  const std::int64_t warmup = std::max(o.snapshot_every, o.check_every);
  const auto say = [](const std::string& s) { fmt::print(stderr, "{}\n", s); };  // progress, also with --json
  say(fmt::format("soak: N = {}, D = {}, K = {}, B = {}, {} steps, snapshot every {} into {}, checks every {}", o.n,
                  o.dim, o.k, o.batch, o.steps, o.snapshot_every, snap.string(), o.check_every));

  nlohmann::json samples = nlohmann::json::array();
  double rss_start = rss_bytes(), rss_warm = 0.0, rss_max_after = 0.0, worst_norm = 0.0;
  double loss_first = 0.0, loss_last_window = 0.0, snapshot_s = 0.0;
  std::int64_t window = 0, snapshots = 0, last_snapshot = -1;
  const double t_start = now_s();
  for (std::int64_t t = 0; t < o.steps; ++t) {
    inputs.make(t);
    const StepStats st = engine.step(inputs.features(), inputs.ids(), grad);
    soak_check(std::isfinite(st.loss), "step {}: the loss is {}", t, st.loss);
    soak_check(grad.allFinite(), "step {}: the gradient has a non-finite entry", t);
    soak_check(cfg.objective != Objective::nce || std::isfinite(engine.partition().log_z),
                  "step {}: log Z is {}", t, engine.partition().log_z);
    if (t == 0) loss_first = st.loss;
    loss_last_window += st.loss;
    ++window;
    const std::int64_t done = t + 1;
    if (done % o.snapshot_every == 0 || done == o.steps) {
      const double t0 = now_s();
      save_snapshot(snap.string(), engine);
      snapshot_s += now_s() - t0;
      ++snapshots;
      last_snapshot = done;
    }
    if (done % o.check_every == 0 || done == o.steps) {
      const double dev = max_norm_deviation(engine.bank());
      worst_norm = std::max(worst_norm, dev);
      soak_check(dev <= o.norm_tolerance, "step {}: a bank row has |norm - 1| = {:.3g} > {:.3g} (--norm-tolerance)",
                    done, dev, o.norm_tolerance);
      const double rss = rss_bytes();
      if (rss_warm > 0.0) rss_max_after = std::max(rss_max_after, rss);
      if (rss_warm == 0.0 && done >= warmup) rss_warm = rss;
      const double mean_loss = loss_last_window / static_cast<double>(window);
      samples.push_back({{"step", done},
                         {"rss_mib", rss / 1048576.0},
                         {"mean_loss", mean_loss},
                         {"z", engine.partition().z()},
                         {"max_norm_deviation", dev},
                         {"elapsed_s", now_s() - t_start}});
      if (done % o.snapshot_every == 0 || done == o.steps)
        say(fmt::format("  step {:>9}  RSS {:8.1f} MiB  mean loss {:.4f}  Z {:.4g}  max |norm-1| {:.2e}  {:.0f} s", done,
                        rss / 1048576.0, mean_loss, engine.partition().z(), dev, now_s() - t_start));
      loss_last_window = 0.0;
      window = 0;
    }
  }
  const double run_s = now_s() - t_start;
  const double z_end = engine.partition().z();  // before the resume check's extra steps
  const double rss_end = rss_bytes();
  if (rss_warm == 0.0) rss_warm = rss_end;  // the run ended inside its warm-up
  rss_max_after = std::max(rss_max_after, rss_end);
  const double growth_mib = (rss_max_after - rss_warm) / 1048576.0;
  const std::size_t entries_after = entries_in(o.dir);

  // Resume: the last snapshot (taken at the final step) loaded into a fresh engine must equal the live
  // engine, and both must then take the same steps bit for bit.
  say(fmt::format("resume check: {} loaded, {} more steps on it and on the live engine", snap.string(),
                  o.resume_steps));
  const auto problems = verify_snapshot(snap.string());
  soak_check(problems.empty(), "{}: verify_snapshot found: {}", snap.string(),
             problems.empty() ? std::string() : problems.front());
  Engine resumed = load_snapshot(snap.string());
  soak_check(last_snapshot == o.steps && resumed.steps_done() == engine.steps_done(),
                "resume: the snapshot holds step {}, the live engine is at {}", resumed.steps_done(),
                engine.steps_done());
  soak_check(same_bank(resumed.bank(), engine.bank()), "resume: the loaded bank differs from the live one");
  soak_check(resumed.partition().initialised == engine.partition().initialised &&
                    resumed.partition().log_z == engine.partition().log_z,
                "resume: the loaded log Z {} differs from the live {}", resumed.partition().log_z,
                engine.partition().log_z);
  RowMatrixf grad2(o.batch, o.dim);
  for (std::int64_t t = o.steps; t < o.steps + o.resume_steps; ++t) {
    inputs.make(t);
    const StepStats a = engine.step(inputs.features(), inputs.ids(), grad);
    const StepStats b = resumed.step(inputs.features(), inputs.ids(), grad2);
    soak_check(same_bits(a.loss, b.loss) && same_bits(a.z, b.z) && grad == grad2,
                  "resume: step {} differs after loading the snapshot (loss {} vs {})", t, a.loss, b.loss);
  }
  soak_check(same_bank(resumed.bank(), engine.bank()) && resumed.partition().log_z == engine.partition().log_z,
                "resume: bank or Z differ after {} steps on both", o.resume_steps);
  soak_check(entries_after <= entries_before, "--dir {}: {} entries after the run, {} expected: a temporary file "
                "was left behind", o.dir, entries_after, entries_before);
  const bool rss_flat = growth_mib <= o.rss_growth_mib;

  nlohmann::json row = {{"bench", "soak"},
                        {"n", o.n},
                        {"dim", o.dim},
                        {"k", o.k},
                        {"batch", o.batch},
                        {"steps", o.steps},
                        {"negatives", o.negatives},
                        {"sampler", o.sampler},
                        {"z_policy", o.z_policy},
                        {"threads", omp_get_max_threads()},
                        {"snapshot_every", o.snapshot_every},
                        {"snapshots", snapshots},
                        {"snapshot_s_total", snapshot_s},
                        {"run_s", run_s},
                        {"steps_per_s", static_cast<double>(o.steps) / run_s},
                        {"rss_start_mib", rss_start / 1048576.0},
                        {"rss_warmup_mib", rss_warm / 1048576.0},
                        {"rss_end_mib", rss_end / 1048576.0},
                        {"rss_max_after_warmup_mib", rss_max_after / 1048576.0},
                        {"rss_growth_after_warmup_mib", growth_mib},
                        {"rss_flat", rss_flat},
                        {"max_norm_deviation", worst_norm},
                        {"loss_first_step", loss_first},
                        {"z_end", z_end},
                        {"resume_bit_identical", true},
                        {"resume_steps", o.resume_steps},
                        {"samples", samples},
                        {"cpu", cpu_model()},
                        {"git", git_revision()},
                        {"build", MEMBANK_BUILD_TYPE}};
  if (!o.out.empty()) {
    std::ofstream f(o.out);
    f << row.dump(1) << "\n";
    MEMBANK_CHECK(f.good(), "--out {}: cannot write the JSON result", o.out);
  }
  if (o.json) {
    fmt::print("{}\n", row.dump());
  } else {
    fmt::print("membank bench soak: N = {}, D = {}, K = {}, B = {}, {} steps ({} negatives, {} sampler, Z {}), {} threads\n",
               o.n, o.dim, o.k, o.batch, o.steps, o.negatives, o.sampler, o.z_policy, omp_get_max_threads());
    fmt::print("  time         {:.0f} s ({:.0f} steps/s; {} snapshots, {:.1f} s in all)\n", run_s,
               static_cast<double>(o.steps) / run_s, snapshots, snapshot_s);
    fmt::print("  RSS          start {:.1f} MiB, after warm-up (step {}) {:.1f} MiB, end {:.1f} MiB, max after "
               "warm-up {:.1f} MiB: growth {:.2f} MiB (limit {:.1f})\n",
               rss_start / 1048576.0, std::min(warmup, o.steps), rss_warm / 1048576.0, rss_end / 1048576.0,
               rss_max_after / 1048576.0, growth_mib, o.rss_growth_mib);
    fmt::print("  unit norm    max |norm - 1| over all checks {:.2e} (limit {:.1e})\n", worst_norm, o.norm_tolerance);
    fmt::print("  losses       all finite; first step {:.4f}, last window mean {:.4f}; Z at the end {:.6g}\n",
               loss_first, samples.back()["mean_loss"].get<double>(), z_end);
    fmt::print("  resume       last snapshot (step {}) equals the live engine and the next {} steps are bit-identical\n",
               last_snapshot, o.resume_steps);
  }
  soak_check(rss_flat, "resident memory grew by {:.2f} MiB after warm-up: more than --rss-growth-mib {:.1f}",
                growth_mib, o.rss_growth_mib);
}

}  // namespace

void add_bench_soak(CLI::App& bench) {
  auto o = std::make_shared<SoakOptions>();
  auto* cmd = bench.add_subcommand(
      "soak",
      "A long run of engine steps at a small N with periodic snapshots: checks that resident memory stays flat "
      "after warm-up, every bank row stays unit norm, every loss is finite and the last snapshot resumes bit for "
      "bit; exits non-zero when a check fails. The defaults (10^6 steps) take about 15 minutes on 2 busy cores.");
  cmd->add_option("--n", o->n, "bank rows N")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--dim", o->dim, "dimension D")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--k", o->k, "noise draws per query K")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--batch", o->batch, "queries per step B")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--steps", o->steps, "engine steps")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--snapshot-every", o->snapshot_every, "steps between snapshots (one file, replaced each time)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--check-every", o->check_every, "steps between unit-norm and resident-memory checks")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--resume-steps", o->resume_steps, "steps compared between the live and the resumed engine")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dir", o->dir, "existing directory for the snapshot membank-soak.h5")->capture_default_str();
  cmd->add_option("--negatives", o->negatives, "per-sample or shared")->capture_default_str()->check(
      CLI::IsMember({"per-sample", "shared"}));
  cmd->add_option("--sampler", o->sampler, "uniform, or alias over random weights")->capture_default_str()->check(
      CLI::IsMember({"uniform", "alias"}));
  cmd->add_option("--z", o->z_policy, "Z policy: first_batch, ema or fixed (Z = N)")->capture_default_str()->check(
      CLI::IsMember({"first_batch", "ema", "fixed"}));
  cmd->add_option("--norm-tolerance", o->norm_tolerance, "largest |norm - 1| allowed for a bank row")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--rss-growth-mib", o->rss_growth_mib, "largest resident-memory growth allowed after warm-up, MiB")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--threads", o->threads, "OpenMP threads (0: the OpenMP default)")->capture_default_str()->check(
      CLI::NonNegativeNumber);
  cmd->add_option("--seed", o->seed, "seed of the bank, the inputs and the negatives")->capture_default_str();
  cmd->add_option("--out", o->out, "also write the JSON result (with the RSS samples) to this file");
  cmd->add_flag("--json", o->json, "print one JSON object (with the RSS samples) instead of text");
  cmd->callback(command([o] { run_bench_soak(*o); }));
}

}  // namespace membank::tools
