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
#include <variant>
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
    if (split_dim && (*split_dim == -1 || *split_dim == 2)) return static_int(split->input(1), root, 1);
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
  Node* softmax = nullptr;  ///< the softmax, or the scaled_dot_product_attention node when `sdpa`
  bool sdpa = false;        ///< a fused torch.nn.functional.scaled_dot_product_attention (LibTorch 2.x)
  Value* key = nullptr;     ///< [B, Hkv, Tk, d]: where the key prefix joins (before any head repeat)
  std::vector<Node*> key_users;  ///< the nodes reading `key` on the way to the scores
  Value* value = nullptr;   ///< [B, Hkv, Tk, d]
  std::vector<Node*> value_users;
  /// Mask operands on the scores path: (node, input index, value meaning "attend").
  std::vector<std::tuple<Node*, size_t, double>> masks;
  int64_t kv_heads = 0, head_dim = 0;  ///< 0 when the graph does not tell
};

/// A softmax not taken for an attention, and the node where the search stopped.
struct AttentionMiss {
  Node* softmax = nullptr;
  Node* stop = nullptr;
  std::string why;
  bool certain = false;  ///< q·kᵀ over head-split keys feeds it: an attention the library does not understand
};

/// What find_attention recognised and what it passed over.
struct AttentionSearch {
  std::vector<AttentionSite> sites;
  std::vector<AttentionMiss> misses;
};

namespace detail {

/// aten::scaled_dot_product_attention, looked up at run time: LibTorch 1.13
/// has no such operator (nor interned symbol), 2.x does.
inline c10::Symbol sdpa_symbol() {
  static const c10::Symbol s = c10::Symbol::fromQualString("aten::scaled_dot_product_attention");
  return s;
}

/// "aten::einsum at model.py:33 (%scores)": a node as the user finds it in
/// their source, for error messages.
inline std::string describe(Node* n) {
  std::string out = n->kind().toQualString();
  const auto range = n->sourceRange();
  if (auto flc = range.file_line_col()) {
    const std::string& file = std::get<0>(*flc);
    out += fmt::format(" at {}:{}", file.substr(file.find_last_of('/') + 1), std::get<1>(*flc));
  } else if (range.source()) {
    out += fmt::format(" at line {}", range.source()->lineno_for_offset(range.start()) + 1);
  }
  if (n->outputs().size() == 1 && n->output()->hasDebugName()) out += " (%" + n->output()->debugName() + ")";
  return out;
}

/// The nodes computing `v` up to `depth` steps back (shape arithmetic).
inline void producers(Value* v, std::set<Node*>& out, int depth) {
  if (depth < 0 || !out.insert(v->node()).second) return;
  for (Value* in : v->node()->inputs()) producers(in, out, depth - 1);
}

inline bool is_tensor(Value* v) { return v->type()->cast<c10::TensorType>() != nullptr; }

/// A tensor operand that is data, not a scalar folded into a constant (scales,
/// fill values); a constant mask (traced with fixed sizes) is data.
inline bool is_tensor_operand(Value* v) {
  if (!is_tensor(v)) return false;
  if (v->node()->kind() != c10::prim::Constant) return true;
  auto value = toIValue(v);
  return value && value->isTensor() && value->toTensor().numel() > 1;
}

/// `v` as produced before a helper returned it in a tuple: scripted
/// `q, k, v = self.project(x)` leaves TupleUnpack(TupleConstruct(..)) after inlining.
inline Value* through_tuple(Value* v) {
  while (v->node()->kind() == c10::prim::TupleUnpack &&
         v->node()->input(0)->node()->kind() == c10::prim::TupleConstruct)
    v = v->node()->input(0)->node()->input(v->offset());
  return v;
}

/// Whether `n` maps the scores elementwise onto the same shape through its
/// first input alone: dtype casts (`.float()`, `.to()`, `.type_as()`), layout
/// and soft-capping. The prefix columns just pass through.
inline bool is_scores_passthrough(Node* n) {
  using namespace c10;
  static const std::set<Symbol> kinds{aten::to, aten::type_as, aten::contiguous, aten::clone, aten::tanh,
                                      aten::tanh_, aten::detach};
  return kinds.count(n->kind()) > 0;
}

/// Whether `n` maps attention probabilities to themselves (casts, dropout).
inline bool is_probs_passthrough(Node* n) {
  using namespace c10;
  static const std::set<Symbol> kinds{aten::to,      aten::type_as,  aten::contiguous, aten::clone,
                                      aten::dropout, aten::dropout_, aten::feature_dropout};
  return kinds.count(n->kind()) > 0;
}

/// matmul(q, transpose(k)), the scores of an attention (`@` is aten::matmul too).
inline bool is_qk_matmul(Node* n) {
  return n->kind() == c10::aten::matmul && n->input(1)->node()->kind() == c10::aten::transpose;
}

/// Steps back from a head-split tensor over a head repeat (grouped-query
/// attention): repeat_interleave, or HF's repeat_kv, x[:, :, None].expand(..).reshape(..).
/// Returns the tensor before the repeat and the nodes of the repeat that read it
/// (repeat_kv also reads its sizes, which must see the prefix too).
inline std::pair<Value*, std::vector<Node*>> before_head_repeat(Value* v, Node* user) {
  using namespace c10;
  Node* n = v->node();
  if (n->kind() == aten::repeat_interleave) return {n->input(0), {n}};
  if (n->kind() != aten::reshape || n->input(0)->node()->kind() != aten::expand) return {v, {user}};
  Node* expand = n->input(0)->node();
  Value* x = expand->input(0);
  while (x->node()->kind() == aten::unsqueeze || x->node()->kind() == aten::slice) x = x->node()->input(0);
  // Readers of x inside the repeat: the index chain and the size() calls of the expand/reshape shapes.
  std::set<Node*> repeat{n, expand};
  producers(expand->input(1), repeat, 4);
  producers(n->input(1), repeat, 4);
  for (Value* y = expand->input(0); y != x; y = y->node()->input(0)) repeat.insert(y->node());
  std::vector<Node*> users;
  for (const auto& use : x->uses())
    if (repeat.count(use.user)) users.push_back(use.user);
  return {x, users};
}

/// Finds [.., .., heads, head_dim] of the view/reshape that split `v` into heads.
inline void read_head_layout(Value* v, const torch::jit::Module& root, AttentionSite& site, int depth = 0) {
  if (depth > 24 || site.kv_heads) return;
  Node* n = through_tuple(v)->node();
  if ((n->kind() == c10::aten::view || n->kind() == c10::aten::reshape) &&
      n->input(1)->node()->kind() == c10::prim::ListConstruct && n->input(1)->node()->inputs().size() == 4) {
    auto heads = static_int(n->input(1)->node()->input(2), root);
    auto dim = static_int(n->input(1)->node()->input(3), root);
    if (heads && dim) site.kv_heads = *heads, site.head_dim = *dim;
    return;
  }
  for (Value* in : n->inputs())
    if (is_tensor(in)) read_head_layout(in, root, site, depth + 1);
}

/// Whether matmul(q, kᵀ) is among the first few producers of `v`, through any
/// op: tells an attention the library does not understand from other softmaxes.
inline bool reaches_qk(Node* n, int depth = 0) {
  if (depth > 8) return false;
  if (is_qk_matmul(n)) return true;
  for (Value* in : n->inputs())
    if (is_tensor_operand(in) && reaches_qk(in->node(), depth + 1)) return true;
  return false;
}

using Masks = std::vector<std::tuple<Node*, size_t, double>>;

inline Node* walk_scores(Value* scores, Masks& masks, Node*& stop, int depth);

/// `scores.masked_fill_(m, x)` or `scores.add_(bias)` as a statement: the
/// result is not used (scores is), so the mask is read off the uses of scores.
inline void inplace_masks(Value* scores, Masks& masks) {
  using namespace c10;
  for (const auto& use : scores->uses()) {
    const auto k = use.user->kind();
    if (use.offset != 0 || !use.user->output()->uses().empty() || !is_tensor_operand(use.user->input(1))) continue;
    if (k == aten::masked_fill_ || k == aten::add_ || k == aten::sub_) masks.emplace_back(use.user, 1, 0.0);
    if (k == aten::mul_ || k == aten::div_) masks.emplace_back(use.user, 1, 1.0);
  }
}

/// walk_scores through whichever of the inputs `candidates` of `n` carries
/// the scores; the other operand is a mask meaning "attend" at `attend`. For
/// where(cond, a, b), the condition is the mask: keep where true if the scores are a.
inline Node* walk_either(Node* n, const std::vector<size_t>& candidates, double attend, Masks& masks, Node*& stop,
                         int depth) {
  const bool where = n->kind() == c10::aten::where;
  Node* first_stop = nullptr;
  for (size_t i : candidates) {
    if (!is_tensor_operand(n->input(i))) continue;
    Masks inner;
    Node* inner_stop = nullptr;
    if (Node* mm = walk_scores(n->input(i), inner, inner_stop, depth + 1)) {
      const size_t mask = where ? 0 : 1 - i;
      if (is_tensor_operand(n->input(mask))) masks.emplace_back(n, mask, where ? (i == 1 ? 1.0 : 0.0) : attend);
      masks.insert(masks.end(), inner.begin(), inner.end());
      return mm;
    }
    if (!first_stop) first_stop = inner_stop;
  }
  if (first_stop) stop = first_stop;
  return nullptr;
}

/// Walks back from the softmax input to matmul(q, kᵀ) through casts,
/// elementwise scaling and additive or filled masks (whichever operand carries
/// the scores), recording the mask operands that need prefix columns. Returns
/// the matmul, or nullptr with `stop` set to the node it could not pass.
inline Node* walk_scores(Value* scores, Masks& masks, Node*& stop, int depth) {
  using namespace c10;
  scores = through_tuple(scores);
  inplace_masks(scores, masks);
  Node* n = scores->node();
  if (is_qk_matmul(n)) return n;
  stop = n;
  if (depth > 24) return nullptr;
  const auto k = n->kind();
  if (is_scores_passthrough(n)) return walk_scores(n->input(0), masks, stop, depth + 1);
  if (k == aten::masked_fill || k == aten::masked_fill_) {
    masks.emplace_back(n, 1, 0.0);  // fill where true: prefix columns false
    return walk_scores(n->input(0), masks, stop, depth + 1);
  }
  if (k == aten::where && n->inputs().size() == 3) return walk_either(n, {1, 2}, 0.0, masks, stop, depth);
  static const std::set<Symbol> additive{aten::add, aten::add_, aten::sub, aten::sub_};
  static const std::set<Symbol> multiplicative{aten::mul, aten::mul_, aten::div, aten::div_};
  const bool is_add = additive.count(k) > 0, is_mul = multiplicative.count(k) > 0;
  if (!is_add && !is_mul) return nullptr;
  // bias + scores and scale * scores commute; a subtrahend or divisor is never the scores.
  const bool commutes = k == aten::add || k == aten::add_ || k == aten::mul || k == aten::mul_;
  return walk_either(n, commutes ? std::vector<size_t>{0, 1} : std::vector<size_t>{0}, is_mul ? 1.0 : 0.0, masks,
                     stop, depth);
}

/// Follows the softmax output through casts and dropout to matmul(probs, v);
/// nullptr with `stop` set when it goes elsewhere.
inline Node* walk_probs(Value* probs, Node*& stop) {
  for (int guard = 0; guard < 16; ++guard) {
    std::vector<Node*> next;  // other uses (returned attention weights) do not matter
    for (const auto& use : probs->uses()) {
      if (use.user->kind() == c10::aten::matmul && use.offset == 0) return use.user;
      if (use.offset == 0 && is_probs_passthrough(use.user)) next.push_back(use.user);
    }
    if (next.size() != 1) {
      stop = next.size() > 1 ? next[1] : probs->uses().empty() ? probs->node() : probs->uses()[0].user;
      if (stop->kind() == c10::prim::ListConstruct && !stop->output()->uses().empty())
        stop = stop->output()->uses()[0].user;  // einsum(eq, [probs, v]) and the like: name the op
      return nullptr;
    }
    probs = next[0]->output();
  }
  stop = probs->node();
  return nullptr;
}

/// One softmax: a site, or the reason it is not one.
inline std::variant<AttentionSite, AttentionMiss> match_softmax(Node* softmax, const torch::jit::Module& root) {
  AttentionSite site;
  site.softmax = softmax;
  AttentionMiss miss{softmax, nullptr, "", false};
  Node* qk = walk_scores(softmax->input(0), site.masks, miss.stop, 0);
  if (!qk) {
    miss.why = "the scores do not come from matmul(q, kᵀ) through casts, scaling, masks and biases";
    miss.certain = reaches_qk(miss.stop);
    return miss;
  }
  Node* kt = qk->input(1)->node();
  std::tie(site.key, site.key_users) = before_head_repeat(kt->input(0), kt);
  read_head_layout(site.key, root, site);
  miss.certain = site.kv_heads > 0;
  miss.stop = nullptr;
  Node* pv = walk_probs(softmax->output(), miss.stop);
  if (!pv) {
    miss.why = "the probabilities do not reach matmul(probs, v) through casts and dropout";
    return miss;
  }
  std::tie(site.value, site.value_users) = before_head_repeat(pv->input(1), pv);
  return site;
}

/// A fused scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, ...).
inline AttentionSite match_sdpa(Node* n, const torch::jit::Module& root) {
  AttentionSite site;
  site.softmax = n;
  site.sdpa = true;
  std::tie(site.key, site.key_users) = before_head_repeat(n->input(1), n);
  std::tie(site.value, site.value_users) = before_head_repeat(n->input(2), n);
  read_head_layout(site.key, root, site);
  return site;
}

}  // namespace detail

/// Finds every attention: a softmax over the last dimension whose input comes,
/// through casts, scaling, biases and masks, from matmul(q, kᵀ), and whose
/// output (through casts and dropout) multiplies v; and every fused
/// scaled_dot_product_attention. Other softmaxes are reported as misses.
inline AttentionSearch find_attention(Graph& graph, const torch::jit::Module& root) {
  AttentionSearch found;
  for_each_node(graph.block(), [&](Node* n) {
    if (n->kind() == detail::sdpa_symbol()) {
      found.sites.push_back(detail::match_sdpa(n, root));
    } else if (n->kind() == c10::aten::softmax) {
      auto match = detail::match_softmax(n, root);
      if (auto* site = std::get_if<AttentionSite>(&match)) found.sites.push_back(std::move(*site));
      else found.misses.push_back(std::get<AttentionMiss>(match));
    }
  });
  return found;
}

/// The recognised attentions of find_attention.
inline std::vector<AttentionSite> find_attention_sites(Graph& graph, const torch::jit::Module& root) {
  return find_attention(graph, root).sites;
}

/// "the search stopped at aten::einsum at m.py:3 (%s), for aten::softmax at m.py:4 (%p): why".
inline std::string describe(const AttentionMiss& miss) {
  return fmt::format("the search stopped at {}, for {}: {}", detail::describe(miss.stop),
                     detail::describe(miss.softmax), miss.why);
}

}  // namespace jit
}  // namespace peft
