// peft-finetune: the smallest real LoRA fine-tune of a pretrained TorchScript
// model. It loads the GPT-2-style fixture, freezes every weight, adds low-rank
// factors A, B to each block's fused attention projection (c_attn) and MLP input
// (c_fc), and trains only A and B to continue counting sequences (t, t+1, ...).
//
// The adapted weight is W' = W + (alpha/r)·(B·A)ᵀ (GPT-2 stores W as [in, out]),
// written into the frozen module before each forward so autograd reaches A and B.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>

#include "common/threads.h"

namespace {

struct LoraFactor {
  torch::jit::Module owner;  // the Conv1D whose weight is adapted
  torch::Tensor frozen;      // W, [in, out]
  torch::Tensor A, B;        // [r, in], [out, r]
};

bool is_target(const std::string& name) {
  auto ends_with = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return ends_with("attn.c_attn") || ends_with("mlp.c_fc");
}

std::vector<LoraFactor> add_lora(torch::jit::Module& model, int64_t r) {
  for (auto p : model.parameters()) p.set_requires_grad(false);
  std::vector<LoraFactor> factors;
  for (const auto& m : model.named_modules()) {
    if (!is_target(m.name)) continue;
    torch::Tensor w = m.value.attr("weight").toTensor();
    torch::Tensor A = torch::empty({r, w.size(0)}, w.options());
    torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
    factors.push_back({m.value, w, A.requires_grad_(), torch::zeros({w.size(1), r}, w.options()).requires_grad_()});
    fmt::print("LoRA r={} on {} [{} x {}]\n", r, m.name, w.size(0), w.size(1));
  }
  return factors;
}

void write_adapted_weights(std::vector<LoraFactor>& factors, double scaling) {
  for (auto& f : factors)
    f.owner.register_parameter(
        "weight",
        f.frozen + peft::functional::lora_delta_weight(
                       f.A, f.B, peft::functional::LoraFuncOptions().scaling(scaling).fan_in_fan_out(true)),
        /*is_buffer=*/false);
}

/// A batch of counting sequences starting at random tokens: next = current + 1 (mod vocab).
torch::Tensor counting_batch(int64_t batch, int64_t length, int64_t vocab) {
  torch::Tensor start = torch::randint(vocab, {batch, 1}, torch::kLong);
  return (start + torch::arange(length, torch::kLong)).remainder(vocab);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoRA fine-tune of a TorchScript GPT-2-style model"};
  std::string model_path = std::string(PEFT_FIXTURE_DIR) + "/gpt2_scripted.pt";
  int64_t r = 8, steps = 150, batch = 16;
  double alpha = 16, lr = 1e-2;
  int threads = 0;
  app.add_option("--model", model_path, "TorchScript GPT-2-style model")->check(CLI::ExistingFile);
  app.add_option("--r", r, "LoRA rank")->check(CLI::PositiveNumber);
  app.add_option("--alpha", alpha, "LoRA alpha (scaling = alpha / r)");
  app.add_option("--steps", steps, "training steps")->check(CLI::PositiveNumber);
  app.add_option("--batch-size", batch, "sequences per step")->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "AdamW learning rate");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  CLI11_PARSE(app, argc, argv);
  peft_examples::configure_threads(argv, threads);
  torch::manual_seed(0);

  torch::jit::Module model = torch::jit::load(model_path);
  model.train();
  std::vector<LoraFactor> factors = add_lora(model, r);
  std::vector<torch::Tensor> trainable;
  for (auto& f : factors) trainable.insert(trainable.end(), {f.A, f.B});
  peft::ParameterCount count;
  for (auto& t : trainable) count.trainable += t.numel();
  for (const auto& p : model.parameters()) count.total += p.numel();
  count.total += count.trainable;
  fmt::print("{}\n", peft::format_trainable_parameters(count));

  const int64_t vocab = model.attr("lm_head").toModule().attr("weight").toTensor().size(0);
  torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(lr).weight_decay(0.0));
  double first_loss = 0, last_loss = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    torch::Tensor ids = counting_batch(batch, 16, vocab);
    write_adapted_weights(factors, alpha / static_cast<double>(r));
    torch::Tensor logits = model.forward({ids.slice(1, 0, -1)}).toTensor();
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, vocab}),
                                                              ids.slice(1, 1).reshape({-1}));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    last_loss = loss.item<double>();
    if (step == 1) first_loss = last_loss;
    if (step == 1 || step % 10 == 0) fmt::print("step {:4d}  loss {:.4f}\n", step, last_loss);
  }
  fmt::print("loss {:.4f} -> {:.4f} ({})\n", first_loss, last_loss,
             last_loss < first_loss ? "decreased" : "did NOT decrease");
  return last_loss < first_loss ? 0 : 1;
}
