#pragma once
/// @file
/// VeRA in the adapter slot of a peft::nn linear layer (the native backend),
/// computing with peft::vera's functions.

#include <peft/nn/inject.h>
#include <peft/vera/config.h>
#include <peft/vera/functional.h>

namespace peft {
namespace vera {

/// One VeRA adapter of one layer: trainable `vera_lambda_d` [r], `vera_lambda_b`
/// [out]; frozen buffers `vera_A` [r, max_in], `vera_B` [max_out, r], the same
/// tensors in every layer of the adapter.
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::LinearAdapter {
 public:
  /// A layer of `in` inputs and `out` outputs on the shared `projections`; λ_d, λ_b zero (see native_tuner).
  NativeLayerImpl(const Projections& projections, int64_t in, int64_t out, double dropout)
      : projections_(projections), in_(in), out_(out), dropout_(dropout) {
    reset();
  }

  /// Registers the vectors and the projections (clone() calls it, then copies the values).
  void reset() override {
    vera_lambda_b = register_parameter("vera_lambda_b", torch::zeros({out_}));
    vera_lambda_d = register_parameter("vera_lambda_d", torch::zeros({projections_.A.size(0)}));
    vera_A = register_buffer("vera_A", projections_.A);
    vera_B = register_buffer("vera_B", projections_.B);
  }

  torch::Tensor output(const torch::Tensor& x, const torch::Tensor& y, const nn::LinearBase&) override {
    torch::Tensor h = torch::nn::functional::dropout(
        x.to(vera_lambda_d.scalar_type()),
        torch::nn::functional::DropoutFuncOptions().p(dropout_).training(is_training() && dropout_ > 0));
    return y + delta(h, slice_A(vera_A, in_), slice_B(vera_B, out_), vera_lambda_d, vera_lambda_b).to(y.scalar_type());
  }
  void merge(torch::Tensor& weight, torch::Tensor&, bool fan_in_fan_out) override {
    weight.add_(weight_delta(fan_in_fan_out).to(weight.dtype()));
  }
  void unmerge(torch::Tensor& weight, torch::Tensor&, bool fan_in_fan_out) override {
    weight.sub_(weight_delta(fan_in_fan_out).to(weight.dtype()));
  }
  std::vector<io::StateEntry> state(const std::string& prefix) override {
    return {io::plain_entry(prefix + "vera_lambda_b", vera_lambda_b), io::plain_entry(prefix + "vera_lambda_d", vera_lambda_d)};
  }

  torch::Tensor vera_lambda_b;  ///< Trainable λ_b [out].
  torch::Tensor vera_lambda_d;  ///< Trainable λ_d [r].
  torch::Tensor vera_A;         ///< Frozen shared projection [r, max_in].
  torch::Tensor vera_B;         ///< Frozen shared projection [max_out, r].

 private:
  torch::Tensor weight_delta(bool fan_in_fan_out) const {
    return delta_weight(slice_A(vera_A, in_), slice_B(vera_B, out_), vera_lambda_d, vera_lambda_b, fan_in_fan_out);
  }

  Projections projections_;
  int64_t in_, out_;
  double dropout_;
};

/// VeRA's native tuner: the layers' tensors, plus the projections once (save_projection).
class NativeTuner : public nn::Tuner {
 public:
  /// The layers of `injection`, sharing `projections`, saved with the file when `save_projection`.
  NativeTuner(const nn::Injection& injection, Projections projections, bool save_projection)
      : nn::Tuner("VeRA", injection), projections_(std::move(projections)), save_projection_(save_projection) {}

  /// The layers' λ vectors, then `base_model.vera_A` / `vera_B` (HF's keys).
  std::vector<io::StateEntry> state() const override {
    std::vector<io::StateEntry> out = nn::Tuner::state();
    if (save_projection_) {
      out.push_back(io::plain_entry("base_model.vera_A", projections_.A));
      out.push_back(io::plain_entry("base_model.vera_B", projections_.B));
    }
    return out;
  }

 private:
  Projections projections_;
  bool save_projection_;
};

/// VeRA on the targeted peft::nn linear layers of a torch::nn model.
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const VeraConfig& config) {
  check<OptionError>(config.r() >= 1, "VeraConfig.r must be >= 1, got {}", config.r());
  const auto targets = injection.linear_targets(injection.rule(config.rule()), "VeraConfig");
  int64_t max_in = 0, max_out = 0;
  for (const auto& [target, layer] : targets) {
    max_in = std::max(max_in, layer->features().first);
    max_out = std::max(max_out, layer->features().second);
  }
  const torch::Tensor& like = targets.front().second->weight;
  const Projections projections = init_projections(max_in, max_out, config.r(), config.projection_prng_key(), like.options());
  for (const auto& [target, layer] : targets) {
    const auto [in, out] = layer->features();
    auto adapter = std::make_shared<NativeLayerImpl>(projections, in, out, config.vera_dropout());
    adapter->to(like.device(), like.scalar_type());
    torch::NoGradGuard no_grad;
    if (config.init_weights()) {
      adapter->vera_lambda_d.fill_(config.d_initial());
    } else {
      adapter->vera_lambda_b.fill_(1.0);
      adapter->vera_lambda_d.normal_();
    }
    injection.attach(target, layer, adapter);
  }
  if (config.bias() != VeraBias::None) injection.train_biases(/*only_adapted=*/config.bias() == VeraBias::VeraOnly);
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<NativeTuner>(injection, projections, config.save_projection());
}

}  // namespace vera
}  // namespace peft
