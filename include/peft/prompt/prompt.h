#pragma once
/// @file
/// Prompt tuning (Lester et al. 2021): learned embeddings prepended to the input.

#include <peft/core/mask.h>
#include <peft/core/shape.h>
#include <torch/torch.h>

#include <ostream>
#include <vector>

namespace peft {

/// Options of peft::PromptEmbedding.
///
/// ```
/// auto opts = peft::PromptOptions(20).init_token_ids({464, 3290, 318});   // from words of the vocabulary
/// ```
struct PromptOptions {
  /// Options with `num_virtual_tokens` learned vectors.
  /* implicit */ PromptOptions(int64_t num_virtual_tokens) : num_virtual_tokens_(num_virtual_tokens) {}

  /// Number k of learned vectors, ≥ 1.
  TORCH_ARG(int64_t, num_virtual_tokens);
  /// Start from these rows of the frozen table, repeated to fill k (HF's TEXT
  /// init). Empty: random, N(0, σ²) with σ the frozen table's standard deviation.
  TORCH_ARG(std::vector<int64_t>, init_token_ids) = {};
};

namespace functional {

/// [P; X]: the prompt [k, D] prepended to every sequence of `embeds` [B, T, D].
inline torch::Tensor prepend_prompt(const torch::Tensor& embeds, const torch::Tensor& prompt) {
  check_dims(embeds, 3, "prepend_prompt", "embeds [batch, seq, dim]");
  check_dims(prompt, 2, "prepend_prompt", "prompt [tokens, dim]");
  check_last_dim(embeds, prompt.size(1), "prepend_prompt");
  return torch::cat({prompt.unsqueeze(0).expand({embeds.size(0), -1, -1}), embeds}, 1);
}

}  // namespace functional

/// A frozen `torch::nn::Embedding` that prepends k learned vectors:
/// ids [B, T] → [B, k + T, D]. Only `prompt_embeddings` [k, D] trains.
///
/// ```
/// peft::PromptEmbedding embed(wte, peft::PromptOptions(20));
/// auto h = embed(input_ids);                              // [B, 20 + T, D]
/// auto mask = embed->extend_attention_mask(attention_mask);   // [B, 20 + T]
/// ```
class PromptEmbeddingImpl : public torch::nn::Module {
 public:
  /// Wraps `base_layer` and freezes it; the prompt starts from init_token_ids' rows or at random.
  PromptEmbeddingImpl(torch::nn::Embedding base_layer, PromptOptions options) : options_(std::move(options)) {
    check<OptionError>(!base_layer.is_empty(), "PromptEmbedding: the base torch::nn::Embedding is empty");
    const int64_t k = options_.num_virtual_tokens();
    check<OptionError>(k >= 1, "PromptEmbedding: PromptOptions.num_virtual_tokens must be >= 1, got {}", k);
    base = register_module("base", std::move(base_layer));
    for (auto& p : base->parameters()) p.set_requires_grad(false);
    prompt_embeddings = register_parameter("prompt_embeddings", initial_prompt());
  }

  /// input_ids [B, T] -> embeddings [B, k + T, D].
  torch::Tensor forward(const torch::Tensor& input_ids) {
    check_dims(input_ids, 2, "PromptEmbedding", "input_ids [batch, seq]");
    return functional::prepend_prompt(base->forward(input_ids), prompt_embeddings);
  }

  /// An HF-style attention mask [B, T] (1 = token) extended to [B, k + T].
  torch::Tensor extend_attention_mask(const torch::Tensor& attention_mask) const {
    return functional::prepend_visible(attention_mask, options_.num_virtual_tokens(), 1);
  }

  /// The options it was built with.
  const PromptOptions& options() const { return options_; }

  /// Prints `peft::PromptEmbedding(...)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::PromptEmbedding(num_virtual_tokens=" << options_.num_virtual_tokens()
           << ", dim=" << base->weight.size(1) << ")";
  }

  /// The frozen base embedding.
  torch::nn::Embedding base{nullptr};
  /// The trainable prompt [k, D].
  torch::Tensor prompt_embeddings;

 private:
  torch::Tensor initial_prompt() const {
    torch::NoGradGuard no_grad;
    const torch::Tensor& table = base->weight;
    const int64_t k = options_.num_virtual_tokens();
    const auto& ids = options_.init_token_ids();
    if (ids.empty()) return torch::randn({k, table.size(1)}, table.options()) * table.std();
    std::vector<int64_t> chosen;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t id = ids[static_cast<size_t>(i) % ids.size()];
      check<OptionError>(id >= 0 && id < table.size(0),
                         "PromptEmbedding: PromptOptions.init_token_ids has id {} outside the vocabulary [0, {})", id,
                         table.size(0));
      chosen.push_back(id);
    }
    return table.index_select(0, torch::tensor(chosen, torch::kLong).to(table.device())).clone();
  }

  PromptOptions options_;
};

/// Holder of PromptEmbeddingImpl (see there).
TORCH_MODULE(PromptEmbedding);

}  // namespace peft
