#pragma once
/// @file
/// BitFit (Ben Zaken et al. 2022): train only bias (and optionally norm) parameters.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace peft {

/// Options of peft::bitfit::mark_trainable.
///
/// ```
/// peft::bitfit::mark_trainable(*model, peft::BitFitOptions().norm(true));
/// ```
struct BitFitOptions {
  /// Train every parameter named `bias`.
  TORCH_ARG(bool, bias) = true;
  /// Train every parameter of normalisation modules (LayerNorm, GroupNorm,
  /// BatchNorm, InstanceNorm, and any user module whose name() contains "Norm").
  TORCH_ARG(bool, norm) = false;
};

namespace bitfit {

/// Whether a module is a normalisation layer, by its name() ("torch::nn::LayerNorm", "MyRMSNorm", ...).
inline bool is_norm_module(const torch::nn::Module& module) {
  return module.name().find("Norm") != std::string::npos;
}

/// Freezes every parameter of `module` except biases (and norm parameters with
/// .norm(true)) and returns the trainable ones with their names. Throws
/// ModelError when the model has none of them.
inline std::vector<std::pair<std::string, torch::Tensor>> mark_trainable(torch::nn::Module& module,
                                                                         const BitFitOptions& options = {}) {
  check<OptionError>(options.bias() || options.norm(), "bitfit::mark_trainable: BitFitOptions selects nothing to train");
  for (auto& p : module.parameters()) p.set_requires_grad(false);
  std::vector<std::pair<std::string, torch::Tensor>> trainable;
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    const bool norm = options.norm() && is_norm_module(*item.value());
    for (auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      if (!(norm || (options.bias() && p.key() == "bias"))) continue;
      p.value().set_requires_grad(true);
      trainable.emplace_back(item.key().empty() ? p.key() : item.key() + "." + p.key(), p.value());
    }
  }
  check<ModelError>(!trainable.empty(), "bitfit::mark_trainable: {} has no {} parameters", module.name(),
                    options.norm() ? "bias or norm" : "bias");
  return trainable;
}

}  // namespace bitfit
}  // namespace peft
