// The `membank` command line.
#include "commands.hpp"

#include <membank/error.hpp>

#include <fmt/format.h>

#include <exception>

int main(int argc, char** argv) {
  CLI::App app{"membank: memory-bank instance discrimination (Wu et al., CVPR 2018) -- engine tools"};
  app.set_version_flag("--version", std::string("membank ") + MEMBANK_VERSION_STRING);
  app.require_subcommand(1);
  auto* bench = app.add_subcommand("bench", "Benchmarks that print figures (never pass/fail on timing)");
  bench->require_subcommand(1);
  membank::tools::add_bench_step(*bench);
  membank::tools::add_bench_snapshot(*bench);
  membank::tools::add_bench_knn(*bench);
  membank::tools::add_bench_scale(*bench);
  membank::tools::add_snapshot(app);
  membank::tools::add_train(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const membank::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
