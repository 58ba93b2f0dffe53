#pragma once
/// @file
/// Where methods attach in an inlined forward graph: the linear layers, found
/// by the module path of their weight, in the three forms exports use.

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/jit/graph.h>
#include <peft/jit/inject.h>

#include <map>
#include <string>
#include <vector>

namespace peft {
namespace jit {

/// One application of a linear layer in the graph.
struct LinearSite {
  std::string module;          ///< dotted path of the module owning the weight
  Value* input = nullptr;      ///< x
  Value* output = nullptr;     ///< the layer's result (after the bias add)
  Value* weight = nullptr;     ///< the weight: its GetAttr read, or the dequantising call of an NF4 weight
  Value* bias = nullptr;       ///< the bias read, or nullptr
  Node* first = nullptr;       ///< the node consuming x (where input scaling goes)
  bool fan_in_fan_out = false; ///< weight stored [in, out] (x @ W + b)
  int64_t in_features = 0, out_features = 0;
};

namespace detail {

/// The `bias` read of `module` if `value` is one.
inline Value* bias_of(Value* value, const std::string& module) {
  auto attr = attribute_of(value);
  return attr && attr->first == module && attr->second == "bias" ? value : nullptr;
}

/// The module whose weight `value` is: a `weight` read, or the call that
/// dequantises an NF4 weight (`self.peft_nf4.<key>.weight()`).
inline std::optional<std::string> weight_owner(Value* value) {
  auto attr = attribute_of(value);
  if (attr) return attr->second == "weight" ? std::optional<std::string>(attr->first) : std::nullopt;
  Node* call = value->node();
  if (call->kind() != c10::prim::CallMethod || call->s(c10::attr::name) != "weight") return std::nullopt;
  auto path = module_path(call->input(0));
  const std::string prefix = std::string(Injection::kQuantContainer) + ".";
  if (!path || path->rfind(prefix, 0) != 0) return std::nullopt;
  return Injection::layer_target(path->substr(prefix.size()));
}

/// The shape of the weight of `module` (an NF4 weight keeps its shape in its module).
inline std::vector<int64_t> weight_sizes(const torch::jit::Module& root, const std::string& module) {
  if (root.hasattr(Injection::kQuantContainer)) {
    torch::jit::Module quantized = root.attr(Injection::kQuantContainer).toModule();
    const std::string key = Injection::layer_key(module);
    if (quantized.hasattr(key)) return quantized.attr(key).toModule().attr("shape").toIntVector();
  }
  return submodule(root, module).attr("weight").toTensor().sizes().vec();
}

}  // namespace detail

/// Finds every linear layer application in an inlined graph:
/// `aten::linear(x, W, b)` (nn.Linear, scripted or traced), `aten::matmul(x, W)`
/// optionally followed by `+ b` (GPT-2's Conv1D, W stored [in, out]), and
/// `aten::addmm(b, x, W)` (HF's Conv1D). Throws ModelError if a linear weight is
/// a baked-in constant: a frozen or optimised export cannot be adapted.
inline std::vector<LinearSite> find_linear_sites(Graph& graph, const torch::jit::Module& root) {
  std::vector<LinearSite> sites;
  for_each_node(graph.block(), [&](Node* n) {
    const auto kind = n->kind();
    const bool linear = kind == c10::aten::linear, matmul = kind == c10::aten::matmul, addmm = kind == c10::aten::addmm;
    if (!linear && !matmul && !addmm) return;
    Value* w = n->input(addmm ? 2 : 1);
    check<ModelError>(!(linear && is_tensor_constant(w)),
                      "the model's linear weights are constants in the graph: a frozen or optimised export "
                      "(torch.jit.freeze / optimize_for_inference) cannot be adapted; export the unfrozen module");
    auto owner = detail::weight_owner(w);
    if (!owner) return;
    LinearSite site;
    site.module = *owner;
    site.weight = w;
    site.first = n;
    site.input = n->input(addmm ? 1 : 0);
    site.output = n->output();
    const auto W = detail::weight_sizes(root, site.module);
    if (W.size() != 2) return;
    site.fan_in_fan_out = !linear;
    site.in_features = linear ? W[1] : W[0];
    site.out_features = linear ? W[0] : W[1];
    if (linear && n->input(2)->type()->kind() != c10::TypeKind::NoneType) site.bias = n->input(2);
    if (addmm) site.bias = detail::bias_of(n->input(0), site.module);
    if (matmul && n->output()->uses().size() == 1) {
      Node* add = n->output()->uses()[0].user;
      if (add->kind() == c10::aten::add && add->input(0) == n->output()) {
        if (Value* b = detail::bias_of(add->input(1), site.module)) {
          site.bias = b;
          site.output = add->output();
        }
      }
    }
    sites.push_back(site);
  });
  return sites;
}

/// Whether `value` reaches the graph's outputs directly (or inside a returned tuple).
inline bool is_graph_output(Value* value) {
  for (const auto& use : value->uses()) {
    Node* user = use.user;
    if (user == value->owningGraph()->return_node()) return true;
    if (user->kind() == c10::prim::TupleConstruct && is_graph_output(user->output())) return true;
  }
  return false;
}

/// Groups sites by module path (a layer may be applied more than once).
inline std::map<std::string, std::vector<LinearSite>> sites_by_module(const std::vector<LinearSite>& sites) {
  std::map<std::string, std::vector<LinearSite>> out;
  for (const auto& s : sites) out[s.module].push_back(s);
  return out;
}

/// "all-linear" leaves out the output head: a layer named lm_head, or one whose
/// result is the model's output.
inline bool is_output_head(const std::string& module, const std::vector<LinearSite>& uses) {
  return TargetModules::matches_key(module, "lm_head") ||
         std::any_of(uses.begin(), uses.end(), [](const LinearSite& s) { return is_graph_output(s.output); });
}

/// The linear layers of an inlined graph that `rule` selects, each with its
/// uses; TargetError (naming `method`) as select_targets() raises it.
inline std::map<std::string, std::vector<LinearSite>> select_linear_targets(Graph& graph, const torch::jit::Module& model,
                                                                            const TargetRule& rule,
                                                                            const std::string& method) {
  auto sites = sites_by_module(find_linear_sites(graph, model));
  std::vector<std::string> names, linear;
  for (const auto& m : Injection::base_modules(model)) names.push_back(m.name);
  for (const auto& [module, uses] : sites)
    if (!rule.target_modules.is_all_linear() || !is_output_head(module, uses)) linear.push_back(module);
  std::map<std::string, std::vector<LinearSite>> out;
  for (const auto& target : select_targets(names, linear, rule, method, "linear layer")) out[target] = sites.at(target);
  return out;
}

}  // namespace jit
}  // namespace peft
