#pragma once
// The pieces a snapshot is made of, written and read by snapshot.cpp (the only file that speaks
// HDF5) for distributed_snapshot.cpp, which adds the ranks. The layout of a shard set is in
// membank/distributed_snapshot.hpp and docs/snapshot-format.md. Internal.
#include <membank/snapshot.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace membank::detail {

/// The state a snapshot's root attributes (and sampler weights) record, whoever holds it: an Engine,
/// or the ranks of a DistributedEngine (n: the global N; dtype: the bank's storage type).
struct SnapshotState {
  const EngineConfig& config;
  const Partition& partition;
  std::int64_t step = 0;
  const NoiseSampler& sampler;
  index_t n = 0, dim = 0;
  DType dtype = DType::float32;
};

/// save_snapshot of a whole bank (n rows) and its state, from any holder: the same checks, the same
/// file. labels: n of them, or none.
void save_snapshot_file(const std::string& path, const Bank& bank, const SnapshotState& state,
                        std::span<const std::int64_t> labels, const SnapshotOptions& options);

/// Where one shard of a set sits: rows [begin, end) of the global bank, in shard `index` of `count`.
struct ShardPlace {
  std::string generation;  ///< the set's token: [0-9a-f]{16}
  int index = 0, count = 1;
  index_t n = 0, begin = 0, end = 0;
};

/// Writes the shard file `path` (rows [begin, end): the bank's rows, their last-update steps and,
/// when given, their labels) atomically, as save_snapshot writes a file: destination checks and
/// unit rows first, a validated temporary renamed over `path`, file and directory fsynced.
void save_snapshot_shard(const std::string& path, const Bank& rows, std::span<const std::int64_t> labels,
                         std::int64_t step, const ShardPlace& place, const SnapshotOptions& options);

/// Writes the master file `path` of a shard set atomically: the root attributes of `state`, the
/// attributes shards and generation, the sampler weights (alias), and the virtual datasets bank,
/// last_update and (has_labels) labels mapping the shard files `files` (names in the master's
/// directory, in shard order, rows given by shard_rows(state.n, files.size(), r)). The temporary is
/// validated as load reads a master: every shard file present, of this generation, complete.
/// `before_rename` (may be empty) runs when the validated temporary is about to replace `path`.
void save_snapshot_master(const std::string& path, const SnapshotState& state, bool has_labels,
                          const std::string& generation, const std::vector<std::string>& files,
                          const std::vector<std::pair<index_t, index_t>>& rows,
                          const std::function<void()>& before_rename);

/// The shard files (names in its directory) and the generation of the shard set whose master is
/// `path`; nothing when `path` is absent, unreadable or a single-file snapshot. Never throws.
struct ShardSetNames {
  std::string generation;
  std::vector<std::string> files;
};
std::optional<ShardSetNames> read_shard_set_names(const std::string& path);

/// Rows [begin, end) of a snapshot (single file or master of a shard set), everything validated as
/// load_snapshot validates it: the bank's rows, their last-update steps, the sampler (all N rows)
/// and the labels (all N, or none). `rows` chooses the range once the metadata is read.
struct SnapshotRows {
  SnapshotInfo info;
  std::optional<Bank> bank;
  std::unique_ptr<NoiseSampler> sampler;
  std::vector<std::int64_t> labels;
};
SnapshotRows load_snapshot_rows(const std::string& path,
                                const std::function<std::pair<index_t, index_t>(const SnapshotInfo&)>& rows);

}  // namespace membank::detail
