#pragma once
/// @file
/// The models (BPE, WordPiece, WordLevel), post-processors and decoders of a Hugging
/// Face tokenizer.json (peft/hf/tokenizer.h), each as HF `tokenizers` 0.23 implements it.

#include <peft/core/error.h>
#include <peft/hf/tokenizer_components.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace peft {
namespace hf {
namespace components {

// ---- models -------------------------------------------------------------------------------

/// A model's vocabulary: token <-> id.
class Vocabulary {
 public:
  /// Adds `token` with `id` (ids need not be contiguous).
  void add(const std::string& token, int64_t id) {
    ids_[token] = id;
    if (static_cast<size_t>(id) >= tokens_.size()) tokens_.resize(static_cast<size_t>(id) + 1), known_.resize(tokens_.size());
    tokens_[static_cast<size_t>(id)] = token;
    known_[static_cast<size_t>(id)] = true;
  }
  /// The id of `token`, or nullptr.
  const int64_t* find(const std::string& token) const {
    auto it = ids_.find(token);
    return it == ids_.end() ? nullptr : &it->second;
  }
  /// The token of `id`, or nullptr.
  const std::string* token(int64_t id) const {
    return id >= 0 && static_cast<size_t>(id) < tokens_.size() && known_[static_cast<size_t>(id)] ? &tokens_[static_cast<size_t>(id)]
                                                                                                   : nullptr;
  }
  /// Number of tokens (HF's get_vocab_size of the model).
  int64_t size() const { return static_cast<int64_t>(ids_.size()); }

 private:
  std::unordered_map<std::string, int64_t> ids_;
  std::vector<std::string> tokens_;
  std::vector<bool> known_;
};

/// HF's Model: the ids of one pre-tokenized piece.
class Model {
 public:
  /// A model over `vocab`.
  explicit Model(Vocabulary vocab) : vocab_(std::move(vocab)) {}
  /// Models are held through this base.
  virtual ~Model() = default;
  /// Appends the ids of `piece` (non-empty) to `out`.
  virtual void tokenize(const std::string& piece, std::vector<int64_t>& out) const = 0;
  /// The vocabulary.
  const Vocabulary& vocab() const { return vocab_; }

 protected:
  Vocabulary vocab_;  ///< token <-> id
};

/// The id of `token` in `vocab`; ModelError naming it when absent.
inline int64_t require_id(const Vocabulary& vocab, const std::string& token, const char* what) {
  const int64_t* id = vocab.find(token);
  check<ModelError>(id != nullptr, "{} '{}' is not in the vocabulary", what, token);
  return *id;
}

/// BPE's settings besides the vocabulary and merges (tokenizer.json's model fields).
struct BpeConfig {
  std::optional<std::string> unk_token;                  ///< the unknown token
  std::optional<std::string> continuing_subword_prefix;  ///< the prefix of non-initial characters ("##")
  std::optional<std::string> end_of_word_suffix;         ///< the suffix of a word's last character
  bool fuse_unk = false;       ///< merge runs of unk into one
  bool byte_fallback = false;  ///< unknown characters as `<0xXX>` byte tokens
  bool ignore_merges = false;  ///< a whole word in the vocabulary is kept without merging
};

/// Byte-pair encoding: characters (or <0xXX> bytes, or unk) merged by rank, results cached per word.
class Bpe : public Model {
 public:
  /// ModelError naming a merge whose parts or result are not in the vocabulary.
  Bpe(Vocabulary vocab, const std::vector<std::pair<std::string, std::string>>& merges, BpeConfig config)
      : Model(std::move(vocab)), config_(std::move(config)) {
    const size_t prefix = config_.continuing_subword_prefix ? config_.continuing_subword_prefix->size() : 0;
    merges_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const auto& [a, b] = merges[rank];
      const int64_t ia = require_id(vocab_, a, "merge token"), ib = require_id(vocab_, b, "merge token");
      const std::string joined = a + (b.size() >= prefix ? b.substr(prefix) : std::string());
      merges_[key(ia, ib)] = {static_cast<uint32_t>(rank), static_cast<int32_t>(require_id(vocab_, joined, "merge result"))};
    }
    for (int b = 0; b < 256; ++b) {
      const int64_t* id = vocab_.find(fmt::format("<0x{:02X}>", b));
      byte_ids_[b] = id ? *id : -1;
    }
  }

  /// Appends the ids of `piece` (from the cache when seen before).
  void tokenize(const std::string& piece, std::vector<int64_t>& out) const override {
    if (config_.ignore_merges)
      if (const int64_t* id = vocab_.find(piece)) return out.push_back(*id);
    {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      auto it = cache_.find(piece);
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const std::vector<int64_t> ids = merge_word(piece);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (piece.size() < kCacheMaxLength && cache_.size() < kCacheCapacity) cache_.emplace(piece, ids);
  }

 private:
  static constexpr size_t kCacheCapacity = 10000, kCacheMaxLength = 256;  // HF's cache limits
  struct Symbol {
    int32_t id, prev, next, len;  // len 0: merged into the symbol on its left
  };
  /// A 4-ary min-heap of merges by (rank, position), as HF's QuaternaryHeap (cache-friendly on long words).
  class MergeQueue {
   public:
    /// One candidate merge: its rank, where it starts, the merged token's id.
    struct Entry {
      uint32_t rank;   ///< the merge's rank (lower first)
      uint32_t pos;    ///< where the pair starts in the word
      int32_t new_id;  ///< the merged token's id
    };
    bool empty() const { return heap_.empty(); }
    void push(Entry e) {
      heap_.push_back(e);
      for (size_t i = heap_.size() - 1; i > 0 && less(heap_[i], heap_[(i - 1) / 4]); i = (i - 1) / 4)
        std::swap(heap_[i], heap_[(i - 1) / 4]);
    }
    Entry pop() {
      const Entry top = heap_[0];
      heap_[0] = heap_.back();
      heap_.pop_back();
      for (size_t i = 0;;) {
        size_t best = i;
        for (size_t c = 4 * i + 1; c <= 4 * i + 4 && c < heap_.size(); ++c)
          if (less(heap_[c], heap_[best])) best = c;
        if (best == i) break;
        std::swap(heap_[i], heap_[best]);
        i = best;
      }
      return top;
    }

   private:
    static bool less(const Entry& a, const Entry& b) { return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos; }
    std::vector<Entry> heap_;
  };
  static uint64_t key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }

  /// HF's Word building: each character as a symbol (prefix/suffix added), byte fallback or unk.
  std::vector<Symbol> initial_symbols(const std::string& w) const {
    std::vector<Symbol> symbols;
    int64_t unk_id = -1, unk_len = 0;  // a pending unk (fuse_unk grows it)
    auto add = [&](int64_t id, int64_t len) {
      const auto n = static_cast<int32_t>(symbols.size());
      if (n) symbols.back().next = n;
      symbols.push_back({static_cast<int32_t>(id), n - 1, -1, static_cast<int32_t>(len)});
    };
    for (size_t i = 0; i < w.size();) {
      const size_t at = i;
      detail::next_code_point(w, i);
      const auto len = static_cast<int64_t>(i - at);
      std::string s = w.substr(at, i - at);
      if (at > 0 && config_.continuing_subword_prefix) s = *config_.continuing_subword_prefix + s;
      if (i == w.size() && config_.end_of_word_suffix) s += *config_.end_of_word_suffix;
      if (const int64_t* id = vocab_.find(s)) {
        if (unk_id >= 0) add(unk_id, unk_len), unk_id = -1;
        add(*id, len);
      } else if (config_.byte_fallback && fallback(s, add)) {
        continue;
      } else if (config_.unk_token && unk_id >= 0 && config_.fuse_unk) {
        unk_len += len;
      } else if (config_.unk_token) {
        if (unk_id >= 0) add(unk_id, unk_len);
        unk_id = require_id(vocab_, *config_.unk_token, "unk_token");
        unk_len = len;
      }
    }
    if (unk_id >= 0) add(unk_id, unk_len);
    return symbols;
  }

  /// Adds `s` as <0xXX> byte tokens when the vocabulary has all of them.
  template <typename Add>
  bool fallback(const std::string& s, Add& add) const {
    for (unsigned char b : s)
      if (byte_ids_[b] < 0) return false;
    for (unsigned char b : s) add(byte_ids_[b], 1);
    return true;
  }

  /// HF's Word::merge_all: merges by lowest rank, then leftmost position.
  std::vector<int64_t> merge_word(const std::string& w) const {
    std::vector<Symbol> s = initial_symbols(w);
    MergeQueue queue;
    for (size_t i = 0; i + 1 < s.size(); ++i) push(queue, s, static_cast<int32_t>(i), static_cast<int32_t>(i + 1));
    while (!queue.empty()) {
      const auto top = queue.pop();
      const auto pos = static_cast<int32_t>(top.pos);
      Symbol& cur = s[top.pos];
      if (cur.len == 0 || cur.next == -1) continue;
      const Symbol right = s[static_cast<size_t>(cur.next)];
      auto it = merges_.find(key(cur.id, right.id));
      if (it == merges_.end() || it->second.second != top.new_id) continue;  // stale entry
      s[static_cast<size_t>(cur.next)].len = 0;
      cur.id = top.new_id;
      cur.len += right.len;
      cur.next = right.next;
      if (right.next > -1) s[static_cast<size_t>(right.next)].prev = pos;
      if (cur.prev >= 0) push(queue, s, cur.prev, pos);
      if (cur.next >= 0) push(queue, s, pos, cur.next);
    }
    std::vector<int64_t> ids;
    for (const auto& sym : s)
      if (sym.len != 0) ids.push_back(sym.id);
    return ids;
  }

  void push(MergeQueue& queue, const std::vector<Symbol>& s, int32_t left, int32_t right) const {
    auto it = merges_.find(key(s[static_cast<size_t>(left)].id, s[static_cast<size_t>(right)].id));
    if (it != merges_.end()) queue.push({it->second.first, static_cast<uint32_t>(left), it->second.second});
  }

  BpeConfig config_;
  std::unordered_map<uint64_t, std::pair<uint32_t, int32_t>> merges_;  // (a, b) -> (rank, merged id)
  int64_t byte_ids_[256];
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;
};

/// WordPiece: greedy longest-match-first subwords (`##` continuations); a word with no
/// segmentation, or longer than max_input_chars_per_word characters, is unk.
class WordPiece : public Model {
 public:
  /// tokenizer.json's vocab, unk_token, continuing_subword_prefix, max_input_chars_per_word.
  WordPiece(Vocabulary vocab, std::string unk, std::string prefix, size_t max_chars)
      : Model(std::move(vocab)), unk_(std::move(unk)), prefix_(std::move(prefix)), max_chars_(max_chars) {}

  /// Appends the ids of `piece`.
  void tokenize(const std::string& piece, std::vector<int64_t>& out) const override {
    if (detail::code_point_count(piece) > max_chars_) return out.push_back(require_id(vocab_, unk_, "unk_token"));
    const size_t first = out.size();
    for (size_t start = 0; start < piece.size();) {
      size_t end = piece.size();
      const int64_t* found = nullptr;
      while (start < end) {
        const std::string sub = (start > 0 ? prefix_ : std::string()) + piece.substr(start, end - start);
        if ((found = vocab_.find(sub))) break;
        do --end;  // back one character
        while (end > start && (static_cast<unsigned char>(piece[end]) & 0xC0) == 0x80);
      }
      if (!found) {
        out.resize(first);
        return out.push_back(require_id(vocab_, unk_, "unk_token"));
      }
      out.push_back(*found);
      start = end;
    }
  }

 private:
  std::string unk_, prefix_;
  size_t max_chars_;
};

/// WordLevel: each piece is one token of the vocabulary, or unk.
class WordLevel : public Model {
 public:
  /// tokenizer.json's vocab and unk_token.
  WordLevel(Vocabulary vocab, std::string unk) : Model(std::move(vocab)), unk_(std::move(unk)) {}
  /// Appends the id of `piece`.
  void tokenize(const std::string& piece, std::vector<int64_t>& out) const override {
    const int64_t* id = vocab_.find(piece);
    out.push_back(id ? *id : require_id(vocab_, unk_, "unk_token"));
  }

 private:
  std::string unk_;
};

// ---- post-processors ----------------------------------------------------------------------

/// HF's PostProcessor: adds special tokens and type ids to the encodings (one, or two for a pair).
class PostProcessor {
 public:
  /// Post-processors are held through this base.
  virtual ~PostProcessor() = default;
  /// How many special tokens it adds to a single sequence or a pair (truncation keeps room for them).
  virtual size_t added_tokens(bool is_pair) const = 0;
  /// HF's process_encodings.
  virtual void process(std::vector<Encoding>& encodings, bool add_special_tokens) const = 0;
};

/// One element of a TemplateProcessing template: a sequence ($A, $B) or a special token.
struct TemplatePiece {
  /// A sequence ($A or $B) rather than a special token.
  bool is_sequence = false;
  size_t sequence = 0;  ///< 0 for A, 1 for B
  std::string special;  ///< the special token's name in special_tokens
  /// The type id of its tokens.
  int64_t type_id = 0;
};

/// TemplateProcessing: the `single` or `pair` template, special tokens only when asked.
class TemplateProcessing : public PostProcessor {
 public:
  /// The templates and the ids of each special token they name.
  TemplateProcessing(std::vector<TemplatePiece> single, std::vector<TemplatePiece> pair,
                     std::map<std::string, std::vector<int64_t>> special_tokens)
      : single_(std::move(single)), pair_(std::move(pair)), special_(std::move(special_tokens)) {}
  /// The special tokens of the template.
  size_t added_tokens(bool is_pair) const override {
    size_t n = 0;
    for (const auto& p : is_pair ? pair_ : single_)
      if (!p.is_sequence) n += special_.at(p.special).size();
    return n;
  }
  /// The encodings laid out by the template.
  void process(std::vector<Encoding>& encodings, bool add_special_tokens) const override {
    std::vector<Encoding> out;
    for (const auto& p : encodings.size() == 1 ? single_ : pair_) {
      if (p.is_sequence) {
        check<ModelError>(p.sequence < encodings.size(), "TemplateProcessing: the template uses $B but there is no pair");
        Encoding e = encodings[p.sequence];
        e.type_ids.assign(e.ids.size(), p.type_id);
        out.push_back(std::move(e));
      } else if (add_special_tokens) {
        const auto& ids = special_.at(p.special);
        out.push_back({ids, std::vector<int64_t>(ids.size(), p.type_id)});
      }
    }
    encodings = std::move(out);
  }

 private:
  std::vector<TemplatePiece> single_, pair_;
  std::map<std::string, std::vector<int64_t>> special_;
};

/// BertProcessing ([CLS] A [SEP] B [SEP]) and RobertaProcessing (`<s> A </s></s> B </s>`, type ids all 0).
class BertProcessing : public PostProcessor {
 public:
  /// The [CLS] and [SEP] ids (RoBERTa's <s> and </s> when `roberta`).
  BertProcessing(int64_t cls, int64_t sep, bool roberta) : cls_(cls), sep_(sep), roberta_(roberta) {}
  /// 2 for a sequence, 3 (BERT) or 4 (RoBERTa) for a pair.
  size_t added_tokens(bool is_pair) const override { return is_pair ? (roberta_ ? 4 : 3) : 2; }
  /// Adds the special tokens around each encoding.
  void process(std::vector<Encoding>& encodings, bool add_special_tokens) const override {
    if (roberta_)
      for (auto& e : encodings) e.type_ids.assign(e.ids.size(), 0);
    if (!add_special_tokens) return;
    for (size_t i = 0; i < encodings.size(); ++i) {
      auto& e = encodings[i];
      const int64_t type = roberta_ || i == 0 ? 0 : 1;
      if (i == 0 || roberta_) e.ids.insert(e.ids.begin(), i == 0 ? cls_ : sep_), e.type_ids.insert(e.type_ids.begin(), type);
      e.ids.push_back(sep_);
      e.type_ids.push_back(type);
    }
  }

 private:
  int64_t cls_, sep_;
  bool roberta_;
};

/// ByteLevel as a post-processor: only trims offsets in HF, so the ids are unchanged.
class ByteLevelProcessing : public PostProcessor {
 public:
  /// None.
  size_t added_tokens(bool) const override { return 0; }
  /// Leaves the encodings as they are.
  void process(std::vector<Encoding>&, bool) const override {}
};

/// Sequence: the post-processors in order.
class PostProcessorSequence : public PostProcessor {
 public:
  /// The post-processors to run in order.
  explicit PostProcessorSequence(std::vector<std::shared_ptr<const PostProcessor>> steps) : steps_(std::move(steps)) {}
  /// The sum over the steps.
  size_t added_tokens(bool is_pair) const override {
    size_t n = 0;
    for (const auto& p : steps_) n += p->added_tokens(is_pair);
    return n;
  }
  /// Runs each post-processor.
  void process(std::vector<Encoding>& encodings, bool add_special_tokens) const override {
    for (const auto& p : steps_) p->process(encodings, add_special_tokens);
  }

 private:
  std::vector<std::shared_ptr<const PostProcessor>> steps_;
};

// ---- decoders -----------------------------------------------------------------------------

/// HF's Decoder: turns the tokens' strings back into text, step by step (decode_chain).
class Decoder {
 public:
  /// Decoders are held through this base.
  virtual ~Decoder() = default;
  /// Rewrites the token strings in place (the final text is their concatenation).
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

/// ByteLevel: byte-level characters back to bytes, all tokens into one UTF-8 string (lossy).
class ByteLevelDecoder : public Decoder {
 public:
  /// One token: the bytes of all of them, as UTF-8 (lossy).
  void decode_chain(std::vector<std::string>& tokens) const override {
    const auto& alphabet = ByteAlphabet::get();
    std::string bytes;
    for (const auto& t : tokens) {
      std::string mine;
      bool all = true;
      for (size_t i = 0; i < t.size() && all;) {
        const UChar32 c = detail::next_code_point(t, i);
        all = c < 512 && alphabet.byte_of[static_cast<size_t>(c)] >= 0;
        if (all) mine += static_cast<char>(alphabet.byte_of[static_cast<size_t>(c)]);
      }
      bytes += all ? mine : t;
    }
    tokens.assign(1, detail::utf8_lossy(bytes));
  }
};

/// WordPiece: joins with spaces except before `prefix` continuations; optional cleanup of
/// spaces before punctuation and contractions.
class WordPieceDecoder : public Decoder {
 public:
  /// tokenizer.json's prefix and cleanup.
  WordPieceDecoder(std::string prefix, bool cleanup) : prefix_(std::move(prefix)), cleanup_(cleanup) {}
  /// Joins continuations, spaces the other tokens.
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      auto& t = tokens[i];
      if (i != 0) t = t.compare(0, prefix_.size(), prefix_) == 0 ? t.substr(prefix_.size()) : " " + t;
      if (cleanup_) t = cleanup(t);
    }
  }
  /// HF's wordpiece cleanup (" ." -> ".", " n't" -> "n't", ...).
  static std::string cleanup(std::string s) {
    static const std::pair<const char*, const char*> kRules[] = {
        {" .", "."},   {" ?", "?"},     {" !", "!"},   {" ,", ","},     {" ' ", "'"},   {" n't", "n't"},
        {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : kRules) s = replace_all(s, from, to);
    return s;
  }

 private:
  static std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
    std::string out;
    size_t prev = 0;
    for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, prev)) {
      out.append(s, prev, at - prev);
      out += to;
      prev = at + from.size();
    }
    return out.append(s, prev, std::string::npos);
  }
  std::string prefix_;
  bool cleanup_;
};

/// Metaspace as a decoder (the pre-tokenizer's reverse).
class MetaspaceDecoder : public Decoder {
 public:
  /// The pre-tokenizer's settings.
  explicit MetaspaceDecoder(Metaspace metaspace) : metaspace_(std::move(metaspace)) {}
  /// Replacement characters back to spaces.
  void decode_chain(std::vector<std::string>& tokens) const override { metaspace_.decode_chain(tokens); }

 private:
  Metaspace metaspace_;
};

/// Replace: the Replace normalizer applied to each token.
class ReplaceDecoder : public Decoder {
 public:
  /// The replacement to make in each token.
  explicit ReplaceDecoder(Replace replace) : replace_(std::move(replace)) {}
  /// Makes the replacement in each token.
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) t = replace_.apply(t);
  }

 private:
  Replace replace_;
};

/// ByteFallback: runs of <0xXX> tokens become their bytes' text, or one U+FFFD per byte when not UTF-8.
class ByteFallbackDecoder : public Decoder {
 public:
  /// Byte tokens back to text.
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    size_t count = 0;
    auto flush = [&] {
      if (count == 0) return;
      if (detail::invalid_utf8_at(bytes) == std::string::npos) out.push_back(bytes);
      else out.insert(out.end(), count, "\xEF\xBF\xBD");
      bytes.clear();
      count = 0;
    };
    for (auto& t : tokens) {
      if (const int b = byte_token(t); b >= 0) {
        bytes += static_cast<char>(b);
        ++count;
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    tokens = std::move(out);
  }
  /// The byte of a "<0xXX>" token, or -1.
  static int byte_token(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    int v = 0;
    for (char c : t.substr(3, 2)) {
      const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (d < 0) return -1;
      v = v * 16 + d;
    }
    return v;
  }
};

/// Fuse: all tokens into one.
class FuseDecoder : public Decoder {
 public:
  /// Concatenates the tokens.
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, all);
  }
};

/// Strip: removes up to `start` leading and `stop` trailing `content` characters from each token.
class StripDecoder : public Decoder {
 public:
  /// tokenizer.json's content, start and stop.
  StripDecoder(UChar32 content, size_t start, size_t stop) : content_(content), start_(start), stop_(stop) {}
  /// Strips each token.
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      const auto cps = detail::code_points(t);
      size_t b = 0, e = cps.size();
      while (b < start_ && b < cps.size() && cps[b] == content_) ++b;
      for (size_t i = 0; i < stop_ && i < cps.size() && cps[cps.size() - i - 1] == content_; ++i) e = cps.size() - i - 1;
      std::string out;
      for (size_t i = b; i < e; ++i) detail::append_utf8(out, cps[i]);
      t = std::move(out);
    }
  }

 private:
  UChar32 content_;
  size_t start_, stop_;
};

/// BPEDecoder: the end-of-word `suffix` becomes a space (nothing after the last token).
class BpeDecoder : public Decoder {
 public:
  /// The end-of-word suffix.
  explicit BpeDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  /// Suffixes become spaces.
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string out;
      const std::string& t = tokens[i];
      size_t prev = 0;
      for (size_t at = t.find(suffix_); !suffix_.empty() && at != std::string::npos; at = t.find(suffix_, prev)) {
        out.append(t, prev, at - prev);
        out += i + 1 == tokens.size() ? "" : " ";
        prev = at + suffix_.size();
      }
      tokens[i] = out.append(t, prev, std::string::npos);
    }
  }

 private:
  std::string suffix_;
};

/// Sequence: the decoders in order.
class DecoderSequence : public Decoder {
 public:
  /// The decoders to run in order.
  explicit DecoderSequence(std::vector<std::shared_ptr<const Decoder>> steps) : steps_(std::move(steps)) {}
  /// Runs each decoder.
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& d : steps_) d->decode_chain(tokens);
  }

 private:
  std::vector<std::shared_ptr<const Decoder>> steps_;
};

}  // namespace components
}  // namespace hf
}  // namespace peft
