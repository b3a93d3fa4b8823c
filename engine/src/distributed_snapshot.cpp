// Snapshots of a DistributedEngine (membank/distributed_snapshot.hpp): the ranks' order of work around
// the files snapshot.cpp writes and reads (detail/snapshot_parts.hpp).
#include <membank/distributed_snapshot.hpp>
#include <membank/error.hpp>

#include "detail/check.hpp"
#include "detail/mpi_group.hpp"
#include "detail/snapshot_parts.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <utility>

namespace membank {

namespace {

namespace fs = std::filesystem;

/// A fresh generation token: 64 random bits as 16 lowercase hex digits, never `avoid`.
std::string new_generation(const std::string& avoid) {
  std::random_device rd;
  for (;;) {
    const std::uint64_t bits = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    std::string g = fmt::format("{:016x}", bits);
    if (g != avoid) return g;
  }
}

/// "<name>.g<generation>.shard-<r>-of-<R>.h5"
std::string shard_name(const std::string& name, const std::string& generation, int r, int ranks) {
  return fmt::format("{}.g{}.shard-{}-of-{}.h5", name, generation, r, ranks);
}

/// The generation of a shard file of the master `name` ("<name>.g<16 hex>.shard-<r>-of-<R>.h5"), or
/// nothing for any other file name.
std::optional<std::string> shard_generation(const std::string& file, const std::string& name) {
  const std::string head = name + ".g";
  if (file.size() < head.size() + 16 || file.compare(0, head.size(), head) != 0) return std::nullopt;
  const std::string g = file.substr(head.size(), 16);
  if (!std::all_of(g.begin(), g.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }))
    return std::nullopt;
  const std::string tail = file.substr(head.size() + 16);  // ".shard-<r>-of-<R>.h5"
  int r = -1, ranks = -1, used = 0;
  if (std::sscanf(tail.c_str(), ".shard-%d-of-%d.h5%n", &r, &ranks, &used) != 2 ||
      used != static_cast<int>(tail.size()) || r < 0 || ranks < 1 || r >= ranks ||
      tail != fmt::format(".shard-{}-of-{}.h5", r, ranks))
    return std::nullopt;
  return g;
}

/// After a new master (or single file) is in place at dir/name: removes the shard files of this name
/// of any other generation (the previous set's, and those of writers killed before their rename),
/// and those the previous master named. Never throws: what stays behind is only disk space.
void remove_other_generations(const fs::path& dir, const std::string& name, const std::string& keep,
                              const std::optional<detail::ShardSetNames>& previous) {
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::optional<std::string> g = shard_generation(it->path().filename().string(), name);
    if (g && *g != keep) doomed.push_back(it->path());
  }
  if (previous && previous->generation != keep)
    for (const std::string& f : previous->files)
      if (f.find('/') == std::string::npos && f.find(".g" + previous->generation + ".shard-") != std::string::npos)
        doomed.push_back(dir / f);
  for (const fs::path& p : doomed) {
    std::error_code rec;
    if (fs::is_regular_file(fs::symlink_status(p, rec))) fs::remove(p, rec);
  }
}

/// The test-only fault hook (tests/test_distributed_snapshot.cpp): with MEMBANK_TEST_SHARD_SET_FAULT
/// = before_master_rename in the environment, rank 0 dies (exit status 86, no clean-up) when its
/// validated master temporary is about to be renamed over the destination, every shard written.
void fault_before_master_rename() {
  const char* fault = std::getenv("MEMBANK_TEST_SHARD_SET_FAULT");
  if (fault == nullptr || std::strcmp(fault, "before_master_rename") != 0) return;
  std::fprintf(stderr, "membank: MEMBANK_TEST_SHARD_SET_FAULT=before_master_rename: rank 0 dies before the "
               "master's rename\n");
  std::fflush(stderr);
  std::_Exit(86);
}

}  // namespace

void save_distributed_snapshot(const std::string& path, const DistributedEngine& engine,
                               const SnapshotOptions& options) {
  WireStats wire;
  const detail::Group g{engine.comm(), engine.rank(), engine.ranks(), &wire};
  fs::path dir;
  std::string name;
  std::optional<detail::ShardSetNames> previous;  // rank 0: the set the new save replaces
  std::string generation(16, '0');
  g.check([&] {
    MEMBANK_CHECK(!path.empty(), "snapshot path is empty");
    MEMBANK_CHECK(options.deflate_level >= 0 && options.deflate_level <= 9, "deflate_level = {}: expected 0..9",
                  options.deflate_level);
    const fs::path dest = fs::absolute(path);
    dir = dest.parent_path();
    name = dest.filename().string();
    MEMBANK_CHECK(!name.empty() && name != "." && name != "..", "{}: expected a file name", path);
    if (g.rank == 0) {
      previous = detail::read_shard_set_names(path);
      generation = new_generation(previous ? previous->generation : std::string());
    }
  });
  const Bank& local = engine.local_bank();
  const detail::SnapshotState state{engine.config(), engine.partition(), engine.steps_done(), engine.sampler(),
                                    engine.size(),     engine.dim(),       local.dtype()};
  const std::vector<std::int64_t>& labels = engine.labels();
  if (engine.mode() == Distributed::replicated) {
    // Every rank holds the same bank: one ordinary snapshot, written by rank 0.
    g.check([&] {
      if (g.rank == 0) detail::save_snapshot_file(path, local, state, labels, options);
    });
    g.check([&] {
      if (g.rank == 0) remove_other_generations(dir, name, std::string(), previous);
    });
    return;
  }

  detail::check_mpi(MPI_Bcast(generation.data(), 16, MPI_CHAR, 0, g.comm), "MPI_Bcast");
  const RowRange held = engine.rows();
  const fs::path mine = dir / shard_name(name, generation, g.rank, g.ranks);
  const auto remove_mine = [&] {
    std::error_code ec;
    fs::remove(mine, ec);
  };
  // 1. every rank its shard file, complete and fsynced before the master exists
  try {
    g.check([&] {
      const std::span<const std::int64_t> rows_labels =
          labels.empty() ? std::span<const std::int64_t>()
                         : std::span<const std::int64_t>(labels).subspan(static_cast<std::size_t>(held.begin),
                                                                         static_cast<std::size_t>(held.size()));
      detail::save_snapshot_shard(mine.string(), local, rows_labels, engine.steps_done(),
                                  {generation, g.rank, g.ranks, engine.size(), held.begin, held.end}, options);
    });
  } catch (...) {
    remove_mine();
    throw;
  }
  // 2. rank 0 the master, validated against every shard file, renamed over `path`
  std::exception_ptr error;
  int in_place = 0;  // the master at `path` names this generation: the shards must stay
  if (g.rank == 0) {
    try {
      std::vector<std::string> files;
      std::vector<std::pair<index_t, index_t>> rows;
      for (int r = 0; r < g.ranks; ++r) {
        files.push_back(shard_name(name, generation, r, g.ranks));
        const RowRange rr = shard_rows(engine.size(), g.ranks, r);
        rows.emplace_back(rr.begin, rr.end);
      }
      detail::save_snapshot_master(path, state, !labels.empty(), generation, files, rows, fault_before_master_rename);
    } catch (...) {
      error = std::current_exception();
    }
    const std::optional<detail::ShardSetNames> now = detail::read_shard_set_names(path);
    in_place = now && now->generation == generation;
  }
  detail::check_mpi(MPI_Bcast(&in_place, 1, MPI_INT, 0, g.comm), "MPI_Bcast");
  if (!in_place) remove_mine();
  g.agree(error);
  // 3. the new set is in place: the previous set's shard files go
  g.check([&] {
    if (g.rank == 0) remove_other_generations(dir, name, generation, previous);
  });
}

DistributedEngine load_distributed_snapshot(const std::string& path, MPI_Comm comm, Distributed mode) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MEMBANK_CHECK(initialised, "MPI is not initialised: call MPI_Init before load_distributed_snapshot");
  MEMBANK_CHECK(comm != MPI_COMM_NULL, "comm is MPI_COMM_NULL: expected a communicator");
  int rank = 0, ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  WireStats wire;
  const detail::Group g{comm, rank, ranks, &wire};
  detail::SnapshotRows part;
  g.check([&] {
    part = detail::load_snapshot_rows(path, [&](const SnapshotInfo& info) {
      if (mode == Distributed::replicated) return std::pair(index_t{0}, info.n);
      MEMBANK_CHECK(info.n >= ranks, "{}: n = {} rows for {} ranks: a sharded engine needs at least one row per rank",
                    path, info.n, ranks);
      const RowRange rr = shard_rows(info.n, ranks, rank);
      return std::pair(rr.begin, rr.end);
    });
  });
  DistributedEngine engine(comm, mode, std::move(*part.bank), part.info.n, std::move(part.sampler), part.info.config,
                           std::move(part.labels));
  engine.restore_state(part.info.partition, part.info.step);
  return engine;
}

}  // namespace membank
