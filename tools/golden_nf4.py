#!/usr/bin/python3
"""Golden NF4 values: bitsandbytes' published 4-bit algorithm in plain PyTorch.

    /usr/bin/python3 tools/golden_nf4.py --out tests/data/golden_nf4.pt

Follows bitsandbytes' reference implementation (bitsandbytes/backends/default/
ops.py: quantize_4bit, quantize_blockwise, dequantize_*; functional.py:
create_dynamic_map, quantize_4bit(compress_statistics=True)), written here
independently of the C++ code: nearest code by argmin |x·(1/absmax) − code|
(first index on ties) where the C++ code uses midpoints. tests/test_quant.cpp
requires packed bytes and absmax values to be bit-identical.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_fixtures import References  # noqa: E402

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


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


def quantize_blockwise(flat, code, blocksize):
    """-> (uint8 index per element, fp32 absmax per block)"""
    n = flat.numel()
    blocks = (n + blocksize - 1) // blocksize
    absmax = torch.zeros(blocks)
    scaled = torch.empty(n)
    for b in range(blocks):
        part = flat[b * blocksize:(b + 1) * blocksize]
        absmax[b] = part.abs().max()
        scaled[b * blocksize:(b + 1) * blocksize] = torch.clamp(part * (1 / absmax[b]), -1, 1)
    index = torch.argmin(torch.abs(scaled.unsqueeze(-1) - code), dim=-1).to(torch.uint8)
    return index, absmax


def dequantize_blockwise(values, absmax, blocksize):
    out = torch.empty(values.numel())
    for b in range(absmax.numel()):
        out[b * blocksize:(b + 1) * blocksize] = values[b * blocksize:(b + 1) * blocksize] * absmax[b]
    return out


def quantize_4bit(weight, blocksize, double_quant):
    flat = weight.float().reshape(-1)
    index, absmax = quantize_blockwise(flat, NF4, blocksize)
    if index.numel() % 2:
        index = torch.cat([index, torch.zeros(1, dtype=torch.uint8)])
    packed = index[::2] << 4 | index[1::2]
    state = {"packed": packed, "absmax": absmax}
    if double_quant:
        offset = absmax.mean()
        nested, nested_absmax = quantize_blockwise(absmax - offset, create_dynamic_map(), 256)
        state.update(absmax=nested, nested_absmax=nested_absmax, nested_offset=offset)
    return state


def dequantize_4bit(state, shape, blocksize):
    absmax = state["absmax"]
    if "nested_absmax" in state:
        absmax = dequantize_blockwise(create_dynamic_map()[absmax.long()], state["nested_absmax"], 256)
        absmax = absmax + state["nested_offset"]
    packed = state["packed"]
    index = torch.empty(packed.numel() * 2, dtype=torch.long)
    index[::2] = (packed >> 4).long()
    index[1::2] = (packed & 0xF).long()
    n = 1
    for s in shape:
        n *= s
    return dequantize_blockwise(NF4[index[:n]], absmax, blocksize).reshape(shape)


def cases():
    torch.manual_seed(4)
    heavy = torch.distributions.StudentT(2.0).sample((40, 64))
    heavy[3] = 0.0  # an all-zero block
    yield "w64", torch.randn(48, 80) * 0.05, 64, True
    yield "odd", torch.randn(7, 13), 32, False
    yield "many", torch.randn(300, 64) * 0.02 + 0.01, 32, True
    yield "heavy", heavy, 64, True
    yield "big_block", torch.randn(20, 300), 4096, False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    tensors = {"nf4_code": NF4, "dynamic_code": create_dynamic_map()}
    for name, weight, blocksize, double_quant in cases():
        state = quantize_4bit(weight, blocksize, double_quant)
        tensors[f"{name}__input"] = weight
        tensors[f"{name}__dequantized"] = dequantize_4bit(state, weight.shape, blocksize)
        tensors[f"{name}__blocksize"] = torch.tensor(blocksize)
        for key, value in state.items():
            tensors[f"{name}__{key}"] = value
    torch.jit.script(References(tensors)).save(parser.parse_args().out)
    print(f"wrote {len(tensors)} tensors")
