#pragma once
/// @file
/// LoRA over frozen torch::nn layers: peft::LoRALinear and peft::LoRAEmbedding.

#include <peft/core/merged_guard.h>
#include <peft/core/shape.h>
#include <peft/lora/functional.h>
#include <peft/lora/options.h>
#include <peft/quant/nf4.h>
#include <torch/torch.h>

#include <fmt/format.h>

#include <cmath>
#include <ostream>
#include <tuple>

namespace peft {

namespace detail {

/// PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W, as HF
/// peft's pissa_init; returns {A, B, residual W − s·B·A}.
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> pissa_factors(const torch::Tensor& weight, int64_t r,
                                                                             double scaling) {
  torch::Tensor U, S, Vh;
  std::tie(U, S, Vh) = at::linalg_svd(weight.to(torch::kFloat), /*full_matrices=*/false);
  torch::Tensor sqrt_s = (S.slice(0, 0, r) / scaling).sqrt();
  torch::Tensor A = (sqrt_s.unsqueeze(1) * Vh.slice(0, 0, r)).to(weight.dtype());
  torch::Tensor B = (U.slice(1, 0, r) * sqrt_s.unsqueeze(0)).to(weight.dtype());
  return {A, B, weight - scaling * torch::matmul(B, A)};
}

/// LoRA's initial factors for a layer of `in` inputs and `out` outputs whose weight
/// is `weight` [out, in] (its dtype and device; its values only for PiSSA):
/// {A [r·k, in], B [out/n·k, r], PiSSA's residual weight or an undefined tensor}
/// (n slices of which k are enabled; HF peft's init rules, see LoraInit).
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> initial_factors(const LoraOptions& o, int64_t in,
                                                                               int64_t out, const torch::Tensor& weight) {
  torch::NoGradGuard no_grad;
  const auto& slices = o.enable_slices();
  const int64_t n = slices.empty() ? 1 : static_cast<int64_t>(slices.size());
  const int64_t k = slices.empty() ? 1 : static_cast<int64_t>(std::count(slices.begin(), slices.end(), true));
  const int64_t r = o.r();
  torch::Tensor A = torch::zeros({r * k, in}, weight.options()), B = torch::zeros({out / n * k, r}, weight.options());
  switch (o.init_lora_weights()) {
    case LoraInit::Default: torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0)); break;
    case LoraInit::Gaussian: torch::nn::init::normal_(A, 0.0, 1.0 / static_cast<double>(r)); break;
    case LoraInit::Random:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      torch::nn::init::kaiming_uniform_(B, std::sqrt(5.0));
      break;
    case LoraInit::PiSSA: return pissa_factors(weight, r, o.scaling());
    case LoraInit::Zero: break;
  }
  return {A, B, torch::Tensor()};
}

}  // namespace detail

/// LoRA over a frozen `torch::nn::Linear`: y = base(x) + (alpha/r)·B·A·dropout(x).
/// Only `lora_A` [r, in] and `lora_B` [out, r] (and DoRA's
/// `lora_magnitude_vector` [out]) train; the base is frozen on construction.
///
/// ```
/// torch::nn::Linear base(768, 768);                      // pretrained, loaded elsewhere
/// peft::LoRALinear q(base, peft::LoraOptions(8).lora_alpha(16));
/// torch::optim::AdamW opt(peft::trainable_parameters(*q), 1e-3);
/// auto y = q(x);
/// q->merge();                                            // inference at base cost
/// ```
class LoRALinearImpl : public torch::nn::Module {
 public:
  /// Wraps `base_layer` and freezes it. Throws OptionError for a bad rank, alpha or dropout.
  LoRALinearImpl(torch::nn::Linear base_layer, LoraOptions options) : options_(std::move(options)) {
    check<OptionError>(!base_layer.is_empty(), "LoRALinear: the base torch::nn::Linear is empty");
    base = register_module("base", std::move(base_layer));
    const int64_t in = base->weight.size(1), out = base->weight.size(0);
    options_.validate(in, out, "LoRALinear");
    check<OptionError>(!options_.fan_in_fan_out(),
                       "LoRALinear: LoraOptions.fan_in_fan_out is for weights stored [in, out] (GPT-2 Conv1D); "
                       "torch::nn::Linear stores [out, in]");
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    if (options_.quantize_base()) quantize_base(*options_.quantize_base());
    init_factors(in, out);
  }

  /// x [..., in] -> [..., out]: base(x) plus the scaled low-rank update. In
  /// training mode while merged, backward throws ModelError (say unmerge()).
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = adapted_forward(x);
    if (!merged_ || !detail::records_training(is_training())) return y;
    return detail::fail_backward_merged(y, detail::merged_layer_message("LoRALinear", "lora_A, lora_B"));
  }

  /// forward() without the merged-training check.
  torch::Tensor adapted_forward(const torch::Tensor& x) {
    check_last_dim(x, in_features(), "LoRALinear");
    if (quantized_) return quantized_forward(x);
    if (merged_) return base->forward(x);
    if (options_.use_dora())
      return functional::dora(x, base->weight, base->bias, lora_A, lora_B, lora_magnitude_vector, func_options());
    return functional::lora(x, base->weight, base->bias, lora_A, lora_B, func_options());
  }

  /// The frozen weight forward uses: the base's, or the dequantised NF4 weight (QLoRA).
  torch::Tensor base_weight() const {
    if (!quantized_ || (merged_ && !requantized_)) return base->weight;
    return nf4::dequantize(*quantized_);
  }

  /// QLoRA: the NF4 state of the base weight (nullopt when not quantised).
  const c10::optional<nf4::Quantized>& quantized() const { return quantized_; }

  /// The current update ΔW = scaling·B·A, shaped like the base weight.
  torch::Tensor delta_weight() const { return functional::lora_delta_weight(lora_A, lora_B, func_options()); }

  /// Folds the update into the base weight; forward then costs what the base costs.
  /// QLoRA: the merged weight is kept dense (or re-quantised, with
  /// NF4Config::requantize_on_merge). Merging twice is a no-op.
  void merge() {
    if (merged_) return;
    torch::NoGradGuard no_grad;
    if (quantized_) {
      merge_quantized();
    } else {
      torch::Tensor& W = base->weight;
      if (options_.use_dora())
        dora_scale_ = functional::dora_weight_scale(W, lora_A, lora_B, lora_magnitude_vector, func_options());
      W.copy_(functional::merged_weight(W, lora_A, lora_B, dora_scale_, func_options()));
    }
    merged_ = true;
  }

  /// Restores the base weight (up to fp rounding; an NF4 base exactly). A no-op when not merged.
  void unmerge() {
    if (!merged_) return;
    torch::NoGradGuard no_grad;
    torch::Tensor& W = base->weight;
    if (requantized_) {
      nf4::copy_values(*quantized_, before_merge_);
      requantized_ = false;
    } else if (quantized_) {
      W.set_data(torch::empty({0}, W.options()));
    } else {
      W.copy_(functional::unmerged_weight(W, lora_A, lora_B, dora_scale_, func_options()));
    }
    merged_ = false;
  }

  /// Whether the update is folded into the base weight.
  bool merged() const { return merged_; }
  /// The options it was built with.
  const LoraOptions& options() const { return options_; }

  /// Prints `peft::LoRALinear(in_features=..., r=..., ...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::LoRALinear(in_features=" << in_features() << ", out_features=" << out_features()
           << ", r=" << options_.r() << ", scaling=" << options_.scaling() << (options_.use_dora() ? ", dora" : "")
           << (quantized_ ? ", nf4" : "") << (merged_ ? ", merged" : "") << ")";
  }

  /// The frozen base layer.
  torch::nn::Linear base{nullptr};
  torch::Tensor lora_A;                 ///< Trainable down-projection A [r, in].
  torch::Tensor lora_B;                 ///< Trainable up-projection B [out, r], zero at the start by default.
  torch::Tensor lora_magnitude_vector;  ///< DoRA only: trainable magnitude per output [out].

 private:
  functional::LoraFuncOptions func_options() const {
    return functional::LoraFuncOptions()
        .scaling(options_.scaling())
        .dropout(options_.lora_dropout())
        .training(is_training())
        .enable_slices(options_.enable_slices());
  }

  int64_t in_features() const { return quantized_ ? quantized_->shape[1] : base->weight.size(1); }
  int64_t out_features() const { return quantized_ ? quantized_->shape[0] : base->weight.size(0); }

  /// QLoRA: the base weight moves into NF4 buffers (`base_nf4_packed`, ...) and the fp32 one is released.
  void quantize_base(const NF4Config& config) {
    check<OptionError>(options_.init_lora_weights() != LoraInit::PiSSA && options_.enable_slices().empty(),
                       "LoRALinear: LoraInit::PiSSA and enable_slices cannot be combined with quantize_base");
    quantized_ = nf4::quantize(base->weight, config);
    register_buffer("base_nf4_packed", quantized_->packed);
    register_buffer("base_nf4_absmax", quantized_->absmax);
    if (quantized_->double_quant()) {
      register_buffer("base_nf4_nested_absmax", quantized_->nested_absmax);
      register_buffer("base_nf4_nested_offset", quantized_->nested_offset);
    }
    base->weight.set_data(torch::empty({0}, base->weight.options()));
  }

  /// QLoRA forward: the base in the compute dtype, the LoRA branch in the factors' dtype.
  torch::Tensor quantized_forward(const torch::Tensor& x) {
    if (merged_ && !requantized_) return base->forward(x);  // merged dense
    if (options_.use_dora() && !merged_)
      return functional::dora(x, nf4::dequantize(*quantized_).to(x.scalar_type()), base->bias, lora_A, lora_B,
                              lora_magnitude_vector, func_options());
    const auto compute = quantized_->dtype;
    torch::Tensor bias = base->bias.defined() ? base->bias.to(compute) : base->bias;
    torch::Tensor y = nf4::linear(x.to(compute), *quantized_, bias).to(x.scalar_type());  // keeps no dequantised weight
    if (merged_) return y;  // re-quantised with the update folded in
    torch::Tensor dropped = torch::nn::functional::dropout(
        x, torch::nn::functional::DropoutFuncOptions().p(options_.lora_dropout()).training(is_training() && options_.lora_dropout() > 0));
    return y + functional::lora_branch(dropped.to(lora_A.scalar_type()), lora_A, lora_B, func_options()).to(y.scalar_type());
  }

  void merge_quantized() {
    nf4::Quantized fp32 = *quantized_;
    fp32.dtype = torch::kFloat;
    torch::Tensor W = nf4::dequantize(fp32);
    if (options_.use_dora())
      dora_scale_ = functional::dora_weight_scale(W, lora_A, lora_B, lora_magnitude_vector, func_options());
    torch::Tensor merged = functional::merged_weight(W, lora_A, lora_B, dora_scale_, func_options());
    if (!options_.quantize_base()->requantize_on_merge()) {
      base->weight.set_data(merged.to(lora_A.scalar_type()));
      return;
    }
    before_merge_ = nf4::deep_copy(*quantized_);
    nf4::copy_values(*quantized_, nf4::quantize_like(merged, *quantized_));
    requantized_ = true;
    warn("LoRALinear merge re-quantises the NF4 base weight: max |error| {:.3g}",
         (nf4::dequantize(*quantized_).to(torch::kFloat) - merged).abs().max().item<double>());
  }

  void init_factors(int64_t in, int64_t out) {
    torch::NoGradGuard no_grad;
    torch::Tensor A, B, residual;
    std::tie(A, B, residual) = detail::initial_factors(options_, in, out, base->weight);
    if (residual.defined()) base->weight.copy_(residual);
    lora_A = register_parameter("lora_A", A);
    lora_B = register_parameter("lora_B", B);
    if (options_.use_dora())
      lora_magnitude_vector = register_parameter(
          "lora_magnitude_vector",
          functional::dora_weight_norm(base_weight().to(A.scalar_type()), lora_A, lora_B, func_options()));
  }

  LoraOptions options_;
  bool merged_ = false;
  torch::Tensor dora_scale_;  // DoRA: m/‖W + ΔW‖ at merge time, shaped like the weight, to unmerge
  c10::optional<nf4::Quantized> quantized_;  // QLoRA: the base weight in NF4
  nf4::Quantized before_merge_;              // QLoRA, re-quantising merge: the state to restore
  bool requantized_ = false;
};

/// Holder of LoRALinearImpl (see there).
TORCH_MODULE(LoRALinear);

/// LoRA over a frozen `torch::nn::Embedding`, as HF peft: A = 0 [r, num], B ~ N(0, 1)
/// [dim, r]; y = base(ids) + scaling · embedding(ids, Aᵀ)·Bᵀ. No dropout (as HF).
///
/// ```
/// peft::LoRAEmbedding wte(torch::nn::Embedding(50257, 768), peft::LoraOptions(8));
/// auto h = wte(input_ids);
/// ```
class LoRAEmbeddingImpl : public torch::nn::Module {
 public:
  /// Wraps `base_layer` and freezes it. Throws OptionError for a bad rank, alpha or dropout.
  LoRAEmbeddingImpl(torch::nn::Embedding base_layer, LoraOptions options) : options_(std::move(options)) {
    check<OptionError>(!base_layer.is_empty(), "LoRAEmbedding: the base torch::nn::Embedding is empty");
    base = register_module("base", std::move(base_layer));
    const int64_t num = base->weight.size(0), dim = base->weight.size(1);
    options_.validate(num, dim, "LoRAEmbedding");
    check<OptionError>(!options_.use_dora() && options_.enable_slices().empty() && !options_.fan_in_fan_out() &&
                           options_.init_lora_weights() != LoraInit::PiSSA,
                       "LoRAEmbedding: use_dora, enable_slices, fan_in_fan_out and LoraInit::PiSSA apply to linear "
                       "layers only");
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    torch::NoGradGuard no_grad;
    const auto like = base->weight.options();
    torch::Tensor A = torch::zeros({options_.r(), num}, like), B = torch::zeros({dim, options_.r()}, like);
    if (options_.init_lora_weights() == LoraInit::Random) torch::nn::init::normal_(A);
    if (options_.init_lora_weights() != LoraInit::Zero) torch::nn::init::normal_(B);
    lora_embedding_A = register_parameter("lora_embedding_A", A);
    lora_embedding_B = register_parameter("lora_embedding_B", B);
  }

  /// input_ids [...] -> [..., dim]: base lookup plus the scaled low-rank update.
  torch::Tensor forward(const torch::Tensor& input_ids) {
    check<ShapeError>(!input_ids.is_floating_point(), "LoRAEmbedding: expected integer token ids, got {}",
                      std::string(c10::toString(input_ids.scalar_type())));
    if (merged_ && detail::records_training(is_training()))
      return detail::fail_backward_merged(base->forward(input_ids),
                                          detail::merged_layer_message("LoRAEmbedding", "lora_embedding_A, lora_embedding_B"));
    if (merged_) return base->forward(input_ids);
    return base->forward(input_ids) +
           functional::lora_embedding_branch(input_ids, lora_embedding_A, lora_embedding_B, options_.scaling());
  }

  /// ΔW = scaling·(B·A)ᵀ, shaped like the embedding table [num, dim].
  torch::Tensor delta_weight() const {
    return functional::lora_embedding_delta(lora_embedding_A, lora_embedding_B, options_.scaling());
  }

  /// Folds the update into the table. Merging twice is a no-op.
  void merge() {
    if (merged_) return;
    torch::NoGradGuard no_grad;
    base->weight.add_(delta_weight());
    merged_ = true;
  }

  /// Restores the table (up to fp rounding). A no-op when not merged.
  void unmerge() {
    if (!merged_) return;
    torch::NoGradGuard no_grad;
    base->weight.sub_(delta_weight());
    merged_ = false;
  }

  /// Whether the update is folded into the base table.
  bool merged() const { return merged_; }
  /// The options it was built with.
  const LoraOptions& options() const { return options_; }

  /// Prints `peft::LoRAEmbedding(...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::LoRAEmbedding(num_embeddings=" << base->weight.size(0)
           << ", embedding_dim=" << base->weight.size(1) << ", r=" << options_.r() << ")";
  }

  /// The frozen base embedding.
  torch::nn::Embedding base{nullptr};
  torch::Tensor lora_embedding_A;  ///< Trainable A [r, vocab], zero at the start by default (as HF peft).
  torch::Tensor lora_embedding_B;  ///< Trainable B [dim, r], Gaussian at the start.

 private:
  LoraOptions options_;
  bool merged_ = false;
};

/// Holder of LoRAEmbeddingImpl (see there).
TORCH_MODULE(LoRAEmbedding);

}  // namespace peft
