#pragma once
/// @file
/// A clear error for training an adapter that is merged into the base weights.
///
/// A merged adapter's forward runs only the base weights, so its parameters get
/// no gradient and LibTorch's backward fails with a generic "element 0 of
/// tensors does not require grad" (or, when something else trains, the adapter
/// silently stays put). Outputs produced in training mode while merged carry
/// this node instead, whose backward names the adapter and what to call.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <string>

namespace peft {
namespace detail {

/// Identity in forward; backward throws ModelError with the saved message.
struct MergedBackward : torch::autograd::Function<MergedBackward> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& out,
                               const torch::Tensor& /*anchor*/, const std::string& message) {
    ctx->saved_data["message"] = message;
    return out.view_as(out);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list&) {
    throw ModelError(ctx->saved_data["message"].toStringRef());
  }
};

/// Whether a forward now records autograd history for training.
inline bool records_training(bool module_training) { return module_training && torch::GradMode::is_enabled(); }

/// `out`, joined to a MergedBackward node whose backward throws `message`.
/// Call only when records_training() holds for a merged adapter.
inline torch::Tensor fail_backward_merged(const torch::Tensor& out, const std::string& message) {
  if (!out.is_floating_point()) return out;
  const torch::Tensor anchor = torch::zeros({}, out.options().requires_grad(true));
  return MergedBackward::apply(out, anchor, message);
}

/// The message of a merged native layer `what` whose `params` then get no gradient.
inline std::string merged_layer_message(const std::string& what, const std::string& params) {
  return what + " is merged into its base weight, so its parameters (" + params +
         ") get no gradient: call unmerge() before training (or eval() / torch::NoGradGuard for inference)";
}

}  // namespace detail
}  // namespace peft
