#!/usr/bin/python3
"""Export the three small transformer fixtures every C++ test builds on.

Run with Debian's interpreter (/usr/bin/python3, python3-torch 1.13, the same
version as libtorch-dev):

    /usr/bin/python3 tools/export_fixtures.py --out build/fixtures

For each architecture (gpt2, bert, llama) it writes
  <arch>_scripted.pt   torch.jit.script of the model
  <arch>_traced.pt     torch.jit.trace of the same weights
  <arch>_ref.pt        a scripted container whose buffers hold the reference
                       inputs and the output computed here in eager mode
Module names follow the Hugging Face checkpoints users meet, so target-module
patterns written for real models work on the fixtures. Everything is seeded,
so the script is the source of truth and CMake regenerates the files.
"""
import argparse
import math
import os
from typing import List, Optional

import torch
from torch import nn, Tensor
import torch.nn.functional as F

HIDDEN = 64
HEADS = 4
LAYERS = 2
VOCAB = 100
MAX_POS = 32


class Conv1D(nn.Module):
    """GPT-2's projection: weight stored [in, out], applied as x @ W + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, t, d = x.size(0), x.size(1), x.size(2)
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, hd = x.size(0), x.size(1), x.size(2), x.size(3)
    return x.transpose(1, 2).contiguous().view(b, t, h * hd)


# ---------------------------------------------------------------- GPT-2 style
class GPT2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(HIDDEN, 3 * HIDDEN)
        self.c_proj = Conv1D(HIDDEN, HIDDEN)
        self.hidden = HIDDEN
        self.heads = HEADS

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hidden // self.heads)
        t = x.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, -1e9)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.c_proj(merge_heads(out))


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(HIDDEN, 4 * HIDDEN)
        self.c_proj = Conv1D(4 * HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.attn = GPT2Attention()
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.mlp = GPT2MLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(MAX_POS, HIDDEN)
        self.h = nn.ModuleList([GPT2Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions).unsqueeze(0)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """forward(input_ids [B, T] long) -> logits [B, T, VOCAB]."""

    def __init__(self):
        super().__init__()
        self.transformer = GPT2Body()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.transformer(input_ids))


# ----------------------------------------------------------------- BERT style
class BertEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        token_types = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions).unsqueeze(0)
             + self.token_type_embeddings(token_types))
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = nn.Dropout(0.1)
        self.heads = HEADS
        self.head_dim = HIDDEN // HEADS

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        q = split_heads(self.query(x), self.heads)
        k = split_heads(self.key(x), self.heads)
        v = split_heads(self.value(x), self.heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = self.dropout(F.softmax(scores + additive_mask, dim=-1))
        return merge_heads(torch.matmul(probs, v))


class BertSelfOutput(nn.Module):
    def __init__(self, n_in: int):
        super().__init__()
        self.dense = nn.Linear(n_in, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = BertSelfAttention()
        self.output = BertSelfOutput(HIDDEN)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, 2 * HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = BertAttention()
        self.intermediate = BertIntermediate()
        self.output = BertSelfOutput(2 * HIDDEN)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        x = self.attention(x, additive_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer() for _ in range(LAYERS)])

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x, additive_mask)
        return x


class BertModel(nn.Module):
    """forward(input_ids [B, T] long, attention_mask [B, T] 1=token 0=pad)
    -> last hidden state [B, T, HIDDEN]."""

    def __init__(self):
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.encoder = BertEncoder()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        return self.encoder(x, additive_mask)


# ---------------------------------------------------------------- LLaMA style
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS


class RMSNorm(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(HIDDEN))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq)
        self.heads = HEADS
        self.kv_heads = KV_HEADS
        self.head_dim = HEAD_DIM

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        positions = torch.arange(t, device=x.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, -1e9)
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.o_proj(merge_heads(out))


class LlamaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = RMSNorm()
        self.self_attn = LlamaAttention()
        self.post_attention_layernorm = RMSNorm()
        self.mlp = LlamaMLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([LlamaDecoderLayer() for _ in range(LAYERS)])
        self.norm = RMSNorm()

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [B, T] long) -> logits [B, T, VOCAB]."""

    def __init__(self):
        super().__init__()
        self.model = LlamaModel()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.model(input_ids))


# ------------------------------------------------------------------- export
class References(nn.Module):
    """Holds reference tensors as buffers so C++ reads them with torch::jit::load."""

    def __init__(self, tensors):
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def forward(self) -> int:
        return 0


def reference_inputs(arch: str):
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
    if arch != "bert":
        return {"input_ids": input_ids}
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0  # second sequence is padded
    return {"input_ids": input_ids, "attention_mask": attention_mask}


ARCHS = {"gpt2": GPT2LMHeadModel, "bert": BertModel, "llama": LlamaForCausalLM}

# ------------------------------------------- prompt / prefix tuning references
# Computed here in eager mode from the fixtures' own modules, independently of
# the C++ graph analysis that must reproduce them.
PROMPT_TOKENS = 4
PREFIX_TOKENS = 3


def prompt_reference(arch: str, model, inputs, prompt: Tensor) -> Tensor:
    """Runs the model's layers on [P; X] and drops the prompt positions."""
    ids = inputs["input_ids"]
    k = prompt.size(0)
    P = prompt.unsqueeze(0).expand(ids.size(0), -1, -1)
    if arch == "gpt2":
        body = model.transformer
        positions = torch.arange(ids.size(1))
        x = torch.cat([P, body.wte(ids) + body.wpe(positions).unsqueeze(0)], 1)
        for block in body.h:
            x = block(x)
        return model.lm_head(body.ln_f(x))[:, k:]
    if arch == "bert":
        x = torch.cat([P, model.embeddings(ids)], 1)
        mask = torch.cat([torch.ones(ids.size(0), k, dtype=torch.long), inputs["attention_mask"]], 1)
        additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
        return model.encoder(x, additive)[:, k:]
    x = torch.cat([P, model.model.embed_tokens(ids)], 1)
    for layer in model.model.layers:
        x = layer(x)
    return model.lm_head(model.model.norm(x))[:, k:]


def with_prefix(keys: Tensor, values: Tensor, pk: Tensor, pv: Tensor):
    """[prefix; K], [prefix; V] along the sequence, after the head split."""
    b = keys.size(0)
    return (torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), keys], 2),
            torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), values], 2))


def causal_with_prefix(t: int, p: int) -> Tensor:
    """True where query i may attend: every prefix position and keys <= i."""
    return torch.cat([torch.ones(t, p, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)


def gpt2_prefix_attention(self, x, pk, pv):
    q, k, v = self.c_attn(x).split(self.hidden, dim=2)
    q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
    k, v = with_prefix(k, v, pk, pv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(self.hidden // self.heads)
    scores = scores.masked_fill(~causal_with_prefix(x.size(1), pk.size(1)), -1e9)
    return self.c_proj(merge_heads(F.softmax(scores, dim=-1) @ v))


def bert_prefix_attention(self, x, additive_mask, pk, pv):
    q = split_heads(self.query(x), self.heads)
    k, v = with_prefix(split_heads(self.key(x), self.heads), split_heads(self.value(x), self.heads), pk, pv)
    mask = torch.cat([torch.zeros(*additive_mask.shape[:-1], pk.size(1)), additive_mask], -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
    return merge_heads(F.softmax(scores, dim=-1) @ v)


def llama_prefix_attention(self, x, pk, pv):
    b, t = x.size(0), x.size(1)
    q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
    emb = torch.cat([torch.outer(torch.arange(t).float(), self.inv_freq)] * 2, dim=-1)
    q = q * emb.cos() + rotate_half(q) * emb.sin()
    k = k * emb.cos() + rotate_half(k) * emb.sin()
    k, v = with_prefix(k, v, pk, pv)  # prefix keys join after RoPE, with the KV-head count
    k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
    v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
    scores = scores.masked_fill(~causal_with_prefix(t, pk.size(1)), -1e9)
    return self.o_proj(merge_heads(F.softmax(scores, dim=-1) @ v))


def prefix_reference(arch: str, model, inputs, prefix: Tensor) -> Tensor:
    """The model with every attention replaced by the same attention over
    [prefix; K], [prefix; V]; prefix is [layers, 2, kv_heads, P, head_dim]."""
    if arch == "gpt2":
        attentions = [blk.attn for blk in model.transformer.h]
    elif arch == "bert":
        attentions = [lyr.attention.self for lyr in model.encoder.layer]
    else:
        attentions = [lyr.self_attn for lyr in model.model.layers]
    impl = {"gpt2": gpt2_prefix_attention, "bert": bert_prefix_attention, "llama": llama_prefix_attention}[arch]
    for i, attn in enumerate(attentions):
        attn.forward = (lambda a, i: lambda *args: impl(a, *args, prefix[i, 0], prefix[i, 1]))(attn, i)
    try:
        return model(*inputs.values())
    finally:
        for attn in attentions:
            del attn.forward


def export(arch: str, out_dir: str) -> None:
    torch.manual_seed({"gpt2": 1, "bert": 2, "llama": 3}[arch])
    model = ARCHS[arch]().eval()
    inputs = reference_inputs(arch)
    args = tuple(inputs.values())
    with torch.no_grad():
        expected = model(*args)
    torch.jit.script(model).save(os.path.join(out_dir, f"{arch}_scripted.pt"))
    torch.jit.trace(model, args).save(os.path.join(out_dir, f"{arch}_traced.pt"))
    kv_heads = KV_HEADS if arch == "llama" else HEADS
    prompt = torch.randn(PROMPT_TOKENS, HIDDEN) * 0.5
    prefix = torch.randn(LAYERS, 2, kv_heads, PREFIX_TOKENS, HIDDEN // HEADS)
    with torch.no_grad():
        prompt_expected = prompt_reference(arch, model, inputs, prompt)
        prefix_expected = prefix_reference(arch, model, inputs, prefix)
    refs = dict(inputs, expected=expected, prompt=prompt, prompt_expected=prompt_expected,
                prefix=prefix, prefix_expected=prefix_expected)
    torch.jit.script(References(refs)).save(os.path.join(out_dir, f"{arch}_ref.pt"))


def export_gpt2_small(path: str) -> None:
    """A scripted GPT-2-small-size model (12 layers, d=768, 12 heads, vocab
    50257, lm_head tied to wte as in GPT-2) with random weights, for benchmarks."""
    global HIDDEN, HEADS, LAYERS, VOCAB, MAX_POS
    HIDDEN, HEADS, LAYERS, VOCAB, MAX_POS = 768, 12, 12, 50257, 1024
    torch.manual_seed(0)
    model = GPT2LMHeadModel().eval()
    model.lm_head.weight = model.transformer.wte.weight
    torch.jit.script(model).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--gpt2-small", action="store_true",
                        help="write only gpt2_small_scripted.pt, the benchmark model")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    if args.gpt2_small:
        export_gpt2_small(os.path.join(args.out, "gpt2_small_scripted.pt"))
        return
    for arch in ARCHS:
        export(arch, args.out)
        print(f"exported {arch} fixtures to {args.out}")


if __name__ == "__main__":
    main()
