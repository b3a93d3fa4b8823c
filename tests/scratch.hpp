#pragma once
// A scratch directory for a test's files (removed with everything in it when the test ends), and a
// file's bytes.
#include <fmt/format.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

namespace mbtest {

/// <temp>/membank-<tag>-<pid>-<name>, created empty; `dir / "file"` names a file in it.
struct ScratchDir {
  std::filesystem::path dir;
  ScratchDir(const std::string& tag, const std::string& name)
      : dir(std::filesystem::temp_directory_path() / fmt::format("membank-{}-{}-{}", tag, ::getpid(), name)) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string operator/(const std::string& file) const { return (dir / file).string(); }
};

/// The whole file as bytes (empty if it cannot be read).
inline std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace mbtest
