#pragma once
/// @file
/// Which parameters train, and the one-line summary HF peft users know.

#include <fmt/format.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

namespace peft {

/// The trainable parameters of `module` with their dotted names, in
/// registration order; a tensor reachable by two names is listed once.
inline std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters(
    const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& p : module.named_parameters())
    if (p.value().requires_grad() && seen.insert(p.value().unsafeGetTensorImpl()).second)
      out.emplace_back(p.key(), p.value());
  return out;
}

/// The parameters of `module` that require grad, each once, in registration
/// order: what an optimizer should receive.
///
/// ```
/// torch::optim::AdamW opt(peft::trainable_parameters(*model), 1e-3);
/// ```
inline std::vector<torch::Tensor> trainable_parameters(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (auto& named : named_trainable_parameters(module)) out.push_back(std::move(named.second));
  return out;
}

/// Trainable and total parameter counts.
///
/// ```
/// auto count = peft::count_parameters(*model);
/// double share = 100.0 * count.trainable / count.total;
/// ```
struct ParameterCount {
  /// Elements that require grad.
  int64_t trainable = 0;
  /// All elements (NF4 weights as the weights they stand for).
  int64_t total = 0;
};

/// Counts the parameters of `module` (elements, not tensors; a shared tensor once). An NF4 weight
/// (buffer `*nf4_packed`, two 4-bit values per byte) counts as 2 per byte, as HF peft counts.
inline ParameterCount count_parameters(const torch::nn::Module& module) {
  ParameterCount count;
  std::unordered_set<const void*> seen;  // a layer shared by two modules (an embedding wrapped by PromptEmbedding) counts once
  for (const auto& p : module.parameters()) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    count.total += p.numel();
    if (p.requires_grad()) count.trainable += p.numel();
  }
  const std::string packed = "nf4_packed";
  for (const auto& b : module.named_buffers())
    if (b.key().size() >= packed.size() && b.key().compare(b.key().size() - packed.size(), packed.size(), packed) == 0)
      count.total += 2 * b.value().numel();
  return count;
}

/// 1234567 -> "1,234,567", as HF peft prints counts.
inline std::string with_thousands(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n);
  for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) digits.insert(static_cast<size_t>(i), ",");
  return n < 0 ? "-" + digits : digits;
}

/// "trainable params: X || all params: Y || trainable%: Z", HF peft's summary line.
inline std::string format_trainable_parameters(const ParameterCount& count) {
  const double percent = count.total == 0 ? 0.0 : 100.0 * static_cast<double>(count.trainable) / count.total;
  return fmt::format("trainable params: {} || all params: {} || trainable%: {:.4f}",
                     with_thousands(count.trainable), with_thousands(count.total), percent);
}

/// Prints the summary line of `module` to stdout.
///
/// ```
/// peft::print_trainable_parameters(*model);
/// // trainable params: 8,192 || all params: 1,056,768 || trainable%: 0.7752
/// ```
inline void print_trainable_parameters(const torch::nn::Module& module) {
  fmt::print("{}\n", format_trainable_parameters(count_parameters(module)));
}

}  // namespace peft
