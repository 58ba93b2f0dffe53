#pragma once
/// @file
/// Adapter folders in HF peft's layout, as bytes and fields: no method and no
/// model here (each method writes and reads its own fields with these tools).
/// A folder holds `adapter_config.json` (HF's field names and types) and
/// `adapter_model.safetensors` (keys like `base_model.model.{module path}.lora_A.weight`);
/// a non-default adapter goes into a subfolder named after it.

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/core/shape.h>
#include <peft/io/atomic_file.h>
#include <peft/io/safetensors.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace peft {
namespace io {

/// Name of the adapter's config file in its folder.
constexpr const char* kConfigFile = "adapter_config.json";
/// Name of the adapter's weights file in its folder.
constexpr const char* kWeightsFile = "adapter_model.safetensors";
/// Prefix of every key in the weights file, as HF peft writes it.
constexpr const char* kKeyPrefix = "base_model.model.";

// ------------------------------------------------------------- writing fields
/// A target rule as HF writes it: null, "all-linear", a regex string, or a list of names.
inline nlohmann::json targets_json(const TargetModules& t) {
  if (t.empty()) return nullptr;
  if (t.is_all_linear()) return "all-linear";
  if (t.is_regex()) return t.regex();
  return t.names();
}

/// A list, or null when empty (HF's Optional[list] fields).
template <typename T>
nlohmann::json or_null(const std::vector<T>& v) {
  return v.empty() ? nlohmann::json(nullptr) : nlohmann::json(v);
}

/// The fields every HF config has, for `peft_type` ("LORA", ...).
inline nlohmann::json common_fields(const std::string& peft_type) {
  return {{"peft_type", peft_type}, {"task_type", nullptr}, {"base_model_name_or_path", nullptr},
          {"revision", nullptr},    {"inference_mode", true}};
}

/// The name of `value` in a table of HF's enum strings (ConfigReader::choice reads it back).
template <typename E>
std::string choice_name(const std::vector<std::pair<std::string, E>>& choices, E value) {
  for (const auto& [name, e] : choices)
    if (e == value) return name;
  return {};
}

// ------------------------------------------------------------- reading fields
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

  /// A string field naming one of `choices` (HF writes enums as strings); FileError otherwise.
  template <typename E>
  E choice(const std::string& key, const std::string& fallback, const std::vector<std::pair<std::string, E>>& choices) {
    const std::string value = get<std::string>(key, fallback);
    std::vector<std::string> names;
    for (const auto& [name, e] : choices) {
      if (name == value) return e;
      names.push_back(name);
    }
    throw FileError(fmt::format("'{}': field '{}' must be one of {}, got '{}'", source_, key, join_names(names), value));
  }

  /// The file's name, for messages.
  const std::string& source() const { return source_; }

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


// ------------------------------------------------------------------ tensors
/// One tensor of an adapter file: its key, its value in the file's layout, and
/// how to store a value read from a file (already on the value's device and dtype).
struct StateEntry {
  std::string key;
  torch::Tensor value;
  std::function<void(const torch::Tensor&)> assign;
};

/// An entry for tensor `t`, stored as it is (the usual case).
inline StateEntry plain_entry(std::string key, torch::Tensor t) {
  torch::Tensor value = t.detach();
  return {std::move(key), value, [t](const torch::Tensor& v) mutable {
            torch::NoGradGuard no_grad;
            t.copy_(v);
          }};
}

// ------------------------------------------------------------------ folders
/// The folder of adapter `name` under `dir`: `dir` itself for "default".
inline std::filesystem::path adapter_folder(const std::filesystem::path& dir, const std::string& name) {
  return name == "default" ? dir : dir / name;
}

/// Writes `config` and the entries' tensors into `folder` (created if needed), each file atomically.
inline void write_adapter_folder(const std::filesystem::path& folder, const nlohmann::json& config,
                                 const std::vector<StateEntry>& state) {
  std::error_code ec;
  std::filesystem::create_directories(folder, ec);
  check<FileError>(!ec, "cannot create '{}': {}", folder.string(), ec.message());
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& e : state) tensors[e.key] = e.value;
  save_safetensors(folder / kWeightsFile, tensors);
  write_file_atomic(folder / kConfigFile, config.dump(2) + "\n");
}

/// The parsed adapter_config.json of `folder`; FileError when `folder` is not an
/// adapter folder or the file is not JSON.
inline nlohmann::json read_adapter_config(const std::filesystem::path& folder) {
  check<FileError>(!std::filesystem::is_regular_file(folder),
                   "'{}' is a file; expected the adapter directory (holding {} and {})", folder.string(), kConfigFile,
                   kWeightsFile);
  check<FileError>(std::filesystem::is_directory(folder), "adapter directory '{}' does not exist", folder.string());
  const std::filesystem::path path = folder / kConfigFile;
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw FileError("'" + path.string() + "' is not valid JSON: " + e.what());
  }
}

/// Assigns the tensors of `file` (read from `source`) to `state`: every entry must
/// be there with its shape and finite values, and every tensor must match an entry.
inline void assign_state(const std::vector<StateEntry>& state, const TensorFile& file, const std::string& source) {
  std::set<std::string> expected;
  for (const auto& e : state) {
    expected.insert(e.key);
    auto it = file.tensors.find(e.key);
    check<FileError>(it != file.tensors.end(), "'{}': tensor '{}' is missing (adapter for a different model?)", source,
                     e.key);
    check<FileError>(it->second.sizes() == e.value.sizes(),
                     "'{}': tensor '{}' has shape {}, this model needs {} (adapter for a different model?)", source,
                     e.key, shape_str(it->second.sizes()), shape_str(e.value.sizes()));
    check<FileError>(!it->second.is_floating_point() || torch::isfinite(it->second).all().item<bool>(),
                     "'{}': tensor '{}' holds NaN or infinite values (corrupt or diverged adapter)", source, e.key);
    e.assign(it->second.to(e.value.options()));
  }
  for (const auto& [key, t] : file.tensors)
    check<FileError>(expected.count(key), "'{}': tensor '{}' matches no module of this model (adapter for a different model?)",
                     source, key);
}

}  // namespace io
}  // namespace peft
