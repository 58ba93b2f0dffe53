#pragma once
/// @file
/// Prefix tuning's entry in the method list (peft/methods.h): PrefixTuningConfig's HF JSON
/// (peft_type "PREFIX_TUNING") and its TorchScript tuner.

#include <peft/prefix/inject.h>
#include <peft/prefix/native.h>
#include <peft/tuner.h>

namespace peft {

/// PrefixTuningConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<PrefixTuningConfig> : MethodDefaults<PrefixTuningConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "PREFIX_TUNING";
  /// The method's name in messages.
  static constexpr const char* name = "PrefixTuning";
  /// The TorchScript tuner.
  using JitTuner = prefix::Tuner;
  /// The torch::nn tuner (see peft/nn/sites.h for what the model provides).
  static constexpr auto native_tuner = &prefix::native_tuner;

  /// Prefixes are saved folded (prefix_projection false), as HF saves them for inference.
  static nlohmann::json to_json(const PrefixTuningConfig& c) {
    return nlohmann::json{
        {"num_virtual_tokens", c.num_virtual_tokens()}, {"num_transformer_submodules", 1},
        {"encoder_hidden_size", c.encoder_hidden_size()}, {"prefix_projection", false}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static PrefixTuningConfig from_json(io::ConfigReader& r) {
    const int64_t heads = r.get<int64_t>("num_attention_heads", 0), token_dim = r.get<int64_t>("token_dim", 0);
    r.get<bool>("prefix_projection", false);  // prefixes are stored folded
    for (const char* unused : {"num_transformer_submodules", "num_layers"}) r.get<nlohmann::json>(unused, nullptr);
    return PrefixTuningConfig()
        .num_virtual_tokens(r.get<int64_t>("num_virtual_tokens", 0, /*required=*/true))
        .encoder_hidden_size(r.get<int64_t>("encoder_hidden_size", 512))
        .num_key_value_heads(heads)
        .head_dim(heads > 0 ? token_dim / heads : 0);
  }


  /// One such adapter per model, alone.
  static bool prompt_learning(const PrefixTuningConfig&) { return true; }
};


}  // namespace peft
