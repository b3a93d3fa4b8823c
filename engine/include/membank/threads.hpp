#pragma once
// Thread count of the engine's OpenMP regions. Results never depend on it (work is split into blocks
// whose bounds depend only on the sizes); it only sets how many cores the calls use.

namespace membank {

/// The largest thread count set_num_threads accepts on this machine: 16 x the hardware threads,
/// capped by the OpenMP thread limit and the process limit on threads (RLIMIT_NPROC).
int max_num_threads();

/// Set the number of OpenMP threads of later calls from this thread. Throws membank::Error naming the
/// value and the allowed range when n < 1 or n > max_num_threads(); nothing changes then.
void set_num_threads(int n);

}  // namespace membank
