// peft-inspect: reports which PEFT methods a TorchScript export supports, and
// why not where it does not (see docs/export-conventions.md).
//   peft-inspect model.pt
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

namespace {

/// Tries to inject `config`; prints the trainable count or the error.
void try_method(const torch::jit::Module& model, const std::string& name, const peft::PeftConfig& config) {
  try {
    peft::PeftModel adapted = peft::get_peft_model(model, config);
    fmt::print("  {:<8} yes  {}\n", name, peft::format_trainable_parameters(adapted.count_parameters()));
  } catch (const peft::Error& e) {
    fmt::print("  {:<8} no   {}\n", name, e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Which PEFT methods a TorchScript model supports"};
  std::string path;
  app.add_option("model", path, "a model saved with torch.jit.script/trace(...).save()")->required()->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  torch::jit::Module model = torch::jit::load(path);
  fmt::print("{}\n", path);
  try_method(model, "LoRA", peft::LoraConfig().target_modules("all-linear"));
  try_method(model, "DoRA", peft::LoraConfig().target_modules("all-linear").use_dora(true));
  try_method(model, "IA3", peft::IA3Config().target_modules("all-linear"));
  try_method(model, "BitFit", peft::BitFitConfig().norm(true));
  try_method(model, "prompt", peft::PromptTuningConfig().num_virtual_tokens(10));
  try_method(model, "prefix", peft::PrefixTuningConfig().num_virtual_tokens(10));
  fmt::print("  adapter  needs target_modules: the submodules after which to insert (e.g. \".*\\\\.(attn|mlp)\")\n");
  return 0;
}
