#pragma once
/// @file
/// Prompt tuning on a torch::nn model (the native backend): the prompt sits in
/// the slot of the model's peft::nn::PromptSite (the module that runs the stack).

#include <peft/nn/inject.h>
#include <peft/nn/sites.h>
#include <peft/prompt/inject.h>
#include <peft/prompt/prompt.h>

namespace peft {
namespace prompt {

/// One prompt: `prompt_embeddings` [k, dim].
class NativeLayerImpl : public torch::nn::Cloneable<NativeLayerImpl>, public nn::PromptAdapter {
 public:
  /// A prompt of `k` vectors of width `dim` (values set by native_tuner).
  NativeLayerImpl(int64_t k, int64_t dim, bool keep) : k_(k), dim_(dim), keep_(keep) { reset(); }
  /// Registers the prompt (clone() calls it, then copies the values).
  void reset() override { prompt_embeddings = register_parameter("prompt_embeddings", torch::zeros({k_, dim_})); }

  torch::Tensor prompt() const override { return prompt_embeddings; }
  bool keep_prompt_positions() const override { return keep_; }
  /// HF's key: `prompt_embeddings` (no module path).
  std::vector<io::StateEntry> state(const std::string&) override {
    return {io::plain_entry("prompt_embeddings", prompt_embeddings)};
  }

  torch::Tensor prompt_embeddings;  ///< The trainable prompt [k, dim].

 private:
  int64_t k_, dim_;
  bool keep_;
};

/// A prompt cannot fold into the base weights.
class NativeTuner : public nn::Tuner {
 public:
  using nn::Tuner::Tuner;
  /// No: see the class.
  bool mergeable() const override { return false; }
  /// token_dim as built (the hidden width when the config left it 0).
  void describe(nlohmann::json& config) const override {
    config["token_dim"] = layers().front().module->as<NativeLayerImpl>()->prompt_embeddings.size(1);
  }
};

/// Prompt tuning at the model's peft::nn::PromptSite (ModelError without exactly one).
inline std::unique_ptr<nn::Tuner> native_tuner(nn::Injection& injection, const PromptTuningConfig& config) {
  const int64_t k = config.num_virtual_tokens();
  check<OptionError>(k >= 1, "PromptTuningConfig.num_virtual_tokens must be >= 1, got {}", k);
  const auto sites = injection.all_hosts<nn::PromptSite>();
  check<ModelError>(sites.size() == 1,
                    "PromptTuningConfig: a torch::nn model needs exactly one module derived from peft::nn::PromptSite "
                    "(the one that runs the transformer stack; see peft/nn/sites.h), found {}",
                    sites.size());
  const auto& [path, site] = sites.front();
  const torch::Tensor table = site->input_embeddings_weight();
  const int64_t dim = config.token_dim() > 0 ? config.token_dim() : table.size(1);
  check<OptionError>(dim == table.size(1), "PromptTuningConfig.token_dim {} differs from the input embedding width {}", dim,
                     table.size(1));
  torch::nn::Embedding frozen(table.size(0), table.size(1));
  {
    torch::NoGradGuard no_grad;
    frozen->weight.set_data(table.detach());
  }
  PromptEmbedding initial(frozen, PromptOptions(k).init_token_ids(config.prompt_tuning_init_token_ids()));
  auto adapter = std::make_shared<NativeLayerImpl>(k, dim, config.keep_prompt_positions());
  adapter->to(table.device(), table.scalar_type());
  {
    torch::NoGradGuard no_grad;
    adapter->prompt_embeddings.copy_(initial->prompt_embeddings);
  }
  injection.attach(path, site, adapter);
  return std::make_unique<NativeTuner>("PromptTuning", injection);
}

}  // namespace prompt
}  // namespace peft
