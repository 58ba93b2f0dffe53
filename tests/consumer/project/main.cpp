// Compiles against peft's public headers and runs a little of the library.
#include <peft/peft.h>

#include <iostream>

int main() {
  std::cout << "peft " << peft::version() << "\n";
  torch::nn::Linear base(16, 8);
  peft::LoRALinear layer(base, peft::LoraOptions(4).lora_alpha(8));
  peft::print_trainable_parameters(*layer);
  torch::Tensor x = torch::randn({2, 16});
  // Neutral init: the adapted layer starts as its base.
  const bool same = torch::equal(layer(x), base(x));
  try {
    peft::LoRALinear bad(base, peft::LoraOptions(0));
  } catch (const peft::OptionError& e) {
    std::cout << "expected error: " << e.what() << "\n";
    return same ? 0 : 1;
  }
  return 1;
}
