#pragma once
/// @file
/// Input checks shared by every method: the message names the module and
/// what it expected.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <sstream>
#include <string>

namespace peft {

/// "[2, 3]": a shape as LibTorch prints it, for error messages.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

/// Throws ShapeError unless `x` has at least one dimension and its last one is `expected`.
inline void check_last_dim(const torch::Tensor& x, int64_t expected, const std::string& where) {
  check<ShapeError>(x.dim() >= 1 && x.size(-1) == expected, "{}: expected input with last dimension {}, got shape {}",
                    where, expected, shape_str(x.sizes()));
}

/// Throws ShapeError unless `x` has exactly `dims` dimensions.
inline void check_dims(const torch::Tensor& x, int64_t dims, const std::string& where, const std::string& what) {
  check<ShapeError>(x.dim() == dims, "{}: expected {} with {} dimensions, got shape {}", where, what, dims,
                    shape_str(x.sizes()));
}

}  // namespace peft
