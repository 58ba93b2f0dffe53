// Adapter files (safetensors, HF peft layout), several adapters per model,
// checkpoints, and saves that survive a killed process.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "fixtures.h"

namespace {

using peft_test::run;
using peft_test::randomise;

using peft_test::expect_error;

namespace fs = std::filesystem;

using peft_test::fresh_dir;




// ------------------------------------------------------------ safetensors
TEST(Safetensors, RoundTripsEveryDtype) {
  std::map<std::string, torch::Tensor> tensors{
      {"f64", torch::randn({2, 3}, torch::kFloat64)}, {"f32", torch::randn({5})},
      {"f16", torch::randn({4}).to(torch::kFloat16)}, {"bf16", torch::randn({3}).to(torch::kBFloat16)},
      {"i64", torch::arange(4)},                      {"i32", torch::arange(3, torch::kInt32)},
      {"i16", torch::arange(2, torch::kInt16)},       {"i8", torch::arange(2, torch::kInt8)},
      {"u8", torch::arange(2, torch::kUInt8)},        {"bool", torch::tensor({true, false})},
      {"empty", torch::zeros({0, 3})}};
  const std::string bytes = peft::io::to_safetensors(tensors);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  EXPECT_EQ(header % 8, 0u);
  auto file = peft::io::from_safetensors(bytes, "memory");
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) EXPECT_TRUE(torch::equal(file.tensors.at(name), t)) << name;
}

/// A valid file whose header is replaced by `json` (data: 8 bytes).
std::string with_header(const std::string& json, size_t data = 8) {
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  return out + json + std::string(data, '\0');
}

TEST(Safetensors, RejectsEveryMalformedFile) {
  const std::string good = peft::io::to_safetensors({{"w", torch::ones({2})}});
  auto rejects = [](const std::string& bytes, const char* fragment) {
    expect_error<peft::FileError>([&] { peft::io::from_safetensors(bytes, "bad.safetensors"); }, {"bad.safetensors", fragment});
  };
  rejects(good.substr(0, 5), "too short");
  rejects(good.substr(0, good.size() - 1), "fall outside");                      // truncated data
  rejects(std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "exceeds");  // oversized header
  rejects(with_header("{not json"), "not valid JSON");
  rejects(with_header("[1, 2]"), "not a JSON object");
  rejects(with_header(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"),
          "'w' appears twice");
  rejects(with_header(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})"), "unknown dtype");
  rejects(with_header(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})"), "needs 12");
  rejects(with_header(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}})"), "bad dimension");
  rejects(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})"),
          "overlap");
  rejects(with_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})"), "not covered");
  rejects(with_header(R"({"w":{"dtype":"F32","shape":[2]}})"), "needs dtype, shape and data_offsets");
  rejects(with_header(R"({"__metadata__":{"format":1}})", 0), "not a string");
  expect_error<peft::FileError>([&] { peft::io::load_safetensors("/nonexistent/x.safetensors"); }, {"/nonexistent/x.safetensors"});
}

// ---------------------------------------------------------- HF peft layout
struct Case {
  std::string arch, method;
  peft::PeftConfig config;
};

std::vector<Case> file_cases() {
  return {{"gpt2", "lora", peft::LoraConfig().r(4).lora_alpha(8).target_modules({"c_attn", "c_fc"}).fan_in_fan_out(true).modules_to_save({"lm_head"})},
          {"llama", "dora", peft::LoraConfig().r(2).use_dora(true).use_rslora(true).target_modules({"q_proj", "v_proj"})},
          {"bert", "ia3", peft::IA3Config().target_modules({"key", "value", "output.dense"}).feedforward_modules({"output.dense"})},
          {"bert", "adapter", peft::BottleneckConfig().target_modules("encoder\\.layer\\.\\d+\\.attention").bottleneck_size(8)},
          {"bert", "bitfit", peft::BitFitConfig().norm(true)},
          {"llama", "prompt", peft::PromptTuningConfig().num_virtual_tokens(3)},
          {"gpt2", "prefix", peft::PrefixTuningConfig().num_virtual_tokens(2).prefix_projection(true).encoder_hidden_size(8)},
          {"gpt2", "vera", peft::VeraConfig().r(4).target_modules({"c_attn", "c_fc"}).projection_prng_key(3)},
          {"llama", "vera", peft::VeraConfig().r(4).target_modules({"q_proj", "v_proj"}).modules_to_save({"lm_head"})}};
}

TEST(Pretrained, EveryMethodRoundTripsAndPythonSeesHfLayout) {
  fs::path root = fresh_dir("roundtrip"), for_python = fresh_dir("for_python");
  for (const auto& c : file_cases()) {
    auto base = peft_test::load_fixture(c.arch, "scripted");
    auto ref = peft_test::load_reference(c.arch);
    peft::PeftModel model = peft::get_peft_model(base, c.config);
    randomise(model);
    model.eval();
    torch::NoGradGuard no_grad;
    torch::Tensor expected = run(model, ref.inputs);
    fs::path dir = root / (c.arch + "_" + c.method);
    model.save_pretrained(dir);
    ASSERT_TRUE(fs::exists(dir / "adapter_config.json") && fs::exists(dir / "adapter_model.safetensors"));
    peft::PeftModel loaded = peft::PeftModel::from_pretrained(peft_test::load_fixture(c.arch, "scripted"), dir);
    loaded.eval();
    EXPECT_TRUE(torch::allclose(run(loaded, ref.inputs), expected, 1e-6, 1e-6)) << c.method;
    if (c.method == "dora" || c.method == "adapter" || c.method == "bitfit") continue;  // HF lacks these or their layout
    fs::copy(dir, for_python / (c.arch + "_" + c.method));
    peft_test::save_io(for_python / (c.arch + "_" + c.method) / "io.pt", ref.inputs, expected);
  }
  EXPECT_EQ(peft_test::run_python_tool("check_hf_format.py verify " + for_python.string()), 0);
}

/// The inputs and outputs Python wrote in `case_dir`: io.safetensors (the reference
/// venv's torch 2.x, whose TorchScript files LibTorch 1.13 cannot read) or io.pt.
std::map<std::string, torch::Tensor> python_io(const fs::path& case_dir) {
  if (fs::exists(case_dir / "io.safetensors")) return peft::io::load_safetensors(case_dir / "io.safetensors").tensors;
  std::map<std::string, torch::Tensor> out;
  for (const auto& b : torch::jit::load((case_dir / "io.pt").string()).named_buffers()) out[b.name] = b.value;
  return out;
}

/// Loads the adapter Python wrote in `case_dir` (named <arch>_<method>) onto the
/// fixture and compares with the outputs Python computed, 1e-5.
void expect_reproduces_python(const fs::path& case_dir, const std::string& kind) {
  const std::string name = case_dir.filename().string();
  const std::string arch = name.substr(0, name.find('_'));
  peft::PeftModel model = peft::PeftModel::from_pretrained(peft_test::load_fixture(arch, kind), case_dir);
  model.eval();
  const auto io = python_io(case_dir);
  std::vector<torch::jit::IValue> inputs{io.at("input_0")};
  if (io.count("input_1")) inputs.push_back(io.at("input_1"));
  torch::NoGradGuard no_grad;
  torch::Tensor out = run(model, inputs), expected = io.at("expected");
  EXPECT_TRUE(torch::allclose(out, expected, 1e-5, 1e-5)) << name << " max |diff| " << (out - expected).abs().max().item<double>();
}

TEST(Pretrained, LoadsFilesWrittenInHfLayoutByPython) {
  fs::path dir = fresh_dir("from_python");
  ASSERT_EQ(peft_test::run_python_tool("check_hf_format.py write " + dir.string(),
                                       std::string("PEFT_FIXTURE_DIR=") + PEFT_FIXTURE_DIR),
            0);
  for (const std::string name : {"gpt2_lora", "llama_lora", "bert_ia3"}) {
    expect_reproduces_python(dir / name, "traced");
  }
}

/// Against the real HF peft (the reference venv, scripts/reference_tests.sh): HF
/// loads what C++ saves, C++ loads what HF saves.
TEST(RealHfPeftFiles, HfLoadsOurFilesAndWeLoadTheirs) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  fs::path ours = fresh_dir("for_real_peft"), theirs = fresh_dir("from_real_peft");
  for (const auto& c : file_cases()) {
    if (c.arch == "gpt2" || c.method == "adapter" || c.method == "bitfit" || c.method == "prompt") continue;
    peft::PeftModel model = peft::get_peft_model(peft_test::load_fixture(c.arch, "scripted"), c.config);
    randomise(model);
    model.eval();
    torch::NoGradGuard no_grad;
    const auto ref = peft_test::load_reference(c.arch);
    model.save_pretrained(ours / (c.arch + "_" + c.method));
    peft_test::save_io(ours / (c.arch + "_" + c.method) / "io.pt", ref.inputs, run(model, ref.inputs));
  }
  EXPECT_EQ(peft_test::run_reference_tool("check_real_peft.py verify " + ours.string()), 0);
  ASSERT_EQ(peft_test::run_reference_tool("check_real_peft.py write " + theirs.string()), 0);
  for (const std::string name : {"llama_lora", "llama_dora", "bert_ia3"}) {
    expect_reproduces_python(theirs / name, "scripted");
  }
}

TEST(Pretrained, NamedAdaptersGoToSubfolders) {
  fs::path dir = fresh_dir("subfolders");
  auto base = peft_test::load_fixture("llama", "scripted");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"q_proj"}));
  model.add_adapter("style", peft::IA3Config().target_modules({"v_proj"}));
  model.save_pretrained(dir);
  EXPECT_TRUE(fs::exists(dir / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(dir / "style" / "adapter_model.safetensors"));
  peft::PeftModel loaded = peft::PeftModel::from_pretrained(peft_test::load_fixture("llama", "scripted"), dir);
  loaded.load_adapter(dir / "style", "style");
  EXPECT_EQ(loaded.adapter_names(), (std::vector<std::string>{"default", "style"}));
}

TEST(Pretrained, BadFilesRaiseFileErrorsNamingTheCulprit) {
  fs::path dir = fresh_dir("bad");
  auto base = peft_test::load_fixture("llama", "scripted");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"q_proj", "v_proj"}));
  model.save_pretrained(dir);
  const std::string config = peft::io::read_file(dir / "adapter_config.json");
  auto load = [&] { peft::PeftModel::from_pretrained(peft_test::load_fixture("llama", "scripted"), dir); };
  auto with_config = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(config);
    edit(j);
    peft::io::write_file_atomic(dir / "adapter_config.json", j.dump());
  };
  with_config([](nlohmann::json& j) { j.erase("r"); });
  expect_error<peft::FileError>(load, {"adapter_config.json", "required field 'r'"});
  with_config([](nlohmann::json& j) { j["r"] = "two"; });
  expect_error<peft::FileError>(load, {"field 'r' has the wrong type"});
  with_config([](nlohmann::json& j) { j["peft_type"] = "LOHA"; });
  expect_error<peft::FileError>(load, {"peft_type 'LOHA' is not supported (", "LORA", "VERA", "BOTTLENECK"});
  with_config([](nlohmann::json& j) { j["future_field"] = 3; });  // HF adds fields every release: a warning
  EXPECT_NO_THROW(load());
  with_config([](nlohmann::json& j) { j["r"] = 4; });
  expect_error<peft::FileError>(load, {"lora_A.weight", "has shape [2, 64], this model needs [4, 64]", "different model"});
  with_config([](nlohmann::json& j) { j["target_modules"] = {"q_proj"}; });
  expect_error<peft::FileError>(load, {"v_proj.lora_A.weight", "matches no module"});
  with_config([](nlohmann::json& j) { j["target_modules"] = {"q_proj", "v_proj", "k_proj"}; });
  expect_error<peft::FileError>(load, {"k_proj.lora_A.weight", "is missing"});
  peft::io::write_file_atomic(dir / "adapter_config.json", "{\"peft_type\": ");
  expect_error<peft::FileError>(load, {"adapter_config.json", "not valid JSON"});
  peft::io::write_file_atomic(dir / "adapter_config.json", config);
  std::string weights = peft::io::read_file(dir / "adapter_model.safetensors");
  peft::io::write_file_atomic(dir / "adapter_model.safetensors", weights.substr(0, weights.size() / 2));
  expect_error<peft::FileError>(load, {"adapter_model.safetensors"});
  // A gpt2 adapter on the llama base: a different model.
  fs::path gpt2_dir = fresh_dir("bad_gpt2");
  peft::get_peft_model(peft_test::load_fixture("gpt2", "scripted"), peft::LoraConfig().r(2).target_modules({"c_attn"})).save_pretrained(gpt2_dir);
  expect_error<peft::FileError>([&] { peft::PeftModel::from_pretrained(peft_test::load_fixture("llama", "scripted"), gpt2_dir); },
                                {"adapter_config.json", "adapter for a different model", "'c_attn' matched no module"});
}

// --------------------------------------------------------- several adapters
TEST(MultipleAdapters, SetDeleteAndSumOfActiveAdapters) {
  auto base = peft_test::load_fixture("gpt2", "scripted");
  auto ref = peft_test::load_reference("gpt2");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"c_attn"}).fan_in_fan_out(true), "a");
  model.add_adapter("b", peft::LoraConfig().r(3).target_modules({"c_attn", "c_fc"}).fan_in_fan_out(true));
  EXPECT_EQ(model.active_adapters(), (std::vector<std::string>{"a"}));
  randomise(model);
  model.set_adapter("b");
  randomise(model);
  model.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor base_out = base.forward(ref.inputs).toTensor();
  model.set_adapter("a");
  torch::Tensor a = run(model, ref.inputs);
  model.set_adapter("b");
  torch::Tensor b = run(model, ref.inputs);
  model.set_adapter({"a", "b"});
  torch::Tensor both = run(model, ref.inputs);
  EXPECT_FALSE(torch::allclose(a, b));
  // LoRA updates on different layers add up only approximately through the
  // network, so compare the merged weights instead: merging both = sum of deltas.
  auto W0 = peft::jit::base_tensor(base, "transformer.h.0.attn.c_attn", "weight").clone();
  model.merge_adapter();
  auto merged_both = peft::jit::base_tensor(base, "transformer.h.0.attn.c_attn", "weight").clone();
  EXPECT_TRUE(torch::allclose(run(model, ref.inputs), both, 1e-5, 1e-5));
  model.unmerge_adapter();
  model.set_adapter("a");
  model.merge_adapter();
  auto merged_a = peft::jit::base_tensor(base, "transformer.h.0.attn.c_attn", "weight").clone();
  model.unmerge_adapter();
  model.set_adapter("b");
  model.merge_adapter();
  auto merged_b = peft::jit::base_tensor(base, "transformer.h.0.attn.c_attn", "weight").clone();
  model.unmerge_adapter();
  EXPECT_TRUE(torch::allclose(merged_both - W0, (merged_a - W0) + (merged_b - W0), 1e-6, 1e-6));

  model.set_adapter({"a", "b"});
  model.delete_adapter("a");
  EXPECT_EQ(model.adapter_names(), (std::vector<std::string>{"b"}));
  EXPECT_EQ(model.active_adapters(), (std::vector<std::string>{"b"}));
  // (merging and unmerging above left fp rounding in the base weights)
  EXPECT_TRUE(torch::allclose(run(model, ref.inputs), b, 1e-5, 1e-5)) << "b must keep its tensors through the rebuild";
  EXPECT_TRUE(torch::allclose(base.forward(ref.inputs).toTensor(), base_out, 1e-5, 1e-5));
  expect_error<peft::OptionError>([&] { model.set_adapter("a"); }, {"no adapter named 'a'", "b"});
  expect_error<peft::OptionError>([&] { model.add_adapter("b", peft::LoraConfig().target_modules({"c_attn"})); }, {"already exists"});
}

TEST(MultipleAdapters, WeightedCombinations) {
  auto base = peft_test::load_fixture("llama", "scripted");
  auto cfg = peft::LoraConfig().r(2).lora_alpha(4).target_modules({"q_proj", "v_proj"});
  peft::PeftModel model = peft::get_peft_model(base, cfg, "a");
  model.add_adapter("b", peft::LoraConfig(cfg).r(3).lora_alpha(3));
  model.set_adapter({"a", "b"});
  randomise(model, 0.3);
  const std::string target = "model.layers.0.self_attn.q_proj";
  auto delta = [&](const std::string& name) {
    for (const auto& l : model.adapter_layers(name))
      if (l.target == target)
        return (torch::matmul(l.module.attr("lora_B").toTensor(), l.module.attr("lora_A").toTensor()) *
                l.module.attr("scaling").toDouble()).detach();
    return torch::Tensor();
  };
  const torch::Tensor expected = 0.7 * delta("a") + 0.4 * delta("b");
  peft::add_weighted_adapter(model, {"a", "b"}, {0.7, 0.4}, "cat", peft::Combination::Cat);
  EXPECT_TRUE(torch::allclose(delta("cat"), expected, 1e-5, 1e-5)) << "cat is exact";
  peft::add_weighted_adapter(model, {"a", "b"}, {0.7, 0.4}, "svd", peft::Combination::SVD, /*svd_rank=*/5);
  EXPECT_TRUE(torch::allclose(delta("svd"), expected, 1e-4, 1e-4)) << "rank 5 covers the rank-5 sum";
  expect_error<peft::OptionError>([&] { peft::add_weighted_adapter(model, {"a", "b"}, {1, 1}, "lin", peft::Combination::Linear); },
                                  {"equal ranks"});
  peft::add_weighted_adapter(model, {"a"}, {0.5}, "lin", peft::Combination::Linear);
  EXPECT_TRUE(torch::allclose(delta("lin"), 0.5 * delta("a"), 1e-5, 1e-5));
}

TEST(MultipleAdapters, MixedBatchSlicesEqualEachAdapterAlone) {
  auto base = peft_test::load_fixture("bert", "scripted");
  auto ref = peft_test::load_reference("bert");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"query", "value"}), "lora");
  model.add_adapter("ia3", peft::IA3Config().target_modules({"key", "output.dense"}).feedforward_modules({"output.dense"}));
  model.add_adapter("bottleneck", peft::BottleneckConfig().target_modules("encoder\\.layer\\.\\d+\\.attention").bottleneck_size(4));
  model.set_adapter({"lora", "ia3", "bottleneck"});
  randomise(model, 0.3);
  model.eval();
  torch::NoGradGuard no_grad;
  auto ids = ref.inputs[0].toTensor(), mask = ref.inputs[1].toTensor();
  auto batch_ids = torch::cat({ids, ids}), batch_mask = torch::cat({mask, mask});  // 4 samples
  const std::vector<std::string> names{"lora", "__base__", "ia3", "bottleneck"};
  torch::Tensor mixed = model.forward({batch_ids, batch_mask}, names).toTensor();
  for (size_t i = 0; i < names.size(); ++i) {
    torch::Tensor alone;
    if (names[i] == "__base__") {
      auto off = model.disable_adapter();
      alone = run(model, {batch_ids, batch_mask});
    } else {
      model.set_adapter(names[i]);
      alone = run(model, {batch_ids, batch_mask});
    }
    EXPECT_TRUE(torch::allclose(mixed[i], alone[i], 1e-6, 1e-6)) << names[i];
  }
  EXPECT_EQ(model.active_adapters(), (std::vector<std::string>{"bottleneck"}));
}

// --------------------------------------------------------------- checkpoints
/// Trains `steps` steps from the current state; returns the losses.
std::vector<double> train_steps(peft::PeftModel& model, torch::optim::Optimizer& opt, int steps) {
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) {
    torch::Tensor ids = torch::randint(100, {4, 9});
    torch::Tensor logits = run(model, {ids.slice(1, 0, 8)});
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 100}), ids.slice(1, 1).reshape({-1}));
    opt.zero_grad();
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  return losses;
}

TEST(Checkpoint, ResumedRunReproducesUninterruptedLossesBitwise) {
  auto cfg = peft::LoraConfig().r(4).lora_dropout(0.1).target_modules({"q_proj", "v_proj"}).modules_to_save({"lm_head"});
  auto make = [&] {
    peft::PeftModel m = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), cfg);
    m.train();
    return m;
  };
  torch::manual_seed(1);
  peft::PeftModel straight = make();
  torch::optim::AdamW opt(straight.trainable_parameters(), 1e-2);
  std::vector<double> expected = train_steps(straight, opt, 6);

  torch::manual_seed(1);
  peft::PeftModel first = make();
  torch::optim::AdamW opt1(first.trainable_parameters(), 1e-2);
  train_steps(first, opt1, 3);
  fs::path ckpt = fresh_dir("checkpoint") / "checkpoint.pt";
  peft::save_checkpoint(ckpt, first, opt1, 3);
  torch::randn({1000});  // disturb the RNG: the checkpoint must restore it

  torch::manual_seed(99);  // a different init, overwritten by the checkpoint
  peft::PeftModel resumed = make();
  torch::optim::AdamW opt2(resumed.trainable_parameters(), 1e-2);
  EXPECT_EQ(peft::load_checkpoint(ckpt, resumed, opt2), 3);
  std::vector<double> rest = train_steps(resumed, opt2, 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(rest[i], expected[3 + i]) << "step " << 4 + i;

  peft::PeftModel other = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), peft::LoraConfig().r(2).target_modules({"q_proj"}));
  torch::optim::AdamW opt3(other.trainable_parameters(), 1e-2);
  expect_error<peft::FileError>([&] { peft::load_checkpoint(ckpt, other, opt3); }, {"other adapter configs"});
  peft::io::write_file_atomic(ckpt, "garbage");
  expect_error<peft::FileError>([&] { peft::load_checkpoint(ckpt, resumed, opt2); }, {"not a peft checkpoint"});
}

// ------------------------------------------------------------- nothing lost
TEST(AtomicSave, KilledWriterLeavesACompleteFile) {
  fs::path path = fresh_dir("atomic") / "adapter_model.safetensors";
  const torch::Tensor zeros = torch::zeros({8 << 20});  // 32 MiB: a save takes a while
  const torch::Tensor ones = torch::ones({8 << 20});
  peft::io::save_safetensors(path, {{"w", zeros}});
  for (int attempt = 0; attempt < 4; ++attempt) {
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {  // keep replacing the file until killed
      for (;;) peft::io::save_safetensors(path, {{"w", ones}});
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + 15 * attempt));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    auto file = peft::io::load_safetensors(path);  // never a half-written file
    const torch::Tensor w = file.tensors.at("w");
    EXPECT_TRUE(torch::equal(w, zeros) || torch::equal(w, ones));
  }
  for (const auto& entry : fs::directory_iterator(path.parent_path()))  // killed writers' temporaries
    if (entry.path() != path) fs::remove(entry.path());
}

}  // namespace
