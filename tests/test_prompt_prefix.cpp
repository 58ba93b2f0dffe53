// Prompt and prefix tuning on loaded TorchScript models, against references
// computed in Python from the fixtures' own modules (tools/export_fixtures.py):
// the base layers run on [P; X], and attention over [prefix; K], [prefix; V].
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <cstdlib>
#include <filesystem>
#include <map>

#include "fixtures.h"

namespace {

using peft_test::run;

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

// ---------------------------------------------------------------------------
// Attention written as real models write it (tools/export_attention_fixtures.py):
// T5 (no scaling, position bias, float softmax then type_as, dropout), HF Llama
// eager (scaling after the matmul, softmax dtype, cast, dropout, repeat_kv) and
// timm (`@`, transpose(-2, -1), masked_fill, dropout module). The references run
// each module's own project/attend code with [prefix; K], [prefix; V].

/// (style, export kind) of one attention-style fixture.
class PrefixAttentionStyleTest : public ::testing::TestWithParam<std::pair<std::string, std::string>> {
 protected:
  void SetUp() override {
    const auto& [style, kind] = GetParam();
    base = torch::jit::load(peft_test::fixture_path("attn_" + style, kind));
    base.eval();
    refs = torch::jit::load(peft_test::fixture_path("attn_" + style, "ref"));
    inputs.emplace_back(refs.attr("input_ids").toTensor());
    if (refs.hasattr("attention_mask")) inputs.emplace_back(refs.attr("attention_mask").toTensor());
  }

  /// Prefix tuning with the stored prefixes [layers, 2, kv_heads, P, head_dim] loaded in.
  peft::PeftModel tuned() {
    auto model = peft::get_peft_model(base, peft::PrefixTuningConfig().num_virtual_tokens(kPrefixTokens));
    torch::Tensor prefix = refs.attr("prefix").toTensor();
    auto params = model.trainable_parameters();
    EXPECT_EQ(params.size(), 1u);
    torch::NoGradGuard no_grad;
    params.at(0).copy_(prefix.permute({3, 0, 1, 2, 4}).reshape({kPrefixTokens, -1}));
    return model;
  }

  torch::jit::Module base, refs;
  std::vector<torch::jit::IValue> inputs;
};

TEST_P(PrefixAttentionStyleTest, EqualsTheModulesOwnCodeOverPrefixedKeysAndValues) {
  auto model = tuned();
  model.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor out = run(model, inputs), want = refs.attr("prefix_expected").toTensor();
  EXPECT_TRUE(torch::allclose(out, want, 1e-5, 1e-5)) << "max |diff| " << (out - want).abs().max().item<double>();
  auto off = model.disable_adapter();
  torch::Tensor plain = run(model, inputs), expected = refs.attr("expected").toTensor();
  EXPECT_TRUE(torch::allclose(plain, expected, 1e-5, 1e-5)) << "disabled != base";
}

TEST_P(PrefixAttentionStyleTest, AdamWStepsLowerALoss) {
  auto model = tuned();
  torch::manual_seed(7);
  torch::Tensor target = torch::randn_like(refs.attr("expected").toTensor());
  torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(5e-2));
  std::vector<double> losses;
  for (int step = 0; step < 8; ++step) {
    opt.zero_grad();
    torch::Tensor loss = (run(model, inputs) - target).pow(2).mean();
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), losses.front());
}

std::vector<std::pair<std::string, std::string>> attention_styles() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const char* style : {"t5", "llama_eager", "vit"})
    for (const char* kind : {"scripted", "traced"}) out.emplace_back(style, kind);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Styles, PrefixAttentionStyleTest, ::testing::ValuesIn(attention_styles()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

/// One attention over x [B, T, 16] with 2 heads of 8, its scores and output
/// written as `body` (q, k, v are head-split), in TorchScript source; `tensors`
/// replace the random weights wq, wk, wv or add buffers.
torch::jit::Module attention_module(const std::string& body,
                                    const std::map<std::string, torch::Tensor>& tensors = {}) {
  torch::jit::Module m("__torch__.Attention");
  m.register_attribute("training", c10::BoolType::get(), false);
  for (const char* w : {"wq", "wk", "wv"})
    m.register_parameter(w, tensors.count(w) ? tensors.at(w) : torch::randn({16, 16}) * 0.2, false);
  for (const auto& [name, t] : tensors)
    if (!m.hasattr(name)) m.register_buffer(name, t);
  m.define(
      "def forward(self, x, mask: Optional[Tensor]):\n"
      "    q = torch.linear(x, self.wq).view(x.size(0), x.size(1), 2, 8).transpose(1, 2)\n"
      "    k = torch.linear(x, self.wk).view(x.size(0), x.size(1), 2, 8).transpose(1, 2)\n"
      "    v = torch.linear(x, self.wv).view(x.size(0), x.size(1), 2, 8).transpose(1, 2)\n" +
      body);
  return m;
}

TEST(PrefixAttentionErrors, NameTheNodeWhereTheSearchStopped) {
  // Scores by einsum: no matmul(q, kᵀ) to hang the prefix on.
  peft_test::expect_error<peft::ModelError>(
      [] {
        peft::get_peft_model(attention_module("    s = torch.einsum('bhqd,bhkd->bhqk', q, k)\n"
                                              "    return torch.matmul(torch.softmax(s, -1), v)\n"),
                             peft::PrefixTuningConfig());
      },
      {"no attention found", "stopped at aten::einsum at <string>:5", "for aten::softmax at <string>:6"});
  // q·kᵀ recognised, but ·v by einsum: an attention, refused rather than left without a prefix.
  peft_test::expect_error<peft::ModelError>(
      [] {
        peft::get_peft_model(attention_module("    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1)\n"
                                              "    return torch.einsum('bhqk,bhkd->bhqd', p, v)\n"),
                             peft::PrefixTuningConfig());
      },
      {"an attention was not understood", "stopped at aten::einsum at <string>:6", "matmul(probs, v)"});
}

/// Whether this LibTorch has the fused attention op (2.x; not 1.13).
bool has_sdpa() {
  return !torch::jit::getAllOperatorsFor(c10::Symbol::fromQualString("aten::scaled_dot_product_attention")).empty();
}

TEST(PrefixSdpa, JoinsKeysValuesAndExtendsMaskOrCausal) {
  if (!has_sdpa())
    GTEST_SKIP() << "aten::scaled_dot_product_attention is not an operator of LibTorch " << TORCH_VERSION
                 << " (it exists from 2.0), so no graph can contain it";
  const std::string sdpa = "    return torch.scaled_dot_product_attention(q, k, v, ";
  // The reference: the same attention with the prefix joined by hand, causal made explicit.
  const std::string joined =
      "    p = self.pk.unsqueeze(0).expand(x.size(0), -1, -1, -1)\n"
      "    k = torch.cat([p, k], 2)\n"
      "    v = torch.cat([self.pv.unsqueeze(0).expand(x.size(0), -1, -1, -1), v], 2)\n"
      "    t = x.size(1)\n"
      "    causal = torch.cat([torch.ones([t, 2]), torch.ones([t, t]).tril()], 1) > 0\n"
      "    pad = torch.ones([x.size(0), 1, 1, 2]) > 0\n";
  struct Case {
    std::string name, model, reference;
    torch::Tensor mask;  // undefined: None
  };
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({2, 5, 16});
  torch::Tensor keep = torch::ones({2, 1, 1, 5}, torch::kBool);
  keep.index_put_({1, 0, 0, torch::indexing::Slice(3)}, false);
  torch::Tensor additive = keep.logical_not().to(torch::kFloat) * -1e9;
  const std::string with_mask = "    assert mask is not None\n" + sdpa;
  const std::vector<Case> cases{
      {"no mask", sdpa + "None, 0.0, False)\n", joined + sdpa + "None, 0.0, False)\n", {}},
      {"causal", sdpa + "None, 0.0, True)\n", joined + sdpa + "causal, 0.0, False)\n", {}},
      {"bool mask", sdpa + "mask, 0.0, False)\n", joined + with_mask + "torch.cat([pad, mask], -1), 0.0, False)\n", keep},
      {"float mask", sdpa + "mask, 0.0, False)\n",
       joined + with_mask + "torch.cat([torch.zeros([2, 1, 1, 2]), mask], -1), 0.0, False)\n", additive}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    torch::jit::Module base = attention_module(c.model);
    auto model = peft::get_peft_model(base, peft::PrefixTuningConfig().num_virtual_tokens(2));
    model.eval();
    torch::Tensor prefix = model.trainable_parameters().at(0).detach();  // [P, 2·heads·d]: keys, then values
    torch::Tensor kv = prefix.reshape({2, 2, 2, 8}).permute({1, 2, 0, 3});  // [keys|values, heads, P, d]
    std::map<std::string, torch::Tensor> tensors{{"pk", kv[0].contiguous()}, {"pv", kv[1].contiguous()}};
    for (const char* w : {"wq", "wk", "wv"}) tensors[w] = base.attr(w).toTensor();
    torch::jit::Module ref = attention_module(c.reference, tensors);
    std::vector<torch::jit::IValue> in{x, c.mask.defined() ? torch::jit::IValue(c.mask) : torch::jit::IValue()};
    torch::NoGradGuard no_grad;
    torch::Tensor out = run(model, in), want = ref.forward(in).toTensor();
    EXPECT_TRUE(torch::allclose(out, want, 1e-5, 1e-5)) << "max |diff| " << (out - want).abs().max().item<double>();
    auto off = model.disable_adapter();  // is_causal and the mask as they were
    EXPECT_TRUE(torch::allclose(run(model, in), base.forward(in).toTensor(), 1e-6, 1e-6)) << "disabled != base";
  }
}

}  // namespace
