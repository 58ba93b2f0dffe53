#pragma once
/// @file
/// Hugging Face model folders: config.json (peft::hf::AutoConfig) and the
/// checkpoint's safetensors, single or sharded (peft::hf::load_checkpoint).

#include <peft/core/error.h>
#include <peft/io/adapter_files.h>
#include <peft/io/safetensors.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string>

namespace peft {
namespace hf {

/// A model folder's config.json as written by transformers: `model_type` picks
/// the architecture; the architecture reads the fields it needs.
struct PretrainedConfig {
  std::string model_type;  ///< "llama", "mistral", "qwen2", ...
  nlohmann::json json;     ///< the whole file
  std::string source;      ///< the file's path, for messages
};

/// HF's AutoConfig.
struct AutoConfig {
  /// The config.json of the model folder `dir`. FileError naming the file when it
  /// is missing, not JSON, or has no `model_type`.
  static PretrainedConfig from_pretrained(const std::filesystem::path& dir) {
    const auto path = dir / "config.json";
    check<FileError>(std::filesystem::is_regular_file(path), "'{}': no config.json (expected a Hugging Face model folder)",
                     dir.string());
    PretrainedConfig config;
    config.source = path.string();
    try {
      config.json = nlohmann::json::parse(io::read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw FileError("'" + config.source + "': not valid JSON (" + e.what() + ")");
    }
    io::ConfigReader reader(config.json, config.source);
    config.model_type = reader.get<std::string>("model_type", "", /*required=*/true);
    return config;
  }
};

/// Options of the model loaders (AutoModelForCausalLM).
struct ModelOptions {
  /// Parameters' dtype (kFloat, kBFloat16, kHalf); the checkpoint's is converted. Unset: config.json's torch_dtype.
  TORCH_ARG(c10::optional<torch::ScalarType>, dtype) = c10::nullopt;
  /// Where the parameters live.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// Sequence classification: the number of labels (0: config.json's).
  TORCH_ARG(int64_t, num_labels) = 0;
};

/// config.json's `torch_dtype` (or `dtype`) as a ScalarType; kFloat when absent.
inline torch::ScalarType config_dtype(const PretrainedConfig& config) {
  const auto& j = config.json;
  const std::string name = j.contains("torch_dtype") && j["torch_dtype"].is_string() ? j["torch_dtype"].get<std::string>()
                           : j.contains("dtype") && j["dtype"].is_string()           ? j["dtype"].get<std::string>()
                                                                                      : "float32";
  if (name == "float32") return torch::kFloat;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  throw FileError(fmt::format("'{}': torch_dtype '{}' is not one of float32, bfloat16, float16", config.source, name));
}

/// The tensors of the checkpoint in `dir`: model.safetensors, or the shards that
/// model.safetensors.index.json lists (every shard validated), as views of the
/// memory-mapped files (io::load_safetensors_mapped).
inline std::map<std::string, torch::Tensor> load_checkpoint(const std::filesystem::path& dir) {
  const auto single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
  if (std::filesystem::is_regular_file(single)) return io::load_safetensors_mapped(single).tensors;
  check<FileError>(std::filesystem::is_regular_file(index), "'{}': neither model.safetensors nor model.safetensors.index.json",
                   dir.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::read_file(index));
  } catch (const nlohmann::json::exception& e) {
    throw FileError("'" + index.string() + "': not valid JSON (" + e.what() + ")");
  }
  check<FileError>(j.contains("weight_map") && j["weight_map"].is_object(), "'{}': no weight_map object", index.string());
  std::map<std::string, std::string> shard_of;
  std::set<std::string> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    check<FileError>(file.is_string(), "'{}': weight_map['{}'] is not a file name", index.string(), name);
    shard_of[name] = file.get<std::string>();
    shards.insert(file.get<std::string>());
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& shard : shards)
    for (auto& [name, t] : io::load_safetensors_mapped(dir / shard).tensors) {
      auto it = shard_of.find(name);
      check<FileError>(it != shard_of.end() && it->second == shard, "'{}': tensor '{}' is not listed for it in {}",
                       (dir / shard).string(), name, index.string());
      out[name] = std::move(t);
    }
  for (const auto& [name, shard] : shard_of)
    check<FileError>(out.count(name) > 0, "'{}': weight_map lists '{}', which the shard lacks", (dir / shard).string(), name);
  return out;
}

/// How an architecture's parameter names relate to checkpoint keys (HF's
/// base_model_prefix, tied weights, task heads, buffers old files keep).
struct CheckpointLayout {
  /// The body's module name ("model", "transformer", "bert", "roberta"): a checkpoint of the
  /// body alone (keys without it) loads into a model with a head, and one with it into the body alone.
  std::string base_model_prefix;
  /// Parameters that share another's tensor and may be absent from the file.
  std::set<std::string> tied;
  /// Module prefixes of task heads that are initialised anew when the file lacks them ("classifier.").
  std::vector<std::string> new_heads;
  /// Checkpoint keys this architecture does not use, by prefix (other tasks' heads: "cls.", "lm_head.").
  std::vector<std::string> ignored_prefixes;
  /// Checkpoint keys this architecture does not use, by suffix (buffers old files keep: ".attn.bias").
  std::vector<std::string> ignored_suffixes;
};

namespace detail {

inline bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
inline bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

/// Renames `checkpoint`'s keys to the model's side of base_model_prefix (HF's from_pretrained does the same).
inline std::map<std::string, torch::Tensor> match_prefix(std::map<std::string, torch::Tensor> checkpoint,
                                                         const torch::nn::Module& model, const std::string& prefix) {
  if (prefix.empty()) return checkpoint;
  const std::string dotted = prefix + ".";
  bool model_has = false, file_has = false;
  for (const auto& p : model.named_parameters()) model_has = model_has || starts_with(p.key(), dotted);
  for (const auto& entry : checkpoint) file_has = file_has || starts_with(entry.first, dotted);
  if (model_has == file_has) return checkpoint;
  const auto params = model.named_parameters();
  std::map<std::string, torch::Tensor> out;
  for (auto& [key, t] : checkpoint) {
    const std::string renamed = model_has ? dotted + key : starts_with(key, dotted) ? key.substr(dotted.size()) : key;
    out[params.contains(renamed) ? renamed : key] = std::move(t);
  }
  return out;
}

}  // namespace detail

/// Puts `checkpoint` into `model`'s parameters by name (HF's names): on the CPU in the
/// file's dtype the parameter takes the checkpoint's tensor (a view of the mapped file),
/// otherwise a converted copy; and returns the names of head parameters the file lacked (initialised
/// anew, as HF's "newly initialized" weights). FileError naming the key for a
/// missing tensor, a shape mismatch, or a tensor the model has no place for.
inline std::vector<std::string> assign_checkpoint(torch::nn::Module& model, std::map<std::string, torch::Tensor> checkpoint,
                                                  const std::string& dir, const CheckpointLayout& layout = {}) {
  torch::NoGradGuard no_grad;
  checkpoint = detail::match_prefix(std::move(checkpoint), model, layout.base_model_prefix);
  std::vector<std::string> initialised;
  for (auto& p : model.named_parameters()) {
    auto it = checkpoint.find(p.key());
    if (it == checkpoint.end()) {
      const bool head = std::any_of(layout.new_heads.begin(), layout.new_heads.end(),
                                    [&](const std::string& h) { return detail::starts_with(p.key(), h); });
      check<FileError>(head || layout.tied.count(p.key()) > 0, "'{}': the checkpoint has no tensor '{}'", dir, p.key());
      if (head) initialised.push_back(p.key());
      continue;
    }
    check<FileError>(it->second.sizes() == p.value().sizes(), "'{}': tensor '{}' is {}, the model expects {}", dir,
                     p.key(), shape_str(it->second.sizes()), shape_str(p.value().sizes()));
    // Same dtype on the CPU: the parameter takes the mapped tensor itself (no second copy of the weights).
    if (it->second.scalar_type() == p.value().scalar_type() && p.value().device().is_cpu())
      p.value().set_data(it->second);
    else
      p.value().copy_(it->second);
    checkpoint.erase(it);
  }
  std::vector<std::string> unused;
  for (const auto& entry : checkpoint) {
    const std::string& key = entry.first;
    const bool ignored = layout.tied.count(key) > 0 || key.find("rotary_emb.inv_freq") != std::string::npos ||
                         std::any_of(layout.ignored_prefixes.begin(), layout.ignored_prefixes.end(),
                                     [&](const std::string& p) { return detail::starts_with(key, p); }) ||
                         std::any_of(layout.ignored_suffixes.begin(), layout.ignored_suffixes.end(),
                                     [&](const std::string& p) { return detail::ends_with(key, p); });
    if (!ignored) unused.push_back(key);
  }
  check<FileError>(unused.empty(), "'{}': the checkpoint has tensors this architecture does not use: {}", dir,
                   join_names(unused));
  return initialised;
}

}  // namespace hf
}  // namespace peft
