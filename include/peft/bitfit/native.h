#pragma once
/// @file
/// BitFit on a torch::nn model (the native backend): the biases (and optionally
/// the norm parameters) train in place, their original values kept aside.

#include <peft/bitfit/bitfit.h>
#include <peft/bitfit/inject.h>
#include <peft/nn/inject.h>

namespace peft {
namespace bitfit {

/// BitFit on every module of a torch::nn model (norm modules: name() contains "Norm").
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const BitFitConfig& config) {
  check<OptionError>(config.bias() || config.norm(), "BitFitConfig selects nothing to train");
  const size_t before = injection.trained().size();
  for (const auto& [path, module] : nn::modules_of(injection.model())) {
    const bool norm = config.norm() && is_norm_module(*module);
    for (const auto& p : module->named_parameters(/*recurse=*/false))
      if (p.value().defined() && (norm || (config.bias() && p.key() == "bias"))) injection.train_tensor(path, p.key());
  }
  check<ModelError>(injection.trained().size() > before, "BitFitConfig: the model has no {} parameters",
                    config.norm() ? "bias or norm" : "bias");
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<nn::Tuner>("BitFit", injection);
}

}  // namespace bitfit
}  // namespace peft
