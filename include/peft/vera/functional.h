#pragma once
/// @file
/// VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
/// arXiv:2310.11454) as free functions, written as HF peft computes it
/// (peft/tuners/vera: model.py `_kaiming_init`, `_init_vera_A_vera_B`;
/// layer.py `Linear.forward`, `get_delta_weight`). See docs/notes-vera.md.
///
/// One pair of frozen random projections is shared by every adapted layer of a
/// model: vera_A [r, max_in] and vera_B [max_out, r], with max_in / max_out the
/// largest in / out features over the targeted layers. A layer with (in, out)
/// uses the leading slices A = vera_A[:, :in] and B = vera_B[:out, :], and
/// trains only two vectors, lambda_d [r] and lambda_b [out]:
///
///   y = base(x) + lambda_b ⊙ (B · (lambda_d ⊙ (A · dropout(x))))
///   ΔW = diag(lambda_b) · B · diag(lambda_d) · A          [out, in]
///
/// Golden values: tools/golden_vera.py -> tests/data/golden_vera.pt.

#include <peft/core/error.h>
#include <peft/core/shape.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdint>

namespace peft {
namespace vera {

/// The shared projections of one model: vera_A [r, max_in], vera_B [max_out, r].
struct Projections {
  torch::Tensor A;  ///< vera_A [r, max_in]
  torch::Tensor B;  ///< vera_B [max_out, r]
};

namespace detail {

/// HF's `_kaiming_init` bound for a 2-D tensor with fan_in = size(1), with the
/// same double operations in the same order: sqrt(3) · (sqrt(2) / sqrt(fan_in)).
inline double kaiming_bound(int64_t fan_in) {
  const double std_dev = std::sqrt(2.0) / std::sqrt(static_cast<double>(fan_in));
  return std::sqrt(3.0) * std_dev;
}

inline void check_vector(const torch::Tensor& v, int64_t size, const char* where, const char* what) {
  check<ShapeError>(v.defined() && v.dim() == 1 && v.size(0) == size, "{}: expected {} of shape [{}], got {}", where,
                    what, size, v.defined() ? shape_str(v.sizes()) : std::string("an undefined tensor"));
}

/// Checks A [r, in], B [out, r], lambda_d [r], lambda_b [out], all of one dtype.
inline void check_factors(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& lambda_d,
                          const torch::Tensor& lambda_b, const char* where) {
  check<ShapeError>(A.defined() && A.dim() == 2, "{}: expected A of shape [r, in], got {}", where,
                    A.defined() ? shape_str(A.sizes()) : std::string("an undefined tensor"));
  check<ShapeError>(B.defined() && B.dim() == 2 && B.size(1) == A.size(0),
                    "{}: expected B of shape [out, {}] (r = A.size(0)), got {}", where, A.size(0),
                    B.defined() ? shape_str(B.sizes()) : std::string("an undefined tensor"));
  check_vector(lambda_d, A.size(0), where, "lambda_d");
  check_vector(lambda_b, B.size(0), where, "lambda_b");
  check<ShapeError>(B.scalar_type() == A.scalar_type() && lambda_d.scalar_type() == A.scalar_type() &&
                        lambda_b.scalar_type() == A.scalar_type(),
                    "{}: A, B, lambda_d and lambda_b must share one dtype, got {}, {}, {}, {}", where,
                    c10::toString(A.scalar_type()), c10::toString(B.scalar_type()),
                    c10::toString(lambda_d.scalar_type()), c10::toString(lambda_b.scalar_type()));
}

}  // namespace detail

/// The shared projections exactly as HF peft's `VeraModel._init_vera_A_vera_B`:
/// one CPU generator seeded with `seed` (VeraConfig.projection_prng_key; a
/// negative key wraps to 2^64 + key as torch.Generator.manual_seed does), then
/// vera_A = U(−a, a) of shape [r, max_in] with a = sqrt(6 / max_in), then,
/// from the same generator, vera_B = U(−b, b) of shape [max_out, r] with
/// b = sqrt(6 / r) (HF's `_kaiming_init`: Kaiming-uniform, gain √2, fan_in =
/// size(1)). Drawn in fp32 on the CPU (torch.empty's default dtype, as HF),
/// then moved to `options`' device and dtype where set; the values equal HF's
/// bit for bit under the same LibTorch CPU kernels.
///
/// Throws OptionError unless max_in, max_out and r are >= 1.
///
/// ```
/// auto p = peft::vera::init_projections(4096, 4096, 256, /*seed=*/0, torch::kBFloat16);
/// ```
inline Projections init_projections(int64_t max_in, int64_t max_out, int64_t r, int64_t seed,
                                    const torch::TensorOptions& options = {}) {
  check<OptionError>(r >= 1, "vera::init_projections: r must be >= 1, got {}", r);
  check<OptionError>(max_in >= 1 && max_out >= 1,
                     "vera::init_projections: max_in and max_out must be >= 1, got {} and {}", max_in, max_out);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const auto cpu_fp32 = torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCPU);
  torch::NoGradGuard no_grad;
  torch::Tensor A = torch::empty({r, max_in}, cpu_fp32);
  A.uniform_(-detail::kaiming_bound(max_in), detail::kaiming_bound(max_in), generator);
  torch::Tensor B = torch::empty({max_out, r}, cpu_fp32);
  B.uniform_(-detail::kaiming_bound(r), detail::kaiming_bound(r), generator);
  const auto target = torch::TensorOptions()
                          .device(options.device_opt().value_or(torch::Device(torch::kCPU)))
                          .dtype(options.has_dtype() ? options.dtype() : caffe2::TypeMeta::Make<float>());
  return {A.to(target), B.to(target)};
}

/// vera_A[:, :in]: the leading `in` columns of the shared vera_A [r, max_in]
/// (a view, [r, in]). Throws ShapeError unless vera_A is 2-D with 1 <= in <= max_in.
inline torch::Tensor slice_A(const torch::Tensor& vera_A, int64_t in) {
  check<ShapeError>(vera_A.defined() && vera_A.dim() == 2,
                    "vera::slice_A: expected vera_A of shape [r, max_in], got {}",
                    vera_A.defined() ? shape_str(vera_A.sizes()) : std::string("an undefined tensor"));
  check<ShapeError>(in >= 1 && in <= vera_A.size(1),
                    "vera::slice_A: in must be in [1, {}] (vera_A's max_in), got {}", vera_A.size(1), in);
  return vera_A.narrow(1, 0, in);
}

/// vera_B[:out, :]: the leading `out` rows of the shared vera_B [max_out, r]
/// (a view, [out, r]). Throws ShapeError unless vera_B is 2-D with 1 <= out <= max_out.
inline torch::Tensor slice_B(const torch::Tensor& vera_B, int64_t out) {
  check<ShapeError>(vera_B.defined() && vera_B.dim() == 2,
                    "vera::slice_B: expected vera_B of shape [max_out, r], got {}",
                    vera_B.defined() ? shape_str(vera_B.sizes()) : std::string("an undefined tensor"));
  check<ShapeError>(out >= 1 && out <= vera_B.size(0),
                    "vera::slice_B: out must be in [1, {}] (vera_B's max_out), got {}", vera_B.size(0), out);
  return vera_B.narrow(0, 0, out);
}

/// The adapter's additive output for x [..., in]: [..., out], in HF's order of
/// operations (layer.py `Linear.forward`):
///   lambda_b ⊙ linear(lambda_d ⊙ linear(x, A), B)
/// with A = slice_A(vera_A, in) [r, in], B = slice_B(vera_B, out) [out, r],
/// lambda_d [r], lambda_b [out]. HF applies vera_dropout to x here (not to the
/// base's input): pass dropout(x). All operands must share x's dtype and device
/// (HF casts x to lambda_d's dtype and moves A, B to x's device first).
/// Throws ShapeError on a shape or dtype mismatch.
inline torch::Tensor delta(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                           const torch::Tensor& lambda_d, const torch::Tensor& lambda_b) {
  detail::check_factors(A, B, lambda_d, lambda_b, "vera::delta");
  check_last_dim(x, A.size(1), "vera::delta");
  check<ShapeError>(x.scalar_type() == A.scalar_type(), "vera::delta: x is {} but the adapter is {}",
                    c10::toString(x.scalar_type()), c10::toString(A.scalar_type()));
  return lambda_b * torch::linear(lambda_d * torch::linear(x, A), B);
}

/// ΔW = (lambda_b[:, None] · B) @ (lambda_d[:, None] · A): [out, in], or its
/// transpose [in, out] with fan_in_fan_out (weights stored like GPT-2's
/// Conv1D), as HF's `get_delta_weight`. Like HF, fp16/bf16 factors on the CPU
/// are multiplied in fp32 and the result cast back.
/// Throws ShapeError on a shape or dtype mismatch.
inline torch::Tensor delta_weight(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& lambda_d,
                                  const torch::Tensor& lambda_b, bool fan_in_fan_out = false) {
  detail::check_factors(A, B, lambda_d, lambda_b, "vera::delta_weight");
  const auto dtype = B.scalar_type();
  const bool cast_to_fp32 = B.device().is_cpu() && (dtype == torch::kHalf || dtype == torch::kBFloat16);
  auto f = [&](const torch::Tensor& t) { return cast_to_fp32 ? t.to(torch::kFloat32) : t; };
  torch::Tensor out = torch::matmul(f(lambda_b).unsqueeze(-1) * f(B), f(lambda_d).unsqueeze(-1) * f(A));
  if (fan_in_fan_out) out = out.t();
  return cast_to_fp32 ? out.to(dtype) : out;
}

/// The frozen base plus the adapter: x·Wᵀ + b (x·W + b with fan_in_fan_out) +
/// delta(x, A, B, lambda_d, lambda_b). `bias` may be undefined. No dropout.
inline torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                             const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& lambda_d,
                             const torch::Tensor& lambda_b, bool fan_in_fan_out = false) {
  return torch::linear(x, fan_in_fan_out ? weight.t() : weight, bias) + delta(x, A, B, lambda_d, lambda_b);
}

/// W + ΔW in W's layout (a new tensor; HF's merge adds in place).
inline torch::Tensor merge(const torch::Tensor& weight, const torch::Tensor& A, const torch::Tensor& B,
                           const torch::Tensor& lambda_d, const torch::Tensor& lambda_b, bool fan_in_fan_out = false) {
  return weight + delta_weight(A, B, lambda_d, lambda_b, fan_in_fan_out).to(weight.dtype());
}

/// W − ΔW in W's layout (a new tensor; HF's unmerge subtracts in place).
inline torch::Tensor unmerge(const torch::Tensor& weight, const torch::Tensor& A, const torch::Tensor& B,
                             const torch::Tensor& lambda_d, const torch::Tensor& lambda_b,
                             bool fan_in_fan_out = false) {
  return weight - delta_weight(A, B, lambda_d, lambda_b, fan_in_fan_out).to(weight.dtype());
}

}  // namespace vera
}  // namespace peft
