#pragma once
/// @file
/// Prefix tuning on a loaded TorchScript model: in every attention, learned
/// keys and values [kv_heads, P, head_dim] joined to K and V after the head
/// split (before a grouped-query head repeat), and every mask on the scores
/// extended so the prefix positions are always attended.

#include <peft/jit/attention.h>
#include <peft/jit/inject.h>
#include <peft/prefix/prefix.h>

namespace peft {

/// Prefix tuning for a whole model (HF peft's PREFIX_TUNING).
///
/// ```
/// auto cfg = peft::PrefixTuningConfig().num_virtual_tokens(10).prefix_projection(true).encoder_hidden_size(256);
/// ```
struct PrefixTuningConfig {
  /// Learned key/value positions per layer.
  TORCH_ARG(int64_t, num_virtual_tokens) = 20;
  /// Train the prefixes through Embedding → Linear → Tanh → Linear (Li & Liang).
  TORCH_ARG(bool, prefix_projection) = false;
  /// Width of the reparametrisation MLP's hidden layer.
  TORCH_ARG(int64_t, encoder_hidden_size) = 512;
  /// Width of the reparametrisation's input embedding; 0: kv_heads · head_dim (averaged over layers).
  TORCH_ARG(int64_t, token_dim) = 0;
  /// Key/value heads and head width of every layer; 0: read per layer from the
  /// graph (the head-split view), so layers may differ.
  TORCH_ARG(int64_t, num_key_value_heads) = 0;
  /// See num_key_value_heads.
  TORCH_ARG(int64_t, head_dim) = 0;
};

namespace prefix {

/// TorchScript source of the prefix store shared by every attention layer. The
/// prefixes live as HF peft saves them: [P, Σ 2·kv_heads·head_dim], layer by
/// layer (keys, then values), so layers may differ in head layout.
inline std::string layer_source() {
  return "def prefixes(self) -> Tensor:\n"
         "    if self.use_projection:\n"
         "        return torch.linear(torch.tanh(torch.linear(self.embedding, self.transform_0_weight, "
         "self.transform_0_bias)), self.transform_2_weight, self.transform_2_bias)\n"
         "    return self.prefix\n"
         "def layer(self, i: int) -> Tensor:\n"
         "    h = self.kv_heads[i]\n"
         "    d = self.head_dims[i]\n"
         "    p = self.prefixes().narrow(1, self.offsets[i], 2 * h * d)\n"
         "    return p.reshape([self.num_virtual_tokens, 2, h, d]).permute([1, 2, 0, 3])\n"
         "def keys(self, i: int, k: Tensor) -> Tensor:\n"
         "    if not self.active:\n"
         "        return k\n"
         "    p = self.layer(i)[0].to(k.dtype).unsqueeze(0).expand(k.size(0), -1, -1, -1)\n"
         "    return torch.cat([p, k], 2)\n"
         "def values(self, i: int, v: Tensor) -> Tensor:\n"
         "    if not self.active:\n"
         "        return v\n"
         "    p = self.layer(i)[1].to(v.dtype).unsqueeze(0).expand(v.size(0), -1, -1, -1)\n"
         "    return torch.cat([p, v], 2)\n"
         "def mask(self, m: Tensor, attend: float) -> Tensor:\n"
         "    if not self.active or m.dim() == 0 or m.size(-1) == 1:\n"
         "        return m\n"
         "    sizes = m.size()\n"
         "    sizes[-1] = self.num_virtual_tokens\n"
         "    return torch.cat([torch.full(sizes, attend, dtype=m.dtype, device=m.device), m], -1)\n"
         // scaled_dot_product_attention: a bool mask keeps where true, a float one adds;
         // is_causal is the top-left lower triangle over q.size(-2) x k.size(-2).
         "def sdpa_mask(self, m: Optional[Tensor], causal: bool, q: Tensor, k: Tensor) -> Optional[Tensor]:\n"
         "    if not self.active:\n"
         "        return m\n"
         "    if causal:\n"
         "        m = torch.ones([q.size(-2), k.size(-2)], device=q.device).tril() > 0\n"
         "    if m is None:\n"
         "        return m\n"
         "    return self.mask(m, 0.0 if m.is_floating_point() else 1.0)\n"
         "def sdpa_causal(self, causal: bool) -> bool:\n"
         "    return causal and not self.active\n";
}

/// Prefix tuning on every attention of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const PrefixTuningConfig& config) {
    const int64_t P = config.num_virtual_tokens();
    check<OptionError>(P >= 1, "PrefixTuningConfig.num_virtual_tokens must be >= 1, got {}", P);
    injection.inline_all();
    auto sites = find_sites(injection);
    std::vector<int64_t> heads, dims, offsets;
    int64_t total = 0;  // Σ 2·kv_heads·head_dim
    for (const auto& site : sites) {
      auto [h, d] = head_layout(site, config);
      heads.push_back(h), dims.push_back(d), offsets.push_back(total);
      total += 2 * h * d;
    }
    const int64_t layers = static_cast<int64_t>(sites.size());
    auto like = (*injection.model().parameters().begin()).options();
    const std::vector<std::string> mlp{"embedding", "transform_0_weight", "transform_0_bias", "transform_2_weight",
                                       "transform_2_bias"};
    std::vector<std::pair<std::string, torch::Tensor>> params;
    if (config.prefix_projection()) {
      const int64_t token_dim = config.token_dim() > 0 ? config.token_dim() : total / layers / 2;
      PrefixEncoder encoder(P, token_dim, config.encoder_hidden_size(), total);
      encoder->to(like.device(), like.dtype().toScalarType());
      auto linear = [&](size_t i) { return encoder->transform[i]->as<torch::nn::Linear>(); };
      params = {{mlp[0], encoder->embedding->weight.detach()}, {mlp[1], linear(0)->weight.detach()},
                {mlp[2], linear(0)->bias.detach()},            {mlp[3], linear(2)->weight.detach()},
                {mlp[4], linear(2)->bias.detach()},            {"prefix", torch::empty({0}, like)}};
    } else {
      params = {{"prefix", torch::randn({P, total}, like)}};  // HF: N(0, 1)
      for (const auto& name : mlp) params.emplace_back(name, torch::empty({0}, like));
    }
    injection.add_layer("prefix", "PrefixEncoder", params,
                        {{"num_virtual_tokens", P}, {"num_layers", layers}, {"kv_heads", heads},
                         {"head_dims", dims}, {"offsets", offsets}, {"use_projection", config.prefix_projection()}},
                        layer_source());
    layer_ = injection.layers().back();
    for (const auto& [name, tensor] : params)  // only what the chosen mode uses trains
      if (tensor.numel() == 0) tensor.set_requires_grad(false);
    for (size_t i = 0; i < sites.size(); ++i) attach(injection, sites[i], static_cast<int64_t>(i));
  }

  std::string method() const override { return "PrefixTuning"; }
  jit::CacheSupport cache_support() const override { return jit::CacheSupport::Prefix; }

  /// Stored as HF stores it, [P, layers·2·kv_heads·head_dim]; a projection MLP is saved folded.
  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    torch::jit::Module m = layers.front().module;
    return {{"prompt_embeddings", m.run_method("prefixes").toTensor().detach(), [m](const torch::Tensor& v) mutable {
               check<ModelError>(!m.attr("use_projection").toBool(), "load a prefix adapter without prefix_projection");
               torch::NoGradGuard no_grad;
               m.attr("prefix").toTensor().copy_(v);
             }}};
  }

  /// HF's fields describe one layout for every layer (null where layers differ:
  /// they are read off the graph on load), and the layer count.
  void describe(nlohmann::json& config, const std::vector<jit::AdapterLayer>& layers) const override {
    const auto module = layers.front().module;
    const auto heads = module.attr("kv_heads").toIntVector(), dims = module.attr("head_dims").toIntVector();
    const bool uniform = std::equal(heads.begin() + 1, heads.end(), heads.begin()) &&
                         std::equal(dims.begin() + 1, dims.end(), dims.begin());
    config["token_dim"] = uniform ? nlohmann::json(heads[0] * dims[0]) : nlohmann::json(nullptr);
    config["num_attention_heads"] = uniform ? nlohmann::json(heads[0]) : nlohmann::json(nullptr);
    config["num_layers"] = module.attr("num_layers").toInt();
  }

  /// Replaces the reparametrisation MLP by the prefixes it produces now, for
  /// saving and inference; the MLP's tensors are emptied. A no-op without one.
  void fold_projection() override {
    torch::jit::Module m = layer_.module;
    if (!m.attr("use_projection").toBool()) return;
    torch::Tensor folded;
    {
      torch::NoGradGuard no_grad;
      folded = m.run_method("prefixes").toTensor().contiguous().clone();
    }
    m.setattr("prefix", folded.requires_grad_(true));
    m.setattr("use_projection", false);
    for (const char* name : {"embedding", "transform_0_weight", "transform_0_bias", "transform_2_weight", "transform_2_bias"})
      m.setattr(name, torch::empty({0}, folded.options()).requires_grad_(false));
  }

 private:
  /// The attentions to prefix; an error naming where the search stopped when
  /// there is none, or when one that is clearly an attention was not understood
  /// (prefixing only the others would train a different model than asked).
  static std::vector<jit::AttentionSite> find_sites(jit::Injection& injection) {
    auto found = jit::find_attention(injection.graph(), injection.model());
    for (const auto& miss : found.misses)
      check<ModelError>(!miss.certain, "PrefixTuningConfig: an attention was not understood: {}; see {}",
                        jit::describe(miss), kDocs);
    if (found.sites.empty()) {
      std::string why = "the forward graph has no softmax and no scaled_dot_product_attention";
      if (!found.misses.empty()) why = jit::describe(found.misses.front());
      if (found.misses.size() > 1) why += fmt::format(" (and {} more softmax)", found.misses.size() - 1);
      throw ModelError(fmt::format(
          "PrefixTuningConfig: no attention found (softmax(q·kᵀ ...)·v with the head split visible): {}; see {}", why,
          kDocs));
    }
    return found.sites;
  }

  static constexpr const char* kDocs = "docs/export-conventions.md";

  /// {kv_heads, head_dim} of one attention: from the config if set, else the graph.
  static std::pair<int64_t, int64_t> head_layout(const jit::AttentionSite& site, const PrefixTuningConfig& config) {
    const int64_t heads = config.num_key_value_heads() ? config.num_key_value_heads() : site.kv_heads;
    const int64_t dim = config.head_dim() ? config.head_dim() : site.head_dim;
    check<ModelError>(heads > 0 && dim > 0,
                      "PrefixTuningConfig: the graph does not tell the key/value heads and head width (the head split "
                      "is not a view with constant sizes); set num_key_value_heads and head_dim");
    return {heads, dim};
  }

  /// Joins the prefix to this attention's K and V and extends its masks.
  void attach(jit::Injection& injection, const jit::AttentionSite& site, int64_t index) {
    jit::Graph& graph = injection.graph();
    auto constant = [&](const c10::IValue& v) {
      torch::jit::WithInsertPoint guard(graph.block()->nodes().front());
      return graph.insertConstant(v);
    };
    jit::Value* i = constant(index);
    if (site.sdpa) attach_sdpa_mask(injection, site);
    join(injection, site.key_users, {i, site.key}, "keys");
    join(injection, site.value_users, {i, site.value}, "values");
    for (const auto& [node, input, attend] : site.masks) {
      jit::Value* mask = node->input(input);
      jit::Value* extended = injection.call(layer_, node, {mask, constant(attend)}, /*after=*/false, "mask");
      node->replaceInput(input, extended);
    }
  }

  /// Calls `method(args)` before the first of `users` and makes them read its
  /// result instead of args.back().
  void join(jit::Injection& injection, const std::vector<jit::Node*>& users, const std::vector<jit::Value*>& args,
            const char* method) {
    jit::Node* first = users.front();
    for (jit::Node* u : users)
      if (u->isBefore(first)) first = u;
    jit::Value* joined = injection.call(layer_, first, args, /*after=*/false, method);
    for (jit::Node* u : users) u->replaceInputWith(args.back(), joined);
  }

  /// scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, ..):
  /// its mask gains prefix columns, and is_causal becomes an explicit mask
  /// because every query sees the whole prefix.
  void attach_sdpa_mask(jit::Injection& injection, const jit::AttentionSite& site) {
    jit::Node* n = site.softmax;
    jit::Value* causal = n->input(5);
    jit::Value* mask = injection.call(layer_, n, {n->input(3), causal, n->input(0), site.key}, false, "sdpa_mask");
    n->replaceInput(3, mask);
    n->replaceInput(5, injection.call(layer_, n, {causal}, false, "sdpa_causal"));
  }

  jit::AdapterLayer layer_;
};

}  // namespace prefix
}  // namespace peft
