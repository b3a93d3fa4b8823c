#pragma once
// Subcommands of the `membank` command line. Each registers its options on a CLI11 subcommand and
// runs when it is selected.
#include <CLI/CLI.hpp>

namespace membank::tools {

void add_bench_step(CLI::App& bench);
void add_bench_snapshot(CLI::App& bench);
void add_bench_knn(CLI::App& bench);
void add_bench_scale(CLI::App& bench);
void add_bench_soak(CLI::App& bench);
void add_snapshot(CLI::App& app);
void add_train(CLI::App& app);

}  // namespace membank::tools
