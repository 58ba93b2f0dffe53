#pragma once
/// @file
/// NF4 base weights in a loaded TorchScript model (QLoRA's frozen base). Each
/// quantised linear layer's weight moves, packed, into a module under
/// `peft_nf4` on the root; forward dequantises it with standard ops, so a
/// saved model still loads in plain PyTorch. The fp32 weight is released.

#include <peft/jit/inject.h>
#include <peft/jit/site.h>
#include <peft/quant/nf4.h>

#include <fmt/format.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace peft {
namespace nf4 {

/// TorchScript of a quantised weight; computes exactly what nf4::dequantize does.
/// `dense` (empty unless merged) replaces the NF4 weight while it holds values.
inline const char* const kWeightSource = R"(
def scale_blocks(self, values: Tensor, absmax: Tensor, blocksize: int, n: int) -> Tensor:
    padding = absmax.size(0) * blocksize - values.size(0)
    if padding > 0:
        values = torch.constant_pad_nd(values, [0, padding], 0.0)
    return values.view(-1, blocksize).mul_(absmax.unsqueeze(1)).flatten()[:n]

def absmax_values(self) -> Tensor:
    if not self.double_quant:
        return self.absmax
    codes = torch.index_select(self.nested_code, 0, self.absmax.int())
    return self.scale_blocks(codes, self.nested_absmax, 256, self.absmax.size(0)) + self.nested_offset

def weight(self) -> Tensor:
    if self.dense.numel() > 0:
        return self.dense
    values = torch.index_select(self.code_pairs, 0, self.quant_weight.int()).flatten()
    return self.scale_blocks(values, self.absmax_values(), self.blocksize, self.numel).view(self.shape).to(self.dtype)
)";

/// The module holding the NF4 weight of the linear layer at `path`, if it is quantised.
inline c10::optional<torch::jit::Module> weight_module(const torch::jit::Module& root, const std::string& path) {
  if (!root.hasattr(jit::Injection::kQuantContainer)) return c10::nullopt;
  torch::jit::Module container = root.attr(jit::Injection::kQuantContainer).toModule();
  const std::string key = jit::Injection::layer_key(path);
  if (!container.hasattr(key)) return c10::nullopt;
  return container.attr(key).toModule();
}

/// The state of a weight module, sharing its tensors.
inline Quantized state(const torch::jit::Module& m) {
  Quantized q;
  q.packed = m.attr("quant_weight").toTensor();
  q.absmax = m.attr("absmax").toTensor();
  if (m.attr("double_quant").toBool()) {
    q.nested_absmax = m.attr("nested_absmax").toTensor();
    q.nested_offset = m.attr("nested_offset").toTensor();
  }
  q.shape = m.attr("shape").toIntVector();
  q.blocksize = m.attr("blocksize").toInt();
  q.dtype = static_cast<torch::ScalarType>(m.attr("dtype").toInt());
  return q;
}

/// The dtype the layer had before quantisation (its activations' dtype).
inline torch::ScalarType source_dtype(const torch::jit::Module& m) {
  return static_cast<torch::ScalarType>(m.attr("source_dtype").toInt());
}

/// Writes `q` into the module's tensors in place (every model sharing them sees it).
inline void overwrite(const torch::jit::Module& m, const Quantized& q) {
  torch::NoGradGuard no_grad;
  const Quantized current = state(m);
  check<ShapeError>(q.packed.sizes() == current.packed.sizes() && q.double_quant() == current.double_quant(),
                    "nf4: a re-quantised weight must keep the layout of the one it replaces");
  current.packed.copy_(q.packed);
  current.absmax.copy_(q.absmax);
  if (q.double_quant()) {
    current.nested_absmax.copy_(q.nested_absmax);
    current.nested_offset.copy_(q.nested_offset);
  }
}

/// Makes `weight` (or, undefined, the NF4 state again) what the layer uses; in place, shared.
inline void set_dense(const torch::jit::Module& m, const torch::Tensor& weight) {
  torch::NoGradGuard no_grad;
  torch::Tensor dense = m.attr("dense").toTensor();
  if (weight.defined())
    dense.set_(weight.detach().clone());
  else
    dense.set_(torch::empty({0}, dense.options()));
}

/// The weight the layer at `path` computes with now, as a new tensor of `dtype`.
inline torch::Tensor current_weight(const torch::jit::Module& m, torch::ScalarType dtype) {
  torch::Tensor dense = m.attr("dense").toTensor();
  if (dense.numel() > 0) return dense.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  Quantized q = state(m);
  q.dtype = dtype;
  return dequantize(q);
}

/// Logical weights and stored bytes of every NF4 weight of `root`.
///
/// ```
/// auto f = peft::nf4::footprint(model.module());
/// double bits_per_weight = 8.0 * f.bytes / f.weights;
/// ```
struct Footprint {
  int64_t weights = 0;  ///< elements the quantised weights stand for
  int64_t bytes = 0;    ///< bytes they occupy (packed indices + statistics)
};

/// Sums the NF4 weights of a model that quantize_linear_layers or QLoRA converted.
inline Footprint footprint(const torch::jit::Module& root) {
  Footprint f;
  if (!root.hasattr(jit::Injection::kQuantContainer)) return f;
  for (const auto& m : root.attr(jit::Injection::kQuantContainer).toModule().named_children()) {
    const Quantized q = state(m.value);
    f.weights += q.numel();
    f.bytes += q.bytes();
  }
  return f;
}

namespace detail {

inline torch::jit::Module container(torch::jit::Module& model) {
  if (!model.hasattr(jit::Injection::kQuantContainer))
    model.register_module(jit::Injection::kQuantContainer, jit::new_module(model, "NF4Weights"));
  return model.attr(jit::Injection::kQuantContainer).toModule();
}

/// A TorchScript module holding `q` (for a weight that had `source` dtype).
inline torch::jit::Module weight_module(const torch::jit::Module& owner, const Quantized& q, torch::ScalarType source) {
  torch::jit::Module m = jit::new_module(owner, "NF4Weight");
  const auto device = q.packed.device();
  const torch::Tensor none = torch::empty({0}, torch::TensorOptions().device(device));
  m.register_buffer("quant_weight", q.packed);
  m.register_buffer("absmax", q.absmax);
  m.register_buffer("nested_absmax", q.double_quant() ? q.nested_absmax : none);
  m.register_buffer("nested_offset", q.double_quant() ? q.nested_offset : none);
  m.register_buffer("nested_code", dynamic_code().to(device));
  m.register_buffer("code_pairs", code_pairs().to(device));
  m.register_buffer("dense", torch::empty({0}, torch::TensorOptions().device(device).dtype(q.dtype)));
  m.register_attribute("double_quant", c10::BoolType::get(), q.double_quant());
  m.register_attribute("blocksize", c10::IntType::get(), q.blocksize);
  m.register_attribute("numel", c10::IntType::get(), q.numel());
  m.register_attribute("shape", c10::ListType::ofInts(), c10::IValue(q.shape));
  m.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(q.dtype));
  m.register_attribute("source_dtype", c10::IntType::get(), static_cast<int64_t>(source));
  m.define(kWeightSource);
  return m;
}

/// Every read of `target`'s weight in `graph` now calls `peft_nf4.<key>.weight()`.
inline void reroute_weight_reads(jit::Graph& graph, const std::string& target, const torch::jit::Module& m) {
  std::vector<jit::Node*> reads;
  jit::for_each_node(graph.block(), [&](jit::Node* n) {
    if (n->kind() != c10::prim::GetAttr) return;
    auto attr = jit::attribute_of(n->output());
    if (attr && attr->first == target && attr->second == "weight") reads.push_back(n);
  });
  for (jit::Node* read : reads) {
    jit::Node* call = jit::insert_method_call(read, {jit::Injection::kQuantContainer, jit::Injection::layer_key(target)},
                                              m, "weight", {}, /*insert_after=*/true);
    read->output()->replaceAllUsesWith(call->output());
  }
}

/// Runs each application of the layer in `compute` and converts its result back to `source`.
inline void compute_in(const std::vector<jit::LinearSite>& sites, torch::ScalarType compute, torch::ScalarType source) {
  for (const auto& site : sites) {
    jit::Node* n = site.first;
    check<OptionError>(n->kind() == c10::aten::linear,
                       "NF4Config.compute_dtype: '{}' is applied as x @ W (a Conv1D); a compute dtype other than the "
                       "weight's needs nn.Linear layers",
                       site.module);
    n->replaceInput(0, jit::insert_cast(n, n->input(0), compute));
    if (n->input(2)->type()->kind() != c10::TypeKind::NoneType) n->replaceInput(2, jit::insert_cast(n, n->input(2), compute));
    jit::Value* back = jit::insert_cast(n->next(), n->output(), source);
    jit::reroute_uses(n->output(), back->node(), back);
  }
}

}  // namespace detail

/// Quantises the weights of the linear layers `targets` of `model` to NF4 in
/// place: forward dequantises them (and, with a compute dtype, runs those
/// layers in it); each fp32 weight attribute becomes an empty tensor.
///
/// ```
/// torch::jit::Module model = torch::jit::load("model.pt");
/// peft::nf4::quantize_linear_layers(model, {"layers.0.attention.query"}, peft::NF4Config());
/// ```
inline void quantize_linear_layers(torch::jit::Module& model, const std::vector<std::string>& targets,
                                   const NF4Config& config) {
  config.validate("NF4Config");
  auto graph = jit::method_graph(model, "forward");
  jit::inline_calls(*graph, nullptr, jit::Injection::is_peft_call);
  jit::simplify(graph);
  const auto sites = jit::sites_by_module(jit::find_linear_sites(*graph, model));
  torch::jit::Module weights = detail::container(model);
  for (const auto& target : targets) {
    check<TargetError>(sites.count(target) > 0, "NF4: '{}' is not a linear layer that forward applies", target);
    check<OptionError>(!weight_module(model, target), "NF4: '{}' is already quantised", target);
    torch::jit::Module layer = jit::submodule(model, target);
    const torch::Tensor W = layer.attr("weight").toTensor();
    const Quantized q = quantize(W, config);
    torch::jit::Module m = detail::weight_module(model, q, W.scalar_type());
    weights.register_module(jit::Injection::layer_key(target), m);
    detail::reroute_weight_reads(*graph, target, m);
    if (q.dtype != W.scalar_type()) detail::compute_in(sites.at(target), q.dtype, W.scalar_type());
    layer.setattr("weight", torch::empty({0}, W.options()));  // releases the fp32 weight
  }
  jit::replace_method(model, "forward", graph);
}

namespace detail {

/// The kernel of peft::nf4_linear: nf4::linear on an NF4Weight module's tensors (`dense`, when
/// it holds a merged weight, instead); `nested_absmax` is empty without double quantisation.
inline torch::Tensor nf4_linear_kernel(const torch::Tensor& input, const torch::Tensor& quant_weight,
                                       const torch::Tensor& absmax, const torch::Tensor& nested_absmax,
                                       const torch::Tensor& nested_offset, const torch::Tensor& dense,
                                       const c10::optional<torch::Tensor>& bias, at::IntArrayRef shape, int64_t blocksize,
                                       int64_t dtype, bool fan_in_fan_out) {
  const torch::Tensor b = bias ? *bias : torch::Tensor();
  if (dense.numel() > 0) {
    if (!fan_in_fan_out) return torch::nn::functional::linear(input, dense, b);
    return b.defined() ? torch::matmul(input, dense) + b : torch::matmul(input, dense);
  }
  const bool nested = nested_absmax.numel() > 0;
  const Quantized q{quant_weight, absmax, nested ? nested_absmax : torch::Tensor(), nested ? nested_offset : torch::Tensor(),
                    shape.vec(), blocksize, static_cast<torch::ScalarType>(dtype)};
  return linear(input, q, b, fan_in_fan_out);
}

/// Registers the operator peft::nf4_linear (once per process): training graphs call it.
inline void register_nf4_linear() {
  static const std::unique_ptr<torch::Library> library = [] {
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "peft", c10::nullopt, __FILE__, __LINE__);
    lib->def("nf4_linear(Tensor input, Tensor quant_weight, Tensor absmax, Tensor nested_absmax, Tensor nested_offset, "
             "Tensor dense, Tensor? bias, int[] shape, int blocksize, int dtype, bool fan_in_fan_out) -> Tensor",
             &nf4_linear_kernel);
    return lib;
  }();
}

/// {x, bias (None), fan_in_fan_out} of `user` when it applies the weight `w` as a linear
/// layer: linear(x, w, b), matmul(x, w) or addmm(b, x, w) with beta = alpha = 1.
inline std::optional<std::tuple<jit::Value*, jit::Value*, bool>> linear_use(jit::Node* user, jit::Value* w) {
  auto is_one = [](jit::Value* v) {
    auto c = torch::jit::toIValue(v);
    return c && ((c->isInt() && c->toInt() == 1) || (c->isDouble() && c->toDouble() == 1.0));
  };
  if (user->kind() == c10::aten::linear && user->input(1) == w) return std::make_tuple(user->input(0), user->input(2), false);
  if (user->kind() == c10::aten::matmul && user->input(1) == w) return std::make_tuple(user->input(0), nullptr, true);
  if (user->kind() == c10::aten::addmm && user->input(2) == w && user->inputs().size() == 5 && is_one(user->input(3)) &&
      is_one(user->input(4)))
    return std::make_tuple(user->input(1), user->input(0), true);
  return std::nullopt;
}

/// Replaces each linear use of the NF4 weight `call` computes (`self.peft_nf4.<key>.weight()`,
/// whose module is `m`) by peft::nf4_linear on the module's tensors.
inline void fuse_linear_uses(jit::Graph& graph, jit::Node* call, const torch::jit::Module& m) {
  jit::Value* w = call->output();
  const auto uses = w->uses();
  for (const auto& use : uses) {
    auto linear = linear_use(use.user, w);
    if (!linear) continue;
    torch::jit::WithInsertPoint guard(use.user);
    std::vector<torch::jit::NamedValue> args{std::get<0>(*linear)};
    for (const char* field : {"quant_weight", "absmax", "nested_absmax", "nested_offset", "dense"})
      args.emplace_back(graph.insertGetAttr(call->input(0), field));
    args.emplace_back(std::get<1>(*linear) ? std::get<1>(*linear) : graph.insertConstant(c10::IValue()));
    args.emplace_back(graph.insertConstant(c10::IValue(m.attr("shape").toIntVector())));
    args.emplace_back(graph.insertConstant(m.attr("blocksize").toInt()));
    args.emplace_back(graph.insertConstant(m.attr("dtype").toInt()));
    args.emplace_back(graph.insertConstant(std::get<2>(*linear)));
    jit::Value* fused = graph.insert(c10::Symbol::fromQualString("peft::nf4_linear"), args);
    use.user->output()->replaceAllUsesWith(fused);
  }
}

}  // namespace detail

/// A copy of `model`'s forward graph for training, whose NF4 linear layers run as
/// the registered operator peft::nf4_linear (nf4::linear: autograd keeps the 4-bit
/// state, not the dequantised weight); nullptr when `model` has no NF4 weight. The
/// model's own forward keeps standard ops, so what save() writes loads in plain PyTorch.
inline std::shared_ptr<jit::Graph> training_graph(const torch::jit::Module& model) {
  if (!model.hasattr(jit::Injection::kQuantContainer)) return nullptr;
  detail::register_nf4_linear();
  auto graph = jit::method_graph(model, "forward");
  const std::string prefix = std::string(jit::Injection::kQuantContainer) + ".";
  std::vector<std::pair<jit::Node*, std::string>> calls;
  jit::for_each_node(graph->block(), [&](jit::Node* n) {
    if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "weight") return;
    auto path = jit::module_path(n->input(0));
    if (path && path->rfind(prefix, 0) == 0) calls.emplace_back(n, *path);
  });
  for (const auto& [call, path] : calls) detail::fuse_linear_uses(*graph, call, jit::submodule(model, path));
  torch::jit::EliminateDeadCode(graph);
  return graph;
}

/// Every linear layer forward applies, but the output head (as "all-linear").
inline std::vector<std::string> linear_layers(const torch::jit::Module& model) {
  auto graph = jit::method_graph(model, "forward");
  jit::inline_calls(*graph, nullptr, jit::Injection::is_peft_call);
  jit::simplify(graph);
  std::vector<std::string> out;
  for (const auto& [module, uses] : jit::sites_by_module(jit::find_linear_sites(*graph, model)))
    if (!jit::is_output_head(module, uses)) out.push_back(module);
  return out;
}

}  // namespace nf4
}  // namespace peft
