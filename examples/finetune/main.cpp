// peft-finetune: LoRA fine-tune of a pretrained TorchScript model. It loads the
// GPT-2-style fixture, injects LoRA into every fused attention projection
// (c_attn) and MLP input (c_fc) with peft::get_peft_model, and trains only the
// LoRA factors to continue counting sequences (t, t+1, ...), printing the loss.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

#include "common/threads.h"

namespace {

/// A batch of counting sequences starting at random tokens: next = current + 1 (mod vocab).
torch::Tensor counting_batch(int64_t batch, int64_t length, int64_t vocab) {
  torch::Tensor start = torch::randint(vocab, {batch, 1}, torch::kLong);
  return (start + torch::arange(length, torch::kLong)).remainder(vocab);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LoRA fine-tune of a TorchScript GPT-2-style model"};
  std::string model_path = std::string(PEFT_FIXTURE_DIR) + "/gpt2_scripted.pt", out;
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
  app.add_option("--out", out, "save the adapted TorchScript model here (loads in plain PyTorch)");
  CLI11_PARSE(app, argc, argv);
  peft_examples::configure_threads(argv, threads);
  peft::jit::set_graph_optimization(false);  // eager autograd: faster training on CPU
  torch::manual_seed(0);

  torch::jit::Module base = torch::jit::load(model_path);
  auto config = peft::LoraConfig().r(r).lora_alpha(alpha).target_modules({"c_attn", "c_fc"}).fan_in_fan_out(true);
  peft::PeftModel model = peft::get_peft_model(base, config);
  model.train();
  model.print_trainable_parameters();

  const int64_t vocab = peft::jit::base_tensor(base, "lm_head", "weight").size(0);
  torch::optim::AdamW optimizer(model.trainable_parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.0));
  double first_loss = 0, last_loss = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    torch::Tensor ids = counting_batch(batch, 16, vocab);
    torch::Tensor logits = model.forward({ids.slice(1, 0, -1)}).toTensor();
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, vocab}), ids.slice(1, 1).reshape({-1}));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    last_loss = loss.item<double>();
    if (step == 1) first_loss = last_loss;
    if (step == 1 || step % 10 == 0) fmt::print("step {:4d}  loss {:.4f}\n", step, last_loss);
  }
  fmt::print("loss {:.4f} -> {:.4f} ({})\n", first_loss, last_loss, last_loss < first_loss ? "decreased" : "did NOT decrease");
  if (!out.empty()) {
    model.module().save(out);
    fmt::print("saved the adapted model to {}\n", out);
  }
  return last_loss < first_loss ? 0 : 1;
}
