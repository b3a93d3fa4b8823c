// Snapshots of a DistributedEngine (membank/distributed_snapshot.hpp), run under mpirun in steps that
// CTest chains by fixtures:
//   save DIR           (np = 4) every case runs S1 steps from a seeded bank and saves DIR/<case>.h5 (a
//                      shard set when sharded, a single file when replicated) -- twice, so the second
//                      save replaces a set: only its own R shard files stay. Rank 0 also saves the
//                      uninterrupted single-process engine at the same step as DIR/<case>.single.h5,
//                      the reference tests/python/distributed_snapshot_h5py.py compares master['bank']
//                      with. The saving engine goes on bit for bit after its save. Bad destinations
//                      give every rank the same error; a set with a missing or a wrong shard file is
//                      refused by both loaders, naming the shard.
//   load DIR           (np = 1, 2, 3) every case loads in its own mode and in the other one, and into
//                      the single-process Engine (load_snapshot of the master), then continues S2 steps:
//                      the bank bit for bit that of the uninterrupted single-process engine after every
//                      step, the loss bit for bit that of an uninterrupted DistributedEngine at this np
//                      (and of the single-process engine for the single-process load).
//   crash_prepare DIR  (np = 4) saves set A.
//   crash_write DIR    (np = 4, MEMBANK_TEST_SHARD_SET_FAULT=before_master_rename) goes on and saves
//                      set B over it: rank 0 dies with every shard of B written, its master temporary
//                      validated, before the rename. CTest expects it to fail.
//   crash_check DIR    (np = 2) the master still names A, loads equal to the run at A's step and goes
//                      on bit for bit; B's orphaned shards and the dead writer's temporary are there,
//                      and the next save removes them and A's shards.
// Every reference is independent of the snapshot code: the single-process Engine and a
// DistributedEngine built from the same seed and run through the same global batches.
// A check never throws and never stops a rank early: every rank enters every collective.
#include <membank/cluster_sampler.hpp>
#include <membank/distributed.hpp>
#include <membank/distributed_snapshot.hpp>
#include <membank/error.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/snapshot.hpp>

#include "mpi_check.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace membank;
using namespace mpi_check;
namespace fs = std::filesystem;

constexpr index_t kN = 97, kDim = 24, kK = 12, kBatch = 8;
constexpr int kS1 = 3, kS2 = 3;  // steps before the save, steps after the load

struct Case {
  const char* name;
  Distributed mode;
  DType dtype;
  SamplerKind sampler;
  Objective objective;
  Rounding rounding;
  bool labels;
};

const Case kCases[] = {
    {"sharded_f32", Distributed::sharded, DType::float32, SamplerKind::alias, Objective::supcon, Rounding::nearest, true},
    {"sharded_f16", Distributed::sharded, DType::float16, SamplerKind::uniform, Objective::nce, Rounding::nearest, false},
    {"sharded_bf16", Distributed::sharded, DType::bfloat16, SamplerKind::uniform, Objective::info_nce,
     Rounding::stochastic, true},
    {"replicated_f32", Distributed::replicated, DType::float32, SamplerKind::uniform, Objective::nce, Rounding::nearest,
     false},
    {"replicated_bf16", Distributed::replicated, DType::bfloat16, SamplerKind::alias, Objective::dcl,
     Rounding::stochastic, true},
    // query-dependent samplers: the clusters re-fitted at steps 2 and 4, across the save; the ring loaded
    // sharded too
    {"replicated_cluster", Distributed::replicated, DType::float16, SamplerKind::cluster, Objective::info_nce,
     Rounding::nearest, false},
    {"sharded_cluster", Distributed::sharded, DType::float32, SamplerKind::cluster, Objective::dcl, Rounding::nearest,
     true},
    {"replicated_ring", Distributed::replicated, DType::float32, SamplerKind::ring, Objective::nce, Rounding::nearest,
     false},
};

EngineConfig config_of(const Case& c) {
  EngineConfig cfg;
  cfg.k = kK;
  cfg.tau = 0.2;
  cfg.momentum = 0.5;
  cfg.objective = c.objective;
  cfg.seed = 11;
  cfg.z_policy = ZPolicy::ema;
  cfg.rounding = c.rounding;
  cfg.allow_biased_sampler = c.sampler == SamplerKind::ring;
  return cfg;
}

std::unique_ptr<NoiseSampler> make_sampler(SamplerKind kind, DType dtype) {
  if (kind == SamplerKind::uniform) return std::make_unique<UniformSampler>(kN);
  if (kind == SamplerKind::ring) return std::make_unique<RingSampler>(kN, RingConfig{1, 25});
  if (kind == SamplerKind::cluster) {  // fitted to the seeded bank, re-fitted every 2 steps
    ClusterConfig cc;
    cc.clusters = 6;
    cc.beta = 5.0;
    cc.refresh_every = 2;
    cc.iterations = 2;
    return std::make_unique<ClusterSampler>(Bank(kN, kDim, 5, dtype).view(), cc);
  }
  std::vector<double> w(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) w[static_cast<std::size_t>(j)] = 1.0 + static_cast<double>((j * 7) % 11);
  return std::make_unique<AliasSampler>(w);
}

std::vector<std::int64_t> labels_of(const Case& c) {
  if (!c.labels) return {};
  std::vector<std::int64_t> l(static_cast<std::size_t>(kN));
  for (index_t j = 0; j < kN; ++j) l[static_cast<std::size_t>(j)] = j % 5;
  return l;
}

/// The global batch of step s (independent of the rank count): ids with a duplicate, unit features.
void global_batch(std::int64_t step, std::vector<index_t>& ids, RowMatrixf& f) {
  std::mt19937_64 gen(1000 + static_cast<std::uint64_t>(step));
  std::uniform_int_distribution<index_t> pick(0, kN - 1);
  std::normal_distribution<float> normal;
  ids.resize(static_cast<std::size_t>(kBatch));
  for (auto& y : ids) y = pick(gen);
  ids[kBatch - 1] = ids[0];
  f.resize(kBatch, kDim);
  for (index_t i = 0; i < kBatch; ++i) {
    for (index_t c = 0; c < kDim; ++c) f(i, c) = normal(gen);
    f.row(i).normalize();
  }
}

/// One step of the global batch of the engine's step counter; this rank passes its slice.
StepStats dist_step(DistributedEngine& e) {
  std::vector<index_t> ids;
  RowMatrixf f;
  global_batch(e.steps_done(), ids, f);
  const RowRange mine = shard_rows(kBatch, e.ranks(), e.rank());
  const RowMatrixf f_mine = f.middleRows(mine.begin, mine.size());
  const std::vector<index_t> ids_mine(ids.begin() + mine.begin, ids.begin() + mine.end);
  RowMatrixf g(mine.size(), kDim);
  return e.step(f_mine, ids_mine, g);
}

StepStats single_step(Engine& e) {
  std::vector<index_t> ids;
  RowMatrixf f;
  global_batch(e.steps_done(), ids, f);
  RowMatrixf g(kBatch, kDim);
  return e.step(f, ids, g);
}

Engine reference(const Case& c) {
  return Engine(Bank(kN, kDim, 5, c.dtype), make_sampler(c.sampler, c.dtype), config_of(c), labels_of(c));
}

DistributedEngine seeded(const Case& c, Distributed mode) {
  return DistributedEngine::seeded(MPI_COMM_WORLD, mode, kN, kDim, 5, c.dtype, make_sampler(c.sampler, c.dtype), config_of(c),
                                   labels_of(c));
}

/// Whether a's loss may be compared with b's bit for bit: NCE's loss uses Z, whose estimate is a sum
/// over the global batch combined in rank order, so an NCE run resumed at another rank count (or in
/// the single-process engine) differs from an uninterrupted one in the last bits of Z; its loss is
/// compared within 1e-12 relative, its restored Z bit for bit with the file's.
bool same_loss(const Case& c, double a, double b) {
  if (c.objective != Objective::nce) return same_bits(a, b);
  return std::fabs(a - b) <= 1e-12 * std::max(1.0, std::fabs(b));
}

/// The distributed engine's whole state against the single-process engine's (bank and last-update
/// steps gathered on rank 0; the rest on every rank).
void check_state(const DistributedEngine& d, const Engine& ref, const std::string& at) {
  const RowMatrixf bank = d.gather_bank(0);
  const std::vector<std::int64_t> last = d.gather_last_update(0);
  if (g_rank == 0) {
    check(same_bits(bank, ref.bank().to_matrix()), fmt::format("{}: the bank differs from the single-process bank", at));
    check(last == ref.bank().last_update(), fmt::format("{}: last-update steps differ", at));
  }
  check(d.steps_done() == ref.steps_done(), fmt::format("{}: step {} against {}", at, d.steps_done(), ref.steps_done()));
  // Z's estimate sums the global batch in rank order: at another rank count it differs in the last
  // bits (the bank does not depend on it; the NCE loss does, see load()).
  check(d.partition().initialised == ref.partition().initialised &&
            (!ref.partition().initialised ||
             std::fabs(d.partition().log_z - ref.partition().log_z) <= 1e-12 * std::fabs(ref.partition().log_z)),
        fmt::format("{}: log Z {} against {}", at, d.partition().log_z, ref.partition().log_z));
  check(d.labels() == ref.labels(), fmt::format("{}: labels differ", at));
  check(d.sampler().kind() == ref.sampler().kind() && d.sampler().probs() == ref.sampler().probs(),
        fmt::format("{}: sampler differs", at));
  if (const auto* a = dynamic_cast<const ClusterSampler*>(&d.sampler())) {  // its whole state
    const auto& b = dynamic_cast<const ClusterSampler&>(ref.sampler());
    check(same_bits(a->centroids(), b.centroids()) && a->assignment() == b.assignment() &&
              a->refreshed_at() == b.refreshed_at(),
          fmt::format("{}: the cluster sampler's state differs", at));
  }
  check(d.local_bank().dtype() == ref.bank().dtype(), fmt::format("{}: storage type differs", at));
}

std::vector<fs::path> shard_files(const fs::path& dir, const std::string& name) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.rfind(name + ".g", 0) == 0 && f.find(".shard-") != std::string::npos) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void barrier() { MPI_Barrier(MPI_COMM_WORLD); }

// ---- save ---------------------------------------------------------------------------------------

void save(const fs::path& dir) {
  if (g_rank == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  barrier();
  for (const Case& c : kCases) {
    const std::string at = fmt::format("save {}", c.name);
    const std::string master = (dir / (std::string(c.name) + ".h5")).string();
    Engine ref = reference(c);
    guarded(at, [&] {
      DistributedEngine d = seeded(c, c.mode);
      std::string first_generation;
      for (int s = 0; s < kS1; ++s) {
        dist_step(d);
        single_step(ref);
        if (s == 0) {  // a first set, which the second save replaces
          save_distributed_snapshot(master, d);
          if (c.mode == Distributed::sharded) first_generation = read_snapshot_info(master).generation;
        }
      }
      save_distributed_snapshot(master, d);  // returns on every rank once the set is in place
      const SnapshotInfo info = read_snapshot_info(master);
      const std::vector<fs::path> shards = shard_files(dir, std::string(c.name) + ".h5");
      if (c.mode == Distributed::sharded) {
        check(info.shards == g_ranks && info.generation.size() == 16 && info.generation != first_generation,
              fmt::format("{}: shards = {}, generation '{}' (first '{}')", at, info.shards, info.generation,
                          first_generation));
        bool own = shards.size() == static_cast<std::size_t>(g_ranks);
        for (const auto& p : shards) own = own && p.filename().string().find(".g" + info.generation + ".") != std::string::npos;
        check(own, fmt::format("{}: {} shard files, expected exactly the {} of generation {}", at, shards.size(),
                               g_ranks, info.generation));
      } else {
        check(info.shards == 0 && shards.empty(), fmt::format("{}: a single file expected, shards = {}", at, info.shards));
      }
      check(info.step == kS1 && info.n == kN && info.dtype == c.dtype,
            fmt::format("{}: info step {} n {} dtype {}", at, info.step, info.n, to_string(info.dtype)));
      if (g_rank == 0) guarded(at + " single", [&] { save_snapshot((dir / (std::string(c.name) + ".single.h5")).string(), ref); });
      check_state(d, ref, at + " after the save");
      // The saving engine goes on as if nothing happened.
      for (int s = 0; s < kS2; ++s) {
        dist_step(d);
        single_step(ref);
      }
      check_state(d, ref, at + " going on after the save");
    });
  }
  // A bad destination: the same error on every rank, nothing written.
  {
    Case c = kCases[0];
    DistributedEngine d = seeded(c, Distributed::sharded);
    std::string message;
    try {
      save_distributed_snapshot((dir / "no-such-dir" / "x.h5").string(), d);
    } catch (const Error& e) {
      message = e.what();
    }
    check(message.find("does not exist") != std::string::npos && message.find("rank 0 of") != std::string::npos,
          fmt::format("a missing directory is refused naming the rank: '{}'", message));
    std::uint64_t h = 1469598103934665603ull;
    for (const char ch : message) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    std::vector<std::uint64_t> all(static_cast<std::size_t>(g_ranks));
    MPI_Allgather(&h, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
    check(std::all_of(all.begin(), all.end(), [&](std::uint64_t x) { return x == all[0]; }),
          "every rank has the same error text");
    message.clear();
    try {
      load_distributed_snapshot((dir / "missing.h5").string(), MPI_COMM_WORLD, Distributed::sharded);
    } catch (const Error& e) {
      message = e.what();
    }
    check(message.find("no such file") != std::string::npos, fmt::format("a missing file is refused: '{}'", message));
  }
  // A broken set is refused before any row is read (HDF5 itself would read a missing shard's rows as
  // zeros): a missing shard file, then another shard's file under its name.
  {
    const fs::path broken = dir / "broken";
    const std::string master = (broken / "sharded_f32.h5").string();
    std::string shard2;
    if (g_rank == 0) {
      fs::create_directories(broken);
      fs::copy_file(dir / "sharded_f32.h5", master);
      for (const auto& p : shard_files(dir, "sharded_f32.h5")) {
        fs::copy_file(p, broken / p.filename());
        if (p.filename().string().find(".shard-2-of-") != std::string::npos) shard2 = (broken / p.filename()).string();
      }
      fs::remove(shard2);
    }
    barrier();
    const auto refused = [&](const std::string& what, const std::string& expect) {
      std::string message;
      try {
        load_distributed_snapshot(master, MPI_COMM_WORLD, Distributed::sharded);
      } catch (const Error& e) {
        message = e.what();
      }
      check(message.find("shard 2 of 4") != std::string::npos && message.find(expect) != std::string::npos,
            fmt::format("{}: refused naming the shard and '{}': '{}'", what, expect, message));
      if (g_rank == 0) {
        message.clear();
        try {
          load_snapshot(master);
        } catch (const Error& e) {
          message = e.what();
        }
        check(message.find("shard 2 of 4") != std::string::npos && message.find(expect) != std::string::npos,
              fmt::format("{}: load_snapshot refuses it: '{}'", what, message));
      }
      barrier();
    };
    refused("a missing shard", "no such file");
    if (g_rank == 0) {
      for (const auto& p : shard_files(broken, "sharded_f32.h5"))
        if (p.filename().string().find(".shard-1-of-") != std::string::npos) fs::copy_file(p, shard2);
    }
    barrier();
    refused("shard 1's file as shard 2", "attribute shard = 1: expected 2");
  }
  if (g_rank == 0) std::cout << fmt::format("save: {} cases at np = {}\n", std::size(kCases), g_ranks);
}

// ---- load ---------------------------------------------------------------------------------------

void load(const fs::path& dir) {
  for (const Case& c : kCases) {
    const std::string master = (dir / (std::string(c.name) + ".h5")).string();
    Engine ref = reference(c);
    for (int s = 0; s < kS1; ++s) single_step(ref);
    std::vector<double> ref_loss;
    {
      Engine cont = reference(c);
      for (int s = 0; s < kS1 + kS2; ++s) {
        const StepStats st = single_step(cont);
        if (s >= kS1) ref_loss.push_back(st.loss);
      }
    }
    for (const Distributed mode : {c.mode, c.mode == Distributed::sharded ? Distributed::replicated : Distributed::sharded}) {
      const std::string at = fmt::format("load {} as {} at np = {}", c.name, to_string(mode), g_ranks);
      guarded(at, [&] {
        // The uninterrupted run at this np and mode: the losses a resumed engine must give, bit for bit.
        std::vector<double> dist_loss;
        {
          DistributedEngine u = seeded(c, mode);
          for (int s = 0; s < kS1 + kS2; ++s) {
            const StepStats st = dist_step(u);
            if (s >= kS1) dist_loss.push_back(st.loss);
          }
        }
        DistributedEngine d = load_distributed_snapshot(master, MPI_COMM_WORLD, mode);
        const SnapshotInfo info = read_snapshot_info(master);
        check(d.partition().initialised == info.partition.initialised &&
                  same_bits(d.partition().log_z, info.partition.log_z),
              fmt::format("{}: log Z {} against the file's {}", at, d.partition().log_z, info.partition.log_z));
        check(d.mode() == mode && d.size() == kN && d.dim() == kDim, fmt::format("{}: mode or shape", at));
        const RowRange want = mode == Distributed::sharded ? shard_rows(kN, g_ranks, g_rank) : RowRange{0, kN};
        check(d.rows().begin == want.begin && d.rows().end == want.end, fmt::format("{}: rows held", at));
        check_state(d, ref, at);
        Engine cont = reference(c);
        for (int s = 0; s < kS1; ++s) single_step(cont);
        for (int s = 0; s < kS2; ++s) {
          const StepStats st = dist_step(d);
          single_step(cont);
          const auto i = static_cast<std::size_t>(s);
          check(same_loss(c, st.loss, dist_loss[i]),
                fmt::format("{} step {}: loss {} against the uninterrupted run's {}", at, kS1 + s, st.loss, dist_loss[i]));
          check(std::fabs(st.loss - ref_loss[i]) <= 1e-6 * std::max(1.0, std::fabs(ref_loss[i])),
                fmt::format("{} step {}: loss {} against the single-process {}", at, kS1 + s, st.loss, ref_loss[i]));
          check_state(d, cont, fmt::format("{} step {}", at, kS1 + s));
        }
      });
    }
    // The single-process engine loads the master too, and goes on bit for bit.
    if (g_rank == 0) {
      const std::string at = fmt::format("load_snapshot {}", c.name);
      guarded(at, [&] {
        Engine e = load_snapshot(master);
        check(same_bits(e.partition().log_z, read_snapshot_info(master).partition.log_z) &&
                  same_bits(e.bank().to_matrix(), ref.bank().to_matrix()) &&
                  e.bank().last_update() == ref.bank().last_update() && e.steps_done() == kS1 &&
                  e.labels() == ref.labels() && e.bank().dtype() == c.dtype,
              fmt::format("{}: state differs from the uninterrupted engine's at step {}", at, kS1));
        check(verify_snapshot(master).empty(), fmt::format("{}: verify_snapshot finds problems", at));
        Engine cont = reference(c);
        for (int s = 0; s < kS1; ++s) single_step(cont);
        for (int s = 0; s < kS2; ++s) {
          const StepStats a = single_step(e), b = single_step(cont);
          check(same_loss(c, a.loss, b.loss) && same_bits(e.bank().to_matrix(), cont.bank().to_matrix()),
                fmt::format("{} step {}: loss {} against {}, or the bank differs", at, kS1 + s, a.loss, b.loss));
        }
      });
    }
    barrier();
  }
  if (g_rank == 0) std::cout << fmt::format("load: {} cases at np = {}\n", std::size(kCases), g_ranks);
}

// ---- crash safety ---------------------------------------------------------------------------------

const Case& crash_case() { return kCases[0]; }  // sharded fp32, alias sampler, labels

void crash_prepare(const fs::path& dir) {
  if (g_rank == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  barrier();
  guarded("crash_prepare", [&] {
    DistributedEngine d = seeded(crash_case(), Distributed::sharded);
    for (int s = 0; s < kS1; ++s) dist_step(d);
    save_distributed_snapshot((dir / "crash.h5").string(), d);
    const SnapshotInfo info = read_snapshot_info((dir / "crash.h5").string());
    check(info.shards == g_ranks && info.generation.size() == 16 && info.step == kS1,
          fmt::format("crash_prepare: set A has {} shards, generation '{}', step {}", info.shards, info.generation,
                      info.step));
    if (g_rank == 0) std::ofstream(dir / "generation-a.txt") << info.generation;
  });
}

/// Dies in the save (the fault hook on rank 0): an exit status of 0 means the hook did not fire.
void crash_write(const fs::path& dir) {
  guarded("crash_write", [&] {
    DistributedEngine d = load_distributed_snapshot((dir / "crash.h5").string(), MPI_COMM_WORLD, Distributed::sharded);
    for (int s = 0; s < 2; ++s) dist_step(d);
    save_distributed_snapshot((dir / "crash.h5").string(), d);
  });
  check(false, "crash_write: the save returned: MEMBANK_TEST_SHARD_SET_FAULT=before_master_rename should have ended it");
}

void crash_check(const fs::path& dir) {
  const std::string master = (dir / "crash.h5").string();
  std::string gen_a;
  std::ifstream(dir / "generation-a.txt") >> gen_a;
  guarded("crash_check", [&] {
    const SnapshotInfo info = read_snapshot_info(master);
    check(gen_a.size() == 16 && info.generation == gen_a && info.step == kS1,
          fmt::format("the master names generation '{}' at step {}: expected the first save's '{}' at step {}",
                      info.generation, info.step, gen_a, kS1));
    // What the dead writer left: every shard of its generation, and its master temporary.
    std::size_t of_a = 0, orphans = 0, temporaries = 0;
    for (const auto& p : shard_files(dir, "crash.h5"))
      (p.filename().string().find(".g" + gen_a + ".") != std::string::npos ? of_a : orphans) += 1;
    for (const auto& e : fs::directory_iterator(dir))
      temporaries += e.path().filename().string().rfind(".crash.h5.tmp-", 0) == 0;
    check(of_a == 4 && orphans == 4 && temporaries == 1,
          fmt::format("after the crash: {} shards of A, {} orphaned shards, {} master temporaries: expected 4, 4, 1",
                      of_a, orphans, temporaries));
    // The set in place is A, whole: it loads as the run at A's step and goes on bit for bit.
    Engine ref = reference(crash_case());
    for (int s = 0; s < kS1; ++s) single_step(ref);
    DistributedEngine d = load_distributed_snapshot(master, MPI_COMM_WORLD, Distributed::sharded);
    check_state(d, ref, "crash_check: the previous set");
    for (int s = 0; s < kS2; ++s) {
      dist_step(d);
      single_step(ref);
    }
    check_state(d, ref, "crash_check: going on from the previous set");
    // The next save clears what the dead writer left, and A's shards.
    save_distributed_snapshot(master, d);
    const SnapshotInfo now = read_snapshot_info(master);
    std::size_t own = 0, other = 0;
    for (const auto& p : shard_files(dir, "crash.h5"))
      (p.filename().string().find(".g" + now.generation + ".") != std::string::npos ? own : other) += 1;
    temporaries = 0;
    for (const auto& e : fs::directory_iterator(dir))
      temporaries += e.path().filename().string().find(".tmp-") != std::string::npos;
    check(own == static_cast<std::size_t>(g_ranks) && other == 0 && temporaries == 0,
          fmt::format("after the next save: {} own shards, {} others, {} temporaries: expected {}, 0, 0", own, other,
                      temporaries, g_ranks));
    DistributedEngine again = load_distributed_snapshot(master, MPI_COMM_WORLD, Distributed::sharded);
    check_state(again, ref, "crash_check: the next save reloaded");
  });
  if (g_rank == 0) std::cout << fmt::format("crash_check: at np = {}\n", g_ranks);
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  const std::string what = argc > 1 ? argv[1] : "";
  const fs::path dir = argc > 2 ? fs::absolute(argv[2]) : fs::path();
  if (dir.empty()) {
    if (g_rank == 0) std::cerr << "usage: membank_mpi_snapshot_tests save|load|crash_prepare|crash_write|crash_check DIR\n";
    MPI_Finalize();
    return 2;
  }
  if (what == "save") save(dir);
  else if (what == "load") load(dir);
  else if (what == "crash_prepare") crash_prepare(dir);
  else if (what == "crash_write") crash_write(dir);
  else if (what == "crash_check") crash_check(dir);
  else check(false, fmt::format("unknown command '{}'", what));
  return finish(what);
}
