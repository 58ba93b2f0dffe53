// GGUF export of LoRA adapters for llama.cpp (issue 22): peft::io's GGUF writer
// and reader (bytes laid out as gguf-py writes them, corrupt files refused), and
// peft::lora::export_gguf on adapters made in C++ on the Llama family and GPT-2:
// llama.cpp's names, the factors in the layout it needs, alpha, and the update
// llama.cpp computes (scale·B·A, scale = alpha / rank) equal to what merging the
// adapter changes; the adapters llama.cpp cannot represent are refused. RealGguf
// has llama.cpp's own reader (gguf from PyPI, tools/check_gguf.py) check the files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "fixtures.h"

namespace {

namespace fs = std::filesystem;
using peft_test::expect_error;

fs::path gguf_case_dir(const std::string& name) { return fs::path(PEFT_FIXTURE_DIR) / "hf" / name; }

nlohmann::json gguf_read_json(const fs::path& path) { return nlohmann::json::parse(peft::io::read_file(path)); }
void gguf_write_json(const fs::path& path, const nlohmann::json& j) { std::ofstream(path) << j.dump(2); }

/// An adapter saved from fixture `model` with `config`, and what merging it changes
/// in each base weight (in the weight's own layout), by parameter name.
struct GgufAdapterCase {
  fs::path dir;
  std::map<std::string, torch::Tensor> deltas;
};

GgufAdapterCase make_gguf_adapter(const std::string& model, const peft::LoraConfig& config, const std::string& name) {
  std::shared_ptr<torch::nn::Module> m;
  if (model.find("seqcls") != std::string::npos)
    m = peft::hf::AutoModelForSequenceClassification::from_pretrained(gguf_case_dir(model)).ptr();
  else if (model.rfind("bert", 0) == 0)
    m = peft::hf::AutoModel::from_pretrained(gguf_case_dir(model)).ptr();
  else
    m = peft::hf::AutoModelForCausalLM::from_pretrained(gguf_case_dir(model)).ptr();
  std::map<std::string, torch::Tensor> before;
  for (const auto& p : m->named_parameters()) before[p.key()] = p.value().detach().clone();
  peft::nn::PeftModel adapted = peft::get_peft_model(m, config);
  GgufAdapterCase out{peft_test::fresh_dir("gguf_" + name) / "adapter", {}};
  adapted.save_pretrained(out.dir);
  torch::NoGradGuard no_grad;
  adapted.merge_adapter();
  for (const auto& p : m->named_parameters()) {
    auto it = before.find(p.key());
    if (it != before.end() && !torch::equal(p.value(), it->second)) out.deltas[p.key()] = (p.value() - it->second).to(torch::kDouble);
  }
  return out;
}

/// LoRA with random A and B (HF's init_lora_weights=False): the update is not zero.
peft::LoraConfig random_lora(int64_t r, double alpha, const std::vector<std::string>& targets) {
  return peft::LoraConfig().r(r).lora_alpha(alpha).target_modules(targets).init_lora_weights(peft::LoraInit::Random);
}

/// Export options naming fixture `model` as the base.
peft::lora::GgufExportOptions gguf_base(const std::string& model) {
  return peft::lora::GgufExportOptions().base_model_dir(gguf_case_dir(model).string());
}

/// Exports `c` (on fixture `base`) to adapter.gguf next to its folder and reads the file back.
peft::io::GgufFile gguf_export(const GgufAdapterCase& c, const std::string& base,
                               peft::lora::GgufOutType type = peft::lora::GgufOutType::F32) {
  const fs::path out = c.dir.parent_path() / "adapter.gguf";
  peft::lora::export_gguf(c.dir, out, gguf_base(base).outtype(type));
  return peft::io::load_gguf(out);
}

/// llama.cpp's row order of a q or k projection (convert_hf_to_gguf's LlamaModel.permute):
/// its row h·d + 2j + t is HF's row h·d + t·d/2 + j (each head's rotary halves interleaved).
torch::Tensor llama_cpp_rows(int64_t heads, int64_t head_dim) {
  std::vector<int64_t> rows;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < head_dim / 2; ++j)
      for (int64_t t = 0; t < 2; ++t) rows.push_back(h * head_dim + t * head_dim / 2 + j);
  return torch::tensor(rows);
}

/// The update llama.cpp adds with the pair of `weight` (llama-adapter.h's get_scale:
/// alpha / rank, the rank read from lora_b), in llama.cpp's layout of the weight: B·A
/// (build_lora_mm), or for token_embd row t = b·a[t] (llm_build_inp_embd).
torch::Tensor llama_cpp_update(const peft::io::GgufFile& file, const std::string& weight) {
  const torch::Tensor a = file.tensor(weight + ".lora_a").to(torch::kDouble), b = file.tensor(weight + ".lora_b").to(torch::kDouble);
  const double scale = file.get<float>("adapter.lora.alpha") / static_cast<double>(b.size(1));
  return weight == "token_embd.weight" ? scale * a.matmul(b.t()) : scale * b.matmul(a);
}

/// How a base parameter appears in llama.cpp: its tensor, and the layout change (rows: q/k's row order; "t": transposed).
struct GgufExpect {
  std::string parameter, tensor;
  torch::Tensor rows;
  bool transposed = false;
};

/// Every adapted weight has its pair in `file` (and nothing else is there), and the update
/// llama.cpp computes from it equals the merged change, in llama.cpp's layout.
void expect_updates_equal_merge(const peft::io::GgufFile& file, const GgufAdapterCase& c, const std::vector<GgufExpect>& table) {
  EXPECT_EQ(file.tensors.size(), 2 * c.deltas.size());
  EXPECT_EQ(table.size(), c.deltas.size());
  for (const auto& e : table) {
    SCOPED_TRACE(e.parameter + " -> " + e.tensor);
    ASSERT_TRUE(c.deltas.count(e.parameter)) << "the adapter does not change it";
    torch::Tensor expected = c.deltas.at(e.parameter);
    if (e.transposed) expected = expected.t();
    if (e.rows.defined()) expected = expected.index_select(0, e.rows);
    // merged - base is float32 rounding of the sum: compared relative to the update's largest value
    const double error = (llama_cpp_update(file, e.tensor) - expected).abs().max().item<double>();
    EXPECT_LE(error, 1e-6 * expected.abs().max().item<double>());
  }
}

/// The Llama-family table: every projection of both layers, embed_tokens and lm_head.
std::vector<GgufExpect> llama_table(const fs::path& config_dir, bool embeddings) {
  const nlohmann::json cfg = gguf_read_json(config_dir / "config.json");
  const int64_t heads = cfg["num_attention_heads"], kv = cfg.value("num_key_value_heads", heads);
  const int64_t head_dim = cfg.value("head_dim", cfg["hidden_size"].get<int64_t>() / heads);
  std::vector<GgufExpect> table;
  for (int layer = 0; layer < 2; ++layer) {
    const std::string hf = "model.layers." + std::to_string(layer) + ".", blk = "blk." + std::to_string(layer) + ".";
    table.push_back({hf + "self_attn.q_proj.weight", blk + "attn_q.weight", llama_cpp_rows(heads, head_dim)});
    table.push_back({hf + "self_attn.k_proj.weight", blk + "attn_k.weight", llama_cpp_rows(kv, head_dim)});
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"}, {"mlp.gate_proj", "ffn_gate"},
             {"mlp.up_proj", "ffn_up"}, {"mlp.down_proj", "ffn_down"}})
      table.push_back({hf + from + ".weight", blk + to + ".weight", {}});
  }
  if (embeddings) {
    table.push_back({"model.embed_tokens.weight", "token_embd.weight", {}});
    table.push_back({"lm_head.weight", "output.weight", {}});
  }
  return table;
}

const std::vector<std::string> kGgufLlamaTargets{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// ---------------------------------------------------------------------------------------- the file format

TEST(GgufIo, BytesAreLaidOutAsGgufPyWritesThem) {
  peft::io::GgufFile f;
  f.set("k", peft::io::GgufValue::of(uint32_t{7}));
  f.tensors.emplace_back("t", torch::tensor({1.5f, -2.0f}));
  const std::string bytes = peft::io::to_gguf(f);
  // header 24 + kv (8 + 1 + 4 + 4) + tensor info (8 + 1 + 4 + 8 + 4 + 8) = 74, padded to 96; 8 data bytes padded to 32
  const float values[] = {1.5f, -2.0f};
  std::string expected("GGUF\x03\0\0\0\x01\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0", 24);
  expected += std::string("\x01\0\0\0\0\0\0\0k\x04\0\0\0\x07\0\0\0", 17);
  expected += std::string("\x01\0\0\0\0\0\0\0t\x01\0\0\0\x02\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 33);
  expected.resize(96, '\0');
  expected.append(reinterpret_cast<const char*>(values), 8);
  expected.resize(128, '\0');
  EXPECT_EQ(bytes, expected);
}

TEST(GgufIo, RoundTripsMetadataAndTensors) {
  const fs::path path = peft_test::fresh_dir("gguf_io") / "x.gguf";
  peft::io::GgufFile f;
  f.set("general.architecture", peft::io::GgufValue::of("llama"));
  f.set("a.float", peft::io::GgufValue::of(0.25f));
  f.set("a.bool", peft::io::GgufValue::of(true));
  f.set("a.int64", peft::io::GgufValue::of(int64_t{-5}));
  f.set("a.tokens", peft::io::GgufValue::array(peft::io::GgufType::UInt32, {peft::io::GgufValue::of(uint32_t{3}),
                                                                            peft::io::GgufValue::of(uint32_t{9})}));
  f.set("general.alignment", peft::io::GgufValue::of(uint32_t{64}));
  const torch::Tensor a = torch::randn({3, 5}), b = torch::randn({7}).to(torch::kHalf), c = torch::randn({2, 3, 4}).to(torch::kBFloat16);
  // c is not contiguous (written in its logical order); an empty tensor has no data pointer
  f.tensors = {{"a", a}, {"b", b}, {"c", c.transpose(0, 2)}, {"empty", torch::zeros({0, 4})}};
  peft::io::save_gguf(path, f);
  EXPECT_EQ(fs::file_size(path) % 64, 0u);
  const peft::io::GgufFile g = peft::io::load_gguf(path);
  EXPECT_EQ(g.get_string("general.architecture"), "llama");
  EXPECT_EQ(g.get<float>("a.float"), 0.25f);
  EXPECT_TRUE(g.get<bool>("a.bool"));
  EXPECT_EQ(g.get<int64_t>("a.int64"), -5);
  ASSERT_EQ(g.find("a.tokens")->items.size(), 2u);
  EXPECT_EQ(g.find("a.tokens")->items[1].as<uint32_t>(), 9u);
  EXPECT_TRUE(torch::equal(g.tensor("a"), a));
  EXPECT_TRUE(torch::equal(g.tensor("b"), b));
  EXPECT_TRUE(torch::equal(g.tensor("c"), c.transpose(0, 2)));
  EXPECT_EQ(g.tensor("empty").sizes(), (std::vector<int64_t>{0, 4}));
  expect_error<peft::FileError>([&] { g.get<uint32_t>("a.float"); }, {"'a.float' is float32, expected uint32", "x.gguf"});
  expect_error<peft::FileError>([&] { g.get_string("missing"); }, {"no metadata 'missing'"});
}

TEST(GgufIo, RefusesCorruptFilesAndUnwritableTensors) {
  peft::io::GgufFile f;
  f.set("k", peft::io::GgufValue::of("v"));
  f.tensors.emplace_back("t", torch::ones({4, 4}));
  const std::string bytes = peft::io::to_gguf(f);
  expect_error<peft::FileError>([&] { peft::io::from_gguf("GGML" + bytes.substr(4), "f.gguf"); }, {"'f.gguf' is not a GGUF file"});
  expect_error<peft::FileError>([&] { peft::io::from_gguf(bytes.substr(0, 30), "f.gguf"); }, {"'f.gguf': truncated"});
  expect_error<peft::FileError>([&] { peft::io::from_gguf(bytes.substr(0, bytes.size() - 40), "f.gguf"); },
                                {"tensor 't'", "extends past the end"});
  std::string version = bytes;
  version[4] = 1;
  expect_error<peft::FileError>([&] { peft::io::from_gguf(version, "f.gguf"); }, {"GGUF version 1 is not supported"});
  // Any one byte changed: the file reads (the byte was data or padding) or a FileError says why, nothing else.
  f.set("list", peft::io::GgufValue::array(peft::io::GgufType::String, {peft::io::GgufValue::of("a"), peft::io::GgufValue::of("b")}));
  const std::string good = peft::io::to_gguf(f);
  for (size_t i = 0; i < good.size(); ++i)
    for (const unsigned char value : {0x00, 0x07, 0x80, 0xff}) {
      std::string changed = good;
      changed[i] = static_cast<char>(value);
      try {
        peft::io::from_gguf(changed, "f.gguf");
      } catch (const peft::FileError&) {
      }
    }
  peft::io::GgufFile bad;
  bad.tensors.emplace_back("ints", torch::ones({2}, torch::kLong));
  expect_error<peft::ShapeError>([&] { peft::io::to_gguf(bad); }, {"tensor 'ints'", "float32, float16 or bfloat16"});
  bad.tensors = {{std::string(64, 'n'), torch::ones({2})}};
  expect_error<peft::OptionError>([&] { peft::io::to_gguf(bad); }, {"1 to 63 bytes"});
  bad.tensors = {{"t", torch::ones({2})}, {"t", torch::ones({2})}};
  expect_error<peft::OptionError>([&] { peft::io::to_gguf(bad); }, {"tensor 't' appears twice"});
}

// ---------------------------------------------------------------------------------------- LoRA export

// Llama and Mistral (llama.cpp's "llama": q/k rows permuted), also with head_dim != hidden / heads.
TEST(Gguf, LlamaFamilyExportHasLlamaCppsNamesLayoutAlphaAndUpdate) {
  for (const std::string model : {"llama", "mistral", "llama_bias_headdim"}) {
    SCOPED_TRACE(model);
    std::vector<std::string> targets = kGgufLlamaTargets;
    targets.insert(targets.end(), {"embed_tokens", "lm_head"});
    const GgufAdapterCase c = make_gguf_adapter(model, random_lora(4, 8, targets), model);
    const peft::io::GgufFile file = gguf_export(c, model);
    EXPECT_EQ(file.get_string("general.architecture"), "llama");
    EXPECT_EQ(file.get_string("general.type"), "adapter");
    EXPECT_EQ(file.get_string("adapter.type"), "lora");
    EXPECT_EQ(file.get<float>("adapter.lora.alpha"), 8.0f);
    const std::vector<GgufExpect> table = llama_table(gguf_case_dir(model), true);
    expect_updates_equal_merge(file, c, table);
    // The factors themselves: HF's A and B (B's rows in llama.cpp's order for q and k; the embedding's A transposed).
    const auto hf = peft::io::load_safetensors(c.dir / "adapter_model.safetensors").tensors;
    const std::string p = "base_model.model.model.";
    EXPECT_TRUE(torch::equal(file.tensor("blk.1.attn_q.weight.lora_a"), hf.at(p + "layers.1.self_attn.q_proj.lora_A.weight")));
    EXPECT_TRUE(torch::equal(file.tensor("blk.1.attn_q.weight.lora_b"),
                             hf.at(p + "layers.1.self_attn.q_proj.lora_B.weight").index_select(0, table[7].rows)));
    EXPECT_TRUE(torch::equal(file.tensor("blk.0.attn_k.weight.lora_b"),
                             hf.at(p + "layers.0.self_attn.k_proj.lora_B.weight").index_select(0, table[1].rows)));
    EXPECT_TRUE(torch::equal(file.tensor("blk.0.ffn_down.weight.lora_b"), hf.at(p + "layers.0.mlp.down_proj.lora_B.weight")));
    EXPECT_TRUE(torch::equal(file.tensor("token_embd.weight.lora_a"), hf.at(p + "embed_tokens.lora_embedding_A").t()));
    EXPECT_TRUE(torch::equal(file.tensor("token_embd.weight.lora_b"), hf.at(p + "embed_tokens.lora_embedding_B")));
    EXPECT_TRUE(torch::equal(file.tensor("output.weight.lora_a"), hf.at("base_model.model.lm_head.lora_A.weight")));
    EXPECT_EQ(file.tensor("blk.0.attn_q.weight.lora_a").sizes(), hf.at(p + "layers.0.self_attn.q_proj.lora_A.weight").sizes());
    EXPECT_EQ(file.tensor("blk.0.attn_q.weight.lora_a").scalar_type(), torch::kFloat32);
  }
}

// Qwen2: llama.cpp's "qwen2" keeps HF's row order; its tied embeddings take no LoRA in llama.cpp.
TEST(Gguf, Qwen2ExportKeepsTheRowOrder) {
  const GgufAdapterCase c = make_gguf_adapter("qwen2", random_lora(4, 16, kGgufLlamaTargets), "qwen2");
  const peft::io::GgufFile file = gguf_export(c, "qwen2");
  EXPECT_EQ(file.get_string("general.architecture"), "qwen2");
  EXPECT_EQ(file.get<float>("adapter.lora.alpha"), 16.0f);
  std::vector<GgufExpect> table = llama_table(gguf_case_dir("qwen2"), false);
  for (auto& e : table) e.rows = torch::Tensor();
  expect_updates_equal_merge(file, c, table);
  const auto hf = peft::io::load_safetensors(c.dir / "adapter_model.safetensors").tensors;
  EXPECT_TRUE(torch::equal(file.tensor("blk.1.attn_q.weight.lora_b"),
                           hf.at("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")));
}

// GPT-2: Conv1D weights are [in, out]; HF peft's factors are not, so they go as they are.
TEST(Gguf, Gpt2ExportWritesTheFactorsAsTheyAre) {
  const GgufAdapterCase c = make_gguf_adapter("gpt2", random_lora(4, 8, {"c_attn", "c_proj", "c_fc"}), "gpt2");
  const peft::io::GgufFile file = gguf_export(c, "gpt2");
  EXPECT_EQ(file.get_string("general.architecture"), "gpt2");
  std::vector<GgufExpect> table;
  for (int layer = 0; layer < 2; ++layer) {
    const std::string hf = "transformer.h." + std::to_string(layer) + ".", blk = "blk." + std::to_string(layer) + ".";
    for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
             {"attn.c_attn", "attn_qkv"}, {"attn.c_proj", "attn_output"}, {"mlp.c_fc", "ffn_up"}, {"mlp.c_proj", "ffn_down"}})
      table.push_back({hf + from + ".weight", blk + to + ".weight", {}, /*transposed=*/true});
  }
  expect_updates_equal_merge(file, c, table);
  const auto hf = peft::io::load_safetensors(c.dir / "adapter_model.safetensors").tensors;
  const torch::Tensor a = file.tensor("blk.0.attn_qkv.weight.lora_a"), b = file.tensor("blk.0.attn_qkv.weight.lora_b");
  EXPECT_TRUE(torch::equal(a, hf.at("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight")));
  EXPECT_TRUE(torch::equal(b, hf.at("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")));
  EXPECT_EQ(a.sizes(), (std::vector<int64_t>{4, 32}));  // llama.cpp's check: a ne[0] = the weight's ne[0] (in)
  EXPECT_EQ(b.sizes(), (std::vector<int64_t>{96, 4}));  // b ne[1] = the weight's ne[1] (3 x 32 out)
}

// BERT and RoBERTa (llama.cpp's "bert"): the body's name ("roberta.") is not part of llama.cpp's names.
TEST(Gguf, BertAndRobertaExportAsLlamaCppsBert) {
  for (const auto& [model, prefix] : std::vector<std::pair<std::string, std::string>>{{"bert_base", ""}, {"roberta_seqcls", "roberta."}}) {
    SCOPED_TRACE(model);
    const GgufAdapterCase c = make_gguf_adapter(model, random_lora(4, 8, {"query", "key", "value", "word_embeddings"}), model);
    const peft::io::GgufFile file = gguf_export(c, model);
    EXPECT_EQ(file.get_string("general.architecture"), "bert");
    std::vector<GgufExpect> table{{prefix + "embeddings.word_embeddings.weight", "token_embd.weight", {}}};
    for (int layer = 0; layer < 2; ++layer)
      for (const auto& [from, to] :
           std::vector<std::pair<std::string, std::string>>{{"query", "attn_q"}, {"key", "attn_k"}, {"value", "attn_v"}})
        table.push_back({prefix + "encoder.layer." + std::to_string(layer) + ".attention.self." + from + ".weight",
                         "blk." + std::to_string(layer) + "." + to + ".weight", {}});
    expect_updates_equal_merge(file, c, table);
  }
}

TEST(Gguf, F16OuttypeRoundsTheFactorsToHalf) {
  const GgufAdapterCase c = make_gguf_adapter("llama", random_lora(4, 8, {"q_proj", "v_proj"}), "f16");
  const peft::io::GgufFile f32 = gguf_export(c, "llama"), f16 = gguf_export(c, "llama", peft::lora::GgufOutType::F16);
  ASSERT_EQ(f16.tensors.size(), f32.tensors.size());
  for (size_t i = 0; i < f16.tensors.size(); ++i) {
    EXPECT_EQ(f16.tensors[i].first, f32.tensors[i].first);
    EXPECT_EQ(f16.tensors[i].second.scalar_type(), torch::kHalf);
    EXPECT_TRUE(torch::equal(f16.tensors[i].second, f32.tensors[i].second.to(torch::kHalf)));
  }
}

// llama.cpp's scale is alpha / rank per pair: rsLoRA (alpha/√r) becomes alpha = lora_alpha·√r, and per-module ranks carry over.
TEST(Gguf, RsloraAndRankPatternKeepHfPeftsScaling) {
  const GgufAdapterCase rs = make_gguf_adapter("llama", random_lora(4, 8, kGgufLlamaTargets).use_rslora(true), "rslora");
  const peft::io::GgufFile rs_file = gguf_export(rs, "llama");
  EXPECT_FLOAT_EQ(rs_file.get<float>("adapter.lora.alpha"), 16.0f);
  expect_updates_equal_merge(rs_file, rs, llama_table(gguf_case_dir("llama"), false));

  const GgufAdapterCase ranks =
      make_gguf_adapter("llama", random_lora(4, 8, kGgufLlamaTargets).rank_pattern({{"q_proj", 2}}), "rank_pattern");
  const peft::io::GgufFile ranks_file = gguf_export(ranks, "llama");
  EXPECT_EQ(ranks_file.get<float>("adapter.lora.alpha"), 8.0f);
  EXPECT_EQ(ranks_file.tensor("blk.0.attn_q.weight.lora_a").size(0), 2);
  EXPECT_EQ(ranks_file.tensor("blk.0.attn_k.weight.lora_a").size(0), 4);
  expect_updates_equal_merge(ranks_file, ranks, llama_table(gguf_case_dir("llama"), false));
}

TEST(Gguf, RefusesWhatLlamaCppCannotRepresent) {
  const fs::path out = peft_test::fresh_dir("gguf_refused") / "x.gguf";
  const auto refused = [&](const GgufAdapterCase& c, const std::string& model = "llama") {
    return [&, model] { peft::lora::export_gguf(c.dir, out, gguf_base(model)); };
  };
  const peft::LoraConfig lora = random_lora(4, 8, {"q_proj", "v_proj"});
  expect_error<peft::OptionError>(refused(make_gguf_adapter("llama", peft::LoraConfig(lora).use_dora(true), "dora")),
                                  {"use_dora", "cannot represent DoRA"});
  expect_error<peft::OptionError>(
      refused(make_gguf_adapter("llama", peft::LoraConfig(lora).use_rslora(true).rank_pattern({{"q_proj", 2}}), "rslora_ranks")),
      {"one adapter.lora.alpha", "use_rslora with rank_pattern"});
  expect_error<peft::ModelError>(refused(make_gguf_adapter("llama_seqcls", random_lora(4, 8, {"q_proj", "score"}), "score"), "llama_seqcls"),
                                 {"module 'score' has no tensor in llama.cpp's llama model"});
  expect_error<peft::ModelError>(refused(make_gguf_adapter("qwen2", random_lora(4, 8, {"embed_tokens"}), "tied"), "qwen2"),
                                 {"module 'model.embed_tokens'", "tie_word_embeddings"});

  // Fields of a LoRA adapter's config, edited in its file: alpha_pattern, modules_to_save, biases, PiSSA.
  const GgufAdapterCase plain = make_gguf_adapter("llama", lora, "edited");
  const nlohmann::json original = gguf_read_json(plain.dir / "adapter_config.json");
  for (const auto& [field, value, fragment] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
           {"alpha_pattern", {{"q_proj", 32}}, "alpha_pattern"},
           {"modules_to_save", {"lm_head"}, "modules_to_save (lm_head) trains whole modules"},
           {"bias", "all", "bias 'all' trains biases"},
           {"init_lora_weights", "pissa", "init_lora_weights 'pissa' trains the adapter on a changed base"}}) {
    SCOPED_TRACE(field);
    nlohmann::json j = original;
    j[field] = value;
    gguf_write_json(plain.dir / "adapter_config.json", j);
    expect_error<peft::OptionError>(refused(plain), {fragment.c_str()});
  }
  // Other methods: their configs as save_pretrained writes them.
  for (const auto& [config, fragment] : std::vector<std::pair<peft::PeftConfig, std::string>>{
           {peft::PromptTuningConfig().num_virtual_tokens(4), "peft_type 'PROMPT_TUNING' cannot be exported to llama.cpp: prompt tuning"},
           {peft::PrefixTuningConfig().num_virtual_tokens(4), "peft_type 'PREFIX_TUNING' cannot be exported to llama.cpp: prefix tuning"},
           {peft::BottleneckConfig().target_modules("mlp"), "peft_type 'BOTTLENECK_ADAPTER' cannot be exported to llama.cpp: bottleneck"},
           {peft::IA3Config().target_modules({"q_proj"}), "peft_type 'IA3' cannot be exported to llama.cpp: IA3"}}) {
    SCOPED_TRACE(fragment);
    gguf_write_json(plain.dir / "adapter_config.json", config.to_json());
    expect_error<peft::OptionError>(refused(plain), {fragment.c_str(), "LoRA pairs"});
  }
  EXPECT_FALSE(fs::exists(out)) << "a refused export writes nothing";
  gguf_write_json(plain.dir / "adapter_config.json", original);
  EXPECT_NO_THROW(refused(plain)());

  // The base model: needed, and of a supported architecture.
  expect_error<peft::OptionError>([&] { peft::lora::export_gguf(plain.dir, out); },
                                  {"--base MODEL_DIR", "base_model_name_or_path is not set"});
  const fs::path t5 = peft_test::fresh_dir("gguf_t5");
  gguf_write_json(t5 / "config.json", {{"model_type", "t5"}});
  expect_error<peft::ModelError>([&] { peft::lora::export_gguf(plain.dir, out, peft::lora::GgufExportOptions().base_model_dir(t5.string())); },
                                 {"model_type 't5' cannot be exported to llama.cpp", "llama, mistral, qwen2, gpt2, bert, roberta"});
  expect_error<peft::FileError>([&] { peft::lora::export_gguf("/nonexistent/adapter", out, gguf_base("llama")); },
                                {"adapter directory '/nonexistent/adapter' does not exist"});
  EXPECT_EQ(std::distance(fs::directory_iterator(out.parent_path()), fs::directory_iterator()), 1) << "no temporary file left";
}

// llama.cpp's own reader (gguf from PyPI) parses the files of adapters made in C++ and by HF peft (Python);
// tools/check_gguf.py rebuilds every tensor from the
// safetensors file with numpy (llama.cpp's tensor names from gguf's own mapping, LlamaModel.permute) and
// checks names, shapes in ggml's order, types, values and metadata, and llama.cpp's loader's shape rules
// against the base model's weights.
TEST(RealGguf, LlamaCppsReaderParsesTheExport) {
  PEFT_REQUIRE_REFERENCE_PYTHON();
  std::string args;
  const auto add = [&](const std::string& model, const peft::LoraConfig& config, peft::lora::GgufOutType type, const std::string& name) {
    const GgufAdapterCase c = make_gguf_adapter(model, config, "real_" + name);
    gguf_export(c, model, type);
    args += " " + (c.dir.parent_path() / "adapter.gguf").string() + " " + c.dir.string() + " " + gguf_case_dir(model).string() +
            (type == peft::lora::GgufOutType::F16 ? " f16" : " f32");
  };
  std::vector<std::string> targets = kGgufLlamaTargets;
  targets.insert(targets.end(), {"embed_tokens", "lm_head"});
  using peft::lora::GgufOutType;
  add("llama", random_lora(4, 8, targets), GgufOutType::F32, "llama");
  add("llama_bias_headdim", random_lora(2, 4, kGgufLlamaTargets).use_rslora(true), GgufOutType::F16, "headdim");
  add("qwen2", random_lora(4, 16, kGgufLlamaTargets), GgufOutType::F32, "qwen2");
  add("gpt2", random_lora(4, 8, {"c_attn", "c_proj", "c_fc"}), GgufOutType::F32, "gpt2");
  add("bert_base", random_lora(4, 8, {"query", "value", "output.dense", "intermediate.dense", "word_embeddings"}), GgufOutType::F32,
      "bert");
  // Adapters the real HF peft made (their adapter_config.json names the base folder: no base_model_dir needed).
  for (const auto& [model, targets] : std::vector<std::pair<std::string, std::string>>{
           {"gpt2", "c_attn c_proj c_fc"}, {"llama", "q_proj k_proj v_proj o_proj down_proj embed_tokens"}}) {
    const fs::path out = peft_test::fresh_dir("gguf_hf_made_" + model);
    ASSERT_EQ(peft_test::run_reference_tool("check_hf_models.py --make-adapter " + gguf_case_dir(model).string() + " " +
                                            out.string() + " " + targets),
              0);
    peft::lora::export_gguf(out / "adapter", out / "adapter.gguf");
    args += " " + (out / "adapter.gguf").string() + " " + (out / "adapter").string() + " " + gguf_case_dir(model).string() + " f32";
  }
  EXPECT_EQ(peft_test::run_reference_tool("check_gguf.py" + args), 0);
}

}  // namespace
