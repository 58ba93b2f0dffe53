#pragma once
/// @file
/// IA3 inserted into a loaded TorchScript model: the output of each targeted
/// linear layer (or, for feed-forward layers, its input) is rescaled by a
/// learned vector held by a small TorchScript module.

#include <peft/core/match.h>
#include <peft/ia3/ia3.h>
#include <peft/jit/inject.h>
#include <peft/jit/site.h>
#include <peft/quant/inject.h>

namespace peft {

/// IA3 for a whole model, with HF peft's field names.
///
/// ```
/// auto cfg = peft::IA3Config().target_modules({"k_proj", "v_proj", "down_proj"}).feedforward_modules({"down_proj"});
/// ```
struct IA3Config {
  /// Linear layers whose output (or, for feedforward_modules, input) is scaled.
  TORCH_ARG(TargetModules, target_modules);
  /// Submodules never targeted, even when target_modules matches them.
  TORCH_ARG(TargetModules, exclude_modules);
  /// Targets whose input (not output) is scaled; must be a subset of target_modules.
  TORCH_ARG(TargetModules, feedforward_modules);
  /// Only layers with these indices (empty: all).
  TORCH_ARG(std::vector<int64_t>, layers_to_transform) = {};
  /// Name of the layer list whose index layers_to_transform means (e.g. "layers").
  TORCH_ARG(std::vector<std::string>, layers_pattern) = {};
  /// Weights stored [in, out]. Detected from the graph; kept for HF's config file.
  TORCH_ARG(bool, fan_in_fan_out) = false;
  /// Base submodules (e.g. a classifier head) that train fully, as copies.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};
  /// Start the scaling vectors at 1 (the base model); false: random around 1.
  TORCH_ARG(bool, init_ia3_weights) = true;

 public:  // TORCH_ARG leaves the section private
  /// The target selection these options describe.
  TargetRule rule() const { return {target_modules_, exclude_modules_, layers_to_transform_, layers_pattern_}; }
};

namespace ia3 {

/// TorchScript source of one IA3 layer (functional::ia3). With a per-sample
/// mask, masked-out samples keep their input exactly.
inline std::string layer_source(bool feedforward) {
  const std::string v = feedforward ? "x" : "y";
  return std::string(feedforward ? "def forward(self, x: Tensor) -> Tensor:\n"
                                 : "def forward(self, x: Tensor, y: Tensor) -> Tensor:\n") +
         "    if self.merged or not self.active:\n"
         "        return " + v + "\n"
         "    scaled = " + v + " * self.ia3_l\n"
         "    if self.use_sample_mask:\n"
         "        return torch.where(self.mask_like(scaled) > 0.5, scaled, " + v + ")\n"
         "    return scaled\n";
}

/// IA3 on the targeted linear layers of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const IA3Config& config) : model_(injection.model()) {
    injection.inline_all();
    for (const auto& [target, uses] : jit::select_linear_targets(injection.graph(), model_, injection.rule(config.rule()), "IA3Config")) {
      const bool ff = !config.feedforward_modules().empty() && config.feedforward_modules().matches(target);
      add(injection, target, uses, ff, config.init_ia3_weights());
    }
    injection.train_modules_to_save(config.modules_to_save());
  }

  std::string method() const override { return "IA3"; }
  bool mergeable() const override { return true; }
  void merge() override { scale_weights(/*merge=*/true); }

  void check_merge_is_finite() override {
    for (const auto& l : layers_) {
      torch::Tensor s = l.layer.module.attr("ia3_l").toTensor().detach();
      torch::Tensor W = jit::base_tensor(model_, l.layer.target, "weight");
      check<ModelError>(torch::isfinite(s).all().item<bool>() && torch::isfinite(W).all().item<bool>(),
                        "safe_merge: merging IA3 into '{}' gives NaN or infinite weights; nothing was merged",
                        l.layer.target);
    }
  }
  void unmerge() override { scale_weights(/*merge=*/false); }
  jit::CacheSupport cache_support() const override { return jit::CacheSupport::Merge; }

  /// HF stores ia3_l as (1, in) for feed-forward layers and (out, 1) otherwise.
  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    std::vector<io::StateEntry> out;
    for (const auto& l : layers) {
      torch::Tensor t = l.module.attr("ia3_l").toTensor();
      const bool ff = l.module.attr("feedforward").toBool();
      out.push_back({io::kKeyPrefix + l.target + ".ia3_l", ff ? t.detach().unsqueeze(0) : t.detach().unsqueeze(1),
                     [t](const torch::Tensor& v) mutable {
                       torch::NoGradGuard no_grad;
                       t.copy_(v.reshape({-1}));
                     }});
    }
    return out;
  }

 private:
  struct Layer {
    jit::AdapterLayer layer;
    bool feedforward;
    bool fan_in_fan_out;
  };

  void add(jit::Injection& injection, const std::string& target, const std::vector<jit::LinearSite>& uses, bool ff,
           bool neutral) {
    const jit::LinearSite& site = uses.front();
    torch::Tensor W = jit::base_tensor(model_, target, "weight");
    torch::Tensor l = torch::ones({ff ? site.in_features : site.out_features}, W.options());
    if (!neutral) l = l + 0.02 * torch::randn_like(l);
    injection.add_layer(target, "IA3Layer", {{"ia3_l", l}}, {{"feedforward", ff}}, layer_source(ff));
    const jit::AdapterLayer& layer = injection.layers().back();
    for (const auto& use : uses) {
      if (ff) {
        jit::Value* scaled = injection.call(layer, use.first, {use.input}, /*after=*/false);
        use.first->replaceInputWith(use.input, scaled);
      } else {
        jit::Value* scaled = injection.call(layer, use.output->node(), {use.input, use.output}, /*after=*/true);
        jit::reroute_uses(use.output, scaled->node(), scaled);
      }
    }
    layers_.push_back({layer, ff, site.fan_in_fan_out});
  }

  /// Folds l into (or divides it out of) the weight: output scaling scales the
  /// weight's output dimension and the bias, input scaling its input dimension.
  void scale_weights(bool merge) {
    torch::NoGradGuard no_grad;
    for (auto& l : layers_) {
      if (l.layer.module.attr("merged").toBool() == merge) continue;
      check<ModelError>(!nf4::weight_module(model_, l.layer.target),
                        "IA3 cannot be merged into '{}': its weight is NF4-quantised (merge LoRA instead, or keep the "
                        "adapter unmerged)", l.layer.target);
      torch::Tensor s = l.layer.module.attr("ia3_l").toTensor().detach();
      torch::Tensor W = jit::writable_base_tensor(model_, l.layer.target, "weight", "IA3");
      const bool rows = l.feedforward == l.fan_in_fan_out;  // which dim of W the vector runs along
      torch::Tensor shaped = rows ? s.unsqueeze(1) : s.unsqueeze(0);
      merge ? W.mul_(shaped) : W.div_(shaped);
      auto owner = jit::submodule(model_, l.layer.target);
      if (!l.feedforward && owner.hasattr("bias") && owner.attr("bias").isTensor()) {
        torch::Tensor b = owner.attr("bias").toTensor();
        merge ? b.mul_(s) : b.div_(s);
      }
      jit::set_flag(l.layer, "merged", merge);
    }
  }

  torch::jit::Module model_;
  std::vector<Layer> layers_;
};

}  // namespace ia3
}  // namespace peft
