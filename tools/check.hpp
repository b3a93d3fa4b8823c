#pragma once
// MEMBANK_CHECK / MEMBANK_THROW for the command line, its benchmarks and the trainer: the same
// contract as the library's own checks (private to it), raised through membank::detail::throw_error,
// so a failed check reads "membank: <message> (in <function>)" and exits like any membank::Error.
#include <membank/error.hpp>

#include <fmt/format.h>

/// Throw membank::Error with a fmt-formatted message when `cond` is false.
#define MEMBANK_CHECK(cond, ...)                                                     \
  do {                                                                               \
    if (!(cond)) ::membank::detail::throw_error(__func__, fmt::format(__VA_ARGS__)); \
  } while (0)

#define MEMBANK_THROW(...) ::membank::detail::throw_error(__func__, fmt::format(__VA_ARGS__))
