#!/usr/bin/python3
"""The Python peer of benchmarks/train_memory.sh: the same GPT-2 folder trained
with LoRA written in a few lines of plain PyTorch (Debian's python3-torch, the
LibTorch the C++ side links), one configuration per process; prints the median
step time and the process's peak RSS as peft-bench-train does.

    /usr/bin/python3 benchmarks/peer_gpt2.py --model DIR --mode lora|lora_ckpt|infer_base|infer_lora

The model is transformers' GPT2LMHeadModel (modeling_gpt2.py, eager attention,
dropout 0.1 as config.json's defaults give) with LoRA r=8, alpha 16, dropout 0.05
on every c_attn, as HF peft's Linear computes it (fan_in_fan_out). The loss is
the usual F.cross_entropy over the full logits; lora_ckpt wraps each block in
torch.utils.checkpoint (use_reentrant=False: the frozen embeddings give the
blocks inputs that need no gradient). Weights are views of the memory-mapped
safetensors file, as the C++ loader's are.
"""
import argparse
import json
import math
import mmap
import os
import resource
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_mapped(path):
    """name -> tensor viewing a private (copy-on-write) map of the safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = TYPES[info["dtype"]]
        count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
        out[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + n + begin).view(info["shape"])
    return out


class Conv1D(nn.Module):
    """transformers' Conv1D (weight [in, out]), frozen; with r > 0, plus LoRA: (alpha/r)·B·A·dropout(x)."""

    def __init__(self, weight, bias, r=0, alpha=16, dropout=0.05):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.r = r
        if r:
            self.lora_A = nn.Parameter(torch.empty(r, weight.shape[0]))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(weight.shape[1], r))
            self.scaling = alpha / r
            self.drop = nn.Dropout(dropout)

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        return y + self.drop(x) @ self.lora_A.t() @ self.lora_B.t() * self.scaling if self.r else y


class Block(nn.Module):
    def __init__(self, sd, p, heads, r):
        super().__init__()
        E = sd[p + "ln_1.weight"].numel()
        self.ln_1 = nn.LayerNorm(E)
        self.ln_2 = nn.LayerNorm(E)
        for name in ("ln_1", "ln_2"):
            getattr(self, name).weight = nn.Parameter(sd[p + name + ".weight"], requires_grad=False)
            getattr(self, name).bias = nn.Parameter(sd[p + name + ".bias"], requires_grad=False)
        conv = lambda name, rank=0: Conv1D(sd[p + name + ".weight"], sd[p + name + ".bias"], rank)
        self.c_attn, self.attn_proj = conv("attn.c_attn", r), conv("attn.c_proj")
        self.c_fc, self.mlp_proj = conv("mlp.c_fc"), conv("mlp.c_proj")
        self.heads = heads
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(E, dim=2)
        q, k, v = (t.view(B, T, self.heads, E // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(E // self.heads)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        w = self.drop(F.softmax(scores.masked_fill(~causal, torch.finfo(scores.dtype).min), dim=-1))
        x = x + self.drop(self.attn_proj((w @ v).transpose(1, 2).reshape(B, T, E)))
        h = self.c_fc(self.ln_2(x))
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))  # gelu_new
        return x + self.drop(self.mlp_proj(h))


class GPT2(nn.Module):
    def __init__(self, folder, r):
        super().__init__()
        cfg = json.load(open(os.path.join(folder, "config.json")))
        sd = load_mapped(os.path.join(folder, "model.safetensors"))
        sd = {k if k.startswith("transformer.") or k.startswith("lm_head") else "transformer." + k: v for k, v in sd.items()}
        self.wte = nn.Parameter(sd["transformer.wte.weight"], requires_grad=False)
        self.wpe = nn.Parameter(sd["transformer.wpe.weight"], requires_grad=False)
        self.h = nn.ModuleList(Block(sd, f"transformer.h.{i}.", cfg["n_head"], r) for i in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(self.wte.shape[1])
        self.ln_f.weight = nn.Parameter(sd["transformer.ln_f.weight"], requires_grad=False)
        self.ln_f.bias = nn.Parameter(sd["transformer.ln_f.bias"], requires_grad=False)
        self.drop = nn.Dropout(0.1)
        self.checkpointing = False

    def forward(self, ids):
        x = self.drop(F.embedding(ids, self.wte) + F.embedding(torch.arange(ids.shape[1])[None], self.wpe))
        for block in self.h:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        return self.ln_f(x) @ self.wte.t()  # lm_head tied to wte


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", required=True, choices=["lora", "lora_ckpt", "infer_base", "infer_lora"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT2(a.model, r=0 if a.mode == "infer_base" else 8)
    model.checkpointing = a.mode == "lora_ckpt"
    ids = torch.randint(model.wte.shape[0], (a.batch, a.seq))
    times = []
    if a.mode.startswith("infer"):
        model.eval()
        with torch.no_grad():
            for i in range(a.steps + 1):
                start = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - start)
    else:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for i in range(a.steps + 1):
            start = time.perf_counter()
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
    steps = sorted(times[1:])
    print(f"step_s {steps[len(steps) // 2]:.4f}")
    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


if __name__ == "__main__":
    main()
