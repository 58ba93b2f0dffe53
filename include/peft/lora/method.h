#pragma once
/// @file
/// LoRA's entry in the method list (peft/methods.h): LoraConfig's HF JSON (peft_type "LORA"),
/// its TorchScript tuner, and QLoRA's quantisation of the base model.

#include <peft/lora/config.h>
#include <peft/lora/inject.h>
#include <peft/lora/native.h>
#include <peft/quant/inject.h>
#include <peft/tuner.h>

#include <cmath>

namespace peft {

/// LoraConfig's hooks (see Method in peft/tuner.h).
template <>
struct Method<LoraConfig> : MethodDefaults<LoraConfig> {
  /// adapter_config.json's peft_type.
  static constexpr const char* peft_type = "LORA";
  /// The method's name in messages.
  static constexpr const char* name = "LoRA";
  /// The TorchScript tuner.
  using JitTuner = lora::Tuner;
  /// The torch::nn tuner (peft::nn layers).
  static constexpr auto native_tuner = &lora::native_tuner;

  /// HF's config fields beyond the common ones.
  static nlohmann::json to_json(const LoraConfig& c) {
    using io::or_null;
    using io::targets_json;
    nlohmann::json j;
    const LoraInit init = c.init_lora_weights();
    const double alpha = c.lora_alpha();  // HF's field is an int; keep it one when it is whole
    j.update({{"r", c.r()},
              {"lora_alpha", alpha == std::floor(alpha) ? nlohmann::json(static_cast<int64_t>(alpha)) : nlohmann::json(alpha)},
              {"lora_dropout", c.lora_dropout()},
              {"target_modules", targets_json(c.target_modules())},
              {"exclude_modules", targets_json(c.exclude_modules())},
              {"layers_to_transform", or_null(c.layers_to_transform())},
              {"layers_pattern", or_null(c.layers_pattern())},
              {"rank_pattern", c.rank_pattern()},
              {"alpha_pattern", c.alpha_pattern()},
              {"use_rslora", c.use_rslora()},
              {"use_dora", c.use_dora()},
              {"init_lora_weights", init == LoraInit::Gaussian ? nlohmann::json("gaussian")
                                    : init == LoraInit::PiSSA  ? nlohmann::json("pissa")
                                                               : nlohmann::json(init != LoraInit::Random)},
              {"fan_in_fan_out", c.fan_in_fan_out()},
              {"bias", c.bias() == LoraBias::None ? "none" : c.bias() == LoraBias::All ? "all" : "lora_only"},
              {"modules_to_save", or_null(c.modules_to_save())},
              {"ensure_weight_tying", c.ensure_weight_tying()}});
    if (!c.slice_pattern().empty()) j["slice_pattern"] = c.slice_pattern();  // peft-cpp's per-slice LoRA
    return j;
  }

  /// The config an adapter_config.json describes, set up for loading weights.
  static LoraConfig from_json(io::ConfigReader& r) {
    const LoraBias bias =
        r.choice<LoraBias>("bias", "none", {{"none", LoraBias::None}, {"all", LoraBias::All}, {"lora_only", LoraBias::LoraOnly}});
    r.get<nlohmann::json>("init_lora_weights", nullptr);  // the weights come from the file
    return LoraConfig()
        .r(r.get<int64_t>("r", 8, /*required=*/true))
        .lora_alpha(r.get<double>("lora_alpha", 8.0))
        .lora_dropout(r.get<double>("lora_dropout", 0.0))
        .target_modules(r.targets("target_modules"))
        .exclude_modules(r.targets("exclude_modules"))
        .layers_to_transform(r.ints_or_one("layers_to_transform"))
        .layers_pattern(r.strings_or_one("layers_pattern"))
        .rank_pattern(r.get<RankPattern>("rank_pattern", {}))
        .alpha_pattern(r.get<AlphaPattern>("alpha_pattern", {}))
        .use_rslora(r.get<bool>("use_rslora", false))
        .use_dora(r.get<bool>("use_dora", false))
        .fan_in_fan_out(r.get<bool>("fan_in_fan_out", false))
        .bias(bias)
        .modules_to_save(r.strings_or_one("modules_to_save"))
        .slice_pattern(r.get<SlicePattern>("slice_pattern", {}))
        .ensure_weight_tying(r.get<bool>("ensure_weight_tying", false))
        .init_lora_weights(LoraInit::Zero);
  }


  /// DoRA rescales the layer's output.
  static bool rescales_layers(const LoraConfig& c) { return c.use_dora(); }
  /// QLoRA changes the base model (only a first adapter may).
  static std::string base_change(const LoraConfig& c) { return c.quantize_base() ? "LoraConfig.quantize_base" : ""; }
  /// No random or PiSSA initialisation: the tensors are restored afterwards.
  static LoraConfig for_loading(const LoraConfig& c) { return LoraConfig(c).init_lora_weights(LoraInit::Zero); }

  /// QLoRA: the layers the config targets (or every linear layer) quantised to
  /// NF4 in place; modules_to_save train dense copies, so they stay dense.
  static torch::jit::Module prepare_base(torch::jit::Module base, const LoraConfig& c) {
    if (!c.quantize_base()) return base;
    const NF4Config& nf4 = *c.quantize_base();
    std::vector<std::string> candidates, layers;
    if (nf4.quantize_all_linear()) {
      candidates = nf4::linear_layers(base);
    } else {
      auto graph = jit::inlined_copy(*jit::method_graph(base, "forward"), nullptr, jit::Injection::is_peft_call);
      for (const auto& entry : jit::select_linear_targets(*graph, base, c.rule(), "LoraConfig"))
        candidates.push_back(entry.first);
    }
    for (const auto& name : candidates)
      if (std::none_of(c.modules_to_save().begin(), c.modules_to_save().end(),
                       [&](const std::string& key) { return TargetModules::matches_key(name, key); }))
        layers.push_back(name);
    nf4::quantize_linear_layers(base, layers, nf4);
    return base;
  }
};


}  // namespace peft
