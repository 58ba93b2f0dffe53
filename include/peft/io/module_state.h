#pragma once
/// @file
/// Adapter files for native torch::nn models: the trainable parameters only, as safetensors.

#include <peft/core/error.h>
#include <peft/core/match.h>
#include <peft/core/shape.h>
#include <peft/core/trainable.h>
#include <peft/io/safetensors.h>
#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace peft {

/// Writes the trainable parameters of `module` (its adapter, plus any head you
/// left trainable) to a safetensors file, atomically. Names are the dotted
/// parameter names (`blocks.0.q.lora_A`), values are copied to the CPU.
///
/// ```
/// peft::save_trainable(*model, "adapter.safetensors");
/// ```
inline void save_trainable(const torch::nn::Module& module, const std::filesystem::path& path) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, p] : named_trainable_parameters(module)) tensors[name] = p.detach().cpu().contiguous();
  check<ModelError>(!tensors.empty(), "save_trainable: {} has no trainable parameters to write to '{}'", module.name(),
                    path.string());
  io::save_safetensors(path, tensors, {{"format", "pt"}, {"writer", "peft-cpp save_trainable"}});
}

/// Loads a file written by save_trainable into the trainable parameters of
/// `module`, converted to each parameter's device and dtype. The file must hold
/// exactly those parameters with the same shapes; otherwise FileError names the
/// file and the tensors that differ, and `module` is left unchanged.
///
/// ```
/// Classifier fresh(...);                                // same architecture and adapter options
/// peft::load_trainable(*fresh, "adapter.safetensors");
/// ```
inline void load_trainable(torch::nn::Module& module, const std::filesystem::path& path) {
  const io::TensorFile file = io::load_safetensors(path);
  const auto params = named_trainable_parameters(module);
  std::vector<std::string> missing, unexpected;
  std::map<std::string, bool> expected;
  for (const auto& [name, p] : params) {
    expected[name] = true;
    auto it = file.tensors.find(name);
    if (it == file.tensors.end()) {
      missing.push_back(name);
      continue;
    }
    check<FileError>(it->second.sizes() == p.sizes(), "'{}': tensor '{}' has shape {}, the model expects {}",
                     path.string(), name, shape_str(it->second.sizes()), shape_str(p.sizes()));
  }
  for (const auto& item : file.tensors)
    if (!expected.count(item.first)) unexpected.push_back(item.first);
  check<FileError>(missing.empty() && unexpected.empty(),
                   "'{}' does not match the trainable parameters of {}: missing [{}], unexpected [{}]", path.string(),
                   module.name(), join_names(missing), join_names(unexpected));
  torch::NoGradGuard no_grad;
  for (const auto& [name, p] : params) {
    torch::Tensor target = p;
    target.copy_(file.tensors.at(name).to(p.device(), p.scalar_type()));
  }
}

}  // namespace peft
