#pragma once
/// @file
/// VeRA's entry in the method list (peft/methods.h): VeraConfig's HF JSON (peft_type "VERA") and its TorchScript tuner.

#include <peft/tuner.h>
#include <peft/vera/config.h>
#include <peft/vera/inject.h>
#include <peft/vera/native.h>

namespace peft {

/// VeraConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<VeraConfig> : MethodDefaults<VeraConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "VERA";
  /// The method's name in messages.
  static constexpr const char* name = "VeRA";
  /// The TorchScript tuner.
  using JitTuner = vera::Tuner;
  /// The torch::nn tuner (peft::nn layers).
  static constexpr auto native_tuner = &vera::native_tuner;

  /// HF's names of the enum's values.
  static const std::vector<std::pair<std::string, VeraBias>>& biases() {
    static const std::vector<std::pair<std::string, VeraBias>> names{
        {"none", VeraBias::None}, {"all", VeraBias::All}, {"vera_only", VeraBias::VeraOnly}};
    return names;
  }

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const VeraConfig& c) {
    return nlohmann::json{
        {"r", c.r()},
        {"target_modules", io::targets_json(c.target_modules())},
        {"layers_to_transform", io::or_null(c.layers_to_transform())},
        {"layers_pattern", io::or_null(c.layers_pattern())},
        {"projection_prng_key", c.projection_prng_key()},
        {"save_projection", c.save_projection()},
        {"vera_dropout", c.vera_dropout()},
        {"d_initial", c.d_initial()},
        {"fan_in_fan_out", c.fan_in_fan_out()},
        {"bias", io::choice_name(biases(), c.bias())},
        {"modules_to_save", io::or_null(c.modules_to_save())},
        {"init_weights", c.init_weights()}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static VeraConfig from_json(io::ConfigReader& r) {
    r.get<bool>("init_weights", true);  // the weights come from the file
    return VeraConfig()
        .r(r.get<int64_t>("r", 256))
        .target_modules(r.targets("target_modules"))
        .layers_to_transform(r.ints_or_one("layers_to_transform"))
        .layers_pattern(r.strings_or_one("layers_pattern"))
        .projection_prng_key(r.get<int64_t>("projection_prng_key", 0))
        .save_projection(r.get<bool>("save_projection", true))
        .vera_dropout(r.get<double>("vera_dropout", 0.0))
        .d_initial(r.get<double>("d_initial", 0.1))
        .fan_in_fan_out(r.get<bool>("fan_in_fan_out", false))
        .bias(r.choice<VeraBias>("bias", "none", biases()))
        .modules_to_save(r.strings_or_one("modules_to_save"));
  }


  /// No random λ on re-creation: the tensors are restored afterwards.
  static VeraConfig for_loading(const VeraConfig& c) { return VeraConfig(c).init_weights(true); }
};


}  // namespace peft
