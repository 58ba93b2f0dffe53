#pragma once
/// @file
/// LoraConfig: LoRA for a whole model, with HF peft's field names.

#include <peft/core/match.h>
#include <peft/lora/options.h>
#include <peft/quant/nf4.h>

#include <map>
#include <string>
#include <vector>

namespace peft {

/// Per-module output-slice flags (see LoraConfig::slice_pattern).
using SlicePattern = std::map<std::string, std::vector<bool>>;
/// Per-module rank and alpha (see LoraConfig::rank_pattern).
using RankPattern = std::map<std::string, int64_t>;
/// Per-module alpha, keyed by a regex of the module name.
using AlphaPattern = std::map<std::string, double>;

/// Which biases train alongside LoRA (HF's `bias`).
enum class LoraBias { None, All, LoraOnly };

/// LoRA on the linear layers of a loaded TorchScript model.
///
/// ```
/// auto cfg = peft::LoraConfig().r(8).lora_alpha(16).lora_dropout(0.05).target_modules({"q_proj", "v_proj"});
/// peft::PeftModel model = peft::get_peft_model(torch::jit::load("model.pt"), cfg);
/// ```
struct LoraConfig {
  /// Rank of the update (>= 1).
  TORCH_ARG(int64_t, r) = 8;
  /// Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora).
  TORCH_ARG(double, lora_alpha) = 8.0;
  /// Dropout on the LoRA branch's input while training.
  TORCH_ARG(double, lora_dropout) = 0.0;
  /// Names (exact, or a suffix after a dot), one regex (full match), or "all-linear".
  TORCH_ARG(TargetModules, target_modules);
  /// Submodules never targeted, even when target_modules matches them.
  TORCH_ARG(TargetModules, exclude_modules);
  /// Only these layer indices (the number after `layers_pattern.` in the name).
  TORCH_ARG(std::vector<int64_t>, layers_to_transform) = {};
  /// Name of the layer list whose index layers_to_transform means (e.g. "layers").
  TORCH_ARG(std::vector<std::string>, layers_pattern) = {};
  /// Per-module rank / alpha: key k applies where `(.*\.)?(k)` matches the name.
  TORCH_ARG(RankPattern, rank_pattern) = {};
  /// Per-module alpha: key k applies where it matches as for rank_pattern.
  TORCH_ARG(AlphaPattern, alpha_pattern) = {};
  /// Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
  TORCH_ARG(bool, use_rslora) = false;
  /// DoRA: a trainable magnitude per output over the normalised W + BA (Liu et al. 2024).
  TORCH_ARG(bool, use_dora) = false;
  /// How A and B start: Default (B = 0), Gaussian, PiSSA, or no zero B.
  TORCH_ARG(LoraInit, init_lora_weights) = LoraInit::Default;
  /// Weights stored [in, out]. Detected from the graph (x @ W); kept for HF's config file.
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// Which biases train too: None, All, or those of the LoRA layers.
  TORCH_ARG(LoraBias, bias) = LoraBias::None;
  /// Base submodules (e.g. a classifier head) that train fully, as copies.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};
  /// modules_to_save on a module whose weight is tied to another (GPT-2's wte and
  /// lm_head): false (HF's default) trains a copy for the named module only, the
  /// other keeps the untrained weight, in the adapted and the merged model alike;
  /// true (HF's ensure_weight_tying) gives the tied module the trained copy too.
  TORCH_ARG(bool, ensure_weight_tying) = false;
  /// Per-slice LoRA on fused projections: key as in rank_pattern, value one flag
  /// per equal output slice, e.g. {"c_attn", {true, false, true}} for q and v of GPT-2.
  TORCH_ARG(SlicePattern, slice_pattern) = {};
  /// QLoRA: the targeted (or, with NF4Config::quantize_all_linear, every) frozen
  /// linear layer's weight is quantised to NF4 in the base model, in place.
  TORCH_ARG(c10::optional<NF4Config>, quantize_base) = c10::nullopt;

 public:  // TORCH_ARG leaves the section private
  /// The module-selection fields.
  TargetRule rule() const { return {target_modules_, exclude_modules_, layers_to_transform_, layers_pattern_}; }

  /// LoraOptions for the module `name`, after rank_pattern / alpha_pattern / slice_pattern.
  LoraOptions options_for(const std::string& name) const {
    return LoraOptions(pattern_value(rank_pattern_, name).value_or(r_))
        .lora_alpha(pattern_value(alpha_pattern_, name).value_or(lora_alpha_))
        .lora_dropout(lora_dropout_)
        .use_rslora(use_rslora_)
        .use_dora(use_dora_)
        .init_lora_weights(init_lora_weights_)
        .enable_slices(pattern_value(slice_pattern_, name).value_or(std::vector<bool>{}));
  }
};

}  // namespace peft
