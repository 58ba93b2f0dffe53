#pragma once
/// @file
/// peft::generate for the causal LMs of Hugging Face folders (peft::hf::CausalLM):
/// the same options and decoding as for TorchScript models, with a KV cache
/// (peft::hf::KVCache) and HF generate's positions for left-padded batches.
/// Adapters attached by get_peft_model stay active (LoRA and the other layer
/// methods unmerged, prefix tuning per step); prompt tuning runs uncached.

#include <peft/core/error.h>
#include <peft/generation/generate.h>
#include <peft/hf/modeling.h>
#include <peft/native_model.h>
#include <peft/nn/sites.h>
#include <torch/torch.h>

namespace peft {

namespace detail {

/// The longest active prompt of the model's PromptSites (0: none).
inline int64_t active_prompt_length(torch::nn::Module& model) {
  int64_t longest = 0;
  for (const auto& module : model.modules(/*include_self=*/true))
    if (auto* site = dynamic_cast<nn::PromptSite*>(module.get())) longest = std::max(longest, site->prompt_length());
  return longest;
}

/// Whether an active prompt or prefix adds virtual positions to the model's input or attention.
inline bool adds_virtual_positions(torch::nn::Module& model) {
  for (const auto& module : model.modules(/*include_self=*/true)) {
    if (auto* prompt = dynamic_cast<nn::PromptSite*>(module.get()); prompt && prompt->prompt_length() > 0) return true;
    if (auto* prefix = dynamic_cast<nn::PrefixSite*>(module.get()); prefix && prefix->prefix_length() > 0) return true;
  }
  return false;
}

/// Every step runs the whole sequence, at HF generate's positions (none with a prompt or prefix: HF peft ignores them then).
inline NextLogits hf_uncached(hf::CausalLMImpl& model, bool with_positions) {
  return [&model, with_positions](const torch::Tensor& sequences, const torch::Tensor& mask) {
    const torch::Tensor positions = with_positions ? hf::detail::positions_from_mask(mask) : torch::Tensor();
    return model.forward_cached(sequences, mask, positions, nullptr).select(1, -1);
  };
}

/// The first step runs the prompt into a fresh cache; each later one the new token only.
inline NextLogits hf_cached(hf::CausalLMImpl& model, bool with_positions) {
  auto cache = std::make_shared<hf::KVCache>();
  return [&model, cache, with_positions](const torch::Tensor& sequences, const torch::Tensor& mask) {
    const int64_t done = cache->length(), fresh = sequences.size(1) - done;
    const torch::Tensor positions =
        with_positions ? hf::detail::positions_from_mask(mask).narrow(1, done, fresh) : torch::Tensor();
    return model.forward_cached(sequences.narrow(1, done, fresh), mask, positions, cache.get()).select(1, -1);
  };
}

}  // namespace detail

/// Continues `input_ids` [B, T] (int64, left-padded, with `attention_mask` [B, T])
/// by up to max_new_tokens tokens from a peft::hf causal LM. Returns [B, T + N].
/// Positions are HF generate's (cumsum(mask) - 1), so a padded row continues as
/// it would alone; with an active prompt or prefix they are HF peft's (counted
/// from the first column, after the virtual positions). With use_cache each step
/// after the first runs on the new token only (a peft::hf::KVCache); while a
/// prompt-tuning adapter is active, forward re-runs on the whole sequence
/// (virtual tokens are not cached). Eval mode for
/// the call, the module's mode restored after. Errors: as peft::generate's.
///
/// ```
/// auto model = peft::hf::AutoModelForCausalLM::from_pretrained("Qwen2-0.5B");
/// auto batch = peft::left_pad({{9707, 11}, {40}}, /*pad_token_id=*/0);
/// torch::Tensor out = peft::generate(*model, batch.input_ids, batch.attention_mask,
///                                    peft::GenerationOptions().max_new_tokens(20));
/// ```
inline torch::Tensor generate(hf::CausalLMImpl& model, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                              const GenerationOptions& options = {}) {
  const bool was_training = model.is_training();
  model.eval();
  struct Restore {
    hf::CausalLMImpl& m;
    bool training;
    ~Restore() { m.train(training); }
  } restore{model, was_training};
  const bool prompt = detail::active_prompt_length(model) > 0, positions = !detail::adds_virtual_positions(model);
  return detail::decode(options.use_cache() && !prompt ? detail::hf_cached(model, positions) : detail::hf_uncached(model, positions),
                        input_ids, attention_mask, options);
}

/// generate() for a peft::hf causal LM adapted by `model`, with row b of the
/// batch running adapter `adapter_names[b]` alone (`"__base__"`: no adapter),
/// whatever adapters are active (HF peft's `generate(adapter_names=...)`), with
/// the KV cache: each row computes what it would alone in a batch of its own.
/// ModelError when the adapted model is not a peft::hf causal LM; OptionError
/// as sample_adapters() raises it, or when the names do not match the rows.
///
/// ```
/// auto lm = peft::hf::AutoModelForCausalLM::from_pretrained("base");
/// auto model = peft::nn::PeftModel::from_pretrained(lm.ptr(), "adapters/sql", "sql");
/// model.load_adapter("adapters/chat", "chat");
/// auto batch = peft::left_pad({{9707, 11}, {40}, {12, 13}}, 0);
/// auto out = peft::generate(model, batch.input_ids, batch.attention_mask, {}, {"sql", "chat", "__base__"});
/// ```
inline torch::Tensor generate(nn::PeftModel& model, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                              const GenerationOptions& options, const std::vector<std::string>& adapter_names) {
  auto* lm = dynamic_cast<hf::CausalLMImpl*>(model.model().get());
  check<ModelError>(lm != nullptr, "generate: the adapted model is not a peft::hf causal LM");
  detail::check_one_name_per_row(adapter_names, input_ids);
  const auto rows = model.sample_adapters(adapter_names);
  return generate(*lm, input_ids, attention_mask, options);
}

}  // namespace peft
