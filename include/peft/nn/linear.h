#pragma once
/// @file
/// Drop-in linear layers with adapter slots: peft::nn::Linear (torch::nn::Linear's
/// options, parameters, state dict and forward) and peft::nn::Conv1D (Hugging
/// Face's GPT-2 projection, weight stored [in, out]). Write a model with them and
/// peft::get_peft_model fills their slots (HF peft's `_create_and_replace`, without
/// replacing the module a typed member holds).

#include <peft/core/error.h>
#include <peft/core/merged_guard.h>
#include <peft/core/shape.h>
#include <peft/io/adapter_files.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace peft {
namespace nn {

/// The frozen layer an adapter sees: y = x·Wᵀ + b, or x·W + b with fan_in_fan_out.
struct LinearBase {
  const torch::Tensor& weight;  ///< [out, in], or [in, out] with fan_in_fan_out
  const torch::Tensor& bias;    ///< [out], or undefined
  bool fan_in_fan_out;          ///< weight stored [in, out] (GPT-2's Conv1D)
};

/// What a method attaches to a linear layer (one per method, in its folder): a
/// `torch::nn::Cloneable` module that also implements this interface. It is a
/// submodule of the layer, under the adapter's name, holding its own parameters.
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  /// The layer's input after this adapter (IA3 on feed-forward layers scales it); default: x.
  virtual torch::Tensor input(const torch::Tensor& x) { return x; }
  /// The layer's output y [..., out] for input x [..., in] after this adapter; default: y.
  virtual torch::Tensor output(const torch::Tensor& x, const torch::Tensor& y, const LinearBase& base) { return y; }
  /// Folds the adapter into `weight` / `bias` in place (no grad).
  virtual void merge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) = 0;
  /// Undoes merge() (up to rounding).
  virtual void unmerge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) = 0;
  /// Its tensors under HF peft's keys, each `prefix` (`base_model.model.<layer path>.`) + its name.
  virtual std::vector<io::StateEntry> state(const std::string& prefix) = 0;
};

namespace detail {

/// The adapter slots of a layer, by adapter name, in the order they were added.
class AdapterSlots {
 public:
  struct Slot {
    std::string name;
    std::shared_ptr<torch::nn::Module> module;  ///< the adapter as a module (its parameters)
    LinearAdapter* adapter;                     ///< the same object, as an adapter
    bool active = true;
    bool merged = false;
    torch::Tensor sample_mask;  ///< [B] 0/1 while a mixed-adapter batch runs, else undefined
  };

  /// Registers `module` (a Cloneable module implementing LinearAdapter) on `owner`
  /// as submodule `name`. OptionError when the name is taken.
  void add(torch::nn::Module& owner, const std::string& name, std::shared_ptr<torch::nn::Module> module,
           const std::string& layer) {
    check<OptionError>(!find(name) && !owner.named_children().contains(name) && name != "weight" && name != "bias",
                       "{}: adapter name '{}' is taken", layer, name);
    auto* adapter = dynamic_cast<LinearAdapter*>(module.get());
    check<OptionError>(adapter != nullptr, "{}: adapter '{}' is not a peft::nn::LinearAdapter", layer, name);
    owner.register_module(name, module);
    slots_.push_back({name, std::move(module), adapter, true, false, torch::Tensor()});
  }

  /// Removes adapter `name` (unmerged first by the caller).
  void remove(torch::nn::Module& owner, const std::string& name) {
    owner.unregister_module(name);
    slots_.erase(std::remove_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.name == name; }), slots_.end());
  }

  Slot* find(const std::string& name) {
    for (auto& s : slots_)
      if (s.name == name) return &s;
    return nullptr;
  }
  std::vector<Slot>& all() { return slots_; }
  const std::vector<Slot>& all() const { return slots_; }

  /// The layer's output with the active, unmerged adapters; `linear(h)` computes the frozen layer.
  template <typename Linear>
  torch::Tensor run(const torch::Tensor& x, const LinearBase& base, Linear linear, bool training,
                    const std::string& layer) {
    torch::Tensor h = x;
    for (auto& s : slots_)
      if (applies(s)) h = masked(s, s.adapter->input(h), h);
    torch::Tensor y = linear(h);
    for (auto& s : slots_)
      if (applies(s)) y = masked(s, s.adapter->output(x, y, base), y);
    if (!detail_merged() || !peft::detail::records_training(training)) return y;
    return peft::detail::fail_backward_merged(y, peft::detail::merged_layer_message(layer, "its adapter parameters"));
  }

  /// Merges adapter `name` into the weights (a no-op when merged).
  void merge(const std::string& name, torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) {
    Slot* s = find(name);
    if (!s || s->merged) return;
    torch::NoGradGuard no_grad;
    s->adapter->merge(weight, bias, fan_in_fan_out);
    s->merged = true;
  }

  /// Unmerges every merged adapter, last added first.
  void unmerge_all(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) {
    torch::NoGradGuard no_grad;
    for (auto it = slots_.rbegin(); it != slots_.rend(); ++it)
      if (it->merged) {
        it->adapter->unmerge(weight, bias, fan_in_fan_out);
        it->merged = false;
      }
  }

  /// Registers copies of the adapters on `owner` (a clone's reset(), whose slots
  /// still point at the original's adapters).
  void recreate(torch::nn::Module& owner) {
    for (auto& s : slots_) {
      s.module = s.module->clone();
      s.adapter = dynamic_cast<LinearAdapter*>(s.module.get());
      owner.register_module(s.name, s.module);
    }
  }

 private:
  static bool applies(const Slot& s) { return s.active && !s.merged; }
  bool detail_merged() const {
    return std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.merged; });
  }
  /// `adapted` where the sample's mask is 1, `plain` elsewhere (exactly).
  static torch::Tensor masked(const Slot& s, const torch::Tensor& adapted, const torch::Tensor& plain) {
    if (!s.sample_mask.defined()) return adapted;
    std::vector<int64_t> shape(static_cast<size_t>(adapted.dim()), 1);
    shape[0] = -1;
    return torch::where(s.sample_mask.reshape(shape) > 0.5, adapted, plain);
  }

  std::vector<Slot> slots_;
};

}  // namespace detail

/// The adapter-slot interface of peft::nn layers, which get_peft_model uses.
class AdaptedLayer {
 public:
  virtual ~AdaptedLayer() = default;
  /// The layer's adapter slots.
  virtual detail::AdapterSlots& slots() = 0;
  /// Merges adapter `name` into the layer's weights.
  virtual void merge_adapter(const std::string& name) = 0;
  /// Unmerges every merged adapter.
  virtual void unmerge_adapters() = 0;
  /// in_features, out_features.
  virtual std::pair<int64_t, int64_t> features() const = 0;
  /// Whether the weight is stored [in, out].
  virtual bool fan_in_fan_out() const = 0;
  /// The frozen weight.
  virtual torch::Tensor& weight_tensor() = 0;
  /// The frozen bias (undefined without one).
  virtual torch::Tensor& bias_tensor() = 0;
};

/// torch::nn::Linear with adapter slots: same options, parameters (`weight`
/// [out, in], `bias` [out]), initialisation, state dict and forward while no
/// adapter is attached.
///
/// ```
/// struct AttentionImpl : torch::nn::Module {
///   peft::nn::Linear q{nullptr}, v{nullptr};
///   AttentionImpl() : q(register_module("q", peft::nn::Linear(64, 64))), v(register_module("v", peft::nn::Linear(64, 64))) {}
/// };
/// ```
class LinearImpl : public torch::nn::Cloneable<LinearImpl>, public AdaptedLayer {
 public:
  /// As torch::nn::Linear(in, out).
  LinearImpl(int64_t in_features, int64_t out_features) : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  /// As torch::nn::Linear(options).
  explicit LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

  /// Parameters as torch::nn::Linear creates them; adapters again (for clone()).
  void reset() override {
    weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
    bias = options.bias() ? register_parameter("bias", torch::empty(options.out_features()))
                          : register_parameter("bias", {}, /*requires_grad=*/false);
    reset_parameters();
    slots_.recreate(*this);
  }

  /// torch::nn::Linear's initialisation (kaiming uniform, a = √5).
  void reset_parameters() {
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
    if (bias.defined()) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
      torch::nn::init::uniform_(bias, -bound, bound);
    }
  }

  /// x [..., in] -> [..., out]: x·Wᵀ + b, then the active adapters. In training
  /// mode with a merged adapter, backward throws ModelError (unmerge first).
  torch::Tensor forward(const torch::Tensor& x) {
    check_last_dim(x, options.in_features(), "peft::nn::Linear");
    return slots_.run(x, {weight, bias, false}, [&](const torch::Tensor& h) { return torch::nn::functional::linear(h, weight, bias); },
                      is_training(), "peft::nn::Linear");
  }

  /// Prints `peft::nn::Linear(in_features=.., out_features=.., bias=.., adapters=[..])`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::nn::Linear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", bias=" << (options.bias() ? "true" : "false");
    for (const auto& s : slots_.all()) stream << ", " << s.name << (s.merged ? " (merged)" : "");
    stream << ")";
  }

  detail::AdapterSlots& slots() override { return slots_; }
  void merge_adapter(const std::string& name) override { slots_.merge(name, weight, bias, false); }
  void unmerge_adapters() override { slots_.unmerge_all(weight, bias, false); }
  std::pair<int64_t, int64_t> features() const override { return {options.in_features(), options.out_features()}; }
  bool fan_in_fan_out() const override { return false; }
  torch::Tensor& weight_tensor() override { return weight; }
  torch::Tensor& bias_tensor() override { return bias; }

  torch::nn::LinearOptions options;  ///< As torch::nn::Linear's.
  torch::Tensor weight;              ///< [out, in]
  torch::Tensor bias;                ///< [out], undefined without bias

 private:
  detail::AdapterSlots slots_;
};

/// Holder of LinearImpl (see there).
TORCH_MODULE(Linear);

/// Hugging Face's Conv1D (GPT-2's projections) with adapter slots: `weight`
/// [in, out], `bias` [out], y = x·W + b; initialised as transformers does
/// (weight ~ N(0, 0.02²), bias 0).
class Conv1DImpl : public torch::nn::Cloneable<Conv1DImpl>, public AdaptedLayer {
 public:
  /// A Conv1D of `in_features` inputs and `out_features` outputs (transformers' Conv1D(nf=out, nx=in)).
  Conv1DImpl(int64_t in_features, int64_t out_features) : in_(in_features), out_(out_features) { reset(); }

  /// Parameters as transformers creates them; adapters again (for clone()).
  void reset() override {
    weight = register_parameter("weight", torch::empty({in_, out_}));
    bias = register_parameter("bias", torch::zeros({out_}));
    torch::NoGradGuard no_grad;
    torch::nn::init::normal_(weight, 0.0, 0.02);
    slots_.recreate(*this);
  }

  /// x [..., in] -> [..., out]: x·W + b, then the active adapters.
  torch::Tensor forward(const torch::Tensor& x) {
    check_last_dim(x, in_, "peft::nn::Conv1D");
    return slots_.run(x, {weight, bias, true}, [&](const torch::Tensor& h) { return torch::matmul(h, weight) + bias; },
                      is_training(), "peft::nn::Conv1D");
  }

  /// Prints `peft::nn::Conv1D(in_features=.., out_features=..)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::nn::Conv1D(in_features=" << in_ << ", out_features=" << out_;
    for (const auto& s : slots_.all()) stream << ", " << s.name << (s.merged ? " (merged)" : "");
    stream << ")";
  }

  detail::AdapterSlots& slots() override { return slots_; }
  void merge_adapter(const std::string& name) override { slots_.merge(name, weight, bias, true); }
  void unmerge_adapters() override { slots_.unmerge_all(weight, bias, true); }
  std::pair<int64_t, int64_t> features() const override { return {in_, out_}; }
  bool fan_in_fan_out() const override { return true; }
  torch::Tensor& weight_tensor() override { return weight; }
  torch::Tensor& bias_tensor() override { return bias; }

  torch::Tensor weight;  ///< [in, out]
  torch::Tensor bias;    ///< [out]

 private:
  int64_t in_, out_;
  detail::AdapterSlots slots_;
};

/// Holder of Conv1DImpl (see there).
TORCH_MODULE(Conv1D);

}  // namespace nn
}  // namespace peft
