#pragma once
// The library's argument checks: MEMBANK_CHECK(cond, fmt, args...) throws membank::Error with a
// fmt-formatted message (what, which value, what was expected) naming the checking function.
// Private to the library, so that its public headers need no fmt.
#include <membank/error.hpp>

#include <fmt/format.h>

/// Throw membank::Error with a fmt-formatted message when `cond` is false.
#define MEMBANK_CHECK(cond, ...)                                                     \
  do {                                                                               \
    if (!(cond)) ::membank::detail::throw_error(__func__, fmt::format(__VA_ARGS__)); \
  } while (0)

#define MEMBANK_THROW(...) ::membank::detail::throw_error(__func__, fmt::format(__VA_ARGS__))
