#pragma once
/// @file
/// LoRA (and DoRA) in the adapter slot of a peft::nn linear layer: the native
/// backend's layer, computing with peft::functional (the same functions the
/// TorchScript layer is checked against).

#include <peft/lora/config.h>
#include <peft/lora/functional.h>
#include <peft/lora/module.h>
#include <peft/nn/inject.h>

namespace peft {
namespace lora {

/// One LoRA adapter of one layer: `lora_A` [r, in], `lora_B` [out, r] (and DoRA's
/// `lora_magnitude_vector` [out]); y + s·B·A·dropout(x), or DoRA's rescaled output.
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::LinearAdapter {
 public:
  /// Factors of the given shapes (zero; see init()).
  NativeLayerImpl(LoraOptions options, int64_t in, int64_t out) : options_(std::move(options)), in_(in), out_(out) {
    reset();
  }

  /// Registers the factors (clone() calls it, then copies the values).
  void reset() override {
    const int64_t r = options_.r();
    lora_A = register_parameter("lora_A", torch::zeros({r, in_}));
    lora_B = register_parameter("lora_B", torch::zeros({out_, r}));
    if (options_.use_dora()) lora_magnitude_vector = register_parameter("lora_magnitude_vector", torch::zeros({out_}));
  }

  /// HF's initial factors for the layer's `base` weight (PiSSA rewrites it), on its device and dtype.
  void init(const nn::LinearBase& base) {
    torch::NoGradGuard no_grad;
    const torch::Tensor& W = base.weight;
    torch::Tensor A, B, residual;
    std::tie(A, B, residual) = detail::initial_factors(options_, in_, out_, base.fan_in_fan_out ? W.t() : W);
    if (residual.defined()) const_cast<torch::Tensor&>(W).copy_(base.fan_in_fan_out ? residual.t() : residual);
    lora_A.set_data(A);
    lora_B.set_data(B);
    if (options_.use_dora()) lora_magnitude_vector.set_data(functional::dora_weight_norm(W, A, B, func(base.fan_in_fan_out)));
  }

  torch::Tensor output(const torch::Tensor& x, const torch::Tensor& y, const nn::LinearBase& base) override {
    const auto options = func(base.fan_in_fan_out);
    if (options_.use_dora())
      return y + functional::dora_delta(x, y, base.weight, base.bias, lora_A, lora_B, lora_magnitude_vector, options);
    torch::Tensor h = torch::nn::functional::dropout(
        x, torch::nn::functional::DropoutFuncOptions().p(options_.lora_dropout()).training(is_training() && options_.lora_dropout() > 0));
    return y + functional::lora_branch(h.to(lora_A.scalar_type()), lora_A, lora_B, options).to(y.scalar_type());
  }

  void merge(torch::Tensor& weight, torch::Tensor&, bool fan_in_fan_out) override {
    const auto options = func(fan_in_fan_out);
    if (options_.use_dora()) dora_scale_ = functional::dora_weight_scale(weight, lora_A, lora_B, lora_magnitude_vector, options);
    weight.copy_(functional::merged_weight(weight, lora_A, lora_B, dora_scale_, options));
  }

  void unmerge(torch::Tensor& weight, torch::Tensor&, bool fan_in_fan_out) override {
    weight.copy_(functional::unmerged_weight(weight, lora_A, lora_B, dora_scale_, func(fan_in_fan_out)));
  }

  std::vector<io::StateEntry> state(const std::string& prefix) override {
    std::vector<io::StateEntry> out{io::plain_entry(prefix + "lora_A.weight", lora_A),
                                    io::plain_entry(prefix + "lora_B.weight", lora_B)};
    if (options_.use_dora()) out.push_back(io::plain_entry(prefix + "lora_magnitude_vector", lora_magnitude_vector));
    return out;
  }

  torch::Tensor lora_A;                 ///< Trainable A [r, in].
  torch::Tensor lora_B;                 ///< Trainable B [out, r].
  torch::Tensor lora_magnitude_vector;  ///< DoRA only: trainable magnitude [out].

 private:
  functional::LoraFuncOptions func(bool fan_in_fan_out) const {
    return functional::LoraFuncOptions()
        .scaling(options_.scaling())
        .dropout(options_.lora_dropout())
        .training(is_training())
        .fan_in_fan_out(fan_in_fan_out)
        .enable_slices(options_.enable_slices());
  }

  LoraOptions options_;
  int64_t in_, out_;
  torch::Tensor dora_scale_;  // DoRA: m/‖W + ΔW‖ at merge time, shaped like the weight
};

/// LoRA on the targeted peft::nn linear layers of a torch::nn model.
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const LoraConfig& config) {
  check<OptionError>(!config.quantize_base(), "LoraConfig.quantize_base: QLoRA on torch::nn models is not available yet "
                                              "(use the TorchScript route, or peft::LoRALinear with LoraOptions::quantize_base)");
  const auto targets = injection.linear_targets(injection.rule(config.rule()), "LoraConfig");
  std::vector<std::string> names;
  for (const auto& t : targets) names.push_back(t.first);
  report_unmatched(unmatched_keys(config.rank_pattern(), names), injection.from_file(), "LoraConfig.rank_pattern", names);
  report_unmatched(unmatched_keys(config.alpha_pattern(), names), injection.from_file(), "LoraConfig.alpha_pattern", names);
  for (const auto& [target, layer] : targets) {
    const auto [in, out] = layer->features();
    LoraOptions options = config.options_for(target);
    options.validate(in, out, "LoraConfig target '" + target + "'", /*warn_rank=*/!injection.from_file());
    auto adapter = std::make_shared<NativeLayerImpl>(options, in, out);
    adapter->to(layer->weight_tensor().device(), layer->weight_tensor().scalar_type());
    adapter->init({layer->weight_tensor(), layer->bias_tensor(), layer->fan_in_fan_out()});
    injection.attach(target, layer, adapter);
  }
  if (config.bias() != LoraBias::None) injection.train_biases(/*only_adapted=*/config.bias() == LoraBias::LoraOnly);
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<nn::Tuner>("LoRA", injection);
}

}  // namespace lora
}  // namespace peft
