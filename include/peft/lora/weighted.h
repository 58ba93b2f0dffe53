#pragma once
/// @file
/// LoRA's weighted combination of adapters (HF peft's add_weighted_adapter).

#include <peft/lora/method.h>
#include <peft/peft_model.h>

#include <cmath>
#include <map>

namespace peft {

/// How add_weighted_adapter combines LoRA adapters (HF's combination_type).
enum class Combination {
  Linear,  ///< A = Σ√(wᵢsᵢ)Aᵢ, B = Σ√(wᵢsᵢ)Bᵢ (equal ranks), as HF peft
  Cat,     ///< A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …]: exactly Σ wᵢ ΔWᵢ, rank Σ rᵢ
  SVD,     ///< the top-r SVD of Σ wᵢ ΔWᵢ
};

/// Adds to `model` a new LoRA adapter `new_name` combining its LoRA adapters
/// `names` with `weights` (HF's add_weighted_adapter); its scaling is 1
/// (lora_alpha = r). OptionError for a non-LoRA, DoRA or per-slice adapter, or
/// unequal ranks with Combination::Linear.
///
/// ```
/// peft::add_weighted_adapter(model, {"default", "style"}, {0.7, 0.3}, "mix", peft::Combination::Cat);
/// ```
inline void add_weighted_adapter(PeftModel& model, const std::vector<std::string>& names, const std::vector<double>& weights,
                                 const std::string& new_name, Combination combination = Combination::SVD,
                                 int64_t svd_rank = 0) {
  check<OptionError>(!names.empty() && names.size() == weights.size(),
                     "add_weighted_adapter: {} adapters but {} weights", names.size(), weights.size());
  // Every (adapter, layer) that contributes, by target module.
  struct Part {
    torch::Tensor A, B;
    double scale;  // wᵢ · sᵢ
  };
  std::map<std::string, std::vector<Part>> parts;
  int64_t rank_sum = 0, rank_max = 0, rank_first = -1;
  for (size_t i = 0; i < names.size(); ++i) {
    const PeftModel::Adapter& a = model.adapter(names[i]);
    const auto* cfg = a.config.get_if<LoraConfig>();
    check<OptionError>(cfg && !cfg->use_dora() && cfg->slice_pattern().empty(),
                       "add_weighted_adapter: '{}' is not a plain LoRA adapter (DoRA and per-slice LoRA are not combined)",
                       a.name);
    for (const auto& l : a.layers) {
      torch::Tensor A = l.module.attr("lora_A").toTensor().detach(), B = l.module.attr("lora_B").toTensor().detach();
      parts[l.target].push_back({A, B, weights[i] * l.module.attr("scaling").toDouble()});
      rank_max = std::max(rank_max, A.size(0));
      if (rank_first < 0) rank_first = A.size(0);
      check<OptionError>(combination != Combination::Linear || A.size(0) == rank_first,
                         "add_weighted_adapter: Combination::Linear needs equal ranks ('{}' has {} at {}, expected {})",
                         a.name, A.size(0), l.target, rank_first);
    }
    rank_sum += cfg->r();
  }
  const int64_t r = combination == Combination::Cat ? rank_sum
                    : combination == Combination::SVD ? (svd_rank > 0 ? svd_rank : rank_max)
                                                      : rank_first;
  std::vector<std::string> targets;
  for (const auto& entry : parts) targets.push_back(entry.first);
  model.add_adapter(new_name, LoraConfig().r(r).lora_alpha(static_cast<double>(r)).target_modules(targets)
                            .init_lora_weights(LoraInit::Zero));
  torch::NoGradGuard no_grad;
  for (const auto& l : model.adapter(new_name).layers) {
    const auto& ps = parts.at(l.target);
    torch::Tensor A = l.module.attr("lora_A").toTensor(), B = l.module.attr("lora_B").toTensor();
    if (combination == Combination::Linear) {
      for (const auto& p : ps) {
        A.add_(p.A * std::sqrt(std::abs(p.scale)) * (p.scale < 0 ? -1.0 : 1.0));
        B.add_(p.B * std::sqrt(std::abs(p.scale)));
      }
    } else if (combination == Combination::Cat) {
      std::vector<torch::Tensor> As, Bs;
      for (const auto& p : ps) As.push_back(p.A), Bs.push_back(p.B * p.scale);
      torch::Tensor catA = torch::cat(As, 0), catB = torch::cat(Bs, 1);
      A.narrow(0, 0, catA.size(0)).copy_(catA);  // adapters missing here leave zero rows
      B.narrow(1, 0, catB.size(1)).copy_(catB);
    } else {
      torch::Tensor delta = torch::zeros({B.size(0), A.size(1)}, A.options());
      for (const auto& p : ps) delta += p.scale * torch::matmul(p.B, p.A);
      torch::Tensor U, S, Vh;
      std::tie(U, S, Vh) = at::linalg_svd(delta, /*full_matrices=*/false);
      const int64_t k = std::min<int64_t>(r, S.size(0));
      B.narrow(1, 0, k).copy_(U.narrow(1, 0, k) * S.narrow(0, 0, k).unsqueeze(0));
      A.narrow(0, 0, k).copy_(Vh.narrow(0, 0, k));
    }
  }
}

}  // namespace peft
