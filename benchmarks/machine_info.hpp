#pragma once
// What a benchmark row records about where it ran.
#include <string>

namespace membank::tools {
std::string cpu_model();      ///< from /proc/cpuinfo, "unknown" otherwise
std::string git_revision();   ///< `git rev-parse --short HEAD` of the source tree, "unknown" otherwise
}  // namespace membank::tools
