#pragma once
// Access to the TorchScript fixtures exported by tools/export_fixtures.py.

#include <torch/script.h>
#include <unistd.h>

#include <fstream>
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

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

namespace peft_test {

/// Parameterised over every (architecture, export kind): the loaded fixture in
/// eval mode and its Python reference.
class FixtureModelTest : public ::testing::TestWithParam<std::pair<std::string, std::string>> {
 protected:
  void SetUp() override {
    std::tie(arch, kind) = GetParam();
    base = load_fixture(arch, kind);
    base.eval();
    ref = load_reference(arch);
  }

  std::string arch, kind;
  torch::jit::Module base;
  Reference ref;
};

/// Expects `fn` to throw E with a message containing every fragment.
template <typename E, typename Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << *fragments.begin();
  } catch (const E& e) {
    for (const char* f : fragments) EXPECT_THAT(e.what(), ::testing::HasSubstr(f));
  }
}

/// A TorchScript model built in C++: root.forward(x) calls root.fc, a module
/// with `parameters` whose forward(self, x) returns `fc_expression`.
inline torch::jit::Module model_with_fc(const std::vector<std::pair<std::string, torch::Tensor>>& parameters,
                                        const std::string& fc_expression) {
  torch::jit::Module fc("__torch__.Fc");
  fc.register_attribute("training", c10::BoolType::get(), false);
  for (const auto& [name, value] : parameters) fc.register_parameter(name, value, false);
  fc.define("def forward(self, x):\n  return " + fc_expression + "\n");
  torch::jit::Module root("__torch__.Root");
  root.register_attribute("training", c10::BoolType::get(), false);
  root.register_module("fc", fc);
  root.define("def forward(self, x):\n  return self.fc.forward(x)\n");
  return root;
}

/// A model's forward output on `inputs`, as a tensor (PeftModel or torch::jit::Module).
template <typename Model>
torch::Tensor run(Model& model, const std::vector<torch::jit::IValue>& inputs) {
  return model.forward(inputs).toTensor();
}

/// Moves every trainable tensor by `scale`·N(0, 1) (so files carry non-trivial data); seeded when `seed` >= 0.
inline void randomise(peft::PeftModel& model, double scale = 0.2, int64_t seed = -1) {
  torch::NoGradGuard no_grad;
  if (seed >= 0) torch::manual_seed(seed);
  for (auto& p : model.trainable_parameters()) p.add_(torch::randn_like(p) * scale);
}

/// The process's resident memory in bytes (/proc/self/statm).
inline size_t resident_bytes() {
  size_t total = 0, resident = 0;
  std::ifstream("/proc/self/statm") >> total >> resident;
  return resident * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

/// A fresh, empty temporary directory.
inline std::filesystem::path fresh_dir(const std::string& name) {
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("peft_test_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

/// Writes `inputs` and `expected` as buffers input_0.., expected of a module
/// saved at `path`, for the Python checks in tools/.
inline void save_io(const std::filesystem::path& path, const std::vector<torch::jit::IValue>& inputs,
                    const torch::Tensor& expected) {
  torch::jit::Module io("__torch__.IO");
  for (size_t i = 0; i < inputs.size(); ++i) io.register_buffer("input_" + std::to_string(i), inputs[i].toTensor());
  io.register_buffer("expected", expected.detach());
  io.save(path.string());
}

/// Runs tools/<script> with Debian's Python; returns its exit status.
inline int run_python_tool(const std::string& script_and_args, const std::string& env = "") {
  const std::string cmd = env + " " + PEFT_PYTHON + " " + PEFT_SOURCE_DIR + "/tools/" + script_and_args;
  return std::system(cmd.c_str());
}

/// The reference venv's Python (the real HF peft, transformers, ... from PyPI; made by
/// scripts/reference_env.sh), from $PEFT_REF_PYTHON; empty when unset.
inline std::string reference_python() {
  const char* python = std::getenv("PEFT_REF_PYTHON");
  return python ? python : "";
}

/// Whether a missing reference Python fails the tests that need it ($PEFT_REQUIRE_REFERENCES=1, as in CI).
inline bool references_required() {
  const char* required = std::getenv("PEFT_REQUIRE_REFERENCES");
  return required && std::string(required) == "1";
}

/// Runs tools/<script> with the reference venv's Python; returns its exit status.
inline int run_reference_tool(const std::string& script_and_args, const std::string& env = "") {
  const std::string cmd = env + " PEFT_FIXTURE_DIR=" + PEFT_FIXTURE_DIR + " " + reference_python() + " " +
                          PEFT_SOURCE_DIR + "/tools/" + script_and_args;
  return std::system(cmd.c_str());
}

}  // namespace peft_test

/// First statement of a test that compares with the real HF libraries: skips it
/// without $PEFT_REF_PYTHON (the README's test command), fails it when CI requires references.
#define PEFT_REQUIRE_REFERENCE_PYTHON()                                                               \
  do {                                                                                                \
    if (peft_test::reference_python().empty()) {                                                      \
      if (peft_test::references_required()) FAIL() << "PEFT_REQUIRE_REFERENCES=1 but PEFT_REF_PYTHON is unset"; \
      GTEST_SKIP() << "PEFT_REF_PYTHON is unset: scripts/reference_tests.sh runs the comparisons with HF"; \
    }                                                                                                 \
  } while (0)

namespace peft_test {

}  // namespace peft_test
