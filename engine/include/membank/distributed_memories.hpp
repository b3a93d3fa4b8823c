#pragma once
// The queue and in-batch negatives over MPI (docs/distributed.md, "Queue and in-batch"): R
// data-parallel ranks, each holding a slice of the global batch (the slices concatenated in rank
// order are the global batch), and one result that is the single-process step on the global batch.
//
//   DistributedQueue    every rank holds the whole ring (Q D elements: a queue is small). A step
//                       scores this rank's queries against the ring (its rows of dL/dq carry the
//                       1/B of the global batch mean), then all-gathers the batch's keys, ids and
//                       labels and enqueues them in rank order, so every rank's ring stays identical
//                       to the single-process ring fed the global batches. Bytes per rank and step:
//                       about B (4 D + 16) to each other rank (the keys), independent of Q.
//   DistributedInBatch  the negatives of a sample are the other 2B - 2 samples of the *global*
//                       batch: a step all-gathers both views (and ids, labels) and every rank runs
//                       the single-process InBatch step on the global batch, keeping its own rows of
//                       the gradient (bit for bit the single-process rows). The 2B x 2B x D work is
//                       repeated on every rank: cheap next to the encoder at the batch sizes SimCLR
//                       uses (B = 4096, D = 128: 8.6 GFLOP, about 0.1 s on one core).
//
// The loss and the statistics are the global batch's, combined in rank order: every rank returns the
// same StepStats, bit for bit. Errors: a rank whose input is refused makes every rank throw the same
// membank::Error naming the rank, before anything changes (the call's shape -- D, and whether ids,
// labels and enqueue are given -- must agree). Thread safety: as the single-process classes; all
// ranks call the collective methods (all but the accessors) in the same order.
#include <membank/distributed.hpp>
#include <membank/in_batch.hpp>
#include <membank/queue.hpp>

#include <mpi.h>

namespace membank {

class DistributedQueue {
 public:
  /// Collective. Every rank passes the same queue (its configuration and whole state are compared by
  /// fingerprints: an Error on every rank names the first rank that differs). The communicator is
  /// duplicated.
  DistributedQueue(MPI_Comm comm, Queue queue);
  ~DistributedQueue();
  DistributedQueue(DistributedQueue&&) noexcept;
  DistributedQueue& operator=(DistributedQueue&&) noexcept;

  /// Collective. Queue::step on the global batch: this rank passes its slice (queries and keys B_r x D,
  /// B_r >= 1, ids and labels empty or B_r long) and receives its rows of dL/dq in grad (B_r x D).
  StepStats step(FeaturesRef queries, FeaturesRef keys, GradRef grad, IdsRef ids = {}, LabelsRef labels = {},
                 bool enqueue = true);

  /// The ring, the same on every rank.
  const Queue& queue() const { return queue_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  /// What the last step sent to other ranks (bytes_sent, collectives, seconds_communication).
  const WireStats& last_wire() const { return wire_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, ranks_ = 1;
  Queue queue_;
  WireStats wire_;
};

class DistributedInBatch {
 public:
  /// Collective. The configuration must be the same on every rank (fingerprints). The communicator
  /// is duplicated.
  DistributedInBatch(MPI_Comm comm, InBatch in_batch);
  ~DistributedInBatch();
  DistributedInBatch(DistributedInBatch&&) noexcept;
  DistributedInBatch& operator=(DistributedInBatch&&) noexcept;

  /// Collective. InBatch::step on the global batch: this rank passes its slice of both views (B_r x D,
  /// B_r >= 1) and receives its rows of each view's gradient.
  StepStats step(FeaturesRef view_a, FeaturesRef view_b, GradRef grad_a, GradRef grad_b, IdsRef ids = {},
                 LabelsRef labels = {});

  const InBatch& in_batch() const { return in_batch_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  const WireStats& last_wire() const { return wire_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, ranks_ = 1;
  InBatch in_batch_;
  WireStats wire_;
};

}  // namespace membank
