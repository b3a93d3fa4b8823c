// The `membank` command line.
#include "cli.hpp"

int main(int argc, char** argv) { return membank::tools::run_cli(argc, argv); }
