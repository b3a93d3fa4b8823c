#pragma once
// The check harness of the MPI test programs (test_distributed.cpp, test_distributed_snapshot.cpp):
// a failed check is counted and printed with its rank, never thrown, so that every rank goes on
// into every collective; finish() sums the counts over the ranks and gives the exit status.
#include <membank/types.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <string>

namespace mpi_check {

inline int g_rank = 0, g_ranks = 1;
inline int g_failures = 0, g_checks = 0;

/// MPI_Init, and this process's rank and the number of ranks.
inline void start(int* argc, char*** argv) {
  MPI_Init(argc, argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_ranks);
}

inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  if (g_failures <= 30) std::cerr << fmt::format("[rank {} of {}] FAILED: {}\n", g_rank, g_ranks, what);
}

/// Runs f, turning an exception into a failed check (the same on every rank for the collective calls).
inline void guarded(const std::string& what, const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    check(false, fmt::format("{}: threw {}", what, e.what()));
  }
}

inline bool same_bits(const membank::RowMatrixf& a, const membank::RowMatrixf& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

inline bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

/// Sums the checks and failures over the ranks, prints them on rank 0, MPI_Finalize; the exit
/// status: 0 when something was checked and nothing failed.
inline int finish(const std::string& what) {
  int failures = 0, checks = 0;
  MPI_Allreduce(&g_failures, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&g_checks, &checks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0) std::cout << fmt::format("{}: {} checks on {} ranks, {} failed\n", what, checks, g_ranks, failures);
  MPI_Finalize();
  return failures == 0 && checks > 0 ? 0 : 1;
}

}  // namespace mpi_check
