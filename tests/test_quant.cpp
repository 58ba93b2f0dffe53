// NF4 quantisation and QLoRA. References: bitsandbytes' CUDA quantisation
// kernel (csrc/kernels.cu) transcribed in Python (tools/golden_nf4.py ->
// tests/data/golden_nf4.pt, bit-identical), a scalar transcription of its
// dQuantize<0> here, NF4's error bound, and LoRA over the dequantised weights
// (1e-5), on native modules and on the TorchScript fixtures.
#include <gtest/gtest.h>
#include <peft/peft.h>
#include <torch/script.h>

#include <cmath>
#include <limits>

#include "fixtures.h"

namespace {

using peft_test::expect_error;

class NF4Golden : public ::testing::TestWithParam<std::string> {
 protected:
  torch::Tensor get(const std::string& name) const { return golden_.attr(GetParam() + "__" + name).toTensor(); }
  bool has(const std::string& name) const { return golden_.hasattr(GetParam() + "__" + name); }
  torch::jit::Module golden_ = torch::jit::load(std::string(PEFT_SOURCE_DIR) + "/tests/data/golden_nf4.pt");
};

/// Where two tensors of equal shape differ first (for the failure message).
std::string first_difference(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes()) return "shapes differ";
  torch::Tensor differ = a.flatten().to(torch::kDouble).ne(b.flatten().to(torch::kDouble)).nonzero();
  if (differ.numel() == 0) return "equal";  // NaN, or dtypes differ
  const int64_t i = differ[0].item<int64_t>();
  return "first at " + std::to_string(i) + " of " + std::to_string(differ.numel()) + ": " +
         std::to_string(a.flatten()[i].item<double>()) + " vs " + std::to_string(b.flatten()[i].item<double>());
}

TEST_P(NF4Golden, PackedBytesAndAbsmaxAreBitIdenticalToBitsandbytes) {
  const bool double_quant = has("nested_absmax");
  const auto q = peft::nf4::quantize(
      get("input"), peft::NF4Config().blocksize(get("blocksize").item<int64_t>()).double_quant(double_quant));
  EXPECT_TRUE(torch::equal(q.packed, get("packed"))) << "packed bytes: " << first_difference(q.packed, get("packed"));
  EXPECT_TRUE(torch::equal(q.absmax, get("absmax"))) << "absmax: " << first_difference(q.absmax, get("absmax"));
  if (double_quant) {
    EXPECT_TRUE(torch::equal(q.nested_absmax, get("nested_absmax")))
        << "nested absmax: " << first_difference(q.nested_absmax, get("nested_absmax"));
    EXPECT_TRUE(torch::equal(q.nested_offset, get("nested_offset")));
  }
  // The double-quantisation code book comes from torch.linspace, as in bitsandbytes,
  // whose last bit differs between LibTorch builds (1.13 here vs pip 2.11): the bytes
  // stay identical, the dequantised values then agree to float rounding.
  const torch::Tensor golden_dynamic = golden_.attr("dynamic_code").toTensor();
  const bool same_code_book = torch::equal(peft::nf4::dynamic_code(), golden_dynamic);
  const torch::Tensor deq = peft::nf4::dequantize(q);
  EXPECT_TRUE(same_code_book ? torch::equal(deq, get("dequantized")) : torch::allclose(deq, get("dequantized"), 1e-6, 0))
      << "max |diff| " << (deq - get("dequantized")).abs().max().item<double>();
}

INSTANTIATE_TEST_SUITE_P(Cases, NF4Golden,
                         ::testing::Values("w64", "odd", "many", "heavy", "big_block", "thresholds_unit",
                                           "thresholds_scaled", "thresholds_small", "thresholds_b32", "odd_pad7",
                                           "odd_zero_tail", "one_element", "zero_blocks", "all_zero", "denormal",
                                           "dq_midpoints_neg", "dq_midpoints_pos"));

TEST(NF4, ThresholdsAreTheKernelsLiteralsAndAValueOnOneStaysBelow) {
  auto golden = torch::jit::load(std::string(PEFT_SOURCE_DIR) + "/tests/data/golden_nf4.pt");
  const torch::Tensor t = peft::nf4::nf4_thresholds();
  // The C++ compiler and the Python transcription (exact decimal -> fp32) read the literals alike.
  EXPECT_TRUE(torch::equal(t, golden.attr("nf4_thresholds").toTensor()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float ti = t[i].item<float>();
    const torch::Tensor x = torch::tensor({std::nextafter(ti, -2.0f), ti, std::nextafter(ti, 2.0f)});
    const torch::Tensor index = peft::nf4::nf4_index(x).to(torch::kLong);
    EXPECT_EQ(index[0].item<int64_t>(), i) << ti;
    EXPECT_EQ(index[1].item<int64_t>(), i) << ti;  // strict x > t
    EXPECT_EQ(index[2].item<int64_t>(), i + 1) << ti;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(peft::nf4::nf4_index(torch::tensor({nan})).item<int64_t>(), 0);
}

TEST(NF4, OddLengthPadNibbleIsTheCodeOfZero) {
  // The kernel loads the element after an odd n as 0.0: 0·(1/absmax) = 0 -> index 7.
  torch::manual_seed(8);
  for (int64_t n : {1, 33, 65, 127}) {
    torch::Tensor w = torch::randn({n}) + 3.0;  // no zero, so nothing else is index 7
    const auto q = peft::nf4::quantize(w, peft::NF4Config().blocksize(32).double_quant(false));
    ASSERT_EQ(q.packed.numel(), (n + 1) / 2);
    EXPECT_EQ(q.packed[-1].item<int64_t>() & 0x0F, 7) << "n = " << n;
    EXPECT_EQ(peft::nf4::dequantize(q).numel(), n);
  }
  // ... unless the last block is all zero: 0·inf = NaN -> index 0, the byte 0x00.
  torch::Tensor w = torch::randn({65});
  w[64] = 0.0;
  const auto q = peft::nf4::quantize(w, peft::NF4Config().blocksize(64).double_quant(false));
  EXPECT_EQ(q.packed[-1].item<int64_t>(), 0x00);
  EXPECT_EQ(q.absmax[-1].item<float>(), 0.0f);
}

TEST(NF4, AllZeroBlockIsByteZeroAndDequantisesToZero) {
  torch::Tensor w = torch::randn({4, 64});
  w[2] = 0.0;
  for (bool dq : {false, true}) {
    const auto q = peft::nf4::quantize(w, peft::NF4Config().blocksize(64).double_quant(dq));
    EXPECT_TRUE(torch::equal(q.packed.slice(0, 64, 96), torch::zeros({32}, torch::kUInt8)));
    EXPECT_GT(q.packed.slice(0, 0, 64).to(torch::kInt).sum().item<int64_t>(), 0);
    if (!dq) {  // (with double quantisation the absmax is a code, and the offset comes back)
      EXPECT_EQ(q.absmax[2].item<float>(), 0.0f);
      EXPECT_TRUE(torch::equal(peft::nf4::dequantize(q)[2].abs(), torch::zeros({64})));  // code[0]·0 = -0
    }
  }
}

/// bitsandbytes' dQuantize<0> (csrc/kernels.cu), one value at a time, as written there.
int scalar_dquantize(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f, val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? upper_pivot : pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? lower_pivot : pivot;
}

TEST(NF4, DynamicMapSearchFollowsTheKernelAtTies) {
  const torch::Tensor table = peft::nf4::dynamic_code();
  const float* code = table.data_ptr<float>();
  std::vector<float> xs{std::numeric_limits<float>::quiet_NaN(), -2.0f, 2.0f, -0.0f};
  for (int k = 0; k < 256; ++k) {
    xs.insert(xs.end(), {code[k], std::nextafter(code[k], -2.0f), std::nextafter(code[k], 2.0f)});
    if (k == 255) break;
    const float mid = (code[k] + code[k + 1]) * 0.5f;
    xs.insert(xs.end(), {mid, std::nextafter(mid, -2.0f), std::nextafter(mid, 2.0f)});
  }
  torch::manual_seed(9);
  torch::Tensor random = torch::rand({2000}) * 2 - 1;
  xs.insert(xs.end(), random.data_ptr<float>(), random.data_ptr<float>() + random.numel());
  const torch::Tensor got = peft::nf4::dynamic_index(torch::tensor(xs), table).to(torch::kInt);
  for (size_t i = 0; i < xs.size(); ++i)
    ASSERT_EQ(got[static_cast<int64_t>(i)].item<int>(), scalar_dquantize(code, xs[i])) << "x = " << xs[i];
  // Known ties: a value on a midpoint goes to the even index of the two (the final pivot),
  // i.e. up between 1 and 2, down between 2 and 3; NaN goes to 0.
  auto index_of = [&](float x) { return peft::nf4::dynamic_index(torch::tensor({x}), table).item<int>(); };
  EXPECT_EQ(index_of((code[1] + code[2]) * 0.5f), 2);
  EXPECT_EQ(index_of((code[2] + code[3]) * 0.5f), 2);
  EXPECT_EQ(index_of((code[253] + code[254]) * 0.5f), 254);
  EXPECT_EQ(index_of((code[254] + code[255]) * 0.5f), 254);
  EXPECT_EQ(index_of((code[127] + code[128]) * 0.5f), 128);
  EXPECT_EQ(index_of(std::numeric_limits<float>::quiet_NaN()), 0);
}

TEST(NF4, CodeBooksMatchBitsandbytes) {
  auto golden = torch::jit::load(std::string(PEFT_SOURCE_DIR) + "/tests/data/golden_nf4.pt");
  EXPECT_TRUE(torch::equal(peft::nf4::code(), golden.attr("nf4_code").toTensor()));
  // Built with torch.linspace by both: equal on the same LibTorch build, within an ulp across builds.
  EXPECT_TRUE(torch::allclose(peft::nf4::dynamic_code(), golden.attr("dynamic_code").toTensor(), 2e-7, 0));
}

/// |dequantize(quantize(W)) − W| within NF4's bound, element by element.
void expect_within_bound(const torch::Tensor& W, const peft::NF4Config& config, const std::string& what) {
  const auto q = peft::nf4::quantize(W, config);
  torch::Tensor error = (peft::nf4::dequantize(q) - W).abs();
  torch::Tensor slack = peft::nf4::error_bound(W, q) + 1e-7 - error;
  EXPECT_GE(slack.min().item<double>(), 0) << what << ": max error " << error.max().item<double>();
  // And NF4 is useful: the mean error is a small fraction of the weights' scale
  // (Gaussian weights: about 0.08 at block 64, 0.1 at block 4096).
  EXPECT_LT(error.mean().item<double>(), 0.15 * W.abs().mean().item<double>()) << what;
}

TEST(NF4, ErrorWithinTheBoundOnRandomAndRealWeights) {
  torch::manual_seed(3);
  for (int64_t block : {32, 64, 256, 4096})
    for (bool dq : {false, true})
      expect_within_bound(torch::randn({96, 160}), peft::NF4Config().blocksize(block).double_quant(dq),
                          "random, block " + std::to_string(block));
#ifdef PEFT_USE_LITE  // real pretrained weights (built with PEFT_WITH_ASSETS)
  torch::jit::Module use_lite = torch::jit::load(PEFT_USE_LITE);
  int checked = 0;
  for (const auto& p : use_lite.named_parameters())
    if (p.value.dim() == 2 && p.value.size(0) >= 64 && ++checked <= 8) expect_within_bound(p.value, peft::NF4Config(), p.name);
  EXPECT_GE(checked, 8);
#endif
}

TEST(NF4, DoubleQuantisationStoresAbout4Point13BitsPerWeight) {
  const auto q = peft::nf4::quantize(torch::randn({768, 768}), peft::NF4Config());
  const double bits = 8.0 * static_cast<double>(q.bytes()) / static_cast<double>(q.numel());
  EXPECT_NEAR(bits, 4.127, 0.01);
  EXPECT_LE(static_cast<double>(q.bytes()) / (4.0 * q.numel()), 0.14);
  const auto single = peft::nf4::quantize(torch::randn({768, 768}), peft::NF4Config().double_quant(false));
  EXPECT_NEAR(8.0 * single.bytes() / single.numel(), 4.5, 0.01);
}

TEST(NF4, BadOptionsAndInputsRaiseTypedErrors) {
  expect_error<peft::OptionError>([] { peft::nf4::quantize(torch::randn({8, 8}), peft::NF4Config().blocksize(48)); },
                                  {"NF4Config.blocksize", "48"});
  expect_error<peft::OptionError>([] { peft::nf4::quantize(torch::randn({8, 8}), peft::NF4Config().blocksize(8192)); },
                                  {"power of two in [32, 4096]"});
  expect_error<peft::ShapeError>([] { peft::nf4::quantize(torch::ones({4}, torch::kLong), peft::NF4Config()); },
                                 {"floating-point"});
  expect_error<peft::OptionError>(
      [] { peft::nf4::quantize(torch::randn({8, 8}), peft::NF4Config().compute_dtype(torch::kInt)); },
      {"compute_dtype"});
}

// ------------------------------------------------------------------ native

TEST(QLoRALinear, ForwardEqualsLoRAOverTheDequantisedWeight) {
  torch::manual_seed(5);
  torch::nn::Linear base(96, 64), reference_base(96, 64);
  const peft::NF4Config nf4;
  {
    torch::NoGradGuard no_grad;
    reference_base->weight.copy_(peft::nf4::dequantize(peft::nf4::quantize(base->weight, nf4)));
    reference_base->bias.copy_(base->bias);
  }
  peft::LoRALinear q(base, peft::LoraOptions(4).lora_alpha(8).init_lora_weights(peft::LoraInit::Random).quantize_base(nf4));
  peft::LoRALinear reference(reference_base, peft::LoraOptions(4).lora_alpha(8).init_lora_weights(peft::LoraInit::Zero));
  {
    torch::NoGradGuard no_grad;
    reference->lora_A.copy_(q->lora_A);
    reference->lora_B.copy_(q->lora_B);
  }
  EXPECT_EQ(base->weight.numel(), 0) << "the fp32 weight was not released";
  torch::Tensor x = torch::randn({3, 5, 96});
  torch::Tensor y = q(x);
  EXPECT_TRUE(torch::allclose(y, reference(x), 1e-5, 1e-5)) << (y - reference(x)).abs().max().item<double>();

  // Only A and B train; the 4-bit weight counts as the weights it stands for.
  const auto count = peft::count_parameters(*q);
  EXPECT_EQ(count.trainable, 4 * 96 + 64 * 4);
  EXPECT_EQ(count.total, 96 * 64 + 64 + 4 * 96 + 64 * 4);
  y.sum().backward();
  EXPECT_TRUE(q->lora_A.grad().defined() && q->lora_B.grad().defined());

  torch::NoGradGuard no_grad;
  q->merge();  // dense merge: exact up to fp rounding
  EXPECT_TRUE(torch::allclose(q(x), y, 1e-5, 1e-5));
  q->unmerge();
  EXPECT_EQ(base->weight.numel(), 0);
  EXPECT_TRUE(torch::allclose(q(x), y, 1e-6, 1e-6));
}

TEST(QLoRALinear, RequantisingMergeWarnsAndUnmergeRestoresTheBytes) {
  torch::manual_seed(6);
  peft::LoRALinear q(torch::nn::Linear(64, 64), peft::LoraOptions(4).init_lora_weights(peft::LoraInit::Random)
                                                    .quantize_base(peft::NF4Config().requantize_on_merge(true)));
  torch::NoGradGuard no_grad;
  const torch::Tensor packed = q->quantized()->packed.clone();
  torch::Tensor x = torch::randn({4, 64});
  torch::Tensor y = q(x);
  // Reference: W + ΔW quantised to NF4 by the same rules.
  torch::Tensor merged_weight = q->base_weight() + q->delta_weight();
  torch::Tensor expected = torch::nn::functional::linear(
      x, peft::nf4::dequantize(peft::nf4::quantize(merged_weight, peft::NF4Config())), q->base->bias);
  q->merge();
  EXPECT_FALSE(torch::equal(q->quantized()->packed, packed));
  EXPECT_TRUE(torch::allclose(q(x), expected, 1e-5, 1e-5)) << (q(x) - expected).abs().max().item<double>();
  q->unmerge();
  EXPECT_TRUE(torch::equal(q->quantized()->packed, packed));
  EXPECT_TRUE(torch::allclose(q(x), y, 1e-6, 1e-6));
}

TEST(QLoRALinear, ComputeDtypeBFloat16StaysCloseToFloat32) {
  torch::manual_seed(7);
  torch::nn::Linear a(64, 32), b(64, 32);
  {
    torch::NoGradGuard no_grad;
    b->weight.copy_(a->weight);
    b->bias.copy_(a->bias);
  }
  peft::LoRALinear fp32(a, peft::LoraOptions(4).quantize_base(peft::NF4Config()));
  peft::LoRALinear bf16(b, peft::LoraOptions(4).quantize_base(peft::NF4Config().compute_dtype(torch::kBFloat16)));
  torch::Tensor x = torch::randn({8, 64});
  torch::Tensor y = bf16(x);
  EXPECT_EQ(y.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::allclose(y, fp32(x), 2e-2, 2e-2)) << (y - fp32(x)).abs().max().item<double>();
}

// -------------------------------------------------------------- TorchScript

peft::LoraConfig qlora_config(const std::string& arch, const peft::NF4Config& nf4 = peft::NF4Config()) {
  auto cfg = peft::LoraConfig().r(4).lora_alpha(8).init_lora_weights(peft::LoraInit::Random).quantize_base(nf4);
  if (arch == "gpt2") return cfg.target_modules({"c_attn", "c_fc"});
  if (arch == "bert") return cfg.target_modules({"query", "value"});
  return cfg.target_modules({"q_proj", "v_proj"});
}

class QLoRAModelTest : public peft_test::FixtureModelTest {};

/// The fixture with every `targets` weight replaced by its NF4 round trip.
torch::jit::Module dequantized_fixture(const std::string& arch, const std::string& kind,
                                       const std::vector<std::string>& targets) {
  torch::jit::Module m = peft_test::load_fixture(arch, kind);
  m.eval();
  torch::NoGradGuard no_grad;
  for (const auto& t : targets) {
    torch::Tensor W = peft::jit::submodule(m, t).attr("weight").toTensor();
    W.copy_(peft::nf4::dequantize(peft::nf4::quantize(W, peft::NF4Config())));
  }
  return m;
}

TEST_P(QLoRAModelTest, ForwardEqualsLoRAOverDequantisedWeightsAndMergeMatches) {
  const auto all_params = peft::PeftModel(peft_test::load_fixture(arch, kind), qlora_config(arch).quantize_base(c10::nullopt))
                              .count_parameters();
  peft::PeftModel qlora = peft::get_peft_model(base, qlora_config(arch));
  qlora.eval();
  std::vector<std::string> targets;
  for (const auto& l : qlora.adapter_layers()) {
    targets.push_back(l.target);
    EXPECT_EQ(peft::jit::submodule(base, l.target).attr("weight").toTensor().numel(), 0)
        << l.target << ": the fp32 weight was not released";
  }
  ASSERT_FALSE(targets.empty());
  EXPECT_EQ(qlora.count_parameters().total, all_params.total) << "4-bit weights must count as the weights they replace";
  EXPECT_EQ(qlora.count_parameters().trainable, all_params.trainable);

  peft::PeftModel reference =
      peft::get_peft_model(dequantized_fixture(arch, kind, targets), qlora_config(arch).quantize_base(c10::nullopt));
  reference.eval();
  torch::NoGradGuard no_grad;
  auto ref_params = reference.named_trainable_parameters();
  auto q_params = qlora.named_trainable_parameters();
  ASSERT_EQ(ref_params.size(), q_params.size());
  for (size_t i = 0; i < q_params.size(); ++i) ref_params[i].second.copy_(q_params[i].second);

  torch::Tensor out = qlora.forward(ref.inputs).toTensor();
  torch::Tensor expected = reference.forward(ref.inputs).toTensor();
  EXPECT_TRUE(torch::allclose(out, expected, 1e-5, 1e-5)) << (out - expected).abs().max().item<double>();

  // The saved QLoRA model (dequantising with standard ops) reproduces the output in plain PyTorch.
  const auto dir = peft_test::fresh_dir("qlora_" + arch + "_" + kind);
  qlora.module().save((dir / "qlora.pt").string());
  peft_test::save_io(dir / "qlora.io.pt", ref.inputs, out);
  EXPECT_EQ(peft_test::run_python_tool("check_torchscript_outputs.py " + dir.string()), 0);

  torch::jit::Module merged = qlora.merge_and_unload();
  torch::Tensor merged_out = merged.forward(ref.inputs).toTensor();
  EXPECT_TRUE(torch::allclose(merged_out, out, 1e-5, 1e-5)) << (merged_out - out).abs().max().item<double>();
  qlora.unmerge_adapter();
  EXPECT_TRUE(torch::allclose(qlora.forward(ref.inputs).toTensor(), out, 1e-6, 1e-6));
}

/// LLaMA fixture (nn.Linear projections), scripted, in eval mode.
struct LlamaQLoRA : ::testing::Test {
  torch::jit::Module base = peft_test::load_fixture("llama", "scripted");
  peft_test::Reference ref = peft_test::load_reference("llama");
};

TEST_F(LlamaQLoRA, TrainsOnlyTheAdapterLikeLoRAOverTheDequantisedBase) {
  peft::PeftModel qlora = peft::get_peft_model(base, qlora_config("llama").init_lora_weights(peft::LoraInit::Default));
  std::vector<std::string> targets;
  for (const auto& l : qlora.adapter_layers()) targets.push_back(l.target);
  peft::PeftModel lora = peft::get_peft_model(dequantized_fixture("llama", "scripted", targets),
                                              qlora_config("llama").quantize_base(c10::nullopt));
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < lora.trainable_parameters().size(); ++i)
      lora.trainable_parameters()[i].copy_(qlora.trainable_parameters()[i]);
  }
  // Target: every output shifted by 1, a direction q/v LoRA can move in.
  const torch::Tensor target = qlora.forward(ref.inputs).toTensor().detach() + 1.0;
  auto train = [&](peft::PeftModel& model) {
    torch::optim::AdamW opt(model.trainable_parameters(), 1e-2);
    std::vector<double> losses;
    for (int i = 0; i < 8; ++i) {
      opt.zero_grad();
      torch::Tensor loss = (model.forward(ref.inputs).toTensor() - target).pow(2).mean();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    return losses;
  };
  const auto q_losses = train(qlora), losses = train(lora);
  EXPECT_LT(q_losses.back(), 0.9 * q_losses.front());
  for (size_t i = 0; i < losses.size(); ++i) EXPECT_NEAR(q_losses[i], losses[i], 1e-4 * losses[i]) << "step " << i;
  for (const auto& p : qlora.module().named_parameters())
    EXPECT_EQ(p.value.grad().defined(), p.name.find("lora_") != std::string::npos) << p.name;
}

TEST_F(LlamaQLoRA, RequantisingMergeStaysWithinNF4AndUnmergeRestoresExactly) {
  peft::PeftModel model = peft::get_peft_model(base, qlora_config("llama", peft::NF4Config().requantize_on_merge(true)));
  model.eval();
  torch::NoGradGuard no_grad;
  const auto weights = peft::jit::submodule(model.module(), "peft_nf4").named_buffers();
  std::map<std::string, torch::Tensor> before;
  for (const auto& b : weights) before[b.name] = b.value.clone();
  std::map<std::string, torch::Tensor> expected;  // W + ΔW per target
  for (const auto& l : model.adapter_layers()) {
    auto m = *peft::nf4::weight_module(model.module(), l.target);
    expected[l.target] = peft::nf4::current_weight(m, torch::kFloat) +
                         peft::functional::lora_delta_weight(l.module.attr("lora_A").toTensor(), l.module.attr("lora_B").toTensor(),
                                                             peft::functional::LoraFuncOptions().scaling(2.0));
  }
  torch::Tensor out = model.forward(ref.inputs).toTensor();
  model.merge_adapter();
  for (const auto& [target, W] : expected) {
    auto m = *peft::nf4::weight_module(model.module(), target);
    torch::Tensor error = (peft::nf4::current_weight(m, torch::kFloat) - W).abs();
    EXPECT_GE((peft::nf4::error_bound(W, peft::nf4::state(m)) + 1e-6 - error).min().item<double>(), 0) << target;
  }
  model.unmerge_adapter();
  for (const auto& b : weights) EXPECT_TRUE(torch::equal(b.value, before.at(b.name))) << b.name;
  EXPECT_TRUE(torch::allclose(model.forward(ref.inputs).toTensor(), out, 1e-6, 1e-6));
}

TEST_F(LlamaQLoRA, ComputeDtypeAndQuantizeAllLinear) {
  peft::PeftModel lean = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), qlora_config("llama"));
  const auto all = peft::NF4Config().quantize_all_linear(true);
  peft::PeftModel fp32 = peft::get_peft_model(peft_test::load_fixture("llama", "scripted"), qlora_config("llama", all));
  peft::PeftModel bf16 =
      peft::get_peft_model(base, qlora_config("llama", peft::NF4Config(all).compute_dtype(torch::kBFloat16)));
  fp32.eval(), bf16.eval();
  const auto quantized = peft::nf4::footprint(bf16.module());
  EXPECT_GT(quantized.weights, peft::nf4::footprint(lean.module()).weights) << "quantize_all_linear added nothing";
  EXPECT_EQ(peft::jit::submodule(base, "lm_head").attr("weight").toTensor().dim(), 2) << "the output head stays";
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < fp32.trainable_parameters().size(); ++i)
    bf16.trainable_parameters()[i].copy_(fp32.trainable_parameters()[i]);
  torch::Tensor a = fp32.forward(ref.inputs).toTensor(), b = bf16.forward(ref.inputs).toTensor();
  EXPECT_EQ(b.scalar_type(), torch::kFloat);
  EXPECT_LT((a - b).abs().max().item<double>(), 0.03 * a.abs().max().item<double>()) << "bf16 has 8 significant bits";
}

TEST_F(LlamaQLoRA, MisuseRaisesTypedErrors) {
  peft::PeftModel model = peft::get_peft_model(base, qlora_config("llama"));
  expect_error<peft::OptionError>([&] { model.add_adapter("second", qlora_config("llama")); },
                                  {"second", "quantize_base applies to the first adapter"});
  expect_error<peft::OptionError>(
      [&] {
        peft::get_peft_model(peft_test::load_fixture("llama", "scripted"),
                             qlora_config("llama").init_lora_weights(peft::LoraInit::PiSSA));
      },
      {"PiSSA", "NF4-quantised"});
  expect_error<peft::TargetError>(
      [&] {
        torch::jit::Module m = peft_test::load_fixture("llama", "scripted");
        peft::nf4::quantize_linear_layers(m, {"model.embed_tokens"}, peft::NF4Config());
      },
      {"model.embed_tokens", "not a linear layer"});
  expect_error<peft::OptionError>(
      [&] { peft::get_peft_model(peft_test::load_fixture("llama", "scripted"),
                                 qlora_config("llama", peft::NF4Config().blocksize(100))); },
      {"blocksize", "100"});
}

INSTANTIATE_TEST_SUITE_P(AllFixtures, QLoRAModelTest, ::testing::ValuesIn(peft_test::all_fixtures()),
                         [](const auto& info) { return peft_test::fixture_name(info.param); });

}  // namespace
