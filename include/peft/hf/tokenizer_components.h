#pragma once
/// @file
/// The text stages of a Hugging Face tokenizer.json (peft/hf/tokenizer.h), each as
/// HF `tokenizers` 0.23 implements it: normalizers and pre-tokenizers. The models,
/// post-processors and decoders are in peft/hf/tokenizer_models.h, the JSON reader
/// in peft/hf/tokenizer_json.h.

#include <peft/core/error.h>
#include <peft/hf/tokenizer_text.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace hf {
namespace components {

/// A piece of the input between the stages (one split of HF's PreTokenizedString).
struct Piece {
  std::string text;          ///< the (normalised) text, UTF-8
  bool at_origin = false;    ///< it starts at byte 0 of the input (Metaspace's prepend_scheme "first")
  bool is_token = false;     ///< an added token: `ids` is final, later stages leave it alone
  std::vector<int64_t> ids;  ///< the ids of an added token
};
/// The pieces of one input, in order.
using Pieces = std::vector<Piece>;

/// Token ids and type ids of one sequence, through the post-processor.
struct Encoding {
  std::vector<int64_t> ids;       ///< token ids
  std::vector<int64_t> type_ids;  ///< segment of each token (0, or 1 for a pair's second sequence)
};

// ---- normalizers --------------------------------------------------------------------------

/// HF's Normalizer: rewrites the text of one piece.
class Normalizer {
 public:
  /// Normalizers are held through this base.
  virtual ~Normalizer() = default;
  /// Normalises `text` (valid UTF-8) in place.
  virtual void normalize(std::string& text) const = 0;
};

/// NFC, NFD, NFKC, NFKD (ICU's Normalizer2).
class UnicodeNormalizer : public Normalizer {
 public:
  /// The normalizer of form `form`.
  explicit UnicodeNormalizer(detail::NormalForm form) : form_(form) {}
  /// `text` in the form, with Unicode 9.0 data as HF (detail::normalize).
  void normalize(std::string& text) const override { text = detail::normalize(text, form_); }

 private:
  detail::NormalForm form_;
};

/// Rebuilds `text` code point by code point: fn(out, c) appends what c becomes (HF's filter and map).
template <typename Fn>
std::string map_code_points(const std::string& text, Fn fn) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) fn(out, detail::next_code_point(text, i));
  return out;
}

/// Lowercase: the full lowercase mapping of each code point, without context.
class Lowercase : public Normalizer {
 public:
  /// Lowercases `text`.
  void normalize(std::string& text) const override { text = detail::lowercase(text); }
};

/// StripAccents: drops combining marks (general category M).
class StripAccents : public Normalizer {
 public:
  /// Drops the combining marks of `text`.
  void normalize(std::string& text) const override {
    if (detail::is_ascii(text)) return;
    text = map_code_points(text, [](std::string& out, UChar32 c) {
      if (!detail::is_combining_mark(c)) detail::append_utf8(out, c);
    });
  }
};

/// Replace: every match of a string or regex pattern becomes `content`.
class Replace : public Normalizer {
 public:
  /// Replaces the matches of `pattern` with `content`.
  Replace(std::shared_ptr<const detail::Regex> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  /// Makes the replacements in `text`.
  void normalize(std::string& text) const override { text = apply(text); }
  /// `text` with the replacements made (the Replace decoder applies it per token).
  std::string apply(const std::string& text) const {
    const auto matches = pattern_->find_all(text);
    if (matches.empty()) return text;
    std::string out;
    size_t prev = 0;
    for (const auto& [s, e] : matches) {
      out.append(text, prev, s - prev);
      out += content_;
      prev = e;
    }
    out.append(text, prev, std::string::npos);
    return out;
  }

 private:
  std::shared_ptr<const detail::Regex> pattern_;
  std::string content_;
};

/// Prepend: `prepend` before any non-empty piece.
class Prepend : public Normalizer {
 public:
  /// Prepends `prepend`.
  explicit Prepend(std::string prepend) : prepend_(std::move(prepend)) {}
  /// Prepends to `text` unless it is empty.
  void normalize(std::string& text) const override {
    if (!text.empty()) text = prepend_ + text;
  }

 private:
  std::string prepend_;
};

/// Strip: removes leading and/or trailing whitespace.
class StripNormalizer : public Normalizer {
 public:
  /// Strips whitespace on the `left` and/or `right`.
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  /// Strips `text`.
  void normalize(std::string& text) const override {
    const auto cps = detail::code_points(text);
    size_t b = 0, e = cps.size();
    while (left_ && b < e && detail::is_whitespace(cps[b])) ++b;
    while (right_ && e > b && detail::is_whitespace(cps[e - 1])) --e;
    std::string out;
    for (size_t i = b; i < e; ++i) detail::append_utf8(out, cps[i]);
    text = std::move(out);
  }

 private:
  bool left_, right_;
};

/// BertNormalizer: clean_text (drops NUL, U+FFFD and control characters, whitespace to ' '),
/// handle_chinese_chars (spaces around CJK ideographs), strip_accents (NFD, then drops
/// non-spacing marks; defaults to `lowercase`) and lowercase, in that order.
class BertNormalizer : public Normalizer {
 public:
  /// The steps to run (tokenizer.json's clean_text, handle_chinese_chars, strip_accents, lowercase).
  BertNormalizer(bool clean_text, bool chinese, bool strip_accents, bool lowercase)
      : clean_text_(clean_text), chinese_(chinese), strip_accents_(strip_accents), lowercase_(lowercase) {}
  /// Runs the steps on `text`.
  void normalize(std::string& text) const override {
    if (clean_text_)
      text = map_code_points(text, [](std::string& out, UChar32 c) {
        if (c == 0 || c == 0xFFFD || detail::is_bert_control(c)) return;
        const bool space = c == '\t' || c == '\n' || c == '\r' || detail::is_whitespace(c);
        detail::append_utf8(out, space ? ' ' : c);
      });
    if (chinese_ && !detail::is_ascii(text))
      text = map_code_points(text, [](std::string& out, UChar32 c) {
        if (!detail::is_bert_chinese(c)) return detail::append_utf8(out, c);
        out += ' ';
        detail::append_utf8(out, c);
        out += ' ';
      });
    if (strip_accents_ && !detail::is_ascii(text))
      text = map_code_points(detail::normalize(text, detail::NormalForm::kNFD), [](std::string& out, UChar32 c) {
        if (!detail::category_v8(c, U_GC_MN_MASK)) detail::append_utf8(out, c);
      });
    if (lowercase_) text = detail::lowercase(text);
  }

 private:
  bool clean_text_, chinese_, strip_accents_, lowercase_;
};

/// Sequence: the normalizers in order.
class NormalizerSequence : public Normalizer {
 public:
  /// The normalizers to run in order.
  explicit NormalizerSequence(std::vector<std::shared_ptr<const Normalizer>> steps) : steps_(std::move(steps)) {}
  /// Runs each normalizer on `text`.
  void normalize(std::string& text) const override {
    for (const auto& n : steps_) n->normalize(text);
  }

 private:
  std::vector<std::shared_ptr<const Normalizer>> steps_;
};

// ---- pre-tokenizers -----------------------------------------------------------------------

/// HF's SplitDelimiterBehavior: what becomes of the matches when a piece is split.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

/// Ranges with a match flag, as HF's Pattern::find_matches returns them.
using FlaggedRanges = std::vector<std::pair<std::pair<size_t, size_t>, bool>>;

/// HF's NormalizedString::split: the sub-pieces of `piece` that `behavior` keeps (empty ones included).
inline Pieces split_piece(const Piece& piece, FlaggedRanges ranges, SplitBehavior behavior) {
  FlaggedRanges kept;  // (range, remove)
  bool previous = false;
  if (behavior == SplitBehavior::kMergedWithNext) std::reverse(ranges.begin(), ranges.end());
  for (const auto& [range, is_match] : ranges) {
    const bool merge = behavior == SplitBehavior::kContiguous
                           ? is_match == previous
                           : (behavior == SplitBehavior::kMergedWithPrevious || behavior == SplitBehavior::kMergedWithNext) &&
                                 is_match && !previous;
    if (merge && !kept.empty()) {
      if (behavior == SplitBehavior::kMergedWithNext) kept.back().first.first = range.first;
      else kept.back().first.second = range.second;
    } else {
      kept.push_back({range, behavior == SplitBehavior::kRemoved && is_match});
    }
    previous = is_match;
  }
  if (behavior == SplitBehavior::kMergedWithNext) std::reverse(kept.begin(), kept.end());
  Pieces out;
  for (const auto& [range, remove] : kept)
    if (!remove)
      out.push_back({piece.text.substr(range.first, range.second - range.first), piece.at_origin && range.first == 0, false, {}});
  return out;
}

/// HF's PreTokenizedString::split: each piece that is not a token becomes the pieces `fn`
/// returns for it; empty pieces are dropped.
template <typename Fn>
void split_pieces(Pieces& pieces, Fn fn) {
  Pieces out;
  out.reserve(pieces.size());
  for (auto& p : pieces) {
    if (p.is_token) {
      out.push_back(std::move(p));
      continue;
    }
    for (auto& q : fn(p))
      if (!q.text.empty()) out.push_back(std::move(q));
  }
  pieces = std::move(out);
}

/// HF's PreTokenizer: cuts (and may rewrite) the pieces.
class PreTokenizer {
 public:
  /// Pre-tokenizers are held through this base.
  virtual ~PreTokenizer() = default;
  /// Replaces the pieces that are not tokens by their splits.
  virtual void pre_tokenize(Pieces& pieces) const = 0;
};

/// Split: cuts at the matches of a pattern (flags inverted when `invert`), with `behavior`.
class Split : public PreTokenizer {
 public:
  /// Splits at `pattern` with `behavior`; `invert` swaps matches and the text between them.
  Split(std::shared_ptr<const detail::Regex> pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_pieces(pieces, [&](const Piece& p) {
      auto ranges = detail::match_pieces(p.text, pattern_->find_all(p.text));
      if (invert_)
        for (auto& r : ranges) r.second = !r.second;
      return split_piece(p, std::move(ranges), behavior_);
    });
  }

 private:
  std::shared_ptr<const detail::Regex> pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

/// Splits on the characters for which `pred` holds, with `behavior` (WhitespaceSplit, Punctuation, Digits, ...).
template <typename Pred>
void split_on_chars(Pieces& pieces, Pred pred, SplitBehavior behavior) {
  split_pieces(pieces, [&](const Piece& p) { return split_piece(p, detail::char_pieces(p.text, pred), behavior); });
}

/// GPT-2's byte-to-unicode table: byte b is written as this code point in byte-level vocabularies.
inline UChar32 byte_to_char(int b) {
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return b;
  int n = 0;  // bytes outside the printable ranges take 256, 257, ... in order
  for (int k = 0; k < b; ++k) n += !((k >= '!' && k <= '~') || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF));
  return 256 + n;
}

/// The byte-level alphabet: UTF-8 of byte_to_char(b) for each byte b, and the inverse.
struct ByteAlphabet {
  /// UTF-8 of the character that stands for each byte.
  std::string chars[256];
  std::vector<int> byte_of = std::vector<int>(512, -1);  ///< code point -> byte, or -1
  /// Builds both directions of the table.
  ByteAlphabet() {
    for (int b = 0; b < 256; ++b) {
      detail::append_utf8(chars[b], byte_to_char(b));
      byte_of[static_cast<size_t>(byte_to_char(b))] = b;
    }
  }
  /// The shared instance.
  static const ByteAlphabet& get() {
    static const ByteAlphabet alphabet;
    return alphabet;
  }
};

/// ByteLevel: optionally a space before each piece, GPT-2's split regex when `use_regex`, and
/// every byte written as its byte-level character.
class ByteLevel : public PreTokenizer {
 public:
  /// tokenizer.json's add_prefix_space and use_regex.
  ByteLevel(bool add_prefix_space, bool use_regex) : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {}
  /// Splits the pieces and rewrites them in the byte-level alphabet.
  void pre_tokenize(Pieces& pieces) const override {
    static const detail::Regex gpt2(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false);
    split_pieces(pieces, [&](const Piece& p) {
      Piece q = p;
      if (add_prefix_space_ && (q.text.empty() || q.text[0] != ' ')) q.text.insert(0, 1, ' ');
      if (!use_regex_) return Pieces{q};
      return split_piece(q, detail::match_pieces(q.text, gpt2.find_all(q.text)), SplitBehavior::kIsolated);
    });
    const auto& alphabet = ByteAlphabet::get();
    for (auto& p : pieces) {
      if (p.is_token) continue;
      std::string out;
      out.reserve(p.text.size() * 2);
      for (unsigned char b : p.text) out += alphabet.chars[b];
      p.text = std::move(out);
    }
  }

 private:
  bool add_prefix_space_, use_regex_;
};

/// Whitespace: the runs of word characters and the runs of other non-space characters
/// (the Rust regex `\w+|[^\w\s]+`); whitespace is dropped.
class Whitespace : public PreTokenizer {
 public:
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_pieces(pieces, [](const Piece& p) {
      Pieces out;
      int run = 0;  // 0: none, 1: word characters, 2: other non-space characters
      size_t start = 0;
      for (size_t i = 0; i < p.text.size();) {
        const size_t at = i;
        const UChar32 c = detail::next_code_point(p.text, i);
        const int kind = detail::is_word_char(c) ? 1 : detail::is_whitespace(c) ? 0 : 2;
        if (kind == run) continue;
        if (run) out.push_back({p.text.substr(start, at - start), p.at_origin && start == 0, false, {}});
        run = kind;
        start = at;
      }
      if (run) out.push_back({p.text.substr(start), p.at_origin && start == 0, false, {}});
      return out;
    });
  }
};

/// WhitespaceSplit: cuts at whitespace, which is dropped.
class WhitespaceSplit : public PreTokenizer {
 public:
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override { split_on_chars(pieces, detail::is_whitespace, SplitBehavior::kRemoved); }
};

/// BertPreTokenizer: WhitespaceSplit, then each punctuation character on its own.
class BertPreTokenizer : public PreTokenizer {
 public:
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_on_chars(pieces, detail::is_whitespace, SplitBehavior::kRemoved);
    split_on_chars(pieces, detail::is_bert_punctuation, SplitBehavior::kIsolated);
  }
};

/// Punctuation: cuts at punctuation characters with `behavior` (default Isolated).
class Punctuation : public PreTokenizer {
 public:
  /// Splits at punctuation with `behavior`.
  explicit Punctuation(SplitBehavior behavior) : behavior_(behavior) {}
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override { split_on_chars(pieces, detail::is_bert_punctuation, behavior_); }

 private:
  SplitBehavior behavior_;
};

/// Digits: numeric characters on their own (`individual_digits`) or as runs.
class Digits : public PreTokenizer {
 public:
  /// tokenizer.json's individual_digits.
  explicit Digits(bool individual) : individual_(individual) {}
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_on_chars(pieces, detail::is_numeric, individual_ ? SplitBehavior::kIsolated : SplitBehavior::kContiguous);
  }

 private:
  bool individual_;
};

/// CharDelimiterSplit: cuts at one character, which is dropped.
class CharDelimiterSplit : public PreTokenizer {
 public:
  /// Splits at `delimiter`.
  explicit CharDelimiterSplit(UChar32 delimiter) : delimiter_(delimiter) {}
  /// Splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_on_chars(pieces, [this](UChar32 c) { return c == delimiter_; }, SplitBehavior::kRemoved);
  }

 private:
  UChar32 delimiter_;
};

/// Metaspace's prepend_scheme: whether the replacement goes before the first piece only, every piece, or none.
enum class PrependScheme { kFirst, kAlways, kNever };

/// Metaspace: spaces become `replacement` (▁), which is prepended per the scheme; when `split`,
/// pieces are cut before each replacement character. As a decoder, the reverse.
class Metaspace : public PreTokenizer {
 public:
  /// `replacement` (one character, UTF-8), the prepend scheme, and whether to split.
  Metaspace(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {
    size_t i = 0;
    replacement_char_ = detail::next_code_point(replacement_, i);
  }
  /// Rewrites and splits every piece that is not a token.
  void pre_tokenize(Pieces& pieces) const override {
    split_pieces(pieces, [&](const Piece& p) {
      Piece q{std::string(), p.at_origin, false, {}};
      for (char c : p.text) {
        if (c == ' ') q.text += replacement_;
        else q.text += c;
      }
      const bool starts = q.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && q.at_origin)))
        q.text.insert(0, replacement_);
      if (!split_) return Pieces{q};
      return split_piece(q, detail::char_pieces(q.text, [this](UChar32 c) { return c == replacement_char_; }),
                         SplitBehavior::kMergedWithNext);
    });
  }
  /// The decoder: replacement characters become spaces, except in the first token unless the scheme is never.
  void decode_chain(std::vector<std::string>& tokens) const {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string out;
      for (size_t k = 0; k < tokens[i].size();) {
        const size_t at = k;
        if (detail::next_code_point(tokens[i], k) != replacement_char_) out.append(tokens[i], at, k - at);
        else if (i != 0 || scheme_ == PrependScheme::kNever) out += ' ';
      }
      tokens[i] = std::move(out);
    }
  }

 private:
  std::string replacement_;
  UChar32 replacement_char_;
  PrependScheme scheme_;
  bool split_;
};

/// Sequence: the pre-tokenizers in order.
class PreTokenizerSequence : public PreTokenizer {
 public:
  /// The pre-tokenizers to run in order.
  explicit PreTokenizerSequence(std::vector<std::shared_ptr<const PreTokenizer>> steps) : steps_(std::move(steps)) {}
  /// Runs each pre-tokenizer.
  void pre_tokenize(Pieces& pieces) const override {
    for (const auto& p : steps_) p->pre_tokenize(pieces);
  }

 private:
  std::vector<std::shared_ptr<const PreTokenizer>> steps_;
};

}  // namespace components
}  // namespace hf
}  // namespace peft
