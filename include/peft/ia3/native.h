#pragma once
/// @file
/// IA3 in the adapter slot of a peft::nn linear layer (the native backend):
/// the output (or, for feed-forward layers, the input) times a learned vector.

#include <peft/ia3/ia3.h>
#include <peft/ia3/inject.h>
#include <peft/nn/inject.h>

namespace peft {
namespace ia3 {

/// One IA3 adapter of one layer: `ia3_l` [out], or [in] for a feed-forward layer.
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::LinearAdapter {
 public:
  /// A vector of `size` ones (HF's init), or around 1 without `neutral`.
  NativeLayerImpl(int64_t size, bool feedforward) : size_(size), feedforward_(feedforward) { reset(); }

  /// Registers the vector (clone() calls it, then copies the values).
  void reset() override { ia3_l = register_parameter("ia3_l", torch::ones({size_})); }

  torch::Tensor input(const torch::Tensor& x) override { return feedforward_ ? functional::ia3(x, ia3_l) : x; }
  torch::Tensor output(const torch::Tensor&, const torch::Tensor& y, const nn::LinearBase&) override {
    return feedforward_ ? y : functional::ia3(y, ia3_l);
  }

  void merge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) override {
    weight.mul_(shaped(fan_in_fan_out));
    if (!feedforward_ && bias.defined()) bias.mul_(ia3_l);
  }
  void unmerge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) override {
    weight.div_(shaped(fan_in_fan_out));
    if (!feedforward_ && bias.defined()) bias.div_(ia3_l);
  }

  /// HF stores ia3_l as (1, in) for feed-forward layers and (out, 1) otherwise.
  std::vector<io::StateEntry> state(const std::string& prefix) override {
    torch::Tensor t = ia3_l;
    return {{prefix + "ia3_l", feedforward_ ? t.detach().unsqueeze(0) : t.detach().unsqueeze(1),
             [t](const torch::Tensor& v) mutable {
               torch::NoGradGuard no_grad;
               t.copy_(v.reshape({-1}));
             }}};
  }

  torch::Tensor ia3_l;  ///< The learned scale [out], or [in] for a feed-forward layer.

 private:
  /// l along the weight dimension it scales: outputs, or inputs for feed-forward layers.
  torch::Tensor shaped(bool fan_in_fan_out) const {
    return feedforward_ == fan_in_fan_out ? ia3_l.unsqueeze(1) : ia3_l.unsqueeze(0);
  }

  int64_t size_;
  bool feedforward_;
};

/// IA3 on the targeted peft::nn linear layers of a torch::nn model.
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const IA3Config& config) {
  for (const auto& [target, layer] : injection.linear_targets(injection.rule(config.rule()), "IA3Config")) {
    const bool ff = !config.feedforward_modules().empty() && config.feedforward_modules().matches(target);
    const auto [in, out] = layer->features();
    auto adapter = std::make_shared<NativeLayerImpl>(ff ? in : out, ff);
    adapter->to(layer->weight.device(), layer->weight.scalar_type());
    if (!config.init_ia3_weights()) {
      torch::NoGradGuard no_grad;
      adapter->ia3_l.add_(0.02 * torch::randn_like(adapter->ia3_l));
    }
    injection.attach(target, layer, adapter);
  }
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<nn::Tuner>("IA3", injection);
}

}  // namespace ia3
}  // namespace peft
