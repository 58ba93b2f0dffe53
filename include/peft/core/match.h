#pragma once
/// @file
/// Target-module rules, exactly as HF peft documents them: a list entry
/// matches a dotted module name exactly or as a suffix after a dot; a single string is
/// a regex that must match the whole name; `exclude_modules` first;
/// `layers_to_transform` with `layers_pattern`; per-module patterns.

#include <peft/core/error.h>

#include <algorithm>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace peft {

/// Which modules a method targets: a list of names (exact, or a suffix after a dot), one
/// regex (full match), or "all-linear" (every linear layer except the output head).
///
/// ```
/// peft::TargetModules list = {"q_proj", "v_proj"};
/// peft::TargetModules regex = ".*layers\\.[01]\\.self_attn\\.(q|v)_proj";
/// peft::TargetModules all = "all-linear";
/// ```
class TargetModules {
 public:
  TargetModules() = default;
  /// Module names, each matched exactly or as a suffix after a dot.
  TargetModules(std::initializer_list<std::string> names) : names_(names) {}
  /// Module names, each matched exactly or as a suffix after a dot.
  TargetModules(std::vector<std::string> names) : names_(std::move(names)) {}
  /// A regex that must match a whole module name, or "all-linear".
  TargetModules(std::string regex_or_all_linear) { set_string(std::move(regex_or_all_linear)); }
  /// A regex that must match a whole module name, or "all-linear".
  TargetModules(const char* regex_or_all_linear) { set_string(regex_or_all_linear); }

  /// Whether nothing is selected.
  bool empty() const { return names_.empty() && !regex_ && !all_linear_; }
  /// Whether this is "all-linear".
  bool is_all_linear() const { return all_linear_; }
  /// Whether this is one regex (rather than a list of names).
  bool is_regex() const { return regex_.has_value(); }
  /// The listed names (empty for a regex or all-linear).
  const std::vector<std::string>& names() const { return names_; }
  /// The regex; only when is_regex().
  const std::string& regex() const { return *regex_; }

  /// Whether `module_name` is selected by this rule (all-linear is decided by the caller).
  bool matches(const std::string& module_name) const {
    if (all_linear_) return true;
    if (regex_) return std::regex_match(module_name, std::regex(*regex_));
    return std::any_of(names_.begin(), names_.end(), [&](const std::string& key) { return matches_key(module_name, key); });
  }

  /// The list entries (or the regex) that select `module_name`.
  std::vector<std::string> patterns_matching(const std::string& module_name) const {
    if (regex_) return matches(module_name) ? std::vector<std::string>{*regex_} : std::vector<std::string>{};
    std::vector<std::string> out;
    for (const auto& key : names_)
      if (matches_key(module_name, key)) out.push_back(key);
    return out;
  }

  /// Every pattern, for "matched nothing" checks.
  std::vector<std::string> patterns() const {
    if (all_linear_) return {"all-linear"};
    if (regex_) return {*regex_};
    return names_;
  }

  /// HF's suffix rule: `name == key` or `name` ends with `"." + key`.
  static bool matches_key(const std::string& name, const std::string& key) {
    if (name == key) return true;
    return name.size() > key.size() && name.compare(name.size() - key.size(), key.size(), key) == 0 &&
           name[name.size() - key.size() - 1] == '.';
  }

 private:
  void set_string(std::string s) {
    if (s == "all-linear") {
      all_linear_ = true;
      return;
    }
    try {
      std::regex check(s);
    } catch (const std::regex_error& e) {
      throw OptionError("target_modules: '" + s + "' is not a valid regex: " + e.what());
    }
    regex_ = std::move(s);
  }

  std::vector<std::string> names_;
  std::optional<std::string> regex_;
  bool all_linear_ = false;
};

/// `regex` compiled; OptionError saying that `what` (the user's field and
/// pattern that `regex` is built from) is not a valid regex.
inline std::regex checked_regex(const std::string& regex, const std::string& what) {
  try {
    return std::regex(regex);
  } catch (const std::regex_error& e) {
    throw OptionError(fmt::format("{} is not a valid regex: {}", what, e.what()));
  }
}

/// The layer index in a module name, for layers_to_transform: the number right
/// after the first component matching one of `layers_pattern` (regexes) and a dot,
/// or, with no pattern, the first numeric component that follows a word; empty when
/// the name has none. The search stops at the first such place, so an index nested
/// deeper (the expert in `layers.1.mlp.experts.0.w1`) never counts (HF peft matches
/// lazily since it fixed the same bug; unlike HF, a pattern may also start the name).
inline std::optional<int64_t> layer_index(const std::string& module_name, const std::vector<std::string>& layers_pattern) {
  // `(?:|.*?\.)` tries the empty prefix first, then ever longer ones: the first place wins.
  const std::string prefix = R"(^(?:|.*?\.))";
  std::vector<std::pair<std::string, std::string>> components;  // (regex, what the user wrote)
  if (layers_pattern.empty()) components.emplace_back(R"([^.]*[^.0-9][^.]*)", "");
  for (const auto& pattern : layers_pattern) components.emplace_back("(?:" + pattern + ")", pattern);
  std::optional<std::pair<size_t, int64_t>> first;  // (position, index) of the earliest match
  for (const auto& [component, written] : components) {
    std::smatch m;
    // The index ends the name (the layer itself) or is followed by a dot; it is the
    // last group, whatever groups a pattern brings.
    if (std::regex_search(module_name, m, checked_regex(prefix + component + R"(\.(\d+)(?:\.|$))",
                                                        "layers_pattern '" + written + "'")) &&
        (!first || static_cast<size_t>(m.position(m.size() - 1)) < first->first))
      first = std::make_pair(static_cast<size_t>(m.position(m.size() - 1)), std::stoll(m[m.size() - 1].str()));
  }
  return first ? std::optional<int64_t>(first->second) : std::nullopt;
}

/// Whether a rank_pattern / alpha_pattern key selects `module_name`: as a regex, it
/// fully matches the name or the part after some dot.
inline bool pattern_key_matches(const std::string& key, const std::string& module_name) {
  return std::regex_match(module_name,
                          checked_regex("(.*\\.)?(" + key + ")", "rank_pattern / alpha_pattern key '" + key + "'"));
}

/// The rank_pattern / alpha_pattern lookup of HF peft.
/// Returns the value of the first key that, as a regex, fully matches the
/// module name or the part of it after some dot.
template <typename T>
std::optional<T> pattern_value(const std::map<std::string, T>& patterns, const std::string& module_name) {
  for (const auto& [key, value] : patterns)
    if (pattern_key_matches(key, module_name)) return value;
  return std::nullopt;
}

/// The keys of `patterns` that select none of `modules`.
template <typename T>
std::vector<std::string> unmatched_keys(const std::map<std::string, T>& patterns, const std::vector<std::string>& modules) {
  std::vector<std::string> out;
  for (const auto& entry : patterns)
    if (std::none_of(modules.begin(), modules.end(), [&](const std::string& m) { return pattern_key_matches(entry.first, m); }))
      out.push_back(entry.first);
  return out;
}

/// "a, b, c" (at most `limit` names, then "... (N more)").
inline std::string join_names(const std::vector<std::string>& names, size_t limit = 24) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < limit; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > limit) out += ", ... (" + std::to_string(names.size() - limit) + " more)";
  return out;
}

}  // namespace peft

namespace peft {

/// The module-selection fields every injected method shares (HF peft's names).
///
/// ```
/// peft::TargetRule rule{peft::TargetModules({"q_proj"}), {}, {0, 1}, {"layers"}};
/// ```
struct TargetRule {
  /// Modules to select.
  TargetModules target_modules;
  /// Modules never selected.
  TargetModules exclude_modules;
  /// Only these layer indices (empty: all).
  std::vector<int64_t> layers_to_transform;
  /// Names of the layer lists the indices refer to.
  std::vector<std::string> layers_pattern;
  /// A config read from a file (HF's rule): a pattern that matches nothing is
  /// only warned about while another one matches. A config built in code is
  /// strict: each pattern must match (a typo is an error).
  bool from_file = false;
};

/// Reports `keys` of a per-module field (rank_pattern, ...) that match no targeted
/// module: TargetError for a config built in code, a warning for one read from a file.
inline void report_unmatched(const std::vector<std::string>& keys, bool from_file, const std::string& what,
                             const std::vector<std::string>& candidates) {
  if (keys.empty()) return;
  std::vector<std::string> quoted;
  for (const auto& key : keys) quoted.push_back("'" + key + "'");
  check<TargetError>(from_file, "{}: key {} matches no targeted module; targeted modules: {}", what,
                     join_names(quoted), join_names(candidates));
  warn("{}: key {} matches no targeted module and is ignored", what, join_names(quoted));
}

/// Selects the modules among `names` that `rule` targets. `eligible` says
/// whether a module can take the method; `eligible_kind` names that for errors
/// ("linear layer"). Throws TargetError when the rule is empty, when a pattern
/// matches nothing, or when it matches a module that is not eligible; the
/// message names the pattern and lists the candidates.
inline std::vector<std::string> select_targets(const std::vector<std::string>& names,
                                               const std::vector<std::string>& eligible, const TargetRule& rule,
                                               const std::string& method, const std::string& eligible_kind) {
  const TargetModules& target = rule.target_modules;
  check<TargetError>(!target.empty(), "{}: target_modules is empty; candidates ({}s): {}", method, eligible_kind,
                     join_names(eligible));
  auto is_eligible = [&](const std::string& n) { return std::find(eligible.begin(), eligible.end(), n) != eligible.end(); };
  auto in_layers = [&](const std::string& n) {
    if (rule.layers_to_transform.empty()) return true;
    auto index = layer_index(n, rule.layers_pattern);
    return index && std::find(rule.layers_to_transform.begin(), rule.layers_to_transform.end(), *index) !=
                        rule.layers_to_transform.end();
  };
  std::vector<std::string> selected;
  std::map<std::string, int> hits;
  for (const auto& name : target.is_all_linear() ? eligible : names) {
    auto patterns = target.is_all_linear() ? std::vector<std::string>{"all-linear"} : target.patterns_matching(name);
    if (name.empty() || patterns.empty() || !in_layers(name)) continue;
    for (const auto& p : patterns) ++hits[p];  // an excluded match still counts as a match
    if (!rule.exclude_modules.empty() && rule.exclude_modules.matches(name)) continue;
    check<TargetError>(is_eligible(name), "{}: module '{}' (matched by target_modules '{}') is not a {}; {}s: {}",
                       method, name, patterns.front(), eligible_kind, eligible_kind, join_names(eligible));
    selected.push_back(name);
  }
  std::vector<std::string> unmatched;
  for (const auto& pattern : target.patterns())
    if (hits[pattern] == 0) unmatched.push_back(pattern);
  const std::string where = rule.layers_to_transform.empty() ? "" : " in layers_to_transform";
  check<TargetError>(unmatched.empty() || (rule.from_file && unmatched.size() < target.patterns().size()),
                     "{}: target_modules pattern '{}' matched no module{}; candidates ({}s): {}", method,
                     join_names(unmatched), where, eligible_kind, join_names(eligible));
  if (!unmatched.empty())
    warn("{}: target_modules pattern {} matched no module{} and is ignored", method, join_names(unmatched), where);
  check<TargetError>(!selected.empty(), "{}: every module target_modules matched is excluded by exclude_modules", method);
  return selected;
}

}  // namespace peft
