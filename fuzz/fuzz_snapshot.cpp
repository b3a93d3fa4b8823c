// Fuzz target: snapshot loading on arbitrary file contents.
//
// The input bytes become a file; read_snapshot_info, verify_snapshot, load_snapshot and import_bank
// read it. Each may only throw membank::Error (anything else, a crash, a sanitizer report or a huge
// allocation is a finding). Beyond "no crash", two properties are checked:
//   - verify_snapshot reporting no problem means load_snapshot succeeds;
//   - a loaded bank holds only finite, unit-norm rows (within the file's own tolerance), i.e. no
//     silently wrong state gets through.
// The file goes to $TMPDIR (default /tmp), one per process, removed after each input.
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

const std::string& scratch_path() {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/membank-fuzz-snapshot-" + std::to_string(::getpid()) + ".h5";
  }();
  return path;
}

void write_file(const std::string& path, const std::uint8_t* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  if (std::fclose(f) != 0) std::abort();
}

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_snapshot: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = scratch_path();
  write_file(path, data, size);

  try {
    (void)membank::read_snapshot_info(path);
  } catch (const membank::Error&) {
  }

  bool verified = false;
  try {
    verified = membank::verify_snapshot(path).empty();
  } catch (const membank::Error&) {
  }

  try {
    std::vector<std::int64_t> labels;
    const membank::Engine engine = membank::load_snapshot(path, &labels);
    const membank::BankView v = engine.bank().view();
    const double tol = 1e-3;  // looser than the loader's own check: only a clearly wrong row is a finding
    for (membank::index_t i = 0; i < v.rows; ++i) {
      double sq = 0.0;
      for (membank::index_t c = 0; c < v.dim; ++c) sq += double(v.row(i)[c]) * double(v.row(i)[c]);
      if (!std::isfinite(sq) || std::abs(std::sqrt(sq) - 1.0) > tol)
        finding("load_snapshot accepted a bank row that is not finite and unit norm");
    }
    if (!labels.empty() && labels.size() != static_cast<std::size_t>(v.rows))
      finding("labels of the wrong length accepted");
  } catch (const membank::Error&) {
    if (verified) finding("verify_snapshot found no problem but load_snapshot threw");
  }

  try {
    (void)membank::import_bank(path);
  } catch (const membank::Error&) {
  }
  std::remove(path.c_str());
  return 0;
}
