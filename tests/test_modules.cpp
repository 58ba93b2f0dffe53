// Native modules: neutral init, what trains, merge/unmerge, init statistics,
// option errors, dtype propagation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

using peft_test::expect_error;


torch::nn::Linear frozen_linear(int64_t in, int64_t out) {
  torch::nn::Linear l(in, out);
  return l;
}


// ---------------------------------------------------------------- neutral init
TEST(NeutralInit, LoraDoraIa3AdapterEqualBaseExactly) {
  torch::manual_seed(0);
  auto x = torch::randn({3, 5, 16});
  auto base = frozen_linear(16, 12);
  auto expected = base(x);
  EXPECT_TRUE(torch::equal(peft::LoRALinear(base, peft::LoraOptions(4))(x), expected));
  EXPECT_TRUE(torch::equal(peft::LoRALinear(base, peft::LoraOptions(4).use_dora(true))(x), expected));
  EXPECT_TRUE(torch::equal(peft::LoRALinear(base, peft::LoraOptions(4).init_lora_weights(peft::LoraInit::Gaussian))(x), expected));
  EXPECT_TRUE(torch::equal(peft::IA3(base)(x), expected));
  EXPECT_TRUE(torch::equal(peft::IA3(base, peft::IA3Options().feedforward(true))(x), expected));
  auto h = torch::randn({3, 5, 16});
  EXPECT_TRUE(torch::equal(peft::Bottleneck(peft::BottleneckOptions(16).bottleneck(4))(h), h));
}

TEST(NeutralInit, LoraEmbeddingEqualsBase) {
  torch::nn::Embedding table(20, 8);
  auto ids = torch::randint(20, {2, 6});
  auto expected = table(ids);
  EXPECT_TRUE(torch::equal(peft::LoRAEmbedding(table, peft::LoraOptions(4))(ids), expected));
}

// ------------------------------------------------------------ what trains
/// Runs three SGD steps on `module` with `forward`, returns {changed trainable, unchanged frozen}.
template <typename M, typename Fwd>
void expect_only_adapter_trains(M& module, Fwd forward, const std::vector<std::string>& adapter_names) {
  std::map<std::string, torch::Tensor> before;
  for (const auto& p : module->named_parameters()) before[p.key()] = p.value().detach().clone();
  auto trainable = peft::trainable_parameters(*module);
  ASSERT_EQ(trainable.size(), adapter_names.size());
  torch::optim::SGD sgd(trainable, 0.1);
  for (int step = 0; step < 3; ++step) {
    sgd.zero_grad();
    forward().pow(2).mean().backward();
    sgd.step();
  }
  std::set<std::string> adapters(adapter_names.begin(), adapter_names.end());
  for (const auto& p : module->named_parameters()) {
    if (adapters.count(p.key()))
      EXPECT_FALSE(torch::equal(p.value(), before[p.key()])) << p.key() << " did not change";
    else
      EXPECT_TRUE(torch::equal(p.value(), before[p.key()])) << "frozen " << p.key() << " changed";
  }
}

TEST(ThreeSgdSteps, LoraTrainsOnlyAAndB) {
  torch::manual_seed(1);
  peft::LoRALinear layer(frozen_linear(8, 6), peft::LoraOptions(2));
  auto x = torch::randn({4, 8});
  expect_only_adapter_trains(layer, [&] { return layer(x); }, {"lora_A", "lora_B"});
}

TEST(ThreeSgdSteps, DoraAlsoTrainsMagnitude) {
  torch::manual_seed(1);
  peft::LoRALinear layer(frozen_linear(8, 6), peft::LoraOptions(2).use_dora(true));
  auto x = torch::randn({4, 8});
  expect_only_adapter_trains(layer, [&] { return layer(x); }, {"lora_A", "lora_B", "lora_magnitude_vector"});
}

TEST(ThreeSgdSteps, Ia3AdapterPromptPrefixEmbedding) {
  torch::manual_seed(2);
  auto x = torch::randn({4, 8});
  peft::IA3 ia3(frozen_linear(8, 6));
  expect_only_adapter_trains(ia3, [&] { return ia3(x); }, {"ia3_l"});

  // Adapter after a frozen layer: the adapter's own parameters all train.
  peft::Bottleneck adapter(peft::BottleneckOptions(8).bottleneck(2));
  expect_only_adapter_trains(
      adapter, [&] { return adapter(x) - x * 2; },
      {"adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"});

  auto ids = torch::randint(20, {2, 5});
  peft::PromptEmbedding prompt(torch::nn::Embedding(20, 8), peft::PromptOptions(3));
  expect_only_adapter_trains(prompt, [&] { return prompt(ids); }, {"prompt_embeddings"});

  peft::LoRAEmbedding emb(torch::nn::Embedding(20, 8), peft::LoraOptions(2));
  expect_only_adapter_trains(emb, [&] { return emb(ids); }, {"lora_embedding_A", "lora_embedding_B"});

  auto seq = torch::randn({5, 2, 8});
  peft::PrefixAttention prefix(torch::nn::MultiheadAttention(8, 2), peft::PrefixOptions(3));
  expect_only_adapter_trains(prefix, [&] { return prefix(seq, seq, seq); }, {"prefix"});
}

// -------------------------------------------------------------- merge / unmerge
template <typename M>
void expect_merge_roundtrip(M& layer, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  auto original = layer->base->weight.clone();
  auto unmerged = layer(x);
  layer->merge();
  EXPECT_TRUE(layer->merged());
  EXPECT_TRUE(torch::allclose(layer(x), unmerged, 1e-5, 1e-5)) << "merged output differs";
  auto once = layer->base->weight.clone();
  layer->merge();
  EXPECT_TRUE(torch::equal(layer->base->weight, once)) << "merging twice changed the weight";
  layer->unmerge();
  EXPECT_FALSE(layer->merged());
  EXPECT_TRUE(torch::allclose(layer->base->weight, original, 1e-6, 1e-6)) << "unmerge did not restore the weight";
  EXPECT_TRUE(torch::allclose(layer(x), unmerged, 1e-5, 1e-5));
}

/// A layer whose factors are non-zero, so merging changes something.
template <typename M>
M perturbed(M layer) {
  torch::NoGradGuard no_grad;
  for (auto& p : layer->parameters())
    if (p.requires_grad()) p.add_(torch::randn_like(p) * 0.3);
  return layer;
}

TEST(Merge, LoraDoraSlicesIa3) {
  torch::manual_seed(4);
  auto x = torch::randn({3, 8});
  auto lora = perturbed(peft::LoRALinear(frozen_linear(8, 6), peft::LoraOptions(2).lora_alpha(4)));
  expect_merge_roundtrip(lora, x);
  auto dora = perturbed(peft::LoRALinear(frozen_linear(8, 6), peft::LoraOptions(2).use_dora(true)));
  expect_merge_roundtrip(dora, x);
  auto slices = perturbed(peft::LoRALinear(frozen_linear(8, 9), peft::LoraOptions(2).enable_slices({true, false, true})));
  expect_merge_roundtrip(slices, x);
  auto ia3 = perturbed(peft::IA3(frozen_linear(8, 6)));
  expect_merge_roundtrip(ia3, x);
  auto ia3_ff = perturbed(peft::IA3(frozen_linear(8, 6), peft::IA3Options().feedforward(true)));
  expect_merge_roundtrip(ia3_ff, x);
  auto emb = perturbed(peft::LoRAEmbedding(torch::nn::Embedding(10, 8), peft::LoraOptions(2)));
  expect_merge_roundtrip(emb, torch::randint(10, {2, 3}));
}

TEST(Merge, MergedWeightIsWPlusScaledBA) {
  auto layer = perturbed(peft::LoRALinear(frozen_linear(8, 6), peft::LoraOptions(2).lora_alpha(6)));
  auto expected = layer->base->weight + 3.0 * torch::matmul(layer->lora_B, layer->lora_A);
  layer->merge();
  EXPECT_TRUE(torch::allclose(layer->base->weight, expected.detach(), 1e-6, 1e-6));
}

// ------------------------------------------------------------- init, scaling
TEST(LoraInitStats, DefaultHasZeroBAndKaimingA) {
  torch::manual_seed(5);
  peft::LoRALinear layer(frozen_linear(512, 256), peft::LoraOptions(16));
  EXPECT_TRUE(layer->lora_B.eq(0).all().item<bool>());
  // kaiming_uniform(a=√5) on fan_in 512: U(-1/√512, 1/√512)
  const double bound = 1.0 / std::sqrt(512.0);
  EXPECT_LE(layer->lora_A.abs().max().item<double>(), bound);
  EXPECT_NEAR(layer->lora_A.std().item<double>(), bound / std::sqrt(3.0), 0.02 * bound);
}

TEST(LoraInitStats, GaussianStdIsOneOverR) {
  torch::manual_seed(6);
  peft::LoRALinear layer(frozen_linear(1024, 1024), peft::LoraOptions(8).init_lora_weights(peft::LoraInit::Gaussian));
  EXPECT_TRUE(layer->lora_B.eq(0).all().item<bool>());
  EXPECT_NEAR(layer->lora_A.std().item<double>(), 1.0 / 8, 0.005);  // 8192 samples: ~1% error
  EXPECT_NEAR(layer->lora_A.mean().item<double>(), 0.0, 0.005);
}

TEST(LoraInitStats, ZeroAndRandom) {
  peft::LoRALinear zero(frozen_linear(16, 16), peft::LoraOptions(4).init_lora_weights(peft::LoraInit::Zero));
  EXPECT_TRUE(zero->lora_A.eq(0).all().item<bool>() && zero->lora_B.eq(0).all().item<bool>());
  peft::LoRALinear random(frozen_linear(16, 16), peft::LoraOptions(4).init_lora_weights(peft::LoraInit::Random));
  EXPECT_FALSE(random->lora_B.eq(0).all().item<bool>());
}

TEST(LoraScaling, AlphaOverROrSqrtR) {
  EXPECT_DOUBLE_EQ(peft::LoraOptions(8).lora_alpha(16).scaling(), 2.0);
  EXPECT_DOUBLE_EQ(peft::LoraOptions(16).lora_alpha(16).use_rslora(true).scaling(), 4.0);
  // The module applies it: output difference is scaling · x Aᵀ Bᵀ.
  auto layer = perturbed(peft::LoRALinear(frozen_linear(8, 6), peft::LoraOptions(4).lora_alpha(8).use_rslora(true)));
  auto x = torch::randn({2, 8});
  auto branch = torch::matmul(torch::matmul(x, layer->lora_A.t()), layer->lora_B.t()) * 4.0;
  EXPECT_TRUE(torch::allclose(layer(x) - layer->base(x), branch, 1e-5, 1e-5));
}

TEST(LoraDropout, OnlyOnBranchAndOnlyInTraining) {
  torch::manual_seed(7);
  auto layer = perturbed(peft::LoRALinear(frozen_linear(64, 64), peft::LoraOptions(4).lora_dropout(0.5)));
  auto x = torch::randn({8, 64});
  layer->eval();
  auto eval1 = layer(x), eval2 = layer(x);
  EXPECT_TRUE(torch::equal(eval1, eval2));
  layer->train();
  auto train = layer(x);
  EXPECT_FALSE(torch::allclose(train, eval1));
  // With B = 0 the branch is zero: dropout never touches the base path.
  peft::LoRALinear neutral(frozen_linear(64, 64), peft::LoraOptions(4).lora_dropout(0.5));
  EXPECT_TRUE(torch::equal(neutral(x), neutral->base(x)));
}

// ---------------------------------------------------------------- prompt/prefix
TEST(PromptEmbedding, PrependsAndExtendsMask) {
  torch::nn::Embedding table(30, 6);
  peft::PromptEmbedding prompt(table, peft::PromptOptions(5).init_token_ids({3, 7}));
  auto ids = torch::randint(30, {2, 4});
  auto out = prompt(ids);
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{2, 9, 6}));
  EXPECT_TRUE(torch::equal(out.slice(1, 5), table(ids)));
  // Init from token ids, repeated to fill: 3, 7, 3, 7, 3.
  EXPECT_TRUE(torch::equal(prompt->prompt_embeddings[2], table->weight[3]));
  EXPECT_TRUE(torch::equal(prompt->prompt_embeddings[3], table->weight[7]));
  auto mask = torch::tensor({1, 1, 1, 0, 1, 1, 0, 0}, torch::kLong).view({2, 4});
  auto extended = prompt->extend_attention_mask(mask);
  EXPECT_TRUE(torch::equal(extended.slice(1, 0, 5), torch::ones({2, 5}, torch::kLong)));
  EXPECT_TRUE(torch::equal(extended.slice(1, 5), mask));
  EXPECT_EQ(prompt->prompt_embeddings.numel(), 5 * 6);  // k·d
}

TEST(PrefixAttention, ProjectionFoldsToSameOutput) {
  torch::manual_seed(8);
  peft::PrefixAttention layer(torch::nn::MultiheadAttention(8, 2), peft::PrefixOptions(4).encoder_hidden_size(16));
  layer->eval();
  auto x = torch::randn({5, 3, 8});
  auto before = layer(x, x, x, torch::Tensor(), torch::Tensor(), true).detach();
  auto trainable_before = peft::trainable_parameters(*layer).size();
  EXPECT_EQ(trainable_before, 5u);  // embedding, 2 × (weight, bias)
  layer->fold_projection();
  EXPECT_TRUE(torch::allclose(layer(x, x, x, torch::Tensor(), torch::Tensor(), true), before, 1e-6, 1e-6));
  auto trainable = peft::named_trainable_parameters(*layer);
  ASSERT_EQ(trainable.size(), 1u);
  EXPECT_EQ(trainable[0].first, "prefix");
  EXPECT_EQ(trainable[0].second.numel(), 2 * 4 * 8);  // 2·P·E for one attention layer
}

// ---------------------------------------------------------------------- BitFit
TEST(BitFit, TrainsExactlyBiasesAndOptionallyNorms) {
  torch::nn::Sequential model(torch::nn::Linear(4, 4), torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})),
                              torch::nn::Linear(4, 2));
  auto names = [](const std::vector<std::pair<std::string, torch::Tensor>>& v) {
    std::vector<std::string> out;
    for (const auto& p : v) out.push_back(p.first);
    return out;
  };
  EXPECT_EQ(names(peft::bitfit::mark_trainable(*model)), (std::vector<std::string>{"0.bias", "1.bias", "2.bias"}));
  EXPECT_EQ(names(peft::named_trainable_parameters(*model)), (std::vector<std::string>{"0.bias", "1.bias", "2.bias"}));
  EXPECT_EQ(names(peft::bitfit::mark_trainable(*model, peft::BitFitOptions().norm(true))),
            (std::vector<std::string>{"0.bias", "1.weight", "1.bias", "2.bias"}));
  torch::nn::Linear no_bias(torch::nn::LinearOptions(4, 4).bias(false));
  expect_error<peft::ModelError>([&] { peft::bitfit::mark_trainable(*no_bias); }, {"no bias parameters"});
}

// ------------------------------------------------------------- trainable count
TEST(TrainableParameters, PrintsHfStyleSummary) {
  peft::LoRALinear layer(frozen_linear(1000, 1000), peft::LoraOptions(8));
  auto count = peft::count_parameters(*layer);
  EXPECT_EQ(count.trainable, 2 * 8 * 1000);
  EXPECT_EQ(count.total, 1000 * 1000 + 1000 + 16000);
  EXPECT_EQ(peft::format_trainable_parameters(count),
            "trainable params: 16,000 || all params: 1,017,000 || trainable%: 1.5733");
  testing::internal::CaptureStdout();
  peft::print_trainable_parameters(*layer);
  EXPECT_EQ(testing::internal::GetCapturedStdout(),
            "trainable params: 16,000 || all params: 1,017,000 || trainable%: 1.5733\n");
}

TEST(TrainableParameters, ASharedLayerCountsOnce) {
  torch::nn::Module model;
  torch::nn::Embedding embed = model.register_module("embed", torch::nn::Embedding(10, 4));
  model.register_module("prompt", peft::PromptEmbedding(embed, peft::PromptOptions(3)));  // wraps the same table
  const auto count = peft::count_parameters(model);
  EXPECT_EQ(count.total, 10 * 4 + 3 * 4);
  EXPECT_EQ(count.trainable, 3 * 4);
  embed->weight.set_requires_grad(true);  // trainable and reachable twice: given to the optimizer once
  EXPECT_EQ(peft::trainable_parameters(model).size(), 2u);
}

// ------------------------------------------------- adapter files of native models
struct TwoLayers : torch::nn::Module {
  explicit TwoLayers(int64_t r)
      : a(register_module("a", peft::LoRALinear(frozen_linear(6, 5), peft::LoraOptions(r)))),
        b(register_module("b", peft::Bottleneck(peft::BottleneckOptions(5).bottleneck(2).init(peft::BottleneckInit::Houlsby)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return b(a(x)); }
  peft::LoRALinear a;
  peft::Bottleneck b;
};

TEST(SaveTrainable, RoundTripsOnlyTheAdapterAndRefusesAMismatch) {
  const auto dir = peft_test::fresh_dir("save_trainable");
  torch::manual_seed(1);
  TwoLayers trained(2);
  torch::nn::init::normal_(trained.a->lora_B);  // a non-zero update, so outputs differ from the base
  peft::save_trainable(trained, dir / "adapter.safetensors");
  const auto file = peft::io::load_safetensors(dir / "adapter.safetensors");
  std::vector<std::string> names;
  for (const auto& item : file.tensors) names.push_back(item.first);
  EXPECT_THAT(names, testing::ElementsAre("a.lora_A", "a.lora_B", "b.adapter_down.bias", "b.adapter_down.weight",
                                          "b.adapter_up.bias", "b.adapter_up.weight"));

  TwoLayers fresh(2);  // other random adapter values; copy the base so only the adapter differs
  {
    torch::NoGradGuard no_grad;
    fresh.a->base->weight.copy_(trained.a->base->weight);
    fresh.a->base->bias.copy_(trained.a->base->bias);
  }
  const torch::Tensor x = torch::randn({3, 6});
  EXPECT_FALSE(torch::equal(fresh.forward(x), trained.forward(x)));
  peft::load_trainable(fresh, dir / "adapter.safetensors");
  EXPECT_TRUE(torch::equal(fresh.forward(x), trained.forward(x)));

  TwoLayers other_rank(4);
  const torch::Tensor before = other_rank.a->lora_A.clone();
  expect_error<peft::FileError>([&] { peft::load_trainable(other_rank, dir / "adapter.safetensors"); },
                                {"adapter.safetensors", "a.lora_A", "[4, 6]"});
  EXPECT_TRUE(torch::equal(other_rank.a->lora_A, before));  // left unchanged
  peft::LoRALinear lone(frozen_linear(6, 5), peft::LoraOptions(2));
  expect_error<peft::FileError>([&] { peft::load_trainable(*lone, dir / "adapter.safetensors"); },
                                {"missing [lora_A, lora_B]", "unexpected [a.lora_A"});
  torch::nn::Linear frozen = frozen_linear(2, 2);
  for (auto& p : frozen->parameters()) p.set_requires_grad(false);
  expect_error<peft::ModelError>([&] { peft::save_trainable(*frozen, dir / "none.safetensors"); },
                                 {"no trainable parameters", "none.safetensors"});
}

// ------------------------------------------------------------ device and dtype
TEST(DeviceAndDtype, AdapterParametersFollowTheBase) {
  torch::nn::Linear base(8, 6);
  base->to(torch::kFloat64);
  peft::LoRALinear lora(base, peft::LoraOptions(2).use_dora(true));
  EXPECT_EQ(lora->lora_A.scalar_type(), torch::kFloat64);
  EXPECT_EQ(lora->lora_magnitude_vector.scalar_type(), torch::kFloat64);
  EXPECT_EQ(lora(torch::randn({2, 8}, torch::kFloat64)).scalar_type(), torch::kFloat64);
  peft::IA3 ia3(base);
  EXPECT_EQ(ia3->ia3_l.scalar_type(), torch::kFloat64);
  torch::nn::MultiheadAttention mha(8, 2);
  mha->to(torch::kFloat64);
  peft::PrefixAttention prefix(mha, peft::PrefixOptions(2).encoder_hidden_size(4));
  auto x = torch::randn({3, 1, 8}, torch::kFloat64);
  EXPECT_EQ(prefix(x, x, x).scalar_type(), torch::kFloat64);
}

// ---------------------------------------------------------------- bad options
TEST(BadOptions, TypedErrorsNameTheOptionAndRange) {
  auto base = frozen_linear(8, 6);
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(0)); }, {"LoraOptions.r", ">= 1", "0"});
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(-3)); }, {"LoraOptions.r"});
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(7).init_lora_weights(peft::LoraInit::PiSSA)); },
                                  {"PiSSA needs LoraOptions.r <= min(in=8, out=6)", "7"});
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(2).lora_dropout(1.0)); },
                                  {"LoraOptions.lora_dropout", "[0, 1)"});
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(2).lora_dropout(-0.1)); },
                                  {"LoraOptions.lora_dropout"});
  expect_error<peft::OptionError>(
      [&] { peft::LoRALinear(frozen_linear(8, 10), peft::LoraOptions(2).enable_slices({true, false, true})); },
      {"enable_slices", "3 slices", "10 outputs"});
  expect_error<peft::OptionError>([&] { peft::LoRALinear(base, peft::LoraOptions(2).fan_in_fan_out(true)); },
                                  {"fan_in_fan_out"});
  expect_error<peft::OptionError>([&] { peft::PromptEmbedding(torch::nn::Embedding(5, 4), peft::PromptOptions(0)); },
                                  {"PromptOptions.num_virtual_tokens", ">= 1"});
  expect_error<peft::OptionError>(
      [&] { peft::PromptEmbedding(torch::nn::Embedding(5, 4), peft::PromptOptions(2).init_token_ids({9})); },
      {"init_token_ids", "9", "[0, 5)"});
  expect_error<peft::OptionError>(
      [&] { peft::PrefixAttention(torch::nn::MultiheadAttention(8, 2), peft::PrefixOptions(0)); },
      {"PrefixOptions.num_virtual_tokens", ">= 1"});
  expect_error<peft::OptionError>([&] { peft::Bottleneck(peft::BottleneckOptions(8).reduction_factor(0)); },
                                  {"reduction_factor"});
  // OptionError is a peft::Error is a std::runtime_error.
  EXPECT_THROW(peft::LoRALinear(base, peft::LoraOptions(0)), std::runtime_error);
}

TEST(BadInput, WrongLastDimensionNamesTheModule) {
  peft::LoRALinear lora(frozen_linear(8, 6), peft::LoraOptions(2));
  expect_error<peft::ShapeError>([&] { lora(torch::randn({2, 7})); }, {"LoRALinear", "last dimension 8", "[2, 7]"});
  peft::IA3 ia3(frozen_linear(8, 6));
  expect_error<peft::ShapeError>([&] { ia3(torch::randn({2, 5})); }, {"IA3", "last dimension 8"});
  peft::Bottleneck adapter(peft::BottleneckOptions(8));
  expect_error<peft::ShapeError>([&] { adapter(torch::randn({3})); }, {"Bottleneck", "last dimension 8"});
  peft::PrefixAttention prefix(torch::nn::MultiheadAttention(8, 2), peft::PrefixOptions(2));
  auto x = torch::randn({3, 1, 4});
  expect_error<peft::ShapeError>([&] { prefix(x, x, x); }, {"PrefixAttention", "last dimension 8"});
  auto ok = torch::randn({3, 2, 8});
  expect_error<peft::ShapeError>([&] { prefix(ok, ok, ok, torch::zeros({2, 5}, torch::kBool)); },
                                 {"key_padding_mask", "[batch=2, keys=3]"});
  peft::PromptEmbedding prompt(torch::nn::Embedding(5, 4), peft::PromptOptions(2));
  expect_error<peft::ShapeError>([&] { prompt(torch::zeros({3}, torch::kLong)); }, {"PromptEmbedding", "input_ids"});
}

}  // namespace
