#include <membank/error.hpp>
#include <membank/threads.hpp>

#include "detail/check.hpp"

#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <climits>
#include <thread>

namespace membank {

int max_num_threads() {
  const long hw = std::max(1u, std::thread::hardware_concurrency());
  long limit = std::min<long>(16 * hw, omp_get_thread_limit());
  rlimit r{};
  if (getrlimit(RLIMIT_NPROC, &r) == 0 && r.rlim_cur != RLIM_INFINITY)
    limit = std::min<long>(limit, static_cast<long>(r.rlim_cur));
  return static_cast<int>(std::clamp<long>(limit, 1, INT_MAX));
}

void set_num_threads(int n) {
  const int limit = max_num_threads();
  MEMBANK_CHECK(n >= 1 && n <= limit, "threads = {}: expected an integer in [1, {}] (16 x the {} hardware threads of this machine)",
                n, limit, std::max(1u, std::thread::hardware_concurrency()));
  omp_set_num_threads(n);
}

}  // namespace membank
