// peft-native: PEFT on a transformer written with torch::nn (no TorchScript).
// A small encoder is pretrained on easy ham vs spam and saved with torch::save
// (a stand-in for your own pretrained checkpoint), then adapted to the whole
// SpamAssassin corpus, whose hard ham it misclassifies, with LoRA, bottleneck
// adapters or prompt tuning. Only the adapter and the head train and are saved.
//
//   peft-native [--method lora|adapter|prompt] [--epochs 3] [--max-emails 0] [--out runs/native]
#include <CLI/CLI.hpp>
#include <peft/peft.h>

#include <random>

#include "common/batches.h"
#include "common/program.h"

namespace {
using namespace peft_examples;
constexpr int64_t kDim = 64, kHeads = 4, kLayers = 2, kMaxTokens = 64, kPromptTokens = 8;

/// Pre-norm transformer block. Projections are AnyModules so that PEFT can wrap
/// them after the base weights are loaded.
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    const std::vector<std::tuple<std::string, int64_t, int64_t>> shapes{
        {"q", kDim, kDim}, {"k", kDim, kDim}, {"v", kDim, kDim}, {"o", kDim, kDim}, {"up", kDim, 4 * kDim}, {"down", 4 * kDim, kDim}};
    for (const auto& [name, in, out] : shapes)
      proj[name] = torch::nn::AnyModule(register_module(name, torch::nn::Linear(in, out)));
  }

  void add_peft(const std::string& method) {
    if (method == "lora")  // every projection: W x + (alpha/r) B A x, the base W frozen
      for (auto& [name, layer] : proj)
        layer = torch::nn::AnyModule(
            replace_module(name, peft::LoRALinear(layer.get<torch::nn::Linear>(), peft::LoraOptions(8).lora_alpha(16))));
    if (method == "adapter") {  // Houlsby: a bottleneck after each sublayer
      adapter_attn = register_module("adapter_attn", peft::Bottleneck(peft::BottleneckOptions(kDim).bottleneck(16)));
      adapter_mlp = register_module("adapter_mlp", peft::Bottleneck(peft::BottleneckOptions(kDim).bottleneck(16)));
    }
  }

  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask_bias) {
    const int64_t B = x.size(0), T = x.size(1);
    torch::Tensor h = norm1(x);
    auto heads = [&](const char* p) { return proj[p].forward(h).view({B, T, kHeads, -1}).transpose(1, 2); };
    torch::Tensor scores = torch::matmul(heads("q"), heads("k").transpose(-2, -1)) / std::sqrt(kDim / kHeads);
    torch::Tensor context = torch::matmul(torch::softmax(scores + mask_bias, -1), heads("v"));
    torch::Tensor a = proj["o"].forward(context.transpose(1, 2).reshape({B, T, kDim}));
    x = x + (adapter_attn ? adapter_attn(a) : a);
    torch::Tensor f = proj["down"].forward(torch::gelu(proj["up"].forward(norm2(x))));
    return x + (adapter_mlp ? adapter_mlp(f) : f);
  }

  std::map<std::string, torch::nn::AnyModule> proj;
  torch::nn::LayerNorm norm1 = register_module("norm1", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  torch::nn::LayerNorm norm2 = register_module("norm2", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  peft::Bottleneck adapter_attn{nullptr}, adapter_mlp{nullptr};
};
TORCH_MODULE(Block);

/// Token and position embeddings, blocks, mean pooling over the mask, a 2-way head.
struct ClassifierImpl : torch::nn::Module {
  explicit ClassifierImpl(int64_t vocab) : embed(register_module("embed", torch::nn::Embedding(vocab, kDim))) {
    for (int64_t i = 0; i < kLayers; ++i) blocks.push_back(register_module("block" + std::to_string(i), Block()));
  }

  /// Freezes the base, adds the method's trainable modules; the head keeps training.
  void add_peft(const std::string& method) {
    for (auto& p : parameters()) p.set_requires_grad(false);
    if (method == "prompt") prompt = register_module("prompt", peft::PromptEmbedding(embed, peft::PromptOptions(kPromptTokens)));
    for (auto& block : blocks) block->add_peft(method);
    for (auto& p : head->parameters()) p.set_requires_grad(true);
  }

  torch::Tensor forward(const torch::Tensor& ids, torch::Tensor mask) {
    torch::Tensor x = prompt ? prompt(ids) : embed(ids);  // [B, P + T, D]: P prompt vectors first
    if (prompt) mask = prompt->extend_attention_mask(mask);
    const int64_t T = ids.size(1), P = x.size(1) - T;    // the tokens keep the positions they were pretrained at
    x = torch::cat({x.narrow(1, 0, P), x.narrow(1, P, T) + position->weight.narrow(0, 0, T)}, 1);
    const torch::Tensor bias = (1 - mask.to(x.dtype())).mul(-1e9).view({x.size(0), 1, 1, x.size(1)});
    for (auto& block : blocks) x = block(x, bias);
    const torch::Tensor m = mask.unsqueeze(-1).to(x.dtype());
    return head((norm(x) * m).sum(1) / m.sum(1).clamp_min(1));
  }

  torch::nn::Embedding embed;
  torch::nn::Embedding position = register_module("position", torch::nn::Embedding(kMaxTokens, kDim));
  std::vector<Block> blocks;
  torch::nn::LayerNorm norm = register_module("norm", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  torch::nn::Linear head = register_module("head", torch::nn::Linear(kDim, 2));
  peft::PromptEmbedding prompt{nullptr};
};
TORCH_MODULE(Classifier);

void train(Classifier& model, const std::vector<Batch>& batches, int epochs, double lr) {
  torch::optim::AdamW optimizer(peft::trainable_parameters(*model), torch::optim::AdamWOptions(lr));
  model->train();
  for (int epoch = 0; epoch < epochs; ++epoch) {
    double total = 0;
    for (const auto& b : batches) {
      optimizer.zero_grad();
      torch::Tensor loss = torch::nn::functional::cross_entropy(model(b.ids, b.mask), b.labels);
      loss.backward();
      optimizer.step();
      total += loss.item<double>();
    }
    fmt::print("  epoch {}: mean training loss {:.4f}\n", epoch + 1, total / batches.size());
  }
  model->eval();
}

/// The largest |difference| between the logits of two models on `batches`.
double max_difference(Classifier& a, Classifier& b, const std::vector<Batch>& batches) {
  torch::NoGradGuard no_grad;
  double worst = 0;
  for (const auto& x : batches) worst = std::max(worst, (a(x.ids, x.mask) - b(x.ids, x.mask)).abs().max().item<double>());
  return worst;
}
}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Adapt a torch::nn transformer with peft::LoRALinear / Adapter / PromptEmbedding"};
  app.option_defaults()->always_capture_default();  // --help shows each default
  std::string method = "lora", assets = PEFT_ASSETS_DIR, out = "runs/native";
  int epochs = 3, threads = 2;
  size_t max_emails = 0;
  app.add_option("--method", method, "PEFT method: LoRA on every projection, bottleneck adapters, or prompt tuning")
      ->check(CLI::IsMember({"lora", "adapter", "prompt"}));
  app.add_option("--epochs", epochs, "epochs of adaptation (the base: twice as many)")->check(CLI::PositiveNumber);
  app.add_option("--max-emails", max_emails, "use at most N emails of each split (0 = all; quick runs)");
  app.add_option("--out", out, "for base.pt (reused when present) and adapter.safetensors");
  app.add_option("--threads", threads, "CPU threads for OpenMP and OpenBLAS (0 = all cores)")->check(CLI::NonNegativeNumber);
  app.add_option("--assets", assets, "where scripts/fetch_assets.sh unpacked the model and data");
  CLI11_PARSE(app, argc, argv);
  peft::configure_threads(argv, threads);
  torch::manual_seed(0);

  auto corpus = load_spam_assassin(std::filesystem::path(assets) / "spam-assassin");
  const UseTokenizer tokenizer(std::filesystem::path(assets) / "use-lite/dist/vocab.json");
  std::shuffle(corpus.train.begin(), corpus.train.end(), std::mt19937(0));
  if (max_emails > 0) {  // a random N of each split, so that every group stays
    std::shuffle(corpus.test.begin(), corpus.test.end(), std::mt19937(1));
    corpus.train.resize(std::min(max_emails, corpus.train.size()));
    corpus.test.resize(std::min(max_emails, corpus.test.size()));
  }
  auto batches = [&](const auto& emails, auto keep) { return make_batches_if(emails, tokenizer, kMaxTokens, 32, keep); };
  auto hard_ham = [](const std::string& group) { return group == "hard-ham-1"; };
  auto any = [](const std::string&) { return true; };
  const auto pretrain_set = batches(corpus.train, [&](const std::string& g) { return !hard_ham(g); });
  const auto train_set = batches(corpus.train, any), test_set = batches(corpus.test, any);
  const auto test_hard_ham = batches(corpus.test, hard_ham);
  auto report = [&](const std::string& what, Classifier& model) {
    auto logits = [&](const Batch& b) { return model(b.ids, b.mask); };
    fmt::print("{:<8} test accuracy {:.4f}, on hard ham {:.4f}\n", what, evaluate(logits, test_set).accuracy,
               evaluate(logits, test_hard_ham).accuracy);
  };

  // 1. The base: pretrained once on easy ham vs spam, then loaded from its file like any checkpoint.
  std::filesystem::create_directories(out);
  const std::string base_file = out + "/base.pt", adapter_file = out + "/adapter.safetensors";
  if (!std::filesystem::exists(base_file)) {
    Classifier base(tokenizer.size());
    train(base, pretrain_set, 2 * epochs, 1e-3);
    torch::save(base, base_file);
  }
  auto load_base = [&] {
    Classifier base(tokenizer.size());
    torch::load(base, base_file);
    return base;
  };
  Classifier model = load_base();
  report("base", model);

  // 2. PEFT: freeze the base, add the adapter, give the optimizer only what requires grad.
  model->add_peft(method);
  peft::print_trainable_parameters(*model);
  train(model, train_set, epochs, method == "prompt" ? 1e-2 : 2e-3);
  report(method, model);

  // 3. Save only the adapter (and head); the base plus that file gives the same outputs.
  peft::save_trainable(*model, adapter_file);
  Classifier reloaded = load_base();
  reloaded->add_peft(method);
  peft::load_trainable(*reloaded, adapter_file);
  reloaded->eval();
  const double reload_diff = max_difference(model, reloaded, test_set);
  fmt::print("{} ({} bytes) reloaded: max |logit difference| {}\n", adapter_file,
             std::filesystem::file_size(adapter_file), reload_diff);

  // 4. LoRA merges into the base weights: inference at the base's cost.
  if (method == "lora") {
    for (auto& m : reloaded->modules()) if (auto lora = std::dynamic_pointer_cast<peft::LoRALinearImpl>(m)) lora->merge();
    fmt::print("merged: max |logit difference| {:.2g}\n", max_difference(model, reloaded, test_set));
  }
  return reload_diff == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-native", [&] { return run(argc, argv); });
}
