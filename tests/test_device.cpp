// The library on a CUDA device (every test skips where LibTorch sees none):
// adapters live on the base model's device, outputs match the CPU run (1e-4:
// different kernels), training steps run there, files move between devices.
#include <gtest/gtest.h>
#include <peft/peft.h>
#include <torch/script.h>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }

  /// The LLaMA fixture on `device`, in eval mode.
  static torch::jit::Module llama(const torch::Device& device) {
    torch::jit::Module m = peft_test::load_fixture("llama", "scripted");
    m.to(device);
    m.eval();
    return m;
  }

  /// Sets every trainable tensor of both models to the same random values.
  static void same_random_adapters(peft::PeftModel& cpu, peft::PeftModel& gpu) {
    torch::NoGradGuard no_grad;
    torch::manual_seed(9);
    auto a = cpu.trainable_parameters(), b = gpu.trainable_parameters();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].add_(0.2 * torch::randn_like(a[i]));
      b[i].copy_(a[i]);
    }
  }

  const torch::Device cuda{torch::kCUDA};
  const peft_test::Reference ref = peft_test::load_reference("llama");
};

std::vector<torch::jit::IValue> on(const std::vector<torch::jit::IValue>& inputs, const torch::Device& device) {
  std::vector<torch::jit::IValue> out;
  for (const auto& v : inputs) out.emplace_back(v.toTensor().to(device));
  return out;
}

TEST_F(Cuda, EveryMethodMatchesTheCpuAndTrainsOnTheDevice) {
  const std::vector<std::pair<std::string, peft::PeftConfig>> configs{
      {"lora", peft::LoraConfig().r(4).target_modules({"q_proj", "v_proj"})},
      {"dora", peft::LoraConfig().r(4).use_dora(true).target_modules({"q_proj", "v_proj"})},
      {"qlora", peft::LoraConfig().r(4).target_modules("all-linear").quantize_base(peft::NF4Config())},
      {"ia3", peft::IA3Config().target_modules({"k_proj", "v_proj", "down_proj"}).feedforward_modules({"down_proj"})},
      {"prompt", peft::PromptTuningConfig().num_virtual_tokens(3)},
      {"prefix", peft::PrefixTuningConfig().num_virtual_tokens(2)},
      {"bitfit", peft::BitFitConfig().norm(true)}};
  for (const auto& [name, config] : configs) {
    peft::PeftModel cpu = peft::get_peft_model(llama(torch::kCPU), config);
    peft::PeftModel gpu = peft::get_peft_model(llama(cuda), config);
    same_random_adapters(cpu, gpu);
    cpu.eval(), gpu.eval();
    for (const auto& t : gpu.trainable_parameters()) EXPECT_TRUE(t.is_cuda()) << name << ": an adapter tensor is not on CUDA";
    {
      torch::NoGradGuard no_grad;
      torch::Tensor expected = cpu.forward(ref.inputs).toTensor();
      torch::Tensor out = gpu.forward(on(ref.inputs, cuda)).toTensor();
      ASSERT_TRUE(out.is_cuda()) << name;
      EXPECT_TRUE(torch::allclose(out.cpu(), expected, 1e-4, 1e-4))
          << name << ": max |diff| " << (out.cpu() - expected).abs().max().item<double>();
    }
    gpu.train();
    torch::optim::AdamW opt(gpu.trainable_parameters(), 1e-3);
    torch::Tensor loss = gpu.forward(on(ref.inputs, cuda)).toTensor().pow(2).mean();
    loss.backward();
    opt.step();
    for (const auto& t : gpu.trainable_parameters())
      EXPECT_TRUE(t.grad().defined() && t.grad().is_cuda()) << name << ": no gradient on the device";
  }
}

TEST_F(Cuda, NF4IsBitIdenticalOnTheDevice) {
  torch::manual_seed(2);
  torch::Tensor W = torch::randn({257, 130});
  const auto cpu = peft::nf4::quantize(W, peft::NF4Config());
  const auto gpu = peft::nf4::quantize(W.to(cuda), peft::NF4Config());
  EXPECT_TRUE(torch::equal(gpu.packed.cpu(), cpu.packed));
  EXPECT_TRUE(torch::equal(gpu.absmax.cpu(), cpu.absmax));
  EXPECT_TRUE(torch::equal(gpu.nested_absmax.cpu(), cpu.nested_absmax));
  EXPECT_TRUE(torch::allclose(peft::nf4::dequantize(gpu).cpu(), peft::nf4::dequantize(cpu), 0, 1e-7));
}

TEST_F(Cuda, NativeQLoRALinearMovesWithItsModule) {
  torch::manual_seed(3);
  peft::LoRALinear q(torch::nn::Linear(64, 32), peft::LoraOptions(4).init_lora_weights(peft::LoraInit::Random)
                                                    .quantize_base(peft::NF4Config().compute_dtype(torch::kBFloat16)));
  torch::Tensor x = torch::randn({5, 64});
  torch::Tensor expected = q(x).detach();
  q->to(cuda);
  ASSERT_TRUE(q->quantized()->packed.is_cuda());
  torch::Tensor out = q(x.to(cuda));
  EXPECT_TRUE(torch::allclose(out.cpu(), expected, 1e-2, 1e-2)) << (out.cpu() - expected).abs().max().item<double>();
  out.sum().backward();
  EXPECT_TRUE(q->lora_A.grad().is_cuda());
}

TEST_F(Cuda, AdapterSavedFromTheDeviceLoadsOnTheCpu) {
  peft::PeftModel gpu = peft::get_peft_model(llama(cuda), peft::LoraConfig().r(4).target_modules({"q_proj", "v_proj"}));
  peft::PeftModel cpu_twin = peft::get_peft_model(llama(torch::kCPU), peft::LoraConfig().r(4).target_modules({"q_proj", "v_proj"}));
  same_random_adapters(cpu_twin, gpu);
  gpu.eval();
  const fs::path dir = peft_test::fresh_dir("cuda_adapter");
  gpu.save_pretrained(dir);
  peft::PeftModel loaded = peft::PeftModel::from_pretrained(llama(torch::kCPU), dir);
  loaded.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor out = loaded.forward(ref.inputs).toTensor();
  torch::Tensor expected = gpu.forward(on(ref.inputs, cuda)).toTensor().cpu();
  EXPECT_TRUE(torch::allclose(out, expected, 1e-4, 1e-4)) << (out - expected).abs().max().item<double>();
}

}  // namespace
