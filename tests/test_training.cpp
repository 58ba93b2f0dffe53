// Training memory. References: cross_entropy over the full logits (the chunked
// loss, 1e-5), linear over the dequantised weight (the NF4 autograd function,
// 1e-6), the module's own forward with standard ops (TorchScript QLoRA's
// training graph, 1e-6), and training without recomputation (checkpointing, 1e-6).
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

using peft_test::expect_error;

/// max |a - b| / max |b|.
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max() / b.to(torch::kDouble).abs().max().clamp_min(1e-30))
      .item<double>();
}

std::vector<torch::Tensor> grads_of(const torch::Tensor& loss, const std::vector<torch::Tensor>& inputs) {
  return torch::autograd::grad({loss}, inputs, {}, /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
}

TEST(LinearCrossEntropy, LossAndGradientsEqualCrossEntropyOverTheFullLogits) {
  torch::manual_seed(0);
  for (int64_t chunk : {0, 1, 7, 33, 1000})
    for (bool with_bias : {false, true}) {
      SCOPED_TRACE("chunk_tokens " + std::to_string(chunk) + (with_bias ? ", bias" : ""));
      torch::Tensor h = torch::randn({3, 11, 16}).requires_grad_(), W = (0.5 * torch::randn({50, 16})).requires_grad_();
      torch::Tensor b = with_bias ? torch::randn({50}).requires_grad_() : torch::Tensor();
      torch::Tensor targets = torch::randint(0, 50, {3, 11}, torch::kLong);
      targets[0][3] = -100;
      targets[2][10] = -100;
      std::vector<torch::Tensor> inputs{h, W};
      if (with_bias) inputs.push_back(b);
      torch::Tensor full = torch::nn::functional::cross_entropy(torch::nn::functional::linear(h, W, b).reshape({-1, 50}),
                                                               targets.reshape({-1}));
      torch::Tensor chunked = peft::linear_cross_entropy(h, W, b, targets, peft::LinearCrossEntropyOptions().chunk_tokens(chunk));
      EXPECT_LT(relative_error(chunked, full), 1e-6);
      const auto expected = grads_of(full, inputs), got = grads_of(chunked, inputs);
      for (size_t i = 0; i < inputs.size(); ++i) EXPECT_LT(relative_error(got[i], expected[i]), 1e-5) << "input " << i;
    }
}

TEST(LinearCrossEntropy, BFloat16FollowsHfsUpcastLogitsAndShiftedCausalLabels) {
  torch::manual_seed(1);
  torch::Tensor h = torch::randn({2, 9, 32}).to(torch::kBFloat16).requires_grad_();
  torch::Tensor W = (0.3 * torch::randn({40, 32})).to(torch::kBFloat16).requires_grad_();
  torch::Tensor labels = torch::randint(0, 40, {2, 9}, torch::kLong);
  labels[1][4] = -100;
  torch::Tensor logits = torch::nn::functional::linear(h, W).to(torch::kFloat);
  torch::Tensor full = torch::nn::functional::cross_entropy(logits.narrow(1, 0, 8).reshape({-1, 40}),
                                                           labels.narrow(1, 1, 8).reshape({-1}));
  torch::Tensor chunked = peft::causal_lm_loss(h, W, {}, labels, peft::LinearCrossEntropyOptions().chunk_tokens(5));
  EXPECT_EQ(chunked.scalar_type(), torch::kFloat);
  EXPECT_LT(relative_error(chunked, full), 1e-5);
  const auto expected = grads_of(full, {h, W}), got = grads_of(chunked, {h, W});
  EXPECT_EQ(got[0].scalar_type(), torch::kBFloat16);
  for (size_t i = 0; i < 2; ++i) EXPECT_LT(relative_error(got[i], expected[i]), 2e-2) << "input " << i;  // bf16 rounding
}

TEST(LinearCrossEntropy, AllIgnoredIsNaNAsPyTorchAndBadShapesAreTypedErrors) {
  torch::Tensor h = torch::randn({4, 8}), W = torch::randn({10, 8});
  EXPECT_TRUE(std::isnan(peft::linear_cross_entropy(h, W, {}, torch::full({4}, -100, torch::kLong)).item<double>()));
  expect_error<peft::ShapeError>([&] { peft::linear_cross_entropy(h, torch::randn({10, 7}), {}, torch::zeros({4}, torch::kLong)); },
                                 {"hidden [4, 8]", "[10, 7]"});
  expect_error<peft::ShapeError>([&] { peft::linear_cross_entropy(h, W, torch::randn({9}), torch::zeros({4}, torch::kLong)); },
                                 {"bias [9]", "10 outputs"});
  expect_error<peft::ShapeError>([&] { peft::linear_cross_entropy(h, W, {}, torch::zeros({4}, torch::kInt)); }, {"int64"});
  expect_error<peft::ShapeError>([&] { peft::causal_lm_loss(h, W, {}, torch::zeros({4}, torch::kLong)); },
                                 {"hidden [B, T, H]", "labels [B, T]"});
  expect_error<peft::OptionError>(
      [&] { peft::linear_cross_entropy(h, W, {}, torch::zeros({4}, torch::kLong), peft::LinearCrossEntropyOptions().chunk_tokens(-1)); },
      {"chunk_tokens"});
}

/// A tiny random config.json of `model_type` (gpt2: tied head; llama: untied).
peft::hf::PretrainedConfig tiny_causal_config(const std::string& model_type) {
  peft::hf::PretrainedConfig c;
  c.model_type = model_type;
  c.source = "tiny " + model_type;
  if (model_type == "gpt2")
    c.json = {{"model_type", "gpt2"}, {"vocab_size", 97}, {"n_embd", 32}, {"n_layer", 2}, {"n_head", 4}, {"n_positions", 64},
              {"resid_pdrop", 0.1}, {"embd_pdrop", 0.1}, {"attn_pdrop", 0.1}};
  else
    c.json = {{"model_type", "llama"}, {"vocab_size", 97},       {"hidden_size", 32},         {"intermediate_size", 64},
              {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"tie_word_embeddings", false}};
  return c;
}

peft::hf::CausalLM tiny_causal_lm(const std::string& model_type) {
  torch::manual_seed(7);
  return peft::hf::AutoModelForCausalLM::from_config(tiny_causal_config(model_type));
}

/// Gradients of every parameter that requires one, after `loss`.
std::vector<torch::Tensor> parameter_grads(torch::nn::Module& model, const torch::Tensor& loss) {
  std::vector<torch::Tensor> params;
  for (const auto& p : model.parameters())
    if (p.requires_grad()) params.push_back(p);
  return grads_of(loss, params);
}

TEST(CausalLMLoss, EqualsCrossEntropyOfForwardsLogitsForFullFineTuningAndAdaptedHeads) {
  const torch::Tensor ids = torch::randint(0, 97, {2, 12}, torch::kLong);
  torch::Tensor mask = torch::ones({2, 12}, torch::kLong);
  mask[1].narrow(0, 8, 4).fill_(0);  // right padding: ignored as labels
  torch::Tensor labels = ids.masked_fill(mask.eq(0), -100);
  for (const std::string arch : {"gpt2", "llama"})
    for (bool lora_on_head : {false, true}) {
      SCOPED_TRACE(arch + (lora_on_head ? ", LoRA on lm_head" : ", full fine-tuning"));
      peft::hf::CausalLM model = tiny_causal_lm(arch);
      model->eval();  // dropout off: the two losses see the same network
      c10::optional<peft::nn::PeftModel> adapted;
      if (lora_on_head)
        adapted.emplace(peft::get_peft_model(model, peft::LoraConfig().r(2).target_modules({"lm_head"}).init_lora_weights(peft::LoraInit::Random)));
      else
        for (auto& p : model->parameters()) p.requires_grad_(true);
      torch::Tensor logits = model->forward(ids, mask);
      torch::Tensor full = torch::nn::functional::cross_entropy(logits.narrow(1, 0, 11).reshape({-1, 97}),
                                                               labels.narrow(1, 1, 11).reshape({-1}));
      const auto expected = parameter_grads(*model, full);
      torch::Tensor chunked = model->loss(ids, mask, {}, peft::LinearCrossEntropyOptions().chunk_tokens(5));
      EXPECT_LT(relative_error(chunked, full), 1e-6);
      const auto got = parameter_grads(*model, chunked);
      ASSERT_EQ(got.size(), expected.size());
      for (size_t i = 0; i < got.size(); ++i) EXPECT_LT(relative_error(got[i], expected[i]), 1e-5) << "parameter " << i;
    }
}

TEST(NF4Linear, GradientsEqualLinearOverTheDequantisedWeightWhichAutogradDoesNotKeep) {
  torch::manual_seed(2);
  for (bool fan_in_fan_out : {false, true})
    for (int bias_kind : {0, 1, 2}) {  // none, frozen, trainable
      SCOPED_TRACE(std::string(fan_in_fan_out ? "[in, out]" : "[out, in]") + ", bias kind " + std::to_string(bias_kind));
      const auto q = peft::nf4::quantize(torch::randn(fan_in_fan_out ? std::vector<int64_t>{24, 40} : std::vector<int64_t>{40, 24}),
                                         peft::NF4Config().blocksize(64));
      const torch::Tensor W = peft::nf4::dequantize(q);
      torch::Tensor x = torch::randn({3, 5, 24}).requires_grad_();
      torch::Tensor b = bias_kind == 0 ? torch::Tensor() : torch::randn({40}).requires_grad_(bias_kind == 2);
      torch::Tensor y = peft::nf4::linear(x, q, b, fan_in_fan_out);
      torch::Tensor expected = fan_in_fan_out ? (b.defined() ? torch::matmul(x, W) + b : torch::matmul(x, W))
                                              : torch::nn::functional::linear(x, W, b);
      EXPECT_LT(relative_error(y, expected), 1e-6);
      // Autograd holds the function alone: its inputs that track gradients are x (and a trainable bias), no weight.
      ASSERT_TRUE(y.grad_fn());
      EXPECT_NE(y.grad_fn()->name().find("NF4LinearFunction"), std::string::npos) << y.grad_fn()->name();
      int64_t tracked = 0;
      for (const auto& edge : y.grad_fn()->next_edges()) tracked += edge.is_valid();
      EXPECT_EQ(tracked, bias_kind == 2 ? 2 : 1);
      torch::Tensor g = torch::randn_like(y);
      std::vector<torch::Tensor> inputs{x};
      if (bias_kind == 2) inputs.push_back(b);
      const auto got = torch::autograd::grad({y}, inputs, {g}), want = torch::autograd::grad({expected}, inputs, {g});
      for (size_t i = 0; i < inputs.size(); ++i) EXPECT_LT(relative_error(got[i], want[i]), 1e-6) << "input " << i;
    }
}

TEST(NF4Linear, HfModelQLoRATrainsLikeLoRAOverTheDequantisedWeights) {
  const torch::Tensor ids = torch::randint(0, 97, {2, 10}, torch::kLong);
  auto config = [](bool quantized) {
    auto c = peft::LoraConfig().r(4).target_modules({"q_proj", "v_proj", "down_proj"}).init_lora_weights(peft::LoraInit::Random);
    return quantized ? c.quantize_base(peft::NF4Config()) : c;
  };
  peft::hf::CausalLM qlora_model = tiny_causal_lm("llama"), lora_model = tiny_causal_lm("llama");
  peft::nn::PeftModel qlora = peft::get_peft_model(qlora_model, config(true));
  {
    torch::NoGradGuard no_grad;  // the LoRA model's targets hold the NF4 round trip of their weights
    auto q_params = qlora_model->named_parameters();
    for (auto& p : lora_model->named_parameters()) {
      const std::string& name = p.key();
      if (name.find("q_proj.weight") != std::string::npos || name.find("v_proj.weight") != std::string::npos ||
          name.find("down_proj.weight") != std::string::npos)
        p.value().copy_(peft::nf4::dequantize(peft::nf4::quantize(p.value(), peft::NF4Config())));
    }
  }
  peft::nn::PeftModel lora = peft::get_peft_model(lora_model, config(false));
  {
    torch::NoGradGuard no_grad;
    const auto from = qlora.trainable_parameters(), to = lora.trainable_parameters();
    ASSERT_EQ(from.size(), to.size());
    for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
  }
  qlora_model->train();
  lora_model->train();
  torch::Tensor q_loss = qlora_model->loss(ids), loss = lora_model->loss(ids);
  EXPECT_LT(relative_error(q_loss, loss), 1e-6);
  const auto q_grads = grads_of(q_loss, qlora.trainable_parameters()), grads = grads_of(loss, lora.trainable_parameters());
  for (size_t i = 0; i < grads.size(); ++i) EXPECT_LT(relative_error(q_grads[i], grads[i]), 1e-5) << "parameter " << i;
}

TEST(NF4Linear, TorchScriptQLoRATrainsThroughTheOperatorAndSavesStandardOps) {
  torch::jit::Module base = peft_test::load_fixture("gpt2", "scripted");
  const peft_test::Reference ref = peft_test::load_reference("gpt2");
  peft::PeftModel model = peft::get_peft_model(
      base, peft::LoraConfig().r(4).target_modules({"c_attn", "c_fc"}).init_lora_weights(peft::LoraInit::Random).quantize_base(
                peft::NF4Config().quantize_all_linear(true)));
  const auto graph = peft::nf4::training_graph(model.module());
  ASSERT_TRUE(graph);
  EXPECT_NE(graph->toString().find("peft::nf4_linear"), std::string::npos);
  const std::string saved_forward = peft::jit::method_graph(model.module(), "forward")->toString();
  EXPECT_EQ(saved_forward.find("peft::nf4_linear"), std::string::npos) << "the module's forward must keep standard ops";
  model.train();
  auto loss_of = [&](const torch::jit::IValue& out) { return out.toTensor().pow(2).mean(); };
  torch::manual_seed(3);
  torch::Tensor fused = loss_of(model.forward(ref.inputs));
  torch::manual_seed(3);
  const peft::jit::EagerTrainingScope eager(true);  // as PeftModel::forward runs it
  torch::Tensor plain = loss_of(model.module().forward(ref.inputs));
  EXPECT_LT(relative_error(fused, plain), 1e-6);
  const auto params = model.trainable_parameters();
  const auto got = grads_of(fused, params), want = grads_of(plain, params);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(relative_error(got[i], want[i]), 1e-6) << "parameter " << i;
}

}  // namespace

namespace {

/// Nodes of the autograd graph behind `t` (what backward will visit; saved activations hang on them).
size_t autograd_nodes(const torch::Tensor& t) {
  std::vector<torch::autograd::Node*> stack{t.grad_fn().get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!stack.empty()) {
    torch::autograd::Node* n = stack.back();
    stack.pop_back();
    if (!n || !seen.insert(n).second) continue;
    for (const auto& e : n->next_edges()) stack.push_back(e.function.get());
  }
  return seen.size();
}

peft::LoraConfig fixture_lora(const std::string& arch) {
  auto cfg = peft::LoraConfig().r(4).lora_dropout(0.1).init_lora_weights(peft::LoraInit::Random);
  if (arch == "gpt2") return cfg.target_modules({"c_attn", "c_fc"});
  if (arch == "bert") return cfg.target_modules({"query", "value"});
  return cfg.target_modules({"q_proj", "v_proj"});
}

/// Loss and gradients of `model`'s trainable tensors in training mode, the generator seeded.
std::pair<torch::Tensor, std::vector<torch::Tensor>> train_step(peft::PeftModel& model, const peft_test::Reference& ref) {
  model.train();
  torch::manual_seed(11);
  torch::Tensor loss = model.forward(ref.inputs).toTensor().pow(2).mean();
  const size_t nodes = autograd_nodes(loss);
  auto grads = grads_of(loss, model.trainable_parameters());
  grads.push_back(torch::tensor(static_cast<int64_t>(nodes)));
  return {loss.detach(), grads};
}

TEST(JitCheckpointing, EveryFixtureGetsTheGradientsOfTrainingWithoutRecomputationDropoutIncluded) {
  for (const auto& [arch, kind] : peft_test::all_fixtures())
    for (bool qlora : {false, true}) {
      SCOPED_TRACE(arch + " " + kind + (qlora ? ", QLoRA" : ""));
      auto cfg = fixture_lora(arch);
      if (qlora) cfg.quantize_base(peft::NF4Config());
      peft::PeftModel model = peft::get_peft_model(peft_test::load_fixture(arch, kind), cfg);
      const auto ref = peft_test::load_reference(arch);
      const peft::jit::RecomputedForward cut(model.module(), peft::jit::method_graph(model.module(), "forward"),
                                             model.module().get_method("forward").function().getSchema());
      EXPECT_EQ(cut.recomputed_blocks(), 2u) << "each of the fixture's 2 layers is a block";
      auto [loss, grads] = train_step(model, ref);
      model.gradient_checkpointing(true);
      auto [ck_loss, ck_grads] = train_step(model, ref);
      EXPECT_LT(relative_error(ck_loss, loss), 1e-6);
      ASSERT_EQ(ck_grads.size(), grads.size());
      for (size_t i = 0; i + 1 < grads.size(); ++i) EXPECT_LT(relative_error(ck_grads[i], grads[i]), 1e-6) << "parameter " << i;
      // The recomputed blocks' activations hang on no node: the graph shrinks to the code between blocks.
      EXPECT_LT(ck_grads.back().item<int64_t>(), grads.back().item<int64_t>() / 2)
          << ck_grads.back().item<int64_t>() << " autograd nodes with checkpointing, " << grads.back().item<int64_t>() << " without";
      model.gradient_checkpointing(false);
      auto [again, again_grads] = train_step(model, ref);
      EXPECT_EQ(again.item<double>(), loss.item<double>());
    }
}

TEST(JitCheckpointing, StacksAreTheOutermostNumberedModules) {
  const auto gpt2 = peft::jit::stack_paths(peft_test::load_fixture("gpt2", "scripted"));
  ASSERT_EQ(gpt2.size(), 1u);
  EXPECT_EQ(gpt2[0], "transformer.h");
}

}  // namespace

#include <unistd.h>

#include <fstream>

namespace {

using peft_test::resident_bytes;

TEST(MappedPages, AReleasedWeightOfAMappedCheckpointLeavesMemoryAndNothingElseDoes) {
  const auto dir = peft_test::fresh_dir("mapped_pages");
  peft::io::save_safetensors(dir / "w.safetensors", {{"a", torch::randn({1024, 1024})}, {"b", torch::randn({1024, 256})}});
  auto file = peft::io::load_safetensors_mapped(dir / "w.safetensors");
  torch::Tensor a = file.tensors.at("a"), b = file.tensors.at("b");
  const double b_sum = b.sum().item<double>();
  EXPECT_TRUE(std::isfinite(a.sum().item<double>()));  // every page of a is touched: resident
  expect_error<peft::FileError>([&] { peft::io::load_safetensors_mapped(dir / "missing.safetensors"); }, {"missing.safetensors"});
  torch::Tensor shared = a.view({-1});  // a second view of the storage: not released
  file.tensors.clear();
  EXPECT_EQ(peft::io::release_mapped_pages(a), 0u);
  shared.reset();
  const size_t before = resident_bytes();
  EXPECT_GE(peft::io::release_mapped_pages(a), a.nbytes() - static_cast<size_t>(::sysconf(_SC_PAGESIZE)));
  EXPECT_GE(before - std::min(before, resident_bytes()), a.nbytes() * 9 / 10) << "a's pages left the process";
  EXPECT_EQ(b.sum().item<double>(), b_sum) << "the neighbouring tensor is as it was";
  EXPECT_EQ(peft::io::release_mapped_pages(torch::randn({1024, 1024})), 0u) << "heap memory is not a mapped checkpoint";
}

}  // namespace
