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

  bool uses_base_weight() const override { return options_.use_dora(); }

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

/// One LoRA adapter of one peft::nn::Embedding (HF peft's lora.Embedding):
/// `lora_embedding_A` [r, num], `lora_embedding_B` [dim, r]; y + s·embedding(ids, Aᵀ)·Bᵀ.
class NativeEmbeddingImpl : public torch::nn::Cloneable<NativeEmbeddingImpl>, public nn::EmbeddingAdapter {
 public:
  /// Factors for a table of `num` rows of width `dim`, drawn as HF peft draws them (A zero, B ~ N(0, 1);
  /// LoraInit::Random: both Gaussian; LoraInit::Zero: both zero).
  NativeEmbeddingImpl(LoraOptions options, int64_t num, int64_t dim) : options_(std::move(options)), num_(num), dim_(dim) {
    check<OptionError>(!options_.use_dora() && options_.enable_slices().empty() && options_.init_lora_weights() != LoraInit::PiSSA,
                       "LoRA on an embedding: use_dora, slice_pattern and LoraInit::PiSSA apply to linear layers only");
    reset();
    torch::NoGradGuard no_grad;
    if (options_.init_lora_weights() == LoraInit::Random) torch::nn::init::normal_(lora_embedding_A);
    if (options_.init_lora_weights() != LoraInit::Zero) torch::nn::init::normal_(lora_embedding_B);
  }

  /// Registers the factors, zero (clone() calls it, then copies the values).
  void reset() override {
    lora_embedding_A = register_parameter("lora_embedding_A", torch::zeros({options_.r(), num_}));
    lora_embedding_B = register_parameter("lora_embedding_B", torch::zeros({dim_, options_.r()}));
  }

  torch::Tensor output(const torch::Tensor& ids, const torch::Tensor& y) override {
    return y + functional::lora_embedding_branch(ids, lora_embedding_A, lora_embedding_B, options_.scaling()).to(y.scalar_type());
  }
  void merge(torch::Tensor& weight) override {
    weight.add_(functional::lora_embedding_delta(lora_embedding_A, lora_embedding_B, options_.scaling()).to(weight.scalar_type()));
  }
  void unmerge(torch::Tensor& weight) override {
    weight.sub_(functional::lora_embedding_delta(lora_embedding_A, lora_embedding_B, options_.scaling()).to(weight.scalar_type()));
  }
  /// HF's keys: `<prefix>lora_embedding_A`, `<prefix>lora_embedding_B` (no `.weight`).
  std::vector<io::StateEntry> state(const std::string& prefix) override {
    return {io::plain_entry(prefix + "lora_embedding_A", lora_embedding_A),
            io::plain_entry(prefix + "lora_embedding_B", lora_embedding_B)};
  }

  torch::Tensor lora_embedding_A;  ///< Trainable A [r, num_embeddings].
  torch::Tensor lora_embedding_B;  ///< Trainable B [embedding_dim, r].

 private:
  LoraOptions options_;
  int64_t num_, dim_;
};

/// QLoRA: the targeted layers (or, with quantize_all_linear, every peft::nn
/// linear layer but the output head) get an NF4 weight; modules_to_save stay dense.
inline void quantize_targets(nn::Injection& injection, const LoraConfig& config,
                             const std::vector<std::pair<std::string, nn::AdaptedLayer*>>& targets) {
  const NF4Config& nf4 = *config.quantize_base();
  nf4.validate("LoraConfig.quantize_base");
  auto layers = targets;
  if (nf4.quantize_all_linear())
    layers = injection.linear_targets(injection.rule(TargetRule{TargetModules("all-linear"), {}, {}, {}}), "LoraConfig.quantize_base");
  for (const auto& entry : layers) {  // no structured binding: clang 14 cannot capture one in the lambda
    const std::string& path = entry.first;
    if (!entry.second->quantized() && std::none_of(config.modules_to_save().begin(), config.modules_to_save().end(),
                                                   [&](const std::string& key) { return TargetModules::matches_key(path, key); }))
      entry.second->quantize(nf4, "LoraConfig.quantize_base on '" + path + "'");
  }
}

/// LoRA (QLoRA with quantize_base) on the targeted peft::nn linear layers of a torch::nn model.
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const LoraConfig& config) {
  std::vector<std::pair<std::string, nn::AdaptedLayer*>> targets;  // linear layers; embeddings are attached here
  std::vector<std::string> names;
  for (const auto& [path, host] : injection.layer_targets(injection.rule(config.rule()), "LoraConfig", /*embeddings=*/true)) {
    names.push_back(path);
    if (auto* layer = dynamic_cast<nn::AdaptedLayer*>(host)) {
      targets.emplace_back(path, layer);
      continue;
    }
    auto& table = dynamic_cast<nn::EmbeddingImpl&>(*host);
    LoraOptions options = config.options_for(path);
    options.validate(table.options.num_embeddings(), table.options.embedding_dim(), "LoraConfig target '" + path + "'",
                     /*warn_rank=*/!injection.from_file());
    auto adapter = std::make_shared<NativeEmbeddingImpl>(options, table.options.num_embeddings(), table.options.embedding_dim());
    adapter->to(table.weight.device(), table.weight.scalar_type());
    injection.attach(path, host, adapter);
  }
  report_unmatched(unmatched_keys(config.rank_pattern(), names), injection.from_file(), "LoraConfig.rank_pattern", names);
  report_unmatched(unmatched_keys(config.alpha_pattern(), names), injection.from_file(), "LoraConfig.alpha_pattern", names);
  for (const auto& [target, layer] : targets) {
    const auto [in, out] = layer->features();
    LoraOptions options = config.options_for(target);
    options.validate(in, out, "LoraConfig target '" + target + "'", /*warn_rank=*/!injection.from_file());
    check<OptionError>(!config.quantize_base() || options.init_lora_weights() != LoraInit::PiSSA,
                       "LoraConfig target '{}': LoraInit::PiSSA rewrites the base weight, which quantize_base makes NF4",
                       target);
  }
  if (config.quantize_base()) quantize_targets(injection, config, targets);
  for (const auto& [target, layer] : targets) {
    const auto [in, out] = layer->features();
    auto adapter = std::make_shared<NativeLayerImpl>(config.options_for(target), in, out);
    adapter->to(layer->weight.device(), layer->weight.scalar_type());
    if (layer->quantized()) {
      const torch::Tensor W = layer->frozen_weight().to(layer->weight.scalar_type());
      adapter->init({W, layer->bias, layer->fan_in_fan_out()});
    } else {
      adapter->init({layer->weight, layer->bias, layer->fan_in_fan_out()});
    }
    injection.attach(target, layer, adapter);
  }
  if (config.bias() != LoraBias::None) injection.train_biases(/*only_adapted=*/config.bias() == LoraBias::LoraOnly);
  injection.train_modules_to_save(config.modules_to_save());
  return std::make_unique<nn::Tuner>("LoRA", injection);
}

}  // namespace lora
}  // namespace peft
