#pragma once
/// @file
/// The random generator of a device as it was: gradient checkpointing runs a
/// block again in backward and must draw the same dropout masks as in forward.

#include <ATen/Context.h>
#include <torch/torch.h>

#include <mutex>

namespace peft {
namespace detail {

/// The state of `device`'s default generator now.
inline torch::Tensor generator_state(torch::Device device) {
  at::Generator generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

/// While alive, `device`'s default generator is at `state`; afterwards, where it was.
class ReplayedGenerator {
 public:
  ReplayedGenerator(torch::Device device, const torch::Tensor& state)
      : generator_(at::globalContext().defaultGenerator(device)) {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    now_ = generator_.get_state();
    generator_.set_state(state);
  }
  ~ReplayedGenerator() {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    generator_.set_state(now_);
  }
  ReplayedGenerator(const ReplayedGenerator&) = delete;
  ReplayedGenerator& operator=(const ReplayedGenerator&) = delete;

 private:
  at::Generator generator_;
  torch::Tensor now_;
};

}  // namespace detail
}  // namespace peft
