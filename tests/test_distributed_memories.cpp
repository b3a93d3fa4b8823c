// DistributedQueue and DistributedInBatch against the single-process Queue and InBatch (run under
// mpirun at np = 1, 2, 3, 4; CTest registers each). Every rank makes the same global batches, feeds
// the whole of each to a single-process reference and its own slice (uneven sizes, rank order) to
// the distributed object, and checks:
//   queue     the ring bit-identical to the reference's after every step (keys, ids, labels,
//             position), so identical on every rank; the loss and this rank's rows of dL/dq within
//             1e-6 relative (a query's scores come from a GEMM over its rank's blocks of queries, whose
//             last bits depend on the block); the StepStats bit-identical across ranks; over fp32 and
//             fp16 rings, masks and objectives;
//   in_batch  the loss and this rank's rows of both gradients bit-identical to the reference (every
//             rank runs the global step itself);
//   failure   a rank's bad input gives every rank the same error, naming that rank, and changes
//             nothing.
#include <membank/distributed_memories.hpp>
#include <membank/error.hpp>

#include "mpi_check.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace membank;
using namespace mpi_check;

constexpr index_t kDim = 20;

double rel_diff(const RowMatrixf& a, const RowMatrixf& b) {
  double num = 0.0, den = 0.0;
  for (index_t e = 0; e < a.size(); ++e) {
    num = std::max(num, std::fabs(static_cast<double>(a.data()[e]) - b.data()[e]));
    den = std::max(den, std::fabs(static_cast<double>(b.data()[e])));
  }
  return den == 0.0 ? num : num / den;
}

index_t slice_size(int rank) { return 2 + rank % 3; }

/// Rows [first, first + count) of the global batch belong to this rank.
struct Slice {
  index_t first = 0, count = 0, total = 0;
};
Slice my_slice() {
  Slice s;
  for (int r = 0; r < g_ranks; ++r) {
    if (r == g_rank) {
      s.first = s.total;
      s.count = slice_size(r);
    }
    s.total += slice_size(r);
  }
  return s;
}

/// A global batch the same on every rank: rows near each other in pairs, ids from a small range
/// (accidental hits), 3 labels.
struct Global {
  RowMatrixf a, b;
  std::vector<index_t> ids;
  std::vector<std::int64_t> labels;
};
Global global_batch(index_t total, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  Global g;
  g.a.resize(total, kDim);
  g.b.resize(total, kDim);
  for (index_t i = 0; i < total; ++i) {
    for (index_t c = 0; c < kDim; ++c) {
      g.a(i, c) = normal(rng);
      g.b(i, c) = g.a(i, c) + 0.4f * normal(rng);
    }
    g.a.row(i).normalize();
    g.b.row(i).normalize();
    g.ids.push_back(static_cast<index_t>(rng() % 9));
    g.labels.push_back(static_cast<std::int64_t>(rng() % 3));
  }
  return g;
}

bool same_ring(const Queue& x, const Queue& y) {
  return same_bits(x.keys().to_matrix(), y.keys().to_matrix()) && x.ids() == y.ids() && x.labels() == y.labels() &&
         x.labelled() == y.labelled() && x.position() == y.position() && x.enqueued() == y.enqueued() &&
         x.steps_done() == y.steps_done();
}

/// The same StepStats on every rank (the loss's bits gathered and compared).
bool same_on_every_rank(double v) {
  std::vector<double> all(static_cast<std::size_t>(g_ranks));
  MPI_Allgather(&v, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  return std::all_of(all.begin(), all.end(), [&](double x) { return same_bits(x, all[0]); });
}

void queue_case(Objective objective, DType dtype, bool exclude_positive, bool with_labels) {
  const std::string name = fmt::format("queue {} {}{}{}", to_string(objective), to_string(dtype),
                                       exclude_positive ? " exclude_positive" : "", with_labels ? " labels" : "");
  EngineConfig cfg;
  cfg.objective = objective;
  cfg.tau = 0.2;
  cfg.exclude_positive = exclude_positive;
  cfg.normalize_features = true;
  cfg.seed = 5;
  const index_t capacity = 23;  // not a multiple of the global batch: the ring wraps mid-batch
  Queue reference(capacity, kDim, cfg, dtype);
  DistributedQueue dist(MPI_COMM_WORLD, Queue(capacity, kDim, cfg, dtype));
  const Slice s = my_slice();
  std::mt19937_64 rng(17);
  for (int step = 0; step < 6; ++step) {
    const Global g = global_batch(s.total, rng);
    const std::vector<std::int64_t> no_labels;
    RowMatrixf grad_ref(s.total, kDim), grad(s.count, kDim);
    const auto& labels = with_labels ? g.labels : no_labels;
    guarded(name, [&] {
      const StepStats want = reference.step(g.a, g.b, grad_ref, g.ids, labels);
      const std::vector<index_t> ids(g.ids.begin() + s.first, g.ids.begin() + s.first + s.count);
      const std::vector<std::int64_t> lab =
          with_labels ? std::vector<std::int64_t>(labels.begin() + s.first, labels.begin() + s.first + s.count)
                      : std::vector<std::int64_t>{};
      const StepStats got = dist.step(g.a.middleRows(s.first, s.count), g.b.middleRows(s.first, s.count), grad, ids, lab);
      check(std::fabs(got.loss - want.loss) <= 1e-6 * std::fabs(want.loss),
            fmt::format("{} step {}: loss {} against the single process's {}", name, step, got.loss, want.loss));
      const RowMatrixf mine = grad_ref.middleRows(s.first, s.count);
      check(rel_diff(grad, mine) < 1e-6, fmt::format("{} step {}: dL/dq differs by {}", name, step, rel_diff(grad, mine)));
      check(same_ring(dist.queue(), reference), fmt::format("{} step {}: the ring differs from the single process's", name, step));
      check(same_on_every_rank(got.loss), fmt::format("{} step {}: the loss differs between ranks", name, step));
      check(got.step == step, fmt::format("{} step {}: the counter is {}", name, step, got.step));
    });
  }
}

void queue() {
  for (Objective o : {Objective::info_nce, Objective::dcl, Objective::supcon})
    for (DType t : {DType::float32, DType::float16})
      for (bool ex : {false, true}) queue_case(o, t, ex, o == Objective::supcon || ex);
}

void in_batch() {
  for (Objective o : {Objective::info_nce, Objective::hcl, Objective::supcon}) {
    const std::string name = fmt::format("in-batch {}", to_string(o));
    EngineConfig cfg;
    cfg.objective = o;
    cfg.tau = 0.3;
    cfg.exclude_positive = true;
    const InBatch reference(cfg);
    DistributedInBatch dist(MPI_COMM_WORLD, InBatch(cfg));
    const Slice s = my_slice();
    std::mt19937_64 rng(23);
    for (int step = 0; step < 3; ++step) {
      Global g = global_batch(s.total, rng);
      // Distinct instances but for one drawn twice (masked with exclude_positive): every sample keeps
      // a negative.
      std::iota(g.ids.begin(), g.ids.end(), index_t{0});
      if (s.total > 3) g.ids.back() = g.ids.front();
      RowMatrixf ga_ref(s.total, kDim), gb_ref(s.total, kDim), ga(s.count, kDim), gb(s.count, kDim);
      guarded(name, [&] {
        const StepStats want = reference.step(g.a, g.b, ga_ref, gb_ref, g.ids, g.labels);
        const std::vector<index_t> ids(g.ids.begin() + s.first, g.ids.begin() + s.first + s.count);
        const std::vector<std::int64_t> lab(g.labels.begin() + s.first, g.labels.begin() + s.first + s.count);
        const StepStats got =
            dist.step(g.a.middleRows(s.first, s.count), g.b.middleRows(s.first, s.count), ga, gb, ids, lab);
        check(same_bits(got.loss, want.loss), fmt::format("{} step {}: loss {} against {}", name, step, got.loss, want.loss));
        check(same_bits(ga, ga_ref.middleRows(s.first, s.count)) && same_bits(gb, gb_ref.middleRows(s.first, s.count)),
              fmt::format("{} step {}: this rank's gradient rows differ from the single process's", name, step));
      });
    }
  }
}

void failure() {
  EngineConfig cfg;
  cfg.objective = Objective::info_nce;
  cfg.normalize_features = true;
  DistributedQueue dist(MPI_COMM_WORLD, Queue(11, kDim, cfg));
  const Slice s = my_slice();
  std::mt19937_64 rng(3);
  const Global g = global_batch(s.total, rng);
  std::vector<index_t> ids(g.ids.begin() + s.first, g.ids.begin() + s.first + s.count);
  const int bad = g_ranks - 1;
  if (g_rank == bad) ids[1] = -7;
  RowMatrixf grad(s.count, kDim);
  const RowMatrixf keys_before = dist.queue().keys().to_matrix();
  const std::string msg = [&] {
    try {
      dist.step(g.a.middleRows(s.first, s.count), g.b.middleRows(s.first, s.count), grad, ids);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no exception>");
  }();
  check(msg.find(fmt::format("rank {} of {}", bad, g_ranks)) != std::string::npos && msg.find("ids[1] = -7") != std::string::npos,
        "queue failure: got '" + msg + "'");
  check(same_bits(dist.queue().keys().to_matrix(), keys_before) && dist.queue().steps_done() == 0,
        "queue failure: the ring changed");
  // Ids on some ranks only: refused on every rank.
  if (g_ranks > 1) {
    const std::vector<index_t> none;
    const std::string m2 = [&] {
      try {
        dist.step(g.a.middleRows(s.first, s.count), g.b.middleRows(s.first, s.count), grad,
                  g_rank == 0 ? IdsRef(none) : IdsRef(g.ids).subspan(static_cast<std::size_t>(s.first),
                                                                    static_cast<std::size_t>(s.count)));
      } catch (const Error& e) {
        return std::string(e.what());
      }
      return std::string("<no exception>");
    }();
    check(m2.find("expected ids on every rank or on none") != std::string::npos, "queue failure: got '" + m2 + "'");
  }
  // In-batch: a grad of the wrong shape on one rank.
  DistributedInBatch ib(MPI_COMM_WORLD, InBatch(cfg));
  RowMatrixf ga(g_rank == bad ? s.count + 1 : s.count, kDim), gb(s.count, kDim);
  const std::string m3 = [&] {
    try {
      ib.step(g.a.middleRows(s.first, s.count), g.b.middleRows(s.first, s.count), ga, gb);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("<no exception>");
  }();
  check(m3.find(fmt::format("rank {} of {}", bad, g_ranks)) != std::string::npos && m3.find("grad_a") != std::string::npos,
        "in-batch failure: got '" + m3 + "'");
}

}  // namespace

int main(int argc, char** argv) {
  start(&argc, &argv);
  const std::string what = argc > 1 ? argv[1] : "all";
  if (what == "queue" || what == "all") queue();
  if (what == "in_batch" || what == "all") in_batch();
  if (what == "failure" || what == "all") failure();
  return finish(what);
}
