#pragma once
// The tokenizer of Universal Sentence Encoder Lite, as the package's own
// JavaScript (@energetic-ai/embeddings@0.2.0) implements it, quirks included,
// so that C++ gives exactly its token ids (tests/test_use_lite.cpp checks):
// - NFKC, then "▁" prepended and every ASCII space replaced by "▁";
// - every vocabulary piece (the first 6 are reserved; a null score counts as 0) that is a prefix of the
//   rest of the input is an edge; a position with none gets the single
//   character as unknown (id 0, score 0);
// - best path over end positions, then start positions, ascending: a candidate
//   replaces the best when the best is exactly 0 ("unset") or it scores >= (ties
//   go to the later candidate);
// - back-tracking steps by the chosen piece's JavaScript length (UTF-16 units);
//   consecutive unknown ids merge into one.

#include <peft/core/error.h>
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace peft_examples {

class UseTokenizer {
 public:
  static constexpr int kReserved = 6;

  explicit UseTokenizer(const std::filesystem::path& vocab_json) {
    std::ifstream in(vocab_json);
    peft::check<peft::FileError>(in.good(), "cannot read the USE-Lite vocabulary '{}' (run scripts/fetch_assets.sh)",
                                 vocab_json.string());
    nlohmann::json vocab;
    try {
      vocab = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw peft::FileError("'" + vocab_json.string() + "' is not valid JSON: " + e.what());
    }
    peft::check<peft::FileError>(vocab.is_array() && vocab.size() > kReserved, "'{}': expected a list of [piece, score]",
                                 vocab_json.string());
    nodes_.emplace_back();
    for (size_t i = 0; i < vocab.size(); ++i) {
      const auto& entry = vocab[i];
      peft::check<peft::FileError>(
          entry.is_array() && entry.size() == 2 && entry[0].is_string() && (entry[1].is_number() || entry[1].is_null()),
          "'{}': entry {} is not [piece, score]", vocab_json.string(), i);
      const std::u32string piece = code_points(entry[0].get<std::string>());
      js_length_.push_back(utf16_length(piece));
      // A few pieces (":", "://", ...) have score null, which JavaScript adds as 0.
      const double score = entry[1].is_null() ? 0.0 : entry[1].get<double>();
      if (static_cast<int>(i) >= kReserved) insert(piece, score, static_cast<int64_t>(i));
    }
  }

  /// Number of ids (the vocabulary entries, reserved ones included).
  int64_t size() const { return static_cast<int64_t>(js_length_.size()); }

  /// Token ids of `text` (UTF-8).
  std::vector<int64_t> encode(const std::string& text) const {
    const std::u32string symbols = prepare(text);
    const size_t n = symbols.size();
    // edges[end] holds (start, length, score, id); filled by ascending start,
    // which is the order the JavaScript visits them in.
    struct Edge {
      size_t start, length;
      double score;
      int64_t id;
    };
    std::vector<std::vector<Edge>> edges(n + 1);
    for (size_t i = 0; i < n; ++i) {
      bool matched = false;
      int node = 0;
      for (size_t j = i; j < n; ++j) {
        auto child = nodes_[node].children.find(symbols[j]);
        if (child == nodes_[node].children.end()) break;
        node = child->second;
        if (nodes_[node].end) {
          edges[j + 1].push_back({i, j + 1 - i, nodes_[node].score, nodes_[node].id});
          matched = true;
        }
      }
      if (!matched) edges[i + 1].push_back({i, 1, 0.0, 0});
    }
    std::vector<double> best(n + 1, 0.0);
    std::vector<int64_t> words(n + 1, 0);
    for (size_t end = 0; end <= n; ++end) {
      for (const Edge& e : edges[end]) {
        const double score = e.score + best[end - e.length];
        if (best[end] == 0 || score >= best[end]) {
          best[end] = score;
          words[end] = e.id;
        }
      }
    }
    std::vector<int64_t> reversed;
    for (int64_t at = static_cast<int64_t>(n); at > 0; at -= js_length_.at(static_cast<size_t>(words[at])))
      reversed.push_back(words[at]);
    std::vector<int64_t> ids;
    bool previous_unknown = false;
    for (int64_t id : reversed) {
      if (!(previous_unknown && id == 0)) ids.push_back(id);
      previous_unknown = id == 0;
    }
    return {ids.rbegin(), ids.rend()};
  }

 private:
  struct Node {
    std::unordered_map<char32_t, int> children;
    bool end = false;
    double score = 0;
    int64_t id = 0;
  };

  void insert(const std::u32string& piece, double score, int64_t id) {
    int node = 0;
    for (char32_t c : piece) {
      auto it = nodes_[node].children.find(c);
      if (it == nodes_[node].children.end()) {
        nodes_.emplace_back();
        it = nodes_[node].children.emplace(c, static_cast<int>(nodes_.size()) - 1).first;
      }
      node = it->second;
    }
    if (piece.empty()) return;
    nodes_[node].end = true;
    nodes_[node].score = score;
    nodes_[node].id = id;
  }

  /// NFKC; then "▁" + text with every ASCII space as "▁" (nothing for empty text).
  static std::u32string prepare(const std::string& text) {
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
    peft::check<peft::Error>(U_SUCCESS(status), "ICU has no NFKC normaliser: {}", u_errorName(status));
    icu::UnicodeString normalized = nfkc->normalize(icu::UnicodeString::fromUTF8(text), status);
    peft::check<peft::Error>(U_SUCCESS(status), "NFKC normalisation failed: {}", u_errorName(status));
    std::string utf8;
    normalized.toUTF8String(utf8);
    std::u32string symbols = code_points(utf8);
    if (symbols.empty()) return symbols;
    for (char32_t& c : symbols)
      if (c == U' ') c = kSeparator;
    symbols.insert(symbols.begin(), kSeparator);
    return symbols;
  }

  static std::u32string code_points(const std::string& utf8) {
    icu::UnicodeString s = icu::UnicodeString::fromUTF8(utf8);
    std::u32string out;
    for (int32_t i = 0; i < s.length(); i = s.moveIndex32(i, 1)) out.push_back(static_cast<char32_t>(s.char32At(i)));
    return out;
  }

  static int64_t utf16_length(const std::u32string& s) {
    int64_t n = 0;
    for (char32_t c : s) n += c > 0xFFFF ? 2 : 1;
    return n;
  }

  static constexpr char32_t kSeparator = U'\u2581';
  std::vector<Node> nodes_;
  std::vector<int64_t> js_length_;
};

}  // namespace peft_examples
