#include <membank/error.hpp>

#include "detail/check.hpp"

#include <limits>

namespace membank {

namespace detail {
void throw_error(const char* func, const std::string& msg) {
  throw Error(fmt::format("membank: {} (in {})", msg, func));
}
}  // namespace detail

std::int64_t mul_no_overflow(std::int64_t a, std::int64_t b, const char* what) {
  MEMBANK_CHECK(a >= 0 && b >= 0, "{}: negative size in {} x {}", what, a, b);
  MEMBANK_CHECK(b == 0 || a <= std::numeric_limits<std::int64_t>::max() / b,
                "{}: {} x {} overflows int64", what, a, b);
  return a * b;
}

}  // namespace membank
