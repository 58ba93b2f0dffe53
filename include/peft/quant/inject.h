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
