#include <membank/version.hpp>

namespace membank {

const char* version() noexcept { return MEMBANK_VERSION_STRING; }

}  // namespace membank
