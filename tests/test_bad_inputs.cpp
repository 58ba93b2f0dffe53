// The bad-input matrix: each row is an input a user can get wrong, the
// peft::Error type they see, a fragment of its message naming the culprit,
// and the check that no file in the working folder changed.
#include <gtest/gtest.h>
#include <peft/peft.h>
#include <torch/script.h>

#include <sys/resource.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;

/// The most specific peft error type of `e`, by name.
std::string kind_of(const peft::Error& e) {
  if (dynamic_cast<const peft::OptionError*>(&e)) return "OptionError";
  if (dynamic_cast<const peft::ShapeError*>(&e)) return "ShapeError";
  if (dynamic_cast<const peft::TargetError*>(&e)) return "TargetError";
  if (dynamic_cast<const peft::ModelError*>(&e)) return "ModelError";
  if (dynamic_cast<const peft::FileError*>(&e)) return "FileError";
  if (dynamic_cast<const peft::CommunicationError*>(&e)) return "CommunicationError";
  return "Error";
}

/// Every file below `dir` with its bytes.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& f : fs::recursive_directory_iterator(dir))
    if (f.is_regular_file()) files[f.path().string()] = peft::io::read_file(f.path());
  return files;
}

using Step = std::function<void(const fs::path& dir)>;

struct Row {
  const char* input;
  const char* error;     ///< expected peft::Error type
  const char* fragment;  ///< part of the message that names the culprit
  Step act;              ///< the call that must fail
  Step prepare = nullptr;  ///< writes the bad files first
};

torch::jit::Module llama() { return peft_test::load_fixture("llama", "scripted"); }
peft::LoraConfig lora() { return peft::LoraConfig().r(2).target_modules({"q_proj", "v_proj"}); }

/// Saves a LoRA adapter of the LLaMA fixture to dir/adapter (optionally edited first).
void save_adapter(const fs::path& dir, const std::function<void(peft::PeftModel&)>& edit = nullptr) {
  peft::PeftModel model = peft::get_peft_model(llama(), lora());
  if (edit) edit(model);
  model.save_pretrained(dir / "adapter");
}

/// Replaces dir/adapter's weights file by one with `header` (JSON) and `data_bytes` zero bytes.
void write_weights(const fs::path& dir, const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  peft::io::write_file_atomic(dir / "adapter" / "adapter_model.safetensors",
                              bytes + header + std::string(data_bytes, '\0'));
}

/// A full disk, simulated without mounting a small tmpfs: while it lives, writes
/// past `bytes` fail (EFBIG, where a full disk gives ENOSPC) instead of raising SIGXFSZ.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) : previous_handler_(std::signal(SIGXFSZ, SIG_IGN)) {
    getrlimit(RLIMIT_FSIZE, &previous_);
    const rlimit limit{bytes, previous_.rlim_max};
    setrlimit(RLIMIT_FSIZE, &limit);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &previous_);
    std::signal(SIGXFSZ, previous_handler_);
  }

 private:
  rlimit previous_{};
  void (*previous_handler_)(int);
};

void load_llama_adapter(const fs::path& dir) { peft::PeftModel::from_pretrained(llama(), dir / "adapter"); }

const std::vector<Row>& rows() {
  static const std::vector<Row> table{
      {"input of the wrong width", "ShapeError", "LoRALinear",
       [](const fs::path&) { peft::LoRALinear(torch::nn::Linear(8, 4), peft::LoraOptions(2))(torch::randn({3, 5})); }},
      {"rank 0", "OptionError", "LoraOptions.r must be >= 1",
       [](const fs::path&) { peft::LoRALinear(torch::nn::Linear(8, 4), peft::LoraOptions(0)); }},
      {"alpha 0", "OptionError", "alpha must be finite and non-zero",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().lora_alpha(0)); }},
      {"empty target list", "TargetError", "target_modules is empty",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().target_modules(std::vector<std::string>{})); }},
      {"pattern matching nothing", "TargetError", "'q_projection' matched no module",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().target_modules({"q_projection"})); }},
      {"non-linear target", "TargetError", "'model.norm'",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().target_modules({"model.norm"})); }},
      {"NF4 block size not a power of two", "OptionError", "NF4Config.blocksize",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().quantize_base(peft::NF4Config().blocksize(48))); }},
      {"Inf in the adapter, safe_merge", "ModelError", "safe_merge: merging LoRA into 'model.layers.0.self_attn.q_proj'",
       [](const fs::path&) {
         peft::PeftModel m = peft::get_peft_model(llama(), lora());
         torch::NoGradGuard no_grad;
         m.trainable_parameters()[1].fill_(std::numeric_limits<float>::infinity());
         m.merge_and_unload(/*safe_merge=*/true);
       }},
      {"IA3 merged into an NF4 weight", "ModelError", "NF4-quantised",
       [](const fs::path&) {
         peft::PeftModel m = peft::get_peft_model(llama(), lora().quantize_base(peft::NF4Config()));
         m.add_adapter("ia3", peft::IA3Config().target_modules({"q_proj"}));
         m.set_adapter("ia3");
         m.merge_adapter();
       }},
      {"adapter of a different base", "FileError", "adapter for a different model",
       [](const fs::path& dir) { peft::PeftModel::from_pretrained(peft_test::load_fixture("bert", "scripted"), dir / "adapter"); },
       [](const fs::path& dir) { save_adapter(dir); }},
      {"NaN in an adapter file", "FileError", "NaN or infinite", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir, [](peft::PeftModel& m) {
           torch::NoGradGuard no_grad;
           m.trainable_parameters()[0].fill_(std::nanf(""));
         });
       }},
      {"truncated safetensors", "FileError", "adapter_model.safetensors", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         const std::string bytes = peft::io::read_file(dir / "adapter" / "adapter_model.safetensors");
         peft::io::write_file_atomic(dir / "adapter" / "adapter_model.safetensors", bytes.substr(0, bytes.size() / 2));
       }},
      {"oversized safetensors header", "FileError", "exceeds", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         peft::io::write_file_atomic(dir / "adapter" / "adapter_model.safetensors",
                                     std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10));
       }},
      {"overlapping tensors", "FileError", "overlap", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         write_weights(dir, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8);
       }},
      {"duplicate tensor names", "FileError", "appears twice", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         write_weights(dir, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
       }},
      {"unknown dtype", "FileError", "unknown dtype", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         write_weights(dir, R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8);
       }},
      {"config field of the wrong type", "FileError", "field 'r' has the wrong type", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         auto j = nlohmann::json::parse(peft::io::read_file(dir / "adapter" / "adapter_config.json"));
         j["r"] = "two";
         peft::io::write_file_atomic(dir / "adapter" / "adapter_config.json", j.dump());
       }},
      {"HF field that changes the computation", "FileError", "'lora_bias' = true changes the computation", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         auto j = nlohmann::json::parse(peft::io::read_file(dir / "adapter" / "adapter_config.json"));
         j["lora_bias"] = true;
         peft::io::write_file_atomic(dir / "adapter" / "adapter_config.json", j.dump());
       }},
      {"a config rule broken inside a file", "FileError", "adapter_config.json': LoraConfig target", load_llama_adapter,
       [](const fs::path& dir) {
         save_adapter(dir);
         auto j = nlohmann::json::parse(peft::io::read_file(dir / "adapter" / "adapter_config.json"));
         j["lora_dropout"] = 2.0;
         peft::io::write_file_atomic(dir / "adapter" / "adapter_config.json", j.dump());
       }},
      {"typo in alpha_pattern", "TargetError", "alpha_pattern: key 'q_porj_typo' matches no targeted module",
       [](const fs::path&) { peft::get_peft_model(llama(), lora().alpha_pattern({{"q_porj_typo", 100.0}})); }},
      {"two DoRA adapters active on one layer", "OptionError", "rescales its output",
       [](const fs::path&) {
         peft::PeftModel m = peft::get_peft_model(llama(), lora().use_dora(true));
         m.add_adapter("b", lora().use_dora(true));
         m.set_adapter({"default", "b"});
       }},
      {"unwritable output directory", "FileError", "cannot create",
       [](const fs::path& dir) { peft::get_peft_model(llama(), lora()).save_pretrained(dir / "a_file" / "adapter"); },
       [](const fs::path& dir) { std::ofstream(dir / "a_file") << "not a directory"; }},
      {"disk full while overwriting an adapter", "FileError", "cannot write",
       [](const fs::path& dir) {
         peft::PeftModel model = peft::get_peft_model(llama(), lora());
         const FileSizeLimit full(64);  // every file the save writes is larger
         model.save_pretrained(dir / "adapter");
       },
       [](const fs::path& dir) { save_adapter(dir); }},
      {"overwriting an adapter that fails to save", "FileError", "cannot create",
       [](const fs::path& dir) { peft::get_peft_model(llama(), lora()).save_pretrained(dir / "adapter" / "adapter_config.json" / "x"); },
       [](const fs::path& dir) { save_adapter(dir); }},
  };
  return table;
}

TEST(BadInputs, EveryRowRaisesItsTypedErrorAndChangesNoFile) {
  const fs::path work = peft_test::fresh_dir("bad_inputs");
  for (size_t i = 0; i < rows().size(); ++i) {
    const Row& row = rows()[i];
    SCOPED_TRACE(row.input);
    const fs::path dir = work / std::to_string(i);
    fs::create_directories(dir);
    if (row.prepare) row.prepare(dir);
    const auto before = snapshot(dir);
    try {
      row.act(dir);
      ADD_FAILURE() << "no error";
    } catch (const peft::Error& e) {
      EXPECT_EQ(kind_of(e), row.error) << e.what();
      EXPECT_NE(std::string(e.what()).find(row.fragment), std::string::npos) << e.what();
    }
    EXPECT_EQ(snapshot(dir), before) << "the failing call changed files";
  }
}

}  // namespace
