// Safety of save_snapshot's path (snapshot.hpp): what it refuses before any file exists (a bank row
// that is not unit norm, a destination that cannot hold the file), a write that fails inside HDF5
// part way (the process still ends with the error, never a signal), and the temporaries that killed
// writers leave (removed by the next save once their writer is gone; never a live writer's).
// The failing and stuck writers are snapshot_fault_writer (SNAPSHOT_FAULT_WRITER) processes.
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include "scratch.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

using mbtest::file_bytes;
using mbtest::ScratchDir;

namespace {

namespace fs = std::filesystem;
using membank::Engine;
using membank::Error;
using membank::index_t;

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

Engine make_engine(index_t n, index_t dim, std::uint64_t seed = 3) {
  membank::EngineConfig cfg;
  cfg.k = 16;
  return Engine(membank::Bank(n, dim, seed), std::make_unique<membank::UniformSampler>(n), cfg);
}

/// Starts argv with stderr into `err_file`; returns the pid.
pid_t start(const std::vector<std::string>& argv, const std::string& err_file) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

int wait_for(pid_t pid) {
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return st;
}

/// The temporaries (".<name>.tmp-<pid>-...") in `dir` written by process `pid`.
std::vector<std::string> temps_of(const fs::path& dir, const std::string& name, pid_t pid) {
  std::vector<std::string> out;
  const std::string prefix = fmt::format(".{}.tmp-{}-", name, pid);
  for (const auto& f : names_in(dir))
    if (f.rfind(prefix, 0) == 0) out.push_back(f);
  return out;
}

/// Waits (up to a minute) until `pid` has a temporary in `dir`: a writer stuck mid-save.
std::string wait_for_temp(const fs::path& dir, const std::string& name, pid_t pid) {
  for (int i = 0; i < 6000; ++i) {
    const auto t = temps_of(dir, name, pid);
    if (!t.empty()) return t.front();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL("the stuck writer never created its temporary");
  return {};
}

}  // namespace

TEST_CASE("snapshot safety: a bank holding a non-unit or non-finite row is refused before any file is written") {
  // Guards the order of the save path: the rows are checked before the temporary is created, so a
  // corrupt bank (here its memory written behind the bank's back) never reaches the disk, and the
  // snapshot already at the destination keeps its bytes.
  ScratchDir tmp("safety", "nonunit");
  Engine e = make_engine(3000, 24);
  const std::string keep = tmp / "keep.h5";
  membank::save_snapshot(keep, e);
  const std::string before = file_bytes(keep);
  const std::set<std::string> files_before = names_in(tmp.dir);
  float* row = const_cast<float*>(e.bank().view().row(1234));
  const std::vector<float> saved(row, row + 24);

  const auto refused = [&](const std::string& what) {
    CAPTURE(what);
    for (const std::string& dest : {keep, tmp / "new.h5"}) {
      std::string msg;
      try {
        membank::save_snapshot(dest, e);
      } catch (const Error& err) {
        msg = err.what();
      }
      CAPTURE(msg);
      CHECK(msg.find("row 1234") != std::string::npos);
      CHECK(msg.find(dest) != std::string::npos);
      CHECK(names_in(tmp.dir) == files_before);  // no temporary, no new file
      CHECK(file_bytes(keep) == before);
    }
  };
  // Its largest coordinate scaled by 1.01: the squared norm grows by 0.02 x^2 >= 0.02 / 24, well
  // outside the 1e-4 tolerance whatever the row holds.
  const auto largest = std::max_element(row, row + 24, [](float a, float b) { return std::abs(a) < std::abs(b); });
  *largest *= 1.01f;
  double sq = 0.0;
  for (int c = 0; c < 24; ++c) sq += static_cast<double>(row[c]) * row[c];
  REQUIRE(std::abs(std::sqrt(sq) - 1.0) > 1e-4);
  refused("scaled row");
  std::copy(saved.begin(), saved.end(), row);
  row[0] = std::numeric_limits<float>::quiet_NaN();
  refused("NaN row");
  std::copy(saved.begin(), saved.end(), row);
  // Restored, the same engine saves and loads again.
  membank::save_snapshot(tmp / "new.h5", e);
  CHECK(membank::verify_snapshot(tmp / "new.h5").empty());
}

TEST_CASE("snapshot safety: check_snapshot_destination refuses what cannot be written, ResourceError for space") {
  // Guards the up-front destination check that save_snapshot and long jobs (membank train) run:
  // a missing directory, a directory as the path, and a file-size limit below the estimated size
  // each throw naming the path; the size limit is a ResourceError (exit status 3 of the command line).
  ScratchDir tmp("safety", "dest");
  CHECK_NOTHROW(membank::check_snapshot_destination(tmp / "ok.h5", 1000, 16));
  CHECK_THROWS_WITH_AS(membank::check_snapshot_destination(tmp / "none/x.h5", 1000, 16),
                       doctest::Contains("does not exist"), Error);
  CHECK_THROWS_WITH_AS(membank::check_snapshot_destination(tmp.dir.string(), 1000, 16),
                       doctest::Contains("is a directory"), Error);
  CHECK(membank::snapshot_size_estimate(1000, 16) >= 1000u * 16u * 4u);
  CHECK_THROWS_AS(membank::snapshot_size_estimate(0, 16), Error);
  // RLIMIT_FSIZE in a child process (the limit would also bind this process's own output files).
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    rlimit rl{};
    ::getrlimit(RLIMIT_FSIZE, &rl);
    rl.rlim_cur = 100000;
    ::setrlimit(RLIMIT_FSIZE, &rl);
    int code = 10;
    try {
      membank::check_snapshot_destination(tmp / "big.h5", 100000, 16);  // about 6.4 MB
    } catch (const membank::ResourceError& err) {
      code = std::string(err.what()).find("big.h5") != std::string::npos ? 0 : 11;
    } catch (...) {
      code = 12;
    }
    ::_exit(code);
  }
  const int st = wait_for(pid);
  CHECK(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 0);
}

TEST_CASE("snapshot safety: a write that fails inside HDF5 part way throws and the process exits with the error") {
  // Guards the containment of HDF5 failures no up-front check can foresee (the disk fills up
  // meanwhile, an I/O error): snapshot_fault_writer fails every write to its temporary with ENOSPC
  // after B bytes, for 41 values of B from 0 to the whole file, with and without deflate. Each writer
  // must end with status 0 (B was enough) or 2 with the error naming the destination -- never a
  // signal: HDF5 1.10 crashed in its exit-time clean-up on a file whose write or flush had failed --
  // with the destination untouched (or, on success, replaced by a sound snapshot) and no temporary
  // left. The sweep must include failed chunk writes and a failed flush (the case that broke HDF5's
  // cache), or it guards nothing.
  ScratchDir tmp("safety", "fault");
  const std::string dest = tmp / "bank.h5", err = tmp / "err.txt";
  int write_failures = 0, flush_failures = 0;
  for (const std::string deflate : {"0", "4"}) {
    CAPTURE(deflate);
    // The size of the whole file: what an unlimited writer writes.
    fs::remove(dest);
    REQUIRE(wait_for(start({SNAPSHOT_FAULT_WRITER, dest, "20000", "32", "100000000000", deflate}, err)) == 0);
    const auto whole = static_cast<long long>(fs::file_size(dest));
    membank::save_snapshot(dest, make_engine(2000, 32, 9));  // a different, smaller snapshot to keep
    std::string before = file_bytes(dest);
    for (int i = 0; i <= 40; ++i) {
      const long long budget = whole * i / 40;
      CAPTURE(budget);
      const int st = wait_for(start({SNAPSHOT_FAULT_WRITER, dest, "20000", "32", std::to_string(budget), deflate}, err));
      const std::string msg = file_bytes(err);
      CAPTURE(msg);
      REQUIRE_MESSAGE(WIFEXITED(st), "killed by signal ", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
      CHECK(names_in(tmp.dir) == std::set<std::string>{"bank.h5", "err.txt"});
      if (WEXITSTATUS(st) == 0) {  // enough room after all: a complete, sound snapshot
        CHECK(membank::verify_snapshot(dest).empty());
        CHECK(membank::read_snapshot_info(dest).n == 20000);
        membank::save_snapshot(dest, make_engine(2000, 32, 9));  // back to the snapshot to keep
        before = file_bytes(dest);
        continue;
      }
      CHECK(WEXITSTATUS(st) == 2);
      CHECK(msg.find("error: ") != std::string::npos);
      CHECK(msg.find(dest) != std::string::npos);
      CHECK(file_bytes(dest) == before);
      write_failures += msg.find("cannot write") != std::string::npos;
      flush_failures += msg.find("cannot flush") != std::string::npos;
    }
  }
  MESSAGE(fmt::format("failed writes: {}, failed flushes: {}", write_failures, flush_failures));
  CHECK(write_failures > 0);
  CHECK(flush_failures > 0);
}

TEST_CASE("snapshot safety: the next save removes a killed writer's temporary, never a live writer's") {
  // Guards the clean-up of temporaries: two writers get stuck mid-save (their temporaries on disk);
  // one is SIGKILLed. A save into the same directory (another destination name) removes the killed
  // writer's temporary and keeps the live writer's, and keeps one that names another host. Once the
  // live writer is killed too, the next save removes its temporary.
  ScratchDir tmp("safety", "stale");
  const auto stuck_writer = [&](const std::string& name) {
    const pid_t pid = start({SNAPSHOT_FAULT_WRITER, tmp / name, "20000", "32", "100000", "hang"},
                            tmp / (name + ".err"));
    return std::make_pair(pid, wait_for_temp(tmp.dir, name, pid));
  };
  const auto [dead_pid, dead_temp] = stuck_writer("a.h5");
  const auto [live_pid, live_temp] = stuck_writer("b.h5");
  ::kill(dead_pid, SIGKILL);
  wait_for(dead_pid);
  REQUIRE(fs::exists(tmp.dir / dead_temp));
  // The dead writer's temporary as another host would have named it: "-h<8 hex>-" changed.
  std::string foreign = dead_temp;
  const auto h = foreign.find("-h");
  REQUIRE(h != std::string::npos);
  foreign[h + 2] = foreign[h + 2] == '0' ? '1' : '0';
  fs::copy_file(tmp.dir / dead_temp, tmp.dir / foreign);

  membank::save_snapshot(tmp / "c.h5", make_engine(1000, 16));
  const std::set<std::string> after = names_in(tmp.dir);
  CAPTURE(fmt::format("{}", fmt::join(after, " ")));
  CHECK(after.count(dead_temp) == 0);  // its writer is gone
  CHECK(after.count(live_temp) == 1);  // its writer is still saving
  CHECK(after.count(foreign) == 1);    // another host's: its writer cannot be checked from here
  CHECK(after.count("c.h5") == 1);
  CHECK(temps_of(tmp.dir, "c.h5", ::getpid()).empty());

  ::kill(live_pid, SIGKILL);
  wait_for(live_pid);
  membank::save_snapshot(tmp / "c.h5", make_engine(1000, 16));
  CHECK(names_in(tmp.dir).count(live_temp) == 0);
  CHECK(names_in(tmp.dir).count(foreign) == 1);
}
