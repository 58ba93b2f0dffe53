#pragma once
/// @file
/// BitFit on a loaded TorchScript model: the biases (and optionally the norm
/// parameters) train, as copies, so the base model stays untouched.

#include <peft/bitfit/bitfit.h>
#include <peft/jit/inject.h>

namespace peft {

/// BitFit for a whole model (HF peft lacks it; its files use peft_type "BITFIT").
///
/// ```
/// auto cfg = peft::BitFitConfig().norm(true);
/// ```
struct BitFitConfig {
  /// Train every tensor attribute named `bias`.
  TORCH_ARG(bool, bias) = true;
  /// Train the parameters of normalisation modules (type name contains "Norm").
  TORCH_ARG(bool, norm) = false;
  /// Base submodules (e.g. a classifier head) that train fully, as copies.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};
};

namespace bitfit {

/// Whether a TorchScript module is a normalisation layer, by its type name
/// (`__torch__.torch.nn.modules.normalization.LayerNorm`, `...RMSNorm`).
inline bool is_norm_module(const torch::jit::Module& module) {
  const auto& name = module.type()->name();
  return name && name->name().find("Norm") != std::string::npos;
}

/// BitFit's "tuner": no graph change, only trainable copies.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const BitFitConfig& config) {
    check<OptionError>(config.bias() || config.norm(), "BitFitConfig selects nothing to train");
    const size_t before = injection.copies().size();
    for (const auto& m : jit::Injection::base_modules(injection.model())) {
      const bool norm = config.norm() && is_norm_module(m.value);
      for (const auto& p : m.value.named_parameters(/*recurse=*/false))
        if (norm || (config.bias() && p.name == "bias")) injection.train_copy(m.name, p.name);
    }
    check<ModelError>(injection.copies().size() > before, "BitFitConfig: the model has no {} parameters",
                      config.norm() ? "bias or norm" : "bias");
    injection.train_modules_to_save(config.modules_to_save());
  }

  std::string method() const override { return "BitFit"; }
  /// Only trainable copies, which the caller saves.
  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>&) const override { return {}; }
  /// Nothing to fold: merge_and_unload() writes the trained copies back.
  bool mergeable() const override { return true; }
  void merge() override {}
};

}  // namespace bitfit
}  // namespace peft
