// The `membank` command line: subcommands registered from tools/, benchmarks/ and examples/.
#include "cli.hpp"

#include "commands.hpp"
#include "distributed_cli.hpp"
#include "options.hpp"

#include <membank/error.hpp>
#include <membank/version.hpp>

#include <fmt/format.h>

#include <csignal>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <string>

#include <unistd.h>

namespace membank::tools {

namespace {

bool g_parse_only = false;

/// SIGINT: one line on stderr and exit status 130 at once. A snapshot being saved keeps its previous
/// version (the temporary is never renamed); the next save removes the temporary left behind.
extern "C" void on_sigint(int) {
  static const char msg[] = "\nmembank: interrupted\n";
  [[maybe_unused]] const auto w = ::write(2, msg, sizeof msg - 1);
  ::_exit(kExitInterrupted);
}

int fail(int code, const std::string& what) {
  // Under mpirun every rank meets the same command-line and shared errors: rank 0 reports them.
  if (launcher_rank() != 0) return code;
  fmt::print(stderr, "error: {}\n", what);
  std::fflush(stderr);
  return code;
}

}  // namespace

bool parse_only_mode() { return g_parse_only; }

int run_cli(int argc, const char* const* argv, bool parse_only) {
  CLI::App app{"membank: memory-bank instance discrimination (Wu et al., CVPR 2018) -- engine tools"};
  app.set_version_flag("--version", std::string("membank ") + MEMBANK_VERSION_STRING);
  app.require_subcommand(1);
  app.footer(exit_codes_help());
  auto* bench = app.add_subcommand("bench", "Benchmarks that print figures (never pass/fail on timing)");
  bench->require_subcommand(1);
  add_bench_step(*bench);
  add_bench_snapshot(*bench);
  add_bench_knn(*bench);
  add_bench_sampler(*bench);
  add_bench_scale(*bench);
  add_bench_soak(*bench);
  add_bench_memories(*bench);
  add_snapshot(app);
  add_train(app);
  g_parse_only = parse_only;
  if (!parse_only) std::signal(SIGINT, on_sigint);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return fail(kExitUsage, fmt::format("{}\n(run with --help for the options)", e.what()));
  } catch (const membank::ResourceError& e) {
    return fail(kExitResources, user_message(e.what()));
  } catch (const membank::Error& e) {
    return fail(kExitUsage, user_message(e.what()));
  } catch (const std::bad_alloc&) {
    return fail(kExitResources, "out of memory (an allocation failed)");
  } catch (const ProblemFound& e) {
    return fail(kExitProblem, e.what());
  } catch (const std::exception& e) {
    return fail(kExitProblem, fmt::format("internal error: {}", e.what()));
  }
  return kExitOk;
}

}  // namespace membank::tools
