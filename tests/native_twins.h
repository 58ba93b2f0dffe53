#pragma once
// The three fixture architectures of tools/export_fixtures.py written in torch::nn
// with peft::nn layers and the same module names, so the exports' weights load
// by name and the outputs match (the native backend's test models). Each declares
// the sites of peft/nn/sites.h: prompt at the body, prefix in every attention,
// bottleneck adapters after the attention and MLP sublayers.
#include <peft/peft.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

namespace peft_test {
namespace twins {

constexpr int64_t kHidden = 64, kHeads = 4, kLayers = 2, kVocab = 100, kMaxPos = 32, kKvHeads = 2;
constexpr int64_t kHeadDim = kHidden / kHeads;

inline torch::Tensor split_heads(const torch::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}
inline torch::Tensor merge_heads(const torch::Tensor& x) {
  return x.transpose(1, 2).contiguous().view({x.size(0), x.size(2), x.size(1) * x.size(3)});
}
/// scores [B, H, t, P + t] with the future masked; the P prefix positions (site's) stay visible.
inline torch::Tensor causal_scores(const torch::Tensor& scores, int64_t t, peft::nn::PrefixSite& site) {
  auto causal = torch::ones({t, t}, torch::TensorOptions().dtype(torch::kBool).device(scores.device())).tril();
  return scores.masked_fill(site.extend_mask(causal, 1.0).logical_not(), -1e9);
}

// ------------------------------------------------------------------ GPT-2
struct GPT2AttentionImpl : torch::nn::Module, peft::nn::PrefixSite, peft::nn::OutputSite {
  GPT2AttentionImpl()
      : PrefixSite(kHeads, kHeadDim),
        OutputSite(kHidden),
        c_attn(register_module("c_attn", peft::nn::Conv1D(kHidden, 3 * kHidden))),
        c_proj(register_module("c_proj", peft::nn::Conv1D(kHidden, kHidden))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto qkv = c_attn(x).split(kHidden, 2);
    auto q = split_heads(qkv[0], kHeads), k = split_heads(qkv[1], kHeads), v = split_heads(qkv[2], kHeads);
    std::tie(k, v) = add_prefix(k, v);
    auto scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(kHidden / kHeads));
    scores = causal_scores(scores, x.size(1), *this);
    return adapted_output(c_proj(merge_heads(torch::matmul(torch::softmax(scores, -1), v))));
  }
  peft::nn::Conv1D c_attn, c_proj;
};
TORCH_MODULE(GPT2Attention);

struct GPT2MLPImpl : torch::nn::Module, peft::nn::OutputSite {
  GPT2MLPImpl()
      : OutputSite(kHidden),
        c_fc(register_module("c_fc", peft::nn::Conv1D(kHidden, 4 * kHidden))),
        c_proj(register_module("c_proj", peft::nn::Conv1D(4 * kHidden, kHidden))) {}
  torch::Tensor forward(const torch::Tensor& x) { return adapted_output(c_proj(torch::gelu(c_fc(x)))); }
  peft::nn::Conv1D c_fc, c_proj;
};
TORCH_MODULE(GPT2MLP);

struct GPT2BlockImpl : torch::nn::Module {
  GPT2BlockImpl()
      : ln_1(register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kHidden})))),
        attn(register_module("attn", GPT2Attention())),
        ln_2(register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kHidden})))),
        mlp(register_module("mlp", GPT2MLP())) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + attn(ln_1(x));
    return x + mlp(ln_2(x));
  }
  torch::nn::LayerNorm ln_1;
  GPT2Attention attn;
  torch::nn::LayerNorm ln_2;
  GPT2MLP mlp;
};
TORCH_MODULE(GPT2Block);

struct GPT2BodyImpl : torch::nn::Module, peft::nn::PromptSite {
  GPT2BodyImpl()
      : wte(register_module("wte", peft::nn::Embedding(kVocab, kHidden))),
        wpe(register_module("wpe", torch::nn::Embedding(kMaxPos, kHidden))),
        h(register_module("h", torch::nn::ModuleList())),
        ln_f(register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kHidden})))) {
    for (int64_t i = 0; i < kLayers; ++i) h->push_back(GPT2Block());
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = add_prompt(wte(ids) + wpe(torch::arange(ids.size(1), ids.options())).unsqueeze(0));
    for (const auto& block : *h) x = block->as<GPT2BlockImpl>()->forward(x);
    return ln_f(drop_prompt(x));
  }
  torch::Tensor input_embeddings_weight() override { return wte->weight; }
  peft::nn::Embedding wte;
  torch::nn::Embedding wpe;
  torch::nn::ModuleList h;
  torch::nn::LayerNorm ln_f;
};
TORCH_MODULE(GPT2Body);

struct GPT2Impl : torch::nn::Module {
  GPT2Impl()
      : transformer(register_module("transformer", GPT2Body())),
        lm_head(register_module("lm_head", peft::nn::Linear(torch::nn::LinearOptions(kHidden, kVocab).bias(false)))) {}
  torch::Tensor forward(const torch::Tensor& ids) { return lm_head(transformer(ids)); }
  GPT2Body transformer;
  peft::nn::Linear lm_head;
};
TORCH_MODULE(GPT2);

// ------------------------------------------------------------------- BERT
struct BertEmbeddingsImpl : torch::nn::Module {
  BertEmbeddingsImpl()
      : word_embeddings(register_module("word_embeddings", peft::nn::Embedding(kVocab, kHidden))),
        position_embeddings(register_module("position_embeddings", torch::nn::Embedding(kMaxPos, kHidden))),
        token_type_embeddings(register_module("token_type_embeddings", torch::nn::Embedding(2, kHidden))),
        LayerNorm(register_module("LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kHidden}).eps(1e-12)))),
        dropout(register_module("dropout", torch::nn::Dropout(0.1))) {}
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = word_embeddings(ids) + position_embeddings(torch::arange(ids.size(1), ids.options())).unsqueeze(0) +
             token_type_embeddings(torch::zeros_like(ids));
    return dropout(LayerNorm(x));
  }
  peft::nn::Embedding word_embeddings;
  torch::nn::Embedding position_embeddings, token_type_embeddings;
  torch::nn::LayerNorm LayerNorm;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(BertEmbeddings);

struct BertSelfAttentionImpl : torch::nn::Module, peft::nn::PrefixSite {
  BertSelfAttentionImpl()
      : PrefixSite(kHeads, kHeadDim),
        query(register_module("query", peft::nn::Linear(kHidden, kHidden))),
        key(register_module("key", peft::nn::Linear(kHidden, kHidden))),
        value(register_module("value", peft::nn::Linear(kHidden, kHidden))),
        dropout(register_module("dropout", torch::nn::Dropout(0.1))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& additive_mask) {
    auto q = split_heads(query(x), kHeads), k = split_heads(key(x), kHeads), v = split_heads(value(x), kHeads);
    std::tie(k, v) = add_prefix(k, v);
    auto scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(kHeadDim));
    return merge_heads(torch::matmul(dropout(torch::softmax(scores + extend_mask(additive_mask, 0.0), -1)), v));
  }
  peft::nn::Linear query, key, value;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(BertSelfAttention);

struct BertSelfOutputImpl : torch::nn::Module {
  explicit BertSelfOutputImpl(int64_t n_in)
      : dense(register_module("dense", peft::nn::Linear(n_in, kHidden))),
        LayerNorm(register_module("LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kHidden}).eps(1e-12)))),
        dropout(register_module("dropout", torch::nn::Dropout(0.1))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual) {
    return LayerNorm(dropout(dense(x)) + residual);
  }
  peft::nn::Linear dense;
  torch::nn::LayerNorm LayerNorm;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(BertSelfOutput);

struct BertAttentionImpl : torch::nn::Module, peft::nn::OutputSite {
  BertAttentionImpl()
      : OutputSite(kHidden),
        self(register_module("self", BertSelfAttention())), output(register_module("output", BertSelfOutput(kHidden))) {}
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask) { return adapted_output(output(self(x, mask), x)); }
  BertSelfAttention self;
  BertSelfOutput output;
};
TORCH_MODULE(BertAttention);

struct BertIntermediateImpl : torch::nn::Module {
  BertIntermediateImpl() : dense(register_module("dense", peft::nn::Linear(kHidden, 2 * kHidden))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::gelu(dense(x)); }
  peft::nn::Linear dense;
};
TORCH_MODULE(BertIntermediate);

struct BertLayerImpl : torch::nn::Module {
  BertLayerImpl()
      : attention(register_module("attention", BertAttention())),
        intermediate(register_module("intermediate", BertIntermediate())),
        output(register_module("output", BertSelfOutput(2 * kHidden))) {}
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask) {
    x = attention(x, mask);
    return output(intermediate(x), x);
  }
  BertAttention attention;
  BertIntermediate intermediate;
  BertSelfOutput output;
};
TORCH_MODULE(BertLayer);

struct BertEncoderImpl : torch::nn::Module {
  BertEncoderImpl() : layer(register_module("layer", torch::nn::ModuleList())) {
    for (int64_t i = 0; i < kLayers; ++i) layer->push_back(BertLayer());
  }
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask) {
    for (const auto& l : *layer) x = l->as<BertLayerImpl>()->forward(x, mask);
    return x;
  }
  torch::nn::ModuleList layer;
};
TORCH_MODULE(BertEncoder);

struct BertImpl : torch::nn::Module, peft::nn::PromptSite {
  BertImpl() : embeddings(register_module("embeddings", BertEmbeddings())), encoder(register_module("encoder", BertEncoder())) {}
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& attention_mask) {
    auto x = add_prompt(embeddings(ids));
    auto additive = (1.0 - extend_mask(attention_mask).index({torch::indexing::Slice(), torch::indexing::None, torch::indexing::None,
                                                 torch::indexing::Slice()})
                               .to(x.scalar_type())) *
                    -10000.0;
    return drop_prompt(encoder(x, additive));
  }
  torch::Tensor input_embeddings_weight() override { return embeddings->word_embeddings->weight; }
  BertEmbeddings embeddings;
  BertEncoder encoder;
};
TORCH_MODULE(Bert);

// ------------------------------------------------------------------ LLaMA
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl() : weight(register_parameter("weight", torch::ones({kHidden}))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + 1e-6) * weight;
  }
  torch::Tensor weight;
};
TORCH_MODULE(RMSNorm);

inline torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

struct LlamaAttentionImpl : torch::nn::Module, peft::nn::PrefixSite, peft::nn::OutputSite {
  LlamaAttentionImpl()
      : PrefixSite(kKvHeads, kHeadDim),
        OutputSite(kHidden),
        q_proj(register_module("q_proj", linear(kHidden, kHeads * kHeadDim))),
        k_proj(register_module("k_proj", linear(kHidden, kKvHeads * kHeadDim))),
        v_proj(register_module("v_proj", linear(kHidden, kKvHeads * kHeadDim))),
        o_proj(register_module("o_proj", linear(kHeads * kHeadDim, kHidden))),
        inv_freq(register_buffer("inv_freq", torch::zeros({kHeadDim / 2}))) {}
  static peft::nn::Linear linear(int64_t in, int64_t out) {
    return peft::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1);
    auto q = q_proj(x).view({b, t, kHeads, kHeadDim}).transpose(1, 2);
    auto k = k_proj(x).view({b, t, kKvHeads, kHeadDim}).transpose(1, 2);
    auto v = v_proj(x).view({b, t, kKvHeads, kHeadDim}).transpose(1, 2);
    auto positions = torch::arange(t, torch::TensorOptions().device(x.device()).dtype(inv_freq.scalar_type()));
    auto freqs = torch::outer(positions, inv_freq);
    auto emb = torch::cat({freqs, freqs}, -1);
    auto cos = emb.cos().to(x.scalar_type()), sin = emb.sin().to(x.scalar_type());
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    std::tie(k, v) = add_prefix(k, v);
    k = k.repeat_interleave(kHeads / kKvHeads, 1);
    v = v.repeat_interleave(kHeads / kKvHeads, 1);
    auto scores = causal_scores(torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(kHeadDim)), t, *this);
    return adapted_output(o_proj(merge_heads(torch::matmul(torch::softmax(scores, -1), v))));
  }
  peft::nn::Linear q_proj, k_proj, v_proj, o_proj;
  torch::Tensor inv_freq;
};
TORCH_MODULE(LlamaAttention);

struct LlamaMLPImpl : torch::nn::Module, peft::nn::OutputSite {
  LlamaMLPImpl()
      : OutputSite(kHidden),
        gate_proj(register_module("gate_proj", LlamaAttentionImpl::linear(kHidden, 2 * kHidden))),
        up_proj(register_module("up_proj", LlamaAttentionImpl::linear(kHidden, 2 * kHidden))),
        down_proj(register_module("down_proj", LlamaAttentionImpl::linear(2 * kHidden, kHidden))) {}
  torch::Tensor forward(const torch::Tensor& x) { return adapted_output(down_proj(torch::silu(gate_proj(x)) * up_proj(x))); }
  peft::nn::Linear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(LlamaMLP);

struct LlamaDecoderLayerImpl : torch::nn::Module {
  LlamaDecoderLayerImpl()
      : input_layernorm(register_module("input_layernorm", RMSNorm())),
        self_attn(register_module("self_attn", LlamaAttention())),
        post_attention_layernorm(register_module("post_attention_layernorm", RMSNorm())),
        mlp(register_module("mlp", LlamaMLP())) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x + self_attn(input_layernorm(x));
    return x + mlp(post_attention_layernorm(x));
  }
  RMSNorm input_layernorm;
  LlamaAttention self_attn;
  RMSNorm post_attention_layernorm;
  LlamaMLP mlp;
};
TORCH_MODULE(LlamaDecoderLayer);

struct LlamaModelImpl : torch::nn::Module, peft::nn::PromptSite {
  LlamaModelImpl()
      : embed_tokens(register_module("embed_tokens", peft::nn::Embedding(kVocab, kHidden))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module("norm", RMSNorm())) {
    for (int64_t i = 0; i < kLayers; ++i) layers->push_back(LlamaDecoderLayer());
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = add_prompt(embed_tokens(ids));
    for (const auto& l : *layers) x = l->as<LlamaDecoderLayerImpl>()->forward(x);
    return norm(drop_prompt(x));
  }
  torch::Tensor input_embeddings_weight() override { return embed_tokens->weight; }
  peft::nn::Embedding embed_tokens;
  torch::nn::ModuleList layers;
  RMSNorm norm;
};
TORCH_MODULE(LlamaModel);

struct LlamaImpl : torch::nn::Module {
  LlamaImpl() : model(register_module("model", LlamaModel())), lm_head(register_module("lm_head", LlamaAttentionImpl::linear(kHidden, kVocab))) {}
  torch::Tensor forward(const torch::Tensor& ids) { return lm_head(model(ids)); }
  LlamaModel model;
  peft::nn::Linear lm_head;
};
TORCH_MODULE(Llama);

// ---------------------------------------------------------------- loading
/// Copies the TorchScript fixture's parameters and buffers into `native` by name;
/// throws when a name of either is missing in the other.
inline void load_from_export(torch::nn::Module& native, const torch::jit::Module& exported) {
  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> source;
  for (const auto& p : exported.named_parameters()) source[p.name] = p.value;
  for (const auto& b : exported.named_buffers()) source[b.name] = b.value;
  size_t used = 0;
  auto copy = [&](const std::string& name, torch::Tensor& t) {
    auto it = source.find(name);
    if (it == source.end()) throw std::runtime_error("the export has no tensor '" + name + "'");
    t.copy_(it->second);
    ++used;
  };
  for (auto& p : native.named_parameters()) copy(p.key(), p.value());
  for (auto& b : native.named_buffers()) copy(b.key(), b.value());
  if (used != source.size()) throw std::runtime_error("the native twin lacks some of the export's tensors");
}

/// A native twin of fixture `arch` ("gpt2", "bert", "llama") with the export's weights, in eval mode.
inline std::shared_ptr<torch::nn::Module> make(const std::string& arch, const torch::jit::Module& exported) {
  std::shared_ptr<torch::nn::Module> model;
  if (arch == "gpt2") model = GPT2().ptr();
  if (arch == "bert") model = Bert().ptr();
  if (arch == "llama") model = Llama().ptr();
  load_from_export(*model, exported);
  model->eval();
  return model;
}

/// Runs the twin of `arch` on the fixture's inputs.
inline torch::Tensor run(const std::string& arch, torch::nn::Module& model, const std::vector<torch::jit::IValue>& inputs) {
  if (arch == "gpt2") return dynamic_cast<GPT2Impl&>(model).forward(inputs.at(0).toTensor());
  if (arch == "bert") return dynamic_cast<BertImpl&>(model).forward(inputs.at(0).toTensor(), inputs.at(1).toTensor());
  return dynamic_cast<LlamaImpl&>(model).forward(inputs.at(0).toTensor());
}

}  // namespace twins
}  // namespace peft_test
