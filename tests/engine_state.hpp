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

inline void check_unchanged(const EngineState& a, const EngineState& b) {
  CHECK(bits_equal(a.bank, b.bank));
  CHECK(a.last_update == b.last_update);
  CHECK(a.steps == b.steps);
  CHECK(a.initialised == b.initialised);
  CHECK(bits_equal(a.log_z, b.log_z));
}

}  // namespace mbtest
