#pragma once
/// @file
/// peft::nn::PeftModel: HF peft's PeftModel for models written in torch::nn
/// (the native backend). The model keeps its own forward; get_peft_model fills
/// the adapter slots of its peft::nn layers, and this object manages them:
/// named adapters, activation, disabling, merging, mixed-adapter batches and
/// HF peft's files.

#include <peft/peft_model_base.h>
#include <peft/core/trainable.h>
#include <peft/nn/inject.h>
#include <peft/nn/sites.h>
#include <peft/tuner.h>
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

namespace peft {
namespace nn {

/// One named adapter of a peft::nn::PeftModel: its config, its method on the
/// model, and the base tensors it trains.
struct NamedAdapter {
  std::string name;                    ///< "default" unless given
  PeftConfig config;                   ///< the config it was created or loaded with
  std::unique_ptr<Tuner> tuner;        ///< its layers in the model
  std::vector<TrainedTensor> trained;  ///< base tensors it trains (modules_to_save, biases)
  bool from_file = false;              ///< its config was read from a file
};

/// A torch::nn model with PEFT adapters in its peft::nn layers' slots. Only
/// adapter parameters (and modules_to_save / trained biases, in place, with
/// their original values kept) require grad. Call the model's own forward.
///
/// ```
/// auto net = std::make_shared<MyModelImpl>();            // written with peft::nn::Linear
/// peft::nn::PeftModel model = peft::get_peft_model(net, peft::LoraConfig().target_modules({"q", "v"}));
/// torch::optim::AdamW opt(model.trainable_parameters(), 1e-3);
/// auto y = net->forward(x);                              // adapters run inside the layers
/// model.save_pretrained("adapter");                      // HF peft's files and keys
/// ```
class PeftModel : public peft::detail::PeftModelBase<PeftModel, NamedAdapter> {
 public:
  /// One named adapter.
  using Adapter = NamedAdapter;

  /// Adds adapter `adapter_name` with `config` to `model` (see peft::get_peft_model).
  PeftModel(std::shared_ptr<torch::nn::Module> model, const PeftConfig& config, const std::string& adapter_name = "default")
      : PeftModel(std::move(model)) {
    add_adapter(adapter_name, config);
  }
  /// Takes over `other`'s adapters.
  PeftModel(PeftModel&& other) = default;
  PeftModel& operator=(PeftModel&&) = delete;  // the adapters belong to one model for this object's life
  /// Takes the adapters out of the model's layers (the model computes the base again).
  ~PeftModel() {
    if (model_) unload();
  }

  // ---------------------------------------------------------------- files
  // save_pretrained / load_adapter: peft_model_base.h

  /// Adapter `name`'s tensors under HF peft's keys (its file's content).
  std::vector<io::StateEntry> adapter_state(const std::string& name) const {
    const Adapter& a = *require(name);
    std::vector<io::StateEntry> out = a.tuner->state();
    for (const auto& t : a.trained) out.push_back(io::plain_entry(io::kKeyPrefix + t.module + "." + t.attribute, t.trained));
    return out;
  }

  // ------------------------------------------------------------ adapters
  /// Adds an adapter (inactive unless it is the first; see set_adapter); `from_file`:
  /// its config was read from a file (HF's lenient target rules).
  void add_adapter(const std::string& name, const PeftConfig& config, bool from_file = false) {
    peft::detail::check_new_adapter(name, config, configs(), merged_);
    Injection injection(*model_, name, from_file);
    std::unique_ptr<Tuner> tuner;
    try {
      tuner = config.native_tuner(injection);
    } catch (...) {  // leave the model as it was
      detach(injection.layers(), injection.trained(), name);
      throw;
    }
    adapters_.push_back({name, config, std::move(tuner), injection.trained(), from_file});
    if (adapters_.size() == 1) active_ = {name};
    apply_active();
  }


  // ----------------------------------------------------------- parameters
  /// The active adapters' trainable tensors with their names: layer path, adapter
  /// name and parameter (`q_proj.default.lora_A`), or module path and parameter
  /// for trained base tensors (`lm_head.weight`).
  std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters() const {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& a : adapters_) {
      if (!is_active(a.name)) continue;
      for (const auto& l : a.tuner->layers())
        for (const auto& p : l.module->named_parameters())
          if (p.value().requires_grad()) out.emplace_back(l.target + "." + a.name + "." + p.key(), p.value());
      for (const auto& t : a.trained) out.emplace_back(t.module + "." + t.attribute, t.param);
    }
    return out;
  }
  /// Trainable and total parameter counts (total = base + every adapter; a shared tensor once).
  ParameterCount count_parameters() const {
    ParameterCount count;
    std::unordered_set<const void*> seen;
    for (const auto& p : model_->parameters())
      if (seen.insert(p.unsafeGetTensorImpl()).second) count.total += p.numel();
    for (const auto& p : trainable_parameters()) count.trainable += p.numel();
    return count;
  }
  // ------------------------------------------------------ disable / merge
  /// Folds the active adapters into their layers' weights. With `safe_merge`,
  /// ModelError (nothing merged) if a merged weight would hold NaN or infinity.
  void merge_adapter(bool safe_merge = false) {
    for (const auto& name : active_)
      check<ModelError>(require(name)->tuner->mergeable(),
                        "adapter '{}' ({}) cannot be merged into the base weights (as in HF peft): it adds positions or "
                        "a sublayer, not a weight update",
                        name, require(name)->tuner->method());
    if (safe_merge)
      for (const auto& name : active_)
        for (const auto& l : require(name)->tuner->layers()) check_merge_is_finite(name, l);
    for (const auto& name : active_)
      for (const auto& l : require(name)->tuner->layers()) l.layer->merge_adapter(name);
    merged_ = true;
  }
  /// Undoes merge_adapter() (up to rounding).
  void unmerge_adapter() {
    for (const auto& a : adapters_)
      for (const auto& l : a.tuner->layers()) l.layer->unmerge_adapters();
    merged_ = false;
  }
  /// Merges the active adapters into the weights, takes every adapter out of the
  /// layers and returns the model: the base architecture with merged weights
  /// (trained modules_to_save kept). This PeftModel holds no adapter afterwards.
  std::shared_ptr<torch::nn::Module> merge_and_unload(bool safe_merge = false) {
    merge_adapter(safe_merge);
    std::vector<std::string> names = adapter_names();
    for (const auto& name : names) {
      Adapter& a = *find(name);
      if (!is_active(name)) restore(a.trained);  // the active ones keep their trained values
      for (auto& t : a.trained) t.param.set_requires_grad(false);
      a.trained.clear();
      detach(a.tuner->layers(), {}, name);
    }
    adapters_.clear();
    active_.clear();
    merged_ = false;
    return model_;
  }

  // --------------------------------------------------- mixed-adapter batches
  /// Scope guard of a mixed-adapter batch (see sample_adapters()).
  class SampleScope {
   public:
    /// Sample b runs adapter `per_sample[b]` until this scope ends.
    SampleScope(PeftModel& model, const std::vector<std::string>& per_sample) : model_(&model) {
      check<OptionError>(!model.merged_ && !model.disabled_, "mixed-adapter batches need unmerged, enabled adapters");
      for (const auto& n : per_sample)
        if (n != kBaseAdapter) model.require(n);
      for (const auto& a : model.adapters_) {
        check<OptionError>(a.trained.empty(), "mixed-adapter batches: adapter '{}' trains whole tensors "
                                              "(modules_to_save or biases), which one batch cannot vary per sample",
                           a.name);
        std::vector<float> mask;
        for (const auto& n : per_sample) mask.push_back(n == a.name ? 1.0f : 0.0f);
        for (const auto& l : a.tuner->layers()) {
          auto* slot = l.layer->slots().find(a.name);
          slot->sample_mask = torch::tensor(mask).to(options_of(*l.module).device());
          slot->active = true;
        }
      }
      model.sampling_ = true;
    }
    SampleScope(const SampleScope&) = delete;
    SampleScope& operator=(const SampleScope&) = delete;
    ~SampleScope() {
      model_->sampling_ = false;
      for (const auto& a : model_->adapters_)
        for (const auto& l : a.tuner->layers()) l.layer->slots().find(a.name)->sample_mask = torch::Tensor();
      model_->apply_active();
    }

   private:
    PeftModel* model_;
  };
  /// Until the returned guard ends, sample b of a batch runs adapter `per_sample[b]`
  /// alone (`"__base__"`: none), whatever adapters are active; call the model's forward inside.
  [[nodiscard]] SampleScope sample_adapters(const std::vector<std::string>& per_sample) {
    return SampleScope(*this, per_sample);
  }

  // ----------------------------------------------------------------- misc
  /// The model (its forward runs the active adapters).
  const std::shared_ptr<torch::nn::Module>& model() const { return model_; }
  /// Training mode (dropout on) for the model and its adapters.
  void train(bool on = true) { model_->train(on); }
  /// Inference mode.
  void eval() { train(false); }

 private:
  explicit PeftModel(std::shared_ptr<torch::nn::Module> model) : model_(std::move(model)) {
    check<OptionError>(model_ != nullptr, "get_peft_model: the model is null");
    for (auto& p : model_->parameters()) p.set_requires_grad(false);
  }

  friend class peft::detail::PeftModelBase<PeftModel, NamedAdapter>;

  /// The layers adapter `a` adapts (set_adapter's combination check).
  static std::vector<std::string> adapter_targets(const Adapter& a) {
    std::vector<std::string> out;
    for (const auto& l : a.tuner->layers()) out.push_back(l.target);
    return out;
  }

  /// Config fields read off the built adapter.
  void describe(const Adapter& a, nlohmann::json& j) const {
    a.tuner->describe(j);
    if (const auto* task = dynamic_cast<const nn::PeftTask*>(model_.get()); task && j.value("task_type", nlohmann::json()).is_null())
      j["task_type"] = task->peft_task_type();
  }

  /// Takes out an adapter whose file did not load.
  void remove_failed(const std::string& name) { remove_adapter(name); }

  /// Switches every adapter's slots on or off and puts each trained tensor's
  /// trained (active) or original (inactive) values into the model. Inside a
  /// sample_adapters() scope (an adapter loaded or removed between generation
  /// steps), the adapters with a per-sample mask stay on and the others off.
  void apply_active() {
    for (const auto& a : adapters_) {
      const bool on = is_active(a.name);
      for (const auto& l : a.tuner->layers()) {
        auto* slot = l.layer->slots().find(a.name);
        slot->active = sampling_ ? slot->sample_mask.defined() : on;
      }
      for (const auto& t : a.trained) t.param.set_data(on ? t.trained : t.original);
    }
  }

  /// Puts the original values back into `trained` tensors, frozen again.
  static void restore(const std::vector<TrainedTensor>& trained) {
    for (const auto& t : trained) {
      t.param.set_data(t.original);
      t.param.set_requires_grad(false);
    }
  }

  /// Takes adapter `name` out of `layers` and restores `trained`.
  static void detach(const std::vector<AttachedAdapter>& layers, const std::vector<TrainedTensor>& trained,
                     const std::string& name) {
    for (const auto& l : layers) l.layer->slots().remove(dynamic_cast<torch::nn::Module&>(*l.layer), name);
    restore(trained);
  }

  /// Takes adapter `name` out of the layers, restores what it trained, and forgets it.
  void remove_adapter(const std::string& name) {
    Adapter& a = *find(name);
    detach(a.tuner->layers(), a.trained, name);
    adapters_.erase(std::remove_if(adapters_.begin(), adapters_.end(), [&](const Adapter& x) { return x.name == name; }),
                    adapters_.end());
  }

  /// Takes every adapter out of the layers (the destructor).
  void unload() noexcept {
    try {
      if (merged_) unmerge_adapter();
      for (const auto& a : adapters_) detach(a.tuner->layers(), a.trained, a.name);
    } catch (...) {  // a destructor must not throw; the model keeps its adapters
    }
    adapters_.clear();
  }

  /// safe_merge: ModelError when merging adapter `name` into `l` gives a non-finite weight.
  static void check_merge_is_finite(const std::string& name, const AttachedAdapter& l) {
    torch::NoGradGuard no_grad;
    torch::Tensor weight, bias;
    if (const auto* table = dynamic_cast<const EmbeddingImpl*>(l.layer)) {
      weight = table->weight.clone();
      dynamic_cast<EmbeddingAdapter&>(*l.module).merge(weight);
    } else {
      const auto& layer = dynamic_cast<const AdaptedLayer&>(*l.layer);
      weight = layer.frozen_weight().to(layer.weight.scalar_type(), false, /*copy=*/true);
      if (layer.bias.defined()) bias = layer.bias.clone();
      dynamic_cast<LinearAdapter&>(*l.module).merge(weight, bias, layer.fan_in_fan_out());
    }
    check<ModelError>(torch::isfinite(weight).all().item<bool>() && (!bias.defined() || torch::isfinite(bias).all().item<bool>()),
                      "safe_merge: merging adapter '{}' into '{}' gives NaN or infinite weights; nothing was merged", name,
                      l.target);
  }

  std::shared_ptr<torch::nn::Module> model_;
  bool sampling_ = false;  // a sample_adapters() scope is open
};

}  // namespace nn

/// HF's get_peft_model for a torch::nn model written with peft::nn layers:
/// fills their adapter slots and returns the PeftModel that manages them.
inline nn::PeftModel get_peft_model(std::shared_ptr<torch::nn::Module> model, const PeftConfig& config,
                                    const std::string& adapter_name = "default") {
  return nn::PeftModel(std::move(model), config, adapter_name);
}

/// get_peft_model for a model held by a TORCH_MODULE holder.
template <typename ModuleType>
nn::PeftModel get_peft_model(const torch::nn::ModuleHolder<ModuleType>& model, const PeftConfig& config,
                             const std::string& adapter_name = "default") {
  return nn::PeftModel(model.ptr(), config, adapter_name);
}

/// get_peft_model for a std::shared_ptr to a module type of the user's.
template <typename ModuleType, typename = std::enable_if_t<std::is_base_of<torch::nn::Module, ModuleType>::value>>
nn::PeftModel get_peft_model(const std::shared_ptr<ModuleType>& model, const PeftConfig& config,
                             const std::string& adapter_name = "default") {
  return nn::PeftModel(std::static_pointer_cast<torch::nn::Module>(model), config, adapter_name);
}

}  // namespace peft
