// peft-train: fine-tunes a Hugging Face model folder (config.json, safetensors,
// tokenizer.json) with a PEFT method, in C++: causal-LM training on text, or
// sequence classification on labelled JSONL (or the SpamAssassin folder);
// evaluation, the adapter in HF peft's layout, an optional merged HF folder.
//
//   peft-train --model DIR --data FILE|DIR --method lora [--target-modules q_proj v_proj] [--out DIR] [--merged DIR]
//   peft-train --model examples/train/tiny-llama --from-scratch --method full --data assets/sotu --out tiny  # pretrain
//
// --data: a .txt file or a folder of .txt files (causal LM), a .jsonl file of
// {"text": ...} (causal LM) or {"text": ..., "label": 0..n-1} (classification),
// or the SpamAssassin folder of scripts/fetch_assets.sh (classification).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/hf/tokenizer.h>
#include <peft/peft.h>

#include <sys/resource.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <random>

#include "common/batches.h"
#include "common/program.h"
#include "common/spam_data.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }
std::string clock_time(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return fmt::format("{}:{:02d}", s / 60, s % 60);
}

struct Example {
  std::string text;
  int64_t label = -1;  // -1: unlabelled (causal LM)
};

/// `text` with every ill-formed UTF-8 sequence replaced by U+FFFD (as Python's errors="replace"):
/// real corpora (SpamAssassin's Latin-1 mails) hold such bytes, and the tokenizer takes valid UTF-8 only.
std::string valid_utf8(const std::string& text) {
  std::string out;
  icu::UnicodeString::fromUTF8(text).toUTF8String(out);
  return out;
}
struct Dataset {
  std::vector<Example> train, eval, test;  // test: only where the data has a fixed test split
  bool labelled = false;
  std::string description;
};

/// Every .txt file under `dir`, in name order.
std::vector<Example> text_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& f : fs::recursive_directory_iterator(dir))
    if (f.is_regular_file() && f.path().extension() == ".txt") files.push_back(f.path());
  std::sort(files.begin(), files.end());
  std::vector<Example> out;
  for (const auto& f : files) out.push_back({peft::io::read_file(f)});
  return out;
}

/// {"text": ..., "label": ...} per line; every line labelled or none.
std::vector<Example> jsonl(const fs::path& file) {
  std::ifstream in(file);
  peft::check<peft::FileError>(in.good(), "--data '{}': cannot read it", file.string());
  std::vector<Example> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw peft::FileError(fmt::format("--data '{}' line {}: not JSON ({})", file.string(), n, e.what()));
    }
    peft::check<peft::FileError>(j.is_object() && j.contains("text") && j["text"].is_string(),
                                 "--data '{}' line {}: expected an object with a string \"text\"", file.string(), n);
    const bool has_label = j.contains("label");
    peft::check<peft::FileError>(!has_label || (j["label"].is_number_integer() && j["label"].get<int64_t>() >= 0),
                                 "--data '{}' line {}: \"label\" must be an integer >= 0", file.string(), n);
    out.push_back({j["text"].get<std::string>(), has_label ? j["label"].get<int64_t>() : -1});
    peft::check<peft::FileError>((out.front().label >= 0) == has_label,
                                 "--data '{}' line {}: either every line has a \"label\" or none has", file.string(), n);
  }
  peft::check<peft::FileError>(!out.empty(), "--data '{}': no examples", file.string());
  return out;
}

/// Every k-th example (k = 1 / eval_fraction) is held out; one long text is cut at 1 - eval_fraction.
void split(std::vector<Example> all, double eval_fraction, Dataset& d) {
  if (all.size() == 1 && all[0].label < 0) {
    const std::string& text = all[0].text;
    const size_t cut = static_cast<size_t>(text.size() * (1 - eval_fraction));
    d.train = {{text.substr(0, cut)}};
    d.eval = {{text.substr(cut)}};
    return;
  }
  const size_t every = std::max<size_t>(2, static_cast<size_t>(std::lround(1 / eval_fraction)));
  for (size_t i = 0; i < all.size(); ++i) (i % every == every - 1 ? d.eval : d.train).push_back(std::move(all[i]));
}

Dataset read_data(const fs::path& data, double eval_fraction, size_t max_examples) {
  Dataset d;
  if (fs::is_directory(data) && fs::exists(data / "data" / "spam-2")) {  // the SpamAssassin package: its fixed split
    const auto corpus = peft_examples::load_spam_assassin(data);
    auto take = [](const std::vector<peft_examples::Email>& emails) {
      std::vector<Example> out;
      for (const auto& e : emails) out.push_back({e.text, e.label});
      return out;
    };
    d.train = take(corpus.train), d.eval = take(corpus.validation), d.test = take(corpus.test);
    std::shuffle(d.train.begin(), d.train.end(), std::mt19937(0));  // files come grouped: ham, then spam
    d.labelled = true;
  } else if (fs::is_directory(data)) {
    split(text_files(data), eval_fraction, d);
  } else if (data.extension() == ".jsonl") {
    split(jsonl(data), eval_fraction, d);
  } else {
    peft::check<peft::FileError>(fs::is_regular_file(data), "--data '{}': no such file or folder", data.string());
    split({{peft::io::read_file(data)}}, eval_fraction, d);
  }
  peft::check<peft::FileError>(!d.train.empty() && !d.eval.empty(), "--data '{}': too little to hold out an evaluation set",
                               data.string());
  for (auto* part : {&d.train, &d.eval, &d.test})
    for (auto& e : *part) e.text = valid_utf8(e.text);
  d.labelled = d.train.front().label >= 0;
  if (max_examples > 0 && d.train.size() > max_examples) d.train.resize(max_examples);
  if (max_examples > 0 && d.eval.size() > max_examples / 4 + 1) d.eval.resize(max_examples / 4 + 1);
  if (max_examples > 0 && d.test.size() > max_examples / 4 + 1) d.test.resize(max_examples / 4 + 1);
  d.description = fmt::format("{}: {} {} for training, {} held out{}", data.string(), d.train.size(),
                              d.labelled ? "labelled examples" : "texts", d.eval.size(),
                              d.test.empty() ? "" : fmt::format(", {} for the test", d.test.size()));
  return d;
}

/// Causal LM: every text tokenised (with the tokenizer's special tokens), joined and cut into blocks of
/// `length` tokens (HF's run_clm), in batches of `batch_size` blocks.
std::vector<peft_examples::Batch> lm_batches(const std::vector<Example>& texts, const peft::hf::Tokenizer& tokenizer,
                                             int64_t length, int64_t batch_size) {
  std::vector<int64_t> stream;
  for (const auto& t : texts) {
    const auto ids = tokenizer.encode(t.text, /*add_special_tokens=*/true);
    stream.insert(stream.end(), ids.begin(), ids.end());
    if (auto eos = tokenizer.eos_token_id(); eos && (stream.empty() || stream.back() != *eos)) stream.push_back(*eos);
  }
  const int64_t blocks = static_cast<int64_t>(stream.size()) / length;
  peft::check<peft::FileError>(blocks > 0, "--data: {} tokens, fewer than one block of --max-length {}", stream.size(), length);
  torch::Tensor all = torch::tensor(stream, torch::kLong).narrow(0, 0, blocks * length).view({blocks, length});
  std::vector<peft_examples::Batch> out;
  for (int64_t start = 0; start < blocks; start += batch_size) {
    torch::Tensor ids = all.narrow(0, start, std::min(batch_size, blocks - start));
    out.push_back({ids, torch::ones_like(ids), ids});
  }
  return out;
}

/// Classification: padded batches of at most `length` tokens, with the labels.
std::vector<peft_examples::Batch> labelled_batches(const std::vector<Example>& examples, const peft::hf::Tokenizer& tokenizer,
                                                   int64_t length, int64_t batch_size) {
  std::vector<peft_examples::Batch> out;
  for (size_t start = 0; start < examples.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(examples.size(), start + static_cast<size_t>(batch_size));
    std::vector<std::string> texts;
    std::vector<int64_t> labels;
    for (size_t i = start; i < end; ++i) texts.push_back(examples[i].text), labels.push_back(examples[i].label);
    const auto encoded = tokenizer.encode_batch(texts, peft::hf::PaddingOptions().max_length(length).truncation(true));
    out.push_back({encoded.input_ids, encoded.attention_mask, torch::tensor(labels, torch::kLong)});
  }
  return out;
}

/// HF peft's default LoRA targets per architecture (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
std::vector<std::string> default_targets(const std::string& model_type) {
  if (model_type == "gpt2") return {"c_attn"};
  if (model_type == "bert" || model_type == "roberta") return {"query", "value"};
  return {"q_proj", "v_proj"};
}
std::string feedforward(const std::string& model_type) {
  return model_type == "gpt2" ? "c_fc" : model_type == "bert" || model_type == "roberta" ? "output.dense" : "down_proj";
}
std::string sublayers(const std::string& model_type) {
  return model_type == "bert" || model_type == "roberta" ? "encoder\\.layer\\.\\d+\\.attention" : ".*\\.(attn|self_attn|mlp)";
}

/// The PEFT config of `method` (none for full fine-tuning).
std::optional<peft::PeftConfig> method_config(const std::string& method, const std::string& model_type, int64_t r,
                                              std::vector<std::string> targets, const std::vector<std::string>& save) {
  if (targets.empty()) targets = default_targets(model_type);
  if (method == "lora" || method == "dora" || method == "qlora") {
    auto lora = peft::LoraConfig().r(r).lora_alpha(2.0 * r).lora_dropout(0.05).target_modules(targets).modules_to_save(save);
    if (method == "dora") lora.use_dora(true);
    if (method == "qlora") lora.quantize_base(peft::NF4Config().quantize_all_linear(true));
    return lora;
  }
  if (method == "ia3") {
    targets.push_back(feedforward(model_type));
    return peft::IA3Config().target_modules(targets).feedforward_modules({feedforward(model_type)}).modules_to_save(save);
  }
  if (method == "vera") return peft::VeraConfig().r(256).target_modules(targets).modules_to_save(save);
  if (method == "adapter") return peft::BottleneckConfig().target_modules(sublayers(model_type)).bottleneck_size(64).modules_to_save(save);
  if (method == "prefix") return peft::PrefixTuningConfig().num_virtual_tokens(16);
  if (method == "prompt") return peft::PromptTuningConfig().num_virtual_tokens(16);
  if (method == "bitfit") return peft::BitFitConfig().modules_to_save(save);
  return std::nullopt;
}

double default_lr(const std::string& method) {
  if (method == "full") return 3e-4;
  if (method == "lora" || method == "qlora" || method == "dora" || method == "adapter") return 1e-3;
  return 1e-2;
}

/// The model behind either Auto class, with one forward for both tasks.
struct Model {
  peft::hf::CausalLM lm{nullptr};
  peft::hf::SequenceClassifier classifier{nullptr};
  std::shared_ptr<torch::nn::Module> module() const {
    if (lm) return lm.ptr();
    return classifier.ptr();
  }
  torch::Tensor forward(const peft_examples::Batch& b) { return lm ? lm->forward(b.ids, b.mask) : classifier->forward(b.ids, b.mask); }
  const peft::hf::PretrainedConfig& config() const { return lm ? lm->config : classifier->config; }
  void gradient_checkpointing(bool on) { lm ? lm->gradient_checkpointing(on) : classifier->gradient_checkpointing(on); }
  void save(const fs::path& dir) const { lm ? peft::hf::save_pretrained(*lm, dir) : peft::hf::save_pretrained(*classifier, dir); }
};

/// Next-token cross entropy of a causal LM on a batch (fp32, as HF computes it), without the full logits.
torch::Tensor lm_loss(Model& model, const peft_examples::Batch& b) { return model.lm->loss(b.ids, b.mask, b.ids); }

/// Mean next-token loss over `batches` (eval mode, no grad).
double lm_eval_loss(Model& model, const std::vector<peft_examples::Batch>& batches) {
  torch::NoGradGuard no_grad;
  double sum = 0;
  for (const auto& b : batches) sum += lm_loss(model, b).item<double>();
  return sum / static_cast<double>(batches.size());
}

/// Copies the tokenizer files next to a saved model, so the folder is complete.
void copy_tokenizer(const fs::path& from, const fs::path& to) {
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "generation_config.json"})
    if (fs::exists(from / name)) fs::copy_file(from / name, to / name, fs::copy_options::overwrite_existing);
}

std::string progress(int64_t epoch, int64_t epochs, double done_in_epoch, double loss, double rate, double eta) {
  const int bar = static_cast<int>(30 * done_in_epoch);
  return fmt::format("\repoch {}/{} [{:<30}] loss {:.4f}  {:.1f} ex/s  ETA {}   ", epoch, epochs, std::string(bar, '='), loss,
                     rate, clock_time(eta));
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Fine-tune a Hugging Face model folder with a PEFT method (causal LM or sequence classification)"};
  app.option_defaults()->always_capture_default();
  std::string model_dir, data, method = "lora", out = "runs/train", merged, dtype_name, sample;
  std::vector<std::string> targets;
  int64_t r = 8, epochs = 1, batch_size = 16, max_length = 128, seed = 0, max_examples = 0, sample_tokens = 60, max_steps = 0;
  double lr = 0, eval_fraction = 0.1, max_minutes = 0;
  int threads = 0;
  bool from_scratch = false, checkpointing = false;
  app.add_option("--model", model_dir, "Hugging Face model folder (config.json, model.safetensors, tokenizer.json)")
      ->required()->check(CLI::ExistingDirectory);
  app.add_option("--data", data, "a .txt file or folder of .txt files, a .jsonl file, or the SpamAssassin folder")
      ->required()->check(CLI::ExistingPath);
  app.add_option("--method", method, "PEFT method")
      ->check(CLI::IsMember({"lora", "qlora", "dora", "ia3", "vera", "adapter", "prefix", "prompt", "bitfit", "full"}));
  app.add_option("--target-modules", targets, "modules the method adapts (default: HF peft's for the architecture)");
  app.add_option("--r", r, "LoRA rank")->check(CLI::PositiveNumber);
  app.add_option("--epochs", epochs, "passes over the training data")->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "AdamW learning rate (default: per method)");
  app.add_option("--batch-size", batch_size, "examples (or token blocks) per step")->check(CLI::PositiveNumber);
  app.add_option("--max-length", max_length, "tokens per example (classification) or per block (causal LM)")->check(CLI::PositiveNumber);
  app.add_option("--max-examples", max_examples, "use at most this many training examples (0: all)");
  app.add_option("--max-minutes", max_minutes, "stop training after this many minutes (0: no limit)");
  app.add_option("--max-steps", max_steps, "stop training after this many optimizer steps (0: no limit)");
  app.add_option("--eval-fraction", eval_fraction, "share held out for evaluation")->check(CLI::Range(0.01, 0.5));
  app.add_option("--dtype", dtype_name, "parameters' dtype (default: config.json's)")->check(CLI::IsMember({"", "float32", "bfloat16"}));
  app.add_option("--out", out, "where the adapter (or, with --method full, the model folder) goes");
  app.add_option("--merged", merged, "also write the merged model as an HF folder here (LoRA, DoRA, IA3, VeRA)");
  app.add_flag("--from-scratch", from_scratch, "--model holds config.json and tokenizer.json only: pretrain from HF's random init");
  app.add_flag("--gradient-checkpointing", checkpointing, "recompute each layer in backward (less memory)");
  app.add_option("--sample", sample, "causal LM: generate from this prompt after training");
  app.add_option("--sample-tokens", sample_tokens, "tokens --sample generates")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_option("--seed", seed, "seed of the initialisation, dropout and batch order");
  CLI11_PARSE(app, argc, argv);
  peft::configure_threads(argv, threads);
  torch::manual_seed(static_cast<uint64_t>(seed));
  peft::check<peft::OptionError>(!from_scratch || method == "full", "--from-scratch trains every parameter: use --method full");
  const bool mergeable = method == "lora" || method == "qlora" || method == "dora" || method == "ia3" || method == "vera";
  peft::check<peft::OptionError>(merged.empty() || mergeable,
                                 "--merged: method {} adds positions or sublayers, it cannot be merged (lora, qlora, dora, ia3, vera can)", method);
  if (lr <= 0) lr = default_lr(method);

  const peft::hf::Tokenizer tokenizer = peft::hf::AutoTokenizer::from_pretrained(model_dir);
  const Dataset dataset = read_data(data, eval_fraction, static_cast<size_t>(max_examples));
  fmt::print("{}\n", dataset.description);
  peft::hf::ModelOptions options;
  if (dtype_name == "bfloat16") options.dtype(torch::kBFloat16);
  if (dtype_name == "float32") options.dtype(torch::kFloat);
  Model model;
  int64_t labels = 0;
  if (dataset.labelled) {
    for (const auto& e : dataset.train) labels = std::max(labels, e.label + 1);
    peft::check<peft::OptionError>(!from_scratch, "--from-scratch pretrains a causal LM: give unlabelled text as --data");
    peft::check<peft::OptionError>(method != "prompt" && method != "prefix",
                                   "--method {} on a classifier: its new head would not train (HF peft's modules_to_save of "
                                   "prompt learning is not implemented here); use lora, dora, ia3, vera, adapter or bitfit",
                                   method);
    model.classifier = peft::hf::AutoModelForSequenceClassification::from_pretrained(model_dir, options.num_labels(labels));
  } else {
    model.lm = from_scratch ? peft::hf::AutoModelForCausalLM::from_config(peft::hf::AutoConfig::from_pretrained(model_dir), options)
                            : peft::hf::AutoModelForCausalLM::from_pretrained(model_dir, options);
  }
  const std::string model_type = model.config().model_type;
  const std::vector<std::string> head = dataset.labelled ? std::vector<std::string>{model_type == "bert" || model_type == "roberta" ? "classifier" : "score"}
                                                         : std::vector<std::string>{};
  std::optional<peft::nn::PeftModel> peft_model;
  std::vector<torch::Tensor> trainable;
  if (auto config = method_config(method, model_type, r, targets, head)) {
    peft_model.emplace(peft::get_peft_model(model.module(), *config));
    trainable = peft_model->trainable_parameters();
  } else {
    for (auto& p : model.module()->parameters()) p.set_requires_grad(true), trainable.push_back(p);
  }
  int64_t total = 0, trained = 0;
  for (const auto& p : model.module()->parameters()) total += p.numel();
  for (const auto& p : trainable) trained += p.numel();
  fmt::print("{} ({}), method {}: training {} of {} parameters ({:.3f} %)\n", model_dir, model_type, method, trained, total,
             100.0 * trained / total);
  model.gradient_checkpointing(checkpointing);

  const auto batches = [&](const std::vector<Example>& part) {
    return dataset.labelled ? labelled_batches(part, tokenizer, max_length, batch_size)
                            : lm_batches(part, tokenizer, max_length, batch_size);
  };
  const auto train = batches(dataset.train), eval = batches(dataset.eval);
  const auto test = dataset.test.empty() ? eval : batches(dataset.test);
  auto loss_of = [&](const peft_examples::Batch& b) {
    return dataset.labelled ? torch::nn::functional::cross_entropy(model.forward(b).to(torch::kFloat), b.labels) : lm_loss(model, b);
  };
  auto report = [&](const std::vector<peft_examples::Batch>& part, const char* name) {
    model.module()->eval();
    if (dataset.labelled) {
      const auto m = peft_examples::evaluate([&](const peft_examples::Batch& b) { return model.forward(b); }, part);
      fmt::print("{}: accuracy {:.4f}  F1 {:.4f}\n", name, m.accuracy, m.f1);
      return nlohmann::json{{"accuracy", m.accuracy}, {"f1", m.f1}, {"precision", m.precision}, {"recall", m.recall}};
    }
    const double loss = lm_eval_loss(model, part);
    fmt::print("{}: loss {:.4f}  perplexity {:.2f}\n", name, loss, std::exp(loss));
    return nlohmann::json{{"loss", loss}, {"perplexity", std::exp(loss)}};
  };

  torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(lr).weight_decay(0.0));
  const auto start = Clock::now();
  int64_t seen = 0, steps = 0;
  bool out_of_time = false;
  for (int64_t epoch = 1; epoch <= epochs && !out_of_time; ++epoch) {
    model.module()->train();
    double running = 0;
    const torch::Tensor order = torch::randperm(static_cast<int64_t>(train.size()));
    for (size_t i = 0; i < train.size(); ++i) {
      const auto& batch = train[static_cast<size_t>(order[static_cast<int64_t>(i)].item<int64_t>())];
      optimizer.param_groups()[0].options().set_lr(lr * (1.0 - static_cast<double>(steps) / (epochs * train.size())));
      torch::Tensor loss = loss_of(batch);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      ++steps;
      seen += batch.ids.size(0);
      running = i == 0 ? loss.item<double>() : 0.95 * running + 0.05 * loss.item<double>();
      const double elapsed = seconds_since(start);
      const double done = (epoch - 1 + static_cast<double>(i + 1) / train.size()) / epochs;
      double eta = elapsed / done - elapsed;  // the earliest of the data's end, --max-minutes and --max-steps
      if (max_minutes > 0) eta = std::min(eta, 60 * max_minutes - elapsed);
      if (max_steps > 0) eta = std::min(eta, elapsed / steps * static_cast<double>(max_steps - steps));
      fmt::print("{}", progress(epoch, epochs, static_cast<double>(i + 1) / train.size(), running, seen / elapsed, std::max(0.0, eta)));
      std::fflush(stdout);
      if ((max_minutes > 0 && elapsed > 60 * max_minutes) || (max_steps > 0 && steps >= max_steps)) {
        out_of_time = true;
        fmt::print("\nstopping after {} steps (--max-minutes {}, --max-steps {})", steps, max_minutes, max_steps);
        break;
      }
    }
    fmt::print("\n");
    report(eval, fmt::format("epoch {} evaluation", epoch).c_str());
  }
  const double seconds = seconds_since(start);
  nlohmann::json metrics = {{"model", model_dir}, {"model_type", model_type}, {"method", method},
                            {"trainable_params", trained}, {"all_params", total}, {"steps", steps},
                            {"train_seconds", seconds}, {"examples_per_second", seen / seconds}};
  metrics[dataset.test.empty() ? "evaluation" : "test"] = report(test, dataset.test.empty() ? "evaluation" : "test");

  fs::create_directories(out);
  if (peft_model) {
    peft_model->save_pretrained(out);
  } else {
    model.save(out);  // full training: a complete HF folder
    copy_tokenizer(model_dir, out);
  }
  if (!sample.empty() && model.lm) {
    const auto ids = tokenizer.encode(sample, true);
    const torch::Tensor prompt = torch::tensor(ids, torch::kLong).unsqueeze(0);
    auto options = peft::GenerationOptions().max_new_tokens(sample_tokens).do_sample(true).top_k(40).temperature(0.8).seed(
        static_cast<uint64_t>(seed));
    if (auto eos = tokenizer.eos_token_id()) options.stop_tokens({*eos}).pad_token_id(*eos);
    const torch::Tensor generated = peft::generate(*model.lm, prompt, torch::ones_like(prompt), options);
    const auto tokens = generated[0].narrow(0, prompt.size(1), generated.size(1) - prompt.size(1));
    const std::string text = tokenizer.decode(std::vector<int64_t>(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + tokens.numel()), true);
    fmt::print("sample: {}{}\n", sample, text);
    metrics["sample"] = sample + text;
  }
  if (!merged.empty()) {
    peft_model->merge_and_unload();
    model.save(merged);
    copy_tokenizer(model_dir, merged);
    fmt::print("wrote the merged model to {}\n", merged);
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  metrics["peak_rss_mib"] = usage.ru_maxrss / 1024.0;
  peft::io::write_file_atomic(fs::path(out) / "metrics.json", metrics.dump(2) + "\n");
  fmt::print("wrote {} ({}), metrics.json; {:.0f} s of training, peak RSS {:.0f} MiB\n", out,
             peft_model ? "the adapter in HF peft's layout" : "an HF model folder", seconds, usage.ru_maxrss / 1024.0);
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-train", [&] { return run(argc, argv); });
}
