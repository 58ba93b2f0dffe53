// peft-lm: pretrain a small GPT-style model on the State of the Union addresses,
// then adapt it to Moby Dick with LoRA, prefix tuning and prompt tuning (and,
// for reference, full fine-tuning); report held-out perplexity on Moby Dick,
// samples, and generation speed with and without the KV cache.
//
// Bytes are the tokens (vocabulary 256): with GPT-2's 50,257 BPE tokens the
// output layer alone would cost 8x the whole 4-layer model per token on two
// cores, and its 6.4 M embedding rows could not be pretrained on 10 MB here.
//
//   peft-lm [--pretrain-steps 1500] [--adapt-steps 300] [--out runs/lm]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

#include <chrono>
#include <fstream>
#include <random>

#include "common/program.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kContext = 128, kBatch = 16;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

/// Moby Dick's chapters: every tenth is held out.
std::pair<std::string, std::string> moby_dick(const std::filesystem::path& dir) {
  std::string train, held_out;
  for (int chapter = 1;; ++chapter) {
    const auto path = dir / "data" / fmt::format("chapter_{}.json", chapter);
    if (!std::filesystem::exists(path)) break;
    const std::string text = nlohmann::json::parse(peft::io::read_file(path))["text"].get<std::string>() + "\n\n";
    (chapter % 10 == 0 ? held_out : train) += text;
  }
  peft::check<peft::FileError>(!train.empty(), "no Moby Dick chapters in '{}' (run scripts/fetch_assets.sh)", dir.string());
  return {train, held_out};
}

/// Every State of the Union address, oldest first.
std::string state_of_the_union(const std::filesystem::path& dir) {
  peft::check<peft::FileError>(std::filesystem::is_directory(dir / "data"),
                               "no State of the Union data in '{}' (run scripts/fetch_assets.sh)", (dir / "data").string());
  std::vector<std::filesystem::path> files;
  for (const auto& f : std::filesystem::directory_iterator(dir / "data"))
    if (f.path().extension() == ".txt") files.push_back(f.path());
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& f : files) text += peft::io::read_file(f) + "\n\n";
  peft::check<peft::FileError>(!text.empty(), "no addresses in '{}' (run scripts/fetch_assets.sh)", dir.string());
  return text;
}

torch::Tensor bytes_of(const std::string& text, int64_t offset, int64_t length) {
  std::vector<int64_t> ids(text.begin() + offset, text.begin() + offset + length);
  for (auto& id : ids) id = static_cast<unsigned char>(static_cast<char>(id));  // bytes >= 0x80 are negative chars
  return torch::tensor(ids, torch::kLong);
}

/// kBatch random windows of kContext + 1 bytes.
torch::Tensor sample_windows(const std::string& text, std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> start(0, static_cast<int64_t>(text.size()) - kContext - 1);
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < kBatch; ++b) rows.push_back(bytes_of(text, start(rng), kContext + 1));
  return torch::stack(rows);
}

using Forward = std::function<torch::Tensor(const torch::Tensor& ids, const torch::Tensor& mask)>;

torch::Tensor lm_loss(const Forward& forward, const torch::Tensor& windows) {
  torch::Tensor ids = windows.narrow(1, 0, kContext), targets = windows.narrow(1, 1, kContext);
  torch::Tensor logits = forward(ids, torch::ones_like(ids));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}));
}

/// exp(mean negative log-likelihood per byte) over consecutive windows of `text`.
double perplexity(const Forward& forward, const std::string& text) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> windows;
  for (int64_t at = 0; at + kContext + 1 <= static_cast<int64_t>(text.size()); at += kContext)
    windows.push_back(bytes_of(text, at, kContext + 1));
  double total = 0;
  int64_t count = 0;
  for (size_t i = 0; i < windows.size(); i += 64) {
    auto batch = std::vector<torch::Tensor>(windows.begin() + i, windows.begin() + std::min(windows.size(), i + 64));
    total += lm_loss(forward, torch::stack(batch)).item<double>() * static_cast<double>(batch.size());
    count += static_cast<int64_t>(batch.size());
  }
  return std::exp(total / static_cast<double>(count));
}

void train(const Forward& forward, std::vector<torch::Tensor> params, const std::string& text, int64_t steps, double lr,
           uint64_t seed) {
  torch::optim::AdamW optimizer(std::move(params), torch::optim::AdamWOptions(lr).weight_decay(0.0));
  std::mt19937_64 rng(seed);
  for (int64_t step = 1; step <= steps; ++step) {
    optimizer.zero_grad();
    torch::Tensor loss = lm_loss(forward, sample_windows(text, rng));
    loss.backward();
    optimizer.step();
    if (step % 100 == 0 || step == steps) fmt::print("    step {:>5}  loss {:.3f}\n", step, loss.item<double>());
  }
}

/// 100 bytes sampled after `prompt` from a PeftModel or a plain module, on one line.
template <typename Model>
std::string sample_text(Model& model, const std::string& prompt) {
  auto batch = peft::left_pad({std::vector<int64_t>(prompt.begin(), prompt.end())}, 0);
  auto options = peft::GenerationOptions().max_new_tokens(100).do_sample(true).temperature(0.8).top_k(40).seed(1);
  torch::Tensor out = peft::generate(model, batch.input_ids, batch.attention_mask, options);
  std::string text;
  for (int64_t i = batch.input_ids.size(1); i < out.size(1); ++i) {
    const auto c = static_cast<char>(out[0][i].item<int64_t>());
    text += c == '\n' ? ' ' : c;
  }
  return text;
}

/// Tokens per second of greedy generation of `n` new tokens after a 16-byte prompt.
double tokens_per_second(torch::jit::Module& lm, bool cache, int64_t n) {
  auto batch = peft::left_pad({std::vector<int64_t>(16, 'a')}, 0);
  const auto start = Clock::now();
  peft::generate(lm, batch.input_ids, batch.attention_mask, peft::GenerationOptions().max_new_tokens(n).use_cache(cache));
  return static_cast<double>(n) / seconds_since(start);
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Pretrain a small causal LM on State of the Union addresses, adapt it to Moby Dick"};
  app.option_defaults()->always_capture_default();  // --help shows each default
  std::string assets = PEFT_ASSETS_DIR, init = PEFT_LM_INIT, out = "runs/lm";
  int64_t pretrain_steps = 1500, adapt_steps = 300;
  int threads = 2;
  std::string only;
  int64_t eval_kb = 0;
  app.add_option("--eval-kb", eval_kb, "evaluate on the first N KB of the held-out text only (0: all; quick runs)");
  app.add_option("--only", only, "run only the methods whose name contains this");
  app.add_option("--pretrain-steps", pretrain_steps, "steps of pretraining on the State of the Union");
  app.add_option("--adapt-steps", adapt_steps, "steps of each method on Moby Dick");
  app.add_option("--out", out, "base.pt (reused when present), results.md");
  app.add_option("--threads", threads, "CPU threads for OpenMP and OpenBLAS (0 = all cores)")->check(CLI::NonNegativeNumber);
  app.add_option("--assets", assets, "where scripts/fetch_assets.sh unpacked the texts");
  app.add_option("--init", init, "the randomly initialised TorchScript LM (tools/export_lm.py)")->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  peft::configure_threads(argv, threads);
  peft::jit::set_graph_optimization(false);  // eager autograd: faster CPU training
  torch::manual_seed(0);
  std::filesystem::create_directories(out);

  const std::string sotu = state_of_the_union(std::filesystem::path(assets) / "sotu");
  auto [moby_train, moby_held_out] = moby_dick(std::filesystem::path(assets) / "moby-dick");
  if (eval_kb > 0) moby_held_out.resize(std::min<size_t>(moby_held_out.size(), static_cast<size_t>(eval_kb) * 1024));
  fmt::print("State of the Union: {:.1f} MB; Moby Dick: {:.2f} MB to adapt on, {:.2f} MB held out\n", sotu.size() / 1e6,
             moby_train.size() / 1e6, moby_held_out.size() / 1e6);

  // 1. Pretraining: every parameter of the TorchScript module trains.
  const std::string base_file = out + "/base.pt";
  if (!std::filesystem::exists(base_file)) {
    torch::jit::Module lm = torch::jit::load(init);
    std::vector<torch::Tensor> params;
    for (auto p : lm.parameters()) params.push_back(p.set_requires_grad(true));
    int64_t count = 0;
    for (const auto& p : params) count += p.numel();
    fmt::print("pretraining all {} parameters ({} tensors) on the State of the Union, {} steps\n",
               peft::with_thousands(count), params.size(), pretrain_steps);
    const auto start = Clock::now();
    lm.train();
    auto forward = [&](const torch::Tensor& ids, const torch::Tensor& mask) { return lm.forward({ids, mask}).toTensor(); };
    train(forward, params, sotu, pretrain_steps, 2e-3, 1);
    fmt::print("  {:.0f} s\n", seconds_since(start));
    lm.save(base_file);
  }

  // 2. Each method on Moby Dick, from the same base, with the same budget.
  struct Method {
    std::string name;
    std::optional<peft::PeftConfig> config;  // none: full fine-tuning
    double lr;
  };
  // Prompt tuning starts from the embeddings of real text (HF's TEXT init), not from noise.
  const std::string init_text = "the whale, the sea";
  const std::vector<int64_t> text_ids(init_text.begin(), init_text.end());
  const std::vector<Method> methods{
      {"LoRA (r=8, all linear)", peft::LoraConfig().r(8).lora_alpha(16).target_modules("all-linear"), 2e-3},
      {"prefix tuning (16)", peft::PrefixTuningConfig().num_virtual_tokens(16), 3e-2},
      {"prefix tuning (16, MLP reparametrisation)",
       peft::PrefixTuningConfig().num_virtual_tokens(16).prefix_projection(true).encoder_hidden_size(128), 1e-3},
      {"prompt tuning (16)", peft::PromptTuningConfig().num_virtual_tokens(16).prompt_tuning_init_token_ids(text_ids), 3e-2},
      {"full fine-tuning", std::nullopt, 5e-4}};
  std::string table =
      "| model | trainable params | held-out perplexity | vs base | adaptation time |\n| --- | --- | --- | --- | --- |\n";
  double base_ppl = 0;
  std::string samples;
  auto evaluate = [&](const std::string& name, const Forward& forward, auto& model, int64_t trainable, double elapsed) {
    const double ppl = perplexity(forward, moby_held_out);
    fmt::print("  {}: held-out perplexity {:.3f}\n", name, ppl);
    if (trainable == 0) base_ppl = ppl;
    table += trainable == 0 ? fmt::format("| {} | — | {:.3f} | — | — |\n", name, ppl)
                            : fmt::format("| {} | {} | {:.3f} | {:+.1f} % | {:.0f} s |\n", name, trainable, ppl,
                                          100.0 * (ppl / base_ppl - 1.0), elapsed);
    samples += fmt::format("- **{}**: {}\n", name, sample_text(model, "Call me Ishmael. "));
  };
  {
    torch::jit::Module base = torch::jit::load(base_file);
    base.eval();
    evaluate("base (State of the Union)", [&](const torch::Tensor& i, const torch::Tensor& m) {
      return base.forward({i, m}).toTensor(); }, base, 0, 0);
  }
  for (const auto& method : methods) {
    if (!only.empty() && method.name.find(only) == std::string::npos) continue;
    torch::jit::Module lm = torch::jit::load(base_file);
    std::optional<peft::PeftModel> model;
    std::vector<torch::Tensor> params;
    if (method.config) {
      model.emplace(peft::get_peft_model(lm, *method.config));
      params = model->trainable_parameters();
    } else {  // full fine-tuning: every parameter of the module
      for (auto p : lm.parameters()) params.push_back(p.set_requires_grad(true));
    }
    int64_t trainable = 0;
    for (const auto& p : params) trainable += p.numel();
    Forward forward = [&](const torch::Tensor& ids, const torch::Tensor& mask) {
      return (model ? model->forward({ids, mask}) : lm.forward({ids, mask})).toTensor();
    };
    fmt::print("{}: {} trainable parameters, {} steps\n", method.name, trainable, adapt_steps);
    model ? model->train() : lm.train();
    const auto start = Clock::now();
    train(forward, params, moby_train, adapt_steps, method.lr, 2);
    const double elapsed = seconds_since(start);
    model ? model->eval() : lm.eval();
    if (model) {
      evaluate(method.name, forward, *model, trainable, elapsed);
      if (method.config->is<peft::LoraConfig>()) model->save_pretrained(out + "/lora");
    } else {
      evaluate(method.name, forward, lm, trainable, elapsed);
    }
  }

  // 3. Generation speed on the base: 128 new tokens, with and without the KV cache.
  torch::jit::Module lm = torch::jit::load(base_file);
  const double uncached = tokens_per_second(lm, false, 128), cached = tokens_per_second(lm, true, 128);
  const std::string speed = fmt::format(
      "Greedy generation of 128 tokens after a 16-byte prompt, batch 1: {:.0f} tokens/s re-running forward, "
      "{:.0f} tokens/s with forward_cached ({:.1f}x).\n", uncached, cached, cached / uncached);

  const std::string report = "Held-out Moby Dick (every tenth chapter), perplexity per byte:\n\n" + table +
                             "\nSamples after \"Call me Ishmael. \" (temperature 0.8, top-k 40, seed 1):\n\n" + samples +
                             "\n" + speed;
  fmt::print("\n{}", report);
  peft::io::write_file_atomic(out + "/results.md", report);
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-lm", [&] { return run(argc, argv); });
}
