#include "machine_info.hpp"

#include <array>
#include <cstdio>
#include <fstream>
#include <memory>

namespace membank::tools {

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

std::string git_revision() {
#ifdef MEMBANK_SOURCE_DIR
  const std::string cmd = "git -C '" MEMBANK_SOURCE_DIR "' rev-parse --short HEAD 2>/dev/null";
#else
  const std::string cmd = "git rev-parse --short HEAD 2>/dev/null";
#endif
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) return "unknown";
  std::array<char, 64> buf{};
  std::string out;
  while (fgets(buf.data(), static_cast<int>(buf.size()), pipe.get())) out += buf.data();
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out.empty() ? "unknown" : out;
}

}  // namespace membank::tools
