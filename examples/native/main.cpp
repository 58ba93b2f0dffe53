// peft-native: PEFT on a transformer written with torch::nn (no TorchScript).
// A small encoder is pretrained on easy ham vs spam and saved with torch::save
// (a stand-in for your own pretrained checkpoint), then adapted to the whole
// SpamAssassin corpus, whose hard ham it misclassifies, with LoRA, bottleneck
// adapters or prompt tuning through peft::get_peft_model (the model is written
// with peft::nn::Linear and declares where bottleneck adapters and prompts go).
// Only the adapter (and the head) trains and is saved, in HF peft's layout.
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

/// Self-attention over a padding mask. peft::nn::Linear is torch::nn::Linear
/// plus adapter slots; OutputSite is where a bottleneck adapter goes.
struct AttentionImpl : torch::nn::Module, peft::nn::OutputSite {
  AttentionImpl() : OutputSite(kDim) {}
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& mask_bias) {
    const int64_t B = h.size(0), T = h.size(1);
    auto heads = [&](peft::nn::Linear& p) { return p(h).view({B, T, kHeads, -1}).transpose(1, 2); };
    torch::Tensor scores = torch::matmul(heads(q), heads(k).transpose(-2, -1)) / std::sqrt(kDim / kHeads);
    torch::Tensor context = torch::matmul(torch::softmax(scores + mask_bias, -1), heads(v));
    return adapted_output(o(context.transpose(1, 2).reshape({B, T, kDim})));
  }
  peft::nn::Linear q = register_module("q", peft::nn::Linear(kDim, kDim)), k = register_module("k", peft::nn::Linear(kDim, kDim)),
                   v = register_module("v", peft::nn::Linear(kDim, kDim)), o = register_module("o", peft::nn::Linear(kDim, kDim));
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module, peft::nn::OutputSite {
  MlpImpl() : OutputSite(kDim) {}
  torch::Tensor forward(const torch::Tensor& h) { return adapted_output(down(torch::gelu(up(h)))); }
  peft::nn::Linear up = register_module("up", peft::nn::Linear(kDim, 4 * kDim));
  peft::nn::Linear down = register_module("down", peft::nn::Linear(4 * kDim, kDim));
};
TORCH_MODULE(Mlp);

/// Pre-norm transformer block.
struct BlockImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& mask_bias) {
    x = x + attn(norm1(x), mask_bias);
    return x + mlp(norm2(x));
  }
  torch::nn::LayerNorm norm1 = register_module("norm1", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  Attention attn = register_module("attn", Attention());
  torch::nn::LayerNorm norm2 = register_module("norm2", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  Mlp mlp = register_module("mlp", Mlp());
};
TORCH_MODULE(Block);

/// Token and position embeddings, blocks, mean pooling over the mask, a 2-way head.
/// PromptSite is where prompt tuning puts its vectors (after the position embeddings).
struct ClassifierImpl : torch::nn::Module, peft::nn::PromptSite {
  explicit ClassifierImpl(int64_t vocab) : embed(register_module("embed", torch::nn::Embedding(vocab, kDim))) {
    for (int64_t i = 0; i < kLayers; ++i) blocks.push_back(register_module("block" + std::to_string(i), Block()));
  }
  torch::Tensor input_embeddings_weight() override { return embed->weight; }

  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask) {
    torch::Tensor x = add_prompt(embed(ids) + position->weight.narrow(0, 0, ids.size(1)));  // [B, P + T, D]
    const torch::Tensor bias = (1 - extend_mask(mask).to(x.dtype())).mul(-1e9).view({x.size(0), 1, 1, x.size(1)});
    for (auto& block : blocks) x = block(x, bias);
    const torch::Tensor m = mask.unsqueeze(-1).to(x.dtype());
    return head((norm(drop_prompt(x)) * m).sum(1) / m.sum(1).clamp_min(1));
  }

  torch::nn::Embedding embed;
  torch::nn::Embedding position = register_module("position", torch::nn::Embedding(kMaxTokens, kDim));
  std::vector<Block> blocks;
  torch::nn::LayerNorm norm = register_module("norm", torch::nn::LayerNorm(std::vector<int64_t>{kDim}));
  torch::nn::Linear head = register_module("head", torch::nn::Linear(kDim, 2));
};
TORCH_MODULE(Classifier);

/// The method's config as HF peft spells it; the head trains too (HF's modules_to_save).
peft::PeftConfig config_for(const std::string& method) {
  if (method == "lora")  // every projection: W x + (alpha/r) B A x, the base W frozen
    return peft::LoraConfig().r(8).lora_alpha(16).target_modules({"q", "k", "v", "o", "up", "down"}).modules_to_save({"head"});
  if (method == "adapter")  // Houlsby: a bottleneck after each sublayer
    return peft::BottleneckConfig().target_modules({"attn", "mlp"}).bottleneck_size(16).modules_to_save({"head"});
  return peft::PromptTuningConfig().num_virtual_tokens(kPromptTokens);  // HF's prompt tuning: the prompt alone
}

void train(Classifier& model, const std::vector<torch::Tensor>& parameters, const std::vector<Batch>& batches,
           int epochs, double lr) {
  torch::optim::AdamW optimizer(parameters, torch::optim::AdamWOptions(lr));
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
  CLI::App app{"Adapt a torch::nn transformer with peft::get_peft_model: LoRA, bottleneck adapters or prompt tuning"};
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
  const std::string base_file = out + "/base.pt", adapter_dir = out + "/" + method;
  if (!std::filesystem::exists(base_file)) {
    Classifier base(tokenizer.size());
    train(base, base->parameters(), pretrain_set, 2 * epochs, 1e-3);
    torch::save(base, base_file);
  }
  auto load_base = [&] {
    Classifier base(tokenizer.size());
    torch::load(base, base_file);
    return base;
  };
  Classifier model = load_base();
  report("base", model);

  // 2. PEFT: HF's get_peft_model on the torch::nn model; only the adapter (and the head) trains.
  peft::nn::PeftModel peft_model = peft::get_peft_model(model, config_for(method));
  peft_model.print_trainable_parameters();
  train(model, peft_model.trainable_parameters(), train_set, epochs, method == "prompt" ? 1e-2 : 2e-3);
  report(method, model);

  // 3. Save only the adapter (and head) in HF peft's layout; the base plus that folder gives the same outputs.
  peft_model.save_pretrained(adapter_dir);
  Classifier reloaded = load_base();
  peft::nn::PeftModel reloaded_peft = peft::nn::PeftModel::from_pretrained(reloaded.ptr(), adapter_dir);
  reloaded->eval();
  const double reload_diff = max_difference(model, reloaded, test_set);
  fmt::print("{} ({} bytes) reloaded: max |logit difference| {}\n", adapter_dir,
             std::filesystem::file_size(std::filesystem::path(adapter_dir) / peft::io::kWeightsFile), reload_diff);

  // 4. LoRA merges into the base weights: the plain architecture at the base's cost.
  if (method == "lora") {
    reloaded_peft.merge_and_unload();
    fmt::print("merged: max |logit difference| {:.2g}\n", max_difference(model, reloaded, test_set));
  }
  return reload_diff == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-native", [&] { return run(argc, argv); });
}
