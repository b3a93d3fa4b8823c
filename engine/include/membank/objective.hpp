#pragma once
// The objectives the engine computes against the bank (docs/objectives.md gives every formula, its
// paper, its parameters and the limits the tests check).
#include <string>
#include <vector>

namespace membank {

enum class Objective {
  nce,           ///< noise-contrastive estimation (Wu et al. 2018); Z from ZPolicy
  info_nce,      ///< "infonce": softmax over the positive and K draws, logQ-corrected
  dcl,           ///< debiased contrastive loss (Chuang et al. 2020): tau_plus
  hcl,           ///< hard-negative reweighting (Robinson et al. 2021): beta, tau_plus, detach_weights
  dhel,          ///< decoupled hyperspherical energy loss (Koromilas et al. 2024)
  kcl,           ///< kernel contrastive loss (Koromilas et al. 2024): kernel_t, gamma
  supcon,        ///< supervised contrastive (Khosla et al. 2020): needs labels
  contrastive,   ///< margin loss on distances (Chopra et al. 2005): needs labels, margin
  triplet,       ///< triplet loss (Schroff et al. 2015): needs labels, margin
  full_softmax,  ///< "full": the exact softmax over the whole bank
};

std::string to_string(Objective o);
/// Parse the names printed by to_string; throw Error naming the value and the choices otherwise.
Objective objective_from_string(const std::string& s);
/// Every objective, in declaration order.
const std::vector<Objective>& all_objectives();
/// supcon, contrastive and triplet: the engine must hold labels.
bool needs_labels(Objective o);
/// infonce, dcl and hcl: the step reports the mutual-information bound log(K + 1) - L.
bool reports_mi_bound(Objective o);
/// Every objective but contrastive, triplet and full: its value is an estimate over the draws of a
/// sum over the bank, which needs draws with a valid P_n (a biased sampler is refused unless
/// EngineConfig::allow_biased_sampler). The margin losses mine hard negatives as their method; full
/// draws nothing.
bool needs_valid_noise(Objective o);

}  // namespace membank
