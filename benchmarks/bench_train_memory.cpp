// peft-bench-train: one training (or inference) configuration per process, for
// benchmarks/train_memory.sh to alternate with the Python peer (peer_gpt2.py):
// prints the median step time and the process's peak RSS.
//
//   peft-bench-train make DIR [--shape gpt2-small|llama-1b]     a random HF folder
//   peft-bench-train --model DIR --method lora [--checkpointing] [--chunked-loss]
//   peft-bench-train --model DIR --infer base|unmerged|merged
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

#include <sys/resource.h>

#include <chrono>
#include <optional>

#include "common/program.h"

namespace {

using Clock = std::chrono::steady_clock;

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

/// HF's config.json of GPT-2 small (124 M) or of a 1.2 B Llama shape (Llama 3.2 1B's).
nlohmann::json shape_config(const std::string& shape) {
  if (shape == "gpt2-small")
    return {{"model_type", "gpt2"}, {"vocab_size", 50257}, {"n_embd", 768}, {"n_layer", 12}, {"n_head", 12}, {"n_positions", 1024}};
  if (shape == "llama-1b")
    return {{"model_type", "llama"},       {"vocab_size", 128256},     {"hidden_size", 2048},   {"intermediate_size", 8192},
            {"num_hidden_layers", 16},     {"num_attention_heads", 32}, {"num_key_value_heads", 8}, {"tie_word_embeddings", true},
            {"rope_theta", 500000.0},      {"max_position_embeddings", 2048}};
  throw peft::OptionError("--shape must be gpt2-small or llama-1b, got '" + shape + "'");
}

/// LoRA r=8 on the attention's query and value (GPT-2: the fused c_attn); QLoRA: over an NF4 base of every block linear.
peft::LoraConfig lora_config(const std::string& model_type, bool qlora) {
  auto c = peft::LoraConfig().r(8).lora_alpha(16).lora_dropout(0.05);
  c = model_type == "gpt2" ? c.target_modules({"c_attn"}) : c.target_modules({"q_proj", "v_proj"});
  return qlora ? c.quantize_base(peft::NF4Config().quantize_all_linear(true)) : c;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Training memory and step time of one configuration (benchmarks/train_memory.sh)"};
  std::string model_dir, method = "lora", infer, shape = "gpt2-small", make_dir;
  bool checkpointing = false, chunked = false;
  int threads = 2, steps = 3, batch = 4, seq = 128;
  auto* make = app.add_subcommand("make", "write a random HF folder of --shape");
  make->add_option("dir", make_dir, "the folder")->required();
  make->add_option("--shape", shape, "gpt2-small or llama-1b");
  app.add_option("--model", model_dir, "HF folder (peft-bench-train make)");
  app.add_option("--method", method, "full, lora or qlora")->check(CLI::IsMember({"full", "lora", "qlora"}));
  app.add_option("--infer", infer, "inference instead: base, unmerged or merged")->check(CLI::IsMember({"base", "unmerged", "merged"}));
  app.add_flag("--checkpointing", checkpointing, "gradient checkpointing per decoder layer");
  app.add_flag("--chunked-loss", chunked, "the causal-LM loss without the full logits (CausalLM::loss)");
  app.add_option("--steps", steps, "measured steps after one warm-up step (0: the warm-up step alone, timed)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch", batch)->check(CLI::PositiveNumber);
  app.add_option("--seq", seq)->check(CLI::PositiveNumber);
  app.add_option("--threads", threads)->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(threads);
  torch::manual_seed(0);

  if (*make) {
    peft::hf::PretrainedConfig config{shape_config(shape)["model_type"], shape_config(shape), shape};
    peft::hf::save_pretrained(*peft::hf::AutoModelForCausalLM::from_config(config), make_dir);
    fmt::print("wrote {}\n", make_dir);
    return 0;
  }
  peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_pretrained(model_dir);
  const std::string model_type = model->config.model_type;
  const int64_t vocab = model->output_layer()->weight.size(0);
  std::optional<peft::nn::PeftModel> peft_model;
  std::vector<torch::Tensor> trainable;
  if (infer == "base") {
    // the loaded model alone
  } else if (method == "full") {
    for (auto& p : model->parameters()) p.set_requires_grad(true), trainable.push_back(p);  // a tied head is one tensor
  } else {
    peft_model.emplace(peft::get_peft_model(model, lora_config(model_type, method == "qlora")));
    trainable = peft_model->trainable_parameters();
  }
  model->gradient_checkpointing(checkpointing);
  const torch::Tensor ids = torch::randint(vocab, {batch, seq}, torch::kLong);
  std::vector<double> times;

  if (!infer.empty()) {
    model->eval();
    if (infer == "merged") peft_model->merge_adapter();
    torch::NoGradGuard no_grad;
    for (int i = 0; i <= steps; ++i) {
      const auto start = Clock::now();
      model->forward(ids);
      if (i > 0 || steps == 0) times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
  } else {
    model->train();
    torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-4));
    for (int i = 0; i <= steps; ++i) {
      const auto start = Clock::now();
      torch::Tensor loss;
      if (chunked) {
        loss = model->loss(ids);
      } else {
        torch::Tensor logits = model->forward(ids);
        loss = torch::nn::functional::cross_entropy(logits.narrow(1, 0, seq - 1).reshape({-1, vocab}).to(torch::kFloat),
                                                    ids.narrow(1, 1, seq - 1).reshape({-1}));
      }
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      if (i > 0 || steps == 0) times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
  }
  fmt::print("step_s {:.4f}\npeak_rss_mib {:.0f}\n", median(times), peak_rss_mib());
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-bench-train", [&] { return run(argc, argv); });
}
