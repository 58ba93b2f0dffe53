// VeRA: the functional form against golden values from plain PyTorch
// (tools/golden_vera.py -> tests/data/golden_vera.pt), HF's projection draw bit
// for bit, and VeRA through PeftModel on every TorchScript fixture. Tolerances:
// 1e-5 (fp32, other op order); bit-identical where the same ops run.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

namespace V = peft::vera;
namespace fs = std::filesystem;

torch::jit::Module& golden() {
  static torch::jit::Module module = torch::jit::load(std::string(PEFT_SOURCE_DIR) + "/tests/data/golden_vera.pt");
  return module;
}
torch::Tensor golden(const std::string& name) { return golden().attr(name).toTensor(); }
int64_t golden_int(const std::string& name) { return golden(name).item<int64_t>(); }

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  EXPECT_TRUE(torch::allclose(actual, expected, 1e-5, 1e-5))
      << what << ": max |diff| " << (actual - expected).abs().max().item<double>();
}

TEST(VeraGolden, ProjectionsAreHfsDrawBitForBit) {
  for (const std::string c : {"init_0", "init_1", "init_2", "vera"}) {
    const auto p = V::init_projections(golden_int(c + "__max_in"), golden_int(c + "__max_out"), golden_int(c + "__r"),
                                       golden_int(c + "__seed"));
    EXPECT_TRUE(torch::equal(p.A, golden(c + "__A"))) << c;
    EXPECT_TRUE(torch::equal(p.B, golden(c + "__B"))) << c;
  }
}

TEST(VeraGolden, LayersOutputsGradientsAndMergedWeights) {
  for (const std::string c : {"vera_l0", "vera_l1", "vera_l2"}) {
    const bool fan_in_fan_out = golden(c + "__fan_in_fan_out").item<bool>();
    const torch::Tensor A = V::slice_A(golden("vera__A"), golden_int(c + "__in"));
    const torch::Tensor B = V::slice_B(golden("vera__B"), golden_int(c + "__out"));
    torch::Tensor x = golden(c + "__x").clone().requires_grad_(true);
    torch::Tensor ld = golden(c + "__lambda_d").clone().requires_grad_(true);
    torch::Tensor lb = golden(c + "__lambda_b").clone().requires_grad_(true);
    const torch::Tensor W = golden(c + "__W"), b = golden(c + "__b");
    torch::Tensor y = V::forward(x, W, b, A, B, ld, lb, fan_in_fan_out);
    expect_close(y, golden(c + "__y"), c + " y");
    (y * golden(c + "__g")).sum().backward();
    expect_close(x.grad(), golden(c + "__grad_x"), c + " dx");
    expect_close(ld.grad(), golden(c + "__grad_lambda_d"), c + " dlambda_d");
    expect_close(lb.grad(), golden(c + "__grad_lambda_b"), c + " dlambda_b");
    torch::NoGradGuard no_grad;
    expect_close(V::delta_weight(A, B, ld, lb, fan_in_fan_out), golden(c + "__delta_W"), c + " delta_W");
    const torch::Tensor merged = V::merge(W, A, B, ld, lb, fan_in_fan_out);
    expect_close(merged, golden(c + "__W_merged"), c + " merged");
    expect_close(V::unmerge(merged, A, B, ld, lb, fan_in_fan_out), W, c + " unmerged");
  }
}

/// VeRA targets that suit each architecture's module names (GPT-2's c_attn / c_fc store [in, out]).
peft::VeraConfig vera_config(const std::string& arch) {
  auto cfg = peft::VeraConfig().r(8).projection_prng_key(7);
  if (arch == "gpt2") return cfg.target_modules({"c_attn", "c_fc"});
  if (arch == "bert") return cfg.target_modules({"query", "value"});
  return cfg.target_modules({"q_proj", "v_proj"});
}

class VeraModelTest : public peft_test::FixtureModelTest {
 protected:
  torch::Tensor run(peft::PeftModel& model) { return model.forward(ref.inputs).toTensor(); }
  torch::Tensor base_output() {
    torch::NoGradGuard no_grad;
    return base.forward(ref.inputs).toTensor();
  }
  /// AdamW steps towards a fixed random target; the losses.
  std::vector<double> train(peft::PeftModel& model, int steps) {
    torch::manual_seed(3);
    torch::Tensor target = torch::randn_like(run(model).detach());
    torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
    std::vector<double> losses;
    for (int i = 0; i < steps; ++i) {
      opt.zero_grad();
      torch::Tensor loss = (run(model) - target).pow(2).mean();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    return losses;
  }
};

TEST_P(VeraModelTest, NeutralInitTrainsOnlyLambdasAndLowersTheLoss) {
  const torch::Tensor expected = base_output();
  peft::PeftModel model = peft::get_peft_model(base, vera_config(arch));
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(run(model), expected));
  }
  std::set<const void*> trainable;
  for (const auto& [name, t] : model.named_trainable_parameters()) {
    EXPECT_THAT(name, ::testing::AnyOf(::testing::EndsWith(".vera_lambda_b"), ::testing::EndsWith(".vera_lambda_d")));
    trainable.insert(t.unsafeGetTensorImpl());
  }
  ASSERT_FALSE(trainable.empty());
  const auto losses = train(model, 8);  // eval mode: no dropout noise; VeRA's 8 small steps move little
  EXPECT_LT(losses.back(), losses.front()) << arch;
  for (const auto& p : model.module().named_parameters())
    if (!trainable.count(p.value.unsafeGetTensorImpl())) {
      EXPECT_FALSE(p.value.grad().defined()) << p.name;
    }
}

TEST_P(VeraModelTest, MergeDisableUnmergeAndFilesRoundTrip) {
  const torch::Tensor expected = base_output();
  std::map<std::string, torch::Tensor> original;
  for (const auto& p : base.named_parameters()) original[p.name] = p.value.detach().clone();
  peft::PeftModel model = peft::get_peft_model(base, vera_config(arch));
  model.train();
  train(model, 3);
  model.eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor adapted = run(model);
  ASSERT_FALSE(torch::allclose(adapted, expected, 1e-4, 1e-4)) << "training changed nothing";
  {
    auto off = model.disable_adapter();
    EXPECT_TRUE(torch::equal(run(model), expected));
  }
  model.merge_adapter();  // the functional ΔW folded in == the TorchScript layer's branch
  expect_close(run(model), adapted, "merged");
  model.unmerge_adapter();
  for (const auto& p : base.named_parameters())
    EXPECT_TRUE(torch::allclose(p.value, original.at(p.name), 1e-6, 1e-6)) << "unmerge did not restore " << p.name;
}

TEST_P(VeraModelTest, FilesRoundTripWithAndWithoutProjections) {
  for (bool save_projection : {true, false}) {
    const fs::path dir = peft_test::fresh_dir("vera_" + arch + "_" + kind + (save_projection ? "_proj" : "_seed"));
    peft::PeftModel model = peft::get_peft_model(peft_test::load_fixture(arch, kind),
                                                 vera_config(arch).save_projection(save_projection));
    model.train();
    train(model, 3);
    model.eval();
    model.save_pretrained(dir);
    const auto file = peft::io::load_safetensors(dir / peft::io::kWeightsFile);
    EXPECT_EQ(file.tensors.count("base_model.vera_A"), save_projection ? 1u : 0u);
    if (save_projection) {
      EXPECT_EQ(file.tensors.at("base_model.vera_A").size(0), 8);
    }
    for (const auto& [key, t] : file.tensors)
      EXPECT_THAT(key, ::testing::AnyOf(::testing::EndsWith(".vera_lambda_b"), ::testing::EndsWith(".vera_lambda_d"),
                                        ::testing::StartsWith("base_model.vera_")));
    peft::PeftModel loaded = peft::PeftModel::from_pretrained(peft_test::load_fixture(arch, kind), dir);
    loaded.eval();
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(loaded.forward(ref.inputs).toTensor(), run(model))) << "save_projection=" << save_projection;
    EXPECT_EQ(loaded.adapter_config_json("default")["peft_type"], "VERA");
  }
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, VeraModelTest, ::testing::ValuesIn(peft_test::all_fixtures()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

TEST(VeraConfigJson, RoundTripsHfsFieldsAndRejectsBadOnes) {
  const auto cfg = peft::VeraConfig().r(16).target_modules({"q", "v"}).projection_prng_key(5).save_projection(false)
                       .vera_dropout(0.1).d_initial(0.2).bias(peft::VeraBias::VeraOnly);
  const nlohmann::json j = peft::PeftConfig(cfg).to_json();
  EXPECT_EQ(j["peft_type"], "VERA");
  EXPECT_EQ(j["bias"], "vera_only");
  const peft::PeftConfig back = peft::config_from_json(j, "vera.json");
  const auto* v = back.get_if<peft::VeraConfig>();
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->r(), 16);
  EXPECT_EQ(v->projection_prng_key(), 5);
  EXPECT_FALSE(v->save_projection());
  EXPECT_DOUBLE_EQ(v->d_initial(), 0.2);
  EXPECT_EQ(v->bias(), peft::VeraBias::VeraOnly);
  nlohmann::json bad = j;
  bad["bias"] = "lora_only";
  peft_test::expect_error<peft::FileError>([&] { peft::config_from_json(bad, "vera.json"); },
                                           {"vera.json", "bias", "none, all, vera_only"});
}

}  // namespace
