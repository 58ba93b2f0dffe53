#pragma once
/// @file
/// Prompt tuning's entry in the method list (peft/methods.h): PromptTuningConfig's HF JSON
/// (peft_type "PROMPT_TUNING") and its TorchScript tuner.

#include <peft/prompt/inject.h>
#include <peft/prompt/native.h>
#include <peft/tuner.h>

namespace peft {

/// PromptTuningConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<PromptTuningConfig> : MethodDefaults<PromptTuningConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "PROMPT_TUNING";
  /// The method's name in messages.
  static constexpr const char* name = "PromptTuning";
  /// The TorchScript tuner.
  using JitTuner = prompt::Tuner;
  /// The torch::nn tuner (see peft/nn/sites.h for what the model provides).
  static constexpr auto native_tuner = &prompt::native_tuner;

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const PromptTuningConfig& c) {
    return nlohmann::json{
        {"num_virtual_tokens", c.num_virtual_tokens()}, {"token_dim", c.token_dim()},
        {"num_transformer_submodules", 1}, {"num_attention_heads", nullptr}, {"num_layers", nullptr},
        {"prompt_tuning_init", "RANDOM"}, {"prompt_tuning_init_text", nullptr}, {"tokenizer_name_or_path", nullptr}};
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static PromptTuningConfig from_json(io::ConfigReader& r) {
    for (const char* unused : {"num_transformer_submodules", "num_attention_heads", "num_layers", "prompt_tuning_init",
                               "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"})
      r.get<nlohmann::json>(unused, nullptr);
    return PromptTuningConfig()
        .num_virtual_tokens(r.get<int64_t>("num_virtual_tokens", 0, /*required=*/true))
        .token_dim(r.get<int64_t>("token_dim", 0));
  }


  /// One such adapter per model, alone.
  static bool prompt_learning(const PromptTuningConfig&) { return true; }
};


}  // namespace peft
