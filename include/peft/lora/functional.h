#pragma once
/// @file
/// LoRA and DoRA as free functions: the single source of the math, shared by
/// the native modules, the TorchScript injector and the tests.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace peft {
namespace functional {

/// Options of functional::lora and functional::dora.
///
/// ```
/// auto y = peft::functional::lora(x, W, b, A, B,
///     peft::functional::LoraFuncOptions().scaling(2.0).dropout(0.1).training(true));
/// ```
struct LoraFuncOptions {
  /// alpha/r (or alpha/√r).
  TORCH_ARG(double, scaling) = 1.0;
  /// Dropout on the LoRA branch input only.
  TORCH_ARG(double, dropout) = 0.0;
  /// Dropout is active only when training.
  TORCH_ARG(bool, training) = false;
  /// W is stored [in, out] (GPT-2 Conv1D) instead of [out, in].
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// Per-slice LoRA (loralib's MergedLinear): one flag per equal output slice.
  TORCH_ARG(std::vector<bool>, enable_slices) = {};
};

namespace detail {

/// How many slices carry LoRA.
inline int64_t enabled_count(const std::vector<bool>& slices) {
  return static_cast<int64_t>(std::count(slices.begin(), slices.end(), true));
}

/// Joins the fused output along `dim`: the enabled slices from `enabled` in
/// order, zeros of the same shape for each disabled slice.
inline torch::Tensor scatter_slices(const std::vector<torch::Tensor>& enabled, const std::vector<bool>& slices,
                                    int64_t dim) {
  std::vector<torch::Tensor> parts;
  size_t next = 0;
  for (bool on : slices) parts.push_back(on ? enabled[next++] : torch::zeros_like(enabled.front()));
  return torch::cat(parts, dim);
}

}  // namespace detail

/// The LoRA update scaling · B·A as a full weight in the base's layout:
/// [out, in], or [in, out] with fan_in_fan_out. With enable_slices, A is
/// [r·k, in] and B [(out/n)·k, r] for k enabled of n slices (loralib's layout)
/// and disabled slices are zero.
inline torch::Tensor lora_delta_weight(const torch::Tensor& A, const torch::Tensor& B,
                                       const LoraFuncOptions& options = {}) {
  const auto& slices = options.enable_slices();
  torch::Tensor delta;
  if (slices.empty()) {
    delta = torch::matmul(B, A);
  } else {
    const auto k = detail::enabled_count(slices);
    auto A_parts = A.chunk(k, 0);
    auto B_parts = B.chunk(k, 0);
    std::vector<torch::Tensor> pieces;
    for (int64_t j = 0; j < k; ++j) pieces.push_back(torch::matmul(B_parts[j], A_parts[j]));
    delta = detail::scatter_slices(pieces, slices, 0);
  }
  delta = delta * options.scaling();
  return options.fan_in_fan_out() ? delta.t() : delta;
}

/// LoRA on an embedding (HF peft's lora.Embedding): scaling · embedding(ids, Aᵀ)·Bᵀ
/// for integer ids [...] -> [..., dim], with A [r, num_embeddings], B [dim, r] (no dropout, as HF).
inline torch::Tensor lora_embedding_branch(const torch::Tensor& ids, const torch::Tensor& A, const torch::Tensor& B,
                                           double scaling) {
  return torch::matmul(torch::embedding(A.t(), ids), B.t()) * scaling;
}

/// The embedding's update ΔW = scaling·(B·A)ᵀ, shaped like the table [num_embeddings, dim].
inline torch::Tensor lora_embedding_delta(const torch::Tensor& A, const torch::Tensor& B, double scaling) {
  return torch::matmul(B, A).t() * scaling;
}

/// The LoRA branch alone: scaling · x·Aᵀ·Bᵀ for x [..., in] (no dropout).
inline torch::Tensor lora_branch(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                                 const LoraFuncOptions& options = {}) {
  torch::Tensor after_A = torch::matmul(x, A.t());
  const auto& slices = options.enable_slices();
  if (slices.empty()) return torch::matmul(after_A, B.t()) * options.scaling();
  const auto k = detail::enabled_count(slices);
  auto A_out = after_A.chunk(k, -1);
  auto B_parts = B.chunk(k, 0);
  std::vector<torch::Tensor> pieces;
  for (int64_t j = 0; j < k; ++j) pieces.push_back(torch::matmul(A_out[j], B_parts[j].t()));
  return detail::scatter_slices(pieces, slices, -1) * options.scaling();
}

/// The frozen base: x·Wᵀ + b (x·W + b with fan_in_fan_out). `bias` may be undefined.
inline torch::Tensor base_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                 bool fan_in_fan_out) {
  return torch::nn::functional::linear(x, fan_in_fan_out ? weight.t() : weight, bias);
}

/// LoRA (Hu et al. 2021): y = x·Wᵀ + b + scaling · B·A·dropout(x).
///
/// ```
/// auto y = peft::functional::lora(x, W, b, A, B, peft::functional::LoraFuncOptions().scaling(2.0));
/// ```
inline torch::Tensor lora(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                          const torch::Tensor& A, const torch::Tensor& B, const LoraFuncOptions& options = {}) {
  torch::Tensor branch_input =
      torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions()
                                            .p(options.dropout())
                                            .training(options.training() && options.dropout() > 0));
  return base_linear(x, weight, bias, options.fan_in_fan_out()) + lora_branch(branch_input, A, B, options);
}

/// Row norms ‖W + ΔW‖ (one per output), DoRA's initial magnitude vector.
inline torch::Tensor dora_weight_norm(const torch::Tensor& weight, const torch::Tensor& A, const torch::Tensor& B,
                                      const LoraFuncOptions& options = {}) {
  torch::Tensor w = options.fan_in_fan_out() ? weight.t() : weight;
  torch::Tensor delta = lora_delta_weight(A, B, LoraFuncOptions(options).fan_in_fan_out(false));
  return (w + delta).norm(2, /*dim=*/1);
}

/// DoRA's merge-time scale m/‖W + ΔW‖ [out], shaped to multiply the weight as
/// stored ([out, in], or [in, out] with fan_in_fan_out).
inline torch::Tensor dora_weight_scale(const torch::Tensor& weight, const torch::Tensor& A, const torch::Tensor& B,
                                       const torch::Tensor& magnitude, const LoraFuncOptions& options = {}) {
  torch::Tensor scale = magnitude / dora_weight_norm(weight, A, B, options);
  return options.fan_in_fan_out() ? scale.unsqueeze(0) : scale.unsqueeze(1);
}

/// The weight with the update folded in, in its own layout and dtype: W + ΔW,
/// or DoRA's (W + ΔW)·scale with `dora_scale` from dora_weight_scale (undefined: LoRA).
inline torch::Tensor merged_weight(const torch::Tensor& weight, const torch::Tensor& A, const torch::Tensor& B,
                                   const torch::Tensor& dora_scale, const LoraFuncOptions& options = {}) {
  torch::Tensor merged = weight + lora_delta_weight(A, B, options).to(weight.dtype());
  return dora_scale.defined() ? merged * dora_scale.to(weight.dtype()) : merged;
}

/// merged_weight() undone (up to rounding), with the same `dora_scale`.
inline torch::Tensor unmerged_weight(const torch::Tensor& merged, const torch::Tensor& A, const torch::Tensor& B,
                                     const torch::Tensor& dora_scale, const LoraFuncOptions& options = {}) {
  torch::Tensor weight = dora_scale.defined() ? merged / dora_scale.to(merged.dtype()) : merged;
  return weight - lora_delta_weight(A, B, options).to(merged.dtype());
}

/// DoRA's change to the frozen layer's output y = x·Wᵀ + b, in HF peft's order
/// with the norm detached (§4.3 of Liu et al. 2024):
/// (m/‖W + s·BA‖ − 1)·(y − b) + m/‖W + s·BA‖ · s·B·A·dropout(x), where (y − b)
/// is recomputed from dropout(x) while dropout is on. Zero when m = ‖W + s·BA‖.
inline torch::Tensor dora_delta(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& weight,
                                const torch::Tensor& bias, const torch::Tensor& A, const torch::Tensor& B,
                                const torch::Tensor& magnitude, const LoraFuncOptions& options = {}) {
  check<OptionError>(options.enable_slices().empty(), "functional::dora: enable_slices is not supported with DoRA");
  const bool dropping = options.training() && options.dropout() > 0;
  torch::Tensor dropped =
      torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions().p(options.dropout()).training(dropping));
  torch::Tensor scale = magnitude / dora_weight_norm(weight, A, B, options).detach();
  torch::Tensor base_no_bias = dropping         ? base_linear(dropped, weight, torch::Tensor(), options.fan_in_fan_out())
                               : bias.defined() ? y - bias
                                                : y;
  return base_no_bias * (scale - 1) + scale * lora_branch(dropped, A, B, options);
}

/// DoRA (Liu et al. 2024): y = m/‖W + s·BA‖ · (W + s·BA)·x + b, computed as
/// x·Wᵀ + b + dora_delta(...).
inline torch::Tensor dora(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                          const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& magnitude,
                          const LoraFuncOptions& options = {}) {
  torch::Tensor y = base_linear(x, weight, bias, options.fan_in_fan_out());
  return y + dora_delta(x, y, weight, bias, A, B, magnitude, options);
}

}  // namespace functional
}  // namespace peft
