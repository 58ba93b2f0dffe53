// Each method's functional form against golden values computed in Python from
// the papers' formulas (tools/golden_methods.py -> tests/data/golden_methods.pt).
// Tolerance: 1e-5 absolute and relative (fp32, different op order).
#include <gtest/gtest.h>
#include <peft/peft.h>
#include <torch/script.h>

namespace {

namespace F = peft::functional;

class Golden {
 public:
  explicit Golden(std::string case_name)
      : module_(torch::jit::load(std::string(PEFT_SOURCE_DIR) + "/tests/data/golden_methods.pt")),
        case_(std::move(case_name)) {}

  /// An input of the case, as a fresh leaf that records gradients.
  torch::Tensor input(const std::string& name) {
    auto t = get(name).clone().requires_grad_(true);
    inputs_[name] = t;
    return t;
  }

  torch::Tensor get(const std::string& name) const { return module_.attr(case_ + "__" + name).toTensor(); }

  /// Checks y and, after backprop of sum(y * g), the gradient of every named input.
  void expect_matches(const torch::Tensor& y, const std::vector<std::string>& grads) {
    ASSERT_EQ(y.sizes(), get("y").sizes()) << case_;
    expect_close(y, get("y"), case_ + " output");
    (y * get("g")).sum().backward();
    for (const auto& name : grads) expect_close(inputs_.at(name).grad(), get("grad_" + name), case_ + " d/d" + name);
  }

  static void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
    ASSERT_TRUE(actual.defined()) << what << " is undefined";
    EXPECT_TRUE(torch::allclose(actual, expected, 1e-5, 1e-5))
        << what << ": max |diff| = " << (actual - expected).abs().max().item<double>();
  }

 private:
  torch::jit::Module module_;
  std::string case_;
  std::map<std::string, torch::Tensor> inputs_;
};

TEST(GoldenLora, Plain) {
  Golden g("lora");
  auto y = F::lora(g.input("x"), g.input("W"), g.input("b"), g.input("A"), g.input("B"),
                   F::LoraFuncOptions().scaling(peft::LoraOptions(2).lora_alpha(4).scaling()));
  g.expect_matches(y, {"x", "A", "B"});
}

TEST(GoldenLora, RsLoraScaling) {
  Golden g("lora_rslora");
  auto y = F::lora(g.input("x"), g.input("W"), g.input("b"), g.input("A"), g.input("B"),
                   F::LoraFuncOptions().scaling(peft::LoraOptions(2).lora_alpha(4).use_rslora(true).scaling()));
  g.expect_matches(y, {"x", "A", "B"});
}

TEST(GoldenLora, FanInFanOut) {
  Golden g("lora_fan");
  auto y = F::lora(g.input("x"), g.input("W"), g.input("b"), g.input("A"), g.input("B"),
                   F::LoraFuncOptions().scaling(2.0).fan_in_fan_out(true));
  g.expect_matches(y, {"A", "B"});
}

TEST(GoldenLora, PerSliceOnFusedProjection) {
  Golden g("lora_slices");
  auto opts = F::LoraFuncOptions().scaling(2.0).enable_slices({true, false, true});
  auto y = F::lora(g.input("x"), g.input("W"), g.input("b"), g.input("A"), g.input("B"), opts);
  g.expect_matches(y, {"A", "B"});
  // The merged weight gives the same output, and the k slice is untouched.
  auto delta = F::lora_delta_weight(g.get("A"), g.get("B"), opts);
  EXPECT_TRUE(delta.slice(0, 3, 6).eq(0).all().item<bool>());
  Golden::expect_close(F::base_linear(g.get("x"), g.get("W") + delta, g.get("b"), false), g.get("y"), "merged slices");
}

TEST(GoldenLora, Dora) {
  Golden g("dora");
  auto y = F::dora(g.input("x"), g.input("W"), g.input("b"), g.input("A"), g.input("B"), g.input("m"),
                   F::LoraFuncOptions().scaling(2.0));
  g.expect_matches(y, {"x", "A", "B", "m"});
}

TEST(GoldenLora, Embedding) {
  Golden g("lora_embedding");
  torch::nn::Embedding table(10, 4);
  peft::LoRAEmbedding layer(table, peft::LoraOptions(2).lora_alpha(4));
  {
    torch::NoGradGuard no_grad;
    table->weight.copy_(g.get("T"));
    layer->lora_embedding_A.copy_(g.get("A"));
    layer->lora_embedding_B.copy_(g.get("B"));
  }
  auto y = layer(g.get("ids"));
  Golden::expect_close(y, g.get("y"), "lora_embedding output");
  (y * g.get("g")).sum().backward();
  Golden::expect_close(layer->lora_embedding_A.grad(), g.get("grad_A"), "lora_embedding d/dA");
  Golden::expect_close(layer->lora_embedding_B.grad(), g.get("grad_B"), "lora_embedding d/dB");
}

TEST(GoldenLora, PissaInitMatchesSvdFormula) {
  Golden g("pissa");
  torch::nn::Linear base(6, 5);
  {
    torch::NoGradGuard no_grad;
    base->weight.copy_(g.get("W"));
  }
  peft::LoRALinear layer(base, peft::LoraOptions(2).lora_alpha(4).init_lora_weights(peft::LoraInit::PiSSA));
  // Sign-free comparisons: singular vectors are defined up to sign.
  Golden::expect_close(torch::matmul(layer->lora_B, layer->lora_A).detach(), g.get("BA"), "pissa B·A");
  Golden::expect_close(base->weight, g.get("residual"), "pissa residual weight");
  // Residual + update reproduces the original layer.
  auto x = torch::randn({3, 6});
  Golden::expect_close(layer(x).detach(), F::base_linear(x, g.get("W"), base->bias, false), "pissa output");
}

TEST(GoldenIA3, OutputScaling) {
  Golden g("ia3");
  auto y = F::ia3(F::base_linear(g.input("x"), g.get("W"), g.get("b"), false), g.input("l"));
  g.expect_matches(y, {"x", "l"});
}

TEST(GoldenIA3, FeedforwardInputScaling) {
  Golden g("ia3_ff");
  auto y = F::base_linear(F::ia3(g.input("x"), g.input("l")), g.get("W"), g.get("b"), false);
  g.expect_matches(y, {"x", "l"});
}

TEST(GoldenAdapter, HoulsbyBottleneck) {
  Golden g("adapter");
  auto y = F::bottleneck(g.input("h"), g.input("Wd"), g.input("bd"), g.input("Wu"), g.input("bu"),
                      peft::BottleneckActivation::GELU);
  g.expect_matches(y, {"h", "Wd", "bd", "Wu", "bu"});
}

TEST(GoldenPrompt, Prepend) {
  Golden g("prompt");
  g.expect_matches(F::prepend_prompt(g.input("X"), g.input("P")), {"X", "P"});
}

TEST(GoldenPrefix, GroupedQueryCausalWithPadding) {
  Golden g("prefix_causal");
  auto y = F::prefix_attention(g.input("q"), g.get("k"), g.get("v"), g.input("pk"), g.input("pv"),
                               F::PrefixAttentionFuncOptions().key_padding_mask(g.get("pad")).is_causal(true));
  g.expect_matches(y, {"q", "pk", "pv"});
}

TEST(GoldenPrefix, AdditiveMaskWithPadding) {
  Golden g("prefix_additive");
  auto y = F::prefix_attention(g.input("q"), g.get("k"), g.get("v"), g.input("pk"), g.input("pv"),
                               F::PrefixAttentionFuncOptions().key_padding_mask(g.get("pad")).attn_mask(g.get("additive")));
  g.expect_matches(y, {"q", "pk", "pv"});
}

TEST(GoldenPrefix, BooleanCausalMaskEqualsIsCausal) {
  Golden g("prefix_causal");
  auto causal_mask = torch::ones({3, 3}, torch::kBool).triu(1);
  auto y = F::prefix_attention(g.get("q"), g.get("k"), g.get("v"), g.get("pk"), g.get("pv"),
                               F::PrefixAttentionFuncOptions().key_padding_mask(g.get("pad")).attn_mask(causal_mask));
  Golden::expect_close(y, g.get("y"), "prefix with boolean causal attn_mask");
}

TEST(PrefixAttentionModule, EqualsBaseAttentionOverPrependedTokens) {
  // A prefix equal to the projected keys/values of P extra tokens must give what
  // LibTorch's own MultiheadAttention gives with those tokens prepended to the keys.
  torch::manual_seed(3);
  const int64_t E = 8, H = 2, P = 3, T = 4, B = 2;
  torch::nn::MultiheadAttention mha(E, H);
  mha->eval();
  peft::PrefixAttention layer(mha, peft::PrefixOptions(P));
  layer->eval();
  auto x = torch::randn({T, B, E}), extra = torch::randn({P, B, E}).narrow(1, 0, 1);
  auto w = mha->in_proj_weight.chunk(3, 0);
  auto b = mha->in_proj_bias.chunk(3, 0);
  auto to_heads = [&](const torch::Tensor& t) { return t.view({P, H, E / H}).permute({1, 0, 2}); };  // [H, P, d]
  {
    torch::NoGradGuard no_grad;
    auto e = extra.squeeze(1);
    layer->prefix[0].copy_(to_heads(torch::nn::functional::linear(e, w[1], b[1])));
    layer->prefix[1].copy_(to_heads(torch::nn::functional::linear(e, w[2], b[2])));
  }
  auto pad = torch::tensor({0, 0, 0, 0, 0, 0, 1, 1}, torch::kBool).view({B, T});
  // LibTorch 1.13's C++ MultiheadAttention adds a boolean attn_mask instead of
  // masking with it, so the reference gets the causal mask in additive form.
  auto causal = torch::zeros({T, T}).masked_fill(torch::ones({T, T}, torch::kBool).triu(1),
                                                 -std::numeric_limits<float>::infinity());
  auto ours = layer(x, x, x, pad, torch::Tensor(), /*is_causal=*/true);

  auto keys = torch::cat({extra.expand({P, B, E}), x}, 0);
  auto ref = std::get<0>(mha(x, keys, keys, F::prepend_visible(pad, P, false), /*need_weights=*/false,
                             F::prepend_visible(causal, P, 0)));
  EXPECT_TRUE(torch::allclose(ours, ref, 1e-5, 1e-5)) << (ours - ref).abs().max();
}

}  // namespace
