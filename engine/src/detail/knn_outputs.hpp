#pragma once
// knn_search's output buffers, checked the same way by the single-process and the distributed search.
#include <membank/bank.hpp>
#include <membank/memory.hpp>

#include "detail/check.hpp"

#include <fmt/format.h>

#include <span>
#include <string>
#include <utility>

namespace membank::detail {

/// scores and ids hold at least q x k entries, and overlap neither each other, the bank nor the
/// queries (the queries are not consulted when q = 0). `count` names q in the messages ("Q", "Q_r").
inline void check_search_outputs(const BankView& bank, FeaturesRef queries, index_t q, index_t k,
                                 std::span<const float> scores, std::span<const index_t> ids, const char* count) {
  const std::string product = fmt::format("{} x k", count);
  const auto need = static_cast<std::size_t>(mul_no_overflow(q, k, product.c_str()));
  MEMBANK_CHECK(scores.size() >= need, "scores has {} entries: expected at least {} x k = {} x {} = {}", scores.size(),
                count, q, k, need);
  MEMBANK_CHECK(ids.size() >= need, "ids has {} entries: expected at least {} x k = {} x {} = {}", ids.size(), count,
                q, k, need);
  const MemoryRegion out_s = MemoryRegion::contiguous(scores.data(), static_cast<std::int64_t>(need * sizeof(float)));
  const MemoryRegion out_i = MemoryRegion::contiguous(ids.data(), static_cast<std::int64_t>(need * sizeof(index_t)));
  check_no_overlap(out_s, "scores", out_i, "ids");
  for (const auto& [out, name] : {std::pair{out_s, "scores"}, std::pair{out_i, "ids"}}) {
    check_no_overlap(out, name, bank.region(), "the bank");
    if (q > 0) check_no_overlap(out, name, MemoryRegion::of_matrix(queries), "queries");
  }
}

}  // namespace membank::detail
