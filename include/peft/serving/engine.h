#pragma once
/// @file
/// peft::serving::Engine: one base model, many adapters, one thread that runs
/// them. Requests that arrive together run as one mixed-adapter batch (each row
/// with its own adapter, KV cache on); adapters load, replace and unload while
/// batches run, between decoding steps, without touching the base's tensors.
/// What peft-serve (examples/serve) puts behind HTTP.

#include <peft/core/error.h>
#include <peft/generation/hf.h>
#include <peft/hf/modeling.h>
#include <peft/native_model.h>
#include <peft/peft_model_base.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace peft {
namespace serving {

/// How an Engine batches.
struct EngineOptions {
  /// Rows of one batch, at most.
  TORCH_ARG(int64_t, max_batch_size) = 8;
  /// After the first request of a batch, how long to wait for others (milliseconds).
  TORCH_ARG(int64_t, batch_wait_ms) = 2;
};

/// One completion to run.
struct CompletionRequest {
  /// The prompt's token ids (not empty).
  std::vector<int64_t> prompt;
  /// The adapter that runs (peft::kBaseAdapter: none).
  std::string adapter = kBaseAdapter;
  /// How to decode; max_new_tokens is this request's limit and stop_tokens its own.
  GenerationOptions options;
  /// Called with each new token as it is decided (on the engine's thread: return quickly).
  std::function<void(int64_t)> on_token;
};

/// What a request produced.
struct Completion {
  /// The new tokens, without the prompt and without the stop token.
  std::vector<int64_t> tokens;
  /// "stop" (a stop token came) or "length" (max_new_tokens reached).
  std::string finish_reason;
};

/// What an Engine has run so far.
struct EngineStats {
  int64_t batches = 0;  ///< batches decoded
  int64_t rows = 0;     ///< requests in them (rows / batches: the mean batch size)
};

/// Serves a peft::hf causal LM with adapters loaded at run time. Thread-safe:
/// submit(), load_adapter() and unload_adapter() may be called from any thread;
/// the model runs on the engine's own thread only. Requests queued together
/// run as one batch when their decoding options agree (max_new_tokens aside).
/// An adapter operation runs at the next decoding step when no row of the
/// running batch uses that adapter, otherwise after the batch; a failed load
/// leaves the served adapters as they were.
///
/// ```
/// peft::serving::Engine engine(peft::hf::AutoModelForCausalLM::from_pretrained("base"));
/// engine.load_adapter("adapters/sql", "sql");
/// peft::serving::CompletionRequest r;
/// r.prompt = {9707, 11};
/// r.adapter = "sql";
/// r.options.max_new_tokens(16);
/// peft::serving::Completion c = engine.submit(r).get();
/// ```
class Engine {
 public:
  /// Starts the engine's thread on `model` (a model of its own: the engine adapts it).
  explicit Engine(hf::CausalLM model, EngineOptions options = {})
      : model_(std::move(model)), options_(options), worker_([this] { run(); }) {}
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  /// Stops the thread; requests still queued fail with ModelError.
  ~Engine() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    worker_.join();
  }

  /// Queues `request`; the future gives its Completion, or throws the error that
  /// stopped it. OptionError now for an empty prompt or an adapter not loaded;
  /// ModelError once the engine is stopping.
  std::future<Completion> submit(CompletionRequest request) {
    check<OptionError>(!request.prompt.empty(), "the prompt is empty");
    request.options.validate();
    std::lock_guard<std::mutex> lock(mutex_);
    check<ModelError>(!stopping_, "the engine is stopping");
    require_known(request.adapter);
    requests_.push_back({std::move(request), {}});
    auto future = requests_.back().result.get_future();
    wake_.notify_all();
    return future;
  }

  /// Loads the adapter in folder `dir` (HF peft's files) as `name`, replacing one
  /// of that name; returns when it serves. FileError / OptionError as
  /// PeftModel::load_adapter raises them, and OptionError for an adapter a mixed
  /// batch cannot run (prompt or prefix tuning, trained whole tensors).
  void load_adapter(const std::filesystem::path& dir, const std::string& name) {
    check<OptionError>(name != kBaseAdapter && name != kTrial, "'{}' is reserved, not an adapter name", name);
    apply({name, dir, {}});
  }

  /// Unloads adapter `name`; returns when no request can use it any more. OptionError when it is not loaded.
  void unload_adapter(const std::string& name) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      check<OptionError>(names_.count(name) > 0, "no adapter named '{}'", name);
    }
    apply({name, std::nullopt, {}});
  }

  /// Batches and requests run so far.
  EngineStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  /// The adapters loaded now, by name.
  std::vector<std::string> adapter_names() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return {names_.begin(), names_.end()};
  }

 private:
  static constexpr const char* kTrial = "__trial__";  // a replacement's first load (see replace())

  struct Pending {
    CompletionRequest request;
    std::promise<Completion> result;
  };
  struct AdapterOp {
    std::string name;
    std::optional<std::filesystem::path> dir;  // load from here; none: unload
    std::promise<void> done;
  };
  struct Row {
    Pending pending;
    Completion completion;
    bool done = false;
  };

  /// Queues `op` and waits for the engine's thread to carry it out.
  void apply(AdapterOp op) {
    auto done = op.done.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      check<ModelError>(!stopping_, "the engine is stopping");
      ops_.push_back(std::move(op));
    }
    wake_.notify_all();
    done.get();
  }

  void require_known(const std::string& adapter) const {
    if (adapter != kBaseAdapter && !names_.count(adapter))
      throw OptionError(fmt::format("no adapter named '{}'; adapters: {}", adapter,
                                    join_names(std::vector<std::string>(names_.begin(), names_.end()))));
  }

  // ------------------------------------------------------ the engine's thread
  void run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !requests_.empty() || !ops_.empty(); });
        if (stopping_) break;
      }
      run_ops({});
      std::vector<Row> batch = take_batch();
      if (!batch.empty()) run_batch(batch);
    }
    fail_queued();
  }

  /// Carries out the queued adapter operations that touch none of `busy`.
  void run_ops(const std::set<std::string>& busy) {
    std::vector<AdapterOp> ready;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = ops_.begin(); it != ops_.end();)
        if (!busy.empty() && !can_run_between_steps(*it, busy)) {
          ++it;
        } else {
          ready.push_back(std::move(*it));
          it = ops_.erase(it);
        }
    }
    for (auto& op : ready) {
      std::exception_ptr error;
      try {
        op.dir ? load(*op.dir, op.name) : unload(op.name);
      } catch (...) {
        error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        names_.clear();
        if (peft_)
          for (const auto& n : peft_->adapter_names()) names_.insert(n);
      }
      error ? op.done.set_exception(error) : op.done.set_value();
    }
  }

  /// Whether `op` may run while a batch using adapters `busy` runs: not on those, and never
  /// creating or dropping the PeftModel (a first adapter would join the running base rows).
  bool can_run_between_steps(const AdapterOp& op, const std::set<std::string>& busy) const {
    return !busy.count(op.name) && peft_ && (op.dir || peft_->adapter_names().size() > 1);
  }

  void load(const std::filesystem::path& dir, const std::string& name) {
    if (!peft_ || !has(name)) return add(dir, name);
    // Replace: load the files under another name first, so that a bad folder leaves the old one serving;
    // the model keeps an adapter throughout (its PeftModel stays while a batch may run on it).
    add(dir, kTrial);
    remove(name);
    try {
      add(dir, name);
    } catch (...) {
      remove(kTrial);
      throw;
    }
    remove(kTrial);
  }

  /// Adds adapter `name` from `dir` (the first one creates the PeftModel); refuses what a mixed batch cannot run.
  void add(const std::filesystem::path& dir, const std::string& name) {
    if (!peft_)
      peft_.emplace(nn::PeftModel::from_pretrained(model_.ptr(), dir, name));
    else
      peft_->load_adapter(dir, name);
    const auto& a = peft_->adapter(name);
    if (a.config.prompt_learning() || !a.trained.empty()) {
      const std::string why = a.config.prompt_learning() ? "prompt and prefix tuning change the sequence, not a layer"
                                                         : "it trains whole tensors (modules_to_save or biases)";
      remove(name);
      throw OptionError(fmt::format("'{}': a mixed-adapter batch cannot serve this adapter: {}", dir.string(), why));
    }
  }

  void unload(const std::string& name) {
    check<OptionError>(peft_ && has(name), "no adapter named '{}'", name);
    remove(name);
  }

  void remove(const std::string& name) {
    if (peft_->adapter_names().size() == 1)
      peft_.reset();  // takes the last adapter out of the layers
    else
      peft_->delete_adapter(name);
  }

  bool has(const std::string& name) const {
    const auto names = peft_->adapter_names();
    return std::find(names.begin(), names.end(), name) != names.end();
  }

  /// The next batch: the oldest request and the queued ones that decode the same way.
  std::vector<Row> take_batch() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (requests_.empty()) return {};
    if (static_cast<int64_t>(requests_.size()) < options_.max_batch_size())
      wake_.wait_for(lock, std::chrono::milliseconds(options_.batch_wait_ms()), [&] {
        return stopping_ || static_cast<int64_t>(requests_.size()) >= options_.max_batch_size();
      });
    std::vector<Row> batch;
    const GenerationOptions first = requests_.front().request.options;
    for (auto it = requests_.begin(); it != requests_.end() && static_cast<int64_t>(batch.size()) < options_.max_batch_size();)
      if (same_decoding(first, it->request.options)) {
        batch.push_back({std::move(*it), {}, false});
        it = requests_.erase(it);
      } else {
        ++it;
      }
    return batch;
  }

  static bool same_decoding(const GenerationOptions& a, const GenerationOptions& b) {
    return a.do_sample() == b.do_sample() && a.temperature() == b.temperature() && a.top_k() == b.top_k() &&
           a.top_p() == b.top_p() && a.repetition_penalty() == b.repetition_penalty() &&
           a.stop_tokens() == b.stop_tokens() && a.pad_token_id() == b.pad_token_id() && a.seed() == b.seed() &&
           a.use_cache() == b.use_cache();
  }

  void run_batch(std::vector<Row>& rows) {
    std::vector<std::vector<int64_t>> prompts;
    std::vector<std::string> adapters;
    std::set<std::string> busy;
    int64_t longest = 0;
    for (auto& row : rows) {
      const auto& r = row.pending.request;
      prompts.push_back(r.prompt);
      adapters.push_back(r.adapter);
      busy.insert(r.adapter);
      longest = std::max(longest, r.options.max_new_tokens());
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.batches += 1;
      stats_.rows += static_cast<int64_t>(rows.size());
    }
    GenerationOptions o = rows.front().pending.request.options;
    o.max_new_tokens(longest).streamer([&](const torch::Tensor& next) {
      record(rows, next);
      run_ops(busy);  // other adapters load and unload between steps
    });
    o.stopping_criteria([&](const torch::Tensor&) {
      std::vector<uint8_t> done;
      for (const auto& row : rows) done.push_back(row.done);
      return torch::tensor(done, torch::kBool);
    });
    try {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& a : adapters) require_known(a);  // (unloaded after it was queued?)
      }
      const PromptBatch batch = left_pad(prompts, o.pad_token_id());
      torch::Tensor ids = batch.input_ids.to(device()), mask = batch.attention_mask.to(device());
      if (peft_)
        generate(*peft_, ids, mask, o, adapters);
      else
        generate(*model_, ids, mask, o);
      for (auto& row : rows) {
        if (row.completion.finish_reason.empty()) row.completion.finish_reason = "length";  // (max_new_tokens 0)
        row.pending.result.set_value(std::move(row.completion));
      }
    } catch (...) {
      for (auto& row : rows) row.pending.result.set_exception(std::current_exception());
    }
  }

  /// Adds step tokens `next` [B] to the rows still running.
  static void record(std::vector<Row>& rows, const torch::Tensor& next) {
    const torch::Tensor tokens = next.to(torch::kCPU);
    for (size_t b = 0; b < rows.size(); ++b) {
      Row& row = rows[b];
      if (row.done) continue;
      const auto& o = row.pending.request.options;
      const int64_t t = tokens[static_cast<int64_t>(b)].item<int64_t>();
      if (std::find(o.stop_tokens().begin(), o.stop_tokens().end(), t) != o.stop_tokens().end()) {
        row.done = true;
        row.completion.finish_reason = "stop";
        continue;
      }
      row.completion.tokens.push_back(t);
      if (row.pending.request.on_token) row.pending.request.on_token(t);
      if (static_cast<int64_t>(row.completion.tokens.size()) >= o.max_new_tokens()) {
        row.done = true;
        row.completion.finish_reason = "length";
      }
    }
  }

  torch::Device device() const { return model_->parameters().front().device(); }

  void fail_queued() {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto stopped = std::make_exception_ptr(ModelError("the engine stopped before this request ran"));
    for (auto& p : requests_) p.result.set_exception(stopped);
    for (auto& op : ops_) op.done.set_exception(stopped);
  }

  hf::CausalLM model_;
  std::optional<nn::PeftModel> peft_;  // none while no adapter is loaded
  EngineOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Pending> requests_;
  std::deque<AdapterOp> ops_;
  std::set<std::string> names_;  // the adapters loaded, as submit() sees them
  EngineStats stats_;
  bool stopping_ = false;
  std::thread worker_;  // last: starts once the rest exists
};

}  // namespace serving
}  // namespace peft
