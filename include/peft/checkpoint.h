#pragma once
/// @file
/// Training checkpoints: adapter tensors, optimizer state, step, RNG state and
/// adapter configs in one file, replaced atomically, so a run can resume and
/// reproduce the losses of an uninterrupted run.

#include <peft/io/atomic_file.h>
#include <peft/peft_model.h>
#include <torch/torch.h>

#include <mutex>
#include <sstream>

namespace peft {

namespace detail {

inline std::string adapter_configs_json(const PeftModel& model) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& a : model.adapters()) j[a.name] = model.adapter_config_json(a.name);
  return j.dump();
}

}  // namespace detail

/// Saves the trainable tensors of `model`'s active adapters, `optimizer`'s state,
/// `step` and the CPU random generator's state to `path` (atomically).
///
/// ```
/// peft::save_checkpoint("run/checkpoint.pt", model, optimizer, step);
/// ```
inline void save_checkpoint(const std::filesystem::path& path, const PeftModel& model, torch::optim::Optimizer& optimizer,
                            int64_t step) {
  torch::serialize::OutputArchive archive;
  for (const auto& [name, tensor] : model.named_trainable_parameters()) archive.write("param." + name, tensor.detach());
  torch::serialize::OutputArchive optimizer_state;
  optimizer.save(optimizer_state);
  archive.write("optimizer", optimizer_state);
  archive.write("step", torch::tensor(step));
  archive.write("rng", at::detail::getDefaultCPUGenerator().get_state());
  archive.write("configs", c10::IValue(detail::adapter_configs_json(model)));
  std::ostringstream bytes;
  archive.save_to(bytes);
  io::write_file_atomic(path, bytes.str());
}

/// Restores a checkpoint written by save_checkpoint into a model built with the
/// same adapter configs and an optimizer over the same parameters; returns the
/// step. FileError if the file is unreadable or was written for other adapters.
inline int64_t load_checkpoint(const std::filesystem::path& path, PeftModel& model, torch::optim::Optimizer& optimizer) {
  torch::serialize::InputArchive archive;
  try {
    std::istringstream bytes(io::read_file(path));
    archive.load_from(bytes);
  } catch (const c10::Error& e) {
    throw FileError("'" + path.string() + "' is not a peft checkpoint: " + e.what_without_backtrace());
  }
  auto read = [&](const std::string& key) {
    torch::Tensor t;
    try {
      archive.read(key, t);
    } catch (const c10::Error&) {
      throw FileError("'" + path.string() + "': checkpoint entry '" + key + "' is missing");
    }
    return t;
  };
  c10::IValue configs;
  check<FileError>(archive.try_read("configs", configs) && configs.isString(), "'{}': checkpoint has no adapter configs",
                   path.string());
  check<FileError>(configs.toStringRef() == detail::adapter_configs_json(model),
                   "'{}': checkpoint was written for other adapter configs", path.string());
  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : model.named_trainable_parameters()) {
    torch::Tensor saved = read("param." + name);
    check<FileError>(saved.sizes() == tensor.sizes(), "'{}': '{}' has shape {}, the model has {}", path.string(), name,
                     shape_str(saved.sizes()), shape_str(tensor.sizes()));
    tensor.copy_(saved);
  }
  torch::serialize::InputArchive optimizer_state;
  check<FileError>(archive.try_read("optimizer", optimizer_state), "'{}': checkpoint has no optimizer state", path.string());
  optimizer.load(optimizer_state);
  at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle to the global one
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(read("rng"));
  }
  return read("step").item<int64_t>();
}

}  // namespace peft
