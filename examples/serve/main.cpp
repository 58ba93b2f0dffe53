// peft-serve: an OpenAI-style completions server over a Hugging Face causal-LM
// folder and adapters loaded at run time (docs/serving.md). One base model in
// memory; requests that arrive together decode as one batch, each row with its
// own adapter (peft::serving::Engine); adapters load and unload while it runs.
//   peft-serve MODEL_DIR [--adapter NAME=DIR]... [--port 8000]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <peft/hf/tokenizer.h>
#include <peft/peft.h>
#include <peft/serving/engine.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <unistd.h>
#include <map>
#include <random>

#include "common/program.h"

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

struct Limits {
  int64_t max_prompt_tokens = 1024, max_tokens = 256, max_body_bytes = 1 << 20, max_concurrent = 8;
};

/// A request the server refuses: HTTP status and OpenAI's error object.
struct HttpError : std::runtime_error {
  int status;
  std::string param;
  HttpError(int status, const std::string& message, std::string param = "")
      : std::runtime_error(message), status(status), param(std::move(param)) {}
};

void send_error(httplib::Response& res, int status, const std::string& message, const std::string& param = "") {
  json error = {{"message", message}, {"type", status >= 500 ? "server_error" : "invalid_request_error"},
                {"param", param.empty() ? json() : json(param)}, {"code", status}};
  res.status = status;
  res.set_content(json({{"error", error}}).dump(), "application/json");
}

/// What the model folder says about decoding: end-of-sequence tokens, padding, the longest sequence.
struct ModelFacts {
  std::vector<int64_t> eos;
  int64_t pad = 0, max_positions = 0;
};

ModelFacts read_facts(const fs::path& dir) {
  const json config = json::parse(std::ifstream(dir / "config.json"), nullptr, /*allow_exceptions=*/false);
  ModelFacts facts;
  if (!config.is_object()) return facts;
  const json eos = config.value("eos_token_id", json());
  if (eos.is_number_integer()) facts.eos = {eos.get<int64_t>()};
  if (eos.is_array())
    for (const auto& e : eos) facts.eos.push_back(e.get<int64_t>());
  const json pad = config.value("pad_token_id", json());
  facts.pad = pad.is_number_integer() ? pad.get<int64_t>() : facts.eos.empty() ? 0 : facts.eos.front();
  for (const char* key : {"max_position_embeddings", "n_positions"})
    if (config.contains(key) && config[key].is_number_integer()) facts.max_positions = config[key].get<int64_t>();
  return facts;
}

class Server {
 public:
  Server(const fs::path& model_dir, std::string base_name, const Limits& limits, peft::serving::EngineOptions engine_options)
      : base_name_(std::move(base_name)),
        limits_(limits),
        facts_(read_facts(model_dir)),
        tokenizer_(peft::hf::AutoTokenizer::from_pretrained(model_dir)),
        engine_(peft::hf::AutoModelForCausalLM::from_pretrained(model_dir), engine_options) {
    http_.new_task_queue = [n = limits.max_concurrent + 4] { return new httplib::ThreadPool(static_cast<size_t>(n)); };
    http_.set_payload_max_length(static_cast<size_t>(limits.max_body_bytes));
    http_.set_socket_options([this](int sock) {
      httplib::default_socket_options(sock);
      listening_ = sock;
    });
    http_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      send_error(res, res.status,
                 res.status == 413 ? "the request body is larger than --max-body-bytes allows"
                 : res.status == 404 ? "no such endpoint: see GET /v1/models, POST /v1/completions, POST /v1/adapters"
                                     : fmt::format("the request was refused (HTTP {})", res.status));
    });
    http_.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) { list_models(res); });
    http_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] { complete(req, res); });
    });
    http_.Post("/v1/adapters", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] { load_adapter(req, res); });
    });
    http_.Delete(R"(/v1/adapters/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] { unload_adapter(req.matches[1], res); });
    });
  }

  void load(const fs::path& dir, const std::string& name) { engine_.load_adapter(dir, name); }

  /// Binds `host:port` (0: a free port) and returns the port.
  int bind(const std::string& host, int port) {
    const int bound = port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
    if (bound < 0) throw peft::OptionError(fmt::format("cannot listen on {}:{}", host, port));
    // cpp-httplib 0.11 listens with a backlog of 5: a burst of new connections overflows it and the
    // dropped ones retry a second later (measured: p99 latency 1 s with 8 clients). Linux takes a new backlog.
    ::listen(listening_, SOMAXCONN);
    return bound;
  }
  void listen() { http_.listen_after_bind(); }
  void stop() { http_.stop(); }

 private:
  /// Runs `body`, turning what it throws into an OpenAI-style error response.
  template <typename Body>
  void guarded(httplib::Response& res, Body body) {
    try {
      body();
    } catch (const HttpError& e) {
      send_error(res, e.status, e.what(), e.param);
    } catch (const peft::Error& e) {  // a bad adapter folder, name or option: the client's to fix
      send_error(res, 400, e.what());
    } catch (const json::exception& e) {
      send_error(res, 400, std::string("the body is not the JSON expected: ") + e.what());
    } catch (const std::exception& e) {
      send_error(res, 500, e.what());
    }
  }

  void list_models(httplib::Response& res) {
    json data = json::array({{{"id", base_name_}, {"object", "model"}, {"owned_by", "peft-cpp"}}});
    for (const auto& name : engine_.adapter_names())
      data.push_back({{"id", name}, {"object", "model"}, {"owned_by", "peft-cpp"}, {"parent", base_name_}});
    res.set_content(json({{"object", "list"}, {"data", data}}).dump(), "application/json");
  }

  static json parse_body(const httplib::Request& req) {
    json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (!body.is_object()) throw HttpError(400, "the body must be a JSON object");
    return body;
  }

  /// The engine's name for the served model `model`: the base, or an adapter (404 for neither).
  std::string adapter_of(const json& body) const {
    if (!body.contains("model") || !body["model"].is_string()) throw HttpError(400, "'model' (a string) is required", "model");
    const std::string model = body["model"];
    if (model == base_name_) return peft::kBaseAdapter;
    const auto names = engine_.adapter_names();
    if (std::find(names.begin(), names.end(), model) == names.end())
      throw HttpError(404, fmt::format("the model '{}' does not exist (GET /v1/models lists them)", model), "model");
    return model;
  }

  std::vector<int64_t> prompt_of(const json& body) const {
    const json& p = body.value("prompt", json());
    std::vector<int64_t> ids;
    if (p.is_string()) {
      ids = tokenizer_.encode(p.get<std::string>(), /*add_special_tokens=*/true);
    } else if (p.is_array() && !p.empty() && std::all_of(p.begin(), p.end(), [](const json& t) { return t.is_number_integer(); })) {
      ids = p.get<std::vector<int64_t>>();
      const int64_t vocab = tokenizer_.vocab_size();
      for (int64_t id : ids)
        if (id < 0 || id >= vocab) throw HttpError(400, fmt::format("token id {} is outside the vocabulary (0..{})", id, vocab - 1), "prompt");
    } else {
      throw HttpError(400, "'prompt' must be a string or an array of token ids (one prompt per request)", "prompt");
    }
    if (ids.empty()) throw HttpError(400, "the prompt is empty", "prompt");
    if (static_cast<int64_t>(ids.size()) > limits_.max_prompt_tokens)
      throw HttpError(400, fmt::format("the prompt has {} tokens; this server takes at most {} (--max-prompt-tokens)", ids.size(),
                                       limits_.max_prompt_tokens), "prompt");
    return ids;
  }

  peft::GenerationOptions options_of(const json& body, int64_t prompt_tokens) const {
    for (const char* unsupported : {"suffix", "logprobs", "echo", "best_of", "logit_bias"})
      if (body.contains(unsupported) && !body[unsupported].is_null() && body[unsupported] != json(false))
        throw HttpError(400, fmt::format("'{}' is not supported", unsupported), unsupported);
    if (body.value("n", 1) != 1) throw HttpError(400, "'n' must be 1", "n");
    const int64_t max_tokens = body.value("max_tokens", int64_t{16});
    if (max_tokens < 1 || max_tokens > limits_.max_tokens)
      throw HttpError(400, fmt::format("'max_tokens' must be in 1..{} (--max-tokens), got {}", limits_.max_tokens, max_tokens), "max_tokens");
    if (facts_.max_positions > 0 && prompt_tokens + max_tokens > facts_.max_positions)
      throw HttpError(400, fmt::format("{} prompt tokens + {} max_tokens exceed the model's {} positions", prompt_tokens,
                                       max_tokens, facts_.max_positions), "max_tokens");
    const double temperature = body.value("temperature", 1.0);
    if (temperature < 0 || temperature > 2) throw HttpError(400, "'temperature' must be in [0, 2]", "temperature");
    const double top_p = body.value("top_p", 1.0);
    if (top_p <= 0 || top_p > 1) throw HttpError(400, "'top_p' must be in (0, 1]", "top_p");
    auto o = peft::GenerationOptions().max_new_tokens(max_tokens).stop_tokens(facts_.eos).pad_token_id(facts_.pad);
    if (temperature > 0)
      o.do_sample(true).temperature(temperature).top_p(top_p).seed(body.value("seed", std::random_device{}()));
    return o;
  }

  /// The stop strings of the body ("stop": a string or up to 4).
  static std::vector<std::string> stops_of(const json& body) {
    const json& s = body.value("stop", json());
    if (s.is_null()) return {};
    if (s.is_string()) return {s.get<std::string>()};
    if (s.is_array() && s.size() <= 4 && std::all_of(s.begin(), s.end(), [](const json& x) { return x.is_string(); }))
      return s.get<std::vector<std::string>>();
    throw HttpError(400, "'stop' must be a string or an array of up to 4 strings", "stop");
  }

  /// Counts a request in flight for its lifetime; 429 past --max-concurrent.
  class Slot {
   public:
    explicit Slot(std::atomic<int64_t>& count, int64_t limit) : count_(count) {
      if (++count_ > limit) {
        --count_;
        throw HttpError(429, fmt::format("more than {} requests at once (--max-concurrent): retry later", limit));
      }
    }
    ~Slot() { --count_; }

   private:
    std::atomic<int64_t>& count_;
  };

  void complete(const httplib::Request& req, httplib::Response& res) {
    auto slot = std::make_shared<Slot>(in_flight_, limits_.max_concurrent);
    const json body = parse_body(req);
    peft::serving::CompletionRequest request;
    request.adapter = adapter_of(body);
    request.prompt = prompt_of(body);
    request.options = options_of(body, static_cast<int64_t>(request.prompt.size()));
    const std::vector<std::string> stops = stops_of(body);
    const json head = {{"id", fmt::format("cmpl-{}", ++served_)}, {"object", "text_completion"},
                       {"created", std::chrono::duration_cast<std::chrono::seconds>(
                                       std::chrono::system_clock::now().time_since_epoch()).count()},
                       {"model", body["model"]}};
    if (body.value("stream", false))
      stream(std::move(request), stops, head, slot, res);
    else
      answer(std::move(request), stops, head, res);
  }

  /// The completion's text, cut at the first stop string (finish_reason "stop" then).
  std::pair<std::string, std::string> text_of(const peft::serving::Completion& c, const std::vector<std::string>& stops) const {
    std::string text = tokenizer_.decode(c.tokens, /*skip_special_tokens=*/true);
    std::string reason = c.finish_reason;
    for (const auto& s : stops)
      if (auto at = text.find(s); !s.empty() && at != std::string::npos) text.resize(at), reason = "stop";
    return {text, reason};
  }

  void answer(peft::serving::CompletionRequest request, const std::vector<std::string>& stops, json out, httplib::Response& res) {
    const size_t prompt_tokens = request.prompt.size();
    const peft::serving::Completion c = engine_.submit(std::move(request)).get();
    const auto [text, reason] = text_of(c, stops);
    out["choices"] = json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", reason}}});
    out["usage"] = {{"prompt_tokens", prompt_tokens}, {"completion_tokens", c.tokens.size()},
                    {"total_tokens", prompt_tokens + c.tokens.size()}};
    res.set_content(out.dump(), "application/json");
  }

  /// Server-sent events: a chunk per piece of new text, then the finish reason and [DONE].
  void stream(peft::serving::CompletionRequest request, const std::vector<std::string>& stops, const json& head,
              std::shared_ptr<Slot> slot, httplib::Response& res) {
    struct Channel {
      std::mutex mutex;
      std::condition_variable ready;
      std::vector<int64_t> tokens;
      std::future<peft::serving::Completion> result;
    };
    auto channel = std::make_shared<Channel>();
    request.on_token = [channel](int64_t t) {
      std::lock_guard<std::mutex> lock(channel->mutex);
      channel->tokens.push_back(t);
      channel->ready.notify_all();
    };
    channel->result = engine_.submit(std::move(request));
    auto sent = std::make_shared<std::string>();
    auto seen = std::make_shared<size_t>(0);
    res.set_chunked_content_provider("text/event-stream", [this, channel, sent, seen, stops, head, slot](size_t, httplib::DataSink& sink) {
      std::unique_lock<std::mutex> lock(channel->mutex);
      auto finished = [&] { return channel->result.wait_for(std::chrono::seconds(0)) == std::future_status::ready; };
      channel->ready.wait_for(lock, std::chrono::milliseconds(50), [&] { return channel->tokens.size() > *seen || finished(); });
      const std::vector<int64_t> tokens = channel->tokens;
      *seen = tokens.size();
      lock.unlock();
      auto chunk = [&](const std::string& text, const json& reason) {
        json c = head;
        c["choices"] = json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", reason}}});
        const std::string event = "data: " + c.dump() + "\n\n";
        return sink.write(event.data(), event.size());
      };
      if (!finished()) {  // send the text that is final: decoded so far, short of a stop string that may be forming
        std::string text = tokenizer_.decode(tokens, true);
        if (text.size() > sent->size() && text.compare(0, sent->size(), *sent) == 0 && stops.empty() &&
            text.back() != '\xbd') {  // (the last byte of U+FFFD: a character still incomplete)
          const std::string delta = text.substr(sent->size());
          *sent = text;
          return chunk(delta, nullptr);
        }
        return true;
      }
      try {
        const auto [text, reason] = text_of(channel->result.get(), stops);
        chunk(text.size() >= sent->size() ? text.substr(sent->size()) : "", reason);
      } catch (const std::exception& e) {
        const std::string event = "data: " + json({{"error", {{"message", e.what()}, {"type", "server_error"}}}}).dump() + "\n\n";
        sink.write(event.data(), event.size());
      }
      const std::string done = "data: [DONE]\n\n";
      sink.write(done.data(), done.size());
      sink.done();
      return true;
    });
  }

  void load_adapter(const httplib::Request& req, httplib::Response& res) {
    const json body = parse_body(req);
    if (!body.contains("name") || !body["name"].is_string() || !body.contains("path") || !body["path"].is_string())
      throw HttpError(400, "give 'name' and 'path' (an adapter folder on this machine) as strings");
    const std::string name = body["name"];
    if (name == base_name_) throw HttpError(400, fmt::format("'{}' is the base model's name", name), "name");
    engine_.load_adapter(body["path"].get<std::string>(), name);
    res.status = 201;
    res.set_content(json({{"id", name}, {"object", "model"}, {"owned_by", "peft-cpp"}, {"parent", base_name_}}).dump(),
                    "application/json");
  }

  void unload_adapter(const std::string& name, httplib::Response& res) {
    const auto names = engine_.adapter_names();
    if (std::find(names.begin(), names.end(), name) == names.end())
      throw HttpError(404, fmt::format("no adapter named '{}' is loaded", name));
    engine_.unload_adapter(name);
    res.set_content(json({{"id", name}, {"object", "model"}, {"deleted", true}}).dump(), "application/json");
  }

  std::string base_name_;
  Limits limits_;
  ModelFacts facts_;
  peft::hf::Tokenizer tokenizer_;
  peft::serving::Engine engine_;
  httplib::Server http_;
  std::atomic<int64_t> in_flight_{0}, served_{0};
  int listening_ = -1;  // the listening socket (its backlog raised in bind())
};

}  // namespace

/// SIGINT / SIGTERM reach any thread (OpenBLAS starts its own before main): the handler only writes to this
/// pipe, and a thread reading it stops the server.
int stop_pipe[2] = {-1, -1};
extern "C" void on_stop_signal(int) { [[maybe_unused]] auto n = write(stop_pipe[1], "s", 1); }

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-serve", [&] {
    CLI::App app{"OpenAI-style completions over a Hugging Face causal-LM folder and adapters loaded at run time"};
    std::string model_dir, host = "127.0.0.1", name;
    std::vector<std::string> adapters;
    Limits limits;
    int port = 8000, threads = 2;
    int64_t max_batch = 8;
    app.add_option("model", model_dir, "Hugging Face folder: config.json, safetensors, tokenizer.json")->required();
    app.add_option("--adapter", adapters, "NAME=DIR: an adapter folder (HF peft's files) to serve as NAME; repeatable");
    app.add_option("--name", name, "the base model's name in requests (default: the folder's name)");
    app.add_option("--host", host, "address to listen on (127.0.0.1: this machine only)")->capture_default_str();
    app.add_option("--port", port, "port to listen on (0: any free port, printed)")->capture_default_str();
    app.add_option("--max-prompt-tokens", limits.max_prompt_tokens, "longest prompt accepted, in tokens")->capture_default_str();
    app.add_option("--max-tokens", limits.max_tokens, "largest max_tokens accepted")->capture_default_str();
    app.add_option("--max-body-bytes", limits.max_body_bytes, "largest request body accepted")->capture_default_str();
    app.add_option("--max-concurrent", limits.max_concurrent, "completions in flight at once; more get 429")->capture_default_str();
    app.add_option("--max-batch-size", max_batch, "rows decoded together, at most")->capture_default_str();
    app.add_option("--threads", threads, "CPU threads for the model")->capture_default_str();
    CLI11_PARSE(app, argc, argv);
    peft::configure_threads(argv, threads);
    if (name.empty()) name = fs::absolute(model_dir).lexically_normal().filename().string();
    if (name.empty()) name = fs::absolute(model_dir).lexically_normal().parent_path().filename().string();

    std::vector<std::pair<std::string, std::string>> named;  // (name, folder)
    for (const auto& spec : adapters) {
      const auto eq = spec.find('=');
      if (eq == std::string::npos || eq == 0) throw peft::OptionError(fmt::format("--adapter '{}': give NAME=DIR", spec));
      named.emplace_back(spec.substr(0, eq), spec.substr(eq + 1));
    }
    Server server(model_dir, name, limits, peft::serving::EngineOptions().max_batch_size(max_batch));
    for (const auto& [adapter, dir] : named) server.load(dir, adapter);
    const int bound = server.bind(host, port);
    fmt::print("peft-serve: serving '{}' with {} adapter(s) on http://{}:{}\n", name, adapters.size(), host, bound);
    std::fflush(stdout);
    if (pipe(stop_pipe) != 0) throw std::runtime_error("peft-serve: no pipe for the stop signals");
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
    std::thread waiter([&] {
      char byte = 0;
      if (read(stop_pipe[0], &byte, 1) == 1 && byte == 's') server.stop();
    });
    server.listen();
    [[maybe_unused]] auto n = write(stop_pipe[1], "e", 1);  // (ended otherwise: let the waiter go)
    waiter.join();
    return 0;
  });
}
