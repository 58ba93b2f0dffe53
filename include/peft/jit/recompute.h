#pragma once
/// @file
/// Gradient checkpointing of a TorchScript forward (HF's gradient_checkpointing_enable
/// for a loaded model): the inlined graph is cut into pieces, one per call of a
/// stack block (a child of a ModuleList / Sequential: `h.3`, `encoder.layer.5`) and
/// the plain code between them. A block's piece runs without keeping activations;
/// backward runs it again with the random generator as it was (same dropout masks)
/// and differentiates that. The pieces are functions outside the module: save()
/// never sees them.

#include <peft/core/error.h>
#include <peft/core/rng.h>
#include <peft/jit/graph.h>

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace peft {
namespace jit {

/// The outermost stacks of `model`: modules whose children are named 0..n-1 (n >= 2).
inline std::vector<std::string> stack_paths(const torch::jit::Module& model) {
  std::vector<std::string> out;
  for (const auto& m : model.named_modules()) {
    bool inside = false;
    for (const auto& s : out) inside = inside || s.empty() || m.name.rfind(s + ".", 0) == 0;
    if (inside) continue;
    size_t i = 0;
    bool numbered = true;
    for (const auto& c : m.value.named_children()) numbered = numbered && c.name == std::to_string(i++);
    if (numbered && i >= 2) out.push_back(m.name);
  }
  return out;
}

namespace detail {

/// "stack.i" when `path` is block i of one of `stacks` or inside it; "" otherwise.
inline std::string block_of_path(const std::string& path, const std::vector<std::string>& stacks) {
  for (const auto& s : stacks) {
    const std::string prefix = s.empty() ? "" : s + ".";
    if (path.rfind(prefix, 0) != 0) continue;
    const std::string rest = path.substr(prefix.size()), index = rest.substr(0, rest.find('.'));
    if (!index.empty() && index.find_first_not_of("0123456789") == std::string::npos) return prefix + index;
  }
  return "";
}

/// The block whose modules or tensors `node` (or a node nested in it) reads; "" if none.
inline std::string block_of_node(Node* node, const std::vector<std::string>& stacks) {
  std::string found;
  auto visit = [&](Node* n) {
    if (!found.empty() || n->kind() != c10::prim::GetAttr) return;
    if (auto path = module_path(n->input(0))) found = block_of_path(*path, stacks);
  };
  visit(node);
  for (torch::jit::Block* b : node->blocks()) for_each_node(b, visit);
  return found;
}

/// One piece of the forward: a function of the values it reads from earlier pieces.
struct Piece {
  torch::jit::Function* function = nullptr;
  std::vector<Value*> inputs;   ///< the original graph's values it reads (defined before it)
  std::vector<Value*> outputs;  ///< the original graph's values later pieces (or the return) read
  bool recompute = false;       ///< a block, all of whose outputs are tensors
};

/// Runs a piece on `inputs`; its outputs in order.
inline std::vector<c10::IValue> run_piece(const Piece& piece, std::vector<c10::IValue> inputs) {
  c10::IValue out = (*piece.function)(std::move(inputs));
  if (piece.outputs.size() == 1) return {out};
  if (piece.outputs.empty()) return {};
  const auto elements = out.toTuple()->elements();
  return std::vector<c10::IValue>(elements.begin(), elements.end());
}

/// A piece run without keeping its activations: its tensor inputs and `params` (the
/// model's trainable tensors) are the function's inputs; the rest of its inputs are
/// kept as values. Backward runs the piece again with the generator state of forward.
struct RecomputedPiece : torch::autograd::Function<RecomputedPiece> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList tensors,
                                                at::TensorList params, const Piece* piece, c10::IValue values,
                                                c10::IValue slots) {
    // The generator dropout draws from: the one of the tensors' device (the block's inputs).
    const torch::Device device = tensors.empty() ? torch::Device(torch::kCPU) : tensors[0].device();
    ctx->saved_data["rng"] = peft::detail::generator_state(device);
    ctx->saved_data["device"] = device;
    ctx->saved_data["piece"] = reinterpret_cast<int64_t>(piece);
    ctx->saved_data["values"] = values;
    ctx->saved_data["slots"] = slots;
    ctx->saved_data["params"] = params.vec();
    ctx->save_for_backward(tensors.vec());
    std::vector<torch::Tensor> out;
    for (const auto& v : run_piece(*piece, assemble(tensors.vec(), values, slots))) out.push_back(v.toTensor());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const auto* piece = reinterpret_cast<const Piece*>(ctx->saved_data["piece"].toInt());
    std::vector<torch::Tensor> inputs, wrt;
    for (const auto& t : saved) {
      inputs.push_back(t.detach().requires_grad_(t.requires_grad()));
      if (t.requires_grad()) wrt.push_back(inputs.back());
    }
    const auto params = ctx->saved_data["params"].toTensorVector();
    wrt.insert(wrt.end(), params.begin(), params.end());
    std::vector<c10::IValue> outputs = rerun(ctx, *piece, assemble(inputs, ctx->saved_data["values"], ctx->saved_data["slots"]));
    std::vector<torch::Tensor> ys, gs;
    for (size_t i = 0; i < outputs.size(); ++i) {
      const torch::Tensor y = outputs[i].toTensor();
      if (y.requires_grad() && grad[i].defined()) ys.push_back(y), gs.push_back(grad[i]);
    }
    std::vector<torch::Tensor> grads(wrt.size());
    if (!ys.empty() && !wrt.empty())
      grads = torch::autograd::grad(ys, wrt, gs, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
    torch::autograd::variable_list out;
    size_t next = 0;
    for (const auto& t : saved) out.push_back(t.requires_grad() ? grads[next++] : torch::Tensor());
    out.insert(out.end(), grads.begin() + static_cast<std::ptrdiff_t>(next), grads.end());
    out.resize(out.size() + 3);  // piece, values, slots
    return out;
  }

  /// Inputs in the piece's order: tensors where `slots` says 1, `values` elsewhere.
  static std::vector<c10::IValue> assemble(const std::vector<torch::Tensor>& tensors, const c10::IValue& values,
                                           const c10::IValue& slots) {
    std::vector<c10::IValue> out;
    const auto others = values.toListRef();
    size_t t = 0, v = 0;
    for (int64_t is_tensor : slots.toIntVector()) out.push_back(is_tensor ? c10::IValue(tensors[t++]) : others[v++]);
    return out;
  }

 private:
  static std::vector<c10::IValue> rerun(torch::autograd::AutogradContext* ctx, const Piece& piece, std::vector<c10::IValue> inputs) {
    const peft::detail::ReplayedGenerator replay(ctx->saved_data["device"].toDevice(), ctx->saved_data["rng"].toTensor());
    torch::AutoGradMode enable(true);
    return run_piece(piece, std::move(inputs));
  }
};

}  // namespace detail

/// A forward graph cut into pieces at the calls of stack blocks (see the file comment).
class RecomputedForward {
 public:
  /// Cuts `graph` (an inlined forward of `model`, `schema` its signature) at the blocks of `model`'s stacks.
  RecomputedForward(const torch::jit::Module& model, std::shared_ptr<Graph> graph, c10::FunctionSchema schema)
      : graph_(std::move(graph)), schema_(std::move(schema)), unit_(std::make_shared<torch::jit::CompilationUnit>()) {
    const auto stacks = stack_paths(model);
    std::vector<Node*> nodes(graph_->nodes().begin(), graph_->nodes().end());
    for (size_t i = 0; i < nodes.size(); ++i) order_[nodes[i]] = static_cast<long>(i);
    std::vector<std::string> block(nodes.size());
    std::map<std::string, std::pair<size_t, size_t>> span;  // block -> [first, last] node index
    for (size_t i = 0; i < nodes.size(); ++i) {
      block[i] = detail::block_of_node(nodes[i], stacks);
      if (block[i].empty()) continue;
      auto it = span.find(block[i]);
      if (it == span.end()) span[block[i]] = {i, i};
      else it->second.second = i;
    }
    // Blocks whose spans overlap another's run plainly (no cut can separate them).
    std::vector<std::pair<size_t, size_t>> cuts;
    for (const auto& [name, s] : span) {
      bool overlaps = false;
      for (const auto& [other, o] : span) overlaps = overlaps || (other != name && o.first <= s.second && s.first <= o.second);
      if (!overlaps) cuts.push_back(s);
    }
    std::sort(cuts.begin(), cuts.end());
    size_t start = 0;
    for (const auto& [first, last] : cuts) {
      if (first > start) add_piece(nodes, start, first, false);
      add_piece(nodes, first, last + 1, true);
      start = last + 1;
    }
    add_piece(nodes, start, nodes.size(), false);
  }

  /// The blocks cut out (each recomputed in backward).
  size_t recomputed_blocks() const {
    return static_cast<size_t>(std::count_if(pieces_.begin(), pieces_.end(), [](const detail::Piece& p) { return p.recompute; }));
  }

  /// forward(module, inputs...) with `params` (the trainable tensors) differentiated through recomputed pieces.
  c10::IValue run(const torch::jit::Module& module, std::vector<c10::IValue> inputs, const std::vector<torch::Tensor>& params) {
    std::unordered_map<Value*, c10::IValue> env;
    const auto& args = schema_.arguments();
    check<ShapeError>(inputs.size() + 1 <= args.size(), "forward takes {} inputs, got {}", args.size() - 1, inputs.size());
    for (size_t i = 0; i < graph_->inputs().size(); ++i) {
      if (i == 0) env[graph_->inputs()[0]] = module._ivalue();
      else if (i - 1 < inputs.size()) env[graph_->inputs()[i]] = std::move(inputs[i - 1]);
      else {
        check<ShapeError>(args[i].default_value().has_value(), "forward: argument '{}' is missing", args[i].name());
        env[graph_->inputs()[i]] = *args[i].default_value();
      }
    }
    for (const auto& piece : pieces_) {
      std::vector<c10::IValue> in;
      for (Value* v : piece.inputs) in.push_back(env.at(v));
      const auto out = piece.recompute ? run_recomputed(piece, std::move(in), params) : detail::run_piece(piece, std::move(in));
      for (size_t i = 0; i < out.size(); ++i) env[piece.outputs[i]] = out[i];
    }
    return env.at(graph_->outputs().at(0));
  }

 private:
  /// A function of nodes [a, b) of the top-level block.
  void add_piece(const std::vector<Node*>& nodes, size_t a, size_t b, bool block) {
    detail::Piece piece;
    // Constants and attribute reads are not passed between pieces: a piece that uses one
    // reads it again (a parameter passed out of a recomputed piece would get its grad_fn).
    auto is_constant = [](Value* v) { return v->node()->kind() == c10::prim::Constant; };
    auto is_read = [](Value* v) { return v->node()->kind() == c10::prim::GetAttr; };
    std::function<void(Value*)> add_input = [&](Value* v) {
      if (is_constant(v) || position(v->node()) >= static_cast<long>(a)) return;
      if (is_read(v)) return add_input(v->node()->input(0));
      if (std::find(piece.inputs.begin(), piece.inputs.end(), v) == piece.inputs.end()) piece.inputs.push_back(v);
    };
    auto after = [&](Node* user) { return position(user) >= static_cast<long>(b); };  // a later piece, or the return
    for (size_t i = a; i < b; ++i) {
      for (Value* v : nodes[i]->inputs()) add_input(v);
      for (torch::jit::Block* inner : nodes[i]->blocks())
        for_each_node(inner, [&](Node* n) {
          for (Value* v : n->inputs()) add_input(v);
        });
      for (Value* o : nodes[i]->outputs())
        if (!is_constant(o) && !is_read(o) &&
            std::any_of(o->uses().begin(), o->uses().end(), [&](const torch::jit::Use& u) { return after(u.user); }))
          piece.outputs.push_back(o);
    }
    if (a == b) return;
    auto g = std::make_shared<Graph>();
    std::unordered_map<Value*, Value*> map;
    for (Value* v : piece.inputs) map[v] = g->addInput()->setType(v->type());
    for (size_t i = a; i < b; ++i) {
      std::function<Value*(Value*)> mapped = [&](Value* v) {
        auto it = map.find(v);
        if (it != map.end()) return it->second;
        check<ModelError>(is_constant(v) || is_read(v),
                          "gradient checkpointing: a value of the forward graph was not carried into its piece");
        return map[v] = g->insertNode(g->createClone(v->node(), mapped))->output();
      };
      Node* copy = g->insertNode(g->createClone(nodes[i], mapped));
      for (size_t k = 0; k < copy->outputs().size(); ++k) map[nodes[i]->output(k)] = copy->output(k);
    }
    std::vector<Value*> outs;
    for (Value* o : piece.outputs) outs.push_back(map.at(o));
    if (outs.size() == 1) g->registerOutput(outs[0]);
    else g->registerOutput(g->insertNode(g->createTuple(outs))->output());
    piece.function = unit_->create_function(c10::QualifiedName("__torch__.peft.piece" + std::to_string(pieces_.size())), g);
    // Recomputable: its outputs are tensors, and it changes nothing it reads from before it
    // (an in-place op on an input, or a module attribute), which a second run would see changed.
    bool mutates = false;
    for (size_t i = a; i < b; ++i) {
      auto check_node = [&](Node* n) {
        const std::string name = n->kind().toUnqualString();
        mutates = mutates || n->kind() == c10::prim::SetAttr ||
                  (n->kind().is_aten() && !name.empty() && name.back() == '_' && !n->inputs().empty() &&
                   position(n->input(0)->node()) < static_cast<long>(a));
      };
      check_node(nodes[i]);
      for (torch::jit::Block* inner : nodes[i]->blocks()) for_each_node(inner, check_node);
    }
    piece.recompute = block && !mutates && std::all_of(piece.outputs.begin(), piece.outputs.end(), [](Value* o) {
      return o->type()->kind() == c10::TypeKind::TensorType;
    });
    pieces_.push_back(std::move(piece));
  }

  /// Where `node` (or the top-level node it is nested in) runs: -1 for the graph's
  /// inputs, the number of top-level nodes for the return.
  long position(Node* node) const {
    if (node == graph_->param_node()) return -1;
    if (node == graph_->return_node()) return static_cast<long>(order_.size());
    while (node->owningBlock() != graph_->block()) node = node->owningBlock()->owningNode();
    return order_.at(node);
  }

  /// A recomputed piece, unless an input that is not a tensor holds one that needs a gradient (then plainly).
  std::vector<c10::IValue> run_recomputed(const detail::Piece& piece, std::vector<c10::IValue> in,
                                          const std::vector<torch::Tensor>& params) {
    std::vector<torch::Tensor> tensors;
    c10::impl::GenericList values(c10::AnyType::get());
    std::vector<int64_t> slots;
    bool tensor_inside = false;
    for (const auto& v : in) {
      const bool is_tensor = v.isTensor() && v.toTensor().defined();
      slots.push_back(is_tensor);
      if (is_tensor) tensors.push_back(v.toTensor());
      else {
        tensor_inside = tensor_inside || holds_grad_tensor(v);
        values.push_back(v);
      }
    }
    const bool any_grad = std::any_of(tensors.begin(), tensors.end(), [](const torch::Tensor& t) { return t.requires_grad(); }) ||
                          !params.empty();
    if (tensor_inside || !any_grad || !torch::GradMode::is_enabled()) return detail::run_piece(piece, std::move(in));
    auto out = detail::RecomputedPiece::apply(at::TensorList(tensors), at::TensorList(params), &piece, c10::IValue(values),
                                              c10::IValue(slots));
    return std::vector<c10::IValue>(out.begin(), out.end());
  }

  static bool holds_grad_tensor(const c10::IValue& v) {
    if (v.isTensor()) return v.toTensor().defined() && v.toTensor().requires_grad();
    if (v.isTuple())
      for (const auto& e : v.toTupleRef().elements())
        if (holds_grad_tensor(e)) return true;
    if (v.isList())
      for (const auto& e : v.toListRef())
        if (holds_grad_tensor(e)) return true;
    return false;
  }

  std::shared_ptr<Graph> graph_;
  c10::FunctionSchema schema_;
  std::shared_ptr<torch::jit::CompilationUnit> unit_;
  std::vector<detail::Piece> pieces_;
  std::unordered_map<Node*, long> order_;  // index of each top-level node
};

}  // namespace jit
}  // namespace peft
