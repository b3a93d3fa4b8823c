// Fuzz target: the command line's argument parsing, `membank::tools::run_cli(argc, argv, true)`.
//
// The input is split at newlines into arguments (one argument a line, so the corpus reads as
// command lines); argv[0] is "membank". parse_only parses and validates every option but runs no
// command. run_cli must return an exit code of the documented set (0, 1, 2, 3, 130 never here) and
// nothing may escape it: an exception, a crash, exit() or a sanitizer report is a finding.
#include "cli.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Help and version texts go to stdout: silence them once (errors on stderr stay visible).
  static const bool quiet = std::freopen("/dev/null", "w", stdout) != nullptr;
  (void)quiet;

  std::vector<std::string> args{"membank"};
  std::string cur;
  for (std::size_t i = 0; i < size; ++i) {
    const char c = static_cast<char>(data[i]);
    if (c == '\n') {
      args.push_back(cur);
      cur.clear();
    } else if (c != '\0') {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) args.push_back(cur);
  if (args.size() > 64) return 0;  // long argument lists add nothing the parser has not seen

  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  argv.push_back(nullptr);
  const int rc = membank::tools::run_cli(static_cast<int>(args.size()), argv.data(), /*parse_only=*/true);
  if (rc != 0 && rc != 1 && rc != 2 && rc != 3) {
    std::fprintf(stderr, "fuzz_cli: run_cli returned %d, not one of the documented exit codes\n", rc);
    std::abort();
  }
  return 0;
}
