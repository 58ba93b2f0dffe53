#pragma once
/// @file
/// Adapter files in the layout of HF peft, which loads them (and whose files load here).
/// A folder holds `adapter_config.json` (HF's field names and types) and
/// `adapter_model.safetensors` (keys like `base_model.model.{module path}.lora_A.weight`);
/// a non-default adapter goes into a subfolder named after it.

#include <peft/io/safetensors.h>
#include <peft/peft_model.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>

namespace peft {
namespace io {

namespace fs = std::filesystem;

/// Name of the adapter's config file in its folder.
constexpr const char* kConfigFile = "adapter_config.json";
/// Name of the adapter's weights file in its folder.
constexpr const char* kWeightsFile = "adapter_model.safetensors";
/// Prefix of every key in the weights file, as HF peft writes it.
constexpr const char* kKeyPrefix = "base_model.model.";

// ---------------------------------------------------------------- config
namespace detail {

inline nlohmann::json targets_json(const TargetModules& t) {
  if (t.empty()) return nullptr;
  if (t.is_all_linear()) return "all-linear";
  if (t.is_regex()) return t.regex();
  return t.names();
}

inline nlohmann::json or_null(const std::vector<std::string>& v) { return v.empty() ? nlohmann::json(nullptr) : nlohmann::json(v); }
inline nlohmann::json or_null(const std::vector<int64_t>& v) { return v.empty() ? nlohmann::json(nullptr) : nlohmann::json(v); }

/// The fields every HF config has.
inline nlohmann::json common(const char* peft_type) {
  return {{"peft_type", peft_type}, {"task_type", nullptr}, {"base_model_name_or_path", nullptr},
          {"revision", nullptr},    {"inference_mode", true}};
}

inline const char* activation_name(AdapterActivation a) {
  switch (a) {
    case AdapterActivation::ReLU: return "relu";
    case AdapterActivation::GELU: return "gelu";
    case AdapterActivation::Tanh: return "tanh";
    case AdapterActivation::SiLU: return "silu";
  }
  return "relu";
}

/// The attribute of the adapter's first layer (prompt/prefix stores).
inline int64_t layer_int(const PeftModel::Adapter& a, const char* name) { return a.layers.front().module.attr(name).toInt(); }

}  // namespace detail

/// adapter_config.json for one adapter, as HF peft writes it.
inline nlohmann::json config_json(const PeftModel::Adapter& a) {
  using detail::or_null;
  nlohmann::json j;
  if (const auto* c = std::get_if<LoraConfig>(&a.config)) {
    j = detail::common("LORA");
    const LoraInit init = c->init_lora_weights();
    const double alpha = c->lora_alpha();  // HF's field is an int; keep it one when it is whole
    j.update({{"r", c->r()},
              {"lora_alpha", alpha == std::floor(alpha) ? nlohmann::json(static_cast<int64_t>(alpha)) : nlohmann::json(alpha)}, {"lora_dropout", c->lora_dropout()},
              {"target_modules", detail::targets_json(c->target_modules())},
              {"exclude_modules", detail::targets_json(c->exclude_modules())},
              {"layers_to_transform", or_null(c->layers_to_transform())},
              {"layers_pattern", or_null(c->layers_pattern())}, {"rank_pattern", c->rank_pattern()},
              {"alpha_pattern", c->alpha_pattern()}, {"use_rslora", c->use_rslora()}, {"use_dora", c->use_dora()},
              {"init_lora_weights", init == LoraInit::Gaussian ? nlohmann::json("gaussian")
                                    : init == LoraInit::PiSSA  ? nlohmann::json("pissa")
                                                               : nlohmann::json(init != LoraInit::Random)},
              {"fan_in_fan_out", c->fan_in_fan_out()},
              {"bias", c->bias() == LoraBias::None ? "none" : c->bias() == LoraBias::All ? "all" : "lora_only"},
              {"modules_to_save", or_null(c->modules_to_save())},
              {"ensure_weight_tying", c->ensure_weight_tying()}});
    if (!c->slice_pattern().empty()) j["slice_pattern"] = c->slice_pattern();  // peft-cpp's per-slice LoRA
  } else if (const auto* c = std::get_if<IA3Config>(&a.config)) {
    j = detail::common("IA3");
    j.update({{"target_modules", detail::targets_json(c->target_modules())},
              {"exclude_modules", detail::targets_json(c->exclude_modules())},
              {"feedforward_modules", detail::targets_json(c->feedforward_modules())},
              {"layers_to_transform", or_null(c->layers_to_transform())}, {"layers_pattern", or_null(c->layers_pattern())},
              {"fan_in_fan_out", c->fan_in_fan_out()}, {"init_ia3_weights", c->init_ia3_weights()},
              {"modules_to_save", or_null(c->modules_to_save())}});
  } else if (const auto* c = std::get_if<PromptTuningConfig>(&a.config)) {
    j = detail::common("PROMPT_TUNING");
    const auto prompt = a.layers.front().module.attr("prompt_embeddings").toTensor();
    j.update({{"num_virtual_tokens", c->num_virtual_tokens()}, {"token_dim", prompt.size(1)},
              {"num_transformer_submodules", 1}, {"num_attention_heads", nullptr}, {"num_layers", nullptr},
              {"prompt_tuning_init", "RANDOM"}, {"prompt_tuning_init_text", nullptr}, {"tokenizer_name_or_path", nullptr}});
  } else if (const auto* c = std::get_if<PrefixTuningConfig>(&a.config)) {
    j = detail::common("PREFIX_TUNING");
    // HF's fields describe one layout for every layer; layers that differ are inferred from the graph on load.
    const auto module = a.layers.front().module;
    const auto heads = module.attr("kv_heads").toIntVector(), dims = module.attr("head_dims").toIntVector();
    const bool uniform = std::equal(heads.begin() + 1, heads.end(), heads.begin()) &&
                         std::equal(dims.begin() + 1, dims.end(), dims.begin());
    j.update({{"num_virtual_tokens", c->num_virtual_tokens()},
              {"token_dim", uniform ? nlohmann::json(heads[0] * dims[0]) : nlohmann::json(nullptr)},
              {"num_transformer_submodules", 1},
              {"num_attention_heads", uniform ? nlohmann::json(heads[0]) : nlohmann::json(nullptr)},
              {"num_layers", detail::layer_int(a, "num_layers")}, {"encoder_hidden_size", c->encoder_hidden_size()},
              {"prefix_projection", false}});  // saved folded, as HF saves prefixes for inference
  } else if (const auto* c = std::get_if<AdapterConfig>(&a.config)) {
    j = detail::common("BOTTLENECK_ADAPTER");
    const auto down = a.layers.front().module.attr("adapter_down_weight").toTensor();
    j.update({{"target_modules", detail::targets_json(c->target_modules())},
              {"exclude_modules", detail::targets_json(c->exclude_modules())},
              {"layers_to_transform", or_null(c->layers_to_transform())}, {"layers_pattern", or_null(c->layers_pattern())},
              {"hidden_size", down.size(1)}, {"bottleneck_size", down.size(0)}, {"reduction_factor", c->reduction_factor()},
              {"activation", detail::activation_name(c->activation())},
              {"init", c->init() == AdapterInit::Identity ? "identity" : "houlsby"},
              {"modules_to_save", or_null(c->modules_to_save())}});
  } else if (const auto* c = std::get_if<BitFitConfig>(&a.config)) {
    j = detail::common("BITFIT");
    j.update({{"bias", c->bias()}, {"norm", c->norm()}, {"modules_to_save", or_null(c->modules_to_save())}});
  }
  return j;
}

namespace detail {

/// Reads adapter_config.json fields with type checks; unknown keys are reported once.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {
    check<FileError>(j_.is_object(), "'{}': not a JSON object", source_);
  }

  template <typename T>
  T get(const std::string& key, const T& fallback, bool required = false) {
    used_.insert(key);
    if (!j_.contains(key) || j_[key].is_null()) {
      check<FileError>(!required, "'{}': required field '{}' is missing", source_, key);
      return fallback;
    }
    try {
      return j_[key].get<T>();
    } catch (const nlohmann::json::exception&) {
      throw FileError("'" + source_ + "': field '" + key + "' has the wrong type (" + j_[key].dump() + ")");
    }
  }

  TargetModules targets(const std::string& key) {
    used_.insert(key);
    if (!j_.contains(key) || j_[key].is_null()) return {};
    const auto& v = j_[key];
    if (v.is_string()) return TargetModules(v.get<std::string>());
    check<FileError>(v.is_array() && std::all_of(v.begin(), v.end(), [](const auto& e) { return e.is_string(); }),
                     "'{}': field '{}' must be a string or a list of strings, got {}", source_, key, v.dump());
    return TargetModules(v.get<std::vector<std::string>>());
  }

  std::vector<std::string> strings_or_one(const std::string& key) {
    used_.insert(key);
    if (!j_.contains(key) || j_[key].is_null()) return {};
    if (j_[key].is_string()) return {j_[key].get<std::string>()};
    return get<std::vector<std::string>>(key, {});
  }

  std::vector<int64_t> ints_or_one(const std::string& key) {
    used_.insert(key);
    if (!j_.contains(key) || j_[key].is_null()) return {};
    if (j_[key].is_number_integer()) return {j_[key].get<int64_t>()};
    return get<std::vector<int64_t>>(key, {});
  }

  /// The fields left unread: HF writes every field of its config class (new ones
  /// each release), at their defaults unless the user set them. Bookkeeping and
  /// initialisation-only fields pass quietly; a field that changes the computation
  /// and that peft-cpp does not implement passes only at its off value (else
  /// FileError: never silently wrong numbers); any other is warned about once.
  void check_unused() const {
    static const std::set<std::string> quiet{
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
        "peft_version", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "qalora_group_size", "runtime_config", "init_weights"};
    static const std::map<std::string, nlohmann::json> off{
        {"lora_bias", false},          {"use_qalora", false},          {"target_parameters", nullptr},
        {"trainable_token_indices", nullptr}, {"layer_replication", nullptr}, {"alora_invocation_tokens", nullptr},
        {"arrow_config", nullptr},     {"use_bdlora", nullptr},        {"kasa_config", nullptr},
        {"monteclora_config", nullptr}, {"velora_config", nullptr}};
    std::vector<std::string> unknown;
    for (const auto& [key, value] : j_.items()) {
      if (used_.count(key) || quiet.count(key)) continue;
      if (auto it = off.find(key); it != off.end()) {
        check<FileError>(value.is_null() || value == it->second || (value.is_array() && value.empty()),
                         "'{}': field '{}' = {} changes the computation, which peft-cpp does not implement (it "
                         "loads only files with '{}' = {})",
                         source_, key, value.dump(), key, it->second.dump());
        continue;
      }
      if (!value.is_null()) unknown.push_back(key);
    }
    if (!unknown.empty()) warn("'{}': ignoring config fields {}", source_, join_names(unknown));
  }

 private:
  const nlohmann::json& j_;
  std::string source_;
  std::set<std::string> used_;
};

}  // namespace detail

/// The PeftConfig an adapter_config.json describes, set up for loading weights
/// (no random or base-changing initialisation).
inline PeftConfig config_from_json(const nlohmann::json& j, const std::string& source) {
  detail::ConfigReader r(j, source);
  const std::string type = r.get<std::string>("peft_type", "", /*required=*/true);
  PeftConfig config;
  if (type == "LORA") {
    const std::string bias = r.get<std::string>("bias", "none");
    check<FileError>(bias == "none" || bias == "all" || bias == "lora_only", "'{}': bias must be none, all or lora_only, got '{}'",
                     source, bias);
    config = LoraConfig()
                 .r(r.get<int64_t>("r", 8, true))
                 .lora_alpha(r.get<double>("lora_alpha", 8.0))
                 .lora_dropout(r.get<double>("lora_dropout", 0.0))
                 .target_modules(r.targets("target_modules"))
                 .exclude_modules(r.targets("exclude_modules"))
                 .layers_to_transform(r.ints_or_one("layers_to_transform"))
                 .layers_pattern(r.strings_or_one("layers_pattern"))
                 .rank_pattern(r.get<RankPattern>("rank_pattern", {}))
                 .alpha_pattern(r.get<AlphaPattern>("alpha_pattern", {}))
                 .use_rslora(r.get<bool>("use_rslora", false))
                 .use_dora(r.get<bool>("use_dora", false))
                 .fan_in_fan_out(r.get<bool>("fan_in_fan_out", false))
                 .bias(bias == "none" ? LoraBias::None : bias == "all" ? LoraBias::All : LoraBias::LoraOnly)
                 .modules_to_save(r.strings_or_one("modules_to_save"))
                 .slice_pattern(r.get<SlicePattern>("slice_pattern", {}))
                 .ensure_weight_tying(r.get<bool>("ensure_weight_tying", false))
                 .init_lora_weights(LoraInit::Zero);
    r.get<nlohmann::json>("init_lora_weights", nullptr);  // the weights come from the file
  } else if (type == "IA3") {
    config = IA3Config()
                 .target_modules(r.targets("target_modules"))
                 .exclude_modules(r.targets("exclude_modules"))
                 .feedforward_modules(r.targets("feedforward_modules"))
                 .layers_to_transform(r.ints_or_one("layers_to_transform"))
                 .layers_pattern(r.strings_or_one("layers_pattern"))
                 .fan_in_fan_out(r.get<bool>("fan_in_fan_out", false))
                 .init_ia3_weights(r.get<bool>("init_ia3_weights", true))
                 .modules_to_save(r.strings_or_one("modules_to_save"));
  } else if (type == "PROMPT_TUNING") {
    config = PromptTuningConfig()
                 .num_virtual_tokens(r.get<int64_t>("num_virtual_tokens", 0, true))
                 .token_dim(r.get<int64_t>("token_dim", 0));
    for (const char* unused : {"num_transformer_submodules", "num_attention_heads", "num_layers", "prompt_tuning_init",
                               "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"})
      r.get<nlohmann::json>(unused, nullptr);
  } else if (type == "PREFIX_TUNING") {
    const int64_t heads = r.get<int64_t>("num_attention_heads", 0), token_dim = r.get<int64_t>("token_dim", 0);
    config = PrefixTuningConfig()
                 .num_virtual_tokens(r.get<int64_t>("num_virtual_tokens", 0, true))
                 .encoder_hidden_size(r.get<int64_t>("encoder_hidden_size", 512))
                 .num_key_value_heads(heads)
                 .head_dim(heads > 0 ? token_dim / heads : 0);
    r.get<bool>("prefix_projection", false);  // prefixes are stored folded
    for (const char* unused : {"num_transformer_submodules", "num_layers"}) r.get<nlohmann::json>(unused, nullptr);
  } else if (type == "BOTTLENECK_ADAPTER") {
    const std::string act = r.get<std::string>("activation", "relu");
    check<FileError>(act == "relu" || act == "gelu" || act == "tanh" || act == "silu",
                     "'{}': activation must be relu, gelu, tanh or silu, got '{}'", source, act);
    config = AdapterConfig()
                 .target_modules(r.targets("target_modules"))
                 .exclude_modules(r.targets("exclude_modules"))
                 .layers_to_transform(r.ints_or_one("layers_to_transform"))
                 .layers_pattern(r.strings_or_one("layers_pattern"))
                 .hidden_size(r.get<int64_t>("hidden_size", 0))
                 .bottleneck_size(r.get<int64_t>("bottleneck_size", 0))
                 .reduction_factor(r.get<int64_t>("reduction_factor", 16))
                 .activation(act == "relu" ? AdapterActivation::ReLU : act == "gelu" ? AdapterActivation::GELU
                             : act == "tanh" ? AdapterActivation::Tanh : AdapterActivation::SiLU)
                 .init(r.get<std::string>("init", "identity") == "houlsby" ? AdapterInit::Houlsby : AdapterInit::Identity)
                 .modules_to_save(r.strings_or_one("modules_to_save"));
  } else if (type == "BITFIT") {
    config = BitFitConfig()
                 .bias(r.get<bool>("bias", true))
                 .norm(r.get<bool>("norm", false))
                 .modules_to_save(r.strings_or_one("modules_to_save"));
  } else {
    throw FileError("'" + source + "': peft_type '" + type +
                    "' is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, BOTTLENECK_ADAPTER, BITFIT)");
  }
  r.check_unused();
  return config;
}

// ---------------------------------------------------------------- tensors
/// One tensor of an adapter file: its key, its value in the file's layout, and
/// how to store a value read from a file.
struct StateEntry {
  std::string key;
  torch::Tensor value;
  std::function<void(const torch::Tensor&)> assign;
};

/// The tensors of an adapter under HF peft's keys and layouts.
inline std::vector<StateEntry> adapter_state(const PeftModel::Adapter& a) {
  std::vector<StateEntry> out;
  auto assign_attr = [](torch::jit::Module m, std::string name, std::function<torch::Tensor(const torch::Tensor&)> to_ours) {
    return [m, name, to_ours](const torch::Tensor& v) mutable {
      torch::NoGradGuard no_grad;
      torch::Tensor current = m.attr(name).toTensor();
      current.copy_(to_ours(v));
    };
  };
  auto same = [](const torch::Tensor& t) { return t; };
  for (const auto& l : a.layers) {
    torch::jit::Module m = l.module;
    const std::string base = kKeyPrefix + l.target + ".";
    auto add = [&](const std::string& key, const std::string& attr, std::function<torch::Tensor(const torch::Tensor&)> to_file,
                   std::function<torch::Tensor(const torch::Tensor&)> to_ours) {
      out.push_back({key, to_file(m.attr(attr).toTensor().detach()), assign_attr(m, attr, std::move(to_ours))});
    };
    if (std::holds_alternative<LoraConfig>(a.config)) {
      add(base + "lora_A.weight", "lora_A", same, same);
      add(base + "lora_B.weight", "lora_B", same, same);
      if (std::get<LoraConfig>(a.config).use_dora()) add(base + "lora_magnitude_vector", "lora_magnitude_vector", same, same);
    } else if (std::holds_alternative<IA3Config>(a.config)) {
      const bool ff = m.attr("feedforward").toBool();  // HF: (1, in) feed-forward, (out, 1) otherwise
      add(base + "ia3_l", "ia3_l", [ff](const torch::Tensor& t) { return ff ? t.unsqueeze(0) : t.unsqueeze(1); },
          [](const torch::Tensor& t) { return t.reshape({-1}); });
    } else if (std::holds_alternative<AdapterConfig>(a.config)) {
      for (const char* part : {"down", "up"})
        for (const char* p : {"weight", "bias"})
          add(base + "adapter_" + part + "." + p, std::string("adapter_") + part + "_" + p, same, same);
    } else if (std::holds_alternative<PromptTuningConfig>(a.config)) {
      add("prompt_embeddings", "prompt_embeddings", same, same);
    } else if (std::holds_alternative<PrefixTuningConfig>(a.config)) {
      // Stored as HF stores it, [P, layers·2·kv_heads·head_dim]; a projection MLP is saved folded.
      out.push_back({"prompt_embeddings", m.run_method("prefixes").toTensor().detach(), [m](const torch::Tensor& v) mutable {
                       check<ModelError>(!m.attr("use_projection").toBool(), "load a prefix adapter without prefix_projection");
                       torch::NoGradGuard no_grad;
                       m.attr("prefix").toTensor().copy_(v);
                     }});
    }
  }
  for (const auto& c : a.copies) {
    torch::Tensor copy = c.copy;
    out.push_back({kKeyPrefix + c.module + "." + c.attribute, copy.detach(), [copy](const torch::Tensor& v) mutable {
                     torch::NoGradGuard no_grad;
                     copy.copy_(v);
                   }});
  }
  return out;
}

}  // namespace io

// ------------------------------------------------------ PeftModel members
inline void PeftModel::save_pretrained(const std::filesystem::path& dir) const {
  for (const auto& a : adapters_) {
    const std::filesystem::path out = a.name == "default" ? dir : dir / a.name;
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    check<FileError>(!ec, "cannot create '{}': {}", out.string(), ec.message());
    std::map<std::string, torch::Tensor> tensors;
    for (const auto& e : io::adapter_state(a)) tensors[e.key] = e.value;
    io::save_safetensors(out / io::kWeightsFile, tensors);
    io::write_file_atomic(out / io::kConfigFile, io::config_json(a).dump(2) + "\n");
  }
}

inline void PeftModel::load_adapter(const std::filesystem::path& dir, const std::string& name) {
  check<FileError>(!std::filesystem::is_regular_file(dir),
                   "'{}' is a file; expected the adapter directory (holding {} and {})", dir.string(), io::kConfigFile,
                   io::kWeightsFile);
  check<FileError>(std::filesystem::is_directory(dir), "adapter directory '{}' does not exist", dir.string());
  const std::filesystem::path config_path = dir / io::kConfigFile, weights_path = dir / io::kWeightsFile;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::read_file(config_path));
  } catch (const nlohmann::json::exception& e) {
    throw FileError("'" + config_path.string() + "' is not valid JSON: " + e.what());
  }
  PeftConfig config;
  try {
    config = io::config_from_json(j, config_path.string());
  } catch (const FileError&) {
    throw;
  } catch (const std::exception& e) {  // an option rule (a bad regex, ...) broken by the file
    throw FileError(fmt::format("'{}': {}", config_path.string(), e.what()));
  }
  io::TensorFile file = io::load_safetensors(weights_path);
  try {
    add_adapter(name, config, /*from_file=*/true);
  } catch (const FileError&) {
    throw;
  } catch (const TargetError& e) {  // the config names modules this model lacks
    throw FileError(fmt::format("'{}': adapter for a different model? {}", config_path.string(), e.what()));
  } catch (const std::exception& e) {  // whatever the cause, a file that does not load names the file
    throw FileError(fmt::format("'{}': {}", config_path.string(), e.what()));
  }
  try {
    std::set<std::string> expected;
    for (const auto& e : io::adapter_state(*find(name))) {
      expected.insert(e.key);
      auto it = file.tensors.find(e.key);
      check<FileError>(it != file.tensors.end(), "'{}': tensor '{}' is missing (adapter for a different model?)",
                       weights_path.string(), e.key);
      check<FileError>(it->second.sizes() == e.value.sizes(),
                       "'{}': tensor '{}' has shape {}, this model needs {} (adapter for a different model?)",
                       weights_path.string(), e.key, shape_str(it->second.sizes()), shape_str(e.value.sizes()));
      check<FileError>(!it->second.is_floating_point() || torch::isfinite(it->second).all().item<bool>(),
                       "'{}': tensor '{}' holds NaN or infinite values (corrupt or diverged adapter)",
                       weights_path.string(), e.key);
      e.assign(it->second.to(e.value.options()));
    }
    for (const auto& [key, t] : file.tensors)
      check<FileError>(expected.count(key), "'{}': tensor '{}' matches no module of this model (adapter for a different model?)",
                       weights_path.string(), key);
  } catch (const std::exception& e) {
    if (adapters_.size() > 1) {
      delete_adapter(name);
    } else {
      adapters_.clear();
    }
    if (dynamic_cast<const FileError*>(&e)) throw;
    throw FileError(fmt::format("'{}': {}", weights_path.string(), e.what()));
  }
}

inline PeftModel PeftModel::from_pretrained(torch::jit::Module base, const std::filesystem::path& dir,
                                            const std::string& name) {
  PeftModel model(std::move(base));
  model.load_adapter(dir, name);
  model.set_adapter(name);
  return model;
}

}  // namespace peft
