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
#include <peft/nn/slots.h>
#include <peft/quant/nf4.h>
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
  /// [out, in], or [in, out] with fan_in_fan_out; undefined in forward on an NF4 layer
  /// unless an active adapter's uses_base_weight() says it reads it.
  const torch::Tensor& weight;
  const torch::Tensor& bias;    ///< [out], or undefined
  bool fan_in_fan_out;          ///< weight stored [in, out] (GPT-2's Conv1D)
};

/// What a method attaches to a linear layer (one per method, in its folder): a
/// `torch::nn::Cloneable` module that also implements this interface. It is a
/// submodule of the layer, under the adapter's name, holding its own parameters.
class LinearAdapter : public SlotAdapter {
 public:
  /// The layer's input after this adapter (IA3 on feed-forward layers scales it); default: x.
  virtual torch::Tensor input(const torch::Tensor& x) { return x; }
  /// The layer's output y [..., out] for input x [..., in] after this adapter; default: y.
  virtual torch::Tensor output(const torch::Tensor& x, const torch::Tensor& y, const LinearBase& base) { return y; }
  /// Whether output() reads `base.weight` (else an NF4 layer does not dequantise it for the adapter).
  virtual bool uses_base_weight() const { return false; }
  /// Folds the adapter into `weight` / `bias` in place (no grad).
  virtual void merge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) = 0;
  /// Undoes merge() (up to rounding).
  virtual void unmerge(torch::Tensor& weight, torch::Tensor& bias, bool fan_in_fan_out) = 0;
};

/// What peft::nn::Linear and peft::nn::Conv1D share: the frozen `weight` and
/// `bias`, the adapter slots, merging, and QLoRA's NF4 weight (quantize()).
class AdaptedLayer : public AdapterHost {
 public:
  /// `fan_in_fan_out`: the weight is stored [in, out] (GPT-2's Conv1D).
  explicit AdaptedLayer(bool fan_in_fan_out) : fan_in_fan_out_(fan_in_fan_out) {}

  /// in_features, out_features.
  virtual std::pair<int64_t, int64_t> features() const = 0;
  /// Whether the weight is stored [in, out].
  bool fan_in_fan_out() const { return fan_in_fan_out_; }

  /// The weight forward uses: `weight`, or the NF4 one dequantised (in its compute dtype).
  torch::Tensor frozen_weight() const { return nf4_ && weight.numel() == 0 ? nf4::dequantize(*nf4_) : weight; }
  /// QLoRA: the NF4 state of the weight (nullopt when dense).
  const c10::optional<nf4::Quantized>& quantized() const { return nf4_; }

  /// QLoRA's frozen base (bitsandbytes' Linear4bit): the weight moves into NF4
  /// buffers (`weight_nf4`, `weight_absmax`, and with double quantisation
  /// `weight_nested_absmax`, `weight_nested_offset`) and `weight` is emptied
  /// (its dtype and device kept). OptionError for a bad config or a layer that is
  /// quantised already or holds adapters.
  void quantize(const NF4Config& config, const std::string& where) {
    check<OptionError>(!nf4_ && slots_.all().empty(), "{}: the layer is quantised already or holds adapters", where);
    config.validate(where);
    requantize_on_merge_ = config.requantize_on_merge();
    nf4_ = nf4::quantize(weight, config);
    register_nf4(*nf4_);
    io::release_mapped_pages(weight);  // a weight viewing a mapped checkpoint would keep its pages resident
    weight.set_data(torch::empty({0}, weight.options()));
  }

  /// Merges adapter `name` into the weight; QLoRA: into a dense copy in the
  /// weight's dtype (or, with requantize_on_merge, back into NF4: lossy, warns).
  void merge_adapter(const std::string& name) override {
    auto* s = slots_.find(name);
    if (!s || s->merged) return;
    torch::NoGradGuard no_grad;
    if (nf4_ && weight.numel() == 0) {
      nf4::Quantized fp32 = *nf4_;
      fp32.dtype = torch::kFloat;
      weight.set_data(nf4::dequantize(fp32).to(weight.scalar_type()));
    }
    s->as<LinearAdapter>().merge(weight, bias, fan_in_fan_out_);
    s->merged = true;
    if (nf4_ && requantize_on_merge_) requantize();
  }

  /// Unmerges every merged adapter, last added first; an NF4 weight is restored exactly.
  void unmerge_adapters() override {
    torch::NoGradGuard no_grad;
    if (nf4_) {
      if (requantized_) nf4::copy_values(*nf4_, before_merge_);
      requantized_ = false;
      weight.set_data(torch::empty({0}, weight.options()));
    }
    auto& all = slots_.all();
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->merged) {
        if (!nf4_) it->as<LinearAdapter>().unmerge(weight, bias, fan_in_fan_out_);
        it->merged = false;
      }
  }

  torch::Tensor weight;  ///< [out, in] ([in, out] with fan_in_fan_out); empty while quantised to NF4
  torch::Tensor bias;    ///< [out], undefined without bias

 protected:
  /// y = base(x) with the active, unmerged adapters; `product(h, W, b)` is the frozen layer's op.
  /// With a merged adapter in training mode, backward throws ModelError (unmerge first).
  template <typename Product>
  torch::Tensor run(const torch::Tensor& x, Product product, bool training, const char* layer) {
    const bool nf4 = nf4_ && weight.numel() == 0;
    const auto compute = nf4 ? nf4_->dtype : weight.scalar_type();
    const bool cast = compute != x.scalar_type();  // QLoRA with a compute dtype
    torch::Tensor h = x;
    bool base_weight_used = false;
    for (const auto& s : slots_.all())
      if (s.applies()) {
        h = detail::AdapterSlots::masked(s, s.as<LinearAdapter>().input(h), h);
        base_weight_used = base_weight_used || s.as<LinearAdapter>().uses_base_weight();
      }
    // An NF4 weight is dequantised for adapters that read it (DoRA); the frozen product keeps only its 4 bits.
    const torch::Tensor W = nf4 && !base_weight_used ? torch::Tensor() : frozen_weight();
    const torch::Tensor W_x = cast && W.defined() ? W.to(x.scalar_type()) : W;
    const LinearBase base{W_x, bias, fan_in_fan_out_};
    const torch::Tensor h_c = cast ? h.to(compute) : h, b_c = cast && bias.defined() ? bias.to(compute) : bias;
    torch::Tensor y = nf4 ? nf4::linear(h_c, *nf4_, b_c, fan_in_fan_out_) : product(h_c, weight, b_c);
    if (cast) y = y.to(x.scalar_type());
    for (const auto& s : slots_.all())
      if (s.applies()) y = detail::AdapterSlots::masked(s, s.as<LinearAdapter>().output(x, y, base), y);
    if (!slots_.any_merged() || !peft::detail::records_training(training)) return y;
    return peft::detail::fail_backward_merged(y, peft::detail::merged_layer_message(layer, "its adapter parameters"));
  }

  /// ", <adapter>[ (merged)]..., nf4)" for pretty_print.
  void print_adapters(std::ostream& stream) const {
    for (const auto& s : slots_.all()) stream << ", " << s.name << (s.merged ? " (merged)" : "");
    if (nf4_) stream << ", nf4";
    stream << ")";
  }

  /// A clone's reset(): the adapters and the NF4 buffers registered again (clone() then copies the values).
  void reset_adapters(torch::nn::Module& self) {
    slots_.recreate(self);
    if (nf4_) {
      nf4_ = nf4::deep_copy(*nf4_);
      register_nf4(*nf4_);
    }
  }

 private:
  void register_nf4(const nf4::Quantized& q) {
    auto& self = dynamic_cast<torch::nn::Module&>(*this);
    self.register_buffer("weight_nf4", q.packed);
    self.register_buffer("weight_absmax", q.absmax);
    if (q.double_quant()) {
      self.register_buffer("weight_nested_absmax", q.nested_absmax);
      self.register_buffer("weight_nested_offset", q.nested_offset);
    }
  }

  /// requantize_on_merge: the merged dense weight back into NF4 (the state before the first merge kept).
  void requantize() {
    if (!requantized_) before_merge_ = nf4::deep_copy(*nf4_);
    nf4::copy_values(*nf4_, nf4::quantize_like(weight, *nf4_));
    requantized_ = true;
    const double error = (nf4::dequantize(*nf4_).to(torch::kFloat) - weight.to(torch::kFloat)).abs().max().item<double>();
    weight.set_data(torch::empty({0}, weight.options()));
    warn("merging into an NF4 weight re-quantises it: max |error| {:.3g}", error);
  }

  bool fan_in_fan_out_;
  c10::optional<nf4::Quantized> nf4_;  // QLoRA: the weight in NF4
  bool requantize_on_merge_ = false;
  bool requantized_ = false;      // merged into NF4 (before_merge_ holds the state to restore)
  nf4::Quantized before_merge_;
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
  explicit LinearImpl(const torch::nn::LinearOptions& options_) : AdaptedLayer(false), options(options_) { reset(); }

  /// Parameters as torch::nn::Linear creates them; adapters again (for clone()).
  void reset() override {
    weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
    bias = options.bias() ? register_parameter("bias", torch::empty(options.out_features()))
                          : register_parameter("bias", {}, /*requires_grad=*/false);
    reset_parameters();
    reset_adapters(*this);
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
    return run(
        x, [](const torch::Tensor& h, const torch::Tensor& W, const torch::Tensor& b) { return torch::nn::functional::linear(h, W, b); },
        is_training(), "peft::nn::Linear");
  }

  /// Prints `peft::nn::Linear(in_features=.., out_features=.., bias=.., <adapters>)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::nn::Linear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", bias=" << (options.bias() ? "true" : "false");
    print_adapters(stream);
  }

  std::pair<int64_t, int64_t> features() const override { return {options.in_features(), options.out_features()}; }

  /// Makes `weight` the very tensor `shared` [out, in] (HF's tie_word_embeddings:
  /// lm_head.weight is embed_tokens.weight; one parameter, one gradient).
  void tie_weight(const torch::Tensor& shared) {
    check<ShapeError>(shared.sizes() == weight.sizes(), "peft::nn::Linear::tie_weight: expected [{}, {}], got {}",
                      options.out_features(), options.in_features(), shape_str(shared.sizes()));
    parameters_["weight"] = shared;
    weight = shared;
  }

  torch::nn::LinearOptions options;  ///< As torch::nn::Linear's.
};

/// Holder of LinearImpl (see there).
TORCH_MODULE(Linear);

/// Hugging Face's Conv1D (GPT-2's projections) with adapter slots: `weight`
/// [in, out], `bias` [out], y = x·W + b; initialised as transformers does
/// (weight ~ N(0, 0.02²), bias 0).
class Conv1DImpl : public torch::nn::Cloneable<Conv1DImpl>, public AdaptedLayer {
 public:
  /// A Conv1D of `in_features` inputs and `out_features` outputs (transformers' Conv1D(nf=out, nx=in)).
  Conv1DImpl(int64_t in_features, int64_t out_features) : AdaptedLayer(true), in_(in_features), out_(out_features) {
    reset();
  }

  /// Parameters as transformers creates them; adapters again (for clone()).
  void reset() override {
    weight = register_parameter("weight", torch::empty({in_, out_}));
    bias = register_parameter("bias", torch::zeros({out_}));
    {
      torch::NoGradGuard no_grad;
      torch::nn::init::normal_(weight, 0.0, 0.02);
    }
    reset_adapters(*this);
  }

  /// x [..., in] -> [..., out]: x·W + b, then the active adapters.
  torch::Tensor forward(const torch::Tensor& x) {
    check_last_dim(x, in_, "peft::nn::Conv1D");
    return run(
        x, [](const torch::Tensor& h, const torch::Tensor& W, const torch::Tensor& b) { return torch::matmul(h, W) + b; },
        is_training(), "peft::nn::Conv1D");
  }

  /// Prints `peft::nn::Conv1D(in_features=.., out_features=.., <adapters>)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "peft::nn::Conv1D(in_features=" << in_ << ", out_features=" << out_;
    print_adapters(stream);
  }

  std::pair<int64_t, int64_t> features() const override { return {in_, out_}; }

 private:
  int64_t in_, out_;
};

/// Holder of Conv1DImpl (see there).
TORCH_MODULE(Conv1D);

}  // namespace nn
}  // namespace peft
