#pragma once
/// @file
/// The building blocks a torch::nn model declares for the methods that attach
/// elsewhere than a linear layer (the native counterpart of
/// docs/export-conventions.md): derive a module from the site and call the
/// site's functions at the point the method needs. Without adapters every call
/// returns its input, so the model computes exactly what it did.
///
/// | site         | derive from it          | call                                        | method        |
/// |--------------|-------------------------|---------------------------------------------|---------------|
/// | OutputSite   | a sublayer (attn, MLP)  | `return adapted_output(h);`                 | bottleneck    |
/// | PromptSite   | the model's body        | `add_prompt(h)`, `extend_mask(m)`, `drop_prompt(h)` | prompt tuning |
/// | PrefixSite   | each attention          | `add_prefix(k, v)`, `extend_mask(m, attend)` | prefix tuning |

#include <peft/core/error.h>
#include <peft/core/shape.h>
#include <peft/nn/slots.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace nn {

// ------------------------------------------------------------ bottleneck
/// The adapter of an OutputSite: the sublayer's output h [..., hidden] -> the adapted output.
class OutputAdapter : public SlotAdapter {
 public:
  /// h after this adapter.
  virtual torch::Tensor output(const torch::Tensor& h) = 0;
  /// The width h must have.
  virtual int64_t hidden() const = 0;
};

/// Where a bottleneck adapter goes: after a sublayer (attention, MLP). Derive
/// the sublayer from it, give its output width, and return `adapted_output(h)`:
///
/// ```
/// struct MlpImpl : torch::nn::Module, peft::nn::OutputSite {
///   MlpImpl() : OutputSite(64) { ... }
///   torch::Tensor forward(const torch::Tensor& x) { return adapted_output(fc2(torch::gelu(fc1(x)))); }
/// };
/// ```
/// BottleneckConfig.target_modules then names the sublayer ("mlp"), as for a TorchScript model.
class OutputSite : public AdapterHost {
 public:
  /// A site whose output is [..., `hidden`].
  explicit OutputSite(int64_t hidden) : hidden_(hidden) {}
  /// The width of the sublayer's output.
  int64_t output_width() const { return hidden_; }

  /// h [..., hidden] with the active adapters applied in the order added (h itself without any).
  torch::Tensor adapted_output(torch::Tensor h) {
    for (const auto& s : slots_.all())
      if (s.applies()) h = detail::AdapterSlots::masked(s, s.as<OutputAdapter>().output(h), h);
    return h;
  }

 private:
  int64_t hidden_;
};

// ---------------------------------------------------------------- task
/// A model that names its HF peft task: saved adapters carry it as adapter_config.json's
/// `task_type`, so HF peft loads them with the task's class (PeftModelForCausalLM, ...),
/// which prompt and prefix tuning need.
class PeftTask {
 public:
  virtual ~PeftTask() = default;
  /// "CAUSAL_LM", "SEQ_CLS", ... (HF peft's TaskType).
  virtual std::string peft_task_type() const = 0;
};

// ---------------------------------------------------------------- prompt
/// The adapter of a PromptSite: k learned vectors [k, dim].
class PromptAdapter : public SlotAdapter {
 public:
  /// The prompt [k, dim].
  virtual torch::Tensor prompt() const = 0;
  /// Whether the stack's output keeps the prompt positions (drop_prompt() returns it whole).
  virtual bool keep_prompt_positions() const = 0;
};

/// Where prompt tuning goes: the model's input. Derive the module that runs the
/// transformer stack from it, return its input embedding from
/// input_embeddings_weight() (the prompt's width and TEXT init), and call:
///
/// ```
/// h = add_prompt(embed(ids));          // [B, T, D] -> [B, k + T, D], after position embeddings
/// mask = extend_mask(attention_mask);  // [B, T] -> [B, k + T], 1 = attend
/// for (auto& block : blocks) h = block(h, mask);
/// h = drop_prompt(h);                  // [B, k + T, D] -> [B, T, D]
/// ```
class PromptSite : public AdapterHost {
 public:
  /// The weight [vocab, dim] of the input embedding (HF's get_input_embeddings()):
  /// the prompt's width, and its rows for prompt_tuning_init_token_ids.
  virtual torch::Tensor input_embeddings_weight() = 0;

  /// h [B, T, D] -> [B, k + T, D] with the active prompt in front (h itself without one).
  torch::Tensor add_prompt(const torch::Tensor& h) {
    const auto* s = active("add_prompt");
    if (!s) return h;
    torch::Tensor p = s->as<PromptAdapter>().prompt();
    check<ShapeError>(h.dim() == 3 && h.size(2) == p.size(1), "PromptSite::add_prompt: expected hidden states [B, T, {}], got {}",
                      p.size(1), shape_str(h.sizes()));
    return torch::cat({p.to(h.scalar_type()).unsqueeze(0).expand({h.size(0), -1, -1}), h}, 1);
  }
  /// A padding mask [B, T] (1 = attend) -> [B, k + T] with the prompt positions attended.
  torch::Tensor extend_mask(const torch::Tensor& mask) {
    const auto* s = active("extend_mask");
    if (!s) return mask;
    const int64_t k = s->as<PromptAdapter>().prompt().size(0);
    return torch::cat({torch::ones({mask.size(0), k}, mask.options()), mask}, 1);
  }
  /// The active prompt's length k (0 without one).
  int64_t prompt_length() const {
    const auto* s = active("prompt_length");
    return s ? s->as<PromptAdapter>().prompt().size(0) : 0;
  }
  /// The stack's output [B, k + T, D] -> [B, T, D] (unless the adapter keeps the prompt positions).
  torch::Tensor drop_prompt(const torch::Tensor& h) {
    const auto* s = active("drop_prompt");
    if (!s || s->as<PromptAdapter>().keep_prompt_positions()) return h;
    const int64_t k = s->as<PromptAdapter>().prompt().size(0);
    return h.narrow(1, k, h.size(1) - k);
  }

 private:
  const detail::AdapterSlots::Slot* active(const char* call) const {
    return slots_.single_active(fmt::format("PromptSite::{}: mixed-adapter batches cannot vary prompts per sample", call));
  }
};

// ---------------------------------------------------------------- prefix
/// The adapter of a PrefixSite: P learned key and value positions of one attention.
class PrefixAdapter : public SlotAdapter {
 public:
  /// Keys and values [2, kv_heads, P, head_dim].
  virtual torch::Tensor key_values() const = 0;
};

/// Where prefix tuning goes: an attention. Derive it from the site with its
/// key/value head count and head width, and call, with keys and values split
/// into heads [B, kv_heads, T, head_dim] (after rotary embeddings, before any
/// grouped-query repeat):
///
/// ```
/// std::tie(k, v) = add_prefix(k, v);                 // [B, kv_heads, P + T, head_dim]
/// scores = scores + extend_mask(additive_mask, 0.0); // masks [..., T] -> [..., P + T]
/// ```
/// extend_mask's `attend` is the value that lets a position through: 0 for an
/// additive mask, 1 / true for a keep mask, 0 / false for a masked_fill mask. A
/// causal mask [T, T] becomes [T, P + T]: every query sees the prefix (HF peft).
class PrefixSite : public AdapterHost {
 public:
  /// An attention with `kv_heads` key/value heads of width `head_dim`.
  PrefixSite(int64_t kv_heads, int64_t head_dim) : kv_heads_(kv_heads), head_dim_(head_dim) {}
  /// Key/value heads.
  int64_t kv_heads() const { return kv_heads_; }
  /// Head width.
  int64_t head_dim() const { return head_dim_; }

  /// k, v [B, kv_heads, T, head_dim] -> [B, kv_heads, P + T, head_dim] with the active prefix in front.
  std::pair<torch::Tensor, torch::Tensor> add_prefix(const torch::Tensor& k, const torch::Tensor& v) {
    const auto* s = active();
    if (!s) return {k, v};
    check<ShapeError>(k.dim() == 4 && k.size(1) == kv_heads_ && k.size(3) == head_dim_ && v.sizes() == k.sizes(),
                      "PrefixSite::add_prefix: expected keys and values [B, {}, T, {}], got {} and {}", kv_heads_,
                      head_dim_, shape_str(k.sizes()), shape_str(v.sizes()));
    torch::Tensor kv = s->as<PrefixAdapter>().key_values();
    auto expanded = [&](int64_t i, const torch::Tensor& like) {
      return kv[i].to(like.scalar_type()).unsqueeze(0).expand({like.size(0), -1, -1, -1});
    };
    return {torch::cat({expanded(0, k), k}, 2), torch::cat({expanded(1, v), v}, 2)};
  }
  /// The active prefix's length P (0 without one).
  int64_t prefix_length() const {
    const auto* s = active();
    return s ? s->as<PrefixAdapter>().key_values().size(2) : 0;
  }
  /// A mask over keys [..., T] -> [..., P + T], `attend` at the prefix positions;
  /// a mask whose key dimension is 1 (broadcast) is returned as it is.
  torch::Tensor extend_mask(const torch::Tensor& mask, double attend) {
    const int64_t P = prefix_length();
    if (P == 0 || mask.dim() == 0 || mask.size(-1) == 1) return mask;
    auto sizes = mask.sizes().vec();
    sizes.back() = P;
    return torch::cat({torch::full(sizes, attend, mask.options()), mask}, -1);
  }

 private:
  const detail::AdapterSlots::Slot* active() const {
    return slots_.single_active("PrefixSite: mixed-adapter batches cannot vary prefixes per sample");
  }

  int64_t kv_heads_, head_dim_;
};

}  // namespace nn
}  // namespace peft
