// `membank snapshot inspect|verify|import|export`: look into a snapshot, check it completely, make one
// from another tool's (N, D) dataset, or write its bank as a plain dataset for another tool. Banks of
// every storage type (float32, float16, bfloat16); --dtype converts on import and export. inspect and
// verify read every kind of snapshot (an engine's, a queue's, a multi-view engine's); import and
// export are about an engine's bank.
#include "commands.hpp"
#include "options.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <vector>

namespace membank::tools {

namespace {

/// A bank storage type, by the names dtype_from_string reads (also its short ones).
CLI::Validator dtype_name() {
  return options_detail::validator(
      [](const std::string& s) -> std::string {
        try {
          (void)dtype_from_string(s);
          return {};
        } catch (const Error&) {
          return fmt::format("expected one of float32, float16, bfloat16 (or fp32, fp16, bf16, half), got {}",
                             options_detail::quoted(s));
        }
      },
      "{float32,float16,bfloat16}");
}

/// The parameters the configuration's objective uses, as one line.
std::string objective_parameters(const EngineConfig& c) {
  std::string p;
  switch (c.objective) {
    case Objective::dcl: p = fmt::format("tau+ {}", c.tau_plus); break;
    case Objective::hcl:
      p = fmt::format("beta {}  tau+ {}  weights {}", c.beta, c.tau_plus, c.detach_weights ? "detached" : "not detached");
      break;
    case Objective::kcl: p = fmt::format("kernel t {}  gamma {}", c.kernel_t, c.gamma); break;
    case Objective::contrastive:
    case Objective::triplet: p = fmt::format("margin {}", c.effective_margin()); break;
    default: p = "no parameters of its own"; break;
  }
  return fmt::format("objective parameters: {}{}", p, c.exclude_same_label ? "  (same-label draws excluded)" : "");
}

/// Staleness bins: never written, then steps since the last write in [0], [1], [2, 3], [4, 7], ...
std::map<std::string, index_t> staleness_histogram(const std::vector<std::int64_t>& last, std::int64_t step) {
  std::vector<index_t> bins(64, 0);
  index_t never = 0;
  int top = 0;
  for (const auto s : last) {
    if (s < 0) {
      ++never;
      continue;
    }
    const std::int64_t age = std::max<std::int64_t>(0, step - 1 - s);
    const int b = age == 0 ? 0 : 1 + static_cast<int>(std::floor(std::log2(static_cast<double>(age))));
    ++bins[static_cast<std::size_t>(b)];
    top = std::max(top, b);
  }
  std::map<std::string, index_t> out;
  out["never"] = never;
  for (int b = 0; b <= top; ++b) {
    const std::int64_t lo = b == 0 ? 0 : (std::int64_t{1} << (b - 1)), hi = b == 0 ? 0 : (std::int64_t{1} << b) - 1;
    out[lo == hi ? fmt::format("{:>6}", lo) : fmt::format("{:>6}-{}", lo, hi)] = bins[static_cast<std::size_t>(b)];
  }
  return out;
}

/// Minimum, maximum and mean of the rows' norms (rows of any type, widened exactly).
struct NormStats {
  double lo = std::numeric_limits<double>::infinity(), hi = 0.0, mean = 0.0;
};

NormStats row_norms(const Bank& bank) {
  const BankView v = bank.view();
  NormStats s;
  double sum = 0.0;
  std::vector<float> row(static_cast<std::size_t>(v.dim));
  for (index_t i = 0; i < v.rows; ++i) {
    v.widen_rows(i, 1, row.data(), v.dim);
    double sq = 0.0;
    for (const float x : row) sq += static_cast<double>(x) * x;
    const double norm = std::sqrt(sq);
    s.lo = std::min(s.lo, norm);
    s.hi = std::max(s.hi, norm);
    sum += norm;
  }
  s.mean = sum / static_cast<double>(v.rows);
  return s;
}

/// The configuration's fields every kind prints in JSON.
nlohmann::json config_json(const EngineConfig& c) {
  return {{"objective", to_string(c.objective)}, {"tau", c.tau}, {"seed", c.seed},
          {"rounding", to_string(c.rounding)}, {"exclude_positive", c.exclude_positive},
          {"exclude_same_label", c.exclude_same_label}, {"normalize_features", c.normalize_features},
          {"unit_norm_tolerance", c.unit_norm_tolerance}, {"tau_plus", c.tau_plus}, {"beta", c.beta},
          {"detach_weights", c.detach_weights}, {"kernel_t", c.kernel_t}, {"gamma", c.gamma},
          {"margin", c.effective_margin()}};
}

void inspect_queue(const std::string& file, bool json) {
  const QueueSnapshotInfo info = read_queue_snapshot_info(file);
  const Queue queue = load_queue_snapshot(file);
  const NormStats norms = row_norms(queue.keys());
  const auto hist = staleness_histogram(queue.keys().last_update(), info.step);
  const EngineConfig& c = info.config;
  const auto with_id = std::count_if(queue.ids().begin(), queue.ids().end(), [](index_t id) { return id >= 0; });
  const auto labelled = std::count(queue.labelled().begin(), queue.labelled().end(), std::uint8_t{1});
  nlohmann::json j = config_json(c);
  j.update({{"file", file}, {"kind", "queue"}, {"format", info.format}, {"format_version", info.format_version},
            {"engine_version", info.engine_version}, {"capacity", info.capacity}, {"dim", info.dim},
            {"dtype", to_string(info.dtype)}, {"step", info.step}, {"position", info.position},
            {"enqueued", info.enqueued}, {"slots_with_id", with_id}, {"slots_labelled", labelled},
            {"rows_per_chunk", info.rows_per_chunk}, {"compressed", info.compressed}, {"norm_min", norms.lo},
            {"norm_max", norms.hi}, {"norm_mean", norms.mean}, {"staleness_histogram", hist}});
  if (json) {
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("{}\n  format {} v{}, kind queue (written by membank {})\n", file, info.format, info.format_version,
             info.engine_version);
  fmt::print("  ring of {} x {} {} keys{}, {} rows per chunk{}\n", info.capacity, info.dim, to_string(info.dtype),
             info.dtype == DType::float32 ? "" : fmt::format(" (rounding {})", to_string(c.rounding)),
             info.rows_per_chunk, info.compressed ? ", deflate" : "");
  fmt::print("  step {}  position {}  enqueued {}  slots with an id {}  labelled {}\n", info.step, info.position,
             info.enqueued, with_id, labelled);
  fmt::print("  objective {}  tau {}{}{}{}  seed {}\n", to_string(c.objective), c.tau,
             c.exclude_positive ? "  (accidental hits masked)" : "", c.exclude_same_label ? "  (same label masked)" : "",
             c.normalize_features ? "  (features normalised)" : "", c.seed);
  fmt::print("  {}\n", objective_parameters(c));
  fmt::print("  key norms: min {:.9f}  max {:.9f}  mean {:.9f}\n", norms.lo, norms.hi, norms.mean);
  fmt::print("  staleness (steps since a slot was last written):\n");
  for (const auto& [bin, count] : hist) fmt::print("    {:>14}  {}\n", bin, count);
}

/// A dynamic sampler's state in brief (JSON fields and one printed line); nothing for other kinds.
std::pair<nlohmann::json, std::string> sampler_summary(const NoiseSampler& sampler) {
  const auto* d = dynamic_cast<const DynamicSampler*>(&sampler);
  if (d == nullptr) return {nlohmann::json::object(), ""};
  const std::vector<double>& w = d->weights();
  const auto [lo, hi] = std::minmax_element(w.begin(), w.end());
  const auto zero = std::count(w.begin(), w.end(), 0.0);
  const auto seen = static_cast<std::int64_t>(
      std::count_if(d->ema().begin(), d->ema().end(), [](double e) { return !std::isnan(e); }));
  const DynamicSampler::Params& p = d->params();
  nlohmann::json j = {{"sampler_drive", to_string(p.drive)}, {"sampler_alpha", p.alpha}, {"sampler_floor", p.floor},
                      {"sampler_weight_min", *lo}, {"sampler_weight_max", *hi}, {"sampler_weight_sum", d->total()},
                      {"sampler_zero_weights", zero}, {"sampler_rows_seen", seen}};
  std::string line = fmt::format("  dynamic sampler: drive {}{}  weights min {:.6g}  max {:.6g}  sum {:.9g}  zero {}",
                                 to_string(p.drive),
                                 p.drive == DynamicSampler::Drive::loss_ema
                                     ? fmt::format(" (alpha {}, floor {}, rows seen {})", p.alpha, p.floor, seen)
                                     : "",
                                 *lo, *hi, d->total(), zero);
  return {j, line};
}

void inspect_multiview(const std::string& file, bool json) {
  const MultiViewSnapshotInfo info = read_multiview_snapshot_info(file);
  const MultiViewEngine engine = load_multiview_snapshot(file);
  const EngineConfig& c = info.config;
  nlohmann::json j = config_json(c);
  std::vector<std::string> dtypes;
  for (const DType t : info.dtypes) dtypes.push_back(to_string(t));
  nlohmann::json pairs = nlohmann::json::array(), views = nlohmann::json::array();
  for (std::size_t p = 0; p < info.pairs.size(); ++p) {
    const Partition& z = info.partitions[p];
    pairs.push_back({{"query", info.pairs[p].query}, {"bank", info.pairs[p].bank}, {"z_initialised", z.initialised},
                     {"z", z.initialised ? std::exp(z.log_z) : 0.0}});
  }
  std::vector<NormStats> norms;
  for (index_t v = 0; v < info.views; ++v) {
    norms.push_back(row_norms(engine.bank(v)));
    views.push_back({{"view", v}, {"dtype", to_string(engine.bank(v).dtype())}, {"norm_min", norms.back().lo},
                     {"norm_max", norms.back().hi}, {"norm_mean", norms.back().mean},
                     {"staleness_histogram", staleness_histogram(engine.bank(v).last_update(), info.step)}});
  }
  j.update({{"file", file}, {"kind", "multiview"}, {"format", info.format}, {"format_version", info.format_version},
            {"engine_version", info.engine_version}, {"views", info.views}, {"n", info.n}, {"dim", info.dim},
            {"dtypes", dtypes}, {"graph", to_string(info.graph)}, {"step", info.step}, {"k", c.k},
            {"momentum", c.momentum}, {"negatives", to_string(c.negatives)}, {"z_policy", to_string(c.z_policy)},
            {"sampler", to_string(info.sampler)}, {"labels", info.has_labels}, {"compressed", info.compressed},
            {"pairs", pairs}, {"banks", views}});
  const auto [sampler_json, sampler_line] = sampler_summary(engine.sampler());
  j.update(sampler_json);
  if (json) {
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("{}\n  format {} v{}, kind multiview (written by membank {})\n", file, info.format,
             info.format_version, info.engine_version);
  fmt::print("  {} views of {} x {} banks ({}), {} graph of {} pairs, labels: {}{}\n", info.views, info.n, info.dim,
             fmt::join(dtypes, ", "), to_string(info.graph), info.pairs.size(), info.has_labels ? "yes" : "no",
             info.compressed ? ", deflate" : "");
  fmt::print("  step {}  objective {}  K {}  tau {}  m {}  negatives {}{}  sampler {}  seed {}\n", info.step,
             to_string(c.objective), c.k, c.tau, c.momentum, to_string(c.negatives),
             c.exclude_positive ? " (positive excluded)" : "", to_string(info.sampler), c.seed);
  fmt::print("  {}\n", objective_parameters(c));
  if (!sampler_line.empty()) fmt::print("{}\n", sampler_line);
  fmt::print("  Z policy {}:\n", to_string(c.z_policy));
  for (std::size_t p = 0; p < info.pairs.size(); ++p) {
    const Partition& z = info.partitions[p];
    fmt::print("    pair {} -> {}  Z = {}\n", info.pairs[p].query, info.pairs[p].bank,
               z.initialised ? fmt::format("{:.6g}", std::exp(z.log_z)) : "(not set)");
  }
  for (index_t v = 0; v < info.views; ++v) {
    const NormStats& s = norms[static_cast<std::size_t>(v)];
    fmt::print("  view {} ({}): row norms min {:.9f}  max {:.9f}  mean {:.9f}\n", v, dtypes[static_cast<std::size_t>(v)],
               s.lo, s.hi, s.mean);
  }
}

void inspect(const std::string& file, bool json) {
  switch (read_snapshot_kind(file)) {
    case SnapshotKind::queue: return inspect_queue(file, json);
    case SnapshotKind::multiview: return inspect_multiview(file, json);
    case SnapshotKind::engine: break;
  }
  const SnapshotInfo info = read_snapshot_info(file);
  std::vector<std::int64_t> labels;
  const Engine engine = load_snapshot(file, &labels);
  const NormStats norms = row_norms(engine.bank());
  const double lo = norms.lo, hi = norms.hi;
  const auto hist = staleness_histogram(engine.bank().last_update(), info.step);
  const EngineConfig& c = info.config;
  nlohmann::json j = {
      {"file", file}, {"kind", "engine"}, {"format", info.format}, {"format_version", info.format_version},
      {"engine_version", info.engine_version}, {"n", info.n}, {"dim", info.dim}, {"dtype", to_string(info.dtype)},
      {"rounding", to_string(c.rounding)}, {"step", info.step},
      {"objective", to_string(c.objective)}, {"k", c.k}, {"tau", c.tau}, {"momentum", c.momentum},
      {"negatives", to_string(c.negatives)}, {"exclude_positive", c.exclude_positive},
      {"z_policy", to_string(c.z_policy)}, {"z", info.partition.initialised ? std::exp(info.partition.log_z) : 0.0},
      {"z_initialised", info.partition.initialised}, {"sampler", to_string(info.sampler)}, {"seed", c.seed},
      {"labels", info.has_labels}, {"rows_per_chunk", info.rows_per_chunk}, {"compressed", info.compressed},
      {"tau_plus", c.tau_plus}, {"beta", c.beta}, {"detach_weights", c.detach_weights}, {"kernel_t", c.kernel_t},
      {"gamma", c.gamma}, {"margin", c.effective_margin()}, {"exclude_same_label", c.exclude_same_label},
      {"norm_min", lo}, {"norm_max", hi}, {"norm_mean", norms.mean},
      {"staleness_histogram", hist}};
  const auto [sampler_json, sampler_line] = sampler_summary(engine.sampler());
  j.update(sampler_json);
  if (json) {
    fmt::print("{}\n", j.dump());
    return;
  }
  fmt::print("{}\n  format {} v{}, kind engine (written by membank {})\n", file, info.format, info.format_version,
             info.engine_version);
  fmt::print("  bank {} x {} {}{}, {} rows per chunk{}, labels: {}\n", info.n, info.dim, to_string(info.dtype),
             info.dtype == DType::float32 ? "" : fmt::format(" (rounding {})", to_string(c.rounding)),
             info.rows_per_chunk, info.compressed ? ", deflate" : "", info.has_labels ? "yes" : "no");
  fmt::print("  step {}  objective {}  K {}  tau {}  m {}  negatives {}{}\n", info.step, to_string(c.objective), c.k,
             c.tau, c.momentum, to_string(c.negatives), c.exclude_positive ? " (positive excluded)" : "");
  fmt::print("  {}\n", objective_parameters(c));
  fmt::print("  Z policy {}  Z = {}  sampler {}  seed {}\n", to_string(c.z_policy),
             info.partition.initialised ? fmt::format("{:.6g}", std::exp(info.partition.log_z)) : "(not set)",
             to_string(info.sampler), c.seed);
  if (!sampler_line.empty()) fmt::print("{}\n", sampler_line);
  fmt::print("  row norms: min {:.9f}  max {:.9f}  mean {:.9f}\n", lo, hi, norms.mean);
  fmt::print("  staleness (steps since a row was last written):\n");
  for (const auto& [bin, count] : hist) fmt::print("    {:>14}  {}\n", bin, count);
}

}  // namespace

void add_snapshot(CLI::App& app) {
  auto* snap = app.add_subcommand("snapshot", "Inspect, verify, import or export HDF5 snapshots of the engine "
                                              "(banks of float32, float16 or bfloat16 rows); inspect and verify also "
                                              "read snapshots of a queue and of a multi-view engine");
  snap->require_subcommand(1);
  auto file = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto* ins = snap->add_subcommand("inspect", "Print a snapshot's kind, metadata, row-norm statistics and staleness "
                                              "histogram (an engine's bank, a queue's keys, a multi-view engine's "
                                              "banks and pairs)");
  ins->add_option("FILE", *file, "snapshot (.h5)")->required()->check(input_file());
  ins->add_flag("--json", *json, "print one JSON object");
  ins->callback(command([file, json] { inspect(*file, *json); }));
  auto in = std::make_shared<std::string>(), out = std::make_shared<std::string>(),
       dataset = std::make_shared<std::string>("bank"), dtype = std::make_shared<std::string>("float32");
  auto* imp = snap->add_subcommand(
      "import", "Make a snapshot from a plain (N, D) dataset written by another tool (h5py ...): float16, float32, "
                "float64, or bfloat16 words as `snapshot export` writes them. Rows are renormalised (the count of "
                "rows that needed it is printed), then stored as --dtype, rounded to nearest");
  imp->add_option("IN", *in, "HDF5 file holding the dataset")->required()->check(input_file());
  imp->add_option("OUT", *out, "snapshot to write (not IN: the input is never overwritten)")
      ->required()
      ->check(output_file());
  imp->add_option("--dataset", *dataset, "dataset path inside IN")->capture_default_str();
  imp->add_option("--dtype", *dtype, "storage type of the new bank")->check(dtype_name())->capture_default_str();
  imp->callback(command([in, out, dataset, dtype] {
    // Before reading anything: OUT is not IN under any name, and its disk holds about IN's size.
    require_distinct_files("IN", *in, "OUT", *out);
    require_output_space("OUT", *out, static_cast<double>(std::filesystem::file_size(*in)));
    index_t renormalised = 0;
    Bank bank = import_bank(*in, *dataset, &renormalised, dtype_from_string(*dtype));
    const index_t n = bank.size(), dim = bank.dim();
    EngineConfig cfg;
    cfg.k = std::min<index_t>(cfg.k, n);
    Engine engine(std::move(bank), std::make_unique<UniformSampler>(n), cfg);
    save_snapshot(*out, engine);
    fmt::print("imported {} x {} from {}:{} as {}; renormalised {} rows; wrote {}\n", n, dim, *in, *dataset,
               to_string(engine.bank().dtype()), renormalised, *out);
  }));
  auto ein = std::make_shared<std::string>(), eout = std::make_shared<std::string>(),
       edataset = std::make_shared<std::string>("bank"), edtype = std::make_shared<std::string>("float32");
  auto* exp = snap->add_subcommand(
      "export", "Write a snapshot's bank as a plain (N, D) dataset in a new HDF5 file, for tools that want plain "
                "arrays (h5py, numpy): float32 holds the stored rows widened exactly, whatever the bank's type; "
                "float16 or bfloat16 the rows rounded to nearest (the bank's own bits when it has that type; "
                "bfloat16 as 16-bit words with the attribute dtype = 'bfloat16'). The snapshot is verified first; "
                "no other dataset is written (h5py reads last_update and labels from the snapshot itself)");
  exp->add_option("IN", *ein, "snapshot (.h5)")->required()->check(input_file());
  exp->add_option("OUT", *eout, "HDF5 file to write (not IN: the input is never overwritten)")
      ->required()
      ->check(output_file());
  exp->add_option("--dataset", *edataset, "dataset path inside OUT (its groups are created)")->capture_default_str();
  exp->add_option("--dtype", *edtype, "element type of the dataset")->check(dtype_name())->capture_default_str();
  exp->callback(command([ein, eout, edataset, edtype] {
    require_distinct_files("IN", *ein, "OUT", *eout);
    const Engine engine = load_snapshot(*ein);
    const DType to = dtype_from_string(*edtype);
    export_bank(*eout, engine.bank(), to, *edataset);
    fmt::print("exported {} x {} {} bank of {} as {} to {}:{}\n", engine.bank().size(), engine.bank().dim(),
               to_string(engine.bank().dtype()), *ein, to_string(to), *eout, *edataset);
  }));
  auto vfile = std::make_shared<std::string>();
  auto* ver = snap->add_subcommand(
      "verify", "Check a snapshot completely (format, shapes, checksums, every row); exit status 0 only if sound, 1 if not. "
      "Run it on an untrusted file before loading it anywhere else: it is the check, in a process of its own");
  ver->add_option("FILE", *vfile, "snapshot (.h5)")->required()->check(input_file());
  ver->callback(command([vfile] {
    const auto problems = verify_snapshot(*vfile);
    if (problems.empty()) {
      switch (read_snapshot_kind(*vfile)) {
        case SnapshotKind::queue: {
          const QueueSnapshotInfo info = read_queue_snapshot_info(*vfile);
          fmt::print("{}: ok (queue of {} x {} {} keys, step {}, format v{})\n", *vfile, info.capacity, info.dim,
                     to_string(info.dtype), info.step, info.format_version);
          return;
        }
        case SnapshotKind::multiview: {
          const MultiViewSnapshotInfo info = read_multiview_snapshot_info(*vfile);
          std::vector<std::string> dtypes;
          for (const DType t : info.dtypes) dtypes.push_back(to_string(t));
          fmt::print("{}: ok (multiview engine, {} views of {} x {} banks ({}), step {}, format v{})\n", *vfile,
                     info.views, info.n, info.dim, fmt::join(dtypes, ", "), info.step, info.format_version);
          return;
        }
        case SnapshotKind::engine: break;
      }
      const SnapshotInfo info = read_snapshot_info(*vfile);
      fmt::print("{}: ok ({} x {} {} bank, step {}, format v{})\n", *vfile, info.n, info.dim, to_string(info.dtype),
                 info.step, info.format_version);
      return;
    }
    for (const auto& p : problems) fmt::print(stderr, "{}: {}\n", *vfile, user_message(p));
    throw ProblemFound(fmt::format("{}: not a sound snapshot", *vfile));
  }));
}

}  // namespace membank::tools
