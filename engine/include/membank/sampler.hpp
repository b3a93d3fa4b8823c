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

#include <cstddef>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace membank {

struct BankView;

/// uniform: P_n = 1/N. alias: fixed caller weights. dynamic: weights that change during training.
/// cluster: a query-dependent proposal q(j|f) over k-means clusters of the bank. ring: a biased one,
/// uniform over a ring of the query's neighbours (ring_sampler.hpp).
enum class SamplerKind { uniform, alias, dynamic, cluster, ring };
std::string to_string(SamplerKind kind);
/// "uniform", "alias", "dynamic", "cluster" or "ring"; throws Error otherwise.
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

/// A query-dependent sampler's distributions q(. | f_i) for the rows of one batch, made by
/// NoiseSampler::condition() from the batch's features: opaque to the caller, who hands row i's
/// QueryRef to the calls that take one.
class Conditioned {
 public:
  virtual ~Conditioned() = default;
};

/// Which distribution a call uses: the sampler's P_n (null batch), or q(. | f_row) of a conditioned
/// batch.
struct QueryRef {
  const Conditioned* batch = nullptr;
  index_t row = 0;
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
  QueryRef query{};              ///< the query's distribution (query-dependent samplers); P_n otherwise
};

class NoiseSampler {
 public:
  virtual ~NoiseSampler() = default;
  virtual SamplerKind kind() const = 0;
  /// N, the number of instances.
  index_t size() const { return n_; }
  /// P_n(j), the probability with which draw() returns j (the alias table realises it to within
  /// about 2^-53 / N absolute: 53-bit thresholds and coins; the one cell left unpaired by the table's
  /// construction also takes what the P_n, rounded, miss 1 by: about 2^-53). Throws Error if j is out
  /// of range.
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
  /// Whether the distribution depends on the query: q(j | f) (ClusterSampler). The engine then
  /// conditions the sampler on each step's features and passes each query's QueryRef to the draws,
  /// lookups and probabilities, which use q(j | f) wherever a static sampler's use P_n(j).
  virtual bool query_dependent() const { return false; }
  /// Whether the draws are biased: q is 0 on rows a sum over the bank needs (RingSampler), so no
  /// importance weight makes the estimates over the draws unbiased. The engine weighs such draws as
  /// uniform ones and refuses them for the objectives that need a valid P_n unless
  /// EngineConfig::allow_biased_sampler is set.
  virtual bool biased() const { return false; }
  /// A hint to the engine's per-sample step: make every draw of a chunk of queries before reading
  /// their rows, instead of each block of draws just before its rows. For a sampler whose draws read
  /// large tables of their own (ClusterSampler's member table): those stay in cache while a chunk is
  /// drawn, and their reads do not compete with the rows' for the core's line requests. The draws
  /// and every result are the same either way.
  virtual bool draws_before_rows() const { return false; }
  /// q(. | f_i) for the B rows of f (B x D unit rows, `stride` floats apart), and in row B their mean
  /// (1/B) sum_i q(. | f_i): one distribution for negatives the batch shares. `bank` is the engine's
  /// (a sampler that ranks its rows reads it during the call). Query-dependent samplers only (Error
  /// otherwise). `f` is read during the call only.
  virtual std::unique_ptr<Conditioned> condition(const BankView& bank, const float* f, index_t stride, index_t batch,
                                                 index_t dim) const;
  /// condition() for a step under exclude_same_label: classes[j] is row j's class (N of them) and
  /// query_classes[i] query i's (B of them). A sampler whose q can leave each query's label out by
  /// itself overrides it (RingSampler: each ring ranks the other classes' rows only); by default it
  /// is condition(), and the draws are conditioned on the label's mass (class_mass_given) instead.
  virtual std::unique_ptr<Conditioned> condition_excluding(const BankView& bank, const float* f, index_t stride,
                                                           index_t batch, index_t dim, const std::int32_t* classes,
                                                           std::span<const std::int32_t> query_classes) const {
    (void)classes;
    (void)query_classes;
    return condition(bank, f, stride, batch, dim);
  }
  /// q(j | query), or P_n(j) for a null query. Throws Error if j is out of range.
  double prob_for(index_t j, QueryRef query) const { return query.batch ? prob_given(j, query) : prob(j); }
  /// exclude_same_label under a query-dependent q: out[i] = the mass of class query_classes[i] under
  /// q(. | f_i), row i of `batch` (one of this sampler's), for classes[j] in [0, n_classes) the class
  /// of each of the N rows. Query-dependent samplers that support it (ClusterSampler); Error otherwise.
  virtual void class_mass_given(const Conditioned& batch, const std::int32_t* classes, index_t n_classes,
                                std::span<const std::int32_t> query_classes, std::span<double> out) const;
  /// lookup() under q(. | query) (P_n for a null query).
  void lookup_for(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const {
    if (query.batch)
      lookup_given(query, ids, log_pn);
    else
      lookup(ids, log_pn);
  }
  /// The same with a sorted list of excluded ids only.
  void draw(const StreamKey& key, std::span<const index_t> excluded, std::span<index_t> ids,
            std::span<float> log_pn) const {
    draw(key, Exclusion{excluded}, ids, log_pn);
  }

 protected:
  explicit NoiseSampler(index_t n) : n_(n) {}
  /// A query-dependent sampler's q(j | query) and lookups (query.batch is one of its own).
  virtual double prob_given(index_t j, QueryRef query) const;
  virtual void lookup_given(QueryRef query, std::span<const index_t> ids, std::span<float> log_pn) const;
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

namespace detail {

/// Storage of at least `bytes`; from 2 MiB on, 2 MiB-aligned and advised for transparent huge pages.
/// Throws std::bad_alloc.
void* allocate_large(std::size_t bytes);
void free_large(void* p) noexcept;

/// The allocator of the alias sampler's arrays. Two things make the table fast to build and to
/// read: resize() default-initialises (no zeroing pass: the constructor's parallel pass touches each
/// page first), and an array of 2 MiB or more lies on huge pages -- a fresh 4 KiB page costs a page
/// fault each (about 4 ms a MB where this was measured, more than all the build's arithmetic), and a
/// random cell read on 4 KiB pages pays a TLB miss as well as the cache miss.
template <class T>
struct LargeArrayAllocator {
  using value_type = T;
  LargeArrayAllocator() = default;
  template <class U>
  LargeArrayAllocator(const LargeArrayAllocator<U>&) noexcept {}  // NOLINT: rebinding is implicit
  T* allocate(std::size_t n) { return static_cast<T*>(allocate_large(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) noexcept { free_large(p); }
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;  // default-initialised: no zeroing
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  friend bool operator==(const LargeArrayAllocator&, const LargeArrayAllocator&) { return true; }
};

}  // namespace detail

/// P_n(j) = w_j / sum(w), drawn in O(1) through an alias table built in O(N).
/// Memory: 16 bytes per instance in the table (the upper bits of the threshold, the alias, and both
/// cells' log probabilities, so that a draw and its probability cost one cache line), 4 bytes for
/// the threshold's lower bits (read once in 2^32 draws), the normalised weights and the caller's
/// weights in double (8 bytes each); all on huge pages from 2 MiB on.
class AliasSampler final : public NoiseSampler {
 public:
  /// An array of the sampler (a std::vector with LargeArrayAllocator).
  template <class T>
  using Array = std::vector<T, detail::LargeArrayAllocator<T>>;

  /// Throws Error (naming the first bad index and value) if weights is empty, has more than
  /// 2^32 - 1 entries, or holds a negative, NaN or infinite weight, or if all weights are zero.
  /// The table is the same bit for bit for any OpenMP thread count.
  explicit AliasSampler(std::span<const double> weights);
  SamplerKind kind() const override { return SamplerKind::alias; }
  double prob(index_t j) const override;
  std::vector<double> probs() const override;
  void lookup(std::span<const index_t> ids, std::span<float> log_pn) const override;
  void draw_next(DrawCursor& cursor, std::span<index_t> ids, std::span<float> log_pn) const override;
  /// The weights the sampler was built from, normalised to sum 1 (double precision).
  const Array<double>& normalized_weights() const { return p_; }
  /// The weights exactly as the caller gave them: rebuilding from them gives a bit-identical table
  /// (what snapshots store).
  const Array<double>& weights() const { return w_; }

  /// A cell of the table. A draw picks cell j uniformly and a 53-bit coin c; it returns j when
  /// c < T_j, else the alias. T_j = threshold_hi * 2^21 + (the lower 21 bits, kept apart), at most
  /// 2^53 - 1: the coin's upper 32 bits decide alone unless they equal threshold_hi.
  struct Cell {
    std::uint32_t threshold_hi;  ///< T_j >> 21
    std::uint32_t alias;         ///< the other cell's id (j itself for a cell that is never left)
    float log_p_self;            ///< log P_n(j)
    float log_p_alias;           ///< log P_n(alias)
  };
  /// The table, cell j for instance j (for tests and diagnostics).
  std::span<const Cell> cells() const { return cells_; }
  /// T_j / 2^53 exactly: the probability that a draw picking cell j keeps j. Throws Error if j is
  /// out of range.
  double keep_probability(index_t j) const;

 private:
  Array<Cell> cells_;
  Array<std::uint32_t> threshold_lo_;  ///< T_j & (2^21 - 1)
  Array<double> p_;
  Array<double> w_;
};

}  // namespace membank
