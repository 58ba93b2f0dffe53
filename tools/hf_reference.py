#!/usr/bin/python3
"""Tiny random Hugging Face checkpoints of the Llama family and their logits.

    /usr/bin/python3 tools/hf_reference.py --out build/fixtures/hf

For each case it writes a folder in HF's exact layout (config.json,
model.safetensors, or shards with model.safetensors.index.json) and
<case>/expected.safetensors with the inputs (input_ids, attention_mask) and the
logits (in the file's dtype; an F16 file's in fp32, as CPUs lack fp16 matmuls). The logits come from the plain-PyTorch model below, written from
transformers' modeling_llama.py / modeling_mistral.py / modeling_qwen2.py
(eager attention, RMSNorm in fp32, RoPE with rope_theta and llama3 scaling,
SwiGLU, GQA, sliding window), independent of the C++ code. Runs on Debian's
python3-torch (1.13); safetensors are written by hand (the format is a JSON
header and raw little-endian bytes), so no extra package is needed.
"""
import argparse
import json
import math
import os
import struct
import zlib

import torch
import torch.nn.functional as F

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors(path, tensors):
    """HF's safetensors layout: u64 header length, JSON header, data (C order, little endian)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = (t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# ------------------------------------------------------------------ the model, from HF's modeling code
def rope_inv_freq(cfg):
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return inv
    assert scaling["rope_type"] == "llama3"
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def rms_norm(x, w, eps):
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def linear(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def forward(cfg, sd, ids, mask):
    """Logits [B, T, V] of LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (eager, no cache)."""
    B, T = ids.shape
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    dtype = x.dtype
    positions = torch.arange(T)[None, :].float()
    freqs = (rope_inv_freq(cfg)[None, :, None].float() @ positions[:, None, :]).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    q_idx, kv_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = kv_idx <= q_idx
    window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
    allowed = allowed[None, None] & mask[:, None, None, :].bool()
    bias = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
        q = linear(sd, p + "self_attn.q_proj", h).view(B, T, H, D).transpose(1, 2)
        k = linear(sd, p + "self_attn.k_proj", h).view(B, T, KV, D).transpose(1, 2)
        v = linear(sd, p + "self_attn.v_proj", h).view(B, T, KV, D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(B, KV, H // KV, T, D).reshape(B, H, T, D)  # repeat_kv
        v = v[:, :, None].expand(B, KV, H // KV, T, D).reshape(B, H, T, D)
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + bias
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        a = torch.matmul(w, v).transpose(1, 2).reshape(B, T, H * D)
        x = x + linear(sd, p + "self_attn.o_proj", a)
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
        gate, up = linear(sd, p + "mlp.gate_proj", h), linear(sd, p + "mlp.up_proj", h)
        x = x + linear(sd, p + "mlp.down_proj", F.silu(gate) * up)
    x = rms_norm(x, sd["model.norm.weight"], cfg["rms_norm_eps"])
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return F.linear(x, head)


# ------------------------------------------------------------------ cases
def base_config(model_type, **extra):
    cfg = {"model_type": model_type, "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                                        "qwen2": "Qwen2ForCausalLM"}[model_type]],
           "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 64,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
           "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(extra)
    return cfg


def random_state(cfg, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps(cfg, sort_keys=True).encode()))
    H, KV, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D = cfg.get("head_dim") or hidden // H
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg["model_type"] != "qwen2" and cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    sd = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], hidden, generator=g) * 0.5,
          "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g)}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = torch.randn(cfg["vocab_size"], hidden, generator=g) * 0.2

    def lin(name, n_in, n_out, bias):
        sd[name + ".weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        if bias:
            sd[name + ".bias"] = 0.1 * torch.randn(n_out, generator=g)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        lin(p + "self_attn.q_proj", hidden, H * D, qkv_bias)
        lin(p + "self_attn.k_proj", hidden, KV * D, qkv_bias)
        lin(p + "self_attn.v_proj", hidden, KV * D, qkv_bias)
        lin(p + "self_attn.o_proj", H * D, hidden, o_bias)
        lin(p + "mlp.gate_proj", hidden, cfg["intermediate_size"], mlp_bias)
        lin(p + "mlp.up_proj", hidden, cfg["intermediate_size"], mlp_bias)
        lin(p + "mlp.down_proj", cfg["intermediate_size"], hidden, mlp_bias)
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {  # name: (config, dtype, shards)
    "llama": (base_config("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), torch.float32, 1),
    "llama_bias_headdim": (base_config("llama", attention_bias=True, mlp_bias=True, head_dim=16), torch.float32, 1),
    "llama_sharded": (base_config("llama"), torch.float32, 3),
    "llama_bf16": (base_config("llama", torch_dtype="bfloat16", rope_scaling=LLAMA3_ROPE), torch.bfloat16, 1),
    "llama_f16": (base_config("llama", torch_dtype="float16"), torch.float16, 1),
    "mistral": (base_config("mistral", sliding_window=3, rope_theta=1000000.0), torch.float32, 1),
    "qwen2": (base_config("qwen2", tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                          sliding_window=None, max_window_layers=2), torch.float32, 1),
}


def write_case(out, name, cfg, dtype, shards):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    sd = random_state(cfg, dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), sd)
    else:
        names, weight_map = sorted(sd), {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s::shards]}
            write_safetensors(os.path.join(folder, file), part)
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0  # left padding in the second row
    with torch.no_grad():  # CPU has no fp16 matmul (torch 1.13, LibTorch 1.13): an F16 file is computed in fp32
        compute = {k: v.float() for k, v in sd.items()} if dtype == torch.float16 else sd
        logits = forward(cfg, compute, ids, mask)
    write_safetensors(os.path.join(folder, "expected.safetensors"),
                      {"input_ids": ids, "attention_mask": mask, "logits": logits})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for name, (cfg, dtype, shards) in CASES.items():
        write_case(args.out, name, cfg, dtype, shards)
    print(f"wrote {len(CASES)} HF checkpoints to {args.out}")


if __name__ == "__main__":
    main()
