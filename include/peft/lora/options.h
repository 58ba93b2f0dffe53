#pragma once
/// @file
/// Options of the native LoRA modules (peft::LoRALinear, peft::LoRAEmbedding).

#include <peft/core/error.h>
#include <peft/quant/nf4.h>
#include <torch/arg.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace peft {

/// How LoRA's factors start.
enum class LoraInit {
  Default,   ///< A kaiming-uniform(a=√5), B = 0 (embeddings: A = 0, B normal): starts as the base
  Gaussian,  ///< A ~ N(0, 1/r²) (std 1/r), B = 0
  PiSSA,     ///< A, B from the top-r SVD of W; the base weight becomes the residual W − s·B·A
  Random,    ///< A and B both random (HF's init_lora_weights=False): does not start as the base
  Zero,      ///< A = 0, B = 0: placeholders to be overwritten by loaded weights (no RNG used)
};

/// Options of LoRA: `W' = W + scaling · B·A`, scaling = lora_alpha/r (lora_alpha/√r with rsLoRA); field names as HF's LoraConfig.
///
/// ```
/// auto opts = peft::LoraOptions(8).lora_alpha(16).lora_dropout(0.05).use_dora(true);
/// ```
struct LoraOptions {
  /// Options with rank `r` (>= 1).
  /* implicit */ LoraOptions(int64_t r) : r_(r) {}

  /// Rank of the update, >= 1; above min(in, out) it is allowed as in HF peft (warned; not with PiSSA).
  TORCH_ARG(int64_t, r);
  /// Scaling numerator (HF's `lora_alpha`).
  TORCH_ARG(double, lora_alpha) = 8.0;
  /// Dropout probability on the LoRA branch input, in [0, 1).
  TORCH_ARG(double, lora_dropout) = 0.0;
  /// Scale by alpha/√r instead of alpha/r (Kalajdzievski 2023).
  TORCH_ARG(bool, use_rslora) = false;
  /// Weight-decomposed LoRA (Liu et al. 2024): a trained magnitude per output.
  TORCH_ARG(bool, use_dora) = false;
  /// Initialisation of A and B.
  TORCH_ARG(LoraInit, init_lora_weights) = LoraInit::Default;
  /// The base weight is stored [in, out] (GPT-2's Conv1D) rather than [out, in].
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// Per-slice LoRA on a fused projection (e.g. q|k|v): one flag per equal
  /// slice of the output; LoRA only where true. Empty: the whole output.
  TORCH_ARG(std::vector<bool>, enable_slices) = {};
  /// QLoRA (peft::LoRALinear): keep the frozen base weight in NF4, dequantised in forward.
  TORCH_ARG(c10::optional<NF4Config>, quantize_base) = c10::nullopt;

 public:  // TORCH_ARG leaves the section private
  /// alpha/r, or alpha/√r with use_rslora.
  double scaling() const {
    return use_rslora_ ? lora_alpha_ / std::sqrt(static_cast<double>(r_)) : lora_alpha_ / static_cast<double>(r_);
  }

  /// Checks the options against a layer of `in` inputs and `out` outputs;
  /// `where` names the layer in the error message. A rank above min(in, out) is
  /// allowed, as in HF peft (the update's rank is then at most min(in, out)), with
  /// a warning when `warn_rank` (configs built in code; files load quietly).
  void validate(int64_t in, int64_t out, const std::string& where, bool warn_rank = true) const {
    check<OptionError>(r_ >= 1, "{}: LoraOptions.r must be >= 1, got {}", where, r_);
    check<OptionError>(r_ <= std::min(in, out) || init_lora_weights_ != LoraInit::PiSSA,
                       "{}: LoraInit::PiSSA needs LoraOptions.r <= min(in={}, out={}), got {}", where, in, out, r_);
    if (warn_rank && r_ > std::min(in, out))
      warn("{}: LoraOptions.r = {} exceeds min(in={}, out={}); the update's rank is at most {}", where, r_, in, out,
           std::min(in, out));
    check<OptionError>(lora_dropout_ >= 0.0 && lora_dropout_ < 1.0, "{}: LoraOptions.lora_dropout must be in [0, 1), got {}", where,
                       lora_dropout_);
    check<OptionError>(std::isfinite(lora_alpha_) && lora_alpha_ != 0,
                       "{}: LoraOptions.lora_alpha must be finite and non-zero (0 makes the adapter a no-op), got {}", where,
                       lora_alpha_);
    if (quantize_base_) quantize_base_->validate(where);
    if (enable_slices_.empty()) return;
    const auto n = static_cast<int64_t>(enable_slices_.size());
    check<OptionError>(out % n == 0, "{}: LoraOptions.enable_slices has {} slices, which does not divide the {} outputs",
                       where, n, out);
    check<OptionError>(std::count(enable_slices_.begin(), enable_slices_.end(), true) > 0,
                       "{}: LoraOptions.enable_slices enables no slice", where);
    check<OptionError>(!use_dora_, "{}: LoraOptions.use_dora cannot be combined with enable_slices", where);
    check<OptionError>(init_lora_weights_ != LoraInit::PiSSA, "{}: LoraInit::PiSSA cannot be combined with enable_slices", where);
  }
};

}  // namespace peft
