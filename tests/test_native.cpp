// get_peft_model on torch::nn models (the native backend) over native twins of the
// three fixture architectures (tests/native_twins.h): neutral init bit-identical
// to the base, only adapter parameters train, AdamW lowers a loss,
// merge_and_unload == adapted (1e-5), disable and unmerge restore the base, and
// one adapter file gives equal outputs (1e-5) in the TorchScript and the native model.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"
#include "native_twins.h"

namespace {

using peft_test::expect_error;
namespace fs = std::filesystem;
namespace twins = peft_test::twins;

/// The methods the native backend has, each with targets that suit `arch`.
std::vector<std::pair<std::string, peft::PeftConfig>> native_configs(const std::string& arch) {
  const std::vector<std::string> targets = arch == "gpt2"   ? std::vector<std::string>{"c_attn", "c_fc"}
                                           : arch == "bert" ? std::vector<std::string>{"query", "value"}
                                                            : std::vector<std::string>{"q_proj", "v_proj"};
  const std::vector<std::string> saved = arch == "bert" ? std::vector<std::string>{} : std::vector<std::string>{"lm_head"};
  const std::string ff = arch == "gpt2" ? "c_fc" : arch == "bert" ? "output.dense" : "down_proj";
  std::vector<std::string> ia3_targets = targets;
  if (arch != "gpt2") ia3_targets.push_back(ff);
  return {{"lora", peft::LoraConfig().r(4).lora_alpha(8).target_modules(targets).modules_to_save(saved)},
          {"dora", peft::LoraConfig().r(2).use_dora(true).target_modules(targets)},
          {"ia3", peft::IA3Config().target_modules(ia3_targets).feedforward_modules({ff})},
          {"vera", peft::VeraConfig().r(8).target_modules(targets).projection_prng_key(5)}};
}

class NativeTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    arch = GetParam();
    exported = peft_test::load_fixture(arch, "scripted");
    exported.eval();
    ref = peft_test::load_reference(arch);
    torch::NoGradGuard no_grad;
    base_output = exported.forward(ref.inputs).toTensor();
  }
  std::shared_ptr<torch::nn::Module> twin() { return twins::make(arch, exported); }
  torch::Tensor run(torch::nn::Module& m) { return twins::run(arch, m, ref.inputs); }

  /// AdamW steps (lr 1e-2) towards a fixed random target on `net`, in eval mode; the losses.
  std::vector<double> train(peft::nn::PeftModel& model, torch::nn::Module& net, int steps) {
    torch::manual_seed(5);
    torch::Tensor target = torch::randn_like(run(net).detach());
    torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
    std::vector<double> losses;  // in eval mode: no dropout noise, so any rise is the gradient's fault
    for (int i = 0; i < steps; ++i) {
      opt.zero_grad();
      torch::Tensor loss = (run(net) - target).pow(2).mean();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    return losses;
  }

  std::string arch;
  torch::jit::Module exported;
  peft_test::Reference ref;
  torch::Tensor base_output;
};

TEST_P(NativeTest, TwinReproducesTheExport) {
  auto net = twin();
  torch::NoGradGuard no_grad;
  torch::Tensor out = run(*net);
  EXPECT_TRUE(torch::allclose(out, base_output, 1e-5, 1e-5)) << (out - base_output).abs().max().item<double>();
}

TEST_P(NativeTest, EveryMethodNeutralTrainsMergesDisablesAndUnmerges) {
  for (const auto& [method, config] : native_configs(arch)) {
    SCOPED_TRACE(method);
    auto net = twin();
    torch::Tensor before;
    {
      torch::NoGradGuard no_grad;
      before = run(*net);
    }
    std::map<std::string, torch::Tensor> original;
    for (const auto& p : net->named_parameters()) original[p.key()] = p.value().detach().clone();
    peft::nn::PeftModel model = peft::get_peft_model(net, config);
    {
      torch::NoGradGuard no_grad;
      EXPECT_TRUE(torch::equal(run(*net), before)) << "neutral init changed the output";
    }
    std::set<const void*> trainable;
    for (const auto& t : model.trainable_parameters()) trainable.insert(t.unsafeGetTensorImpl());
    ASSERT_FALSE(trainable.empty());
    const auto losses = train(model, *net, 8);
    EXPECT_LT(losses.back(), losses.front()) << "the loss did not fall";
    for (const auto& p : net->named_parameters())
      if (!trainable.count(p.value().unsafeGetTensorImpl())) {
        EXPECT_FALSE(p.value().grad().defined()) << "frozen " << p.key() << " got a gradient";
      }
    torch::NoGradGuard no_grad;
    const torch::Tensor adapted = run(*net);
    ASSERT_FALSE(torch::allclose(adapted, before, 1e-4, 1e-4)) << "training changed nothing";
    {
      auto off = model.disable_adapter();
      EXPECT_TRUE(torch::equal(run(*net), before)) << "disabled";
    }
    EXPECT_TRUE(torch::equal(run(*net), adapted));
    model.merge_adapter();
    EXPECT_TRUE(torch::allclose(run(*net), adapted, 1e-5, 1e-5)) << "merged";
    model.unmerge_adapter();
    for (const auto& [name, value] : original)
      if (name.find(".default.") == std::string::npos && !trainable.count(net->named_parameters()[name].unsafeGetTensorImpl())) {
        EXPECT_TRUE(torch::allclose(net->named_parameters()[name], value, 1e-6, 1e-6)) << "unmerge: " << name;
      }
    auto merged = model.merge_and_unload();
    torch::Tensor out = run(*merged);
    EXPECT_TRUE(torch::allclose(out, adapted, 1e-5, 1e-5)) << "merge_and_unload by " << (out - adapted).abs().max().item<double>();
    for (const auto& p : merged->named_parameters())
      EXPECT_EQ(p.key().find(".default."), std::string::npos) << "an adapter stayed: " << p.key();
  }
}

TEST_P(NativeTest, OneAdapterFileGivesEqualOutputsInTorchScriptAndNative) {
  for (const auto& [method, config] : native_configs(arch)) {
    SCOPED_TRACE(method);
    const fs::path from_native = peft_test::fresh_dir("native_" + arch + "_" + method),
                   from_jit = peft_test::fresh_dir("jit_" + arch + "_" + method);
    auto net = twin();
    peft::nn::PeftModel model = peft::get_peft_model(net, config);
    train(model, *net, 3);
    model.save_pretrained(from_native);
    torch::NoGradGuard no_grad;
    const torch::Tensor native_out = run(*net);
    peft::PeftModel jit = peft::PeftModel::from_pretrained(peft_test::load_fixture(arch, "scripted"), from_native);
    jit.eval();
    const torch::Tensor jit_out = jit.forward(ref.inputs).toTensor();
    EXPECT_TRUE(torch::allclose(jit_out, native_out, 1e-5, 1e-5)) << (jit_out - native_out).abs().max().item<double>();
    EXPECT_EQ(jit.adapter_config_json("default"), model.adapter_config_json("default"));
    // and back: the TorchScript model's file into a fresh native twin
    jit.save_pretrained(from_jit);
    auto other = twin();
    peft::nn::PeftModel loaded = peft::nn::PeftModel::from_pretrained(other, from_jit);
    loaded.eval();
    EXPECT_TRUE(torch::allclose(run(*other), jit_out, 1e-5, 1e-5));
  }
}

INSTANTIATE_TEST_SUITE_P(Twins, NativeTest, ::testing::Values("gpt2", "bert", "llama"));

// ------------------------------------------------------------ layers, errors
TEST(NativeLayers, LinearIsTorchsLinearUntilAdaptedAndClones) {
  torch::manual_seed(1);
  torch::nn::Linear plain(torch::nn::LinearOptions(6, 3));
  torch::manual_seed(1);
  peft::nn::Linear ours(torch::nn::LinearOptions(6, 3));
  EXPECT_TRUE(torch::equal(plain->weight, ours->weight));
  EXPECT_TRUE(torch::equal(plain->bias, ours->bias));
  std::vector<std::string> names;
  for (const auto& p : ours->named_parameters()) names.push_back(p.key());
  EXPECT_THAT(names, ::testing::ElementsAre("weight", "bias"));
  torch::Tensor x = torch::randn({2, 6});
  EXPECT_TRUE(torch::equal(plain(x), ours(x)));

  auto net = std::make_shared<torch::nn::Module>();
  net->register_module("fc", ours);
  peft::nn::PeftModel model = peft::get_peft_model(net, peft::LoraConfig().r(2).target_modules({"fc"}).init_lora_weights(peft::LoraInit::Random));
  const torch::Tensor adapted = ours(x);
  auto copy = std::dynamic_pointer_cast<peft::nn::LinearImpl>(ours->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->forward(x), adapted)) << "clone() lost the adapter";
  EXPECT_NE(copy->named_parameters()["default.lora_A"].data_ptr(), ours->named_parameters()["default.lora_A"].data_ptr());
  expect_error<peft::ShapeError>([&] { ours(torch::randn({2, 5})); }, {"peft::nn::Linear", "6"});
}

struct HeldPlainImpl : torch::nn::Module {
  HeldPlainImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc;
};
TORCH_MODULE(HeldPlain);

TEST(NativeLayers, PlainLinearStillHeldIsATypedErrorAndAFreeOneIsReplaced) {
  HeldPlain held;
  expect_error<peft::ModelError>([&] { auto m = peft::get_peft_model(held, peft::LoraConfig().target_modules({"fc"})); },
                                 {"'fc'", "torch::nn::Linear", "peft::nn::Linear"});
  EXPECT_TRUE(std::dynamic_pointer_cast<torch::nn::LinearImpl>(held->named_children()["fc"])) << "not left as it was";

  auto free = std::make_shared<torch::nn::Module>();  // registered only: nothing else runs it
  torch::nn::Linear fc(4, 4);
  const torch::Tensor weight = fc->weight;
  free->register_module("fc", fc);
  fc = torch::nn::Linear(nullptr);
  peft::nn::PeftModel model = peft::get_peft_model(free, peft::LoraConfig().target_modules({"fc"}));
  auto replaced = std::dynamic_pointer_cast<peft::nn::LinearImpl>(free->named_children()["fc"]);
  ASSERT_TRUE(replaced);
  EXPECT_EQ(replaced->weight.data_ptr(), weight.data_ptr()) << "the replacement shares the tensors";
}

TEST(NativeLayers, MethodsWithoutANativeLayerSaySo) {
  auto net = twins::make("llama", peft_test::load_fixture("llama", "scripted"));
  expect_error<peft::OptionError>(
      [&] { auto m = peft::get_peft_model(net, peft::PromptTuningConfig().num_virtual_tokens(2)); },
      {"PromptTuning", "not available for torch::nn models yet"});
  expect_error<peft::TargetError>([&] { auto m = peft::get_peft_model(net, peft::LoraConfig().target_modules({"nope"})); },
                                  {"nope"});
  for (const auto& p : net->named_parameters()) EXPECT_EQ(p.key().find(".default."), std::string::npos) << p.key();
}

TEST(NativeLayers, MixedAdapterBatchRunsEachSamplesAdapter) {
  const auto exported = peft_test::load_fixture("llama", "scripted");
  const auto ref = peft_test::load_reference("llama");
  auto net = twins::make("llama", exported);
  auto cfg = peft::LoraConfig().r(2).target_modules({"q_proj", "v_proj"}).init_lora_weights(peft::LoraInit::Random);
  peft::nn::PeftModel model = peft::get_peft_model(net, cfg, "a");
  model.add_adapter("b", cfg);
  torch::NoGradGuard no_grad;
  auto out_of = [&](const std::string& name) {
    if (name == peft::kBaseAdapter) {
      auto off = model.disable_adapter();
      return twins::run("llama", *net, ref.inputs);
    }
    model.set_adapter(name);
    return twins::run("llama", *net, ref.inputs);
  };
  const torch::Tensor a = out_of("a"), b = out_of("b"), base = out_of(peft::kBaseAdapter);
  torch::Tensor mixed;
  {
    auto scope = model.sample_adapters({"b", peft::kBaseAdapter});
    mixed = twins::run("llama", *net, ref.inputs);
  }
  EXPECT_TRUE(torch::allclose(mixed[0], b[0], 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(mixed[1], base[1], 1e-6, 1e-6));
  EXPECT_FALSE(torch::allclose(a[0], b[0], 1e-4, 1e-4));
}

}  // namespace
