// Prompt and prefix tuning on loaded TorchScript models, against references
// computed in Python from the fixtures' own modules (tools/export_fixtures.py):
// the base layers run on [P; X], and attention over [prefix; K], [prefix; V].
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <cstdlib>
#include <filesystem>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;

constexpr int64_t kPromptTokens = 4, kPrefixTokens = 3;  // as in tools/export_fixtures.py

class PromptPrefixTest : public peft_test::FixtureModelTest {
 protected:
  void SetUp() override {
    FixtureModelTest::SetUp();
    refs = torch::jit::load(peft_test::fixture_path(arch, "ref"));
  }

  torch::Tensor golden(const std::string& name) { return refs.attr(name).toTensor(); }

  /// The model's single trainable tensor set to the golden value.
  static void set_only_parameter(peft::PeftModel& model, const torch::Tensor& value) {
    auto params = model.trainable_parameters();
    ASSERT_EQ(params.size(), 1u);
    torch::NoGradGuard no_grad;
    params[0].copy_(value);
  }

  torch::jit::Module refs;
};

torch::Tensor run(peft::PeftModel& model, const std::vector<torch::jit::IValue>& inputs) {
  return model.forward(inputs).toTensor();
}

TEST_P(PromptPrefixTest, PromptEqualsBaseLayersOnPrependedSequence) {
  auto model = peft::get_peft_model(base, peft::PromptTuningConfig().num_virtual_tokens(kPromptTokens));
  model.eval();
  set_only_parameter(model, golden("prompt"));
  torch::NoGradGuard no_grad;
  torch::Tensor out = run(model, ref.inputs);
  ASSERT_EQ(out.sizes(), ref.expected.sizes()) << "prompt positions must be dropped";
  EXPECT_TRUE(torch::allclose(out, golden("prompt_expected"), 1e-5, 1e-5))
      << "max |diff| " << (out - golden("prompt_expected")).abs().max().item<double>();
}

TEST_P(PromptPrefixTest, PrefixEqualsAttentionOverConcatenatedKeysAndValues) {
  auto model = peft::get_peft_model(base, peft::PrefixTuningConfig().num_virtual_tokens(kPrefixTokens));
  model.eval();
  // The golden prefixes are [layers, 2, kv_heads, P, head_dim]; the model keeps HF's [P, layers·2·kv_heads·head_dim].
  set_only_parameter(model, golden("prefix").permute({3, 0, 1, 2, 4}).reshape({kPrefixTokens, -1}));
  torch::NoGradGuard no_grad;
  torch::Tensor out = run(model, ref.inputs);
  EXPECT_TRUE(torch::allclose(out, golden("prefix_expected"), 1e-5, 1e-5))
      << "max |diff| " << (out - golden("prefix_expected")).abs().max().item<double>();
}

TEST_P(PromptPrefixTest, ParameterCountsMatchTheFormulas) {
  const int64_t layers = 2, dim = 64, kv_heads = arch == "llama" ? 2 : 4, head_dim = 16;
  auto prompt = peft::get_peft_model(base, peft::PromptTuningConfig().num_virtual_tokens(kPromptTokens));
  EXPECT_EQ(prompt.count_parameters().trainable, kPromptTokens * dim);  // k·d
  auto prefix = peft::get_peft_model(base, peft::PrefixTuningConfig().num_virtual_tokens(kPrefixTokens));
  EXPECT_EQ(prefix.count_parameters().trainable, layers * 2 * kPrefixTokens * kv_heads * head_dim);
}

TEST_P(PromptPrefixTest, OnlyPromptOrPrefixTrainsAndPythonReproducesTheSavedModel) {
  fs::path dir = peft_test::fresh_dir("prompt_prefix_" + arch + "_" + kind);
  const std::vector<std::pair<std::string, peft::PeftConfig>> configs{
      {"prompt", peft::PromptTuningConfig().num_virtual_tokens(kPromptTokens)},
      {"prefix", peft::PrefixTuningConfig().num_virtual_tokens(kPrefixTokens)},
      {"prefix_mlp", peft::PrefixTuningConfig().num_virtual_tokens(kPrefixTokens).prefix_projection(true).encoder_hidden_size(16)}};
  for (const auto& [name, cfg] : configs) {
    peft::PeftModel model = peft::get_peft_model(base, cfg);
    torch::manual_seed(5);
    torch::Tensor target = torch::randn_like(ref.expected);
    torch::optim::Adam opt(model.trainable_parameters(), 1e-2);
    std::vector<double> losses;
    for (int step = 0; step < 8; ++step) {
      opt.zero_grad();
      torch::Tensor loss = (run(model, ref.inputs) - target).pow(2).mean();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    EXPECT_LT(losses.back(), losses.front()) << name;
    std::set<const void*> trainable;
    for (const auto& t : model.trainable_parameters()) trainable.insert(t.unsafeGetTensorImpl());
    for (const auto& p : model.module().named_parameters())
      if (!trainable.count(p.value.unsafeGetTensorImpl())) {
        EXPECT_FALSE(p.value.grad().defined()) << name << ": frozen " << p.name << " got a gradient";
      }
    model.eval();
    torch::NoGradGuard no_grad;
    if (name == "prefix_mlp") {
      torch::Tensor before = run(model, ref.inputs);
      model.fold_projection();
      EXPECT_TRUE(torch::allclose(run(model, ref.inputs), before, 1e-6, 1e-6)) << "folding changed the output";
      EXPECT_EQ(model.count_parameters().trainable, 2 * 2 * kPrefixTokens * (arch == "llama" ? 32 : 64));
    }
    torch::Tensor out = run(model, ref.inputs);
    {
      auto off = model.disable_adapter();
      EXPECT_TRUE(torch::allclose(run(model, ref.inputs), ref.expected, 1e-5, 1e-5)) << name << ": disabled != base";
    }
    model.module().save((dir / (name + ".pt")).string());
    peft_test::save_io(dir / (name + ".io.pt"), ref.inputs, out);
  }
  EXPECT_EQ(peft_test::run_python_tool("check_torchscript_outputs.py " + dir.string()), 0);
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, PromptPrefixTest, ::testing::ValuesIn(peft_test::all_fixtures()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

TEST(PromptTuning, InitFromTokenIdsAndKeepPositions) {
  auto base = peft_test::load_fixture("gpt2", "scripted");
  auto ref = peft_test::load_reference("gpt2");
  auto cfg = peft::PromptTuningConfig().num_virtual_tokens(3).prompt_tuning_init_token_ids({5, 9}).keep_prompt_positions(true);
  auto model = peft::get_peft_model(base, cfg);
  torch::Tensor wte = peft::jit::base_tensor(base, "transformer.wte", "weight");
  torch::Tensor prompt = model.trainable_parameters().at(0);
  EXPECT_TRUE(torch::equal(prompt[0], wte[5]) && torch::equal(prompt[1], wte[9]) && torch::equal(prompt[2], wte[5]));
  torch::NoGradGuard no_grad;
  EXPECT_EQ(run(model, ref.inputs).size(1), ref.expected.size(1) + 3);
}

/// A TorchScript model with one linear layer and no transformer structure.
torch::jit::Module linear_only() { return peft_test::model_with_fc({{"weight", torch::randn({4, 4})}}, "torch.linear(x, self.weight)"); }

TEST(PromptPrefixErrors, ModelsWithoutWhatTheMethodNeeds) {
  auto expect_model_error = [](const peft::PeftConfig& cfg, const char* fragment) {
    try {
      peft::get_peft_model(linear_only(), cfg);
      ADD_FAILURE() << "no error for " << fragment;
    } catch (const peft::ModelError& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr(fragment));
    }
  };
  expect_model_error(peft::PromptTuningConfig(), "no transformer stack found");
  expect_model_error(peft::PrefixTuningConfig(), "no attention found");
  EXPECT_THROW(peft::get_peft_model(peft_test::load_fixture("bert", "scripted"), peft::PromptTuningConfig().num_virtual_tokens(0)),
               peft::OptionError);
}

}  // namespace
