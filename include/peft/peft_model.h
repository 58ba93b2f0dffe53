#pragma once
/// @file
/// PeftModel: PEFT on a loaded TorchScript model, with HF peft's API: named
/// adapters, merging, disabling, weighted combination, mixed-adapter batches.

#include <peft/adapter/inject.h>
#include <peft/bitfit/inject.h>
#include <peft/core/merged_guard.h>
#include <peft/core/trainable.h>
#include <peft/ia3/inject.h>
#include <peft/lora/inject.h>
#include <peft/prefix/inject.h>
#include <peft/prompt/inject.h>
#include <torch/script.h>

#include <filesystem>
#include <memory>
#include <unordered_set>
#include <variant>

namespace peft {

/// Any method's config.
using PeftConfig =
    std::variant<LoraConfig, IA3Config, AdapterConfig, BitFitConfig, PromptTuningConfig, PrefixTuningConfig>;

/// Whether `config` is prompt or prefix tuning (one such adapter per model, alone).
inline bool is_prompt_learning(const PeftConfig& config) {
  return std::holds_alternative<PromptTuningConfig>(config) || std::holds_alternative<PrefixTuningConfig>(config);
}

/// How add_weighted_adapter combines LoRA adapters (HF's combination_type).
enum class Combination {
  Linear,  ///< A = Σ√(wᵢsᵢ)Aᵢ, B = Σ√(wᵢsᵢ)Bᵢ (equal ranks), as HF peft
  Cat,     ///< A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …]: exactly Σ wᵢ ΔWᵢ, rank Σ rᵢ
  SVD,     ///< the top-r SVD of Σ wᵢ ΔWᵢ
};

/// The name that selects no adapter in a mixed-adapter batch.
inline const std::string kBaseAdapter = "__base__";

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
class PeftModel {
 public:
  /// One named adapter: its config, its layers and its trainable copies.
  struct Adapter {
    /// The adapter's name ("default" unless given).
    std::string name;
    /// The config it was created or loaded with.
    PeftConfig config;
    /// The method's graph rewriting (internal).
    std::unique_ptr<jit::Tuner> tuner;
    /// Its injected layers, by base module path.
    std::vector<jit::AdapterLayer> layers;
    /// Its trainable copies of modules_to_save.
    std::vector<jit::TrainableCopy> copies;
    /// Whether its config was read from a file (target rules as HF applies them to files).
    bool from_file = false;
  };

  /// QLoRA (LoraConfig::quantize_base) quantises `base` in place first.
  PeftModel(torch::jit::Module base, const PeftConfig& config, const std::string& adapter_name = "default")
      : PeftModel(quantized_base(std::move(base), config)) {
    add_adapter(adapter_name, config);
  }

  // ---------------------------------------------------- files (io/pretrained.h)
  /// Writes every adapter in HF peft's layout: `dir/adapter_config.json` and
  /// `dir/adapter_model.safetensors` for "default", `dir/<name>/...` for others.
  /// Files are replaced atomically.
  void save_pretrained(const std::filesystem::path& dir) const;

  /// Adds adapter `name` from files in HF peft's layout (also written by HF peft).
  /// Throws FileError for a missing or mistyped config field, or a tensor that is
  /// missing, of the wrong shape, or matching no module of this model.
  void load_adapter(const std::filesystem::path& dir, const std::string& name);

  /// `base` with the adapter in `dir` loaded and active.
  static PeftModel from_pretrained(torch::jit::Module base, const std::filesystem::path& dir,
                                   const std::string& name = "default");

  // ------------------------------------------------------------ adapters
  /// Adds an adapter (inactive unless it is the first; see set_adapter).
  void add_adapter(const std::string& name, const PeftConfig& config) { add_adapter(name, config, false); }

  /// Adds an adapter; `from_file`: its config was read from a file.
  void add_adapter(const std::string& name, const PeftConfig& config, bool from_file) {
    check<OptionError>(find(name) == nullptr, "adapter '{}' already exists", name);
    check<OptionError>(name != kBaseAdapter && !name.empty() && name.find('.') == std::string::npos,
                       "adapter name '{}' is reserved or contains '.'", name);
    check<OptionError>(adapters_.empty() || (!is_prompt_learning(config) && !is_prompt_learning(adapters_[0].config)),
                       "adapter '{}': prompt and prefix tuning adapters cannot be combined with other adapters", name);
    check<OptionError>(!merged_, "adapter '{}': unmerge_adapter() before adding adapters", name);
    const auto* lora = std::get_if<LoraConfig>(&config);
    check<OptionError>(adapters_.empty() || !lora || !lora->quantize_base(),
                       "adapter '{}': LoraConfig.quantize_base applies to the first adapter, which quantises the base "
                       "model; later adapters use the quantised base as it is",
                       name);
    const bool needs_boundaries = std::holds_alternative<AdapterConfig>(config);
    const bool boundaries_gone = std::any_of(adapters_.begin(), adapters_.end(), [](const Adapter& a) {
      return !std::holds_alternative<AdapterConfig>(a.config);
    });
    if (needs_boundaries && boundaries_gone) {
      // Bottleneck adapters need submodule boundaries, which injecting other
      // methods inlines away: rebuild with the bottleneck adapters first.
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
    apply_active_flags();
  }

  /// Makes `names` the active adapters. On a layer that several of them adapt,
  /// their updates add up (LoRA: W + ΔW₁ + ΔW₂, merged or not). DoRA and IA3
  /// rescale a layer's output, so no sum defines them with another adapter on the
  /// same layer: OptionError naming the layer and the adapters.
  void set_adapter(const std::vector<std::string>& names) {
    check<OptionError>(!names.empty(), "set_adapter: give at least one adapter name");
    for (const auto& n : names) require(n);
    check<OptionError>(!merged_, "set_adapter: unmerge_adapter() first");
    check_combination(names);
    active_ = names;
    apply_active_flags();
  }
  /// Activates these adapters together (their updates add up).
  void set_adapter(std::initializer_list<std::string> names) { set_adapter(std::vector<std::string>(names)); }
  /// Activates only this adapter.
  void set_adapter(const std::string& name) { set_adapter(std::vector<std::string>{name}); }

  /// The adapters forward uses now.
  const std::vector<std::string>& active_adapters() const { return active_; }

  /// Every adapter's name, in the order they were added.
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> out;
    for (const auto& a : adapters_) out.push_back(a.name);
    return out;
  }

  /// Removes an adapter: the adapted model is rebuilt from the base with the
  /// others, which keep their tensors (optimizers holding them stay valid).
  void delete_adapter(const std::string& name) {
    require(name);
    check<OptionError>(adapters_.size() > 1, "delete_adapter: '{}' is the only adapter", name);
    if (merged_) unmerge_adapter();
    rebuild(name, "", {});
    active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
    if (active_.empty()) active_ = {adapters_.front().name};
    apply_active_flags();
  }

  /// A new LoRA adapter combining LoRA adapters `names` with `weights`
  /// (HF's add_weighted_adapter); its scaling is 1 (lora_alpha = r).
  void add_weighted_adapter(const std::vector<std::string>& names, const std::vector<double>& weights,
                            const std::string& new_name, Combination combination = Combination::SVD,
                            int64_t svd_rank = 0);

  /// The adapter called `name`; TargetError when there is none.
  const Adapter& adapter(const std::string& name) const { return *require(name); }
  /// Every adapter, in the order they were added.
  const std::vector<Adapter>& adapters() const { return adapters_; }

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
    torch::jit::IValue out = adapted_.forward(std::move(inputs));
    return merged_ ? guard_merged_training(std::move(out)) : out;
  }

  /// A mixed-adapter batch: sample b uses adapter `adapter_names[b]` alone
  /// (`"__base__"`: none), whatever adapters are active.
  torch::jit::IValue forward(std::vector<torch::jit::IValue> inputs, const std::vector<std::string>& adapter_names) {
    check<OptionError>(!merged_ && !disabled_, "mixed-adapter batches need unmerged, enabled adapters");
    for (const auto& n : adapter_names)
      if (n != kBaseAdapter) require(n);
    for (const auto& a : adapters_) {
      check<OptionError>(!is_prompt_learning(a.config), "mixed-adapter batches support LoRA, IA3 and bottleneck adapters");
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
        self->apply_active_flags();
      }
    } restore{this};
    const jit::EagerTrainingScope eager(adapted_.is_training());
    return adapted_.forward(std::move(inputs));
  }

  // ----------------------------------------------------------- parameters
  /// What the optimizer should receive: the active adapters' trainable tensors.
  std::vector<torch::Tensor> trainable_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& p : named_trainable_parameters()) out.push_back(p.second);
    return out;
  }

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

  /// Prints "trainable params: X || all params: Y || trainable%: Z".
  void print_trainable_parameters() const { fmt::print("{}\n", format_trainable_parameters(count_parameters())); }

  // ------------------------------------------------------ disable / merge
  /// Scope guard returned by disable_adapter().
  class DisabledScope {
   public:
    /// Disables the adapters of `model` until this scope ends.
    explicit DisabledScope(PeftModel& model) : model_(&model), was_merged_(model.merged_) {
      if (was_merged_) model_->unmerge_adapter();
      model_->disabled_ = true;
    }
    /// Moves the restore duty to the new scope.
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
  /// Whether the active adapters are folded into the base weights.
  bool merged() const { return merged_; }
  /// Whether a disable_adapter() scope is open (forward runs the base model).
  bool adapters_disabled() const { return disabled_; }

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

  /// `base`, with the layers a QLoRA config names quantised to NF4 (in place).
  static torch::jit::Module quantized_base(torch::jit::Module base, const PeftConfig& config) {
    const auto* lora = std::get_if<LoraConfig>(&config);
    if (!lora || !lora->quantize_base()) return base;
    const NF4Config& nf4 = *lora->quantize_base();
    std::vector<std::string> candidates, layers;
    if (nf4.quantize_all_linear()) {
      candidates = nf4::linear_layers(base);
    } else {
      auto graph = jit::inlined_copy(*jit::method_graph(base, "forward"), nullptr, jit::Injection::is_peft_call);
      for (const auto& entry : jit::select_linear_targets(*graph, base, lora->rule(), "LoraConfig"))
        candidates.push_back(entry.first);
    }
    for (const auto& name : candidates)  // modules_to_save train dense copies: never quantised
      if (std::none_of(lora->modules_to_save().begin(), lora->modules_to_save().end(),
                       [&](const std::string& key) { return TargetModules::matches_key(name, key); }))
        layers.push_back(name);
    nf4::quantize_linear_layers(base, layers, nf4);
    return base;
  }

  /// Whether `config` rescales the layers it adapts (so it cannot share a layer with another active adapter).
  static bool rescales_layers(const PeftConfig& config) {
    const auto* lora = std::get_if<LoraConfig>(&config);
    return std::holds_alternative<IA3Config>(config) || (lora && lora->use_dora());
  }

  /// Throws OptionError when a layer that a DoRA or IA3 adapter among `names` adapts is adapted by another of them.
  void check_combination(const std::vector<std::string>& names) const {
    std::map<std::string, std::vector<const Adapter*>> by_layer;
    for (const auto& n : names)
      for (const auto& l : require(n)->layers) by_layer[l.target].push_back(require(n));
    for (const auto& [target, adapters] : by_layer) {
      if (adapters.size() < 2) continue;
      std::vector<std::string> all, rescaling;
      for (const Adapter* a : adapters) {
        all.push_back(a->name);
        if (rescales_layers(a->config)) rescaling.push_back(a->name);
      }
      check<OptionError>(rescaling.empty(),
                         "set_adapter: adapters {} all adapt '{}', and {} rescales its output (DoRA / IA3), so their "
                         "combination has no defined order (merged and unmerged would differ); activate them one at a "
                         "time, or use plain LoRA adapters, whose updates add up",
                         join_names(all), target, join_names(rescaling));
    }
  }

  /// Puts a snapshot of the trained copy `c` into the base model, in its slot and its tied slots.
  void write_back(const jit::TrainableCopy& c) { put(base_, c, c.copy.detach().clone()); }

  Adapter* find(const std::string& name) {
    for (auto& a : adapters_)
      if (a.name == name) return &a;
    return nullptr;
  }
  const Adapter* find(const std::string& name) const { return const_cast<PeftModel*>(this)->find(name); }
  const Adapter* require(const std::string& name) const {
    const Adapter* a = find(name);
    if (!a) throw OptionError("no adapter named '" + name + "'; adapters: " + join_names(adapter_names()));
    return a;
  }

  Adapter inject(const std::string& name, const PeftConfig& config, bool from_file) {
    jit::Injection injection(adapted_, name, from_file);
    auto tuner = std::visit([&](const auto& cfg) { return make_tuner(injection, cfg); }, config);
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
      apply_active_flags();
      throw;
    }
  }

  void rebuild_from(std::vector<Adapter>& old, const std::string& skip, const std::string& added,
                    const PeftConfig& added_config, bool added_from_file) {
    adapters_.clear();
    adapted_ = jit::Injection::adapted_clone(base_);
    for (bool bottleneck : {true, false}) {
      for (auto& a : old) {
        if (a.name == skip || std::holds_alternative<AdapterConfig>(a.config) != bottleneck) continue;
        Adapter fresh = inject(a.name, loading_config(a.config), a.from_file);
        take_tensors(a, fresh);
        adapters_.push_back(std::move(fresh));
      }
      if (!added.empty() && std::holds_alternative<AdapterConfig>(added_config) == bottleneck)
        adapters_.push_back(inject(added, added_config, added_from_file));
    }
  }

  /// The config to re-create an adapter whose tensors will be restored: no
  /// initialisation that changes the base (PiSSA) or draws random numbers.
  static PeftConfig loading_config(const PeftConfig& config) {
    if (const auto* lora = std::get_if<LoraConfig>(&config)) return LoraConfig(*lora).init_lora_weights(LoraInit::Zero);
    return config;
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
  void apply_active_flags() {
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
  std::vector<Adapter> adapters_;
  std::vector<std::string> active_;
  bool disabled_ = false, merged_ = false;
};

inline void PeftModel::add_weighted_adapter(const std::vector<std::string>& names, const std::vector<double>& weights,
                                            const std::string& new_name, Combination combination, int64_t svd_rank) {
  check<OptionError>(!names.empty() && names.size() == weights.size(),
                     "add_weighted_adapter: {} adapters but {} weights", names.size(), weights.size());
  // Every (adapter, layer) that contributes, by target module.
  struct Part {
    torch::Tensor A, B;
    double scale;  // wᵢ · sᵢ
  };
  std::map<std::string, std::vector<Part>> parts;
  int64_t rank_sum = 0, rank_max = 0, rank_first = -1;
  for (size_t i = 0; i < names.size(); ++i) {
    const Adapter& a = *require(names[i]);
    const auto* cfg = std::get_if<LoraConfig>(&a.config);
    check<OptionError>(cfg && !cfg->use_dora() && cfg->slice_pattern().empty(),
                       "add_weighted_adapter: '{}' is not a plain LoRA adapter (DoRA and per-slice LoRA are not combined)",
                       a.name);
    for (const auto& l : a.layers) {
      torch::Tensor A = l.module.attr("lora_A").toTensor().detach(), B = l.module.attr("lora_B").toTensor().detach();
      parts[l.target].push_back({A, B, weights[i] * l.module.attr("scaling").toDouble()});
      rank_max = std::max(rank_max, A.size(0));
      if (rank_first < 0) rank_first = A.size(0);
      check<OptionError>(combination != Combination::Linear || A.size(0) == rank_first,
                         "add_weighted_adapter: Combination::Linear needs equal ranks ('{}' has {} at {}, expected {})",
                         a.name, A.size(0), l.target, rank_first);
    }
    rank_sum += cfg->r();
  }
  const int64_t r = combination == Combination::Cat ? rank_sum
                    : combination == Combination::SVD ? (svd_rank > 0 ? svd_rank : rank_max)
                                                      : rank_first;
  std::vector<std::string> targets;
  for (const auto& entry : parts) targets.push_back(entry.first);
  add_adapter(new_name, LoraConfig().r(r).lora_alpha(static_cast<double>(r)).target_modules(targets)
                            .init_lora_weights(LoraInit::Zero));
  torch::NoGradGuard no_grad;
  for (const auto& l : find(new_name)->layers) {
    const auto& ps = parts.at(l.target);
    torch::Tensor A = l.module.attr("lora_A").toTensor(), B = l.module.attr("lora_B").toTensor();
    if (combination == Combination::Linear) {
      for (const auto& p : ps) {
        A.add_(p.A * std::sqrt(std::abs(p.scale)) * (p.scale < 0 ? -1.0 : 1.0));
        B.add_(p.B * std::sqrt(std::abs(p.scale)));
      }
    } else if (combination == Combination::Cat) {
      std::vector<torch::Tensor> As, Bs;
      for (const auto& p : ps) As.push_back(p.A), Bs.push_back(p.B * p.scale);
      torch::Tensor catA = torch::cat(As, 0), catB = torch::cat(Bs, 1);
      A.narrow(0, 0, catA.size(0)).copy_(catA);  // adapters missing here leave zero rows
      B.narrow(1, 0, catB.size(1)).copy_(catB);
    } else {
      torch::Tensor delta = torch::zeros({B.size(0), A.size(1)}, A.options());
      for (const auto& p : ps) delta += p.scale * torch::matmul(p.B, p.A);
      torch::Tensor U, S, Vh;
      std::tie(U, S, Vh) = at::linalg_svd(delta, /*full_matrices=*/false);
      const int64_t k = std::min<int64_t>(r, S.size(0));
      B.narrow(1, 0, k).copy_(U.narrow(1, 0, k) * S.narrow(0, 0, k).unsqueeze(0));
      A.narrow(0, 0, k).copy_(Vh.narrow(0, 0, k));
    }
  }
}

/// Injects the method of `config` into a loaded TorchScript model (HF's get_peft_model).
inline PeftModel get_peft_model(torch::jit::Module base, const PeftConfig& config,
                                const std::string& adapter_name = "default") {
  return PeftModel(std::move(base), config, adapter_name);
}

}  // namespace peft

// The file members of PeftModel.
#include <peft/io/pretrained.h>
