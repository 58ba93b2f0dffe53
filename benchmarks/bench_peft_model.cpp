// Benchmark of PeftModel on a GPT-2-small-size TorchScript model (12 layers,
// d=768, 12 heads, batch 4, seq 128). Every figure is a ratio of two runs
// measured side by side, alternating, in one process, because these machines
// are noisy; peak memory is measured in separate processes (--rss).
//
//   peft-bench-model --model gpt2_small_scripted.pt            # step and inference ratios
//   peft-bench-model --model ... --rss lora|full              # peak RSS of training
#include <CLI/CLI.hpp>
#include <peft/peft.h>
#include <sys/resource.h>

#include <chrono>
#include <filesystem>
#include <unordered_set>

#include "common/threads.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// LoRA r=8 on the q and v slices of every fused c_attn ([in, out] Conv1D weights).
peft::LoraConfig lora_config() {
  return peft::LoraConfig().r(8).lora_alpha(16).target_modules({"c_attn"}).fan_in_fan_out(true).slice_pattern(
      {{"c_attn", {true, false, true}}});
}

/// One training step: forward, next-token cross-entropy, backward, AdamW.
struct Trainer {
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::unique_ptr<torch::optim::AdamW> optimizer;

  double step(const torch::Tensor& ids) {
    const auto start = Clock::now();
    torch::Tensor logits = forward(ids.slice(1, 0, -1));
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                              ids.slice(1, 1).reshape({-1}));
    optimizer->zero_grad();
    loss.backward();
    optimizer->step();
    return seconds_since(start);
  }
};

/// Full fine-tuning: every (distinct) parameter trains.
Trainer full_trainer(torch::jit::Module model) {
  std::vector<torch::Tensor> params;
  std::unordered_set<const void*> seen;  // GPT-2 ties lm_head to wte: one tensor, two names
  for (auto p : model.parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) params.push_back(p.set_requires_grad(true));
  return {[model](const torch::Tensor& ids) mutable { return model.forward({ids}).toTensor(); },
          std::make_unique<torch::optim::AdamW>(params, 1e-4)};
}

Trainer lora_trainer(peft::PeftModel& model) {
  return {[&model](const torch::Tensor& ids) { return model.forward({ids}).toTensor(); },
          std::make_unique<torch::optim::AdamW>(model.trainable_parameters(), 1e-4)};
}

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

/// Save and load times of a ~1.2M-parameter LoRA adapter (r=8 on every linear of the blocks).
int io_mode(const std::string& path, int runs) {
  torch::jit::Module base = torch::jit::load(path);
  auto config = peft::LoraConfig().r(8).target_modules({"c_attn", "c_proj", "c_fc"}).fan_in_fan_out(true);
  peft::PeftModel model = peft::get_peft_model(base, config);
  for (auto& p : model.trainable_parameters()) torch::nn::init::normal_(p.detach(), 0, 0.01);
  const int64_t params = model.count_parameters().trainable;
  const auto dir = std::filesystem::temp_directory_path() / "peft_bench_io";
  std::vector<double> save, load, from;
  for (int i = 0; i < runs; ++i) {
    auto t0 = Clock::now();
    model.save_pretrained(dir);
    save.push_back(seconds_since(t0));
    t0 = Clock::now();
    auto tensors = peft::io::load_safetensors(dir / "adapter_model.safetensors");
    load.push_back(seconds_since(t0));
    t0 = Clock::now();
    peft::PeftModel loaded = peft::PeftModel::from_pretrained(base, dir);
    from.push_back(seconds_since(t0));
  }
  for (auto* v : {&save, &load, &from}) std::sort(v->begin(), v->end());
  const auto bytes = std::filesystem::file_size(dir / "adapter_model.safetensors");
  fmt::print("| adapter | {} parameters, {:.1f} MiB file | |\n", params, bytes / 1048576.0);
  fmt::print("| save_pretrained (config + safetensors, atomic, fsync) | {:.1f} ms | |\n", 1e3 * save[runs / 2]);
  fmt::print("| read and validate adapter_model.safetensors | {:.1f} ms | |\n", 1e3 * load[runs / 2]);
  fmt::print("| from_pretrained (inject + load + checks) | {:.1f} ms | |\n", 1e3 * from[runs / 2]);
  std::filesystem::remove_all(dir);
  return 0;
}

int rss_mode(const std::string& path, const std::string& method, const torch::Tensor& ids) {
  torch::jit::Module base = torch::jit::load(path);

  base.train();
  std::optional<peft::PeftModel> lora;
  Trainer trainer;
  if (method == "lora") {
    lora.emplace(peft::get_peft_model(base, lora_config()));
    trainer = lora_trainer(*lora);
  } else {
    trainer = full_trainer(base);
  }
  for (int i = 0; i < 2; ++i) trainer.step(ids);
  fmt::print("peak_rss_mib {} {:.0f}\n", method, peak_rss_mib());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"PeftModel benchmark on a GPT-2-small-size TorchScript model"};
  std::string path, rss;
  int threads = 0, runs = 3, batch = 4, seq = 128;
  app.add_option("--model", path, "scripted GPT-2-small-size model (tools/export_fixtures.py --gpt2-small)")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--rss", rss, "only train with this method and print peak RSS")->check(CLI::IsMember({"lora", "full"}));
  bool io = false;
  app.add_flag("--io", io, "only time saving and loading a ~1M-parameter adapter");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_option("--runs", runs, "measured repetitions per figure (median)");
  bool executor = false;
  app.add_flag("--jit-executor", executor, "keep the graph executor's optimisations (default: eager autograd)");
  CLI11_PARSE(app, argc, argv);
  peft_examples::configure_threads(argv, threads);
  peft::jit::set_graph_optimization(executor);
  torch::manual_seed(0);
  torch::Tensor ids = torch::randint(50257, {batch, seq + 1}, torch::kLong);
  if (!rss.empty()) return rss_mode(path, rss, ids);
  if (io) return io_mode(path, std::max(runs, 5));

  // Training step: LoRA (r=8 on q and v) vs full fine-tuning, alternating.
  torch::jit::Module base = torch::jit::load(path);
  base.train();
  auto t0 = Clock::now();
  peft::PeftModel model = peft::get_peft_model(base, lora_config());
  const double inject_s = seconds_since(t0);
  model.print_trainable_parameters();
  torch::jit::Module full_model = torch::jit::load(path);
  full_model.train();
  Trainer lora = lora_trainer(model), full = full_trainer(full_model);
  lora.step(ids), full.step(ids);  // warm-up: profiling runs of the graph executor
  std::vector<double> lora_t, full_t;
  for (int i = 0; i < runs; ++i) lora_t.push_back(lora.step(ids)), full_t.push_back(full.step(ids));
  std::sort(lora_t.begin(), lora_t.end()), std::sort(full_t.begin(), full_t.end());
  const double lora_step = lora_t[runs / 2], full_step = full_t[runs / 2];

  // Inference: base vs unmerged LoRA vs merged, alternating, no grad.
  model.eval();
  base.eval();
  {
    torch::NoGradGuard no_grad;
    torch::Tensor x = ids.slice(1, 0, seq);
    auto time_forward = [&](const std::function<void()>& fn) {
      return [fn] {
        const auto start = Clock::now();
        fn();
        return seconds_since(start);
      };
    };
    for (auto& [name, p] : model.named_trainable_parameters())  // a non-trivial B
      if (name.find("lora_B") != std::string::npos) torch::nn::init::normal_(p, 0, 0.01);
    torch::jit::Module base_model = model.base_model();
    auto base_fwd = time_forward([&] { base_model.forward({x}); });
    auto lora_fwd = time_forward([&] { model.forward({x}); });
    for (int i = 0; i < 2; ++i) base_fwd(), lora_fwd();
    std::vector<double> b, u, m;
    for (int i = 0; i < runs; ++i) b.push_back(base_fwd()), u.push_back(lora_fwd());
    model.merge_adapter();
    for (int i = 0; i < 2; ++i) lora_fwd();
    for (int i = 0; i < runs; ++i) b.push_back(base_fwd()), m.push_back(lora_fwd());
    for (auto* v : {&b, &u, &m}) std::sort(v->begin(), v->end());
    const double base_s = b[b.size() / 2], unmerged_s = u[runs / 2], merged_s = m[runs / 2];
    fmt::print("| figure | value | goal |\n| --- | --- | --- |\n");
    fmt::print("| LoRA train step / full fine-tune train step | {:.3f} ({:.2f} s / {:.2f} s) | <= 0.65 |\n",
               lora_step / full_step, lora_step, full_step);
    fmt::print("| unmerged LoRA inference / base | {:.3f} ({:.3f} s / {:.3f} s) | <= 1.05 |\n", unmerged_s / base_s,
               unmerged_s, base_s);
    fmt::print("| merged LoRA inference / base | {:.3f} ({:.3f} s / {:.3f} s) | ~ 1.00 |\n", merged_s / base_s, merged_s,
               base_s);
    fmt::print("| injection time (get_peft_model) | {:.3f} s | |\n", inject_s);
  }
  return 0;
}
