// DistributedQueue and DistributedInBatch (distributed_memories.hpp): the shape of a call agreed
// by every rank, the local work inside agreed checks, then the all-gathers in rank order.
#include <membank/distributed_memories.hpp>
#include <membank/error.hpp>

#include "detail/check.hpp"
#include "detail/mpi_group.hpp"
#include "detail/parallel.hpp"
#include "keyed.hpp"

#include <cmath>
#include <utility>

namespace membank {

namespace {

using detail::check_mpi;
using detail::check_same;
using detail::Fingerprint;
using detail::Group;

/// A duplicate of the caller's communicator, with MPI checked to be running.
MPI_Comm duplicate(MPI_Comm comm, const char* what) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  MEMBANK_CHECK(initialised, "MPI is not initialised: call MPI_Init (or import mpi4py) before making a {}", what);
  MEMBANK_CHECK(comm != MPI_COMM_NULL, "comm is MPI_COMM_NULL: expected a communicator");
  MPI_Comm out = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(comm, &out), "MPI_Comm_dup");
  return out;
}

/// Frees a communicator of ours, unless MPI is already finalised (an object outliving MPI_Finalize,
/// e.g. at the exit of a Python interpreter whose mpi4py finalised first).
void release(MPI_Comm& comm) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm);
  comm = MPI_COMM_NULL;
}

/// The shape of one rank's call: its batch slice, D, and which optional arguments it gives.
struct CallShape {
  std::int64_t batch, dim, has_ids, has_labels, flag;
};

/// Every rank's CallShape, checked to agree with rank 0's where it must; the slices' offsets.
std::vector<index_t> agree_shapes(const Group& g, const CallShape& mine, const char* flag_name) {
  const std::vector<std::int64_t> all = g.allgather(std::span<const std::int64_t>(&mine.batch, 5));
  std::vector<index_t> offset(static_cast<std::size_t>(g.ranks) + 1, 0);
  g.check([&] {
    for (int r = 0; r < g.ranks; ++r) {
      const std::int64_t* s = all.data() + 5 * r;
      MEMBANK_CHECK(s[0] >= 1, "rank {} passes a slice of {} rows: expected B_r >= 1 on every rank", r, s[0]);
      MEMBANK_CHECK(s[1] == all[1], "rank {} passes D = {} and rank 0 D = {}: expected the same on every rank", r,
                    s[1], all[1]);
      MEMBANK_CHECK(s[2] == all[2], "rank {} {} ids and rank 0 {}: expected ids on every rank or on none", r,
                    s[2] ? "passes" : "passes no", all[2] ? "does" : "does not");
      MEMBANK_CHECK(s[3] == all[3], "rank {} {} labels and rank 0 {}: expected labels on every rank or on none", r,
                    s[3] ? "passes" : "passes no", all[3] ? "does" : "does not");
      MEMBANK_CHECK(s[4] == all[4], "rank {} passes {} = {} and rank 0 {}: expected the same on every rank", r,
                    flag_name, s[4] != 0, all[4] != 0);
      offset[static_cast<std::size_t>(r) + 1] = offset[static_cast<std::size_t>(r)] + s[0];
    }
  });
  return offset;
}

std::vector<index_t> counts_of(const std::vector<index_t>& offset, index_t per_row) {
  std::vector<index_t> c(offset.size() - 1);
  for (std::size_t r = 0; r + 1 < offset.size(); ++r) c[r] = (offset[r + 1] - offset[r]) * per_row;
  return c;
}

/// Every rank's rows (B_r x D, this rank's `mine`) as one matrix, in rank order.
RowMatrixf gather_rows(const Group& g, FeaturesRef mine, const std::vector<index_t>& offset, index_t dim) {
  RowMatrixf local;
  g.check([&] { local = mine; });  // contiguous
  std::vector<float> all = g.allgatherv(std::span<const float>(local.data(), static_cast<std::size_t>(local.size())),
                                        counts_of(offset, dim));
  RowMatrixf out;
  g.check([&] { out = Eigen::Map<const RowMatrixf>(all.data(), offset.back(), dim); });
  return out;
}

std::uint64_t fingerprint_of(const Queue& q) {
  Fingerprint f;
  f << detail::fingerprint(q.config()) << q.capacity() << q.dim() << q.dtype() << q.position() << q.enqueued()
    << q.steps_done();
  const BankView v = q.keys().view();
  for (index_t i = 0; i < v.rows; ++i) f.bytes(v.row_data(i), static_cast<std::size_t>(v.dim * dtype_bytes(v.dtype)));
  f.bytes(q.ids().data(), q.ids().size() * sizeof(index_t));
  f.bytes(q.labels().data(), q.labels().size() * sizeof(std::int64_t));
  f.bytes(q.labelled().data(), q.labelled().size());
  return f.h;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// DistributedQueue

DistributedQueue::DistributedQueue(MPI_Comm comm, Queue queue)
    : comm_(duplicate(comm, "DistributedQueue")), queue_(std::move(queue)) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &ranks_);
  try {
    const Group g{comm_, rank_, ranks_, &wire_};
    std::uint64_t fp = 0;
    g.check([&] { fp = fingerprint_of(queue_); });
    const char* const what[1] = {"queue (configuration, keys, ids, labels, position or counters)"};
    check_same(g, std::span<const std::uint64_t>(&fp, 1), what);
  } catch (...) {
    release(comm_);
    throw;
  }
}

DistributedQueue::~DistributedQueue() { release(comm_); }
DistributedQueue::DistributedQueue(DistributedQueue&& o) noexcept
    : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), ranks_(o.ranks_), queue_(std::move(o.queue_)),
      wire_(o.wire_) {}
DistributedQueue& DistributedQueue::operator=(DistributedQueue&& o) noexcept {
  if (this != &o) {
    release(comm_);
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    rank_ = o.rank_;
    ranks_ = o.ranks_;
    queue_ = std::move(o.queue_);
    wire_ = o.wire_;
  }
  return *this;
}

StepStats DistributedQueue::step(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids, LabelsRef labels,
                                 bool enqueue) {
  wire_ = {};
  const Group g{comm_, rank_, ranks_, &wire_};
  const CallShape shape{queries.rows(), queries.cols(), !ids.empty(), !labels.empty(), enqueue};
  const std::vector<index_t> offset = agree_shapes(g, shape, "enqueue");
  const index_t batch = offset.back(), dim = queue_.dim();

  // This rank's queries against the ring, with the global batch's 1/B.
  detail::QueueComputed c;
  g.check([&] {
    queue_.check_grad_alone(grad, queries, keys, ids, labels);
    c = detail::translate_bad_alloc("DistributedQueue::step", [&] {
      return queue_.compute(queries, keys, grad, ids, labels, batch, &queue_.scores_);
    });
  });

  // The global statistics: each rank's sums, added in rank order.
  double mine[3] = {0.0, 0.0, 0.0};  // loss, P(positive), collisions
  for (const auto& q : c.out) {
    mine[0] += q.loss;
    mine[1] += q.p_pos;
    mine[2] += static_cast<double>(q.collisions);
  }
  const std::vector<double> sums = g.allgather(std::span<const double>(mine, 3));
  double total[3] = {0.0, 0.0, 0.0};
  for (int r = 0; r < ranks_; ++r)
    for (int t = 0; t < 3; ++t) total[t] += sums[static_cast<std::size_t>(3 * r + t)];
  StepStats stats = c.stats;
  const auto b = static_cast<double>(batch);
  stats.loss = total[0] / b;
  stats.mean_p_positive = total[1] / b;
  stats.negative_collision_fraction = total[2] / (b * static_cast<double>(queue_.capacity()));
  if (!std::isnan(stats.mi_bound_ceiling)) stats.mi_lower_bound = stats.mi_bound_ceiling - stats.loss;

  // The batch's keys, ids and labels from every rank, enqueued in rank order.
  if (enqueue) {
    const RowMatrixf all_keys = gather_rows(g, c.keys.view(), offset, dim);
    std::vector<index_t> all_ids;
    std::vector<std::int64_t> all_labels;
    if (!ids.empty()) all_ids = g.allgatherv(ids, counts_of(offset, 1));
    if (!labels.empty()) all_labels = g.allgatherv(labels, counts_of(offset, 1));
    // The same inputs on every rank: a failure here (memory) is every rank's.
    g.check([&] {
      detail::translate_bad_alloc("DistributedQueue::step", [&] { queue_.push(all_keys, all_ids, all_labels); });
    });
  }
  ++queue_.step_;
  return stats;
}

// ---------------------------------------------------------------------------------------------
// DistributedInBatch

DistributedInBatch::DistributedInBatch(MPI_Comm comm, InBatch in_batch)
    : comm_(duplicate(comm, "DistributedInBatch")), in_batch_(std::move(in_batch)) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &ranks_);
  try {
    const Group g{comm_, rank_, ranks_, &wire_};
    const std::uint64_t fp = detail::fingerprint(in_batch_.config());
    const char* const what[1] = {"EngineConfig"};
    check_same(g, std::span<const std::uint64_t>(&fp, 1), what);
  } catch (...) {
    release(comm_);
    throw;
  }
}

DistributedInBatch::~DistributedInBatch() { release(comm_); }
DistributedInBatch::DistributedInBatch(DistributedInBatch&& o) noexcept
    : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), ranks_(o.ranks_),
      in_batch_(std::move(o.in_batch_)), wire_(o.wire_) {}
DistributedInBatch& DistributedInBatch::operator=(DistributedInBatch&& o) noexcept {
  if (this != &o) {
    release(comm_);
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    rank_ = o.rank_;
    ranks_ = o.ranks_;
    in_batch_ = std::move(o.in_batch_);
    wire_ = o.wire_;
  }
  return *this;
}

StepStats DistributedInBatch::step(FeaturesRef view_a, FeaturesRef view_b, GradRef grad_a, GradRef grad_b,
                                   IdsRef ids, LabelsRef labels) {
  wire_ = {};
  const Group g{comm_, rank_, ranks_, &wire_};
  const CallShape shape{view_a.rows(), view_a.cols(), !ids.empty(), !labels.empty(), 0};
  const std::vector<index_t> offset = agree_shapes(g, shape, "(none)");
  const index_t dim = view_a.cols(), mine = view_a.rows();
  const index_t first = offset[static_cast<std::size_t>(rank_)];
  g.check([&] {  // what the global step cannot see: this rank's shapes and buffers
    MEMBANK_CHECK(view_b.rows() == mine && view_b.cols() == dim, "view_b has shape {} x {}: expected {} x {} (B_r x D)",
                  view_b.rows(), view_b.cols(), mine, dim);
    for (const auto& [gr, name] : {std::pair{&grad_a, "grad_a"}, std::pair{&grad_b, "grad_b"}})
      MEMBANK_CHECK(gr->rows() == mine && gr->cols() == dim, "{} has shape {} x {}: expected {} x {} (B_r x D)", name,
                    gr->rows(), gr->cols(), mine, dim);
    detail::check_ids_labels(nullptr, mine, ids, labels, "instance of this rank's slice");
    detail::check_in_batch_grads(grad_a, grad_b, view_a, view_b, ids, labels);
  });
  const RowMatrixf a = gather_rows(g, view_a, offset, dim);
  const RowMatrixf b = gather_rows(g, view_b, offset, dim);
  std::vector<index_t> all_ids;
  std::vector<std::int64_t> all_labels;
  if (!ids.empty()) all_ids = g.allgatherv(ids, counts_of(offset, 1));
  if (!labels.empty()) all_labels = g.allgatherv(labels, counts_of(offset, 1));
  // The global step, the same on every rank (and so its errors: agreed all the same).
  StepStats stats;
  RowMatrixf ga, gb;
  g.check([&] {
    detail::translate_bad_alloc("DistributedInBatch::step", [&] {
      ga.resize(offset.back(), dim);
      gb.resize(offset.back(), dim);
    });
    stats = in_batch_.step(a, b, ga, gb, all_ids, all_labels);
  });
  grad_a = ga.middleRows(first, mine);
  grad_b = gb.middleRows(first, mine);
  return stats;
}

}  // namespace membank
