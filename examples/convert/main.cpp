// peft-convert: adapter files into other programs' formats.
//   peft-convert gguf ADAPTER_DIR OUT.gguf [--base MODEL_DIR] [--outtype f32|f16]
// writes a LoRA adapter folder (HF peft's layout) as a GGUF LoRA adapter for
// llama.cpp (`llama-cli -m model.gguf --lora OUT.gguf`); see docs/serving.md.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <peft/peft.h>


#include "common/program.h"

int run(int argc, char** argv) {
  CLI::App app{"Convert adapter files to other programs' formats"};
  app.require_subcommand(1);
  CLI::App* gguf = app.add_subcommand("gguf", "A LoRA adapter folder as a GGUF LoRA adapter for llama.cpp (--lora)");
  std::string adapter, out, base, outtype = "f32";
  gguf->add_option("adapter", adapter, "the adapter folder (adapter_config.json, adapter_model.safetensors)")->required();
  gguf->add_option("out", out, "the GGUF file to write")->required();
  gguf->add_option("--base", base,
                   "the base model's folder, for its config.json (needed unless adapter_config.json's "
                   "base_model_name_or_path is such a local folder)");
  gguf->add_option("--outtype", outtype, "tensor type of the factors (llama.cpp's convert_lora_to_gguf.py: f32 by default)")
      ->check(CLI::IsMember({"f32", "f16"}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const peft::io::GgufFile file = peft::lora::export_gguf(
      adapter, out,
      peft::lora::GgufExportOptions().base_model_dir(base).outtype(outtype == "f16" ? peft::lora::GgufOutType::F16
                                                                                   : peft::lora::GgufOutType::F32));
  fmt::print("wrote {}: {} LoRA adapter, {} weights adapted ({} tensors, {}), adapter.lora.alpha {}\n", out,
             file.get_string("general.architecture"), file.tensors.size() / 2, file.tensors.size(), outtype,
             file.get<float>("adapter.lora.alpha"));
  return 0;
}

int main(int argc, char** argv) {
  return peft_examples::run_program("peft-convert", [&] { return run(argc, argv); });
}
