#pragma once
/// @file
/// Bottleneck adapters' entry in the method list (peft/methods.h): BottleneckConfig's JSON
/// (peft_type "BOTTLENECK_ADAPTER", fields in HF's style) and its TorchScript tuner.

#include <peft/bottleneck/inject.h>
#include <peft/bottleneck/native.h>
#include <peft/tuner.h>

namespace peft {

/// BottleneckConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<BottleneckConfig> : MethodDefaults<BottleneckConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "BOTTLENECK_ADAPTER";
  /// The method's name in messages.
  static constexpr const char* name = "Bottleneck";
  /// The TorchScript tuner.
  using JitTuner = bottleneck::Tuner;
  /// The torch::nn tuner (see peft/nn/sites.h for what the model provides).
  static constexpr auto native_tuner = &bottleneck::native_tuner;

  /// HF's names of the enum's values.
  static const std::vector<std::pair<std::string, BottleneckActivation>>& activations() {
    static const std::vector<std::pair<std::string, BottleneckActivation>> names{
        {"relu", BottleneckActivation::ReLU},
        {"gelu", BottleneckActivation::GELU},
        {"tanh", BottleneckActivation::Tanh},
        {"silu", BottleneckActivation::SiLU}};
    return names;
  }

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const BottleneckConfig& c) {
    return nlohmann::json{
        {"target_modules", io::targets_json(c.target_modules())},
        {"exclude_modules", io::targets_json(c.exclude_modules())},
        {"layers_to_transform", io::or_null(c.layers_to_transform())},
        {"layers_pattern", io::or_null(c.layers_pattern())},
        {"hidden_size", c.hidden_size()},
        {"bottleneck_size", c.bottleneck_size()},
        {"reduction_factor", c.reduction_factor()},
        {"activation", io::choice_name(activations(), c.activation())},
        {"init", c.init() == BottleneckInit::Identity ? "identity" : "houlsby"},
        {"modules_to_save", io::or_null(c.modules_to_save())}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static BottleneckConfig from_json(io::ConfigReader& r) {
    return BottleneckConfig()
        .target_modules(r.targets("target_modules"))
        .exclude_modules(r.targets("exclude_modules"))
        .layers_to_transform(r.ints_or_one("layers_to_transform"))
        .layers_pattern(r.strings_or_one("layers_pattern"))
        .hidden_size(r.get<int64_t>("hidden_size", 0))
        .bottleneck_size(r.get<int64_t>("bottleneck_size", 0))
        .reduction_factor(r.get<int64_t>("reduction_factor", 16))
        .activation(r.choice<BottleneckActivation>("activation", "relu", activations()))
        .init(r.get<std::string>("init", "identity") == "houlsby" ? BottleneckInit::Houlsby : BottleneckInit::Identity)
        .modules_to_save(r.strings_or_one("modules_to_save"));
  }


  /// Adapters go after submodule calls, which other methods' injection inlines.
  static bool needs_module_boundaries(const BottleneckConfig&) { return true; }
};


}  // namespace peft
