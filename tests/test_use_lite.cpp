// USE-Lite (the main job's pretrained model): the C++ tokenizer gives exactly the
// token ids, and tokenizer + TorchScript port (tools/convert_use_lite.py) the
// embeddings, of the package's own JavaScript runtime (tools/use_lite/reference.js,
// output checked in as tests/data/use_lite_reference.json).
#include <gtest/gtest.h>

#include <fstream>

#include <peft/peft.h>

#include "common/spam_data.h"
#include "common/use_tokenizer.h"
#include "fixtures.h"

namespace {

nlohmann::json reference() {
  std::ifstream in(std::string(PEFT_SOURCE_DIR) + "/tests/data/use_lite_reference.json");
  return nlohmann::json::parse(in);
}

std::filesystem::path vocab_path() { return std::filesystem::path(PEFT_ASSETS_DIR) / "use-lite/dist/vocab.json"; }

TEST(UseLiteTokenizer, MatchesTheJavaScriptTokenizerExactly) {
  peft_examples::UseTokenizer tokenizer(vocab_path());
  const nlohmann::json ref = reference();
  ASSERT_GE(ref["sentences"].size(), 10u);
  for (size_t i = 0; i < ref["sentences"].size(); ++i) {
    const std::string sentence = ref["sentences"][i].get<std::string>();
    EXPECT_EQ(tokenizer.encode(sentence), ref["ids"][i].get<std::vector<int64_t>>()) << "sentence: '" << sentence << "'";
  }
}

TEST(UseLiteModel, TokenizerAndTorchScriptPortMatchTheJavaScriptEmbeddings) {
  peft_examples::UseTokenizer tokenizer(vocab_path());
  const nlohmann::json ref = reference();
  std::vector<std::vector<int64_t>> ids;
  for (const auto& s : ref["sentences"]) ids.push_back(tokenizer.encode(s.get<std::string>()));
  int64_t longest = 1;
  for (const auto& seq : ids) longest = std::max<int64_t>(longest, static_cast<int64_t>(seq.size()));
  torch::Tensor input = torch::zeros({static_cast<int64_t>(ids.size()), longest}, torch::kLong);
  torch::Tensor mask = torch::zeros_like(input);
  for (size_t i = 0; i < ids.size(); ++i)
    for (size_t j = 0; j < ids[i].size(); ++j) input[i][j] = ids[i][j], mask[i][j] = 1;
  torch::jit::Module model = torch::jit::load(PEFT_USE_LITE);
  model.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor out = model.forward({input, mask}).toTensor();
  torch::Tensor expected = torch::tensor(ref["embeddings"].get<std::vector<std::vector<float>>>()[0]).unsqueeze(0);
  for (size_t i = 1; i < ids.size(); ++i)
    expected = torch::cat({expected, torch::tensor(ref["embeddings"][i].get<std::vector<float>>()).unsqueeze(0)});
  ASSERT_EQ(out.sizes(), expected.sizes());
  torch::Tensor cosine = torch::cosine_similarity(out, expected, 1);
  EXPECT_GE(cosine.min().item<double>(), 0.9999);
  EXPECT_LE((out - expected).abs().max().item<double>(), 1e-4);
}

TEST(UseLiteModel, PrefixAndPromptTuningFitItsLayers) {
  // Its two layers differ (4 heads of 64, then 4 of 128) and it clips the ids
  // before embedding them: prefix and prompt tuning must cope with both.
  torch::jit::Module base = torch::jit::load(PEFT_USE_LITE);
  torch::Tensor ids = torch::randint(6, 8000, {3, 12}), mask = torch::ones({3, 12}, torch::kLong);
  mask[2].narrow(0, 7, 5).zero_();
  const std::vector<std::pair<std::string, peft::PeftConfig>> configs{
      {"prefix", peft::PrefixTuningConfig().num_virtual_tokens(5)},
      // The model pools over its mask input, so the prompt positions stay in the sequence.
      {"prompt", peft::PromptTuningConfig().num_virtual_tokens(5).keep_prompt_positions(true)}};
  for (const auto& [name, config] : configs) {
    peft::PeftModel model = peft::get_peft_model(base, config);
    const int64_t expected = name == "prefix" ? 5 * (2 * 4 * 64 + 2 * 4 * 128) : 5 * 256;
    EXPECT_EQ(model.count_parameters().trainable, expected) << name;
    torch::Tensor target = torch::randn({3, 512});
    torch::optim::Adam opt(model.trainable_parameters(), 1e-2);
    std::vector<double> losses;
    for (int step = 0; step < 5; ++step) {
      opt.zero_grad();
      torch::Tensor loss = (model.forward({ids, mask}).toTensor() - target).pow(2).mean();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    EXPECT_LT(losses.back(), losses.front()) << name;
  }
}

// ----------------------------------------------------------- SpamAssassin
TEST(SpamAssassin, DecodesWhatEmailsEncode) {
  namespace mail = peft_examples::mail;
  EXPECT_EQ(mail::decode_quoted_printable("caf=C3=A9 cost=3D5 =\nnext"), "caf\xC3\xA9 cost=5 next");
  EXPECT_EQ(mail::decode_base64("aGVsbG8g\nd29ybGQ="), "hello world");
  EXPECT_EQ(mail::collapse_whitespace(mail::strip_html("<style>p{}</style><p>Buy &amp; save</p>")), "Buy & save");
  EXPECT_EQ(mail::header("Subject: Free\n money\nFrom: x", "subject"), " Free money");
  const std::string raw =
      "Subject: Offer\nContent-Type: multipart/alternative; boundary=\"b1\"\n\n"
      "--b1\nContent-Type: text/html\n\n<b>html version</b>\n"
      "--b1\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\ncGxhaW4gdmVyc2lvbg==\n--b1--\n";
  EXPECT_EQ(peft_examples::email_text(raw, 100), "Offer\nplain version");
  EXPECT_EQ(peft_examples::email_text(raw, 8), "Offer\npl");
}

TEST(SpamAssassin, CorpusIsDeduplicatedAndSplitDeterministically) {
  const auto dir = std::filesystem::path(PEFT_ASSETS_DIR) / "spam-assassin";
  const auto corpus = peft_examples::load_spam_assassin(dir);
  EXPECT_EQ(corpus.loaded, 6046u);
  const size_t kept = corpus.train.size() + corpus.validation.size() + corpus.test.size();
  EXPECT_EQ(kept, 5875u);  // identical bodies dropped
  EXPECT_EQ(corpus.loaded - corpus.duplicates, kept);
  size_t spam = 0;
  for (const auto* split : {&corpus.train, &corpus.validation, &corpus.test})
    for (const auto& e : *split) {
      spam += static_cast<size_t>(e.label);
      EXPECT_FALSE(e.text.empty());
    }
  EXPECT_GT(spam, 1700u);  // 1,896 spam before de-duplication
  EXPECT_NEAR(static_cast<double>(corpus.train.size()) / kept, 0.8, 0.02);
  EXPECT_NEAR(static_cast<double>(corpus.test.size()) / kept, 0.1, 0.02);
  const auto again = peft_examples::load_spam_assassin(dir);
  ASSERT_EQ(again.test.size(), corpus.test.size());
  for (size_t i = 0; i < corpus.test.size(); ++i) EXPECT_EQ(again.test[i].text, corpus.test[i].text);
  peft_test::expect_error<peft::FileError>([] { peft_examples::load_spam_assassin("/nonexistent"); },
                                           {"/nonexistent/data", "fetch_assets.sh"});
}

TEST(UseLiteTokenizer, MissingVocabularyIsAFileError) {
  peft_test::expect_error<peft::FileError>([] { peft_examples::UseTokenizer("/nonexistent/vocab.json"); },
                                           {"/nonexistent/vocab.json", "fetch_assets.sh"});
}

}  // namespace
