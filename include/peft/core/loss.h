#pragma once
/// @file
/// Cross entropy of a linear output head without the full logits: the head is
/// applied a chunk of tokens at a time, and each chunk's gradients are computed
/// while its logits exist, so the [tokens, vocab] logits, their softmax and their
/// gradient never exist at once (what fused linear cross-entropy kernels, e.g.
/// Liger's, do). Equal, up to
/// summation order, to `cross_entropy(hidden·Wᵀ + b, targets)` in fp32.

#include <peft/core/error.h>
#include <peft/core/shape.h>
#include <torch/torch.h>

#include <algorithm>

namespace peft {

/// Options of linear_cross_entropy / causal_lm_loss.
struct LinearCrossEntropyOptions {
  /// Tokens per chunk; 0: as many as make a chunk of about 2^22 logits (16 MiB in fp32).
  TORCH_ARG(int64_t, chunk_tokens) = 0;
  /// Targets equal to it add nothing to the loss or its mean (PyTorch's and HF's -100).
  TORCH_ARG(int64_t, ignore_index) = -100;
};

namespace detail {

/// The chunks' logits in fp32 (HF upcasts logits before its loss).
inline torch::Tensor chunk_logits(const torch::Tensor& h, const torch::Tensor& weight, const torch::Tensor& bias) {
  return torch::nn::functional::linear(h, weight, bias).to(torch::kFloat);
}

/// forward: the summed loss over valid targets / their count, chunk by chunk; when an
/// input needs a gradient, each chunk's d loss / d logits = (softmax − one-hot) / count is
/// turned into the gradients of hidden, weight and bias right away (the logits exist
/// once, as in Liger's fused linear cross entropy); backward scales them by the
/// incoming gradient. (LibTorch 1.13's Function::apply takes no undefined tensors: no
/// bias is an empty one.)
struct LinearCrossEntropyFunction : torch::autograd::Function<LinearCrossEntropyFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden, const torch::Tensor& weight,
                               const torch::Tensor& head_bias, const torch::Tensor& targets, int64_t chunk, int64_t ignore_index,
                               bool recording) {
    const int64_t n = hidden.size(0);
    const torch::Tensor bias = head_bias.numel() > 0 ? head_bias : torch::Tensor();
    const bool want_hidden = recording && hidden.requires_grad(), want_weight = recording && weight.requires_grad(),
               want_bias = recording && bias.defined() && bias.requires_grad();
    const torch::Tensor valid = targets.ne(ignore_index);
    const torch::Tensor safe_targets = targets.masked_fill(valid.logical_not(), 0);
    const torch::Tensor count = valid.sum().to(torch::kFloat);
    torch::Tensor grad_hidden = want_hidden ? torch::empty_like(hidden) : torch::Tensor();
    torch::Tensor grad_weight = want_weight ? torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat)) : torch::Tensor();
    torch::Tensor grad_bias = want_bias ? torch::zeros(bias.sizes(), bias.options().dtype(torch::kFloat)) : torch::Tensor();
    torch::Tensor total = torch::zeros({}, hidden.options().dtype(torch::kFloat));
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      const torch::Tensor h = hidden.narrow(0, start, len), t = safe_targets.narrow(0, start, len).unsqueeze(1);
      const torch::Tensor v = valid.narrow(0, start, len).to(torch::kFloat);
      torch::Tensor logits = chunk_logits(h, weight, bias);
      const torch::Tensor lse = logits.logsumexp(1, /*keepdim=*/true);
      total += ((lse.squeeze(1) - logits.gather(1, t).squeeze(1)) * v).sum();
      if (!want_hidden && !want_weight && !want_bias) continue;
      torch::Tensor& g = logits.sub_(lse).exp_();  // softmax, in place of the logits
      g.scatter_add_(1, t, torch::full({len, 1}, -1.0f, g.options())).mul_((v / count).unsqueeze(1));
      if (want_hidden) grad_hidden.narrow(0, start, len).copy_(torch::mm(g.to(weight.scalar_type()), weight));
      if (want_weight) grad_weight.addmm_(g.t(), h.to(torch::kFloat));
      if (want_bias) grad_bias += g.sum(0);
    }
    ctx->save_for_backward({grad_hidden.defined() ? grad_hidden : torch::empty({0}),
                            want_weight ? grad_weight.to(weight.scalar_type()) : torch::empty({0}),
                            want_bias ? grad_bias.to(bias.scalar_type()) : torch::empty({0})});
    return total / count;  // NaN when every target is ignored, as PyTorch's mean reduction gives
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    auto scaled = [&](size_t i) { return saved[i].numel() > 0 ? saved[i] * grad[0].to(saved[i].scalar_type()) : torch::Tensor(); };
    return {scaled(0), scaled(1), scaled(2), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace detail

/// Mean cross entropy of the logits `hidden`·`weight`ᵀ + `bias` against `targets`,
/// computed a chunk of tokens at a time (see the file comment): equal to
/// `torch::nn::functional::cross_entropy(linear(hidden, weight, bias).to(kFloat), targets)`
/// with ignore_index, up to summation order (tests: 1e-5 relative in fp32).
///
/// hidden [..., H] (any float dtype, the weight's), weight [V, H], bias [V] or undefined,
/// targets [...] int64 in [0, V) or ignore_index -> fp32 scalar (NaN when every target is
/// ignored, as PyTorch gives). Gradients reach hidden, weight and bias where they require
/// them (a tied embedding gets one [V, H] fp32 accumulator). ShapeError for mismatched shapes.
///
/// ```
/// torch::Tensor loss = peft::linear_cross_entropy(hidden, lm_head->weight, {}, targets);
/// ```
inline torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias,
                                          const torch::Tensor& targets, const LinearCrossEntropyOptions& options = {}) {
  check<ShapeError>(weight.dim() == 2 && hidden.dim() >= 1 && hidden.size(-1) == weight.size(1),
                    "linear_cross_entropy: hidden {} does not match the head's weight {} ([vocab, hidden])",
                    shape_str(hidden.sizes()), shape_str(weight.sizes()));
  check<ShapeError>(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0)),
                    "linear_cross_entropy: bias {} does not match the head's {} outputs", shape_str(bias.sizes()), weight.size(0));
  check<ShapeError>(targets.scalar_type() == torch::kLong && targets.numel() * hidden.size(-1) == hidden.numel(),
                    "linear_cross_entropy: targets {} ({}) must be int64, one per row of hidden {}",
                    shape_str(targets.sizes()), c10::toString(targets.scalar_type()), shape_str(hidden.sizes()));
  check<OptionError>(options.chunk_tokens() >= 0, "LinearCrossEntropyOptions.chunk_tokens must be >= 0, got {}",
                     options.chunk_tokens());
  const int64_t chunk = options.chunk_tokens() > 0 ? options.chunk_tokens()
                                                   : std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, weight.size(0)));
  const torch::Tensor head_bias = bias.defined() ? bias : torch::empty({0}, weight.options());
  return detail::LinearCrossEntropyFunction::apply(hidden.reshape({-1, hidden.size(-1)}), weight, head_bias,
                                                   targets.reshape({-1}), chunk, options.ignore_index(),
                                                   torch::GradMode::is_enabled());  // (apply turns it off inside)
}

/// HF's causal-LM loss (transformers' ForCausalLMLoss) without the logits: position t
/// predicts labels[t + 1]; labels equal to ignore_index (padding: -100) add nothing.
/// hidden [B, T, H] (the body's output before lm_head), labels [B, T] int64 -> fp32 scalar.
///
/// ```
/// torch::Tensor loss = peft::causal_lm_loss(hidden, lm_head->weight, {}, labels);
/// loss.backward();
/// ```
inline torch::Tensor causal_lm_loss(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& bias,
                                    const torch::Tensor& labels, const LinearCrossEntropyOptions& options = {}) {
  check<ShapeError>(hidden.dim() == 3 && labels.dim() == 2 && labels.size(0) == hidden.size(0) &&
                        labels.size(1) == hidden.size(1) && hidden.size(1) >= 2,
                    "causal_lm_loss: expected hidden [B, T, H] and labels [B, T] with T >= 2, got {} and {}",
                    shape_str(hidden.sizes()), shape_str(labels.sizes()));
  const int64_t T = hidden.size(1);
  return linear_cross_entropy(hidden.narrow(1, 0, T - 1), weight, bias, labels.narrow(1, 1, T - 1).contiguous(), options);
}

}  // namespace peft
