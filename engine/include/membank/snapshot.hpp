#pragma once
// Snapshot: the whole engine state in one HDF5 file that h5py and h5dump read with no plugin.
//
// Layout (format "membank-snapshot", version 3):
//   /bank         (N, D), row-major, chunked by whole rows (~1 MiB a chunk), fletcher32, optional
//                 shuffle + deflate; its HDF5 type follows the bank's DType: float32 is IEEE float32;
//                 float16 is IEEE binary16 (an HDF5 float type of 2 bytes, read by h5py as numpy
//                 float16); bfloat16 is its 16-bit words (H5T_STD_U16LE: no tool knows a bfloat16
//                 float type). The dataset's string attribute `dtype` names the type (always written;
//                 required for bfloat16).
//   /last_update  int64 (N): the step at which each row was last written (-1: never)
//   /sampler_weights  float64 (N), alias and dynamic samplers: the weights as the sampler holds them
//                 (a dynamic sampler's current ones: rebuilding from them is bit-identical)
//   /sampler_ema  float64 (N), dynamic sampler with the loss_ema drive: the per-row loss average
//                 (NaN: a row never seen); its drive, alpha and floor are the root attributes
//                 sampler_drive, sampler_alpha, sampler_floor (dynamic only)
//   /labels       int64 (N), optional per-instance labels
//   root attributes: format, format_version, kind ("engine"; absent in older files), engine_version,
//   n, dim, step, seed, k, tau, momentum, objective, negatives, exclude_positive, z_policy, z_fixed,
//   z_ema, z_initialised, log_z, sampler,
//   normalize_features, unit_norm_tolerance; since version 2 also the objectives' parameters
//   tau_plus, beta, detach_weights, kernel_t, gamma, margin (the effective one) and
//   exclude_same_label (a version 1 file reads with their defaults); since version 3 also dtype (the
//   bank's storage type: "float32", "float16", "bfloat16") and rounding ("nearest", "stochastic":
//   EngineConfig::rounding). A version 1 or 2 file reads as a float32 bank with nearest rounding.
//   2-byte rows are stored as they are in memory (bit for bit) and loaded with
//   Bank::from_raw_blocks: a resumed engine of any type continues bit for bit.
//   A shard set's master (membank/distributed_snapshot.hpp: a sharded DistributedEngine's snapshot)
//   has the same attributes plus `shards` and `generation`, and /bank, /last_update, /labels as HDF5
//   virtual datasets over its shard files; read_snapshot_info, load_snapshot and verify_snapshot read
//   it as a single file, after checking that every shard file is present, complete and of its
//   generation (docs/snapshot-format.md, "Shard sets").
//
// Saving first checks the destination (directory exists and is writable, free space and the
// file-size limit hold the estimated size) and that every bank row is finite and unit norm; only then
// it writes a temporary file in the destination's directory, reads it back and validates it, fsyncs
// it, renames it over the destination and fsyncs the directory: a writer killed at any moment leaves
// the previous snapshot as it was. The temporary is named ".<name>.tmp-<pid>-h<host>-b<boot>-<random>";
// one left by a killed writer is removed by the next save in that directory once its writer is gone
// (same host, and an earlier boot or no live process with that pid); temporaries of live processes
// and of other hosts are never touched. A save that fails inside HDF5 (disk full, I/O error) closes
// every HDF5 object of its file and throws: the process can go on, or exit normally. Loading validates format, version, ranks, dtypes,
// shapes against the attributes, storage against the claimed sizes, and every row (finite, unit
// norm) before it hands anything back; failures throw membank::Error naming the file and the
// problem. A row is unit norm within 1e-4 for a float32 bank, within
// max(1e-4, row_norm_tolerance(dtype)) for the 2-byte types (the rounding of each element). Peak
// memory of save and load is the bank plus one chunk.
//
// Kinds. A snapshot holds one of three things, named by the root attribute `kind`: an Engine
// ("engine"; files without the attribute are engine snapshots), a Queue ("queue": its ring of keys,
// per-slot ids, labels and flags, ring position, keys enqueued, step counter and configuration) or a
// MultiViewEngine ("multiview": V banks, one group view_<v> each, the shared sampler, labels,
// configuration and step counter, the view graph and every pair's Z state). Queue and multi-view
// snapshots are format version 4 (an earlier membank refuses them by their version); engine
// snapshots are still written as version 3. Each loader refuses the other kinds with one Error
// ("expected a queue snapshot, found a multiview snapshot"); read_snapshot_kind tells them apart and
// verify_snapshot checks any of them. The new kinds are written and validated as an engine snapshot
// is: the same destination checks, temporary, fsync and rename, the same storage of the rows
// (docs/snapshot-format.md, "Queue snapshots" and "Multi-view snapshots").
//
// Thread safety: HDF5 (serial build) is not thread-safe; do not call these concurrently.
#include <membank/engine.hpp>
#include <membank/multiview.hpp>
#include <membank/queue.hpp>

#include <optional>
#include <string>
#include <vector>

namespace membank {

struct SnapshotOptions {
  int deflate_level = 0;  ///< 0: no compression; 1..9: shuffle + deflate at that level
};

/// Metadata of a snapshot (attributes and dataset shapes; no rows read).
struct SnapshotInfo {
  std::string format;
  int format_version = 0;
  std::string engine_version;
  index_t n = 0, dim = 0;
  DType dtype = DType::float32;  ///< the bank's storage type (float32 for files before version 3)
  std::int64_t step = 0;
  EngineConfig config;  ///< config.rounding: nearest for files before version 3
  Partition partition;
  SamplerKind sampler = SamplerKind::uniform;
  DynamicSampler::Params sampler_params;  ///< a dynamic sampler's drive, alpha and floor (else the defaults)
  bool has_labels = false;
  index_t rows_per_chunk = 0;  ///< a shard set: the rows a load reads at a time
  bool compressed = false;
  int shards = 0;          ///< a shard set's master: its shard count (0: a single file)
  std::string generation;  ///< a shard set's master: the token its shard files carry
};

/// Upper estimate of the bytes of a snapshot of an n x dim bank of `dtype` (uncompressed, labels
/// included).
std::uint64_t snapshot_size_estimate(index_t n, index_t dim, DType dtype = DType::float32);

/// Check, writing nothing, that a snapshot of an n x dim bank can be saved at `path`: its directory
/// exists and is writable, `path` is not a directory, and the free space and the file-size limit
/// (RLIMIT_FSIZE) hold snapshot_size_estimate(n, dim, dtype). Throws Error naming the path,
/// ResourceError when space or the size limit is short. save_snapshot runs it first; a long job runs
/// it before it starts.
void check_snapshot_destination(const std::string& path, index_t n, index_t dim, DType dtype = DType::float32);

/// Save the engine's whole state (and optional labels, length N; by default the engine's own labels,
/// if it holds any) to `path`, atomically.
/// Throws Error (the destination untouched, nothing created) if the destination fails
/// check_snapshot_destination (ResourceError: not enough space), labels have the wrong length, or a
/// bank row is not finite and unit norm (|norm - 1| > 1e-4, or the 2-byte type's tolerance); throws
/// Error (the destination untouched, the temporary removed) if a write fails or the written file
/// does not validate.
void save_snapshot(const std::string& path, const Engine& engine, const SnapshotOptions& options = {},
                   std::span<const std::int64_t> labels = {});

/// Read and validate the metadata only (cheap). Throws Error naming the file and the problem (a queue
/// or multi-view snapshot included: read_snapshot_kind tells the kinds apart).
SnapshotInfo read_snapshot_info(const std::string& path);

/// Load a snapshot into a new Engine that continues exactly where the saved one stopped (same
/// step counter, Z, bank, sampler, configuration, labels: the engine holds the file's labels, and
/// they also go to *labels when asked), with a bank of the saved type. Reads format versions 1 to 3;
/// a queue or multi-view snapshot is refused with one Error naming its kind.
/// Throws Error naming the file and the problem; nothing is allocated for the bank before the
/// metadata and storage sizes validate.
Engine load_snapshot(const std::string& path, std::vector<std::int64_t>* labels = nullptr);

/// Import a plain (N, D) dataset written by another tool (e.g. h5py) as a bank of `dtype`,
/// renormalising its rows. The dataset holds float16, float32 or float64 (any HDF5 float type of 2, 4
/// or 8 bytes), or bfloat16 words as a membank snapshot or export stores them (uint16 with the
/// attribute dtype = "bfloat16"; any other `dtype` attribute of another tool's file is ignored).
/// `renormalised` receives how many rows were not unit norm
/// (|‖v‖-1| > 1e-5, in fp32); a 2-byte bank then rounds each row to nearest.
/// Throws Error on a missing dataset, wrong rank or dtype, NaN/Inf or zero rows.
Bank import_bank(const std::string& path, const std::string& dataset = "bank", index_t* renormalised = nullptr,
                 DType dtype = DType::float32);

/// Write the bank's rows as a plain (N, D) dataset `dataset` (a path: its groups are created) of type
/// `dtype` in a new HDF5 file at `path`, for tools that want plain arrays: float32 holds the rows
/// widened exactly; float16 and bfloat16 the widened rows rounded to nearest (the same type as the
/// bank's: its bits). Stored as a snapshot's /bank is (chunked by rows, fletcher32, the `dtype`
/// attribute); no other dataset. The rows are not renormalised (import_bank does that). Written
/// atomically, like save_snapshot (the same destination checks; the destination untouched on
/// failure). Peak memory: the bank, and its converted copy when `dtype` is not the bank's type.
/// Throws Error on an empty or invalid dataset name.
void export_bank(const std::string& path, const Bank& bank, DType dtype = DType::float32,
                 const std::string& dataset = "bank");

/// Full check of a snapshot of any kind (metadata, checksums, every row: the whole load of its
/// kind); returns the problems found (empty: ok).
std::vector<std::string> verify_snapshot(const std::string& path);

// ---- kinds: queue and multi-view snapshots ------------------------------------------------------

/// What a snapshot holds (its root attribute `kind`).
enum class SnapshotKind { engine, queue, multiview };
/// "engine", "queue" or "multiview".
std::string to_string(SnapshotKind kind);
/// Parse the names printed by to_string; throw Error naming the value and the choices otherwise.
SnapshotKind snapshot_kind_from_string(const std::string& s);

/// The kind of the snapshot at `path` (engine for a file without the attribute), after checking its
/// format, format version and kind (a version the kind was never written with is refused). Reads
/// nothing else. Throws Error naming the file and the problem.
SnapshotKind read_snapshot_kind(const std::string& path);

/// Metadata of a queue snapshot (attributes and dataset shapes; no keys read).
struct QueueSnapshotInfo {
  std::string format;
  int format_version = 0;
  std::string engine_version;
  index_t capacity = 0, dim = 0;  ///< Q and D
  DType dtype = DType::float32;   ///< the keys' storage type
  std::int64_t step = 0;          ///< Queue::steps_done()
  index_t position = 0;           ///< Queue::position()
  std::int64_t enqueued = 0;      ///< Queue::enqueued()
  EngineConfig config;            ///< the queue's whole configuration, as Queue::config() held it
  index_t rows_per_chunk = 0;
  bool compressed = false;
};

/// Save the queue's whole state (Queue::State and its configuration) to `path`, atomically and with
/// the checks of save_snapshot (destination, every key finite and unit norm within its type's
/// tolerance, every slot's last-update step in [-1, steps_done()]; the destination untouched on any
/// failure).
void save_snapshot(const std::string& path, const Queue& queue, const SnapshotOptions& options = {});

/// Read and validate a queue snapshot's metadata. Throws Error naming the file and the problem (an
/// engine or multi-view snapshot included).
QueueSnapshotInfo read_queue_snapshot_info(const std::string& path);

/// Load a queue snapshot into a new Queue that continues exactly where the saved one stopped: the
/// same keys (bit for bit, of the saved type) and their last-update steps, ids, labels, flags,
/// position, enqueued count, step counter and configuration. Everything is validated before the
/// queue is built (as Queue::restore validates a state, and every key as a snapshot's rows are);
/// throws Error naming the file and the problem, and returns nothing half-built.
Queue load_queue_snapshot(const std::string& path);

/// Metadata of a multi-view snapshot (attributes, dataset shapes and the pairs' Z states; no rows
/// read).
struct MultiViewSnapshotInfo {
  std::string format;
  int format_version = 0;
  std::string engine_version;
  index_t views = 0, n = 0, dim = 0;
  std::vector<DType> dtypes;  ///< each view's bank type
  std::int64_t step = 0;
  EngineConfig config;
  ViewGraph graph = ViewGraph::full;
  std::vector<ViewPair> pairs;           ///< view_pairs(graph, views), as stored
  std::vector<Partition> partitions;     ///< each pair's Z state, in the order of pairs
  SamplerKind sampler = SamplerKind::uniform;
  DynamicSampler::Params sampler_params;  ///< a dynamic sampler's drive, alpha and floor
  bool has_labels = false;
  bool compressed = false;
};

/// Save the multi-view engine's whole state (every bank with its last-update steps, the sampler,
/// labels, configuration, view graph, every pair's Z state, the step counter) to `path`, atomically
/// and with the checks of save_snapshot (every bank's rows).
void save_snapshot(const std::string& path, const MultiViewEngine& engine, const SnapshotOptions& options = {});

/// Read and validate a multi-view snapshot's metadata. Throws Error naming the file and the problem.
MultiViewSnapshotInfo read_multiview_snapshot_info(const std::string& path);

/// Load a multi-view snapshot into a new MultiViewEngine that continues exactly where the saved one
/// stopped (banks bit for bit, each of its saved type, last-update steps, sampler, labels, config,
/// graph, Z states, step counter). Throws Error naming the file and the problem; nothing is returned
/// half-built.
MultiViewEngine load_multiview_snapshot(const std::string& path);

}  // namespace membank
