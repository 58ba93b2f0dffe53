#!/usr/bin/python3
"""Golden values for every method's math, from the papers' formulas.

    /usr/bin/python3 tools/golden_methods.py --out tests/data/golden_methods.pt

Uses torch 1.13 only (no peft). Each case stores its inputs, the forward output
and the gradients of loss = sum(y * g) for a fixed upstream gradient g. The C++
tests (tests/test_methods.cpp) load the file with torch::jit::load and must
match within 1e-5. The formulas are written here independently of the C++
code (e.g. per-slice LoRA through an explicit block ΔW, DoRA as
m/‖W+sBA‖·(W+sBA)x + b), like PyTorch's own init_baseline.py.
"""
import argparse
import math

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_fixtures import References  # noqa: E402  (buffers readable from C++)

torch.manual_seed(20240601)
cases = {}


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


def record(name, inputs, y, wrt):
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [inputs[k] for k in wrt])
    for k, v in inputs.items():
        cases[f"{name}__{k}"] = v.detach().clone()
    cases[f"{name}__g"] = g
    cases[f"{name}__y"] = y.detach().clone()
    for k, gk in zip(wrt, grads):
        cases[f"{name}__grad_{k}"] = gk


# LoRA: y = x Wᵀ + b + s·x Aᵀ Bᵀ, s = alpha/r (alpha=4, r=2 → 2; rsLoRA → 4/√2)
for name, scaling in [("lora", 4 / 2), ("lora_rslora", 4 / math.sqrt(2))]:
    inp = dict(x=leaf(2, 3, 6), W=leaf(5, 6), b=leaf(5), A=leaf(2, 6), B=leaf(5, 2))
    y = inp["x"] @ inp["W"].t() + inp["b"] + scaling * (inp["x"] @ inp["A"].t() @ inp["B"].t())
    record(name, inp, y, ["x", "A", "B"])

# LoRA with fan_in_fan_out: W stored [in, out], base is x W + b
inp = dict(x=leaf(4, 6), W=leaf(6, 5), b=leaf(5), A=leaf(2, 6), B=leaf(5, 2))
y = inp["x"] @ inp["W"] + inp["b"] + 2.0 * (inp["x"] @ inp["A"].t() @ inp["B"].t())
record("lora_fan", inp, y, ["A", "B"])

# Per-slice LoRA on a fused [q|k|v] projection of 3×3 outputs, LoRA on q and v:
# A = [A_q; A_v] [2r, in], B = [B_q; B_v] [2·3, r]; ΔW has zero rows for k.
inp = dict(x=leaf(4, 6), W=leaf(9, 6), b=leaf(9), A=leaf(4, 6), B=leaf(6, 2))
A_q, A_v = inp["A"][:2], inp["A"][2:]
B_q, B_v = inp["B"][:3], inp["B"][3:]
delta = torch.cat([B_q @ A_q, torch.zeros(3, 6), B_v @ A_v], 0)
y = inp["x"] @ (inp["W"] + 2.0 * delta).t() + inp["b"]
record("lora_slices", inp, y, ["A", "B"])

# DoRA: y = m / ‖W + sBA‖_row · (W + sBA) x + b, norm detached (DoRA §4.3)
inp = dict(x=leaf(4, 6), W=leaf(5, 6), b=leaf(5), A=leaf(2, 6), B=leaf(5, 2), m=(torch.rand(5) + 0.5).requires_grad_())
W_adapted = inp["W"] + 2.0 * inp["B"] @ inp["A"]
norm = W_adapted.norm(dim=1).detach()
y = (inp["x"] @ W_adapted.t()) * (inp["m"] / norm) + inp["b"]
record("dora", inp, y, ["x", "A", "B", "m"])

# IA3: output scaling (xWᵀ + b) ⊙ l and feed-forward input scaling (x ⊙ l)Wᵀ + b
inp = dict(x=leaf(4, 6), W=leaf(5, 6), b=leaf(5), l=leaf(5))
record("ia3", inp, (inp["x"] @ inp["W"].t() + inp["b"]) * inp["l"], ["x", "l"])
inp = dict(x=leaf(4, 6), W=leaf(5, 6), b=leaf(5), l=leaf(6))
record("ia3_ff", inp, (inp["x"] * inp["l"]) @ inp["W"].t() + inp["b"], ["x", "l"])

# Houlsby adapter: h + W_up σ(W_down h + b_down) + b_up, σ = GELU (exact erf form)
inp = dict(h=leaf(2, 3, 8), Wd=leaf(3, 8), bd=leaf(3), Wu=leaf(8, 3), bu=leaf(8))
z = inp["h"] @ inp["Wd"].t() + inp["bd"]
z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
record("adapter", inp, inp["h"] + z @ inp["Wu"].t() + inp["bu"], ["h", "Wd", "bd", "Wu", "bu"])

# Prompt tuning: [P; X]
inp = dict(X=leaf(2, 3, 4), P=leaf(2, 4))
record("prompt", inp, torch.cat([inp["P"].unsqueeze(0).expand(2, 2, 4), inp["X"]], 1), ["X", "P"])

# LoRA on an embedding table: T[ids] + s·(Aᵀ)[ids] Bᵀ
inp = dict(T=leaf(10, 4), A=leaf(2, 10), B=leaf(4, 2))
ids = torch.tensor([[1, 7, 3], [9, 0, 7]])
cases["lora_embedding__ids"] = ids
record("lora_embedding", inp, inp["T"][ids] + 2.0 * (inp["A"].t()[ids] @ inp["B"].t()), ["A", "B"])


# Prefix attention, by hand on concatenated K/V, grouped-query (4 query heads,
# 2 KV heads), P = 2, a padded key in the second sequence, and masks:
# boolean causal, and an additive float mask.
def prefix_reference(q, k, v, pk, pv, pad, causal, additive):
    B, H, Tq, d = q.shape
    P, Tk = pk.shape[1], k.shape[2]
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2).repeat_interleave(H // k.shape[1], 1)
    values = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2).repeat_interleave(H // k.shape[1], 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)
    blocked = torch.zeros(B, H, Tq, P + Tk, dtype=torch.bool)
    for bi in range(B):
        for i in range(Tq):
            for j in range(Tk):
                if pad[bi, j] or (causal and j > i + Tk - Tq):
                    blocked[bi, :, i, P + j] = True
    scores = scores.masked_fill(blocked, float("-inf"))
    if additive is not None:
        scores = scores + torch.cat([torch.zeros(Tq, P), additive], 1)
    return torch.softmax(scores, -1) @ values


pad = torch.tensor([[False, False, False], [False, False, True]])
for name, causal, additive in [("prefix_causal", True, None), ("prefix_additive", False, torch.randn(3, 3))]:
    inp = dict(q=leaf(2, 4, 3, 5), k=leaf(2, 2, 3, 5), v=leaf(2, 2, 3, 5), pk=leaf(2, 2, 5), pv=leaf(2, 2, 5))
    y = prefix_reference(inp["q"], inp["k"], inp["v"], inp["pk"], inp["pv"], pad, causal, additive)
    cases[f"{name}__pad"] = pad
    if additive is not None:
        cases[f"{name}__additive"] = additive
    record(name, inp, y, ["q", "pk", "pv"])

# PiSSA (Meng et al. 2024) as HF peft's pissa_init: W = U S Vh; with s = alpha/r,
# A = √(S_r/s) Vh_r, B = U_r √(S_r/s), residual W − s·B·A. Stored sign-free:
# the product B·A and the residual.
W = torch.randn(5, 6)
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
s = 4 / 2
sqrt_s = (S[:2] / s).sqrt()
A = sqrt_s[:, None] * Vh[:2]
B = U[:, :2] * sqrt_s[None, :]
cases["pissa__W"] = W
cases["pissa__BA"] = B @ A
cases["pissa__residual"] = W - s * B @ A


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    torch.jit.script(References(cases)).save(parser.parse_args().out)
    print(f"wrote {len(cases)} tensors")
