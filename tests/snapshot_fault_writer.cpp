// snapshot_fault_writer: a helper executable of test_snapshot_safety.cpp. It saves a snapshot while
// the disk "fills up" under it, a failure no up-front check can foresee (another process filled the
// disk meanwhile, an I/O error): this executable defines write/pwrite/pwrite64, which the dynamic
// linker resolves HDF5's calls to before libc's, and fails with ENOSPC every write to a file whose
// name holds ".tmp-" (save_snapshot's temporaries) once FAULT_BYTES bytes have gone to such files.
//
//   snapshot_fault_writer PATH N DIM FAULT_BYTES [DEFLATE|hang]
//       Builds an N x DIM engine (random unit rows, seed 5), saves it to PATH. With "hang", the
//       write that would fail blocks forever instead: a writer stuck mid-save, its temporary on disk,
//       for the test to SIGKILL (a writer killed mid-save) or to keep alive (a live writer).
// Exit status: 0 saved; 2 save_snapshot threw membank::Error ("error: <message>" on stderr); 64 usage.
// Whatever happens inside HDF5, the process must end with one of these, never a signal.
#include <membank/engine.hpp>
#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

namespace {

std::atomic<long long> budget{-1};  // bytes still allowed to temporaries; < 0: no limit yet
bool hang = false;

bool fails(int fd, std::size_t count) {
  if (fd < 3 || budget.load() < 0) return false;
  char link[64], target[4096];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t len = ::readlink(link, target, sizeof target - 1);
  if (len <= 0) return false;
  target[len] = '\0';
  if (std::strstr(target, ".tmp-") == nullptr) return false;
  if (budget.fetch_sub(static_cast<long long>(count)) >= static_cast<long long>(count)) return false;
  budget.store(0);
  if (hang)
    for (;;) ::pause();
  errno = ENOSPC;
  return true;
}

}  // namespace

extern "C" ssize_t write(int fd, const void* buf, size_t count) {
  if (fails(fd, count)) return -1;
  return ::syscall(SYS_write, fd, buf, count);
}
extern "C" ssize_t pwrite(int fd, const void* buf, size_t count, off_t offset) {
  if (fails(fd, count)) return -1;
  return ::syscall(SYS_pwrite64, fd, buf, count, offset);
}
extern "C" ssize_t pwrite64(int fd, const void* buf, size_t count, off_t offset) {
  if (fails(fd, count)) return -1;
  return ::syscall(SYS_pwrite64, fd, buf, count, offset);
}

// Under LeakSanitizer: HDF5 1.10 keeps one allocation (264 bytes) of a file whose creation failed
// until the process exits; it is the library's, and this process's exit status is what the tests
// check. The suppression is ignored in builds without LeakSanitizer.
extern "C" const char* __lsan_default_suppressions() { return "leak:libhdf5"; }

int main(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::fprintf(stderr, "usage: snapshot_fault_writer PATH N DIM FAULT_BYTES [DEFLATE]\n");
    return 64;
  }
  try {
    const membank::index_t n = std::atoll(argv[2]), dim = std::atoll(argv[3]);
    membank::EngineConfig cfg;
    cfg.k = 16;
    membank::Engine engine(membank::Bank(n, dim, 5), std::make_unique<membank::UniformSampler>(n), cfg);
    hang = argc == 6 && std::string(argv[5]) == "hang";
    budget.store(std::atoll(argv[4]));
    membank::save_snapshot(argv[1], engine, membank::SnapshotOptions{argc == 6 && !hang ? std::atoi(argv[5]) : 0});
  } catch (const membank::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return 0;
}
