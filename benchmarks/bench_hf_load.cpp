// peft-bench-hf-load: the peak RSS and time of loading a Hugging Face folder, one way
// per process (peak RSS is per process), for benchmarks/hf_load.sh to run side by side:
//   mapped  peft::hf's loader: the parameters become views of the memory-mapped file
//   copied  the way it was before: the file read into memory, each tensor copied out,
//           then copied into the parameters
//   make DIR  writes a synthetic Llama folder (--hidden, --layers; fp32)
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>

#include <sys/resource.h>

#include <chrono>

#include "common/program.h"

namespace {

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;
}

/// The old loader: every tensor copied out of the file bytes, then into the parameters.
void load_copied(const std::filesystem::path& dir, torch::nn::Module& model) {
  auto tensors = peft::io::load_safetensors(dir / "model.safetensors").tensors;
  torch::NoGradGuard no_grad;
  auto params = model.named_parameters();
  for (auto& [name, t] : tensors) {
    std::string key = name;
    if (!params.contains(key)) key = (params.contains("bert." + name) ? "bert." : "model.") + name;
    if (params.contains(key)) params[key].copy_(t);
  }
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"Peak RSS of loading a Hugging Face folder"};
  std::string mode, dir;
  int64_t hidden = 1024, layers = 8;
  app.add_option("mode", mode, "mapped, copied or make")->required()->check(CLI::IsMember({"mapped", "copied", "make"}));
  app.add_option("dir", dir, "the model folder")->required();
  app.add_option("--hidden", hidden, "make: hidden size");
  app.add_option("--layers", layers, "make: decoder layers");
  CLI11_PARSE(app, argc, argv);
  if (mode == "make") {
    peft::hf::PretrainedConfig config;
    config.model_type = "llama";
    config.json = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"vocab_size", 32000},
                   {"hidden_size", hidden}, {"intermediate_size", hidden * 8 / 3}, {"num_hidden_layers", layers},
                   {"num_attention_heads", hidden / 64}, {"num_key_value_heads", hidden / 64}, {"torch_dtype", "float32"}};
    config.source = dir + "/config.json";
    peft::hf::CausalLM model = peft::hf::AutoModelForCausalLM::from_config(config);
    peft::hf::save_pretrained(*model, dir);
    fmt::print("wrote {} ({:.0f} MiB)\n", dir, std::filesystem::file_size(std::filesystem::path(dir) / "model.safetensors") / 1048576.0);
    return 0;
  }
  const auto start = std::chrono::steady_clock::now();
  const bool bert = peft::hf::AutoConfig::from_pretrained(dir).model_type == "bert";
  std::shared_ptr<torch::nn::Module> model;
  if (mode == "mapped") {
    model = bert ? peft::hf::AutoModel::from_pretrained(dir).ptr()
                 : std::static_pointer_cast<torch::nn::Module>(peft::hf::AutoModelForCausalLM::from_pretrained(dir).ptr());
  } else {
    const auto config = peft::hf::AutoConfig::from_pretrained(dir);
    model = bert ? peft::hf::BertModel(peft::hf::BertConfig::from(config), true).ptr()
                 : std::static_pointer_cast<torch::nn::Module>(peft::hf::AutoModelForCausalLM::from_config(config).ptr());
    load_copied(dir, *model);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  fmt::print("{} {}: {} parameters, file {:.0f} MiB, peak RSS {:.0f} MiB, {:.2f} s\n", mode, dir, params,
             std::filesystem::file_size(std::filesystem::path(dir) / "model.safetensors") / 1048576.0, peak_rss_mib(), seconds);
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-bench-hf-load", [&] { return run(argc, argv); });
}
