#pragma once
// Access to the TorchScript fixtures exported by tools/export_fixtures.py.

#include <torch/script.h>

#include <string>
#include <vector>

namespace peft_test {

inline const std::vector<std::string>& architectures() {
  static const std::vector<std::string> archs{"gpt2", "bert", "llama"};
  return archs;
}

inline std::string fixture_path(const std::string& arch, const std::string& kind) {
  return std::string(PEFT_FIXTURE_DIR) + "/" + arch + "_" + kind + ".pt";
}

/// `kind` is "scripted" or "traced".
inline torch::jit::Module load_fixture(const std::string& arch, const std::string& kind) {
  return torch::jit::load(fixture_path(arch, kind));
}

/// Reference inputs and the eager-mode output computed in Python.
struct Reference {
  std::vector<torch::jit::IValue> inputs;
  torch::Tensor expected;
};

inline Reference load_reference(const std::string& arch) {
  torch::jit::Module refs = torch::jit::load(fixture_path(arch, "ref"));
  Reference ref;
  ref.inputs.emplace_back(refs.attr("input_ids").toTensor());
  if (refs.hasattr("attention_mask")) ref.inputs.emplace_back(refs.attr("attention_mask").toTensor());
  ref.expected = refs.attr("expected").toTensor();
  return ref;
}

/// Every (architecture, export kind) pair, for parameterised tests.
inline std::vector<std::pair<std::string, std::string>> all_fixtures() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& arch : architectures())
    for (const char* kind : {"scripted", "traced"}) out.emplace_back(arch, kind);
  return out;
}

inline std::string fixture_name(const std::pair<std::string, std::string>& f) {
  return f.first + "_" + f.second;
}

}  // namespace peft_test
