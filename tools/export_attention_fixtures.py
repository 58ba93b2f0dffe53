#!/usr/bin/python3
"""Export small models whose attention is written the way real models write it,
for the prefix-tuning recogniser (include/peft/jit/attention.h).

    /usr/bin/python3 tools/export_attention_fixtures.py --out build/fixtures

For each style in STYLES it writes attn_<style>_scripted.pt, _traced.pt and
_ref.pt (buffers: the inputs, the output, fixed prefixes
[layers, 2, kv_heads, P, head_dim] and the prefix-tuned output).

Every attention is forward = output(attend(*project(x), mask)); the prefix-tuned
reference runs the module's own project and attend with [prefix; K], [prefix; V]
in between and the mask given "attend" (0 for additive, 1 for keep masks) at the
prefix columns, which is how the C++ side extends masks.
"""
import argparse
import os
from typing import Tuple

import torch
from torch import nn, Tensor
import torch.nn.functional as F

from export_fixtures import References  # buffers C++ reads with torch::jit::load

HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
VOCAB = 50
PREFIX_TOKENS = 3


def split(x: Tensor, heads: int) -> Tensor:
    return x.view(x.size(0), -1, heads, x.size(-1) // heads).transpose(1, 2)


def merge(x: Tensor) -> Tensor:
    return x.transpose(1, 2).contiguous().view(x.size(0), x.size(2), -1)


class T5Attention(nn.Module):
    """T5: no 1/sqrt(d), an additive position bias, softmax in float32, dropout."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.n_heads = HEADS
        self.dropout = 0.1

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return split(self.q(x), self.n_heads), split(self.k(x), self.n_heads), split(self.v(x), self.n_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, position_bias: Tensor) -> Tensor:
        scores = torch.matmul(q, k.transpose(2, 3)) + position_bias
        attn = torch.softmax(scores.float(), dim=-1).type_as(scores)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        return torch.matmul(attn, v)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:
        q, k, v = self.project(x)
        return self.o(merge(self.attend(q, k, v, position_bias)))


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """HF's grouped-query head repeat: expand, then reshape."""
    b, h, t, d = x.size(0), x.size(1), x.size(2), x.size(3)
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class LlamaEagerAttention(nn.Module):
    """HF Llama's eager attention: scaling after the matmul, softmax with a
    dtype then cast back, dropout, grouped-query heads."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.num_heads = HEADS
        self.num_key_value_heads = KV_HEADS
        self.num_key_value_groups = HEADS // KV_HEADS
        self.scaling = HEAD_DIM ** -0.5
        self.attention_dropout = 0.0

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return (split(self.q_proj(x), self.num_heads), split(self.k_proj(x), self.num_key_value_heads),
                split(self.v_proj(x), self.num_key_value_heads))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal_mask: Tensor) -> Tensor:
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        scores = scores + causal_mask
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)
        return torch.matmul(attn, v)

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        q, k, v = self.project(x)
        return self.o_proj(merge(self.attend(q, k, v, causal_mask)))


class VitAttention(nn.Module):
    """timm-style: `@`, transpose(-2, -1), scale after, a keep mask, softmax
    as a method, dropout as a module."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.attn_drop = nn.Dropout(0.1)
        self.hidden = HIDDEN
        self.num_heads = HEADS
        self.scale = HEAD_DIM ** -0.5

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).split(self.hidden, dim=2)
        return split(q, self.num_heads), split(k, self.num_heads), split(v, self.num_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        q, k, v = self.project(x)
        return self.proj(merge(self.attend(q, k, v, keep)))


class Block(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.attn = attn
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln(x), mask)
        return x + torch.tanh(self.mlp(x))


class T5Model(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, T]) -> [B, T, HIDDEN]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.relative_attention_bias = nn.Embedding(15, HEADS)
        self.block = nn.ModuleList([Block(T5Attention()) for _ in range(LAYERS)])

    def mask(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        t = input_ids.size(1)
        pos = torch.arange(t, device=input_ids.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-7, 7) + 7
        bias = self.relative_attention_bias(rel).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        return bias + (1.0 - attention_mask[:, None, None, :].float()) * -1e9

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed(input_ids)
        bias = self.mask(input_ids, attention_mask)
        for blk in self.block:
            x = blk(x, bias)
        return x


class LlamaModel(nn.Module):
    """forward(input_ids [B, T]) -> [B, T, HIDDEN]."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Block(LlamaEagerAttention()) for _ in range(LAYERS)])

    def mask(self, input_ids: Tensor) -> Tensor:
        t = input_ids.size(1)
        return torch.full((t, t), -1e9, device=input_ids.device).triu(1)[None, None]

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        mask = self.mask(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class VitModel(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, T]) -> [B, T, HIDDEN]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(VitAttention()) for _ in range(LAYERS)])

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x, attention_mask)
        return x


# style: (model class, kv heads, the mask value at prefix columns, its mask input)
STYLES = {
    "t5": (T5Model, HEADS, 0.0),
    "llama_eager": (LlamaModel, KV_HEADS, 0.0),
    "vit": (VitModel, HEADS, 1),
}


def blocks(model: nn.Module):
    return [b for name in ("block", "layers", "blocks") if hasattr(model, name) for b in getattr(model, name)]


def prefix_attention(attn: nn.Module, pk: Tensor, pv: Tensor, attend_value):
    """attn's own forward with [prefix; K], [prefix; V] between project and attend."""

    def forward(x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = attn.project(x)
        b = k.size(0)
        k = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2)
        v = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2)
        pad = torch.full((*mask.shape[:-1], pk.size(1)), attend_value, dtype=mask.dtype)
        out = merge(attn.attend(q, k, v, torch.cat([pad, mask], -1)))
        out_proj = {"T5Attention": "o", "LlamaEagerAttention": "o_proj", "VitAttention": "proj"}[type(attn).__name__]
        return getattr(attn, out_proj)(out)

    return forward


def prefix_reference(model: nn.Module, inputs, prefix: Tensor, attend_value) -> Tensor:
    attns = [b.attn for b in blocks(model)]
    for i, a in enumerate(attns):
        a.forward = prefix_attention(a, prefix[i, 0], prefix[i, 1], attend_value)
    try:
        return model(*inputs)
    finally:
        for a in attns:
            del a.forward


def export(style: str, out_dir: str) -> None:
    cls, kv_heads, attend_value = STYLES[style]
    torch.manual_seed({"t5": 11, "llama_eager": 12, "vit": 13}[style])
    model = cls().eval()
    input_ids = torch.randint(0, VOCAB, (2, 6))
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    inputs = (input_ids,) if style == "llama_eager" else (input_ids, attention_mask)
    prefix = torch.randn(LAYERS, 2, kv_heads, PREFIX_TOKENS, HEAD_DIM)
    with torch.no_grad():
        expected = model(*inputs)
        prefix_expected = prefix_reference(model, inputs, prefix, attend_value)
    assert not torch.allclose(expected, prefix_expected), "the prefix must change the output"
    torch.jit.script(model).save(os.path.join(out_dir, f"attn_{style}_scripted.pt"))
    torch.jit.trace(model, inputs).save(os.path.join(out_dir, f"attn_{style}_traced.pt"))
    refs = dict(input_ids=input_ids, expected=expected, prefix=prefix, prefix_expected=prefix_expected)
    if len(inputs) == 2:
        refs["attention_mask"] = attention_mask
    torch.jit.script(References(refs)).save(os.path.join(out_dir, f"attn_{style}_ref.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for style in STYLES:
        export(style, args.out)
        print(f"exported attention fixture {style} to {args.out}")


if __name__ == "__main__":
    main()
