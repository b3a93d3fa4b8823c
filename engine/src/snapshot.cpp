#include <membank/cluster_sampler.hpp>
#include <membank/error.hpp>
#include <membank/ring_sampler.hpp>
#include <membank/snapshot.hpp>
#include <membank/version.hpp>

#include "detail/check.hpp"
#include "detail/half.hpp"
#include "detail/snapshot_parts.hpp"

#include <hdf5.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <utility>

namespace membank {

namespace {

constexpr const char* kFormat = "membank-snapshot";
// A shard file of a shard set (docs/snapshot-format.md): rows [row_begin, row_end) of the bank.
constexpr const char* kShardFormat = "membank-snapshot-shard";
constexpr int kShardFormatVersion = 1;
// 3: the bank's dtype (2-byte banks) and the rounding; 2: the objectives' parameters; 1: nce, infonce,
// full only. Versions 1 and 2 are still read (a float32 bank, nearest rounding). An engine snapshot is
// still written as version 3 (with the attribute kind = "engine", which earlier readers ignore).
constexpr int kFormatVersion = 3;
// 4: the kinds queue and multiview (docs/snapshot-format.md); only they are written as version 4, so
// an earlier membank refuses them by their version.
constexpr int kMemoriesFormatVersion = 4;
constexpr int kLatestFormatVersion = 4;
constexpr index_t kChunkBytes = index_t{1} << 20;
constexpr double kUnitTolerance = 1e-4;  // a saved float32 row further than this from unit norm is corrupt

/// The tolerance on |norm - 1| of a saved row of type t: kUnitTolerance for float32 (what versions 1
/// and 2 promised), the type's own bound for the 2-byte types, whose every element carries a rounding
/// of up to u (row_norm_tolerance: 4 u, far above kUnitTolerance).
double unit_tolerance(DType t) { return std::max(kUnitTolerance, row_norm_tolerance(t)); }

/// An HDF5 handle closed by its destructor.
class Handle {
 public:
  Handle(hid_t id, herr_t (*closer)(hid_t)) : id_(id), close_(closer) {}
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, -1)), close_(o.close_) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle& operator=(Handle&&) = delete;
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }
  /// Gives up the id without closing it.
  hid_t release() { return std::exchange(id_, -1); }
  /// Closes now; the close's status (< 0: failed).
  herr_t close() { return id_ >= 0 ? close_(std::exchange(id_, -1)) : 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

/// Silences HDF5's own error printing: every failure becomes one membank::Error instead.
void quiet_hdf5() {
  static const bool once = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)once;
}

#define H5_CHECK(expr, ...)                                                                        \
  do {                                                                                             \
    if ((expr) < 0) MEMBANK_THROW(__VA_ARGS__);                                                    \
  } while (0)

// ---- element types ------------------------------------------------------------------------------

/// IEEE binary16 in byte order `order`. HDF5 1.10 predefines no half type: it is float32 reshaped,
/// the fields first (sign at bit 15, exponent at bit 10 with 5 bits, mantissa at bit 0 with 10 bits,
/// the leading bit implied), then precision and size shrunk to 16 bits (HDF5 refuses a precision the
/// fields do not fit in), then the exponent bias. h5py reads it as numpy float16, with no plugin.
Handle half_type(H5T_order_t order) {
  Handle t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  H5_CHECK(t.get(), "cannot copy the float32 type");
  H5_CHECK(H5Tset_fields(t.get(), 15, 10, 5, 0, 10), "cannot set the float16 fields");
  H5_CHECK(H5Tset_precision(t.get(), 16), "cannot set the float16 precision");
  H5_CHECK(H5Tset_size(t.get(), 2), "cannot set the float16 size");
  H5_CHECK(H5Tset_ebias(t.get(), 15), "cannot set the float16 exponent bias");
  H5_CHECK(H5Tset_order(t.get(), order), "cannot set the float16 byte order");
  return t;
}

/// True for a float type laid out as IEEE binary16 (any byte order: HDF5 swaps the bytes).
bool is_ieee_half(hid_t type) {
  if (H5Tget_class(type) != H5T_FLOAT || H5Tget_size(type) != 2 || H5Tget_precision(type) != 16 ||
      H5Tget_offset(type) != 0 || H5Tget_ebias(type) != 15 || H5Tget_norm(type) != H5T_NORM_IMPLIED)
    return false;
  std::size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
  if (H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize) < 0) return false;
  return spos == 15 && epos == 10 && esize == 5 && mpos == 0 && msize == 10;
}

/// The HDF5 type a bank of `t` is stored as: little-endian IEEE float32 or binary16; bfloat16 as its
/// 16-bit words (no tool knows a bfloat16 float type; the dataset's `dtype` attribute names it).
Handle file_type(DType t) {
  switch (t) {
    case DType::float16: return half_type(H5T_ORDER_LE);
    case DType::bfloat16: return Handle(H5Tcopy(H5T_STD_U16LE), H5Tclose);
    case DType::float32: break;
  }
  return Handle(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
}

/// The type of the bank's elements in memory (native byte order). With the file type it makes a
/// conversion-free transfer: the stored bits are the bank's bits, both ways.
Handle memory_type(DType t) {
  switch (t) {
    case DType::float16: return half_type(H5Tget_order(H5T_NATIVE_UINT16));
    case DType::bfloat16: return Handle(H5Tcopy(H5T_NATIVE_UINT16), H5Tclose);
    case DType::float32: break;
  }
  return Handle(H5Tcopy(H5T_NATIVE_FLOAT), H5Tclose);
}

/// What an HDF5 type holds, in words, for messages ("float64", "16-bit unsigned integers").
std::string type_description(hid_t type) {
  const std::size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      if (is_ieee_half(type)) return "float16";
      if (size == 4 || size == 8) return fmt::format("float{}", 8 * size);
      return fmt::format("a {}-byte float type", size);
    case H5T_INTEGER:
      return fmt::format("{}-bit {}signed integers", 8 * size, H5Tget_sign(type) == H5T_SGN_NONE ? "un" : "");
    default: return "a non-numeric type";
  }
}

// ---- attributes -------------------------------------------------------------------------------

void write_attr_raw(hid_t obj, const char* name, hid_t type, const void* value) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(obj, name, type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  H5_CHECK(attr.get(), "cannot create attribute '{}'", name);
  H5_CHECK(H5Awrite(attr.get(), type, value), "cannot write attribute '{}'", name);
}
void write_attr(hid_t obj, const char* name, std::int64_t v) { write_attr_raw(obj, name, H5T_NATIVE_INT64, &v); }
void write_attr_u(hid_t obj, const char* name, std::uint64_t v) { write_attr_raw(obj, name, H5T_NATIVE_UINT64, &v); }
void write_attr(hid_t obj, const char* name, double v) { write_attr_raw(obj, name, H5T_NATIVE_DOUBLE, &v); }
void write_attr(hid_t obj, const char* name, const std::string& v) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  const char* p = v.c_str();
  write_attr_raw(obj, name, type.get(), &p);
}

/// Reads snapshot attributes, each error naming the file.
class AttrReader {
 public:
  AttrReader(hid_t obj, std::string file) : obj_(obj), file_(std::move(file)) {}

  bool has(const char* name) const { return H5Aexists(obj_, name) > 0; }

  std::int64_t i64(const char* name) const {
    Handle attr = open(name, H5T_INTEGER, "an integer");
    std::int64_t v = 0;
    H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &v), "{}: attribute '{}' cannot be read as int64", file_, name);
    return v;
  }
  std::uint64_t u64(const char* name) const {
    Handle attr = open(name, H5T_INTEGER, "an integer");
    std::uint64_t v = 0;
    H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_UINT64, &v), "{}: attribute '{}' cannot be read as uint64", file_, name);
    return v;
  }
  double f64(const char* name) const {
    Handle attr = open(name, H5T_FLOAT, "a float");
    double v = 0;
    H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v), "{}: attribute '{}' cannot be read as double", file_, name);
    return v;
  }
  std::string str(const char* name) const {
    Handle attr = open(name, H5T_STRING, "a string");
    Handle ftype(H5Aget_type(attr.get()), H5Tclose);
    if (H5Tis_variable_str(ftype.get()) > 0) {
      Handle mtype(H5Tcopy(H5T_C_S1), H5Tclose);
      H5Tset_size(mtype.get(), H5T_VARIABLE);
      H5Tset_cset(mtype.get(), H5Tget_cset(ftype.get()));
      char* p = nullptr;
      H5_CHECK(H5Aread(attr.get(), mtype.get(), &p), "{}: attribute '{}' cannot be read as a string", file_, name);
      std::string s = p ? p : "";
      H5free_memory(p);
      return s;
    }
    const std::size_t size = H5Tget_size(ftype.get());
    MEMBANK_CHECK(size < 4096, "{}: attribute '{}' is a {}-byte string: expected a short name", file_, name, size);
    std::string s(size, '\0');
    H5_CHECK(H5Aread(attr.get(), ftype.get(), s.data()), "{}: attribute '{}' cannot be read", file_, name);
    s.resize(std::strlen(s.c_str()));
    return s;
  }

 private:
  Handle open(const char* name, H5T_class_t want, const char* what) const {
    MEMBANK_CHECK(has(name), "{}: attribute '{}' is missing", file_, name);
    Handle attr(H5Aopen(obj_, name, H5P_DEFAULT), H5Aclose);
    H5_CHECK(attr.get(), "{}: attribute '{}' cannot be opened", file_, name);
    Handle type(H5Aget_type(attr.get()), H5Tclose);
    Handle space(H5Aget_space(attr.get()), H5Sclose);
    MEMBANK_CHECK(H5Tget_class(type.get()) == want, "{}: attribute '{}' has the wrong type: expected {}", file_, name,
                  what);
    MEMBANK_CHECK(H5Sget_simple_extent_npoints(space.get()) == 1, "{}: attribute '{}' is not a scalar", file_, name);
    return Handle(H5Aopen(obj_, name, H5P_DEFAULT), H5Aclose);
  }
  hid_t obj_;
  std::string file_;
};

// ---- datasets ---------------------------------------------------------------------------------

/// Whole rows of `elem_bytes`-byte elements in about kChunkBytes.
index_t rows_per_chunk(index_t dim, index_t n, index_t elem_bytes = 4) {
  return std::max<index_t>(1, std::min(n, kChunkBytes / (dim * elem_bytes)));
}

/// Create a chunked, checksummed dataset of shape (n) or (n, dim) in the file `path` (for messages);
/// `name` may be a path: its missing groups are created.
Handle create_dataset(hid_t file, const char* name, hid_t type, index_t n, index_t dim, index_t chunk_rows,
                      int deflate, const std::string& path) {
  const hsize_t dims[2] = {static_cast<hsize_t>(n), static_cast<hsize_t>(dim)};
  const int rank = dim > 0 ? 2 : 1;
  Handle space(H5Screate_simple(rank, dims, nullptr), H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  const hsize_t chunk[2] = {static_cast<hsize_t>(chunk_rows), static_cast<hsize_t>(dim)};
  H5Pset_chunk(dcpl.get(), rank, chunk);
  if (deflate > 0) {
    H5Pset_shuffle(dcpl.get());
    H5Pset_deflate(dcpl.get(), static_cast<unsigned>(deflate));
  }
  H5Pset_fletcher32(dcpl.get());
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Handle ds(H5Dcreate2(file, name, type, space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT), H5Dclose);
  H5_CHECK(ds.get(), "{}: cannot create dataset '{}'", path, name);
  return ds;
}

/// Rows [r0, r0 + rows) of a (n, cols) dataset (cols = 0: a 1-D one): the file's selection and the
/// matching memory space, whose rows are `stride` >= cols elements apart (0: contiguous); a stride
/// wider than the row skips the padding of the bank's rows.
struct RowSelection {
  Handle file, memory;
};

RowSelection select_rows(hid_t ds, index_t r0, index_t rows, index_t cols, index_t stride = 0) {
  Handle fspace(H5Dget_space(ds), H5Sclose);
  const int rank = cols > 0 ? 2 : 1;
  const hsize_t start[2] = {static_cast<hsize_t>(r0), 0};
  const hsize_t count[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(cols)};
  H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
  if (stride <= cols) return {std::move(fspace), Handle(H5Screate_simple(rank, count, nullptr), H5Sclose)};
  const hsize_t mdims[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(stride)};
  Handle mspace(H5Screate_simple(2, mdims, nullptr), H5Sclose);
  const hsize_t mstart[2] = {0, 0};
  H5Sselect_hyperslab(mspace.get(), H5S_SELECT_SET, mstart, nullptr, count, nullptr);
  return {std::move(fspace), std::move(mspace)};
}

/// Write rows [r0, r0 + rows) of a (n, cols) dataset from a contiguous buffer.
void write_rows(hid_t ds, hid_t memtype, index_t r0, index_t rows, index_t cols, const void* buf) {
  const RowSelection sel = select_rows(ds, r0, rows, cols);
  H5_CHECK(H5Dwrite(ds, memtype, sel.memory.get(), sel.file.get(), H5P_DEFAULT, buf), "cannot write rows {}..{}", r0,
           r0 + rows);
}

void read_rows(hid_t ds, hid_t memtype, index_t r0, index_t rows, index_t cols, void* buf, const std::string& file,
               const char* name) {
  const RowSelection sel = select_rows(ds, r0, rows, cols);
  H5_CHECK(H5Dread(ds, memtype, sel.memory.get(), sel.file.get(), H5P_DEFAULT, buf),
           "{}: dataset '{}' rows {}..{} cannot be read (truncated file or checksum mismatch)", file, name, r0,
           r0 + rows);
}

/// Shape and element class of a dataset, validated against what is expected.
struct DatasetShape {
  int rank = 0;
  hsize_t dims[2] = {0, 0};
  H5T_class_t cls = H5T_NO_CLASS;
  std::size_t elem_size = 0;
};

DatasetShape shape_of(hid_t ds) {
  DatasetShape s;
  Handle space(H5Dget_space(ds), H5Sclose);
  Handle type(H5Dget_type(ds), H5Tclose);
  s.rank = H5Sget_simple_extent_ndims(space.get());
  if (s.rank >= 1 && s.rank <= 2) H5Sget_simple_extent_dims(space.get(), s.dims, nullptr);
  s.cls = H5Tget_class(type.get());
  s.elem_size = H5Tget_size(type.get());
  return s;
}

/// Opens dataset `name` of the file at `path`. A virtual dataset's relative source files are looked
/// for in the file's own directory (a shard set moves as a directory; the working directory plays
/// no part).
Handle open_dataset(hid_t file, const char* name, const std::string& path) {
  MEMBANK_CHECK(H5Lexists(file, name, H5P_DEFAULT) > 0, "{}: dataset '{}' is missing", path, name);
  Handle dapl(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose);
  const std::string dir = std::filesystem::absolute(path).parent_path().string();
  H5_CHECK(H5Pset_virtual_prefix(dapl.get(), dir.c_str()), "{}: cannot set the virtual-dataset prefix", path);
  Handle ds(H5Dopen2(file, name, dapl.get()), H5Dclose);
  H5_CHECK(ds.get(), "{}: '{}' cannot be opened as a dataset", path, name);
  return ds;
}

/// The bank type a 2-D dataset holds: float32, IEEE float16, or bfloat16 words (unsigned 16-bit
/// integers that the dataset's string attribute `dtype` names "bfloat16"); nothing for any other
/// type. `strict` (membank's own files): the attribute, when present, must be a string naming what
/// the HDF5 type holds. Otherwise (another tool's file, whose `dtype` attribute may mean anything)
/// the attribute only serves to recognise bfloat16 words.
std::optional<DType> stored_dtype(hid_t ds, const std::string& path, const std::string& name, bool strict = true) {
  const AttrReader attrs(ds, fmt::format("{}: dataset '{}'", path, name));
  std::optional<std::string> named;
  try {
    if (attrs.has("dtype")) named = attrs.str("dtype");
  } catch (const Error&) {
    if (strict) throw;
  }
  Handle type(H5Dget_type(ds), H5Tclose);
  std::optional<DType> got;
  if (H5Tget_class(type.get()) == H5T_FLOAT && H5Tget_size(type.get()) == 4)
    got = DType::float32;
  else if (is_ieee_half(type.get()))
    got = DType::float16;
  else if (named == "bfloat16" && H5Tget_class(type.get()) == H5T_INTEGER && H5Tget_size(type.get()) == 2 &&
           H5Tget_sign(type.get()) == H5T_SGN_NONE)
    got = DType::bfloat16;
  MEMBANK_CHECK(!strict || !named || (got && to_string(*got) == *named),
                "{}: dataset '{}' has the attribute dtype = '{}' but holds {}", path, name, *named,
                type_description(type.get()));
  return got;
}

/// Every chunk of the dataset must be allocated: a file claiming more rows than it stores fails here,
/// before anything of its claimed size is allocated.
void check_storage(hid_t ds, index_t n, index_t chunk_rows, const std::string& path, const char* name) {
  hsize_t chunks = 0;
  Handle space(H5Dget_space(ds), H5Sclose);
  if (H5Dget_num_chunks(ds, space.get(), &chunks) < 0) chunks = 0;
  const auto expected = static_cast<hsize_t>((n + chunk_rows - 1) / chunk_rows);
  MEMBANK_CHECK(chunks == expected, "{}: dataset '{}' stores {} chunks: expected {} for {} rows (truncated or "
                "inconsistent file)", path, name, chunks, expected, n);
}

index_t chunk_rows_of(hid_t ds) {
  Handle dcpl(H5Dget_create_plist(ds), H5Pclose);
  if (H5Pget_layout(dcpl.get()) != H5D_CHUNKED) return 0;
  hsize_t chunk[2] = {0, 0};
  H5Pget_chunk(dcpl.get(), 2, chunk);
  return static_cast<index_t>(chunk[0]);
}

bool has_filter(hid_t ds, H5Z_filter_t filter) {
  Handle dcpl(H5Dget_create_plist(ds), H5Pclose);
  const int nf = H5Pget_nfilters(dcpl.get());
  for (int i = 0; i < nf; ++i) {
    unsigned flags = 0;
    std::size_t nelem = 0;
    if (H5Pget_filter2(dcpl.get(), static_cast<unsigned>(i), &flags, &nelem, nullptr, 0, nullptr, nullptr) ==
        filter)
      return true;
  }
  return false;
}

/// Fletcher-32 as HDF5's fletcher32 filter defines it: 16-bit big-endian words, sums folded
/// modulo 65535 every 360 words, an odd last byte as the high byte of a word.
std::uint32_t fletcher32(const unsigned char* data, std::size_t bytes) {
  std::size_t words = bytes / 2;
  std::uint32_t sum1 = 0, sum2 = 0;
  while (words) {
    std::size_t t = std::min<std::size_t>(words, 360);
    words -= t;
    do {
      sum1 += (static_cast<std::uint32_t>(data[0]) << 8) | data[1];
      data += 2;
      sum2 += sum1;
    } while (--t);
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  if (bytes % 2) {
    sum1 += static_cast<std::uint32_t>(*data) << 8;
    sum2 += sum1;
    sum1 = (sum1 & 0xffff) + (sum1 >> 16);
    sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  }
  sum1 = (sum1 & 0xffff) + (sum1 >> 16);
  sum2 = (sum2 & 0xffff) + (sum2 >> 16);
  return (sum2 << 16) | sum1;
}

/// The bank dataset (fletcher32, no compression) written chunk by chunk with H5Dwrite_chunk: the
/// checksums of a group of chunks are computed in parallel (HDF5's own filter is serial and byte-wise,
/// a third of plain disk speed). Edge chunks are stored full-size, zero-padded, as HDF5 does. The
/// elements are copied as they are (any type: the file type is the memory type, little-endian).
void write_bank_direct(hid_t ds, const Bank& bank, index_t chunk_rows, const std::string& path) {
  const index_t n = bank.size(), dim = bank.dim();
  const BankView view = bank.view();
  const auto row_bytes = static_cast<std::size_t>(dim * dtype_bytes(bank.dtype()));
  const std::size_t chunk_bytes = static_cast<std::size_t>(chunk_rows) * row_bytes;
  const index_t chunks = (n + chunk_rows - 1) / chunk_rows;
  constexpr index_t kGroup = 32;
  std::vector<std::vector<unsigned char>> bufs(static_cast<std::size_t>(std::min(kGroup, chunks)),
                                               std::vector<unsigned char>(chunk_bytes + 4));
  for (index_t g0 = 0; g0 < chunks; g0 += kGroup) {
    const index_t group = std::min(kGroup, chunks - g0);
#pragma omp parallel for schedule(static)
    for (index_t g = 0; g < group; ++g) {
      unsigned char* b = bufs[static_cast<std::size_t>(g)].data();
      const index_t r0 = (g0 + g) * chunk_rows, rows = std::min(chunk_rows, n - r0);
      for (index_t r = 0; r < rows; ++r)
        std::memcpy(b + static_cast<std::size_t>(r) * row_bytes, view.row_data(r0 + r), row_bytes);
      std::memset(b + static_cast<std::size_t>(rows) * row_bytes, 0,
                  static_cast<std::size_t>(chunk_rows - rows) * row_bytes);
      const std::uint32_t sum = fletcher32(b, chunk_bytes);
      for (int i = 0; i < 4; ++i) b[chunk_bytes + static_cast<std::size_t>(i)] = static_cast<unsigned char>(sum >> (8 * i));
    }
    for (index_t g = 0; g < group; ++g) {
      const hsize_t offset[2] = {static_cast<hsize_t>((g0 + g) * chunk_rows), 0};
      H5_CHECK(H5Dwrite_chunk(ds, H5P_DEFAULT, 0u, offset, chunk_bytes + 4, bufs[static_cast<std::size_t>(g)].data()),
               "{}: cannot write bank chunk {}", path, g0 + g);
    }
  }
}

// ---- files ------------------------------------------------------------------------------------

/// When HDF5 1.10 fails to close a file, the file is freed yet its id stays registered, and the
/// library's clean-up at exit crashes on that id (SIGSEGV in H5F__close_cb). From then on the process
/// ends, whenever it does, without that clean-up: a handler registered now runs before HDF5's own
/// (exit handlers run in reverse order of registration), flushes stdio and ends the process with the
/// status it was exiting with. Nothing of ours is left open for that clean-up to close.
void skip_hdf5_cleanup_at_exit() {
  static std::once_flag once;
  std::call_once(once, [] {
    ::on_exit(
        [](int status, void*) {
          std::fflush(nullptr);
          ::_exit(status);
        },
        nullptr);
  });
}

/// Closes a file being written after one of its writes failed (disk full, I/O error). Its descriptor
/// is first pointed at an anonymous in-memory file (memfd), where the close's last writes (metadata,
/// chunk cache: small) succeed and vanish; the temporary itself is removed by the caller. That is
/// enough after a failed dataset write. After a failed flush, HDF5 1.10 leaves the file's metadata
/// cache unable to flush again ("slist already enabled?"), so the close fails whatever the writes
/// do: then skip_hdf5_cleanup_at_exit.
void close_failed_file(hid_t file) {
  void* handle = nullptr;
  if (H5Fget_vfd_handle(file, H5P_DEFAULT, &handle) >= 0 && handle != nullptr) {
    const int fd = *static_cast<int*>(handle);
    const int sink = ::memfd_create("membank-failed-save", MFD_CLOEXEC);
    if (sink >= 0) {
      ::dup2(sink, fd);
      ::close(sink);
    }
  }
  if (H5Fclose(file) < 0) skip_hdf5_cleanup_at_exit();
}

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  MEMBANK_CHECK(fd >= 0, "{}: cannot open to fsync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  MEMBANK_CHECK(rc == 0, "{}: fsync failed: {}", path, std::strerror(errno));
}

Handle open_file(const std::string& path) {
  quiet_hdf5();
  MEMBANK_CHECK(std::filesystem::exists(path), "{}: no such file", path);
  MEMBANK_CHECK(H5Fis_hdf5(path.c_str()) > 0, "{}: not an HDF5 file (or truncated before its superblock)", path);
  Handle f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  H5_CHECK(f.get(), "{}: cannot be opened by HDF5 (corrupt or truncated)", path);
  return f;
}

/// True for a generation token: 16 lowercase hex digits.
bool is_generation(const std::string& g) {
  return g.size() == 16 && std::all_of(g.begin(), g.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

/// Checks a row dataset of a shard file (or of a single file): rank, length, element class and size,
/// every chunk stored.
void check_row_vector(hid_t file, const char* name, index_t n, H5T_class_t cls, std::size_t size,
                      const std::string& path) {
  Handle ds = open_dataset(file, name, path);
  const DatasetShape s = shape_of(ds.get());
  MEMBANK_CHECK(s.rank == 1 && s.dims[0] == static_cast<hsize_t>(n),
                "{}: dataset '{}' has rank {} and {} entries: expected ({},)", path, name, s.rank, s.dims[0], n);
  MEMBANK_CHECK(s.cls == cls && s.elem_size == size, "{}: dataset '{}' has the wrong dtype", path, name);
  const index_t cr = chunk_rows_of(ds.get());
  if (cr >= 1) check_storage(ds.get(), n, cr, path, name);
}

/// Checks the shard file open as `file` against the place its master gives it (or its writer meant):
/// format, generation, index, rows, shape, type and complete storage of every dataset. Returns
/// whether its bank is compressed.
bool check_shard(hid_t file, const std::string& path, const detail::ShardPlace& p, index_t dim, DType dtype,
                 bool has_labels) {
  const AttrReader a(file, path);
  const std::string format = a.has("format") ? a.str("format") : "";
  MEMBANK_CHECK(format == kShardFormat, "{}: format is '{}': expected '{}'", path, format, kShardFormat);
  const std::int64_t version = a.i64("format_version");
  MEMBANK_CHECK(version == kShardFormatVersion, "{}: format_version = {}: this membank reads shard version {}", path,
                version, kShardFormatVersion);
  const std::string generation = a.str("generation");
  MEMBANK_CHECK(generation == p.generation, "{}: generation '{}': expected '{}' (a shard of another save)", path,
                generation, p.generation);
  const auto expect = [&](const char* name, std::int64_t want) {
    const std::int64_t got = a.i64(name);
    MEMBANK_CHECK(got == want, "{}: attribute {} = {}: expected {}", path, name, got, want);
  };
  expect("shard", p.index);
  expect("shards", p.count);
  expect("n", p.n);
  expect("row_begin", p.begin);
  expect("row_end", p.end);
  expect("dim", dim);
  const std::string named = a.str("dtype");
  MEMBANK_CHECK(named == to_string(dtype), "{}: attribute dtype = '{}': expected '{}'", path, named, to_string(dtype));
  const index_t rows = p.end - p.begin;
  Handle bank = open_dataset(file, "bank", path);
  const DatasetShape bs = shape_of(bank.get());
  MEMBANK_CHECK(bs.rank == 2 && bs.dims[0] == static_cast<hsize_t>(rows) && bs.dims[1] == static_cast<hsize_t>(dim),
                "{}: dataset 'bank' is not {} x {}", path, rows, dim);
  MEMBANK_CHECK(stored_dtype(bank.get(), path, "bank") == dtype, "{}: dataset 'bank' does not hold {}", path,
                to_string(dtype));
  const index_t chunk = chunk_rows_of(bank.get());
  MEMBANK_CHECK(chunk >= 1, "{}: dataset 'bank' is not chunked by rows", path);
  check_storage(bank.get(), rows, chunk, path, "bank");
  check_row_vector(file, "last_update", rows, H5T_INTEGER, 8, path);
  if (has_labels) check_row_vector(file, "labels", rows, H5T_INTEGER, 8, path);
  return has_filter(bank.get(), H5Z_FILTER_DEFLATE);
}

/// Checks the master of a shard set: its virtual datasets bank, last_update and (labels) map, in row
/// order, whole blocks of rows to the datasets of the same name in the same shard files (plain names
/// in the master's directory), covering all N rows; then every shard file (check_shard). A missing
/// shard or one of another generation is refused here: HDF5 itself would read its rows as zeros.
void check_shard_set(hid_t file, SnapshotInfo& info, const std::string& path) {
  MEMBANK_CHECK(info.shards >= 1 && info.shards <= info.n, "{}: shards = {}: expected 1 <= shards <= n = {}", path,
                info.shards, info.n);
  MEMBANK_CHECK(is_generation(info.generation), "{}: generation = '{}': expected 16 hexadecimal digits", path,
                info.generation);
  std::vector<std::string> files;
  std::vector<std::pair<index_t, index_t>> rows;
  for (const char* name : {"bank", "last_update", "labels"}) {
    const bool is_bank = std::strcmp(name, "bank") == 0;
    if (std::strcmp(name, "labels") == 0 && !info.has_labels) continue;
    Handle ds = open_dataset(file, name, path);
    Handle dcpl(H5Dget_create_plist(ds.get()), H5Pclose);
    MEMBANK_CHECK(H5Pget_layout(dcpl.get()) == H5D_VIRTUAL, "{}: dataset '{}' is not virtual: expected the shards' "
                  "rows, as every row dataset of a shard set's master", path, name);
    std::size_t count = 0;
    H5_CHECK(H5Pget_virtual_count(dcpl.get(), &count), "{}: dataset '{}': cannot read its mappings", path, name);
    MEMBANK_CHECK(count == static_cast<std::size_t>(info.shards), "{}: dataset '{}' maps {} source datasets: expected "
                  "one per shard, {}", path, name, count, info.shards);
    index_t next = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const auto text = [&](auto get) {
        const ssize_t len = get(dcpl.get(), i, nullptr, 0);
        MEMBANK_CHECK(len >= 0 && len < 4096, "{}: dataset '{}': mapping {} cannot be read", path, name, i);
        std::string t(static_cast<std::size_t>(len) + 1, '\0');
        get(dcpl.get(), i, t.data(), t.size());
        t.resize(static_cast<std::size_t>(len));
        return t;
      };
      const std::string fname = text(H5Pget_virtual_filename), dname = text(H5Pget_virtual_dsetname);
      MEMBANK_CHECK(!fname.empty() && fname.find('/') == std::string::npos && fname != "." && fname != "..",
                    "{}: dataset '{}' maps shard {} to the file '{}': expected a file name in the master's directory",
                    path, name, i, fname);
      MEMBANK_CHECK(dname == name, "{}: dataset '{}' maps shard {} to the dataset '{}': expected '{}'", path, name, i,
                    dname, name);
      Handle vspace(H5Pget_virtual_vspace(dcpl.get(), i), H5Sclose);
      Handle sspace(H5Pget_virtual_srcspace(dcpl.get(), i), H5Sclose);
      hsize_t lo[2] = {0, 0}, hi[2] = {0, 0};
      const bool bounded = vspace.ok() && sspace.ok() && H5Sget_select_bounds(vspace.get(), lo, hi) >= 0;
      const index_t cols = is_bank ? info.dim : 1;
      const auto b = static_cast<index_t>(lo[0]), e = static_cast<index_t>(hi[0]) + 1;
      const bool whole_rows = bounded && b == next && e > b && e <= info.n &&
                              (!is_bank || (lo[1] == 0 && hi[1] == static_cast<hsize_t>(info.dim - 1))) &&
                              H5Sget_select_npoints(vspace.get()) == (e - b) * cols &&
                              H5Sget_select_type(sspace.get()) == H5S_SEL_ALL;
      // The source's own shape (e - b rows) is checked with the shard file: HDF5 learns it on opening.
      MEMBANK_CHECK(whole_rows, "{}: dataset '{}' maps shard {} to rows {}..{} (columns {}..{}, {} elements): expected "
                    "the whole source dataset on a block of whole rows from row {}", path, name, i, b, e, lo[1], hi[1],
                    H5Sget_select_npoints(vspace.get()), next);
      if (is_bank) {
        files.push_back(fname);
        rows.emplace_back(b, e);
      } else {
        MEMBANK_CHECK(fname == files[i] && std::pair(b, e) == rows[i], "{}: dataset '{}' maps shard {} to '{}' rows "
                      "{}..{}: expected dataset 'bank''s '{}' rows {}..{}", path, name, i, fname, b, e, files[i],
                      rows[i].first, rows[i].second);
      }
      next = e;
    }
    MEMBANK_CHECK(next == info.n, "{}: dataset '{}' maps rows 0..{}: expected all n = {}", path, name, next, info.n);
  }
  const std::filesystem::path dir = std::filesystem::absolute(path).parent_path();
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string shard = (dir / files[i]).string();
    const detail::ShardPlace place{info.generation, static_cast<int>(i), info.shards, info.n, rows[i].first,
                                   rows[i].second};
    try {
      MEMBANK_CHECK(std::filesystem::exists(shard), "{}: no such file (a shard set moves as a directory: the master "
                    "with its shard files)", shard);
      Handle f = open_file(shard);
      const bool compressed = check_shard(f.get(), shard, place, info.dim, info.dtype, info.has_labels);
      if (i == 0) info.compressed = compressed;
    } catch (const Error& e) {
      MEMBANK_THROW("{}: shard {} of {}: {}", path, i, info.shards, e.what());
    }
  }
}

// ---- kinds and headers ----------------------------------------------------------------------

/// A snapshot's identification: format, version and kind, checked against each other.
struct Header {
  std::string format;
  int version = 0;
  SnapshotKind kind = SnapshotKind::engine;
};

const char* article(SnapshotKind k) { return k == SnapshotKind::engine ? "an" : "a"; }

const char* loader_of(SnapshotKind k) {
  switch (k) {
    case SnapshotKind::queue: return "load_queue_snapshot";
    case SnapshotKind::multiview: return "load_multiview_snapshot";
    case SnapshotKind::engine: break;
  }
  return "load_snapshot";
}

/// Reads and checks format, format_version and kind (absent: engine): an engine snapshot has
/// versions 1 to 3, a queue or multi-view snapshot version 4.
Header read_header(hid_t file, const std::string& path) {
  const AttrReader a(file, path);
  Header h;
  h.format = a.has("format") ? a.str("format") : "";
  MEMBANK_CHECK(h.format == kFormat, "{}: format is '{}': expected '{}' (use import_bank for a plain (N, D) "
                "dataset)", path, h.format, kFormat);
  const std::int64_t version = a.i64("format_version");
  MEMBANK_CHECK(version >= 1 && version <= kLatestFormatVersion, "{}: format_version = {}: this membank reads "
                "versions 1 to {}", path, version, kLatestFormatVersion);
  h.version = static_cast<int>(version);
  if (a.has("kind")) {
    const std::string kind = a.str("kind");
    try {
      h.kind = snapshot_kind_from_string(kind);
    } catch (const Error&) {
      MEMBANK_THROW("{}: attribute kind = '{}': expected one of engine, queue, multiview", path, kind);
    }
  }
  if (h.kind == SnapshotKind::engine)
    MEMBANK_CHECK(version <= kFormatVersion, "{}: format_version = {}: an engine snapshot has versions 1 to {} "
                  "(version {} holds queue and multiview snapshots)", path, version, kFormatVersion,
                  kMemoriesFormatVersion);
  else
    MEMBANK_CHECK(version == kMemoriesFormatVersion, "{}: format_version = {}: {} {} snapshot has version {}", path,
                  version, article(h.kind), to_string(h.kind), kMemoriesFormatVersion);
  return h;
}

/// Throws one Error naming both kinds (and the loader of the one found) unless the file holds `want`.
void expect_kind(const Header& h, SnapshotKind want, const std::string& path) {
  MEMBANK_CHECK(h.kind == want, "{}: expected {} {} snapshot, found {} {} snapshot ({} reads it)", path,
                article(want), to_string(want), article(h.kind), to_string(h.kind), loader_of(h.kind));
}

/// The configuration's attributes of a file of format version `version` (write_config_attributes):
/// the version 2 ones read with their defaults from a version 1 file, rounding as nearest before
/// version 3.
EngineConfig read_config_attributes(const AttrReader& a, int version) {
  EngineConfig c;
  c.seed = a.u64("seed");
  c.k = a.i64("k");
  c.tau = a.f64("tau");
  c.momentum = a.f64("momentum");
  c.objective = objective_from_string(a.str("objective"));
  c.negatives = negatives_mode_from_string(a.str("negatives"));
  c.exclude_positive = a.i64("exclude_positive") != 0;
  c.z_policy = z_policy_from_string(a.str("z_policy"));
  c.z_fixed = a.f64("z_fixed");
  c.z_ema = a.f64("z_ema");
  c.normalize_features = a.i64("normalize_features") != 0;
  c.unit_norm_tolerance = a.f64("unit_norm_tolerance");
  if (version >= 3) c.rounding = rounding_from_string(a.str("rounding"));
  if (a.has("allow_biased_sampler")) c.allow_biased_sampler = a.i64("allow_biased_sampler") != 0;  // (false before)
  if (version >= 2) {  // version 1 files predate these: the defaults reproduce them
    c.tau_plus = a.f64("tau_plus");
    c.beta = a.f64("beta");
    c.detach_weights = a.i64("detach_weights") != 0;
    c.kernel_t = a.f64("kernel_t");
    c.gamma = a.f64("gamma");
    c.margin = a.f64("margin");
    c.exclude_same_label = a.i64("exclude_same_label") != 0;
  }
  return c;
}

/// The sampler kinds this build writes and builds on load; any other kind a file names (a cluster
/// sampler, say) is refused with one Error rather than loaded as something else.
void check_loadable_sampler(SamplerKind kind, const std::string& path) {
  MEMBANK_CHECK(kind == SamplerKind::uniform || kind == SamplerKind::alias || kind == SamplerKind::dynamic ||
                    kind == SamplerKind::cluster || kind == SamplerKind::ring,
                "{}: sampler = '{}': this build loads uniform, alias, dynamic, cluster and ring samplers only", path,
                to_string(kind));
}

/// A dynamic sampler's parameters (root attributes sampler_drive, sampler_alpha, sampler_floor).
DynamicSampler::Params read_dynamic_params(const AttrReader& a, const std::string& path) {
  DynamicSampler::Params p;
  p.drive = dynamic_drive_from_string(a.str("sampler_drive"));
  p.alpha = a.f64("sampler_alpha");
  p.floor = a.f64("sampler_floor");
  try {
    DynamicSampler(std::vector<double>{1.0}, p);  // the sampler's own checks of the parameters
  } catch (const Error& e) {
    MEMBANK_THROW("{}: dynamic sampler: {}", path, e.what());
  }
  return p;
}

/// The sampler datasets the kind needs, checked against N (read_info_checked, the multi-view info).
void check_sampler_datasets(hid_t file, SamplerKind kind, const DynamicSampler::Params& p, index_t n,
                            const std::string& path) {
  if (kind == SamplerKind::alias || kind == SamplerKind::dynamic)
    check_row_vector(file, "sampler_weights", n, H5T_FLOAT, 8, path);
  if (kind == SamplerKind::dynamic && p.drive == DynamicSampler::Drive::loss_ema)
    check_row_vector(file, "sampler_ema", n, H5T_FLOAT, 8, path);
  if (kind == SamplerKind::cluster) {  // (the centroids' shape and the attributes: read_cluster_sampler)
    MEMBANK_CHECK(H5Lexists(file, "sampler_cluster", H5P_DEFAULT) > 0,
                  "{}: the sampler is 'cluster' but the group 'sampler_cluster' is missing", path);
    check_row_vector(file, "sampler_cluster/assignment", n, H5T_INTEGER, 4, path);
  }
}

SnapshotInfo read_info_checked(hid_t file, const std::string& path) {
  AttrReader a(file, path);
  SnapshotInfo info;
  const Header header = read_header(file, path);
  expect_kind(header, SnapshotKind::engine, path);
  info.format = header.format;
  const std::int64_t version = header.version;
  info.format_version = header.version;
  info.engine_version = a.str("engine_version");
  info.n = a.i64("n");
  info.dim = a.i64("dim");
  MEMBANK_CHECK(info.n >= 1 && info.dim >= 1 && info.dim <= (1 << 20), "{}: n = {}, dim = {}: expected n >= 1 and "
                "1 <= dim <= 2^20", path, info.n, info.dim);
  MEMBANK_CHECK(info.n <= std::numeric_limits<std::int64_t>::max() / 4 / info.dim,
                "{}: n = {} x dim = {} x 4 bytes overflows int64", path, info.n, info.dim);
  info.step = a.i64("step");
  MEMBANK_CHECK(info.step >= 0, "{}: step = {}: expected >= 0", path, info.step);
  info.config = read_config_attributes(a, header.version);
  EngineConfig& c = info.config;
  // earlier files hold float32 banks, which rounding does not affect
  if (version >= 3) info.dtype = dtype_from_string(a.str("dtype"));
  try {
    c.validate(info.n);
  } catch (const Error& e) {
    MEMBANK_THROW("{}: invalid configuration: {}", path, e.what());
  }
  info.partition.policy = c.z_policy;
  info.partition.initialised = a.i64("z_initialised") != 0;
  info.partition.log_z = a.f64("log_z");
  MEMBANK_CHECK(!info.partition.initialised || std::isfinite(info.partition.log_z), "{}: log_z = {}: expected finite",
                path, info.partition.log_z);
  info.sampler = sampler_kind_from_string(a.str("sampler"));
  check_loadable_sampler(info.sampler, path);
  if (info.sampler == SamplerKind::dynamic) info.sampler_params = read_dynamic_params(a, path);
  info.has_labels = H5Lexists(file, "labels", H5P_DEFAULT) > 0;

  // Datasets: presence, rank, dtype and shape against the attributes, storage against the sizes.
  Handle bank = open_dataset(file, "bank", path);
  const DatasetShape bs = shape_of(bank.get());
  MEMBANK_CHECK(bs.rank == 2, "{}: dataset 'bank' has rank {}: expected 2 (N, D)", path, bs.rank);
  const std::optional<DType> stored = stored_dtype(bank.get(), path, "bank");
  if (stored != info.dtype) {
    Handle type(H5Dget_type(bank.get()), H5Tclose);
    MEMBANK_THROW("{}: dataset 'bank' holds {}: expected {}{}", path, type_description(type.get()),
                  to_string(info.dtype),
                  info.dtype == DType::bfloat16 ? " words (16-bit unsigned integers with the attribute dtype = "
                                                  "'bfloat16')" : "");
  }
  MEMBANK_CHECK(bs.dims[0] == static_cast<hsize_t>(info.n) && bs.dims[1] == static_cast<hsize_t>(info.dim),
                "{}: dataset 'bank' is {} x {} but the attributes say n = {}, dim = {}", path, bs.dims[0], bs.dims[1],
                info.n, info.dim);
  // A shard set's master (docs/snapshot-format.md): virtual row datasets over its shard files.
  const bool is_virtual = [&] {
    Handle dcpl(H5Dget_create_plist(bank.get()), H5Pclose);
    return H5Pget_layout(dcpl.get()) == H5D_VIRTUAL;
  }();
  MEMBANK_CHECK(is_virtual == a.has("shards"), "{}: {}", path,
                is_virtual ? "dataset 'bank' is virtual but the attribute 'shards' is missing: expected a shard set's "
                             "master"
                           : "the attribute 'shards' marks a shard set's master but dataset 'bank' is not virtual");
  if (!is_virtual) {
    info.rows_per_chunk = chunk_rows_of(bank.get());
    MEMBANK_CHECK(info.rows_per_chunk >= 1, "{}: dataset 'bank' is not chunked by rows", path);
    check_storage(bank.get(), info.n, info.rows_per_chunk, path, "bank");
    info.compressed = has_filter(bank.get(), H5Z_FILTER_DEFLATE);
  }

  const auto check_vector = [&](const char* name, H5T_class_t cls, std::size_t size) {
    check_row_vector(file, name, info.n, cls, size, path);
  };
  if (!is_virtual) check_vector("last_update", H5T_INTEGER, 8);
  check_sampler_datasets(file, info.sampler, info.sampler_params, info.n, path);
  if (info.has_labels && !is_virtual) check_vector("labels", H5T_INTEGER, 8);
  MEMBANK_CHECK(info.has_labels || (!needs_labels(c.objective) && !c.exclude_same_label),
                "{}: the configuration ({}{}) needs labels but the file has no dataset 'labels'", path,
                to_string(c.objective), c.exclude_same_label ? ", exclude_same_label" : "");
  if (is_virtual) {
    info.shards = static_cast<int>(std::clamp<std::int64_t>(a.i64("shards"), -1, std::int64_t{1} << 30));
    info.generation = a.str("generation");
    check_shard_set(file, info, path);
    // read through HDF5's H5Dread of the virtual dataset (no direct chunk reads): about 1 MiB at a time
    info.rows_per_chunk = rows_per_chunk(info.dim, info.n, dtype_bytes(info.dtype));
  }
  return info;
}

/// read_info_checked, every error naming the file (the parsers and validators it calls do not know it).
SnapshotInfo read_info(hid_t file, const std::string& path) {
  try {
    return read_info_checked(file, path);
  } catch (const Error& e) {
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    MEMBANK_THROW("{}: {}", path, e.what());
  }
}

/// Entries [r0, r0 + n) of the 1-D dataset `name`.
template <class T>
std::vector<T> read_vector(hid_t file, const char* name, index_t r0, index_t n, hid_t memtype,
                           const std::string& path) {
  Handle ds = open_dataset(file, name, path);
  std::vector<T> v(static_cast<std::size_t>(n));
  read_rows(ds.get(), memtype, r0, n, 0, v.data(), path, name);
  return v;
}

/// A cluster sampler's state (write_sampler): the group sampler_cluster, its config as attributes,
/// the centroids (C x D float32) and each row's cluster (N int32).
std::unique_ptr<NoiseSampler> read_cluster_sampler(hid_t file, index_t n, index_t dim, const std::string& path) {
  MEMBANK_CHECK(H5Lexists(file, "sampler_cluster", H5P_DEFAULT) > 0,
                "{}: the sampler is 'cluster' but the group 'sampler_cluster' is missing", path);
  Handle g(H5Gopen2(file, "sampler_cluster", H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.get(), "{}: 'sampler_cluster' cannot be opened as a group", path);
  const AttrReader a(g.get(), path);
  ClusterConfig c;
  c.clusters = a.i64("clusters");
  c.epsilon = a.f64("epsilon");
  c.beta = a.f64("beta");
  c.refresh_every = a.i64("refresh_every");
  const std::int64_t iterations = a.i64("iterations");
  MEMBANK_CHECK(iterations >= 0 && iterations <= std::numeric_limits<int>::max(),
                "{}: sampler_cluster: iterations = {}: expected 0 <= iterations < 2^31", path, iterations);
  c.iterations = static_cast<int>(iterations);
  c.seed = a.u64("seed");
  const std::int64_t refreshed_at = a.i64("refreshed_at");
  try {
    c.validate(n);
  } catch (const Error& e) {
    MEMBANK_THROW("{}: sampler_cluster: {}", path, e.what());
  }
  Handle cds = open_dataset(file, "sampler_cluster/centroids", path);
  const DatasetShape cs = shape_of(cds.get());
  MEMBANK_CHECK(cs.rank == 2 && cs.dims[0] == static_cast<hsize_t>(c.clusters) &&
                    cs.dims[1] == static_cast<hsize_t>(dim) && cs.cls == H5T_FLOAT && cs.elem_size == 4,
                "{}: dataset 'sampler_cluster/centroids': expected ({}, {}) float32", path, c.clusters, dim);
  RowMatrixf centroids(c.clusters, dim);
  read_rows(cds.get(), H5T_NATIVE_FLOAT, 0, c.clusters, dim, centroids.data(), path, "sampler_cluster/centroids");
  check_row_vector(file, "sampler_cluster/assignment", n, H5T_INTEGER, 4, path);
  auto assignment = read_vector<std::int32_t>(file, "sampler_cluster/assignment", 0, n, H5T_NATIVE_INT32, path);
  try {
    return std::make_unique<ClusterSampler>(c, std::move(centroids), std::move(assignment), refreshed_at);
  } catch (const Error& e) {
    MEMBANK_THROW("{}: sampler_cluster: {}", path, e.what());
  }
}

/// The sampler a snapshot holds, built from its datasets (already checked by the info readers).
std::unique_ptr<NoiseSampler> read_sampler(hid_t file, SamplerKind kind, const DynamicSampler::Params& p, index_t n,
                                           index_t dim, const std::string& path) {
  check_loadable_sampler(kind, path);
  if (kind == SamplerKind::uniform) return std::make_unique<UniformSampler>(n);
  if (kind == SamplerKind::cluster) return read_cluster_sampler(file, n, dim, path);
  if (kind == SamplerKind::ring) {  // its ranks, root attributes sampler_ring_lower and sampler_ring_upper
    const AttrReader a(file, path);
    const RingConfig c{a.i64("sampler_ring_lower"), a.i64("sampler_ring_upper")};
    try {
      return std::make_unique<RingSampler>(n, c);
    } catch (const Error& e) {
      MEMBANK_THROW("{}: ring sampler: {}", path, e.what());
    }
  }
  const auto w = read_vector<double>(file, "sampler_weights", 0, n, H5T_NATIVE_DOUBLE, path);
  try {
    if (kind == SamplerKind::alias) return std::make_unique<AliasSampler>(w);
    std::vector<double> ema;
    if (p.drive == DynamicSampler::Drive::loss_ema)
      ema = read_vector<double>(file, "sampler_ema", 0, n, H5T_NATIVE_DOUBLE, path);
    return std::make_unique<DynamicSampler>(w, p, ema);
  } catch (const Error& e) {
    MEMBANK_THROW("{}: sampler_weights: {}", path, e.what());
  }
}

/// Rows [first, end) of the (n, dim) rows dataset `name` of type `dtype` (validated before), read
/// `block` rows at a time, a bank of their own (local row i: row first + i).
Bank read_bank_rows(hid_t file, const char* name, index_t dim, DType dtype, index_t block, const std::string& path,
                    index_t first, index_t end) {
  Handle ds = open_dataset(file, name, path);
  // Read chunk-aligned blocks straight into the bank's rows (memory hyperslab over the stride), in
  // the bank's own type: a 2-byte bank gets the stored bits as they are.
  const Handle mtype = memory_type(dtype);
  const double tolerance = unit_tolerance(dtype);
  index_t renormalised = 0;
  std::optional<Bank> loaded;
  const auto read_block = [&](index_t r, index_t rows, void* dst, index_t stride) {
    const index_t r0 = first + r;
    const RowSelection sel = select_rows(ds.get(), r0, rows, dim, stride);
    H5_CHECK(H5Dread(ds.get(), mtype.get(), sel.memory.get(), sel.file.get(), H5P_DEFAULT, dst),
             "{}: dataset '{}' rows {}..{} cannot be read (truncated file or checksum mismatch)", path, name, r0,
             r0 + rows);
  };
  try {
    if (dtype == DType::float32)
      loaded = Bank::from_blocks(
          end - first, dim, block,
          [&](index_t r0, index_t rows, float* dst, index_t stride) { read_block(r0, rows, dst, stride); }, tolerance,
          &renormalised);
    else
      loaded = Bank::from_raw_blocks(
          end - first, dim, dtype, block,
          [&](index_t r0, index_t rows, std::uint16_t* dst, index_t stride) { read_block(r0, rows, dst, stride); },
          tolerance, &renormalised);
  } catch (const Error& e) {
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    MEMBANK_THROW("{}: dataset '{}': {}", path, name, e.what());
  }
  Bank bank = std::move(*loaded);
  MEMBANK_CHECK(renormalised == 0, "{}: {} {} rows of dataset '{}' are not unit norm (|norm - 1| > {}): the "
                "snapshot is corrupt", path, renormalised, to_string(dtype), name, tolerance);
  return bank;
}

/// Rows [first, end) of the snapshot's bank, a bank of their own (local row i: row first + i).
Bank read_bank(hid_t file, const SnapshotInfo& info, const std::string& path, index_t first, index_t end) {
  return read_bank_rows(file, "bank", info.dim, info.dtype, info.rows_per_chunk, path, first, end);
}

/// The norm of row i, widened to fp32 (exact) into `buf` (dim floats), summed in double.
double row_norm(const BankView& v, index_t i, float* buf) {
  v.widen_rows(i, 1, buf, v.dim);
  double sq = 0.0;
  for (index_t c = 0; c < v.dim; ++c) sq += static_cast<double>(buf[c]) * buf[c];
  return std::sqrt(sq);
}

/// Throws Error naming the first bank row that is not finite and unit norm within the tolerance of
/// the bank's type (unit_tolerance).
void check_unit_rows(const Bank& bank, const std::string& path) {
  const BankView v = bank.view();
  const double tolerance = unit_tolerance(v.dtype);
  index_t first_bad = v.rows;
#pragma omp parallel reduction(min : first_bad)
  {
    std::vector<float> buf(static_cast<std::size_t>(v.dim));
#pragma omp for schedule(static)
    for (index_t i = 0; i < v.rows; ++i)
      if (!(std::abs(row_norm(v, i, buf.data()) - 1.0) <= tolerance)) first_bad = std::min(first_bad, i);
  }
  if (first_bad == v.rows) return;
  std::vector<float> buf(static_cast<std::size_t>(v.dim));
  MEMBANK_THROW("{}: {} bank row {} has norm {}: expected 1 within {} (the bank in memory is corrupt); nothing was "
                "written", path, to_string(v.dtype), first_bad, row_norm(v, first_bad, buf.data()), tolerance);
}

// ---- temporaries ----------------------------------------------------------------------------------
// A save writes ".<name>.tmp-<pid>-h<host>-b<boot>-<random>" beside the destination: the writer's
// pid, a hash of the host name and the start of the kernel's boot id (8 hex digits each). A writer
// killed mid-save leaves it behind; the next save in the directory removes it when its writer is
// gone: same host, and an earlier boot or no process with that pid. Temporaries of live processes
// (this one included) and of other hosts are never touched.

struct HostBoot {
  std::string host, boot;
};

const HostBoot& host_boot() {
  static const HostBoot hb = [] {
    char name[256] = {};
    ::gethostname(name, sizeof name - 1);
    std::uint32_t h = 2166136261u;  // FNV-1a
    for (const char* p = name; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 16777619u;
    std::string boot;
    if (std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
      for (int c; boot.size() < 8 && (c = std::fgetc(f)) != EOF;)
        if (std::isxdigit(c)) boot += static_cast<char>(std::tolower(c));
      std::fclose(f);
    }
    if (boot.size() < 8) boot = "00000000";
    return HostBoot{fmt::format("{:08x}", h), boot};
  }();
  return hb;
}

std::string temp_name(const std::string& dest_name) {
  std::random_device rd;
  return fmt::format(".{}.tmp-{}-h{}-b{}-{:08x}", dest_name, ::getpid(), host_boot().host, host_boot().boot, rd());
}

bool is_hex8(const std::string& s) {
  return s.size() == 8 &&
         std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; });
}

void remove_stale_temporaries(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string f = it->path().filename().string();
    const auto at = f.rfind(".tmp-");
    if (f.empty() || f[0] != '.' || at == std::string::npos || at < 2) continue;
    std::vector<std::string> parts;
    for (std::size_t start = at + 5;;) {
      const auto dash = f.find('-', start);
      parts.push_back(f.substr(start, dash == std::string::npos ? std::string::npos : dash - start));
      if (dash == std::string::npos) break;
      start = dash + 1;
    }
    if (parts.size() != 4 || parts[0].empty() || parts[0].size() > 9 ||
        !std::all_of(parts[0].begin(), parts[0].end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        parts[1].size() != 9 || parts[1][0] != 'h' || !is_hex8(parts[1].substr(1)) || parts[2].size() != 9 ||
        parts[2][0] != 'b' || !is_hex8(parts[2].substr(1)) || !is_hex8(parts[3]))
      continue;
    if (parts[1].substr(1) != host_boot().host) continue;  // another host's (a shared file system)
    const auto pid = static_cast<pid_t>(std::stol(parts[0]));
    const bool earlier_boot = parts[2].substr(1) != host_boot().boot;
    const bool gone = pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH;
    if (!earlier_boot && !gone) continue;
    std::error_code sec;
    if (fs::is_regular_file(fs::symlink_status(it->path(), sec))) fs::remove(it->path(), sec);
  }
}

}  // namespace

SnapshotInfo read_snapshot_info(const std::string& path) {
  Handle f = open_file(path);
  try {
    return read_info(f.get(), path);
  } catch (const Error&) {
    throw;
  }
}

namespace detail {

SnapshotRows load_snapshot_rows(const std::string& path,
                                const std::function<std::pair<index_t, index_t>(const SnapshotInfo&)>& rows) {
  Handle f = open_file(path);
  SnapshotRows out;
  out.info = read_info(f.get(), path);
  const SnapshotInfo& info = out.info;
  const auto [first, end] = rows(info);
  MEMBANK_CHECK(first >= 0 && first < end && end <= info.n, "{}: rows {}..{}: expected a non-empty range of the n = {} "
                "rows", path, first, end, info.n);
  std::vector<std::int64_t> last =
      read_vector<std::int64_t>(f.get(), "last_update", first, end - first, H5T_NATIVE_INT64, path);
  for (std::size_t i = 0; i < last.size(); ++i)
    MEMBANK_CHECK(last[i] >= -1 && last[i] <= info.step, "{}: last_update[{}] = {}: expected -1 <= step <= {}",
                  path, first + static_cast<index_t>(i), last[i], info.step);
  out.sampler = read_sampler(f.get(), info.sampler, info.sampler_params, info.n, info.dim, path);
  if (info.has_labels) out.labels = read_vector<std::int64_t>(f.get(), "labels", 0, info.n, H5T_NATIVE_INT64, path);
  out.bank.emplace(read_bank(f.get(), info, path, first, end));
  out.bank->set_last_update(std::move(last));
  return out;
}

}  // namespace detail

Engine load_snapshot(const std::string& path, std::vector<std::int64_t>* labels) {
  detail::SnapshotRows part =
      detail::load_snapshot_rows(path, [](const SnapshotInfo& info) { return std::pair(index_t{0}, info.n); });
  const SnapshotInfo& info = part.info;
  if (labels && info.has_labels) *labels = part.labels;
  Engine engine(std::move(*part.bank), std::move(part.sampler), info.config);
  if (info.has_labels) {
    try {
      engine.set_labels(part.labels);
    } catch (const Error& e) {
      MEMBANK_THROW("{}: labels: {}", path, e.what());
    }
  }
  engine.restore_state(info.partition, info.step);
  return engine;
}

std::vector<std::string> verify_snapshot(const std::string& path) {
  try {
    switch (read_snapshot_kind(path)) {
      case SnapshotKind::queue: load_queue_snapshot(path); break;
      case SnapshotKind::multiview: load_multiview_snapshot(path); break;
      case SnapshotKind::engine: {
        std::vector<std::int64_t> labels;  // read too: every dataset's checksums are checked
        load_snapshot(path, &labels);
        break;
      }
    }
  } catch (const Error& e) {
    return {e.what()};
  }
  return {};
}

std::uint64_t snapshot_size_estimate(index_t n, index_t dim, DType dtype) {
  MEMBANK_CHECK(n >= 1 && dim >= 1, "n = {}, dim = {}: expected n, dim >= 1", n, dim);
  // the bank, last_update + sampler weights + labels (8 bytes each a row), 1 MiB of metadata slack
  const auto bank = static_cast<std::uint64_t>(
      mul_no_overflow(mul_no_overflow(n, dim, "snapshot size"), dtype_bytes(dtype), "snapshot size"));
  return bank + 24 * static_cast<std::uint64_t>(n) + (std::uint64_t{1} << 20);
}

namespace {

/// check_snapshot_destination for a file of about `need` bytes; `what` names it in messages.
void check_destination(const std::string& path, double need, const char* what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  MEMBANK_CHECK(!path.empty(), "{} path is empty", what);
  const fs::path dest = fs::absolute(path, ec);
  MEMBANK_CHECK(!ec, "{}: {}", path, ec.message());
  const fs::path dir = dest.parent_path();
  MEMBANK_CHECK(fs::is_directory(dir, ec), "{}: directory {} does not exist", path, dir.string());
  MEMBANK_CHECK(!fs::is_directory(dest, ec), "{}: is a directory", path);
  MEMBANK_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, "{}: directory {} is not writable", path, dir.string());
  // Refuse up front a save that cannot fit (free space, RLIMIT_FSIZE), before any work.
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) == 0) {
    const double avail = static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize);
    if (avail < need)
      throw ResourceError(fmt::format("membank: {}: {:.1f} MB free in {}: the {} needs about {:.1f} MB", path,
                                      avail * 1e-6, dir.string(), what, need * 1e-6));
  }
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && static_cast<double>(rl.rlim_cur) < need)
    throw ResourceError(fmt::format("membank: {}: the file-size limit (RLIMIT_FSIZE) is {} bytes: the {} needs "
                                    "about {:.0f}", path, static_cast<unsigned long long>(rl.rlim_cur), what, need));
}

/// Writes a new HDF5 file at `path` the crash-safe way: `write` fills a temporary in the destination's
/// directory (its root group and name given), which is closed, reopened and checked by `validate`,
/// fsynced, renamed over the destination, and the directory fsynced: a writer killed at any moment
/// leaves the previous file as it was. On any failure the temporary is removed and the destination
/// is untouched. `before_rename` (when given) runs just before the rename, the temporary complete.
void write_atomically(const std::string& path, const std::function<void(hid_t, const std::string&)>& write,
                      const std::function<void(hid_t, const std::string&)>& validate,
                      const std::function<void()>& before_rename = {}) {
  namespace fs = std::filesystem;
  const fs::path dest = fs::absolute(path);
  const fs::path dir = dest.parent_path();
  remove_stale_temporaries(dir);
  const fs::path tmp = dir / temp_name(dest.filename().string());

  struct RemoveOnError {
    fs::path p;
    bool armed = true;
    ~RemoveOnError() {
      if (armed) {
        std::error_code ec;
        fs::remove(p, ec);
      }
    }
  } cleanup{tmp};

  {
    // The 1.10 file format: chunk indexes that stay cheap for millions of rows (h5py and h5dump of
    // HDF5 >= 1.10 read it).
    Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_LATEST);
    Handle f(H5Fcreate(tmp.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), H5Fclose);
    H5_CHECK(f.get(), "{}: cannot create the temporary file {}", path, tmp.string());
    try {
      write(f.get(), tmp.string());
      H5_CHECK(H5Fflush(f.get(), H5F_SCOPE_GLOBAL), "{}: cannot flush {}", path, tmp.string());
    } catch (...) {
      close_failed_file(f.release());
      throw;
    }
    if (f.close() < 0) {
      skip_hdf5_cleanup_at_exit();
      MEMBANK_THROW("{}: cannot close {}", path, tmp.string());
    }
  }
  // Validate what is on disk before it replaces anything.
  {
    Handle f = open_file(tmp.string());
    validate(f.get(), tmp.string());
  }
  fsync_path(tmp.string(), false);
  if (before_rename) before_rename();
  MEMBANK_CHECK(std::rename(tmp.c_str(), dest.c_str()) == 0, "{}: cannot rename {} over it: {}", path, tmp.string(),
                std::strerror(errno));
  cleanup.armed = false;
  fsync_path(dir.string(), true);
}

/// Writes the (n, dim) dataset `name` holding the bank's rows as they are (its own type; the
/// dataset's `dtype` attribute names it): without compression chunk by chunk with H5Dwrite_chunk
/// (write_bank_direct), else whole chunks at a time straight from the bank's rows (a memory
/// hyperslab skips the padding).
void write_bank_dataset(hid_t root, const char* name, const Bank& bank, int deflate, const std::string& path) {
  const index_t n = bank.size(), dim = bank.dim();
  const DType t = bank.dtype();
  const index_t chunk = rows_per_chunk(dim, n, dtype_bytes(t));
  const Handle ftype = file_type(t), mtype = memory_type(t);
  Handle ds = create_dataset(root, name, ftype.get(), n, dim, chunk, deflate, path);
  write_attr(ds.get(), "dtype", to_string(t));
  if (deflate == 0) {
    write_bank_direct(ds.get(), bank, chunk, path);
    return;
  }
  const index_t block = chunk * std::max<index_t>(1, 64 / std::max<index_t>(1, chunk * dim * dtype_bytes(t) >> 20));
  for (index_t r0 = 0; r0 < n; r0 += block) {
    const index_t rows = std::min(block, n - r0);
    const RowSelection sel = select_rows(ds.get(), r0, rows, dim, bank.stride());
    H5_CHECK(H5Dwrite(ds.get(), mtype.get(), sel.memory.get(), sel.file.get(), H5P_DEFAULT, bank.view().row_data(r0)),
             "{}: cannot write {} rows {}..{}", path, name, r0, r0 + rows);
  }
}

/// Every field of the configuration as a root attribute (read_config_attributes reads them back).
void write_config_attributes(hid_t root, const EngineConfig& c) {
  write_attr_u(root, "seed", c.seed);
  write_attr(root, "k", c.k);
  write_attr(root, "tau", c.tau);
  write_attr(root, "momentum", c.momentum);
  write_attr(root, "objective", to_string(c.objective));
  write_attr(root, "negatives", to_string(c.negatives));
  write_attr(root, "exclude_positive", std::int64_t{c.exclude_positive});
  write_attr(root, "z_policy", to_string(c.z_policy));
  write_attr(root, "z_fixed", c.z_fixed);
  write_attr(root, "z_ema", c.z_ema);
  write_attr(root, "normalize_features", std::int64_t{c.normalize_features});
  write_attr(root, "unit_norm_tolerance", c.unit_norm_tolerance);
  write_attr(root, "tau_plus", c.tau_plus);
  write_attr(root, "beta", c.beta);
  write_attr(root, "detach_weights", std::int64_t{c.detach_weights});
  write_attr(root, "kernel_t", c.kernel_t);
  write_attr(root, "gamma", c.gamma);
  write_attr(root, "margin", c.effective_margin());
  write_attr(root, "exclude_same_label", std::int64_t{c.exclude_same_label});
  write_attr(root, "rounding", to_string(c.rounding));
  write_attr(root, "allow_biased_sampler", std::int64_t{c.allow_biased_sampler});
}

/// format, format_version and kind of a new file, and the membank that writes it.
void write_header(hid_t root, SnapshotKind kind) {
  write_attr(root, "format", std::string(kFormat));
  write_attr(root, "format_version",
             std::int64_t{kind == SnapshotKind::engine ? kFormatVersion : kMemoriesFormatVersion});
  write_attr(root, "kind", to_string(kind));
  write_attr(root, "engine_version", std::string(MEMBANK_VERSION_STRING));
}

/// The root attributes of a snapshot (a single file or a shard set's master).
void write_root_attributes(hid_t root, const detail::SnapshotState& s) {
  write_header(root, SnapshotKind::engine);
  write_attr(root, "n", s.n);
  write_attr(root, "dim", s.dim);
  write_attr(root, "step", s.step);
  write_config_attributes(root, s.config);
  write_attr(root, "z_initialised", std::int64_t{s.partition.initialised});
  write_attr(root, "log_z", s.partition.log_z);
  write_attr(root, "sampler", to_string(s.sampler.kind()));
  write_attr(root, "dtype", to_string(s.dtype));
}

/// A chunked, checksummed 1-D dataset of n entries (8 bytes each) from `data`.
void write_vector(hid_t root, const char* name, hid_t ftype, hid_t mtype, const void* data, index_t n, int deflate,
                  const std::string& path) {
  const index_t vchunk = std::max<index_t>(1, std::min<index_t>(n, kChunkBytes / 8));
  Handle ds = create_dataset(root, name, ftype, n, 0, vchunk, deflate, path);
  write_rows(ds.get(), mtype, 0, n, 0, data);
}

/// A cluster sampler's whole state (read_cluster_sampler reads it back).
void write_cluster_sampler(hid_t root, const ClusterSampler& s, int deflate, const std::string& path) {
  const ClusterConfig& c = s.config();
  const index_t k = c.clusters, d = s.centroids().cols(), n = s.size();
  {
    Handle ds = create_dataset(root, "sampler_cluster/centroids", H5T_IEEE_F32LE, k, d, rows_per_chunk(d, k), deflate,
                               path);
    write_rows(ds.get(), H5T_NATIVE_FLOAT, 0, k, d, s.centroids().data());
  }
  {
    Handle ds = create_dataset(root, "sampler_cluster/assignment", H5T_STD_I32LE, n, 0,
                               std::max<index_t>(1, std::min<index_t>(n, kChunkBytes / 4)), deflate, path);
    write_rows(ds.get(), H5T_NATIVE_INT32, 0, n, 0, s.assignment().data());
  }
  Handle g(H5Gopen2(root, "sampler_cluster", H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.get(), "{}: cannot open the group 'sampler_cluster'", path);
  write_attr(g.get(), "clusters", std::int64_t{c.clusters});
  write_attr(g.get(), "epsilon", c.epsilon);
  write_attr(g.get(), "beta", c.beta);
  write_attr(g.get(), "refresh_every", std::int64_t{c.refresh_every});
  write_attr(g.get(), "iterations", std::int64_t{c.iterations});
  write_attr_u(g.get(), "seed", c.seed);
  write_attr(g.get(), "refreshed_at", std::int64_t{s.refreshed_at()});
}

/// The sampler's state: an alias sampler's weights; a cluster sampler's clusters; a dynamic sampler's
/// current weights, its loss average (loss_ema) and its parameters; a ring sampler's ranks; nothing
/// for a uniform sampler (its N). Any other kind is refused (the loaders could not build it): the save fails, the destination
/// untouched.
void write_sampler(hid_t root, const NoiseSampler& sampler, index_t n, int deflate, const std::string& path) {
  check_loadable_sampler(sampler.kind(), path);
  if (sampler.kind() == SamplerKind::alias)
    write_vector(root, "sampler_weights", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE,
                 dynamic_cast<const AliasSampler&>(sampler).weights().data(), n, deflate, path);
  else if (sampler.kind() == SamplerKind::cluster)
    write_cluster_sampler(root, dynamic_cast<const ClusterSampler&>(sampler), deflate, path);
  if (sampler.kind() == SamplerKind::ring) {
    write_attr(root, "sampler_ring_lower", dynamic_cast<const RingSampler&>(sampler).config().lower);
    write_attr(root, "sampler_ring_upper", dynamic_cast<const RingSampler&>(sampler).config().upper);
  }
  if (sampler.kind() == SamplerKind::dynamic) {
    const auto& d = dynamic_cast<const DynamicSampler&>(sampler);
    write_vector(root, "sampler_weights", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, d.weights().data(), n, deflate, path);
    if (d.params().drive == DynamicSampler::Drive::loss_ema)
      write_vector(root, "sampler_ema", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, d.ema().data(), n, deflate, path);
    write_attr(root, "sampler_drive", to_string(d.params().drive));
    write_attr(root, "sampler_alpha", d.params().alpha);
    write_attr(root, "sampler_floor", d.params().floor);
  }
}

/// A virtual dataset `name` of n rows (dim = 0: 1-D) whose rows[i] come from the dataset of the same
/// name in files[i] (all of it).
Handle create_virtual(hid_t root, const char* name, hid_t type, index_t n, index_t dim,
                    const std::vector<std::string>& files, const std::vector<std::pair<index_t, index_t>>& rows,
                    const std::string& path) {
  const int rank = dim > 0 ? 2 : 1;
  const hsize_t dims[2] = {static_cast<hsize_t>(n), static_cast<hsize_t>(dim)};
  Handle vspace(H5Screate_simple(rank, dims, nullptr), H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  for (std::size_t i = 0; i < files.size(); ++i) {
    const hsize_t start[2] = {static_cast<hsize_t>(rows[i].first), 0};
    const hsize_t count[2] = {static_cast<hsize_t>(rows[i].second - rows[i].first), static_cast<hsize_t>(dim)};
    Handle src(H5Screate_simple(rank, count, nullptr), H5Sclose);
    H5_CHECK(H5Sselect_hyperslab(vspace.get(), H5S_SELECT_SET, start, nullptr, count, nullptr),
             "{}: cannot select rows {}..{} of '{}'", path, rows[i].first, rows[i].second, name);
    H5_CHECK(H5Pset_virtual(dcpl.get(), vspace.get(), files[i].c_str(), name, src.get()),
             "{}: cannot map '{}' rows {}..{} to {}", path, name, rows[i].first, rows[i].second, files[i]);
  }
  H5_CHECK(H5Sselect_all(vspace.get()), "{}: cannot select '{}'", path, name);
  Handle ds(H5Dcreate2(root, name, type, vspace.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose);
  H5_CHECK(ds.get(), "{}: cannot create the virtual dataset '{}'", path, name);
  return ds;
}

}  // namespace

void check_snapshot_destination(const std::string& path, index_t n, index_t dim, DType dtype) {
  check_destination(path, static_cast<double>(snapshot_size_estimate(n, dim, dtype)), "snapshot");
}

void save_snapshot(const std::string& path, const Engine& engine, const SnapshotOptions& options,
                   std::span<const std::int64_t> labels) {
  if (labels.empty()) labels = engine.labels();  // the engine's own, if it holds any
  const Bank& bank = engine.bank();
  detail::save_snapshot_file(path, bank,
                             {engine.config(), engine.partition(), engine.steps_done(), engine.sampler(), bank.size(),
                              bank.dim(), bank.dtype()},
                             labels, options);
}

namespace detail {

void save_snapshot_file(const std::string& path, const Bank& bank, const SnapshotState& state,
                        std::span<const std::int64_t> labels, const SnapshotOptions& options) {
  quiet_hdf5();
  const index_t n = bank.size(), dim = bank.dim();
  MEMBANK_CHECK(options.deflate_level >= 0 && options.deflate_level <= 9, "deflate_level = {}: expected 0..9",
                options.deflate_level);
  MEMBANK_CHECK(labels.empty() || static_cast<index_t>(labels.size()) == n, "labels has {} entries: expected N = {}",
                labels.size(), n);
  check_snapshot_destination(path, n, dim, bank.dtype());
  // What load refuses is never written: every row finite and unit norm, checked before any file exists.
  check_unit_rows(bank, path);
  write_atomically(
      path,
      [&](hid_t root, const std::string&) {
        write_root_attributes(root, state);
        write_bank_dataset(root, "bank", bank, options.deflate_level, path);
        write_vector(root, "last_update", H5T_STD_I64LE, H5T_NATIVE_INT64, bank.last_update().data(), n,
                     options.deflate_level, path);
        write_sampler(root, state.sampler, n, options.deflate_level, path);
        if (!labels.empty())
          write_vector(root, "labels", H5T_STD_I64LE, H5T_NATIVE_INT64, labels.data(), n, options.deflate_level, path);
      },
      [](hid_t f, const std::string& tmp) { read_info(f, tmp); });
}

void save_snapshot_shard(const std::string& path, const Bank& rows, std::span<const std::int64_t> labels,
                         std::int64_t step, const ShardPlace& place, const SnapshotOptions& options) {
  quiet_hdf5();
  const index_t n = rows.size(), dim = rows.dim();
  MEMBANK_CHECK(options.deflate_level >= 0 && options.deflate_level <= 9, "deflate_level = {}: expected 0..9",
                options.deflate_level);
  MEMBANK_CHECK(place.end - place.begin == n, "{}: the shard holds {} rows: expected rows {}..{}", path, n,
                place.begin, place.end);
  MEMBANK_CHECK(labels.empty() || static_cast<index_t>(labels.size()) == n,
                "{}: {} labels for the shard's {} rows", path, labels.size(), n);
  MEMBANK_CHECK(is_generation(place.generation), "{}: generation '{}': expected 16 hexadecimal digits", path,
                place.generation);
  check_destination(path, static_cast<double>(snapshot_size_estimate(n, dim, rows.dtype())), "snapshot shard");
  check_unit_rows(rows, path);
  write_atomically(
      path,
      [&](hid_t root, const std::string&) {
        write_attr(root, "format", std::string(kShardFormat));
        write_attr(root, "format_version", std::int64_t{kShardFormatVersion});
        write_attr(root, "engine_version", std::string(MEMBANK_VERSION_STRING));
        write_attr(root, "generation", place.generation);
        write_attr(root, "shard", std::int64_t{place.index});
        write_attr(root, "shards", std::int64_t{place.count});
        write_attr(root, "n", place.n);
        write_attr(root, "row_begin", place.begin);
        write_attr(root, "row_end", place.end);
        write_attr(root, "dim", dim);
        write_attr(root, "dtype", to_string(rows.dtype()));
        write_attr(root, "step", step);
        write_bank_dataset(root, "bank", rows, options.deflate_level, path);
        write_vector(root, "last_update", H5T_STD_I64LE, H5T_NATIVE_INT64, rows.last_update().data(), n,
                     options.deflate_level, path);
        if (!labels.empty())
          write_vector(root, "labels", H5T_STD_I64LE, H5T_NATIVE_INT64, labels.data(), n, options.deflate_level, path);
      },
      [&](hid_t f, const std::string& tmp) { check_shard(f, tmp, place, dim, rows.dtype(), !labels.empty()); });
}

void save_snapshot_master(const std::string& path, const SnapshotState& state, bool has_labels,
                          const std::string& generation, const std::vector<std::string>& files,
                          const std::vector<std::pair<index_t, index_t>>& rows,
                          const std::function<void()>& before_rename) {
  quiet_hdf5();
  MEMBANK_CHECK(!files.empty() && files.size() == rows.size(), "{}: {} shard files for {} row ranges", path,
                files.size(), rows.size());
  MEMBANK_CHECK(is_generation(generation), "{}: generation '{}': expected 16 hexadecimal digits", path, generation);
  // the master holds attributes, mappings and the sampler's weights: 8 bytes a row and some metadata
  check_destination(path, 8.0 * static_cast<double>(state.n) + static_cast<double>(1 << 20), "snapshot master");
  write_atomically(
      path,
      [&](hid_t root, const std::string&) {
        write_root_attributes(root, state);
        write_attr(root, "shards", static_cast<std::int64_t>(files.size()));
        write_attr(root, "generation", generation);
        const Handle ftype = file_type(state.dtype);
        const Handle bank = create_virtual(root, "bank", ftype.get(), state.n, state.dim, files, rows, path);
        write_attr(bank.get(), "dtype", to_string(state.dtype));  // as a single file's bank: bfloat16 needs it
        create_virtual(root, "last_update", H5T_STD_I64LE, state.n, 0, files, rows, path);
        if (has_labels) create_virtual(root, "labels", H5T_STD_I64LE, state.n, 0, files, rows, path);
        write_sampler(root, state.sampler, state.n, 0, path);
      },
      [](hid_t f, const std::string& tmp) { read_info(f, tmp); }, before_rename);
}

std::optional<ShardSetNames> read_shard_set_names(const std::string& path) {
  try {
    quiet_hdf5();
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec) || H5Fis_hdf5(path.c_str()) <= 0) return std::nullopt;
    Handle f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    if (!f.ok()) return std::nullopt;
    const AttrReader a(f.get(), path);
    if (!a.has("shards") || !a.has("generation") || H5Lexists(f.get(), "bank", H5P_DEFAULT) <= 0) return std::nullopt;
    ShardSetNames names;
    names.generation = a.str("generation");
    Handle ds(H5Dopen2(f.get(), "bank", H5P_DEFAULT), H5Dclose);
    if (!ds.ok()) return std::nullopt;
    Handle dcpl(H5Dget_create_plist(ds.get()), H5Pclose);
    std::size_t count = 0;
    if (H5Pget_layout(dcpl.get()) != H5D_VIRTUAL || H5Pget_virtual_count(dcpl.get(), &count) < 0) return std::nullopt;
    for (std::size_t i = 0; i < count; ++i) {
      const ssize_t len = H5Pget_virtual_filename(dcpl.get(), i, nullptr, 0);
      if (len <= 0 || len >= 4096) continue;
      std::string t(static_cast<std::size_t>(len) + 1, '\0');
      H5Pget_virtual_filename(dcpl.get(), i, t.data(), t.size());
      t.resize(static_cast<std::size_t>(len));
      names.files.push_back(t);
    }
    return names;
  } catch (...) {
    return std::nullopt;
  }
}

}  // namespace detail

void export_bank(const std::string& path, const Bank& bank, DType dtype, const std::string& dataset) {
  quiet_hdf5();
  MEMBANK_CHECK(!dataset.empty() && dataset.back() != '/' && dataset.find("//") == std::string::npos &&
                    dataset != "." && dataset.find('\0') == std::string::npos,
                "{}: dataset name '{}': expected a path of one or more names, like 'bank' or 'features/train'", path,
                dataset);
  const index_t n = bank.size(), dim = bank.dim();
  check_destination(path, static_cast<double>(snapshot_size_estimate(n, dim, dtype)), "export");
  // The rows in the requested type: the bank itself when it is already of that type, else a
  // converted copy (widened exactly, or rounded to nearest), converted one block of rows at a time.
  std::optional<Bank> converted;
  if (dtype != bank.dtype()) {
    const BankView v = bank.view();
    converted = Bank::from_blocks(
        n, dim, rows_per_chunk(dim, n),
        [&](index_t r0, index_t rows, float* dst, index_t stride) { v.widen_rows(r0, rows, dst, stride); },
        // no row is renormalised: the widened rows are what is exported
        std::numeric_limits<double>::infinity(), nullptr, dtype);
  }
  const Bank& rows = converted ? *converted : bank;
  write_atomically(
      path, [&](hid_t root, const std::string&) { write_bank_dataset(root, dataset.c_str(), rows, 0, path); },
      [&](hid_t f, const std::string& tmp) {
        Handle ds = open_dataset(f, dataset.c_str(), tmp);
        const DatasetShape s = shape_of(ds.get());
        MEMBANK_CHECK(s.rank == 2 && s.dims[0] == static_cast<hsize_t>(n) && s.dims[1] == static_cast<hsize_t>(dim) &&
                          stored_dtype(ds.get(), tmp, dataset) == dtype,
                      "{}: dataset '{}' does not read back as {} x {} {}", tmp, dataset, n, dim, to_string(dtype));
        check_storage(ds.get(), n, chunk_rows_of(ds.get()), tmp, dataset.c_str());
      });
}

Bank import_bank(const std::string& path, const std::string& dataset, index_t* renormalised, DType dtype) {
  Handle f = open_file(path);
  Handle ds = open_dataset(f.get(), dataset.c_str(), path);
  const DatasetShape s = shape_of(ds.get());
  MEMBANK_CHECK(s.rank == 2, "{}: dataset '{}' has rank {}: expected 2 (N, D)", path, dataset, s.rank);
  // Floats of any width HDF5 converts to double exactly (float16, float32, float64), or bfloat16 words.
  const bool bf16 = stored_dtype(ds.get(), path, dataset, false) == DType::bfloat16;
  if (!bf16) {
    Handle type(H5Dget_type(ds.get()), H5Tclose);
    MEMBANK_CHECK(s.cls == H5T_FLOAT && (s.elem_size == 2 || s.elem_size == 4 || s.elem_size == 8),
                  "{}: dataset '{}' holds {}: expected float16, float32, float64, or bfloat16 words (16-bit unsigned "
                  "integers with the attribute dtype = 'bfloat16')", path, dataset, type_description(type.get()));
  }
  const auto n = static_cast<index_t>(s.dims[0]), dim = static_cast<index_t>(s.dims[1]);
  MEMBANK_CHECK(n >= 1 && dim >= 1, "{}: dataset '{}' is {} x {}: expected N, D >= 1", path, dataset, n, dim);
  const index_t chunk = chunk_rows_of(ds.get());
  if (chunk >= 1) {  // another tool may chunk columns too: every chunk of the grid must be stored
    Handle dcpl(H5Dget_create_plist(ds.get()), H5Pclose);
    hsize_t cdims[2] = {1, 1};
    H5Pget_chunk(dcpl.get(), 2, cdims);
    hsize_t stored = 0;
    Handle space(H5Dget_space(ds.get()), H5Sclose);
    if (H5Dget_num_chunks(ds.get(), space.get(), &stored) < 0) stored = 0;
    const hsize_t expected = ((static_cast<hsize_t>(n) + cdims[0] - 1) / cdims[0]) *
                             ((static_cast<hsize_t>(dim) + cdims[1] - 1) / cdims[1]);
    MEMBANK_CHECK(stored == expected, "{}: dataset '{}' stores {} chunks: expected {} for {} x {} (truncated or "
                  "inconsistent file)", path, dataset, stored, expected, n, dim);
  }
  // Storage: a contiguous dataset must hold all its bytes.
  const auto bytes = static_cast<hsize_t>(mul_no_overflow(mul_no_overflow(n, dim, "import N x D"),
                                                          static_cast<index_t>(s.elem_size), "import bytes"));
  MEMBANK_CHECK(chunk >= 1 || H5Dget_storage_size(ds.get()) >= bytes,
                "{}: dataset '{}' stores {} bytes: expected {} for {} x {}", path, dataset,
                H5Dget_storage_size(ds.get()), bytes, n, dim);
  const index_t block = rows_per_chunk(dim, n);
  std::vector<double> tmp;
  std::vector<std::uint16_t> words;
  try {
  return Bank::from_blocks(
      n, dim, block,
      [&](index_t r0, index_t rows, float* dst, index_t stride) {
        tmp.resize(static_cast<std::size_t>(rows * dim));
        if (bf16) {  // the words widened: exact
          words.resize(tmp.size());
          read_rows(ds.get(), H5T_NATIVE_UINT16, r0, rows, dim, words.data(), path, dataset.c_str());
          for (std::size_t i = 0; i < words.size(); ++i) tmp[i] = detail::widen(detail::bf16{words[i]});
        } else {
          read_rows(ds.get(), H5T_NATIVE_DOUBLE, r0, rows, dim, tmp.data(), path, dataset.c_str());
        }
        for (index_t r = 0; r < rows; ++r)
          for (index_t c = 0; c < dim; ++c) {
            const double x = tmp[static_cast<std::size_t>(r * dim + c)];
            MEMBANK_CHECK(std::isfinite(x), "{}: dataset '{}' row {} holds {} at column {}: expected finite values",
                          path, dataset, r0 + r, x, c);
            dst[r * stride + c] = static_cast<float>(x);
          }
      },
      1e-5, renormalised, dtype);
  } catch (const Error& e) {
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    MEMBANK_THROW("{}: dataset '{}': {}", path, dataset, e.what());
  }
}


// ---- kinds: queue and multi-view snapshots (docs/snapshot-format.md) ------------------------------

std::string to_string(SnapshotKind kind) {
  switch (kind) {
    case SnapshotKind::queue: return "queue";
    case SnapshotKind::multiview: return "multiview";
    case SnapshotKind::engine: break;
  }
  return "engine";
}

SnapshotKind snapshot_kind_from_string(const std::string& s) {
  if (s == "engine") return SnapshotKind::engine;
  if (s == "queue") return SnapshotKind::queue;
  if (s == "multiview") return SnapshotKind::multiview;
  MEMBANK_THROW("snapshot kind '{}': expected one of engine, queue, multiview", s);
}

namespace {

static_assert(sizeof(index_t) == sizeof(std::int64_t), "ids are stored as int64");

/// `f()`, every Error naming the file (the parsers and validators it calls do not know it).
template <class F>
auto naming_file(const std::string& path, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    MEMBANK_THROW("{}: {}", path, e.what());
  }
}

/// n and dim as the attributes give them: n >= 1, 1 <= dim <= 2^20, and `copies` banks of n x dim
/// 4-byte elements addressable.
void check_sizes(const std::string& path, const char* n_name, index_t n, index_t dim, index_t copies = 1) {
  MEMBANK_CHECK(n >= 1 && dim >= 1 && dim <= (1 << 20), "{}: {} = {}, dim = {}: expected {} >= 1 and 1 <= dim <= "
                "2^20", path, n_name, n, dim, n_name);
  MEMBANK_CHECK(n <= std::numeric_limits<std::int64_t>::max() / 4 / dim / copies,
                "{}: {} = {} x dim = {} x 4 bytes{} overflows int64", path, n_name, n, dim,
                copies > 1 ? fmt::format(" x {} views", copies) : std::string());
}

/// The storage of a rows dataset checked: its layout and compression.
struct RowsLayout {
  index_t rows_per_chunk = 0;
  bool compressed = false;
};

/// Checks the (n, dim) rows dataset `name` (a bank, a queue's keys) as a single file's /bank is
/// checked: rank 2, of type `dtype` (its `dtype` attribute agreeing), (n, dim), chunked by rows, every
/// chunk stored.
RowsLayout check_rows_dataset(hid_t file, const char* name, index_t n, index_t dim, DType dtype,
                              const std::string& path) {
  Handle ds = open_dataset(file, name, path);
  const DatasetShape s = shape_of(ds.get());
  MEMBANK_CHECK(s.rank == 2, "{}: dataset '{}' has rank {}: expected 2 ({} x {})", path, name, s.rank, n, dim);
  const std::optional<DType> stored = stored_dtype(ds.get(), path, name);
  if (stored != dtype) {
    Handle type(H5Dget_type(ds.get()), H5Tclose);
    MEMBANK_THROW("{}: dataset '{}' holds {}: expected {}{}", path, name, type_description(type.get()),
                  to_string(dtype),
                  dtype == DType::bfloat16 ? " words (16-bit unsigned integers with the attribute dtype = 'bfloat16')"
                                           : "");
  }
  MEMBANK_CHECK(s.dims[0] == static_cast<hsize_t>(n) && s.dims[1] == static_cast<hsize_t>(dim),
                "{}: dataset '{}' is {} x {} but the attributes say {} x {}", path, name, s.dims[0], s.dims[1], n, dim);
  RowsLayout out;
  out.rows_per_chunk = chunk_rows_of(ds.get());
  MEMBANK_CHECK(out.rows_per_chunk >= 1, "{}: dataset '{}' is not chunked by rows", path, name);
  check_storage(ds.get(), n, out.rows_per_chunk, path, name);
  out.compressed = has_filter(ds.get(), H5Z_FILTER_DEFLATE);
  return out;
}

/// Every last-update step in [-1, step]; `what` names the vector in the message.
void check_last_update(const std::vector<std::int64_t>& last, std::int64_t step, const std::string& path,
                       const std::string& what) {
  for (std::size_t i = 0; i < last.size(); ++i)
    MEMBANK_CHECK(last[i] >= -1 && last[i] <= step, "{}: {}: entry {} is {}: expected a last-update step in [-1, "
                  "step = {}]", path, what, i, last[i], step);
}

/// A small (rows, cols) int64 dataset, chunked whole, checksummed.
void write_small_matrix(hid_t root, const char* name, const std::vector<std::int64_t>& data, index_t rows,
                        index_t cols, int deflate, const std::string& path) {
  Handle ds = create_dataset(root, name, H5T_STD_I64LE, rows, cols, rows, deflate, path);
  write_rows(ds.get(), H5T_NATIVE_INT64, 0, rows, cols, data.data());
}

// ---- queue ------------------------------------------------------------------------------------

QueueSnapshotInfo read_queue_info_checked(hid_t file, const std::string& path) {
  const Header header = read_header(file, path);
  expect_kind(header, SnapshotKind::queue, path);
  const AttrReader a(file, path);
  QueueSnapshotInfo info;
  info.format = header.format;
  info.format_version = header.version;
  info.engine_version = a.str("engine_version");
  info.capacity = a.i64("capacity");
  info.dim = a.i64("dim");
  check_sizes(path, "capacity", info.capacity, info.dim);
  info.dtype = dtype_from_string(a.str("dtype"));
  info.step = a.i64("step");
  MEMBANK_CHECK(info.step >= 0, "{}: step = {}: expected >= 0", path, info.step);
  info.position = a.i64("position");
  MEMBANK_CHECK(info.position >= 0 && info.position < info.capacity,
                "{}: position = {}: expected 0 <= position < capacity = {}", path, info.position, info.capacity);
  info.enqueued = a.i64("enqueued");
  MEMBANK_CHECK(info.enqueued >= 0, "{}: enqueued = {}: expected >= 0", path, info.enqueued);
  info.config = read_config_attributes(a, header.version);
  try {
    (void)Queue(1, 1, info.config);  // the queue's own checks of its configuration, on a queue of one key
  } catch (const Error& e) {
    MEMBANK_THROW("{}: invalid configuration: {}", path, e.what());
  }
  const RowsLayout keys = check_rows_dataset(file, "keys", info.capacity, info.dim, info.dtype, path);
  info.rows_per_chunk = keys.rows_per_chunk;
  info.compressed = keys.compressed;
  check_row_vector(file, "last_update", info.capacity, H5T_INTEGER, 8, path);
  check_row_vector(file, "ids", info.capacity, H5T_INTEGER, 8, path);
  check_row_vector(file, "labels", info.capacity, H5T_INTEGER, 8, path);
  check_row_vector(file, "labelled", info.capacity, H5T_INTEGER, 1, path);
  return info;
}

QueueSnapshotInfo read_queue_info(hid_t file, const std::string& path) {
  return naming_file(path, [&] { return read_queue_info_checked(file, path); });
}

// ---- multi-view -------------------------------------------------------------------------------

std::string view_group(index_t v) { return fmt::format("view_{}", v); }

/// A group's string attribute, the error naming the group.
std::string group_str(hid_t file, const std::string& group, const char* name, const std::string& path) {
  MEMBANK_CHECK(H5Lexists(file, group.c_str(), H5P_DEFAULT) > 0, "{}: group '{}' is missing", path, group);
  Handle g(H5Gopen2(file, group.c_str(), H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.get(), "{}: '{}' cannot be opened as a group", path, group);
  return AttrReader(g.get(), fmt::format("{}: group '{}'", path, group)).str(name);
}

MultiViewSnapshotInfo read_multiview_info_checked(hid_t file, const std::string& path) {
  const Header header = read_header(file, path);
  expect_kind(header, SnapshotKind::multiview, path);
  const AttrReader a(file, path);
  MultiViewSnapshotInfo info;
  info.format = header.format;
  info.format_version = header.version;
  info.engine_version = a.str("engine_version");
  info.views = a.i64("views");
  MEMBANK_CHECK(info.views >= 2 && info.views <= 4096, "{}: views = {}: expected 2 <= V <= 4096", path, info.views);
  info.n = a.i64("n");
  info.dim = a.i64("dim");
  check_sizes(path, "n", info.n, info.dim, info.views);
  info.step = a.i64("step");
  MEMBANK_CHECK(info.step >= 0, "{}: step = {}: expected >= 0", path, info.step);
  info.graph = view_graph_from_string(a.str("graph"));
  EngineConfig& c = info.config;
  c = read_config_attributes(a, header.version);
  try {
    c.validate(info.n, info.dim);
  } catch (const Error& e) {
    MEMBANK_THROW("{}: invalid configuration: {}", path, e.what());
  }
  info.sampler = sampler_kind_from_string(a.str("sampler"));
  check_loadable_sampler(info.sampler, path);
  if (info.sampler == SamplerKind::dynamic) info.sampler_params = read_dynamic_params(a, path);
  info.has_labels = H5Lexists(file, "labels", H5P_DEFAULT) > 0;

  // The views: a group view_<v> each, with its bank's type, rows and last-update steps; no more.
  for (index_t v = 0; v < info.views; ++v) {
    const std::string g = view_group(v);
    info.dtypes.push_back(dtype_from_string(group_str(file, g, "dtype", path)));
    const std::string bank = g + "/bank", last = g + "/last_update";
    const RowsLayout layout = check_rows_dataset(file, bank.c_str(), info.n, info.dim, info.dtypes.back(), path);
    if (v == 0) info.compressed = layout.compressed;
    check_row_vector(file, last.c_str(), info.n, H5T_INTEGER, 8, path);
  }
  const std::string extra = view_group(info.views);
  MEMBANK_CHECK(H5Lexists(file, extra.c_str(), H5P_DEFAULT) <= 0, "{}: views = {} but the file holds a group '{}'",
                path, info.views, extra);
  check_sampler_datasets(file, info.sampler, info.sampler_params, info.n, path);
  if (info.has_labels) check_row_vector(file, "labels", info.n, H5T_INTEGER, 8, path);
  MEMBANK_CHECK(info.has_labels || (!needs_labels(c.objective) && !c.exclude_same_label),
                "{}: the configuration ({}{}) needs labels but the file has no dataset 'labels'", path,
                to_string(c.objective), c.exclude_same_label ? ", exclude_same_label" : "");

  // The pairs of the graph, in order, and each one's Z state.
  info.pairs = view_pairs(info.graph, info.views);
  const auto np = static_cast<index_t>(info.pairs.size());
  {
    Handle ds = open_dataset(file, "pairs", path);
    const DatasetShape s = shape_of(ds.get());
    MEMBANK_CHECK(s.rank == 2 && s.dims[0] == static_cast<hsize_t>(np) && s.dims[1] == 2 && s.cls == H5T_INTEGER &&
                      s.elem_size == 8,
                  "{}: dataset 'pairs' is not ({}, 2) int64: expected the {} graph's {} pairs over V = {} views", path,
                  np, to_string(info.graph), np, info.views);
    const index_t cr = chunk_rows_of(ds.get());
    if (cr >= 1) check_storage(ds.get(), np, cr, path, "pairs");
    std::vector<std::int64_t> stored(static_cast<std::size_t>(2 * np));
    read_rows(ds.get(), H5T_NATIVE_INT64, 0, np, 2, stored.data(), path, "pairs");
    for (index_t p = 0; p < np; ++p) {
      const ViewPair& want = info.pairs[static_cast<std::size_t>(p)];
      const std::int64_t q = stored[static_cast<std::size_t>(2 * p)], b = stored[static_cast<std::size_t>(2 * p + 1)];
      MEMBANK_CHECK(q == want.query && b == want.bank, "{}: pairs[{}] = ({}, {}): expected ({}, {}), pair {} of the {} "
                    "graph over V = {} views", path, p, q, b, want.query, want.bank, p, to_string(info.graph),
                    info.views);
    }
  }
  check_row_vector(file, "z_initialised", np, H5T_INTEGER, 8, path);
  check_row_vector(file, "log_z", np, H5T_FLOAT, 8, path);
  const auto init = read_vector<std::int64_t>(file, "z_initialised", 0, np, H5T_NATIVE_INT64, path);
  const auto log_z = read_vector<double>(file, "log_z", 0, np, H5T_NATIVE_DOUBLE, path);
  for (std::size_t p = 0; p < init.size(); ++p) {
    MEMBANK_CHECK(init[p] == 0 || init[p] == 1, "{}: z_initialised[{}] = {}: expected 0 or 1", path, p, init[p]);
    MEMBANK_CHECK(init[p] == 0 || std::isfinite(log_z[p]), "{}: log_z[{}] = {} (pair {} -> {}): expected finite",
                  path, p, log_z[p], info.pairs[p].query, info.pairs[p].bank);
    info.partitions.push_back(Partition{c.z_policy, init[p] != 0, log_z[p]});
  }
  return info;
}

MultiViewSnapshotInfo read_multiview_info(hid_t file, const std::string& path) {
  return naming_file(path, [&] { return read_multiview_info_checked(file, path); });
}

}  // namespace

SnapshotKind read_snapshot_kind(const std::string& path) {
  Handle f = open_file(path);
  return naming_file(path, [&] { return read_header(f.get(), path).kind; });
}

void save_snapshot(const std::string& path, const Queue& queue, const SnapshotOptions& options) {
  quiet_hdf5();
  MEMBANK_CHECK(options.deflate_level >= 0 && options.deflate_level <= 9, "deflate_level = {}: expected 0..9",
                options.deflate_level);
  const Bank& keys = queue.keys();
  const index_t q = keys.size(), dim = keys.dim();
  // the keys and four vectors of Q entries (three of 8 bytes, one of 1)
  check_destination(path, static_cast<double>(snapshot_size_estimate(q, dim, keys.dtype())) + static_cast<double>(q),
                    "snapshot");
  // What load refuses is never written, checked before any file exists.
  check_unit_rows(keys, path);
  check_last_update(keys.last_update(), queue.steps_done(), path, "the queue's keys' last_update");
  write_atomically(
      path,
      [&](hid_t root, const std::string&) {
        write_header(root, SnapshotKind::queue);
        write_attr(root, "capacity", q);
        write_attr(root, "dim", dim);
        write_attr(root, "dtype", to_string(keys.dtype()));
        write_attr(root, "step", queue.steps_done());
        write_attr(root, "position", queue.position());
        write_attr(root, "enqueued", queue.enqueued());
        write_config_attributes(root, queue.config());
        const int deflate = options.deflate_level;
        write_bank_dataset(root, "keys", keys, deflate, path);
        write_vector(root, "last_update", H5T_STD_I64LE, H5T_NATIVE_INT64, keys.last_update().data(), q, deflate, path);
        write_vector(root, "ids", H5T_STD_I64LE, H5T_NATIVE_INT64, queue.ids().data(), q, deflate, path);
        write_vector(root, "labels", H5T_STD_I64LE, H5T_NATIVE_INT64, queue.labels().data(), q, deflate, path);
        write_vector(root, "labelled", H5T_STD_U8LE, H5T_NATIVE_UINT8, queue.labelled().data(), q, deflate, path);
      },
      [](hid_t f, const std::string& tmp) { read_queue_info(f, tmp); });
}

QueueSnapshotInfo read_queue_snapshot_info(const std::string& path) {
  Handle f = open_file(path);
  return read_queue_info(f.get(), path);
}

Queue load_queue_snapshot(const std::string& path) {
  Handle f = open_file(path);
  const QueueSnapshotInfo info = read_queue_info(f.get(), path);
  const index_t q = info.capacity;
  // The small vectors first (each checked), then the keys; the queue is built only from a whole state.
  std::vector<std::int64_t> last = read_vector<std::int64_t>(f.get(), "last_update", 0, q, H5T_NATIVE_INT64, path);
  check_last_update(last, info.step, path, "dataset 'last_update'");
  std::vector<index_t> ids = read_vector<index_t>(f.get(), "ids", 0, q, H5T_NATIVE_INT64, path);
  for (std::size_t j = 0; j < ids.size(); ++j)
    MEMBANK_CHECK(ids[j] >= -1, "{}: ids[{}] = {}: expected an instance id >= 0, or -1 for none", path, j, ids[j]);
  std::vector<std::int64_t> labels = read_vector<std::int64_t>(f.get(), "labels", 0, q, H5T_NATIVE_INT64, path);
  std::vector<std::uint8_t> labelled = read_vector<std::uint8_t>(f.get(), "labelled", 0, q, H5T_NATIVE_UINT8, path);
  for (std::size_t j = 0; j < labelled.size(); ++j)
    MEMBANK_CHECK(labelled[j] <= 1, "{}: labelled[{}] = {}: expected 0 or 1", path, j, labelled[j]);
  Bank keys = read_bank_rows(f.get(), "keys", info.dim, info.dtype, info.rows_per_chunk, path, 0, q);
  keys.set_last_update(std::move(last));
  return naming_file(path, [&] {
    Queue queue(q, info.dim, info.config, info.dtype);
    queue.restore({std::move(keys), std::move(ids), std::move(labels), std::move(labelled), info.position,
                   info.enqueued, info.step});
    return queue;
  });
}

void save_snapshot(const std::string& path, const MultiViewEngine& engine, const SnapshotOptions& options) {
  quiet_hdf5();
  MEMBANK_CHECK(options.deflate_level >= 0 && options.deflate_level <= 9, "deflate_level = {}: expected 0..9",
                options.deflate_level);
  const index_t views = engine.views(), n = engine.bank(0).size(), dim = engine.bank(0).dim();
  double need = 0.0;
  for (index_t v = 0; v < views; ++v)
    need += static_cast<double>(snapshot_size_estimate(n, dim, engine.bank(v).dtype()));
  check_destination(path, need, "snapshot");
  for (index_t v = 0; v < views; ++v) {
    check_unit_rows(engine.bank(v), path);
    check_last_update(engine.bank(v).last_update(), engine.steps_done(), path,
                      fmt::format("view {}'s last_update", v));
  }
  const std::vector<std::int64_t>& labels = engine.labels();
  const std::vector<ViewPair>& pairs = engine.pairs();
  const auto np = static_cast<index_t>(pairs.size());
  std::vector<std::int64_t> pair_views, init;
  std::vector<double> log_z;
  for (std::size_t p = 0; p < pairs.size(); ++p) {
    pair_views.push_back(pairs[p].query);
    pair_views.push_back(pairs[p].bank);
    init.push_back(engine.partition(p).initialised ? 1 : 0);
    log_z.push_back(engine.partition(p).log_z);
  }
  write_atomically(
      path,
      [&](hid_t root, const std::string&) {
        const int deflate = options.deflate_level;
        write_header(root, SnapshotKind::multiview);
        write_attr(root, "views", views);
        write_attr(root, "n", n);
        write_attr(root, "dim", dim);
        write_attr(root, "step", engine.steps_done());
        write_attr(root, "graph", to_string(engine.graph()));
        write_config_attributes(root, engine.config());
        write_attr(root, "sampler", to_string(engine.sampler().kind()));
        for (index_t v = 0; v < views; ++v) {
          const Bank& bank = engine.bank(v);
          const std::string g = view_group(v);
          {
            Handle group(H5Gcreate2(root, g.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
            H5_CHECK(group.get(), "{}: cannot create group '{}'", path, g);
            write_attr(group.get(), "dtype", to_string(bank.dtype()));
          }
          write_bank_dataset(root, (g + "/bank").c_str(), bank, deflate, path);
          write_vector(root, (g + "/last_update").c_str(), H5T_STD_I64LE, H5T_NATIVE_INT64,
                       bank.last_update().data(), n, deflate, path);
        }
        write_sampler(root, engine.sampler(), n, deflate, path);
        if (!labels.empty())
          write_vector(root, "labels", H5T_STD_I64LE, H5T_NATIVE_INT64, labels.data(), n, deflate, path);
        write_small_matrix(root, "pairs", pair_views, np, 2, deflate, path);
        write_vector(root, "z_initialised", H5T_STD_I64LE, H5T_NATIVE_INT64, init.data(), np, deflate, path);
        write_vector(root, "log_z", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, log_z.data(), np, deflate, path);
      },
      [](hid_t f, const std::string& tmp) { read_multiview_info(f, tmp); });
}

MultiViewSnapshotInfo read_multiview_snapshot_info(const std::string& path) {
  Handle f = open_file(path);
  return read_multiview_info(f.get(), path);
}

MultiViewEngine load_multiview_snapshot(const std::string& path) {
  Handle f = open_file(path);
  const MultiViewSnapshotInfo info = read_multiview_info(f.get(), path);
  const index_t n = info.n;
  // Every view's last-update steps (checked), the sampler and the labels, then the banks; the engine
  // is built only once everything has been read.
  std::vector<std::vector<std::int64_t>> last;
  for (index_t v = 0; v < info.views; ++v) {
    const std::string name = view_group(v) + "/last_update";
    last.push_back(read_vector<std::int64_t>(f.get(), name.c_str(), 0, n, H5T_NATIVE_INT64, path));
    check_last_update(last.back(), info.step, path, fmt::format("dataset '{}'", name));
  }
  std::unique_ptr<NoiseSampler> sampler = read_sampler(f.get(), info.sampler, info.sampler_params, n, info.dim, path);
  std::vector<std::int64_t> labels;
  if (info.has_labels) labels = read_vector<std::int64_t>(f.get(), "labels", 0, n, H5T_NATIVE_INT64, path);
  std::vector<Bank> banks;
  for (index_t v = 0; v < info.views; ++v) {
    const std::string name = view_group(v) + "/bank";
    Handle ds = open_dataset(f.get(), name.c_str(), path);
    const index_t block = chunk_rows_of(ds.get());
    banks.push_back(read_bank_rows(f.get(), name.c_str(), info.dim, info.dtypes[static_cast<std::size_t>(v)], block,
                                   path, 0, n));
    banks.back().set_last_update(std::move(last[static_cast<std::size_t>(v)]));
  }
  return naming_file(path, [&] {
    MultiViewEngine engine(std::move(banks), std::move(sampler), info.config, info.graph, std::move(labels));
    engine.restore_state(info.partitions, info.step);
    return engine;
  });
}
}  // namespace membank
