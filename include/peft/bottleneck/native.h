#pragma once
/// @file
/// Bottleneck adapters on a torch::nn model (the native backend): in the slot of
/// each targeted peft::nn::OutputSite (a sublayer that returns adapted_output(h)).

#include <peft/bottleneck/bottleneck.h>
#include <peft/bottleneck/inject.h>
#include <peft/nn/inject.h>
#include <peft/nn/sites.h>

namespace peft {
namespace bottleneck {

/// One bottleneck adapter after one sublayer: h + W_up σ(W_down h + b_down) + b_up.
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::OutputAdapter {
 public:
  /// An adapter of `options`, its projections drawn as peft::Bottleneck draws them.
  explicit NativeLayerImpl(BottleneckOptions options) : options_(std::move(options)) {
    reset();
    Bottleneck drawn(options_);
    torch::NoGradGuard no_grad;
    for (auto& p : named_parameters()) p.value().copy_(drawn->named_parameters()[p.key()]);
  }

  /// Registers the projections (clone() calls it, then copies the values).
  void reset() override {
    options_.validate();
    adapter_down = register_module("adapter_down", torch::nn::Linear(options_.hidden(), options_.bottleneck_size()));
    adapter_up = register_module("adapter_up", torch::nn::Linear(options_.bottleneck_size(), options_.hidden()));
  }

  torch::Tensor output(const torch::Tensor& h) override {
    check_last_dim(h, options_.hidden(), "bottleneck adapter");
    return functional::bottleneck(h, adapter_down->weight, adapter_down->bias, adapter_up->weight, adapter_up->bias,
                                  options_.activation());
  }
  int64_t hidden() const override { return options_.hidden(); }
  /// The options it was built with.
  const BottleneckOptions& options() const { return options_; }

  /// The keys the TorchScript backend writes: `<prefix>adapter_down.weight`, ...
  std::vector<io::StateEntry> state(const std::string& prefix) override {
    std::vector<io::StateEntry> out;
    for (const auto& p : named_parameters()) out.push_back(io::plain_entry(prefix + p.key(), p.value()));
    return out;
  }

  torch::nn::Linear adapter_down{nullptr};  ///< Trainable projection hidden -> bottleneck.
  torch::nn::Linear adapter_up{nullptr};    ///< Trainable projection bottleneck -> hidden.

 private:
  BottleneckOptions options_;
};
TORCH_MODULE(NativeLayer);

/// Bottleneck adapters cannot fold into the base weights.
class NativeTuner : public nn::Tuner {
 public:
  using nn::Tuner::Tuner;
  /// No: see the class.
  bool mergeable() const override { return false; }
  /// The sizes the file states: hidden_size and bottleneck_size as built.
  void describe(nlohmann::json& config) const override {
    const auto& options = layers().front().module->as<NativeLayerImpl>()->options();
    config["hidden_size"] = options.hidden();
    config["bottleneck_size"] = options.bottleneck_size();
  }
};

/// Bottleneck adapters after the targeted peft::nn::OutputSite sublayers of a torch::nn model.
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const BottleneckConfig& config) {
  for (const auto& [target, site] :
       injection.host_targets<nn::OutputSite>(injection.rule(config.rule()), "BottleneckConfig",
                                              "peft::nn::OutputSite sublayer")) {
    const int64_t hidden = config.hidden_size() > 0 ? config.hidden_size() : site->output_width();
    check<OptionError>(hidden == site->output_width(), "BottleneckConfig.hidden_size {} differs from the output width {} of '{}'",
                       hidden, site->output_width(), target);
    auto adapter = NativeLayer(BottleneckOptions(hidden)
                                   .bottleneck(config.bottleneck_size())
                                   .reduction_factor(config.reduction_factor())
                                   .activation(config.activation())
                                   .init(config.init()));
    const torch::TensorOptions like = nn::options_of(dynamic_cast<torch::nn::Module&>(*site));
    adapter->to(like.device(), like.dtype().toScalarType());
    injection.attach(target, site, adapter.ptr());
  }
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<NativeTuner>("Bottleneck", injection);
}

}  // namespace bottleneck
}  // namespace peft
