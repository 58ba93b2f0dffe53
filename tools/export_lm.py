#!/usr/bin/env python3
"""Exports a small GPT-style causal language model, randomly initialised, as
TorchScript for peft-cpp (examples/lm trains it in C++; the generation tests
use it as a fixture).

It follows docs/export-conventions.md (explicit attention with the head split
visible, blocks in an nn.ModuleList, token ids first, a padding mask named
attention_mask) and the KV-cache convention of peft::generate:

    forward(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]
    forward_cached(input_ids [B, T], attention_mask [B, S], past: List[Tensor])
        -> (logits [B, T, V], past)

where attention_mask covers every token so far (S >= T, the last T are
input_ids), past holds keys and values per layer ([k0, v0, k1, v1, ...], each
[B, heads, E + S - T, head_dim]) and its E extra leading entries (a prefix
tuning prefix) are always attended. Positions come from the mask (left padding
keeps them right), not from the length of past.

    python3 tools/export_lm.py --out lm.pt [--vocab 256 --dim 128 --layers 4 --heads 4 --context 256 --seed 0]
"""
import argparse
import pathlib
from typing import List, Tuple

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim ** 0.5) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2)
        return self.o_proj(out.reshape(out.size(0), out.size(1), self.heads * self.head_dim))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.attend(self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x)), bias)

    @torch.jit.export
    def forward_cached(self, x: Tensor, bias: Tensor, past_k: Tensor, past_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        k = torch.cat([past_k, self.split(self.k_proj(x))], 2)
        v = torch.cat([past_v, self.split(self.v_proj(x))], 2)
        return self.attend(self.split(self.q_proj(x)), k, v, bias), k, v


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, 4 * dim)
        self.fc_out = nn.Linear(4 * dim, dim)

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc_out(torch.nn.functional.gelu(self.fc_in(self.ln_2(x))))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(x)

    @torch.jit.export
    def forward_cached(self, x: Tensor, bias: Tensor, past_k: Tensor, past_v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn.forward_cached(self.ln_1(x), bias, past_k, past_v)
        x = x + a
        return x + self.mlp(x), k, v


class CausalLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        T = input_ids.size(1)
        positions = (attention_mask.to(torch.long).cumsum(1) - 1).clamp(min=0)
        return self.wte(input_ids) + self.wpe(positions.narrow(1, positions.size(1) - T, T))

    def attention_bias(self, attention_mask: Tensor, T: int, extra: int) -> Tensor:
        """[B, 1, T, extra + S]: 0 where a query may look, -1e9 elsewhere."""
        S = attention_mask.size(1)
        causal = torch.ones([T, S], dtype=torch.bool, device=attention_mask.device).tril(S - T)
        visible = causal.unsqueeze(0) & attention_mask.ne(0).unsqueeze(1)
        if extra > 0:
            always = torch.ones([visible.size(0), T, extra], dtype=torch.bool, device=visible.device)
            visible = torch.cat([always, visible], -1)
        bias = torch.zeros(visible.size(), dtype=self.wte.weight.dtype, device=visible.device)
        return bias.masked_fill(~visible, -1e9).unsqueeze(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # Positions from the last T mask columns: prompt tuning prepends columns for its vectors.
        T = input_ids.size(1)
        h = self.embed(input_ids, attention_mask.narrow(1, attention_mask.size(1) - T, T))
        # Every position queries (attention_mask.size(1), not input_ids.size(1): prompt tuning extends the mask).
        bias = self.attention_bias(attention_mask, attention_mask.size(1), 0)
        for block in self.blocks:
            h = block(h, bias)
        return self.lm_head(self.ln_f(h))

    @torch.jit.export
    def forward_cached(self, input_ids: Tensor, attention_mask: Tensor,
                       past: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        B, T = input_ids.size(0), input_ids.size(1)
        extra = 0
        if len(past) > 0:
            extra = past[0].size(2) - (attention_mask.size(1) - T)
        h = self.embed(input_ids, attention_mask)
        bias = self.attention_bias(attention_mask, T, extra)
        empty = torch.zeros([B, self.heads, 0, self.head_dim], dtype=h.dtype, device=h.device)
        present: List[Tensor] = []
        i = 0
        for block in self.blocks:
            past_k, past_v = empty, empty
            if len(past) > 0:
                past_k, past_v = past[2 * i], past[2 * i + 1]
            h, k, v = block.forward_cached(h, bias, past_k, past_v)
            present.append(k)
            present.append(v)
            i += 1
        return self.lm_head(self.ln_f(h)), present


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    torch.manual_seed(a.seed)
    model = CausalLM(a.vocab, a.dim, a.layers, a.heads, a.context).eval()
    scripted = torch.jit.script(model)
    # The cached and the plain forward agree (a check of the export itself).
    ids = torch.randint(a.vocab, (2, 7))
    mask = torch.ones_like(ids)
    full = scripted(ids, mask)
    logits, past = scripted.forward_cached(ids[:, :4], mask[:, :4], [])
    step, past = scripted.forward_cached(ids[:, 4:], mask, past)
    assert torch.allclose(torch.cat([logits, step], 1), full, atol=1e-5), "forward_cached disagrees with forward"
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    scripted.save(a.out)
    print(f"{a.out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
