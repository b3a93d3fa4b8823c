#pragma once
// Counter-based random streams on Random123's Philox4x32-10 (Salmon et al., SC'11).
// A stream is identified by a StreamKey; block b of the stream is philox(counter = {b, row,
// step_lo, step_hi | purpose << 24}, key = seed). Pure function of its inputs: no state, no locks.
// Stream gives the blocks one at a time (Random123); StreamCounter many at once (the kernels'
// vectorised Philox, equal word for word).
#include <membank/sampler.hpp>

#include "kernels/kernels.hpp"

#include <Random123/philox.h>

#include <cstdint>

namespace membank::detail {

enum Purpose : std::uint32_t {
  purpose_bank_init = 1,
  purpose_negatives = 2,
  purpose_shared_negatives = 3,
  purpose_stochastic_rounding = 4,
};

/// The key and counter words of a stream: block b is philox(counter = {b, row, step_lo, step_hi |
/// purpose << 24}, key = seed).
class StreamCounter {
 public:
  explicit StreamCounter(const StreamKey& key)
      : key_{static_cast<std::uint32_t>(key.seed), static_cast<std::uint32_t>(key.seed >> 32)},
        ctr_{0u, key.row, static_cast<std::uint32_t>(static_cast<std::uint64_t>(key.step)),
             static_cast<std::uint32_t>((static_cast<std::uint64_t>(key.step) >> 32) & 0xFFFFFFu) |
                 (key.purpose << 24)} {}
  r123::Philox4x32::key_type key() const { return {{key_[0], key_[1]}}; }
  r123::Philox4x32::ctr_type counter(std::uint64_t block) const {
    return {{static_cast<std::uint32_t>(block), ctr_[1], ctr_[2], ctr_[3]}};
  }
  /// Blocks first .. first + n - 1 at once (the vectorised kernel): word w of block first + j into
  /// out[w n + j], the same words as Stream gives.
  void blocks(const kernels::Table& kt, std::uint64_t first, std::int64_t n, std::uint32_t* out) const {
    const std::uint32_t ctr[4] = {static_cast<std::uint32_t>(first), ctr_[1], ctr_[2], ctr_[3]};
    kt.philox(key_, ctr, n, out);
  }

 private:
  std::uint32_t key_[2];
  std::uint32_t ctr_[4];
};

/// A stream's blocks one at a time, from block `first` on.
class Stream {
 public:
  explicit Stream(const StreamKey& key, std::uint64_t first = 0) {
    const StreamCounter c(key);
    key_ = c.key();
    ctr_ = c.counter(first);
  }
  /// Next 128 random bits as four 32-bit words.
  r123::Philox4x32::ctr_type next() {
    auto out = gen_(ctr_, key_);
    ++ctr_.v[0];
    return out;
  }

 private:
  r123::Philox4x32 gen_;
  r123::Philox4x32::ctr_type ctr_;
  r123::Philox4x32::key_type key_;
};

inline std::uint64_t join64(std::uint32_t hi, std::uint32_t lo) {
  return (static_cast<std::uint64_t>(hi) << 32) | lo;
}
/// floor(u * n / 2^64): an index in [0, n) with bias at most n / 2^64 (Lemire's multiply-shift).
__extension__ typedef unsigned __int128 uint128_t;
inline std::uint64_t scale_to(std::uint64_t u, std::uint64_t n) {
  return static_cast<std::uint64_t>((static_cast<uint128_t>(u) * n) >> 64);
}
/// A double in (0, 1] with 53 random bits (safe for log).
inline double unit_double_open0(std::uint64_t u) {
  return (static_cast<double>(u >> 11) + 1.0) * 0x1.0p-53;
}

}  // namespace membank::detail
