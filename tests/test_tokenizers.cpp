// peft::hf::Tokenizer (include/peft/hf/tokenizer.h) against the real HF tokenizers
// (Rust) and transformers: the ids and decoded text of tests/data/tokenizer_expected.json
// (tools/tokenizer_reference.py) for every pinned tokenizer.json and its patched variants,
// round trips, added tokens, padded batches, typed errors; the RealTokenizers suite
// compares with HF live on the corpus and on random strings.
#include <gtest/gtest.h>
#include <peft/hf/tokenizer.h>
#include <peft/peft.h>  // fixtures.h needs it
#include <peft/io/atomic_file.h>

#include <chrono>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fixtures.h"

namespace tokenizer_tests {

using peft::hf::AutoTokenizer;
using peft::hf::PaddingOptions;
using peft::hf::Tokenizer;

std::string assets(const std::string& path) { return std::string(PEFT_ASSETS_DIR) + "/" + path; }

const nlohmann::json& expected() {
  static const auto j =
      nlohmann::json::parse(peft::io::read_file(std::string(PEFT_SOURCE_DIR) + "/tests/data/tokenizer_expected.json"));
  return j;
}

const std::vector<std::string>& corpus() {
  static const auto c = nlohmann::json::parse(peft::io::read_file(std::string(PEFT_SOURCE_DIR) + "/tests/data/tokenizer_corpus.json"))
                            .get<std::vector<std::string>>();
  return c;
}

/// tools/tokenizer_reference.py's apply_patch: dotted paths set, "+key" appends to a list.
nlohmann::json apply_patch(nlohmann::json j, const nlohmann::json& patch) {
  for (const auto& [path, value] : patch.items()) {
    if (path[0] == '+') {
      for (const auto& v : value) j[path.substr(1)].push_back(v);
      continue;
    }
    nlohmann::json* node = &j;
    size_t start = 0;
    for (size_t dot; (dot = path.find('.', start)) != std::string::npos; start = dot + 1) node = &(*node)[path.substr(start, dot - start)];
    (*node)[path.substr(start)] = value;
  }
  return j;
}

/// The tokenizer of a variant of the expected file (built once).
const Tokenizer& variant(const std::string& name) {
  static std::map<std::string, Tokenizer> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  for (const auto& v : expected()["variants"])
    if (v["name"] == name) {
      const std::string file = assets(v["file"].get<std::string>());
      const auto j = apply_patch(nlohmann::json::parse(peft::io::read_file(file)), v["patch"]);
      return cache.emplace(name, Tokenizer::from_json(j, file + " (" + name + ")")).first->second;
    }
  throw std::runtime_error("no variant " + name);
}

/// AutoTokenizer of an assets folder (built once).
const Tokenizer& auto_tokenizer(const std::string& folder) {
  static std::map<std::string, Tokenizer> cache;
  auto it = cache.find(folder);
  return it != cache.end() ? it->second : cache.emplace(folder, AutoTokenizer::from_pretrained(assets(folder))).first->second;
}

std::vector<std::string> variant_names() {
  std::vector<std::string> names;
  for (const auto& v : expected()["variants"]) names.push_back(v["name"]);
  return names;
}

TEST(Tokenizers, EveryPinnedFileGivesHfsIdsAndTextOnTheCorpus) {
  ASSERT_GE(corpus().size(), 40u);
  ASSERT_GE(expected()["variants"].size(), 14u);
  for (const auto& v : expected()["variants"]) {
    const std::string name = v["name"];
    const Tokenizer& tok = variant(name);
    int mismatches = 0;
    for (size_t i = 0; i < corpus().size(); ++i) {
      const auto& want = v["results"][i];
      const auto ids = tok.encode(corpus()[i], true);
      const std::string text = want["decoded"].is_null() ? corpus()[i] : want["decoded"].get<std::string>();
      mismatches += ids != want["ids"].get<std::vector<int64_t>>() || tok.decode(ids, false) != text;
      EXPECT_EQ(ids, want["ids"].get<std::vector<int64_t>>()) << name << " on corpus[" << i << "] " << corpus()[i];
      EXPECT_EQ(tok.decode(ids, false), text) << name << " on corpus[" << i << "]";
    }
    EXPECT_EQ(mismatches, 0) << name;
  }
}

/// Random text from many scripts, special-token strings, marks, controls and unassigned code points.
std::vector<std::string> random_texts(size_t n, uint32_t seed) {
  static const std::vector<std::string> atoms = {
      "a", "Z", "q", "7", "42", " ", "  ", "\t", "\n", "\r\n", ".", ",", "'s", "'T", "-", "--", "!?", "(", "]", "$", "_", "#",
      "é", "e\u0301", "\u0301", "ß", "İ", "Σ", "ǅ", "ﬁ", "①", "½", "中", "文", "日本", "カ", "한", "ا", "ש", "न", "ส", "😀",
      "👍🏽", "👨\u200d👩", "🇫🇷", "\u200b", "\u00a0", "\u3000", "\u000b", "\u0085", "\u001c", std::string(1, '\0'), "\u007f", "\u00ad",
      "\ufeff", "\ufffd", "\ue000", "\U000F0000", "\u0378", "\U0001FAE0", "\u08e2", "𝔘", "𓀀", "𪚥", "<s>", "</s>", "[CLS]",
      "[MASK]", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>", "<tag>", "word", "Hello World", "Café", "▁", "<0x41>"};
  std::mt19937 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, atoms.size() - 1), length(0, 24);
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) {
    std::string s;
    for (size_t k = length(rng); k > 0; --k) s += atoms[pick(rng)];
    out.push_back(s);
  }
  return out;
}

TEST(Tokenizers, ByteLevelBpeRoundTripsAnyText) {
  auto texts = corpus();
  for (const auto& t : random_texts(300, 5)) texts.push_back(t);
  for (const char* name : {"llama3", "gpt2-bytelevel"}) {
    const Tokenizer& tok = variant(name);
    for (const auto& text : texts) EXPECT_EQ(tok.decode(tok.encode(text, false), false), text) << name;
  }
  // add_prefix_space: a space before each piece (and the file pads on the left: skip the pad tokens)
  const Tokenizer& prefixed = variant("gpt2-prefix-roberta");
  EXPECT_EQ(prefixed.decode(prefixed.encode("Hello world", false), true), " Hello world");
  EXPECT_EQ(prefixed.decode(prefixed.encode(" Hello world", false), true), " Hello world");
  // Qwen 3 normalises to NFC first: the round trip gives the NFC form
  const Tokenizer& qwen = variant("qwen3");
  for (const auto& text : texts)
    EXPECT_EQ(qwen.decode(qwen.encode(text, false)), peft::hf::detail::normalize(text, peft::hf::detail::NormalForm::kNFC));
}

TEST(Tokenizers, WordPieceAndMetaspaceAreLossyAsHfIs) {
  // BERT lowercases, strips accents, splits punctuation and maps unknown words to [UNK]; the
  // WordPiece decoder's cleanup works token by token, so "don't" comes back as "don ' t" (as in HF)
  const Tokenizer& bert = variant("bert");  // its file pads to 128: skip_special_tokens drops [PAD]
  EXPECT_EQ(bert.decode(bert.encode("Café, naïve!", false), true), "cafe, naive!");
  EXPECT_EQ(bert.decode(bert.encode("don't stop", false), true), "don ' t stop");
  EXPECT_EQ(bert.decode(bert.encode("I ♥ 𓀀", false), true), "i ♥");
  EXPECT_EQ(bert.decode(bert.encode("I ♥ 𓀀", false), false).substr(0, 11), "i ♥ [UNK]");
  EXPECT_EQ(bert.decode(bert.encode("a  b\tc", false), true), "a b c");
  // Llama 2 (Prepend + Replace normaliser, byte fallback): the decoder strips the space it prepended
  const Tokenizer& llama2 = variant("llama2");
  EXPECT_EQ(llama2.encode("Hello  world 😀 𓀀", false),
            (std::vector<int64_t>{22557, 28705, 1526, 28705, 30575, 28705, 243, 150, 131, 131}));  // 𓀀 as 4 <0xXX> bytes
  EXPECT_EQ(llama2.decode(llama2.encode("Hello  world 😀 𓀀", false)), "Hello  world 😀 𓀀");
  EXPECT_EQ(llama2.decode(llama2.encode(" leading space", false)), " leading space");
  EXPECT_EQ(llama2.decode(llama2.encode("x", true), true), "x");  // <s> skipped
}

TEST(Tokenizers, AddedAndSpecialTokensAreSplitBeforeNormalisation) {
  const Tokenizer& llama3 = variant("llama3");
  EXPECT_EQ(llama3.encode("<|begin_of_text|>", false), std::vector<int64_t>{128000});
  EXPECT_EQ(llama3.token_to_id("<|end_of_text|>"), 128001);
  EXPECT_EQ(llama3.id_to_token(128000), "<|begin_of_text|>");
  EXPECT_EQ(llama3.id_to_token(9906), "Hello");
  EXPECT_FALSE(llama3.token_to_id("no such token").has_value());
  EXPECT_FALSE(llama3.id_to_token(10000000).has_value());
  EXPECT_EQ(llama3.vocab_size(), 128256);
  EXPECT_EQ(llama3.vocab_size(false), 128000);
  const auto ids = llama3.encode("<|begin_of_text|>Hi<|end_of_text|>", true);
  EXPECT_EQ(llama3.decode(ids, false), "<|begin_of_text|>Hi<|end_of_text|>");
  EXPECT_EQ(llama3.decode(ids, true), "Hi");

  const Tokenizer& bert = variant("bert-cased");  // BertProcessing; added tokens with each flag
  EXPECT_EQ(bert.encode("x", true).front(), 101);
  EXPECT_EQ(bert.encode("x", true).back(), 102);
  EXPECT_EQ(bert.encode("x", false).size(), 1u);
  auto has = [&](const std::string& text, int64_t id) {
    const auto v = bert.encode(text, false);
    return std::find(v.begin(), v.end(), id) != v.end();
  };
  const int64_t word = bert.token_to_id("word").value();  // an added token the vocabulary has keeps its id
  EXPECT_EQ(word, 2773);
  EXPECT_EQ(bert.encode("a word b", false), (std::vector<int64_t>{1037, word, 1038}));  // single_word
  EXPECT_EQ(bert.encode("swords", false), std::vector<int64_t>{10689});                  // inside a word: not matched
  EXPECT_TRUE(has("say Hello World", 30522));
  EXPECT_EQ(bert.encode("a   <tag>   b", false), bert.encode("a<tag>b", false));  // lstrip + rstrip
  EXPECT_EQ(bert.decode(bert.encode("a <tag> b", true), true), "a b");
}

TEST(Tokenizers, AutoTokenizerMatchesTransformers) {
  for (const auto& a : expected()["auto"]) {
    const std::string folder = a["folder"];
    const Tokenizer& tok = auto_tokenizer(folder);
    EXPECT_EQ(tok.padding_side(), a["padding_side"].get<std::string>()) << folder;
    auto opt = [](const nlohmann::json& v) { return v.is_null() ? std::optional<int64_t>() : std::optional<int64_t>(v.get<int64_t>()); };
    EXPECT_EQ(tok.pad_token_id(), opt(a["pad_token_id"])) << folder;
    EXPECT_EQ(tok.bos_token_id(), opt(a["bos_token_id"])) << folder;
    EXPECT_EQ(tok.eos_token_id(), opt(a["eos_token_id"])) << folder;
    EXPECT_EQ(tok.vocab_size(), a["vocab_size"].get<int64_t>()) << folder;
    for (size_t i = 0; i < corpus().size(); ++i)
      EXPECT_EQ(tok.encode(corpus()[i]), a["ids"][i].get<std::vector<int64_t>>()) << folder << " corpus[" << i << "]";
  }
}

TEST(Tokenizers, EncodeBatchPadsAndTruncatesAsTransformers) {
  int batches = 0;
  for (const auto& a : expected()["auto"]) {
    const Tokenizer& tok = auto_tokenizer(a["folder"].get<std::string>());
    for (const auto& b : a["batches"]) {
      const auto& o = b["options"];
      auto options = PaddingOptions().padding_side(b["padding_side"].get<std::string>());
      if (o["padding"] == "max_length") options.padding(peft::hf::PaddingStrategy::kMaxLength);
      if (o.contains("truncation")) options.truncation(o["truncation"].get<bool>());
      if (o.contains("max_length")) options.max_length(o["max_length"].get<int64_t>());
      if (o.contains("pad_to_multiple_of")) options.pad_to_multiple_of(o["pad_to_multiple_of"].get<int64_t>());
      const auto out = tok.encode_batch(b["texts"].get<std::vector<std::string>>(), options);
      const auto ids = b["input_ids"].get<std::vector<std::vector<int64_t>>>();
      ASSERT_EQ(out.input_ids.dtype(), torch::kLong);
      ASSERT_EQ(out.input_ids.sizes(), (std::vector<int64_t>{static_cast<int64_t>(ids.size()), static_cast<int64_t>(ids[0].size())}))
          << a["folder"] << " " << o.dump();
      for (size_t i = 0; i < ids.size(); ++i) {
        const auto row = out.input_ids[static_cast<int64_t>(i)].contiguous();
        const auto mask = out.attention_mask[static_cast<int64_t>(i)].contiguous();
        EXPECT_EQ(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel()), ids[i]) << o.dump();
        EXPECT_EQ(std::vector<int64_t>(mask.data_ptr<int64_t>(), mask.data_ptr<int64_t>() + mask.numel()),
                  b["attention_mask"][i].get<std::vector<int64_t>>());
      }
      ++batches;
    }
  }
  EXPECT_GE(batches, 16);
}

TEST(Tokenizers, EncodeBatchOptionsAndMissingPadToken) {
  Tokenizer tok = auto_tokenizer("llama3-tokenizer/models");  // a copy: the setters below stay local
  EXPECT_FALSE(tok.pad_token_id().has_value());
  peft_test::expect_error<peft::OptionError>([&] { tok.encode_batch({"a", "a b c"}); }, {"no pad token"});
  const auto same = tok.encode_batch({"a b", "c d"});  // nothing to pad: no pad token needed
  EXPECT_EQ(same.input_ids.sizes(), (std::vector<int64_t>{2, 2}));
  tok.set_pad_token("<|end_of_text|>");
  const auto b = tok.encode_batch({"Hello", "Hello world, again"}, PaddingOptions().padding_side("left"));
  EXPECT_EQ(b.input_ids[0][0].item<int64_t>(), 128001);
  EXPECT_EQ(b.attention_mask[0][0].item<int64_t>(), 0);
  EXPECT_EQ(b.attention_mask[1].sum().item<int64_t>(), b.input_ids.size(1));
  const auto cut = tok.encode_batch({std::string(500, 'x') + " y"}, PaddingOptions().max_length(7).truncation(true).truncation_side("left"));
  EXPECT_EQ(cut.input_ids.size(1), 7);
  EXPECT_EQ(tok.decode({cut.input_ids[0][6].item<int64_t>()}), " y");
  peft_test::expect_error<peft::OptionError>(
      [&] { tok.encode_batch({std::string(50, 'x')}, PaddingOptions().max_length(4).padding(peft::hf::PaddingStrategy::kMaxLength)); },
      {"more than max_length 4"});
  peft_test::expect_error<peft::OptionError>([&] { tok.set_padding_side("middle"); }, {"padding_side", "middle"});
  peft_test::expect_error<peft::OptionError>([&] { tok.set_pad_token("<|nope|>"); }, {"<|nope|>"});
  const auto empty = tok.encode_batch({});
  EXPECT_EQ(empty.input_ids.sizes(), (std::vector<int64_t>{0, 0}));
}

/// A tokenizer.json with `key` replaced, built from the small BERT file.
Tokenizer bert_with(const std::string& key, const nlohmann::json& value) {
  auto j = nlohmann::json::parse(peft::io::read_file(assets("all-minilm-l6-v2/tokenizer.json")));
  j = apply_patch(j, {{key, value}});
  return Tokenizer::from_json(j, "patched.json");
}

TEST(Tokenizers, TypedErrorsNameTheFilePathAndType) {
  peft_test::expect_error<peft::FileError>([] { Tokenizer::from_file("/nonexistent/tokenizer.json"); }, {"/nonexistent/tokenizer.json"});
  const auto dir = peft_test::fresh_dir("tokenizer_errors");
  std::ofstream(dir / "tokenizer.json") << "{\"model\": [1, 2";
  peft_test::expect_error<peft::FileError>([&] { Tokenizer::from_file(dir / "tokenizer.json"); }, {"not valid JSON", "tokenizer.json"});
  peft_test::expect_error<peft::FileError>([&] { AutoTokenizer::from_pretrained(dir / "missing"); }, {"no tokenizer.json"});
  peft_test::expect_error<peft::FileError>([] { bert_with("model.type", "Unigram"); }, {"patched.json", "model", "'Unigram'"});
  peft_test::expect_error<peft::FileError>(
      [] { bert_with("normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "Precompiled"}}}}}); },
      {"patched.json", "normalizer.normalizers[1]", "unknown normalizer type 'Precompiled'"});
  peft_test::expect_error<peft::FileError>([] { bert_with("pre_tokenizer", {{"type", "UnicodeScripts"}}); },
                                           {"pre_tokenizer", "unknown pre_tokenizer type 'UnicodeScripts'"});
  peft_test::expect_error<peft::FileError>([] { bert_with("decoder", {{"type", "CTC"}}); }, {"decoder", "'CTC'"});
  peft_test::expect_error<peft::FileError>([] { bert_with("post_processor", {{"type", "Nope"}}); }, {"post_processor", "'Nope'"});
  peft_test::expect_error<peft::FileError>(
      [] { bert_with("pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "(("}}}, {"behavior", "Isolated"}, {"invert", false}}); },
      {"pre_tokenizer.pattern", "(("});
  peft_test::expect_error<peft::FileError>(
      [] { bert_with("pre_tokenizer", {{"type", "Split"}, {"pattern", {{"String", "x"}}}, {"behavior", "Sideways"}, {"invert", false}}); },
      {"pre_tokenizer.behavior", "'Sideways'"});
  auto bpe = nlohmann::json::parse(peft::io::read_file(assets("llama2-tokenizer/models/tokenizer.json")));
  bpe["model"]["merges"].push_back("\u2581t no_such_token");
  peft_test::expect_error<peft::FileError>([&] { Tokenizer::from_json(bpe, "merges.json"); }, {"merges.json", "model", "no_such_token"});

  const Tokenizer& tok = variant("llama3");
  peft_test::expect_error<peft::ShapeError>([&] { tok.decode({9906, 999999}); }, {"id 999999"});
  peft_test::expect_error<peft::ShapeError>([&] { tok.decode({-1}); }, {"id -1"});
  peft_test::expect_error<peft::OptionError>([&] { tok.encode("bad \xff byte"); }, {"not valid UTF-8", "byte 4"});
}

TEST(Tokenizers, EncodesFromSeveralThreadsAtOnce) {  // one tokenizer, shared BPE cache and regex matchers
  for (const char* name : {"qwen3", "bert-nfkd-whitespace"}) {
    const Tokenizer& tok = variant(name);
    const auto texts = random_texts(400, 23);
    std::vector<std::vector<int64_t>> want;
    for (const auto& t : texts) want.push_back(tok.encode(t));
    std::vector<int> bad(4, 0);
    std::vector<std::thread> threads;
    for (size_t k = 0; k < 4; ++k)
      threads.emplace_back([&, k] {
        for (size_t i = k; i < texts.size() * 3; i += 4) {
          const size_t t = i % texts.size();
          bad[k] += tok.encode(texts[t]) != want[t];
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(bad, std::vector<int>(4, 0)) << name;
  }
}

TEST(Tokenizers, ReportsEncodingSpeed) {  // a sanity number for docs/tokenizers.md, not a timed test
  const int n = 20;
  for (const char* file : {"llama3-tokenizer/models", "qwen3-tokenizer/models", "llama2-tokenizer/models", "all-minilm-l6-v2"}) {
    const Tokenizer& tok = auto_tokenizer(file);  // no padding: the ids are the text's
    size_t count = 0;
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < n; ++r)
      for (const auto& text : corpus()) count += tok.encode(text, false).size();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "[ speed    ] " << file << ": " << count << " tokens in " << seconds << " s = " << static_cast<int64_t>(count / seconds)
              << " tokens/s (corpus x " << n << ", one thread)\n";
    EXPECT_GT(count, 0u);
  }
}

TEST(RealTokenizers, MatchHfTokenizersLiveOnCorpusAndRandomText) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  auto texts = corpus();
  for (const auto& t : random_texts(200, 17)) texts.push_back(t);
  nlohmann::json cases = nlohmann::json::array();
  for (const auto& name : variant_names()) {
    const Tokenizer& tok = variant(name);
    for (const auto& text : texts) {
      const auto ids = tok.encode(text, true);
      cases.push_back({{"variant", name}, {"text", text}, {"ids", ids}, {"decoded", tok.decode(ids, false)}});
    }
  }
  const auto file = peft_test::fresh_dir("tokenizer_live") / "cpp.json";
  std::ofstream(file) << nlohmann::json{{"cases", cases}}.dump();
  EXPECT_EQ(peft_test::run_reference_tool("tokenizer_reference.py --assets " + std::string(PEFT_ASSETS_DIR) + " --check " + file.string()), 0);
}

}  // namespace tokenizer_tests
