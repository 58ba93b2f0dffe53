#pragma once
/// @file
/// The method-agnostic part of adding an adapter to a torch::nn model (the
/// native backend): finding the targeted peft::nn layers with HF's rules,
/// filling their adapter slots, and training base tensors in place
/// (modules_to_save, biases) with their original values kept aside.

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/io/adapter_files.h>
#include <peft/nn/embedding.h>
#include <peft/nn/linear.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace peft {
namespace nn {

/// One attached adapter: its host's path, the host, and the adapter module in its slot.
struct AttachedAdapter {
  std::string target;                         ///< dotted path of the host (adapted layer or site)
  AdapterHost* layer;                         ///< the host (owned by the model)
  std::shared_ptr<torch::nn::Module> module;  ///< the adapter in its slot
};

/// A base tensor an adapter trains in place (modules_to_save, BitFit, biases):
/// `param` is the model's own tensor; it holds `trained`'s storage while the
/// adapter is active and `original`'s (a copy taken at injection) otherwise.
struct TrainedTensor {
  std::string module;     ///< dotted path of the owning module
  std::string attribute;  ///< e.g. "bias"
  torch::Tensor param;     ///< the model's own tensor
  torch::Tensor original;  ///< its values at injection
  torch::Tensor trained;   ///< the trained values (param's storage while active)
};

/// The model's modules by dotted path (root "" included).
inline std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> modules_of(torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> out;
  for (const auto& m : model.named_modules("", /*include_self=*/false)) out.emplace_back(m.key(), m.value());
  return out;
}

/// The device and dtype of `module`'s first parameter (CPU fp32 without one): where its adapters go.
inline torch::TensorOptions options_of(torch::nn::Module& module) {
  for (const auto& p : module.parameters())
    if (p.defined() && p.is_floating_point()) return p.options();
  return torch::TensorOptions();
}

/// Whether `path` names an output head by HF's convention (`lm_head`), which "all-linear" leaves out.
inline bool is_output_head_name(const std::string& path) {
  const auto dot = path.rfind('.');
  return (dot == std::string::npos ? path : path.substr(dot + 1)) == "lm_head";
}

/// Builds one adapter on a torch::nn model.
class Injection {
 public:
  /// Adds adapter `adapter_name` to `model`; `from_file`: its config was read from a file.
  Injection(torch::nn::Module& model, std::string adapter_name, bool from_file)
      : model_(model), name_(std::move(adapter_name)), from_file_(from_file) {}

  /// The adapter's name.
  const std::string& adapter_name() const { return name_; }
  /// `rule` as this adapter applies it (lenient for a config read from a file).
  TargetRule rule(TargetRule rule) const {
    rule.from_file = from_file_;
    return rule;
  }
  /// Whether the config was read from a file.
  bool from_file() const { return from_file_; }

  /// The peft::nn linear layers `rule` targets, by path ("all-linear": all but an
  /// `lm_head`). A targeted plain torch::nn::Linear is replaced by a
  /// peft::nn::Linear sharing its tensors when nothing but its parent holds it;
  /// ModelError naming the module when something still does (a typed member
  /// would keep running the old layer).
  std::vector<std::pair<std::string, AdaptedLayer*>> linear_targets(const TargetRule& rule, const std::string& method) {
    std::vector<std::pair<std::string, AdaptedLayer*>> out;
    for (const auto& [path, host] : layer_targets(rule, method, /*embeddings=*/false))
      out.emplace_back(path, dynamic_cast<AdaptedLayer*>(host));
    return out;
  }

  /// linear_targets() with peft::nn::Embedding layers (and plain torch::nn::Embedding,
  /// replaced by the same rule) eligible too, as for HF's LoRA; "all-linear" selects linear layers only.
  std::vector<std::pair<std::string, AdapterHost*>> layer_targets(const TargetRule& rule, const std::string& method,
                                                                  bool embeddings) {
    std::vector<std::string> names, eligible;
    const bool all_linear = rule.target_modules.is_all_linear();
    for (const auto& [path, m] : modules_of(model_)) {
      names.push_back(path);
      const bool linear = dynamic_cast<AdaptedLayer*>(m.get()) || dynamic_cast<torch::nn::LinearImpl*>(m.get());
      const bool embedding = dynamic_cast<EmbeddingImpl*>(m.get()) || dynamic_cast<torch::nn::EmbeddingImpl*>(m.get());
      if (linear ? !(all_linear && is_output_head_name(path)) : embeddings && embedding && !all_linear)
        eligible.push_back(path);
    }
    std::vector<std::pair<std::string, AdapterHost*>> out;
    for (const auto& target : select_targets(names, eligible, rule, method, embeddings ? "linear or embedding layer" : "linear layer")) {
      auto module = submodule(target);
      auto* host = dynamic_cast<AdapterHost*>(module.get());
      if (!host) {
        auto plain_linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module);
        auto plain_embedding = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(module);
        module.reset();  // so that the plain layer's count says who else holds it
        host = plain_linear ? replace_plain(target, std::move(plain_linear), "Linear")
                            : replace_plain(target, std::move(plain_embedding), "Embedding");
      }
      out.emplace_back(target, host);
    }
    return out;
  }

  /// Puts `adapter` (a Cloneable module implementing the host's adapter interface) into `layer`'s slot.
  void attach(const std::string& target, AdapterHost* layer, std::shared_ptr<torch::nn::Module> adapter) {
    layer->slots().add(dynamic_cast<torch::nn::Module&>(*layer), name_, adapter, "'" + target + "'");
    layers_.push_back({target, layer, std::move(adapter)});
  }

  /// Trains the base tensor `module.attribute` in place, keeping its original values aside.
  void train_tensor(const std::string& module, const std::string& attribute) {
    for (const auto& t : trained_)
      if (t.module == module && t.attribute == attribute) return;
    torch::Tensor param = submodule(module)->named_parameters(/*recurse=*/false)[attribute];
    check<OptionError>(param.defined(), "'{}.{}' is undefined and cannot train", module, attribute);
    check_not_shared(module, attribute, param);
    trained_.push_back({module, attribute, param, param.detach().clone(), param.detach()});
    param.set_requires_grad(true);
  }

  /// HF's modules_to_save: every parameter of each module whose name is a key or
  /// ends with "." + key trains; TargetError when no key matches anything (only a
  /// warning for the keys that match nothing while another one matches).
  void train_modules_to_save(const std::vector<std::string>& keys) {
    if (keys.empty()) return;
    std::vector<std::string> all, unmatched;
    for (const auto& [path, m] : modules_of(model_)) all.push_back(path);
    for (const auto& key : keys) {
      bool matched = false;
      for (const auto& path : all)
        if (TargetModules::matches_key(path, key)) {
          matched = true;
          for (const auto& p : submodule(path)->named_parameters(/*recurse=*/true)) {
            const auto dot = p.key().rfind('.');
            train_tensor(dot == std::string::npos ? path : path + "." + p.key().substr(0, dot),
                         dot == std::string::npos ? p.key() : p.key().substr(dot + 1));
          }
        }
      if (!matched) unmatched.push_back(key);
    }
    check<TargetError>(unmatched.size() < keys.size(), "modules_to_save {} matched no module; modules: {}",
                       join_names(keys), join_names(all));
    if (!unmatched.empty())
      warn("modules_to_save {} matched no module and is ignored (the others train)", join_names(unmatched));
  }

  /// HF's `bias` field: the bias of every module ("all") or of the adapted layers only.
  void train_biases(bool only_adapted) {
    for (const auto& entry : modules_of(model_)) {
      const std::string& path = entry.first;
      const auto& m = entry.second;
      const bool adapted =
          std::any_of(layers_.begin(), layers_.end(), [&](const AttachedAdapter& l) { return l.target == path; });
      if (only_adapted && !adapted) continue;
      const auto params = m->named_parameters(/*recurse=*/false);
      if (params.contains("bias") && params["bias"].defined()) train_tensor(path, "bias");
    }
  }

  /// The modules of type `Host` (a site of peft/nn/sites.h) among those `rule`
  /// selects, by path: TargetError when the rule matches none of them.
  template <typename Host>
  std::vector<std::pair<std::string, Host*>> host_targets(const TargetRule& rule, const std::string& method,
                                                          const std::string& kind) {
    std::vector<std::string> names, hosts;
    for (const auto& [path, m] : modules_of(model_)) {
      names.push_back(path);
      if (dynamic_cast<Host*>(m.get())) hosts.push_back(path);
    }
    std::vector<std::pair<std::string, Host*>> out;
    for (const auto& target : select_targets(names, hosts, rule, method, kind))
      out.emplace_back(target, dynamic_cast<Host*>(submodule(target).get()));
    return out;
  }

  /// Every module of type `Host` in the model (the root's path is ""), in module order.
  template <typename Host>
  std::vector<std::pair<std::string, Host*>> all_hosts() const {
    std::vector<std::pair<std::string, Host*>> out;
    for (const auto& m : model_.named_modules("", /*include_self=*/true))
      if (auto* host = dynamic_cast<Host*>(m.value().get())) out.emplace_back(m.key(), host);
    return out;
  }

  /// The model adapters are added to.
  torch::nn::Module& model() const { return model_; }

  /// The adapter layers attached so far.
  const std::vector<AttachedAdapter>& layers() const { return layers_; }
  /// The base tensors trained in place.
  const std::vector<TrainedTensor>& trained() const { return trained_; }

  /// The module at dotted `path` (TargetError when there is none).
  std::shared_ptr<torch::nn::Module> submodule(const std::string& path) const {
    for (const auto& [p, m] : modules_of(model_))
      if (p == path) return m;
    throw TargetError("the model has no module '" + path + "'");
  }

 private:
  /// A parameter shared with another module (tied weights) would train in both places.
  void check_not_shared(const std::string& module, const std::string& attribute, const torch::Tensor& param) const {
    for (const auto& [path, m] : modules_of(model_))
      for (const auto& p : m->named_parameters(/*recurse=*/false))
        check<OptionError>(p.value().unsafeGetTensorImpl() != param.unsafeGetTensorImpl() ||
                               (path == module && p.key() == attribute),
                           "'{}.{}' is the same tensor as '{}.{}' (tied weights): training it in place would train "
                           "both; untie them, or keep '{}' out of modules_to_save",
                           module, attribute, path, p.key(), module);
  }

  /// `plain` (torch::nn::Linear or Embedding) swapped for the peft::nn layer with
  /// the same options and tensors, when its parent is its only holder.
  template <typename Plain>
  AdapterHost* replace_plain(const std::string& path, std::shared_ptr<Plain> plain, const char* type) {
    const auto dot = path.rfind('.');
    auto parent = dot == std::string::npos ? std::shared_ptr<torch::nn::Module>() : submodule(path.substr(0, dot));
    torch::nn::Module& owner = parent ? *parent : model_;
    const std::string child = dot == std::string::npos ? path : path.substr(dot + 1);
    using Ours = std::conditional_t<std::is_same<Plain, torch::nn::LinearImpl>::value, LinearImpl, EmbeddingImpl>;
    auto adapted = std::make_shared<Ours>(plain->options);
    const auto theirs = plain->named_parameters(/*recurse=*/false);
    for (auto& p : adapted->named_parameters(/*recurse=*/false)) {  // the same storage: nothing copied
      const torch::Tensor* t = theirs.find(p.key());
      if (!t) continue;
      p.value().set_data(*t);
      p.value().set_requires_grad(t->requires_grad());
    }
    owner.replace_module(child, adapted);
    if (plain.use_count() > 1) {  // a typed member or a container (Sequential, ModuleList) still runs it
      owner.replace_module(child, plain);
      throw ModelError(fmt::format(
          "'{}' is a torch::nn::{} that the model still holds (a typed member, or a Sequential / ModuleList), so "
          "an adapter put in its place would never run; declare it as peft::nn::{} (same options, parameters "
          "and state dict) and get_peft_model fills its adapter slot",
          path, type, type));
    }
    return adapted.get();
  }

  torch::nn::Module& model_;
  std::string name_;
  bool from_file_;
  std::vector<AttachedAdapter> layers_;
  std::vector<TrainedTensor> trained_;
};

/// One adapter's method on a torch::nn model (made by Method<Config>::native_tuner).
/// The default: adapters in layer slots, merged and listed through them.
class Tuner {
 public:
  Tuner(std::string method, const Injection& injection) : method_(std::move(method)), layers_(injection.layers()) {}
  virtual ~Tuner() = default;

  /// "LoRA", "IA3", ... for messages.
  const std::string& method() const { return method_; }
  /// The adapter layers.
  const std::vector<AttachedAdapter>& layers() const { return layers_; }
  /// The adapter's tensors under HF peft's keys (trained base tensors are added by the caller).
  virtual std::vector<io::StateEntry> state() const {
    std::vector<io::StateEntry> out;
    for (const auto& l : layers_)
      for (auto& e : adapter(l).state(io::kKeyPrefix + l.target + ".")) out.push_back(std::move(e));
    return out;
  }
  /// Adds to the config's JSON what the config does not say (sizes read off the model).
  virtual void describe(nlohmann::json& /*config*/) const {}

  /// Whether merge_adapter() can fold this method into the base weights (not so
  /// for adapters that sit beside the weights: bottleneck, prompt, prefix).
  virtual bool mergeable() const { return true; }

  /// The adapter in `l`'s slot.
  static SlotAdapter& adapter(const AttachedAdapter& l) { return *dynamic_cast<SlotAdapter*>(l.module.get()); }

 private:
  std::string method_;
  std::vector<AttachedAdapter> layers_;
};

}  // namespace nn
}  // namespace peft
