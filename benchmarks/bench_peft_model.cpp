// Benchmark of PeftModel on a GPT-2-small-size TorchScript model (12 layers,
// d=768, 12 heads, batch 4, seq 128). Every figure is a ratio of two runs
// measured side by side, alternating, in one process, because these machines
// are noisy; peak memory is measured in separate processes (--rss).
//
//   peft-bench-model --model gpt2_small_scripted.pt            # step and inference ratios
//   peft-bench-model --model ... --rss lora|qlora|full        # peak RSS of training
//   peft-bench-model --model ... --qlora                      # QLoRA vs LoRA: step time, weight bytes
#include <CLI/CLI.hpp>
#include <peft/peft.h>
#include <sys/resource.h>

#include <chrono>
#include <filesystem>
#include <unordered_set>

#include "common/program.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// "median (min–max)" of `values` (unsorted) times `scale`, with `digits` decimals:
/// every figure of the tables carries its spread over the runs.
std::string spread(std::vector<double> values, int digits, double scale = 1.0) {
  std::sort(values.begin(), values.end());
  return fmt::format("{:.{}f} ({:.{}f}–{:.{}f})", scale * values[values.size() / 2], digits, scale * values.front(),
                     digits, scale * values.back(), digits);
}

/// a[i] / b[i]: ratios of runs taken in alternation, so both sides saw the same machine state.
std::vector<double> ratios(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> out;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) out.push_back(a[i] / b[i]);
  return out;
}

/// LoRA r=8 on the q and v slices of every fused c_attn ([in, out] Conv1D weights).
peft::LoraConfig lora_config() {
  return peft::LoraConfig().r(8).lora_alpha(16).target_modules({"c_attn"}).fan_in_fan_out(true).slice_pattern(
      {{"c_attn", {true, false, true}}});
}

/// QLoRA: the same adapter over a base whose block linears are NF4 (lm_head is tied to the embedding and stays).
peft::LoraConfig qlora_config() { return lora_config().quantize_base(peft::NF4Config().quantize_all_linear(true)); }

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
  const auto bytes = std::filesystem::file_size(dir / "adapter_model.safetensors");
  fmt::print("| adapter | {} parameters, {:.1f} MiB file | |\n", params, bytes / 1048576.0);
  fmt::print("| save_pretrained (config + safetensors, atomic, fsync), ms | {} | |\n", spread(save, 1, 1e3));
  fmt::print("| read and validate adapter_model.safetensors, ms | {} | |\n", spread(load, 1, 1e3));
  fmt::print("| from_pretrained (inject + load + checks), ms | {} | |\n", spread(from, 1, 1e3));
  std::filesystem::remove_all(dir);
  return 0;
}

int rss_mode(const std::string& path, const std::string& method, const torch::Tensor& ids) {
  torch::jit::Module base = torch::jit::load(path);

  base.train();
  std::optional<peft::PeftModel> lora;
  Trainer trainer;
  if (method == "lora" || method == "qlora") {
    lora.emplace(peft::get_peft_model(base, method == "lora" ? lora_config() : qlora_config()));
    trainer = lora_trainer(*lora);
  } else {
    trainer = full_trainer(base);
  }
  for (int i = 0; i < 2; ++i) trainer.step(ids);
  fmt::print("peak_rss_mib {} {:.0f}\n", method, peak_rss_mib());
  return 0;
}

/// QLoRA vs LoRA on the same model: step time (alternating) and frozen-weight bytes.
int qlora_mode(const std::string& path, const torch::Tensor& ids, int runs) {
  torch::jit::Module lora_base = torch::jit::load(path), qlora_base = torch::jit::load(path);
  int64_t fp32_bytes = 0;
  std::unordered_set<const void*> seen;
  for (const auto& p : qlora_base.parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) fp32_bytes += p.numel() * p.element_size();
  lora_base.train(), qlora_base.train();
  peft::PeftModel lora = peft::get_peft_model(lora_base, lora_config());
  peft::PeftModel qlora = peft::get_peft_model(qlora_base, qlora_config());
  const auto nf4 = peft::nf4::footprint(qlora.module());
  int64_t frozen_bytes = nf4.bytes;  // what stays dense: embeddings, norms, biases
  seen.clear();
  for (const auto& p : qlora.base_model().parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) frozen_bytes += p.numel() * p.element_size();
  Trainer a = lora_trainer(lora), b = lora_trainer(qlora);
  a.step(ids), b.step(ids);
  std::vector<double> lora_t, qlora_t;
  for (int i = 0; i < runs; ++i) lora_t.push_back(a.step(ids)), qlora_t.push_back(b.step(ids));
  const double mib = 1048576.0;
  fmt::print("| QLoRA train step / LoRA train step (s: QLoRA; LoRA) | {} ({}; {}) | <= 1.5 |\n",
             spread(ratios(qlora_t, lora_t), 3), spread(qlora_t, 2), spread(lora_t, 2));
  fmt::print("| quantised linear weights: NF4 bytes / fp32 bytes | {:.4f} ({:.1f} MiB / {:.1f} MiB, {:.2f} bits per weight) | <= 0.14 |\n",
             nf4.bytes / (4.0 * nf4.weights), nf4.bytes / mib, 4.0 * nf4.weights / mib, 8.0 * nf4.bytes / nf4.weights);
  fmt::print("| all frozen weights, QLoRA / fp32 (embeddings stay fp32) | {:.3f} ({:.1f} MiB / {:.1f} MiB) | |\n",
             static_cast<double>(frozen_bytes) / fp32_bytes, frozen_bytes / mib, fp32_bytes / mib);
  return 0;
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"PeftModel benchmark on a GPT-2-small-size TorchScript model"};
  std::string path, rss;
  int threads = 0, runs = 3, batch = 4, seq = 128;
  app.add_option("--model", path, "scripted GPT-2-small-size model (tools/export_fixtures.py --gpt2-small)")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--rss", rss, "only train with this method and print peak RSS")->check(CLI::IsMember({"lora", "qlora", "full"}));
  bool io = false, qlora = false;
  app.add_flag("--io", io, "only time saving and loading a ~1M-parameter adapter");
  app.add_flag("--qlora", qlora, "only compare QLoRA with LoRA (step time, frozen-weight bytes)");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_option("--runs", runs, "measured repetitions per figure (median)");
  bool executor = false;
  app.add_flag("--jit-executor", executor, "keep the graph executor's optimisations (default: eager autograd)");
  CLI11_PARSE(app, argc, argv);
  peft::configure_threads(argv, threads);
  peft::jit::set_graph_optimization(executor);
  torch::manual_seed(0);
  torch::Tensor ids = torch::randint(50257, {batch, seq + 1}, torch::kLong);
  if (!rss.empty()) return rss_mode(path, rss, ids);
  if (io) return io_mode(path, std::max(runs, 5));
  if (qlora) return qlora_mode(path, ids, runs);

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
    const std::vector<double> base_unmerged(b.begin(), b.begin() + runs), base_merged(b.begin() + runs, b.end());
    fmt::print("| figure: median (min–max) of {} runs | value | goal |\n| --- | --- | --- |\n", runs);
    fmt::print("| LoRA train step / full fine-tune train step (s: LoRA; full) | {} ({}; {}) | <= 0.65 |\n",
               spread(ratios(lora_t, full_t), 3), spread(lora_t, 2), spread(full_t, 2));
    fmt::print("| unmerged LoRA inference / base (s: LoRA; base) | {} ({}; {}) | <= 1.05 |\n",
               spread(ratios(u, base_unmerged), 3), spread(u, 3), spread(base_unmerged, 3));
    fmt::print("| merged LoRA inference / base (s: LoRA; base) | {} ({}; {}) | ~ 1.00 |\n",
               spread(ratios(m, base_merged), 3), spread(m, 3), spread(base_merged, 3));
    fmt::print("| injection time (get_peft_model) | {:.3f} s | |\n", inject_s);
  }
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-bench-model", [&] { return run(argc, argv); });
}
