#pragma once
// The MPI collectives of the distributed engine and its snapshots (distributed.cpp,
// distributed_snapshot.cpp): calls checked for errors, element counts checked against MPI's int,
// Group::agree, by which every rank throws the same Error when any rank failed, and the fingerprints
// by which ranks check that they were given the same thing. Internal.
#include <membank/distributed.hpp>
#include <membank/engine.hpp>
#include <membank/error.hpp>

#include "detail/check.hpp"

#include <mpi.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <exception>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace membank::detail {

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  if constexpr (std::is_same_v<T, int>) return MPI_INT;
  if constexpr (std::is_same_v<T, char>) return MPI_CHAR;
}

inline void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  MEMBANK_THROW("{} failed: {}", call, std::string(text, static_cast<std::size_t>(len)));
}

/// An element count as MPI's int (the sizes are the same on every rank, so every rank throws alike).
inline int mpi_count(std::size_t n, const char* what) {
  MEMBANK_CHECK(n <= static_cast<std::size_t>(INT_MAX), "{}: {} elements in one message: expected at most 2^31 - 1",
                what, n);
  return static_cast<int>(n);
}

/// The engine's collectives on its communicator, counting what this rank sends to the others.
struct Group {
  MPI_Comm comm;
  int rank, ranks;
  WireStats* wire;

  /// Counts a collective that began at MPI_Wtime() = t0 and sent `bytes` to other ranks.
  void sent(std::size_t bytes, double t0) const {
    wire->bytes_sent += static_cast<std::int64_t>(bytes);
    ++wire->collectives;
    wire->seconds_communication += MPI_Wtime() - t0;
  }

  /// Every rank calls this with its own failure (or none). When any rank failed, every rank throws the
  /// same Error (OutOfMemory when the first failure was one), naming the first failing rank.
  void agree(std::exception_ptr error) const {
    const double t0 = MPI_Wtime();
    int mine = error ? rank : ranks, first = ranks;
    check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
    sent(sizeof(int) * static_cast<std::size_t>(ranks - 1), t0);
    if (first == ranks) return;
    std::string msg;
    int head[2] = {0, 0};  // message length, out of memory
    if (rank == first) {
      try {
        std::rethrow_exception(error);
      } catch (const OutOfMemory& e) {
        msg = e.what();
        head[1] = 1;
      } catch (const std::bad_alloc&) {
        msg = "out of memory (std::bad_alloc)";
        head[1] = 1;
      } catch (const std::exception& e) {
        msg = e.what();
      } catch (...) {
        msg = "an exception that is not a std::exception";
      }
      if (msg.rfind("membank: ", 0) == 0) msg.erase(0, 9);
      head[0] = static_cast<int>(std::min<std::size_t>(msg.size(), 1 << 20));
    }
    check_mpi(MPI_Bcast(head, 2, MPI_INT, first, comm), "MPI_Bcast");
    msg.resize(static_cast<std::size_t>(head[0]));
    check_mpi(MPI_Bcast(msg.data(), head[0], MPI_CHAR, first, comm), "MPI_Bcast");
    const std::string text = fmt::format("membank: rank {} of {}: {}", first, ranks, msg);
    if (head[1]) throw OutOfMemory(text);
    throw Error(text);
  }

  /// f() on this rank (its time added to *seconds when given), then agree on the outcome.
  template <class F>
  void check(F&& f, double* seconds = nullptr) const {
    const double t0 = MPI_Wtime();
    std::exception_ptr error;
    try {
      f();
    } catch (...) {
      error = std::current_exception();
    }
    if (seconds) *seconds += MPI_Wtime() - t0;
    agree(error);
  }

  // The collectives below allocate what they receive inside a check (an allocation that fails on one
  // rank makes every rank throw, none waits in a collective the failed rank never enters).

  /// Every rank's `mine` (the same count on every rank), in rank order.
  template <class T>
  std::vector<T> allgather(std::span<const T> mine) const {
    std::vector<T> all;
    check([&] { all.resize(mine.size() * static_cast<std::size_t>(ranks)); });
    const double t0 = MPI_Wtime();
    const int n = mpi_count(mine.size(), "all-gather");  // the same count on every rank: thrown alike
    check_mpi(MPI_Allgather(mine.data(), n, mpi_type<T>(), all.data(), n, mpi_type<T>(), comm), "MPI_Allgather");
    sent(mine.size() * sizeof(T) * static_cast<std::size_t>(ranks - 1), t0);
    return all;
  }
  template <class T>
  std::vector<T> allgather(const T& mine) const {
    return allgather(std::span<const T>(&mine, 1));
  }

  /// Every rank's `mine`, of counts[r] elements each (the same counts on every rank), concatenated
  /// in rank order.
  template <class T>
  std::vector<T> allgatherv(std::span<const T> mine, const std::vector<index_t>& counts) const {
    std::vector<int> cnt(static_cast<std::size_t>(ranks)), displ(static_cast<std::size_t>(ranks));
    std::vector<T> all;
    check([&] {
      std::size_t total = 0;
      for (int r = 0; r < ranks; ++r) {
        cnt[static_cast<std::size_t>(r)] =
            mpi_count(static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]), "all-gather");
        displ[static_cast<std::size_t>(r)] = mpi_count(total, "all-gather");
        total += static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]);
      }
      mpi_count(total, "all-gather");
      all.resize(total);
    });
    const double t0 = MPI_Wtime();
    check_mpi(MPI_Allgatherv(mine.data(), cnt[static_cast<std::size_t>(rank)], mpi_type<T>(), all.data(), cnt.data(),
                             displ.data(), mpi_type<T>(), comm),
              "MPI_Allgatherv");
    sent(mine.size() * sizeof(T) * static_cast<std::size_t>(ranks - 1), t0);
    return all;
  }

  /// The all-to-all of flat buffers: `send` holds scount[d] elements for each rank d, in rank order;
  /// `recv` receives what every rank sends here, in rank order, rcount[s] elements from rank s at
  /// rdispl[s] (the vectors are resized; their capacity is kept across steps). Counts travel first.
  /// The displacements are MPI ints: a total of 2^31 elements or more on any rank is one Error on
  /// every rank.
  template <class T>
  void exchange(const std::vector<T>& send, const std::vector<int>& scount, std::vector<T>& recv,
                std::vector<int>& rcount, std::vector<int>& rdispl) const {
    const auto R = static_cast<std::size_t>(ranks);
    std::vector<int> sdispl(R);
    std::size_t payload = 0;
    check([&] {
      rcount.resize(R);
      rdispl.resize(R);
      std::size_t stotal = 0;
      for (std::size_t d = 0; d < R; ++d) {
        sdispl[d] = mpi_count(stotal, "all-to-all");
        stotal += static_cast<std::size_t>(scount[d]);
        if (d != static_cast<std::size_t>(rank)) payload += static_cast<std::size_t>(scount[d]) * sizeof(T);
      }
      mpi_count(stotal, "all-to-all");
    });
    double t0 = MPI_Wtime();
    check_mpi(MPI_Alltoall(scount.data(), 1, MPI_INT, rcount.data(), 1, MPI_INT, comm), "MPI_Alltoall");
    sent(sizeof(int) * (R - 1), t0);
    check([&] {
      std::size_t rtotal = 0;
      for (std::size_t s = 0; s < R; ++s) {
        rdispl[s] = mpi_count(rtotal, "all-to-all");
        rtotal += static_cast<std::size_t>(rcount[s]);
      }
      mpi_count(rtotal, "all-to-all");
      recv.resize(rtotal);
    });
    t0 = MPI_Wtime();
    check_mpi(MPI_Alltoallv(send.data(), scount.data(), sdispl.data(), mpi_type<T>(), recv.data(), rcount.data(),
                            rdispl.data(), mpi_type<T>(), comm),
              "MPI_Alltoallv");
    sent(payload, t0);
  }
};


/// FNV-1a over bytes: the fingerprints by which ranks check that they were given the same thing.
struct Fingerprint {
  std::uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  template <class T>
  Fingerprint& operator<<(const T& v) {
    bytes(&v, sizeof v);
    return *this;
  }
};

inline std::uint64_t fingerprint(const EngineConfig& c) {
  Fingerprint f;
  f << c.k << c.tau << c.momentum << c.objective << c.negatives << c.exclude_positive << c.z_policy << c.z_fixed
    << c.z_ema << c.seed << c.normalize_features << c.unit_norm_tolerance << c.tau_plus << c.beta << c.detach_weights
    << c.kernel_t << c.gamma << std::bit_cast<std::uint64_t>(c.margin) << c.exclude_same_label << c.rounding;
  return f.h;
}

/// Error on every rank naming the first rank whose fingerprint of `what[i]` differs from rank 0's.
/// Collective, and called outside Group::check (it holds its own): the fingerprints are computed
/// first, inside a check of their own, so that no rank can throw between two collectives.
inline void check_same(const Group& g, std::span<const std::uint64_t> mine, std::span<const char* const> what) {
  const std::vector<std::uint64_t> all = g.allgather(mine);
  const std::size_t n = mine.size();
  g.check([&] {
    for (std::size_t i = 0; i < n; ++i)
      for (int r = 1; r < g.ranks; ++r)
        MEMBANK_CHECK(all[static_cast<std::size_t>(r) * n + i] == all[i], "rank {}'s {} differs from rank 0's: expected "
                      "the same on every rank", r, what[i]);
  });
}

}  // namespace membank::detail
