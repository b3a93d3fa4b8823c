#pragma once
// DynamicSampler: a noise distribution whose weights change during training, with the exact P_n
// at every step.
//
// P_n(j) = w_j / T, T = sum of the block masses. Rows are cut into blocks of kBlock consecutive ids;
// each block keeps a Vose alias table over its rows' weights and its mass M_b (summed in row order),
// and a top-level alias table over the block masses picks a block (T summed in block order). A draw
// is two alias look-ups from one Philox block: the small top table stays in cache, the row's cell
// costs one cache line (prefetched a few draws ahead, as AliasSampler does).
//
// set_weights() rebuilds only the touched blocks and then the top level once: O(kBlock) per changed
// row plus O(N / kBlock) per call (a plain sum tree would make every draw ~log2 N dependent cache
// misses; see docs/samplers.md for the measured figures). Every table is a pure function of the
// current weights: a sampler rebuilt from weights() is bit-identical to one updated step by step,
// which is what snapshots rely on.
//
// The engine-driven mode (Drive::loss_ema): after each step the engine passes every query's own loss
// to observe(), which keeps a per-row exponential moving average of the loss of row j as a positive,
// ema_j <- alpha ema_j + (1 - alpha) loss (the first loss seen sets ema_j), and re-weights the
// batch's rows to w_j = floor + max(ema_j, 0). Rows never seen keep their initial weight. The EMA
// array is part of the sampler's state (snapshots carry it).
//
// Memory: 40 bytes per row (a 32-byte cell and the weight), 8 more with the loss_ema drive (the
// average), 24 bytes per block.
//
// Thread safety: the const methods may run concurrently with each other; set_weights() and observe()
// may not run concurrently with anything (the Engine waits for its prefetch thread first).
#include <membank/sampler.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace membank {

class DynamicSampler final : public NoiseSampler {
 public:
  /// Rows per block: a block's rebuild touches 128 weights, the top level has N / 128 entries
  /// (10,000 at N = 1.28 M: 160 KB, cache resident).
  static constexpr index_t kBlock = 128;

  /// How the engine re-weights rows after a step (see the header comment).
  enum class Drive { none, loss_ema };
  struct Params {
    Drive drive = Drive::none;
    double alpha = 0.9;   ///< loss_ema: weight of the old average; in [0, 1)
    double floor = 0.1;   ///< loss_ema: w_j = floor + max(ema_j, 0); finite, > 0 (every seen row stays drawable)
  };

  /// Throws Error (naming the first bad index and value, or the bad parameter) if weights is empty,
  /// has 2^32 or more entries, holds a negative, NaN or infinite weight, or sums to zero or to
  /// infinity; or if alpha or floor is out of range.
  DynamicSampler(std::span<const double> weights, Params params);
  /// Weights only: the drive none.
  explicit DynamicSampler(std::span<const double> weights);
  /// A sampler in a saved state (snapshots): the weights, the per-row loss EMA (N values; NaN for a
  /// row never seen, or empty when the drive is none) and the parameters. The same checks, and the
  /// EMA must be N long with finite or NaN values.
  DynamicSampler(std::span<const double> weights, Params params, std::span<const double> ema);

  SamplerKind kind() const override { return SamplerKind::dynamic; }
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;

  /// w[ids[k]] = values[k], in order (a repeated id takes its last value). Checks everything first
  /// (ids in range, values finite and >= 0, the new sum positive and finite) and throws Error naming
  /// the first bad index and value, changing nothing. Cost O(kBlock) per distinct touched block plus
  /// O(N / kBlock).
  void set_weights(std::span<const index_t> ids, std::span<const double> values);

  /// The engine-driven update after a step: ids[b] was a positive with loss losses[b]. Updates the
  /// EMA of each row in batch order, then re-weights the rows (one set_weights). Does nothing when
  /// the drive is none. Non-finite losses are refused (Error, nothing changed).
  void observe(std::span<const index_t> ids, std::span<const double> losses);

  /// The current weights (what set_weights wrote; rebuilding from them gives a bit-identical sampler).
  const std::vector<double>& weights() const { return w_; }
  /// T = sum of the weights, summed per block in row order and then over blocks in block order.
  double total() const { return total_; }
  const Params& params() const { return params_; }
  /// The per-row loss EMA (NaN: never seen); empty when the drive is none.
  const std::vector<double>& ema() const { return ema_; }
  /// A 64-bit hash of the weights' bits and the parameters (cheap agreement checks across ranks).
  std::uint64_t fingerprint() const;

  /// One row's cell of its block's alias table (32 bytes: a draw reads one cache line).
  struct alignas(32) Cell {
    double threshold;      ///< keep this row when the coin falls below it
    std::uint32_t alias;   ///< the other row's global id
    std::uint32_t unused;
    double log_w_self;     ///< log w of this row
    double log_w_alias;    ///< log w of the alias row
  };
  struct TopCell {
    double threshold;
    std::uint32_t alias;   ///< the other block
  };

 private:
  index_t blocks() const { return static_cast<index_t>(mass_.size()); }
  /// Rebuild block b's alias table and mass from w_.
  void build_block(index_t b);
  /// Rebuild T and the top-level table from the block masses.
  void build_top();

  Params params_;
  std::vector<double> w_;
  std::vector<double> ema_;
  std::vector<Cell> cells_;
  std::vector<double> mass_;
  std::vector<TopCell> top_;
  double total_ = 0.0;
  double log_total_ = 0.0;
};

/// "none" or "loss_ema".
std::string to_string(DynamicSampler::Drive drive);
/// Parse the names printed by to_string; throws Error naming the value and the choices otherwise.
DynamicSampler::Drive dynamic_drive_from_string(const std::string& s);

}  // namespace membank
