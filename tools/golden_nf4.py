#!/usr/bin/python3
"""Golden NF4 values: bitsandbytes' CUDA quantisation kernel, step by step, in Python.

    /usr/bin/python3 tools/golden_nf4.py --out tests/data/golden_nf4.pt

An independent scalar transcription (plain Python + torch 1.13, no numpy, no
C++) of bitsandbytes' csrc/kernels.cu as bitsandbytes.functional.quantize_4bit
runs it on CUDA: kQuantizeBlockwise / kQuantizeBlockwiseSmall with dQuantizeNF4
(a comparison tree of strict `x > t` on the kernel's fp32 literals), x =
(float)v * (1.0f / absmax), the last block padded with 0.0, and for
compress_statistics=True offset = absmax.mean() and (absmax - offset) quantised
in blocks of 256 by dQuantize<0> (binary search + fp32 midpoints) over
create_dynamic_map(). The kernel is built with --use_fast_math: denormal fp32
operands and results are flushed to zero here too; its approximate reciprocal
is not modelled (1.0f / absmax is correctly rounded here). Every fp32 operation
is done in fp32 (0-dim float32 tensors); comparisons of fp32 values are exact in
Python floats. tests/test_quant.cpp requires packed bytes, absmax codes and
nested statistics to be bit-identical.
"""
import argparse
import os
import struct
import sys
from fractions import Fraction

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_fixtures import References  # noqa: E402

F32 = torch.float32
FLT_MIN = 2.0 ** -126
FLT_MAX = float(torch.finfo(F32).max)

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


# ------------------------------------------------------------------ fp32 helpers

def bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def from_bits(b):
    return struct.unpack("<f", struct.pack("<I", b))[0]


def next_up(x):
    """The next fp32 above the fp32 value x (finite)."""
    if x == 0:
        return from_bits(1)
    b = bits(x)
    return from_bits(b + 1) if x > 0 else from_bits(b - 1)


def next_down(x):
    return -next_up(-x)


def literal(text):
    """A C float literal ("0.861…f") as the compiler reads it: the decimal rounded
    once to the nearest fp32 (ties to even), via exact fractions."""
    exact = Fraction(text.rstrip("f"))
    c = struct.unpack("<f", struct.pack("<f", float(exact)))[0]
    candidates = [next_down(c), c, next_up(c)]
    return min(candidates, key=lambda v: (abs(Fraction(v) - exact), bits(v) & 1))


def ftz(x):
    """--use_fast_math flushes fp32 denormals to (signed) zero."""
    return 0.0 * x if x == x and abs(x) < FLT_MIN else x


def fmul(a, b):
    return ftz((torch.tensor(a, dtype=F32) * torch.tensor(b, dtype=F32)).item())


def fdiv(a, b):
    return ftz((torch.tensor(a, dtype=F32) / torch.tensor(b, dtype=F32)).item())


def fadd(a, b):
    return ftz((torch.tensor(a, dtype=F32) + torch.tensor(b, dtype=F32)).item())


# ------------------------------------------------------------------ device functions

# dQuantizeNF4's tree as in csrc/kernels.cu: (threshold, if greater, else), leaves are codes.
NF4_TREE = (
    "0.03979014977812767f",
    ("0.3893125355243683f",
     ("0.6427869200706482f", ("0.8614784181118011f", 0b1111, 0b1110), ("0.5016634166240692f", 0b1101, 0b1100)),
     ("0.2035212516784668f", ("0.2920137718319893f", 0b1011, 0b1010), ("0.1202552504837513f", 0b1001, 0b1000))),
    ("-0.33967943489551544f",
     ("-0.13791173323988914f", ("-0.045525018125772476f", 0b0111, 0b0110), ("-0.23460740596055984f", 0b0101, 0b0100)),
     ("-0.6106329262256622f", ("-0.4599952697753906f", 0b0011, 0b0010), ("-0.8480964004993439f", 0b0001, 0b0000))),
)


def _compile(node):
    if isinstance(node, int):
        return node
    text, above, below = node
    return (literal(text), _compile(above), _compile(below))


TREE = _compile(NF4_TREE)


def thresholds(node=TREE):
    if isinstance(node, int):
        return []
    t, above, below = node
    return thresholds(below) + [t] + thresholds(above)


def d_quantize_nf4(x):
    node = TREE
    while not isinstance(node, int):
        t, above, below = node
        node = above if x > t else below  # NaN: always below
    return node


def d_quantize(code, x):
    """dQuantize<0>: code is the 256-entry shared-memory code book (fp32 values)."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = -1.0, 1.0
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = fmul(fadd(upper, val), 0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = fmul(fadd(lower, val), 0.5)
    return lower_pivot if x < midpoint else pivot


def quantize_blocks(values, blocksize, quantize_one):
    """kQuantizeBlockwise: values (list of fp32) -> (codes of the padded blocks, absmax per block)."""
    n = len(values)
    blocks = (n + blocksize - 1) // blocksize
    padded = [ftz(v) for v in values] + [0.0] * (blocks * blocksize - n)  # Load(..., valid_items, 0.0f)
    codes, absmax = [], []
    for b in range(blocks):
        part = padded[b * blocksize:(b + 1) * blocksize]
        local_abs_max = -FLT_MAX
        for v in part:
            local_abs_max = max(local_abs_max, abs(v))
        absmax.append(local_abs_max)
        rcp = fdiv(1.0, local_abs_max)  # inf for an all-zero block
        codes += [quantize_one(fmul(v, rcp)) for v in part]
    return codes, torch.tensor(absmax, dtype=F32)


def fp32_list(t):
    return t.detach().to(F32).reshape(-1).tolist()


# ------------------------------------------------------------------ bitsandbytes.functional

def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data.sort()
    return torch.tensor(data)


DYNAMIC = create_dynamic_map()
DYNAMIC_LIST = DYNAMIC.tolist()


def quantize_blockwise_8bit(A, blocksize=256):
    codes, absmax = quantize_blocks(fp32_list(A), blocksize, lambda x: d_quantize(DYNAMIC_LIST, x))
    return torch.tensor(codes[:A.numel()], dtype=torch.uint8), absmax


def quantize_4bit(weight, blocksize, double_quant):
    flat = fp32_list(weight)
    codes, absmax = quantize_blocks(flat, blocksize, d_quantize_nf4)
    # StoreChar: (valid_items + 1) / 2 bytes; an odd n keeps the pad element's code.
    packed = [codes[2 * j] << 4 | codes[2 * j + 1] for j in range((len(flat) + 1) // 2)]
    state = {"packed": torch.tensor(packed, dtype=torch.uint8), "absmax": absmax}
    if double_quant:
        offset = absmax.mean()
        nested, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state.update(absmax=nested, nested_absmax=nested_absmax, nested_offset=offset)
    return state


def dequantize_blockwise(values, absmax, blocksize):
    out = torch.empty(values.numel())
    for b in range(absmax.numel()):
        out[b * blocksize:(b + 1) * blocksize] = values[b * blocksize:(b + 1) * blocksize] * absmax[b]
    return out


def dequantize_4bit(state, shape, blocksize):
    absmax = state["absmax"]
    if "nested_absmax" in state:
        absmax = dequantize_blockwise(DYNAMIC[absmax.long()], state["nested_absmax"], 256)
        absmax = absmax + state["nested_offset"]
    packed = state["packed"]
    index = torch.empty(packed.numel() * 2, dtype=torch.long)
    index[::2] = (packed >> 4).long()
    index[1::2] = (packed & 0xF).long()
    n = 1
    for s in shape:
        n *= s
    return dequantize_blockwise(NF4[index[:n]], absmax, blocksize).reshape(shape)


# ------------------------------------------------------------------ cases

def inputs_scaling_to(targets, absmax):
    """fp32 inputs v (|v| < absmax) with fp32(v · fp32(1/absmax)) == each target exactly."""
    rcp = fdiv(1.0, absmax)
    out = []
    for target in targets:
        v = fdiv(target, rcp)
        for _ in range(8):  # walk v by ulps onto the target
            x = fmul(v, rcp)
            if x == target:
                break
            v = next_up(v) if x < target else next_down(v)
        assert fmul(v, rcp) == target, (target, absmax)
        out.append(v)
    return out


def around_thresholds(absmax):
    """One block per call: absmax itself, then every NF4 threshold, and ±1 ulp of it, after scaling."""
    targets = []
    for t in thresholds():
        targets += [next_down(t), t, next_up(t)]
    return [absmax] + inputs_scaling_to(targets, absmax)


def dynamic_midpoints():
    """The fp32 midpoints of neighbouring dynamic-map entries, as dQuantize computes them."""
    return [fmul(fadd(DYNAMIC_LIST[k], DYNAMIC_LIST[k + 1]), 0.5) for k in range(255)]


def walk_onto(target, offset, rcp, steps=64):
    """An absmax a with fp32(fp32(a − offset)·rcp) == target, by ulp steps from a first guess; None if the grid skips it."""
    a = fadd(offset, fdiv(target, rcp))
    for _ in range(steps):
        x = fmul(fadd(a, -offset), rcp)
        if x == target:
            return a
        a = next_up(a) if x < target else next_down(a)
    return None


def double_quant_on_midpoints(ks, offset, scale):
    """A weight (blocksize 32, one block per absmax, at most 256 blocks: one nested block) whose
    absmax values, after − offset and · fp32(1/nested absmax), land exactly on the dynamic-map
    midpoints mids[k] and on the nearest values reachable below and above (absmax ∓ 1 ulp:
    1 or 2 ulps of the scaled value, as the grid of absmax allows).

    Design: one block at offset + scale (x = 1, sets the nested absmax), three per midpoint,
    all-zero or large blocks and one balance block that hold the mean at `offset`; the absmax
    values are walked by ulps onto the midpoints for the actual fp32 mean until nothing moves
    (midpoints the grid skips are left out)."""
    mids = dynamic_midpoints()
    ks = list(ks)
    while True:
        triples = [fadd(offset, fmul(mids[k], scale)) for k in ks]
        spread = scale + 3 * sum(t - offset for t in triples)  # Σ (a − offset) so far
        fill = 0.0 if spread > 0 else fadd(offset, fmul(0.95, scale))
        count = int(abs(spread / (fill - offset)))
        absmax = [fadd(offset, scale), offset] + [fill] * count
        for t in triples:
            absmax += [next_down(t), t, next_up(t)]
        assert len(absmax) <= 256
        for _ in range(50):
            # the balance block (index 1) holds the mean at `offset`
            absmax[1] = 0.0
            absmax[1] = fmul(1.0, offset * len(absmax) - sum(absmax))
            mean = torch.tensor(absmax, dtype=F32).mean().item()
            rcp = fdiv(1.0, max(abs(fadd(a, -mean)) for a in absmax))
            assert rcp == fdiv(1.0, fadd(absmax[0], -mean))  # the big block sets the nested absmax
            hits = [walk_onto(mids[k], mean, rcp) for k in ks]
            if None in hits:
                break
            triples = [[next_down(a), a, next_up(a)] for a in hits]
            if absmax[2 + count:] == sum(triples, []):
                break
            absmax[2 + count:] = sum(triples, [])
        else:
            raise RuntimeError("the mean does not settle")
        if None not in hits:
            break
        ks = [k for k, hit in zip(ks, hits) if hit is not None]  # midpoints the grid skips: leave out
    scaled = [fmul(fadd(a, -mean), rcp) for a in absmax[3 + count::3]]
    assert scaled == [mids[k] for k in ks]
    weight = torch.zeros(len(absmax), 32)
    for b, a in enumerate(absmax):
        weight[b, 0] = a
        weight[b, 1:] = torch.linspace(-0.9, 0.9, 31) * a
    return weight, ks


def cases():
    torch.manual_seed(4)
    heavy = torch.distributions.StudentT(2.0).sample((40, 64))
    heavy[3] = 0.0  # an all-zero block
    yield "w64", torch.randn(48, 80) * 0.05, 64, True
    yield "odd", torch.randn(7, 13), 32, False
    yield "many", torch.randn(300, 64) * 0.02 + 0.01, 32, True
    yield "heavy", heavy, 64, True
    yield "big_block", torch.randn(20, 300), 4096, False
    # every NF4 threshold after scaling, exactly and ±1 ulp, for an exact and an inexact reciprocal
    # (an absmax of mantissa 1.02 keeps t·absmax in the binade of t: ulp steps of the input reach every scaled value)
    for name, blocksize, absmax in (("thresholds_unit", 64, 1.0), ("thresholds_scaled", 64, 0.255),
                                    ("thresholds_small", 64, 0.031875), ("thresholds_b32", 32, 8.16)):
        values = around_thresholds(absmax)
        yield name, torch.tensor(values + [0.0] * (-len(values) % blocksize), dtype=F32), blocksize, False
    # odd lengths: the pad nibble is the code of 0.0·rcp (7), or of NaN (0) in an all-zero last block
    torch.manual_seed(5)
    yield "odd_pad7", torch.randn(5, 13), 64, False
    tail_zero = torch.randn(65)
    tail_zero[64] = 0.0
    yield "odd_zero_tail", tail_zero, 64, True
    yield "one_element", torch.tensor([-0.3]), 64, False
    # all-zero blocks: bytes 0x00, absmax 0
    zero_blocks = torch.randn(6, 64)
    zero_blocks[1] = 0.0
    zero_blocks[4] = 0.0
    yield "zero_blocks", zero_blocks, 64, True
    yield "all_zero", torch.zeros(3, 32), 32, True
    # denormals (flushed to zero by fast math), a tiny normal absmax, a huge one whose reciprocal is denormal
    denormal = torch.zeros(4, 64)
    denormal[0] = torch.linspace(-1e-39, 1e-39, 64)
    denormal[1, 0] = 1.2e-38
    denormal[1, 1:] = torch.linspace(-1.1e-38, 1.1e-38, 63)
    denormal[2] = torch.linspace(-1.0, 1.0, 64) * 3e38
    denormal[3] = torch.randn(64)
    yield "denormal", denormal, 64, False
    # double quantisation: scaled absmax values on dynamic-map midpoints, both parities of the
    # lower entry (the kernel's ties go to the even index), just below and just above
    for name, ks, offset, scale in (("dq_midpoints_neg", (0, 1, 2, 3, 20, 21, 50, 51), 1.9, 1.9),
                                    ("dq_midpoints_pos", (200, 201, 230, 231, 250, 251, 252, 253, 254), 0.2, 1.7)):
        weight, hit = double_quant_on_midpoints(ks, offset, scale)
        print(f"{name}: midpoints {hit} hit exactly", file=sys.stderr)
        yield name, weight, 32, True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    tensors = {"nf4_code": NF4, "dynamic_code": DYNAMIC,
               "nf4_thresholds": torch.tensor(thresholds(), dtype=F32),
               "dynamic_midpoints": torch.tensor(dynamic_midpoints(), dtype=F32)}
    names = []
    for name, weight, blocksize, double_quant in cases():
        state = quantize_4bit(weight, blocksize, double_quant)
        tensors[f"{name}__input"] = weight
        tensors[f"{name}__dequantized"] = dequantize_4bit(state, weight.shape, blocksize)
        tensors[f"{name}__blocksize"] = torch.tensor(blocksize)
        for key, value in state.items():
            tensors[f"{name}__{key}"] = value
        names.append(name)
    torch.jit.script(References(tensors)).save(parser.parse_args().out)
    print(f"wrote {len(tensors)} tensors: {' '.join(names)}")
