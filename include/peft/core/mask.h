#pragma once
/// @file
/// Extending masks over positions that prompt/prefix methods put in front.

#include <torch/torch.h>

namespace peft {
namespace functional {

/// Prepends `count` always-visible positions to the last dimension of `mask`.
/// `visible` is what the mask's convention uses for "attend": 1 for HF
/// attention masks, false for PyTorch's boolean masks (true = masked), 0 for
/// additive float masks.
///
/// ```
/// auto m = peft::functional::prepend_visible(attention_mask, 10, 1);   // [B, T] -> [B, 10 + T]
/// ```
inline torch::Tensor prepend_visible(const torch::Tensor& mask, int64_t count, const torch::Scalar& visible) {
  auto sizes = mask.sizes().vec();
  sizes.back() = count;
  return torch::cat({torch::full(sizes, visible, mask.options()), mask}, -1);
}

}  // namespace functional
}  // namespace peft
