#pragma once
/// @file
/// Text generation from a TorchScript causal language model, with or without
/// adapters: peft::generate (greedy, temperature, top-k, top-p, repetition
/// penalty, stop tokens, seeded sampling, left-padded batches, KV cache).

#include <peft/core/error.h>
#include <peft/peft_model.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <functional>
#include <limits>
#include <vector>

namespace peft {

/// Options of peft::generate, named as in HF's GenerationConfig.
///
/// ```
/// auto options = peft::GenerationOptions().max_new_tokens(64).do_sample(true).top_p(0.9).seed(42);
/// ```
struct GenerationOptions {
  /// Tokens added to every sequence, at most.
  TORCH_ARG(int64_t, max_new_tokens) = 32;
  /// Sample from the (processed) distribution; false: greedy, the most likely token.
  TORCH_ARG(bool, do_sample) = false;
  /// Divides the logits before sampling (> 0; below 1 sharpens).
  TORCH_ARG(double, temperature) = 1.0;
  /// Samples among the k most likely tokens only (0: all).
  TORCH_ARG(int64_t, top_k) = 0;
  /// Samples among the fewest most likely tokens whose probability reaches p (1: all).
  TORCH_ARG(double, top_p) = 1.0;
  /// Above 1 discourages tokens already in the sequence (the CTRL penalty, as HF applies it).
  TORCH_ARG(double, repetition_penalty) = 1.0;
  /// A sequence ends with any of these; its later positions hold pad_token_id.
  TORCH_ARG(std::vector<int64_t>, stop_tokens) = {};
  /// Fills left padding and the positions after a stop token.
  TORCH_ARG(int64_t, pad_token_id) = 0;
  /// Seed of the sampler: the same seed, model and prompts give the same tokens.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Use the model's forward_cached (docs/export-conventions.md) when it has one.
  TORCH_ARG(bool, use_cache) = true;
  /// Called after every step with the tokens it added, [B] int64 (pad_token_id for a
  /// finished row), before the next step starts: HF's `streamer.put`. Streaming
  /// servers send them on; the model may be changed here (other adapters loaded
  /// or removed) between steps.
  TORCH_ARG(std::function<void(const torch::Tensor&)>, streamer) = nullptr;
  /// Called after every step (after the streamer) with the sequences so far,
  /// [B, T + steps] int64; returns the rows that are done, [B] bool (HF's
  /// StoppingCriteria): they get pad_token_id from then on, and generation ends
  /// when every row is done. E.g. a different token limit per row.
  TORCH_ARG(std::function<torch::Tensor(const torch::Tensor&)>, stopping_criteria) = nullptr;

 public:  // TORCH_ARG leaves the section private
  /// Throws OptionError naming the first option out of range.
  void validate() const {
    check<OptionError>(max_new_tokens_ >= 0, "GenerationOptions.max_new_tokens must be >= 0, got {}", max_new_tokens_);
    check<OptionError>(temperature_ > 0, "GenerationOptions.temperature must be > 0, got {}", temperature_);
    check<OptionError>(top_k_ >= 0, "GenerationOptions.top_k must be >= 0, got {}", top_k_);
    check<OptionError>(top_p_ > 0 && top_p_ <= 1, "GenerationOptions.top_p must be in (0, 1], got {}", top_p_);
    check<OptionError>(repetition_penalty_ > 0, "GenerationOptions.repetition_penalty must be > 0, got {}",
                       repetition_penalty_);
  }
};

/// Token ids and attention mask of a batch of prompts.
///
/// ```
/// peft::PromptBatch batch = peft::left_pad({{1, 2, 3}, {4}}, 0);
/// // batch.input_ids = [[1, 2, 3], [0, 0, 4]], batch.attention_mask = [[1, 1, 1], [0, 0, 1]]
/// ```
struct PromptBatch {
  torch::Tensor input_ids;       ///< [B, T] int64, left-padded
  torch::Tensor attention_mask;  ///< [B, T] int64, 1 = token, 0 = padding
};

/// Prompts of different lengths as one batch, padded on the left so that every
/// prompt ends at the last column, where generation continues.
///
/// ```
/// auto batch = peft::left_pad({{464, 3290}, {15496}}, /*pad_token_id=*/0);
/// ```
inline PromptBatch left_pad(const std::vector<std::vector<int64_t>>& prompts, int64_t pad_token_id) {
  check<ShapeError>(!prompts.empty(), "left_pad: no prompts");
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());
  check<ShapeError>(longest > 0, "left_pad: every prompt is empty");
  const auto B = static_cast<int64_t>(prompts.size()), T = static_cast<int64_t>(longest);
  PromptBatch batch{torch::full({B, T}, pad_token_id, torch::kLong), torch::zeros({B, T}, torch::kLong)};
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[static_cast<size_t>(b)];
    check<ShapeError>(!p.empty(), "left_pad: prompt {} is empty", b);
    const auto n = static_cast<int64_t>(p.size());
    batch.input_ids[b].narrow(0, T - n, n).copy_(torch::tensor(p, torch::kLong));
    batch.attention_mask[b].narrow(0, T - n, n).fill_(1);
  }
  return batch;
}

namespace detail {

/// Logits of the last position [B, V] for `sequences` [B, S] with `mask` [B, S].
using NextLogits = std::function<torch::Tensor(const torch::Tensor& sequences, const torch::Tensor& mask)>;

/// The logits tensor of a model output: the tensor itself, or the first element of a tuple.
inline torch::Tensor logits_of(const c10::IValue& out, const char* method) {
  if (out.isTensor()) return out.toTensor();
  check<ModelError>(out.isTuple() && !out.toTupleRef().elements().empty() && out.toTupleRef().elements()[0].isTensor(),
                    "generate: {} returned neither logits nor a tuple starting with logits", method);
  return out.toTupleRef().elements()[0].toTensor();
}

/// Repetition penalty, then (when sampling) temperature, top-k and top-p, on fp32 scores [B, V].
inline torch::Tensor process_scores(torch::Tensor scores, const torch::Tensor& sequences, const GenerationOptions& o) {
  scores = scores.to(torch::kFloat);
  if (o.repetition_penalty() != 1.0) {
    torch::Tensor seen = scores.gather(1, sequences);
    seen = torch::where(seen < 0, seen * o.repetition_penalty(), seen / o.repetition_penalty());
    scores = scores.scatter(1, sequences, seen);
  }
  if (!o.do_sample()) return scores;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  scores = scores / o.temperature();
  if (o.top_k() > 0 && o.top_k() < scores.size(1)) {
    torch::Tensor kth = std::get<0>(scores.topk(o.top_k(), 1)).narrow(1, o.top_k() - 1, 1);
    scores = scores.masked_fill(scores < kth, minus_inf);
  }
  if (o.top_p() < 1.0) {
    auto [sorted, order] = scores.sort(1, /*descending=*/true);
    torch::Tensor probs = sorted.softmax(1);
    // Drop a token when the more likely ones already reach top_p (the most likely always stays).
    torch::Tensor drop = (probs.cumsum(1) - probs) >= o.top_p();
    scores = scores.scatter(1, order, sorted.masked_fill(drop, minus_inf));
  }
  return scores;
}

/// The decoding loop shared by the cached and the uncached paths.
inline torch::Tensor decode(const NextLogits& next_logits, torch::Tensor sequences, torch::Tensor mask,
                            const GenerationOptions& o) {
  o.validate();
  check<ShapeError>(sequences.dim() == 2 && sequences.size(1) > 0,
                    "generate: input_ids must be [batch, seq] with seq >= 1, got {}", shape_str(sequences.sizes()));
  check<ShapeError>(mask.sizes() == sequences.sizes(), "generate: attention_mask {} must match input_ids {}",
                    shape_str(mask.sizes()), shape_str(sequences.sizes()));
  torch::NoGradGuard no_grad;
  at::Generator generator = at::detail::createCPUGenerator(o.seed());
  const auto device = sequences.device();
  torch::Tensor stop = torch::tensor(o.stop_tokens(), torch::kLong).to(device);
  torch::Tensor finished = torch::zeros({sequences.size(0)}, torch::dtype(torch::kBool).device(device));
  for (int64_t step = 0; step < o.max_new_tokens(); ++step) {
    torch::Tensor scores = process_scores(next_logits(sequences, mask), sequences, o);
    torch::Tensor next = o.do_sample()
                             ? torch::multinomial(scores.softmax(1).cpu(), 1, false, generator).squeeze(1).to(device)
                             : scores.argmax(1);
    next = torch::where(finished, torch::full_like(next, o.pad_token_id()), next);
    sequences = torch::cat({sequences, next.unsqueeze(1)}, 1);
    mask = torch::cat({mask, torch::ones({mask.size(0), 1}, mask.options())}, 1);
    if (stop.numel() > 0) finished = finished | (next.unsqueeze(1) == stop.unsqueeze(0)).any(1);
    if (o.streamer()) o.streamer()(next);
    if (o.stopping_criteria()) finished = finished | o.stopping_criteria()(sequences).to(device);
    if (finished.all().item<bool>()) break;
  }
  return sequences;
}

/// OptionError unless a mixed-adapter batch names one adapter per row of `input_ids`.
inline void check_one_name_per_row(const std::vector<std::string>& adapter_names, const torch::Tensor& input_ids) {
  check<OptionError>(static_cast<int64_t>(adapter_names.size()) == input_ids.size(0),
                     "generate: {} adapter names for a batch of {} rows", adapter_names.size(), input_ids.size(0));
}

/// Whether forward takes an attention mask after the ids.
inline bool takes_mask(const torch::jit::Module& model) {
  return model.get_method("forward").function().getSchema().arguments().size() >= 3;  // self, ids, mask
}

/// Re-runs forward on the whole sequence at every step.
inline NextLogits uncached(const std::function<c10::IValue(std::vector<c10::IValue>)>& forward, bool with_mask) {
  return [forward, with_mask](const torch::Tensor& sequences, const torch::Tensor& mask) {
    std::vector<c10::IValue> inputs{sequences};
    if (with_mask) inputs.emplace_back(mask);
    torch::Tensor logits = logits_of(forward(std::move(inputs)), "forward");
    return logits.select(1, -1);
  };
}

/// Feeds forward_cached the new tokens only, carrying the keys and values; `past` starts it (a prefix, or empty).
inline NextLogits cached(torch::jit::Module model, std::vector<torch::Tensor> past) {
  return [model, kv = std::move(past), done = int64_t{0}](const torch::Tensor& sequences,
                                                         const torch::Tensor& mask) mutable {
    const int64_t fresh = sequences.size(1) - done;
    c10::IValue out = model.get_method("forward_cached")(
        {sequences.narrow(1, done, fresh), mask, c10::List<torch::Tensor>(kv)});
    check<ModelError>(out.isTuple() && out.toTupleRef().elements().size() == 2,
                      "generate: forward_cached must return (logits, past); see docs/export-conventions.md");
    const auto& items = out.toTupleRef().elements();
    kv = items[1].toTensorVector();
    done = sequences.size(1);
    return items[0].toTensor().select(1, -1);
  };
}

/// Runs `body` in eval mode and restores the module's mode afterwards.
template <typename Body>
auto in_eval_mode(torch::jit::Module& module, Body body) {
  const bool was_training = module.is_training();
  module.eval();
  struct Restore {
    torch::jit::Module& m;
    bool training;
    ~Restore() { m.train(training); }
  } restore{module, was_training};
  return body();
}

}  // namespace detail

/// Continues `input_ids` [B, T] (left-padded, with `attention_mask` [B, T]) by
/// up to max_new_tokens tokens from a TorchScript causal LM whose forward
/// returns logits [B, T, V] (or a tuple starting with them). Returns [B, T + N].
/// With use_cache and a `forward_cached` method (docs/export-conventions.md)
/// each step runs on the new token only; otherwise forward re-runs on the whole
/// sequence.
///
/// ```
/// torch::jit::Module lm = torch::jit::load("lm.pt");
/// auto prompt = peft::left_pad({{72, 101, 108, 108, 111}}, 0);
/// torch::Tensor out = peft::generate(lm, prompt.input_ids, prompt.attention_mask,
///                                    peft::GenerationOptions().max_new_tokens(20));
/// ```
inline torch::Tensor generate(torch::jit::Module& model, const torch::Tensor& input_ids,
                              const torch::Tensor& attention_mask, const GenerationOptions& options = {}) {
  return detail::in_eval_mode(model, [&] {
    const bool cache = options.use_cache() && model.find_method("forward_cached").has_value();
    auto forward = [&model](std::vector<c10::IValue> in) { return model.forward(std::move(in)); };
    return detail::decode(cache ? detail::cached(model, {}) : detail::uncached(forward, detail::takes_mask(model)),
                          input_ids, attention_mask, options);
  });
}

namespace detail {

/// The initial past of an active prefix-tuning adapter: [k0, v0, k1, v1, ...], each [B, kv_heads, P, head_dim].
inline std::vector<torch::Tensor> prefix_past(const PeftModel& model, int64_t batch, const torch::TensorOptions& like) {
  std::vector<torch::Tensor> past;
  for (const auto& layer : model.adapter_layers(model.active_adapters().front())) {
    if (!layer.module.find_method("layer")) continue;
    torch::jit::Module m = layer.module;
    for (int64_t i = 0; i < m.attr("num_layers").toInt(); ++i) {
      torch::Tensor kv = m.run_method("layer", i).toTensor().to(like.dtype());  // [2, H, P, d]
      for (int64_t j = 0; j < 2; ++j) past.push_back(kv[j].unsqueeze(0).expand({batch, -1, -1, -1}).contiguous());
    }
  }
  return past;
}

/// How a PeftModel's active adapters can use forward_cached: merged into the
/// base weights (LoRA, IA3), as the initial past (prefix tuning), or not at all.
enum class CacheRoute { None, Merge, Prefix };

/// Exact copies of the weights of the layers the active adapters target, to put
/// back after a temporary merge (unmerging alone restores them up to rounding).
inline std::vector<std::pair<torch::Tensor, torch::Tensor>> snapshot_targets(PeftModel& model) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> saved;
  for (const auto& name : model.active_adapters())
    for (const auto& layer : model.adapter_layers(name))
      for (const auto& p : jit::submodule(model.module(), layer.target).parameters(/*recurse=*/false))
        saved.emplace_back(p, p.detach().clone());
  return saved;
}

inline CacheRoute cache_route(PeftModel& model) {
  const torch::jit::Module& m = model.module();
  if (!m.find_method("forward_cached") || m.hasattr(jit::Injection::kQuantContainer)) return CacheRoute::None;
  const auto& active = model.active_adapters();
  bool mergeable = true, prefix = false;
  for (const auto& name : active) {
    const jit::CacheSupport support = model.adapter(name).tuner->cache_support();
    prefix = prefix || support == jit::CacheSupport::Prefix;
    mergeable = mergeable && support == jit::CacheSupport::Merge;
  }
  if (prefix && active.size() == 1) return CacheRoute::Prefix;
  return mergeable ? CacheRoute::Merge : CacheRoute::None;
}

}  // namespace detail

/// generate() for an adapted model. With use_cache and a forward_cached export,
/// LoRA and IA3 adapters are merged for the call (and unmerged after), and a
/// prefix-tuning prefix becomes the initial past keys and values; prompt
/// tuning, bottleneck adapters and QLoRA re-run forward at every step. The
/// weights a temporary merge touches are restored exactly afterwards.
///
/// ```
/// peft::PeftModel model = peft::PeftModel::from_pretrained(torch::jit::load("lm.pt"), "adapter");
/// torch::Tensor out = peft::generate(model, ids, mask, peft::GenerationOptions().max_new_tokens(50));
/// ```
inline torch::Tensor generate(PeftModel& model, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                              const GenerationOptions& options = {}) {
  if (model.adapters_disabled()) {  // inside disable_adapter(): the base model alone
    torch::jit::Module base = model.base_model();
    return generate(base, input_ids, attention_mask, options);
  }
  torch::jit::Module& module = model.module();
  return detail::in_eval_mode(module, [&] {
    const auto route = options.use_cache() ? detail::cache_route(model) : detail::CacheRoute::None;
    auto forward = [&model](std::vector<c10::IValue> in) { return model.forward(std::move(in)); };
    if (route == detail::CacheRoute::None)
      return detail::decode(detail::uncached(forward, detail::takes_mask(module)), input_ids, attention_mask, options);
    std::vector<torch::Tensor> past;
    if (route == detail::CacheRoute::Prefix)
      past = detail::prefix_past(model, input_ids.size(0), (*module.parameters().begin()).options());
    const bool merge_now = route == detail::CacheRoute::Merge && !model.merged();
    const auto saved = merge_now ? detail::snapshot_targets(model) : decltype(detail::snapshot_targets(model)){};
    auto restore = [&] {
      if (!merge_now) return;
      model.unmerge_adapter();
      torch::NoGradGuard no_grad;
      for (const auto& [weight, copy] : saved) weight.detach().copy_(copy);
    };
    if (merge_now) model.merge_adapter();
    try {
      torch::Tensor out = detail::decode(detail::cached(module, past), input_ids, attention_mask, options);
      restore();
      return out;
    } catch (...) {
      restore();
      throw;
    }
  });
}

/// generate() with row b of the batch running adapter `adapter_names[b]` alone
/// (`"__base__"`: no adapter), whatever adapters are active: HF peft's
/// `generate(adapter_names=...)`. The TorchScript route re-runs forward on the
/// whole sequence at every step (the adapters live in forward's graph only, not
/// in forward_cached); peft::nn models keep their KV cache (generation/hf.h).
/// OptionError as PeftModel::forward(inputs, adapter_names) raises it, or when
/// the names do not match the batch's rows.
inline torch::Tensor generate(PeftModel& model, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                              const GenerationOptions& options, const std::vector<std::string>& adapter_names) {
  detail::check_one_name_per_row(adapter_names, input_ids);
  torch::jit::Module& module = model.module();
  return detail::in_eval_mode(module, [&] {
    auto forward = [&](std::vector<c10::IValue> in) { return model.forward(std::move(in), adapter_names); };
    return detail::decode(detail::uncached(forward, detail::takes_mask(module)), input_ids, attention_mask, options);
  });
}

}  // namespace peft
