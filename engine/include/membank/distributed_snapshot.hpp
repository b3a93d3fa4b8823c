#pragma once
// Snapshots of a DistributedEngine (docs/snapshot-format.md, "Shard sets"): saved by R ranks, loaded
// by any number of ranks, in either mode, or by the single-process load_snapshot.
//
// Sharded mode writes a shard set: every rank r writes its rows (bank, last_update, labels) to the
// shard file "<name>.g<generation>.shard-<r>-of-<R>.h5" in the directory of `path` (= <dir>/<name>),
// then rank 0 writes the master `path`: the root attributes of a format-3 snapshot, the attributes
// shards (R) and generation (the 16-hex-digit token every shard file of the set carries in its name
// and attributes), the sampler's weights (alias), and HDF5 virtual datasets bank (N, D), last_update
// (N) and labels (N) mapping the shards' rows by relative file names: h5py and h5dump read
// master['bank'] as one (N, D) array with no plugin, from any working directory, and the set moves
// as a directory. Every file is written as save_snapshot writes one (a validated temporary, fsynced,
// renamed, the directory fsynced); the master is written only once every shard file is complete,
// and its temporary is validated against them (present, of its generation, complete): a master
// never names a shard of another generation, and a writer killed at any moment leaves the previous
// set (or single file) loadable as it was. The previous set's shard files, and shard files of this
// name left by killed writers, are removed only after the new master's rename.
// Replicated mode writes one ordinary single-file snapshot from rank 0 (every rank holds the same
// bank); a shard set previously at `path` is removed the same way.
//
// The directory must be one file system that every rank sees (rank 0 validates the shards it did
// not write: a rank-local directory fails with an error naming the missing shard).
//
// Errors: every function here is collective (all ranks of the engine's communicator, or of `comm`,
// call it with the same arguments). A failure on any rank makes every rank throw the same
// membank::Error naming the first failing rank and the problem; nothing half-written is visible (a
// failed save removes its shard files; the previous master is untouched).
//
// Thread safety: as save_snapshot / load_snapshot (HDF5 is not thread-safe).
#include <membank/distributed.hpp>
#include <membank/snapshot.hpp>

#include <mpi.h>

#include <string>

namespace membank {

/// Collective. Save the engine's whole state to `path` (a shard set in sharded mode, a single file in
/// replicated mode), atomically as a set. The engine's labels, if it holds any, are saved with it.
/// options.deflate_level applies to the rows (shard files or the single file).
/// Throws Error on every rank as save_snapshot does (destination, free space, a row that is not unit
/// norm), naming the rank.
void save_distributed_snapshot(const std::string& path, const DistributedEngine& engine,
                               const SnapshotOptions& options = {});

/// Collective. Load a snapshot -- a shard set written by any number of ranks, or a single-file
/// snapshot -- into a DistributedEngine over `comm` in `mode`: rank r reads rows
/// shard_rows(N, R, r) (sharded) or all rows (replicated) and the engine continues bit for bit where
/// the saved one stopped (step counter, Z, bank, last-update steps, sampler, configuration, labels).
/// Everything is validated as load_snapshot validates it. Throws Error on every rank naming the
/// rank, the file and the problem (also when N < R in sharded mode).
DistributedEngine load_distributed_snapshot(const std::string& path, MPI_Comm comm, Distributed mode);

}  // namespace membank
