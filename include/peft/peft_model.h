#pragma once
/// @file
/// PeftModel: PEFT on a loaded TorchScript model, with HF peft's API.

#include <peft/adapter/inject.h>
#include <peft/bitfit/inject.h>
#include <peft/core/trainable.h>
#include <peft/ia3/inject.h>
#include <peft/lora/inject.h>
#include <peft/prefix/inject.h>
#include <peft/prompt/inject.h>
#include <torch/script.h>

#include <memory>
#include <unordered_set>
#include <variant>

namespace peft {

/// Any method's config.
using PeftConfig =
    std::variant<LoraConfig, IA3Config, AdapterConfig, BitFitConfig, PromptTuningConfig, PrefixTuningConfig>;

/// A loaded TorchScript model with one method injected. Only the adapter
/// parameters (plus modules_to_save and any trained biases) require grad; the
/// base model object keeps its original code and tensors.
///
/// ```
/// torch::jit::Module base = torch::jit::load("model.pt");
/// auto cfg = peft::LoraConfig().r(8).lora_alpha(16).target_modules({"q_proj", "v_proj"});
/// peft::PeftModel model = peft::get_peft_model(base, cfg);
/// model.print_trainable_parameters();
/// torch::optim::AdamW opt(model.trainable_parameters(), 1e-3);
/// auto logits = model.forward({input_ids}).toTensor();
/// torch::jit::Module merged = model.merge_and_unload();
/// ```
class PeftModel {
 public:
  PeftModel(torch::jit::Module base, const PeftConfig& config, const std::string& adapter_name = "default")
      : base_(std::move(base)), config_(config) {
    jit::Injection injection(base_, adapter_name);
    tuner_ = std::visit([&](const auto& cfg) { return make_tuner(injection, cfg); }, config);
    injection.finish();
    adapted_ = injection.model();
    layers_ = injection.layers();
    copies_ = injection.copies();
  }

  /// Runs the adapted model (the base model while an adapter is disabled).
  torch::jit::IValue forward(std::vector<torch::jit::IValue> inputs) {
    return disabled_ ? base_.forward(std::move(inputs)) : adapted_.forward(std::move(inputs));
  }

  /// What the optimizer should receive.
  std::vector<torch::Tensor> trainable_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& p : named_trainable_parameters()) out.push_back(p.second);
    return out;
  }

  /// Trainable tensors named `<base module path>.<parameter>`, e.g.
  /// `transformer.h.0.attn.c_attn.lora_A`.
  std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters() const {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& l : layers_)
      for (const auto& p : l.module.named_parameters(/*recurse=*/false))
        if (p.value.requires_grad()) out.emplace_back(l.target + "." + p.name, p.value);
    for (const auto& c : copies_) out.emplace_back(c.module + "." + c.attribute, c.copy);
    return out;
  }

  /// Trainable and total parameter counts (total = base + adapter).
  ParameterCount count_parameters() const {
    ParameterCount count;
    std::unordered_set<const void*> seen;  // tied weights (GPT-2's wte/lm_head) count once
    for (const auto& p : adapted_.parameters())
      if (seen.insert(p.unsafeGetTensorImpl()).second) count.total += p.numel();
    for (const auto& p : trainable_parameters()) count.trainable += p.numel();
    return count;
  }

  /// Prints "trainable params: X || all params: Y || trainable%: Z".
  void print_trainable_parameters() const { fmt::print("{}\n", format_trainable_parameters(count_parameters())); }

  /// Scope guard returned by disable_adapter().
  class DisabledScope {
   public:
    explicit DisabledScope(PeftModel& model) : model_(&model), was_merged_(model.merged_) {
      if (was_merged_) model_->unmerge_adapter();
      model_->disabled_ = true;
    }
    DisabledScope(DisabledScope&& other) noexcept : model_(other.model_), was_merged_(other.was_merged_) {
      other.model_ = nullptr;
    }
    DisabledScope(const DisabledScope&) = delete;
    DisabledScope& operator=(const DisabledScope&) = delete;
    ~DisabledScope() {
      if (!model_) return;
      model_->disabled_ = false;
      if (was_merged_) model_->merge_adapter();
    }

   private:
    PeftModel* model_;
    bool was_merged_;
  };

  /// Base behaviour until the returned guard goes out of scope (HF's `with model.disable_adapter():`).
  [[nodiscard]] DisabledScope disable_adapter() { return DisabledScope(*this); }

  /// Folds the adapter into the base weights (forward then costs what the base costs).
  void merge_adapter() {
    check<ModelError>(tuner_->mergeable(), "{} cannot be merged into the base weights", tuner_->method());
    tuner_->merge();
    merged_ = true;
  }

  /// Undoes merge_adapter(), restoring the base weights (up to fp rounding).
  void unmerge_adapter() {
    tuner_->unmerge();
    merged_ = false;
  }

  /// Merges the adapter into the base model's weights (and the trained copies
  /// into its tensors) and returns the base model: a plain module with its
  /// original code. This PeftModel stays merged.
  torch::jit::Module merge_and_unload() {
    merge_adapter();
    torch::NoGradGuard no_grad;
    for (auto& c : copies_) c.original.copy_(c.copy);
    return base_;
  }

  /// Prefix tuning: replaces the reparametrisation MLP by the prefixes it
  /// produces now (for saving and inference). A no-op for other methods.
  void fold_projection() { tuner_->fold_projection(); }

  /// The adapted TorchScript module: save() it to get a model that loads in plain PyTorch.
  torch::jit::Module& module() { return adapted_; }
  /// The base model (original code; shares the frozen tensors).
  const torch::jit::Module& base_model() const { return base_; }
  const PeftConfig& config() const { return config_; }
  const std::vector<jit::AdapterLayer>& adapter_layers() const { return layers_; }
  bool merged() const { return merged_; }

  void train(bool on = true) {
    adapted_.train(on);
    base_.train(on);
  }
  void eval() { train(false); }

 private:
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const LoraConfig& c) {
    return std::make_unique<lora::Tuner>(i, c);
  }
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const IA3Config& c) {
    return std::make_unique<ia3::Tuner>(i, c);
  }
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const AdapterConfig& c) {
    return std::make_unique<adapter::Tuner>(i, c);
  }
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const BitFitConfig& c) {
    return std::make_unique<bitfit::Tuner>(i, c);
  }
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const PromptTuningConfig& c) {
    return std::make_unique<prompt::Tuner>(i, c);
  }
  static std::unique_ptr<jit::Tuner> make_tuner(jit::Injection& i, const PrefixTuningConfig& c) {
    return std::make_unique<prefix::Tuner>(i, c);
  }

  torch::jit::Module base_, adapted_;
  PeftConfig config_;
  std::unique_ptr<jit::Tuner> tuner_;
  std::vector<jit::AdapterLayer> layers_;
  std::vector<jit::TrainableCopy> copies_;
  bool disabled_ = false, merged_ = false;
};

/// Injects the method of `config` into a loaded TorchScript model (HF's get_peft_model).
inline PeftModel get_peft_model(torch::jit::Module base, const PeftConfig& config,
                                const std::string& adapter_name = "default") {
  return PeftModel(std::move(base), config, adapter_name);
}

}  // namespace peft
