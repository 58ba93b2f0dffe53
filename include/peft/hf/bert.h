#pragma once
/// @file
/// BERT and RoBERTa encoders as transformers writes them (modeling_bert.py,
/// modeling_roberta.py) in torch::nn, with HF's parameter names: absolute
/// positions (RoBERTa's counted past the padding index), token types, post-norm
/// layers, the pooler, and the sequence-classification heads. Written with
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

/// The fields of a BERT or RoBERTa config.json that change the math (HF's names and defaults).
struct BertConfig {
  std::string model_type = "bert";  ///< "bert" or "roberta"
  int64_t vocab_size = 30522;       ///< rows of word_embeddings
  int64_t hidden_size = 768;        ///< the residual stream's width
  int64_t num_hidden_layers = 12;   ///< encoder layers
  int64_t num_attention_heads = 12; ///< attention heads
  int64_t intermediate_size = 3072; ///< the feed-forward inner width
  std::string hidden_act = "gelu";  ///< the feed-forward activation
  double hidden_dropout_prob = 0.1;           ///< dropout after embeddings and each sublayer (training mode)
  double attention_probs_dropout_prob = 0.1;  ///< dropout on the attention weights
  double classifier_dropout = -1;   ///< the classification head's dropout (-1: hidden_dropout_prob)
  int64_t max_position_embeddings = 512;      ///< rows of position_embeddings
  int64_t type_vocab_size = 2;      ///< rows of token_type_embeddings
  double layer_norm_eps = 1e-12;    ///< LayerNorm's epsilon
  int64_t pad_token_id = 0;         ///< RoBERTa counts positions from it (padding_idx)
  double initializer_range = 0.02;  ///< std of a new classification head

  /// Reads `config`; FileError for a bad field, ModelError for a setting that changes the math and is not supported.
  static BertConfig from(const PretrainedConfig& config) {
    io::ConfigReader r(config.json, config.source);
    BertConfig c;
    c.model_type = config.model_type;
    c.vocab_size = r.get<int64_t>("vocab_size", 0, true);
    c.hidden_size = r.get<int64_t>("hidden_size", 768);
    c.num_hidden_layers = r.get<int64_t>("num_hidden_layers", 12);
    c.num_attention_heads = r.get<int64_t>("num_attention_heads", 12);
    c.intermediate_size = r.get<int64_t>("intermediate_size", 3072);
    c.hidden_act = detail::checked_activation(r.get<std::string>("hidden_act", "gelu"), config.source);
    c.hidden_dropout_prob = r.get<double>("hidden_dropout_prob", 0.1);
    c.attention_probs_dropout_prob = r.get<double>("attention_probs_dropout_prob", 0.1);
    c.classifier_dropout = r.get<double>("classifier_dropout", -1);
    c.max_position_embeddings = r.get<int64_t>("max_position_embeddings", 512);
    c.type_vocab_size = r.get<int64_t>("type_vocab_size", 2);
    c.layer_norm_eps = r.get<double>("layer_norm_eps", 1e-12);
    c.pad_token_id = r.get<int64_t>("pad_token_id", c.model_type == "roberta" ? 1 : 0);
    c.initializer_range = r.get<double>("initializer_range", 0.02);
    check<FileError>(c.hidden_size > 0 && c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
                     "'{}': inconsistent sizes (hidden_size {} must be a positive multiple of num_attention_heads {})",
                     config.source, c.hidden_size, c.num_attention_heads);
    const std::string positions = r.get<std::string>("position_embedding_type", "absolute");
    check<ModelError>(positions == "absolute", "'{}': position_embedding_type '{}' is not supported (absolute is)",
                      config.source, positions);
    check<ModelError>(!r.get<bool>("is_decoder", false) && !r.get<bool>("add_cross_attention", false),
                      "'{}': {} as a decoder (is_decoder, add_cross_attention) is not supported", config.source,
                      c.model_type);
    return c;
  }
  /// A LayerNorm over hidden_size with config.json's epsilon.
  torch::nn::LayerNorm layer_norm() const {
    return torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden_size}).eps(layer_norm_eps));
  }
};

/// HF's BertEmbeddings / RobertaEmbeddings after the word embeddings: positions,
/// token types, LayerNorm, dropout. (The word embeddings are looked up by BertModel,
/// where prompt tuning's virtual tokens are added, so they take positions as in HF peft.)
class BertEmbeddingsImpl : public torch::nn::Module {
 public:
  /// The tables `c` describes.
  explicit BertEmbeddingsImpl(const BertConfig& c)
      : word_embeddings(register_module("word_embeddings", nn::Embedding(c.vocab_size, c.hidden_size))),
        position_embeddings(register_module("position_embeddings", torch::nn::Embedding(c.max_position_embeddings, c.hidden_size))),
        token_type_embeddings(register_module("token_type_embeddings", torch::nn::Embedding(c.type_vocab_size, c.hidden_size))),
        LayerNorm(register_module("LayerNorm", c.layer_norm())),
        c_(c) {}

  /// words [B, L, hidden] (looked up, virtual tokens first), positions [B or 1, L], token_type_ids [B, L] -> [B, L, hidden].
  torch::Tensor forward(const torch::Tensor& words, const torch::Tensor& positions, const torch::Tensor& token_type_ids) {
    torch::Tensor x = words + token_type_embeddings(token_type_ids) + position_embeddings(positions);
    return torch::dropout(LayerNorm(x), c_.hidden_dropout_prob, is_training());
  }

  /// Positions of the L inputs after `past` earlier ones (an active prefix's P, as HF peft passes it):
  /// past..past+L-1 for BERT; RoBERTa's pad_token_id + past + the count of tokens so far, pads at
  /// pad_token_id (HF's create_position_ids_from_input_ids), or sequential from pad_token_id + 1 when
  /// virtual tokens come first (HF's positions for inputs_embeds). ShapeError past max_position_embeddings.
  torch::Tensor position_ids(const torch::Tensor& input_ids, int64_t L, int64_t past) const {
    const int64_t first = (c_.model_type == "roberta" ? c_.pad_token_id + 1 : 0) + past;
    check<ShapeError>(first + L <= c_.max_position_embeddings,
                      "{}: {} positions (tokens and virtual tokens) from {}, but max_position_embeddings is {}",
                      c_.model_type, L, first, c_.max_position_embeddings);
    torch::Tensor sequential = torch::arange(L, input_ids.options()).unsqueeze(0) + first;
    if (c_.model_type != "roberta" || L != input_ids.size(1)) return sequential;
    torch::Tensor is_token = input_ids.ne(c_.pad_token_id).to(torch::kLong);
    return (torch::cumsum(is_token, 1) + past) * is_token + c_.pad_token_id;
  }

  nn::Embedding word_embeddings;                ///< [vocab, hidden]
  torch::nn::Embedding position_embeddings;     ///< [max_position_embeddings, hidden]
  torch::nn::Embedding token_type_embeddings;   ///< [type_vocab_size, hidden]
  torch::nn::LayerNorm LayerNorm;               ///< after the sum

 private:
  BertConfig c_;
};
TORCH_MODULE(BertEmbeddings);

/// HF's BertSelfAttention (eager, bidirectional). A PrefixSite (prefix tuning).
class BertSelfAttentionImpl : public torch::nn::Module, public nn::PrefixSite {
 public:
  /// The projections `c` describes.
  explicit BertSelfAttentionImpl(const BertConfig& c)
      : PrefixSite(c.num_attention_heads, c.hidden_size / c.num_attention_heads),
        query(register_module("query", nn::Linear(c.hidden_size, c.hidden_size))),
        key(register_module("key", nn::Linear(c.hidden_size, c.hidden_size))),
        value(register_module("value", nn::Linear(c.hidden_size, c.hidden_size))),
        c_(c) {}
  /// x [B, L, hidden], bias [B, 1, 1, L] (0 or the dtype's minimum) -> context [B, L, hidden].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias) {
    const int64_t B = x.size(0), L = x.size(1), H = c_.num_attention_heads, D = c_.hidden_size / H;
    torch::Tensor q = query(x).view({B, L, H, D}).transpose(1, 2);
    torch::Tensor k = key(x).view({B, L, H, D}).transpose(1, 2);
    torch::Tensor v = value(x).view({B, L, H, D}).transpose(1, 2);
    std::tie(k, v) = add_prefix(k, v);
    torch::Tensor w = torch::matmul(q, k.transpose(2, 3)) * std::pow(static_cast<double>(D), -0.5) + extend_mask(bias, 0.0);
    w = torch::dropout(torch::softmax(w, -1), c_.attention_probs_dropout_prob, is_training());
    return torch::matmul(w, v).transpose(1, 2).reshape({B, L, H * D});
  }
  nn::Linear query;  ///< [hidden, hidden]
  nn::Linear key;    ///< [hidden, hidden]
  nn::Linear value;  ///< [hidden, hidden]

 private:
  BertConfig c_;
};
TORCH_MODULE(BertSelfAttention);

/// HF's BertSelfOutput and BertOutput: LayerNorm(dropout(dense(x)) + residual).
class BertOutputImpl : public torch::nn::Module {
 public:
  /// dense: `in` -> hidden_size.
  BertOutputImpl(const BertConfig& c, int64_t in)
      : dense(register_module("dense", nn::Linear(in, c.hidden_size))),
        LayerNorm(register_module("LayerNorm", c.layer_norm())),
        dropout_(c.hidden_dropout_prob) {}
  /// x [B, L, in], residual [B, L, hidden] -> [B, L, hidden].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual) {
    return LayerNorm(torch::dropout(dense(x), dropout_, is_training()) + residual);
  }
  nn::Linear dense;                ///< [hidden, in]
  torch::nn::LayerNorm LayerNorm;  ///< after the residual sum

 private:
  double dropout_;
};
TORCH_MODULE(BertOutput);

/// HF's BertAttention: self-attention and its output. An OutputSite (bottleneck adapters).
class BertAttentionImpl : public torch::nn::Module, public nn::OutputSite {
 public:
  /// The attention `c` describes.
  explicit BertAttentionImpl(const BertConfig& c)
      : OutputSite(c.hidden_size),
        self(register_module("self", BertSelfAttention(c))),
        output(register_module("output", BertOutput(c, c.hidden_size))) {}
  /// x [B, L, hidden], bias [B, 1, 1, L] -> [B, L, hidden].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias) { return adapted_output(output(self(x, bias), x)); }
  BertSelfAttention self;  ///< attention
  BertOutput output;       ///< "attention.output": dense, LayerNorm
};
TORCH_MODULE(BertAttention);

/// HF's BertIntermediate: act(dense(x)).
class BertIntermediateImpl : public torch::nn::Module {
 public:
  /// dense: hidden_size -> intermediate_size.
  explicit BertIntermediateImpl(const BertConfig& c)
      : dense(register_module("dense", nn::Linear(c.hidden_size, c.intermediate_size))), act_(c.hidden_act) {}
  /// x [B, L, hidden] -> [B, L, intermediate].
  torch::Tensor forward(const torch::Tensor& x) { return detail::activation(act_, dense(x)); }
  nn::Linear dense;  ///< [intermediate, hidden]

 private:
  std::string act_;
};
TORCH_MODULE(BertIntermediate);

/// HF's BertLayer (post-norm): attention, then the feed-forward (intermediate, output).
/// The feed-forward is an OutputSite too.
class BertLayerImpl : public torch::nn::Module, public nn::OutputSite, public detail::CheckpointableLayer {
 public:
  /// Layer of `c`.
  explicit BertLayerImpl(const BertConfig& c)
      : OutputSite(c.hidden_size),
        attention(register_module("attention", BertAttention(c))),
        intermediate(register_module("intermediate", BertIntermediate(c))),
        output(register_module("output", BertOutput(c, c.intermediate_size))) {}
  /// x [B, L, hidden], bias [B, 1, 1, L] -> [B, L, hidden].
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& bias) {
    x = attention(x, bias);
    return adapted_output(output(intermediate(x), x));
  }
  /// forward(x, extra[0] = bias).
  torch::Tensor layer_forward(const torch::Tensor& x, const std::vector<torch::Tensor>& extra) override {
    return forward(x, extra[0]);
  }
  /// The layer itself (gradient checkpointing differentiates its parameters).
  torch::nn::Module& layer_module() override { return *this; }
  BertAttention attention;        ///< self-attention block
  BertIntermediate intermediate;  ///< feed-forward up
  BertOutput output;              ///< feed-forward down, LayerNorm
};
TORCH_MODULE(BertLayer);

/// HF's BertEncoder: `layer`.
class BertEncoderImpl : public torch::nn::Module {
 public:
  /// num_hidden_layers layers.
  explicit BertEncoderImpl(const BertConfig& c) : layer(register_module("layer", torch::nn::ModuleList())) {
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layer->push_back(BertLayer(c));
  }
  torch::nn::ModuleList layer;  ///< BertLayer × num_hidden_layers
};
TORCH_MODULE(BertEncoder);

/// HF's BertPooler: tanh(dense(x[:, 0])).
class BertPoolerImpl : public torch::nn::Module {
 public:
  /// dense: hidden -> hidden.
  explicit BertPoolerImpl(const BertConfig& c) : dense(register_module("dense", nn::Linear(c.hidden_size, c.hidden_size))) {}
  /// hidden [B, L, hidden] -> [B, hidden] (the first token's).
  torch::Tensor forward(const torch::Tensor& hidden) { return torch::tanh(dense(hidden.select(1, 0))); }
  nn::Linear dense;  ///< [hidden, hidden]
};
TORCH_MODULE(BertPooler);

/// HF's BertModel / RobertaModel: embeddings, encoder, optional pooler. The PromptSite.
class BertModelImpl : public torch::nn::Module, public nn::PromptSite {
 public:
  /// The encoder `c` describes (random weights until loaded), with a pooler when `add_pooling_layer`.
  BertModelImpl(const BertConfig& c, bool add_pooling_layer)
      : embeddings(register_module("embeddings", BertEmbeddings(c))),
        encoder(register_module("encoder", BertEncoder(c))),
        c_(c) {
    if (add_pooling_layer) pooler = register_module("pooler", BertPooler(c));
  }
  torch::Tensor input_embeddings_weight() override { return embeddings->word_embeddings->weight; }

  /// input_ids [B, T] (int64), attention_mask [B, T] (1 = token; undefined: all), token_type_ids [B, T]
  /// (undefined: zeros) -> last_hidden_state [B, T, hidden].
  torch::Tensor forward(const torch::Tensor& input_ids, torch::Tensor attention_mask = {}, torch::Tensor token_type_ids = {}) {
    check<ShapeError>(input_ids.dim() == 2, "{}: expected input_ids [batch, seq], got {}", c_.model_type,
                      shape_str(input_ids.sizes()));
    if (!attention_mask.defined()) attention_mask = torch::ones_like(input_ids);
    torch::Tensor words = add_prompt(embeddings->word_embeddings(input_ids));
    const int64_t L = words.size(1), P = L - input_ids.size(1);
    token_type_ids = token_type_ids.defined() ? torch::cat({torch::zeros({input_ids.size(0), P}, input_ids.options()), token_type_ids}, 1)
                                              : torch::zeros({input_ids.size(0), L}, input_ids.options());
    const int64_t prefix = encoder->layer->size() == 0 ? 0 : encoder->layer->ptr(0)->as<BertLayerImpl>()->attention->self->prefix_length();
    torch::Tensor x = embeddings(words, embeddings->position_ids(input_ids, L, prefix), token_type_ids);
    const torch::Tensor bias = detail::padding_bias(extend_mask(attention_mask), x.scalar_type());
    const bool recompute = gradient_checkpointing_ && is_training() && torch::GradMode::is_enabled();
    return drop_prompt(detail::run_layers<BertLayerImpl>(encoder->layer, x, {bias}, recompute));
  }
  /// HF's gradient_checkpointing_enable(): each layer is run again in backward (training mode).
  void gradient_checkpointing(bool on = true) { gradient_checkpointing_ = on; }

  BertEmbeddings embeddings;    ///< word, position, token type
  BertEncoder encoder;          ///< the layers
  BertPooler pooler{nullptr};   ///< first token -> [B, hidden] (null without add_pooling_layer)

 private:
  BertConfig c_;
  bool gradient_checkpointing_ = false;
};
TORCH_MODULE(BertModel);

/// HF's BertForSequenceClassification: `bert` (with pooler), dropout, `classifier`.
class BertForSequenceClassificationImpl : public SequenceClassifierImpl {
 public:
  /// The model `c` describes with a `num_labels`-way head (random weights until loaded).
  BertForSequenceClassificationImpl(const BertConfig& c, int64_t num_labels)
      : bert(register_module("bert", BertModel(c, true))),
        classifier(register_module("classifier", nn::Linear(c.hidden_size, num_labels))),
        dropout_(c.classifier_dropout >= 0 ? c.classifier_dropout : c.hidden_dropout_prob) {
    detail::init_head(*classifier, c.initializer_range);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return classifier(torch::dropout(bert->pooler(bert(input_ids, attention_mask)), dropout_, is_training()));
  }
  void gradient_checkpointing(bool on = true) override { bert->gradient_checkpointing(on); }
  BertModel bert;         ///< the encoder
  nn::Linear classifier;  ///< [num_labels, hidden]

 private:
  double dropout_;
};

/// HF's RobertaClassificationHead: out_proj(tanh(dense(x[:, 0]))) with dropout before each.
class RobertaClassificationHeadImpl : public torch::nn::Module {
 public:
  /// dense: hidden -> hidden, out_proj: hidden -> num_labels.
  RobertaClassificationHeadImpl(const BertConfig& c, int64_t num_labels)
      : dense(register_module("dense", nn::Linear(c.hidden_size, c.hidden_size))),
        out_proj(register_module("out_proj", nn::Linear(c.hidden_size, num_labels))),
        dropout_(c.classifier_dropout >= 0 ? c.classifier_dropout : c.hidden_dropout_prob) {}
  /// hidden [B, T, hidden] -> logits [B, num_labels].
  torch::Tensor forward(const torch::Tensor& hidden) {
    torch::Tensor x = torch::tanh(dense(torch::dropout(hidden.select(1, 0), dropout_, is_training())));
    return out_proj(torch::dropout(x, dropout_, is_training()));
  }
  nn::Linear dense;     ///< [hidden, hidden]
  nn::Linear out_proj;  ///< [num_labels, hidden]

 private:
  double dropout_;
};
TORCH_MODULE(RobertaClassificationHead);

/// HF's RobertaForSequenceClassification: `roberta` (no pooler), `classifier`.
class RobertaForSequenceClassificationImpl : public SequenceClassifierImpl {
 public:
  /// The model `c` describes with a `num_labels`-way head (random weights until loaded).
  RobertaForSequenceClassificationImpl(const BertConfig& c, int64_t num_labels)
      : roberta(register_module("roberta", BertModel(c, false))),
        classifier(register_module("classifier", RobertaClassificationHead(c, num_labels))) {
    detail::init_head(*classifier, c.initializer_range);
  }
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {}) override {
    return classifier(roberta(input_ids, attention_mask));
  }
  void gradient_checkpointing(bool on = true) override { roberta->gradient_checkpointing(on); }
  BertModel roberta;                     ///< the encoder
  RobertaClassificationHead classifier;  ///< dense, out_proj
};

}  // namespace hf
}  // namespace peft
