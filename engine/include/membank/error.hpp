#pragma once
// The one exception type of membank, and the function every check raises it through.
//
// Every caller error (wrong shape, id out of range, NaN feature, bad option, unreadable file ...)
// throws membank::Error whose message names the argument, the offending value, what was expected,
// and the function that checked it. An operation that throws leaves the engine and its bank as
// they were before the call.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace membank {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A request the machine cannot serve: not enough memory or disk for it (checked before the work
/// starts). An Error like any other; callers that care (the command line's exit status 3) catch it
/// apart.
class ResourceError : public Error {
 public:
  using Error::Error;
};

/// Not enough memory: a request refused before allocating (the message says how much was needed
/// and how much is available), or an allocation that failed (std::bad_alloc, inside OpenMP regions
/// too). Python: MemoryError. The engine is left as it was.
class OutOfMemory : public ResourceError {
 public:
  using ResourceError::ResourceError;
};

/// A long call stopped because its caller's cancellation hook asked it to (knn_search's `cancel`;
/// Python: KeyboardInterrupt). Nothing was written.
class Cancelled : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// Throw Error("membank: <msg> (in <func>)"). The library's own checks (MEMBANK_CHECK, a private
/// header of the library) and the programs built with it raise their errors through this one function.
[[noreturn]] void throw_error(const char* func, const std::string& msg);
}  // namespace detail

/// a * b, throwing Error (naming `what`) if the product does not fit in int64 or an operand is negative.
std::int64_t mul_no_overflow(std::int64_t a, std::int64_t b, const char* what);

}  // namespace membank
