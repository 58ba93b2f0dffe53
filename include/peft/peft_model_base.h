#pragma once
/// @file
/// What every PeftModel does the same way, whatever the backend (TorchScript:
/// peft::PeftModel; torch::nn: peft::nn::PeftModel): adapter names, which
/// adapters combine, activation, disabling, HF peft's folders.

#include <peft/core/error.h>
#include <peft/core/trainable.h>
#include <peft/io/adapter_files.h>
#include <peft/methods.h>
#include <peft/tuner.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace peft {

/// The name that selects no adapter in a mixed-adapter batch.
inline const std::string kBaseAdapter = "__base__";

namespace detail {

/// Throws OptionError unless adapter `name` with `config` may join `existing`
/// (each adapter's config, in order) on a model that is `merged` or not.
inline void check_new_adapter(const std::string& name, const PeftConfig& config,
                              const std::map<std::string, const PeftConfig*>& existing, bool merged) {
  check<OptionError>(!existing.count(name), "adapter '{}' already exists", name);
  check<OptionError>(name != kBaseAdapter && !name.empty() && name.find('.') == std::string::npos,
                     "adapter name '{}' is reserved or contains '.'", name);
  const bool prompt_learning_present = std::any_of(existing.begin(), existing.end(), [](const auto& e) {
    return e.second->prompt_learning();
  });
  check<OptionError>(existing.empty() || (!config.prompt_learning() && !prompt_learning_present),
                     "adapter '{}': prompt and prefix tuning adapters cannot be combined with other adapters", name);
  check<OptionError>(!merged, "adapter '{}': unmerge_adapter() before adding adapters", name);
  const std::string base_change = config.base_change();
  check<OptionError>(existing.empty() || base_change.empty(),
                     "adapter '{}': {} applies to the first adapter, which changes the base model (QLoRA quantises "
                     "it); later adapters use that base as it is",
                     name, base_change);
}

/// Throws OptionError when a layer adapted by several of the adapters in
/// `by_layer` (layer path -> (adapter name, its config)) is adapted by one that
/// rescales its output (DoRA, IA3): their combination has no defined order.
inline void check_combination(const std::map<std::string, std::vector<std::pair<std::string, const PeftConfig*>>>& by_layer) {
  for (const auto& [target, adapters] : by_layer) {
    if (adapters.size() < 2) continue;
    std::vector<std::string> all, rescaling;
    for (const auto& [name, config] : adapters) {
      all.push_back(name);
      if (config->rescales_layers()) rescaling.push_back(name);
    }
    check<OptionError>(rescaling.empty(),
                       "set_adapter: adapters {} all adapt '{}', and {} rescales its output (DoRA / IA3), so their "
                       "combination has no defined order (merged and unmerged would differ); activate them one at a "
                       "time, or use plain LoRA adapters, whose updates add up",
                       join_names(all), target, join_names(rescaling));
  }
}

/// `body()`, with any error other than a FileError rethrown as one naming `source`
/// (an option rule broken by a file, ...): a file that does not load names the file.
template <typename F>
auto file_error_naming(const std::string& source, F body) -> decltype(body()) {
  try {
    return body();
  } catch (const FileError&) {
    throw;
  } catch (const std::exception& e) {
    throw FileError(fmt::format("'{}': {}", source, e.what()));
  }
}

/// An adapter folder in HF peft's layout, read: its config and its tensors.
struct AdapterFolder {
  std::string config_path, weights_path;
  PeftConfig config;
  io::TensorFile tensors;
};

/// Reads `dir` (FileError for a missing folder or file, bad JSON, or a config field).
inline AdapterFolder read_adapter_folder(const std::filesystem::path& dir) {
  AdapterFolder folder;
  folder.config_path = (dir / io::kConfigFile).string();
  folder.weights_path = (dir / io::kWeightsFile).string();
  const nlohmann::json j = io::read_adapter_config(dir);
  folder.config = file_error_naming(folder.config_path, [&] { return config_from_json(j, folder.config_path); });
  folder.tensors = io::load_safetensors(folder.weights_path);
  return folder;
}

/// Adds the adapter of `folder` with `add` (a TargetError means the adapter was made
/// for another model) and fills it from the file with `assign`; on a bad tensor,
/// `remove` takes the adapter out again. Every error names the file.
template <typename Add, typename Assign, typename Remove>
void load_adapter_folder(const AdapterFolder& folder, Add add, Assign assign, Remove remove) {
  file_error_naming(folder.config_path, [&] {
    try {
      add();
    } catch (const TargetError& e) {  // the config names modules this model lacks
      throw FileError(fmt::format("'{}': adapter for a different model? {}", folder.config_path, e.what()));
    }
    return 0;
  });
  try {
    file_error_naming(folder.weights_path, [&] {
      assign();
      return 0;
    });
  } catch (...) {
    remove();
    throw;
  }
}


/// The backend-independent half of a PeftModel (CRTP): `Derived` provides
/// add_adapter(name, config, from_file), adapter_config_json(name),
/// adapter_state(name), named_trainable_parameters(), count_parameters(),
/// merge_adapter(), unmerge_adapter(), and, privately (befriending this class), a
/// constructor from the bare model, adapter_targets(adapter), describe(adapter,
/// json), apply_active(), remove_adapter(name) and remove_failed(name).
template <typename Derived, typename AdapterT>
class PeftModelBase {
 public:
  // ---------------------------------------------------------------- files
  /// Writes every adapter in HF peft's layout: `dir/adapter_config.json` and
  /// `dir/adapter_model.safetensors` for "default", `dir/<name>/...` for others.
  /// Files are replaced atomically.
  void save_pretrained(const std::filesystem::path& dir) const {
    for (const auto& a : adapters_)
      io::write_adapter_folder(io::adapter_folder(dir, a.name), self().adapter_config_json(a.name),
                               self().adapter_state(a.name));
  }

  /// Adds adapter `name` from files in HF peft's layout (also written by HF peft).
  /// Throws FileError for a missing or mistyped config field, or a tensor that is
  /// missing, of the wrong shape, or matching no module of this model.
  void load_adapter(const std::filesystem::path& dir, const std::string& name) {
    const AdapterFolder folder = read_adapter_folder(dir);
    load_adapter_folder(
        folder, [&] { self().add_adapter(name, folder.config, /*from_file=*/true); },
        [&] { io::assign_state(self().adapter_state(name), folder.tensors, folder.weights_path); },
        [&] { self().remove_failed(name); });
  }

  /// `model` with the adapter in `dir` loaded and active.
  template <typename Model>
  static Derived from_pretrained(Model model, const std::filesystem::path& dir, const std::string& name = "default") {
    Derived peft_model(std::move(model));
    peft_model.load_adapter(dir, name);
    peft_model.set_adapter(name);
    return peft_model;
  }

  /// Adapter `name`'s adapter_config.json, as HF peft writes it.
  nlohmann::json adapter_config_json(const std::string& name) const {
    const AdapterT& a = *require(name);
    nlohmann::json j = a.config.to_json();
    self().describe(a, j);
    return j;
  }

  // ------------------------------------------------------------ adapters
  /// Removes adapter `name`; the others keep their tensors (optimizers holding them stay valid).
  void delete_adapter(const std::string& name) {
    require(name);
    check<OptionError>(adapters_.size() > 1, "delete_adapter: '{}' is the only adapter", name);
    if (merged_) self().unmerge_adapter();
    self().remove_adapter(name);
    active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
    if (active_.empty()) active_ = {adapters_.front().name};
    self().apply_active();
  }

  /// Makes `names` the active adapters. On a layer that several of them adapt,
  /// their updates add up (LoRA: W + ΔW₁ + ΔW₂, merged or not). DoRA and IA3
  /// rescale a layer's output, so no sum defines them with another adapter on the
  /// same layer: OptionError naming the layer and the adapters.
  void set_adapter(const std::vector<std::string>& names) {
    check<OptionError>(!names.empty(), "set_adapter: give at least one adapter name");
    for (const auto& n : names) require(n);
    check<OptionError>(!merged_, "set_adapter: unmerge_adapter() first");
    std::map<std::string, std::vector<std::pair<std::string, const PeftConfig*>>> by_layer;
    for (const auto& n : names)
      for (const auto& target : self().adapter_targets(*require(n))) by_layer[target].emplace_back(n, &require(n)->config);
    check_combination(by_layer);
    active_ = names;
    self().apply_active();
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
  /// The adapter called `name`; OptionError when there is none.
  const AdapterT& adapter(const std::string& name) const { return *require(name); }
  /// Every adapter, in the order they were added.
  const std::vector<AdapterT>& adapters() const { return adapters_; }

  // ----------------------------------------------------------- parameters
  /// What the optimizer should receive: the active adapters' trainable tensors.
  std::vector<torch::Tensor> trainable_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& p : self().named_trainable_parameters()) out.push_back(p.second);
    return out;
  }
  /// Prints "trainable params: X || all params: Y || trainable%: Z".
  void print_trainable_parameters() const { fmt::print("{}\n", format_trainable_parameters(self().count_parameters())); }

  // ------------------------------------------------------------- disable
  /// Scope guard returned by disable_adapter().
  class DisabledScope {
   public:
    /// Disables the adapters of `model` until this scope ends.
    explicit DisabledScope(PeftModelBase& model) : model_(&model), was_merged_(model.merged_) {
      if (was_merged_) model_->self().unmerge_adapter();
      model_->disabled_ = true;
      model_->self().apply_active();
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
      model_->self().apply_active();
      if (was_merged_) model_->self().merge_adapter();
    }

   private:
    PeftModelBase* model_;
    bool was_merged_;
  };

  /// Base behaviour until the returned guard goes out of scope (HF's `with model.disable_adapter():`).
  [[nodiscard]] DisabledScope disable_adapter() { return DisabledScope(*this); }

  /// Whether the active adapters are folded into the base weights.
  bool merged() const { return merged_; }
  /// Whether a disable_adapter() scope is open (the base model computes).
  bool adapters_disabled() const { return disabled_; }

 protected:
  /// Each adapter's config by name, for check_new_adapter.
  std::map<std::string, const PeftConfig*> configs() const {
    std::map<std::string, const PeftConfig*> out;
    for (const auto& a : adapters_) out[a.name] = &a.config;
    return out;
  }
  /// Whether adapter `name` runs now.
  bool is_active(const std::string& name) const {
    return !disabled_ && std::find(active_.begin(), active_.end(), name) != active_.end();
  }
  AdapterT* find(const std::string& name) {
    for (auto& a : adapters_)
      if (a.name == name) return &a;
    return nullptr;
  }
  const AdapterT* find(const std::string& name) const { return const_cast<PeftModelBase*>(this)->find(name); }
  const AdapterT* require(const std::string& name) const {
    const AdapterT* a = find(name);
    if (!a) throw OptionError("no adapter named '" + name + "'; adapters: " + join_names(adapter_names()));
    return a;
  }

  std::vector<AdapterT> adapters_;
  std::vector<std::string> active_;
  bool disabled_ = false, merged_ = false;

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace detail
}  // namespace peft
