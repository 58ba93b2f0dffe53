// Compiles against peft's public headers and runs a little of the library.
#include <peft/peft.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  try {
    peft::check<peft::OptionError>(false, "consumer check {}", 42);
  } catch (const peft::Error& e) {
    std::cout << "peft " << peft::version() << ": " << e.what() << "\n";
  }
  torch::Tensor x = torch::ones({2, 3});
  std::cout << "sum=" << x.sum().item<float>() << "\n";
  return x.sum().item<float>() == 6.0f ? 0 : 1;
}
