#pragma once
// `--distributed replicated|sharded` on the command line (train, bench step, bench scale's ranks
// series): the option, the split of a global batch over ranks, and -- in a build with MPI
// (MEMBANK_WITH_MPI, set when CMake's MEMBANK_MPI is on) -- the MPI session of one command.
//
// MPI is started only when a command runs with --distributed (MPI_Init_thread, MPI_THREAD_FUNNELED:
// OpenMP threads never call MPI) and finalised on every way out of it. Errors:
//   * an error every rank raises together (the options, the data, and everything DistributedEngine
//     raises: it agrees on its own errors) ends every rank cleanly: MPI_Finalize, the message once
//     (from rank 0), exit status as without MPI. Such calls run inside collective(), which marks the
//     error as shared;
//   * any other error (one rank alone: rank 0's kNN or output, an allocation in one rank's forward
//     pass) prints "error: rank r of R: ..." from that rank and ends the whole job with MPI_Abort
//     (exit status as without MPI), so no rank waits forever in a collective the failed rank never enters.
// Without MPI the option exists and any value is one error saying the build has no MPI.
#include "check.hpp"
#include "options.hpp"

#include <membank/error.hpp>
#include <membank/types.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <utility>
#include <vector>

#ifdef MEMBANK_WITH_MPI
#include <membank/distributed.hpp>

#include <mpi.h>
#endif

namespace membank::tools {

#ifdef MEMBANK_WITH_MPI
inline constexpr bool kBuiltWithMpi = true;
#else
inline constexpr bool kBuiltWithMpi = false;
#endif

/// The message of --distributed (and bench scale's ranks series) in a build without MPI.
inline std::string no_mpi_message() {
  return "this build of membank has no MPI (configure with -DMEMBANK_MPI=ON, with Open MPI installed: "
         "apt-get install libopenmpi-dev openmpi-bin)";
}

/// --distributed's values: replicated or sharded; in a build without MPI every value is refused.
inline CLI::Validator distributed_mode() {
  return options_detail::validator(
      [](const std::string& s) -> std::string {
        if (!kBuiltWithMpi) return fmt::format("got {}, but {}", options_detail::quoted(s), no_mpi_message());
        if (s == "replicated" || s == "sharded") return {};
        return fmt::format("expected one of replicated, sharded, got {}", options_detail::quoted(s));
      },
      "{replicated,sharded}");
}

/// The rows [begin, begin + size) of a global batch of `batch` rows that rank `rank` of `ranks` holds:
/// contiguous blocks in rank order, the first batch mod ranks ranks one row more.
struct BatchSlice {
  index_t begin = 0, size = 0;
};
inline BatchSlice batch_slice(index_t batch, int ranks, int rank) {
  const index_t q = batch / ranks, rem = batch % ranks;
  return {rank * q + std::min<index_t>(rank, rem), q + (rank < rem ? 1 : 0)};
}

/// This process's rank under mpirun, read from the launcher's environment (Open MPI, MPICH, PMIx),
/// 0 when not launched by one. Known before MPI_Init: errors every rank shares print from rank 0 only.
inline int launcher_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"})
    if (const char* v = std::getenv(name)) return std::atoi(v);
  return 0;
}

/// The exit status and message of a failure, as run_cli reports them (tools/cli.cpp).
inline std::pair<int, std::string> describe_failure(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const ResourceError& x) {
    return {kExitResources, user_message(x.what())};
  } catch (const Error& x) {
    return {kExitUsage, user_message(x.what())};
  } catch (const std::bad_alloc&) {
    return {kExitResources, "out of memory (an allocation failed)"};
  } catch (const ProblemFound& x) {
    return {kExitProblem, x.what()};
  } catch (const std::exception& x) {
    return {kExitProblem, fmt::format("internal error: {}", x.what())};
  } catch (...) {
    return {kExitProblem, "internal error: an exception that is not a std::exception"};
  }
}

#ifdef MEMBANK_WITH_MPI

namespace distributed_detail {
/// True while an error that every rank raised together unwinds (set by collective()).
inline bool& shared_failure() {
  static bool flag = false;
  return flag;
}
}  // namespace distributed_detail

/// Runs `f`, a call every rank makes together whose errors every rank raises together (a
/// DistributedEngine call, an agree()): an error from it ends every rank cleanly (no MPI_Abort).
template <class F>
decltype(auto) collective(F&& f) {
  try {
    return f();
  } catch (...) {
    distributed_detail::shared_failure() = true;
    throw;
  }
}

/// Collective. Every rank passes its own failure (or none); when any rank failed, every rank throws
/// the first failing rank's error (its type kept: the exit status is the same everywhere), naming the
/// rank unless every rank failed. Marks the error as shared.
inline void agree(MPI_Comm comm, std::exception_ptr error) {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  int mine[2] = {error ? rank : ranks, error ? 0 : -1}, all[2] = {ranks, -1};
  MPI_Allreduce(mine, all, 2, MPI_INT, MPI_MIN, comm);  // first failing rank; -1 when some rank succeeded
  if (all[0] == ranks) return;
  distributed_detail::shared_failure() = true;
  int head[2] = {0, 0};  // exit status, message length
  std::string msg;
  if (rank == all[0]) {
    auto [code, text] = describe_failure(error);
    msg = all[1] == 0 ? text : fmt::format("rank {} of {}: {}", rank, ranks, text);
    head[0] = code;
    head[1] = static_cast<int>(std::min<std::size_t>(msg.size(), 1 << 16));
  }
  MPI_Bcast(head, 2, MPI_INT, all[0], comm);
  msg.resize(static_cast<std::size_t>(head[1]));
  MPI_Bcast(msg.data(), head[1], MPI_CHAR, all[0], comm);
  if (head[0] == kExitResources) throw ResourceError(msg);
  if (head[0] == kExitProblem) throw ProblemFound(msg);
  throw Error(msg);
}

/// Collective. f() on this rank (any subset of ranks may do real work in it), then agree().
template <class F>
void agreed(MPI_Comm comm, F&& f) {
  std::exception_ptr error;
  try {
    f();
  } catch (...) {
    error = std::current_exception();
  }
  agree(comm, error);
}

/// One distributed command: MPI_Init_thread (FUNNELED), f(rank, ranks) on MPI_COMM_WORLD, MPI_Finalize
/// on every way out. A shared error (collective(), agree()) is rethrown after MPI_Finalize; any other
/// error is printed by the rank that raised it and ends the job with MPI_Abort.
template <class F>
void run_with_mpi(F&& f) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MEMBANK_CHECK(!initialised, "MPI is already initialised: one distributed command per process");
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  distributed_detail::shared_failure() = false;
  try {
    if (provided < MPI_THREAD_FUNNELED)
      collective([] { throw Error("the MPI library does not provide MPI_THREAD_FUNNELED"); });
    f(rank, ranks);
  } catch (...) {
    if (distributed_detail::shared_failure()) {
      MPI_Finalize();
      throw;
    }
    const auto [code, text] = describe_failure(std::current_exception());
    fmt::print(stderr, "error: rank {} of {}: {}\n(ending every rank: MPI_Abort)\n", rank, ranks, text);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // (MPI_Abort does not return)
  }
  MPI_Finalize();
}

/// Collective. The elementwise sum of every rank's n floats, in rank order ((x_0 + x_1) + x_2 ...),
/// the same bits on every rank: rank r sums block r of the values (n r / R .. n (r + 1) / R) over the
/// ranks (MPI_Alltoallv of the blocks), then the sums are all-gathered. Sends 2 (R - 1) / R x n x 4
/// bytes per rank, as a ring all-reduce does. Returns the bytes this rank sent.
inline std::int64_t allreduce_sum_rank_order(MPI_Comm comm, float* data, std::size_t n, std::vector<float>& scratch) {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  if (ranks == 1) return 0;
  MEMBANK_CHECK(n <= static_cast<std::size_t>(INT_MAX), "{} values in one all-reduce: expected at most 2^31 - 1", n);
  const auto R = static_cast<std::size_t>(ranks), me = static_cast<std::size_t>(rank);
  std::vector<int> cnt(R), displ(R), rcnt(R), rdispl(R);
  for (std::size_t r = 0; r < R; ++r) {
    displ[r] = static_cast<int>(n * r / R);
    cnt[r] = static_cast<int>(n * (r + 1) / R) - displ[r];
  }
  const int mine = cnt[me];
  for (std::size_t r = 0; r < R; ++r) {
    rcnt[r] = mine;
    rdispl[r] = static_cast<int>(r) * mine;
  }
  scratch.resize(R * static_cast<std::size_t>(mine));
  MPI_Alltoallv(data, cnt.data(), displ.data(), MPI_FLOAT, scratch.data(), rcnt.data(), rdispl.data(), MPI_FLOAT, comm);
  float* block = data + displ[me];
  for (int i = 0; i < mine; ++i) {
    float s = scratch[static_cast<std::size_t>(i)];
    for (std::size_t r = 1; r < R; ++r) s += scratch[r * static_cast<std::size_t>(mine) + static_cast<std::size_t>(i)];
    block[i] = s;
  }
  MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, data, cnt.data(), displ.data(), MPI_FLOAT, comm);
  return static_cast<std::int64_t>((n - static_cast<std::size_t>(mine)) + static_cast<std::size_t>(mine) * (R - 1)) * 4;
}

#else

/// Without MPI: f().
template <class F>
decltype(auto) collective(F&& f) {
  return f();
}

#endif  // MEMBANK_WITH_MPI

}  // namespace membank::tools
