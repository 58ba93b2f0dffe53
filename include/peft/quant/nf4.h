#pragma once
/// @file
/// 4-bit NormalFloat (NF4) blockwise quantisation, bit-compatible with
/// bitsandbytes (Dettmers et al. 2023): the QLoRA base-weight format.
///
/// Layout (bitsandbytes' `quantize_4bit(quant_type="nf4")`): the flattened
/// weight in blocks of `blocksize`, one fp32 absmax per block, each element
/// x·(1/absmax) mapped to one of 16 NF4 codes, two indices per byte with the
/// first element in the high nibble. Double quantisation
/// (`compress_statistics=True`): offset = mean(absmax), and absmax − offset
/// quantised blockwise (block 256) to 8 bits with bitsandbytes' signed dynamic map.
///
/// The bytes follow bitsandbytes' CUDA kernel (csrc/kernels.cu:
/// kQuantizeBlockwise[Small] with dQuantizeNF4, and dQuantize<0> for the 8-bit
/// map) step by step: the kernel's fp32 thresholds, multiplication by the
/// reciprocal, zero padding, flush-to-zero of denormals (it is built with
/// --use_fast_math). Two things can still differ: the GPU's approximate
/// reciprocal (we use the correctly rounded 1/absmax; ≤ 1 ulp apart) and
/// offset = mean(), whose rounding follows torch's reduction on the device.

#include <peft/core/error.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace peft {

/// Options of NF4 quantisation (QLoRA's frozen base).
///
/// ```
/// auto cfg = peft::LoraConfig().r(16).target_modules("all-linear")
///                .quantize_base(peft::NF4Config().blocksize(64).double_quant(true));
/// ```
struct NF4Config {
  /// Elements per absmax block: a power of two in [32, 4096] (bitsandbytes: 64).
  TORCH_ARG(int64_t, blocksize) = 64;
  /// Quantise the absmax values too (≈ 4.127 instead of 4.5 bits per weight at block 64).
  TORCH_ARG(bool, double_quant) = true;
  /// The dtype the weight is dequantised to and the layer computes in; the
  /// weight's own dtype when unset (bitsandbytes' bnb_4bit_compute_dtype).
  TORCH_ARG(c10::optional<torch::ScalarType>, compute_dtype) = c10::nullopt;
  /// TorchScript models: quantise every frozen linear layer (but the output
  /// head and modules_to_save), not only the LoRA targets.
  TORCH_ARG(bool, quantize_all_linear) = false;
  /// merge_adapter(): re-quantise W + ΔW to NF4 (lossy, warns) instead of
  /// keeping the merged weight dense in the compute dtype.
  TORCH_ARG(bool, requantize_on_merge) = false;

 public:  // TORCH_ARG leaves the section private
  /// Throws OptionError naming `where` for a block size or compute dtype bitsandbytes does not support.
  void validate(const std::string& where) const {
    const bool power_of_two = blocksize_ > 0 && (blocksize_ & (blocksize_ - 1)) == 0;
    check<OptionError>(power_of_two && blocksize_ >= 32 && blocksize_ <= 4096,
                       "{}: NF4Config.blocksize must be a power of two in [32, 4096], got {}", where, blocksize_);
    if (compute_dtype_)
      check<OptionError>(c10::isFloatingType(*compute_dtype_), "{}: NF4Config.compute_dtype must be a floating type, got {}",
                         where, c10::toString(*compute_dtype_));
  }
};

namespace nf4 {

/// Block size of the double quantisation (fixed in bitsandbytes).
constexpr int64_t kNestedBlocksize = 256;

/// The 16 NF4 values (bitsandbytes' create_normal_map(offset=0.9677083)), ascending.
inline const torch::Tensor& code() {
  static const std::vector<float> values{
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
      0.7229568362236023f, 1.0f};
  static const torch::Tensor table = torch::tensor(values);  // built once: dequantisation runs every forward
  return table;
}

/// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
/// 256 ascending values in [-1, 1], for the double-quantised absmax.
namespace detail {
/// create_dynamic_map's computation (see dynamic_code()).
inline torch::Tensor make_dynamic_code() {
  constexpr int64_t exponent_bits = 7;
  std::vector<float> data;
  for (int64_t i = 0; i < exponent_bits; ++i) {
    const int64_t fraction_items = (int64_t{1} << i) + 1;
    torch::Tensor bounds = torch::linspace(0.1, 1.0, fraction_items);
    torch::Tensor means = (bounds.slice(0, 0, -1) + bounds.slice(0, 1)) / 2.0;
    const double scale = std::pow(10.0, static_cast<double>(-(exponent_bits - 1) + i));
    for (double sign : {1.0, -1.0}) {
      torch::Tensor part = (sign * scale) * means;
      data.insert(data.end(), part.data_ptr<float>(), part.data_ptr<float>() + part.numel());
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  return torch::tensor(data);
}
}  // namespace detail

/// The 256-value dynamic code book that double quantisation stores absmax values in.
inline const torch::Tensor& dynamic_code() {
  static const torch::Tensor table = detail::make_dynamic_code();  // built once: dequantisation runs every forward
  return table;
}

namespace detail {
/// fp32 denormals as zero: bitsandbytes builds its kernels with --use_fast_math,
/// which flushes denormal operands and results to zero (ftz).
inline torch::Tensor flush_denormals(const torch::Tensor& t) {
  return t.masked_fill(t.abs() < std::numeric_limits<float>::min(), 0);
}

/// kQuantizeBlockwise's prologue (bitsandbytes csrc/kernels.cu) for a flat fp32
/// tensor: {x·(1/absmax) [blocks, blocksize], absmax [blocks]}. The last block is
/// padded with 0.0 as the kernel loads it, so a pad element scales to 0 (or to
/// NaN = 0·inf in an all-zero block). The kernel multiplies by the reciprocal,
/// it does not divide: x/absmax can round differently.
inline std::pair<torch::Tensor, torch::Tensor> scale_by_absmax(const torch::Tensor& flat, int64_t blocksize) {
  const int64_t n = flat.numel(), blocks = (n + blocksize - 1) / blocksize;
  torch::Tensor padded =
      torch::constant_pad_nd(flush_denormals(flat), {0, blocks * blocksize - n}, 0).view({blocks, blocksize});
  torch::Tensor absmax = padded.abs().amax(1);
  // Correctly rounded 1/absmax; the GPU's rcp.approx (fast math) may differ by 1 ulp.
  torch::Tensor reciprocal = flush_denormals(absmax.reciprocal());
  return {padded * reciprocal.unsqueeze(1), absmax};
}
}  // namespace detail

/// The 15 decision thresholds of bitsandbytes' dQuantizeNF4 (csrc/kernels.cu),
/// ascending, as the kernel's own fp32 literals (not derived from code(): the
/// fp32 midpoints of the code book are other floats at −0.848…, 0.1202…, 0.5016…
/// and 0.8614…, which puts a value on such a threshold in the other code).
inline const torch::Tensor& nf4_thresholds() {
  static const torch::Tensor table = torch::tensor(std::vector<float>{
      -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
      0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
      0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f});
  return table;
}

/// bitsandbytes' dQuantizeNF4 (csrc/kernels.cu) on every element: its comparison
/// tree of strict `x > t` tests on ascending thresholds picks the number of
/// thresholds that x exceeds, a value exactly on a threshold staying below it.
/// NaN (an all-zero block: 0·inf) fails every test: index 0.
inline torch::Tensor nf4_index(const torch::Tensor& scaled) {
  // bucketize(right=false) counts the boundaries strictly below x.
  torch::Tensor index = torch::bucketize(scaled, nf4_thresholds().to(scaled.device()), /*out_int32=*/true);
  return index.masked_fill_(scaled.isnan(), 0).to(torch::kUInt8);
}

/// bitsandbytes' dQuantize<0> (csrc/kernels.cu) on every element of `x` at once,
/// for the ascending 256-entry `table`: a binary search from pivot 127 in steps
/// 64…1 (`x > table[pivot]` goes up), then the nearer of the final pivot and its
/// neighbour by the fp32 midpoint. The final pivot is always even and a value on
/// a midpoint keeps it, so ties go to the even index (not always the lower one).
/// NaN goes down every step: index 0.
inline torch::Tensor dynamic_index(const torch::Tensor& x, const torch::Tensor& table) {
  torch::Tensor pivot = torch::full_like(x, 127, torch::kLong);
  torch::Tensor lower_pivot = torch::zeros_like(pivot), upper_pivot = torch::full_like(pivot, 255);
  torch::Tensor val = table.take(pivot);
  for (int64_t step = 64; step > 0; step >>= 1) {
    torch::Tensor up = x > val;
    lower_pivot = torch::where(up, pivot, lower_pivot);
    upper_pivot = torch::where(up, upper_pivot, pivot);
    pivot = pivot + (up.to(torch::kLong) * (2 * step) - step);
    val = table.take(pivot);
  }
  // The kernel's `lower`/`upper` start at -1/1 and are replaced by table[0]/table[255]
  // when never set, so they always equal table[lower_pivot]/table[upper_pivot].
  torch::Tensor above = torch::where(x > (table.take(upper_pivot) + val) * 0.5, upper_pivot, pivot);
  torch::Tensor below = torch::where(x < (table.take(lower_pivot) + val) * 0.5, lower_pivot, pivot);
  return torch::where(x > val, above, below).to(torch::kUInt8);
}

/// `values` [n] times the absmax of their block, as bitsandbytes dequantises.
/// (Fresh `values` are scaled in place: dequantisation runs in every forward, so
/// it keeps its temporaries few.)
inline torch::Tensor scale_blocks(torch::Tensor values, const torch::Tensor& absmax, int64_t blocksize, int64_t n) {
  const int64_t padding = absmax.numel() * blocksize - values.numel();
  if (padding > 0) values = torch::constant_pad_nd(values, {0, padding}, 0);
  return values.view({-1, blocksize}).mul_(absmax.unsqueeze(1)).flatten().slice(0, 0, n);
}

/// The NF4 value pair of every byte: [256, 2] = (code[b >> 4], code[b & 15]).
inline const torch::Tensor& code_pairs() {
  static const torch::Tensor pairs = [] {
    torch::Tensor bytes = torch::arange(256, torch::kLong);
    return torch::stack({code().index_select(0, bytes.div(16, "floor")), code().index_select(0, bytes.remainder(16))}, 1);
  }();
  return pairs;
}

/// A weight in NF4 (bitsandbytes' QuantState, quant_type "nf4").
///
/// ```
/// peft::nf4::Quantized q = peft::nf4::quantize(weight, peft::NF4Config().blocksize(64));
/// torch::Tensor approx = peft::nf4::dequantize(q);   // within nf4::error_bound
/// ```
struct Quantized {
  torch::Tensor packed;         ///< uint8 [ceil(n/2)]: two 4-bit indices per byte, first in the high nibble
  torch::Tensor absmax;         ///< fp32 [blocks]; uint8 [blocks] with double quantisation
  torch::Tensor nested_absmax;  ///< double quantisation: fp32 [ceil(blocks/256)]
  torch::Tensor nested_offset;  ///< double quantisation: fp32 scalar, mean of the absmax values
  /// Shape of the original weight.
  std::vector<int64_t> shape;
  /// Weights per absmax block.
  int64_t blocksize = 64;
  torch::ScalarType dtype = torch::kFloat;  ///< what dequantize() returns

  /// Whether the absmax values are themselves quantised.
  bool double_quant() const { return nested_absmax.defined(); }
  /// Elements of the original weight.
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  /// Bytes of the stored state (packed indices, absmax and nested statistics).
  int64_t bytes() const {
    int64_t b = packed.numel() + absmax.numel() * absmax.element_size();
    if (double_quant()) b += nested_absmax.numel() * 4 + 4;
    return b;
  }
};

/// Quantises `weight` (any float dtype, any device) to NF4.
///
/// ```
/// peft::nf4::Quantized q = peft::nf4::quantize(linear->weight, peft::NF4Config());
/// torch::Tensor w = peft::nf4::dequantize(q);   // |w - W| <= absmax · (max NF4 gap / 2) per block
/// ```
inline Quantized quantize(const torch::Tensor& weight, const NF4Config& config) {
  config.validate("nf4::quantize");
  check<ShapeError>(weight.is_floating_point() && weight.numel() > 0,
                    "nf4::quantize: expected a non-empty floating-point weight, got {} of {} elements",
                    c10::toString(weight.scalar_type()), weight.numel());
  torch::NoGradGuard no_grad;
  Quantized q;
  q.shape = weight.sizes().vec();
  q.blocksize = config.blocksize();
  q.dtype = config.compute_dtype().value_or(weight.scalar_type());
  const int64_t n = weight.numel();
  torch::Tensor scaled;
  std::tie(scaled, q.absmax) = detail::scale_by_absmax(weight.detach().to(torch::kFloat).flatten(), q.blocksize);
  // Pairs of indices, first in the high nibble; the pad element of an odd n is the kernel's.
  torch::Tensor pairs = nf4_index(scaled).view({-1, 2});
  q.packed = pairs.select(1, 0).bitwise_left_shift(4).bitwise_or(pairs.select(1, 1)).slice(0, 0, (n + 1) / 2);
  if (config.double_quant()) {  // bitsandbytes' quantize_4bit(compress_statistics=True)
    q.nested_offset = q.absmax.mean();
    torch::Tensor nested_scaled;
    std::tie(nested_scaled, q.nested_absmax) = detail::scale_by_absmax(q.absmax - q.nested_offset, kNestedBlocksize);
    const int64_t blocks = q.absmax.numel();
    q.absmax = dynamic_index(nested_scaled, dynamic_code().to(weight.device())).flatten().slice(0, 0, blocks);
  }
  return q;
}

/// The fp32 absmax of every block (undoing the double quantisation).
inline torch::Tensor absmax_values(const Quantized& q) {
  if (!q.double_quant()) return q.absmax;
  torch::Tensor table = dynamic_code().to(q.absmax.device());
  return scale_blocks(table.index_select(0, q.absmax.to(torch::kInt)), q.nested_absmax, kNestedBlocksize,
                      q.absmax.numel()) +
         q.nested_offset;
}

/// A copy of `q` with its own tensors (to restore after a re-quantising merge).
inline Quantized deep_copy(const Quantized& q) {
  Quantized copy = q;
  for (auto* t : {&copy.packed, &copy.absmax, &copy.nested_absmax, &copy.nested_offset})
    if (t->defined()) *t = t->clone();
  return copy;
}

/// Copies `from`'s values into `to`'s tensors in place (same sizes: `to` may be registered buffers).
inline void copy_values(Quantized& to, const Quantized& from) {
  to.packed.copy_(from.packed);
  to.absmax.copy_(from.absmax);
  if (from.double_quant()) to.nested_absmax.copy_(from.nested_absmax), to.nested_offset.copy_(from.nested_offset);
}

/// `weight` quantised with the blocksize and double quantisation of `like`.
inline Quantized quantize_like(const torch::Tensor& weight, const Quantized& like) {
  return quantize(weight, NF4Config().blocksize(like.blocksize).double_quant(like.double_quant()));
}

/// The weight back in `q.dtype`: code[index] · absmax of its block.
inline torch::Tensor dequantize(const Quantized& q) {
  torch::Tensor values = code_pairs().to(q.packed.device()).index_select(0, q.packed.to(torch::kInt)).flatten();
  return scale_blocks(values, absmax_values(q), q.blocksize, q.numel()).view(q.shape).to(q.dtype);
}

namespace detail {

/// x·Wᵀ + b (x·W + b with `fan_in_fan_out`) for W = dequantize(q), saving only the 4-bit
/// state: backward dequantises again for the input's gradient (bitsandbytes' MatMul4Bit).
/// (LibTorch 1.13's Function::apply takes no undefined tensors: no bias is an empty one.)
struct NF4LinearFunction : torch::autograd::Function<NF4LinearFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& bias,
                               const Quantized& q, bool has_bias, bool fan_in_fan_out) {
    ctx->saved_data["packed"] = q.packed;
    ctx->saved_data["absmax"] = q.absmax;
    if (q.double_quant()) {
      ctx->saved_data["nested_absmax"] = q.nested_absmax;
      ctx->saved_data["nested_offset"] = q.nested_offset;
    }
    ctx->saved_data["shape"] = q.shape;
    ctx->saved_data["blocksize"] = q.blocksize;
    ctx->saved_data["dtype"] = static_cast<int64_t>(q.dtype);
    ctx->saved_data["fan_in_fan_out"] = fan_in_fan_out;
    const torch::Tensor W = dequantize(q), b = has_bias ? bias : torch::Tensor();
    if (!fan_in_fan_out) return torch::nn::functional::linear(x, W, b);
    if (!has_bias) return torch::matmul(x, W);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = W.size(1);
    return torch::addmm(b, x.reshape({-1, W.size(0)}), W).view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad) {
    const torch::Tensor& g = grad[0];
    torch::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      auto& saved = ctx->saved_data;
      Quantized q{saved["packed"].toTensor(), saved["absmax"].toTensor(), {}, {}, saved["shape"].toIntVector(),
                  saved["blocksize"].toInt(), static_cast<torch::ScalarType>(saved["dtype"].toInt())};
      if (saved.count("nested_absmax")) q.nested_absmax = saved["nested_absmax"].toTensor(), q.nested_offset = saved["nested_offset"].toTensor();
      const torch::Tensor W = dequantize(q);
      grad_x = saved["fan_in_fan_out"].toBool() ? torch::matmul(g, W.t()) : torch::matmul(g, W);
    }
    if (ctx->needs_input_grad(1)) grad_bias = g.reshape({-1, g.size(-1)}).sum(0);
    return {grad_x, grad_bias, {}, {}, {}};
  }
};

}  // namespace detail

/// The frozen NF4 linear layer (bitsandbytes' Linear4bit / MatMul4Bit): x [..., in]
/// -> [..., out] = x·Wᵀ + b for W = dequantize(q) [out, in] (with `fan_in_fan_out`,
/// W [in, out] and x·W + b: GPT-2's Conv1D). x and bias in q.dtype. Autograd keeps no
/// dequantised weight: backward dequantises again for x's gradient (W gets none;
/// bias gets one when it requires it), so training holds 4-bit weights only.
///
/// ```
/// torch::Tensor y = peft::nf4::linear(x, q, bias);   // as linear(x, dequantize(q), bias)
/// ```
inline torch::Tensor linear(const torch::Tensor& x, const Quantized& q, const torch::Tensor& bias, bool fan_in_fan_out = false) {
  const torch::Tensor b = bias.defined() ? bias : torch::empty({0}, x.options());
  return detail::NF4LinearFunction::apply(x, b, q, bias.defined(), fan_in_fan_out);
}

/// The largest error NF4 allows for each element of `weight` quantised as `q`:
/// half the widest gap between neighbouring codes (0.1519) times the absmax of
/// its block, plus the error of that absmax after double quantisation.
inline torch::Tensor error_bound(const torch::Tensor& weight, const Quantized& q) {
  torch::Tensor c = code();
  const double half_gap = (c.slice(0, 1) - c.slice(0, 0, -1)).max().item<double>() / 2;
  torch::Tensor flat = weight.detach().to(torch::kFloat).flatten();
  const int64_t n = flat.numel(), blocks = (n + q.blocksize - 1) / q.blocksize;
  torch::Tensor absmax =
      torch::constant_pad_nd(flat, {0, blocks * q.blocksize - n}, 0).view({blocks, q.blocksize}).abs().amax(1);
  torch::Tensor per_block = absmax * half_gap + (absmax_values(q) - absmax).abs();
  return scale_blocks(torch::ones_like(flat), per_block, q.blocksize, n).view(weight.sizes());
}

}  // namespace nf4
}  // namespace peft
