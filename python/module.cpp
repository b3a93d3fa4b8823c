// membank._membank: the Python face of the engine (pybind11).
//
// Arrays: numpy in and out without copies. Every array argument must already have the dtype and
// layout the engine reads (float32 features with contiguous rows, int64 ids ...); anything else is
// refused with a TypeError / ValueError that says what to pass instead -- never converted behind
// the caller's back (a silent copy of an `out=` array would lose the write). Engine errors
// (membank::Error) become membank.Error, a subclass of ValueError, with the engine's message;
// membank::OutOfMemory (a request that does not fit in memory, or a failed allocation) becomes
// MemoryError with the engine's message (bytes needed and available).
//
// Aliasing: inputs may share memory with each other and with the bank (features = rows of
// bank.view() is fine); `out=` may share memory with nothing it is passed with, nor with the bank:
// membank.Error naming both (checked here on the whole arrays, then again by the engine).
//
// Threads: the GIL is released for all C++ work; each Engine (and each stand-alone Bank) has its
// own mutex, so two Python threads may share one safely (their calls run one after the other).
// Ctrl-C: knn_search and knn_evaluate pass the engine a CancelHook (signal_hook) that, between bank
// tiles, takes the GIL back and runs Python's signal handlers (main thread only, at most every 100 ms);
// a KeyboardInterrupt stops the search (nothing written) and is raised. DistributedEngine.knn_search
// too: one rank's KeyboardInterrupt stops every rank, the others raising membank.Error (cancelled on
// another rank). full_softmax_loss checks for signals between query blocks (its `out` then holds a
// partial result). A single engine step or a snapshot save/load runs to its end first.
//
// MPI (MEMBANK_PYTHON_MPI, set when the build has MEMBANK_MPI): membank.DistributedEngine, the
// distributed engine over an mpi4py communicator (its C handle read at run time through
// MPI._handleof: no build dependency on mpi4py). Every collective call first agrees, over a duplicate
// of the caller's communicator, on whether each rank's arguments converted: a refused argument raises
// on every rank instead of leaving the others waiting in the engine's collectives. Snapshots of a
// DistributedEngine (save_snapshot(path, dist), load_snapshot(path, comm=...)) are collective too, and
// also agree that every rank passed the same path and options.
// membank.DistributedQueue and membank.DistributedInBatch (distributed_memories.hpp) follow the same
// pattern (membank.Queue(..., comm=) / membank.InBatch(..., comm=) make them: membank/__init__.py).
//
// membank.MultiViewEngine (multiview.hpp, CMC): V banks, view v's seeded as Bank(n, dim, seed + v), or
// copied from banks=; step takes and returns lists of V arrays.
#include <membank/bank.hpp>
#ifdef MEMBANK_PYTHON_MPI
#include <membank/distributed.hpp>
#include <membank/distributed_memories.hpp>
#include <membank/distributed_snapshot.hpp>
#include <membank/dynamic_sampler.hpp>
#endif
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/in_batch.hpp>
#include <membank/knn.hpp>
#include <membank/memory.hpp>
#include <membank/multiview.hpp>
#include <membank/queue.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/cluster_sampler.hpp>
#include <membank/sampler.hpp>
#include <membank/snapshot.hpp>
#include <membank/threads.hpp>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <exception>
#include <optional>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace py = pybind11;
using namespace membank;

namespace {

// ---------------------------------------------------------------------------------------------
// array checks: refuse, with the fix in the message; never convert

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}
std::string strides_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.strides(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}
std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

/// A file path argument: a str (or bytes), as a std::string; TypeError otherwise.
std::string path_arg(py::handle path, const char* who) {
  if (!py::isinstance<py::str>(path) && !py::isinstance<py::bytes>(path))
    throw py::type_error(fmt::format("{}: path must be a str; got {}", who, type_name(path)));
  return path.cast<std::string>();
}

/// An int argument (an int or anything with __index__); TypeError otherwise.
int int_arg(py::handle value, const char* who, const char* name) {
  try {
    return value.cast<int>();
  } catch (py::cast_error&) {
    throw py::type_error(fmt::format("{}: {} must be an int; got {}", who, name, type_name(value)));
  }
}

py::array require_ndarray(py::handle obj, const char* arg, const char* want) {
  if (!py::isinstance<py::array>(obj)) {
    const std::string t = type_name(obj);
    const std::string hint = t == "Tensor" ? fmt::format("pass {}.detach().cpu().numpy()", arg)
                                           : fmt::format("pass np.asarray({}, dtype=...)", arg);
    throw py::type_error(fmt::format("{} must be a numpy.ndarray ({}); got {}: {}", arg, want, t, hint));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

template <class T>
void require_dtype(const py::array& a, const char* arg, const char* want, const char* np_name) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(fmt::format("{} must be {}; got dtype {}: pass {}.astype(np.{})", arg, want,
                                     std::string(py::str(a.dtype())), arg, np_name));
}

void require_aligned(const py::array& a, const char* arg, std::size_t align) {
  if (reinterpret_cast<std::uintptr_t>(a.data()) % align != 0)
    throw py::value_error(fmt::format("{} is not aligned to its element size: pass np.ascontiguousarray({}) "
                                      "(a fresh, aligned array)", arg, arg));
}

/// A 2-D array of T whose rows are contiguous (inner stride = one element; any outer stride that is a
/// whole number of elements, >= 0): what the engine's Eigen::Ref with OuterStride reads without a copy.
template <class T>
struct Matrix2 {
  py::array arr;
  T* data = nullptr;
  index_t rows = 0, cols = 0, stride = 0;  // stride in elements
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const Mat, 0, Eigen::OuterStride<>> cmap() const { return {data, rows, cols, Eigen::OuterStride<>(stride)}; }
  Eigen::Map<Mat, 0, Eigen::OuterStride<>> map() const { return {data, rows, cols, Eigen::OuterStride<>(stride)}; }
};

template <class T>
Matrix2<T> matrix_arg(py::handle obj, const char* arg, const char* np_name, const char* shape_name,
                      bool writable = false) {
  const std::string want = fmt::format("a {} {} array with contiguous rows", np_name, shape_name);
  py::array a = require_ndarray(obj, arg, want.c_str());
  require_dtype<T>(a, arg, want.c_str(), np_name);
  if (a.ndim() != 2)
    throw py::value_error(fmt::format("{} must be 2-D {}; got shape {}{}", arg, shape_name, shape_str(a),
                                      a.ndim() == 1 ? fmt::format(": pass {}[None, :] for a single row", arg) : ""));
  const auto es = static_cast<py::ssize_t>(sizeof(T));
  // An array without elements has no layout to check (numpy gives a fresh (0, D) array strides (0, 0)).
  const bool empty = a.shape(0) == 0 || a.shape(1) == 0;
  const bool rows_ok = empty || a.shape(1) <= 1 || a.strides(1) == es;
  const bool outer_ok = empty || a.shape(0) <= 1 ||
                        (a.strides(0) >= 0 && a.strides(0) % es == 0 && a.strides(0) >= a.shape(1) * es);
  if (!rows_ok || !outer_ok)
    throw py::value_error(fmt::format("{} must have contiguous rows (C order); got shape {} with strides {}: pass "
                                      "np.ascontiguousarray({}){}", arg, shape_str(a), strides_str(a), arg,
                                      writable ? " and read the result from the returned array" : ""));
  require_aligned(a, arg, sizeof(T));
  if (writable && !a.writeable())
    throw py::value_error(fmt::format("{} is read-only: pass a writable {} array (e.g. np.empty(shape, np.{}))", arg,
                                      np_name, np_name));
  Matrix2<T> m;
  m.data = static_cast<T*>(const_cast<void*>(a.data()));
  m.rows = a.shape(0);
  m.cols = a.shape(1);
  m.stride = a.shape(0) <= 1 ? std::max<index_t>(m.cols, 1) : a.strides(0) / es;
  if (m.stride == 0) m.stride = std::max<index_t>(m.cols, 1);
  m.arr = std::move(a);
  return m;
}

template <class T>
struct Vector1 {
  py::array arr;
  const T* data = nullptr;
  index_t size = 0;
  std::span<const T> span() const { return {data, static_cast<std::size_t>(size)}; }
};

template <class T>
Vector1<T> vector_arg(py::handle obj, const char* arg, const char* np_name, const char* shape_name) {
  const std::string want = fmt::format("a contiguous {} {} array", np_name, shape_name);
  py::array a = require_ndarray(obj, arg, want.c_str());
  require_dtype<T>(a, arg, want.c_str(), np_name);
  if (a.ndim() != 1)
    throw py::value_error(fmt::format("{} must be 1-D {}; got shape {}: pass {}.reshape(-1)", arg, shape_name,
                                      shape_str(a), arg));
  if (a.shape(0) > 1 && a.strides(0) != static_cast<py::ssize_t>(sizeof(T)))
    throw py::value_error(fmt::format("{} must be contiguous; got stride {} bytes: pass np.ascontiguousarray({})", arg,
                                      a.strides(0), arg));
  require_aligned(a, arg, sizeof(T));
  Vector1<T> v;
  v.data = static_cast<const T*>(a.data());
  v.size = a.shape(0);
  v.arr = std::move(a);
  return v;
}

/// A fresh numpy array that owns an Eigen matrix (moved in, no copy).
template <class Mat>
py::array to_numpy(Mat&& m) {
  using T = typename std::decay_t<Mat>::Scalar;
  auto* heap = new std::decay_t<Mat>(std::move(m));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::decay_t<Mat>*>(p); });
  return py::array_t<T>({heap->rows(), heap->cols()},
                        {static_cast<py::ssize_t>(sizeof(T)) * heap->cols(), static_cast<py::ssize_t>(sizeof(T))},
                        heap->data(), owner);
}
template <class T>
py::array to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))}, heap->data(),
                        owner);
}

template <class T>
MemoryRegion region_of(const Matrix2<T>& m) {
  const auto es = static_cast<std::int64_t>(sizeof(T));
  return {m.data, m.rows, m.cols * es, m.stride * es};
}
template <class T>
MemoryRegion region_of(const Vector1<T>& v) {
  return MemoryRegion::contiguous(v.data, v.size * static_cast<std::int64_t>(sizeof(T)));
}

/// An input array and its argument name, for the `out=` overlap check.
struct NamedRegion {
  MemoryRegion region;
  const char* name;
};

/// The caller's `out` may share no memory with the inputs of the call, with itself, nor with the bank.
void check_out_alone(const Matrix2<float>& out, std::span<const NamedRegion> inputs, const Bank& bank) {
  const MemoryRegion o = region_of(out);
  check_no_self_overlap(o, "out");
  for (const NamedRegion& in : inputs) check_no_overlap(o, "out", in.region, in.name);
  bank.check_no_overlap(o, "out");
}

/// The gradient buffer: the caller's `out` (checked, written in place) or a fresh (B, D) array.
/// `name`: the argument's name in messages ("out"; "out_a" / "out_b" for InBatch.step).
Matrix2<float> grad_buffer(py::object out, index_t rows, index_t cols, const char* name = "out") {
  if (out.is_none()) return matrix_arg<float>(py::array_t<float>({rows, cols}), name, "float32", "(B, D)", true);
  Matrix2<float> g = matrix_arg<float>(out, name, "float32", "(B, D)", true);
  if (g.rows != rows || g.cols != cols)
    throw py::value_error(fmt::format("{} has shape {}: expected ({}, {}) (B, D)", name, shape_str(g.arr), rows, cols));
  return g;
}

/// Between independent parts of a long call (GIL held): let Python run a pending signal handler, so
/// that Ctrl-C raises KeyboardInterrupt here.
void check_signals() {
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

/// Inside one long engine call made with the GIL released (kNN): the engine's CancelHook, called on this
/// thread between its tiles. It takes the GIL back and lets Python run its signal handlers, at most every
/// kSignalPoll: while another Python thread computes, each wait for the GIL costs up to the switch interval
/// (5 ms): asking after every tile slowed a search by about a fifth here (2 cores, a busy Python thread).
/// True (stop) once a handler raised (Ctrl-C: KeyboardInterrupt), and from then on. Empty off the main
/// thread: Python runs signal handlers there only (PyErr_CheckSignals does nothing elsewhere). Call with
/// the GIL held. A handler runs while the call holds the bank's lock: one that calls membank on the same
/// bank or engine would wait for itself.
constexpr std::chrono::milliseconds kSignalPoll{100};
CancelHook signal_hook() {
  const py::object main = py::module_::import("threading").attr("main_thread")();
  if (main.attr("ident").cast<unsigned long>() != PyThread_get_thread_ident()) return {};
  return [last = std::chrono::steady_clock::now(), raised = false]() mutable {
    if (raised) return true;
    const auto now = std::chrono::steady_clock::now();
    if (now - last < kSignalPoll) return false;
    last = now;
    py::gil_scoped_acquire gil;
    raised = PyErr_CheckSignals() != 0;
    return raised;
  };
}

/// f(hook) for an engine call that takes a CancelHook (call with the GIL held; f releases it): the
/// engine's Cancelled becomes the Python exception the signal handler raised (KeyboardInterrupt).
template <class F>
auto with_signal_hook(F&& f) {
  const CancelHook hook = signal_hook();
  try {
    return f(hook);
  } catch (const Cancelled&) {
    if (PyErr_Occurred() != nullptr) throw py::error_already_set();
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// owners: an Engine (with its mutex) and a Bank that is stand-alone or lives inside an Engine

/// What owns a bank handed to an engine: the single-process Engine, or a DistributedEngine (its rank's
/// rows). Calls on the bank take the owner's mutex.
struct BankOwner {
  std::mutex mu;
  virtual ~BankOwner() = default;
  virtual const Bank& owned_bank() const = 0;
  /// Empty when the bank is the whole N rows; otherwise why whole-bank calls (kNN, full softmax)
  /// refuse it (a rank's shard of a sharded DistributedEngine).
  virtual std::string partial() const { return {}; }
  /// "an Engine", "a DistributedEngine (rank r of R, rows [b, e) of N)": for messages and repr.
  virtual std::string owner_name() const = 0;
};

struct PyEngine final : BankOwner {
  std::unique_ptr<Engine> engine;
  const Bank& owned_bank() const override { return engine->bank(); }
  std::string owner_name() const override { return "an Engine"; }
};

struct BankState {
  std::unique_ptr<Bank> owned;        ///< a stand-alone bank
  std::shared_ptr<BankOwner> in;      ///< set once the bank was handed to an engine
  std::mutex mu;                      ///< guards a stand-alone bank's update
  const Bank& get() const { return in ? in->owned_bank() : *owned; }
};

struct PyBank {
  std::shared_ptr<BankState> s;
};

struct PySampler {
  std::shared_ptr<const NoiseSampler> s;
};

std::mutex& hdf5_mutex() {  // HDF5 (serial build) is not thread-safe
  static std::mutex m;
  return m;
}

/// Run f on the bank with its owner's lock held and the GIL released (call with the GIL held).
template <class F>
auto with_bank(const PyBank& b, F&& f) {
  const std::shared_ptr<BankOwner> in = b.s->in;  // read under the GIL: Engine(bank) sets it under the GIL
  py::gil_scoped_release nogil;
  std::lock_guard lk(in ? in->mu : b.s->mu);
  return f(in ? in->owned_bank() : *b.s->owned);
}

/// The numpy dtype of the bank's stored elements: float32, float16 (numpy's float16 is IEEE binary16,
/// the bank's fp16 layout), and for bfloat16, which numpy lacks, the raw uint16 words (each the upper
/// half of an fp32: (w.astype(np.uint32) << 16).view(np.float32) widens them exactly).
py::dtype storage_dtype(DType t) {
  switch (t) {
    case DType::float16: return py::dtype("float16");
    case DType::bfloat16: return py::dtype::of<std::uint16_t>();
    case DType::float32: break;
  }
  return py::dtype::of<float>();
}

/// kNN and the exact full softmax read all N rows, with global ids and labels: a rank's shard of a
/// sharded DistributedEngine is refused (it would give a wrong answer, not an error, otherwise).
void require_whole_bank(const PyBank& b, const char* call) {
  if (!b.s->in) return;
  const std::string why = b.s->in->partial();
  if (!why.empty()) throw Error(fmt::format("{}: {}", call, why));
}

py::array bank_view(const PyBank& b) {
  const BankView v = b.s->get().view();
  // The capsule keeps the bank's owner (the state, hence the engine) alive as long as the array.
  auto* keep = new std::shared_ptr<BankState>(b.s);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<BankState>*>(p); });
  const auto es = static_cast<py::ssize_t>(dtype_bytes(v.dtype));
  py::array a(storage_dtype(v.dtype), {v.rows, v.dim}, {es * v.stride, es}, v.data, owner);
  a.attr("setflags")(py::arg("write") = false);
  return a;
}

/// dtype= of a bank: a name dtype_from_string reads ("float32", "float16", "bfloat16", "fp16" ...), or
/// for convenience numpy's float32 / float16 (a type or a dtype). Anything else: membank.Error naming it.
DType dtype_arg(py::handle obj) {
  if (py::isinstance<py::str>(obj)) return dtype_from_string(obj.cast<std::string>());
  if (!obj.is_none()) {
    py::dtype d;
    try {
      d = py::dtype::from_args(py::reinterpret_borrow<py::object>(obj));
    } catch (py::error_already_set&) {  // not a dtype at all: the message below names it
    }
    if (d && d.equal(py::dtype::of<float>())) return DType::float32;
    if (d && d.equal(py::dtype("float16"))) return DType::float16;
  }
  throw Error(fmt::format("dtype = {}: expected float32, float16 or bfloat16 (a name, or np.float32 / np.float16)",
                          std::string(py::repr(obj))));
}

std::string normalise_name(std::string s) {
  std::replace(s.begin(), s.end(), '_', '-');
  return s;
}
Objective objective_arg(const std::string& s) {
  if (s == "info_nce" || s == "info-nce") return Objective::info_nce;
  if (s == "full_softmax" || s == "full-softmax") return Objective::full_softmax;
  return objective_from_string(s);
}

std::unique_ptr<NoiseSampler> copy_sampler(const NoiseSampler& s) {
  if (s.kind() == SamplerKind::alias) return std::make_unique<AliasSampler>(static_cast<const AliasSampler&>(s));
  if (s.kind() == SamplerKind::cluster)
    return std::make_unique<ClusterSampler>(static_cast<const ClusterSampler&>(s));
  if (s.kind() == SamplerKind::dynamic) return std::make_unique<DynamicSampler>(static_cast<const DynamicSampler&>(s));
  if (s.kind() == SamplerKind::ring) return std::make_unique<RingSampler>(static_cast<const RingSampler&>(s));
  return std::make_unique<UniformSampler>(s.size());
}

py::dict config_dict(const EngineConfig& c) {
  py::dict d;
  d["k"] = c.k;
  d["tau"] = c.tau;
  d["momentum"] = c.momentum;
  d["objective"] = to_string(c.objective);
  d["negatives"] = to_string(c.negatives);
  d["exclude_positive"] = c.exclude_positive;
  d["z_policy"] = to_string(c.z_policy);
  d["z_fixed"] = c.z_fixed;
  d["z_ema"] = c.z_ema;
  d["seed"] = c.seed;
  d["normalize_features"] = c.normalize_features;
  d["unit_norm_tolerance"] = c.unit_norm_tolerance;
  d["tau_plus"] = c.tau_plus;
  d["beta"] = c.beta;
  d["detach_weights"] = c.detach_weights;
  d["kernel_t"] = c.kernel_t;
  d["gamma"] = c.gamma;
  d["margin"] = c.effective_margin();
  d["exclude_same_label"] = c.exclude_same_label;
  d["rounding"] = to_string(c.rounding);
  d["allow_biased_sampler"] = c.allow_biased_sampler;
  return d;
}

/// The `labels=` argument: an int64 (N,) array, or None (no labels).
std::vector<std::int64_t> labels_arg(py::handle labels) {
  if (labels.is_none()) return {};
  const auto l = vector_arg<std::int64_t>(labels, "labels", "int64", "(N,)");
  return {l.span().begin(), l.span().end()};
}

/// The `sampler=` argument: a copy of a NoiseSampler over n rows, or None (uniform).
std::unique_ptr<NoiseSampler> sampler_arg(py::handle sampler, index_t n, const char* who) {
  if (sampler.is_none()) return std::make_unique<UniformSampler>(n);
  const auto& ps = sampler.cast<const PySampler&>();
  if (ps.s->size() != n)
    throw Error(fmt::format("{}(sampler): the sampler covers N = {} instances: expected the bank's N = {}", who,
                            ps.s->size(), n));
  py::gil_scoped_release nogil;
  return copy_sampler(*ps.s);
}

std::string comm_without_mpi() {
#ifdef MEMBANK_PYTHON_MPI
  return "Engine(comm=..., distributed=...): use membank.Engine (the package), which makes a "
         "membank.DistributedEngine, or membank.DistributedEngine itself";
#else
  return "Engine(comm=..., distributed=...): this membank was built without MPI (MEMBANK_MPI=OFF, or MPI not "
         "found at configure time), so there is no DistributedEngine: install libopenmpi-dev and python3-mpi4py "
         "and configure with -DMEMBANK_MPI=ON";
#endif
}

/// The fields of EngineConfig only an Engine reads (a Queue and an InBatch leave them at their defaults).
struct EngineOnlyArgs {
  index_t k;
  double momentum;
  const std::string* negatives;
  const std::string* z_policy;
  double z_fixed, z_ema;
};

/// The EngineConfig of the keyword arguments that Engine, Queue and InBatch share (the objective, its
/// parameters, the masks, normalisation, seed and rounding), plus Engine's own when `engine_only` is
/// given. The names are read in the order of Engine's keywords, so a call with several bad values
/// names the same one first whichever class it constructs.
EngineConfig make_config(const std::string& objective, double tau, bool exclude_positive, std::uint64_t seed,
                         bool normalize_features, double unit_norm_tolerance, double tau_plus, double beta,
                         bool detach_weights, double kernel_t, double gamma, py::handle margin,
                         bool exclude_same_label, const std::string& rounding,
                         const EngineOnlyArgs* engine_only = nullptr) {
  EngineConfig c;
  if (engine_only) c.k = engine_only->k;
  c.tau = tau;
  if (engine_only) c.momentum = engine_only->momentum;
  c.objective = objective_arg(objective);
  if (engine_only) c.negatives = negatives_mode_from_string(normalise_name(*engine_only->negatives));
  c.exclude_positive = exclude_positive;
  if (engine_only) {
    c.z_policy = z_policy_from_string(*engine_only->z_policy);
    c.z_fixed = engine_only->z_fixed;
    c.z_ema = engine_only->z_ema;
  }
  c.seed = seed;
  c.normalize_features = normalize_features;
  c.unit_norm_tolerance = unit_norm_tolerance;
  c.tau_plus = tau_plus;
  c.beta = beta;
  c.detach_weights = detach_weights;
  c.kernel_t = kernel_t;
  c.gamma = gamma;
  if (!margin.is_none()) c.margin = margin.cast<double>();
  c.exclude_same_label = exclude_same_label;
  c.rounding = rounding_from_string(rounding);
  return c;
}

/// The configuration keywords of DistributedEngine (and of a pickled Queue's or InBatch's config dict):
/// one table, each entry the name and how its value sets the field; a keyword left out keeps
/// EngineConfig's default, which is Engine's default too.
EngineConfig config_from_options(const py::dict& options, const char* who) {
  using Set = void (*)(EngineConfig&, py::handle);
  static const std::pair<const char*, Set> table[] = {
      {"k", [](EngineConfig& c, py::handle v) { c.k = v.cast<index_t>(); }},
      {"tau", [](EngineConfig& c, py::handle v) { c.tau = v.cast<double>(); }},
      {"momentum", [](EngineConfig& c, py::handle v) { c.momentum = v.cast<double>(); }},
      {"objective", [](EngineConfig& c, py::handle v) { c.objective = objective_arg(v.cast<std::string>()); }},
      {"negatives", [](EngineConfig& c, py::handle v) {
         c.negatives = negatives_mode_from_string(normalise_name(v.cast<std::string>()));
       }},
      {"exclude_positive", [](EngineConfig& c, py::handle v) { c.exclude_positive = v.cast<bool>(); }},
      {"z_policy", [](EngineConfig& c, py::handle v) { c.z_policy = z_policy_from_string(v.cast<std::string>()); }},
      {"z_fixed", [](EngineConfig& c, py::handle v) { c.z_fixed = v.cast<double>(); }},
      {"z_ema", [](EngineConfig& c, py::handle v) { c.z_ema = v.cast<double>(); }},
      {"seed", [](EngineConfig& c, py::handle v) { c.seed = v.cast<std::uint64_t>(); }},
      {"normalize_features", [](EngineConfig& c, py::handle v) { c.normalize_features = v.cast<bool>(); }},
      {"unit_norm_tolerance", [](EngineConfig& c, py::handle v) { c.unit_norm_tolerance = v.cast<double>(); }},
      {"tau_plus", [](EngineConfig& c, py::handle v) { c.tau_plus = v.cast<double>(); }},
      {"beta", [](EngineConfig& c, py::handle v) { c.beta = v.cast<double>(); }},
      {"detach_weights", [](EngineConfig& c, py::handle v) { c.detach_weights = v.cast<bool>(); }},
      {"kernel_t", [](EngineConfig& c, py::handle v) { c.kernel_t = v.cast<double>(); }},
      {"gamma", [](EngineConfig& c, py::handle v) { c.gamma = v.cast<double>(); }},
      {"margin", [](EngineConfig& c, py::handle v) {
         if (!v.is_none()) c.margin = v.cast<double>();
       }},
      {"exclude_same_label", [](EngineConfig& c, py::handle v) { c.exclude_same_label = v.cast<bool>(); }},
      {"rounding", [](EngineConfig& c, py::handle v) { c.rounding = rounding_from_string(v.cast<std::string>()); }},
      {"allow_biased_sampler", [](EngineConfig& c, py::handle v) { c.allow_biased_sampler = v.cast<bool>(); }},
  };
  EngineConfig c;
  for (const auto& [key, value] : options) {
    const std::string name = key.cast<std::string>();
    const auto* e = std::find_if(std::begin(table), std::end(table), [&](const auto& t) { return name == t.first; });
    if (e == std::end(table)) {
      std::string names;
      for (const auto& t : table) names += std::string(names.empty() ? "" : ", ") + t.first;
      throw py::type_error(fmt::format("{}() got an unexpected keyword argument '{}': expected comm, distributed, "
                                       "labels or a configuration keyword ({})", who, name, names));
    }
    try {
      e->second(c, value);
    } catch (py::cast_error&) {
      throw py::type_error(fmt::format("{}({} = {}): a {} cannot set it", who, name, std::string(py::repr(value)),
                                       type_name(value)));
    }
  }
  return c;
}

std::shared_ptr<PyEngine> make_engine(const PyBank& bank, py::object sampler, index_t k, double tau, double momentum,
                                      const std::string& objective, const std::string& negatives, bool exclude_positive,
                                      const std::string& z_policy, double z_fixed, double z_ema, std::uint64_t seed,
                                      bool normalize_features, double unit_norm_tolerance, double tau_plus, double beta,
                                      bool detach_weights, double kernel_t, double gamma, py::object margin,
                                      bool exclude_same_label, py::object labels, const std::string& rounding,
                                      bool allow_biased_sampler, py::object comm, py::object distributed) {
  // Engine(..., comm=...) is turned into a DistributedEngine by Engine.__new__ (membank/__init__.py)
  // before this runs; here only when the build has no MPI, or when _membank is used on its own.
  if (!comm.is_none() || !distributed.is_none()) throw Error(comm_without_mpi());
  if (!bank.s->owned)
    throw Error("Engine(bank): this Bank already belongs to an Engine (each engine owns its bank): make a new Bank, "
                "or use that engine");
  const EngineOnlyArgs engine_only{k, momentum, &negatives, &z_policy, z_fixed, z_ema};
  EngineConfig c = make_config(objective, tau, exclude_positive, seed, normalize_features, unit_norm_tolerance,
                               tau_plus, beta, detach_weights, kernel_t, gamma, margin, exclude_same_label, rounding,
                               &engine_only);
  c.allow_biased_sampler = allow_biased_sampler;
  const index_t n = bank.s->owned->size();
  std::vector<std::int64_t> label_values = labels_arg(labels);
  // Validate before the bank is moved: a refused configuration leaves the Python Bank usable.
  c.validate(n, bank.s->owned->dim());  // also: one step's scratch for K fits in memory (MemoryError)
  std::unique_ptr<NoiseSampler> s = sampler_arg(sampler, n, "Engine");
  Engine::check_sampler(*s, c);  // before the bank moves
  if (!labels.is_none()) Engine::check_labels(label_values, *s, c);
  auto pe = std::make_shared<PyEngine>();
  {
    std::lock_guard lk(bank.s->mu);
    pe->engine = std::make_unique<Engine>(std::move(*bank.s->owned), std::move(s), c, std::move(label_values));
    bank.s->owned.reset();
    bank.s->in = pe;  // views made earlier keep this engine (hence their rows) alive
  }
  return pe;
}

py::tuple step_result(const StepStats& st, Matrix2<float>& g) { return py::make_tuple(st.loss, g.arr, st); }

index_t checked_batch(const Vector1<index_t>& ids) {
  if (ids.size == 0) throw Error("ids is empty: expected a batch of at least one id (B >= 1)");
  return ids.size;
}

/// Run f on the engine (an Engine, or a DistributedEngine) with its lock held and the GIL released
/// (call with the GIL held).
template <class PE, class F>
auto with_engine(PE& pe, F&& f) {
  py::gil_scoped_release nogil;
  std::lock_guard lk(pe.mu);
  return f(*pe.engine);
}

/// A step-like call on already converted arguments: the gradient buffer for ids (the caller's `out`,
/// checked, or a fresh (B, D) array), then call(engine, gradient map) under with_engine; returns
/// (loss, dL/dfeatures, StepStats).
template <class PE, class F>
py::tuple engine_step(PE& pe, const Vector1<index_t>& ids, py::object out, std::initializer_list<NamedRegion> inputs,
                      F&& call) {
  const bool callers_out = !out.is_none();
  auto g = grad_buffer(std::move(out), checked_batch(ids), pe.owned_bank().dim());
  // The bank's storage never moves while the engine lives: its address is read without the lock.
  if (callers_out) check_out_alone(g, std::span<const NamedRegion>(inputs.begin(), inputs.size()), pe.owned_bank());
  const StepStats st = with_engine(pe, [&](auto& e) { return call(e, g.map()); });
  return step_result(st, g);
}

// full softmax over query blocks, with Ctrl-C checks between them

struct FullResult {
  double loss = 0, mean_z = 0, mean_p = 0;
};

FullResult full_softmax_chunked(const PyBank& b, const Matrix2<float>& f, const Vector1<index_t>& ids, double tau,
                                Matrix2<float>& g, double tol) {
  const index_t batch = ids.size, n = b.s->get().size(), dim = b.s->get().dim();
  // One call unless the work is large (B N D >= 2^31 multiply-adds, ~30 ms here): then blocks of 64
  // queries (the engine parallelises over the bank, so a block keeps every thread busy).
  const index_t block = (static_cast<double>(batch) * static_cast<double>(n) * static_cast<double>(dim) >= 2147483648.0) ? 64 : batch;
  if (f.rows != batch)
    throw Error(fmt::format("features has {} rows: expected B = {} (one per id)", f.rows, batch));
  FullResult r;
  for (index_t q0 = 0; q0 < batch; q0 += block) {
    const index_t rows = std::min(block, batch - q0);
    double mz = 0, mp = 0, loss = 0;
    {
      auto fm = f.cmap().middleRows(q0, rows);
      auto gm = g.map().middleRows(q0, rows);
      loss = with_bank(b, [&](const Bank& bank) {
        return full_softmax_loss(bank.view(), fm, ids.span().subspan(static_cast<std::size_t>(q0), rows), tau, gm,
                                 &mz, &mp, tol);
      });
    }
    const double w = static_cast<double>(rows) / static_cast<double>(batch);
    r.loss += loss * w;
    r.mean_z += mz * w;
    r.mean_p += mp * w;
    if (rows != batch) g.map().middleRows(q0, rows) *= static_cast<float>(w);
    if (q0 + rows < batch) check_signals();
  }
  return r;
}


#ifdef MEMBANK_PYTHON_MPI
// ---------------------------------------------------------------------------------------------
// the distributed engine (membank/distributed.hpp) over an mpi4py communicator

/// mpi4py's integer for a handle as the handle: the integer itself (MPICH: an int) or an address
/// (Open MPI: a pointer). A template, so that only the branch of this MPI's handle type is compiled.
template <class Handle>
Handle handle_from_int(py::handle h) {
  if constexpr (std::is_pointer_v<Handle>) {
    return reinterpret_cast<Handle>(static_cast<std::uintptr_t>(h.cast<unsigned long long>()));
  } else {
    return static_cast<Handle>(h.cast<long long>());
  }
}

/// An mpi4py communicator as the C handle, through mpi4py's MPI._handleof (no compile-time dependency
/// on mpi4py): an integer that is the handle itself (MPICH: an int) or its address (Open MPI: a pointer).
MPI_Comm comm_arg(py::handle comm) {
  py::module_ mpi;
  try {
    mpi = py::module_::import("mpi4py.MPI");
  } catch (py::error_already_set& e) {
    throw Error(fmt::format("comm=: mpi4py could not be imported ({}): apt-get install python3-mpi4py", e.what()));
  }
  if (!py::isinstance(comm, mpi.attr("Comm")))
    throw py::type_error(fmt::format("comm must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD); got {}",
                                     type_name(comm)));
  if (comm.equal(mpi.attr("COMM_NULL"))) throw Error("comm is MPI.COMM_NULL: expected a communicator");
  return handle_from_int<MPI_Comm>(mpi.attr("_handleof")(comm));
}

/// The rows [r.begin, r.end) of `whole` as a bank of their own, bit for bit (stored type, last-update
/// steps): a shard of a bank that every rank of a sharded engine was given whole.
Bank slice_rows(const Bank& whole, RowRange r) {
  const BankView v = whole.view();
  const double keep = std::numeric_limits<double>::infinity();  // the rows are unit already: keep their bits
  constexpr index_t block = 4096;
  Bank out = v.dtype == DType::float32
                 ? Bank::from_blocks(r.size(), v.dim, block,
                                     [&](index_t row0, index_t rows, float* dst, index_t ld) {
                                       for (index_t i = 0; i < rows; ++i)
                                         std::copy_n(v.row(r.begin + row0 + i), v.dim, dst + i * ld);
                                     },
                                     keep, nullptr, DType::float32)
                 : Bank::from_raw_blocks(r.size(), v.dim, v.dtype, block,
                                         [&](index_t row0, index_t rows, std::uint16_t* dst, index_t ld) {
                                           for (index_t i = 0; i < rows; ++i)
                                             std::copy_n(static_cast<const std::uint16_t*>(v.row_data(r.begin + row0 + i)),
                                                         v.dim, dst + i * ld);
                                         },
                                         keep);
  const auto& lu = whole.last_update();
  out.set_last_update({lu.begin() + r.begin, lu.begin() + r.end});
  return out;
}

struct PyDistEngine final : BankOwner {
  std::unique_ptr<DistributedEngine> engine;
  /// A duplicate of the caller's communicator for argument agreement (all_ranks_agree), apart from
  /// the engine's own.
  MPI_Comm guard = MPI_COMM_NULL;
  int rank = 0;

  ~PyDistEngine() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (guard != MPI_COMM_NULL && !finalized) MPI_Comm_free(&guard);
  }
  const Bank& owned_bank() const override { return engine->local_bank(); }
  std::string owner_name() const override {
    const RowRange r = engine->rows();
    return fmt::format("a DistributedEngine ({}, rank {} of {}, rows [{}, {}) of N = {})",
                       to_string(engine->mode()), engine->rank(), engine->ranks(), r.begin, r.end, engine->size());
  }
  std::string partial() const override {
    const RowRange r = engine->rows();
    if (r.begin == 0 && r.end == engine->size()) return {};
    return fmt::format("this Bank is rank {}'s shard, rows [{}, {}) of N = {}, of a sharded DistributedEngine, not "
                       "the whole bank: gather it with engine.gather_bank(root) and pass Bank.from_array(rows) on "
                       "that rank", engine->rank(), r.begin, r.end, engine->size());
  }
};

/// Runs `local` (this rank's argument conversion and checks) and then tells every rank whether any
/// rank's failed, before any of them enters the engine's collectives: a refused argument raises on
/// every rank -- its own error on the rank that refused it, membank.Error naming that rank elsewhere --
/// instead of leaving the other ranks waiting. Call with the GIL held.
template <class F>
void all_ranks_agree(MPI_Comm comm, const char* call, F&& local) {
  std::exception_ptr err;
  try {
    local();
  } catch (...) {
    err = std::current_exception();
  }
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  int mine = err ? rank : INT_MAX, first = INT_MAX;
  {
    py::gil_scoped_release nogil;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  }
  if (err) std::rethrow_exception(err);
  if (first != INT_MAX)
    throw Error(fmt::format("{}: rank {} refused its arguments (that rank's error says why); nothing changed on "
                            "any rank", call, first));
}

/// The common part of DistributedEngine(bank, ...) and DistributedEngine.seeded(...): the caller's
/// communicator duplicated, the arguments converted on every rank and agreed on, then `make` (which
/// builds the engine collectively) with the GIL released.
template <class Convert, class Make>
std::shared_ptr<PyDistEngine> make_distributed(py::handle comm, const char* who, Convert&& convert, Make&& make) {
  const MPI_Comm caller = comm_arg(comm);
  auto pd = std::make_shared<PyDistEngine>();
  {
    py::gil_scoped_release nogil;
    if (MPI_Comm_dup(caller, &pd->guard) != MPI_SUCCESS) throw Error(fmt::format("{}: MPI_Comm_dup failed", who));
  }
  MPI_Comm_rank(pd->guard, &pd->rank);
  all_ranks_agree(pd->guard, who, convert);
  {
    py::gil_scoped_release nogil;
    pd->engine = std::make_unique<DistributedEngine>(make(caller));
  }
  return pd;
}

struct DistArgs {
  Distributed mode = Distributed::replicated;
  EngineConfig config;
  std::vector<std::int64_t> labels;
  std::unique_ptr<NoiseSampler> sampler;
};

DistArgs dist_args(py::handle distributed, py::handle sampler, py::handle labels, const py::kwargs& options,
                   index_t n, const char* who) {
  DistArgs a;
  a.mode = distributed_from_string(distributed.cast<std::string>());
  a.config = config_from_options(options, who);
  a.labels = labels_arg(labels);
  a.sampler = sampler_arg(sampler, n, who);
  return a;
}

std::shared_ptr<PyDistEngine> make_distributed_from_bank(const PyBank& bank, py::object sampler, py::object comm,
                                                         py::object distributed, py::object labels,
                                                         const py::kwargs& options) {
  constexpr const char* who = "DistributedEngine";
  DistArgs a;
  std::optional<Bank> local;  // sharded: this rank's rows, copied
  index_t n = 0;
  auto pd = make_distributed(comm, who, [&] {
    if (!bank.s->owned)
      throw Error("DistributedEngine(bank): this Bank already belongs to an engine (each engine owns its bank): "
                  "make a new Bank");
    n = bank.s->owned->size();
    a = dist_args(distributed, sampler, labels, options, n, who);
    // Checked here, on every rank, before the bank moves: a refused configuration leaves the Bank usable.
    a.config.validate(n, bank.s->owned->dim());
    if (!a.labels.empty()) Engine::check_labels(a.labels, *a.sampler, a.config);
    if (a.mode == Distributed::sharded) {
      int ranks = 1, rank = 0;
      MPI_Comm_size(comm_arg(comm), &ranks);
      MPI_Comm_rank(comm_arg(comm), &rank);
      const RowRange held = shard_rows(n, ranks, rank);
      py::gil_scoped_release nogil;
      local.emplace(slice_rows(*bank.s->owned, held));
    }
  }, [&](MPI_Comm c) {
    if (local)  // sharded: the caller's Bank stays as it was (views of it stay valid)
      return DistributedEngine(c, a.mode, std::move(*local), n, std::move(a.sampler), a.config, std::move(a.labels));
    std::lock_guard lk(bank.s->mu);
    DistributedEngine e(c, a.mode, std::move(*bank.s->owned), n, std::move(a.sampler), a.config, std::move(a.labels));
    bank.s->owned.reset();
    return e;
  });
  if (a.mode == Distributed::replicated) bank.s->in = pd;  // the Bank now shows the engine's rows (as Engine)
  return pd;
}

std::shared_ptr<PyDistEngine> make_distributed_seeded(index_t n, index_t dim, std::uint64_t seed, py::object dtype,
                                                      py::object sampler, py::object comm, py::object distributed,
                                                      py::object labels, const py::kwargs& options) {
  constexpr const char* who = "DistributedEngine.seeded";
  DistArgs a;
  DType t = DType::float32;
  auto pd = make_distributed(comm, who, [&] {
    t = dtype_arg(dtype);
    if (n < 1) throw Error(fmt::format("{}(n = {}): expected n >= 1", who, n));
    a = dist_args(distributed, sampler, labels, options, n, who);
  }, [&](MPI_Comm c) {
    return DistributedEngine::seeded(c, a.mode, n, dim, seed, t, std::move(a.sampler), a.config, std::move(a.labels));
  });
  return pd;
}

/// What a step's converted arguments tell dist_step: the batch (B_r >= 1) and the regions `out` must not
/// overlap.
struct StepInputs {
  index_t batch = 0;
  std::vector<NamedRegion> regions;
};

/// A distributed step: this rank's arguments converted and agreed on by every rank, then the
/// collective step. Returns (loss, this rank's rows of dL/df, StepStats).
template <class Convert, class Call>
py::tuple dist_step(PyDistEngine& pd, const char* who, py::object out, Convert&& convert, Call&& call) {
  std::optional<Matrix2<float>> g;
  all_ranks_agree(pd.guard, who, [&] {
    const StepInputs in = convert();
    const bool callers_out = !out.is_none();
    g.emplace(grad_buffer(out, in.batch, pd.owned_bank().dim()));
    if (callers_out) check_out_alone(*g, in.regions, pd.owned_bank());
  });
  const StepStats st = with_engine(pd, [&](DistributedEngine& e) { return call(e, g->map()); });
  return step_result(st, *g);
}

/// Collective over `comm`: rank 0's `value` is broadcast and compared with every rank's; a rank whose
/// value differs raises membank.Error naming both, the others membank.Error naming that rank
/// (all_ranks_agree). For arguments a collective call needs the same on every rank (a snapshot's path).
void all_ranks_same(MPI_Comm comm, const char* who, const char* name, const std::string& value) {
  std::string root = value;
  {
    py::gil_scoped_release nogil;
    int size = static_cast<int>(std::min<std::size_t>(root.size(), INT_MAX));
    MPI_Bcast(&size, 1, MPI_INT, 0, comm);
    root.resize(static_cast<std::size_t>(size));
    MPI_Bcast(root.data(), size, MPI_CHAR, 0, comm);
  }
  all_ranks_agree(comm, who, [&] {
    if (value != root)
      throw Error(fmt::format("{}: {} = {} on this rank but {} on rank 0: a collective call takes the same {} on "
                              "every rank", who, name, value, root, name));
  });
}

/// Collective (save_snapshot of a DistributedEngine): the arguments converted and agreed on by every
/// rank (the same path and deflate level everywhere), then save_distributed_snapshot.
void save_distributed(py::handle path, PyDistEngine& pd, py::handle deflate_level, py::handle labels) {
  constexpr const char* who = "save_snapshot(path, DistributedEngine)";
  std::string p;
  SnapshotOptions options;
  all_ranks_agree(pd.guard, who, [&] {
    p = path_arg(path, who);
    options.deflate_level = int_arg(deflate_level, who, "deflate_level");
    if (!labels.is_none())
      throw Error(fmt::format("{}: labels= is for an Engine; a DistributedEngine saves the labels it holds "
                              "(engine.labels): set them with engine.set_labels(labels) (collective) and drop labels=",
                              who));
  });
  all_ranks_same(pd.guard, who, "path", p);
  all_ranks_same(pd.guard, who, "deflate_level", std::to_string(options.deflate_level));
  py::gil_scoped_release nogil;
  std::lock_guard hl(hdf5_mutex());
  std::lock_guard lk(pd.mu);
  save_distributed_snapshot(p, *pd.engine, options);
}

/// Collective (load_snapshot(path, comm=...)): the arguments converted and agreed on by every rank,
/// then load_distributed_snapshot over the caller's communicator.
std::shared_ptr<PyDistEngine> load_distributed(py::handle path, py::handle comm, py::handle distributed) {
  constexpr const char* who = "load_snapshot(path, comm=...)";
  const MPI_Comm caller = comm_arg(comm);
  auto pd = std::make_shared<PyDistEngine>();
  {
    py::gil_scoped_release nogil;
    if (MPI_Comm_dup(caller, &pd->guard) != MPI_SUCCESS) throw Error(fmt::format("{}: MPI_Comm_dup failed", who));
  }
  MPI_Comm_rank(pd->guard, &pd->rank);
  std::string p;
  Distributed mode = Distributed::replicated;
  all_ranks_agree(pd->guard, who, [&] {
    p = path_arg(path, who);
    if (!distributed.is_none()) {
      if (!py::isinstance<py::str>(distributed))
        throw py::type_error(fmt::format("{}: distributed must be 'replicated' or 'sharded'; got {}", who,
                                         type_name(distributed)));
      mode = distributed_from_string(distributed.cast<std::string>());
    }
  });
  all_ranks_same(pd->guard, who, "path", p);
  all_ranks_same(pd->guard, who, "distributed", to_string(mode));
  {
    py::gil_scoped_release nogil;
    std::lock_guard hl(hdf5_mutex());
    pd->engine = std::make_unique<DistributedEngine>(load_distributed_snapshot(p, caller, mode));
  }
  return pd;
}

[[noreturn]] void not_distributed(const char* what, const char* instead) {
  throw Error(fmt::format("DistributedEngine.{} is not available: {}", what, instead));
}
#endif  // MEMBANK_PYTHON_MPI

// ---------------------------------------------------------------------------------------------
// Queue (MoCo's ring of keys, membank/queue.hpp) and InBatch (SimCLR's in-batch negatives,
// membank/in_batch.hpp)

/// A Queue with its mutex (two Python threads may share one: their calls run one after the other).
/// Q, D and the dtype never change (restore() requires the same), so they are kept here and read
/// without the lock.
struct PyQueue {
  std::unique_ptr<Queue> queue;
  std::mutex mu;
  index_t capacity = 0, dim = 0;
  DType dtype = DType::float32;
};

std::shared_ptr<PyQueue> make_queue(index_t capacity, index_t dim, const EngineConfig& config, DType dtype) {
  auto pq = std::make_shared<PyQueue>();
  {
    py::gil_scoped_release nogil;  // Q seeded keys: O(Q D)
    pq->queue = std::make_unique<Queue>(capacity, dim, config, dtype);
  }
  pq->capacity = capacity;
  pq->dim = dim;
  pq->dtype = dtype;
  return pq;
}

/// Run f on the queue with its lock held and the GIL released (call with the GIL held).
template <class F>
auto with_queue(PyQueue& pq, F&& f) {
  py::gil_scoped_release nogil;
  std::lock_guard lk(pq.mu);
  return f(*pq.queue);
}

/// ids= / labels= of a Queue or InBatch call: a contiguous int64 (B,) array, or None (none given).
template <class T>
Vector1<T> optional_vector(py::handle obj, const char* arg) {
  if (obj.is_none()) return {};
  return vector_arg<T>(obj, arg, "int64", "(B,)");
}

/// `out` (named `name`) may share no memory with itself nor with the inputs of the call.
void check_out_alone(const Matrix2<float>& out, const char* name, std::span<const NamedRegion> inputs) {
  const MemoryRegion o = region_of(out);
  check_no_self_overlap(o, name);
  for (const NamedRegion& in : inputs) check_no_overlap(o, name, in.region, in.name);
}

/// Queue.step / Queue.evaluate: arguments converted (refused with the fix in the message), the gradient
/// buffer (the caller's `out`, checked, or a fresh (B, D) array), then call(queue, ...) with the lock
/// held and the GIL released. Returns (loss, dL/dqueries, StepStats), as Engine.step.
template <class F>
py::tuple queue_call(PyQueue& pq, py::handle queries, py::handle keys, py::handle ids, py::handle labels,
                     py::object out, F&& call) {
  auto qf = matrix_arg<float>(queries, "queries", "float32", "(B, D)");
  auto kf = matrix_arg<float>(keys, "keys", "float32", "(B, D)");
  auto y = optional_vector<index_t>(ids, "ids");
  auto l = optional_vector<std::int64_t>(labels, "labels");
  if (qf.rows == 0) throw Error("queries has 0 rows: expected a batch of at least one query (B >= 1)");
  const bool callers_out = !out.is_none();
  auto g = grad_buffer(std::move(out), qf.rows, pq.dim);
  const NamedRegion inputs[] = {{region_of(qf), "queries"}, {region_of(kf), "keys"}, {region_of(y), "ids"},
                                {region_of(l), "labels"}};
  const StepStats st = with_queue(pq, [&](Queue& q) {
    if (callers_out) {
      check_out_alone(g, "out", inputs);
      q.keys().check_no_overlap(region_of(g), "out");
    }
    return call(q, qf.cmap(), kf.cmap(), g.map(), y.span(), l.span());
  });
  return step_result(st, g);
}

/// An int64 from a state dict's entry; TypeError naming it otherwise.
std::int64_t int64_item(py::handle value, const char* name, const char* who = "Queue.restore") {
  try {
    return value.cast<std::int64_t>();
  } catch (py::cast_error&) {
    throw py::type_error(fmt::format("{}: {} must be an int; got {}", who, name, type_name(value)));
  }
}

/// Queue.state(): copies of everything Queue::State holds, the keys as stored (float32, float16, or the
/// uint16 words of bfloat16) with their last-update steps. `with_q(f)` runs f(const Queue&) under the
/// owner's lock with the GIL released (a Queue, or the ring of a DistributedQueue).
template <class WithQueue>
py::dict queue_state_of(index_t q, index_t dim, DType dtype, WithQueue&& with_q) {
  const auto es = static_cast<std::size_t>(dtype_bytes(dtype));
  py::array keys(storage_dtype(dtype), std::vector<py::ssize_t>{q, dim});
  py::array_t<bool> labelled(q);
  auto* dst = static_cast<unsigned char*>(keys.mutable_data());
  auto* flags = labelled.mutable_data();
  std::vector<std::int64_t> last_update, labels;
  std::vector<index_t> ids;
  index_t position = 0;
  std::int64_t enqueued = 0, step = 0;
  with_q([&](const Queue& qu) {
    const BankView v = qu.keys().view();
    for (index_t i = 0; i < q; ++i)
      std::memcpy(dst + static_cast<std::size_t>(i * dim) * es, v.row_data(i), static_cast<std::size_t>(dim) * es);
    last_update = qu.keys().last_update();
    ids = qu.ids();
    labels = qu.labels();
    for (index_t i = 0; i < q; ++i) flags[i] = qu.labelled()[static_cast<std::size_t>(i)] != 0;
    position = qu.position();
    enqueued = qu.enqueued();
    step = qu.steps_done();
  });
  py::dict d;
  d["capacity"] = q;
  d["dim"] = dim;
  d["dtype"] = to_string(dtype);
  d["keys"] = keys;
  d["last_update"] = to_numpy(std::move(last_update));
  d["ids"] = to_numpy(std::move(ids));
  d["labels"] = to_numpy(std::move(labels));
  d["labelled"] = labelled;
  d["position"] = position;
  d["enqueued"] = enqueued;
  d["step"] = step;
  return d;
}

py::dict queue_state(PyQueue& pq) {
  return queue_state_of(pq.capacity, pq.dim, pq.dtype, [&](auto&& f) { return with_queue(pq, f); });
}

/// A state dict (what Queue.state() returns) as a Queue::State for a queue of Q = q, D = dim and
/// `dtype`: every entry converted and checked first (a refused state raises), the keys kept bit for
/// bit. `who` names the call in messages ("Queue.restore").
Queue::State queue_state_from(py::handle state, index_t q, index_t dim, DType dtype, const char* who) {
  if (!py::isinstance<py::dict>(state))
    throw py::type_error(fmt::format("{}: state must be a dict (what Queue.state() returns); got {}", who,
                                     type_name(state)));
  const auto d = py::reinterpret_borrow<py::dict>(state);
  const auto item = [&](const char* key) -> py::object {
    if (!d.contains(key))
      throw Error(fmt::format("{}: state has no '{}': expected the dict Queue.state() returns (keys, "
                              "last_update, ids, labels, labelled, position, enqueued, step)", who, key));
    return d[key];
  };
  const py::dtype want = storage_dtype(dtype);
  const std::string want_keys = fmt::format("a C-contiguous {} ({}, {}) array (the queue's {} keys as Queue.state() "
                                            "returns them)", std::string(py::str(want.attr("name"))), q, dim,
                                            to_string(dtype));
  py::array keys = require_ndarray(item("keys"), "state['keys']", want_keys.c_str());
  if (!keys.dtype().equal(want))
    throw py::type_error(fmt::format("state['keys'] must be {}; got dtype {}", want_keys,
                                     std::string(py::str(keys.dtype()))));
  if (keys.ndim() != 2 || keys.shape(0) != q || keys.shape(1) != dim)
    throw py::value_error(fmt::format("state['keys'] must be {}; got shape {}", want_keys, shape_str(keys)));
  if (!(keys.flags() & py::array::c_style))
    throw py::value_error(fmt::format("state['keys'] must be {}: pass np.ascontiguousarray(keys)", want_keys));
  require_aligned(keys, "state['keys']", static_cast<std::size_t>(dtype_bytes(dtype)));
  const auto lu = vector_arg<std::int64_t>(item("last_update"), "state['last_update']", "int64", "(Q,)");
  const auto ids = vector_arg<index_t>(item("ids"), "state['ids']", "int64", "(Q,)");
  const auto labels = vector_arg<std::int64_t>(item("labels"), "state['labels']", "int64", "(Q,)");
  py::array flags = require_ndarray(item("labelled"), "state['labelled']", "a contiguous bool (Q,) array");
  if (!flags.dtype().equal(py::dtype::of<bool>()) && !flags.dtype().equal(py::dtype::of<std::uint8_t>()))
    throw py::type_error(fmt::format("state['labelled'] must be a contiguous bool (Q,) array; got dtype {}: pass "
                                     "labelled.astype(bool)", std::string(py::str(flags.dtype()))));
  if (flags.ndim() != 1 || (flags.shape(0) > 1 && flags.strides(0) != 1))
    throw py::value_error(fmt::format("state['labelled'] must be a contiguous bool (Q,) array; got shape {}: pass "
                                      "np.ascontiguousarray(labelled.reshape(-1))", shape_str(flags)));
  const std::int64_t position = int64_item(item("position"), "state['position']", who);
  const std::int64_t enqueued = int64_item(item("enqueued"), "state['enqueued']", who);
  const std::int64_t step = int64_item(item("step"), "state['step']", who);
  const auto* flag_data = static_cast<const std::uint8_t*>(flags.data());
  std::vector<std::uint8_t> labelled(flag_data, flag_data + flags.shape(0));
  std::vector<index_t> id_values(ids.data, ids.data + ids.size);
  std::vector<std::int64_t> label_values(labels.data, labels.data + labels.size);
  std::vector<std::int64_t> last_update(lu.data, lu.data + lu.size);
  const void* src = keys.data();
  py::gil_scoped_release nogil;
  // The keys as a bank of their own, bit for bit: rows within the snapshots' unit-norm tolerance are kept
  // as they are, any other is refused (never renormalised behind the caller's back).
  const double tolerance = std::max(1e-4, row_norm_tolerance(dtype));
  index_t off = 0;
  constexpr index_t block = 4096;
  Bank bank = dtype == DType::float32
                ? Bank::from_blocks(q, dim, block,
                                    [&](index_t row0, index_t rows, float* out, index_t ld) {
                                      const auto* f = static_cast<const float*>(src);
                                      for (index_t i = 0; i < rows; ++i)
                                        std::copy_n(f + (row0 + i) * dim, dim, out + i * ld);
                                    },
                                    tolerance, &off, DType::float32)
                : Bank::from_raw_blocks(q, dim, dtype, block,
                                        [&](index_t row0, index_t rows, std::uint16_t* out, index_t ld) {
                                          const auto* w = static_cast<const std::uint16_t*>(src);
                                          for (index_t i = 0; i < rows; ++i)
                                            std::copy_n(w + (row0 + i) * dim, dim, out + i * ld);
                                        },
                                        tolerance, &off);
  if (off != 0)
    throw Error(fmt::format("{}: state['keys'] has {} rows that are not unit-norm (within {:g}): expected "
                            "the keys Queue.state() returns", who, off, tolerance));
  bank.set_last_update(std::move(last_update));  // Error on a wrong length
  return Queue::State{std::move(bank), std::move(id_values), std::move(label_values), std::move(labelled),
                      position, enqueued, step};
}

/// Queue.restore(state): every entry converted and checked first (a refused state changes nothing),
/// the keys kept bit for bit.
void queue_restore(PyQueue& pq, py::handle state) {
  Queue::State st = queue_state_from(state, pq.capacity, pq.dim, pq.dtype, "Queue.restore");
  py::gil_scoped_release nogil;
  std::lock_guard lk(pq.mu);
  pq.queue->restore(std::move(st));  // checks the rest; changes nothing on an error
}

/// The queue's configuration as Queue(...) keywords read it back (pickling).
py::tuple queue_getstate(PyQueue& pq) {
  return py::make_tuple(pq.capacity, pq.dim, to_string(pq.dtype), config_dict(pq.queue->config()), queue_state(pq));
}

std::shared_ptr<PyQueue> queue_setstate(const py::tuple& t) {
  if (t.size() != 5) throw Error("Queue.__setstate__: expected the 5-tuple Queue.__getstate__ returns");
  const EngineConfig c = config_from_options(t[3].cast<py::dict>(), "Queue.__setstate__");
  auto pq = make_queue(t[0].cast<index_t>(), t[1].cast<index_t>(), c, dtype_arg(t[2]));
  queue_restore(*pq, t[4]);
  return pq;
}


// ---------------------------------------------------------------------------------------------
// MultiViewEngine (CMC over V banks, membank/multiview.hpp)

/// A bank copied bit for bit (stored type, rows, last-update steps): a membank.Bank given in banks=.
Bank copy_bank(const Bank& whole) {
  const BankView v = whole.view();
  const double keep = std::numeric_limits<double>::infinity();  // the rows are unit already: keep their bits
  constexpr index_t block = 4096;
  Bank out = v.dtype == DType::float32
                 ? Bank::from_blocks(v.rows, v.dim, block,
                                     [&](index_t row0, index_t rows, float* dst, index_t ld) {
                                       for (index_t i = 0; i < rows; ++i)
                                         std::copy_n(v.row(row0 + i), v.dim, dst + i * ld);
                                     },
                                     keep, nullptr, DType::float32)
                 : Bank::from_raw_blocks(v.rows, v.dim, v.dtype, block,
                                         [&](index_t row0, index_t rows, std::uint16_t* dst, index_t ld) {
                                           for (index_t i = 0; i < rows; ++i)
                                             std::copy_n(static_cast<const std::uint16_t*>(v.row_data(row0 + i)),
                                                         v.dim, dst + i * ld);
                                         },
                                         keep);
  out.set_last_update(whole.last_update());
  return out;
}

/// A MultiViewEngine with its mutex (two Python threads may share one: their calls run one after the
/// other). N, D and V never change, so they are kept here and read without the lock.
struct PyMultiView {
  std::unique_ptr<MultiViewEngine> mv;
  std::mutex mu;
  index_t n = 0, dim = 0, views = 0;
};

template <class F>
auto with_multiview(PyMultiView& pm, F&& f) {
  py::gil_scoped_release nogil;
  std::lock_guard lk(pm.mu);
  return f(*pm.mv);
}

/// What MultiViewEngine.step returns besides the loss and the gradients: the total loss, each pair's
/// StepStats and the pairs themselves (query view, bank view), in pair order.
struct PyMultiViewStats {
  MultiViewStats stats;
  std::vector<ViewPair> pairs;
};

/// dtype= of MultiViewEngine: None (each view's default), one dtype for every view, or a list / tuple
/// of V of them (None entries: that view's default). Empty optionals: the default.
std::vector<std::optional<DType>> view_dtypes_arg(py::handle dtype, index_t views) {
  std::vector<std::optional<DType>> out(static_cast<std::size_t>(views));
  if (dtype.is_none()) return out;
  if (py::isinstance<py::list>(dtype) || py::isinstance<py::tuple>(dtype)) {
    const auto seq = py::reinterpret_borrow<py::sequence>(dtype);
    if (static_cast<index_t>(seq.size()) != views)
      throw Error(fmt::format("MultiViewEngine(dtype=): a list of {} dtypes: expected one per view (V = {}), or a "
                              "single dtype for every view", seq.size(), views));
    for (index_t v = 0; v < views; ++v)
      if (!seq[static_cast<std::size_t>(v)].is_none())
        out[static_cast<std::size_t>(v)] = dtype_arg(seq[static_cast<std::size_t>(v)]);
    return out;
  }
  const DType t = dtype_arg(dtype);
  for (auto& d : out) d = t;
  return out;
}

/// An optional int keyword (n=, dim=, views=) as index_t; TypeError naming it otherwise.
std::optional<index_t> optional_index(py::handle value, const char* who, const char* name) {
  if (value.is_none()) return std::nullopt;
  try {
    return value.cast<index_t>();
  } catch (py::cast_error&) {
    throw py::type_error(fmt::format("{}: {} must be an int; got {}", who, name, type_name(value)));
  }
}

std::shared_ptr<PyMultiView> make_multiview(py::object n_arg, py::object dim_arg, py::object views_arg,
                                            const std::string& graph_name, py::object sampler, py::object banks,
                                            py::object weights, py::object dtype, index_t k, double tau,
                                            double momentum, const std::string& objective,
                                            const std::string& negatives, bool exclude_positive,
                                            const std::string& z_policy, double z_fixed, double z_ema,
                                            std::uint64_t seed, bool normalize_features, double unit_norm_tolerance,
                                            double tau_plus, double beta, bool detach_weights, double kernel_t,
                                            double gamma, py::object margin, bool exclude_same_label,
                                            py::object labels, const std::string& rounding,
                                            bool allow_biased_sampler) {
  constexpr const char* who = "MultiViewEngine";
  const EngineOnlyArgs engine_only{k, momentum, &negatives, &z_policy, z_fixed, z_ema};
  EngineConfig c = make_config(objective, tau, exclude_positive, seed, normalize_features, unit_norm_tolerance,
                                     tau_plus, beta, detach_weights, kernel_t, gamma, margin, exclude_same_label,
                                     rounding, &engine_only);
  c.allow_biased_sampler = allow_biased_sampler;
  const ViewGraph graph = view_graph_from_string(graph_name);
  std::optional<index_t> n = optional_index(n_arg, who, "n"), dim = optional_index(dim_arg, who, "dim"),
                         views = optional_index(views_arg, who, "views");

  // The banks given (float32 (N, D) arrays, or membank.Bank objects): their V, N and D.
  std::vector<py::object> given;
  if (!banks.is_none()) {
    if (!py::isinstance<py::list>(banks) && !py::isinstance<py::tuple>(banks))
      throw py::type_error(fmt::format("{}(banks=): expected a list of V float32 (N, D) arrays or membank.Bank "
                                       "objects, one per view; got {}", who, type_name(banks)));
    for (py::handle b : py::reinterpret_borrow<py::sequence>(banks)) given.push_back(py::reinterpret_borrow<py::object>(b));
    if (views && *views != static_cast<index_t>(given.size()))
      throw Error(fmt::format("{}(views = {}): banks holds {} entries: expected one bank per view", who, *views,
                              given.size()));
    views = static_cast<index_t>(given.size());
  }
  const index_t v_count = views.value_or(2);
  if (v_count < 2) throw Error(fmt::format("{}(views = {}): expected V >= 2 views", who, v_count));
  const std::vector<std::optional<DType>> dtypes = view_dtypes_arg(dtype, v_count);

  std::vector<Bank> bank_list;
  if (given.empty()) {
    if (!n || !dim)
      throw py::type_error(fmt::format("{}(): n and dim are required without banks= (view v's bank is then "
                                       "Bank(n, dim, seed + v, dtype))", who));
    if (*n < 1 || *dim < 1) throw Error(fmt::format("{}(n = {}, dim = {}): expected n >= 1 and dim >= 1", who, *n, *dim));
    c.validate(*n, *dim);  // before V banks are built
  } else {
    // Shapes first (cheap), then the configuration, then the copies.
    std::vector<std::string> names;
    for (index_t v = 0; v < v_count; ++v) {
      const py::object& b = given[static_cast<std::size_t>(v)];
      names.push_back(fmt::format("banks[{}]", v));
      index_t bn = 0, bd = 0;
      if (py::isinstance<PyBank>(b)) {
        const auto& pb = b.cast<const PyBank&>();
        bn = pb.s->get().size();
        bd = pb.s->get().dim();
        const auto want = dtypes[static_cast<std::size_t>(v)];
        if (want && *want != pb.s->get().dtype())
          throw Error(fmt::format("{}(dtype=): banks[{}] is a {} Bank: drop dtype= for it (a Bank is copied as "
                                  "stored) or pass its rows", who, v, to_string(pb.s->get().dtype())));
      } else {
        const auto m = matrix_arg<float>(b, names.back().c_str(), "float32", "(N, D)");
        bn = m.rows;
        bd = m.cols;
      }
      if (n && bn != *n)
        throw Error(fmt::format("{}(n = {}): {} has N = {} rows", who, *n, names.back(), bn));
      if (dim && bd != *dim)
        throw Error(fmt::format("{}(dim = {}): {} has D = {} columns", who, *dim, names.back(), bd));
      n = bn;
      dim = bd;
    }
    c.validate(*n, *dim);
  }
  std::unique_ptr<NoiseSampler> s;
  if (!weights.is_none()) {
    if (!sampler.is_none()) throw Error(fmt::format("{}: pass sampler= or weights=, not both", who));
    const auto w = vector_arg<double>(weights, "weights", "float64", "(N,)");
    if (w.size != *n)
      throw Error(fmt::format("{}(weights): {} weights: expected one per instance (N = {})", who, w.size, *n));
    py::gil_scoped_release nogil;
    s = std::make_unique<AliasSampler>(w.span());
  } else {
    s = sampler_arg(sampler, *n, who);
  }
  Engine::check_sampler(*s, c);  // before V banks are built
  std::vector<std::int64_t> label_values = labels_arg(labels);
  if (!labels.is_none()) Engine::check_labels(label_values, *s, c);

  if (given.empty()) {
    py::gil_scoped_release nogil;
    for (index_t v = 0; v < v_count; ++v)
      bank_list.emplace_back(*n, *dim, seed + static_cast<std::uint64_t>(v),
                             dtypes[static_cast<std::size_t>(v)].value_or(DType::float32));
  } else {
    for (index_t v = 0; v < v_count; ++v) {
      const py::object& b = given[static_cast<std::size_t>(v)];
      if (py::isinstance<PyBank>(b)) {
        bank_list.push_back(with_bank(b.cast<const PyBank&>(), [](const Bank& bank) { return copy_bank(bank); }));
      } else {
        const std::string name = fmt::format("banks[{}]", v);
        const auto m = matrix_arg<float>(b, name.c_str(), "float32", "(N, D)");
        const DType t = dtypes[static_cast<std::size_t>(v)].value_or(DType::float32);
        py::gil_scoped_release nogil;
        bank_list.push_back(Bank::from_rows(m.cmap(), t));
      }
    }
  }
  auto pm = std::make_shared<PyMultiView>();
  pm->n = *n;
  pm->dim = *dim;
  pm->views = v_count;
  py::gil_scoped_release nogil;
  pm->mv = std::make_unique<MultiViewEngine>(std::move(bank_list), std::move(s), c, graph, std::move(label_values));
  return pm;
}

/// The V feature arrays of a multi-view call (a list or tuple of float32 (B, D) arrays, named
/// features[v] in messages). Their count is the engine's to check (it names V).
std::vector<Matrix2<float>> view_features_arg(py::handle features) {
  if (!py::isinstance<py::list>(features) && !py::isinstance<py::tuple>(features))
    throw py::type_error(fmt::format("features must be a list (or tuple) of float32 (B, D) arrays, one per view; "
                                     "got {}", type_name(features)));
  std::vector<Matrix2<float>> out;
  index_t v = 0;
  for (py::handle f : py::reinterpret_borrow<py::sequence>(features)) {
    const std::string name = fmt::format("features[{}]", v++);
    out.push_back(matrix_arg<float>(f, name.c_str(), "float32", "(B, D)"));
  }
  return out;
}

/// The V gradient buffers: the caller's `out` list (each checked: float32 (B, D), writable) or fresh
/// arrays.
std::vector<Matrix2<float>> view_grads_arg(py::object out, index_t views, index_t batch, index_t dim) {
  std::vector<Matrix2<float>> g;
  if (out.is_none()) {
    for (index_t v = 0; v < views; ++v) g.push_back(grad_buffer(py::none(), batch, dim));
    return g;
  }
  if (!py::isinstance<py::list>(out) && !py::isinstance<py::tuple>(out))
    throw py::type_error(fmt::format("out must be a list of V = {} float32 (B, D) arrays (one per view) or None; "
                                     "got {}", views, type_name(out)));
  const auto seq = py::reinterpret_borrow<py::sequence>(out);
  if (static_cast<index_t>(seq.size()) != views)
    throw Error(fmt::format("out has {} entries: expected V = {} (one (B, D) buffer per view)", seq.size(), views));
  for (index_t v = 0; v < views; ++v) {
    const std::string name = fmt::format("out[{}]", v);
    g.push_back(grad_buffer(seq[static_cast<std::size_t>(v)], batch, dim, name.c_str()));
  }
  return g;
}

/// step / evaluate: the arguments converted, then call(engine, features, ids, grads) under the lock
/// with the GIL released. Returns (loss, [dL/df^v], MultiViewStats).
template <class F>
py::tuple multiview_call(PyMultiView& pm, py::handle features, py::handle ids, py::object out, F&& call) {
  auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
  std::vector<Matrix2<float>> f = view_features_arg(features);
  const index_t batch = checked_batch(y);
  std::vector<Matrix2<float>> g = view_grads_arg(std::move(out), pm.views, batch, pm.dim);
  std::vector<FeaturesRef> fr;
  fr.reserve(f.size());
  for (const auto& m : f) fr.emplace_back(m.cmap());
  std::vector<GradRef> gr;
  gr.reserve(g.size());
  for (auto& m : g) gr.emplace_back(m.map());
  PyMultiViewStats st;
  st.stats = with_multiview(pm, [&](MultiViewEngine& mv) {
    st.pairs = mv.pairs();
    return call(mv, std::span<const FeaturesRef>(fr), y.span(), std::span<GradRef>(gr));
  });
  py::list grads;
  for (auto& m : g) grads.append(m.arr);
  const double loss = st.stats.loss;
  return py::make_tuple(loss, grads, std::move(st));
}

py::list pairs_list(const std::vector<ViewPair>& pairs) {
  py::list out;
  for (const ViewPair& p : pairs) out.append(py::make_tuple(p.query, p.bank));
  return out;
}

#ifdef MEMBANK_PYTHON_MPI
// ---------------------------------------------------------------------------------------------
// DistributedQueue and DistributedInBatch (membank/distributed_memories.hpp) over an mpi4py communicator

/// The caller's communicator duplicated for argument agreement (all_ranks_agree), apart from the
/// engine's own duplicate. Freed unless MPI is already finalised.
struct CommGuard {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, ranks = 1;
  CommGuard() = default;
  CommGuard(const CommGuard&) = delete;
  CommGuard& operator=(const CommGuard&) = delete;
  ~CommGuard() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm);
  }
  void dup(MPI_Comm caller, const char* who) {
    py::gil_scoped_release nogil;
    if (MPI_Comm_dup(caller, &comm) != MPI_SUCCESS) throw Error(fmt::format("{}: MPI_Comm_dup failed", who));
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &ranks);
  }
};

/// Drops `owned` without running its destructor when MPI is already finalised (an object still alive
/// at interpreter exit, after mpi4py's MPI_Finalize): freeing its communicator then would abort.
template <class T>
void release_unless_finalized(std::unique_ptr<T>& owned) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) (void)owned.release();  // leaked at exit, on purpose
}

/// A DistributedQueue with its mutex. Q, D and the dtype never change: kept here, read without the lock.
struct PyDistQueue {
  std::unique_ptr<DistributedQueue> dq;
  std::mutex mu;
  CommGuard guard;
  index_t capacity = 0, dim = 0;
  DType dtype = DType::float32;
  ~PyDistQueue() { release_unless_finalized(dq); }
};

template <class F>
auto with_dist_queue(PyDistQueue& pd, F&& f) {
  py::gil_scoped_release nogil;
  std::lock_guard lk(pd.mu);
  return f(*pd.dq);
}

/// Collective: `make_queue()` (this rank's Queue, built from the arguments inside the agreement, so a
/// refused argument raises on every rank), then the DistributedQueue over `comm` (which compares the
/// queues' fingerprints: the same configuration and state on every rank).
template <class MakeQueue>
std::shared_ptr<PyDistQueue> make_dist_queue(py::handle comm, const char* who, MakeQueue&& make_local) {
  const MPI_Comm caller = comm_arg(comm);
  auto pd = std::make_shared<PyDistQueue>();
  pd->guard.dup(caller, who);
  std::shared_ptr<PyQueue> local;
  all_ranks_agree(pd->guard.comm, who, [&] { local = make_local(); });
  pd->capacity = local->capacity;
  pd->dim = local->dim;
  pd->dtype = local->dtype;
  py::gil_scoped_release nogil;
  pd->dq = std::make_unique<DistributedQueue>(caller, std::move(*local->queue));
  return pd;
}

/// A copy of `pq` (configuration and whole state, keys bit for bit) as a fresh PyQueue.
std::shared_ptr<PyQueue> copy_queue(PyQueue& pq, const char* who) {
  const EngineConfig c = pq.queue->config();
  auto copy = make_queue(pq.capacity, pq.dim, c, pq.dtype);
  Queue::State st = queue_state_from(queue_state(pq), pq.capacity, pq.dim, pq.dtype, who);
  py::gil_scoped_release nogil;
  copy->queue->restore(std::move(st));
  return copy;
}

py::tuple dist_queue_step(PyDistQueue& pd, py::handle queries, py::handle keys, py::handle ids, py::handle labels,
                          bool enqueue, py::object out) {
  Matrix2<float> qf, kf, g;
  Vector1<index_t> y;
  Vector1<std::int64_t> l;
  all_ranks_agree(pd.guard.comm, "DistributedQueue.step", [&] {
    qf = matrix_arg<float>(queries, "queries", "float32", "(B, D)");
    kf = matrix_arg<float>(keys, "keys", "float32", "(B, D)");
    y = optional_vector<index_t>(ids, "ids");
    l = optional_vector<std::int64_t>(labels, "labels");
    if (qf.rows == 0)
      throw Error("queries has 0 rows: expected this rank's slice of at least one query (B_r >= 1)");
    const bool callers_out = !out.is_none();
    g = grad_buffer(out, qf.rows, pd.dim);
    if (callers_out) {
      const NamedRegion inputs[] = {{region_of(qf), "queries"}, {region_of(kf), "keys"}, {region_of(y), "ids"},
                                    {region_of(l), "labels"}};
      check_out_alone(g, "out", inputs);
      with_dist_queue(pd, [&](DistributedQueue& d) { d.queue().keys().check_no_overlap(region_of(g), "out"); });
    }
  });
  const StepStats st = with_dist_queue(pd, [&](DistributedQueue& d) {
    return d.step(qf.cmap(), kf.cmap(), g.map(), y.span(), l.span(), enqueue);
  });
  return step_result(st, g);
}

/// Collective: the ring replaced by `state` (Queue.state()'s dict), the same on every rank (checked by
/// the DistributedQueue's fingerprints); a refused state changes nothing on any rank.
void dist_queue_restore(PyDistQueue& pd, py::handle state) {
  constexpr const char* who = "DistributedQueue.restore";
  std::shared_ptr<PyQueue> local;
  all_ranks_agree(pd.guard.comm, who, [&] {
    local = make_queue(pd.capacity, pd.dim, pd.dq->queue().config(), pd.dtype);
    Queue::State st = queue_state_from(state, pd.capacity, pd.dim, pd.dtype, who);
    py::gil_scoped_release nogil;
    local->queue->restore(std::move(st));
  });
  py::gil_scoped_release nogil;
  std::lock_guard lk(pd.mu);
  DistributedQueue next(pd.guard.comm, std::move(*local->queue));  // collective; Error on every rank on a mismatch
  *pd.dq = std::move(next);
}

/// A DistributedInBatch with its mutex.
struct PyDistInBatch {
  std::unique_ptr<DistributedInBatch> ib;
  std::mutex mu;
  CommGuard guard;
  ~PyDistInBatch() { release_unless_finalized(ib); }
};

py::dict wire_dict(const WireStats& w) {
  py::dict d;
  d["bytes_sent"] = w.bytes_sent;
  d["collectives"] = w.collectives;
  return d;
}

std::string dist_comm_without(const char* cls) {
  return fmt::format("{}(comm=...): use membank.{} (the package), which makes a membank.Distributed{}, or "
                     "membank.Distributed{} itself", cls, cls, cls, cls);
}
#endif  // MEMBANK_PYTHON_MPI

/// Queue(comm=) / InBatch(comm=) reaching the single-process class: a build without MPI (or _membank
/// used on its own).
[[noreturn]] void memory_comm_refused(const char* cls) {
#ifdef MEMBANK_PYTHON_MPI
  throw Error(dist_comm_without(cls));
#else
  throw Error(fmt::format("{}(comm=...): this membank was built without MPI (MEMBANK_MPI=OFF, or MPI not found at "
                          "configure time), so there is no Distributed{}: install libopenmpi-dev and python3-mpi4py "
                          "and configure with -DMEMBANK_MPI=ON", cls, cls));
#endif
}

}  // namespace

PYBIND11_MODULE(_membank, m) {
  m.doc() = "membank: memory-bank instance discrimination (Wu et al., CVPR 2018) -- the C++ engine's Python face";

  static py::exception<Error> error_type(m, "Error", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const Error& e) {
      error_type(e.what());
    }
  });

  m.def("set_num_threads", [](int n) {
    set_num_threads(n);  // membank::set_num_threads: Error naming the value and [1, max_num_threads()]
  }, py::arg("n"),
        "OpenMP threads of the calling thread's next calls (the same runtime torch uses here). Raises membank.Error "
        "for n < 1 or n > max_num_threads().");
  m.def("max_num_threads", &max_num_threads,
        "The largest thread count set_num_threads accepts here (16 x the hardware threads, capped by the OpenMP and "
        "process limits).");
  m.def("get_num_threads", [] { return omp_get_max_threads(); });
  m.def("_dtype_name", [](py::handle dtype) { return to_string(dtype_arg(dtype)); }, py::arg("dtype"),
        "The canonical name of a bank dtype= value ('float32', 'float16', 'bfloat16'); membank.Error otherwise.");

  // ---- StepStats
  py::class_<StepStats>(m, "StepStats", "What a step reports besides the gradient (engine.hpp).")
      .def_readonly("loss", &StepStats::loss, "L, the mean over the batch")
      .def_readonly("z", &StepStats::z, "Z used by this step (NCE); mean exact Z_i (full softmax); NaN otherwise")
      .def_readonly("z_estimate", &StepStats::z_estimate, "Zhat of this step's noise draws")
      .def_readonly("mean_p_positive", &StepStats::mean_p_positive)
      .def_readonly("negative_collision_fraction", &StepStats::negative_collision_fraction)
      .def_readonly("prefetched", &StepStats::prefetched, "the step used the draws of engine.prefetch(ids)")
      .def_readonly("mi_lower_bound", &StepStats::mi_lower_bound,
                    "infonce, dcl, hcl: log(K + 1) - L, a lower bound on the mutual information (nats) that "
                    "cannot exceed log(K + 1) (mi_bound_ceiling); NaN otherwise")
      .def_readonly("mi_bound_ceiling", &StepStats::mi_bound_ceiling, "log(K + 1), where the bound saturates")
      .def_readonly("step", &StepStats::step, "the step counter this step used")
      .def("__repr__", [](const StepStats& s) {
        return fmt::format("StepStats(loss={:.6g}, z={:.6g}, z_estimate={:.6g}, mean_p_positive={:.4g}, "
                           "negative_collision_fraction={:.4g}, step={})",
                           s.loss, s.z, s.z_estimate, s.mean_p_positive, s.negative_collision_fraction, s.step);
      });

  // ---- Bank
  py::class_<PyBank>(m, "Bank",
                     "The memory bank: N unit-norm rows of dimension D, stored as float32, float16 or bfloat16 "
                     "(dtype). Once given to an Engine, the engine owns it; this object then shows the engine's bank.")
      .def(py::init([](index_t n, index_t dim, std::uint64_t seed, py::handle dtype) {
             const DType t = dtype_arg(dtype);
             auto st = std::make_shared<BankState>();
             py::gil_scoped_release nogil;
             st->owned = std::make_unique<Bank>(n, dim, seed, t);
             return PyBank{st};
           }),
           py::arg("n"), py::arg("dim"), py::arg("seed") = 0, py::arg("dtype") = "float32",
           "N rows uniform on the unit sphere, drawn from seed, stored as dtype ('float32', 'float16', 'bfloat16'; "
           "a 2-byte bank holds the fp32 rows rounded to nearest).")
      .def_static("from_array", [](py::handle rows, py::handle dtype) {
             const DType t = dtype_arg(dtype);
             auto r = matrix_arg<float>(rows, "rows", "float32", "(N, D)");
             auto st = std::make_shared<BankState>();
             py::gil_scoped_release nogil;
             st->owned = std::make_unique<Bank>(Bank::from_rows(r.cmap(), t));
             return PyBank{st};
           },
           py::arg("rows"), py::arg("dtype") = "float32",
           "A bank from float32 (N, D) rows (copied into the bank, each normalised, then rounded to nearest "
           "for a 2-byte dtype).")
      .def_property_readonly("n", [](const PyBank& b) { return b.s->get().size(); })
      .def_property_readonly("dim", [](const PyBank& b) { return b.s->get().dim(); })
      .def_property_readonly("dtype", [](const PyBank& b) { return to_string(b.s->get().dtype()); },
                             "the stored element type: 'float32', 'float16' or 'bfloat16'")
      .def_property_readonly("stride", [](const PyBank& b) { return b.s->get().stride(); },
                             "elements between consecutive rows (>= dim); view().strides[0] is stride x the element "
                             "size")
      .def_property_readonly("owned_by_engine", [](const PyBank& b) { return static_cast<bool>(b.s->in); })
      .def("__len__", [](const PyBank& b) { return b.s->get().size(); })
      .def("view", &bank_view,
           "The stored rows as a read-only (N, D) array, no copy (strides follow the bank's padded rows): float32, "
           "float16, or for a bfloat16 bank the raw uint16 words (numpy has no bfloat16; to_float32() widens). It "
           "keeps the bank alive and shows later updates.")
      .def("to_float32", [](const PyBank& b) {
             return to_numpy(with_bank(b, [](const Bank& bank) { return bank.to_matrix(); }));
           },
           "A copy of the rows widened to float32 (exactly), a fresh writable C-contiguous (N, D) array, for "
           "any dtype.")
      .def("last_update", [](const PyBank& b) {
             auto v = with_bank(b, [](const Bank& bank) { return bank.last_update(); });
             return to_numpy(std::move(v));
           }, "Copy of each row's last-update step (-1: never), int64 (N,).")
      .def("update", [](const PyBank& b, py::handle ids, py::handle features, double momentum, std::int64_t step,
                        const std::string& rounding, std::uint64_t seed) {
             if (b.s->in)
               throw Error(fmt::format("Bank.update: this bank belongs to {}: {}", b.s->in->owner_name(),
                                       dynamic_cast<const PyEngine*>(b.s->in.get())
                                           ? "use Engine.update(features, ids)"
                                           : "only its step refreshes rows"));
             const Rounding r = rounding_from_string(rounding);
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             py::gil_scoped_release nogil;
             std::lock_guard lk(b.s->mu);
             b.s->owned->momentum_update(y.span(), f.cmap(), momentum, step, r, seed);
           },
           py::arg("ids"), py::arg("features"), py::arg("momentum") = 0.5, py::arg("step") = 0,
           py::arg("rounding") = "nearest", py::arg("seed") = 0,
           "Momentum refresh v[ids[b]] <- normalise(m v + (1 - m) features[b]), in batch order; a 2-byte row is "
           "rounded once at the end, to nearest or stochastically (random bits keyed by seed, step and row).")
      .def("__repr__", [](const PyBank& b) {
        return fmt::format("membank.Bank(n={}, dim={}, dtype={}{})", b.s->get().size(), b.s->get().dim(),
                           to_string(b.s->get().dtype()), b.s->in ? ", owned by " + b.s->in->owner_name() : "");
      });

  // ---- samplers
  py::class_<PySampler>(m, "NoiseSampler", "P_n, the noise distribution (sampler.hpp).")
      .def_property_readonly("n", [](const PySampler& s) { return s.s->size(); })
      .def_property_readonly("kind", [](const PySampler& s) { return to_string(s.s->kind()); })
      .def("prob", [](const PySampler& s, index_t j) { return s.s->prob(j); }, py::arg("j"))
      .def("probs", [](const PySampler& s) { return to_numpy(s.s->probs()); }, "Every P_n(j), float64 (N,).")
      .def_property_readonly("cluster_state", [](const PySampler& s) -> py::object {
        const auto* c = dynamic_cast<const ClusterSampler*>(s.s.get());
        if (!c) return py::none();
        py::dict d;
        d["centroids"] = py::array_t<float>({c->centroids().rows(), c->centroids().cols()}, c->centroids().data());
        d["assignment"] = to_numpy(std::vector<std::int32_t>(c->assignment()));
        d["epsilon"] = c->epsilon();
        d["beta"] = c->config().beta;
        d["clusters"] = c->config().clusters;
        d["refresh_every"] = c->config().refresh_every;
        d["iterations"] = c->config().iterations;
        d["refreshed_at"] = c->refreshed_at();
        return d;
      }, "A ClusterSampler's state (copies): centroids float32 (C, D), assignment int32 (N,), epsilon (as "
         "realised), beta, clusters, refresh_every, iterations, refreshed_at; None for other samplers.")
      .def_property_readonly("ring_ranks", [](const PySampler& s) -> py::object {
        const auto* r = dynamic_cast<const RingSampler*>(s.s.get());
        if (!r) return py::none();
        return py::make_tuple(r->config().lower, r->config().upper);
      }, "A RingSampler's ranks (lower, upper); None for other samplers.")
      .def_property_readonly("biased", [](const PySampler& s) { return s.s->biased(); },
                             "Whether the draws are biased (RingSampler): see Engine's allow_biased_sampler.")
      .def("draw",
           [](const PySampler& s, index_t k, std::uint64_t seed, std::int64_t step, std::uint32_t row, py::object excluded) {
             if (k < 1) throw Error(fmt::format("draw(k = {}): expected k >= 1", k));
             std::vector<index_t> ex;
             if (!excluded.is_none()) {
               auto e = vector_arg<index_t>(excluded, "excluded", "int64", "(E,)");
               ex.assign(e.data, e.data + e.size);
               std::sort(ex.begin(), ex.end());
               ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
               for (index_t v : ex)
                 if (v < 0 || v >= s.s->size())
                   throw Error(fmt::format("excluded id {} is out of range: expected 0 <= id < N = {}", v, s.s->size()));
             }
             std::vector<index_t> ids(static_cast<std::size_t>(k));
             std::vector<float> lp(static_cast<std::size_t>(k));
             {
               py::gil_scoped_release nogil;
               s.s->draw(StreamKey{seed, step, row, 0}, ex, ids, lp);
             }
             return py::make_tuple(to_numpy(std::move(ids)), to_numpy(std::move(lp)));
           },
           py::arg("k"), py::arg("seed") = 0, py::arg("step") = 0, py::arg("row") = 0, py::arg("excluded") = py::none(),
           "k draws of the stream (seed, step, row): (ids int64, log P_n float32).")
      .def_property_readonly("weights", [](const PySampler& s) -> py::object {
        if (const auto* d = dynamic_cast<const DynamicSampler*>(s.s.get())) return py::object(to_numpy(std::vector<double>(d->weights())));
        if (const auto* a = dynamic_cast<const AliasSampler*>(s.s.get())) return py::object(to_numpy(std::vector<double>(a->weights().begin(), a->weights().end())));
        return py::none();
      }, "the weights (float64, N) of an alias or dynamic sampler (a copy), or None")
      .def_property_readonly("dynamic_state", [](const PySampler& s) -> py::object {
        const auto* d = dynamic_cast<const DynamicSampler*>(s.s.get());
        if (d == nullptr) return py::none();
        py::dict out;
        out["drive"] = to_string(d->params().drive);
        out["alpha"] = d->params().alpha;
        out["floor"] = d->params().floor;
        out["ema"] = d->ema().empty() ? py::object(py::none()) : py::object(to_numpy(std::vector<double>(d->ema())));
        return py::object(std::move(out));
      }, "a dynamic sampler's drive, alpha, floor and per-row loss average (NaN: never seen; None: drive none); "
         "None for the other kinds");
  m.def("DynamicSampler", [](py::handle weights, const std::string& drive, double alpha, double floor) {
          auto w = vector_arg<double>(weights, "weights", "float64", "(N,)");
          DynamicSampler::Params p;
          p.drive = dynamic_drive_from_string(drive);
          p.alpha = alpha;
          p.floor = floor;
          py::gil_scoped_release nogil;
          return PySampler{std::make_shared<DynamicSampler>(w.span(), p)};
        },
        py::arg("weights"), py::kw_only(), py::arg("drive") = "none", py::arg("alpha") = 0.9, py::arg("floor") = 0.1,
        "P_n(j) = w_j / sum(w) with weights that change during training (Engine.set_sampler_weights), exact at "
        "every step: a blocked alias table, O(128) per changed row plus O(N / 128) per call. drive='loss_ema': "
        "after each step the engine sets each batch row's weight to floor + max(ema, 0), ema its loss average "
        "(ema <- alpha ema + (1 - alpha) loss).");
  m.def("RingSampler",
        [](index_t n, index_t lower, index_t upper) { return PySampler{std::make_shared<RingSampler>(n, RingConfig{lower, upper})}; },
        py::arg("n"), py::kw_only(), py::arg("lower") = 0, py::arg("upper") = 4096,
        "A biased sampler of hard negatives (ring_sampler.hpp): for each query the bank's rows are ranked by "
        "score (highest first, ties by id) and the draws are uniform over ranks [lower, upper): Ring's "
        "neighbourhood, top-k sampling with lower = 0. The engine weighs its draws as uniform ones and needs "
        "allow_biased_sampler=True for every objective but contrastive and triplet.");
  m.def("UniformSampler", [](index_t n) { return PySampler{std::make_shared<UniformSampler>(n)}; }, py::arg("n"),
        "P_n(j) = 1/N.");
  m.def("AliasSampler", [](py::handle weights) {
          auto w = vector_arg<double>(weights, "weights", "float64", "(N,)");
          py::gil_scoped_release nogil;
          return PySampler{std::make_shared<AliasSampler>(w.span())};
        },
        py::arg("weights"), "P_n(j) = w_j / sum(w), Vose alias table (O(N) build, O(1) draws).");
  m.def("ClusterSampler",
        [](const PyBank& bank, index_t clusters, double epsilon, double beta, std::int64_t refresh_every,
           int iterations, std::uint64_t seed) {
          ClusterConfig c;
          c.clusters = clusters;
          c.epsilon = epsilon;
          c.beta = beta;
          c.refresh_every = refresh_every;
          c.iterations = iterations;
          c.seed = seed;
          return with_bank(bank, [&](const Bank& b) {
            return PySampler{std::make_shared<ClusterSampler>(b.view(), c)};
          });
        },
        py::arg("bank"), py::kw_only(), py::arg("clusters") = 1024, py::arg("epsilon") = 0.1, py::arg("beta") = 10.0,
        py::arg("refresh_every") = 0, py::arg("iterations") = 3, py::arg("seed") = 0,
        "A query-dependent proposal over k-means clusters of the bank (cluster_sampler.hpp): q(j | f) = eps / N + "
        "(1 - eps) pi_k(f) / n_k with pi_k(f) proportional to n_k exp(beta f . c_k). Fitted to the bank now; an "
        "Engine refreshes it every refresh_every steps (0: only on Engine.refresh_sampler()). The objectives use "
        "q(j | f) where they use P_n(j).");

  // ---- Engine
  py::class_<PyEngine, std::shared_ptr<PyEngine>>(m, "Engine",
                                                  "One training step of memory-bank instance discrimination (engine.hpp).")
      .def(py::init(&make_engine), py::arg("bank"), py::arg("sampler") = py::none(), py::kw_only(),
           py::arg("k") = 4096, py::arg("tau") = 0.07, py::arg("momentum") = 0.5, py::arg("objective") = "nce",
           py::arg("negatives") = "per-sample", py::arg("exclude_positive") = false,
           py::arg("z_policy") = "first_batch", py::arg("z_fixed") = 0.0, py::arg("z_ema") = 0.99,
           py::arg("seed") = 0, py::arg("normalize_features") = false, py::arg("unit_norm_tolerance") = 1e-3,
           py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0, py::arg("detach_weights") = false,
           py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0, py::arg("margin") = py::none(),
           py::arg("exclude_same_label") = false, py::arg("labels") = py::none(), py::arg("rounding") = "nearest",
           py::arg("allow_biased_sampler") = false, py::arg("comm") = py::none(), py::arg("distributed") = py::none(),
           "objective: nce, infonce, dcl, hcl, dhel, kcl, supcon, contrastive, triplet or full "
           "(docs/objectives.md); labels: int64 (N,), needed by supcon, contrastive, triplet and "
           "exclude_same_label; margin None: the objective's default (contrastive 1.0, triplet 0.2); "
           "rounding: 'nearest' or 'stochastic', how refreshed rows of a float16 / bfloat16 bank are rounded "
           "(the bank's dtype is chosen when the Bank is made); allow_biased_sampler: train a biased sampler's "
           "draws (RingSampler) weighed as uniform ones with an objective that needs a valid P_n (refused "
           "otherwise; contrastive and triplet take them as they are). comm, distributed: an mpi4py communicator and "
           "'replicated' | 'sharded': membank.Engine then makes a membank.DistributedEngine instead (builds with "
           "MPI only; membank.has_mpi).")
      .def_property_readonly("bank", [](std::shared_ptr<PyEngine> pe) {
        auto st = std::make_shared<BankState>();
        st->in = std::move(pe);
        return PyBank{st};
      })
      .def_property_readonly("config", [](const PyEngine& pe) { return config_dict(pe.engine->config()); })
      .def_property_readonly("dtype", [](const PyEngine& pe) { return to_string(pe.engine->bank().dtype()); },
                             "the bank's element type: 'float32', 'float16' or 'bfloat16'")
      .def_property_readonly("labels", [](PyEngine& pe) -> py::object {
        std::vector<std::int64_t> l;
        {
          py::gil_scoped_release nogil;
          std::lock_guard lk(pe.mu);
          l = pe.engine->labels();
        }
        if (l.empty()) return py::none();
        return py::object(to_numpy(std::move(l)));
      }, "the engine's labels (int64, N), or None")
      .def("set_labels", [](PyEngine& pe, py::handle labels) {
        const auto l = vector_arg<std::int64_t>(labels, "labels", "int64", "(N,)");
        with_engine(pe, [&](Engine& e) { e.set_labels(l.span()); });
      }, py::arg("labels"), "One int64 label per instance (supcon, contrastive, triplet, exclude_same_label).")
      .def("set_sampler_weights", [](PyEngine& pe, py::handle ids, py::handle weights) {
        const auto y = vector_arg<index_t>(ids, "ids", "int64", "(M,)");
        const auto w = vector_arg<double>(weights, "weights", "float64", "(M,)");
        with_engine(pe, [&](Engine& e) { e.set_sampler_weights(y.span(), w.span()); });
      }, py::arg("ids"), py::arg("weights"),
      "A dynamic sampler's weights: w[ids[k]] = weights[k], P_n exact from the next step on (a prefetch in "
      "flight is discarded). Error, nothing changed, on bad ids or weights or another sampler kind.")
      .def_property_readonly("sampler", [](const PyEngine& pe) {
        // A copy, so that the Python object never outlives what it points to.
        return PySampler{std::shared_ptr<const NoiseSampler>(copy_sampler(pe.engine->sampler()))};
      })
      .def_property_readonly("steps_done", [](PyEngine& pe) {
        py::gil_scoped_release nogil;
        std::lock_guard lk(pe.mu);
        return pe.engine->steps_done();
      })
      .def_property_readonly("z", [](PyEngine& pe) {
        py::gil_scoped_release nogil;
        std::lock_guard lk(pe.mu);
        return pe.engine->partition().z();
      }, "Z (NaN until the first NCE step sets it)")
      .def_property_readonly("log_z", [](PyEngine& pe) -> py::object {
        Partition p;
        {
          py::gil_scoped_release nogil;
          std::lock_guard lk(pe.mu);
          p = pe.engine->partition();
        }
        return p.initialised ? py::object(py::float_(p.log_z)) : py::none();
      }, "log Z, or None until initialised")
      .def("step",
           [](PyEngine& pe, py::handle features, py::handle ids, py::object out, bool update) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             return engine_step(pe, y, std::move(out), {{region_of(f), "features"}, {region_of(y), "ids"}},
                                [&](Engine& e, auto grad) { return e.step(f.cmap(), y.span(), grad, update); });
           },
           py::arg("features"), py::arg("ids"), py::arg("out") = py::none(), py::arg("update") = true,
           "One step: (loss, dL/dfeatures (B, D) float32, StepStats). Draws K negatives, scores the pre-update "
           "rows, then (update=True) refreshes the rows of ids.")
      .def("step_with_negatives",
           [](PyEngine& pe, py::handle features, py::handle ids, py::handle negatives, py::object out, bool update) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             auto neg = matrix_arg<index_t>(negatives, "negatives", "int64", "(B, K) or (1, K)");
             return engine_step(pe, y, std::move(out),
                                {{region_of(f), "features"}, {region_of(y), "ids"}, {region_of(neg), "negatives"}},
                                [&](Engine& e, auto grad) {
               return e.step_with_negatives(f.cmap(), y.span(), neg.cmap(), grad, update);
             });
           },
           py::arg("features"), py::arg("ids"), py::arg("negatives"), py::arg("out") = py::none(),
           py::arg("update") = true, "The same step with caller-supplied negatives (B, K) or shared (1, K).")
      .def("evaluate",
           [](PyEngine& pe, py::handle features, py::handle ids, py::handle negatives, py::object out) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             auto neg = matrix_arg<index_t>(negatives, "negatives", "int64", "(B, K) or (1, K)");
             return engine_step(pe, y, std::move(out),
                                {{region_of(f), "features"}, {region_of(y), "ids"}, {region_of(neg), "negatives"}},
                                [&](Engine& e, auto grad) {
               return e.evaluate(f.cmap(), y.span(), neg.cmap(), grad);
             });
           },
           py::arg("features"), py::arg("ids"), py::arg("negatives"), py::arg("out") = py::none(),
           "Loss and gradient only; bank, Z and counter untouched.")
      .def("update",
           [](PyEngine& pe, py::handle features, py::handle ids) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             with_engine(pe, [&](Engine& e) { e.update(f.cmap(), y.span()); });
           },
           py::arg("features"), py::arg("ids"), "Momentum refresh of the rows of ids.")
      .def("prefetch",
           [](PyEngine& pe, py::handle ids) {
             auto y = vector_arg<index_t>(ids, "next_ids", "int64", "(B,)");
             bool started = false;
             with_engine(pe, [&](Engine& e) { started = e.prefetch(y.span()); });
             return started;
           },
           py::arg("next_ids"),
           "Announce the next step's ids (e.g. from the data loader, before the forward pass): a background thread "
           "draws that step's negatives meanwhile; the next step with exactly these ids uses them (same results, "
           "stats.prefetched). Per-sample negatives only (returns False otherwise).")
      .def("refresh_sampler", [](PyEngine& pe) { with_engine(pe, [](Engine& e) { e.refresh_sampler(); }); },
           "Re-fit a ClusterSampler to the bank as it is now (e.g. once per epoch); Error for other samplers.")
      .def("sample",
           [](PyEngine& pe, py::handle ids, py::object step, py::object features) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             const bool next = step.is_none();
             const std::int64_t at = next ? 0 : step.cast<std::int64_t>();
             std::optional<Matrix2<float>> f;
             if (!features.is_none()) f = matrix_arg<float>(features, "features", "float32", "(B, D)");
             RowMatrixi r;
             {
               py::gil_scoped_release nogil;
               std::lock_guard lk(pe.mu);
               const std::int64_t s = next ? pe.engine->steps_done() : at;
               r = f ? pe.engine->sample(y.span(), s, f->cmap()) : pe.engine->sample(y.span(), s);
             }
             return to_numpy(std::move(r));
           },
           py::arg("ids"), py::arg("step") = py::none(), py::arg("features") = py::none(),
           "The negatives a step would draw at `step` (default: the next step): int64 (B, K) or (1, K). A "
           "ClusterSampler's draws depend on the queries: pass the step's features (float32 (B, D)).")
      .def("restore_state",
           [](PyEngine& pe, std::int64_t step, py::object log_z) {
             const bool set_z = !log_z.is_none();
             const double lz = set_z ? log_z.cast<double>() : 0.0;
             py::gil_scoped_release nogil;
             std::lock_guard lk(pe.mu);
             Partition p = pe.engine->partition();
             if (set_z) {
               p.initialised = true;
               p.log_z = lz;
             }
             pe.engine->restore_state(p, step);
           },
           py::arg("step"), py::arg("log_z") = py::none(), "Set the step counter (and log Z) to resume a run.")
      .def("__repr__", [](const PyEngine& pe) {
        const auto& c = pe.engine->config();
        return fmt::format("membank.Engine(n={}, dim={}, dtype={}, k={}, tau={}, objective={}, negatives={}, "
                           "steps_done={})",
                           pe.engine->bank().size(), pe.engine->bank().dim(), to_string(pe.engine->bank().dtype()),
                           c.k, c.tau, to_string(c.objective), to_string(c.negatives), pe.engine->steps_done());
      });

  // ---- Queue (MoCo) and InBatch (SimCLR)
  py::class_<PyQueue, std::shared_ptr<PyQueue>>(m, "Queue", R"doc(
MoCo's memory (He et al., CVPR 2020; membank/queue.hpp): a ring of Q keys from the caller's momentum
encoder, the shared negatives of every query, refreshed first in, first out. A step scores each query
against its positive key and the whole queue, returns the loss and dL/dqueries (no gradient flows
into the keys), then enqueues the batch's keys (the oldest go out; Q need not be a multiple of B).

A new queue holds Q seeded unit keys (seed) with no id and no label. With exclude_positive, a slot
holding the query's own instance id (an accidental hit) is no negative of that query; with
exclude_same_label, neither is a slot of its label. Objectives: infonce (MoCo's), dcl, hcl, dhel, kcl,
and with labels supcon, contrastive, triplet (nce and full need a bank: membank.Error).)doc")
      .def(py::init([](index_t capacity, index_t dim, const std::string& objective, double tau, py::handle dtype,
                       std::uint64_t seed, bool exclude_positive, bool exclude_same_label, bool normalize_features,
                       double unit_norm_tolerance, double tau_plus, double beta, bool detach_weights, double kernel_t,
                       double gamma, py::object margin, const std::string& rounding, py::object comm) {
             // Queue(..., comm=...) is turned into a DistributedQueue by Queue.__new__ (membank/__init__.py)
             // before this runs; here only when the build has no MPI, or when _membank is used on its own.
             if (!comm.is_none()) memory_comm_refused("Queue");
             const EngineConfig c = make_config(objective, tau, exclude_positive, seed, normalize_features,
                                                unit_norm_tolerance, tau_plus, beta, detach_weights, kernel_t, gamma,
                                                margin, exclude_same_label, rounding);
             return make_queue(capacity, dim, c, dtype_arg(dtype));
           }),
           py::arg("capacity"), py::arg("dim"), py::arg("objective") = "infonce", py::arg("tau") = 0.07, py::kw_only(),
           py::arg("dtype") = "float32", py::arg("seed") = 0, py::arg("exclude_positive") = false,
           py::arg("exclude_same_label") = false, py::arg("normalize_features") = false,
           py::arg("unit_norm_tolerance") = 1e-3, py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0,
           py::arg("detach_weights") = false, py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0,
           py::arg("margin") = py::none(), py::arg("rounding") = "nearest", py::arg("comm") = py::none(),
           "A queue of Q = capacity keys of dimension dim, stored as dtype ('float32', 'float16', 'bfloat16'). The "
           "objective keywords are Engine's (same names, same defaults but objective = 'infonce'); rounding: how an "
           "enqueued key is rounded to a 2-byte dtype ('nearest' | 'stochastic'). comm: an mpi4py communicator: "
           "membank.Queue then makes a membank.DistributedQueue instead (builds with MPI only; membank.has_mpi).")
      .def("step",
           [](PyQueue& pq, py::handle queries, py::handle keys, py::handle ids, py::handle labels, bool enqueue,
              py::object out) {
             return queue_call(pq, queries, keys, ids, labels, std::move(out),
                               [&](Queue& q, auto qm, auto km, auto g, auto y, auto l) {
                                 return q.step(qm, km, g, y, l, enqueue);
                               });
           },
           py::arg("queries"), py::arg("keys"), py::arg("ids") = py::none(), py::arg("labels") = py::none(),
           py::arg("enqueue") = true, py::arg("out") = py::none(),
           "One step: (loss, dL/dqueries (B, D) float32, StepStats), as Engine.step. queries: float32 (B, D) from the "
           "encoder being trained; keys: their positive keys, float32 (B, D) from the momentum encoder (unit rows, "
           "unless normalize_features); ids, labels: int64 (B,) or None (stored with the keys; what exclude_positive "
           "and the labelled objectives compare). Scores against the queue as it is, then (enqueue=True) enqueues "
           "the keys. The step counter advances either way.")
      .def("evaluate",
           [](PyQueue& pq, py::handle queries, py::handle keys, py::handle ids, py::handle labels, py::object out) {
             return queue_call(pq, queries, keys, ids, labels, std::move(out),
                               [&](Queue& q, auto qm, auto km, auto g, auto y, auto l) {
                                 return q.evaluate(qm, km, g, y, l);
                               });
           },
           py::arg("queries"), py::arg("keys"), py::arg("ids") = py::none(), py::arg("labels") = py::none(),
           py::arg("out") = py::none(),
           "What step() would return now, changing nothing (no enqueue, no counter): (loss, dL/dqueries, StepStats).")
      .def("enqueue",
           [](PyQueue& pq, py::handle keys, py::handle ids, py::handle labels) {
             auto kf = matrix_arg<float>(keys, "keys", "float32", "(B, D)");
             auto y = optional_vector<index_t>(ids, "ids");
             auto l = optional_vector<std::int64_t>(labels, "labels");
             with_queue(pq, [&](Queue& q) { q.enqueue(kf.cmap(), y.span(), l.span()); });
           },
           py::arg("keys"), py::arg("ids") = py::none(), py::arg("labels") = py::none(),
           "Enqueue B keys (float32 (B, D)) with their ids and labels (int64 (B,) or None), without a step.")
      .def_property_readonly("capacity", [](const PyQueue& pq) { return pq.capacity; }, "Q")
      .def_property_readonly("dim", [](const PyQueue& pq) { return pq.dim; }, "D")
      .def_property_readonly("dtype", [](const PyQueue& pq) { return to_string(pq.dtype); },
                             "the keys' element type: 'float32', 'float16' or 'bfloat16'")
      .def_property_readonly("config", [](const PyQueue& pq) { return config_dict(pq.queue->config()); })
      .def_property_readonly("position", [](PyQueue& pq) { return with_queue(pq, [](Queue& q) { return q.position(); }); },
                             "the slot the next key is written to (the oldest key once the ring is full)")
      .def_property_readonly("enqueued", [](PyQueue& pq) { return with_queue(pq, [](Queue& q) { return q.enqueued(); }); },
                             "keys enqueued since the queue was made")
      .def_property_readonly("steps_done", [](PyQueue& pq) {
        return with_queue(pq, [](Queue& q) { return q.steps_done(); });
      })
      .def("keys", [](PyQueue& pq) { return to_numpy(with_queue(pq, [](Queue& q) { return q.keys().to_matrix(); })); },
           "A copy of the keys in slot order, widened to float32 (exactly): (Q, D).")
      .def("last_update", [](PyQueue& pq) {
             return to_numpy(with_queue(pq, [](Queue& q) { return q.keys().last_update(); }));
           }, "Per slot, the step counter at which its key was enqueued (-1: a seeded key), int64 (Q,).")
      .def("ids", [](PyQueue& pq) { return to_numpy(with_queue(pq, [](Queue& q) { return q.ids(); })); },
           "Per slot, the instance id of its key (-1: none), int64 (Q,) (a copy).")
      .def("labels", [](PyQueue& pq) { return to_numpy(with_queue(pq, [](Queue& q) { return q.labels(); })); },
           "Per slot, the label of its key (0 where labelled() is False), int64 (Q,) (a copy).")
      .def("labelled", [](PyQueue& pq) {
             py::array_t<bool> a(pq.capacity);
             bool* dst = a.mutable_data();
             with_queue(pq, [&](Queue& q) {
               for (std::size_t j = 0; j < q.labelled().size(); ++j) dst[j] = q.labelled()[j] != 0;
             });
             return a;
           }, "Per slot, whether its key has a label, bool (Q,) (a copy).")
      .def("state", &queue_state,
           "The whole state as a dict of copies: keys (Q, D) as stored (float32, float16, or bfloat16's uint16 "
           "words), last_update, ids, labels (int64 (Q,)), labelled (bool (Q,)), position, enqueued, step, and "
           "capacity, dim, dtype. restore(state) on a queue of the same Q, D and dtype continues bit for bit.")
      .def("restore", &queue_restore, py::arg("state"),
           "Replace the state with a dict from state() (resume). Everything is checked first (shapes, dtypes, ranges, "
           "unit keys): a refused state raises and changes nothing.")
      .def(py::pickle(&queue_getstate, &queue_setstate))
      .def("__repr__", [](PyQueue& pq) {
        const auto [position, steps] =
            with_queue(pq, [](Queue& q) { return std::pair{q.position(), q.steps_done()}; });
        const EngineConfig& c = pq.queue->config();
        return fmt::format("membank.Queue(capacity={}, dim={}, dtype={}, objective={}, tau={}, position={}, "
                           "steps_done={})", pq.capacity, pq.dim, to_string(pq.dtype), to_string(c.objective), c.tau,
                           position, steps);
      });

  py::class_<InBatch>(m, "InBatch", R"doc(
SimCLR's negatives (Chen et al., ICML 2020; membank/in_batch.hpp): no stored memory, the other samples
of the batch. A step takes two views of B instances, a and b (2B samples); each sample's positive is
its partner, its negatives the other 2B - 2 samples (infonce: NT-Xent). The loss is the mean over the
2B samples; the gradient of each view collects both roles of its samples, dL/dZ = (C + C^T) Z. With
exclude_positive and ids, samples of the same instance id are no negatives of each other; with
exclude_same_label, no sample of the query's label. Stateless: step() may run in several threads.)doc")
      .def(py::init([](const std::string& objective, double tau, bool exclude_positive, bool exclude_same_label,
                       bool normalize_features, double unit_norm_tolerance, double tau_plus, double beta,
                       bool detach_weights, double kernel_t, double gamma, py::object margin, py::object comm) {
             if (!comm.is_none()) memory_comm_refused("InBatch");  // as Queue(comm=...)
             return InBatch(make_config(objective, tau, exclude_positive, 0, normalize_features, unit_norm_tolerance,
                                        tau_plus, beta, detach_weights, kernel_t, gamma, margin, exclude_same_label,
                                        "nearest"));
           }),
           py::arg("objective") = "infonce", py::arg("tau") = 0.07, py::kw_only(), py::arg("exclude_positive") = false,
           py::arg("exclude_same_label") = false, py::arg("normalize_features") = false,
           py::arg("unit_norm_tolerance") = 1e-3, py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0,
           py::arg("detach_weights") = false, py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0,
           py::arg("margin") = py::none(), py::arg("comm") = py::none(),
           "The objective keywords are Engine's (same names, same defaults but objective = 'infonce'); nothing is "
           "stored or drawn, so there is no seed, dtype nor rounding. comm: an mpi4py communicator: membank.InBatch "
           "then makes a membank.DistributedInBatch instead (builds with MPI only; membank.has_mpi).")
      .def("step",
           [](const InBatch& ib, py::handle view_a, py::handle view_b, py::handle ids, py::handle labels,
              py::object out_a, py::object out_b) {
             auto a = matrix_arg<float>(view_a, "view_a", "float32", "(B, D)");
             auto b = matrix_arg<float>(view_b, "view_b", "float32", "(B, D)");
             auto y = optional_vector<index_t>(ids, "ids");
             auto l = optional_vector<std::int64_t>(labels, "labels");
             if (a.rows < 2)
               throw Error(fmt::format("view_a has {} rows: expected B >= 2 instances (a sample's negatives are the "
                                       "other 2B - 2 samples)", a.rows));
             const bool own_a = !out_a.is_none(), own_b = !out_b.is_none();
             auto ga = grad_buffer(std::move(out_a), a.rows, a.cols, "out_a");
             auto gb = grad_buffer(std::move(out_b), a.rows, a.cols, "out_b");
             const NamedRegion inputs[] = {{region_of(a), "view_a"}, {region_of(b), "view_b"}, {region_of(y), "ids"},
                                           {region_of(l), "labels"}};
             if (own_a) check_out_alone(ga, "out_a", inputs);
             if (own_b) check_out_alone(gb, "out_b", inputs);
             if (own_a && own_b) check_no_overlap(region_of(ga), "out_a", region_of(gb), "out_b");
             StepStats st;
             {
               py::gil_scoped_release nogil;
               st = ib.step(a.cmap(), b.cmap(), ga.map(), gb.map(), y.span(), l.span());
             }
             return py::make_tuple(st.loss, ga.arr, gb.arr, st);
           },
           py::arg("view_a"), py::arg("view_b"), py::arg("ids") = py::none(), py::arg("labels") = py::none(),
           py::arg("out_a") = py::none(), py::arg("out_b") = py::none(),
           "(loss, dL/dview_a, dL/dview_b, StepStats): Engine.step's tuple with a gradient per view. view_a, view_b: "
           "float32 (B, D), B >= 2 (unit rows, unless normalize_features); ids, labels: int64 (B,) or None, one per "
           "instance (both views share it). StepStats.step is 0 (no counter).")
      .def_property_readonly("config", [](const InBatch& ib) { return config_dict(ib.config()); })
      .def(py::pickle([](const InBatch& ib) { return py::make_tuple(config_dict(ib.config())); },
                      [](const py::tuple& t) {
                        if (t.size() != 1) throw Error("InBatch.__setstate__: expected the 1-tuple InBatch.__getstate__ returns");
                        return InBatch(config_from_options(t[0].cast<py::dict>(), "InBatch.__setstate__"));
                      }))
      .def("__repr__", [](const InBatch& ib) {
        return fmt::format("membank.InBatch(objective={}, tau={})", to_string(ib.config().objective), ib.config().tau);
      });

  // ---- MultiViewEngine (CMC)
  py::class_<PyMultiViewStats>(m, "MultiViewStats",
                               "What MultiViewEngine.step reports besides the gradients (multiview.hpp).")
      .def_property_readonly("loss", [](const PyMultiViewStats& s) { return s.stats.loss; },
                             "L, the sum of the pairs' losses (each the mean over the batch), in pair order")
      .def_property_readonly("pairs", [](const PyMultiViewStats& s) { return s.stats.pairs; },
                             "each pair's StepStats, in the order of pair_views (the engine's pairs)")
      .def_property_readonly("pair_views", [](const PyMultiViewStats& s) { return pairs_list(s.pairs); },
                             "the pairs (query view, bank view), in pair order")
      .def_property_readonly("step", [](const PyMultiViewStats& s) {
        return s.stats.pairs.empty() ? std::int64_t{0} : s.stats.pairs.front().step;
      }, "the step counter this step used")
      .def("pair", [](const PyMultiViewStats& s, index_t query, index_t bank) {
        for (std::size_t p = 0; p < s.pairs.size(); ++p)
          if (s.pairs[p] == ViewPair{query, bank}) return s.stats.pairs[p];
        throw Error(fmt::format("MultiViewStats.pair({}, {}): not a scored pair: expected one of {}", query, bank,
                                std::string(py::repr(pairs_list(s.pairs)))));
      }, py::arg("query"), py::arg("bank"), "The StepStats of pair (query view, bank view).")
      .def("__len__", [](const PyMultiViewStats& s) { return s.stats.pairs.size(); })
      .def("__repr__", [](const PyMultiViewStats& s) {
        std::string p;
        for (std::size_t i = 0; i < s.pairs.size(); ++i)
          p += fmt::format("{}({}, {}): {:.6g}", i ? ", " : "", s.pairs[i].query, s.pairs[i].bank, s.stats.pairs[i].loss);
        return fmt::format("MultiViewStats(loss={:.6g}, pairs=[{}])", s.stats.loss, p);
      });

  py::class_<PyMultiView, std::shared_ptr<PyMultiView>>(m, "MultiViewEngine", R"doc(
Contrastive multiview coding (Tian et al., CMC, ECCV 2020) over memory banks (membank/multiview.hpp):
V >= 2 views of the same N instances, one bank per view. A step takes every view's unit features
f^v (B, D) and the batch's ids, scores the ordered pairs (a, b) of the view graph -- view a's queries
against view b's bank, each pair exactly Engine's objective (NCE by default) -- and returns
L = sum over the pairs of L_ab and dL/df^a = sum over the pairs (a, b) of dL_ab/df^a. The negatives
are drawn once per step and shared by every pair (engine.sample(ids, step)); each pair has its own Z
state (z_policy per pair). Then each bank b is refreshed by momentum with view b's features.

A query-dependent sampler draws per pair: pair (a, b) from q(. | f^a) of its query view, weighed with
that q (engine.sample(ids, step, features, pair)). A ClusterSampler holds the clusters of view 0's
bank (fit it to that bank; refresh_sampler() re-fits it), so pairs with the same query view share
their draws; a RingSampler ranks each pair's own bank b (allow_biased_sampler=True, as for Engine).

graph: 'full' (every ordered pair a != b) or 'core' (view 0 with each other view: (0, b) and (b, 0));
for V = 2 both are [(0, 1), (1, 0)]. Pairs are listed in lexicographic order: the order of
stats.pairs, partitions and the gradient sums.)doc")
      .def(py::init(&make_multiview), py::arg("n") = py::none(), py::arg("dim") = py::none(),
           py::arg("views") = py::none(), py::arg("graph") = "full", py::arg("sampler") = py::none(), py::kw_only(),
           py::arg("banks") = py::none(), py::arg("weights") = py::none(), py::arg("dtype") = py::none(),
           py::arg("k") = 4096, py::arg("tau") = 0.07, py::arg("momentum") = 0.5, py::arg("objective") = "nce",
           py::arg("negatives") = "per-sample", py::arg("exclude_positive") = false,
           py::arg("z_policy") = "first_batch", py::arg("z_fixed") = 0.0, py::arg("z_ema") = 0.99,
           py::arg("seed") = 0, py::arg("normalize_features") = false, py::arg("unit_norm_tolerance") = 1e-3,
           py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0, py::arg("detach_weights") = false,
           py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0, py::arg("margin") = py::none(),
           py::arg("exclude_same_label") = false, py::arg("labels") = py::none(), py::arg("rounding") = "nearest",
           py::arg("allow_biased_sampler") = false,
           "n, dim, views (default 2): without banks=, view v's bank is Bank(n, dim, seed + v, dtype) -- what "
           "membank.Bank(n, dim, seed=seed + v) holds -- so view 0's bank is the one MemoryBankLoss(n, dim, "
           "seed=seed) starts from. banks: instead, a list of V float32 (N, D) arrays (copied, each row normalised, "
           "stored as dtype) or membank.Bank objects (copied bit for bit, dtype kept); n, dim, views, if given, must "
           "agree. dtype: None (float32), one dtype for every view, or a list of V ('float32', 'float16', "
           "'bfloat16'). sampler: a NoiseSampler over N (default uniform), or weights: float64 (N,) for an alias "
           "sampler; shared by the views, as are the labels. The other keywords are Engine's, with Engine's "
           "defaults (seed keys the draws and stochastic rounding).")
      .def("step",
           [](PyMultiView& pm, py::handle features, py::handle ids, bool update, py::object out) {
             return multiview_call(pm, features, ids, std::move(out),
                                   [&](MultiViewEngine& mv, std::span<const FeaturesRef> f, IdsRef y,
                                       std::span<GradRef> g) { return mv.step(f, y, g, update); });
           },
           py::arg("features"), py::arg("ids"), py::arg("update") = true, py::arg("out") = py::none(),
           "One step: (loss, [dL/df^v for each view, float32 (B, D)], MultiViewStats). features: a list of V "
           "float32 (B, D) arrays (unit rows unless normalize_features), one per view; ids: int64 (B,). Draws the "
           "negatives for the step counter, scores every pair against the pre-update banks, then (update=True) "
           "refreshes each bank with its view's features. The counter and the pairs' Z states advance either way. "
           "out: a list of V float32 (B, D) buffers to write the gradients into.")
      .def("evaluate",
           [](PyMultiView& pm, py::handle features, py::handle ids, py::object out) {
             return multiview_call(pm, features, ids, std::move(out),
                                   [&](MultiViewEngine& mv, std::span<const FeaturesRef> f, IdsRef y,
                                       std::span<GradRef> g) {
               const std::vector<Partition> before = mv.partitions();
               const std::int64_t step = mv.steps_done();
               MultiViewStats st = mv.step(f, y, g, false);
               mv.restore_state(before, step);  // the same states: cannot be refused
               return st;
             });
           },
           py::arg("features"), py::arg("ids"), py::arg("out") = py::none(),
           "What step() would return now, changing nothing (no refresh; the counter and Z states are put back): "
           "(loss, [dL/df^v], MultiViewStats), with the negatives of the next step.")
      .def("update",
           [](PyMultiView& pm, py::handle features, py::handle ids) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             std::vector<Matrix2<float>> f = view_features_arg(features);
             std::vector<FeaturesRef> fr;
             fr.reserve(f.size());
             for (const auto& mat : f) fr.emplace_back(mat.cmap());
             with_multiview(pm, [&](MultiViewEngine& mv) { mv.update(fr, y.span()); });
           },
           py::arg("features"), py::arg("ids"),
           "Momentum refresh of every bank v with features[v] at ids (what step does when update=True), recording "
           "the current step counter.")
      .def("sample",
           [](PyMultiView& pm, py::handle ids, py::object step, py::object features, py::object pair) {
             auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
             const bool next = step.is_none();
             const std::int64_t at = next ? 0 : step.cast<std::int64_t>();
             if (features.is_none() != pair.is_none())
               throw Error("MultiViewEngine.sample: pass features= and pair= together (a query-dependent sampler's "
                           "draws are pair pair's, conditioned on its query view), or neither");
             std::vector<Matrix2<float>> f;
             if (!features.is_none()) f = view_features_arg(features);
             const bool per_pair = !pair.is_none();
             const index_t p = per_pair ? pair.cast<index_t>() : 0;
             if (p < 0) throw Error(fmt::format("MultiViewEngine.sample(pair = {}): expected a pair index >= 0", p));
             RowMatrixi r = with_multiview(pm, [&](MultiViewEngine& mv) {
               const std::int64_t s = next ? mv.steps_done() : at;
               if (!per_pair) return mv.sample(y.span(), s);
               std::vector<FeaturesRef> fr;
               for (const auto& mat : f) fr.emplace_back(mat.cmap());
               return mv.sample(y.span(), s, fr, static_cast<std::size_t>(p));
             });
             return to_numpy(std::move(r));
           },
           py::arg("ids"), py::arg("step") = py::none(), py::arg("features") = py::none(), py::arg("pair") = py::none(),
           "The negatives every pair of a step at `step` (default: the next step) uses: int64 (B, K) or (1, K), "
           "what Engine.sample draws with the same seed, sampler and configuration. A query-dependent sampler "
           "(cluster, ring) draws per pair: pass the step's features (a list of V float32 (B, D)) and pair, an "
           "index of pairs, for pair's draws.")
      .def("refresh_sampler",
           [](PyMultiView& pm) { with_multiview(pm, [](MultiViewEngine& mv) { mv.refresh_sampler(); }); },
           "Re-fit a ClusterSampler to view 0's bank as it is now (e.g. once per epoch); Error for other samplers.")
      .def("bank",
           [](PyMultiView& pm, index_t v) {
             return to_numpy(with_multiview(pm, [&](MultiViewEngine& mv) { return mv.bank(v).to_matrix(); }));
           },
           py::arg("v"), "A copy of view v's bank widened to float32 (exactly): (N, D).")
      .def("last_update",
           [](PyMultiView& pm, index_t v) {
             return to_numpy(with_multiview(pm, [&](MultiViewEngine& mv) { return mv.bank(v).last_update(); }));
           },
           py::arg("v"), "Copy of each row's last-update step in view v's bank (-1: never), int64 (N,).")
      .def_property_readonly("dtypes", [](PyMultiView& pm) {
        return with_multiview(pm, [&](MultiViewEngine& mv) {
          std::vector<std::string> d;
          for (index_t v = 0; v < mv.views(); ++v) d.push_back(to_string(mv.bank(v).dtype()));
          return d;
        });
      }, "each view's bank element type")
      .def_property_readonly("views", [](const PyMultiView& pm) { return pm.views; }, "V")
      .def_property_readonly("n", [](const PyMultiView& pm) { return pm.n; }, "N")
      .def_property_readonly("dim", [](const PyMultiView& pm) { return pm.dim; }, "D")
      .def_property_readonly("graph", [](const PyMultiView& pm) { return to_string(pm.mv->graph()); })
      .def_property_readonly("pairs", [](const PyMultiView& pm) { return pairs_list(pm.mv->pairs()); },
                             "the scored pairs (query view, bank view), in their fixed (lexicographic) order")
      .def("pair_index", [](const PyMultiView& pm, index_t query, index_t bank) { return pm.mv->pair_index(query, bank); },
           py::arg("query"), py::arg("bank"), "The position of pair (query, bank) in pairs.")
      .def_property_readonly("partitions", [](PyMultiView& pm) {
        const std::vector<Partition> ps = with_multiview(pm, [](MultiViewEngine& mv) { return mv.partitions(); });
        py::list out;
        for (const Partition& p : ps) out.append(p.initialised ? py::object(py::float_(p.log_z)) : py::none());
        return out;
      }, "each pair's log Z (None until initialised), in the order of pairs")
      .def_property_readonly("steps_done", [](PyMultiView& pm) {
        return with_multiview(pm, [](MultiViewEngine& mv) { return mv.steps_done(); });
      })
      .def("restore_state",
           [](PyMultiView& pm, py::handle partitions, std::int64_t step) {
             if (!py::isinstance<py::list>(partitions) && !py::isinstance<py::tuple>(partitions))
               throw py::type_error(fmt::format("partitions must be a list of log Z values (float, or None for an "
                                                "uninitialised pair), one per pair, as engine.partitions; got {}",
                                                type_name(partitions)));
             std::vector<Partition> ps;
             const ZPolicy policy = pm.mv->config().z_policy;
             index_t i = 0;
             for (py::handle h : py::reinterpret_borrow<py::sequence>(partitions)) {
               Partition p;
               p.policy = policy;
               if (!h.is_none()) {
                 try {
                   p.log_z = h.cast<double>();
                 } catch (py::cast_error&) {
                   throw py::type_error(fmt::format("partitions[{}] must be a float (log Z) or None; got {}", i,
                                                    type_name(h)));
                 }
                 p.initialised = true;
               }
               ps.push_back(p);
               ++i;
             }
             with_multiview(pm, [&](MultiViewEngine& mv) { mv.restore_state(std::move(ps), step); });
           },
           py::arg("partitions"), py::arg("step"),
           "Set every pair's log Z (a list as partitions returns it) and the step counter, to resume a run "
           "(with banks= holding the saved banks). membank.Error, nothing changed, on a wrong count, a non-finite "
           "log Z, a fixed policy's Z other than z_fixed, or step < 0.")
      .def_property_readonly("config", [](const PyMultiView& pm) { return config_dict(pm.mv->config()); })
      .def_property_readonly("sampler", [](const PyMultiView& pm) {
        return PySampler{std::shared_ptr<const NoiseSampler>(copy_sampler(pm.mv->sampler()))};
      })
      .def_property_readonly("labels", [](PyMultiView& pm) -> py::object {
        std::vector<std::int64_t> l = with_multiview(pm, [](MultiViewEngine& mv) { return mv.labels(); });
        if (l.empty()) return py::none();
        return py::object(to_numpy(std::move(l)));
      }, "the labels shared by the views (int64, N), or None")
      .def("set_labels", [](PyMultiView& pm, py::handle labels) {
        const auto l = vector_arg<std::int64_t>(labels, "labels", "int64", "(N,)");
        with_multiview(pm, [&](MultiViewEngine& mv) { mv.set_labels(l.span()); });
      }, py::arg("labels"), "One int64 label per instance, shared by the views (as Engine.set_labels).")
      .def("set_sampler_weights", [](PyMultiView& pm, py::handle ids, py::handle weights) {
        const auto y = vector_arg<index_t>(ids, "ids", "int64", "(M,)");
        const auto w = vector_arg<double>(weights, "weights", "float64", "(M,)");
        with_multiview(pm, [&](MultiViewEngine& mv) { mv.set_sampler_weights(y.span(), w.span()); });
      }, py::arg("ids"), py::arg("weights"), "A dynamic sampler's weights, shared by the views (as "
      "Engine.set_sampler_weights).")
      .def("__repr__", [](PyMultiView& pm) {
        const auto& c = pm.mv->config();
        const std::int64_t steps = with_multiview(pm, [](MultiViewEngine& mv) { return mv.steps_done(); });
        return fmt::format("membank.MultiViewEngine(n={}, dim={}, views={}, graph={}, k={}, tau={}, objective={}, "
                           "negatives={}, steps_done={})", pm.n, pm.dim, pm.views, to_string(pm.mv->graph()), c.k,
                           c.tau, to_string(c.objective), to_string(c.negatives), steps);
      });

  // ---- DistributedEngine (builds with MPI)
#ifdef MEMBANK_PYTHON_MPI
  m.attr("has_mpi") = true;
  py::class_<PyDistEngine, std::shared_ptr<PyDistEngine>>(m, "DistributedEngine", R"doc(
One logical bank serving the R ranks of an MPI communicator (membank/distributed.hpp): a step is the
single-process Engine's step on the global batch, the ranks' slices concatenated in rank order -- the
same negatives, the same loss (the global mean), the same dL/df rows, the same refresh. Every rank
passes its own slice (B_r >= 1 rows) and gets its own rows of dL/df and the global StepStats.

distributed: 'replicated' (every rank holds all N rows) or 'sharded' (rank r holds rows
engine.rows = shard_rows(N, R, r)). Collective calls (marked) must be made by every rank, in the same
order; an argument refused on one rank raises on every rank (membank.Error naming it) and changes
nothing. Supported: step, step_with_negatives, set_labels, restore_state, knn_search, gather_bank,
gather_last_update, the accessors, and snapshots (membank.save_snapshot(path, engine) and
membank.load_snapshot(path, comm=..., distributed=...), collective); not available (membank.Error):
evaluate, sample, update, prefetch, bank (use local_bank or gather_bank).)doc")
      .def(py::init(&make_distributed_from_bank), py::arg("bank"), py::arg("sampler") = py::none(), py::kw_only(),
           py::arg("comm"), py::arg("distributed") = "replicated", py::arg("labels") = py::none(),
           "Collective. bank: a membank.Bank with all N rows, the same on every rank (replicated: checked; the "
           "engine takes it, as Engine does, and the Bank then shows the engine's rows; sharded: the engine copies "
           "this rank's rows and the Bank stays the caller's). comm: an mpi4py communicator (duplicated: the "
           "engine's messages never meet the caller's). The other keywords are Engine's (k, tau, momentum, "
           "objective, negatives, ..., rounding), with Engine's defaults; sampler, config and labels must be the "
           "same on every rank (checked).")
      .def_static("seeded", &make_distributed_seeded, py::arg("n"), py::arg("dim"), py::arg("seed") = 0,
                  py::arg("dtype") = "float32", py::arg("sampler") = py::none(), py::kw_only(), py::arg("comm"),
                  py::arg("distributed") = "replicated", py::arg("labels") = py::none(),
                  "Collective. The engine over the bank Bank(n, dim, seed, dtype) would be, each rank building only "
                  "the rows it holds (sharded: N / R rows each, never the whole bank).")
      .def_property_readonly("mode", [](const PyDistEngine& pd) { return to_string(pd.engine->mode()); },
                             "'replicated' or 'sharded'")
      .def_property_readonly("rank", [](const PyDistEngine& pd) { return pd.engine->rank(); })
      .def_property_readonly("ranks", [](const PyDistEngine& pd) { return pd.engine->ranks(); }, "R")
      .def_property_readonly("n", [](const PyDistEngine& pd) { return pd.engine->size(); }, "N, the global bank's rows")
      .def_property_readonly("dim", [](const PyDistEngine& pd) { return pd.engine->dim(); })
      .def_property_readonly("dtype", [](const PyDistEngine& pd) { return to_string(pd.engine->local_bank().dtype()); })
      .def_property_readonly("rows", [](const PyDistEngine& pd) {
        return py::make_tuple(pd.engine->rows().begin, pd.engine->rows().end);
      }, "(begin, end): the global rows this rank holds (all of them when replicated)")
      .def_property_readonly("local_bank", [](std::shared_ptr<PyDistEngine> pd) {
        auto st = std::make_shared<BankState>();
        st->in = std::move(pd);
        return PyBank{st};
      }, "This rank's rows as a membank.Bank (view(), to_float32(), last_update()): local row i is global row "
         "rows[0] + i. When it is a shard (sharded, R > 1), knn_evaluate and full_softmax_loss refuse it.")
      .def_property_readonly("bank", [](const PyDistEngine& pd) -> py::object {
        throw Error(fmt::format("DistributedEngine.bank: a distributed engine has no single bank object: use "
                                "local_bank (this rank's rows [{}, {}) of N = {}) or gather_bank(root) (all rows, on "
                                "one rank)", pd.engine->rows().begin, pd.engine->rows().end, pd.engine->size()));
      })
      .def_property_readonly("config", [](const PyDistEngine& pd) { return config_dict(pd.engine->config()); })
      .def_property_readonly("labels", [](PyDistEngine& pd) -> py::object {
        std::vector<std::int64_t> l = with_engine(pd, [](DistributedEngine& e) { return e.labels(); });
        if (l.empty()) return py::none();
        return py::object(to_numpy(std::move(l)));
      }, "the engine's labels (int64, N), or None")
      .def("set_labels", [](PyDistEngine& pd, py::handle labels) {
        std::vector<std::int64_t> l;
        all_ranks_agree(pd.guard, "DistributedEngine.set_labels", [&] {
          l = labels_arg(labels);
          if (labels.is_none()) throw Error("DistributedEngine.set_labels(None): expected int64 (N,) labels");
        });
        with_engine(pd, [&](DistributedEngine& e) { e.set_labels(l); });
      }, py::arg("labels"), "Collective. One int64 label per instance, N of them, the same on every rank.")
      .def("set_sampler_weights", [](PyDistEngine& pd, py::handle ids, py::handle weights) {
        std::vector<index_t> y;
        std::vector<double> w;
        all_ranks_agree(pd.guard, "DistributedEngine.set_sampler_weights", [&] {
          const auto iy = vector_arg<index_t>(ids, "ids", "int64", "(M,)");
          const auto iw = vector_arg<double>(weights, "weights", "float64", "(M,)");
          y.assign(iy.span().begin(), iy.span().end());
          w.assign(iw.span().begin(), iw.span().end());
        });
        with_engine(pd, [&](DistributedEngine& e) { e.set_sampler_weights(y, w); });
      }, py::arg("ids"), py::arg("weights"),
      "Collective. Engine.set_sampler_weights with the same ids and weights on every rank (checked by a hash).")
      .def("refresh_sampler", [](PyDistEngine& pd) { with_engine(pd, [](DistributedEngine& e) { e.refresh_sampler(); }); },
           "Collective. Re-fit a ClusterSampler to the bank as it is now on every rank (replicated mode); Error for "
           "other samplers.")
      .def_property_readonly("sampler", [](const PyDistEngine& pd) {
        return PySampler{std::shared_ptr<const NoiseSampler>(copy_sampler(pd.engine->sampler()))};
      })
      .def_property_readonly("steps_done", [](PyDistEngine& pd) {
        return with_engine(pd, [](DistributedEngine& e) { return e.steps_done(); });
      })
      .def_property_readonly("z", [](PyDistEngine& pd) {
        return with_engine(pd, [](DistributedEngine& e) { return e.partition().z(); });
      }, "Z (NaN until the first NCE step sets it); the same on every rank")
      .def_property_readonly("log_z", [](PyDistEngine& pd) -> py::object {
        const Partition p = with_engine(pd, [](DistributedEngine& e) { return e.partition(); });
        return p.initialised ? py::object(py::float_(p.log_z)) : py::none();
      }, "log Z, or None until initialised")
      .def_property_readonly("last_wire", [](PyDistEngine& pd) {
        const WireStats w = with_engine(pd, [](DistributedEngine& e) { return e.last_wire(); });
        py::dict d;
        d["bytes_sent"] = w.bytes_sent;
        d["collectives"] = w.collectives;
        return d;
      }, "the last step's traffic from this rank: {'bytes_sent': payload bytes handed to MPI for other ranks, "
         "'collectives': collective calls}")
      .def("step",
           [](PyDistEngine& pd, py::handle features, py::handle ids, py::object out, bool update) {
             std::optional<Vector1<index_t>> y;
             std::optional<Matrix2<float>> f;
             return dist_step(pd, "DistributedEngine.step", std::move(out), [&] {
               y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
               f = matrix_arg<float>(features, "features", "float32", "(B, D)");
               return StepInputs{checked_batch(*y), {{region_of(*f), "features"}, {region_of(*y), "ids"}}};
             }, [&](DistributedEngine& e, auto grad) { return e.step(f->cmap(), y->span(), grad, update); });
           },
           py::arg("features"), py::arg("ids"), py::arg("out") = py::none(), py::arg("update") = true,
           "Collective. Engine.step on the global batch: this rank passes its slice (features (B_r, D) float32, ids "
           "(B_r,) int64, B_r >= 1) and gets (loss, its rows of dL/dfeatures (B_r, D), StepStats), the loss and "
           "StepStats those of the global batch (its mean), the same on every rank. update=False: the rows are not "
           "refreshed (Z and the step counter still advance, as Engine.step).")
      .def("step_with_negatives",
           [](PyDistEngine& pd, py::handle features, py::handle ids, py::handle negatives, py::object out, bool update) {
             std::optional<Vector1<index_t>> y;
             std::optional<Matrix2<float>> f;
             std::optional<Matrix2<index_t>> neg;
             return dist_step(pd, "DistributedEngine.step_with_negatives", std::move(out), [&] {
               y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
               f = matrix_arg<float>(features, "features", "float32", "(B, D)");
               neg = matrix_arg<index_t>(negatives, "negatives", "int64", "(B, K) or (1, K)");
               return StepInputs{checked_batch(*y),
                                 {{region_of(*f), "features"}, {region_of(*y), "ids"}, {region_of(*neg), "negatives"}}};
             }, [&](DistributedEngine& e, auto grad) {
               return e.step_with_negatives(f->cmap(), y->span(), neg->cmap(), grad, update);
             });
           },
           py::arg("features"), py::arg("ids"), py::arg("negatives"), py::arg("out") = py::none(),
           py::arg("update") = true,
           "Collective. The step with caller negatives: this rank's (B_r, K) rows (per-sample) or the batch's "
           "(1, K) (shared: the same on every rank, checked), global ids.")
      .def("gather_bank",
           [](PyDistEngine& pd, int root) -> py::object {
             RowMatrixf rows = with_engine(pd, [&](DistributedEngine& e) { return e.gather_bank(root); });
             if (pd.engine->rank() != root) return py::none();
             return to_numpy(std::move(rows));
           },
           py::arg("root") = 0,
           "Collective. The whole bank as an (N, D) float32 array (widened exactly) on `root`, None elsewhere: "
           "for evaluation and small banks (N x D x 4 bytes on root).")
      .def("gather_last_update",
           [](PyDistEngine& pd, int root) -> py::object {
             std::vector<std::int64_t> l = with_engine(pd, [&](DistributedEngine& e) { return e.gather_last_update(root); });
             if (pd.engine->rank() != root) return py::none();
             return to_numpy(std::move(l));
           },
           py::arg("root") = 0, "Collective. Every row's last-update step, int64 (N,), on `root`; None elsewhere.")
      .def("knn_search",
           [](PyDistEngine& pd, py::handle queries, py::handle k_arg) {
             constexpr const char* who = "DistributedEngine.knn_search";
             std::optional<Matrix2<float>> q;
             std::optional<py::array_t<float>> scores;
             std::optional<py::array_t<index_t>> ids;
             index_t k = 0;
             std::size_t size = 0;
             CancelHook hook;
             all_ranks_agree(pd.guard, who, [&] {
               // Made here, before the ranks agree: signal_hook() calls into Python, where a pending signal's
               // handler may raise; past the agreement nothing may raise before the engine's collectives.
               hook = signal_hook();
               q = matrix_arg<float>(queries, "queries", "float32", "(Q_r, D)");
               try {
                 k = k_arg.cast<index_t>();
               } catch (py::cast_error&) {
                 throw py::type_error(fmt::format("{}: k must be an int; got {}", who, type_name(k_arg)));
               }
               // k before the (Q_r, k) outputs are allocated; the engine checks the rest (the width D, the same
               // k on every rank).
               const index_t n = pd.engine->size();
               if (k < 1 || k > n)
                 throw Error(fmt::format("{}: k = {}: expected 1 <= k <= N = {} (the global bank's rows)", who, k, n));
               size = static_cast<std::size_t>(mul_no_overflow(q->rows, k, "knn_search's outputs, Q_r x k"));
               scores = py::array_t<float>({q->rows, k});
               ids = py::array_t<index_t>({q->rows, k});
             });
             const std::span<float> s(scores->mutable_data(), size);
             const std::span<index_t> i(ids->mutable_data(), size);
             try {
               with_engine(pd, [&](DistributedEngine& e) { e.knn_search(q->cmap(), k, s, i, hook); });
             } catch (const Cancelled&) {
               // This rank's hook stopped it: the KeyboardInterrupt its signal handler raised. Otherwise
               // another rank's did, and this rank says so (membank.Error).
               if (PyErr_Occurred() != nullptr) throw py::error_already_set();
               throw Cancelled(fmt::format("{}: the search was cancelled on another rank (a signal handler, e.g. "
                                           "Ctrl-C's KeyboardInterrupt, raised there); nothing was written on any "
                                           "rank", who));
             }
             return py::make_tuple(std::move(*scores), std::move(*ids));
           },
           py::arg("queries"), py::arg("k"),
           "Collective. membank.knn_search over the whole global bank: this rank passes its own queries (float32 "
           "(Q_r, D) with contiguous rows; Q_r may differ between ranks and may be 0, e.g. np.empty((0, D), np.float32)) "
           "and gets (scores float32 (Q_r, k), ids "
           "int64 (Q_r, k)): each row the k bank rows of the highest v_j . q, as global ids, best first; equal "
           "scores rank the smaller global id first. Every rank passes the same k, 1 <= k <= N (membank.Error on "
           "every rank otherwise). The single-process search of the whole bank, bit for bit (where every rank runs "
           "the same instruction-set path). Sharded: the queries are all-gathered, every rank searches its rows for all of them and each "
           "query's per-shard bests are merged on its rank. Ctrl-C (on the main thread) stops every rank, nothing "
           "written: KeyboardInterrupt on the rank where the signal arrived, membank.Error (the search was "
           "cancelled on another rank) on the others.")
      .def("restore_state",
           [](PyDistEngine& pd, std::int64_t step, py::object log_z) {
             std::optional<double> lz;
             all_ranks_agree(pd.guard, "DistributedEngine.restore_state", [&] {
               if (!log_z.is_none()) lz = log_z.cast<double>();
             });
             with_engine(pd, [&](DistributedEngine& e) {
               Partition p = e.partition();
               if (lz) {
                 p.initialised = true;
                 p.log_z = *lz;
               }
               e.restore_state(p, step);
             });
           },
           py::arg("step"), py::arg("log_z") = py::none(),
           "Collective. Set the step counter (and log Z) to resume a run: the same values on every rank.")
      .def("evaluate", [](const PyDistEngine&, py::args, py::kwargs) {
        not_distributed("evaluate", "a step without any state change has no distributed form; step(..., "
                        "update=False) leaves the rows as they are but advances Z and the step counter");
      })
      .def("sample", [](const PyDistEngine&, py::args, py::kwargs) {
        not_distributed("sample", "the negatives of a distributed step are drawn inside it (the same ones the "
                        "single-process Engine draws for the global batch: Engine.sample on the global ids)");
      })
      .def("update", [](const PyDistEngine&, py::args, py::kwargs) {
        not_distributed("update", "only the step refreshes rows (step(..., update=True))");
      })
      .def("prefetch", [](const PyDistEngine&, py::args, py::kwargs) -> bool {
        not_distributed("prefetch", "a distributed step draws its negatives itself");
      })
      .def("__repr__", [](const PyDistEngine& pd) {
        const auto& c = pd.engine->config();
        return fmt::format("membank.DistributedEngine(mode={}, rank={}, ranks={}, n={}, rows=[{}, {}), dim={}, "
                           "dtype={}, k={}, tau={}, objective={}, negatives={}, steps_done={})",
                           to_string(pd.engine->mode()), pd.engine->rank(), pd.engine->ranks(), pd.engine->size(),
                           pd.engine->rows().begin, pd.engine->rows().end, pd.engine->dim(),
                           to_string(pd.engine->local_bank().dtype()), c.k, c.tau, to_string(c.objective),
                           to_string(c.negatives), pd.engine->steps_done());
      });
#else
  m.attr("has_mpi") = false;
#endif

#ifdef MEMBANK_PYTHON_MPI
  // ---- DistributedQueue and DistributedInBatch (builds with MPI)
  py::class_<PyDistQueue, std::shared_ptr<PyDistQueue>>(m, "DistributedQueue", R"doc(
MoCo's queue over the R ranks of an MPI communicator (membank/distributed_memories.hpp): every rank
holds the whole ring, a step is Queue.step on the global batch (the ranks' slices concatenated in rank
order): this rank's queries are scored against the ring, its rows of dL/dq carry the 1/B of the global
batch mean, then every rank enqueues the whole global batch's keys in rank order -- the ring stays
identical on every rank, and to the single-process ring fed the global batches. The loss and StepStats
are the global batch's, the same on every rank.

Collective calls (step, restore, the constructors) must be made by every rank in the same order; an
argument refused on one rank raises on every rank (membank.Error naming it) and changes nothing.
Not available (membank.Error): evaluate and enqueue (a step enqueues the global batch).)doc")
      .def(py::init([](index_t capacity, index_t dim, const std::string& objective, double tau, py::handle dtype,
                       std::uint64_t seed, bool exclude_positive, bool exclude_same_label, bool normalize_features,
                       double unit_norm_tolerance, double tau_plus, double beta, bool detach_weights, double kernel_t,
                       double gamma, py::object margin, const std::string& rounding, py::object comm) {
             return make_dist_queue(comm, "DistributedQueue", [&] {
               const EngineConfig c = make_config(objective, tau, exclude_positive, seed, normalize_features,
                                                  unit_norm_tolerance, tau_plus, beta, detach_weights, kernel_t,
                                                  gamma, margin, exclude_same_label, rounding);
               return make_queue(capacity, dim, c, dtype_arg(dtype));
             });
           }),
           py::arg("capacity"), py::arg("dim"), py::arg("objective") = "infonce", py::arg("tau") = 0.07, py::kw_only(),
           py::arg("dtype") = "float32", py::arg("seed") = 0, py::arg("exclude_positive") = false,
           py::arg("exclude_same_label") = false, py::arg("normalize_features") = false,
           py::arg("unit_norm_tolerance") = 1e-3, py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0,
           py::arg("detach_weights") = false, py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0,
           py::arg("margin") = py::none(), py::arg("rounding") = "nearest", py::arg("comm"),
           "Collective. Queue's arguments (the same on every rank: checked) and comm, an mpi4py communicator "
           "(duplicated). membank.Queue(..., comm=comm) makes one.")
      .def_static("from_queue",
                  [](PyQueue& queue, py::object comm) {
                    return make_dist_queue(comm, "DistributedQueue.from_queue",
                                           [&] { return copy_queue(queue, "DistributedQueue.from_queue"); });
                  },
                  py::arg("queue"), py::kw_only(), py::arg("comm"),
                  "Collective. A DistributedQueue holding a copy of `queue` (configuration and whole state, e.g. a "
                  "restored ring); every rank passes the same queue (checked). `queue` itself is left as it is.")
      .def("step", &dist_queue_step, py::arg("queries"), py::arg("keys"), py::arg("ids") = py::none(),
           py::arg("labels") = py::none(), py::arg("enqueue") = true, py::arg("out") = py::none(),
           "Collective. Queue.step on the global batch: this rank passes its slice (queries, keys float32 (B_r, D), "
           "B_r >= 1; ids, labels int64 (B_r,) or None, on every rank or on none) and gets (loss, its rows of "
           "dL/dqueries (B_r, D), StepStats), the loss and StepStats the global batch's (its mean). enqueue: the "
           "same on every rank.")
      .def("evaluate", [](const PyDistQueue&, py::args, py::kwargs) {
        throw Error("DistributedQueue.evaluate is not available: a distributed step enqueues the global batch; "
                    "evaluate with a single-process membank.Queue (e.g. restored from DistributedQueue.state())");
      })
      .def("enqueue", [](const PyDistQueue&, py::args, py::kwargs) {
        throw Error("DistributedQueue.enqueue is not available: step() enqueues every rank's keys in rank order");
      })
      .def("restore", &dist_queue_restore, py::arg("state"),
           "Collective. Replace the ring with a dict from state() (the same on every rank: checked). A refused state "
           "raises on every rank and changes nothing.")
      .def_property_readonly("rank", [](const PyDistQueue& pd) { return pd.dq->rank(); })
      .def_property_readonly("ranks", [](const PyDistQueue& pd) { return pd.dq->ranks(); }, "R")
      .def_property_readonly("capacity", [](const PyDistQueue& pd) { return pd.capacity; }, "Q")
      .def_property_readonly("dim", [](const PyDistQueue& pd) { return pd.dim; }, "D")
      .def_property_readonly("dtype", [](const PyDistQueue& pd) { return to_string(pd.dtype); })
      .def_property_readonly("config", [](PyDistQueue& pd) {
        return config_dict(with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().config(); }));
      })
      .def_property_readonly("position", [](PyDistQueue& pd) {
        return with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().position(); });
      })
      .def_property_readonly("enqueued", [](PyDistQueue& pd) {
        return with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().enqueued(); });
      })
      .def_property_readonly("steps_done", [](PyDistQueue& pd) {
        return with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().steps_done(); });
      })
      .def("keys", [](PyDistQueue& pd) {
        return to_numpy(with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().keys().to_matrix(); }));
      }, "A copy of the ring's keys in slot order, widened to float32: (Q, D), the same on every rank.")
      .def("last_update", [](PyDistQueue& pd) {
        return to_numpy(with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().keys().last_update(); }));
      })
      .def("ids", [](PyDistQueue& pd) {
        return to_numpy(with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().ids(); }));
      })
      .def("labels", [](PyDistQueue& pd) {
        return to_numpy(with_dist_queue(pd, [](DistributedQueue& d) { return d.queue().labels(); }));
      })
      .def("labelled", [](PyDistQueue& pd) {
        py::array_t<bool> a(pd.capacity);
        bool* dst = a.mutable_data();
        with_dist_queue(pd, [&](DistributedQueue& d) {
          for (std::size_t j = 0; j < d.queue().labelled().size(); ++j) dst[j] = d.queue().labelled()[j] != 0;
        });
        return a;
      })
      .def("state", [](PyDistQueue& pd) {
        return queue_state_of(pd.capacity, pd.dim, pd.dtype,
                              [&](auto&& f) { return with_dist_queue(pd, [&](DistributedQueue& d) { return f(d.queue()); }); });
      }, "The ring's state as Queue.state() gives it (the same on every rank): Queue.restore / "
         "DistributedQueue.restore take it.")
      .def_property_readonly("last_wire", [](PyDistQueue& pd) {
        return wire_dict(with_dist_queue(pd, [](DistributedQueue& d) { return d.last_wire(); }));
      }, "the last step's traffic from this rank: {'bytes_sent', 'collectives'}")
      .def("__repr__", [](PyDistQueue& pd) {
        const auto [position, steps] = with_dist_queue(
            pd, [](DistributedQueue& d) { return std::pair{d.queue().position(), d.queue().steps_done()}; });
        const EngineConfig& c = pd.dq->queue().config();
        return fmt::format("membank.DistributedQueue(rank={}, ranks={}, capacity={}, dim={}, dtype={}, objective={}, "
                           "tau={}, position={}, steps_done={})", pd.dq->rank(), pd.dq->ranks(), pd.capacity, pd.dim,
                           to_string(pd.dtype), to_string(c.objective), c.tau, position, steps);
      });

  py::class_<PyDistInBatch, std::shared_ptr<PyDistInBatch>>(m, "DistributedInBatch", R"doc(
SimCLR's in-batch negatives over the R ranks of an MPI communicator (membank/distributed_memories.hpp):
a sample's negatives are the other 2B - 2 samples of the *global* batch (the ranks' slices concatenated
in rank order). A step all-gathers both views (and ids, labels), every rank runs InBatch.step on the
global batch and keeps its own rows of each view's gradient -- bit for bit the single-process rows.
The loss (the mean over the 2B global samples) and StepStats are the same on every rank. step is
collective; an argument refused on one rank raises on every rank (membank.Error naming it).)doc")
      .def(py::init([](const std::string& objective, double tau, bool exclude_positive, bool exclude_same_label,
                       bool normalize_features, double unit_norm_tolerance, double tau_plus, double beta,
                       bool detach_weights, double kernel_t, double gamma, py::object margin, py::object comm) {
             constexpr const char* who = "DistributedInBatch";
             const MPI_Comm caller = comm_arg(comm);
             auto pd = std::make_shared<PyDistInBatch>();
             pd->guard.dup(caller, who);
             EngineConfig c;
             all_ranks_agree(pd->guard.comm, who, [&] {
               c = make_config(objective, tau, exclude_positive, 0, normalize_features, unit_norm_tolerance, tau_plus,
                               beta, detach_weights, kernel_t, gamma, margin, exclude_same_label, "nearest");
               (void)InBatch(c);  // its own checks, on every rank before the collective
             });
             py::gil_scoped_release nogil;
             pd->ib = std::make_unique<DistributedInBatch>(caller, InBatch(c));
             return pd;
           }),
           py::arg("objective") = "infonce", py::arg("tau") = 0.07, py::kw_only(), py::arg("exclude_positive") = false,
           py::arg("exclude_same_label") = false, py::arg("normalize_features") = false,
           py::arg("unit_norm_tolerance") = 1e-3, py::arg("tau_plus") = 0.1, py::arg("beta") = 1.0,
           py::arg("detach_weights") = false, py::arg("kernel_t") = 2.0, py::arg("gamma") = 16.0,
           py::arg("margin") = py::none(), py::arg("comm"),
           "Collective. InBatch's keywords (the same on every rank: checked) and comm, an mpi4py communicator "
           "(duplicated). membank.InBatch(..., comm=comm) makes one.")
      .def("step",
           [](PyDistInBatch& pd, py::handle view_a, py::handle view_b, py::handle ids, py::handle labels,
              py::object out_a, py::object out_b) {
             Matrix2<float> a, b, ga, gb;
             Vector1<index_t> y;
             Vector1<std::int64_t> l;
             all_ranks_agree(pd.guard.comm, "DistributedInBatch.step", [&] {
               a = matrix_arg<float>(view_a, "view_a", "float32", "(B, D)");
               b = matrix_arg<float>(view_b, "view_b", "float32", "(B, D)");
               y = optional_vector<index_t>(ids, "ids");
               l = optional_vector<std::int64_t>(labels, "labels");
               if (a.rows < 1)
                 throw Error("view_a has 0 rows: expected this rank's slice of at least one instance (B_r >= 1)");
               const bool own_a = !out_a.is_none(), own_b = !out_b.is_none();
               ga = grad_buffer(out_a, a.rows, a.cols, "out_a");
               gb = grad_buffer(out_b, a.rows, a.cols, "out_b");
               const NamedRegion inputs[] = {{region_of(a), "view_a"}, {region_of(b), "view_b"},
                                             {region_of(y), "ids"}, {region_of(l), "labels"}};
               if (own_a) check_out_alone(ga, "out_a", inputs);
               if (own_b) check_out_alone(gb, "out_b", inputs);
               if (own_a && own_b) check_no_overlap(region_of(ga), "out_a", region_of(gb), "out_b");
             });
             StepStats st;
             {
               py::gil_scoped_release nogil;
               std::lock_guard lk(pd.mu);
               st = pd.ib->step(a.cmap(), b.cmap(), ga.map(), gb.map(), y.span(), l.span());
             }
             return py::make_tuple(st.loss, ga.arr, gb.arr, st);
           },
           py::arg("view_a"), py::arg("view_b"), py::arg("ids") = py::none(), py::arg("labels") = py::none(),
           py::arg("out_a") = py::none(), py::arg("out_b") = py::none(),
           "Collective. InBatch.step on the global batch: this rank passes its slice of both views (float32 "
           "(B_r, D), B_r >= 1; the global B >= 2) and ids / labels (int64 (B_r,) or None, on every rank or on "
           "none); returns (loss, its rows of dL/dview_a, of dL/dview_b, StepStats), the loss the global mean.")
      .def_property_readonly("rank", [](const PyDistInBatch& pd) { return pd.ib->rank(); })
      .def_property_readonly("ranks", [](const PyDistInBatch& pd) { return pd.ib->ranks(); }, "R")
      .def_property_readonly("config", [](const PyDistInBatch& pd) { return config_dict(pd.ib->in_batch().config()); })
      .def_property_readonly("last_wire", [](PyDistInBatch& pd) {
        WireStats w;
        {
          py::gil_scoped_release nogil;
          std::lock_guard lk(pd.mu);
          w = pd.ib->last_wire();
        }
        return wire_dict(w);
      }, "the last step's traffic from this rank: {'bytes_sent', 'collectives'}")
      .def("__repr__", [](const PyDistInBatch& pd) {
        const EngineConfig& c = pd.ib->in_batch().config();
        return fmt::format("membank.DistributedInBatch(rank={}, ranks={}, objective={}, tau={})", pd.ib->rank(),
                           pd.ib->ranks(), to_string(c.objective), c.tau);
      });
#endif

  // ---- exact full softmax, kNN
  m.def("full_softmax_loss",
        [](const PyBank& b, py::handle features, py::handle ids, double tau, py::object out,
           double unit_norm_tolerance) {
          auto y = vector_arg<index_t>(ids, "ids", "int64", "(B,)");
          auto f = matrix_arg<float>(features, "features", "float32", "(B, D)");
          require_whole_bank(b, "full_softmax_loss");
          const bool callers_out = !out.is_none();
          auto g = grad_buffer(out, checked_batch(y), b.s->get().dim());
          // On the whole arrays: the blocked calls below would each see only a part of an overlap.
          const NamedRegion inputs[] = {{region_of(f), "features"}, {region_of(y), "ids"}};
          if (callers_out) check_out_alone(g, inputs, b.s->get());
          const FullResult r = full_softmax_chunked(b, f, y, tau, g, unit_norm_tolerance);
          return py::make_tuple(r.loss, g.arr, r.mean_z, r.mean_p);
        },
        py::arg("bank"), py::arg("features"), py::arg("ids"), py::arg("tau") = 0.07, py::arg("out") = py::none(),
        py::arg("unit_norm_tolerance") = 1e-3,
        "Exact softmax over the whole bank: (loss, dL/dfeatures, mean Z_i, mean P(y_i|f_i)). Large calls run in "
        "blocks of 64 queries and stop at Ctrl-C between blocks (`out` then holds a partial result).");

  py::class_<KnnResult>(m, "KnnResult")
      .def_readonly("top1", &KnnResult::top1)
      .def_readonly("top5", &KnnResult::top5)
      .def_readonly("nn1", &KnnResult::nn1)
      .def_property_readonly("predictions", [](const KnnResult& r) {
        std::vector<std::int64_t> p(r.predictions.begin(), r.predictions.end());
        return to_numpy(std::move(p));
      })
      .def("__repr__", [](const KnnResult& r) {
        return fmt::format("KnnResult(top1={:.4f}, top5={:.4f}, nn1={:.4f})", r.top1, r.top5, r.nn1);
      });
  m.def("knn_evaluate",
        [](const PyBank& b, py::handle bank_labels, py::handle queries, py::handle query_labels, index_t k,
           double sigma) {
          require_whole_bank(b, "knn_evaluate");
          auto bl = vector_arg<std::int64_t>(bank_labels, "bank_labels", "int64", "(N,)");
          auto ql = vector_arg<std::int64_t>(query_labels, "query_labels", "int64", "(Q,)");
          auto q = matrix_arg<float>(queries, "queries", "float32", "(Q, D)");
          const auto to_int = [](const Vector1<std::int64_t>& v, const char* arg) {
            std::vector<int> out(static_cast<std::size_t>(v.size));
            for (index_t i = 0; i < v.size; ++i) {
              if (v.data[i] < 0 || v.data[i] > std::numeric_limits<int>::max())
                throw Error(fmt::format("{}[{}] = {}: expected a class label in [0, 2^31)", arg, i, v.data[i]));
              out[static_cast<std::size_t>(i)] = static_cast<int>(v.data[i]);
            }
            return out;
          };
          const std::vector<int> bank_l = to_int(bl, "bank_labels"), query_l = to_int(ql, "query_labels");
          if (static_cast<index_t>(query_l.size()) != q.rows)
            throw Error(fmt::format("query_labels has {} entries: expected Q = {} (one per query row)", query_l.size(),
                                    q.rows));
          return with_signal_hook([&](const CancelHook& hook) {
            return with_bank(b, [&](const Bank& bank) {
              return knn_evaluate(bank.view(), bank_l, q.cmap(), query_l,
                                  KnnOptions{.k = k, .sigma = sigma, .cancel = hook});
            });
          });
        },
        py::arg("bank"), py::arg("bank_labels"), py::arg("queries"), py::arg("query_labels"), py::arg("k") = 200,
        py::arg("sigma") = 0.07,
        "Weighted kNN (Wu et al.): labels int64, queries float32 (Q, D). Ctrl-C stops it (KeyboardInterrupt).");
  m.def("knn_search",
        [](const PyBank& b, py::handle queries, index_t k) {
          require_whole_bank(b, "knn_search");
          auto q = matrix_arg<float>(queries, "queries", "float32", "(Q, D)");
          // k before the (Q, k) outputs are allocated; the engine checks the rest (Q >= 1, the width D).
          const index_t n = b.s->get().size();
          if (k < 1 || k > n)
            throw Error(fmt::format("knn_search: k = {}: expected 1 <= k <= N = {} (the bank's rows)", k, n));
          const auto size = static_cast<std::size_t>(mul_no_overflow(q.rows, k, "knn_search's outputs, Q x k"));
          py::array_t<float> scores({q.rows, k});
          py::array_t<index_t> ids({q.rows, k});
          const std::span<float> s(scores.mutable_data(), size);
          const std::span<index_t> i(ids.mutable_data(), size);
          with_signal_hook([&](const CancelHook& hook) {
            with_bank(b, [&](const Bank& bank) { knn_search(bank.view(), q.cmap(), k, s, i, hook); });
          });
          return py::make_tuple(std::move(scores), std::move(ids));
        },
        py::arg("bank"), py::arg("queries"), py::arg("k"),
        "(scores, ids): the k bank rows of the highest score s_j = v_j . q for each query row, like faiss's "
        "IndexFlatIP.search(queries, k). queries: float32 (Q, D) with contiguous rows (unit rows for cosine); the "
        "bank may be stored as float32, float16 or bfloat16 (its rows widened to float32 exactly). Returns scores "
        "float32 (Q, k), the float32 products, and ids int64 (Q, k), the rows, each row best first; equal scores "
        "rank the smaller id first. 1 <= k <= N (membank.Error otherwise). The same results for any thread count. "
        "Ctrl-C stops it (KeyboardInterrupt).");

  // ---- snapshots
  m.def("save_snapshot",
        [](const std::string& path, PyEngine& pe, int deflate_level, py::object labels) {
          Vector1<std::int64_t> l;
          if (!labels.is_none()) l = vector_arg<std::int64_t>(labels, "labels", "int64", "(N,)");
          py::gil_scoped_release nogil;
          std::lock_guard hl(hdf5_mutex());
          std::lock_guard lk(pe.mu);
          save_snapshot(path, *pe.engine, SnapshotOptions{deflate_level}, l.span());
        },
        py::arg("path"), py::arg("engine"), py::arg("deflate_level") = 0, py::arg("labels") = py::none(),
        "Save the whole engine state to an HDF5 file, atomically (snapshot.hpp).");
#ifdef MEMBANK_PYTHON_MPI
  m.def("save_snapshot", &save_distributed, py::arg("path"), py::arg("engine"), py::arg("deflate_level") = 0,
        py::arg("labels") = py::none(),
        "Collective: every rank of a DistributedEngine calls it, with the same path and deflate_level. Sharded: a "
        "shard set (a shard file per rank next to `path`, and the master `path`, whose virtual datasets bank, "
        "last_update and labels h5py reads as whole arrays); replicated: one ordinary snapshot written by rank 0. "
        "Atomic as a set; the engine's own labels are saved (labels= is refused: use engine.set_labels). Any "
        "rank count, in either mode, loads it (load_snapshot(path, comm=...)), and so does load_snapshot(path) in "
        "one process. An error on any rank raises membank.Error on every rank (distributed_snapshot.hpp).");
#endif
  m.def("load_snapshot",
        [](py::handle path, bool return_labels, py::object comm, py::object distributed) -> py::object {
          if (comm.is_none()) {
            if (!distributed.is_none())
              throw Error(fmt::format("load_snapshot(distributed = {}): needs comm=, the mpi4py communicator of the "
                                      "ranks (e.g. mpi4py.MPI.COMM_WORLD)", std::string(py::repr(distributed))));
            const std::string p = path_arg(path, "load_snapshot");
            auto pe = std::make_shared<PyEngine>();
            std::vector<std::int64_t> labels;
            {
              py::gil_scoped_release nogil;
              std::lock_guard hl(hdf5_mutex());
              pe->engine = std::make_unique<Engine>(load_snapshot(p, return_labels ? &labels : nullptr));
            }
            if (!return_labels) return py::cast(pe);
            return py::make_tuple(pe, labels.empty() ? py::object(py::none()) : py::object(to_numpy(std::move(labels))));
          }
#ifdef MEMBANK_PYTHON_MPI
          auto pd = load_distributed(path, comm, distributed);
          if (!return_labels) return py::cast(pd);
          std::vector<std::int64_t> labels = pd->engine->labels();
          return py::make_tuple(pd, labels.empty() ? py::object(py::none()) : py::object(to_numpy(std::move(labels))));
#else
          throw Error("load_snapshot(comm=...): this membank was built without MPI (MEMBANK_MPI=OFF, or MPI not "
                      "found at configure time), so there is no DistributedEngine: install libopenmpi-dev and "
                      "python3-mpi4py, reconfigure, and rebuild");
#endif
        },
        py::arg("path"), py::arg("return_labels") = false, py::kw_only(), py::arg("comm") = py::none(),
        py::arg("distributed") = py::none(),
        "An Engine that continues exactly where the saved one stopped; with return_labels, (engine, labels or None). "
        "A snapshot file, or the master of a shard set (a sharded DistributedEngine's snapshot). With comm= (an "
        "mpi4py communicator; collective, the same path on every rank): a membank.DistributedEngine over its ranks "
        "in mode distributed ('replicated', the default, or 'sharded'), from a shard set saved by any number of "
        "ranks or a single file; an error on any rank raises membank.Error on every rank.");
  m.def("read_snapshot_info", [](const std::string& path) {
          SnapshotInfo i;
          {
            py::gil_scoped_release nogil;
            std::lock_guard hl(hdf5_mutex());
            i = read_snapshot_info(path);
          }
          py::dict d;
          d["format"] = i.format;
          d["format_version"] = i.format_version;
          d["engine_version"] = i.engine_version;
          d["n"] = i.n;
          d["dim"] = i.dim;
          d["dtype"] = to_string(i.dtype);
          d["step"] = i.step;
          d["config"] = config_dict(i.config);
          d["z_initialised"] = i.partition.initialised;
          d["log_z"] = i.partition.log_z;
          d["sampler"] = to_string(i.sampler);
          if (i.sampler == SamplerKind::dynamic) {
            d["sampler_drive"] = to_string(i.sampler_params.drive);
            d["sampler_alpha"] = i.sampler_params.alpha;
            d["sampler_floor"] = i.sampler_params.floor;
          }
          d["has_labels"] = i.has_labels;
          d["rows_per_chunk"] = i.rows_per_chunk;
          d["compressed"] = i.compressed;
          return d;
        },
        py::arg("path"));
  m.def("verify_snapshot", [](const std::string& path) {
          py::gil_scoped_release nogil;
          std::lock_guard hl(hdf5_mutex());
          return verify_snapshot(path);
        },
        py::arg("path"), "Problems found (an empty list: sound).");
  m.def("import_bank", [](const std::string& path, const std::string& dataset, py::handle dtype) {
          const DType t = dtype_arg(dtype);
          index_t renorm = 0;
          auto st = std::make_shared<BankState>();
          {
            py::gil_scoped_release nogil;
            std::lock_guard hl(hdf5_mutex());
            st->owned = std::make_unique<Bank>(import_bank(path, dataset, &renorm, t));
          }
          return py::make_tuple(PyBank{st}, renorm);
        },
        py::arg("path"), py::arg("dataset") = "bank", py::arg("dtype") = "float32",
        "(Bank, rows renormalised) from a plain (N, D) dataset (float16 / float32 / float64, or bfloat16 words), "
        "stored as dtype.");

  // ---- timing of the same step in C++ (the benchmark's reference)
  m.def("time_steps",
        [](PyEngine& pe, py::handle features, py::handle ids) {
          // features (S, B, D) float32 C-contiguous, ids (S, B) int64: S steps, each timed alone.
          py::array fa = require_ndarray(features, "features", "a C-contiguous float32 (S, B, D) array");
          require_dtype<float>(fa, "features", "a C-contiguous float32 (S, B, D) array", "float32");
          if (fa.ndim() != 3 || !(fa.flags() & py::array::c_style))
            throw py::value_error("features must be a C-contiguous (S, B, D) float32 array: pass np.ascontiguousarray");
          auto y = matrix_arg<index_t>(ids, "ids", "int64", "(S, B)");
          const index_t steps = fa.shape(0), batch = fa.shape(1), dim = fa.shape(2);
          if (y.rows != steps || y.cols != batch || y.stride != batch)
            throw py::value_error("ids must be a C-contiguous (S, B) int64 array matching features (S, B, D)");
          const auto* f0 = static_cast<const float*>(fa.data());
          std::vector<double> ms(static_cast<std::size_t>(steps));
          RowMatrixf grad(batch, dim);
          py::gil_scoped_release nogil;
          std::lock_guard lk(pe.mu);
          for (index_t s = 0; s < steps; ++s) {
            Eigen::Map<const RowMatrixf> f(f0 + s * batch * dim, batch, dim);
            const auto t0 = std::chrono::steady_clock::now();
            pe.engine->step(f, IdsRef(y.data + s * batch, static_cast<std::size_t>(batch)), grad, true);
            ms[static_cast<std::size_t>(s)] =
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
          }
          py::gil_scoped_acquire gil;
          return to_numpy(std::move(ms));
        },
        py::arg("engine"), py::arg("features"), py::arg("ids"),
        "Run S engine steps in a C++ loop (no Python between them) and return each one's time in ms.");
}
