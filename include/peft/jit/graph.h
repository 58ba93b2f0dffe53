#pragma once
/// @file
/// The only place that touches TorchScript internals (torch/csrc/jit): module
/// paths from GetAttr chains, inlining with a hook at submodule boundaries,
/// adapter calls inserted into a graph, and method replacement. LibTorch 2.x
/// keeps these APIs; a change there belongs in this file only.

#include <ATen/core/grad_mode.h>
#include <peft/core/error.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

namespace peft {
namespace jit {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

/// Calls `fn` on every node of `block` and of its nested blocks, in order.
inline void for_each_node(torch::jit::Block* block, const std::function<void(Node*)>& fn) {
  for (Node* node : block->nodes()) {
    fn(node);
    for (torch::jit::Block* inner : node->blocks()) for_each_node(inner, fn);
  }
}

/// The dotted path of the module `value` refers to, when it is reached from
/// the graph's `self` through prim::GetAttr ("" is the root itself).
inline std::optional<std::string> module_path(Value* value) {
  Value* self = value->owningGraph()->inputs().at(0);
  if (value == self) return std::string();
  Node* node = value->node();
  if (node->kind() != c10::prim::GetAttr) return std::nullopt;
  auto parent = module_path(node->input(0));
  if (!parent) return std::nullopt;
  const std::string& field = node->s(c10::attr::name);
  return parent->empty() ? field : *parent + "." + field;
}

/// For a parameter read `self.<path>.<name>`: {module path, attribute name}.
inline std::optional<std::pair<std::string, std::string>> attribute_of(Value* value) {
  Node* node = value->node();
  if (node->kind() != c10::prim::GetAttr) return std::nullopt;
  auto owner = module_path(node->input(0));
  if (!owner) return std::nullopt;
  return std::make_pair(*owner, node->s(c10::attr::name));
}

/// Called on a submodule call before it is inlined: (call node, callee path).
using CallHook = std::function<void(Node* call, const std::string& callee_path)>;

/// Inlines every function and method call of `graph`, outermost first, so that
/// each prim::CallMethod is seen by `on_call` while the module boundary is still
/// visible. Calls for which `keep` is true (adapter calls) are left as calls.
inline void inline_calls(Graph& graph, const CallHook& on_call, const std::function<bool(Node*)>& keep = nullptr) {
  for (bool changed = true; changed;) {
    changed = false;
    std::vector<Node*> calls;
    for_each_node(graph.block(), [&](Node* n) {
      if ((n->kind() == c10::prim::CallMethod || n->kind() == c10::prim::CallFunction) && !(keep && keep(n)))
        calls.push_back(n);
    });
    for (Node* call : calls) {
      torch::jit::GraphFunction* callee = torch::jit::tryToGraphFunction(call);
      check<ModelError>(callee != nullptr, "a call in forward cannot be inlined (interface or non-graph function: {})",
                        call->kind().toQualString());
      if (call->kind() == c10::prim::CallMethod && on_call) {
        if (auto path = module_path(call->input(0))) on_call(call, *path);
      }
      if (call->kind() == c10::prim::CallFunction) call->removeInput(0);  // the function constant
      torch::jit::inlineCallTo(call, callee, /*use_graph=*/false);  // the raw graph keeps deeper calls visible
      changed = true;
    }
  }
}

/// Folds what the raw graphs of inlined library code leave behind (e.g.
/// `if inplace:` branches of F.dropout on constants), as the executor would.
inline void simplify(std::shared_ptr<Graph> graph) {
  torch::jit::ConstantPropagation(graph);
  torch::jit::EliminateDeadCode(graph);
}

/// A fully inlined and simplified copy of `graph`, for analysis; `on_call`
/// sees each submodule call first.
inline std::shared_ptr<Graph> inlined_copy(Graph& graph, const CallHook& on_call = nullptr,
                                           const std::function<bool(Node*)>& keep = nullptr) {
  std::shared_ptr<Graph> copy = graph.copy();
  inline_calls(*copy, on_call, keep);
  simplify(copy);
  return copy;
}

/// Inserts `self.<path...>` GetAttr reads before `anchor` and a call of method
/// `method` on that module with `args`, returning the call node (output typed as the method returns).
inline Node* insert_method_call(Node* anchor, const std::vector<std::string>& path, const torch::jit::Module& callee,
                                const std::string& method, const std::vector<Value*>& args, bool insert_after) {
  Graph& graph = *anchor->owningGraph();
  torch::jit::WithInsertPoint guard(insert_after ? anchor->next() : anchor);
  Value* object = graph.inputs().at(0);
  for (const auto& field : path) object = graph.insertGetAttr(object, field);
  object->setType(callee.type());
  std::vector<Value*> inputs{object};
  inputs.insert(inputs.end(), args.begin(), args.end());
  Node* call = graph.insertNode(graph.create(c10::prim::CallMethod, inputs));
  call->s_(c10::attr::name, method);
  auto callee_method = callee.find_method(method);  // methods returning Optional[Tensor] or bool exist too
  call->output()->setType(callee_method ? callee_method->function().getSchema().returns().at(0).type()
                                        : c10::TensorType::get());
  return call;
}

/// Inserts `value.to(dtype)` before `anchor`; returns the converted value.
inline Value* insert_cast(Node* anchor, Value* value, c10::ScalarType dtype) {
  Graph& graph = *anchor->owningGraph();
  torch::jit::WithInsertPoint guard(anchor);
  return graph.insert(c10::aten::to, {value, static_cast<int64_t>(dtype)});
}

/// Makes `replacement` the value every user of `original` sees, except `call` itself.
inline void reroute_uses(Value* original, Node* call, Value* replacement) {
  original->replaceAllUsesWith(replacement);
  for (size_t i = 0; i < call->inputs().size(); ++i)
    if (call->input(i) == replacement) call->replaceInput(i, original);
}

/// A new, empty TorchScript module of a unique type in `owner`'s compilation
/// unit, with the `training` attribute every module has.
inline torch::jit::Module new_module(const torch::jit::Module& owner, const std::string& class_name) {
  torch::jit::Module m(c10::QualifiedName("__torch__.peft." + class_name), owner._ivalue()->compilation_unit(),
                       /*shouldMangle=*/true);
  m.register_attribute("training", c10::BoolType::get(), owner.is_training());
  return m;
}

/// A copy of the graph of `module`'s method `name` (never the cached original).
inline std::shared_ptr<Graph> method_graph(const torch::jit::Module& module, const std::string& name) {
  return torch::jit::toGraphFunction(module.get_method(name).function()).graph()->copy();
}

/// Replaces method `name` of `module` by a new function running `graph`. The
/// graph executor caches plans per function, so a fresh function (as
/// freeze_module makes) is the way to change what a method does. `module`'s
/// type must not be shared (e.g. a clone's root).
inline void replace_method(torch::jit::Module& module, const std::string& name, std::shared_ptr<Graph> graph) {
  torch::jit::EliminateDeadCode(graph);
  auto& old_fn = module.get_method(name).function();
  const c10::QualifiedName qualname = old_fn.qualname();
  c10::FunctionSchema schema = old_fn.getSchema();
  auto cu = module._ivalue()->compilation_unit();
  module.type()->unsafeRemoveMethod(name);
  cu->unsafeRemoveMethod(qualname);
  torch::jit::Function* fn = cu->create_function(qualname, std::move(graph));
  fn->setSchema(std::move(schema));
  module.type()->addMethod(fn);
}

/// Runs a derived form of a module's forward (e.g. one calling training-only
/// operators, or cut into recomputed pieces) outside the module, so the module's
/// save() never sees it; derived again when the module's forward or `variant` changes.
class DerivedForward {
 public:
  /// Runs forward(module, inputs...); `params` are the model's trainable tensors.
  using Runner = std::function<torch::jit::IValue(const torch::jit::Module& module, std::vector<torch::jit::IValue> inputs,
                                                  const std::vector<torch::Tensor>& params)>;
  /// The runner for `module`'s current forward, or nullptr to run forward itself.
  using Derive = std::function<Runner(const torch::jit::Module& module)>;

  /// `module`'s forward on `inputs` through the runner `derive` gives for (forward, variant).
  torch::jit::IValue run(torch::jit::Module& module, std::vector<torch::jit::IValue> inputs,
                         const std::vector<torch::Tensor>& params, int variant, const Derive& derive) {
    auto source = torch::jit::toGraphFunction(module.get_method("forward").function()).graph();
    if (source != source_ || variant != variant_) {
      source_ = std::move(source);
      variant_ = variant;
      if (runner_) retired_.push_back(std::move(runner_));  // a graph recorded with it may still run backward
      runner_ = derive(module);
    }
    if (!runner_) return module.forward(std::move(inputs));
    return runner_(module, std::move(inputs), params);
  }

  /// A runner calling `graph` (with `module`'s forward signature) as one function.
  static Runner function_runner(const torch::jit::Module& module, std::shared_ptr<Graph> graph) {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    torch::jit::Function* fn = unit->create_function(c10::QualifiedName("__torch__.peft.derived_forward"), std::move(graph));
    fn->setSchema(module.get_method("forward").function().getSchema());  // the same arguments and defaults
    return [unit, fn](const torch::jit::Module& m, std::vector<torch::jit::IValue> inputs, const std::vector<torch::Tensor>&) {
      inputs.insert(inputs.begin(), m._ivalue());
      return (*fn)(std::move(inputs));
    };
  }

 private:
  std::shared_ptr<Graph> source_;  // the forward graph the runner was derived from (held: no address reuse)
  int variant_ = -1;
  Runner runner_;
  std::vector<Runner> retired_;  // earlier runners: their pieces stay valid for pending backward passes
};

/// The attribute of `root` at dotted `path` ("" = root).
inline torch::jit::Module submodule(const torch::jit::Module& root, const std::string& path) {
  torch::jit::Module m = root;
  size_t start = 0;
  while (start < path.size()) {
    size_t dot = path.find('.', start);
    if (dot == std::string::npos) dot = path.size();
    m = m.attr(path.substr(start, dot - start)).toModule();
    start = dot + 1;
  }
  return m;
}

/// Whether `value` is a tensor constant baked into the graph (a frozen export).
inline bool is_tensor_constant(Value* value) {
  return value->node()->kind() == c10::prim::Constant && value->type()->cast<c10::TensorType>() != nullptr;
}

namespace detail {
/// -1: the program has not called set_graph_optimization(); else its choice.
inline std::atomic<int>& graph_optimization_choice() {
  static std::atomic<int> choice{-1};
  return choice;
}
}  // namespace detail

/// Turns the TorchScript graph executor's optimisations (profiling, fusion,
/// symbolic autodiff) on or off (LibTorch's setting, per thread), and makes it
/// the program's explicit choice. Without a choice, PeftModel::forward runs
/// training-mode forwards eagerly (see EagerTrainingScope): on CPU with LibTorch
/// 1.13 eager autograd is faster and leaner for training, since it skips what
/// frozen weights do not need (docs/performance.md: LoRA step 2.9 s -> 1.4 s).
inline void set_graph_optimization(bool enabled) {
  detail::graph_optimization_choice() = enabled ? 1 : 0;
  torch::jit::setGraphExecutorOptimize(enabled);
}

/// While alive, a forward that records autograd history for training
/// (`module_training` and grad mode on) runs with the graph executor's
/// optimisations off, unless the program chose with set_graph_optimization().
/// Inference keeps the optimised executor.
class EagerTrainingScope {
 public:
  explicit EagerTrainingScope(bool module_training)
      : active_(module_training && at::GradMode::is_enabled() && detail::graph_optimization_choice() < 0),
        previous_(torch::jit::getGraphExecutorOptimize()) {
    if (active_) torch::jit::setGraphExecutorOptimize(false);
  }
  ~EagerTrainingScope() {
    if (active_) torch::jit::setGraphExecutorOptimize(previous_);
  }
  EagerTrainingScope(const EagerTrainingScope&) = delete;
  EagerTrainingScope& operator=(const EagerTrainingScope&) = delete;

 private:
  bool active_, previous_;
};

}  // namespace jit
}  // namespace peft
