#pragma once
/// @file
/// The Llama family as transformers writes it (modeling_llama.py, modeling_mistral.py,
/// modeling_qwen2.py) in torch::nn, with HF's parameter names: RMSNorm, RoPE
/// (rope_theta, llama3 scaling), grouped-query attention, SwiGLU, attention and
/// MLP biases, Mistral's sliding window, tied or untied embeddings. Written with
/// peft::nn layers and sites, so every PEFT method attaches by get_peft_model.

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

/// The fields of a Llama-family config.json that change the math (HF's names and defaults).
struct LlamaConfig {
  std::string model_type;  ///< "llama", "mistral" or "qwen2"
  int64_t vocab_size = 32000;           ///< rows of embed_tokens and lm_head
  int64_t hidden_size = 4096;           ///< the residual stream's width
  int64_t intermediate_size = 11008;    ///< the MLP's inner width
  int64_t num_hidden_layers = 32;       ///< decoder layers
  int64_t num_attention_heads = 32;     ///< query heads
  int64_t num_key_value_heads = 32;     ///< key/value heads (GQA when fewer)
  int64_t head_dim = 128;               ///< per head (default hidden_size / num_attention_heads)
  double rms_norm_eps = 1e-6;           ///< RMSNorm's epsilon
  double rope_theta = 10000.0;          ///< RoPE's base
  double attention_dropout = 0.0;       ///< on the attention weights, in training mode
  bool attention_bias = false;          ///< q, k, v (and o, for llama) projections with bias; qwen2: q, k, v always
  bool mlp_bias = false;                ///< gate, up, down projections with bias
  bool tie_word_embeddings = false;     ///< lm_head.weight is embed_tokens.weight
  int64_t sliding_window = 0;           ///< mistral: keys at most this far back (0: none)
  double rope_factor = 0;               ///< llama3 RoPE scaling's factor (0: no scaling)
  double rope_low_freq_factor = 1;      ///< llama3 scaling's low_freq_factor
  double rope_high_freq_factor = 4;     ///< llama3 scaling's high_freq_factor
  double rope_original_max_positions = 8192;  ///< llama3 scaling's original_max_position_embeddings
  int64_t pad_token_id = -1;            ///< sequence classification pools the last other token (-1: none)
  double initializer_range = 0.02;      ///< std of a new classification head

  /// Reads `config`; FileError for a bad field, ModelError for a setting that changes the math and is not supported.
  static LlamaConfig from(const PretrainedConfig& config) {
    io::ConfigReader r(config.json, config.source);
    LlamaConfig c;
    c.model_type = config.model_type;
    c.vocab_size = r.get<int64_t>("vocab_size", 0, true);
    c.hidden_size = r.get<int64_t>("hidden_size", 0, true);
    c.intermediate_size = r.get<int64_t>("intermediate_size", 0, true);
    c.num_hidden_layers = r.get<int64_t>("num_hidden_layers", 0, true);
    c.num_attention_heads = r.get<int64_t>("num_attention_heads", 0, true);
    c.num_key_value_heads = r.get<int64_t>("num_key_value_heads", c.num_attention_heads);
    c.head_dim = r.get<int64_t>("head_dim", c.hidden_size / std::max<int64_t>(1, c.num_attention_heads));
    c.rms_norm_eps = r.get<double>("rms_norm_eps", 1e-6);
    c.attention_dropout = r.get<double>("attention_dropout", 0.0);
    c.attention_bias = c.model_type == "qwen2" || r.get<bool>("attention_bias", false);
    c.mlp_bias = r.get<bool>("mlp_bias", false);
    c.tie_word_embeddings = r.get<bool>("tie_word_embeddings", false);
    c.pad_token_id = r.get<int64_t>("pad_token_id", -1);
    c.initializer_range = r.get<double>("initializer_range", 0.02);
    check<FileError>(c.vocab_size > 0 && c.hidden_size > 0 && c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
                         c.num_attention_heads % c.num_key_value_heads == 0 && c.head_dim > 0 && c.head_dim % 2 == 0,
                     "'{}': inconsistent sizes (num_attention_heads {} must be a multiple of num_key_value_heads {}, "
                     "head_dim {} even and positive)",
                     config.source, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    const std::string act = r.get<std::string>("hidden_act", "silu");
    check<ModelError>(act == "silu", "'{}': hidden_act '{}' is not supported (the Llama family uses 'silu')",
                      config.source, act);
    read_rope(r, c, config.source);
    if (c.model_type == "mistral") c.sliding_window = r.get<int64_t>("sliding_window", 0);
    if (c.model_type == "qwen2")
      check<ModelError>(!r.get<bool>("use_sliding_window", false),
                        "'{}': qwen2 with use_sliding_window true is not supported", config.source);
    return c;
  }

 private:
  /// rope_theta and rope_scaling (transformers < 5), or rope_parameters (5.x).
  static void read_rope(io::ConfigReader& r, LlamaConfig& c, const std::string& source) {
    nlohmann::json scaling = r.get<nlohmann::json>("rope_scaling", nullptr);
    const nlohmann::json parameters = r.get<nlohmann::json>("rope_parameters", nullptr);
    c.rope_theta = r.get<double>("rope_theta", 10000.0);
    if (parameters.is_object()) {
      if (parameters.contains("rope_theta")) c.rope_theta = parameters["rope_theta"].get<double>();
      if (scaling.is_null()) scaling = parameters;
    }
    if (!scaling.is_object()) return;
    const std::string type = scaling.value("rope_type", scaling.value("type", std::string("default")));
    if (type == "default") return;
    check<ModelError>(type == "llama3", "'{}': rope_scaling of type '{}' is not supported (default and llama3 are)",
                      source, type);
    try {
      c.rope_factor = scaling.at("factor").get<double>();
      c.rope_low_freq_factor = scaling.at("low_freq_factor").get<double>();
      c.rope_high_freq_factor = scaling.at("high_freq_factor").get<double>();
      c.rope_original_max_positions = scaling.at("original_max_position_embeddings").get<double>();
    } catch (const nlohmann::json::exception& e) {
      throw FileError("'" + source + "': rope_scaling (llama3) lacks a field or has the wrong type: " + e.what());
    }
  }
};

namespace detail {

/// HF's RoPE inverse frequencies [head_dim / 2] (fp32), with llama3 scaling when set.
inline torch::Tensor rope_inv_freq(const LlamaConfig& c) {
  torch::Tensor inv = 1.0 / torch::pow(c.rope_theta, torch::arange(0, c.head_dim, 2, torch::kLong).to(torch::kFloat) / c.head_dim);
  if (c.rope_factor == 0) return inv;
  const double low_wavelen = c.rope_original_max_positions / c.rope_low_freq_factor;
  const double high_wavelen = c.rope_original_max_positions / c.rope_high_freq_factor;
  torch::Tensor wavelen = 2 * M_PI / inv;
  torch::Tensor llama = torch::where(wavelen > low_wavelen, inv / c.rope_factor, inv);
  torch::Tensor smooth = (c.rope_original_max_positions / wavelen - c.rope_low_freq_factor) /
                         (c.rope_high_freq_factor - c.rope_low_freq_factor);
  torch::Tensor smoothed = (1 - smooth) * llama / c.rope_factor + smooth * llama;
  torch::Tensor medium = (wavelen < high_wavelen).logical_not() & (wavelen > low_wavelen).logical_not();
  return torch::where(medium, smoothed, llama);
}

/// x·rsqrt(mean(x²) + eps) in fp32, back to x's dtype, times `weight` (HF's LlamaRMSNorm).
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t hidden, double eps) : eps(eps), weight(register_parameter("weight", torch::ones({hidden}))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = x.to(torch::kFloat);
    h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return weight * h.to(x.scalar_type());
  }
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

inline torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

}  // namespace detail

/// HF's LlamaAttention (eager): RoPE on q and k, GQA, softmax in fp32. A PrefixSite
/// (prefix tuning) and an OutputSite (bottleneck adapters).
class LlamaAttentionImpl : public torch::nn::Module, public nn::PrefixSite, public nn::OutputSite {
 public:
  /// The projections `c` describes.
  explicit LlamaAttentionImpl(const LlamaConfig& c)
      : PrefixSite(c.num_key_value_heads, c.head_dim), OutputSite(c.hidden_size), c_(c) {
    const bool o_bias = c.attention_bias && c.model_type != "qwen2";
    q_proj = register_module("q_proj", linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.attention_bias));
    k_proj = register_module("k_proj", linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias));
    v_proj = register_module("v_proj", linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias));
    o_proj = register_module("o_proj", linear(c.num_attention_heads * c.head_dim, c.hidden_size, o_bias));
  }
  /// A peft::nn::Linear(in, out) with or without bias.
  static nn::Linear linear(int64_t in, int64_t out, bool bias) {
    return nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
  }

  /// x [B, T, hidden], cos/sin [B or 1, 1, T, head_dim], mask_bias [B, 1, T, S + T] (0 or the dtype's minimum)
  /// -> [B, T, hidden]. With `cache`, the S cached keys and values of layer `index` come first (and T are added).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask_bias, KVCache* cache = nullptr, size_t index = 0) {
    const int64_t B = x.size(0), T = x.size(1), H = c_.num_attention_heads, KV = c_.num_key_value_heads, D = c_.head_dim;
    torch::Tensor q = q_proj(x).view({B, T, H, D}).transpose(1, 2);
    torch::Tensor k = k_proj(x).view({B, T, KV, D}).transpose(1, 2);
    torch::Tensor v = v_proj(x).view({B, T, KV, D}).transpose(1, 2);
    q = q * cos + detail::rotate_half(q) * sin;
    k = k * cos + detail::rotate_half(k) * sin;
    if (cache) std::tie(k, v) = cache->update(index, k, v);
    std::tie(k, v) = add_prefix(k, v);
    const int64_t S = k.size(2);
    k = k.unsqueeze(2).expand({B, KV, H / KV, S, D}).reshape({B, H, S, D});  // HF's repeat_kv
    v = v.unsqueeze(2).expand({B, KV, H / KV, S, D}).reshape({B, H, S, D});
    torch::Tensor w = torch::matmul(q, k.transpose(2, 3)) * std::pow(static_cast<double>(D), -0.5) +
                      extend_mask(mask_bias, 0.0);
    w = torch::softmax(w, -1, torch::kFloat).to(q.scalar_type());
    w = torch::dropout(w, c_.attention_dropout, is_training());
    torch::Tensor a = torch::matmul(w, v).transpose(1, 2).reshape({B, T, H * D});
    return adapted_output(o_proj(a));
  }

  nn::Linear q_proj{nullptr};  ///< [H·head_dim, hidden]
  nn::Linear k_proj{nullptr};  ///< [KV·head_dim, hidden]
  nn::Linear v_proj{nullptr};  ///< [KV·head_dim, hidden]
  nn::Linear o_proj{nullptr};  ///< [hidden, H·head_dim]

 private:
  LlamaConfig c_;
};
TORCH_MODULE(LlamaAttention);

/// HF's LlamaMLP: down(silu(gate(x)) · up(x)). An OutputSite.
class LlamaMLPImpl : public torch::nn::Module, public nn::OutputSite {
 public:
  /// The projections `c` describes.
  explicit LlamaMLPImpl(const LlamaConfig& c) : OutputSite(c.hidden_size) {
    gate_proj = register_module("gate_proj", LlamaAttentionImpl::linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", LlamaAttentionImpl::linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    down_proj = register_module("down_proj", LlamaAttentionImpl::linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
  }
  /// x [B, T, hidden] -> [B, T, hidden].
  torch::Tensor forward(const torch::Tensor& x) { return adapted_output(down_proj(torch::silu(gate_proj(x)) * up_proj(x))); }
  nn::Linear gate_proj{nullptr};  ///< [intermediate, hidden]
  nn::Linear up_proj{nullptr};    ///< [intermediate, hidden]
  nn::Linear down_proj{nullptr};  ///< [hidden, intermediate]
};
TORCH_MODULE(LlamaMLP);

/// HF's LlamaDecoderLayer (pre-norm).
class LlamaDecoderLayerImpl : public torch::nn::Module, public detail::CheckpointableLayer {
 public:
  /// A layer of `c`'s sizes.
  explicit LlamaDecoderLayerImpl(const LlamaConfig& c)
      : input_layernorm(register_module("input_layernorm", detail::RMSNorm(c.hidden_size, c.rms_norm_eps))),
        self_attn(register_module("self_attn", LlamaAttention(c))),
        post_attention_layernorm(register_module("post_attention_layernorm", detail::RMSNorm(c.hidden_size, c.rms_norm_eps))),
        mlp(register_module("mlp", LlamaMLP(c))) {}
  /// See LlamaAttentionImpl::forward.
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& mask_bias,
                        KVCache* cache = nullptr, size_t index = 0) {
    x = x + self_attn(input_layernorm(x), cos, sin, mask_bias, cache, index);
    return x + mlp(post_attention_layernorm(x));
  }
  /// forward(x, extra[0] = cos, extra[1] = sin, extra[2] = mask_bias).
  torch::Tensor layer_forward(const torch::Tensor& x, const std::vector<torch::Tensor>& extra) override {
    return forward(x, extra[0], extra[1], extra[2]);
  }
  /// The layer itself (gradient checkpointing differentiates its parameters).
  torch::nn::Module& layer_module() override { return *this; }
  detail::RMSNorm input_layernorm;           ///< before attention
  LlamaAttention self_attn;                  ///< attention
  detail::RMSNorm post_attention_layernorm;  ///< before the MLP
  LlamaMLP mlp;                              ///< SwiGLU MLP
};
TORCH_MODULE(LlamaDecoderLayer);

/// HF's LlamaModel: embeddings, decoder layers, final norm. The PromptSite.
class LlamaModelImpl : public torch::nn::Module, public nn::PromptSite {
 public:
  /// The decoder `c` describes (random weights until loaded).
  explicit LlamaModelImpl(const LlamaConfig& c)
      : embed_tokens(register_module("embed_tokens", nn::Embedding(c.vocab_size, c.hidden_size))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", detail::RMSNorm(c.hidden_size, c.rms_norm_eps))),
        c_(c),
        inv_freq_(detail::rope_inv_freq(c)) {
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(c));
  }
  torch::Tensor input_embeddings_weight() override { return embed_tokens->weight; }

  /// input_ids [B, T], attention_mask [B, S + T] (1 = token; undefined: all), position_ids [B, T] (undefined:
  /// S..S+T-1, as HF's forward without them; after an active prefix of P, P+S..), `cache` with S positions
  /// (null: none) -> hidden states [B, T, hidden]. Causal (and sliding-window) masking. ModelError for a
  /// cache with an active prompt.
  torch::Tensor forward(const torch::Tensor& input_ids, torch::Tensor attention_mask = {}, const torch::Tensor& position_ids = {},
                        KVCache* cache = nullptr) {
    check<ShapeError>(input_ids.dim() == 2, "LlamaModel: expected input_ids [batch, seq], got {}", shape_str(input_ids.sizes()));
    detail::check_cache_without_prompt(cache, prompt_length(), "LlamaModel");
    const int64_t past = cache ? cache->length() : 0;
    if (!attention_mask.defined()) attention_mask = torch::ones({input_ids.size(0), past + input_ids.size(1)}, input_ids.options());
    torch::Tensor x = add_prompt(embed_tokens(input_ids));
    attention_mask = extend_mask(attention_mask);
    const int64_t T = x.size(1);
    const auto dtype = x.scalar_type();
    // HF peft's prefix tuning passes the prefix as P cached positions: tokens start at position P.
    torch::Tensor positions = detail::positions_or_default(position_ids, past + prefix_length(), T, x.device()).to(torch::kFloat);
    torch::Tensor freqs = positions.unsqueeze(-1) * inv_freq_.to(x.device());  // [B or 1, T, head_dim / 2]
    torch::Tensor emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);
    torch::Tensor cos = emb.cos().to(dtype), sin = emb.sin().to(dtype);
    const torch::Tensor bias = detail::causal_bias(attention_mask, T, c_.sliding_window, dtype);
    if (cache) {
      for (size_t i = 0; i < layers->size(); ++i) x = layers->ptr(i)->as<LlamaDecoderLayerImpl>()->forward(x, cos, sin, bias, cache, i);
      return norm(x);
    }
    const bool recompute = gradient_checkpointing_ && is_training() && torch::GradMode::is_enabled();
    x = detail::run_layers<LlamaDecoderLayerImpl>(layers, x, {cos, sin, bias}, recompute);
    return norm(drop_prompt(x));
  }

  /// The active prefix-tuning prefix's length P (0 without one).
  int64_t prefix_length() const {
    return layers->size() == 0 ? 0 : layers->ptr(0)->as<LlamaDecoderLayerImpl>()->self_attn->prefix_length();
  }

  /// HF's gradient_checkpointing_enable(): in training mode, each decoder layer keeps
  /// only its input and is run again in backward (memory for compute; same gradients).
  void gradient_checkpointing(bool on = true) { gradient_checkpointing_ = on; }

  nn::Embedding embed_tokens;  ///< [vocab, hidden]
  torch::nn::ModuleList layers;  ///< LlamaDecoderLayer × num_hidden_layers
  detail::RMSNorm norm;        ///< the final norm

 private:
  LlamaConfig c_;
  torch::Tensor inv_freq_;  // fp32, recomputed, not a parameter (HF: a non-persistent buffer)
  bool gradient_checkpointing_ = false;
};
TORCH_MODULE(LlamaModel);

/// HF's LlamaForCausalLM (also MistralForCausalLM, Qwen2ForCausalLM): `model`, `lm_head`.
class LlamaForCausalLMImpl : public CausalLMImpl {
 public:
  /// The model `c` describes (random weights until loaded); lm_head tied when `c` says so.
  explicit LlamaForCausalLMImpl(const LlamaConfig& c)
      : model(register_module("model", LlamaModel(c))),
        lm_head(register_module("lm_head", nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)))) {
    if (c.tie_word_embeddings) lm_head->tie_weight(model->embed_tokens->weight);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return lm_head(model(input_ids, attention_mask));
  }
  torch::Tensor hidden_states(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return model(input_ids, attention_mask);
  }
  nn::Linear& output_layer() override { return lm_head; }
  torch::Tensor forward_cached(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                               const torch::Tensor& position_ids, KVCache* cache) override {
    return lm_head(model(input_ids, attention_mask, position_ids, cache));
  }
  void gradient_checkpointing(bool on = true) override { model->gradient_checkpointing(on); }
  LlamaModel model;      ///< the decoder
  nn::Linear lm_head;    ///< [vocab, hidden]; tied: embed_tokens' tensor
};

/// HF's LlamaForSequenceClassification (also Mistral's, Qwen2's): `model`, `score`
/// (no bias) on the last token that is not config.json's pad_token_id.
class LlamaForSequenceClassificationImpl : public SequenceClassifierImpl {
 public:
  /// The model `c` describes with a `num_labels`-way head (random weights until loaded).
  LlamaForSequenceClassificationImpl(const LlamaConfig& c, int64_t num_labels)
      : model(register_module("model", LlamaModel(c))),
        score(register_module("score", nn::Linear(torch::nn::LinearOptions(c.hidden_size, num_labels).bias(false)))),
        pad_token_id_(c.pad_token_id) {
    detail::init_head(*score, c.initializer_range);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return score(detail::last_token(model(input_ids, attention_mask), input_ids, pad_token_id_, "LlamaForSequenceClassification"));
  }
  void gradient_checkpointing(bool on = true) override { model->gradient_checkpointing(on); }
  LlamaModel model;   ///< the decoder
  nn::Linear score;   ///< [num_labels, hidden]

 private:
  int64_t pad_token_id_;
};

}  // namespace hf
}  // namespace peft
