#pragma once
// The objectives: each one is a small struct in a file of its own that turns a query's scores into
// its loss and the coefficients of dL/df = sum_j g_j v_j. The kernels (kernels/kernels_impl.hpp) do
// the rest, the same for all of them: gather and score the rows, accumulate the weighted rows, and
// (for shared negatives) the GEMMs.
//
// The contract of an objective `O` (see common.hpp for the types):
//   static constexpr int kAccumulators;  1 or 2 rows of weighted sums it needs
//   static constexpr bool kLabels;       it reads Entries::same (the draws' labels)
//   O(const ObjectiveParams&, Positive)
//   void block(const Entries&, Weights&)               per block of up to 16 draws, in order
//   Outcome finish()                                   loss and the final coefficients
// An objective that needs the scores of its same-label draws before any negative's coefficient
// (triplet) declares kPositivesFirst = true, is built as O(params, positive, Workspace), and takes:
//   positive(j, s, r) for each same-label draw j, then begin_negatives(sum of the negatives' r),
//   block() over the negatives only, then positive_weights(w) (w[c] for draw positive_order()[c]).
// Adding an objective: its file here, one line in with_objective() below, its name in config.cpp.
#include "objectives/common.hpp"
#include "objectives/contrastive.hpp"
#include "objectives/dcl.hpp"
#include "objectives/dhel.hpp"
#include "objectives/hcl.hpp"
#include "objectives/infonce.hpp"
#include "objectives/kcl.hpp"
#include "objectives/nce.hpp"
#include "objectives/supcon.hpp"
#include "objectives/triplet.hpp"

namespace membank::objectives {
namespace {

/// Whether objective O takes its positives first (see above).
template <class O>
constexpr bool kPositivesFirst = [] {
  if constexpr (requires { O::kPositivesFirst; })
    return O::kPositivesFirst;
  else
    return false;
}();

template <class O>
struct Tag {
  using type = O;
};

/// Calls fn(Tag<O>{}) with the objective type O that p names (the full softmax is not one of these).
template <class Fn>
void with_objective(const ObjectiveParams& p, Fn&& fn) {
  switch (p.objective) {
    case Objective::nce: return fn(Tag<Nce>{});
    case Objective::info_nce: return fn(Tag<InfoNce>{});
    case Objective::dcl: return fn(Tag<Dcl>{});
    case Objective::hcl: return p.detach_weights ? fn(Tag<Hcl<true>>{}) : fn(Tag<Hcl<false>>{});
    case Objective::dhel: return fn(Tag<Dhel>{});
    case Objective::kcl: return fn(Tag<Kcl>{});
    case Objective::supcon: return fn(Tag<SupCon>{});
    case Objective::contrastive: return fn(Tag<Contrastive>{});
    case Objective::triplet: return fn(Tag<Triplet>{});
    case Objective::full_softmax: break;
  }
}

}  // namespace
}  // namespace membank::objectives
