#pragma once
/// @file
/// Prompt tuning on a loaded TorchScript model: k learned vectors prepended to
/// the hidden states where they enter the transformer stack (after embeddings,
/// position embeddings and their norm/dropout), masks that are model inputs
/// extended by k, and the prompt positions dropped again where the stack ends.

#include <peft/jit/attention.h>
#include <peft/jit/inject.h>
#include <peft/prompt/prompt.h>

#include <set>

namespace peft {

/// Prompt tuning for a whole model (HF peft's PROMPT_TUNING).
///
/// ```
/// auto cfg = peft::PromptTuningConfig().num_virtual_tokens(20).prompt_tuning_init_token_ids({464, 3290});
/// ```
struct PromptTuningConfig {
  /// Learned vectors prepended to the input embeddings.
  TORCH_ARG(int64_t, num_virtual_tokens) = 20;
  /// Start from these rows of the frozen input embedding (repeated to fill);
  /// empty: random with the table's scale. HF's TEXT init, after tokenising.
  TORCH_ARG(std::vector<int64_t>, prompt_tuning_init_token_ids) = {};
  /// Width of the hidden states; 0: the input embedding's width.
  TORCH_ARG(int64_t, token_dim) = 0;
  /// Keep the prompt positions in the stack's output instead of dropping them.
  TORCH_ARG(bool, keep_prompt_positions) = false;
};

namespace prompt {

/// TorchScript source of the layer that prepends the prompt (internal).
inline std::string layer_source() {
  return "def forward(self, h: Tensor) -> Tensor:\n"
         "    if not self.active:\n"
         "        return h\n"
         "    p = self.prompt_embeddings.to(h.dtype).unsqueeze(0).expand(h.size(0), -1, -1)\n"
         "    return torch.cat([p, h], 1)\n"
         "def drop(self, h: Tensor) -> Tensor:\n"
         "    if not self.active:\n"
         "        return h\n"
         "    return h.narrow(1, self.num_virtual_tokens, h.size(1) - self.num_virtual_tokens)\n"
         "def mask(self, m: Tensor) -> Tensor:\n"
         "    if not self.active:\n"
         "        return m\n"
         "    ones = torch.ones([m.size(0), self.num_virtual_tokens], dtype=m.dtype, device=m.device)\n"
         "    return torch.cat([ones, m], 1)\n";
}

/// Prompt tuning on the transformer stack of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const PromptTuningConfig& config) {
    const int64_t k = config.num_virtual_tokens();
    check<OptionError>(k >= 1, "PromptTuningConfig.num_virtual_tokens must be >= 1, got {}", k);
    auto blocks = stack_blocks(injection);
    check<ModelError>(!blocks.empty(),
                      "PromptTuningConfig: no transformer stack found (an nn.ModuleList of blocks called in forward "
                      "with the hidden states [batch, seq, dim] first); see docs/export-conventions.md");
    torch::Tensor table = input_embedding(injection);
    const int64_t dim = config.token_dim() > 0 ? config.token_dim() : table.size(1);
    torch::nn::Embedding frozen(table.size(0), table.size(1));
    {
      torch::NoGradGuard no_grad;
      frozen->weight.set_data(table.detach());
    }
    check<OptionError>(dim == table.size(1), "PromptTuningConfig.token_dim {} differs from the input embedding width {}",
                       dim, table.size(1));
    PromptEmbedding native(frozen, PromptOptions(k).init_token_ids(config.prompt_tuning_init_token_ids()));
    injection.add_layer("prompt", "PromptEncoder", {{"prompt_embeddings", native->prompt_embeddings.detach()}},
                        {{"num_virtual_tokens", k}}, layer_source());
    const jit::AdapterLayer layer = injection.layers().back();
    const std::string first = blocks.front(), last = blocks.back();
    injection.inline_all([&](jit::Node* call, const std::string& path) {
      if (call->s(c10::attr::name) != "forward") return;  // a block's helper methods (self.mlp(x)) are not the stack
      if (path == first) {
        jit::Value* h = call->input(1);
        call->replaceInput(1, injection.call(layer, call, {h}, /*after=*/false));
      }
      if (path == last && !config.keep_prompt_positions()) {
        jit::Value* out = call->output();
        jit::Value* dropped = injection.call(layer, call, {out}, /*after=*/true, "drop");
        jit::reroute_uses(out, dropped->node(), dropped);
      }
    });
    extend_mask_inputs(injection, layer);
  }

  std::string method() const override { return "PromptTuning"; }

  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    return {io::plain_entry("prompt_embeddings", layers.front().module.attr("prompt_embeddings").toTensor())};
  }
  /// token_dim as built (the hidden width when the config left it 0).
  void describe(nlohmann::json& config, const std::vector<jit::AdapterLayer>& layers) const override {
    config["token_dim"] = layers.front().module.attr("prompt_embeddings").toTensor().size(1);
  }

 private:
  /// The blocks of the first nn.ModuleList forward calls, in call order.
  static std::vector<std::string> stack_blocks(jit::Injection& injection) {
    std::vector<std::string> blocks;
    jit::inlined_copy(injection.graph(), [&](jit::Node*, const std::string& path) {
      if (!jit::is_stack_block(injection.model(), path) || std::count(blocks.begin(), blocks.end(), path)) return;
      const std::string parent = path.substr(0, path.rfind('.'));
      if (blocks.empty() || blocks.front().substr(0, blocks.front().rfind('.')) == parent) blocks.push_back(path);
    }, jit::Injection::is_peft_call);
    return blocks;
  }

  /// The embedding table applied to the first graph input (the token ids).
  static torch::Tensor input_embedding(jit::Injection& injection) {
    auto scratch = jit::inlined_copy(injection.graph(), nullptr, jit::Injection::is_peft_call);
    jit::Value* ids = scratch->inputs().at(1);
    torch::Tensor table;
    // The ids may be clipped or cast first (input_ids[:, :max_len], .long(), ...).
    auto from_ids = [&](jit::Value* v) {
      static const std::set<c10::Symbol> keeps_tokens{c10::aten::slice, c10::aten::narrow, c10::aten::contiguous,
                                                      c10::aten::to, c10::aten::clone};
      while (v != ids && keeps_tokens.count(v->node()->kind())) v = v->node()->input(0);
      return v == ids;
    };
    jit::for_each_node(scratch->block(), [&](jit::Node* n) {
      if (table.defined() || n->kind() != c10::aten::embedding || !from_ids(n->input(1))) return;
      if (auto attr = jit::attribute_of(n->input(0))) table = jit::base_tensor(injection.model(), attr->first, attr->second);
    });
    check<ModelError>(table.defined(),
                      "PromptTuningConfig: forward's first input is not embedded by an nn.Embedding, so the prompt "
                      "width and init are unknown; see docs/export-conventions.md");
    return table;
  }

  /// Graph inputs named like "attention_mask" ([B, T], 1 = attend) get k visible positions in front.
  static void extend_mask_inputs(jit::Injection& injection, const jit::AdapterLayer& layer) {
    jit::Graph& graph = injection.graph();
    for (size_t i = 1; i < graph.inputs().size(); ++i) {
      jit::Value* input = graph.inputs()[i];
      if (input->debugName().find("mask") == std::string::npos || input->uses().empty()) continue;
      jit::Value* extended = injection.call(layer, graph.block()->nodes().front(), {input}, /*after=*/false, "mask");
      jit::reroute_uses(input, extended->node(), extended);
    }
  }
};

}  // namespace prompt
}  // namespace peft
