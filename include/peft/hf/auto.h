#pragma once
/// @file
/// HF's Auto classes for model folders: AutoModelForCausalLM,
/// AutoModelForSequenceClassification and AutoModel build the architecture
/// config.json names and load its checkpoint; save_pretrained writes a folder
/// transformers loads (sharded past a size limit).

#include <peft/core/error.h>
#include <peft/hf/bert.h>
#include <peft/hf/config.h>
#include <peft/hf/gpt2.h>
#include <peft/hf/llama.h>
#include <peft/hf/modeling.h>
#include <peft/io/atomic_file.h>

#include <cmath>
#include <set>
#include <string>

namespace peft {
namespace hf {

namespace detail {

inline bool is_llama_family(const std::string& t) { return t == "llama" || t == "mistral" || t == "qwen2"; }
inline bool is_bert_family(const std::string& t) { return t == "bert" || t == "roberta"; }

/// The layout every architecture shares: buffers old files keep, and the heads of other tasks.
inline CheckpointLayout layout_for(const std::string& model_type) {
  CheckpointLayout l;
  l.base_model_prefix = is_llama_family(model_type) ? "model" : model_type == "gpt2" ? "transformer" : model_type;
  l.ignored_suffixes = {".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "embeddings.token_type_ids"};
  return l;
}

/// Places `model` on options' device and dtype, loads the checkpoint of `dir`, freezes it, eval mode.
/// Warns once naming the head parameters the file lacked (initialised anew, as HF does).
inline void load_into(torch::nn::Module& model, const std::filesystem::path& dir, const PretrainedConfig& config,
                      const ModelOptions& options, const CheckpointLayout& layout) {
  model.to(options.device(), options.dtype().value_or(config_dtype(config)));
  const auto initialised = assign_checkpoint(model, load_checkpoint(dir), dir.string(), layout);
  if (!initialised.empty())
    warn("'{}': {} not in the checkpoint, initialised anew (train them: modules_to_save)", dir.string(), join_names(initialised));
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  model.eval();
}

/// HF's _init_weights for a model built from a config: matrices and embeddings N(0, initializer_range)
/// (GPT-2's residual projections c_proj scaled by 1/sqrt(2·n_layer), as HF does), biases 0, norms 1;
/// then options' device and dtype, trainable, training mode.
inline void init_from_scratch(torch::nn::Module& model, const PretrainedConfig& config, const ModelOptions& options) {
  const double std = config.json.value("initializer_range", 0.02);
  const double residual = config.model_type == "gpt2" ? 1.0 / std::sqrt(2.0 * config.json.value("n_layer", 12)) : 1.0;
  {
    torch::NoGradGuard no_grad;
    std::set<const void*> seen;  // a tied tensor once
    for (auto& p : model.named_parameters()) {
      if (!seen.insert(p.value().unsafeGetTensorImpl()).second) continue;
      if (ends_with(p.key(), "bias"))
        p.value().zero_();
      else if (p.value().dim() == 1)
        p.value().fill_(1.0);
      else
        p.value().normal_(0.0, ends_with(p.key(), "c_proj.weight") ? std * residual : std);
    }
  }
  model.to(options.device(), options.dtype().value_or(config_dtype(config)));
  model.train();
}

inline std::string supported(const PretrainedConfig& config, const std::string& what, const std::string& which) {
  return fmt::format("'{}': model_type '{}' is not supported by {} ({} are)", config.source, config.model_type, what, which);
}

}  // namespace detail

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
  /// eval mode, every parameter frozen. model_type llama, mistral, qwen2, gpt2.
  /// ModelError for another model_type or an unsupported setting; FileError for a
  /// missing, malformed or mismatched file.
  static CausalLM from_pretrained(const std::filesystem::path& dir, const ModelOptions& options = {}) {
    const PretrainedConfig config = AutoConfig::from_pretrained(dir);
    CheckpointLayout layout;
    CausalLM model = build(config, layout);
    detail::load_into(*model, dir, config, options, layout);
    return model;
  }
  /// HF's from_config: the architecture of `config` with HF's random initialisation
  /// (N(0, initializer_range) matrices, zero biases, unit norms), trainable, in
  /// training mode, in options' dtype on options' device (pretraining from scratch).
  static CausalLM from_config(const PretrainedConfig& config, const ModelOptions& options = {}) {
    CheckpointLayout layout;
    CausalLM model = build(config, layout);
    detail::init_from_scratch(*model, config, options);
    return model;
  }

 private:
  static CausalLM build(const PretrainedConfig& config, CheckpointLayout& layout) {
    std::shared_ptr<CausalLMImpl> model;
    layout = detail::layout_for(config.model_type);
    if (detail::is_llama_family(config.model_type)) {
      const LlamaConfig c = LlamaConfig::from(config);
      model = std::make_shared<LlamaForCausalLMImpl>(c);
      if (c.tie_word_embeddings) layout.tied.insert("lm_head.weight");
    } else if (config.model_type == "gpt2") {
      const GPT2Config c = GPT2Config::from(config);
      model = std::make_shared<GPT2LMHeadModelImpl>(c);
      if (c.tie_word_embeddings) layout.tied.insert("lm_head.weight");
    } else {
      throw ModelError(detail::supported(config, "AutoModelForCausalLM", "llama, mistral, qwen2, gpt2"));
    }
    model->config = config;
    return CausalLM(model);
  }
};

/// HF's AutoModelForSequenceClassification.
///
/// ```
/// auto model = peft::hf::AutoModelForSequenceClassification::from_pretrained("all-MiniLM-L6-v2", peft::hf::ModelOptions().num_labels(2));
/// torch::Tensor logits = model->forward(input_ids, attention_mask);   // [B, 2]
/// ```
struct AutoModelForSequenceClassification {
  /// The classifier of folder `dir` with options' num_labels (default: config.json's id2label, else 2):
  /// bert, roberta (head on the first token), gpt2, llama, mistral, qwen2 (head on the last token
  /// that is not pad_token_id). A head the checkpoint lacks is initialised as HF does (N(0,
  /// initializer_range), zero bias) with a warning; everything is frozen, eval mode. Errors as
  /// AutoModelForCausalLM's; FileError when the file's head has another number of labels.
  static SequenceClassifier from_pretrained(const std::filesystem::path& dir, const ModelOptions& options = {}) {
    PretrainedConfig config = AutoConfig::from_pretrained(dir);
    const int64_t labels = num_labels_of(config, options.num_labels());
    set_num_labels(config, labels);
    std::shared_ptr<SequenceClassifierImpl> model;
    CheckpointLayout layout = detail::layout_for(config.model_type);
    if (config.model_type == "bert") {
      model = std::make_shared<BertForSequenceClassificationImpl>(BertConfig::from(config), labels);
      layout.new_heads = {"classifier.", "bert.pooler."};
      layout.ignored_prefixes = {"cls."};
    } else if (config.model_type == "roberta") {
      model = std::make_shared<RobertaForSequenceClassificationImpl>(BertConfig::from(config), labels);
      layout.new_heads = {"classifier."};
      layout.ignored_prefixes = {"lm_head.", "roberta.pooler.", "pooler."};
    } else if (config.model_type == "gpt2") {
      model = std::make_shared<GPT2ForSequenceClassificationImpl>(GPT2Config::from(config), labels);
      layout.new_heads = {"score."};
      layout.ignored_prefixes = {"lm_head."};
    } else if (detail::is_llama_family(config.model_type)) {
      model = std::make_shared<LlamaForSequenceClassificationImpl>(LlamaConfig::from(config), labels);
      layout.new_heads = {"score."};
      layout.ignored_prefixes = {"lm_head."};
    } else {
      throw ModelError(detail::supported(config, "AutoModelForSequenceClassification",
                                         "bert, roberta, gpt2, llama, mistral, qwen2"));
    }
    model->config = config;
    detail::load_into(*model, dir, config, options, layout);
    return SequenceClassifier(model);
  }
};

/// HF's AutoModel for the encoders: BertModel (bert, roberta) with its pooler,
/// forward -> last_hidden_state [B, T, hidden] (sentence embeddings, features).
struct AutoModel {
  /// The encoder of folder `dir` (a checkpoint of the body alone, or of a model with
  /// a head, whose head is left out). ModelError for another model_type; FileError as above.
  static BertModel from_pretrained(const std::filesystem::path& dir, const ModelOptions& options = {}) {
    PretrainedConfig config = AutoConfig::from_pretrained(dir);
    check<ModelError>(detail::is_bert_family(config.model_type), detail::supported(config, "AutoModel", "bert, roberta"));
    BertModel model(BertConfig::from(config), true);
    CheckpointLayout layout = detail::layout_for(config.model_type);
    layout.new_heads = {"pooler."};
    layout.ignored_prefixes = {"cls.", "lm_head.", "classifier."};
    detail::load_into(*model, dir, config, options, layout);
    return model;
  }
};

namespace detail {

/// Removes what an earlier save of the other layout left in `dir` (a single file, or shards of another count),
/// so load_checkpoint reads what was just written.
inline void remove_stale_checkpoint(const std::filesystem::path& dir, size_t shards) {
  const std::string current = fmt::format("-of-{:05d}.safetensors", shards);
  if (shards > 1) std::filesystem::remove(dir / "model.safetensors");
  if (shards == 1) std::filesystem::remove(dir / "model.safetensors.index.json");
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (starts_with(name, "model-") && ends_with(name, ".safetensors") && (shards == 1 || !ends_with(name, current)))
      std::filesystem::remove(entry.path());
  }
}

}  // namespace detail

/// save_pretrained's options.
struct SaveOptions {
  /// Largest shard in bytes (HF's max_shard_size, "5GB"); a larger model is written as
  /// model-0000k-of-0000n.safetensors shards and model.safetensors.index.json.
  TORCH_ARG(int64_t, max_shard_size) = int64_t{5} * 1000 * 1000 * 1000;
};

/// Writes `model` (HF's parameter names) with `config` as an HF folder: config.json (torch_dtype
/// set to the parameters') and model.safetensors, or shards of at most max_shard_size bytes with
/// the index (a tensor larger than the limit gets a shard of its own, as in HF). Tied tensors
/// once, under their first name. Each file is written to a temporary file and renamed.
inline void save_pretrained(const torch::nn::Module& model, const PretrainedConfig& config, const std::filesystem::path& dir,
                            const SaveOptions& options = {}) {
  std::filesystem::create_directories(dir);
  std::vector<std::map<std::string, torch::Tensor>> shards(1);
  std::set<const void*> seen;
  torch::ScalarType dtype = torch::kFloat;
  int64_t shard_bytes = 0, total = 0;
  for (const auto& p : model.named_parameters()) {
    if (!seen.insert(p.value().unsafeGetTensorImpl()).second) continue;  // a tied tensor: its first name
    const int64_t bytes = static_cast<int64_t>(p.value().nbytes());
    if (shard_bytes > 0 && shard_bytes + bytes > options.max_shard_size()) shards.emplace_back(), shard_bytes = 0;
    shards.back()[p.key()] = p.value().detach().cpu().contiguous();
    shard_bytes += bytes;
    total += bytes;
    dtype = p.value().scalar_type();
  }
  nlohmann::json json = config.json;
  json["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : "float32";
  if (shards.size() == 1) {
    io::save_safetensors(dir / "model.safetensors", shards[0], {{"format", "pt"}});
  } else {
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", nlohmann::json::object()}};
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
      io::save_safetensors(dir / file, shards[i], {{"format", "pt"}});
      for (const auto& entry : shards[i]) index["weight_map"][entry.first] = file;
    }
    io::write_file_atomic(dir / "model.safetensors.index.json", index.dump(2));
  }
  io::write_file_atomic(dir / "config.json", json.dump(2));
  detail::remove_stale_checkpoint(dir, shards.size());
}

/// save_pretrained of a causal LM with the config it was loaded with.
inline void save_pretrained(const CausalLMImpl& model, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  save_pretrained(model, model.config, dir, options);
}

/// save_pretrained of a sequence classifier (config.json with its id2label).
inline void save_pretrained(const SequenceClassifierImpl& model, const std::filesystem::path& dir,
                            const SaveOptions& options = {}) {
  save_pretrained(model, model.config, dir, options);
}

}  // namespace hf
}  // namespace peft
