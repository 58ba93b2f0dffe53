#pragma once
/// @file
/// A c10d process group (PyTorch's own distributed engine) set up from the
/// environment variables torchrun sets: Gloo on CPU, NCCL for CUDA tensors
/// when LibTorch has it. Link target: `peft::distributed` (CMake), which adds
/// the c10d defines; Debian needs `libgloo-dev` for Gloo's headers.

#if !defined(USE_C10D_GLOO)
#error "peft/distributed needs LibTorch's c10d with Gloo: link peft::distributed (defines USE_C10D_GLOO, USE_DISTRIBUTED)"
#endif

#include <peft/core/error.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace peft {
namespace distributed {

/// What runs collectives: LibTorch 1.13's Gloo and NCCL groups derive from
/// c10d::ProcessGroup, 2.x's from c10d::Backend; both declare the same calls.
using Collectives = std::conditional_t<std::is_base_of<c10d::ProcessGroup, c10d::ProcessGroupGloo>::value,
                                       c10d::ProcessGroup, c10d::Backend>;

/// Where this process sits, read from torchrun's variables.
///
/// ```
/// auto env = peft::distributed::Environment::from_env();   // RANK=1 WORLD_SIZE=2 ...
/// peft::distributed::ProcessGroup group(env);
/// ```
struct Environment {
  /// RANK: this process, 0 .. world_size - 1.
  int rank = 0;
  /// WORLD_SIZE: processes in the job.
  int world_size = 1;
  /// LOCAL_RANK: this process on its machine (picks the GPU).
  int local_rank = 0;
  /// MASTER_ADDR: host of rank 0's store.
  std::string master_addr = "127.0.0.1";
  /// MASTER_PORT: port of rank 0's store.
  int master_port = 29500;

  /// RANK, WORLD_SIZE (required), LOCAL_RANK (default RANK), MASTER_ADDR
  /// (default 127.0.0.1), MASTER_PORT (default 29500). OptionError names a
  /// missing or malformed variable.
  static Environment from_env() {
    Environment env;
    env.rank = integer("RANK", -1);
    env.world_size = integer("WORLD_SIZE", -1);
    env.local_rank = integer("LOCAL_RANK", env.rank);
    env.master_port = integer("MASTER_PORT", 29500);
    if (const char* addr = std::getenv("MASTER_ADDR")) env.master_addr = addr;
    check<OptionError>(env.world_size >= 1, "WORLD_SIZE must be >= 1, got {}", env.world_size);
    check<OptionError>(env.rank >= 0 && env.rank < env.world_size, "RANK must be in [0, WORLD_SIZE={}), got {}",
                       env.world_size, env.rank);
    check<OptionError>(env.master_port > 0 && env.master_port < 65536, "MASTER_PORT must be a TCP port, got {}",
                       env.master_port);
    return env;
  }

  /// Whether the variables of a distributed launch are present.
  static bool present() { return std::getenv("WORLD_SIZE") != nullptr && std::getenv("RANK") != nullptr; }

 private:
  static int integer(const char* name, int fallback) {
    const char* value = std::getenv(name);
    if (!value) {
      check<OptionError>(fallback >= 0, "environment variable {} is not set (launch with peft-launch or torchrun)", name);
      return fallback;
    }
    char* end = nullptr;
    const long parsed = std::strtol(value, &end, 10);
    check<OptionError>(end != value && *end == '\0', "environment variable {}='{}' is not an integer", name, value);
    return static_cast<int>(parsed);
  }
};

/// Options of ProcessGroup.
///
/// ```
/// auto group = peft::distributed::ProcessGroup::from_env(
///     peft::distributed::ProcessGroupOptions().timeout(std::chrono::seconds(30)));
/// ```
struct ProcessGroupOptions {
  /// How long to wait for every rank to arrive, and for each collective.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(300);
  /// "gloo", "nccl", or "auto" (NCCL for CUDA tensors when available, else Gloo).
  TORCH_ARG(std::string, backend) = "auto";
  /// The device the tensors live on (decides "auto").
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

/// A process group of `world_size` ranks.
///
/// ```
/// auto group = peft::distributed::ProcessGroup::from_env();   // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
/// peft::distributed::DataParallel dp(group, model.trainable_parameters());
/// ```
class ProcessGroup {
 public:
  /// Connects to the others; CommunicationError (naming the rank and the
  /// address) when they do not all arrive within the timeout.
  ProcessGroup(const Environment& env, const ProcessGroupOptions& options = {}) : env_(env), options_(options) {
    const std::string backend = resolve_backend();
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(env.master_port);
    store_options.isServer = env.rank == 0;
    store_options.numWorkers = env.world_size;
    store_options.waitWorkers = true;
    store_options.timeout = options.timeout();
    try {
      auto store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
      group_ = backend == "nccl" ? make_nccl(store) : make_gloo(store);
    } catch (const std::exception& e) {
      throw CommunicationError(fmt::format(
          "rank {} of {}: the process group on {}:{} did not form within {} s (a rank that never started or "
          "died?): {}",
          env.rank, env.world_size, env.master_addr, env.master_port, options.timeout().count() / 1000.0, e.what()));
    }
  }

  /// The group torchrun's (or peft-launch's) environment describes.
  static ProcessGroup from_env(const ProcessGroupOptions& options = {}) {
    return ProcessGroup(Environment::from_env(), options);
  }

  /// This process's rank.
  int rank() const { return env_.rank; }
  /// Processes in the group.
  int world_size() const { return env_.world_size; }
  /// Rank, size and rendezvous address it was created from.
  const Environment& environment() const { return env_; }
  /// Backend and timeout it was created with.
  const ProcessGroupOptions& options() const { return options_; }
  /// The c10d object that runs broadcast / all-reduce / barrier.
  const c10::intrusive_ptr<Collectives>& collectives() const { return group_; }

  /// Waits for `work`, turning a failure or timeout into CommunicationError naming `what`.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) const {
    try {
      work->wait(options_.timeout());
    } catch (const std::exception& e) {
      throw CommunicationError(fmt::format("rank {} of {}: {} failed (a rank died or timed out after {} s): {}",
                                           env_.rank, env_.world_size, what, options_.timeout().count() / 1000.0,
                                           e.what()));
    }
  }

  /// Blocks until every rank reaches it.
  void barrier() const { wait(group_->barrier(), "barrier"); }

 private:
  std::string resolve_backend() const {
    const std::string& b = options_.backend();
    check<OptionError>(b == "auto" || b == "gloo" || b == "nccl", "ProcessGroupOptions.backend must be auto, gloo or "
                       "nccl, got '{}'", b);
#ifdef USE_C10D_NCCL
    if (b == "auto") return options_.device().is_cuda() ? "nccl" : "gloo";
    return b;
#else
    check<OptionError>(b != "nccl", "ProcessGroupOptions.backend 'nccl': this LibTorch was built without NCCL");
    return "gloo";
#endif
  }

  c10::intrusive_ptr<Collectives> make_gloo(const c10::intrusive_ptr<c10d::Store>& store) const {
    auto gloo = c10d::ProcessGroupGloo::Options::create(options_.timeout());
    // On one machine bind to loopback; across machines to this host's address.
    const bool local = env_.master_addr == "localhost" || env_.master_addr.rfind("127.", 0) == 0;
    gloo->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                  : c10d::ProcessGroupGloo::createDefaultDevice());
    gloo->threads = 2;
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, env_.rank, env_.world_size, gloo);
  }

  c10::intrusive_ptr<Collectives> make_nccl(const c10::intrusive_ptr<c10d::Store>& store) const {
#ifdef USE_C10D_NCCL
    auto nccl = c10d::ProcessGroupNCCL::Options::create();
    nccl->timeout = options_.timeout();
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env_.rank, env_.world_size, nccl);
#else
    (void)store;
    throw OptionError("NCCL is not available in this LibTorch");
#endif
  }

  Environment env_;
  ProcessGroupOptions options_;
  c10::intrusive_ptr<Collectives> group_;
};

}  // namespace distributed
}  // namespace peft
