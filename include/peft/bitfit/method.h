#pragma once
/// @file
/// BitFit's entry in the method list (peft/methods.h): BitFitConfig's JSON (peft_type
/// "BITFIT", a method HF peft lacks) and its TorchScript tuner.

#include <peft/bitfit/inject.h>
#include <peft/bitfit/native.h>
#include <peft/tuner.h>

namespace peft {

/// BitFitConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<BitFitConfig> : MethodDefaults<BitFitConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "BITFIT";
  /// The method's name in messages.
  static constexpr const char* name = "BitFit";
  /// The TorchScript tuner.
  using JitTuner = bitfit::Tuner;
  /// The torch::nn tuner (see peft/nn/sites.h for what the model provides).
  static constexpr auto native_tuner = &bitfit::native_tuner;

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const BitFitConfig& c) {
    return nlohmann::json{{"bias", c.bias()}, {"norm", c.norm()}, {"modules_to_save", io::or_null(c.modules_to_save())}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static BitFitConfig from_json(io::ConfigReader& r) {
    return BitFitConfig()
        .bias(r.get<bool>("bias", true))
        .norm(r.get<bool>("norm", false))
        .modules_to_save(r.strings_or_one("modules_to_save"));
  }

};


}  // namespace peft
