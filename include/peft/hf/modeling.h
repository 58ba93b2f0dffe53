#pragma once
/// @file
/// What the peft::hf architectures share: the CausalLM and SequenceClassifier
/// interfaces the Auto classes return, attention masks as transformers builds
/// them, activations by config.json's name, and the pooling of decoder classifiers.

#include <peft/core/error.h>
#include <peft/core/loss.h>
#include <peft/core/rng.h>
#include <peft/hf/config.h>
#include <peft/nn/linear.h>
#include <peft/nn/sites.h>
#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

namespace peft {
namespace hf {

/// Keys and values of the positions seen so far, per decoder layer (HF's DynamicCache):
/// what generation feeds back so each step runs on the new tokens only.
struct KVCache {
  std::vector<torch::Tensor> keys;    ///< per layer [B, kv_heads, S, head_dim], after RoPE (no prefix-tuning positions)
  std::vector<torch::Tensor> values;  ///< per layer [B, kv_heads, S, head_dim]

  /// S: the positions held (0 when empty).
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
  /// Appends layer `layer`'s new k, v [B, kv_heads, t, head_dim]; returns all of them [B, kv_heads, S + t, head_dim].
  std::pair<torch::Tensor, torch::Tensor> update(size_t layer, const torch::Tensor& k, const torch::Tensor& v) {
    if (keys.size() <= layer) keys.resize(layer + 1), values.resize(layer + 1);
    keys[layer] = keys[layer].defined() ? torch::cat({keys[layer], k}, 2) : k;
    values[layer] = values[layer].defined() ? torch::cat({values[layer], v}, 2) : v;
    return {keys[layer], values[layer]};
  }
};

/// A causal LM of any supported architecture: forward gives logits.
class CausalLMImpl : public torch::nn::Module, public nn::PeftTask {
 public:
  /// HF peft's task: adapters load in PeftModelForCausalLM.
  std::string peft_task_type() const override { return "CAUSAL_LM"; }
  /// input_ids [B, T] (int64), attention_mask [B, T] (1 = token; undefined: all) -> logits [B, T, vocab].
  /// Positions 0..T-1 (HF's forward without position_ids).
  virtual torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) = 0;
  /// HF's forward with position_ids and past_key_values: input_ids [B, t] (the new tokens),
  /// attention_mask [B, S + t] (every position so far, 1 = token), position_ids [B, t], `cache`
  /// holding S positions (appended to; null: no cache, S = 0) -> logits [B, t, vocab].
  /// ModelError when a cache is given while a prompt-tuning adapter is active (its virtual
  /// tokens are not cached: run without one).
  virtual torch::Tensor forward_cached(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                       const torch::Tensor& position_ids, KVCache* cache) = 0;
  /// Recompute each decoder layer in backward instead of keeping its activations (training mode).
  virtual void gradient_checkpointing(bool on = true) = 0;
  /// input_ids [B, T], attention_mask [B, T] (undefined: all) -> the decoder's last hidden
  /// states [B, T, hidden] (after its final norm): what forward() feeds to the output layer.
  virtual torch::Tensor hidden_states(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) = 0;
  /// The output layer (`lm_head`, [vocab, hidden]).
  virtual nn::Linear& output_layer() = 0;

  /// HF's `forward(input_ids, attention_mask, labels=labels).loss` without the
  /// [B, T, vocab] logits (peft::causal_lm_loss, chunk by chunk), unless adapters on
  /// the output layer need its full output. labels [B, T] int64 (undefined: input_ids,
  /// with -100 where attention_mask is 0) -> fp32 scalar: the mean over tokens t + 1 of
  /// -log p(labels[t + 1] | ..t), -100 ignored.
  torch::Tensor loss(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}, torch::Tensor labels = {},
                     const LinearCrossEntropyOptions& options = {}) {
    if (!labels.defined())
      labels = attention_mask.defined() ? input_ids.masked_fill(attention_mask.eq(0), options.ignore_index()) : input_ids;
    torch::Tensor hidden = hidden_states(input_ids, attention_mask);
    nn::Linear& head = output_layer();
    const auto& slots = head->slots().all();
    if (std::none_of(slots.begin(), slots.end(), [](const auto& s) { return s.applies(); }) && !head->quantized())
      return causal_lm_loss(hidden, head->weight, head->bias, labels, options);
    const int64_t T = hidden.size(1);
    torch::Tensor logits = head(hidden.narrow(1, 0, T - 1));
    return torch::nn::functional::cross_entropy(
        logits.reshape({-1, logits.size(-1)}).to(torch::kFloat), labels.narrow(1, 1, T - 1).reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(options.ignore_index()));
  }
  /// The config.json it was built from.
  PretrainedConfig config;
};
TORCH_MODULE(CausalLM);

/// A sequence classifier of any supported architecture (HF's *ForSequenceClassification).
class SequenceClassifierImpl : public torch::nn::Module, public nn::PeftTask {
 public:
  /// HF peft's task: adapters load in PeftModelForSequenceClassification.
  std::string peft_task_type() const override { return "SEQ_CLS"; }
  /// input_ids [B, T] (int64), attention_mask [B, T] (1 = token; undefined: all) -> logits [B, num_labels].
  virtual torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) = 0;
  /// Recompute each layer in backward instead of keeping its activations (training mode).
  virtual void gradient_checkpointing(bool on = true) = 0;
  /// The config.json it was built from (num_labels, id2label as loaded).
  PretrainedConfig config;
};
TORCH_MODULE(SequenceClassifier);

/// config.json's num_labels: `requested` when positive, else the length of id2label, else 2 (HF's default).
inline int64_t num_labels_of(const PretrainedConfig& config, int64_t requested) {
  if (requested > 0) return requested;
  const auto& j = config.json;
  if (j.contains("id2label") && j["id2label"].is_object() && !j["id2label"].empty())
    return static_cast<int64_t>(j["id2label"].size());
  if (j.contains("num_labels") && j["num_labels"].is_number_integer()) return j["num_labels"].get<int64_t>();
  return 2;
}

/// Sets config.json's id2label / label2id to `n` labels (LABEL_0, ...), as HF's
/// from_pretrained(num_labels=n) does, unless it already names n labels.
inline void set_num_labels(PretrainedConfig& config, int64_t n) {
  auto& j = config.json;
  if (j.contains("id2label") && j["id2label"].is_object() && static_cast<int64_t>(j["id2label"].size()) == n) return;
  j["id2label"] = nlohmann::json::object();
  j["label2id"] = nlohmann::json::object();
  for (int64_t i = 0; i < n; ++i) {
    j["id2label"][std::to_string(i)] = "LABEL_" + std::to_string(i);
    j["label2id"]["LABEL_" + std::to_string(i)] = i;
  }
}

namespace detail {

/// torch.finfo(dtype).min: transformers' value for masked attention scores.
inline double lowest(torch::ScalarType dtype) {
  return dtype == torch::kBFloat16 ? -3.3895313892515355e38
         : dtype == torch::kHalf   ? -65504.0
                                   : static_cast<double>(std::numeric_limits<float>::lowest());
}

/// Additive attention bias [B, 1, Q, K] in `dtype`: 0 where `allowed` [B or 1, 1, Q, K] (bool), else the dtype's minimum.
inline torch::Tensor additive_bias(const torch::Tensor& allowed, torch::ScalarType dtype) {
  return torch::zeros(allowed.sizes(), torch::TensorOptions().dtype(dtype).device(allowed.device()))
      .masked_fill(allowed.logical_not(), lowest(dtype));
}

/// Causal bias [B, 1, Q, S] for `attention_mask` [B, S] whose last Q positions are the queries:
/// query i sees key j <= i that is a token and, with `window` > 0, j > i - window (Mistral's sliding window).
inline torch::Tensor causal_bias(const torch::Tensor& attention_mask, int64_t queries, int64_t window, torch::ScalarType dtype) {
  const int64_t B = attention_mask.size(0), S = attention_mask.size(1);
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(attention_mask.device());
  torch::Tensor q = torch::arange(S - queries, S, longs).unsqueeze(1);
  torch::Tensor k = torch::arange(S, longs).unsqueeze(0);
  torch::Tensor allowed = k <= q;
  if (window > 0) allowed = allowed & (k > q - window);
  return additive_bias(allowed.view({1, 1, queries, S}) & attention_mask.to(torch::kBool).view({B, 1, 1, S}), dtype);
}

/// HF generate's positions for a left-padded batch: the count of tokens before each one
/// (cumsum(mask) - 1), padding at 1. mask [B, S] -> [B, S] int64.
inline torch::Tensor positions_from_mask(const torch::Tensor& attention_mask) {
  torch::Tensor m = attention_mask.to(torch::kLong);
  return (m.cumsum(1) - 1).masked_fill(m.eq(0), 1);
}

/// The positions of a forward: `given` [B, length] when defined, else past..past+length-1 [1, length].
/// ShapeError when `given` has another length (with an active prompt, pass none: HF peft ignores them too).
inline torch::Tensor positions_or_default(const torch::Tensor& given, int64_t past, int64_t length, torch::Device device) {
  if (given.defined()) {
    check<ShapeError>(given.dim() == 2 && given.size(1) == length,
                      "position_ids {} do not cover the {} positions of the input (virtual tokens included)",
                      shape_str(given.sizes()), length);
    return given;
  }
  return torch::arange(past, past + length, torch::TensorOptions().dtype(torch::kLong).device(device)).unsqueeze(0);
}

/// ModelError when `cache` is given while the PromptSite has a prompt (virtual tokens are not cached).
inline void check_cache_without_prompt(const KVCache* cache, int64_t prompt_length, const char* model) {
  check<ModelError>(cache == nullptr || prompt_length == 0,
                    "{}: a KV cache with an active prompt-tuning adapter is not supported (generate runs it uncached)", model);
}

/// Bidirectional (encoder) bias [B, 1, 1, T] for `attention_mask` [B, T].
inline torch::Tensor padding_bias(const torch::Tensor& attention_mask, torch::ScalarType dtype) {
  return additive_bias(attention_mask.to(torch::kBool).view({attention_mask.size(0), 1, 1, attention_mask.size(1)}), dtype);
}

/// transformers' ACT2FN[name] for the activations these architectures use; ModelError naming `source` otherwise.
inline std::string checked_activation(const std::string& name, const std::string& source) {
  static const char* known[] = {"gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh"};
  for (const char* k : known)
    if (name == k) return name;
  throw ModelError(fmt::format("'{}': activation '{}' is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, "
                               "relu, silu, swish, tanh are)",
                               source, name));
}

/// Applies the activation `name` (one checked_activation accepts): gelu is erf's, the *_new/tanh/fast ones tanh's.
inline torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  if (name == "gelu") return torch::gelu(x);
  // HF's NewGELU / FastGELU formula, equal up to rounding: one kernel instead of eight
  // (whose temporaries autograd would keep), which gelu_pytorch_tanh is in HF too.
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") return torch::gelu(x, "tanh");
  if (name == "relu") return torch::relu(x);
  if (name == "tanh") return torch::tanh(x);
  return torch::silu(x);
}

/// hidden [B, T, ·] at each row's last token that is not `pad_token_id` (HF's decoder
/// classifiers: the rightmost non-pad token, so left and right padding both work);
/// without a pad token the last position, for one row only (HF raises otherwise).
inline torch::Tensor last_token(const torch::Tensor& hidden, const torch::Tensor& input_ids, int64_t pad_token_id,
                                const std::string& model) {
  const int64_t B = hidden.size(0), T = hidden.size(1);
  torch::Tensor index;
  if (pad_token_id < 0) {
    check<ShapeError>(B == 1, "{}: a batch of {} needs config.json's pad_token_id to find each row's last token", model, B);
    index = torch::full({1}, T - 1, input_ids.options());
  } else {
    torch::Tensor positions = torch::arange(T, input_ids.options()).unsqueeze(0);
    index = (positions * input_ids.ne(pad_token_id).to(torch::kLong)).argmax(-1);
  }
  return hidden.index({torch::arange(B, input_ids.options()), index});
}

/// A new classification layer's init (HF's _init_weights): weight ~ N(0, std), bias 0.
inline void init_head(torch::nn::Module& head, double std) {
  torch::NoGradGuard no_grad;
  for (auto& p : head.named_parameters()) {
    if (p.key().find("bias") != std::string::npos)
      p.value().zero_();
    else
      p.value().normal_(0.0, std);
  }
}

/// A decoder layer gradient checkpointing can run again: `layer_forward(x, extra)` is its forward.
class CheckpointableLayer {
 public:
  virtual ~CheckpointableLayer() = default;
  /// The layer's output for input `x` and the tensors it shares with the other layers (masks, RoPE tables).
  virtual torch::Tensor layer_forward(const torch::Tensor& x, const std::vector<torch::Tensor>& extra) = 0;
  /// The layer as a module (its trainable parameters get gradients).
  virtual torch::nn::Module& layer_module() = 0;
};

/// Gradient checkpointing of one decoder layer (HF's gradient_checkpointing): the
/// forward keeps no activations, only its input; backward runs the layer again with
/// the random generator of the input's device as it was (same dropout masks) and
/// differentiates that. Gradients reach the input and `params` (the layer's trainable tensors).
struct RecomputedLayer : torch::autograd::Function<RecomputedLayer> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, at::TensorList extra,
                               at::TensorList params, CheckpointableLayer* layer) {
    ctx->saved_data["rng"] = peft::detail::generator_state(x.device());
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["extra"] = static_cast<int64_t>(extra.size());
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    std::vector<torch::Tensor> saved{x};
    saved.insert(saved.end(), extra.begin(), extra.end());
    ctx->save_for_backward(saved);
    return layer->layer_forward(x, extra.vec());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<CheckpointableLayer*>(ctx->saved_data["layer"].toInt());
    const std::vector<torch::Tensor> extra(saved.begin() + 1, saved.end());
    std::vector<torch::Tensor> inputs{saved[0].detach().requires_grad_(true)};
    for (const auto& p : layer->layer_module().parameters())
      if (p.requires_grad()) inputs.push_back(p);
    torch::Tensor y = recompute(ctx, *layer, inputs[0], extra, saved[0].device());
    auto grads = torch::autograd::grad({y}, inputs, {grad[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    check<ModelError>(static_cast<int64_t>(grads.size()) == 1 + ctx->saved_data["params"].toInt(),
                      "gradient checkpointing: the layer's trainable tensors changed between forward and backward");
    torch::autograd::variable_list out{ctx->needs_input_grad(0) ? grads[0] : torch::Tensor()};
    out.resize(1 + extra.size());  // masks and tables: no gradient
    out.insert(out.end(), grads.begin() + 1, grads.end());
    out.push_back(torch::Tensor());  // the layer pointer
    return out;
  }

 private:
  /// The layer's forward again, with the generator state of the first forward, then the current one back.
  static torch::Tensor recompute(torch::autograd::AutogradContext* ctx, CheckpointableLayer& layer, const torch::Tensor& x,
                                 const std::vector<torch::Tensor>& extra, torch::Device device) {
    const peft::detail::ReplayedGenerator replay(device, ctx->saved_data["rng"].toTensor());
    torch::AutoGradMode enable(true);
    return layer.layer_forward(x, extra);
  }
};

/// Runs `layers` (each a CheckpointableLayer) in order on `x`; with `recompute`, each through RecomputedLayer.
template <typename Layer>
torch::Tensor run_layers(torch::nn::ModuleList& layers, torch::Tensor x, const std::vector<torch::Tensor>& extra,
                         bool recompute) {
  for (const auto& module : *layers) {
    auto* layer = module->as<Layer>();
    if (!recompute) {
      x = layer->layer_forward(x, extra);
      continue;
    }
    std::vector<torch::Tensor> params;
    for (const auto& p : layer->parameters())
      if (p.requires_grad()) params.push_back(p);
    x = RecomputedLayer::apply(x, at::TensorList(extra), at::TensorList(params), static_cast<CheckpointableLayer*>(layer));
  }
  return x;
}

}  // namespace detail
}  // namespace hf
}  // namespace peft
