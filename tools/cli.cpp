// The `membank` command line: subcommands registered from tools/, benchmarks/ and examples/.
#include "cli.hpp"

#include "commands.hpp"

#include <membank/error.hpp>

#include <fmt/format.h>

#include <exception>
#include <functional>
#include <string>

namespace membank::tools {

namespace {

void drop_callbacks(CLI::App& app) {
  app.callback(std::function<void()>());
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) drop_callbacks(*sub);
}

}  // namespace

int run_cli(int argc, const char* const* argv, bool parse_only) {
  CLI::App app{"membank: memory-bank instance discrimination (Wu et al., CVPR 2018) -- engine tools"};
  app.set_version_flag("--version", std::string("membank ") + MEMBANK_VERSION_STRING);
  app.require_subcommand(1);
  auto* bench = app.add_subcommand("bench", "Benchmarks that print figures (never pass/fail on timing)");
  bench->require_subcommand(1);
  add_bench_step(*bench);
  add_bench_snapshot(*bench);
  add_bench_knn(*bench);
  add_bench_scale(*bench);
  add_bench_soak(*bench);
  add_snapshot(app);
  add_train(app);
  if (parse_only) drop_callbacks(app);
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

}  // namespace membank::tools
