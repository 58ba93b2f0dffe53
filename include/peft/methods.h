#pragma once
/// @file
/// The library's methods, and reading any of them from adapter_config.json.
///
/// A new method is its folder plus its line here (docs/adding-a-method.md). The
/// folders do not register themselves: a registration at namespace scope in a
/// header compiled every method's code into every translation unit that included
/// <peft/peft.h> (~60 s each at -O3); listed here, only the translation units that
/// read an adapter_config.json compile them all.

#include <peft/bitfit/method.h>
#include <peft/bottleneck/method.h>
#include <peft/ia3/method.h>
#include <peft/lora/method.h>
#include <peft/prefix/method.h>
#include <peft/prompt/method.h>
#include <peft/tuner.h>
#include <peft/vera/method.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace peft {
namespace detail {

/// Methods known by their config types `C...`.
template <typename... C>
struct MethodList {
  /// The config of the method whose peft_type is `type`, read from `reader`; nullopt if none is.
  static std::optional<PeftConfig> from_json(const std::string& type, io::ConfigReader& reader) {
    std::optional<PeftConfig> config;
    ((!config && type == Method<C>::peft_type ? (void)(config = PeftConfig(Method<C>::from_json(reader))) : void()), ...);
    return config;
  }
  static std::vector<std::string> peft_types() { return {Method<C>::peft_type...}; }
};

using LibraryMethods = MethodList<BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                                  PromptTuningConfig, VeraConfig>;

}  // namespace detail

/// The PeftConfig an adapter_config.json (read from `source`) describes, set up
/// for loading weights (no random or base-changing initialisation). FileError
/// for an unknown peft_type or a missing, mistyped or unsupported field.
inline PeftConfig config_from_json(const nlohmann::json& j, const std::string& source) {
  io::ConfigReader reader(j, source);
  const std::string type = reader.get<std::string>("peft_type", "", /*required=*/true);
  std::optional<PeftConfig> config = detail::LibraryMethods::from_json(type, reader);
  if (!config) {
    std::vector<std::string> known = detail::LibraryMethods::peft_types();
    std::sort(known.begin(), known.end());
    throw FileError(fmt::format("'{}': peft_type '{}' is not supported ({})", source, type, join_names(known)));
  }
  reader.check_unused();
  return *config;
}

}  // namespace peft
