#pragma once
/// @file
/// peft::nn::Embedding: torch::nn::Embedding (options, `weight` [num, dim],
/// initialisation, state dict, forward) with adapter slots, so get_peft_model
/// can put LoRA on a model's embedding as HF peft's lora.Embedding does.

#include <peft/core/error.h>
#include <peft/core/merged_guard.h>
#include <peft/nn/slots.h>
#include <torch/torch.h>

#include <ostream>
#include <string>

namespace peft {
namespace nn {

/// What a method attaches to an embedding (a `torch::nn::Cloneable` module in the slot).
class EmbeddingAdapter : public SlotAdapter {
 public:
  /// The lookup y [..., dim] of ids [...] after this adapter.
  virtual torch::Tensor output(const torch::Tensor& ids, const torch::Tensor& y) = 0;
  /// Folds the adapter into the table `weight` [num, dim] in place (no grad).
  virtual void merge(torch::Tensor& weight) = 0;
  /// Undoes merge() (up to rounding).
  virtual void unmerge(torch::Tensor& weight) = 0;
};

/// torch::nn::Embedding with adapter slots: same options, parameter (`weight`
/// [num_embeddings, embedding_dim], N(0, 1) with the padding row zero), state
/// dict and forward while no adapter is attached.
class EmbeddingImpl : public torch::nn::Cloneable<EmbeddingImpl>, public AdapterHost {
 public:
  /// As torch::nn::Embedding(num_embeddings, embedding_dim).
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingImpl(torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}
  /// As torch::nn::Embedding(options).
  explicit EmbeddingImpl(torch::nn::EmbeddingOptions options_) : options(std::move(options_)) { reset(); }

  /// The table as torch::nn::Embedding creates it; adapters again (for clone()).
  void reset() override {
    torch::nn::Embedding plain(options);  // its checks and initialisation, then its table
    options = plain->options;
    weight = register_parameter("weight", plain->weight.detach());
    slots_.recreate(*this);
  }

  /// ids [...] (integer) -> [..., dim]: the lookup, then the active adapters. In
  /// training mode with a merged adapter, backward throws ModelError (unmerge first).
  torch::Tensor forward(const torch::Tensor& ids) {
    check<ShapeError>(!ids.is_floating_point(), "peft::nn::Embedding: expected integer token ids, got {}",
                      std::string(c10::toString(ids.scalar_type())));
    torch::Tensor y = torch::nn::functional::embedding(ids, weight,
                                                       torch::nn::functional::EmbeddingFuncOptions()
                                                           .padding_idx(options.padding_idx())
                                                           .max_norm(options.max_norm())
                                                           .norm_type(options.norm_type())
                                                           .scale_grad_by_freq(options.scale_grad_by_freq())
                                                           .sparse(options.sparse()));
    for (const auto& s : slots_.all())
      if (s.applies()) y = detail::AdapterSlots::masked(s, s.as<EmbeddingAdapter>().output(ids, y), y);
    if (!slots_.any_merged() || !peft::detail::records_training(is_training())) return y;
    return peft::detail::fail_backward_merged(y, peft::detail::merged_layer_message("peft::nn::Embedding", "its adapter parameters"));
  }

  /// Merges adapter `name` into the table (a no-op when merged or absent).
  void merge_adapter(const std::string& name) override {
    auto* s = slots_.find(name);
    if (!s || s->merged) return;
    torch::NoGradGuard no_grad;
    s->as<EmbeddingAdapter>().merge(weight);
    s->merged = true;
  }
  /// Unmerges every merged adapter, last added first.
  void unmerge_adapters() override {
    torch::NoGradGuard no_grad;
    auto& all = slots_.all();
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->merged) {
        it->as<EmbeddingAdapter>().unmerge(weight);
        it->merged = false;
      }
  }

  /// Prints `peft::nn::Embedding(num_embeddings=.., embedding_dim=.., <adapters>)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::nn::Embedding(num_embeddings=" << options.num_embeddings()
           << ", embedding_dim=" << options.embedding_dim();
    for (const auto& s : slots_.all()) stream << ", " << s.name << (s.merged ? " (merged)" : "");
    stream << ")";
  }

  torch::nn::EmbeddingOptions options;  ///< As torch::nn::Embedding's.
  torch::Tensor weight;                 ///< [num_embeddings, embedding_dim]
};

/// Holder of EmbeddingImpl (see there).
TORCH_MODULE(Embedding);

}  // namespace nn
}  // namespace peft
