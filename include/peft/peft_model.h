#pragma once
/// @file
/// PeftModel: PEFT on a loaded TorchScript model, with HF peft's API: named
/// adapters, merging, disabling, weighted combination, mixed-adapter batches.

#include <peft/peft_model_base.h>
#include <peft/core/merged_guard.h>
#include <peft/core/trainable.h>
#include <peft/io/adapter_files.h>
#include <peft/jit/recompute.h>
#include <peft/quant/inject.h>
#include <peft/tuner.h>
#include <torch/script.h>

#include <filesystem>
#include <memory>
#include <unordered_set>

namespace peft {

namespace jit {

/// One named adapter of a PeftModel: its config, its layers and its trainable copies.
struct NamedAdapter {
  /// The adapter's name ("default" unless given).
  std::string name;
  /// The config it was created or loaded with.
  PeftConfig config;
  /// The method's graph rewriting (internal).
  std::unique_ptr<Tuner> tuner;
  /// Its injected layers, by base module path.
  std::vector<AdapterLayer> layers;
  /// Its trainable copies of modules_to_save.
  std::vector<TrainableCopy> copies;
  /// Whether its config was read from a file (target rules as HF applies them to files).
  bool from_file = false;
};

}  // namespace jit

/// A loaded TorchScript model with PEFT adapters injected. Only adapter
/// parameters (plus modules_to_save and any trained biases, as copies)
/// require grad; the base model object keeps its original code and tensors.
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
class PeftModel : public detail::PeftModelBase<PeftModel, jit::NamedAdapter> {
 public:
  /// One named adapter: its config, its layers and its trainable copies.
  using Adapter = jit::NamedAdapter;

  /// A config that changes the base (QLoRA's LoraConfig::quantize_base) changes `base` in place first.
  PeftModel(torch::jit::Module base, const PeftConfig& config, const std::string& adapter_name = "default")
      : PeftModel(config.prepare_base(std::move(base))) {
    add_adapter(adapter_name, config);
  }

  // ---------------------------------------------------------------- files
  // save_pretrained / load_adapter: peft_model_base.h

  /// Adapter `name`'s tensors under HF peft's keys and layouts (its file's content).
  std::vector<io::StateEntry> adapter_state(const std::string& name) const {
    const Adapter& a = *require(name);
    std::vector<io::StateEntry> out = a.tuner->state(a.layers);
    for (const auto& c : a.copies) out.push_back(io::plain_entry(io::kKeyPrefix + c.module + "." + c.attribute, c.copy));
    return out;
  }

  // ------------------------------------------------------------ adapters
  /// Adds an adapter (inactive unless it is the first; see set_adapter).
  void add_adapter(const std::string& name, const PeftConfig& config) { add_adapter(name, config, false); }

  /// Adds an adapter; `from_file`: its config was read from a file.
  void add_adapter(const std::string& name, const PeftConfig& config, bool from_file) {
    detail::check_new_adapter(name, config, configs(), merged_);
    const bool boundaries_gone = std::any_of(adapters_.begin(), adapters_.end(),
                                             [](const Adapter& a) { return !a.config.needs_module_boundaries(); });
    if (config.needs_module_boundaries() && boundaries_gone) {
      // Submodule boundaries (bottleneck adapters attach there) are inlined away by
      // injecting other methods: rebuild with the adapters that need them first.
      rebuild({}, name, config, from_file);
    } else {
      try {
        adapters_.push_back(inject(name, config, from_file));
      } catch (...) {  // the failed injection may have left layers in the adapted model
        rebuild({}, {}, {});
        throw;
      }
    }
    if (adapters_.size() == 1) active_ = {name};
    apply_active();
  }


  /// The layers of one adapter, or of all when `name` is empty.
  std::vector<jit::AdapterLayer> adapter_layers(const std::string& name = "") const {
    std::vector<jit::AdapterLayer> out;
    for (const auto& a : adapters_)
      if (name.empty() || a.name == name) out.insert(out.end(), a.layers.begin(), a.layers.end());
    return out;
  }

  // -------------------------------------------------------------- forward
  /// Runs the adapted model with the active adapters (the base model while disabled).
  /// A training-mode forward runs with eager autograd unless the program chose
  /// otherwise (jit::set_graph_optimization). Training while merged: backward
  /// throws ModelError saying so (the merged adapter would get no gradient).
  torch::jit::IValue forward(std::vector<torch::jit::IValue> inputs) {
    const jit::EagerTrainingScope eager(adapted_.is_training());
    if (disabled_) return base_.forward(std::move(inputs));
    torch::jit::IValue out = run_adapted(std::move(inputs));
    return merged_ ? guard_merged_training(std::move(out)) : out;
  }

  /// A mixed-adapter batch: sample b uses adapter `adapter_names[b]` alone
  /// (`"__base__"`: none), whatever adapters are active.
  torch::jit::IValue forward(std::vector<torch::jit::IValue> inputs, const std::vector<std::string>& adapter_names) {
    check<OptionError>(!merged_ && !disabled_, "mixed-adapter batches need unmerged, enabled adapters");
    for (const auto& n : adapter_names)
      if (n != kBaseAdapter) require(n);
    for (const auto& a : adapters_) {
      check<OptionError>(!a.config.prompt_learning(), "mixed-adapter batches support LoRA, IA3 and bottleneck adapters");
      if (!a.copies.empty())  // (not check<>: its arguments are evaluated even when it passes)
        throw OptionError(fmt::format("mixed-adapter batches: adapter '{}' trains whole tensors ({}.{}, ...: "
                                      "modules_to_save, BitFit or biases), which one batch cannot vary per sample",
                                      a.name, a.copies.front().module, a.copies.front().attribute));
    }
    const torch::Tensor like = (*adapted_.parameters().begin());
    for (const auto& a : adapters_) {
      std::vector<float> mask;
      for (const auto& n : adapter_names) mask.push_back(n == a.name ? 1.0f : 0.0f);
      torch::Tensor m = torch::tensor(mask).to(like.device());
      for (const auto& l : a.layers) {
        torch::jit::Module module = l.module;
        module.setattr("sample_mask", m);
        module.setattr("use_sample_mask", true);
        module.setattr("active", true);
      }
    }
    struct Restore {
      PeftModel* self;
      ~Restore() {
        for (const auto& a : self->adapters_)
          for (const auto& l : a.layers) jit::set_flag(l, "use_sample_mask", false);
        self->apply_active();
      }
    } restore{this};
    const jit::EagerTrainingScope eager(adapted_.is_training());
    return run_adapted(std::move(inputs));
  }

  /// HF's gradient_checkpointing_enable() (off by default): in training, each call of a
  /// stack block (a child of a ModuleList / Sequential, e.g. `h.3`) keeps only its inputs
  /// and runs again in backward with the random generator as it was (same dropout masks),
  /// trading one more forward of each block for its activations. The module's own
  /// forward, and what save() writes, stay as they are.
  void gradient_checkpointing(bool on = true) { checkpointing_ = on; }
  /// Whether gradient checkpointing is on.
  bool is_gradient_checkpointing() const { return checkpointing_; }

  // ----------------------------------------------------------- parameters
  /// The active adapters' trainable tensors with their names.
  /// A name is the base module's path and the parameter, like
  /// `transformer.h.0.attn.c_attn.lora_A`.
  std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters() const {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& a : adapters_) {
      if (std::find(active_.begin(), active_.end(), a.name) == active_.end()) continue;
      for (const auto& l : a.layers)
        for (const auto& p : l.module.named_parameters(/*recurse=*/false))
          if (p.value.requires_grad()) out.emplace_back(l.target + "." + p.name, p.value);
      for (const auto& c : a.copies) out.emplace_back(c.module + "." + c.attribute, c.copy);
    }
    return out;
  }

  /// Trainable and total parameter counts (total = base + every adapter).
  ParameterCount count_parameters() const {
    ParameterCount count;
    std::unordered_set<const void*> seen;  // tied weights (GPT-2's wte/lm_head) count once
    for (const auto& p : adapted_.parameters())
      if (seen.insert(p.unsafeGetTensorImpl()).second) count.total += p.numel();
    for (const auto& p : trainable_parameters()) count.trainable += p.numel();
    count.total += nf4::footprint(adapted_).weights;  // 4-bit weights count as the weights they stand for
    return count;
  }

  // ------------------------------------------------------ disable / merge
  /// Folds the active adapters into the base weights (forward then costs what the base costs).
  /// With `safe_merge` (HF's), first checks that no merged weight would hold NaN or
  /// infinity and throws ModelError, changing nothing, if one would.
  void merge_adapter(bool safe_merge = false) {
    for (const auto& name : active_) {
      const Adapter& a = *require(name);
      check<ModelError>(a.tuner->mergeable(), "adapter '{}': {} cannot be merged into the base weights", a.name,
                        a.tuner->method());
      for (const auto& l : a.layers)  // the adapted model may hold another adapter's copy there: ask the base
        if (!nf4::weight_module(base_, l.target) && jit::submodule(base_, l.target).hasattr("weight"))
          jit::writable_base_tensor(base_, l.target, "weight", a.tuner->method());
      if (safe_merge) find(name)->tuner->check_merge_is_finite();
    }
    for (const auto& name : active_) find(name)->tuner->merge();
    merged_ = true;
  }

  /// Undoes merge_adapter(), restoring the base weights (up to fp rounding).
  void unmerge_adapter() {
    for (auto a = adapters_.rbegin(); a != adapters_.rend(); ++a) a->tuner->unmerge();
    merged_ = false;
  }

  /// Merges the active adapters into the base model's weights (and their
  /// trained copies into its tensors) and returns the base model: a plain
  /// module with its original code. This PeftModel stays merged. A trained copy
  /// goes into its own module only (and its tied slots with ensure_weight_tying):
  /// a tensor shared with another module is replaced there, never written through,
  /// so the merged model computes what the adapted one does.
  torch::jit::Module merge_and_unload(bool safe_merge = false) {
    if (safe_merge)
      for (const auto& name : active_)
        for (const auto& c : require(name)->copies)
          check<ModelError>(torch::isfinite(c.copy).all().item<bool>(),
                            "safe_merge: adapter '{}' trains {}.{}, which holds NaN or infinite values; nothing was merged",
                            name, c.module, c.attribute);
    merge_adapter(safe_merge);
    for (const auto& name : active_)
      for (const auto& c : find(name)->copies) write_back(c);
    return base_;
  }

  /// Prefix tuning: replaces the reparametrisation MLP by the prefixes it
  /// produces now (for saving and inference). A no-op for other methods.
  void fold_projection() {
    for (auto& a : adapters_) a.tuner->fold_projection();
  }

  /// The adapted TorchScript module: save() it to get a model that loads in plain PyTorch.
  torch::jit::Module& module() { return adapted_; }
  /// The base model (original code; shares the frozen tensors).
  const torch::jit::Module& base_model() const { return base_; }
  /// The config of adapter `name` (default: the first).
  const PeftConfig& config(const std::string& name = "") const {
    return name.empty() ? adapters_.front().config : require(name)->config;
  }
  /// Training mode (dropout on) for the base and the adapters.
  void train(bool on = true) {
    adapted_.train(on);
    base_.train(on);
  }
  /// Inference mode.
  void eval() { train(false); }

 private:
  explicit PeftModel(torch::jit::Module base) : base_(std::move(base)), adapted_(jit::Injection::adapted_clone(base_)) {}

  /// `out` of a forward while merged; in training, its first tensor's backward
  /// throws a ModelError that names the merged adapters (core/merged_guard.h).
  torch::jit::IValue guard_merged_training(torch::jit::IValue out) const {
    if (!detail::records_training(adapted_.is_training())) return out;
    std::vector<std::string> quoted;
    for (const auto& name : active_) quoted.push_back("'" + name + "'");
    const std::string message = fmt::format(
        "adapter {} is merged into the base weights, so its parameters get no gradient: call unmerge_adapter() before "
        "training (or eval() / torch::NoGradGuard for inference)",
        join_names(quoted));
    if (out.isTensor()) return detail::fail_backward_merged(out.toTensor(), message);
    if (!out.isTuple()) return out;
    const auto& elements = out.toTuple()->elements();
    std::vector<torch::jit::IValue> guarded(elements.begin(), elements.end());
    for (auto& e : guarded)
      if (e.isTensor()) {
        e = detail::fail_backward_merged(e.toTensor(), message);
        break;
      }
    return c10::ivalue::Tuple::create(std::move(guarded));
  }

  /// Puts a snapshot of the trained copy `c` into the base model, in its slot and its tied slots.
  void write_back(const jit::TrainableCopy& c) { put(base_, c, c.copy.detach().clone()); }

  friend class detail::PeftModelBase<PeftModel, jit::NamedAdapter>;

  /// The layers adapter `a` adapts (set_adapter's combination check).
  static std::vector<std::string> adapter_targets(const Adapter& a) {
    std::vector<std::string> out;
    for (const auto& l : a.layers) out.push_back(l.target);
    return out;
  }

  /// Config fields read off the built adapter.
  static void describe(const Adapter& a, nlohmann::json& j) { a.tuner->describe(j, a.layers); }

  /// Rebuilds the adapted model from the base without adapter `name`.
  void remove_adapter(const std::string& name) { rebuild(name, "", {}); }

  /// Takes out an adapter whose file did not load.
  void remove_failed(const std::string& name) {
    if (adapters_.size() > 1)
      delete_adapter(name);
    else
      adapters_.clear();
  }

  Adapter inject(const std::string& name, const PeftConfig& config, bool from_file) {
    jit::Injection injection(adapted_, name, from_file);
    auto tuner = config.jit_tuner(injection);
    injection.finish();
    for (const auto& c : injection.copies())
      for (const auto& other : adapters_)
        for (const auto& o : other.copies)
          check<OptionError>(o.module != c.module || o.attribute != c.attribute,
                             "adapter '{}' trains {}.{}, which adapter '{}' already trains", name, c.module, c.attribute,
                             other.name);
    return {name, config, std::move(tuner), injection.layers(), injection.copies(), from_file};
  }

  /// Re-creates the adapted model from the base: bottleneck adapters first,
  /// without `skip`, plus a new adapter `added` (if named). Existing adapters keep
  /// their tensors, so optimizers holding them stay valid. On an error, the
  /// adapters and the adapted model are left as they were.
  void rebuild(const std::string& skip, const std::string& added, const PeftConfig& added_config,
               bool added_from_file = false) {
    std::vector<Adapter> old = std::move(adapters_);
    const torch::jit::Module old_model = adapted_;
    try {
      rebuild_from(old, skip, added, added_config, added_from_file);
    } catch (...) {
      adapters_ = std::move(old);
      adapted_ = old_model;
      apply_active();
      throw;
    }
  }

  void rebuild_from(std::vector<Adapter>& old, const std::string& skip, const std::string& added,
                    const PeftConfig& added_config, bool added_from_file) {
    adapters_.clear();
    adapted_ = jit::Injection::adapted_clone(base_);
    for (bool bottleneck : {true, false}) {
      for (auto& a : old) {
        if (a.name == skip || a.config.needs_module_boundaries() != bottleneck) continue;
        Adapter fresh = inject(a.name, a.config.for_loading(), a.from_file);
        take_tensors(a, fresh);
        adapters_.push_back(std::move(fresh));
      }
      if (!added.empty() && added_config.needs_module_boundaries() == bottleneck)
        adapters_.push_back(inject(added, added_config, added_from_file));
    }
  }

  /// Moves `from`'s tensors into the freshly injected `to` (same layers and copies).
  void take_tensors(const Adapter& from, Adapter& to) {
    for (size_t i = 0; i < to.layers.size(); ++i) {
      torch::jit::Module module = to.layers[i].module;
      for (const auto& p : from.layers.at(i).module.named_attributes(/*recurse=*/false))
        if (p.value.isTensor() || p.value.isBool()) module.setattr(p.name, p.value);
    }
    for (size_t i = 0; i < to.copies.size(); ++i) {
      to.copies[i].copy = from.copies.at(i).copy;
      put(adapted_, to.copies[i], to.copies[i].copy);
    }
  }

  /// Switches each adapter's layers on or off, and puts its trained copies (or,
  /// while it is inactive, the base's own tensors) into the adapted model's slots.
  void apply_active() {
    for (const auto& a : adapters_) {
      const bool on = std::find(active_.begin(), active_.end(), a.name) != active_.end();
      for (const auto& l : a.layers) jit::set_flag(l, "active", on);
      for (const auto& c : a.copies) put(adapted_, c, on ? c.copy : c.original);
    }
  }

  /// Puts `t` into the slot of copy `c` in `model`, and into its tied slots.
  static void put(const torch::jit::Module& model, const jit::TrainableCopy& c, const torch::Tensor& t) {
    jit::submodule(model, c.module).setattr(c.attribute, t);
    for (const auto& [module, attribute] : c.tied) jit::submodule(model, module).setattr(attribute, t);
  }

  /// The adapted forward. While it records gradients, NF4 layers run as peft::nf4_linear
  /// (nf4::training_graph: no dequantised weight kept for backward) and, with gradient
  /// checkpointing, stack blocks are recomputed in backward (jit::RecomputedForward).
  torch::jit::IValue run_adapted(std::vector<torch::jit::IValue> inputs) {
    if (!adapted_.is_training() || !torch::GradMode::is_enabled()) return adapted_.forward(std::move(inputs));
    const bool checkpointing = checkpointing_;
    return training_forward_.run(adapted_, std::move(inputs),
                                 checkpointing ? trainable_parameters() : std::vector<torch::Tensor>{}, checkpointing,
                                 [checkpointing](const torch::jit::Module& m) -> jit::DerivedForward::Runner {
                                   auto graph = nf4::training_graph(m);
                                   if (!checkpointing) return graph ? jit::DerivedForward::function_runner(m, graph) : nullptr;
                                   auto recomputed = std::make_shared<jit::RecomputedForward>(
                                       m, graph ? graph : jit::method_graph(m, "forward"), m.get_method("forward").function().getSchema());
                                   return [recomputed](const torch::jit::Module& module, std::vector<torch::jit::IValue> in,
                                                       const std::vector<torch::Tensor>& params) {
                                     return recomputed->run(module, std::move(in), params);
                                   };
                                 });
  }

  torch::jit::Module base_, adapted_;
  jit::DerivedForward training_forward_;
  bool checkpointing_ = false;
};

/// Injects the method of `config` into a loaded TorchScript model (HF's get_peft_model).
inline PeftModel get_peft_model(torch::jit::Module base, const PeftConfig& config,
                                const std::string& adapter_name = "default") {
  return PeftModel(std::move(base), config, adapter_name);
}

}  // namespace peft
