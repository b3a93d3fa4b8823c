#pragma once
// The `membank` command line as a function, so that main() and the argument-parsing fuzz target share it.

namespace membank::tools {

/// Parse argv and run the selected command; returns the process exit code (see `membank --help`).
/// With parse_only, options are parsed and validated but no command runs (the fuzz target's mode).
int run_cli(int argc, const char* const* argv, bool parse_only = false);

}  // namespace membank::tools
