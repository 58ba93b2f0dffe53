#pragma once
/// @file
/// Where prompt and prefix tuning attach in an inlined forward graph: the
/// transformer stack (an nn.ModuleList of blocks) and, in every attention, the
/// keys and values after the head split and the masks applied to the scores.

#include <peft/core/error.h>
#include <peft/jit/graph.h>

#include <optional>
#include <set>
#include <string>
#include <vector>

namespace peft {
namespace jit {

/// Whether `path` names a child of an nn.ModuleList in `root` (a transformer block).
inline bool is_stack_block(const torch::jit::Module& root, const std::string& path) {
  const auto dot = path.rfind('.');
  if (dot == std::string::npos || path.find_first_not_of("0123456789", dot + 1) != std::string::npos) return false;
  const auto& name = submodule(root, path.substr(0, dot)).type()->name();
  return name && name->name() == "ModuleList";
}

inline std::optional<int64_t> static_int(Value* v, const torch::jit::Module& root, int depth = 0);

/// The width of the last dimension of `t` when `dim` names it (-1, or 2 for the
/// [batch, seq, width] tensors transformers use) and the graph fixes it: a
/// linear layer's output, or a piece of a split along that dimension.
inline std::optional<int64_t> last_dim_size(Value* t, std::optional<int64_t> dim, const torch::jit::Module& root) {
  using namespace c10;
  if (!dim || (*dim != -1 && *dim != 2)) return std::nullopt;
  Node* n = t->node();
  if (n->kind() == prim::ListUnpack && n->input(0)->node()->kind() == aten::split) {
    Node* split = n->input(0)->node();
    auto split_dim = static_int(split->input(2), root, 1);
    if (split_dim && (*split_dim == *dim || *split_dim == -1)) return static_int(split->input(1), root, 1);
    return std::nullopt;
  }
  if (n->kind() == aten::linear) {
    if (auto attr = attribute_of(n->input(1))) return submodule(root, attr->first).attr("weight").toTensor().size(0);
  }
  return std::nullopt;
}

/// The value of an int expression made of constants, module int attributes and
/// simple arithmetic, as scripted and traced exports spell head counts; empty
/// when it depends on the input.
inline std::optional<int64_t> static_int(Value* v, const torch::jit::Module& root, int depth) {
  using namespace c10;
  if (depth > 16) return std::nullopt;
  Node* n = v->node();
  auto arg = [&](size_t i) { return static_int(n->input(i), root, depth + 1); };
  switch (n->kind()) {
    case prim::Constant: {
      auto value = toIValue(v);
      if (value && value->isInt()) return value->toInt();
      if (value && value->isTensor() && value->toTensor().numel() == 1) return value->toTensor().item<int64_t>();
      return std::nullopt;
    }
    case prim::GetAttr: {
      auto owner = module_path(n->input(0));
      if (!owner) return std::nullopt;
      auto value = submodule(root, *owner).attr(n->s(attr::name));
      return value.isInt() ? std::optional<int64_t>(value.toInt()) : std::nullopt;
    }
    case prim::NumToTensor:
    case aten::Int:
      return arg(0);
    case aten::size:
      return last_dim_size(n->input(0), static_int(n->input(1), root, depth + 1), root);
    default: break;
  }
  if (n->inputs().size() < 2) return std::nullopt;
  auto a = arg(0), b = arg(1);
  if (!a || !b) return std::nullopt;
  if (n->kind() == aten::floordiv || n->kind() == aten::floor_divide || n->kind() == aten::div)
    return *b ? std::optional<int64_t>(*a / *b) : std::nullopt;
  if (n->kind() == aten::mul) return *a * *b;
  return std::nullopt;
}

/// One attention in the graph and how to give it a prefix.
struct AttentionSite {
  Node* softmax = nullptr;
  Value* key = nullptr;     ///< [B, Hkv, Tk, d]: where the key prefix joins (before any head repeat)
  Node* key_user = nullptr; ///< the node reading `key` on the way to the scores
  Value* value = nullptr;   ///< [B, Hkv, Tk, d]
  Node* value_user = nullptr;
  /// Mask operands on the scores path: (node, input index, value meaning "attend").
  std::vector<std::tuple<Node*, size_t, double>> masks;
  int64_t kv_heads = 0, head_dim = 0;  ///< 0 when the graph does not tell
};

namespace detail {

/// Steps back from a head-split tensor over a head repeat (grouped-query attention).
inline std::pair<Value*, Node*> before_head_repeat(Value* v, Node* user) {
  if (v->node()->kind() == c10::aten::repeat_interleave) return {v->node()->input(0), v->node()};
  return {v, user};
}

/// Finds [.., .., heads, head_dim] of the view/reshape that split `v` into heads.
inline void read_head_layout(Value* v, const torch::jit::Module& root, AttentionSite& site, int depth = 0) {
  if (depth > 24 || site.kv_heads) return;
  Node* n = v->node();
  if ((n->kind() == c10::aten::view || n->kind() == c10::aten::reshape) &&
      n->input(1)->node()->kind() == c10::prim::ListConstruct && n->input(1)->node()->inputs().size() == 4) {
    auto heads = static_int(n->input(1)->node()->input(2), root);
    auto dim = static_int(n->input(1)->node()->input(3), root);
    if (heads && dim) site.kv_heads = *heads, site.head_dim = *dim;
    return;
  }
  for (Value* in : n->inputs())
    if (in->type()->cast<c10::TensorType>()) read_head_layout(in, root, site, depth + 1);
}

}  // namespace detail

/// Finds every attention: a softmax over the last dimension whose input comes,
/// through scaling and masking ops, from matmul(q, kᵀ), and whose output (maybe
/// through dropout) multiplies v. Softmaxes of any other shape are skipped.
inline std::vector<AttentionSite> find_attention_sites(Graph& graph, const torch::jit::Module& root) {
  using namespace c10;
  std::vector<AttentionSite> sites;
  for_each_node(graph.block(), [&](Node* softmax) {
    if (softmax->kind() != aten::softmax) return;
    AttentionSite site;
    site.softmax = softmax;
    // Back along the scores: masks and scales until matmul(q, kᵀ).
    Value* scores = softmax->input(0);
    Node* n = scores->node();
    for (int guard = 0; guard < 16 && n->kind() != aten::matmul; ++guard, n = scores->node()) {
      const auto k = n->kind();
      if (k == aten::masked_fill) {
        site.masks.emplace_back(n, 1, 0.0);  // fill where true: prefix positions false
      } else if (k == aten::where && n->inputs().size() == 3) {
        // where(keep, scores, fill) or where(masked, fill, scores)
        const bool scores_second = n->input(2)->type()->cast<TensorType>() && !n->input(1)->type()->cast<TensorType>();
        site.masks.emplace_back(n, 0, scores_second ? 0.0 : 1.0);
        scores = n->input(scores_second ? 2 : 1);
        continue;
      } else if (k == aten::add || k == aten::sub || k == aten::mul || k == aten::div) {
        Value* other = n->input(1);
        if (other->type()->cast<TensorType>() && !(other->node()->kind() == prim::Constant))
          site.masks.emplace_back(n, 1, (k == aten::mul || k == aten::div) ? 1.0 : 0.0);
      } else if (k != aten::to && k != aten::type_as && k != aten::contiguous) {
        break;
      }
      scores = n->input(0);
    }
    if (n->kind() != aten::matmul) return;
    Node* kt = n->input(1)->node();
    if (kt->kind() != aten::transpose) return;
    std::tie(site.key, site.key_user) = detail::before_head_repeat(kt->input(0), kt);
    // Forward from the softmax: (dropout) then matmul(probs, v).
    Value* probs = softmax->output();
    if (probs->uses().size() == 1 && probs->uses()[0].user->kind() == aten::dropout)
      probs = probs->uses()[0].user->output();
    for (const auto& use : probs->uses())
      if (use.user->kind() == aten::matmul && use.offset == 0)
        std::tie(site.value, site.value_user) = detail::before_head_repeat(use.user->input(1), use.user);
    if (!site.value) return;
    detail::read_head_layout(site.key, root, site);
    sites.push_back(site);
  });
  return sites;
}

}  // namespace jit
}  // namespace peft
