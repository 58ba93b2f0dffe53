#pragma once
/// @file
/// IA3 (Liu et al. 2022): a learned scaling vector on a frozen linear layer.

#include <peft/core/merged_guard.h>
#include <peft/core/shape.h>
#include <torch/torch.h>

#include <ostream>

namespace peft {

/// Options of peft::IA3.
///
/// ```
/// auto opts = peft::IA3Options().feedforward(true);   // scale the input, as for an MLP's fc2
/// ```
struct IA3Options {
  /// Scale the layer's input [in] (feed-forward layers) instead of its output [out].
  TORCH_ARG(bool, feedforward) = false;
};

namespace functional {

/// IA3's rescaling: x ⊙ l along the last dimension.
inline torch::Tensor ia3(const torch::Tensor& x, const torch::Tensor& l) { return x * l; }

}  // namespace functional

/// IA3 over a frozen `torch::nn::Linear`: y = base(x) ⊙ l (output scaling, for
/// keys and values) or y = base(x ⊙ l) (feedforward). `ia3_l` starts at 1, so
/// the layer starts as the base; it is the only trainable parameter.
///
/// ```
/// peft::IA3 v(torch::nn::Linear(512, 512), peft::IA3Options());
/// auto y = v(x);
/// ```
class IA3Impl : public torch::nn::Module {
 public:
  /// Wraps `base_layer` and freezes it; the scaling vector starts at 1 by default.
  IA3Impl(torch::nn::Linear base_layer, IA3Options options = {}) : options_(options) {
    check<OptionError>(!base_layer.is_empty(), "IA3: the base torch::nn::Linear is empty");
    base = register_module("base", std::move(base_layer));
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    const int64_t size = options_.feedforward() ? base->weight.size(1) : base->weight.size(0);
    ia3_l = register_parameter("ia3_l", torch::ones({size}, base->weight.options()));
  }

  /// x [..., in] -> [..., out], scaled by ia3_l.
  torch::Tensor forward(const torch::Tensor& x) {
    check_last_dim(x, base->weight.size(1), "IA3");
    if (merged_ && detail::records_training(is_training()))
      return detail::fail_backward_merged(base->forward(x), detail::merged_layer_message("IA3", "ia3_l"));
    if (merged_) return base->forward(x);
    if (options_.feedforward()) return base->forward(functional::ia3(x, ia3_l));
    return functional::ia3(base->forward(x), ia3_l);
  }

  /// Folds l into the weight (and, for output scaling, the bias). No-op when merged.
  void merge() {
    if (merged_) return;
    scale_base(ia3_l.detach(), /*divide=*/false);
    merged_ = true;
  }

  /// Divides l back out (up to fp rounding). No-op when not merged.
  void unmerge() {
    if (!merged_) return;
    scale_base(ia3_l.detach(), /*divide=*/true);
    merged_ = false;
  }

  /// Whether the scaling is folded into the base weight.
  bool merged() const { return merged_; }
  /// The options it was built with.
  const IA3Options& options() const { return options_; }

  /// Prints `peft::IA3(...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::IA3(in_features=" << base->weight.size(1) << ", out_features=" << base->weight.size(0)
           << (options_.feedforward() ? ", feedforward" : "") << ")";
  }

  /// The frozen base layer.
  torch::nn::Linear base{nullptr};
  /// The trainable scaling vector: [out], or [in] for feed-forward layers.
  torch::Tensor ia3_l;

 private:
  void scale_base(const torch::Tensor& l, bool divide) {
    torch::NoGradGuard no_grad;
    auto apply = [divide](torch::Tensor& t, const torch::Tensor& f) { divide ? t.div_(f) : t.mul_(f); };
    if (options_.feedforward()) {
      apply(base->weight, l.unsqueeze(0));
      return;
    }
    apply(base->weight, l.unsqueeze(1));
    if (base->bias.defined()) apply(base->bias, l);
  }

  IA3Options options_;
  bool merged_ = false;
};

/// Holder of IA3Impl (see there).
TORCH_MODULE(IA3);

}  // namespace peft
