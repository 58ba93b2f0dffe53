// libFuzzer: the safetensors reader must turn any bytes into tensors or a peft::FileError.
#include "fuzz_common.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  peft_fuzz::write_seeds(peft_fuzz::variants(peft_fuzz::valid_adapter().second));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    peft::io::from_safetensors(std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  } catch (const peft::FileError&) {
  }
  return 0;
}
