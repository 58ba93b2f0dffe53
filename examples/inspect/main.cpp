// peft-inspect: the module tree of a TorchScript export, with each linear
// layer's shape and the methods that can attach where, then which PEFT methods
// the model supports as a whole, and why not where it does not
// (see docs/export-conventions.md).
//   peft-inspect model.pt
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

#include <map>
#include <set>

#include "common/program.h"

namespace {

/// The class name of a TorchScript module ("Linear", "Conv1D", ...).
std::string class_name(const torch::jit::Module& m) {
  const auto type = m.type()->name();
  return type ? type->name() : "?";
}

/// "weight [192, 64], bias [192]": the module's own tensors.
std::string own_tensors(const torch::jit::Module& m) {
  std::string out;
  for (const auto& a : m.named_attributes(/*recurse=*/false))
    if (a.value.isTensor() && a.value.toTensor().defined())
      out += fmt::format("{}{} {}", out.empty() ? "" : ", ", a.name, peft::shape_str(a.value.toTensor().sizes()));
  return out;
}

/// What attaches at a linear layer: the methods, and why "all-linear" leaves it out.
std::string linear_note(const std::vector<peft::jit::LinearSite>& uses) {
  const auto& s = uses.front();
  return fmt::format("linear {} -> {}{}  [LoRA, DoRA, IA3{}]{}", s.in_features, s.out_features,
                     s.fan_in_fan_out ? " (weight [in, out]: fan_in_fan_out)" : "", s.bias ? ", BitFit" : "",
                     peft::jit::is_output_head(s.module, uses) ? "  output head: not in \"all-linear\"" : "");
}

/// The linear layers of the forward graph, found once: each layer's note, and
/// the modules holding them (where bottleneck adapters usually go). Empty, with
/// the reason, when the graph cannot be read (a frozen export).
struct LinearLayers {
  std::map<std::string, std::string> notes;  // the sites point into the graph: turned into text while it lives
  std::vector<std::string> parents;
  std::string unknown_because;
};

LinearLayers linear_layers(const torch::jit::Module& model) {
  LinearLayers out;
  std::set<std::string> parents;
  try {
    auto graph = peft::jit::inlined_copy(*peft::jit::method_graph(model, "forward"));
    for (const auto& [module, uses] : peft::jit::sites_by_module(peft::jit::find_linear_sites(*graph, model))) {
      out.notes[module] = linear_note(uses);
      if (auto dot = module.rfind('.'); dot != std::string::npos) parents.insert(module.substr(0, dot));
    }
  } catch (const peft::Error& e) {
    out.unknown_because = e.what();
  }
  out.parents.assign(parents.begin(), parents.end());
  return out;
}

/// Prints every module, indented by depth, with what can attach to it.
void print_tree(const torch::jit::Module& model, const LinearLayers& linear) {
  if (!linear.unknown_because.empty()) fmt::print("  (linear layers unknown: {})\n", linear.unknown_because);
  fmt::print("modules (name, class, tensors; [methods that attach there]):\n");
  auto depth_of = [](const std::string& name) {
    return name.empty() ? size_t{0} : static_cast<size_t>(std::count(name.begin(), name.end(), '.')) + 1;
  };
  size_t width = 0;  // the name column fits the deepest, longest name
  for (const auto& m : model.named_modules()) width = std::max(width, 2 * depth_of(m.name) + m.name.size() + 2);
  for (const auto& m : model.named_modules()) {
    const std::string name = m.name.empty() ? "(root)" : m.name;
    const size_t depth = depth_of(m.name);
    const auto it = linear.notes.find(m.name);
    std::string note = it != linear.notes.end() ? it->second : own_tensors(m.value);
    if (it == linear.notes.end() && m.value.hasattr("bias") && m.value.attr("bias").isTensor()) note += "  [BitFit]";
    fmt::print("  {}{:<{}} {:<14} {}\n", std::string(2 * depth, ' '), name, width - 2 * depth, class_name(m.value), note);
  }
}

/// The trainable count `config` gives, or the error it raises. Warnings of the
/// probe (e.g. on fan_in_fan_out) are the probe's, not the user's: dropped.
std::pair<bool, std::string> probe(const torch::jit::Module& model, const peft::PeftConfig& config) {
  const peft::CapturedWarnings quiet;
  try {
    peft::PeftModel adapted = peft::get_peft_model(model, config);
    return {true, peft::format_trainable_parameters(adapted.count_parameters())};
  } catch (const peft::Error& e) {
    return {false, e.what()};
  }
}

/// Prints whether `config` (described as `name`) attaches, and its count or error.
void try_method(const torch::jit::Module& model, const std::string& name, const peft::PeftConfig& config) {
  const auto [ok, text] = probe(model, config);
  fmt::print("  {:<12} {:<4} {}\n", name, ok ? "yes" : "no", text);
}

/// Bottleneck adapters go after a submodule whose output width is known; probes
/// each module holding linear layers and prints where they attach, and why not.
void try_adapters(const torch::jit::Module& model, const std::vector<std::string>& candidates) {
  std::vector<std::string> fit;
  std::string refused;
  for (const auto& module : candidates) {
    const auto [ok, text] = probe(model, peft::BottleneckConfig().target_modules(std::vector<std::string>{module}));
    if (ok) fit.push_back(module);
    if (!ok && refused.empty()) refused = text;
  }
  if (fit.empty()) {
    fmt::print("  {:<12} no   {}\n", "adapter", refused.empty() ? "no submodule holds a linear layer" : refused);
    return;
  }
  try_method(model, "adapter", peft::BottleneckConfig().target_modules(fit));
  fmt::print("  {:<12}      after {} of the modules holding linear layers, e.g. '{}'{}\n", "", fit.size(), fit.front(),
             refused.empty() ? "" : "; not after others: " + refused);
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"The module tree of a TorchScript model and the PEFT methods it supports"};
  std::string path;
  app.add_option("model", path, "a model saved with torch.jit.script/trace(...).save()")->required()->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  torch::jit::Module model;
  try {
    model = torch::jit::load(path);
  } catch (const c10::Error& e) {
    throw peft::FileError(fmt::format("'{}' is not a TorchScript model (save one with torch.jit.script(m).save(path)): {}",
                                      path, e.what_without_backtrace()));
  }
  int64_t parameters = 0;
  for (const auto& p : model.parameters()) parameters += p.numel();
  fmt::print("{}: {} parameters\n", path, peft::with_thousands(parameters));
  const LinearLayers linear = linear_layers(model);
  print_tree(model, linear);
  fmt::print("methods (LoRA, DoRA, IA3: target_modules \"all-linear\"; BitFit+norm: norm(true); 10 virtual tokens):\n");
  try_method(model, "LoRA", peft::LoraConfig().target_modules("all-linear"));
  try_method(model, "DoRA", peft::LoraConfig().target_modules("all-linear").use_dora(true));
  try_method(model, "IA3", peft::IA3Config().target_modules("all-linear"));
  try_method(model, "BitFit", peft::BitFitConfig());
  try_method(model, "BitFit+norm", peft::BitFitConfig().norm(true));
  try_method(model, "prompt", peft::PromptTuningConfig().num_virtual_tokens(10));
  try_method(model, "prefix", peft::PrefixTuningConfig().num_virtual_tokens(10));
  try_adapters(model, linear.parents);
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-inspect", [&] { return run(argc, argv); });
}
