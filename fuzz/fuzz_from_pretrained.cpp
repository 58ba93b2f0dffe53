// libFuzzer: from_pretrained on a folder built from the input (config and
// weights, see peft_fuzz::pack) must load or raise a peft::Error.
#include "fuzz_common.h"

#include <unistd.h>

#include <cstring>

namespace {
torch::jit::Module& base() {
  static torch::jit::Module m = torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/llama_scripted.pt");
  return m;
}
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const auto [config, weights] = peft_fuzz::valid_adapter();
  std::vector<std::string> seeds;
  for (const auto& c : peft_fuzz::variants(config)) seeds.push_back(peft_fuzz::pack(c, weights));
  for (const auto& w : peft_fuzz::variants(weights)) seeds.push_back(peft_fuzz::pack(config, w));
  peft_fuzz::write_seeds(seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t n = 0;
  std::memcpy(&n, data, 4);
  const std::string rest(reinterpret_cast<const char*>(data) + 4, size - 4);
  if (n > rest.size()) return 0;
  static const auto dir = std::filesystem::temp_directory_path() / ("peft_fuzz_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json", std::ios::binary | std::ios::trunc) << rest.substr(0, n);
  std::ofstream(dir / "adapter_model.safetensors", std::ios::binary | std::ios::trunc) << rest.substr(n);
  try {
    peft::PeftModel::from_pretrained(base(), dir);
  } catch (const peft::Error&) {
  }
  return 0;
}
