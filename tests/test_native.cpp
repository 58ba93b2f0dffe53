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
const auto kNF4 = peft::NF4Config().blocksize(32);
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
  const std::string embedding = arch == "gpt2" ? "wte" : arch == "bert" ? "word_embeddings" : "embed_tokens";
  const std::string sublayers = arch == "bert" ? "encoder\\.layer\\.\\d+\\.attention" : ".*\\.(attn|self_attn|mlp)";
  return {{"lora", peft::LoraConfig().r(4).lora_alpha(8).target_modules(targets).modules_to_save(saved)},
          {"dora", peft::LoraConfig().r(2).use_dora(true).target_modules(targets)},
          {"lora_embedding", peft::LoraConfig().r(4).lora_alpha(8).target_modules({embedding, targets.front()})},
          {"qlora", peft::LoraConfig().r(4).lora_alpha(8).target_modules(targets).quantize_base(kNF4)},
          {"ia3", peft::IA3Config().target_modules(ia3_targets).feedforward_modules({ff})},
          {"vera", peft::VeraConfig().r(8).target_modules(targets).projection_prng_key(5)},
          {"bitfit", peft::BitFitConfig().norm(true)},
          {"bottleneck", peft::BottleneckConfig().target_modules(sublayers).bottleneck_size(8)},
          {"prompt", peft::PromptTuningConfig().num_virtual_tokens(3)},
          {"prefix", peft::PrefixTuningConfig().num_virtual_tokens(3)}};
}

/// Methods that add positions or sublayers: not neutral at init (prompt, prefix) and never merged (HF peft).
bool adds_positions(const std::string& method) { return method == "prompt" || method == "prefix"; }
bool mergeable(const std::string& method) { return !adds_positions(method) && method != "bottleneck"; }

/// The paths of `net`'s layers holding an NF4 weight.
std::vector<std::string> quantized_layers(torch::nn::Module& net) {
  std::vector<std::string> out;
  for (const auto& m : net.named_modules())
    if (auto* layer = dynamic_cast<peft::nn::AdaptedLayer*>(m.value().get()); layer && layer->quantized()) out.push_back(m.key());
  return out;
}

/// `layers` of `net` given NF4 weights (quantize() when `in_place`, else their dense round trip, for references).
void to_nf4(torch::nn::Module& net, const std::vector<std::string>& layers, bool in_place) {
  auto modules = net.named_modules();
  for (const auto& path : layers) {
    auto& layer = dynamic_cast<peft::nn::AdaptedLayer&>(*modules[path]);
    torch::NoGradGuard no_grad;
    if (in_place) layer.quantize(kNF4, path);
    else layer.weight.copy_(peft::nf4::dequantize(peft::nf4::quantize(layer.weight, kNF4)));
  }
}

/// Each tensor's key and shape in an adapter folder's weights file.
std::map<std::string, std::vector<int64_t>> keys_and_shapes(const fs::path& dir) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [key, t] : peft::io::load_safetensors(dir / peft::io::kWeightsFile).tensors) out[key] = t.sizes().vec();
  return out;
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
    if (method == "qlora") {  // the base is now the NF4 one: the same model with each weight's NF4 round trip
      const auto layers = quantized_layers(*net);
      ASSERT_EQ(layers.size(), 4u) << "two targets in each of two layers";
      auto reference = twin();
      to_nf4(*reference, layers, /*in_place=*/false);
      torch::NoGradGuard no_grad;
      before = run(*reference);
    }
    if (!adds_positions(method)) {
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
    if (!mergeable(method)) {
      expect_error<peft::ModelError>([&] { model.merge_adapter(); }, {"cannot be merged"});
      expect_error<peft::ModelError>([&] { model.merge_and_unload(); }, {"cannot be merged"});
      continue;
    }
    model.merge_adapter();
    EXPECT_TRUE(torch::allclose(run(*net), adapted, 1e-5, 1e-5)) << "merged";
    model.unmerge_adapter();
    for (const auto& [name, value] : original)
      if (name.find(".default.") == std::string::npos && net->named_parameters()[name].numel() > 0 &&
          !trainable.count(net->named_parameters()[name].unsafeGetTensorImpl())) {
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
    if (method == "lora_embedding") continue;  // the TorchScript backend has no LoRA on embeddings (HF's check: RealHfPeftNative)
    const fs::path from_native = peft_test::fresh_dir("native_" + arch + "_" + method),
                   from_jit = peft_test::fresh_dir("jit_" + arch + "_" + method);
    auto net = twin();
    peft::nn::PeftModel model = peft::get_peft_model(net, config);
    train(model, *net, 3);
    model.save_pretrained(from_native);
    torch::NoGradGuard no_grad;
    const torch::Tensor native_out = run(*net);
    // QLoRA's file is a LoRA file (HF keeps the quantisation with the base): each side loads it over its NF4 base.
    const auto jit_base = config.prepare_base(peft_test::load_fixture(arch, "scripted"));
    peft::PeftModel jit = peft::PeftModel::from_pretrained(jit_base, from_native);
    jit.eval();
    const torch::Tensor jit_out = jit.forward(ref.inputs).toTensor();
    EXPECT_TRUE(torch::allclose(jit_out, native_out, 1e-5, 1e-5)) << (jit_out - native_out).abs().max().item<double>();
    EXPECT_EQ(jit.adapter_config_json("default"), model.adapter_config_json("default"));
    jit.save_pretrained(from_jit);
    EXPECT_EQ(keys_and_shapes(from_native), keys_and_shapes(from_jit))
        << "the native file's keys differ from the TorchScript model's (which the HF layout check covers)";
    // and back: the TorchScript model's file into a fresh native twin
    auto other = twin();
    to_nf4(*other, quantized_layers(*net), /*in_place=*/true);
    peft::nn::PeftModel loaded = peft::nn::PeftModel::from_pretrained(other, from_jit);
    loaded.eval();
    EXPECT_TRUE(torch::allclose(run(*other), jit_out, 1e-5, 1e-5));
  }
}

// Files written by native models load in the real HF peft (PyPI) on the Python model with the same
// module names, with equal outputs (tools/check_real_peft.py; the methods HF peft has on nn.Linear layers).
TEST(RealHfPeftNative, HfLoadsFilesOfNativeModels) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  const fs::path dir = peft_test::fresh_dir("native_for_real_peft");
  for (const std::string arch : {"llama", "bert"}) {
    const auto exported = peft_test::load_fixture(arch, "scripted");
    const auto ref = peft_test::load_reference(arch);
    for (const auto& [method, config] : native_configs(arch)) {
      if (method != "lora" && method != "dora" && method != "ia3" && method != "vera" && method != "lora_embedding") continue;
      auto net = twins::make(arch, exported);
      peft::nn::PeftModel model = peft::get_peft_model(net, config);
      torch::manual_seed(7);
      {
        torch::NoGradGuard no_grad;  // every adapter tensor away from its neutral value
        for (auto& p : model.trainable_parameters()) p.add_(0.05 * torch::randn_like(p));
      }
      model.save_pretrained(dir / (arch + "_" + method));
      torch::NoGradGuard no_grad;
      peft_test::save_io(dir / (arch + "_" + method) / "io.pt", ref.inputs, twins::run(arch, *net, ref.inputs));
    }
  }
  EXPECT_EQ(peft_test::run_reference_tool("check_real_peft.py verify " + dir.string()), 0);
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
      [&] { auto m = peft::get_peft_model(net, peft::PrefixTuningConfig().num_virtual_tokens(2).prefix_projection(true)); },
      {"prefix_projection", "not available for torch::nn models yet"});
  auto plain = std::make_shared<torch::nn::Module>();  // no sites: the methods that need them say which
  plain->register_module("fc", peft::nn::Linear(4, 4));
  expect_error<peft::ModelError>([&] { auto m = peft::get_peft_model(plain, peft::PromptTuningConfig()); },
                                 {"peft::nn::PromptSite", "found 0"});
  expect_error<peft::ModelError>([&] { auto m = peft::get_peft_model(plain, peft::PrefixTuningConfig()); },
                                 {"peft::nn::PrefixSite"});
  expect_error<peft::TargetError>(
      [&] { auto m = peft::get_peft_model(plain, peft::BottleneckConfig().target_modules({"fc"})); },
      {"'fc'", "peft::nn::OutputSite"});
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

TEST(NativeLayers, QLoRAVariantsComputeDtypeAllLinearAndRequantisingMerge) {
  const auto exported = peft_test::load_fixture("llama", "scripted");
  const auto ref = peft_test::load_reference("llama");
  auto lora = [] { return peft::LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj"}).init_lora_weights(peft::LoraInit::Random); };
  torch::NoGradGuard no_grad;

  // quantize_all_linear: every peft::nn linear layer but lm_head is NF4; LoRA only on the targets.
  auto all = twins::make("llama", exported);
  peft::nn::PeftModel all_model = peft::get_peft_model(all, lora().quantize_base(peft::NF4Config().blocksize(32).quantize_all_linear(true)));
  EXPECT_EQ(quantized_layers(*all).size(), 14u) << "7 projections in each of 2 layers";
  for (const auto& path : quantized_layers(*all)) EXPECT_EQ(path.find("lm_head"), std::string::npos);

  // compute_dtype bf16: the base computes in bf16, the output stays fp32 and near the fp32 one.
  auto fp32 = twins::make("llama", exported), bf16 = twins::make("llama", exported);
  torch::manual_seed(3);
  peft::nn::PeftModel m32 = peft::get_peft_model(fp32, lora().quantize_base(kNF4));
  torch::manual_seed(3);
  peft::nn::PeftModel m16 = peft::get_peft_model(bf16, lora().quantize_base(peft::NF4Config().blocksize(32).compute_dtype(torch::kBFloat16)));
  const torch::Tensor y32 = twins::run("llama", *fp32, ref.inputs), y16 = twins::run("llama", *bf16, ref.inputs);
  EXPECT_EQ(y16.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::allclose(y16, y32, 5e-2, 5e-2)) << (y16 - y32).abs().max().item<double>();
  EXPECT_FALSE(torch::equal(y16, y32)) << "bf16 was not used";

  // requantize_on_merge: the merged weight goes back to NF4 (a warning with the error), unmerge restores the bytes.
  auto net = twins::make("llama", exported);
  peft::nn::PeftModel model = peft::get_peft_model(net, lora().quantize_base(peft::NF4Config().blocksize(32).requantize_on_merge(true)));
  auto& q = dynamic_cast<peft::nn::AdaptedLayer&>(*net->named_modules()["model.layers.0.self_attn.q_proj"]);
  const torch::Tensor packed = q.quantized()->packed.clone(), adapted = twins::run("llama", *net, ref.inputs);
  std::vector<std::string> warnings;
  {
    const peft::CapturedWarnings captured;
    model.merge_adapter();
    warnings = captured.messages();
  }
  ASSERT_EQ(warnings.size(), 4u);
  EXPECT_THAT(warnings.front(), ::testing::HasSubstr("re-quantises it: max |error|"));
  EXPECT_EQ(q.weight.numel(), 0) << "the merged weight is NF4 again";
  EXPECT_FALSE(torch::equal(q.quantized()->packed, packed));
  EXPECT_TRUE(torch::allclose(twins::run("llama", *net, ref.inputs), adapted, 0.1, 0.1)) << "NF4's error only";
  model.unmerge_adapter();
  EXPECT_TRUE(torch::equal(q.quantized()->packed, packed)) << "unmerge restores the NF4 bytes";
  EXPECT_TRUE(torch::equal(twins::run("llama", *net, ref.inputs), adapted));
}

TEST(NativeLayers, EmbeddingIsTorchsEmbeddingUntilAdaptedAndClones) {
  torch::manual_seed(1);
  torch::nn::Embedding plain(torch::nn::EmbeddingOptions(10, 4).padding_idx(0));
  torch::manual_seed(1);
  peft::nn::Embedding ours(torch::nn::EmbeddingOptions(10, 4).padding_idx(0));
  EXPECT_TRUE(torch::equal(plain->weight, ours->weight));
  std::vector<std::string> names;
  for (const auto& p : ours->named_parameters()) names.push_back(p.key());
  EXPECT_THAT(names, ::testing::ElementsAre("weight"));
  const torch::Tensor ids = torch::tensor({{0, 3, 9}, {2, 2, 1}});
  EXPECT_TRUE(torch::equal(plain(ids), ours(ids)));

  auto net = std::make_shared<torch::nn::Module>();
  net->register_module("wte", ours);
  peft::nn::PeftModel model = peft::get_peft_model(net, peft::LoraConfig().r(2).target_modules({"wte"}).init_lora_weights(peft::LoraInit::Random));
  const torch::Tensor adapted = ours(ids);
  EXPECT_FALSE(torch::allclose(adapted, plain(ids)));
  auto copy = std::dynamic_pointer_cast<peft::nn::EmbeddingImpl>(ours->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->forward(ids), adapted)) << "clone() lost the adapter";
  expect_error<peft::ShapeError>([&] { ours(torch::zeros({2, 3})); }, {"peft::nn::Embedding", "integer token ids"});
  expect_error<peft::OptionError>(
      [&] { model.add_adapter("dora", peft::LoraConfig().r(2).use_dora(true).target_modules({"wte"})); },
      {"embedding", "use_dora"});
}

TEST(NativeLayers, SitesRefuseMixedBatchesAndCloneTheirAdapters) {
  const auto exported = peft_test::load_fixture("llama", "scripted");
  const auto ref = peft_test::load_reference("llama");
  auto net = twins::make("llama", exported);
  peft::nn::PeftModel model = peft::get_peft_model(net, peft::PromptTuningConfig().num_virtual_tokens(2), "a");
  torch::NoGradGuard no_grad;
  {
    auto scope = model.sample_adapters({"a", peft::kBaseAdapter});
    expect_error<peft::OptionError>([&] { twins::run("llama", *net, ref.inputs); }, {"mixed-adapter batches", "prompts"});
  }
  auto bottleneck = std::make_shared<peft::bottleneck::NativeLayerImpl>(peft::BottleneckOptions(8).bottleneck(2));
  auto copy = std::dynamic_pointer_cast<peft::bottleneck::NativeLayerImpl>(bottleneck->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->adapter_down->weight, bottleneck->adapter_down->weight));
  EXPECT_NE(copy->adapter_down->weight.data_ptr(), bottleneck->adapter_down->weight.data_ptr());
}

}  // namespace
