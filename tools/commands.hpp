#pragma once
// Subcommands of the `membank` command line. Each registers its options on a CLI11 subcommand and
// runs when it is selected.
#include <CLI/CLI.hpp>

#include <functional>
#include <utility>

namespace membank::tools {

/// True while run_cli parses without running (its parse_only mode, the argument fuzz target's).
bool parse_only_mode();

/// A subcommand's callback: runs `f` unless the command line is only being parsed. The callback
/// keeps owning what `f` captures (the options CLI11 writes into), in both modes.
template <class F>
std::function<void()> command(F f) {
  return [f = std::move(f)] {
    if (!parse_only_mode()) f();
  };
}

void add_bench_step(CLI::App& bench);
void add_bench_snapshot(CLI::App& bench);
void add_bench_knn(CLI::App& bench);
void add_bench_sampler(CLI::App& bench);
void add_bench_scale(CLI::App& bench);
void add_bench_soak(CLI::App& bench);
void add_bench_memories(CLI::App& bench);  // queue, multiview
void add_snapshot(CLI::App& app);
void add_train(CLI::App& app);

}  // namespace membank::tools
