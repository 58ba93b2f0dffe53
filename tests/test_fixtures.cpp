// The fixture models load in C++ and reproduce the outputs Python computed.
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

using Fixture = std::pair<std::string, std::string>;

class FixtureTest : public ::testing::TestWithParam<Fixture> {};

TEST_P(FixtureTest, MatchesPythonReference) {
  const auto& [arch, kind] = GetParam();
  torch::jit::Module model = peft_test::load_fixture(arch, kind);
  model.eval();
  auto ref = peft_test::load_reference(arch);
  torch::NoGradGuard no_grad;
  torch::Tensor out = model.forward(ref.inputs).toTensor();
  ASSERT_EQ(out.sizes(), ref.expected.sizes());
  // Same ops, same order, same single-threaded kernels: fp32 rounding only.
  EXPECT_TRUE(torch::allclose(out, ref.expected, /*rtol=*/1e-5, /*atol=*/1e-5))
      << arch << "_" << kind << " max |diff| = " << (out - ref.expected).abs().max().item<float>();
}

TEST_P(FixtureTest, HasHuggingFaceModuleNames) {
  const auto& [arch, kind] = GetParam();
  torch::jit::Module model = peft_test::load_fixture(arch, kind);
  std::set<std::string> names;
  for (const auto& m : model.named_modules()) names.insert(m.name);
  const std::map<std::string, std::vector<std::string>> expected{
      {"gpt2", {"transformer.wte", "transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_fc", "lm_head"}},
      {"bert", {"embeddings.word_embeddings", "encoder.layer.1.attention.self.query",
                "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense"}},
      {"llama", {"model.embed_tokens", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.gate_proj",
                 "model.norm", "lm_head"}}};
  for (const auto& name : expected.at(arch)) EXPECT_TRUE(names.count(name)) << arch << " lacks " << name;
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, FixtureTest, ::testing::ValuesIn(peft_test::all_fixtures()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

TEST(FixtureTest, GptFusedAttentionIsStoredInOut) {
  torch::jit::Module model = peft_test::load_fixture("gpt2", "scripted");
  auto c_attn = model.attr("transformer").toModule().attr("h").toModule().attr("0").toModule()
                    .attr("attn").toModule().attr("c_attn").toModule();
  EXPECT_EQ(c_attn.attr("weight").toTensor().sizes(), (std::vector<int64_t>{64, 192}));
}

TEST(FixtureTest, LlamaUsesGroupedQueryAttention) {
  torch::jit::Module model = peft_test::load_fixture("llama", "scripted");
  std::map<std::string, torch::Tensor> params;
  for (const auto& p : model.named_parameters()) params[p.name] = p.value;
  EXPECT_EQ(params.at("model.layers.0.self_attn.q_proj.weight").size(0), 64);
  EXPECT_EQ(params.at("model.layers.0.self_attn.k_proj.weight").size(0), 32);
}

TEST(Version, MatchesMacros) {
  EXPECT_EQ(std::string(peft::version()),
            std::to_string(PEFT_VERSION_MAJOR) + "." + std::to_string(PEFT_VERSION_MINOR) + "." +
                std::to_string(PEFT_VERSION_PATCH));
}

TEST(Error, CheckThrowsTypedErrorWithFormattedMessage) {
  EXPECT_NO_THROW(peft::check<peft::OptionError>(true, "unused {}", 1));
  try {
    peft::check<peft::OptionError>(false, "LoraOptions.r must be > 0, got {}", 0);
    FAIL() << "check did not throw";
  } catch (const peft::OptionError& e) {
    EXPECT_STREQ(e.what(), "LoraOptions.r must be > 0, got 0");
  }
}

}  // namespace
