#pragma once
// What every sampler's draw_next shares (sampler.cpp, dynamic_sampler.cpp, cluster_sampler.cpp,
// ring_sampler.cpp): a piece that fits its cursor's stream, a bound on consecutive redraws of
// excluded ids, and the redraws themselves.
#include <membank/error.hpp>
#include <membank/sampler.hpp>

#include "detail/philox.hpp"

#include <cstddef>
#include <cstdint>

namespace membank::detail {

inline constexpr int kMaxConsecutiveRejections = 1000000;

/// The draws of a piece must fit in what is left of its cursor's stream.
inline void check_piece(const DrawCursor& c, std::size_t draws, std::size_t log_pn_size) {
  MEMBANK_CHECK(draws == log_pn_size, "a piece of {} draws with {} log P_n slots: expected as many of each",
                draws, log_pn_size);
  MEMBANK_CHECK(c.drawn >= 0 && c.drawn <= c.total &&
                    static_cast<std::uint64_t>(draws) <= static_cast<std::uint64_t>(c.total - c.drawn),
                "a piece of {} draws after {} of a stream of {}: expected at most {}", draws, c.drawn, c.total,
                c.total - c.drawn);
}

/// One more rejection of the same draw; throws once there have been too many in a row.
inline void count_rejection(int& rejections) {
  MEMBANK_CHECK(++rejections < kMaxConsecutiveRejections,
                "{} consecutive noise draws hit excluded ids: the excluded ids carry almost all of the "
                "sampler's mass", rejections);
}

/// Redraws every draw of the piece that the cursor's exclusion holds: the r-th redraw of the stream
/// takes block first + r, resolved by redraw(block, id, log_pn). Draws excluded 10^6 times in a row
/// throw (count_rejection).
template <class Redraw>
void redraw_excluded(DrawCursor& c, std::uint64_t first, std::span<index_t> ids, std::span<float> log_pn,
                     Redraw&& redraw) {
  if (c.excluded.empty()) return;
  Stream stream(c.key, first + c.redraws);
  for (std::size_t t = 0; t < ids.size(); ++t) {
    for (int rejections = 0; c.excluded.contains(ids[t]);) {
      count_rejection(rejections);
      ++c.redraws;
      redraw(stream.next(), ids[t], log_pn[t]);
    }
  }
}

}  // namespace membank::detail
