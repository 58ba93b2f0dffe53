#pragma once
/// @file
/// GPT-2 as transformers writes it (modeling_gpt2.py) in torch::nn, with HF's
/// parameter names: learned positions, pre-norm blocks, fused `c_attn` and the
/// Conv1D layers ([in, out] weights), tied `lm_head`. Written with peft::nn layers
/// and sites, so every PEFT method attaches by get_peft_model.

#include <peft/core/error.h>
#include <peft/hf/config.h>
#include <peft/hf/modeling.h>
#include <peft/nn/embedding.h>
#include <peft/nn/linear.h>
#include <peft/nn/sites.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

namespace peft {
namespace hf {

/// The fields of a GPT-2 config.json that change the math (HF's names and defaults).
struct GPT2Config {
  int64_t vocab_size = 50257;        ///< rows of wte and lm_head
  int64_t n_positions = 1024;        ///< rows of wpe: the longest input
  int64_t n_embd = 768;              ///< the residual stream's width
  int64_t n_layer = 12;              ///< blocks
  int64_t n_head = 12;               ///< attention heads
  int64_t n_inner = 0;               ///< the MLP's inner width (0: 4·n_embd)
  std::string activation_function = "gelu_new";  ///< the MLP's activation
  double resid_pdrop = 0.1;          ///< dropout after each sublayer (training mode)
  double embd_pdrop = 0.1;           ///< dropout on the embeddings
  double attn_pdrop = 0.1;           ///< dropout on the attention weights
  double layer_norm_epsilon = 1e-5;  ///< LayerNorm's epsilon
  bool scale_attn_weights = true;    ///< scores / sqrt(head_dim)
  bool scale_attn_by_inverse_layer_idx = false;  ///< scores / (layer index + 1) as well
  bool tie_word_embeddings = true;   ///< lm_head.weight is wte.weight
  int64_t pad_token_id = -1;         ///< sequence classification pools the last other token (-1: none)
  double initializer_range = 0.02;   ///< std of a new classification head

  /// Reads `config`; FileError for a bad field, ModelError for a setting that changes the math and is not supported.
  static GPT2Config from(const PretrainedConfig& config) {
    io::ConfigReader r(config.json, config.source);
    GPT2Config c;
    c.vocab_size = r.get<int64_t>("vocab_size", 50257);
    c.n_positions = r.get<int64_t>("n_positions", 1024);
    c.n_embd = r.get<int64_t>("n_embd", 768);
    c.n_layer = r.get<int64_t>("n_layer", 12);
    c.n_head = r.get<int64_t>("n_head", 12);
    c.n_inner = r.get<int64_t>("n_inner", 0);
    c.activation_function = detail::checked_activation(r.get<std::string>("activation_function", "gelu_new"), config.source);
    c.resid_pdrop = r.get<double>("resid_pdrop", 0.1);
    c.embd_pdrop = r.get<double>("embd_pdrop", 0.1);
    c.attn_pdrop = r.get<double>("attn_pdrop", 0.1);
    c.layer_norm_epsilon = r.get<double>("layer_norm_epsilon", 1e-5);
    c.scale_attn_weights = r.get<bool>("scale_attn_weights", true);
    c.scale_attn_by_inverse_layer_idx = r.get<bool>("scale_attn_by_inverse_layer_idx", false);
    c.tie_word_embeddings = r.get<bool>("tie_word_embeddings", true);
    c.pad_token_id = r.get<int64_t>("pad_token_id", -1);
    c.initializer_range = r.get<double>("initializer_range", 0.02);
    check<FileError>(c.vocab_size > 0 && c.n_embd > 0 && c.n_head > 0 && c.n_embd % c.n_head == 0 && c.n_layer >= 0,
                     "'{}': inconsistent sizes (n_embd {} must be a positive multiple of n_head {})", config.source,
                     c.n_embd, c.n_head);
    check<ModelError>(!r.get<bool>("add_cross_attention", false), "'{}': GPT-2 with add_cross_attention is not supported",
                      config.source);
    check<ModelError>(!r.get<bool>("reorder_and_upcast_attn", false),
                      "'{}': GPT-2 with reorder_and_upcast_attn is not supported", config.source);
    return c;
  }
};

/// HF's GPT2Attention (eager, causal): fused c_attn, softmax in the input's dtype.
/// A PrefixSite (prefix tuning) and an OutputSite (bottleneck adapters).
class GPT2AttentionImpl : public torch::nn::Module, public nn::PrefixSite, public nn::OutputSite {
 public:
  /// The attention of block `layer_idx` (the index matters with scale_attn_by_inverse_layer_idx).
  GPT2AttentionImpl(const GPT2Config& c, int64_t layer_idx)
      : PrefixSite(c.n_head, c.n_embd / c.n_head),
        OutputSite(c.n_embd),
        c_attn(register_module("c_attn", nn::Conv1D(c.n_embd, 3 * c.n_embd))),
        c_proj(register_module("c_proj", nn::Conv1D(c.n_embd, c.n_embd))),
        c_(c) {
    scaling_ = c.scale_attn_weights ? std::pow(static_cast<double>(c.n_embd / c.n_head), -0.5) : 1.0;
    if (c.scale_attn_by_inverse_layer_idx) scaling_ /= static_cast<double>(layer_idx + 1);
  }
  /// x [B, T, n_embd], bias [B, 1, T, S + T] (0 or the dtype's minimum) -> [B, T, n_embd]. With `cache`,
  /// the S cached keys and values of layer `index` come first (and T are added).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias, KVCache* cache = nullptr, size_t index = 0) {
    const int64_t B = x.size(0), T = x.size(1), H = c_.n_head, D = c_.n_embd / c_.n_head;
    auto qkv = c_attn(x).split(c_.n_embd, 2);
    torch::Tensor q = qkv[0].view({B, T, H, D}).transpose(1, 2);
    torch::Tensor k = qkv[1].view({B, T, H, D}).transpose(1, 2);
    torch::Tensor v = qkv[2].view({B, T, H, D}).transpose(1, 2);
    if (cache) std::tie(k, v) = cache->update(index, k, v);
    std::tie(k, v) = add_prefix(k, v);
    torch::Tensor w = torch::matmul(q, k.transpose(-1, -2)) * scaling_ + extend_mask(bias, 0.0);
    w = torch::softmax(w, -1).to(v.scalar_type());
    w = torch::dropout(w, c_.attn_pdrop, is_training());
    torch::Tensor a = torch::matmul(w, v).transpose(1, 2).reshape({B, T, H * D});
    return adapted_output(torch::dropout(c_proj(a), c_.resid_pdrop, is_training()));
  }
  nn::Conv1D c_attn;  ///< [n_embd, 3·n_embd]: q, k, v
  nn::Conv1D c_proj;  ///< [n_embd, n_embd]

 private:
  GPT2Config c_;
  double scaling_;
};
TORCH_MODULE(GPT2Attention);

/// HF's GPT2MLP: c_proj(act(c_fc(x))). An OutputSite.
class GPT2MLPImpl : public torch::nn::Module, public nn::OutputSite {
 public:
  /// The MLP `c` describes.
  explicit GPT2MLPImpl(const GPT2Config& c)
      : OutputSite(c.n_embd),
        c_fc(register_module("c_fc", nn::Conv1D(c.n_embd, c.n_inner > 0 ? c.n_inner : 4 * c.n_embd))),
        c_proj(register_module("c_proj", nn::Conv1D(c.n_inner > 0 ? c.n_inner : 4 * c.n_embd, c.n_embd))),
        c_(c) {}
  /// x [B, T, n_embd] -> [B, T, n_embd].
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = c_proj(detail::activation(c_.activation_function, c_fc(x)));
    return adapted_output(torch::dropout(h, c_.resid_pdrop, is_training()));
  }
  nn::Conv1D c_fc;    ///< [n_embd, inner]
  nn::Conv1D c_proj;  ///< [inner, n_embd]

 private:
  GPT2Config c_;
};
TORCH_MODULE(GPT2MLP);

/// HF's GPT2Block (pre-norm).
class GPT2BlockImpl : public torch::nn::Module, public detail::CheckpointableLayer {
 public:
  /// Block `layer_idx` of `c`.
  GPT2BlockImpl(const GPT2Config& c, int64_t layer_idx)
      : ln_1(register_module("ln_1", layer_norm(c))),
        attn(register_module("attn", GPT2Attention(c, layer_idx))),
        ln_2(register_module("ln_2", layer_norm(c))),
        mlp(register_module("mlp", GPT2MLP(c))) {}
  /// A LayerNorm over n_embd with config.json's epsilon.
  static torch::nn::LayerNorm layer_norm(const GPT2Config& c) {
    return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon));
  }
  /// x [B, T, n_embd], bias [B, 1, T, S + T], cache: see GPT2AttentionImpl::forward -> [B, T, n_embd].
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& bias, KVCache* cache = nullptr, size_t index = 0) {
    x = x + attn(ln_1(x), bias, cache, index);
    return x + mlp(ln_2(x));
  }
  /// forward(x, extra[0] = bias).
  torch::Tensor layer_forward(const torch::Tensor& x, const std::vector<torch::Tensor>& extra) override {
    return forward(x, extra[0]);
  }
  /// The layer itself (gradient checkpointing differentiates its parameters).
  torch::nn::Module& layer_module() override { return *this; }
  torch::nn::LayerNorm ln_1;  ///< before attention
  GPT2Attention attn;         ///< attention
  torch::nn::LayerNorm ln_2;  ///< before the MLP
  GPT2MLP mlp;                ///< MLP
};
TORCH_MODULE(GPT2Block);

/// HF's GPT2Model: wte + wpe, blocks `h`, final `ln_f`. The PromptSite.
class GPT2ModelImpl : public torch::nn::Module, public nn::PromptSite {
 public:
  /// The model `c` describes (random weights until loaded).
  explicit GPT2ModelImpl(const GPT2Config& c)
      : wte(register_module("wte", nn::Embedding(c.vocab_size, c.n_embd))),
        wpe(register_module("wpe", torch::nn::Embedding(c.n_positions, c.n_embd))),
        h(register_module("h", torch::nn::ModuleList())),
        ln_f(register_module("ln_f", GPT2BlockImpl::layer_norm(c))),
        c_(c) {
    for (int64_t i = 0; i < c.n_layer; ++i) h->push_back(GPT2Block(c, i));
  }
  torch::Tensor input_embeddings_weight() override { return wte->weight; }

  /// input_ids [B, T], attention_mask [B, S + T] (1 = token; undefined: all), position_ids [B, T] (undefined:
  /// S..S+T-1, as HF's forward without them; after an active prefix of P, P+S..), `cache` with S positions
  /// (null: none) -> hidden states [B, T, n_embd].
  /// ShapeError when a position passes n_positions; ModelError for a cache with an active prompt.
  torch::Tensor forward(const torch::Tensor& input_ids, torch::Tensor attention_mask = {}, const torch::Tensor& position_ids = {},
                        KVCache* cache = nullptr) {
    check<ShapeError>(input_ids.dim() == 2, "GPT2Model: expected input_ids [batch, seq], got {}", shape_str(input_ids.sizes()));
    detail::check_cache_without_prompt(cache, prompt_length(), "GPT2Model");
    const int64_t past = cache ? cache->length() : 0;
    if (!attention_mask.defined()) attention_mask = torch::ones({input_ids.size(0), past + input_ids.size(1)}, input_ids.options());
    torch::Tensor x = add_prompt(wte(input_ids));  // HF peft: virtual tokens take positions 0..P-1
    // HF peft's prefix tuning passes the prefix as P cached positions: tokens start at position P.
    const torch::Tensor positions = detail::positions_or_default(position_ids, past + prefix_length(), x.size(1), x.device());
    // Default positions are known on the host; only given ones need a look (a device sync).
    const int64_t last = position_ids.defined() ? positions.max().item<int64_t>() : past + prefix_length() + x.size(1) - 1;
    check<ShapeError>(last < c_.n_positions, "GPT2Model: position {} (after cached, prefix and virtual tokens), but n_positions is {}",
                      last, c_.n_positions);
    x = torch::dropout(x + wpe(positions), c_.embd_pdrop, is_training());
    const torch::Tensor bias = detail::causal_bias(extend_mask(attention_mask), x.size(1), 0, x.scalar_type());
    if (cache) {
      for (size_t i = 0; i < h->size(); ++i) x = h->ptr(i)->as<GPT2BlockImpl>()->forward(x, bias, cache, i);
      return ln_f(x);
    }
    const bool recompute = gradient_checkpointing_ && is_training() && torch::GradMode::is_enabled();
    x = detail::run_layers<GPT2BlockImpl>(h, x, {bias}, recompute);
    return ln_f(drop_prompt(x));
  }
  /// The active prefix-tuning prefix's length P (0 without one).
  int64_t prefix_length() const { return h->size() == 0 ? 0 : h->ptr(0)->as<GPT2BlockImpl>()->attn->prefix_length(); }
  /// HF's gradient_checkpointing_enable(): each block is run again in backward (training mode).
  void gradient_checkpointing(bool on = true) { gradient_checkpointing_ = on; }

  nn::Embedding wte;            ///< [vocab, n_embd]
  torch::nn::Embedding wpe;     ///< [n_positions, n_embd]
  torch::nn::ModuleList h;      ///< GPT2Block × n_layer
  torch::nn::LayerNorm ln_f;    ///< the final norm

 private:
  GPT2Config c_;
  bool gradient_checkpointing_ = false;
};
TORCH_MODULE(GPT2Model);

/// HF's GPT2LMHeadModel: `transformer`, `lm_head` (tied to wte unless config.json says otherwise).
class GPT2LMHeadModelImpl : public CausalLMImpl {
 public:
  /// The model `c` describes (random weights until loaded).
  explicit GPT2LMHeadModelImpl(const GPT2Config& c)
      : transformer(register_module("transformer", GPT2Model(c))),
        lm_head(register_module("lm_head", nn::Linear(torch::nn::LinearOptions(c.n_embd, c.vocab_size).bias(false)))) {
    if (c.tie_word_embeddings) lm_head->tie_weight(transformer->wte->weight);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return lm_head(transformer(input_ids, attention_mask));
  }
  torch::Tensor hidden_states(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return transformer(input_ids, attention_mask);
  }
  nn::Linear& output_layer() override { return lm_head; }
  torch::Tensor forward_cached(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                               const torch::Tensor& position_ids, KVCache* cache) override {
    return lm_head(transformer(input_ids, attention_mask, position_ids, cache));
  }
  void gradient_checkpointing(bool on = true) override { transformer->gradient_checkpointing(on); }
  GPT2Model transformer;  ///< the decoder
  nn::Linear lm_head;     ///< [vocab, n_embd]; tied: wte's tensor
};

/// HF's GPT2ForSequenceClassification: `transformer`, `score` (no bias) on the last
/// token that is not config.json's pad_token_id.
class GPT2ForSequenceClassificationImpl : public SequenceClassifierImpl {
 public:
  /// The model `c` describes with a `num_labels`-way head (random weights until loaded).
  GPT2ForSequenceClassificationImpl(const GPT2Config& c, int64_t num_labels)
      : transformer(register_module("transformer", GPT2Model(c))),
        score(register_module("score", nn::Linear(torch::nn::LinearOptions(c.n_embd, num_labels).bias(false)))),
        pad_token_id_(c.pad_token_id) {
    detail::init_head(*score, c.initializer_range);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return score(detail::last_token(transformer(input_ids, attention_mask), input_ids, pad_token_id_,
                                    "GPT2ForSequenceClassification"));
  }
  void gradient_checkpointing(bool on = true) override { transformer->gradient_checkpointing(on); }
  GPT2Model transformer;  ///< the decoder
  nn::Linear score;       ///< [num_labels, n_embd]

 private:
  int64_t pad_token_id_;
};

}  // namespace hf
}  // namespace peft
