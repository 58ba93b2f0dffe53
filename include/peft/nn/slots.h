#pragma once
/// @file
/// Adapter slots: where peft::get_peft_model puts a method's adapter inside a
/// torch::nn model (the native backend). A host (a peft::nn layer, or a site a
/// model declares for bottleneck, prompt or prefix adapters) holds one slot per
/// named adapter; each adapter is a submodule of the host under the adapter's name.

#include <peft/core/error.h>
#include <peft/io/adapter_files.h>
#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace peft {
namespace nn {

/// What every adapter in a slot provides (besides being a `torch::nn::Cloneable`
/// module holding its parameters): its tensors under HF peft's keys.
class SlotAdapter {
 public:
  virtual ~SlotAdapter() = default;
  /// Its tensors under HF peft's keys, each `prefix` (`base_model.model.<host path>.`) + its name.
  virtual std::vector<io::StateEntry> state(const std::string& prefix) = 0;
};

namespace detail {

/// The adapter slots of a host, by adapter name, in the order they were added.
class AdapterSlots {
 public:
  /// One adapter in a host.
  struct Slot {
    std::string name;                           ///< the adapter's name
    std::shared_ptr<torch::nn::Module> module;  ///< the adapter (a module implementing the host's adapter interface)
    bool active = true;                         ///< runs in forward
    bool merged = false;                        ///< folded into the host's weights
    torch::Tensor sample_mask;                  ///< [B] 0/1 while a mixed-adapter batch runs, else undefined

    /// The adapter as interface `I` (the host checked it when the slot was added).
    template <typename I>
    I& as() const {
      return dynamic_cast<I&>(*module);
    }
    /// Runs in forward: active and not merged.
    bool applies() const { return active && !merged; }
  };

  /// Registers `module` on `owner` as submodule `name`. OptionError when the
  /// name is taken or the module is not a SlotAdapter.
  void add(torch::nn::Module& owner, const std::string& name, std::shared_ptr<torch::nn::Module> module,
           const std::string& host) {
    check<OptionError>(!find(name) && !owner.named_children().contains(name) && !owner.named_parameters(false).contains(name),
                       "{}: adapter name '{}' is taken", host, name);
    check<OptionError>(dynamic_cast<SlotAdapter*>(module.get()) != nullptr, "{}: adapter '{}' is not a peft::nn::SlotAdapter",
                       host, name);
    owner.register_module(name, module);
    slots_.push_back({name, std::move(module), true, false, torch::Tensor()});
  }

  /// Removes adapter `name` (unmerged first by the caller).
  void remove(torch::nn::Module& owner, const std::string& name) {
    owner.unregister_module(name);
    slots_.erase(std::remove_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.name == name; }), slots_.end());
  }

  /// The slot of adapter `name`, or nullptr.
  Slot* find(const std::string& name) {
    for (auto& s : slots_)
      if (s.name == name) return &s;
    return nullptr;
  }
  /// Every slot, in the order added.
  std::vector<Slot>& all() { return slots_; }
  /// Every slot, in the order added.
  const std::vector<Slot>& all() const { return slots_; }
  /// The first slot that runs (prompt learning: one adapter at a time), or nullptr;
  /// OptionError `mixed_batch_error` while a mixed-adapter batch runs.
  const Slot* single_active(const std::string& mixed_batch_error) const {
    for (const auto& s : slots_)
      if (s.applies()) {
        check<OptionError>(!s.sample_mask.defined(), "{}", mixed_batch_error);
        return &s;
      }
    return nullptr;
  }
  /// Whether some adapter is merged.
  bool any_merged() const {
    return std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.merged; });
  }

  /// Registers copies of the adapters on `owner` (a clone's reset(), whose slots
  /// still point at the original's adapters).
  void recreate(torch::nn::Module& owner) {
    for (auto& s : slots_) {
      s.module = s.module->clone();
      owner.register_module(s.name, s.module);
    }
  }

  /// `adapted` where the slot's sample mask is 1, `plain` elsewhere (exactly); `adapted` without a mask.
  static torch::Tensor masked(const Slot& s, const torch::Tensor& adapted, const torch::Tensor& plain) {
    if (!s.sample_mask.defined()) return adapted;
    std::vector<int64_t> shape(static_cast<size_t>(adapted.dim()), 1);
    shape[0] = -1;
    return torch::where(s.sample_mask.reshape(shape) > 0.5, adapted, plain);
  }

 private:
  std::vector<Slot> slots_;
};

}  // namespace detail

/// A module with adapter slots (peft::nn layers, and the sites of peft/nn/sites.h).
/// get_peft_model fills the slots; the host runs the active adapters in its forward.
class AdapterHost {
 public:
  virtual ~AdapterHost() = default;
  /// The host's adapter slots.
  detail::AdapterSlots& slots() { return slots_; }
  /// The host's adapter slots.
  const detail::AdapterSlots& slots() const { return slots_; }
  /// Folds adapter `name` into the host's weights (hosts whose adapters can merge).
  virtual void merge_adapter(const std::string& name) {
    throw ModelError("adapter '" + name + "' sits in a host that cannot merge it into base weights");
  }
  /// Unmerges every merged adapter (a no-op for hosts that cannot merge).
  virtual void unmerge_adapters() {}

 protected:
  detail::AdapterSlots slots_;  ///< one slot per adapter name
};

}  // namespace nn
}  // namespace peft
