#pragma once
/// @file
/// Builds the stages of a Hugging Face tokenizer.json (peft/hf/tokenizer.h) from its
/// JSON, as HF `tokenizers` deserialises them. A component of unknown type, a missing
/// or mistyped field, or a merge outside the vocabulary is a FileError naming the file,
/// the JSON path (e.g. `pre_tokenizer.pretokenizers[1]`) and the type.

#include <peft/core/error.h>
#include <peft/hf/tokenizer_components.h>
#include <peft/hf/tokenizer_models.h>

#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace hf {
namespace components {

/// A node of tokenizer.json with its path, for messages: FileError("'file': path: what").
struct JsonNode {
  const nlohmann::json& json;  ///< the node
  std::string path;            ///< e.g. "pre_tokenizer.pretokenizers[1]"
  const std::string& source;   ///< the file, for messages

  /// Throws FileError naming the file and this node's path.
  [[noreturn]] void fail(const std::string& what) const {
    throw FileError(fmt::format("'{}': {}: {}", source, path.empty() ? "(top level)" : path, what));
  }
  /// Whether `key` is present and not null.
  bool has(const std::string& key) const { return json.is_object() && json.contains(key) && !json.at(key).is_null(); }
  /// The child `key` (FileError when it is missing).
  JsonNode at(const std::string& key) const {
    if (!json.is_object() || !json.contains(key)) fail(fmt::format("missing field '{}'", key));
    return {json.at(key), path.empty() ? key : path + "." + key, source};
  }
  /// The elements of this list (FileError when it is not one).
  std::vector<JsonNode> items() const {
    if (!json.is_array()) fail("expected a list");
    std::vector<JsonNode> out;
    for (size_t i = 0; i < json.size(); ++i) out.push_back({json.at(i), fmt::format("{}[{}]", path, i), source});
    return out;
  }
  /// This node as T (FileError naming the expected kind when it is not).
  template <typename T>
  T as(const char* kind) const {
    try {
      return json.get<T>();
    } catch (const nlohmann::json::exception&) {
      fail(fmt::format("expected {}, got {}", kind, json.dump()));
    }
  }
  /// String field `key`, or `fallback` when absent or null.
  std::string str(const std::string& key, const std::string& fallback) const {
    return has(key) ? at(key).as<std::string>("a string") : fallback;
  }
  /// Boolean field `key`, or `fallback` when absent or null.
  bool flag(const std::string& key, bool fallback) const { return has(key) ? at(key).as<bool>("true or false") : fallback; }
  /// Non-negative integer field `key`, or `fallback` when absent or null.
  int64_t count(const std::string& key, int64_t fallback) const {
    if (!has(key)) return fallback;
    const auto v = at(key).as<int64_t>("an integer");
    if (v < 0) at(key).fail("expected a non-negative integer");
    return v;
  }
  /// The component's "type" (FileError when missing).
  std::string type() const { return at("type").as<std::string>("a type name"); }
  /// FileError for a type this implementation does not know, naming it and the supported ones.
  [[noreturn]] void unknown_type(const char* what, const char* supported) const {
    fail(fmt::format("unknown {} type '{}' (supported: {})", what, type(), supported));
  }
  /// A pattern field {"String": s} or {"Regex": r}, compiled.
  std::shared_ptr<const detail::Regex> pattern(const std::string& key) const {
    const JsonNode p = at(key);
    const bool literal = p.has("String");
    if (!literal && !p.has("Regex")) p.fail("expected {\"String\": ...} or {\"Regex\": ...}");
    try {
      return std::make_shared<detail::Regex>(p.str(literal ? "String" : "Regex", ""), literal);
    } catch (const ModelError& e) {
      p.fail(e.what());
    }
  }
  /// A one-character field (Metaspace's replacement, Strip's content).
  UChar32 one_char(const std::string& key, const std::string& fallback) const {
    const std::string s = str(key, fallback);
    if (detail::invalid_utf8_at(s) != std::string::npos || detail::code_point_count(s) != 1)
      at(key).fail("expected one character");
    size_t i = 0;
    return detail::next_code_point(s, i);
  }
};

/// Split behaviour names ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous").
inline SplitBehavior split_behavior(const JsonNode& n) {
  static const std::map<std::string, SplitBehavior> kNames = {
      {"Removed", SplitBehavior::kRemoved},
      {"Isolated", SplitBehavior::kIsolated},
      {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
      {"MergedWithNext", SplitBehavior::kMergedWithNext},
      {"Contiguous", SplitBehavior::kContiguous}};
  const std::string name = n.as<std::string>("a split behavior");
  auto it = kNames.find(name);
  if (it == kNames.end())
    n.fail(fmt::format("unknown split behavior '{}' (supported: Removed, Isolated, MergedWithPrevious, "
                       "MergedWithNext, Contiguous)", name));
  return it->second;
}

/// A normalizer from its JSON (null: none).
inline std::shared_ptr<const Normalizer> make_normalizer(const JsonNode& n) {
  if (n.json.is_null()) return nullptr;
  const std::string type = n.type();
  if (type == "NFC") return std::make_shared<UnicodeNormalizer>(detail::NormalForm::kNFC);
  if (type == "NFD") return std::make_shared<UnicodeNormalizer>(detail::NormalForm::kNFD);
  if (type == "NFKC") return std::make_shared<UnicodeNormalizer>(detail::NormalForm::kNFKC);
  if (type == "NFKD") return std::make_shared<UnicodeNormalizer>(detail::NormalForm::kNFKD);
  if (type == "Lowercase") return std::make_shared<Lowercase>();
  if (type == "StripAccents") return std::make_shared<StripAccents>();
  if (type == "Replace") return std::make_shared<Replace>(n.pattern("pattern"), n.at("content").as<std::string>("a string"));
  if (type == "Prepend") return std::make_shared<Prepend>(n.at("prepend").as<std::string>("a string"));
  if (type == "Strip") return std::make_shared<StripNormalizer>(n.flag("strip_left", true), n.flag("strip_right", true));
  if (type == "BertNormalizer") {
    const bool lowercase = n.flag("lowercase", true);
    return std::make_shared<BertNormalizer>(n.flag("clean_text", true), n.flag("handle_chinese_chars", true),
                                            n.flag("strip_accents", lowercase), lowercase);
  }
  if (type == "Sequence") {
    std::vector<std::shared_ptr<const Normalizer>> steps;
    for (const auto& item : n.at("normalizers").items()) steps.push_back(make_normalizer(item));
    return std::make_shared<NormalizerSequence>(std::move(steps));
  }
  n.unknown_type("normalizer", "NFC, NFD, NFKC, NFKD, Lowercase, StripAccents, Replace, Prepend, Strip, BertNormalizer, Sequence");
}

/// Metaspace's settings, with the legacy add_prefix_space field as HF reads it.
inline Metaspace make_metaspace(const JsonNode& n) {
  static const std::map<std::string, PrependScheme> kSchemes = {
      {"first", PrependScheme::kFirst}, {"always", PrependScheme::kAlways}, {"never", PrependScheme::kNever}};
  const std::string name = n.str("prepend_scheme", "always");
  auto it = kSchemes.find(name);
  if (it == kSchemes.end()) n.at("prepend_scheme").fail(fmt::format("unknown prepend_scheme '{}' (first, always, never)", name));
  if (n.has("add_prefix_space") && !n.flag("add_prefix_space", true) && it->second != PrependScheme::kNever)
    n.fail("add_prefix_space does not match declared prepend_scheme");
  std::string replacement;
  detail::append_utf8(replacement, n.one_char("replacement", "\xE2\x96\x81"));
  return Metaspace(replacement, it->second, n.flag("split", true));
}

/// A pre-tokenizer from its JSON (null: none).
inline std::shared_ptr<const PreTokenizer> make_pre_tokenizer(const JsonNode& n) {
  if (n.json.is_null()) return nullptr;
  const std::string type = n.type();
  if (type == "Split")
    return std::make_shared<Split>(n.pattern("pattern"), split_behavior(n.at("behavior")), n.at("invert").as<bool>("true or false"));
  if (type == "ByteLevel") return std::make_shared<ByteLevel>(n.flag("add_prefix_space", true), n.flag("use_regex", true));
  if (type == "Whitespace") return std::make_shared<Whitespace>();
  if (type == "WhitespaceSplit") return std::make_shared<WhitespaceSplit>();
  if (type == "BertPreTokenizer") return std::make_shared<BertPreTokenizer>();
  if (type == "Metaspace") return std::make_shared<Metaspace>(make_metaspace(n));
  if (type == "Digits") return std::make_shared<Digits>(n.flag("individual_digits", false));
  if (type == "Punctuation")
    return std::make_shared<Punctuation>(n.has("behavior") ? split_behavior(n.at("behavior")) : SplitBehavior::kIsolated);
  if (type == "CharDelimiterSplit") return std::make_shared<CharDelimiterSplit>(n.one_char("delimiter", ""));
  if (type == "Sequence") {
    std::vector<std::shared_ptr<const PreTokenizer>> steps;
    for (const auto& item : n.at("pretokenizers").items()) steps.push_back(make_pre_tokenizer(item));
    return std::make_shared<PreTokenizerSequence>(std::move(steps));
  }
  n.unknown_type("pre_tokenizer",
                 "Split, ByteLevel, Whitespace, WhitespaceSplit, BertPreTokenizer, Metaspace, Digits, Punctuation, "
                 "CharDelimiterSplit, Sequence");
}

/// A model's "vocab" object (token -> id).
inline Vocabulary make_vocabulary(const JsonNode& n) {
  if (!n.json.is_object()) n.fail("expected an object of token -> id");
  Vocabulary vocab;
  for (const auto& [token, id] : n.json.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      n.fail(fmt::format("token '{}' has id {}, not an integer in [0, 2^31)", token, id.dump()));
    vocab.add(token, id.get<int64_t>());
  }
  return vocab;
}

/// BPE merges as "a b" strings or ["a", "b"] pairs.
inline std::vector<std::pair<std::string, std::string>> make_merges(const JsonNode& n) {
  std::vector<std::pair<std::string, std::string>> merges;
  for (const auto& item : n.items()) {
    if (item.json.is_array() && item.json.size() == 2 && item.json[0].is_string() && item.json[1].is_string()) {
      merges.emplace_back(item.json[0].get<std::string>(), item.json[1].get<std::string>());
      continue;
    }
    const std::string line = item.as<std::string>("a merge (\"a b\" or [\"a\", \"b\"])");
    const size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
      item.fail(fmt::format("merge '{}' is not two tokens separated by one space", line));
    merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }
  return merges;
}

/// The model from its JSON: BPE, WordPiece or WordLevel.
inline std::shared_ptr<const Model> make_model(const JsonNode& n) {
  const std::string type = n.has("type") ? n.type() : n.has("merges") ? "BPE" : "";
  auto optional = [&](const char* key) { return n.has(key) ? std::optional<std::string>(n.str(key, "")) : std::nullopt; };
  try {
    if (type == "BPE") {
      if (n.has("dropout") && n.at("dropout").as<double>("a number") > 0)
        n.at("dropout").fail("BPE dropout is random at encoding time: not supported (set it to null)");
      BpeConfig config{optional("unk_token"), optional("continuing_subword_prefix"), optional("end_of_word_suffix"),
                       n.flag("fuse_unk", false), n.flag("byte_fallback", false), n.flag("ignore_merges", false)};
      return std::make_shared<Bpe>(make_vocabulary(n.at("vocab")), make_merges(n.at("merges")), std::move(config));
    }
    if (type == "WordPiece")
      return std::make_shared<WordPiece>(make_vocabulary(n.at("vocab")), n.str("unk_token", "[UNK]"),
                                         n.str("continuing_subword_prefix", "##"),
                                         static_cast<size_t>(n.count("max_input_chars_per_word", 100)));
    if (type == "WordLevel") return std::make_shared<WordLevel>(make_vocabulary(n.at("vocab")), n.str("unk_token", "<unk>"));
  } catch (const ModelError& e) {
    n.fail(e.what());
  }
  if (type.empty()) n.fail("missing field 'type'");
  n.unknown_type("model", "BPE, WordPiece, WordLevel");
}

/// One piece of a TemplateProcessing template: {"Sequence": {"id": "A"}} or {"SpecialToken": {"id": ...}}.
inline TemplatePiece make_template_piece(const JsonNode& n) {
  TemplatePiece p;
  p.is_sequence = n.has("Sequence");
  if (!p.is_sequence && !n.has("SpecialToken")) n.fail("expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
  const JsonNode body = n.at(p.is_sequence ? "Sequence" : "SpecialToken");
  const std::string id = body.at("id").as<std::string>("a string");
  p.type_id = body.count("type_id", 0);
  if (!p.is_sequence) p.special = id;
  else if (id == "A" || id == "B") p.sequence = id == "B";
  else body.at("id").fail(fmt::format("sequence id '{}' is neither A nor B", id));
  return p;
}

/// TemplateProcessing from its JSON; every special token the templates use must be defined.
inline std::shared_ptr<const PostProcessor> make_template(const JsonNode& n) {
  std::map<std::string, std::vector<int64_t>> special;
  const JsonNode tokens = n.at("special_tokens");
  if (!tokens.json.is_object()) tokens.fail("expected an object");
  for (const auto& [name, _] : tokens.json.items()) {
    const JsonNode t = tokens.at(name);
    special[name] = t.at("ids").as<std::vector<int64_t>>("a list of ids");
  }
  std::vector<TemplatePiece> templates[2];
  for (int k = 0; k < 2; ++k) {
    const JsonNode list = n.at(k == 0 ? "single" : "pair");
    for (const auto& item : list.items()) {
      templates[k].push_back(make_template_piece(item));
      if (!templates[k].back().is_sequence && !special.count(templates[k].back().special))
        item.fail(fmt::format("special token '{}' is not in special_tokens", templates[k].back().special));
    }
  }
  return std::make_shared<TemplateProcessing>(std::move(templates[0]), std::move(templates[1]), std::move(special));
}

/// A post-processor from its JSON (null: none).
inline std::shared_ptr<const PostProcessor> make_post_processor(const JsonNode& n) {
  if (n.json.is_null()) return nullptr;
  const std::string type = n.type();
  auto token_id = [&](const char* key) {
    const JsonNode t = n.at(key);
    if (!t.json.is_array() || t.json.size() != 2 || !t.json[1].is_number_integer()) t.fail("expected [token, id]");
    return t.json[1].get<int64_t>();
  };
  if (type == "TemplateProcessing") return make_template(n);
  if (type == "BertProcessing") return std::make_shared<BertProcessing>(token_id("cls"), token_id("sep"), false);
  if (type == "RobertaProcessing") return std::make_shared<BertProcessing>(token_id("cls"), token_id("sep"), true);
  if (type == "ByteLevel") return std::make_shared<ByteLevelProcessing>();
  if (type == "Sequence") {
    std::vector<std::shared_ptr<const PostProcessor>> steps;
    for (const auto& item : n.at("processors").items()) steps.push_back(make_post_processor(item));
    return std::make_shared<PostProcessorSequence>(std::move(steps));
  }
  n.unknown_type("post_processor", "TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence");
}

/// A decoder from its JSON (null: none, tokens joined with spaces).
inline std::shared_ptr<const Decoder> make_decoder(const JsonNode& n) {
  if (n.json.is_null()) return nullptr;
  const std::string type = n.type();
  if (type == "ByteLevel") return std::make_shared<ByteLevelDecoder>();
  if (type == "WordPiece") return std::make_shared<WordPieceDecoder>(n.str("prefix", "##"), n.flag("cleanup", true));
  if (type == "Metaspace") return std::make_shared<MetaspaceDecoder>(make_metaspace(n));
  if (type == "Replace")
    return std::make_shared<ReplaceDecoder>(Replace(n.pattern("pattern"), n.at("content").as<std::string>("a string")));
  if (type == "ByteFallback") return std::make_shared<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_shared<FuseDecoder>();
  if (type == "Strip")
    return std::make_shared<StripDecoder>(n.one_char("content", " "), static_cast<size_t>(n.count("start", 0)),
                                          static_cast<size_t>(n.count("stop", 0)));
  if (type == "BPEDecoder") return std::make_shared<BpeDecoder>(n.str("suffix", "</w>"));
  if (type == "Sequence") {
    std::vector<std::shared_ptr<const Decoder>> steps;
    for (const auto& item : n.at("decoders").items()) steps.push_back(make_decoder(item));
    return std::make_shared<DecoderSequence>(std::move(steps));
  }
  n.unknown_type("decoder", "ByteLevel, WordPiece, Metaspace, Replace, ByteFallback, Fuse, Strip, BPEDecoder, Sequence");
}

}  // namespace components
}  // namespace hf
}  // namespace peft
