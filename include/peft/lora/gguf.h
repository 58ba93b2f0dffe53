#pragma once
/// @file
/// LoRA adapters for llama.cpp: an adapter folder in HF peft's layout written
/// as a GGUF LoRA adapter, the format of llama.cpp's convert_lora_to_gguf.py
/// that llama.cpp loads with `--lora` (src/llama-adapter.cpp):
///
/// - metadata: `general.architecture` (llama.cpp's name: "llama" for Llama and
///   Mistral, "qwen2", "gpt2", "bert" for BERT and RoBERTa), `general.type` =
///   "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32);
/// - per adapted weight W, named as llama.cpp names it (`blk.N.attn_q.weight`, ...),
///   `W.lora_a` = HF's lora_A [r, in] and `W.lora_b` = lora_B [out, r] (torch
///   shapes; ggml's ne are reversed), F32 (the converter's default) or F16.
///
/// llama.cpp adds scale·B·A·x with scale = alpha / r, r read from each lora_b;
/// so per-module ranks (rank_pattern) carry over, and alpha is the value that
/// gives every module HF peft's scaling (rsLoRA: lora_alpha·√r). The layout
/// changes llama.cpp's converter applies to base weights apply to the factors:
/// Llama/Mistral q_proj and k_proj rows are permuted (LlamaModel.permute: each
/// head's rotary halves interleaved), which permutes lora_B's rows; an embedding's
/// lora_a is lora_embedding_A transposed, [vocab, r] (llm_build_inp_embd gathers
/// its rows). GPT-2's Conv1D weights are transposed by the converter, but HF
/// peft's factors of a Conv1D already have the [out, in] orientation, so they are
/// written as they are (what llama.cpp's loader checks and multiplies).

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/hf/config.h>
#include <peft/io/adapter_files.h>
#include <peft/io/gguf.h>
#include <peft/io/safetensors.h>
#include <peft/lora/method.h>
#include <peft/tuner.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace peft {
namespace lora {

/// Tensor type of the exported factors (convert_lora_to_gguf.py's --outtype f32 / f16).
enum class GgufOutType { F32, F16 };

/// Options of gguf_adapter / export_gguf.
///
/// ```
/// peft::lora::export_gguf("adapter", "adapter.gguf", peft::lora::GgufExportOptions().base_model_dir("Llama-3.2-1B"));
/// ```
struct GgufExportOptions {
  /// Folder holding the base model's config.json (model_type, head counts, tied embeddings).
  /// Empty: adapter_config.json's base_model_name_or_path, when that is such a local folder.
  TORCH_ARG(std::string, base_model_dir) = "";
  /// F32 (llama.cpp's default) or F16 factors.
  TORCH_ARG(GgufOutType, outtype) = GgufOutType::F32;
};

namespace detail {

/// How an HF architecture's module names map to llama.cpp's tensor names.
struct GgufArch {
  std::vector<std::string> model_types;  ///< config.json's model_type values
  std::string arch;                       ///< llama.cpp's general.architecture
  std::vector<std::string> prefixes;      ///< optional leading module names (the body's name)
  std::string blocks;                     ///< the block list's name, followed by the block index
  std::map<std::string, std::string> in_block, outside;  ///< HF module (suffix) -> llama.cpp tensor
  bool permute_qk = false;                ///< LlamaModel.permute on q_proj and k_proj rows
};

inline const std::vector<GgufArch>& gguf_archs() {
  static const std::map<std::string, std::string> llama_block{
      {"self_attn.q_proj", "attn_q"},   {"self_attn.k_proj", "attn_k"}, {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"}, {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  static const std::map<std::string, std::string> llama_outside{{"embed_tokens", "token_embd"}, {"lm_head", "output"}};
  static const std::vector<GgufArch> archs{
      {{"llama", "mistral"}, "llama", {"model."}, "layers.", llama_block, llama_outside, true},
      {{"qwen2"}, "qwen2", {"model."}, "layers.", llama_block, llama_outside, false},
      {{"gpt2"},
       "gpt2",
       {"transformer."},
       "h.",
       {{"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"}, {"mlp.c_fc", "ffn_up"}, {"mlp.c_proj", "ffn_down"}},
       {{"wte", "token_embd"}, {"lm_head", "output"}}},
      {{"bert", "roberta"},
       "bert",
       {"bert.", "roberta."},
       "encoder.layer.",
       {{"attention.self.query", "attn_q"}, {"attention.self.key", "attn_k"}, {"attention.self.value", "attn_v"},
        {"attention.output.dense", "attn_output"}, {"intermediate.dense", "ffn_up"}, {"output.dense", "ffn_down"}},
       {{"embeddings.word_embeddings", "token_embd"}}},
  };
  return archs;
}

/// llama.cpp's tensor for HF module `module` (e.g. "blk.0.attn_q.weight"), or "" when it has none.
inline std::string gguf_tensor_name(const GgufArch& a, std::string module) {
  for (const auto& p : a.prefixes)
    if (module.rfind(p, 0) == 0) {
      module = module.substr(p.size());
      break;
    }
  if (module.rfind(a.blocks, 0) == 0) {
    const size_t start = a.blocks.size(), dot = module.find('.', start);
    if (dot == std::string::npos || dot == start ||
        module.find_first_not_of("0123456789", start) != dot)
      return "";
    auto it = a.in_block.find(module.substr(dot + 1));
    return it == a.in_block.end() ? "" : "blk." + module.substr(start, dot - start) + "." + it->second + ".weight";
  }
  auto it = a.outside.find(module);
  return it == a.outside.end() ? "" : it->second + ".weight";
}

/// Why llama.cpp cannot take an adapter of `peft_type` (not LoRA).
inline std::string gguf_refusal(const std::string& peft_type) {
  if (peft_type == "PREFIX_TUNING") return "prefix tuning trains key/value prefixes for every attention layer";
  if (peft_type == "PROMPT_TUNING" || peft_type == "P_TUNING" || peft_type == "MULTITASK_PROMPT_TUNING")
    return "prompt tuning trains virtual-token embeddings put before the input";
  if (peft_type == "BOTTLENECK_ADAPTER") return "bottleneck adapters add trained MLPs after sublayers";
  if (peft_type == "IA3") return "IA3 rescales activations by trained vectors";
  if (peft_type == "VERA") return "VeRA scales shared frozen random matrices by trained vectors (not converted)";
  if (peft_type == "BITFIT") return "BitFit trains the biases";
  return "it is not LoRA";
}

/// llama.cpp's LlamaModel.permute on the rows of `w` [heads·head_dim, cols]: each
/// head's two rotary halves interleaved (row h·d + 2j + t comes from h·d + t·d/2 + j).
inline torch::Tensor gguf_permute_rows(const torch::Tensor& w, int64_t heads) {
  return w.reshape({heads, 2, w.size(0) / heads / 2, w.size(1)}).transpose(1, 2).reshape(w.sizes());
}

/// The base model's config.json: from `options`, else adapter_config.json's base_model_name_or_path if local.
inline hf::PretrainedConfig gguf_base_config(const nlohmann::json& adapter, const GgufExportOptions& options) {
  std::string dir = options.base_model_dir();
  if (dir.empty()) {
    const auto& base = adapter.contains("base_model_name_or_path") ? adapter["base_model_name_or_path"] : nlohmann::json();
    const std::string named = base.is_string() ? base.get<std::string>() : "";
    check<OptionError>(!named.empty() && std::filesystem::is_regular_file(std::filesystem::path(named) / "config.json"),
                       "the base model's config.json is needed (its architecture names the tensors): pass its folder "
                       "as --base MODEL_DIR (GgufExportOptions::base_model_dir); adapter_config.json's "
                       "base_model_name_or_path is {}",
                       named.empty() ? "not set" : "'" + named + "', not a local folder with a config.json");
    dir = named;
  }
  return hf::AutoConfig::from_pretrained(dir);
}

}  // namespace detail

/// The GGUF LoRA adapter (see the file comment) for the HF peft adapter folder
/// `adapter_dir` (adapter_config.json, adapter_model.safetensors), in memory.
///
/// Errors: FileError for a missing or unreadable folder, config or weights file,
/// a tensor that is not a LoRA factor or has no partner, a rank that differs
/// from the config, non-finite values; OptionError for an adapter llama.cpp
/// cannot represent: another method (prefix or prompt tuning, bottleneck, IA3,
/// VeRA, BitFit), DoRA, trained biases, modules_to_save, slice_pattern, an
/// initialisation that changed the base (PiSSA, OLoRA, CorDA, LoftQ), scalings
/// no single alpha gives (alpha_pattern, rsLoRA with rank_pattern), lora_alpha 0;
/// also without a base config.json, and for F16 values beyond its range;
/// ModelError for a base model_type llama.cpp export does not know, a module
/// with no llama.cpp tensor taking a LoRA (position embeddings, task heads), LoRA
/// on lm_head or the embeddings of a model that ties them (llama.cpp then has one
/// tensor for both), and q/k shapes that do not fit the base config.
inline io::GgufFile gguf_adapter(const std::filesystem::path& adapter_dir, const GgufExportOptions& options = {}) {
  const nlohmann::json j = io::read_adapter_config(adapter_dir);
  const std::string config_path = (adapter_dir / io::kConfigFile).string();
  const std::string peft_type = j.contains("peft_type") && j["peft_type"].is_string() ? j["peft_type"].get<std::string>() : "";
  check<OptionError>(peft_type.empty() || peft_type == "LORA",  // empty: the reader says what is wrong
                     "'{}': peft_type '{}' cannot be exported to llama.cpp: {}, and llama.cpp's GGUF adapters hold LoRA "
                     "pairs (lora_a, lora_b) on weight matrices only",
                     config_path, peft_type, detail::gguf_refusal(peft_type));
  io::ConfigReader config_reader(j, config_path);  // what config_from_json does for LoRA (peft/methods.h is above this layer)
  config_reader.get<std::string>("peft_type", "", /*required=*/true);
  const LoraConfig c = Method<LoraConfig>::from_json(config_reader);
  config_reader.check_unused();
  check<OptionError>(!c.use_dora(),
                     "'{}': use_dora: DoRA rescales each output by a trained magnitude (lora_magnitude_vector) over the "
                     "normalised W + B·A; llama.cpp's LoRA only adds scale·B·A, so it cannot represent DoRA (merge the "
                     "adapter into the model instead: merge_and_unload)",
                     config_path);
  check<OptionError>(c.bias() == LoraBias::None,
                     "'{}': bias '{}' trains biases, which llama.cpp's LoRA adapters (lora_a/lora_b pairs) cannot hold",
                     config_path, c.bias() == LoraBias::All ? "all" : "lora_only");
  check<OptionError>(c.modules_to_save().empty(),
                     "'{}': modules_to_save ({}) trains whole modules, which llama.cpp's LoRA adapters (lora_a/lora_b "
                     "pairs) cannot hold",
                     config_path, join_names(c.modules_to_save()));
  const nlohmann::json init = j.contains("init_lora_weights") ? j["init_lora_weights"] : nlohmann::json();
  const std::string init_name = init.is_string() ? init.get<std::string>() : "";
  check<OptionError>(init_name.rfind("pissa", 0) != 0 && init_name != "olora" && init_name != "corda" && init_name != "loftq",
                     "'{}': init_lora_weights '{}' trains the adapter on a changed base (the residual of the initial "
                     "factors), not on the original weights llama.cpp's base model holds; save it converted to a "
                     "plain LoRA of the original base (HF peft: path_initial_model_for_weight_conversion) or merge it",
                     config_path, init_name);
  check<OptionError>(c.slice_pattern().empty(),
                     "'{}': slice_pattern (peft-cpp's per-slice LoRA on fused projections) has no llama.cpp counterpart",
                     config_path);

  const hf::PretrainedConfig base = detail::gguf_base_config(j, options);
  const detail::GgufArch* arch = nullptr;
  std::vector<std::string> known;
  for (const auto& a : detail::gguf_archs())
    for (const auto& t : a.model_types) {
      known.push_back(t);
      if (t == base.model_type) arch = &a;
    }
  check<ModelError>(arch != nullptr, "'{}': model_type '{}' cannot be exported to llama.cpp by peft-cpp ({} can)",
                    base.source, base.model_type, join_names(known));
  io::ConfigReader reader(base.json, base.source);
  const bool tied = arch->outside.count("lm_head") && reader.get<bool>("tie_word_embeddings", base.model_type == "gpt2");
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  if (arch->permute_qk) {
    heads = reader.get<int64_t>("num_attention_heads", 0, /*required=*/true);
    kv_heads = reader.get<int64_t>("num_key_value_heads", heads);
    head_dim = reader.get<int64_t>("head_dim", heads > 0 ? reader.get<int64_t>("hidden_size", 0, true) / heads : 0);
    check<FileError>(heads > 0 && kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
                     "'{}': num_attention_heads {}, num_key_value_heads {}, head_dim {} must be positive, head_dim even",
                     base.source, heads, kv_heads, head_dim);
  }

  const std::string weights_path = (adapter_dir / io::kWeightsFile).string();
  const io::TensorFile weights = io::load_safetensors(weights_path);
  struct Pair {
    torch::Tensor A, B;
    bool embedding = false;
  };
  std::map<std::string, Pair> pairs;  // by HF module name
  const std::string prefix = io::kKeyPrefix;
  for (const auto& entry : weights.tensors) {
    const std::string& key = entry.first;  // not a structured binding: C++17 lambdas cannot capture those (clang)
    const torch::Tensor& t = entry.second;
    const auto factor = [&](const std::string& suffix) {
      return key.size() > prefix.size() + suffix.size() && key.rfind(prefix, 0) == 0 &&
             key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    const auto module = [&](const std::string& suffix) {
      return key.substr(prefix.size(), key.size() - prefix.size() - suffix.size());
    };
    if (factor(".lora_A.weight")) {
      pairs[module(".lora_A.weight")].A = t;
    } else if (factor(".lora_B.weight")) {
      pairs[module(".lora_B.weight")].B = t;
    } else if (factor(".lora_embedding_A")) {
      pairs[module(".lora_embedding_A")].A = t;
      pairs[module(".lora_embedding_A")].embedding = true;
    } else if (factor(".lora_embedding_B")) {
      pairs[module(".lora_embedding_B")].B = t;
    } else if (factor(".base_layer.weight")) {
      continue;  // the frozen weight HF peft saves along an embedding LoRA (save_embedding_layers): skipped, as by the converter
    } else {
      throw FileError(fmt::format("'{}': tensor '{}' is not a LoRA factor (lora_A, lora_B, lora_embedding_A/B); "
                                  "llama.cpp's LoRA adapters hold only those",
                                  weights_path, key));
    }
  }
  check<FileError>(!pairs.empty(), "'{}': no LoRA tensors", weights_path);

  io::GgufFile out;
  out.source = "GGUF adapter of '" + adapter_dir.string() + "'";
  std::string first_module;
  double alpha = 0;  // llama.cpp's: scale = alpha / r for every pair
  for (auto& [module, p] : pairs) {
    check<FileError>(p.A.defined() && p.B.defined(), "'{}': module '{}' has lora_{} but not lora_{}", weights_path, module,
                     p.A.defined() ? "A" : "B", p.A.defined() ? "B" : "A");
    check<FileError>(p.A.dim() == 2 && p.B.dim() == 2 && p.A.size(0) == p.B.size(1),
                     "'{}': module '{}': lora_A {} and lora_B {} are not [r, in] and [out, r]", weights_path, module,
                     shape_str(p.A.sizes()), shape_str(p.B.sizes()));
    check<FileError>(torch::isfinite(p.A).all().item<bool>() && torch::isfinite(p.B).all().item<bool>(),
                     "'{}': module '{}' holds NaN or infinite values", weights_path, module);
    const std::string name = detail::gguf_tensor_name(*arch, module);
    check<ModelError>(!name.empty(),
                      "module '{}' has no tensor in llama.cpp's {} model that takes a LoRA (those that do: the "
                      "projections and MLP layers of each block{}), so the adapter cannot be exported",
                      module, arch->arch,
                      arch->outside.count("lm_head") ? ", the token embeddings and lm_head" : " and the token embeddings");
    check<ModelError>(!(tied && (name == "output.weight" || name == "token_embd.weight")),
                      "module '{}': '{}' ties lm_head to the token embeddings (tie_word_embeddings), and llama.cpp then "
                      "uses token_embd.weight for both: it has no output.weight for an lm_head LoRA, and would apply an "
                      "embedding LoRA at the output head too",
                      module, base.source);

    const LoraOptions o = c.options_for(module);
    check<FileError>(p.A.size(0) == o.r(), "'{}': module '{}' has rank {} in the file but {} in the config", weights_path,
                     module, p.A.size(0), o.r());
    const double needed = o.scaling() * static_cast<double>(o.r());
    if (first_module.empty()) {
      first_module = module;
      alpha = needed;
    }
    check<OptionError>(std::abs(needed - alpha) <= 1e-6 * std::abs(alpha),
                       "'{}': llama.cpp scales every LoRA pair by one adapter.lora.alpha / its rank, but module '{}' "
                       "needs alpha {} and '{}' needs {} (alpha_pattern, or use_rslora with rank_pattern)",
                       config_path, first_module, alpha, module, needed);

    torch::Tensor a = p.A.to(torch::kFloat32), b = p.B.to(torch::kFloat32);
    if (p.embedding) a = a.t();  // llm_build_inp_embd gathers rows of lora_a: [vocab, r]
    const bool q = name.find(".attn_q.") != std::string::npos, k = name.find(".attn_k.") != std::string::npos;
    if (arch->permute_qk && (q || k)) {
      const int64_t n = q ? heads : kv_heads;
      check<ModelError>(b.size(0) == n * head_dim,
                        "module '{}' has {} outputs, but '{}' gives {} heads of {} (adapter for a different model?)",
                        module, b.size(0), base.source, n, head_dim);
      b = detail::gguf_permute_rows(b, n);
    }
    for (auto [suffix, t] : {std::make_pair(".lora_a", a), std::make_pair(".lora_b", b)}) {
      if (options.outtype() == GgufOutType::F16) {
        t = t.to(torch::kFloat16);
        check<OptionError>(torch::isfinite(t).all().item<bool>(),
                           "'{}': module '{}' has values beyond float16's range; export with outtype f32", weights_path,
                           module);
      }
      out.tensors.emplace_back(name + suffix, t.contiguous());
    }
  }
  check<OptionError>(alpha != 0,
                     "'{}': lora_alpha 0 makes the adapter a no-op, but llama.cpp reads adapter.lora.alpha 0 as "
                     "'no scaling' (scale 1)",
                     config_path);
  out.set("general.architecture", io::GgufValue::of(arch->arch));
  out.set("general.type", io::GgufValue::of("adapter"));
  out.set("adapter.type", io::GgufValue::of("lora"));
  out.set("adapter.lora.alpha", io::GgufValue::of(static_cast<float>(alpha)));
  return out;
}

/// Writes the GGUF LoRA adapter of `adapter_dir` (see gguf_adapter, whose errors it
/// throws) to `out_path`, atomically, and returns what it wrote.
///
/// ```
/// peft::lora::export_gguf("adapter", "adapter.gguf", peft::lora::GgufExportOptions().base_model_dir("Llama-3.2-1B"));
/// // llama-cli -m Llama-3.2-1B-F16.gguf --lora adapter.gguf
/// ```
inline io::GgufFile export_gguf(const std::filesystem::path& adapter_dir, const std::filesystem::path& out_path,
                                const GgufExportOptions& options = {}) {
  io::GgufFile file = gguf_adapter(adapter_dir, options);
  io::save_gguf(out_path, file);
  file.source = out_path.string();
  return file;
}

}  // namespace lora
}  // namespace peft
