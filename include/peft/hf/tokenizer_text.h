#pragma once
/// @file
/// Text primitives of the Hugging Face tokenizer (peft/hf/tokenizer.h), on ICU:
/// UTF-8 code points, Unicode properties as the Rust crates of HF `tokenizers`
/// define them, Unicode normalisation forms, lowercasing, and Oniguruma-style
/// regexes (HF's pre-tokenizer patterns) run by icu::RegexMatcher with byte offsets.

#include <peft/core/error.h>

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace peft {
namespace hf {
namespace detail {

/// Byte offset of the first ill-formed UTF-8 sequence of `s`, or npos when it is valid.
inline size_t invalid_utf8_at(const std::string& s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto n = static_cast<int32_t>(s.size());
  for (int32_t i = 0; i < n;) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(p, i, n, c);
    if (c < 0) return static_cast<size_t>(start);
  }
  return std::string::npos;
}

/// The code point at byte `i` of valid UTF-8 `s`; advances `i` past it.
inline UChar32 next_code_point(const std::string& s, size_t& i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  UChar32 c;
  U8_NEXT_UNSAFE(p, i, c);
  return c;
}

/// Appends code point `c` to `out` as UTF-8.
inline void append_utf8(std::string& out, UChar32 c) {
  uint8_t buffer[U8_MAX_LENGTH];
  int32_t n = 0;
  U8_APPEND_UNSAFE(buffer, n, c);
  out.append(reinterpret_cast<const char*>(buffer), static_cast<size_t>(n));
}

/// The code points of valid UTF-8 `s`.
inline std::vector<UChar32> code_points(const std::string& s) {
  std::vector<UChar32> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out.push_back(next_code_point(s, i));
  return out;
}

/// Number of code points of valid UTF-8 `s` (Rust's `chars().count()`).
inline size_t code_point_count(const std::string& s) {
  size_t n = 0;
  for (unsigned char b : s) n += (b & 0xC0) != 0x80;
  return n;
}

/// Bytes as UTF-8 text with each ill-formed sequence replaced by U+FFFD per maximal
/// subpart (Rust's String::from_utf8_lossy, which HF's ByteLevel decoder uses).
inline std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto n = static_cast<int32_t>(bytes.size());
  for (int32_t i = 0; i < n;) {
    const int32_t start = i;
    UChar32 c;
    U8_NEXT(p, i, n, c);
    if (c < 0)
      out += "\xEF\xBF\xBD";
    else
      out.append(bytes, static_cast<size_t>(start), static_cast<size_t>(i - start));
  }
  return out;
}

/// UTF-8 to ICU's UTF-16; `byte_at[k]` is the byte offset of UTF-16 unit k (one past the end included).
inline icu::UnicodeString to_utf16(const std::string& s, std::vector<int32_t>* byte_at = nullptr) {
  if (!byte_at) return icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), static_cast<int32_t>(s.size())));
  icu::UnicodeString u;
  byte_at->clear();
  byte_at->reserve(s.size() + 1);
  for (size_t i = 0; i < s.size();) {
    const auto at = static_cast<int32_t>(i);
    const UChar32 c = next_code_point(s, i);
    u.append(c);
    byte_at->push_back(at);
    if (c > 0xFFFF) byte_at->push_back(at);
  }
  byte_at->push_back(static_cast<int32_t>(s.size()));
  return u;
}

/// ICU's UTF-16 back to UTF-8.
inline std::string to_utf8(const icu::UnicodeString& u) {
  std::string out;
  u.toUTF8String(out);
  return out;
}

/// Whether every byte is ASCII (the fast paths of normalisation and lowercasing).
inline bool is_ascii(const std::string& s) {
  for (unsigned char b : s)
    if (b >= 0x80) return false;
  return true;
}

// ---- Unicode properties, as the Rust code of HF tokenizers asks for them --------------------

/// Rust's char::is_whitespace: the White_Space property.
inline bool is_whitespace(UChar32 c) { return u_hasBinaryProperty(c, UCHAR_WHITE_SPACE); }

/// Rust's char::is_numeric: general categories Nd, Nl, No.
inline bool is_numeric(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }

/// The Rust regex crate's `\w`: Alphabetic, marks, decimal digits, connector punctuation, joiners.
inline bool is_word_char(UChar32 c) {
  return u_hasBinaryProperty(c, UCHAR_ALPHABETIC) || (U_GET_GC_MASK(c) & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) != 0 ||
         u_hasBinaryProperty(c, UCHAR_JOIN_CONTROL);
}

/// Whether `c` was assigned by Unicode `major`.`minor`. HF tokenizers' Rust crates carry old
/// Unicode tables: unicode_categories 0.1.1 (BertNormalizer, BertPreTokenizer, Punctuation) has
/// Unicode 8.0's, unicode-normalization-alignments 0.1.12 (NFC/NFD/NFKC/NFKD, StripAccents)
/// Unicode 9.0's; code points assigned later have no category or decomposition there.
inline bool assigned_by(UChar32 c, uint8_t major, uint8_t minor) {
  UVersionInfo age;
  u_charAge(c, age);
  return age[0] < major || (age[0] == major && age[1] <= minor);
}

/// The general category (as a U_GC_*_MASK bit) of `c` in Unicode 8.0 (`unicode9` false) or 9.0.
/// ICU reports today's; these few code points changed category since (found by comparing every
/// code point with HF tokenizers 0.23.3); for any other, an assigned code point keeps its category.
inline uint32_t category_then(UChar32 c, bool unicode9) {
  switch (c) {
    case 0x1734: return U_GC_MN_MASK;                    // HANUNOO SIGN PAMUDPOD: Mc since 14.0
    case 0x1885: case 0x1886: return unicode9 ? U_GC_MN_MASK : U_GC_LO_MASK;  // Mongolian ALI GALI BALUDA: Mn since 9.0
    case 0xA9BD: return U_GC_MC_MASK;                    // JAVANESE CONSONANT SIGN KERET: Mn since 12.0
    case 0x111C9: return U_GC_PO_MASK;                   // SHARADA SANDHI MARK: Mn since 11.0
    case 0x166D: return U_GC_PO_MASK;                    // CANADIAN SYLLABICS CHI SIGN: So since 12.0
    case 0x1CF2: case 0x1CF3: return U_GC_MC_MASK;       // VEDIC SIGN ARDHAVISARGA (ROTATED): Lo since 10.0
    default: return assigned_by(c, unicode9 ? 9 : 8, 0) ? U_GET_GC_MASK(c) : U_GC_CN_MASK;
  }
}

/// General category `mask` as the unicode_categories crate (Unicode 8.0) reports it.
inline bool category_v8(UChar32 c, uint32_t mask) { return (category_then(c, false) & mask) != 0; }

/// BertPreTokenizer's and Punctuation's test: ASCII punctuation (Rust's is_ascii_punctuation,
/// symbols such as `$+<=>^|~` included) or general category P* (Unicode 8.0).
inline bool is_bert_punctuation(UChar32 c) {
  return (c > 0 && c < 0x80 && std::strchr("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", static_cast<int>(c)) != nullptr) ||
         category_v8(c, U_GC_P_MASK);
}

/// BertNormalizer's is_control: Cc, Cf, Co in Unicode 8.0 (tab, newline and carriage return excluded).
inline bool is_bert_control(UChar32 c) {
  return c != '\t' && c != '\n' && c != '\r' && category_v8(c, U_GC_CC_MASK | U_GC_CF_MASK | U_GC_CO_MASK);
}

/// BertNormalizer's is_chinese_char: BERT's list of CJK ideograph blocks (as HF and Google's BERT define it).
inline bool is_bert_chinese(UChar32 c) {
  static constexpr std::pair<UChar32, UChar32> kBlocks[] = {{0x4E00, 0x9FFF},   {0x3400, 0x4DBF},   {0x20000, 0x2A6DF},
                                                          {0x2A700, 0x2B73F}, {0x2B740, 0x2B81F}, {0x2B920, 0x2CEAF},
                                                          {0xF900, 0xFAFF},   {0x2F800, 0x2FA1F}};
  for (const auto& [lo, hi] : kBlocks)
    if (c >= lo && c <= hi) return true;
  return false;
}

/// StripAccents' is_combining_mark: general category M* in Unicode 9.0.
inline bool is_combining_mark(UChar32 c) { return (category_then(c, true) & U_GC_M_MASK) != 0; }

// ---- normalisation forms and case ---------------------------------------------------------

/// Unicode normalisation forms (HF's NFC, NFD, NFKC, NFKD normalizers).
enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };

/// ICU's Normalizer2 for `form`.
inline const icu::Normalizer2& normalizer2(NormalForm form) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* n = form == NormalForm::kNFC    ? icu::Normalizer2::getNFCInstance(status)
                              : form == NormalForm::kNFD  ? icu::Normalizer2::getNFDInstance(status)
                              : form == NormalForm::kNFKC ? icu::Normalizer2::getNFKCInstance(status)
                                                          : icu::Normalizer2::getNFKDInstance(status);
  check<ModelError>(U_SUCCESS(status) && n != nullptr, "ICU has no normalisation data ({})", u_errorName(status));
  return *n;
}

/// `s` normalised by ICU in one piece.
inline std::string normalize_run(const std::string& s, NormalForm form) {
  const auto& n = normalizer2(form);
  UErrorCode status = U_ZERO_ERROR;
  const icu::UnicodeString u = to_utf16(s);
  if (n.isNormalized(u, status) && U_SUCCESS(status)) return s;
  status = U_ZERO_ERROR;
  const icu::UnicodeString out = n.normalize(u, status);
  check<ModelError>(U_SUCCESS(status), "ICU normalisation failed ({})", u_errorName(status));
  return to_utf8(out);
}

/// `s` in normalisation form `form` with Unicode 9.0's data, as HF's normalizers: a code point
/// assigned later has no decomposition and blocks reordering and composition, so the text is
/// normalised in runs between such code points.
inline std::string normalize(const std::string& s, NormalForm form) {
  if (is_ascii(s)) return s;
  std::string out, run;
  for (size_t i = 0; i < s.size();) {
    const size_t at = i;
    const UChar32 c = next_code_point(s, i);
    if (assigned_by(c, 9, 0)) {
      run.append(s, at, i - at);
      continue;
    }
    out += normalize_run(run, form);
    run.clear();
    out.append(s, at, i - at);
  }
  return out + normalize_run(run, form);
}

/// Appends the full lowercase mapping of code point `c`, without context (Rust's char::to_lowercase).
inline void append_lowercase(std::string& out, UChar32 c) {
  if (c < 0x80) {
    out += static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
    return;
  }
  UChar in[2], lower[8];
  int32_t n = 0;
  U16_APPEND_UNSAFE(in, n, c);
  UErrorCode status = U_ZERO_ERROR;
  const int32_t len = u_strToLower(lower, 8, in, n, "", &status);
  if (U_FAILURE(status)) return append_utf8(out, c);
  out += to_utf8(icu::UnicodeString(lower, len));
}

/// `s` lowercased code point by code point (HF's Lowercase normalizer).
inline std::string lowercase(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) append_lowercase(out, next_code_point(s, i));
  return out;
}

// ---- regular expressions ------------------------------------------------------------------

/// Byte ranges [first, second) of the matches of a pattern in a text.
using Matches = std::vector<std::pair<size_t, size_t>>;

/// An Oniguruma pattern (as HF tokenizers compiles them) rewritten for ICU: `\w` and `\W`
/// take Oniguruma's word characters (no joiners), `\h` its hex digits, and `^`/`$` anchor at lines.
inline std::string onig_to_icu(const std::string& pattern) {
  static const std::string word = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
  std::string out;
  int depth = 0;  // inside a character class
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 'w') out += depth ? word : "[" + word + "]";
      else if (e == 'W') out += "[^" + word + "]";
      else if (e == 'h') out += depth ? "0-9a-fA-F" : "[0-9a-fA-F]";
      else if (e == 'H') out += "[^0-9a-fA-F]";
      else out += {c, e};
      continue;
    }
    if (c == '[') ++depth;
    if (c == ']' && depth > 0) --depth;
    out += c;
  }
  return out;
}

/// A compiled pattern that finds matches in UTF-8 text, as HF's `Pattern::find_matches`:
/// a regex (Oniguruma syntax, run by ICU) or a literal string. Thread-safe.
class Regex {
 public:
  /// Compiles `pattern` (a literal string when `literal`). ModelError naming it when ICU rejects it.
  Regex(const std::string& pattern, bool literal) : source_(pattern), literal_(literal && !pattern.empty()) {
    if (literal_) return;
    UErrorCode status = U_ZERO_ERROR;
    UParseError where{};
    const std::string icu_pattern = literal ? std::string() : onig_to_icu(pattern);
    pattern_.reset(icu::RegexPattern::compile(to_utf16(icu_pattern), UREGEX_MULTILINE, where, status));
    check<ModelError>(U_SUCCESS(status), "regex '{}' does not compile ({} at offset {})", pattern, u_errorName(status),
                      where.offset);
  }

  /// The pattern as written in the file.
  const std::string& source() const { return source_; }

  /// Non-overlapping matches, leftmost first; an empty match right after the previous match is
  /// skipped (Oniguruma's find_iter, which HF uses).
  Matches find_all(const std::string& text) const {
    Matches out;
    if (text.empty()) return out;
    if (literal_) {
      for (size_t at = text.find(source_); at != std::string::npos; at = text.find(source_, at + source_.size()))
        out.emplace_back(at, at + source_.size());
      return out;
    }
    std::vector<int32_t> byte_at;
    const icu::UnicodeString u = to_utf16(text, &byte_at);
    auto matcher = acquire();
    UErrorCode status = U_ZERO_ERROR;
    matcher->reset(u);
    int32_t last_end = -1;
    while (matcher->find(status) && U_SUCCESS(status)) {
      const int32_t s = matcher->start(status), e = matcher->end(status);
      if (s == e && s == last_end) continue;
      out.emplace_back(static_cast<size_t>(byte_at[static_cast<size_t>(s)]), static_cast<size_t>(byte_at[static_cast<size_t>(e)]));
      last_end = e;
    }
    static const icu::UnicodeString nothing;
    matcher->reset(nothing);  // no reference to `u` stays in the pooled matcher
    release(std::move(matcher));
    check<ModelError>(U_SUCCESS(status), "regex '{}' failed on a text ({})", source_, u_errorName(status));
    return out;
  }

 private:
  std::unique_ptr<icu::RegexMatcher> acquire() const {
    {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      if (!pool_.empty()) {
        auto m = std::move(pool_.back());
        pool_.pop_back();
        return m;
      }
    }
    UErrorCode status = U_ZERO_ERROR;
    std::unique_ptr<icu::RegexMatcher> m(pattern_->matcher(status));
    check<ModelError>(U_SUCCESS(status), "regex '{}': no matcher ({})", source_, u_errorName(status));
    return m;
  }
  void release(std::unique_ptr<icu::RegexMatcher> m) const {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    pool_.push_back(std::move(m));
  }

  std::string source_;
  bool literal_;
  std::unique_ptr<icu::RegexPattern> pattern_;
  mutable std::mutex pool_mutex_;
  mutable std::vector<std::unique_ptr<icu::RegexMatcher>> pool_;
};

/// HF's find_matches: the whole text cut into (range, is_match) pieces, in order.
inline std::vector<std::pair<std::pair<size_t, size_t>, bool>> match_pieces(const std::string& text, const Matches& matches) {
  std::vector<std::pair<std::pair<size_t, size_t>, bool>> out;
  if (text.empty()) return {{{0, 0}, false}};
  size_t prev = 0;
  for (const auto& [s, e] : matches) {
    if (prev != s) out.push_back({{prev, s}, false});
    out.push_back({{s, e}, true});
    prev = e;
  }
  if (prev != text.size()) out.push_back({{prev, text.size()}, false});
  return out;
}

/// HF's find_matches for a per-character predicate: each character where `pred` holds is a match.
template <typename Pred>
std::vector<std::pair<std::pair<size_t, size_t>, bool>> char_pieces(const std::string& text, Pred pred) {
  Matches matches;
  for (size_t i = 0; i < text.size();) {
    const size_t start = i;
    if (pred(next_code_point(text, i))) matches.emplace_back(start, i);
  }
  return match_pieces(text, matches);
}

}  // namespace detail
}  // namespace hf
}  // namespace peft
