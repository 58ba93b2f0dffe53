#pragma once
/// @file
/// Data-parallel training of the trainable tensors only: rank 0's values are
/// broadcast at the start, and after each backward the gradients are averaged
/// across ranks, flattened into buckets. With PEFT that is ≈1 % of the model's
/// bytes per step; frozen weights never cross the network.

#include <ATen/CPUGeneratorImpl.h>
#include <peft/distributed/process_group.h>

#include <numeric>
#include <vector>

namespace peft {
namespace distributed {

/// Options of DataParallel.
///
/// ```
/// peft::distributed::DataParallel dp(group, params, peft::distributed::DataParallelOptions().accumulation_steps(4));
/// ```
struct DataParallelOptions {
  /// Gradients are all-reduced in flat buckets of at most this many bytes (DDP: 25 MiB).
  TORCH_ARG(int64_t, bucket_bytes) = 25 * 1024 * 1024;
  /// after_backward() communicates on every k-th call only (gradient accumulation);
  /// divide the loss by k as usual.
  TORCH_ARG(int64_t, accumulation_steps) = 1;
};

/// Keeps `parameters` identical across the ranks of `group` (which must outlive it).
///
/// ```
/// auto group = peft::distributed::ProcessGroup::from_env();
/// peft::distributed::DataParallel dp(group, model.trainable_parameters());   // broadcasts rank 0's values
/// for (auto& batch : my_shard) {
///   loss(batch).backward();
///   if (dp.after_backward()) { opt.step(); opt.zero_grad(); }               // averaged gradients
/// }
/// ```
class DataParallel {
 public:
  /// Takes the parameters to keep in sync and broadcasts rank 0's values to every rank.
  DataParallel(const ProcessGroup& group, std::vector<torch::Tensor> parameters, DataParallelOptions options = {})
      : group_(&group), parameters_(std::move(parameters)), options_(options) {
    check<OptionError>(options.bucket_bytes() > 0, "DataParallelOptions.bucket_bytes must be > 0, got {}",
                       options.bucket_bytes());
    check<OptionError>(options.accumulation_steps() >= 1, "DataParallelOptions.accumulation_steps must be >= 1, got {}",
                       options.accumulation_steps());
    check<OptionError>(!parameters_.empty(), "DataParallel: no trainable parameters to keep in sync");
    for (const auto& p : parameters_) bytes_per_sync_ += p.numel() * p.element_size();
    broadcast_parameters();
  }

  /// Call after each backward(): on the last micro-step of an accumulation it
  /// averages the gradients across ranks and returns true (time to step the
  /// optimizer); otherwise it returns false without communicating.
  bool after_backward() {
    if (++micro_step_ % options_.accumulation_steps() != 0) return false;
    synchronize_gradients();
    return true;
  }

  /// Averages every parameter's gradient across the ranks now (missing gradients count as zero).
  void synchronize_gradients() {
    torch::NoGradGuard no_grad;
    for (const auto& bucket : buckets()) {
      std::vector<torch::Tensor> grads;
      for (size_t i : bucket) {
        torch::Tensor& p = parameters_[i];
        if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
        grads.push_back(p.grad());
      }
      std::vector<torch::Tensor> flat{flatten(grads)};
      group_->wait(group_->collectives()->allreduce(flat), "all-reduce of the trainable gradients");
      flat[0].div_(group_->world_size());
      unflatten(flat[0], grads);
      bytes_reduced_ += flat[0].numel() * flat[0].element_size();
    }
  }

  /// Bytes one synchronisation all-reduces: exactly the trainable parameters' bytes.
  int64_t bytes_per_sync() const { return bytes_per_sync_; }
  /// Bytes all-reduced so far.
  int64_t bytes_reduced() const { return bytes_reduced_; }
  /// The synchronised parameters.
  const std::vector<torch::Tensor>& parameters() const { return parameters_; }

 private:
  /// Rank 0's values everywhere, so every rank starts from the same adapter.
  void broadcast_parameters() {
    torch::NoGradGuard no_grad;
    for (const auto& bucket : buckets()) {
      std::vector<torch::Tensor> values;
      for (size_t i : bucket) values.push_back(parameters_[i]);
      std::vector<torch::Tensor> flat{flatten(values)};
      group_->wait(group_->collectives()->broadcast(flat), "broadcast of the trainable parameters from rank 0");
      unflatten(flat[0], values);
    }
  }

  /// Parameter indices grouped into buckets of one dtype and device, at most bucket_bytes each.
  std::vector<std::vector<size_t>> buckets() const {
    std::vector<std::vector<size_t>> out;
    int64_t filled = 0;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const torch::Tensor& p = parameters_[i];
      const int64_t bytes = p.numel() * p.element_size();
      const bool fits = !out.empty() && filled + bytes <= options_.bucket_bytes() &&
                        parameters_[out.back().front()].options().type_equal(p.options()) &&
                        parameters_[out.back().front()].device() == p.device();
      if (!fits) out.emplace_back(), filled = 0;
      out.back().push_back(i);
      filled += bytes;
    }
    return out;
  }

  static torch::Tensor flatten(const std::vector<torch::Tensor>& tensors) {
    std::vector<torch::Tensor> flat;
    for (const auto& t : tensors) flat.push_back(t.reshape({-1}));
    return torch::cat(flat);
  }

  static void unflatten(const torch::Tensor& flat, std::vector<torch::Tensor>& into) {
    int64_t offset = 0;
    for (auto& t : into) {
      t.copy_(flat.narrow(0, offset, t.numel()).view_as(t));
      offset += t.numel();
    }
  }

  const ProcessGroup* group_;
  std::vector<torch::Tensor> parameters_;
  DataParallelOptions options_;
  int64_t bytes_per_sync_ = 0, bytes_reduced_ = 0, micro_step_ = 0;
};

/// Options of shard().
///
/// ```
/// auto mine = peft::distributed::shard(n, rank, world, peft::distributed::ShardOptions().seed(1).epoch(e));
/// ```
struct ShardOptions {
  /// Shuffle with `seed + epoch` (the same permutation on every rank).
  TORCH_ARG(bool, shuffle) = true;
  /// Seed of the shuffle; every rank must use the same.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Epoch number, mixed into the seed so every epoch has a new order.
  TORCH_ARG(int64_t, epoch) = 0;
  /// Drop the tail that does not divide by the world size (else pad by repeating the start).
  TORCH_ARG(bool, drop_last) = false;
};

/// The dataset indices rank `rank` of `world_size` takes, as PyTorch's
/// DistributedSampler: a common permutation, padded (or cut) to a multiple of
/// the world size, then every world_size-th index from `rank`. Consecutive
/// per-rank batches of B/world then make up global batches of B in order.
///
/// ```
/// auto mine = peft::distributed::shard(dataset.size(), group.rank(), group.world_size(),
///                                      peft::distributed::ShardOptions().epoch(epoch));
/// ```
inline std::vector<int64_t> shard(int64_t size, int rank, int world_size, const ShardOptions& options = {}) {
  check<OptionError>(size >= 0 && world_size >= 1 && rank >= 0 && rank < world_size,
                     "shard: need 0 <= rank < world_size and size >= 0, got rank {}, world_size {}, size {}", rank,
                     world_size, size);
  std::vector<int64_t> order(static_cast<size_t>(size));
  if (options.shuffle()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed() + static_cast<uint64_t>(options.epoch()));
    torch::Tensor perm = torch::randperm(size, gen, torch::kLong);
    std::copy(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + size, order.begin());
  } else {
    std::iota(order.begin(), order.end(), 0);
  }
  const int64_t total = options.drop_last() ? size / world_size * world_size
                                            : (size + world_size - 1) / world_size * world_size;
  for (int64_t i = size; i < total && size > 0; ++i) order.push_back(order[static_cast<size_t>(i - size)]);
  std::vector<int64_t> mine;
  for (int64_t i = rank; i < total; i += world_size) mine.push_back(order[static_cast<size_t>(i)]);
  return mine;
}

}  // namespace distributed
}  // namespace peft
