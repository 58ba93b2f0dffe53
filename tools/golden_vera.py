#!/usr/bin/python3
"""Golden values for VeRA (Kopiczko et al. 2024), written as HF peft computes it.

    /usr/bin/python3 tools/golden_vera.py --out tests/data/golden_vera.pt

Uses torch 1.13 only (no peft). The formulas follow peft/tuners/vera
(model.py: _kaiming_init, _find_dim, _init_vera_A_vera_B; layer.py:
Linear.forward, get_delta_weight); see docs/notes-vera.md. Stored like
tools/golden_methods.py: a TorchScript module whose buffers C++ reads with
torch::jit::load(...).attr(name).toTensor().

Contents (names "<case>__<tensor>"):

- init_<k>__{A,B,r,max_in,max_out,seed}: vera_A [r, max_in] and vera_B
  [max_out, r] exactly as HF initialises them (fp32, CPU generator seeded with
  projection_prng_key, A drawn first, then B from the same generator), so the
  C++ port can be compared bit for bit (torch::equal).
- vera__{A,B,r,max_in,max_out,seed}: the shared projections used by the layers
  below (also an HF init, seed 0x5EED).
- vera_l<i>__{x,W,b,lambda_d,lambda_b,y,g,grad_x,grad_lambda_d,grad_lambda_b,
  delta_W,W_merged,in,out,fan_in_fan_out}: three linear layers of different
  (in, out) that share vera_A/vera_B, each using A[:, :in] and B[:out, :].
  lambda_d [r] and lambda_b [out] are seeded random values (HF's own init,
  lambda_b = 0 and lambda_d = d_initial, would make the delta zero). y is
  base(x) + lambda_b * ((lambda_d * (x A_sᵀ)) B_sᵀ); g is a fixed upstream
  gradient and grad_* the gradients of sum(y * g). delta_W is the update in the
  base's layout ([out, in], or [in, out] for the fan_in_fan_out layer, whose W
  is stored [in, out] like GPT-2's Conv1D), W_merged = W + delta_W.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_fixtures import References  # noqa: E402  (buffers readable from C++)

cases = {}


def kaiming_init(shape, generator):
    """HF peft's vera/model.py:_kaiming_init, written out: fan_in = shape[1]
    for a 2-D tensor, bound = sqrt(3) * (sqrt(2) / sqrt(fan_in)) in Python
    floats (doubles), then uniform_(-bound, bound) on an fp32 CPU tensor."""
    tensor = torch.empty(shape, dtype=torch.float32)
    fan = shape[1]
    gain = math.sqrt(2)
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def init_projections(max_in, max_out, r, seed):
    """HF peft's VeraModel._init_vera_A_vera_B: one CPU generator, A then B."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = kaiming_init((r, max_in), generator)
    vera_B = kaiming_init((max_out, r), generator)
    return vera_A, vera_B


def store_init(name, max_in, max_out, r, seed):
    A, B = init_projections(max_in, max_out, r, seed)
    cases[f"{name}__A"] = A
    cases[f"{name}__B"] = B
    cases[f"{name}__r"] = torch.tensor(r)
    cases[f"{name}__max_in"] = torch.tensor(max_in)
    cases[f"{name}__max_out"] = torch.tensor(max_out)
    cases[f"{name}__seed"] = torch.tensor(seed)
    return A, B


# HF-init projections alone: the default key 0, a large key, and a negative key
# (torch.Generator.manual_seed wraps it to 2^64 - 7; pass it to C++ as int64).
store_init("init_0", max_in=16, max_out=12, r=8, seed=0)
store_init("init_1", max_in=10, max_out=4, r=3, seed=123456789)
store_init("init_2", max_in=5, max_out=9, r=2, seed=-7)

# Three layers sharing the projections: (in, out, fan_in_fan_out).
LAYERS = [(6, 5, False), (8, 3, False), (5, 7, True)]
R = 4
MAX_IN = max(i for i, _, _ in LAYERS)  # HF's _find_dim: element-wise max over targets
MAX_OUT = max(o for _, o, _ in LAYERS)
A, B = store_init("vera", MAX_IN, MAX_OUT, R, seed=0x5EED)

torch.manual_seed(20240602)
for index, (n_in, n_out, fan_in_fan_out) in enumerate(LAYERS):
    name = f"vera_l{index}"
    x = torch.randn(2, 3, n_in).requires_grad_()
    W = torch.randn(n_in, n_out) if fan_in_fan_out else torch.randn(n_out, n_in)
    b = torch.randn(n_out)
    lambda_d = (torch.randn(R) * 0.5).requires_grad_()
    lambda_b = (torch.randn(n_out) * 0.5).requires_grad_()

    # HF layer.py: sliced_A = vera_A[:, :in_features], sliced_B = vera_B[:out_features, :]
    A_s = A[:, :n_in]
    B_s = B[:n_out, :]

    # HF Linear.forward: result + lambda_b * F.linear(lambda_d * F.linear(dropout(x), sliced_A), sliced_B)
    base = x @ W + b if fan_in_fan_out else x @ W.t() + b
    y = base + lambda_b * F.linear(lambda_d * F.linear(x, A_s), B_s)

    g = torch.randn_like(y)
    grad_x, grad_d, grad_b = torch.autograd.grad((y * g).sum(), [x, lambda_d, lambda_b])

    # HF get_delta_weight: transpose((lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s), fan_in_fan_out)
    with torch.no_grad():
        delta_W = (lambda_b.unsqueeze(-1) * B_s) @ (lambda_d.unsqueeze(-1) * A_s)
        if fan_in_fan_out:
            delta_W = delta_W.t()
        W_merged = W + delta_W
        # sanity: merged forward equals the adapter forward
        y_merged = x @ W_merged + b if fan_in_fan_out else x @ W_merged.t() + b
        assert torch.allclose(y_merged, y, atol=1e-5, rtol=1e-5), name

    for key, value in dict(x=x, W=W, b=b, lambda_d=lambda_d, lambda_b=lambda_b, y=y, g=g, grad_x=grad_x,
                           grad_lambda_d=grad_d, grad_lambda_b=grad_b, delta_W=delta_W,
                           W_merged=W_merged).items():
        cases[f"{name}__{key}"] = value.detach().clone().contiguous()
    cases[f"{name}__in"] = torch.tensor(n_in)
    cases[f"{name}__out"] = torch.tensor(n_out)
    cases[f"{name}__fan_in_fan_out"] = torch.tensor(fan_in_fan_out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    torch.jit.script(References(cases)).save(parser.parse_args().out)
    print(f"wrote {len(cases)} tensors")
