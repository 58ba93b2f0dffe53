// peft::generate on a small GPT-style export (tools/export_lm.py): seeded
// sampling is deterministic, merged and unmerged adapters decode the same,
// the KV cache (forward_cached) gives the same tokens as re-running forward,
// left padding does not change a prompt's continuation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <peft/peft.h>

#include "fixtures.h"

namespace {

using peft_test::expect_error;

torch::jit::Module tiny_lm() { return torch::jit::load(std::string(PEFT_FIXTURE_DIR) + "/lm_tiny.pt"); }

/// A LoRA adapter whose update is not zero (B starts at zero), so it changes the output.
peft::PeftModel lora_lm() {
  torch::manual_seed(3);
  peft::PeftModel model =
      peft::get_peft_model(tiny_lm(), peft::LoraConfig().r(4).lora_alpha(8).target_modules("all-linear"));
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : model.named_trainable_parameters()) p.normal_(0, 0.3);
  return model;
}

peft::PeftModel prefix_lm() {
  torch::manual_seed(4);
  return peft::get_peft_model(tiny_lm(), peft::PrefixTuningConfig().num_virtual_tokens(5));
}

peft::PromptBatch prompts() { return peft::left_pad({{5, 9, 14, 2, 33, 7}, {40, 41}, {1, 2, 3, 4}}, 0); }

torch::Tensor run(peft::PeftModel& model, const peft::GenerationOptions& o) {
  auto batch = prompts();
  return peft::generate(model, batch.input_ids, batch.attention_mask, o);
}

TEST(Generate, SeededSamplingIsDeterministicAndTopK1IsGreedy) {
  torch::jit::Module lm = tiny_lm();
  auto batch = prompts();
  auto sample = peft::GenerationOptions().max_new_tokens(12).do_sample(true).temperature(2.0).seed(7);
  torch::Tensor a = peft::generate(lm, batch.input_ids, batch.attention_mask, sample);
  torch::Tensor b = peft::generate(lm, batch.input_ids, batch.attention_mask, sample);
  EXPECT_TRUE(torch::equal(a, b));
  torch::Tensor other = peft::generate(lm, batch.input_ids, batch.attention_mask, sample.seed(8));
  EXPECT_FALSE(torch::equal(a, other)) << "a different seed should sample differently at temperature 2";
  EXPECT_EQ(a.sizes(), (std::vector<int64_t>{3, 6 + 12}));
  EXPECT_TRUE(torch::equal(a.narrow(1, 0, 6), batch.input_ids)) << "the prompts are kept";

  torch::Tensor greedy = peft::generate(lm, batch.input_ids, batch.attention_mask, peft::GenerationOptions().max_new_tokens(12));
  torch::Tensor top1 = peft::generate(lm, batch.input_ids, batch.attention_mask, sample.top_k(1));
  EXPECT_TRUE(torch::equal(greedy, top1));
}

TEST(Generate, MergedAndUnmergedAdaptersDecodeTheSame) {
  peft::PeftModel model = lora_lm();
  const auto greedy = peft::GenerationOptions().max_new_tokens(16).use_cache(false);
  torch::Tensor unmerged = run(model, greedy);
  torch::jit::Module base_tokens = tiny_lm();
  auto batch = prompts();
  EXPECT_FALSE(torch::equal(unmerged, peft::generate(base_tokens, batch.input_ids, batch.attention_mask, greedy)))
      << "the adapter should change the continuation";
  torch::jit::Module merged = model.merge_and_unload();
  EXPECT_TRUE(torch::equal(unmerged, peft::generate(merged, batch.input_ids, batch.attention_mask, greedy)));
}

TEST(Generate, CachedAndUncachedGiveTheSameTokens) {
  auto greedy = peft::GenerationOptions().max_new_tokens(16);
  auto sampled = peft::GenerationOptions().max_new_tokens(16).do_sample(true).top_p(0.9).repetition_penalty(1.3).seed(5);
  torch::jit::Module lm = tiny_lm();
  auto batch = prompts();
  for (const auto& o : {greedy, sampled}) {
    EXPECT_TRUE(torch::equal(peft::generate(lm, batch.input_ids, batch.attention_mask, o),
                             peft::generate(lm, batch.input_ids, batch.attention_mask,
                                            peft::GenerationOptions(o).use_cache(false))));
    peft::PeftModel lora = lora_lm();  // cached: merged for the call
    EXPECT_TRUE(torch::equal(run(lora, o), run(lora, peft::GenerationOptions(o).use_cache(false))));
    peft::PeftModel prefix = prefix_lm();  // cached: the prefix is the initial past
    EXPECT_TRUE(torch::equal(run(prefix, o), run(prefix, peft::GenerationOptions(o).use_cache(false))));
  }
}

TEST(Generate, CachedLoraLeavesTheBaseWeightsExactlyAsTheyWere) {
  peft::PeftModel model = lora_lm();
  std::vector<torch::Tensor> before;
  for (const auto& p : model.base_model().parameters()) before.push_back(p.clone());
  run(model, peft::GenerationOptions().max_new_tokens(8));
  EXPECT_FALSE(model.merged());
  size_t i = 0;
  for (const auto& p : model.base_model().parameters()) EXPECT_TRUE(torch::equal(p, before[i++]));
}

TEST(Generate, LeftPaddingDoesNotChangeAContinuation) {
  torch::jit::Module lm = tiny_lm();
  auto batch = prompts();
  auto greedy = peft::GenerationOptions().max_new_tokens(10);
  torch::Tensor together = peft::generate(lm, batch.input_ids, batch.attention_mask, greedy);
  auto alone = peft::left_pad({{40, 41}}, 0);
  torch::Tensor single = peft::generate(lm, alone.input_ids, alone.attention_mask, greedy);
  EXPECT_TRUE(torch::equal(together[1].narrow(0, 4, 12), single[0]));
}

TEST(Generate, StopTokensEndASequenceAndPadTheRest) {
  torch::jit::Module lm = tiny_lm();
  auto batch = prompts();
  torch::Tensor free_run = peft::generate(lm, batch.input_ids, batch.attention_mask, peft::GenerationOptions().max_new_tokens(10));
  const int64_t stop = free_run[0][6 + 2].item<int64_t>();  // the third token row 0 generates
  torch::Tensor stopped = peft::generate(lm, batch.input_ids, batch.attention_mask,
                                         peft::GenerationOptions().max_new_tokens(10).stop_tokens({stop}).pad_token_id(63));
  const auto row = stopped[0];
  int64_t at = -1;
  for (int64_t i = 6; i < row.size(0); ++i)
    if (row[i].item<int64_t>() == stop) {
      at = i;
      break;
    }
  ASSERT_GE(at, 6);
  EXPECT_TRUE(torch::equal(row.narrow(0, 6, at - 5), free_run[0].narrow(0, 6, at - 5)));
  for (int64_t i = at + 1; i < row.size(0); ++i) EXPECT_EQ(row[i].item<int64_t>(), 63);
}

TEST(Generate, ProcessorsKeepWhatTopKAndTopPAllow) {
  torch::Tensor scores = torch::log(torch::tensor({{0.5f, 0.3f, 0.15f, 0.05f}}));
  torch::Tensor seq = torch::zeros({1, 1}, torch::kLong);
  auto sampling = peft::GenerationOptions().do_sample(true);
  auto finite = [](const torch::Tensor& s) { return torch::isfinite(s).sum().item<int64_t>(); };
  EXPECT_EQ(finite(peft::detail::process_scores(scores, seq, sampling.top_k(2))), 2);
  EXPECT_EQ(finite(peft::detail::process_scores(scores, seq, sampling.top_p(0.7))), 2);  // 0.5 < 0.7 <= 0.8
  EXPECT_EQ(finite(peft::detail::process_scores(scores, seq, sampling.top_p(0.4))), 1);
  // Repetition penalty divides a positive logit of a seen token and multiplies a negative one.
  torch::Tensor mixed = torch::tensor({{2.0f, -2.0f, 1.0f}});
  torch::Tensor seen = torch::tensor({{0, 1}}, torch::kLong);
  auto penalised = peft::detail::process_scores(mixed, seen, peft::GenerationOptions().repetition_penalty(2.0));
  EXPECT_TRUE(torch::allclose(penalised, torch::tensor({{1.0f, -4.0f, 1.0f}})));
}

TEST(Generate, BadOptionsAndInputsNameTheCulprit) {
  torch::jit::Module lm = tiny_lm();
  auto batch = prompts();
  expect_error<peft::OptionError>(
      [&] { peft::generate(lm, batch.input_ids, batch.attention_mask, peft::GenerationOptions().temperature(0)); },
      {"GenerationOptions.temperature"});
  expect_error<peft::OptionError>(
      [&] { peft::generate(lm, batch.input_ids, batch.attention_mask, peft::GenerationOptions().top_p(1.5)); },
      {"GenerationOptions.top_p"});
  expect_error<peft::ShapeError>(
      [&] { peft::generate(lm, batch.input_ids, batch.attention_mask.narrow(1, 0, 2)); }, {"attention_mask"});
  expect_error<peft::ShapeError>([&] { peft::left_pad({{1}, {}}, 0); }, {"prompt 1 is empty"});
}

TEST(Generate, PromptTuningReRunsForwardAndKeepsTheSequenceLength) {
  // The blocks of this export call a helper method (self.mlp): only their forward calls are the stack.
  torch::manual_seed(5);
  peft::PeftModel model = peft::get_peft_model(tiny_lm(), peft::PromptTuningConfig().num_virtual_tokens(4));
  auto batch = prompts();
  torch::Tensor logits = model.forward({batch.input_ids, batch.attention_mask}).toTensor();
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{3, 6, 64}));
  torch::Tensor base_logits = tiny_lm().forward({batch.input_ids, batch.attention_mask}).toTensor();
  EXPECT_FALSE(torch::allclose(logits, base_logits)) << "the prompt should change the output";
  torch::Tensor out = run(model, peft::GenerationOptions().max_new_tokens(5));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{3, 11}));
}

}  // namespace
