// Snapshots of 2-byte banks (snapshot.hpp, format version 3): fp16 and bf16 banks save and load bit for
// bit with every other field, a resumed engine continues bit for bit under nearest and stochastic
// rounding, the file holds what the format says (an IEEE half dataset; uint16 words named by a dtype
// attribute), export_bank widens exactly or rounds to nearest, import_bank converts, corrupt rows and
// inconsistent type attributes are refused, and files before version 3 load as float32 banks. The
// files are read and damaged here with the HDF5 C API, and the element conversions checked against
// a double-precision nearest search over the type's words, not the engine's code.
#include "snapshot_inputs.hpp"
#include "fixtures/snapshot_fixtures.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>
#include <membank/threads.hpp>

#include "engine_state.hpp"
#include "hdf5_edit.hpp"
#include "scratch.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <hdf5.h>
#include <omp.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace mbtest;
using membank::Bank;
using membank::DType;
using membank::Engine;
using membank::EngineConfig;
using membank::Error;
using membank::Rounding;
using membank::StepStats;
namespace fs = std::filesystem;

namespace {

constexpr DType kTwoByte[] = {DType::float16, DType::bfloat16};

bool same_bits(double a, double b) { return bits_equal(a, b); }

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

// ---- independent element references ---------------------------------------------------------

std::uint16_t word(const void* row, index_t c) {
  std::uint16_t w;
  std::memcpy(&w, static_cast<const unsigned char*>(row) + 2 * c, 2);
  return w;
}

/// The value of a stored 16-bit element, from the definitions of the formats.
double value_of(DType t, std::uint16_t w) {
  if (t == DType::bfloat16) {
    const std::uint32_t u = static_cast<std::uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  const int sign = w >> 15 ? -1 : 1, exp = (w >> 10) & 31, mant = w & 1023;
  if (exp == 31)
    return mant ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * (exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25));
}

/// x rounded to nearest (ties to even) in type t, as its 16 bits.
std::uint16_t nearest_word(DType t, float x) {
  if (t == DType::float16) {
    // The largest non-negative word whose value is <= |x| (word order is value order), then the
    // nearer of it and the next word, ties to the even one; 65520 and beyond round to infinity.
    const double a = std::abs(static_cast<double>(x));
    std::uint16_t w = 0x7C00;
    if (a < 65520.0) {
      std::uint16_t lo = 0, hi = 0x7BFF;
      while (lo < hi) {
        const auto mid = static_cast<std::uint16_t>((lo + hi + 1) / 2);
        if (value_of(t, mid) <= a) lo = mid; else hi = static_cast<std::uint16_t>(mid - 1);
      }
      const double dlo = a - value_of(t, lo), dhi = value_of(t, static_cast<std::uint16_t>(lo + 1)) - a;
      w = dlo < dhi || (dlo == dhi && lo % 2 == 0) ? lo : static_cast<std::uint16_t>(lo + 1);
    }
    return std::signbit(x) ? static_cast<std::uint16_t>(w | 0x8000) : w;
  }
  // bf16: the two neighbours of x are its upper half (truncation) and the next word away from zero.
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  const auto lo = static_cast<std::uint16_t>(u >> 16), hi = static_cast<std::uint16_t>(lo + 1);
  const double dlo = std::abs(x - value_of(t, lo)), dhi = std::abs(value_of(t, hi) - x);
  return dlo < dhi || (dlo == dhi && lo % 2 == 0) ? lo : hi;
}

/// Row i of the bank, element by element as the reference widens it.
std::vector<double> row_values(const Bank& bank, index_t i) {
  const membank::BankView v = bank.view();
  std::vector<double> out(static_cast<std::size_t>(v.dim));
  for (index_t c = 0; c < v.dim; ++c)
    out[static_cast<std::size_t>(c)] =
        v.dtype == DType::float32 ? v.row(i)[c] : value_of(v.dtype, word(v.row_data(i), c));
  return out;
}

double norm_of(const std::vector<double>& r) {
  double sq = 0.0;
  for (const double x : r) sq += x * x;
  return std::sqrt(sq);
}

/// The stored bytes of both banks (D elements a row, not the padding) are equal.
bool same_rows(const Bank& a, const Bank& b) {
  if (a.dtype() != b.dtype() || a.size() != b.size() || a.dim() != b.dim()) return false;
  const auto bytes = static_cast<std::size_t>(a.dim() * membank::dtype_bytes(a.dtype()));
  for (index_t i = 0; i < a.size(); ++i)
    if (std::memcmp(a.view().row_data(i), b.view().row_data(i), bytes) != 0) return false;
  return true;
}

/// The tolerance a snapshot applies to a row of type t (snapshot.hpp).
double snapshot_tolerance(DType t) { return std::max(1e-4, membank::row_norm_tolerance(t)); }

// ---- engines ----------------------------------------------------------------------------------

struct Trace {
  std::vector<StepStats> stats;
  std::vector<RowMatrixf> grads;
};

/// `steps` steps fed batch_for_step(input_seed, step): their stats and gradients.
Trace run_steps(Engine& e, int steps, std::uint64_t input_seed, index_t batch) {
  Trace t;
  for (int s = 0; s < steps; ++s) {
    const StepBatch b = batch_for_step(input_seed, e.steps_done(), batch, e.bank().size(), e.bank().dim());
    RowMatrixf g(batch, e.bank().dim());
    t.stats.push_back(e.step(b.features, b.ids, g));
    t.grads.push_back(g);
  }
  return t;
}

bool same_stats(const StepStats& a, const StepStats& b) {
  return same_bits(a.loss, b.loss) && same_bits(a.z, b.z) && same_bits(a.z_estimate, b.z_estimate) &&
         same_bits(a.mean_p_positive, b.mean_p_positive) && a.step == b.step;
}

// ---- HDF5, independently of the engine's reader ---------------------------------------------------

struct H5 {
  hid_t id;
  H5(const std::string& path, unsigned flags) : id(H5Fopen(path.c_str(), flags, H5P_DEFAULT)) { REQUIRE(id >= 0); }
  ~H5() { H5Fclose(id); }
};

std::string attr_string(hid_t obj, const char* name) {
  if (H5Aexists(obj, name) <= 0) return "<missing>";
  const hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  char* p = nullptr;
  REQUIRE(H5Aread(a, t, &p) >= 0);
  std::string s = p ? p : "";
  H5free_memory(p);
  H5Tclose(t);
  H5Aclose(a);
  return s;
}

void set_string(hid_t obj, const char* name, const char* v) {
  if (H5Aexists(obj, name) > 0) REQUIRE(H5Adelete(obj, name) >= 0);
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  const hid_t sp = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(a >= 0);
  REQUIRE(H5Awrite(a, t, &v) >= 0);
  H5Aclose(a);
  H5Sclose(sp);
  H5Tclose(t);
}

/// Rows [r0, r0 + rows) of the (N, D) dataset `name` as 16-bit words in the dataset's own type (no
/// conversion: the stored bits), or, with `memtype`, converted by HDF5.
template <class T>
std::vector<T> read_block(hid_t f, const char* name, hsize_t r0, hsize_t rows, hsize_t dim, hid_t memtype = -1) {
  const hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  REQUIRE(d >= 0);
  const hid_t own = H5Dget_type(d);
  const hid_t fs_ = H5Dget_space(d);
  const hsize_t start[2] = {r0, 0}, count[2] = {rows, dim};
  H5Sselect_hyperslab(fs_, H5S_SELECT_SET, start, nullptr, count, nullptr);
  const hid_t ms = H5Screate_simple(2, count, nullptr);
  std::vector<T> out(static_cast<std::size_t>(rows * dim));
  REQUIRE(H5Dread(d, memtype >= 0 ? memtype : own, ms, fs_, H5P_DEFAULT, out.data()) >= 0);
  H5Sclose(ms);
  H5Sclose(fs_);
  H5Tclose(own);
  H5Dclose(d);
  return out;
}

/// Overwrite row `row` of the 2-D dataset `name` with 16-bit words in the dataset's own type (HDF5
/// recomputes the chunk's checksum: only the values are wrong).
void write_words(hid_t f, const char* name, hsize_t row, const std::vector<std::uint16_t>& w) {
  write_dataset_row(f, name, row, w.size(), 0, w.data());
}

/// The test's own IEEE half type (as h5py builds it).
hid_t make_half() {
  const hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_size(t, 2);
  H5Tset_ebias(t, 15);
  return t;
}

/// Write a contiguous (n, d) dataset of `type` from `data` (in that type), with an optional dtype attribute.
void write_plain(const std::string& path, const char* name, hid_t type, hsize_t n, hsize_t d, const void* data,
                 const char* dtype_attr = nullptr) {
  const hid_t f = fs::exists(path) ? H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)
                                   : H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(f >= 0);
  const hsize_t dims[2] = {n, d};
  const hid_t sp = H5Screate_simple(2, dims, nullptr);
  const hid_t ds = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(ds >= 0);
  REQUIRE(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
  if (dtype_attr) set_string(ds, "dtype", dtype_attr);
  H5Dclose(ds);
  H5Sclose(sp);
  H5Fclose(f);
}

/// Rows of four +-0.5 entries, the rest zeros: exactly unit, exactly representable in every type.
std::vector<float> half_unit_rows(index_t n, index_t d, std::mt19937_64& rng) {
  std::vector<float> v(static_cast<std::size_t>(n * d), 0.0f);
  for (index_t i = 0; i < n; ++i)
    for (const index_t c : random_ids(4, d, rng)) v[static_cast<std::size_t>(i * d + c)] = rng() % 2 ? 0.5f : -0.5f;
  // random_ids may repeat a column: make every row hold exactly four entries
  for (index_t i = 0; i < n; ++i) {
    int count = 0;
    for (index_t c = 0; c < d; ++c) count += v[static_cast<std::size_t>(i * d + c)] != 0.0f;
    for (index_t c = 0; c < d && count < 4; ++c)
      if (v[static_cast<std::size_t>(i * d + c)] == 0.0f) {
        v[static_cast<std::size_t>(i * d + c)] = 0.5f;
        ++count;
      }
  }
  return v;
}

}  // namespace

// =================================================================================================

TEST_CASE("snapshot dtype: fp16 and bf16 banks round-trip bit for bit with every field") {
  // Guards save/load of 2-byte banks: the rows' stored bytes (several chunks, a partial edge chunk,
  // padded rows; the direct chunk path and the deflate path), last_update, step, Z, every
  // EngineConfig field (rounding and the objectives' parameters included), the alias weights and the
  // labels come back exactly; read_snapshot_info reports the type and rounding; chunks hold whole
  // rows of about 1 MiB of 2-byte elements; verify_snapshot passes.
  ScratchDir tmp("snapdtype", "roundtrip");
  struct Case {
    bool alias;
    int deflate;
    bool labels;
    EngineConfig cfg;
  };
  std::vector<Case> cases;
  {
    EngineConfig c;
    c.k = 23;
    c.tau = 0.13;
    c.momentum = 0.37;
    c.z_policy = membank::ZPolicy::ema;
    c.z_ema = 0.8;
    c.seed = 0xFFFFFFFFFFFFFFFBULL;
    c.rounding = Rounding::nearest;
    cases.push_back({false, 0, true, c});
    c.objective = Objective::hcl;
    c.tau_plus = 0.05;
    c.beta = 0.7;
    c.detach_weights = true;
    c.exclude_same_label = true;
    c.rounding = Rounding::stochastic;
    c.normalize_features = true;
    cases.push_back({true, 4, true, c});
    c = EngineConfig{};
    c.k = 17;
    c.objective = Objective::info_nce;
    c.negatives = NegativesMode::shared;
    c.rounding = Rounding::stochastic;
    c.momentum = 0.9;
    cases.push_back({true, 0, false, c});
    c = EngineConfig{};
    c.k = 9;
    c.objective = Objective::triplet;
    c.margin = 0.3;
    c.kernel_t = 3.5;
    c.gamma = 4.0;
    cases.push_back({false, 4, true, c});
  }
  const index_t n = 5000, d = 250;  // 2097 rows of 2-byte elements a chunk: 3 chunks, the last partial
  for (const DType t : kTwoByte) {
    for (std::size_t ci = 0; ci < cases.size(); ++ci) {
      const Case& cs = cases[ci];
      CAPTURE(membank::to_string(t));
      CAPTURE(ci);
      Engine a = make_engine(n, d, cs.alias, cs.cfg, 300 + ci, nullptr, t);
      REQUIRE(a.bank().dtype() == t);
      std::vector<std::int64_t> labels;
      if (cs.labels) {
        for (index_t i = 0; i < n; ++i) labels.push_back(i % 11 - 5);
        a.set_labels(labels);
      }
      run_steps(a, 3, 700 + ci, 16);
      const std::string p = tmp / fmt::format("rt-{}-{}.h5", membank::to_string(t), ci);
      membank::SnapshotOptions opt;
      opt.deflate_level = cs.deflate;
      membank::save_snapshot(p, a, opt);

      std::vector<std::int64_t> got_labels = {42};
      const Engine b = membank::load_snapshot(p, &got_labels);
      CHECK(b.bank().dtype() == t);
      CHECK(same_rows(a.bank(), b.bank()));
      CHECK(b.bank().last_update() == a.bank().last_update());
      CHECK(std::count(b.bank().last_update().begin(), b.bank().last_update().end(), 2) > 0);
      CHECK(b.steps_done() == 3);
      CHECK(b.partition().initialised == a.partition().initialised);
      CHECK(same_bits(b.partition().log_z, a.partition().log_z));
      check_same_config(b.config(), cs.cfg);
      CHECK(b.sampler().kind() == a.sampler().kind());
      if (cs.alias) {
        const auto& wa = dynamic_cast<const membank::AliasSampler&>(a.sampler()).weights();
        const auto& wb = dynamic_cast<const membank::AliasSampler&>(b.sampler()).weights();
        CHECK((wa.size() == wb.size() && std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(double)) == 0));
      }
      CHECK(got_labels == (cs.labels ? labels : std::vector<std::int64_t>{42}));
      CHECK(b.labels() == labels);

      const membank::SnapshotInfo info = membank::read_snapshot_info(p);
      CHECK(info.format_version == 3);
      CHECK(info.dtype == t);
      CHECK(info.config.rounding == cs.cfg.rounding);
      CHECK(info.compressed == (cs.deflate > 0));
      // whole rows, as many as fit in 1 MiB of 2-byte elements
      CHECK(info.rows_per_chunk * d * 2 <= (index_t{1} << 20));
      CHECK((info.rows_per_chunk + 1) * d * 2 > (index_t{1} << 20));
      CHECK(membank::verify_snapshot(p).empty());
    }
  }
}

TEST_CASE("snapshot dtype: a resumed fp16/bf16 engine continues bit for bit, nearest and stochastic rounding") {
  // Guards resume of 2-byte banks: A runs S steps (2 threads), is saved and loaded as B, which runs S
  // more on 1 thread; C runs 2S uninterrupted on 2 threads with the same inputs. B's last S losses
  // (and Z, Zhat, P(pos)), gradients, bank bytes, last_update, step and Z equal C's bit for bit. The
  // rounding is part of what is restored: the nearest and stochastic runs of a type end with
  // different banks, so each resume really continues its own mode (m = 0.95: small refreshes that
  // the two modes round differently).
  ScratchDir tmp("snapdtype", "resume");
  const int S = 5;
  const index_t n = 3000, d = 32, batch = 16;
  const int threads_before = omp_get_max_threads();
  for (const DType t : kTwoByte) {
    std::vector<RowMatrixf> final_banks;
    for (const Rounding r : {Rounding::nearest, Rounding::stochastic}) {
      CAPTURE(membank::to_string(t));
      CAPTURE(membank::to_string(r));
      EngineConfig cfg;
      cfg.k = 64;
      cfg.z_policy = membank::ZPolicy::ema;
      cfg.z_ema = 0.7;
      cfg.momentum = 0.95;
      cfg.seed = 41;
      cfg.rounding = r;
      membank::set_num_threads(2);
      Engine c = make_engine(n, d, true, cfg, 8, nullptr, t);
      const Trace whole = run_steps(c, 2 * S, 77, batch);
      Engine a = make_engine(n, d, true, cfg, 8, nullptr, t);
      run_steps(a, S, 77, batch);
      const std::string p = tmp / "resume.h5";
      membank::save_snapshot(p, a);
      membank::set_num_threads(1);
      Engine b = membank::load_snapshot(p);
      CHECK(b.config().rounding == r);
      const Trace tail = run_steps(b, S, 77, batch);
      membank::set_num_threads(threads_before);
      for (int s = 0; s < S; ++s) {
        CAPTURE(s);
        CHECK(same_stats(tail.stats[static_cast<std::size_t>(s)], whole.stats[static_cast<std::size_t>(S + s)]));
        CHECK(bits_equal(tail.grads[static_cast<std::size_t>(s)], whole.grads[static_cast<std::size_t>(S + s)]));
      }
      CHECK(same_rows(b.bank(), c.bank()));
      CHECK(b.bank().last_update() == c.bank().last_update());
      CHECK(b.steps_done() == c.steps_done());
      CHECK(same_bits(b.partition().log_z, c.partition().log_z));
      // The saved engine itself is unaffected by saving.
      const Trace a_tail = run_steps(a, S, 77, batch);
      CHECK(same_stats(a_tail.stats.back(), whole.stats.back()));
      CHECK(same_rows(a.bank(), c.bank()));
      final_banks.push_back(c.bank().to_matrix());
    }
    CHECK_FALSE(bits_equal(final_banks[0], final_banks[1]));
  }
}

TEST_CASE("snapshot dtype: the bank dataset is IEEE float16, or uint16 words named bfloat16") {
  // Guards the file format of 2-byte banks as another HDF5 reader sees it: the root attributes dtype
  // and rounding; for fp16 an HDF5 float type of 2 bytes laid out as IEEE binary16, whose values HDF5's
  // own conversion to double gives as the format defines them; for bf16 16-bit unsigned integers
  // equal to the bank's words, with the attribute dtype = "bfloat16"; fletcher32 on the chunks (a
  // flipped stored byte is caught), deflate or not.
  ScratchDir tmp("snapdtype", "layout");
  const index_t n = 9000, d = 100;  // 5242 rows a chunk: 2 chunks
  for (const DType t : kTwoByte) {
    for (const int deflate : {0, 4}) {
      CAPTURE(membank::to_string(t));
      CAPTURE(deflate);
      EngineConfig cfg;
      cfg.k = 16;
      cfg.rounding = Rounding::stochastic;
      Engine e = make_engine(n, d, false, cfg, 5, nullptr, t);
      run_steps(e, 2, 9, 64);
      const std::string p = tmp / fmt::format("{}-{}.h5", membank::to_string(t), deflate);
      membank::SnapshotOptions opt;
      opt.deflate_level = deflate;
      membank::save_snapshot(p, e, opt);
      {
        H5 f(p, H5F_ACC_RDONLY);
        CHECK(attr_string(f.id, "dtype") == membank::to_string(t));
        CHECK(attr_string(f.id, "rounding") == "stochastic");
        const hid_t ds = H5Dopen2(f.id, "bank", H5P_DEFAULT);
        REQUIRE(ds >= 0);
        CHECK(attr_string(ds, "dtype") == membank::to_string(t));
        const hid_t type = H5Dget_type(ds);
        CHECK(H5Tget_size(type) == 2);
        const hid_t dcpl = H5Dget_create_plist(ds);
        bool fletcher = false;
        for (int i = 0; i < H5Pget_nfilters(dcpl); ++i) {
          unsigned flags = 0;
          std::size_t ne = 0;
          fletcher |= H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &ne, nullptr, 0, nullptr, nullptr) ==
                      H5Z_FILTER_FLETCHER32;
        }
        CHECK(fletcher);
        H5Pclose(dcpl);
        if (t == DType::float16) {
          CHECK(H5Tget_class(type) == H5T_FLOAT);
          std::size_t sp = 0, ep = 0, es = 0, mp = 0, ms = 0;
          H5Tget_fields(type, &sp, &ep, &es, &mp, &ms);
          CHECK((sp == 15 && ep == 10 && es == 5 && mp == 0 && ms == 10));
          CHECK(H5Tget_ebias(type) == 15);
          CHECK(H5Tget_precision(type) == 16);
          CHECK(H5Tget_order(type) == H5T_ORDER_LE);
        } else {
          CHECK(H5Tget_class(type) == H5T_INTEGER);
          CHECK(H5Tget_sign(type) == H5T_SGN_NONE);
          CHECK(H5Tget_order(type) == H5T_ORDER_LE);
        }
        H5Tclose(type);
        H5Dclose(ds);
        // Every stored element, as HDF5 reads it (checksums verified), against the bank's words.
        // bf16: the words as integers; fp16: HDF5's own conversion of the half values to double.
        const bool bf16 = t == DType::bfloat16;
        const auto words =
            bf16 ? read_block<std::uint16_t>(f.id, "bank", 0, n, d, H5T_NATIVE_UINT16) : std::vector<std::uint16_t>{};
        const auto values = bf16 ? std::vector<double>{} : read_block<double>(f.id, "bank", 0, n, d, H5T_NATIVE_DOUBLE);
        bool equal = true;
        for (index_t i = 0; i < n; ++i)
          for (index_t c = 0; c < d; ++c) {
            const std::uint16_t w = word(e.bank().view().row_data(i), c);
            const auto at = static_cast<std::size_t>(i * d + c);
            equal &= bf16 ? words[at] == w : values[at] == value_of(t, w);
          }
        CHECK(equal);
      }
      // A byte flipped inside the second stored chunk: the checksum catches it.
      {
        const std::string q = tmp / "flipped.h5";
        fs::copy_file(p, q, fs::copy_options::overwrite_existing);
        haddr_t addr = 0;
        hsize_t size = 0;
        {
          H5 f(q, H5F_ACC_RDONLY);
          const hid_t ds = H5Dopen2(f.id, "bank", H5P_DEFAULT);
          const hid_t sp = H5Dget_space(ds);
          hsize_t offset[2] = {0, 0};
          unsigned mask = 0;
          REQUIRE(H5Dget_chunk_info(ds, sp, 1, offset, &mask, &addr, &size) >= 0);
          H5Sclose(sp);
          H5Dclose(ds);
        }
        std::fstream io(q, std::ios::in | std::ios::out | std::ios::binary);
        io.seekg(static_cast<std::streamoff>(addr + size / 2));
        char ch = 0;
        io.get(ch);
        io.seekp(static_cast<std::streamoff>(addr + size / 2));
        io.put(static_cast<char>(ch ^ 0x5a));
        io.close();
        const std::string msg = error_of([&] { (void)membank::load_snapshot(q); });
        CAPTURE(msg);
        CHECK(mentions(msg, "checksum"));
        CHECK(msg.find(q) != std::string::npos);
        CHECK_FALSE(membank::verify_snapshot(q).empty());
      }
    }
  }
}

TEST_CASE("snapshot dtype: export_bank widens exactly or rounds to nearest, and import_bank converts") {
  // Guards the conversions between types: export to float32 holds each stored element's exact value;
  // export to a 2-byte type holds each element rounded to nearest (the bank's own bits when the type
  // is its own); a dataset path gets its groups. import_bank reads float16 datasets and bfloat16
  // words (with their attribute) exactly, renormalises rows that are not unit in fp32 (counted), and
  // stores each element rounded to nearest in the bank's type: unit rows exactly so, the others
  // within the type's rounding of the normalised row.
  ScratchDir tmp("snapdtype", "convert");
  const index_t n = 3000, d = 40;
  std::vector<Bank> banks;
  for (const DType t : {DType::float32, DType::float16, DType::bfloat16}) {
    EngineConfig cfg;
    cfg.k = 16;
    Engine e = make_engine(n, d, false, cfg, 6, nullptr, t);
    run_steps(e, 3, 4, 64);
    banks.push_back(Bank::from_rows(e.bank().to_matrix(), t));  // the bank after some refreshes
  }
  for (const Bank& bank : banks) {
    for (const DType to : {DType::float32, DType::float16, DType::bfloat16}) {
      CAPTURE(membank::to_string(bank.dtype()));
      CAPTURE(membank::to_string(to));
      const std::string p =
          tmp / fmt::format("export-{}-{}.h5", membank::to_string(bank.dtype()), membank::to_string(to));
      membank::export_bank(p, bank, to, "features/train");
      H5 f(p, H5F_ACC_RDONLY);
      const hid_t ds = H5Dopen2(f.id, "features/train", H5P_DEFAULT);
      REQUIRE(ds >= 0);
      CHECK(attr_string(ds, "dtype") == membank::to_string(to));
      H5Dclose(ds);
      bool exact = true;
      if (to == DType::float32) {
        const auto got = read_block<float>(f.id, "features/train", 0, n, d, H5T_NATIVE_FLOAT);
        for (index_t i = 0; i < n; ++i) {
          const std::vector<double> want = row_values(bank, i);
          for (index_t c = 0; c < d; ++c)
            exact &= got[static_cast<std::size_t>(i * d + c)] == want[static_cast<std::size_t>(c)];
        }
      } else {
        const auto got = read_block<std::uint16_t>(f.id, "features/train", 0, n, d);  // the stored bits
        for (index_t i = 0; i < n; ++i) {
          const std::vector<double> v = row_values(bank, i);
          for (index_t c = 0; c < d; ++c) {
            const std::uint16_t want = bank.dtype() == to
                                           ? word(bank.view().row_data(i), c)
                                           : nearest_word(to, static_cast<float>(v[static_cast<std::size_t>(c)]));
            exact &= got[static_cast<std::size_t>(i * d + c)] == want;
          }
        }
      }
      CHECK(exact);
    }
  }

  // import_bank: a float64 dataset, not unit, the first rows unit in fp32; into every type.
  std::mt19937_64 rng(23);
  RowMatrixd x = gaussian(n, d, rng, 3.0).cast<double>();
  const index_t unit_first = 100;
  for (index_t i = 0; i < unit_first; ++i) {
    const RowMatrixf r = (x.row(i) / x.row(i).norm()).cast<float>();
    x.row(i) = r.cast<double>();
  }
  const std::string plain = tmp / "plain.h5";
  write_plain(plain, "x", H5T_IEEE_F64LE, n, d, x.data());
  index_t expect_renorm = 0;
  for (index_t i = 0; i < n; ++i) expect_renorm += std::abs(x.row(i).norm() - 1.0) > 1e-5;
  REQUIRE(expect_renorm == n - unit_first);
  for (const DType t : kTwoByte) {
    CAPTURE(membank::to_string(t));
    index_t renorm = -1;
    const Bank bank = membank::import_bank(plain, "x", &renorm, t);
    REQUIRE(bank.dtype() == t);
    CHECK(renorm == expect_renorm);
    bool unit_exact = true, others_close = true;
    const double u = membank::unit_roundoff(t);
    for (index_t i = 0; i < n; ++i) {
      const double norm = x.row(i).norm();
      for (index_t c = 0; c < d; ++c) {
        const std::uint16_t w = word(bank.view().row_data(i), c);
        if (i < unit_first) {
          unit_exact &= w == nearest_word(t, static_cast<float>(x(i, c)));
        } else {
          const double want = x(i, c) / norm;  // rounded once to fp32, once to the type
          others_close &= std::abs(value_of(t, w) - want) <= (u + 0x1p-23) * std::abs(want) + 0x1p-25;
        }
      }
    }
    CHECK(unit_exact);
    CHECK(others_close);
  }

  // float16 datasets and bfloat16 words are read exactly: exactly unit rows are kept bit for bit.
  const std::vector<float> rows = half_unit_rows(500, 24, rng);
  std::vector<std::uint16_t> f16(rows.size()), b16(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    f16[i] = nearest_word(DType::float16, rows[i]);
    b16[i] = nearest_word(DType::bfloat16, rows[i]);
  }
  const std::string q = tmp / "two-byte.h5";
  const hid_t half = make_half();
  write_plain(q, "f16", half, 500, 24, f16.data());
  H5Tclose(half);
  write_plain(q, "b16", H5T_STD_U16LE, 500, 24, b16.data(), "bfloat16");
  write_plain(q, "u16", H5T_STD_U16LE, 500, 24, b16.data());
  for (const char* name : {"f16", "b16"}) {
    for (const DType t : {DType::float32, DType::float16, DType::bfloat16}) {
      CAPTURE(std::string(name));
      CAPTURE(membank::to_string(t));
      index_t renorm = -1;
      const Bank bank = membank::import_bank(q, name, &renorm, t);
      CHECK(renorm == 0);
      bool equal = true;
      for (index_t i = 0; i < 500; ++i) {
        const std::vector<double> got = row_values(bank, i);
        for (index_t c = 0; c < 24; ++c)
          equal &= got[static_cast<std::size_t>(c)] == rows[static_cast<std::size_t>(i * 24 + c)];
      }
      CHECK(equal);
    }
  }
  // 16-bit words without the attribute are integers: refused, naming what is expected.
  const std::string msg = error_of([&] { (void)membank::import_bank(q, "u16"); });
  CAPTURE(msg);
  CHECK(msg.find(q) != std::string::npos);
  CHECK(mentions(msg, "u16"));
  CHECK(mentions(msg, "bfloat16"));
}

TEST_CASE("snapshot dtype: corrupt 2-byte rows and inconsistent type attributes are refused") {
  // Guards validation of 2-byte banks: a stored row whose norm is off by more than the type's
  // tolerance, a NaN or a zero row makes load_snapshot throw an Error naming the file, the row or the
  // problem, and verify_snapshot report it; a row within the tolerance loads. A bank corrupted in
  // memory is refused before any file is written. A bfloat16 bank without its dataset attribute, a
  // dtype attribute that disagrees with the stored type, or an unknown dtype or rounding is refused.
  ScratchDir tmp("snapdtype", "corrupt");
  const index_t n = 3000, d = 16;
  for (const DType t : kTwoByte) {
    CAPTURE(membank::to_string(t));
    Engine e = make_engine(n, d, false, EngineConfig{}, 2, nullptr, t);
    run_steps(e, 2, 3, 32);
    const std::string good = tmp / "good.h5";
    membank::save_snapshot(good, e);
    REQUIRE(membank::verify_snapshot(good).empty());
    const double tol = snapshot_tolerance(t);

    const auto edited = [&](const std::string& name, const std::function<void(hid_t)>& edit) {
      const std::string p = tmp / name;
      fs::copy_file(good, p, fs::copy_options::overwrite_existing);
      H5 f(p, H5F_ACC_RDWR);
      edit(f.id);
      return p;
    };
    const auto refused = [&](const std::string& p, const std::vector<std::string>& keywords) {
      const std::string msg = error_of([&] { (void)membank::load_snapshot(p); });
      CAPTURE(msg);
      REQUIRE_FALSE(msg.empty());
      CHECK(msg.find(p) != std::string::npos);
      for (const auto& k : keywords) {
        CAPTURE(k);
        CHECK(mentions(msg, k));
      }
      CHECK_FALSE(membank::verify_snapshot(p).empty());
    };
    // Row 17 scaled: by (1 + 3 tol) it is refused; by (1 + tol / 3) it loads. The norm of what is
    // stored is measured here, after the rounding of the scaled elements.
    const std::vector<double> row17 = row_values(e.bank(), 17);
    for (const double scale : {1.0 + 3.0 * tol, 1.0 + tol / 3.0}) {
      CAPTURE(scale);
      std::vector<std::uint16_t> w(static_cast<std::size_t>(d));
      std::vector<double> stored(static_cast<std::size_t>(d));
      for (index_t c = 0; c < d; ++c) {
        w[static_cast<std::size_t>(c)] =
            nearest_word(t, static_cast<float>(row17[static_cast<std::size_t>(c)] * scale));
        stored[static_cast<std::size_t>(c)] = value_of(t, w[static_cast<std::size_t>(c)]);
      }
      const double dev = std::abs(norm_of(stored) - 1.0);
      const std::string p = edited("scaled.h5", [&](hid_t f) { write_words(f, "bank", 17, w); });
      if (scale > 1.0 + tol) {
        REQUIRE(dev > tol);
        refused(p, {"unit", membank::to_string(t)});
      } else {
        REQUIRE(dev < tol);
        const Engine loaded = membank::load_snapshot(p);
        CHECK(row_values(loaded.bank(), 17) == stored);
      }
    }
    std::vector<std::uint16_t> nan_row(static_cast<std::size_t>(d), 0);
    nan_row[3] = t == DType::float16 ? 0x7E00 : 0x7FC0;
    refused(edited("nan.h5", [&](hid_t f) { write_words(f, "bank", 99, nan_row); }), {"row 99", "nan"});
    refused(edited("zero.h5", [&](hid_t f) { write_words(f, "bank", 98, std::vector<std::uint16_t>(d, 0)); }),
            {"row 98", "zeros"});

    // The type attributes.
    refused(edited("other-dtype.h5",
                   [&](hid_t f) { set_string(f, "dtype", t == DType::float16 ? "bfloat16" : "float16"); }),
            {"bank", t == DType::float16 ? "bfloat16" : "float16"});
    refused(edited("fp32-claimed.h5", [&](hid_t f) { set_string(f, "dtype", "float32"); }), {"bank", "float32"});
    refused(edited("unknown-dtype.h5", [&](hid_t f) { set_string(f, "dtype", "float8"); }), {"dtype", "float8"});
    refused(edited("no-dtype.h5", [&](hid_t f) { REQUIRE(H5Adelete(f, "dtype") >= 0); }), {"dtype", "missing"});
    refused(edited("bad-rounding.h5", [&](hid_t f) { set_string(f, "rounding", "sideways"); }),
            {"rounding", "sideways"});
    refused(edited("dataset-attr-disagrees.h5",
                   [&](hid_t f) {
                     const hid_t ds = H5Dopen2(f, "bank", H5P_DEFAULT);
                     set_string(ds, "dtype", "float32");
                     H5Dclose(ds);
                   }),
            {"bank", "dtype", "float32"});
    if (t == DType::bfloat16)
      refused(edited("bf16-unnamed.h5",
                     [&](hid_t f) {
                       const hid_t ds = H5Dopen2(f, "bank", H5P_DEFAULT);
                       REQUIRE(H5Adelete(ds, "dtype") >= 0);
                       H5Dclose(ds);
                     }),
              {"bank", "bfloat16"});

    // Corrupted in memory: refused before any file exists; the snapshot in place keeps its bytes.
    const std::string before = file_bytes(good);
    auto* raw = static_cast<std::uint16_t*>(const_cast<void*>(e.bank().view().row_data(1234)));
    const std::vector<std::uint16_t> saved(raw, raw + d);
    for (index_t c = 0; c < d; ++c)
      raw[c] = nearest_word(t, static_cast<float>(2.0 * value_of(t, saved[static_cast<std::size_t>(c)])));
    for (const std::string& dest : {good, tmp / "new.h5"}) {
      const std::string msg = error_of([&] { membank::save_snapshot(dest, e); });
      CAPTURE(msg);
      CHECK(msg.find("row 1234") != std::string::npos);
      CHECK(msg.find(dest) != std::string::npos);
    }
    CHECK_FALSE(fs::exists(tmp / "new.h5"));
    CHECK(file_bytes(good) == before);
    std::copy(saved.begin(), saved.end(), raw);
  }
}

TEST_CASE("snapshot dtype: files before format version 3 load as float32 banks with nearest rounding") {
  // Guards backward compatibility: the version-1 fixtures report float32 and nearest; a version-2
  // file (a float32 snapshot without the version-3 attributes) loads with the same rows; a 2-byte
  // bank in a file that claims version 2 is refused (a version-2 bank is float32).
  for (const auto& fx : mbfixture::snapshot_v1_fixtures()) {
    const std::string path = (fs::path(MEMBANK_TEST_FIXTURES) / fx.file).string();
    CAPTURE(path);
    const membank::SnapshotInfo info = membank::read_snapshot_info(path);
    CHECK(info.dtype == DType::float32);
    CHECK(info.config.rounding == Rounding::nearest);
    const Engine e = membank::load_snapshot(path);
    CHECK(e.bank().dtype() == DType::float32);
    CHECK(e.config().rounding == Rounding::nearest);
  }
  ScratchDir tmp("snapdtype", "v2");
  for (const DType t : {DType::float32, DType::float16}) {
    CAPTURE(membank::to_string(t));
    Engine e = make_engine(2000, 8, true, EngineConfig{}, 4, nullptr, t);
    run_steps(e, 2, 5, 16);
    const std::string p = tmp / "v2.h5";
    membank::save_snapshot(p, e);
    {
      H5 f(p, H5F_ACC_RDWR);
      const std::int64_t v2 = 2;
      REQUIRE(H5Adelete(f.id, "format_version") >= 0);
      const hid_t sp = H5Screate(H5S_SCALAR);
      const hid_t a = H5Acreate2(f.id, "format_version", H5T_NATIVE_INT64, sp, H5P_DEFAULT, H5P_DEFAULT);
      REQUIRE(H5Awrite(a, H5T_NATIVE_INT64, &v2) >= 0);
      H5Aclose(a);
      H5Sclose(sp);
      REQUIRE(H5Adelete(f.id, "dtype") >= 0);
      REQUIRE(H5Adelete(f.id, "rounding") >= 0);
      const hid_t ds = H5Dopen2(f.id, "bank", H5P_DEFAULT);
      REQUIRE(H5Adelete(ds, "dtype") >= 0);
      H5Dclose(ds);
    }
    if (t == DType::float32) {
      const membank::SnapshotInfo info = membank::read_snapshot_info(p);
      CHECK(info.format_version == 2);
      CHECK(info.dtype == DType::float32);
      const Engine b = membank::load_snapshot(p);
      CHECK(same_rows(b.bank(), e.bank()));
      CHECK(b.config().rounding == Rounding::nearest);
    } else {
      const std::string msg = error_of([&] { (void)membank::load_snapshot(p); });
      CAPTURE(msg);
      CHECK(mentions(msg, "float16"));
      CHECK(mentions(msg, "expected float32"));
    }
  }
}

#ifdef MEMBANK_CLI
TEST_CASE("snapshot dtype: membank snapshot verify, inspect, export and import --dtype on 2-byte banks") {
  // Guards the command line on 2-byte banks: verify and inspect name the type; export --dtype float32
  // writes the stored values widened exactly; import --dtype stores the rows in that type; a bad
  // --dtype value is one error naming the option, the value and the choices (status 2), and writes
  // nothing.
  ScratchDir tmp("snapdtype", "cli");
  const index_t n = 2000, d = 24;
  EngineConfig cfg;
  cfg.k = 16;
  cfg.rounding = Rounding::stochastic;
  Engine e = make_engine(n, d, false, cfg, 12, nullptr, DType::float16);
  run_steps(e, 2, 1, 32);
  const std::string snap = tmp / "f16.h5";
  membank::save_snapshot(snap, e);
  const auto cli = [&](const std::string& args, std::string* out) {
    const std::string o = tmp / "out.txt";
    const int st = std::system(fmt::format("'{}' {} >'{}' 2>&1", MEMBANK_CLI, args, o).c_str());
    *out = file_bytes(o);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  };
  std::string out;
  CHECK(cli(fmt::format("snapshot verify '{}'", snap), &out) == 0);
  CHECK(out.find("float16") != std::string::npos);
  CHECK(cli(fmt::format("snapshot inspect --json '{}'", snap), &out) == 0);
  CHECK(out.find("\"dtype\":\"float16\"") != std::string::npos);
  CHECK(out.find("\"rounding\":\"stochastic\"") != std::string::npos);
  CHECK(cli(fmt::format("snapshot inspect '{}'", snap), &out) == 0);
  CHECK(out.find("float16") != std::string::npos);

  const std::string plain = tmp / "plain.h5";
  CAPTURE(out);
  REQUIRE(cli(fmt::format("snapshot export '{}' '{}' --dtype float32", snap, plain), &out) == 0);
  {
    H5 f(plain, H5F_ACC_RDONLY);
    const auto got = read_block<float>(f.id, "bank", 0, n, d, H5T_NATIVE_FLOAT);
    bool exact = true;
    for (index_t i = 0; i < n; ++i) {
      const std::vector<double> want = row_values(e.bank(), i);
      for (index_t c = 0; c < d; ++c)
        exact &= got[static_cast<std::size_t>(i * d + c)] == want[static_cast<std::size_t>(c)];
    }
    CHECK(exact);
  }
  const std::string imported = tmp / "imported.h5";
  REQUIRE(cli(fmt::format("snapshot import '{}' '{}' --dtype bf16", plain, imported), &out) == 0);
  CHECK(out.find("as bfloat16") != std::string::npos);
  const Engine b = membank::load_snapshot(imported);
  CHECK(b.bank().dtype() == DType::bfloat16);

  for (const std::string cmd : {"import", "export"}) {
    CAPTURE(cmd);
    const std::string never = tmp / "never.h5";
    CHECK(cli(fmt::format("snapshot {} '{}' '{}' --dtype float8", cmd, cmd == "import" ? plain : snap, never), &out) ==
          2);
    CHECK(out.find("--dtype: expected one of float32, float16, bfloat16") != std::string::npos);
    CHECK(out.find("\"float8\"") != std::string::npos);
    CHECK_FALSE(fs::exists(never));
  }
}
#endif
