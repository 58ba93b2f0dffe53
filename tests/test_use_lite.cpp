// USE-Lite (the main job's pretrained model): the C++ tokenizer gives exactly the
// token ids of the package's own JavaScript runtime (tools/use_lite/reference.js,
// output checked in as tests/data/use_lite_reference.json).
#include <gtest/gtest.h>

#include <fstream>

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

TEST(UseLiteTokenizer, MissingVocabularyIsAFileError) {
  peft_test::expect_error<peft::FileError>([] { peft_examples::UseTokenizer("/nonexistent/vocab.json"); },
                                           {"/nonexistent/vocab.json", "fetch_assets.sh"});
}

}  // namespace
