#pragma once
// Option checks shared by every `membank` command (tools/, benchmarks/, examples/): CLI11 validators
// whose messages read `--k: expected an integer >= 1, got "abc"` (CLI11 puts the option's name in
// front), comma-separated lists that refuse empty items, the thread-count option, output paths
// checked before any work starts, and the exit codes of the command line.
//
// Every numeric option goes through one of these validators: the value is parsed here, whole string,
// before CLI11 converts it, so that CLI11's own messages (with their 309-digit bounds) never show.
#include <membank/error.hpp>
#include <membank/threads.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace membank::tools {

/// Exit status of `membank` (listed in `membank --help` and README).
enum ExitCode : int {
  kExitOk = 0,             ///< success
  kExitProblem = 1,        ///< the command found a problem (unsound file, failed self-check), or an internal error
  kExitUsage = 2,          ///< invalid command line or input: unknown option, bad value, unusable path, invalid file
  kExitResources = 3,      ///< out of memory or disk: an allocation failed, not enough space for an output
  kExitInterrupted = 130,  ///< interrupted (SIGINT)
};

/// The text of `membank --help`'s footer: the exit codes.
inline const char* exit_codes_help() {
  return "Exit status:\n"
         "  0    success\n"
         "  1    the command ran and found a problem (e.g. snapshot verify on an unsound file, a benchmark's\n"
         "       failed self-check) or an unexpected internal error\n"
         "  2    invalid command line or input (unknown option, bad value, unusable path, invalid file)\n"
         "  3    out of memory or disk (an allocation failed, not enough space for an output)\n"
         "  130  interrupted (SIGINT)";
}

/// A command ran and found a problem (a benchmark's self-check failed, a file is unsound): exit status 1.
class ProblemFound : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// membank::Error's text without the library's "membank: " prefix and "(in function)" suffix: what
/// a command-line user reads.
inline std::string user_message(const std::string& what) {
  // (Messages wrapped by the library carry these once per level.)
  static const std::regex location(R"( \(in [A-Za-z_][A-Za-z_0-9:<>~]*\))"), prefix("membank: ");
  return std::regex_replace(std::regex_replace(what, location, ""), prefix, "");
}

namespace options_detail {

inline std::string quoted(const std::string& s) { return fmt::format("\"{}\"", s); }

/// The whole of `s` as a decimal integer (no sign for unsigned T), or nothing; *overflow tells why.
template <class T>
std::optional<T> parse_integer(const std::string& s, bool* overflow = nullptr) {
  T v{};
  const char* end = s.data() + s.size();
  const auto [p, ec] = std::from_chars(s.data(), end, v);
  if (overflow) *overflow = ec == std::errc::result_out_of_range;
  if (ec != std::errc() || p != end || s.empty()) return std::nullopt;
  return v;
}

/// The whole of `s` as a finite decimal number, or nothing.
inline std::optional<double> parse_number(const std::string& s) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s.front()))) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || errno == ERANGE || !std::isfinite(v)) return std::nullopt;
  return v;
}

inline CLI::Validator validator(std::function<std::string(const std::string&)> check, std::string desc) {
  return CLI::Validator([check = std::move(check)](std::string& s) { return check(s); }, std::move(desc));
}

}  // namespace options_detail

/// An integer in [lo, hi] (hi = LLONG_MAX: no upper bound is mentioned).
inline CLI::Validator integer_in(long long lo, long long hi = LLONG_MAX) {
  const std::string expect = hi == LLONG_MAX ? fmt::format("an integer >= {}", lo)
                                             : fmt::format("an integer in [{}, {}]", lo, hi);
  return options_detail::validator(
      [=](const std::string& s) -> std::string {
        bool overflow = false;
        const auto v = options_detail::parse_integer<long long>(s, &overflow);
        if (v && *v >= lo && *v <= hi) return {};
        return fmt::format("expected {}, got {}{}", expect, options_detail::quoted(s),
                           overflow ? " (out of range)" : "");
      },
      hi == LLONG_MAX ? fmt::format("INT >= {}", lo) : fmt::format("INT in [{}, {}]", lo, hi));
}

/// A seed: any integer in [0, 2^64 - 1].
inline CLI::Validator seed_value() {
  return options_detail::validator(
      [](const std::string& s) -> std::string {
        if (options_detail::parse_integer<std::uint64_t>(s)) return {};
        return fmt::format("expected an integer in [0, 2^64 - 1], got {}", options_detail::quoted(s));
      },
      "UINT64");
}

/// A finite number with lo < x (open) or lo <= x (closed), and x <= hi (x < hi with hi_open) when hi
/// is given.
inline CLI::Validator number_in(double lo, bool lo_open, std::optional<double> hi = std::nullopt,
                                bool hi_open = false) {
  const std::string expect = hi ? fmt::format("a number in {}{}, {}{}", lo_open ? "(" : "[", lo, *hi, hi_open ? ")" : "]")
                                : fmt::format("a number {} {}", lo_open ? ">" : ">=", lo);
  return options_detail::validator(
      [=](const std::string& s) -> std::string {
        const auto v = options_detail::parse_number(s);
        if (v && (lo_open ? *v > lo : *v >= lo) && (!hi || (hi_open ? *v < *hi : *v <= *hi))) return {};
        return fmt::format("expected {}, got {}", expect, options_detail::quoted(s));
      },
      "NUMBER " + expect.substr(9));
}
inline CLI::Validator positive_number() { return number_in(0.0, true); }

/// One of a fixed set of names.
inline CLI::Validator one_of(std::vector<std::string> names) {
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
  return options_detail::validator(
      [=](const std::string& s) -> std::string {
        for (const auto& n : names)
          if (s == n) return {};
        return fmt::format("expected one of {}, got {}", list, options_detail::quoted(s));
      },
      "{" + list + "}");
}

/// A thread count: 1 .. membank::max_num_threads() (the bound set_num_threads enforces: what this
/// machine can start), or 0 for the OpenMP default when `zero_is_default`.
inline CLI::Validator thread_count(bool zero_is_default = true) {
  return options_detail::validator(
      [=](const std::string& s) -> std::string {
        const int lo = zero_is_default ? 0 : 1, hi = membank::max_num_threads();
        bool overflow = false;
        const auto v = options_detail::parse_integer<long long>(s, &overflow);
        if (v && *v >= lo && *v <= hi) return {};
        return fmt::format("expected an integer in [{}, {}]{}, got {}", lo, hi,
                           zero_is_default ? " (0: the OpenMP default)" : "", options_detail::quoted(s));
      },
      "THREADS");
}

/// Applies a --threads value through membank::set_num_threads (0: leave the OpenMP default).
inline void apply_threads(int n) {
  if (n > 0) membank::set_num_threads(n);
}

/// A comma-separated list: every item non-empty and accepted by `item`. Registered with
/// add_list_option, which converts it.
inline CLI::Validator list_of(CLI::Validator item, const std::string& what) {
  return options_detail::validator(
      [item, what](const std::string& s) -> std::string {
        std::size_t start = 0;
        for (int index = 1;; ++index) {
          const auto comma = s.find(',', start);
          std::string piece = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
          if (piece.empty())
            return fmt::format("item {} of {} is empty: expected a comma-separated list of {}", index,
                               options_detail::quoted(s), what);
          std::string err = item(piece);
          if (!err.empty()) return fmt::format("item {} of {}: {}", index, options_detail::quoted(s), err);
          if (comma == std::string::npos) return {};
          start = comma + 1;
        }
      },
      "");
}

/// Adds a comma-separated list option whose items each pass `item` (what: the items, for messages,
/// e.g. "integers >= 1"), stored into `target` (its present value is the shown default).
template <class T>
CLI::Option* add_list_option(CLI::App& app, const std::string& name, std::vector<T>& target, CLI::Validator item,
                             const std::string& what, const std::string& help) {
  std::string shown;
  for (const auto& v : target) shown += (shown.empty() ? "" : ",") + fmt::format("{}", v);
  auto* opt = app.add_option_function<std::string>(
      name,
      [&target](const std::string& s) {
        target.clear();
        std::size_t start = 0;
        while (true) {
          const auto comma = s.find(',', start);
          const std::string piece = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
          if constexpr (std::is_same_v<T, std::string>) {
            target.push_back(piece);
          } else {
            target.push_back(*options_detail::parse_integer<T>(piece));
          }
          if (comma == std::string::npos) break;
          start = comma + 1;
        }
      },
      help);
  opt->check(list_of(std::move(item), what))->type_name("LIST");
  if (!shown.empty()) opt->default_str(shown);
  return opt;
}

// ---- paths ----------------------------------------------------------------------------------------

/// An existing regular file to read.
inline CLI::Validator input_file() {
  return options_detail::validator(
      [](const std::string& s) -> std::string {
        std::error_code ec;
        if (s.empty()) return "expected a file name, got \"\"";
        if (!std::filesystem::exists(s, ec)) return fmt::format("no such file {}", options_detail::quoted(s));
        if (std::filesystem::is_directory(s, ec))
          return fmt::format("{} is a directory: expected a file", options_detail::quoted(s));
        if (::access(s.c_str(), R_OK) != 0) return fmt::format("{} is not readable", options_detail::quoted(s));
        return {};
      },
      "FILE");
}

/// An existing directory (writable when `writable`).
inline CLI::Validator existing_directory(bool writable) {
  return options_detail::validator(
      [writable](const std::string& s) -> std::string {
        std::error_code ec;
        if (s.empty() || !std::filesystem::is_directory(s, ec))
          return fmt::format("no such directory {}", options_detail::quoted(s));
        if (writable && ::access(s.c_str(), W_OK | X_OK) != 0)
          return fmt::format("directory {} is not writable", options_detail::quoted(s));
        return {};
      },
      "DIR");
}

/// Why a file cannot be written at `path` (empty: it can): its directory must exist and be writable,
/// and the path must not be a directory. Nothing is created.
inline std::string output_path_problem(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) return "expected a file name, got \"\"";
  std::error_code ec;
  const fs::path p = fs::absolute(path, ec);
  if (ec) return fmt::format("{}: {}", options_detail::quoted(path), ec.message());
  if (fs::is_directory(p, ec))
    return fmt::format("{} is a directory: expected a file name", options_detail::quoted(path));
  const fs::path dir = p.parent_path();
  if (!fs::is_directory(dir, ec))
    return fmt::format("cannot write {}: directory {} does not exist", options_detail::quoted(path), dir.string());
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return fmt::format("cannot write {}: directory {} is not writable", options_detail::quoted(path), dir.string());
  if (fs::exists(p, ec) && ::access(p.c_str(), W_OK) != 0)
    return fmt::format("cannot write {}: the file exists and is not writable", options_detail::quoted(path));
  return {};
}

/// A file the command will write (checked when the command line is parsed, before any work);
/// `empty_ok`: "" means "write nothing".
inline CLI::Validator output_file(bool empty_ok = false) {
  return options_detail::validator(
      [empty_ok](const std::string& s) -> std::string {
        if (s.empty() && empty_ok) return {};
        return output_path_problem(s);
      },
      "FILE");
}

/// Free bytes in `path`'s directory and the process's file-size limit, against `bytes` to be written:
/// throws membank::ResourceError naming the option when either is short.
inline void require_output_space(const std::string& option, const std::string& path, double bytes) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::absolute(path).parent_path();
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) == 0) {
    const double avail = static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize);
    if (avail < bytes)
      throw ResourceError(fmt::format("{}: cannot write {}: {:.1f} MB free in {}, about {:.1f} MB needed", option, path,
                                      avail * 1e-6, dir.string(), bytes * 1e-6));
  }
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      static_cast<double>(rl.rlim_cur) < bytes)
    throw ResourceError(fmt::format("{}: cannot write {}: the file-size limit (ulimit -f) is {} bytes, about {:.0f} "
                                    "needed", option, path, static_cast<unsigned long long>(rl.rlim_cur), bytes));
}

/// Refuses `out` when it names the same file as `in` (same device and inode, whatever the path).
inline void require_distinct_files(const std::string& in_name, const std::string& in, const std::string& out_name,
                                   const std::string& out) {
  struct stat a {}, b {};
  if (::stat(in.c_str(), &a) == 0 && ::stat(out.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
    throw Error(fmt::format("{} {} is the same file as {} {}: refusing to overwrite the input", out_name,
                            options_detail::quoted(out), in_name, options_detail::quoted(in)));
}

}  // namespace membank::tools
