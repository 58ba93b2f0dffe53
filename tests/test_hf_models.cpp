// Hugging Face model folders in C++ (peft::hf): tiny random checkpoints of the
// Llama family written by tools/hf_reference.py, whose plain-PyTorch model
// (written from transformers' modeling code) gives the expected logits; the
// reference stage also has transformers and HF peft load them and what C++ saves.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;
using peft_test::expect_error;

const std::vector<std::string> kCases{"llama", "llama_bias_headdim", "llama_sharded", "llama_bf16", "llama_f16", "mistral", "qwen2"};

fs::path case_dir(const std::string& name) { return fs::path(PEFT_FIXTURE_DIR) / "hf" / name; }

struct Expected {
  torch::Tensor input_ids, attention_mask, logits;
};
Expected expected_of(const fs::path& dir) {
  auto t = peft::io::load_safetensors(dir / "expected.safetensors").tensors;
  return {t.at("input_ids"), t.at("attention_mask"), t.at("logits")};
}

/// The largest |difference| at the positions the mask keeps (HF leaves padded ones undefined).
double kept_difference(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& mask) {
  const torch::Tensor keep = mask.to(torch::kBool);
  return (a.index({keep}).to(torch::kFloat) - b.index({keep}).to(torch::kFloat)).abs().max().item<double>();
}

/// 1e-5 in fp32; bf16's precision (2 % of the largest logit) otherwise.
double tolerance(const torch::Tensor& logits) {
  return logits.scalar_type() == torch::kFloat ? 1e-5 : 2e-2 * logits.abs().max().item<double>();
}

TEST(HfModels, LogitsEqualThePlainPyTorchReference) {
  for (const auto& name : kCases) {
    SCOPED_TRACE(name);
    const auto options = name == "llama_f16" ? peft::hf::ModelOptions().dtype(torch::kFloat) : peft::hf::ModelOptions();
    peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(name), options);
    const Expected e = expected_of(case_dir(name));
    torch::NoGradGuard no_grad;
    const torch::Tensor logits = model->forward(e.input_ids, e.attention_mask);
    ASSERT_EQ(logits.sizes(), e.logits.sizes());
    EXPECT_EQ(logits.scalar_type(), e.logits.scalar_type());
    EXPECT_LE(kept_difference(logits, e.logits, e.attention_mask), tolerance(e.logits));
  }
}

TEST(HfModels, NamesAreHfsAndTiedEmbeddingsAreOneTensor) {
  peft::hf::CausalLM qwen = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("qwen2"));
  auto params = qwen->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.1.self_attn.q_proj.bias"));
  EXPECT_FALSE(params.contains("model.layers.1.self_attn.o_proj.bias")) << "qwen2: q, k, v biases only";
  EXPECT_EQ(params["lm_head.weight"].unsafeGetTensorImpl(), params["model.embed_tokens.weight"].unsafeGetTensorImpl());
  for (const auto& p : qwen->parameters()) EXPECT_FALSE(p.requires_grad());
}

TEST(HfModels, SavePretrainedRoundTripsAndLoRATrains) {
  const fs::path saved = peft_test::fresh_dir("hf_saved_llama");
  peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("llama"));
  const Expected e = expected_of(case_dir("llama"));
  peft::hf::save_pretrained(*model, saved);
  fs::copy_file(case_dir("llama") / "expected.safetensors", saved / "expected.safetensors");
  peft::hf::CausalLM again = peft::hf::AutoModelForCausalLM::from_pretrained(saved);
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(again->forward(e.input_ids, e.attention_mask), model->forward(e.input_ids, e.attention_mask)));
  }

  // LoRA by get_peft_model: only the adapter trains, the loss falls, HF's keys.
  peft::nn::PeftModel peft_model = peft::get_peft_model(model, peft::LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj"}));
  torch::optim::AdamW opt(peft_model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
  const torch::Tensor labels = e.input_ids.roll(-1, 1);
  std::vector<double> losses;
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    torch::Tensor logits = model->forward(e.input_ids, e.attention_mask);
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.view({-1, logits.size(-1)}), labels.view({-1}));
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), 0.9 * losses.front());
  for (const auto& p : model->named_parameters())
    if (p.key().find(".default.") == std::string::npos) {
      EXPECT_FALSE(p.value().grad().defined()) << p.key();
    }
  const fs::path adapter = peft_test::fresh_dir("hf_llama_adapter");
  peft_model.save_pretrained(adapter);
  const auto keys = peft::io::load_safetensors(adapter / peft::io::kWeightsFile).tensors;
  EXPECT_TRUE(keys.count("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
}

TEST(HfModels, GradientCheckpointingGivesTheSameGradients) {
  const Expected e = expected_of(case_dir("llama"));
  for (const double dropout : {0.0, 0.3}) {  // with dropout the recompute must draw the same masks
    SCOPED_TRACE(dropout);
    std::map<std::string, torch::Tensor> grads[2];
    for (int checkpointed = 0; checkpointed < 2; ++checkpointed) {
      peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("llama"));
      torch::manual_seed(3);
      peft::nn::PeftModel peft_model = peft::get_peft_model(
          model, peft::LoraConfig().r(4).lora_dropout(dropout).target_modules({"q_proj", "v_proj", "down_proj"})
                     .init_lora_weights(peft::LoraInit::Random));
      model->train();
      model->gradient_checkpointing(checkpointed == 1);
      torch::manual_seed(11);
      model->forward(e.input_ids, e.attention_mask).pow(2).mean().backward();
      for (const auto& [name, t] : peft_model.named_trainable_parameters()) grads[checkpointed][name] = t.grad().clone();
    }
    ASSERT_EQ(grads[0].size(), 12u) << "A and B of 3 layers in each of 2 decoder layers";
    for (const auto& [name, g] : grads[0]) {
      ASSERT_TRUE(g.defined() && grads[1].at(name).defined()) << name;
      EXPECT_TRUE(torch::allclose(grads[1].at(name), g, 1e-6, 1e-6)) << name << " by " << (grads[1].at(name) - g).abs().max().item<double>();
      EXPECT_GT(g.abs().max().item<double>(), 0) << name;
    }
  }
}

TEST(HfModels, UnsupportedOrBrokenFoldersRaiseTypedErrorsNamingTheField) {
  const fs::path dir = peft_test::fresh_dir("hf_broken");
  for (const auto& entry : fs::directory_iterator(case_dir("llama"))) fs::copy(entry.path(), dir / entry.path().filename());
  const std::string config = peft::io::read_file(dir / "config.json");
  auto with_config = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(config);
    edit(j);
    peft::io::write_file_atomic(dir / "config.json", j.dump());
  };
  auto load = [&] { peft::hf::AutoModelForCausalLM::from_pretrained(dir); };
  with_config([](nlohmann::json& j) { j["model_type"] = "falcon"; });
  expect_error<peft::ModelError>(load, {"model_type 'falcon'", "llama, mistral, qwen2"});
  with_config([](nlohmann::json& j) { j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; });
  expect_error<peft::ModelError>(load, {"rope_scaling of type 'yarn'"});
  with_config([](nlohmann::json& j) { j["hidden_act"] = "gelu"; });
  expect_error<peft::ModelError>(load, {"hidden_act 'gelu'"});
  with_config([](nlohmann::json& j) { j["num_key_value_heads"] = 3; });
  expect_error<peft::FileError>(load, {"num_key_value_heads 3"});
  with_config([](nlohmann::json& j) { j["hidden_size"] = 48; });
  expect_error<peft::FileError>(load, {"tensor 'model.embed_tokens.weight'", "[96, 32]", "[96, 48]"});
  with_config([](nlohmann::json&) {});
  auto tensors = peft::io::load_safetensors(dir / "model.safetensors").tensors;
  tensors.erase("model.norm.weight");
  peft::io::save_safetensors(dir / "model.safetensors", tensors);
  expect_error<peft::FileError>(load, {"no tensor 'model.norm.weight'"});
  fs::remove(dir / "config.json");
  expect_error<peft::FileError>(load, {"no config.json"});
}

// The real transformers (and HF peft) load the fixtures, the folder C++ saved and the adapter C++ trained.
TEST(RealHfTransformers, LoadsTheFixturesAndWhatCppSaves) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  const fs::path adapted = peft_test::fresh_dir("hf_adapted_qwen2");
  for (const auto& entry : fs::directory_iterator(case_dir("qwen2"))) fs::copy(entry.path(), adapted / entry.path().filename());
  peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(adapted);
  peft::nn::PeftModel peft_model = peft::get_peft_model(
      model, peft::LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj", "down_proj"}).init_lora_weights(peft::LoraInit::Random));
  peft_model.save_pretrained(adapted / "adapter");
  const Expected e = expected_of(adapted);
  {
    torch::NoGradGuard no_grad;
    peft::io::save_safetensors(adapted / "expected.safetensors",
                               {{"input_ids", e.input_ids}, {"attention_mask", e.attention_mask},
                                {"logits", model->forward(e.input_ids, e.attention_mask)}});
  }
  const fs::path saved = peft_test::fresh_dir("hf_resaved_bf16");  // what C++ writes, as transformers reads it
  peft::hf::save_pretrained(*peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("llama_bf16")), saved);
  fs::copy_file(case_dir("llama_bf16") / "expected.safetensors", saved / "expected.safetensors");
  std::string folders;
  for (const auto& name : kCases) folders += " " + case_dir(name).string();
  folders += " " + saved.string() + " " + adapted.string();
  EXPECT_EQ(peft_test::run_reference_tool("check_hf_models.py" + folders), 0);
}

}  // namespace
