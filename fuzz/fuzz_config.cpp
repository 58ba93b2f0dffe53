// libFuzzer: adapter_config.json parsing must give a config or a peft::FileError.
#include "fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  peft_fuzz::write_seeds(peft_fuzz::variants(peft_fuzz::valid_adapter().first));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const nlohmann::json::exception&) {
    return 0;  // load_adapter reports this as a FileError
  }
  try {
    peft::config_from_json(j, "fuzz.json");
  } catch (const peft::Error&) {
  }
  return 0;
}
