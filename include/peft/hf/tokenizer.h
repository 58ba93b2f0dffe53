#pragma once
/// @file
/// Hugging Face tokenizers in C++: a tokenizer.json (byte-level BPE of GPT-2, Llama 3
/// and Qwen; WordPiece of BERT; Metaspace/byte-fallback BPE of Llama 2 and Mistral)
/// encoded and decoded to the same ids and text as HF `tokenizers` 0.23, and model
/// folders read as transformers' AutoTokenizer does. Needs ICU (ICU::uc, ICU::i18n).
///
/// ```
/// auto tok = peft::hf::AutoTokenizer::from_pretrained("Llama-3.2-1B");
/// std::vector<int64_t> ids = tok.encode("Hello world");
/// auto batch = tok.encode_batch({"a", "bb cc"}, peft::hf::PaddingOptions().max_length(128).truncation(true));
/// ```

#include <peft/core/error.h>
#include <peft/hf/tokenizer_json.h>
#include <peft/io/atomic_file.h>

#include <nlohmann/json.hpp>
#include <torch/arg.h>
#include <torch/types.h>

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace peft {
namespace hf {

/// A token of tokenizer.json's `added_tokens`, matched in the text before the model runs (HF's AddedToken).
struct AddedToken {
  std::string content;       ///< the text of the token
  bool single_word = false;  ///< matches only when not inside a word (no word character either side)
  bool lstrip = false;       ///< takes the whitespace before it
  bool rstrip = false;       ///< takes the whitespace after it
  bool normalized = true;    ///< matched in the normalised text (its normalised form), else in the raw text
  bool special = false;      ///< skipped by decode(ids, skip_special_tokens=true)
};

namespace detail {

/// HF's AddedVocabulary: ids of the added tokens and their leftmost-longest matching in the text.
class AddedVocabulary {
 public:
  /// Adds `tokens` as HF's add_tokens does: a token the model knows keeps the model's id,
  /// a new one takes the next id after the model's vocabulary and the added tokens.
  void add(const std::vector<AddedToken>& tokens, const components::Model& model, const components::Normalizer* normalizer) {
    int64_t next = model.vocab().size();
    if (!by_id_.empty() && (by_id_.rbegin()->first >= next || next == 0)) next = by_id_.rbegin()->first + 1;
    for (const auto& t : tokens) {
      if (t.content.empty()) continue;
      const auto known = id(t.content);
      const int64_t* in_model = model.vocab().find(t.content);
      const int64_t new_id = known ? *known : in_model ? *in_model : next++;
      normalized_form_.erase(new_id);
      if (t.normalized && normalizer) {
        std::string s = t.content;
        normalizer->normalize(s);
        if (s != t.content) normalized_form_[new_id] = s;
      }
      ids_[t.content] = new_id;
      if (t.special) special_.insert(t.content);
      by_id_[new_id] = t;
    }
    rebuild();
  }
  /// The id of added token `content`.
  std::optional<int64_t> id(const std::string& content) const {
    auto it = ids_.find(content);
    return it == ids_.end() ? std::nullopt : std::optional<int64_t>(it->second);
  }
  /// The string of added token `id` for decoding (its normalised form when it is normalised), or nullptr.
  const std::string* token(int64_t id) const {
    auto n = normalized_form_.find(id);
    if (n != normalized_form_.end()) return &n->second;
    auto it = by_id_.find(id);
    return it == by_id_.end() ? nullptr : &it->second.content;
  }
  /// Whether `content` is a special token.
  bool is_special(const std::string& content) const { return special_.count(content) > 0; }
  /// Contents -> ids.
  const std::unordered_map<std::string, int64_t>& ids() const { return ids_; }

  /// HF's extract_and_normalize: the raw text cut at the non-normalised tokens, each other piece
  /// normalised and cut at the normalised tokens.
  components::Pieces extract_and_normalize(const components::Normalizer* normalizer, const std::string& text) const {
    components::Pieces pieces{{text, true, false, {}}};
    components::split_pieces(pieces, [&](const components::Piece& p) { return split(p, raw_); });
    components::split_pieces(pieces, [&](const components::Piece& p) {
      components::Piece q = p;
      if (normalizer) normalizer->normalize(q.text);
      return split(q, normalized_);
    });
    return pieces;
  }

 private:
  /// A byte trie of token contents, for leftmost-longest matching.
  struct Trie {
    std::vector<std::unordered_map<unsigned char, int32_t>> next{1};
    std::vector<int64_t> value{-1};
    bool first[256] = {};
    void insert(const std::string& s, int64_t id) {
      int32_t node = 0;
      for (unsigned char b : s) {
        auto it = next[static_cast<size_t>(node)].find(b);
        if (it == next[static_cast<size_t>(node)].end()) {
          next.emplace_back();
          value.push_back(-1);
          it = next[static_cast<size_t>(node)].emplace(b, static_cast<int32_t>(next.size() - 1)).first;
        }
        node = it->second;
      }
      value[static_cast<size_t>(node)] = id;
      first[static_cast<unsigned char>(s[0])] = true;
    }
    /// The longest token starting at `pos`: (end, id), or (0, -1).
    std::pair<size_t, int64_t> longest(const std::string& s, size_t pos) const {
      std::pair<size_t, int64_t> best{0, -1};
      int32_t node = 0;
      for (size_t i = pos; i < s.size(); ++i) {
        auto it = next[static_cast<size_t>(node)].find(static_cast<unsigned char>(s[i]));
        if (it == next[static_cast<size_t>(node)].end()) break;
        node = it->second;
        if (value[static_cast<size_t>(node)] >= 0) best = {i + 1, value[static_cast<size_t>(node)]};
      }
      return best;
    }
  };

  void rebuild() {
    raw_ = Trie();
    normalized_ = Trie();
    for (const auto& [id, t] : by_id_) {
      auto n = normalized_form_.find(id);
      if (t.normalized) normalized_.insert(n != normalized_form_.end() ? n->second : t.content, id);
      else raw_.insert(t.content, id);
    }
  }

  /// The code point ending at byte `end` of `s`.
  static UChar32 code_point_before(const std::string& s, size_t end) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    return hf::detail::next_code_point(s, start);
  }

  /// HF's find_matches: (id or -1, range) covering `s`, with single_word, lstrip and rstrip applied.
  std::vector<std::pair<int64_t, std::pair<size_t, size_t>>> find(const std::string& s, const Trie& trie) const {
    std::vector<std::pair<int64_t, std::pair<size_t, size_t>>> out;
    size_t done = 0;
    for (size_t pos = 0; pos < s.size();) {
      const auto [end, id] = trie.first[static_cast<unsigned char>(s[pos])] ? trie.longest(s, pos) : std::pair<size_t, int64_t>(0, -1);
      if (id < 0) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = end;
      pos = end;
      const AddedToken& t = by_id_.at(id);
      if (t.single_word && ((start > 0 && hf::detail::is_word_char(code_point_before(s, start))) ||
                            (stop < s.size() && hf::detail::is_word_char(front(s, stop)))))
        continue;
      if (t.lstrip) {
        while (start > done && hf::detail::is_whitespace(code_point_before(s, start)))
          do --start;
          while ((static_cast<unsigned char>(s[start]) & 0xC0) == 0x80);
      }
      while (t.rstrip && stop < s.size() && hf::detail::is_whitespace(front(s, stop))) {
        hf::detail::next_code_point(s, stop);
      }
      if (done < start) out.push_back({-1, {done, start}});
      out.push_back({id, {start, stop}});
      done = stop;
    }
    if (done != s.size() || s.empty()) out.push_back({-1, {done, s.size()}});
    return out;
  }
  static UChar32 front(const std::string& s, size_t at) { return hf::detail::next_code_point(s, at); }

  /// `p` cut at the tokens of `trie`: added tokens become token pieces.
  components::Pieces split(const components::Piece& p, const Trie& trie) const {
    components::Pieces out;
    for (const auto& [id, range] : find(p.text, trie)) {
      components::Piece q{p.text.substr(range.first, range.second - range.first), p.at_origin && range.first == 0, id >= 0, {}};
      if (id >= 0) q.ids.push_back(id);
      out.push_back(std::move(q));
    }
    return out;
  }

  std::unordered_map<std::string, int64_t> ids_;
  std::map<int64_t, AddedToken> by_id_;
  std::map<int64_t, std::string> normalized_form_;
  std::set<std::string> special_;
  Trie raw_, normalized_;
};

}  // namespace detail

/// How encode_batch pads: to the batch's longest sequence, or to max_length.
enum class PaddingStrategy { kLongest, kMaxLength };

/// Options of Tokenizer::encode_batch, as transformers' tokenizer(texts, ...) takes them.
struct PaddingOptions {
  /// kLongest: pad to the longest sequence of the batch; kMaxLength: to max_length.
  TORCH_ARG(PaddingStrategy, padding) = PaddingStrategy::kLongest;
  /// Length cap, special tokens included (truncation, kMaxLength). Unset: the tokenizer's model_max_length.
  TORCH_ARG(c10::optional<int64_t>, max_length) = c10::nullopt;
  /// Cut sequences longer than max_length (the special tokens are kept).
  TORCH_ARG(bool, truncation) = false;
  /// "left" or "right"; unset: the tokenizer's padding_side().
  TORCH_ARG(c10::optional<std::string>, padding_side) = c10::nullopt;
  /// "left" or "right": which end truncation cuts; unset: the tokenizer's truncation_side().
  TORCH_ARG(c10::optional<std::string>, truncation_side) = c10::nullopt;
  /// Round the padded length up to a multiple of this (0: no rounding).
  TORCH_ARG(int64_t, pad_to_multiple_of) = 0;
  /// Add the post-processor's special tokens ([CLS]/[SEP], `<s>`, ...).
  TORCH_ARG(bool, add_special_tokens) = true;
};

/// The padded batch of Tokenizer::encode_batch.
struct BatchEncoding {
  torch::Tensor input_ids;       ///< [B, T] int64, padded with pad_token_id on the padding side
  torch::Tensor attention_mask;  ///< [B, T] int64: 1 for tokens, 0 for padding
  torch::Tensor token_type_ids;  ///< [B, T] int64: the post-processor's type ids, 0 for padding
};

/// A Hugging Face tokenizer: the pipeline of a tokenizer.json (added tokens, normalizer,
/// pre-tokenizer, model, post-processor, decoder), with the same ids and text as HF
/// `tokenizers`, plus the special tokens and padding side of a model folder
/// (AutoTokenizer). Thread-safe for encoding and decoding; copies share the pipeline.
class Tokenizer {
 public:
  /// Reads a tokenizer.json. FileError naming the file when it is missing or not JSON, and
  /// naming the JSON path and type for a component this implementation does not know.
  static Tokenizer from_file(const std::filesystem::path& path) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(io::read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw FileError(fmt::format("'{}': not valid JSON ({})", path.string(), e.what()));
    }
    return from_json(j, path.string());
  }

  /// Builds a tokenizer from the parsed JSON of a tokenizer.json; `source` names it in errors.
  static Tokenizer from_json(const nlohmann::json& j, const std::string& source = "tokenizer.json") {
    const components::JsonNode root{j, "", source};
    if (!j.is_object()) root.fail("expected a JSON object (a tokenizer.json)");
    Tokenizer t;
    t.source_ = source;
    t.model_ = components::make_model(root.at("model"));
    auto part = [&](const char* key) { return components::JsonNode{root.has(key) ? j.at(key) : null_json(), key, source}; };
    t.normalizer_ = components::make_normalizer(part("normalizer"));
    t.pre_tokenizer_ = components::make_pre_tokenizer(part("pre_tokenizer"));
    t.post_processor_ = components::make_post_processor(part("post_processor"));
    t.decoder_ = components::make_decoder(part("decoder"));
    t.read_truncation(part("truncation"));
    t.read_padding(part("padding"));
    std::vector<AddedToken> added;
    if (root.has("added_tokens"))
      for (const auto& n : root.at("added_tokens").items()) added.push_back(read_added_token(n));
    t.added_->add(added, *t.model_, t.normalizer_.get());
    return t;
  }

  /// The ids of `text` (UTF-8), HF's encode(text, add_special_tokens).ids: added tokens, normaliser,
  /// pre-tokenizer, model, then tokenizer.json's truncation, post-processor and padding.
  /// OptionError when `text` is not valid UTF-8.
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const {
    auto e = encode_sequence(text);
    if (truncation_) truncate(e, truncation_->first, truncation_->second, add_special_tokens);
    e = post_process(std::move(e), add_special_tokens);
    if (padding_) pad_to_file_padding(e);
    return e.ids;
  }

  /// `texts` encoded and padded into [B, T] tensors, as transformers' tokenizer(texts, ...) does:
  /// tokenizer.json's own truncation and padding are replaced by `options`. OptionError for a
  /// bad side name, a sequence longer than max_length without truncation under kMaxLength, or
  /// padding needed without a pad token.
  BatchEncoding encode_batch(const std::vector<std::string>& texts, const PaddingOptions& options = {}) const {
    const auto max_length = checked_max_length(options);
    const bool left_cut = side(options.truncation_side().value_or(truncation_side_), "truncation_side");
    std::vector<components::Encoding> rows;
    int64_t longest = 0;
    for (const auto& text : texts) {
      auto e = encode_sequence(text);
      if (options.truncation()) truncate(e, static_cast<size_t>(*max_length), left_cut, options.add_special_tokens());
      rows.push_back(post_process(std::move(e), options.add_special_tokens()));
      longest = std::max(longest, static_cast<int64_t>(rows.back().ids.size()));
    }
    int64_t length = options.padding() == PaddingStrategy::kMaxLength ? *max_length : longest;
    if (options.pad_to_multiple_of() > 0 && length % options.pad_to_multiple_of() != 0)
      length += options.pad_to_multiple_of() - length % options.pad_to_multiple_of();
    return to_tensors(rows, length, side(options.padding_side().value_or(padding_side_), "padding_side"));
  }

  /// The text of `ids` (HF's decode): tokens through the decoder, special tokens dropped when
  /// `skip_special_tokens`. ShapeError naming an id that is in neither the vocabulary nor the added tokens.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int64_t id : ids) {
      const std::string* token = added_->token(id);
      if (!token) token = model_->vocab().token(id);
      check<ShapeError>(token != nullptr, "decode: id {} is not in the vocabulary of '{}' ({} tokens)", id, source_, vocab_size());
      if (!(skip_special_tokens && added_->is_special(*token))) tokens.push_back(*token);
    }
    if (!decoder_) return join(tokens, " ");
    decoder_->decode_chain(tokens);
    return join(tokens, "");
  }

  /// The id of `token` (added tokens first, then the model's vocabulary), if any.
  std::optional<int64_t> token_to_id(const std::string& token) const {
    if (auto id = added_->id(token)) return id;
    const int64_t* id = model_->vocab().find(token);
    return id ? std::optional<int64_t>(*id) : std::nullopt;
  }
  /// The token of `id`, if any (an added token as decode sees it).
  std::optional<std::string> id_to_token(int64_t id) const {
    const std::string* token = added_->token(id);
    if (!token) token = model_->vocab().token(id);
    return token ? std::optional<std::string>(*token) : std::nullopt;
  }
  /// HF's get_vocab_size: the model's tokens, plus the added tokens it lacks when `with_added_tokens`.
  int64_t vocab_size(bool with_added_tokens = true) const {
    int64_t n = model_->vocab().size();
    if (with_added_tokens)
      for (const auto& entry : added_->ids()) n += model_->vocab().find(entry.first) == nullptr;
    return n;
  }

  /// The padding token's id (tokenizer_config.json's pad_token, or tokenizer.json's padding), if any.
  std::optional<int64_t> pad_token_id() const { return id_of(pad_token_); }
  /// The beginning-of-sequence token's id (tokenizer_config.json's bos_token), if any.
  std::optional<int64_t> bos_token_id() const { return id_of(bos_token_); }
  /// The end-of-sequence token's id (tokenizer_config.json's eos_token), if any.
  std::optional<int64_t> eos_token_id() const { return id_of(eos_token_); }
  /// The unknown token's id (tokenizer_config.json's unk_token, or the model's), if any.
  std::optional<int64_t> unk_token_id() const { return id_of(unk_token_); }

  /// Sets the padding token (transformers' tokenizer.pad_token = ...); OptionError when it has no id.
  void set_pad_token(const std::string& token) { pad_token_ = known(token, "pad_token"); }
  /// Sets the beginning-of-sequence token; OptionError when it has no id.
  void set_bos_token(const std::string& token) { bos_token_ = known(token, "bos_token"); }
  /// Sets the end-of-sequence token; OptionError when it has no id.
  void set_eos_token(const std::string& token) { eos_token_ = known(token, "eos_token"); }
  /// The side encode_batch pads ("right" unless the folder or tokenizer.json says otherwise).
  const std::string& padding_side() const { return padding_side_; }
  /// Sets the padding side: "left" or "right" (OptionError otherwise).
  void set_padding_side(const std::string& s) {
    side(s, "padding_side");
    padding_side_ = s;
  }
  /// The side truncation cuts ("right" by default).
  const std::string& truncation_side() const { return truncation_side_; }
  /// Sets the truncation side: "left" or "right" (OptionError otherwise).
  void set_truncation_side(const std::string& s) {
    side(s, "truncation_side");
    truncation_side_ = s;
  }
  /// tokenizer_config.json's model_max_length (encode_batch's default max_length), if set.
  c10::optional<int64_t> model_max_length() const { return model_max_length_; }

 private:
  friend struct AutoTokenizer;
  Tokenizer() : added_(std::make_shared<detail::AddedVocabulary>()) {}

  static const nlohmann::json& null_json() {
    static const nlohmann::json null;
    return null;
  }
  static std::string join(const std::vector<std::string>& parts, const char* sep) {
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
    return out;
  }
  static AddedToken read_added_token(const components::JsonNode& n) {
    AddedToken t;
    t.content = n.at("content").as<std::string>("a string");
    t.special = n.flag("special", false);
    t.single_word = n.flag("single_word", false);
    t.lstrip = n.flag("lstrip", false);
    t.rstrip = n.flag("rstrip", false);
    t.normalized = n.flag("normalized", !t.special);
    return t;
  }
  static bool side(const std::string& s, const char* what) {
    check<OptionError>(s == "left" || s == "right", "{} must be \"left\" or \"right\", got \"{}\"", what, s);
    return s == "left";
  }
  std::optional<int64_t> id_of(const std::optional<std::string>& token) const {
    return token ? token_to_id(*token) : std::nullopt;
  }
  std::string known(const std::string& token, const char* what) const {
    check<OptionError>(token_to_id(token).has_value(), "{} '{}' is not a token of '{}'", what, token, source_);
    return token;
  }

  void read_truncation(const components::JsonNode& n) {
    if (n.json.is_null()) return;
    const std::string strategy = n.str("strategy", "LongestFirst"), direction = n.str("direction", "Right");
    if (strategy != "LongestFirst" && strategy != "OnlyFirst") n.fail(fmt::format("truncation strategy '{}' needs a pair", strategy));
    truncation_ = std::make_pair(static_cast<size_t>(n.at("max_length").as<int64_t>("an integer")), direction == "Left");
    truncation_side_ = direction == "Left" ? "left" : "right";
  }
  void read_padding(const components::JsonNode& n) {
    if (n.json.is_null()) return;
    FilePadding p;
    const components::JsonNode strategy = n.at("strategy");
    if (strategy.json.is_object() && strategy.has("Fixed")) p.fixed = strategy.at("Fixed").as<int64_t>("an integer");
    else if (strategy.as<std::string>("\"BatchLongest\" or {\"Fixed\": n}") != "BatchLongest") strategy.fail("unknown padding strategy");
    p.left = n.str("direction", "Right") == "Left";
    p.multiple = n.count("pad_to_multiple_of", 0);
    p.pad_id = n.count("pad_id", 0);
    p.pad_type_id = n.count("pad_type_id", 0);
    padding_ = p;
    pad_token_ = n.str("pad_token", "[PAD]");
    padding_side_ = p.left ? "left" : "right";
  }

  /// encode_batch's max_length (the options', else model_max_length), with the options checked as transformers does.
  c10::optional<int64_t> checked_max_length(const PaddingOptions& options) const {
    const auto max_length = options.max_length() ? options.max_length() : model_max_length_;
    const int64_t multiple = options.pad_to_multiple_of();
    check<OptionError>(!max_length || *max_length > 0, "PaddingOptions.max_length must be > 0, got {}", max_length.value_or(0));
    check<OptionError>(multiple >= 0, "PaddingOptions.pad_to_multiple_of must be >= 0, got {}", multiple);
    check<OptionError>(!options.truncation() || max_length, "PaddingOptions.truncation needs max_length (or a model_max_length)");
    check<OptionError>(options.padding() == PaddingStrategy::kLongest || max_length,
                       "PaddingOptions.padding(kMaxLength) needs max_length (or a model_max_length)");
    check<OptionError>(!options.truncation() || multiple == 0 || *max_length % multiple == 0,
                       "truncation length ({}) is not a multiple of pad_to_multiple_of ({})", max_length.value_or(0), multiple);
    return max_length;
  }
  /// Added tokens, normaliser, pre-tokenizer and model: the ids of one sequence, type ids 0.
  components::Encoding encode_sequence(const std::string& text) const {
    const size_t bad = hf::detail::invalid_utf8_at(text);
    check<OptionError>(bad == std::string::npos, "encode: the text is not valid UTF-8 (byte {})", bad);
    components::Pieces pieces = added_->extract_and_normalize(normalizer_.get(), text);
    if (pre_tokenizer_) pre_tokenizer_->pre_tokenize(pieces);
    components::Encoding e;
    for (const auto& p : pieces) {
      if (p.is_token) e.ids.insert(e.ids.end(), p.ids.begin(), p.ids.end());
      else model_->tokenize(p.text, e.ids);
    }
    e.type_ids.assign(e.ids.size(), 0);
    return e;
  }
  /// HF's truncation of a single sequence: room kept for the special tokens the post-processor adds.
  void truncate(components::Encoding& e, size_t max_length, bool left, bool add_special_tokens) const {
    const size_t added = add_special_tokens && post_processor_ ? post_processor_->added_tokens(false) : 0;
    check<OptionError>(max_length >= added, "max_length {} leaves no room for the {} special tokens", max_length, added);
    const size_t keep = max_length - added;
    if (e.ids.size() <= keep) return;
    const auto from = static_cast<std::ptrdiff_t>(left ? e.ids.size() - keep : 0);
    e.ids = std::vector<int64_t>(e.ids.begin() + from, e.ids.begin() + from + static_cast<std::ptrdiff_t>(keep));
    e.type_ids.assign(keep, 0);
  }
  components::Encoding post_process(components::Encoding e, bool add_special_tokens) const {
    if (!post_processor_) return e;
    std::vector<components::Encoding> parts{std::move(e)};
    post_processor_->process(parts, add_special_tokens);
    components::Encoding out;
    for (const auto& p : parts) {
      out.ids.insert(out.ids.end(), p.ids.begin(), p.ids.end());
      out.type_ids.insert(out.type_ids.end(), p.type_ids.begin(), p.type_ids.end());
    }
    return out;
  }
  void pad_to_file_padding(components::Encoding& e) const {
    int64_t length = padding_->fixed.value_or(static_cast<int64_t>(e.ids.size()));
    if (padding_->multiple > 0 && length % padding_->multiple != 0) length += padding_->multiple - length % padding_->multiple;
    if (static_cast<int64_t>(e.ids.size()) >= length) return;
    const auto n = static_cast<size_t>(length) - e.ids.size();
    e.ids.insert(padding_->left ? e.ids.begin() : e.ids.end(), n, padding_->pad_id);
    e.type_ids.insert(padding_->left ? e.type_ids.begin() : e.type_ids.end(), n, padding_->pad_type_id);
  }
  BatchEncoding to_tensors(const std::vector<components::Encoding>& rows, int64_t length, bool left) const {
    const auto b = static_cast<int64_t>(rows.size());
    const auto pad = pad_token_id();
    BatchEncoding out;
    out.input_ids = torch::full({b, length}, pad.value_or(0), torch::kLong);
    out.attention_mask = torch::zeros({b, length}, torch::kLong);
    out.token_type_ids = torch::zeros({b, length}, torch::kLong);
    for (int64_t i = 0; i < b; ++i) {
      const auto& r = rows[static_cast<size_t>(i)];
      const auto n = static_cast<int64_t>(r.ids.size());
      check<OptionError>(n <= length, "encode_batch: text {} has {} tokens, more than max_length {} (set truncation(true))", i, n,
                         length);
      check<OptionError>(n == length || pad.has_value(),
                         "encode_batch: padding needed but '{}' has no pad token (set_pad_token, or pad_token in tokenizer_config.json)",
                         source_);
      const int64_t at = left ? length - n : 0;
      auto ids = out.input_ids.accessor<int64_t, 2>(), mask = out.attention_mask.accessor<int64_t, 2>(),
           types = out.token_type_ids.accessor<int64_t, 2>();
      for (int64_t k = 0; k < n; ++k) {
        ids[i][at + k] = r.ids[static_cast<size_t>(k)];
        mask[i][at + k] = 1;
        types[i][at + k] = r.type_ids[static_cast<size_t>(k)];
      }
    }
    return out;
  }

  /// tokenizer.json's "padding".
  struct FilePadding {
    std::optional<int64_t> fixed;  ///< Fixed(n); unset: BatchLongest
    bool left = false;
    int64_t multiple = 0, pad_id = 0, pad_type_id = 0;
  };

  std::string source_;
  std::shared_ptr<const components::Normalizer> normalizer_;
  std::shared_ptr<const components::PreTokenizer> pre_tokenizer_;
  std::shared_ptr<const components::Model> model_;
  std::shared_ptr<const components::PostProcessor> post_processor_;
  std::shared_ptr<const components::Decoder> decoder_;
  std::shared_ptr<detail::AddedVocabulary> added_;
  std::optional<std::pair<size_t, bool>> truncation_;  ///< tokenizer.json's (max_length, from the left)
  std::optional<FilePadding> padding_;
  std::optional<std::string> pad_token_, bos_token_, eos_token_, unk_token_;
  std::string padding_side_ = "right", truncation_side_ = "right";
  c10::optional<int64_t> model_max_length_;
};

/// HF transformers' AutoTokenizer for a model folder: tokenizer.json with tokenizer_config.json
/// and special_tokens_map.json (when present).
struct AutoTokenizer {
  /// The tokenizer of model folder `dir`, as transformers' AutoTokenizer.from_pretrained builds it:
  /// special tokens (pad, bos, eos, unk) and padding_side, truncation_side, model_max_length
  /// from tokenizer_config.json (then special_tokens_map.json); add_bos_token / add_eos_token,
  /// when given, rebuild the post-processor as TemplateProcessing (bos? $A eos?); the
  /// LlamaTokenizer class is rebuilt as transformers 5 does (Metaspace pre-tokenizer,
  /// prepend_scheme "always" when legacy, else "first"; padding side left); tokenizer.json's
  /// own truncation and padding are dropped (encode_batch's options replace them).
  /// FileError naming the folder when tokenizer.json is missing, or a file that is not JSON.
  static Tokenizer from_pretrained(const std::filesystem::path& dir) {
    const auto file = dir / "tokenizer.json";
    check<FileError>(std::filesystem::is_regular_file(file),
                     "'{}': no tokenizer.json (expected a Hugging Face model folder with a fast tokenizer)", dir.string());
    nlohmann::json j = read_json(file);
    const nlohmann::json config = read_json(dir / "tokenizer_config.json", true);
    const std::string cls = text_field(config, "tokenizer_class").value_or("");
    const bool llama = cls == "LlamaTokenizer" || cls == "LlamaTokenizerFast";
    if (llama) rebuild_llama(j, config);
    Tokenizer t = Tokenizer::from_json(j, file.string());
    read_special_tokens(t, config, read_json(dir / "special_tokens_map.json", true));
    if (config.contains("add_bos_token") || config.contains("add_eos_token") || !t.post_processor_)
      t.post_processor_ = bos_eos_template(t, flag(config, "add_bos_token"), flag(config, "add_eos_token"));
    if (!t.padding_) t.padding_side_ = llama ? "left" : "right";  // the class's default
    if (auto side = text_field(config, "padding_side")) t.set_padding_side(*side);
    if (auto side = text_field(config, "truncation_side")) t.set_truncation_side(*side);
    const auto& length = config.contains("model_max_length") ? config["model_max_length"] : nlohmann::json();
    if (length.is_number_integer() && length.get<double>() <= 1e18) t.model_max_length_ = length.get<int64_t>();  // not 1e30
    t.truncation_.reset();
    t.padding_.reset();
    return t;
  }

 private:
  static nlohmann::json read_json(const std::filesystem::path& path, bool optional = false) {
    if (optional && !std::filesystem::is_regular_file(path)) return nlohmann::json::object();
    try {
      return nlohmann::json::parse(io::read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw FileError(fmt::format("'{}': not valid JSON ({})", path.string(), e.what()));
    }
  }
  static std::optional<std::string> text_field(const nlohmann::json& j, const char* key) {
    return j.contains(key) && j[key].is_string() ? std::optional<std::string>(j[key].get<std::string>()) : std::nullopt;
  }
  static bool flag(const nlohmann::json& j, const char* key) { return j.contains(key) && j[key].is_boolean() && j[key].get<bool>(); }
  /// A special token written as a string or as an AddedToken object {"content": ...}.
  static std::optional<std::string> special_token(const nlohmann::json& j, const char* key) {
    if (!j.contains(key)) return std::nullopt;
    const auto& v = j[key];
    if (v.is_object()) return text_field(v, "content");
    return v.is_string() ? std::optional<std::string>(v.get<std::string>()) : std::nullopt;
  }
  /// pad, bos, eos and unk tokens from tokenizer_config.json, else special_tokens_map.json (the pad
  /// token of tokenizer.json's padding stays when neither names one); ones the vocabulary lacks are added.
  static void read_special_tokens(Tokenizer& t, const nlohmann::json& config, const nlohmann::json& map) {
    const std::pair<const char*, std::optional<std::string>*> slots[] = {
        {"pad_token", &t.pad_token_}, {"bos_token", &t.bos_token_}, {"eos_token", &t.eos_token_}, {"unk_token", &t.unk_token_}};
    std::vector<AddedToken> missing;
    for (const auto& [name, slot] : slots) {
      auto token = special_token(config, name);
      if (!token) token = special_token(map, name);
      if (!token && *slot) continue;
      *slot = token;
      if (token && !t.token_to_id(*token)) missing.push_back({*token, false, false, false, false, true});
    }
    t.added_->add(missing, *t.model_, t.normalizer_.get());
  }
  /// transformers 5's LlamaTokenizer: no normaliser, Metaspace without splitting, byte-fallback BPE.
  static void rebuild_llama(nlohmann::json& j, const nlohmann::json& config) {
    const bool prefix = !config.contains("add_prefix_space") || !config["add_prefix_space"].is_boolean() || flag(config, "add_prefix_space");
    const std::string scheme = !prefix ? "never" : flag(config, "legacy") ? "always" : "first";
    const std::string meta = "\xE2\x96\x81";
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", meta}, {"prepend_scheme", scheme}, {"split", false}};
    nlohmann::json decoders = nlohmann::json::array({{{"type", "Replace"}, {"pattern", {{"String", meta}}}, {"content", " "}},
                                                     {{"type", "ByteFallback"}}, {{"type", "Fuse"}}});
    if (prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
    j["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};
    if (j.contains("model") && j["model"].is_object()) {
      j["model"]["fuse_unk"] = true;
      j["model"]["byte_fallback"] = true;
    }
  }
  /// transformers' update_post_processor: "bos:0 $A:0 eos:0" with the tokens asked for.
  static std::shared_ptr<const components::PostProcessor> bos_eos_template(const Tokenizer& t, bool bos, bool eos) {
    std::vector<components::TemplatePiece> single, pair;
    std::map<std::string, std::vector<int64_t>> special;
    auto add = [&](const std::optional<std::string>& token, bool wanted, int64_t type, std::vector<components::TemplatePiece>& out) {
      const auto id = token ? t.token_to_id(*token) : std::nullopt;
      if (!wanted || !id) return;
      special[*token] = {*id};
      out.push_back({false, 0, *token, type});
    };
    add(t.bos_token_, bos, 0, single);
    single.push_back({true, 0, "", 0});
    add(t.eos_token_, eos, 0, single);
    pair = single;
    add(t.bos_token_, bos, 1, pair);
    pair.push_back({true, 1, "", 1});
    add(t.eos_token_, eos, 1, pair);
    return std::make_shared<components::TemplateProcessing>(single, pair, special);
  }
};

}  // namespace hf
}  // namespace peft
