#pragma once
/// @file
/// The method-agnostic part of injecting adapters into a loaded TorchScript
/// model: an adapted clone sharing the base's tensors, a container for adapter
/// layers on its root, calls to them inserted into its forward graph, and
/// trainable copies of base tensors.
///
/// Why a clone: TorchScript types are shared between instances of one Python
/// class (every nn.Linear, every block), so adapter state cannot live on the
/// base's submodules. `clone(inplace=true)` gives new types and objects that
/// share every tensor (no memory cost); adapter layers live in a container on
/// the clone's root (a type of its own), and its forward is replaced, while
/// the base keeps its original code for disable_adapter() and merge_and_unload().

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/io/adapter_files.h>
#include <peft/jit/graph.h>

#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <string>
#include <vector>

namespace peft {
namespace jit {

/// One adapter layer: a small TorchScript module attached to one base module.
struct AdapterLayer {
  std::string target;         ///< dotted path of the base module it adapts
  std::string key;            ///< its attribute name in the container
  torch::jit::Module module;  ///< holds the adapter's parameters and the `active`/`merged` flags
};

/// A module's tensor attribute: (dotted module path, attribute name).
using TensorSlot = std::pair<std::string, std::string>;

/// A base tensor replaced in the adapted model by a trainable copy (modules_to_save, BitFit, LoRA bias).
struct TrainableCopy {
  std::string module;     ///< dotted path of the owning module
  std::string attribute;  ///< e.g. "bias"
  torch::Tensor original; ///< the base's tensor (shared with the base model)
  torch::Tensor copy;     ///< the adapted model's trainable tensor
  /// Slots tied to `original` (sharing its storage, like GPT-2's lm_head and wte)
  /// that hold the copy too: only with ensure_weight_tying.
  std::vector<TensorSlot> tied = {};
};

/// Builds the adapted model for one adapter of one base model.
class Injection {
 public:
  static constexpr const char* kContainer = "peft_adapters";
  /// The root attribute holding NF4-quantised base weights (quant/inject.h).
  static constexpr const char* kQuantContainer = "peft_nf4";
  /// Shapes the per-sample mask [B] to broadcast over a [B, ...] tensor.
  static constexpr const char* kMaskLike =
      "def mask_like(self, t: Tensor) -> Tensor:\n"
      "    m = self.sample_mask.to(t.dtype)\n"
      "    for _ in range(t.dim() - 1):\n"
      "        m = m.unsqueeze(-1)\n"
      "    return m\n";

  /// The adapted model before any adapter: a clone of `base` sharing its
  /// (now frozen) tensors, with an empty adapter container on its root.
  static torch::jit::Module adapted_clone(const torch::jit::Module& base) {
    check<ModelError>(base.find_method("forward").has_value(), "the model has no forward method");
    check<ModelError>(base.parameters().size() > 0,
                      "the model has no parameters: a frozen or optimised export (torch.jit.freeze) keeps its "
                      "weights as constants and cannot be adapted; export the unfrozen module");
    for (auto p : base.parameters()) p.set_requires_grad(false);
    torch::jit::Module model = clone_in_own_unit(base);
    model.register_module(kContainer, new_module(model, "Adapters"));
    return model;
  }

  /// A copy of `base` sharing every tensor: its root gets a new type in a new
  /// compilation unit (with the root's code), every submodule a new object of
  /// the submodule's own type. Types live as long as their unit, and the base's
  /// unit lives as long as the base: Module::clone() put a copy of the whole
  /// model's code there for every adapted model (load / unload cycles grew the
  /// process without bound); here the adapted model's code, and every adapter
  /// type injected into it later, go when the adapted model goes.
  static torch::jit::Module clone_in_own_unit(const torch::jit::Module& base) {
    const c10::ClassTypePtr& type = base.type();
    torch::jit::Module root(*type->name(), std::make_shared<torch::jit::CompilationUnit>(), /*shouldMangle=*/false);
    for (size_t i = 0; i < type->numAttributes(); ++i) {
      root.type()->addAttribute(type->getAttributeName(i), type->getAttribute(i), type->is_parameter(i), type->is_buffer(i));
      root._ivalue()->setSlot(i, copy_objects(base._ivalue()->getSlot(i)));
    }
    for (size_t i = 0; i < type->numConstants(); ++i) root.type()->addConstant(type->getConstantName(i), type->getConstant(i));
    auto remap = [&](c10::TypePtr t) -> c10::TypePtr { return t == type ? root.type() : t; };
    for (torch::jit::Function* method : type->methods()) {
      auto graph = torch::jit::toGraphFunction(*method).graph()->copy();
      graph->remapTypes(remap);
      torch::jit::Function* fn = root._ivalue()->compilation_unit()->create_function(
          c10::QualifiedName(*root.type()->name(), method->name()), std::move(graph));
      fn->setSchema(method->getSchema().cloneWithRemappedTypes(remap));
      root.type()->addMethod(fn);
    }
    return root;
  }

 private:
  /// `value`, or for a module a new object of its type holding copies of its submodules and its other values.
  static c10::IValue copy_objects(const c10::IValue& value) {
    if (!value.isModule()) return value;
    const c10::intrusive_ptr<c10::ivalue::Object> object = value.toObject();
    auto copy = c10::ivalue::Object::create(c10::StrongTypePtr(object->compilation_unit(), object->type()),
                                            object->slots().size());
    for (size_t i = 0; i < object->slots().size(); ++i) copy->setSlot(i, copy_objects(object->getSlot(i)));
    return copy;
  }

 public:

  /// Adds adapter `adapter_name` to a model made by adapted_clone(); `from_file`:
  /// its config was read from a file (see TargetRule::from_file).
  Injection(torch::jit::Module model, const std::string& adapter_name, bool from_file = false)
      : adapter_name_(adapter_name), from_file_(from_file), model_(std::move(model)) {
    container_ = model_.attr(kContainer).toModule();
    check<OptionError>(!container_.hasattr(adapter_name), "adapter '{}' already exists", adapter_name);
    adapters_ = new_module(model_, "Adapter_" + adapter_name);
    container_.register_module(adapter_name, adapters_);
    graph_ = method_graph(model_, "forward");
    warn_about_baked_devices();
  }

  /// Whether the linear layer at `module` holds its weight in NF4 (QLoRA, quant/inject.h).
  bool is_quantized(const std::string& module) const {
    return model_.hasattr(kQuantContainer) && model_.attr(kQuantContainer).toModule().hasattr(layer_key(module));
  }

  /// Whether the dotted module `name` belongs to the library (an adapter or NF4
  /// container on the root) rather than to the base model.
  static bool is_library_module(const std::string& name) {
    for (const char* container : {kContainer, kQuantContainer})
      if (name == container || name.rfind(std::string(container) + ".", 0) == 0) return true;
    return false;
  }

  /// The base model's own modules in `model` (name, module), root ("") included:
  /// what target rules, modules_to_save and error messages see, for every adapter.
  static std::vector<torch::jit::NameModule> base_modules(const torch::jit::Module& model) {
    std::vector<torch::jit::NameModule> out;
    for (const auto& m : model.named_modules())
      if (!is_library_module(m.name)) out.push_back(m);
    return out;
  }

  /// Whether `call` runs an adapter layer (of this or an earlier adapter).
  static bool is_adapter_call(Node* call) { return calls_into(call, kContainer); }

  /// Whether `call` is one inlining keeps: an adapter layer or a quantised weight.
  static bool is_peft_call(Node* call) { return calls_into(call, kContainer) || calls_into(call, kQuantContainer); }

  /// Whether the adapter's config was read from a file.
  bool from_file() const { return from_file_; }
  /// `rule` as this adapter applies it (lenient for a config read from a file).
  TargetRule rule(TargetRule rule) const {
    rule.from_file = from_file_;
    return rule;
  }

  torch::jit::Module& model() { return model_; }
  Graph& graph() { return *graph_; }
  const std::string& adapter_name() const { return adapter_name_; }
  const std::vector<AdapterLayer>& layers() const { return layers_; }
  std::vector<TrainableCopy>& copies() { return copies_; }

  /// Inlines forward completely; `on_call` sees each submodule call first.
  void inline_all(const CallHook& on_call = nullptr) {
    inline_calls(*graph_, on_call, is_peft_call);
    simplify(graph_);
  }

  /// Registers an adapter layer for `target`: a new module with `parameters`
  /// (trainable), `attributes`, the flags `active` = true and `merged` = false,
  /// and methods compiled from TorchScript `source`.
  torch::jit::Module add_layer(const std::string& target, const std::string& class_name,
                               const std::vector<std::pair<std::string, torch::Tensor>>& parameters,
                               const std::vector<std::pair<std::string, c10::IValue>>& attributes,
                               const std::string& source) {
    torch::jit::Module layer = new_module(model_, class_name);
    for (const auto& [name, value] : parameters) layer.register_parameter(name, value.requires_grad_(true), false);
    for (const auto& [name, value] : attributes) layer.register_attribute(name, value.type(), value);
    layer.register_attribute("active", c10::BoolType::get(), true);
    layer.register_attribute("merged", c10::BoolType::get(), false);
    // Mixed-adapter batches: a per-sample 0/1 mask, set around one forward.
    layer.register_attribute("use_sample_mask", c10::BoolType::get(), false);
    layer.register_attribute("sample_mask", c10::TensorType::get(), torch::empty({0}));
    layer.define(source + kMaskLike);
    std::string key = layer_key(target);
    adapters_.register_module(key, layer);
    layers_.push_back({target, key, layer});
    return layer;
  }

  /// Inserts `layer.<method>(args...)` after (or before) `anchor`; returns its output.
  Value* call(const AdapterLayer& layer, Node* anchor, const std::vector<Value*>& args, bool after,
              const std::string& method = "forward") {
    return insert_method_call(anchor, {kContainer, adapter_name_, layer.key}, layer.module, method, args, after)->output();
  }

  /// A `None` constant at the top of the graph, for optional arguments.
  Value* none() {
    if (!none_) {
      torch::jit::WithInsertPoint guard(graph_->block()->nodes().front());
      none_ = graph_->insertConstant(c10::IValue());
    }
    return none_;
  }

  /// Replaces the adapted model's tensor `module.attribute` by a trainable copy.
  /// A tensor tied to it elsewhere in the base (same storage) keeps the original,
  /// as in HF peft, unless `keep_tied` (HF's ensure_weight_tying): then it holds the copy too.
  void train_copy(const std::string& module, const std::string& attribute, bool keep_tied = false) {
    for (const auto& c : copies_)
      if ((c.module == module && c.attribute == attribute) ||
          std::find(c.tied.begin(), c.tied.end(), TensorSlot{module, attribute}) != c.tied.end())
        return;
    torch::jit::Module owner = submodule(model_, module);
    torch::Tensor original = owner.attr(attribute).toTensor();
    check<ModelError>(!is_quantized(module) || attribute != "weight",
                      "'{}.weight' is NF4-quantised (QLoRA), so it cannot train as a copy (modules_to_save); keep "
                      "'{}' out of the quantised layers",
                      module, module);
    torch::Tensor copy = original.detach().clone().requires_grad_(true);
    owner.setattr(attribute, copy);
    TrainableCopy trained{module, attribute, original, copy};
    if (keep_tied) {
      trained.tied = tied_slots(model_, original, {module, attribute});
      for (const auto& [m, a] : trained.tied) submodule(model_, m).setattr(a, copy);
    }
    copies_.push_back(trained);
  }

  /// HF's `bias` field of LoRA-like methods: the bias of every base module
  /// (`only_adapted` false: "all") or of the modules this adapter's layers adapt
  /// ("lora_only", "vera_only") trains, as a copy.
  void train_biases(bool only_adapted) {
    for (const auto& m : base_modules(model_)) {
      const bool adapted = std::any_of(layers_.begin(), layers_.end(), [&](const AdapterLayer& l) { return l.target == m.name; });
      if (only_adapted && !adapted) continue;
      if (m.value.hasattr("bias") && m.value.attr("bias").isTensor()) train_copy(m.name, "bias");
    }
  }

  /// Every parameter of the adapted model's `module` (and its submodules) as a trainable copy.
  void train_module_copy(const std::string& module, bool keep_tied = false) {
    for (const auto& p : submodule(model_, module).named_parameters(/*recurse=*/true)) {
      const auto dot = p.name.rfind('.');
      const std::string owner = dot == std::string::npos ? module : module + "." + p.name.substr(0, dot);
      train_copy(owner, dot == std::string::npos ? p.name : p.name.substr(dot + 1), keep_tied);
    }
  }

  /// The base model's tensor slots other than `except` whose storage `t` shares (tied weights).
  static std::vector<TensorSlot> tied_slots(const torch::jit::Module& model, const torch::Tensor& t,
                                            const TensorSlot& except) {
    std::vector<TensorSlot> out;
    for (const auto& m : base_modules(model))
      for (const auto& a : m.value.named_attributes(/*recurse=*/false))
        if (a.value.isTensor() && TensorSlot{m.name, a.name} != except && a.value.toTensor().defined() &&
            a.value.toTensor().has_storage() && t.has_storage() &&
            a.value.toTensor().storage().is_alias_of(t.storage()))
          out.emplace_back(m.name, a.name);
    return out;
  }

  /// HF's modules_to_save: every module whose name is a key or ends with "." + key
  /// trains fully, as a copy. As in HF peft, a key that matches nothing is only
  /// warned about (a file written for sequence classification names both
  /// `classifier` and `score`); TargetError when no key matches anything.
  void train_modules_to_save(const std::vector<std::string>& keys, bool keep_tied = false) {
    if (keys.empty()) return;
    std::vector<std::string> all, unmatched;
    for (const auto& m : base_modules(model_))
      if (!m.name.empty()) all.push_back(m.name);
    for (const auto& key : keys) {
      std::vector<std::string> matched;
      for (const auto& name : all)
        if (TargetModules::matches_key(name, key)) matched.push_back(name);
      if (matched.empty()) unmatched.push_back(key);
      for (const auto& name : matched) train_module_copy(name, keep_tied);
    }
    check<TargetError>(unmatched.size() < keys.size(), "modules_to_save {} matched no module; modules: {}",
                       join_names(keys), join_names(all));
    if (!unmatched.empty())
      warn("modules_to_save {} matched no module and is ignored (the others train)", join_names(unmatched));
  }

  /// Installs the rewritten graph as the adapted model's forward.
  void finish() { replace_method(model_, "forward", graph_); }

  /// "transformer.h.0.attn" -> "transformer__h__0__attn" (attribute names cannot contain dots).
  static std::string layer_key(const std::string& target) {
    std::string key;
    for (char c : target) key += c == '.' ? std::string("__") : std::string(1, c);
    return key;
  }

  /// The inverse of layer_key.
  static std::string layer_target(const std::string& key) {
    std::string target;
    for (size_t i = 0; i < key.size(); ++i) {
      if (key.compare(i, 2, "__") == 0) {
        target += '.';
        ++i;
      } else {
        target += key[i];
      }
    }
    return target;
  }

 private:
  /// The device a node fixes: a Device or tensor constant, or `torch.device("...")`
  /// of a constant string.
  static std::optional<c10::Device> constant_device(Node* n) {
    if (n->kind() == c10::prim::Constant && n->output()->type()->kind() == c10::TypeKind::DeviceObjType)
      return toIValue(n->output())->toDevice();
    // A tensor built on a fixed device can arrive folded into a constant (0-dim
    // CPU tensors mix with any device, as PyTorch allows).
    if (n->kind() == c10::prim::Constant && n->output()->type()->cast<c10::TensorType>()) {
      const torch::Tensor t = toIValue(n->output())->toTensor();
      if (t.dim() > 0) return t.device();
    }
    if (n->kind() != c10::aten::device || n->inputs().size() != 1) return std::nullopt;
    auto name = toIValue(n->input(0));
    if (!name || !name->isString()) return std::nullopt;
    return c10::Device(name->toStringRef());
  }

  static bool calls_into(Node* call, const char* container) {
    if (call->kind() != c10::prim::CallMethod) return false;
    auto path = module_path(call->input(0));
    return path && path->rfind(std::string(container) + ".", 0) == 0;
  }

  /// Traced exports bake the tracing device into constants (e.g. masks made with
  /// device="cpu"); say so when the weights now live elsewhere.
  void warn_about_baked_devices() const {
    const c10::Device weights = (*model_.parameters().begin()).device();
    auto scratch = inlined_copy(*graph_, nullptr, is_peft_call);
    std::set<std::string> baked;
    for_each_node(scratch->block(), [&](Node* n) {
      if (auto d = constant_device(n); d && *d != weights) baked.insert(d->str());
    });
    if (!baked.empty())
      warn("forward hard-codes device {} but the weights are on {}; trace the model on the device it will run on",
           join_names({baked.begin(), baked.end()}), weights.str());
  }

  std::string adapter_name_;
  bool from_file_ = false;
  torch::jit::Module model_, container_, adapters_;
  std::shared_ptr<Graph> graph_;
  std::vector<AdapterLayer> layers_;
  std::vector<TrainableCopy> copies_;
  Value* none_ = nullptr;
};

/// Sets a bool flag (`active`, `merged`) on an adapter layer; read at run time,
/// so it takes effect on the next forward without recompiling.
inline void set_flag(const AdapterLayer& layer, const std::string& flag, bool value) {
  torch::jit::Module module = layer.module;  // a handle: setattr is non-const
  module.setattr(flag, value);
}

/// The base tensor `attribute` of the module at `path` in `root`.
inline torch::Tensor base_tensor(const torch::jit::Module& root, const std::string& path, const std::string& attribute) {
  return submodule(root, path).attr(attribute).toTensor();
}

/// The base tensor `path.attribute` that `method` is about to change in place;
/// ModelError when another module shares its storage (tied weights), which the
/// change would silently alter too.
inline torch::Tensor writable_base_tensor(const torch::jit::Module& root, const std::string& path,
                                          const std::string& attribute, const std::string& method) {
  torch::Tensor t = base_tensor(root, path, attribute);
  std::vector<std::string> tied;
  for (const auto& [m, a] : Injection::tied_slots(root, t, {path, attribute})) tied.push_back(m + "." + a);
  check<ModelError>(tied.empty(),
                    "{}: merging into '{}.{}' would also change {}, which shares its storage (tied weights); keep "
                    "the adapter unmerged, or export the model with the weights untied",
                    method, path, attribute, join_names(tied));
  return t;
}

/// Methods that rewrite a model implement this; PeftModel drives it.
/// How cached generation (forward_cached) can run while an adapter is active.
enum class CacheSupport {
  None,    ///< forward re-runs on the whole sequence
  Merge,   ///< merged into the base weights for the call
  Prefix,  ///< its prefixes become the initial past keys and values
};

/// An entry for tensor attribute `attr` of `layer`, under HF's key
/// `base_model.model.<target>.<suffix>`.
inline io::StateEntry attr_entry(const AdapterLayer& layer, const std::string& suffix, const std::string& attr) {
  return io::plain_entry(io::kKeyPrefix + layer.target + "." + suffix, layer.module.attr(attr).toTensor());
}

/// One adapter's method on a TorchScript model (made by Method<Config>::jit_tuner).
class Tuner {
 public:
  virtual ~Tuner() = default;
  /// The adapter's tensors under HF peft's keys and layouts (modules_to_save
  /// copies are added by the caller), for files.
  virtual std::vector<io::StateEntry> state(const std::vector<AdapterLayer>& layers) const = 0;
  /// Adds to the config's JSON what the config does not say but the file needs
  /// (sizes read off the model).
  virtual void describe(nlohmann::json& /*config*/, const std::vector<AdapterLayer>& /*layers*/) const {}
  /// See CacheSupport.
  virtual CacheSupport cache_support() const { return CacheSupport::None; }
  /// "LoRA", "IA3", ... for messages.
  virtual std::string method() const = 0;
  /// Whether merge() can fold the adapter into the base weights.
  virtual bool mergeable() const { return false; }
  virtual void merge() {
    throw ModelError(method() + " inserts computation that cannot be folded into the base weights; it cannot be merged");
  }
  virtual void unmerge() {}
  /// safe_merge: throws ModelError if merging now would put non-finite values
  /// into a base weight; changes nothing.
  virtual void check_merge_is_finite() {}
  /// Folds a training-time reparametrisation into plain tensors (prefix tuning's MLP).
  virtual void fold_projection() {}
};

}  // namespace jit
}  // namespace peft
