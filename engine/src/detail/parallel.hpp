#pragma once
// OpenMP helpers: no exception may escape a parallel region, so the first one is captured and
// rethrown on the calling thread after the region ends.
#include <exception>
#include <mutex>

namespace membank::detail {

class ExceptionCapture {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace membank::detail
