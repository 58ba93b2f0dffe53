#pragma once
/// @file
/// IA3's entry in the method list (peft/methods.h): IA3Config's HF JSON (peft_type "IA3") and its TorchScript tuner.

#include <peft/ia3/inject.h>
#include <peft/ia3/native.h>
#include <peft/tuner.h>

namespace peft {

/// IA3Config's hooks (see Method in peft/tuner.h).
template <>
struct Method<IA3Config> : MethodDefaults<IA3Config> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "IA3";
  /// The method's name in messages.
  static constexpr const char* name = "IA3";
  /// The TorchScript tuner.
  using JitTuner = ia3::Tuner;
  /// The torch::nn tuner (peft::nn layers).
  static constexpr auto native_tuner = &ia3::native_tuner;

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const IA3Config& c) {
    return nlohmann::json{
        {"target_modules", io::targets_json(c.target_modules())},
        {"exclude_modules", io::targets_json(c.exclude_modules())},
        {"feedforward_modules", io::targets_json(c.feedforward_modules())},
        {"layers_to_transform", io::or_null(c.layers_to_transform())},
        {"layers_pattern", io::or_null(c.layers_pattern())},
        {"fan_in_fan_out", c.fan_in_fan_out()},
        {"init_ia3_weights", c.init_ia3_weights()},
        {"modules_to_save", io::or_null(c.modules_to_save())}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static IA3Config from_json(io::ConfigReader& r) {
    return IA3Config()
        .target_modules(r.targets("target_modules"))
        .exclude_modules(r.targets("exclude_modules"))
        .feedforward_modules(r.targets("feedforward_modules"))
        .layers_to_transform(r.ints_or_one("layers_to_transform"))
        .layers_pattern(r.strings_or_one("layers_pattern"))
        .fan_in_fan_out(r.get<bool>("fan_in_fan_out", false))
        .init_ia3_weights(r.get<bool>("init_ia3_weights", true))
        .modules_to_save(r.strings_or_one("modules_to_save"));
  }


  /// IA3 multiplies the layer's output (or input).
  static bool rescales_layers(const IA3Config&) { return true; }
};


}  // namespace peft
