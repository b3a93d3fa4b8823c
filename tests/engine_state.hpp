#pragma once
// The whole mutable state of an engine (bank rows, last-update steps, step counter, Z), captured so
// that a test can check that a refused or failed call changed nothing, bit for bit.
#include "reference.hpp"

#include <membank/engine.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

namespace mbtest {

struct EngineState {
  membank::RowMatrixf bank;
  std::vector<std::int64_t> last_update;
  std::int64_t steps = 0;
  bool initialised = false;
  double log_z = 0;
};

inline EngineState state_of(const membank::Engine& e) {
  return {e.bank().to_matrix(), e.bank().last_update(), e.steps_done(), e.partition().initialised,
          e.partition().log_z};
}

/// Every field of two configurations equal (doubles bit for bit): what a snapshot must give back.
inline void check_same_config(const membank::EngineConfig& a, const membank::EngineConfig& b) {
  CHECK(a.k == b.k);
  CHECK(bits_equal(a.tau, b.tau));
  CHECK(bits_equal(a.momentum, b.momentum));
  CHECK(a.objective == b.objective);
  CHECK(a.negatives == b.negatives);
  CHECK(a.exclude_positive == b.exclude_positive);
  CHECK(a.z_policy == b.z_policy);
  CHECK(bits_equal(a.z_fixed, b.z_fixed));
  CHECK(bits_equal(a.z_ema, b.z_ema));
  CHECK(a.seed == b.seed);
  CHECK(a.normalize_features == b.normalize_features);
  CHECK(bits_equal(a.unit_norm_tolerance, b.unit_norm_tolerance));
  CHECK(bits_equal(a.tau_plus, b.tau_plus));
  CHECK(bits_equal(a.beta, b.beta));
  CHECK(a.detach_weights == b.detach_weights);
  CHECK(bits_equal(a.kernel_t, b.kernel_t));
  CHECK(bits_equal(a.gamma, b.gamma));
  CHECK(bits_equal(a.effective_margin(), b.effective_margin()));
  CHECK(a.exclude_same_label == b.exclude_same_label);
  CHECK(a.rounding == b.rounding);
}

inline void check_unchanged(const EngineState& a, const EngineState& b) {
  CHECK(bits_equal(a.bank, b.bank));
  CHECK(a.last_update == b.last_update);
  CHECK(a.steps == b.steps);
  CHECK(a.initialised == b.initialised);
  CHECK(bits_equal(a.log_z, b.log_z));
}

}  // namespace mbtest
