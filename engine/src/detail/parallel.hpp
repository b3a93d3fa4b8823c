#pragma once
// OpenMP helpers: no exception may escape a parallel region, so the first one is captured and
// rethrown on the calling thread after the region ends. Every allocation made inside a region must
// run inside ExceptionCapture::run (a std::bad_alloc escaping a region calls std::terminate);
// per-thread scratch is allocated in the region's first run() and the loop skips its work once a
// run failed. A captured std::bad_alloc is rethrown as membank::OutOfMemory.
#include <membank/error.hpp>

#include <atomic>
#include <exception>
#include <mutex>
#include <new>
#include <string>

namespace membank::detail {

/// An allocation failure as membank::OutOfMemory naming where it happened.
[[noreturn]] inline void throw_out_of_memory(const char* where) {
  throw OutOfMemory(std::string("membank: out of memory: an allocation failed (std::bad_alloc) in ") + where);
}

class ExceptionCapture {
 public:
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;  // the region's result is discarded: stop working
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  /// The first captured exception, std::bad_alloc as OutOfMemory.
  void rethrow(const char* where = "a parallel region") const {
    if (!error_) return;
    try {
      std::rethrow_exception(error_);
    } catch (const std::bad_alloc&) {
      throw_out_of_memory(where);
    }
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};  // run() skips work after a failure
};

/// f(), with a std::bad_alloc thrown on the calling thread turned into OutOfMemory naming `where`.
template <class F>
auto translate_bad_alloc(const char* where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    throw_out_of_memory(where);
  }
}

}  // namespace membank::detail
