#pragma once
/// @file
/// VeRA inserted into a loaded TorchScript model: after every application of a
/// targeted linear layer, `y = y + λ_b ⊙ B·(λ_d ⊙ A·dropout(x))` computed by a
/// small TorchScript module (vera::delta), with the shared projections held,
/// as one tensor each, by every layer of the adapter.

#include <peft/jit/inject.h>
#include <peft/jit/site.h>
#include <peft/quant/inject.h>
#include <peft/vera/config.h>
#include <peft/vera/functional.h>

namespace peft {
namespace vera {

/// TorchScript source of one VeRA layer; it computes what vera::delta computes
/// (the tests compare the two).
inline std::string layer_source() {
  return "def forward(self, x: Tensor, y: Tensor) -> Tensor:\n"
         "    if self.merged or not self.active:\n"
         "        return y\n"
         "    h = torch.dropout(x.to(self.vera_lambda_d.dtype), self.vera_dropout, self.training)\n"
         "    a = self.vera_A.narrow(1, 0, self.in_features)\n"
         "    b = self.vera_B.narrow(0, 0, self.out_features)\n"
         "    branch = self.vera_lambda_b * torch.linear(self.vera_lambda_d * torch.linear(h, a), b)\n"
         "    if self.use_sample_mask:\n"
         "        branch = branch * self.mask_like(branch)\n"
         "    return y + branch.to(y.dtype)\n";
}

/// VeRA on the targeted linear layers of an Injection.
class Tuner : public jit::Tuner {
 public:
  Tuner(jit::Injection& injection, const VeraConfig& config)
      : model_(injection.model()), save_projection_(config.save_projection()) {
    check<OptionError>(config.r() >= 1, "VeraConfig.r must be >= 1, got {}", config.r());
    injection.inline_all();
    const auto targets = jit::select_linear_targets(injection.graph(), model_, injection.rule(config.rule()), "VeraConfig");
    int64_t max_in = 0, max_out = 0;
    for (const auto& entry : targets) {
      max_in = std::max(max_in, entry.second.front().in_features);
      max_out = std::max(max_out, entry.second.front().out_features);
    }
    const auto like = (*model_.parameters().begin()).options();
    const Projections projections = init_projections(max_in, max_out, config.r(), config.projection_prng_key(), like);
    for (const auto& [target, uses] : targets) add(injection, config, projections, target, uses);
    if (config.bias() != VeraBias::None) injection.train_biases(/*only_adapted=*/config.bias() == VeraBias::VeraOnly);
    injection.train_modules_to_save(config.modules_to_save());
  }

  std::string method() const override { return "VeRA"; }
  bool mergeable() const override { return true; }
  jit::CacheSupport cache_support() const override { return jit::CacheSupport::Merge; }

  void merge() override { fold(/*merge=*/true); }
  void unmerge() override { fold(/*merge=*/false); }
  void check_merge_is_finite() override {
    torch::NoGradGuard no_grad;
    for (const auto& l : layers_)
      check<ModelError>(torch::isfinite(weight(l) + delta_weight_of(l)).all().item<bool>(),
                        "safe_merge: merging VeRA into '{}' gives NaN or infinite weights; nothing was merged",
                        l.layer.target);
  }

  /// HF's keys: λ_b, λ_d per layer; the projections once, as `base_model.vera_A` / `vera_B` (save_projection).
  std::vector<io::StateEntry> state(const std::vector<jit::AdapterLayer>& layers) const override {
    std::vector<io::StateEntry> out;
    for (const auto& l : layers) {
      out.push_back(jit::attr_entry(l, "vera_lambda_b", "vera_lambda_b"));
      out.push_back(jit::attr_entry(l, "vera_lambda_d", "vera_lambda_d"));
    }
    if (save_projection_ && !layers.empty()) {  // every layer holds the same two tensors
      out.push_back(io::plain_entry("base_model.vera_A", layers.front().module.attr("vera_A").toTensor()));
      out.push_back(io::plain_entry("base_model.vera_B", layers.front().module.attr("vera_B").toTensor()));
    }
    return out;
  }

 private:
  struct Layer {
    jit::AdapterLayer layer;
    bool fan_in_fan_out;
  };

  void add(jit::Injection& injection, const VeraConfig& config, const Projections& projections,
           const std::string& target, const std::vector<jit::LinearSite>& uses) {
    const jit::LinearSite& site = uses.front();
    const auto like = projections.A.options();
    torch::Tensor lambda_b = config.init_weights() ? torch::zeros({site.out_features}, like)
                                                   : torch::ones({site.out_features}, like);
    torch::Tensor lambda_d = config.init_weights() ? torch::full({config.r()}, config.d_initial(), like)
                                                   : torch::randn({config.r()}, like);
    injection.add_layer(target, "VeraLayer", {{"vera_lambda_b", lambda_b}, {"vera_lambda_d", lambda_d}},
                        {{"vera_A", projections.A},
                         {"vera_B", projections.B},
                         {"in_features", site.in_features},
                         {"out_features", site.out_features},
                         {"vera_dropout", config.vera_dropout()}},
                        layer_source());
    const jit::AdapterLayer& layer = injection.layers().back();
    for (const auto& use : uses) {
      jit::Value* adapted = injection.call(layer, use.output->node(), {use.input, use.output}, /*after=*/true);
      jit::reroute_uses(use.output, adapted->node(), adapted);
    }
    layers_.push_back({layer, site.fan_in_fan_out});
  }

  torch::Tensor weight(const Layer& l) const {
    check<ModelError>(!nf4::weight_module(model_, l.layer.target),
                      "VeRA cannot be merged into '{}': its weight is NF4-quantised (keep the adapter unmerged)",
                      l.layer.target);
    return jit::writable_base_tensor(model_, l.layer.target, "weight", "VeRA");
  }

  torch::Tensor delta_weight_of(const Layer& l) const {
    const auto& m = l.layer.module;
    const torch::Tensor A = slice_A(m.attr("vera_A").toTensor(), m.attr("in_features").toInt());
    const torch::Tensor B = slice_B(m.attr("vera_B").toTensor(), m.attr("out_features").toInt());
    return delta_weight(A, B, m.attr("vera_lambda_d").toTensor().detach(), m.attr("vera_lambda_b").toTensor().detach(),
                        l.fan_in_fan_out);
  }

  /// W ± ΔW for every layer not yet in that state.
  void fold(bool merge) {
    torch::NoGradGuard no_grad;
    for (const auto& l : layers_) {
      if (l.layer.module.attr("merged").toBool() == merge) continue;
      torch::Tensor W = weight(l);
      const torch::Tensor delta = delta_weight_of(l).to(W.dtype());
      merge ? W.add_(delta) : W.sub_(delta);
      jit::set_flag(l.layer, "merged", merge);
    }
  }

  torch::jit::Module model_;
  bool save_projection_;
  std::vector<Layer> layers_;
};

}  // namespace vera
}  // namespace peft
