#pragma once
/// @file
/// LoRA (and DoRA) inserted into a loaded TorchScript model: after every
/// application of a targeted linear layer, `y = y + s·B·A·dropout(x)` computed
/// by a small TorchScript module, so the saved model still loads in plain PyTorch.

#include <peft/jit/inject.h>
#include <peft/jit/site.h>
#include <peft/lora/config.h>
#include <peft/lora/functional.h>
#include <peft/lora/module.h>
#include <peft/quant/inject.h>

#include <fmt/format.h>

namespace peft {
namespace lora {

/// TorchScript source of one LoRA layer. It computes what
/// peft::functional::lora_branch / dora compute (tests compare the two).
inline std::string layer_source(const LoraOptions& o, bool fan_in_fan_out) {
  std::string body;  // sets `out`, the update added to y
  const auto& slices = o.enable_slices();
  const std::string branch_of_h = "torch.matmul(torch.matmul(h, self.lora_A.t()), self.lora_B.t())";
  if (slices.empty()) {
    body = "    branch = " + branch_of_h + " * self.scaling\n";
  } else {
    const auto k = std::count(slices.begin(), slices.end(), true);
    std::string parts;
    int64_t next = 0;
    for (bool on : slices) {
      parts += parts.empty() ? "" : ", ";
      parts += on ? fmt::format("torch.matmul(a[{0}], b[{0}].t())", next++) : "torch.zeros_like(p0)";
    }
    body = fmt::format(
        "    a = torch.matmul(h, self.lora_A.t()).chunk({0}, -1)\n"
        "    b = self.lora_B.chunk({0}, 0)\n"
        "    p0 = torch.matmul(a[0], b[0].t())\n"
        "    branch = torch.cat([{1}], -1) * self.scaling\n",
        k, parts);
  }
  std::string signature = "def forward(self, x: Tensor, y: Tensor) -> Tensor:\n";
  if (o.use_dora()) {
    // DoRA, as functional::dora: (m/‖W+sBA‖ − 1)·(xWᵀ) + m/‖W+sBA‖ · s·BA·h, norm detached.
    signature = "def forward(self, x: Tensor, y: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:\n";
    body += fmt::format("    w = weight{}\n", fan_in_fan_out ? ".t()" : "") +
            "    norm = (w + torch.matmul(self.lora_B, self.lora_A) * self.scaling).norm(2, [1]).detach()\n"
            "    scale = self.lora_magnitude_vector / norm\n"
            "    base = y\n"
            "    if self.training and self.lora_dropout > 0.0:\n"
            "        base = torch.matmul(h, w.t())\n"
            "    elif bias is not None:\n"
            "        base = y - bias\n"
            "    branch = (scale - 1) * base + scale * branch\n";
  }
  return signature +
         "    if self.merged or not self.active:\n"
         "        return y\n"
         "    h = torch.dropout(x.to(self.lora_A.dtype), self.lora_dropout, self.training)\n" +
         body +
         "    if self.use_sample_mask:\n"
         "        branch = branch * self.mask_like(branch)\n"
         "    return y + branch.to(y.dtype)\n";
}

/// One injected LoRA layer and what merging needs.
struct Layer {
  jit::AdapterLayer layer;
  LoraOptions options;
  bool fan_in_fan_out;
  torch::Tensor dora_scale;  // m/‖W + ΔW‖ at merge time, shaped like the weight
  c10::optional<torch::jit::Module> nf4;  // QLoRA: the base weight's NF4 module
  nf4::Quantized before_merge;            // QLoRA, re-quantising merge: the state to restore
  bool requantize_on_merge = false;
};

/// LoRA on the targeted linear layers of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const LoraConfig& config) : model_(injection.model()) {
    injection.inline_all();
    const auto targets = jit::select_linear_targets(injection.graph(), model_, injection.rule(config.rule()), "LoraConfig");
    check_pattern_keys(config, targets, injection.from_file());
    for (const auto& [target, uses] : targets) add(injection, config, target, uses);
    if (!orientation_mismatch_.empty())  // HF peft warns and corrects the same way
      warn("LoraConfig.fan_in_fan_out={} does not fit {}; using the layout the graph shows", config.fan_in_fan_out(),
           join_names(orientation_mismatch_, 4));
    if (config.bias() != LoraBias::None) injection.train_biases(/*only_adapted=*/config.bias() == LoraBias::LoraOnly);
    injection.train_modules_to_save(config.modules_to_save(), config.ensure_weight_tying());
  }

  std::string method() const override { return "LoRA"; }
  bool mergeable() const override { return true; }
  const std::vector<Layer>& layers() const { return layers_; }

  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    std::vector<io::StateEntry> out;
    for (const auto& l : layers) {
      out.push_back(jit::attr_entry(l, "lora_A.weight", "lora_A"));
      out.push_back(jit::attr_entry(l, "lora_B.weight", "lora_B"));
      if (l.module.hasattr("lora_magnitude_vector"))
        out.push_back(jit::attr_entry(l, "lora_magnitude_vector", "lora_magnitude_vector"));
    }
    return out;
  }

  /// Merged for cached generation, unless a base weight is NF4 (QLoRA re-runs forward).
  jit::CacheSupport cache_support() const override {
    const bool quantized = std::any_of(layers_.begin(), layers_.end(), [](const Layer& l) { return l.nf4.has_value(); });
    return quantized ? jit::CacheSupport::None : jit::CacheSupport::Merge;
  }

  void merge() override {
    torch::NoGradGuard no_grad;
    for (auto& l : layers_) {
      if (l.layer.module.attr("merged").toBool()) continue;
      if (l.nf4) {
        merge_quantized(l);
      } else {
        torch::Tensor W = weight(l);
        W.copy_(merged_weight(l, W));
      }
      jit::set_flag(l.layer, "merged", true);
    }
  }

  void check_merge_is_finite() override {
    torch::NoGradGuard no_grad;
    for (const auto& l : layers_) {
      if (l.layer.module.attr("merged").toBool()) continue;
      Layer scratch = l;  // merged_weight() records DoRA's scale on it
      torch::Tensor W = l.nf4 ? nf4::current_weight(*l.nf4, torch::kFloat) : weight(l);
      check<ModelError>(torch::isfinite(merged_weight(scratch, W)).all().item<bool>(),
                        "safe_merge: merging LoRA into '{}' gives NaN or infinite weights; nothing was merged",
                        l.layer.target);
    }
  }

  /// Undoes merge() in reverse order (re-quantised NF4 weights are restored exactly).
  void unmerge() override {
    torch::NoGradGuard no_grad;
    for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) {
      Layer& l = *it;
      if (!l.layer.module.attr("merged").toBool()) continue;
      if (l.nf4 && l.requantize_on_merge) {
        nf4::overwrite(*l.nf4, l.before_merge);
      } else if (l.nf4) {
        nf4::set_dense(*l.nf4, torch::Tensor());
      } else {
        torch::Tensor W = weight(l);
        W.copy_(functional::unmerged_weight(W, factor(l, "lora_A"), factor(l, "lora_B"), l.dora_scale, func(l)));
      }
      jit::set_flag(l.layer, "merged", false);
    }
  }

 private:
  void add(jit::Injection& injection, const LoraConfig& config, const std::string& target,
           const std::vector<jit::LinearSite>& uses) {
    const jit::LinearSite& site = uses.front();
    LoraOptions options = config.options_for(target);
    options.validate(site.in_features, site.out_features, "LoraConfig target '" + target + "'",
                     /*warn_rank=*/!injection.from_file());
    if (config.fan_in_fan_out() != site.fan_in_fan_out) orientation_mismatch_.push_back(target);
    auto [A, B, magnitude] = initial_factors(target, site, options);
    std::vector<std::pair<std::string, torch::Tensor>> params{{"lora_A", A}, {"lora_B", B}};
    if (options.use_dora()) params.emplace_back("lora_magnitude_vector", magnitude);
    auto module = injection.add_layer(target, "LoraLayer", params,
                                      {{"scaling", options.scaling()}, {"lora_dropout", options.lora_dropout()}},
                                      layer_source(options, site.fan_in_fan_out));
    const jit::AdapterLayer& layer = injection.layers().back();
    for (const auto& use : uses) {
      std::vector<jit::Value*> args{use.input, use.output};
      if (options.use_dora()) {
        args.push_back(use.weight);
        args.push_back(use.bias ? use.bias : injection.none());
      }
      jit::Value* adapted = injection.call(layer, use.output->node(), args, /*after=*/true);
      jit::reroute_uses(use.output, adapted->node(), adapted);
    }
    layers_.push_back({layer, options, site.fan_in_fan_out, {}, nf4::weight_module(model_, target), {},
                       config.quantize_base() && config.quantize_base()->requantize_on_merge()});
  }

  /// Every rank_pattern / alpha_pattern / slice_pattern key must select a targeted
  /// module (report_unmatched: an error for a config built in code, a warning for a file).
  static void check_pattern_keys(const LoraConfig& config, const std::map<std::string, std::vector<jit::LinearSite>>& targets,
                                 bool from_file) {
    std::vector<std::string> names;
    for (const auto& entry : targets) names.push_back(entry.first);
    report_unmatched(unmatched_keys(config.rank_pattern(), names), from_file, "LoraConfig.rank_pattern", names);
    report_unmatched(unmatched_keys(config.alpha_pattern(), names), from_file, "LoraConfig.alpha_pattern", names);
    report_unmatched(unmatched_keys(config.slice_pattern(), names), from_file, "LoraConfig.slice_pattern", names);
  }

  /// W + ΔW (DoRA: (W + ΔW)·m/‖W + ΔW‖, remembering the scale to unmerge).
  torch::Tensor merged_weight(Layer& l, const torch::Tensor& W) {
    const torch::Tensor A = factor(l, "lora_A"), B = factor(l, "lora_B");
    if (l.options.use_dora())
      l.dora_scale = functional::dora_weight_scale(W, A, B, factor(l, "lora_magnitude_vector"), func(l));
    return functional::merged_weight(W, A, B, l.dora_scale, func(l));
  }

  /// QLoRA: the merged weight dense in the compute dtype, or re-quantised to NF4 (lossy).
  void merge_quantized(Layer& l) {
    const nf4::Quantized q = nf4::state(*l.nf4);
    torch::Tensor merged = merged_weight(l, nf4::current_weight(*l.nf4, torch::kFloat));
    if (!l.requantize_on_merge) {
      nf4::set_dense(*l.nf4, merged.to(q.dtype));
      return;
    }
    l.before_merge = nf4::deep_copy(q);
    nf4::overwrite(*l.nf4, nf4::quantize_like(merged, q));
    const double error = (nf4::current_weight(*l.nf4, torch::kFloat) - merged).abs().max().item<double>();
    warn("merging LoRA into the NF4 weight of {} re-quantises it: max |error| {:.3g}", l.layer.target, error);
  }

  /// A, B (and DoRA's magnitude) on the weight's device and dtype; PiSSA rewrites the base weight.
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> initial_factors(const std::string& target,
                                                                         const jit::LinearSite& site,
                                                                         const LoraOptions& options) {
    torch::NoGradGuard no_grad;
    const auto quantized = nf4::weight_module(model_, target);
    check<OptionError>(!quantized || options.init_lora_weights() != LoraInit::PiSSA,
                       "LoraConfig target '{}': LoraInit::PiSSA rewrites the base weight, which is NF4-quantised", target);
    torch::Tensor W = quantized ? nf4::current_weight(*quantized, nf4::source_dtype(*quantized))
                                : jit::base_tensor(model_, target, "weight");
    torch::Tensor A, B, residual;
    std::tie(A, B, residual) =
        peft::detail::initial_factors(options, site.in_features, site.out_features, site.fan_in_fan_out ? W.t() : W);
    if (residual.defined()) W.copy_(site.fan_in_fan_out ? residual.t() : residual);
    // The magnitude starts at the norm the layer computes, with the same ops on the
    // stored weight, so a fresh DoRA layer reproduces the base bit for bit.
    torch::Tensor magnitude;
    if (options.use_dora())
      magnitude = functional::dora_weight_norm(
          W, A, B, functional::LoraFuncOptions().scaling(options.scaling()).fan_in_fan_out(site.fan_in_fan_out));
    return {A, B, magnitude};
  }

  functional::LoraFuncOptions func(const Layer& l) const {
    return functional::LoraFuncOptions()
        .scaling(l.options.scaling())
        .fan_in_fan_out(l.fan_in_fan_out)
        .enable_slices(l.options.enable_slices());
  }
  torch::Tensor factor(const Layer& l, const char* name) const { return l.layer.module.attr(name).toTensor().detach(); }
  torch::Tensor weight(const Layer& l) const { return jit::writable_base_tensor(model_, l.layer.target, "weight", "LoRA"); }
  torch::Tensor delta_weight(const Layer& l) const {
    return functional::lora_delta_weight(factor(l, "lora_A"), factor(l, "lora_B"), func(l));
  }

  torch::jit::Module model_;
  std::vector<Layer> layers_;
  std::vector<std::string> orientation_mismatch_;
};

}  // namespace lora
}  // namespace peft
