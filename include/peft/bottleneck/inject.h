#pragma once
/// @file
/// Bottleneck adapters inserted into a loaded TorchScript model after chosen
/// submodules (e.g. each block's attention and MLP): their output h becomes
/// h + W_up σ(W_down h), computed by a small TorchScript module.

#include <peft/bottleneck/bottleneck.h>
#include <peft/core/match.h>
#include <peft/jit/inject.h>

#include <set>

namespace peft {

/// Bottleneck adapters for a whole model (a method HF peft lacks; its files
/// use peft_type "BOTTLENECK_ADAPTER").
///
/// ```
/// auto cfg = peft::BottleneckConfig().target_modules(".*\\.(attn|mlp)").bottleneck_size(16);
/// ```
struct BottleneckConfig {
  /// Submodules after which an adapter is inserted (names, regex).
  TORCH_ARG(TargetModules, target_modules);
  /// Submodules never targeted, even when target_modules matches them.
  TORCH_ARG(TargetModules, exclude_modules);
  /// Only layers with these indices (empty: all).
  TORCH_ARG(std::vector<int64_t>, layers_to_transform) = {};
  /// Name of the layer list whose index layers_to_transform means (e.g. "layers").
  TORCH_ARG(std::vector<std::string>, layers_pattern) = {};
  /// Bottleneck width; 0: hidden_size / reduction_factor.
  TORCH_ARG(int64_t, bottleneck_size) = 0;
  /// hidden_size / reduction_factor is the bottleneck when bottleneck_size is 0.
  TORCH_ARG(int64_t, reduction_factor) = 16;
  /// Nonlinearity of every adapter.
  TORCH_ARG(BottleneckActivation, activation) = BottleneckActivation::ReLU;
  /// Initialisation of every adapter (Identity: the base model at step 0).
  TORCH_ARG(BottleneckInit, init) = BottleneckInit::Identity;
  /// Width of the submodule outputs; 0: read from the last linear layer feeding them.
  TORCH_ARG(int64_t, hidden_size) = 0;
  /// Base submodules (e.g. a classifier head) that train fully, as copies.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};

 public:  // TORCH_ARG leaves the section private
  /// The target selection these options describe.
  TargetRule rule() const { return {target_modules_, exclude_modules_, layers_to_transform_, layers_pattern_}; }
};

namespace bottleneck {

/// TorchScript source of one adapter layer (functional::adapter).
inline std::string layer_source(BottleneckActivation activation) {
  const char* act = activation == BottleneckActivation::ReLU   ? "torch.relu(z)"
                    : activation == BottleneckActivation::GELU ? "torch.gelu(z)"
                    : activation == BottleneckActivation::Tanh ? "torch.tanh(z)"
                                                            : "z * torch.sigmoid(z)";
  return std::string("def forward(self, h: Tensor) -> Tensor:\n"
                     "    if not self.active:\n"
                     "        return h\n"
                     "    z = torch.linear(h, self.adapter_down_weight, self.adapter_down_bias)\n"
                     "    z = ") +
         act +
         "\n"
         "    z = torch.linear(z, self.adapter_up_weight, self.adapter_up_bias)\n"
         "    if self.use_sample_mask:\n"
         "        z = z * self.mask_like(z)\n"
         "    return h + z\n";
}

/// Output width of the value `v` when it comes (through shape-keeping ops such
/// as residual adds, dropout and norms) from a linear layer; 0 if unknown.
inline int64_t width_from_linear(jit::Value* v, const torch::jit::Module& root, int depth = 0) {
  using namespace c10;
  if (depth > 32) return 0;
  jit::Node* n = v->node();
  const auto kind = n->kind();
  if (kind == aten::linear || kind == aten::matmul || kind == aten::addmm) {
    auto attr = jit::attribute_of(n->input(kind == aten::addmm ? 2 : 1));
    if (!attr || attr->second != "weight") return 0;
    torch::Tensor W = jit::base_tensor(root, attr->first, "weight");
    return kind == aten::linear ? W.size(0) : W.size(1);
  }
  static const std::set<Symbol> keeps_shape{aten::add, aten::sub, aten::mul, aten::dropout, aten::layer_norm,
                                            aten::gelu, aten::relu, aten::tanh, aten::silu, aten::contiguous};
  if (!keeps_shape.count(kind)) return 0;
  for (jit::Value* input : n->inputs())
    if (input->type()->cast<TensorType>())
      if (int64_t w = width_from_linear(input, root, depth + 1)) return w;
  return 0;
}

/// Bottleneck adapters after the targeted submodules of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const BottleneckConfig& config) : model_(injection.model()) {
    std::vector<std::string> names, called;
    for (const auto& m : jit::Injection::base_modules(model_)) names.push_back(m.name);
    collect_calls(injection, called);
    // Submodules an earlier bottleneck adapter follows: their boundary is that adapter's call.
    std::map<std::string, jit::Node*> earlier = earlier_adapter_calls(injection);
    for (const auto& entry : earlier) called.push_back(entry.first);
    check<ModelError>(!called.empty(),
                      "BottleneckConfig: the model's forward calls no submodules (QLoRA's quantize_base inlines it), and "
                      "a bottleneck adapter goes after a submodule call; add bottleneck adapters to a model without "
                      "quantize_base");
    auto targets = select_targets(names, called, injection.rule(config.rule()), "BottleneckConfig", "submodule called in forward");
    std::set<std::string> wanted(targets.begin(), targets.end());
    for (const auto& [path, call] : earlier)
      if (wanted.erase(path)) insert(injection, config, path, call);
    injection.inline_all([&](jit::Node* call, const std::string& path) {
      if (!wanted.count(path)) return;
      check<ModelError>(call->outputs().size() == 1 && call->output()->type()->cast<c10::TensorType>(),
                        "BottleneckConfig: '{}' does not return a single tensor; adapters go after modules that do", path);
      insert(injection, config, path, call);
    });
    for (const auto& l : injection.layers()) size_layer(l, config);
    injection.train_modules_to_save(config.modules_to_save());
  }

  std::string method() const override { return "Bottleneck"; }

  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    std::vector<io::StateEntry> out;
    for (const auto& l : layers)
      for (const char* part : {"down", "up"})
        for (const char* p : {"weight", "bias"})
          out.push_back(jit::attr_entry(l, fmt::format("adapter_{}.{}", part, p), fmt::format("adapter_{}_{}", part, p)));
    return out;
  }

  /// The sizes the file states: hidden_size and bottleneck_size as built.
  void describe(nlohmann::json& config, const std::vector<jit::AdapterLayer>& layers) const override {
    const torch::Tensor down = layers.front().module.attr("adapter_down_weight").toTensor();
    config["hidden_size"] = down.size(1);
    config["bottleneck_size"] = down.size(0);
  }

 private:
  /// The submodules forward calls, found on a scratch copy of the graph.
  void collect_calls(jit::Injection& injection, std::vector<std::string>& called) {
    jit::inlined_copy(
        injection.graph(), [&](jit::Node*, const std::string& path) { called.push_back(path); },
        jit::Injection::is_peft_call);
  }

  /// Calls of earlier bottleneck adapters' layers, by the submodule they follow
  /// (the graph of a model that already has adapters is fully inlined).
  static std::map<std::string, jit::Node*> earlier_adapter_calls(jit::Injection& injection) {
    std::map<std::string, jit::Node*> out;
    jit::for_each_node(injection.graph().block(), [&](jit::Node* n) {
      if (!jit::Injection::is_adapter_call(n)) return;
      const auto& type = n->input(0)->type()->expect<c10::ClassType>()->name();
      if (!type || type->name() != "BottleneckAdapter") return;
      const std::string key = n->input(0)->node()->s(c10::attr::name);
      out[jit::Injection::layer_target(key)] = n;  // the last call per target wins: adapters stack
    });
    return out;
  }

  /// Adds the layer (sized later) and routes the call's output through it.
  void insert(jit::Injection& injection, const BottleneckConfig& config, const std::string& path, jit::Node* call) {
    const auto placeholder = torch::empty({0});
    injection.add_layer(path, "BottleneckAdapter",
                        {{"adapter_down_weight", placeholder}, {"adapter_down_bias", placeholder.clone()},
                         {"adapter_up_weight", placeholder.clone()}, {"adapter_up_bias", placeholder.clone()}},
                        {}, layer_source(config.activation()));
    jit::Value* out = call->output();
    jit::Value* adapted = injection.call(injection.layers().back(), call, {out}, /*after=*/true);
    jit::reroute_uses(out, adapted->node(), adapted);
    call_nodes_.emplace_back(adapted->node(), path);
  }

  /// Creates the layer's parameters once the hidden width is known.
  void size_layer(const jit::AdapterLayer& layer, const BottleneckConfig& config) {
    const int64_t hidden = config.hidden_size() > 0 ? config.hidden_size() : inferred_width(layer);
    check<ModelError>(hidden > 0,
                      "BottleneckConfig: cannot tell the output width of '{}' (it does not end in a linear layer); set "
                      "BottleneckConfig.hidden_size",
                      layer.target);
    const torch::TensorOptions like = (*model_.parameters().begin()).options();
    Bottleneck native(BottleneckOptions(hidden)
                       .bottleneck(config.bottleneck_size())
                       .reduction_factor(config.reduction_factor())
                       .activation(config.activation())
                       .init(config.init()));
    native->to(like.device(), like.dtype().toScalarType());
    torch::jit::Module module = layer.module;  // a handle: setattr is non-const
    module.setattr("adapter_down_weight", native->adapter_down->weight.detach().requires_grad_(true));
    module.setattr("adapter_down_bias", native->adapter_down->bias.detach().requires_grad_(true));
    module.setattr("adapter_up_weight", native->adapter_up->weight.detach().requires_grad_(true));
    module.setattr("adapter_up_bias", native->adapter_up->bias.detach().requires_grad_(true));
  }

  /// The width of the adapter's input, traced back through the inlined graph.
  int64_t inferred_width(const jit::AdapterLayer& layer) {
    for (const auto& [node, target] : call_nodes_)
      if (target == layer.target) return width_from_linear(node->input(1), model_);
    return 0;
  }

  torch::jit::Module model_;
  /// Each adapter call and the submodule it follows; input(1) is that submodule's output.
  std::vector<std::pair<jit::Node*, std::string>> call_nodes_;
};

}  // namespace bottleneck
}  // namespace peft
