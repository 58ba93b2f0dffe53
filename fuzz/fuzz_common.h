// Shared by the libFuzzer targets: the seed corpus (valid files the library
// writes, truncated and bit-flipped variants), written by LLVMFuzzerInitialize
// into $PEFT_FUZZ_SEEDS when that folder is empty.
#pragma once
#include <peft/peft.h>
#include <torch/script.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace peft_fuzz {

/// A small LoRA adapter of the LLaMA fixture, saved by the library: {config JSON, safetensors bytes}.
inline std::pair<std::string, std::string> valid_adapter() {
  torch::jit::Module base = torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/llama_scripted.pt");
  peft::PeftModel model = peft::get_peft_model(base, peft::LoraConfig().r(2).target_modules({"q_proj", "v_proj"}));
  const auto dir = std::filesystem::temp_directory_path() / "peft_fuzz_valid";
  model.save_pretrained(dir);
  return {peft::io::read_file(dir / "adapter_config.json"), peft::io::read_file(dir / "adapter_model.safetensors")};
}

/// `good`, its truncations and single-bit flips spread over it.
inline std::vector<std::string> variants(const std::string& good) {
  std::vector<std::string> out{good};
  for (size_t cut : {size_t{0}, size_t{4}, size_t{8}, good.size() / 3, good.size() / 2, good.size() - 1})
    if (cut < good.size()) out.push_back(good.substr(0, cut));
  for (size_t i = 0; i < 16 && !good.empty(); ++i) {
    std::string flipped = good;
    const size_t at = (i * 7919 + 13) % good.size();
    flipped[at] = static_cast<char>(flipped[at] ^ (1 << (i % 8)));
    out.push_back(flipped);
  }
  return out;
}

/// Writes `seeds` into $PEFT_FUZZ_SEEDS if set and empty.
inline void write_seeds(const std::vector<std::string>& seeds) {
  const char* dir = std::getenv("PEFT_FUZZ_SEEDS");
  if (!dir) return;
  std::filesystem::create_directories(dir);
  if (!std::filesystem::is_empty(dir)) return;
  for (size_t i = 0; i < seeds.size(); ++i)
    std::ofstream(std::filesystem::path(dir) / ("seed" + std::to_string(i)), std::ios::binary) << seeds[i];
}

/// The adapter files packed in one input: 4-byte little-endian config length, config, weights.
inline std::string pack(const std::string& config, const std::string& weights) {
  const uint32_t n = static_cast<uint32_t>(config.size());
  return std::string(reinterpret_cast<const char*>(&n), 4) + config + weights;
}

}  // namespace peft_fuzz
