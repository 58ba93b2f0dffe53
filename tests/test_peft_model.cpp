// PeftModel on loaded TorchScript models: all three fixture architectures,
// scripted and traced. References: the unmodified base model, the merged
// model, the native functional forms, and plain PyTorch loading the saved files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <cstdlib>
#include <filesystem>

#include "fixtures.h"

namespace {

using peft_test::run;

using peft_test::expect_error;

namespace fs = std::filesystem;

/// A LoRA config that suits each architecture's module names.
peft::LoraConfig lora_config(const std::string& arch) {
  auto cfg = peft::LoraConfig().r(4).lora_alpha(8);
  if (arch == "gpt2") return cfg.target_modules({"c_attn", "c_fc"}).modules_to_save({"lm_head"});
  if (arch == "bert") return cfg.target_modules({"query", "value"});
  return cfg.target_modules({"q_proj", "v_proj"}).modules_to_save({"lm_head"});
}


/// A few AdamW steps towards a fixed random target; returns the losses.
std::vector<double> train(peft::PeftModel& model, const std::vector<torch::jit::IValue>& inputs, int steps,
                          double lr = 1e-2) {
  torch::manual_seed(11);
  torch::Tensor target = torch::randn_like(run(model, inputs).detach());
  torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(lr).weight_decay(0));
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    torch::Tensor loss = (run(model, inputs) - target).pow(2).mean();
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  return losses;
}

std::map<std::string, torch::Tensor> snapshot(const torch::jit::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.name] = p.value.detach().clone();
  return out;
}

/// Writes `name`.pt and `name`.io.pt for tools/check_torchscript_outputs.py.
void save_for_python(torch::jit::Module model, const fs::path& dir, const std::string& name,
                     const std::vector<torch::jit::IValue>& inputs, const torch::Tensor& expected) {
  model.save((dir / (name + ".pt")).string());
  peft_test::save_io(dir / (name + ".io.pt"), inputs, expected);
}

class PeftModelTest : public peft_test::FixtureModelTest {
 protected:
  void SetUp() override {
    FixtureModelTest::SetUp();
    torch::NoGradGuard no_grad;
    base_output = base.forward(ref.inputs).toTensor();
  }

  torch::Tensor base_output;
};

TEST_P(PeftModelTest, NeutralInitIsBitIdenticalForEveryMethod) {
  const std::vector<std::pair<std::string, peft::PeftConfig>> configs{
      {"lora", lora_config(arch)},
      {"dora", lora_config(arch).use_dora(true)},
      {"ia3", peft::IA3Config().target_modules(lora_config(arch).target_modules())},
      {"adapter", peft::BottleneckConfig().target_modules(arch == "bert" ? "encoder\\.layer\\.\\d+\\.attention"
                                                                      : ".*\\.(attn|self_attn|mlp)")},
      {"bitfit", peft::BitFitConfig().norm(true)},
      {"vera", peft::VeraConfig().r(8).target_modules(lora_config(arch).target_modules())}};
  for (const auto& [name, cfg] : configs) {
    peft::PeftModel model = peft::get_peft_model(base, cfg);
    model.eval();
    torch::NoGradGuard no_grad;
    torch::Tensor out = run(model, ref.inputs);
    EXPECT_TRUE(torch::equal(out, base_output)) << name << ": max |diff| " << (out - base_output).abs().max().item<double>();
  }
  EXPECT_TRUE(torch::allclose(base_output, ref.expected, 1e-5, 1e-5)) << "the base does not match Python";
}

TEST_P(PeftModelTest, OnlyAdapterParametersGetGradientsAndLossFalls) {
  peft::PeftModel model = peft::get_peft_model(base, lora_config(arch));
  std::set<const void*> trainable;
  for (const auto& t : model.trainable_parameters()) trainable.insert(t.unsafeGetTensorImpl());
  ASSERT_FALSE(trainable.empty());
  run(model, ref.inputs).pow(2).mean().backward();
  for (const auto& p : model.module().named_parameters()) {
    const bool is_trainable = trainable.count(p.value.unsafeGetTensorImpl()) > 0;
    EXPECT_EQ(p.value.requires_grad(), is_trainable) << p.name;
    if (!is_trainable) {
      EXPECT_FALSE(p.value.grad().defined()) << "frozen " << p.name << " got a gradient";
    }
  }
  for (const auto& p : model.named_trainable_parameters()) {
    if (p.first.find("lora_A") != std::string::npos) continue;  // B = 0: A's gradient is exactly zero at init
    ASSERT_TRUE(p.second.grad().defined()) << p.first;
  }
  auto losses = train(model, ref.inputs, 8);
  EXPECT_LT(losses.back(), losses.front() * 0.9) << arch << "_" << kind;
}

TEST_P(PeftModelTest, MergeDisableUnmergeAndPythonReload) {
  auto original = snapshot(base);
  peft::PeftModel model = peft::get_peft_model(base, lora_config(arch).use_dora(arch == "llama"));
  train(model, ref.inputs, 3);
  model.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor adapted = run(model, ref.inputs);
  ASSERT_FALSE(torch::allclose(adapted, base_output, 1e-4, 1e-4)) << "training changed nothing";

  {  // disable_adapter: base behaviour inside the scope, adapted after
    auto off = model.disable_adapter();
    EXPECT_TRUE(torch::equal(run(model, ref.inputs), base_output));
  }
  EXPECT_TRUE(torch::equal(run(model, ref.inputs), adapted));

  model.merge_adapter();
  EXPECT_TRUE(torch::allclose(run(model, ref.inputs), adapted, 1e-5, 1e-5));
  model.unmerge_adapter();
  for (const auto& [name, value] : snapshot(base))
    EXPECT_TRUE(torch::allclose(value, original.at(name), 1e-6, 1e-6)) << "unmerge did not restore " << name;

  fs::path dir = peft_test::fresh_dir("pyload_" + arch + "_" + kind);
  save_for_python(model.module(), dir, "adapted", ref.inputs, adapted);
  torch::jit::Module merged = model.merge_and_unload();
  torch::Tensor merged_output = merged.forward(ref.inputs).toTensor();
  EXPECT_TRUE(torch::allclose(merged_output, adapted, 1e-5, 1e-5))
      << "merge_and_unload differs by " << (merged_output - adapted).abs().max().item<double>();
  EXPECT_FALSE(merged.hasattr(peft::jit::Injection::kContainer));
  save_for_python(merged, dir, "merged", ref.inputs, merged_output);
  EXPECT_EQ(peft_test::run_python_tool("check_torchscript_outputs.py " + dir.string()), 0);
}

TEST_P(PeftModelTest, AllLinearSkipsTheOutputHead) {
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules("all-linear"));
  std::set<std::string> targets;
  for (const auto& l : model.adapter_layers()) targets.insert(l.target);
  EXPECT_FALSE(targets.count("lm_head"));
  EXPECT_EQ(targets.size(), arch == "gpt2" ? 8u : arch == "bert" ? 12u : 14u);
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, PeftModelTest, ::testing::ValuesIn(peft_test::all_fixtures()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

// ---------------------------------------------------------------- the math
/// root.fc = a TorchScript linear layer (weight [out, in], or [in, out] applied as x @ W + b).
torch::jit::Module tiny_model(const torch::Tensor& W, const torch::Tensor& b, bool conv1d) {
  return peft_test::model_with_fc({{"weight", W}, {"bias", b}}, conv1d ? "torch.matmul(x, self.weight) + self.bias"
                                                                      : "torch.linear(x, self.weight, self.bias)");
}

/// Gives the single adapter layer random parameters and returns them by name.
std::map<std::string, torch::Tensor> random_adapter(peft::PeftModel& model) {
  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model.named_trainable_parameters()) {
    p.second.copy_(torch::randn_like(p.second) * 0.5 + (p.first.find("magnitude") != std::string::npos ? 2.0 : 0.0));
    out[p.first.substr(p.first.rfind('.') + 1)] = p.second.detach();
  }
  return out;
}

TEST(InjectedMath, EqualsFunctionalFormsForLinearAndConv1D) {
  torch::manual_seed(21);
  namespace F = peft::functional;
  auto x = torch::randn({2, 3, 6});
  for (bool conv1d : {false, true}) {
    auto W = conv1d ? torch::randn({6, 9}) : torch::randn({9, 6});
    auto b = torch::randn({9});
    auto f = F::LoraFuncOptions().scaling(2.0).fan_in_fan_out(conv1d);
    {
      auto model = peft::get_peft_model(tiny_model(W, b, conv1d), peft::LoraConfig().r(2).lora_alpha(4).target_modules({"fc"}));
      auto p = random_adapter(model);
      EXPECT_TRUE(torch::allclose(run(model, {x}), F::lora(x, W, b, p["lora_A"], p["lora_B"], f), 1e-5, 1e-5));
    }
    {
      auto cfg = peft::LoraConfig().r(2).lora_alpha(4).use_dora(true).target_modules({"fc"});
      auto model = peft::get_peft_model(tiny_model(W, b, conv1d), cfg);
      auto p = random_adapter(model);
      auto expected = F::dora(x, W, b, p["lora_A"], p["lora_B"], p["lora_magnitude_vector"], f);
      EXPECT_TRUE(torch::allclose(run(model, {x}), expected, 1e-5, 1e-5)) << "dora conv1d=" << conv1d;
    }
    {
      auto cfg = peft::LoraConfig().r(2).lora_alpha(4).target_modules({"fc"}).slice_pattern({{"fc", {true, false, true}}});
      auto model = peft::get_peft_model(tiny_model(W, b, conv1d), cfg);
      auto p = random_adapter(model);
      auto expected = F::lora(x, W, b, p["lora_A"], p["lora_B"], F::LoraFuncOptions(f).enable_slices({true, false, true}));
      EXPECT_TRUE(torch::allclose(run(model, {x}), expected, 1e-5, 1e-5)) << "slices conv1d=" << conv1d;
    }
    {
      auto model = peft::get_peft_model(tiny_model(W, b, conv1d), peft::IA3Config().target_modules({"fc"}).feedforward_modules({"fc"}));
      auto p = random_adapter(model);
      EXPECT_TRUE(torch::allclose(run(model, {x}), F::base_linear(F::ia3(x, p["ia3_l"]), W, b, conv1d), 1e-5, 1e-5));
    }
  }
}

TEST(InjectedMath, AdapterAfterSubmoduleMatchesFunctional) {
  torch::manual_seed(22);
  auto W = torch::randn({6, 6}), b = torch::randn({6});
  auto model = peft::get_peft_model(tiny_model(W, b, false), peft::BottleneckConfig().target_modules({"fc"}).bottleneck_size(3));
  auto p = random_adapter(model);
  auto x = torch::randn({4, 6});
  auto h = peft::functional::base_linear(x, W, b, false);
  auto expected = peft::functional::bottleneck(h, p["adapter_down_weight"], p["adapter_down_bias"], p["adapter_up_weight"],
                                            p["adapter_up_bias"], peft::BottleneckActivation::ReLU);
  EXPECT_TRUE(torch::allclose(run(model, {x}), expected, 1e-5, 1e-5));
  EXPECT_EQ(p["adapter_down_weight"].sizes(), (std::vector<int64_t>{3, 6}));  // width inferred from fc
}

// -------------------------------------------------------- targeting details
TEST(Targeting, GptFusedAttentionPerSliceWithFanInFanOut) {
  auto base = peft_test::load_fixture("gpt2", "scripted");
  auto original = snapshot(base);
  auto cfg = peft::LoraConfig().r(4).target_modules({"c_attn"}).fan_in_fan_out(true).slice_pattern({{"c_attn", {true, false, true}}});
  auto model = peft::get_peft_model(base, cfg);
  ASSERT_EQ(model.adapter_layers().size(), 2u);
  auto ref = peft_test::load_reference("gpt2");
  train(model, ref.inputs, 3);
  for (const auto& p : model.named_trainable_parameters())
    if (p.first.find("lora_B") != std::string::npos) {
      EXPECT_EQ(p.second.size(0), 2 * 64) << "B covers q and v only";
    }
  model.merge_adapter();
  for (int layer = 0; layer < 2; ++layer) {
    const std::string name = "transformer.h." + std::to_string(layer) + ".attn.c_attn.weight";
    torch::Tensor delta = peft::jit::base_tensor(base, "transformer.h." + std::to_string(layer) + ".attn.c_attn", "weight") -
                          original.at(name);  // [in, out]: q | k | v columns
    EXPECT_TRUE(delta.slice(1, 64, 128).eq(0).all().item<bool>()) << "k slice changed";
    EXPECT_GT(delta.slice(1, 0, 64).abs().max().item<double>(), 0.0) << "q slice unchanged";
    EXPECT_GT(delta.slice(1, 128, 192).abs().max().item<double>(), 0.0) << "v slice unchanged";
  }
}

TEST(Targeting, LayersRankAlphaAndExclude) {
  auto base = peft_test::load_fixture("llama", "scripted");
  auto cfg = peft::LoraConfig()
                 .r(4)
                 .target_modules({"q_proj", "v_proj", "k_proj"})
                 .exclude_modules({"k_proj"})
                 .layers_to_transform({1})
                 .layers_pattern({"layers"})
                 .rank_pattern({{"v_proj", 2}})
                 .alpha_pattern({{"q_proj", 32.0}});
  auto model = peft::get_peft_model(base, cfg);
  auto named = model.named_trainable_parameters();
  std::map<std::string, torch::Tensor> params(named.begin(), named.end());
  std::vector<std::string> names;
  for (const auto& [name, value] : params) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B",
                                             "model.layers.1.self_attn.v_proj.lora_A", "model.layers.1.self_attn.v_proj.lora_B"}));
  EXPECT_EQ(params.at("model.layers.1.self_attn.v_proj.lora_A").size(0), 2);
  EXPECT_EQ(params.at("model.layers.1.self_attn.q_proj.lora_A").size(0), 4);
  for (const auto& l : model.adapter_layers())
    if (l.target.find("q_proj") != std::string::npos) {
      EXPECT_DOUBLE_EQ(l.module.attr("scaling").toDouble(), 8.0);
    }
}

TEST(Targeting, BiasAllAndLoraOnly) {
  auto base = peft_test::load_fixture("bert", "scripted");
  auto names = [](const peft::PeftModel& m) {
    std::set<std::string> out;
    for (const auto& p : m.named_trainable_parameters())
      if (p.first.size() > 5 && p.first.compare(p.first.size() - 5, 5, ".bias") == 0) out.insert(p.first);
    return out;
  };
  auto cfg = peft::LoraConfig().r(2).target_modules({"query"});
  EXPECT_TRUE(names(peft::get_peft_model(base, cfg)).empty());
  EXPECT_EQ(names(peft::get_peft_model(base, peft::LoraConfig(cfg).bias(peft::LoraBias::LoraOnly))),
            (std::set<std::string>{"encoder.layer.0.attention.self.query.bias", "encoder.layer.1.attention.self.query.bias"}));
  size_t all_biases = 0;
  for (const auto& p : base.named_parameters()) all_biases += p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0;
  EXPECT_EQ(names(peft::get_peft_model(base, peft::LoraConfig(cfg).bias(peft::LoraBias::All))).size(), all_biases);
}

TEST(Targeting, RegexMustMatchTheWholeName) {
  auto base = peft_test::load_fixture("bert", "traced");
  auto model = peft::get_peft_model(base, peft::LoraConfig().target_modules("encoder\\.layer\\.0\\.attention\\.self\\.(query|key)"));
  EXPECT_EQ(model.adapter_layers().size(), 2u);
  EXPECT_THROW(peft::get_peft_model(base, peft::LoraConfig().target_modules("query")), peft::TargetError);
}

TEST(BitFit, BertTrainsExactlyBiasesAndNorms) {
  auto base = peft_test::load_fixture("bert", "scripted");
  size_t biases = 0, norm_weights = 0;
  for (const auto& p : base.named_parameters()) {
    if (p.name.size() > 5 && p.name.compare(p.name.size() - 5, 5, ".bias") == 0) ++biases;
    if (p.name.find("LayerNorm.weight") != std::string::npos) ++norm_weights;
  }
  auto bias_only = peft::get_peft_model(base, peft::BitFitConfig());
  auto names = bias_only.named_trainable_parameters();
  EXPECT_EQ(names.size(), biases);
  for (const auto& [name, t] : names) EXPECT_THAT(name, ::testing::EndsWith(".bias"));
  auto with_norms = peft::get_peft_model(base, peft::BitFitConfig().norm(true));
  EXPECT_EQ(with_norms.named_trainable_parameters().size(), biases + norm_weights);
  auto ref = peft_test::load_reference("bert");
  auto before = snapshot(base);
  auto losses = train(with_norms, ref.inputs, 5);
  EXPECT_LT(losses.back(), losses.front());
  for (const auto& [name, value] : snapshot(base)) EXPECT_TRUE(torch::equal(value, before.at(name))) << name;
}


TEST(Warnings, TracedDeviceConstantsThatDifferFromTheWeights) {
  // A traced export made on a GPU bakes its device into constants like this one.
  torch::jit::Module root = peft_test::model_with_fc(
      {{"weight", torch::randn({4, 4})}}, "torch.linear(x, self.weight) + torch.zeros([4], device=torch.device('cuda:0'))");
  testing::internal::CaptureStderr();
  peft::get_peft_model(root, peft::LoraConfig().r(2).target_modules({"fc"}));
  EXPECT_THAT(testing::internal::GetCapturedStderr(), ::testing::HasSubstr("hard-codes device cuda:0 but the weights are on cpu"));
}

TEST(Errors, TypedAndNamingTheCulprit) {
  auto gpt2 = peft_test::load_fixture("gpt2", "scripted");
  expect_error<peft::TargetError>([&] { peft::get_peft_model(gpt2, peft::LoraConfig()); },
                                  {"target_modules is empty", "transformer.h.0.attn.c_attn"});
  expect_error<peft::TargetError>([&] { peft::get_peft_model(gpt2, peft::LoraConfig().target_modules({"c_attn", "q_proj"})); },
                                  {"'q_proj' matched no module", "transformer.h.1.mlp.c_proj"});
  expect_error<peft::TargetError>([&] { peft::get_peft_model(gpt2, peft::LoraConfig().target_modules({"ln_1"})); },
                                  {"'transformer.h.0.ln_1'", "not a linear layer"});
  expect_error<peft::TargetError>([&] { peft::get_peft_model(gpt2, peft::LoraConfig().target_modules({"wte"})); },
                                  {"not a linear layer"});
  expect_error<peft::TargetError>(
      [&] { peft::get_peft_model(gpt2, peft::LoraConfig().target_modules({"c_attn"}).layers_to_transform({7})); },
      {"matched no module in layers_to_transform"});
  // A rank above min(in, out) is allowed, as in HF peft, with a warning naming the layer.
  testing::internal::CaptureStderr();
  peft::get_peft_model(gpt2, peft::LoraConfig().r(65).target_modules({"c_attn"}));
  EXPECT_THAT(testing::internal::GetCapturedStderr(),
              ::testing::HasSubstr("'transformer.h.0.attn.c_attn': LoraOptions.r = 65 exceeds min(in=64, out=192)"));
  expect_error<peft::OptionError>([&] { peft::get_peft_model(gpt2, peft::LoraConfig().r(0).target_modules({"c_attn"})); },
                                  {"r must be >= 1"});
  expect_error<peft::OptionError>([&] { peft::LoraConfig().target_modules("[unclosed"); }, {"not a valid regex"});
  auto bert = peft_test::load_fixture("bert", "scripted");
  bert.eval();
  auto frozen = torch::jit::freeze(bert);
  expect_error<peft::ModelError>([&] { peft::get_peft_model(frozen, peft::LoraConfig().target_modules({"query"})); },
                                 {"frozen"});
  expect_error<peft::ModelError>([&] { peft::get_peft_model(bert, peft::BottleneckConfig().target_modules({"query"})).merge_adapter(); },
                                 {"Bottleneck", "cannot be merged"});
}

}  // namespace
