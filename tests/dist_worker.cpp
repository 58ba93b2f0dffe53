// One rank of the data-parallel tests (tests/test_distributed.cpp), started by
// peft-launch: LoRA on the LLaMA fixture, K SGD steps over a global batch of B
// synthetic sequences, split across the ranks. Writes its trainable tensors to
// OUT/rank<r>.safetensors and its traffic to OUT/rank<r>.json, or the error it
// met to OUT/rank<r>.error (exit status 2).
#include <peft/distributed/data_parallel.h>
#include <peft/peft.h>
#include <torch/script.h>

#include <filesystem>
#include <fstream>
#include <map>

int main(int argc, char** argv) {
  // --out DIR [--steps K] [--batch B (global)] [--accumulation k] [--timeout-ms T]
  // [--die-rank r --die-step s: rank r exits before step s's all-reduce]
  std::map<std::string, std::string> args{{"--steps", "3"},        {"--batch", "4"},     {"--accumulation", "1"},
                                          {"--timeout-ms", "30000"}, {"--die-rank", "-1"}, {"--die-step", "-1"}};
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  const std::string out = args["--out"];
  const int64_t steps = std::stoll(args["--steps"]), batch = std::stoll(args["--batch"]),
                accumulation = std::stoll(args["--accumulation"]), timeout_ms = std::stoll(args["--timeout-ms"]),
                die_rank = std::stoll(args["--die-rank"]), die_step = std::stoll(args["--die-step"]);
  torch::set_num_threads(1);
  namespace dist = peft::distributed;
  const dist::Environment env = dist::Environment::from_env();
  const std::filesystem::path prefix = std::filesystem::path(out) / ("rank" + std::to_string(env.rank));
  try {
    dist::ProcessGroup group(env, dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(timeout_ms)));
    torch::manual_seed(env.rank);  // different initial adapters: the broadcast must align them
    torch::jit::Module base = torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/llama_scripted.pt");
    peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj"}));
    {
      torch::NoGradGuard no_grad;  // a non-zero B, so that every factor gets a gradient
      for (auto& [name, p] : model.named_trainable_parameters())
        if (name.find("lora_B") != std::string::npos) p.normal_(0, 0.02);
    }
    dist::DataParallel dp(group, model.trainable_parameters(), dist::DataParallelOptions().accumulation_steps(accumulation));
    torch::optim::SGD sgd(model.trainable_parameters(), 0.5);

    torch::manual_seed(123);  // the same data on every rank; each takes its shard
    const int64_t micro = batch / env.world_size / accumulation;
    torch::Tensor data = torch::randint(64, {steps * batch, 9}, torch::kLong);
    const auto mine = dist::shard(steps * batch, env.rank, env.world_size, dist::ShardOptions().shuffle(false));
    for (int64_t step = 0, next = 0; step < steps; ++step) {
      for (int64_t m = 0; m < accumulation; ++m, next += micro) {
        torch::Tensor ids = data.index_select(0, torch::tensor(std::vector<int64_t>(mine.begin() + next, mine.begin() + next + micro)));
        torch::Tensor logits = model.forward({ids.slice(1, 0, -1)}).toTensor();
        torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                                  ids.slice(1, 1).reshape({-1})) / accumulation;
        loss.backward();
        if (env.rank == die_rank && step == die_step) std::_Exit(3);
        if (dp.after_backward()) {
          sgd.step();
          sgd.zero_grad();
        }
      }
    }
    std::map<std::string, torch::Tensor> trained;
    for (const auto& [name, p] : model.named_trainable_parameters()) trained[name] = p.detach();
    peft::io::save_safetensors(prefix.string() + ".safetensors", trained);
    int64_t model_bytes = 0;
    for (const auto& p : model.module().parameters()) model_bytes += p.numel() * p.element_size();
    std::ofstream(prefix.string() + ".json") << nlohmann::json{{"bytes_per_sync", dp.bytes_per_sync()},
                                                                {"bytes_reduced", dp.bytes_reduced()},
                                                                {"model_bytes", model_bytes}}.dump();
  } catch (const peft::Error& e) {
    std::ofstream(prefix.string() + ".error") << e.what();
    return 2;
  }
  return 0;
}
