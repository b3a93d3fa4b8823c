#pragma once
// Shared by test_snapshot.cpp and the snapshot_writer helper executable: the batch fed at a step is
// a pure function of (input seed, step counter), so a resumed engine -- in this process or a fresh
// one -- is fed exactly what an uninterrupted run was fed at the same step.
#include "reference.hpp"

#include <membank/engine.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

namespace mbtest {

struct StepBatch {
  std::vector<index_t> ids;
  RowMatrixf features;
};

/// The batch for step counter `step` of a run fed from `input_seed`.
inline StepBatch batch_for_step(std::uint64_t input_seed, std::int64_t step, index_t batch, index_t n,
                                index_t dim) {
  std::mt19937_64 rng(input_seed * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(step) * 0xBF58476D1CE4E5B9ULL +
                      1);
  StepBatch b;
  b.ids = random_ids(batch, n, rng);
  b.features = unit_rows(batch, dim, rng);
  return b;
}

/// Run `steps` steps, each fed batch_for_step(input_seed, engine.steps_done()); returns the stats.
inline std::vector<membank::StepStats> run_fed_steps(membank::Engine& e, int steps, std::uint64_t input_seed,
                                                     index_t batch) {
  std::vector<membank::StepStats> out;
  RowMatrixf g(batch, e.bank().dim());
  for (int s = 0; s < steps; ++s) {
    const StepBatch b = batch_for_step(input_seed, e.steps_done(), batch, e.bank().size(), e.bank().dim());
    out.push_back(e.step(b.features, b.ids, g));
  }
  return out;
}

/// FNV-1a over the whole engine state that a snapshot carries: bank rows (D floats each, not the
/// padding), last_update, the step counter and the Z state.
inline std::uint64_t state_hash(const membank::Engine& e) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  const auto mix = [&h](const void* p, std::size_t bytes) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < bytes; ++i) h = (h ^ c[i]) * 0x100000001b3ULL;
  };
  const membank::Bank& bank = e.bank();
  for (index_t i = 0; i < bank.size(); ++i) mix(bank.row(i), sizeof(float) * static_cast<std::size_t>(bank.dim()));
  mix(bank.last_update().data(), sizeof(std::int64_t) * bank.last_update().size());
  const std::int64_t step = e.steps_done();
  mix(&step, sizeof step);
  const unsigned char init = e.partition().initialised ? 1 : 0;
  mix(&init, 1);
  mix(&e.partition().log_z, sizeof(double));
  return h;
}

/// The engine snapshot_writer's `loop` and `write` commands build (kill-during-write test and the
/// h5py interoperability checks): Bank(n, dim, seed), uniform or alias sampler, per-sample NCE.
inline membank::EngineConfig writer_config() {
  membank::EngineConfig cfg;
  cfg.k = 16;
  cfg.seed = 77;
  cfg.momentum = 0.5;
  return cfg;
}

constexpr std::uint64_t kWriterBankSeed = 4242;
constexpr std::uint64_t kWriterInputSeed = 99;
constexpr index_t kWriterBatch = 64;

}  // namespace mbtest
