#pragma once
/// @file
/// HF's Auto classes for model folders: AutoModelForCausalLM::from_pretrained
/// builds the architecture config.json names and loads its checkpoint;
/// save_pretrained writes a folder transformers loads.

#include <peft/hf/config.h>
#include <peft/hf/llama.h>
#include <peft/io/atomic_file.h>

#include <set>
#include <string>

namespace peft {
namespace hf {

/// HF's AutoModelForCausalLM.
///
/// ```
/// auto model = peft::hf::AutoModelForCausalLM::from_pretrained("Qwen2-0.5B", peft::hf::ModelOptions().dtype(torch::kBFloat16));
/// auto peft_model = peft::get_peft_model(model, peft::LoraConfig().r(8).target_modules({"q_proj", "v_proj"}));
/// torch::Tensor logits = model->forward(input_ids, attention_mask);   // [B, T, vocab]
/// ```
struct AutoModelForCausalLM {
  /// The model of folder `dir` (config.json + model.safetensors or its shards) in
  /// options' dtype (default: config.json's torch_dtype) on options' device, in
  /// eval mode, every parameter frozen. ModelError for an unsupported model_type
  /// or setting; FileError for a missing, malformed or mismatched file.
  static CausalLM from_pretrained(const std::filesystem::path& dir, const ModelOptions& options = {}) {
    PretrainedConfig config = AutoConfig::from_pretrained(dir);
    std::shared_ptr<CausalLMImpl> model;
    std::set<std::string> tied;
    if (config.model_type == "llama" || config.model_type == "mistral" || config.model_type == "qwen2") {
      const LlamaConfig c = LlamaConfig::from(config);
      model = std::make_shared<LlamaForCausalLMImpl>(c);
      if (c.tie_word_embeddings) tied.insert("lm_head.weight");
    } else {
      throw ModelError(fmt::format("'{}': model_type '{}' is not supported (llama, mistral, qwen2 are)", config.source,
                                   config.model_type));
    }
    model->config = config;
    model->to(options.device(), options.dtype().value_or(config_dtype(config)));
    assign_checkpoint(*model, load_checkpoint(dir), dir.string(), tied);
    for (auto& p : model->parameters()) p.set_requires_grad(false);
    model->eval();
    return CausalLM(model);
  }
};

/// Writes `model` as an HF folder: config.json (torch_dtype set to the parameters')
/// and model.safetensors (tied tensors once, under the name HF keeps), each
/// written to a temporary file and renamed.
inline void save_pretrained(const CausalLMImpl& model, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  std::map<std::string, torch::Tensor> tensors;
  std::set<const void*> seen;
  torch::ScalarType dtype = torch::kFloat;
  for (const auto& p : model.named_parameters()) {
    if (!seen.insert(p.value().unsafeGetTensorImpl()).second) continue;  // a tied tensor: its first name
    tensors[p.key()] = p.value().detach().cpu().contiguous();
    dtype = p.value().scalar_type();
  }
  nlohmann::json config = model.config.json;
  config["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : "float32";
  io::save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  io::write_file_atomic(dir / "config.json", config.dump(2));
}

}  // namespace hf
}  // namespace peft
