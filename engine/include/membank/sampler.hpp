#pragma once
// Noise samplers: the distribution P_n that NCE draws its negatives from.
//
// A sampler over N instances draws ids j with probability P_n(j) and reports P_n(j) exactly; the
// objectives take P_n(j) from here and never assume 1/N.
//
// Randomness is counter-based (Philox4x32-10): the draws of a stream are a pure function of
// (seed, step, stream row, position), so they are identical for any thread count and a resumed
// run draws exactly what an uninterrupted one would have.
//
// Thread safety: every const method may run concurrently from any number of threads. Uniform and
// alias samplers are immutable once built; a DynamicSampler (dynamic_sampler.hpp) changes only through
// its non-const methods, which must not run concurrently with anything.
#include <membank/types.hpp>

#include <memory>
#include <span>
#include <string>
#include <vector>

namespace membank {

/// uniform: P_n = 1/N. alias: fixed caller weights. dynamic: weights that change during training.
/// cluster: a query-dependent proposal q(j|f) over k-means clusters of the bank.
enum class SamplerKind { uniform, alias, dynamic, cluster };
std::string to_string(SamplerKind kind);
/// "uniform", "alias", "dynamic" or "cluster"; throws Error otherwise.
SamplerKind sampler_kind_from_string(const std::string& s);

/// Names one random stream: draws for `row` (a query of the batch, or 0 for shared negatives) at
/// training step `step` of a run seeded with `seed`. `purpose` separates independent uses.
struct StreamKey {
  std::uint64_t seed = 0;
  std::int64_t step = 0;
  std::uint32_t row = 0;
  std::uint32_t purpose = 0;
};

/// What a draw must avoid: a sorted list of ids, and (when `classes` is set) every id whose class
/// classes[j] equals `cls` (the engine's exclude_same_label).
struct Exclusion {
  std::span<const index_t> ids;
  const std::int32_t* classes = nullptr;  ///< N class indices, or null
  std::int32_t cls = 0;
  bool empty() const { return ids.empty() && classes == nullptr; }
  bool contains(index_t j) const;
};

/// One stream of draws taken a piece at a time (NoiseSampler::draw_next): the pieces of a cursor, in
/// order, hold exactly the draws that one draw() of all of them at once gives. The engine's kernel
/// draws a block of negatives just before it requests their rows, so that drawing overlaps reading.
struct DrawCursor {
  StreamKey key;
  Exclusion excluded;  ///< what the draws avoid (its ids and classes must outlive the cursor)
  index_t total = 0;   ///< draws the stream gives in all
  index_t drawn = 0;   ///< draws given so far
  // The sampler's own bookkeeping, zero at the start:
  std::uint64_t next_block = 0;  ///< uniform: the stream's next unused Philox block
  std::uint64_t spare = 0;       ///< uniform: the unused second half of the last block
  bool has_spare = false;
  std::uint64_t redraws = 0;     ///< alias: redraws so far (they take blocks total, total + 1, ...)
};

class NoiseSampler {
 public:
  virtual ~NoiseSampler() = default;
  virtual SamplerKind kind() const = 0;
  /// N, the number of instances.
  index_t size() const { return n_; }
  /// P_n(j), the probability with which draw() returns j (the alias table realises it to within
  /// about 2^-53 / N absolute: double thresholds, 53-bit coins). Throws Error if j is out of range.
  virtual double prob(index_t j) const = 0;
  /// Every P_n(j), j = 0..N-1 (O(N) memory).
  virtual std::vector<double> probs() const = 0;
  /// log_pn[k] = log P_n(ids[k]) in fp32, for ids already checked to lie in [0, N); -inf for an id
  /// the sampler never draws. One virtual call a batch.
  virtual void lookup(std::span<const index_t> ids, std::span<float> log_pn) const = 0;

  /// Fill ids[0..K) with independent draws from P_n restricted to the complement of `excluded`
  /// (empty for plain draws): a draw that hits an excluded id is redrawn
  /// from the same stream. log_pn[k] receives log P_n(ids[k]) (unconditional, fp32: what the
  /// objectives consume, so the hot loop takes no logarithm).
  /// Preconditions (checked by the caller, Engine): ids.size() == log_pn.size(); the excluded ids carry
  /// less than all of the mass. Throws Error if 10^6 consecutive draws all hit excluded ids.
  /// Cost O(K) expected.
  void draw(const StreamKey& key, const Exclusion& excluded, std::span<index_t> ids,
            std::span<float> log_pn) const {
    DrawCursor cursor{key, excluded, static_cast<index_t>(ids.size())};
    draw_next(cursor, ids, log_pn);
  }
  /// The next ids.size() draws of the cursor's stream (the same preconditions; throws Error, drawing
  /// nothing, if they would pass cursor.total). One virtual call per piece, a templated loop inside.
  virtual void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const = 0;
  /// The same with a sorted list of excluded ids only.
  void draw(const StreamKey& key, std::span<const index_t> excluded, std::span<index_t> ids,
            std::span<float> log_pn) const {
    draw(key, Exclusion{excluded}, ids, log_pn);
  }

 protected:
  explicit NoiseSampler(index_t n) : n_(n) {}
  index_t n_;
};

/// P_n(j) = 1/N.
class UniformSampler final : public NoiseSampler {
 public:
  /// Throws Error if n < 1.
  explicit UniformSampler(index_t n);
  SamplerKind kind() const override { return SamplerKind::uniform; }
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;
};

/// P_n(j) = w_j / sum(w), drawn in O(1) through a Vose alias table built in O(N).
/// Memory: 24 bytes per instance in the table (threshold, alias, and both cells' log
/// probabilities, so a draw and its probability cost one cache line) plus the normalised weights
/// in double (8 bytes per instance).
class AliasSampler final : public NoiseSampler {
 public:
  /// Throws Error (naming the first bad index and value) if weights is empty, has more than
  /// 2^32 - 1 entries, or holds a negative, NaN or infinite weight, or if all weights are zero.
  explicit AliasSampler(std::span<const double> weights);
  SamplerKind kind() const override { return SamplerKind::alias; }
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;
  /// The weights the sampler was built from, normalised to sum 1 (double precision).
  const std::vector<double>& normalized_weights() const { return p_; }
  /// The weights exactly as the caller gave them: rebuilding from them gives a bit-identical table
  /// (what snapshots store).
  const std::vector<double>& weights() const { return w_; }

  struct Cell {
    double threshold;     ///< keep this cell when a uniform u in [0,1) (53 bits) falls below it
    std::uint32_t alias;  ///< the other cell's id
    float log_p_self;     ///< log P_n(cell)
    float log_p_alias;    ///< log P_n(alias)
  };

 private:
  std::vector<Cell> cells_;
  std::vector<double> p_;
  std::vector<double> w_;
};

}  // namespace membank
