#pragma once
/// @file
/// Bottleneck adapters (Houlsby et al. 2019): h + W_up σ(W_down h).

#include <peft/core/shape.h>
#include <torch/torch.h>

#include <ostream>

namespace peft {

/// The non-linearity σ between the two projections.
enum class BottleneckActivation { ReLU, GELU, Tanh, SiLU };

/// How the projections start.
enum class BottleneckInit {
  Identity,  ///< W_down default (kaiming), W_up = 0, b_up = 0: the adapter starts as the identity
  Houlsby,   ///< every weight ~ N(0, 0.01²), biases 0: near-identity, as in the paper
};

/// Options of peft::Bottleneck. The bottleneck is given directly or as
/// hidden / reduction_factor.
///
/// ```
/// auto opts = peft::BottleneckOptions(768).reduction_factor(16).activation(peft::BottleneckActivation::GELU);
/// ```
struct BottleneckOptions {
  /// An adapter over hidden states of width `hidden`.
  /* implicit */ BottleneckOptions(int64_t hidden) : hidden_(hidden) {}

  /// Width of the hidden states the adapter reads and writes.
  TORCH_ARG(int64_t, hidden);
  /// Bottleneck width; 0 means hidden / reduction_factor.
  TORCH_ARG(int64_t, bottleneck) = 0;
  /// Used when bottleneck is 0.
  TORCH_ARG(int64_t, reduction_factor) = 16;
  /// Nonlinearity between the down and up projections.
  TORCH_ARG(BottleneckActivation, activation) = BottleneckActivation::ReLU;
  /// Identity (up-projection zero, the base model at step 0) or Houlsby (near-identity).
  TORCH_ARG(BottleneckInit, init) = BottleneckInit::Identity;

 public:  // TORCH_ARG leaves the section private
  /// The bottleneck width these options give (at least 1).
  int64_t bottleneck_size() const {
    return bottleneck_ > 0 ? bottleneck_ : std::max<int64_t>(1, hidden_ / std::max<int64_t>(1, reduction_factor_));
  }

  /// Throws OptionError when hidden or the bottleneck is not positive.
  void validate() const {
    check<OptionError>(hidden_ >= 1, "Adapter: BottleneckOptions.hidden must be >= 1, got {}", hidden_);
    check<OptionError>(bottleneck_ >= 0, "Adapter: BottleneckOptions.bottleneck must be >= 0 (0 = use reduction_factor), got {}",
                       bottleneck_);
    check<OptionError>(bottleneck_ > 0 || reduction_factor_ >= 1,
                       "Adapter: BottleneckOptions.reduction_factor must be >= 1, got {}",
                       reduction_factor_);
  }
};

namespace functional {

/// σ(x) for the chosen activation.
inline torch::Tensor activate(const torch::Tensor& x, BottleneckActivation activation) {
  switch (activation) {
    case BottleneckActivation::ReLU: return torch::relu(x);
    case BottleneckActivation::GELU: return torch::gelu(x);
    case BottleneckActivation::Tanh: return torch::tanh(x);
    case BottleneckActivation::SiLU: return torch::silu(x);
  }
  return x;
}

/// The bottleneck adapter: h + W_up·σ(W_down·h + b_down) + b_up.
inline torch::Tensor bottleneck(const torch::Tensor& h, const torch::Tensor& down_weight, const torch::Tensor& down_bias,
                             const torch::Tensor& up_weight, const torch::Tensor& up_bias,
                             BottleneckActivation activation) {
  torch::Tensor z = activate(torch::nn::functional::linear(h, down_weight, down_bias), activation);
  return h + torch::nn::functional::linear(z, up_weight, up_bias);
}

}  // namespace functional

/// A Houlsby bottleneck adapter, inserted after a frozen sublayer (attention
/// output, MLP): h + W_up σ(W_down h). Every parameter trains; with the default
/// init it starts as the identity.
///
/// ```
/// peft::Bottleneck adapter(peft::BottleneckOptions(768).bottleneck(64));
/// h = adapter(attention_output);
/// ```
class BottleneckImpl : public torch::nn::Module {
 public:
  /// Creates the down/up projections; every parameter trains.
  explicit BottleneckImpl(BottleneckOptions options) : options_(std::move(options)) {
    options_.validate();
    const int64_t hidden = options_.hidden(), bottleneck = options_.bottleneck_size();
    adapter_down = register_module("adapter_down", torch::nn::Linear(hidden, bottleneck));
    adapter_up = register_module("adapter_up", torch::nn::Linear(bottleneck, hidden));
    torch::NoGradGuard no_grad;
    if (options_.init() == BottleneckInit::Houlsby) {
      for (auto* layer : {&adapter_down, &adapter_up}) {
        torch::nn::init::normal_((*layer)->weight, 0.0, 1e-2);
        torch::nn::init::zeros_((*layer)->bias);
      }
    } else {
      torch::nn::init::zeros_(adapter_up->weight);
      torch::nn::init::zeros_(adapter_up->bias);
    }
  }

  /// h [..., hidden] -> h + W_up σ(W_down h), same shape.
  torch::Tensor forward(const torch::Tensor& h) {
    check_last_dim(h, options_.hidden(), "Bottleneck");
    return functional::bottleneck(h, adapter_down->weight, adapter_down->bias, adapter_up->weight, adapter_up->bias,
                               options_.activation());
  }

  /// The options it was built with.
  const BottleneckOptions& options() const { return options_; }

  /// Prints `peft::Bottleneck(hidden=..., bottleneck=...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::Bottleneck(hidden=" << options_.hidden() << ", bottleneck=" << options_.bottleneck_size() << ")";
  }

  torch::nn::Linear adapter_down{nullptr};  ///< Trainable projection hidden -> bottleneck.
  torch::nn::Linear adapter_up{nullptr};    ///< Trainable projection bottleneck -> hidden.

 private:
  BottleneckOptions options_;
};

/// Holder of BottleneckImpl (see there).
TORCH_MODULE(Bottleneck);

}  // namespace peft
