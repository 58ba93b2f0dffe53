// Serving many adapters on one base (issue 22): adapters loaded, replaced and
// unloaded between generation steps leave the running rows token-identical; a
// mixed batch of adapters equals each row run alone; load / unload cycles do
// not grow the process; peft::serving::Engine batches and swaps under load;
// peft-serve answers over HTTP with its limits.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <peft/hf/tokenizer.h>
#include <peft/peft.h>

#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;
using peft_test::expect_error;
using nlohmann::json;

fs::path hf_fixture(const std::string& name) { return fs::path(PEFT_FIXTURE_DIR) / "hf" / name; }

/// Writes a random LoRA adapter (A and B both random: it changes the output) for `lm` to `dir`.
fs::path write_serving_adapter(peft::hf::CausalLM lm, const fs::path& dir, int64_t seed, const std::string& targets) {
  torch::manual_seed(seed);
  auto config = peft::LoraConfig().r(4).lora_alpha(16).target_modules(targets).init_lora_weights(peft::LoraInit::Random);
  peft::nn::PeftModel model = peft::get_peft_model(lm, config);
  model.save_pretrained(dir);
  return dir;
}

/// A TorchScript LoRA adapter of the tiny LM (tests/test_generate.cpp's fixture) in `dir`.
fs::path write_jit_adapter(const fs::path& dir, int64_t seed) {
  torch::manual_seed(seed);
  peft::PeftModel model = peft::get_peft_model(torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/lm_tiny.pt"),
                                               peft::LoraConfig().r(4).lora_alpha(8).target_modules("all-linear"));
  peft_test::randomise(model, 0.3, seed);
  model.save_pretrained(dir);
  return dir;
}

peft::GenerationOptions greedy(int64_t tokens) { return peft::GenerationOptions().max_new_tokens(tokens); }

/// Row b of the left-padded `batch` alone: its tokens without the padding.
peft::PromptBatch row_alone(const peft::PromptBatch& batch, int64_t b) {
  const torch::Tensor keep = batch.attention_mask[b].to(torch::kBool);
  const torch::Tensor ids = batch.input_ids[b].index({keep});
  return peft::left_pad({std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel())}, 0);
}

/// The new tokens of row b of `out` (generated from `batch`).
torch::Tensor continuation(const torch::Tensor& out, const peft::PromptBatch& batch, int64_t b) {
  return out[b].narrow(0, batch.input_ids.size(1), out.size(1) - batch.input_ids.size(1));
}

const std::vector<std::string> kMixedRows{"a", "b", "c", peft::kBaseAdapter};

TEST(MixedAdapterGeneration, ThreeAdaptersAndTheBaseInOneCachedBatchEqualEachRowAlone) {
  const fs::path dir = peft_test::fresh_dir("serving_mixed");
  auto lm = peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama"));
  for (auto [name, seed] : {std::pair<std::string, int>{"a", 1}, {"b", 2}, {"c", 3}})
    write_serving_adapter(peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama")), dir / name, seed, "all-linear");
  auto model = peft::nn::PeftModel::from_pretrained(lm.ptr(), dir / "a", "a");
  model.load_adapter(dir / "b", "b");
  model.load_adapter(dir / "c", "c");
  const auto batch = peft::left_pad({{5, 9, 14, 2, 33, 7}, {40, 41}, {1, 2, 3, 4}, {8, 8, 60}}, 0);
  const torch::Tensor out = peft::generate(model, batch.input_ids, batch.attention_mask, greedy(10), kMixedRows);
  std::vector<torch::Tensor> alone;
  for (int64_t b = 0; b < 4; ++b) {
    const auto one = row_alone(batch, b);
    const torch::Tensor row = peft::generate(model, one.input_ids, one.attention_mask, greedy(10), {kMixedRows[b]});
    EXPECT_TRUE(torch::equal(continuation(out, batch, b), continuation(row, one, 0))) << "row " << b;
    // The same prompt under every adapter: the adapters really differ.
    for (const auto& other : kMixedRows)
      alone.push_back(continuation(peft::generate(model, one.input_ids, one.attention_mask, greedy(10), {other}), one, 0));
  }
  for (size_t prompt = 0; prompt < 4; ++prompt)
    EXPECT_FALSE(torch::equal(alone[prompt * 4], alone[prompt * 4 + 3])) << "adapter a changes nothing for prompt " << prompt;
  EXPECT_EQ(model.active_adapters(), std::vector<std::string>{"a"}) << "the batch leaves the active adapters as they were";
  expect_error<peft::OptionError>([&] { peft::generate(model, batch.input_ids, batch.attention_mask, greedy(2), {"a"}); },
                                  {"1 adapter names for a batch of 4 rows"});
  expect_error<peft::OptionError>(
      [&] { peft::generate(model, batch.input_ids, batch.attention_mask, greedy(2), {"a", "b", "nope", "c"}); },
      {"no adapter named 'nope'"});
}

TEST(MixedAdapterGeneration, TorchScriptRowsEqualEachRowAlone) {
  const fs::path dir = peft_test::fresh_dir("serving_mixed_jit");
  auto model = peft::PeftModel::from_pretrained(torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/lm_tiny.pt"),
                                                write_jit_adapter(dir / "a", 1), "a");
  model.load_adapter(write_jit_adapter(dir / "b", 2), "b");
  model.load_adapter(write_jit_adapter(dir / "c", 3), "c");
  const auto batch = peft::left_pad({{5, 9, 14, 2, 33, 7}, {40, 41}, {1, 2, 3, 4}, {8, 8, 60}}, 0);
  const torch::Tensor out = peft::generate(model, batch.input_ids, batch.attention_mask, greedy(8), kMixedRows);
  for (int64_t b = 0; b < 4; ++b) {
    const auto one = row_alone(batch, b);
    auto alone = [&] { return peft::generate(model, one.input_ids, one.attention_mask, greedy(8).use_cache(false)); };
    torch::Tensor row;
    if (kMixedRows[b] == peft::kBaseAdapter) {
      const auto off = model.disable_adapter();
      row = alone();
    } else {
      model.set_adapter(kMixedRows[b]);
      row = alone();
    }
    EXPECT_TRUE(torch::equal(continuation(out, batch, b), continuation(row, one, 0))) << "row " << b;
  }
}

/// Greedy generation of rows {"a", base} with the model changed at some steps by `swap(step)`.
template <typename Model>
torch::Tensor generate_swapping(Model& model, const std::function<void(int)>& swap) {
  const auto batch = peft::left_pad({{5, 9, 14, 2, 33, 7}, {40, 41}}, 0);
  int step = 0;
  auto o = greedy(12).streamer([&](const torch::Tensor&) { swap(step++); });
  return peft::generate(model, batch.input_ids, batch.attention_mask, o, {"a", peft::kBaseAdapter});
}

/// Loads, replaces and unloads adapters other than "a" at steps 1..7 of a generation.
template <typename Model>
void swap_others(Model& model, int step, const fs::path& dir) {
  if (step == 1) model.load_adapter(dir / "c", "c");
  if (step == 3) model.delete_adapter("b");
  if (step == 5) model.load_adapter(dir / "c", "b");  // "b" again, other files
  if (step == 7) {
    model.delete_adapter("c");
    EXPECT_THROW(model.load_adapter(dir / "missing", "c"), peft::FileError);
  }
}

TEST(LiveAdapters, LoadingReplacingAndUnloadingOthersBetweenStepsLeavesTheRowsTokenIdentical) {
  const fs::path dir = peft_test::fresh_dir("serving_swap");
  for (auto [name, seed] : {std::pair<std::string, int>{"a", 1}, {"b", 2}, {"c", 3}})
    write_serving_adapter(peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama")), dir / name, seed, "all-linear");
  auto lm = peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama"));
  auto model = peft::nn::PeftModel::from_pretrained(lm.ptr(), dir / "a", "a");
  model.load_adapter(dir / "b", "b");
  const torch::Tensor quiet = generate_swapping(model, [](int) {});
  const torch::Tensor swapped = generate_swapping(model, [&](int step) { swap_others(model, step, dir); });
  EXPECT_TRUE(torch::equal(quiet, swapped)) << quiet << swapped;
  EXPECT_EQ(model.adapter_names(), (std::vector<std::string>{"a", "b"}));
}

TEST(LiveAdapters, TorchScriptRowsStayTokenIdenticalToo) {
  const fs::path dir = peft_test::fresh_dir("serving_swap_jit");
  for (auto [name, seed] : {std::pair<std::string, int>{"a", 1}, {"b", 2}, {"c", 3}}) write_jit_adapter(dir / name, seed);
  auto model = peft::PeftModel::from_pretrained(torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/lm_tiny.pt"), dir / "a", "a");
  model.load_adapter(dir / "b", "b");
  const torch::Tensor quiet = generate_swapping(model, [](int) {});
  const torch::Tensor swapped = generate_swapping(model, [&](int step) { swap_others(model, step, dir); });
  EXPECT_TRUE(torch::equal(quiet, swapped)) << quiet << swapped;
}

/// RSS growth in MiB over `cycles` runs of `cycle` after `warmup` runs.
double growth_mib(const std::function<void()>& cycle, int warmup, int cycles) {
  for (int i = 0; i < warmup; ++i) cycle();
  const size_t before = peft_test::resident_bytes();
  for (int i = 0; i < cycles; ++i) cycle();
  return (static_cast<double>(peft_test::resident_bytes()) - static_cast<double>(before)) / (1 << 20);
}

#ifdef __SANITIZE_ADDRESS__
constexpr bool kAddressSanitizer = true;  // its quarantine keeps freed memory: RSS says nothing about leaks
#else
constexpr bool kAddressSanitizer = false;
#endif

TEST(LiveAdapters, AThousandLoadUnloadCyclesDoNotGrowTheProcess) {
  const int cycles = kAddressSanitizer ? 50 : 1000, models = kAddressSanitizer ? 20 : 200;
  const fs::path dir = peft_test::fresh_dir("serving_cycles");
  torch::jit::Module base = torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/lm_tiny.pt");
  auto jit_model = peft::PeftModel::from_pretrained(base, write_jit_adapter(dir / "a", 1), "a");
  write_jit_adapter(dir / "b", 2);
  const double jit = growth_mib([&] {
    jit_model.load_adapter(dir / "b", "b");
    jit_model.delete_adapter("b");
  }, 50, cycles);
  // What a fuzzing run did: a new PeftModel on the same base, again and again (each used to keep its code).
  const double jit_models = growth_mib([&] { peft::PeftModel::from_pretrained(base, dir / "b", "b"); }, 20, models);

  auto lm = peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama"));
  write_serving_adapter(peft::hf::AutoModelForCausalLM::from_pretrained(hf_fixture("llama")), dir / "n", 1, "all-linear");
  auto model = peft::nn::PeftModel::from_pretrained(lm.ptr(), dir / "n", "a");
  const double native = growth_mib([&] {
    model.load_adapter(dir / "n", "b");
    model.delete_adapter("b");
  }, 50, cycles);
  std::printf("RSS growth: %d TorchScript load/unload cycles %.2f MiB, %d new PeftModels on one base %.2f MiB, "
              "%d native cycles %.2f MiB\n",
              cycles, jit, models, jit_models, cycles, native);
  if (kAddressSanitizer) GTEST_SKIP() << "under AddressSanitizer the cycles ran (for its checks), RSS is not compared";
  EXPECT_LT(jit, 4.0);
  EXPECT_LT(jit_models, 4.0);
  EXPECT_LT(native, 4.0);
}

// ------------------------------------------------------------------ the engine

/// A small Llama folder with tiny-llama's byte-level tokenizer (examples/train/tiny-llama),
/// random weights, and adapters "a", "b" and "c" beside it (made once per process, in a folder
/// of its own: ctest runs each test in a process, several at once).
const fs::path& serving_model_dir() {
  static const fs::path dir = [] {
    const fs::path root = peft_test::fresh_dir("serving_model_" + std::to_string(::getpid())), model = root / "tiny";
    fs::create_directories(model);
    json config = json::parse(std::ifstream(fs::path(PEFT_SOURCE_DIR) / "examples/train/tiny-llama/config.json"));
    config["hidden_size"] = 64, config["intermediate_size"] = 128, config["num_hidden_layers"] = 2;
    std::ofstream(model / "config.json") << config.dump(2);
    for (const char* file : {"tokenizer.json", "tokenizer_config.json"})
      fs::copy_file(fs::path(PEFT_SOURCE_DIR) / "examples/train/tiny-llama" / file, model / file);
    torch::manual_seed(0);
    auto lm = peft::hf::AutoModelForCausalLM::from_config(peft::hf::AutoConfig::from_pretrained(model));
    lm->eval();
    peft::hf::save_pretrained(*lm, model);
    for (auto [name, seed] : {std::pair<std::string, int>{"a", 1}, {"b", 2}, {"c", 3}})
      write_serving_adapter(peft::hf::AutoModelForCausalLM::from_pretrained(model), root / name, seed, "all-linear");
    return model;
  }();
  static const struct RemovedAtExit {
    fs::path root;
    ~RemovedAtExit() {
      std::error_code ignored;
      fs::remove_all(root, ignored);
    }
  } removed{dir.parent_path()};
  return dir;
}
fs::path serving_adapter(const std::string& name) { return serving_model_dir().parent_path() / name; }

constexpr int64_t kEos = 256;  // tiny-llama's <|endoftext|>: end of sequence and padding

/// Greedy tokens of `prompt` under `adapter` run alone by the library, up to the end of sequence.
std::vector<int64_t> alone_tokens(const std::vector<int64_t>& prompt, const std::string& adapter, int64_t max_tokens) {
  auto lm = peft::hf::AutoModelForCausalLM::from_pretrained(serving_model_dir());
  auto model = peft::nn::PeftModel::from_pretrained(lm.ptr(), serving_adapter("a"), "a");
  model.load_adapter(serving_adapter("b"), "b");
  const auto batch = peft::left_pad({prompt}, kEos);
  const torch::Tensor out = peft::generate(model, batch.input_ids, batch.attention_mask,
                                           greedy(max_tokens).stop_tokens({kEos}).pad_token_id(kEos), {adapter});
  std::vector<int64_t> tokens;
  for (int64_t i = static_cast<int64_t>(prompt.size()); i < out.size(1) && out[0][i].item<int64_t>() != kEos; ++i)
    tokens.push_back(out[0][i].item<int64_t>());
  return tokens;
}

peft::serving::CompletionRequest completion_request(std::vector<int64_t> prompt, const std::string& adapter, int64_t max_tokens) {
  peft::serving::CompletionRequest r;
  r.prompt = std::move(prompt);
  r.adapter = adapter;
  r.options = greedy(max_tokens).stop_tokens({kEos}).pad_token_id(kEos);
  return r;
}

TEST(ServingEngine, RequestsForDifferentAdaptersRunAsOneBatchAndEachEqualsItsRunAlone) {
  peft::serving::Engine engine(peft::hf::AutoModelForCausalLM::from_pretrained(serving_model_dir()),
                               peft::serving::EngineOptions().batch_wait_ms(200));
  engine.load_adapter(serving_adapter("a"), "a");
  engine.load_adapter(serving_adapter("b"), "b");
  const std::vector<std::vector<int64_t>> prompts{{72, 101, 108}, {67, 97, 108, 108, 32, 109, 101}, {84}};
  const std::vector<std::string> adapters{"a", "b", peft::kBaseAdapter, "b", "a", peft::kBaseAdapter};
  std::vector<std::future<peft::serving::Completion>> futures;
  for (size_t i = 0; i < adapters.size(); ++i)
    futures.push_back(engine.submit(completion_request(prompts[i % 3], adapters[i], 4 + static_cast<int64_t>(i))));
  for (size_t i = 0; i < adapters.size(); ++i) {
    const auto c = futures[i].get();
    EXPECT_EQ(c.tokens, alone_tokens(prompts[i % 3], adapters[i], 4 + static_cast<int64_t>(i))) << "request " << i;
    EXPECT_EQ(c.finish_reason, c.tokens.size() == 4 + i ? "length" : "stop");
  }
  EXPECT_LT(engine.stats().batches, 6) << "requests queued together share batches";
  EXPECT_EQ(engine.stats().rows, 6);
  expect_error<peft::OptionError>([&] { engine.submit(completion_request({1}, "nope", 2)); }, {"no adapter named 'nope'", "a, b"});
  expect_error<peft::OptionError>([&] { engine.submit(completion_request({}, "a", 2)); }, {"the prompt is empty"});
}

TEST(ServingEngine, AdaptersLoadAndUnloadWhileABatchRunsAndABadFolderChangesNothing) {
  peft::serving::Engine engine(peft::hf::AutoModelForCausalLM::from_pretrained(serving_model_dir()));
  engine.load_adapter(serving_adapter("a"), "a");
  engine.load_adapter(serving_adapter("b"), "b");
  const std::vector<int64_t> prompt{72, 101, 108, 108, 111};
  const int64_t tokens = 150;
  auto quiet = completion_request(prompt, "a", tokens);
  quiet.options.stop_tokens({});  // all 150 tokens
  const auto expected = engine.submit(quiet).get().tokens;

  std::atomic<int64_t> produced{0};
  std::atomic<bool> asked{false};
  auto running = quiet;
  running.on_token = [&](int64_t) {
    if (++produced == 1)  // hold the first step until the test has asked for the changes
      while (!asked) std::this_thread::yield();
  };
  auto result = engine.submit(running);
  while (produced == 0) std::this_thread::yield();
  asked = true;
  engine.load_adapter(serving_adapter("c"), "c");
  engine.load_adapter(serving_adapter("c"), "b");  // replaced
  engine.unload_adapter("c");
  EXPECT_LT(produced.load(), tokens) << "the adapters changed while the batch ran, between its steps";
  EXPECT_EQ(result.get().tokens, expected);
  EXPECT_EQ(engine.adapter_names(), (std::vector<std::string>{"a", "b"}));

  // A corrupt folder, as a new adapter and as a replacement: refused, the served ones answer as before.
  const fs::path bad = peft_test::fresh_dir("serving_corrupt");
  fs::copy(serving_adapter("a"), bad, fs::copy_options::recursive);
  std::ofstream(bad / "adapter_model.safetensors", std::ios::binary | std::ios::trunc) << "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":";
  expect_error<peft::FileError>([&] { engine.load_adapter(bad, "d"); }, {"adapter_model.safetensors"});
  expect_error<peft::FileError>([&] { engine.load_adapter(bad, "a"); }, {"adapter_model.safetensors"});
  EXPECT_EQ(engine.adapter_names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(engine.submit(quiet).get().tokens, expected);
  expect_error<peft::OptionError>([&] { engine.unload_adapter("d"); }, {"no adapter named 'd'"});
}

// ------------------------------------------------------------------ peft-serve

#ifdef PEFT_SERVE
/// peft-serve started on a free loopback port; stopped (SIGTERM, exit status 0 expected) at the end.
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& args) {
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], STDOUT_FILENO);
      close(out[0]);
      std::vector<std::string> all{PEFT_SERVE, serving_model_dir().string(), "--port", "0", "--threads", "1"};
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& a : all) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(PEFT_SERVE, argv.data());
      _exit(127);
    }
    close(out[1]);
    FILE* from = fdopen(out[0], "r");
    char line[512] = {};
    const bool got = std::fgets(line, sizeof line, from) != nullptr;
    std::fclose(from);
    const std::string text = got ? line : "";
    const auto at = text.rfind(':');
    if (!got || at == std::string::npos) throw std::runtime_error("peft-serve did not start: '" + text + "'");
    port = std::stoi(text.substr(at + 1));
  }
  ~ServerProcess() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "peft-serve did not stop cleanly: " << status;
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c;
  }
  int port = 0;

 private:
  pid_t pid_ = -1;
};

/// POSTs `body` to `path`; the status and the parsed body.
std::pair<int, json> post(const ServerProcess& server, const std::string& path, const json& body) {
  auto res = server.client().Post(path.c_str(), body.dump(), "application/json");
  if (!res) return {0, json()};
  return {res->status, json::parse(res->body, nullptr, false)};
}

json completion(const std::string& model, const json& prompt, int64_t max_tokens) {
  return {{"model", model}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
}

/// What the server must answer for `prompt` under `adapter` ("tiny": the base).
std::string expected_text(const std::string& prompt, const std::string& adapter, int64_t max_tokens) {
  static const auto tokenizer = peft::hf::AutoTokenizer::from_pretrained(serving_model_dir());
  return tokenizer.decode(alone_tokens(tokenizer.encode(prompt), adapter == "tiny" ? peft::kBaseAdapter : adapter, max_tokens), true);
}

TEST(PeftServe, CompletesForAdaptersAndTheBaseLoadsAndUnloadsAndStreams) {
  ServerProcess server({"--adapter", "a=" + serving_adapter("a").string()});
  const auto models = json::parse(server.client().Get("/v1/models")->body);
  EXPECT_EQ(models["data"].size(), 2u);
  EXPECT_EQ(models["data"][0]["id"], "tiny");
  auto [status, body] = post(server, "/v1/adapters", {{"name", "b"}, {"path", serving_adapter("b").string()}});
  EXPECT_EQ(status, 201) << body;
  for (const std::string model : {"a", "b", "tiny"}) {
    std::tie(status, body) = post(server, "/v1/completions", completion(model, "Call me", 12));
    ASSERT_EQ(status, 200) << body;
    EXPECT_EQ(body["choices"][0]["text"], expected_text("Call me", model, 12)) << model;
    EXPECT_EQ(body["model"], model);
    EXPECT_EQ(body["usage"]["prompt_tokens"], 7);
  }
  EXPECT_NE(expected_text("Call me", "a", 12), expected_text("Call me", "tiny", 12));

  // Streaming: the pieces add up to the same text; the last event is [DONE].
  json stream_body = completion("b", "Call me", 12);
  stream_body["stream"] = true;
  httplib::Client c = server.client();
  auto res = c.Post("/v1/completions", stream_body.dump(), "application/json");
  ASSERT_TRUE(res);
  std::string text;
  std::istringstream lines(res->body);
  for (std::string line; std::getline(lines, line);)
    if (line.rfind("data: {", 0) == 0) text += json::parse(line.substr(6))["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(text, expected_text("Call me", "b", 12)) << res->status << " " << res->body;
  EXPECT_NE(res->body.find("data: [DONE]"), std::string::npos);

  // A corrupt adapter is refused; the served ones keep answering.
  const fs::path bad = peft_test::fresh_dir("serving_http_corrupt");
  fs::copy(serving_adapter("a"), bad, fs::copy_options::recursive);
  std::ofstream(bad / "adapter_config.json", std::ios::trunc) << "{\"peft_type\": \"LORA\", \"r\": ";
  std::tie(status, body) = post(server, "/v1/adapters", {{"name", "a"}, {"path", bad.string()}});
  EXPECT_EQ(status, 400);
  EXPECT_THAT(body["error"]["message"].get<std::string>(), testing::HasSubstr("adapter_config.json"));
  std::tie(status, body) = post(server, "/v1/completions", completion("a", "Call me", 12));
  EXPECT_EQ(body["choices"][0]["text"], expected_text("Call me", "a", 12));

  auto deleted = server.client().Delete("/v1/adapters/b");
  EXPECT_EQ(deleted->status, 200);
  std::tie(status, body) = post(server, "/v1/completions", completion("b", "Call me", 4));
  EXPECT_EQ(status, 404);
  EXPECT_EQ(server.client().Delete("/v1/adapters/b")->status, 404);
  EXPECT_EQ(json::parse(server.client().Get("/v1/models")->body)["data"].size(), 2u);
}

TEST(PeftServe, EachLimitIsRefusedWithItsStatusAndAJsonError) {
  ServerProcess server({"--adapter", "a=" + serving_adapter("a").string(), "--max-concurrent", "1", "--max-body-bytes",
                        "2048", "--max-prompt-tokens", "16", "--max-tokens", "200"});
  auto refused = [&](const json& request, int want, const std::string& fragment) {
    auto [status, body] = post(server, "/v1/completions", request);
    EXPECT_EQ(status, want) << request;
    EXPECT_THAT(body["error"]["message"].get<std::string>(), testing::HasSubstr(fragment)) << request;
  };
  refused(completion("a", std::string(40, 'x'), 4), 400, "at most 16 (--max-prompt-tokens)");
  refused(completion("a", "hi", 201), 400, "'max_tokens' must be in 1..200");
  refused(completion("a", std::string(3000, 'x'), 4), 413, "--max-body-bytes");
  refused(completion("zz", "hi", 4), 404, "'zz' does not exist");
  refused(completion("a", json::array({1, 999}), 4), 400, "outside the vocabulary");
  refused({{"model", "a"}}, 400, "'prompt' must be");
  auto res = server.client().Post("/v1/completions", "{not json", "application/json");
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(server.client().Get("/v1/nothing")->status, 404);

  // One request in flight (a long one, tried until it gets in): the others get 429 until it ends.
  std::atomic<bool> long_done{false};
  std::thread slow([&] {
    while (post(server, "/v1/completions", completion("a", "Call me", 200)).first == 429) continue;
    long_done = true;
  });
  int too_many = 0;
  while (!long_done && too_many == 0) {
    auto [status, body] = post(server, "/v1/completions", completion("a", "hi", 1));
    if (status == 429) {
      ++too_many;
      EXPECT_THAT(body["error"]["message"].get<std::string>(), testing::HasSubstr("--max-concurrent"));
    }
  }
  slow.join();
  EXPECT_EQ(too_many, 1) << "no request was refused while the long one ran";
  EXPECT_EQ(post(server, "/v1/completions", completion("a", "hi", 1)).first, 200) << "its slot is free again";
}

TEST(PeftServe, TwoHundredRequestsFromEightClientsAreAllAnsweredCorrectly) {
  ServerProcess server({"--adapter", "a=" + serving_adapter("a").string(), "--adapter", "b=" + serving_adapter("b").string(),
                        "--max-concurrent", "8"});
  const std::vector<std::string> prompts{"Call me", "It was", "The whale", "Ishmael"}, models{"a", "b", "tiny"};
  std::map<std::pair<std::string, std::string>, std::string> expected;
  for (const auto& p : prompts)
    for (const auto& m : models) expected[{p, m}] = expected_text(p, m, 8);
  const int requests = 200, clients = 8;
  std::vector<double> latencies(requests);
  std::atomic<int> next{0}, wrong{0};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t)
    threads.emplace_back([&] {
      httplib::Client c = server.client();
      for (int i = next++; i < requests; i = next++) {
        const std::string& p = prompts[i % prompts.size()];
        const std::string& m = models[i % models.size()];
        const auto sent = std::chrono::steady_clock::now();
        auto res = c.Post("/v1/completions", completion(m, p, 8).dump(), "application/json");
        latencies[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - sent).count();
        if (!res || res->status != 200 || json::parse(res->body)["choices"][0]["text"] != expected[{p, m}]) ++wrong;
      }
    });
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(wrong.load(), 0);
  std::sort(latencies.begin(), latencies.end());
  const json result = {{"requests", requests}, {"clients", clients}, {"max_tokens", 8}, {"seconds", seconds},
                       {"requests_per_s", requests / seconds}, {"p50_ms", latencies[requests / 2]},
                       {"p99_ms", latencies[requests * 99 / 100]}, {"wrong", wrong.load()}};
  std::printf("load test: %s\n", result.dump().c_str());
  if (const char* out = std::getenv("PEFT_SERVE_LOAD_RESULT")) std::ofstream(out) << result.dump(2);
}
#endif

}  // namespace
