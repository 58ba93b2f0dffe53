#pragma once
/// @file
/// Prefix tuning on a torch::nn model (the native backend): P learned key and
/// value positions in the slot of every peft::nn::PrefixSite (each attention).

#include <peft/nn/inject.h>
#include <peft/nn/sites.h>
#include <peft/prefix/inject.h>

namespace peft {
namespace prefix {

/// The prefix of one attention: `prefix` [P, 2·kv_heads·head_dim], its slice of
/// HF's prefix tensor (keys, then values).
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::PrefixAdapter {
 public:
  /// P positions of `kv_heads` heads of width `head_dim`, ~ N(0, 1) as HF draws them.
  NativeLayerImpl(int64_t P, int64_t kv_heads, int64_t head_dim) : P_(P), heads_(kv_heads), dim_(head_dim) { reset(); }
  /// Registers the prefix (clone() calls it, then copies the values).
  void reset() override { prefix = register_parameter("prefix", torch::randn({P_, 2 * heads_ * dim_})); }

  /// [2, kv_heads, P, head_dim], as the TorchScript backend's layer(i).
  torch::Tensor key_values() const override { return prefix.reshape({P_, 2, heads_, dim_}).permute({1, 2, 0, 3}); }
  /// Saved by NativeTuner as one tensor for every layer.
  std::vector<io::StateEntry> state(const std::string&) override { return {}; }

  torch::Tensor prefix;  ///< Trainable [P, 2·kv_heads·head_dim].

 private:
  int64_t P_, heads_, dim_;
};

/// Prefixes cannot fold into the base weights; the file holds them as HF does,
/// `prompt_embeddings` [P, Σ 2·kv_heads·head_dim] in layer order.
class NativeTuner : public nn::Tuner {
 public:
  using nn::Tuner::Tuner;
  /// No: see the class.
  bool mergeable() const override { return false; }

  /// `prompt_embeddings` [P, Σ 2·kv_heads·head_dim]: every layer's prefix, in layer order.
  std::vector<io::StateEntry> state() const override {
    std::vector<torch::Tensor> parts;
    for (const auto& l : layers()) parts.push_back(layer(l).prefix);
    return {{"prompt_embeddings", torch::cat(parts, 1).detach(), [parts](const torch::Tensor& v) {
               torch::NoGradGuard no_grad;
               int64_t offset = 0;
               for (auto p : parts) {
                 p.copy_(v.narrow(1, offset, p.size(1)));
                 offset += p.size(1);
               }
             }}};
  }

  /// HF's fields describe one layout for every layer (null where layers differ).
  void describe(nlohmann::json& config) const override {
    std::set<std::pair<int64_t, int64_t>> layouts;
    for (const auto& l : layers()) {
      const auto* site = dynamic_cast<const nn::PrefixSite*>(l.layer);
      layouts.insert({site->kv_heads(), site->head_dim()});
    }
    const bool uniform = layouts.size() == 1;
    const auto [heads, dim] = *layouts.begin();
    config["token_dim"] = uniform ? nlohmann::json(heads * dim) : nlohmann::json(nullptr);
    config["num_attention_heads"] = uniform ? nlohmann::json(heads) : nlohmann::json(nullptr);
    config["num_layers"] = layers().size();
  }

 private:
  static NativeLayerImpl& layer(const nn::AttachedAdapter& l) { return *l.module->as<NativeLayerImpl>(); }
};

/// Prefix tuning in every peft::nn::PrefixSite of a torch::nn model (ModelError without one).
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const PrefixTuningConfig& config) {
  const int64_t P = config.num_virtual_tokens();
  check<OptionError>(P >= 1, "PrefixTuningConfig.num_virtual_tokens must be >= 1, got {}", P);
  check<OptionError>(!config.prefix_projection(),
                     "PrefixTuningConfig.prefix_projection: the reparametrisation MLP is not available for torch::nn "
                     "models yet (train without it, or use the TorchScript route)");
  const auto sites = injection.all_hosts<nn::PrefixSite>();
  check<ModelError>(!sites.empty(),
                    "PrefixTuningConfig: the torch::nn model has no attention derived from peft::nn::PrefixSite "
                    "(see peft/nn/sites.h)");
  for (const auto& [path, site] : sites) {
    const int64_t heads = config.num_key_value_heads() ? config.num_key_value_heads() : site->kv_heads();
    const int64_t dim = config.head_dim() ? config.head_dim() : site->head_dim();
    check<OptionError>(heads == site->kv_heads() && dim == site->head_dim(),
                       "PrefixTuningConfig: {} key/value heads of width {} differ from the attention '{}' ({} of {})",
                       heads, dim, path, site->kv_heads(), site->head_dim());
    auto adapter = std::make_shared<NativeLayerImpl>(P, heads, dim);
    const torch::TensorOptions like = nn::options_of(dynamic_cast<torch::nn::Module&>(*site));
    adapter->to(like.device(), like.dtype().toScalarType());
    injection.attach(path, site, adapter);
  }
  return std::make_unique<NativeTuner>("PrefixTuning", injection);
}

}  // namespace prefix
}  // namespace peft
