#pragma once
/// @file
/// Prefix tuning (Li & Liang 2021): learned keys and values prepended in attention.

#include <peft/core/mask.h>
#include <peft/core/shape.h>
#include <torch/torch.h>

#include <cmath>
#include <ostream>

namespace peft {

/// Options of peft::PrefixAttention.
///
/// ```
/// auto opts = peft::PrefixOptions(10).encoder_hidden_size(512);   // train through the MLP
/// ```
struct PrefixOptions {
  /// Options with `num_virtual_tokens` learned key/value positions.
  /* implicit */ PrefixOptions(int64_t num_virtual_tokens) : num_virtual_tokens_(num_virtual_tokens) {}

  /// Number P of prefix positions, ≥ 1.
  TORCH_ARG(int64_t, num_virtual_tokens);
  /// > 0: reparametrise the prefixes through Embedding → Linear → Tanh → Linear
  /// of this hidden width (HF's prefix_projection); fold it away after training.
  TORCH_ARG(int64_t, encoder_hidden_size) = 0;
};

namespace functional {

/// Options of functional::prefix_attention. Masks follow PyTorch's
/// MultiheadAttention: boolean true = do not attend, float = added to scores.
///
/// ```
/// auto y = peft::functional::prefix_attention(q, k, v, prefix_k, prefix_v,
///     peft::functional::PrefixAttentionFuncOptions().is_causal(true));
/// ```
struct PrefixAttentionFuncOptions {
  /// [B, Tk]: padding of the (non-prefix) keys.
  TORCH_ARG(torch::Tensor, key_padding_mask) = {};
  /// [Tq, Tk] or broadcastable to [B, H, Tq, Tk].
  TORCH_ARG(torch::Tensor, attn_mask) = {};
  /// Query i (aligned to the end of the keys) sees keys up to its own position.
  TORCH_ARG(bool, is_causal) = false;
  /// Attention dropout probability.
  TORCH_ARG(double, dropout) = 0.0;
  /// Whether dropout applies.
  TORCH_ARG(bool, training) = false;
};

namespace detail {

/// Applies a boolean (true = masked) or additive mask to attention scores.
inline torch::Tensor apply_mask(const torch::Tensor& scores, const torch::Tensor& mask) {
  if (mask.scalar_type() == torch::kBool)
    return scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  return scores + mask;
}

}  // namespace detail

/// Scaled dot-product attention over [prefix; K] and [prefix; V]. q [B, H, Tq, d],
/// k, v [B, Hkv, Tk, d], prefixes [Hkv, P, d] (shared by the batch) or
/// [B, Hkv, P, d]. Every mask is extended so the P prefix positions are always
/// attended. With Hkv < H (grouped-query attention) each KV head serves H/Hkv
/// query heads. Returns [B, H, Tq, d].
inline torch::Tensor prefix_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& prefix_k, const torch::Tensor& prefix_v,
                                      const PrefixAttentionFuncOptions& options = {}) {
  const char* where = "prefix_attention";
  check_dims(q, 4, where, "q [batch, heads, seq, head_dim]");
  check_dims(k, 4, where, "k [batch, kv_heads, seq, head_dim]");
  check<ShapeError>(v.sizes() == k.sizes(), "{}: v has shape {}, k has {}", where, shape_str(v.sizes()),
                    shape_str(k.sizes()));
  check<ShapeError>(prefix_k.sizes() == prefix_v.sizes() && (prefix_k.dim() == 3 || prefix_k.dim() == 4),
                    "{}: prefixes must both be [kv_heads, P, head_dim] or [batch, kv_heads, P, head_dim], got {} and {}",
                    where, shape_str(prefix_k.sizes()), shape_str(prefix_v.sizes()));
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  torch::Tensor pk = prefix_k.dim() == 3 ? prefix_k.unsqueeze(0).expand({B, -1, -1, -1}) : prefix_k;
  torch::Tensor pv = prefix_v.dim() == 3 ? prefix_v.unsqueeze(0).expand({B, -1, -1, -1}) : prefix_v;
  check<ShapeError>(pk.size(0) == B && pk.size(1) == Hkv && pk.size(3) == d && k.size(0) == B && k.size(3) == d,
                    "{}: prefix {} does not fit k {} (batch {}, kv_heads {}, head_dim {})", where,
                    shape_str(prefix_k.sizes()), shape_str(k.sizes()), B, Hkv, d);
  check<ShapeError>(H % Hkv == 0, "{}: {} query heads are not a multiple of {} kv heads", where, H, Hkv);
  const int64_t P = pk.size(2);

  torch::Tensor keys = torch::cat({pk, k}, 2), values = torch::cat({pv, v}, 2);
  if (Hkv < H) {
    keys = keys.repeat_interleave(H / Hkv, 1);
    values = values.repeat_interleave(H / Hkv, 1);
  }
  torch::Tensor scores = torch::matmul(q, keys.transpose(-1, -2)) / std::sqrt(static_cast<double>(d));
  if (options.attn_mask().defined()) {
    const torch::Tensor& m = options.attn_mask();
    scores = detail::apply_mask(scores, prepend_visible(m, P, m.scalar_type() == torch::kBool ? false : 0));
  }
  if (options.is_causal()) {
    torch::Tensor future = torch::ones({Tq, Tk}, q.options().dtype(torch::kBool)).triu(Tk - Tq + 1);
    scores = detail::apply_mask(scores, prepend_visible(future, P, false));
  }
  if (options.key_padding_mask().defined()) {
    const torch::Tensor& m = options.key_padding_mask();
    check<ShapeError>(m.dim() == 2 && m.size(0) == B && m.size(1) == Tk,
                      "{}: key_padding_mask must be [batch={}, keys={}], got {}", where, B, Tk, shape_str(m.sizes()));
    torch::Tensor extended = prepend_visible(m, P, m.scalar_type() == torch::kBool ? false : 0);
    scores = detail::apply_mask(scores, extended.view({B, 1, 1, P + Tk}));
  }
  torch::Tensor probs = torch::nn::functional::dropout(
      torch::softmax(scores, -1),
      torch::nn::functional::DropoutFuncOptions().p(options.dropout()).training(options.training()));
  return torch::matmul(probs, values);
}

}  // namespace functional

/// The reparametrisation MLP of prefix tuning: Embedding(P, E) → Linear(E, h)
/// → Tanh → Linear(h, out). Its output [P, out] is the prefix.
///
/// ```
/// peft::PrefixEncoder encoder(/*num_virtual_tokens=*/10, /*embed_dim=*/512, /*hidden=*/256, /*out_dim=*/2 * 512);
/// torch::Tensor prefixes = encoder->forward();   // [10, 1024]
/// ```
class PrefixEncoderImpl : public torch::nn::Module {
 public:
  /// An embedding of the P positions followed by Linear -> Tanh -> Linear to out_dim.
  PrefixEncoderImpl(int64_t num_virtual_tokens, int64_t embed_dim, int64_t hidden, int64_t out_dim) {
    embedding = register_module("embedding", torch::nn::Embedding(num_virtual_tokens, embed_dim));
    transform = register_module("transform", torch::nn::Sequential(torch::nn::Linear(embed_dim, hidden),
                                                                   torch::nn::Tanh(),
                                                                   torch::nn::Linear(hidden, out_dim)));
  }

  /// [P, out_dim].
  torch::Tensor forward() { return transform->forward(embedding->weight); }

  /// One row per virtual position.
  torch::nn::Embedding embedding{nullptr};
  /// Linear -> Tanh -> Linear.
  torch::nn::Sequential transform{nullptr};
};

/// Holder of PrefixEncoderImpl (see there).
TORCH_MODULE(PrefixEncoder);

/// A frozen `torch::nn::MultiheadAttention` with P learned key/value positions
/// in front of every sequence. Same calling convention as the base (sequence
/// first: [T, B, E]); key-padding, attention and causal masks are extended so
/// the prefix is always attended. Trainable: `prefix` [2, H, P, E/H] (keys,
/// values), or the `prefix_encoder` MLP until fold_projection().
///
/// ```
/// peft::PrefixAttention attn(torch::nn::MultiheadAttention(512, 8), peft::PrefixOptions(10));
/// auto y = attn(x, x, x, padding_mask, /*attn_mask=*/torch::Tensor(), /*is_causal=*/true);
/// ```
class PrefixAttentionImpl : public torch::nn::Module {
 public:
  /// Wraps `base_layer` and freezes it. ModelError for unsupported attention layouts.
  PrefixAttentionImpl(torch::nn::MultiheadAttention base_layer, PrefixOptions options) : options_(std::move(options)) {
    check<OptionError>(!base_layer.is_empty(), "PrefixAttention: the base torch::nn::MultiheadAttention is empty");
    const auto& mha = base_layer->options;
    check<ModelError>(base_layer->_qkv_same_embed_dim && !mha.add_bias_kv() && !mha.add_zero_attn(),
                      "PrefixAttention: the base MultiheadAttention must have kdim = vdim = embed_dim and no "
                      "add_bias_kv/add_zero_attn");
    const int64_t P = options_.num_virtual_tokens(), E = mha.embed_dim();
    check<OptionError>(P >= 1, "PrefixAttention: PrefixOptions.num_virtual_tokens must be >= 1, got {}", P);
    check<OptionError>(options_.encoder_hidden_size() >= 0,
                       "PrefixAttention: PrefixOptions.encoder_hidden_size must be >= 0, got {}",
                       options_.encoder_hidden_size());
    base = register_module("base", std::move(base_layer));
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    const auto like = base->in_proj_weight.options();
    if (options_.encoder_hidden_size() > 0) {
      prefix_encoder = register_module("prefix_encoder", PrefixEncoder(P, E, options_.encoder_hidden_size(), 2 * E));
      prefix_encoder->to(like.device(), like.dtype().toScalarType());
    } else {
      prefix = register_parameter("prefix", torch::randn({2, heads(), P, E / heads()}, like));
    }
  }

  /// query [Tq, B, E], key/value [Tk, B, E] → [Tq, B, E].
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                        const torch::Tensor& key_padding_mask = {}, const torch::Tensor& attn_mask = {},
                        bool is_causal = false) {
    const int64_t E = base->options.embed_dim();
    for (const auto* t : {&query, &key, &value}) {
      check_dims(*t, 3, "PrefixAttention", "query/key/value [seq, batch, embed]");
      check_last_dim(*t, E, "PrefixAttention");
    }
    auto w = base->in_proj_weight.chunk(3, 0);
    auto b = base->in_proj_bias.defined() ? base->in_proj_bias.chunk(3, 0)
                                          : std::vector<torch::Tensor>{{}, {}, {}};
    torch::Tensor q = split_heads(torch::nn::functional::linear(query, w[0], b[0]));
    torch::Tensor k = split_heads(torch::nn::functional::linear(key, w[1], b[1]));
    torch::Tensor v = split_heads(torch::nn::functional::linear(value, w[2], b[2]));
    torch::Tensor kv = prefixes();
    torch::Tensor out = functional::prefix_attention(q, k, v, kv[0], kv[1],
                                                     functional::PrefixAttentionFuncOptions()
                                                         .key_padding_mask(key_padding_mask)
                                                         .attn_mask(attn_mask)
                                                         .is_causal(is_causal)
                                                         .dropout(base->options.dropout())
                                                         .training(is_training()));
    // [B, H, Tq, d] -> [Tq, B, E]
    out = out.permute({2, 0, 1, 3}).reshape({query.size(0), query.size(1), E});
    return base->out_proj->forward(out);
  }

  /// The key and value prefixes, [2, H, P, E/H], from the parameter or the MLP.
  torch::Tensor prefixes() {
    if (!prefix_encoder) return prefix;
    const int64_t P = options_.num_virtual_tokens(), E = base->options.embed_dim();
    return prefix_encoder->forward().view({P, 2, heads(), E / heads()}).permute({1, 2, 0, 3});
  }

  /// Replaces the reparametrisation MLP by the plain prefixes it produces now
  /// (for saving and inference). A no-op without an MLP.
  void fold_projection() {
    if (!prefix_encoder) return;
    torch::Tensor folded;
    {
      torch::NoGradGuard no_grad;
      folded = prefixes().contiguous().clone();
    }
    unregister_module("prefix_encoder");
    prefix_encoder = nullptr;
    prefix = register_parameter("prefix", folded);
  }

  /// The options it was built with.
  const PrefixOptions& options() const { return options_; }

  /// Prints `peft::PrefixAttention(...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::PrefixAttention(embed_dim=" << base->options.embed_dim() << ", heads=" << heads()
           << ", num_virtual_tokens=" << options_.num_virtual_tokens()
           << (prefix_encoder ? ", projection" : "") << ")";
  }

  /// The frozen attention layer.
  torch::nn::MultiheadAttention base{nullptr};
  /// Trainable key/value prefixes [2, H, P, E/H] (undefined with a prefix_encoder).
  torch::Tensor prefix;
  /// The reparametrisation MLP, until fold_projection() (null without one).
  PrefixEncoder prefix_encoder{nullptr};

 private:
  int64_t heads() const { return base->options.num_heads(); }

  /// [T, B, E] -> [B, H, T, E/H]
  torch::Tensor split_heads(const torch::Tensor& x) const {
    const int64_t T = x.size(0), B = x.size(1), E = x.size(2);
    return x.view({T, B, heads(), E / heads()}).permute({1, 2, 0, 3});
  }

  PrefixOptions options_;
};

/// Holder of PrefixAttentionImpl (see there).
TORCH_MODULE(PrefixAttention);

}  // namespace peft
