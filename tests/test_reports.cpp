// Real-world faults (issue 17), each a kind: target rules that see only the base
// model, layer indices, fields HF fills, per-module keys, tied weights, combined
// adapters, loading errors. Suite RealHfPeft compares with the real HF peft
// (tools/reference/hf_cases.py, run by the reference venv's Python). Suite
// NewUser (issue 18): the documentation's quick start and native recipe, run as
// written, and the messages a new user meets.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <filesystem>
#include <fstream>

#include <unistd.h>

#include "doc_snippets_tested.h"  // the ```cpp blocks of docs/ marked snippet-test (tools/extract_snippets.py)
#include "fixtures.h"

namespace {

using peft_test::run;
using peft_test::randomise;

using peft_test::expect_error;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

torch::jit::Module load_case(const std::string& name) { return peft_test::load_fixture(name, "scripted"); }

/// Inputs inside every case's vocabulary (the comparisons with HF read theirs from its files).
std::vector<torch::jit::IValue> case_inputs(const std::string& name) {
  torch::Tensor ids = torch::tensor({{9, 23, 44, 3, 1, 16}, {18, 5, 30, 47, 12, 2}});
  if (name != "bert_cls") return {ids};
  return {ids, torch::tensor({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 0, 0}})};
}


double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// AdamW steps towards a fixed random target; returns the first and last loss.
std::pair<double, double> train(peft::PeftModel& model, const std::vector<torch::jit::IValue>& inputs, int steps) {
  torch::manual_seed(11);
  torch::Tensor target = torch::randn_like(run(model, inputs).detach());
  torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
  double first = 0, last = 0;
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    torch::Tensor loss = (run(model, inputs) - target).pow(2).mean();
    loss.backward();
    opt.step();
    (i == 0 ? first : last) = loss.item<double>();
  }
  return {first, last};
}


std::vector<std::string> targets_of(const peft::PeftModel& model, const std::string& adapter = "") {
  std::vector<std::string> out;
  for (const auto& l : model.adapter_layers(adapter)) out.push_back(l.target);
  std::sort(out.begin(), out.end());
  return out;
}

/// What `fn` prints to stderr (peft::warn goes through TORCH_WARN, which prints there).
template <typename Fn>
std::string stderr_of(Fn&& fn) {
  ::testing::internal::CaptureStderr();
  fn();
  return ::testing::internal::GetCapturedStderr();
}

// ------------------------------------------------ 1. the library's own modules
TEST(TargetRules, QLoRAResolvesTargetsAgainstTheBaseModelOnly) {
  torch::jit::Module base = load_case("mlp");
  const auto inputs = case_inputs("mlp");
  const torch::Tensor expected = run(base, inputs);
  // The reported input: fc1 matched 'peft_nf4.fc1', the NF4 container the library adds.
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(4).target_modules({"fc1"})
                                                                      .quantize_base(peft::NF4Config().blocksize(32)));
  EXPECT_EQ(targets_of(model), std::vector<std::string>{"fc1"});
  EXPECT_LT(max_diff(run(model, inputs), expected), 0.1);  // NF4 error only: B = 0
  // Every later adapter, and every error's candidate list, sees base names only.
  model.add_adapter("two", peft::LoraConfig().r(2).target_modules({"fc1", "fc2"}));
  EXPECT_EQ(targets_of(model, "two"), (std::vector<std::string>{"fc1", "fc2"}));
  model.add_adapter("three", peft::IA3Config().target_modules("fc.*"));
  EXPECT_EQ(targets_of(model, "three"), (std::vector<std::string>{"fc1", "fc2"}));
  model.add_adapter("bias", peft::BitFitConfig());
  for (const auto& c : model.adapter("bias").copies) EXPECT_THAT(c.module, Not(HasSubstr("peft_"))) << c.module;
  try {
    model.add_adapter("bad", peft::LoraConfig().target_modules({"nope"}));
    ADD_FAILURE() << "no TargetError";
  } catch (const peft::TargetError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'nope' matched no module"));
    EXPECT_THAT(e.what(), Not(HasSubstr("peft_")));
  }
}

TEST(TargetRules, LaterAdaptersAndLoadedOnesSeeTheBaseModulesOnly) {
  // The reported input: a second adapter on `classifier`, which the first saves.
  peft::PeftModel model = peft::get_peft_model(
      load_case("bert_cls"), peft::LoraConfig().r(4).target_modules({"query", "value"}).modules_to_save({"classifier"}));
  model.add_adapter("two", peft::LoraConfig().r(2).target_modules({"classifier"}));
  EXPECT_EQ(targets_of(model, "two"), std::vector<std::string>{"classifier"});
  model.add_adapter("three", peft::LoraConfig().r(2).target_modules({"dense"}).modules_to_save({"pooler_missing", "word_embeddings"}));
  const fs::path dir = peft_test::fresh_dir("base_names_only");
  model.save_pretrained(dir);
  peft::PeftModel loaded = peft::PeftModel::from_pretrained(load_case("bert_cls"), dir);
  loaded.load_adapter(dir / "two", "two");
  loaded.load_adapter(dir / "three", "three");
  EXPECT_EQ(targets_of(loaded, "two"), std::vector<std::string>{"classifier"});
  EXPECT_EQ(targets_of(loaded, "three"), targets_of(model, "three"));
}

// ------------------------------------------------------------ 2. layer index
TEST(TargetRules, LayerIndexIsTheFirstNumberAfterThePatternOrAWord) {
  using peft::layer_index;
  const std::vector<std::string> none, layers{"layers"}, h{"h"}, layer{"layer"};
  EXPECT_EQ(layer_index("layers.1.mlp.experts.0.w1", none), 1);  // the reported name: the expert index came out
  EXPECT_EQ(layer_index("layers.1.mlp.experts.0.w1", layers), 1);
  EXPECT_EQ(layer_index("model.layers.0.mlp.experts.1.w1", none), 0);
  EXPECT_EQ(layer_index("model.layers.0.mlp.experts.1.w1", layers), 0);
  EXPECT_EQ(layer_index("model.layers.12.block_sparse_moe.experts.7.w3", layers), 12);
  EXPECT_EQ(layer_index("transformer.h.3.attn.c_attn", none), 3);
  EXPECT_EQ(layer_index("transformer.h.3.attn.c_attn", h), 3);
  EXPECT_EQ(layer_index("bert.encoder.layer.11.attention.self.query", layer), 11);
  EXPECT_EQ(layer_index("blocks.2.0.w", none), 2);                     // nested lists: the outer index
  EXPECT_EQ(layer_index("encoder.stages.1.layers.4.q", layers), 4);    // the pattern, not the first number
  EXPECT_EQ(layer_index("encoder.stages.1.layers.4.q", none), 1);
  EXPECT_EQ(layer_index("experts.3.w1", layers), std::nullopt);        // no pattern in the name
  EXPECT_EQ(layer_index("layers.7", none), 7);                         // the layer module itself
  EXPECT_EQ(layer_index("layers", none), std::nullopt);
  EXPECT_EQ(layer_index("lm_head", none), std::nullopt);
  EXPECT_EQ(layer_index("model.mylayers.2.q", layers), std::nullopt);  // a whole component, not a suffix
  EXPECT_EQ(layer_index("model.layers.5.q", {"blocks", "layers"}), 5);
}

TEST(TargetRules, LayersToTransformAdaptsEveryExpertOfTheLayerAndNothingElse) {
  const std::vector<std::string> layer1{"layers.1.mlp.experts.0.w1", "layers.1.mlp.experts.1.w1"};
  for (const auto& pattern : {std::vector<std::string>{}, std::vector<std::string>{"layers"}}) {
    peft::PeftModel model = peft::get_peft_model(
        load_case("moe"), peft::LoraConfig().r(2).target_modules({"w1"}).layers_to_transform({1}).layers_pattern(pattern));
    EXPECT_EQ(targets_of(model), layer1);
    peft::PeftModel prefixed = peft::get_peft_model(
        load_case("moe_model"), peft::LoraConfig().r(2).target_modules({"w1"}).layers_to_transform({1}).layers_pattern(pattern));
    EXPECT_EQ(targets_of(prefixed), (std::vector<std::string>{"model." + layer1[0], "model." + layer1[1]}));
  }
  peft::PeftModel both = peft::get_peft_model(
      load_case("moe"), peft::LoraConfig().r(2).target_modules({"w2", "gate"}).layers_to_transform({0}));
  EXPECT_EQ(targets_of(both), (std::vector<std::string>{"layers.0.mlp.experts.0.w2", "layers.0.mlp.experts.1.w2",
                                                         "layers.0.mlp.gate"}));
}

// ----------------------------------------------- 3. fields that need not all match
TEST(TargetRules, ModulesToSaveWarnsAboutKeysThatMatchNothingWhileOneMatches) {
  std::string err = stderr_of([] {
    peft::PeftModel model = peft::get_peft_model(
        load_case("bert_cls"), peft::LoraConfig().r(4).target_modules({"query"}).modules_to_save({"classifier", "score"}));
    EXPECT_EQ(model.adapter("default").copies.size(), 2u);  // classifier.weight, classifier.bias
  });
  EXPECT_THAT(err, HasSubstr("modules_to_save score matched no module and is ignored"));
  expect_error<peft::TargetError>(
      [] { peft::get_peft_model(load_case("bert_cls"), peft::LoraConfig().target_modules({"query"}).modules_to_save({"score"})); },
      {"modules_to_save score matched no module", "bert.embeddings"});
}

TEST(TargetRules, AFileMayNameTargetsAndModulesThisModelLacksWhileOneMatches) {
  peft::PeftModel model = peft::get_peft_model(
      load_case("bert_cls"), peft::LoraConfig().r(4).target_modules({"query", "value"}).modules_to_save({"classifier"}));
  randomise(model, 0.2, /*seed=*/5);
  model.eval();
  const auto inputs = case_inputs("bert_cls");
  const torch::Tensor expected = run(model, inputs).detach();
  const fs::path dir = peft_test::fresh_dir("lenient_file");
  model.save_pretrained(dir);
  auto config = nlohmann::json::parse(peft::io::read_file(dir / "adapter_config.json"));
  config["task_type"] = "SEQ_CLS";
  config["modules_to_save"] = {"classifier", "score"};   // what HF writes for sequence classification
  config["target_modules"] = {"query", "value", "q_proj"};  // an architecture-wide default list
  peft::io::write_file_atomic(dir / "adapter_config.json", config.dump());
  std::string err = stderr_of([&] {
    peft::PeftModel loaded = peft::PeftModel::from_pretrained(load_case("bert_cls"), dir);
    loaded.eval();
    EXPECT_LT(max_diff(run(loaded, inputs), expected), 1e-6);
  });
  EXPECT_THAT(err, HasSubstr("modules_to_save score matched no module"));
  EXPECT_THAT(err, HasSubstr("target_modules pattern q_proj matched no module"));
  config["target_modules"] = {"q_proj"};  // none matches: a file for another model
  peft::io::write_file_atomic(dir / "adapter_config.json", config.dump());
  expect_error<peft::FileError>([&] { peft::PeftModel::from_pretrained(load_case("bert_cls"), dir); },
                                {"adapter_config.json", "adapter for a different model?", "'q_proj' matched no module"});
}

// ------------------------------------------------------ 4. per-module key maps
TEST(TargetRules, RankAndAlphaPatternKeysMustSelectATargetedModule) {
  auto cfg = peft::LoraConfig().r(4).lora_alpha(8).target_modules({"query", "value"});
  // The reported input: a typo built silently, every scaling 2.0.
  expect_error<peft::TargetError>(
      [&] { peft::get_peft_model(load_case("bert_cls"), peft::LoraConfig(cfg).alpha_pattern({{"q_porj_typo", 100.0}})); },
      {"LoraConfig.alpha_pattern", "q_porj_typo", "bert.encoder.layer.0.attention.self.query"});
  expect_error<peft::TargetError>(
      [&] { peft::get_peft_model(load_case("bert_cls"), peft::LoraConfig(cfg).rank_pattern({{"key", 2}})); },
      {"LoraConfig.rank_pattern", "'key'"});
  expect_error<peft::TargetError>(
      [&] { peft::get_peft_model(load_case("bert_cls"), peft::LoraConfig(cfg).slice_pattern({{"dense", {true, false}}})); },
      {"LoraConfig.slice_pattern", "dense"});
  peft::PeftModel ok = peft::get_peft_model(load_case("bert_cls"), peft::LoraConfig(cfg).alpha_pattern({{"query", 100.0}})
                                                                       .rank_pattern({{"layer\\.1\\..*value", 2}}));
  for (const auto& l : ok.adapter_layers()) {
    const bool query = l.target.find("query") != std::string::npos, v1 = l.target == "bert.encoder.layer.1.attention.self.value";
    EXPECT_DOUBLE_EQ(l.module.attr("scaling").toDouble(), query ? 25.0 : v1 ? 4.0 : 2.0) << l.target;
  }
  // From a file (HF's rule): a warning, and the file loads.
  const fs::path dir = peft_test::fresh_dir("pattern_keys");
  ok.save_pretrained(dir);
  auto config = nlohmann::json::parse(peft::io::read_file(dir / "adapter_config.json"));
  config["alpha_pattern"]["q_porj_typo"] = 100;
  peft::io::write_file_atomic(dir / "adapter_config.json", config.dump());
  const std::string err = stderr_of([&] { peft::PeftModel::from_pretrained(load_case("bert_cls"), dir); });
  EXPECT_THAT(err, HasSubstr("LoraConfig.alpha_pattern: key 'q_porj_typo' matches no targeted module and is ignored"));
}

// -------------------------------------------- 6. loading applies the rules of files
TEST(Loading, ARankAboveMinInOutIsAllowedAsInHfPeft) {
  // The reported input: r = 4 on an MoE router Linear(16, 2).
  const std::string err = stderr_of([] {
    peft::PeftModel model = peft::get_peft_model(load_case("moe"), peft::LoraConfig().r(4).target_modules({"gate"}));
    EXPECT_EQ(model.adapter_layers().front().module.attr("lora_A").toTensor().sizes(), (std::vector<int64_t>{4, 16}));
  });
  EXPECT_THAT(err, HasSubstr("LoraConfig target 'layers.0.mlp.gate': LoraOptions.r = 4 exceeds min(in=16, out=2)"));
  torch::nn::Linear gate(torch::nn::LinearOptions(16, 2).bias(false));
  peft::LoRALinear layer(gate, peft::LoraOptions(4).lora_alpha(8).init_lora_weights(peft::LoraInit::Random));
  torch::Tensor x = torch::randn({3, 16});
  torch::Tensor expected = torch::matmul(x, (gate->weight + 2.0 * torch::matmul(layer->lora_B, layer->lora_A)).t());
  EXPECT_LT(max_diff(layer(x), expected), 1e-5);
  expect_error<peft::OptionError>([&] { peft::LoRALinear(gate, peft::LoraOptions(4).init_lora_weights(peft::LoraInit::PiSSA)); },
                                  {"PiSSA needs LoraOptions.r <= min(in=16, out=2)"});
}

TEST(Loading, EveryErrorWhileLoadingIsAFileErrorNamingTheFile) {
  peft::PeftModel model = peft::get_peft_model(load_case("moe"), peft::LoraConfig().r(2).target_modules({"w1"}));
  const fs::path dir = peft_test::fresh_dir("load_errors");
  model.save_pretrained(dir);
  const std::string good = peft::io::read_file(dir / "adapter_config.json");
  auto with = [&](const char* key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(good);
    j[key] = value;
    peft::io::write_file_atomic(dir / "adapter_config.json", j.dump());
  };
  auto fails = [&](std::initializer_list<const char*> fragments) {
    expect_error<peft::FileError>([&] { peft::PeftModel::from_pretrained(load_case("moe"), dir); }, fragments);
  };
  with("lora_alpha", 0);  // an OptionError of the config rules, raised while loading
  fails({"adapter_config.json", "LoraOptions.lora_alpha must be finite and non-zero"});
  with("lora_dropout", 1.5);
  fails({"adapter_config.json", "LoraOptions.lora_dropout must be in [0, 1)"});
  with("lora_bias", true);  // HF fields that change the computation are refused, not ignored
  fails({"adapter_config.json", "'lora_bias' = true changes the computation"});
  with("target_parameters", nlohmann::json::array({"experts.w1"}));
  fails({"'target_parameters'"});
  with("layer_replication", nlohmann::json::array({nlohmann::json::array({0, 1})}));
  fails({"'layer_replication'"});
  // HF's bookkeeping and initialisation-only fields at any value load quietly.
  auto j = nlohmann::json::parse(good);
  j.update({{"peft_version", "0.21.2"}, {"lora_bias", false}, {"use_qalora", false}, {"qalora_group_size", 16},
            {"loftq_config", nlohmann::json::object()}, {"megatron_core", "megatron.core"}, {"eva_config", nullptr}});
  peft::io::write_file_atomic(dir / "adapter_config.json", j.dump());
  EXPECT_EQ(stderr_of([&] { peft::PeftModel::from_pretrained(load_case("moe"), dir); }), "");
}

// ---------------------------------------------------------------- 5. tied weights
struct TiedCase {
  std::vector<std::string> modules_to_save;
  bool keep_tied;
};

TEST(TiedWeights, MergeAndUnloadEqualsTheAdaptedModelForEveryTiedCombination) {
  const auto inputs = case_inputs("gpt2_tied");
  for (const TiedCase& c : {TiedCase{{"wte"}, false}, TiedCase{{"lm_head"}, false}, TiedCase{{"wte", "lm_head"}, false},
                            TiedCase{{"wte"}, true}, TiedCase{{"lm_head"}, true}, TiedCase{{"wte", "lm_head"}, true}}) {
    const std::string name = fmt::format("{} tied={}", peft::join_names(c.modules_to_save), c.keep_tied);
    torch::jit::Module base = load_case("gpt2_tied");
    const torch::Tensor wte = base.attr("transformer").toModule().attr("wte").toModule().attr("weight").toTensor();
    const torch::Tensor before = wte.clone();
    peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"c_attn"}).fan_in_fan_out(true)
                                                            .modules_to_save(c.modules_to_save).ensure_weight_tying(c.keep_tied));
    // One trained tensor however the tie is named; the tied slot follows it only with ensure_weight_tying.
    EXPECT_EQ(model.adapter("default").copies.size(), c.keep_tied ? 1u : c.modules_to_save.size()) << name;
    const auto [first, last] = train(model, inputs, 5);
    EXPECT_LT(last, first) << name;
    model.eval();
    torch::NoGradGuard no_grad;
    const torch::Tensor adapted = run(model, inputs);
    // 1e-5 relative to the logits' scale (~12): fp32 rounding of the merged sums, not the reported 5.9.
    const double tolerance = 1e-5 * std::max(1.0, adapted.abs().max().item<double>());
    const fs::path dir = peft_test::fresh_dir("tied");
    model.save_pretrained(dir);
    torch::jit::Module merged = model.merge_and_unload();
    EXPECT_LT(max_diff(run(merged, inputs), adapted), tolerance) << name;
    EXPECT_TRUE(torch::equal(wte, before)) << name << ": the trained copy was written through the tied storage";
    peft::PeftModel loaded = peft::PeftModel::from_pretrained(load_case("gpt2_tied"), dir);
    loaded.eval();
    EXPECT_LT(max_diff(run(loaded, inputs), adapted), tolerance) << name;
  }
}

TEST(TiedWeights, MergingIntoATiedWeightIsRefusedNotWrittenThrough) {
  torch::jit::Module base = load_case("gpt2_tied");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"lm_head"}).init_lora_weights(peft::LoraInit::Random));
  expect_error<peft::ModelError>([&] { model.merge_adapter(); },
                                 {"merging into 'lm_head.weight' would also change transformer.wte.weight", "tied"});
  EXPECT_FALSE(model.merged());
  peft::PeftModel ia3 = peft::get_peft_model(load_case("gpt2_tied"), peft::IA3Config().target_modules({"lm_head"}));
  expect_error<peft::ModelError>([&] { ia3.merge_adapter(); }, {"IA3", "transformer.wte.weight"});
}

// ---------------------------------------------------------- 7. combining adapters
TEST(CombinedAdapters, MergedEqualsUnmergedForEveryCombinationAccepted) {
  const auto ref = peft_test::load_reference("llama");
  auto lora = [](const std::vector<std::string>& targets, int64_t r) {
    return peft::LoraConfig().r(r).lora_alpha(2.0 * r).target_modules(targets).init_lora_weights(peft::LoraInit::Random);
  };
  struct Combo {
    std::string name;
    peft::PeftConfig a, b;
  };
  for (const Combo& c : {Combo{"two LoRA on one layer", lora({"q_proj", "v_proj"}, 2), lora({"q_proj", "o_proj"}, 4)},
                         Combo{"LoRA and DoRA on other layers", lora({"q_proj"}, 2), peft::LoraConfig(lora({"v_proj"}, 2)).use_dora(true)},
                         Combo{"LoRA and IA3 on other layers", lora({"q_proj"}, 2), peft::IA3Config().target_modules({"v_proj", "down_proj"})
                                                                                        .feedforward_modules({"down_proj"}).init_ia3_weights(false)}}) {
    peft::PeftModel model = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), c.a);
    model.add_adapter("b", c.b);
    model.set_adapter({"default", "b"});
    randomise(model, 0.2, /*seed=*/5);
    model.eval();
    torch::NoGradGuard no_grad;
    const torch::Tensor unmerged = run(model, ref.inputs);
    model.merge_adapter();
    EXPECT_LT(max_diff(run(model, ref.inputs), unmerged), 1e-5) << c.name;
    model.unmerge_adapter();
    EXPECT_LT(max_diff(run(model, ref.inputs), unmerged), 1e-5) << c.name;
  }
}

TEST(CombinedAdapters, RescalingAdaptersSharingALayerAreRefused) {
  const auto dora = peft::LoraConfig().r(2).use_dora(true).target_modules({"q_proj", "v_proj"});
  struct Refused {
    std::string name;
    peft::PeftConfig b;
    const char* rescaling;
  };
  for (const Refused& c : {Refused{"two DoRA", dora, "default, b"},
                           Refused{"DoRA and LoRA", peft::LoraConfig().r(2).target_modules({"v_proj"}), "default"},
                           Refused{"DoRA and IA3", peft::IA3Config().target_modules({"q_proj"}), "default, b"}}) {
    peft::PeftModel model = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), dora);
    model.add_adapter("b", c.b);
    expect_error<peft::OptionError>([&] { model.set_adapter({"default", "b"}); },
                                    {"adapters default, b all adapt 'model.layers.0.self_attn.", c.rescaling, "DoRA / IA3"});
    EXPECT_EQ(model.active_adapters(), std::vector<std::string>{"default"}) << c.name;
    model.set_adapter("b");  // one at a time stays fine
  }
  peft::PeftModel ia3_lora = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"),
                                                  peft::IA3Config().target_modules({"k_proj"}));
  ia3_lora.add_adapter("b", peft::LoraConfig().r(2).target_modules({"k_proj"}));
  expect_error<peft::OptionError>([&] { ia3_lora.set_adapter({"default", "b"}); }, {"'model.layers.0.self_attn.k_proj'"});
}

// ------------------------------------------- more of the same kinds (a reviewer's probes)
TEST(CombinedAdapters, AnInactiveAdaptersTrainedCopiesLeaveTheModel) {
  const auto inputs = case_inputs("mlp");
  torch::jit::Module plain = load_case("mlp");
  const torch::Tensor base_out = run(plain, inputs);
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1"}).modules_to_save({"head"}));
  randomise(model, 0.2, /*seed=*/5);
  model.add_adapter("b", peft::LoraConfig().r(2).target_modules({"fc2"}));  // B = 0: changes nothing
  model.set_adapter("b");
  model.eval();
  torch::NoGradGuard no_grad;
  EXPECT_LT(max_diff(run(model, inputs), base_out), 1e-6) << "adapter default's head copy still in use";
  torch::jit::Module merged = model.merge_and_unload();
  EXPECT_LT(max_diff(run(merged, inputs), base_out), 1e-6);
  // The same on a tied model: with the copy gone, LoRA on lm_head meets the tie and is refused.
  peft::PeftModel tied = peft::get_peft_model(load_case("tied_lm"), peft::LoraConfig().r(2).target_modules({"fc"}).modules_to_save({"wte"}));
  tied.add_adapter("b", peft::LoraConfig().r(2).target_modules({"lm_head"}));
  tied.set_adapter("b");
  expect_error<peft::ModelError>([&] { tied.merge_and_unload(); }, {"'lm_head.weight' would also change wte.weight"});
  tied.set_adapter({"default", "b"});  // the base's lm_head and wte still share storage: refused as well
  expect_error<peft::ModelError>([&] { tied.merge_adapter(); }, {"'lm_head.weight' would also change wte.weight"});
  const auto mixed = [&] { model.unmerge_adapter(); model.forward(inputs, {"default"}); };
  expect_error<peft::OptionError>(mixed, {"adapter 'default' trains whole tensors (head.weight"});
}

TEST(CombinedAdapters, AnAdapterThatFailsToAddLeavesTheOthersAsTheyWere) {
  const auto inputs = case_inputs("mlp");
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1"}));
  randomise(model, 0.2, /*seed=*/5);
  model.eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor before = run(model, inputs);
  expect_error<peft::TargetError>(  // a bottleneck adapter rebuilds the adapted model first
      [&] { model.add_adapter("b", peft::BottleneckConfig().bottleneck_size(2).target_modules({"fc9"})); }, {"'fc9'"});
  expect_error<peft::TargetError>([&] { model.add_adapter("c", peft::LoraConfig().target_modules({"fc9"})); }, {"'fc9'"});
  EXPECT_EQ(model.adapter_names(), std::vector<std::string>{"default"});
  EXPECT_LT(max_diff(run(model, inputs), before), 1e-7);
  model.add_adapter("c", peft::LoraConfig().r(2).target_modules({"fc2"}));  // the name is free again
  EXPECT_EQ(model.adapter_names(), (std::vector<std::string>{"default", "c"}));
  EXPECT_LT(max_diff(run(model, inputs), before), 1e-7);
}

TEST(TargetRules, BadRegexesAreTypedErrorsNamingTheField) {
  EXPECT_EQ(peft::layer_index("model.layers.3.q", {"(layers)"}), 3);  // a pattern's own group is not the index
  EXPECT_EQ(peft::layer_index("model.layers.3", {"layers"}), 3);       // the layer module itself
  expect_error<peft::OptionError>([] { peft::layer_index("layers.1.q", {"layers("}); }, {"layers_pattern", "'layers('"});
  expect_error<peft::OptionError>(
      [] { peft::get_peft_model(load_case("mlp"), peft::LoraConfig().target_modules({"fc1"}).rank_pattern({{"fc[", 4}})); },
      {"rank_pattern / alpha_pattern key 'fc['"});
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1"}));
  const fs::path dir = peft_test::fresh_dir("bad_regex_file");
  model.save_pretrained(dir);
  auto config = nlohmann::json::parse(peft::io::read_file(dir / "adapter_config.json"));
  for (const char* field : {"target_modules", "exclude_modules"}) {
    auto bad = config;
    bad[field] = "fc[";
    peft::io::write_file_atomic(dir / "adapter_config.json", bad.dump());
    expect_error<peft::FileError>([&] { peft::PeftModel::from_pretrained(load_case("mlp"), dir); },
                                  {"adapter_config.json", "'fc[' is not a valid regex"});
  }
}

TEST(TargetRules, QLoRAKeepsModulesToSaveDenseAndRefusesCopiesOfNF4Weights) {
  peft::PeftModel model = peft::get_peft_model(
      load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1", "fc2"}).modules_to_save({"fc2"}).quantize_base(peft::NF4Config()));
  for (const auto& [name, t] : model.named_trainable_parameters()) {
    if (name == "fc2.weight") {
      EXPECT_EQ(t.numel(), 36 * 7) << "fc2 was quantised and its copy is empty";
    }
  }
  expect_error<peft::ModelError>(
      [&] { model.add_adapter("b", peft::LoraConfig().r(2).target_modules({"fc2"}).modules_to_save({"fc1"})); },
      {"'fc1.weight' is NF4-quantised (QLoRA)"});
  expect_error<peft::ModelError>([&] { model.add_adapter("c", peft::BottleneckConfig().bottleneck_size(2).target_modules({"fc2"})); },
                                 {"forward calls no submodules (QLoRA's quantize_base inlines it)"});
  EXPECT_EQ(model.adapter_names(), std::vector<std::string>{"default"});
}

// ------------------------------------------------------- the real HF peft (PyPI)
/// Tensors a reference script wrote (safetensors: written by torch 2.x, read by any LibTorch).
std::map<std::string, torch::Tensor> read_io(const fs::path& case_dir) {
  return peft::io::load_safetensors(case_dir / "io.safetensors").tensors;
}

std::vector<torch::jit::IValue> io_inputs(const std::map<std::string, torch::Tensor>& io) {
  std::vector<torch::jit::IValue> inputs;
  for (int i = 0; io.count("input_" + std::to_string(i)); ++i) inputs.emplace_back(io.at("input_" + std::to_string(i)));
  return inputs;
}

class RealHfPeft : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (peft_test::reference_python().empty()) return;
    // One folder per process: ctest -j runs this suite's tests side by side, each setting the suite up.
    dir_ = new fs::path(peft_test::fresh_dir("hf_cases_" + std::to_string(::getpid())));
    status_ = peft_test::run_reference_tool("reference/hf_cases.py " + dir_->string());
  }
  static void TearDownTestSuite() {
    if (dir_) fs::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    PEFT_REQUIRE_REFERENCE_PYTHON();
    ASSERT_EQ(status_, 0) << "tools/reference/hf_cases.py failed";
  }

  /// Loads HF's adapter `name` onto `model_case` and checks both outputs against HF's (1e-5).
  static void expect_same_as_hf(const std::string& name, const std::string& model_case) {
    const auto io = read_io(*dir_ / name);
    const auto inputs = io_inputs(io);
    peft::PeftModel model = peft::PeftModel::from_pretrained(load_case(model_case), *dir_ / name);
    model.eval();
    torch::NoGradGuard no_grad;
    EXPECT_LT(max_diff(run(model, inputs), io.at("expected")), 1e-5) << name;
    torch::jit::Module merged = model.merge_and_unload();
    EXPECT_LT(max_diff(run(merged, inputs), io.at("expected_merged")), 1e-5) << name;
  }

  static fs::path* dir_;
  static int status_;
};
fs::path* RealHfPeft::dir_ = nullptr;
int RealHfPeft::status_ = -1;

TEST_F(RealHfPeft, SequenceClassificationFileNamingClassifierAndScoreLoads) {
  expect_same_as_hf("seq_cls", "bert_cls");  // modules_to_save ["classifier", "score"], as HF writes it
}

TEST_F(RealHfPeft, RankAboveMinInOutOnARouterLoads) { expect_same_as_hf("router_r4", "moe"); }

TEST_F(RealHfPeft, TiedModulesToSaveAndMergeLikeHf) { expect_same_as_hf("tied_wte", "tied_lm"); }

TEST_F(RealHfPeft, TwoHfDoraAdaptersReproduceHfAloneAndAreRefusedTogether) {
  const auto io = read_io(*dir_ / "two_dora");
  const std::vector<torch::jit::IValue> inputs{io.at("input_0")};
  peft::PeftModel model = peft::PeftModel::from_pretrained(peft_test::load_fixture("llama", "scripted"), *dir_ / "two_dora");
  model.load_adapter(*dir_ / "two_dora" / "b", "b");
  model.eval();
  torch::NoGradGuard no_grad;
  for (const std::string name : {"default", "b"}) {
    model.set_adapter(name);
    EXPECT_LT(max_diff(run(model, inputs), io.at("expected_" + name)), 1e-5) << name;
  }
  // The report: both active gave an order-dependent result, merged != unmerged.
  expect_error<peft::OptionError>([&] { model.set_adapter({"default", "b"}); },
                                  {"adapters default, b all adapt 'model.layers.0.self_attn.q_proj'", "DoRA / IA3"});
}

TEST_F(RealHfPeft, LayersToTransformSelectsWhatHfSelects) {
  const auto hf = nlohmann::json::parse(peft::io::read_file(*dir_ / "layer_index" / "targets.json"));
  const std::map<std::string, peft::LoraConfig> configs{
      {"w1_layer1", peft::LoraConfig().r(2).target_modules({"w1"}).layers_to_transform({1})},
      {"w1_layer1_pattern", peft::LoraConfig().r(2).target_modules({"w1"}).layers_to_transform({1}).layers_pattern({"layers"})},
      {"w2_layer0", peft::LoraConfig().r(2).target_modules({"w2", "gate"}).layers_to_transform({0})}};
  for (const auto& [key, config] : configs) {
    peft::PeftModel model = peft::get_peft_model(load_case("moe_model"), config);
    EXPECT_EQ(targets_of(model), hf.at(key).get<std::vector<std::string>>()) << key;
  }
}

// ------------------------------------------------ 8. a new user's path (issue 18)
/// Runs `fn` with `dir` as the working directory (the snippets use relative paths).
template <typename Fn>
void in_directory(const fs::path& dir, Fn&& fn) {
  struct Back {
    fs::path to;
    ~Back() { fs::current_path(to); }
  } back{fs::current_path()};
  fs::current_path(dir);
  fn();
}

/// The exact message of the peft::Error `fn` throws ("" if none, "other: ..." for another type).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const peft::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("other: ") + e.what();
  }
  return "";
}

TEST(NewUser, QuickStartAsWrittenTrainsTheHeadAndTheAdapter) {
  const fs::path dir = peft_test::fresh_dir("quick_start");
  fs::copy_file(peft_test::fixture_path("bert_cls", "scripted"), dir / "model.pt");
  torch::manual_seed(0);
  const torch::Tensor ids = torch::randint(100, {16, 6});  // the fixture's vocabulary: 100
  const torch::Tensor mask = torch::ones({16, 6}, torch::kLong);
  const torch::Tensor labels = ids.select(1, 0).remainder(2);  // from the first token: a linear head can learn it
  in_directory(dir, [&] { peft_snippets::quick_start::run(ids, mask, labels); });

  torch::jit::Module base = torch::jit::load((dir / "model.pt").string());
  base.eval();
  auto accuracy = [&](const torch::Tensor& logits) {
    return logits.argmax(-1).eq(labels).to(torch::kFloat).mean().item<double>();
  };
  torch::NoGradGuard no_grad;
  const double before = accuracy(run(base, {ids, mask}));
  peft::PeftModel reloaded = peft::PeftModel::from_pretrained(base, dir / "adapter");
  reloaded.eval();
  EXPECT_GE(accuracy(run(reloaded, {ids, mask})), 0.9) << "before: " << before;
  // The head trained and travels in the adapter file (modules_to_save).
  const auto file = peft::io::load_safetensors(dir / "adapter" / "adapter_model.safetensors");
  const torch::Tensor head = base.attr("classifier").toModule().attr("weight").toTensor();
  bool saved_head = false;
  for (const auto& [key, value] : file.tensors)
    if (key.find("classifier") != std::string::npos && key.find("weight") != std::string::npos) {
      saved_head = true;
      EXPECT_FALSE(torch::equal(value, head)) << key << " did not train";
    }
  EXPECT_TRUE(saved_head);
}

/// The plain model the native recipe's checkpoint comes from: torch::nn::Linear members.
struct PlainNetImpl : torch::nn::Module {
  PlainNetImpl() : fc1(register_module("fc1", torch::nn::Linear(16, 32))), fc2(register_module("fc2", torch::nn::Linear(32, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(PlainNet);

TEST(NewUser, NativeRecipeLoadsAPlainCheckpointThenAddsLoRA) {
  using peft_snippets::native_recipe::Net;
  const fs::path dir = peft_test::fresh_dir("native_recipe");
  torch::manual_seed(0);
  PlainNet plain;
  torch::save(plain, (dir / "base.pt").string());
  const torch::Tensor x = torch::randn({64, 16}), y = x.select(1, 0).gt(0).to(torch::kLong);
  in_directory(dir, [&] { peft_snippets::native_recipe::fine_tune(x, y); });

  Net adapted;
  torch::load(adapted, (dir / "base.pt").string());
  peft::nn::PeftModel model = peft::nn::PeftModel::from_pretrained(adapted.ptr(), dir / "adapter");
  model.eval();
  const auto loaded = adapted->named_parameters(), original = plain->named_parameters();
  EXPECT_TRUE(torch::equal(loaded["fc1.weight"], original["fc1.weight"]));
  EXPECT_TRUE(torch::equal(loaded["fc2.bias"], original["fc2.bias"]));
  EXPECT_TRUE(loaded.contains("fc1.default.lora_A"));
  torch::NoGradGuard no_grad;
  const double base_loss = torch::nn::functional::cross_entropy(plain->forward(x), y).item<double>();
  const double adapted_loss = torch::nn::functional::cross_entropy(adapted->forward(x), y).item<double>();
  EXPECT_LT(adapted_loss, 0.5 * base_loss) << base_loss;
}

TEST(NewUser, TrainingWhileMergedSaysWhatToCall) {
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1"}));
  const auto inputs = case_inputs("mlp");
  model.merge_adapter();
  model.train();
  EXPECT_EQ(error_of([&] { run(model, inputs).sum().backward(); }),
            "adapter 'default' is merged into the base weights, so its parameters get no gradient: call "
            "unmerge_adapter() before training (or eval() / torch::NoGradGuard for inference)");
  model.unmerge_adapter();
  run(model, inputs).sum().backward();  // trains again
  model.merge_adapter();
  model.eval();
  const torch::Tensor merged = run(model, inputs);  // inference: nothing added
  EXPECT_FALSE(merged.requires_grad());

  peft::LoRALinear layer(torch::nn::Linear(4, 3), peft::LoraOptions(2));
  layer->merge();
  EXPECT_EQ(error_of([&] { layer(torch::randn({2, 4})).sum().backward(); }),
            "LoRALinear is merged into its base weight, so its parameters (lora_A, lora_B) get no gradient: call "
            "unmerge() before training (or eval() / torch::NoGradGuard for inference)");
  peft::IA3 ia3(torch::nn::Linear(4, 3));
  ia3->merge();
  EXPECT_EQ(error_of([&] { ia3(torch::randn({2, 4})).sum().backward(); }),
            "IA3 is merged into its base weight, so its parameters (ia3_l) get no gradient: call unmerge() before "
            "training (or eval() / torch::NoGradGuard for inference)");
}

TEST(NewUser, TrainingForwardsRunEagerlyUnlessTheProgramChose) {
  auto& choice = peft::jit::detail::graph_optimization_choice();
  const int chosen = choice;
  choice = -1;
  torch::jit::setGraphExecutorOptimize(true);
  auto optimised_inside = [](bool training) {
    const peft::jit::EagerTrainingScope scope(training);
    return torch::jit::getGraphExecutorOptimize();
  };
  EXPECT_FALSE(optimised_inside(true));
  EXPECT_TRUE(torch::jit::getGraphExecutorOptimize());  // restored
  EXPECT_TRUE(optimised_inside(false));                 // inference keeps the executor
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(optimised_inside(true));
  }
  peft::jit::set_graph_optimization(true);  // the program's choice wins
  EXPECT_TRUE(optimised_inside(true));
  choice = chosen;
}

TEST(NewUser, WarningsGoThroughLibTorchsMechanism) {
  std::vector<std::string> messages;
  const std::string printed = stderr_of([&] {
    const peft::CapturedWarnings captured;
    peft::get_peft_model(peft_test::load_fixture("gpt2", "scripted"), peft::LoraConfig().r(2).target_modules({"c_attn"}));
    messages = captured.messages();
  });
  EXPECT_EQ(printed, "");
  EXPECT_THAT(messages, ::testing::ElementsAre("peft: LoraConfig.fan_in_fan_out=false does not fit "
                                               "transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn; using the "
                                               "layout the graph shows"));
}

TEST(NewUser, AdapterPathMistakesSayWhatTheFileIs) {
  const fs::path dir = peft_test::fresh_dir("path_mistakes");
  peft::PeftModel model = peft::get_peft_model(load_case("mlp"), peft::LoraConfig().r(2).target_modules({"fc1"}));
  model.save_pretrained(dir / "adapter");
  const fs::path weights = dir / "adapter" / "adapter_model.safetensors";
  auto load = [&](const fs::path& path) { return error_of([&] { peft::PeftModel::from_pretrained(load_case("mlp"), path); }); };
  EXPECT_EQ(load(weights), "'" + weights.string() +
                               "' is a file; expected the adapter directory (holding adapter_config.json and "
                               "adapter_model.safetensors)");
  EXPECT_EQ(load(dir / "nope"), "adapter directory '" + (dir / "nope").string() + "' does not exist");
  auto write = [&](const std::string& text) { std::ofstream(weights, std::ios::binary) << text; };
  write("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 5432\n");
  EXPECT_EQ(load(dir / "adapter"), "'" + weights.string() +
                                       "' is a git-lfs pointer, not the safetensors file: fetch the real file (git lfs pull)");
  write("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n");
  EXPECT_EQ(load(dir / "adapter"), "'" + weights.string() +
                                       "' is an HTML/XML page, not a safetensors file: the download returned a web page");
  write("{\"error\": \"Repository not found\"}");
  EXPECT_EQ(load(dir / "adapter"), "'" + weights.string() + "' is JSON text, not a safetensors file");
  write(std::string("PK\x03\x04", 4) + "archive/data.pkl");  // torch.save's zip format
  EXPECT_EQ(load(dir / "adapter"), "'" + weights.string() +
                                       "' is a PyTorch/pickle or zip archive (torch.save), not a safetensors file");
  write("\n\n  <html lang=\"en\"><body>Not Found</body></html>");  // leading blank lines, lower case
  EXPECT_EQ(load(dir / "adapter"), "'" + weights.string() +
                                       "' is an HTML/XML page, not a safetensors file: the download returned a web page");
}

}  // namespace
