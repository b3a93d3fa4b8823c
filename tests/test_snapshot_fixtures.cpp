// Snapshot files of format version 1, kept in tests/fixtures/ (MEMBANK_TEST_FIXTURES), still load:
// every field equals the value recorded in fixtures/snapshot_fixtures.hpp (what the writer was given,
// not what a file read back), and a loaded engine continues exactly like one built from those values.
#include "fixtures/snapshot_fixtures.hpp"
#include "engine_state.hpp"
#include "snapshot_inputs.hpp"

#include <membank/snapshot.hpp>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

using namespace mbtest;
using mbfixture::SnapshotFixture;

namespace {

std::string fixture_path(const SnapshotFixture& fx) {
  return (std::filesystem::path(MEMBANK_TEST_FIXTURES) / fx.file).string();
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

void check_partition(const membank::Partition& got, const membank::Partition& want) {
  CHECK(got.policy == want.policy);
  CHECK(got.initialised == want.initialised);
  if (want.initialised) CHECK(same_bits(got.log_z, want.log_z));
}

}  // namespace

TEST_CASE("snapshot fixtures: format-1 files load with every recorded field") {
  // Guards backward compatibility of loading: four kept version-1 files (uniform and alias sampler,
  // with and without labels, deflate 0 and 4; every objective, negatives mode, Z policy) verify,
  // and read_snapshot_info / load_snapshot return the recorded metadata, configuration, Z state,
  // step counter, bank rows (bit for bit), last_update, sampler weights and labels.
  const auto fixtures = mbfixture::snapshot_v1_fixtures();
  REQUIRE(fixtures.size() == 4);
  for (const SnapshotFixture& fx : fixtures) {
    const std::string path = fixture_path(fx);
    CAPTURE(path);
    REQUIRE(std::filesystem::exists(path));
    CHECK(membank::verify_snapshot(path).empty());

    const membank::SnapshotInfo info = membank::read_snapshot_info(path);
    CHECK(info.format == "membank-snapshot");
    CHECK(info.format_version == 1);
    CHECK(info.engine_version == fx.engine_version);
    CHECK(info.n == fx.n);
    CHECK(info.dim == fx.dim);
    CHECK(info.step == fx.step);
    mbtest::check_same_config(info.config, fx.config);
    check_partition(info.partition, fx.partition);
    CHECK(info.sampler == (fx.alias ? membank::SamplerKind::alias : membank::SamplerKind::uniform));
    CHECK(info.has_labels == fx.labels);
    CHECK(info.rows_per_chunk == fx.rows_per_chunk);
    CHECK(info.compressed == (fx.deflate > 0));

    std::vector<std::int64_t> got_labels = {-99};  // replaced when the file has labels, kept otherwise
    const membank::Engine e = membank::load_snapshot(path, &got_labels);
    CHECK(e.steps_done() == fx.step);
    mbtest::check_same_config(e.config(), fx.config);
    check_partition(e.partition(), fx.partition);
    REQUIRE(e.bank().size() == fx.n);
    REQUIRE(e.bank().dim() == fx.dim);
    int rows_differing = 0;
    for (index_t i = 0; i < fx.n; ++i) {
      const std::vector<float> want = mbfixture::bank_row(fx, i);
      rows_differing += std::memcmp(e.bank().row(i), want.data(), want.size() * sizeof(float)) != 0;
    }
    CHECK(rows_differing == 0);
    CHECK(e.bank().last_update() == mbfixture::last_update(fx));
    if (fx.labels)
      CHECK(got_labels == mbfixture::labels(fx));
    else
      CHECK(got_labels == std::vector<std::int64_t>{-99});
    if (fx.alias) {
      REQUIRE(e.sampler().kind() == membank::SamplerKind::alias);
      const auto& alias = dynamic_cast<const membank::AliasSampler&>(e.sampler());
      CHECK(std::ranges::equal(alias.weights(), mbfixture::weights(fx)));  // exactly as the writer was given them
      double total = 0.0;
      for (const double w : mbfixture::weights(fx)) total += w;
      const std::vector<double> p = e.sampler().probs();
      for (index_t j = 0; j < fx.n; ++j) {
        CAPTURE(j);
        CHECK(p[static_cast<std::size_t>(j)] ==
              doctest::Approx(mbfixture::weights(fx)[static_cast<std::size_t>(j)] / total).epsilon(1e-14));
      }
    } else {
      REQUIRE(e.sampler().kind() == membank::SamplerKind::uniform);
      for (const double p : e.sampler().probs()) CHECK(p == doctest::Approx(1.0 / static_cast<double>(fx.n)));
    }
  }
}

TEST_CASE("snapshot fixtures: a format-1 file resumes like the engine it recorded") {
  // Guards resume from an old file: the loaded engine and one built here from the recorded values
  // (public API) run the same fed steps; losses, Z, Zhat, P(pos), the bank, last_update, the step
  // counter and the Z state stay bit-identical, and a save of the resumed engine loads again.
  const std::filesystem::path tmp =
      std::filesystem::temp_directory_path() / fmt::format("membank-fixtures-{}", ::getpid());
  std::filesystem::create_directories(tmp);
  for (const SnapshotFixture& fx : mbfixture::snapshot_v1_fixtures()) {
    const std::string path = fixture_path(fx);
    CAPTURE(path);
    membank::Engine loaded = membank::load_snapshot(path);
    membank::Engine built = mbfixture::build_engine(fx);
    const index_t batch = 4;
    const auto a = run_fed_steps(loaded, 3, 2024, batch);
    const auto b = run_fed_steps(built, 3, 2024, batch);
    REQUIRE(a.size() == b.size());
    for (std::size_t s = 0; s < a.size(); ++s) {
      CAPTURE(s);
      CHECK(a[s].step == fx.step + static_cast<std::int64_t>(s));
      CHECK(std::isfinite(a[s].loss));
      CHECK(same_bits(a[s].loss, b[s].loss));
      CHECK(same_bits(a[s].z, b[s].z));
      CHECK(same_bits(a[s].z_estimate, b[s].z_estimate));
      CHECK(same_bits(a[s].mean_p_positive, b[s].mean_p_positive));
    }
    CHECK(loaded.steps_done() == fx.step + 3);
    CHECK(bits_equal(loaded.bank().to_matrix(), built.bank().to_matrix()));
    CHECK(loaded.bank().last_update() == built.bank().last_update());
    CHECK(std::count(loaded.bank().last_update().begin(), loaded.bank().last_update().end(), fx.step + 2) > 0);
    check_partition(loaded.partition(), built.partition());
    // The resumed engine saves in the current format and loads back unchanged.
    const std::string again = (tmp / fx.file).string();
    membank::save_snapshot(again, loaded);
    const membank::Engine reloaded = membank::load_snapshot(again);
    CHECK(reloaded.steps_done() == fx.step + 3);
    CHECK(bits_equal(reloaded.bank().to_matrix(), loaded.bank().to_matrix()));
  }
  std::filesystem::remove_all(tmp);
}
