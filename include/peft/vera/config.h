#pragma once
/// @file
/// VeraConfig: VeRA for a whole model, with HF peft's field names (VeraConfig).

#include <peft/core/match.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace peft {

/// Which biases train alongside VeRA (HF's `bias`: "none", "all", "vera_only").
enum class VeraBias { None, All, VeraOnly };

/// VeRA (Kopiczko et al. 2024): every targeted linear layer gets
/// y + λ_b ⊙ B·(λ_d ⊙ A·x), with one pair of frozen random projections
/// vera_A [r, max_in], vera_B [max_out, r] shared by all layers (each uses its
/// leading slice) and only λ_d [r], λ_b [out] trained per layer.
///
/// ```
/// auto cfg = peft::VeraConfig().r(256).target_modules({"q_proj", "v_proj"});
/// peft::PeftModel model = peft::get_peft_model(torch::jit::load("model.pt"), cfg);
/// ```
struct VeraConfig {
  /// Rank of the shared projections (HF's default 256: VeRA trades rank for per-layer parameters).
  TORCH_ARG(int64_t, r) = 256;
  /// Names (exact, or a suffix after a dot), one regex (full match), or "all-linear".
  TORCH_ARG(TargetModules, target_modules);
  /// Only these layer indices (the number after `layers_pattern.` in the name).
  TORCH_ARG(std::vector<int64_t>, layers_to_transform) = {};
  /// Name of the layer list whose index layers_to_transform means (e.g. "layers").
  TORCH_ARG(std::vector<std::string>, layers_pattern) = {};
  /// Seed of the projections: HF's draw (torch's CPU generator, kaiming uniform), reproduced bit for bit.
  TORCH_ARG(int64_t, projection_prng_key) = 0;
  /// Write vera_A / vera_B into the adapter file (else they are re-drawn from the seed on load).
  TORCH_ARG(bool, save_projection) = true;
  /// Dropout on the VeRA branch's input while training.
  TORCH_ARG(double, vera_dropout) = 0.0;
  /// Initial value of every λ_d entry (λ_b starts at 0, so the model starts as the base).
  TORCH_ARG(double, d_initial) = 0.1;
  /// Weights stored [in, out]. Detected from the graph; kept for HF's config file.
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// Which biases train too: None, All, or those of the VeRA layers.
  TORCH_ARG(VeraBias, bias) = VeraBias::None;
  /// Base submodules (e.g. a classifier head) that train fully, as copies.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};
  /// true: λ_b = 0, λ_d = d_initial (the base model at step 0); false: λ_b = 1, λ_d ~ N(0, 1) (HF's).
  TORCH_ARG(bool, init_weights) = true;

 public:  // TORCH_ARG leaves the section private
  /// The module-selection fields (VeRA has no exclude_modules in HF).
  TargetRule rule() const { return {target_modules_, {}, layers_to_transform_, layers_pattern_}; }
};

}  // namespace peft
