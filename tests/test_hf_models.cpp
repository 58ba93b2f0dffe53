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

enum class Task { CausalLM, SequenceClassification, Encoder };
struct HfCase {
  std::string name;
  Task task;
};
const std::vector<HfCase> kCases{
    {"llama", Task::CausalLM},         {"llama_bias_headdim", Task::CausalLM},
    {"llama_sharded", Task::CausalLM}, {"llama_bf16", Task::CausalLM},
    {"llama_f16", Task::CausalLM},     {"mistral", Task::CausalLM},
    {"qwen2", Task::CausalLM},         {"llama_seqcls", Task::SequenceClassification},
    {"gpt2", Task::CausalLM},          {"gpt2_layer_scaled_bf16", Task::CausalLM},
    {"gpt2_seqcls", Task::SequenceClassification}, {"bert_seqcls", Task::SequenceClassification},
    {"bert_base", Task::Encoder},      {"bert_base_bf16", Task::Encoder},
    {"roberta_seqcls", Task::SequenceClassification}};

fs::path case_dir(const std::string& name) { return fs::path(PEFT_FIXTURE_DIR) / "hf" / name; }

/// A fresh folder `dir_name` holding a copy of case `name`'s files.
fs::path copy_of_case(const std::string& name, const std::string& dir_name) {
  const fs::path dir = peft_test::fresh_dir(dir_name);
  for (const auto& entry : fs::directory_iterator(case_dir(name))) fs::copy(entry.path(), dir / entry.path().filename());
  return dir;
}

struct Expected {
  torch::Tensor input_ids, attention_mask, output;  // output: logits, or last_hidden_state for encoders
};
Expected expected_of(const fs::path& file) {
  auto t = peft::io::load_safetensors(fs::is_directory(file) ? file / "expected.safetensors" : file).tensors;
  return {t.at("input_ids"), t.at("attention_mask"), t.count("logits") ? t.at("logits") : t.at("last_hidden_state")};
}

/// The case's model loaded by the Auto class of its task, run on the expected inputs (no grad).
torch::Tensor run_case(const HfCase& c, const Expected& e) {
  const auto options = c.name == "llama_f16" ? peft::hf::ModelOptions().dtype(torch::kFloat) : peft::hf::ModelOptions();
  torch::NoGradGuard no_grad;
  switch (c.task) {
    case Task::CausalLM:
      return peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(c.name), options)->forward(e.input_ids, e.attention_mask);
    case Task::SequenceClassification:
      return peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir(c.name), options)
          ->forward(e.input_ids, e.attention_mask);
    case Task::Encoder:
      return peft::hf::AutoModel::from_pretrained(case_dir(c.name), options)->forward(e.input_ids, e.attention_mask);
  }
  return {};
}

/// The largest |difference| at the positions the mask keeps (HF leaves padded ones undefined);
/// a classifier's [B, labels] logits everywhere.
double kept_difference(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& mask) {
  if (a.dim() == 2) return (a.to(torch::kFloat) - b.to(torch::kFloat)).abs().max().item<double>();
  const torch::Tensor keep = mask.to(torch::kBool);
  return (a.index({keep}).to(torch::kFloat) - b.index({keep}).to(torch::kFloat)).abs().max().item<double>();
}

/// 1e-5 in fp32; bf16's precision (2 % of the largest value) otherwise.
double tolerance(const torch::Tensor& expected) {
  return expected.scalar_type() == torch::kFloat ? 1e-5 : 2e-2 * expected.abs().max().item<double>();
}

TEST(HfModels, OutputsEqualThePlainPyTorchReference) {
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    const Expected e = expected_of(case_dir(c.name));
    const torch::Tensor out = run_case(c, e);
    ASSERT_EQ(out.sizes(), e.output.sizes());
    EXPECT_EQ(out.scalar_type(), e.output.scalar_type());
    EXPECT_LE(kept_difference(out, e.output, e.attention_mask), tolerance(e.output));
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

TEST(HfModels, Gpt2BertRobertaHaveHfsNames) {
  // GPT-2 from a Hub-style file (no "transformer." prefix, causal-mask buffers): HF's names, Conv1D [in, out], tied head.
  auto gpt2 = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("gpt2"))->named_parameters();
  EXPECT_EQ(gpt2["transformer.h.0.attn.c_attn.weight"].sizes(), torch::IntArrayRef({32, 96}));
  EXPECT_EQ(gpt2["lm_head.weight"].unsafeGetTensorImpl(), gpt2["transformer.wte.weight"].unsafeGetTensorImpl());
  auto bert = peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir("bert_seqcls"))->named_parameters();
  EXPECT_TRUE(bert.contains("bert.encoder.layer.0.attention.self.query.weight"));
  EXPECT_TRUE(bert.contains("bert.pooler.dense.weight"));
  EXPECT_EQ(bert["classifier.weight"].sizes(), torch::IntArrayRef({3, 32})) << "3 labels from config.json's id2label";
  auto roberta = peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir("roberta_seqcls"))->named_parameters();
  EXPECT_TRUE(roberta.contains("classifier.out_proj.weight"));
  EXPECT_FALSE(roberta.contains("roberta.pooler.dense.weight")) << "RobertaForSequenceClassification has no pooler";
}

// A checkpoint of the body alone (as all-MiniLM-L6-v2's) into a classifier: HF's new head, num_labels, saved and reloaded.
TEST(HfModels, ClassifierOnABodyCheckpointGetsANewHeadThatSavesAndTrains) {
  torch::manual_seed(0);
  peft::hf::SequenceClassifier model =
      peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir("bert_base"), peft::hf::ModelOptions().num_labels(4));
  auto params = model->named_parameters();
  EXPECT_EQ(params["classifier.weight"].sizes(), torch::IntArrayRef({4, 32}));
  EXPECT_NEAR(params["classifier.weight"].std().item<double>(), 0.02, 0.006) << "HF's init: N(0, initializer_range)";
  EXPECT_EQ(params["classifier.bias"].abs().max().item<double>(), 0.0);
  const Expected e = expected_of(case_dir("bert_base"));
  peft::hf::BertModel body = peft::hf::AutoModel::from_pretrained(case_dir("bert_base"));
  {
    torch::NoGradGuard no_grad;  // the body is the file's: its hidden states are the encoder's
    auto classifier = std::dynamic_pointer_cast<peft::hf::BertForSequenceClassificationImpl>(model.ptr());
    EXPECT_TRUE(torch::equal(classifier->bert(e.input_ids, e.attention_mask), body(e.input_ids, e.attention_mask)));
  }
  const fs::path saved = peft_test::fresh_dir("hf_bert_classifier");
  peft::hf::save_pretrained(*model, saved);
  const auto config = nlohmann::json::parse(peft::io::read_file(saved / "config.json"));
  EXPECT_EQ(config["id2label"].size(), 4u);
  peft::hf::SequenceClassifier again = peft::hf::AutoModelForSequenceClassification::from_pretrained(saved);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(again->forward(e.input_ids, e.attention_mask), model->forward(e.input_ids, e.attention_mask)));
}

TEST(HfModels, LoRAWithATrainedHeadOnEveryClassifier) {
  for (const auto& [name, targets, head] : std::vector<std::tuple<std::string, std::vector<std::string>, std::string>>{
           {"bert_seqcls", {"query", "value"}, "classifier"},
           {"roberta_seqcls", {"query", "value"}, "classifier"},
           {"gpt2_seqcls", {"c_attn"}, "score"},
           {"llama_seqcls", {"q_proj", "v_proj"}, "score"}}) {
    SCOPED_TRACE(name);
    peft::hf::SequenceClassifier model = peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir(name));
    peft::nn::PeftModel peft_model =
        peft::get_peft_model(model, peft::LoraConfig().r(4).target_modules(targets).modules_to_save({head}));
    const Expected e = expected_of(case_dir(name));
    const torch::Tensor labels = torch::tensor({1, 0});
    torch::optim::AdamW opt(peft_model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
    std::vector<double> losses;
    for (int step = 0; step < 12; ++step) {
      opt.zero_grad();
      torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(e.input_ids, e.attention_mask), labels);
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    EXPECT_LT(losses.back(), 0.5 * losses.front());
    for (const auto& p : model->named_parameters()) {
      const bool adapter = p.key().find("lora_") != std::string::npos || p.key().rfind(head + ".", 0) == 0;
      EXPECT_EQ(p.value().grad().defined(), adapter) << p.key();
    }
  }
}

TEST(HfModels, SavePretrainedShardsPastTheLimitAndReplacesAnEarlierLayout) {
  peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir("gpt2"));
  const Expected e = expected_of(case_dir("gpt2"));
  const fs::path dir = peft_test::fresh_dir("hf_sharded_gpt2");
  peft::hf::save_pretrained(*model, dir, peft::hf::SaveOptions().max_shard_size(20000));
  const auto index = nlohmann::json::parse(peft::io::read_file(dir / "model.safetensors.index.json"));
  std::set<std::string> files;
  for (const auto& [key, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GT(files.size(), 2u);
  EXPECT_TRUE(files.count(fmt::format("model-00001-of-{:05d}.safetensors", files.size())));
  EXPECT_FALSE(index["weight_map"].contains("lm_head.weight")) << "a tied tensor once, under its first name";
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  torch::NoGradGuard no_grad;
  const torch::Tensor logits = model->forward(e.input_ids, e.attention_mask);
  EXPECT_TRUE(torch::equal(peft::hf::AutoModelForCausalLM::from_pretrained(dir)->forward(e.input_ids, e.attention_mask), logits));
  peft::hf::save_pretrained(*model, dir);  // one file now: the shards and the index go
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / "model-00001-of-00002.safetensors"));
  EXPECT_TRUE(torch::equal(peft::hf::AutoModelForCausalLM::from_pretrained(dir)->forward(e.input_ids, e.attention_mask), logits));
}

#ifdef PEFT_ASSETS_DIR
// The real all-MiniLM-L6-v2 (PyPI package, a BERT) against the plain-PyTorch reference on the same file.
TEST(HfModels, RealMiniLMEqualsTheReference) {
  const Expected e = expected_of(fs::path(PEFT_FIXTURE_DIR) / "hf" / "all-minilm-l6-v2.expected.safetensors");
  const auto expected = peft::io::load_safetensors(fs::path(PEFT_FIXTURE_DIR) / "hf" / "all-minilm-l6-v2.expected.safetensors").tensors;
  peft::hf::BertModel model = peft::hf::AutoModel::from_pretrained(fs::path(PEFT_ASSETS_DIR) / "all-minilm-l6-v2");
  torch::NoGradGuard no_grad;
  const torch::Tensor hidden = model(e.input_ids, e.attention_mask);
  EXPECT_LE(kept_difference(hidden, e.output, e.attention_mask), 1e-5);
  const torch::Tensor mask = e.attention_mask.unsqueeze(-1).to(torch::kFloat);  // sentence-transformers' mean pooling
  const torch::Tensor embedding = torch::nn::functional::normalize((hidden * mask).sum(1) / mask.sum(1),
                                                                   torch::nn::functional::NormalizeFuncOptions().dim(-1));
  EXPECT_LE((embedding - expected.at("sentence_embedding")).abs().max().item<double>(), 1e-6);
}
#endif

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

/// The LoRA gradients of one forward/backward of case `name` in training mode, with or without checkpointing.
std::map<std::string, torch::Tensor> lora_gradients(const std::string& name, const std::vector<std::string>& targets,
                                                    double dropout, bool checkpointed) {
  const Expected e = expected_of(case_dir(name));
  const bool classifier = name.find("seqcls") != std::string::npos;
  std::shared_ptr<torch::nn::Module> model;
  if (classifier)
    model = peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir(name)).ptr();
  else
    model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(name)).ptr();
  torch::manual_seed(3);
  peft::nn::PeftModel peft_model = peft::get_peft_model(
      model, peft::LoraConfig().r(4).lora_dropout(dropout).target_modules(targets).init_lora_weights(peft::LoraInit::Random));
  model->train();
  torch::manual_seed(11);
  torch::Tensor out;
  if (classifier) {
    auto m = std::dynamic_pointer_cast<peft::hf::SequenceClassifierImpl>(model);
    m->gradient_checkpointing(checkpointed);
    out = m->forward(e.input_ids, e.attention_mask);
  } else {
    auto m = std::dynamic_pointer_cast<peft::hf::CausalLMImpl>(model);
    m->gradient_checkpointing(checkpointed);
    out = m->forward(e.input_ids, e.attention_mask);
  }
  out.pow(2).mean().backward();
  std::map<std::string, torch::Tensor> grads;
  for (const auto& [key, t] : peft_model.named_trainable_parameters()) grads[key] = t.grad().clone();
  return grads;
}

TEST(HfModels, GradientCheckpointingGivesTheSameGradients) {
  const std::vector<std::tuple<std::string, std::vector<std::string>, size_t>> cases{
      {"llama", {"q_proj", "v_proj", "down_proj"}, 12u},  // A and B of 3 layers in each of 2 decoder layers
      {"gpt2", {"c_attn", "c_fc"}, 8u},
      {"bert_seqcls", {"query", "value", "dense"}, 22u}};  // 5 per layer and the pooler, A and B
  for (const auto& [name, targets, count] : cases)
    for (const double dropout : {0.0, 0.3}) {  // with dropout the recompute must draw the same masks
      SCOPED_TRACE(name + " dropout " + std::to_string(dropout));
      const auto plain = lora_gradients(name, targets, dropout, false);
      const auto recomputed = lora_gradients(name, targets, dropout, true);
      ASSERT_EQ(plain.size(), count);
      for (const auto& [key, g] : plain) {
        ASSERT_TRUE(g.defined() && recomputed.at(key).defined()) << key;
        EXPECT_TRUE(torch::allclose(recomputed.at(key), g, 1e-6, 1e-6)) << key << " by " << (recomputed.at(key) - g).abs().max().item<double>();
        EXPECT_GT(g.abs().max().item<double>(), 0) << key;
      }
    }
}

// Every method of get_peft_model on the decoders and the encoder of Hugging Face folders: it trains (only the
// adapter), and a saved adapter loads on a fresh model with the same outputs.
TEST(HfModels, EveryMethodAttachesTrainsAndReloads) {
  const peft::NF4Config nf4 = peft::NF4Config().blocksize(32);
  for (const auto& name : {"qwen2", "gpt2", "bert_seqcls"}) {
    const std::string n = name;
    const std::vector<std::string> targets = n == "gpt2" ? std::vector<std::string>{"c_attn"}
                                             : n == "qwen2" ? std::vector<std::string>{"q_proj", "v_proj"}
                                                            : std::vector<std::string>{"query", "value"};
    const std::string ff = n == "gpt2" ? "c_fc" : n == "qwen2" ? "down_proj" : "output.dense";
    const std::string sublayers = n == "bert_seqcls" ? "bert\\.encoder\\.layer\\.\\d+\\.attention" : ".*\\.(attn|self_attn|mlp)";
    std::vector<std::string> ia3_targets = targets;
    ia3_targets.push_back(ff);
    const std::vector<std::pair<std::string, peft::PeftConfig>> methods{
        {"lora", peft::LoraConfig().r(4).target_modules(targets)},
        {"dora", peft::LoraConfig().r(2).use_dora(true).target_modules(targets)},
        {"qlora", peft::LoraConfig().r(4).target_modules(targets).quantize_base(nf4)},
        {"ia3", peft::IA3Config().target_modules(ia3_targets).feedforward_modules({ff})},
        {"vera", peft::VeraConfig().r(8).target_modules(targets)},
        {"bitfit", peft::BitFitConfig()},
        {"bottleneck", peft::BottleneckConfig().target_modules(sublayers).bottleneck_size(8)},
        {"prompt", peft::PromptTuningConfig().num_virtual_tokens(3)},
        {"prefix", peft::PrefixTuningConfig().num_virtual_tokens(3)}};
    const Expected e = expected_of(case_dir(n));
    auto load = [&]() -> std::shared_ptr<torch::nn::Module> {
      if (n == "bert_seqcls") return peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir(n)).ptr();
      return peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(n)).ptr();
    };
    auto run = [&](const std::shared_ptr<torch::nn::Module>& m) {
      if (auto c = std::dynamic_pointer_cast<peft::hf::SequenceClassifierImpl>(m)) return c->forward(e.input_ids, e.attention_mask);
      return std::dynamic_pointer_cast<peft::hf::CausalLMImpl>(m)->forward(e.input_ids, e.attention_mask);
    };
    for (const auto& [method, config] : methods) {
      SCOPED_TRACE(n + " " + method);
      torch::manual_seed(1);
      auto model = load();
      peft::nn::PeftModel peft_model = peft::get_peft_model(model, config);
      torch::optim::AdamW opt(peft_model.trainable_parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0));
      std::vector<double> losses;
      for (int step = 0; step < 6; ++step) {
        opt.zero_grad();
        torch::Tensor loss = run(model).pow(2).mean();
        loss.backward();
        opt.step();
        losses.push_back(loss.item<double>());
      }
      EXPECT_LT(losses.back(), losses.front());
      size_t trained = 0;
      for (const auto& p : model->parameters()) trained += p.grad().defined();
      EXPECT_EQ(trained, peft_model.trainable_parameters().size()) << "only the adapter's tensors get gradients";
      if (method == "qlora") continue;  // its file is a LoRA file over the NF4 base (tests/test_native.cpp)
      const fs::path dir = peft_test::fresh_dir("hf_every_method_" + n + "_" + method);
      peft_model.save_pretrained(dir);
      auto fresh = load();
      peft::nn::PeftModel loaded = peft::nn::PeftModel::from_pretrained(fresh, dir);
      torch::NoGradGuard no_grad;
      model->eval();
      EXPECT_LE(kept_difference(run(fresh), run(model), e.attention_mask), 1e-5);
    }
  }
}

/// A left-padded batch of two prompts (pad 0), the second shorter.
peft::PromptBatch two_prompts() { return peft::left_pad({{5, 17, 33, 2, 9, 61}, {41, 7, 88}}, 0); }

// KV-cached generation gives the tokens of uncached generation, with and without adapters; the cache's logits
// equal a full forward's; a padded row continues as it does alone (HF generate's positions).
TEST(HfModels, CachedGenerationEqualsUncached) {
  for (const auto& name : {"llama", "mistral", "qwen2", "gpt2"}) {
    for (const std::string adapter : {"none", "lora", "prefix", "prompt"}) {
      SCOPED_TRACE(std::string(name) + " " + adapter);
      torch::manual_seed(2);
      peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(name));
      std::unique_ptr<peft::nn::PeftModel> peft_model;
      const std::vector<std::string> targets = std::string(name) == "gpt2" ? std::vector<std::string>{"c_attn", "c_fc"}
                                                                           : std::vector<std::string>{"q_proj", "v_proj", "down_proj"};
      if (adapter == "lora")
        peft_model = std::make_unique<peft::nn::PeftModel>(
            peft::get_peft_model(model, peft::LoraConfig().r(4).target_modules(targets).init_lora_weights(peft::LoraInit::Random)));
      if (adapter == "prefix")
        peft_model = std::make_unique<peft::nn::PeftModel>(peft::get_peft_model(model, peft::PrefixTuningConfig().num_virtual_tokens(2)));
      if (adapter == "prompt")
        peft_model = std::make_unique<peft::nn::PeftModel>(peft::get_peft_model(model, peft::PromptTuningConfig().num_virtual_tokens(2)));
      const peft::PromptBatch batch = two_prompts();
      auto options = peft::GenerationOptions().max_new_tokens(8);
      const torch::Tensor cached = peft::generate(*model, batch.input_ids, batch.attention_mask, options);
      const torch::Tensor uncached = peft::generate(*model, batch.input_ids, batch.attention_mask, options.use_cache(false));
      EXPECT_TRUE(torch::equal(cached, uncached)) << cached << uncached;
      EXPECT_EQ(cached.sizes(), torch::IntArrayRef({2, 14}));
      if (adapter == "prompt") continue;  // no cache with virtual tokens
      if (adapter != "prefix") {  // with virtual positions, positions count from the first column, as in HF peft
        const torch::Tensor alone = peft::generate(*model, torch::tensor({{41, 7, 88}}), torch::ones({1, 3}, torch::kLong), options);
        EXPECT_TRUE(torch::equal(alone, cached[1].narrow(0, 3, 11).unsqueeze(0))) << "the padded row continues as it does alone";
      }
      torch::NoGradGuard no_grad;  // the cache's logits, step by step, against one forward over everything
      const torch::Tensor mask = torch::ones({2, 14}, torch::kLong).index_put_({1, torch::indexing::Slice(0, 3)}, 0);
      const torch::Tensor positions = adapter == "prefix" ? torch::Tensor() : peft::hf::detail::positions_from_mask(mask);
      auto first_columns = [&](int64_t n) { return positions.defined() ? positions.narrow(1, 0, n) : positions; };
      auto column = [&](int64_t t) { return positions.defined() ? positions.narrow(1, t, 1) : positions; };
      const torch::Tensor full = model->forward_cached(cached, mask, positions, nullptr);
      peft::hf::KVCache cache;
      torch::Tensor first = model->forward_cached(cached.narrow(1, 0, 10), mask.narrow(1, 0, 10), first_columns(10), &cache);
      EXPECT_LE(kept_difference(first, full.narrow(1, 0, 10), mask.narrow(1, 0, 10)), 1e-5);
      for (int64_t t = 10; t < 14; ++t) {
        torch::Tensor step = model->forward_cached(cached.narrow(1, t, 1), mask.narrow(1, 0, t + 1), column(t), &cache);
        EXPECT_LE((step.select(1, 0) - full.select(1, t)).abs().max().item<double>(), 1e-5) << t;
      }
      EXPECT_EQ(cache.length(), 14);
    }
  }
}

TEST(HfModels, UnsupportedOrBrokenFoldersRaiseTypedErrorsNamingTheField) {
  const fs::path dir = copy_of_case("llama", "hf_broken");
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

  // GPT-2 and BERT settings that change the math; a task the architecture lacks; a head of another size.
  const fs::path gpt2 = copy_of_case("gpt2", "hf_broken_gpt2"), bert = copy_of_case("bert_seqcls", "hf_broken_bert");
  auto edit = [](const fs::path& folder, const std::function<void(nlohmann::json&)>& change) {
    auto j = nlohmann::json::parse(peft::io::read_file(folder / "config.json"));
    change(j);
    peft::io::write_file_atomic(folder / "config.json", j.dump());
  };
  edit(gpt2, [](nlohmann::json& j) { j["reorder_and_upcast_attn"] = true; });
  expect_error<peft::ModelError>([&] { peft::hf::AutoModelForCausalLM::from_pretrained(gpt2); }, {"reorder_and_upcast_attn"});
  edit(gpt2, [](nlohmann::json& j) { j["reorder_and_upcast_attn"] = false; j["activation_function"] = "quick_gelu"; });
  expect_error<peft::ModelError>([&] { peft::hf::AutoModelForCausalLM::from_pretrained(gpt2); }, {"activation 'quick_gelu'"});
  expect_error<peft::ModelError>([&] { peft::hf::AutoModelForCausalLM::from_pretrained(bert); },
                                 {"model_type 'bert'", "AutoModelForCausalLM"});
  expect_error<peft::FileError>(
      [&] { peft::hf::AutoModelForSequenceClassification::from_pretrained(bert, peft::hf::ModelOptions().num_labels(5)); },
      {"tensor 'classifier.weight'", "[3, 32]", "[5, 32]"});
  edit(bert, [](nlohmann::json& j) { j["position_embedding_type"] = "relative_key"; });
  expect_error<peft::ModelError>([&] { peft::hf::AutoModelForSequenceClassification::from_pretrained(bert); },
                                 {"position_embedding_type 'relative_key'"});
}

/// bert_seqcls with a LoRA adapter (query, value) and a trained classifier made in C++, saved in
/// its adapter/ folder, the adapted logits in its expected.safetensors.
fs::path adapted_classifier() {
  const fs::path dir = copy_of_case("bert_seqcls", "hf_adapted_bert");
  peft::hf::SequenceClassifier model = peft::hf::AutoModelForSequenceClassification::from_pretrained(dir);
  peft::nn::PeftModel peft_model = peft::get_peft_model(
      model, peft::LoraConfig().r(4).target_modules({"query", "value"}).modules_to_save({"classifier"}).init_lora_weights(peft::LoraInit::Random));
  const Expected e = expected_of(dir);
  torch::optim::SGD opt(peft_model.trainable_parameters(), 0.5);  // one step moves the head off the file's
  torch::nn::functional::cross_entropy(model->forward(e.input_ids, e.attention_mask), torch::tensor({1, 0})).backward();
  opt.step();
  model->eval();
  peft_model.save_pretrained(dir / "adapter");
  torch::NoGradGuard no_grad;
  peft::io::save_safetensors(dir / "expected.safetensors", {{"input_ids", e.input_ids}, {"attention_mask", e.attention_mask},
                                                            {"logits", model->forward(e.input_ids, e.attention_mask)}});
  return dir;
}

/// A copy of case `name` with a prompt- or prefix-tuning adapter made in C++ (task_type CAUSAL_LM, so HF peft
/// loads it in PeftModelForCausalLM) and the adapted logits in its expected.safetensors.
fs::path adapted_with_virtual_positions(const std::string& name, const std::string& method) {
  const fs::path dir = copy_of_case(name, "hf_" + method + "_" + name);
  peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(dir);
  const peft::PeftConfig config = method == "prompt" ? peft::PeftConfig(peft::PromptTuningConfig().num_virtual_tokens(3))
                                                     : peft::PeftConfig(peft::PrefixTuningConfig().num_virtual_tokens(3));
  peft::nn::PeftModel peft_model = peft::get_peft_model(model, config);
  peft_model.save_pretrained(dir / "adapter");
  const Expected e = expected_of(dir);
  torch::NoGradGuard no_grad;
  peft::io::save_safetensors(dir / "expected.safetensors", {{"input_ids", e.input_ids}, {"attention_mask", e.attention_mask},
                                                            {"logits", model->forward(e.input_ids, e.attention_mask)}});
  return dir;
}

/// dir/generated.safetensors: two left-padded prompts and 10 greedy tokens from `model`, stopping at its eos_token_id.
void write_generated(const fs::path& dir, peft::hf::CausalLMImpl& model) {
  const peft::PromptBatch batch = two_prompts();
  const int64_t eos = model.config.json.value("eos_token_id", int64_t{-1});
  const torch::Tensor out = peft::generate(model, batch.input_ids, batch.attention_mask,
                                           peft::GenerationOptions().max_new_tokens(10).stop_tokens({eos}).pad_token_id(0));
  peft::io::save_safetensors(dir / "generated.safetensors",
                             {{"input_ids", batch.input_ids}, {"attention_mask", batch.attention_mask}, {"output", out}});
}

// The real transformers (and HF peft) load the fixtures, the folder C++ saved and the adapter C++ trained.
TEST(RealHfTransformers, LoadsTheFixturesAndWhatCppSaves) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  const fs::path adapted = copy_of_case("qwen2", "hf_adapted_qwen2");
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
  for (const auto& c : kCases) folders += " " + case_dir(c.name).string();
  folders += " " + saved.string() + " " + adapted.string() + " " + adapted_classifier().string();
  for (const char* method : {"prompt", "prefix"})  // HF peft's prompt learning on transformers' models: same outputs
    for (const char* name : {"llama", "gpt2"}) folders += " " + adapted_with_virtual_positions(name, method).string();
  write_generated(adapted, *model);  // greedy generation, with the LoRA adapter active, to compare with transformers'
  for (const char* name : {"gpt2", "mistral"}) {
    const fs::path dir = copy_of_case(name, std::string("hf_generated_") + name);
    write_generated(dir, *peft::hf::AutoModelForCausalLM::from_pretrained(dir));
    folders += " " + dir.string();
  }
#ifdef PEFT_ASSETS_DIR
  const fs::path minilm = peft_test::fresh_dir("hf_real_minilm");  // the real checkpoint, as C++ computes it
  for (const char* file : {"config.json", "model.safetensors"})
    fs::create_symlink(fs::path(PEFT_ASSETS_DIR) / "all-minilm-l6-v2" / file, minilm / file);
  const Expected m = expected_of(fs::path(PEFT_FIXTURE_DIR) / "hf" / "all-minilm-l6-v2.expected.safetensors");
  {
    torch::NoGradGuard no_grad;
    peft::hf::BertModel model = peft::hf::AutoModel::from_pretrained(minilm);
    peft::io::save_safetensors(minilm / "expected.safetensors", {{"input_ids", m.input_ids}, {"attention_mask", m.attention_mask},
                                                                 {"last_hidden_state", model(m.input_ids, m.attention_mask)}});
  }
  folders += " " + minilm.string();
#endif
  EXPECT_EQ(peft_test::run_reference_tool("check_hf_models.py" + folders), 0);
}

// The other way round: HF peft makes LoRA adapters (with a changed classifier head in modules_to_save) on the
// fixtures; C++ loads them on its own models with equal outputs.
TEST(RealHfTransformers, CppLoadsAdaptersHfPeftMade) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  for (const auto& [c, targets] : std::vector<std::pair<HfCase, std::string>>{{{"gpt2", Task::CausalLM}, "c_attn c_proj"},
                                                                             {{"bert_seqcls", Task::SequenceClassification}, "query value"},
                                                                             {{"llama_seqcls", Task::SequenceClassification}, "q_proj v_proj"}}) {
    SCOPED_TRACE(c.name);
    const fs::path out = peft_test::fresh_dir("hf_peft_made_" + c.name);
    ASSERT_EQ(peft_test::run_reference_tool("check_hf_models.py --make-adapter " + case_dir(c.name).string() + " " + out.string() + " " + targets), 0);
    const Expected e = expected_of(out);
    std::shared_ptr<torch::nn::Module> model;
    if (c.task == Task::CausalLM)
      model = peft::hf::AutoModelForCausalLM::from_pretrained(case_dir(c.name)).ptr();
    else
      model = peft::hf::AutoModelForSequenceClassification::from_pretrained(case_dir(c.name)).ptr();
    peft::nn::PeftModel peft_model = peft::nn::PeftModel::from_pretrained(model, out / "adapter");
    torch::NoGradGuard no_grad;
    torch::Tensor output = c.task == Task::CausalLM
                               ? std::dynamic_pointer_cast<peft::hf::CausalLMImpl>(model)->forward(e.input_ids, e.attention_mask)
                               : std::dynamic_pointer_cast<peft::hf::SequenceClassifierImpl>(model)->forward(e.input_ids, e.attention_mask);
    EXPECT_LE(kept_difference(output, e.output, e.attention_mask), 1e-5);
    const Expected base = expected_of(case_dir(c.name));
    EXPECT_GT(kept_difference(output, base.output, e.attention_mask), 1e-2) << "the adapter changes the output";
  }
}

}  // namespace
