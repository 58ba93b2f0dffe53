#pragma once
// Tokenised emails in padded batches, and the metrics the examples report.
#include <peft/peft.h>

#include <functional>
#include <vector>

#include "common/spam_data.h"
#include "common/use_tokenizer.h"

namespace peft_examples {

struct Batch {
  torch::Tensor ids, mask, labels;

  /// Rank `rank`'s share of the rows (data-parallel training).
  Batch rows_of(int rank, int world) const {
    const int64_t n = labels.size(0) / world;
    return {ids.narrow(0, rank * n, n), mask.narrow(0, rank * n, n), labels.narrow(0, rank * n, n)};
  }
};

/// Token ids of every email, truncated to `max_tokens`, in fixed-size padded batches.
inline std::vector<Batch> make_batches(const std::vector<Email>& emails,
                                const UseTokenizer& tokenizer, int64_t max_tokens, int64_t batch_size) {
  std::vector<Batch> batches;
  for (size_t start = 0; start < emails.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(emails.size(), start + static_cast<size_t>(batch_size));
    std::vector<std::vector<int64_t>> ids;
    int64_t longest = 1;
    for (size_t i = start; i < end; ++i) {
      auto seq = tokenizer.encode(emails[i].text);
      if (static_cast<int64_t>(seq.size()) > max_tokens) seq.resize(static_cast<size_t>(max_tokens));
      longest = std::max<int64_t>(longest, static_cast<int64_t>(seq.size()));
      ids.push_back(std::move(seq));
    }
    Batch b{torch::zeros({static_cast<int64_t>(ids.size()), longest}, torch::kLong), {}, {}};
    b.mask = torch::zeros_like(b.ids);
    std::vector<int64_t> labels;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!ids[i].empty()) {
        b.ids[static_cast<int64_t>(i)].narrow(0, 0, static_cast<int64_t>(ids[i].size())).copy_(torch::tensor(ids[i]));
        b.mask[static_cast<int64_t>(i)].narrow(0, 0, static_cast<int64_t>(ids[i].size())).fill_(1);
      }
      labels.push_back(emails[start + i].label);
    }
    b.labels = torch::tensor(labels);
    batches.push_back(std::move(b));
  }
  return batches;
}

/// Batches of the emails whose corpus folder (Email::group) `keep` accepts.
template <typename Keep>
std::vector<Batch> make_batches_if(const std::vector<Email>& emails, const UseTokenizer& tokenizer, int64_t max_tokens,
                                   int64_t batch_size, Keep keep) {
  std::vector<Email> chosen;
  std::copy_if(emails.begin(), emails.end(), std::back_inserter(chosen), [&](const Email& e) { return keep(e.group); });
  return make_batches(chosen, tokenizer, max_tokens, batch_size);
}

struct Metrics {
  double accuracy = 0, precision = 0, recall = 0, f1 = 0;
};

inline Metrics evaluate(const std::function<torch::Tensor(const Batch&)>& logits_of, const std::vector<Batch>& batches) {
  torch::NoGradGuard no_grad;
  int64_t tp = 0, fp = 0, fn = 0, correct = 0, total = 0;
  for (const auto& b : batches) {
    torch::Tensor predicted = logits_of(b).argmax(1);
    tp += (predicted.eq(1) & b.labels.eq(1)).sum().item<int64_t>();
    fp += (predicted.eq(1) & b.labels.eq(0)).sum().item<int64_t>();
    fn += (predicted.eq(0) & b.labels.eq(1)).sum().item<int64_t>();
    correct += predicted.eq(b.labels).sum().item<int64_t>();
    total += b.labels.size(0);
  }
  Metrics m;
  m.accuracy = static_cast<double>(correct) / std::max<int64_t>(total, 1);
  m.precision = tp + fp ? static_cast<double>(tp) / (tp + fp) : 0;
  m.recall = tp + fn ? static_cast<double>(tp) / (tp + fn) : 0;
  m.f1 = m.precision + m.recall > 0 ? 2 * m.precision * m.recall / (m.precision + m.recall) : 0;
  return m;
}

}  // namespace peft_examples
